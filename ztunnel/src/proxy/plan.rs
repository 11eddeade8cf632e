//! Where an outbound connection goes, decided from the xDS state alone (no I/O).

use crate::state::{Destination, GatewayAddress, Service, State, Workload};
use mesh_identity::SpiffeId;
use std::net::SocketAddr;
use std::sync::Arc;

#[derive(Debug, Clone)]
pub enum OutboundPlan {
    /// Not in the mesh: plain TCP to `dst`.
    Passthrough {
        dst: SocketAddr,
        dst_workload: Option<Arc<Workload>>,
        service: Option<Arc<Service>>,
    },
    /// HBONE to `hop` (a ztunnel or waypoint on 15008), asking for `authority`.
    Hbone {
        hop: SocketAddr,
        authority: SocketAddr,
        expected: Vec<SpiffeId>,
        dst_workload: Option<Arc<Workload>>,
        /// The service; its hostname is sent as `forwarded: ...;host=`.
        service: Option<Arc<Service>>,
        via_waypoint: bool,
    },
    /// Refuse the connection (never fall back to plaintext).
    Refuse(String),
}

struct Waypoint {
    hop: SocketAddr,
    ids: Vec<SpiffeId>,
    workload: Arc<Workload>,
}

fn resolve_waypoint(
    st: &State,
    network: &str,
    gw: &GatewayAddress,
    src: Option<&Workload>,
) -> Result<Waypoint, String> {
    match gw {
        GatewayAddress::Ip { ip, port } => {
            let w = st
                .workload_by_ip(network, *ip)
                .ok_or_else(|| format!("waypoint {ip} is not a known workload"))?;
            Ok(Waypoint {
                hop: SocketAddr::new(*ip, *port),
                ids: vec![w.identity.clone()],
                workload: w.clone(),
            })
        }
        GatewayAddress::Hostname {
            namespace,
            hostname,
            port,
        } => {
            let svc = st
                .service(namespace, hostname)
                .ok_or_else(|| format!("waypoint service {namespace}/{hostname} is unknown"))?;
            let (w, _) = st
                .pick_endpoint(svc, *port, src)
                .or_else(|| st.pick_any_endpoint(svc, src))
                .ok_or_else(|| format!("waypoint {hostname} has no healthy instance"))?;
            let ip = *w
                .addresses
                .first()
                .ok_or_else(|| format!("waypoint instance {} has no address", w.uid))?;
            let mut ids = vec![w.identity.clone()];
            ids.extend(svc.subject_alt_names.iter().cloned());
            Ok(Waypoint {
                hop: SocketAddr::new(ip, *port),
                ids,
                workload: w,
            })
        }
    }
}

fn is_self(src: Option<&Workload>, w: &Workload) -> bool {
    src.is_some_and(|s| s.uid == w.uid)
}

