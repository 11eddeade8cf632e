//! Where an outbound connection goes, and what an inbound CONNECT names, decided from the
//! xDS state alone (no I/O).

use crate::state::{Destination, GatewayAddress, Service, State, Workload};
use hbone::Authority;
use mesh_identity::SpiffeId;
use std::net::SocketAddr;
use std::sync::Arc;

/// What an inbound CONNECT arriving at `local` names, in our own terms.
#[derive(Debug, Clone)]
pub struct InboundPlan {
    /// The source workload, by the connection's source address.
    pub src: Option<Arc<Workload>>,
    /// The destination service: one of the destination workload's own services, named by
    /// `forwarded: host=` or by a hostname authority; never a name we do not know.
    pub dst_service: Option<Arc<Service>>,
    /// Where to connect in the pod, or the port of a hostname authority that names no
    /// service of the destination with that port.
    pub target: Result<SocketAddr, u16>,
}

/// What the peer says (the authority, `forwarded: host=`) is only looked up among the
/// destination's own services, so it never becomes a name we keep or report.
pub fn plan_inbound(
    st: &State,
    network: &str,
    local: SocketAddr,
    authority: &Authority,
    forwarded_host: Option<&str>,
    src: Option<Arc<Workload>>,
) -> InboundPlan {
    let dst = st.workload_by_ip(network, local.ip());
    let own_service =
        |host: &str| -> Option<Arc<Service>> { st.service_of_workload(dst?, host).cloned() };
    let forwarded = forwarded_host.and_then(own_service);
    let (dst_service, target) = match authority {
        Authority::Addr(a) => (forwarded, Ok(*a)),
        Authority::Host { host, port } => {
            // A service hostname: map the service port to this workload's port.
            let svc = own_service(host);
            let mapped = svc
                .as_ref()
                .zip(dst)
                .and_then(|(svc, w)| State::target_port(svc, w, *port));
            match mapped {
                Some(p) => (forwarded.or(svc), Ok(SocketAddr::new(local.ip(), p))),
                None => (forwarded, Err(*port)),
            }
        }
    };
    InboundPlan {
        src,
        dst_service,
        target,
    }
}

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

