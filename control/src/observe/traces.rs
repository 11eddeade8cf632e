//! The dashboard's trace store: spans received over OTLP, kept in memory and bounded in
//! every dimension a sender controls (traces, spans per trace, attributes per span, the
//! size of each string), so nothing a sender sends grows without limit. What does not fit
//! is dropped and counted. Pure: the gRPC receiver (`otlp`) is a thin shell around it.

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::Span as PbSpan;
use serde::Serialize;
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap, VecDeque};

/// How much the store holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Traces kept; the one that arrived first goes when a new one comes.
    pub traces: usize,
    /// Spans kept per trace; later ones are dropped.
    pub spans_per_trace: usize,
    /// Attributes kept per span (the first ones).
    pub attributes_per_span: usize,
    /// Bytes kept of any string (span name, service, attribute key or value).
    pub string_bytes: usize,
    /// Memory for all spans held (estimated from their strings); the oldest traces go
    /// to make room. The caps above alone would allow gigabytes.
    pub bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            traces: 500,
            spans_per_trace: 200,
            attributes_per_span: 32,
            string_bytes: 256,
            bytes: 64 << 20,
        }
    }
}

/// What was dropped or cut so far (also shown by the API).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Dropped {
    /// Spans beyond a trace's cap.
    pub spans_over_trace_cap: u64,
    /// Spans without a valid trace or span id.
    pub invalid_spans: u64,
    /// Spans whose id the trace already held.
    pub duplicate_spans: u64,
    /// Whole traces pushed out by newer ones (over the trace cap or the memory cap).
    pub evicted_traces: u64,
    /// Spans that did not fit in memory even with every older trace gone.
    pub spans_over_memory_cap: u64,
    /// Attributes beyond a span's cap.
    pub attributes: u64,
    /// Strings cut to `string_bytes`.
    pub truncated_strings: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StoredSpan {
    pub span_id: String,
    pub parent_id: Option<String>,
    pub name: String,
    pub kind: &'static str,
    /// The sender's `service.name` (which proxy: a waypoint, a ztunnel, an app).
    pub service: String,
    #[serde(skip)]
    pub start_ns: u64,
    #[serde(skip)]
    pub end_ns: u64,
    pub error: bool,
    pub status_message: String,
    pub attributes: Vec<(String, String)>,
}

#[derive(Debug, Default)]
struct Trace {
    spans: Vec<StoredSpan>,
    /// The spans' estimated size.
    bytes: usize,
    /// Arrival order of the trace's first span (eviction and ties).
    seq: u64,
}

#[derive(Debug)]
pub struct Store {
    limits: Limits,
    traces: HashMap<u128, Trace>,
    /// Trace ids by arrival; the front is evicted first.
    order: VecDeque<u128>,
    next_seq: u64,
    pub dropped: Dropped,
    pub received_spans: u64,
    /// Estimated size of every span held.
    bytes: usize,
}

impl StoredSpan {
    /// Roughly what the span takes in memory: its strings and a fixed overhead.
    fn size(&self) -> usize {
        200 + self.span_id.len()
            + self.parent_id.as_ref().map_or(0, String::len)
            + self.name.len()
            + self.service.len()
            + self.status_message.len()
            + self
                .attributes
                .iter()
                .map(|(k, v)| 48 + k.len() + v.len())
                .sum::<usize>()
    }
}

/// At most `max` bytes of `s`, cut at a character boundary; counts a cut.
fn bounded(s: &str, max: usize, dropped: &mut Dropped) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    dropped.truncated_strings += 1;
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

fn id128(b: &[u8]) -> Option<u128> {
    let id = u128::from_be_bytes(b.try_into().ok()?);
    (id != 0).then_some(id)
}

fn id64(b: &[u8]) -> Option<u64> {
    let id = u64::from_be_bytes(b.try_into().ok()?);
    (id != 0).then_some(id)
}

