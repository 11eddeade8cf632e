//! The waypoint attacked: a holder of a valid mesh certificate with a raw HBONE (HTTP/2
//! CONNECT) client, and attacker pods in the lab, trying to get around it:
//!
//! - a DENYed path written differently (percent-encodings, dot segments, slashes,
//!   backslashes, hex case, invalid encodings);
//! - a denied host written differently, and absolute-form request targets whose
//!   authority differs from `Host`;
//! - TCP and HTTP through the same waypoint against a DENY on its Gateway;
//! - relaying through the waypoint to a Service of another namespace, and to pod IPs.
//!
//! In process (the waypoint's own accept path, real HBONE and mTLS on loopback
//! addresses) where the lab is not needed; on the lab (client pod → ztunnel → waypoint →
//! ztunnel → app) where it is.

use bytes::Bytes;
use hbone::{Authority, ConnectHandler, InboundConnect, Refusal, Responder};
use http_body_util::Full;
use mesh_discovery::State;
use mesh_e2e::cluster::wait_until;
use mesh_e2e::manifests::{
    BACK_AMBIENT, BACK_API_POD_WITH_TCP_ECHO, BACK_USES_WAYPOINT, FRONT_AMBIENT, WAYPOINT_GATEWAY,
    back_api, http_app, join,
};
use mesh_e2e::testlab::TestLab;
use mesh_identity::ca::CertificateAuthority;
use mesh_identity::{SpiffeId, WorkloadCertificate, generate_csr};
use mesh_proto::workload as pb;
use mesh_xds::certs::{CertManager, CertSource};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use waypoint::authz::Policy;
use waypoint::normalize::PathNormalization;
use waypoint::proxy::{Config, ConfigStore, Target, Waypoint};
use waypoint::server::{Lifecycle, ServeConfig};

const DAY: Duration = Duration::from_secs(86400);

fn ip(t: u8, n: u8) -> IpAddr {
    IpAddr::from([127, 13, t, n])
}

fn cert(ca: &CertificateAuthority, ns: &str, sa: &str) -> WorkloadCertificate {
    let id = SpiffeId::new("cluster.local", ns, sa).unwrap();
    let csr = generate_csr(&id).unwrap();
    let chain = ca.sign_csr(&csr.csr_pem, &id, DAY).unwrap();
    WorkloadCertificate::from_ca_response(&id, &csr.key, &chain).unwrap()
}

/// What a backend app was asked: (path, Host).
type Seen = Arc<Mutex<Vec<(String, String)>>>;

/// An app on `addr` answering `<name> path=<path> host=<Host>`, remembering each request.
async fn app(addr: SocketAddr, name: &'static str, seen: Seen) {
    let l = tokio::net::TcpListener::bind(addr).await.unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let seen = seen.clone();
                        async move {
                            let path = req.uri().path().to_string();
                            let host = req
                                .headers()
                                .get("host")
                                .and_then(|h| h.to_str().ok())
                                .unwrap_or_default()
                                .to_string();
                            seen.lock().unwrap().push((path.clone(), host.clone()));
                            Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                                Bytes::from(format!("{name} path={path} host={host}")),
                            )))
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

/// A TCP echo server on `addr` that counts its connections.
async fn echo(addr: SocketAddr, conns: Arc<Mutex<usize>>) {
    let l = tokio::net::TcpListener::bind(addr).await.unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = l.accept().await {
            *conns.lock().unwrap() += 1;
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while let Ok(n) = tcp.read(&mut buf).await {
                    if n == 0 || tcp.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
}

/// A ztunnel stand-in: HBONE on `ip:15008`, connects the CONNECT's authority, and
/// remembers which identities it served (what a relay would launder).
struct Ztunnel {
    peers: Arc<Mutex<Vec<String>>>,
}

impl ConnectHandler for Ztunnel {
    async fn handle(&self, req: InboundConnect, respond: Responder) {
        let Authority::Addr(a) = req.request.authority else {
            return respond.refuse(&Refusal::BadRequest("host".into()));
        };
        let Ok(app) = tokio::net::TcpStream::connect(a).await else {
            return respond.refuse(&Refusal::Unavailable("app down".into()));
        };
        self.peers
            .lock()
            .unwrap()
            .push(req.peer_identity.to_string());
        if let Ok(t) = respond.accept(Default::default()) {
            let _ = t.copy_with_tcp(&app).await;
        }
    }
}

async fn hbone_server(addr: SocketAddr, tls: Arc<rustls::ServerConfig>, h: Arc<Ztunnel>) {
    let l = tokio::net::TcpListener::bind(addr).await.unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
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

fn to_waypoint() -> pb::GatewayAddress {
    pb::GatewayAddress {
        destination: Some(pb::gateway_address::Destination::Hostname(
            pb::NamespacedHostname {
                namespace: "back".into(),
                hostname: "waypoint.back.svc.cluster.local".into(),
            },
        )),
        hbone_mtls_port: 15008,
    }
}

fn service(
    ns: &str,
    name: &str,
    vip: IpAddr,
    ports: &[(u16, u16, pb::AppProtocol)],
    waypoint: bool,
) -> pb::Address {
    pb::Address {
        r#type: Some(pb::address::Type::Service(pb::Service {
            name: name.into(),
            namespace: ns.into(),
            hostname: format!("{name}.{ns}.svc.cluster.local"),
            addresses: vec![pb::NetworkAddress {
                network: String::new(),
                address: mesh_authz::ip_bytes(vip),
                length: None,
            }],
            ports: ports
                .iter()
                .map(|(sp, tp, proto)| pb::Port {
                    service_port: u32::from(*sp),
                    target_port: u32::from(*tp),
                    app_protocol: *proto as i32,
                })
                .collect(),
            waypoint: waypoint.then(to_waypoint),
            ..Default::default()
        })),
    }
}

