//! GRPCRoute (gateway.networking.k8s.io/v1) for waypoints, by translation: a gRPC call is
//! an HTTP/2 POST to `/<service>/<method>`, so each GRPCRoute becomes the equivalent
//! HTTPRoute spec, which the waypoint already routes (weights, header filters, mirrors,
//! timeouts). Method matches become path matches; header matches, filters and backends
//! carry over, as their shapes are the same in both APIs.

use serde_json::{Map, Value, json};

/// Escapes a literal for a RE2-style regular expression.
fn regex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if "\\.+*?()|[]{}^$#&-~".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// GRPCMethodMatch → HTTPPathMatch (None: any method of any service).
fn path_match(method: &Value) -> Result<Option<Value>, String> {
    let service = method["service"].as_str().filter(|s| !s.is_empty());
    let name = method["method"].as_str().filter(|s| !s.is_empty());
    let exact = match method["type"].as_str().unwrap_or("Exact") {
        "Exact" => true,
        "RegularExpression" => false,
        other => return Err(format!("method match type {other} is not supported")),
    };
    for part in [service, name].into_iter().flatten() {
        if exact && part.contains('/') {
            return Err(format!("\"{part}\" contains '/'"));
        }
    }
    Ok(match (exact, service, name) {
        (_, None, None) => None,
        (true, Some(s), Some(m)) => Some(json!({"type": "Exact", "value": format!("/{s}/{m}")})),
        (true, Some(s), None) => Some(json!({"type": "PathPrefix", "value": format!("/{s}")})),
        (true, None, Some(m)) => Some(
            json!({"type": "RegularExpression", "value": format!("/[^/]+/{}", regex_escape(m))}),
        ),
        (false, s, m) => Some(json!({
            "type": "RegularExpression",
            "value": format!("/{}/{}", s.unwrap_or("[^/]+"), m.unwrap_or("[^/]+")),
        })),
    })
}

fn translate_match(m: &Value) -> Result<Value, String> {
    let mut out = Map::new();
    if let Some(path) = path_match(&m["method"])? {
        out.insert("path".into(), path);
    }
    if let Some(headers) = m.get("headers") {
        out.insert("headers".into(), headers.clone());
    }
    Ok(Value::Object(out))
}

/// The HTTPRoute spec equivalent to a GRPCRoute spec.
pub fn to_http_route_spec(grpc: &Value) -> Result<Value, String> {
    let mut out = Map::new();
    for key in ["parentRefs", "hostnames"] {
        if let Some(v) = grpc.get(key) {
            out.insert(key.into(), v.clone());
        }
    }
    let mut rules = Vec::new();
    for (i, rule) in grpc["rules"].as_array().into_iter().flatten().enumerate() {
        let mut r = Map::new();
        if let Some(matches) = rule.get("matches").and_then(Value::as_array) {
            let translated = matches
                .iter()
                .map(translate_match)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("rules[{i}].matches: {e}"))?;
            r.insert("matches".into(), Value::Array(translated));
        }
        for key in ["filters", "backendRefs", "name"] {
            if let Some(v) = rule.get(key) {
                r.insert(key.into(), v.clone());
            }
        }
        rules.push(Value::Object(r));
    }
    out.insert("rules".into(), Value::Array(rules));
    Ok(Value::Object(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_matches_become_path_matches() {
        let spec = json!({
            "parentRefs": [{"group": "", "kind": "Service", "name": "api"}],
            "rules": [
                {"matches": [{"method": {"service": "shop.v1.Cart", "method": "Add"}}],
                 "backendRefs": [{"name": "cart-v2", "port": 9090}]},
                {"matches": [{"method": {"service": "shop.v1.Cart"}, "headers": [{"name": "x-canary", "value": "1"}]}],
                 "filters": [{"type": "RequestHeaderModifier", "requestHeaderModifier": {"add": [{"name": "x-via", "value": "wp"}]}}],
                 "backendRefs": [{"name": "cart-v1", "port": 9090, "weight": 90}, {"name": "cart-v2", "port": 9090, "weight": 10}]},
                {"matches": [{"method": {"method": "Check"}}, {"method": {"type": "RegularExpression", "service": "grpc\\.health\\..*"}}],
                 "backendRefs": [{"name": "health", "port": 9090}]},
                {"backendRefs": [{"name": "api", "port": 9090}]},
            ],
        });
        let http = to_http_route_spec(&spec).unwrap();
        assert_eq!(http["parentRefs"], spec["parentRefs"]);
        let rules = http["rules"].as_array().unwrap();
        assert_eq!(
            rules[0]["matches"][0]["path"],
            json!({"type": "Exact", "value": "/shop.v1.Cart/Add"})
        );
        assert_eq!(
            rules[1]["matches"][0]["path"],
            json!({"type": "PathPrefix", "value": "/shop.v1.Cart"})
        );
        assert_eq!(rules[1]["matches"][0]["headers"][0]["name"], "x-canary");
        assert_eq!(rules[1]["filters"], spec["rules"][1]["filters"]);
        assert_eq!(rules[1]["backendRefs"], spec["rules"][1]["backendRefs"]);
        assert_eq!(
            rules[2]["matches"][0]["path"],
            json!({"type": "RegularExpression", "value": "/[^/]+/Check"})
        );
        assert_eq!(
            rules[2]["matches"][1]["path"],
            json!({"type": "RegularExpression", "value": "/grpc\\.health\\..*/[^/]+"})
        );
        assert!(rules[3].get("matches").is_none(), "no matches: every call");
    }

    #[test]
    fn unsupported_or_malformed_matches_are_errors() {
        let bad_type =
            json!({"rules": [{"matches": [{"method": {"type": "Prefix", "service": "a"}}]}]});
        let e = to_http_route_spec(&bad_type).unwrap_err();
        assert!(
            e.contains("rules[0].matches") && e.contains("Prefix"),
            "{e}"
        );
        let slash = json!({"rules": [{"matches": [{"method": {"service": "a/b"}}]}]});
        assert!(to_http_route_spec(&slash).is_err());
        assert_eq!(regex_escape("a.b+c"), "a\\.b\\+c");
    }
}
