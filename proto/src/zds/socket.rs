//! ZDS framing on a unix SOCK_SEQPACKET socket: one message per datagram, at most
//! `MAX_MESSAGE` bytes, the netns fd in SCM_RIGHTS; and the two ends built on it,
//! `ClientConn` (ztunnel) and `ServerConn` (the node agent), which check every message
//! against the `Session`.

use super::{
    Kind, MAX_MESSAGE, ProtocolError, Request, Session, WorkloadRequest, ZdsError, ZdsHello,
};
use crate::prost::Message;
use nix::sys::socket::{
    self, AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType, UnixAddr,
};
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// A connected SOCK_SEQPACKET socket on the tokio runtime.
pub struct SeqPacket {
    fd: AsyncFd<OwnedFd>,
}

/// What the peer did while it should have stayed silent.
#[derive(Debug, PartialEq, Eq)]
pub enum PeerStirred {
    Closed,
    SentData,
}

impl SeqPacket {
    /// Wraps a connected socket (nonblocking or not: every call here is MSG_DONTWAIT).
    pub fn from_fd(fd: OwnedFd) -> io::Result<Self> {
        // SAFETY: `fd` is an OwnedFd moved into the AsyncFd: it stays open and refers
        // to the same socket until the AsyncFd is dropped, which is all registration
        // requires.
        #[allow(unsafe_code)]
        let fd = unsafe {
            AsyncFd::register_with_interest(fd, Interest::READABLE | Interest::WRITABLE)
        }?;
        Ok(SeqPacket { fd })
    }

    /// Connects to a listening socket at `path`.
    pub fn connect(path: &Path) -> io::Result<Self> {
        let fd = socket::socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )?;
        let addr = UnixAddr::new(path)?;
        match socket::connect(fd.as_raw_fd(), &addr) {
            Ok(()) | Err(nix::errno::Errno::EINPROGRESS) | Err(nix::errno::Errno::EAGAIN) => {}
            Err(e) => {
                return Err(io::Error::new(
                    io::Error::from(e).kind(),
                    format!("connect to node agent at {}: {e}", path.display()),
                ));
            }
        }
        Self::from_fd(fd)
    }

    /// Sends one message with these fds (SCM_RIGHTS when any).
    pub async fn send(&self, msg: &[u8], fds: &[RawFd]) -> io::Result<()> {
        loop {
            let mut guard = self.fd.writable().await?;
            match guard.try_io(|s| send_now(s.as_raw_fd(), msg, fds)) {
                Ok(r) => return r,
                Err(_would_block) => continue,
            }
        }
    }

    /// Receives one message. With `accept_fds` its fds are returned (at most
    /// `MAX_FDS` fit: more is `Truncated`, and those that arrived are closed); without, a peer's fds are closed by the kernel, never
    /// installed here, and refused.
    pub async fn recv(&self, accept_fds: bool) -> Result<(Vec<u8>, Vec<OwnedFd>), ZdsError> {
        let mut buf = [0u8; MAX_MESSAGE];
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|s| recv_now(s.as_raw_fd(), &mut buf, accept_fds)) {
                Ok(Ok((0, _, _))) => return Err(ZdsError::Closed),
                Ok(Ok((_, flags, _))) if flags.contains(MsgFlags::MSG_TRUNC) => {
                    return Err(ZdsError::Truncated);
                }
                Ok(Ok((_, flags, _))) if flags.contains(MsgFlags::MSG_CTRUNC) => {
                    return Err(match accept_fds {
                        true => ZdsError::Truncated,
                        false => ProtocolError::UnexpectedFds.into(),
                    });
                }
                Ok(Ok((n, _, fds))) => return Ok((buf[..n].to_vec(), fds)),
                Ok(Err(e)) => return Err(ZdsError::Io(e)),
                Err(_would_block) => continue,
            }
        }
    }

    /// Waits until the peer closes or sends something, reading nothing (cancel-safe).
    /// Between requests ztunnel sends nothing: either is the end of the connection.
    pub async fn stirred(&self) -> io::Result<PeerStirred> {
        loop {
            let mut guard = self.fd.readable().await?;
            let mut b = [0u8; 1];
            match socket::recv(
                self.fd.as_raw_fd(),
                &mut b,
                MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
            ) {
                Ok(0) => return Ok(PeerStirred::Closed),
                Ok(_) => return Ok(PeerStirred::SentData),
                Err(nix::errno::Errno::EAGAIN) => guard.clear_ready(),
                Err(e) => return Err(e.into()),
            }
        }
    }
}

