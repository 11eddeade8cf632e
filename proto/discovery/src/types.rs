//! Validated, typed forms of the xDS resources. Conversion from protobuf is where bad
//! input is caught: an error here becomes a NACK reason and the resource is not applied.

use mesh_identity::{DEFAULT_TRUST_DOMAIN, SpiffeId};
use mesh_proto::workload as pb;
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

/// [`mesh_authz::ip_from_bytes`], the error naming what the address belongs to.
pub fn ip_from_bytes(what: &str, b: &[u8]) -> Result<IpAddr, ResourceError> {
    mesh_authz::ip_from_bytes(b).map_err(|e| ResourceError::BadAddress {
        what: what.to_string(),
        len: e.0,
    })
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
