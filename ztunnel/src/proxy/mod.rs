//! The per-pod proxy: listeners inside the pod's network namespace (15001 outbound,
//! 15006 inbound plaintext, 15008 inbound HBONE, 15053 DNS: see `crate::dns`) and the
//! flows behind them.

pub mod accept;
pub mod counted;
pub mod plan;
pub mod socket;

use crate::drain::{ConnGuard, Drain};
use crate::identity::CertManager;
use crate::inpod::netns::Netns;
use crate::metrics::{ConnRecorder, ConnReport, Direction, Metrics, Outcome};
use crate::rbac::{ConnectionInfo, Decision};
use crate::state::{State, Workload};
use crate::updates::StateChanged;
use accept::{ConnLimit, spawn_accept_loop};
use hbone::{Authority, ConnectHandler, InboundConnect, Refusal, Responder};
use mesh_identity::SpiffeId;
use mesh_proto::ports;
use plan::{InboundPlan, OutboundPlan, plan_inbound, plan_outbound};
use socket::{NetnsDialer, canonical, connect_in, listen_in, original_dst};
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

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
}

/// The pod as the node agent described it.
#[derive(Clone, Debug)]
pub struct PodInfo {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub service_account: String,
}

/// Open inbound connections, so policy changes can close those no longer allowed.
#[derive(Default)]
pub struct ConnTracker {
    next: AtomicU64,
    conns: Mutex<HashMap<u64, Tracked>>,
}

struct Tracked {
    dst_uid: String,
    info: ConnectionInfo,
    close: CancellationToken,
}

pub struct TrackedHandle<'a> {
    tracker: &'a ConnTracker,
    id: u64,
    pub closed_by_policy: CancellationToken,
}

impl Drop for TrackedHandle<'_> {
    fn drop(&mut self) {
        self.tracker
            .conns
            .lock()
            .expect("tracker lock")
            .remove(&self.id);
    }
}

