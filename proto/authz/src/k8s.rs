//! A `security.istio.io/v1` AuthorizationPolicy, as the Kubernetes API (or a manifest)
//! gives it, read and validated into the typed `mesh.waypoint.v1.AuthorizationPolicy`.
//!
//! Reading never fails: what cannot be understood is recorded as a `Problem` where it
//! sits (so every consumer fails closed on it) and reported as a [`Finding`] with its
//! field path. What Istio knows but no component of this mesh evaluates (JWT attributes,
//! the CUSTOM action) is kept typed and reported as [`Severity::Unsupported`].

use mesh_proto::waypoint as pb;
use serde_json::{Map, Value};
use std::collections::BTreeMap;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// Not a valid AuthorizationPolicy here: enforced fail closed.
    Error,
    /// Valid for Istio, not evaluated by this mesh: enforced fail closed.
    Unsupported,
    /// Valid, but enforced somewhere other than one might expect (e.g. HTTP attributes
    /// at L4); a note.
    Note,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    pub severity: Severity,
    /// `spec.rules[0].from[0].source.ipBlocks[0]`.
    pub field: String,
    pub message: String,
}

const DRY_RUN: &str = "istio.io/dry-run";

struct Reader {
    findings: Vec<Finding>,
}

impl Reader {
    fn error(&mut self, problems: &mut Vec<pb::Problem>, field: &str, message: String) {
        problems.push(pb::Problem {
            field: field.to_string(),
            message: message.clone(),
        });
        self.findings.push(Finding {
            severity: Severity::Error,
            field: field.to_string(),
            message,
        });
    }

    fn unsupported(&mut self, field: &str, message: &str) {
        self.findings.push(Finding {
            severity: Severity::Unsupported,
            field: field.to_string(),
            message: message.to_string(),
        });
    }

    /// An object whose keys are all in `known`; unknown keys are problems.
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
                    "unknown field (this mesh reads: {}); what it would mean cannot be enforced",
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

    /// A list of strings, each converted by `f` (an error is a problem at its index).
    /// A list with an item that cannot be read is dropped whole: the items that could be
    /// read must not decide the field alone (in a DENY, `paths: ["/admin*", <unreadable>]`
    /// would otherwise stop denying whatever the unreadable item names).
    fn strings<T>(
        &mut self,
        o: &Map<String, Value>,
        key: &str,
        at: &str,
        problems: &mut Vec<pb::Problem>,
        f: impl Fn(&str) -> Result<T, String>,
    ) -> Vec<T> {
        let before = problems.len();
        let out = self.each_string(o, key, at, problems, f);
        if problems.len() > before {
            Vec::new()
        } else {
            out
        }
    }

