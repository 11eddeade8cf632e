use super::*;
use serde_json::json;

fn no_faults(_: &str) -> Option<&'static Value> {
    None
}

fn http(spec: Value) -> (pb::HttpRoute, Vec<Finding>) {
    read_route(Kind::Http, "shop", "r", Some(&spec), &no_faults)
}

fn fields(f: &[Finding]) -> Vec<&str> {
    f.iter().map(|f| f.field.as_str()).collect()
}

#[test]
fn a_valid_route_reads_whole_without_findings() {
    let (r, f) = http(json!({
        "parentRefs": [{"group": "", "kind": "Service", "name": "api", "port": 80},
                       {"kind": "Gateway", "name": "ingress"}],
        "hostnames": ["api.example"],
        "rules": [
            {"name": "v2",
             "matches": [{"path": {"type": "PathPrefix", "value": "/v2"}, "method": "GET",
                          "headers": [{"name": "X-Canary", "value": "yes"}],
                          "queryParams": [{"type": "RegularExpression", "name": "q", "value": "[0-9]+"}]}],
             "filters": [
                {"type": "RequestHeaderModifier", "requestHeaderModifier": {"set": [{"name": "x-a", "value": "1"}], "remove": ["x-b"]}},
                {"type": "URLRewrite", "urlRewrite": {"hostname": "b", "path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/"}}},
                {"type": "RequestMirror", "requestMirror": {"backendRef": {"name": "mirror", "port": 80}}}],
             "backendRefs": [{"name": "api-v2", "port": 80, "weight": 90}, {"name": "api-v1", "namespace": "shop"}],
             "timeouts": {"request": "1m30s", "backendRequest": "500ms"},
             "retry": {"codes": [503], "attempts": 3, "backoff": "10ms"}},
            {"filters": [{"type": "RequestRedirect", "requestRedirect": {"scheme": "https", "port": 8443, "statusCode": 301}}]}
        ]
    }));
    assert!(f.is_empty(), "{f:?}");
    assert!(problems(&r).is_empty());
    assert_eq!(
        r.parents,
        vec![pb::RouteParent {
            namespace: "shop".into(),
            name: "api".into(),
            port: 80
        }],
        "only Service parents"
    );
    let rule = &r.rules[0];
    assert_eq!(rule.name, "v2");
    let m = &rule.matches[0];
    assert_eq!(
        m.path,
        Some(pb::PathMatch {
            kind: Some(pb::path_match::Kind::Prefix("/v2".into()))
        })
    );
    assert_eq!(m.method, "GET");
    assert_eq!(m.headers[0].name, "x-canary", "header names lowercased");
    assert_eq!(
        m.query_params[0].kind,
        Some(pb::value_match::Kind::Regex("[0-9]+".into()))
    );
    assert_eq!(rule.filters.len(), 3);
    assert_eq!(rule.backends[0].weight, 90);
    assert_eq!(
        (
            rule.backends[1].namespace.as_str(),
            rule.backends[1].weight,
            rule.backends[1].port
        ),
        ("shop", 1, 0)
    );
    assert_eq!(rule.request_timeout_ms, Some(90_000));
    assert_eq!(rule.backend_request_timeout_ms, Some(500));
    let retry = rule.retry.as_ref().unwrap();
    assert_eq!(
        (retry.codes.clone(), retry.attempts, retry.backoff_ms),
        (vec![503], Some(3), Some(10))
    );
    assert!(matches!(
        r.rules[1].filters[0].kind,
        Some(pb::route_filter::Kind::RequestRedirect(
            pb::RequestRedirect {
                status_code: 301,
                port: 8443,
                ..
            }
        ))
    ));
}

