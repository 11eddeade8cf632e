//! Giving freed memory back to the system, in ztunnel and the waypoint.
//!
//! glibc keeps what a proxy frees in per-thread arenas (and raises its trim threshold
//! after the first large buffer is freed), so after a burst of load the process stays
//! at its peak. `malloc_trim` hands every whole free page back. It runs on a thread of
//! its own (never on a proxy thread), and only when the memory the process holds resident
//! but malloc counts free has grown by [`TRIM_AT`] since the last trim: what a trim cannot
//! return (free pieces of pages in use) is the new level, so a fragmented heap is not
//! trimmed again and again for nothing. While the process is busy it trims only when much
//! more is free ([`TRIM_BUSY_AT`]): under load the freed memory is soon used again, and a
//! trim would only make it fault back in (and hold the arenas' locks meanwhile); once the
//! load is over, the next check returns it. Resident, not free, is what counts: after a trim
//! the returned blocks stay counted free, and load that reuses and frees them again
//! leaves that count where it was while their pages are resident again (a first rule on
//! the free count alone missed exactly that: 6.7 MiB kept 10 s after load).

#![deny(unsafe_code)]

use std::time::Duration;

/// How often the process's memory is read.
pub const CHECK_EVERY: Duration = Duration::from_secs(2);
/// Growth of resident free memory worth a trim, when the process is quiet.
pub const TRIM_AT: usize = 1 << 20;
/// Growth of resident free memory worth a trim while the process is busy.
pub const TRIM_BUSY_AT: usize = 16 << 20;
/// CPU time used over one [`CHECK_EVERY`] from which the process counts as busy (5% of a
/// core).
pub const BUSY_CPU: Duration = Duration::from_millis(100);

/// What the trimmer knows between checks: the resident free memory just after the last
/// trim, lowered whenever less is resident and free (the memory was reused, and may be
/// freed again).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Trimmer {
    pub level_after_trim: usize,
}

impl Trimmer {
    /// Whether to trim now that `resident_free` bytes are resident but free, the process
    /// having used `cpu` since the last check.
    pub fn should_trim(&mut self, resident_free: usize, cpu: Duration) -> bool {
        self.level_after_trim = self.level_after_trim.min(resident_free);
        let at = if cpu >= BUSY_CPU {
            TRIM_BUSY_AT
        } else {
            TRIM_AT
        };
        resident_free >= self.level_after_trim + at
    }

    /// After a trim: `resident_free` bytes are still resident and free (pieces of pages
    /// in use, thread stacks, and the like).
    pub fn trimmed(&mut self, resident_free: usize) {
        self.level_after_trim = resident_free;
    }
}

/// Resident memory beyond what malloc has handed out: anonymous resident pages (from
/// `/proc/self/statm`: resident less file-backed) less malloc's blocks in use
/// (`mallinfo2`: in the arenas and mapped on their own). `None` under another libc.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
pub fn resident_free() -> Option<usize> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let anon = resident_anon(&statm)?;
    // SAFETY: mallinfo2 takes no arguments and returns a plain struct by value; it only
    // reads the allocator's own bookkeeping under its locks.
    let info = unsafe { libc::mallinfo2() };
    Some(anon.saturating_sub(info.uordblks + info.hblkhd))
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn resident_free() -> Option<usize> {
    None
}

/// CPU time the process has used (user and system).
fn cpu_used() -> Duration {
    use nix::sys::resource::{UsageWho, getrusage};
    match getrusage(UsageWho::RUSAGE_SELF) {
        Ok(u) => {
            let (user, sys) = (u.user_time(), u.system_time());
            let micros = |t: nix::sys::time::TimeVal| {
                Duration::from_secs(t.tv_sec().max(0) as u64)
                    + Duration::from_micros(t.tv_usec().max(0) as u64)
            };
            micros(user) + micros(sys)
        }
        Err(_) => Duration::ZERO,
    }
}

/// Anonymous resident bytes from `/proc/self/statm` ("size resident shared ...", in
/// pages; shared is the file-backed part of resident).
fn resident_anon(statm: &str) -> Option<usize> {
    let mut fields = statm.split_ascii_whitespace().skip(1);
    let resident: usize = fields.next()?.parse().ok()?;
    let shared: usize = fields.next()?.parse().ok()?;
    Some(resident.saturating_sub(shared) * page_size())
}

