//! Inbound: plaintext (15006) and HBONE (15008). Each connection is decided by
//! [`plan_inbound`]; this module only carries the plan out: connects to the app, copies,
//! answers the CONNECT and records the outcome.

use super::plan::{HboneConnect, InboundAction, InboundPlan, InboundRequest, plan_inbound};
use super::socket::{canonical, connect_in, original_dst};
use super::{PodProxy, counted, finish_copy, finish_tunnel_copy};
use crate::drain::ConnGuard;
use crate::metrics::{ConnRecorder, ConnReport, Direction, Outcome};
use futures_util::future::{Either, FutureExt};
use hbone::{Authority, ConnectHandler, CopyStats, InboundConnect, Refusal, Responder};
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;
use tokio::net::TcpStream;
use tokio_util::sync::WaitForCancellationFutureOwned;

/// A refusal as the access log and metrics record it.
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

/// The report of an inbound connection, filled with what the plan found.
fn report(plan: &InboundPlan, peer: SocketAddr, dst_addr: SocketAddr) -> ConnReport {
    ConnReport {
        direction: Direction::Inbound,
        src_addr: peer,
        src: plan.src.clone(),
        src_identity: None,
        dst_addr,
        dst_hbone_addr: plan.dst_hbone_addr,
        dst_service: plan.dst_service.clone(),
        dst: plan.dst.clone(),
        dst_identity: plan.dst.as_ref().map(|d| d.identity.clone()),
        mtls: false,
        trace_id: 0,
        started: Instant::now(),
    }
}

impl PodProxy {
    /// The plan for `req`, with the state version it was made on (for the tracker).
    fn plan_inbound(&self, req: &InboundRequest<'_>) -> (InboundPlan, u64) {
        // Read before the state, so an update racing this plan is never missed.
        let version = self.ctx.state_changed.version();
        let st = self.ctx.state.read().expect("state lock");
        (plan_inbound(&st, &self.ctx.network, req), version)
    }

    /// Connects to the app at `app` in this pod, as the source (`src`) would.
    async fn connect_app(&self, app: SocketAddr, src: IpAddr) -> Result<TcpStream, Refusal> {
        connect_in(&self.netns, app, Some(src))
            .await
            .map_err(|e| Refusal::Unavailable(format!("app at {app}: {e}")))
    }

