//! The node agent: learns from the control plane which pods on its node are enrolled,
//! programs their redirection inside their network namespaces, and hands the namespaces
//! to ztunnel over ZDS. Running pods are enrolled live (no restart): their namespace is
//! remembered from the plugin's ADD, or found the way the kubelet knows it: the pod's
//! processes by the pod UID in their cgroup, then their namespace, confirmed by the pod's
//! IP (never by the IP alone; see `cgroup`). Unenrolling removes the rules and tells
//! ztunnel.

pub mod cgroup;
pub mod enrolment;
pub mod guard;
pub mod http;
pub mod local;
pub mod metrics;
pub mod netns;
pub mod redirect;
pub mod zds;
pub mod zds_queue;
pub mod zds_route;

use crate::events::{AgentReply, AgentRequest};
use crate::rules::PodRuleOptions;
use cgroup::{Lookup, Refusal};
use local::{LineError, PeerPolicy};
use mesh_proto::cni::NodePod;
use mesh_proto::discovery::DeltaDiscoveryResponse;
use mesh_proto::prost::Message;
use netns::{Netns, NsId};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::sync::Mutex;

/// How long ADD waits for the control plane to report a pod it has not seen yet.
const UNKNOWN_POD_WAIT: Duration = Duration::from_secs(5);
const RESYNC: Duration = crate::cache::REFRESH;
/// Plugin connections served at once; more are closed (the plugin fails closed, the
/// runtime retries).
const MAX_PLUGIN_CONNECTIONS: usize = 64;

#[derive(Clone, Debug, serde::Serialize)]
pub struct AgentConfig {
    pub node_name: String,
    pub zds_socket: PathBuf,
    pub agent_socket: PathBuf,
    /// Capture DNS for enrolled pods unless the pod says otherwise.
    pub dns_capture: bool,
    /// SNAT node-local probes to enrolled pods to 169.254.7.127.
    pub host_probe_snat: bool,
    /// procfs to scan for running pods' processes (e.g. /proc or /host/proc); `None`:
    /// running pods are known only from the plugin's ADD.
    pub proc_dir: Option<PathBuf>,
    /// Only processes whose cgroup path is under this root are pods' ("" or "/": any).
    /// The kubelet's own `--cgroup-root`, or a lab's private subtree.
    pub cgroup_root: String,
    /// Who may connect to the plugin socket (the container runtime runs the plugin).
    pub plugin_peer: PeerPolicy,
    /// Who may connect to the ZDS socket (ztunnel).
    pub zds_peer: PeerPolicy,
}

#[derive(Default)]
struct PodRecord {
    view: Option<NodePod>,
    netns: Option<Netns>,
    /// Rules applied for this namespace inode (and handed to ztunnel, or pending).
    programmed: Option<u64>,
    /// Reported by ztunnel's ack.
    acked: bool,
    /// Which enrolment the programmed rules are (the agent's counter, bumped on every
    /// programming): an ack completes only the enrolment its Add was queued for.
    generation: u64,
    /// An Add for this enrolment is queued or in flight (not sent again meanwhile).
    add_queued: Option<u64>,
    /// IPs from the plugin's ADD (the control plane may learn them later).
    plugin_ips: Vec<String>,
    /// The last refusal reported for this pod's namespace (reported once, not on every
    /// resync).
    refused: Option<Refusal>,
    /// The last attempt to program the rules failed.
    apply_error: Option<String>,
    /// The last read-back of the programmed rules against the plan.
    read_back: Option<Result<(), String>>,
    /// Something of ours may be in the pod's namespace (set before programming, cleared
    /// once removed): a failed program or removal is retried until it is gone.
    installed: bool,
    /// The first read-back after programming (rules exactly as nft listed them).
    baseline: Option<Vec<enrolment::Chain>>,
    /// The options the rules were programmed with (re-programmed when they change).
    programmed_with: Option<PodRuleOptions>,
    /// The runtime's container (sandbox) ID that came with `netns` in ADD; `None` when
    /// the namespace was found otherwise (by the pod's cgroup, after an agent restart).
    container_id: Option<String>,
}

/// The sandbox ID to remember from ADD's container ID: an empty one names no sandbox,
/// so it must never match a DEL's (empty) ID.
fn sandbox_id(container_id: &str) -> Option<String> {
    Some(container_id.to_string()).filter(|c| !c.is_empty())
}

/// What the agent knows when a DEL arrives, to decide whether it is for the pod's
/// current sandbox (`del_is_current`).
#[derive(Clone, Copy, Debug)]
struct DelFacts<'a> {
    /// The pod is in the control plane's view and enrolled.
    enrolled: bool,
    /// The container ID ADD gave with the current namespace (`None` when the namespace
    /// was found by the pod's cgroup, after an agent restart).
    known: Option<&'a str>,
    /// The pod's current namespace.
    current: Option<NsId>,
    /// The DEL's container ID.
    del_container: &'a str,
    /// The namespace the DEL's CNI_NETNS names (`None` if empty, gone or not a
    /// namespace).
    del_netns: Option<NsId>,
}

/// Whether a DEL is for the pod's current sandbox, so its redirection may go. A runtime
/// can release a lost sandbox (after a reboot, say) once it has made the pod's new one:
/// that DEL must not tear down the new sandbox's capture, or the running pod sends
/// plaintext until the agent's next pass. A DEL naming another live namespace is never
/// current; otherwise the container ID decides. Without a known container ID nothing
/// tells the current sandbox's DEL from a late one for a lost sandbox at a reused path
/// (the namespace path alone proves nothing), so the capture stays: it fails closed, and
/// the pod's removal from the control plane unenrolls it. A pod that is deleted or not
/// enrolled has no capture to protect: its DEL always counts, so its record goes.
fn del_is_current(f: DelFacts) -> bool {
    let Some(current) = f.current else {
        return true;
    };
    if !f.enrolled {
        return true;
    }
    if f.del_netns.is_some_and(|d| d != current) {
        return false;
    }
    f.known == Some(f.del_container)
}

/// Whether a peer may read `/enrolment` (every pod's name, UID and failure): only from
/// the node itself. The readiness address is often 0.0.0.0 for Prometheus; meshctl runs
/// on the node (its network namespace).
pub fn may_read_enrolment(peer: std::net::IpAddr) -> bool {
    match peer {
        std::net::IpAddr::V4(a) => a.is_loopback(),
        std::net::IpAddr::V6(a) => {
            a.is_loopback() || a.to_ipv4_mapped().is_some_and(|a| a.is_loopback())
        }
    }
}

/// A read-back to run without the pods lock: the namespace and the options its rules
/// were programmed with.
#[derive(Debug)]
struct ReadBackJob {
    netns: Netns,
    opts: PodRuleOptions,
}

impl PartialEq for ReadBackJob {
    fn eq(&self, other: &Self) -> bool {
        self.netns.inode == other.netns.inode && self.opts == other.opts
    }
}

/// What a reconcile pass does for a pod.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    Enroll,
    Reenroll,
    /// Rules in place, ztunnel not told yet.
    HandOver,
    Unenroll,
    WaitForNetns,
    Nothing,
}

