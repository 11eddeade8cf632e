//! Where an outbound connection goes, decided from the xDS state alone (no I/O).

use crate::state::Service;
use crate::state::{Destination, GatewayAddress, State, Workload};
use mesh_identity::SpiffeId;
use mesh_proto::ports;
use std::net::{IpAddr, SocketAddr};
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
    Refuse(OutboundRefusal),
}

/// Why an outbound connection is refused; the wording is what the access log says.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OutboundRefusal {
    #[error("waypoint {0} is not a known workload")]
    UnknownWaypoint(IpAddr),
    #[error("waypoint service {namespace}/{hostname} is unknown")]
    UnknownWaypointService { namespace: String, hostname: String },
    #[error("waypoint {0} has no healthy instance")]
    NoWaypointInstance(String),
    #[error("waypoint instance {0} has no address")]
    WaypointInstanceWithoutAddress(String),
    #[error("service {service} has no healthy endpoint for port {port}")]
    NoHealthyEndpoint { service: String, port: u16 },
    #[error("endpoint {0} has no address")]
    EndpointWithoutAddress(String),
}

/// A connection the app sent to one of ztunnel's own ports on loopback: redirected back
/// to us, it would loop forever.
pub fn is_loop(orig: SocketAddr) -> bool {
    orig.ip().is_loopback() && ports::is_proxy_port(orig.port())
}

/// The access-log flag for an HBONE connect that failed, by what failed.
pub fn connect_failure_flags(e: &hbone::ConnectError) -> &'static str {
    match e {
        hbone::ConnectError::Identity(_) | hbone::ConnectError::Tls { .. } => "TLS_FAILURE",
        hbone::ConnectError::H2(_) | hbone::ConnectError::HandshakeTimeout(_) => {
            "H2_HANDSHAKE_FAILURE"
        }
        hbone::ConnectError::Refused(hbone::Refused::Unauthorized) => "DENY",
        _ => "CONNECT",
    }
}

struct Waypoint {
    hop: SocketAddr,
    ids: Vec<SpiffeId>,
    workload: Arc<Workload>,
}

