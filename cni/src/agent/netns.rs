//! Running commands inside a pod's network namespace. Each command runs on a fresh
//! thread that enters the namespace and ends with it, so no thread of the agent is ever
//! left inside a pod.

use nix::sched::{CloneFlags, setns};
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How long a command in a namespace may take (nft, ip: milliseconds normally). One that
/// hangs is killed, so the agent is never stuck behind it.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

/// An open namespace handle (keeps the namespace alive while held).
#[derive(Debug)]
pub struct Netns {
    pub path: String,
    pub file: File,
    pub inode: u64,
    /// The device of the namespace file: with `inode`, its identity (`id`).
    pub dev: u64,
}

impl Netns {
    /// Opens a network namespace file. Non-blocking, so a path that names a FIFO (a
    /// runtime's CNI_NETNS is not ours to trust) cannot stall the caller; anything that
    /// is not a namespace file (nsfs) is refused, so its inode is never taken for one.
    pub fn open(path: &str) -> Result<Netns, String> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
            .open(path)
            .map_err(|e| format!("open netns {path}: {e}"))?;
        let fs = nix::sys::statfs::fstatfs(&file).map_err(|e| format!("statfs {path}: {e}"))?;
        if fs.filesystem_type() != nix::sys::statfs::NSFS_MAGIC {
            return Err(format!("{path} is not a network namespace"));
        }
        let meta = file.metadata().map_err(|e| e.to_string())?;
        Ok(Netns {
            path: path.to_string(),
            file,
            inode: meta.ino(),
            dev: meta.dev(),
        })
    }

    /// The namespace's identity: (device, inode) of its file.
    pub fn id(&self) -> NsId {
        NsId {
            dev: self.dev,
            inode: self.inode,
        }
    }

    pub fn try_clone(&self) -> Result<Netns, String> {
        Ok(Netns {
            path: self.path.clone(),
            file: self.file.try_clone().map_err(|e| e.to_string())?,
            inode: self.inode,
            dev: self.dev,
        })
    }

    /// Runs `args` inside the namespace with `stdin`; returns stdout, or an error with
    /// the command and its stderr.
    pub fn run(&self, args: &[&str], stdin: Option<&str>) -> Result<String, String> {
        self.run_within(args, stdin, COMMAND_TIMEOUT)
    }

    /// `run`, killing the command if it has not finished within `timeout`.
    pub fn run_within(
        &self,
        args: &[&str],
        stdin: Option<&str>,
        timeout: Duration,
    ) -> Result<String, String> {
        let fd = self.file.try_clone().map_err(|e| e.to_string())?;
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let stdin = stdin.map(str::to_string);
        let path = self.path.clone();
        std::thread::spawn(move || -> Result<String, String> {
            setns(&fd, CloneFlags::CLONE_NEWNET)
                .map_err(|e| format!("setns into {path}: {e} (the agent needs CAP_SYS_ADMIN)"))?;
            let mut child = Command::new(&args[0])
                .args(&args[1..])
                .stdin(if stdin.is_some() {
                    Stdio::piped()
                } else {
                    Stdio::null()
                })
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .map_err(|e| format!("cannot run {}: {e}", args[0]))?;
            if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
                pipe.write_all(input.as_bytes())
                    .map_err(|e| e.to_string())?;
            }
            let out = wait_within(child, timeout).map_err(|e| match e {
                Waited::TimedOut => format!(
                    "`{}` in {path} did not finish within {}s and was killed",
                    args.join(" "),
                    timeout.as_secs_f32()
                ),
                Waited::Io(e) => format!("`{}` in {path}: {e}", args.join(" ")),
            })?;
            if out.status.success() {
                Ok(String::from_utf8_lossy(&out.stdout).into_owned())
            } else {
                Err(format!(
                    "`{}` in {path} failed: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr).trim()
                ))
            }
        })
        .join()
        .map_err(|_| "netns command thread panicked".to_string())?
    }

    /// Sets `net.ipv4.tcp_migrate_req=1` here (IPv6 included): a closing listener's queued
    /// connections move to another listener of its SO_REUSEPORT group instead of being
    /// reset. ztunnel sets it at a handover too, but cannot where its /proc/sys is
    /// read-only (a non-privileged container); the agent can.
    pub fn enable_migrate_req(&self) -> Result<(), String> {
        let fd = self.file.try_clone().map_err(|e| e.to_string())?;
        let path = self.path.clone();
        std::thread::spawn(move || -> Result<(), String> {
            setns(&fd, CloneFlags::CLONE_NEWNET).map_err(|e| format!("setns into {path}: {e}"))?;
            // /proc/sys/net resolves to the namespace of the thread that opens it.
            std::fs::write("/proc/sys/net/ipv4/tcp_migrate_req", "1")
                .map_err(|e| format!("net.ipv4.tcp_migrate_req in {path}: {e}"))
        })
        .join()
        .map_err(|_| "netns thread panicked".to_string())?
    }

    /// The namespace's IP addresses (via `ip -j addr`).
    pub fn addresses(&self) -> Result<Vec<String>, String> {
        let out = self.run(&["ip", "-j", "addr", "show"], None)?;
        parse_ip_addr_json(&out)
    }
}

