//! Applies ZDS events: starts a proxy per added pod, drains it on Del, and after a
//! snapshot drains pods the agent no longer knows.

use super::zds::{ZdsConnection, ZdsError, ZdsEvent};
use crate::drain::Drain;
use crate::identity::CertManager;
use crate::metrics::Metrics;
use crate::netns::Netns;
use crate::proxy::{NodeContext, PodInfo, PodProxy};
use mesh_identity::SpiffeId;
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

/// What the manager needs of one pod's proxy: the seam its tests use in place of
/// listeners in real namespaces.
pub trait PodHandle: Send + Sync + 'static {
    fn info(&self) -> &PodInfo;
    fn netns(&self) -> &Netns;
    fn drain(&self) -> &Drain;
    /// The identity it runs as (its certificate is kept while any pod runs as it).
    fn identity(&self) -> Option<SpiffeId>;
    /// Starts fetching its certificate in the background.
    fn prefetch_certificate(self: Arc<Self>);
    /// Fetches its certificate.
    fn certificate(&self) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + '_>>;
    /// Lets connections queued on its listeners move to a newer ztunnel's (handover).
    fn enable_migrate_req(&self) -> io::Result<()>;
}

/// Starts a pod's proxy (its listeners inside the pod's namespace), its drain a child
/// of `parent`.
pub trait ProxyFactory: Send + Sync + 'static {
    fn start(&self, info: PodInfo, netns: Netns, parent: &Drain) -> io::Result<Arc<dyn PodHandle>>;
}

/// The real proxies.
pub struct NodeProxies(pub Arc<NodeContext>);

impl ProxyFactory for NodeProxies {
    fn start(&self, info: PodInfo, netns: Netns, parent: &Drain) -> io::Result<Arc<dyn PodHandle>> {
        let proxy: Arc<dyn PodHandle> = PodProxy::start(self.0.clone(), info, netns, parent)?;
        Ok(proxy)
    }
}

