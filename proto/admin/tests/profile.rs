//! CPU profiles over real loopback HTTP: the answer decodes as a pprof profile with
//! samples of the work that ran meanwhile; one profile at a time.
#![cfg(feature = "profiles")]

use mesh_admin::{Limits, Routes};
use pprof::protos::Message;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn get(addr: SocketAddr, path: &str) -> (String, Vec<u8>) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), s.read_to_end(&mut out))
        .await
        .expect("the profile comes")
        .unwrap();
    let at = out.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    (
        String::from_utf8_lossy(&out[..at]).into_owned(),
        out[at + 4..].to_vec(),
    )
}

#[inline(never)]
fn spin(stop: &AtomicBool) -> u64 {
    let mut x = 1u64;
    while !stop.load(Ordering::Relaxed) {
        for i in 0..10_000u64 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(i);
        }
    }
    x
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cpu_profile_decodes_and_holds_samples() {
    let l = mesh_admin::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let addr = l.local_addr().unwrap();
    mesh_admin::spawn(
        l,
        mesh_admin::profile::routes(Routes::new()),
        Limits::default(),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let s2 = stop.clone();
    let worker = std::thread::spawn(move || spin(&s2));

    // Two at once: one is taken, the other refused while it runs.
    let (one, two) = tokio::join!(
        get(addr, "/debug/pprof/profile?seconds=3"),
        get(addr, "/debug/pprof/profile?seconds=3")
    );
    stop.store(true, Ordering::Relaxed);
    worker.join().unwrap();
    let (taken, refused) = if one.0.starts_with("HTTP/1.1 200 ") {
        (one, two)
    } else {
        (two, one)
    };
    assert!(refused.0.starts_with("HTTP/1.1 429 "), "{}", refused.0);
    let busy = String::from_utf8(refused.1).unwrap();
    assert!(busy.contains("another CPU profile"), "{busy}");
    let (head, body) = taken;
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(head.contains("application/octet-stream"), "{head}");
    let profile = pprof::protos::Profile::decode(&body[..]).expect("a pprof protobuf");
    assert!(
        !profile.sample.is_empty(),
        "no samples in {} bytes",
        body.len()
    );
    let names: Vec<&str> = profile
        .function
        .iter()
        .map(|f| profile.string_table[f.name as usize].as_str())
        .collect();
    assert!(names.iter().any(|n| n.contains("spin")), "{names:?}");

    let (head, body) = get(addr, "/debug/pprof/profile?seconds=600").await;
    assert!(head.starts_with("HTTP/1.1 400 "), "{head}");
    assert!(String::from_utf8_lossy(&body).contains("from 1 to 60"));
    let (head, _) = get(addr, "/debug/pprof/heap").await;
    assert!(head.starts_with("HTTP/1.1 501 "), "{head}");
}
