//! Traces from the waypoint: a server span per request and a client span per upstream
//! attempt (so retries show as sibling client spans), in the caller's W3C trace context
//! (`traceparent`), exported over OTLP/gRPC to a configurable collector (Jaeger, Tempo,
//! an OpenTelemetry Collector). One exporter task reads a bounded queue; a full queue
//! drops spans (counted): the request path never waits for the collector.

use hbone::TraceParent;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span as PbSpan, Status};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};
use tokio::sync::mpsc;

/// Spans waiting for the exporter; beyond this they are dropped.
pub const QUEUE: usize = 4096;
/// Spans per export call.
const BATCH: usize = 512;
/// An export request stays under this encoded size (gRPC servers refuse messages over
/// 4 MiB by default).
pub const MAX_EXPORT_BYTES: usize = 4 << 20;
/// `url.path` keeps at most this many bytes: the path is the peer's, spans are held in a
/// queue.
pub const MAX_PATH_ATTRIBUTE: usize = 256;
/// W3C trace flags: sampled.
pub const SAMPLED: u8 = 0x01;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Server,
    Client,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Attr {
    Str(String),
    Int(i64),
}

/// A finished span.
#[derive(Debug, Clone, PartialEq)]
pub struct Span {
    pub trace_id: u128,
    pub span_id: u64,
    pub parent_id: Option<u64>,
    pub flags: u8,
    pub kind: Kind,
    pub name: String,
    pub start: SystemTime,
    pub end: SystemTime,
    pub attributes: Vec<(&'static str, Attr)>,
    pub error: bool,
}

fn span_id() -> u64 {
    loop {
        let id: u64 = rand::random();
        if id != 0 {
            return id;
        }
    }
}

/// The `traceparent` value naming `span_id` as the parent of what follows.
pub fn traceparent(trace_id: u128, span_id: u64, flags: u8) -> String {
    TraceParent {
        trace_id,
        parent_id: span_id,
        flags,
    }
    .to_string()
}

/// A request's server span, open: it continues the caller's trace (and its sampling
/// decision) when the request carries a valid `traceparent`, else starts a new, sampled
/// trace.
#[derive(Debug, Clone)]
pub struct ServerSpan {
    pub trace_id: u128,
    pub span_id: u64,
    pub parent_id: Option<u64>,
    pub flags: u8,
    start: SystemTime,
}

impl ServerSpan {
    pub fn begin(incoming: Option<&str>) -> ServerSpan {
        let (trace_id, parent_id, flags) = match incoming.and_then(TraceParent::parse) {
            Some(tp) => (tp.trace_id, Some(tp.parent_id), tp.flags),
            None => (TraceParent::random().trace_id, None, SAMPLED),
        };
        ServerSpan {
            trace_id,
            span_id: span_id(),
            parent_id,
            flags,
            start: SystemTime::now(),
        }
    }

    /// The `traceparent` the upstream request carries (each attempt replaces it with
    /// its client span's).
    pub fn header(&self) -> String {
        traceparent(self.trace_id, self.span_id, self.flags)
    }

    /// Named as Istio names a waypoint's server span, `<service>:<port>/*`: bounded, unlike
    /// the path, which goes (truncated) into `url.path`.
    pub fn finish(self, service: &str, port: u16, method: &str, path: &str, status: u16) -> Span {
        Span {
            trace_id: self.trace_id,
            span_id: self.span_id,
            parent_id: self.parent_id,
            flags: self.flags,
            kind: Kind::Server,
            name: format!("{service}:{port}/*"),
            start: self.start,
            end: SystemTime::now(),
            attributes: vec![
                ("http.request.method", Attr::Str(method.into())),
                (
                    "url.path",
                    Attr::Str(truncate(path, MAX_PATH_ATTRIBUTE).into()),
                ),
                ("http.response.status_code", Attr::Int(status.into())),
                ("upstream_cluster", Attr::Str(service.into())),
            ],
            error: status >= 500,
        }
    }
}

/// One upstream attempt's client span, open: a child of the span named by the request's
/// `traceparent` (the server span's), which it then replaces with its own.
#[derive(Debug, Clone)]
pub struct ClientSpan {
    trace_id: u128,
    span_id: u64,
    parent_id: u64,
    flags: u8,
    start: SystemTime,
}

impl ClientSpan {
    /// `None` when the request has no valid `traceparent` (not traced).
    pub fn begin(headers: &mut http::HeaderMap) -> Option<ClientSpan> {
        let parent = headers
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .and_then(TraceParent::parse)?;
        let span = ClientSpan {
            trace_id: parent.trace_id,
            span_id: span_id(),
            parent_id: parent.parent_id,
            flags: parent.flags,
            start: SystemTime::now(),
        };
        if let Ok(v) = traceparent(span.trace_id, span.span_id, span.flags).parse() {
            headers.insert("traceparent", v);
        }
        Some(span)
    }

