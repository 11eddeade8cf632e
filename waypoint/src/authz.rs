//! L7 AuthorizationPolicy at the waypoint (policies whose targetRefs name the waypoint's
//! Gateway or a Service it serves): methods, paths, hosts, ports, headers, principals,
//! namespaces, source IPs. Any matching DENY denies; with ALLOW policies present one must
//! match. Pure: no I/O.

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
pub struct Rule {
    #[serde(default)]
    pub from: Vec<From>,
    #[serde(default)]
    pub to: Vec<To>,
    #[serde(default)]
    pub when: Vec<Condition>,
}

#[derive(Debug, Clone, Deserialize, Default)]
pub struct From {
    pub source: Source,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct Source {
    #[serde(default)]
    pub principals: Vec<String>,
    #[serde(default)]
    pub not_principals: Vec<String>,
    #[serde(default)]
    pub namespaces: Vec<String>,
    #[serde(default)]
    pub not_namespaces: Vec<String>,
    #[serde(default)]
    pub ip_blocks: Vec<String>,
    #[serde(default)]
    pub not_ip_blocks: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, Default)]
pub struct To {
    pub operation: Operation,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
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
#[serde(rename_all = "camelCase")]
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
        Ok(Policy {
            key,
            deny,
            rules: spec.rules.unwrap_or_default(),
        })
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

fn in_cidr(cidr: &str, ip: IpAddr) -> bool {
    let (addr, len) = cidr
        .split_once('/')
        .map_or((cidr, None), |(a, l)| (a, l.parse::<u32>().ok()));
    let Ok(net) = addr.parse::<IpAddr>() else {
        return false;
    };
    match (net, ip) {
        (IpAddr::V4(n), IpAddr::V4(i)) => {
            let l = len.unwrap_or(32).min(32);
            let mask = if l == 0 { 0 } else { u32::MAX << (32 - l) };
            u32::from(n) & mask == u32::from(i) & mask
        }
        (IpAddr::V6(n), IpAddr::V6(i)) => {
            let l = len.unwrap_or(128).min(128);
            let mask = if l == 0 { 0 } else { u128::MAX << (128 - l) };
            u128::from(n) & mask == u128::from(i) & mask
        }
        _ => false,
    }
}

fn any_or_empty(list: &[String], f: impl Fn(&str) -> bool) -> bool {
    list.is_empty() || list.iter().any(|x| f(x))
}

fn none(list: &[String], f: impl Fn(&str) -> bool) -> bool {
    !list.iter().any(|x| f(x))
}

fn source_matches(s: &Source, r: &Request<'_>) -> bool {
    let principal = r.source.map(SpiffeId::principal);
    let ns = r.source.map(SpiffeId::namespace);
    let p = |pat: &str| {
        principal
            .as_deref()
            .is_some_and(|v| glob(pat.trim_start_matches("spiffe://"), v))
    };
    let n = |pat: &str| ns.is_some_and(|v| glob(pat, v));
    let ip = |c: &str| in_cidr(c, r.source_ip);
    any_or_empty(&s.principals, p)
        && none(&s.not_principals, p)
        && any_or_empty(&s.namespaces, n)
        && none(&s.not_namespaces, n)
        && any_or_empty(&s.ip_blocks, ip)
        && none(&s.not_ip_blocks, ip)
}

fn operation_matches(o: &Operation, r: &Request<'_>) -> bool {
    let m = |pat: &str| glob(pat, r.method);
    let p = |pat: &str| glob(pat, r.path);
    let h = |pat: &str| glob(&pat.to_ascii_lowercase(), &r.host.to_ascii_lowercase());
    let port = |pat: &str| pat.parse::<u16>().is_ok_and(|x| x == r.port);
    any_or_empty(&o.methods, m)
        && none(&o.not_methods, m)
        && any_or_empty(&o.paths, p)
        && none(&o.not_paths, p)
        && any_or_empty(&o.hosts, h)
        && none(&o.not_hosts, h)
        && any_or_empty(&o.ports, port)
        && none(&o.not_ports, port)
}

fn condition_matches(c: &Condition, r: &Request<'_>) -> bool {
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
            "source.principal" => r.source.map(SpiffeId::principal),
            "source.ip" => Some(r.source_ip.to_string()),
            "destination.port" => Some(r.port.to_string()),
            _ => None,
        }
    };
    let hit = |pat: &str| {
        value.as_deref().is_some_and(|v| {
            if c.key == "source.ip" {
                in_cidr(pat, r.source_ip)
            } else {
                glob(pat, v)
            }
        })
    };
    any_or_empty(&c.values, hit) && none(&c.not_values, hit)
}

fn rule_matches(rule: &Rule, r: &Request<'_>) -> bool {
    (rule.from.is_empty() || rule.from.iter().any(|f| source_matches(&f.source, r)))
        && (rule.to.is_empty() || rule.to.iter().any(|t| operation_matches(&t.operation, r)))
        && rule.when.iter().all(|c| condition_matches(c, r))
}

pub fn evaluate<'a>(policies: impl IntoIterator<Item = &'a Policy>, r: &Request<'_>) -> Decision {
    let mut allows = Vec::new();
    let mut allowed = false;
    for p in policies {
        let matched = p.rules.iter().any(|rule| rule_matches(rule, r));
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
}