/// An attribute value as text (nested values summarised, not walked).
fn value_text(v: &AnyValue) -> String {
    match &v.value {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        Some(any_value::Value::BytesValue(b)) => format!("<{} bytes>", b.len()),
        Some(any_value::Value::ArrayValue(a)) => format!("<array of {}>", a.values.len()),
        Some(any_value::Value::KvlistValue(k)) => format!("<{} key-values>", k.values.len()),
        _ => String::new(),
    }
}

fn kind_name(kind: i32) -> &'static str {
    match kind {
        1 => "internal",
        2 => "server",
        3 => "client",
        4 => "producer",
        5 => "consumer",
        _ => "unspecified",
    }
}

fn service_name(attrs: &[KeyValue]) -> &str {
    attrs
        .iter()
        .find(|kv| kv.key == "service.name")
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v| match &v.value {
            Some(any_value::Value::StringValue(s)) => Some(s.as_str()),
            _ => None,
        })
        .unwrap_or("unknown")
}

impl Store {
    pub fn new(limits: Limits) -> Store {
        Store {
            limits,
            traces: HashMap::new(),
            order: VecDeque::new(),
            next_seq: 0,
            dropped: Dropped::default(),
            received_spans: 0,
            bytes: 0,
        }
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Takes in an export request; returns how many of its spans were rejected (for
    /// OTLP's partial-success answer).
    pub fn ingest(&mut self, req: ExportTraceServiceRequest) -> u64 {
        let mut rejected = 0;
        for rs in req.resource_spans {
            let attrs = rs.resource.map(|r| r.attributes).unwrap_or_default();
            let service = bounded(
                service_name(&attrs),
                self.limits.string_bytes,
                &mut self.dropped,
            );
            for ss in rs.scope_spans {
                for span in ss.spans {
                    self.received_spans += 1;
                    if !self.add(span, &service) {
                        rejected += 1;
                    }
                }
            }
        }
        rejected
    }

    fn add(&mut self, s: PbSpan, service: &str) -> bool {
        let (Some(trace_id), Some(span_id)) = (id128(&s.trace_id), id64(&s.span_id)) else {
            self.dropped.invalid_spans += 1;
            return false;
        };
        let span_id = format!("{span_id:016x}");
        if let Some(t) = self.traces.get(&trace_id) {
            if t.spans.len() >= self.limits.spans_per_trace {
                self.dropped.spans_over_trace_cap += 1;
                return false;
            }
            if t.spans.iter().any(|x| x.span_id == span_id) {
                self.dropped.duplicate_spans += 1;
                return false;
            }
        }
        let max = self.limits.string_bytes;
        let d = &mut self.dropped;
        let mut attributes = Vec::new();
        for kv in &s.attributes {
            if attributes.len() >= self.limits.attributes_per_span {
                d.attributes += 1;
                continue;
            }
            let v = kv.value.as_ref().map(value_text).unwrap_or_default();
            attributes.push((bounded(&kv.key, max, d), bounded(&v, max, d)));
        }
        let status = s.status.unwrap_or_default();
        let span = StoredSpan {
            span_id,
            parent_id: id64(&s.parent_span_id).map(|p| format!("{p:016x}")),
            name: bounded(&s.name, max, d),
            kind: kind_name(s.kind),
            service: service.to_string(),
            start_ns: s.start_time_unix_nano,
            end_ns: s.end_time_unix_nano.max(s.start_time_unix_nano),
            // STATUS_CODE_ERROR.
            error: status.code == 2,
            status_message: bounded(&status.message, max, d),
            attributes,
        };
        let size = span.size();
        // Room in memory: older traces go first, never the one this span joins.
        while self.bytes + size > self.limits.bytes {
            let Some(pos) = self.order.iter().position(|t| *t != trace_id) else {
                break;
            };
            let old = self.order.remove(pos).expect("found above");
            self.evict(old);
        }
        if self.bytes + size > self.limits.bytes {
            self.dropped.spans_over_memory_cap += 1;
            return false;
        }
        if !self.traces.contains_key(&trace_id) {
            while self.traces.len() >= self.limits.traces.max(1) {
                let Some(old) = self.order.pop_front() else {
                    break;
                };
                self.evict(old);
            }
            self.order.push_back(trace_id);
            self.next_seq += 1;
            self.traces.insert(
                trace_id,
                Trace {
                    spans: Vec::new(),
                    bytes: 0,
                    seq: self.next_seq,
                },
            );
        }
        let t = self.traces.get_mut(&trace_id).expect("inserted above");
        t.spans.push(span);
        t.bytes += size;
        self.bytes += size;
        true
    }

    fn evict(&mut self, id: u128) {
        if let Some(t) = self.traces.remove(&id) {
            self.bytes -= t.bytes;
            self.dropped.evicted_traces += 1;
        }
    }

    /// Recent traces, newest first (by start), each summarised by its root span.
    pub fn list(&self) -> Value {
        let mut rows: Vec<(u64, u64, Value)> = self
            .traces
            .iter()
            .map(|(id, t)| {
                let start = t.spans.iter().map(|s| s.start_ns).min().unwrap_or(0);
                let end = t.spans.iter().map(|s| s.end_ns).max().unwrap_or(0);
                let root = root_span(&t.spans);
                let mut services: Vec<&str> = t.spans.iter().map(|s| s.service.as_str()).collect();
                services.sort();
                services.dedup();
                let v = json!({
                    "traceId": format!("{id:032x}"),
                    "root": root.map(|r| r.name.as_str()),
                    "rootService": root.map(|r| r.service.as_str()),
                    "startUnixNano": start.to_string(),
                    "durationMs": (end - start) as f64 / 1e6,
                    "spans": t.spans.len(),
                    "errors": t.spans.iter().filter(|s| s.error).count(),
                    "services": services,
                });
                (start, t.seq, v)
            })
            .collect();
        rows.sort_by_key(|r| std::cmp::Reverse((r.0, r.1)));
        json!({
            "receiving": true,
            "traces": rows.into_iter().map(|r| r.2).collect::<Vec<_>>(),
            "receivedSpans": self.received_spans,
            "dropped": self.dropped,
        })
    }

    /// One trace as timeline rows (see [`timeline`]), or `None` if not held.
    pub fn trace(&self, id: &str) -> Option<Value> {
        let tid = u128::from_str_radix(id, 16)
            .ok()
            .filter(|_| id.len() == 32)?;
        let t = self.traces.get(&tid)?;
        let start = t.spans.iter().map(|s| s.start_ns).min().unwrap_or(0);
        let end = t.spans.iter().map(|s| s.end_ns).max().unwrap_or(0);
        Some(json!({
            "traceId": format!("{tid:032x}"),
            "startUnixNano": start.to_string(),
            "durationUs": (end - start) / 1000,
            "spans": timeline(&t.spans),
        }))
    }
}

/// The span without a parent held in the trace (the earliest such one).
fn root_span(spans: &[StoredSpan]) -> Option<&StoredSpan> {
    let ids: std::collections::HashSet<&str> = spans.iter().map(|s| s.span_id.as_str()).collect();
    spans
        .iter()
        .filter(|s| s.parent_id.as_deref().is_none_or(|p| !ids.contains(p)))
        .min_by_key(|s| s.start_ns)
}

type Pending<'a> = Vec<(&'a StoredSpan, usize, Option<usize>)>;

/// Pushes `list` (siblings in start order) so that the first pops first, numbering
/// client spans as attempts.
fn push_children<'a>(stack: &mut Pending<'a>, list: &[&'a StoredSpan], depth: usize) {
    let mut attempt = 0;
    let numbered: Vec<_> = list
        .iter()
        .map(|s| {
            let a = (s.kind == "client").then(|| {
                attempt += 1;
                attempt
            });
            (*s, depth, a)
        })
        .collect();
    stack.extend(numbered.into_iter().rev());
}

/// One row of a trace's timeline.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Row {
    #[serde(flatten)]
    pub span: StoredSpan,
    /// Nesting below the root (0: a root, or a span whose parent was not received).
    pub depth: usize,
    /// The span names a parent this trace does not hold.
    pub missing_parent: bool,
    /// Start and duration relative to the trace's start, in microseconds.
    pub offset_us: u64,
    pub duration_us: u64,
    /// Among client spans of the same parent, in start order: 1 for the first attempt,
    /// 2 and up for retries.
    pub attempt: Option<usize>,
    /// `http.response.status_code`, when the span has it.
    pub http_status: Option<String>,
}