    fn each_string<T>(
        &mut self,
        o: &Map<String, Value>,
        key: &str,
        at: &str,
        problems: &mut Vec<pb::Problem>,
        f: impl Fn(&str) -> Result<T, String>,
    ) -> Vec<T> {
        let mut out = Vec::new();
        for (i, v) in self.list(o, key, at, problems).iter().enumerate() {
            let here = format!("{at}.{key}[{i}]");
            match v.as_str() {
                Some(s) => match f(s) {
                    Ok(t) => out.push(t),
                    Err(e) => self.error(problems, &here, e),
                },
                None => self.error(
                    problems,
                    &here,
                    format!("must be a string, not {}", kind(v)),
                ),
            }
        }
        out
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

/// Istio's string forms: `*` (present), `x*` (prefix), `*x` (suffix), else exact; a `*`
/// anywhere else is not a wildcard Istio accepts.
pub fn glob(s: &str) -> Result<pb::AuthzStringMatch, String> {
    use pb::authz_string_match::Kind;
    let inner = |t: &str| !t.contains('*');
    let kind = if s == "*" {
        Kind::Presence(())
    } else if let Some(rest) = s.strip_prefix('*').filter(|r| inner(r)) {
        Kind::Suffix(rest.to_string())
    } else if let Some(rest) = s.strip_suffix('*').filter(|r| inner(r)) {
        Kind::Prefix(rest.to_string())
    } else if inner(s) {
        Kind::Exact(s.to_string())
    } else {
        return Err(format!(
            "{s:?}: `*` may only be the whole value, its first or its last character"
        ));
    };
    Ok(pb::AuthzStringMatch { kind: Some(kind) })
}

fn principal(s: &str) -> Result<pb::AuthzStringMatch, String> {
    glob(s.strip_prefix("spiffe://").unwrap_or(s))
}

fn path(s: &str) -> Result<pb::AuthzStringMatch, String> {
    if s.contains("{*}") || s.contains("{**}") {
        return Err(format!(
            "{s:?}: path templates ({{*}}, {{**}}) are not supported"
        ));
    }
    glob(s)
}

fn cidr(s: &str) -> Result<pb::Cidr, String> {
    let n = crate::IpNet::parse(s)?;
    Ok(pb::Cidr {
        address: crate::ip_bytes(n.addr),
        prefix_len: u32::from(n.prefix),
    })
}

fn port(s: &str) -> Result<u32, String> {
    s.parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .map(u32::from)
        .ok_or_else(|| format!("{s:?} is not a port (1 to 65535)"))
}

fn service_account(ns: &str) -> impl Fn(&str) -> Result<pb::ServiceAccountRef, String> + '_ {
    move |s| {
        let (n, sa) = s.split_once('/').unwrap_or((ns, s));
        if n.is_empty() || sa.is_empty() || sa.contains('/') {
            return Err(format!("{s:?} is not `name` or `namespace/name`"));
        }
        Ok(pb::ServiceAccountRef {
            namespace: n.to_string(),
            name: sa.to_string(),
        })
    }
}

/// Reads one AuthorizationPolicy (`spec` absent: `{}`).
pub fn read(
    namespace: &str,
    name: &str,
    annotations: &BTreeMap<String, String>,
    spec: Option<&Value>,
) -> (pb::AuthorizationPolicy, Vec<Finding>) {
    let mut r = Reader {
        findings: Vec::new(),
    };
    let mut out = pb::AuthorizationPolicy {
        namespace: namespace.to_string(),
        name: name.to_string(),
        action: pb::AuthzAction::Allow as i32,
        dry_run: false,
        ..Default::default()
    };
    let mut problems = Vec::new();
    match annotations.get(DRY_RUN).map(String::as_str) {
        None | Some("false") => {}
        Some("true") => out.dry_run = true,
        Some(v) => r.error(
            &mut problems,
            &format!("metadata.annotations[{DRY_RUN}]"),
            format!("{v:?} is neither \"true\" nor \"false\""),
        ),
    }
    let empty = Value::Object(Map::new());
    let spec = match spec {
        None | Some(Value::Null) => &empty,
        Some(s) => s,
    };
    const SPEC: [&str; 6] = [
        "selector",
        "targetRef",
        "targetRefs",
        "action",
        "provider",
        "rules",
    ];
    let Some(o) = r.object(spec, "spec", &SPEC, &mut problems) else {
        out.problems = problems;
        return (out, r.findings);
    };
    let action = match o.get("action") {
        None | Some(Value::Null) => Some("ALLOW"),
        Some(v) => v.as_str(),
    };
    out.action = match action {
        Some("ALLOW") => pb::AuthzAction::Allow,
        Some("DENY") => pb::AuthzAction::Deny,
        Some("AUDIT") => pb::AuthzAction::Audit,
        Some("CUSTOM") => {
            r.unsupported(
                "spec.action",
                "CUSTOM: this mesh has no external authorizer; the policy denies whatever its rules match",
            );
            pb::AuthzAction::Custom
        }
        _ => {
            r.error(
                &mut problems,
                "spec.action",
                format!(
                    "{} is not ALLOW, DENY, AUDIT or CUSTOM; the policy denies everything in its scope",
                    o.get("action").map(Value::to_string).unwrap_or_default()
                ),
            );
            pb::AuthzAction::Unspecified
        }
    } as i32;
    if o.get("provider").is_some_and(|p| !p.is_null()) && action != Some("CUSTOM") {
        r.error(
            &mut problems,
            "spec.provider",
            "only a CUSTOM policy names a provider".into(),
        );
    }
    if let Some(sel) = o.get("selector").filter(|s| !s.is_null())
        && let Some(so) = r.object(sel, "spec.selector", &["matchLabels"], &mut problems)
    {
        match so.get("matchLabels") {
            None | Some(Value::Null) => {}
            Some(Value::Object(labels)) => {
                for (k, v) in labels {
                    match v.as_str() {
                        Some(v) => {
                            out.selector.insert(k.clone(), v.to_string());
                        }
                        None => r.error(
                            &mut problems,
                            &format!("spec.selector.matchLabels.{k}"),
                            format!("must be a string, not {}", kind(v)),
                        ),
                    }
                }
            }
            Some(v) => r.error(
                &mut problems,
                "spec.selector.matchLabels",
                format!("must be an object, not {}", kind(v)),
            ),
        }
    }
    let mut refs: Vec<(String, &Value)> = Vec::new();
    if let Some(t) = o.get("targetRef").filter(|t| !t.is_null()) {
        refs.push(("spec.targetRef".into(), t));
    }
    for (i, t) in r
        .list(o, "targetRefs", "spec", &mut problems)
        .iter()
        .enumerate()
    {
        refs.push((format!("spec.targetRefs[{i}]"), t));
    }
    let has_refs = !refs.is_empty();
    for (at, t) in refs {
        if let Some(t) = target(&mut r, &at, t, namespace, &mut problems) {
            out.targets.push(t);
        }
    }
    if has_refs && !out.selector.is_empty() {
        r.error(
            &mut problems,
            "spec.selector",
            "a policy has a selector or targetRefs, not both".into(),
        );
    }
    for (i, rule) in r.list(o, "rules", "spec", &mut problems).iter().enumerate() {
        out.rules.push(read_rule(
            &mut r,
            &format!("spec.rules[{i}]"),
            rule,
            namespace,
        ));
    }
    out.problems = problems;
    (out, r.findings)
}

fn target(
    r: &mut Reader,
    at: &str,
    t: &Value,
    namespace: &str,
    problems: &mut Vec<pb::Problem>,
) -> Option<pb::PolicyTarget> {
    let o = r.object(t, at, &["group", "kind", "name", "namespace"], problems)?;
    let s = |k: &str| o.get(k).and_then(Value::as_str).unwrap_or_default();
    // A reference this mesh cannot follow is a problem of the whole policy (enforced
    // fail closed, in its namespace when nothing else is left to target): ignoring it
    // would leave a DENY enforced nowhere.
    if !s("namespace").is_empty() && s("namespace") != namespace {
        r.error(
            problems,
            &format!("{at}.namespace"),
            "a policy can only target objects in its own namespace".into(),
        );
        return None;
    }
    let kind = match (s("group"), s("kind")) {
        ("gateway.networking.k8s.io", "Gateway") => pb::TargetKind::Gateway,
        ("" | "core", "Service") => pb::TargetKind::Service,
        (g, k) => {
            r.error(
                problems,
                at,
                format!("{k:?} in group {g:?} cannot be targeted in this mesh (Gateway, Service)"),
            );
            return None;
        }
    };
    if s("name").is_empty() {
        r.error(problems, &format!("{at}.name"), "missing".into());
        return None;
    }
    Some(pb::PolicyTarget {
        kind: kind as i32,
        name: s("name").to_string(),
    })
}

fn read_rule(r: &mut Reader, at: &str, rule: &Value, ns: &str) -> pb::AuthzRule {
    let mut out = pb::AuthzRule::default();
    let mut problems = Vec::new();
    let Some(o) = r.object(rule, at, &["from", "to", "when"], &mut problems) else {
        out.problems = problems;
        return out;
    };
    for (i, f) in r.list(o, "from", at, &mut problems).iter().enumerate() {
        let here = format!("{at}.from[{i}]");
        let Some(fo) = r.object(f, &here, &["source"], &mut problems) else {
            continue;
        };
        match fo.get("source") {
            Some(s) if !s.is_null() => {
                out.from
                    .push(read_source(r, &format!("{here}.source"), s, ns))
            }
            _ => r.error(&mut problems, &format!("{here}.source"), "missing".into()),
        }
    }
    for (i, t) in r.list(o, "to", at, &mut problems).iter().enumerate() {
        let here = format!("{at}.to[{i}]");
        let Some(to) = r.object(t, &here, &["operation"], &mut problems) else {
            continue;
        };
        match to.get("operation") {
            Some(op) if !op.is_null() => {
                out.to
                    .push(read_operation(r, &format!("{here}.operation"), op))
            }
            _ => r.error(
                &mut problems,
                &format!("{here}.operation"),
                "missing".into(),
            ),
        }
    }
    for (i, c) in r.list(o, "when", at, &mut problems).iter().enumerate() {
        out.when
            .push(read_condition(r, &format!("{at}.when[{i}]"), c));
    }
    out.problems = problems;
    out
}

fn read_source(r: &mut Reader, at: &str, v: &Value, ns: &str) -> pb::AuthzSource {
    const KNOWN: [&str; 12] = [
        "principals",
        "notPrincipals",
        "requestPrincipals",
        "notRequestPrincipals",
        "namespaces",
        "notNamespaces",
        "serviceAccounts",
        "notServiceAccounts",
        "ipBlocks",
        "notIpBlocks",
        "remoteIpBlocks",
        "notRemoteIpBlocks",
    ];
    let mut p = Vec::new();
    let mut s = pb::AuthzSource::default();
    if let Some(o) = r.object(v, at, &KNOWN, &mut p) {
        s.principals = r.strings(o, "principals", at, &mut p, principal);
        s.not_principals = r.strings(o, "notPrincipals", at, &mut p, principal);
        s.request_principals = r.strings(o, "requestPrincipals", at, &mut p, glob);
        s.not_request_principals = r.strings(o, "notRequestPrincipals", at, &mut p, glob);
        s.namespaces = r.strings(o, "namespaces", at, &mut p, glob);
        s.not_namespaces = r.strings(o, "notNamespaces", at, &mut p, glob);
        s.service_accounts = r.strings(o, "serviceAccounts", at, &mut p, service_account(ns));
        s.not_service_accounts =
            r.strings(o, "notServiceAccounts", at, &mut p, service_account(ns));
        s.ip_blocks = r.strings(o, "ipBlocks", at, &mut p, cidr);
        s.not_ip_blocks = r.strings(o, "notIpBlocks", at, &mut p, cidr);
        s.remote_ip_blocks = r.strings(o, "remoteIpBlocks", at, &mut p, cidr);
        s.not_remote_ip_blocks = r.strings(o, "notRemoteIpBlocks", at, &mut p, cidr);
        if !(s.request_principals.is_empty() && s.not_request_principals.is_empty()) {
            r.unsupported(
                &format!("{at}.requestPrincipals"),
                "JWTs are not authenticated in this mesh: an ALLOW never matches on them, a DENY counts them as matching",
            );
        }
        if o.values()
            .all(|v| v.as_array().is_some_and(Vec::is_empty) || v.is_null())
            && p.is_empty()
        {
            r.error(&mut p, at, "must not be empty".into());
        }
    }
    s.problems = p;
    s
}

fn read_operation(r: &mut Reader, at: &str, v: &Value) -> pb::AuthzOperation {
    const KNOWN: [&str; 8] = [
        "hosts",
        "notHosts",
        "ports",
        "notPorts",
        "methods",
        "notMethods",
        "paths",
        "notPaths",
    ];
    let mut p = Vec::new();
    let mut op = pb::AuthzOperation::default();
    if let Some(o) = r.object(v, at, &KNOWN, &mut p) {
        op.hosts = r.strings(o, "hosts", at, &mut p, glob);
        op.not_hosts = r.strings(o, "notHosts", at, &mut p, glob);
        op.ports = r.strings(o, "ports", at, &mut p, port);
        op.not_ports = r.strings(o, "notPorts", at, &mut p, port);
        op.methods = r.strings(o, "methods", at, &mut p, glob);
        op.not_methods = r.strings(o, "notMethods", at, &mut p, glob);
        op.paths = r.strings(o, "paths", at, &mut p, path);
        op.not_paths = r.strings(o, "notPaths", at, &mut p, path);
        if o.values()
            .all(|v| v.as_array().is_some_and(Vec::is_empty) || v.is_null())
            && p.is_empty()
        {
            r.error(&mut p, at, "must not be empty".into());
        }
    }
    op.problems = p;
    op
}

fn read_condition(r: &mut Reader, at: &str, v: &Value) -> pb::AuthzCondition {
    use pb::authz_condition::Attribute as A;
    let mut p = Vec::new();
    let mut c = pb::AuthzCondition::default();
    let Some(o) = r.object(v, at, &["key", "values", "notValues"], &mut p) else {
        c.problems = p;
        return c;
    };
    let key = o.get("key").and_then(Value::as_str).unwrap_or_default();
    c.key = key.to_string();
    let header = key
        .strip_prefix("request.headers[")
        .and_then(|k| k.strip_suffix(']'))
        .filter(|h| !h.is_empty() && http::HeaderName::from_bytes(h.as_bytes()).is_ok());
    c.attribute = Some(match key {
        "source.ip" => A::SourceIp(()),
        "remote.ip" => A::RemoteIp(()),
        "source.namespace" => A::SourceNamespace(()),
        "source.principal" => A::SourcePrincipal(()),
        "destination.ip" => A::DestinationIp(()),
        "destination.port" => A::DestinationPort(()),
        _ if header.is_some() => A::RequestHeader(header.unwrap_or_default().to_ascii_lowercase()),
        "request.auth.principal"
        | "request.auth.audiences"
        | "request.auth.presenter"
        | "connection.sni" => A::Unsupported(()),
        k if k.starts_with("request.auth.claims[") || k.starts_with("experimental.") => {
            A::Unsupported(())
        }
        "" => {
            r.error(&mut p, &format!("{at}.key"), "missing".into());
            c.problems = p;
            return c;
        }
        other => {
            r.error(
                &mut p,
                &format!("{at}.key"),
                format!("{other:?} is not a condition key Istio defines"),
            );
            c.problems = p;
            return c;
        }
    });
    match c.attribute {
        Some(A::SourceIp(()) | A::RemoteIp(()) | A::DestinationIp(())) => {
            c.ip_values = r.strings(o, "values", at, &mut p, cidr);
            c.not_ip_values = r.strings(o, "notValues", at, &mut p, cidr);
        }
        Some(A::DestinationPort(())) => {
            c.port_values = r.strings(o, "values", at, &mut p, port);
            c.not_port_values = r.strings(o, "notValues", at, &mut p, port);
        }
        Some(A::SourcePrincipal(())) => {
            c.values = r.strings(o, "values", at, &mut p, principal);
            c.not_values = r.strings(o, "notValues", at, &mut p, principal);
        }
        _ => {
            c.values = r.strings(o, "values", at, &mut p, glob);
            c.not_values = r.strings(o, "notValues", at, &mut p, glob);
        }
    }
    if matches!(c.attribute, Some(A::Unsupported(()))) {
        r.unsupported(
            &format!("{at}.key"),
            &format!("{key}: not evaluated by this mesh: an ALLOW never matches on it, a DENY counts it as matching"),
        );
    }
    let none = |k: &str| {
        o.get(k)
            .is_none_or(|v| v.is_null() || v.as_array().is_some_and(Vec::is_empty))
    };
    if none("values") && none("notValues") {
        r.error(&mut p, at, "needs values or notValues".into());
    }
    c.problems = p;
    c
}

/// Every problem recorded in a policy, with its field.
pub fn problems(p: &pb::AuthorizationPolicy) -> Vec<&pb::Problem> {
    let mut out: Vec<&pb::Problem> = p.problems.iter().collect();
    for rule in &p.rules {
        out.extend(&rule.problems);
        out.extend(rule.from.iter().flat_map(|s| &s.problems));
        out.extend(rule.to.iter().flat_map(|o| &o.problems));
        out.extend(rule.when.iter().flat_map(|c| &c.problems));
    }
    out
}
