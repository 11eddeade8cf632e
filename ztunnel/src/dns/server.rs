//! The per-pod listeners on 15053 (UDP and TCP, localhost inside the pod, where the pod's
//! capture rules redirect port 53) and the thin I/O around [`super::resolve::decide`].
//!
//! Nothing a pod sends grows without bound: at most [`MAX_IN_FLIGHT`] queries are handled
//! at once per pod (more UDP queries are dropped; the client retries), at most
//! [`MAX_TCP_CONNECTIONS`] TCP connections, each answering one query at a time and closed
//! when idle; every query has a deadline.

use super::forward::{Upstreams, forward};
use super::message::{Rejected, Request, Transport};
use super::metrics::DnsLabels;
use super::resolve::{Client, Decision, decide};
use crate::drain::Drain;
use crate::inpod::netns::Netns;
use crate::proxy::NodeContext;
use crate::proxy::accept::{ConnLimit, spawn_accept_loop};
use crate::state::Workload;
use hickory_proto::op::ResponseCode;
use mesh_proto::ports;
use socket2::{Domain, Protocol, Socket, Type};
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;

/// Queries handled at once, per pod.
pub const MAX_IN_FLIGHT: usize = 256;
/// TCP connections open at once, per pod.
pub const MAX_TCP_CONNECTIONS: usize = 64;
/// Deadline of one query, from receipt to reply (a resolver's own default is 5 s).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Time each upstream gets before the next is tried.
pub const UPSTREAM_TRY: Duration = Duration::from_secs(2);
/// A TCP connection without a new query for this long is closed (Istio's).
pub const TCP_IDLE: Duration = Duration::from_secs(5);
/// How long a query waits for its own pod to appear in xDS before SERVFAIL.
const UNKNOWN_CLIENT_WAIT: Duration = Duration::from_secs(2);

/// The node-wide DNS proxy settings.
#[derive(Debug, Clone)]
pub struct DnsSettings {
    pub cluster_domain: String,
    pub upstreams: Upstreams,
}

impl DnsSettings {
    pub fn new(cluster_domain: &str, resolv_conf: &Path) -> DnsSettings {
        DnsSettings {
            cluster_domain: cluster_domain.to_string(),
            upstreams: Upstreams::load(resolv_conf),
        }
    }
}

/// One pod's DNS proxy.
pub struct PodDns {
    ctx: Arc<NodeContext>,
    settings: Arc<DnsSettings>,
    netns: Netns,
    namespace: String,
    name: String,
    in_flight: Arc<Semaphore>,
}

/// The listeners, bound (so a failure stops the pod proxy's start) but not serving yet.
pub struct Bound {
    udp: Vec<UdpSocket>,
    tcp: Vec<TcpListener>,
}

/// Binds 127.0.0.1:15053 and, when the pod has IPv6, [::1]:15053, UDP and TCP, inside
/// `netns`.
pub fn bind(netns: &Netns) -> io::Result<Bound> {
    let v4 = SocketAddr::from((Ipv4Addr::LOCALHOST, ports::DNS));
    let v6 = SocketAddr::from((Ipv6Addr::LOCALHOST, ports::DNS));
    let mut bound = Bound {
        udp: vec![udp_socket_in(netns, v4)?],
        tcp: vec![tcp_listener_in(netns, v4)?],
    };
    // A pod without IPv6 (or with it disabled) has no ::1: IPv4 alone then.
    if let (Ok(u), Ok(t)) = (udp_socket_in(netns, v6), tcp_listener_in(netns, v6)) {
        bound.udp.push(u);
        bound.tcp.push(t);
    }
    Ok(bound)
}

fn bind_socket(netns: &Netns, addr: SocketAddr, ty: Type, proto: Protocol) -> io::Result<Socket> {
    netns.run(|| -> io::Result<Socket> {
        let s = Socket::new(Domain::for_address(addr), ty.cloexec(), Some(proto))?;
        if addr.is_ipv6() {
            s.set_only_v6(true)?;
        }
        s.set_reuse_address(true)?;
        // A second ztunnel listens beside us during an upgrade.
        s.set_reuse_port(true)?;
        s.set_nonblocking(true)?;
        s.bind(&addr.into())?;
        Ok(s)
    })?
}

fn udp_socket_in(netns: &Netns, addr: SocketAddr) -> io::Result<UdpSocket> {
    let s = bind_socket(netns, addr, Type::DGRAM, Protocol::UDP)?;
    UdpSocket::from_std(s.into())
}

fn tcp_listener_in(netns: &Netns, addr: SocketAddr) -> io::Result<TcpListener> {
    let s = bind_socket(netns, addr, Type::STREAM, Protocol::TCP)?;
    s.listen(128)?;
    TcpListener::from_std(s.into())
}

impl PodDns {
    /// Serves `bound` for the pod `namespace/name` until `drain` stops accepting.
    pub fn serve(
        ctx: Arc<NodeContext>,
        settings: Arc<DnsSettings>,
        netns: Netns,
        namespace: &str,
        name: &str,
        bound: Bound,
        drain: &Drain,
    ) {
        let dns = Arc::new(PodDns {
            ctx,
            settings,
            netns,
            namespace: namespace.to_string(),
            name: name.to_string(),
            in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
        });
        for socket in bound.udp {
            tokio::spawn(dns.clone().udp_loop(Arc::new(socket), drain.clone()));
        }
        for listener in bound.tcp {
            let limit = ConnLimit::new(format!("{namespace}/{name} dns"), MAX_TCP_CONNECTIONS);
            let d = dns.clone();
            spawn_accept_loop(listener, limit, drain.stop_accepting(), move |s| {
                d.clone().tcp_connection(s)
            });
        }
    }

