//! L7 AuthorizationPolicy at the waypoint (policies whose targetRefs name the waypoint's
//! Gateway or a Service it serves), evaluated by mesh-authz, the evaluator ztunnel and
//! `meshctl authz check` use: what the waypoint cannot evaluate (JWT attributes, what
//! mesh-control could not read) allows nothing in an ALLOW and matches in a DENY.

use mesh_identity::SpiffeId;
use std::net::IpAddr;

/// A policy as the waypoint enforces it.
#[derive(Debug, Clone)]
pub struct Policy {
    pub key: String,
    pub policy: mesh_authz::Policy,
}

impl Policy {
    /// From the typed message mesh-control sends; never refused: what this side cannot
    /// read is enforced fail closed and returned, for the NACK.
    pub fn from_proto(p: &mesh_proto::waypoint::L7Policy) -> (Policy, Vec<String>) {
        let key = format!("{}/{}", p.namespace, p.name);
        let (policy, errors) = match &p.policy {
            Some(typed) => mesh_authz::typed::policy(typed, mesh_authz::PolicyScope::Namespace),
            None => {
                let e = "no policy in the message (an older control plane?)".to_string();
                (
                    mesh_authz::Policy::fail_closed(
                        &p.namespace,
                        &p.name,
                        mesh_authz::PolicyScope::Namespace,
                        mesh_authz::Action::Deny,
                        false,
                        e.clone(),
                    ),
                    vec![e],
                )
            }
        };
        (Policy { key, policy }, errors)
    }
}

/// What a decision looks at.
pub struct Request<'a> {
    pub source: Option<&'a SpiffeId>,
    pub source_ip: IpAddr,
    pub method: &'a str,
    pub path: &'a str,
    pub host: &'a str,
    pub port: u16,
    pub headers: &'a http::HeaderMap,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow,
    Deny { policy: String, reason: String },
}

/// An HTTP request through the waypoint.
pub fn evaluate<'a>(policies: impl IntoIterator<Item = &'a Policy>, r: &Request<'_>) -> Decision {
    let http = mesh_authz::HttpRequest {
        method: r.method,
        path: r.path,
        host: r.host,
        headers: r.headers,
    };
    decide(policies, r.source, r.source_ip, r.port, Some(&http))
}

/// A TCP connection through the waypoint (a port that is not HTTP): the same policies,
/// their HTTP attributes unknown, so an ALLOW rule that needs them allows nothing and a
/// DENY rule denies when the rest of it matches.
pub fn evaluate_tcp<'a>(
    policies: impl IntoIterator<Item = &'a Policy>,
    source: Option<&SpiffeId>,
    source_ip: IpAddr,
    port: u16,
) -> Decision {
    decide(policies, source, source_ip, port, None)
}

