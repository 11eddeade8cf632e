//! HTTPRoute and GRPCRoute (gateway.networking.k8s.io/v1) and HTTPFault
//! (ambient-mesh.dev/v1alpha1), as the Kubernetes API (or a manifest) gives them, read and
//! validated into the typed `mesh.waypoint.v1.HttpRoute`.
//!
//! Reading never fails: what cannot be understood is recorded as a `Problem` where it
//! sits, so the waypoint fails closed on it (a rule with problems answers 500, a match
//! with problems matches nothing, a backend with problems answers 500 for its share), and
//! reported as a [`Finding`] with its field path.

use crate::{Finding, Severity, parse_duration};
use mesh_proto::waypoint as pb;
use serde_json::{Map, Value};

/// API group of the mesh's own resources (HTTPFault).
pub const MESH_GROUP: &str = "ambient-mesh.dev";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Http,
    Grpc,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Http => "HTTPRoute",
            Kind::Grpc => "GRPCRoute",
        }
    }
}

struct Reader {
    kind: &'static str,
    namespace: String,
    name: String,
    findings: Vec<Finding>,
}

impl Reader {
    fn new(kind: &'static str, namespace: &str, name: &str) -> Reader {
        Reader {
            kind,
            namespace: namespace.to_string(),
            name: name.to_string(),
            findings: Vec::new(),
        }
    }

    fn finding(&mut self, severity: Severity, field: &str, message: String) {
        self.findings.push(Finding {
            kind: self.kind,
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            severity,
            field: field.to_string(),
            message,
        });
    }

    /// A problem where it sits, and its finding.
    fn problem(
        &mut self,
        problems: &mut Vec<pb::Problem>,
        severity: Severity,
        field: &str,
        message: String,
    ) {
        problems.push(pb::Problem {
            field: field.to_string(),
            message: message.clone(),
        });
        self.finding(severity, field, message);
    }

    fn error(&mut self, problems: &mut Vec<pb::Problem>, field: &str, message: String) {
        self.problem(problems, Severity::Error, field, message);
    }