    /// `status` 0: no answer from the endpoint.
    pub fn finish(self, endpoint: &str, status: u16, error: Option<&str>) -> Span {
        let mut attributes = vec![
            ("upstream.endpoint", Attr::Str(endpoint.into())),
            ("http.response.status_code", Attr::Int(status.into())),
        ];
        if let Some(e) = error {
            attributes.push(("error.message", Attr::Str(e.into())));
        }
        Span {
            trace_id: self.trace_id,
            span_id: self.span_id,
            parent_id: Some(self.parent_id),
            flags: self.flags,
            kind: Kind::Client,
            name: format!("upstream {endpoint}"),
            start: self.start,
            end: SystemTime::now(),
            attributes,
            error: status == 0 || status >= 500,
        }
    }
}

/// At most `max` bytes of `s`, cut at a character boundary.
fn truncate(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn nanos(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn kv(key: &str, v: any_value::Value) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue { value: Some(v) }),
        ..Default::default()
    }
}

/// The OTLP export request carrying `spans` of the waypoint named `service`.
pub fn to_otlp(spans: Vec<Span>, service: &str) -> ExportTraceServiceRequest {
    envelope(spans.into_iter().map(pb_span).collect(), service)
}

/// `spans` as OTLP export requests, each under `max_bytes` encoded; a span that alone
/// would not fit is dropped (counted in the second value).
pub fn to_otlp_batches(
    spans: Vec<Span>,
    service: &str,
    max_bytes: usize,
) -> (Vec<ExportTraceServiceRequest>, usize) {
    use mesh_proto::prost::Message;
    // What the envelope (resource, scope) adds, and each span's field tag and length.
    let overhead = envelope(Vec::new(), service).encoded_len() + 16;
    let budget = max_bytes.saturating_sub(overhead);
    let (mut out, mut batch, mut size, mut dropped) = (Vec::new(), Vec::new(), 0, 0);
    for s in spans.into_iter().map(pb_span) {
        let len = s.encoded_len() + 8;
        if len > budget {
            dropped += 1;
            continue;
        }
        if size + len > budget {
            out.push(envelope(std::mem::take(&mut batch), service));
            size = 0;
        }
        size += len;
        batch.push(s);
    }
    if !batch.is_empty() {
        out.push(envelope(batch, service));
    }
    (out, dropped)
}

