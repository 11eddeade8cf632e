//! [`Policy`] and Istio's `istio.security.Authorization` (what ztunnel receives; its
//! protobuf is Istio's and never changes): mesh-control lowers a policy to it, ztunnel
//! (ours or Istio's) reads it back.
//!
//! Lowering keeps the evaluation at L4 unchanged (a tested property): an ALLOW match
//! that needs HTTP attributes can never match at L4, so it is dropped, and a rule left
//! with a clause that can never match is dropped; a DENY match keeps its L4 fields, and
//! one with none left matches, so its whole clause is dropped (a rule with no clauses
//! matches everything). An empty clause is never sent for "never": Istio's ztunnel takes
//! an empty clause as matching and skips an empty match.

use crate::{Action, IpNet, Match, Policy, PolicyScope, StringMatch, ip_bytes};
use mesh_proto::security as pb;

fn string_from(m: &pb::StringMatch) -> Result<StringMatch, String> {
    use pb::string_match::MatchType;
    match &m.match_type {
        Some(MatchType::Exact(s)) => Ok(StringMatch::Exact(s.clone())),
        Some(MatchType::Prefix(s)) => Ok(StringMatch::Prefix(s.clone())),
        Some(MatchType::Suffix(s)) => Ok(StringMatch::Suffix(s.clone())),
        Some(MatchType::Presence(())) => Ok(StringMatch::Presence),
        None => Err("string match without a value".into()),
    }
}

pub fn string_to(m: &StringMatch) -> pb::StringMatch {
    use pb::string_match::MatchType;
    let t = match m {
        StringMatch::Exact(s) => MatchType::Exact(s.clone()),
        StringMatch::Prefix(s) => MatchType::Prefix(s.clone()),
        StringMatch::Suffix(s) => MatchType::Suffix(s.clone()),
        StringMatch::Presence => MatchType::Presence(()),
    };
    pb::StringMatch {
        match_type: Some(t),
    }
}

fn net_from(a: &pb::Address) -> Result<IpNet, String> {
    // Istio sends the full length for single addresses; 0 means "everything" only for
    // the unspecified address (0.0.0.0/0, ::/0).
    let addr = crate::ip_from_bytes(&a.address)?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let len = if a.length == 0 && !addr.is_unspecified() {
        max
    } else {
        a.length
    };
    IpNet::from_bytes(&a.address, len)
}

fn net_to(n: &IpNet) -> pb::Address {
    pb::Address {
        address: ip_bytes(n.addr),
        length: u32::from(n.prefix),
    }
}

/// Converts each item; one that cannot be read becomes an unevaluable part of the match,
/// and so does the whole list: the items that were read cannot decide the field alone
/// (`ipBlocks: [10.1.0.0/16, 10.2.0.0/33]` must not become a DENY of 10.1 only).
pub(crate) fn each<T, U>(
    what: &str,
    items: &[T],
    f: impl Fn(&T) -> Result<U, String>,
    unevaluable: &mut Vec<String>,
) -> Vec<U> {
    let before = unevaluable.len();
    let read: Vec<U> = items
        .iter()
        .filter_map(|x| match f(x) {
            Ok(v) => Some(v),
            Err(e) => {
                unevaluable.push(format!("{what}: {e}"));
                None
            }
        })
        .collect();
    if unevaluable.len() > before {
        Vec::new()
    } else {
        read
    }
}

fn match_from(m: &pb::Match) -> Match {
    let mut bad = Vec::new();
    let port = |p: &u32| u16::try_from(*p).map_err(|_| format!("port {p} is out of range"));
    let sa = |s: &pb::ServiceAccountMatch| Ok((s.namespace.clone(), s.service_account.clone()));
    let mut out = Match {
        namespaces: each("namespaces", &m.namespaces, string_from, &mut bad),
        not_namespaces: each("not_namespaces", &m.not_namespaces, string_from, &mut bad),
        principals: each("principals", &m.principals, string_from, &mut bad),
        not_principals: each("not_principals", &m.not_principals, string_from, &mut bad),
        source_ips: each("source_ips", &m.source_ips, net_from, &mut bad),
        not_source_ips: each("not_source_ips", &m.not_source_ips, net_from, &mut bad),
        destination_ips: each("destination_ips", &m.destination_ips, net_from, &mut bad),
        not_destination_ips: each(
            "not_destination_ips",
            &m.not_destination_ips,
            net_from,
            &mut bad,
        ),
        destination_ports: each("destination_ports", &m.destination_ports, port, &mut bad),
        not_destination_ports: each(
            "not_destination_ports",
            &m.not_destination_ports,
            port,
            &mut bad,
        ),
        service_accounts: each("service_accounts", &m.service_accounts, sa, &mut bad),
        not_service_accounts: each(
            "not_service_accounts",
            &m.not_service_accounts,
            sa,
            &mut bad,
        ),
        ..Default::default()
    };
    if !m.extensions.is_empty() {
        bad.push("extensions are not supported".into());
    }
    out.unevaluable = bad;
    out
}

