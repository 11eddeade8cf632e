//! Traces of the mesh's proxies: spans in W3C trace context (`traceparent`), exported
//! over OTLP/gRPC to a configurable collector (Jaeger, Tempo, an OpenTelemetry
//! Collector). One exporter task per process reads a bounded queue; a full queue drops
//! spans (counted): the data path never waits for the collector.
//!
//! - [`span`]: the span model, and an open span's context (child of a `traceparent`, or
//!   the root of a new trace).
//! - [`http`]: the waypoint's HTTP spans (a server span per request, a client span per
//!   upstream attempt).
//! - [`otlp`]: spans as OTLP export requests, bounded in size.
//! - [`export`]: the tracer (where finished spans go) and the exporter task.

#![forbid(unsafe_code)]

pub mod export;
pub mod http;
pub mod otlp;
pub mod span;

pub use export::{MAX_EXPORT_BYTES, QUEUE, Tracer};
pub use http::{ClientSpan, MAX_PATH_ATTRIBUTE, ServerSpan};
pub use otlp::{Origin, to_otlp, to_otlp_batches};
pub use span::{Attr, Kind, Link, OpenSpan, SAMPLED, Span, traceparent};
