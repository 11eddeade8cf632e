//! What a data-plane proxy knows about the mesh: workloads, services and policies,
//! indexed for the data path (by IP, by VIP, by service) and updated from xDS or a file.
#![forbid(unsafe_code)]

pub mod telemetry;
pub mod types;

pub use mesh_authz::{Action, IpNet, Match, Policy, PolicyScope, StringMatch};
use mesh_authz::{ConnectionInfo, Decision};
use mesh_proto::{security as pb_sec, workload as pb};
use rand::Rng;
use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;
pub use types::*;

/// What an address refers to.
#[derive(Clone, Debug)]
pub enum Destination {
    Workload(Arc<Workload>),
    Service(Arc<Service>),
}

#[derive(Debug, Default, Clone)]
pub struct State {
    workloads: HashMap<String, Arc<Workload>>,
    workload_by_ip: HashMap<(String, IpAddr), String>,
    /// (namespace, name) → uids (several only across clusters).
    workloads_by_pod: HashMap<(String, String), BTreeSet<String>>,
    services: HashMap<String, Arc<Service>>,
    service_by_vip: HashMap<(String, IpAddr), String>,
    /// hostname → service keys (several only when namespaces share a hostname).
    services_by_hostname: HashMap<String, BTreeSet<String>>,
    /// service key → uids of workloads that back it.
    endpoints: HashMap<String, BTreeSet<String>>,
    policies: HashMap<String, Arc<Policy>>,
    /// namespace ("" for global) → keys of namespace- and global-scoped policies.
    policies_by_ns: HashMap<String, BTreeSet<String>>,
}

impl State {
    // ---- updates ----

