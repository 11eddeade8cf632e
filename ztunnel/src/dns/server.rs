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
use super::resolv::SharedUpstreams;
use super::resolve::{Client, Decision, decide};
use crate::drain::Drain;
use crate::netns::Netns;
use crate::proxy::NodeContext;
use crate::proxy::accept::{ConnLimit, spawn_accept_loop};
use crate::state::Workload;
use hickory_proto::op::ResponseCode;
use mesh_proto::ports;
use rand::seq::SliceRandom;
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
    /// Kept current with the file by [`super::resolv::keep_current`].
    pub upstreams: SharedUpstreams,
    /// [`MAX_IN_FLIGHT`] (tests use less).
    pub max_in_flight: usize,
    /// [`REQUEST_TIMEOUT`].
    pub request_timeout: Duration,
    /// [`UPSTREAM_TRY`].
    pub upstream_try: Duration,
}

impl DnsSettings {
    pub fn new(cluster_domain: &str, resolv_conf: &Path) -> DnsSettings {
        DnsSettings {
            cluster_domain: cluster_domain.to_string(),
            upstreams: SharedUpstreams::new(Upstreams::load(resolv_conf)),
            max_in_flight: MAX_IN_FLIGHT,
            request_timeout: REQUEST_TIMEOUT,
            upstream_try: UPSTREAM_TRY,
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
    bind_on(netns, ports::DNS)
}

impl Bound {
    /// Where the UDP sockets listen.
    pub fn udp_addrs(&self) -> Vec<SocketAddr> {
        self.udp
            .iter()
            .filter_map(|s| s.local_addr().ok())
            .collect()
    }

    /// Where the TCP listeners listen.
    pub fn tcp_addrs(&self) -> Vec<SocketAddr> {
        self.tcp
            .iter()
            .filter_map(|s| s.local_addr().ok())
            .collect()
    }
}

fn bind_on(netns: &Netns, port: u16) -> io::Result<Bound> {
    let v4 = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let v6 = SocketAddr::from((Ipv6Addr::LOCALHOST, port));
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
            in_flight: Arc::new(Semaphore::new(settings.max_in_flight)),
            ctx,
            settings,
            netns,
            namespace: namespace.to_string(),
            name: name.to_string(),
        });
        for socket in bound.udp {
            tokio::spawn(dns.clone().udp_loop(Arc::new(socket), drain.clone()));
        }
        for listener in bound.tcp {
            let limit = ConnLimit::new(format!("{namespace}/{name} dns"), MAX_TCP_CONNECTIONS);
            let (d, drain) = (dns.clone(), drain.clone());
            let stop = drain.stop_accepting();
            // DNS over TCP is rare: it stays on this (the control) runtime.
            let here = mesh_threads::DataPlane::inline();
            let spawned = spawn_accept_loop(listener, limit, stop, &here, move |s| {
                // Counted from accept like every connection, so a handed-over or
                // draining ztunnel does not exit under it.
                let guard = drain.guard();
                let d = d.clone();
                async move {
                    let _guard = guard;
                    d.tcp_connection(s).await
                }
            });
            if let Err(e) = spawned {
                tracing::warn!(pod = %name, error = %e, "cannot serve DNS over TCP");
            }
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
                        // Never a busy loop on an error that repeats.
                        tokio::time::sleep(Duration::from_millis(50)).await;
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
            // A query being answered counts as an open connection until its reply is sent.
            let guard = drain.guard();
            tokio::spawn(async move {
                if let Some(reply) = me.handle(&query, Transport::Udp).await {
                    let _ = socket.send_to(&reply, peer).await;
                }
                drop(permit);
                drop(guard);
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
                tokio::time::timeout(self.settings.request_timeout, s.read_exact(&mut query)).await,
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

    /// The reply to one message, within the request timeout (`None`: no reply at all).
    async fn handle(&self, query: &[u8], transport: Transport) -> Option<Vec<u8>> {
        let req = match Request::parse(query, transport) {
            Ok(r) => r,
            Err(Rejected(reply)) => return reply,
        };
        let deadline = tokio::time::Instant::now() + self.settings.request_timeout;
        self.answer(&req, deadline).await
    }

    /// Every wait in here ends by `deadline` (the client's, then the upstream's), so a
    /// query cut short is still counted and answered (SERVFAIL).
    async fn answer(&self, req: &Request, deadline: tokio::time::Instant) -> Option<Vec<u8>> {
        let client = self.client(deadline).await;
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
            Decision::Answer {
                cname,
                mut addrs,
                ttl,
            } => {
                // A headless Service's endpoints in another order each time, as Istio's
                // ztunnel and cluster DNS do: clients that take the first spread out.
                addrs.shuffle(&mut rand::rng());
                tracing::debug!(target: "dns", query = req.type_label(), src.workload = %src_name, src.namespace = %src_ns,
                    domain = %name, result = "success", endpoints = addrs.len(), "dns query");
                req.answer(cname.as_deref(), &addrs, ttl)
                    .or_else(|_| req.error(ResponseCode::ServFail))
                    .ok()
            }
            Decision::Forward => {
                metrics.upstream_requests.get_or_create(&labels).inc();
                let started = Instant::now();
                let id: u16 = rand::random();
                let upstreams = self.settings.upstreams.get();
                let result = tokio::time::timeout_at(
                    deadline,
                    forward(
                        &self.netns,
                        &upstreams,
                        req,
                        id,
                        self.settings.upstream_try,
                        &metrics.upstream_strays,
                    ),
                )
                .await
                .map_err(|_| "no upstream answered before the query's deadline".to_string())
                .and_then(|r| r.map_err(|e| e.to_string()))
                .and_then(|reply| req.relay(id, &reply));
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
    async fn client(&self, deadline: tokio::time::Instant) -> Option<Arc<Workload>> {
        let (ns, name) = (&self.namespace, &self.name);
        let wait = deadline
            .saturating_duration_since(tokio::time::Instant::now())
            .min(UNKNOWN_CLIENT_WAIT);
        self.ctx
            .state_changed
            .wait_for(&self.ctx.state, wait, |st| {
                st.workload_by_pod(ns, name).cloned()
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    //! The server in-process, in the test's own network namespace, on loopback: real
    //! sockets, a real (silent) upstream.
    use super::*;
    use crate::identity::{CertManager, CertSource};
    use crate::metrics::Metrics;
    use crate::proxy::ConnTracker;
    use crate::state::{LoadBalancing, Service, State};
    use crate::updates::StateChanged;
    use hickory_proto::op::{Message, Query};
    use hickory_proto::rr::{Name, RData, RecordType};
    use mesh_identity::SpiffeId;
    use mesh_identity::ca::CertificateAuthority;
    use std::collections::HashMap;
    use std::sync::RwLock;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn state() -> State {
        let mut st = State::default();
        st.insert_workload(crate::state::Workload {
            uid: "Kubernetes//Pod/ns1/client".into(),
            name: "client".into(),
            namespace: "ns1".into(),
            addresses: vec!["10.244.1.5".parse().unwrap()],
            network: String::new(),
            hbone: true,
            identity: SpiffeId::new("cluster.local", "ns1", "default").unwrap(),
            waypoint: None,
            node: "node-1".into(),
            canonical_name: "client".into(),
            canonical_revision: "v1".into(),
            workload_name: "client".into(),
            services: HashMap::new(),
            authorization_policies: vec![],
            healthy: true,
            cluster_id: String::new(),
            locality: Default::default(),
            host_network: false,
            capacity: 1,
        });
        st.insert_service(Service {
            name: "echo".into(),
            namespace: "ns1".into(),
            hostname: "echo.ns1.svc.cluster.local".into(),
            vips: vec![(String::new(), "10.96.0.10".parse().unwrap())],
            ports: vec![],
            subject_alt_names: vec![],
            waypoint: None,
            load_balancing: LoadBalancing::default(),
        });
        st
    }

    fn ctx() -> Arc<NodeContext> {
        let ca = CertificateAuthority::new_root("cluster.local", Duration::from_secs(3600));
        let certs = CertManager::new(CertSource::Local {
            ca: Box::new(ca.unwrap()),
            ttl: Duration::from_secs(600),
        });
        Arc::new(NodeContext {
            state: Arc::new(RwLock::new(state())),
            metrics: Metrics::new(Some(certs.clone())),
            certs,
            network: String::new(),
            trust_domain: "cluster.local".into(),
            cluster_id: "Kubernetes".into(),
            tracker: Arc::new(ConnTracker::default()),
            state_changed: StateChanged::new(),
            max_connections_per_listener: 16,
            dns: None,
            tracer: mesh_trace::Tracer::disabled(),
            data_plane: mesh_threads::DataPlane::inline(),
        })
    }

    fn query(id: u16, name: &str) -> Vec<u8> {
        let mut m = Message::query();
        m.metadata.id = id;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
        m.to_vec().unwrap()
    }

    /// An upstream that counts the queries it gets and never answers.
    async fn silent_upstream() -> (SocketAddr, Arc<AtomicUsize>) {
        let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = s.local_addr().unwrap();
        let seen = Arc::new(AtomicUsize::new(0));
        let n = seen.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            while s.recv_from(&mut buf).await.is_ok() {
                n.fetch_add(1, Ordering::SeqCst);
            }
        });
        (addr, seen)
    }

    #[tokio::test]
    async fn queries_in_flight_are_capped_and_each_ends_by_its_deadline() {
        let (upstream, seen) = silent_upstream().await;
        let settings = Arc::new(DnsSettings {
            cluster_domain: "cluster.local".into(),
            upstreams: SharedUpstreams::new(Upstreams {
                servers: vec![upstream],
            }),
            max_in_flight: 3,
            request_timeout: Duration::from_secs(1),
            // Longer than the deadline: the deadline is what ends the query.
            upstream_try: Duration::from_secs(3600),
        });
        let netns = Netns::open("/proc/self/ns/net").unwrap();
        let bound = bind_on(&netns, 0).unwrap();
        let server = bound.udp_addrs()[0];
        let drain = Drain::new();
        let ctx = ctx();
        PodDns::serve(ctx.clone(), settings, netns, "ns1", "client", bound, &drain);
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        client.connect(server).await.unwrap();
        let mut buf = vec![0u8; 4096];

        // A mesh name is answered at once, without the upstream.
        client.send(&query(1, "echo.")).await.unwrap();
        let n = client.recv(&mut buf).await.unwrap();
        let r = Message::from_vec(&buf[..n]).unwrap();
        assert!(matches!(r.answers[0].data, RData::A(a) if a.0 == Ipv4Addr::new(10, 96, 0, 10)));
        assert_eq!(seen.load(Ordering::SeqCst), 0);

        // Ten external names at once: three reach the upstream, three SERVFAIL replies
        // come back at the deadline, the rest were dropped on arrival.
        for id in 100..110 {
            client.send(&query(id, "www.example.net.")).await.unwrap();
        }
        let mut servfails = 0;
        while servfails < 3 {
            let n = client.recv(&mut buf).await.unwrap();
            let r = Message::from_vec(&buf[..n]).unwrap();
            assert_eq!(r.metadata.response_code, ResponseCode::ServFail);
            servfails += 1;
        }
        assert_eq!(seen.load(Ordering::SeqCst), 3, "only three in flight");
        let more = tokio::time::timeout(Duration::from_millis(300), client.recv(&mut buf)).await;
        assert!(more.is_err(), "the seven others got no reply at all");

        // Slots free again once those ended.
        client.send(&query(2, "echo.ns1.")).await.unwrap();
        let n = client.recv(&mut buf).await.unwrap();
        assert_eq!(Message::from_vec(&buf[..n]).unwrap().answers.len(), 1);
        // Dropped queries never became a request: 1 + 3 + 1.
        let text = ctx.metrics.encode();
        let labels = r#"{request_query_type="a",request_protocol="udp",source_canonical_service="client",source_canonical_revision="v1"}"#;
        for line in [
            format!("istio_dns_requests_total{labels} 5"),
            format!("istio_dns_upstream_requests_total{labels} 3"),
            format!("istio_dns_upstream_failures_total{labels} 3"),
        ] {
            assert!(text.contains(&line), "{line} in\n{text}");
        }
        drain.stop_accepting().cancel();
    }

    /// An upstream that answers `www.example.net.` with 203.0.113.7, each time after three
    /// datagrams that are not the reply: one from another address with the right ID, then
    /// from its own address one with another ID and one with another question. Returns
    /// its address and the IDs it was asked under.
    async fn upstream_behind_spoofers() -> (SocketAddr, Arc<std::sync::Mutex<Vec<u16>>>) {
        let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let spoofer = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = s.local_addr().unwrap();
        let ids = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = ids.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            while let Ok((n, peer)) = s.recv_from(&mut buf).await {
                let q = Message::from_vec(&buf[..n]).unwrap();
                let id = q.metadata.id;
                seen.lock().unwrap().push(id);
                let answer = |id: u16, name: &str, ip: [u8; 4]| {
                    let mut r = q.clone();
                    r.metadata.id = id;
                    r.metadata.message_type = hickory_proto::op::MessageType::Response;
                    let name = Name::from_ascii(name).unwrap();
                    r.queries[0] = Query::query(name.clone(), RecordType::A);
                    r.add_answer(hickory_proto::rr::Record::from_rdata(
                        name,
                        60,
                        RData::A(hickory_proto::rr::rdata::A(ip.into())),
                    ));
                    r.to_vec().unwrap()
                };
                let evil = [192, 0, 2, 66];
                let www = "www.example.net.";
                spoofer.send_to(&answer(id, www, evil), peer).await.unwrap();
                let wrong_id = answer(id.wrapping_add(1), www, evil);
                s.send_to(&wrong_id, peer).await.unwrap();
                let wrong_question = answer(id, "evil.example.", evil);
                s.send_to(&wrong_question, peer).await.unwrap();
                s.send_to(&answer(id, www, [203, 0, 113, 7]), peer)
                    .await
                    .unwrap();
            }
        });
        (addr, ids)
    }

    #[tokio::test]
    async fn forwarded_queries_go_out_under_our_id_and_outlast_spoofed_datagrams() {
        let (upstream, upstream_ids) = upstream_behind_spoofers().await;
        let settings = Arc::new(DnsSettings {
            cluster_domain: "cluster.local".into(),
            upstreams: SharedUpstreams::new(Upstreams {
                servers: vec![upstream],
            }),
            max_in_flight: 8,
            request_timeout: Duration::from_secs(5),
            upstream_try: Duration::from_secs(5),
        });
        let netns = Netns::open("/proc/self/ns/net").unwrap();
        let bound = bind_on(&netns, 0).unwrap();
        let server = bound.udp_addrs()[0];
        let drain = Drain::new();
        let ctx = ctx();
        PodDns::serve(ctx.clone(), settings, netns, "ns1", "client", bound, &drain);
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        client.connect(server).await.unwrap();
        let mut buf = vec![0u8; 4096];
        const QUERIES: usize = 20;
        for _ in 0..QUERIES {
            // The same ID every time, as a client with a poor ID source would send.
            client.send(&query(4242, "www.example.net.")).await.unwrap();
            let n = client.recv(&mut buf).await.unwrap();
            let r = Message::from_vec(&buf[..n]).unwrap();
            assert_eq!(r.metadata.response_code, ResponseCode::NoError);
            assert_eq!(r.metadata.id, 4242, "the reply under the pod's ID");
            assert_eq!(r.queries[0].name().to_ascii(), "www.example.net.");
            assert_eq!(r.answers.len(), 1);
            assert!(
                matches!(r.answers[0].data, RData::A(a) if a.0 == Ipv4Addr::new(203, 0, 113, 7)),
                "the upstream's answer, not a spoofer's: {r:?}"
            );
        }
        let ids = upstream_ids.lock().unwrap().clone();
        assert_eq!(ids.len(), QUERIES, "each query asked once");
        let distinct: std::collections::HashSet<_> = ids.iter().collect();
        assert!(
            distinct.len() > QUERIES / 2 && ids.iter().any(|&i| i != 4242),
            "fresh IDs upstream, not the pod's: {ids:?}"
        );
        // Two strays per query reached the socket (the kernel dropped the spoofer's).
        let text = ctx.metrics.encode();
        let line = format!(
            "ztunnel_dns_upstream_ignored_datagrams_total {}",
            2 * QUERIES
        );
        assert!(text.contains(&line), "{line} in\n{text}");
        drain.stop_accepting().cancel();
    }

    #[tokio::test]
    async fn listens_on_both_loopbacks_when_the_namespace_has_ipv6() {
        // The capture rules redirect IPv6 port 53 to [::1]:15053.
        let has_v6_loopback = std::fs::read_to_string("/proc/net/if_inet6")
            .unwrap_or_default()
            .lines()
            .any(|l| l.starts_with("00000000000000000000000000000001"));
        assert!(has_v6_loopback, "the test needs ::1 in its namespace");
        let settings = Arc::new(DnsSettings {
            cluster_domain: "cluster.local".into(),
            upstreams: SharedUpstreams::default(),
            max_in_flight: 8,
            request_timeout: Duration::from_secs(1),
            upstream_try: Duration::from_secs(1),
        });
        let netns = Netns::open("/proc/self/ns/net").unwrap();
        let bound = bind_on(&netns, 0).unwrap();
        let v6 = *bound
            .udp_addrs()
            .iter()
            .find(|a| a.is_ipv6())
            .expect("a UDP socket on ::1");
        assert!(bound.tcp_addrs().iter().any(|a| a.is_ipv6()));
        let drain = Drain::new();
        PodDns::serve(ctx(), settings, netns, "ns1", "client", bound, &drain);
        let client = UdpSocket::bind("[::1]:0").await.unwrap();
        client.connect(v6).await.unwrap();
        client.send(&query(9, "echo.ns1.")).await.unwrap();
        let mut buf = vec![0u8; 4096];
        let n = client.recv(&mut buf).await.unwrap();
        assert_eq!(Message::from_vec(&buf[..n]).unwrap().answers.len(), 1);
        drain.stop_accepting().cancel();
    }

    #[tokio::test]
    async fn tcp_queries_are_framed_and_half_sent_ones_closed() {
        let settings = Arc::new(DnsSettings {
            cluster_domain: "cluster.local".into(),
            upstreams: SharedUpstreams::default(),
            max_in_flight: 8,
            request_timeout: Duration::from_secs(1),
            upstream_try: Duration::from_secs(1),
        });
        let netns = Netns::open("/proc/self/ns/net").unwrap();
        let bound = bind_on(&netns, 0).unwrap();
        let server = bound.tcp_addrs()[0];
        let drain = Drain::new();
        PodDns::serve(ctx(), settings, netns, "ns1", "client", bound, &drain);
        // One query over TCP, framed.
        let mut s = TcpStream::connect(server).await.unwrap();
        let q = query(7, "echo.ns1.svc.cluster.local.");
        s.write_all(&(q.len() as u16).to_be_bytes()).await.unwrap();
        s.write_all(&q).await.unwrap();
        let len = s.read_u16().await.unwrap();
        let mut r = vec![0u8; len as usize];
        s.read_exact(&mut r).await.unwrap();
        assert_eq!(Message::from_vec(&r).unwrap().answers.len(), 1);
        // An open DNS connection counts as one the process still holds (a handed-over
        // or draining ztunnel waits for it), and stops counting once it ends.
        assert_eq!(
            drain.open_connections(),
            1,
            "the open TCP connection counts"
        );
        drop(s);
        for _ in 0..200 {
            if drain.open_connections() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(drain.open_connections(), 0, "a closed one no longer counts");
        // A connection that sends half a query is closed (not held open forever).
        let mut half = TcpStream::connect(server).await.unwrap();
        half.write_all(&[0, 40, 1, 2]).await.unwrap();
        let mut b = [0u8; 1];
        assert_eq!(
            half.read(&mut b).await.unwrap_or(0),
            0,
            "closed by the server"
        );
        drain.stop_accepting().cancel();
    }
}
