//! The waypoint's request handling up to the upstream: an HTTPRoute spec read as
//! mesh-control reads it (`mesh_route::k8s`) and compiled as the waypoint compiles it, and
//! an HTTP/1.1 request head (parsed with httparse, hyper's parser) routed through it
//! (`select`, `decide`, prefix, rewrite, redirect, header modifiers) as `proxy.rs` does.
//! Input: `ROUTE_SPEC_JSON \0 HEAD`, or a bare HEAD against built-in routes. Never
//! panics, and what the proxy turns into a response or a URI is valid.
#![no_main]

use libfuzzer_sys::fuzz_target;
use waypoint::route::{self, RequestInfo, Route};

/// Read and compiled as mesh-control and the waypoint do; None: not JSON.
fn compiled(json: &str) -> Option<Route> {
    let spec: serde_json::Value = serde_json::from_str(json).ok()?;
    let none = |_: &str| None;
    let (typed, _) =
        mesh_route::k8s::read_route(mesh_route::k8s::Kind::Http, "ns", "r", Some(&spec), &none);
    Some(route::compile(&typed).0)
}

const ROUTES: &str = r#"{"rules": [
 {"matches": [{"path": {"type": "PathPrefix", "value": "/api/"}, "method": "GET",
               "headers": [{"name": "x-v", "value": "2"}], "queryParams": [{"name": "q", "value": "1"}]}],
  "filters": [{"type": "URLRewrite", "urlRewrite": {"hostname": "b", "path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/v2"}}},
              {"type": "RequestHeaderModifier", "requestHeaderModifier": {"set": [{"name": "x-a", "value": "1"}], "remove": ["x-b"]}}],
  "backendRefs": [{"name": "b", "port": 80, "weight": 3}, {"name": "c", "port": 80}]},
 {"matches": [{"path": {"type": "RegularExpression", "value": "/r/[0-9]+"}}],
  "filters": [{"type": "RequestRedirect", "requestRedirect": {"scheme": "https", "port": 8443, "statusCode": 301,
               "path": {"type": "ReplaceFullPath", "replaceFullPath": "/moved"}}}]},
 {"matches": [{"path": {"type": "Exact", "value": "/"}}, {"headers": [{"type": "RegularExpression", "name": "h", "value": "a.*"}]}],
  "backendRefs": [{"name": "d", "port": 80}]}
]}"#;

fuzz_target!(|data: &[u8]| {
    let (routes, head) = match data.iter().position(|b| *b == 0) {
        Some(i) => {
            let Ok(json) = std::str::from_utf8(&data[..i]) else {
                return;
            };
            let Some(r) = compiled(json) else {
                return;
            };
            (vec![r], &data[i + 1..])
        }
        None => (vec![compiled(ROUTES).expect("built-in routes")], data),
    };
    let mut raw = [httparse::EMPTY_HEADER; 32];
    let mut parsed = httparse::Request::new(&mut raw);
    let Ok(httparse::Status::Complete(_)) = parsed.parse(head) else {
        return;
    };
    let (Some(method), Some(target)) = (parsed.method, parsed.path) else {
        return;
    };
    let (Ok(method), Ok(uri)) = (
        http::Method::from_bytes(method.as_bytes()),
        target.parse::<http::Uri>(),
    ) else {
        return;
    };
    let mut headers = http::HeaderMap::new();
    for h in parsed.headers.iter() {
        if let (Ok(n), Ok(v)) = (
            http::HeaderName::from_bytes(h.name.as_bytes()),
            http::HeaderValue::from_bytes(h.value),
        ) {
            headers.append(n, v);
        }
    }
    let path = uri.path();
    let info = RequestInfo {
        method: &method,
        path,
        query: uri.query(),
        headers: &headers,
    };
    let Some((r, rule)) = route::select(&routes, &info) else {
        return;
    };
    let total = rule.total_weight();
    if total > 0 {
        assert!(rule.pick_backend(total - 1).is_some());
    }
    let _ = route::decide(r, rule, |t| t - 1);
    let prefix = rule.matched_prefix(&info);
    let host = headers
        .get("host")
        .and_then(|h| h.to_str().ok())
        .unwrap_or("svc.ns.svc.cluster.local");
    for f in &rule.filters {
        match f {
            route::Filter::Redirect(r) => {
                let (code, location) = route::redirect(r, "http", host, path, uri.query(), prefix);
                // proxy.rs builds the response with these and expects it to be valid.
                http::Response::builder()
                    .status(code)
                    .header(http::header::LOCATION, location)
                    .body(())
                    .expect("a valid redirect response");
            }
            route::Filter::RequestHeaders(m) => m.apply(&mut headers.clone()),
            route::Filter::Rewrite(rw) => {
                if let Some(pm) = &rw.path {
                    let _ = route::modify_path(pm, path, prefix);
                }
            }
            _ => {}
        }
    }
});
