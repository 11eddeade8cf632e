//! `mesh-lab bench --profile DIR`: a CPU profile of each proxy under each load, recorded
//! with `perf record -g` attached to the running process for the length of the load.
//! `make profile` turns the recordings into flame graphs.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The recording of `who` (ztunnel1, ztunnel2, waypoint) under `load`:
/// `<load>-<who>.perf.data`, with the build's label when several builds are compared.
pub fn file_name(load: &str, who: &str, build: Option<usize>) -> String {
    match build {
        Some(b) => format!("{load}-{who}-build{}.perf.data", b + 1),
        None => format!("{load}-{who}.perf.data"),
    }
}

/// `perf record` attached to `pid`: software clock sampling (these VMs have no hardware
/// counters), call graphs through frame pointers.
pub fn perf_args(pid: u32, out: &Path) -> Vec<String> {
    [
        "record",
        "-e",
        "cpu-clock",
        "-F",
        "499",
        "-g",
        "--quiet",
        "-p",
        &pid.to_string(),
        "-o",
        &out.to_string_lossy(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// perf processes recording while a load runs.
pub struct Recording {
    perfs: Vec<(Child, PathBuf)>,
}

impl Recording {
    /// Starts one `perf record` per process (none when `dir` is `None`).
    pub fn start(
        dir: Option<&Path>,
        load: &str,
        procs: &[(&str, u32)],
        build: Option<usize>,
    ) -> Result<Recording, String> {
        let mut perfs = Vec::new();
        let Some(dir) = dir else {
            return Ok(Recording { perfs });
        };
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        for (who, pid) in procs {
            let out = dir.join(file_name(load, who, build));
            let child = Command::new("perf")
                .args(perf_args(*pid, &out))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .spawn()
                .map_err(|e| format!("cannot run perf (apt-get install linux-perf): {e}"))?;
            perfs.push((child, out));
        }
        // perf needs a moment to attach before the load starts.
        if !perfs.is_empty() {
            std::thread::sleep(Duration::from_millis(300));
        }
        Ok(Recording { perfs })
    }

    /// Stops each perf as Ctrl-C would (it then writes its file) and waits for it.
    pub fn stop(self) -> Result<(), String> {
        let mut failed = Vec::new();
        for (mut child, out) in self.perfs {
            let _ = Command::new("kill")
                .args(["-INT", &child.id().to_string()])
                .status();
            let ok = child.wait().is_ok_and(|s| s.success()) && out.is_file();
            if !ok {
                failed.push(out.display().to_string());
            }
        }
        if failed.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "perf recorded nothing into {} (is /proc/sys/kernel/perf_event_paranoid too strict? `make profile` sets it for the run)",
                failed.join(", ")
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_file_per_load_and_binary() {
        assert_eq!(file_name("h2", "ztunnel1", None), "h2-ztunnel1.perf.data");
        assert_eq!(
            file_name("tput1", "waypoint", Some(1)),
            "tput1-waypoint-build2.perf.data"
        );
    }

    #[test]
    fn perf_attaches_to_the_process_with_call_graphs() {
        let a = perf_args(42, Path::new("/tmp/x.perf.data"));
        let at = |flag: &str| a[a.iter().position(|x| x == flag).unwrap() + 1].clone();
        assert_eq!(a[0], "record");
        assert!(a.contains(&"-g".to_string()));
        assert_eq!(at("-p"), "42");
        assert_eq!(at("-o"), "/tmp/x.perf.data");
        assert_eq!(at("-e"), "cpu-clock");
    }
}
