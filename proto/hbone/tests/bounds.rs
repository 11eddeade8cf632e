//! Every wait on the HBONE data path is bounded: a peer that stalls at any step before or
//! after the CONNECT costs a bounded time, and others keep being served meanwhile.
//! Server-side and pool tests run on tokio's paused clock (in-memory streams), so their
//! verdicts are exact; the client tests against stalled loopback servers use short
//! configured timeouts and only check *which* error comes back, never how fast.

use hbone::client::{Client, ClientSettings, ConnectError, Dialer, TcpDialer};
use hbone::protocol::{ConnectRequest, Refusal};
use hbone::server::{ConnectHandler, InboundConnect, Responder, ServeError, serve_stream};
use hbone::{H2Settings, PoolKey};
use mesh_identity::WorkloadCertificate;
use rustls_pki_types::ServerName;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncWriteExt, DuplexStream};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

mod common;
use common::Mesh;

const HANDSHAKE: Duration = Duration::from_secs(5);

/// Refuses every CONNECT with 503 except port 7, which it never answers.
struct Handler {
    held: std::sync::Mutex<Vec<Responder>>,
}

impl ConnectHandler for Handler {
    async fn handle(&self, req: InboundConnect, respond: Responder) {
        if req.request.authority.port() == 7 {
            self.held.lock().unwrap().push(respond);
        } else {
            respond.refuse(&Refusal::Unavailable("test".into()));
        }
    }
}

fn handler() -> Arc<Handler> {
    Arc::new(Handler {
        held: Default::default(),
    })
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Serves one in-memory connection with a 5 s handshake bound; resolves to how it ended
/// and when (on the paused clock).
/// How a served connection ended, and when.
type Served = tokio::task::JoinHandle<(Result<(), ServeError>, Instant)>;

fn serve(server_cert: &WorkloadCertificate, handler: Arc<Handler>) -> (DuplexStream, Served) {
    let (client, server) = tokio::io::duplex(64 * 1024);
    let tls = Arc::new(mesh_identity::server_config(server_cert).unwrap());
    let settings = H2Settings {
        handshake_timeout: HANDSHAKE,
        ..H2Settings::server()
    };
    let task = tokio::spawn(async move {
        let r = serve_stream(
            server,
            addr(15008),
            addr(40000),
            tls,
            handler,
            &settings,
            CancellationToken::new(),
        )
        .await;
        (r, Instant::now())
    });
    (client, task)
}

async fn client_tls(
    client_cert: &WorkloadCertificate,
    server: &WorkloadCertificate,
    io: DuplexStream,
) -> tokio_rustls::client::TlsStream<DuplexStream> {
    let config =
        mesh_identity::client_config(client_cert, vec![server.identity().clone()]).unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("127.0.0.1").unwrap(), io)
        .await
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn stalled_peers_are_closed_after_the_handshake_timeout_while_others_are_served() {
    let mesh = Mesh::new();
    let (client_cert, server_cert) = (mesh.cert("client"), mesh.cert("server"));
    let h = handler();
    let start = Instant::now();

    // 1: connects and sends nothing at all.
    let (_silent, silent) = serve(&server_cert, h.clone());
    // 2: completes TLS, never sends the HTTP/2 preface.
    let (io, no_preface) = serve(&server_cert, h.clone());
    let _tls_only = client_tls(&client_cert, &server_cert, io).await;
    // 3: sends the preface, never its SETTINGS.
    let (io, no_settings) = serve(&server_cert, h.clone());
    let mut preface_only = client_tls(&client_cert, &server_cert, io).await;
    preface_only
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    preface_only.flush().await.unwrap();

    // Meanwhile a well-behaved client is served, well before any of those time out.
    let (io, good) = serve(&server_cert, h.clone());
    let tls = client_tls(&client_cert, &server_cert, io).await;
    let (h2, conn) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(conn);
    let mut h2 = h2.ready().await.unwrap();
    let (resp, _send) = h2
        .send_request(ConnectRequest::new(addr(8080)).to_http().unwrap(), false)
        .unwrap();
    assert_eq!(resp.await.unwrap().status(), 503);
    assert!(
        start.elapsed() < HANDSHAKE,
        "served at {:?}",
        start.elapsed()
    );

    let (r, at) = silent.await.unwrap();
    assert!(matches!(r, Err(ServeError::TlsTimeout)), "{r:?}");
    assert_eq!(at - start, HANDSHAKE);
    let (r, at) = no_preface.await.unwrap();
    assert!(matches!(r, Err(ServeError::PrefaceTimeout)), "{r:?}");
    assert_eq!(at - start, HANDSHAKE);
    let (r, at) = no_settings.await.unwrap();
    assert!(matches!(r, Err(ServeError::SettingsTimeout)), "{r:?}");
    assert_eq!(at - start, HANDSHAKE);
    // The good connection outlives the handshake bound: it answered the first PING.
    assert!(!good.is_finished());
}

/// Never completes a TCP connection.
struct StuckDialer;

impl Dialer for StuckDialer {
    async fn dial(&self, _: SocketAddr, _: Option<IpAddr>) -> std::io::Result<TcpStream> {
        std::future::pending().await
    }
}

#[tokio::test(start_paused = true)]
async fn callers_queued_behind_a_stuck_dial_wait_no_longer_than_one_attempt() {
    let mesh = Mesh::new();
    let (client_cert, server_cert) = (Arc::new(mesh.cert("client")), mesh.cert("server"));
    let settings = ClientSettings {
        connect_timeout: Duration::from_secs(2),
        h2: H2Settings {
            handshake_timeout: Duration::from_secs(1),
            ..H2Settings::client()
        },
        ..ClientSettings::default()
    };
    let bound = settings.connect_timeout + settings.h2.handshake_timeout;
    let client = Client::new(StuckDialer, settings);
    let key = PoolKey::new(
        client_cert.identity().clone(),
        vec![server_cert.identity().clone()],
        addr(15008),
        None,
    );
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (client, key, cert) = (client.clone(), key.clone(), client_cert.clone());
        tasks.push(tokio::spawn(async move {
            let r = client
                .connect(&key, &cert, &ConnectRequest::new(addr(8080)))
                .await;
            (r.map(|_| ()), start.elapsed())
        }));
    }
    for t in tasks {
        let (r, took) = t.await.unwrap();
        let err = r.unwrap_err();
        assert!(
            matches!(
                err,
                ConnectError::ConnectTimeout(_) | ConnectError::PoolTimeout(_)
            ),
            "{err}"
        );
        // Queued one after another, eight dials would take 8 × 2 s.
        assert!(took <= bound, "a caller waited {took:?} (bound {bound:?})");
    }
}

