//! `/debug/pprof/profile?seconds=N` (a CPU profile, pprof protobuf as `go tool pprof`
//! and speedscope read it) and `/debug/pprof/heap` (whatever the allocator can tell).
//!
//! CPU profiles sample the whole process with `SIGPROF` at [`FREQUENCY`] Hz; one runs at
//! a time and lasts at most [`MAX_SECONDS`].

use crate::routes::{Response, Routes};
use http::StatusCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// Samples per second (not a multiple of common timer rates, as Go's 100 Hz avoids
/// lock-step with periodic work).
pub const FREQUENCY: i32 = 99;
pub const DEFAULT_SECONDS: u64 = 10;
pub const MAX_SECONDS: u64 = 60;

/// The profile's protobuf types, to read one back.
pub use pprof::protos::{Message, Profile};

/// Why no CPU profile was taken.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProfileError {
    #[error("seconds must be a whole number from 1 to {MAX_SECONDS}, not {0:?}")]
    BadSeconds(String),
    #[error("another CPU profile is being taken; try again when it ends")]
    Busy,
    #[error("the profiler failed: {0}")]
    Profiler(String),
}

impl ProfileError {
    fn status(&self) -> StatusCode {
        match self {
            ProfileError::BadSeconds(_) => StatusCode::BAD_REQUEST,
            ProfileError::Busy => StatusCode::TOO_MANY_REQUESTS,
            ProfileError::Profiler(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// How long a profile lasts, from the `seconds` query parameter.
pub fn parse_seconds(param: Option<&str>) -> Result<Duration, ProfileError> {
    let Some(s) = param else {
        return Ok(Duration::from_secs(DEFAULT_SECONDS));
    };
    match s.parse::<u64>() {
        Ok(n) if (1..=MAX_SECONDS).contains(&n) => Ok(Duration::from_secs(n)),
        _ => Err(ProfileError::BadSeconds(s.to_string())),
    }
}

/// At most one profile at a time, process-wide (the profiler is a process-wide signal
/// handler).
static RUNNING: AtomicBool = AtomicBool::new(false);

struct Slot;

impl Slot {
    fn take() -> Result<Slot, ProfileError> {
        RUNNING
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .map(|_| Slot)
            .map_err(|_| ProfileError::Busy)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        RUNNING.store(false, Ordering::Release);
    }
}

/// Samples the process for `length`; the profile, pprof-encoded (protobuf, not gzipped).
pub async fn cpu_profile(length: Duration) -> Result<Vec<u8>, ProfileError> {
    let slot = Slot::take()?;
    // The guard stays on one thread; sampling covers every thread of the process.
    tokio::task::spawn_blocking(move || {
        let _slot = slot;
        let guard = pprof::ProfilerGuardBuilder::default()
            .frequency(FREQUENCY)
            .blocklist(&["libc", "libgcc", "pthread", "vdso"])
            .build()
            .map_err(|e| ProfileError::Profiler(e.to_string()))?;
        std::thread::sleep(length);
        let report = guard
            .report()
            .build()
            .map_err(|e| ProfileError::Profiler(e.to_string()))?;
        let profile = report
            .pprof()
            .map_err(|e| ProfileError::Profiler(e.to_string()))?;
        Ok(pprof::protos::Message::encode_to_vec(&profile))
    })
    .await
    .map_err(|e| ProfileError::Profiler(e.to_string()))?
}

/// A heap profile from the allocator, where it records them (jemalloc with `prof`):
/// the response `/debug/pprof/heap` sends. Connect one with [`set_heap_profile`].
pub type HeapProfile = Arc<dyn Fn() -> Response + Send + Sync>;

static HEAP: OnceLock<HeapProfile> = OnceLock::new();

/// Connects the allocator's heap profile (once per process, next to the
/// `#[global_allocator]` that records it). False if one was connected already.
pub fn set_heap_profile(h: HeapProfile) -> bool {
    HEAP.set(h).is_ok()
}

/// What `/debug/pprof/heap` answers without a heap profiler: the process's memory as
/// the kernel counts it (`/proc/self/status`), and why there is no profile.
pub fn heap_unavailable(status: &str) -> Response {
    let mut body = String::from(
        "no heap profile: this build uses the system allocator (glibc malloc), which records no allocation sites.\nProcess memory (/proc/self/status):\n",
    );
    for line in status.lines() {
        if ["VmRSS:", "VmHWM:", "VmData:", "RssAnon:", "VmSize:"]
            .iter()
            .any(|k| line.starts_with(k))
        {
            body.push_str(line);
            body.push('\n');
        }
    }
    Response::text(StatusCode::NOT_IMPLEMENTED, body)
}

/// Adds `/debug/pprof/profile` and `/debug/pprof/heap` to `routes`.
pub fn routes(routes: Routes) -> Routes {
    routes
        .get("/debug/pprof/profile", |req| async move {
            let result = match parse_seconds(req.param("seconds").as_deref()) {
                Ok(length) => cpu_profile(length).await,
                Err(e) => Err(e),
            };
            match result {
                Ok(bytes) => Response::new(StatusCode::OK, "application/octet-stream", bytes)
                    .with_header("content-disposition", "attachment; filename=\"profile.pb\""),
                Err(e) => Response::text(e.status(), format!("{e}\n")),
            }
        })
        .get("/debug/pprof/heap", |_| {
            let r = match HEAP.get() {
                Some(h) => h(),
                None => heap_unavailable(
                    &std::fs::read_to_string("/proc/self/status").unwrap_or_default(),
                ),
            };
            std::future::ready(r)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_are_bounded() {
        assert_eq!(
            parse_seconds(None),
            Ok(Duration::from_secs(DEFAULT_SECONDS))
        );
        assert_eq!(parse_seconds(Some("1")), Ok(Duration::from_secs(1)));
        assert_eq!(parse_seconds(Some("60")), Ok(Duration::from_secs(60)));
        for bad in ["0", "61", "-1", "1.5", "", "ten", "99999999999999999999"] {
            assert_eq!(
                parse_seconds(Some(bad)),
                Err(ProfileError::BadSeconds(bad.into())),
                "{bad}"
            );
        }
    }

    #[test]
    fn heap_without_a_profiler_says_why_and_shows_memory() {
        let r =
            heap_unavailable("Name:\tztunnel\nVmSize:\t 100 kB\nVmRSS:\t  50 kB\nThreads:\t4\n");
        assert_eq!(r.status, StatusCode::NOT_IMPLEMENTED);
        let body = String::from_utf8(r.body.to_vec()).unwrap();
        assert!(
            body.starts_with("no heap profile: this build uses the system allocator"),
            "{body}"
        );
        assert!(
            body.ends_with("VmSize:\t 100 kB\nVmRSS:\t  50 kB\n"),
            "{body}"
        );
        assert!(!body.contains("Threads"), "{body}");
    }
}
