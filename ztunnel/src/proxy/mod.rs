//! The per-pod proxy: listeners inside the pod's network namespace (15001 outbound,
//! 15006 inbound plaintext, 15008 inbound HBONE, 15053 DNS: see `crate::dns`) and the
//! flows behind them.

pub mod accept;
pub mod counted;
mod inbound;
mod outbound;
pub mod plan;
pub mod socket;
pub mod tracker;

pub use tracker::ConnTracker;

use crate::drain::{ConnGuard, Drain};
use crate::identity::CertManager;
use crate::metrics::{ConnRecorder, Metrics, Outcome};
use crate::netns::Netns;
use crate::state::{State, Workload};
use crate::updates::StateChanged;
use accept::{ConnLimit, ReadyListener};
use mesh_identity::SpiffeId;
use mesh_proto::ports;
use socket::{NetnsDialer, listen_in};
use std::io;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::net::TcpStream;

/// How long an outbound connection waits for its own pod to appear in xDS.
const UNKNOWN_SOURCE_WAIT: Duration = Duration::from_secs(5);

/// What every pod proxy on this node shares.
pub struct NodeContext {
    pub state: Arc<RwLock<State>>,
    pub certs: Arc<CertManager>,
    pub metrics: Arc<Metrics>,
    pub network: String,
    pub trust_domain: String,
    pub cluster_id: String,
    pub tracker: Arc<ConnTracker>,
    /// Wakes whoever waits for the state to change.
    pub state_changed: StateChanged,
    /// Cap on open connections per listener (each pod has three).
    pub max_connections_per_listener: usize,
    /// The DNS proxy on 15053 in each pod (`None`: off).
    pub dns: Option<Arc<crate::dns::server::DnsSettings>>,
    /// Connection spans, when an OTLP collector is configured (off: a disabled tracer).
    pub tracer: Arc<mesh_trace::Tracer>,
    /// The threads connections run on.
    pub data_plane: mesh_threads::DataPlane,
}

/// The pod as the node agent described it.
#[derive(Clone, Debug)]
pub struct PodInfo {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub service_account: String,
}

pub struct PodProxy {
    pub info: PodInfo,
    pub netns: Netns,
    pub drain: Drain,
    ctx: Arc<NodeContext>,
    /// One HBONE pool per data thread, so a connection's tunnel rides an HTTP/2
    /// connection driven on its own thread.
    clients: mesh_threads::PerThread<hbone::Client<NetnsDialer>>,
}

impl PodProxy {
    /// Binds the three listeners inside the pod and starts serving.
    pub fn start(
        ctx: Arc<NodeContext>,
        info: PodInfo,
        netns: Netns,
        parent: &Drain,
    ) -> io::Result<Arc<Self>> {
        let outbound = listen_in(&netns, ports::OUTBOUND)?;
        let plaintext = listen_in(&netns, ports::INBOUND_PLAINTEXT)?;
        let hbone_listener = listen_in(&netns, ports::HBONE)?;
        let dns = match &ctx.dns {
            Some(settings) => Some((settings.clone(), crate::dns::server::bind(&netns)?)),
            None => None,
        };
        // Every listener set up on every data thread before any accepts: a failure leaves
        // nothing serving the pod.
        let plane = &ctx.data_plane;
        let outbound = ReadyListener::new(outbound, plane)?;
        let plaintext = ReadyListener::new(plaintext, plane)?;
        let hbone_listener = ReadyListener::new(hbone_listener, plane)?;
        let clients = mesh_threads::PerThread::new(&ctx.data_plane, || {
            hbone::Client::new(
                NetnsDialer {
                    netns: netns.clone(),
                },
                hbone::ClientSettings::default(),
            )
        });
        let proxy = Arc::new(PodProxy {
            clients,
            info,
            netns,
            drain: parent.child(),
            ctx,
        });
        spawn_accept(&proxy, outbound, "outbound", PodProxy::outbound);
        spawn_accept(&proxy, plaintext, "inbound", PodProxy::inbound_plaintext);
        spawn_accept(&proxy, hbone_listener, "hbone", PodProxy::inbound_hbone);
        if let Some((settings, bound)) = dns {
            crate::dns::server::PodDns::serve(
                proxy.ctx.clone(),
                settings,
                proxy.netns.clone(),
                &proxy.info.namespace,
                &proxy.info.name,
                bound,
                &proxy.drain,
            );
        }
        Ok(proxy)
    }

    /// The identity this pod runs as (from xDS, else from what the node agent reported).
    pub fn identity(&self) -> Option<SpiffeId> {
        self.workload()
            .map(|w| w.identity.clone())
            .or_else(|| self.fallback_identity())
    }

    /// Fetches the pod's certificate in the background, so its first connection does not
    /// wait for the CA. Waits briefly for the pod to appear in xDS (its identity may carry
    /// a trust domain that only xDS knows).
    pub fn prefetch_certificate(self: &Arc<Self>) {
        let pod = self.clone();
        tokio::spawn(async move {
            if let Err(e) = pod.certificate().await {
                tracing::warn!(pod = %pod.info.name, error = %e, "certificate prefetch failed; will retry on first use");
            }
        });
    }

