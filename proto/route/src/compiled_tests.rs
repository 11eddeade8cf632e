use super::*;
use crate::k8s::{Kind, read_route};
use serde_json::Value as Json;

/// As mesh-control reads it and the waypoint compiles it.
fn route_of(kind: Kind, json: &str) -> Route {
    let spec: Json = serde_json::from_str(json).unwrap();
    let none = |_: &str| None;
    let (typed, _) = read_route(kind, "shop", "r", Some(&spec), &none);
    let (route, errors) = compile(&typed);
    assert!(errors.is_empty(), "{errors:?}");
    route
}

fn route(json: &str) -> Route {
    route_of(Kind::Http, json)
}

fn req<'a>(
    method: &'a Method,
    path: &'a str,
    query: Option<&'a str>,
    headers: &'a HeaderMap,
) -> RequestInfo<'a> {
    RequestInfo {
        method,
        path,
        query,
        headers,
    }
}

const ROUTES: &str = r#"{
  "parentRefs": [{"kind": "Service", "name": "api", "port": 80}],
  "rules": [
    {"matches": [{"path": {"type": "PathPrefix", "value": "/v2"}}], "backendRefs": [{"name": "api-v2", "port": 80}]},
    {"matches": [{"path": {"type": "Exact", "value": "/v2/special"}}], "backendRefs": [{"name": "special", "port": 80}]},
    {"matches": [{"path": {"type": "RegularExpression", "value": "/items/[0-9]+"}}], "backendRefs": [{"name": "items", "port": 80}]},
    {"matches": [{"headers": [{"name": "x-canary", "value": "yes"}]}], "backendRefs": [{"name": "canary", "port": 80}]},
    {"matches": [{"method": "DELETE", "path": {"type": "PathPrefix", "value": "/"}}], "backendRefs": [{"name": "deleter", "port": 80}]},
    {"matches": [{"queryParams": [{"name": "debug", "value": "1"}]}], "backendRefs": [{"name": "debug", "port": 80}]},
    {"backendRefs": [{"name": "api-v1", "port": 80, "weight": 90}, {"name": "api-v2", "port": 80, "weight": 10}]}
  ]
}"#;

fn backend_in(
    routes: &[Route],
    path: &str,
    method: Method,
    query: Option<&str>,
    headers: &HeaderMap,
) -> String {
    let (_, rule) = select(routes, &req(&method, path, query, headers)).unwrap();
    rule.backends[0].name.clone()
}

fn backend(path: &str, method: Method, query: Option<&str>, headers: &HeaderMap) -> String {
    backend_in(&[route(ROUTES)], path, method, query, headers)
}

#[test]
fn match_kinds_and_precedence() {
    let h = HeaderMap::new();
    assert_eq!(backend("/v2/x", Method::GET, None, &h), "api-v2");
    assert_eq!(backend("/v2", Method::GET, None, &h), "api-v2");
    assert_eq!(
        backend("/v2special", Method::GET, None, &h),
        "api-v1",
        "prefix is per path element"
    );
    assert_eq!(
        backend("/v2/special", Method::GET, None, &h),
        "special",
        "exact beats prefix"
    );
    assert_eq!(backend("/items/42", Method::GET, None, &h), "items");
    assert_eq!(backend("/items/x", Method::GET, None, &h), "api-v1");
    assert_eq!(
        backend("/anything", Method::DELETE, None, &h),
        "deleter",
        "method match beats the bare default"
    );
    assert_eq!(backend("/x", Method::GET, Some("a=2&debug=1"), &h), "debug");
    let mut canary = HeaderMap::new();
    canary.insert("x-canary", "yes".parse().unwrap());
    assert_eq!(backend("/x", Method::GET, None, &canary), "canary");
    assert_eq!(backend("/x", Method::GET, None, &h), "api-v1");
}

