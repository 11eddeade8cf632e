//! Connection spans (off by default, `--otlp-endpoint`): the source ztunnel makes a
//! CLIENT span per tunnelled outbound connection, the root of a new sampled trace, and
//! sends it as the CONNECT's `traceparent`; a ztunnel terminating HBONE makes a SERVER
//! span per inbound tunnel, a child of that `traceparent`. Spans end with the connection
//! and say who talked to whom, the bytes each way, and why it failed or was denied.
//! Off, a connection costs one branch and the CONNECT carries a random, unsampled
//! context, as Istio's ztunnel sends.

use crate::metrics::{AccessLog, Completion};
use hbone::TraceParent;
use mesh_trace::{Attr, Kind, OpenSpan, Span, Tracer};
use std::sync::Arc;

/// An open connection span and where it goes when the connection ends.
pub struct ConnSpan {
    open: OpenSpan,
    kind: Kind,
    tracer: Arc<Tracer>,
}

/// The source side: the context the CONNECT carries, and the connection's span when
/// tracing is on.
pub fn outbound(tracer: &Arc<Tracer>) -> (TraceParent, Option<ConnSpan>) {
    if !tracer.enabled() {
        return (TraceParent::random(), None);
    }
    let open = OpenSpan::root();
    let context = open.context();
    let span = ConnSpan {
        open,
        kind: Kind::Client,
        tracer: tracer.clone(),
    };
    (context, Some(span))
}

/// The terminating side: a child of the CONNECT's context (exported only when that
/// context is sampled: a source that does not trace is not traced here either).
pub fn inbound(tracer: &Arc<Tracer>, connect: &TraceParent) -> Option<ConnSpan> {
    tracer.enabled().then(|| ConnSpan {
        open: OpenSpan::child_of(connect),
        kind: Kind::Server,
        tracer: tracer.clone(),
    })
}

impl ConnSpan {
    /// Ends the span as the access log ends the connection.
    pub fn finish(self, log: &AccessLog, done: &Completion, flags: &str) {
        self.tracer
            .record(connection_span(self.open, self.kind, log, done, flags));
    }
}

/// The finished span of a connection: named after its direction and target, the access
/// log's fields as attributes (the same names), an error status when it failed or was
/// denied.
pub fn connection_span(
    open: OpenSpan,
    kind: Kind,
    log: &AccessLog,
    done: &Completion,
    flags: &str,
) -> Span {
    let workload = |ns: &Option<String>, name: &Option<String>| match (ns, name) {
        (Some(ns), Some(n)) => Some(format!("{ns}/{n}")),
        _ => None,
    };
    let target = log.dst_hbone_addr.unwrap_or(log.dst_addr);
    let name = match (
        &log.dst_service,
        workload(&log.dst_namespace, &log.dst_workload),
    ) {
        (Some(s), _) => format!("{} {s}:{}", log.direction, target.port()),
        (None, Some(w)) => format!("{} {w}:{}", log.direction, target.port()),
        (None, None) => format!("{} {target}", log.direction),
    };
    let mut attributes = vec![
        ("direction", Attr::Str(log.direction.into())),
        ("src.addr", Attr::Str(log.src_addr.to_string())),
        ("dst.addr", Attr::Str(log.dst_addr.to_string())),
    ];
    let mut push = |key: &'static str, v: Option<String>| {
        if let Some(v) = v.filter(|v| !v.is_empty()) {
            attributes.push((key, Attr::Str(v)));
        }
    };
    push(
        "src.workload",
        workload(&log.src_namespace, &log.src_workload),
    );
    push("src.identity", log.src_identity.clone());
    push("dst.hbone_addr", log.dst_hbone_addr.map(|a| a.to_string()));
    push("dst.service", log.dst_service.clone());
    push(
        "dst.workload",
        workload(&log.dst_namespace, &log.dst_workload),
    );
    push("dst.identity", log.dst_identity.clone());
    push("response_flags", Some(flags.to_string()));
    push("error.message", done.error.clone());
    attributes.push(("bytes_sent", Attr::Int(clamp(done.bytes_sent))));
    attributes.push(("bytes_recv", Attr::Int(clamp(done.bytes_recv))));
    let error = done.error.is_some() || flags != "-";
    open.finish(kind, name, attributes, error)
}