    /// An object whose keys are all in `known`; unknown keys are problems (what they
    /// would mean cannot be applied).
    fn object<'v>(
        &mut self,
        v: &'v Value,
        at: &str,
        known: &[&str],
        problems: &mut Vec<pb::Problem>,
    ) -> Option<&'v Map<String, Value>> {
        let Some(o) = v.as_object() else {
            self.error(problems, at, format!("must be an object, not {}", kind(v)));
            return None;
        };
        for k in o.keys().filter(|k| !known.contains(&k.as_str())) {
            self.error(
                problems,
                &format!("{at}.{k}"),
                format!(
                    "unknown field (this mesh reads: {}); what it would mean cannot be applied",
                    known.join(", ")
                ),
            );
        }
        Some(o)
    }

    /// A list (absent or null: empty).
    fn list<'v>(
        &mut self,
        o: &'v Map<String, Value>,
        key: &str,
        at: &str,
        problems: &mut Vec<pb::Problem>,
    ) -> &'v [Value] {
        match o.get(key) {
            None | Some(Value::Null) => &[],
            Some(Value::Array(a)) => a,
            Some(v) => {
                self.error(
                    problems,
                    &format!("{at}.{key}"),
                    format!("must be a list, not {}", kind(v)),
                );
                &[]
            }
        }
    }

    /// An optional string (absent or null: None).
    fn string<'v>(
        &mut self,
        o: &'v Map<String, Value>,
        key: &str,
        at: &str,
        problems: &mut Vec<pb::Problem>,
    ) -> Option<&'v str> {
        match o.get(key) {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s),
            Some(v) => {
                self.error(
                    problems,
                    &format!("{at}.{key}"),
                    format!("must be a string, not {}", kind(v)),
                );
                None
            }
        }
    }

    /// An optional integer within `range`.
    fn int(
        &mut self,
        o: &Map<String, Value>,
        key: &str,
        at: &str,
        range: std::ops::RangeInclusive<u64>,
        problems: &mut Vec<pb::Problem>,
    ) -> Option<u64> {
        match o.get(key) {
            None | Some(Value::Null) => None,
            Some(v) => match v.as_u64().filter(|n| range.contains(n)) {
                Some(n) => Some(n),
                None => {
                    self.error(
                        problems,
                        &format!("{at}.{key}"),
                        format!(
                            "{v} is not an integer from {} to {}",
                            range.start(),
                            range.end()
                        ),
                    );
                    None
                }
            },
        }
    }

    fn duration_ms(
        &mut self,
        o: &Map<String, Value>,
        key: &str,
        at: &str,
        problems: &mut Vec<pb::Problem>,
    ) -> Option<u64> {
        let s = self.string(o, key, at, problems)?;
        match parse_duration(s) {
            Some(d) => Some(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            None => {
                self.error(
                    problems,
                    &format!("{at}.{key}"),
                    format!("{s:?} is not a duration like 2s, 150ms or 1m30s"),
                );
                None
            }
        }
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// Anchored as the waypoint matches it.
fn check_regex(r: &str) -> Result<(), String> {
    regex_lite::Regex::new(&format!("^(?:{r})$"))
        .map(|_| ())
        .map_err(|e| format!("{r:?} is not a valid regular expression: {e}"))
}

/// HTTPFaults of the route's namespace, by name: their specs, unread.
pub type Faults<'a> = &'a dyn Fn(&str) -> Option<&'a Value>;

/// Reads one HTTPRoute or GRPCRoute (`spec` absent: `{}`). `faults` finds the HTTPFaults
/// of the route's namespace that `ExtensionRef` filters name.
pub fn read_route(
    kind: Kind,
    namespace: &str,
    name: &str,
    spec: Option<&Value>,
    faults: Faults<'_>,
) -> (pb::HttpRoute, Vec<Finding>) {
    let mut r = Reader::new(kind.name(), namespace, name);
    let mut out = pb::HttpRoute {
        namespace: namespace.to_string(),
        name: name.to_string(),
        kind: match kind {
            Kind::Http => pb::RouteKind::Http,
            Kind::Grpc => pb::RouteKind::Grpc,
        } as i32,
        ..Default::default()
    };
    let mut problems = Vec::new();
    let empty = Value::Object(Map::new());
    let spec = match spec {
        None | Some(Value::Null) => &empty,
        Some(s) => s,
    };
    if let Some(o) = r.object(
        spec,
        "spec",
        &["parentRefs", "hostnames", "rules"],
        &mut problems,
    ) {
        for (i, p) in r
            .list(o, "parentRefs", "spec", &mut problems)
            .iter()
            .enumerate()
        {
            if let Some(p) = parent(&mut r, &format!("spec.parentRefs[{i}]"), p, namespace) {
                out.parents.push(p);
            }
        }
        // GAMMA: hostnames do not apply to routes attached to Services.
        r.list(o, "hostnames", "spec", &mut problems);
        for (i, rule) in r.list(o, "rules", "spec", &mut problems).iter().enumerate() {
            out.rules.push(read_rule(
                &mut r,
                kind,
                &format!("spec.rules[{i}]"),
                rule,
                namespace,
                faults,
            ));
        }
    }
    out.problems = problems;
    (out, r.findings)
}

/// A parentRef of kind Service (others, e.g. an ingress Gateway, are not a waypoint's).
fn parent(r: &mut Reader, at: &str, v: &Value, namespace: &str) -> Option<pb::RouteParent> {
    // Not a problem of any rule: a parentRef that cannot be read attaches the route
    // nowhere, and is reported.
    let mut ignored = Vec::new();
    let o = r.object(
        v,
        at,
        &["group", "kind", "namespace", "name", "sectionName", "port"],
        &mut ignored,
    )?;
    let k = r.string(o, "kind", at, &mut ignored).unwrap_or("Gateway");
    // The group defaults to Gateway API's, which has no Service: a Service parent
    // without a group (as often written) is taken as the core Service.
    let group = r.string(o, "group", at, &mut ignored).unwrap_or_default();
    let ns = r
        .string(o, "namespace", at, &mut ignored)
        .unwrap_or(namespace);
    let name = r.string(o, "name", at, &mut ignored).unwrap_or_default();
    let port = r.int(o, "port", at, 1..=65535, &mut ignored);
    if !ignored.is_empty() || !(k == "Service" && (group.is_empty() || group == "core")) {
        return None;
    }
    if name.is_empty() {
        r.finding(Severity::Error, &format!("{at}.name"), "missing".into());
        return None;
    }
    if o.get("sectionName").is_some_and(|s| !s.is_null()) {
        r.finding(
            Severity::Note,
            &format!("{at}.sectionName"),
            "not supported for a Service parent; the route attaches to every port (use port)"
                .into(),
        );
    }
    Some(pb::RouteParent {
        namespace: ns.to_string(),
        name: name.to_string(),
        port: port.map_or(0, |p| p as u32),
    })
}

fn read_rule(
    r: &mut Reader,
    kind: Kind,
    at: &str,
    v: &Value,
    namespace: &str,
    faults: Faults<'_>,
) -> pb::RouteRule {
    let mut out = pb::RouteRule::default();
    let mut p = Vec::new();
    let known: &[&str] = match kind {
        Kind::Http => &[
            "name",
            "matches",
            "filters",
            "backendRefs",
            "timeouts",
            "retry",
            "sessionPersistence",
        ],
        Kind::Grpc => &[
            "name",
            "matches",
            "filters",
            "backendRefs",
            "sessionPersistence",
        ],
    };
    let Some(o) = r.object(v, at, known, &mut p) else {
        out.problems = p;
        return out;
    };
    out.name = r
        .string(o, "name", at, &mut p)
        .unwrap_or_default()
        .to_string();
    for (i, m) in r.list(o, "matches", at, &mut p).iter().enumerate() {
        let here = format!("{at}.matches[{i}]");
        out.matches.push(match kind {
            Kind::Http => read_http_match(r, &here, m),
            Kind::Grpc => read_grpc_match(r, &here, m),
        });
    }
    for (i, f) in r.list(o, "filters", at, &mut p).iter().enumerate() {
        if let Some(f) = read_filter(
            r,
            kind,
            &format!("{at}.filters[{i}]"),
            f,
            namespace,
            faults,
            &mut p,
        ) {
            out.filters.push(f);
        }
    }
    for (i, b) in r.list(o, "backendRefs", at, &mut p).iter().enumerate() {
        let here = format!("{at}.backendRefs[{i}]");
        out.backends
            .push(read_backend(r, &here, b, namespace, true));
    }
    if let Some(t) = o.get("timeouts").filter(|t| !t.is_null()) {
        let here = format!("{at}.timeouts");
        if let Some(to) = r.object(t, &here, &["request", "backendRequest"], &mut p) {
            out.request_timeout_ms = r.duration_ms(to, "request", &here, &mut p);
            out.backend_request_timeout_ms = r.duration_ms(to, "backendRequest", &here, &mut p);
        }
    }
    if let Some(t) = o.get("retry").filter(|t| !t.is_null()) {
        let here = format!("{at}.retry");
        if let Some(ro) = r.object(t, &here, &["codes", "attempts", "backoff"], &mut p) {
            let mut retry = pb::RouteRetry::default();
            for (i, c) in r.list(ro, "codes", &here, &mut p).iter().enumerate() {
                match c.as_u64().filter(|c| (400..=599).contains(c)) {
                    Some(c) => retry.codes.push(c as u32),
                    None => r.error(
                        &mut p,
                        &format!("{here}.codes[{i}]"),
                        format!("{c} is not a status code from 400 to 599"),
                    ),
                }
            }
            retry.attempts = r
                .int(ro, "attempts", &here, 0..=1000, &mut p)
                .map(|a| a as u32);
            retry.backoff_ms = r.duration_ms(ro, "backoff", &here, &mut p);
            out.retry = Some(retry);
        }
    }
    if o.get("sessionPersistence").is_some_and(|s| !s.is_null()) {
        r.finding(
            Severity::Note,
            &format!("{at}.sessionPersistence"),
            "not supported; requests are balanced without it".into(),
        );
    }
    out.problems = p;
    out
}

fn value_match(
    r: &mut Reader,
    at: &str,
    v: &Value,
    p: &mut Vec<pb::Problem>,
    header: bool,
) -> Option<pb::ValueMatch> {
    use pb::value_match::Kind as K;
    let o = r.object(v, at, &["type", "name", "value"], p)?;
    let name = r.string(o, "name", at, p).unwrap_or_default();
    if name.is_empty() {
        r.error(p, &format!("{at}.name"), "missing".into());
        return None;
    }
    if header && http::HeaderName::from_bytes(name.as_bytes()).is_err() {
        r.error(
            p,
            &format!("{at}.name"),
            format!("{name:?} is not a header name"),
        );
        return None;
    }
    let value = r.string(o, "value", at, p).unwrap_or_default().to_string();
    let kind = match r.string(o, "type", at, p).unwrap_or("Exact") {
        "Exact" => K::Exact(value),
        "RegularExpression" => match check_regex(&value) {
            Ok(()) => K::Regex(value),
            Err(e) => {
                r.error(p, &format!("{at}.value"), e);
                return None;
            }
        },
        other => {
            r.problem(
                p,
                Severity::Unsupported,
                &format!("{at}.type"),
                format!("{other:?} is not Exact or RegularExpression; the match matches nothing"),
            );
            return None;
        }
    };
    Some(pb::ValueMatch {
        name: if header {
            name.to_ascii_lowercase()
        } else {
            name.to_string()
        },
        kind: Some(kind),
    })
}

const METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

fn read_http_match(r: &mut Reader, at: &str, v: &Value) -> pb::RouteMatch {
    use pb::path_match::Kind as K;
    let mut p = Vec::new();
    let mut out = pb::RouteMatch::default();
    let Some(o) = r.object(v, at, &["path", "headers", "queryParams", "method"], &mut p) else {
        out.problems = p;
        return out;
    };
    if let Some(path) = o.get("path").filter(|v| !v.is_null()) {
        let here = format!("{at}.path");
        if let Some(po) = r.object(path, &here, &["type", "value"], &mut p) {
            let value = r
                .string(po, "value", &here, &mut p)
                .unwrap_or("/")
                .to_string();
            let kind = match r.string(po, "type", &here, &mut p).unwrap_or("PathPrefix") {
                "Exact" | "PathPrefix" if !value.starts_with('/') => {
                    r.error(
                        &mut p,
                        &format!("{here}.value"),
                        format!("{value:?} does not start with /"),
                    );
                    None
                }
                "Exact" => Some(K::Exact(value)),
                "PathPrefix" => Some(K::Prefix(value)),
                "RegularExpression" => match check_regex(&value) {
                    Ok(()) => Some(K::Regex(value)),
                    Err(e) => {
                        r.error(&mut p, &format!("{here}.value"), e);
                        None
                    }
                },
                other => {
                    r.problem(
                        &mut p,
                        Severity::Unsupported,
                        &format!("{here}.type"),
                        format!(
                            "{other:?} is not Exact, PathPrefix or RegularExpression; the match matches nothing"
                        ),
                    );
                    None
                }
            };
            out.path = Some(pb::PathMatch { kind });
        }
    }
    for (i, h) in r.list(o, "headers", at, &mut p).iter().enumerate() {
        if let Some(m) = value_match(r, &format!("{at}.headers[{i}]"), h, &mut p, true) {
            out.headers.push(m);
        }
    }
    for (i, q) in r.list(o, "queryParams", at, &mut p).iter().enumerate() {
        if let Some(m) = value_match(r, &format!("{at}.queryParams[{i}]"), q, &mut p, false) {
            out.query_params.push(m);
        }
    }
    if let Some(m) = r.string(o, "method", at, &mut p) {
        if METHODS.contains(&m) {
            out.method = m.to_string();
        } else {
            r.error(
                &mut p,
                &format!("{at}.method"),
                format!("{m:?} is not one of {}", METHODS.join(", ")),
            );
        }
    }
    out.problems = p;
    out
}

fn read_grpc_match(r: &mut Reader, at: &str, v: &Value) -> pb::RouteMatch {
    let mut p = Vec::new();
    let mut out = pb::RouteMatch::default();
    let Some(o) = r.object(v, at, &["method", "headers"], &mut p) else {
        out.problems = p;
        return out;
    };
    if let Some(m) = o.get("method").filter(|v| !v.is_null()) {
        let here = format!("{at}.method");
        if let Some(mo) = r.object(m, &here, &["type", "service", "method"], &mut p) {
            let service = r.string(mo, "service", &here, &mut p).unwrap_or_default();
            let method = r.string(mo, "method", &here, &mut p).unwrap_or_default();
            let t = match r.string(mo, "type", &here, &mut p).unwrap_or("Exact") {
                "Exact" => {
                    for (k, part) in [("service", service), ("method", method)] {
                        if part.contains('/') {
                            r.error(
                                &mut p,
                                &format!("{here}.{k}"),
                                format!("{part:?} contains '/'"),
                            );
                        }
                    }
                    pb::GrpcMatchType::Exact
                }
                "RegularExpression" => {
                    for (k, part) in [("service", service), ("method", method)] {
                        if let Err(e) = check_regex(part) {
                            r.error(&mut p, &format!("{here}.{k}"), e);
                        }
                    }
                    pb::GrpcMatchType::RegularExpression
                }
                other => {
                    r.problem(
                        &mut p,
                        Severity::Unsupported,
                        &format!("{here}.type"),
                        format!(
                            "{other:?} is not Exact or RegularExpression; the match matches nothing"
                        ),
                    );
                    pb::GrpcMatchType::Unspecified
                }
            };
            out.grpc_method = Some(pb::GrpcMethodMatch {
                r#type: t as i32,
                service: service.to_string(),
                method: method.to_string(),
            });
        }
    }
    for (i, h) in r.list(o, "headers", at, &mut p).iter().enumerate() {
        if let Some(m) = value_match(r, &format!("{at}.headers[{i}]"), h, &mut p, true) {
            out.headers.push(m);
        }
    }
    out.problems = p;
    out
}

/// Filter types and the field each one's configuration is in.
const FILTERS: [(&str, &str); 6] = [
    ("RequestHeaderModifier", "requestHeaderModifier"),
    ("ResponseHeaderModifier", "responseHeaderModifier"),
    ("RequestRedirect", "requestRedirect"),
    ("URLRewrite", "urlRewrite"),
    ("RequestMirror", "requestMirror"),
    ("ExtensionRef", "extensionRef"),
];

/// One filter; what cannot be applied is a problem of the rule (`rule`), so that its
/// requests get 500 rather than being handled without the filter.
fn read_filter(
    r: &mut Reader,
    kind: Kind,
    at: &str,
    v: &Value,
    namespace: &str,
    faults: Faults<'_>,
    rule: &mut Vec<pb::Problem>,
) -> Option<pb::RouteFilter> {
    use pb::route_filter::Kind as F;
    let known: Vec<&str> = std::iter::once("type")
        .chain(FILTERS.iter().map(|(_, f)| *f))
        .chain(["cors", "externalAuth"])
        .collect();
    let o = r.object(v, at, &known, rule)?;
    let t = r.string(o, "type", at, rule)?;
    let allowed = match kind {
        Kind::Http => true,
        Kind::Grpc => !matches!(t, "RequestRedirect" | "URLRewrite"),
    };
    let Some((_, field)) = FILTERS.iter().find(|(ty, _)| *ty == t).filter(|_| allowed) else {
        r.problem(
            rule,
            Severity::Unsupported,
            &format!("{at}.type"),
            format!(
                "{t:?} is not a filter this mesh applies to a {}; the rule's requests get 500",
                kind.name()
            ),
        );
        return None;
    };
    for (_, other) in FILTERS.iter().filter(|(_, f)| f != field) {
        if o.get(*other).is_some_and(|v| !v.is_null()) {
            r.error(
                rule,
                &format!("{at}.{other}"),
                format!("not allowed with type {t}"),
            );
            return None;
        }
    }
    let here = format!("{at}.{field}");
    let Some(cfg) = o.get(*field).filter(|v| !v.is_null()) else {
        r.error(rule, &here, format!("missing (type is {t})"));
        return None;
    };
    let before = rule.len();
    let f = match t {
        "RequestHeaderModifier" => {
            header_modifier(r, &here, cfg, rule).map(F::RequestHeaderModifier)
        }
        "ResponseHeaderModifier" => {
            header_modifier(r, &here, cfg, rule).map(F::ResponseHeaderModifier)
        }
        "RequestRedirect" => redirect(r, &here, cfg, rule).map(F::RequestRedirect),
        "URLRewrite" => rewrite(r, &here, cfg, rule).map(F::UrlRewrite),
        "RequestMirror" => {
            let mo = r.object(cfg, &here, &["backendRef", "percent", "fraction"], rule)?;
            for k in ["percent", "fraction"] {
                if mo.get(k).is_some_and(|v| !v.is_null()) {
                    r.problem(
                        rule,
                        Severity::Unsupported,
                        &format!("{here}.{k}"),
                        "mirroring a fraction of requests is not supported".into(),
                    );
                }
            }
            match mo.get("backendRef") {
                Some(b) if !b.is_null() => {
                    let backend =
                        read_backend(r, &format!("{here}.backendRef"), b, namespace, false);
                    rule.extend(backend.problems.iter().cloned());
                    Some(F::RequestMirror(pb::RequestMirror {
                        backend: Some(backend),
                    }))
                }
                _ => {
                    r.error(rule, &format!("{here}.backendRef"), "missing".into());
                    None
                }
            }
        }
        _ => extension_ref(r, &here, cfg, namespace, faults, rule).map(F::Fault),
    };
    (rule.len() == before)
        .then_some(f)
        .flatten()
        .map(|k| pb::RouteFilter { kind: Some(k) })
}

fn header_modifier(
    r: &mut Reader,
    at: &str,
    v: &Value,
    p: &mut Vec<pb::Problem>,
) -> Option<pb::HeaderModifier> {
    let o = r.object(v, at, &["set", "add", "remove"], p)?;
    let mut out = pb::HeaderModifier::default();
    for key in ["set", "add"] {
        for (i, h) in r.list(o, key, at, p).iter().enumerate() {
            let here = format!("{at}.{key}[{i}]");
            let Some(ho) = r.object(h, &here, &["name", "value"], p) else {
                continue;
            };
            let name = r.string(ho, "name", &here, p).unwrap_or_default();
            let value = r.string(ho, "value", &here, p).unwrap_or_default();
            if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                r.error(
                    p,
                    &format!("{here}.name"),
                    format!("{name:?} is not a header name"),
                );
            } else if http::HeaderValue::from_str(value).is_err() {
                r.error(
                    p,
                    &format!("{here}.value"),
                    format!("{value:?} is not a header value"),
                );
            } else {
                let h = pb::Header {
                    name: name.to_ascii_lowercase(),
                    value: value.to_string(),
                };
                if key == "set" {
                    out.set.push(h);
                } else {
                    out.add.push(h);
                }
            }
        }
    }
    for (i, h) in r.list(o, "remove", at, p).iter().enumerate() {
        match h
            .as_str()
            .filter(|n| http::HeaderName::from_bytes(n.as_bytes()).is_ok())
        {
            Some(n) => out.remove.push(n.to_ascii_lowercase()),
            None => r.error(
                p,
                &format!("{at}.remove[{i}]"),
                format!("{h} is not a header name"),
            ),
        }
    }
    Some(out)
}

fn path_modifier(
    r: &mut Reader,
    at: &str,
    v: &Value,
    p: &mut Vec<pb::Problem>,
) -> Option<pb::PathModifier> {
    use pb::path_modifier::Kind as K;
    let o = r.object(v, at, &["type", "replaceFullPath", "replacePrefixMatch"], p)?;
    let (kind, field) = match r.string(o, "type", at, p) {
        Some("ReplaceFullPath") => (K::ReplaceFullPath as fn(String) -> K, "replaceFullPath"),
        Some("ReplacePrefixMatch") => (
            K::ReplacePrefixMatch as fn(String) -> K,
            "replacePrefixMatch",
        ),
        other => {
            r.error(
                p,
                &format!("{at}.type"),
                format!("{other:?} is not ReplaceFullPath or ReplacePrefixMatch"),
            );
            return None;
        }
    };
    let value = r.string(o, field, at, p).unwrap_or("/");
    if value.bytes().any(|b| !b.is_ascii_graphic()) || !value.starts_with('/') {
        r.error(
            p,
            &format!("{at}.{field}"),
            format!("{value:?} is not a path (starting with /, without spaces)"),
        );
        return None;
    }
    Some(pb::PathModifier {
        kind: Some(kind(value.to_string())),
    })
}

/// What the Gateway API allows in a redirect, so that every redirect the waypoint answers
/// is a valid response (a status it can send, a `Location` it can write).
fn redirect(
    r: &mut Reader,
    at: &str,
    v: &Value,
    p: &mut Vec<pb::Problem>,
) -> Option<pb::RequestRedirect> {
    let o = r.object(
        v,
        at,
        &["scheme", "hostname", "path", "port", "statusCode"],
        p,
    )?;
    let mut out = pb::RequestRedirect::default();
    if let Some(s) = r.string(o, "scheme", at, p) {
        if s == "http" || s == "https" {
            out.scheme = s.to_string();
        } else {
            r.error(
                p,
                &format!("{at}.scheme"),
                format!("{s:?} is not http or https"),
            );
        }
    }
    if let Some(h) = r.string(o, "hostname", at, p) {
        if hostname_ok(h) {
            out.hostname = h.to_string();
        } else {
            r.error(
                p,
                &format!("{at}.hostname"),
                format!("{h:?} is not a hostname"),
            );
        }
    }
    if let Some(path) = o.get("path").filter(|v| !v.is_null()) {
        out.path = path_modifier(r, &format!("{at}.path"), path, p);
    }
    out.port = r.int(o, "port", at, 1..=65535, p).unwrap_or(0) as u32;
    if let Some(c) = o.get("statusCode").filter(|v| !v.is_null()) {
        match c.as_u64().filter(|c| [301, 302, 303, 307, 308].contains(c)) {
            Some(c) => out.status_code = c as u32,
            None => r.error(
                p,
                &format!("{at}.statusCode"),
                format!("{c} is not 301, 302, 303, 307 or 308"),
            ),
        }
    }
    Some(out)
}

fn hostname_ok(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 253
        && h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

fn rewrite(
    r: &mut Reader,
    at: &str,
    v: &Value,
    p: &mut Vec<pb::Problem>,
) -> Option<pb::UrlRewrite> {
    let o = r.object(v, at, &["hostname", "path"], p)?;
    let mut out = pb::UrlRewrite::default();
    if let Some(h) = r.string(o, "hostname", at, p) {
        if hostname_ok(h) {
            out.hostname = h.to_string();
        } else {
            r.error(
                p,
                &format!("{at}.hostname"),
                format!("{h:?} is not a hostname"),
            );
        }
    }
    if let Some(path) = o.get("path").filter(|v| !v.is_null()) {
        out.path = path_modifier(r, &format!("{at}.path"), path, p);
    }
    Some(out)
}

/// An ExtensionRef: only our HTTPFault, resolved here; one that cannot be resolved (or is
/// invalid) is a problem of the rule (Gateway API: 500, never skipped).
fn extension_ref(
    r: &mut Reader,
    at: &str,
    v: &Value,
    namespace: &str,
    faults: Faults<'_>,
    p: &mut Vec<pb::Problem>,
) -> Option<pb::HttpFault> {
    let o = r.object(v, at, &["group", "kind", "name"], p)?;
    let group = r.string(o, "group", at, p).unwrap_or_default();
    let kind = r.string(o, "kind", at, p).unwrap_or_default();
    let name = r.string(o, "name", at, p).unwrap_or_default();
    if (group, kind) != (MESH_GROUP, "HTTPFault") {
        r.problem(
            p,
            Severity::Unsupported,
            at,
            format!(
                "{kind:?} in group {group:?} is not an extension this mesh knows (HTTPFault in {MESH_GROUP}); the rule's requests get 500"
            ),
        );
        return None;
    }
    let Some(spec) = faults(name) else {
        r.error(
            p,
            &format!("{at}.name"),
            format!("HTTPFault {namespace}/{name} does not exist; the rule's requests get 500"),
        );
        return None;
    };
    let (fault, findings) = read_fault(namespace, name, Some(spec));
    match (
        fault,
        findings.iter().find(|f| f.severity != Severity::Note),
    ) {
        (Some(f), None) => Some(f),
        (_, first) => {
            r.error(
                p,
                &format!("{at}.name"),
                format!(
                    "HTTPFault {namespace}/{name} is invalid ({}); the rule's requests get 500",
                    first.map_or_else(String::new, |f| format!("{}: {}", f.field, f.message))
                ),
            );
            None
        }
    }
}

/// A backendRef: a Service. `weighted`: a rule's (weight read), not a mirror's.
fn read_backend(
    r: &mut Reader,
    at: &str,
    v: &Value,
    namespace: &str,
    weighted: bool,
) -> pb::RouteBackend {
    let mut p = Vec::new();
    let mut out = pb::RouteBackend {
        weight: 1,
        ..Default::default()
    };
    let known: &[&str] = if weighted {
        &[
            "group",
            "kind",
            "name",
            "namespace",
            "port",
            "weight",
            "filters",
        ]
    } else {
        &["group", "kind", "name", "namespace", "port"]
    };
    if let Some(o) = r.object(v, at, known, &mut p) {
        let group = r.string(o, "group", at, &mut p).unwrap_or_default();
        let kind = r.string(o, "kind", at, &mut p).unwrap_or("Service");
        if !(kind == "Service" && (group.is_empty() || group == "core")) {
            r.problem(
                &mut p,
                Severity::Unsupported,
                at,
                format!(
                    "{kind:?} in group {group:?} is not a backend this mesh can send to (Service)"
                ),
            );
        }
        out.name = r
            .string(o, "name", at, &mut p)
            .unwrap_or_default()
            .to_string();
        if out.name.is_empty() {
            r.error(&mut p, &format!("{at}.name"), "missing".into());
        }
        out.namespace = r
            .string(o, "namespace", at, &mut p)
            .unwrap_or(namespace)
            .to_string();
        out.port = r.int(o, "port", at, 1..=65535, &mut p).unwrap_or(0) as u32;
        if weighted {
            out.weight = r.int(o, "weight", at, 0..=1_000_000, &mut p).unwrap_or(1) as u32;
            if !r.list(o, "filters", at, &mut p).is_empty() {
                r.problem(
                    &mut p,
                    Severity::Unsupported,
                    &format!("{at}.filters"),
                    "per-backend filters are not supported; requests sent to this backend get 500"
                        .into(),
                );
            }
        }
    }
    out.problems = p;
    out
}

/// Reads one HTTPFault spec (Istio's HTTPFaultInjection shape). None: nothing of it can
/// be applied; findings name the fields.
pub fn read_fault(
    namespace: &str,
    name: &str,
    spec: Option<&Value>,
) -> (Option<pb::HttpFault>, Vec<Finding>) {
    let mut r = Reader::new("HTTPFault", namespace, name);
    let mut p = Vec::new();
    let null = Value::Null;
    let v = spec.unwrap_or(&null);
    let Some(o) = r.object(v, "spec", &["delay", "abort"], &mut p) else {
        return (None, r.findings);
    };
    let mut out = pb::HttpFault::default();
    let percentage =
        |r: &mut Reader, o: &Map<String, Value>, at: &str, p: &mut Vec<pb::Problem>| {
            let v = o.get("percentage").filter(|v| !v.is_null())?;
            let here = format!("{at}.percentage");
            let po = r.object(v, &here, &["value"], p)?;
            match po
                .get("value")
                .and_then(Value::as_f64)
                .filter(|v| (0.0..=100.0).contains(v))
            {
                Some(v) => Some(v),
                None => {
                    r.error(
                        p,
                        &format!("{here}.value"),
                        format!(
                            "{} is not a number within 0..100",
                            po.get("value").unwrap_or(&Value::Null)
                        ),
                    );
                    None
                }
            }
        };
    if let Some(d) = o.get("delay").filter(|v| !v.is_null())
        && let Some(d) = r.object(d, "spec.delay", &["fixedDelay", "percentage"], &mut p)
    {
        let fixed = r.duration_ms(d, "fixedDelay", "spec.delay", &mut p);
        if fixed.is_none() && !d.contains_key("fixedDelay") {
            r.error(&mut p, "spec.delay.fixedDelay", "missing".into());
        }
        let pct = percentage(&mut r, d, "spec.delay", &mut p);
        out.delay = fixed.map(|ms| pb::FaultDelay {
            fixed_delay_ms: ms,
            percentage: pct,
        });
    }
    if let Some(a) = o.get("abort").filter(|v| !v.is_null())
        && let Some(a) = r.object(a, "spec.abort", &["httpStatus", "percentage"], &mut p)
    {
        let status = r.int(a, "httpStatus", "spec.abort", 200..=599, &mut p);
        if status.is_none() && !a.contains_key("httpStatus") {
            r.error(&mut p, "spec.abort.httpStatus", "missing".into());
        }
        let pct = percentage(&mut r, a, "spec.abort", &mut p);
        out.abort = status.map(|s| pb::FaultAbort {
            http_status: s as u32,
            percentage: pct,
        });
    }
    if p.is_empty() && out.delay.is_none() && out.abort.is_none() {
        r.error(&mut p, "spec", "needs a delay or an abort".into());
    }
    ((p.is_empty()).then_some(out), r.findings)
}

/// Every problem recorded in a route, with its field.
pub fn problems(route: &pb::HttpRoute) -> Vec<&pb::Problem> {
    let mut out: Vec<&pb::Problem> = route.problems.iter().collect();
    for rule in &route.rules {
        out.extend(&rule.problems);
        out.extend(rule.matches.iter().flat_map(|m| &m.problems));
        out.extend(rule.backends.iter().flat_map(|b| &b.problems));
    }
    out
}

#[cfg(test)]
#[path = "k8s_tests.rs"]
mod tests;
