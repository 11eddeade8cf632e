//! Forwarding to the upstream resolvers (ztunnel's `/etc/resolv.conf`), from inside the
//! asking pod's network namespace with ztunnel's mark (so the pod's own capture rules let
//! it through, as Istio does). UDP first; a truncated UDP reply is asked again over TCP.
//!
//! The upstream sees the query under a fresh random ID of ours, from a connected socket
//! (the kernel drops datagrams from other addresses). A datagram that is not the reply is
//! counted and ignored, and the wait goes on: one spoofed datagram cannot end the query.

use super::message::{Request, Transport, response_id};
use crate::netns::Netns;
use crate::proxy::socket::{ZTUNNEL_MARK, connect_in};
use prometheus_client::metrics::counter::Counter;
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
        match super::resolv::read_limited(path) {
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

/// Asks the upstreams in turn, each within `per_try`, until one answers `req` sent under
/// `id` (see [`Request::upstream_query`]): over UDP unless the pod asked over TCP, again
/// over TCP when the UDP reply is truncated or larger than the pod takes. Returns the raw
/// reply, still under `id`; `strays` counts the datagrams ignored on the way.
pub async fn forward(
    netns: &Netns,
    upstreams: &Upstreams,
    req: &Request,
    id: u16,
    per_try: Duration,
    strays: &Counter,
) -> Result<Vec<u8>, ForwardError> {
    let query = req.upstream_query(id);
    let mut last = ForwardError::NoUpstream;
    for server in &upstreams.servers {
        let attempt = async {
            if req.transport() == Transport::Udp {
                let udp = udp_exchange(
                    netns,
                    *server,
                    &query,
                    |d, limit| classify(req, id, d, limit),
                    req.max_reply(),
                    strays,
                )
                .await?;
                if let Some(reply) = udp {
                    return Ok(reply);
                }
            }
            tcp_exchange(netns, *server, &query).await
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

/// What one datagram from the upstream is to the query waiting on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Datagram {
    /// The reply, whole and within what the pod takes.
    Reply,
    /// The reply, but truncated (TC) or longer than the pod takes (and than our buffer, so
    /// cut short): asked again over TCP.
    AskOverTcp,
    /// Not the reply (another ID or question, not a response, garbage): ignored.
    Stray,
}

/// Sorts `datagram`, received into a buffer one byte longer than `limit` (so a longer
/// one shows as `limit + 1` bytes), for the query sent under `id`.
pub fn classify(req: &Request, id: u16, datagram: &[u8], limit: usize) -> Datagram {
    if datagram.len() > limit {
        // Only the header can be checked: a spoofer must still guess the ID, and the
        // TCP reply is checked in full.
        return match response_id(datagram) {
            Some(r) if r == id => Datagram::AskOverTcp,
            _ => Datagram::Stray,
        };
    }
    if !req.is_reply(id, datagram) {
        Datagram::Stray
    } else if is_truncated(datagram) {
        Datagram::AskOverTcp
    } else {
        Datagram::Reply
    }
}

/// The TC bit of a reply's header.
fn is_truncated(reply: &[u8]) -> bool {
    reply.len() > 2 && reply[2] & 0x02 != 0
}

/// One query over a fresh UDP socket connected to `server`, waiting (until the caller's
/// timeout) for the datagram `classify` calls the reply; `None`: ask over TCP. One buffer
/// of `limit + 1` bytes (at most [`super::message::MAX_UDP_PAYLOAD`] + 1) per query.
async fn udp_exchange(
    netns: &Netns,
    server: SocketAddr,
    query: &[u8],
    classify: impl Fn(&[u8], usize) -> Datagram,
    limit: usize,
    strays: &Counter,
) -> io::Result<Option<Vec<u8>>> {
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
    let mut buf = vec![0u8; limit + 1];
    loop {
        let n = socket.recv(&mut buf).await?;
        match classify(&buf[..n], limit) {
            Datagram::Reply => {
                buf.truncate(n);
                return Ok(Some(buf));
            }
            Datagram::AskOverTcp => return Ok(None),
            Datagram::Stray => {
                strays.inc();
            }
        }
    }
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
    use hickory_proto::op::{Edns, Message, MessageType, Query};
    use hickory_proto::rr::rdata::A;
    use hickory_proto::rr::{Name, RData, Record, RecordType};
    use std::net::Ipv4Addr;
    use tokio::net::TcpListener;

    /// The pod's query for `www.example.net.` A, ID 4242.
    fn pod_query(edns: Option<u16>) -> Vec<u8> {
        let mut m = Message::query();
        m.metadata.id = 4242;
        m.add_query(Query::query(
            Name::from_ascii("www.example.net.").unwrap(),
            RecordType::A,
        ));
        if let Some(size) = edns {
            let mut e = Edns::new();
            e.set_max_payload(size);
            m.set_edns(e);
        }
        m.to_vec().unwrap()
    }

    /// The upstream's reply to `query` (as it came), with `records` A records.
    fn reply_to(query: &[u8], records: u8) -> Message {
        let mut m = Message::from_vec(query).unwrap();
        m.metadata.message_type = MessageType::Response;
        for i in 0..records {
            m.add_answer(Record::from_rdata(
                m.queries[0].name().clone(),
                60,
                RData::A(A(Ipv4Addr::new(203, 0, 113, i))),
            ));
        }
        m
    }

    #[test]
    fn only_the_reply_to_our_id_and_question_is_taken() {
        let req = Request::parse(&pod_query(None), Transport::Udp).unwrap();
        let limit = req.max_reply();
        assert_eq!(limit, 512);
        let id = 0x5eed;
        let sent = req.upstream_query(id);
        let ok = reply_to(&sent, 1);
        let c = |m: &Message| classify(&req, id, &m.to_vec().unwrap(), limit);
        assert_eq!(c(&ok), Datagram::Reply);
        let mut tc = ok.clone();
        tc.metadata.truncation = true;
        assert_eq!(c(&tc), Datagram::AskOverTcp);
        for other_id in [4242, id + 1] {
            let mut m = ok.clone();
            m.metadata.id = other_id;
            assert_eq!(c(&m), Datagram::Stray, "ID {other_id}");
        }
        let mut m = ok.clone();
        m.queries[0] = Query::query(Name::from_ascii("evil.example.").unwrap(), RecordType::A);
        assert_eq!(c(&m), Datagram::Stray);
        assert_eq!(
            classify(&req, id, &sent, limit),
            Datagram::Stray,
            "our own query reflected"
        );
        assert_eq!(classify(&req, id, b"junk", limit), Datagram::Stray);
        // Longer than the pod takes (cut at limit + 1 by the buffer): our ID in its header
        // sends the query to TCP; another ID is a stray.
        let big = reply_to(&sent, 40).to_vec().unwrap();
        assert!(big.len() > limit + 1);
        assert_eq!(
            classify(&req, id, &big[..limit + 1], limit),
            Datagram::AskOverTcp
        );
        assert_eq!(
            classify(&req, id + 1, &big[..limit + 1], limit),
            Datagram::Stray
        );
    }

    /// UDP and TCP sockets on one loopback port.
    async fn udp_and_tcp_upstream() -> (UdpSocket, TcpListener) {
        loop {
            let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
            if let Ok(udp) = UdpSocket::bind(tcp.local_addr().unwrap()).await {
                return (udp, tcp);
            }
        }
    }

    #[tokio::test]
    async fn a_udp_reply_longer_than_the_pod_takes_is_asked_again_over_tcp() {
        // An upstream that ignores the pod's size (no EDNS: 512) over UDP, and answers
        // whole over TCP.
        let (udp, tcp) = udp_and_tcp_upstream().await;
        let server = udp.local_addr().unwrap();
        let udp_ids = tokio::spawn(async move {
            let mut buf = [0u8; 512];
            let (n, peer) = udp.recv_from(&mut buf).await.unwrap();
            let big = reply_to(&buf[..n], 40).to_vec().unwrap();
            assert!(big.len() > 600, "over 512 bytes: {}", big.len());
            udp.send_to(&big, peer).await.unwrap();
            u16::from_be_bytes([buf[0], buf[1]])
        });
        let tcp_ids = tokio::spawn(async move {
            let (mut s, _) = tcp.accept().await.unwrap();
            let mut q = vec![0u8; s.read_u16().await.unwrap() as usize];
            s.read_exact(&mut q).await.unwrap();
            let r = reply_to(&q, 40).to_vec().unwrap();
            s.write_all(&(r.len() as u16).to_be_bytes()).await.unwrap();
            s.write_all(&r).await.unwrap();
            u16::from_be_bytes([q[0], q[1]])
        });
        let req = Request::parse(&pod_query(None), Transport::Udp).unwrap();
        let netns = Netns::open("/proc/self/ns/net").unwrap();
        let strays = Counter::default();
        let reply = forward(
            &netns,
            &Upstreams {
                servers: vec![server],
            },
            &req,
            0x5eed,
            Duration::from_secs(5),
            &strays,
        )
        .await
        .expect("the TCP reply");
        assert_eq!(Message::from_vec(&reply).unwrap().answers.len(), 40);
        assert_eq!(udp_ids.await.unwrap(), 0x5eed);
        assert_eq!(tcp_ids.await.unwrap(), 0x5eed);
        assert_eq!(strays.get(), 0);
        // Relayed to the pod: cut to 512 bytes, TC set, the pod's ID.
        let to_pod = Message::from_vec(&req.relay(0x5eed, &reply).unwrap()).unwrap();
        assert!(to_pod.metadata.truncation);
        assert_eq!(to_pod.metadata.id, 4242);
    }

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
