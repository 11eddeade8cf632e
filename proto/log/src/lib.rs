//! Logging, set up once for every program.
//!
//! Lines of target `access` (one per connection in ztunnel, one per request in the
//! waypoint) are the only ones written on the data path. They are appended to a buffer
//! in memory, and a thread of their own writes the buffer out in one system call a few
//! milliseconds after its first line: a burst costs one write and one wake-up per batch
//! instead of one write per line, a slow reader of the log (a full pipe, a stalled disk)
//! never blocks a proxy thread, and an idle process never wakes. Past
//! [`ACCESS_BUFFER_BYTES`] lines are dropped and counted
//! ([`Logging::dropped_access_lines`]), and the count is reported in the log itself.
//! Every other line (start-up, errors before an exit) is written at once, as before, so
//! nothing said right before an exit is lost.

#![forbid(unsafe_code)]

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::fmt::writer::MakeWriterExt;
use tracing_subscriber::prelude::*;
use tracing_subscriber::{EnvFilter, Layer, Registry, reload};

/// The target of access-log lines.
pub const ACCESS: &str = "access";
/// Access lines held while the writer catches up; lines past it are dropped.
pub const ACCESS_BUFFER_BYTES: usize = 1 << 20;
/// How long the writer gathers a batch after its first line.
pub const ACCESS_FLUSH_DELAY: Duration = Duration::from_millis(20);
/// A buffer grown past this by a burst is given back once written.
const ACCESS_BUFFER_KEPT: usize = 64 * 1024;

/// How lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Text,
    /// One JSON object per line, the event's fields flattened into it.
    Json,
}

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("invalid log level {level:?}: {reason}")]
    Level { level: String, reason: String },
    #[error("the log level cannot be changed: {0}")]
    Reload(String),
    #[error("cannot start the access-log writer thread: {0}")]
    Writer(std::io::Error),
}

/// Changes the level filter of a running process (`RUST_LOG` syntax).
pub type Reload = Arc<dyn Fn(&str) -> Result<(), LogError> + Send + Sync>;

/// What [`init`] set up; keep it for the life of the process.
pub struct Logging {
    reload: Reload,
    access: Arc<AccessBuffer>,
    writer: Option<std::thread::JoinHandle<()>>,
}

/// Writes out what is buffered before the process ends normally.
impl Drop for Logging {
    fn drop(&mut self) {
        self.access.closed.store(true, Ordering::Release);
        self.access.wake.notify_one();
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}

impl Logging {
    /// Changes the level filter (`RUST_LOG` syntax) while running.
    pub fn reload(&self) -> Reload {
        self.reload.clone()
    }