fn pb_span(s: Span) -> PbSpan {
    use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
    use opentelemetry_proto::tonic::trace::v1::status::StatusCode;
    PbSpan {
        trace_id: s.trace_id.to_be_bytes().to_vec(),
        span_id: s.span_id.to_be_bytes().to_vec(),
        parent_span_id: s
            .parent_id
            .map(|p| p.to_be_bytes().to_vec())
            .unwrap_or_default(),
        flags: s.flags.into(),
        name: s.name,
        kind: match s.kind {
            Kind::Server => SpanKind::Server,
            Kind::Client => SpanKind::Client,
        } as i32,
        start_time_unix_nano: nanos(s.start),
        end_time_unix_nano: nanos(s.end),
        attributes: s
            .attributes
            .into_iter()
            .map(|(k, v)| {
                kv(
                    k,
                    match v {
                        Attr::Str(s) => any_value::Value::StringValue(s),
                        Attr::Int(i) => any_value::Value::IntValue(i),
                    },
                )
            })
            .collect(),
        status: Some(Status {
            code: if s.error {
                StatusCode::Error
            } else {
                StatusCode::Unset
            } as i32,
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn envelope(spans: Vec<PbSpan>, service: &str) -> ExportTraceServiceRequest {
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: vec![kv(
                    "service.name",
                    any_value::Value::StringValue(service.into()),
                )],
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                scope: Some(InstrumentationScope {
                    name: "mesh-waypoint".into(),
                    version: env!("CARGO_PKG_VERSION").into(),
                    ..Default::default()
                }),
                spans,
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

/// Where finished spans go: nowhere (tracing off), or a bounded queue to the exporter.
pub struct Tracer {
    tx: Option<mpsc::Sender<Span>>,
    dropped: AtomicU64,
}

impl Tracer {
    pub fn disabled() -> Arc<Tracer> {
        Arc::new(Tracer {
            tx: None,
            dropped: AtomicU64::new(0),
        })
    }

    /// A tracer with a queue of `capacity`, and the queue's other end.
    pub fn with_queue(capacity: usize) -> (Arc<Tracer>, mpsc::Receiver<Span>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        (
            Arc::new(Tracer {
                tx: Some(tx),
                dropped: AtomicU64::new(0),
            }),
            rx,
        )
    }

    /// Exports to the OTLP/gRPC collector at `endpoint` (`http://host:4317`) as `service`.
    /// Spawns the exporter: call inside a Tokio runtime.
    pub fn otlp(endpoint: String, service: String) -> Arc<Tracer> {
        let (tracer, rx) = Tracer::with_queue(QUEUE);
        tokio::spawn(export(rx, endpoint, service));
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

    /// Spans dropped so far.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// Sends what the queue holds, in batches; a failed export drops its batch and
/// reconnects for the next one.
async fn export(mut rx: mpsc::Receiver<Span>, endpoint: String, service: String) {
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
        let (requests, too_large) = to_otlp_batches(batch, &service, MAX_EXPORT_BYTES);
        if too_large > 0 {
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
            continue;
        };
        for request in requests {
            let sent = tokio::time::timeout(Duration::from_secs(10), c.export(request)).await;
            if !matches!(sent, Ok(Ok(_))) {
                tracing::warn!(%endpoint, dropped = n, "OTLP export failed; reconnecting");
                client = None;
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_server_span_continues_the_callers_trace() {
        let s = ServerSpan::begin(Some(
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        ));
        assert_eq!(s.trace_id, 0x0af7651916cd43dd8448eb211c80319c);
        assert_eq!(s.parent_id, Some(0xb7ad6b7169203331));
        assert_eq!(s.flags, 1);
        assert_ne!(s.span_id, 0);
        assert_eq!(
            s.header(),
            format!("00-0af7651916cd43dd8448eb211c80319c-{:016x}-01", s.span_id)
        );
        let fresh = ServerSpan::begin(Some("garbage"));
        assert_eq!(
            fresh.parent_id, None,
            "a new trace when the header is invalid"
        );
        assert_ne!(fresh.trace_id, 0);
    }

    #[test]
    fn each_attempt_is_a_child_of_the_server_span_and_takes_its_place() {
        let server = ServerSpan::begin(None);
        let mut h = http::HeaderMap::new();
        h.insert("traceparent", server.header().parse().unwrap());
        let first = ClientSpan::begin(&mut h).unwrap();
        let after_first = h["traceparent"].to_str().unwrap().to_string();
        let a = first.finish("shop/v1", 503, None);
        assert_eq!(
            (a.trace_id, a.parent_id, a.kind, a.error),
            (server.trace_id, Some(server.span_id), Kind::Client, true)
        );
        assert_eq!(after_first, traceparent(a.trace_id, a.span_id, a.flags));
        // A retry starts from a copy of the original request: again the server's child.
        let mut h2 = http::HeaderMap::new();
        h2.insert("traceparent", server.header().parse().unwrap());
        let b = ClientSpan::begin(&mut h2)
            .unwrap()
            .finish("shop/v2", 200, None);
        assert_eq!(b.parent_id, Some(server.span_id));
        assert_ne!(a.span_id, b.span_id);
        assert!(ClientSpan::begin(&mut http::HeaderMap::new()).is_none());
    }

    #[test]
    fn spans_become_otlp() {
        let s = ServerSpan::begin(Some(
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        ))
        .finish("api.shop.svc.cluster.local", 80, "GET", "/x", 503);
        let req = to_otlp(vec![s.clone()], "waypoint.shop");
        let rs = &req.resource_spans[0];
        assert_eq!(
            rs.resource.as_ref().unwrap().attributes[0].key,
            "service.name"
        );
        let p = &rs.scope_spans[0].spans[0];
        assert_eq!(
            p.trace_id,
            0x0af7651916cd43dd8448eb211c80319cu128.to_be_bytes()
        );
        assert_eq!(p.parent_span_id, 0xb7ad6b7169203331u64.to_be_bytes());
        assert_eq!(p.kind, 2, "SPAN_KIND_SERVER");
        assert_eq!(p.name, "api.shop.svc.cluster.local:80/*");
        assert_eq!(p.status.as_ref().unwrap().code, 2, "STATUS_CODE_ERROR");
        assert!(p.end_time_unix_nano >= p.start_time_unix_nano);
    }

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

    /// A peer's 64 KiB path neither names the span nor fills the attribute; exports stay
    /// under the size a collector takes.
    #[test]
    fn spans_are_bounded_by_name_path_and_export_size() {
        let long = format!("/{}", "é".repeat(32 << 10));
        let s =
            ServerSpan::begin(None).finish("api.shop.svc.cluster.local", 8080, "GET", &long, 200);
        assert_eq!(s.name, "api.shop.svc.cluster.local:8080/*");
        let path = s
            .attributes
            .iter()
            .find_map(|(k, v)| match (k, v) {
                (&"url.path", Attr::Str(p)) => Some(p.clone()),
                _ => None,
            })
            .unwrap();
        assert!(
            path.len() <= MAX_PATH_ATTRIBUTE && long.starts_with(&path),
            "{}",
            path.len()
        );
        use mesh_proto::prost::Message;
        let spans = vec![s; 100];
        let (requests, dropped) = to_otlp_batches(spans.clone(), "waypoint.shop", 8 << 10);
        assert_eq!(dropped, 0);
        assert!(requests.len() > 1, "split");
        let mut n = 0;
        for r in &requests {
            assert!(r.encoded_len() <= 8 << 10, "{}", r.encoded_len());
            n += r.resource_spans[0].scope_spans[0].spans.len();
        }
        assert_eq!(n, 100, "every span in one request");
        let (requests, dropped) = to_otlp_batches(spans, "waypoint.shop", 200);
        assert!(
            requests.is_empty() && dropped == 100,
            "a span that cannot fit is dropped"
        );
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