#[test]
fn grpc_method_matches_route_calls() {
    let r = vec![route_of(
        Kind::Grpc,
        r#"{
      "parentRefs": [{"group": "", "kind": "Service", "name": "api"}],
      "rules": [
        {"matches": [{"method": {"service": "shop.v1.Cart", "method": "Add"}}], "backendRefs": [{"name": "cart-add", "port": 9090}]},
        {"matches": [{"method": {"service": "shop.v1.Cart"}}], "backendRefs": [{"name": "cart", "port": 9090}]},
        {"matches": [{"method": {"method": "Check"}}], "backendRefs": [{"name": "health", "port": 9090}]},
        {"matches": [{"method": {"type": "RegularExpression", "service": "shop\\.v1\\.Ord.*", "method": "L.st"}}], "backendRefs": [{"name": "orders", "port": 9090}]},
        {"backendRefs": [{"name": "api", "port": 9090}]}
      ]
    }"#,
    )];
    let h = HeaderMap::new();
    let to = |path: &str| backend_in(&r, path, Method::POST, None, &h);
    assert_eq!(to("/shop.v1.Cart/Add"), "cart-add");
    assert_eq!(to("/shop.v1.Cart/Remove"), "cart");
    assert_eq!(
        to("/shop.v1.CartAdmin/Add"),
        "api",
        "service match is exact"
    );
    assert_eq!(to("/grpc.health.v1.Health/Check"), "health");
    assert_eq!(to("/shop.v1.Orders/List"), "orders");
    assert_eq!(to("/shop.v1.Orders/Lost/x"), "api", "anchored");
    assert_eq!(to("/shop.v1.Pay/List"), "api");
}

/// A match that cannot be evaluated matches nothing; it never turns into a match-all
/// (before, a rule whose only match had been dropped would have matched every request).
#[test]
fn unevaluable_matches_match_nothing() {
    let r = vec![route(
        r#"{"rules": [
        {"matches": [{"path": {"type": "RegularExpression", "value": "("}}], "backendRefs": [{"name": "trap"}]},
        {"matches": [{"path": {"type": "Glob", "value": "/a*"}}, {"path": {"type": "Exact", "value": "/ok"}}], "backendRefs": [{"name": "ok"}]},
        {"matches": [{"headers": [{"type": "Fuzzy", "name": "x", "value": "1"}]}], "backendRefs": [{"name": "trap"}]},
        {"matches": [{"path": {"value": "/"}}], "backendRefs": [{"name": "default"}]}
    ]}"#,
    )];
    let mut h = HeaderMap::new();
    h.insert("x", "1".parse().unwrap());
    let to = |path: &str| backend_in(&r, path, Method::GET, None, &h);
    assert_eq!(to("/("), "default");
    assert_eq!(to("/abc"), "default");
    assert_eq!(to("/ok"), "ok", "the rule's other matches still apply");
    // And a rule with nothing but an unevaluable match is never selected.
    let only = vec![route(
        r#"{"rules": [{"matches": [{"path": {"type": "RegularExpression", "value": "("}}], "backendRefs": [{"name": "trap"}]}]}"#,
    )];
    assert!(select(&only, &req(&Method::GET, "/", None, &h)).is_none());
}

/// The rule a request selects carries why it cannot be applied: the waypoint answers 500.
#[test]
fn rules_with_unappliable_filters_are_invalid_not_filterless() {
    let r = route(
        r#"{"rules": [
        {"matches": [{"path": {"value": "/cors"}}], "filters": [{"type": "CORS", "cors": {}}], "backendRefs": [{"name": "a"}]},
        {"matches": [{"path": {"value": "/fault"}}], "filters": [{"type": "ExtensionRef", "extensionRef": {"group": "ambient-mesh.dev", "kind": "HTTPFault", "name": "gone"}}], "backendRefs": [{"name": "a"}]},
        {"matches": [{"path": {"value": "/fine"}}], "backendRefs": [{"name": "a"}, {"kind": "ServiceImport", "name": "b"}]}
    ]}"#,
    );
    let h = HeaderMap::new();
    let rule = |p: &str| {
        select([&r], &req(&Method::GET, p, None, &h))
            .unwrap()
            .1
            .clone()
    };
    let cors = rule("/cors");
    assert!(
        cors.invalid
            .as_deref()
            .unwrap()
            .contains("spec.rules[0].filters[0].type"),
        "{cors:?}"
    );
    assert!(
        rule("/fault")
            .invalid
            .as_deref()
            .unwrap()
            .contains("HTTPFault shop/gone")
    );
    let fine = rule("/fine");
    assert!(fine.invalid.is_none());
    assert!(fine.backends[0].invalid.is_none());
    assert!(fine.backends[1].invalid.is_some(), "its share gets 500");
    // A route-level problem makes every rule invalid.
    let whole = route(r#"{"rules": [{"backendRefs": [{"name": "a"}]}], "extra": 1}"#);
    assert!(
        whole.rules[0]
            .invalid
            .as_deref()
            .unwrap()
            .contains("spec.extra")
    );
}

