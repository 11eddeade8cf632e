//! Which answer a pod gets for a name: the decision alone, on plain names and the
//! service index, with no sockets and no wire format.
//!
//! Istio's behaviour: a name is matched against the Services known from xDS (Kubernetes
//! Services and ServiceEntry hosts, wildcards included) in every form a pod may send it:
//! `svc` (the asking pod's namespace), `svc.ns`, `svc.ns.svc`, `svc.ns.svc.<domain>`, and
//! any of these with one of the pod's search domains appended (what a resolver sends
//! while walking its search list: answered with a CNAME to the shorter name). A known
//! name is answered with the VIPs of the requested family reachable from the pod's
//! network, or with no records at all (NODATA) when there are none.
//!
//! A Kubernetes headless Service (no VIP, a `.svc.<domain>` hostname) with endpoints is
//! answered with the addresses of its ready endpoints, and `<pod>.<svc>.<ns>.svc.<domain>`
//! (the name a StatefulSet pod gets through its headless Service; only this full form,
//! as asked or with a search domain appended, as kube-dns) with that Pod's address while
//! it is ready. Endpoint and pod-host records have CoreDNS's 5 s TTL, VIPs Istio's 30 s.
//! A Service without a VIP and without any endpoint known (ExternalName, selector-less),
//! or that is not a Kubernetes Service (a ServiceEntry resolved by DNS), is the
//! upstream's, as are unknown names and other record types, so NXDOMAIN only ever comes
//! from there.

use crate::state::{Service, State, Workload};
use std::net::IpAddr;

/// TTL of a Service's VIP records (Istio's): VIPs rarely change.
pub const TTL_SECONDS: u32 = 30;
/// TTL of endpoint and pod-host records (CoreDNS's for headless Services): endpoints
/// come and go, a client must not keep one long after it left.
pub const ENDPOINT_TTL_SECONDS: u32 = 5;

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
        ttl: u32,
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
        if let Some((svc, wildcard)) = find_service(state, &c.host, client.namespace, &domain) {
            let (addrs, ttl) = if svc.vips.is_empty() {
                (
                    endpoint_addrs(state, svc, client.network, family),
                    ENDPOINT_TTL_SECONDS,
                )
            } else {
                let vips = svc
                    .vips
                    .iter()
                    .filter(|(net, ip)| net == client.network && matches_family(ip, family))
                    .map(|(_, ip)| *ip)
                    .collect();
                (vips, TTL_SECONDS)
            };
            // A wildcard host has no single canonical name to point a CNAME at.
            let cname = c.stripped.filter(|_| !wildcard);
            return Decision::Answer { cname, addrs, ttl };
        }
        // A pod host only in its full form, as asked or as a search-list expansion of
        // it: kube-dns knows no short form, and `github.com` must never be read as pod
        // `github` of a headless Service `com` in the asking pod's namespace.
        let as_asked = c.host == name || c.stripped.as_deref() == Some(c.host.as_str());
        if let Some(pod) = as_asked
            .then(|| find_pod_host(state, &c.host, client, &domain))
            .flatten()
        {
            return Decision::Answer {
                cname: c.stripped,
                addrs: address_of(pod, family).into_iter().collect(),
                ttl: ENDPOINT_TTL_SECONDS,
            };
        }
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

/// The Kubernetes FQDNs a short name may stand for, service form first:
/// `svc` → `svc.<ns>.svc.<domain>`; `svc.ns` → `svc.ns.svc.<domain>`, or the pod host
/// `pod.sub` → `pod.sub.<ns>.svc.<domain>`; `svc.ns.svc` → `svc.ns.svc.<domain>`; the pod
/// host `pod.sub.ns` → `pod.sub.ns.svc.<domain>`, `pod.sub.ns.svc` → `…<domain>`.
fn kube_fqdns(name: &str, domain: &str, namespace: &str) -> Vec<String> {
    let labels: Vec<&str> = name.split('.').collect();
    match labels.as_slice() {
        [_] => vec![format!("{name}.{namespace}.svc.{domain}")],
        [_, _] => vec![
            format!("{name}.svc.{domain}"),
            format!("{name}.{namespace}.svc.{domain}"),
        ],
        [_, _, "svc"] => vec![format!("{name}.{domain}"), format!("{name}.svc.{domain}")],
        [_, _, _] => vec![format!("{name}.svc.{domain}")],
        [_, _, _, "svc"] => vec![format!("{name}.{domain}")],
        _ => vec![],
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
    for f in kube_fqdns(name, domain, namespace) {
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
        for f in kube_fqdns(short, domain, namespace) {
            push(f, Some(short.to_string()));
        }
    }
    out
}

/// The service for `host` or, failing that, for the closest wildcard above it
/// (`*.example.com`, then `*.com`); `true` when found through a wildcard. Only services
/// with a VIP, or Kubernetes headless ones, are ours.
fn find_service<'s>(
    state: &'s State,
    host: &str,
    namespace: &str,
    domain: &str,
) -> Option<(&'s Service, bool)> {
    if let Some(s) = answerable_service(state, host, namespace, domain) {
        return Some((s, false));
    }
    let mut rest = host;
    while let Some((_, parent)) = rest.split_once('.') {
        if let Some(s) = answerable_service(state, &format!("*.{parent}"), namespace, domain) {
            return Some((s, true));
        }
        rest = parent;
    }
    None
}