fn send_now(fd: RawFd, msg: &[u8], fds: &[RawFd]) -> io::Result<()> {
    let cmsgs: Vec<ControlMessage> = match fds {
        [] => vec![],
        fds => vec![ControlMessage::ScmRights(fds)],
    };
    socket::sendmsg::<()>(
        fd,
        &[IoSlice::new(msg)],
        &cmsgs,
        MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT,
        None,
    )?;
    Ok(())
}

/// Blocking send on a blocking socket (a thread playing the node agent).
pub fn send_blocking(fd: BorrowedFd<'_>, msg: &[u8], fds: &[RawFd]) -> io::Result<()> {
    let cmsgs: Vec<ControlMessage> = match fds {
        [] => vec![],
        fds => vec![ControlMessage::ScmRights(fds)],
    };
    socket::sendmsg::<()>(
        fd.as_raw_fd(),
        &[IoSlice::new(msg)],
        &cmsgs,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )?;
    Ok(())
}

/// Blocking receive of one message without fds (a thread playing the node agent).
pub fn recv_blocking(fd: BorrowedFd<'_>) -> Result<Vec<u8>, ZdsError> {
    let mut buf = [0u8; MAX_MESSAGE];
    let mut iov = [IoSliceMut::new(&mut buf)];
    let m = socket::recvmsg::<()>(fd.as_raw_fd(), &mut iov, None, MsgFlags::MSG_CMSG_CLOEXEC)
        .map_err(io::Error::from)?;
    let (n, flags) = (m.bytes, m.flags);
    match n {
        0 => Err(ZdsError::Closed),
        _ if flags.contains(MsgFlags::MSG_TRUNC) => Err(ZdsError::Truncated),
        _ if flags.contains(MsgFlags::MSG_CTRUNC) => Err(ProtocolError::UnexpectedFds.into()),
        n => Ok(buf[..n].to_vec()),
    }
}

/// The fds one message may carry (ZDS sends one); room for more, so a peer sending a
/// few too many is refused with every fd that arrived closed.
const MAX_FDS: usize = 16;

fn recv_now(
    fd: RawFd,
    buf: &mut [u8],
    accept_fds: bool,
) -> io::Result<(usize, MsgFlags, Vec<OwnedFd>)> {
    let mut space = nix::cmsg_space!([RawFd; MAX_FDS]);
    let mut iov = [IoSliceMut::new(buf)];
    let cmsg = match accept_fds {
        true => Some(&mut space[..]),
        false => None,
    };
    let (bytes, flags) = {
        let msg = socket::recvmsg::<()>(
            fd,
            &mut iov,
            cmsg,
            MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC,
        )?;
        (msg.bytes, msg.flags)
    };
    // Parsed here rather than with nix's `cmsgs()`, which refuses a truncated buffer
    // (MSG_CTRUNC) although the kernel installed the fds that fit: they must be owned
    // to be closed.
    let fds = match accept_fds {
        true => scm_rights(&space)
            .into_iter()
            .map(|r| {
                // SAFETY: SCM_RIGHTS just installed `r` in our fd table (with CLOEXEC)
                // and only this buffer names it, so taking ownership is sound and closes
                // it exactly once (also when the message is refused or truncated).
                #[allow(unsafe_code)]
                unsafe {
                    OwnedFd::from_raw_fd(r)
                }
            })
            .collect(),
        false => Vec::new(),
    };
    Ok((bytes, flags, fds))
}

