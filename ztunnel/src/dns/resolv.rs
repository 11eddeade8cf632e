//! The upstream resolvers, kept current with `--dns-resolv-conf` without a restart.
//!
//! The file is read again every [`POLL`] (polled, not watched: a kubelet or an operator
//! may replace the file or the mount under it, which inotify on the old inode misses).
//! A file that cannot be read or parsed, or that names no resolver, leaves the ones in
//! use in place and is logged once, with the reason, until it changes again.

use super::forward::Upstreams;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// How often the file is read again.
pub const POLL: Duration = Duration::from_secs(2);

/// The upstreams in use, shared by every pod's DNS proxy and replaced as a whole.
#[derive(Clone, Debug, Default)]
pub struct SharedUpstreams(Arc<RwLock<Arc<Upstreams>>>);

impl SharedUpstreams {
    pub fn new(upstreams: Upstreams) -> SharedUpstreams {
        SharedUpstreams(Arc::new(RwLock::new(Arc::new(upstreams))))
    }

    /// The upstreams now (a query keeps the list it started with).
    pub fn get(&self) -> Arc<Upstreams> {
        self.0.read().expect("upstreams lock").clone()
    }

    fn set(&self, upstreams: Upstreams) {
        *self.0.write().expect("upstreams lock") = Arc::new(upstreams);
    }
}

/// What one read of the file gave.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Seen {
    Text(Vec<u8>),
    Unreadable(String),
}

/// What to do after a read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// Nothing new (the same read as last time, or the same resolvers).
    None,
    /// Use these from now on.
    Use(Upstreams),
    /// A bad file: keep the resolvers in use, and say why.
    Keep { reason: String },
}

/// The change `now` calls for, `before` having been read last time (`None`: the first
/// read) and `current` being in use.
pub fn judge(before: Option<&Seen>, now: &Seen, current: &Upstreams) -> Change {
    if before == Some(now) {
        return Change::None;
    }
    let text = match now {
        Seen::Unreadable(e) => {
            return Change::Keep {
                reason: format!("cannot read it: {e}"),
            };
        }
        Seen::Text(t) => t,
    };
    match Upstreams::parse(text) {
        Err(e) => Change::Keep {
            reason: format!("cannot parse it: {e}"),
        },
        Ok(u) if u.servers.is_empty() => Change::Keep {
            reason: "it has no nameserver line".into(),
        },
        Ok(u) if &u == current => Change::None,
        Ok(u) => Change::Use(u),
    }
}

/// The largest resolv.conf we read: a real one is a few hundred bytes; a bigger file is
/// a mistake (or a device, a log file mounted there) we must not load every poll.
pub const MAX_FILE: u64 = 64 * 1024;

/// The file's bytes, at most [`MAX_FILE`] of them (blocking: call it off the runtime).
pub fn read_limited(path: &Path) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|e| e.kind().to_string())?;
    let mut text = Vec::new();
    file.take(MAX_FILE + 1)
        .read_to_end(&mut text)
        .map_err(|e| e.kind().to_string())?;
    if text.len() as u64 > MAX_FILE {
        return Err(format!(
            "it is larger than {} KiB, which no resolv.conf is",
            MAX_FILE / 1024
        ));
    }
    Ok(text)
}

fn read(path: &Path) -> Seen {
    match read_limited(path) {
        Ok(t) => Seen::Text(t),
        Err(e) => Seen::Unreadable(e),
    }
}

