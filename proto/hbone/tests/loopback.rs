//! HBONE over real loopback sockets: real TLS, real HTTP/2, real TCP apps behind it.

use hbone::client::{Client, ClientSettings, ConnectError, TcpDialer};
use hbone::protocol::{ConnectRequest, Refusal, Refused};
use hbone::server::{ConnectHandler, InboundConnect, Responder};
use hbone::{H2Settings, PoolKey};
use mesh_identity::{SpiffeId, WorkloadCertificate};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

mod common;
use common::Mesh;

/// Connects each CONNECT to its authority over TCP (as ztunnel's inbound does), refusing
/// a few magic ports so clients can see each refusal.
struct ForwardHandler;

impl ConnectHandler for ForwardHandler {
    async fn handle(&self, req: InboundConnect, respond: Responder) {
        let target = match &req.request.authority {
            hbone::Authority::Addr(a) => *a,
            other => {
                respond.refuse(&Refusal::Unavailable(format!("no such host {other}")));
                return;
            }
        };
        match target.port() {
            1 => return respond.refuse(&Refusal::BadRequest("test".into())),
            2 => return respond.refuse(&Refusal::Unauthorized("test policy".into())),
            3 => return respond.refuse(&Refusal::Unavailable("test".into())),
            _ => {}
        }
        let Ok(app) = TcpStream::connect(target).await else {
            return respond.refuse(&Refusal::Unavailable("app unreachable".into()));
        };
        let Ok(tunnel) = respond.accept(Default::default()) else {
            return;
        };
        let _ = tunnel.copy_with_tcp(&app).await;
    }
}

async fn start_server(cert: &WorkloadCertificate, settings: H2Settings) -> SocketAddr {
    common::start_hbone_server(cert, Arc::new(ForwardHandler), settings).await
}

/// An app that reads to EOF, then answers with the reversed bytes and closes.
async fn start_reverse_app() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                s.read_to_end(&mut buf).await.unwrap();
                buf.reverse();
                s.write_all(&buf).await.unwrap();
                s.shutdown().await.unwrap();
            });
        }
    });
    addr
}

/// An app that echoes until EOF.
async fn start_echo_app() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// An app that counts bytes to EOF and answers with the count (8 bytes, big-endian).
async fn start_sink_app() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 256 * 1024];
                let mut total = 0u64;
                loop {
                    let n = s.read(&mut buf).await.unwrap();
                    if n == 0 {
                        break;
                    }
                    total += n as u64;
                }
                s.write_all(&total.to_be_bytes()).await.unwrap();
            });
        }
    });
    addr
}

fn key(client: &WorkloadCertificate, server: &WorkloadCertificate, dst: SocketAddr) -> PoolKey {
    PoolKey::new(
        client.identity().clone(),
        vec![server.identity().clone()],
        dst,
        None,
    )
}

#[tokio::test]
async fn bytes_flow_both_ways_with_half_close() {
    let mesh = Mesh::new();
    let (client_cert, server_cert) = (mesh.cert("client"), mesh.cert("server"));
    let hbone = start_server(&server_cert, H2Settings::server()).await;
    let app = start_reverse_app().await;
    let client = Client::new(TcpDialer, ClientSettings::default());
    let mut est = client
        .connect(
            &key(&client_cert, &server_cert, hbone),
            &client_cert,
            &ConnectRequest::new(app),
        )
        .await
        .unwrap();
    est.tunnel.write_all(b"hello, mesh").await.unwrap();
    // Half-close: the app only answers after it sees EOF.
    est.tunnel.shutdown().await.unwrap();
    let mut answer = Vec::new();
    est.tunnel.read_to_end(&mut answer).await.unwrap();
    assert_eq!(answer, b"hsem ,olleh");
}

#[tokio::test]
async fn end_stream_alone_after_an_answer_is_a_clean_half_close() {
    // The server's copy has passed everything on and waits; our END_STREAM then comes
    // as an empty DATA frame of its own, which must become a FIN, not a failure.
    let mesh = Mesh::new();
    let (client_cert, server_cert) = (mesh.cert("client"), mesh.cert("server"));
    let hbone = start_server(&server_cert, H2Settings::server()).await;
    let app = start_echo_app().await;
    let client = Client::new(TcpDialer, ClientSettings::default());
    let mut est = client
        .connect(
            &key(&client_cert, &server_cert, hbone),
            &client_cert,
            &ConnectRequest::new(app),
        )
        .await
        .unwrap();
    est.tunnel.write_all(b"ping").await.unwrap();
    let mut back = [0u8; 4];
    est.tunnel.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"ping");
    est.tunnel.shutdown().await.unwrap();
    // The echo app sees EOF and closes: a clean end reaches us, not a reset.
    let mut rest = Vec::new();
    est.tunnel.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());
}