    /// Fetches (or finds cached) the pod's certificate. Concurrent calls share one
    /// request to the CA.
    pub async fn certificate(&self) -> Result<(), String> {
        let id = match self.wait_for_workload().await {
            Some(w) => w.identity.clone(),
            None => self
                .fallback_identity()
                .ok_or("no identity: the pod is not in the configuration")?,
        };
        self.ctx
            .certs
            .get(&id)
            .await
            .map(|_| ())
            .map_err(|e| format!("{id}: {e}"))
    }

    /// This data thread's HBONE pool.
    fn client(&self) -> &hbone::Client<NetnsDialer> {
        self.clients.get()
    }

    fn fallback_identity(&self) -> Option<SpiffeId> {
        let sa = if self.info.service_account.is_empty() {
            "default"
        } else {
            &self.info.service_account
        };
        SpiffeId::new(&self.ctx.trust_domain, &self.info.namespace, sa).ok()
    }

    fn workload(&self) -> Option<Arc<Workload>> {
        let st = self.ctx.state.read().expect("state lock");
        st.workload_by_pod(&self.info.namespace, &self.info.name)
            .cloned()
    }

    /// The pod's own workload, waiting (woken by state updates) until it appears.
    async fn wait_for_workload(&self) -> Option<Arc<Workload>> {
        let (ns, name) = (&self.info.namespace, &self.info.name);
        self.ctx
            .state_changed
            .wait_for(&self.ctx.state, UNKNOWN_SOURCE_WAIT, |st| {
                st.workload_by_pod(ns, name).cloned()
            })
            .await
    }
}

/// Records a plain copy's end, with the bytes counted on the downstream side: what was
/// read from it was sent on, what was written to it was received.
pub(crate) fn finish_copy<T>(
    rec: ConnRecorder,
    r: io::Result<(u64, u64)>,
    downstream: &counted::Counted<T>,
) {
    let stats = hbone::CopyStats {
        sent: downstream.read,
        received: downstream.written,
    };
    finish_with_bytes(rec, r, stats);
}

/// Records the end of a tunnel's copy, with the bytes it moved whatever the outcome.
pub(crate) fn finish_tunnel_copy(
    rec: ConnRecorder,
    result: Result<hbone::CopyStats, hbone::tunnel::CopyError>,
) {
    match result {
        Ok(stats) => finish_with_bytes(rec, Ok(()), stats),
        Err(e) => finish_with_bytes(rec, Err::<(), _>(e.error), e.stats),
    }
}

/// Records a copy's end. `stats` are the bytes moved whatever the outcome: an error at
/// the end does not undo what was delivered.
pub(crate) fn finish_with_bytes(
    rec: ConnRecorder,
    r: io::Result<impl Sized>,
    stats: hbone::CopyStats,
) {
    match r {
        Ok(_) => rec.finish(Outcome::Complete {
            sent: stats.sent,
            received: stats.received,
        }),
        Err(e) => rec.finish(Outcome::Failed {
            flags: "-",
            error: &e.to_string(),
            sent: stats.sent,
            received: stats.received,
        }),
    }
}

/// Accepts on one of the pod's listeners; each connection is counted (its guard taken)
/// as it is accepted, before its handler first runs, and until the handler returns.
fn spawn_accept<F, Fut>(
    proxy: &Arc<PodProxy>,
    listener: ReadyListener,
    which: &'static str,
    handle: F,
) where
    F: Fn(Arc<PodProxy>, TcpStream, ConnGuard) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let name = format!("{}/{} {which}", proxy.info.namespace, proxy.info.name);
    let counter = proxy
        .ctx
        .metrics
        .connections_refused
        .get_or_create(&crate::metrics::ListenerLabel::new(which))
        .clone();
    let limit = ConnLimit::counting(name, proxy.ctx.max_connections_per_listener, counter);
    let stop = proxy.drain.stop_accepting();
    let p = proxy.clone();
    listener.spawn(limit, stop, move |s| {
        let guard = p.drain.guard();
        handle(p.clone(), s, guard)
    });
}

#[cfg(test)]
mod task_size {
    use super::*;

    // The size of the future a function returns, read from its type without calling it.
    fn size3<A, B, C, F>(_: fn(A, B, C) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// A connection's task lives as long as the connection, idle or not, so its size is
    /// paid per open tunnel: built from combinators, each is the copy (tunnel and socket
    /// owned) with the recorder and guards beside it. Unoptimised (as CI builds):
    /// outbound 376 and inbound 472 bytes; 936 and 776 (the copy alone) as async fns
    /// around the copy, which kept their arguments beside it; 2.1 and 1.6 KiB before that
    /// with the recorder's report inline.
    #[test]
    fn a_tunnels_task_keeps_only_its_copy() {
        let outbound = size3(PodProxy::outbound);
        assert!(
            outbound <= 640,
            "an outbound connection's task is {outbound} bytes"
        );
        let inbound = size3(<inbound::InboundHandler as hbone::ConnectHandler>::handle);
        assert!(
            inbound <= 640,
            "an inbound tunnel's task is {inbound} bytes"
        );
    }
}