fn pod(
    ns: &str,
    name: &str,
    ip: IpAddr,
    sa: &str,
    services: &[(&str, &[(u16, u16)])],
    waypoint: bool,
) -> pb::Address {
    pb::Address {
        r#type: Some(pb::address::Type::Workload(pb::Workload {
            uid: format!("c//Pod/{ns}/{name}"),
            name: name.into(),
            namespace: ns.into(),
            addresses: vec![mesh_authz::ip_bytes(ip)],
            tunnel_protocol: pb::TunnelProtocol::Hbone as i32,
            service_account: sa.into(),
            waypoint: waypoint.then(to_waypoint),
            services: services
                .iter()
                .map(|(svc, ports)| {
                    (
                        format!("{ns}/{svc}.{ns}.svc.cluster.local"),
                        pb::PortList {
                            ports: ports
                                .iter()
                                .map(|(sp, tp)| pb::Port {
                                    service_port: u32::from(*sp),
                                    target_port: u32::from(*tp),
                                    app_protocol: 0,
                                })
                                .collect(),
                        },
                    )
                })
                .collect(),
            ..Default::default()
        })),
    }
}

/// A small mesh in process: namespace `back` uses waypoint `back/waypoint`:
///
/// - `back/api` (VIP .100): port 80 HTTP → pod `api` (.1) 8080, port 9000 TCP → 9000;
/// - `other/secret` (VIP .101, not bound to the waypoint): port 80 → pod `secret` (.2);
/// - pod `back/bound` (.3), bound to the waypoint itself (workload-addressed traffic);
/// - the waypoint's own Service (VIP .102) and pod (.200), serving on `.200:15008`.
struct Mesh {
    waypoint_addr: SocketAddr,
    waypoint_id: SpiffeId,
    client: hbone::Client,
    attacker: WorkloadCertificate,
    front: WorkloadCertificate,
    config: Arc<ConfigStore>,
    metrics: Arc<waypoint::metrics::Metrics>,
    api_seen: Seen,
    secret_seen: Seen,
    echo_conns: Arc<Mutex<usize>>,
    secret_peers: Arc<Mutex<Vec<String>>>,
    t: u8,
}

async fn mesh(t: u8, normalization: PathNormalization) -> Mesh {
    let ca = CertificateAuthority::new_root("cluster.local", 30 * DAY).unwrap();
    let (api_seen, secret_seen, bound_seen) = (Seen::default(), Seen::default(), Seen::default());
    app(SocketAddr::new(ip(t, 1), 8080), "api", api_seen.clone()).await;
    app(
        SocketAddr::new(ip(t, 2), 8080),
        "secret",
        secret_seen.clone(),
    )
    .await;
    app(SocketAddr::new(ip(t, 3), 8080), "bound", bound_seen).await;
    let echo_conns = Arc::new(Mutex::new(0));
    echo(SocketAddr::new(ip(t, 1), 9000), echo_conns.clone()).await;
    let mut secret_peers = Arc::default();
    for (n, ns, sa) in [
        (1, "back", "api"),
        (2, "other", "secret"),
        (3, "back", "bound"),
    ] {
        let tls = Arc::new(mesh_identity::server_config(&cert(&ca, ns, sa)).unwrap());
        let z = Arc::new(Ztunnel {
            peers: Arc::default(),
        });
        if n == 2 {
            secret_peers = z.peers.clone();
        }
        hbone_server(SocketAddr::new(ip(t, n), 15008), tls, z).await;
    }
    let mut state = State::default();
    for a in [
        service(
            "back",
            "api",
            ip(t, 100),
            &[
                (80, 8080, pb::AppProtocol::Http11),
                (9000, 9000, pb::AppProtocol::Tcp),
            ],
            true,
        ),
        service(
            "other",
            "secret",
            ip(t, 101),
            &[(80, 8080, pb::AppProtocol::Http11)],
            false,
        ),
        service(
            "back",
            "waypoint",
            ip(t, 102),
            &[(15008, 15008, pb::AppProtocol::Unknown)],
            false,
        ),
        pod(
            "back",
            "api",
            ip(t, 1),
            "api",
            &[("api", &[(80, 8080), (9000, 9000)])],
            false,
        ),
        pod(
            "other",
            "secret",
            ip(t, 2),
            "secret",
            &[("secret", &[(80, 8080)])],
            false,
        ),
        pod("back", "bound", ip(t, 3), "bound", &[], true),
        pod(
            "back",
            "waypoint",
            ip(t, 200),
            "waypoint",
            &[("waypoint", &[(15008, 15008)])],
            false,
        ),
    ] {
        state.apply_address(&a).unwrap();
    }
    let config = Arc::new(ConfigStore::new(Config {
        discovery: state,
        ..Default::default()
    }));
    let waypoint_id = SpiffeId::new("cluster.local", "back", "waypoint").unwrap();
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
    // The waypoint's data threads, as in production.
    let plane = mesh_threads::DataPlane::start("test-waypoint-data", 2).unwrap();
    let wp = Arc::new(Waypoint {
        identity: waypoint_id.clone(),
        config: config.clone(),
        certs,
        client: mesh_threads::PerThread::new(&plane, || {
            hbone::Client::new(hbone::TcpDialer, hbone::ClientSettings::default())
        }),
        metrics: metrics.clone(),
        budget: Default::default(),
        balancer: Arc::new(waypoint::balancer::Balancer::new(Default::default())),
        pool: mesh_threads::PerThread::new(&plane, Default::default),
        normalization,
        shutdown: CancellationToken::new(),
        idle_grace: waypoint::in_flight::IDLE_GRACE,
        tracer: mesh_trace::Tracer::disabled(),
        mirrors: Default::default(),
    });
    // The waypoint's real accept path, configuration already synced.
    let lifecycle = Lifecycle::new();
    for ty in [
        mesh_proto::type_url::ADDRESS,
        mesh_proto::type_url::HTTP_ROUTE,
        mesh_proto::type_url::L7_POLICY,
    ] {
        lifecycle.mark_synced(ty);
    }
    let waypoint_addr = SocketAddr::new(ip(t, 200), 15008);
    tokio::spawn(waypoint::server::serve(
        wp,
        lifecycle,
        ServeConfig {
            listen: waypoint_addr,
            cert_wait: Duration::from_secs(5),
            drain_deadline: Duration::from_secs(1),
            drain_delay: Duration::ZERO,
            data_plane: plane,
        },
        std::future::pending(),
    ));
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(waypoint_addr).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Mesh {
        waypoint_addr,
        waypoint_id,
        client: hbone::Client::new(hbone::TcpDialer, hbone::ClientSettings::default()),
        attacker: cert(&ca, "attacker", "evil"),
        front: cert(&ca, "front", "web"),
        config,
        metrics,
        api_seen,
        secret_seen,
        echo_conns,
        secret_peers,
        t,
    }
}