#[tokio::test]
async fn tcp_copy_loop_passes_half_close_both_ways() {
    // A local TCP client → tunnel.copy_with_tcp → HBONE → reverse app.
    let mesh = Mesh::new();
    let (client_cert, server_cert) = (mesh.cert("client"), mesh.cert("server"));
    let hbone = start_server(&server_cert, H2Settings::server()).await;
    let app = start_reverse_app().await;
    let client = Client::new(TcpDialer, ClientSettings::default());
    let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let front_addr = front.local_addr().unwrap();
    let k = key(&client_cert, &server_cert, hbone);
    let proxy = tokio::spawn(async move {
        let (downstream, _) = front.accept().await.unwrap();
        let est = client
            .connect(&k, &client_cert, &ConnectRequest::new(app))
            .await
            .unwrap();
        est.tunnel.copy_with_tcp(&downstream).await.unwrap()
    });
    let mut s = TcpStream::connect(front_addr).await.unwrap();
    s.write_all(b"abc").await.unwrap();
    s.shutdown().await.unwrap();
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).await.unwrap();
    assert_eq!(answer, b"cba");
    let stats = proxy.await.unwrap();
    assert_eq!((stats.sent, stats.received), (3, 3));
}

/// Bytes that differ at every position (an LCG), so a lost, repeated or reordered
/// chunk shows up as a mismatch.
fn pattern(len: usize) -> Vec<u8> {
    let mut x = 0x2545_f491_u32;
    (0..len)
        .map(|_| {
            x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (x >> 24) as u8
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_transfer_through_both_copy_loops_is_byte_exact_with_half_close() {
    // A TCP client → copy_with_tcp → HBONE → copy_with_tcp → reverse app, as between two
    // ztunnels: tens of MiB each way cross the batched writes on both sides (partial
    // writes included, as the client reads the answer only after sending everything).
    const LEN: usize = 24 << 20;
    let mesh = Mesh::new();
    let (client_cert, server_cert) = (mesh.cert("client"), mesh.cert("server"));
    let hbone = start_server(&server_cert, H2Settings::server()).await;
    let app = start_reverse_app().await;
    let client = Client::new(TcpDialer, ClientSettings::default());
    let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let front_addr = front.local_addr().unwrap();
    let k = key(&client_cert, &server_cert, hbone);
    let proxy = tokio::spawn(async move {
        let (downstream, _) = front.accept().await.unwrap();
        let est = client
            .connect(&k, &client_cert, &ConnectRequest::new(app))
            .await
            .unwrap();
        est.tunnel.copy_with_tcp(&downstream).await.unwrap()
    });
    let data = pattern(LEN);
    // A small receive buffer and a late reader: the proxy's writes to us fill the socket
    // and come back short, so the rest of a batch must follow in order.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(16 * 1024).unwrap();
    let s = sock.connect(front_addr).await.unwrap();
    let (mut r, mut w) = s.into_split();
    let sending = data.clone();
    let writer = tokio::spawn(async move {
        // Odd-sized writes, so chunk boundaries never line up with frames.
        for piece in sending.chunks(100_003) {
            w.write_all(piece).await.unwrap();
        }
        // The app answers only after this FIN has come through the tunnel.
        w.shutdown().await.unwrap();
        w
    });
    let _w = writer.await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut answer = Vec::with_capacity(LEN);
    r.read_to_end(&mut answer).await.unwrap();
    let mut want = data;
    want.reverse();
    assert_eq!(answer.len(), LEN, "the app's FIN must end the answer");
    assert!(
        answer == want,
        "the answer differs from the reversed request"
    );
    let stats = proxy.await.unwrap();
    assert_eq!((stats.sent, stats.received), (LEN as u64, LEN as u64));
}

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    let kb: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kb * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gib_transfer_keeps_memory_flat() {
    const TOTAL: u64 = 1 << 30;
    let mesh = Mesh::new();
    let (client_cert, server_cert) = (mesh.cert("client"), mesh.cert("server"));
    let hbone = start_server(&server_cert, H2Settings::server()).await;
    let app = start_sink_app().await;
    let client = Client::new(TcpDialer, ClientSettings::default());
    let mut est = client
        .connect(
            &key(&client_cert, &server_cert, hbone),
            &client_cert,
            &ConnectRequest::new(app),
        )
        .await
        .unwrap();
    let chunk = vec![0x5au8; 1 << 20];
    let before = rss_bytes();
    let mut peak = before;
    let mut sent = 0u64;
    while sent < TOTAL {
        est.tunnel.write_all(&chunk).await.unwrap();
        sent += chunk.len() as u64;
        if sent.is_multiple_of(64 << 20) {
            peak = peak.max(rss_bytes());
        }
    }
    est.tunnel.shutdown().await.unwrap();
    let mut count = [0u8; 8];
    est.tunnel.read_exact(&mut count).await.unwrap();
    assert_eq!(u64::from_be_bytes(count), TOTAL);
    let growth = peak.saturating_sub(before);
    // Flow-control windows bound what can be in flight (4 MiB per stream, 16 MiB per
    // connection, per direction and side); 1 GiB must not accumulate anywhere.
    assert!(
        growth < 96 << 20,
        "RSS grew by {} MiB during a 1 GiB transfer",
        growth >> 20
    );
}

#[tokio::test]
async fn hundred_concurrent_streams_share_one_connection() {
    let mesh = Mesh::new();
    let (client_cert, server_cert) = (mesh.cert("client"), mesh.cert("server"));
    let hbone = start_server(&server_cert, H2Settings::server()).await;
    let app = start_echo_app().await;
    let client = Client::new(TcpDialer, ClientSettings::default());
    let k = key(&client_cert, &server_cert, hbone);
    let client_cert = Arc::new(client_cert);
    let barrier = Arc::new(tokio::sync::Barrier::new(101));
    let mut tasks = Vec::new();
    for i in 0..100u32 {
        let (client, k, cert, barrier) = (
            client.clone(),
            k.clone(),
            client_cert.clone(),
            barrier.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut est = client
                .connect(&k, &cert, &ConnectRequest::new(app))
                .await
                .unwrap();
            let msg = i.to_be_bytes();
            est.tunnel.write_all(&msg).await.unwrap();
            let mut back = [0u8; 4];
            est.tunnel.read_exact(&mut back).await.unwrap();
            assert_eq!(back, msg);
            barrier.wait().await; // all 100 open at once
            est
        }));
    }
    barrier.wait().await;
    assert_eq!(client.connections(), 1);
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test]
async fn more_streams_than_the_peer_allows_open_a_second_connection() {
    let mesh = Mesh::new();
    let (client_cert, server_cert) = (mesh.cert("client"), mesh.cert("server"));
    let server_settings = H2Settings {
        max_concurrent_streams: 10,
        ..H2Settings::server()
    };
    let hbone = start_server(&server_cert, server_settings).await;
    let app = start_echo_app().await;
    let client = Client::new(TcpDialer, ClientSettings::default());
    let k = key(&client_cert, &server_cert, hbone);
    let mut open = Vec::new();
    for i in 0..15u8 {
        let mut est = client
            .connect(&k, &client_cert, &ConnectRequest::new(app))
            .await
            .unwrap();
        est.tunnel.write_all(&[i]).await.unwrap();
        let mut b = [0u8];
        est.tunnel.read_exact(&mut b).await.unwrap();
        assert_eq!(b[0], i);
        open.push(est);
    }
    assert_eq!(
        client.connections(),
        2,
        "10 streams on the first, 5 on a second"
    );
    // Released slots are reused before opening a third connection.
    open.truncate(5);
    tokio::time::sleep(Duration::from_millis(50)).await;
    for _ in 0..10 {
        open.push(
            client
                .connect(&k, &client_cert, &ConnectRequest::new(app))
                .await
                .unwrap(),
        );
    }
    assert_eq!(client.connections(), 2);
}

#[tokio::test]
async fn wrong_server_identity_is_refused_by_the_client() {
    let mesh = Mesh::new();
    let client_cert = mesh.cert("client");
    let server_cert = mesh.cert("server");
    let hbone = start_server(&server_cert, H2Settings::server()).await;
    let expected = SpiffeId::new("cluster.local", "test", "someone-else").unwrap();
    let k = PoolKey::new(client_cert.identity().clone(), vec![expected], hbone, None);
    let client = Client::new(TcpDialer, ClientSettings::default());
    let err = client
        .connect(&k, &client_cert, &ConnectRequest::new(hbone))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            ConnectError::Identity(mesh_identity::IdentityError::UnexpectedIdentity { .. })
        ),
        "{err}"
    );
    assert_eq!(client.connections(), 0);
}

