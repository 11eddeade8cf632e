//! The chart grants mesh-control exactly the API calls its code makes: the ClusterRole
//! rendered by Helm (scripts/helm.sh finds or fetches helm) against `rbac::rules()`.

use mesh_control::rbac::{Rules, from_cluster_role, namespace_rules, rules};
use std::path::Path;
use std::process::Command;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
}

/// The chart rendered as `helm template` does for a GitOps user (CA Secret named).
fn render() -> Vec<serde_json::Value> {
    let helm = Command::new(repo().join("scripts/helm.sh"))
        .output()
        .expect("scripts/helm.sh runs");
    assert!(
        helm.status.success(),
        "{}",
        String::from_utf8_lossy(&helm.stderr)
    );
    let helm = String::from_utf8(helm.stdout).unwrap();
    let out = Command::new(helm.trim())
        .current_dir(repo())
        .args([
            "template",
            "mesh",
            "deploy/charts/ambient-mesh",
            "--namespace",
            "mesh-system",
            "--set",
            "control.ca.existingSecret=mesh-ca",
        ])
        .output()
        .expect("helm runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_saphyr::from_multiple(&String::from_utf8(out.stdout).unwrap())
        .expect("the rendered chart is YAML")
}

fn describe(r: &Rules) -> String {
    r.iter()
        .map(|((g, res), verbs)| {
            let verbs: Vec<&str> = verbs.iter().map(String::as_str).collect();
            format!(
                "  {}/{res}: {}",
                if g.is_empty() { "core" } else { g },
                verbs.join(",")
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// (needed, not granted; granted, not needed).
fn compare(needed: &Rules, granted: &Rules) -> (Rules, Rules) {
    let diff = |a: &Rules, b: &Rules| -> Rules {
        a.iter()
            .filter_map(|(k, v)| {
                let only: std::collections::BTreeSet<String> = v
                    .difference(b.get(k).unwrap_or(&Default::default()))
                    .cloned()
                    .collect();
                (!only.is_empty()).then(|| (k.clone(), only))
            })
            .collect()
    };
    (diff(needed, granted), diff(granted, needed))
}

fn find<'a>(docs: &'a [serde_json::Value], kind: &str, name: &str) -> &'a serde_json::Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("{kind} {name} not rendered"))
}

#[test]
fn the_chart_grants_mesh_control_exactly_the_calls_it_makes() {
    let docs = render();
    for (kind, name, needed) in [
        ("ClusterRole", "mesh-control-mesh-system", rules()),
        ("Role", "mesh-control", namespace_rules()),
    ] {
        let role = find(&docs, kind, name);
        let granted = from_cluster_role(&role["rules"]).unwrap();
        let (missing, extra) = compare(&needed, &granted);
        assert!(
            missing.is_empty() && extra.is_empty(),
            "the chart's {kind} {name} and the code disagree\nneeded by the code, not granted:\n{}\ngranted, never used:\n{}",
            describe(&missing),
            describe(&extra)
        );
    }
    assert_eq!(
        find(&docs, "Role", "mesh-control")["metadata"]["namespace"],
        "mesh-system"
    );
    // Each bound to mesh-control's account, and nothing else bound to it.
    for (kind, role) in [
        ("ClusterRoleBinding", "mesh-control-mesh-system"),
        ("RoleBinding", "mesh-control"),
    ] {
        let b = find(&docs, kind, role);
        assert_eq!(b["roleRef"]["name"], role);
        assert_eq!(
            b["subjects"],
            serde_json::json!([{"kind": "ServiceAccount", "name": "mesh-control", "namespace": "mesh-system"}])
        );
    }
    let bindings = docs
        .iter()
        .filter(|d| {
            d["kind"].as_str().is_some_and(|k| k.ends_with("Binding"))
                && d["subjects"]
                    .as_array()
                    .is_some_and(|s| s.iter().any(|s| s["name"] == "mesh-control"))
        })
        .count();
    assert_eq!(bindings, 2, "mesh-control has exactly these two bindings");
}
