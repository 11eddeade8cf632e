//! Network namespaces handed to us by the node agent, and running code inside them.
//!
//! Sockets belong to the namespace they were created in, so ztunnel enters a pod's
//! namespace just long enough to create a socket (synchronously, on the current thread)
//! and returns; the socket is then used from anywhere.

use nix::sched::{CloneFlags, setns};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::sync::{Arc, OnceLock};

/// `NSFS_MAGIC` from linux/magic.h: the filesystem type of namespace file descriptors.
const NSFS_MAGIC: i64 = 0x6e73_6673;

/// An open handle on a network namespace.
#[derive(Debug, Clone)]
pub struct Netns {
    fd: Arc<OwnedFd>,
    inode: u64,
}

impl PartialEq for Netns {
    fn eq(&self, other: &Self) -> bool {
        self.inode == other.inode
    }
}

/// The namespace ztunnel itself runs in, captured once at start-up.
fn home() -> &'static Netns {
    static HOME: OnceLock<Netns> = OnceLock::new();
    HOME.get_or_init(|| {
        Netns::open("/proc/self/ns/net").expect("cannot open our own network namespace")
    })
}

impl Netns {
    /// Takes ownership of `fd` after checking it is a network namespace.
    pub fn from_fd(fd: OwnedFd) -> io::Result<Self> {
        let fs = nix::sys::statfs::fstatfs(&fd).map_err(io::Error::from)?;
        if fs.filesystem_type().0 as i64 != NSFS_MAGIC {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the file descriptor is not a namespace (nsfs)",
            ));
        }
        let inode = File::from(fd.try_clone()?).metadata()?.ino();
        Ok(Netns {
            fd: Arc::new(fd),
            inode,
        })
    }

    pub fn open(path: &str) -> io::Result<Self> {
        let file = File::open(path)
            .map_err(|e| io::Error::new(e.kind(), format!("open netns {path}: {e}")))?;
        Self::from_fd(OwnedFd::from(file))
    }

    /// Records the home namespace. Call once at start-up, before any `run`.
    pub fn init_home() -> io::Result<()> {
        let _ = home();
        Ok(())
    }

    /// Identifies the namespace (a re-created pod sandbox gets a new inode).
    pub fn inode(&self) -> u64 {
        self.inode
    }

    pub fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Runs `f` with the current thread inside this namespace, then returns home.
    /// `f` must not block or await: it runs on whatever thread called us.
    pub fn run<T>(&self, f: impl FnOnce() -> T) -> io::Result<T> {
        if self.inode == home().inode {
            return Ok(f());
        }
        setns(self.fd.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|e| {
            io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "setns into pod network namespace failed ({e}); ztunnel needs CAP_SYS_ADMIN"
                ),
            )
        })?;
        let out = f();
        // A thread left in a pod's namespace would send other pods' traffic from it.
        setns(home().fd.as_fd(), CloneFlags::CLONE_NEWNET)
            .expect("cannot return to ztunnel's own network namespace");
        Ok(out)
    }
}
