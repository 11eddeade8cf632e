//! Applies the control plane's updates: addresses (services and endpoints), routes and
//! L7 policies. Routes are compiled here, once per version; what this side cannot read of
//! one is NACKed and fails closed where it sits (its rule answers 500, its match matches
//! nothing). A policy that cannot be read is NACKed and enforced fail closed. The first response of each type
//! marks it synced (the waypoint serves nothing before all three have synced).

use crate::authz::Policy;
use crate::proxy::{Config, ConfigStore, Target};
use crate::route;
use crate::server::Lifecycle;
use mesh_proto::discovery::DeltaDiscoveryResponse;
use mesh_proto::prost::Message;
use mesh_proto::{type_url, waypoint, workload};
use mesh_xds::Registry;
use std::sync::{Arc, LazyLock};

pub struct Apply {
    pub config: Arc<ConfigStore>,
    pub lifecycle: Arc<Lifecycle>,
}

/// Where a policy applies: its Gateway and Service targets (a Service in the policy's
/// namespace). A policy whose targets this side cannot read applies to every request
/// through the waypoint, so that refusing it never widens access.
fn targets(p: &waypoint::L7Policy) -> (Vec<Target>, Option<String>) {
    use waypoint::TargetKind;
    let mut out = Vec::new();
    let mut unreadable = None;
    for t in p.policy.iter().flat_map(|p| &p.targets) {
        match TargetKind::try_from(t.kind) {
            Ok(TargetKind::Gateway) => out.push(Target::Gateway),
            Ok(TargetKind::Service) => out.push(Target::Service {
                namespace: p.namespace.clone(),
                name: t.name.clone(),
            }),
            _ => unreadable = Some(format!("target kind {} is unknown", t.kind)),
        }
    }
    if unreadable.is_some() || out.is_empty() {
        out = vec![Target::Gateway];
    }
    (out, unreadable)
}

/// Why a route cannot be installed at all: without a known kind or a parent it would
/// attach nowhere in silence (an older control plane sent the spec as JSON in a field now
/// reserved, which reads as an empty route).
fn refused_route(h: &waypoint::HttpRoute) -> Option<String> {
    let object = format!("route {}/{}", h.namespace, h.name);
    match waypoint::RouteKind::try_from(h.kind) {
        Ok(waypoint::RouteKind::Http | waypoint::RouteKind::Grpc) => {}
        _ => {
            return Some(format!(
                "{object} has no route kind this waypoint knows ({}); is mesh-control \
                 older or newer than the waypoint?",
                h.kind
            ));
        }
    }
    h.parents.is_empty().then(|| {
        format!(
            "{object} has no parent Service, so it would attach nowhere; is mesh-control \
             older than the waypoint?"
        )
    })
}

/// The types the waypoint subscribes to, and how each is applied to its config.
static REGISTRY: LazyLock<Registry<Config>> = LazyLock::new(|| {
    Registry::new()
        .with(type_url::ADDRESS, apply_address, |cfg, name| {
            cfg.discovery.remove_address(name);
        })
        .with(type_url::HTTP_ROUTE, apply_route, |cfg, name| {
            cfg.routes.remove(name);
        })
        .with_fail_closed(
            type_url::L7_POLICY,
            apply_policy,
            |cfg, name| {
                cfg.policies.remove(name);
            },
            |cfg, name| fail_closed_policy(cfg, name, "L7 policy without a body".into()),
        )
});

/// The types to subscribe to, in order.
pub fn types() -> Vec<&'static str> {
    REGISTRY.types()
}

fn apply_address(cfg: &mut Config, _name: &str, body: &[u8]) -> Result<(), String> {
    let a = workload::Address::decode(body).map_err(|e| e.to_string())?;
    cfg.discovery.apply_address(&a).map_err(|e| e.to_string())
}

/// Nothing of it can be read, or it attaches nowhere: the previous version (if any) is
/// kept.
fn apply_route(cfg: &mut Config, name: &str, body: &[u8]) -> Result<(), String> {
    let h = waypoint::HttpRoute::decode(body).map_err(|e| e.to_string())?;
    if let Some(refused) = refused_route(&h) {
        return Err(refused);
    }
    let (route, unreadable) = route::compile(&h);
    cfg.routes.insert(name.to_string(), route);
    if unreadable.is_empty() {
        Ok(())
    } else {
        Err(format!("{} (failing closed)", unreadable.join("; ")))
    }
}

