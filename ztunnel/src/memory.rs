//! Giving freed memory back to the system.
//!
//! glibc keeps what the proxy frees in per-thread arenas (and raises its trim threshold
//! after the first large buffer is freed), so after a burst of load the process stays
//! at its peak. `malloc_trim` hands every whole free page back; it is called when the
//! arenas hold enough free memory to matter, never more often than the check interval.

use std::time::Duration;

/// How often the arenas' free memory is read.
pub const CHECK_EVERY: Duration = Duration::from_secs(2);
/// Free memory in the arenas worth a trim.
pub const TRIM_AT: usize = 1 << 20;

/// Whether to trim: the arenas hold at least [`TRIM_AT`] free bytes.
pub fn should_trim(free_in_arenas: usize) -> bool {
    free_in_arenas >= TRIM_AT
}

/// Bytes free in glibc's arenas (`mallinfo2().fordblks`), `None` under another
/// allocator or libc.
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
    // allocator's locks; no pointer handed out by malloc is touched.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() {}

/// Trims glibc's arenas in the background while the runtime runs (nothing to do when
/// another allocator is linked in: it reports no arenas of glibc's).
pub fn spawn_trimmer() {
    tokio::spawn(async {
        let mut tick = tokio::time::interval(CHECK_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            match free_in_arenas() {
                Some(free) if should_trim(free) => trim(),
                Some(_) => {}
                None => return,
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_only_when_enough_is_free() {
        assert!(!should_trim(0));
        assert!(!should_trim(TRIM_AT - 1));
        assert!(should_trim(TRIM_AT));
    }
}
