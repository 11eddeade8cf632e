//! The typed `mesh.waypoint.v1.AuthorizationPolicy` (as mesh-control read it) into a
//! [`Policy`]. Never refuses a message: every problem mesh-control recorded, and
//! anything this side cannot read (a newer enum value, a malformed address), becomes an
//! unevaluable part where it sits, so a receiver that NACKs still enforces the policy
//! fail closed.

use crate::{Action, HeaderMatch, IpNet, Match, Policy, PolicyScope, StringMatch};
use mesh_proto::waypoint as pb;

pub fn string(m: &pb::AuthzStringMatch) -> Result<StringMatch, String> {
    use pb::authz_string_match::Kind;
    match &m.kind {
        Some(Kind::Exact(s)) => Ok(StringMatch::Exact(s.clone())),
        Some(Kind::Prefix(s)) => Ok(StringMatch::Prefix(s.clone())),
        Some(Kind::Suffix(s)) => Ok(StringMatch::Suffix(s.clone())),
        Some(Kind::Presence(())) => Ok(StringMatch::Presence),
        None => Err("string match without a value".into()),
    }
}

fn net(c: &pb::Cidr) -> Result<IpNet, String> {
    IpNet::from_bytes(&c.address, c.prefix_len)
}

fn port(p: &u32) -> Result<u16, String> {
    u16::try_from(*p)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("port {p} is out of range"))
}

fn sa(s: &pb::ServiceAccountRef) -> Result<(String, String), String> {
    Ok((s.namespace.clone(), s.name.clone()))
}

/// What this side could not read, kept apart from what mesh-control reported.
#[derive(Default)]
struct Reader {
    errors: Vec<String>,
}

impl Reader {
    /// Like `istio::each`, also remembering what this side could not read.
    fn all<T, U>(
        &mut self,
        at: &str,
        items: &[T],
        f: impl Fn(&T) -> Result<U, String>,
        m: &mut Vec<String>,
    ) -> Vec<U> {
        let before = m.len();
        let out = crate::istio::each(at, items, f, m);
        self.errors.extend(m[before..].iter().cloned());
        out
    }

    fn source(&mut self, at: &str, s: &pb::AuthzSource) -> Match {
        let mut u: Vec<String> = s.problems.iter().map(problem).collect();
        let mut m = Match {
            principals: self.all(at, &s.principals, string, &mut u),
            not_principals: self.all(at, &s.not_principals, string, &mut u),
            namespaces: self.all(at, &s.namespaces, string, &mut u),
            not_namespaces: self.all(at, &s.not_namespaces, string, &mut u),
            service_accounts: self.all(at, &s.service_accounts, sa, &mut u),
            not_service_accounts: self.all(at, &s.not_service_accounts, sa, &mut u),
            source_ips: self.all(at, &s.ip_blocks, net, &mut u),
            not_source_ips: self.all(at, &s.not_ip_blocks, net, &mut u),
            remote_ips: self.all(at, &s.remote_ip_blocks, net, &mut u),
            not_remote_ips: self.all(at, &s.not_remote_ip_blocks, net, &mut u),
            ..Default::default()
        };
        if !s.request_principals.is_empty() || !s.not_request_principals.is_empty() {
            u.push(format!(
                "{at}.requestPrincipals: JWTs are not authenticated in this mesh"
            ));
        }
        m.unevaluable = u;
        m
    }

    fn operation(&mut self, at: &str, o: &pb::AuthzOperation) -> Match {
        let mut u: Vec<String> = o.problems.iter().map(problem).collect();
        let mut m = Match {
            hosts: self.all(at, &o.hosts, string, &mut u),
            not_hosts: self.all(at, &o.not_hosts, string, &mut u),
            destination_ports: self.all(at, &o.ports, port, &mut u),
            not_destination_ports: self.all(at, &o.not_ports, port, &mut u),
            methods: self.all(at, &o.methods, string, &mut u),
            not_methods: self.all(at, &o.not_methods, string, &mut u),
            paths: self.all(at, &o.paths, string, &mut u),
            not_paths: self.all(at, &o.not_paths, string, &mut u),
            ..Default::default()
        };
        m.unevaluable = u;
        m
    }

