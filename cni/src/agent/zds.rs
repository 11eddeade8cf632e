//! ZDS server: hands enrolled pods' network namespaces to ztunnel over a unix
//! SOCK_SEQPACKET socket (the fd in SCM_RIGHTS), wire-compatible with Istio's node agent.
//! Per connection: hello, snapshot (Add with fd, or Keep), SnapshotSent, then incremental
//! messages, each acked within 5 s. New Adds go only to the newest ztunnel (upgrades run
//! two side by side); Dels go to all. A connection is registered under the agent's pod
//! lock as its snapshot is taken, so every Add and Del made while it receives that
//! snapshot is queued for it behind the snapshot (Istio's order). A ztunnel whose hello
//! lists `handover.v1` is sent a Handover once a newer one has every pod, and no Add
//! after that (see `zds_route`).
//!
//! The socket is 0600 in a 0700 directory and each peer is checked with SO_PEERCRED
//! before a byte is read. Everything runs on tokio: one task per connection, every wait
//! bounded, every message at most 1024 bytes (longer is a protocol error, never a bigger
//! buffer).

use super::local::{self, Peer, PeerPolicy};
use super::metrics::Metrics;
use super::zds_route::{self, ConnView, Sent};
use mesh_proto::zds;
use mesh_proto::zds::ZdsError;
use mesh_proto::zds::socket::{PeerStirred, SeqPacket, ServerConn};
use nix::sys::socket::{self, AddressFamily, Backlog, SockFlag, SockType, UnixAddr};
use std::collections::HashSet;
use std::fs::File;
use std::future::Future;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;

const ACK_TIMEOUT: Duration = Duration::from_secs(5);
/// A connected peer must say hello within this.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections being served at once (ztunnels are one or two per node).
const MAX_CONNECTIONS: usize = 8;

/// A pod as handed to ztunnel.
pub struct PodEntry {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    /// `None` sends Keep (in a snapshot): the pod exists but its netns is not open.
    pub netns: Option<File>,
}

/// One request for a connection's task, answered on `done` (`None`: queued behind a
/// snapshot, nobody waits; a failure is logged and leaves the pod missing there).
struct Job {
    req: zds::WorkloadRequest,
    fd: Option<File>,
    done: Option<std::sync::mpsc::SyncSender<Result<(), String>>>,
}

#[derive(Clone)]
struct Handle {
    id: u64,
    /// The ztunnel process's start time, which orders connections (`zds_route`).
    started: Option<u64>,
    tx: mpsc::UnboundedSender<Job>,
    alive: Arc<AtomicBool>,
    /// Its snapshot was sent and acked (and what was queued meanwhile).
    serving: Arc<AtomicBool>,
    /// Its hello listed `handover.v1`.
    handover_capable: bool,
    /// A Handover was sent (set before sending, so no Add races it).
    handed_over: Arc<AtomicBool>,
    /// Pods it has no proxy for (refused, or a Keep in its snapshot): while any, it takes
    /// over from nobody, and the agent retries their Adds.
    missing: Arc<Mutex<HashSet<String>>>,
}

impl Handle {
    /// Blocking: sends one request through the connection's task and waits for the ack.
    /// Called from blocking code (the agent's reconcile runs in `block_in_place`).
    fn call(&self, req: zds::WorkloadRequest, fd: Option<File>) -> Result<(), String> {
        let (done, wait) = std::sync::mpsc::sync_channel(1);
        self.tx
            .send(Job {
                req,
                fd,
                done: Some(done),
            })
            .map_err(|_| "ztunnel disconnected".to_string())?;
        wait.recv_timeout(ACK_TIMEOUT + Duration::from_secs(1))
            .map_err(|_| "timed out waiting for ztunnel".to_string())?
    }

    /// Queues a request behind the connection's snapshot, without waiting.
    fn enqueue(&self, req: zds::WorkloadRequest, fd: Option<File>) {
        let _ = self.tx.send(Job {
            req,
            fd,
            done: None,
        });
    }

