//! Istio's AuthorizationPolicy, once for the whole mesh:
//!
//! - [`k8s`]: the Kubernetes object read and validated into the typed
//!   `mesh.waypoint.v1.AuthorizationPolicy` (mesh-control, when it reads the object);
//! - [`typed`]: that message into a [`Policy`] (the waypoint, `meshctl authz check`);
//! - [`istio`]: a [`Policy`] to and from Istio's `istio.security.Authorization`, the L4
//!   form ztunnel receives (mesh-control lowers, ztunnel reads back);
//! - this module: the [`Policy`] model and the one evaluator all of them use.
//!
//! Fail closed, with Istio's rules: an attribute the enforcing component cannot evaluate
//! (an HTTP attribute at L4, a JWT claim anywhere, a value mesh-control could not read)
//! counts as not matching in an ALLOW policy and as matching in a DENY policy. So an ALLOW
//! rule that cannot be evaluated allows nothing, and a DENY rule denies whenever the parts
//! that can be evaluated match. An unknown action denies everything in the policy's scope.
//!
//! Any matching DENY denies; with no ALLOW policy everything is allowed; otherwise some
//! ALLOW must match. Dry-run policies are evaluated and logged, never enforced; AUDIT
//! policies never change a decision.
#![forbid(unsafe_code)]

pub mod istio;
pub mod k8s;
pub mod normalize;
pub mod typed;

use mesh_identity::SpiffeId;
use std::net::IpAddr;

/// Evaluable policy (L4 and L7).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub name: String,
    pub namespace: String,
    pub scope: PolicyScope,
    pub action: Action,
    pub dry_run: bool,
    /// OR of rules; a rule is an AND of clauses; a clause an OR of matches.
    pub rules: Vec<Vec<Vec<Match>>>,
    /// Why the policy is not enforced exactly as written (what could not be read, what
    /// is enforced in its place); empty when it is.
    pub problems: Vec<String>,
}

