//! AuthorizationPolicy and PeerAuthentication → istio.security.Authorization for ztunnel,
//! with Istio's L4/L7 split: an ALLOW rule that needs L7 attributes is dropped (more
//! restrictive); a DENY rule keeps its L4 parts (also more restrictive) and is dropped
//! when nothing L4 remains. Policies with targetRefs are for waypoints, not ztunnel.

use super::IndexConfig;
use crate::k8s::{AuthorizationPolicy, AuthzCondition, AuthzOperation, AuthzSource, Labels, Pod};
use crate::manifest::Objects;
use mesh_proto::security as pb;
use std::collections::{BTreeMap, HashMap};

pub const STATIC_STRICT: &str = "istio_converted_static_strict";

pub enum Converted {
    ForZtunnel(pb::Authorization, Vec<String>),
    /// Not a ztunnel policy (waypoint-targeted, or an action ztunnel does not enforce).
    NotForZtunnel(Option<String>),
}

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

fn principals(v: &[String]) -> Vec<pb::StringMatch> {
    v.iter()
        .map(|p| string_match(p.strip_prefix("spiffe://").unwrap_or(p)))
        .collect()
}

fn strings(v: &[String]) -> Vec<pb::StringMatch> {
    v.iter().map(|s| string_match(s)).collect()
}

fn cidrs(v: &[String]) -> Result<Vec<pb::Address>, String> {
    v.iter()
        .map(|s| {
            let net = mesh_authz::IpNet::parse(s)?;
            Ok(pb::Address {
                address: super::service::ip_bytes(net.addr),
                length: u32::from(net.prefix),
            })
        })
        .collect()
}

fn ports(v: &[String]) -> Result<Vec<u32>, String> {
    v.iter()
        .map(|p| {
            p.parse::<u16>()
                .map(u32::from)
                .map_err(|_| format!("port {p:?} is not a number"))
        })
        .collect()
}

fn service_accounts(v: &[String], ns: &str) -> Vec<pb::ServiceAccountMatch> {
    v.iter()
        .map(|s| {
            let (n, sa) = s.split_once('/').unwrap_or((ns, s));
            pb::ServiceAccountMatch {
                namespace: n.to_string(),
                service_account: sa.to_string(),
            }
        })
        .collect()
}

fn source_has_l7(s: &AuthzSource) -> bool {
    !(s.request_principals.is_empty()
        && s.not_request_principals.is_empty()
        && s.remote_ip_blocks.is_empty()
        && s.not_remote_ip_blocks.is_empty())
}

fn operation_has_l7(o: &AuthzOperation) -> bool {
    !(o.hosts.is_empty()
        && o.not_hosts.is_empty()
        && o.methods.is_empty()
        && o.not_methods.is_empty()
        && o.paths.is_empty()
        && o.not_paths.is_empty())
}

const L4_CONDITIONS: [&str; 5] = [
    "source.ip",
    "source.namespace",
    "source.principal",
    "destination.ip",
    "destination.port",
];

fn source_match(s: &AuthzSource, ns: &str) -> Result<pb::Match, String> {
    Ok(pb::Match {
        namespaces: strings(&s.namespaces),
        not_namespaces: strings(&s.not_namespaces),
        principals: principals(&s.principals),
        not_principals: principals(&s.not_principals),
        source_ips: cidrs(&s.ip_blocks)?,
        not_source_ips: cidrs(&s.not_ip_blocks)?,
        service_accounts: service_accounts(&s.service_accounts, ns),
        not_service_accounts: service_accounts(&s.not_service_accounts, ns),
        ..Default::default()
    })
}

