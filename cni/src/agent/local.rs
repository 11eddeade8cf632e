//! The agent's local control sockets (the plugin's, and ZDS for ztunnel): the socket file
//! is 0600 in a 0700 directory, every accepted peer is checked with SO_PEERCRED (its
//! uid, and its executable where that can be known), and reads are bounded in size and
//! time.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::{AsyncBufRead, AsyncBufReadExt};

/// The longest plugin request or agent reply line (the protocol's, see `events`).
pub use crate::events::MAX_LINE;
/// How long a connected plugin has to send its request.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Parses a uid for `--*-peer-uid`: a decimal number, not `-1` (4294967295, "no uid").
pub fn parse_uid(s: &str) -> Result<u32, String> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("{s:?} is not a uid (a decimal number)"));
    }
    match s.parse::<u32>() {
        Ok(u32::MAX) | Err(_) => Err(format!("{s} is not a valid uid (0..=4294967294)")),
        Ok(uid) => Ok(uid),
    }
}

/// The credentials the kernel recorded for a connected peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    /// 0 when the peer is in a PID namespace we cannot see.
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
}

/// Who may connect to a socket.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct PeerPolicy {
    pub uid: u32,
    /// When set, the peer must be running this executable (same file). Needs the peer's
    /// PID, so the peer must be in our PID namespace (or an ancestor's view of it).
    pub exe: Option<PathBuf>,
}

impl PeerPolicy {
    pub fn check(&self, peer: &Peer) -> Result<(), String> {
        if peer.uid != self.uid {
            return Err(format!(
                "peer uid {} (pid {}) is not the expected uid {}",
                peer.uid, peer.pid, self.uid
            ));
        }
        if let Some(exe) = &self.exe {
            if peer.pid <= 0 {
                return Err(format!(
                    "peer process is not visible from here (another PID namespace): cannot check it runs {}",
                    exe.display()
                ));
            }
            let want = std::fs::metadata(exe).map_err(|e| format!("{}: {e}", exe.display()))?;
            let link = format!("/proc/{}/exe", peer.pid);
            let got = std::fs::metadata(&link).map_err(|e| format!("{link}: {e}"))?;
            if (got.dev(), got.ino()) != (want.dev(), want.ino()) {
                let running = std::fs::read_link(&link)
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|_| "?".into());
                return Err(format!(
                    "peer pid {} runs {running}, not {}",
                    peer.pid,
                    exe.display()
                ));
            }
        }
        Ok(())
    }
}

/// Makes `dir` (created if missing) private: mode 0700, owned by `owner`. A symlink is
/// refused: whoever could write its parent could point it elsewhere.
pub fn private_dir(dir: &Path, owner: u32) -> Result<(), String> {
    let err = |e: std::io::Error| format!("{}: {e}", dir.display());
    std::fs::create_dir_all(dir).map_err(err)?;
    let meta = std::fs::symlink_metadata(dir).map_err(err)?;
    if !meta.is_dir() {
        return Err(format!(
            "{} is not a directory (a symlink is not accepted for a socket directory)",
            dir.display()
        ));
    }
    if meta.uid() != owner {
        std::os::unix::fs::chown(dir, Some(owner), None).map_err(err)?;
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(err)
}

/// After bind: the socket file is 0600 and owned by `owner` (the only peer uid allowed).
pub fn private_socket(path: &Path, owner: u32) -> Result<(), String> {
    let err = |e: std::io::Error| format!("{}: {e}", path.display());
    if std::fs::metadata(path).map_err(err)?.uid() != owner {
        std::os::unix::fs::chown(path, Some(owner), None).map_err(err)?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)
}

/// Removes a stale socket at `path` (only a socket: never another kind of file).
pub fn remove_stale(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            std::fs::remove_file(path).map_err(|e| format!("{}: {e}", path.display()))
        }
        Ok(_) => Err(format!(
            "{} exists and is not a socket; refusing to replace it",
            path.display()
        )),
        Err(_) => Ok(()),
    }
}

/// A private listening stream socket at `path` for peers of uid `owner`.
pub fn bind_stream(path: &Path, owner: u32) -> Result<tokio::net::UnixListener, String> {
    if let Some(dir) = path.parent() {
        private_dir(dir, owner)?;
    }
    remove_stale(path)?;
    let l = tokio::net::UnixListener::bind(path)
        .map_err(|e| format!("bind {}: {e}", path.display()))?;
    private_socket(path, owner)?;
    Ok(l)
}

#[derive(Debug)]
pub enum LineError {
    /// More than the limit without a newline; nothing beyond limit + one buffer was read.
    TooLong,
    /// The peer closed before sending anything.
    Closed,
    Io(std::io::Error),
}