async fn stalled_server(tls: Option<Arc<rustls::ServerConfig>>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            match &tls {
                // TLS, then silence: no HTTP/2 SETTINGS ever.
                Some(cfg) => {
                    if let Ok(s) = tokio_rustls::TlsAcceptor::from(cfg.clone())
                        .accept(tcp)
                        .await
                    {
                        held.push(Box::new(s) as Box<dyn Send>);
                    }
                }
                // Accepts the TCP connection and never speaks.
                None => held.push(Box::new(tcp)),
            }
        }
    });
    a
}

fn short_client() -> Client {
    Client::new(
        TcpDialer,
        ClientSettings {
            h2: H2Settings {
                handshake_timeout: Duration::from_millis(300),
                ..H2Settings::client()
            },
            response_timeout: Duration::from_millis(300),
            ..ClientSettings::default()
        },
    )
}

#[tokio::test]
async fn client_gives_up_on_servers_that_stall_before_http2_is_ready() {
    let mesh = Mesh::new();
    let (client_cert, server_cert) = (mesh.cert("client"), mesh.cert("server"));
    let no_tls = stalled_server(None).await;
    let no_settings = stalled_server(Some(Arc::new(
        mesh_identity::server_config(&server_cert).unwrap(),
    )))
    .await;
    let client = short_client();
    for dst in [no_tls, no_settings] {
        let key = PoolKey::new(
            client_cert.identity().clone(),
            vec![server_cert.identity().clone()],
            dst,
            None,
        );
        let err = client
            .connect(&key, &client_cert, &ConnectRequest::new(addr(8080)))
            .await
            .unwrap_err();
        assert!(matches!(err, ConnectError::HandshakeTimeout(_)), "{err}");
    }
    assert_eq!(client.connections(), 0);
}

#[tokio::test]
async fn client_gives_up_on_a_connect_that_is_never_answered() {
    let mesh = Mesh::new();
    let (client_cert, server_cert) = (mesh.cert("client"), mesh.cert("server"));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hbone = listener.local_addr().unwrap();
    let tls = Arc::new(mesh_identity::server_config(&server_cert).unwrap());
    let h = handler();
    let server_handler = h.clone();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let (tls, handler) = (tls.clone(), server_handler.clone());
            tokio::spawn(async move {
                let _ = hbone::serve_connection(
                    tcp,
                    tls,
                    handler,
                    &H2Settings::server(),
                    CancellationToken::new(),
                )
                .await;
            });
        }
    });
    let client = short_client();
    let key = PoolKey::new(
        client_cert.identity().clone(),
        vec![server_cert.identity().clone()],
        hbone,
        None,
    );
    let err = client
        .connect(&key, &client_cert, &ConnectRequest::new(addr(7)))
        .await
        .unwrap_err();
    assert!(matches!(err, ConnectError::ResponseTimeout(_)), "{err}");
    assert_eq!(h.held.lock().unwrap().len(), 1, "the server did get it");
    // The connection itself is fine: the next CONNECT is answered on it.
    let err = client
        .connect(&key, &client_cert, &ConnectRequest::new(addr(8080)))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            ConnectError::Refused(hbone::protocol::Refused::Unavailable)
        ),
        "{err}"
    );
    assert_eq!(client.connections(), 1);
}