    async fn udp_loop(self: Arc<Self>, socket: Arc<UdpSocket>, drain: Drain) {
        let stop = drain.stop_accepting();
        let mut buf = vec![0u8; u16::MAX as usize];
        loop {
            let (n, peer) = tokio::select! {
                r = socket.recv_from(&mut buf) => match r {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::debug!(pod = %self.name, error = %e, "DNS receive failed");
                        continue;
                    }
                },
                _ = stop.cancelled() => return,
            };
            let Ok(permit) = self.in_flight.clone().try_acquire_owned() else {
                tracing::debug!(pod = %self.name, "DNS query dropped: too many in flight");
                continue;
            };
            let query = buf[..n].to_vec();
            let (me, socket) = (self.clone(), socket.clone());
            tokio::spawn(async move {
                if let Some(reply) = me.handle(&query, Transport::Udp).await {
                    let _ = socket.send_to(&reply, peer).await;
                }
                drop(permit);
            });
        }
    }

    async fn tcp_connection(self: Arc<Self>, mut s: TcpStream) {
        loop {
            let Ok(Ok(len)) = tokio::time::timeout(TCP_IDLE, s.read_u16()).await else {
                return;
            };
            let mut query = vec![0u8; len as usize];
            if !matches!(
                tokio::time::timeout(REQUEST_TIMEOUT, s.read_exact(&mut query)).await,
                Ok(Ok(_))
            ) {
                return;
            }
            let Ok(_permit) = self.in_flight.clone().try_acquire_owned() else {
                return;
            };
            let Some(reply) = self.handle(&query, Transport::Tcp).await else {
                return;
            };
            let Ok(n) = u16::try_from(reply.len()) else {
                return;
            };
            let mut framed = Vec::with_capacity(reply.len() + 2);
            framed.extend_from_slice(&n.to_be_bytes());
            framed.extend_from_slice(&reply);
            if s.write_all(&framed).await.is_err() {
                return;
            }
        }
    }

    /// The reply to one message, within [`REQUEST_TIMEOUT`] (`None`: no reply at all).
    async fn handle(&self, query: &[u8], transport: Transport) -> Option<Vec<u8>> {
        let req = match Request::parse(query, transport) {
            Ok(r) => r,
            Err(Rejected(reply)) => return reply,
        };
        match tokio::time::timeout(REQUEST_TIMEOUT, self.answer(&req)).await {
            Ok(reply) => reply,
            Err(_) => req.error(ResponseCode::ServFail).ok(),
        }
    }

    async fn answer(&self, req: &Request) -> Option<Vec<u8>> {
        let client = self.client().await;
        let labels = DnsLabels::new(
            req.type_label(),
            req.transport().as_str(),
            client.as_deref(),
        );
        let metrics = &self.ctx.metrics.dns;
        metrics.requests.get_or_create(&labels).inc();
        let Some(client) = client else {
            tracing::debug!(target: "dns", pod = %format!("{}/{}", self.namespace, self.name),
                "SERVFAIL: the asking pod is not known from the control plane");
            return req.error(ResponseCode::ServFail).ok();
        };
        let name = req.name();
        let (src_name, src_ns) = (&client.name, &client.namespace);
        let decision = {
            let st = self.ctx.state.read().expect("state lock");
            decide(
                &st,
                &self.settings.cluster_domain,
                Client {
                    namespace: &client.namespace,
                    network: &self.ctx.network,
                },
                &name,
                req.family(),
            )
        };
        match decision {
            Decision::Answer { cname, addrs } => {
                tracing::debug!(target: "dns", query = req.type_label(), src.workload = %src_name, src.namespace = %src_ns,
                    domain = %name, result = "success", endpoints = addrs.len(), "dns query");
                req.answer(cname.as_deref(), &addrs)
                    .or_else(|_| req.error(ResponseCode::ServFail))
                    .ok()
            }
            Decision::Forward => {
                metrics.upstream_requests.get_or_create(&labels).inc();
                let started = Instant::now();
                let result = forward(
                    &self.netns,
                    &self.settings.upstreams,
                    req.wire(),
                    req.transport() == Transport::Tcp,
                    UPSTREAM_TRY,
                )
                .await
                .map_err(|e| e.to_string())
                .and_then(|reply| req.relay(&reply));
                metrics
                    .upstream_duration
                    .get_or_create(&labels)
                    .observe(started.elapsed().as_secs_f64());
                match result {
                    Ok(reply) => {
                        tracing::debug!(target: "dns", query = req.type_label(), src.workload = %src_name, src.namespace = %src_ns,
                            domain = %name, result = "forwarded", "dns query");
                        Some(reply)
                    }
                    Err(e) => {
                        metrics.upstream_failures.get_or_create(&labels).inc();
                        tracing::debug!(target: "dns", query = req.type_label(), src.workload = %src_name, src.namespace = %src_ns,
                            domain = %name, result = %format!("forwarding failed ({e})"), "dns query");
                        req.error(ResponseCode::ServFail).ok()
                    }
                }
            }
        }
    }

    /// The asking pod's workload, waiting briefly for xDS to bring it.
    async fn client(&self) -> Option<Arc<Workload>> {
        let (ns, name) = (&self.namespace, &self.name);
        self.ctx
            .state_changed
            .wait_for(&self.ctx.state, UNKNOWN_CLIENT_WAIT, |st| {
                st.workload_by_pod(ns, name).cloned()
            })
            .await
    }
}