fn decide<'a>(
    policies: impl IntoIterator<Item = &'a Policy>,
    source: Option<&SpiffeId>,
    source_ip: IpAddr,
    port: u16,
    http: Option<&mesh_authz::HttpRequest<'_>>,
) -> Decision {
    let conn = mesh_authz::ConnectionInfo {
        src_identity: source.cloned(),
        src_ip: source_ip,
        // The waypoint does not evaluate destination.ip (unknown: fail closed).
        dst_ip: IpAddr::from([0, 0, 0, 0]),
        dst_port: port,
    };
    let mut allows: Vec<String> = Vec::new();
    let policies: Vec<&mesh_authz::Policy> = policies
        .into_iter()
        .map(|p| {
            if p.policy.action == mesh_authz::Action::Allow && !p.policy.dry_run {
                allows.push(p.key.clone());
            }
            &p.policy
        })
        .collect();
    match mesh_authz::evaluate_request(policies, &conn, http) {
        mesh_authz::Decision::Allow => Decision::Allow,
        mesh_authz::Decision::Deny { policy, reason } => Decision::Deny {
            policy: policy.unwrap_or_else(|| {
                allows.sort();
                allows.join(",")
            }),
            reason,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_proto::waypoint as pb;

    fn req<'a>(
        src: Option<&'a SpiffeId>,
        method: &'a str,
        path: &'a str,
        h: &'a http::HeaderMap,
    ) -> Request<'a> {
        Request {
            source: src,
            source_ip: "10.244.1.2".parse().unwrap(),
            method,
            path,
            host: "api.shop.svc.cluster.local",
            port: 80,
            headers: h,
        }
    }

    /// As mesh-control reads and sends it.
    fn policy(ns: &str, name: &str, spec: serde_json::Value) -> Policy {
        let (typed, _) = mesh_authz::k8s::read(ns, name, &Default::default(), Some(&spec));
        let (p, errors) = Policy::from_proto(&pb::L7Policy {
            namespace: ns.into(),
            name: name.into(),
            policy: Some(typed),
        });
        assert!(errors.is_empty(), "{errors:?}");
        p
    }

    #[test]
    fn deny_by_path_and_allow_by_principal() {
        let h = http::HeaderMap::new();
        let web: SpiffeId = "spiffe://cluster.local/ns/front/sa/web".parse().unwrap();
        let other: SpiffeId = "spiffe://cluster.local/ns/evil/sa/x".parse().unwrap();
        let deny = policy(
            "shop",
            "no-admin",
            serde_json::json!({"action":"DENY","rules":[{"to":[{"operation":{"paths":["/admin*"]}}]}]}),
        );
        let allow = policy(
            "shop",
            "front-only",
            serde_json::json!({"rules":[{"from":[{"source":{"namespaces":["front"]}}],"to":[{"operation":{"methods":["GET","POST"]}}]}]}),
        );
        let ps = [deny, allow];
        assert_eq!(
            evaluate(&ps, &req(Some(&web), "GET", "/", &h)),
            Decision::Allow
        );
        assert!(
            matches!(evaluate(&ps, &req(Some(&web), "GET", "/admin/users", &h)), Decision::Deny { policy, .. } if policy == "shop/no-admin")
        );
        assert!(matches!(
            evaluate(&ps, &req(Some(&other), "GET", "/", &h)),
            Decision::Deny { policy, .. } if policy == "shop/front-only"
        ));
        assert!(matches!(
            evaluate(&ps, &req(Some(&web), "DELETE", "/", &h)),
            Decision::Deny { .. }
        ));
        assert!(
            matches!(
                evaluate(&ps, &req(None, "GET", "/", &h)),
                Decision::Deny { .. }
            ),
            "no identity, no namespace"
        );
    }

    /// The case: an ALLOW with an invalid ipBlocks CIDR. Before, mesh-control
    /// passed it on as JSON, the waypoint refused it and had no ALLOW: everyone allowed.
    #[test]
    fn an_allow_it_cannot_evaluate_allows_nothing() {
        let h = http::HeaderMap::new();
        let web: SpiffeId = "spiffe://cluster.local/ns/front/sa/web".parse().unwrap();
        let bad = policy(
            "shop",
            "bad",
            serde_json::json!({"rules":[{"from":[{"source":{"ipBlocks":["10.0.0.0/40"]}}]}]}),
        );
        assert!(matches!(
            evaluate([&bad], &req(Some(&web), "GET", "/", &h)),
            Decision::Deny { .. }
        ));
        // Dry run: evaluated, not enforced.
        let mut dry = policy(
            "shop",
            "dry",
            serde_json::json!({"action":"DENY","rules":[{}]}),
        );
        dry.policy.dry_run = true;
        assert_eq!(
            evaluate([&dry], &req(Some(&web), "GET", "/", &h)),
            Decision::Allow
        );
    }

    #[test]
    fn a_message_without_a_policy_denies_and_is_refused() {
        let (p, errors) = Policy::from_proto(&pb::L7Policy {
            namespace: "shop".into(),
            name: "old".into(),
            policy: None,
        });
        assert_eq!(errors.len(), 1);
        let h = http::HeaderMap::new();
        assert!(matches!(
            evaluate([&p], &req(None, "GET", "/", &h)),
            Decision::Deny { .. }
        ));
    }

    #[test]
    fn tcp_through_the_waypoint_gets_the_same_policies_without_http_facts() {
        let web: SpiffeId = "spiffe://cluster.local/ns/front/sa/web".parse().unwrap();
        let ip: IpAddr = "10.244.1.2".parse().unwrap();
        let tcp = |p: &Policy| evaluate_tcp([p], Some(&web), ip, 9000) == Decision::Allow;
        let deny_paths = policy(
            "shop",
            "d",
            serde_json::json!({"action":"DENY","rules":[{"from":[{"source":{"namespaces":["front"]}}],"to":[{"operation":{"paths":["/admin*"]}}]}]}),
        );
        assert!(!tcp(&deny_paths), "a DENY on paths denies TCP from front");
        let allow_get = policy(
            "shop",
            "a",
            serde_json::json!({"rules":[{"to":[{"operation":{"methods":["GET"]}}]}]}),
        );
        assert!(!tcp(&allow_get), "an ALLOW on methods allows no TCP");
        let allow_front = policy(
            "shop",
            "f",
            serde_json::json!({"rules":[{"from":[{"source":{"namespaces":["front"]}}]}]}),
        );
        assert!(tcp(&allow_front));
    }
}
