//! Outbound (15001): carries out [`plan_outbound`] for a connection the pod's app made.

use super::plan::{self, OutboundPlan, plan_outbound};
use super::socket::{canonical, connect_in, original_dst};
use super::{PodProxy, counted, finish_copy, finish_tunnel_copy};
use crate::drain::ConnGuard;
use crate::metrics::{ConnRecorder, ConnReport, Direction, Outcome};
use crate::state::Workload;
use futures_util::future::{Either, FutureExt};
use mesh_identity::SpiffeId;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;
use tokio::net::TcpStream;

/// An outbound connection once set up: all that its task keeps while the connection
/// lives (see [`PodProxy::outbound`]).
enum OutboundCopy {
    /// To a destination outside the mesh, as plain TCP.
    Plain {
        downstream: TcpStream,
        upstream: TcpStream,
        rec: ConnRecorder,
    },
    /// Through an HBONE tunnel.
    Tunnel {
        downstream: TcpStream,
        tunnel: hbone::Tunnel,
        rec: ConnRecorder,
    },
}

/// Copies between the app and plain TCP until both ends are done, or a drain ends it;
/// then records the end. (Arguments rather than a struct taken apart: values moved out of
/// an async fn's argument would be kept twice in the task.)
async fn copy_plain(
    downstream: TcpStream,
    mut upstream: TcpStream,
    rec: ConnRecorder,
    guard: ConnGuard,
) {
    let mut downstream = counted::Counted::new(downstream);
    let result = tokio::select! {
        r = tokio::io::copy_bidirectional(&mut downstream, &mut upstream) => r,
        _ = guard.force_close.cancelled() => Err(io::Error::other("drained")),
    };
    finish_copy(rec, result, &downstream);
}

/// Copies between the app and its tunnel until both ends are done, or until a drain ends
/// the copy as a failure (CONNECT_ERROR on the stream, RST to the client), never as a
/// silently dropped stream; then records the end. The copy owns the socket and the drain's
/// wait; the recorder and the guard wait beside it, so the task is little more than the
/// copy.
fn copy_tunnel(
    downstream: TcpStream,
    tunnel: hbone::Tunnel,
    rec: ConnRecorder,
    guard: ConnGuard,
) -> impl Future<Output = ()> + Send {
    let drained = guard
        .force_close
        .clone()
        .cancelled_owned()
        .map(|()| io::Error::other("drained"));
    tunnel
        .copy_with_tcp_until(downstream, drained)
        .map(move |result| {
            finish_tunnel_copy(rec, result);
            drop(guard);
        })
}

impl PodProxy {
    /// One connection the pod's app made. Everything before the copy (the plan, the
    /// certificate, the HBONE connection) runs boxed and is freed once done, so a
    /// connection's task keeps only its copy for as long as it lives (inline, the set-up
    /// tripled an idle tunnel's task). Built from combinators rather than as an async fn,
    /// which would keep its arguments and the opened connection beside the copy.
    pub(super) fn outbound(
        self: Arc<Self>,
        downstream: TcpStream,
        guard: ConnGuard,
    ) -> impl Future<Output = ()> + Send {
        let opening = Box::pin(async move { self.open_outbound(downstream).await });
        opening.then(move |opened| match opened {
            None => Either::Left(Either::Left(std::future::ready(()))),
            // Plain TCP (outside the mesh) is boxed: the tunnel's copy sets the task's size.
            Some(OutboundCopy::Plain {
                downstream,
                upstream,
                rec,
            }) => Either::Left(Either::Right(Box::pin(copy_plain(
                downstream, upstream, rec, guard,
            )))),
            Some(OutboundCopy::Tunnel {
                downstream,
                tunnel,
                rec,
            }) => Either::Right(copy_tunnel(downstream, tunnel, rec, guard)),
        })
    }

    /// Plans and sets up an outbound connection; `None` once it is refused (and recorded).
    async fn open_outbound(&self, downstream: TcpStream) -> Option<OutboundCopy> {
        let Ok(peer) = downstream.peer_addr().map(canonical) else {
            return None;
        };
        let orig = match original_dst(&downstream) {
            Ok(o) => o,
            Err(e) => {
                tracing::warn!(pod = %self.info.name, error = %e, "no original destination on an outbound connection");
                return None;
            }
        };
        if plan::is_loop(orig) {
            tracing::warn!(dst = %orig, "refusing a connection to ztunnel's own port (loop)");
            return None;
        }
        let Some(src) = self.wait_for_workload().await else {
            tracing::warn!(pod = %format!("{}/{}", self.info.namespace, self.info.name),
                "refusing outbound connection: this pod is not (yet) known from the control plane");
            return None;
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
            trace_id: 0,
            started: Instant::now(),
        };
        match plan {
            OutboundPlan::Refuse(reason) => {
                report.trace_id = hbone::TraceParent::random().trace_id;
                let rec = ConnRecorder::open(self.ctx.metrics.clone(), report);
                rec.finish(Outcome::Failed {
                    flags: "CONNECT",
                    error: &reason.to_string(),
                    sent: 0,
                    received: 0,
                });
                None
            }
            OutboundPlan::Passthrough {
                dst,
                dst_workload,
                service,
            } => {
                report.dst_addr = dst;
                report.dst = dst_workload;
                report.dst_service = service;
                report.trace_id = hbone::TraceParent::random().trace_id;
                let rec = ConnRecorder::open(self.ctx.metrics.clone(), report);
                self.passthrough(downstream, dst, rec).await
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
                report.trace_id = req.traceparent.trace_id;
                let rec = ConnRecorder::open(self.ctx.metrics.clone(), report).traced(span);
                self.hbone_out(downstream, &src, hop, expected, req, rec)
                    .await
            }
        }
    }

    async fn passthrough(
        &self,
        downstream: TcpStream,
        dst: SocketAddr,
        rec: ConnRecorder,
    ) -> Option<OutboundCopy> {
        match connect_in(&self.netns, dst, None).await {
            Ok(upstream) => Some(OutboundCopy::Plain {
                downstream,
                upstream,
                rec,
            }),
            Err(e) => {
                rec.finish(Outcome::Failed {
                    flags: "CONNECT",
                    error: &e.to_string(),
                    sent: 0,
                    received: 0,
                });
                None
            }
        }
    }

    async fn hbone_out(
        &self,
        downstream: TcpStream,
        src: &Workload,
        hop: SocketAddr,
        expected: Vec<SpiffeId>,
        req: hbone::ConnectRequest,
        rec: ConnRecorder,
    ) -> Option<OutboundCopy> {
        let creds = match self.ctx.certs.get(&src.identity).await {
            Ok(c) => c,
            Err(e) => {
                rec.finish(Outcome::Failed {
                    flags: "IDENTITY_ERROR",
                    error: &e.to_string(),
                    sent: 0,
                    received: 0,
                });
                return None;
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
        let est = match self.client().connect(&key, &creds.cert, &req).await {
            Ok(e) => e,
            Err(e) => {
                rec.finish(Outcome::Failed {
                    flags: plan::connect_failure_flags(&e),
                    error: &e.to_string(),
                    sent: 0,
                    received: 0,
                });
                return None;
            }
        };
        Some(OutboundCopy::Tunnel {
            downstream,
            tunnel: est.tunnel,
            rec,
        })
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
