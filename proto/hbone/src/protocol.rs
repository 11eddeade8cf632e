//! HBONE protocol rules as plain functions: the CONNECT authority, the metadata headers,
//! the status codes and what they mean to a client. No sockets here.

use http::{HeaderMap, HeaderValue, Method, Request, StatusCode};
use std::fmt;
use std::net::{IpAddr, SocketAddr};

pub const BAGGAGE: &str = "baggage";
pub const FORWARDED: &str = "forwarded";
pub const TRACEPARENT: &str = "traceparent";

/// The target of a CONNECT: an `ip:port` (normal case) or `host:port` (a service hostname).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Authority {
    Addr(SocketAddr),
    Host { host: String, port: u16 },
}

impl Authority {
    pub fn port(&self) -> u16 {
        match self {
            Authority::Addr(a) => a.port(),
            Authority::Host { port, .. } => *port,
        }
    }
}

impl fmt::Display for Authority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // SocketAddr prints IPv6 as [addr]:port, as an authority must.
            Authority::Addr(a) => write!(f, "{a}"),
            Authority::Host { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

impl From<SocketAddr> for Authority {
    fn from(a: SocketAddr) -> Self {
        Authority::Addr(a)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthorityError {
    #[error("authority is missing")]
    Missing,
    #[error("authority {0:?} has no port")]
    NoPort(String),
    #[error("authority {0:?} has an invalid port")]
    BadPort(String),
    #[error("authority {0:?} has an invalid host")]
    BadHost(String),
}

/// Parses `ip:port`, `[v6]:port` or `host:port`.
pub fn parse_authority(s: &str) -> Result<Authority, AuthorityError> {
    if s.is_empty() {
        return Err(AuthorityError::Missing);
    }
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return Ok(Authority::Addr(addr));
    }
    let (host, port) = s
        .rsplit_once(':')
        .ok_or_else(|| AuthorityError::NoPort(s.to_string()))?;
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| AuthorityError::BadPort(s.to_string()))?;
    let valid_host = !host.is_empty()
        && host.len() <= 253
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_');
    if !valid_host || host.parse::<IpAddr>().is_ok() {
        return Err(AuthorityError::BadHost(s.to_string()));
    }
    Ok(Authority::Host {
        host: host.to_ascii_lowercase(),
        port,
    })
}

/// RFC 7239 `forwarded: for="ip:port"[;host=<service fqdn>]`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Forwarded {
    pub for_addr: Option<SocketAddr>,
    pub host: Option<String>,
}

impl Forwarded {
    pub fn to_header(&self) -> Option<HeaderValue> {
        let mut parts = Vec::with_capacity(2);
        if let Some(a) = self.for_addr {
            parts.push(format!("for=\"{a}\""));
        }
        if let Some(h) = &self.host {
            parts.push(format!("host={h}"));
        }
        if parts.is_empty() {
            return None;
        }
        HeaderValue::from_str(&parts.join(";")).ok()
    }

    /// Lenient parse of the first forwarded element; unknown parameters are ignored.
    pub fn parse(value: &str) -> Forwarded {
        let first = value.split(',').next().unwrap_or_default();
        let mut out = Forwarded::default();
        for pair in first.split(';') {
            let Some((k, v)) = pair.trim().split_once('=') else {
                continue;
            };
            let v = v.trim().trim_matches('"');
            match k.trim().to_ascii_lowercase().as_str() {
                "for" => out.for_addr = v.parse().ok(),
                "host" if !v.is_empty() => out.host = Some(v.to_string()),
                _ => {}
            }
        }
        out
    }
}

/// W3C trace context; a fresh random one per outbound connection, not sampled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: u128,
    pub parent_id: u64,
    pub flags: u8,
}

impl TraceParent {
    pub fn random() -> Self {
        loop {
            let t = TraceParent {
                trace_id: rand::random(),
                parent_id: rand::random(),
                flags: 0,
            };
            if t.trace_id != 0 && t.parent_id != 0 {
                return t;
            }
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        let mut it = s.trim().split('-');
        let (Some(v), Some(t), Some(p), Some(f)) = (it.next(), it.next(), it.next(), it.next())
        else {
            return None;
        };
        if v != "00" || t.len() != 32 || p.len() != 16 || f.len() != 2 {
            return None;
        }
        let tp = TraceParent {
            trace_id: u128::from_str_radix(t, 16).ok()?,
            parent_id: u64::from_str_radix(p, 16).ok()?,
            flags: u8::from_str_radix(f, 16).ok()?,
        };
        (tp.trace_id != 0 && tp.parent_id != 0).then_some(tp)
    }
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{:032x}-{:016x}-{:02x}",
            self.trace_id, self.parent_id, self.flags
        )
    }
}

