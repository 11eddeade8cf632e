//! L4 authorization at the waypoint, for the ports it does not parse as HTTP: the same
//! policies (those that target the waypoint's Gateway or the Service), evaluated on what
//! a TCP connection shows (source identity and address, destination port) by the one
//! evaluator (`authz::evaluate_tcp`, mesh-authz) with the HTTP attributes unknown, so the
//! L7-only parts fail closed, as Istio does for TCP:
//!
//! - an ALLOW rule with L7-only fields (methods, paths, hosts and their `not` forms,
//!   `request.*` conditions) never matches, so it allows nothing;
//! - a DENY rule with L7-only fields denies whenever the rest of it matches.

use crate::authz::{self, Decision, Policy};
use mesh_identity::SpiffeId;
use std::net::IpAddr;

/// What an L4 decision looks at.
#[derive(Clone, Copy, Debug)]
pub struct Connection<'a> {
    pub source: Option<&'a SpiffeId>,
    pub source_ip: IpAddr,
    /// The destination (service) port.
    pub port: u16,
}

/// Allow or deny one TCP connection.
pub fn decide<'a>(policies: impl IntoIterator<Item = &'a Policy>, c: &Connection<'_>) -> Decision {
    authz::evaluate_tcp(policies, c.source, c.source_ip, c.port)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// As mesh-control reads and sends it.
    fn p(name: &str, json: &str) -> Policy {
        let spec: serde_json::Value = serde_json::from_str(json).unwrap();
        let (typed, _) = mesh_authz::k8s::read("back", name, &Default::default(), Some(&spec));
        let (p, errors) = Policy::from_proto(&mesh_proto::waypoint::L7Policy {
            namespace: "back".into(),
            name: name.into(),
            policy: Some(typed),
        });
        assert!(errors.is_empty(), "{errors:?}");
        p
    }

    fn conn<'a>(id: &'a SpiffeId, port: u16) -> Connection<'a> {
        Connection {
            source: Some(id),
            source_ip: "10.244.1.5".parse().unwrap(),
            port,
        }
    }

    fn allowed(ps: &[Policy], c: &Connection<'_>) -> bool {
        decide(ps, c) == Decision::Allow
    }

    #[test]
    fn l4_fields_decide_as_at_l7() {
        let front: SpiffeId = "spiffe://cluster.local/ns/front/sa/web".parse().unwrap();
        let evil: SpiffeId = "spiffe://cluster.local/ns/attacker/sa/evil"
            .parse()
            .unwrap();
        let deny = [p(
            "no-attacker",
            r#"{"action":"DENY","rules":[{"from":[{"source":{"namespaces":["attacker"]}}]}]}"#,
        )];
        assert!(allowed(&deny, &conn(&front, 9000)));
        assert!(matches!(
            decide(&deny, &conn(&evil, 9000)),
            Decision::Deny { policy, .. } if policy == "back/no-attacker"
        ));
        let ports = [p(
            "only-9000",
            r#"{"rules":[{"to":[{"operation":{"ports":["9000"]}}]}]}"#,
        )];
        assert!(allowed(&ports, &conn(&front, 9000)));
        assert!(!allowed(&ports, &conn(&front, 9001)));
        assert!(allowed(&[], &conn(&evil, 9000)), "no policy, no opinion");
        let cond = [p(
            "ns",
            r#"{"rules":[{"when":[{"key":"source.namespace","values":["front"]}]}]}"#,
        )];
        assert!(allowed(&cond, &conn(&front, 1)) && !allowed(&cond, &conn(&evil, 1)));
    }

    #[test]
    fn allow_rules_with_l7_fields_never_match() {
        let front: SpiffeId = "spiffe://cluster.local/ns/front/sa/web".parse().unwrap();
        for json in [
            r#"{"rules":[{"to":[{"operation":{"methods":["GET"]}}]}]}"#,
            r#"{"rules":[{"to":[{"operation":{"paths":["/*"]}}]}]}"#,
            r#"{"rules":[{"to":[{"operation":{"notPaths":["/admin"]}}]}]}"#,
            r#"{"rules":[{"to":[{"operation":{"hosts":["*"]}}]}]}"#,
            r#"{"rules":[{"from":[{"source":{"namespaces":["front"]}}],"to":[{"operation":{"notMethods":["DELETE"]}}]}]}"#,
            r#"{"rules":[{"when":[{"key":"request.headers[x-user]","values":["*"]}]}]}"#,
            r#"{"rules":[{"from":[{"source":{"requestPrincipals":["*"]}}]}]}"#,
        ] {
            let ps = [p("l7-allow", json)];
            assert!(!allowed(&ps, &conn(&front, 9000)), "{json}");
        }
        // Another ALLOW rule without L7 fields still allows.
        let ps = [p(
            "mixed",
            r#"{"rules":[{"to":[{"operation":{"paths":["/x"]}}]},{"from":[{"source":{"namespaces":["front"]}}]}]}"#,
        )];
        assert!(allowed(&ps, &conn(&front, 9000)));
    }

    #[test]
    fn deny_rules_with_l7_fields_deny_when_the_rest_matches() {
        let front: SpiffeId = "spiffe://cluster.local/ns/front/sa/web".parse().unwrap();
        let evil: SpiffeId = "spiffe://cluster.local/ns/attacker/sa/evil"
            .parse()
            .unwrap();
        let ps = [p(
            "no-admin",
            r#"{"action":"DENY","rules":[{"to":[{"operation":{"paths":["/admin*"]}}]}]}"#,
        )];
        assert!(
            !allowed(&ps, &conn(&front, 9000)),
            "paths only: every connection"
        );
        let ps = [p(
            "attacker-admin",
            r#"{"action":"DENY","rules":[{"from":[{"source":{"namespaces":["attacker"]}}],"to":[{"operation":{"methods":["POST"],"ports":["9000"]}}],"when":[{"key":"request.headers[x-a]","values":["1"]}]}]}"#,
        )];
        assert!(!allowed(&ps, &conn(&evil, 9000)), "the rest matches");
        assert!(allowed(&ps, &conn(&evil, 9001)), "another port");
        assert!(allowed(&ps, &conn(&front, 9000)), "another source");
        let ps = [p(
            "jwt",
            r#"{"action":"DENY","rules":[{"when":[{"key":"request.auth.claims[group]","values":["x"]}]}]}"#,
        )];
        assert!(!allowed(&ps, &conn(&front, 9000)));
    }
}
