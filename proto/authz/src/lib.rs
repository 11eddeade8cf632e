//! The semantics of `istio.security.Authorization`: validated policies and their L4
//! evaluation, shared by ztunnel (enforcement) and the control plane (`meshctl authz
//! check`), so both always agree.
//!
//! Any matching DENY denies; with no ALLOW policy everything is allowed; otherwise some
//! ALLOW must match. Dry-run policies are evaluated and logged, never enforced.
#![forbid(unsafe_code)]

use mesh_identity::SpiffeId;
use mesh_proto::security as pb_sec;
use std::net::IpAddr;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{what}: {reason}")]
pub struct PolicyError {
    pub what: String,
    pub reason: String,
}

fn ip_from_bytes(what: &str, b: &[u8]) -> Result<IpAddr, PolicyError> {
    match b.len() {
        4 => Ok(IpAddr::from(
            <[u8; 4]>::try_from(b).expect("length checked"),
        )),
        16 => Ok(IpAddr::from(
            <[u8; 16]>::try_from(b).expect("length checked"),
        )),
        len => Err(PolicyError {
            what: what.to_string(),
            reason: format!("address of {len} bytes is neither IPv4 (4) nor IPv6 (16)"),
        }),
    }
}

/// Validated L4 policy (see `crate::rbac` for evaluation).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub name: String,
    pub namespace: String,
    pub scope: PolicyScope,
    pub action: Action,
    pub dry_run: bool,
    /// OR of rules; a rule is an AND of clauses; a clause an OR of matches.
    pub rules: Vec<Vec<Vec<Match>>>,
}

impl Policy {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
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
    Deny,
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