/// What this side cannot read (a newer filter kind, a regex it rejects) fails closed
/// where it sits, and is reported for the NACK.
#[test]
fn what_the_waypoint_cannot_read_fails_closed() {
    let typed = pb::HttpRoute {
        namespace: "shop".into(),
        name: "r".into(),
        rules: vec![
            pb::RouteRule {
                filters: vec![pb::RouteFilter { kind: None }],
                backends: vec![pb::RouteBackend {
                    name: "a".into(),
                    weight: 1,
                    ..Default::default()
                }],
                ..Default::default()
            },
            pb::RouteRule {
                matches: vec![pb::RouteMatch {
                    path: Some(pb::PathMatch {
                        kind: Some(pb::path_match::Kind::Regex("(".into())),
                    }),
                    ..Default::default()
                }],
                ..Default::default()
            },
            pb::RouteRule {
                matches: vec![pb::RouteMatch {
                    path: Some(pb::PathMatch { kind: None }),
                    ..Default::default()
                }],
                ..Default::default()
            },
        ],
        ..Default::default()
    };
    let (r, errors) = compile(&typed);
    assert_eq!(errors.len(), 3, "{errors:?}");
    assert!(r.rules[0].invalid.is_some());
    assert!(r.rules[1].matches[0].never && r.rules[2].matches[0].never);
}

#[test]
fn weighted_split() {
    let r = route(ROUTES);
    let rule = r.rules.last().unwrap();
    assert_eq!(rule.total_weight(), 100);
    let picks: Vec<&str> = (0..100)
        .map(|i| rule.pick_backend(i).unwrap().name.as_str())
        .collect();
    assert_eq!(picks.iter().filter(|n| **n == "api-v1").count(), 90);
    assert_eq!(picks.iter().filter(|n| **n == "api-v2").count(), 10);
}

#[test]
fn attachment() {
    let r = route(ROUTES);
    assert!(r.attaches_to("shop", "api", 80));
    assert!(!r.attaches_to("shop", "api", 81));
    assert!(!r.attaches_to("other", "api", 80));
    let any_port = route(r#"{"parentRefs": [{"kind": "Service", "name": "api"}]}"#);
    assert!(any_port.attaches_to("shop", "api", 8080));
    // A parent in another namespace (from a control plane that did not drop it) attaches
    // nowhere.
    let foreign = pb::HttpRoute {
        namespace: "evil".into(),
        name: "r".into(),
        parents: vec![pb::RouteParent {
            namespace: "bank".into(),
            name: "payments".into(),
            port: 0,
        }],
        ..Default::default()
    };
    assert!(!compile(&foreign).0.attaches_to("bank", "payments", 80));
}

#[test]
fn redirects_and_rewrites() {
    let r = Redirect {
        scheme: Some("https".into()),
        port: Some(443),
        status_code: 301,
        ..Default::default()
    };
    assert_eq!(
        redirect(&r, "http", "api:80", "/a", Some("x=1"), None),
        (301, "https://api/a?x=1".into())
    );
    let r = Redirect {
        hostname: Some("new".into()),
        port: Some(8080),
        path: Some(PathModifier::ReplacePrefixMatch("/v2".into())),
        status_code: 302,
        ..Default::default()
    };
    assert_eq!(
        redirect(&r, "http", "api", "/v1/items", None, Some("/v1")),
        (302, "http://new:8080/v2/items".into())
    );
    let full = PathModifier::ReplaceFullPath("/fixed".into());
    assert_eq!(modify_path(&full, "/anything", None), "/fixed");
    let prefix = PathModifier::ReplacePrefixMatch("/".into());
    assert_eq!(modify_path(&prefix, "/api/users", Some("/api")), "/users");
    assert_eq!(modify_path(&prefix, "/api", Some("/api")), "/");
    // Compiled from the wire, with the default status.
    let r = route(
        r#"{"rules": [{"filters": [{"type": "RequestRedirect", "requestRedirect": {"path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/new"}}}]}]}"#,
    );
    assert_eq!(
        r.rules[0].redirect(),
        Some(&Redirect {
            path: Some(PathModifier::ReplacePrefixMatch("/new".into())),
            status_code: 302,
            ..Default::default()
        })
    );
}

#[test]
fn header_filters_faults_timeouts_and_retries_compile() {
    let r = route(
        r#"{"rules": [{"filters": [
        {"type": "RequestHeaderModifier", "requestHeaderModifier": {"set": [{"name": "x-set", "value": "a"}], "add": [{"name": "x-keep", "value": "2"}], "remove": ["x-drop"]}}],
        "backendRefs": [{"name": "a"}],
        "timeouts": {"request": "200ms", "backendRequest": "0s"},
        "retry": {"codes": [503]}}]}"#,
    );
    let rule = &r.rules[0];
    let mut h = HeaderMap::new();
    h.insert("x-drop", "1".parse().unwrap());
    h.insert("x-keep", "1".parse().unwrap());
    let Filter::RequestHeaders(m) = &rule.filters[0] else {
        panic!("{:?}", rule.filters)
    };
    m.apply(&mut h);
    assert!(h.get("x-drop").is_none());
    assert_eq!(h.get("x-set").unwrap(), "a");
    assert_eq!(h.get_all("x-keep").iter().count(), 2);
    assert_eq!(rule.request_timeout, Some(Duration::from_millis(200)));
    assert_eq!(rule.backend_request_timeout, None, "0s disables it");
    assert_eq!(
        rule.retry,
        Some(Retry {
            codes: vec![503],
            attempts: 2,
            backoff: Duration::from_millis(25)
        })
    );
    let fault = pb::HttpRoute {
        rules: vec![pb::RouteRule {
            filters: vec![pb::RouteFilter {
                kind: Some(pb::route_filter::Kind::Fault(pb::HttpFault {
                    delay: Some(pb::FaultDelay {
                        fixed_delay_ms: 300,
                        percentage: None,
                    }),
                    abort: Some(pb::FaultAbort {
                        http_status: 503,
                        percentage: Some(10.0),
                    }),
                })),
            }],
            ..Default::default()
        }],
        ..Default::default()
    };
    let (r, errors) = compile(&fault);
    assert!(errors.is_empty());
    assert_eq!(
        r.rules[0].fault(),
        Some(&Fault {
            delay: Some((Duration::from_millis(300), None)),
            abort: Some((503, Some(10.0)))
        })
    );
}