/// A namespace's identity: the (device, inode) of its namespace file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NsId {
    pub dev: u64,
    pub inode: u64,
}

enum Waited {
    TimedOut,
    Io(std::io::Error),
}

/// Waits for `child` and collects its output, killing it at `timeout`. The pipes are
/// read on their own threads so a chatty child cannot block on a full pipe.
fn wait_within(
    mut child: std::process::Child,
    timeout: Duration,
) -> Result<std::process::Output, Waited> {
    use std::io::Read;
    let reader = |p: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = p {
                let _ = p.read_to_end(&mut buf);
            }
            buf
        })
    };
    let out = reader(child.stdout.take().map(|p| Box::new(p) as _));
    let err = reader(child.stderr.take().map(|p| Box::new(p) as _));
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait().map_err(Waited::Io)? {
            Some(status) => break status,
            None if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(Waited::TimedOut);
            }
            None => std::thread::sleep(Duration::from_millis(5)),
        }
    };
    Ok(std::process::Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    })
}

/// Parses `ip -j addr show` output into addresses (without prefix length).
pub fn parse_ip_addr_json(out: &str) -> Result<Vec<String>, String> {
    let v: serde_json::Value =
        serde_json::from_str(out).map_err(|e| format!("unexpected `ip -j addr` output: {e}"))?;
    Ok(v.as_array()
        .into_iter()
        .flatten()
        .flat_map(|link| link["addr_info"].as_array().cloned().unwrap_or_default())
        .filter_map(|a| a["local"].as_str().map(str::to_string))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_that_hangs_is_killed() {
        let ns = Netns::open("/proc/self/ns/net").unwrap();
        let e = ns
            .run_within(&["sleep", "30"], None, Duration::from_millis(200))
            .unwrap_err();
        assert!(
            e.contains("did not finish within 0.2s and was killed"),
            "{e}"
        );
        // A command that finishes gives its output and its failures as before.
        assert_eq!(ns.run(&["echo", "hi"], None).unwrap(), "hi\n");
        assert_eq!(ns.run(&["cat"], Some("in")).unwrap(), "in");
        let e = ns
            .run(&["sh", "-c", "echo no >&2; exit 3"], None)
            .unwrap_err();
        assert!(e.ends_with("failed: no"), "{e}");
    }

    #[test]
    fn only_namespace_files_open_and_a_fifo_does_not_block() {
        let ns = Netns::open("/proc/self/ns/net").unwrap();
        assert_eq!(ns.id(), Netns::open("/proc/self/ns/net").unwrap().id());
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("plain");
        std::fs::write(&plain, "").unwrap();
        let e = Netns::open(plain.to_str().unwrap()).unwrap_err();
        assert!(e.ends_with("is not a network namespace"), "{e}");
        // A FIFO with no writer: a blocking open would wait here for ever.
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let e = Netns::open(fifo.to_str().unwrap()).unwrap_err();
        assert!(e.ends_with("is not a network namespace"), "{e}");
        assert!(Netns::open(dir.path().join("gone").to_str().unwrap()).is_err());
    }

    #[test]
    fn parses_ip_json() {
        let out = r#"[{"ifindex":1,"ifname":"lo","addr_info":[{"family":"inet","local":"127.0.0.1","prefixlen":8}]},
                     {"ifindex":2,"ifname":"eth0","addr_info":[{"family":"inet","local":"10.1.1.2","prefixlen":24},{"family":"inet6","local":"fe80::1","prefixlen":64}]}]"#;
        assert_eq!(
            super::parse_ip_addr_json(out).unwrap(),
            vec!["127.0.0.1", "10.1.1.2", "fe80::1"]
        );
        assert!(super::parse_ip_addr_json("nonsense").is_err());
    }
}
