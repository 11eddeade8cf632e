//! Which answer a pod gets for a name: the decision alone, on plain names and the
//! service index, with no sockets and no wire format.
//!
//! Istio's behaviour: a name is matched against the Services known from xDS (Kubernetes
//! Services and ServiceEntry hosts, wildcards included) in every form a pod may send it:
//! `svc` (the asking pod's namespace), `svc.ns`, `svc.ns.svc`, `svc.ns.svc.<domain>`, and
//! any of these with one of the pod's search domains appended (what a resolver sends
//! while walking its search list: answered with a CNAME to the shorter name). A known
//! name is answered with the VIPs of the requested family reachable from the pod's
//! network, or with no records at all (NODATA) when there are none. Unknown names and
//! other record types go to the upstream resolvers, so NXDOMAIN only ever comes from
//! there.

use crate::state::{Service, State};
use std::net::IpAddr;

/// TTL of the records we answer (Istio's).
pub const TTL_SECONDS: u32 = 30;

/// Record types we answer ourselves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// `A`
    V4,
    /// `AAAA`
    V6,
}

/// Who asks: the pod's namespace and network.
#[derive(Clone, Copy, Debug)]
pub struct Client<'a> {
    pub namespace: &'a str,
    pub network: &'a str,
}

/// The answer to one question.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Not ours: ask the upstream resolvers.
    Forward,
    /// Ours (authoritative). `addrs` empty means NODATA: the name exists, without records
    /// of this type. With `cname`, the answer starts with `requested CNAME cname` and the
    /// addresses are records of `cname`.
    Answer {
        cname: Option<String>,
        addrs: Vec<IpAddr>,
    },
}

/// One name to look up, and the shorter name it came from when a search domain was
/// stripped off the question.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Candidate {
    host: String,
    stripped: Option<String>,
}

/// The decision for `qname` (any case, with or without the trailing dot), asked for
/// `family` (`None`: another record type) by `client`.
pub fn decide(
    state: &State,
    cluster_domain: &str,
    client: Client<'_>,
    qname: &str,
    family: Option<Family>,
) -> Decision {
    let Some(family) = family else {
        return Decision::Forward;
    };
    let name = normalize(qname);
    if name.is_empty() {
        return Decision::Forward;
    }
    let domain = normalize(cluster_domain);
    for c in candidates(&name, &domain, client.namespace) {
        let Some((svc, wildcard)) = find_service(state, &c.host, client.namespace) else {
            continue;
        };
        let addrs = svc
            .vips
            .iter()
            .filter(|(net, ip)| net == client.network && matches_family(ip, family))
            .map(|(_, ip)| *ip)
            .collect();
        // A wildcard host has no single canonical name to point a CNAME at.
        let cname = c.stripped.filter(|_| !wildcard);
        return Decision::Answer { cname, addrs };
    }
    Decision::Forward
}

