//! Route filters, HTTPFault ExtensionRefs resolved. What cannot be applied is a problem of
//! the rule: its requests get 500 rather than being handled without the filter.

use super::reader::Reader;
use super::{Faults, Kind, MESH_GROUP, read_backend, read_fault};
use crate::Severity;
use mesh_proto::waypoint as pb;
use serde_json::Value;

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
pub(super) fn read_filter(
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