/// The facts a reconcile pass decides on.
#[derive(Clone, Copy, Debug, Default)]
struct Now {
    want: bool,
    /// The namespace inode the rules were programmed for.
    programmed: Option<u64>,
    /// The pod's namespace inode now.
    inode: Option<u64>,
    acked: bool,
    /// An Add for the programmed namespace is already queued for ztunnel.
    add_queued: bool,
    installed: bool,
    /// The pod's rule options differ from those it was programmed with.
    options_changed: bool,
}

/// Whether to let go of a pod's namespace handle: the pod left the view and nothing of
/// ours is left in its namespace. A DEL is not needed for that (one may never come, or
/// not be recognised as the current sandbox's), else the record and its open handle
/// would stay for ever. A pod still in the view keeps the runtime's namespace, so
/// enrolling it later (its namespace labelled) needs no discovery.
fn release_netns(in_view: bool, programmed: Option<u64>, installed: bool) -> bool {
    !in_view && programmed.is_none() && !installed
}

/// What a reconcile pass does for a pod, in order. `Program` and `Unprogram` act on the
/// pod's own namespace under the pods lock; the ZDS messages wait for ztunnel's ack, so
/// they run after the lock is released (`Deferred`), one ztunnel that never answers
/// holding no CNI ADD.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    /// Program the rules for the pod's current namespace.
    Program,
    /// Remove the rules (and the guard) from its namespace.
    Unprogram,
    /// Hand the pod to ztunnel (only once its rules are programmed).
    ZdsAdd,
    /// Tell every ztunnel the pod left.
    ZdsDel,
}

fn plan(n: Now) -> Vec<Action> {
    match step(n) {
        Step::Enroll | Step::Reenroll => vec![Action::Program, Action::ZdsAdd],
        Step::HandOver => vec![Action::ZdsAdd],
        Step::Unenroll => vec![Action::Unprogram, Action::ZdsDel],
        Step::WaitForNetns | Step::Nothing => vec![],
    }
}

/// A ZDS message a reconcile pass decides under the pods lock; queued before the lock
/// is released (`Agent::defer`) and sent in order by one task (`Agent::send_deferred`).
enum Deferred {
    /// The pod, as enrolled in `generation`: its ack is recorded only while the pod is
    /// still in that enrolment. Its netns is duplicated from the record when it is sent.
    Add {
        pod: String,
        uid: String,
        generation: u64,
    },
    Del {
        uid: String,
    },
}

/// Answered with the ack of a queued Add.
type AckWaiter = tokio::sync::oneshot::Sender<Result<(), String>>;

/// Pods with a ZDS message owed beyond this: ztunnel is not keeping up and the agent
/// exits (its restart hands ztunnel a fresh snapshot) rather than grow without bound.
const MAX_QUEUED_PODS: usize = 4096;

/// The ZDS messages owed, and the sender task's wake-up.
#[derive(Default)]
struct ZdsQueue {
    queue: std::sync::Mutex<Option<zds_queue::Queue<AckWaiter>>>,
    wake: tokio::sync::Notify,
}

fn step(n: Now) -> Step {
    match (n.want, n.programmed, n.inode) {
        (true, None, Some(_)) => Step::Enroll,
        (true, Some(p), Some(i)) if p != i || n.options_changed => Step::Reenroll,
        (true, Some(_), Some(_)) if !n.acked && !n.add_queued => Step::HandOver,
        (true, None, None) => Step::WaitForNetns,
        (false, Some(_), _) => Step::Unenroll,
        (false, None, _) if n.installed => Step::Unenroll,
        _ => Step::Nothing,
    }
}

impl PodRecord {
    /// Whether the record still stands for anything: a pod in the view, a namespace
    /// handle held, or rules that may still need removing.
    fn keep(&self) -> bool {
        self.view.is_some() || self.netns.is_some() || self.programmed.is_some() || self.installed
    }

    /// Whether the ack of an Add queued for enrolment `generation` completes this pod's
    /// current enrolment (not a namespace inode: a re-enrolment may keep the namespace,
    /// and the kernel reuses inodes).
    fn completed_by(&self, generation: u64) -> bool {
        self.programmed.is_some() && self.generation == generation
    }

    fn enrolled(&self) -> bool {
        self.view.as_ref().is_some_and(|v| v.enrolled)
    }

    /// Rules are programmed for the namespace the pod has now.
    fn programmed_here(&self) -> bool {
        self.programmed.is_some() && self.programmed == self.netns.as_ref().map(|n| n.inode)
    }

    /// `ztunnel_up`: a ztunnel is connected (an ack from one that left confirms nothing;
    /// the next one gets the pod in its snapshot and acks again).
    fn enrolment(&self, ztunnel_up: bool) -> (enrolment::State, Option<String>) {
        enrolment::state(&enrolment::Facts {
            netns_known: self.netns.is_some(),
            refused: self.refused.map(|r| r.label().to_string()),
            apply_error: self.apply_error.clone(),
            programmed: self.programmed_here(),
            read_back: self.read_back.clone(),
            acked: self.acked && ztunnel_up,
        })
    }

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
    /// The first view from the control plane has been applied.
    view_synced: tokio::sync::watch::Sender<bool>,
    /// The xDS stream to the control plane is up (our view is current).
    xds_connected: Arc<AtomicBool>,
    /// The plugin's fallback when we cannot be reached: which pods are not enrolled,
    /// believed only while fresh (see `crate::cache`).
    cache_file: PathBuf,
    metrics: Arc<metrics::Metrics>,
    /// ZDS messages decided under the pods lock, sent after it is released, in order.
    deferred: Arc<ZdsQueue>,
    /// The last enrolment generation handed out (`PodRecord::generation`).
    generations: std::sync::atomic::AtomicU64,
}

/// One scan of the node's processes, shared by the pods reconciled together.
#[derive(Default)]
struct Discovery {
    index: cgroup::PodNetnsIndex,
    addresses: HashMap<u64, Result<Vec<String>, String>>,
}

fn key(ns: &str, name: &str) -> String {
    format!("{ns}/{name}")
}