    pub fn contains(&self, ip: IpAddr) -> bool {
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

#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Match {
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
}

impl Match {
    /// A match with nothing in it is skipped (never matches).
    pub fn is_empty(&self) -> bool {
        *self == Match::default()
    }
}

impl Policy {
    pub fn from_proto(a: &pb_sec::Authorization) -> Result<Self, PolicyError> {
        let what = format!("authorization {}/{}", a.namespace, a.name);
        let scope = match pb_sec::Scope::try_from(a.scope) {
            Ok(pb_sec::Scope::Global) => PolicyScope::Global,
            Ok(pb_sec::Scope::Namespace) => PolicyScope::Namespace,
            Ok(pb_sec::Scope::WorkloadSelector) => PolicyScope::WorkloadSelector,
            Err(_) => {
                return Err(PolicyError {
                    what,
                    reason: format!("unknown scope {}", a.scope),
                });
            }
        };
        let action = match pb_sec::Action::try_from(a.action) {
            Ok(pb_sec::Action::Allow) => Action::Allow,
            Ok(pb_sec::Action::Deny) => Action::Deny,
            Err(_) => {
                return Err(PolicyError {
                    what,
                    reason: format!("unknown action {}", a.action),
                });
            }
        };
        let strings = |v: &[pb_sec::StringMatch]| -> Result<Vec<StringMatch>, PolicyError> {
            v.iter()
                .map(|m| match &m.match_type {
                    Some(pb_sec::string_match::MatchType::Exact(s)) => {
                        Ok(StringMatch::Exact(s.clone()))
                    }
                    Some(pb_sec::string_match::MatchType::Prefix(s)) => {
                        Ok(StringMatch::Prefix(s.clone()))
                    }
                    Some(pb_sec::string_match::MatchType::Suffix(s)) => {
                        Ok(StringMatch::Suffix(s.clone()))
                    }
                    Some(pb_sec::string_match::MatchType::Presence(())) => {
                        Ok(StringMatch::Presence)
                    }
                    None => Err(PolicyError {
                        what: what.clone(),
                        reason: "string match without a value".into(),
                    }),
                })
                .collect()
        };
        let nets = |v: &[pb_sec::Address]| -> Result<Vec<IpNet>, PolicyError> {
            v.iter()
                .map(|a| {
                    let addr = ip_from_bytes(&what, &a.address)?;
                    let max = if addr.is_ipv4() { 32 } else { 128 };
                    let prefix = if a.length == 0 && !a.address.is_empty() {
                        // Istio sends the full length for single addresses; 0 means
                        // "everything" only when written explicitly as 0.0.0.0/0.
                        if addr.is_unspecified() { 0 } else { max }
                    } else {
                        a.length
                    };
                    if prefix > max {
                        return Err(PolicyError {
                            what: what.clone(),
                            reason: format!("prefix /{prefix} is too long for {addr}"),
                        });
                    }
                    Ok(IpNet {
                        addr,
                        prefix: prefix as u8,
                    })
                })
                .collect()
        };
        let ports = |v: &[u32]| -> Result<Vec<u16>, PolicyError> {
            v.iter()
                .map(|p| {
                    u16::try_from(*p).map_err(|_| PolicyError {
                        what: what.clone(),
                        reason: format!("port {p} is out of range"),
                    })
                })
                .collect()
        };
        let sas = |v: &[pb_sec::ServiceAccountMatch]| {
            v.iter()
                .map(|s| (s.namespace.clone(), s.service_account.clone()))
                .collect()
        };
        let mut rules = Vec::with_capacity(a.rules.len());
        for rule in &a.rules {
            let mut clauses = Vec::with_capacity(rule.clauses.len());
            for clause in &rule.clauses {
                let mut matches = Vec::with_capacity(clause.matches.len());
                for m in &clause.matches {
                    matches.push(Match {
                        namespaces: strings(&m.namespaces)?,
                        not_namespaces: strings(&m.not_namespaces)?,
                        principals: strings(&m.principals)?,
                        not_principals: strings(&m.not_principals)?,
                        source_ips: nets(&m.source_ips)?,
                        not_source_ips: nets(&m.not_source_ips)?,
                        destination_ips: nets(&m.destination_ips)?,
                        not_destination_ips: nets(&m.not_destination_ips)?,
                        destination_ports: ports(&m.destination_ports)?,
                        not_destination_ports: ports(&m.not_destination_ports)?,
                        service_accounts: sas(&m.service_accounts),
                        not_service_accounts: sas(&m.not_service_accounts),
                    });
                }
                clauses.push(matches);
            }
            rules.push(clauses);
        }
        Ok(Policy {
            name: a.name.clone(),
            namespace: a.namespace.clone(),
            scope,
            action,
            dry_run: a.dry_run,
            rules,
        })
    }
}

/// The L4 facts a decision is made on.
#[derive(Clone, Debug)]
pub struct ConnectionInfo {
    /// Verified peer identity (mTLS); `None` for plaintext.
    pub src_identity: Option<SpiffeId>,
    pub src_ip: IpAddr,
    pub dst_ip: IpAddr,
    /// The application's port (never 15008).
    pub dst_port: u16,
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

pub fn evaluate<'a>(
    policies: impl IntoIterator<Item = &'a Policy>,
    conn: &ConnectionInfo,
) -> Decision {
    let mut allow_names = Vec::new();
    let mut allow_matched = false;
    let mut deny: Option<&Policy> = None;
    for p in policies {
        let matched = policy_matches(p, conn);
        if p.dry_run {
            if matched {
                tracing::info!(target: "authz", policy = %p.key(), action = ?p.action,
                    "dry-run policy matched (not enforced)");
            }
            continue;
        }
        match p.action {
            Action::Deny if matched => deny = deny.or(Some(p)),
            Action::Deny => {}
            Action::Allow => {
                allow_names.push(p.key());
                allow_matched |= matched;
            }
        }
    }
    if let Some(p) = deny {
        return Decision::Deny {
            policy: Some(p.key()),
            reason: format!("matched DENY policy {}", p.key()),
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

/// A policy with no rules never matches; a rule with no clauses matches everything.
pub fn policy_matches(p: &Policy, conn: &ConnectionInfo) -> bool {
    p.rules.iter().any(|clauses| {
        clauses
            .iter()
            .all(|matches| matches.iter().any(|m| match_matches(m, conn)))
    })
}

fn any_or_empty<T>(list: &[T], f: impl Fn(&T) -> bool) -> bool {
    list.is_empty() || list.iter().any(f)
}

fn none_match<T>(list: &[T], f: impl Fn(&T) -> bool) -> bool {
    !list.iter().any(f)
}

fn match_matches(m: &Match, conn: &ConnectionInfo) -> bool {
    // An empty match is skipped: it matches nothing.
    if m.is_empty() {
        return false;
    }
    let principal = conn.src_identity.as_ref().map(SpiffeId::principal);
    let principal = principal.as_deref();
    let namespace = conn.src_identity.as_ref().map(SpiffeId::namespace);
    let sa_matches = |(ns, sa): &(String, String)| {
        conn.src_identity
            .as_ref()
            .is_some_and(|id| id.namespace() == ns && id.service_account() == sa)
    };
    any_or_empty(&m.namespaces, |s| s.matches(namespace))
        && none_match(&m.not_namespaces, |s| s.matches(namespace))
        && any_or_empty(&m.principals, |s| s.matches(principal))
        && none_match(&m.not_principals, |s| s.matches(principal))
        && any_or_empty(&m.source_ips, |n| n.contains(conn.src_ip))
        && none_match(&m.not_source_ips, |n| n.contains(conn.src_ip))
        && any_or_empty(&m.destination_ips, |n| n.contains(conn.dst_ip))
        && none_match(&m.not_destination_ips, |n| n.contains(conn.dst_ip))
        && any_or_empty(&m.destination_ports, |p| *p == conn.dst_port)
        && none_match(&m.not_destination_ports, |p| *p == conn.dst_port)
        && any_or_empty(&m.service_accounts, sa_matches)
        && none_match(&m.not_service_accounts, sa_matches)
}

#[cfg(test)]
mod tests {

    #[test]
    fn ip_nets_parse_with_bounded_prefixes() {
        let n = IpNet::parse("10.244.0.0/16").unwrap();
        assert!(n.contains("10.244.9.9".parse().unwrap()));
        assert!(!n.contains("10.245.0.1".parse().unwrap()));
        assert_eq!(IpNet::parse("10.0.0.1").unwrap().prefix, 32);
        assert_eq!(IpNet::parse("fd00::/8").unwrap().prefix, 8);
        assert_eq!(IpNet::parse("::1").unwrap().prefix, 128);
        assert!(IpNet::parse("10.0.0.0/33").is_err());
        assert!(IpNet::parse("fd00::/129").is_err());
        assert!(IpNet::parse("10.0.0/8").is_err());
        assert!(IpNet::parse("10.0.0.0/x").is_err());
    }

    use super::*;

    fn conn(id: Option<&str>, port: u16) -> ConnectionInfo {
        ConnectionInfo {
            src_identity: id.map(|s| s.parse().unwrap()),
            src_ip: "10.0.0.1".parse().unwrap(),
            dst_ip: "10.0.1.1".parse().unwrap(),
            dst_port: port,
        }
    }

    fn policy(name: &str, action: Action, rules: Vec<Vec<Vec<Match>>>) -> Policy {
        Policy {
            name: name.into(),
            namespace: "ns".into(),
            scope: PolicyScope::Namespace,
            action,
            dry_run: false,
            rules,
        }
    }

    const A: &str = "spiffe://cluster.local/ns/front/sa/web";

    #[test]
    fn no_policies_allow() {
        assert_eq!(evaluate([], &conn(None, 80)), Decision::Allow);
    }

    #[test]
    fn empty_allow_denies_everything_empty_deny_does_nothing() {
        let allow_none = policy("allow-nothing", Action::Allow, vec![]);
        let d = evaluate([&allow_none], &conn(Some(A), 80));
        assert_eq!(
            d,
            Decision::Deny {
                policy: Some("ns/allow-nothing".into()),
                reason: "no ALLOW policy matched (checked ns/allow-nothing)".into()
            }
        );
        let deny_none = policy("deny-nothing", Action::Deny, vec![]);
        assert_eq!(evaluate([&deny_none], &conn(Some(A), 80)), Decision::Allow);
    }

    #[test]
    fn rule_without_clauses_matches_everything() {
        let allow_all = policy("allow-all", Action::Allow, vec![vec![]]);
        assert!(evaluate([&allow_all], &conn(None, 1)).is_allowed());
    }

    #[test]
    fn deny_wins_over_allow_and_names_the_policy() {
        let allow_all = policy("allow-all", Action::Allow, vec![vec![]]);
        let deny_port = policy(
            "deny-9090",
            Action::Deny,
            vec![vec![vec![Match {
                destination_ports: vec![9090],
                ..Default::default()
            }]]],
        );
        assert!(evaluate([&allow_all, &deny_port], &conn(Some(A), 80)).is_allowed());
        assert_eq!(
            evaluate([&allow_all, &deny_port], &conn(Some(A), 9090)),
            Decision::Deny {
                policy: Some("ns/deny-9090".into()),
                reason: "matched DENY policy ns/deny-9090".into()
            }
        );
    }

    #[test]
    fn principals_namespaces_service_accounts() {
        let allow = |m: Match| policy("p", Action::Allow, vec![vec![vec![m]]]);
        let by_principal = allow(Match {
            principals: vec![StringMatch::Exact("cluster.local/ns/front/sa/web".into())],
            ..Default::default()
        });
        assert!(evaluate([&by_principal], &conn(Some(A), 80)).is_allowed());
        assert!(
            !evaluate([&by_principal], &conn(None, 80)).is_allowed(),
            "no identity never matches a principal"
        );
        let by_ns = allow(Match {
            namespaces: vec![StringMatch::Prefix("fro".into())],
            ..Default::default()
        });
        assert!(evaluate([&by_ns], &conn(Some(A), 80)).is_allowed());
        assert!(
            !evaluate(
                [&by_ns],
                &conn(Some("spiffe://cluster.local/ns/back/sa/web"), 80)
            )
            .is_allowed()
        );
        let by_sa = allow(Match {
            service_accounts: vec![("front".into(), "web".into())],
            ..Default::default()
        });
        assert!(evaluate([&by_sa], &conn(Some(A), 80)).is_allowed());
        assert!(
            !evaluate(
                [&by_sa],
                &conn(Some("spiffe://cluster.local/ns/front/sa/db"), 80)
            )
            .is_allowed()
        );
    }

    #[test]
    fn strict_conversion_denies_plaintext_only() {
        let strict = policy(
            "istio_converted_static_strict",
            Action::Deny,
            vec![vec![vec![Match {
                not_principals: vec![StringMatch::Presence],
                ..Default::default()
            }]]],
        );
        assert!(!evaluate([&strict], &conn(None, 80)).is_allowed());
        assert!(evaluate([&strict], &conn(Some(A), 80)).is_allowed());
    }

    #[test]
    fn clauses_and_matches_combine() {
        // (port 80 OR port 81) AND from 10.0.0.0/24
        let p = policy(
            "p",
            Action::Allow,
            vec![vec![
                vec![
                    Match {
                        destination_ports: vec![80],
                        ..Default::default()
                    },
                    Match {
                        destination_ports: vec![81],
                        ..Default::default()
                    },
                ],
                vec![Match {
                    source_ips: vec![IpNet {
                        addr: "10.0.0.0".parse().unwrap(),
                        prefix: 24,
                    }],
                    ..Default::default()
                }],
            ]],
        );
        assert!(evaluate([&p], &conn(None, 80)).is_allowed());
        assert!(evaluate([&p], &conn(None, 81)).is_allowed());
        assert!(!evaluate([&p], &conn(None, 82)).is_allowed());
        let mut other_src = conn(None, 80);
        other_src.src_ip = "10.0.5.1".parse().unwrap();
        assert!(!evaluate([&p], &other_src).is_allowed());
        // An empty match in a clause never matches.
        let empty = policy("e", Action::Allow, vec![vec![vec![Match::default()]]]);
        assert!(!evaluate([&empty], &conn(None, 80)).is_allowed());
    }

    #[test]
    fn dry_run_is_not_enforced() {
        let mut deny_all = policy("deny-all", Action::Deny, vec![vec![]]);
        deny_all.dry_run = true;
        assert!(evaluate([&deny_all], &conn(None, 80)).is_allowed());
    }
}
