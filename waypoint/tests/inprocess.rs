//! The waypoint in process, with real hyper backends behind real HBONE "ztunnels" (each
//! on its own loopback address, port 15008) and a client that reaches the waypoint over
//! HBONE exactly as a ztunnel does.

use bytes::Bytes;
use hbone::{Authority, ConnectHandler, InboundConnect, Refusal, Responder};
use http_body_util::{BodyExt, Full};
use mesh_discovery::State;
use mesh_identity::ca::CertificateAuthority;
use mesh_identity::{SpiffeId, WorkloadCertificate, generate_csr};
use mesh_proto::discovery::DeltaDiscoveryResponse;
use mesh_proto::workload as pb;
use mesh_threads::{DataPlane, PerThread};
use mesh_xds::certs::{CertManager, CertSource};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use waypoint::authz::Policy;
use waypoint::proxy::{Config, ConfigStore, Handler, Target, Waypoint};
use waypoint::server::{Lifecycle, ServeConfig, Stopped};

const DAY: Duration = Duration::from_secs(86400);

fn ip(t: u8, n: u8) -> IpAddr {
    IpAddr::from([127, 12, t, n])
}

fn cert(ca: &CertificateAuthority, ns: &str, sa: &str) -> WorkloadCertificate {
    let id = SpiffeId::new("cluster.local", ns, sa).unwrap();
    let csr = generate_csr(&id).unwrap();
    let chain = ca.sign_csr(&csr.csr_pem, &id, DAY).unwrap();
    WorkloadCertificate::from_ca_response(&id, &csr.key, &chain).unwrap()
}

/// A backend app on `addr` that says who it is; `/fail-twice` fails twice per key then
/// succeeds, `/slow` waits 2 s, `/status/NNN` answers NNN, `/echo-headers` echoes headers,
/// `/close` closes the connection after answering. `conns` counts accepted connections.
async fn backend(
    addr: SocketAddr,
    name: &'static str,
    hits: Arc<AtomicUsize>,
    conns: Arc<AtomicUsize>,
) {
    let l = tokio::net::TcpListener::bind(addr).await.unwrap();
    let fails = Arc::new(AtomicUsize::new(0));
    tokio::spawn(async move {
        loop {
            let (tcp, _) = l.accept().await.unwrap();
            conns.fetch_add(1, Ordering::SeqCst);
            let (hits, fails) = (hits.clone(), fails.clone());
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let (hits, fails) = (hits.clone(), fails.clone());
                        async move {
                            hits.fetch_add(1, Ordering::SeqCst);
                            let path = req.uri().path().to_string();
                            let mut status = 200;
                            let mut body = format!("{name} {path}");
                            if path == "/fail-twice" && fails.fetch_add(1, Ordering::SeqCst) < 2 {
                                status = 503;
                            }
                            if path == "/fail-on-v2" && name == "v2" {
                                status = 503;
                            }
                            if path == "/slow" {
                                tokio::time::sleep(Duration::from_secs(2)).await;
                            }
                            if path == "/hang" || (path == "/mirror-hangs" && name == "mirror") {
                                std::future::pending::<()>().await;
                            }
                            if let Some(c) = path.strip_prefix("/status/") {
                                status = c.parse().unwrap_or(500);
                            }
                            if path == "/echo-headers" {
                                body = format!("{:?}", req.headers());
                            }
                            let close = match path.as_str() {
                                "/close" => "close",
                                // Hop-by-hop headers of the upstream connection.
                                "/hop" => "keep-alive, x-hop",
                                _ => "keep-alive",
                            };
                            if path == "/hop" {
                                body = format!("{:?}", req.headers());
                            }
                            // A coding on top of the chunked framing.
                            let coding = (path == "/gzip-coded").then_some("gzip");
                            let mut resp = http::Response::builder()
                                .status(status)
                                .header("connection", close)
                                .header("x-hop", "upstream-connection-detail")
                                .header("keep-alive", "timeout=5");
                            if let Some(c) = coding {
                                resp = resp.header("transfer-encoding", c);
                            }
                            Ok::<_, std::convert::Infallible>(
                                resp.body(Full::new(Bytes::from(body))).unwrap(),
                            )
                        }
                    });
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                .await;
            });
        }
    });
}

/// A ztunnel stand-in in front of a backend: HBONE on `ip:15008`, connects the CONNECT's
/// authority.
struct Forward;

impl ConnectHandler for Forward {
    async fn handle(&self, req: InboundConnect, respond: Responder) {
        let Authority::Addr(a) = req.request.authority else {
            return respond.refuse(&Refusal::BadRequest("host".into()));
        };
        let Ok(app) = tokio::net::TcpStream::connect(a).await else {
            return respond.refuse(&Refusal::Unavailable("app down".into()));
        };
        if let Ok(t) = respond.accept(Default::default()) {
            let _ = t.copy_with_tcp(&app).await;
        }
    }
}

async fn hbone_server<H: ConnectHandler>(
    addr: SocketAddr,
    tls: Arc<rustls::ServerConfig>,
    h: Arc<H>,
) {
    let l = tokio::net::TcpListener::bind(addr).await.unwrap();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = l.accept().await.unwrap();
            let (tls, h) = (tls.clone(), h.clone());
            tokio::spawn(async move {
                let _ = hbone::serve_connection(
                    tcp,
                    tls,
                    h,
                    &hbone::H2Settings::server(),
                    CancellationToken::new(),
                )
                .await;
            });
        }
    });
}

fn service(name: &str, vip: IpAddr, protocol: pb::AppProtocol) -> pb::Address {
    pb::Address {
        r#type: Some(pb::address::Type::Service(pb::Service {
            name: name.into(),
            namespace: "shop".into(),
            hostname: format!("{name}.shop.svc.cluster.local"),
            addresses: vec![pb::NetworkAddress {
                network: String::new(),
                address: mesh_authz::ip_bytes(vip),
                length: None,
            }],
            ports: vec![pb::Port {
                service_port: 80,
                target_port: 8080,
                app_protocol: protocol as i32,
            }],
            // Bound to the waypoint under test (it serves nothing else).
            waypoint: Some(pb::GatewayAddress {
                destination: Some(pb::gateway_address::Destination::Hostname(
                    pb::NamespacedHostname {
                        namespace: "shop".into(),
                        hostname: "waypoint.shop.svc.cluster.local".into(),
                    },
                )),
                hbone_mtls_port: 15008,
            }),
            ..Default::default()
        })),
    }
}

fn endpoint(name: &str, ip: IpAddr, services: &[&str]) -> pb::Address {
    pb::Address {
        r#type: Some(pb::address::Type::Workload(pb::Workload {
            uid: format!("c//Pod/shop/{name}"),
            name: name.into(),
            namespace: "shop".into(),
            addresses: vec![mesh_authz::ip_bytes(ip)],
            tunnel_protocol: pb::TunnelProtocol::Hbone as i32,
            service_account: "backend".into(),
            services: services
                .iter()
                .map(|s| {
                    (
                        format!("shop/{s}.shop.svc.cluster.local"),
                        pb::PortList {
                            ports: vec![pb::Port {
                                service_port: 80,
                                target_port: 8080,
                                app_protocol: 0,
                            }],
                        },
                    )
                })
                .collect(),
            ..Default::default()
        })),
    }
}

struct Setup {
    client: hbone::Client,
    client_cert: WorkloadCertificate,
    waypoint_id: SpiffeId,
    waypoint_addr: SocketAddr,
    config: Arc<ConfigStore>,
    hits: Vec<Arc<AtomicUsize>>,
    conns: Vec<Arc<AtomicUsize>>,
    metrics: Arc<waypoint::metrics::Metrics>,
    certs: Arc<CertManager>,
    pool: Arc<waypoint::upstream_pool::UpstreamPool>,
}

/// Services: `api` (VIP t.100, endpoints v1 and v2), `api-v1`, `api-v2`, `mirror` (t.103),
/// and `tcp` (t.104, a TCP port).
async fn setup(t: u8) -> Setup {
    setup_traced(t, mesh_trace::Tracer::disabled()).await
}

async fn setup_traced(t: u8, tracer: Arc<mesh_trace::Tracer>) -> Setup {
    setup_with(t, tracer, Default::default()).await
}

/// [`setup_traced`] with a mirror budget of its own.
async fn setup_with(
    t: u8,
    tracer: Arc<mesh_trace::Tracer>,
    mirrors: Arc<waypoint::pipeline::mirror::MirrorLimit>,
) -> Setup {
    let ca = CertificateAuthority::new_root("cluster.local", 30 * DAY).unwrap();
    let backend_cert = cert(&ca, "shop", "backend");
    let backend_tls = Arc::new(mesh_identity::server_config(&backend_cert).unwrap());
    let (mut hits, mut conns) = (Vec::new(), Vec::new());
    for (n, name) in [(1u8, "v1"), (2, "v2"), (3, "mirror"), (4, "tcp")] {
        let h = Arc::new(AtomicUsize::new(0));
        let c = Arc::new(AtomicUsize::new(0));
        backend(SocketAddr::new(ip(t, n), 8080), name, h.clone(), c.clone()).await;
        conns.push(c);
        hbone_server(
            SocketAddr::new(ip(t, n), 15008),
            backend_tls.clone(),
            Arc::new(Forward),
        )
        .await;
        hits.push(h);
    }
    let mut state = State::default();
    for a in [
        service("api", ip(t, 100), pb::AppProtocol::Http11),
        service("api-v1", ip(t, 101), pb::AppProtocol::Http11),
        service("api-v2", ip(t, 102), pb::AppProtocol::Http11),
        service("mirror", ip(t, 103), pb::AppProtocol::Http11),
        service("tcp", ip(t, 104), pb::AppProtocol::Tcp),
        service("api-h2", ip(t, 105), pb::AppProtocol::Http2),
        endpoint("v1", ip(t, 1), &["api", "api-v1", "api-h2"]),
        endpoint("v2", ip(t, 2), &["api", "api-v2"]),
        endpoint("mirror", ip(t, 3), &["mirror"]),
        endpoint("tcp", ip(t, 4), &["tcp"]),
    ] {
        state.apply_address(&a).unwrap();
    }
    let config = Arc::new(ConfigStore::new(Config {
        discovery: state,
        ..Default::default()
    }));
    let waypoint_id = SpiffeId::new("cluster.local", "shop", "waypoint").unwrap();
    let certs = CertManager::new(CertSource::Local {
        ca: Box::new(
            CertificateAuthority::load(
                "cluster.local",
                &ca.cert_pem(),
                &ca.key_pem(),
                None,
                &ca.roots_pem(),
            )
            .unwrap(),
        ),
        ttl: std::time::Duration::from_secs(24 * 3600),
    });
    let metrics = Arc::new(waypoint::metrics::Metrics::new());
    let mut wp = new_waypoint(&waypoint_id, &config, certs.clone(), &metrics, tracer);
    Arc::get_mut(&mut wp).expect("not shared yet").mirrors = mirrors;
    let pool = wp.pool.get().clone();
    let waypoint_addr = SocketAddr::new(ip(t, 200), 15008);
    let creds = certs.get(&waypoint_id).await.unwrap();
    hbone_server(
        waypoint_addr,
        creds.server_config.clone(),
        Arc::new(Handler(wp)),
    )
    .await;
    Setup {
        client: hbone::Client::new(hbone::TcpDialer, hbone::ClientSettings::default()),
        client_cert: cert(&ca, "front", "web"),
        waypoint_id,
        waypoint_addr,
        config,
        hits,
        conns,
        metrics,
        certs,
        pool,
    }
}

