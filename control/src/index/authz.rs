//! AuthorizationPolicy and PeerAuthentication → istio.security.Authorization for ztunnel.
//!
//! An AuthorizationPolicy is read and validated once (`mesh_authz::k8s`, when the object
//! is read); here it is lowered to Istio's L4 form with mesh-authz's rules: what ztunnel
//! cannot evaluate (HTTP attributes, JWT attributes, what could not be read) allows
//! nothing in an ALLOW rule and matches in a DENY rule. Policies with targetRefs are for
//! waypoints, not ztunnel.

use super::IndexConfig;
use crate::k8s::{AuthorizationPolicy, Labels, Pod};
use crate::manifest::Objects;
use mesh_authz::PolicyScope;
use mesh_proto::security as pb;
use std::collections::{BTreeMap, HashMap};

pub const STATIC_STRICT: &str = "istio_converted_static_strict";

/// `*` → presence, `*x` → suffix, `x*` → prefix, otherwise exact.
pub fn string_match(s: &str) -> pb::StringMatch {
    use pb::string_match::MatchType;
    let t = if s == "*" {
        MatchType::Presence(())
    } else if let Some(rest) = s.strip_prefix('*') {
        MatchType::Suffix(rest.to_string())
    } else if let Some(rest) = s.strip_suffix('*') {
        MatchType::Prefix(rest.to_string())
    } else {
        MatchType::Exact(s.to_string())
    };
    pb::StringMatch {
        match_type: Some(t),
    }
}

/// Whether ztunnel enforces the policy: it names no targetRefs; or (an invalid policy,
/// enforced fail closed) a selector as well, or only targets this mesh cannot follow, so
/// that no waypoint would enforce it.
pub fn for_ztunnel(p: &AuthorizationPolicy) -> bool {
    !p.targeted || !p.policy.selector.is_empty() || p.policy.targets.is_empty()
}

/// Its scope at ztunnel: a selector picks workloads (in its namespace, or in every
/// namespace from the root namespace, as in Istio); without one it applies to its
/// namespace, or to the whole mesh from the root namespace.
pub fn scope(p: &AuthorizationPolicy, cfg: &IndexConfig) -> PolicyScope {
    if !p.policy.selector.is_empty() {
        PolicyScope::WorkloadSelector
    } else if p.metadata.ns() == cfg.root_namespace {
        PolicyScope::Global
    } else {
        PolicyScope::Namespace
    }
}

/// Whether a selector policy applies to `pod` (its namespace's, or the root namespace's).
pub fn selects(p: &AuthorizationPolicy, pod: &Pod, cfg: &IndexConfig) -> bool {
    let ns = p.metadata.ns();
    for_ztunnel(p)
        && (ns == pod.metadata.ns() || ns == cfg.root_namespace)
        && !p.policy.selector.is_empty()
        && p.policy
            .selector
            .iter()
            .all(|(k, v)| pod.metadata.labels.get(k) == Some(v))
}

/// The policy ztunnel enforces and notes on what it cannot evaluate; `None` when
/// ztunnel has nothing to enforce (a waypoint's policy, AUDIT).
pub fn convert(
    p: &AuthorizationPolicy,
    cfg: &IndexConfig,
) -> Option<(pb::Authorization, Vec<String>)> {
    if !for_ztunnel(p) {
        return None;
    }
    let (model, _) = mesh_authz::typed::policy(&p.policy, scope(p, cfg));
    model.to_proto()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Strict,
    Permissive,
}

fn mode(s: Option<&str>) -> Option<Mode> {
    match s {
        Some("STRICT") => Some(Mode::Strict),
        Some("PERMISSIVE") | Some("DISABLE") => Some(Mode::Permissive),
        _ => None, // UNSET inherits
    }
}

#[derive(Clone, Debug)]
struct WorkloadPa {
    name: String,
    namespace: String,
    selector: Labels,
    mode: Option<Mode>,
    ports: BTreeMap<u16, Mode>,
}

/// PeerAuthentication resolved as Istio does: the workload's (a selector, outside the
/// root namespace) over its namespace's (no selector) over the mesh's (no selector, in
/// the root namespace); an UNSET mode inherits from the next level. Among policies of
/// one level the oldest wins (then the first by name); a selector policy in the root
/// namespace is ignored, as in Istio.
#[derive(Clone, Debug, Default)]
pub struct StrictModes {
    root_namespace: String,
    /// The mesh-wide policy's mode (`Some(None)`: there is one, UNSET).
    mesh: Option<Option<Mode>>,
    namespaces: HashMap<String, Option<Mode>>,
    /// Oldest first.
    workloads: Vec<WorkloadPa>,
}

