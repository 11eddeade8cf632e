//! (This file is not named `access`: the test's own lines would then have the access
//! target.)
//!
//! The access-log path against real writers: lines are routed by target, a reader that
//! never reads blocks nobody (lines are dropped and counted), and a backlog is written
//! in a few large writes rather than one per line.

use mesh_log::{ACCESS, ACCESS_BUFFER_BYTES, Format, layers};
use std::io::Write;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;
use tracing_subscriber::prelude::*;

/// A bound only a broken writer reaches (not a speed assertion).
const NEVER: Duration = Duration::from_secs(60);

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// Records what each write carried; every write waits until the gate opens.
#[derive(Clone, Default)]
struct Gated {
    writes: Arc<Mutex<Vec<Vec<u8>>>>,
    gate: Arc<(Mutex<bool>, Condvar)>,
}

impl Gated {
    fn open(&self) {
        *self.gate.0.lock().unwrap() = true;
        self.gate.1.notify_all();
    }
}

/// Opens the gate when dropped, so a failing test still ends (the writer thread is
/// joined when `Logging` is dropped, after this).
struct OpenOnDrop(Gated);

impl Drop for OpenOnDrop {
    fn drop(&mut self) {
        self.0.open();
    }
}

impl Write for Gated {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let (open, cv) = &*self.gate;
        let mut o = open.lock().unwrap();
        while !*o {
            o = cv.wait(o).unwrap();
        }
        self.writes.lock().unwrap().push(b.to_vec());
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Runs `f` on a thread of its own and waits for it, failing if it never ends.
fn finishes<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(NEVER)
        .expect("logging blocked the thread that logged")
}

fn wait_for(what: &str, f: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + NEVER;
    while !f() {
        assert!(std::time::Instant::now() < deadline, "never: {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn access_lines_go_through_the_queue_and_the_rest_straight_out() {
    let (now, access) = (Captured::default(), Captured::default());
    let n = now.clone();
    let (layers, logging) = layers(
        "info",
        Format::Text,
        false,
        move || n.clone(),
        access.clone(),
    )
    .unwrap();
    tracing::subscriber::with_default(tracing_subscriber::registry().with(layers), || {
        tracing::info!("starting");
        tracing::info!(target: ACCESS, bytes = 5, "connection complete");
        tracing::debug!("not at info");
        // Written before the call returns: a line right before an exit is never lost.
        assert!(now.text().contains("starting"), "{}", now.text());
        (logging.reload())("debug").unwrap();
        tracing::debug!("now at debug");
        assert!((logging.reload())("not a [level").is_err());
    });
    wait_for("the access line written", || {
        access.text().contains("connection complete bytes=5")
    });
    let now = now.text();
    assert!(!now.contains("connection complete"), "{now}");
    assert!(!now.contains("not at info"), "{now}");
    assert!(now.contains("now at debug"), "{now}");
    assert!(!access.text().contains("starting"));
    assert_eq!(logging.dropped_access_lines(), 0);
}

#[test]
fn json_lines_flatten_the_fields() {
    let access = Captured::default();
    let (layers, _logging) =
        layers("info", Format::Json, false, std::io::sink, access.clone()).unwrap();
    tracing::subscriber::with_default(tracing_subscriber::registry().with(layers), || {
        tracing::info!(target: ACCESS, direction = "inbound", "connection complete");
    });
    wait_for("the access line written", || access.text().ends_with('\n'));
    let v: serde_json::Value = serde_json::from_str(access.text().trim()).unwrap();
    assert_eq!(v["direction"], "inbound");
    assert_eq!(v["message"], "connection complete");
    assert_eq!(v["target"], ACCESS);
}

#[test]
fn a_reader_that_never_reads_blocks_nobody_and_drops_are_counted() {
    // The gate never opens: the log's reader is gone for good.
    let stuck = Gated::default();
    let (layers, logging) =
        layers("info", Format::Text, false, std::io::sink, stuck.clone()).unwrap();
    // Opened when the test ends, pass or fail, before `logging` joins the writer.
    let _unstick = OpenOnDrop(stuck.clone());
    // Each line is well over 30 bytes: the buffer, and the batch the writer took before
    // it got stuck, hold fewer than 2 * ACCESS_BUFFER_BYTES / 30 lines.
    let lines = 200_000;
    let sub = tracing_subscriber::registry().with(layers);
    finishes(move || {
        tracing::subscriber::with_default(sub, || {
            for i in 0..lines {
                tracing::info!(target: ACCESS, i, "connection complete");
            }
        })
    });
    let dropped = logging.dropped_access_lines();
    let kept_at_most = (2 * ACCESS_BUFFER_BYTES / 30) as u64;
    assert!(
        dropped >= lines - kept_at_most,
        "{dropped} of {lines} lines dropped"
    );
}

#[test]
fn a_backlog_is_written_in_a_few_large_writes() {
    let slow = Gated::default();
    let (layers, logging) =
        layers("info", Format::Text, false, std::io::sink, slow.clone()).unwrap();
    // Opened when the test ends, pass or fail, before `logging` joins the writer.
    let _unstick = OpenOnDrop(slow.clone());
    let lines = 1000;
    tracing::subscriber::with_default(tracing_subscriber::registry().with(layers), || {
        for i in 0..lines {
            tracing::info!(target: ACCESS, i, "connection complete");
        }
    });
    // The writer was held the whole time; once it moves, the backlog goes out in batches.
    slow.open();
    let written_lines = || {
        let w = slow.writes.lock().unwrap();
        w.iter().flatten().filter(|&&b| b == b'\n').count()
    };
    wait_for("every line written", || written_lines() == lines);
    let writes = slow.writes.lock().unwrap().len();
    assert!(writes <= 10, "{lines} lines in {writes} writes");
    assert_eq!(logging.dropped_access_lines(), 0);
}