/// What a client asks an HBONE server for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectRequest {
    pub authority: Authority,
    pub forwarded: Forwarded,
    /// Describes the source workload (`k8s.namespace.name=...,...`).
    pub baggage: Option<String>,
    pub traceparent: TraceParent,
}

impl ConnectRequest {
    pub fn new(authority: impl Into<Authority>) -> Self {
        ConnectRequest {
            authority: authority.into(),
            forwarded: Forwarded::default(),
            baggage: None,
            traceparent: TraceParent::random(),
        }
    }

    /// The HTTP/2 CONNECT request (`:method CONNECT`, `:authority`, no scheme or path).
    pub fn to_http(&self) -> Result<Request<()>, http::Error> {
        let mut b = Request::builder()
            .method(Method::CONNECT)
            .uri(self.authority.to_string())
            .header(TRACEPARENT, self.traceparent.to_string());
        if let Some(f) = self.forwarded.to_header() {
            b = b.header(FORWARDED, f);
        }
        if let Some(bg) = &self.baggage {
            b = b.header(BAGGAGE, bg.as_str());
        }
        b.body(())
    }

    /// Validates an incoming request. Errors map to 400.
    pub fn from_http(
        method: &Method,
        uri: &http::Uri,
        headers: &HeaderMap,
    ) -> Result<Self, BadRequest> {
        if method != Method::CONNECT {
            return Err(BadRequest::NotConnect(method.to_string()));
        }
        let authority = uri.authority().map(|a| a.as_str()).unwrap_or_default();
        let authority = parse_authority(authority).map_err(BadRequest::Authority)?;
        let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        Ok(ConnectRequest {
            authority,
            forwarded: text(FORWARDED).map(Forwarded::parse).unwrap_or_default(),
            baggage: text(BAGGAGE).map(str::to_string),
            // A missing or malformed traceparent is tolerated: make our own for logs.
            traceparent: text(TRACEPARENT)
                .and_then(TraceParent::parse)
                .unwrap_or_else(TraceParent::random),
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadRequest {
    #[error("method {0} is not CONNECT")]
    NotConnect(String),
    #[error(transparent)]
    Authority(AuthorityError),
}

/// Why a server refuses a CONNECT; each has its own status so clients can tell them apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Malformed request or authority that does not belong on this connection.
    BadRequest(String),
    /// Denied by authorization policy.
    Unauthorized(String),
    /// A target this server does not serve for anyone (e.g. a waypoint asked to relay to
    /// a destination not bound to it).
    Forbidden(String),
    /// Unknown target, loop to a proxy port, or the app could not be reached.
    Unavailable(String),
}

impl Refusal {
    pub fn status(&self) -> StatusCode {
        match self {
            Refusal::BadRequest(_) => StatusCode::BAD_REQUEST,
            Refusal::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Refusal::Forbidden(_) => StatusCode::FORBIDDEN,
            Refusal::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
    pub fn reason(&self) -> &str {
        match self {
            Refusal::BadRequest(r)
            | Refusal::Unauthorized(r)
            | Refusal::Forbidden(r)
            | Refusal::Unavailable(r) => r,
        }
    }
}

/// How a client reads a non-200 answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("the server rejected the CONNECT as malformed (400)")]
    BadRequest,
    #[error("denied by the destination's authorization policy (401)")]
    Unauthorized,
    #[error("the destination is unavailable (503): unknown workload or app not listening")]
    Unavailable,
    #[error("unexpected status {0} from the HBONE server")]
    Other(u16),
}

/// `None` means the tunnel was established.
pub fn classify_status(status: StatusCode) -> Option<Refused> {
    match status {
        StatusCode::OK => None,
        StatusCode::BAD_REQUEST => Some(Refused::BadRequest),
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Some(Refused::Unauthorized),
        StatusCode::SERVICE_UNAVAILABLE => Some(Refused::Unavailable),
        other => Some(Refused::Other(other.as_u16())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authority_forms() {
        assert_eq!(
            parse_authority("10.0.0.1:8080").unwrap(),
            Authority::Addr("10.0.0.1:8080".parse().unwrap())
        );
        assert_eq!(
            parse_authority("[fd00::1]:80").unwrap(),
            Authority::Addr("[fd00::1]:80".parse().unwrap())
        );
        assert_eq!(
            parse_authority("Svc.NS.svc.cluster.local:80").unwrap(),
            Authority::Host {
                host: "svc.ns.svc.cluster.local".into(),
                port: 80
            }
        );
        assert_eq!(parse_authority(""), Err(AuthorityError::Missing));
        assert!(matches!(
            parse_authority("10.0.0.1"),
            Err(AuthorityError::NoPort(_))
        ));
        assert!(matches!(
            parse_authority("host:0"),
            Err(AuthorityError::BadPort(_))
        ));
        assert!(matches!(
            parse_authority("host:99999"),
            Err(AuthorityError::BadPort(_))
        ));
        assert!(matches!(
            parse_authority("ho st:80"),
            Err(AuthorityError::BadHost(_))
        ));
        assert!(matches!(
            parse_authority("fd00::1:80"),
            Err(AuthorityError::BadHost(_))
        ));
        assert!(matches!(
            parse_authority(":80"),
            Err(AuthorityError::BadHost(_))
        ));
        // Display gives back a parseable authority.
        for a in ["10.0.0.1:80", "[fd00::1]:80", "a.b:1"] {
            let p = parse_authority(a).unwrap();
            assert_eq!(parse_authority(&p.to_string()).unwrap(), p);
        }
    }

    #[test]
    fn forwarded_round_trip_and_leniency() {
        let f = Forwarded {
            for_addr: Some("10.0.0.1:1234".parse().unwrap()),
            host: Some("s.ns.svc.cluster.local".into()),
        };
        let h = f.to_header().unwrap();
        assert_eq!(h, "for=\"10.0.0.1:1234\";host=s.ns.svc.cluster.local");
        assert_eq!(Forwarded::parse(h.to_str().unwrap()), f);
        assert_eq!(
            Forwarded::parse("for=\"[fd00::1]:9\";proto=http, for=1.2.3.4"),
            Forwarded {
                for_addr: Some("[fd00::1]:9".parse().unwrap()),
                host: None
            }
        );
        assert_eq!(Forwarded::parse("garbage"), Forwarded::default());
        assert!(Forwarded::default().to_header().is_none());
    }

    #[test]
    fn traceparent_format() {
        let t = TraceParent::random();
        let s = t.to_string();
        assert_eq!(s.len(), 55);
        assert!(s.starts_with("00-") && s.ends_with("-00"));
        assert_eq!(TraceParent::parse(&s), Some(t));
        assert_eq!(TraceParent::parse("00-0-0-00"), None);
        assert_eq!(
            TraceParent::parse("00-00000000000000000000000000000000-0000000000000001-00"),
            None
        );
        assert_eq!(
            TraceParent::parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            None
        );
    }

    #[test]
    fn request_validation() {
        let mut req = ConnectRequest::new("10.0.0.2:80".parse::<SocketAddr>().unwrap());
        req.forwarded.for_addr = Some("10.0.0.1:5555".parse().unwrap());
        req.baggage = Some("k8s.namespace.name=a".into());
        let http = req.to_http().unwrap();
        assert_eq!(http.method(), Method::CONNECT);
        assert_eq!(http.uri().to_string(), "10.0.0.2:80");
        let back = ConnectRequest::from_http(http.method(), http.uri(), http.headers()).unwrap();
        assert_eq!(back, req);

        let uri: http::Uri = "http://10.0.0.2:80/".parse().unwrap();
        assert!(matches!(
            ConnectRequest::from_http(&Method::GET, &uri, &HeaderMap::new()),
            Err(BadRequest::NotConnect(_))
        ));
        let uri: http::Uri = "bad host:80".parse().unwrap_or_default();
        assert!(matches!(
            ConnectRequest::from_http(&Method::CONNECT, &uri, &HeaderMap::new()),
            Err(BadRequest::Authority(_))
        ));
    }

    #[test]
    fn status_mapping_is_distinct() {
        let refusals = [
            Refusal::BadRequest("x".into()),
            Refusal::Unauthorized("x".into()),
            Refusal::Unavailable("x".into()),
        ];
        let seen: Vec<_> = refusals
            .iter()
            .map(|r| classify_status(r.status()).unwrap())
            .collect();
        assert_eq!(
            seen,
            vec![
                Refused::BadRequest,
                Refused::Unauthorized,
                Refused::Unavailable
            ]
        );
        assert_eq!(classify_status(StatusCode::OK), None);
        assert_eq!(
            classify_status(StatusCode::BAD_GATEWAY),
            Some(Refused::Other(502))
        );
    }
}
