//! The typed `mesh.waypoint.v1.HttpRoute` compiled for the waypoint, once per
//! configuration version (regexes compiled, durations and headers parsed), and matched per
//! request with the Gateway API precedence. Pure: no I/O.
//!
//! Compiling never refuses a route: mesh-control's problems, and whatever this side cannot
//! read (a newer filter kind, say), fail closed where they sit: the rule answers 500, the
//! match matches nothing, the backend answers 500 for its share.

use http::{HeaderMap, HeaderName, HeaderValue, Method};
use mesh_proto::waypoint as pb;
use std::sync::Arc;
use std::time::Duration;

/// A route, ready to match requests.
#[derive(Debug, Clone)]
pub struct Route {
    pub namespace: String,
    pub name: String,
    pub kind: &'static str,
    pub parents: Vec<Parent>,
    pub rules: Vec<Arc<Rule>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parent {
    pub namespace: String,
    pub name: String,
    pub port: Option<u16>,
}

#[derive(Debug, Clone)]
pub struct Rule {
    /// `spec.rules[<i>]`, for messages.
    pub at: String,
    pub matches: Vec<Match>,
    pub filters: Vec<Filter>,
    pub backends: Vec<Backend>,
    pub request_timeout: Option<Duration>,
    pub backend_request_timeout: Option<Duration>,
    pub retry: Option<Retry>,
    /// Why the rule cannot be applied as written: its requests get 500.
    pub invalid: Option<String>,
}

/// All parts must match; `never` (a part that cannot be evaluated): matches nothing.
#[derive(Debug, Clone, Default)]
pub struct Match {
    pub path: Option<PathMatch>,
    pub headers: Vec<ValueMatch>,
    pub query: Vec<ValueMatch>,
    pub method: Option<String>,
    pub never: bool,
}

#[derive(Debug, Clone)]
pub enum PathMatch {
    Exact(String),
    Prefix(String),
    Regex(regex_lite::Regex),
}

#[derive(Debug, Clone)]
pub struct ValueMatch {
    pub name: String,
    pub value: Value,
}

#[derive(Debug, Clone)]
pub enum Value {
    Exact(String),
    Regex(regex_lite::Regex),
}

#[derive(Debug, Clone)]
pub enum Filter {
    RequestHeaders(HeaderModifier),
    ResponseHeaders(HeaderModifier),
    Redirect(Redirect),
    Rewrite(Rewrite),
    Mirror(Backend),
    Fault(Fault),
}

#[derive(Debug, Clone, Default)]
pub struct HeaderModifier {
    pub set: Vec<(HeaderName, HeaderValue)>,
    pub add: Vec<(HeaderName, HeaderValue)>,
    pub remove: Vec<HeaderName>,
}

impl HeaderModifier {
    pub fn apply(&self, headers: &mut HeaderMap) {
        for n in &self.remove {
            headers.remove(n);
        }
        for (n, v) in &self.set {
            headers.insert(n.clone(), v.clone());
        }
        for (n, v) in &self.add {
            headers.append(n.clone(), v.clone());
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathModifier {
    ReplaceFullPath(String),
    ReplacePrefixMatch(String),
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Redirect {
    pub scheme: Option<String>,
    pub hostname: Option<String>,
    pub path: Option<PathModifier>,
    pub port: Option<u16>,
    pub status_code: u16,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rewrite {
    pub hostname: Option<HeaderValue>,
    pub path: Option<PathModifier>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Fault {
    /// The delay and its percentage (None: every request).
    pub delay: Option<(Duration, Option<f64>)>,
    /// The status and its percentage.
    pub abort: Option<(u16, Option<f64>)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    pub namespace: String,
    pub name: String,
    /// None: the port the request was sent to.
    pub port: Option<u16>,
    pub weight: u32,
    /// Why requests sent here cannot be: they get 500.
    pub invalid: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retry {
    pub codes: Vec<u16>,
    pub attempts: u32,
    pub backoff: Duration,
}

fn why(problems: &[pb::Problem]) -> Option<String> {
    (!problems.is_empty()).then(|| {
        problems
            .iter()
            .map(|p| format!("{}: {}", p.field, p.message))
            .collect::<Vec<_>>()
            .join("; ")
    })
}

fn regex(r: &str) -> Result<regex_lite::Regex, String> {
    regex_lite::Regex::new(&format!("^(?:{r})$")).map_err(|e| format!("bad regex {r:?}: {e}"))
}

fn port(p: u32) -> Option<u16> {
    u16::try_from(p).ok().filter(|p| *p != 0)
}

/// What this side could not read, besides mesh-control's problems.
struct Compiler {
    errors: Vec<String>,
}

impl Compiler {
    fn unreadable(&mut self, at: &str, what: String) -> String {
        let e = format!("{at}: {what}");
        self.errors.push(e.clone());
        e
    }

    fn path(&mut self, at: &str, p: &pb::PathMatch) -> Result<PathMatch, String> {
        use pb::path_match::Kind as K;
        match &p.kind {
            Some(K::Exact(s)) => Ok(PathMatch::Exact(s.clone())),
            Some(K::Prefix(s)) => Ok(PathMatch::Prefix(s.clone())),
            Some(K::Regex(r)) => regex(r).map(PathMatch::Regex),
            None => Err("path match without a kind".into()),
        }
        .map_err(|e| self.unreadable(at, e))
    }

    fn value(&mut self, at: &str, v: &pb::ValueMatch) -> Result<ValueMatch, String> {
        use pb::value_match::Kind as K;
        let value = match &v.kind {
            Some(K::Exact(s)) => Ok(Value::Exact(s.clone())),
            Some(K::Regex(r)) => regex(r).map(Value::Regex),
            None => Err(format!("match on {:?} without a kind", v.name)),
        }
        .map_err(|e| self.unreadable(at, e))?;
        Ok(ValueMatch {
            name: v.name.clone(),
            value,
        })
    }

    /// A GRPCRoute method match as the path match it is: a call is a POST to
    /// `/<service>/<method>`.
    fn grpc(&mut self, at: &str, g: &pb::GrpcMethodMatch) -> Result<Option<PathMatch>, String> {
        let service = Some(g.service.as_str()).filter(|s| !s.is_empty());
        let method = Some(g.method.as_str()).filter(|s| !s.is_empty());
        let path = match (pb::GrpcMatchType::try_from(g.r#type), service, method) {
            (Ok(pb::GrpcMatchType::Exact), s, m)
                if [s, m].into_iter().flatten().all(|x| !x.contains('/')) =>
            {
                match (s, m) {
                    (None, None) => return Ok(None),
                    (Some(s), Some(m)) => PathMatch::Exact(format!("/{s}/{m}")),
                    (Some(s), None) => PathMatch::Prefix(format!("/{s}")),
                    (None, Some(m)) => PathMatch::Regex(
                        regex(&format!("/[^/]+/{}", regex_lite::escape(m)))
                            .map_err(|e| self.unreadable(at, e))?,
                    ),
                }
            }
            (Ok(pb::GrpcMatchType::RegularExpression), s, m) => PathMatch::Regex(
                regex(&format!(
                    "/(?:{})/(?:{})",
                    s.unwrap_or("[^/]+"),
                    m.unwrap_or("[^/]+")
                ))
                .map_err(|e| self.unreadable(at, e))?,
            ),
            _ => {
                return Err(self.unreadable(at, format!("gRPC method match {g:?} cannot be read")));
            }
        };
        Ok(Some(path))
    }

    fn matcher(&mut self, at: &str, m: &pb::RouteMatch) -> Match {
        let mut out = Match {
            method: Some(m.method.clone()).filter(|m| !m.is_empty()),
            ..Default::default()
        };
        if !m.problems.is_empty() {
            // Reported by mesh-control; what it could read of the match is not enough.
            out.never = true;
            return out;
        }
        let path = match (&m.path, &m.grpc_method) {
            (Some(p), None) => self.path(at, p).map(Some),
            (None, Some(g)) => self.grpc(at, g),
            (None, None) => Ok(None),
            (Some(_), Some(_)) => Err(self.unreadable(at, "both a path and a gRPC method".into())),
        };
        match path {
            Ok(p) => out.path = p,
            Err(_) => out.never = true,
        }
        for h in &m.headers {
            match self.value(at, h) {
                Ok(v) => out.headers.push(v),
                Err(_) => out.never = true,
            }
        }
        for q in &m.query_params {
            match self.value(at, q) {
                Ok(v) => out.query.push(v),
                Err(_) => out.never = true,
            }
        }
        out
    }

    fn headers(&mut self, at: &str, h: &pb::HeaderModifier) -> Result<HeaderModifier, String> {
        let pair = |h: &pb::Header| {
            Some((
                HeaderName::from_bytes(h.name.as_bytes()).ok()?,
                HeaderValue::from_str(&h.value).ok()?,
            ))
        };
        let mut out = HeaderModifier::default();
        for (list, dst) in [(&h.set, &mut out.set), (&h.add, &mut out.add)] {
            for x in list {
                dst.push(pair(x).ok_or_else(|| self.unreadable(at, format!("bad header {x:?}")))?);
            }
        }
        for n in &h.remove {
            out.remove.push(
                HeaderName::from_bytes(n.as_bytes())
                    .map_err(|_| self.unreadable(at, format!("bad header name {n:?}")))?,
            );
        }
        Ok(out)
    }

    fn path_modifier(
        &mut self,
        at: &str,
        p: &Option<pb::PathModifier>,
    ) -> Result<Option<PathModifier>, String> {
        use pb::path_modifier::Kind as K;
        let Some(p) = p else { return Ok(None) };
        let ok = |s: &String| s.starts_with('/') && s.bytes().all(|b| b.is_ascii_graphic());
        match &p.kind {
            Some(K::ReplaceFullPath(s)) if ok(s) => {
                Ok(Some(PathModifier::ReplaceFullPath(s.clone())))
            }
            Some(K::ReplacePrefixMatch(s)) if ok(s) => {
                Ok(Some(PathModifier::ReplacePrefixMatch(s.clone())))
            }
            other => Err(self.unreadable(at, format!("path modifier {other:?} cannot be read"))),
        }
    }

    fn backend(&mut self, b: &pb::RouteBackend) -> Backend {
        Backend {
            namespace: b.namespace.clone(),
            name: b.name.clone(),
            port: port(b.port),
            weight: b.weight,
            invalid: why(&b.problems),
        }
    }

    fn filter(&mut self, at: &str, f: &pb::RouteFilter) -> Result<Filter, String> {
        use pb::route_filter::Kind as K;
        let ascii = |s: &str| s.bytes().all(|b| b.is_ascii_graphic());
        Ok(match &f.kind {
            Some(K::RequestHeaderModifier(h)) => Filter::RequestHeaders(self.headers(at, h)?),
            Some(K::ResponseHeaderModifier(h)) => Filter::ResponseHeaders(self.headers(at, h)?),
            Some(K::RequestRedirect(r)) => {
                let status = match r.status_code {
                    0 => 302,
                    c @ (301 | 302 | 303 | 307 | 308) => c as u16,
                    c => return Err(self.unreadable(at, format!("redirect status {c}"))),
                };
                let scheme = match r.scheme.as_str() {
                    "" => None,
                    s @ ("http" | "https") => Some(s.to_string()),
                    s => return Err(self.unreadable(at, format!("redirect scheme {s:?}"))),
                };
                if !ascii(&r.hostname) {
                    return Err(self.unreadable(at, format!("redirect hostname {:?}", r.hostname)));
                }
                Filter::Redirect(Redirect {
                    scheme,
                    hostname: Some(r.hostname.clone()).filter(|h| !h.is_empty()),
                    path: self.path_modifier(at, &r.path)?,
                    port: port(r.port),
                    status_code: status,
                })
            }
            Some(K::UrlRewrite(w)) => Filter::Rewrite(Rewrite {
                hostname: match w.hostname.as_str() {
                    "" => None,
                    h => Some(
                        HeaderValue::from_str(h)
                            .map_err(|_| self.unreadable(at, format!("rewrite hostname {h:?}")))?,
                    ),
                },
                path: self.path_modifier(at, &w.path)?,
            }),
            Some(K::RequestMirror(m)) => match &m.backend {
                Some(b) if b.problems.is_empty() => Filter::Mirror(self.backend(b)),
                _ => return Err(self.unreadable(at, "mirror without a usable backend".into())),
            },
            Some(K::Fault(f)) => {
                let pct = |p: Option<f64>| p.filter(|p| (0.0..=100.0).contains(p));
                if f.delay.is_none() && f.abort.is_none() {
                    return Err(self.unreadable(at, "fault without a delay or an abort".into()));
                }
                Filter::Fault(Fault {
                    delay: f
                        .delay
                        .as_ref()
                        .map(|d| (Duration::from_millis(d.fixed_delay_ms), pct(d.percentage))),
                    abort: match &f.abort {
                        Some(a) => Some((
                            u16::try_from(a.http_status)
                                .ok()
                                .filter(|s| (200..=599).contains(s))
                                .ok_or_else(|| {
                                    self.unreadable(at, format!("abort status {}", a.http_status))
                                })?,
                            pct(a.percentage),
                        )),
                        None => None,
                    },
                })
            }
            None => return Err(self.unreadable(at, "a filter this waypoint does not know".into())),
        })
    }

    fn rule(&mut self, at: String, r: &pb::RouteRule, route_problems: &[pb::Problem]) -> Rule {
        let mut invalid: Vec<String> = why(route_problems)
            .into_iter()
            .chain(why(&r.problems))
            .collect();
        let matches = r
            .matches
            .iter()
            .enumerate()
            .map(|(i, m)| self.matcher(&format!("{at}.matches[{i}]"), m))
            .collect();
        let mut filters = Vec::new();
        for (i, f) in r.filters.iter().enumerate() {
            match self.filter(&format!("{at}.filters[{i}]"), f) {
                Ok(f) => filters.push(f),
                Err(e) => invalid.push(e),
            }
        }
        let retry = r.retry.as_ref().map(|x| Retry {
            codes: x
                .codes
                .iter()
                .filter_map(|c| u16::try_from(*c).ok())
                .collect(),
            attempts: x.attempts.unwrap_or(2),
            backoff: x
                .backoff_ms
                .map_or(Duration::from_millis(25), Duration::from_millis),
        });
        // Gateway API: a zero timeout disables it.
        let timeout = |ms: Option<u64>| ms.filter(|ms| *ms > 0).map(Duration::from_millis);
        Rule {
            matches,
            filters,
            backends: r.backends.iter().map(|b| self.backend(b)).collect(),
            request_timeout: timeout(r.request_timeout_ms),
            backend_request_timeout: timeout(r.backend_request_timeout_ms),
            retry,
            invalid: (!invalid.is_empty()).then(|| invalid.join("; ")),
            at,
        }
    }
}

/// Compiles a route; the errors are what this side could not read (besides what
/// mesh-control reported), each already failing closed where it sits.
pub fn compile(r: &pb::HttpRoute) -> (Route, Vec<String>) {
    let mut c = Compiler { errors: Vec::new() };
    let kind = match pb::RouteKind::try_from(r.kind) {
        Ok(pb::RouteKind::Grpc) => "GRPCRoute",
        _ => "HTTPRoute",
    };
    let rules = r
        .rules
        .iter()
        .enumerate()
        .map(|(i, rule)| Arc::new(c.rule(format!("spec.rules[{i}]"), rule, &r.problems)))
        .collect();
    let route = Route {
        namespace: r.namespace.clone(),
        name: r.name.clone(),
        kind,
        parents: r
            .parents
            .iter()
            .map(|p| Parent {
                namespace: p.namespace.clone(),
                name: p.name.clone(),
                port: port(p.port),
            })
            .collect(),
        rules,
    };
    (route, c.errors)
}

impl Route {
    /// Does this route attach to Service `ns/name` on `port`? Only a Service of the
    /// route's own namespace (mesh-control drops other parents; checked again here).
    pub fn attaches_to(&self, ns: &str, name: &str, port: u16) -> bool {
        self.namespace == ns
            && self
                .parents
                .iter()
                .any(|p| p.namespace == ns && p.name == name && p.port.is_none_or(|p| p == port))
    }
}

/// Precedence key: exact path, then regular expression (Gateway API leaves its rank to
/// the implementation; Istio puts it here), then longest prefix; then method, then the
/// number of header and query matches (higher sorts first).
type Specificity = (u8, usize, u8, usize, usize);

fn specificity(m: &Match) -> Specificity {
    let (kind, len) = match &m.path {
        Some(PathMatch::Exact(v)) => (3, v.len()),
        Some(PathMatch::Regex(r)) => (2, r.as_str().len().saturating_sub(6)),
        Some(PathMatch::Prefix(v)) => (1, v.len()),
        None => (1, 1),
    };
    (
        kind,
        len,
        u8::from(m.method.is_some()),
        m.headers.len(),
        m.query.len(),
    )
}

fn path_matches(p: &PathMatch, path: &str) -> bool {
    match p {
        PathMatch::Exact(v) => path == v,
        PathMatch::Regex(r) => r.is_match(path),
        PathMatch::Prefix(v) => {
            // Per path element: /foo matches /foo and /foo/bar, not /foobar.
            let v = v.trim_end_matches('/');
            v.is_empty()
                || path == v
                || path
                    .strip_prefix(v)
                    .is_some_and(|rest| rest.starts_with('/'))
        }
    }
}

fn value_matches(m: &Value, value: Option<&str>) -> bool {
    match (m, value) {
        (_, None) => false,
        (Value::Exact(e), Some(v)) => v == e,
        (Value::Regex(r), Some(v)) => r.is_match(v),
    }
}

/// A header's values joined with commas, as Envoy (and authorization,
/// `normalize::merged_for_policy`) sees a header sent more than once: a route cannot
/// match on a copy that policy did not see.
fn merged_header<'h>(headers: &'h HeaderMap, name: &str) -> Option<std::borrow::Cow<'h, str>> {
    let mut values = headers.get_all(name).iter();
    let first = values.next()?.to_str().ok()?;
    let mut out = std::borrow::Cow::Borrowed(first);
    for v in values {
        let out = out.to_mut();
        out.push(',');
        out.push_str(v.to_str().ok()?);
    }
    Some(out)
}

/// The parts of a request routing looks at.
pub struct RequestInfo<'a> {
    pub method: &'a Method,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
}

impl Match {
    pub fn matches(&self, r: &RequestInfo<'_>) -> bool {
        if self.never {
            return false;
        }
        if let Some(p) = &self.path
            && !path_matches(p, r.path)
        {
            return false;
        }
        if let Some(m) = &self.method
            && m != r.method.as_str()
        {
            return false;
        }
        if !self
            .headers
            .iter()
            .all(|h| value_matches(&h.value, merged_header(r.headers, &h.name).as_deref()))
        {
            return false;
        }
        let query: Vec<(&str, &str)> = r
            .query
            .unwrap_or_default()
            .split('&')
            .map(|kv| kv.split_once('=').unwrap_or((kv, "")))
            .collect();
        self.query.iter().all(|q| {
            value_matches(
                &q.value,
                query.iter().find(|(k, _)| *k == q.name).map(|(_, v)| *v),
            )
        })
    }
}

/// What routing makes of a request to a Service port.
#[derive(Debug)]
pub enum Routing<'a> {
    /// No route attaches to the Service port: the request goes to the Service itself.
    Unrouted,
    /// Routes attach but none of their rules matches: 404, as Istio answers (the routes
    /// replace the Service's default route; they never fall back to it).
    NoMatch,
    /// This rule of this route handles the request.
    Rule(&'a Route, &'a Arc<Rule>),
}

/// Routes a request among the routes attached to its Service port (`attached`).
pub fn route_request<'a>(
    attached: impl IntoIterator<Item = &'a Route>,
    req: &RequestInfo<'_>,
) -> Routing<'a> {
    let attached: Vec<&Route> = attached.into_iter().collect();
    if attached.is_empty() {
        return Routing::Unrouted;
    }
    match select(attached, req) {
        Some((route, rule)) => Routing::Rule(route, rule),
        None => Routing::NoMatch,
    }
}

/// The rule that handles a request among `routes` (already filtered to its parent), by
/// Gateway API precedence; ties go to the route that sorts first by namespace/name, then
/// to the first rule.
pub fn select<'a>(
    routes: impl IntoIterator<Item = &'a Route>,
    req: &RequestInfo<'_>,
) -> Option<(&'a Route, &'a Arc<Rule>)> {
    let mut sorted: Vec<&Route> = routes.into_iter().collect();
    sorted.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    let mut best: Option<(Specificity, &Route, &Arc<Rule>)> = None;
    let any = Match::default();
    for route in sorted {
        for rule in &route.rules {
            let matches = if rule.matches.is_empty() {
                std::slice::from_ref(&any)
            } else {
                &rule.matches
            };
            for m in matches.iter().filter(|m| m.matches(req)) {
                let key = specificity(m);
                if best.as_ref().is_none_or(|(k, _, _)| key > *k) {
                    best = Some((key, route, rule));
                }
            }
        }
    }
    best.map(|(_, route, rule)| (route, rule))
}

impl Rule {
    /// The PathPrefix value of the rule's match that matches the request, if any (for
    /// ReplacePrefixMatch).
    pub fn matched_prefix(&self, req: &RequestInfo<'_>) -> Option<&str> {
        self.matches
            .iter()
            .filter(|m| m.matches(req))
            .find_map(|m| match &m.path {
                Some(PathMatch::Prefix(p)) => Some(p.as_str()),
                _ => None,
            })
    }

