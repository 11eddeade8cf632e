//! Where finished spans go: a bounded queue, read by one exporter task that sends them
//! to the OTLP/gRPC collector in batches.

use crate::otlp::{Origin, to_otlp_batches};
use crate::span::{SAMPLED, Span};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::mpsc;

/// Spans waiting for the exporter; beyond this they are dropped.
pub const QUEUE: usize = 4096;
/// Spans per export call.
const BATCH: usize = 512;
/// An export request stays under this encoded size (gRPC servers refuse messages over
/// 4 MiB by default).
pub const MAX_EXPORT_BYTES: usize = 4 << 20;

/// Where finished spans go: nowhere (tracing off), or a bounded queue to the exporter.
pub struct Tracer {
    tx: Option<mpsc::Sender<Span>>,
    /// Spans dropped: queue full, too large, or their export failed.
    dropped: Arc<AtomicU64>,
}

impl Tracer {
    pub fn disabled() -> Arc<Tracer> {
        Arc::new(Tracer {
            tx: None,
            dropped: Arc::default(),
        })
    }

    /// A tracer with a queue of `capacity`, and the queue's other end.
    pub fn with_queue(capacity: usize) -> (Arc<Tracer>, mpsc::Receiver<Span>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        (
            Arc::new(Tracer {
                tx: Some(tx),
                dropped: Arc::default(),
            }),
            rx,
        )
    }

    /// Exports to the OTLP/gRPC collector at `endpoint` (`http://host:4317`) as `origin`.
    /// Spawns the exporter: call inside a Tokio runtime.
    pub fn otlp(endpoint: String, origin: Origin) -> Arc<Tracer> {
        let (tracer, rx) = Tracer::with_queue(QUEUE);
        tokio::spawn(export(rx, endpoint, origin, tracer.dropped.clone()));
        tracer
    }

    pub fn enabled(&self) -> bool {
        self.tx.is_some()
    }

    /// Queues `span`, or drops it when the queue is full (the collector is slow or down).
    /// A span of a trace the caller did not sample is not exported (its context was
    /// still propagated).
    pub fn record(&self, span: Span) {
        if span.flags & SAMPLED == 0 {
            return;
        }
        if let Some(tx) = &self.tx
            && tx.try_send(span).is_err()
        {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Spans dropped so far (the queue was full, or the collector did not take them).
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// Sends what the queue holds, in batches; a failed export drops its batch and
/// reconnects for the next one.
async fn export(
    mut rx: mpsc::Receiver<Span>,
    endpoint: String,
    origin: Origin,
    dropped: Arc<AtomicU64>,
) {
    let mut client = None;
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(s) => batch.push(s),
                Err(_) => break,
            }
        }
        let n = batch.len();
        let (requests, too_large) = to_otlp_batches(batch, &origin, MAX_EXPORT_BYTES);
        if too_large > 0 {
            dropped.fetch_add(too_large as u64, Ordering::Relaxed);
            tracing::warn!(dropped = too_large, "spans too large to export dropped");
        }
        if client.is_none() {
            match tokio::time::timeout(
                Duration::from_secs(5),
                TraceServiceClient::connect(endpoint.clone()),
            )
            .await
            {
                Ok(Ok(c)) => client = Some(c),
                Ok(Err(e)) => {
                    tracing::warn!(%endpoint, error = %e, dropped = n, "cannot reach the OTLP collector")
                }
                Err(_) => {
                    tracing::warn!(%endpoint, dropped = n, "cannot reach the OTLP collector: timed out")
                }
            }
        }
        let Some(c) = client.as_mut() else {
            dropped.fetch_add((n - too_large) as u64, Ordering::Relaxed);
            continue;
        };
        let mut unsent: usize = requests.iter().map(spans_in).sum();
        for request in requests {
            let len = spans_in(&request);
            let sent = tokio::time::timeout(Duration::from_secs(10), c.export(request)).await;
            if !matches!(sent, Ok(Ok(_))) {
                tracing::warn!(%endpoint, dropped = unsent, "OTLP export failed; reconnecting");
                client = None;
                break;
            }
            unsent -= len;
        }
        dropped.fetch_add(unsent as u64, Ordering::Relaxed);
    }
}

fn spans_in(r: &ExportTraceServiceRequest) -> usize {
    r.resource_spans
        .iter()
        .flat_map(|rs| &rs.scope_spans)
        .map(|ss| ss.spans.len())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::{ClientSpan, ServerSpan};

    /// A request without `traceparent` starts a sampled trace, exported; a caller's
    /// unsampled context is propagated as it came, and nothing of it is exported.
    #[test]
    fn new_traces_are_sampled_and_unsampled_callers_are_not_exported() {
        let (tracer, mut rx) = Tracer::with_queue(8);
        let fresh = ServerSpan::begin(None);
        assert_eq!(fresh.flags, SAMPLED);
        assert!(fresh.header().ends_with("-01"), "{}", fresh.header());
        tracer.record(fresh.finish("s", 80, "GET", "/", 200));
        assert!(rx.try_recv().is_ok(), "exported");
        let unsampled = ServerSpan::begin(Some(
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00",
        ));
        assert!(unsampled.header().ends_with("-00"), "propagated unsampled");
        let mut h = http::HeaderMap::new();
        h.insert("traceparent", unsampled.header().parse().unwrap());
        let client = ClientSpan::begin(&mut h).unwrap();
        assert!(h["traceparent"].to_str().unwrap().ends_with("-00"));
        tracer.record(client.finish("shop/v1", 200, None));
        tracer.record(unsampled.finish("s", 80, "GET", "/", 200));
        assert!(rx.try_recv().is_err(), "not exported");
        assert_eq!(tracer.dropped(), 0);
    }

    /// Spans the collector never got are counted too (nobody listens on the port).
    #[tokio::test]
    async fn spans_a_collector_does_not_take_are_counted() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let tracer = Tracer::otlp(
            format!("http://127.0.0.1:{port}"),
            Origin {
                service: "t".into(),
                scope: "t",
            },
        );
        for _ in 0..3 {
            tracer.record(ServerSpan::begin(None).finish("s", 80, "GET", "/", 200));
        }
        // Polled: the exporter's connection attempt is refused at once on loopback.
        for _ in 0..200 {
            if tracer.dropped() == 3 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(tracer.dropped(), 3);
    }

    #[test]
    fn a_full_queue_drops_instead_of_waiting() {
        let (tracer, mut rx) = Tracer::with_queue(1);
        let span = ServerSpan::begin(None).finish("s", 80, "GET", "/", 200);
        for _ in 0..3 {
            tracer.record(span.clone());
        }
        assert_eq!(tracer.dropped(), 2);
        assert!(rx.try_recv().is_ok());
        assert!(Tracer::disabled().dropped() == 0 && !Tracer::disabled().enabled());
    }
}