    /// Access lines dropped so far because the log's reader fell behind.
    pub fn dropped_access_lines(&self) -> u64 {
        self.access.dropped.load(Ordering::Relaxed)
    }
}

/// Parses a level filter (`RUST_LOG` syntax), so a bad one is refused at start.
pub fn filter(level: &str) -> Result<EnvFilter, LogError> {
    EnvFilter::try_new(level).map_err(|e| LogError::Level {
        level: level.to_string(),
        reason: e.to_string(),
    })
}

/// How often dropped access lines are reported.
const DROP_REPORT_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// Sets up this process's logging to standard output; dropped access lines are
/// reported as a warning every 10 s while they are being dropped.
pub fn init(level: &str, format: Format) -> Result<Logging, LogError> {
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let (layers, logging) = layers(level, format, ansi, std::io::stdout, std::io::stdout())?;
    tracing_subscriber::registry().with(layers).init();
    let access = logging.access.clone();
    let _ = std::thread::Builder::new()
        .name("access-log-drops".into())
        .spawn(move || {
            let mut reported = 0;
            loop {
                std::thread::sleep(DROP_REPORT_EVERY);
                let now = access.dropped.load(Ordering::Relaxed);
                if let Some(n) = newly_dropped(reported, now) {
                    tracing::warn!(
                        dropped = n,
                        total = now,
                        "access-log lines dropped: whatever reads this log is not keeping up"
                    );
                }
                reported = now;
            }
        });
    Ok(logging)
}

/// [`init`], or the process ends with status 2 and says why (`program: …` on stderr):
/// a level filter that cannot be understood is refused at start, never replaced.
pub fn init_or_exit(program: &str, level: &str, format: Format) -> Logging {
    init(level, format).unwrap_or_else(|e| {
        eprintln!("{program}: {e}");
        std::process::exit(2)
    })
}

/// Lines dropped since the last report, if any.
pub fn newly_dropped(reported: u64, now: u64) -> Option<u64> {
    (now > reported).then(|| now - reported)
}

type Boxed = Box<dyn Layer<Registry> + Send + Sync>;

/// The layers [`init`] installs, writing other lines to `now` and access lines to
/// `access` (through the queue). Public for tests that install them on a subscriber of
/// their own.
pub fn layers<N, A>(
    level: &str,
    format: Format,
    ansi: bool,
    now: N,
    access: A,
) -> Result<(Boxed, Logging), LogError>
where
    N: for<'w> MakeWriter<'w> + Send + Sync + 'static,
    A: Write + Send + 'static,
{
    let (level_filter, handle) = reload::Layer::new(filter(level)?);
    let buffer = Arc::new(AccessBuffer::default());
    let queued = AccessWriter(buffer.clone());
    let out = buffer.clone();
    let writer = std::thread::Builder::new()
        .name("access-log".into())
        .spawn(move || write_batches(&out, access))
        .map_err(LogError::Writer)?;
    // One formatting layer whose writer is chosen per line by target: no per-layer
    // filters, so disabled callsites (h2's and hyper's trace lines) stay disabled at no
    // cost, as with a single layer.
    let by_target = queued
        .with_filter(|m: &tracing::Metadata<'_>| m.target() == ACCESS)
        .or_else(now);
    let layers = level_filter
        .and_then(fmt_layer(format, ansi, by_target))
        .boxed();
    let reload: Reload = Arc::new(move |level: &str| {
        handle
            .reload(filter(level)?)
            .map_err(|e| LogError::Reload(e.to_string()))
    });
    Ok((
        layers,
        Logging {
            reload,
            access: buffer,
            writer: Some(writer),
        },
    ))
}

/// Access lines waiting for the writer thread.
#[derive(Default)]
struct AccessBuffer {
    lines: Mutex<Vec<u8>>,
    /// Signalled by the first line of a batch, and at close.
    wake: Condvar,
    dropped: AtomicU64,
    closed: AtomicBool,
}

impl AccessBuffer {
    fn lock(&self) -> MutexGuard<'_, Vec<u8>> {
        self.lines.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Where the access layer writes: each event is one `write_all` of one whole line
/// (tracing's formatter writes an event at once), appended whole or dropped whole.
#[derive(Clone)]
struct AccessWriter(Arc<AccessBuffer>);

impl<'a> MakeWriter<'a> for AccessWriter {
    type Writer = AccessLine<'a>;
    fn make_writer(&'a self) -> Self::Writer {
        AccessLine(&self.0)
    }
}

struct AccessLine<'a>(&'a AccessBuffer);

impl Write for AccessLine<'_> {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        let mut lines = self.0.lock();
        if lines.len() + line.len() > ACCESS_BUFFER_BYTES {
            drop(lines);
            self.0.dropped.fetch_add(1, Ordering::Relaxed);
        } else {
            let first = lines.is_empty();
            lines.extend_from_slice(line);
            drop(lines);
            if first {
                self.0.wake.notify_one();
            }
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The writer thread: waits for a first line, lets the batch gather, writes it at once.
fn write_batches(buffer: &AccessBuffer, mut out: impl Write) {
    let mut batch = Vec::new();
    loop {
        let mut lines = buffer.lock();
        while lines.is_empty() && !buffer.closed.load(Ordering::Acquire) {
            lines = buffer.wake.wait(lines).unwrap_or_else(|e| e.into_inner());
        }
        if lines.is_empty() {
            return; // closed, and everything written
        }
        if !buffer.closed.load(Ordering::Acquire) {
            drop(lines);
            std::thread::sleep(ACCESS_FLUSH_DELAY);
            lines = buffer.lock();
        }
        std::mem::swap(&mut *lines, &mut batch);
        drop(lines);
        // A write error (a closed stdout) loses this batch, never the process.
        let _ = out.write_all(&batch).and_then(|()| out.flush());
        batch.clear();
        if batch.capacity() > ACCESS_BUFFER_KEPT {
            batch = Vec::new();
        }
    }
}

fn fmt_layer<W>(format: Format, ansi: bool, writer: W) -> Boxed
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let l = tracing_subscriber::fmt::layer()
        .with_ansi(ansi)
        .with_writer(writer);
    match format {
        Format::Text => l.boxed(),
        Format::Json => l.json().flatten_event(true).boxed(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_new_drops_are_reported() {
        assert_eq!(newly_dropped(0, 0), None);
        assert_eq!(newly_dropped(5, 5), None);
        assert_eq!(newly_dropped(5, 12), Some(7));
    }

    #[test]
    fn a_bad_level_is_refused_with_what_was_given() {
        let e = filter("info,[").unwrap_err().to_string();
        assert!(e.starts_with("invalid log level \"info,[\""), "{e}");
    }
}
