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
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

/// Everything the waypoint knows, from xDS (the master copy: edited in place, then
/// compiled into a [`Snapshot`]).
#[derive(Default)]
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
        // Several services of one name (other hostnames): the first by hostname wins, as
        // a scan in a stable order would pick one.
        sorted.sort_by(|a, b| a.hostname.cmp(&b.hostname));
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

/// The error of a poisoned configuration lock (a panic while xDS applied an update).
#[derive(Debug)]
pub struct Poisoned;

impl std::fmt::Display for Poisoned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the waypoint's configuration lock is poisoned")
    }
}

impl std::error::Error for Poisoned {}

/// The master copy (edited by xDS) and the current snapshot (read per request).
#[derive(Default)]
pub struct ConfigStore {
    master: Mutex<Config>,
    current: RwLock<Arc<Snapshot>>,
}

impl ConfigStore {
    pub fn new(cfg: Config) -> ConfigStore {
        let snapshot = Arc::new(Snapshot::compile(&cfg));
        ConfigStore {
            master: Mutex::new(cfg),
            current: RwLock::new(snapshot),
        }
    }

    /// The current configuration version (the lock is held to copy the pointer only).
    pub fn snapshot(&self) -> Arc<Snapshot> {
        match self.current.read() {
            Ok(s) => s.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Edits the master copy; the edit is compiled and published as the new snapshot
    /// when the writer is dropped (one version per xDS response).
    pub fn write(&self) -> Result<ConfigWriter<'_>, Poisoned> {
        let cfg = self.master.lock().map_err(|_| Poisoned)?;
        Ok(ConfigWriter {
            cfg,
            current: &self.current,
        })
    }
}

pub struct ConfigWriter<'a> {
    cfg: MutexGuard<'a, Config>,
    current: &'a RwLock<Arc<Snapshot>>,
}

impl std::ops::Deref for ConfigWriter<'_> {
    type Target = Config;
    fn deref(&self) -> &Config {
        &self.cfg
    }
}

impl std::ops::DerefMut for ConfigWriter<'_> {
    fn deref_mut(&mut self) -> &mut Config {
        &mut self.cfg
    }
}

impl Drop for ConfigWriter<'_> {
    fn drop(&mut self) {
        // Compiled before the pointer lock is taken: readers never wait for a compile.
        let snapshot = Arc::new(Snapshot::compile(&self.cfg));
        match self.current.write() {
            Ok(mut c) => *c = snapshot,
            Err(poisoned) => *poisoned.into_inner() = snapshot,
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
        let mut st = State::default();
        st.apply_address(&pb::Address {
            r#type: Some(pb::address::Type::Service(pb::Service {
                name: name.into(),
                namespace: ns.into(),
                hostname: format!("{name}.{ns}.svc.cluster.local"),
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
            // Not published until the writer is done.
            assert_eq!(store.snapshot().routes_for("shop", "api", 80).count(), 0);
        }
        let after = store.snapshot();
        assert_eq!(after.routes_for("shop", "api", 80).count(), 1);
        assert_eq!(before.routes_for("shop", "api", 80).count(), 0);
        assert!(
            Arc::ptr_eq(&after, &store.snapshot()),
            "reads share one version"
        );
    }
}