/// `dialled`: the destination the app dialled; a waypoint instance's address of its family
/// is preferred, so the waypoint sees the caller's address of that family (what its
/// policies' IP blocks are matched against).
fn resolve_waypoint(
    st: &State,
    network: &str,
    gw: &GatewayAddress,
    src: Option<&Workload>,
    dialled: SocketAddr,
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
                .iter()
                .find(|a| a.is_ipv4() == dialled.is_ipv4())
                .or(w.addresses.first())
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
                match resolve_waypoint(st, network, gw, src, orig) {
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
                match resolve_waypoint(st, network, gw, src, orig) {
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

    /// A dual-stack Service: the endpoint address of the family the app dialled (the
    /// app's socket only takes replies of its own family), for either VIP.
    #[test]
    fn dual_stack_vip_picks_the_endpoint_address_of_the_dialled_family() {
        let mut st = State::default();
        let mut svc = service(None);
        svc.vips
            .push((String::new(), "fd00:96::a".parse().unwrap()));
        st.insert_service(svc);
        let mut w = with_svc(wl("b", [10, 0, 1, 5], true, "b"), KEY, 8080);
        w.addresses.push("fd00:10:244:1::5".parse().unwrap());
        st.insert_workload(w);
        for (vip, hop, authority) in [
            ("10.96.0.10:80", "10.0.1.5:15008", "10.0.1.5:8080"),
            (
                "[fd00:96::a]:80",
                "[fd00:10:244:1::5]:15008",
                "[fd00:10:244:1::5]:8080",
            ),
        ] {
            match plan_outbound(&st, "", None, addr(vip)) {
                OutboundPlan::Hbone {
                    hop: h,
                    authority: a,
                    ..
                } => {
                    assert_eq!((h, a), (addr(hop), addr(authority)), "{vip}")
                }
                other => panic!("{vip}: {other:?}"),
            }
        }
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

    /// Through a waypoint found by hostname: its instance's address of the family the app
    /// dialled, so the waypoint sees the caller's address of that family.
    #[test]
    fn dual_stack_waypoint_is_reached_over_the_dialled_family() {
        let mut st = State::default();
        let mut svc = service(Some(GatewayAddress::Hostname {
            namespace: "ns".into(),
            hostname: "wp.ns.svc.cluster.local".into(),
            port: 15008,
        }));
        svc.vips
            .push((String::new(), "fd00:96::a".parse().unwrap()));
        st.insert_service(svc);
        let mut wp_svc = service(None);
        wp_svc.name = "wp".into();
        wp_svc.hostname = "wp.ns.svc.cluster.local".into();
        wp_svc.vips = vec![(String::new(), IpAddr::from([10, 96, 0, 99]))];
        wp_svc.ports[0].service_port = 15008;
        wp_svc.ports[0].target_port = 15008;
        st.insert_service(wp_svc);
        let mut wp = wl("waypoint", [10, 0, 2, 9], true, "waypoint");
        wp.addresses.push("fd00:10:244:2::9".parse().unwrap());
        wp.services.insert(
            "ns/wp.ns.svc.cluster.local".into(),
            vec![PortMapping {
                service_port: 15008,
                target_port: 15008,
                app_protocol: AppProtocol::Unknown,
            }],
        );
        st.insert_workload(wp);
        for (vip, hop) in [
            ("10.96.0.10:80", "10.0.2.9:15008"),
            ("[fd00:96::a]:80", "[fd00:10:244:2::9]:15008"),
        ] {
            match plan_outbound(&st, "", None, addr(vip)) {
                OutboundPlan::Hbone {
                    hop: h,
                    authority,
                    via_waypoint,
                    ..
                } => {
                    assert!(via_waypoint);
                    assert_eq!((h, authority), (addr(hop), addr(vip)));
                }
                other => panic!("{vip}: {other:?}"),
            }
        }
    }

    fn other_service() -> Service {
        Service {
            name: "other".into(),
            hostname: "other.ns.svc.cluster.local".into(),
            vips: vec![(String::new(), IpAddr::from([10, 96, 0, 11]))],
            ..service(None)
        }
    }

    #[test]
    fn inbound_service_is_only_ever_one_of_the_destinations_own() {
        let mut st = State::default();
        st.insert_service(service(None));
        st.insert_service(other_service());
        st.insert_workload(with_svc(wl("b", [10, 0, 1, 5], true, "b"), KEY, 8080));
        let local = addr("10.0.1.5:15008");
        let to_app = Authority::Addr(addr("10.0.1.5:8080"));
        let service_of = |host: Option<&str>| {
            plan_inbound(&st, "", local, &to_app, host, None)
                .dst_service
                .map(|s| s.hostname.clone())
        };
        assert_eq!(
            service_of(Some("s.ns.svc.cluster.local")).as_deref(),
            Some("s.ns.svc.cluster.local")
        );
        // A real service the destination does not back, a made-up 2 KB name, a prefix of
        // the real one, and its key form: none of them.
        let long = "x".repeat(2048);
        for claimed in [
            "other.ns.svc.cluster.local",
            long.as_str(),
            "s.ns.svc",
            KEY,
            "",
        ] {
            assert_eq!(service_of(Some(claimed)), None, "{claimed:?}");
        }
        assert_eq!(service_of(None), None);
        // Arriving at an address that is no workload of ours: nothing resolves.
        let stray = plan_inbound(
            &st,
            "",
            addr("10.0.9.9:15008"),
            &Authority::Addr(addr("10.0.9.9:8080")),
            Some("s.ns.svc.cluster.local"),
            None,
        );
        assert!(stray.dst_service.is_none());
    }

    #[test]
    fn inbound_hostname_authority_maps_only_the_destinations_own_services() {
        let mut st = State::default();
        st.insert_service(service(None));
        st.insert_service(other_service());
        st.insert_workload(with_svc(wl("b", [10, 0, 1, 5], true, "b"), KEY, 8080));
        let local = addr("10.0.1.5:15008");
        let host = |h: &str, port: u16| Authority::Host {
            host: h.into(),
            port,
        };
        let own = plan_inbound(
            &st,
            "",
            local,
            &host("s.ns.svc.cluster.local", 80),
            None,
            None,
        );
        assert_eq!(own.target, Ok(addr("10.0.1.5:8080")));
        assert_eq!(own.dst_service.unwrap().name, "s");
        // The service port must exist; another service (even one whose ports would map)
        // and unknown names are refused, never mapped through someone else's ports.
        for (h, port) in [
            ("s.ns.svc.cluster.local", 81),
            ("other.ns.svc.cluster.local", 80),
            ("nope.ns.svc.cluster.local", 80),
        ] {
            let p = plan_inbound(&st, "", local, &host(h, port), None, None);
            assert_eq!(p.target, Err(port), "{h}:{port}");
            assert!(p.dst_service.is_none(), "{h}:{port}");
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