pub fn plan_outbound(
    st: &State,
    network: &str,
    src: Option<&Workload>,
    orig: SocketAddr,
) -> OutboundPlan {
    match st.destination(network, orig.ip()) {
        None => OutboundPlan::Passthrough {
            dst: orig,
            dst_workload: None,
            service: None,
        },
        Some(Destination::Service(svc)) => {
            if let Some(gw) = &svc.waypoint {
                match resolve_waypoint(st, network, gw, src) {
                    Ok(wp) if !is_self(src, &wp.workload) => {
                        return OutboundPlan::Hbone {
                            hop: wp.hop,
                            authority: orig,
                            expected: wp.ids,
                            dst_workload: None,
                            service: Some(svc.clone()),
                            via_waypoint: true,
                        };
                    }
                    Ok(_) => {} // we are the waypoint: go to the endpoint
                    Err(e) => return OutboundPlan::Refuse(e),
                }
            }
            let Some((ep, target_port)) = st.pick_endpoint(&svc, orig.port(), src) else {
                return OutboundPlan::Refuse(format!(
                    "service {} has no healthy endpoint for port {}",
                    svc.hostname,
                    orig.port()
                ));
            };
            let Some(ip) = ep
                .addresses
                .iter()
                .find(|a| a.is_ipv4() == orig.is_ipv4())
                .or(ep.addresses.first())
                .copied()
            else {
                return OutboundPlan::Refuse(format!("endpoint {} has no address", ep.uid));
            };
            if ep.hbone {
                let mut expected = vec![ep.identity.clone()];
                expected.extend(svc.subject_alt_names.iter().cloned());
                OutboundPlan::Hbone {
                    hop: SocketAddr::new(ip, mesh_proto::ports::HBONE),
                    authority: SocketAddr::new(ip, target_port),
                    expected,
                    dst_workload: Some(ep),
                    service: Some(svc.clone()),
                    via_waypoint: false,
                }
            } else {
                OutboundPlan::Passthrough {
                    dst: SocketAddr::new(ip, target_port),
                    dst_workload: Some(ep),
                    service: Some(svc.clone()),
                }
            }
        }
        Some(Destination::Workload(w)) => {
            if let Some(gw) = &w.waypoint {
                match resolve_waypoint(st, network, gw, src) {
                    Ok(wp) if !is_self(src, &wp.workload) => {
                        return OutboundPlan::Hbone {
                            hop: wp.hop,
                            authority: orig,
                            expected: wp.ids,
                            dst_workload: Some(w),
                            service: None,
                            via_waypoint: true,
                        };
                    }
                    Ok(_) => {}
                    Err(e) => return OutboundPlan::Refuse(e),
                }
            }
            if w.hbone {
                OutboundPlan::Hbone {
                    hop: SocketAddr::new(orig.ip(), mesh_proto::ports::HBONE),
                    authority: orig,
                    expected: vec![w.identity.clone()],
                    dst_workload: Some(w),
                    service: None,
                    via_waypoint: false,
                }
            } else {
                OutboundPlan::Passthrough {
                    dst: orig,
                    dst_workload: Some(w),
                    service: None,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{LoadBalancing, Locality, PortMapping, Service};
    use mesh_proto::workload::AppProtocol;
    use std::collections::HashMap;
    use std::net::IpAddr;

    fn wl(uid: &str, ip: [u8; 4], hbone: bool, sa: &str) -> Workload {
        Workload {
            uid: uid.into(),
            name: uid.into(),
            namespace: "ns".into(),
            addresses: vec![IpAddr::from(ip)],
            network: String::new(),
            hbone,
            identity: SpiffeId::new("cluster.local", "ns", sa).unwrap(),
            waypoint: None,
            node: "n".into(),
            canonical_name: String::new(),
            canonical_revision: String::new(),
            workload_name: String::new(),
            services: HashMap::new(),
            authorization_policies: vec![],
            healthy: true,
            cluster_id: String::new(),
            locality: Locality::default(),
            host_network: false,
            capacity: 1,
        }
    }

    fn with_svc(mut w: Workload, key: &str, target: u16) -> Workload {
        w.services.insert(
            key.into(),
            vec![PortMapping {
                service_port: 80,
                target_port: target,
                app_protocol: AppProtocol::Unknown,
            }],
        );
        w
    }

    fn service(waypoint: Option<GatewayAddress>) -> Service {
        Service {
            name: "s".into(),
            namespace: "ns".into(),
            hostname: "s.ns.svc.cluster.local".into(),
            vips: vec![(String::new(), IpAddr::from([10, 96, 0, 10]))],
            ports: vec![PortMapping {
                service_port: 80,
                target_port: 8080,
                app_protocol: AppProtocol::Unknown,
            }],
            subject_alt_names: vec![],
            waypoint,
            load_balancing: LoadBalancing::default(),
        }
    }

    const KEY: &str = "ns/s.ns.svc.cluster.local";

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn unknown_destination_passes_through() {
        let st = State::default();
        assert!(matches!(
            plan_outbound(&st, "", None, addr("1.1.1.1:443")),
            OutboundPlan::Passthrough { dst, .. } if dst == addr("1.1.1.1:443")
        ));
    }

    #[test]
    fn mesh_pod_gets_hbone_plain_pod_passthrough() {
        let mut st = State::default();
        st.insert_workload(wl("b", [10, 0, 1, 5], true, "b"));
        st.insert_workload(wl("legacy", [10, 0, 1, 6], false, "l"));
        match plan_outbound(&st, "", None, addr("10.0.1.5:8080")) {
            OutboundPlan::Hbone {
                hop,
                authority,
                expected,
                ..
            } => {
                assert_eq!(hop, addr("10.0.1.5:15008"));
                assert_eq!(authority, addr("10.0.1.5:8080"));
                assert_eq!(expected[0].service_account(), "b");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            plan_outbound(&st, "", None, addr("10.0.1.6:8080")),
            OutboundPlan::Passthrough { .. }
        ));
    }

    #[test]
    fn service_vip_picks_an_endpoint_with_forwarded_host() {
        let mut st = State::default();
        st.insert_service(service(None));
        st.insert_workload(with_svc(wl("b", [10, 0, 1, 5], true, "b"), KEY, 8080));
        match plan_outbound(&st, "", None, addr("10.96.0.10:80")) {
            OutboundPlan::Hbone {
                hop,
                authority,
                service,
                ..
            } => {
                assert_eq!(hop, addr("10.0.1.5:15008"));
                assert_eq!(authority, addr("10.0.1.5:8080"));
                assert_eq!(service.unwrap().hostname, "s.ns.svc.cluster.local");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            plan_outbound(&st, "", None, addr("10.96.0.10:81")),
            OutboundPlan::Refuse(_)
        ));
    }

    #[test]
    fn service_with_waypoint_goes_to_the_waypoint_with_the_vip_as_authority() {
        let mut st = State::default();
        let wp_ip = IpAddr::from([10, 0, 2, 9]);
        st.insert_service(service(Some(GatewayAddress::Ip {
            ip: wp_ip,
            port: 15008,
        })));
        st.insert_workload(with_svc(wl("b", [10, 0, 1, 5], true, "b"), KEY, 8080));
        st.insert_workload(wl("waypoint", [10, 0, 2, 9], true, "waypoint"));
        match plan_outbound(&st, "", None, addr("10.96.0.10:80")) {
            OutboundPlan::Hbone {
                hop,
                authority,
                expected,
                via_waypoint,
                ..
            } => {
                assert!(via_waypoint);
                assert_eq!(hop, addr("10.0.2.9:15008"));
                assert_eq!(authority, addr("10.96.0.10:80"));
                assert_eq!(expected[0].service_account(), "waypoint");
            }
            other => panic!("{other:?}"),
        }
        // The waypoint itself is sent straight to the endpoint.
        let wp = st.workload("waypoint").unwrap().clone();
        match plan_outbound(&st, "", Some(&wp), addr("10.96.0.10:80")) {
            OutboundPlan::Hbone {
                hop, via_waypoint, ..
            } => {
                assert!(!via_waypoint);
                assert_eq!(hop, addr("10.0.1.5:15008"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn unknown_waypoint_refuses_rather_than_bypassing() {
        let mut st = State::default();
        st.insert_service(service(Some(GatewayAddress::Hostname {
            namespace: "ns".into(),
            hostname: "gone.ns.svc.cluster.local".into(),
            port: 15008,
        })));
        st.insert_workload(with_svc(wl("b", [10, 0, 1, 5], true, "b"), KEY, 8080));
        assert!(matches!(
            plan_outbound(&st, "", None, addr("10.96.0.10:80")),
            OutboundPlan::Refuse(_)
        ));
    }
}
