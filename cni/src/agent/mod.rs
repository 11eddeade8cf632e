//! The node agent: learns from the control plane which pods on its node are enrolled,
//! programs their redirection inside their network namespaces, and hands the namespaces
//! to ztunnel over ZDS. Running pods are enrolled live (no restart): their namespace is
//! remembered from the plugin's ADD, or found by the pod's IP among the node's
//! namespaces. Unenrolling removes the rules and tells ztunnel.

pub mod netns;
pub mod redirect;
pub mod zds;

use crate::events::{AgentReply, AgentRequest};
use crate::rules::PodRuleOptions;
use mesh_proto::cni::NodePod;
use mesh_proto::discovery::DeltaDiscoveryResponse;
use mesh_proto::prost::Message;
use netns::Netns;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::Mutex;

/// How long ADD waits for the control plane to report a pod it has not seen yet.
const UNKNOWN_POD_WAIT: Duration = Duration::from_secs(5);
const RESYNC: Duration = Duration::from_secs(3);

#[derive(Clone, Debug, serde::Serialize)]
pub struct AgentConfig {
    pub node_name: String,
    pub zds_socket: PathBuf,
    pub agent_socket: PathBuf,
    /// Capture DNS for enrolled pods unless the pod says otherwise.
    pub dns_capture: bool,
    /// SNAT node-local probes to enrolled pods to 169.254.7.127.
    pub host_probe_snat: bool,
    /// Directories of named network namespaces to search (e.g. /var/run/netns).
    pub netns_dirs: Vec<PathBuf>,
    /// procfs to search for pod namespaces (e.g. /proc or /host/proc).
    pub proc_dir: Option<PathBuf>,
    /// Only named namespaces starting with this prefix are considered (labs and tests
    /// sharing a machine reuse pod IPs).
    pub netns_name_prefix: String,
}

#[derive(Default)]
struct PodRecord {
    view: Option<NodePod>,
    netns: Option<Netns>,
    /// Rules applied for this namespace inode (and handed to ztunnel, or pending).
    programmed: Option<u64>,
    /// Reported by ztunnel's ack.
    acked: bool,
    /// IPs from the plugin's ADD (the control plane may learn them later).
    plugin_ips: Vec<String>,
}

impl PodRecord {
    fn ips(&self) -> Vec<String> {
        let mut ips = self.plugin_ips.clone();
        for ip in self.view.iter().flat_map(|v| &v.ips) {
            if !ips.contains(ip) {
                ips.push(ip.clone());
            }
        }
        ips
    }
}

pub struct Agent {
    cfg: AgentConfig,
    pods: Mutex<BTreeMap<String, PodRecord>>,
    zds: zds::ZdsServer,
    view_synced: std::sync::atomic::AtomicBool,
    /// The plugin's fallback when we are down: which pods are not enrolled.
    cache_file: PathBuf,
}

fn key(ns: &str, name: &str) -> String {
    format!("{ns}/{name}")
}

