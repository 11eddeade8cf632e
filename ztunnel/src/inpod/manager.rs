//! Applies ZDS events: starts a proxy per added pod, drains it on Del, and after a
//! snapshot drains pods the agent no longer knows.

use super::netns::Netns;
use super::zds::{ZdsConnection, ZdsError, ZdsEvent};
use crate::drain::Drain;
use crate::proxy::{NodeContext, PodInfo, PodProxy};
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

const MIN_BACKOFF: Duration = Duration::from_millis(10);
const MAX_BACKOFF: Duration = Duration::from_secs(15);
/// How long the end of a snapshot waits for its pods' certificates before the ack (the
/// agent hands the node over on that ack): bounded, as a slow CA must not stall ZDS, and
/// well under the agent's 5 s ack timeout (it would drop the connection).
const SNAPSHOT_CERT_WAIT: Duration = Duration::from_secs(3);

/// Per-pod state shown in `/config_dump`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PodState {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub state: &'static str,
    pub netns_inode: u64,
    pub open_connections: usize,
}

pub struct WorkloadManager {
    ctx: Arc<NodeContext>,
    drain: Drain,
    deadline: Duration,
    proxies: HashMap<String, Arc<PodProxy>>,
    seen_in_snapshot: HashSet<String>,
    /// Set once a snapshot has been received (readiness).
    pub snapshot_received: Arc<std::sync::atomic::AtomicBool>,
    /// Becomes true when the node agent hands this ztunnel over (the process lifecycle
    /// in `app.rs` watches it).
    pub handed_over: tokio::sync::watch::Sender<bool>,
    /// Ourselves, for work that finishes after a pod's drain.
    this: Weak<Mutex<WorkloadManager>>,
}

impl WorkloadManager {
    /// The manager, shared (its drains report back to it when they end).
    pub fn new(ctx: Arc<NodeContext>, drain: Drain, deadline: Duration) -> Arc<Mutex<Self>> {
        Arc::new_cyclic(|this| {
            Mutex::new(WorkloadManager {
                ctx,
                drain,
                deadline,
                proxies: HashMap::new(),
                seen_in_snapshot: HashSet::new(),
                snapshot_received: Arc::default(),
                handed_over: tokio::sync::watch::Sender::new(false),
                this: this.clone(),
            })
        })
    }

    /// Forgets the certificates of identities no local pod runs as any more (their
    /// renewals stop).
    fn retain_certificates(&self) {
        let in_use: Vec<_> = self.proxies.values().filter_map(|p| p.identity()).collect();
        self.ctx.certs.retain(|id| in_use.contains(id));
    }

    pub fn pods(&self) -> Vec<PodState> {
        let mut v: Vec<PodState> = self
            .proxies
            .values()
            .map(|p| PodState {
                uid: p.info.uid.clone(),
                name: p.info.name.clone(),
                namespace: p.info.namespace.clone(),
                service_account: p.info.service_account.clone(),
                state: "Up",
                netns_inode: p.netns.inode(),
                open_connections: p.drain.open_connections(),
            })
            .collect();
        v.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        v
    }

    fn stop(&mut self, uid: &str) {
        if let Some(p) = self.proxies.remove(uid) {
            self.ctx.metrics.proxies_stopped.inc();
            self.ctx
                .metrics
                .active_proxies
                .set(self.proxies.len() as i64);
            let deadline = self.deadline;
            tracing::info!(uid, pod = %format!("{}/{}", p.info.namespace, p.info.name), "draining pod proxy");
            // Identities no local pod runs as any more are forgotten now, and again once
            // the drain is over (a connection finishing meanwhile may have asked for one).
            self.retain_certificates();
            let this = self.this.clone();
            tokio::spawn(async move {
                p.drain.run(deadline).await;
                drop(p);
                if let Some(mgr) = this.upgrade() {
                    mgr.lock().expect("manager lock").retain_certificates();
                }
            });
        }
    }

