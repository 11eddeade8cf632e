//! HBONE over loopback: single-stream throughput, and CONNECT streams per second on a
//! warm (pooled) connection. Real TLS 1.3, real HTTP/2, real TCP apps.
//!
//! The `direct_*` / `mesh_*` pairs measure ztunnel's own data path against plain TCP in
//! the same run: a TCP client → an outbound proxy (`Tunnel::copy_with_tcp`) → HBONE →
//! the server's `copy_with_tcp` → the app, versus the client talking to the app. Compare
//! their ratio, not absolute figures (the machine is shared).

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use hbone::client::{Client, ClientSettings, TcpDialer};
use hbone::protocol::{ConnectRequest, Refusal};
use hbone::server::{ConnectHandler, InboundConnect, Responder, serve_connection};
use hbone::{Authority, H2Settings, PoolKey};
use mesh_identity::ca::CertificateAuthority;
use mesh_identity::{SpiffeId, WorkloadCertificate, generate_csr};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

const PAYLOAD: usize = 64 << 20;

struct Forward;

impl ConnectHandler for Forward {
    async fn handle(&self, req: InboundConnect, respond: Responder) {
        let Authority::Addr(target) = req.request.authority else {
            return respond.refuse(&Refusal::Unavailable("host authority".into()));
        };
        let Ok(app) = TcpStream::connect(target).await else {
            return respond.refuse(&Refusal::Unavailable("app down".into()));
        };
        let _ = app.set_nodelay(true);
        if let Ok(tunnel) = respond.accept(Default::default()) {
            let _ = tunnel.copy_with_tcp(&app).await;
        }
    }
}

fn cert(ca: &CertificateAuthority, sa: &str) -> WorkloadCertificate {
    let id = SpiffeId::new("cluster.local", "bench", sa).unwrap();
    let csr = generate_csr(&id).unwrap();
    let chain = ca
        .sign_csr(&csr.csr_pem, &id, Duration::from_secs(3600))
        .unwrap();
    WorkloadCertificate::from_ca_response(&id, &csr.key, &chain).unwrap()
}

/// Reads to EOF, answers with one byte. Or echoes, when `echo`.
async fn app(echo: bool) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 256 * 1024];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) if echo => {
                            if s.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                        Ok(_) => {}
                    }
                }
                let _ = s.write_all(b"k").await;
            });
        }
    });
    addr
}

/// An outbound proxy as ztunnel has it: each accepted TCP connection is tunnelled to
/// `target` with `copy_with_tcp`.
async fn outbound(
    client: Client<TcpDialer>,
    key: PoolKey,
    cert: Arc<WorkloadCertificate>,
    target: SocketAddr,
) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = l.accept().await.unwrap();
            let _ = tcp.set_nodelay(true);
            let (client, key, cert) = (client.clone(), key.clone(), cert.clone());
            tokio::spawn(async move {
                let est = client
                    .connect(&key, &cert, &ConnectRequest::new(target))
                    .await
                    .unwrap();
                let _ = est.tunnel.copy_with_tcp(&tcp).await;
            });
        }
    });
    addr
}

/// Sends `PAYLOAD` bytes to a sink at `addr` and waits for its one-byte answer.
async fn push_payload(addr: SocketAddr, chunk: &[u8]) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let _ = s.set_nodelay(true);
    for _ in 0..PAYLOAD / chunk.len() {
        s.write_all(chunk).await.unwrap();
    }
    s.shutdown().await.unwrap();
    let mut ack = [0u8; 1];
    s.read_exact(&mut ack).await.unwrap();
}

/// `iters` request/response round trips of `size` bytes to an echo server at `addr`, on
/// one connection; only the round trips are timed.
async fn round_trips(addr: SocketAddr, size: usize, iters: u64) -> Duration {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let _ = s.set_nodelay(true);
    let (req, mut resp) = (vec![7u8; size], vec![0u8; size]);
    // Warm the path (the tunnel is set up on the first bytes).
    s.write_all(&req).await.unwrap();
    s.read_exact(&mut resp).await.unwrap();
    let start = std::time::Instant::now();
    for _ in 0..iters {
        s.write_all(&req).await.unwrap();
        s.read_exact(&mut resp).await.unwrap();
    }
    start.elapsed()
}

