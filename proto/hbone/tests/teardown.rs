//! How a tunnel's copy ends when the other side closes first: real TLS, real HTTP/2 over
//! loopback. A peer that answers, ends its stream and drops it (h2 then sends
//! RST_STREAM(NO_ERROR), RFC 9113 §8.1) ended the connection normally; a peer that resets
//! or drops its stream before ending it did not — the TCP client sees a reset, never a
//! FIN — and the bytes moved so far are still reported.

use hbone::client::{Client, ClientSettings, TcpDialer};
use hbone::protocol::{ConnectRequest, Refusal};
use hbone::server::{ConnectHandler, InboundConnect, Responder};
use hbone::{CopyStats, H2Settings, PoolKey};
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

mod common;
use common::Mesh;

/// Authority ports choose what the far end does.
const ANSWER_AND_DROP: u16 = 1001;
const ECHO: u16 = 1002;
const RESET_MIDWAY: u16 = 1003;
const DROP_MIDWAY: u16 = 1004;
const PART_AND_DROP: u16 = 1005;
const READ_ALL: u16 = 1006;

/// What the `READ_ALL` far end read: 1 = the whole request up to END_STREAM, 2 = an error.
static READ_ALL_OUTCOME: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// The far end, played with the tunnel's own `AsyncRead`/`AsyncWrite` (as the waypoint's
/// HTTP server does).
struct FarEnd;

impl ConnectHandler for FarEnd {
    async fn handle(&self, req: InboundConnect, respond: Responder) {
        let hbone::Authority::Addr(target) = req.request.authority else {
            return respond.refuse(&Refusal::BadRequest("ip:port only".into()));
        };
        let Ok(mut t) = respond.accept(Default::default()) else {
            return;
        };
        let mut buf = [0u8; 4];
        match target.port() {
            ANSWER_AND_DROP => {
                // Answer, end our side, and drop the stream without waiting for the
                // client's END_STREAM: h2 resets it with NO_ERROR.
                t.read_exact(&mut buf).await.unwrap();
                t.write_all(b"pong").await.unwrap();
                t.shutdown().await.unwrap();
            }
            ECHO => {
                let mut all = Vec::new();
                t.read_to_end(&mut all).await.unwrap();
                t.write_all(&all).await.unwrap();
                t.shutdown().await.unwrap();
            }
            RESET_MIDWAY => {
                // Answer the first message; after the second, abort with the answer due.
                t.read_exact(&mut buf).await.unwrap();
                t.write_all(b"pong").await.unwrap();
                t.read_exact(&mut buf).await.unwrap();
                t.reset();
            }
            DROP_MIDWAY => {
                // Answer; once the client confirms it has the answer, drop the stream
                // without ending it: h2 resets with CANCEL (discarding anything queued).
                t.read_exact(&mut buf).await.unwrap();
                t.write_all(b"pong").await.unwrap();
                t.read_exact(&mut buf).await.unwrap();
            }
            PART_AND_DROP => {
                // Read the whole request, write part of the answer, and drop the
                // stream without ending it (as a crash would).
                let mut all = Vec::new();
                t.read_to_end(&mut all).await.unwrap();
                t.write_all(b"par").await.unwrap();
            }
            READ_ALL => {
                let mut all = Vec::new();
                let outcome = match t.read_to_end(&mut all).await {
                    Ok(_) if all == b"ping" => 1,
                    _ => 2,
                };
                READ_ALL_OUTCOME.store(outcome, std::sync::atomic::Ordering::SeqCst);
                // Hold the stream a little so the client's drop happens before our end.
                let _ = t.write_all(b"late").await;
            }
            _ => {}
        }
    }
}

struct Setup {
    client: Client<TcpDialer>,
    key: PoolKey,
    cert: mesh_identity::WorkloadCertificate,
    hbone: SocketAddr,
}

