//! Ending the lab's processes by PID: only those the lab owns (never this process),
//! signalled all at once, then waited for up to a deadline; survivors killed if asked.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// How to end a set of processes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ending {
    /// `TERM` or `KILL`.
    pub signal: &'static str,
    /// Each PID's process group too (a pod's children with it).
    pub group: bool,
    /// How long to wait for them to be gone.
    pub wait: Duration,
    /// SIGKILL whatever is still there after `wait`.
    pub then_kill: bool,
}

/// Of `pids`, those to end: owned by the lab (`owns`), not this process, each once.
pub fn to_end(pids: &[u32], owns: &dyn Fn(u32) -> bool) -> Vec<u32> {
    let me = std::process::id();
    let mut out: Vec<u32> = Vec::new();
    for &p in pids {
        if p != me && !out.contains(&p) && owns(p) {
            out.push(p);
        }
    }
    out
}

/// The process exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists() && !is_zombie(pid)
}

pub(crate) fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

fn signal(sig: &str, target: &str) {
    let _ = Command::new("kill")
        .args([&format!("-{sig}"), "--", target])
        .output();
}

/// Ends the processes of `pids` the lab owns, as `how` says; returns those it ended
/// (signalled). A PID the lab does not own is never signalled.
pub fn end(pids: &[u32], owns: &dyn Fn(u32) -> bool, how: Ending) -> Vec<u32> {
    let ours = to_end(pids, owns);
    for pid in &ours {
        if how.group {
            signal(how.signal, &format!("-{pid}"));
        }
        signal(how.signal, &pid.to_string());
    }
    let deadline = Instant::now() + how.wait;
    while ours.iter().any(|p| alive(*p)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    if how.then_kill {
        for pid in ours.iter().filter(|p| alive(**p)) {
            signal("KILL", &pid.to_string());
        }
    }
    ours
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_owned_pids_other_than_this_process_are_ended() {
        let me = std::process::id();
        assert_eq!(to_end(&[5, me, 6, 5, 7], &|p| p != 6), [5, 7]);
        assert!(to_end(&[5, 6], &|_| false).is_empty());
    }

    #[test]
    fn a_process_the_lab_does_not_own_is_left_running() {
        let sleep = || Command::new("sleep").arg("30").spawn().unwrap();
        let (mut ours, mut other) = (sleep(), sleep());
        let (a, b) = (ours.id(), other.id());
        let how = Ending {
            signal: "TERM",
            group: false,
            wait: Duration::from_secs(10),
            then_kill: true,
        };
        assert_eq!(end(&[a, b], &|p| p == a, how), [a]);
        assert!(!alive(a), "the owned process ended");
        assert!(alive(b), "the other process untouched");
        let _ = ours.wait();
        let _ = other.kill();
        let _ = other.wait();
    }
}
