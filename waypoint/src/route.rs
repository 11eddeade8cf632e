//! Gateway API routes as the waypoint applies them: the typed routes mesh-control sends,
//! compiled once per configuration version (`mesh_route::compiled`) and matched per
//! request. The model, its validation and its matching live once, in `mesh-route`.

pub use mesh_route::compiled::*;
pub use mesh_route::{fault_applies, parse_duration};

/// What a selected rule does with a request, before any I/O.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision<'a> {
    /// The rule (or the backend it picked) cannot be applied as written: Gateway API
    /// answers 500, never the request handled as if the unreadable part were absent.
    Fail(String),
    /// Answered by the rule's redirect; no backend needed.
    Redirect,
    /// Sent to this backend.
    Backend(&'a Backend),
}

/// Decides for `rule` of `route`; `roll(total)` is uniform in [0, total).
pub fn decide<'a>(route: &Route, rule: &'a Rule, roll: impl FnOnce(u32) -> u32) -> Decision<'a> {
    // Named only in a failure (nothing is formatted for a request that goes through).
    let name = RouteName(route);
    if let Some(why) = &rule.invalid {
        return Decision::Fail(format!("{name} {} cannot be applied: {why}", rule.at));
    }
    let total = rule.total_weight();
    if total == 0 {
        return match rule.redirect() {
            Some(_) => Decision::Redirect,
            None => Decision::Fail(format!("{name} {} has no backend", rule.at)),
        };
    }
    match rule.pick_backend(roll(total)) {
        Some(b) => match &b.invalid {
            Some(why) => Decision::Fail(format!(
                "{name} {}: backend {}/{} cannot be used: {why}",
                rule.at, b.namespace, b.name
            )),
            None => Decision::Backend(b),
        },
        None => Decision::Fail(format!("{name} {} has no backend", rule.at)),
    }
}

/// A route as failures name it: `HTTPRoute shop/r`.
struct RouteName<'a>(&'a Route);

impl std::fmt::Display for RouteName<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}/{}", self.0.kind, self.0.namespace, self.0.name)
    }
}

/// A route of `spec` (an HTTPRoute spec as JSON, in namespace `shop`, attached to Service
/// `api`), read and compiled as the control plane and the waypoint do: for unit tests.
#[cfg(test)]
pub(crate) fn compile_test_spec(mut spec: serde_json::Value) -> (Route, Vec<String>) {
    spec["parentRefs"] = serde_json::json!([{"kind": "Service", "name": "api"}]);
    let none = |_: &str| None;
    let (typed, _) =
        mesh_route::k8s::read_route(mesh_route::k8s::Kind::Http, "shop", "r", Some(&spec), &none);
    compile(&typed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_proto::waypoint as pb;

    fn compiled(json: serde_json::Value) -> Route {
        let none = |_: &str| None;
        let (typed, _) = mesh_route::k8s::read_route(
            mesh_route::k8s::Kind::Http,
            "shop",
            "r",
            Some(&json),
            &none,
        );
        compile(&typed).0
    }

    #[test]
    fn decisions() {
        let r = compiled(serde_json::json!({"rules": [
            {"backendRefs": [{"name": "a", "weight": 1}, {"kind": "ServiceImport", "name": "b", "weight": 1}]},
            {"filters": [{"type": "CORS", "cors": {}}], "backendRefs": [{"name": "a"}]},
            {"filters": [{"type": "RequestRedirect", "requestRedirect": {"scheme": "https"}}]},
            {"matches": [{"path": {"value": "/x"}}]},
        ]}));
        let d = |i: usize, roll: u32| decide(&r, &r.rules[i], |_| roll);
        assert!(matches!(d(0, 0), Decision::Backend(b) if b.name == "a"));
        assert!(
            matches!(d(0, 1), Decision::Fail(why) if why.contains("backend shop/b cannot be used")),
            "an unusable backend fails its share"
        );
        match d(1, 0) {
            Decision::Fail(why) => assert!(
                why.starts_with("HTTPRoute shop/r spec.rules[1] cannot be applied")
                    && why.contains("spec.rules[1].filters[0].type"),
                "{why}"
            ),
            other => panic!("an unknown filter must fail the rule, not be skipped: {other:?}"),
        }
        assert_eq!(d(2, 0), Decision::Redirect);
        assert!(matches!(d(3, 0), Decision::Fail(why) if why.contains("no backend")));
        let _ = pb::RouteKind::Http;
    }
}
