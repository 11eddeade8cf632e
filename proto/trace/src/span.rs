//! The span model: what a finished span holds, and an open span's place in its trace.

use hbone::TraceParent;
use std::time::SystemTime;

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

/// A span of another trace this one relates to (OTLP span link): the connection a
/// request came on, when the request carries its own trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Link {
    pub trace_id: u128,
    pub span_id: u64,
    pub flags: u8,
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
    pub links: Vec<Link>,
    pub error: bool,
}

/// A new span id (never 0, which W3C reserves for "none").
pub fn span_id() -> u64 {
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

/// A span in progress: its place in a trace and when it started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenSpan {
    pub trace_id: u128,
    pub span_id: u64,
    pub parent_id: Option<u64>,
    pub flags: u8,
    pub start: SystemTime,
}

impl OpenSpan {
    /// The first span of a new, sampled trace.
    pub fn root() -> OpenSpan {
        OpenSpan {
            trace_id: TraceParent::random().trace_id,
            span_id: span_id(),
            parent_id: None,
            flags: SAMPLED,
            start: SystemTime::now(),
        }
    }

    /// A child of the span `parent` names, keeping the parent's sampling decision.
    pub fn child_of(parent: &TraceParent) -> OpenSpan {
        OpenSpan {
            trace_id: parent.trace_id,
            span_id: span_id(),
            parent_id: Some(parent.parent_id),
            flags: parent.flags,
            start: SystemTime::now(),
        }
    }

    /// The context that makes what follows (a CONNECT, a request) this span's child.
    pub fn context(&self) -> TraceParent {
        TraceParent {
            trace_id: self.trace_id,
            parent_id: self.span_id,
            flags: self.flags,
        }
    }

    pub fn finish(
        self,
        kind: Kind,
        name: String,
        attributes: Vec<(&'static str, Attr)>,
        error: bool,
    ) -> Span {
        Span {
            trace_id: self.trace_id,
            span_id: self.span_id,
            parent_id: self.parent_id,
            flags: self.flags,
            kind,
            name,
            start: self.start,
            end: SystemTime::now(),
            attributes,
            links: Vec::new(),
            error,
        }
    }
}

/// At most `max` bytes of `s`, cut at a character boundary.
pub fn truncate(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_child_continues_its_parents_trace_and_sampling() {
        let parent =
            TraceParent::parse("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00").unwrap();
        let c = OpenSpan::child_of(&parent);
        assert_eq!(
            (c.trace_id, c.parent_id, c.flags),
            (parent.trace_id, Some(parent.parent_id), 0)
        );
        assert_ne!(c.span_id, 0);
        let ctx = c.context();
        assert_eq!((ctx.trace_id, ctx.parent_id), (c.trace_id, c.span_id));
        let r = OpenSpan::root();
        assert_eq!((r.parent_id, r.flags), (None, SAMPLED));
        assert_ne!(r.trace_id, 0);
        let s = r.clone().finish(Kind::Client, "x".into(), vec![], true);
        assert_eq!(
            (s.trace_id, s.span_id, s.error),
            (r.trace_id, r.span_id, true)
        );
        assert!(s.end >= s.start);
    }

    #[test]
    fn truncation_cuts_at_a_character_boundary() {
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("héllo", 3), "hé");
        assert_eq!(truncate("abc", 10), "abc");
    }
}