impl Policy {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The policy a component puts in place of one it cannot read at all: it allows
    /// nothing (ALLOW) or denies everything in its scope (any other action), so that
    /// refusing it never widens access.
    pub fn fail_closed(
        namespace: &str,
        name: &str,
        scope: PolicyScope,
        action: Action,
        dry_run: bool,
        problem: String,
    ) -> Policy {
        let (action, rules) = match action {
            Action::Allow => (Action::Allow, vec![]),
            Action::Deny | Action::Audit => (Action::Deny, vec![vec![]]),
        };
        Policy {
            name: name.to_string(),
            namespace: namespace.to_string(),
            scope,
            action,
            dry_run,
            rules,
            problems: vec![problem],
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicyScope {
    Global,
    Namespace,
    WorkloadSelector,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Allow,
    /// Also CUSTOM (no external authorizer here: it denies what its rules match) and an
    /// unknown action (with a rule that matches everything).
    Deny,
    /// Never changes a decision.
    Audit,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Presence,
}

impl StringMatch {
    pub fn matches(&self, value: Option<&str>) -> bool {
        match (self, value) {
            (_, None) => false,
            (StringMatch::Exact(e), Some(v)) => v == e,
            (StringMatch::Prefix(p), Some(v)) => v.starts_with(p.as_str()),
            (StringMatch::Suffix(s), Some(v)) => v.ends_with(s.as_str()),
            (StringMatch::Presence, Some(v)) => !v.is_empty(),
        }
    }

    /// Case-insensitive (hosts).
    fn matches_ignore_case(&self, value: &str) -> bool {
        let v = value.to_ascii_lowercase();
        let lower = |s: &String| s.to_ascii_lowercase();
        match self {
            StringMatch::Exact(e) => v == lower(e),
            StringMatch::Prefix(p) => v.starts_with(&lower(p)),
            StringMatch::Suffix(s) => v.ends_with(&lower(s)),
            StringMatch::Presence => !v.is_empty(),
        }
    }

    /// A `hosts` pattern against a request host already normalised by the proxy (lower
    /// case, no port, no trailing dot): the pattern matches the bare host or the host with
    /// the request's port (`api.shop:8080`), ignoring case and a trailing dot in the
    /// pattern, so no way of writing the Host header changes which policy applies.
    fn matches_host(&self, host: &str, port: u16) -> bool {
        let pattern = |p: &String| {
            let p = p.to_ascii_lowercase();
            match p.rsplit_once(':') {
                Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => {
                    format!("{}:{port}", h.trim_end_matches('.'))
                }
                _ => p.trim_end_matches('.').to_string(),
            }
        };
        let normal = match self {
            StringMatch::Exact(e) => StringMatch::Exact(pattern(e)),
            StringMatch::Suffix(s) => StringMatch::Suffix(pattern(s)),
            other => other.clone(),
        };
        let host = host.trim_end_matches('.');
        normal.matches_ignore_case(host) || normal.matches_ignore_case(&format!("{host}:{port}"))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpNet {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl IpNet {
    /// An address (`10.0.0.1`, a host) or a CIDR block (`10.0.0.0/8`), as policies write
    /// them; the prefix length must fit the address family.
    pub fn parse(s: &str) -> Result<IpNet, String> {
        let (ip, len) = s.split_once('/').map_or((s, None), |(a, l)| (a, Some(l)));
        let addr: IpAddr = ip
            .parse()
            .map_err(|_| format!("{s:?} is not an IP address or CIDR block"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match len {
            Some(l) => l
                .parse::<u8>()
                .ok()
                .filter(|l| *l <= max)
                .ok_or_else(|| format!("{s:?}: the prefix length must be 0 to {max}"))?,
            None => max,
        };
        Ok(IpNet { addr, prefix })
    }

    /// From the wire: 4 or 16 address bytes and a prefix length that fits them.
    pub fn from_bytes(address: &[u8], prefix: u32) -> Result<IpNet, String> {
        let addr = ip_from_bytes(address)?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if prefix > max {
            return Err(format!("prefix /{prefix} is too long for {addr}"));
        }
        Ok(IpNet {
            addr,
            prefix: prefix as u8,
        })
    }

    /// Whether `ip` is in the block. An IPv4-mapped IPv6 address (`::ffff:a.b.c.d`, how a
    /// dual-stack socket shows an IPv4 peer) is that IPv4 address, and a block written
    /// in that form (`::ffff:10.0.0.0/104`) is the IPv4 block: an IPv4 peer is matched by
    /// IPv4 blocks only, however it is written, so the mapped form is no way around an
    /// IPv4 DENY, nor into an IPv6 ALLOW.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let (addr, prefix) = match self.addr {
            IpAddr::V6(v6) if self.prefix >= 96 => match v6.to_ipv4_mapped() {
                Some(v4) => (IpAddr::V4(v4), self.prefix - 96),
                None => (self.addr, self.prefix),
            },
            _ => (self.addr, self.prefix),
        };
        IpNet { addr, prefix }.contains_canonical(ip.to_canonical())
    }

    fn contains_canonical(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let p = u32::from(self.prefix.min(32));
                let mask = if p == 0 { 0 } else { u32::MAX << (32 - p) };
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let p = u32::from(self.prefix.min(128));
                let mask = if p == 0 { 0 } else { u128::MAX << (128 - p) };
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// An address on the wire (istio.workload, istio.security) that is neither 4 nor 16
/// bytes long; holds its length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("address of {0} bytes is neither IPv4 (4) nor IPv6 (16)")]
pub struct IpLengthError(pub usize);

impl From<IpLengthError> for String {
    fn from(e: IpLengthError) -> String {
        e.to_string()
    }
}

/// An address from its wire form: 4 bytes (IPv4) or 16 (IPv6), network order. The one
/// conversion every reader of the mesh's resources uses.
pub fn ip_from_bytes(b: &[u8]) -> Result<IpAddr, IpLengthError> {
    match b.len() {
        4 => Ok(IpAddr::from(
            <[u8; 4]>::try_from(b).expect("length checked"),
        )),
        16 => Ok(IpAddr::from(
            <[u8; 16]>::try_from(b).expect("length checked"),
        )),
        len => Err(IpLengthError(len)),
    }
}

/// An address in its wire form (the inverse of [`ip_from_bytes`]).
pub fn ip_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v) => v.octets().to_vec(),
        IpAddr::V6(v) => v.octets().to_vec(),
    }
}

/// `request.headers[name]`: the values are matched against the header's values joined
/// with `,` (as Envoy does), so repeating a header cannot slip past a match.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeaderMatch {
    /// Lower case.
    pub name: String,
    pub values: Vec<StringMatch>,
    pub not_values: Vec<StringMatch>,
}

#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Match {
    // L4: what istio.security.Match carries.
    pub namespaces: Vec<StringMatch>,
    pub not_namespaces: Vec<StringMatch>,
    pub principals: Vec<StringMatch>,
    pub not_principals: Vec<StringMatch>,
    pub source_ips: Vec<IpNet>,
    pub not_source_ips: Vec<IpNet>,
    pub destination_ips: Vec<IpNet>,
    pub not_destination_ips: Vec<IpNet>,
    pub destination_ports: Vec<u16>,
    pub not_destination_ports: Vec<u16>,
    /// (namespace, service account)
    pub service_accounts: Vec<(String, String)>,
    pub not_service_accounts: Vec<(String, String)>,
    // HTTP attributes: only a waypoint sees them.
    pub hosts: Vec<StringMatch>,
    pub not_hosts: Vec<StringMatch>,
    pub methods: Vec<StringMatch>,
    pub not_methods: Vec<StringMatch>,
    pub paths: Vec<StringMatch>,
    pub not_paths: Vec<StringMatch>,
    pub headers: Vec<HeaderMatch>,
    /// remoteIpBlocks / remote.ip: the original client, which the waypoint takes to be
    /// the source address (it trusts no X-Forwarded-For).
    pub remote_ips: Vec<IpNet>,
    pub not_remote_ips: Vec<IpNet>,
    /// Parts no component can evaluate (JWT attributes, values mesh-control could not
    /// read), named for reports.
    pub unevaluable: Vec<String>,
}

impl Match {
    /// A match with nothing in it is skipped (never matches), as in Istio's ztunnel.
    pub fn is_empty(&self) -> bool {
        *self == Match::default()
    }

    /// The fields ztunnel cannot evaluate, by their AuthorizationPolicy names.
    pub fn http_fields(&self) -> Vec<String> {
        let mut out: Vec<String> = [
            ("hosts", self.hosts.is_empty()),
            ("notHosts", self.not_hosts.is_empty()),
            ("methods", self.methods.is_empty()),
            ("notMethods", self.not_methods.is_empty()),
            ("paths", self.paths.is_empty()),
            ("notPaths", self.not_paths.is_empty()),
            ("remoteIpBlocks", self.remote_ips.is_empty()),
            ("notRemoteIpBlocks", self.not_remote_ips.is_empty()),
        ]
        .into_iter()
        .filter(|(_, empty)| !empty)
        .map(|(n, _)| n.to_string())
        .collect();
        out.extend(
            self.headers
                .iter()
                .map(|h| format!("request.headers[{}]", h.name)),
        );
        out
    }

    /// The part ztunnel can evaluate.
    pub fn l4_part(&self) -> Match {
        Match {
            namespaces: self.namespaces.clone(),
            not_namespaces: self.not_namespaces.clone(),
            principals: self.principals.clone(),
            not_principals: self.not_principals.clone(),
            source_ips: self.source_ips.clone(),
            not_source_ips: self.not_source_ips.clone(),
            destination_ips: self.destination_ips.clone(),
            not_destination_ips: self.not_destination_ips.clone(),
            destination_ports: self.destination_ports.clone(),
            not_destination_ports: self.not_destination_ports.clone(),
            service_accounts: self.service_accounts.clone(),
            not_service_accounts: self.not_service_accounts.clone(),
            ..Default::default()
        }
    }

    /// Whether some part needs more than L4 facts (or can never be evaluated).
    pub fn needs_more_than_l4(&self) -> bool {
        !self.unevaluable.is_empty() || !self.http_fields().is_empty()
    }
}

/// The L4 facts a decision is made on.
#[derive(Clone, Debug)]
pub struct ConnectionInfo {
    /// Verified peer identity (mTLS); `None` for plaintext.
    pub src_identity: Option<SpiffeId>,
    pub src_ip: IpAddr,
    /// Unspecified (`0.0.0.0`) when the enforcing component does not know it: then
    /// `destination.ip` cannot be evaluated.
    pub dst_ip: IpAddr,
    /// The application's port (never 15008).
    pub dst_port: u16,
}

/// The HTTP facts, at a waypoint.
#[derive(Clone, Copy, Debug)]
pub struct HttpRequest<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub host: &'a str,
    pub headers: &'a http::HeaderMap,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Allow,
    Deny {
        /// `ns/name` of the policy responsible, when one is.
        policy: Option<String>,
        reason: String,
    },
}

impl Decision {
    pub fn is_allowed(&self) -> bool {
        matches!(self, Decision::Allow)
    }
}

/// An L4 decision (ztunnel).
pub fn evaluate<'a>(
    policies: impl IntoIterator<Item = &'a Policy>,
    conn: &ConnectionInfo,
) -> Decision {
    evaluate_request(policies, conn, None)
}

/// A decision on what the enforcing component knows: L4 only (`http` is `None`), or an
/// HTTP request (a waypoint).
pub fn evaluate_request<'a>(
    policies: impl IntoIterator<Item = &'a Policy>,
    conn: &ConnectionInfo,
    http: Option<&HttpRequest<'_>>,
) -> Decision {
    let mut allow_names = Vec::new();
    let mut allow_matched = false;
    let mut deny: Option<&Policy> = None;
    for p in policies {
        if p.action == Action::Audit {
            continue;
        }
        let matched = policy_matches_request(p, conn, http);
        if p.dry_run {
            if matched {
                tracing::info!(target: "authz", policy = %p.key(), action = ?p.action,
                    "dry-run policy matched (not enforced)");
            }
            continue;
        }
        match p.action {
            Action::Deny if matched => deny = deny.or(Some(p)),
            Action::Allow => {
                allow_names.push(p.key());
                allow_matched |= matched;
            }
            _ => {}
        }
    }
    if let Some(p) = deny {
        let why = p
            .problems
            .first()
            .map(|w| format!(" (fail closed: {w})"))
            .unwrap_or_default();
        return Decision::Deny {
            policy: Some(p.key()),
            reason: format!("matched DENY policy {}{why}", p.key()),
        };
    }
    if allow_names.is_empty() || allow_matched {
        return Decision::Allow;
    }
    allow_names.sort();
    Decision::Deny {
        policy: if allow_names.len() == 1 {
            Some(allow_names[0].clone())
        } else {
            None
        },
        reason: format!(
            "no ALLOW policy matched (checked {})",
            allow_names.join(", ")
        ),
    }
}

