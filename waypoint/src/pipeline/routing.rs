//! Stage: which rule handles a request to a Service port, and where it goes: the first
//! matching rule by precedence; no route attached → the Service itself; routes attached
//! but no rule matches → 404 (Istio's answer).

use super::Local;
use crate::route::{self, RequestInfo, Rule};
use crate::snapshot::Snapshot;
use mesh_discovery::Service;
use std::sync::Arc;

/// Where a routed request goes, and the rule (if any) whose filters, retries and
/// timeouts apply.
#[derive(Debug)]
pub struct Plan {
    pub service: Arc<Service>,
    pub port: u16,
    pub rule: Option<Arc<Rule>>,
}

/// Plans the request `info` to `svc` on `port`; `roll(total)` is uniform in [0, total)
/// (the weighted backend choice).
pub fn plan(
    snap: &Snapshot,
    svc: &Arc<Service>,
    port: u16,
    info: &RequestInfo<'_>,
    roll: impl FnOnce(u32) -> u32,
) -> Result<Plan, Local> {
    let attached = snap.routes_for(&svc.namespace, &svc.name, port);
    match route::route_request(attached, info) {
        route::Routing::Unrouted => Ok(Plan {
            service: svc.clone(),
            port,
            rule: None,
        }),
        route::Routing::NoMatch => Err(Local::NoRouteMatch {
            namespace: svc.namespace.clone(),
            name: svc.name.clone(),
            port,
        }),
        route::Routing::Rule(r, rule) => match route::decide(r, rule, roll) {
            route::Decision::Fail(why) => Err(Local::RuleFailed {
                route: format!("{}/{}", r.namespace, r.name),
                why,
            }),
            route::Decision::Redirect => Ok(Plan {
                service: svc.clone(),
                port,
                rule: Some(rule.clone()),
            }),
            route::Decision::Backend(b) => match snap.service(&b.namespace, &b.name) {
                Some(s) => Ok(Plan {
                    service: s.clone(),
                    port: b.port.unwrap_or(port),
                    rule: Some(rule.clone()),
                }),
                None => Err(Local::UnknownBackend {
                    namespace: b.namespace.clone(),
                    name: b.name.clone(),
                }),
            },
        },
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::snapshot::Config;
    use mesh_discovery::State;
    use mesh_proto::workload as pb;

    pub fn service_address(name: &str) -> pb::Address {
        pb::Address {
            r#type: Some(pb::address::Type::Service(pb::Service {
                name: name.into(),
                namespace: "shop".into(),
                hostname: format!("{name}.shop.svc.cluster.local"),
                ports: vec![pb::Port {
                    service_port: 80,
                    target_port: 8080,
                    ..Default::default()
                }],
                ..Default::default()
            })),
        }
    }

    /// A snapshot with Services `api`, `v1`, `v2` and the route `spec` (as mesh-control
    /// reads it) attached to `api`.
    pub fn snapshot(spec: Option<serde_json::Value>) -> Snapshot {
        let mut cfg = Config::default();
        let mut st = State::default();
        for n in ["api", "v1", "v2"] {
            st.apply_address(&service_address(n)).unwrap();
        }
        cfg.discovery = st;
        if let Some(spec) = spec {
            cfg.routes
                .insert("shop/r".into(), route::compile_test_spec(spec).0);
        }
        Snapshot::compile(&cfg)
    }

    pub fn api(s: &Snapshot) -> Arc<Service> {
        s.service("shop", "api").unwrap().clone()
    }

    fn plan_for(s: &Snapshot, method: &str, path: &str, roll: u32) -> Result<Plan, Local> {
        let method: http::Method = method.parse().unwrap();
        let headers = http::HeaderMap::new();
        let info = RequestInfo {
            method: &method,
            path,
            query: None,
            headers: &headers,
        };
        plan(s, &api(s), 80, &info, |_| roll)
    }

    #[test]
    fn unrouted_goes_to_the_service_itself() {
        let s = snapshot(None);
        let p = plan_for(&s, "GET", "/", 0).unwrap();
        assert_eq!((p.service.name.as_str(), p.port), ("api", 80));
        assert!(p.rule.is_none());
    }

    #[test]
    fn rules_pick_weighted_backends_and_no_match_is_404() {
        let s = snapshot(Some(serde_json::json!({"rules": [
            {"matches": [{"path": {"type": "PathPrefix", "value": "/v"}}],
             "backendRefs": [{"name": "v1", "port": 8000, "weight": 1}, {"name": "v2", "weight": 3}]},
            {"matches": [{"path": {"value": "/ghost"}}], "backendRefs": [{"name": "ghost"}]},
            {"matches": [{"path": {"value": "/bad"}}], "filters": [{"type": "CORS", "cors": {}}], "backendRefs": [{"name": "v1"}]},
            {"matches": [{"path": {"value": "/moved"}}], "filters": [{"type": "RequestRedirect", "requestRedirect": {"scheme": "https"}}]},
        ]})));
        let p = plan_for(&s, "GET", "/v/x", 0).unwrap();
        assert_eq!((p.service.name.as_str(), p.port), ("v1", 8000));
        assert!(p.rule.is_some());
        let p = plan_for(&s, "GET", "/v/x", 1).unwrap();
        assert_eq!(
            (p.service.name.as_str(), p.port),
            ("v2", 80),
            "the roll past v1's weight"
        );
        assert_eq!(
            plan_for(&s, "GET", "/other", 0).unwrap_err(),
            Local::NoRouteMatch {
                namespace: "shop".into(),
                name: "api".into(),
                port: 80
            }
        );
        assert_eq!(
            plan_for(&s, "GET", "/ghost", 0).unwrap_err(),
            Local::UnknownBackend {
                namespace: "shop".into(),
                name: "ghost".into()
            }
        );
        match plan_for(&s, "GET", "/bad", 0).unwrap_err() {
            Local::RuleFailed { route, why } => {
                assert_eq!(route, "shop/r");
                assert!(why.contains("cannot be applied"), "{why}");
            }
            other => panic!("{other:?}"),
        }
        let p = plan_for(&s, "GET", "/moved", 0).unwrap();
        assert_eq!(p.service.name, "api", "a redirect needs no backend");
        assert!(p.rule.unwrap().redirect().is_some());
    }
}
