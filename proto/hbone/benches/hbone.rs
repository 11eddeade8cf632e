//! HBONE over loopback: single-stream throughput, and CONNECT streams per second on a
//! warm (pooled) connection. Real TLS 1.3, real HTTP/2, real TCP apps.

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
    assert_eq!(
        client.connections(),
        1,
        "the benchmark measured a warm, pooled connection"
    );
}

criterion_group!(benches, bench);
criterion_main!(benches);
