//! The waypoint's HTTP spans: a server span per request and a client span per upstream
//! attempt (so retries show as sibling client spans).

use crate::span::{Attr, Kind, Link, SAMPLED, Span, span_id, traceparent, truncate};
use hbone::TraceParent;
use std::time::SystemTime;

/// `url.path` keeps at most this many bytes: the path is the peer's, spans are held in a
/// queue.
pub const MAX_PATH_ATTRIBUTE: usize = 256;

/// A request's server span, open. Its parent, in order: the request's own valid
/// `traceparent` (the app's trace wins, linked to the connection's span), else the
/// sampled `traceparent` of the HBONE CONNECT the request came on (the source ztunnel's
/// connection span: one trace covers the whole journey), else none (a new, sampled
/// trace).
#[derive(Debug, Clone)]
pub struct ServerSpan {
    pub trace_id: u128,
    pub span_id: u64,
    pub parent_id: Option<u64>,
    pub flags: u8,
    pub links: Vec<Link>,
    start: SystemTime,
}

impl ServerSpan {
    /// A request with no connection context (see [`ServerSpan::begin_in`]).
    pub fn begin(incoming: Option<&str>) -> ServerSpan {
        ServerSpan::begin_in(incoming, None)
    }

    /// `incoming`: the request's `traceparent`; `connection`: the CONNECT's. A connection
    /// context that is not sampled is nobody's exported span, so it is neither parent
    /// nor link.
    pub fn begin_in(incoming: Option<&str>, connection: Option<&TraceParent>) -> ServerSpan {
        let connection = connection.filter(|c| c.flags & SAMPLED != 0);
        let (trace_id, parent_id, flags, links) =
            match (incoming.and_then(TraceParent::parse), connection) {
                (Some(tp), c) => (
                    tp.trace_id,
                    Some(tp.parent_id),
                    tp.flags,
                    c.map(|c| Link {
                        trace_id: c.trace_id,
                        span_id: c.parent_id,
                        flags: c.flags,
                    })
                    .into_iter()
                    .collect(),
                ),
                (None, Some(c)) => (c.trace_id, Some(c.parent_id), c.flags, Vec::new()),
                (None, None) => (TraceParent::random().trace_id, None, SAMPLED, Vec::new()),
            };
        ServerSpan {
            trace_id,
            span_id: span_id(),
            parent_id,
            flags,
            links,
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
            links: self.links,
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
            links: Vec::new(),
            error: status == 0 || status >= 500,
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

    /// The journey: without a trace of its own, a request joins its connection's trace;
    /// with one, it keeps it and links the connection's span.
    #[test]
    fn the_connection_is_the_parent_unless_the_request_has_a_trace() {
        let conn =
            TraceParent::parse("00-11111111111111111111111111111111-2222222222222222-01").unwrap();
        let s = ServerSpan::begin_in(None, Some(&conn));
        assert_eq!(
            (s.trace_id, s.parent_id, s.flags),
            (conn.trace_id, Some(conn.parent_id), SAMPLED)
        );
        assert!(s.links.is_empty());
        let s = ServerSpan::begin_in(
            Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
            Some(&conn),
        );
        assert_eq!(
            (s.trace_id, s.parent_id),
            (0x0af7651916cd43dd8448eb211c80319c, Some(0xb7ad6b7169203331)),
            "the app's trace wins"
        );
        assert_eq!(
            s.links,
            [Link {
                trace_id: conn.trace_id,
                span_id: conn.parent_id,
                flags: SAMPLED
            }]
        );
        let span = s.finish("s", 80, "GET", "/", 200);
        assert_eq!(span.links.len(), 1, "the link is exported");
        // An unsampled CONNECT (tracing off at the source, or Istio's random context)
        // is no parent: a new sampled trace, as without a connection.
        let unsampled = TraceParent::random();
        let s = ServerSpan::begin_in(None, Some(&unsampled));
        assert_ne!(s.trace_id, unsampled.trace_id);
        assert_eq!((s.parent_id, s.flags), (None, SAMPLED));
        let s = ServerSpan::begin_in(
            Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
            Some(&unsampled),
        );
        assert!(s.links.is_empty());
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

    /// A peer's 64 KiB path neither names the span nor fills the attribute.
    #[test]
    fn spans_are_bounded_by_name_and_path() {
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
    }
}
