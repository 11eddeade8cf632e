//! Stage: L7 authorization, on the normalised request (a header sent twice is seen as
//! one value, joined with commas, as routing sees it).

use super::Local;
use crate::authz::{self, Decision, Policy};
use crate::normalize;
use mesh_identity::SpiffeId;
use std::net::IpAddr;
use std::sync::Arc;

/// Who sends the request, and to which port.
#[derive(Clone, Copy, Debug)]
pub struct Peer<'a> {
    pub source: &'a SpiffeId,
    pub source_ip: IpAddr,
    pub port: u16,
}

/// The request as policy sees it.
pub struct Seen<'a> {
    pub method: &'a http::Method,
    pub path: &'a str,
    pub host: &'a str,
    pub headers: &'a http::HeaderMap,
}

/// Allowed, or [`Local::Denied`] naming the policy.
pub fn check(policies: &[Arc<Policy>], peer: Peer<'_>, req: &Seen<'_>) -> Result<(), Local> {
    let merged = normalize::merged_for_policy(req.headers);
    let decision = authz::evaluate(
        policies.iter().map(|p| p.as_ref()),
        &authz::Request {
            source: Some(peer.source),
            source_ip: peer.source_ip,
            method: req.method.as_str(),
            path: req.path,
            host: req.host,
            port: peer.port,
            headers: merged.as_ref().unwrap_or(req.headers),
        },
    );
    match decision {
        Decision::Allow => Ok(()),
        Decision::Deny { policy, reason } => Err(Local::Denied { policy, reason }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(name: &str, json: serde_json::Value) -> Arc<Policy> {
        let (typed, _) = mesh_authz::k8s::read("shop", name, &Default::default(), Some(&json));
        Arc::new(
            Policy::from_proto(&mesh_proto::waypoint::L7Policy {
                namespace: "shop".into(),
                name: name.into(),
                policy: Some(typed),
            })
            .0,
        )
    }

    #[test]
    fn denies_naming_the_policy_and_allows_otherwise() {
        let web: SpiffeId = "spiffe://cluster.local/ns/front/sa/web".parse().unwrap();
        let peer = Peer {
            source: &web,
            source_ip: "10.0.0.1".parse().unwrap(),
            port: 80,
        };
        let ps = [policy(
            "no-ab",
            serde_json::json!({"action": "DENY", "rules": [{"when": [{"key": "request.headers[x-t]", "values": ["a,b"]}]}]}),
        )];
        let get = http::Method::GET;
        let mut h = http::HeaderMap::new();
        let seen = |h: &http::HeaderMap| {
            check(
                &ps,
                peer,
                &Seen {
                    method: &get,
                    path: "/",
                    host: "api",
                    headers: h,
                },
            )
        };
        h.append("x-t", "a".parse().unwrap());
        assert_eq!(seen(&h), Ok(()));
        h.append("x-t", "b".parse().unwrap());
        match seen(&h) {
            Err(Local::Denied { policy, .. }) => assert_eq!(policy, "shop/no-ab"),
            other => panic!("a DENY on the joined value must deny: {other:?}"),
        }
        assert_eq!(
            check(
                &[],
                peer,
                &Seen {
                    method: &get,
                    path: "/",
                    host: "api",
                    headers: &h
                }
            ),
            Ok(())
        );
    }
}
