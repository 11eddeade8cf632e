//! Running without a control plane: workloads, services and policies from a local YAML
//! file, converted to the same `Address`/`Authorization` messages xDS carries and applied
//! through the same validation. Field names follow the protobuf (camelCase).

use mesh_authz::ip_bytes;
use mesh_proto::{security as sec, workload as pb};
use serde::Deserialize;
use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalConfig {
    #[serde(default)]
    pub workloads: Vec<LocalWorkload>,
    #[serde(default)]
    pub services: Vec<LocalService>,
    #[serde(default)]
    pub policies: Vec<LocalPolicy>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalPort {
    pub service_port: u32,
    #[serde(default)]
    pub target_port: u32,
    #[serde(default)]
    pub app_protocol: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalGateway {
    /// An IP address, or `namespace/hostname` of a service.
    pub address: Option<IpAddr>,
    pub service: Option<String>,
    #[serde(default = "hbone_port")]
    pub port: u32,
}

fn hbone_port() -> u32 {
    15008
}

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalWorkload {
    #[serde(default)]
    pub uid: String,
    pub name: String,
    pub namespace: String,
    #[serde(default)]
    pub service_account: String,
    #[serde(default)]
    pub trust_domain: String,
    #[serde(default)]
    pub addresses: Vec<IpAddr>,
    #[serde(default)]
    pub network: String,
    #[serde(default)]
    pub node: String,
    /// HBONE or NONE (default NONE: not in the mesh).
    #[serde(default)]
    pub protocol: Option<String>,
    #[serde(default)]
    pub waypoint: Option<LocalGateway>,
    #[serde(default)]
    pub services: HashMap<String, Vec<LocalPort>>,
    #[serde(default)]
    pub authorization_policies: Vec<String>,
    #[serde(default = "yes")]
    pub healthy: bool,
    #[serde(default)]
    pub capacity: Option<u32>,
    #[serde(default)]
    pub canonical_name: String,
    #[serde(default)]
    pub canonical_revision: String,
    #[serde(default)]
    pub workload_name: String,
    #[serde(default)]
    pub cluster_id: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalLoadBalancing {
    #[serde(default)]
    pub routing_preference: Vec<String>,
    #[serde(default)]
    pub mode: Option<String>,
    #[serde(default)]
    pub health_policy: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalService {
    pub name: String,
    pub namespace: String,
    pub hostname: String,
    #[serde(default)]
    pub addresses: Vec<IpAddr>,
    #[serde(default)]
    pub ports: Vec<LocalPort>,
    #[serde(default)]
    pub subject_alt_names: Vec<String>,
    #[serde(default)]
    pub waypoint: Option<LocalGateway>,
    #[serde(default)]
    pub load_balancing: Option<LocalLoadBalancing>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalPolicy {
    pub name: String,
    pub namespace: String,
    /// GLOBAL, NAMESPACE (default) or WORKLOAD_SELECTOR
    #[serde(default)]
    pub scope: Option<String>,
    /// ALLOW (default) or DENY
    #[serde(default)]
    pub action: Option<String>,
    #[serde(default)]
    pub dry_run: bool,
    #[serde(default)]
    pub rules: Vec<LocalRule>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalRule {
    #[serde(default)]
    pub clauses: Vec<LocalClause>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalClause {
    #[serde(default)]
    pub matches: Vec<LocalMatch>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalStringMatch {
    pub exact: Option<String>,
    pub prefix: Option<String>,
    pub suffix: Option<String>,
    pub presence: Option<serde_json::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalSa {
    pub namespace: String,
    pub service_account: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalMatch {
    #[serde(default)]
    pub namespaces: Vec<LocalStringMatch>,
    #[serde(default)]
    pub not_namespaces: Vec<LocalStringMatch>,
    #[serde(default)]
    pub principals: Vec<LocalStringMatch>,
    #[serde(default)]
    pub not_principals: Vec<LocalStringMatch>,
    #[serde(default)]
    pub source_ips: Vec<String>,
    #[serde(default)]
    pub not_source_ips: Vec<String>,
    #[serde(default)]
    pub destination_ips: Vec<String>,
    #[serde(default)]
    pub not_destination_ips: Vec<String>,
    #[serde(default)]
    pub destination_ports: Vec<u32>,
    #[serde(default)]
    pub not_destination_ports: Vec<u32>,
    #[serde(default)]
    pub service_accounts: Vec<LocalSa>,
    #[serde(default)]
    pub not_service_accounts: Vec<LocalSa>,
}

fn enum_value<E: Copy>(
    what: &str,
    value: &Option<String>,
    parse: impl Fn(&str) -> Option<E>,
    default: E,
) -> Result<E, String> {
    match value {
        None => Ok(default),
        Some(v) => parse(v).ok_or_else(|| format!("{what}: unknown value {v:?}")),
    }
}

fn gateway(g: &LocalGateway) -> Result<pb::GatewayAddress, String> {
    let destination = match (&g.address, &g.service) {
        (Some(ip), None) => pb::gateway_address::Destination::Address(pb::NetworkAddress {
            network: String::new(),
            address: ip_bytes(*ip),
            length: None,
        }),
        (None, Some(s)) => {
            let (ns, host) = s
                .split_once('/')
                .ok_or_else(|| format!("waypoint service {s:?} must be namespace/hostname"))?;
            pb::gateway_address::Destination::Hostname(pb::NamespacedHostname {
                namespace: ns.into(),
                hostname: host.into(),
            })
        }
        _ => return Err("waypoint needs exactly one of address or service".into()),
    };
    Ok(pb::GatewayAddress {
        destination: Some(destination),
        hbone_mtls_port: g.port,
    })
}

fn ports(v: &[LocalPort]) -> Result<Vec<pb::Port>, String> {
    v.iter()
        .map(|p| {
            Ok(pb::Port {
                service_port: p.service_port,
                target_port: p.target_port,
                app_protocol: enum_value(
                    "appProtocol",
                    &p.app_protocol,
                    |s| pb::AppProtocol::from_str_name(s).map(|e| e as i32),
                    0,
                )?,
            })
        })
        .collect()
}

fn cidr(s: &str) -> Result<sec::Address, String> {
    let net = mesh_authz::IpNet::parse(s)?;
    Ok(sec::Address {
        address: ip_bytes(net.addr),
        length: u32::from(net.prefix),
    })
}

fn strings(v: &[LocalStringMatch]) -> Result<Vec<sec::StringMatch>, String> {
    use sec::string_match::MatchType;
    v.iter()
        .map(|m| {
            let t = match (&m.exact, &m.prefix, &m.suffix, &m.presence) {
                (Some(e), None, None, None) => MatchType::Exact(e.clone()),
                (None, Some(p), None, None) => MatchType::Prefix(p.clone()),
                (None, None, Some(s), None) => MatchType::Suffix(s.clone()),
                (None, None, None, Some(_)) => MatchType::Presence(()),
                _ => {
                    return Err(
                        "a string match needs exactly one of exact, prefix, suffix, presence"
                            .to_string(),
                    );
                }
            };
            Ok(sec::StringMatch {
                match_type: Some(t),
            })
        })
        .collect()
}

/// Address and Authorization resources, each with its xDS name.
pub type Resources = (
    Vec<(String, pb::Address)>,
    Vec<(String, sec::Authorization)>,
);

impl LocalConfig {
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        serde_saphyr::from_str(text).map_err(|e| e.to_string())
    }

    /// The messages xDS would have delivered: (name, Address) and (name, Authorization).
    pub fn to_resources(&self, cluster_id: &str) -> Result<Resources, String> {
        let mut addresses = Vec::new();
        for w in &self.workloads {
            let uid = if w.uid.is_empty() {
                format!("{cluster_id}//Pod/{}/{}", w.namespace, w.name)
            } else {
                w.uid.clone()
            };
            let what = format!("workload {}/{}", w.namespace, w.name);
            let services = w
                .services
                .iter()
                .map(|(k, v)| Ok((k.clone(), pb::PortList { ports: ports(v)? })))
                .collect::<Result<_, String>>()
                .map_err(|e| format!("{what}: {e}"))?;
            let workload = pb::Workload {
                uid: uid.clone(),
                name: w.name.clone(),
                namespace: w.namespace.clone(),
                addresses: w.addresses.iter().copied().map(ip_bytes).collect(),
                network: w.network.clone(),
                tunnel_protocol: enum_value(
                    &what,
                    &w.protocol,
                    |s| pb::TunnelProtocol::from_str_name(s).map(|e| e as i32),
                    0,
                )?,
                trust_domain: w.trust_domain.clone(),
                service_account: w.service_account.clone(),
                waypoint: w
                    .waypoint
                    .as_ref()
                    .map(gateway)
                    .transpose()
                    .map_err(|e| format!("{what}: {e}"))?,
                node: w.node.clone(),
                canonical_name: w.canonical_name.clone(),
                canonical_revision: w.canonical_revision.clone(),
                workload_name: w.workload_name.clone(),
                services,
                authorization_policies: w.authorization_policies.clone(),
                status: if w.healthy { 0 } else { 1 },
                cluster_id: if w.cluster_id.is_empty() {
                    cluster_id.to_string()
                } else {
                    w.cluster_id.clone()
                },
                capacity: w.capacity,
                ..Default::default()
            };
            addresses.push((
                uid,
                pb::Address {
                    r#type: Some(pb::address::Type::Workload(workload)),
                },
            ));
        }
        for s in &self.services {
            let what = format!("service {}/{}", s.namespace, s.name);
            let load_balancing = s
                .load_balancing
                .as_ref()
                .map(|lb| -> Result<pb::LoadBalancing, String> {
                    use pb::load_balancing::{HealthPolicy, Mode, Scope};
                    Ok(pb::LoadBalancing {
                        routing_preference: lb
                            .routing_preference
                            .iter()
                            .map(|p| {
                                Scope::from_str_name(p)
                                    .map(|s| s as i32)
                                    .ok_or_else(|| format!("{what}: unknown scope {p:?}"))
                            })
                            .collect::<Result<_, _>>()?,
                        mode: enum_value(
                            &what,
                            &lb.mode,
                            |m| Mode::from_str_name(m).map(|e| e as i32),
                            0,
                        )?,
                        health_policy: enum_value(
                            &what,
                            &lb.health_policy,
                            |m| HealthPolicy::from_str_name(m).map(|e| e as i32),
                            0,
                        )?,
                    })
                })
                .transpose()?;
            let svc = pb::Service {
                name: s.name.clone(),
                namespace: s.namespace.clone(),
                hostname: s.hostname.clone(),
                addresses: s
                    .addresses
                    .iter()
                    .map(|ip| pb::NetworkAddress {
                        network: String::new(),
                        address: ip_bytes(*ip),
                        length: None,
                    })
                    .collect(),
                ports: ports(&s.ports).map_err(|e| format!("{what}: {e}"))?,
                subject_alt_names: s.subject_alt_names.clone(),
                waypoint: s
                    .waypoint
                    .as_ref()
                    .map(gateway)
                    .transpose()
                    .map_err(|e| format!("{what}: {e}"))?,
                load_balancing,
                ..Default::default()
            };
            addresses.push((
                format!("{}/{}", s.namespace, s.hostname),
                pb::Address {
                    r#type: Some(pb::address::Type::Service(svc)),
                },
            ));
        }
        let mut policies = Vec::new();
        for p in &self.policies {
            let what = format!("policy {}/{}", p.namespace, p.name);
            let sas = |v: &[LocalSa]| {
                v.iter()
                    .map(|s| sec::ServiceAccountMatch {
                        namespace: s.namespace.clone(),
                        service_account: s.service_account.clone(),
                    })
                    .collect()
            };
            let cidrs = |v: &[String]| v.iter().map(|s| cidr(s)).collect::<Result<Vec<_>, _>>();
            let mut rules = Vec::new();
            for r in &p.rules {
                let mut clauses = Vec::new();
                for c in &r.clauses {
                    let mut matches = Vec::new();
                    for m in &c.matches {
                        matches.push(sec::Match {
                            namespaces: strings(&m.namespaces)?,
                            not_namespaces: strings(&m.not_namespaces)?,
                            principals: strings(&m.principals)?,
                            not_principals: strings(&m.not_principals)?,
                            source_ips: cidrs(&m.source_ips)?,
                            not_source_ips: cidrs(&m.not_source_ips)?,
                            destination_ips: cidrs(&m.destination_ips)?,
                            not_destination_ips: cidrs(&m.not_destination_ips)?,
                            destination_ports: m.destination_ports.clone(),
                            not_destination_ports: m.not_destination_ports.clone(),
                            service_accounts: sas(&m.service_accounts),
                            not_service_accounts: sas(&m.not_service_accounts),
                            extensions: vec![],
                        });
                    }
                    clauses.push(sec::Clause { matches });
                }
                rules.push(sec::Rule { clauses });
            }
            let auth = sec::Authorization {
                name: p.name.clone(),
                namespace: p.namespace.clone(),
                scope: enum_value(
                    &what,
                    &p.scope,
                    |s| sec::Scope::from_str_name(s).map(|e| e as i32),
                    sec::Scope::Namespace as i32,
                )?,
                action: enum_value(
                    &what,
                    &p.action,
                    |s| sec::Action::from_str_name(s).map(|e| e as i32),
                    0,
                )?,
                rules,
                dry_run: p.dry_run,
                extensions: vec![],
            };
            policies.push((format!("{}/{}", p.namespace, p.name), auth));
        }
        Ok((addresses, policies))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::State;

    const SAMPLE: &str = r#"
workloads:
  - name: client
    namespace: front
    serviceAccount: web
    addresses: ["10.10.1.2"]
    node: node-1
    protocol: HBONE
  - name: server
    namespace: back
    serviceAccount: api
    addresses: ["10.10.2.2"]
    node: node-2
    protocol: HBONE
    services:
      back/api.back.svc.cluster.local: [{servicePort: 80, targetPort: 8080}]
services:
  - name: api
    namespace: back
    hostname: api.back.svc.cluster.local
    addresses: ["10.96.0.20"]
    ports: [{servicePort: 80, targetPort: 8080, appProtocol: HTTP11}]
policies:
  - name: deny-9090
    namespace: back
    action: DENY
    rules:
      - clauses:
          - matches:
              - destinationPorts: [9090]
                principals: [{prefix: "cluster.local/ns/front/"}]
                sourceIps: ["10.10.0.0/16"]
"#;

    #[test]
    fn sample_loads_into_state() {
        let cfg = LocalConfig::parse(SAMPLE).unwrap();
        let (addrs, pols) = cfg.to_resources("Kubernetes").unwrap();
        let mut st = State::default();
        for (_, a) in &addrs {
            st.apply_address(a).unwrap();
        }
        for (_, p) in &pols {
            st.apply_authorization(p).unwrap();
        }
        let w = st.workload("Kubernetes//Pod/back/server").unwrap();
        assert!(w.hbone);
        assert_eq!(
            w.identity.to_string(),
            "spiffe://cluster.local/ns/back/sa/api"
        );
        assert!(st.service("back", "api.back.svc.cluster.local").is_some());
        assert_eq!(st.policies().count(), 1);
    }

    #[test]
    fn bad_input_is_explained() {
        let err = LocalConfig::parse("workloads: [{name: a, namespace: b, bogus: 1}]").unwrap_err();
        assert!(err.contains("bogus"), "{err}");
        let cfg = LocalConfig::parse("policies: [{name: p, namespace: n, action: MAYBE}]").unwrap();
        let err = cfg.to_resources("c").unwrap_err();
        assert!(err.contains("MAYBE"), "{err}");
        let cfg = LocalConfig::parse(
            "policies: [{name: p, namespace: n, rules: [{clauses: [{matches: [{sourceIps: [nope]}]}]}]}]",
        )
        .unwrap();
        assert!(cfg.to_resources("c").unwrap_err().contains("nope"));
    }
}
