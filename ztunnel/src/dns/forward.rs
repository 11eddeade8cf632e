//! Forwarding to the upstream resolvers (ztunnel's `/etc/resolv.conf`), from inside the
//! asking pod's network namespace with ztunnel's mark (so the pod's own capture rules let
//! it through, as Istio does). UDP first; a truncated UDP reply is asked again over TCP.

use crate::inpod::netns::Netns;
use crate::proxy::socket::{ZTUNNEL_MARK, connect_in};
use socket2::{Domain, Protocol, Socket, Type};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UdpSocket;

/// Upstream resolvers, in the order `resolv.conf` lists them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Upstreams {
    pub servers: Vec<SocketAddr>,
}

impl Upstreams {
    /// Reads the nameservers of a `resolv.conf`. A missing or unreadable file leaves none
    /// (forwarded queries then fail with SERVFAIL, said once in the log here).
    pub fn load(path: &Path) -> Upstreams {
        match std::fs::read(path) {
            Ok(text) => Upstreams::parse(&text).unwrap_or_else(|e| {
                tracing::warn!(file = %path.display(), error = %e,
                    "cannot read the upstream resolvers; DNS queries for names outside the mesh will fail");
                Upstreams::default()
            }),
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e,
                    "no upstream resolvers; DNS queries for names outside the mesh will fail");
                Upstreams::default()
            }
        }
    }

    pub fn parse(text: &[u8]) -> Result<Upstreams, String> {
        let cfg = resolv_conf::Config::parse(text).map_err(|e| e.to_string())?;
        Ok(Upstreams {
            servers: cfg
                .nameservers
                .iter()
                .map(|ip| SocketAddr::new(IpAddr::from(ip), 53))
                .collect(),
        })
    }
}

/// Why forwarding failed (the pod gets SERVFAIL).
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("no upstream resolver is configured (nameserver lines of --dns-resolv-conf)")]
    NoUpstream,
    #[error("upstream {server} did not answer in time")]
    Timeout { server: SocketAddr },
    #[error("upstream {server}: {source}")]
    Io {
        server: SocketAddr,
        source: io::Error,
    },
}

/// Asks the upstreams in turn, each within `per_try`, until one answers; `over_tcp` when
/// the pod asked over TCP (or a UDP reply came back truncated). Returns the raw reply.
pub async fn forward(
    netns: &Netns,
    upstreams: &Upstreams,
    query: &[u8],
    over_tcp: bool,
    per_try: Duration,
) -> Result<Vec<u8>, ForwardError> {
    let mut last = ForwardError::NoUpstream;
    for server in &upstreams.servers {
        let attempt = async {
            if !over_tcp {
                let reply = udp_exchange(netns, *server, query).await?;
                if !is_truncated(&reply) {
                    return Ok(reply);
                }
            }
            tcp_exchange(netns, *server, query).await
        };
        match tokio::time::timeout(per_try, attempt).await {
            Ok(Ok(reply)) => return Ok(reply),
            Ok(Err(source)) => {
                last = ForwardError::Io {
                    server: *server,
                    source,
                }
            }
            Err(_) => last = ForwardError::Timeout { server: *server },
        }
    }
    Err(last)
}

/// The TC bit of a reply's header.
fn is_truncated(reply: &[u8]) -> bool {
    reply.len() > 2 && reply[2] & 0x02 != 0
}

/// One query over a fresh connected UDP socket (the kernel drops datagrams from any other
/// address; the caller checks the ID and question).
async fn udp_exchange(netns: &Netns, server: SocketAddr, query: &[u8]) -> io::Result<Vec<u8>> {
    let socket = netns.run(|| -> io::Result<Socket> {
        let s = Socket::new(
            Domain::for_address(server),
            Type::DGRAM.cloexec(),
            Some(Protocol::UDP),
        )?;
        s.set_mark(ZTUNNEL_MARK)?;
        s.set_nonblocking(true)?;
        s.connect(&server.into())?;
        Ok(s)
    })??;
    let socket = UdpSocket::from_std(socket.into())?;
    socket.send(query).await?;
    let mut buf = vec![0u8; u16::MAX as usize];
    let n = socket.recv(&mut buf).await?;
    buf.truncate(n);
    Ok(buf)
}

/// One query over TCP (two-byte length prefix, RFC 1035 §4.2.2).
async fn tcp_exchange(netns: &Netns, server: SocketAddr, query: &[u8]) -> io::Result<Vec<u8>> {
    let mut s = connect_in(netns, server, None).await?;
    let len = u16::try_from(query.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "query too long"))?;
    let mut framed = Vec::with_capacity(query.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(query);
    s.write_all(&framed).await?;
    let n = s.read_u16().await? as usize;
    let mut buf = vec![0u8; n];
    s.read_exact(&mut buf).await?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nameservers_in_order_port_53() {
        let u = Upstreams::parse(
            b"search ns1.svc.cluster.local svc.cluster.local\nnameserver 10.0.0.10\nnameserver fd00::53\noptions ndots:5\n",
        )
        .unwrap();
        assert_eq!(
            u.servers,
            vec![
                "10.0.0.10:53".parse::<SocketAddr>().unwrap(),
                "[fd00::53]:53".parse().unwrap()
            ]
        );
        assert!(Upstreams::parse(b"").unwrap().servers.is_empty());
        assert!(
            Upstreams::load(Path::new("/nonexistent/resolv.conf"))
                .servers
                .is_empty()
        );
    }

    #[test]
    fn truncation_bit() {
        assert!(is_truncated(&[0, 1, 0x82, 0]));
        assert!(!is_truncated(&[0, 1, 0x80, 0]));
        assert!(!is_truncated(&[0]));
    }
}
