//! Peer-controlled data never becomes state without a bound: a mesh workload (it holds a
//! valid certificate) floods a pod's ztunnel with HBONE CONNECTs, each naming a random
//! 2 KB service in `forwarded: host=`. ztunnel's /metrics (size and number of series) and
//! its memory stay flat; only a service the destination really backs is ever reported.
//! Real binaries on two simulated nodes; needs root (CI runs as root).

use hbone::{ClientSettings, ConnectRequest, Forwarded, PoolKey};
use mesh_e2e::cluster::*;
use mesh_e2e::net::Netns;
use mesh_identity::ca::CertificateAuthority;
use mesh_identity::{SpiffeId, WorkloadCertificate, generate_csr};
use rand::Rng;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SERVICE: &str = "api.back.svc.cluster.local";

fn config() -> String {
    format!(
        r#"
workloads:
  - name: client
    namespace: front
    serviceAccount: web
    addresses: ["{POD_A}"]
    node: node-1
    protocol: HBONE
  - name: server
    namespace: back
    serviceAccount: api
    addresses: ["{POD_B}"]
    node: node-2
    protocol: HBONE
    services:
      back/{SERVICE}: [{{servicePort: 80, targetPort: 8080}}]
services:
  - name: api
    namespace: back
    hostname: {SERVICE}
    addresses: ["10.96.0.20"]
    ports: [{{servicePort: 80, targetPort: 8080}}]
  - name: other
    namespace: back
    hostname: other.back.svc.cluster.local
    addresses: ["10.96.0.21"]
    ports: [{{servicePort: 80, targetPort: 8080}}]
policies: []
"#
    )
}

/// GET /metrics from ztunnel `node`'s metrics port.
fn metrics(node: &Netns) -> String {
    let mut s = node
        .handle()
        .run(|| {
            TcpStream::connect_timeout(&"127.0.0.1:15020".parse().unwrap(), Duration::from_secs(5))
        })
        .unwrap()
        .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (_, body) = out.split_once("\r\n\r\n").expect("an HTTP answer");
    body.to_string()
}

fn series(body: &str) -> usize {
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .count()
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn random_host(rng: &mut impl Rng) -> String {
    const CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789.-";
    (0..2048)
        .map(|_| CHARS[rng.random_range(0..CHARS.len())] as char)
        .collect()
}

struct Attacker {
    client: hbone::Client<ztunnel::proxy::socket::NetnsDialer>,
    cert: WorkloadCertificate,
    key: PoolKey,
}

impl Attacker {
    /// A workload of the mesh, on node 1, with front/web's certificate.
    fn new(c: &Cluster) -> Self {
        let dir = c.dir.join("ca");
        let pem = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap();
        let ca = CertificateAuthority::load(
            "cluster.local",
            &pem("ca-cert.pem"),
            &pem("ca-key.pem"),
            None,
            &pem("ca-cert.pem"),
        )
        .unwrap();
        let me = SpiffeId::new("cluster.local", "front", "web").unwrap();
        let csr = generate_csr(&me).unwrap();
        let chain = ca
            .sign_csr(&csr.csr_pem, &me, Duration::from_secs(3600))
            .unwrap();
        let cert = WorkloadCertificate::from_ca_response(&me, &csr.key, &chain).unwrap();
        let server = SpiffeId::new("cluster.local", "back", "api").unwrap();
        let dst: SocketAddr = format!("{POD_B}:15008").parse().unwrap();
        Attacker {
            client: hbone::Client::new(
                ztunnel::proxy::socket::NetnsDialer {
                    netns: c.node1.handle(),
                },
                ClientSettings::default(),
            ),
            cert,
            key: PoolKey::new(me, vec![server], dst, None),
        }
    }

    /// One CONNECT to the app behind POD_B, claiming `host`; waits for the app's greeting.
    async fn connect(&self, host: &str) {
        let mut req = ConnectRequest::new(format!("{POD_B}:8080").parse::<SocketAddr>().unwrap());
        req.forwarded = Forwarded {
            for_addr: Some("10.200.0.1:40000".parse().unwrap()),
            host: Some(host.to_string()),
        };
        let mut est = self
            .client
            .connect(&self.key, &self.cert, &req)
            .await
            .expect("CONNECT accepted");
        let mut greeting = [0u8; 8];
        est.tunnel.read_exact(&mut greeting).await.unwrap();
        assert_eq!(&greeting, b"server-b");
        est.tunnel.shutdown().await.unwrap();
    }
}

#[test]
fn random_forwarded_hosts_leave_metrics_and_memory_flat() {
    let c = Cluster::new(Control::Local(config()));
    let _server = echo_server(&c.pod_b, "0.0.0.0:8080", "server-b");
    let pid = c.ztunnels[1].as_ref().unwrap().pid();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let attacker = rt.block_on(async { Attacker::new(&c) });
    let mut rng = rand::rng();

    // Warm up every code path (and every label set a legitimate peer can cause): the real
    // service, a real service the destination does not back, and random names.
    rt.block_on(async {
        for _ in 0..5 {
            attacker.connect(SERVICE).await;
            attacker.connect("other.back.svc.cluster.local").await;
            attacker.connect(&random_host(&mut rng)).await;
        }
    });
    let before = metrics(&c.node2);
    let rss_before = rss_kib(pid);

    let hosts: Vec<String> = (0..1000).map(|_| random_host(&mut rng)).collect();
    rt.block_on(async {
        for h in &hosts {
            attacker.connect(h).await;
        }
    });
    let after = metrics(&c.node2);
    let rss_after = rss_kib(pid);

    eprintln!(
        "/metrics: {} series, {} bytes -> {} series, {} bytes; RSS {rss_before} -> {rss_after} KiB",
        series(&before),
        before.len(),
        series(&after),
        after.len()
    );
    // The same series, only counters moved (a few more digits at most).
    assert_eq!(series(&after), series(&before), "new series:\n{after}");
    assert!(
        after.len().abs_diff(before.len()) < 1024,
        "/metrics went from {} to {} bytes",
        before.len(),
        after.len()
    );
    for h in hosts.iter().take(50) {
        assert!(!after.contains(&h[..64]), "a peer's host became a label");
    }
    // A host that names one of the destination's own services is reported as that
    // service; one it does not back (or that does not exist) is not.
    assert!(
        after.contains(&format!("destination_service=\"{SERVICE}\"")),
        "{after}"
    );
    assert!(
        after.contains("destination_service_name=\"api\""),
        "{after}"
    );
    assert!(!after.contains("other.back.svc.cluster.local"), "{after}");
    // 1000 connections of 2 KB names: kept as labels, they would take tens of MiB.
    let grown = rss_after.saturating_sub(rss_before);
    assert!(grown < 4096, "ztunnel's RSS grew by {grown} KiB");
    drop(attacker);
}