/// Reads `path` every `every` and applies what [`judge`] says to `upstreams` (which
/// holds what the file gave at start, maybe a little before this runs). Runs until the
/// process ends.
pub async fn keep_current(path: PathBuf, upstreams: SharedUpstreams, every: Duration) {
    let mut before = None;
    loop {
        // Off the runtime: the file may sit on a slow or hung mount.
        let p = path.clone();
        let now = tokio::task::spawn_blocking(move || read(&p))
            .await
            .unwrap_or_else(|e| Seen::Unreadable(e.to_string()));
        match judge(before.as_ref(), &now, &upstreams.get()) {
            Change::None => {}
            Change::Use(u) => {
                tracing::info!(file = %path.display(), servers = ?u.servers,
                    "DNS proxy: upstream resolvers changed");
                upstreams.set(u);
            }
            Change::Keep { reason } => {
                tracing::warn!(file = %path.display(), %reason,
                    servers = ?upstreams.get().servers,
                    "DNS proxy: keeping the upstream resolvers in use; fix the file");
            }
        }
        before = Some(now);
        tokio::time::sleep(every).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    fn ups(addrs: &[&str]) -> Upstreams {
        Upstreams {
            servers: addrs
                .iter()
                .map(|a| a.parse::<SocketAddr>().unwrap())
                .collect(),
        }
    }

    fn text(t: &str) -> Seen {
        Seen::Text(t.as_bytes().to_vec())
    }

    #[test]
    fn a_new_good_file_is_used_and_a_bad_one_keeps_the_last_good() {
        let one = ups(&["10.0.0.1:53"]);
        let a = text("nameserver 10.0.0.1\n");
        let b = text("search x\nnameserver 10.0.0.2\nnameserver 10.0.0.3\n");
        assert_eq!(judge(Some(&a), &a, &one), Change::None, "unchanged");
        // The first read is judged against what is in use (it may have changed since).
        assert_eq!(judge(None, &a, &one), Change::None);
        assert_eq!(
            judge(None, &b, &one),
            Change::Use(ups(&["10.0.0.2:53", "10.0.0.3:53"]))
        );
        assert_eq!(
            judge(Some(&a), &b, &one),
            Change::Use(ups(&["10.0.0.2:53", "10.0.0.3:53"]))
        );
        // Rewritten with other text but the same resolvers: nothing to do.
        let a2 = text("# edited\nnameserver 10.0.0.1\n");
        assert_eq!(judge(Some(&a), &a2, &one), Change::None);
        // Unreadable, unparsable, without nameserver: kept, with the reason.
        let missing = Seen::Unreadable("entity not found".into());
        for (bad, why) in [
            (&missing, "cannot read it: entity not found"),
            (&text("nameserver not-an-address\n"), "cannot parse it"),
            (&text("search cluster.local\n"), "no nameserver"),
            (&text(""), "no nameserver"),
        ] {
            match judge(Some(&a), bad, &one) {
                Change::Keep { reason } => assert!(reason.contains(why), "{reason}"),
                other => panic!("{bad:?}: {other:?}"),
            }
            // Said once: the same bad file again is nothing new.
            assert_eq!(judge(Some(bad), bad, &one), Change::None);
            // Fixed again: used (or nothing to do, when it is what is in use).
            assert_eq!(judge(Some(bad), &a, &one), Change::None);
            assert_eq!(
                judge(Some(bad), &b, &one),
                Change::Use(ups(&["10.0.0.2:53", "10.0.0.3:53"]))
            );
        }
    }

    #[test]
    fn a_file_past_64_kib_is_not_read_and_keeps_the_last_good() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("resolv.conf");
        let mut text = "nameserver 10.0.0.9\n".to_string();
        text.push_str(&"#".repeat(MAX_FILE as usize - text.len()));
        std::fs::write(&path, &text).unwrap();
        assert_eq!(
            read(&path),
            Seen::Text(text.clone().into_bytes()),
            "64 KiB: read"
        );
        text.push('#');
        std::fs::write(&path, &text).unwrap();
        let big = read(&path);
        let one = ups(&["10.0.0.1:53"]);
        match judge(None, &big, &one) {
            Change::Keep { reason } => assert!(reason.contains("larger than 64 KiB"), "{reason}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(Upstreams::load(&path), Upstreams::default(), "nor at start");
    }

    #[tokio::test]
    async fn the_file_is_followed_without_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("resolv.conf");
        // Written as editors and kubelets do: a new file renamed over the old one.
        let write = |t: &str| {
            let tmp = dir.path().join("resolv.conf.tmp");
            std::fs::write(&tmp, t).unwrap();
            std::fs::rename(&tmp, &path).unwrap();
        };
        write("nameserver 10.0.0.1\n");
        let shared = SharedUpstreams::new(Upstreams::load(&path));
        let task = tokio::spawn(keep_current(
            path.clone(),
            shared.clone(),
            Duration::from_millis(20),
        ));
        let wait_for = |want: Upstreams| {
            let shared = shared.clone();
            async move {
                while *shared.get() != want {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        };
        let limit = Duration::from_secs(20);
        write("nameserver 10.0.0.2\n");
        tokio::time::timeout(limit, wait_for(ups(&["10.0.0.2:53"])))
            .await
            .expect("the new resolver taken");
        // Broken, then gone: the last good stays through several polls.
        write("nameserver ???\n");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(*shared.get(), ups(&["10.0.0.2:53"]));
        std::fs::remove_file(&path).unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(*shared.get(), ups(&["10.0.0.2:53"]));
        write("nameserver fd00::53\n");
        tokio::time::timeout(limit, wait_for(ups(&["[fd00::53]:53"])))
            .await
            .expect("taken again once fixed");
        task.abort();
    }
}