/// User + system CPU time of this process so far (`/proc/self/stat`, 100 ticks/s).
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    // Fields after the command name (which may hold spaces): utime is the 12th, stime the 13th.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .map(|v| v.parse().unwrap())
        .collect();
    Duration::from_millis((f[0] + f[1]) * 10)
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let ca = CertificateAuthority::new_root("cluster.local", Duration::from_secs(86400)).unwrap();
    let (client_cert, server_cert) = (cert(&ca, "client"), cert(&ca, "server"));
    let (hbone_addr, sink, echo, client) = rt.block_on(async {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let tls = Arc::new(mesh_identity::server_config(&server_cert).unwrap());
        tokio::spawn(async move {
            let settings = H2Settings::server();
            loop {
                let (tcp, _) = l.accept().await.unwrap();
                let (tls, settings) = (tls.clone(), settings.clone());
                tokio::spawn(async move {
                    let _ = serve_connection(
                        tcp,
                        tls,
                        Arc::new(Forward),
                        &settings,
                        CancellationToken::new(),
                    )
                    .await;
                });
            }
        });
        (
            addr,
            app(false).await,
            app(true).await,
            Client::new(TcpDialer, ClientSettings::default()),
        )
    });
    let key = PoolKey::new(
        client_cert.identity().clone(),
        vec![server_cert.identity().clone()],
        hbone_addr,
        None,
    );
    let chunk = vec![0xabu8; 1 << 20];

    let mut g = c.benchmark_group("hbone");
    g.sample_size(10).measurement_time(Duration::from_secs(10));
    g.throughput(Throughput::Bytes(PAYLOAD as u64));
    g.bench_function("single_stream_64MiB", |b| {
        b.to_async(&rt).iter(|| async {
            let mut est = client
                .connect(&key, &client_cert, &ConnectRequest::new(sink))
                .await
                .unwrap();
            for _ in 0..PAYLOAD / chunk.len() {
                est.tunnel.write_all(&chunk).await.unwrap();
            }
            est.tunnel.shutdown().await.unwrap();
            let mut ack = [0u8; 1];
            est.tunnel.read_exact(&mut ack).await.unwrap();
        })
    });
    g.finish();

    let mut g = c.benchmark_group("hbone");
    g.sample_size(20).measurement_time(Duration::from_secs(5));
    g.throughput(Throughput::Elements(1));
    g.bench_function("connect_stream_warm", |b| {
        b.to_async(&rt).iter(|| async {
            let mut est = client
                .connect(&key, &client_cert, &ConnectRequest::new(echo))
                .await
                .unwrap();
            est.tunnel.write_all(b"x").await.unwrap();
            let mut back = [0u8; 1];
            est.tunnel.read_exact(&mut back).await.unwrap();
        })
    });
    g.finish();

    let cert = Arc::new(client_cert.clone());
    let (mesh_sink, mesh_echo) = rt.block_on(async {
        (
            outbound(client.clone(), key.clone(), cert.clone(), sink).await,
            outbound(client.clone(), key.clone(), cert.clone(), echo).await,
        )
    });
    let mut g = c.benchmark_group("path");
    g.sample_size(10).measurement_time(Duration::from_secs(8));
    g.throughput(Throughput::Bytes(PAYLOAD as u64));
    for (name, addr) in [("direct_64MiB", sink), ("mesh_64MiB", mesh_sink)] {
        g.bench_function(name, |b| {
            b.to_async(&rt).iter(|| push_payload(addr, &chunk))
        });
    }
    g.throughput(Throughput::Elements(1));
    g.sample_size(20).measurement_time(Duration::from_secs(4));
    for (name, addr) in [("direct_rr_512B", echo), ("mesh_rr_512B", mesh_echo)] {
        g.bench_function(name, |b| {
            b.iter_custom(|iters| rt.block_on(round_trips(addr, 512, iters)))
        });
    }
    g.finish();

    // The same paths timed in CPU-seconds of the whole process (client, proxies and app
    // alike) rather than wall time: on a shared machine, waiting for a core inflates wall
    // time but not CPU time. mesh − direct is what the two copies, TLS and HTTP/2 cost.
    let mut g = c.benchmark_group("cpu");
    g.sample_size(10).measurement_time(Duration::from_secs(8));
    g.throughput(Throughput::Bytes(PAYLOAD as u64));
    for (name, addr) in [("direct_64MiB", sink), ("mesh_64MiB", mesh_sink)] {
        let chunk = &chunk;
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let start = cpu_time();
                    for _ in 0..iters {
                        push_payload(addr, chunk).await;
                    }
                    cpu_time() - start
                })
            })
        });
    }
    g.throughput(Throughput::Elements(1));
    g.sample_size(20).measurement_time(Duration::from_secs(4));
    for (name, addr) in [("direct_rr_512B", echo), ("mesh_rr_512B", mesh_echo)] {
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let start = cpu_time();
                    round_trips(addr, 512, iters).await;
                    cpu_time() - start
                })
            })
        });
    }
    g.finish();

    // Memory after the load above, and once the allocator has had time to give it back
    // (jemalloc returns dirty pages after about 10 s; glibc keeps its arenas).
    eprintln!("RSS after load: {} KiB", rss_kib());
    rt.block_on(async { tokio::time::sleep(Duration::from_secs(12)).await });
    eprintln!("RSS 12 s after load: {} KiB", rss_kib());
    assert_eq!(
        client.connections(),
        1,
        "the benchmark measured a warm, pooled connection"
    );
}

criterion_group!(benches, bench);
criterion_main!(benches);