/// The address of `w` of the family the app dialled (its socket only takes replies of
/// its own family), else its first.
fn address_like(w: &Workload, dialled: SocketAddr) -> Option<IpAddr> {
    w.addresses
        .iter()
        .find(|a| a.is_ipv4() == dialled.is_ipv4())
        .or(w.addresses.first())
        .copied()
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
) -> Result<Waypoint, OutboundRefusal> {
    match gw {
        GatewayAddress::Ip { ip, port } => {
            let w = st
                .workload_by_ip(network, *ip)
                .ok_or(OutboundRefusal::UnknownWaypoint(*ip))?;
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
            let svc = st.service(namespace, hostname).ok_or_else(|| {
                OutboundRefusal::UnknownWaypointService {
                    namespace: namespace.clone(),
                    hostname: hostname.clone(),
                }
            })?;
            let (w, _) = st
                .pick_endpoint(svc, *port, src)
                .or_else(|| st.pick_any_endpoint(svc, src))
                .ok_or_else(|| OutboundRefusal::NoWaypointInstance(hostname.clone()))?;
            let ip = address_like(&w, dialled)
                .ok_or_else(|| OutboundRefusal::WaypointInstanceWithoutAddress(w.uid.clone()))?;
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

/// Where `src`'s connection to `orig` goes: through the destination's waypoint (unless
/// `src` is that waypoint), over HBONE to a mesh endpoint, or in plain TCP to anything
/// outside the mesh. A waypoint or endpoint that cannot be resolved refuses; it is never
/// bypassed.
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
                return OutboundPlan::Refuse(OutboundRefusal::NoHealthyEndpoint {
                    service: svc.hostname.clone(),
                    port: orig.port(),
                });
            };
            let Some(ip) = address_like(&ep, orig) else {
                return OutboundPlan::Refuse(OutboundRefusal::EndpointWithoutAddress(
                    ep.uid.clone(),
                ));
            };
            if ep.hbone {
                let mut expected = vec![ep.identity.clone()];
                expected.extend(svc.subject_alt_names.iter().cloned());
                OutboundPlan::Hbone {
                    hop: SocketAddr::new(ip, ports::HBONE),
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
                    hop: SocketAddr::new(orig.ip(), ports::HBONE),
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
    use crate::proxy::plan::fixtures::*;
    use crate::state::{LbMode, PortMapping, Scope};
    use mesh_proto::workload::AppProtocol;
    use std::io;
    use std::net::IpAddr;

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
        assert_eq!(
            refusal(plan_outbound(&st, "", None, addr("10.96.0.10:81"))),
            OutboundRefusal::NoHealthyEndpoint {
                service: "s.ns.svc.cluster.local".into(),
                port: 81
            }
        );
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

    #[test]
    fn unknown_waypoint_refuses_rather_than_bypassing() {
        let mut st = State::default();
        st.insert_service(service(Some(GatewayAddress::Hostname {
            namespace: "ns".into(),
            hostname: "gone.ns.svc.cluster.local".into(),
            port: 15008,
        })));
        st.insert_workload(with_svc(wl("b", [10, 0, 1, 5], true, "b"), KEY, 8080));
        assert_eq!(
            refusal(plan_outbound(&st, "", None, addr("10.96.0.10:80"))),
            OutboundRefusal::UnknownWaypointService {
                namespace: "ns".into(),
                hostname: "gone.ns.svc.cluster.local".into()
            }
        );
    }

    /// The refusal of a plan that must be one.
    fn refusal(p: OutboundPlan) -> OutboundRefusal {
        match p {
            OutboundPlan::Refuse(r) => r,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    /// (hop, authority, via_waypoint, expected service accounts) of an HBONE plan.
    fn hbone(p: OutboundPlan) -> (SocketAddr, SocketAddr, bool, Vec<String>) {
        match p {
            OutboundPlan::Hbone {
                hop,
                authority,
                via_waypoint,
                expected,
                ..
            } => (
                hop,
                authority,
                via_waypoint,
                expected.iter().map(|e| e.to_string()).collect(),
            ),
            other => panic!("expected HBONE, got {other:?}"),
        }
    }

    fn spiffe(sa: &str) -> String {
        format!("spiffe://cluster.local/ns/ns/sa/{sa}")
    }

    fn waypoint_at(ip: [u8; 4]) -> Option<GatewayAddress> {
        Some(GatewayAddress::Ip {
            ip: IpAddr::from(ip),
            port: 15008,
        })
    }

    /// A waypoint Service `wp.ns.svc.cluster.local` (10.96.0.99), whose instances listen
    /// on 15008.
    fn waypoint_service() -> Service {
        Service {
            name: "wp".into(),
            hostname: "wp.ns.svc.cluster.local".into(),
            vips: vec![(String::new(), IpAddr::from([10, 96, 0, 99]))],
            ports: vec![PortMapping {
                service_port: 15008,
                target_port: 15008,
                app_protocol: AppProtocol::Unknown,
            }],
            ..service(None)
        }
    }

    fn by_hostname(hostname: &str) -> Option<GatewayAddress> {
        Some(GatewayAddress::Hostname {
            namespace: "ns".into(),
            hostname: hostname.into(),
            port: 15008,
        })
    }

    #[test]
    fn plain_endpoint_of_a_service_gets_plain_tcp_to_its_target_port() {
        let mut st = State::default();
        st.insert_service(service(None));
        st.insert_workload(with_svc(wl("legacy", [10, 0, 1, 6], false, "l"), KEY, 9090));
        match plan_outbound(&st, "", None, addr("10.96.0.10:80")) {
            OutboundPlan::Passthrough {
                dst,
                dst_workload,
                service,
            } => {
                assert_eq!(dst, addr("10.0.1.6:9090"));
                assert_eq!(dst_workload.unwrap().uid, "legacy");
                assert_eq!(service.unwrap().name, "s");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn endpoint_port_falls_back_to_the_services_target_port() {
        let mut st = State::default();
        st.insert_service(service(None));
        // The workload lists the service without a target port of its own (0).
        st.insert_workload(with_svc(wl("b", [10, 0, 1, 5], true, "b"), KEY, 0));
        let (hop, authority, _, _) = hbone(plan_outbound(&st, "", None, addr("10.96.0.10:80")));
        assert_eq!(
            (hop, authority),
            (addr("10.0.1.5:15008"), addr("10.0.1.5:8080"))
        );
    }

    #[test]
    fn service_without_endpoints_is_refused() {
        let mut st = State::default();
        st.insert_service(service(None));
        assert_eq!(
            refusal(plan_outbound(&st, "", None, addr("10.96.0.10:80"))),
            OutboundRefusal::NoHealthyEndpoint {
                service: "s.ns.svc.cluster.local".into(),
                port: 80
            }
        );
    }

    #[test]
    fn unhealthy_endpoints_are_skipped_unless_the_service_allows_them() {
        let mut st = State::default();
        st.insert_service(service(None));
        let mut w = with_svc(wl("b", [10, 0, 1, 5], true, "b"), KEY, 8080);
        w.healthy = false;
        st.insert_workload(w);
        assert!(matches!(
            refusal(plan_outbound(&st, "", None, addr("10.96.0.10:80"))),
            OutboundRefusal::NoHealthyEndpoint { port: 80, .. }
        ));
        let mut svc = service(None);
        svc.load_balancing.allow_unhealthy = true;
        st.insert_service(svc);
        let (hop, _, _, _) = hbone(plan_outbound(&st, "", None, addr("10.96.0.10:80")));
        assert_eq!(hop, addr("10.0.1.5:15008"));
    }

    #[test]
    fn strict_locality_without_a_known_source_is_refused_not_spread() {
        let mut st = State::default();
        let mut svc = service(None);
        svc.load_balancing.preferences = vec![Scope::Node];
        svc.load_balancing.mode = LbMode::Strict;
        st.insert_service(svc);
        st.insert_workload(with_svc(wl("b", [10, 0, 1, 5], true, "b"), KEY, 8080));
        assert!(matches!(
            refusal(plan_outbound(&st, "", None, addr("10.96.0.10:80"))),
            OutboundRefusal::NoHealthyEndpoint { .. }
        ));
        // A source on the endpoint's node is served.
        let src = wl("a", [10, 0, 1, 4], true, "a");
        let (hop, _, _, _) = hbone(plan_outbound(&st, "", Some(&src), addr("10.96.0.10:80")));
        assert_eq!(hop, addr("10.0.1.5:15008"));
    }

    #[test]
    fn endpoint_identity_and_the_services_san_are_both_expected() {
        let mut st = State::default();
        let mut svc = service(None);
        svc.subject_alt_names = vec![SpiffeId::new("cluster.local", "ns", "shared").unwrap()];
        st.insert_service(svc);
        st.insert_workload(with_svc(wl("b", [10, 0, 1, 5], true, "b"), KEY, 8080));
        let (_, _, _, expected) = hbone(plan_outbound(&st, "", None, addr("10.96.0.10:80")));
        assert_eq!(expected, vec![spiffe("b"), spiffe("shared")]);
    }

    #[test]
    fn a_service_vip_wins_over_a_workload_at_the_same_address() {
        let mut st = State::default();
        st.insert_service(service(None));
        st.insert_workload(with_svc(wl("b", [10, 0, 1, 5], true, "b"), KEY, 8080));
        // A (misconfigured) workload claiming the VIP.
        st.insert_workload(wl("squatter", [10, 96, 0, 10], true, "squatter"));
        let (hop, authority, _, _) = hbone(plan_outbound(&st, "", None, addr("10.96.0.10:80")));
        assert_eq!(
            (hop, authority),
            (addr("10.0.1.5:15008"), addr("10.0.1.5:8080"))
        );
    }

    #[test]
    fn workloads_of_another_network_are_not_ours_to_tunnel_to() {
        let mut st = State::default();
        let mut w = wl("far", [10, 0, 1, 5], true, "far");
        w.network = "west".into();
        st.insert_workload(w);
        assert!(matches!(
            plan_outbound(&st, "", None, addr("10.0.1.5:8080")),
            OutboundPlan::Passthrough {
                dst_workload: None,
                ..
            }
        ));
        let (hop, _, _, _) = hbone(plan_outbound(&st, "west", None, addr("10.0.1.5:8080")));
        assert_eq!(hop, addr("10.0.1.5:15008"));
    }

    #[test]
    fn pod_with_a_waypoint_is_reached_through_it_with_its_own_address_as_authority() {
        let mut st = State::default();
        let mut b = wl("b", [10, 0, 1, 5], true, "b");
        b.waypoint = waypoint_at([10, 0, 2, 9]);
        st.insert_workload(b);
        st.insert_workload(wl("waypoint", [10, 0, 2, 9], true, "waypoint"));
        match plan_outbound(&st, "", None, addr("10.0.1.5:8080")) {
            OutboundPlan::Hbone {
                hop,
                authority,
                expected,
                dst_workload,
                service,
                via_waypoint,
            } => {
                assert!(via_waypoint);
                assert_eq!(hop, addr("10.0.2.9:15008"));
                assert_eq!(authority, addr("10.0.1.5:8080"));
                assert_eq!(expected.len(), 1);
                assert_eq!(expected[0].to_string(), spiffe("waypoint"));
                assert_eq!(dst_workload.unwrap().uid, "b");
                assert!(service.is_none());
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_pods_own_waypoint_goes_straight_to_the_pod() {
        let mut st = State::default();
        let mut b = wl("b", [10, 0, 1, 5], true, "b");
        b.waypoint = waypoint_at([10, 0, 2, 9]);
        st.insert_workload(b);
        st.insert_workload(wl("waypoint", [10, 0, 2, 9], true, "waypoint"));
        let wp = st.workload("waypoint").unwrap().clone();
        let (hop, authority, via, expected) =
            hbone(plan_outbound(&st, "", Some(&wp), addr("10.0.1.5:8080")));
        assert_eq!(
            (hop, authority, via),
            (addr("10.0.1.5:15008"), addr("10.0.1.5:8080"), false)
        );
        assert_eq!(expected, vec![spiffe("b")]);
    }

    #[test]
    fn plain_pod_behind_a_waypoint_still_goes_through_it() {
        let mut st = State::default();
        let mut legacy = wl("legacy", [10, 0, 1, 6], false, "l");
        legacy.waypoint = waypoint_at([10, 0, 2, 9]);
        st.insert_workload(legacy);
        st.insert_workload(wl("waypoint", [10, 0, 2, 9], true, "waypoint"));
        let (hop, _, via, _) = hbone(plan_outbound(&st, "", None, addr("10.0.1.6:8080")));
        assert!(via);
        assert_eq!(hop, addr("10.0.2.9:15008"));
        // From the waypoint itself: plain TCP to the pod, as it is not in the mesh.
        let wp = st.workload("waypoint").unwrap().clone();
        assert!(matches!(
            plan_outbound(&st, "", Some(&wp), addr("10.0.1.6:8080")),
            OutboundPlan::Passthrough { dst, .. } if dst == addr("10.0.1.6:8080")
        ));
    }

    /// A waypoint that cannot be resolved refuses, for a pod and for a service: never a
    /// bypass to the destination.
    #[test]
    fn unresolvable_waypoints_refuse_with_what_is_missing() {
        let gone = IpAddr::from([10, 0, 2, 99]);
        let cases: Vec<(Option<GatewayAddress>, OutboundRefusal)> = vec![
            (
                waypoint_at([10, 0, 2, 99]),
                OutboundRefusal::UnknownWaypoint(gone),
            ),
            (
                by_hostname("gone.ns.svc.cluster.local"),
                OutboundRefusal::UnknownWaypointService {
                    namespace: "ns".into(),
                    hostname: "gone.ns.svc.cluster.local".into(),
                },
            ),
            // The waypoint Service exists but has no instance.
            (
                by_hostname("wp.ns.svc.cluster.local"),
                OutboundRefusal::NoWaypointInstance("wp.ns.svc.cluster.local".into()),
            ),
        ];
        for (gw, want) in cases {
            // Behind a service ...
            let mut st = State::default();
            st.insert_service(waypoint_service());
            st.insert_service(service(gw.clone()));
            st.insert_workload(with_svc(wl("b", [10, 0, 1, 5], true, "b"), KEY, 8080));
            assert_eq!(
                refusal(plan_outbound(&st, "", None, addr("10.96.0.10:80"))),
                want,
                "service, {gw:?}"
            );
            // ... and behind a pod.
            let mut st = State::default();
            st.insert_service(waypoint_service());
            let mut b = wl("b", [10, 0, 1, 5], true, "b");
            b.waypoint = gw.clone();
            st.insert_workload(b);
            assert_eq!(
                refusal(plan_outbound(&st, "", None, addr("10.0.1.5:8080"))),
                want,
                "pod, {gw:?}"
            );
        }
    }

    #[test]
    fn waypoint_by_hostname_expects_its_instance_and_the_services_sans() {
        let mut st = State::default();
        st.insert_service(service(by_hostname("wp.ns.svc.cluster.local")));
        let mut wp_svc = waypoint_service();
        wp_svc.subject_alt_names = vec![SpiffeId::new("cluster.local", "ns", "wp-san").unwrap()];
        st.insert_service(wp_svc);
        st.insert_workload(with_svc(wl("b", [10, 0, 1, 5], true, "b"), KEY, 8080));
        let mut wp = wl("waypoint", [10, 0, 2, 9], true, "waypoint");
        wp.services.insert(
            "ns/wp.ns.svc.cluster.local".into(),
            vec![PortMapping {
                service_port: 15008,
                target_port: 15008,
                app_protocol: AppProtocol::Unknown,
            }],
        );
        st.insert_workload(wp);
        let (hop, authority, via, expected) =
            hbone(plan_outbound(&st, "", None, addr("10.96.0.10:80")));
        assert!(via);
        assert_eq!(
            (hop, authority),
            (addr("10.0.2.9:15008"), addr("10.96.0.10:80"))
        );
        assert_eq!(expected, vec![spiffe("waypoint"), spiffe("wp-san")]);
        // The waypoint instance itself is sent to the endpoint.
        let me = st.workload("waypoint").unwrap().clone();
        let (hop, _, via, _) = hbone(plan_outbound(&st, "", Some(&me), addr("10.96.0.10:80")));
        assert!(!via);
        assert_eq!(hop, addr("10.0.1.5:15008"));
    }

    #[test]
    fn waypoint_instance_is_found_even_when_its_service_lists_no_hbone_port() {
        let mut st = State::default();
        st.insert_service(service(by_hostname("wp.ns.svc.cluster.local")));
        let mut wp_svc = waypoint_service();
        wp_svc.ports[0].service_port = 15021;
        wp_svc.ports[0].target_port = 15021;
        st.insert_service(wp_svc);
        st.insert_workload(with_svc(wl("b", [10, 0, 1, 5], true, "b"), KEY, 8080));
        let mut wp = wl("waypoint", [10, 0, 2, 9], true, "waypoint");
        wp.services.insert(
            "ns/wp.ns.svc.cluster.local".into(),
            vec![PortMapping {
                service_port: 15021,
                target_port: 15021,
                app_protocol: AppProtocol::Unknown,
            }],
        );
        st.insert_workload(wp);
        let (hop, _, via, _) = hbone(plan_outbound(&st, "", None, addr("10.96.0.10:80")));
        assert!(via);
        assert_eq!(hop, addr("10.0.2.9:15008"));
    }

    #[test]
    fn only_ztunnels_own_ports_on_loopback_are_a_loop() {
        for (dst, is) in [
            ("127.0.0.1:15001", true),
            ("127.0.0.1:15006", true),
            ("127.0.0.1:15008", true),
            ("127.0.0.1:15080", true),
            ("[::1]:15008", true),
            ("127.0.0.1:8080", false),
            ("127.0.0.1:15053", false),
            ("10.0.1.5:15008", false),
            ("10.0.1.5:15001", false),
        ] {
            assert_eq!(is_loop(addr(dst)), is, "{dst}");
        }
    }

    #[test]
    fn failed_connects_are_flagged_by_what_failed() {
        let dst = addr("10.0.1.5:15008");
        let io = || io::Error::other("x");
        let cases: Vec<(hbone::ConnectError, &str)> = vec![
            (
                hbone::ConnectError::Tls { dst, source: io() },
                "TLS_FAILURE",
            ),
            (
                hbone::ConnectError::Identity(mesh_identity::tls::IdentityError::NoIdentity),
                "TLS_FAILURE",
            ),
            (
                hbone::ConnectError::HandshakeTimeout(dst),
                "H2_HANDSHAKE_FAILURE",
            ),
            (
                hbone::ConnectError::Refused(hbone::Refused::Unauthorized),
                "DENY",
            ),
            (
                hbone::ConnectError::Refused(hbone::Refused::Unavailable),
                "CONNECT",
            ),
            (
                hbone::ConnectError::Refused(hbone::Refused::BadRequest),
                "CONNECT",
            ),
            (hbone::ConnectError::ConnectTimeout(dst), "CONNECT"),
            (hbone::ConnectError::Dial { dst, source: io() }, "CONNECT"),
            (hbone::ConnectError::PoolTimeout(dst), "CONNECT"),
            (hbone::ConnectError::ResponseTimeout(dst), "CONNECT"),
        ];
        for (e, want) in cases {
            assert_eq!(connect_failure_flags(&e), want, "{e}");
        }
    }

    /// What the access log says for each refusal: unchanged from the untyped messages.
    #[test]
    fn refusals_are_worded_for_the_operator() {
        let cases = [
            (
                OutboundRefusal::UnknownWaypoint(IpAddr::from([10, 0, 2, 9])),
                "waypoint 10.0.2.9 is not a known workload",
            ),
            (
                OutboundRefusal::UnknownWaypointService {
                    namespace: "ns".into(),
                    hostname: "wp".into(),
                },
                "waypoint service ns/wp is unknown",
            ),
            (
                OutboundRefusal::NoWaypointInstance("wp".into()),
                "waypoint wp has no healthy instance",
            ),
            (
                OutboundRefusal::WaypointInstanceWithoutAddress("u".into()),
                "waypoint instance u has no address",
            ),
            (
                OutboundRefusal::NoHealthyEndpoint {
                    service: "s".into(),
                    port: 80,
                },
                "service s has no healthy endpoint for port 80",
            ),
            (
                OutboundRefusal::EndpointWithoutAddress("u".into()),
                "endpoint u has no address",
            ),
        ];
        for (r, want) in cases {
            assert_eq!(r.to_string(), want);
        }
    }

    /// An endpoint without an address of the dialled family is reached on the one it has.
    #[test]
    fn single_stack_endpoint_is_reached_on_its_family_whatever_was_dialled() {
        let mut st = State::default();
        let mut svc = service(None);
        svc.vips
            .push((String::new(), "fd00:96::a".parse().unwrap()));
        st.insert_service(svc);
        st.insert_workload(with_svc(wl("b", [10, 0, 1, 5], true, "b"), KEY, 8080));
        let (hop, authority, _, _) = hbone(plan_outbound(&st, "", None, addr("[fd00:96::a]:80")));
        assert_eq!(
            (hop, authority),
            (addr("10.0.1.5:15008"), addr("10.0.1.5:8080"))
        );
    }

    #[test]
    fn the_services_waypoint_sends_plain_endpoints_plain_tcp() {
        let mut st = State::default();
        st.insert_service(service(waypoint_at([10, 0, 2, 9])));
        st.insert_workload(with_svc(wl("legacy", [10, 0, 1, 6], false, "l"), KEY, 9090));
        st.insert_workload(wl("waypoint", [10, 0, 2, 9], true, "waypoint"));
        let wp = st.workload("waypoint").unwrap().clone();
        assert!(matches!(
            plan_outbound(&st, "", Some(&wp), addr("10.96.0.10:80")),
            OutboundPlan::Passthrough { dst, .. } if dst == addr("10.0.1.6:9090")
        ));
        // Anyone else goes through the waypoint, the VIP as authority.
        let other = wl("a", [10, 0, 1, 4], true, "a");
        let (hop, authority, via, _) =
            hbone(plan_outbound(&st, "", Some(&other), addr("10.96.0.10:80")));
        assert!(via);
        assert_eq!(
            (hop, authority),
            (addr("10.0.2.9:15008"), addr("10.96.0.10:80"))
        );
    }
}
