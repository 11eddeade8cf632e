//! L7 AuthorizationPolicy at the waypoint (policies whose targetRefs name the waypoint's
//! Gateway or a Service it serves): methods, paths, hosts, ports, headers, principals,
//! namespaces, source IPs. Any matching DENY denies; with ALLOW policies present one must
//! match. Pure: no I/O.

use mesh_authz::IpNet;
use mesh_identity::SpiffeId;
use serde::Deserialize;
use std::net::IpAddr;

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct Spec {
    #[serde(default)]
    pub action: Option<String>,
    #[serde(default)]
    pub rules: Option<Vec<Rule>>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    #[serde(default)]
    pub from: Vec<From>,
    #[serde(default)]
    pub to: Vec<To>,
    #[serde(default)]
    pub when: Vec<Condition>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct From {
    pub source: Source,
}

/// Every field of Istio's `Source`: one the waypoint ignored would make an ALLOW rule
/// broader than written.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Source {
    #[serde(default)]
    pub principals: Vec<String>,
    #[serde(default)]
    pub not_principals: Vec<String>,
    /// JWT principals: the waypoint authenticates no JWTs, so a rule that names them
    /// never matches in ALLOW and always matches in DENY (fail closed both ways).
    #[serde(default)]
    pub request_principals: Vec<String>,
    #[serde(default)]
    pub not_request_principals: Vec<String>,
    #[serde(default)]
    pub namespaces: Vec<String>,
    #[serde(default)]
    pub not_namespaces: Vec<String>,
    /// `sa` (the policy's namespace) or `ns/sa`; normalized to `ns/sa` by `Policy::parse`.
    #[serde(default)]
    pub service_accounts: Vec<String>,
    #[serde(default)]
    pub not_service_accounts: Vec<String>,
    #[serde(default, deserialize_with = "ip_nets")]
    pub ip_blocks: Vec<IpNet>,
    #[serde(default, deserialize_with = "ip_nets")]
    pub not_ip_blocks: Vec<IpNet>,
    /// The original client address; the waypoint trusts no X-Forwarded-For, so that is
    /// the source address, as for `ipBlocks`.
    #[serde(default, deserialize_with = "ip_nets")]
    pub remote_ip_blocks: Vec<IpNet>,
    #[serde(default, deserialize_with = "ip_nets")]
    pub not_remote_ip_blocks: Vec<IpNet>,
}

