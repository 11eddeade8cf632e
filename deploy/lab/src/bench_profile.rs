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

/// Whether perf, stopped with SIGINT, ended as it does after writing its file: exit code
/// 0 or 130, or ended by the SIGINT itself (`perf record -p` re-raises it once the file
/// is written).
pub fn perf_ended_well(code: Option<i32>, signal: Option<i32>) -> bool {
    matches!(code, Some(0) | Some(130)) || signal == Some(SIGINT)
}

const SIGINT: i32 = 2;

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
            let ctl = out.with_extension("ctl");
            let ack = out.with_extension("ack");
            for fifo in [&ctl, &ack] {
                let _ = std::fs::remove_file(fifo);
            }
            let made = Command::new("mkfifo").arg(&ctl).arg(&ack).status();
            if !made.is_ok_and(|s| s.success()) {
                return Err(format!("mkfifo {} failed", ctl.display()));
            }
            // Started with its events off; they are switched on through the control
            // fifo and perf acknowledges, so the load starts only once perf samples
            // (attaching takes a second or more on a busy machine).
            let child = Command::new("perf")
                .args(perf_args(*pid, &out))
                .args(["-D", "-1", "--control"])
                .arg(format!("fifo:{},{}", ctl.display(), ack.display()))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .spawn()
                .map_err(|e| format!("cannot run perf (apt-get install linux-perf): {e}"))?;
            perfs.push((child, out));
            let enabled = enable(&ctl, &ack);
            for fifo in [&ctl, &ack] {
                let _ = std::fs::remove_file(fifo);
            }
            if let Err(e) = enabled {
                // No perf is left running behind a failed start.
                let _ = Recording { perfs }.stop();
                return Err(format!("perf for {who}: {e}"));
            }
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
            use std::os::unix::process::ExitStatusExt;
            let ok = child
                .wait()
                .is_ok_and(|s| perf_ended_well(s.code(), s.signal()))
                && std::fs::metadata(&out).is_ok_and(|m| m.len() > 0);
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

/// Tells a perf started with `-D -1 --control fifo:ctl,ack` to start sampling, and waits
/// for its acknowledgement.
fn enable(ctl: &Path, ack: &Path) -> Result<(), String> {
    use std::io::{Read, Write};
    let (ctl, ack) = (ctl.to_path_buf(), ack.to_path_buf());
    let (tx, rx) = std::sync::mpsc::channel();
    // Opening a fifo blocks until perf opens its end: on a thread, so that a perf that
    // never starts cannot hang the bench.
    std::thread::spawn(move || {
        let done = (|| -> std::io::Result<String> {
            std::fs::OpenOptions::new()
                .write(true)
                .open(&ctl)?
                .write_all(b"enable\n")?;
            let mut answer = [0u8; 4];
            std::fs::File::open(&ack)?.read_exact(&mut answer)?;
            Ok(String::from_utf8_lossy(&answer).into_owned())
        })();
        let _ = tx.send(done);
    });
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(Ok(a)) if a.starts_with("ack") => Ok(()),
        Ok(Ok(a)) => Err(format!("perf answered {a:?} to enable")),
        Ok(Err(e)) => Err(format!("perf control fifo: {e}")),
        Err(_) => Err("perf did not start sampling within 30 s".into()),
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
    fn an_interrupted_perf_ended_well() {
        assert!(perf_ended_well(Some(0), None));
        assert!(perf_ended_well(Some(130), None));
        assert!(perf_ended_well(None, Some(2)));
        assert!(!perf_ended_well(Some(255), None));
        assert!(!perf_ended_well(None, Some(9)));
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