/// An unknown or unsupported filter is a problem of its rule (500), never skipped.
#[test]
fn unknown_filters_are_problems_of_their_rule_with_their_field() {
    let (r, f) = http(json!({"rules": [
        {"backendRefs": [{"name": "a"}]},
        {"matches": [{"path": {"value": "/x"}}],
         "filters": [{"type": "CORS", "cors": {"allowOrigins": ["*"]}}],
         "backendRefs": [{"name": "a"}]},
        {"filters": [{"type": "Teleport"}]},
    ]}));
    assert!(r.rules[0].problems.is_empty());
    assert_eq!(r.rules[1].problems.len(), 1);
    assert!(r.rules[1].filters.is_empty());
    assert_eq!(
        r.rules[2].problems[0].field,
        "spec.rules[2].filters[0].type"
    );
    assert_eq!(
        fields(&f),
        [
            "spec.rules[1].filters[0].type",
            "spec.rules[2].filters[0].type"
        ]
    );
    assert_eq!(
        (f[0].kind, f[0].namespace.as_str(), f[0].name.as_str()),
        ("HTTPRoute", "shop", "r")
    );
    assert!(f[0].message.contains("500"), "{}", f[0].message);
    assert_eq!(f[0].object(), "HTTPRoute shop/r");
}

#[test]
fn extension_refs_resolve_to_faults_or_fail_their_rule() {
    let slow = json!({"delay": {"fixedDelay": "2s", "percentage": {"value": 50}}, "abort": {"httpStatus": 503}});
    let broken = json!({"abort": {"httpStatus": 42}});
    let faults = |n: &str| match n {
        "slow" => Some(&slow),
        "broken" => Some(&broken),
        _ => None,
    };
    let ext = |name: &str| json!({"filters": [{"type": "ExtensionRef", "extensionRef": {"group": "ambient-mesh.dev", "kind": "HTTPFault", "name": name}}]});
    let spec = json!({"rules": [ext("slow"), ext("nope"), ext("broken"),
        {"filters": [{"type": "ExtensionRef", "extensionRef": {"group": "example.com", "kind": "Lua", "name": "x"}}]}]});
    let (r, f) = read_route(Kind::Http, "shop", "chaos", Some(&spec), &faults);
    assert_eq!(
        r.rules[0].filters[0].kind,
        Some(pb::route_filter::Kind::Fault(pb::HttpFault {
            delay: Some(pb::FaultDelay {
                fixed_delay_ms: 2000,
                percentage: Some(50.0)
            }),
            abort: Some(pb::FaultAbort {
                http_status: 503,
                percentage: None
            }),
        }))
    );
    for i in 1..=3 {
        assert!(
            r.rules[i].filters.is_empty() && !r.rules[i].problems.is_empty(),
            "rule {i}"
        );
    }
    assert_eq!(
        fields(&f),
        [
            "spec.rules[1].filters[0].extensionRef.name",
            "spec.rules[2].filters[0].extensionRef.name",
            "spec.rules[3].filters[0].extensionRef"
        ]
    );
    assert!(
        f[0].message.contains("HTTPFault shop/nope does not exist"),
        "{}",
        f[0].message
    );
    assert!(
        f[1].message.contains("spec.abort.httpStatus"),
        "{}",
        f[1].message
    );
}

/// A match that cannot be evaluated matches nothing (a problem of the match, not of the
/// rule, whose other matches still apply); it never becomes a match-all.
#[test]
fn bad_matches_are_problems_of_the_match() {
    let (r, f) = http(json!({"rules": [{"matches": [
        {"path": {"type": "RegularExpression", "value": "("}},
        {"path": {"type": "Glob", "value": "/a*"}},
        {"headers": [{"type": "RegularExpression", "name": "x", "value": "[z-a]"}]},
        {"method": "FETCH"},
        {"colour": "red"},
        {"path": {"type": "Exact", "value": "/ok"}},
    ]}]}));
    let m = &r.rules[0].matches;
    assert!(m[..5].iter().all(|m| !m.problems.is_empty()));
    assert!(m[5].problems.is_empty() && r.rules[0].problems.is_empty());
    assert_eq!(
        fields(&f),
        [
            "spec.rules[0].matches[0].path.value",
            "spec.rules[0].matches[1].path.type",
            "spec.rules[0].matches[2].headers[0].value",
            "spec.rules[0].matches[3].method",
            "spec.rules[0].matches[4].colour",
        ]
    );
    assert_eq!(f[1].severity, Severity::Unsupported);
}

