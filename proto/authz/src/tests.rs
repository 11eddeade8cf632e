//! The evaluator's rules, and each reading of a policy into it.

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

/// Families never cross: an IPv4 block never matches an IPv6 source or the reverse, and an
/// IPv4-mapped IPv6 source (`::ffff:a.b.c.d`) is the IPv4 peer it stands for, so it is
/// caught by the IPv4 DENY it might try to get around and let in by no IPv6 block.
#[test]
fn ip_blocks_keep_to_their_family_and_mapped_sources_are_ipv4() {
    let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
    let v4 = IpNet::parse("10.244.1.0/24").unwrap();
    let v6 = IpNet::parse("fd00:10:244:1::/64").unwrap();
    assert!(v4.contains(ip("10.244.1.5")));
    assert!(v6.contains(ip("fd00:10:244:1::5")));
    assert!(!v6.contains(ip("fd00:10:244:2::5")));
    assert!(!v4.contains(ip("fd00:10:244:1::5")));
    assert!(!v6.contains(ip("10.244.1.5")));
    assert!(!IpNet::parse("::/0").unwrap().contains(ip("10.0.0.1")));
    assert!(!IpNet::parse("0.0.0.0/0").unwrap().contains(ip("::1")));
    // The mapped form: the IPv4 address, whichever way the block or the source is written.
    assert!(v4.contains(ip("::ffff:10.244.1.5")));
    assert!(!v4.contains(ip("::ffff:10.244.2.5")));
    assert!(
        !IpNet::parse("::/0")
            .unwrap()
            .contains(ip("::ffff:10.244.1.5"))
    );
    let mapped = IpNet::parse("::ffff:10.244.1.0/120").unwrap();
    assert!(mapped.contains(ip("10.244.1.5")));
    assert!(mapped.contains(ip("::ffff:10.244.1.5")));
    assert!(!mapped.contains(ip("10.244.2.5")));
    // An IPv4 DENY holds against the mapped form of a denied source.
    let deny = policy(
        "deny-v4",
        Action::Deny,
        vec![vec![vec![Match {
            source_ips: vec![v4],
            ..Default::default()
        }]]],
    );
    let mut c = conn(Some(A), 80);
    c.src_ip = ip("::ffff:10.244.1.5");
    assert!(!evaluate([&deny], &c).is_allowed());
    c.src_ip = ip("fd00:10:244:1::5");
    assert!(
        evaluate([&deny], &c).is_allowed(),
        "an IPv6 source is not in an IPv4 block"
    );
}

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
        problems: vec![],
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

// ---- fail closed, from the Kubernetes object to each enforcing component ----

use mesh_proto::waypoint as wp;

/// Reads a spec (YAML-ish JSON) as mesh-control does.
fn read(spec: serde_json::Value) -> (wp::AuthorizationPolicy, Vec<k8s::Finding>) {
    k8s::read("shop", "p", &Default::default(), Some(&spec))
}

fn model(spec: serde_json::Value) -> Policy {
    let (p, _) = read(spec);
    let (m, errors) = typed::policy(&p, PolicyScope::WorkloadSelector);
    assert!(
        errors.is_empty(),
        "the receiver reads what control wrote: {errors:?}"
    );
    m
}

fn http<'a>(method: &'a str, path: &'a str, h: &'a http::HeaderMap) -> HttpRequest<'a> {
    HttpRequest {
        method,
        path,
        host: "api.shop.svc.cluster.local",
        headers: h,
    }
}

/// L4 (ztunnel) and L7 (waypoint) decisions for one request from `A`.
fn decide(p: &Policy, port: u16, method: &str, path: &str) -> (bool, bool) {
    let h = http::HeaderMap::new();
    let c = conn(Some(A), port);
    (
        evaluate([p], &c).is_allowed(),
        evaluate_request([p], &c, Some(&http(method, path, &h))).is_allowed(),
    )
}

use serde_json::json;

