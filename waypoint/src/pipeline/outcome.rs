//! Why a request ends without a backend's answer, typed: the retry stage branches on
//! [`UpstreamError::retriable`], the shell on the status each one maps to.

use http::StatusCode;

/// A request the waypoint answers itself, by decision of a stage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Local {
    /// An authorization policy denied it.
    Denied { policy: String, reason: String },
    /// Routes attach to the Service port, but no rule of theirs matches.
    NoRouteMatch {
        namespace: String,
        name: String,
        port: u16,
    },
    /// The selected rule (or the backend it picked) cannot be applied as written.
    RuleFailed { route: String, why: String },
    /// The rule's backend names no Service the waypoint knows.
    UnknownBackend { namespace: String, name: String },
    /// A fault filter aborted it with this status.
    FaultAbort(StatusCode),
    /// The configuration failed closed (a panic while applying xDS): nothing is served.
    ConfigFailed,
}

impl Local {
    pub fn status(&self) -> StatusCode {
        match self {
            Local::Denied { .. } => StatusCode::FORBIDDEN,
            Local::NoRouteMatch { .. } => StatusCode::NOT_FOUND,
            Local::RuleFailed { .. } => StatusCode::INTERNAL_SERVER_ERROR,
            Local::UnknownBackend { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Local::FaultAbort(code) => *code,
            Local::ConfigFailed => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// What the access log names as the backend.
    pub fn backend(&self) -> &'static str {
        match self {
            Local::FaultAbort(_) => "fault",
            _ => "-",
        }
    }
}

impl std::fmt::Display for Local {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Local::Denied { policy, .. } => write!(f, "RBAC: access denied by {policy}"),
            Local::NoRouteMatch {
                namespace,
                name,
                port,
            } => write!(
                f,
                "no route rule of {namespace}/{name}:{port} matches the request"
            ),
            Local::RuleFailed { why, .. } => f.write_str(why),
            Local::UnknownBackend { namespace, name } => {
                write!(f, "backend {namespace}/{name} is not a known service")
            }
            Local::FaultAbort(_) => f.write_str("fault filter abort"),
            Local::ConfigFailed => f.write_str(&crate::snapshot::Poisoned.to_string()),
        }
    }
}

/// Why one try at the upstream produced no response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamError {
    /// No endpoint of the Service can take it (none healthy, or all ejected).
    NoEndpoint { service: String, port: u16 },
    /// The Service has as many requests in flight as it may.
    Overflow { service: String },
    /// The tunnel or connection to the endpoint could not be opened.
    Connect(String),
    /// The connection failed while the request was sent or the response read.
    Protocol(String),
    /// The response cannot be forwarded faithfully (its framing).
    BadResponse(String),
    /// The try (or the whole request) took longer than the route allows.
    Timeout,
    /// The body cannot be kept for a retry or mirror.
    BodyTooLarge(String),
}

impl UpstreamError {
    pub fn status(&self) -> StatusCode {
        match self {
            UpstreamError::NoEndpoint { .. }
            | UpstreamError::Overflow { .. }
            | UpstreamError::Connect(_) => StatusCode::SERVICE_UNAVAILABLE,
            UpstreamError::Protocol(_) | UpstreamError::BadResponse(_) => StatusCode::BAD_GATEWAY,
            UpstreamError::Timeout => StatusCode::GATEWAY_TIMEOUT,
            UpstreamError::BodyTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
        }
    }

    /// Whether another try could succeed (a retry policy may then try again).
    pub fn retriable(&self) -> bool {
        !matches!(self, UpstreamError::BodyTooLarge(_))
    }
}

impl std::fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpstreamError::NoEndpoint { service, port } => {
                write!(f, "no healthy endpoint for {service}:{port}")
            }
            UpstreamError::Overflow { service } => write!(
                f,
                "upstream overflow: {service} has too many requests in flight"
            ),
            UpstreamError::Connect(e) => write!(f, "upstream connect error: {e}"),
            UpstreamError::Protocol(e) => write!(f, "upstream error: {e}"),
            UpstreamError::BadResponse(e) => write!(f, "upstream response: {e}"),
            UpstreamError::Timeout => f.write_str("upstream request timeout"),
            UpstreamError::BodyTooLarge(e) => {
                write!(f, "request body not buffered for retry/mirror: {e}")
            }
        }
    }
}

impl std::error::Error for UpstreamError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_and_statuses_as_before() {
        let d = Local::Denied {
            policy: "shop/p".into(),
            reason: "r".into(),
        };
        assert_eq!(
            (d.status(), d.to_string()),
            (
                StatusCode::FORBIDDEN,
                "RBAC: access denied by shop/p".into()
            )
        );
        let n = Local::NoRouteMatch {
            namespace: "shop".into(),
            name: "api".into(),
            port: 80,
        };
        assert_eq!(n.status(), StatusCode::NOT_FOUND);
        assert_eq!(
            n.to_string(),
            "no route rule of shop/api:80 matches the request"
        );
        assert_eq!(
            Local::FaultAbort(StatusCode::IM_A_TEAPOT).status().as_u16(),
            418
        );
        assert_eq!(
            Local::FaultAbort(StatusCode::IM_A_TEAPOT).backend(),
            "fault"
        );
        let cases = [
            (
                UpstreamError::NoEndpoint {
                    service: "shop/api".into(),
                    port: 80,
                },
                503,
                true,
            ),
            (
                UpstreamError::Overflow {
                    service: "shop/api".into(),
                },
                503,
                true,
            ),
            (UpstreamError::Connect("x".into()), 503, true),
            (UpstreamError::Protocol("x".into()), 502, true),
            (UpstreamError::BadResponse("x".into()), 502, true),
            (UpstreamError::Timeout, 504, true),
            (UpstreamError::BodyTooLarge("x".into()), 413, false),
        ];
        for (e, code, retriable) in cases {
            assert_eq!(e.status().as_u16(), code, "{e}");
            assert_eq!(e.retriable(), retriable, "{e}");
        }
        assert_eq!(
            UpstreamError::Timeout.to_string(),
            "upstream request timeout"
        );
    }
}
