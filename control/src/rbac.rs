//! The Kubernetes API calls mesh-control makes, as RBAC rules, derived from the tables the
//! client code itself uses (`kube_source::KINDS`, `waypoint_deploy::OWNED`, ...). The
//! chart's ClusterRole must grant exactly these (control/tests/chart_rbac.rs renders the
//! chart and compares): a call added here without the rule fails on a real cluster, a
//! rule without a call is a right nobody needs.

use crate::{kube_source, leader, token_review, waypoint_deploy};
use std::collections::{BTreeMap, BTreeSet};

/// (API group, resource or `resource/subresource`) → verbs.
pub type Rules = BTreeMap<(String, String), BTreeSet<String>>;

/// Every rule the code needs.
pub fn rules() -> Rules {
    let mut out = Rules::new();
    let mut add = |group: &str, resource: &str, verbs: &[&str]| {
        out.entry((group.to_string(), resource.to_string()))
            .or_default()
            .extend(verbs.iter().map(|v| v.to_string()));
    };
    // Watched: kube's watcher lists, then watches (never a plain get).
    for (group, _, _, plural) in kube_source::KINDS.iter().chain(&waypoint_deploy::WATCHED) {
        add(group, plural, &["list", "watch"]);
    }
    let (group, plural) = token_review::TOKEN_REVIEWS;
    add(group, plural, &["create"]);
    // Waypoints: server-side apply creates what is missing and patches the rest.
    for (group, _, _, plural) in waypoint_deploy::OWNED {
        add(group, plural, &["create", "patch"]);
    }
    let (group, _, _, plural) = waypoint_deploy::GATEWAY;
    add(group, &format!("{plural}/status"), &["patch"]);
    // Not a call: the owner references set `blockOwnerDeletion`, which the API server
    // admits only from who may update the owner's finalizers (where
    // OwnerReferencesPermissionEnforcement is on, as on OpenShift).
    add(group, &format!("{plural}/finalizers"), &["update"]);
    out
}

/// Every rule the code needs in its own namespace (a Role): the Lease of the leader
/// election, read, created once, then renewed.
pub fn namespace_rules() -> Rules {
    let (group, plural) = leader::LEASES;
    Rules::from([(
        (group.to_string(), plural.to_string()),
        ["get", "create", "update"].map(String::from).into(),
    )])
}

/// The rules of a rendered ClusterRole (its `rules` array), in the same shape. A rule
/// naming several groups, resources or verbs counts for each combination; rules limited
/// to `resourceNames` are kept apart by a `name` suffix so they never pass for broad ones.
pub fn from_cluster_role(rules: &serde_json::Value) -> Result<Rules, String> {
    let strings = |r: &serde_json::Value, k: &str| -> Vec<String> {
        r[k].as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut out = Rules::new();
    for r in rules.as_array().ok_or("rules is not a list")? {
        let names = strings(r, "resourceNames");
        for g in strings(r, "apiGroups") {
            for res in strings(r, "resources") {
                let key = if names.is_empty() {
                    res
                } else {
                    format!("{res} (names {})", names.join(","))
                };
                out.entry((g.clone(), key))
                    .or_default()
                    .extend(strings(r, "verbs"));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn rules_cover_every_kind_read_and_object_written() {
        let r = rules();
        let verbs = |g: &str, res: &str| -> Vec<&str> {
            r[&(g.to_string(), res.to_string())]
                .iter()
                .map(String::as_str)
                .collect()
        };
        assert_eq!(
            verbs("discovery.k8s.io", "endpointslices"),
            ["list", "watch"]
        );
        assert_eq!(
            verbs("", "serviceaccounts"),
            ["create", "list", "patch", "watch"]
        );
        assert_eq!(
            verbs("gateway.networking.k8s.io", "gateways/finalizers"),
            ["update"]
        );
        assert_eq!(verbs("authentication.k8s.io", "tokenreviews"), ["create"]);
        assert!(r.keys().all(|(_, res)| res != "secrets"));
    }

    #[test]
    fn cluster_role_rules_are_flattened() {
        let rendered = json!([
            {"apiGroups": [""], "resources": ["pods", "services"], "verbs": ["list", "watch"]},
            {"apiGroups": [""], "resources": ["services"], "verbs": ["patch"]},
            {"apiGroups": ["apps"], "resources": ["daemonsets"], "resourceNames": ["x"], "verbs": ["get"]},
        ]);
        let r = from_cluster_role(&rendered).unwrap();
        assert_eq!(r.len(), 3);
        assert_eq!(r[&("".into(), "services".into())].len(), 3);
        assert!(r.contains_key(&("apps".into(), "daemonsets (names x)".into())));
    }
}
