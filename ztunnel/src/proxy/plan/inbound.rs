//! What an inbound connection may do, decided from the xDS state alone (no I/O): who it
//! is for, which port of the pod it reaches, and whether policy allows it. The handler
//! only carries the plan out (connects, copies, records).

use crate::rbac::{ConnectionInfo, Decision};
use crate::state::{Service, State, Workload};
use hbone::{Authority, Refusal};
use mesh_identity::SpiffeId;
use mesh_proto::ports;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

/// An inbound connection as it arrived.
#[derive(Debug, Clone, Copy)]
pub struct InboundRequest<'a> {
    /// The connection's source address.
    pub peer: SocketAddr,
    /// Where it arrived: the original destination (plaintext on 15006) or the local
    /// address of the HBONE connection (15008).
    pub local: SocketAddr,
    /// The CONNECT's contents; `None` for plaintext.
    pub hbone: Option<HboneConnect<'a>>,
}

/// What an HBONE CONNECT says, with the identity its mTLS peer proved.
#[derive(Debug, Clone, Copy)]
pub struct HboneConnect<'a> {
    pub authority: &'a Authority,
    /// `forwarded: host=` (the service the caller dialled, as it says).
    pub forwarded_host: Option<&'a str>,
    pub peer_identity: &'a SpiffeId,
}

/// The decision, with what the access log and metrics report about it.
#[derive(Debug, Clone)]
pub struct InboundPlan {
    /// The source workload, by the connection's source address.
    pub src: Option<Arc<Workload>>,
    /// The destination service: one of the destination workload's own services, named by
    /// `forwarded: host=` or by a hostname authority; never a name we do not know.
    pub dst_service: Option<Arc<Service>>,
    /// The address the CONNECT names, once resolved (HBONE only).
    pub dst_hbone_addr: Option<SocketAddr>,
    /// The destination workload, once found.
    pub dst: Option<Arc<Workload>>,
    pub action: InboundAction,
}

#[derive(Debug, Clone)]
pub enum InboundAction {
    /// Connect to the app at `app` in the pod; `info` is what policy allowed (and what the
    /// connection tracker re-checks when policy changes).
    Connect {
        app: SocketAddr,
        dst: Arc<Workload>,
        info: ConnectionInfo,
    },
    Refuse(InboundRefusal),
    /// Close without an answer or a record: plaintext to one of ztunnel's own ports,
    /// which can only be a redirection loop.
    Ignore,
}

/// Why an inbound connection is refused; the wording is what the access log and the
/// CONNECT response say.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InboundRefusal {
    #[error("the authority's host is no service of {local} with port {port}")]
    UnknownServicePort { local: IpAddr, port: u16 },
    #[error("authority {target} does not match the connection's destination {local}")]
    AuthorityMismatch { target: SocketAddr, local: IpAddr },
    #[error("port {0} is reserved for ztunnel")]
    ReservedPort(u16),
    #[error("no known workload at {0}")]
    UnknownDestination(IpAddr),
    #[error("{reason}")]
    Denied {
        /// `ns/name` of the policy responsible, when one is.
        policy: Option<String>,
        reason: String,
    },
}

impl InboundRefusal {
    /// The CONNECT response for this refusal.
    pub fn to_refusal(&self) -> Refusal {
        let reason = self.to_string();
        match self {
            InboundRefusal::AuthorityMismatch { .. } => Refusal::BadRequest(reason),
            InboundRefusal::Denied { .. } => Refusal::Unauthorized(reason),
            InboundRefusal::UnknownServicePort { .. }
            | InboundRefusal::ReservedPort(_)
            | InboundRefusal::UnknownDestination(_) => Refusal::Unavailable(reason),
        }
    }

    /// The policy responsible for a denial, when one is named.
    pub fn policy(&self) -> Option<&str> {
        match self {
            InboundRefusal::Denied { policy, .. } => policy.as_deref().filter(|p| !p.is_empty()),
            _ => None,
        }
    }
}