    /// Applies one event; `Err` is the reason sent back in the ack.
    pub fn handle(&mut self, event: ZdsEvent) -> Result<(), String> {
        match event {
            ZdsEvent::Add { .. } if *self.handed_over.borrow() => {
                Err("this ztunnel was handed over to a newer one and takes no new pods".into())
            }
            ZdsEvent::Add { uid, info, netns } => {
                self.seen_in_snapshot.insert(uid.clone());
                if let Some(existing) = self.proxies.get(&uid) {
                    if existing.netns == netns {
                        return Ok(()); // idempotent
                    }
                    tracing::info!(
                        uid,
                        old_netns = existing.netns.inode(),
                        new_netns = netns.inode(),
                        "pod sandbox changed; replacing its proxy"
                    );
                    self.stop(&uid);
                }
                self.start(uid, info, netns)
            }
            ZdsEvent::Keep { uid } => {
                self.seen_in_snapshot.insert(uid);
                Ok(())
            }
            ZdsEvent::Del { uid } => {
                self.seen_in_snapshot.remove(&uid);
                self.stop(&uid);
                Ok(())
            }
            ZdsEvent::SnapshotSent => {
                let stale: Vec<String> = self
                    .proxies
                    .keys()
                    .filter(|uid| !self.seen_in_snapshot.contains(*uid))
                    .cloned()
                    .collect();
                for uid in stale {
                    self.stop(&uid);
                }
                self.snapshot_received
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                Ok(())
            }
            ZdsEvent::Handover => {
                self.hand_over();
                Ok(())
            }
        }
    }

    /// A newer ztunnel took the node: every pod's listeners close (their queued
    /// connections migrate to the newer ztunnel's listeners), HBONE connections get
    /// GOAWAY, open connections run on. Done before the ack, so once the agent has it
    /// every new connection lands on the newer process.
    fn hand_over(&mut self) {
        if *self.handed_over.borrow() {
            return;
        }
        for p in self.proxies.values() {
            if let Err(e) = crate::proxy::socket::enable_migrate_req(&p.netns) {
                // Without it, a connection arriving between the last accept and the
                // close is reset; everything else still works.
                // What is queued when the listener closes is accepted and served anyway.
                self.ctx.metrics.handover_migrate_req_failures.inc();
                tracing::warn!(pod = %format!("{}/{}", p.info.namespace, p.info.name), error = %e,
                    "cannot set net.ipv4.tcp_migrate_req; connections arriving as the listeners close may be reset");
            }
        }
        self.drain.stop_accepting_now();
        self.handed_over.send_replace(true);
    }

    fn start(
        &mut self,
        uid: String,
        info: mesh_proto::zds::WorkloadInfo,
        netns: Netns,
    ) -> Result<(), String> {
        let pod = PodInfo {
            uid: uid.clone(),
            name: info.name,
            namespace: info.namespace,
            service_account: info.service_account,
        };
        let label = format!("{}/{}", pod.namespace, pod.name);
        match PodProxy::start(self.ctx.clone(), pod, netns, &self.drain) {
            Ok(p) => {
                tracing::info!(uid, pod = %label, "pod proxy started");
                p.prefetch_certificate();
                self.proxies.insert(uid, p);
                self.ctx.metrics.proxies_started.inc();
                self.ctx
                    .metrics
                    .active_proxies
                    .set(self.proxies.len() as i64);
                Ok(())
            }
            Err(e) => {
                let msg = format!("cannot start proxy for {label}: {e}");
                tracing::error!("{msg}");
                Err(msg)
            }
        }
    }

    fn new_connection(&mut self) {
        self.seen_in_snapshot.clear();
    }
}