impl StrictModes {
    pub fn from_objects(objs: &Objects, cfg: &IndexConfig) -> Self {
        let mut s = StrictModes {
            root_namespace: cfg.root_namespace.clone(),
            ..Default::default()
        };
        let mut pas: Vec<_> = objs.peer_authentications.values().collect();
        // RFC 3339 timestamps sort as text; objects without one (manifests) come last.
        // One that could not be read (taken as STRICT) wins its level: fail closed.
        pas.sort_by_key(|pa| {
            let m = &pa.metadata;
            (
                pa.unreadable.is_none(),
                m.creation_timestamp.is_none(),
                m.creation_timestamp.clone(),
                m.ns().to_string(),
                m.name.clone(),
            )
        });
        for pa in pas {
            let ns = pa.metadata.ns();
            let m = mode(pa.spec.mtls.as_ref().and_then(|m| m.mode.as_deref()));
            let selector = pa
                .spec
                .selector
                .as_ref()
                .map(|s| s.match_labels.clone())
                .unwrap_or_default();
            if selector.is_empty() {
                if ns == cfg.root_namespace {
                    s.mesh.get_or_insert(m);
                } else {
                    s.namespaces.entry(ns.to_string()).or_insert(m);
                }
            } else if ns != cfg.root_namespace {
                s.workloads.push(WorkloadPa {
                    name: pa.metadata.name.clone(),
                    namespace: ns.to_string(),
                    selector,
                    mode: m,
                    ports: pa
                        .spec
                        .port_level_mtls
                        .iter()
                        .filter_map(|(p, v)| Some((p.parse().ok()?, mode(v.mode.as_deref())?)))
                        .collect(),
                });
            }
        }
        s
    }

    fn workload_pa(&self, pod: &Pod) -> Option<&WorkloadPa> {
        self.workloads.iter().find(|w| {
            w.namespace == pod.metadata.ns()
                && w.selector
                    .iter()
                    .all(|(k, v)| pod.metadata.labels.get(k) == Some(v))
        })
    }

    fn inherited(&self, ns: &str) -> Mode {
        self.namespaces
            .get(ns)
            .copied()
            .flatten()
            .or(self.mesh.flatten())
            .unwrap_or(Mode::Permissive)
    }

    /// Names of the policies a pod's workload must reference.
    pub fn policies_for(&self, pod: &Pod) -> Vec<String> {
        let ns = pod.metadata.ns();
        match self.workload_pa(pod) {
            Some(w) if !w.ports.is_empty() => {
                vec![format!("{ns}/converted_peer_authentication_{}", w.name)]
            }
            Some(w) => match w.mode.unwrap_or_else(|| self.inherited(ns)) {
                Mode::Strict => vec![format!("{}/{STATIC_STRICT}", self.root_namespace)],
                Mode::Permissive => vec![],
            },
            None => match self.inherited(ns) {
                Mode::Strict => vec![format!("{}/{STATIC_STRICT}", self.root_namespace)],
                Mode::Permissive => vec![],
            },
        }
    }

