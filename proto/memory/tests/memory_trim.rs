//! The trimmer gives memory freed after a burst back to the system (in a process of its
//! own: RSS is per process). Without it glibc keeps freed blocks in its arenas, and a
//! proxy stays at its peak after load.

use std::time::{Duration, Instant};

/// A bound only a broken trimmer reaches (not a speed assertion).
const NEVER: Duration = Duration::from_secs(60);

/// Anonymous memory only: file pages (the binary) may come and go under memory pressure.
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("RssAnon:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// 100,000 blocks of 500 bytes from a worker thread (its own arena); every hundredth is
/// kept, so what is freed lies in holes (~50 KB) between live blocks, where glibc never
/// trims by itself.
fn burst() -> Vec<Vec<u8>> {
    let all: Vec<Vec<u8>> = (0..100_000).map(|i| vec![i as u8; 500]).collect();
    all.into_iter().step_by(100).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_freed_after_a_burst_goes_back_to_the_system() {
    let before = rss_kib();
    let kept = tokio::spawn(async { burst() }).await.unwrap();
    let at_peak = rss_kib();
    assert!(
        at_peak > before + 30_000,
        "the burst was not seen: {before} → {at_peak} KiB"
    );
    // Started after the burst, so that the peak is read before any trim.
    mesh_memory::spawn_trimmer();
    let deadline = Instant::now() + NEVER;
    loop {
        let now = rss_kib();
        // Of the ~50 MB freed, at least 20 MB is back with the system.
        if now < at_peak - 20_000 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "RSS stayed at {now} KiB (before {before}, peak {at_peak})"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(kept.len(), 1_000);
}
