//! Validated, typed forms of the xDS resources. Conversion from protobuf is where bad
//! input is caught: an error here becomes a NACK reason and the resource is not applied.

use mesh_identity::{DEFAULT_TRUST_DOMAIN, SpiffeId};
use mesh_proto::{security as pb_sec, workload as pb};
use std::collections::HashMap;
use std::net::IpAddr;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ResourceError {
    #[error("{what}: address of {len} bytes is neither IPv4 (4) nor IPv6 (16)")]
    BadAddress { what: String, len: usize },
    #[error("{what}: identity is invalid: {reason}")]
    BadIdentity { what: String, reason: String },
    #[error("{what}: {reason}")]
    Invalid { what: String, reason: String },
}

pub fn ip_from_bytes(what: &str, b: &[u8]) -> Result<IpAddr, ResourceError> {
    match b.len() {
        4 => Ok(IpAddr::from(
            <[u8; 4]>::try_from(b).expect("length checked"),
        )),
        16 => Ok(IpAddr::from(
            <[u8; 16]>::try_from(b).expect("length checked"),
        )),
        len => Err(ResourceError::BadAddress {
            what: what.to_string(),
            len,
        }),
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum GatewayAddress {
    /// A service, resolved through the service store (usually the waypoint's Service).
    Hostname {
        namespace: String,
        hostname: String,
        port: u16,
    },
    Ip {
        ip: IpAddr,
        port: u16,
    },
}

impl GatewayAddress {
    fn from_proto(what: &str, g: &pb::GatewayAddress) -> Result<Self, ResourceError> {
        let port = u16::try_from(g.hbone_mtls_port).unwrap_or(0);
        let port = if port == 0 {
            mesh_proto::ports::HBONE
        } else {
            port
        };
        match &g.destination {
            Some(pb::gateway_address::Destination::Hostname(h)) => Ok(GatewayAddress::Hostname {
                namespace: h.namespace.clone(),
                hostname: h.hostname.clone(),
                port,
            }),
            Some(pb::gateway_address::Destination::Address(a)) => Ok(GatewayAddress::Ip {
                ip: ip_from_bytes(what, &a.address)?,
                port,
            }),
            None => Err(ResourceError::Invalid {
                what: what.to_string(),
                reason: "gateway address has neither hostname nor address".into(),
            }),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortMapping {
    pub service_port: u16,
    /// 0: named port, resolved per workload.
    pub target_port: u16,
    pub app_protocol: pb::AppProtocol,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Locality {
    pub region: String,
    pub zone: String,
    pub subzone: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub addresses: Vec<IpAddr>,
    pub network: String,
    pub hbone: bool,
    pub identity: SpiffeId,
    pub waypoint: Option<GatewayAddress>,
    pub node: String,
    pub canonical_name: String,
    pub canonical_revision: String,
    pub workload_name: String,
    /// "ns/hostname" → ports of that service on this workload.
    pub services: HashMap<String, Vec<PortMapping>>,
    pub authorization_policies: Vec<String>,
    pub healthy: bool,
    pub cluster_id: String,
    pub locality: Locality,
    pub host_network: bool,
    pub capacity: u32,
}

impl Workload {
    pub fn from_proto(w: &pb::Workload) -> Result<Self, ResourceError> {
        let what = format!("workload {:?}", w.uid);
        if w.uid.is_empty() {
            return Err(ResourceError::Invalid {
                what: format!("workload {}/{}", w.namespace, w.name),
                reason: "uid is empty".into(),
            });
        }
        let tunnel = pb::TunnelProtocol::try_from(w.tunnel_protocol).map_err(|_| {
            ResourceError::Invalid {
                what: what.clone(),
                reason: format!("unknown tunnel protocol {}", w.tunnel_protocol),
            }
        })?;
        if tunnel == pb::TunnelProtocol::LegacyIstioMtls {
            return Err(ResourceError::Invalid {
                what,
                reason: "LEGACY_ISTIO_MTLS is not supported".into(),
            });
        }
        let addresses = w
            .addresses
            .iter()
            .map(|a| ip_from_bytes(&what, a))
            .collect::<Result<Vec<_>, _>>()?;
        let td = if w.trust_domain.is_empty() {
            DEFAULT_TRUST_DOMAIN
        } else {
            &w.trust_domain
        };
        let sa = if w.service_account.is_empty() {
            "default"
        } else {
            &w.service_account
        };
        let identity =
            SpiffeId::new(td, &w.namespace, sa).map_err(|e| ResourceError::BadIdentity {
                what: what.clone(),
                reason: e.to_string(),
            })?;
        let waypoint = w
            .waypoint
            .as_ref()
            .map(|g| GatewayAddress::from_proto(&what, g))
            .transpose()?;
        let services = w
            .services
            .iter()
            .map(|(k, v)| Ok((k.clone(), ports_from_proto(&what, &v.ports)?)))
            .collect::<Result<_, ResourceError>>()?;
        let locality = w
            .locality
            .as_ref()
            .map(|l| Locality {
                region: l.region.clone(),
                zone: l.zone.clone(),
                subzone: l.subzone.clone(),
            })
            .unwrap_or_default();
        Ok(Workload {
            uid: w.uid.clone(),
            name: w.name.clone(),
            namespace: w.namespace.clone(),
            addresses,
            network: w.network.clone(),
            hbone: tunnel == pb::TunnelProtocol::Hbone,
            identity,
            waypoint,
            node: w.node.clone(),
            canonical_name: w.canonical_name.clone(),
            canonical_revision: w.canonical_revision.clone(),
            workload_name: w.workload_name.clone(),
            services,
            authorization_policies: w.authorization_policies.clone(),
            healthy: w.status == pb::WorkloadStatus::Healthy as i32,
            cluster_id: w.cluster_id.clone(),
            locality,
            host_network: w.network_mode == pb::NetworkMode::HostNetwork as i32,
            capacity: w.capacity.unwrap_or(1),
        })
    }

    /// Workload name used in telemetry: the controller's name, else the pod's.
    pub fn telemetry_name(&self) -> &str {
        if self.workload_name.is_empty() {
            &self.name
        } else {
            &self.workload_name
        }
    }
}

fn ports_from_proto(what: &str, ports: &[pb::Port]) -> Result<Vec<PortMapping>, ResourceError> {
    ports
        .iter()
        .map(|p| {
            let service_port = u16::try_from(p.service_port).ok().filter(|p| *p != 0);
            let target_port = u16::try_from(p.target_port).ok();
            match (service_port, target_port) {
                (Some(service_port), Some(target_port)) => Ok(PortMapping {
                    service_port,
                    target_port,
                    app_protocol: pb::AppProtocol::try_from(p.app_protocol)
                        .unwrap_or(pb::AppProtocol::Unknown),
                }),
                _ => Err(ResourceError::Invalid {
                    what: what.to_string(),
                    reason: format!("port {}→{} is out of range", p.service_port, p.target_port),
                }),
            }
        })
        .collect()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    Region,
    Zone,
    Subzone,
    Node,
    Cluster,
    Network,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum LbMode {
    #[default]
    Unspecified,
    Strict,
    Failover,
    Passthrough,
}

#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct LoadBalancing {
    pub preferences: Vec<Scope>,
    pub mode: LbMode,
    pub allow_unhealthy: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    pub name: String,
    pub namespace: String,
    pub hostname: String,
    pub vips: Vec<(String, IpAddr)>,
    pub ports: Vec<PortMapping>,
    pub subject_alt_names: Vec<SpiffeId>,
    pub waypoint: Option<GatewayAddress>,
    pub load_balancing: LoadBalancing,
}

impl Service {
    /// The xDS resource name and the key workloads use in their `services` map.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.hostname)
    }

    pub fn from_proto(s: &pb::Service) -> Result<Self, ResourceError> {
        let what = format!("service {}/{}", s.namespace, s.hostname);
        if s.hostname.is_empty() || s.namespace.is_empty() {
            return Err(ResourceError::Invalid {
                what,
                reason: "namespace and hostname are required".into(),
            });
        }
        let vips = s
            .addresses
            .iter()
            .map(|a| Ok((a.network.clone(), ip_from_bytes(&what, &a.address)?)))
            .collect::<Result<_, ResourceError>>()?;
        let subject_alt_names = s
            .subject_alt_names
            .iter()
            .map(|san| {
                san.parse().map_err(
                    |e: mesh_identity::SpiffeIdError| ResourceError::BadIdentity {
                        what: what.clone(),
                        reason: e.to_string(),
                    },
                )
            })
            .collect::<Result<_, _>>()?;
        let load_balancing = s
            .load_balancing
            .as_ref()
            .map(|lb| {
                use pb::load_balancing::{HealthPolicy, Mode, Scope as S};
                LoadBalancing {
                    preferences: lb
                        .routing_preference()
                        .filter_map(|s| match s {
                            S::Region => Some(Scope::Region),
                            S::Zone => Some(Scope::Zone),
                            S::Subzone => Some(Scope::Subzone),
                            S::Node => Some(Scope::Node),
                            S::Cluster => Some(Scope::Cluster),
                            S::Network => Some(Scope::Network),
                            S::UnspecifiedScope => None,
                        })
                        .collect(),
                    mode: match lb.mode() {
                        Mode::UnspecifiedMode => LbMode::Unspecified,
                        Mode::Strict => LbMode::Strict,
                        Mode::Failover => LbMode::Failover,
                        Mode::Passthrough => LbMode::Passthrough,
                    },
                    allow_unhealthy: lb.health_policy() == HealthPolicy::AllowAll,
                }
            })
            .unwrap_or_default();
        Ok(Service {
            name: s.name.clone(),
            namespace: s.namespace.clone(),
            hostname: s.hostname.clone(),
            vips,
            ports: ports_from_proto(&what, &s.ports)?,
            subject_alt_names,
            waypoint: s
                .waypoint
                .as_ref()
                .map(|g| GatewayAddress::from_proto(&what, g))
                .transpose()?,
            load_balancing,
        })
    }
}

/// Validated L4 policy (see `crate::rbac` for evaluation).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub name: String,
    pub namespace: String,
    pub scope: PolicyScope,
    pub action: Action,
    pub dry_run: bool,
    /// OR of rules; a rule is an AND of clauses; a clause an OR of matches.
    pub rules: Vec<Vec<Vec<Match>>>,
}

impl Policy {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicyScope {
    Global,
    Namespace,
    WorkloadSelector,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Allow,
    Deny,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Presence,
}

impl StringMatch {
    pub fn matches(&self, value: Option<&str>) -> bool {
        match (self, value) {
            (_, None) => false,
            (StringMatch::Exact(e), Some(v)) => v == e,
            (StringMatch::Prefix(p), Some(v)) => v.starts_with(p.as_str()),
            (StringMatch::Suffix(s), Some(v)) => v.ends_with(s.as_str()),
            (StringMatch::Presence, Some(v)) => !v.is_empty(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpNet {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl IpNet {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let p = u32::from(self.prefix.min(32));
                let mask = if p == 0 { 0 } else { u32::MAX << (32 - p) };
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let p = u32::from(self.prefix.min(128));
                let mask = if p == 0 { 0 } else { u128::MAX << (128 - p) };
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Match {
    pub namespaces: Vec<StringMatch>,
    pub not_namespaces: Vec<StringMatch>,
    pub principals: Vec<StringMatch>,
    pub not_principals: Vec<StringMatch>,
    pub source_ips: Vec<IpNet>,
    pub not_source_ips: Vec<IpNet>,
    pub destination_ips: Vec<IpNet>,
    pub not_destination_ips: Vec<IpNet>,
    pub destination_ports: Vec<u16>,
    pub not_destination_ports: Vec<u16>,
    /// (namespace, service account)
    pub service_accounts: Vec<(String, String)>,
    pub not_service_accounts: Vec<(String, String)>,
}

impl Match {
    /// A match with nothing in it is skipped (never matches).
    pub fn is_empty(&self) -> bool {
        *self == Match::default()
    }
}

impl Policy {
    pub fn from_proto(a: &pb_sec::Authorization) -> Result<Self, ResourceError> {
        let what = format!("authorization {}/{}", a.namespace, a.name);
        let scope = match pb_sec::Scope::try_from(a.scope) {
            Ok(pb_sec::Scope::Global) => PolicyScope::Global,
            Ok(pb_sec::Scope::Namespace) => PolicyScope::Namespace,
            Ok(pb_sec::Scope::WorkloadSelector) => PolicyScope::WorkloadSelector,
            Err(_) => {
                return Err(ResourceError::Invalid {
                    what,
                    reason: format!("unknown scope {}", a.scope),
                });
            }
        };
        let action = match pb_sec::Action::try_from(a.action) {
            Ok(pb_sec::Action::Allow) => Action::Allow,
            Ok(pb_sec::Action::Deny) => Action::Deny,
            Err(_) => {
                return Err(ResourceError::Invalid {
                    what,
                    reason: format!("unknown action {}", a.action),
                });
            }
        };
        let strings = |v: &[pb_sec::StringMatch]| -> Result<Vec<StringMatch>, ResourceError> {
            v.iter()
                .map(|m| match &m.match_type {
                    Some(pb_sec::string_match::MatchType::Exact(s)) => {
                        Ok(StringMatch::Exact(s.clone()))
                    }
                    Some(pb_sec::string_match::MatchType::Prefix(s)) => {
                        Ok(StringMatch::Prefix(s.clone()))
                    }
                    Some(pb_sec::string_match::MatchType::Suffix(s)) => {
                        Ok(StringMatch::Suffix(s.clone()))
                    }
                    Some(pb_sec::string_match::MatchType::Presence(())) => {
                        Ok(StringMatch::Presence)
                    }
                    None => Err(ResourceError::Invalid {
                        what: what.clone(),
                        reason: "string match without a value".into(),
                    }),
                })
                .collect()
        };
        let nets = |v: &[pb_sec::Address]| -> Result<Vec<IpNet>, ResourceError> {
            v.iter()
                .map(|a| {
                    let addr = ip_from_bytes(&what, &a.address)?;
                    let max = if addr.is_ipv4() { 32 } else { 128 };
                    let prefix = if a.length == 0 && !a.address.is_empty() {
                        // Istio sends the full length for single addresses; 0 means
                        // "everything" only when written explicitly as 0.0.0.0/0.
                        if addr.is_unspecified() { 0 } else { max }
                    } else {
                        a.length
                    };
                    if prefix > max {
                        return Err(ResourceError::Invalid {
                            what: what.clone(),
                            reason: format!("prefix /{prefix} is too long for {addr}"),
                        });
                    }
                    Ok(IpNet {
                        addr,
                        prefix: prefix as u8,
                    })
                })
                .collect()
        };
        let ports = |v: &[u32]| -> Result<Vec<u16>, ResourceError> {
            v.iter()
                .map(|p| {
                    u16::try_from(*p).map_err(|_| ResourceError::Invalid {
                        what: what.clone(),
                        reason: format!("port {p} is out of range"),
                    })
                })
                .collect()
        };
        let sas = |v: &[pb_sec::ServiceAccountMatch]| {
            v.iter()
                .map(|s| (s.namespace.clone(), s.service_account.clone()))
                .collect()
        };
        let mut rules = Vec::with_capacity(a.rules.len());
        for rule in &a.rules {
            let mut clauses = Vec::with_capacity(rule.clauses.len());
            for clause in &rule.clauses {
                let mut matches = Vec::with_capacity(clause.matches.len());
                for m in &clause.matches {
                    matches.push(Match {
                        namespaces: strings(&m.namespaces)?,
                        not_namespaces: strings(&m.not_namespaces)?,
                        principals: strings(&m.principals)?,
                        not_principals: strings(&m.not_principals)?,
                        source_ips: nets(&m.source_ips)?,
                        not_source_ips: nets(&m.not_source_ips)?,
                        destination_ips: nets(&m.destination_ips)?,
                        not_destination_ips: nets(&m.not_destination_ips)?,
                        destination_ports: ports(&m.destination_ports)?,
                        not_destination_ports: ports(&m.not_destination_ports)?,
                        service_accounts: sas(&m.service_accounts),
                        not_service_accounts: sas(&m.not_service_accounts),
                    });
                }
                clauses.push(matches);
            }
            rules.push(clauses);
        }
        Ok(Policy {
            name: a.name.clone(),
            namespace: a.namespace.clone(),
            scope,
            action,
            dry_run: a.dry_run,
            rules,
        })
    }
}