#[test]
fn an_allow_rule_with_an_unreadable_part_allows_nothing_anywhere() {
    // The case: an invalid ipBlocks CIDR in an ALLOW. Before, the waypoint
    // refused the policy and then had none: everyone was allowed.
    let (p, findings) =
        read(json!({"rules": [{"from": [{"source": {"ipBlocks": ["10.0.0.0/40"]}}]}]}));
    assert_eq!(
        findings[0].field,
        "spec.rules[0].from[0].source.ipBlocks[0]"
    );
    assert_eq!(findings[0].severity, k8s::Severity::Error);
    assert_eq!(k8s::problems(&p).len(), 1);
    let m = model(json!({"rules": [{"from": [{"source": {"ipBlocks": ["10.0.0.0/40"]}}]}]}));
    assert_eq!(decide(&m, 80, "GET", "/"), (false, false));
    // An unknown field in a source, and one in a rule: the same.
    for spec in [
        json!({"rules": [{"from": [{"source": {"namespaces": ["front"], "principalz": ["x"]}}]}]}),
        json!({"rules": [{"from": [{"source": {"namespaces": ["front"]}}], "unless": []}]}),
        json!({"rules": [{"to": [{"operation": {"paths": ["/a/{*}/b"]}}]}]}),
        json!({"rules": [{"to": [{"operation": {"ports": ["http"]}}]}]}),
        json!({"rules": [{"when": [{"key": "request.auth.claims[group]", "values": ["x"]}]}]}),
        json!({"rules": [{"from": [{"source": {"requestPrincipals": ["issuer/alice"]}}]}]}),
        json!({"rules": [{"when": [{"key": "source.nmespace", "values": ["front"]}]}]}),
    ] {
        let m = model(spec.clone());
        assert_eq!(decide(&m, 80, "GET", "/"), (false, false), "{spec}");
    }
    // Other ALLOW rules of the same policy still allow.
    let m = model(json!({"rules": [
        {"from": [{"source": {"ipBlocks": ["nonsense"]}}]},
        {"from": [{"source": {"namespaces": ["front"]}}]}]}));
    assert_eq!(decide(&m, 80, "GET", "/"), (true, true));
}

#[test]
fn a_deny_rule_denies_whenever_its_readable_parts_match() {
    // DENY /admin* from an unreadable ipBlocks: the waypoint denies /admin to everyone.
    let m = model(json!({"action": "DENY", "rules": [{
        "from": [{"source": {"ipBlocks": ["10.0.0.0/40"]}}],
        "to": [{"operation": {"paths": ["/admin*"]}}]}]}));
    assert!(!decide(&m, 80, "GET", "/admin/x").1);
    assert!(decide(&m, 80, "GET", "/public").1);
    // At L4 the path is unknown too: ztunnel denies every connection in scope.
    assert!(!decide(&m, 80, "GET", "/public").0);
    // L7-only DENY at L4 (the "DENY on paths enforced by ztunnel"): all denied.
    let paths = model(
        json!({"action": "DENY", "rules": [{"to": [{"operation": {"paths": ["/admin*"]}}]}]}),
    );
    assert_eq!(decide(&paths, 80, "GET", "/"), (false, true));
    // ...but only where its L4 parts match.
    let on_port = model(
        json!({"action": "DENY", "rules": [{"to": [{"operation": {"methods": ["POST"], "ports": ["9000"]}}]}]}),
    );
    assert_eq!(decide(&on_port, 80, "POST", "/"), (true, true));
    assert_eq!(decide(&on_port, 9000, "GET", "/"), (false, true));
    assert_eq!(decide(&on_port, 9000, "POST", "/"), (false, false));
    // JWT attributes count as matching in a DENY, and an unknown field too.
    for spec in [
        json!({"action": "DENY", "rules": [{"from": [{"source": {"requestPrincipals": ["*"]}}]}]}),
        json!({"action": "DENY", "rules": [{"when": [{"key": "request.auth.claims[g]", "values": ["x"]}]}]}),
        json!({"action": "DENY", "rules": [{"from": [{"source": {"namespaces": ["front"], "princpals": ["x"]}}]}]}),
    ] {
        assert_eq!(
            decide(&model(spec.clone()), 80, "GET", "/"),
            (false, false),
            "{spec}"
        );
    }
    // The readable part still narrows it: another namespace is not denied.
    let other = model(
        json!({"action": "DENY", "rules": [{"from": [{"source": {"namespaces": ["evil"], "princpals": ["x"]}}]}]}),
    );
    assert_eq!(decide(&other, 80, "GET", "/"), (true, true));
}