/// A trace's spans in timeline order: each span followed by its children (by start),
/// depth-first, with its depth, offsets, and attempt number among sibling client spans.
pub fn timeline(spans: &[StoredSpan]) -> Vec<Row> {
    let t0 = spans.iter().map(|s| s.start_ns).min().unwrap_or(0);
    let ids: std::collections::HashSet<&str> = spans.iter().map(|s| s.span_id.as_str()).collect();
    let mut children: BTreeMap<Option<&str>, Vec<&StoredSpan>> = BTreeMap::new();
    for s in spans {
        let parent = s.parent_id.as_deref().filter(|p| ids.contains(p));
        children.entry(parent).or_default().push(s);
    }
    for list in children.values_mut() {
        list.sort_by(|a, b| (a.start_ns, &a.span_id).cmp(&(b.start_ns, &b.span_id)));
    }
    let mut out = Vec::with_capacity(spans.len());
    // Iterative: a sender controls the depth.
    let mut stack: Pending = Vec::new();
    push_children(
        &mut stack,
        children.get(&None).map(Vec::as_slice).unwrap_or(&[]),
        0,
    );
    let mut seen = std::collections::HashSet::new();
    while let Some((s, depth, attempt)) = stack.pop() {
        if !seen.insert(s.span_id.as_str()) {
            continue;
        }
        out.push(row(s, depth, attempt, t0, &ids));
        if let Some(list) = children.get(&Some(s.span_id.as_str())) {
            push_children(&mut stack, list, depth + 1);
        }
    }
    // Spans whose parents form a cycle are reached from no root: shown flat at the end.
    let mut rest: Vec<&StoredSpan> = spans
        .iter()
        .filter(|s| !seen.contains(s.span_id.as_str()))
        .collect();
    rest.sort_by_key(|s| s.start_ns);
    for s in rest {
        out.push(row(s, 0, None, t0, &ids));
    }
    out
}