/// At L4. A policy with no rules never matches; a rule with no clauses matches everything.
pub fn policy_matches(p: &Policy, conn: &ConnectionInfo) -> bool {
    policy_matches_request(p, conn, None)
}

pub fn policy_matches_request(
    p: &Policy,
    conn: &ConnectionInfo,
    http: Option<&HttpRequest<'_>>,
) -> bool {
    let facts = Facts::new(conn, http);
    p.rules.iter().any(|clauses| {
        clauses
            .iter()
            .all(|matches| matches.is_empty() || matches.iter().any(|m| facts.matches(m, p.action)))
    })
}

/// What one field of a match says about a request.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Tri {
    Yes,
    No,
    /// The enforcing component does not know the attribute.
    Unknown,
}

fn field<T>(pos: &[T], neg: &[T], known: bool, f: impl Fn(&T) -> bool) -> Tri {
    if pos.is_empty() && neg.is_empty() {
        Tri::Yes
    } else if !known {
        Tri::Unknown
    } else if (pos.is_empty() || pos.iter().any(&f)) && !neg.iter().any(&f) {
        Tri::Yes
    } else {
        Tri::No
    }
}

struct Facts<'a> {
    conn: &'a ConnectionInfo,
    http: Option<&'a HttpRequest<'a>>,
    principal: Option<String>,
}