fn match_to(m: &Match) -> pb::Match {
    pb::Match {
        namespaces: m.namespaces.iter().map(string_to).collect(),
        not_namespaces: m.not_namespaces.iter().map(string_to).collect(),
        principals: m.principals.iter().map(string_to).collect(),
        not_principals: m.not_principals.iter().map(string_to).collect(),
        source_ips: m.source_ips.iter().map(net_to).collect(),
        not_source_ips: m.not_source_ips.iter().map(net_to).collect(),
        destination_ips: m.destination_ips.iter().map(net_to).collect(),
        not_destination_ips: m.not_destination_ips.iter().map(net_to).collect(),
        destination_ports: m.destination_ports.iter().map(|p| u32::from(*p)).collect(),
        not_destination_ports: m
            .not_destination_ports
            .iter()
            .map(|p| u32::from(*p))
            .collect(),
        service_accounts: m
            .service_accounts
            .iter()
            .map(|(ns, sa)| pb::ServiceAccountMatch {
                namespace: ns.clone(),
                service_account: sa.clone(),
            })
            .collect(),
        not_service_accounts: m
            .not_service_accounts
            .iter()
            .map(|(ns, sa)| pb::ServiceAccountMatch {
                namespace: ns.clone(),
                service_account: sa.clone(),
            })
            .collect(),
        extensions: vec![],
    }
}

impl Policy {
    /// Reads an Authorization, never refusing it outright: a part that cannot be read
    /// becomes unevaluable where it sits, an unknown action denies everything and an
    /// unknown scope is taken as the policy's namespace. The problems are returned (a
    /// component NACKs the resource for them) and kept in `problems`.
    pub fn from_proto(a: &pb::Authorization) -> (Policy, Vec<String>) {
        let mut problems = Vec::new();
        let scope = match pb::Scope::try_from(a.scope) {
            Ok(pb::Scope::Global) => PolicyScope::Global,
            Ok(pb::Scope::Namespace) => PolicyScope::Namespace,
            Ok(pb::Scope::WorkloadSelector) => PolicyScope::WorkloadSelector,
            Err(_) => {
                problems.push(format!(
                    "unknown scope {}: applied to the whole namespace",
                    a.scope
                ));
                PolicyScope::Namespace
            }
        };
        let mut rules: Vec<Vec<Vec<Match>>> = a
            .rules
            .iter()
            .map(|r| {
                r.clauses
                    .iter()
                    .map(|c| c.matches.iter().map(match_from).collect())
                    .collect()
            })
            .collect();
        for (i, m) in rules.iter().flatten().flatten().enumerate() {
            problems.extend(m.unevaluable.iter().map(|u| format!("match {i}: {u}")));
        }
        let action = match pb::Action::try_from(a.action) {
            Ok(pb::Action::Allow) => Action::Allow,
            Ok(pb::Action::Deny) => Action::Deny,
            Err(_) => {
                problems.push(format!(
                    "unknown action {}: denies everything in its scope",
                    a.action
                ));
                rules = vec![vec![]];
                Action::Deny
            }
        };
        if !a.extensions.is_empty() {
            let p = "extensions are not supported".to_string();
            problems.push(p.clone());
            let mut fc = Policy::fail_closed(&a.namespace, &a.name, scope, action, a.dry_run, p);
            fc.problems = problems.clone();
            return (fc, problems);
        }
        (
            Policy {
                name: a.name.clone(),
                namespace: a.namespace.clone(),
                scope,
                action,
                dry_run: a.dry_run,
                rules,
                problems: problems.clone(),
            },
            problems,
        )
    }

    /// The L4 form for ztunnel, with notes on what was left out (HTTP attributes), or
    /// `None` for a policy that never changes a decision (AUDIT).
    pub fn to_proto(&self) -> Option<(pb::Authorization, Vec<String>)> {
        let action = match self.action {
            Action::Allow => pb::Action::Allow,
            Action::Deny => pb::Action::Deny,
            Action::Audit => return None,
        };
        let mut notes = Vec::new();
        let mut rules = Vec::new();
        for (i, rule) in self.rules.iter().enumerate() {
            let mut fields: Vec<String> = rule
                .iter()
                .flatten()
                .flat_map(|m| m.http_fields().into_iter().chain(m.unevaluable.clone()))
                .collect();
            fields.sort();
            fields.dedup();
            if !fields.is_empty() {
                notes.push(match action {
                    pb::Action::Allow => format!(
                        "rule {i}: ztunnel cannot evaluate {}; at L4 what depends on them allows nothing (only a waypoint can allow on HTTP attributes)",
                        fields.join(", ")
                    ),
                    pb::Action::Deny => format!(
                        "rule {i}: ztunnel cannot evaluate {}; at L4 it denies whenever the rest of the rule matches",
                        fields.join(", ")
                    ),
                });
            }
            let mut clauses = Vec::new();
            let mut never = false;
            for clause in rule {
                if clause.is_empty() {
                    continue;
                }
                match action {
                    pb::Action::Allow => {
                        let matches: Vec<pb::Match> = clause
                            .iter()
                            .filter(|m| !m.needs_more_than_l4())
                            .map(match_to)
                            .collect();
                        if matches.is_empty() {
                            never = true;
                            break;
                        }
                        clauses.push(pb::Clause { matches });
                    }
                    pb::Action::Deny => {
                        let always = clause
                            .iter()
                            .any(|m| m.needs_more_than_l4() && m.l4_part().is_empty());
                        if !always {
                            let matches = clause.iter().map(|m| match_to(&m.l4_part())).collect();
                            clauses.push(pb::Clause { matches });
                        }
                    }
                }
            }
            if !never {
                rules.push(pb::Rule { clauses });
            }
        }
        Some((
            pb::Authorization {
                name: self.name.clone(),
                namespace: self.namespace.clone(),
                scope: match self.scope {
                    PolicyScope::Global => pb::Scope::Global,
                    PolicyScope::Namespace => pb::Scope::Namespace,
                    PolicyScope::WorkloadSelector => pb::Scope::WorkloadSelector,
                } as i32,
                action: action as i32,
                rules,
                dry_run: self.dry_run,
                extensions: vec![],
            },
            notes,
        ))
    }
}
