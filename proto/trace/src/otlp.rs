//! Spans as OTLP export requests (`opentelemetry.proto.collector.trace.v1`).

use crate::span::{Attr, Kind, Span};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span as PbSpan, Status};
use std::time::SystemTime;

/// Who sends the spans: the OTLP resource's `service.name` (`waypoint.shop`,
/// `ztunnel.node-1`) and the instrumentation scope (`mesh-waypoint`, `mesh-ztunnel`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub service: String,
    pub scope: &'static str,
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

/// The OTLP export request carrying `spans`.
pub fn to_otlp(spans: Vec<Span>, origin: &Origin) -> ExportTraceServiceRequest {
    envelope(spans.into_iter().map(pb_span).collect(), origin)
}

/// `spans` as OTLP export requests, each under `max_bytes` encoded; a span that alone
/// would not fit is dropped (counted in the second value).
pub fn to_otlp_batches(
    spans: Vec<Span>,
    origin: &Origin,
    max_bytes: usize,
) -> (Vec<ExportTraceServiceRequest>, usize) {
    use mesh_proto::prost::Message;
    // What the envelope (resource, scope) adds, and each span's field tag and length.
    let overhead = envelope(Vec::new(), origin).encoded_len() + 16;
    let budget = max_bytes.saturating_sub(overhead);
    let (mut out, mut batch, mut size, mut dropped) = (Vec::new(), Vec::new(), 0, 0);
    for s in spans.into_iter().map(pb_span) {
        let len = s.encoded_len() + 8;
        if len > budget {
            dropped += 1;
            continue;
        }
        if size + len > budget {
            out.push(envelope(std::mem::take(&mut batch), origin));
            size = 0;
        }
        size += len;
        batch.push(s);
    }
    if !batch.is_empty() {
        out.push(envelope(batch, origin));
    }
    (out, dropped)
}

fn pb_span(s: Span) -> PbSpan {
    use opentelemetry_proto::tonic::trace::v1::span::{Link as PbLink, SpanKind};
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
        links: s
            .links
            .into_iter()
            .map(|l| PbLink {
                trace_id: l.trace_id.to_be_bytes().to_vec(),
                span_id: l.span_id.to_be_bytes().to_vec(),
                flags: l.flags.into(),
                ..Default::default()
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

fn envelope(spans: Vec<PbSpan>, origin: &Origin) -> ExportTraceServiceRequest {
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: vec![kv(
                    "service.name",
                    any_value::Value::StringValue(origin.service.clone()),
                )],
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                scope: Some(InstrumentationScope {
                    name: origin.scope.into(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::ServerSpan;

    fn origin() -> Origin {
        Origin {
            service: "waypoint.shop".into(),
            scope: "mesh-waypoint",
        }
    }

    #[test]
    fn spans_become_otlp() {
        let conn =
            hbone::TraceParent::parse("00-11111111111111111111111111111111-2222222222222222-01")
                .unwrap();
        let s = ServerSpan::begin_in(
            Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
            Some(&conn),
        )
        .finish("api.shop.svc.cluster.local", 80, "GET", "/x", 503);
        let req = to_otlp(vec![s.clone()], &origin());
        let rs = &req.resource_spans[0];
        assert_eq!(
            rs.resource.as_ref().unwrap().attributes[0].key,
            "service.name"
        );
        assert_eq!(
            rs.scope_spans[0].scope.as_ref().unwrap().name,
            "mesh-waypoint"
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
        assert_eq!(p.links.len(), 1);
        assert_eq!(p.links[0].trace_id, conn.trace_id.to_be_bytes());
        assert_eq!(p.links[0].span_id, conn.parent_id.to_be_bytes());
    }

    /// Exports stay under the size a collector takes.
    #[test]
    fn exports_are_split_under_the_size_a_collector_takes() {
        use mesh_proto::prost::Message;
        let long = format!("/{}", "é".repeat(32 << 10));
        let s =
            ServerSpan::begin(None).finish("api.shop.svc.cluster.local", 8080, "GET", &long, 200);
        let spans = vec![s; 100];
        let (requests, dropped) = to_otlp_batches(spans.clone(), &origin(), 8 << 10);
        assert_eq!(dropped, 0);
        assert!(requests.len() > 1, "split");
        let mut n = 0;
        for r in &requests {
            assert!(r.encoded_len() <= 8 << 10, "{}", r.encoded_len());
            n += r.resource_spans[0].scope_spans[0].spans.len();
        }
        assert_eq!(n, 100, "every span in one request");
        let (requests, dropped) = to_otlp_batches(spans, &origin(), 200);
        assert!(
            requests.is_empty() && dropped == 100,
            "a span that cannot fit is dropped"
        );
    }
}