    /// Applies one Address resource named `name` (a workload uid or `ns/hostname`).
    pub fn apply_address(&mut self, address: &pb::Address) -> Result<(), ResourceError> {
        match &address.r#type {
            Some(pb::address::Type::Workload(w)) => {
                let w = Workload::from_proto(w)?;
                self.insert_workload(w);
                Ok(())
            }
            Some(pb::address::Type::Service(s)) => {
                let s = Service::from_proto(s)?;
                self.insert_service(s);
                Ok(())
            }
            None => Err(ResourceError::Invalid {
                what: "address".into(),
                reason: "neither workload nor service".into(),
            }),
        }
    }

    pub fn insert_workload(&mut self, w: Workload) {
        self.remove_workload(&w.uid);
        if !w.host_network {
            for ip in &w.addresses {
                self.workload_by_ip
                    .insert((w.network.clone(), *ip), w.uid.clone());
            }
        }
        for svc in w.services.keys() {
            self.endpoints
                .entry(svc.clone())
                .or_default()
                .insert(w.uid.clone());
        }
        if is_pod_uid(&w.uid, &w.namespace, &w.name) {
            self.workloads_by_pod
                .entry((w.namespace.clone(), w.name.clone()))
                .or_default()
                .insert(w.uid.clone());
        }
        self.workloads.insert(w.uid.clone(), Arc::new(w));
    }

    pub fn insert_service(&mut self, s: Service) {
        let key = s.key();
        self.remove_service(&key);
        for (net, ip) in &s.vips {
            self.service_by_vip.insert((net.clone(), *ip), key.clone());
        }
        self.services_by_hostname
            .entry(s.hostname.clone())
            .or_default()
            .insert(key.clone());
        self.services.insert(key, Arc::new(s));
    }

    /// Removes the Address resource `name`, whichever kind it is.
    pub fn remove_address(&mut self, name: &str) -> bool {
        self.remove_workload(name) | self.remove_service(name)
    }

    fn remove_workload(&mut self, uid: &str) -> bool {
        let Some(old) = self.workloads.remove(uid) else {
            return false;
        };
        for ip in &old.addresses {
            let k = (old.network.clone(), *ip);
            if self.workload_by_ip.get(&k).map(String::as_str) == Some(uid) {
                self.workload_by_ip.remove(&k);
            }
        }
        for svc in old.services.keys() {
            if let Some(set) = self.endpoints.get_mut(svc) {
                set.remove(uid);
                if set.is_empty() {
                    self.endpoints.remove(svc);
                }
            }
        }
        let pod = (old.namespace.clone(), old.name.clone());
        if let Some(set) = self.workloads_by_pod.get_mut(&pod) {
            set.remove(uid);
            if set.is_empty() {
                self.workloads_by_pod.remove(&pod);
            }
        }
        true
    }

    fn remove_service(&mut self, key: &str) -> bool {
        let Some(old) = self.services.remove(key) else {
            return false;
        };
        for (net, ip) in &old.vips {
            let k = (net.clone(), *ip);
            if self.service_by_vip.get(&k).map(String::as_str) == Some(key) {
                self.service_by_vip.remove(&k);
            }
        }
        if let Some(set) = self.services_by_hostname.get_mut(&old.hostname) {
            set.remove(key);
            if set.is_empty() {
                self.services_by_hostname.remove(&old.hostname);
            }
        }
        true
    }

    /// Applies one Authorization. One that cannot be read in full is still applied, fail
    /// closed (its unreadable parts allow nothing in an ALLOW and match in a DENY; an
    /// unknown action denies everything in its scope), and the error is returned so the
    /// caller NACKs it: refusing a policy never widens access.
    pub fn apply_authorization(&mut self, a: &pb_sec::Authorization) -> Result<(), ResourceError> {
        let (p, problems) = Policy::from_proto(a);
        self.insert_policy(p);
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ResourceError::Invalid {
                what: format!("authorization {}/{}", a.namespace, a.name),
                reason: format!("{} (enforced fail closed)", problems.join("; ")),
            })
        }
    }

    pub fn insert_policy(&mut self, p: Policy) {
        let key = p.key();
        self.remove_policy(&key);
        let index_ns = match p.scope {
            PolicyScope::Global => Some(String::new()),
            PolicyScope::Namespace => Some(p.namespace.clone()),
            PolicyScope::WorkloadSelector => None,
        };
        if let Some(ns) = index_ns {
            self.policies_by_ns
                .entry(ns)
                .or_default()
                .insert(key.clone());
        }
        self.policies.insert(key, Arc::new(p));
    }

    pub fn remove_policy(&mut self, key: &str) -> bool {
        if self.policies.remove(key).is_none() {
            return false;
        }
        for set in self.policies_by_ns.values_mut() {
            set.remove(key);
        }
        self.policies_by_ns.retain(|_, s| !s.is_empty());
        true
    }

    /// Replaces everything with a full set of resources (a local file). A resource that
    /// fails validation keeps its previous version, if any; the errors are returned.
    pub fn apply_snapshot(
        &mut self,
        addresses: &[(String, pb::Address)],
        policies: &[(String, pb_sec::Authorization)],
    ) -> Vec<String> {
        let mut next = State::default();
        let mut errors = Vec::new();
        for (name, a) in addresses {
            if let Err(e) = next.apply_address(a) {
                errors.push(format!("{name}: {e}"));
                if let Some(w) = self.workloads.get(name) {
                    next.insert_workload((**w).clone());
                }
                if let Some(s) = self.services.get(name) {
                    next.insert_service((**s).clone());
                }
            }
        }
        for (name, p) in policies {
            // Applied fail closed even when invalid: the previous version could allow more.
            if let Err(e) = next.apply_authorization(p) {
                errors.push(format!("{name}: {e}"));
            }
        }
        *self = next;
        errors
    }

    // ---- lookups ----

    pub fn workload(&self, uid: &str) -> Option<&Arc<Workload>> {
        self.workloads.get(uid)
    }

    pub fn workloads(&self) -> impl Iterator<Item = &Arc<Workload>> {
        self.workloads.values()
    }

    pub fn services(&self) -> impl Iterator<Item = &Arc<Service>> {
        self.services.values()
    }

    pub fn policies(&self) -> impl Iterator<Item = &Arc<Policy>> {
        self.policies.values()
    }

    pub fn workload_by_ip(&self, network: &str, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.workload_by_ip
            .get(&(network.to_string(), ip))
            .and_then(|uid| self.workloads.get(uid))
    }

    /// Finds the pod `namespace/name`'s own workload, as the node agent reported the pod
    /// (indexed; only workloads whose uid names that pod).
    pub fn workload_by_pod(&self, namespace: &str, name: &str) -> Option<&Arc<Workload>> {
        self.workloads_by_pod
            .get(&(namespace.to_string(), name.to_string()))?
            .iter()
            .find_map(|uid| self.workloads.get(uid))
    }

    pub fn service(&self, namespace: &str, hostname: &str) -> Option<&Arc<Service>> {
        self.services.get(&format!("{namespace}/{hostname}"))
    }

    /// A service by hostname alone (indexed); when namespaces share a hostname, the first
    /// by key.
    pub fn service_by_hostname(&self, hostname: &str) -> Option<&Arc<Service>> {
        self.services_by_hostname
            .get(hostname)?
            .iter()
            .find_map(|k| self.services.get(k))
    }

    /// Every workload that backs `svc`, whatever its health (in uid order).
    pub fn endpoints_of<'a>(&'a self, svc: &Service) -> impl Iterator<Item = &'a Arc<Workload>> {
        self.endpoints
            .get(&svc.key())
            .into_iter()
            .flatten()
            .filter_map(|uid| self.workloads.get(uid))
    }

    /// The service named `hostname` among those `w` is an endpoint of, if any. What a peer
    /// claims (a `forwarded: host=`, a CONNECT authority) is only ever resolved this way,
    /// so it can name nothing but one of the destination's own services.
    pub fn service_of_workload(&self, w: &Workload, hostname: &str) -> Option<&Arc<Service>> {
        w.services
            .keys()
            .filter(|key| key.split_once('/').is_some_and(|(_, h)| h == hostname))
            .min()
            .and_then(|key| self.services.get(key))
    }

    /// What `ip` is: a service VIP takes precedence over a workload address.
    pub fn destination(&self, network: &str, ip: IpAddr) -> Option<Destination> {
        let k = (network.to_string(), ip);
        if let Some(s) = self
            .service_by_vip
            .get(&k)
            .and_then(|k| self.services.get(k))
        {
            return Some(Destination::Service(s.clone()));
        }
        self.workload_by_ip(network, ip)
            .map(|w| Destination::Workload(w.clone()))
    }

    /// The target port on `w` for `svc`'s `service_port`, resolving named ports through
    /// the workload's own port list.
    pub fn target_port(svc: &Service, w: &Workload, service_port: u16) -> Option<u16> {
        let port = svc.ports.iter().find(|p| p.service_port == service_port)?;
        if let Some(p) = w
            .services
            .get(&svc.key())
            .and_then(|ports| ports.iter().find(|p| p.service_port == service_port))
            .filter(|p| p.target_port != 0)
        {
            return Some(p.target_port);
        }
        (port.target_port != 0).then_some(port.target_port)
    }

    /// Picks an endpoint of `svc` for `service_port`: healthy ones (unless the service
    /// allows all), ranked by the load-balancing scope against `source`, then weighted
    /// random by capacity.
    pub fn pick_endpoint(
        &self,
        svc: &Service,
        service_port: u16,
        source: Option<&Workload>,
    ) -> Option<(Arc<Workload>, u16)> {
        weighted_choice(self.endpoint_candidates(svc, service_port, source))
    }

    /// The endpoints `pick_endpoint` chooses among (healthy, with a target port, best
    /// locality tier), for callers that balance by their own measure.
    pub fn endpoint_candidates(
        &self,
        svc: &Service,
        service_port: u16,
        source: Option<&Workload>,
    ) -> Vec<(Arc<Workload>, u16)> {
        let Some(uids) = self.endpoints.get(&svc.key()) else {
            return Vec::new();
        };
        let candidates: Vec<(Arc<Workload>, u16)> = uids
            .iter()
            .filter_map(|uid| self.workloads.get(uid))
            .filter(|w| w.healthy || svc.load_balancing.allow_unhealthy)
            .filter(|w| !w.addresses.is_empty())
            .filter_map(|w| Some((w.clone(), Self::target_port(svc, w, service_port)?)))
            .collect();
        rank_by_locality(&svc.load_balancing, source, candidates)
    }

    /// Any healthy endpoint of `svc`, whatever its ports (for waypoints, whose Service
    /// ports do not list the HBONE port).
    pub fn pick_any_endpoint(
        &self,
        svc: &Service,
        source: Option<&Workload>,
    ) -> Option<(Arc<Workload>, u16)> {
        let uids = self.endpoints.get(&svc.key())?;
        let candidates: Vec<(Arc<Workload>, u16)> = uids
            .iter()
            .filter_map(|uid| self.workloads.get(uid))
            .filter(|w| {
                (w.healthy || svc.load_balancing.allow_unhealthy) && !w.addresses.is_empty()
            })
            .map(|w| (w.clone(), 0))
            .collect();
        weighted_choice(rank_by_locality(&svc.load_balancing, source, candidates))
    }

    /// Policies that apply to connections to `w`: its namespace's, the global ones, and
    /// the selector policies it names.
    pub fn policies_for(&self, w: &Workload) -> Vec<Arc<Policy>> {
        let mut keys: BTreeSet<&str> = BTreeSet::new();
        for ns in [w.namespace.as_str(), ""] {
            if let Some(set) = self.policies_by_ns.get(ns) {
                keys.extend(set.iter().map(String::as_str));
            }
        }
        keys.extend(w.authorization_policies.iter().map(String::as_str));
        keys.into_iter()
            .filter_map(|k| self.policies.get(k).cloned())
            .collect()
    }

    pub fn authorize(&self, dst: &Workload, conn: &ConnectionInfo) -> Decision {
        mesh_authz::evaluate(self.policies_for(dst).iter().map(|p| p.as_ref()), conn)
    }
}