/// Once a route attaches to a Service port, a request none of its rules matches gets 404
/// (Istio's answer): never the Service's default route, which would let through what a
/// match that cannot be evaluated, or a method match, was meant to keep out.
#[test]
fn a_request_no_rule_matches_is_not_sent_to_the_service() {
    let routes = vec![route(
        r#"{"parentRefs": [{"kind": "Service", "name": "api"}], "rules": [
        {"matches": [{"path": {"type": "RegularExpression", "value": "/admin/\\p{L}+"}}], "backendRefs": [{"name": "admin"}]},
        {"matches": [{"method": "GET", "path": {"type": "PathPrefix", "value": "/read"}}], "backendRefs": [{"name": "reader"}]}
    ]}"#,
    )];
    let h = HeaderMap::new();
    let routed =
        |method: Method, path: &str| match route_request(&routes, &req(&method, path, None, &h)) {
            Routing::Unrouted => "unrouted".to_string(),
            Routing::NoMatch => "404".to_string(),
            Routing::Rule(_, rule) => rule.backends[0].name.clone(),
        };
    assert_eq!(
        routed(Method::GET, "/admin/x"),
        "404",
        "an unevaluable match keeps its requests out"
    );
    assert_eq!(
        routed(Method::POST, "/read/x"),
        "404",
        "a GET-only rule keeps POST out"
    );
    assert_eq!(routed(Method::GET, "/read/x"), "reader");
    let none: Vec<Route> = Vec::new();
    assert!(matches!(
        route_request(&none, &req(&Method::GET, "/admin/x", None, &h)),
        Routing::Unrouted
    ));
}

/// A header sent twice is matched as authorization sees it: both values joined with a
/// comma (Envoy's view), never just the first copy.
#[test]
fn repeated_headers_are_matched_joined() {
    let routes = vec![route(
        r#"{"parentRefs": [{"kind": "Service", "name": "api"}], "rules": [
        {"matches": [{"headers": [{"name": "x-role", "value": "user"}]}], "backendRefs": [{"name": "user"}]},
        {"matches": [{"headers": [{"name": "x-role", "value": "user,admin"}]}], "backendRefs": [{"name": "joined"}]}
    ]}"#,
    )];
    let mut h = HeaderMap::new();
    h.append("x-role", "user".parse().unwrap());
    h.append("x-role", "admin".parse().unwrap());
    assert_eq!(backend_in(&routes, "/", Method::GET, None, &h), "joined");
    let mut one = HeaderMap::new();
    one.insert("x-role", "user".parse().unwrap());
    assert_eq!(backend_in(&routes, "/", Method::GET, None, &one), "user");
}
