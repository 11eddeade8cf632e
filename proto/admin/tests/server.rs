//! The server over real loopback TCP: idle and slow clients, bounds, routing.

use http::{Method, StatusCode};
use mesh_admin::{Limits, Request, Response, Routes};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A bound on waits that only a broken server reaches (not a speed assertion).
const NEVER: Duration = Duration::from_secs(20);

async fn start(limits: Limits) -> SocketAddr {
    let l = mesh_admin::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let addr = l.local_addr().unwrap();
    let routes = Routes::new()
        .get("/healthz/ready", |_| async {
            Response::text(StatusCode::OK, "ready\n")
        })
        .method(Method::POST, "/echo", |r: Request| async move {
            Response::untyped(StatusCode::OK, r.body)
        })
        .get("/q", |r: Request| async move {
            Response::text(StatusCode::OK, r.param("level").unwrap_or_default())
        });
    mesh_admin::spawn(l, routes, limits);
    addr
}

/// One request over its own connection; the whole response as text.
async fn exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(NEVER, s.read_to_end(&mut out))
        .await
        .expect("the server answers and closes")
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

async fn get(addr: SocketAddr, path: &str) -> String {
    exchange(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
}

#[tokio::test]
async fn idle_connections_do_not_delay_readiness() {
    // A header timeout far longer than the test: readiness must not wait for it.
    let addr = start(Limits {
        header_read_timeout: Duration::from_secs(600),
        ..Limits::default()
    })
    .await;
    let mut idle = Vec::new();
    for _ in 0..50 {
        idle.push(TcpStream::connect(addr).await.unwrap());
    }
    // And one that sent half a request head.
    let mut half = TcpStream::connect(addr).await.unwrap();
    half.write_all(b"GET /healthz/ready HTTP/1.1\r\nHo")
        .await
        .unwrap();
    let r = tokio::time::timeout(NEVER, get(addr, "/healthz/ready"))
        .await
        .expect("readiness answers while other connections idle");
    assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
    assert!(r.ends_with("\r\n\r\nready\n"), "{r}");
    drop((idle, half));
}

/// A probe from `source` (a loopback address of its own), with the kubelet's default
/// 1 s timeout.
async fn probe_from(source: &str, addr: SocketAddr, path: &str) -> String {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(format!("{source}:0").parse().unwrap()).unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let probe = async {
        let mut s = sock.connect(addr).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.unwrap();
        String::from_utf8_lossy(&out).into_owned()
    };
    tokio::time::timeout(Duration::from_secs(1), probe)
        .await
        .expect("the probe is answered within the kubelet's timeout")
}

#[tokio::test]
async fn one_peer_filling_the_slots_does_not_starve_probes() {
    // Idle connections are never closed by the header timeout during the test.
    let addr = start(Limits {
        header_read_timeout: Duration::from_secs(600),
        max_connections: 8,
        max_connections_per_peer: 4,
        ..Limits::default()
    })
    .await;
    // Peers past their share, and together past the global cap, all idle.
    let mut idle = Vec::new();
    for source in ["127.0.0.1", "127.0.0.3", "127.0.0.4"] {
        for _ in 0..7 {
            let sock = tokio::net::TcpSocket::new_v4().unwrap();
            sock.bind(format!("{source}:0").parse().unwrap()).unwrap();
            idle.push(sock.connect(addr).await.unwrap());
        }
    }
    // Another source address: the kubelet.
    let r = probe_from("127.0.0.2", addr, "/healthz/ready").await;
    assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
    assert!(r.ends_with("\r\n\r\nready\n"), "{r}");
    // And again, from the same address as the idle connections (a host-network pod
    // shares the kubelet's): that peer's own idle connections make room.
    let r = probe_from("127.0.0.1", addr, "/healthz/ready").await;
    assert!(r.ends_with("\r\n\r\nready\n"), "{r}");
    drop(idle);
}

#[tokio::test]
async fn an_idle_connection_is_closed_after_the_header_timeout() {
    let addr = start(Limits {
        header_read_timeout: Duration::from_millis(300),
        ..Limits::default()
    })
    .await;
    // Never sends anything.
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(NEVER, s.read(&mut buf))
        .await
        .expect("the server closes an idle connection")
        .unwrap_or(0);
    assert_eq!(n, 0, "{:?}", String::from_utf8_lossy(&buf[..n]));

    // Idle between two requests of a kept-alive connection.
    let addr = start(Limits {
        header_read_timeout: Duration::from_millis(300),
        keep_alive: true,
        ..Limits::default()
    })
    .await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /healthz/ready HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(NEVER, s.read_to_end(&mut out))
        .await
        .expect("the server closes the kept-alive connection once idle")
        .unwrap();
    let text = String::from_utf8_lossy(&out);
    assert!(
        text.starts_with("HTTP/1.1 200 OK\r\n") && text.ends_with("ready\n"),
        "{text}"
    );
    assert!(!text.to_lowercase().contains("connection: close"), "{text}");
}

#[tokio::test]
async fn without_keep_alive_each_response_closes_its_connection() {
    let addr = start(Limits {
        header_read_timeout: Duration::from_secs(600),
        ..Limits::default()
    })
    .await;
    // No `Connection: close` asked: the server closes anyway (read_to_end returns).
    let r = exchange(addr, b"GET /healthz/ready HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(
        r.to_lowercase().contains("\r\nconnection: close\r\n"),
        "{r}"
    );
    assert!(r.ends_with("\r\n\r\nready\n"), "{r}");
}

#[tokio::test]
async fn routes_methods_and_bounds() {
    let addr = start(Limits {
        max_body: 16,
        ..Limits::default()
    })
    .await;
    let r = get(addr, "/nope").await;
    assert!(
        r.starts_with("HTTP/1.1 404 Not Found\r\n") && r.ends_with("not found\n"),
        "{r}"
    );
    let r = get(addr, "/echo").await;
    assert!(r.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"), "{r}");
    assert!(r.to_lowercase().contains("\r\nallow: post\r\n"), "{r}");
    let r = get(addr, "/q?level=a%3Db").await;
    assert!(r.ends_with("\r\n\r\na=b"), "{r}");

    let small = exchange(
        addr,
        b"POST /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 5\r\n\r\nhello",
    )
    .await;
    assert!(
        small.starts_with("HTTP/1.1 200 OK\r\n") && small.ends_with("\r\n\r\nhello"),
        "{small}"
    );
    // No content-type when the handler gives none.
    assert!(!small.to_lowercase().contains("content-type"), "{small}");

    let big = exchange(addr, b"POST /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 17\r\n\r\n0123456789abcdefg").await;
    assert!(
        big.starts_with("HTTP/1.1 413 Payload Too Large\r\n"),
        "{big}"
    );

    let long_header = format!(
        "GET /healthz/ready HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\nConnection: close\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    let r = exchange(addr, long_header.as_bytes()).await;
    assert!(r.starts_with("HTTP/1.1 431 ") || r.is_empty(), "{r}");
    assert!(!r.contains("ready\n"), "{r}");

    // HTTP/1.0, as the lab's and meshctl's raw clients speak it.
    let r = exchange(addr, b"GET /healthz/ready HTTP/1.0\r\nHost: x\r\n\r\n").await;
    assert!(
        r.starts_with("HTTP/1.0 200 OK\r\n") && r.ends_with("ready\n"),
        "{r}"
    );
}