fn row(
    s: &StoredSpan,
    depth: usize,
    attempt: Option<usize>,
    t0: u64,
    ids: &std::collections::HashSet<&str>,
) -> Row {
    Row {
        span: s.clone(),
        depth,
        missing_parent: s.parent_id.as_deref().is_some_and(|p| !ids.contains(p)),
        offset_us: (s.start_ns - t0) / 1000,
        duration_us: (s.end_ns - s.start_ns) / 1000,
        attempt,
        http_status: s
            .attributes
            .iter()
            .find(|(k, _)| k == "http.response.status_code")
            .map(|(_, v)| v.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::resource::v1::Resource;
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Status};

    fn kv(k: &str, v: &str) -> KeyValue {
        KeyValue {
            key: k.into(),
            value: Some(AnyValue {
                value: Some(any_value::Value::StringValue(v.into())),
            }),
            ..Default::default()
        }
    }

    fn span(trace: u128, id: u64, parent: u64, kind: i32, name: &str, start: u64) -> PbSpan {
        PbSpan {
            trace_id: trace.to_be_bytes().to_vec(),
            span_id: id.to_be_bytes().to_vec(),
            parent_span_id: if parent == 0 {
                vec![]
            } else {
                parent.to_be_bytes().to_vec()
            },
            name: name.into(),
            kind,
            start_time_unix_nano: start,
            end_time_unix_nano: start + 10_000,
            ..Default::default()
        }
    }

    fn req(service: &str, spans: Vec<PbSpan>) -> ExportTraceServiceRequest {
        ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(Resource {
                    attributes: vec![kv("service.name", service)],
                    ..Default::default()
                }),
                scope_spans: vec![ScopeSpans {
                    spans,
                    ..Default::default()
                }],
                ..Default::default()
            }],
        }
    }

    fn limits() -> Limits {
        Limits {
            traces: 3,
            spans_per_trace: 4,
            attributes_per_span: 2,
            string_bytes: 8,
            bytes: 1 << 20,
        }
    }

    /// Memory makes room by evicting the oldest other traces; a span that cannot fit
    /// even then is dropped, and the accounting returns to zero as traces go.
    #[test]
    fn the_memory_cap_evicts_older_traces_then_drops() {
        let one = StoredSpan {
            span_id: format!("{:016x}", 1),
            parent_id: None,
            name: "x".into(),
            kind: "server",
            service: "a".into(),
            start_ns: 0,
            end_ns: 0,
            error: false,
            status_message: String::new(),
            attributes: vec![],
        }
        .size();
        let mut s = Store::new(Limits {
            traces: 100,
            spans_per_trace: 100,
            // Three root spans, or a root and two children (each 16 bytes more: the
            // parent's id).
            bytes: 3 * one + 64,
            ..limits()
        });
        for t in 1..=3u128 {
            assert_eq!(s.ingest(req("a", vec![span(t, 1, 0, 2, "x", 0)])), 0);
        }
        assert_eq!(s.bytes, 3 * one);
        // A fourth trace: the first goes.
        assert_eq!(s.ingest(req("a", vec![span(4, 1, 0, 2, "x", 0)])), 0);
        assert!(!s.traces.contains_key(&1) && s.traces.len() == 3);
        // Trace 4 grows: the others go, then its own spans beyond the cap are dropped.
        let more: Vec<PbSpan> = (2..=4).map(|i| span(4, i, 1, 3, "x", 0)).collect();
        assert_eq!(s.ingest(req("a", more)), 1);
        assert_eq!(s.traces.len(), 1);
        assert_eq!(s.traces[&4].spans.len(), 3);
        assert_eq!(s.dropped.evicted_traces, 3);
        assert_eq!(s.dropped.spans_over_memory_cap, 1);
        assert_eq!(s.bytes, 3 * one + 32);
        s.evict(4);
        assert_eq!(s.bytes, 0);
    }

    #[test]
    fn traces_beyond_the_cap_evict_the_oldest_arrival() {
        let mut s = Store::new(limits());
        for t in 1..=5u128 {
            s.ingest(req("a", vec![span(t, 1, 0, 2, "x", 1000 * t as u64)]));
        }
        assert_eq!(s.traces.len(), 3);
        assert_eq!(s.dropped.evicted_traces, 2);
        assert!(s.trace(&format!("{:032x}", 1)).is_none());
        let list = s.list();
        let ids: Vec<&str> = list["traces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["traceId"].as_str().unwrap())
            .collect();
        assert_eq!(
            ids,
            [5u128, 4, 3].map(|t| format!("{t:032x}")),
            "newest first"
        );
    }

    #[test]
    fn spans_attributes_and_strings_are_capped_and_counted() {
        let mut s = Store::new(limits());
        let mut big = span(7, 1, 0, 2, "a-very-long-name-é", 0);
        big.attributes = (0..5).map(|i| kv(&format!("k{i}"), "ééééé")).collect();
        let mut spans = vec![big];
        spans.extend((2..=6).map(|i| span(7, i, 1, 3, "c", i * 10)));
        let rejected = s.ingest(req("service-name-too-long", spans));
        assert_eq!(rejected, 2, "4 kept of 6");
        assert_eq!(s.dropped.spans_over_trace_cap, 2);
        assert_eq!(s.dropped.attributes, 3);
        let t = &s.traces[&7];
        let root = &t.spans[0];
        assert_eq!(root.name, "a-very-l");
        assert_eq!(root.service, "service-");
        assert_eq!(root.attributes.len(), 2);
        assert_eq!(root.attributes[0].1, "éééé", "cut at a character boundary");
        assert!(s.dropped.truncated_strings >= 4);
    }

    #[test]
    fn invalid_and_duplicate_spans_are_rejected() {
        let mut s = Store::new(limits());
        let mut zero = span(0, 1, 0, 2, "x", 0);
        let mut short = span(1, 1, 0, 2, "x", 0);
        short.span_id = vec![1, 2, 3];
        let dup = span(1, 9, 0, 2, "x", 0);
        assert_eq!(
            s.ingest(req("a", vec![zero.clone(), short, dup.clone()])),
            2
        );
        assert_eq!(s.ingest(req("a", vec![dup])), 1);
        assert_eq!(s.dropped.invalid_spans, 2);
        assert_eq!(s.dropped.duplicate_spans, 1);
        zero.trace_id = vec![];
        assert_eq!(s.ingest(req("a", vec![zero])), 1);
        assert_eq!(s.received_spans, 5);
    }

    /// client → ztunnel → waypoint server → two attempts (the first a 503) → ztunnel.
    #[test]
    fn the_timeline_nests_by_parent_orders_by_start_and_numbers_attempts() {
        let mut s = Store::new(Limits::default());
        let t = 0xabc;
        s.ingest(req(
            "waypoint.back",
            vec![
                span(t, 2, 1, 2, "api:80/*", 2_000_000),
                // Arrives before its earlier sibling.
                span(t, 4, 2, 3, "upstream b", 5_000_000),
                {
                    let mut a = span(t, 3, 2, 3, "upstream a", 3_000_000);
                    a.status = Some(Status {
                        code: 2,
                        message: "503".into(),
                    });
                    a.attributes = vec![kv("http.response.status_code", "503")];
                    a
                },
            ],
        ));
        s.ingest(req(
            "ztunnel-1",
            vec![
                span(t, 1, 0, 3, "connect", 1_000_000),
                span(t, 5, 4, 3, "connect b", 5_500_000),
                span(t, 6, 99, 2, "orphan", 9_000_000),
            ],
        ));
        let v = s.trace(&format!("{t:032x}")).unwrap();
        let rows = v["spans"].as_array().unwrap();
        let got: Vec<(&str, u64, Option<u64>, bool)> = rows
            .iter()
            .map(|r| {
                (
                    r["name"].as_str().unwrap(),
                    r["depth"].as_u64().unwrap(),
                    r["attempt"].as_u64(),
                    r["error"].as_bool().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("connect", 0, Some(1), false),
                ("api:80/*", 1, None, false),
                ("upstream a", 2, Some(1), true),
                ("upstream b", 2, Some(2), false),
                ("connect b", 3, Some(1), false),
                ("orphan", 0, None, false),
            ]
        );
        assert_eq!(rows[2]["httpStatus"], "503");
        assert_eq!(rows[2]["service"], "waypoint.back");
        assert_eq!(rows[1]["offsetUs"], 1000);
        assert_eq!(rows[1]["durationUs"], 10);
        assert_eq!(rows[5]["missingParent"], true);
        let list = s.list();
        let first = &list["traces"][0];
        assert_eq!(first["root"], "connect");
        assert_eq!(first["rootService"], "ztunnel-1");
        assert_eq!(first["errors"], 1);
        assert_eq!(first["spans"], 6);
        assert!(s.trace("not-hex").is_none());
        assert!(s.trace(&format!("{:032x}", 1)).is_none());
    }

    /// A sender's chain of 100k nested spans is walked without recursion.
    #[test]
    fn a_deep_chain_does_not_overflow_the_stack() {
        let spans: Vec<StoredSpan> = (1..=100_000u64)
            .map(|i| StoredSpan {
                span_id: format!("{i:016x}"),
                parent_id: (i > 1).then(|| format!("{:016x}", i - 1)),
                name: "s".into(),
                kind: "internal",
                service: "x".into(),
                start_ns: i,
                end_ns: i,
                error: false,
                status_message: String::new(),
                attributes: vec![],
            })
            .collect();
        let rows = timeline(&spans);
        assert_eq!(rows.len(), 100_000);
        assert_eq!(rows.last().unwrap().depth, 99_999);
        // Parents in a cycle: every span still shown once.
        let mut cycle = spans[..2].to_vec();
        cycle[0].parent_id = Some(cycle[1].span_id.clone());
        let rows = timeline(&cycle);
        assert_eq!(rows.len(), 2);
        assert!(rows.iter().all(|r| r.depth == 0));
    }
}
