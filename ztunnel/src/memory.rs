//! Giving freed memory back to the system.
//!
//! glibc keeps what the proxy frees in per-thread arenas (and raises its trim threshold
//! after the first large buffer is freed), so after a burst of load the process stays
//! at its peak. `malloc_trim` hands every whole free page back. It runs on a thread of
//! its own (never on a proxy thread), and only when the arenas' free memory has grown by
//! [`TRIM_AT`] since the last trim: the free blocks stay counted after a trim, so without
//! that rule a fragmented heap would be trimmed again every few seconds for nothing.

use std::time::Duration;

/// How often the arenas' free memory is read.
pub const CHECK_EVERY: Duration = Duration::from_secs(2);
/// Growth of the arenas' free memory worth a trim.
pub const TRIM_AT: usize = 1 << 20;

/// What the trimmer knows between checks: the arenas' free memory just after the last
/// trim, lowered whenever less is free (the memory was reused, and may be freed again).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Trimmer {
    pub free_after_trim: usize,
}

impl Trimmer {
    /// Whether to trim now that `free` bytes are free in the arenas.
    pub fn should_trim(&mut self, free: usize) -> bool {
        self.free_after_trim = self.free_after_trim.min(free);
        free >= self.free_after_trim + TRIM_AT
    }

    /// After a trim: `free` bytes are still counted free in the arenas.
    pub fn trimmed(&mut self, free: usize) {
        self.free_after_trim = free;
    }
}

/// Bytes free in glibc's arenas (`mallinfo2().fordblks`), `None` under another libc.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn free_in_arenas() -> Option<usize> {
    // SAFETY: mallinfo2 takes no arguments and returns a plain struct by value; it only
    // reads the allocator's own bookkeeping under its locks.
    let info = unsafe { libc::mallinfo2() };
    Some(info.fordblks)
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn free_in_arenas() -> Option<usize> {
    None
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn trim() {
    // SAFETY: malloc_trim(0) only returns free pages to the kernel (madvise) under the
    // allocator's locks; no block handed out by malloc is touched.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() {}

/// Starts the trimmer thread (for the life of the process).
pub fn spawn_trimmer() {
    let run = || {
        let mut t = Trimmer::default();
        while let Some(free) = free_in_arenas() {
            if t.should_trim(free) {
                trim();
                t.trimmed(free_in_arenas().unwrap_or(0));
            }
            std::thread::sleep(CHECK_EVERY);
        }
    };
    if let Err(e) = std::thread::Builder::new()
        .name("memory-trim".into())
        .spawn(run)
    {
        tracing::warn!(error = %e, "cannot start the memory trimmer; freed memory stays with the process");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_when_enough_was_freed_since_the_last_trim() {
        let mut t = Trimmer::default();
        assert!(!t.should_trim(TRIM_AT - 1));
        assert!(t.should_trim(TRIM_AT));
        t.trimmed(3 * TRIM_AT);
        // Freed blocks stay counted after a trim: the same figure is no reason to trim.
        assert!(!t.should_trim(3 * TRIM_AT));
        assert!(!t.should_trim(4 * TRIM_AT - 1));
        assert!(t.should_trim(4 * TRIM_AT));
    }

    #[test]
    fn memory_reused_then_freed_again_is_trimmed_again() {
        let mut t = Trimmer::default();
        t.trimmed(3 * TRIM_AT);
        assert!(!t.should_trim(TRIM_AT / 2)); // reused
        assert!(t.should_trim(2 * TRIM_AT)); // freed again: 1.5 MiB more than the low
    }
}