/// Reads one `\n`-terminated line (without it) of at most `max` bytes. Memory stays
/// within `max` plus the reader's buffer whatever the peer sends. EOF after some bytes
/// ends the line.
pub async fn read_line_bounded<R: AsyncBufRead + Unpin>(
    r: &mut R,
    max: usize,
) -> Result<Vec<u8>, LineError> {
    let mut line = Vec::new();
    loop {
        let buf = r.fill_buf().await.map_err(LineError::Io)?;
        if buf.is_empty() {
            return if line.is_empty() {
                Err(LineError::Closed)
            } else {
                Ok(line)
            };
        }
        if let Some(i) = buf.iter().position(|b| *b == b'\n') {
            if line.len() + i > max {
                return Err(LineError::TooLong);
            }
            line.extend_from_slice(&buf[..i]);
            r.consume(i + 1);
            return Ok(line);
        }
        let n = buf.len();
        if line.len() + n > max {
            return Err(LineError::TooLong);
        }
        line.extend_from_slice(buf);
        r.consume(n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uids_are_validated() {
        assert_eq!(parse_uid("0"), Ok(0));
        assert_eq!(parse_uid("1337"), Ok(1337));
        assert_eq!(parse_uid("4294967294"), Ok(4294967294));
        for bad in [
            "",
            "-1",
            "4294967295",
            "4294967296",
            "root",
            " 0",
            "0x10",
            "+1",
        ] {
            assert!(parse_uid(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn peer_policy() {
        let root = Peer {
            pid: std::process::id() as i32,
            uid: 0,
            gid: 0,
        };
        assert!(PeerPolicy::default().check(&root).is_ok());
        let e = PeerPolicy::default()
            .check(&Peer { uid: 65534, ..root })
            .unwrap_err();
        assert!(
            e.contains("uid 65534") && e.contains("expected uid 0"),
            "{e}"
        );
        // The executable: this test binary is, /bin/sh is not.
        let me = std::env::current_exe().unwrap();
        let p = PeerPolicy {
            uid: 0,
            exe: Some(me),
        };
        assert!(p.check(&root).is_ok());
        assert!(
            p.check(&Peer { pid: 0, ..root })
                .unwrap_err()
                .contains("not visible")
        );
        let sh = PeerPolicy {
            uid: 0,
            exe: Some("/bin/sh".into()),
        };
        assert!(sh.check(&root).unwrap_err().contains("not /bin/sh"));
    }

    #[tokio::test]
    async fn lines_are_bounded() {
        let mut r = tokio::io::BufReader::with_capacity(16, &b"hello\nworld"[..]);
        assert_eq!(read_line_bounded(&mut r, 100).await.unwrap(), b"hello");
        assert_eq!(read_line_bounded(&mut r, 100).await.unwrap(), b"world");
        assert!(matches!(
            read_line_bounded(&mut r, 100).await,
            Err(LineError::Closed)
        ));
        // Exactly the limit is fine; one more byte is not.
        let data = [vec![b'a'; 64], b"\n".to_vec()].concat();
        let mut r = tokio::io::BufReader::with_capacity(16, &data[..]);
        assert_eq!(read_line_bounded(&mut r, 64).await.unwrap().len(), 64);
        let mut r = tokio::io::BufReader::with_capacity(16, &data[..]);
        assert!(matches!(
            read_line_bounded(&mut r, 63).await,
            Err(LineError::TooLong)
        ));
        // A huge line stops being read at the limit.
        let huge = vec![b'x'; 10 << 20];
        let mut src = &huge[..];
        let mut r = tokio::io::BufReader::with_capacity(4096, &mut src);
        assert!(matches!(
            read_line_bounded(&mut r, MAX_LINE).await,
            Err(LineError::TooLong)
        ));
        drop(r);
        assert!(
            src.len() >= huge.len() - MAX_LINE - 4096,
            "read {} bytes of a {} byte line",
            huge.len() - src.len(),
            huge.len()
        );
    }

    #[test]
    fn sockets_and_directories_are_private() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("run");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let sock = dir.join("agent.sock");
        std::fs::write(&sock, "not a socket").unwrap();
        assert!(
            rt.block_on(async { bind_stream(&sock, 0).map(|_| ()) })
                .unwrap_err()
                .contains("not a socket")
        );
        std::fs::remove_file(&sock).unwrap();
        let _l = rt.block_on(async { bind_stream(&sock, 0) }).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&sock), 0o600);
        // A stale socket is replaced.
        drop(_l);
        let _l = rt.block_on(async { bind_stream(&sock, 0) }).unwrap();
        // A symlinked directory is refused.
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&dir, &link).unwrap();
        assert!(private_dir(&link, 0).unwrap_err().contains("symlink"));
    }
}