impl PodHandle for PodProxy {
    fn info(&self) -> &PodInfo {
        &self.info
    }
    fn netns(&self) -> &Netns {
        &self.netns
    }
    fn drain(&self) -> &Drain {
        &self.drain
    }
    fn identity(&self) -> Option<SpiffeId> {
        PodProxy::identity(self)
    }
    fn prefetch_certificate(self: Arc<Self>) {
        PodProxy::prefetch_certificate(&self)
    }
    fn certificate(&self) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + '_>> {
        Box::pin(PodProxy::certificate(self))
    }
    fn enable_migrate_req(&self) -> io::Result<()> {
        crate::proxy::socket::enable_migrate_req(&self.netns)
    }
}

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
    factory: Arc<dyn ProxyFactory>,
    certs: Arc<CertManager>,
    metrics: Arc<Metrics>,
    drain: Drain,
    deadline: Duration,
    proxies: HashMap<String, Arc<dyn PodHandle>>,
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
        let (certs, metrics) = (ctx.certs.clone(), ctx.metrics.clone());
        Self::with_factory(Arc::new(NodeProxies(ctx)), certs, metrics, drain, deadline)
    }

    /// The manager with its proxies made by `factory`.
    pub fn with_factory(
        factory: Arc<dyn ProxyFactory>,
        certs: Arc<CertManager>,
        metrics: Arc<Metrics>,
        drain: Drain,
        deadline: Duration,
    ) -> Arc<Mutex<Self>> {
        Arc::new_cyclic(|this| {
            Mutex::new(WorkloadManager {
                factory,
                certs,
                metrics,
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
        self.certs.retain(|id| in_use.contains(id));
    }

    pub fn pods(&self) -> Vec<PodState> {
        let mut v: Vec<PodState> = self
            .proxies
            .values()
            .map(|p| PodState {
                uid: p.info().uid.clone(),
                name: p.info().name.clone(),
                namespace: p.info().namespace.clone(),
                service_account: p.info().service_account.clone(),
                state: "Up",
                netns_inode: p.netns().inode(),
                open_connections: p.drain().open_connections(),
            })
            .collect();
        v.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        v
    }

    fn stop(&mut self, uid: &str) {
        if let Some(p) = self.proxies.remove(uid) {
            self.metrics.proxies_stopped.inc();
            self.metrics.active_proxies.set(self.proxies.len() as i64);
            let deadline = self.deadline;
            tracing::info!(uid, pod = %format!("{}/{}", p.info().namespace, p.info().name), "draining pod proxy");
            // Identities no local pod runs as any more are forgotten now, and again once
            // the drain is over (a connection finishing meanwhile may have asked for one).
            self.retain_certificates();
            let this = self.this.clone();
            tokio::spawn(async move {
                p.drain().run(deadline).await;
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
                    if *existing.netns() == netns {
                        return Ok(()); // idempotent
                    }
                    tracing::info!(
                        uid,
                        old_netns = existing.netns().inode(),
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
            if let Err(e) = p.enable_migrate_req() {
                // Without it, a connection arriving between the last accept and the
                // close is reset; everything else still works.
                // What is queued when the listener closes is accepted and served anyway.
                self.metrics.handover_migrate_req_failures.inc();
                tracing::warn!(pod = %format!("{}/{}", p.info().namespace, p.info().name), error = %e,
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
        match self.factory.start(pod, netns, &self.drain) {
            Ok(p) => {
                tracing::info!(uid, pod = %label, "pod proxy started");
                p.clone().prefetch_certificate();
                self.proxies.insert(uid, p);
                self.metrics.proxies_started.inc();
                self.metrics.active_proxies.set(self.proxies.len() as i64);
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
            let pods: Vec<Arc<dyn PodHandle>> = match snapshot_end {
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
async fn certificates_ready(pods: Vec<Arc<dyn PodHandle>>, wait: Duration) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::CertSource;
    use mesh_identity::ca::CertificateAuthority;
    use mesh_proto::zds;
    use mesh_proto::zds::socket::{SeqPacket, ServerConn};
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
    use std::os::fd::AsFd;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A pod proxy without listeners: the manager's bookkeeping is what is under test.
    struct TestPod {
        info: PodInfo,
        netns: Netns,
        drain: Drain,
        migrate_req: AtomicUsize,
    }

    impl PodHandle for TestPod {
        fn info(&self) -> &PodInfo {
            &self.info
        }
        fn netns(&self) -> &Netns {
            &self.netns
        }
        fn drain(&self) -> &Drain {
            &self.drain
        }
        fn identity(&self) -> Option<SpiffeId> {
            None
        }
        fn prefetch_certificate(self: Arc<Self>) {}
        fn certificate(&self) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + '_>> {
            Box::pin(async { Ok(()) })
        }
        fn enable_migrate_req(&self) -> io::Result<()> {
            self.migrate_req.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
    }

    /// Starts `TestPod`s, refusing the uid in `refuse`; remembers every start.
    #[derive(Default)]
    struct TestProxies {
        started: Mutex<Vec<Arc<TestPod>>>,
        refuse: Option<&'static str>,
    }

    impl ProxyFactory for TestProxies {
        fn start(
            &self,
            info: PodInfo,
            netns: Netns,
            parent: &Drain,
        ) -> io::Result<Arc<dyn PodHandle>> {
            if self.refuse == Some(info.uid.as_str()) {
                return Err(io::Error::other("address in use"));
            }
            let p = Arc::new(TestPod {
                info,
                netns,
                drain: parent.child(),
                migrate_req: AtomicUsize::new(0),
            });
            self.started.lock().unwrap().push(p.clone());
            Ok(p)
        }
    }

    impl TestProxies {
        fn starts(&self, uid: &str) -> usize {
            let started = self.started.lock().unwrap();
            started.iter().filter(|p| p.info.uid == uid).count()
        }
    }

    fn manager(proxies: Arc<TestProxies>) -> Arc<Mutex<WorkloadManager>> {
        let ca = CertificateAuthority::new_root("cluster.local", Duration::from_secs(3600));
        let certs = CertManager::new(CertSource::Local {
            ca: Box::new(ca.unwrap()),
            ttl: Duration::from_secs(600),
        });
        let metrics = Metrics::new(Some(certs.clone()));
        WorkloadManager::with_factory(
            proxies,
            certs,
            metrics,
            Drain::new(),
            Duration::from_secs(1),
        )
    }

    fn netns() -> Netns {
        Netns::open("/proc/self/ns/net").unwrap()
    }

    fn add(uid: &str) -> ZdsEvent {
        ZdsEvent::Add {
            uid: uid.into(),
            info: zds::WorkloadInfo {
                name: format!("pod-{uid}"),
                namespace: "ns".into(),
                service_account: "sa".into(),
            },
            netns: netns(),
        }
    }

    fn uids(m: &Mutex<WorkloadManager>) -> Vec<String> {
        let mut v: Vec<String> = m
            .lock()
            .unwrap()
            .pods()
            .into_iter()
            .map(|p| p.uid)
            .collect();
        v.sort();
        v
    }

    #[tokio::test]
    async fn adds_are_idempotent_and_dels_stop_the_proxy() {
        let proxies = Arc::new(TestProxies::default());
        let m = manager(proxies.clone());
        {
            let mut g = m.lock().unwrap();
            g.handle(add("a")).unwrap();
            g.handle(add("a")).unwrap();
            g.handle(add("b")).unwrap();
            assert_eq!(
                proxies.starts("a"),
                1,
                "the same netns again starts nothing"
            );
            assert_eq!(g.metrics.active_proxies.get(), 2);
            g.handle(ZdsEvent::Del { uid: "a".into() }).unwrap();
            // An unknown pod's Del is fine (the agent sends Dels to every ztunnel).
            g.handle(ZdsEvent::Del { uid: "zz".into() }).unwrap();
        }
        assert_eq!(uids(&m), ["b"]);
        assert_eq!(m.lock().unwrap().metrics.proxies_stopped.get(), 1);
        let stopped = proxies.started.lock().unwrap()[0].clone();
        // Its drain runs (and stops its listeners) in a task of its own.
        tokio::time::timeout(
            Duration::from_secs(10),
            stopped.drain.stop_accepting().cancelled(),
        )
        .await
        .expect("a's proxy drains");
    }

    #[tokio::test]
    async fn a_proxy_that_cannot_start_is_refused_in_the_ack() {
        let proxies = Arc::new(TestProxies {
            refuse: Some("bad"),
            ..Default::default()
        });
        let m = manager(proxies);
        let e = m.lock().unwrap().handle(add("bad")).unwrap_err();
        assert!(e.contains("cannot start proxy for ns/pod-bad"), "{e}");
        assert!(uids(&m).is_empty());
    }

    #[tokio::test]
    async fn a_snapshot_drains_pods_it_does_not_list_and_keeps_kept_ones() {
        let proxies = Arc::new(TestProxies::default());
        let m = manager(proxies.clone());
        {
            let mut g = m.lock().unwrap();
            g.new_connection();
            for uid in ["a", "b", "c"] {
                g.handle(add(uid)).unwrap();
            }
            g.handle(ZdsEvent::SnapshotSent).unwrap();
        }
        assert!(m.lock().unwrap().snapshot_received.load(Ordering::Relaxed));
        assert_eq!(uids(&m), ["a", "b", "c"]);
        // Reconnected: the agent lists a (Add) and b (Keep: its netns not open), not c.
        {
            let mut g = m.lock().unwrap();
            g.new_connection();
            g.handle(add("a")).unwrap();
            g.handle(ZdsEvent::Keep { uid: "b".into() }).unwrap();
            g.handle(ZdsEvent::SnapshotSent).unwrap();
        }
        assert_eq!(uids(&m), ["a", "b"]);
        assert_eq!(proxies.starts("a"), 1, "a's proxy ran on untouched");
    }

    #[tokio::test]
    async fn handover_closes_the_listeners_and_refuses_new_pods() {
        let proxies = Arc::new(TestProxies::default());
        let m = manager(proxies.clone());
        let mut g = m.lock().unwrap();
        g.handle(add("a")).unwrap();
        g.handle(ZdsEvent::Handover).unwrap();
        g.handle(ZdsEvent::Handover).unwrap();
        assert!(*g.handed_over.borrow());
        assert!(
            g.drain.stop_accepting().is_cancelled(),
            "every listener stops accepting"
        );
        let a = proxies.started.lock().unwrap()[0].clone();
        assert_eq!(a.migrate_req.load(Ordering::Relaxed), 1, "once");
        let e = g.handle(add("b")).unwrap_err();
        assert!(e.contains("handed over"), "{e}");
        assert_eq!(proxies.starts("b"), 0);
        // A handed-over ztunnel still drains pods the agent deletes.
        g.handle(ZdsEvent::Del { uid: "a".into() }).unwrap();
        drop(g);
        assert!(uids(&m).is_empty());
    }

    /// `serve` over a socketpair: the agent's end driven by the shared ZDS code.
    #[tokio::test]
    async fn serve_acks_each_request_and_a_reconnect_resyncs() {
        let proxies = Arc::new(TestProxies {
            refuse: Some("bad"),
            ..Default::default()
        });
        let m = manager(proxies.clone());
        let ns = std::fs::File::open("/proc/self/ns/net").unwrap();
        let wait = Duration::from_secs(5);
        let add_req = |uid: &str| {
            zds::Request::Add {
                uid: uid.into(),
                info: zds::WorkloadInfo::default(),
                netns: (),
            }
            .into_wire()
            .0
        };
        let done = zds::Request::<()>::SnapshotSent.into_wire().0;
        for (round, pods) in [["a", "b"], ["a", "bad"]].into_iter().enumerate() {
            let (ours, theirs) = socketpair(
                AddressFamily::Unix,
                SockType::SeqPacket,
                None,
                SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            )
            .unwrap();
            let conn = ZdsConnection::over(SeqPacket::from_fd(ours).unwrap());
            let agent = ServerConn::new(SeqPacket::from_fd(theirs).unwrap());
            let (conn, hello) = tokio::join!(conn, agent.hello(wait));
            hello.unwrap();
            let served = serve(conn.unwrap(), &m);
            let agent_side = async {
                for uid in pods {
                    let r = agent.request(&add_req(uid), Some(ns.as_fd()), wait).await;
                    match uid {
                        "bad" => assert!(matches!(r, Err(ZdsError::Refused(_))), "{r:?}"),
                        _ => r.unwrap(),
                    }
                }
                agent.request(&done, None, wait).await.unwrap();
                // The agent goes away: serve ends, the proxies run on.
                drop(agent);
            };
            let (served, ()) = tokio::join!(served, agent_side);
            assert!(served.is_err(), "round {round}: {served:?}");
            assert_eq!(
                uids(&m),
                match round {
                    0 => vec!["a", "b"],
                    _ => vec!["a"],
                },
                "round {round}"
            );
        }
        assert_eq!(proxies.starts("a"), 1);
    }
}