#[test]
fn an_unknown_action_or_spec_field_denies_everything_in_scope() {
    for spec in [
        json!({"action": "ALOW", "rules": [{}]}),
        json!({"action": "ALLOW", "rulez": [{}], "rules": [{}]}),
        json!({"selector": {"matchLabels": {"app": "api"}}, "targetRefs": [{"kind": "Service", "name": "api"}], "rules": [{}]}),
        json!({"action": 3}),
        json!({"action": "DENY", "provider": {"name": "x"}}),
    ] {
        let m = model(spec.clone());
        assert_eq!(decide(&m, 80, "GET", "/"), (false, false), "{spec}");
    }
    // A DENY with a spec problem denies everything too (not just what it names).
    let m = model(
        json!({"action": "DENY", "rulez": [], "rules": [{"to": [{"operation": {"ports": ["1"]}}]}]}),
    );
    assert_eq!(decide(&m, 80, "GET", "/"), (false, false));
    // CUSTOM: no external authorizer here; denies what its rules match.
    let custom = model(
        json!({"action": "CUSTOM", "provider": {"name": "ext"}, "rules": [{"to": [{"operation": {"ports": ["9000"]}}]}]}),
    );
    assert_eq!(decide(&custom, 80, "GET", "/"), (true, true));
    assert_eq!(decide(&custom, 9000, "GET", "/"), (false, false));
    // AUDIT never changes a decision.
    let audit = model(json!({"action": "AUDIT", "rules": [{}]}));
    assert_eq!(decide(&audit, 80, "GET", "/"), (true, true));
}

#[test]
fn a_receiver_that_cannot_read_a_part_fails_closed_and_says_so() {
    // A newer control plane (or a corrupted message): an address of 5 bytes, an
    // attribute this side does not know, an action value it does not know.
    let (mut p, _) = read(json!({"rules": [{"from": [{"source": {"namespaces": ["front"]}}]}]}));
    p.rules[0].from[0].ip_blocks.push(wp::Cidr {
        address: vec![1, 2, 3, 4, 5],
        prefix_len: 8,
    });
    let (m, errors) = typed::policy(&p, PolicyScope::Namespace);
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(decide(&m, 80, "GET", "/"), (false, false));
    let (mut p, _) = read(
        json!({"action": "DENY", "rules": [{"when": [{"key": "source.namespace", "values": ["evil"]}]}]}),
    );
    p.rules[0].when[0].attribute = None;
    let (m, errors) = typed::policy(&p, PolicyScope::Namespace);
    assert_eq!(errors.len(), 1);
    assert_eq!(
        decide(&m, 80, "GET", "/"),
        (false, false),
        "DENY: unreadable counts as matching"
    );
    let (mut p, _) = read(json!({"rules": [{}]}));
    p.action = 42;
    let (m, errors) = typed::policy(&p, PolicyScope::Namespace);
    assert_eq!(errors.len(), 1);
    assert_eq!(decide(&m, 80, "GET", "/"), (false, false));
}