    fn condition(&mut self, at: &str, c: &pb::AuthzCondition) -> Match {
        use pb::authz_condition::Attribute as A;
        let mut u: Vec<String> = c.problems.iter().map(problem).collect();
        let at = format!("{at} ({})", c.key);
        let strings = self.all(&at, &c.values, string, &mut u);
        let not_strings = self.all(&at, &c.not_values, string, &mut u);
        let nets = self.all(&at, &c.ip_values, net, &mut u);
        let not_nets = self.all(&at, &c.not_ip_values, net, &mut u);
        let ports = self.all(&at, &c.port_values, port, &mut u);
        let not_ports = self.all(&at, &c.not_port_values, port, &mut u);
        let has_strings = !(strings.is_empty() && not_strings.is_empty());
        let has_nets = !(nets.is_empty() && not_nets.is_empty());
        let has_ports = !(ports.is_empty() && not_ports.is_empty());
        let mut m = Match::default();
        // Values of a kind the attribute does not take are unreadable: never ignored.
        let kinds_ok = match &c.attribute {
            Some(A::SourceIp(())) => {
                (m.source_ips, m.not_source_ips) = (nets, not_nets);
                !has_strings && !has_ports
            }
            Some(A::RemoteIp(())) => {
                (m.remote_ips, m.not_remote_ips) = (nets, not_nets);
                !has_strings && !has_ports
            }
            Some(A::DestinationIp(())) => {
                (m.destination_ips, m.not_destination_ips) = (nets, not_nets);
                !has_strings && !has_ports
            }
            Some(A::SourceNamespace(())) => {
                (m.namespaces, m.not_namespaces) = (strings, not_strings);
                !has_nets && !has_ports
            }
            Some(A::SourcePrincipal(())) => {
                (m.principals, m.not_principals) = (strings, not_strings);
                !has_nets && !has_ports
            }
            Some(A::DestinationPort(())) => {
                (m.destination_ports, m.not_destination_ports) = (ports, not_ports);
                !has_strings && !has_nets
            }
            Some(A::RequestHeader(name)) => {
                m.headers.push(HeaderMatch {
                    name: name.to_ascii_lowercase(),
                    values: strings,
                    not_values: not_strings,
                });
                !has_nets && !has_ports
            }
            Some(A::Unsupported(())) => {
                u.push(format!("{at}: not evaluated by this mesh"));
                true
            }
            // mesh-control records why it could not read the key; without such a
            // problem, the attribute is one this side does not know.
            None if !c.problems.is_empty() => true,
            None => {
                let e = format!("{at}: unknown attribute");
                self.errors.push(e.clone());
                u.push(e);
                true
            }
        };
        if !kinds_ok {
            let e = format!("{at}: values of a kind the attribute does not take");
            self.errors.push(e.clone());
            u.push(e);
        }
        m.unevaluable = u;
        m
    }
}

fn problem(p: &pb::Problem) -> String {
    format!("{}: {}", p.field, p.message)
}

/// The evaluable policy, and what this side could not read (empty when mesh-control
/// and this side agree on the message).
pub fn policy(p: &pb::AuthorizationPolicy, scope: PolicyScope) -> (Policy, Vec<String>) {
    let mut r = Reader::default();
    let mut problems: Vec<String> = p.problems.iter().map(problem).collect();
    let mut rules = Vec::with_capacity(p.rules.len());
    for (i, rule) in p.rules.iter().enumerate() {
        let at = format!("rules[{i}]");
        let mut clauses = Vec::new();
        if !rule.from.is_empty() {
            clauses.push(
                rule.from
                    .iter()
                    .enumerate()
                    .map(|(j, s)| r.source(&format!("{at}.from[{j}].source"), s))
                    .collect(),
            );
        }
        if !rule.to.is_empty() {
            clauses.push(
                rule.to
                    .iter()
                    .enumerate()
                    .map(|(j, o)| r.operation(&format!("{at}.to[{j}].operation"), o))
                    .collect(),
            );
        }
        for (j, c) in rule.when.iter().enumerate() {
            clauses.push(vec![r.condition(&format!("{at}.when[{j}]"), c)]);
        }
        if !rule.problems.is_empty() {
            clauses.push(vec![Match {
                unevaluable: rule.problems.iter().map(problem).collect(),
                ..Default::default()
            }]);
        }
        rules.push(clauses);
    }
    let action = match pb::AuthzAction::try_from(p.action) {
        Ok(pb::AuthzAction::Allow) => Action::Allow,
        Ok(pb::AuthzAction::Deny) => Action::Deny,
        Ok(pb::AuthzAction::Audit) => Action::Audit,
        Ok(pb::AuthzAction::Custom) => {
            problems.push(
                "CUSTOM: no external authorizer in this mesh; denies what its rules match".into(),
            );
            Action::Deny
        }
        Ok(pb::AuthzAction::Unspecified) | Err(_) => {
            let e = format!(
                "action {}: unknown; denies everything in its scope",
                p.action
            );
            if p.problems.is_empty() {
                // mesh-control always says why; a value it did not send is this side's.
                r.errors.push(e.clone());
            }
            problems.push(e);
            rules = vec![vec![]];
            Action::Deny
        }
    };
    if !p.problems.is_empty() && action != Action::Audit {
        // Not understood as a whole: allows nothing, or denies everything in its scope.
        rules = vec![vec![vec![Match {
            unevaluable: p.problems.iter().map(problem).collect(),
            ..Default::default()
        }]]];
    }
    for m in rules.iter().flatten().flatten() {
        problems.extend(m.unevaluable.iter().cloned());
    }
    problems.dedup();
    (
        Policy {
            name: p.name.clone(),
            namespace: p.namespace.clone(),
            scope,
            action,
            dry_run: p.dry_run,
            rules,
            problems,
        },
        r.errors,
    )
}