    pub(super) async fn inbound_plaintext(
        self: Arc<Self>,
        downstream: TcpStream,
        guard: ConnGuard,
    ) {
        let (Ok(peer), Ok(orig)) = (
            downstream.peer_addr().map(canonical),
            original_dst(&downstream),
        ) else {
            return;
        };
        let req = InboundRequest {
            peer,
            local: orig,
            hbone: None,
        };
        let (plan, version) = self.plan_inbound(&req);
        let mut report = report(&plan, peer, orig);
        report.trace_id = hbone::TraceParent::random().trace_id;
        let (app, dst, info) = match plan.action {
            InboundAction::Ignore => return,
            InboundAction::Refuse(why) => {
                let rec = ConnRecorder::open(self.ctx.metrics.clone(), report);
                return finish_refusal(rec, &why.to_refusal(), why.policy());
            }
            InboundAction::Connect { app, dst, info } => (app, dst, info),
        };
        match self.connect_app(app, info.src_ip).await {
            Err(refusal) => {
                let rec = ConnRecorder::open(self.ctx.metrics.clone(), report);
                finish_refusal(rec, &refusal, None);
            }
            Ok(app) => {
                let rec = ConnRecorder::open(self.ctx.metrics.clone(), report);
                let ctx = &self.ctx;
                let tracked =
                    ctx.tracker
                        .track(&dst.uid, info, version, &ctx.state_changed, &ctx.state);
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
    pub(super) async fn inbound_hbone(self: Arc<Self>, tcp: TcpStream, guard: ConnGuard) {
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

pub(super) struct InboundHandler {
    pod: Arc<PodProxy>,
}

/// An accepted CONNECT once set up: all that its task keeps while the tunnel lives.
struct InboundCopy {
    tunnel: hbone::Tunnel,
    app: TcpStream,
    rec: ConnRecorder,
    tracked: crate::proxy::tracker::TrackedHandle,
    guard: ConnGuard,
}

pin_project_lite::pin_project! {
    /// What ends an inbound copy early: a drain's forced close, or policy no longer
    /// allowing the connection. Owns its two waits, so the copy can own it.
    struct InboundStop {
        #[pin]
        drained: WaitForCancellationFutureOwned,
        #[pin]
        denied: WaitForCancellationFutureOwned,
    }
}

impl Future for InboundStop {
    type Output = io::Error;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Error> {
        let this = self.project();
        if this.drained.poll(cx).is_ready() {
            return Poll::Ready(io::Error::other("drained"));
        }
        if this.denied.poll(cx).is_ready() {
            return Poll::Ready(io::Error::other("closed: no longer allowed by policy"));
        }
        Poll::Pending
    }
}

/// Seen from the app: what came out of the tunnel was sent to it.
fn seen_from_app(s: CopyStats) -> CopyStats {
    CopyStats {
        sent: s.received,
        received: s.sent,
    }
}

/// Copies until both ends are done. Drain and policy end the copy as a failure
/// (CONNECT_ERROR on the stream, RST to the app), never as a silently dropped stream.
/// The copy owns the socket and the stop; the recorder, the policy tracker's entry and the
/// guard wait beside it, so the task is little more than the copy.
fn copy_inbound(c: InboundCopy) -> impl Future<Output = ()> + Send {
    let InboundCopy {
        tunnel,
        app,
        rec,
        tracked,
        guard,
    } = c;
    let stop = InboundStop {
        drained: guard.force_close.clone().cancelled_owned(),
        denied: tracked.closed_by_policy.clone().cancelled_owned(),
    };
    tunnel.copy_with_tcp_until(app, stop).map(move |result| {
        let result = result.map(seen_from_app).map_err(|mut e| {
            e.stats = seen_from_app(e.stats);
            e
        });
        finish_tunnel_copy(rec, result);
        drop((tracked, guard));
    })
}

impl ConnectHandler for InboundHandler {
    /// Everything before the copy (the plan, the connection to the app) runs boxed and is
    /// freed once done, so a tunnel's task keeps only its copy (see `copy_inbound`); the
    /// request is moved into that box at once rather than captured.
    fn handle(&self, req: InboundConnect, respond: Responder) -> impl Future<Output = ()> + Send {
        let opening = Box::pin(self.pod.clone().open_inbound(req, respond));
        opening.then(|opened| match opened {
            Some(c) => Either::Left(copy_inbound(c)),
            None => Either::Right(std::future::ready(())),
        })
    }
}

impl PodProxy {
    /// Plans a CONNECT, connects to the app and accepts the stream; `None` once it is
    /// refused (and recorded).
    async fn open_inbound(
        self: Arc<Self>,
        req: InboundConnect,
        respond: Responder,
    ) -> Option<InboundCopy> {
        let pod = &self;
        let guard = pod.drain.guard();
        let mut span = crate::trace::inbound(&pod.ctx.tracer, &req.request.traceparent);
        let local = canonical(req.local_addr);
        let peer = canonical(req.peer_addr);
        let authority = match &req.request.authority {
            Authority::Addr(a) => Authority::Addr(canonical(*a)),
            other => other.clone(),
        };
        let (plan, version) = pod.plan_inbound(&InboundRequest {
            peer,
            local,
            hbone: Some(HboneConnect {
                authority: &authority,
                forwarded_host: req.request.forwarded.host.as_deref(),
                peer_identity: &req.peer_identity,
            }),
        });
        let mut report = report(&plan, peer, local);
        report.src_identity = Some(req.peer_identity.clone());
        report.mtls = true;
        report.trace_id = req.request.traceparent.trace_id;
        let (app, dst, info) = match plan.action {
            // Never planned for a CONNECT; dropping the responder resets the stream.
            InboundAction::Ignore => return None,
            InboundAction::Refuse(why) => {
                let refusal = why.to_refusal();
                let rec = ConnRecorder::open(pod.ctx.metrics.clone(), report).traced(span.take());
                finish_refusal(rec, &refusal, why.policy());
                respond.refuse(&refusal);
                return None;
            }
            InboundAction::Connect { app, dst, info } => (app, dst, info),
        };
        let app = match pod.connect_app(app, info.src_ip).await {
            Ok(a) => a,
            Err(refusal) => {
                let rec = ConnRecorder::open(pod.ctx.metrics.clone(), report).traced(span.take());
                finish_refusal(rec, &refusal, None);
                respond.refuse(&refusal);
                return None;
            }
        };
        let rec = ConnRecorder::open(pod.ctx.metrics.clone(), report).traced(span.take());
        let Ok(tunnel) = respond.accept(Default::default()) else {
            rec.finish(Outcome::Failed {
                flags: "CONNECT",
                error: "stream reset before accept",
                sent: 0,
                received: 0,
            });
            return None;
        };
        let ctx = &pod.ctx;
        let tracked = ctx
            .tracker
            .track(&dst.uid, info, version, &ctx.state_changed, &ctx.state);
        Some(InboundCopy {
            tunnel,
            app,
            rec,
            tracked,
            guard,
        })
    }
}
