//! Gateway API HTTPRoute (GAMMA: parentRefs of kind Service), as the waypoint applies it:
//! path (Exact, PathPrefix, RegularExpression), header, query and method matches with the
//! Gateway API precedence; weighted backendRefs; header modifier filters; request timeout.
//! Pure: no I/O.

use http::{HeaderMap, Method};
use serde::Deserialize;
use std::time::Duration;

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct RouteSpec {
    #[serde(default)]
    pub parent_refs: Vec<ParentRef>,
    #[serde(default)]
    pub rules: Vec<Rule>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct ParentRef {
    #[serde(default)]
    pub kind: Option<String>,
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub port: Option<u16>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct Rule {
    #[serde(default)]
    pub matches: Vec<RouteMatch>,
    #[serde(default)]
    pub backend_refs: Vec<BackendRef>,
    #[serde(default)]
    pub filters: Vec<Filter>,
    #[serde(default)]
    pub timeouts: Option<Timeouts>,
    /// GEP-1731 (experimental channel): retry on these codes or connection errors.
    #[serde(default)]
    pub retry: Option<Retry>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct Retry {
    #[serde(default)]
    pub codes: Vec<u16>,
    #[serde(default)]
    pub attempts: Option<u32>,
    #[serde(default)]
    pub backoff: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct Timeouts {
    #[serde(default)]
    pub request: Option<String>,
    #[serde(default)]
    pub backend_request: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct RouteMatch {
    #[serde(default)]
    pub path: Option<PathMatch>,
    #[serde(default)]
    pub headers: Vec<ValueMatch>,
    #[serde(default)]
    pub query_params: Vec<ValueMatch>,
    #[serde(default)]
    pub method: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct PathMatch {
    #[serde(default, rename = "type")]
    pub type_: Option<String>,
    #[serde(default)]
    pub value: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct ValueMatch {
    #[serde(default, rename = "type")]
    pub type_: Option<String>,
    pub name: String,
    pub value: String,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct BackendRef {
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default = "one")]
    pub weight: u32,
}

fn one() -> u32 {
    1
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct Filter {
    #[serde(rename = "type")]
    pub type_: String,
    #[serde(default)]
    pub request_header_modifier: Option<HeaderModifier>,
    #[serde(default)]
    pub response_header_modifier: Option<HeaderModifier>,
    #[serde(default)]
    pub request_redirect: Option<Redirect>,
    #[serde(default, rename = "urlRewrite")]
    pub url_rewrite: Option<Rewrite>,
    #[serde(default)]
    pub request_mirror: Option<Mirror>,
    /// Fault injection: an `ExtensionRef` filter to an `HTTPFault` resource, whose spec
    /// mesh-control inlines here.
    #[serde(default)]
    pub fault: Option<Fault>,
}

/// Istio's HTTPFaultInjection shape: delay and/or abort, each for a percentage of requests.
#[derive(Debug, Clone, Deserialize, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Fault {
    #[serde(default)]
    pub delay: Option<FaultDelay>,
    #[serde(default)]
    pub abort: Option<FaultAbort>,
}

#[derive(Debug, Clone, Deserialize, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FaultDelay {
    /// Gateway API duration, e.g. `2s`, `150ms`.
    pub fixed_delay: String,
    #[serde(default)]
    pub percentage: Option<Percentage>,
}

#[derive(Debug, Clone, Deserialize, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FaultAbort {
    pub http_status: u16,
    #[serde(default)]
    pub percentage: Option<Percentage>,
}

/// `{value: 0..100}`; absent means every request.
#[derive(Debug, Clone, Deserialize, Default, PartialEq)]
pub struct Percentage {
    pub value: f64,
}

pub fn validate_fault(f: &Fault) -> Result<(), String> {
    if f.delay.is_none() && f.abort.is_none() {
        return Err("needs a delay or an abort".into());
    }
    let pct = |p: Option<&Percentage>| match p {
        Some(p) if !(0.0..=100.0).contains(&p.value) => {
            Err(format!("percentage {} is not within 0..100", p.value))
        }
        _ => Ok(()),
    };
    if let Some(d) = &f.delay {
        parse_gateway_duration(&d.fixed_delay)
            .ok_or_else(|| format!("bad fixedDelay {:?}", d.fixed_delay))?;
        pct(d.percentage.as_ref())?;
    }
    if let Some(a) = &f.abort {
        if !(200..=599).contains(&a.http_status) {
            return Err(format!(
                "httpStatus {} is not within 200..599",
                a.http_status
            ));
        }
        pct(a.percentage.as_ref())?;
    }
    Ok(())
}

/// Whether a fault applies to a request, given a uniform roll in [0, 100).
pub fn fault_applies(p: Option<&Percentage>, roll: f64) -> bool {
    p.is_none_or(|p| roll < p.value)
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct PathModifier {
    #[serde(rename = "type")]
    pub type_: String,
    #[serde(default)]
    pub replace_full_path: Option<String>,
    #[serde(default)]
    pub replace_prefix_match: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct Redirect {
    #[serde(default)]
    pub scheme: Option<String>,
    #[serde(default)]
    pub hostname: Option<String>,
    #[serde(default)]
    pub path: Option<PathModifier>,
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default)]
    pub status_code: Option<u16>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct Rewrite {
    #[serde(default)]
    pub hostname: Option<String>,
    #[serde(default)]
    pub path: Option<PathModifier>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct Mirror {
    pub backend_ref: BackendRef,
}

/// The path after a path modifier; `matched_prefix` is the rule's PathPrefix match value.
pub fn modify_path(m: &PathModifier, path: &str, matched_prefix: Option<&str>) -> String {
    match m.type_.as_str() {
        "ReplaceFullPath" => m.replace_full_path.clone().unwrap_or_else(|| "/".into()),
        "ReplacePrefixMatch" => {
            let prefix = matched_prefix.unwrap_or("/").trim_end_matches('/');
            let rest = path.strip_prefix(prefix).unwrap_or(path);
            let new = m
                .replace_prefix_match
                .as_deref()
                .unwrap_or("/")
                .trim_end_matches('/');
            let joined = format!("{new}{rest}");
            if joined.is_empty() {
                "/".into()
            } else if joined.starts_with('/') {
                joined
            } else {
                format!("/{joined}")
            }
        }
        _ => path.to_string(),
    }
}

/// What the Gateway API allows in a redirect, so that every redirect the proxy answers
/// is a valid response (a status it can send, a `Location` it can write). A statusCode of
/// 1000 made `proxy.rs` panic on every matching request; the `waypoint_request` fuzz
/// target checks that every redirect builds.
pub fn validate_redirect(r: &Redirect) -> Result<(), String> {
    if let Some(c) = r.status_code
        && ![301, 302, 303, 307, 308].contains(&c)
    {
        return Err(format!("statusCode {c} is not 301, 302, 303, 307 or 308"));
    }
    if let Some(s) = r.scheme.as_deref()
        && s != "http"
        && s != "https"
    {
        return Err(format!("scheme {s:?} is not http or https"));
    }
    let texts = [
        r.hostname.as_deref(),
        r.path.as_ref().and_then(|p| p.replace_full_path.as_deref()),
        r.path
            .as_ref()
            .and_then(|p| p.replace_prefix_match.as_deref()),
    ];
    match texts
        .into_iter()
        .flatten()
        .find(|t| t.bytes().any(|b| !b.is_ascii_graphic()))
    {
        Some(t) => Err(format!("{t:?} cannot go in a Location header")),
        None => Ok(()),
    }
}

/// The status and `Location` of a redirect for a request to `host` and `path`.
pub fn redirect(
    r: &Redirect,
    scheme: &str,
    host: &str,
    path: &str,
    query: Option<&str>,
    matched_prefix: Option<&str>,
) -> (u16, String) {
    let scheme = r.scheme.as_deref().unwrap_or(scheme);
    let host = r
        .hostname
        .as_deref()
        .unwrap_or_else(|| host.split(':').next().unwrap_or(host));
    let port = match (r.port, scheme) {
        (Some(80), "http") | (Some(443), "https") | (None, _) => String::new(),
        (Some(p), _) => format!(":{p}"),
    };
    let path = r
        .path
        .as_ref()
        .map_or(path.to_string(), |m| modify_path(m, path, matched_prefix));
    let query = query.map(|q| format!("?{q}")).unwrap_or_default();
    (
        r.status_code.unwrap_or(302),
        format!("{scheme}://{host}{port}{path}{query}"),
    )
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct HeaderModifier {
    #[serde(default)]
    pub set: Vec<HeaderValue>,
    #[serde(default)]
    pub add: Vec<HeaderValue>,
    #[serde(default)]
    pub remove: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, Default)]
pub struct HeaderValue {
    pub name: String,
    pub value: String,
}

impl HeaderModifier {
    pub fn apply(&self, headers: &mut HeaderMap) {
        for name in &self.remove {
            headers.remove(name.as_str());
        }
        for h in &self.set {
            if let (Ok(n), Ok(v)) = (
                http::HeaderName::from_bytes(h.name.as_bytes()),
                http::HeaderValue::from_str(&h.value),
            ) {
                headers.insert(n, v);
            }
        }
        for h in &self.add {
            if let (Ok(n), Ok(v)) = (
                http::HeaderName::from_bytes(h.name.as_bytes()),
                http::HeaderValue::from_str(&h.value),
            ) {
                headers.append(n, v);
            }
        }
    }
}

/// A parsed route with its identity.
#[derive(Debug, Clone)]
pub struct Route {
    pub namespace: String,
    pub name: String,
    pub spec: RouteSpec,
}

impl Route {
    pub fn parse(namespace: &str, name: &str, json: &str) -> Result<Route, String> {
        let spec: RouteSpec =
            serde_json::from_str(json).map_err(|e| format!("HTTPRoute {namespace}/{name}: {e}"))?;
        for (i, r) in spec.rules.iter().enumerate() {
            for m in &r.matches {
                if let Some(p) = &m.path
                    && p.type_.as_deref() == Some("RegularExpression")
                {
                    regex_lite::Regex::new(p.value.as_deref().unwrap_or_default()).map_err(
                        |e| format!("HTTPRoute {namespace}/{name} rule {i}: bad path regex: {e}"),
                    )?;
                }
            }
            let durations = r
                .timeouts
                .iter()
                .flat_map(|t| [t.request.as_deref(), t.backend_request.as_deref()])
                .chain(r.retry.iter().map(|x| x.backoff.as_deref()))
                .flatten();
            for t in durations {
                parse_gateway_duration(t).ok_or_else(|| {
                    format!("HTTPRoute {namespace}/{name} rule {i}: bad duration {t:?}")
                })?;
            }
            for f in r.filters.iter().filter_map(|f| f.fault.as_ref()) {
                validate_fault(f)
                    .map_err(|e| format!("HTTPRoute {namespace}/{name} rule {i}: fault: {e}"))?;
            }
            for rd in r.filters.iter().filter_map(|f| f.request_redirect.as_ref()) {
                validate_redirect(rd)
                    .map_err(|e| format!("HTTPRoute {namespace}/{name} rule {i}: redirect: {e}"))?;
            }
        }
        Ok(Route {
            namespace: namespace.to_string(),
            name: name.to_string(),
            spec,
        })
    }

    /// Does this route attach to Service `ns/name` on `port`?
    pub fn attaches_to(&self, ns: &str, name: &str, port: u16) -> bool {
        self.spec.parent_refs.iter().any(|p| {
            p.kind.as_deref() == Some("Service")
                && p.name == name
                && p.namespace.as_deref().unwrap_or(&self.namespace) == ns
                && p.port.is_none_or(|p| p == port)
        })
    }
}

/// Gateway API durations: `1h`, `10s`, `500ms`, combinations like `1m30s`.
pub fn parse_gateway_duration(s: &str) -> Option<Duration> {
    let mut total = Duration::ZERO;
    let mut num = String::new();
    let mut chars = s.chars().peekable();
    let mut any = false;
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let n: u64 = num.parse().ok()?;
        num.clear();
        let unit = match c {
            'h' => Duration::from_secs(3600 * n),
            'm' if chars.peek() == Some(&'s') => {
                chars.next();
                Duration::from_millis(n)
            }
            'm' => Duration::from_secs(60 * n),
            's' => Duration::from_secs(n),
            _ => return None,
        };
        total += unit;
        any = true;
    }
    (any && num.is_empty()).then_some(total)
}

/// Precedence key: exact path, then regular expression (Gateway API leaves its rank to
/// the implementation; Istio puts it here), then longest prefix; then method, then the
/// number of header and query matches (higher sorts first).
type Specificity = (u8, usize, u8, usize, usize);

fn specificity(m: &RouteMatch) -> Specificity {
    let (kind, len) = match &m.path {
        Some(p) => match p.type_.as_deref().unwrap_or("PathPrefix") {
            "Exact" => (3, p.value.as_deref().unwrap_or("").len()),
            "RegularExpression" => (2, p.value.as_deref().unwrap_or("").len()),
            _ => (1, p.value.as_deref().unwrap_or("/").len()),
        },
        None => (1, 1),
    };
    (
        kind,
        len,
        u8::from(m.method.is_some()),
        m.headers.len(),
        m.query_params.len(),
    )
}

fn path_matches(p: &PathMatch, path: &str) -> bool {
    let v = p.value.as_deref().unwrap_or("/");
    match p.type_.as_deref().unwrap_or("PathPrefix") {
        "Exact" => path == v,
        "RegularExpression" => {
            regex_lite::Regex::new(&format!("^(?:{v})$")).is_ok_and(|r| r.is_match(path))
        }
        _ => {
            // Prefix matching is per path element: /foo matches /foo and /foo/bar, not /foobar.
            let v = v.trim_end_matches('/');
            v.is_empty() || path == v || path.starts_with(&format!("{v}/"))
        }
    }
}

fn value_matches(m: &ValueMatch, value: Option<&str>) -> bool {
    match (m.type_.as_deref().unwrap_or("Exact"), value) {
        (_, None) => false,
        ("RegularExpression", Some(v)) => {
            regex_lite::Regex::new(&format!("^(?:{})$", m.value)).is_ok_and(|r| r.is_match(v))
        }
        (_, Some(v)) => v == m.value,
    }
}

/// The parts of a request routing looks at.
pub struct RequestInfo<'a> {
    pub method: &'a Method,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
}

fn route_match_matches(m: &RouteMatch, r: &RequestInfo<'_>) -> bool {
    if let Some(p) = &m.path
        && !path_matches(p, r.path)
    {
        return false;
    }
    if let Some(method) = &m.method
        && !method.eq_ignore_ascii_case(r.method.as_str())
    {
        return false;
    }
    if !m.headers.iter().all(|h| {
        value_matches(
            h,
            r.headers.get(h.name.as_str()).and_then(|v| v.to_str().ok()),
        )
    }) {
        return false;
    }
    let query: Vec<(&str, &str)> = r
        .query
        .unwrap_or_default()
        .split('&')
        .filter_map(|kv| kv.split_once('=').or(Some((kv, ""))))
        .collect();
    m.query_params
        .iter()
        .all(|q| value_matches(q, query.iter().find(|(k, _)| *k == q.name).map(|(_, v)| *v)))
}

/// The rule that handles a request among `routes` (already filtered to its parent), by
/// Gateway API precedence; ties go to the route that sorts first by namespace/name.
pub fn select<'a>(routes: &'a [Route], req: &RequestInfo<'_>) -> Option<(&'a Route, &'a Rule)> {
    let mut best: Option<(Specificity, &Route, &Rule)> = None;
    let mut sorted: Vec<&Route> = routes.iter().collect();
    sorted.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    for route in sorted {
        for rule in &route.spec.rules {
            let default_match = [RouteMatch::default()];
            let matches: &[RouteMatch] = if rule.matches.is_empty() {
                &default_match
            } else {
                &rule.matches
            };
            for m in matches {
                if route_match_matches(m, req) {
                    let key = specificity(m);
                    if best.as_ref().is_none_or(|(k, _, _)| key > *k) {
                        best = Some((key, route, rule));
                    }
                }
            }
        }
    }
    best.map(|(_, route, rule)| (route, rule))
}

/// The PathPrefix value of the rule's match that matches the request, if any (for
/// ReplacePrefixMatch).
pub fn matched_prefix(rule: &Rule, req: &RequestInfo<'_>) -> Option<String> {
    rule.matches
        .iter()
        .filter(|m| route_match_matches(m, req))
        .find_map(|m| {
            let p = m.path.as_ref()?;
            (p.type_.as_deref().unwrap_or("PathPrefix") == "PathPrefix")
                .then(|| p.value.clone().unwrap_or_else(|| "/".into()))
        })
}

/// Picks a backend by weight; `roll` is uniform in [0, total weight).
pub fn pick_backend(rule: &Rule, roll: u32) -> Option<&BackendRef> {
    let mut roll = roll;
    rule.backend_refs.iter().filter(|b| b.weight > 0).find(|b| {
        if roll < b.weight {
            true
        } else {
            roll -= b.weight;
            false
        }
    })
}

pub fn total_weight(rule: &Rule) -> u32 {
    rule.backend_refs.iter().map(|b| b.weight).sum()
}

#[cfg(test)]
mod tests {

    #[test]
    fn redirects_the_proxy_cannot_answer_are_refused() {
        let rule = |rd: &str| {
            format!(
                r#"{{"rules":[{{"filters":[{{"type":"RequestRedirect","requestRedirect":{rd}}}]}}]}}"#
            )
        };
        for bad in [
            r#"{"statusCode":1000}"#,
            r#"{"statusCode":200}"#,
            r#"{"scheme":"javascript"}"#,
            r#"{"hostname":"a
b"}"#,
            r#"{"path":{"type":"ReplaceFullPath","replaceFullPath":"/x y"}}"#,
        ] {
            assert!(Route::parse("ns", "r", &rule(bad)).is_err(), "{bad}");
        }
        let ok = r#"{"scheme":"https","hostname":"b.example","port":8443,"statusCode":301}"#;
        assert!(Route::parse("ns", "r", &rule(ok)).is_ok());
    }

    use super::*;

    fn route(json: &str) -> Route {
        Route::parse("shop", "r", json).unwrap()
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

    fn backend(path: &str, method: Method, query: Option<&str>, headers: &HeaderMap) -> String {
        let r = vec![route(ROUTES)];
        let (_, rule) = select(&r, &req(&method, path, query, headers)).unwrap();
        rule.backend_refs[0].name.clone()
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

    /// What mesh-control sends for a GRPCRoute (its translation to HTTPRoute matches):
    /// gRPC calls are POSTs to /<service>/<method>.
    const GRPC_ROUTE: &str = r#"{
      "parentRefs": [{"group": "", "kind": "Service", "name": "api"}],
      "rules": [
        {"matches": [{"path": {"type": "Exact", "value": "/shop.v1.Cart/Add"}}], "backendRefs": [{"name": "cart-add", "port": 9090}]},
        {"matches": [{"path": {"type": "PathPrefix", "value": "/shop.v1.Cart"}}], "backendRefs": [{"name": "cart", "port": 9090}]},
        {"matches": [{"path": {"type": "RegularExpression", "value": "/[^/]+/Check"}}], "backendRefs": [{"name": "health", "port": 9090}]},
        {"backendRefs": [{"name": "api", "port": 9090}]}
      ]
    }"#;

    #[test]
    fn faults_validate_and_apply_by_percentage() {
        let ok = |json: &str| {
            Route::parse(
                "shop",
                "r",
                &format!(
                    r#"{{"rules":[{{"filters":[{{"type":"ExtensionRef","fault":{json}}}]}}]}}"#
                ),
            )
        };
        assert!(ok(r#"{"delay":{"fixedDelay":"1s","percentage":{"value":50}}}"#).is_ok());
        assert!(ok(r#"{"abort":{"httpStatus":503}}"#).is_ok());
        for bad in [
            r#"{}"#,
            r#"{"abort":{"httpStatus":42}}"#,
            r#"{"delay":{"fixedDelay":"soon"}}"#,
            r#"{"abort":{"httpStatus":503,"percentage":{"value":150}}}"#,
        ] {
            let e = ok(bad).unwrap_err();
            assert!(e.contains("fault"), "{bad}: {e}");
        }
        let half = Percentage { value: 50.0 };
        assert!(fault_applies(Some(&half), 49.9));
        assert!(!fault_applies(Some(&half), 50.0));
        assert!(fault_applies(None, 99.9), "no percentage: every request");
        assert!(!fault_applies(Some(&Percentage { value: 0.0 }), 0.0));
    }

    #[test]
    fn grpc_route_translations_route_calls() {
        let r = vec![route(GRPC_ROUTE)];
        let h = HeaderMap::new();
        let to = |path: &str| {
            let (_, rule) = select(&r, &req(&Method::POST, path, None, &h)).unwrap();
            rule.backend_refs[0].name.clone()
        };
        assert_eq!(to("/shop.v1.Cart/Add"), "cart-add");
        assert_eq!(to("/shop.v1.Cart/Remove"), "cart");
        assert_eq!(
            to("/shop.v1.CartAdmin/Add"),
            "api",
            "service match is exact"
        );
        assert_eq!(to("/grpc.health.v1.Health/Check"), "health");
        assert_eq!(to("/shop.v1.Orders/List"), "api");
    }

    #[test]
    fn weighted_split() {
        let r = route(ROUTES);
        let rule = r.spec.rules.last().unwrap();
        assert_eq!(total_weight(rule), 100);
        let picks: Vec<&str> = (0..100)
            .map(|i| pick_backend(rule, i).unwrap().name.as_str())
            .collect();
        assert_eq!(picks.iter().filter(|n| **n == "api-v1").count(), 90);
        assert_eq!(picks.iter().filter(|n| **n == "api-v2").count(), 10);
    }

    #[test]
    fn attachment_and_validation() {
        let r = route(ROUTES);
        assert!(r.attaches_to("shop", "api", 80));
        assert!(!r.attaches_to("shop", "api", 81));
        assert!(!r.attaches_to("other", "api", 80));
        assert!(
            Route::parse(
                "s",
                "bad",
                r#"{"rules":[{"matches":[{"path":{"type":"RegularExpression","value":"("}}]}]}"#
            )
            .is_err()
        );
        assert!(Route::parse("s", "bad", r#"{"rules":[{"timeouts":{"request":"ten"}}]}"#).is_err());
        assert!(Route::parse("s", "bad", "not json").is_err());
    }

    #[test]
    fn redirects_and_rewrites() {
        let r = Redirect {
            scheme: Some("https".into()),
            port: Some(443),
            status_code: Some(301),
            ..Default::default()
        };
        assert_eq!(
            redirect(&r, "http", "api:80", "/a", Some("x=1"), None),
            (301, "https://api/a?x=1".into())
        );
        let r = Redirect {
            hostname: Some("new".into()),
            port: Some(8080),
            path: Some(PathModifier {
                type_: "ReplacePrefixMatch".into(),
                replace_prefix_match: Some("/v2".into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(
            redirect(&r, "http", "api", "/v1/items", None, Some("/v1")),
            (302, "http://new:8080/v2/items".into())
        );
        let full = PathModifier {
            type_: "ReplaceFullPath".into(),
            replace_full_path: Some("/fixed".into()),
            ..Default::default()
        };
        assert_eq!(modify_path(&full, "/anything", None), "/fixed");
        let prefix = PathModifier {
            type_: "ReplacePrefixMatch".into(),
            replace_prefix_match: Some("/".into()),
            ..Default::default()
        };
        assert_eq!(modify_path(&prefix, "/api/users", Some("/api")), "/users");
        assert_eq!(modify_path(&prefix, "/api", Some("/api")), "/");
    }

    #[test]
    fn durations_and_header_filters() {
        assert_eq!(parse_gateway_duration("10s"), Some(Duration::from_secs(10)));
        assert_eq!(
            parse_gateway_duration("500ms"),
            Some(Duration::from_millis(500))
        );
        assert_eq!(
            parse_gateway_duration("1m30s"),
            Some(Duration::from_secs(90))
        );
        assert_eq!(parse_gateway_duration("5"), None);
        let mut h = HeaderMap::new();
        h.insert("x-drop", "1".parse().unwrap());
        h.insert("x-keep", "1".parse().unwrap());
        HeaderModifier {
            set: vec![HeaderValue {
                name: "x-set".into(),
                value: "a".into(),
            }],
            add: vec![HeaderValue {
                name: "x-keep".into(),
                value: "2".into(),
            }],
            remove: vec!["x-drop".into()],
        }
        .apply(&mut h);
        assert!(h.get("x-drop").is_none());
        assert_eq!(h.get("x-set").unwrap(), "a");
        assert_eq!(h.get_all("x-keep").iter().count(), 2);
    }
}