/// Lower case, without the trailing dot.
fn normalize(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

fn matches_family(ip: &IpAddr, family: Family) -> bool {
    match family {
        Family::V4 => ip.is_ipv4(),
        Family::V6 => ip.is_ipv6(),
    }
}

/// The search list Kubernetes gives a pod of `namespace`, as `ndots`-resolvers append it.
fn search_domains(domain: &str, namespace: &str) -> [String; 3] {
    [
        format!("{namespace}.svc.{domain}"),
        format!("svc.{domain}"),
        domain.to_string(),
    ]
}

/// The Kubernetes FQDN a short service name stands for, if it has that shape:
/// `svc` → `svc.<ns>.svc.<domain>`, `svc.ns` → `svc.ns.svc.<domain>`,
/// `svc.ns.svc` → `svc.ns.svc.<domain>`.
fn kube_fqdn(name: &str, domain: &str, namespace: &str) -> Option<String> {
    let labels: Vec<&str> = name.split('.').collect();
    match labels.as_slice() {
        [_] => Some(format!("{name}.{namespace}.svc.{domain}")),
        [_, _] => Some(format!("{name}.svc.{domain}")),
        [_, _, "svc"] => Some(format!("{name}.{domain}")),
        _ => None,
    }
}

/// Every name to try for `name`, most specific first, without repeats.
fn candidates(name: &str, domain: &str, namespace: &str) -> Vec<Candidate> {
    let mut out: Vec<Candidate> = Vec::new();
    let mut push = |host: String, stripped: Option<String>| {
        if !out.iter().any(|c| c.host == host) {
            out.push(Candidate { host, stripped });
        }
    };
    push(name.to_string(), None);
    if let Some(f) = kube_fqdn(name, domain, namespace) {
        push(f, None);
    }
    for sd in search_domains(domain, namespace) {
        let Some(short) = name.strip_suffix(&sd).and_then(|s| s.strip_suffix('.')) else {
            continue;
        };
        if short.is_empty() {
            continue;
        }
        push(short.to_string(), Some(short.to_string()));
        if let Some(f) = kube_fqdn(short, domain, namespace) {
            push(f, Some(short.to_string()));
        }
    }
    out
}

/// The service for `host` or, failing that, for the closest wildcard above it
/// (`*.example.com`, then `*.com`); `true` when found through a wildcard. Services without
/// a VIP are left to the upstream resolvers (headless).
fn find_service<'s>(state: &'s State, host: &str, namespace: &str) -> Option<(&'s Service, bool)> {
    if let Some(s) = service_with_vip(state, host, namespace) {
        return Some((s, false));
    }
    let mut rest = host;
    while let Some((_, parent)) = rest.split_once('.') {
        if let Some(s) = service_with_vip(state, &format!("*.{parent}"), namespace) {
            return Some((s, true));
        }
        rest = parent;
    }
    None
}