fn clamp(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log() -> AccessLog {
        AccessLog {
            src_addr: "10.0.1.2:40000".parse().unwrap(),
            src_workload: Some("web-1".into()),
            src_namespace: Some("front".into()),
            src_identity: Some("spiffe://cluster.local/ns/front/sa/web".into()),
            dst_addr: "10.0.2.2:15008".parse().unwrap(),
            dst_hbone_addr: Some("10.0.2.2:8080".parse().unwrap()),
            dst_service: None,
            dst_workload: Some("api-1".into()),
            dst_namespace: Some("back".into()),
            dst_identity: Some("spiffe://cluster.local/ns/back/sa/api".into()),
            direction: "outbound",
            trace_id: String::new(),
        }
    }

    fn attr<'a>(s: &'a Span, key: &str) -> Option<&'a Attr> {
        s.attributes.iter().find(|(k, _)| *k == key).map(|(_, v)| v)
    }

    /// The source's span is the CONNECT's parent; the destination's is its child.
    #[test]
    fn the_connect_carries_the_source_span_to_the_destination() {
        let (tracer, mut rx) = Tracer::with_queue(8);
        let (connect, span) = outbound(&tracer);
        let span = span.expect("tracing on");
        assert_eq!(connect.flags, mesh_trace::SAMPLED, "a new sampled trace");
        let done = Completion {
            bytes_sent: 10,
            bytes_recv: 20,
            duration_ms: 1,
            error: None,
        };
        span.finish(&log(), &done, "-");
        // On the wire and back, as the destination parses it.
        let received = TraceParent::parse(&connect.to_string()).unwrap();
        inbound(&tracer, &received)
            .unwrap()
            .finish(&log(), &done, "-");
        let client = rx.try_recv().unwrap();
        let server = rx.try_recv().unwrap();
        assert_eq!((client.kind, client.parent_id), (Kind::Client, None));
        assert_eq!(connect.parent_id, client.span_id);
        assert_eq!(
            (server.kind, server.trace_id, server.parent_id),
            (Kind::Server, client.trace_id, Some(client.span_id))
        );
    }

    /// Off: no span, and the CONNECT carries what Istio's ztunnel sends (random, not
    /// sampled); an unsampled CONNECT is propagated but not exported.
    #[test]
    fn off_or_unsampled_exports_nothing() {
        let off = Tracer::disabled();
        let (connect, span) = outbound(&off);
        assert!(span.is_none());
        assert_eq!(connect.flags, 0);
        assert!(inbound(&off, &connect).is_none());
        let (on, mut rx) = Tracer::with_queue(8);
        let done = Completion {
            bytes_sent: 0,
            bytes_recv: 0,
            duration_ms: 0,
            error: None,
        };
        inbound(&on, &connect).unwrap().finish(&log(), &done, "-");
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn a_denied_connection_is_an_error_with_its_policy_and_bytes_each_way() {
        let mut l = log();
        l.direction = "inbound";
        let done = Completion {
            bytes_sent: 0,
            bytes_recv: 0,
            duration_ms: 3,
            error: Some(
                "connection closed due to policy rejection: explicitly denied by: back/deny-web"
                    .into(),
            ),
        };
        let s = connection_span(OpenSpan::root(), Kind::Server, &l, &done, "DENY");
        assert!(s.error);
        assert_eq!(s.name, "inbound back/api-1:8080");
        assert_eq!(attr(&s, "response_flags"), Some(&Attr::Str("DENY".into())));
        assert!(
            matches!(attr(&s, "error.message"), Some(Attr::Str(m)) if m.contains("back/deny-web"))
        );
        assert_eq!(
            attr(&s, "src.identity"),
            Some(&Attr::Str("spiffe://cluster.local/ns/front/sa/web".into()))
        );
        assert_eq!(
            attr(&s, "src.workload"),
            Some(&Attr::Str("front/web-1".into()))
        );
        assert_eq!(
            attr(&s, "dst.workload"),
            Some(&Attr::Str("back/api-1".into()))
        );
        let ok = Completion {
            bytes_sent: 5,
            bytes_recv: 7,
            duration_ms: 3,
            error: None,
        };
        let s = connection_span(OpenSpan::root(), Kind::Client, &log(), &ok, "-");
        assert!(!s.error);
        assert_eq!(attr(&s, "bytes_sent"), Some(&Attr::Int(5)));
        assert_eq!(attr(&s, "bytes_recv"), Some(&Attr::Int(7)));
        assert_eq!(attr(&s, "error.message"), None);
        assert_eq!(
            attr(&s, "dst.hbone_addr"),
            Some(&Attr::Str("10.0.2.2:8080".into()))
        );
    }
}