impl Mesh {
    fn vip(&self) -> IpAddr {
        ip(self.t, 100)
    }

    /// A policy in `back` targeting the waypoint's Gateway.
    fn policy(&self, name: &str, json: &str) {
        // As mesh-control reads and sends it.
        let spec: serde_json::Value = serde_json::from_str(json).unwrap();
        let (typed, _) = mesh_authz::k8s::read("back", name, &Default::default(), Some(&spec));
        let (p, errors) = Policy::from_proto(&mesh_proto::waypoint::L7Policy {
            namespace: "back".into(),
            name: name.into(),
            policy: Some(typed),
        });
        assert!(errors.is_empty(), "{errors:?}");
        self.config
            .update(|c| {
                c.policies
                    .insert(format!("back/{name}"), (p, vec![Target::Gateway]))
            })
            .unwrap();
    }

    fn clear_policies(&self) {
        self.config.update(|c| c.policies.clear()).unwrap();
    }

    /// A raw CONNECT to the waypoint as `who`, asking for `authority`.
    async fn connect(
        &self,
        who: &WorkloadCertificate,
        authority: SocketAddr,
    ) -> Result<hbone::Tunnel, hbone::ConnectError> {
        let key = hbone::PoolKey::new(
            who.identity().clone(),
            vec![self.waypoint_id.clone()],
            self.waypoint_addr,
            None,
        );
        self.client
            .connect(&key, who, &hbone::ConnectRequest::new(authority))
            .await
            .map(|e| e.tunnel)
    }

    /// Raw bytes of one HTTP/1.1 request (written as given, nothing normalised on the
    /// way out) through the waypoint to `authority`: (status, body).
    async fn raw(
        &self,
        who: &WorkloadCertificate,
        authority: SocketAddr,
        request: &str,
    ) -> (u16, String) {
        let mut t = self.connect(who, authority).await.unwrap();
        t.write_all(request.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), t.read_to_end(&mut out)).await;
        let out = String::from_utf8_lossy(&out).into_owned();
        let status = out
            .strip_prefix("HTTP/1.1 ")
            .and_then(|r| r.get(..3))
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = out.split("\r\n\r\n").nth(1).unwrap_or_default().to_string();
        (status, body)
    }

    async fn get(&self, who: &WorkloadCertificate, path: &str, host: &str) -> (u16, String) {
        self.raw(
            who,
            SocketAddr::new(self.vip(), 80),
            &format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"),
        )
        .await
    }

    /// One round trip to the api's TCP port (9000) through the waypoint.
    async fn echo_once(&self, who: &WorkloadCertificate) -> Result<(), hbone::ConnectError> {
        let mut t = self.connect(who, SocketAddr::new(self.vip(), 9000)).await?;
        t.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        t.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
        Ok(())
    }

    /// What the api app received, all requests so far.
    fn api_paths(&self) -> Vec<String> {
        self.api_seen
            .lock()
            .unwrap()
            .iter()
            .map(|(p, _)| p.clone())
            .collect()
    }
}

const API: &str = "api.back.svc.cluster.local";