/// The asking pod's own namespace wins when several namespaces declare the host.
fn answerable_service<'s>(
    state: &'s State,
    host: &str,
    namespace: &str,
    domain: &str,
) -> Option<&'s Service> {
    service_named(state, host, namespace).filter(|s| {
        !s.vips.is_empty() || is_kubernetes_headless(s, domain) && has_endpoints(state, s)
    })
}

/// Whether any endpoint of `svc` is known, ready or not. A VIP-less Service without one
/// (an ExternalName Service, a selector-less one with hand-written endpoints ztunnel is
/// not told about) is the upstream's: kube-dns knows what it names.
fn has_endpoints(state: &State, svc: &Service) -> bool {
    state.endpoints_of(svc).next().is_some()
}

fn service_named<'s>(state: &'s State, host: &str, namespace: &str) -> Option<&'s Service> {
    state
        .service(namespace, host)
        .or_else(|| state.service_by_hostname(host))
        .map(|s| s.as_ref())
}

/// A Service without a VIP whose hostname is a Kubernetes Service's. xDS says no more
/// (Istio's ztunnel tells them apart the same way): a ServiceEntry without addresses has
/// another hostname and stays the upstream's.
fn is_kubernetes_headless(svc: &Service, domain: &str) -> bool {
    svc.vips.is_empty()
        && svc
            .hostname
            .strip_suffix(domain)
            .is_some_and(|h| h.ends_with(".svc."))
}

/// Whether `w` is an endpoint DNS may name: ready (unless the Service publishes
/// not-ready addresses) and addressed.
fn in_dns(svc: &Service, w: &Workload) -> bool {
    (w.healthy || svc.load_balancing.allow_unhealthy) && !w.addresses.is_empty()
}

/// A workload's address of `family` (its first: a pod has one per family).
fn address_of(w: &Workload, family: Family) -> Option<IpAddr> {
    w.addresses
        .iter()
        .copied()
        .find(|ip| matches_family(ip, family))
}

/// The addresses of `family` of a headless Service's endpoints in the asking pod's
/// network, sorted.
fn endpoint_addrs(state: &State, svc: &Service, network: &str, family: Family) -> Vec<IpAddr> {
    let mut addrs: Vec<IpAddr> = state
        .endpoints_of(svc)
        .filter(|w| w.network == network && in_dns(svc, w))
        .filter_map(|w| address_of(w, family))
        .collect();
    addrs.sort();
    addrs.dedup();
    addrs
}

/// `host` as `<pod>.<headless service hostname>` (the full `.svc.<domain>` form): the
/// Pod endpoint of that Service named `<pod>` (a StatefulSet pod's name is its
/// hostname), if it is in DNS. Endpoints read from EndpointSlices are no pods and have
/// no pod host.
fn find_pod_host<'s>(
    state: &'s State,
    host: &str,
    client: Client<'_>,
    domain: &str,
) -> Option<&'s Workload> {
    let (pod, svc_host) = host.split_once('.')?;
    let svc = service_named(state, svc_host, client.namespace)
        .filter(|s| s.hostname == svc_host && is_kubernetes_headless(s, domain))?;
    state
        .endpoints_of(svc)
        .map(|w| w.as_ref())
        .find(|w| w.name == pod && is_pod(w) && w.network == client.network && in_dns(svc, w))
}