    fn view(&self) -> ConnView {
        ConnView {
            id: self.id,
            started: self.started,
            serving: self.serving.load(Ordering::Relaxed),
            handover_capable: self.handover_capable,
            handed_over: self.handed_over.load(Ordering::Relaxed),
        }
    }

    fn missing(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.missing.lock().expect("missing lock")
    }

    /// Sends a Handover without waiting; the ack is logged when it comes.
    fn hand_over(&self) {
        let (done, wait) = std::sync::mpsc::sync_channel(1);
        let req = zds::WorkloadRequest {
            payload: Some(zds::workload_request::Payload::Handover(zds::Handover {})),
        };
        if self
            .tx
            .send(Job {
                req,
                fd: None,
                done: Some(done),
            })
            .is_err()
        {
            return; // Disconnected meanwhile: nothing to hand over.
        }
        let id = self.id;
        tokio::task::spawn_blocking(move || {
            match wait.recv_timeout(ACK_TIMEOUT + Duration::from_secs(1)) {
                Ok(Ok(())) => tracing::info!(conn = id, "ztunnel acknowledged the handover"),
                Ok(Err(e)) => tracing::warn!(conn = id, error = %e, "handover not acknowledged"),
                Err(_) => tracing::warn!(conn = id, "handover not acknowledged in time"),
            }
        });
    }
}

fn add_request(p: &PodEntry) -> zds::WorkloadRequest {
    zds::WorkloadRequest {
        payload: Some(zds::workload_request::Payload::Add(zds::AddWorkload {
            uid: p.uid.clone(),
            workload_info: Some(zds::WorkloadInfo {
                name: p.name.clone(),
                namespace: p.namespace.clone(),
                service_account: p.service_account.clone(),
            }),
        })),
    }
}

/// Called by the snapshot while it holds the lock every Add and Del is made under, once
/// the list is taken: from then on the new connection queues them.
pub type Register = Box<dyn FnOnce() + Send>;

/// Lists the pods a newly connected ztunnel must receive (waits until that list is
/// complete), calling the `Register` under the same lock as it takes the list.
pub type Snapshot =
    Arc<dyn Fn(Register) -> Pin<Box<dyn Future<Output = Vec<PodEntry>> + Send>> + Send + Sync>;

/// What a message is, for the connection's missing pods.
fn sent(req: &zds::WorkloadRequest) -> Sent<'_> {
    use zds::workload_request::Payload;
    match &req.payload {
        Some(Payload::Add(a)) => Sent::Add(&a.uid),
        Some(Payload::Keep(k)) => Sent::Keep(&k.uid),
        Some(Payload::Del(d)) => Sent::Del(&d.uid),
        _ => Sent::Other,
    }
}

