//! The waypoint's configuration: the master copy xDS edits, and the immutable snapshot
//! the data path reads. A snapshot is compiled once per configuration change (routes
//! indexed by the Service they attach to, policies by what they target, Services by
//! name), so a request takes one `Arc` from a lock held for the pointer only and never
//! clones or scans routes and policies.

use crate::authz::Policy;
use crate::binding::Dest;
use crate::route::Route;
use mesh_discovery::{Service, State};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

/// Everything the waypoint knows, from xDS (the master copy: edited in place, then
/// compiled into a [`Snapshot`]).
#[derive(Default, Clone)]
pub struct Config {
    pub discovery: State,
    pub routes: BTreeMap<String, Route>,
    pub policies: BTreeMap<String, (Policy, Vec<Target>)>,
}

/// What an L7 policy targets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Gateway,
    Service { namespace: String, name: String },
}

impl Target {
    /// Whether a policy with this target applies to traffic for `dest`: Gateway policies
    /// to everything the waypoint serves, Service policies to traffic addressed to that
    /// Service.
    pub fn applies_to(&self, dest: &Dest) -> bool {
        match (self, dest) {
            (Target::Gateway, _) => true,
            (Target::Service { namespace, name }, Dest::Service(s)) => {
                *namespace == s.namespace && *name == s.name
            }
            (Target::Service { .. }, Dest::Workload(_)) => false,
        }
    }
}

impl Config {
    /// The policies that apply to traffic for `dest`.
    pub fn policies_for<'a>(&'a self, dest: &'a Dest) -> impl Iterator<Item = &'a Policy> + 'a {
        self.policies
            .values()
            .filter(move |(_, targets)| targets.iter().any(|t| t.applies_to(dest)))
            .map(|(p, _)| p)
    }
}

/// namespace → name → value, looked up by `&str` without building a key.
type ByName<V> = HashMap<String, HashMap<String, V>>;

fn by_name<'a, V>(m: &'a ByName<V>, namespace: &str, name: &str) -> Option<&'a V> {
    m.get(namespace)?.get(name)
}

/// The order in which Services sharing a namespace/name are preferred: the Kubernetes
/// Service's own hostname (`<name>.<namespace>.svc.<domain>`) first, then by hostname, so
/// the choice never depends on the order they arrived in.
fn service_rank(s: &Service) -> (bool, &str) {
    let own = s
        .hostname
        .strip_prefix(s.name.as_str())
        .and_then(|h| h.strip_prefix('.'))
        .and_then(|h| h.strip_prefix(s.namespace.as_str()))
        .is_some_and(|h| h.starts_with(".svc."));
    (!own, s.hostname.as_str())
}

/// One configuration version, compiled for the data path.
#[derive(Default)]
pub struct Snapshot {
    pub discovery: State,
    /// Routes whose parents name the Service (their port is checked per request).
    routes: ByName<Vec<Arc<Route>>>,
    /// Policies with a Gateway target, in key order.
    gateway_policies: Vec<Arc<Policy>>,
    /// For each Service some policy targets: the policies that apply to it (Gateway ones
    /// included), in key order.
    service_policies: ByName<Vec<Arc<Policy>>>,
    services: ByName<Arc<Service>>,
}

impl Snapshot {
    /// Compiles `cfg`; the order policies are evaluated in is their key order, as before.
    pub fn compile(cfg: &Config) -> Snapshot {
        let mut routes: ByName<Vec<Arc<Route>>> = HashMap::new();
        for r in cfg.routes.values() {
            let r = Arc::new(r.clone());
            let mut parents: Vec<(&str, &str)> = r
                .parents
                .iter()
                .map(|p| (p.namespace.as_str(), p.name.as_str()))
                .collect();
            parents.dedup();
            for (ns, name) in parents {
                let list = routes
                    .entry(ns.to_string())
                    .or_default()
                    .entry(name.to_string())
                    .or_default();
                if !list.iter().any(|x| Arc::ptr_eq(x, &r)) {
                    list.push(r.clone());
                }
            }
        }
        let policies: Vec<(Arc<Policy>, &Vec<Target>)> = cfg
            .policies
            .values()
            .map(|(p, t)| (Arc::new(p.clone()), t))
            .collect();
        let gateway_policies = policies
            .iter()
            .filter(|(_, t)| t.contains(&Target::Gateway))
            .map(|(p, _)| p.clone())
            .collect();
        let mut service_policies: ByName<Vec<Arc<Policy>>> = HashMap::new();
        for (_, targets) in &policies {
            for t in targets.iter() {
                if let Target::Service { namespace, name } = t {
                    service_policies
                        .entry(namespace.clone())
                        .or_default()
                        .entry(name.clone())
                        .or_insert_with(|| {
                            policies
                                .iter()
                                .filter(|(_, ts)| {
                                    ts.iter().any(|t| match t {
                                        Target::Gateway => true,
                                        Target::Service {
                                            namespace: n,
                                            name: s,
                                        } => n == namespace && s == name,
                                    })
                                })
                                .map(|(p, _)| p.clone())
                                .collect()
                        });
                }
            }
        }
        let mut services: ByName<Arc<Service>> = HashMap::new();
        let mut sorted: Vec<&Arc<Service>> = cfg.discovery.services().collect();
        // Several services of one name (ServiceEntries, other hostnames): the cluster's
        // own `<name>.<namespace>.svc.<domain>` wins, then the first by hostname.
        sorted.sort_by(|a, b| service_rank(a).cmp(&service_rank(b)));
        for s in sorted {
            services
                .entry(s.namespace.clone())
                .or_default()
                .entry(s.name.clone())
                .or_insert_with(|| s.clone());
        }
        Snapshot {
            discovery: cfg.discovery.clone(),
            routes,
            gateway_policies,
            service_policies,
            services,
        }
    }