impl Agent {
    /// Starts the agent's ZDS server (inside a tokio runtime).
    pub fn start(cfg: AgentConfig) -> Result<Arc<Agent>, String> {
        if cfg.zds_socket.parent() == cfg.agent_socket.parent()
            && cfg.zds_peer.uid != cfg.plugin_peer.uid
        {
            return Err(format!(
                "the ZDS and plugin sockets share {} but expect different peer uids ({} and {}): each directory is private to its peer, so put them in different directories",
                cfg.agent_socket
                    .parent()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
                cfg.zds_peer.uid,
                cfg.plugin_peer.uid
            ));
        }
        let snapshot_source: Arc<std::sync::Mutex<Option<std::sync::Weak<Agent>>>> = Arc::default();
        let src = snapshot_source.clone();
        let metrics = Arc::new(metrics::Metrics::default());
        let zds = zds::ZdsServer::start(
            &cfg.zds_socket,
            cfg.zds_peer.clone(),
            metrics.clone(),
            Arc::new(move |register: zds::Register| {
                let src = src.clone();
                Box::pin(async move {
                    // A ztunnel may connect before the agent is fully built; never answer
                    // with an empty snapshot (ztunnel would drain every pod), wait instead.
                    loop {
                        let agent = src
                            .lock()
                            .expect("snapshot lock")
                            .as_ref()
                            .and_then(|w| w.upgrade());
                        if let Some(a) = agent {
                            return a.snapshot(register).await;
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                })
            }),
        )?;
        let cache_file = crate::cache::path_for(&cfg.agent_socket);
        if cfg.host_probe_snat {
            run_here(&["nft", "-f", "-"], Some(&redirect::host_probe_table()))?;
        }
        let deferred = Arc::new(ZdsQueue::default());
        *deferred.queue.lock().expect("zds queue lock") =
            Some(zds_queue::Queue::new(MAX_QUEUED_PODS));
        let agent = Arc::new(Agent {
            cfg,
            pods: Mutex::default(),
            zds,
            view_synced: tokio::sync::watch::Sender::new(false),
            xds_connected: Arc::default(),
            cache_file,
            metrics,
            deferred: deferred.clone(),
            generations: Default::default(),
        });
        *snapshot_source.lock().expect("snapshot lock") = Some(Arc::downgrade(&agent));
        let sender = tokio::spawn(Self::send_deferred(Arc::downgrade(&agent), deferred));
        tokio::spawn(async move {
            // Fail closed: without its sender no pod reaches ztunnel and no Del leaves it;
            // the DaemonSet restarts the agent, whose snapshot puts ztunnel right.
            if let Err(e) = sender.await {
                tracing::error!(error = %e, "the ZDS sender task ended; exiting");
                std::process::exit(1);
            }
        });
        Ok(agent)
    }

    /// Queues ZDS messages decided under the pods lock, while it is still held (`_pods`
    /// proves it): a pod's messages are queued in the order they were decided, so a Del
    /// never overtakes the Add before it.
    fn defer(&self, _pods: &BTreeMap<String, PodRecord>, actions: Vec<Deferred>) {
        let mut guard = self.deferred.queue.lock().expect("zds queue lock");
        let queue = guard
            .as_mut()
            .expect("the queue lives as long as the agent");
        for a in actions {
            let r = match a {
                Deferred::Add {
                    pod,
                    uid,
                    generation,
                } => queue.add(
                    &uid,
                    zds_queue::Add {
                        pod,
                        generation,
                        waiters: Vec::new(),
                    },
                ),
                Deferred::Del { uid } => queue.del(&uid),
            };
            if let Err(e) = r {
                // Fail closed: a dropped Del would leave ztunnel a proxy for a gone pod.
                tracing::error!(error = %e, "cannot queue a ZDS message; exiting");
                std::process::exit(1);
            }
        }
        self.metrics.set_zds_queue_depth(queue.len() as u64);
        drop(guard);
        self.deferred.wake.notify_one();
    }

    /// The next queued ZDS message, waiting for one.
    async fn next_deferred(q: &ZdsQueue) -> (String, zds_queue::Next<AckWaiter>) {
        loop {
            if let Some(next) = q
                .queue
                .lock()
                .expect("zds queue lock")
                .as_mut()
                .and_then(zds_queue::Queue::pop)
            {
                return next;
            }
            // A wake-up sent since the pop above is kept (`notify_one` stores a permit).
            q.wake.notified().await;
        }
    }

    /// Sends the queued ZDS messages one after another, waiting for each ack without the
    /// pods lock: a ztunnel that never answers delays only these messages (each bounded
    /// by the ack timeout), never a CNI ADD or a view update.
    async fn send_deferred(agent: std::sync::Weak<Agent>, q: Arc<ZdsQueue>) {
        loop {
            let (uid, next) = Self::next_deferred(&q).await;
            let Some(agent) = agent.upgrade() else {
                return;
            };
            let depth = q
                .queue
                .lock()
                .expect("zds queue lock")
                .as_ref()
                .map_or(0, |q| q.len());
            agent.metrics.set_zds_queue_depth(depth as u64);
            let zds = agent.zds.clone();
            match next {
                zds_queue::Next::Add(add) => agent.send_add(add).await,
                zds_queue::Next::Del => {
                    if let Err(e) = tokio::task::spawn_blocking(move || zds.del(&uid)).await {
                        tracing::error!(error = %e, "sending a ZDS Del failed; exiting");
                        std::process::exit(1);
                    }
                }
            }
        }
    }

    /// Sends one queued Add, its netns duplicated from the pod's record now (nothing is
    /// sent if the pod left that enrolment meanwhile), and records the ack.
    async fn send_add(&self, add: zds_queue::Add<AckWaiter>) {
        let zds_queue::Add {
            pod,
            generation,
            waiters,
        } = add;
        let current = |r: &&mut PodRecord| r.completed_by(generation);
        let entry = {
            let mut pods = self.pods.lock().await;
            let Some(rec) = pods.get_mut(&pod).filter(current) else {
                return; // Re-enrolled or removed meanwhile: its waiters see it dropped.
            };
            match (&rec.view, &rec.netns) {
                (Some(v), Some(ns)) => entry(v, Some(ns)),
                _ => {
                    rec.add_queued = None;
                    return;
                }
            }
        };
        let zds = self.zds.clone();
        let sent = match tokio::task::spawn_blocking(move || zds.add(&entry)).await {
            Ok(sent) => sent,
            Err(e) => {
                tracing::error!(error = %e, "sending a ZDS Add failed; exiting");
                std::process::exit(1);
            }
        };
        for w in waiters {
            let _ = w.send(sent.clone());
        }
        let mut pods = self.pods.lock().await;
        let Some(rec) = pods.get_mut(&pod).filter(current) else {
            return; // Re-enrolled or removed meanwhile: this ack is stale.
        };
        rec.add_queued = None;
        match sent {
            Ok(()) => {
                if !rec.acked {
                    tracing::info!(pod, "pod handed to ztunnel");
                }
                rec.acked = true;
            }
            Err(e) => {
                rec.acked = false;
                tracing::warn!(pod, error = %e, "redirection programmed; ztunnel has not taken the pod yet (its traffic is refused until it does)");
            }
        }
        self.record_enrolment(&pods);
    }

    pub fn metrics(&self) -> &metrics::Metrics {
        &self.metrics
    }

    /// Set by the xDS client (`ViewHandler`) when its stream goes up or down.
    pub fn xds_connected(&self) -> Arc<AtomicBool> {
        self.xds_connected.clone()
    }

    /// Pods a connecting ztunnel must get: every programmed pod with its netns. Waits
    /// until the first view from the control plane has been applied: an early, partial
    /// snapshot would make ztunnel drain the proxies of pods it does not list. `register`
    /// runs under the pod lock once the list is taken: every Add and Del after it is
    /// queued for the new connection.
    async fn snapshot(&self, register: zds::Register) -> Vec<zds::PodEntry> {
        let _ = self
            .view_synced
            .subscribe()
            .wait_for(|synced| *synced)
            .await;
        let pods = self.pods.lock().await;
        let list = pods
            .values()
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
            .collect();
        register();
        drop(pods);
        list
    }

    pub fn ready(&self) -> bool {
        *self.view_synced.borrow()
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
        let deferred = tokio::task::block_in_place(|| {
            let mut scan = None;
            let mut deferred = Vec::new();
            for name in touched {
                deferred.extend(self.reconcile(&mut pods, &name, &mut scan));
            }
            deferred
        });
        // Only now is the snapshot for ztunnel complete.
        self.view_synced.send_replace(true);
        pods.retain(|_, r| r.keep());
        self.record_enrolment(&pods);
        self.write_cache(&pods);
        self.defer(&pods, deferred);
        drop(pods);
        self.sync_probe_set().await;
    }

    /// Refreshes the plugin's fallback cache, only while our view is current (the xDS
    /// stream is up): cut off from the control plane, we let it go stale.
    fn write_cache(&self, pods: &BTreeMap<String, PodRecord>) {
        if !self.xds_connected.load(Ordering::Relaxed) || !self.ready() {
            return;
        }
        let cache = crate::cache::NodeCache {
            version: crate::cache::VERSION,
            written_at_ms: crate::cache::now_ms(),
            pods: pods
                .iter()
                .filter_map(|(k, r)| {
                    let v = r.view.as_ref()?;
                    Some((
                        k.clone(),
                        crate::cache::CachedPod {
                            uid: v.uid.clone(),
                            enrolled: v.enrolled,
                        },
                    ))
                })
                .collect(),
        };
        if let Err(e) = crate::cache::write(&self.cache_file, &cache) {
            tracing::warn!(error = %e, "cannot write the plugin's cache of this node's pods");
        }
    }

    /// Brings one pod's actual state to its desired state: carries out `plan`'s actions
    /// on the pod's namespace and returns the ZDS messages, to be sent once the pods
    /// lock is released (`defer`).
    fn reconcile(
        &self,
        pods: &mut BTreeMap<String, PodRecord>,
        name: &str,
        scan: &mut Option<Discovery>,
    ) -> Vec<Deferred> {
        let Some(rec) = pods.get(name) else {
            return vec![];
        };
        let want = rec.view.as_ref().is_some_and(|v| v.enrolled);
        if want && rec.netns.is_none() {
            let found = self.discover(pods, name, scan);
            let rec = pods.get_mut(name).expect("present");
            match found {
                Ok(ns) => {
                    rec.refused = None;
                    if ns.is_some() {
                        rec.container_id = None;
                    }
                    rec.netns = ns;
                }
                Err(r) => rec.refused = Some(r),
            }
        }
        let Some(rec) = pods.get_mut(name) else {
            return vec![];
        };
        let inode = rec.netns.as_ref().map(|n| n.inode);
        let options_changed = match (&rec.view, &rec.programmed_with) {
            (Some(v), Some(o)) => self.rule_options(v) != *o,
            _ => false,
        };
        let now = Now {
            want,
            programmed: rec.programmed,
            inode,
            // Acked by an older ztunnel, but the newest one lacks it (refused in its
            // snapshot, or sent as Keep): its Add is sent again.
            acked: (rec.acked
                && !rec
                    .view
                    .as_ref()
                    .is_some_and(|v| self.zds.missing(&uid_of(v)))),
            add_queued: rec.programmed.is_some() && rec.add_queued == Some(rec.generation),
            installed: rec.installed,
            options_changed,
        };
        match step(now) {
            Step::Reenroll => tracing::info!(
                pod = name,
                "pod sandbox or capture options changed; re-enrolling"
            ),
            Step::WaitForNetns => tracing::debug!(
                pod = name,
                "enrolled, but its network namespace is not known yet"
            ),
            _ => {}
        }
        let mut deferred = Vec::new();
        for action in plan(now) {
            match action {
                Action::Program => {
                    if !self.enroll(name, rec) {
                        break; // Not programmed: nothing to hand to ztunnel.
                    }
                }
                Action::Unprogram => self.unenroll(name, rec),
                Action::ZdsAdd => {
                    if let (Some(v), Some(_), Some(_)) = (&rec.view, &rec.netns, rec.programmed) {
                        rec.add_queued = Some(rec.generation);
                        deferred.push(Deferred::Add {
                            pod: name.to_string(),
                            uid: uid_of(v),
                            generation: rec.generation,
                        });
                    }
                }
                Action::ZdsDel => deferred.push(Deferred::Del {
                    uid: rec
                        .view
                        .as_ref()
                        .map(uid_of)
                        .unwrap_or_else(|| name.to_string()),
                }),
            }
        }
        if release_netns(rec.view.is_some(), rec.programmed, rec.installed) {
            rec.netns = None;
            rec.container_id = None;
        }
        deferred
    }

    /// What a read-back of a pod needs, copied out so it runs without the pods lock:
    /// `None` unless the pod is enrolled and programmed for its current namespace.
    fn read_back_job(&self, rec: &PodRecord) -> Option<ReadBackJob> {
        let (Some(v), Some(ns)) = (&rec.view, &rec.netns) else {
            return None;
        };
        if !(v.enrolled && rec.programmed_here()) {
            return None;
        }
        Some(ReadBackJob {
            netns: ns.try_clone().ok()?,
            opts: rec.programmed_with.clone()?,
        })
    }

    /// Records a read-back, unless the pod was re-programmed (or left) meanwhile.
    fn record_read_back(
        &self,
        name: &str,
        rec: &mut PodRecord,
        job: &ReadBackJob,
        now: Result<Vec<enrolment::Chain>, String>,
    ) {
        if self.read_back_job(rec).as_ref() != Some(job) {
            return;
        }
        // The first good read-back after programming is the baseline; later ones must
        // equal it exactly.
        let now = now.and_then(|found| match &rec.baseline {
            Some(b) => enrolment::compare_baseline(b, &found),
            None => {
                rec.baseline = Some(found);
                Ok(())
            }
        });
        if let Err(e) = &now
            && rec.read_back.as_ref().is_none_or(|r| r.is_ok())
        {
            tracing::error!(pod = name, netns = %job.netns.path, "the pod's redirection differs from the plan: {e}; the pod is flagged failed and its guard refuses new connections that would go around ztunnel");
        }
        rec.read_back = Some(now);
    }

    /// Reads back every enrolled pod's rules (they are confirmed only while what is
    /// there is what was planned), with the pods lock released while nft and ip run.
    async fn read_back_all(&self) {
        let jobs: Vec<(String, ReadBackJob)> = {
            let pods = self.pods.lock().await;
            pods.iter()
                .filter_map(|(k, r)| Some((k.clone(), self.read_back_job(r)?)))
                .collect()
        };
        let results = tokio::task::block_in_place(|| {
            jobs.into_iter()
                .map(|(k, job)| {
                    let now = read_back(&job.netns, &job.opts);
                    (k, job, now)
                })
                .collect::<Vec<_>>()
        });
        let mut pods = self.pods.lock().await;
        for (k, job, now) in results {
            if let Some(rec) = pods.get_mut(&k) {
                self.record_read_back(&k, rec, &job, now);
            }
        }
    }

    fn rule_options(&self, v: &NodePod) -> PodRuleOptions {
        PodRuleOptions {
            dns_capture: v.dns_capture.unwrap_or(self.cfg.dns_capture),
            bypass_inbound: v.bypass_inbound_capture,
            reroute_interfaces: vec![],
        }
    }

    /// Each enrolled pod's enrolment state, for the agent's `/enrolment` endpoint.
    pub async fn enrolment(&self) -> EnrolmentReport {
        let pods = self.pods.lock().await;
        EnrolmentReport {
            node: self.cfg.node_name.clone(),
            ready: self.ready(),
            pods: enrolment_of(&pods, self.zds.connected() > 0),
        }
    }

    fn record_enrolment(&self, pods: &BTreeMap<String, PodRecord>) {
        let list = enrolment_of(pods, self.zds.connected() > 0);
        let count = |s: enrolment::State| list.iter().filter(|p| p.state == s).count() as u64;
        for s in enrolment::State::ALL {
            self.metrics.set_enrolment(s.label(), count(s));
        }
    }

    /// Programs the pod's rules; whether they are in place (then it goes to ztunnel).
    fn enroll(&self, name: &str, rec: &mut PodRecord) -> bool {
        let (Some(v), Some(ns)) = (&rec.view, &rec.netns) else {
            return false;
        };
        let opts = self.rule_options(v);
        rec.installed = true;
        if let Err(e) = program(ns, &opts) {
            tracing::error!(pod = name, error = %e, "cannot program the pod's redirection");
            rec.apply_error = Some(e);
            return false;
        }
        rec.apply_error = None;
        // For ztunnel upgrades; without it only a connection arriving as the old
        // ztunnel's listener closes can be reset.
        if let Err(e) = ns.enable_migrate_req() {
            tracing::warn!(pod = name, error = %e, "cannot set net.ipv4.tcp_migrate_req");
        }
        rec.read_back = None;
        rec.programmed = Some(ns.inode);
        rec.generation = self.generations.fetch_add(1, Ordering::Relaxed) + 1;
        rec.programmed_with = Some(opts);
        rec.baseline = None;
        rec.acked = false;
        tracing::info!(pod = name, netns = %ns.path, "pod enrolled: redirection programmed; handing it to ztunnel");
        true
    }

    fn unenroll(&self, name: &str, rec: &mut PodRecord) {
        match rec.netns.as_ref().map(unprogram) {
            Some(Err(e)) => {
                // Kept as installed: the next pass tries again.
                tracing::warn!(pod = name, error = %e, "cannot remove the pod's redirection and guard; retrying");
            }
            // Removed, or no namespace left to remove anything from.
            _ => rec.installed = false,
        }
        rec.programmed = None;
        rec.programmed_with = None;
        rec.baseline = None;
        rec.acked = false;
        rec.read_back = None;
        rec.apply_error = None;
        tracing::info!(pod = name, "pod removed from the mesh");
    }

    /// Finds a running pod's network namespace the way the kubelet knows it: the
    /// processes in the pod's cgroup (its UID), their namespace, then the pod's IP on it.
    /// `Err` when a namespace was refused (reported loudly here, once per refusal).
    fn discover(
        &self,
        pods: &BTreeMap<String, PodRecord>,
        name: &str,
        scan: &mut Option<Discovery>,
    ) -> Result<Option<Netns>, Refusal> {
        let rec = &pods[name];
        let Some(proc_dir) = &self.cfg.proc_dir else {
            return Ok(None);
        };
        let Some(uid) = rec
            .view
            .as_ref()
            .map(|v| v.uid.clone())
            .filter(|u| !u.is_empty())
        else {
            tracing::debug!(pod = name, "no pod UID yet: its processes cannot be found");
            return Ok(None);
        };
        let own = Netns::open("/proc/self/ns/net")
            .map(|n| n.inode)
            .unwrap_or(0);
        let scan = scan.get_or_insert_with(|| Discovery {
            index: cgroup::scan(proc_dir, &self.cfg.cgroup_root, own),
            addresses: HashMap::new(),
        });
        let owners: HashMap<String, String> = pods
            .iter()
            .filter(|(k, _)| k.as_str() != name)
            .flat_map(|(k, r)| r.ips().into_iter().map(move |ip| (ip, k.clone())))
            .collect();
        let own_ips = rec.ips();
        let cache = &mut scan.addresses;
        let lookup = cgroup::decide(
            &uid,
            &own_ips,
            &scan.index,
            &|ip| owners.get(ip).cloned(),
            &mut |inode, path| {
                cache
                    .entry(inode)
                    .or_insert_with(|| {
                        let ns = Netns::open(&path.to_string_lossy())?;
                        if ns.inode != inode {
                            return Err("the process is gone".to_string());
                        }
                        ns.addresses()
                    })
                    .clone()
            },
        );
        match lookup {
            Lookup::Found(inode, path) => match Netns::open(&path.to_string_lossy()) {
                Ok(ns) if ns.inode == inode => {
                    tracing::info!(pod = name, netns = %ns.path, inode, "found a running pod's network namespace by its cgroup and IP");
                    Ok(Some(ns))
                }
                _ => Ok(None),
            },
            Lookup::NotFound(why) => {
                tracing::debug!(pod = name, "network namespace not found: {why}");
                Ok(None)
            }
            Lookup::Refused(r, why) => {
                if rec.refused != Some(r) {
                    self.metrics.inc_netns_refused(r);
                    tracing::error!(
                        pod = name,
                        pod_uid = %uid,
                        reason = r.label(),
                        "REFUSED to bind a network namespace to this pod: {why}; the pod is not handed to ztunnel (its traffic stays refused) until this is resolved"
                    );
                }
                Err(r)
            }
        }
    }

    /// Handles one plugin request.
    pub async fn handle(self: &Arc<Self>, req: AgentRequest) -> AgentReply {
        match req {
            AgentRequest::Add {
                namespace,
                name,
                netns,
                ips,
                container_id,
                ..
            } => {
                let k = key(&namespace, &name);
                // Off the runtime's workers: the path is the runtime's, not ours.
                let path = netns.clone();
                let ns = match tokio::task::spawn_blocking(move || Netns::open(&path)).await {
                    Ok(Ok(n)) => n,
                    Ok(Err(message)) => return AgentReply::Error { message },
                    Err(e) => {
                        return AgentReply::Error {
                            message: format!("opening {netns}: {e}"),
                        };
                    }
                };
                let deadline = Instant::now() + UNKNOWN_POD_WAIT;
                loop {
                    {
                        let mut pods = self.pods.lock().await;
                        let rec = pods.entry(k.clone()).or_default();
                        rec.plugin_ips = ips.clone();
                        // The runtime's own word for the sandbox's namespace.
                        match ns.try_clone() {
                            Ok(n) => {
                                rec.netns = Some(n);
                                rec.container_id = sandbox_id(&container_id);
                                rec.refused = None;
                            }
                            Err(message) => return AgentReply::Error { message },
                        }
                        if let Some(v) = &rec.view {
                            if !v.enrolled {
                                return AgentReply::Ok { enrolled: false };
                            }
                            let deferred = tokio::task::block_in_place(|| {
                                let deferred = self.reconcile(&mut pods, &k, &mut None);
                                // One pod, right after programming it: read back here.
                                if let Some(rec) = pods.get_mut(&k)
                                    && let Some(job) = self.read_back_job(rec)
                                {
                                    let now = read_back(&job.netns, &job.opts);
                                    self.record_read_back(&k, rec, &job, now);
                                }
                                deferred
                            });
                            let rec = pods.get(&k);
                            let programmed = rec.and_then(|r| r.programmed);
                            // The pod starts only once its rules were read back as planned.
                            let read_back = rec.and_then(|r| r.read_back.clone());
                            self.record_enrolment(&pods);
                            // The reply does not wait for ztunnel's ack (it never did
                            // depend on it): the pod's traffic is refused until then.
                            self.defer(&pods, deferred);
                            drop(pods);
                            self.sync_probe_set().await;
                            return match read_back {
                                Some(Ok(())) if programmed == Some(ns.inode) => {
                                    AgentReply::Ok { enrolled: true }
                                }
                                Some(Err(e)) => AgentReply::Error {
                                    message: format!(
                                        "the redirection of {k} could not be confirmed: {e}"
                                    ),
                                },
                                _ => AgentReply::Error {
                                    message: format!(
                                        "could not program the redirection of {k}; see the node agent's log"
                                    ),
                                },
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
                namespace,
                name,
                container_id,
                netns,
                ..
            } => {
                let k = key(&namespace, &name);
                // Off the runtime's workers: the path is the runtime's, not ours.
                let del_netns = match Some(netns).filter(|n| !n.is_empty()) {
                    Some(n) => tokio::task::spawn_blocking(move || Netns::open(&n))
                        .await
                        .ok()
                        .and_then(Result::ok)
                        .map(|n| n.id()),
                    None => None,
                };
                let mut pods = self.pods.lock().await;
                let mut deferred = Vec::new();
                if let Some(rec) = pods.get_mut(&k) {
                    let facts = DelFacts {
                        enrolled: rec.enrolled(),
                        known: rec.container_id.as_deref(),
                        current: rec.netns.as_ref().map(Netns::id),
                        del_container: &container_id,
                        del_netns,
                    };
                    if !del_is_current(facts) {
                        tracing::info!(
                            pod = k,
                            container_id,
                            "DEL for a sandbox that is not known to be the pod's current one (a lost or replaced sandbox, or the agent restarted since ADD): the current sandbox keeps its redirection until the pod leaves the mesh"
                        );
                        return AgentReply::Ok {
                            enrolled: rec.enrolled(),
                        };
                    }
                    if rec.programmed.is_some() || rec.installed {
                        tokio::task::block_in_place(|| self.unenroll(&k, rec));
                        deferred.push(Deferred::Del {
                            uid: rec.view.as_ref().map(uid_of).unwrap_or_else(|| k.clone()),
                        });
                    }
                    rec.netns = None;
                    rec.container_id = None;
                }
                pods.retain(|_, r| r.keep());
                self.record_enrolment(&pods);
                self.defer(&pods, deferred);
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
                let opts = self
                    .pods
                    .lock()
                    .await
                    .get(&k)
                    .and_then(|r| r.view.as_ref())
                    .filter(|v| v.enrolled)
                    .map(|v| self.rule_options(v));
                let Some(opts) = opts else {
                    return AgentReply::Ok { enrolled: false };
                };
                // The same read-back as the agent's own: CHECK fails on any difference.
                match Netns::open(&netns)
                    .and_then(|n| tokio::task::block_in_place(|| read_back(&n, &opts)))
                {
                    Ok(_) => AgentReply::Ok { enrolled: true },
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
            let deferred = tokio::task::block_in_place(|| {
                let mut scan = None;
                let mut deferred = Vec::new();
                for n in names {
                    deferred.extend(self.reconcile(&mut pods, &n, &mut scan));
                }
                deferred
            });
            self.defer(&pods, deferred);
            drop(pods);
            self.read_back_all().await;
            let mut pods = self.pods.lock().await;
            pods.retain(|_, r| r.keep());
            self.record_enrolment(&pods);
            self.write_cache(&pods);
            drop(pods);
            self.sync_probe_set().await;
        }
    }

    /// Serves plugin requests on the agent socket: 0600 in a 0700 directory, each peer
    /// checked with SO_PEERCRED, one task per connection (at most
    /// MAX_PLUGIN_CONNECTIONS), the request line bounded in size and time.
    pub async fn serve_plugin(self: Arc<Self>) -> Result<(), String> {
        let listener = self.bind_plugin_socket()?;
        self.serve_plugin_on(listener).await
    }

    /// The plugin socket, private to the expected peer (inside a tokio runtime).
    pub fn bind_plugin_socket(&self) -> Result<tokio::net::UnixListener, String> {
        local::bind_stream(&self.cfg.agent_socket, self.cfg.plugin_peer.uid)
    }

    /// Serves plugin requests on `listener` (from `bind_plugin_socket`).
    pub async fn serve_plugin_on(
        self: Arc<Self>,
        listener: tokio::net::UnixListener,
    ) -> Result<(), String> {
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_PLUGIN_CONNECTIONS));
        let mut busy_since: Option<Instant> = None;
        loop {
            let stream = match listener.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "plugin socket accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let peer = stream
                .peer_cred()
                .map_err(|e| format!("SO_PEERCRED: {e}"))
                .map(|c| local::Peer {
                    pid: c.pid().unwrap_or(0),
                    uid: c.uid(),
                    gid: c.gid(),
                });
            if let Err(e) = peer.and_then(|p| self.cfg.plugin_peer.check(&p)) {
                self.metrics.inc_peer_refused("agent");
                tracing::warn!(error = %e, "plugin connection refused");
                continue;
            }
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                self.metrics.inc_request_refused("agent", "busy");
                // Said once per busy spell, not once per connection.
                if busy_since.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                    busy_since = Some(Instant::now());
                    tracing::warn!(
                        limit = MAX_PLUGIN_CONNECTIONS,
                        "plugin connections at their limit: closing new ones (ADD fails closed and the runtime retries)"
                    );
                }
                continue;
            };
            let agent = self.clone();
            tokio::spawn(async move {
                let _permit = permit;
                agent.serve_one(stream).await
            });
        }
    }

    async fn serve_one(self: &Arc<Self>, stream: tokio::net::UnixStream) {
        let (r, mut w) = stream.into_split();
        let mut r = BufReader::with_capacity(8192, r);
        let read = tokio::time::timeout(
            local::READ_TIMEOUT,
            local::read_line_bounded(&mut r, local::MAX_LINE),
        )
        .await;
        let reply = match read {
            Err(_) => {
                self.metrics.inc_request_refused("agent", "timeout");
                tracing::debug!("plugin connection sent no request in time; closed");
                return;
            }
            Ok(Err(LineError::TooLong)) => {
                self.metrics.inc_request_refused("agent", "too_long");
                tracing::warn!(limit = local::MAX_LINE, "plugin request too long; refused");
                AgentReply::Error {
                    message: format!("request longer than {} bytes", local::MAX_LINE),
                }
            }
            Ok(Err(LineError::Closed | LineError::Io(_))) => return,
            Ok(Ok(line)) => match serde_json::from_slice::<AgentRequest>(&line) {
                Ok(req) => self.handle(req).await,
                Err(e) => AgentReply::Error {
                    message: format!("malformed request: {e}"),
                },
            },
        };
        let mut out = serde_json::to_string(&reply).unwrap_or_default();
        out.push('\n');
        let _ = tokio::time::timeout(local::READ_TIMEOUT, w.write_all(out.as_bytes())).await;
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

/// The agent's `/enrolment` answer.
#[derive(Clone, Debug, serde::Serialize)]
pub struct EnrolmentReport {
    pub node: String,
    /// The control plane's view has arrived (until then the pod list means nothing).
    pub ready: bool,
    pub pods: Vec<PodEnrolment>,
}

/// One enrolled pod's enrolment, as the agent's `/enrolment` endpoint reports it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct PodEnrolment {
    /// namespace/name
    pub pod: String,
    pub uid: String,
    pub state: enrolment::State,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

fn enrolment_of(pods: &BTreeMap<String, PodRecord>, ztunnel_up: bool) -> Vec<PodEnrolment> {
    pods.iter()
        .filter(|(_, r)| r.enrolled())
        .map(|(k, r)| {
            let (state, reason) = r.enrolment(ztunnel_up);
            PodEnrolment {
                pod: k.clone(),
                uid: r.view.as_ref().map(|v| v.uid.clone()).unwrap_or_default(),
                state,
                reason,
            }
        })
        .collect()
}

/// Programs a pod's namespace: the guard first (from then on the pod cannot open a
/// connection that leaves it in plaintext, whatever happens to the capture rules), then
/// the redirection.
pub fn program(ns: &Netns, opts: &PodRuleOptions) -> Result<(), String> {
    ns.run(&["nft", "-f", "-"], Some(&nft_script(opts)))?;
    redirect::apply_routes(ns)
}

/// The guard and the capture tables, applied in one transaction: no moment where one is
/// there without the other.
pub fn nft_script(opts: &PodRuleOptions) -> String {
    format!(
        "{}{}",
        guard::table(opts.bypass_inbound),
        crate::rules::pod_ruleset(opts)
    )
}

/// Removes the guard and the capture tables in one transaction (the guard alone would
/// refuse new connections; the capture alone would leave them in plaintext), then the
/// policy routing.
pub fn unprogram(ns: &Netns) -> Result<(), String> {
    ns.run(
        &["nft", "-f", "-"],
        Some(&format!(
            "{}{}",
            crate::rules::pod_ruleset_removal(),
            guard::removal()
        )),
    )?;
    redirect::remove_routes(ns);
    Ok(())
}

/// Reads the pod's rules back (`nft -j list ruleset inet` and `ip rule`/`ip route`, in
/// its namespace) and compares them with the plan for `opts`; `Ok` has the chains read
/// (to keep as, or compare with, the baseline).
pub fn read_back(ns: &Netns, opts: &PodRuleOptions) -> Result<Vec<enrolment::Chain>, String> {
    let plan = enrolment::planned(&nft_script(opts));
    let mut tables = crate::rules::TABLES.to_vec();
    tables.push(guard::TABLE);
    let found = enrolment::read_back(
        &ns.run(&["nft", "-j", "list", "ruleset", "inet"], None)?,
        &tables,
    )?;
    enrolment::compare(&plan, &found)?;
    for family in redirect::families(ns) {
        let name = family.name();
        if !enrolment::policy_route_present(&ns.run(&["ip", family.flag(), "rule", "show"], None)?)
        {
            return Err(format!(
                "the {name} policy rule (pref 32764 fwmark 0x111/0xfff lookup 100) is missing"
            ));
        }
        if !enrolment::local_route_present(&ns.run(
            &["ip", family.flag(), "route", "show", "table", "100"],
            None,
        )?) {
            return Err(format!(
                "the {name} local default route of table 100 is missing"
            ));
        }
    }
    Ok(found)
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
    /// The agent's `xds_connected`.
    pub connected: Arc<AtomicBool>,
}

impl mesh_xds::Handler for ViewHandler {
    fn connection(&mut self, up: bool) {
        self.connected.store(up, Ordering::Relaxed);
    }

    fn apply(&mut self, resp: &DeltaDiscoveryResponse) -> Vec<(String, String)> {
        let mut updates = Vec::new();
        let errors = VIEW_TYPES.apply(&mut updates, resp);
        let _ = self.tx.send(updates);
        errors
    }
}

/// Changes to the node's pod view from one response: a pod by name, `None` once removed.
type ViewUpdates = Vec<(String, Option<NodePod>)>;

/// The one type the agent subscribes to, dispatched like every client's.
static VIEW_TYPES: std::sync::LazyLock<mesh_xds::Registry<ViewUpdates>> =
    std::sync::LazyLock::new(|| {
        mesh_xds::Registry::new().with(
            mesh_proto::type_url::NODE_POD,
            |updates, name, body| {
                let pod =
                    NodePod::decode(body).map_err(|e| format!("cannot decode NodePod: {e}"))?;
                updates.push((name.to_string(), Some(pod)));
                Ok(())
            },
            |updates, name| updates.push((name.to_string(), None)),
        )
    });

/// The types the agent subscribes to.
pub fn view_types() -> Vec<&'static str> {
    VIEW_TYPES.types()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_view_handler_passes_pods_and_removals_and_nacks_what_it_cannot_read() {
        use mesh_proto::discovery::Resource;
        let res = |name: &str, body: Option<Vec<u8>>| Resource {
            name: name.into(),
            resource: body.map(|value| mesh_proto::prost_types::Any {
                type_url: mesh_proto::type_url::NODE_POD.into(),
                value,
            }),
            ..Default::default()
        };
        let pod = NodePod {
            uid: "u1".into(),
            name: "client".into(),
            namespace: "front".into(),
            ..Default::default()
        };
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut h = ViewHandler {
            tx,
            connected: Arc::new(AtomicBool::new(false)),
        };
        let nacked = mesh_xds::Handler::apply(
            &mut h,
            &DeltaDiscoveryResponse {
                type_url: mesh_proto::type_url::NODE_POD.into(),
                resources: vec![
                    res("front/client", Some(pod.encode_to_vec())),
                    res("front/garbled", Some(vec![0xff, 0xff])),
                    res("front/empty", None),
                ],
                removed_resources: vec!["front/gone".into()],
                ..Default::default()
            },
        );
        let names: Vec<&str> = nacked.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["front/garbled", "front/empty"]);
        assert_eq!(
            rx.try_recv().unwrap(),
            vec![
                ("front/client".to_string(), Some(pod)),
                ("front/gone".to_string(), None)
            ]
        );
        assert_eq!(view_types(), [mesh_proto::type_url::NODE_POD]);
    }

    #[test]
    fn enrolment_is_served_to_loopback_peers_only() {
        for ok in ["127.0.0.1", "127.1.2.3", "::1", "::ffff:127.0.0.1"] {
            assert!(may_read_enrolment(ok.parse().unwrap()), "{ok}");
        }
        for no in ["10.0.0.5", "0.0.0.0", "::ffff:10.0.0.5", "fd00::1", "::"] {
            assert!(!may_read_enrolment(no.parse().unwrap()), "{no}");
        }
    }

    #[test]
    fn an_ack_counts_only_while_a_ztunnel_is_connected() {
        let rec = PodRecord {
            view: Some(NodePod {
                enrolled: true,
                ..Default::default()
            }),
            netns: Some(Netns::open("/proc/self/ns/net").unwrap()),
            acked: true,
            read_back: Some(Ok(())),
            ..Default::default()
        };
        let rec = PodRecord {
            programmed: rec.netns.as_ref().map(|n| n.inode),
            ..rec
        };
        assert_eq!(rec.enrolment(true).0, enrolment::State::Confirmed);
        let (state, reason) = rec.enrolment(false);
        assert_eq!(state, enrolment::State::Pending);
        assert!(reason.unwrap().contains("ztunnel has not acknowledged"));
    }

    #[test]
    fn only_a_del_for_the_current_sandbox_removes_its_redirection() {
        let ns = |inode| Some(NsId { dev: 4, inode });
        let f = DelFacts {
            enrolled: true,
            known: Some("c2"),
            current: ns(7),
            del_container: "c2",
            del_netns: None,
        };
        // ADD gave the namespace with container c2: its own DEL counts, c1's does not.
        assert!(del_is_current(f));
        assert!(del_is_current(DelFacts {
            del_netns: ns(7),
            ..f
        }));
        assert!(!del_is_current(DelFacts {
            del_container: "c1",
            ..f
        }));
        assert!(!del_is_current(DelFacts {
            del_container: "c1",
            del_netns: ns(9),
            ..f
        }));
        // The right container ID, but naming another live namespace: not this sandbox.
        assert!(!del_is_current(DelFacts {
            del_netns: ns(9),
            ..f
        }));
        // Same inode on another device is another file.
        assert!(!del_is_current(DelFacts {
            del_netns: Some(NsId { dev: 5, inode: 7 }),
            ..f
        }));
        // An empty ID at ADD is stored as none: an empty DEL ID matches nothing.
        assert_eq!(sandbox_id(""), None);
        assert_eq!(sandbox_id("c2").as_deref(), Some("c2"));
        assert!(!del_is_current(DelFacts {
            known: sandbox_id("").as_deref(),
            del_container: "",
            ..f
        }));
        // Found by cgroup (no container ID known): even a DEL naming the current
        // namespace may be a late one for a lost sandbox at a reused path.
        for del_netns in [ns(7), ns(9), None] {
            assert!(!del_is_current(DelFacts {
                known: None,
                del_netns,
                ..f
            }));
        }
        // Deleted or not enrolled: nothing to protect, the DEL lets the record go.
        assert!(del_is_current(DelFacts {
            enrolled: false,
            known: None,
            del_container: "c1",
            ..f
        }));
        // No namespace known: nothing to keep.
        assert!(del_is_current(DelFacts {
            current: None,
            del_container: "c1",
            ..f
        }));
    }

    #[test]
    fn a_deleted_pods_namespace_is_released_once_nothing_is_left_in_it() {
        assert!(release_netns(false, None, false));
        // Rules still to remove (a removal that failed is retried with the handle).
        assert!(!release_netns(false, Some(7), false));
        assert!(!release_netns(false, None, true));
        // Still in the view (enrolled or not): the runtime's namespace is kept.
        assert!(!release_netns(true, None, false));
    }

    #[test]
    fn reconcile_plans_rules_first_and_zds_after() {
        let on = Now {
            want: true,
            programmed: Some(7),
            inode: Some(7),
            acked: true,
            add_queued: false,
            installed: true,
            options_changed: false,
        };
        use Action::*;
        assert_eq!(plan(on), vec![]);
        assert_eq!(
            plan(Now {
                programmed: None,
                ..on
            }),
            vec![Program, ZdsAdd]
        );
        assert_eq!(
            plan(Now {
                inode: Some(8),
                ..on
            }),
            vec![Program, ZdsAdd]
        );
        assert_eq!(plan(Now { acked: false, ..on }), vec![ZdsAdd]);
        assert_eq!(plan(Now { want: false, ..on }), vec![Unprogram, ZdsDel]);
        assert_eq!(
            plan(Now {
                programmed: None,
                inode: None,
                ..on
            }),
            vec![]
        );
    }

    #[test]
    fn an_ack_completes_only_the_enrolment_its_add_was_queued_for() {
        let mut rec = PodRecord {
            programmed: Some(7),
            generation: 1,
            ..Default::default()
        };
        assert!(rec.completed_by(1));
        // Re-enrolled on the same namespace (its capture options changed).
        rec.generation = 2;
        assert!(!rec.completed_by(1));
        assert!(rec.completed_by(2));
        rec.programmed = None;
        assert!(!rec.completed_by(2));
    }

    #[test]
    fn reconcile_steps() {
        let on = Now {
            want: true,
            programmed: Some(7),
            inode: Some(7),
            acked: true,
            add_queued: false,
            installed: true,
            options_changed: false,
        };
        assert_eq!(step(on), Step::Nothing);
        assert_eq!(step(Now { acked: false, ..on }), Step::HandOver);
        // Its Add still waits behind a slow ztunnel: not queued twice.
        assert_eq!(
            step(Now {
                acked: false,
                add_queued: true,
                ..on
            }),
            Step::Nothing
        );
        assert_eq!(
            step(Now {
                inode: Some(8),
                ..on
            }),
            Step::Reenroll
        );
        // Options changed (DNS capture, inbound bypass): programmed again.
        assert_eq!(
            step(Now {
                options_changed: true,
                ..on
            }),
            Step::Reenroll
        );
        assert_eq!(
            step(Now {
                programmed: None,
                ..on
            }),
            Step::Enroll
        );
        assert_eq!(
            step(Now {
                programmed: None,
                inode: None,
                ..on
            }),
            Step::WaitForNetns
        );
        assert_eq!(step(Now { want: false, ..on }), Step::Unenroll);
        // A program that failed half-way (guard in, nothing recorded as programmed), or
        // a removal that failed: whatever is left is removed once the pod leaves.
        assert_eq!(
            step(Now {
                want: false,
                programmed: None,
                ..on
            }),
            Step::Unenroll
        );
        assert_eq!(
            step(Now {
                want: false,
                programmed: None,
                installed: false,
                ..on
            }),
            Step::Nothing
        );
    }
}