/// Decides an inbound connection. What the peer says (the authority, `forwarded: host=`)
/// is only looked up among the destination's own services, so it never becomes a name we
/// keep or report; the target must be the address the connection arrived at (a CONNECT
/// cannot be used to reach another pod through this one) and never one of ztunnel's own
/// ports; the destination's policies decide last.
pub fn plan_inbound(st: &State, network: &str, req: &InboundRequest<'_>) -> InboundPlan {
    let mut plan = InboundPlan {
        src: st.workload_by_ip(network, req.peer.ip()).cloned(),
        dst_service: None,
        dst_hbone_addr: None,
        dst: None,
        action: InboundAction::Ignore,
    };
    let (target, src_identity) = match &req.hbone {
        None if ports::is_proxy_port(req.local.port()) => return plan,
        None => (req.local, None),
        Some(c) => {
            let (svc, target) = resolve_authority(st, network, req.local, c);
            plan.dst_service = svc;
            let target = match target {
                Ok(t) => t,
                Err(port) => {
                    return plan.refuse(InboundRefusal::UnknownServicePort {
                        local: req.local.ip(),
                        port,
                    });
                }
            };
            plan.dst_hbone_addr = Some(target);
            if target.ip() != req.local.ip() {
                return plan.refuse(InboundRefusal::AuthorityMismatch {
                    target,
                    local: req.local.ip(),
                });
            }
            if ports::is_proxy_port(target.port()) {
                return plan.refuse(InboundRefusal::ReservedPort(target.port()));
            }
            (target, Some(c.peer_identity.clone()))
        }
    };
    let Some(dst) = st.workload_by_ip(network, target.ip()).cloned() else {
        return plan.refuse(InboundRefusal::UnknownDestination(target.ip()));
    };
    let info = ConnectionInfo {
        src_identity,
        src_ip: req.peer.ip(),
        dst_ip: target.ip(),
        dst_port: target.port(),
    };
    let decision = st.authorize(&dst, &info);
    plan.dst = Some(dst.clone());
    match decision {
        Decision::Deny { policy, reason } => plan.refuse(InboundRefusal::Denied { policy, reason }),
        Decision::Allow => {
            plan.action = InboundAction::Connect {
                app: target,
                dst,
                info,
            };
            plan
        }
    }
}

impl InboundPlan {
    fn refuse(mut self, why: InboundRefusal) -> Self {
        self.action = InboundAction::Refuse(why);
        self
    }
}