    /// The static STRICT policy and one per port-level PeerAuthentication.
    pub fn policies(&self) -> Vec<pb::Authorization> {
        let no_identity = || pb::Match {
            not_principals: vec![string_match("*")],
            ..Default::default()
        };
        let deny = |namespace: &str, name: String, m: pb::Match| pb::Authorization {
            name,
            namespace: namespace.to_string(),
            scope: pb::Scope::WorkloadSelector as i32,
            action: pb::Action::Deny as i32,
            rules: vec![pb::Rule {
                clauses: vec![pb::Clause { matches: vec![m] }],
            }],
            dry_run: false,
            extensions: vec![],
        };
        let mut out = vec![deny(
            &self.root_namespace,
            STATIC_STRICT.into(),
            no_identity(),
        )];
        for w in &self.workloads {
            if w.ports.is_empty() {
                continue;
            }
            let parent = w.mode.unwrap_or_else(|| self.inherited(&w.namespace));
            let mut m = no_identity();
            match parent {
                Mode::Strict => {
                    m.not_destination_ports = w
                        .ports
                        .iter()
                        .filter(|(_, m)| **m == Mode::Permissive)
                        .map(|(p, _)| u32::from(*p))
                        .collect();
                }
                Mode::Permissive => {
                    m.destination_ports = w
                        .ports
                        .iter()
                        .filter(|(_, m)| **m == Mode::Strict)
                        .map(|(p, _)| u32::from(*p))
                        .collect();
                    if m.destination_ports.is_empty() {
                        continue;
                    }
                }
            }
            out.push(deny(
                &w.namespace,
                format!("converted_peer_authentication_{}", w.name),
                m,
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn policy(yaml: &str) -> AuthorizationPolicy {
        let mut o = Objects::default();
        o.add_file(Path::new("t"), yaml).unwrap();
        o.authorization_policies.into_values().next().unwrap()
    }

    fn ztunnel(yaml: &str) -> (pb::Authorization, Vec<String>) {
        let p = policy(yaml);
        convert(&p, &IndexConfig::default()).expect("for ztunnel")
    }

    const HEAD: &str = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: shop}\n";

    #[test]
    fn allow_with_principals_ports_and_wildcards() {
        let (a, w) = ztunnel(&format!(
            "{HEAD}spec:\n  selector: {{matchLabels: {{app: web}}}}\n  rules:\n  - from: [{{source: {{principals: [\"cluster.local/ns/front/sa/*\"], serviceAccounts: [\"web\"]}}}}]\n    to: [{{operation: {{ports: [\"8080\"]}}}}]\n    when: [{{key: source.ip, values: [\"10.0.0.0/8\"]}}]\n"
        ));
        assert!(w.is_empty(), "{w:?}");
        assert_eq!(a.scope, pb::Scope::WorkloadSelector as i32);
        assert_eq!(a.action, pb::Action::Allow as i32);
        let clauses = &a.rules[0].clauses;
        assert_eq!(clauses.len(), 3);
        let from = &clauses[0].matches[0];
        assert_eq!(
            from.principals[0].match_type,
            Some(pb::string_match::MatchType::Prefix(
                "cluster.local/ns/front/sa/".into()
            ))
        );
        assert_eq!(
            from.service_accounts[0].namespace, "shop",
            "defaults to the policy namespace"
        );
        assert_eq!(clauses[1].matches[0].destination_ports, vec![8080]);
        assert_eq!(clauses[2].matches[0].source_ips[0].length, 8);
    }

    #[test]
    fn allow_rule_with_http_attributes_is_dropped() {
        let (a, w) = ztunnel(&format!(
            "{HEAD}spec:\n  rules:\n  - to: [{{operation: {{methods: [GET]}}}}]\n  - from: [{{source: {{namespaces: [front]}}}}]\n"
        ));
        assert_eq!(a.rules.len(), 1, "only the L4 rule remains");
        assert_eq!(w.len(), 1);
        assert_eq!(a.scope, pb::Scope::Namespace as i32);
    }

    /// Before, a DENY rule left with no L4 part was dropped: a DENY on paths enforced by
    /// ztunnel denied nothing. Now it denies everything it applies to, as Istio says.
    #[test]
    fn deny_keeps_l4_parts_and_an_l7_only_rule_denies_everything() {
        let (a, w) = ztunnel(&format!(
            "{HEAD}spec:\n  action: DENY\n  rules:\n  - from: [{{source: {{namespaces: [evil]}}}}]\n    to: [{{operation: {{methods: [POST]}}}}]\n  - to: [{{operation: {{paths: [/admin]}}}}]\n"
        ));
        assert_eq!(a.rules.len(), 2);
        assert_eq!(
            a.rules[0].clauses.len(),
            1,
            "L7 operation dropped, the from clause stays"
        );
        assert!(a.rules[1].clauses.is_empty(), "matches everything");
        assert_eq!(w.len(), 2, "{w:?}");
    }

    #[test]
    fn an_unknown_action_denies_everything_in_scope() {
        let (a, _) = ztunnel(&format!("{HEAD}spec:\n  action: ALOW\n  rules: [{{}}]\n"));
        assert_eq!(a.action, pb::Action::Deny as i32);
        assert_eq!(a.rules.len(), 1);
        assert!(a.rules[0].clauses.is_empty());
    }

    #[test]
    fn empty_spec_and_allow_all() {
        let (a, _) = ztunnel(&format!("{HEAD}spec: {{}}\n"));
        assert!(a.rules.is_empty(), "ALLOW with no rules denies everything");
        let (a, _) = ztunnel(&format!("{HEAD}spec:\n  rules: [{{}}]\n"));
        assert_eq!(a.rules.len(), 1);
        assert!(
            a.rules[0].clauses.is_empty(),
            "rules: [{{}}] matches everything"
        );
    }

    #[test]
    fn waypoint_and_audit_policies_are_not_for_ztunnel() {
        for spec in [
            "targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: wp}]",
            "action: AUDIT\n  rules: [{}]",
        ] {
            let p = policy(&format!("{HEAD}spec:\n  {spec}\n"));
            assert!(convert(&p, &IndexConfig::default()).is_none(), "{spec}");
        }
    }

    /// A policy whose only targets this mesh cannot follow would be enforced nowhere: it
    /// goes to ztunnel for its namespace, fail closed (before, a DENY on a ServiceEntry
    /// or a GatewayClass vanished).
    #[test]
    fn a_policy_with_only_targets_it_cannot_follow_is_enforced_fail_closed() {
        for target in [
            "{kind: ServiceEntry, group: networking.istio.io, name: se}",
            "{kind: GatewayClass, group: gateway.networking.k8s.io, name: istio-waypoint}",
        ] {
            let (a, w) = ztunnel(&format!(
                "{HEAD}spec:\n  targetRefs: [{target}]\n  action: DENY\n  rules: [{{from: [{{source: {{namespaces: [evil]}}}}]}}]\n"
            ));
            assert!(!w.is_empty(), "{target}: reported");
            assert_eq!(a.action, pb::Action::Deny as i32, "{target}");
            assert_eq!(a.scope, pb::Scope::Namespace as i32, "{target}");
            assert!(
                a.rules.iter().any(|r| r.clauses.is_empty()),
                "{target}: denies everything in its namespace"
            );
            let (a, _) = ztunnel(&format!(
                "{HEAD}spec:\n  targetRefs: [{target}]\n  rules: [{{}}]\n"
            ));
            assert_eq!(a.action, pb::Action::Allow as i32);
            assert!(a.rules.is_empty(), "{target}: an ALLOW that allows nothing");
        }
    }

    #[test]
    fn root_namespace_is_global_and_its_selectors_reach_every_namespace() {
        let yaml = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: g, namespace: istio-system}\nspec: {rules: [{}]}\n";
        let (a, _) = ztunnel(yaml);
        assert_eq!(a.scope, pb::Scope::Global as i32);
        let cfg = IndexConfig::default();
        let sel = policy(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: g, namespace: istio-system}\nspec: {selector: {matchLabels: {app: api}}, action: DENY, rules: [{}]}\n",
        );
        let local = policy(&format!(
            "{HEAD}spec: {{selector: {{matchLabels: {{app: api}}}}}}\n"
        ));
        let pod = |ns: &str, app: &str| {
            let mut p = Pod::default();
            p.metadata.namespace = Some(ns.into());
            p.metadata.labels.insert("app".into(), app.into());
            p
        };
        assert!(selects(&sel, &pod("back", "api"), &cfg));
        assert!(!selects(&sel, &pod("back", "web"), &cfg));
        assert!(selects(&local, &pod("shop", "api"), &cfg));
        assert!(
            !selects(&local, &pod("back", "api"), &cfg),
            "other namespaces: only from the root"
        );
    }

    #[test]
    fn peer_authentication_resolution() {
        let mut o = Objects::default();
        o.add_file(
            Path::new("pa"),
            r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: shop}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: legacy-port, namespace: shop}
spec:
  selector: {matchLabels: {app: legacy}}
  portLevelMtls: {"9000": {mode: PERMISSIVE}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: open, namespace: shop}
spec:
  selector: {matchLabels: {app: open}}
  mtls: {mode: PERMISSIVE}
"#,
        )
        .unwrap();
        let s = StrictModes::from_objects(&o, &IndexConfig::default());
        let pod = |app: &str, ns: &str| {
            let mut p = Pod::default();
            p.metadata.namespace = Some(ns.into());
            p.metadata.labels.insert("app".into(), app.into());
            p
        };
        assert_eq!(
            s.policies_for(&pod("web", "shop")),
            vec!["istio-system/istio_converted_static_strict"]
        );
        assert!(s.policies_for(&pod("web", "other")).is_empty());
        assert!(s.policies_for(&pod("open", "shop")).is_empty());
        assert_eq!(
            s.policies_for(&pod("legacy", "shop")),
            vec!["shop/converted_peer_authentication_legacy-port"]
        );
        let ps = s.policies();
        let port = ps
            .iter()
            .find(|p| p.name == "converted_peer_authentication_legacy-port")
            .unwrap();
        assert_eq!(
            port.rules[0].clauses[0].matches[0].not_destination_ports,
            vec![9000]
        );
    }

    /// Istio's precedence: workload > namespace > mesh; UNSET inherits; the oldest of a
    /// level wins; a selector policy in the root namespace is ignored.
    #[test]
    fn peer_authentication_precedence() {
        let mut o = Objects::default();
        o.add_file(
            Path::new("pa"),
            r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: mesh, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: root-selector, namespace: istio-system}
spec: {selector: {matchLabels: {app: api}}, mtls: {mode: PERMISSIVE}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: old, namespace: lax, creationTimestamp: "2024-01-01T00:00:00Z"}
spec: {mtls: {mode: PERMISSIVE}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: a-new, namespace: lax, creationTimestamp: "2025-01-01T00:00:00Z"}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: unset, namespace: inherit}
spec: {mtls: {mode: UNSET}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict-api, namespace: lax}
spec: {selector: {matchLabels: {app: api}}, mtls: {mode: STRICT}}
"#,
        )
        .unwrap();
        let s = StrictModes::from_objects(&o, &IndexConfig::default());
        let pod = |app: &str, ns: &str| {
            let mut p = Pod::default();
            p.metadata.namespace = Some(ns.into());
            p.metadata.labels.insert("app".into(), app.into());
            p
        };
        let strict = vec!["istio-system/istio_converted_static_strict".to_string()];
        // Mesh STRICT; the root namespace's selector policy does not make api permissive.
        assert_eq!(s.policies_for(&pod("api", "back")), strict);
        assert_eq!(s.policies_for(&pod("api", "istio-system")), strict);
        // Namespace over mesh: the oldest of the two in `lax` (PERMISSIVE) wins.
        assert!(s.policies_for(&pod("web", "lax")).is_empty());
        // Workload over namespace.
        assert_eq!(s.policies_for(&pod("api", "lax")), strict);
        // UNSET inherits the mesh's.
        assert_eq!(s.policies_for(&pod("web", "inherit")), strict);
    }

    /// A PeerAuthentication whose spec cannot be read is taken as STRICT (before, it was
    /// refused and the namespace stayed PERMISSIVE: plaintext got in).
    #[test]
    fn an_unreadable_peer_authentication_is_strict() {
        let mut o = Objects::default();
        o.add_file(
            Path::new("pa"),
            r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: old, namespace: shop, creationTimestamp: "2020-01-01T00:00:00Z"}
spec: {mtls: {mode: PERMISSIVE}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: typo, namespace: shop}
spec: {mtls: {mdoe: STRICT}}
"#,
        )
        .unwrap();
        let typo = &o.peer_authentications[&("shop".into(), "typo".into())];
        assert_eq!(typo.unreadable.as_ref().unwrap().0, "spec.mtls.mdoe");
        let s = StrictModes::from_objects(&o, &IndexConfig::default());
        let mut pod = Pod::default();
        pod.metadata.namespace = Some("shop".into());
        assert_eq!(
            s.policies_for(&pod),
            vec!["istio-system/istio_converted_static_strict"]
        );
    }

    /// Each problem reaches the user with its object and field (the control log prints
    /// `warnings`, `meshctl status` the findings), and the policy is still published.
    #[test]
    fn findings_name_the_object_and_field_and_the_policy_is_still_published() {
        let mut o = Objects::default();
        o.add_file(
            Path::new("p"),
            &format!(
                "{HEAD}spec:\n  selector: {{matchLabels: {{app: api}}}}\n  rules:\n  - from: [{{source: {{ipBlocks: [\"10.0.0.0/40\"]}}}}]\n    to: [{{operation: {{methods: [GET]}}}}]\n"
            ),
        )
        .unwrap();
        let r = crate::index::compute(&o, &IndexConfig::default());
        let f = &r.policy_findings[0];
        assert_eq!(
            (f.object.as_str(), f.severity, f.field.as_str()),
            (
                "AuthorizationPolicy shop/p",
                "error",
                "spec.rules[0].from[0].source.ipBlocks[0]"
            )
        );
        assert!(r.warnings.contains(&f.to_string()));
        assert!(
            r.policy_findings.iter().any(|f| f.severity == "note"),
            "the L4 note on methods"
        );
        let a = &r.authorizations["shop/p"];
        assert!(a.rules.is_empty(), "published, allowing nothing: {a:?}");
    }
}