fn new_waypoint(
    id: &SpiffeId,
    config: &Arc<ConfigStore>,
    certs: Arc<CertManager>,
    metrics: &Arc<waypoint::metrics::Metrics>,
    tracer: Arc<mesh_trace::Tracer>,
) -> Arc<Waypoint> {
    new_waypoint_on(&DataPlane::inline(), id, config, certs, metrics, tracer)
}

/// A waypoint with an upstream pool per data thread of `plane`, as in production.
fn new_waypoint_on(
    plane: &DataPlane,
    id: &SpiffeId,
    config: &Arc<ConfigStore>,
    certs: Arc<CertManager>,
    metrics: &Arc<waypoint::metrics::Metrics>,
    tracer: Arc<mesh_trace::Tracer>,
) -> Arc<Waypoint> {
    Arc::new(Waypoint {
        identity: id.clone(),
        config: config.clone(),
        certs,
        client: PerThread::new(plane, || {
            hbone::Client::new(hbone::TcpDialer, hbone::ClientSettings::default())
        }),
        metrics: metrics.clone(),
        budget: Default::default(),
        balancer: Arc::new(waypoint::balancer::Balancer::new(
            waypoint::balancer::BalancerConfig {
                consecutive_errors: 3,
                ..Default::default()
            },
        )),
        pool: PerThread::new(plane, Default::default),
        normalization: Default::default(),
        shutdown: CancellationToken::new(),
        idle_grace: waypoint::in_flight::IDLE_GRACE,
        tracer,
        mirrors: Default::default(),
    })
}

impl Setup {
    /// A waypoint of this set-up's identity, configuration and certificates, untraced,
    /// without data threads.
    fn waypoint(&self) -> Arc<Waypoint> {
        self.waypoint_on(&DataPlane::inline())
    }

    /// [`Setup::waypoint`] with an upstream pool per data thread of `plane`.
    fn waypoint_on(&self, plane: &DataPlane) -> Arc<Waypoint> {
        new_waypoint_on(
            plane,
            &self.waypoint_id,
            &self.config,
            self.certs.clone(),
            &self.metrics,
            mesh_trace::Tracer::disabled(),
        )
    }

    fn route(&self, json: &str) {
        self.route_with_faults(json, serde_json::json!({}));
    }

    /// As mesh-control reads it (with the HTTPFaults of `faults`, by name) and the
    /// waypoint compiles it.
    fn route_with_faults(&self, json: &str, faults: serde_json::Value) {
        let spec: serde_json::Value = serde_json::from_str(json).unwrap();
        let lookup = |name: &str| faults.get(name);
        let (typed, _) = mesh_route::k8s::read_route(
            mesh_route::k8s::Kind::Http,
            "shop",
            "r",
            Some(&spec),
            &lookup,
        );
        let (r, errors) = waypoint::route::compile(&typed);
        assert!(errors.is_empty(), "{errors:?}");
        self.config
            .update(|c| c.routes.insert("shop/r".into(), r))
            .unwrap();
    }

    fn policy(&self, name: &str, json: &str) {
        // As mesh-control reads and sends it.
        let spec: serde_json::Value = serde_json::from_str(json).unwrap();
        let (typed, _) = mesh_authz::k8s::read("shop", name, &Default::default(), Some(&spec));
        let (p, errors) = Policy::from_proto(&mesh_proto::waypoint::L7Policy {
            namespace: "shop".into(),
            name: name.into(),
            policy: Some(typed),
        });
        assert!(errors.is_empty(), "{errors:?}");
        self.config
            .update(|c| {
                c.policies
                    .insert(format!("shop/{name}"), (p, vec![Target::Gateway]))
            })
            .unwrap();
    }

    async fn tunnel(&self, vip: IpAddr) -> hbone::Tunnel {
        self.tunnel_via(self.waypoint_addr, vip).await
    }

    async fn tunnel_via(&self, waypoint: SocketAddr, vip: IpAddr) -> hbone::Tunnel {
        self.connect_via(waypoint, vip).await.unwrap().tunnel
    }

    /// A CONNECT to `vip`:80 through the waypoint at `waypoint`, as the client's ztunnel.
    async fn connect_via(
        &self,
        waypoint: SocketAddr,
        vip: IpAddr,
    ) -> Result<hbone::Established, hbone::ConnectError> {
        self.connect_with(&self.client, waypoint, vip).await
    }

    /// As [`Setup::connect_via`], over `client`'s HBONE connections.
    async fn connect_with(
        &self,
        client: &hbone::Client,
        waypoint: SocketAddr,
        vip: IpAddr,
    ) -> Result<hbone::Established, hbone::ConnectError> {
        let key = hbone::PoolKey::new(
            self.client_cert.identity().clone(),
            vec![self.waypoint_id.clone()],
            waypoint,
            None,
        );
        client
            .connect(
                &key,
                &self.client_cert,
                &hbone::ConnectRequest::new(SocketAddr::new(vip, 80)),
            )
            .await
    }

    /// One HTTP/1.1 request through the waypoint: (status, body, headers).
    async fn get(&self, vip: IpAddr, path: &str) -> (u16, String, http::HeaderMap) {
        self.get_via(self.waypoint_addr, vip, path).await
    }

    async fn get_via(
        &self,
        waypoint: SocketAddr,
        vip: IpAddr,
        path: &str,
    ) -> (u16, String, http::HeaderMap) {
        get_on(self.tunnel_via(waypoint, vip).await, path).await
    }
}

/// One HTTP/1.1 request over `tunnel`: (status, body, headers).
async fn get_on(tunnel: hbone::Tunnel, path: &str) -> (u16, String, http::HeaderMap) {
    let io = hyper_util::rt::TokioIo::new(tunnel);
    let (mut s, c) = hyper::client::conn::http1::handshake(io).await.unwrap();
    tokio::spawn(c);
    let req = http::Request::get(path)
        .header("host", "api.shop.svc.cluster.local")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = s.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body =
        String::from_utf8_lossy(&resp.into_body().collect().await.unwrap().to_bytes()).into_owned();
    (status, body, headers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_route_goes_to_the_service_and_matches_pick_backends() {
    let s = setup(1).await;
    let (code, body, _) = s.get(ip(1, 101), "/x").await;
    assert_eq!((code, body.as_str()), (200, "v1 /x"));
    s.route(r#"{"parentRefs":[{"kind":"Service","name":"api","port":80}],"rules":[
        {"matches":[{"path":{"type":"Exact","value":"/exact"}}],"backendRefs":[{"name":"api-v2","port":80}]},
        {"matches":[{"path":{"type":"PathPrefix","value":"/p"}}],"backendRefs":[{"name":"api-v1","port":80}]},
        {"matches":[{"path":{"type":"RegularExpression","value":"/re/[0-9]+"}}],"backendRefs":[{"name":"api-v2","port":80}]},
        {"matches":[{"headers":[{"name":"host","value":"api.shop.svc.cluster.local"}],"path":{"type":"PathPrefix","value":"/h"}}],"backendRefs":[{"name":"api-v2","port":80}]},
        {"matches":[{"queryParams":[{"name":"v","value":"2"}]}],"backendRefs":[{"name":"api-v2","port":80}]},
        {"matches":[{"method":"GET","path":{"type":"PathPrefix","value":"/m"}}],"backendRefs":[{"name":"api-v2","port":80}]}
    ]}"#);
    for (path, want) in [
        ("/exact", "v2"),
        ("/p/x", "v1"),
        ("/re/12", "v2"),
        ("/h", "v2"),
        ("/q?v=2", "v2"),
        ("/m", "v2"),
    ] {
        let (code, body, _) = s.get(ip(1, 100), path).await;
        assert_eq!(code, 200, "{path}");
        assert!(body.starts_with(want), "{path} → {body}");
    }
}

/// Hop-by-hop headers stop at the waypoint, both ways (RFC 9110 §7.6.1): the upstream
/// never sees the client connection's, the client never sees the upstream connection's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_headers_stop_at_the_waypoint() {
    let s = setup(18).await;
    let io = hyper_util::rt::TokioIo::new(s.tunnel(ip(18, 101)).await);
    let (mut c, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
    tokio::spawn(conn);
    let req = http::Request::get("/hop")
        .header("host", "api.shop.svc.cluster.local")
        .header("connection", "x-client-hop")
        .header("x-client-hop", "client-connection-detail")
        .header("keep-alive", "timeout=9")
        .header("x-end-to-end", "kept")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = c.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let h = resp.headers().clone();
    let seen =
        String::from_utf8_lossy(&resp.into_body().collect().await.unwrap().to_bytes()).into_owned();
    assert!(seen.contains("\"x-end-to-end\": \"kept\""), "{seen}");
    for leaked in ["x-client-hop", "keep-alive", "timeout=9"] {
        assert!(!seen.contains(leaked), "the upstream saw {leaked}: {seen}");
    }
    assert!(h.get("x-hop").is_none(), "{h:?}");
    assert!(h.get("keep-alive").is_none(), "{h:?}");
    assert!(
        h.get_all("connection")
            .iter()
            .all(|v| v != "keep-alive, x-hop"),
        "{h:?}"
    );
}

/// A route's header filters cannot put hop-by-hop headers back: they are stripped after
/// the filters, both ways.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_header_filters_do_not_re_add_hop_by_hop_headers() {
    let s = setup(21).await;
    s.route(
        r#"{"parentRefs":[{"group":"","kind":"Service","name":"api-v1","port":80}],"rules":[
        {"backendRefs":[{"name":"api-v1","port":80}],
         "filters":[{"type":"RequestHeaderModifier","requestHeaderModifier":{"set":[
                        {"name":"x-added","value":"yes"},{"name":"keep-alive","value":"timeout=77"},
                        {"name":"upgrade","value":"websocket"},{"name":"proxy-connection","value":"keep-alive"}]}},
                    {"type":"ResponseHeaderModifier","responseHeaderModifier":{"add":[
                        {"name":"x-from","value":"waypoint"},{"name":"keep-alive","value":"timeout=88"},
                        {"name":"upgrade","value":"h2c"}]}}]}
    ]}"#,
    );
    let io = hyper_util::rt::TokioIo::new(s.tunnel(ip(21, 101)).await);
    let (mut c, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
    tokio::spawn(conn);
    let req = http::Request::get("/echo-headers")
        .header("host", "api-v1.shop.svc.cluster.local")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = c.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let h = resp.headers().clone();
    let seen =
        String::from_utf8_lossy(&resp.into_body().collect().await.unwrap().to_bytes()).into_owned();
    assert!(seen.contains("\"x-added\": \"yes\""), "{seen}");
    for leaked in ["timeout=77", "websocket", "proxy-connection"] {
        assert!(!seen.contains(leaked), "the upstream got {leaked}: {seen}");
    }
    assert_eq!(h["x-from"], "waypoint");
    assert!(h.get("upgrade").is_none(), "{h:?}");
    assert!(
        h.get_all("keep-alive").iter().all(|v| v != "timeout=88"),
        "{h:?}"
    );
}