/// The destination service and the target address a CONNECT names: an address as is, a
/// hostname only as one of the destination workload's own services with that port
/// (`Err(port)` otherwise).
fn resolve_authority(
    st: &State,
    network: &str,
    local: SocketAddr,
    c: &HboneConnect<'_>,
) -> (Option<Arc<Service>>, Result<SocketAddr, u16>) {
    let dst = st.workload_by_ip(network, local.ip());
    let own_service =
        |host: &str| -> Option<Arc<Service>> { st.service_of_workload(dst?, host).cloned() };
    let forwarded = c.forwarded_host.and_then(own_service);
    match c.authority {
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::plan::fixtures::*;
    use mesh_authz::{Action, Match, StringMatch};

    const POD: [u8; 4] = [10, 0, 1, 5];
    const PEER: &str = "10.0.1.4:40000";

    fn peer_id() -> SpiffeId {
        SpiffeId::new("cluster.local", "ns", "a").unwrap()
    }

    /// A node with the pod `b` (10.0.1.5, backing `s` with port 80 -> 8080), the caller `a`
    /// (10.0.1.4), and the services `s` and `other`.
    fn node() -> State {
        let mut st = State::default();
        st.insert_service(service(None));
        st.insert_service(other_service());
        st.insert_workload(with_svc(wl("b", POD, true, "b"), KEY, 8080));
        st.insert_workload(wl("a", [10, 0, 1, 4], true, "a"));
        st
    }

    fn plaintext(st: &State, dst: &str) -> InboundPlan {
        plan_inbound(
            st,
            "",
            &InboundRequest {
                peer: addr(PEER),
                local: addr(dst),
                hbone: None,
            },
        )
    }

    fn connect(st: &State, local: &str, authority: Authority, fwd: Option<&str>) -> InboundPlan {
        let id = peer_id();
        plan_inbound(
            st,
            "",
            &InboundRequest {
                peer: addr(PEER),
                local: addr(local),
                hbone: Some(HboneConnect {
                    authority: &authority,
                    forwarded_host: fwd,
                    peer_identity: &id,
                }),
            },
        )
    }

    fn to_addr(a: &str) -> Authority {
        Authority::Addr(addr(a))
    }

    fn to_host(h: &str, port: u16) -> Authority {
        Authority::Host {
            host: h.into(),
            port,
        }
    }

    fn refused(p: &InboundPlan) -> &InboundRefusal {
        match &p.action {
            InboundAction::Refuse(r) => r,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    /// (app address, destination uid, policy facts) of a connect plan.
    fn connects(p: &InboundPlan) -> (SocketAddr, &str, &ConnectionInfo) {
        match &p.action {
            InboundAction::Connect { app, dst, info } => (*app, dst.uid.as_str(), info),
            other => panic!("expected a connect, got {other:?}"),
        }
    }

    // ---- plaintext (15006) ----

    #[test]
    fn plaintext_to_a_pod_connects_to_the_dialled_port_without_identity() {
        let st = node();
        let p = plaintext(&st, "10.0.1.5:8080");
        let (app, dst, info) = connects(&p);
        assert_eq!((app, dst), (addr("10.0.1.5:8080"), "b"));
        assert_eq!(info.src_identity, None);
        assert_eq!(info.src_ip, addr(PEER).ip());
        assert_eq!((info.dst_ip, info.dst_port), (IpAddr::from(POD), 8080));
        assert_eq!(p.src.unwrap().uid, "a");
        assert_eq!(p.dst.unwrap().uid, "b");
        assert!(p.dst_hbone_addr.is_none() && p.dst_service.is_none());
    }

    #[test]
    fn plaintext_to_ztunnels_own_ports_is_dropped_without_a_record() {
        let st = node();
        for port in [15001, 15006, 15008, 15080] {
            let p = plaintext(&st, &format!("10.0.1.5:{port}"));
            assert!(matches!(p.action, InboundAction::Ignore), "{port}");
        }
        // The DNS port and the health port are the app's business here.
        assert!(matches!(
            plaintext(&st, "10.0.1.5:15053").action,
            InboundAction::Connect { .. }
        ));
    }

    #[test]
    fn plaintext_to_an_unknown_address_is_refused() {
        let st = node();
        let p = plaintext(&st, "10.0.9.9:8080");
        assert_eq!(
            refused(&p),
            &InboundRefusal::UnknownDestination(IpAddr::from([10, 0, 9, 9]))
        );
        assert!(p.dst.is_none());
    }

    #[test]
    fn plaintext_from_an_unknown_source_has_no_source_workload() {
        let st = node();
        let p = plan_inbound(
            &st,
            "",
            &InboundRequest {
                peer: addr("192.168.7.7:5000"),
                local: addr("10.0.1.5:8080"),
                hbone: None,
            },
        );
        assert!(p.src.is_none());
        assert!(matches!(p.action, InboundAction::Connect { .. }));
    }

    #[test]
    fn plaintext_denied_by_policy_names_the_policy() {
        let mut st = node();
        st.insert_policy(deny_port(8080));
        let p = plaintext(&st, "10.0.1.5:8080");
        let r = refused(&p);
        assert!(matches!(r, InboundRefusal::Denied { .. }), "{r:?}");
        assert_eq!(r.policy(), Some("ns/deny-port"));
        // The destination is known (and reported) even when denied.
        assert_eq!(p.dst.unwrap().uid, "b");
        // Another port is not covered by it.
        assert!(matches!(
            plaintext(&st, "10.0.1.5:9090").action,
            InboundAction::Connect { .. }
        ));
    }

    /// A policy that allows only a principal can never be met in plaintext (no identity),
    /// but is by the same caller over HBONE.
    #[test]
    fn identity_policies_deny_plaintext_and_allow_the_proven_peer() {
        let mut st = node();
        st.insert_policy(policy(
            "allow-a",
            Action::Allow,
            Match {
                principals: vec![StringMatch::Exact("cluster.local/ns/ns/sa/a".into())],
                ..Default::default()
            },
        ));
        let p = plaintext(&st, "10.0.1.5:8080");
        let r = refused(&p);
        assert!(matches!(r, InboundRefusal::Denied { .. }), "{r:?}");
        let p = connect(&st, "10.0.1.5:15008", to_addr("10.0.1.5:8080"), None);
        let (_, _, info) = connects(&p);
        assert_eq!(info.src_identity, Some(peer_id()));
    }

    #[test]
    fn plaintext_workloads_of_another_network_are_unknown() {
        let st = node();
        let p = plan_inbound(
            &st,
            "west",
            &InboundRequest {
                peer: addr(PEER),
                local: addr("10.0.1.5:8080"),
                hbone: None,
            },
        );
        assert!(matches!(refused(&p), InboundRefusal::UnknownDestination(_)));
        assert!(p.src.is_none());
    }

    // ---- HBONE (15008) ----

    #[test]
    fn connect_to_an_address_of_the_pod_is_allowed() {
        let st = node();
        let p = connect(&st, "10.0.1.5:15008", to_addr("10.0.1.5:8080"), None);
        let (app, dst, info) = connects(&p);
        assert_eq!((app, dst), (addr("10.0.1.5:8080"), "b"));
        assert_eq!(
            (info.src_identity.clone(), info.dst_port),
            (Some(peer_id()), 8080)
        );
        assert_eq!(p.dst_hbone_addr, Some(addr("10.0.1.5:8080")));
        assert_eq!(p.src.unwrap().uid, "a");
        assert!(p.dst_service.is_none());
    }

    #[test]
    fn connect_by_service_hostname_maps_the_service_port_to_the_pods() {
        let st = node();
        let p = connect(
            &st,
            "10.0.1.5:15008",
            to_host("s.ns.svc.cluster.local", 80),
            None,
        );
        let (app, _, _) = connects(&p);
        assert_eq!(app, addr("10.0.1.5:8080"));
        assert_eq!(p.dst_hbone_addr, Some(addr("10.0.1.5:8080")));
        assert_eq!(p.dst_service.unwrap().name, "s");
    }

    #[test]
    fn connect_by_hostname_falls_back_to_the_services_target_port() {
        let mut st = State::default();
        st.insert_service(service(None));
        st.insert_workload(with_svc(wl("b", POD, true, "b"), KEY, 0));
        let p = connect(
            &st,
            "10.0.1.5:15008",
            to_host("s.ns.svc.cluster.local", 80),
            None,
        );
        assert_eq!(connects(&p).0, addr("10.0.1.5:8080"));
    }

    #[test]
    fn forwarded_host_names_the_service_over_a_hostname_authority() {
        let mut st = node();
        // `b` backs `other` too.
        let mut b = with_svc(wl("b", POD, true, "b"), KEY, 8080);
        b = with_svc(b, "ns/other.ns.svc.cluster.local", 8080);
        st.insert_workload(b);
        let p = connect(
            &st,
            "10.0.1.5:15008",
            to_host("s.ns.svc.cluster.local", 80),
            Some("other.ns.svc.cluster.local"),
        );
        assert_eq!(p.dst_service.as_ref().unwrap().name, "other");
        assert_eq!(connects(&p).0, addr("10.0.1.5:8080"));
    }

    #[test]
    fn hostname_authority_without_such_a_service_port_is_unavailable() {
        let st = node();
        for (h, port) in [
            ("s.ns.svc.cluster.local", 81),
            ("other.ns.svc.cluster.local", 80),
            ("nope.ns.svc.cluster.local", 80),
            ("", 80),
        ] {
            let p = connect(&st, "10.0.1.5:15008", to_host(h, port), None);
            assert_eq!(
                refused(&p),
                &InboundRefusal::UnknownServicePort {
                    local: IpAddr::from(POD),
                    port
                },
                "{h}:{port}"
            );
            assert!(p.dst_hbone_addr.is_none() && p.dst.is_none(), "{h}:{port}");
        }
    }

    #[test]
    fn hostname_authority_at_an_unknown_address_is_unavailable() {
        let st = node();
        let p = connect(
            &st,
            "10.0.9.9:15008",
            to_host("s.ns.svc.cluster.local", 80),
            None,
        );
        assert!(matches!(
            refused(&p),
            InboundRefusal::UnknownServicePort { port: 80, .. }
        ));
    }

    /// A CONNECT cannot use this pod's tunnel to reach another address.
    #[test]
    fn authority_of_another_address_is_a_bad_request() {
        let st = node();
        for target in [
            "10.0.1.4:8080",
            "10.96.0.10:80",
            "127.0.0.1:8080",
            "[::1]:8080",
        ] {
            let p = connect(&st, "10.0.1.5:15008", to_addr(target), None);
            assert_eq!(
                refused(&p),
                &InboundRefusal::AuthorityMismatch {
                    target: addr(target),
                    local: IpAddr::from(POD)
                },
                "{target}"
            );
            assert_eq!(p.dst_hbone_addr, Some(addr(target)));
            assert!(p.dst.is_none());
        }
    }

    #[test]
    fn connect_to_ztunnels_own_ports_is_refused() {
        let st = node();
        for port in [15001, 15006, 15008, 15080] {
            let p = connect(
                &st,
                "10.0.1.5:15008",
                to_addr(&format!("10.0.1.5:{port}")),
                None,
            );
            assert_eq!(refused(&p), &InboundRefusal::ReservedPort(port), "{port}");
        }
    }

    #[test]
    fn a_service_mapping_to_a_ztunnel_port_is_refused_too() {
        let mut st = State::default();
        st.insert_service(service(None));
        st.insert_workload(with_svc(wl("b", POD, true, "b"), KEY, 15006));
        let p = connect(
            &st,
            "10.0.1.5:15008",
            to_host("s.ns.svc.cluster.local", 80),
            None,
        );
        assert_eq!(refused(&p), &InboundRefusal::ReservedPort(15006));
    }

    #[test]
    fn connect_arriving_at_no_known_workload_is_unavailable() {
        let st = node();
        let p = connect(&st, "10.0.9.9:15008", to_addr("10.0.9.9:8080"), None);
        assert_eq!(
            refused(&p),
            &InboundRefusal::UnknownDestination(IpAddr::from([10, 0, 9, 9]))
        );
        assert_eq!(p.dst_hbone_addr, Some(addr("10.0.9.9:8080")));
    }

    #[test]
    fn connect_denied_by_the_peers_identity() {
        let mut st = node();
        st.insert_policy(policy(
            "deny-a",
            Action::Deny,
            Match {
                principals: vec![StringMatch::Exact("cluster.local/ns/ns/sa/a".into())],
                ..Default::default()
            },
        ));
        let p = connect(&st, "10.0.1.5:15008", to_addr("10.0.1.5:8080"), None);
        let r = refused(&p);
        assert_eq!(r.policy(), Some("ns/deny-a"));
        assert!(matches!(r.to_refusal(), Refusal::Unauthorized(_)));
        assert_eq!(p.dst.unwrap().uid, "b");
        // Plaintext from the same address carries no identity: that policy does not match.
        assert!(matches!(
            plaintext(&st, "10.0.1.5:8080").action,
            InboundAction::Connect { .. }
        ));
    }

    #[test]
    fn connect_denied_by_port_is_checked_on_the_mapped_port() {
        let mut st = node();
        st.insert_policy(deny_port(8080));
        // Port 80 of the service is 8080 in the pod: denied.
        let p = connect(
            &st,
            "10.0.1.5:15008",
            to_host("s.ns.svc.cluster.local", 80),
            None,
        );
        assert_eq!(refused(&p).policy(), Some("ns/deny-port"));
    }

    #[test]
    fn dual_stack_pod_is_reached_on_the_family_the_connect_arrived_on() {
        let mut st = State::default();
        st.insert_service(service(None));
        let mut b = with_svc(wl("b", POD, true, "b"), KEY, 8080);
        b.addresses.push("fd00:10:244:1::5".parse().unwrap());
        st.insert_workload(b);
        let p = connect(
            &st,
            "[fd00:10:244:1::5]:15008",
            to_host("s.ns.svc.cluster.local", 80),
            None,
        );
        assert_eq!(connects(&p).0, addr("[fd00:10:244:1::5]:8080"));
        let p = connect(
            &st,
            "[fd00:10:244:1::5]:15008",
            to_addr("10.0.1.5:8080"),
            None,
        );
        assert!(matches!(
            refused(&p),
            InboundRefusal::AuthorityMismatch { .. }
        ));
    }

    #[test]
    fn inbound_service_is_only_ever_one_of_the_destinations_own() {
        let st = node();
        let service_of = |host: Option<&str>| {
            connect(&st, "10.0.1.5:15008", to_addr("10.0.1.5:8080"), host)
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
        let stray = connect(
            &st,
            "10.0.9.9:15008",
            to_addr("10.0.9.9:8080"),
            Some("s.ns.svc.cluster.local"),
        );
        assert!(stray.dst_service.is_none());
    }

    // ---- refusals as answered and recorded ----

    /// The CONNECT status and the access log's words for each refusal, unchanged from
    /// the untyped messages.
    #[test]
    fn refusals_answer_with_their_status_and_words() {
        let local = IpAddr::from(POD);
        let cases = [
            (
                InboundRefusal::UnknownServicePort { local, port: 81 },
                503,
                "the authority's host is no service of 10.0.1.5 with port 81",
            ),
            (
                InboundRefusal::AuthorityMismatch {
                    target: addr("10.0.1.4:8080"),
                    local,
                },
                400,
                "authority 10.0.1.4:8080 does not match the connection's destination 10.0.1.5",
            ),
            (
                InboundRefusal::ReservedPort(15008),
                503,
                "port 15008 is reserved for ztunnel",
            ),
            (
                InboundRefusal::UnknownDestination(local),
                503,
                "no known workload at 10.0.1.5",
            ),
            (
                InboundRefusal::Denied {
                    policy: Some("ns/p".into()),
                    reason: "denied by ns/p".into(),
                },
                401,
                "denied by ns/p",
            ),
        ];
        for (r, status, words) in cases {
            let answer = r.to_refusal();
            assert_eq!(answer.status().as_u16(), status, "{r:?}");
            assert_eq!(answer.reason(), words);
        }
    }

    #[test]
    fn only_a_named_policy_is_reported() {
        let denied = |policy: Option<&str>| InboundRefusal::Denied {
            policy: policy.map(str::to_string),
            reason: "r".into(),
        };
        assert_eq!(denied(Some("ns/p")).policy(), Some("ns/p"));
        assert_eq!(denied(Some("")).policy(), None);
        assert_eq!(denied(None).policy(), None);
        assert_eq!(InboundRefusal::ReservedPort(15008).policy(), None);
    }

    #[test]
    fn connect_from_an_unknown_address_still_carries_the_proven_identity() {
        let st = node();
        let id = peer_id();
        let authority = to_addr("10.0.1.5:8080");
        let p = plan_inbound(
            &st,
            "",
            &InboundRequest {
                peer: addr("192.168.7.7:5000"),
                local: addr("10.0.1.5:15008"),
                hbone: Some(HboneConnect {
                    authority: &authority,
                    forwarded_host: None,
                    peer_identity: &id,
                }),
            },
        );
        assert!(p.src.is_none());
        let (_, _, info) = connects(&p);
        assert_eq!(info.src_identity, Some(peer_id()));
        assert_eq!(info.src_ip, addr("192.168.7.7:5000").ip());
    }

    /// Authorization is on the destination's own policies: a policy of another namespace
    /// does not apply to it.
    #[test]
    fn only_the_destinations_policies_decide() {
        let mut st = node();
        let mut elsewhere = deny_port(8080);
        elsewhere.namespace = "other".into();
        st.insert_policy(elsewhere);
        assert!(matches!(
            plaintext(&st, "10.0.1.5:8080").action,
            InboundAction::Connect { .. }
        ));
        st.insert_policy(deny_port(8080));
        assert!(matches!(
            refused(&plaintext(&st, "10.0.1.5:8080")),
            InboundRefusal::Denied { .. }
        ));
    }
}