#[test]
fn an_unreadable_istio_authorization_fails_closed_at_ztunnel() {
    use mesh_proto::security as sec;
    let allow = sec::Authorization {
        name: "a".into(),
        namespace: "ns".into(),
        scope: sec::Scope::Namespace as i32,
        action: sec::Action::Allow as i32,
        rules: vec![sec::Rule {
            clauses: vec![sec::Clause {
                matches: vec![sec::Match {
                    source_ips: vec![sec::Address {
                        address: vec![10, 0, 0],
                        length: 8,
                    }],
                    ..Default::default()
                }],
            }],
        }],
        ..Default::default()
    };
    let (p, problems) = Policy::from_proto(&allow);
    assert_eq!(problems.len(), 1);
    assert!(
        !evaluate([&p], &conn(Some(A), 80)).is_allowed(),
        "nothing allowed"
    );
    let mut deny = allow.clone();
    deny.action = sec::Action::Deny as i32;
    let (p, _) = Policy::from_proto(&deny);
    assert!(
        !evaluate([&p], &conn(Some(A), 80)).is_allowed(),
        "all denied"
    );
    let mut unknown = allow.clone();
    unknown.action = 7;
    unknown.rules.clear();
    let (p, problems) = Policy::from_proto(&unknown);
    assert!(problems[0].contains("unknown action"));
    assert!(!evaluate([&p], &conn(Some(A), 80)).is_allowed());
    let mut scope = allow.clone();
    scope.scope = 9;
    scope.rules.clear();
    let (p, _) = Policy::from_proto(&scope);
    assert_eq!(p.scope, PolicyScope::Namespace);
    // A string match without a value: Istio's ztunnel drops it (and the match may then
    // match everyone); here it is unevaluable.
    let mut empty_sm = allow.clone();
    empty_sm.rules[0].clauses[0].matches[0] = sec::Match {
        principals: vec![sec::StringMatch { match_type: None }],
        ..Default::default()
    };
    let (p, _) = Policy::from_proto(&empty_sm);
    assert!(!evaluate([&p], &conn(Some(A), 80)).is_allowed());
}

#[test]
fn headers_are_matched_on_all_their_values() {
    let m = model(
        json!({"action": "DENY", "rules": [{"when": [{"key": "request.headers[X-User]", "values": ["alice"]}]}]}),
    );
    let c = conn(Some(A), 80);
    let mut h = http::HeaderMap::new();
    h.append("x-user", "alice".parse().unwrap());
    assert!(!evaluate_request([&m], &c, Some(&http("GET", "/", &h))).is_allowed());
    let allow = model(
        json!({"rules": [{"when": [{"key": "request.headers[x-user]", "values": ["bob"]}]}]}),
    );
    h.append("x-user", "bob".parse().unwrap());
    assert!(
        !evaluate_request([&allow], &c, Some(&http("GET", "/", &h))).is_allowed(),
        "a second value does not pass for the first"
    );
    let mut only_bob = http::HeaderMap::new();
    only_bob.append("x-user", "bob".parse().unwrap());
    assert!(evaluate_request([&allow], &c, Some(&http("GET", "/", &only_bob))).is_allowed());
}