impl Agent {
    pub fn start(cfg: AgentConfig) -> Result<Arc<Agent>, String> {
        let snapshot_source: Arc<std::sync::Mutex<Option<std::sync::Weak<Agent>>>> = Arc::default();
        let src = snapshot_source.clone();
        let zds = zds::ZdsServer::start(
            &cfg.zds_socket,
            Arc::new(move || {
                // A ztunnel may connect before the agent is fully built; never answer
                // with an empty snapshot (ztunnel would drain every pod), wait instead.
                loop {
                    let agent = src
                        .lock()
                        .expect("snapshot lock")
                        .as_ref()
                        .and_then(|w| w.upgrade());
                    if let Some(a) = agent {
                        return a.snapshot();
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }),
        )?;
        let cache_file = cfg
            .agent_socket
            .parent()
            .map(|d| d.join("node-pods.json"))
            .unwrap_or_else(|| PathBuf::from("node-pods.json"));
        if cfg.host_probe_snat {
            run_here(&["nft", "-f", "-"], Some(&redirect::host_probe_table()))?;
        }
        let agent = Arc::new(Agent {
            cfg,
            pods: Mutex::default(),
            zds,
            view_synced: Default::default(),
            cache_file,
        });
        *snapshot_source.lock().expect("snapshot lock") = Some(Arc::downgrade(&agent));
        Ok(agent)
    }

    /// Pods a connecting ztunnel must get: every programmed pod with its netns. Waits
    /// until the first view from the control plane has been applied: an early, partial
    /// snapshot would make ztunnel drain the proxies of pods it does not list.
    fn snapshot(&self) -> Vec<zds::PodEntry> {
        while !self.ready() {
            std::thread::sleep(Duration::from_millis(100));
        }
        let pods = self.pods.blocking_lock();
        pods.values()
            .filter(|r| r.programmed.is_some())
            .filter_map(|r| {
                let v = r.view.as_ref()?;
                Some(zds::PodEntry {
                    uid: uid_of(v),
                    name: v.name.clone(),
                    namespace: v.namespace.clone(),
                    service_account: v.service_account.clone(),
                    netns: r.netns.as_ref().and_then(|n| n.file.try_clone().ok()),
                })
            })
            .collect()
    }

    pub fn ready(&self) -> bool {
        self.view_synced.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Applies a view update from the control plane, then reconciles the pods it touched.
    pub async fn apply_view(self: &Arc<Self>, updates: Vec<(String, Option<NodePod>)>) {
        let mut pods = self.pods.lock().await;
        let mut touched = Vec::new();
        for (name, view) in updates {
            let rec = pods.entry(name.clone()).or_default();
            rec.view = view;
            touched.push(name);
        }
        tokio::task::block_in_place(|| {
            for name in touched {
                self.reconcile(&mut pods, &name);
            }
        });
        // Only now is the snapshot for ztunnel complete.
        self.view_synced
            .store(true, std::sync::atomic::Ordering::Relaxed);
        pods.retain(|_, r| r.view.is_some() || r.netns.is_some() || r.programmed.is_some());
        self.write_cache(&pods);
        drop(pods);
        self.sync_probe_set().await;
    }

    fn write_cache(&self, pods: &BTreeMap<String, PodRecord>) {
        let cache: BTreeMap<&String, bool> = pods
            .iter()
            .filter_map(|(k, r)| Some((k, r.view.as_ref()?.enrolled)))
            .collect();
        let tmp = self.cache_file.with_extension("json.tmp");
        if std::fs::write(&tmp, serde_json::to_vec(&cache).unwrap_or_default()).is_ok() {
            let _ = std::fs::rename(&tmp, &self.cache_file);
        }
    }

    /// Brings one pod's actual state to its desired state.
    fn reconcile(&self, pods: &mut BTreeMap<String, PodRecord>, name: &str) {
        let Some(rec) = pods.get_mut(name) else {
            return;
        };
        let want = rec.view.as_ref().is_some_and(|v| v.enrolled);
        if want && rec.netns.is_none() {
            rec.netns = self.discover(&rec.ips());
        }
        let inode = rec.netns.as_ref().map(|n| n.inode);
        match (want, rec.programmed, inode) {
            (true, None, Some(_)) => self.enroll(name, rec),
            (true, Some(p), Some(i)) if p != i => {
                tracing::info!(pod = name, "pod sandbox changed; re-enrolling");
                self.enroll(name, rec)
            }
            (true, Some(_), Some(_)) if !rec.acked => {
                // Rules are in place; ztunnel has not taken the pod yet.
                if let Some(v) = &rec.view {
                    rec.acked = self.zds.add(&entry(v, rec.netns.as_ref())).is_ok();
                }
            }
            (false, Some(_), _) => self.unenroll(name, rec),
            (true, None, None) => {
                tracing::debug!(
                    pod = name,
                    "enrolled, but its network namespace is not known yet"
                );
            }
            _ => {}
        }
    }

    fn enroll(&self, name: &str, rec: &mut PodRecord) {
        let (Some(v), Some(ns)) = (&rec.view, &rec.netns) else {
            return;
        };
        let opts = PodRuleOptions {
            dns_capture: v.dns_capture.unwrap_or(self.cfg.dns_capture),
            bypass_inbound: v.bypass_inbound_capture,
            reroute_interfaces: vec![],
        };
        if let Err(e) = redirect::apply(ns, &opts) {
            tracing::error!(pod = name, error = %e, "cannot program the pod's redirection");
            return;
        }
        rec.programmed = Some(ns.inode);
        match self.zds.add(&entry(v, Some(ns))) {
            Ok(()) => {
                rec.acked = true;
                tracing::info!(pod = name, netns = %ns.path, "pod enrolled: redirection programmed and handed to ztunnel");
            }
            Err(e) => {
                rec.acked = false;
                tracing::warn!(pod = name, error = %e, "redirection programmed; ztunnel has not taken the pod yet (its traffic is refused until it does)");
            }
        }
    }

    fn unenroll(&self, name: &str, rec: &mut PodRecord) {
        if let Some(ns) = &rec.netns
            && let Err(e) = redirect::remove(ns)
        {
            tracing::warn!(pod = name, error = %e, "cannot remove the pod's redirection");
        }
        let uid = rec
            .view
            .as_ref()
            .map(uid_of)
            .unwrap_or_else(|| name.to_string());
        self.zds.del(&uid);
        rec.programmed = None;
        rec.acked = false;
        tracing::info!(pod = name, "pod removed from the mesh");
    }

    /// Finds the network namespace holding one of `ips` among the node's namespaces.
    fn discover(&self, ips: &[String]) -> Option<Netns> {
        if ips.is_empty() {
            return None;
        }
        let mut seen = std::collections::HashSet::new();
        let mut candidates: Vec<String> = Vec::new();
        for dir in &self.cfg.netns_dirs {
            if let Ok(rd) = std::fs::read_dir(dir) {
                candidates.extend(
                    rd.flatten()
                        .filter(|e| {
                            e.file_name()
                                .to_string_lossy()
                                .starts_with(&self.cfg.netns_name_prefix)
                        })
                        .map(|e| e.path().to_string_lossy().into_owned()),
                );
            }
        }
        if let Some(proc_dir) = &self.cfg.proc_dir
            && let Ok(rd) = std::fs::read_dir(proc_dir)
        {
            candidates.extend(
                rd.flatten()
                    .filter(|e| {
                        e.file_name()
                            .to_string_lossy()
                            .bytes()
                            .all(|b| b.is_ascii_digit())
                    })
                    .map(|e| e.path().join("ns/net").to_string_lossy().into_owned()),
            );
        }
        let own = Netns::open("/proc/self/ns/net")
            .map(|n| n.inode)
            .unwrap_or(0);
        for path in candidates {
            let Ok(ns) = Netns::open(&path) else { continue };
            if ns.inode == own || !seen.insert(ns.inode) {
                continue;
            }
            if let Ok(addrs) = ns.addresses()
                && addrs.iter().any(|a| ips.contains(a))
            {
                tracing::info!(netns = %path, "found a running pod's network namespace by its IP");
                return Some(ns);
            }
        }
        None
    }

    /// Handles one plugin request.
    pub async fn handle(self: &Arc<Self>, req: AgentRequest) -> AgentReply {
        match req {
            AgentRequest::Add {
                namespace,
                name,
                netns,
                ips,
                ..
            } => {
                let k = key(&namespace, &name);
                let ns = match Netns::open(&netns) {
                    Ok(n) => n,
                    Err(e) => return AgentReply::Error { message: e },
                };
                let deadline = Instant::now() + UNKNOWN_POD_WAIT;
                loop {
                    {
                        let mut pods = self.pods.lock().await;
                        let rec = pods.entry(k.clone()).or_default();
                        rec.plugin_ips = ips.clone();
                        match ns.try_clone() {
                            Ok(n) => rec.netns = Some(n),
                            Err(message) => return AgentReply::Error { message },
                        }
                        if let Some(v) = &rec.view {
                            if !v.enrolled {
                                return AgentReply::Ok { enrolled: false };
                            }
                            tokio::task::block_in_place(|| self.reconcile(&mut pods, &k));
                            let programmed = pods.get(&k).and_then(|r| r.programmed);
                            drop(pods);
                            self.sync_probe_set().await;
                            return if programmed == Some(ns.inode) {
                                AgentReply::Ok { enrolled: true }
                            } else {
                                AgentReply::Error {
                                    message: format!(
                                        "could not program the redirection of {k}; see the node agent's log"
                                    ),
                                }
                            };
                        }
                    }
                    if Instant::now() >= deadline {
                        return AgentReply::Error {
                            message: format!(
                                "the control plane has not reported pod {k} on node {} yet; the runtime will retry",
                                self.cfg.node_name
                            ),
                        };
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            AgentRequest::Del {
                namespace, name, ..
            } => {
                let k = key(&namespace, &name);
                let mut pods = self.pods.lock().await;
                if let Some(rec) = pods.get_mut(&k) {
                    if rec.programmed.is_some() {
                        tokio::task::block_in_place(|| self.unenroll(&k, rec));
                    }
                    rec.netns = None;
                }
                drop(pods);
                self.sync_probe_set().await;
                AgentReply::Ok { enrolled: false }
            }
            AgentRequest::Check {
                namespace,
                name,
                netns,
            } => {
                let k = key(&namespace, &name);
                let enrolled = self
                    .pods
                    .lock()
                    .await
                    .get(&k)
                    .and_then(|r| r.view.as_ref())
                    .is_some_and(|v| v.enrolled);
                if !enrolled {
                    return AgentReply::Ok { enrolled: false };
                }
                match Netns::open(&netns)
                    .and_then(|n| tokio::task::block_in_place(|| redirect::verify(&n)))
                {
                    Ok(()) => AgentReply::Ok { enrolled: true },
                    Err(message) => AgentReply::Error { message },
                }
            }
        }
    }

    /// Periodically retries what could not be done yet (unknown namespaces, ztunnel not
    /// connected) and drops pods whose namespace is gone.
    pub async fn resync_loop(self: Arc<Self>) {
        loop {
            tokio::time::sleep(RESYNC).await;
            let mut pods = self.pods.lock().await;
            let names: Vec<String> = pods.keys().cloned().collect();
            tokio::task::block_in_place(|| {
                for n in names {
                    self.reconcile(&mut pods, &n);
                }
            });
            drop(pods);
            self.sync_probe_set().await;
        }
    }

    /// Serves plugin requests on the agent socket.
    pub async fn serve_plugin(self: Arc<Self>) -> Result<(), String> {
        let path = &self.cfg.agent_socket;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        let _ = std::fs::remove_file(path);
        let listener = tokio::net::UnixListener::bind(path)
            .map_err(|e| format!("bind {}: {e}", path.display()))?;
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let agent = self.clone();
            tokio::spawn(async move {
                let (r, mut w) = stream.into_split();
                let mut line = String::new();
                if BufReader::new(r).read_line(&mut line).await.is_err() {
                    return;
                }
                let reply = match serde_json::from_str::<AgentRequest>(&line) {
                    Ok(req) => agent.handle(req).await,
                    Err(e) => AgentReply::Error {
                        message: format!("malformed request: {e}"),
                    },
                };
                let mut out = serde_json::to_string(&reply).unwrap_or_default();
                out.push('\n');
                let _ = w.write_all(out.as_bytes()).await;
            });
        }
    }

    /// Rebuilds the node's probe SNAT set from the programmed pods.
    pub async fn sync_probe_set(&self) {
        if !self.cfg.host_probe_snat {
            return;
        }
        let ips: Vec<String> = self
            .pods
            .lock()
            .await
            .values()
            .filter(|r| r.programmed.is_some())
            .flat_map(|r| r.ips())
            .collect();
        if let Err(e) = run_here(&["nft", "-f", "-"], Some(&redirect::host_probe_set(&ips))) {
            tracing::warn!(error = %e, "cannot update the probe SNAT set");
        }
    }
}

fn uid_of(v: &NodePod) -> String {
    if v.uid.is_empty() {
        key(&v.namespace, &v.name)
    } else {
        v.uid.clone()
    }
}

fn entry(v: &NodePod, ns: Option<&Netns>) -> zds::PodEntry {
    zds::PodEntry {
        uid: uid_of(v),
        name: v.name.clone(),
        namespace: v.namespace.clone(),
        service_account: v.service_account.clone(),
        netns: ns.and_then(|n| n.file.try_clone().ok()),
    }
}

/// Runs a command in the agent's own namespace (the node's).
fn run_here(args: &[&str], stdin: Option<&str>) -> Result<String, String> {
    Netns::open("/proc/self/ns/net")?.run(args, stdin)
}

/// Feeds the control plane's NodePod view to the agent.
pub struct ViewHandler {
    pub tx: tokio::sync::mpsc::UnboundedSender<Vec<(String, Option<NodePod>)>>,
}

impl mesh_xds::Handler for ViewHandler {
    fn apply(&mut self, resp: &DeltaDiscoveryResponse) -> Vec<(String, String)> {
        let mut updates = Vec::new();
        let mut errors = Vec::new();
        for r in &resp.resources {
            match r
                .resource
                .as_ref()
                .map(|a| NodePod::decode(a.value.as_slice()))
            {
                Some(Ok(p)) => updates.push((r.name.clone(), Some(p))),
                Some(Err(e)) => {
                    errors.push((r.name.clone(), format!("cannot decode NodePod: {e}")))
                }
                None => errors.push((r.name.clone(), "resource body missing".into())),
            }
        }
        updates.extend(resp.removed_resources.iter().map(|n| (n.clone(), None)));
        let _ = self.tx.send(updates);
        errors
    }
}
