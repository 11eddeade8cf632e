//! The index: pure functions from observed Kubernetes objects to the resources the data
//! plane consumes (istio.workload.Address, istio.security.Authorization). No I/O, so
//! every rule is unit-tested.

pub mod authz;
pub mod endpoint_slice;
pub mod enrollment;
pub mod routes;
pub mod service;
pub mod waypoint;
pub mod waypoint_config;
pub mod workload;

use crate::manifest::Objects;
use mesh_proto::{security as pb_sec, workload as pb};
use std::collections::BTreeMap;

/// The objects of one namespace in a map keyed by (namespace, name): a range, not a scan
/// (10,000 pods never look through every Service or policy).
pub fn in_namespace<'a, T>(
    objects: &'a BTreeMap<(String, String), T>,
    ns: &'a str,
) -> impl Iterator<Item = &'a T> + 'a {
    objects
        .range((ns.to_string(), String::new())..)
        .take_while(move |((n, _), _)| n == ns)
        .map(|(_, o)| o)
}

#[derive(Clone, Debug)]
pub struct IndexConfig {
    pub cluster_id: String,
    pub trust_domain: String,
    /// DNS suffix of Services: `<name>.<ns>.svc.<domain>`.
    pub domain_suffix: String,
    /// Policies here apply mesh-wide (Istio's root namespace).
    pub root_namespace: String,
    /// Pods in these namespaces are never enrolled.
    pub excluded_namespaces: Vec<String>,
}

impl Default for IndexConfig {
    fn default() -> Self {
        IndexConfig {
            cluster_id: "Kubernetes".into(),
            trust_domain: "cluster.local".into(),
            domain_suffix: "cluster.local".into(),
            root_namespace: "istio-system".into(),
            excluded_namespaces: vec!["kube-system".into()],
        }
    }
}

impl IndexConfig {
    pub fn service_hostname(&self, ns: &str, name: &str) -> String {
        format!("{name}.{ns}.svc.{}", self.domain_suffix)
    }
}

/// Everything computed from one set of objects.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Resources {
    /// xDS name (workload uid, or `ns/hostname`) → resource.
    pub addresses: BTreeMap<String, pb::Address>,
    /// `ns/name` → policy.
    pub authorizations: BTreeMap<String, pb_sec::Authorization>,
    /// Pods by node, enrolled or not: what each node agent must (not) capture.
    pub node_pods: BTreeMap<String, Vec<enrollment::NodePod>>,
    /// Things the user should know (e.g. a policy rule dropped at L4); logged.
    pub warnings: Vec<String>,
    /// What could not be understood in each policy, or is enforced other than written,
    /// with its object and field (`meshctl status`).
    pub policy_findings: Vec<PolicyFinding>,
    /// HTTPRoutes and GRPCRoutes as read and validated, by xDS name (`ns/name`,
    /// `GRPCRoute/ns/name`): what the waypoints they attach to receive.
    pub routes: BTreeMap<String, mesh_proto::waypoint::HttpRoute>,
    /// What could not be understood in each route or HTTPFault (its rule answers 500, its
    /// match matches nothing), with its object and field (`meshctl status`).
    pub route_findings: Vec<PolicyFinding>,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct PolicyFinding {
    /// `AuthorizationPolicy <namespace>/<name>`, `HTTPRoute <namespace>/<name>`, ...
    pub object: String,
    /// `error` (enforced fail closed), `unsupported` (valid for Istio, not evaluated
    /// here: fail closed) or `note`.
    pub severity: &'static str,
    pub field: String,
    pub message: String,
}

impl std::fmt::Display for PolicyFinding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}: {}",
            self.severity, self.object, self.field, self.message
        )
    }
}

fn policy_findings(p: &crate::k8s::AuthorizationPolicy, notes: &[String]) -> Vec<PolicyFinding> {
    use mesh_authz::k8s::Severity;
    let object = format!(
        "AuthorizationPolicy {}/{}",
        p.metadata.ns(),
        p.metadata.name
    );
    let mut out: Vec<PolicyFinding> = p
        .findings
        .iter()
        .map(|f| PolicyFinding {
            object: object.clone(),
            severity: match f.severity {
                Severity::Error => "error",
                Severity::Unsupported => "unsupported",
                Severity::Note => "note",
            },
            field: f.field.clone(),
            message: f.message.clone(),
        })
        .collect();
    out.extend(notes.iter().map(|n| PolicyFinding {
        object: object.clone(),
        severity: "note",
        field: "spec.rules".into(),
        message: format!("at ztunnel (L4): {n}"),
    }));
    out
}