async fn setup() -> Setup {
    let mesh = Mesh::new();
    let (cert, server_cert) = (mesh.cert("client"), mesh.cert("server"));
    let hbone =
        common::start_hbone_server(&server_cert, Arc::new(FarEnd), H2Settings::server()).await;
    let key = PoolKey::new(
        cert.identity().clone(),
        vec![server_cert.identity().clone()],
        hbone,
        None,
    );
    Setup {
        client: Client::new(TcpDialer, ClientSettings::default()),
        key,
        cert,
        hbone,
    }
}

/// A local TCP client's connection, copied through `copy_with_tcp` to the far end `port`.
/// Returns the client socket and the copy's result.
async fn proxied(
    s: &Setup,
    port: u16,
) -> (
    TcpStream,
    tokio::task::JoinHandle<Result<CopyStats, hbone::tunnel::CopyError>>,
) {
    let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let front_addr = front.local_addr().unwrap();
    let (client, key, cert) = (s.client.clone(), s.key.clone(), s.cert.clone());
    let target = SocketAddr::new(s.hbone.ip(), port);
    let copy = tokio::spawn(async move {
        let (downstream, _) = front.accept().await.unwrap();
        let est = client
            .connect(&key, &cert, &ConnectRequest::new(target))
            .await
            .unwrap();
        est.tunnel.copy_with_tcp(&downstream).await
    });
    (TcpStream::connect(front_addr).await.unwrap(), copy)
}

/// One echo round trip on the same HBONE connection: frames on a connection arrive in
/// order, so whatever the far end sent before this answer has been seen by the client.
async fn barrier(s: &Setup) {
    let (mut c, copy) = proxied(s, ECHO).await;
    c.write_all(b"sync").await.unwrap();
    c.shutdown().await.unwrap();
    let mut all = Vec::new();
    c.read_to_end(&mut all).await.unwrap();
    assert_eq!(all, b"sync");
    copy.await.unwrap().unwrap();
    assert_eq!(
        s.client.connections(),
        1,
        "the barrier must share the connection"
    );
}

#[tokio::test]
async fn far_end_answering_and_dropping_the_stream_is_a_normal_close() {
    let s = setup().await;
    let (mut c, copy) = proxied(&s, ANSWER_AND_DROP).await;
    c.write_all(b"ping").await.unwrap();
    let mut answer = Vec::new();
    // The far end's END_STREAM arrives as FIN.
    c.read_to_end(&mut answer).await.unwrap();
    assert_eq!(answer, b"pong");
    // The far end's RST_STREAM(NO_ERROR) has arrived too; only now does our side end.
    barrier(&s).await;
    drop(c);
    let stats = copy
        .await
        .unwrap()
        .expect("a peer that answered and closed ended the connection normally");
    assert_eq!(
        stats,
        CopyStats {
            sent: 4,
            received: 4
        }
    );
}

#[tokio::test]
async fn reset_with_data_still_due_is_an_error_that_keeps_the_bytes_moved() {
    let s = setup().await;
    let (mut c, copy) = proxied(&s, RESET_MIDWAY).await;
    c.write_all(b"ping").await.unwrap();
    let mut answer = [0u8; 4];
    c.read_exact(&mut answer).await.unwrap();
    assert_eq!(&answer, b"pong");
    c.write_all(b"next").await.unwrap();
    let err = copy
        .await
        .unwrap()
        .expect_err("a reset before the far end finished is a failure");
    assert_eq!(
        err.stats,
        CopyStats {
            sent: 8,
            received: 4
        }
    );
    assert!(err.to_string().contains("reset"), "{err}");
}

#[tokio::test]
async fn shutting_down_a_tunnel_the_far_end_released_is_no_error() {
    // The waypoint's L4 path uses the tunnel as AsyncRead/AsyncWrite and shuts it down
    // when its other side ends.
    let s = setup().await;
    let target = SocketAddr::new(s.hbone.ip(), ANSWER_AND_DROP);
    let mut est = s
        .client
        .connect(&s.key, &s.cert, &ConnectRequest::new(target))
        .await
        .unwrap();
    est.tunnel.write_all(b"ping").await.unwrap();
    let mut answer = Vec::new();
    est.tunnel.read_to_end(&mut answer).await.unwrap();
    assert_eq!(answer, b"pong");
    barrier(&s).await;
    est.tunnel
        .shutdown()
        .await
        .expect("the far end answered and released the stream");
}