fn locality_matches(scope: Scope, a: &Workload, b: &Workload) -> bool {
    match scope {
        Scope::Region => a.locality.region == b.locality.region,
        Scope::Zone => a.locality.zone == b.locality.zone,
        Scope::Subzone => a.locality.subzone == b.locality.subzone,
        Scope::Node => a.node == b.node,
        Scope::Cluster => a.cluster_id == b.cluster_id,
        Scope::Network => a.network == b.network,
    }
}

fn rank_by_locality(
    lb: &LoadBalancing,
    source: Option<&Workload>,
    candidates: Vec<(Arc<Workload>, u16)>,
) -> Vec<(Arc<Workload>, u16)> {
    if lb.preferences.is_empty() {
        return candidates;
    }
    let Some(src) = source else {
        // Without a known source, STRICT cannot be satisfied; FAILOVER falls back to all.
        return if lb.mode == LbMode::Strict {
            Vec::new()
        } else {
            candidates
        };
    };
    let rank = |w: &Workload| {
        lb.preferences
            .iter()
            .take_while(|s| locality_matches(**s, src, w))
            .count()
    };
    match lb.mode {
        LbMode::Strict => candidates
            .into_iter()
            .filter(|(w, _)| rank(w) == lb.preferences.len())
            .collect(),
        _ => {
            let best = candidates.iter().map(|(w, _)| rank(w)).max().unwrap_or(0);
            candidates
                .into_iter()
                .filter(|(w, _)| rank(w) == best)
                .collect()
        }
    }
}