/// Never refused outright: what cannot be read is enforced fail closed (and NACKed),
/// since a policy left out could widen access.
fn apply_policy(cfg: &mut Config, name: &str, body: &[u8]) -> Result<(), String> {
    let (policy, targets, errors) = match waypoint::L7Policy::decode(body) {
        Ok(p) => {
            let (mut policy, mut errors) = Policy::from_proto(&p);
            let (targets, bad) = targets(&p);
            if let Some(bad) = &bad
                && policy.policy.action == mesh_authz::Action::Allow
            {
                // Now on every request through the waypoint: an ALLOW there must allow
                // nothing, or it would widen access to Services it never named. (A DENY
                // there denies more, which is fail closed as it is.)
                let m = &policy.policy;
                policy.policy = mesh_authz::Policy::fail_closed(
                    &m.namespace,
                    &m.name,
                    m.scope,
                    m.action,
                    m.dry_run,
                    bad.clone(),
                );
            }
            errors.extend(bad);
            (policy, targets, errors)
        }
        Err(e) => return Err(fail_closed_policy(cfg, name, e.to_string())),
    };
    cfg.policies.insert(name.to_string(), (policy, targets));
    if errors.is_empty() {
        Ok(())
    } else {
        Err(format!("{} (enforced fail closed)", errors.join("; ")))
    }
}

/// Nothing of the policy can be read but its name (undecodable, or no body): enforced
/// fail closed on every request through the waypoint. Returns the NACK's reason.
fn fail_closed_policy(cfg: &mut Config, name: &str, why: String) -> String {
    let (ns, short) = name.split_once('/').unwrap_or(("", name));
    let (policy, _) = Policy::from_proto(&waypoint::L7Policy {
        namespace: ns.into(),
        name: short.into(),
        policy: None,
    });
    cfg.policies
        .insert(name.to_string(), (policy, vec![Target::Gateway]));
    format!("{why} (enforced fail closed)")
}

