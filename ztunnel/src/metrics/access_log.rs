//! The access log, field for field as Istio's ztunnel writes it, so log pipelines built
//! for Istio parse ours: target `access`, message `connection opened` (debug) or
//! `connection complete` (info, or error with `error="…"`), and the fields in Istio's
//! order: `src.addr src.workload src.namespace src.identity dst.addr dst.hbone_addr
//! dst.service dst.workload dst.namespace dst.identity direction bytes_sent bytes_recv
//! duration error`. `dst.addr` is where the connection went (the HBONE address when
//! tunnelled), `dst.hbone_addr` the target inside the tunnel. Names, identities,
//! direction, duration and error are strings (quoted in text), addresses are printed
//! bare, byte counts are numbers; an unknown value is left out, not written empty.
//! Ours adds `id` (the W3C trace id) last.

use std::net::SocketAddr;

/// What one access-log line says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccessLog {
    pub src_addr: SocketAddr,
    pub src_workload: Option<String>,
    pub src_namespace: Option<String>,
    /// Only when the peer proved it (mTLS).
    pub src_identity: Option<String>,
    pub dst_addr: SocketAddr,
    pub dst_hbone_addr: Option<SocketAddr>,
    pub dst_service: Option<String>,
    pub dst_workload: Option<String>,
    pub dst_namespace: Option<String>,
    pub dst_identity: Option<String>,
    pub direction: &'static str,
    pub trace_id: String,
}

/// How the connection ended, as the log line's tail says it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Completion {
    pub bytes_sent: u64,
    pub bytes_recv: u64,
    pub duration_ms: u128,
    /// `None`: a clean end (logged at info), else the error (logged at error).
    pub error: Option<String>,
}

/// The error text of a policy refusal, in Istio's words: a DENY policy is named
/// (`… explicitly denied by: ns/name`), an ALLOW miss says that none allowed. `reason`
/// is the authorization evaluator's own (`matched DENY policy ns/name…` or
/// `no ALLOW policy matched (checked …)`); what it adds after the policy (why a policy
/// fails closed, which ALLOW policies were checked) is kept.
pub fn denial_error(policy: Option<&str>, reason: &str) -> String {
    const PREFIX: &str = "connection closed due to policy rejection";
    if let Some(p) = policy
        && let Some(rest) = reason.strip_prefix(&format!("matched DENY policy {p}"))
    {
        return format!("{PREFIX}: explicitly denied by: {p}{rest}");
    }
    match reason.strip_prefix("no ALLOW policy matched") {
        Some(rest) => format!("{PREFIX}: allow policies exist, but none allowed{rest}"),
        None => format!("{PREFIX}: {reason}"),
    }
}

fn opt(v: &Option<String>) -> Option<&str> {
    v.as_deref().filter(|s| !s.is_empty())
}

/// Writes Istio's fields, in Istio's order, then `$extra` (each ends with a comma).
macro_rules! access_event {
    ($level:expr, $l:expr, $msg:literal, $($extra:tt)*) => {
        tracing::event!(target: "access", $level,
            src.addr = %$l.src_addr,
            src.workload = opt(&$l.src_workload),
            src.namespace = opt(&$l.src_namespace),
            src.identity = opt(&$l.src_identity),
            dst.addr = %$l.dst_addr,
            dst.hbone_addr = $l.dst_hbone_addr.map(tracing::field::display),
            dst.service = opt(&$l.dst_service),
            dst.workload = opt(&$l.dst_workload),
            dst.namespace = opt(&$l.dst_namespace),
            dst.identity = opt(&$l.dst_identity),
            direction = $l.direction,
            $($extra)*
            $msg)
    };
}

impl AccessLog {
    pub fn opened(&self) {
        access_event!(
            tracing::Level::DEBUG,
            self,
            "connection opened",
            id = self.trace_id.as_str(),
        );
    }

    pub fn complete(&self, c: &Completion) {
        let duration = format!("{}ms", c.duration_ms);
        match &c.error {
            None => access_event!(
                tracing::Level::INFO,
                self,
                "connection complete",
                bytes_sent = c.bytes_sent,
                bytes_recv = c.bytes_recv,
                duration = duration.as_str(),
                id = self.trace_id.as_str(),
            ),
            Some(e) => access_event!(
                tracing::Level::ERROR,
                self,
                "connection complete",
                bytes_sent = c.bytes_sent,
                bytes_recv = c.bytes_recv,
                duration = duration.as_str(),
                error = e.as_str(),
                id = self.trace_id.as_str(),
            ),
        }
    }
}

#[cfg(test)]
mod tests;