#[test]
fn bad_rule_fields_backends_and_redirects_have_their_field() {
    let (r, f) = http(json!({"rules": [
        {"timeouts": {"request": "ten"}},
        {"retry": {"codes": [200], "backoff": "1x"}},
        {"filters": [{"type": "RequestRedirect", "requestRedirect": {"statusCode": 1000}}]},
        {"filters": [{"type": "RequestRedirect", "requestRedirect": {"scheme": "javascript"}}]},
        {"filters": [{"type": "RequestRedirect", "requestRedirect": {"hostname": "a\nb"}}]},
        {"filters": [{"type": "URLRewrite", "urlRewrite": {"path": {"type": "ReplaceFullPath", "replaceFullPath": "/x y"}}}]},
        {"filters": [{"type": "RequestHeaderModifier", "requestHeaderModifier": {"set": [{"name": "bad name", "value": "1"}]}}]},
        {"filters": [{"type": "RequestHeaderModifier"}]},
        {"backendRefs": [{"kind": "ServiceImport", "name": "x"}, {"name": "y", "filters": [{"type": "RequestHeaderModifier"}]}, {"name": "z", "weight": -1}]},
        {"sessionPersistence": {"type": "Cookie"}},
    ], "tls": {}}));
    assert!(!r.problems.is_empty(), "unknown spec field");
    assert_eq!(
        fields(&f),
        [
            "spec.tls",
            "spec.rules[0].timeouts.request",
            "spec.rules[1].retry.codes[0]",
            "spec.rules[1].retry.backoff",
            "spec.rules[2].filters[0].requestRedirect.statusCode",
            "spec.rules[3].filters[0].requestRedirect.scheme",
            "spec.rules[4].filters[0].requestRedirect.hostname",
            "spec.rules[5].filters[0].urlRewrite.path.replaceFullPath",
            "spec.rules[6].filters[0].requestHeaderModifier.set[0].name",
            "spec.rules[7].filters[0].requestHeaderModifier",
            "spec.rules[8].backendRefs[0]",
            "spec.rules[8].backendRefs[1].filters",
            "spec.rules[8].backendRefs[2].weight",
            "spec.rules[9].sessionPersistence",
        ]
    );
    for i in 0..8 {
        assert!(
            !r.rules[i].problems.is_empty() && r.rules[i].filters.is_empty(),
            "rule {i}"
        );
    }
    let b = &r.rules[8].backends;
    assert!(r.rules[8].problems.is_empty());
    assert!(
        b.iter().all(|b| !b.problems.is_empty()),
        "the backends carry them"
    );
    assert!(r.rules[9].problems.is_empty(), "a note only");
    assert_eq!(f.last().unwrap().severity, Severity::Note);
}

#[test]
fn grpc_routes_read_typed_method_matches() {
    let spec = json!({
        "parentRefs": [{"kind": "Service", "name": "api"}],
        "rules": [
            {"matches": [{"method": {"service": "shop.v1.Cart", "method": "Add"}, "headers": [{"name": "x-v", "value": "2"}]}],
             "filters": [{"type": "RequestHeaderModifier", "requestHeaderModifier": {"add": [{"name": "x-via", "value": "wp"}]}}],
             "backendRefs": [{"name": "cart", "port": 9090}]},
            {"matches": [{"method": {"type": "Prefix", "service": "a"}}, {"method": {"service": "a/b"}},
                         {"method": {"type": "RegularExpression", "service": "("}}]},
            {"filters": [{"type": "URLRewrite", "urlRewrite": {"hostname": "x"}}]},
            {"timeouts": {"request": "1s"}},
        ]
    });
    let (r, f) = read_route(Kind::Grpc, "shop", "g", Some(&spec), &no_faults);
    assert_eq!(r.kind, pb::RouteKind::Grpc as i32);
    assert_eq!(
        r.rules[0].matches[0].grpc_method,
        Some(pb::GrpcMethodMatch {
            r#type: pb::GrpcMatchType::Exact as i32,
            service: "shop.v1.Cart".into(),
            method: "Add".into()
        })
    );
    assert!(r.rules[0].problems.is_empty() && r.rules[0].matches[0].problems.is_empty());
    assert!(r.rules[1].matches.iter().all(|m| !m.problems.is_empty()));
    assert_eq!(
        fields(&f),
        [
            "spec.rules[1].matches[0].method.type",
            "spec.rules[1].matches[1].method.service",
            "spec.rules[1].matches[2].method.service",
            "spec.rules[2].filters[0].type",
            "spec.rules[3].timeouts",
        ]
    );
    assert!(f.iter().all(|f| f.kind == "GRPCRoute"));
}

