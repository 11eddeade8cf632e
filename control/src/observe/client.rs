//! A minimal client of Prometheus's HTTP API (`GET /api/v1/query`): plain HTTP/1.0, as
//! the lab's and a port-forwarded Prometheus serve it; no client library needed.

use serde_json::Value;
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

/// Where Prometheus is: `http://host:port` with an optional path prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub host_port: String,
    pub prefix: String,
}

impl Endpoint {
    pub fn parse(url: &str) -> Result<Endpoint, String> {
        let rest = url.strip_prefix("http://").ok_or_else(|| {
            format!("--prometheus {url:?}: give an http:// URL such as http://127.0.0.1:9090")
        })?;
        let (host_port, prefix) = match rest.split_once('/') {
            Some((h, p)) => (h, format!("/{}", p.trim_end_matches('/'))),
            None => (rest, String::new()),
        };
        if host_port.is_empty() {
            return Err(format!("--prometheus {url:?}: no host"));
        }
        let host_port = if host_port.contains(':') && !host_port.ends_with(']') {
            host_port.to_string()
        } else {
            format!("{host_port}:80")
        };
        Ok(Endpoint {
            host_port,
            prefix: prefix.trim_end_matches('/').to_string(),
        })
    }

    /// The request path of an instant query.
    pub fn query_path(&self, promql: &str) -> String {
        format!("{}/api/v1/query?query={}", self.prefix, encode(promql))
    }
}

/// Percent-encoding of a query parameter.
pub fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Runs one instant query; the parsed JSON answer (also for 4xx: it says why).
pub fn query(ep: &Endpoint, promql: &str) -> Result<Value, String> {
    get_json(
        &ep.host_port,
        &ep.query_path(promql),
        "Prometheus",
        "--prometheus",
    )
}

/// `GET path` from `host_port` (`what` names the server, `flag` the option giving it).
pub fn get_json(host_port: &str, path: &str, what: &str, flag: &str) -> Result<Value, String> {
    let unreachable =
        |e: String| format!("cannot reach {what} at {host_port}: {e} (set {flag} to its address)");
    let addr = host_port
        .to_socket_addrs()
        .map_err(|e| unreachable(e.to_string()))?
        .next()
        .ok_or_else(|| unreachable("no address".into()))?;
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))
        .map_err(|e| unreachable(e.to_string()))?;
    s.set_read_timeout(Some(Duration::from_secs(15))).ok();
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: {host_port}\r\nAccept: application/json\r\n\r\n"
    )
    .map_err(|e| unreachable(e.to_string()))?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp)
        .map_err(|e| unreachable(e.to_string()))?;
    let resp = String::from_utf8_lossy(&resp);
    let (head, body) = resp
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("malformed answer from {what}"))?;
    serde_json::from_str(body).map_err(|e| {
        format!(
            "{what} answered {} with no JSON ({e}): is {flag} the right address?",
            head.lines().next().unwrap_or_default()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_parsed() {
        let e = Endpoint::parse("http://127.0.0.1:9090").unwrap();
        assert_eq!(e.host_port, "127.0.0.1:9090");
        assert_eq!(e.query_path("up"), "/api/v1/query?query=up");
        let e = Endpoint::parse("http://prom.example/prometheus/").unwrap();
        assert_eq!(e.host_port, "prom.example:80");
        assert_eq!(
            e.query_path("sum(x{a=\"b\"})"),
            "/prometheus/api/v1/query?query=sum%28x%7Ba%3D%22b%22%7D%29"
        );
        assert!(Endpoint::parse("https://p:9090").is_err());
        assert!(Endpoint::parse("http://").is_err());
    }

    #[test]
    fn unreachable_prometheus_is_explained() {
        let e = query(&Endpoint::parse("http://127.0.0.1:1").unwrap(), "up").unwrap_err();
        assert!(e.contains("cannot reach Prometheus at 127.0.0.1:1"), "{e}");
    }
}
