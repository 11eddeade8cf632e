//! What this waypoint serves: a CONNECT is relayed only when its target is a Service
//! port, or a workload, bound to this waypoint (`istio.io/use-waypoint`, as published
//! by the control plane in the Service's or Workload's `waypoint` address). Anything
//! else is refused: a waypoint that relayed whatever resolves would let any holder of a
//! mesh certificate reach any service under the waypoint's own identity. Pure: no I/O.

use mesh_discovery::{Destination, GatewayAddress, Service, State, Workload};
use mesh_identity::SpiffeId;
use mesh_proto::workload::AppProtocol;
use std::net::SocketAddr;
use std::sync::Arc;

/// This waypoint: its Gateway's namespace and name (also its service account).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Me {
    pub namespace: String,
    pub name: String,
    pub identity: SpiffeId,
}

impl Me {
    /// The waypoint's identity is `ns/<namespace>/sa/<gateway name>`.
    pub fn from_identity(identity: &SpiffeId) -> Me {
        Me {
            namespace: identity.namespace().to_string(),
            name: identity.service_account().to_string(),
            identity: identity.clone(),
        }
    }

    /// Whether a published waypoint address is this waypoint.
    pub fn is(&self, st: &State, gw: &GatewayAddress) -> bool {
        match gw {
            GatewayAddress::Hostname {
                namespace,
                hostname,
                ..
            } => {
                *namespace == self.namespace
                    && match st.service(namespace, hostname) {
                        Some(svc) => svc.name == self.name,
                        None => hostname
                            .strip_prefix(&format!("{}.{}.svc.", self.name, self.namespace))
                            .is_some_and(|rest| !rest.is_empty()),
                    }
            }
            GatewayAddress::Ip { ip, .. } => match st.destination("", *ip) {
                Some(Destination::Service(s)) => {
                    s.namespace == self.namespace && s.name == self.name
                }
                Some(Destination::Workload(w)) => w.identity == self.identity,
                None => false,
            },
        }
    }
}

/// Where a CONNECT is going.
#[derive(Clone, Debug)]
pub enum Dest {
    Service(Arc<Service>),
    Workload(Arc<Workload>),
}

/// A CONNECT target this waypoint serves.
#[derive(Clone, Debug)]
pub struct Bound {
    pub dest: Dest,
    pub port: u16,
    pub protocol: AppProtocol,
}

/// Why a target is refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refused {
    /// No service or workload has this address.
    Unknown,
    /// A service or workload that does not use this waypoint.
    NotBound(String),
    /// A bound service, on a port it does not have.
    NoSuchPort(String),
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::Unknown => f.write_str("no service or workload has this address"),
            Refused::NotBound(what) => write!(f, "{what} does not use this waypoint"),
            Refused::NoSuchPort(what) => write!(f, "{what} has no such port"),
        }
    }
}

/// The protocol of `port` on workload `w`: that of a service port of `w` that maps to it
/// (HTTP handling needs the port to be declared HTTP), else TCP.
fn workload_protocol(st: &State, w: &Workload, port: u16) -> AppProtocol {
    for (key, ports) in &w.services {
        let Some(svc) = key.split_once('/').and_then(|(ns, h)| st.service(ns, h)) else {
            continue;
        };
        for sp in &svc.ports {
            let target = ports
                .iter()
                .find(|p| p.service_port == sp.service_port && p.target_port != 0)
                .map_or(sp.target_port, |p| p.target_port);
            if target == port && sp.app_protocol != AppProtocol::Unknown {
                return sp.app_protocol;
            }
        }
    }
    AppProtocol::Tcp
}