/// The asking pod's own namespace wins when several namespaces declare the host.
fn service_with_vip<'s>(state: &'s State, host: &str, namespace: &str) -> Option<&'s Service> {
    state
        .service(namespace, host)
        .or_else(|| state.service_by_hostname(host))
        .map(|s| s.as_ref())
        .filter(|s| !s.vips.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{LoadBalancing, Service};

    fn svc(ns: &str, host: &str, vips: &[(&str, &str)]) -> Service {
        Service {
            name: host.split('.').next().unwrap().to_string(),
            namespace: ns.to_string(),
            hostname: host.to_string(),
            vips: vips
                .iter()
                .map(|(n, ip)| (n.to_string(), ip.parse().unwrap()))
                .collect(),
            ports: vec![],
            subject_alt_names: vec![],
            waypoint: None,
            load_balancing: LoadBalancing::default(),
        }
    }

    fn state() -> State {
        let mut st = State::default();
        st.insert_service(svc(
            "ns1",
            "echo.ns1.svc.cluster.local",
            &[
                ("", "10.96.0.10"),
                ("", "fd00::10"),
                ("other", "10.200.0.1"),
            ],
        ));
        st.insert_service(svc(
            "ns2",
            "db.ns2.svc.cluster.local",
            &[("", "10.96.0.20")],
        ));
        st.insert_service(svc(
            "ns1",
            "v4only.ns1.svc.cluster.local",
            &[("", "10.96.0.30")],
        ));
        st.insert_service(svc("ns1", "headless.ns1.svc.cluster.local", &[]));
        st.insert_service(svc("ext", "api.example.com", &[("", "240.240.0.1")]));
        st.insert_service(svc("ext", "*.wild.example.org", &[("", "240.240.0.2")]));
        st
    }

    const NS1: Client<'static> = Client {
        namespace: "ns1",
        network: "",
    };

    fn a(name: &str) -> Decision {
        decide(&state(), "cluster.local", NS1, name, Some(Family::V4))
    }

    fn answer(cname: Option<&str>, addrs: &[&str]) -> Decision {
        Decision::Answer {
            cname: cname.map(str::to_string),
            addrs: addrs.iter().map(|a| a.parse().unwrap()).collect(),
        }
    }

    #[test]
    fn every_form_a_pod_uses_finds_the_service() {
        for name in [
            "echo",
            "echo.",
            "echo.ns1",
            "echo.ns1.svc",
            "echo.ns1.svc.cluster.local",
            "echo.ns1.svc.cluster.local.",
            "ECHO.Ns1.SVC.cluster.local.",
        ] {
            assert_eq!(a(name), answer(None, &["10.96.0.10"]), "{name}");
        }
    }

    #[test]
    fn short_names_are_the_asking_pods_namespace() {
        // `db` lives in ns2: a pod of ns1 asking for `db` is not answered from ns2.
        assert_eq!(a("db"), Decision::Forward);
        assert_eq!(a("db.ns2"), answer(None, &["10.96.0.20"]));
        let ns2 = Client {
            namespace: "ns2",
            network: "",
        };
        assert_eq!(
            decide(&state(), "cluster.local", ns2, "db", Some(Family::V4)),
            answer(None, &["10.96.0.20"])
        );
    }

    #[test]
    fn search_list_expansions_answer_with_a_cname_to_the_short_name() {
        // A resolver walking its search list with `echo.ns1` (ndots:5) asks these.
        assert_eq!(
            a("echo.ns1.ns1.svc.cluster.local"),
            answer(Some("echo.ns1"), &["10.96.0.10"])
        );
        assert_eq!(
            a("echo.ns1.svc.cluster.local"),
            answer(None, &["10.96.0.10"]),
            "already the FQDN: no CNAME"
        );
        assert_eq!(
            a("api.example.com.ns1.svc.cluster.local"),
            answer(Some("api.example.com"), &["240.240.0.1"])
        );
        // `svc.cluster.local` stripped leaves `echo`, the pod's own namespace (as Istio).
        assert_eq!(
            a("echo.svc.cluster.local"),
            answer(Some("echo"), &["10.96.0.10"])
        );
    }

    #[test]
    fn service_entry_hosts_and_wildcards() {
        assert_eq!(a("api.example.com"), answer(None, &["240.240.0.1"]));
        assert_eq!(a("x.wild.example.org"), answer(None, &["240.240.0.2"]));
        assert_eq!(a("a.b.wild.example.org"), answer(None, &["240.240.0.2"]));
        // Through a search domain and a wildcard: no CNAME (no single canonical name).
        assert_eq!(
            a("x.wild.example.org.svc.cluster.local"),
            answer(None, &["240.240.0.2"])
        );
        assert_eq!(a("wild.example.org"), Decision::Forward);
    }

    #[test]
    fn families_and_networks() {
        let aaaa = |n: &str| decide(&state(), "cluster.local", NS1, n, Some(Family::V6));
        assert_eq!(aaaa("echo"), answer(None, &["fd00::10"]));
        // Known name, no IPv6 VIP: NODATA (not NXDOMAIN, not forwarded).
        assert_eq!(aaaa("v4only"), answer(None, &[]));
        let other = Client {
            namespace: "ns1",
            network: "other",
        };
        assert_eq!(
            decide(&state(), "cluster.local", other, "echo", Some(Family::V4)),
            answer(None, &["10.200.0.1"])
        );
    }

    #[test]
    fn everything_else_is_forwarded() {
        assert_eq!(a("www.example.net"), Decision::Forward);
        assert_eq!(a("unknown.ns1.svc.cluster.local"), Decision::Forward);
        assert_eq!(a("headless"), Decision::Forward, "no VIP: upstream answers");
        assert_eq!(a(""), Decision::Forward);
        assert_eq!(a("."), Decision::Forward);
        assert_eq!(
            decide(&state(), "cluster.local", NS1, "echo", None),
            Decision::Forward,
            "other record types (MX, TXT, SRV...) are the upstream's"
        );
    }

    #[test]
    fn another_cluster_domain() {
        assert_eq!(
            decide(&state(), "cluster.local.", NS1, "echo", Some(Family::V4)),
            answer(None, &["10.96.0.10"])
        );
        assert_eq!(
            decide(&state(), "corp.internal", NS1, "echo", Some(Family::V4)),
            Decision::Forward,
            "echo.ns1.svc.corp.internal is no service"
        );
    }

    #[test]
    fn candidates_are_most_specific_first_without_repeats() {
        let c: Vec<String> = candidates("echo.ns1", "cluster.local", "ns1")
            .into_iter()
            .map(|c| c.host)
            .collect();
        assert_eq!(c, ["echo.ns1", "echo.ns1.svc.cluster.local"]);
        let c = candidates("echo.ns1.svc.cluster.local", "cluster.local", "ns1");
        assert_eq!(c[0].host, "echo.ns1.svc.cluster.local");
        assert_eq!(c[0].stripped, None);
        assert!(c.iter().any(|c| c.host == "echo" && c.stripped.is_some()));
    }
}