#[test]
fn faults_read_with_their_fields() {
    for (spec, field) in [
        (json!({}), "spec"),
        (
            json!({"delay": {"fixedDelay": "soon"}}),
            "spec.delay.fixedDelay",
        ),
        (
            json!({"delay": {"percentage": {"value": 5}}}),
            "spec.delay.fixedDelay",
        ),
        (
            json!({"abort": {"httpStatus": 42}}),
            "spec.abort.httpStatus",
        ),
        (
            json!({"abort": {"httpStatus": 503, "percentage": {"value": 101}}}),
            "spec.abort.percentage.value",
        ),
        (
            json!({"abort": {"httpStatus": 503, "precentage": {"value": 1}}}),
            "spec.abort.precentage",
        ),
        (json!("x"), "spec"),
    ] {
        let (fault, f) = read_fault("shop", "f", Some(&spec));
        assert!(fault.is_none(), "{spec}");
        assert_eq!(f[0].field, field, "{spec}: {f:?}");
        assert_eq!(f[0].object(), "HTTPFault shop/f");
    }
    let (fault, f) = read_fault(
        "shop",
        "f",
        Some(&json!({"abort": {"httpStatus": 503, "percentage": {"value": 10}}})),
    );
    assert!(f.is_empty());
    assert_eq!(fault.unwrap().abort.unwrap().percentage, Some(10.0));
}

#[test]
fn parent_refs() {
    let (r, f) = http(json!({"parentRefs": [
        {"kind": "Service", "name": "a", "namespace": "shop", "sectionName": "http"},
        {"kind": "Service"},
        {"kind": "Service", "name": "b", "port": 70000},
        "api",
    ]}));
    assert_eq!(r.parents.len(), 1);
    assert_eq!(
        (r.parents[0].namespace.as_str(), r.parents[0].port),
        ("shop", 0)
    );
    assert_eq!(
        fields(&f),
        [
            "spec.parentRefs[0].sectionName",
            "spec.parentRefs[1].name",
            "spec.parentRefs[2].port",
            "spec.parentRefs[3]",
        ]
    );
    assert!(r.rules.is_empty() && r.problems.is_empty());
}

/// A route in one namespace cannot take over a Service in another (`evil` routing
/// `bank/payments`' /transfer to its own sniffer), nor send to another namespace's
/// Service without a ReferenceGrant.
#[test]
fn other_namespaces_are_out_of_reach() {
    let (r, f) = http(json!({
        "parentRefs": [{"kind": "Service", "namespace": "bank", "name": "payments"}],
        "rules": [{"matches": [{"path": {"type": "Exact", "value": "/transfer"}}],
                   "backendRefs": [{"name": "sniffer"}, {"namespace": "bank", "name": "ledger"}]}]
    }));
    assert!(r.parents.is_empty(), "{:?}", r.parents);
    assert_eq!(f[0].field, "spec.parentRefs[0].namespace");
    assert_eq!(f[0].severity, Severity::Unsupported);
    assert!(
        f[0].message.contains("consumer routes (GAMMA)"),
        "{}",
        f[0].message
    );
    let backends = &r.rules[0].backends;
    assert!(backends[0].problems.is_empty(), "same namespace: usable");
    assert_eq!(
        backends[1].problems[0].field,
        "spec.rules[0].backendRefs[1].namespace"
    );
    assert!(
        backends[1].problems[0]
            .message
            .contains("needs a ReferenceGrant, not supported"),
        "{:?}",
        backends[1].problems
    );
    // As the waypoint compiles it: attached nowhere; the foreign backend's share fails.
    let (route, _) = crate::compiled::compile(&r);
    assert!(!route.attaches_to("bank", "payments", 80));
    assert!(route.rules[0].backends[1].invalid.is_some());
}