/// The fds in the SCM_RIGHTS messages of a received control buffer (zeroed before the
/// receive, so the first header of length 0 ends it). A truncated buffer holds whole
/// headers for the fds the kernel installed.
fn scm_rights(control: &[u8]) -> Vec<RawFd> {
    use nix::libc::{SCM_RIGHTS, SOL_SOCKET, c_int, cmsghdr};
    let align = |n: usize| n.next_multiple_of(std::mem::size_of::<usize>());
    let header = align(std::mem::size_of::<cmsghdr>());
    let word = std::mem::size_of::<usize>();
    let int = std::mem::size_of::<c_int>();
    let read_int = |at: usize| c_int::from_ne_bytes(control[at..at + int].try_into().expect("int"));
    let mut fds = Vec::new();
    let mut at = 0;
    while at + header <= control.len() {
        // cmsghdr: cmsg_len (size_t), cmsg_level, cmsg_type (int), data aligned.
        let len = usize::from_ne_bytes(control[at..at + word].try_into().expect("size_t"));
        if len < header || at + len > control.len() {
            break;
        }
        if read_int(at + word) == SOL_SOCKET && read_int(at + word + int) == SCM_RIGHTS {
            let mut d = at + header;
            while d + int <= at + len {
                fds.push(read_int(d));
                d += int;
            }
        }
        at += align(len);
    }
    fds
}

/// ztunnel's end of a ZDS connection.
pub struct ClientConn {
    sock: SeqPacket,
    session: Mutex<Session>,
}

impl ClientConn {
    /// Connects to the node agent at `path` and says hello with `capabilities`.
    pub async fn connect(path: &Path, capabilities: &[&str]) -> Result<Self, ZdsError> {
        let conn = Self::new(SeqPacket::connect(path)?);
        conn.hello(capabilities).await?;
        Ok(conn)
    }

    /// Says hello on an already connected socket (e.g. one end of a socketpair).
    pub async fn over(sock: SeqPacket, capabilities: &[&str]) -> Result<Self, ZdsError> {
        let conn = Self::new(sock);
        conn.hello(capabilities).await?;
        Ok(conn)
    }

    fn new(sock: SeqPacket) -> Self {
        ClientConn {
            sock,
            session: Mutex::new(Session::new()),
        }
    }

    async fn hello(&self, capabilities: &[&str]) -> Result<(), ZdsError> {
        let bytes = super::encode_hello(capabilities);
        self.sock.send(&bytes, &[]).await?;
        let hello = ZdsHello::decode(bytes.as_slice())?;
        self.session().hello(&hello)?;
        Ok(())
    }

    fn session(&self) -> std::sync::MutexGuard<'_, Session> {
        self.session.lock().expect("ZDS session lock")
    }

    /// Receives the next request; one out of order ends the connection.
    pub async fn recv(&self) -> Result<Request<OwnedFd>, ZdsError> {
        let (buf, fds) = self.sock.recv(true).await?;
        let req = super::decode_request(&buf, fds)?;
        self.session().request(req.kind())?;
        Ok(req)
    }

    /// Acks the request received last (`error`: why it was refused).
    pub async fn ack(&self, error: Option<&str>) -> Result<(), ZdsError> {
        self.session().ack()?;
        self.sock.send(&super::encode_ack(error), &[]).await?;
        Ok(())
    }
}

/// The node agent's end of a ZDS connection.
pub struct ServerConn {
    sock: SeqPacket,
    session: Mutex<Session>,
}

impl ServerConn {
    pub fn new(sock: SeqPacket) -> Self {
        ServerConn {
            sock,
            session: Mutex::new(Session::new()),
        }
    }