/// What mesh-control sends ztunnel decides, at L4, exactly as the full policy would:
/// checked over a grid of policies and connections.
#[test]
fn lowering_for_ztunnel_keeps_every_l4_decision() {
    let specs = [
        json!({"rules": [{"from": [{"source": {"namespaces": ["front"]}}], "to": [{"operation": {"methods": ["GET"]}}]}]}),
        json!({"rules": [{"from": [{"source": {"namespaces": ["front"]}}, {"source": {"requestPrincipals": ["x"]}}]}]}),
        json!({"rules": [{"to": [{"operation": {"ports": ["80"]}}, {"operation": {"paths": ["/x"]}}]}]}),
        json!({"rules": [{"when": [{"key": "destination.port", "values": ["80"]}, {"key": "request.headers[a]", "values": ["b"]}]}]}),
        json!({"rules": [{"from": [{"source": {"notNamespaces": ["front"]}}]}, {}]}),
        json!({"action": "DENY", "rules": [{"from": [{"source": {"namespaces": ["front"], "remoteIpBlocks": ["1.2.3.4"]}}]}]}),
        json!({"action": "DENY", "rules": [{"from": [{"source": {"namespaces": ["back"]}}, {"source": {"requestPrincipals": ["x"]}}]}]}),
        json!({"action": "DENY", "rules": [{"to": [{"operation": {"notPaths": ["/p*"], "notPorts": ["9000"]}}]}]}),
        json!({"action": "DENY", "rules": [{"to": [{"operation": {"paths": ["/a"]}}]}, {"from": [{"source": {"namespaces": ["x"]}}]}]}),
        json!({"action": "DENY", "rules": [{"from": [{"source": {"ipBlocks": ["bad"], "namespaces": ["front"]}}], "to": [{"operation": {"ports": ["80"]}}]}]}),
        json!({"action": "BOGUS"}),
        json!({"action": "CUSTOM", "provider": {"name": "x"}, "rules": [{"to": [{"operation": {"hosts": ["a"]}}]}]}),
        json!({"rules": [{"from": [{"source": {"principals": ["cluster.local/ns/front/sa/*"]}}]}]}),
    ];
    let conns = [
        conn(Some(A), 80),
        conn(Some(A), 9000),
        conn(Some("spiffe://cluster.local/ns/back/sa/x"), 80),
        conn(None, 80),
    ];
    for spec in specs {
        let full = model(spec.clone());
        let Some((lowered, _)) = full.to_proto() else {
            continue;
        };
        let (back, problems) = Policy::from_proto(&lowered);
        assert!(problems.is_empty(), "{spec}: {problems:?}");
        for c in &conns {
            assert_eq!(
                evaluate([&full], c).is_allowed(),
                evaluate([&back], c).is_allowed(),
                "{spec} for {c:?}"
            );
        }
    }
}

/// The proxy hands the evaluator a normalised host (lower case, no port, no trailing
/// dot); however a policy writes its `hosts`, the same host meets the same decision.
#[test]
fn host_patterns_match_the_normalised_host_however_they_are_written() {
    let h = http::HeaderMap::new();
    let denied = |pattern: &str, port: u16| {
        let p = model(
            json!({"action": "DENY", "rules": [{"to": [{"operation": {"hosts": [pattern]}}]}]}),
        );
        !evaluate_request([&p], &conn(Some(A), port), Some(&http("GET", "/", &h))).is_allowed()
    };
    for pattern in [
        "api.shop.svc.cluster.local",
        "API.Shop.svc.cluster.local",
        "api.shop.svc.cluster.local.",
        "api.shop.svc.cluster.local:80",
        "api.shop.svc.cluster.local.:80",
        "*.cluster.local",
        "*.cluster.local:80",
        "api.shop.*",
    ] {
        assert!(denied(pattern, 80), "{pattern} must deny on port 80");
    }
    assert!(
        !denied("api.shop.svc.cluster.local:8080", 80),
        "another port"
    );
    assert!(!denied("web.shop.svc.cluster.local", 80), "another host");
}