impl ConnTracker {
    fn track(&self, dst_uid: &str, info: ConnectionInfo) -> TrackedHandle<'_> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let close = CancellationToken::new();
        self.conns.lock().expect("tracker lock").insert(
            id,
            Tracked {
                dst_uid: dst_uid.to_string(),
                info,
                close: close.clone(),
            },
        );
        TrackedHandle {
            tracker: self,
            id,
            closed_by_policy: close,
        }
    }

    /// Re-evaluates every open inbound connection; closes the ones now denied.
    pub fn recheck(&self, state: &State) -> usize {
        let conns = self.conns.lock().expect("tracker lock");
        let mut closed = 0;
        for t in conns.values() {
            let decision = match state.workload(&t.dst_uid) {
                Some(w) => state.authorize(w, &t.info),
                None => continue,
            };
            if let Decision::Deny { policy, reason } = decision
                && !t.close.is_cancelled()
            {
                let (src_ip, dst_port) = (t.info.src_ip, t.info.dst_port);
                tracing::info!(target: "access", direction = "inbound", src.addr = %src_ip, dst.port = dst_port,
                    policy = %policy.unwrap_or_default(), reason = %reason,
                    "closing open connection no longer allowed by policy");
                t.close.cancel();
                closed += 1;
            }
        }
        closed
    }

    pub fn len(&self) -> usize {
        self.conns.lock().expect("tracker lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

pub struct PodProxy {
    pub info: PodInfo,
    pub netns: Netns,
    pub drain: Drain,
    ctx: Arc<NodeContext>,
    client: hbone::Client<NetnsDialer>,
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
        let proxy = Arc::new(PodProxy {
            client: hbone::Client::new(
                NetnsDialer {
                    netns: netns.clone(),
                },
                hbone::ClientSettings::default(),
            ),
            info,
            netns,
            drain: parent.child(),
            ctx,
        });
        spawn_accept(proxy.clone(), outbound, "outbound", |p, s, g| async move {
            p.outbound(s, g).await
        });
        spawn_accept(proxy.clone(), plaintext, "inbound", |p, s, g| async move {
            p.inbound_plaintext(s, g).await
        });
        spawn_accept(
            proxy.clone(),
            hbone_listener,
            "hbone",
            |p, s, g| async move { p.inbound_hbone(s, g).await },
        );
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

    // ---- outbound (15001) ----

    async fn outbound(self: Arc<Self>, downstream: TcpStream, guard: ConnGuard) {
        let Ok(peer) = downstream.peer_addr().map(canonical) else {
            return;
        };
        let orig = match original_dst(&downstream) {
            Ok(o) => o,
            Err(e) => {
                tracing::warn!(pod = %self.info.name, error = %e, "no original destination on an outbound connection");
                return;
            }
        };
        if orig.ip().is_loopback() && ports::is_proxy_port(orig.port()) {
            tracing::warn!(dst = %orig, "refusing a connection to ztunnel's own port (loop)");
            return;
        }
        let Some(src) = self.wait_for_workload().await else {
            tracing::warn!(pod = %format!("{}/{}", self.info.namespace, self.info.name),
                "refusing outbound connection: this pod is not (yet) known from the control plane");
            return;
        };
        let plan = {
            let st = self.ctx.state.read().expect("state lock");
            plan_outbound(&st, &self.ctx.network, Some(&src), orig)
        };
        let mut report = ConnReport {
            direction: Direction::Outbound,
            src_addr: peer,
            src: Some(src.clone()),
            src_identity: Some(src.identity.clone()),
            dst_addr: orig,
            dst_hbone_addr: None,
            dst_service: None,
            dst: None,
            dst_identity: None,
            mtls: false,
            trace_id: String::new(),
            started: Instant::now(),
        };
        match plan {
            OutboundPlan::Refuse(reason) => {
                report.trace_id = hbone::TraceParent::random().trace_id_hex();
                let rec = ConnRecorder::open(self.ctx.metrics.clone(), report);
                rec.finish(Outcome::Failed {
                    flags: "CONNECT",
                    error: &reason,
                    sent: 0,
                    received: 0,
                });
            }
            OutboundPlan::Passthrough {
                dst,
                dst_workload,
                service,
            } => {
                report.dst_addr = dst;
                report.dst = dst_workload;
                report.dst_service = service;
                report.trace_id = hbone::TraceParent::random().trace_id_hex();
                let rec = ConnRecorder::open(self.ctx.metrics.clone(), report);
                self.passthrough(downstream, dst, rec, guard).await;
            }
            OutboundPlan::Hbone {
                hop,
                authority,
                expected,
                dst_workload,
                service,
                via_waypoint: _,
            } => {
                // As Istio logs it: the address dialled, and the target inside.
                report.dst_addr = hop;
                report.dst_hbone_addr = Some(authority);
                report.dst_identity = expected.first().cloned();
                report.dst = dst_workload;
                let host = service.as_ref().map(|s| s.hostname.clone());
                report.dst_service = service;
                report.mtls = true;
                let mut req = hbone::ConnectRequest::new(authority);
                req.forwarded = hbone::Forwarded {
                    for_addr: Some(peer),
                    host,
                };
                req.baggage = Some(baggage(&src, &self.ctx.cluster_id));
                let (traceparent, span) = crate::trace::outbound(&self.ctx.tracer);
                req.traceparent = traceparent;
                report.trace_id = req.traceparent.trace_id_hex();
                let rec = ConnRecorder::open(self.ctx.metrics.clone(), report).traced(span);
                self.hbone_out(downstream, &src, hop, expected, req, rec, guard)
                    .await;
            }
        }
    }

    async fn passthrough(
        &self,
        downstream: TcpStream,
        dst: SocketAddr,
        rec: ConnRecorder,
        guard: ConnGuard,
    ) {
        let upstream = match connect_in(&self.netns, dst, None).await {
            Ok(u) => u,
            Err(e) => {
                return rec.finish(Outcome::Failed {
                    flags: "CONNECT",
                    error: &e.to_string(),
                    sent: 0,
                    received: 0,
                });
            }
        };
        let mut downstream = counted::Counted::new(downstream);
        let mut upstream = upstream;
        let result = tokio::select! {
            r = tokio::io::copy_bidirectional(&mut downstream, &mut upstream) => r,
            _ = guard.force_close.cancelled() => Err(io::Error::other("drained")),
        };
        finish_copy(rec, result, &downstream);
    }

    #[allow(clippy::too_many_arguments)]
    async fn hbone_out(
        &self,
        downstream: TcpStream,
        src: &Workload,
        hop: SocketAddr,
        expected: Vec<SpiffeId>,
        req: hbone::ConnectRequest,
        rec: ConnRecorder,
        guard: ConnGuard,
    ) {
        // Boxed: fetching a certificate (a CA call on a miss) must not size the task either.
        let creds = match Box::pin(self.ctx.certs.get(&src.identity)).await {
            Ok(c) => c,
            Err(e) => {
                return rec.finish(Outcome::Failed {
                    flags: "IDENTITY_ERROR",
                    error: &e.to_string(),
                    sent: 0,
                    received: 0,
                });
            }
        };
        let key = hbone::PoolKey::new(
            src.identity.clone(),
            expected,
            hop,
            Some(
                downstream
                    .peer_addr()
                    .map(|a| canonical(a).ip())
                    .unwrap_or(hop.ip()),
            ),
        );
        // Boxed for the same reason as the inbound connect: a new HBONE connection (TLS and
        // HTTP/2 handshakes) is a large future that must not size every idle tunnel's task.
        let est = match Box::pin(self.client.connect(&key, &creds.cert, &req)).await {
            Ok(e) => e,
            Err(e) => {
                let flags = match &e {
                    hbone::ConnectError::Identity(_) | hbone::ConnectError::Tls { .. } => {
                        "TLS_FAILURE"
                    }
                    hbone::ConnectError::H2(_) | hbone::ConnectError::HandshakeTimeout(_) => {
                        "H2_HANDSHAKE_FAILURE"
                    }
                    hbone::ConnectError::Refused(hbone::Refused::Unauthorized) => "DENY",
                    _ => "CONNECT",
                };
                return rec.finish(Outcome::Failed {
                    flags,
                    error: &e.to_string(),
                    sent: 0,
                    received: 0,
                });
            }
        };
        // Whatever the copy does not need is dropped first, so an idle tunnel's task does
        // not keep it (locals alive across an await are stored in the task).
        let tunnel = est.tunnel;
        drop((est.headers, req, key, creds));
        let progress = hbone::tunnel::CopyProgress::default();
        // A drain ends the copy as a failure (CONNECT_ERROR on the stream, RST to the
        // client), never as a silently dropped stream.
        let drained = async {
            guard.force_close.cancelled().await;
            io::Error::other("drained")
        };
        let result = tunnel
            .copy_with_tcp_until(&downstream, &progress, drained)
            .await
            .map_err(|e| e.error);
        finish_with_bytes(rec, result, progress.stats());
    }

    // ---- inbound ----

    /// Authorizes and connects to the app at `dst` (in this pod) as `src` would.
    async fn connect_app(
        &self,
        report: &mut ConnReport,
        info: &ConnectionInfo,
    ) -> Result<(TcpStream, Arc<Workload>), (Refusal, Option<String>)> {
        let dst_ip = info.dst_ip;
        let (dst, decision) = {
            let st = self.ctx.state.read().expect("state lock");
            let Some(dst) = st.workload_by_ip(&self.ctx.network, dst_ip).cloned() else {
                return Err((
                    Refusal::Unavailable(format!("no known workload at {dst_ip}")),
                    None,
                ));
            };
            let decision = st.authorize(&dst, info);
            (dst, decision)
        };
        report.dst = Some(dst.clone());
        report.dst_identity = Some(dst.identity.clone());
        if let Decision::Deny { policy, reason } = decision {
            return Err((
                Refusal::Unauthorized(reason),
                policy.or(Some(String::new())),
            ));
        }
        let app = SocketAddr::new(dst_ip, info.dst_port);
        match connect_in(&self.netns, app, Some(info.src_ip)).await {
            Ok(s) => Ok((s, dst)),
            Err(e) => Err((Refusal::Unavailable(format!("app at {app}: {e}")), None)),
        }
    }

    async fn inbound_plaintext(self: Arc<Self>, downstream: TcpStream, guard: ConnGuard) {
        let (Ok(peer), Ok(orig)) = (
            downstream.peer_addr().map(canonical),
            original_dst(&downstream),
        ) else {
            return;
        };
        let mut report = ConnReport {
            direction: Direction::Inbound,
            src_addr: peer,
            src: self
                .ctx
                .state
                .read()
                .expect("state lock")
                .workload_by_ip(&self.ctx.network, peer.ip())
                .cloned(),
            src_identity: None,
            dst_addr: orig,
            dst_hbone_addr: None,
            dst_service: None,
            dst: None,
            dst_identity: None,
            mtls: false,
            trace_id: hbone::TraceParent::random().trace_id_hex(),
            started: Instant::now(),
        };
        let info = ConnectionInfo {
            src_identity: None,
            src_ip: peer.ip(),
            dst_ip: orig.ip(),
            dst_port: orig.port(),
        };
        if ports::is_proxy_port(orig.port()) {
            return;
        }
        match self.connect_app(&mut report, &info).await {
            Err((refusal, policy)) => {
                let rec = ConnRecorder::open(self.ctx.metrics.clone(), report);
                finish_refusal(rec, &refusal, policy.as_deref());
            }
            Ok((app, dst)) => {
                let rec = ConnRecorder::open(self.ctx.metrics.clone(), report);
                let tracked = self.ctx.tracker.track(&dst.uid, info);
                let (mut a, mut b) = (counted::Counted::new(downstream), app);
                let r = tokio::select! {
                    r = tokio::io::copy_bidirectional(&mut a, &mut b) => r,
                    _ = guard.force_close.cancelled() => Err(io::Error::other("drained")),
                    _ = tracked.closed_by_policy.cancelled() => Err(io::Error::other("closed: no longer allowed by policy")),
                };
                finish_copy(rec, r, &a);
            }
        }
    }

    /// One HBONE connection: counted (`guard`) from accept through the certificate, the
    /// TLS handshake and every stream, so a handover or drain never ends the process
    /// while one is being set up; a forced close (drain deadline) ends it wherever it is.
    async fn inbound_hbone(self: Arc<Self>, tcp: TcpStream, guard: ConnGuard) {
        let force_close = guard.force_close.clone();
        tokio::select! {
            _ = self.serve_hbone(tcp) => {}
            _ = force_close.cancelled() => {}
        }
        drop(guard);
    }

    async fn serve_hbone(self: &Arc<Self>, tcp: TcpStream) {
        let Some(identity) = self.identity() else {
            return;
        };
        let creds = match self.ctx.certs.get(&identity).await {
            Ok(c) => c,
            Err(e) => {
                // Per connection, so debug: the manager logs the failure itself, and it
                // shows in metrics and readiness.
                tracing::debug!(identity = %identity, error = %e, "cannot serve HBONE without a certificate");
                return;
            }
        };
        let settings = hbone::H2Settings::server();
        let drain = self.drain.stop_accepting();
        let handler = Arc::new(InboundHandler { pod: self.clone() });
        if let Err(e) =
            hbone::serve_connection(tcp, creds.server_config.clone(), handler, &settings, drain)
                .await
        {
            tracing::debug!(pod = %self.info.name, error = %e, "HBONE connection ended");
        }
    }
}

struct InboundHandler {
    pod: Arc<PodProxy>,
}

impl ConnectHandler for InboundHandler {
    async fn handle(&self, req: InboundConnect, respond: Responder) {
        let pod = &self.pod;
        let guard = pod.drain.guard();
        let mut span = crate::trace::inbound(&pod.ctx.tracer, &req.request.traceparent);
        let local = canonical(req.local_addr);
        let peer = canonical(req.peer_addr);
        let InboundPlan {
            src,
            dst_service,
            target,
        } = {
            let st = pod.ctx.state.read().expect("state lock");
            let src = st.workload_by_ip(&pod.ctx.network, peer.ip()).cloned();
            let authority = match &req.request.authority {
                Authority::Addr(a) => Authority::Addr(canonical(*a)),
                other => other.clone(),
            };
            let forwarded = req.request.forwarded.host.as_deref();
            plan_inbound(&st, &pod.ctx.network, local, &authority, forwarded, src)
        };
        let mut report = ConnReport {
            direction: Direction::Inbound,
            src_addr: peer,
            src,
            src_identity: Some(req.peer_identity.clone()),
            dst_addr: local,
            dst_hbone_addr: None,
            dst_service,
            dst: None,
            dst_identity: None,
            mtls: true,
            trace_id: req.request.traceparent.trace_id_hex(),
            started: Instant::now(),
        };
        let target = match target {
            Ok(t) => t,
            Err(port) => {
                let refusal = Refusal::Unavailable(format!(
                    "the authority's host is no service of {} with port {port}",
                    local.ip()
                ));
                let rec = ConnRecorder::open(pod.ctx.metrics.clone(), report).traced(span.take());
                finish_refusal(rec, &refusal, None);
                return respond.refuse(&refusal);
            }
        };
        report.dst_hbone_addr = Some(target);
        if target.ip() != local.ip() {
            let refusal = Refusal::BadRequest(format!(
                "authority {target} does not match the connection's destination {}",
                local.ip()
            ));
            let rec = ConnRecorder::open(pod.ctx.metrics.clone(), report).traced(span.take());
            finish_refusal(rec, &refusal, None);
            return respond.refuse(&refusal);
        }
        if ports::is_proxy_port(target.port()) {
            let refusal =
                Refusal::Unavailable(format!("port {} is reserved for ztunnel", target.port()));
            let rec = ConnRecorder::open(pod.ctx.metrics.clone(), report).traced(span.take());
            finish_refusal(rec, &refusal, None);
            return respond.refuse(&refusal);
        }
        let info = ConnectionInfo {
            src_identity: Some(req.peer_identity.clone()),
            src_ip: peer.ip(),
            dst_ip: target.ip(),
            dst_port: target.port(),
        };
        // Boxed: the connect future is large and finishes early, while the copy below may
        // idle for hours; unboxed, its size would stay reserved in every tunnel's task.
        let (app, dst) = match Box::pin(pod.connect_app(&mut report, &info)).await {
            Ok(x) => x,
            Err((refusal, policy)) => {
                let rec = ConnRecorder::open(pod.ctx.metrics.clone(), report).traced(span.take());
                finish_refusal(rec, &refusal, policy.as_deref());
                return respond.refuse(&refusal);
            }
        };
        let rec = ConnRecorder::open(pod.ctx.metrics.clone(), report).traced(span.take());
        let Ok(tunnel) = respond.accept(Default::default()) else {
            return rec.finish(Outcome::Failed {
                flags: "CONNECT",
                error: "stream reset before accept",
                sent: 0,
                received: 0,
            });
        };
        let tracked = pod.ctx.tracker.track(&dst.uid, info);
        // As on the way out: keep nothing across the copy that it does not need.
        drop((req, dst));
        let progress = hbone::tunnel::CopyProgress::default();
        // Drain and policy end the copy as a failure (CONNECT_ERROR on the stream, RST to
        // the app), never as a silently dropped stream.
        let stopped = async {
            tokio::select! {
                _ = guard.force_close.cancelled() => io::Error::other("drained"),
                _ = tracked.closed_by_policy.cancelled() => io::Error::other("closed: no longer allowed by policy"),
            }
        };
        let r = tunnel
            .copy_with_tcp_until(&app, &progress, stopped)
            .await
            .map_err(|e| e.error);
        // Seen from the app: what came out of the tunnel was sent to it.
        let s = progress.stats();
        let app_side = hbone::CopyStats {
            sent: s.received,
            received: s.sent,
        };
        finish_with_bytes(rec, r.map(|_| ()), app_side);
    }
}

fn finish_refusal(rec: ConnRecorder, refusal: &Refusal, policy: Option<&str>) {
    match refusal {
        Refusal::Unauthorized(reason) => rec.finish(Outcome::Denied {
            policy: policy.filter(|p| !p.is_empty()),
            reason,
        }),
        other => rec.finish(Outcome::Failed {
            flags: "CONNECT",
            error: other.reason(),
            sent: 0,
            received: 0,
        }),
    }
}

/// Records a plain copy's end, with the bytes counted on the downstream side: what was
/// read from it was sent on, what was written to it was received.
fn finish_copy<T>(rec: ConnRecorder, r: io::Result<(u64, u64)>, downstream: &counted::Counted<T>) {
    let stats = hbone::CopyStats {
        sent: downstream.read,
        received: downstream.written,
    };
    finish_with_bytes(rec, r, stats);
}

/// Records a copy's end. `stats` are the bytes moved whatever the outcome: an error at
/// the end does not undo what was delivered.
fn finish_with_bytes(rec: ConnRecorder, r: io::Result<impl Sized>, stats: hbone::CopyStats) {
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

/// Source description sent on CONNECT (`baggage`).
fn baggage(w: &Workload, cluster: &str) -> String {
    let mut parts = Vec::with_capacity(6);
    let mut push = |k: &str, v: &str| {
        if !v.is_empty() {
            parts.push(format!("{k}={v}"));
        }
    };
    push(
        "k8s.cluster.name",
        if w.cluster_id.is_empty() {
            cluster
        } else {
            &w.cluster_id
        },
    );
    push("k8s.namespace.name", &w.namespace);
    push("k8s.pod.name", &w.name);
    push("service.name", &w.canonical_name);
    push("service.version", &w.canonical_revision);
    push("cloud.region", &w.locality.region);
    push("cloud.availability_zone", &w.locality.zone);
    parts.join(",")
}

/// Accepts on one of the pod's listeners; each connection is counted (its guard taken)
/// as it is accepted, before its handler first runs, and until the handler returns.
fn spawn_accept<F, Fut>(proxy: Arc<PodProxy>, listener: TcpListener, which: &'static str, handle: F)
where
    F: Fn(Arc<PodProxy>, TcpStream, ConnGuard) -> Fut + Send + 'static,
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
    spawn_accept_loop(listener, limit, stop, move |s| {
        let guard = p.drain.guard();
        handle(p.clone(), s, guard)
    });
}