    /// The policies that apply to traffic for `dest`, in key order.
    pub fn policies_for(&self, dest: &Dest) -> &[Arc<Policy>] {
        match dest {
            Dest::Service(s) => by_name(&self.service_policies, &s.namespace, &s.name)
                .unwrap_or(&self.gateway_policies),
            Dest::Workload(_) => &self.gateway_policies,
        }
    }

    /// The routes attached to Service `namespace/name` on `port`.
    pub fn routes_for<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
        port: u16,
    ) -> impl Iterator<Item = &'a Route> + 'a {
        by_name(&self.routes, namespace, name)
            .into_iter()
            .flatten()
            .map(|r| r.as_ref())
            .filter(move |r| r.attaches_to(namespace, name, port))
    }

    /// The Service `namespace/name` (a route backend, a mirror).
    pub fn service(&self, namespace: &str, name: &str) -> Option<&Arc<Service>> {
        by_name(&self.services, namespace, name)
    }
}

/// The error of a configuration store that has failed closed: a panic while an xDS
/// response was being applied (its lock is poisoned, its edits were discarded).
#[derive(Debug)]
pub struct Poisoned;

impl std::fmt::Display for Poisoned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(
            "the waypoint's configuration failed closed: a panic while an xDS update was \
             applied; it serves nothing until restarted",
        )
    }
}

impl std::error::Error for Poisoned {}

/// The master copy (edited by xDS) and the current snapshot (read per request).
///
/// An edit is made on a copy of the master and takes effect only on
/// [`ConfigWriter::commit`]: a writer dropped uncommitted (an error path, a panic)
/// changes nothing. A panic during an edit fails the store closed: the half-applied copy
/// is never published, later writes are refused, and [`ConfigStore::failed`] tells the
/// data path to serve nothing (the xDS view is no longer known to match the master).
#[derive(Default)]
pub struct ConfigStore {
    master: Mutex<Config>,
    current: RwLock<Arc<Snapshot>>,
    failed: AtomicBool,
}

impl ConfigStore {
    pub fn new(cfg: Config) -> ConfigStore {
        let snapshot = Arc::new(Snapshot::compile(&cfg));
        ConfigStore {
            master: Mutex::new(cfg),
            current: RwLock::new(snapshot),
            failed: AtomicBool::new(false),
        }
    }

    /// The current configuration version (the lock is held to copy the pointer only,
    /// never across a compile or an edit, so it cannot be poisoned by one).
    pub fn snapshot(&self) -> Arc<Snapshot> {
        match self.current.read() {
            Ok(s) => s.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Whether the store has failed closed (see [`Poisoned`]): serve nothing.
    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::SeqCst)
    }

    /// Starts an edit on a copy of the master; nothing changes until
    /// [`ConfigWriter::commit`] (one version per xDS response).
    pub fn write(&self) -> Result<ConfigWriter<'_>, Poisoned> {
        if self.failed() {
            return Err(Poisoned);
        }
        let Ok(master) = self.master.lock() else {
            self.failed.store(true, Ordering::SeqCst);
            return Err(Poisoned);
        };
        let draft = master.clone();
        Ok(ConfigWriter {
            master,
            draft,
            store: self,
            committed: false,
        })
    }

    /// One edit, committed.
    pub fn update<R>(&self, edit: impl FnOnce(&mut Config) -> R) -> Result<R, Poisoned> {
        let mut w = self.write()?;
        let r = edit(&mut w);
        w.commit();
        Ok(r)
    }
}