/// A list with one item that cannot be read is unevaluable whole: the items that could be
/// read must not decide alone, or a DENY stops denying what the unreadable item names.
/// Checked on the model (waypoint, meshctl) and on what ztunnel receives.
#[test]
fn a_list_with_an_unreadable_item_never_narrows_a_deny() {
    let h = http::HeaderMap::new();
    let from = |ip: &str| ConnectionInfo {
        src_ip: ip.parse().unwrap(),
        ..conn(Some(A), 80)
    };
    let deny_ips = model(
        json!({"action": "DENY", "rules": [{"from": [{"source": {"ipBlocks": ["10.1.0.0/16", "10.2.0.0/33"]}}]}]}),
    );
    let lowered = Policy::from_proto(&deny_ips.to_proto().expect("sent to ztunnel").0).0;
    for p in [&deny_ips, &lowered] {
        for ip in ["10.1.0.5", "10.2.0.5"] {
            assert!(
                !evaluate([p], &from(ip)).is_allowed(),
                "{ip} must be denied"
            );
        }
    }
    // Paths: one item is no string at all.
    let deny_paths = model(
        json!({"action": "DENY", "rules": [{"to": [{"operation": {"paths": ["/admin*", 42]}}]}]}),
    );
    for path in ["/admin", "/api/v1/secret"] {
        let r = http("GET", path, &h);
        assert!(
            !evaluate_request([&deny_paths], &conn(Some(A), 80), Some(&r)).is_allowed(),
            "{path} must be denied"
        );
    }
    // In an ALLOW, the readable items allow nothing either.
    let allow =
        model(json!({"rules": [{"from": [{"source": {"ipBlocks": ["10.0.0.0/8", "bad"]}}]}]}));
    assert!(!evaluate([&allow], &from("10.0.0.1")).is_allowed());
}

/// A reference this mesh cannot follow (another namespace, a kind it does not serve) is
/// a problem of the whole policy: enforced fail closed, never ignored.
#[test]
fn a_target_that_cannot_be_followed_fails_the_policy_closed() {
    for target in [
        json!({"group": "networking.istio.io", "kind": "ServiceEntry", "name": "x"}),
        json!({"group": "gateway.networking.k8s.io", "kind": "GatewayClass", "name": "istio-waypoint"}),
        json!({"group": "", "kind": "Service", "name": "api", "namespace": "elsewhere"}),
        json!({"group": "", "kind": "Service"}),
    ] {
        let (p, findings) = read(
            json!({"action": "DENY", "targetRefs": [target], "rules": [{"from": [{"source": {"namespaces": ["attacker"]}}]}]}),
        );
        assert!(!p.problems.is_empty(), "{target}: a problem of the policy");
        assert!(!findings.is_empty(), "{target}: reported");
        let (m, _) = typed::policy(&p, PolicyScope::Namespace);
        assert!(
            !evaluate([&m], &conn(Some(A), 80)).is_allowed(),
            "{target}: the DENY denies in its scope"
        );
    }
}

/// A header value that is not text (obs-text bytes) is still matched on what it says:
/// `admin\xff` starts with `admin`, so a DENY on `admin*` applies.
#[test]
fn header_values_that_are_not_text_still_meet_their_policy() {
    let mut h = http::HeaderMap::new();
    h.insert(
        "x-role",
        http::HeaderValue::from_bytes(b"admin\xff").unwrap(),
    );
    let deny = model(
        json!({"action": "DENY", "rules": [{"when": [{"key": "request.headers[x-role]", "values": ["admin*"]}]}]}),
    );
    let r = http("GET", "/", &h);
    assert!(!evaluate_request([&deny], &conn(Some(A), 80), Some(&r)).is_allowed());
    let allow = model(
        json!({"rules": [{"when": [{"key": "request.headers[x-role]", "notValues": ["admin*"]}]}]}),
    );
    assert!(!evaluate_request([&allow], &conn(Some(A), 80), Some(&r)).is_allowed());
}

#[test]
fn addresses_go_to_their_wire_form_and_back() {
    for ip in ["10.0.0.1", "::1", "fd00::7", "0.0.0.0"] {
        let ip: std::net::IpAddr = ip.parse().unwrap();
        let b = crate::ip_bytes(ip);
        assert_eq!(b.len(), if ip.is_ipv4() { 4 } else { 16 });
        assert_eq!(crate::ip_from_bytes(&b), Ok(ip));
    }
    for len in [0, 3, 5, 15, 17] {
        let e = crate::ip_from_bytes(&vec![1; len]).unwrap_err();
        assert_eq!(e, crate::IpLengthError(len));
        assert_eq!(
            String::from(e),
            format!("address of {len} bytes is neither IPv4 (4) nor IPv6 (16)")
        );
    }
}