fn condition_match(c: &AuthzCondition) -> Result<pb::Match, String> {
    let mut m = pb::Match::default();
    match c.key.as_str() {
        "source.ip" => {
            m.source_ips = cidrs(&c.values)?;
            m.not_source_ips = cidrs(&c.not_values)?;
        }
        "source.namespace" => {
            m.namespaces = strings(&c.values);
            m.not_namespaces = strings(&c.not_values);
        }
        "source.principal" => {
            m.principals = principals(&c.values);
            m.not_principals = principals(&c.not_values);
        }
        "destination.ip" => {
            m.destination_ips = cidrs(&c.values)?;
            m.not_destination_ips = cidrs(&c.not_values)?;
        }
        "destination.port" => {
            m.destination_ports = ports(&c.values)?;
            m.not_destination_ports = ports(&c.not_values)?;
        }
        other => return Err(format!("condition {other} needs L7")),
    }
    Ok(m)
}

pub fn convert(p: &AuthorizationPolicy, cfg: &IndexConfig) -> Converted {
    let ns = p.metadata.ns();
    let key = format!("{ns}/{}", p.metadata.name);
    if p.spec.target_ref.is_some() || !p.spec.target_refs.is_empty() {
        return Converted::NotForZtunnel(None);
    }
    let action = match p.spec.action.as_deref().unwrap_or("ALLOW") {
        "ALLOW" => pb::Action::Allow,
        "DENY" => pb::Action::Deny,
        other @ ("AUDIT" | "CUSTOM") => {
            return Converted::NotForZtunnel(Some(format!(
                "{key}: action {other} is not enforced by ztunnel (use a waypoint)"
            )));
        }
        other => {
            return Converted::NotForZtunnel(Some(format!("{key}: unknown action {other:?}")));
        }
    };
    let has_selector = p
        .spec
        .selector
        .as_ref()
        .is_some_and(|s| !s.match_labels.is_empty());
    let scope = if has_selector {
        pb::Scope::WorkloadSelector
    } else if ns == cfg.root_namespace {
        pb::Scope::Global
    } else {
        pb::Scope::Namespace
    };
    let mut warnings = Vec::new();
    let mut rules = Vec::new();
    for (i, rule) in p.spec.rules.iter().flatten().enumerate() {
        let l7 = rule.from.iter().any(|f| source_has_l7(&f.source))
            || rule.to.iter().any(|t| operation_has_l7(&t.operation))
            || rule
                .when
                .iter()
                .any(|w| !L4_CONDITIONS.contains(&w.key.as_str()));
        if l7 && action == pb::Action::Allow {
            warnings.push(format!(
                "{key}: rule {i} uses HTTP attributes; ztunnel drops it (only a waypoint can allow it)"
            ));
            continue;
        }
        let built = (|| -> Result<Vec<pb::Clause>, String> {
            let mut clauses = Vec::new();
            if !rule.from.is_empty() {
                let matches = rule
                    .from
                    .iter()
                    .map(|f| source_match(&f.source, ns))
                    .collect::<Result<Vec<_>, _>>()?;
                clauses.push(pb::Clause { matches });
            }
            if !rule.to.is_empty() {
                let mut matches = Vec::new();
                for t in &rule.to {
                    let m = pb::Match {
                        destination_ports: ports(&t.operation.ports)?,
                        not_destination_ports: ports(&t.operation.not_ports)?,
                        ..Default::default()
                    };
                    // A DENY operation reduced to nothing by dropping L7 parts no longer
                    // narrows the rule.
                    if m != pb::Match::default() || !operation_has_l7(&t.operation) {
                        matches.push(m);
                    }
                }
                if !matches.is_empty() {
                    clauses.push(pb::Clause { matches });
                }
            }
            for w in &rule.when {
                if L4_CONDITIONS.contains(&w.key.as_str()) {
                    clauses.push(pb::Clause {
                        matches: vec![condition_match(w)?],
                    });
                }
            }
            Ok(clauses)
        })();
        match built {
            Ok(clauses) => {
                let was_empty = rule.from.is_empty() && rule.to.is_empty() && rule.when.is_empty();
                if clauses.is_empty() && !was_empty {
                    warnings.push(format!(
                        "{key}: rule {i} has no L4 part left; ztunnel cannot enforce it"
                    ));
                    continue;
                }
                if l7 {
                    warnings.push(format!(
                        "{key}: rule {i}: HTTP attributes dropped, L4 parts enforced by ztunnel"
                    ));
                }
                rules.push(pb::Rule { clauses });
            }
            Err(e) => {
                warnings.push(format!("{key}: rule {i} is invalid and ignored: {e}"));
                if action == pb::Action::Deny {
                    // Fail closed: an unreadable DENY rule denies from everyone.
                    rules.push(pb::Rule { clauses: vec![] });
                }
            }
        }
    }
    Converted::ForZtunnel(
        pb::Authorization {
            name: p.metadata.name.clone(),
            namespace: ns.to_string(),
            scope: scope as i32,
            action: action as i32,
            rules,
            dry_run: p
                .metadata
                .annotations
                .get("istio.io/dry-run")
                .is_some_and(|v| v == "true"),
            extensions: vec![],
        },
        warnings,
    )
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

/// PeerAuthentication resolved mesh → namespace → workload.
#[derive(Clone, Debug, Default)]
pub struct StrictModes {
    root_namespace: String,
    mesh: Option<Mode>,
    namespaces: HashMap<String, Mode>,
    workloads: Vec<WorkloadPa>,
}

impl StrictModes {
    pub fn from_objects(objs: &Objects, cfg: &IndexConfig) -> Self {
        let mut s = StrictModes {
            root_namespace: cfg.root_namespace.clone(),
            ..Default::default()
        };
        for pa in objs.peer_authentications.values() {
            let ns = pa.metadata.ns();
            let m = mode(pa.spec.mtls.as_ref().and_then(|m| m.mode.as_deref()));
            let selector = pa
                .spec
                .selector
                .as_ref()
                .map(|s| s.match_labels.clone())
                .unwrap_or_default();
            if selector.is_empty() {
                if let Some(m) = m {
                    if ns == cfg.root_namespace {
                        s.mesh = Some(m);
                    } else {
                        s.namespaces.insert(ns.to_string(), m);
                    }
                }
            } else {
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
            .or(self.mesh)
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
        match convert(&policy(yaml), &IndexConfig::default()) {
            Converted::ForZtunnel(a, w) => (a, w),
            Converted::NotForZtunnel(w) => panic!("not for ztunnel: {w:?}"),
        }
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

    #[test]
    fn deny_keeps_l4_parts_and_drops_l7_only_rules() {
        let (a, w) = ztunnel(&format!(
            "{HEAD}spec:\n  action: DENY\n  rules:\n  - from: [{{source: {{namespaces: [evil]}}}}]\n    to: [{{operation: {{methods: [POST]}}}}]\n  - to: [{{operation: {{paths: [/admin]}}}}]\n"
        ));
        assert_eq!(a.rules.len(), 1);
        assert_eq!(
            a.rules[0].clauses.len(),
            1,
            "L7 operation dropped, the from clause stays"
        );
        assert_eq!(w.len(), 2, "{w:?}");
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
    fn waypoint_and_unsupported_policies_are_not_for_ztunnel() {
        let p = policy(&format!(
            "{HEAD}spec:\n  targetRefs: [{{kind: Gateway, group: gateway.networking.k8s.io, name: wp}}]\n"
        ));
        assert!(matches!(
            convert(&p, &IndexConfig::default()),
            Converted::NotForZtunnel(None)
        ));
        let p = policy(&format!("{HEAD}spec:\n  action: CUSTOM\n"));
        assert!(matches!(
            convert(&p, &IndexConfig::default()),
            Converted::NotForZtunnel(Some(_))
        ));
    }

    #[test]
    fn root_namespace_is_global() {
        let yaml = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: g, namespace: istio-system}\nspec: {rules: [{}]}\n";
        let (a, _) = ztunnel(yaml);
        assert_eq!(a.scope, pb::Scope::Global as i32);
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
}