/// The start time of process `pid` (0: not visible from here).
fn process_start(pid: i32) -> Option<u64> {
    if pid <= 0 {
        return None;
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    zds_route::start_time(&stat)
}

#[derive(Clone)]
pub struct ZdsServer {
    conns: Arc<Mutex<Vec<Handle>>>,
    metrics: Arc<Metrics>,
}

/// The peer's credentials on a connected unix socket.
pub fn peer_of(fd: &OwnedFd) -> Result<Peer, String> {
    let c = socket::getsockopt(fd, socket::sockopt::PeerCredentials)
        .map_err(|e| format!("SO_PEERCRED: {e}"))?;
    Ok(Peer {
        pid: c.pid(),
        uid: c.uid(),
        gid: c.gid(),
    })
}

impl ZdsServer {
    /// Listens on `path` (replacing a stale socket; must run inside a tokio runtime).
    /// Only peers passing `policy` are served.
    pub fn start(
        path: &Path,
        policy: PeerPolicy,
        metrics: Arc<Metrics>,
        snapshot: Snapshot,
    ) -> Result<ZdsServer, String> {
        if let Some(dir) = path.parent() {
            local::private_dir(dir, policy.uid)?;
        }
        local::remove_stale(path)?;
        let fd = socket::socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )
        .map_err(|e| format!("socket: {e}"))?;
        let addr = UnixAddr::new(path).map_err(|e| format!("{}: {e}", path.display()))?;
        socket::bind(fd.as_raw_fd(), &addr).map_err(|e| format!("bind {}: {e}", path.display()))?;
        local::private_socket(path, policy.uid)?;
        socket::listen(&fd, Backlog::new(16).expect("valid backlog"))
            .map_err(|e| format!("listen: {e}"))?;
        let listener = register(fd).map_err(|e| format!("ZDS socket: {e}"))?;
        let server = ZdsServer {
            conns: Arc::default(),
            metrics: metrics.clone(),
        };
        server.update_census();
        let s = server.clone();
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        tokio::spawn(async move {
            let next = AtomicU64::new(1);
            loop {
                let accepted = match listener.readable().await {
                    Ok(mut guard) => match guard.try_io(|fd| {
                        socket::accept4(
                            fd.as_raw_fd(),
                            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
                        )
                        .map_err(io::Error::from)
                    }) {
                        Ok(r) => r,
                        Err(_would_block) => continue,
                    },
                    Err(e) => Err(e),
                };
                let raw = match accepted {
                    Ok(raw) => raw,
                    Err(e) => {
                        tracing::error!(error = %e, "ZDS accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                // SAFETY: accept4(2) just created `raw`; nothing else owns it, so taking
                // ownership closes it exactly once.
                #[allow(unsafe_code)]
                let owned = unsafe { OwnedFd::from_raw_fd(raw) };
                let id = next.fetch_add(1, Ordering::Relaxed);
                let peer = match peer_of(&owned).and_then(|p| policy.check(&p).map(|()| p)) {
                    Ok(p) => p,
                    Err(e) => {
                        metrics.inc_peer_refused("zds");
                        tracing::warn!(conn = id, error = %e, "ZDS connection refused: not the expected ztunnel");
                        continue;
                    }
                };
                let started = process_start(peer.pid);
                let Ok(permit) = slots.clone().try_acquire_owned() else {
                    metrics.inc_request_refused("zds", "busy");
                    tracing::warn!(
                        conn = id,
                        limit = MAX_CONNECTIONS,
                        "ZDS connection refused: too many connections at once"
                    );
                    continue;
                };
                let (s, snapshot) = (s.clone(), snapshot.clone());
                tokio::spawn(async move {
                    let _permit = permit;
                    s.serve(id, started, owned, snapshot).await
                });
            }
        });
        Ok(server)
    }

    async fn serve(&self, id: u64, started: Option<u64>, fd: OwnedFd, snapshot: Snapshot) {
        let conn = match SeqPacket::from_fd(fd) {
            Ok(sock) => ServerConn::new(sock),
            Err(e) => {
                tracing::warn!(conn = id, error = %e, "ZDS connection cannot be served");
                return;
            }
        };
        let (tx, mut rx) = mpsc::unbounded_channel::<Job>();
        let alive = Arc::new(AtomicBool::new(true));
        let result = self
            .handshake(id, started, &conn, tx, alive.clone(), &mut rx, snapshot)
            .await;
        if let Err(e) = &result {
            tracing::warn!(conn = id, error = %e, "ztunnel connection failed during the snapshot");
        }
        if let Ok(handle) = result {
            self.serve_requests(&conn, &handle, &mut rx).await;
        }
        alive.store(false, Ordering::Relaxed);
        self.conns
            .lock()
            .expect("conns lock")
            .retain(|c| c.id != id);
        self.update_census();
        rx.close();
        while let Ok(job) = rx.try_recv() {
            if let Some(done) = job.done {
                let _ = done.send(Err("ztunnel disconnected".into()));
            }
        }
        tracing::info!(conn = id, "ztunnel disconnected");
    }

    /// Hello, snapshot (the connection registered as it is taken), SnapshotSent, then what
    /// was queued meanwhile; then it serves, and takes over from older ztunnels if it has
    /// every pod.
    #[allow(clippy::too_many_arguments)]
    async fn handshake(
        &self,
        id: u64,
        started: Option<u64>,
        conn: &ServerConn,
        tx: mpsc::UnboundedSender<Job>,
        alive: Arc<AtomicBool>,
        rx: &mut mpsc::UnboundedReceiver<Job>,
        snapshot: Snapshot,
    ) -> Result<Handle, ZdsError> {
        let hello = conn.hello(HELLO_TIMEOUT).await?;
        let handover_capable = zds::offers_handover(&hello);
        let handle = Handle {
            id,
            started,
            tx,
            alive,
            serving: Arc::default(),
            handover_capable,
            handed_over: Arc::default(),
            missing: Arc::default(),
        };
        let conns = self.conns.clone();
        let pending = handle.clone();
        let pods = snapshot(Box::new(move || {
            conns.lock().expect("conns lock").push(pending);
        }))
        .await;
        {
            // A snapshot source that did not call it: registered now.
            let mut conns = self.conns.lock().expect("conns lock");
            if !conns.iter().any(|c| c.id == id) {
                conns.push(handle.clone());
            }
        }
        for p in &pods {
            let req = match &p.netns {
                Some(_) => add_request(p),
                None => zds::WorkloadRequest {
                    payload: Some(zds::workload_request::Payload::Keep(zds::KeepWorkload {
                        uid: p.uid.clone(),
                    })),
                },
            };
            let r = conn
                .request(&req, p.netns.as_ref().map(|f| f.as_fd()), ACK_TIMEOUT)
                .await;
            let acked = match r {
                Ok(()) => true,
                Err(e) if e.is_refusal() => {
                    tracing::warn!(conn = id, pod = %format!("{}/{}", p.namespace, p.name), error = %e, "snapshot entry refused");
                    false
                }
                Err(e) => return Err(e),
            };
            zds_route::track_missing(&mut handle.missing(), sent(&req), acked);
        }
        let (snapshot_sent, _) = zds::Request::<()>::SnapshotSent.into_wire();
        conn.request(&snapshot_sent, None, ACK_TIMEOUT).await?;
        // What was queued meanwhile, then serving: decided under the lock Adds and Dels
        // pick their targets under, so nothing slips between.
        loop {
            let job = {
                let conns = self.conns.lock().expect("conns lock");
                match rx.try_recv() {
                    Ok(job) => job,
                    Err(_) => {
                        handle.serving.store(true, Ordering::Relaxed);
                        let missing = handle.missing().len();
                        tracing::info!(
                            conn = id,
                            pods = pods.len(),
                            missing,
                            handover = handover_capable,
                            "ztunnel connected; snapshot sent"
                        );
                        if missing > 0 {
                            tracing::warn!(
                                conn = id,
                                missing,
                                "the new ztunnel has no proxy for some pods (refused, or not yet handed to it); older ztunnels are handed over once it has them"
                            );
                        }
                        self.take_over(&conns, id);
                        break;
                    }
                }
            };
            self.run_job(conn, &handle, job).await?;
        }
        self.update_census();
        Ok(handle)
    }

    /// Incremental requests until ztunnel goes away.
    async fn serve_requests(
        &self,
        conn: &ServerConn,
        handle: &Handle,
        rx: &mut mpsc::UnboundedReceiver<Job>,
    ) {
        let id = handle.id;
        loop {
            tokio::select! {
                job = rx.recv() => {
                    let Some(job) = job else { break };
                    let had_missing = !handle.missing().is_empty();
                    if self.run_job(conn, handle, job).await.is_err() {
                        break;
                    }
                    // Its last missing pod was just retried: it has every pod now.
                    if had_missing && handle.missing().is_empty() {
                        let conns = self.conns.lock().expect("conns lock");
                        self.take_over(&conns, id);
                    }
                }
                // Between requests ztunnel sends nothing: anything from it means it
                // closed (or broke the protocol).
                stirred = conn.stirred() => {
                    if let Ok(PeerStirred::SentData) = stirred {
                        tracing::warn!(conn = id, "unexpected data from ztunnel; closing");
                    }
                    break;
                }
            }
        }
    }

    /// Sends one job and answers it; `Err` when the connection is broken.
    async fn run_job(&self, conn: &ServerConn, handle: &Handle, job: Job) -> Result<(), ZdsError> {
        let r = conn
            .request(&job.req, job.fd.as_ref().map(|f| f.as_fd()), ACK_TIMEOUT)
            .await;
        // A refusal, or a request refused before it was sent, leaves the connection fine.
        let fatal = matches!(&r, Err(e) if !e.is_refusal() && !e.is_unsent());
        if !fatal {
            zds_route::track_missing(&mut handle.missing(), sent(&job.req), r.is_ok());
        }
        match job.done {
            Some(done) => {
                let _ = done.send(r.as_ref().map_err(ToString::to_string).copied());
            }
            None => {
                if let Err(e) = &r {
                    tracing::warn!(conn = handle.id, error = %e, "request queued behind the snapshot failed");
                }
            }
        }
        match (fatal, r) {
            (true, Err(e)) => Err(e),
            _ => Ok(()),
        }
    }

    /// Connection `ready` serves: older ztunnels that understand it are handed over
    /// (each once), if it has every pod. Called with the connections locked.
    fn take_over(&self, conns: &[Handle], ready: u64) {
        let Some(me) = conns.iter().find(|c| c.id == ready) else {
            return;
        };
        let complete = me.missing().is_empty();
        let views: Vec<ConnView> = conns
            .iter()
            .filter(|c| c.alive.load(Ordering::Relaxed))
            .map(Handle::view)
            .collect();
        for old in zds_route::hand_over_on_ready(&views, ready, complete) {
            if let Some(h) = conns.iter().find(|c| c.id == old) {
                // Marked first: from here on no Add picks it.
                h.handed_over.store(true, Ordering::Relaxed);
                tracing::info!(
                    conn = old,
                    newer = ready,
                    "handing over: the older ztunnel stops accepting and keeps its open connections"
                );
                self.metrics.inc_ztunnel_handovers();
                h.hand_over();
            }
        }
        let views: Vec<ConnView> = conns
            .iter()
            .filter(|c| c.alive.load(Ordering::Relaxed))
            .map(Handle::view)
            .collect();
        let (serving, handed_over) = zds_route::census(&views);
        self.metrics.set_ztunnel_connections(serving, handed_over);
    }

    fn update_census(&self) {
        let views: Vec<ConnView> = self.live().iter().map(Handle::view).collect();
        let (serving, handed_over) = zds_route::census(&views);
        self.metrics.set_ztunnel_connections(serving, handed_over);
    }

    fn live(&self) -> Vec<Handle> {
        self.conns
            .lock()
            .expect("conns lock")
            .iter()
            .filter(|c| c.alive.load(Ordering::Relaxed))
            .cloned()
            .collect()
    }

    /// Connected ztunnels that take new pods (handed-over ones do not).
    pub fn connected(&self) -> usize {
        self.live()
            .iter()
            .filter(|c| c.serving.load(Ordering::Relaxed) && !c.handed_over.load(Ordering::Relaxed))
            .count()
    }

    /// Whether the ztunnel that takes new pods lacks pod `uid` (refused it, or got it as
    /// Keep): the agent then sends its Add again.
    pub fn missing(&self, uid: &str) -> bool {
        let live = self.live();
        let views: Vec<ConnView> = live.iter().map(Handle::view).collect();
        zds_route::add_target(&views)
            .and_then(|t| live.iter().find(|c| c.id == t))
            .is_some_and(|c| c.missing().contains(uid))
    }

    /// Blocking: sends an Add to the newest ztunnel not handed over and waits for its ack;
    /// queues it for connections still receiving their snapshot.
    pub fn add(&self, pod: &PodEntry) -> Result<(), String> {
        // Checked before anything is sent: an Add without its netns would be refused by
        // ztunnel as a protocol error, costing the connection.
        if pod.netns.is_none() {
            return Err(format!(
                "the network namespace of {}/{} could not be duplicated; not sent",
                pod.namespace, pod.name
            ));
        }
        let clone_fd = || match &pod.netns {
            Some(f) => f.try_clone().map(Some).map_err(|e| e.to_string()),
            None => Ok(None),
        };
        let newest = {
            let conns = self.conns.lock().expect("conns lock");
            let live: Vec<&Handle> = conns
                .iter()
                .filter(|c| c.alive.load(Ordering::Relaxed))
                .collect();
            let views: Vec<ConnView> = live.iter().map(|c| c.view()).collect();
            for q in zds_route::queue_targets(&views) {
                if let Some(h) = live.iter().find(|c| c.id == q) {
                    h.enqueue(add_request(pod), clone_fd()?);
                }
            }
            zds_route::add_target(&views)
                .and_then(|t| live.iter().find(|c| c.id == t))
                .map(|c| (*c).clone())
        };
        let newest = newest.ok_or("no ztunnel is connected")?;
        newest.call(add_request(pod), clone_fd()?)
    }

    /// Blocking: sends a Del to every connected ztunnel (queued for those still receiving
    /// their snapshot).
    pub fn del(&self, uid: &str) {
        let req = zds::WorkloadRequest {
            payload: Some(zds::workload_request::Payload::Del(zds::DelWorkload {
                uid: uid.to_string(),
            })),
        };
        let serving: Vec<Handle> = {
            let conns = self.conns.lock().expect("conns lock");
            let live = conns.iter().filter(|c| c.alive.load(Ordering::Relaxed));
            let (serving, pending): (Vec<&Handle>, Vec<&Handle>) =
                live.partition(|c| c.serving.load(Ordering::Relaxed));
            for p in pending {
                p.enqueue(req.clone(), None);
            }
            serving.into_iter().cloned().collect()
        };
        for c in serving {
            if let Err(e) = c.call(req.clone(), None) {
                tracing::warn!(conn = c.id, uid, error = %e, "Del not acknowledged");
            }
        }
    }
}

/// Registers an owned socket with the runtime.
fn register(fd: OwnedFd) -> Result<AsyncFd<OwnedFd>, String> {
    // SAFETY: `fd` is an OwnedFd moved into the AsyncFd: it stays open and refers to the
    // same socket until the AsyncFd is dropped, which is all registration requires.
    #[allow(unsafe_code)]
    unsafe { AsyncFd::register(fd) }.map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server() -> ZdsServer {
        ZdsServer {
            conns: Arc::default(),
            metrics: Arc::default(),
        }
    }

    fn pod(netns: Option<File>) -> PodEntry {
        PodEntry {
            uid: "u1".into(),
            name: "p".into(),
            namespace: "ns".into(),
            service_account: "sa".into(),
            netns,
        }
    }

    #[test]
    fn an_add_without_its_netns_is_not_sent() {
        let e = server().add(&pod(None)).unwrap_err();
        assert!(e.contains("could not be duplicated"), "{e}");
    }

    #[tokio::test]
    async fn a_request_refused_before_sending_keeps_the_connection() {
        let (a, _b) = socket::socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        )
        .unwrap();
        let conn = ServerConn::new(SeqPacket::from_fd(a).unwrap());
        let (tx, _rx) = mpsc::unbounded_channel();
        let handle = Handle {
            id: 1,
            started: None,
            tx,
            alive: Arc::default(),
            serving: Arc::default(),
            handover_capable: false,
            handed_over: Arc::default(),
            missing: Arc::default(),
        };
        let (done, answer) = std::sync::mpsc::sync_channel(1);
        // An Add without its fd: refused by the codec before a byte is written.
        let job = Job {
            req: add_request(&pod(None)),
            fd: None,
            done: Some(done),
        };
        let kept = server().run_job(&conn, &handle, job).await;
        assert!(kept.is_ok(), "{kept:?}");
        let e = answer.recv().unwrap().unwrap_err();
        assert!(e.contains("exactly one netns fd"), "{e}");
    }
}
