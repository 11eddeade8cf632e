//! The chart grants mesh-control exactly the API calls its code makes: the ClusterRole
//! rendered by Helm (scripts/helm.sh finds or fetches helm) against `rbac::rules()`.

use mesh_control::rbac::{Rules, from_cluster_role, rules};
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

#[test]
fn the_chart_grants_mesh_control_exactly_the_calls_it_makes() {
    let docs = render();
    let role = docs
        .iter()
        .find(|d| d["kind"] == "ClusterRole" && d["metadata"]["name"] == "mesh-control-mesh-system")
        .expect("mesh-control's ClusterRole");
    let granted = from_cluster_role(&role["rules"]).unwrap();
    let needed = rules();
    let missing: Rules = needed
        .iter()
        .filter_map(|(k, v)| {
            let lacking: std::collections::BTreeSet<String> = v
                .difference(granted.get(k).unwrap_or(&Default::default()))
                .cloned()
                .collect();
            (!lacking.is_empty()).then(|| (k.clone(), lacking))
        })
        .collect();
    let extra: Rules = granted
        .iter()
        .filter_map(|(k, v)| {
            let unused: std::collections::BTreeSet<String> = v
                .difference(needed.get(k).unwrap_or(&Default::default()))
                .cloned()
                .collect();
            (!unused.is_empty()).then(|| (k.clone(), unused))
        })
        .collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "the chart's ClusterRole and the code disagree\nneeded by the code, not granted:\n{}\ngranted, never used:\n{}",
        describe(&missing),
        describe(&extra)
    );
    // Bound to mesh-control's account, and nothing else bound to it.
    let binding = docs
        .iter()
        .find(|d| {
            d["kind"] == "ClusterRoleBinding" && d["roleRef"]["name"] == "mesh-control-mesh-system"
        })
        .expect("the binding");
    assert_eq!(binding["subjects"][0]["name"], "mesh-control");
    let others = docs
        .iter()
        .filter(|d| {
            d["kind"].as_str().is_some_and(|k| k.ends_with("Binding"))
                && d["subjects"]
                    .as_array()
                    .is_some_and(|s| s.iter().any(|s| s["name"] == "mesh-control"))
        })
        .count();
    assert_eq!(others, 1, "mesh-control has one binding");
}