#[tokio::test]
async fn handler_refusals_reach_the_client_as_distinct_errors() {
    let mesh = Mesh::new();
    let (client_cert, server_cert) = (mesh.cert("client"), mesh.cert("server"));
    let hbone = start_server(&server_cert, H2Settings::server()).await;
    let client = Client::new(TcpDialer, ClientSettings::default());
    let k = key(&client_cert, &server_cert, hbone);
    let mut seen = Vec::new();
    for port in [1u16, 2, 3] {
        let target = SocketAddr::from(([127, 0, 0, 1], port));
        match client
            .connect(&k, &client_cert, &ConnectRequest::new(target))
            .await
        {
            Err(ConnectError::Refused(r)) => seen.push(r),
            other => panic!("port {port}: expected a refusal, got {other:?}"),
        }
    }
    assert_eq!(
        seen,
        vec![
            Refused::BadRequest,
            Refused::Unauthorized,
            Refused::Unavailable
        ]
    );
    // Refusals do not poison the connection.
    assert_eq!(client.connections(), 1);
    let app = start_echo_app().await;
    client
        .connect(&k, &client_cert, &ConnectRequest::new(app))
        .await
        .unwrap();
    assert_eq!(client.connections(), 1);
}

#[tokio::test]
async fn non_connect_requests_get_400() {
    let mesh = Mesh::new();
    let (client_cert, server_cert) = (mesh.cert("client"), mesh.cert("server"));
    let hbone = start_server(&server_cert, H2Settings::server()).await;
    // Speak raw HTTP/2 over the mesh TLS to send a GET.
    let tls =
        mesh_identity::client_config(&client_cert, vec![server_cert.identity().clone()]).unwrap();
    let tcp = TcpStream::connect(hbone).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect(
            rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    let (mut h2, conn) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(conn);
    let req = http::Request::get("https://127.0.0.1/").body(()).unwrap();
    let (resp, _) = h2.send_request(req, true).unwrap();
    assert_eq!(resp.await.unwrap().status(), 400);
    // The connection keeps serving after a bad request.
    let connect = ConnectRequest::new(SocketAddr::from(([127, 0, 0, 1], 3)))
        .to_http()
        .unwrap();
    let mut h2 = h2.ready().await.unwrap();
    let (resp, _) = h2.send_request(connect, false).unwrap();
    assert_eq!(resp.await.unwrap().status(), 503);
}

#[tokio::test]
async fn client_without_certificate_is_refused() {
    let mesh = Mesh::new();
    let server_cert = mesh.cert("server");
    let hbone = start_server(&server_cert, H2Settings::server()).await;
    // A client that accepts the server as a mesh client does (so the refusal can only be
    // the server's), and presents no certificate.
    let verifier = mesh_identity::tls::SpiffeServerVerifier::new(
        server_cert.roots(),
        vec![server_cert.identity().clone()],
    )
    .unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(mesh_identity::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = TcpStream::connect(hbone).await.unwrap();
    let result = async {
        let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(
                rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap(),
                tcp,
            )
            .await?;
        // TLS 1.3: the server's refusal arrives after the client's handshake completes.
        tls.write_all(b"x").await?;
        let mut b = [0u8; 1];
        tls.read(&mut b).await
    }
    .await;
    // Refused by TLS itself (the server requires a client certificate), not closed after
    // a handshake that accepted none.
    let err = result.expect_err("a client without a certificate is refused");
    let alert = err
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    assert_eq!(
        alert,
        Some(&rustls::Error::AlertReceived(
            rustls::AlertDescription::CertificateRequired
        )),
        "{err:?}"
    );
}