/// Whether `w` is a Kubernetes Pod (its UID `<cluster>//Pod/<ns>/<name>`).
fn is_pod(w: &Workload) -> bool {
    w.uid.contains("//Pod/")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{LoadBalancing, Service};
    use mesh_identity::SpiffeId;
    use std::collections::HashMap;

    /// Pod `ns1/name`, an endpoint of `headless` (and of nothing else).
    fn pod(name: &str, ips: &[&str], ready: bool, network: &str) -> Workload {
        Workload {
            uid: format!("Kubernetes//Pod/ns1/{name}"),
            name: name.into(),
            namespace: "ns1".into(),
            addresses: ips.iter().map(|ip| ip.parse().unwrap()).collect(),
            network: network.into(),
            hbone: true,
            identity: SpiffeId::new("cluster.local", "ns1", "default").unwrap(),
            waypoint: None,
            node: "node-1".into(),
            canonical_name: "web".into(),
            canonical_revision: "v1".into(),
            workload_name: "web".into(),
            services: HashMap::from([("ns1/headless.ns1.svc.cluster.local".into(), vec![])]),
            authorization_policies: vec![],
            healthy: ready,
            cluster_id: String::new(),
            locality: Default::default(),
            host_network: false,
            capacity: 1,
        }
    }

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
        // Its endpoints: two ready (one dual-stack), one not ready, one in another network.
        st.insert_workload(pod("web-0", &["10.244.1.10", "fd00:244::10"], true, ""));
        st.insert_workload(pod("web-1", &["10.244.1.11"], true, ""));
        st.insert_workload(pod("web-2", &["10.244.1.12"], false, ""));
        st.insert_workload(pod("web-3", &["10.244.9.13"], true, "other"));
        // A ServiceEntry resolved by DNS: no VIP, not a Kubernetes Service.
        st.insert_service(svc("ext", "dns.example.com", &[]));
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

    /// An answer with VIPs.
    fn answer(cname: Option<&str>, addrs: &[&str]) -> Decision {
        Decision::Answer {
            cname: cname.map(str::to_string),
            addrs: addrs.iter().map(|a| a.parse().unwrap()).collect(),
            ttl: 30,
        }
    }

    /// An answer with endpoint or pod-host addresses: CoreDNS's short TTL.
    fn endpoints(cname: Option<&str>, addrs: &[&str]) -> Decision {
        Decision::Answer {
            cname: cname.map(str::to_string),
            addrs: addrs.iter().map(|a| a.parse().unwrap()).collect(),
            ttl: 5,
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
        assert_eq!(
            a("dns.example.com"),
            Decision::Forward,
            "a ServiceEntry without VIP: the upstream resolves it"
        );
        assert_eq!(
            a("web-0.headless.ns2"),
            Decision::Forward,
            "no such Service"
        );
        let mut st = state();
        st.insert_service(svc("ns1", "extname.ns1.svc.cluster.local", &[]));
        for name in ["extname", "extname.ns1", "extname.ns1.svc.cluster.local"] {
            assert_eq!(
                decide(&st, "cluster.local", NS1, name, Some(Family::V4)),
                Decision::Forward,
                "{name}: a Service without VIP nor any endpoint known (ExternalName, \
                 selector-less): kube-dns answers it"
            );
        }
        assert_eq!(a(""), Decision::Forward);
        assert_eq!(a("."), Decision::Forward);
        assert_eq!(
            decide(&state(), "cluster.local", NS1, "echo", None),
            Decision::Forward,
            "other record types (MX, TXT, SRV...) are the upstream's"
        );
    }

    #[test]
    fn headless_services_answer_their_ready_endpoints_in_every_form() {
        for name in [
            "headless",
            "headless.ns1",
            "headless.ns1.svc",
            "headless.ns1.svc.cluster.local.",
        ] {
            assert_eq!(
                a(name),
                endpoints(None, &["10.244.1.10", "10.244.1.11"]),
                "{name}: ready endpoints of this network only"
            );
        }
        assert_eq!(
            a("headless.ns1.ns1.svc.cluster.local"),
            endpoints(Some("headless.ns1"), &["10.244.1.10", "10.244.1.11"])
        );
        let aaaa = decide(&state(), "cluster.local", NS1, "headless", Some(Family::V6));
        assert_eq!(aaaa, endpoints(None, &["fd00:244::10"]));
        let other = Client {
            namespace: "ns1",
            network: "other",
        };
        assert_eq!(
            decide(
                &state(),
                "cluster.local",
                other,
                "headless",
                Some(Family::V4)
            ),
            endpoints(None, &["10.244.9.13"])
        );
    }

    #[test]
    fn a_headless_service_publishing_not_ready_addresses_answers_them_too() {
        let mut st = state();
        let mut s = svc("ns1", "headless.ns1.svc.cluster.local", &[]);
        s.load_balancing.allow_unhealthy = true;
        st.insert_service(s);
        assert_eq!(
            decide(&st, "cluster.local", NS1, "headless", Some(Family::V4)),
            endpoints(None, &["10.244.1.10", "10.244.1.11", "10.244.1.12"])
        );
    }

    #[test]
    fn a_headless_service_without_ready_endpoints_is_nodata() {
        let mut st = state();
        st.insert_workload(pod("web-0", &["10.244.1.10"], false, ""));
        st.insert_workload(pod("web-1", &["10.244.1.11"], false, ""));
        assert_eq!(
            decide(&st, "cluster.local", NS1, "headless", Some(Family::V4)),
            endpoints(None, &[])
        );
    }

    #[test]
    fn pod_hosts_of_a_headless_service() {
        assert_eq!(
            a("web-1.headless.ns1.svc.cluster.local"),
            endpoints(None, &["10.244.1.11"])
        );
        for expansion in [
            "web-1.headless.ns1.svc.cluster.local.ns1.svc.cluster.local",
            "web-1.headless.ns1.svc.cluster.local.cluster.local",
        ] {
            assert_eq!(
                a(expansion),
                endpoints(
                    Some("web-1.headless.ns1.svc.cluster.local"),
                    &["10.244.1.11"]
                ),
                "a search-list expansion of the full form: {expansion}"
            );
        }
        let aaaa = |n: &str| decide(&state(), "cluster.local", NS1, n, Some(Family::V6));
        assert_eq!(
            aaaa("web-0.headless.ns1.svc.cluster.local"),
            endpoints(None, &["fd00:244::10"])
        );
        assert_eq!(
            aaaa("web-1.headless.ns1.svc.cluster.local"),
            endpoints(None, &[]),
            "NODATA"
        );
        // Short forms (kube-dns has none), not ready, another network, no such pod, not a
        // headless Service: the upstream's.
        for name in [
            "web-1.headless",
            "web-1.headless.ns1",
            "web-1.headless.ns1.svc",
            "web-1.headless.svc.cluster.local",
            "web-2.headless.ns1.svc.cluster.local",
            "web-3.headless.ns1.svc.cluster.local",
            "web-9.headless.ns1.svc.cluster.local",
            "web-1.echo.ns1.svc.cluster.local",
        ] {
            assert_eq!(a(name), Decision::Forward, "{name}");
        }
    }

    #[test]
    fn a_bare_name_is_never_read_as_a_pod_host() {
        // Headless Services `com` and `dev` in ns1, with pods `github` and `api`.
        let mut st = state();
        for (svc_name, pod_name) in [("com", "github"), ("dev", "api")] {
            let host = format!("{svc_name}.ns1.svc.cluster.local");
            st.insert_service(svc("ns1", &host, &[]));
            let mut p = pod(pod_name, &["10.244.1.50"], true, "");
            p.services = HashMap::from([(format!("ns1/{host}"), vec![])]);
            st.insert_workload(p);
        }
        for name in [
            "github.com",
            "api.myco.dev",
            "github.com.ns1",
            "api.dev.ns1",
        ] {
            assert_eq!(
                decide(&st, "cluster.local", NS1, name, Some(Family::V4)),
                Decision::Forward,
                "{name}"
            );
        }
        assert_eq!(
            decide(
                &st,
                "cluster.local",
                NS1,
                "github.com.ns1.svc.cluster.local",
                Some(Family::V4)
            ),
            endpoints(None, &["10.244.1.50"]),
            "the full form is the pod host, as kube-dns answers it"
        );
    }

    #[test]
    fn endpoint_slice_endpoints_have_no_pod_host() {
        let mut st = state();
        let mut w = pod("web-1", &["10.244.1.11"], true, "");
        w.uid = "cluster1/discovery.k8s.io/EndpointSlice/ns1/headless-abc/web-1".into();
        st.insert_workload(w);
        // Remove the Pod itself so only the EndpointSlice-derived one is named web-1.
        assert!(st.remove_address("Kubernetes//Pod/ns1/web-1"));
        assert_eq!(
            decide(
                &st,
                "cluster.local",
                NS1,
                "web-1.headless.ns1.svc.cluster.local",
                Some(Family::V4)
            ),
            Decision::Forward
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
        assert_eq!(
            c,
            [
                "echo.ns1",
                "echo.ns1.svc.cluster.local",
                "echo.ns1.ns1.svc.cluster.local"
            ]
        );
        let c = candidates("echo.ns1.svc.cluster.local", "cluster.local", "ns1");
        assert_eq!(c[0].host, "echo.ns1.svc.cluster.local");
        assert_eq!(c[0].stripped, None);
        assert!(c.iter().any(|c| c.host == "echo" && c.stripped.is_some()));
    }
}
