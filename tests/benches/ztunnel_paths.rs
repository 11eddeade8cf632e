//! Throughput and connections per second between two pods on two nodes, in one run:
//! direct (no mesh) and through two ztunnels (HBONE). `make bench-ztunnel` runs it on
//! release binaries; `cargo test` runs it in a quick smoke mode.

use mesh_e2e::cluster::{Cluster, Control, POD_B, base_config};
use mesh_e2e::net::{Netns, ns_run};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

struct Sizes {
    bytes: u64,
    conn_time: Duration,
    runs: usize,
}

/// Sink on :9000 (reads to EOF, answers the count) and echo on :9001.
fn servers(pod: &Netns) {
    let ns = pod.handle();
    let sink = ns
        .run(|| TcpListener::bind("0.0.0.0:9000"))
        .unwrap()
        .unwrap();
    let echo = ns
        .run(|| TcpListener::bind("0.0.0.0:9001"))
        .unwrap()
        .unwrap();
    std::thread::spawn(move || {
        for c in sink.incoming() {
            let Ok(mut s) = c else { return };
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 256 * 1024];
                let mut n = 0u64;
                while let Ok(k) = s.read(&mut buf) {
                    if k == 0 {
                        break;
                    }
                    n += k as u64;
                }
                let _ = s.write_all(&n.to_be_bytes());
            });
        }
    });
    std::thread::spawn(move || {
        for c in echo.incoming() {
            let Ok(mut s) = c else { return };
            std::thread::spawn(move || {
                let mut b = [0u8; 1];
                if s.read_exact(&mut b).is_ok() {
                    let _ = s.write_all(&b);
                }
            });
        }
    });
}

fn connect(client: &Netns, to: SocketAddr) -> TcpStream {
    let s = client
        .handle()
        .run(|| TcpStream::connect_timeout(&to, Duration::from_secs(5)))
        .unwrap()
        .unwrap();
    s.set_nodelay(true).unwrap();
    s
}

/// Gbit/s of one stream.
fn throughput(client: &Netns, bytes: u64) -> f64 {
    let mut s = connect(client, format!("{POD_B}:9000").parse().unwrap());
    let chunk = vec![0x5au8; 256 * 1024];
    let start = Instant::now();
    let mut sent = 0u64;
    while sent < bytes {
        s.write_all(&chunk).unwrap();
        sent += chunk.len() as u64;
    }
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut n = [0u8; 8];
    s.read_exact(&mut n).unwrap();
    assert_eq!(u64::from_be_bytes(n), sent);
    sent as f64 * 8.0 / start.elapsed().as_secs_f64() / 1e9
}

/// New connections per second (connect, 1-byte echo, close), sequentially, and how many
/// were made.
fn conn_rate(client: &Netns, time: Duration) -> (f64, u64) {
    let to: SocketAddr = format!("{POD_B}:9001").parse().unwrap();
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < time {
        let mut s = connect(client, to);
        s.write_all(b"x").unwrap();
        let mut b = [0u8; 1];
        s.read_exact(&mut b).unwrap();
        n += 1;
    }
    (n as f64 / start.elapsed().as_secs_f64(), n)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// The connections node 2's ztunnel counted as their destination
/// (`istio_tcp_connections_opened_total{reporter="destination"}`, summed over series).
fn destination_opened(metrics: &str) -> u64 {
    metrics
        .lines()
        .filter(|l| {
            l.starts_with("istio_tcp_connections_opened_total{")
                && l.contains("reporter=\"destination\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

fn measure(control: Control, sizes: &Sizes) -> (f64, f64) {
    let meshed = !matches!(control, Control::None);
    let c = Cluster::new(control);
    servers(&c.pod_b);
    // Warm up (certificates, pooled HBONE connection).
    let (_, mut made) = conn_rate(&c.pod_a, Duration::from_millis(200));
    let tput = median(
        (0..sizes.runs)
            .map(|_| throughput(&c.pod_a, sizes.bytes))
            .collect(),
    );
    made += sizes.runs as u64;
    let conns = median(
        (0..sizes.runs)
            .map(|_| {
                let (rate, n) = conn_rate(&c.pod_a, sizes.conn_time);
                made += n;
                rate
            })
            .collect(),
    );
    if meshed {
        // The mesh figure is the mesh's: node 2's ztunnel received every connection
        // (without the redirection they would go straight to pod B, uncounted).
        let counted = || {
            destination_opened(&ns_run(
                &c.node2.name,
                &["curl", "-sf", "http://127.0.0.1:15020/metrics"],
            ))
        };
        let mut seen = counted();
        for _ in 0..50 {
            if seen >= made {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
            seen = counted();
        }
        assert!(
            seen >= made,
            "node 2's ztunnel counted {seen} of the {made} connections made"
        );
    }
    (tput, conns)
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let sizes = if full {
        Sizes {
            bytes: 2 << 30,
            conn_time: Duration::from_secs(3),
            runs: 3,
        }
    } else {
        Sizes {
            bytes: 16 << 20,
            conn_time: Duration::from_millis(200),
            runs: 1,
        }
    };
    let direct = measure(Control::None, &sizes);
    let mesh = measure(Control::Local(base_config("  []", "")), &sizes);
    println!(
        "\nztunnel paths: pod A (node 1) → pod B (node 2), {} run(s), median",
        sizes.runs
    );
    println!(
        "{:<34} {:>14} {:>16}",
        "path", "Gbit/s (1 stream)", "connections/s"
    );
    println!(
        "{:<34} {:>14.2} {:>16.0}",
        "direct (no mesh)", direct.0, direct.1
    );
    println!(
        "{:<34} {:>14.2} {:>16.0}",
        "two ztunnels (HBONE, mTLS)", mesh.0, mesh.1
    );
    println!(
        "{:<34} {:>13.0}% {:>15.0}%",
        "mesh / direct",
        100.0 * mesh.0 / direct.0,
        100.0 * mesh.1 / direct.1
    );
}