/// A message framed with a coding on top of `chunked` is refused (the framing is undone
/// and the header stripped, so the coding would be lost): 400 for a request, 502 for a
/// response.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transfer_coding_other_than_chunked_is_refused_both_ways() {
    use tokio::io::AsyncWriteExt;
    let s = setup(22).await;
    let mut io = s.tunnel(ip(22, 101)).await;
    io.write_all(
        b"POST /coded HTTP/1.1\r\nhost: api-v1.shop.svc.cluster.local\r\n\
          transfer-encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await
    .unwrap();
    let (head, body) = read_response(&mut io).await;
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    assert!(body.contains("only chunked"), "{body}");
    assert_eq!(s.hits[0].load(Ordering::SeqCst), 0, "never forwarded");
    // Plain chunked is served.
    let mut io = s.tunnel(ip(22, 101)).await;
    io.write_all(
        b"POST /plain HTTP/1.1\r\nhost: api-v1.shop.svc.cluster.local\r\n\
          transfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await
    .unwrap();
    let (head, body) = read_response(&mut io).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(body, "v1 /plain");
    // An upstream answer with a coding: 502.
    let (code, body, _) = s.get(ip(22, 101), "/gzip-coded").await;
    assert_eq!(code, 502, "{body}");
    assert!(body.contains("only chunked"), "{body}");
}

/// Once a route attaches to the Service port, a request none of its rules matches gets
/// 404 and is counted; it never reaches the Service (which would bypass the route's
/// matches).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_no_rule_matches_gets_404() {
    let s = setup(14).await;
    s.route(r#"{"parentRefs":[{"kind":"Service","name":"api","port":80}],"rules":[
        {"matches":[{"path":{"type":"RegularExpression","value":"/admin/\\p{L}+"}}],"backendRefs":[{"name":"api-v2","port":80}]},
        {"matches":[{"path":{"type":"PathPrefix","value":"/open"}}],"backendRefs":[{"name":"api-v1","port":80}]}
    ]}"#);
    let (code, body, _) = s.get(ip(14, 100), "/open/x").await;
    assert_eq!((code, body.as_str()), (200, "v1 /open/x"));
    let (code, body, _) = s.get(ip(14, 100), "/admin/x").await;
    assert_eq!(code, 404, "{body}");
    assert!(
        body.contains("no route rule of shop/api:80 matches"),
        "{body}"
    );
    assert!(
        s.metrics
            .encode()
            .lines()
            .any(|l| l.starts_with("istio_requests_total{") && l.contains("response_code=\"404\"")),
        "counted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_hbone_connection_runs_on_the_least_loaded_data_thread_with_that_threads_pool() {
    let s = setup(24).await;
    let plane = DataPlane::start("test-waypoint-data", 2).unwrap();
    let wp = s.waypoint_on(&plane);
    let lifecycle = synced();
    let listen = SocketAddr::new(ip(24, 201), 15008);
    tokio::spawn(waypoint::server::serve(
        wp.clone(),
        lifecycle.clone(),
        ServeConfig {
            listen,
            cert_wait: Duration::from_secs(2),
            drain_deadline: Duration::from_secs(1),
            drain_delay: Duration::ZERO,
            data_plane: plane,
        },
        std::future::pending(),
    ));
    wait_for(|| lifecycle.ready()).await;
    let pools = wp.pool.all();
    let idle = |thread: usize| pools[thread].held().0;
    // The first HBONE connection (kept open by the client's pool) goes to thread 0; its
    // request's upstream connection is pooled there. Ready may come just before the
    // listener is bound (a refused attempt reaches no thread).
    let mut first = s.connect_via(listen, ip(24, 101)).await;
    for _ in 0..100 {
        if first.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        first = s.connect_via(listen, ip(24, 101)).await;
    }
    let (code, body, _) = get_on(first.unwrap().tunnel, "/a").await;
    assert_eq!((code, body.as_str()), (200, "v1 /a"));
    wait_idle(&pools[0], 1).await;
    assert_eq!((idle(0), idle(1)), (1, 0));
    // A second HBONE connection (another client) goes to the thread with fewer: thread 1,
    // which dials an upstream connection of its own rather than borrow thread 0's.
    let other = hbone::Client::new(hbone::TcpDialer, hbone::ClientSettings::default());
    let tunnel = s.connect_with(&other, listen, ip(24, 101)).await.unwrap();
    let (code, body, _) = get_on(tunnel.tunnel, "/b").await;
    assert_eq!((code, body.as_str()), (200, "v1 /b"));
    wait_idle(&pools[1], 1).await;
    assert_eq!((idle(0), idle(1)), (1, 1));
    assert_eq!(
        s.conns[0].load(Ordering::SeqCst),
        2,
        "one upstream per thread"
    );
    // Each connection's next requests reuse its own thread's upstream connection.
    for (i, client) in [&s.client, &other].into_iter().enumerate() {
        let tunnel = s.connect_with(client, listen, ip(24, 101)).await.unwrap();
        let (code, _, _) = get_on(tunnel.tunnel, "/again").await;
        assert_eq!(code, 200);
        wait_idle(&pools[i], 1).await;
    }
    assert_eq!((idle(0), idle(1)), (1, 1));
    assert_eq!(
        s.conns[0].load(Ordering::SeqCst),
        2,
        "reused, each on its thread"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pools_that_do_not_match_the_data_threads_are_refused_at_start() {
    let s = setup(25).await;
    // One pool for two threads: their connections would wake each other.
    let wp = s.waypoint();
    let served = waypoint::server::serve(
        wp,
        synced(),
        ServeConfig {
            listen: SocketAddr::new(ip(25, 201), 15008),
            cert_wait: Duration::from_secs(2),
            drain_deadline: Duration::from_secs(1),
            drain_delay: Duration::ZERO,
            data_plane: DataPlane::start("test-waypoint-data", 2).unwrap(),
        },
        std::future::pending(),
    );
    let e = tokio::time::timeout(Duration::from_secs(10), served)
        .await
        .expect("refused at once")
        .unwrap_err();
    assert!(
        e.to_string().contains("do not match its 2 data threads"),
        "{e}"
    );
}

/// Waits (10 s at most) until the pool holds `n` idle HTTP/1.1 connections.
async fn wait_idle(pool: &waypoint::upstream_pool::UpstreamPool, n: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while pool.held().0 < n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{n} idle connections never came back to the pool: {:?}",
            pool.held()
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_http_connections_are_reused() {
    let s = setup(8).await;
    let v1_conns = || s.conns[0].load(Ordering::SeqCst);
    // A connection goes back to the pool once hyper has seen the end of the response,
    // which may be just after the client has: each next request waits for that, so the
    // counts below never depend on how fast the machine is.
    let idle = |n: usize| wait_idle(&s.pool, n);
    // HTTP/1.1 upstream: sequential requests share one connection.
    for i in 0..50 {
        let (code, body, _) = s.get(ip(8, 101), &format!("/n{i}")).await;
        assert_eq!((code, body), (200, format!("v1 /n{i}")));
        idle(1).await;
    }
    assert_eq!(s.hits[0].load(Ordering::SeqCst), 50);
    assert_eq!(
        v1_conns(),
        1,
        "50 sequential requests should share one connection"
    );
    // An endpoint that closes its connection: the next request gets a fresh one.
    let (code, _, _) = s.get(ip(8, 101), "/close").await;
    assert_eq!(code, 200);
    for _ in 0..5 {
        let (code, _, _) = s.get(ip(8, 101), "/after-close").await;
        assert_eq!(code, 200);
        idle(1).await;
    }
    assert_eq!(v1_conns(), 2);
    // Concurrent requests open more connections, which then stay for reuse.
    let all = futures_util::future::join_all((0..8).map(|_| s.get(ip(8, 101), "/slowish"))).await;
    assert!(all.iter().all(|(c, _, _)| *c == 200));
    let after_burst = v1_conns();
    idle(after_burst - 1).await;
    for _ in 0..20 {
        s.get(ip(8, 101), "/again").await;
        idle(1).await;
    }
    assert_eq!(
        v1_conns(),
        after_burst,
        "idle connections are reused after a burst"
    );
    // HTTP/2 upstream (a service port with appProtocol http2): one shared connection.
    let before = v1_conns();
    let all = futures_util::future::join_all((0..20).map(|_| s.get(ip(8, 105), "/h2"))).await;
    assert!(all.iter().all(|(c, b, _)| *c == 200 && b == "v1 /h2"));
    assert_eq!(
        v1_conns(),
        before + 1,
        "HTTP/2 requests share one connection"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_split_over_a_thousand_requests() {
    let s = setup(2).await;
    s.route(r#"{"parentRefs":[{"kind":"Service","name":"api"}],"rules":[{"backendRefs":[{"name":"api-v1","port":80,"weight":90},{"name":"api-v2","port":80,"weight":10}]}]}"#);
    let mut v2 = 0;
    for _ in 0..1000 {
        let (_, body, _) = s.get(ip(2, 100), "/").await;
        if body.starts_with("v2") {
            v2 += 1;
        }
    }
    // Expect 100; binomial sd ≈ 9.5: accept ±4 sd.
    assert!((62..=138).contains(&v2), "v2 got {v2}/1000");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_timeouts_redirects_rewrites_headers_and_mirroring() {
    let s = setup(3).await;
    s.route(r#"{"parentRefs":[{"kind":"Service","name":"api"}],"rules":[
        {"matches":[{"path":{"type":"Exact","value":"/fail-twice"}}],"backendRefs":[{"name":"api-v1","port":80}],
         "retry":{"codes":[503],"attempts":3,"backoff":"10ms"}},
        {"matches":[{"path":{"type":"Exact","value":"/slow"}}],"backendRefs":[{"name":"api-v1","port":80}],"timeouts":{"request":"200ms"}},
        {"matches":[{"path":{"type":"PathPrefix","value":"/old"}}],"filters":[{"type":"RequestRedirect","requestRedirect":{"path":{"type":"ReplacePrefixMatch","replacePrefixMatch":"/new"},"statusCode":301}}]},
        {"matches":[{"path":{"type":"PathPrefix","value":"/api"}}],"backendRefs":[{"name":"api-v1","port":80}],
         "filters":[{"type":"URLRewrite","urlRewrite":{"path":{"type":"ReplacePrefixMatch","replacePrefixMatch":"/"}}}]},
        {"matches":[{"path":{"type":"Exact","value":"/echo-headers"}}],"backendRefs":[{"name":"api-v1","port":80}],
         "filters":[{"type":"RequestHeaderModifier","requestHeaderModifier":{"set":[{"name":"x-added","value":"yes"}]}},
                    {"type":"ResponseHeaderModifier","responseHeaderModifier":{"add":[{"name":"x-from","value":"waypoint"}]}}]},
        {"matches":[{"path":{"type":"Exact","value":"/mirrored"}}],"backendRefs":[{"name":"api-v1","port":80}],
         "filters":[{"type":"RequestMirror","requestMirror":{"backendRef":{"name":"mirror","port":80}}}]}
    ]}"#);
    let (code, body, _) = s.get(ip(3, 100), "/fail-twice").await;
    assert_eq!(
        (code, body.as_str()),
        (200, "v1 /fail-twice"),
        "two failures retried"
    );
    let start = std::time::Instant::now();
    let (code, _, _) = s.get(ip(3, 100), "/slow").await;
    assert_eq!(code, 504);
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "request timeout applied"
    );
    let (code, _, h) = s.get(ip(3, 100), "/old/x?q=1").await;
    assert_eq!(code, 301);
    assert_eq!(h["location"], "http://api.shop.svc.cluster.local/new/x?q=1");
    let (_, body, _) = s.get(ip(3, 100), "/api/users").await;
    assert_eq!(body, "v1 /users", "prefix rewritten");
    let (_, body, h) = s.get(ip(3, 100), "/echo-headers").await;
    assert!(body.contains("\"x-added\": \"yes\""), "{body}");
    assert_eq!(h["x-from"], "waypoint");
    let before = s.hits[2].load(Ordering::SeqCst);
    let (_, body, _) = s.get(ip(3, 100), "/mirrored").await;
    assert_eq!(body, "v1 /mirrored");
    for _ in 0..50 {
        if s.hits[2].load(Ordering::SeqCst) > before {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        s.hits[2].load(Ordering::SeqCst),
        before + 1,
        "the mirror got a copy"
    );
}

/// Waits for `done`, within a bound only a broken waypoint reaches (never how fast this
/// machine is).
async fn until(what: &str, done: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(std::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Mirrors are sent off and never waited for: a mirror slower than the traffic it copies
/// must not pile up copies (each holds its request) without bound. Past the budget a copy
/// is not sent and is counted, the requests themselves are answered; a copy that gets no
/// answer gives its place back when the rule's timeout ends it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_mirror_holds_at_most_its_budget_and_requests_are_still_answered() {
    use waypoint::pipeline::mirror::{MIRROR_MIN_COST, MirrorLimit};
    let budget = 2 * MIRROR_MIN_COST;
    let limit = Arc::new(MirrorLimit::new(budget));
    let s = setup_with(26, mesh_trace::Tracer::disabled(), limit.clone()).await;
    // The mirror never answers `/mirror-hangs` (the other backends do at once), nor
    // `/hang` (nobody does).
    s.route(r#"{"parentRefs":[{"kind":"Service","name":"api"}],"rules":[
        {"matches":[{"path":{"type":"Exact","value":"/mirror-hangs"}}],"backendRefs":[{"name":"api-v1","port":80}],
         "timeouts":{"request":"8s"},
         "filters":[{"type":"RequestMirror","requestMirror":{"backendRef":{"name":"mirror","port":80}}}]},
        {"matches":[{"path":{"type":"Exact","value":"/unanswered"}}],"backendRefs":[{"name":"api-v1","port":80}],
         "timeouts":{"backendRequest":"500ms"},
         "filters":[{"type":"URLRewrite","urlRewrite":{"path":{"type":"ReplaceFullPath","replaceFullPath":"/hang"}}},
                    {"type":"RequestMirror","requestMirror":{"backendRef":{"name":"mirror","port":80}}}]}
    ]}"#);
    let dropped = || -> u64 {
        let text = s.metrics.encode();
        let line = text
            .lines()
            .find(|l| l.starts_with("waypoint_mirror_requests_dropped_total"))
            .unwrap_or_else(|| panic!("no mirror counter in\n{text}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    let mirrored = || s.hits[2].load(Ordering::SeqCst);
    // Five requests: each answered; the first two copies take the budget (they stay
    // unanswered for the rule's 8 s), the other three are not sent.
    for _ in 0..5 {
        let (code, body, _) = s.get(ip(26, 100), "/mirror-hangs").await;
        assert_eq!((code, body.as_str()), (200, "v1 /mirror-hangs"));
    }
    assert_eq!(dropped(), 3, "copies past the budget are counted");
    until("the two copies reach the mirror", || mirrored() >= 2).await;
    assert_eq!(mirrored(), 2, "only the copies within the budget were sent");
    assert_eq!(limit.free(), 0, "the two copies hold the whole budget");
    // The rule's 8 s request timeout ends them (the default bound, 15 s, would outlast
    // the wait), and their places are back.
    until("the copies end with the rule's timeout", || {
        limit.free() == budget
    })
    .await;
    let (code, _, _) = s.get(ip(26, 100), "/mirror-hangs").await;
    assert_eq!(code, 200);
    until("a copy is sent again", || mirrored() == 3).await;
    assert_eq!(dropped(), 3);
    // The backend timeout bounds a copy too (500 ms here), as it does the request.
    until("that copy ends", || limit.free() == budget).await;
    let (code, _, _) = s.get(ip(26, 100), "/unanswered").await;
    assert_eq!(code, 504, "the request itself times out as the rule says");
    until("the copy to a silent mirror gives its place back", || {
        limit.free() == budget
    })
    .await;
    assert_eq!(dropped(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_and_response_sizes_are_recorded() {
    let s = setup(7).await;
    let (code, body, _) = s.get(ip(7, 101), "/sized").await;
    assert_eq!((code, body.as_str()), (200, "v1 /sized"));
    let sums = |name: &str| -> Vec<String> {
        s.metrics
            .encode()
            .lines()
            .filter(|l| l.starts_with(&format!("istio_{name}_sum{{")))
            .map(|l| l.rsplit(' ').next().unwrap().to_string())
            .collect()
    };
    // Recorded when the response body has gone out, just after the client read it.
    for _ in 0..50 {
        if !sums("response_bytes").is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(sums("response_bytes"), ["9.0"], "len(\"v1 /sized\")");
    assert_eq!(sums("request_bytes"), ["0.0"], "a GET has no body");

    // A POST with a 1000-byte body (to api-v2: a new label set, so a new series).
    let io = hyper_util::rt::TokioIo::new(s.tunnel(ip(7, 102)).await);
    let (mut sender, c) = hyper::client::conn::http1::handshake(io).await.unwrap();
    tokio::spawn(c);
    let req = http::Request::post("/upload")
        .header("host", "api-v2.shop.svc.cluster.local")
        .body(Full::new(Bytes::from(vec![b'x'; 1000])))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"v2 /upload");
    for _ in 0..50 {
        if sums("request_bytes").len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut got = sums("request_bytes");
    got.sort();
    assert_eq!(got, ["0.0", "1000.0"], "the POST body counted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_endpoint_is_ejected() {
    let s = setup(6).await;
    // Service api has two endpoints; v2 answers 503 on this path. Once v2 has failed three
    // times in a row it is ejected and every request goes to v1.
    let mut failures = 0;
    for _ in 0..30 {
        let (code, _, _) = s.get(ip(6, 100), "/fail-on-v2").await;
        failures += usize::from(code == 503);
    }
    assert!(
        (3..=10).contains(&failures),
        "v2 failed {failures} times before ejection"
    );
    for _ in 0..50 {
        let (code, body, _) = s.get(ip(6, 100), "/fail-on-v2").await;
        assert_eq!(
            (code, body.as_str()),
            (200, "v1 /fail-on-v2"),
            "v2 is ejected"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delay_and_abort_faults() {
    let s = setup(5).await;
    let ext = |name: &str| {
        format!(
            r#"[{{"type":"ExtensionRef","extensionRef":{{"group":"ambient-mesh.dev","kind":"HTTPFault","name":"{name}"}}}}]"#
        )
    };
    s.route_with_faults(
        &format!(
            r#"{{"parentRefs":[{{"kind":"Service","name":"api"}}],"rules":[
        {{"matches":[{{"path":{{"type":"Exact","value":"/delayed"}}}}],"backendRefs":[{{"name":"api-v1","port":80}}],"filters":{}}},
        {{"matches":[{{"path":{{"type":"Exact","value":"/aborted"}}}}],"backendRefs":[{{"name":"api-v1","port":80}}],"filters":{}}},
        {{"matches":[{{"path":{{"type":"Exact","value":"/flaky"}}}}],"backendRefs":[{{"name":"api-v1","port":80}}],"filters":{}}}
    ]}}"#,
            ext("delay"),
            ext("abort"),
            ext("flaky")
        ),
        serde_json::json!({
            "delay": {"delay": {"fixedDelay": "300ms"}},
            "abort": {"abort": {"httpStatus": 503}},
            "flaky": {"abort": {"httpStatus": 500, "percentage": {"value": 25}}},
        }),
    );
    let before = s.hits[0].load(Ordering::SeqCst);
    let start = std::time::Instant::now();
    let (code, body, _) = s.get(ip(5, 100), "/delayed").await;
    assert_eq!((code, body.as_str()), (200, "v1 /delayed"));
    assert!(start.elapsed() >= Duration::from_millis(300), "delayed");
    let (code, body, _) = s.get(ip(5, 100), "/aborted").await;
    assert_eq!((code, body.as_str()), (503, "fault filter abort\n"));
    assert_eq!(
        s.hits[0].load(Ordering::SeqCst),
        before + 1,
        "an aborted request never reaches the backend"
    );
    let mut aborted = 0;
    for _ in 0..400 {
        let (code, _, _) = s.get(ip(5, 100), "/flaky").await;
        assert!(code == 200 || code == 500, "{code}");
        aborted += usize::from(code == 500);
    }
    // Expect 100; binomial sd ≈ 8.7: accept ±4 sd.
    assert!((65..=135).contains(&aborted), "aborted {aborted}/400");
}

/// Gateway API: a rule with a filter that cannot be applied (one this mesh does not
/// implement, an ExtensionRef to an HTTPFault that does not exist or is invalid) answers
/// 500 for the requests it matches; before, the filter was skipped and the request routed
/// as if it were absent. A backend that cannot be used fails its share the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_whose_filters_cannot_be_applied_answer_500() {
    let s = setup(13).await;
    let fault = |name: &str| {
        format!(
            r#"[{{"type":"ExtensionRef","extensionRef":{{"group":"ambient-mesh.dev","kind":"HTTPFault","name":"{name}"}}}}]"#
        )
    };
    s.route_with_faults(
        &format!(
            r#"{{"parentRefs":[{{"kind":"Service","name":"api"}}],"rules":[
        {{"matches":[{{"path":{{"value":"/cors"}}}}],"backendRefs":[{{"name":"api-v2","port":80}}],
          "filters":[{{"type":"CORS","cors":{{"allowOrigins":["*"]}}}}]}},
        {{"matches":[{{"path":{{"value":"/missing"}}}}],"backendRefs":[{{"name":"api-v2","port":80}}],"filters":{}}},
        {{"matches":[{{"path":{{"value":"/invalid"}}}}],"backendRefs":[{{"name":"api-v2","port":80}}],"filters":{}}},
        {{"matches":[{{"path":{{"value":"/import"}}}}],"backendRefs":[{{"kind":"ServiceImport","name":"api-v2","port":80}}]}},
        {{"matches":[{{"path":{{"type":"RegularExpression","value":"/re/("}}}}],"backendRefs":[{{"name":"api-v2","port":80}}]}},
        {{"matches":[{{"path":{{"value":"/ok"}}}}],"backendRefs":[{{"name":"api-v2","port":80}}]}},
        {{"backendRefs":[{{"name":"api-v1","port":80}}]}}
    ]}}"#,
            fault("nope"),
            fault("broken")
        ),
        serde_json::json!({"broken": {"abort": {"httpStatus": 42}}}),
    );
    let hits = || s.hits[1].load(Ordering::SeqCst);
    let before = hits();
    for (path, why) in [
        ("/cors/x", "spec.rules[0].filters[0].type"),
        ("/missing", "HTTPFault shop/nope does not exist"),
        ("/invalid", "HTTPFault shop/broken is invalid"),
        ("/import", "backend shop/api-v2 cannot be used"),
    ] {
        let (code, body, _) = s.get(ip(13, 100), path).await;
        assert_eq!(code, 500, "{path}: {body}");
        assert!(body.contains(why), "{path}: {body}");
    }
    assert_eq!(hits(), before, "none of them reached api-v2");
    // An invalid regex matches nothing: the request goes where it would without it.
    let (code, body, _) = s.get(ip(13, 100), "/re/(").await;
    assert_eq!((code, body.as_str()), (200, "v1 /re/("));
    let (code, body, _) = s.get(ip(13, 100), "/ok").await;
    assert_eq!((code, body.as_str()), (200, "v2 /ok"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn l7_policy_http2_tcp_and_malformed_http() {
    let s = setup(4).await;
    // TCP port: bytes pass through to the backend untouched.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut t = s.tunnel(ip(4, 104)).await;
    t.write_all(b"GET /raw HTTP/1.0\r\n\r\n").await.unwrap();
    let mut out = Vec::new();
    t.read_to_end(&mut out).await.unwrap();
    assert!(
        String::from_utf8_lossy(&out).ends_with("tcp /raw"),
        "{}",
        String::from_utf8_lossy(&out)
    );
    s.policy(
        "no-admin",
        r#"{"action":"DENY","rules":[{"to":[{"operation":{"paths":["/admin*"]}}]}]}"#,
    );
    s.policy("front-get", r#"{"rules":[{"from":[{"source":{"namespaces":["front"]}}],"to":[{"operation":{"methods":["GET"]}}]}]}"#);
    let (code, body, _) = s.get(ip(4, 100), "/admin/x").await;
    assert_eq!(
        (code, body.as_str()),
        (403, "RBAC: access denied by shop/no-admin\n")
    );
    let (code, _, _) = s.get(ip(4, 100), "/ok").await;
    assert_eq!(code, 200);
    // HTTP/2 from the client side.
    let io = hyper_util::rt::TokioIo::new(s.tunnel(ip(4, 100)).await);
    let (mut h2, c) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
            .await
            .unwrap();
    tokio::spawn(c);
    let resp = h2
        .send_request(
            http::Request::get("http://api.shop.svc.cluster.local/h2")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(body.ends_with(b" /h2"), "{body:?}");
    // The same policies at L4 on the TCP port: the DENY on paths denies every
    // connection, the ALLOW on methods allows none (fail closed both ways).
    let refused = s.connect_via(s.waypoint_addr, ip(4, 104)).await;
    assert!(
        matches!(
            refused,
            Err(hbone::ConnectError::Refused(hbone::Refused::Unauthorized))
        ),
        "{refused:?}"
    );
    // Malformed HTTP gets 400 and its connection closes; others are unaffected.
    let mut bad = s.tunnel(ip(4, 100)).await;
    bad.write_all(b"NOT HTTP AT ALL\r\n\r\n").await.unwrap();
    let mut out = Vec::new();
    let _ = bad.read_to_end(&mut out).await;
    assert!(
        String::from_utf8_lossy(&out).starts_with("HTTP/1.1 400"),
        "{}",
        String::from_utf8_lossy(&out)
    );
    let (code, _, _) = s.get(ip(4, 100), "/still-fine").await;
    assert_eq!(code, 200);
}

// ---- lifecycle: readiness, accepting, certificates, drain ----

/// `GET path` on the admin endpoint: (status, body).
async fn admin_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let status = out[9..12].parse().unwrap();
    let body = out.split("\r\n\r\n").nth(1).unwrap_or_default().to_string();
    (status, body)
}

async fn admin(addr: SocketAddr, wp: &Waypoint, lifecycle: &Arc<Lifecycle>) -> SocketAddr {
    let l = tokio::net::TcpListener::bind(addr).await.unwrap();
    let at = l.local_addr().unwrap();
    tokio::spawn(waypoint::admin::serve(
        l,
        wp.metrics.clone(),
        lifecycle.clone(),
    ));
    at
}

fn first_response(
    type_url: &str,
    resources: Vec<mesh_proto::discovery::Resource>,
) -> DeltaDiscoveryResponse {
    DeltaDiscoveryResponse {
        type_url: type_url.into(),
        resources,
        nonce: "1".into(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_ready_and_not_listening_until_addresses_routes_and_policies_synced() {
    use mesh_xds::Handler as _;
    let s = setup(9).await;
    // A fresh waypoint, fed only by xDS.
    let config = Arc::new(ConfigStore::default());
    let wp = new_waypoint(
        &s.waypoint_id,
        &config,
        s.certs.clone(),
        &s.metrics,
        mesh_trace::Tracer::disabled(),
    );
    let lifecycle = Lifecycle::new();
    let admin_at = admin(SocketAddr::new(ip(9, 201), 0), &wp, &lifecycle).await;
    let listen = SocketAddr::new(ip(9, 201), 15008);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(waypoint::server::serve(
        wp.clone(),
        lifecycle.clone(),
        ServeConfig {
            listen,
            cert_wait: Duration::from_secs(2),
            drain_deadline: Duration::from_secs(2),
            drain_delay: Duration::ZERO,
            data_plane: Default::default(),
        },
        async {
            let _ = stopped.await;
        },
    ));
    let mut apply = waypoint::xds::Apply {
        config: config.clone(),
        lifecycle: lifecycle.clone(),
    };
    // Readiness needs no wait (`apply` sets it synchronously). "Not listening" is a
    // negative: `serve` is given a window (10 of the test's 20 ms polls) in which a
    // listener bound too early would accept.
    let not_listening = || async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        tokio::net::TcpStream::connect(listen).await.is_err()
    };
    let (code, body) = admin_get(admin_at, "/healthz/ready").await;
    assert_eq!(code, 503);
    assert!(
        body.contains("addresses not synced") && body.contains("policies not synced"),
        "{body}"
    );
    assert!(
        not_listening().await,
        "nothing is accepted before the first sync"
    );
    // Addresses alone are not enough: no policies yet must not mean "allow everything".
    let resources = [
        service("api-v1", ip(9, 101), pb::AppProtocol::Http11),
        endpoint("v1", ip(9, 1), &["api-v1"]),
    ]
    .into_iter()
    .enumerate()
    .map(|(i, a)| mesh_proto::discovery::Resource {
        name: format!("r{i}"),
        resource: Some(prost_types::Any {
            type_url: mesh_proto::type_url::ADDRESS.into(),
            value: mesh_proto::prost::Message::encode_to_vec(&a),
        }),
        ..Default::default()
    })
    .collect();
    assert!(
        apply
            .apply(&first_response(mesh_proto::type_url::ADDRESS, resources))
            .is_empty()
    );
    apply.apply(&first_response(mesh_proto::type_url::HTTP_ROUTE, vec![]));
    let (code, body) = admin_get(admin_at, "/healthz/ready").await;
    assert_eq!(code, 503);
    assert!(
        body.contains("policies not synced") && !body.contains("routes"),
        "{body}"
    );
    assert!(not_listening().await);
    // Policies (none, but known to be none): ready, and serving.
    apply.apply(&first_response(mesh_proto::type_url::L7_POLICY, vec![]));
    wait_for(|| lifecycle.ready()).await;
    let (code, body) = admin_get(admin_at, "/healthz/ready").await;
    assert_eq!((code, body.as_str()), (200, "ready\n"));
    let mut connected = false;
    for _ in 0..50 {
        if tokio::net::TcpStream::connect(listen).await.is_ok() {
            connected = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(connected, "listening once synced");
    let (code, body, _) = s.get_via(listen, ip(9, 101), "/after-sync").await;
    assert_eq!((code, body.as_str()), (200, "v1 /after-sync"));
    // Metrics stay on the same admin endpoint.
    let (code, metrics) = admin_get(admin_at, "/metrics").await;
    assert!(
        code == 200 && metrics.contains("istio_requests_total"),
        "{metrics}"
    );
    stop.send(()).unwrap();
    assert_eq!(served.await.unwrap().unwrap(), Stopped::Drained);
}

async fn wait_for(mut f: impl FnMut() -> bool) {
    for _ in 0..100 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("condition not met within 2 s");
}

fn synced() -> Arc<Lifecycle> {
    let l = Lifecycle::new();
    for t in [
        mesh_proto::type_url::ADDRESS,
        mesh_proto::type_url::HTTP_ROUTE,
        mesh_proto::type_url::L7_POLICY,
    ] {
        l.mark_synced(t);
    }
    l
}

/// How long the slow-CA test's connections wait for a certificate.
const CERT_WAIT: Duration = Duration::from_secs(1);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_ca_never_blocks_the_accept_loop() {
    use tokio::io::AsyncReadExt;
    let s = setup(10).await;
    // A "CA" that accepts connections and never answers.
    let ca = tokio::net::TcpListener::bind(SocketAddr::new(ip(10, 250), 0))
        .await
        .unwrap();
    let ca_at = ca.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((c, _)) = ca.accept().await {
            held.push(c);
        }
    });
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{ca_at}"))
        .unwrap()
        .connect_lazy();
    let slow = CertManager::new(CertSource::Ca {
        channel,
        token_file: None,
        cluster_id: "Kubernetes".into(),
        ttl: DAY,
    });
    let wp = new_waypoint(
        &s.waypoint_id,
        &s.config,
        slow,
        &s.metrics,
        mesh_trace::Tracer::disabled(),
    );
    let lifecycle = synced();
    let admin_at = admin(SocketAddr::new(ip(10, 201), 0), &wp, &lifecycle).await;
    let listen = SocketAddr::new(ip(10, 201), 15008);
    tokio::spawn(waypoint::server::serve(
        wp,
        lifecycle.clone(),
        ServeConfig {
            listen,
            cert_wait: CERT_WAIT,
            drain_deadline: Duration::from_secs(1),
            drain_delay: Duration::ZERO,
            data_plane: Default::default(),
        },
        std::future::pending(),
    ));
    let mut first = None;
    for _ in 0..50 {
        if let Ok(c) = tokio::net::TcpStream::connect(listen).await {
            first = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Several connections at once: each is answered (closed, as there is no certificate
    // to serve them with) after its own wait, none behind another: one after the other
    // they would take five waits (5 s); together one wait, so 3 s leaves seconds of room
    // for a slow machine and still tells the two apart.
    let start = std::time::Instant::now();
    let mut conns = vec![first.expect("listening")];
    for _ in 0..4 {
        conns.push(tokio::net::TcpStream::connect(listen).await.unwrap());
    }
    for mut c in conns {
        let mut buf = [0u8; 16];
        let r = tokio::time::timeout(6 * CERT_WAIT, c.read(&mut buf)).await;
        assert!(
            matches!(r, Ok(Ok(0)) | Ok(Err(_))),
            "the connection was closed within the bound"
        );
    }
    assert!(
        start.elapsed() < 3 * CERT_WAIT,
        "{:?}: connections waited behind each other",
        start.elapsed()
    );
    let (code, body) = admin_get(admin_at, "/healthz/ready").await;
    assert_eq!(code, 503);
    assert!(body.contains("no certificate"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests_within_the_deadline() {
    let s = setup(11).await;
    // On data threads, as in production.
    let plane = DataPlane::start("test-waypoint-data", 2).unwrap();
    let wp = s.waypoint_on(&plane);
    let lifecycle = synced();
    let admin_at = admin(SocketAddr::new(ip(11, 201), 0), &wp, &lifecycle).await;
    let listen = SocketAddr::new(ip(11, 201), 15008);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let served = {
        let serving = waypoint::server::serve(
            wp,
            lifecycle.clone(),
            ServeConfig {
                listen,
                cert_wait: Duration::from_secs(2),
                drain_deadline: Duration::from_secs(5),
                drain_delay: Duration::ZERO,
                data_plane: plane,
            },
            async {
                let _ = stopped.await;
            },
        );
        // When serving ended, not when the test looks.
        tokio::spawn(async move { (serving.await.unwrap(), std::time::Instant::now()) })
    };
    wait_for(|| lifecycle.ready()).await;
    let (code, _, _) = s.get_via(listen, ip(11, 101), "/warm").await;
    assert_eq!(code, 200);
    // An idle keep-alive connection holds the drain up at most the idle grace (its next
    // request may be on its way), then it is closed.
    let idle = {
        let io = hyper_util::rt::TokioIo::new(s.tunnel_via(listen, ip(11, 101)).await);
        let (mut sender, c) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(c);
        let resp = sender
            .send_request(
                http::Request::get("/idle")
                    .header("host", "api-v1.shop.svc.cluster.local")
                    .body(Full::new(Bytes::new()))
                    .unwrap(),
            )
            .await
            .unwrap();
        resp.into_body().collect().await.unwrap();
        sender
    };
    // A request that takes 2 s is in flight when the waypoint is told to stop.
    let before = s.hits[0].load(Ordering::SeqCst);
    let start = std::time::Instant::now();
    let slow = {
        let io = hyper_util::rt::TokioIo::new(s.tunnel_via(listen, ip(11, 101)).await);
        let (mut sender, c) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(c);
        tokio::spawn(async move {
            let resp = sender
                .send_request(
                    http::Request::get("/slow")
                        .header("host", "api-v1.shop.svc.cluster.local")
                        .body(Full::new(Bytes::new()))
                        .unwrap(),
                )
                .await
                .unwrap();
            let status = resp.status().as_u16();
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            (status, String::from_utf8_lossy(&body).into_owned())
        })
    };
    // In flight: the backend has it (and answers only 2 s later).
    wait_for(|| s.hits[0].load(Ordering::SeqCst) > before).await;
    stop.send(()).unwrap();
    wait_for(|| !lifecycle.ready()).await;
    let (code, body) = admin_get(admin_at, "/healthz/ready").await;
    assert_eq!(code, 503);
    assert!(body.contains("draining"), "{body}");
    // The listener closes right after readiness fails (no await in between).
    let mut refused = false;
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(listen).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(refused, "no new connections while draining");
    let (code, body) = slow.await.unwrap();
    assert_eq!(
        (code, body.as_str()),
        (200, "v1 /slow"),
        "the request in flight completed"
    );
    // Drained (not stopped by the deadline): the idle connection was closed after its
    // grace; and not before the request in flight was done (the app takes 2 s).
    let (stopped, stopped_at) = served.await.unwrap();
    assert_eq!(stopped, Stopped::Drained);
    assert!(
        stopped_at - start >= Duration::from_millis(1900),
        "serving ended {:?} after the request was sent",
        stopped_at - start
    );
    drop(idle);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_accepted_just_before_the_drain_gets_its_first_request_answered() {
    let s = setup(17).await;
    let wp = s.waypoint();
    let lifecycle = synced();
    let listen = SocketAddr::new(ip(17, 201), 15008);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(waypoint::server::serve(
        wp.clone(),
        lifecycle.clone(),
        ServeConfig {
            listen,
            cert_wait: Duration::from_secs(2),
            drain_deadline: Duration::from_secs(10),
            drain_delay: Duration::ZERO,
            data_plane: Default::default(),
        },
        async {
            let _ = stopped.await;
        },
    ));
    wait_for(|| lifecycle.ready()).await;
    // A new HTTP connection through the waypoint, its request not sent yet.
    let io = hyper_util::rt::TokioIo::new(s.tunnel_via(listen, ip(17, 101)).await);
    let (mut sender, c) = hyper::client::conn::http1::handshake(io).await.unwrap();
    tokio::spawn(c);
    stop.send(()).unwrap();
    wait_for(|| wp.shutdown.is_cancelled()).await;
    // (Time for the connection to see the drain: without the grace it closes now.)
    tokio::time::sleep(Duration::from_millis(200)).await;
    let resp = sender
        .send_request(
            http::Request::get("/first")
                .header("host", "api-v1.shop.svc.cluster.local")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .expect("the first request of a connection accepted before the drain is answered");
    assert_eq!(resp.status(), 200);
    // ...and the client is told the connection ends with it.
    let connection = resp.headers()["connection"].to_str().unwrap().to_string();
    assert!(
        connection.split(',').any(|t| t.trim() == "close"),
        "connection: {connection}"
    );
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"v1 /first");
    assert_eq!(served.await.unwrap().unwrap(), Stopped::Drained);
}

/// Reads one HTTP/1.1 response with a `content-length` from `io`: (head, body).
async fn read_response(io: &mut (impl tokio::io::AsyncRead + Unpin)) -> (String, String) {
    use tokio::io::AsyncReadExt;
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&raw).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .expect("a content-length");
            if body.len() >= len {
                return (head.to_string(), body.to_string());
            }
        }
        let n = io.read(&mut buf).await.unwrap();
        assert!(
            n > 0,
            "the connection closed before a whole answer: {:?}",
            String::from_utf8_lossy(&raw)
        );
        raw.extend_from_slice(&buf[..n]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_partly_sent_on_an_idle_keep_alive_connection_when_the_drain_starts_is_answered()
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = setup(23).await;
    let wp = s.waypoint();
    let lifecycle = synced();
    let listen = SocketAddr::new(ip(23, 201), 15008);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(waypoint::server::serve(
        wp.clone(),
        lifecycle.clone(),
        ServeConfig {
            listen,
            cert_wait: Duration::from_secs(2),
            drain_deadline: Duration::from_secs(10),
            drain_delay: Duration::ZERO,
            data_plane: Default::default(),
        },
        async {
            let _ = stopped.await;
        },
    ));
    wait_for(|| lifecycle.ready()).await;
    // A client that never retries: raw HTTP/1.1 on one keep-alive connection, one
    // request answered...
    let mut io = s.tunnel_via(listen, ip(23, 101)).await;
    let host = "host: api-v1.shop.svc.cluster.local\r\n";
    io.write_all(format!("GET /one HTTP/1.1\r\n{host}\r\n").as_bytes())
        .await
        .unwrap();
    let (head, body) = read_response(&mut io).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(body, "v1 /one");
    // ...the next one partly written when the drain starts, the rest after it.
    io.write_all(b"GET /two HTTP/1.1\r\n").await.unwrap();
    io.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    stop.send(()).unwrap();
    wait_for(|| wp.shutdown.is_cancelled()).await;
    // (Time for the connection to see the drain: closing an idle one at once loses it.)
    tokio::time::sleep(Duration::from_millis(300)).await;
    io.write_all(format!("{host}\r\n").as_bytes())
        .await
        .unwrap();
    let (head, body) = read_response(&mut io).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(body, "v1 /two");
    assert!(
        head.lines()
            .any(|l| l.eq_ignore_ascii_case("connection: close")),
        "the answer says the connection ends: {head}"
    );
    // ...and it does.
    let mut rest = Vec::new();
    let _ = io.read_to_end(&mut rest).await;
    assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest));
    assert_eq!(served.await.unwrap().unwrap(), Stopped::Drained);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn during_the_drain_delay_new_connections_are_served_while_not_ready() {
    let s = setup(16).await;
    let wp = s.waypoint();
    let lifecycle = synced();
    let admin_at = admin(SocketAddr::new(ip(16, 201), 0), &wp, &lifecycle).await;
    let listen = SocketAddr::new(ip(16, 201), 15008);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(waypoint::server::serve(
        wp,
        lifecycle.clone(),
        ServeConfig {
            listen,
            cert_wait: Duration::from_secs(2),
            drain_deadline: Duration::from_secs(5),
            // Longer than the test: it ends while the delay runs.
            drain_delay: Duration::from_secs(600),
            data_plane: Default::default(),
        },
        async {
            let _ = stopped.await;
        },
    ));
    wait_for(|| lifecycle.ready()).await;
    stop.send(()).unwrap();
    // Told to stop: readiness fails at once, so endpoints drop the pod...
    wait_for(|| !lifecycle.ready()).await;
    let (code, body) = admin_get(admin_at, "/healthz/ready").await;
    assert_eq!(code, 503);
    assert!(body.contains("draining"), "{body}");
    // ...while new connections that still come meanwhile are accepted and served.
    let tcp = tokio::net::TcpStream::connect(listen).await;
    assert!(tcp.is_ok(), "still accepting during the drain delay");
    let (code, body, _) = s.get_via(listen, ip(16, 101), "/late").await;
    assert_eq!((code, body.as_str()), (200, "v1 /late"));
    assert!(!served.is_finished());
    served.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_connections_are_served_for_the_drain_delay_then_refused_and_the_drain_ends() {
    let s = setup(19).await;
    let wp = s.waypoint();
    let lifecycle = synced();
    let listen = SocketAddr::new(ip(19, 201), 15008);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    const DELAY: Duration = Duration::from_millis(500);
    let served = tokio::spawn(waypoint::server::serve(
        wp.clone(),
        lifecycle.clone(),
        ServeConfig {
            listen,
            cert_wait: Duration::from_secs(2),
            drain_deadline: Duration::from_secs(5),
            drain_delay: DELAY,
            data_plane: Default::default(),
        },
        async {
            let _ = stopped.await;
        },
    ));
    wait_for(|| lifecycle.ready()).await;
    stop.send(()).unwrap();
    wait_for(|| !lifecycle.ready()).await;
    // Within the delay (the drain proper, which refuses, has not started): served.
    assert!(!wp.shutdown.is_cancelled(), "the delay is still running");
    let (code, body, _) = s.get_via(listen, ip(19, 101), "/in-delay").await;
    assert_eq!((code, body.as_str()), (200, "v1 /in-delay"));
    // After it: refused.
    wait_for(|| wp.shutdown.is_cancelled()).await;
    let mut refused = false;
    for _ in 0..50 {
        if tokio::net::TcpStream::connect(listen).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(refused, "new connections refused once the delay is over");
    assert_eq!(served.await.unwrap().unwrap(), Stopped::Drained);
}

// One thread: the connection below is queued, and the waypoint told to stop, before the
// waypoint's accept loop runs again.
#[tokio::test(flavor = "current_thread")]
async fn a_connection_queued_but_not_accepted_when_the_drain_starts_is_not_reset() {
    use tokio::io::AsyncReadExt;
    let s = setup(20).await;
    // On data threads, as in production.
    let plane = DataPlane::start("test-waypoint-data", 2).unwrap();
    let wp = s.waypoint_on(&plane);
    let lifecycle = synced();
    let listen = SocketAddr::new(ip(20, 201), 15008);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(waypoint::server::serve(
        wp.clone(),
        lifecycle.clone(),
        ServeConfig {
            listen,
            cert_wait: Duration::from_secs(2),
            drain_deadline: Duration::from_millis(500),
            drain_delay: Duration::ZERO,
            data_plane: plane,
        },
        async {
            let _ = stopped.await;
        },
    ));
    wait_for(|| lifecycle.ready()).await;
    let mut listening = false;
    for _ in 0..50 {
        if let Ok(probe) = tokio::net::TcpStream::connect(listen).await {
            drop(probe);
            listening = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(listening);
    // Let the waypoint take that probe, so the queue holds only the next connection.
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The kernel completes the handshake (blocking: the waypoint's task does not run).
    let queued = std::net::TcpStream::connect(listen).unwrap();
    stop.send(()).unwrap();
    // Served like any connection taken before the drain: open (it waits for a TLS
    // handshake that never comes) until the deadline, not reset with the listener.
    let r = served.await.unwrap().unwrap();
    assert!(
        matches!(r, Stopped::DeadlineExceeded { open } if open >= 1),
        "{r:?}"
    );
    queued.set_nonblocking(true).unwrap();
    let mut queued = tokio::net::TcpStream::from_std(queued).unwrap();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_millis(200), queued.read(&mut buf)).await;
    assert!(
        !matches!(&read, Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "{read:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drain_deadline_bounds_the_exit() {
    let s = setup(12).await;
    // On data threads, as in production.
    let plane = DataPlane::start("test-waypoint-data", 2).unwrap();
    let wp = s.waypoint_on(&plane);
    let lifecycle = synced();
    let listen = SocketAddr::new(ip(12, 201), 15008);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(waypoint::server::serve(
        wp,
        lifecycle.clone(),
        ServeConfig {
            listen,
            cert_wait: Duration::from_secs(2),
            drain_deadline: Duration::from_millis(500),
            drain_delay: Duration::ZERO,
            data_plane: plane,
        },
        async {
            let _ = stopped.await;
        },
    ));
    wait_for(|| lifecycle.ready()).await;
    // A TCP tunnel that stays open (nothing to tell it to close).
    let mut tcp = None;
    for _ in 0..50 {
        if let Ok(e) = s.connect_via(listen, ip(12, 104)).await {
            tcp = Some(e.tunnel);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _tcp = tcp.expect("a TCP tunnel");
    let start = std::time::Instant::now();
    stop.send(()).unwrap();
    let r = served.await.unwrap().unwrap();
    assert!(
        matches!(r, Stopped::DeadlineExceeded { open } if open >= 1),
        "{r:?}"
    );
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_secs(2),
        "{took:?}"
    );
}

/// An OTLP/gRPC trace receiver: the collector's service as the OpenTelemetry project
/// generates it from its protos, keeping every span it is sent.
#[derive(Default, Clone)]
struct Receiver(Arc<std::sync::Mutex<Vec<opentelemetry_proto::tonic::trace::v1::Span>>>);

#[tonic::async_trait]
impl opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceService
    for Receiver
{
    async fn export(
        &self,
        req: tonic::Request<
            opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest,
        >,
    ) -> Result<
        tonic::Response<
            opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse,
        >,
        tonic::Status,
    > {
        for rs in req.into_inner().resource_spans {
            let service = rs
                .resource
                .as_ref()
                .and_then(|r| r.attributes.iter().find(|a| a.key == "service.name"))
                .cloned();
            assert!(service.is_some(), "spans name their service");
            for ss in rs.scope_spans {
                self.0.lock().unwrap().extend(ss.spans);
            }
        }
        Ok(tonic::Response::new(Default::default()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traces_go_to_an_otlp_collector_with_a_client_span_per_attempt() {
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceServiceServer;
    let receiver = Receiver::default();
    let listener = tokio::net::TcpListener::bind((ip(9, 250), 4317))
        .await
        .unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(receiver.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let s = setup_traced(
        9,
        mesh_trace::Tracer::otlp(
            endpoint,
            mesh_trace::Origin {
                service: "waypoint.shop".into(),
                scope: "mesh-waypoint",
            },
        ),
    )
    .await;
    s.route(r#"{"parentRefs":[{"kind":"Service","name":"api"}],"rules":[
        {"matches":[{"path":{"type":"Exact","value":"/fail-twice"}}],"backendRefs":[{"name":"api-v1","port":80}],
         "retry":{"codes":[503],"attempts":3,"backoff":"10ms"}}
    ]}"#);
    // The caller's trace context, as a traced client (or ztunnel's propagation) sends it.
    let trace_id = "0af7651916cd43dd8448eb211c80319c";
    let caller_span = "b7ad6b7169203331";
    let io = hyper_util::rt::TokioIo::new(s.tunnel(ip(9, 100)).await);
    let (mut c, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
    tokio::spawn(conn);
    let resp = c
        .send_request(
            http::Request::get("/fail-twice")
                .header("host", "api.shop.svc.cluster.local")
                .header("traceparent", format!("00-{trace_id}-{caller_span}-01"))
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "two failures retried");

    // One server span and three client spans (503, 503, 200) arrive at the collector.
    // Polled for up to 30 s: the exporter connects on its first batch.
    for _ in 0..300 {
        if receiver.0.lock().unwrap().len() >= 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let spans = receiver.0.lock().unwrap().clone();
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    assert!(
        spans.iter().all(|s| hex(&s.trace_id) == trace_id),
        "one trace"
    );
    let server: Vec<_> = spans.iter().filter(|s| s.kind == 2).collect();
    assert_eq!(server.len(), 1, "{spans:?}");
    assert_eq!(
        hex(&server[0].parent_span_id),
        caller_span,
        "continues the caller's span"
    );
    assert_eq!(server[0].name, "api.shop.svc.cluster.local:80/*");
    let clients: Vec<_> = spans.iter().filter(|s| s.kind == 3).collect();
    assert_eq!(clients.len(), 3, "a client span per attempt: {spans:?}");
    let status = |s: &opentelemetry_proto::tonic::trace::v1::Span| {
        s.attributes
            .iter()
            .find(|a| a.key == "http.response.status_code")
            .and_then(|a| a.value.as_ref()?.value.clone())
    };
    let mut codes: Vec<String> = clients.iter().map(|s| format!("{:?}", status(s))).collect();
    codes.sort();
    assert_eq!(
        codes,
        [
            "Some(IntValue(200))",
            "Some(IntValue(503))",
            "Some(IntValue(503))"
        ]
    );
    for c in &clients {
        assert_eq!(
            c.parent_span_id, server[0].span_id,
            "attempts are the server span's children"
        );
        assert!(c.start_time_unix_nano >= server[0].start_time_unix_nano);
        assert!(c.end_time_unix_nano <= server[0].end_time_unix_nano);
    }
}

/// What a source ztunnel does: a local TCP client's connection copied over HBONE to the
/// waypoint for `vip` with `copy_with_tcp`. Returns the client socket and the copy.
async fn source_ztunnel_copy(
    s: &Setup,
    vip: IpAddr,
) -> (
    tokio::net::TcpStream,
    tokio::task::JoinHandle<Result<hbone::CopyStats, hbone::tunnel::CopyError>>,
) {
    let front = tokio::net::TcpListener::bind(SocketAddr::new(ip(15, 50), 0))
        .await
        .unwrap();
    let front_addr = front.local_addr().unwrap();
    let tunnel = s.tunnel(vip).await;
    let copy = tokio::spawn(async move {
        let (downstream, _) = front.accept().await.unwrap();
        tunnel.copy_with_tcp(&downstream).await
    });
    (
        tokio::net::TcpStream::connect(front_addr).await.unwrap(),
        copy,
    )
}

/// The source's view of a request through the waypoint that closes the connection after
/// answering (HTTP path: the waypoint ends its stream and drops it, so h2 resets it with
/// NO_ERROR before the client has closed; TCP path: plain half-closes). Either way the
/// copy ends cleanly with every byte counted. The client's EOF proves the waypoint's
/// END_STREAM arrived: a stream reset before it reaches the client as a TCP reset, and
/// the copy then fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_copy_through_the_waypoint_ends_cleanly_with_its_bytes() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = setup(15).await;
    for (vip, kind) in [(ip(15, 100), "http"), (ip(15, 104), "tcp")] {
        let (mut c, copy) = source_ztunnel_copy(&s, vip).await;
        let request =
            b"GET /x HTTP/1.1\r\nhost: api.shop.svc.cluster.local\r\nconnection: close\r\n\r\n";
        c.write_all(request).await.unwrap();
        let mut response = Vec::new();
        c.read_to_end(&mut response).await.unwrap();
        let text = String::from_utf8_lossy(&response);
        assert!(text.starts_with("HTTP/1.1 200"), "{kind}: {text}");
        // One more request on the same HBONE connection: frames arrive in order, so the
        // waypoint's end of the first stream has reached the source before it closes.
        let (code, _, _) = s.get(vip, "/barrier").await;
        assert_eq!(code, 200);
        assert_eq!(s.client.connections(), 1, "{kind}: one HBONE connection");
        drop(c);
        let stats = copy
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("{kind}: the request succeeded, yet: {e} ({:?})", e.stats));
        assert_eq!(
            stats,
            hbone::CopyStats {
                sent: request.len() as u64,
                received: response.len() as u64,
            },
            "{kind}"
        );
    }
}

/// One HTTP/1.1 GET through the waypoint carrying `headers`: (status, body).
async fn get_with(s: &Setup, vip: IpAddr, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let io = hyper_util::rt::TokioIo::new(s.tunnel(vip).await);
    let (mut c, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
    tokio::spawn(conn);
    let mut req = http::Request::get(path).header("host", "api.shop.svc.cluster.local");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = c
        .send_request(req.body(Full::new(Bytes::new())).unwrap())
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

// Policy sees the request as the client sent it: it runs before routing and filters, as
// Istio's RBAC filter runs before the router (a rewrite cannot dodge a DENY).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_sees_the_path_before_a_url_rewrite() {
    let s = setup(201).await;
    s.route(
        r#"{"parentRefs":[{"kind":"Service","name":"api"}],"rules":[
        {"matches":[{"path":{"type":"PathPrefix","value":"/old"}}],"backendRefs":[{"name":"api-v1","port":80}],
         "filters":[{"type":"URLRewrite","urlRewrite":{"path":{"type":"ReplacePrefixMatch","replacePrefixMatch":"/new"}}}]},
        {"backendRefs":[{"name":"api-v1","port":80}]}
    ]}"#,
    );
    s.policy(
        "no-old",
        r#"{"action":"DENY","rules":[{"to":[{"operation":{"paths":["/old"]}}]}]}"#,
    );
    let (code, body) = get_with(&s, ip(201, 100), "/old", &[]).await;
    assert_eq!(
        (code, body.as_str()),
        (403, "RBAC: access denied by shop/no-old\n"),
        "denied on the path the client sent, not the rewritten /new"
    );
    // The rewrite itself applies to what policy lets through.
    let (code, body) = get_with(&s, ip(201, 100), "/old/x", &[]).await;
    assert_eq!((code, body.as_str()), (200, "v1 /new/x"));
    let (code, body) = get_with(&s, ip(201, 100), "/new", &[]).await;
    assert_eq!((code, body.as_str()), (200, "v1 /new"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_does_not_see_headers_added_by_the_route() {
    let s = setup(202).await;
    s.route(
        r#"{"parentRefs":[{"kind":"Service","name":"api"}],"rules":[
        {"backendRefs":[{"name":"api-v1","port":80}],
         "filters":[{"type":"RequestHeaderModifier","requestHeaderModifier":{"set":[{"name":"x-added","value":"yes"}]}}]}
    ]}"#,
    );
    s.policy(
        "no-added",
        r#"{"action":"DENY","rules":[{"when":[{"key":"request.headers[x-added]","values":["yes"]}]}]}"#,
    );
    let (code, body) = get_with(&s, ip(202, 100), "/echo-headers", &[]).await;
    assert_eq!(code, 200, "{body}");
    assert!(
        body.contains("\"x-added\": \"yes\""),
        "the filter ran, after policy: {body}"
    );
    // The same header sent by the client is denied: the policy itself does fire.
    let (code, body) = get_with(&s, ip(202, 100), "/echo-headers", &[("x-added", "yes")]).await;
    assert_eq!(
        (code, body.as_str()),
        (403, "RBAC: access denied by shop/no-added\n")
    );
}

// A panic while an update was applied: the half-applied edit is never served, and neither
// is anything else (new CONNECTs refused, requests on open connections answered 503).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_while_applying_config_fails_the_data_path_closed() {
    let s = setup(203).await;
    let io = hyper_util::rt::TokioIo::new(s.tunnel(ip(203, 100)).await);
    let (mut open, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
    tokio::spawn(conn);
    let get = |path: &str| {
        http::Request::get(path)
            .header("host", "api.shop.svc.cluster.local")
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    assert_eq!(open.send_request(get("/a")).await.unwrap().status(), 200);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut w = s.config.write().unwrap();
        w.policies.clear();
        panic!("bug while applying");
    }));
    assert!(r.is_err());
    let resp = open.send_request(get("/b")).await.unwrap();
    assert_eq!(resp.status(), 503);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(
        String::from_utf8_lossy(&body).contains("failed closed"),
        "{body:?}"
    );
    let refused = s.connect_via(s.waypoint_addr, ip(203, 100)).await;
    assert!(refused.is_err(), "a new CONNECT is refused");
}