pub fn compute(objs: &Objects, cfg: &IndexConfig) -> Resources {
    let mut out = Resources::default();
    let strict = authz::StrictModes::from_objects(objs, cfg);
    for svc in objs.services.values() {
        if let Some(s) = service::service(objs, cfg, svc) {
            let name = format!("{}/{}", s.namespace, s.hostname);
            out.addresses.insert(
                name,
                pb::Address {
                    r#type: Some(pb::address::Type::Service(s)),
                },
            );
        }
    }
    let pod_ips = endpoint_slice::pod_addresses(objs);
    for es in objs.endpoint_slices.values() {
        for w in endpoint_slice::workloads(objs, cfg, es, &pod_ips, &mut out.warnings) {
            out.addresses.insert(
                w.uid.clone(),
                pb::Address {
                    r#type: Some(pb::address::Type::Workload(w)),
                },
            );
        }
    }
    for pod in objs.pods.values() {
        let enrolled = enrollment::is_enrolled(objs, cfg, pod);
        if let Some(node) = &pod.spec.node_name
            && !pod.spec.host_network
        {
            out.node_pods
                .entry(node.clone())
                .or_default()
                .push(enrollment::NodePod::from_pod(pod, enrolled));
        }
        if let Some(w) = workload::workload(objs, cfg, pod, enrolled, &strict) {
            out.addresses.insert(
                w.uid.clone(),
                pb::Address {
                    r#type: Some(pb::address::Type::Workload(w)),
                },
            );
        }
    }
    for policy in objs.authorization_policies.values() {
        let notes = match authz::convert(policy, cfg) {
            Some((a, notes)) => {
                out.authorizations
                    .insert(format!("{}/{}", a.namespace, a.name), a);
                notes
            }
            None => vec![],
        };
        let findings = policy_findings(policy, &notes);
        out.warnings
            .extend(findings.iter().map(ToString::to_string));
        out.policy_findings.extend(findings);
    }
    for pa in objs.peer_authentications.values() {
        if let Some((field, message)) = &pa.unreadable {
            let f = PolicyFinding {
                object: format!(
                    "PeerAuthentication {}/{}",
                    pa.metadata.ns(),
                    pa.metadata.name
                ),
                severity: "error",
                field: field.clone(),
                message: message.clone(),
            };
            out.warnings.push(f.to_string());
            out.policy_findings.push(f);
        }
    }
    let (routes, route_findings) = routes::read_all(objs);
    out.routes = routes;
    out.warnings
        .extend(route_findings.iter().map(ToString::to_string));
    out.route_findings = route_findings;
    for a in strict.policies() {
        out.authorizations
            .insert(format!("{}/{}", a.namespace, a.name), a);
    }
    out
}

/// The fuzz target's entry: parse any bytes as a manifest file and index the result;
/// never panic.
pub fn fuzz_entry(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut objects = Objects::default();
    if objects
        .add_file(std::path::Path::new("fuzz.yaml"), text)
        .is_ok()
    {
        let _ = compute(&objects, &IndexConfig::default());
    }
}

#[cfg(test)]
mod tests {
    use super::fuzz_entry;

    /// The fuzz entry on mutations of a valid file (deterministic, so it runs in CI).
    #[test]
    fn mutated_manifests_never_panic() {
        const ALPHABET: &[u8] = b" :-{}[]#\n\"'0aZ";
        let seed = crate::manifest::tests::GOOD.as_bytes().to_vec();
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        for _ in 0..3000 {
            let mut d = seed.clone();
            for _ in 0..(x % 6 + 1) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let i = (x as usize) % d.len();
                match x % 3 {
                    0 => d[i] = ALPHABET[(x >> 20) as usize % ALPHABET.len()],
                    1 => {
                        d.remove(i);
                    }
                    _ => d.insert(i, ALPHABET[(x >> 28) as usize % ALPHABET.len()]),
                }
            }
            fuzz_entry(&d);
        }
    }
}