impl<'a> Facts<'a> {
    fn new(conn: &'a ConnectionInfo, http: Option<&'a HttpRequest<'a>>) -> Self {
        Facts {
            conn,
            http,
            principal: conn.src_identity.as_ref().map(SpiffeId::principal),
        }
    }

    /// The header's values joined with `,`. Bytes that are not text (HTTP allows
    /// obs-text) are kept as far as they are UTF-8, each invalid byte standing in as
    /// U+FFFD, so `admin\xff` still starts with `admin`: a value is never replaced whole.
    fn header(&self, name: &str) -> Option<String> {
        let h = self.http?;
        let values: Vec<std::borrow::Cow<'_, str>> = h
            .headers
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()))
            .collect();
        (!values.is_empty()).then(|| values.join(","))
    }

    /// Unknown parts count as not matching in ALLOW, as matching in DENY.
    fn matches(&self, m: &Match, action: Action) -> bool {
        if m.is_empty() {
            return false;
        }
        let c = self.conn;
        let principal = self.principal.as_deref();
        let namespace = c.src_identity.as_ref().map(SpiffeId::namespace);
        let sa = |(ns, sa): &(String, String)| {
            c.src_identity
                .as_ref()
                .is_some_and(|id| id.namespace() == ns && id.service_account() == sa)
        };
        let http = self.http.is_some();
        let h = self.http;
        let mut fields = vec![
            field(&m.namespaces, &m.not_namespaces, true, |s| {
                s.matches(namespace)
            }),
            field(&m.principals, &m.not_principals, true, |s| {
                s.matches(principal)
            }),
            field(&m.service_accounts, &m.not_service_accounts, true, sa),
            field(&m.source_ips, &m.not_source_ips, true, |n| {
                n.contains(c.src_ip)
            }),
            field(
                &m.destination_ips,
                &m.not_destination_ips,
                !c.dst_ip.is_unspecified(),
                |n| n.contains(c.dst_ip),
            ),
            field(&m.destination_ports, &m.not_destination_ports, true, |p| {
                *p == c.dst_port
            }),
            field(&m.remote_ips, &m.not_remote_ips, http, |n| {
                n.contains(c.src_ip)
            }),
            field(&m.hosts, &m.not_hosts, http, |s| {
                h.is_some_and(|h| s.matches_host(h.host, c.dst_port))
            }),
            field(&m.methods, &m.not_methods, http, |s| {
                s.matches(h.map(|h| h.method))
            }),
            field(&m.paths, &m.not_paths, http, |s| {
                s.matches(h.map(|h| h.path))
            }),
        ];
        for hm in &m.headers {
            let v = self.header(&hm.name);
            fields.push(field(&hm.values, &hm.not_values, http, |s| {
                s.matches(v.as_deref())
            }));
        }
        if fields.contains(&Tri::No) {
            return false;
        }
        let unknown = fields.contains(&Tri::Unknown) || !m.unevaluable.is_empty();
        !unknown || action == Action::Deny
    }
}

#[cfg(test)]
mod tests;