/// An edit in progress: a copy of the master, published by [`ConfigWriter::commit`].
pub struct ConfigWriter<'a> {
    master: MutexGuard<'a, Config>,
    draft: Config,
    store: &'a ConfigStore,
    committed: bool,
}

impl ConfigWriter<'_> {
    /// Makes the edit the master copy and publishes it as the new snapshot.
    pub fn commit(mut self) {
        if std::thread::panicking() {
            // Never publish from a drop during unwinding: the edit may be half done
            // (dropping `self` uncommitted fails the store closed).
            return;
        }
        // Compiled before the pointer lock is taken: readers never wait for a compile.
        let snapshot = Arc::new(Snapshot::compile(&self.draft));
        *self.master = std::mem::take(&mut self.draft);
        match self.store.current.write() {
            Ok(mut c) => *c = snapshot,
            Err(poisoned) => *poisoned.into_inner() = snapshot,
        }
        self.committed = true;
    }
}

impl std::ops::Deref for ConfigWriter<'_> {
    type Target = Config;
    fn deref(&self) -> &Config {
        &self.draft
    }
}

impl std::ops::DerefMut for ConfigWriter<'_> {
    fn deref_mut(&mut self) -> &mut Config {
        &mut self.draft
    }
}

impl Drop for ConfigWriter<'_> {
    fn drop(&mut self) {
        // Uncommitted: the copy is discarded. Unwinding from a panic mid-edit: fail
        // closed (the master lock is poisoned by this guard's drop just after).
        if !self.committed && std::thread::panicking() {
            self.store.failed.store(true, Ordering::SeqCst);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::binding::Dest;
    use mesh_proto::workload as pb;

    fn policy(ns: &str, name: &str) -> Policy {
        let spec = serde_json::json!({"action": "DENY", "rules": [{}]});
        let (typed, _) = mesh_authz::k8s::read(ns, name, &Default::default(), Some(&spec));
        Policy::from_proto(&mesh_proto::waypoint::L7Policy {
            namespace: ns.into(),
            name: name.into(),
            policy: Some(typed),
        })
        .0
    }

    fn route(name: &str, parent: &str, port: Option<u16>) -> Route {
        let mut spec = serde_json::json!({"parentRefs": [{"kind": "Service", "name": parent}],
            "rules": [{"backendRefs": [{"name": parent}]}]});
        if let Some(p) = port {
            spec["parentRefs"][0]["port"] = p.into();
        }
        let none = |_: &str| None;
        let (typed, _) = mesh_route::k8s::read_route(
            mesh_route::k8s::Kind::Http,
            "shop",
            name,
            Some(&spec),
            &none,
        );
        crate::route::compile(&typed).0
    }

    fn service(ns: &str, name: &str) -> Arc<Service> {
        service_named(ns, name, &format!("{name}.{ns}.svc.cluster.local"))
    }

    fn service_named(ns: &str, name: &str, hostname: &str) -> Arc<Service> {
        let mut st = State::default();
        st.apply_address(&pb::Address {
            r#type: Some(pb::address::Type::Service(pb::Service {
                name: name.into(),
                namespace: ns.into(),
                hostname: hostname.into(),
                ports: vec![pb::Port {
                    service_port: 80,
                    target_port: 8080,
                    ..Default::default()
                }],
                ..Default::default()
            })),
        })
        .unwrap();
        st.services().next().unwrap().clone()
    }

    fn keys(ps: &[Arc<Policy>]) -> Vec<&str> {
        ps.iter().map(|p| p.key.as_str()).collect()
    }

    #[test]
    fn policies_are_indexed_by_target_in_key_order() {
        let mut cfg = Config::default();
        let gw = vec![Target::Gateway];
        let api = |n: &str| Target::Service {
            namespace: "shop".into(),
            name: n.into(),
        };
        cfg.policies
            .insert("shop/b".into(), (policy("shop", "b"), gw.clone()));
        cfg.policies
            .insert("shop/a".into(), (policy("shop", "a"), vec![api("api")]));
        cfg.policies.insert(
            "shop/c".into(),
            (policy("shop", "c"), vec![api("web"), api("api")]),
        );
        let s = Snapshot::compile(&cfg);
        let dest = |n: &str| Dest::Service(service("shop", n));
        assert_eq!(
            keys(s.policies_for(&dest("api"))),
            ["shop/a", "shop/b", "shop/c"]
        );
        assert_eq!(keys(s.policies_for(&dest("web"))), ["shop/b", "shop/c"]);
        assert_eq!(keys(s.policies_for(&dest("other"))), ["shop/b"]);
        // The same answer as the master copy's scan, for each destination.
        for n in ["api", "web", "other"] {
            let d = dest(n);
            let scanned: Vec<&str> = cfg.policies_for(&d).map(|p| p.key.as_str()).collect();
            assert_eq!(keys(s.policies_for(&d)), scanned, "{n}");
        }
    }

    #[test]
    fn routes_are_indexed_by_parent_and_port() {
        let mut cfg = Config::default();
        cfg.routes
            .insert("shop/any".into(), route("any", "api", None));
        cfg.routes
            .insert("shop/p81".into(), route("p81", "api", Some(81)));
        cfg.routes
            .insert("shop/web".into(), route("web", "web", None));
        let s = Snapshot::compile(&cfg);
        let names = |ns, svc, port| -> Vec<String> {
            s.routes_for(ns, svc, port)
                .map(|r| r.name.clone())
                .collect()
        };
        assert_eq!(names("shop", "api", 80), ["any"]);
        assert_eq!(names("shop", "api", 81), ["any", "p81"]);
        assert_eq!(names("shop", "web", 80), ["web"]);
        assert!(names("other", "api", 80).is_empty());
    }

    #[test]
    fn a_write_publishes_a_new_snapshot_and_old_readers_keep_theirs() {
        let store = ConfigStore::default();
        let before = store.snapshot();
        {
            let mut w = store.write().unwrap();
            w.routes.insert("shop/r".into(), route("r", "api", None));
            // Not published until the writer commits.
            assert_eq!(store.snapshot().routes_for("shop", "api", 80).count(), 0);
            w.commit();
        }
        let after = store.snapshot();
        assert_eq!(after.routes_for("shop", "api", 80).count(), 1);
        assert_eq!(before.routes_for("shop", "api", 80).count(), 0);
        assert!(
            Arc::ptr_eq(&after, &store.snapshot()),
            "reads share one version"
        );
    }

    #[test]
    fn a_writer_dropped_without_commit_changes_nothing() {
        let store = ConfigStore::default();
        let before = store.snapshot();
        {
            let mut w = store.write().unwrap();
            w.routes.insert("shop/r".into(), route("r", "api", None));
        }
        assert!(Arc::ptr_eq(&before, &store.snapshot()), "nothing published");
        // The master copy did not keep the edit either: the next write starts from it.
        assert!(store.write().unwrap().routes.is_empty());
        assert!(!store.failed());
    }

    #[test]
    fn a_panic_mid_edit_publishes_nothing_and_fails_the_store_closed() {
        let mut cfg = Config::default();
        cfg.routes.insert("shop/a".into(), route("a", "api", None));
        let store = ConfigStore::new(cfg);
        let before = store.snapshot();
        // One response: a route added, then a panic before the old one is removed.
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut w = store.write().unwrap();
            w.routes.insert("shop/b".into(), route("b", "web", None));
            panic!("bug while applying");
        }));
        assert!(r.is_err());
        let after = store.snapshot();
        assert!(
            Arc::ptr_eq(&before, &after),
            "the half-applied edit is not published"
        );
        assert_eq!(after.routes_for("shop", "web", 80).count(), 0);
        assert!(store.failed(), "the data path is told to serve nothing");
        assert!(store.write().is_err(), "later writes are refused");
        assert!(store.update(|c| c.routes.clear()).is_err());
    }

    #[test]
    fn of_services_sharing_a_name_the_cluster_hostname_wins() {
        let own = service_named("shop", "api", "api.shop.svc.cluster.local");
        // Sorts before the cluster hostname: the first by hostname would pick it.
        let entry = service_named("shop", "api", "api.example.com");
        let lookalike = service_named("shop", "api", "api.shop2.svc.cluster.local");
        assert!(service_rank(&own) < service_rank(&entry));
        assert!(service_rank(&own) < service_rank(&lookalike));
        // Neither is the cluster's own: the first by hostname, whatever the arrival order.
        assert!(service_rank(&entry) < service_rank(&lookalike));
        for order in [[&own, &entry], [&entry, &own]] {
            let mut cfg = Config::default();
            for s in order {
                cfg.discovery
                    .apply_address(&pb::Address {
                        r#type: Some(pb::address::Type::Service(pb::Service {
                            name: s.name.clone(),
                            namespace: s.namespace.clone(),
                            hostname: s.hostname.clone(),
                            ..Default::default()
                        })),
                    })
                    .unwrap();
            }
            let snap = Snapshot::compile(&cfg);
            let got = snap.service("shop", "api").unwrap();
            assert_eq!(got.hostname, "api.shop.svc.cluster.local");
        }
    }
}