/// Serves one ZDS connection until it fails.
async fn serve(conn: ZdsConnection, mgr: &Mutex<WorkloadManager>) -> Result<(), ZdsError> {
    mgr.lock().expect("manager lock").new_connection();
    loop {
        let event = conn.recv().await?;
        let snapshot_end = matches!(event, ZdsEvent::SnapshotSent);
        let uid = match &event {
            ZdsEvent::Add { uid, .. } | ZdsEvent::Keep { uid } | ZdsEvent::Del { uid } => {
                Some(uid.clone())
            }
            _ => None,
        };
        let (result, pods) = {
            let mut m = mgr.lock().expect("manager lock");
            let result = m.handle(event);
            let pods: Vec<Arc<PodProxy>> = match snapshot_end {
                true => m.proxies.values().cloned().collect(),
                false => Vec::new(),
            };
            (result, pods)
        };
        if snapshot_end {
            certificates_ready(pods, SNAPSHOT_CERT_WAIT).await;
        }
        if let Err(e) = &result {
            tracing::warn!(uid = uid.as_deref().unwrap_or(""), error = %e, "ZDS request refused");
        }
        conn.ack(result.err().as_deref()).await?;
    }
}

/// Waits (up to `wait`) for the certificates of `pods`, so that once the snapshot is
/// acked, and the node handed over to us, the first connections need no CA round trip.
/// Past `wait`, or on failure, it says so and returns: the ack goes out anyway.
async fn certificates_ready(pods: Vec<Arc<PodProxy>>, wait: Duration) {
    let total = pods.len();
    let mut fetches = tokio::task::JoinSet::new();
    for p in pods {
        fetches.spawn(async move { p.certificate().await });
    }
    let mut failed = Vec::new();
    let all = async {
        while let Some(r) = fetches.join_next().await {
            if let Ok(Err(e)) = r {
                failed.push(e);
            }
        }
    };
    if tokio::time::timeout(wait, all).await.is_err() {
        tracing::warn!(pods = total, pending = fetches.len(), wait = ?wait,
            "pod certificates not all fetched in time; acking the snapshot anyway");
    } else if !failed.is_empty() {
        tracing::warn!(pods = total, errors = ?failed,
            "pod certificates failed; acking the snapshot anyway (they are retried on first use)");
    } else {
        tracing::info!(pods = total, "pod certificates ready");
    }
}

/// Where pods come from.
pub enum PodSource {
    /// The node agent's socket.
    Agent(PathBuf),
    /// A connected socket (e.g. the standalone pods file server), not reconnected.
    Connected(mesh_proto::zds::socket::SeqPacket),
}

/// Connects to the node agent and applies what it sends, reconnecting with backoff;
/// running proxies keep serving while disconnected.
pub async fn run(source: PodSource, mgr: Arc<Mutex<WorkloadManager>>) {
    let path = match source {
        PodSource::Connected(sock) => {
            let served = match ZdsConnection::over(sock).await {
                Ok(conn) => serve(conn, &mgr).await,
                Err(e) => Err(e),
            };
            if let Err(e) = served
                && !matches!(e, ZdsError::Closed)
            {
                tracing::error!(error = %e, "pod source failed");
            }
            return;
        }
        PodSource::Agent(path) => path,
    };
    let mut backoff = MIN_BACKOFF;
    loop {
        match ZdsConnection::connect(&path).await {
            Ok(conn) => {
                tracing::info!(socket = %path.display(), "connected to the node agent");
                backoff = MIN_BACKOFF;
                match serve(conn, &mgr).await {
                    Err(ZdsError::Closed) => tracing::warn!("node agent closed the ZDS connection"),
                    Err(e) => tracing::warn!(error = %e, "ZDS connection failed"),
                    Ok(()) => {}
                }
                // Handed over: a new connection would make us the newest ztunnel again
                // and take pods back from the one we handed over to.
                if *mgr.lock().expect("manager lock").handed_over.borrow() {
                    tracing::info!("handed over: not reconnecting to the node agent");
                    return;
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "node agent not reachable yet");
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}