impl mesh_xds::Handler for Apply {
    /// One version per response. A panic while applying fails the store closed (see
    /// [`ConfigStore`]): the waypoint turns not ready and serves nothing rather than a
    /// half-applied or frozen configuration; every later response is NACKed.
    fn apply(&mut self, resp: &DeltaDiscoveryResponse) -> Vec<(String, String)> {
        let applied = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut cfg = self.config.write()?;
            let errors = REGISTRY.apply(&mut cfg, resp);
            cfg.commit();
            Ok::<_, crate::snapshot::Poisoned>(errors)
        }));
        match applied {
            Ok(Ok(errors)) => {
                self.lifecycle.mark_synced(&resp.type_url);
                errors
            }
            Ok(Err(e)) => {
                self.lifecycle.set_config_failed();
                resp.resources
                    .iter()
                    .map(|r| (r.name.clone(), e.to_string()))
                    .chain(
                        resp.removed_resources
                            .iter()
                            .map(|n| (n.clone(), e.to_string())),
                    )
                    .collect()
            }
            Err(panic) => {
                self.lifecycle.set_config_failed();
                tracing::error!(type_url = %resp.type_url, "{}", crate::snapshot::Poisoned);
                std::panic::resume_unwind(panic)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_proto::discovery::Resource;
    use mesh_xds::Handler;

    /// Applies one resource of `type_url` named `name` (`body` None: sent without one)
    /// to an empty configuration: the errors reported, and the configuration after.
    fn apply_one(
        type_url: &str,
        name: &str,
        body: Option<Vec<u8>>,
    ) -> (Vec<(String, String)>, Config) {
        let config = Arc::new(ConfigStore::default());
        let mut a = Apply {
            config: config.clone(),
            lifecycle: Lifecycle::new(),
        };
        let errors = a.apply(&DeltaDiscoveryResponse {
            type_url: type_url.into(),
            resources: vec![Resource {
                name: name.into(),
                resource: body.map(|value| mesh_proto::prost_types::Any {
                    type_url: type_url.into(),
                    value,
                }),
                ..Default::default()
            }],
            ..Default::default()
        });
        let cfg = Config::clone(&config.write().unwrap());
        (errors, cfg)
    }

    fn apply_policy(value: Vec<u8>) -> (Vec<(String, String)>, Config) {
        apply_one(type_url::L7_POLICY, "shop/p", Some(value))
    }

    /// Deny for every caller asked: no identity, a client's and a server's own identity,
    /// each with a read and a write, so a placeholder that lets any mesh identity through
    /// (`principals: ["*"]`, "authenticated only") is caught too.
    fn denies_everything(cfg: &Config) -> bool {
        let h = http::HeaderMap::new();
        let (p, t) = &cfg.policies["shop/p"];
        let web: mesh_identity::SpiffeId =
            "spiffe://cluster.local/ns/front/sa/web".parse().unwrap();
        let backend: mesh_identity::SpiffeId =
            "spiffe://cluster.local/ns/shop/sa/backend".parse().unwrap();
        let sources = [None, Some(&web), Some(&backend)];
        let calls = [("GET", "/"), ("POST", "/x")];
        t == &vec![Target::Gateway]
            && sources.iter().all(|source| {
                calls.iter().all(|(method, path)| {
                    matches!(
                        crate::authz::evaluate(
                            [p],
                            &crate::authz::Request {
                                source: *source,
                                source_ip: [10, 0, 0, 1].into(),
                                method,
                                path,
                                host: "h",
                                port: 80,
                                headers: &h,
                            }
                        ),
                        crate::authz::Decision::Deny { .. }
                    )
                })
            })
    }

    /// A policy the waypoint cannot read is NACKed and enforced fail closed, on every
    /// request through the waypoint; before, it was NACKed and absent.
    #[test]
    fn a_refused_policy_never_widens_access() {
        let (errors, cfg) = apply_policy(vec![0x0a, 0x09, b'x']);
        assert_eq!(errors.len(), 1);
        assert!(denies_everything(&cfg));
        // A message from a control plane that still sends JSON.
        let old = waypoint::L7Policy {
            namespace: "shop".into(),
            name: "p".into(),
            policy: None,
        };
        let (errors, cfg) = apply_policy(old.encode_to_vec());
        assert_eq!(errors.len(), 1);
        assert!(denies_everything(&cfg));
        // An ALLOW targeting a kind this side does not know: on every request.
        let (mut typed, _) = mesh_authz::k8s::read(
            "shop",
            "p",
            &Default::default(),
            Some(
                &serde_json::json!({"rules": [{"from": [{"source": {"namespaces": ["front"]}}]}]}),
            ),
        );
        typed.targets.push(waypoint::PolicyTarget {
            kind: 9,
            name: "x".into(),
        });
        let msg = waypoint::L7Policy {
            namespace: "shop".into(),
            name: "p".into(),
            policy: Some(typed),
        };
        let (errors, cfg) = apply_policy(msg.encode_to_vec());
        assert_eq!(errors.len(), 1);
        assert!(
            denies_everything(&cfg),
            "no caller, named or not, is allowed"
        );
        // Nor with the identity it names: on every Service now, it must allow nothing.
        let evil: mesh_identity::SpiffeId =
            "spiffe://cluster.local/ns/front/sa/evil".parse().unwrap();
        let h = http::HeaderMap::new();
        let (p, _) = &cfg.policies["shop/p"];
        assert!(matches!(
            crate::authz::evaluate(
                [p],
                &crate::authz::Request {
                    source: Some(&evil),
                    source_ip: [10, 0, 0, 1].into(),
                    method: "GET",
                    path: "/",
                    host: "h",
                    port: 80,
                    headers: &h,
                }
            ),
            crate::authz::Decision::Deny { .. }
        ));
    }

    /// A policy sent without a body is enforced fail closed as an undecodable one is,
    /// not skipped.
    #[test]
    fn a_policy_without_a_body_is_enforced_fail_closed() {
        let (errors, cfg) = apply_one(type_url::L7_POLICY, "shop/p", None);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].0, "shop/p");
        assert!(errors[0].1.contains("fail closed"), "{errors:?}");
        assert!(denies_everything(&cfg));
    }

    fn apply_route(route: &waypoint::HttpRoute) -> (Vec<(String, String)>, Config) {
        apply_one(type_url::HTTP_ROUTE, "shop/r", Some(route.encode_to_vec()))
    }

    /// A route is compiled once, when it arrives. What mesh-control reported is applied
    /// fail closed without a NACK; what this side cannot read (a filter kind from a newer
    /// control plane) is NACKed and fails closed too: the route is installed, its rule
    /// answers 500 rather than routing without the filter.
    #[test]
    fn routes_are_compiled_on_arrival_and_fail_closed() {
        let spec = serde_json::json!({
            "parentRefs": [{"kind": "Service", "name": "api"}],
            "rules": [{"filters": [{"type": "CORS", "cors": {}}], "backendRefs": [{"name": "a"}]}],
        });
        let none = |_: &str| None;
        let (typed, findings) = mesh_route::k8s::read_route(
            mesh_route::k8s::Kind::Http,
            "shop",
            "r",
            Some(&spec),
            &none,
        );
        assert_eq!(findings.len(), 1);
        let (errors, cfg) = apply_route(&typed);
        assert!(errors.is_empty(), "{errors:?}");
        let r = &cfg.routes["shop/r"];
        assert!(r.attaches_to("shop", "api", 80));
        assert!(matches!(
            route::decide(r, &r.rules[0], |_| 0),
            route::Decision::Fail(_)
        ));
        let mut newer = typed.clone();
        newer.rules[0].problems.clear();
        newer.rules[0].filters = vec![waypoint::RouteFilter { kind: None }];
        let (errors, cfg) = apply_route(&newer);
        assert_eq!(errors.len(), 1, "NACKed");
        let r = &cfg.routes["shop/r"];
        assert!(matches!(
            route::decide(r, &r.rules[0], |_| 0),
            route::Decision::Fail(_)
        ));
    }

    /// A route without a kind or a parent (an older control plane's, whose spec sat in a
    /// field now reserved) is NACKed with why, not installed to attach nowhere.
    #[test]
    fn routes_without_a_kind_or_a_parent_are_refused() {
        let parent = waypoint::RouteParent {
            namespace: "shop".into(),
            name: "api".into(),
            port: 0,
        };
        let old = waypoint::HttpRoute {
            namespace: "shop".into(),
            name: "r".into(),
            ..Default::default()
        };
        let (errors, cfg) = apply_route(&old);
        assert_eq!(errors.len(), 1, "NACKed");
        assert!(errors[0].1.contains("no route kind"), "{errors:?}");
        assert!(cfg.routes.is_empty());
        let no_parent = waypoint::HttpRoute {
            kind: waypoint::RouteKind::Http as i32,
            ..old.clone()
        };
        let (errors, cfg) = apply_route(&no_parent);
        assert!(
            errors.len() == 1 && errors[0].1.contains("no parent Service"),
            "{errors:?}"
        );
        assert!(cfg.routes.is_empty());
        let good = waypoint::HttpRoute {
            parents: vec![parent],
            ..no_parent
        };
        let (errors, cfg) = apply_route(&good);
        assert!(errors.is_empty(), "{errors:?}");
        assert!(cfg.routes["shop/r"].attaches_to("shop", "api", 80));
    }

    #[test]
    fn synced_once_addresses_routes_and_policies_have_each_been_received() {
        let lifecycle = Lifecycle::new();
        let mut a = Apply {
            config: Default::default(),
            lifecycle: lifecycle.clone(),
        };
        let response = |type_url: &str, resources| DeltaDiscoveryResponse {
            type_url: type_url.into(),
            resources,
            ..Default::default()
        };
        a.apply(&response(type_url::ADDRESS, vec![]));
        a.apply(&response(type_url::HTTP_ROUTE, vec![]));
        assert!(!lifecycle.synced(), "policies missing");
        assert!(lifecycle.not_ready().contains(&"policies not synced"));
        // A response with a refused policy is still the control plane's answer.
        let errors = a.apply(&response(
            type_url::L7_POLICY,
            vec![Resource {
                name: "back/bad".into(),
                resource: Some(mesh_proto::prost_types::Any {
                    type_url: type_url::L7_POLICY.into(),
                    value: vec![0x0a, 0x09, b'x'],
                }),
                ..Default::default()
            }],
        ));
        assert_eq!(errors.len(), 1);
        assert!(lifecycle.synced());
        assert_eq!(lifecycle.not_ready(), ["no certificate"]);
    }

    #[test]
    fn once_the_store_failed_closed_responses_are_nacked_and_the_waypoint_is_not_ready() {
        let config = Arc::new(ConfigStore::default());
        let lifecycle = Lifecycle::new();
        let mut a = Apply {
            config: config.clone(),
            lifecycle: lifecycle.clone(),
        };
        let routes = DeltaDiscoveryResponse {
            type_url: type_url::HTTP_ROUTE.into(),
            resources: vec![Resource {
                name: "shop/r".into(),
                ..Default::default()
            }],
            removed_resources: vec!["shop/old".into()],
            ..Default::default()
        };
        a.apply(&routes);
        assert!(!lifecycle.not_ready().iter().any(|w| w.contains("failed")));
        // A panic while some response was applied.
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _w = config.write().unwrap();
            panic!("bug while applying");
        }));
        let errors = a.apply(&routes);
        let names: Vec<&str> = errors.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["shop/r", "shop/old"], "all of it NACKed");
        assert!(errors[0].1.contains("failed closed"), "{errors:?}");
        assert!(
            lifecycle
                .not_ready()
                .contains(&"configuration failed closed (restart the waypoint)")
        );
    }
}