    pub fn total_weight(&self) -> u32 {
        self.backends.iter().map(|b| b.weight).sum()
    }

    /// Picks a backend by weight; `roll` is uniform in [0, total weight).
    pub fn pick_backend(&self, roll: u32) -> Option<&Backend> {
        let mut roll = roll;
        self.backends.iter().filter(|b| b.weight > 0).find(|b| {
            if roll < b.weight {
                true
            } else {
                roll -= b.weight;
                false
            }
        })
    }

    pub fn redirect(&self) -> Option<&Redirect> {
        self.filters.iter().find_map(|f| match f {
            Filter::Redirect(r) => Some(r),
            _ => None,
        })
    }

    pub fn fault(&self) -> Option<&Fault> {
        self.filters.iter().find_map(|f| match f {
            Filter::Fault(x) => Some(x),
            _ => None,
        })
    }

    pub fn mirror(&self) -> Option<&Backend> {
        self.filters.iter().find_map(|f| match f {
            Filter::Mirror(b) => Some(b),
            _ => None,
        })
    }
}

/// The path after a path modifier; `matched_prefix` is the rule's PathPrefix match value.
pub fn modify_path(m: &PathModifier, path: &str, matched_prefix: Option<&str>) -> String {
    match m {
        PathModifier::ReplaceFullPath(p) => p.clone(),
        PathModifier::ReplacePrefixMatch(new) => {
            let prefix = matched_prefix.unwrap_or("/").trim_end_matches('/');
            let rest = path.strip_prefix(prefix).unwrap_or(path);
            let joined = format!("{}{rest}", new.trim_end_matches('/'));
            if joined.is_empty() {
                "/".into()
            } else if joined.starts_with('/') {
                joined
            } else {
                format!("/{joined}")
            }
        }
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
        r.status_code,
        format!("{scheme}://{host}{port}{path}{query}"),
    )
}

#[cfg(test)]
#[path = "compiled_tests.rs"]
mod tests;