/// Whether a path the app received is the admin resource, however it was written (read
/// the most lenient way a backend might: every encoding decoded, slashes merged).
fn is_admin(p: &str) -> bool {
    waypoint::normalize::normalize_path(p, PathNormalization::DecodeAndMergeSlashes)
        .map_or(true, |n| n.to_ascii_lowercase().starts_with("/admin"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_encodings_of_a_denied_path_are_denied() {
    let deny = r#"{"action":"DENY","rules":[{"to":[{"operation":{"paths":["/admin*"]}}]}]}"#;
    // BASE (the default): RFC 3986 normalisation.
    let m = mesh(1, PathNormalization::Base).await;
    m.policy("no-admin", deny);
    let (code, _) = m.get(&m.front, "/public", API).await;
    assert_eq!(code, 200, "positive control");
    for path in [
        "/admin",
        "/admin/users",
        "/%61dmin",
        "/%61%64%6d%69%6e",
        "/%61%64%6D%69%6E",
        "/ad%6din/users",
        "/ad%6Din/users",
        "/./admin",
        "/x/../admin",
        "/x/y/../../admin/users",
        "/../admin",
        "/%2e/admin",
        "/x/%2E%2E/admin",
        "/x/.%2e/admin",
        "/admin%2fusers",
        "/admin%2Fusers",
        "\\admin",
        "/x\\..\\admin",
        "/admin/./users",
    ] {
        let (code, body) = m.get(&m.front, path, API).await;
        assert!(
            code == 403 || code == 400,
            "{path} was not denied: {code} {body}"
        );
    }
    // Paths that cannot be normalised are refused, not passed on.
    for path in ["/adm%zzin", "/admin%", "/%00admin", "/x%2"] {
        let (code, body) = m.get(&m.front, path, API).await;
        assert_eq!(code, 400, "{path}: {body}");
    }
    // A method the policy would see differently from the backend.
    let (code, _) = m
        .raw(
            &m.front,
            SocketAddr::new(m.vip(), 80),
            &format!("get /public HTTP/1.1\r\nHost: {API}\r\nConnection: close\r\n\r\n"),
        )
        .await;
    assert_eq!(code, 400, "lower-case methods are refused");
    // The backend receives the path policy saw, decoded once only.
    let (code, body) = m.get(&m.front, "/x/../public/%7e%61", API).await;
    assert_eq!(
        (code, body.as_str()),
        (200, format!("api path=/public/~a host={API}").as_str())
    );
    let (code, body) = m.get(&m.front, "/%2561dmin", API).await;
    assert_eq!(
        (code, body.as_str()),
        (200, format!("api path=/%2561dmin host={API}").as_str()),
        "%25 is not decoded, and what it encodes is not decoded again"
    );
    // `//admin` is another resource under BASE (as in Istio); MERGE_SLASHES makes it
    // /admin, and DECODE_AND_MERGE_SLASHES also decodes %2F and %5C first.
    let merge = mesh(2, PathNormalization::MergeSlashes).await;
    merge.policy("no-admin", deny);
    for path in ["//admin", "///admin//users", "/x/..//admin", "/.//admin"] {
        let (code, body) = merge.get(&merge.front, path, API).await;
        assert_eq!(code, 403, "MERGE_SLASHES {path}: {body}");
    }
    let decode = mesh(3, PathNormalization::DecodeAndMergeSlashes).await;
    decode.policy("no-admin", deny);
    for path in [
        "/%2fadmin",
        "/%2F%2Fadmin",
        "/x%2f..%2fadmin",
        "/%5cadmin",
        "//admin",
    ] {
        let (code, body) = decode.get(&decode.front, path, API).await;
        assert_eq!(code, 403, "DECODE_AND_MERGE_SLASHES {path}: {body}");
    }
    for m in [&m, &merge, &decode] {
        let paths = m.api_paths();
        assert!(
            !paths.iter().any(|p| is_admin(p)),
            "an admin path reached the app: {paths:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_variants_and_absolute_form_targets_cannot_bypass_a_host_policy() {
    let m = mesh(4, PathNormalization::Base).await;
    m.policy(
        "no-admin-host",
        r#"{"action":"DENY","rules":[{"to":[{"operation":{"hosts":["admin.back.svc.cluster.local"]}}]}]}"#,
    );
    let vip = SocketAddr::new(m.vip(), 80);
    let req = |target: &str, hosts: &[&str]| {
        let mut r = format!("GET {target} HTTP/1.1\r\n");
        for h in hosts {
            r.push_str(&format!("Host: {h}\r\n"));
        }
        r.push_str("Connection: close\r\n\r\n");
        r
    };
    let (code, body) = m.raw(&m.front, vip, &req("/x", &[API])).await;
    assert_eq!(
        (code, body.as_str()),
        (200, format!("api path=/x host={API}").as_str())
    );
    for host in [
        "admin.back.svc.cluster.local",
        "ADMIN.back.svc.cluster.local",
        "admin.back.svc.cluster.local.",
        "admin.back.svc.cluster.local:80",
        "Admin.Back.svc.cluster.local.:8080",
    ] {
        let (code, body) = m.raw(&m.front, vip, &req("/x", &[host])).await;
        assert_eq!(code, 403, "Host {host}: {body}");
    }
    // Absolute-form: the request is about the target's authority (RFC 9112 3.2.2), and
    // the backend gets that same authority as Host, whatever Host said.
    let (code, body) = m
        .raw(
            &m.front,
            vip,
            &req("http://admin.back.svc.cluster.local/x", &[API]),
        )
        .await;
    assert_eq!(code, 403, "{body}");
    let (code, body) = m
        .raw(
            &m.front,
            vip,
            &req(
                &format!("http://{API}/x"),
                &["admin.back.svc.cluster.local"],
            ),
        )
        .await;
    assert_eq!(
        (code, body.as_str()),
        (200, format!("api path=/x host={API}").as_str())
    );
    // Two Host headers: which one would the backend use? Neither: 400.
    let (code, _) = m
        .raw(
            &m.front,
            vip,
            &req("/x", &[API, "admin.back.svc.cluster.local"]),
        )
        .await;
    assert_eq!(code, 400);
    // HTTP/2: `:authority` is the request's authority; a `host` header beside it that
    // says otherwise changes nothing.
    for (authority, host, want) in [
        (API, "admin.back.svc.cluster.local", 200),
        ("admin.back.svc.cluster.local", API, 403),
        ("admin.back.svc.cluster.local.", API, 403),
    ] {
        let io = hyper_util::rt::TokioIo::new(m.connect(&m.front, vip).await.unwrap());
        let (mut h2, c) =
            hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
                .await
                .unwrap();
        tokio::spawn(c);
        let resp = h2
            .send_request(
                http::Request::get(format!("http://{authority}/h2"))
                    .header("host", host)
                    .body(Full::new(Bytes::new()))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(
            resp.status().as_u16(),
            want,
            ":authority {authority}, host {host}"
        );
    }
    let seen = m.api_seen.lock().unwrap().clone();
    assert!(
        seen.iter().all(|(_, h)| h == API),
        "the app only ever saw the host policy allowed: {seen:?}"
    );
}

/// A TCP connection from `who` refused by the waypoint's policy (not an upstream
/// failure), with the echo app's own count of connections unchanged.
async fn denied(m: &Mesh, who: &WorkloadCertificate, what: &str) {
    let before = *m.echo_conns.lock().unwrap();
    let r = m.echo_once(who).await;
    assert!(
        matches!(
            r,
            Err(hbone::ConnectError::Refused(hbone::Refused::Unauthorized))
        ),
        "{what}: {r:?}"
    );
    assert_eq!(
        *m.echo_conns.lock().unwrap(),
        before,
        "{what}: nothing reached the app"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_and_http_through_the_same_waypoint_meet_a_gateway_deny() {
    let m = mesh(5, PathNormalization::Base).await;
    let echo_once = |who| m.echo_once(who);
    // No policy: both go through, and the waypoint counts the TCP connection.
    echo_once(&m.attacker).await.unwrap();
    m.policy(
        "no-attacker",
        r#"{"action":"DENY","rules":[{"from":[{"source":{"namespaces":["attacker"]}}]}]}"#,
    );
    let (code, body) = m.get(&m.attacker, "/x", API).await;
    assert_eq!(
        (code, body.as_str()),
        (403, "RBAC: access denied by back/no-attacker\n")
    );
    let before = *m.echo_conns.lock().unwrap();
    let r = echo_once(&m.attacker).await;
    assert!(
        matches!(
            r,
            Err(hbone::ConnectError::Refused(hbone::Refused::Unauthorized))
        ),
        "TCP from the denied namespace: {r:?}"
    );
    assert_eq!(
        *m.echo_conns.lock().unwrap(),
        before,
        "nothing reached the app"
    );
    // Others still pass, over TCP and HTTP.
    echo_once(&m.front).await.unwrap();
    assert_eq!(m.get(&m.front, "/x", API).await.0, 200);
    // Counted with reporter="waypoint" and Istio's labels.
    let metrics = m.metrics.encode();
    let series = |name: &str, needle: &str| {
        metrics
            .lines()
            .any(|l| l.starts_with(&format!("{name}{{reporter=\"waypoint\"")) && l.contains(needle))
    };
    for name in [
        "istio_tcp_connections_opened_total",
        "istio_tcp_connections_closed_total",
        "istio_tcp_sent_bytes_total",
        "istio_tcp_received_bytes_total",
    ] {
        assert!(
            series(
                name,
                "source_principal=\"spiffe://cluster.local/ns/front/sa/web\""
            ),
            "{name}:\n{metrics}"
        );
    }
    assert!(
        series(
            "istio_tcp_connections_closed_total",
            "response_flags=\"DENY\""
        ) && series(
            "istio_tcp_connections_closed_total",
            "source_principal=\"spiffe://cluster.local/ns/attacker/sa/evil\""
        ),
        "{metrics}"
    );
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("istio_tcp_received_bytes_total{")
                && l.contains("destination_service=\"api.back.svc.cluster.local\"")
                && l.contains("request_protocol=\"tcp\"")
                && l.ends_with(" 4")),
        "4 bytes received from front:\n{metrics}"
    );

    // L7-only fields at L4: a DENY on paths denies every TCP connection (what can be
    // checked matches); an ALLOW on methods allows none.
    m.clear_policies();
    m.policy(
        "no-admin",
        r#"{"action":"DENY","rules":[{"to":[{"operation":{"paths":["/admin*"]}}]}]}"#,
    );
    assert_eq!(
        m.get(&m.front, "/x", API).await.0,
        200,
        "HTTP: only /admin is denied"
    );
    denied(&m, &m.front, "TCP: the DENY applies to every connection").await;
    m.clear_policies();
    m.policy(
        "front-gets",
        r#"{"rules":[{"from":[{"source":{"namespaces":["front"]}}],"to":[{"operation":{"methods":["GET"]}}]}]}"#,
    );
    assert_eq!(
        m.get(&m.front, "/x", API).await.0,
        200,
        "HTTP GET from front is allowed"
    );
    denied(&m, &m.front, "TCP: an ALLOW on methods allows nothing").await;
    m.policy(
        "front-tcp",
        r#"{"rules":[{"from":[{"source":{"namespaces":["front"]}}],"to":[{"operation":{"ports":["9000"]}}]}]}"#,
    );
    echo_once(&m.front).await.unwrap();
    denied(&m, &m.attacker, "TCP from a namespace no ALLOW names").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relays_to_services_and_pods_not_bound_to_the_waypoint_are_refused() {
    let m = mesh(6, PathNormalization::Base).await;
    let t = m.t;
    // Positive control: the attacker's certificate and client work for what the
    // waypoint serves.
    let (code, body) = m.get(&m.attacker, "/x", API).await;
    assert_eq!(
        (code, body.as_str()),
        (200, format!("api path=/x host={API}").as_str())
    );
    for (what, authority) in [
        (
            "a Service of another namespace",
            SocketAddr::new(ip(t, 101), 80),
        ),
        ("that Service's pod", SocketAddr::new(ip(t, 2), 8080)),
        (
            "a bound Service's pod, directly",
            SocketAddr::new(ip(t, 1), 8080),
        ),
        (
            "the waypoint's own Service",
            SocketAddr::new(ip(t, 102), 15008),
        ),
        ("the waypoint's own pod", SocketAddr::new(ip(t, 200), 15008)),
        (
            "a bound Service, on a port it does not have",
            SocketAddr::new(ip(t, 100), 81),
        ),
        ("an address nothing has", SocketAddr::new(ip(t, 99), 80)),
    ] {
        let r = m.connect(&m.attacker, authority).await;
        assert!(
            matches!(
                r,
                Err(hbone::ConnectError::Refused(hbone::Refused::Unauthorized))
            ),
            "{what} ({authority}): {:?}",
            r.map(|_| "relayed")
        );
    }
    assert!(
        m.secret_seen.lock().unwrap().is_empty(),
        "the secret app saw nothing"
    );
    assert!(
        m.secret_peers.lock().unwrap().is_empty(),
        "nothing reached the secret pod under the waypoint's identity"
    );
    // A workload bound to the waypoint itself is served.
    let mut tunnel = m
        .connect(&m.attacker, SocketAddr::new(ip(t, 3), 8080))
        .await
        .expect("a workload that uses the waypoint");
    tunnel
        .write_all(b"GET /w HTTP/1.1\r\nHost: bound\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    tunnel.read_to_end(&mut out).await.unwrap();
    assert!(String::from_utf8_lossy(&out).contains("bound path=/w"));
}

// ---- on the lab ----

/// A lab of two nodes for these tests.
fn lab_up() -> TestLab {
    TestLab::up_named("adv", 2, &["curl"])
}

/// Dials from inside a pod's network namespace (an attacker pod outside the mesh,
/// whose traffic no ztunnel captures).
struct NetnsDialer(String);

impl hbone::Dialer for NetnsDialer {
    async fn dial(
        &self,
        dst: SocketAddr,
        _src: Option<IpAddr>,
    ) -> std::io::Result<tokio::net::TcpStream> {
        let path = self.0.clone();
        let s = tokio::task::spawn_blocking(move || {
            let ns = ztunnel::netns::Netns::open(&path)?;
            ns.run(|| std::net::TcpStream::connect_timeout(&dst, Duration::from_secs(5)))?
        })
        .await
        .map_err(std::io::Error::other)??;
        s.set_nonblocking(true)?;
        tokio::net::TcpStream::from_std(s)
    }
}

/// Namespaces `front`, `attacker` and `back` in the mesh; back/api serving HTTP and
/// TCP echo on 10.96.0.20; front/client and attacker/evil on node-1.
fn lab_app() -> String {
    join(&[
        FRONT_AMBIENT,
        "apiVersion: v1
kind: Namespace
metadata: {name: attacker, labels: {istio.io/dataplane-mode: ambient}}
",
        BACK_AMBIENT,
        BACK_API_POD_WITH_TCP_ECHO,
        r#"apiVersion: v1
kind: Service
metadata: {name: api, namespace: back}
spec:
  selector: {app: api}
  clusterIP: 10.96.0.20
  ports: [{name: http, port: 80, targetPort: http}, {name: tcp-echo, port: 9000, targetPort: 9000}]
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: front}
spec: {nodeName: node-1, serviceAccountName: web, containers: [{name: client}]}
---
apiVersion: v1
kind: Pod
metadata: {name: evil, namespace: attacker}
spec: {nodeName: node-1, serviceAccountName: evil, containers: [{name: evil}]}
"#,
    ])
}

/// The waypoint for `back`, with three DENY policies on its Gateway: `/admin*` and host
/// `admin.back...` on port 80, and everything from namespace `attacker`.
fn lab_waypoint() -> String {
    join(&[
        WAYPOINT_GATEWAY,
        BACK_USES_WAYPOINT,
        r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-admin, namespace: back}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  action: DENY
  rules: [{to: [{operation: {paths: ["/admin*"], ports: ["80"]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-admin-host, namespace: back}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  action: DENY
  rules: [{to: [{operation: {hosts: ["admin.back.svc.cluster.local"], ports: ["80"]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-attacker, namespace: back}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  action: DENY
  rules: [{from: [{source: {namespaces: [attacker]}}]}]
"#,
    ])
}

#[test]
fn lab_attacker_pods_cannot_get_past_the_waypoint() {
    let mut t = lab_up();
    t.apply(&lab_app());
    wait_until("mTLS", || {
        t.curl_response("front/client", &["http://10.96.0.20/"]).0 == 200
            && t.tcp("front/client", "10.96.0.20:9000", "x")
                .is_ok_and(|s| s == "x")
    });
    t.apply(&lab_waypoint());
    wait_until("the waypoint in the path", || {
        t.curl_response("front/client", &["http://10.96.0.20/admin"])
            .0
            == 403
    });
    let url = |p: &str| format!("http://10.96.0.20{p}");
    // A denied path, written differently.
    for path in [
        "/%61dmin",
        "/%61%64%6D%69%6E",
        "/ad%6din/users",
        "/./admin",
        "/x/../admin",
        "/%2e%2e/admin",
        "/x/%2E%2E/admin",
        "/admin%2fusers",
    ] {
        let (code, out) = t.curl_response("front/client", &[&url(path)]);
        assert!(code == 403 || code == 400, "{path}: {out}");
    }
    let (code, out) = t.curl_response("front/client", &[&url("/adm%zzin")]);
    assert_eq!(code, 400, "{out}");
    let (code, out) = t.curl_response("front/client", &[&url("/x/../public")]);
    assert!(
        code == 200 && out.contains(" /public from "),
        "the app sees the normalised path: {out}"
    );
    // A denied host, written differently, or behind an absolute-form target.
    for host in [
        "admin.back.svc.cluster.local.",
        "admin.back.svc.cluster.local:80",
        "ADMIN.back.svc.cluster.local",
    ] {
        let (code, out) =
            t.curl_response("front/client", &["-H", &format!("Host: {host}"), &url("/")]);
        assert_eq!(code, 403, "Host {host}: {out}");
    }
    let (code, out) = t.curl_response(
        "front/client",
        &[
            "--request-target",
            "http://admin.back.svc.cluster.local/",
            "-H",
            "Host: api.back.svc.cluster.local",
            &url("/"),
        ],
    );
    assert_eq!(code, 403, "{out}");
    let (code, out) = t.curl_response(
        "front/client",
        &[
            "--request-target",
            "http://api.back.svc.cluster.local/",
            "-H",
            "Host: admin.back.svc.cluster.local",
            &url("/"),
        ],
    );
    assert!(
        code == 200
            && out
                .to_ascii_lowercase()
                .contains("x-seen-host: api.back.svc.cluster.local\r\n"),
        "the app got the authority the policy saw: {out}"
    );
    // TCP and HTTP from the attacker's namespace, against the same Gateway DENY.
    let (code, out) = t.curl_response("attacker/evil", &[&url("/")]);
    assert!(
        code == 403 && out.contains("RBAC: access denied by back/no-attacker"),
        "{out}"
    );
    let echoed = t.tcp("attacker/evil", "10.96.0.20:9000", "attacker-marker");
    assert!(
        !echoed
            .as_deref()
            .is_ok_and(|s| s.contains("attacker-marker")),
        "TCP from the denied namespace went through: {echoed:?}"
    );
    assert_eq!(
        t.tcp("front/client", "10.96.0.20:9000", "front-marker")
            .unwrap(),
        "front-marker",
        "TCP from front is allowed"
    );
    wait_until("the TCP denial in the waypoint's log", || {
        let log = t.log("pod:back/waypoint");
        log.contains("connection denied by authorization policy")
            && log.contains("policy=back/no-attacker")
            && log.contains("connection complete")
    });
    let metrics = t.waypoint_metrics("back/waypoint");
    assert!(
        metrics.lines().any(|l| l
            .starts_with("istio_tcp_connections_opened_total{reporter=\"waypoint\"")
            && l.contains("source_principal=\"spiffe://cluster.local/ns/front/sa/web\"")),
        "{metrics}"
    );
    assert!(
        metrics.lines().any(|l| l
            .starts_with("istio_tcp_connections_closed_total{reporter=\"waypoint\"")
            && l.contains("response_flags=\"DENY\"")
            && l.contains("source_principal=\"spiffe://cluster.local/ns/attacker/sa/evil\"")),
        "{metrics}"
    );
}

/// back/api behind the waypoint for `back`; other/secret (in the mesh, no waypoint) on
/// 10.96.0.30; outside/attacker, outside the mesh, on node-1.
fn lab_relay() -> String {
    join(&[
        BACK_USES_WAYPOINT,
        "apiVersion: v1
kind: Namespace
metadata: {name: other, labels: {istio.io/dataplane-mode: ambient}}
",
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: outside}\n",
        &back_api(),
        &http_app("other", "secret", "10.96.0.30"),
        "apiVersion: v1
kind: Pod
metadata: {name: attacker, namespace: outside}
spec: {nodeName: node-1, containers: [{name: attacker}]}
",
        WAYPOINT_GATEWAY,
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lab_a_mesh_certificate_does_not_make_the_waypoint_a_relay() {
    let mut t = lab_up();
    t.apply(&lab_relay());
    // The attacker holds a valid mesh certificate (here: signed by the lab's CA, as
    // one stolen from any workload would be) and speaks HBONE to the waypoint's pod
    // directly, from a pod outside the mesh.
    let state = t.lab.dir.join("control");
    let read = |f: &str| std::fs::read_to_string(state.join(f)).unwrap();
    let ca = CertificateAuthority::load(
        "cluster.local",
        &read("ca-cert.pem"),
        &read("ca-key.pem"),
        None,
        &read("root-cert.pem"),
    )
    .unwrap();
    let evil = cert(&ca, "attacker", "evil");
    let client = hbone::Client::new(
        NetnsDialer(t.netns("outside/attacker")),
        hbone::ClientSettings::default(),
    );
    let waypoint_ip: IpAddr = t.lab.state.pods["back/waypoint"].ip.parse().unwrap();
    let key = hbone::PoolKey::new(
        evil.identity().clone(),
        vec![SpiffeId::new("cluster.local", "back", "waypoint").unwrap()],
        SocketAddr::new(waypoint_ip, 15008),
        None,
    );
    let get = |authority: SocketAddr| {
        let (client, key, evil) = (client.clone(), key.clone(), &evil);
        async move {
            let mut tunnel = client
                .connect(&key, evil, &hbone::ConnectRequest::new(authority))
                .await?
                .tunnel;
            tunnel
                .write_all(b"GET /relayed HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .await
                .unwrap();
            let mut out = Vec::new();
            let _ =
                tokio::time::timeout(Duration::from_secs(5), tunnel.read_to_end(&mut out)).await;
            Ok::<_, hbone::ConnectError>(String::from_utf8_lossy(&out).into_owned())
        }
    };
    // Positive control: the certificate and client work for what the waypoint serves.
    let mut served = String::new();
    for _ in 0..100 {
        if let Ok(s) = get("10.96.0.20:80".parse().unwrap()).await
            && s.contains("hello from back/api")
        {
            served = s;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        served.contains("hello from back/api"),
        "the waypoint never served back/api:\n{}",
        t.log("pod:back/waypoint")
    );
    let pods = &t.lab.state.pods;
    let secret_pod = SocketAddr::new(pods["other/secret"].ip.parse().unwrap(), 8080);
    let api_pod = SocketAddr::new(pods["back/api"].ip.parse().unwrap(), 8080);
    for (what, authority) in [
        (
            "a Service in another namespace",
            "10.96.0.30:80".parse().unwrap(),
        ),
        ("a pod in another namespace", secret_pod),
        ("a bound Service's pod, directly", api_pod),
    ] {
        let r = get(authority).await;
        assert!(
            matches!(
                r,
                Err(hbone::ConnectError::Refused(hbone::Refused::Unauthorized))
            ),
            "{what} ({authority}) was relayed: {r:?}"
        );
    }
    wait_until("the refusals in the waypoint's log", || {
        t.log("pod:back/waypoint")
            .matches("CONNECT refused: the target is not bound to this waypoint")
            .count()
            >= 3
    });
}

/// An HTTPRoute for back/api whose rules the mesh cannot apply as written: a filter it
/// does not implement (CORS), and an ExtensionRef to an HTTPFault that does not exist (yet).
const LAB_UNAPPLIABLE_ROUTE: &str = r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: guarded, namespace: back}
spec:
  parentRefs: [{group: "", kind: Service, name: api, port: 80}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /cors}}]
    filters: [{type: CORS, cors: {allowOrigins: ["https://shop.example"]}}]
    backendRefs: [{name: api, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /chaos}}]
    filters: [{type: ExtensionRef, extensionRef: {group: ambient-mesh.dev, kind: HTTPFault, name: teapot}}]
    backendRefs: [{name: api, port: 80}]
  - backendRefs: [{name: api, port: 80}]
"#;

/// Gateway API on the lab (client pod → ztunnel → waypoint → ztunnel → app): a rule whose
/// filter cannot be applied answers 500 and its requests never reach the app; before, the
/// waypoint skipped the filter and routed them as if it were absent. mesh-control reports
/// each with its object and field in `meshctl status` and its log; once the HTTPFault
/// exists, the rule applies it.
#[test]
fn lab_a_route_filter_that_cannot_be_applied_answers_500() {
    let mut t = lab_up();
    t.apply(&lab_app());
    wait_until("mTLS", || {
        t.curl_response("front/client", &["http://10.96.0.20/"]).0 == 200
    });
    t.apply(&join(&[
        WAYPOINT_GATEWAY,
        BACK_USES_WAYPOINT,
        LAB_UNAPPLIABLE_ROUTE,
    ]));
    t.eventually("the route at the waypoint", || {
        t.curl_response("front/client", &["http://10.96.0.20/cors/warmup"])
            .0
            == 500
    });
    for (path, why) in [
        ("/cors/marker-cors", "spec.rules[0].filters[0].type"),
        (
            "/chaos/marker-chaos",
            "HTTPFault back/teapot does not exist",
        ),
    ] {
        let (code, out) = t.curl_response("front/client", &[&format!("http://10.96.0.20{path}")]);
        assert!(code == 500 && out.contains(why), "{path}: {out}");
    }
    let (code, out) = t.curl_response("front/client", &["http://10.96.0.20/fine"]);
    assert_eq!(code, 200, "the route's other rules apply: {out}");
    // The app's own record: it logs every request it serves (positive control first).
    t.wait_log("pod:back/api", "request GET /fine from ");
    let app = t.log("pod:back/api");
    assert!(
        !app.contains("marker-cors") && !app.contains("marker-chaos"),
        "the app never saw them: {app}"
    );
    // The waypoint's own record: answered 500 itself, with no backend chosen.
    let waypoint = t.log("pod:back/waypoint");
    for path in ["/cors/marker-cors", "/chaos/marker-chaos"] {
        let line = waypoint
            .lines()
            .find(|l| l.contains(&format!(" path={path} ")))
            .unwrap_or_else(|| panic!("no access line for {path}: {waypoint}"));
        assert!(
            line.contains("status=500") && line.contains("backend=-"),
            "{path} answered by the waypoint without a backend: {line}"
        );
    }
    for finding in [
        "HTTPRoute back/guarded: spec.rules[0].filters[0].type",
        "HTTPRoute back/guarded: spec.rules[1].filters[0].extensionRef.name",
    ] {
        assert!(
            t.meshctl(&["status"]).contains(finding),
            "{finding} in meshctl status"
        );
        assert!(
            t.log("control").contains(finding),
            "{finding} in the control log"
        );
    }
    t.apply(
        "apiVersion: ambient-mesh.dev/v1alpha1
kind: HTTPFault
metadata: {name: teapot, namespace: back}
spec: {abort: {httpStatus: 418}}
",
    );
    t.eventually("the fault applied", || {
        t.curl_response("front/client", &["http://10.96.0.20/chaos/x"])
            .0
            == 418
    });
}