fn assert_reset(r: std::io::Result<usize>) {
    let e = r.expect_err("the client must see a reset, not a FIN");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
}

#[tokio::test]
async fn far_end_dropping_the_stream_without_ending_it_is_a_failure() {
    // The far end never sends END_STREAM: indistinguishable from a crash mid-answer,
    // even though it had everything the client sent.
    let s = setup().await;
    let (mut c, copy) = proxied(&s, DROP_MIDWAY).await;
    c.write_all(b"ping").await.unwrap();
    let mut answer = [0u8; 4];
    c.read_exact(&mut answer).await.unwrap();
    assert_eq!(&answer, b"pong");
    c.write_all(b"next").await.unwrap();
    let mut rest = Vec::new();
    assert_reset(c.read_to_end(&mut rest).await);
    assert!(rest.is_empty());
    let err = copy
        .await
        .unwrap()
        .expect_err("a stream dropped before its END_STREAM is a failure");
    assert_eq!(
        err.stats,
        CopyStats {
            sent: 8,
            received: 4
        }
    );
    assert!(err.to_string().contains("reset"), "{err}");
}

#[tokio::test]
async fn far_end_dropping_the_stream_mid_answer_resets_the_half_closed_client() {
    let s = setup().await;
    let (mut c, copy) = proxied(&s, PART_AND_DROP).await;
    c.write_all(b"ping").await.unwrap();
    c.shutdown().await.unwrap();
    let mut answer = Vec::new();
    assert_reset(c.read_to_end(&mut answer).await);
    assert!(b"par".starts_with(&answer), "{answer:?}");
    let err = copy
        .await
        .unwrap()
        .expect_err("an answer cut short is a failure");
    assert_eq!(err.stats.sent, 4);
    assert!(err.stats.received <= 3, "{:?}", err.stats);
}

#[tokio::test]
async fn a_stopped_copy_resets_both_ends_and_keeps_the_bytes_moved() {
    // Drain and policy stop the copy: the client sees a reset, not a FIN.
    let s = setup().await;
    let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let front_addr = front.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (client, key, cert) = (s.client.clone(), s.key.clone(), s.cert.clone());
    let target = SocketAddr::new(s.hbone.ip(), ECHO);
    let copy = tokio::spawn(async move {
        let (downstream, _) = front.accept().await.unwrap();
        let est = client
            .connect(&key, &cert, &ConnectRequest::new(target))
            .await
            .unwrap();
        let stop = async {
            let _ = stop_rx.await;
            std::io::Error::other("drained")
        };
        est.tunnel.copy_with_tcp_until(&downstream, stop).await
    });
    let mut c = TcpStream::connect(front_addr).await.unwrap();
    c.write_all(b"ping").await.unwrap();
    stop_tx.send(()).unwrap();
    let err = copy
        .await
        .unwrap()
        .expect_err("a stopped copy is a failure");
    assert_eq!(err.to_string(), "drained");
    assert!(err.stats.sent <= 4, "{:?}", err.stats);
    let mut rest = Vec::new();
    assert_reset(c.read_to_end(&mut rest).await);
}

#[tokio::test]
async fn a_finished_client_tunnel_dropped_at_once_still_delivers_its_end_stream() {
    // An h2 client dropping a stream cancels it, discarding a queued END_STREAM; the
    // tunnel lingers so the far end still sees a complete request.
    let s = setup().await;
    let target = SocketAddr::new(s.hbone.ip(), READ_ALL);
    let mut est = s
        .client
        .connect(&s.key, &s.cert, &ConnectRequest::new(target))
        .await
        .unwrap();
    est.tunnel.write_all(b"ping").await.unwrap();
    est.tunnel.shutdown().await.unwrap();
    drop(est);
    loop {
        match READ_ALL_OUTCOME.load(std::sync::atomic::Ordering::SeqCst) {
            0 => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
            outcome => {
                assert_eq!(outcome, 1, "the far end must read the request to its end");
                break;
            }
        }
    }
}