fn ip_nets<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<IpNet>, D::Error> {
    Vec::<String>::deserialize(d)?
        .iter()
        .map(|s| IpNet::parse(s).map_err(serde::de::Error::custom))
        .collect()
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct To {
    pub operation: Operation,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Operation {
    #[serde(default)]
    pub methods: Vec<String>,
    #[serde(default)]
    pub not_methods: Vec<String>,
    #[serde(default)]
    pub paths: Vec<String>,
    #[serde(default)]
    pub not_paths: Vec<String>,
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub not_hosts: Vec<String>,
    #[serde(default)]
    pub ports: Vec<String>,
    #[serde(default)]
    pub not_ports: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Condition {
    pub key: String,
    #[serde(default)]
    pub values: Vec<String>,
    #[serde(default)]
    pub not_values: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct Policy {
    pub key: String,
    pub deny: bool,
    pub rules: Vec<Rule>,
}

impl Policy {
    pub fn parse(namespace: &str, name: &str, json: &str) -> Result<Policy, String> {
        let key = format!("{namespace}/{name}");
        let spec: Spec = serde_json::from_str(json).map_err(|e| format!("{key}: {e}"))?;
        let deny = match spec.action.as_deref().unwrap_or("ALLOW") {
            "ALLOW" => false,
            "DENY" => true,
            other => {
                return Err(format!(
                    "{key}: action {other} is not supported by the waypoint"
                ));
            }
        };
        let mut rules = spec.rules.unwrap_or_default();
        for source in rules
            .iter_mut()
            .flat_map(|r| &mut r.from)
            .map(|f| &mut f.source)
        {
            for sa in source
                .service_accounts
                .iter_mut()
                .chain(&mut source.not_service_accounts)
            {
                if !sa.contains('/') {
                    *sa = format!("{namespace}/{sa}");
                }
            }
        }
        Ok(Policy { key, deny, rules })
    }
}

/// What a decision looks at.
pub struct Request<'a> {
    pub source: Option<&'a SpiffeId>,
    pub source_ip: IpAddr,
    pub method: &'a str,
    pub path: &'a str,
    pub host: &'a str,
    pub port: u16,
    pub headers: &'a http::HeaderMap,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow,
    Deny { policy: String, reason: String },
}

/// `*` any, `x*` prefix, `*x` suffix, else exact.
fn glob(pattern: &str, value: &str) -> bool {
    if pattern == "*" {
        true
    } else if let Some(p) = pattern.strip_suffix('*') {
        value.starts_with(p)
    } else if let Some(s) = pattern.strip_prefix('*') {
        value.ends_with(s)
    } else {
        pattern == value
    }
}

fn any_or_empty<T>(list: &[T], f: impl Fn(&T) -> bool) -> bool {
    list.is_empty() || list.iter().any(f)
}

fn none<T>(list: &[T], f: impl Fn(&T) -> bool) -> bool {
    !list.iter().any(f)
}

/// What is derived from the request once, not per rule.
struct Derived {
    principal: Option<String>,
}

/// `deny` says which way an attribute the waypoint cannot check falls: it matches in a
/// DENY policy and does not in an ALLOW one.
fn source_matches(s: &Source, r: &Request<'_>, d: &Derived, deny: bool) -> bool {
    let ns = r.source.map(SpiffeId::namespace);
    let p = |pat: &String| {
        d.principal
            .as_deref()
            .is_some_and(|v| glob(pat.trim_start_matches("spiffe://"), v))
    };
    let n = |pat: &String| ns.is_some_and(|v| glob(pat, v));
    let sa = |pat: &String| {
        r.source
            .is_some_and(|id| pat.split_once('/') == Some((id.namespace(), id.service_account())))
    };
    let ip = |net: &IpNet| net.contains(r.source_ip);
    let jwt = (s.request_principals.is_empty() && s.not_request_principals.is_empty()) || deny;
    any_or_empty(&s.principals, p)
        && none(&s.not_principals, p)
        && any_or_empty(&s.namespaces, n)
        && none(&s.not_namespaces, n)
        && any_or_empty(&s.service_accounts, sa)
        && none(&s.not_service_accounts, sa)
        && any_or_empty(&s.ip_blocks, ip)
        && none(&s.not_ip_blocks, ip)
        && any_or_empty(&s.remote_ip_blocks, ip)
        && none(&s.not_remote_ip_blocks, ip)
        && jwt
}

fn operation_matches(o: &Operation, r: &Request<'_>) -> bool {
    let m = |pat: &String| glob(pat, r.method);
    let p = |pat: &String| glob(pat, r.path);
    let h = |pat: &String| glob(&pat.to_ascii_lowercase(), &r.host.to_ascii_lowercase());
    let port = |pat: &String| pat.parse::<u16>().is_ok_and(|x| x == r.port);
    any_or_empty(&o.methods, m)
        && none(&o.not_methods, m)
        && any_or_empty(&o.paths, p)
        && none(&o.not_paths, p)
        && any_or_empty(&o.hosts, h)
        && none(&o.not_hosts, h)
        && any_or_empty(&o.ports, port)
        && none(&o.not_ports, port)
}

fn condition_matches(c: &Condition, r: &Request<'_>, d: &Derived, deny: bool) -> bool {
    let value: Option<String> = if let Some(h) = c
        .key
        .strip_prefix("request.headers[")
        .and_then(|k| k.strip_suffix(']'))
    {
        r.headers
            .get(h)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    } else {
        match c.key.as_str() {
            "source.namespace" => r.source.map(|s| s.namespace().to_string()),
            "source.principal" => d.principal.clone(),
            "source.ip" | "remote.ip" => Some(r.source_ip.to_string()),
            "destination.port" => Some(r.port.to_string()),
            // A key the waypoint cannot evaluate (JWT claims, ...).
            _ => return deny,
        }
    };
    let hit = |pat: &String| {
        value.as_deref().is_some_and(|v| {
            if matches!(c.key.as_str(), "source.ip" | "remote.ip") {
                IpNet::parse(pat).is_ok_and(|n| n.contains(r.source_ip))
            } else {
                glob(pat, v)
            }
        })
    };
    any_or_empty(&c.values, hit) && none(&c.not_values, hit)
}

fn rule_matches(rule: &Rule, r: &Request<'_>, d: &Derived, deny: bool) -> bool {
    (rule.from.is_empty()
        || rule
            .from
            .iter()
            .any(|f| source_matches(&f.source, r, d, deny)))
        && (rule.to.is_empty() || rule.to.iter().any(|t| operation_matches(&t.operation, r)))
        && rule.when.iter().all(|c| condition_matches(c, r, d, deny))
}

pub fn evaluate<'a>(policies: impl IntoIterator<Item = &'a Policy>, r: &Request<'_>) -> Decision {
    let d = Derived {
        principal: r.source.map(SpiffeId::principal),
    };
    let mut allows = Vec::new();
    let mut allowed = false;
    for p in policies {
        let matched = p.rules.iter().any(|rule| rule_matches(rule, r, &d, p.deny));
        if p.deny && matched {
            return Decision::Deny {
                policy: p.key.clone(),
                reason: format!("matched DENY policy {}", p.key),
            };
        }
        if !p.deny {
            allows.push(p.key.clone());
            allowed |= matched;
        }
    }
    if allows.is_empty() || allowed {
        Decision::Allow
    } else {
        allows.sort();
        Decision::Deny {
            policy: allows.join(","),
            reason: format!("no ALLOW policy matched (checked {})", allows.join(", ")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req<'a>(
        src: Option<&'a SpiffeId>,
        method: &'a str,
        path: &'a str,
        h: &'a http::HeaderMap,
    ) -> Request<'a> {
        Request {
            source: src,
            source_ip: "10.244.1.2".parse().unwrap(),
            method,
            path,
            host: "api.shop.svc.cluster.local",
            port: 80,
            headers: h,
        }
    }

    #[test]
    fn deny_by_path_and_allow_by_principal() {
        let h = http::HeaderMap::new();
        let web: SpiffeId = "spiffe://cluster.local/ns/front/sa/web".parse().unwrap();
        let other: SpiffeId = "spiffe://cluster.local/ns/evil/sa/x".parse().unwrap();
        let deny = Policy::parse(
            "shop",
            "no-admin",
            r#"{"action":"DENY","rules":[{"to":[{"operation":{"paths":["/admin*"]}}]}]}"#,
        )
        .unwrap();
        let allow = Policy::parse("shop", "front-only", r#"{"rules":[{"from":[{"source":{"namespaces":["front"]}}],"to":[{"operation":{"methods":["GET","POST"]}}]}]}"#).unwrap();
        let ps = [deny, allow];
        assert_eq!(
            evaluate(&ps, &req(Some(&web), "GET", "/", &h)),
            Decision::Allow
        );
        assert!(
            matches!(evaluate(&ps, &req(Some(&web), "GET", "/admin/users", &h)), Decision::Deny { policy, .. } if policy == "shop/no-admin")
        );
        assert!(matches!(
            evaluate(&ps, &req(Some(&other), "GET", "/", &h)),
            Decision::Deny { .. }
        ));
        assert!(matches!(
            evaluate(&ps, &req(Some(&web), "DELETE", "/", &h)),
            Decision::Deny { .. }
        ));
        assert!(
            matches!(
                evaluate(&ps, &req(None, "GET", "/", &h)),
                Decision::Deny { .. }
            ),
            "no identity, no namespace"
        );
    }

    #[test]
    fn headers_ips_and_empty_policies() {
        let mut h = http::HeaderMap::new();
        h.insert("x-user", "alice".parse().unwrap());
        let p = Policy::parse("s", "hdr", r#"{"rules":[{"when":[{"key":"request.headers[x-user]","values":["alice"]}],"from":[{"source":{"ipBlocks":["10.244.0.0/16"]}}]}]}"#).unwrap();
        assert_eq!(evaluate([&p], &req(None, "GET", "/", &h)), Decision::Allow);
        let empty = http::HeaderMap::new();
        assert!(matches!(
            evaluate([&p], &req(None, "GET", "/", &empty)),
            Decision::Deny { .. }
        ));
        let nothing = Policy::parse("s", "nothing", "{}").unwrap();
        assert!(
            matches!(
                evaluate([&nothing], &req(None, "GET", "/", &empty)),
                Decision::Deny { .. }
            ),
            "ALLOW with no rules denies"
        );
        assert!(Policy::parse("s", "c", r#"{"action":"CUSTOM"}"#).is_err());
        assert_eq!(
            evaluate([], &req(None, "GET", "/", &empty)),
            Decision::Allow
        );
    }

    #[test]
    fn every_source_field_counts_and_unverifiable_ones_fail_closed() {
        let h = http::HeaderMap::new();
        let web: SpiffeId = "spiffe://cluster.local/ns/front/sa/web".parse().unwrap();
        let other: SpiffeId = "spiffe://cluster.local/ns/front/sa/other".parse().unwrap();
        let allows = |p: &Policy, id: &SpiffeId| {
            evaluate([p], &req(Some(id), "GET", "/", &h)) == Decision::Allow
        };
        // serviceAccounts: bare names are in the policy's namespace.
        let sa = Policy::parse(
            "front",
            "sa",
            r#"{"rules":[{"from":[{"source":{"serviceAccounts":["web"]}}]}]}"#,
        )
        .unwrap();
        assert!(allows(&sa, &web) && !allows(&sa, &other));
        let sa = Policy::parse(
            "shop",
            "sa",
            r#"{"rules":[{"from":[{"source":{"notServiceAccounts":["front/web"]}}]}]}"#,
        )
        .unwrap();
        assert!(!allows(&sa, &web) && allows(&sa, &other));
        // remoteIpBlocks: the source address (10.244.1.2 in `req`).
        let ip = Policy::parse(
            "s",
            "ip",
            r#"{"rules":[{"from":[{"source":{"remoteIpBlocks":["10.9.0.0/16"]}}]}]}"#,
        )
        .unwrap();
        assert!(!allows(&ip, &web));
        let ip = Policy::parse(
            "s",
            "ip",
            r#"{"rules":[{"from":[{"source":{"remoteIpBlocks":["10.244.1.0/24"]}}]}]}"#,
        )
        .unwrap();
        assert!(allows(&ip, &web));
        // JWT principals cannot be checked here: ALLOW never matches, DENY always does.
        let jwt = r#"{"rules":[{"from":[{"source":{"requestPrincipals":["issuer/alice"]}}]}]}"#;
        assert!(!allows(&Policy::parse("s", "jwt", jwt).unwrap(), &web));
        let deny = Policy::parse(
            "s",
            "jwt",
            &jwt.replace("{\"rules\"", "{\"action\":\"DENY\",\"rules\""),
        )
        .unwrap();
        assert!(deny.deny && !allows(&deny, &web));
        // Same for a condition key the waypoint cannot evaluate.
        let claims = r#"{"action":"DENY","rules":[{"when":[{"key":"request.auth.claims[group]","values":["x"]}]}]}"#;
        assert!(!allows(&Policy::parse("s", "c", claims).unwrap(), &web));
        let claims =
            r#"{"rules":[{"when":[{"key":"request.auth.claims[group]","values":["x"]}]}]}"#;
        assert!(!allows(&Policy::parse("s", "c", claims).unwrap(), &web));
        // A field the waypoint does not know, or a bad block, is an error, not ignored.
        assert!(
            Policy::parse(
                "s",
                "u",
                r#"{"rules":[{"from":[{"source":{"principalz":["x"]}}]}]}"#
            )
            .is_err()
        );
        let bad = Policy::parse(
            "s",
            "b",
            r#"{"rules":[{"from":[{"source":{"ipBlocks":["10.0.0.0/40"]}}]}]}"#,
        );
        assert!(bad.unwrap_err().contains("prefix length"));
    }
}