fn weighted_choice(mut candidates: Vec<(Arc<Workload>, u16)>) -> Option<(Arc<Workload>, u16)> {
    let total: u64 = candidates.iter().map(|(w, _)| u64::from(w.capacity)).sum();
    if total == 0 {
        return None;
    }
    let mut pick = rand::rng().random_range(0..total);
    let idx = candidates
        .iter()
        .position(|(w, _)| {
            let c = u64::from(w.capacity);
            if pick < c {
                true
            } else {
                pick -= c;
                false
            }
        })
        .expect("pick < total");
    Some(candidates.swap_remove(idx))
}

/// Whether `uid` is the uid of the pod `namespace/name` (`<cluster>//Pod/<ns>/<name>`, as
/// Istio writes it). Other workloads may share a pod's namespace and name (an
/// EndpointSlice `shop/db-0`, a WorkloadEntry) and must never be taken for the pod itself:
/// its identity is what the node proxy presents.
pub fn is_pod_uid(uid: &str, namespace: &str, name: &str) -> bool {
    uid.strip_suffix(name)
        .and_then(|u| u.strip_suffix('/'))
        .and_then(|u| u.strip_suffix(namespace))
        .and_then(|u| u.strip_suffix("//Pod/"))
        .is_some_and(|cluster| !cluster.contains('/'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn wl(uid: &str, ip: [u8; 4], node: &str, svc: Option<(&str, u16, u16)>) -> Workload {
        let mut services = HashMap::new();
        if let Some((k, sp, tp)) = svc {
            services.insert(
                k.to_string(),
                vec![PortMapping {
                    service_port: sp,
                    target_port: tp,
                    app_protocol: pb::AppProtocol::Unknown,
                }],
            );
        }
        Workload {
            uid: uid.into(),
            name: uid.into(),
            namespace: "ns".into(),
            addresses: vec![IpAddr::from(ip)],
            network: String::new(),
            hbone: true,
            identity: mesh_identity::SpiffeId::new("cluster.local", "ns", "sa").unwrap(),
            waypoint: None,
            node: node.into(),
            canonical_name: String::new(),
            canonical_revision: String::new(),
            workload_name: String::new(),
            services,
            authorization_policies: vec![],
            healthy: true,
            cluster_id: "c".into(),
            locality: Locality::default(),
            host_network: false,
            capacity: 1,
        }
    }

    fn svc(lb: LoadBalancing, target: u16) -> Service {
        Service {
            name: "s".into(),
            namespace: "ns".into(),
            hostname: "s.ns.svc.cluster.local".into(),
            vips: vec![(String::new(), IpAddr::from([10, 96, 0, 1]))],
            ports: vec![PortMapping {
                service_port: 80,
                target_port: target,
                app_protocol: pb::AppProtocol::Unknown,
            }],
            subject_alt_names: vec![],
            waypoint: None,
            load_balancing: lb,
        }
    }

    const KEY: &str = "ns/s.ns.svc.cluster.local";

    /// A policy ztunnel refuses (NACKs) is still in force, fail closed: before, an ALLOW
    /// it could not read was simply absent, and everyone was allowed.
    #[test]
    fn a_refused_authorization_never_widens_access() {
        let w = wl("w", [10, 0, 0, 1], "n", None);
        let conn = mesh_authz::ConnectionInfo {
            src_identity: Some("spiffe://cluster.local/ns/front/sa/web".parse().unwrap()),
            src_ip: IpAddr::from([10, 0, 0, 2]),
            dst_ip: IpAddr::from([10, 0, 0, 1]),
            dst_port: 80,
        };
        let bad_address = pb_sec::Match {
            source_ips: vec![pb_sec::Address {
                address: vec![10, 0],
                length: 8,
            }],
            ..Default::default()
        };
        for action in [pb_sec::Action::Allow, pb_sec::Action::Deny] {
            let mut st = State::default();
            st.insert_workload(w.clone());
            assert!(st.authorize(&w, &conn).is_allowed());
            let a = pb_sec::Authorization {
                name: "p".into(),
                namespace: "ns".into(),
                scope: pb_sec::Scope::Namespace as i32,
                action: action as i32,
                rules: vec![pb_sec::Rule {
                    clauses: vec![pb_sec::Clause {
                        matches: vec![bad_address.clone()],
                    }],
                }],
                ..Default::default()
            };
            assert!(st.apply_authorization(&a).is_err(), "NACKed");
            assert!(!st.authorize(&w, &conn).is_allowed(), "{action:?}");
            // The same through a snapshot (a local file).
            let mut st2 = State::default();
            st2.insert_workload(w.clone());
            assert_eq!(st2.apply_snapshot(&[], &[("ns/p".into(), a)]).len(), 1);
            st2.insert_workload(w.clone());
            assert!(!st2.authorize(&w, &conn).is_allowed(), "{action:?}");
        }
    }

    #[test]
    fn vip_and_pod_ip_lookups_and_removal() {
        let mut st = State::default();
        st.insert_service(svc(LoadBalancing::default(), 8080));
        st.insert_workload(wl("a", [10, 0, 0, 1], "n1", Some((KEY, 80, 8080))));
        assert!(matches!(
            st.destination("", IpAddr::from([10, 96, 0, 1])),
            Some(Destination::Service(_))
        ));
        assert!(matches!(
            st.destination("", IpAddr::from([10, 0, 0, 1])),
            Some(Destination::Workload(_))
        ));
        assert!(
            st.destination("other-net", IpAddr::from([10, 0, 0, 1]))
                .is_none()
        );
        assert!(st.remove_address("a"));
        assert!(st.destination("", IpAddr::from([10, 0, 0, 1])).is_none());
        assert!(
            st.pick_endpoint(&svc(LoadBalancing::default(), 8080), 80, None)
                .is_none()
        );
        assert!(st.remove_address(KEY));
        assert!(st.destination("", IpAddr::from([10, 96, 0, 1])).is_none());
    }

    #[test]
    fn named_ports_resolve_per_workload() {
        let mut st = State::default();
        let s = svc(LoadBalancing::default(), 0);
        st.insert_service(s.clone());
        st.insert_workload(wl("a", [10, 0, 0, 1], "n1", Some((KEY, 80, 9090))));
        let (w, port) = st.pick_endpoint(&s, 80, None).unwrap();
        assert_eq!((w.uid.as_str(), port), ("a", 9090));
        assert!(
            st.pick_endpoint(&s, 81, None).is_none(),
            "unknown service port"
        );
    }

    #[test]
    fn unhealthy_endpoints_are_skipped_unless_allowed() {
        let mut st = State::default();
        let mut down = wl("down", [10, 0, 0, 1], "n1", Some((KEY, 80, 8080)));
        down.healthy = false;
        st.insert_workload(down);
        assert!(
            st.pick_endpoint(&svc(LoadBalancing::default(), 8080), 80, None)
                .is_none()
        );
        let lb = LoadBalancing {
            allow_unhealthy: true,
            ..Default::default()
        };
        assert!(st.pick_endpoint(&svc(lb, 8080), 80, None).is_some());
    }

    #[test]
    fn node_local_strict_and_failover() {
        let mut st = State::default();
        st.insert_workload(wl("far", [10, 0, 1, 1], "n2", Some((KEY, 80, 8080))));
        let src = wl("src", [10, 0, 0, 9], "n1", None);
        let strict = LoadBalancing {
            preferences: vec![Scope::Node],
            mode: LbMode::Strict,
            allow_unhealthy: false,
        };
        assert!(
            st.pick_endpoint(&svc(strict.clone(), 8080), 80, Some(&src))
                .is_none()
        );
        let failover = LoadBalancing {
            mode: LbMode::Failover,
            ..strict.clone()
        };
        assert_eq!(
            st.pick_endpoint(&svc(failover.clone(), 8080), 80, Some(&src))
                .unwrap()
                .0
                .uid,
            "far"
        );
        st.insert_workload(wl("near", [10, 0, 0, 2], "n1", Some((KEY, 80, 8080))));
        for _ in 0..20 {
            assert_eq!(
                st.pick_endpoint(&svc(failover.clone(), 8080), 80, Some(&src))
                    .unwrap()
                    .0
                    .uid,
                "near"
            );
            assert_eq!(
                st.pick_endpoint(&svc(strict.clone(), 8080), 80, Some(&src))
                    .unwrap()
                    .0
                    .uid,
                "near"
            );
        }
    }

    #[test]
    fn weighted_by_capacity() {
        let mut st = State::default();
        let mut heavy = wl("heavy", [10, 0, 0, 1], "n1", Some((KEY, 80, 8080)));
        heavy.capacity = 9;
        st.insert_workload(heavy);
        st.insert_workload(wl("light", [10, 0, 0, 2], "n1", Some((KEY, 80, 8080))));
        let mut zero = wl("zero", [10, 0, 0, 3], "n1", Some((KEY, 80, 8080)));
        zero.capacity = 0;
        st.insert_workload(zero);
        let s = svc(LoadBalancing::default(), 8080);
        let mut heavy_count = 0;
        for _ in 0..2000 {
            let (w, _) = st.pick_endpoint(&s, 80, None).unwrap();
            assert_ne!(w.uid, "zero");
            if w.uid == "heavy" {
                heavy_count += 1;
            }
        }
        // Expect 90%: allow ±5 points (binomial sd ≈ 0.7 points at n=2000).
        assert!(
            (1700..=1900).contains(&heavy_count),
            "heavy picked {heavy_count}/2000"
        );
    }

    #[test]
    fn only_a_pods_own_workload_is_found_by_its_name() {
        assert!(is_pod_uid("Kubernetes//Pod/shop/db-0", "shop", "db-0"));
        assert!(is_pod_uid("//Pod/shop/db-0", "shop", "db-0"));
        assert!(!is_pod_uid(
            "Kubernetes/discovery.k8s.io/EndpointSlice/shop/db-0/10.0.0.9",
            "shop",
            "db-0"
        ));
        assert!(!is_pod_uid(
            "Kubernetes/networking.istio.io/WorkloadEntry/shop/db-0",
            "shop",
            "db-0"
        ));
        assert!(!is_pod_uid("Kubernetes//Pod/shop/db-0", "shop", "db-1"));
        assert!(!is_pod_uid("Kubernetes//Pod/x/shop/db-0", "shop", "db-0"));
        assert!(!is_pod_uid("uid-db-0", "shop", "db-0"));

        // An EndpointSlice named like the pod, host-network as the control plane publishes
        // it, arriving before and after the pod: the pod's lookup finds only the pod.
        let mut st = State::default();
        let mut slice = wl(
            "Kubernetes/discovery.k8s.io/EndpointSlice/shop/db-0/10.0.0.9",
            [10, 0, 0, 9],
            "",
            None,
        );
        slice.namespace = "shop".into();
        slice.name = "db-0".into();
        slice.host_network = true;
        st.insert_workload(slice);
        assert!(st.workload_by_pod("shop", "db-0").is_none());
        let mut pod = wl("Kubernetes//Pod/shop/db-0", [10, 0, 0, 5], "n1", None);
        pod.namespace = "shop".into();
        pod.name = "db-0".into();
        st.insert_workload(pod);
        assert_eq!(
            st.workload_by_pod("shop", "db-0").unwrap().uid,
            "Kubernetes//Pod/shop/db-0"
        );
    }

    #[test]
    fn pod_and_hostname_indexes_follow_inserts_replacements_and_removals() {
        let mut st = State::default();
        let mut a = wl(
            "c1//Pod/ns/pod-a",
            [10, 0, 0, 1],
            "n1",
            Some((KEY, 80, 8080)),
        );
        a.name = "pod-a".into();
        st.insert_workload(a.clone());
        assert_eq!(
            st.workload_by_pod("ns", "pod-a").unwrap().uid,
            "c1//Pod/ns/pod-a"
        );
        assert!(st.workload_by_pod("other", "pod-a").is_none());
        // Replaced (same uid) by one that no longer names the pod: the index forgets it.
        a.name = "pod-a2".into();
        st.insert_workload(a.clone());
        assert!(st.workload_by_pod("ns", "pod-a").is_none());
        assert!(st.workload_by_pod("ns", "pod-a2").is_none());
        a.name = "pod-a".into();
        st.insert_workload(a.clone());
        // The same pod name from another cluster: either finds one, removal keeps the other.
        let mut a_other = a.clone();
        a_other.uid = "c2//Pod/ns/pod-a".into();
        st.insert_workload(a_other);
        assert!(st.remove_address("c1//Pod/ns/pod-a"));
        assert_eq!(
            st.workload_by_pod("ns", "pod-a").unwrap().uid,
            "c2//Pod/ns/pod-a"
        );
        assert!(st.remove_address("c2//Pod/ns/pod-a"));
        assert!(st.workload_by_pod("ns", "pod-a").is_none());

        let s = svc(LoadBalancing::default(), 8080);
        st.insert_service(s.clone());
        assert_eq!(
            st.service_by_hostname("s.ns.svc.cluster.local")
                .unwrap()
                .key(),
            KEY
        );
        // The same hostname in another namespace: the first by key, then the survivor.
        let mut elsewhere = s.clone();
        elsewhere.namespace = "zz".into();
        st.insert_service(elsewhere.clone());
        assert_eq!(
            st.service_by_hostname("s.ns.svc.cluster.local")
                .unwrap()
                .key(),
            KEY
        );
        assert!(st.remove_address(KEY));
        assert_eq!(
            st.service_by_hostname("s.ns.svc.cluster.local")
                .unwrap()
                .key(),
            elsewhere.key()
        );
        assert!(st.remove_address(&elsewhere.key()));
        assert!(st.service_by_hostname("s.ns.svc.cluster.local").is_none());
    }

    #[test]
    fn a_hostname_resolves_only_to_the_workloads_own_services() {
        let mut st = State::default();
        st.insert_service(svc(LoadBalancing::default(), 8080));
        let mut other = svc(LoadBalancing::default(), 8080);
        other.name = "other".into();
        other.hostname = "other.ns.svc.cluster.local".into();
        other.vips = vec![];
        st.insert_service(other);
        let member = wl("a", [10, 0, 0, 1], "n1", Some((KEY, 80, 8080)));
        st.insert_workload(member.clone());
        assert_eq!(
            st.service_of_workload(&member, "s.ns.svc.cluster.local")
                .unwrap()
                .key(),
            KEY
        );
        // A real service the workload does not back, and a made-up name: neither.
        assert!(
            st.service_of_workload(&member, "other.ns.svc.cluster.local")
                .is_none()
        );
        assert!(
            st.service_of_workload(&member, "x".repeat(2048).as_str())
                .is_none()
        );
        assert!(st.service_of_workload(&member, "").is_none());
    }

    #[test]
    fn replacing_a_workload_moves_its_ip() {
        let mut st = State::default();
        st.insert_workload(wl("a", [10, 0, 0, 1], "n1", None));
        st.insert_workload(wl("a", [10, 0, 0, 2], "n1", None));
        assert!(st.workload_by_ip("", IpAddr::from([10, 0, 0, 1])).is_none());
        assert!(st.workload_by_ip("", IpAddr::from([10, 0, 0, 2])).is_some());
    }
}
