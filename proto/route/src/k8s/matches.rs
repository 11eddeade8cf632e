//! HTTPRouteMatch and GRPCRouteMatch. A match with problems matches nothing.

use super::reader::{Reader, check_regex};
use crate::Severity;
use mesh_proto::waypoint as pb;
use serde_json::Value;

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

pub(super) fn read_http_match(r: &mut Reader, at: &str, v: &Value) -> pb::RouteMatch {
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

pub(super) fn read_grpc_match(r: &mut Reader, at: &str, v: &Value) -> pb::RouteMatch {
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