/// Resolves a CONNECT target against what the waypoint serves.
pub fn resolve(st: &State, me: &Me, dst: SocketAddr) -> Result<Bound, Refused> {
    match st.destination("", dst.ip()) {
        Some(Destination::Service(svc)) => {
            let what = format!("service {}/{}", svc.namespace, svc.name);
            if !svc.waypoint.as_ref().is_some_and(|gw| me.is(st, gw)) {
                return Err(Refused::NotBound(what));
            }
            let port = svc
                .ports
                .iter()
                .find(|p| p.service_port == dst.port())
                .ok_or(Refused::NoSuchPort(what))?;
            Ok(Bound {
                protocol: port.app_protocol,
                port: dst.port(),
                dest: Dest::Service(svc),
            })
        }
        Some(Destination::Workload(w)) => {
            if !w.waypoint.as_ref().is_some_and(|gw| me.is(st, gw)) {
                return Err(Refused::NotBound(format!(
                    "workload {}/{}",
                    w.namespace, w.name
                )));
            }
            Ok(Bound {
                protocol: workload_protocol(st, &w, dst.port()),
                port: dst.port(),
                dest: Dest::Workload(w),
            })
        }
        None => Err(Refused::Unknown),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_proto::workload as pb;

    fn gw(ns: &str, name: &str) -> pb::GatewayAddress {
        pb::GatewayAddress {
            destination: Some(pb::gateway_address::Destination::Hostname(
                pb::NamespacedHostname {
                    namespace: ns.into(),
                    hostname: format!("{name}.{ns}.svc.cluster.local"),
                },
            )),
            hbone_mtls_port: 15008,
        }
    }

    fn svc(
        ns: &str,
        name: &str,
        vip: [u8; 4],
        waypoint: Option<pb::GatewayAddress>,
    ) -> pb::Address {
        pb::Address {
            r#type: Some(pb::address::Type::Service(pb::Service {
                name: name.into(),
                namespace: ns.into(),
                hostname: format!("{name}.{ns}.svc.cluster.local"),
                addresses: vec![pb::NetworkAddress {
                    network: String::new(),
                    address: vip.to_vec(),
                    length: None,
                }],
                ports: vec![
                    pb::Port {
                        service_port: 80,
                        target_port: 8080,
                        app_protocol: pb::AppProtocol::Http11 as i32,
                    },
                    pb::Port {
                        service_port: 9000,
                        target_port: 9000,
                        app_protocol: pb::AppProtocol::Tcp as i32,
                    },
                ],
                waypoint,
                ..Default::default()
            })),
        }
    }

    fn pod(
        ns: &str,
        name: &str,
        ip: [u8; 4],
        sa: &str,
        service: Option<&str>,
        waypoint: Option<pb::GatewayAddress>,
    ) -> pb::Address {
        pb::Address {
            r#type: Some(pb::address::Type::Workload(pb::Workload {
                uid: format!("c//Pod/{ns}/{name}"),
                name: name.into(),
                namespace: ns.into(),
                addresses: vec![ip.to_vec()],
                tunnel_protocol: pb::TunnelProtocol::Hbone as i32,
                service_account: sa.into(),
                waypoint,
                services: service
                    .map(|s| {
                        (
                            format!("{ns}/{s}.{ns}.svc.cluster.local"),
                            pb::PortList {
                                ports: vec![pb::Port {
                                    service_port: 80,
                                    target_port: 8080,
                                    app_protocol: 0,
                                }],
                            },
                        )
                    })
                    .into_iter()
                    .collect(),
                ..Default::default()
            })),
        }
    }

    fn state() -> State {
        let mut st = State::default();
        for a in [
            svc("back", "api", [10, 96, 0, 20], Some(gw("back", "waypoint"))),
            svc("other", "secret", [10, 96, 0, 30], None),
            svc(
                "elsewhere",
                "x",
                [10, 96, 0, 40],
                Some(gw("elsewhere", "waypoint")),
            ),
            svc("back", "waypoint", [10, 96, 0, 10], None),
            pod("back", "api", [10, 244, 2, 2], "api", Some("api"), None),
            pod(
                "back",
                "bound-pod",
                [10, 244, 2, 3],
                "api",
                Some("api"),
                Some(gw("back", "waypoint")),
            ),
            pod(
                "back",
                "waypoint",
                [10, 244, 2, 9],
                "waypoint",
                Some("waypoint"),
                None,
            ),
            pod(
                "other",
                "secret",
                [10, 244, 1, 7],
                "secret",
                Some("secret"),
                None,
            ),
        ] {
            st.apply_address(&a).unwrap();
        }
        st
    }

    fn me() -> Me {
        Me::from_identity(&SpiffeId::new("cluster.local", "back", "waypoint").unwrap())
    }

    fn at(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn bound_services_and_workloads_are_served() {
        let st = state();
        let b = resolve(&st, &me(), at("10.96.0.20:80")).unwrap();
        assert!(matches!(b.dest, Dest::Service(ref s) if s.name == "api"));
        assert_eq!(b.protocol, AppProtocol::Http11);
        let b = resolve(&st, &me(), at("10.96.0.20:9000")).unwrap();
        assert_eq!(b.protocol, AppProtocol::Tcp);
        let b = resolve(&st, &me(), at("10.244.2.3:8080")).unwrap();
        assert!(matches!(b.dest, Dest::Workload(ref w) if w.name == "bound-pod"));
        assert_eq!(
            b.protocol,
            AppProtocol::Http11,
            "its service's port 80 → 8080 is HTTP"
        );
        let b = resolve(&st, &me(), at("10.244.2.3:7777")).unwrap();
        assert_eq!(b.protocol, AppProtocol::Tcp);
    }

    #[test]
    fn everything_else_is_refused() {
        let st = state();
        for (dst, want) in [
            (
                "10.96.0.30:80",
                Refused::NotBound("service other/secret".into()),
            ),
            (
                "10.96.0.40:80",
                Refused::NotBound("service elsewhere/x".into()),
            ),
            (
                "10.96.0.10:15008",
                Refused::NotBound("service back/waypoint".into()),
            ),
            (
                "10.96.0.20:81",
                Refused::NoSuchPort("service back/api".into()),
            ),
            (
                "10.244.2.2:8080",
                Refused::NotBound("workload back/api".into()),
            ),
            (
                "10.244.1.7:8080",
                Refused::NotBound("workload other/secret".into()),
            ),
            (
                "10.244.2.9:15008",
                Refused::NotBound("workload back/waypoint".into()),
            ),
            ("10.9.9.9:80", Refused::Unknown),
        ] {
            assert_eq!(resolve(&st, &me(), at(dst)).unwrap_err(), want, "{dst}");
        }
        // The same binding, seen by another namespace's waypoint of the same name.
        let other =
            Me::from_identity(&SpiffeId::new("cluster.local", "elsewhere", "waypoint").unwrap());
        assert!(resolve(&st, &other, at("10.96.0.20:80")).is_err());
        assert!(resolve(&st, &other, at("10.96.0.40:80")).is_ok());
    }

    #[test]
    fn a_waypoint_named_by_address() {
        let st = state();
        let by_vip = GatewayAddress::Ip {
            ip: "10.96.0.10".parse().unwrap(),
            port: 15008,
        };
        let by_pod = GatewayAddress::Ip {
            ip: "10.244.2.9".parse().unwrap(),
            port: 15008,
        };
        let not_me = GatewayAddress::Ip {
            ip: "10.244.2.2".parse().unwrap(),
            port: 15008,
        };
        assert!(me().is(&st, &by_vip) && me().is(&st, &by_pod) && !me().is(&st, &not_me));
    }
}