fn page_size() -> usize {
    // SAFETY: sysconf only reads a system constant.
    #[allow(unsafe_code)]
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(n).unwrap_or(4096)
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
pub fn trim() {
    // SAFETY: malloc_trim(0) only returns free pages to the kernel (madvise) under the
    // allocator's locks; no block handed out by malloc is touched.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn trim() {}

/// Starts the trimmer thread (for the life of the process).
pub fn spawn_trimmer() {
    let run = || {
        let mut t = Trimmer::default();
        let mut cpu_before = cpu_used();
        while let Some(free) = resident_free() {
            let cpu_now = cpu_used();
            let cpu = cpu_now.saturating_sub(cpu_before);
            cpu_before = cpu_now;
            if t.should_trim(free, cpu) {
                trim();
                t.trimmed(resident_free().unwrap_or(0));
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

    const QUIET: Duration = Duration::from_millis(10);

    #[test]
    fn trims_when_enough_was_freed_since_the_last_trim() {
        let mut t = Trimmer::default();
        assert!(!t.should_trim(TRIM_AT - 1, QUIET));
        assert!(t.should_trim(TRIM_AT, QUIET));
        // What the trim could not return is the new level: no reason to trim again.
        t.trimmed(3 * TRIM_AT);
        assert!(!t.should_trim(3 * TRIM_AT, QUIET));
        assert!(!t.should_trim(4 * TRIM_AT - 1, QUIET));
        assert!(t.should_trim(4 * TRIM_AT, QUIET));
    }

    #[test]
    fn memory_reused_then_freed_again_is_trimmed_again() {
        let mut t = Trimmer::default();
        t.trimmed(3 * TRIM_AT);
        assert!(!t.should_trim(TRIM_AT / 2, QUIET)); // reused
        assert!(t.should_trim(2 * TRIM_AT, QUIET)); // freed again: 1.5 MiB more than the low
    }

    #[test]
    fn under_load_only_much_free_memory_is_trimmed_and_the_rest_once_quiet() {
        let mut t = Trimmer::default();
        t.trimmed(2 * TRIM_AT);
        let busy = BUSY_CPU;
        // Buffers freed and soon used again: left alone while busy.
        assert!(!t.should_trim(2 * TRIM_AT + TRIM_BUSY_AT - 1, busy));
        assert!(!t.should_trim(5 * TRIM_AT, busy));
        // The load is over: the next check gives it back.
        assert!(t.should_trim(5 * TRIM_AT, BUSY_CPU - Duration::from_millis(1)));
        t.trimmed(2 * TRIM_AT);
        // A burst that leaves much free is trimmed even while busy.
        assert!(t.should_trim(2 * TRIM_AT + TRIM_BUSY_AT, busy));
    }

    #[test]
    fn the_cpu_this_process_uses_is_counted() {
        // Spinning until it counts 100 ms: however slow or busy the machine, it does.
        let before = cpu_used();
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while cpu_used() < before + Duration::from_millis(100) {
            for _ in 0..10_000 {
                x = std::hint::black_box(x.wrapping_add(1));
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "no CPU time counted"
            );
        }
    }

    #[test]
    fn anonymous_resident_memory_is_resident_less_file_backed() {
        let page = page_size();
        assert_eq!(
            resident_anon("5000 1200 900 10 0 300 0\n"),
            Some(300 * page)
        );
        assert_eq!(resident_anon("5000 100 900"), Some(0), "never below zero");
        assert_eq!(resident_anon("5000"), None);
        assert_eq!(resident_anon("5000 x 1"), None);
    }

    /// The measure sees memory freed but still resident, and a trim gives it back: blocks
    /// reused after a trim and freed again leave malloc's free count where it was, yet
    /// their pages are resident again.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn memory_freed_after_a_trim_is_seen_resident_and_trimmed_again() {
        const BLOCK: usize = 64 * 1024; // in an arena: below malloc's mmap threshold
        const BLOCKS: usize = 256; // 16 MiB, half of it freed: 8 MiB of holes
        const MIB: usize = 1 << 20;
        // A thread of its own, with an arena the other tests' threads hardly touch.
        std::thread::spawn(|| {
            // Every other block stays in use, as under load: the freed ones are holes that
            // neither merge nor shrink the heap from its top, so they stay with the process.
            let mut blocks: Vec<Option<Vec<u8>>> =
                (0..BLOCKS).map(|_| Some(vec![1u8; BLOCK])).collect();
            let free_odd = |blocks: &mut Vec<Option<Vec<u8>>>| {
                for b in blocks.iter_mut().skip(1).step_by(2) {
                    *b = None;
                }
            };
            free_odd(&mut blocks);
            trim();
            let after_trim = resident_free().unwrap();
            // Reused (the holes fit them exactly), touched, freed again.
            for b in blocks.iter_mut().skip(1).step_by(2) {
                *b = Some(vec![1u8; BLOCK]);
            }
            std::hint::black_box(&blocks);
            free_odd(&mut blocks);
            let after_reuse = resident_free().unwrap();
            assert!(
                after_reuse >= after_trim + 4 * MIB,
                "8 MiB freed again is seen resident: {after_trim} -> {after_reuse}"
            );
            trim();
            let trimmed = resident_free().unwrap();
            assert!(
                trimmed + 4 * MIB <= after_reuse,
                "and given back: {after_reuse} -> {trimmed}"
            );
            drop(blocks);
        })
        .join()
        .unwrap();
    }
}
