//! HTTPRoute and GRPCRoute (gateway.networking.k8s.io/v1) and HTTPFault
//! (ambient-mesh.dev/v1alpha1), as the Kubernetes API (or a manifest) gives them, read and
//! validated into the typed `mesh.waypoint.v1.HttpRoute`.
//!
//! Reading never fails: what cannot be understood is recorded as a `Problem` where it
//! sits, so the waypoint fails closed on it (a rule with problems answers 500, a match
//! with problems matches nothing, a backend with problems answers 500 for its share), and
//! reported as a [`Finding`] with its field path.

mod fault;
mod filters;
mod matches;
mod reader;

pub use fault::read_fault;

use crate::{Finding, Severity};
use filters::read_filter;
use matches::{read_grpc_match, read_http_match};
use mesh_proto::waypoint as pb;
use reader::Reader;
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
    if ns != namespace {
        // Istio honours a Service parent in another namespace only as a consumer route
        // (it applies to that namespace's own clients); here it would apply to all of the
        // Service's traffic, so another namespace could take it over.
        r.finding(
            Severity::Unsupported,
            &format!("{at}.namespace"),
            format!(
                "a route attaches only to Services in its own namespace ({namespace}); \
                 consumer routes (GAMMA) to Service {ns}/{name} are not supported, so this \
                 parentRef is ignored"
            ),
        );
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

/// A backendRef: a Service. `weighted`: a rule's (weight read), not a mirror's.
pub(super) fn read_backend(
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
        if out.namespace != namespace {
            // Gateway API: only a ReferenceGrant in the backend's namespace allows it.
            r.problem(
                &mut p,
                Severity::Unsupported,
                &format!("{at}.namespace"),
                format!(
                    "cross-namespace backendRef to {}/{} needs a ReferenceGrant, not \
                     supported; requests sent to this backend get 500",
                    out.namespace, out.name
                ),
            );
        }
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
mod tests;