    fn session(&self) -> std::sync::MutexGuard<'_, Session> {
        self.session.lock().expect("ZDS session lock")
    }

    /// Waits (at most `wait`) for ztunnel's hello; returns it.
    pub async fn hello(&self, wait: Duration) -> Result<ZdsHello, ZdsError> {
        let (buf, _) = tokio::time::timeout(wait, self.sock.recv(false))
            .await
            .map_err(|_| ZdsError::Timeout("hello"))??;
        let hello = super::decode_hello(&buf)?;
        self.session().hello(&hello)?;
        Ok(hello)
    }

    /// Sends one request (with the netns fd for an Add) and waits at most `wait` for its
    /// ack. `ZdsError::Refused` leaves the connection usable; any other error ends it.
    pub async fn request(
        &self,
        req: &WorkloadRequest,
        netns: Option<BorrowedFd<'_>>,
        wait: Duration,
    ) -> Result<(), ZdsError> {
        let kind = Kind::of(req).ok_or(ProtocolError::EmptyRequest)?;
        let fds: Vec<RawFd> = netns.map(|f| f.as_raw_fd()).into_iter().collect();
        match (kind, fds.len()) {
            (Kind::Add, 1) | (Kind::Keep | Kind::Del | Kind::SnapshotSent | Kind::Handover, 0) => {}
            (Kind::Add, n) => return Err(ProtocolError::AddFds(n).into()),
            (kind, got) => return Err(ProtocolError::StrayFds { kind, got }.into()),
        }
        self.session().request(kind)?;
        self.sock.send(&req.encode_to_vec(), &fds).await?;
        let (reply, _) = tokio::time::timeout(wait, self.sock.recv(false))
            .await
            .map_err(|_| ZdsError::Timeout("ack"))??;
        self.session().ack()?;
        super::decode_ack(&reply)
    }

    /// See `SeqPacket::stirred`.
    pub async fn stirred(&self) -> io::Result<PeerStirred> {
        self.sock.stirred().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::zds::{OrderError, WorkloadInfo};
    use std::os::fd::AsFd;

    fn pair() -> (SeqPacket, SeqPacket) {
        let (a, b) = socket::socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        )
        .unwrap();
        (
            SeqPacket::from_fd(a).unwrap(),
            SeqPacket::from_fd(b).unwrap(),
        )
    }

    fn inode(fd: &OwnedFd) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(format!("/proc/self/fd/{}", fd.as_raw_fd()))
            .unwrap()
            .ino()
    }

    #[tokio::test]
    async fn fds_of_a_truncated_message_are_closed() {
        let (a, b) = pair();
        // Every copy of `end` sent; once all are closed, `other` reads end-of-file.
        let (end, mut other) = std::os::unix::net::UnixStream::pair().unwrap();
        let copies = vec![end.as_raw_fd(); MAX_FDS + 3];
        a.send(b"x", &copies).await.unwrap();
        drop(end);
        assert!(matches!(b.recv(true).await, Err(ZdsError::Truncated)));
        // Closed synchronously: a copy still open reads WouldBlock, not end-of-file.
        other.set_nonblocking(true).unwrap();
        let mut byte = [0u8; 1];
        let n = std::io::Read::read(&mut other, &mut byte);
        assert_eq!(n.unwrap(), 0, "a received copy is still open");
    }

    #[tokio::test]
    async fn all_fds_of_a_message_arrive() {
        let (a, b) = pair();
        let (x, _y) = std::os::unix::net::UnixStream::pair().unwrap();
        a.send(b"x", &[x.as_raw_fd(); 3]).await.unwrap();
        let (msg, fds) = b.recv(true).await.unwrap();
        assert_eq!((msg.as_slice(), fds.len()), (&b"x"[..], 3));
        let inode = |fd: RawFd| {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(format!("/proc/self/fd/{fd}"))
                .unwrap()
                .ino()
        };
        for f in &fds {
            assert_eq!(inode(f.as_raw_fd()), inode(x.as_raw_fd()));
        }
    }

    #[tokio::test]
    async fn snapshot_with_fd_passing_between_both_ends() {
        let (a, b) = pair();
        let server = ServerConn::new(b);
        let (client, hello) = tokio::join!(
            ClientConn::over(a, &[crate::zds_capability::HANDOVER_V1]),
            server.hello(Duration::from_secs(5))
        );
        let client = client.unwrap();
        assert!(super::super::offers_handover(&hello.unwrap()));
        let ns = std::fs::File::open("/proc/self/ns/net").unwrap();
        let (add, _) = Request::Add {
            uid: "pod-1".into(),
            info: WorkloadInfo {
                name: "p".into(),
                namespace: "ns".into(),
                service_account: "sa".into(),
            },
            netns: (),
        }
        .into_wire();
        let agent = async {
            server
                .request(&add, Some(ns.as_fd()), Duration::from_secs(5))
                .await
                .unwrap();
            let (done, _) = Request::<()>::SnapshotSent.into_wire();
            let refused = server.request(&done, None, Duration::from_secs(5)).await;
            assert!(matches!(refused, Err(ZdsError::Refused(ref r)) if r == "busy"));
        };
        let ztunnel = async {
            match client.recv().await.unwrap() {
                Request::Add { uid, info, netns } => {
                    assert_eq!((uid.as_str(), info.namespace.as_str()), ("pod-1", "ns"));
                    assert_eq!(
                        inode(&netns),
                        inode(&OwnedFd::from(ns.try_clone().unwrap()))
                    );
                }
                other => panic!("{other:?}"),
            }
            client.ack(None).await.unwrap();
            assert!(matches!(
                client.recv().await.unwrap(),
                Request::SnapshotSent
            ));
            client.ack(Some("busy")).await.unwrap();
        };
        tokio::join!(agent, ztunnel);
        // The client refuses a Keep after the snapshot, as the server would not send it.
        let (keep, _) = Request::<()>::Keep { uid: "u".into() }.into_wire();
        assert!(matches!(
            server.request(&keep, None, Duration::from_secs(5)).await,
            Err(ZdsError::Protocol(ProtocolError::Order(
                OrderError::KeepAfterSnapshot
            )))
        ));
    }

    #[tokio::test]
    async fn a_client_refuses_requests_out_of_order() {
        let (a, b) = pair();
        let client = ClientConn::over(a, &[]).await.unwrap();
        // Handover to a client that did not offer it: a raw agent sends it anyway.
        let (req, _) = Request::<()>::Handover.into_wire();
        b.send(&req.encode_to_vec(), &[]).await.unwrap();
        assert!(matches!(
            client.recv().await,
            Err(ZdsError::Protocol(ProtocolError::Order(
                OrderError::HandoverBeforeSnapshot
            )))
        ));
        // An ack with nothing to ack is ours to refuse too.
        assert!(matches!(
            client.ack(None).await,
            Err(ZdsError::Protocol(ProtocolError::Order(
                OrderError::AckWithoutRequest
            )))
        ));
    }

    #[tokio::test]
    async fn the_server_refuses_fds_and_oversized_messages() {
        let (a, b) = pair();
        let server = ServerConn::new(b);
        let ns = std::fs::File::open("/proc/self/ns/net").unwrap();
        a.send(&super::super::encode_hello(&[]), &[ns.as_raw_fd()])
            .await
            .unwrap();
        assert!(matches!(
            server.hello(Duration::from_secs(5)).await,
            Err(ZdsError::Protocol(ProtocolError::UnexpectedFds))
        ));
        a.send(&[0u8; MAX_MESSAGE + 1], &[]).await.unwrap();
        assert!(matches!(
            server.hello(Duration::from_secs(5)).await,
            Err(ZdsError::Truncated)
        ));
        drop(a);
        assert_eq!(server.stirred().await.unwrap(), PeerStirred::Closed);
        assert!(matches!(
            server.hello(Duration::from_secs(5)).await,
            Err(ZdsError::Closed)
        ));
    }
}
