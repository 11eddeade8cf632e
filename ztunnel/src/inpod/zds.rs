//! ZDS client: the node agent hands us pods (with their netns fd) over a unix
//! SOCK_SEQPACKET socket, one protobuf message per datagram, each acked.

use super::netns::Netns;
use mesh_proto::prost::Message;
use mesh_proto::zds;
use nix::sys::socket::{
    self, AddressFamily, ControlMessageOwned, MsgFlags, SockFlag, SockType, UnixAddr,
};
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// Receive buffer size; the reference uses 1024 bytes on both sides.
const MAX_MESSAGE: usize = 1024;

#[derive(Debug)]
pub enum ZdsEvent {
    Add {
        uid: String,
        info: zds::WorkloadInfo,
        netns: Netns,
    },
    Keep {
        uid: String,
    },
    Del {
        uid: String,
    },
    SnapshotSent,
    /// Our extension: a newer ztunnel took the node; stop accepting, keep open
    /// connections, exit once they end and a SIGTERM came.
    Handover,
}

#[derive(Debug, thiserror::Error)]
pub enum ZdsError {
    #[error("ZDS socket: {0}")]
    Io(#[from] io::Error),
    #[error("the node agent closed the connection")]
    Closed,
    #[error("ZDS message was truncated (more than {MAX_MESSAGE} bytes or too many fds)")]
    Truncated,
    #[error("malformed ZDS message: {0}")]
    Decode(#[from] mesh_proto::prost::DecodeError),
    #[error("ZDS protocol violation: {0}")]
    Protocol(String),
}

/// Interprets one datagram and the fds that came with it. Pure apart from validating
/// the netns fd.
pub fn decode_request(buf: &[u8], mut fds: Vec<OwnedFd>) -> Result<ZdsEvent, ZdsError> {
    use zds::workload_request::Payload;
    let req = zds::WorkloadRequest::decode(buf)?;
    let expect_fd = matches!(req.payload, Some(Payload::Add(_)));
    match (expect_fd, fds.len()) {
        (true, 1) | (false, 0) => {}
        (true, n) => {
            return Err(ZdsError::Protocol(format!(
                "Add must carry exactly one netns fd, got {n}"
            )));
        }
        (false, n) => {
            return Err(ZdsError::Protocol(format!(
                "only Add carries fds, got {n} with another message"
            )));
        }
    }
    match req.payload {
        Some(Payload::Add(add)) => {
            if add.uid.is_empty() {
                return Err(ZdsError::Protocol("Add without uid".into()));
            }
            let netns = Netns::from_fd(fds.pop().expect("checked one fd"))
                .map_err(|e| ZdsError::Protocol(format!("Add {}: {e}", add.uid)))?;
            Ok(ZdsEvent::Add {
                uid: add.uid,
                info: add.workload_info.unwrap_or_default(),
                netns,
            })
        }
        Some(Payload::Keep(k)) => Ok(ZdsEvent::Keep { uid: k.uid }),
        Some(Payload::Del(d)) => Ok(ZdsEvent::Del { uid: d.uid }),
        Some(Payload::SnapshotSent(_)) => Ok(ZdsEvent::SnapshotSent),
        Some(Payload::Handover(_)) => Ok(ZdsEvent::Handover),
        None => Err(ZdsError::Protocol("empty WorkloadRequest".into())),
    }
}

pub fn encode_ack(error: Option<&str>) -> Vec<u8> {
    zds::WorkloadResponse {
        payload: Some(zds::workload_response::Payload::Ack(zds::Ack {
            error: error.unwrap_or_default().to_string(),
        })),
    }
    .encode_to_vec()
}

/// One connection to the node agent.
pub struct ZdsConnection {
    fd: AsyncFd<OwnedFd>,
}

impl ZdsConnection {
    /// Connects and says hello, advertising `handover.v1`.
    pub async fn connect(path: &Path) -> Result<Self, ZdsError> {
        Self::connect_with(path, &[mesh_proto::zds_capability::HANDOVER_V1]).await
    }

    /// Connects and says hello with these capabilities (none: exactly Istio's hello).
    pub async fn connect_with(path: &Path, capabilities: &[&str]) -> Result<Self, ZdsError> {
        let fd = socket::socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )
        .map_err(io::Error::from)?;
        let addr = UnixAddr::new(path).map_err(io::Error::from)?;
        match socket::connect(fd.as_raw_fd(), &addr) {
            Ok(()) => {}
            Err(nix::errno::Errno::EINPROGRESS) | Err(nix::errno::Errno::EAGAIN) => {}
            Err(e) => {
                return Err(ZdsError::Io(io::Error::new(
                    io::Error::from(e).kind(),
                    format!("connect to node agent at {}: {e}", path.display()),
                )));
            }
        }
        let conn = Self::from_fd(fd)?;
        conn.send(
            &zds::ZdsHello {
                version: zds::Version::V1 as i32,
                capabilities: capabilities.iter().map(|c| c.to_string()).collect(),
            }
            .encode_to_vec(),
        )
        .await?;
        Ok(conn)
    }

    /// Wraps an already connected SOCK_SEQPACKET socket (e.g. one end of a socketpair).
    pub fn from_fd(fd: OwnedFd) -> Result<Self, ZdsError> {
        // SAFETY: `fd` is an OwnedFd moved into the AsyncFd: it stays open and refers to
        // the same socket until the AsyncFd is dropped, which is all registration requires.
        #[allow(unsafe_code)]
        let fd =
            unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE | Interest::WRITABLE) }
                .map_err(|e| ZdsError::Io(io::Error::other(e.to_string())))?;
        Ok(ZdsConnection { fd })
    }

    pub async fn send(&self, msg: &[u8]) -> Result<(), ZdsError> {
        loop {
            let mut guard = self.fd.writable().await?;
            match guard.try_io(|fd| {
                socket::sendmsg::<()>(
                    fd.as_raw_fd(),
                    &[IoSlice::new(msg)],
                    &[],
                    MsgFlags::MSG_NOSIGNAL,
                    None,
                )
                .map_err(io::Error::from)
            }) {
                Ok(r) => return r.map(|_| ()).map_err(ZdsError::Io),
                Err(_would_block) => continue,
            }
        }
    }

    pub async fn ack(&self, error: Option<&str>) -> Result<(), ZdsError> {
        self.send(&encode_ack(error)).await
    }

    /// Receives one request (and its fds).
    pub async fn recv(&self) -> Result<ZdsEvent, ZdsError> {
        let mut buf = [0u8; MAX_MESSAGE];
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|fd| recv_with_fds(fd.as_raw_fd(), &mut buf)) {
                Ok(Ok((0, _))) => return Err(ZdsError::Closed),
                Ok(Ok((n, fds))) => return decode_request(&buf[..n], fds),
                Ok(Err(e)) if e.kind() == io::ErrorKind::InvalidData => {
                    return Err(ZdsError::Truncated);
                }
                Ok(Err(e)) => return Err(ZdsError::Io(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

fn recv_with_fds(fd: RawFd, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut cmsg = nix::cmsg_space!([RawFd; 2]);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = socket::recvmsg::<()>(fd, &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC)
        .map_err(io::Error::from)?;
    let mut fds = Vec::new();
    for c in msg.cmsgs().map_err(io::Error::from)? {
        if let ControlMessageOwned::ScmRights(raw) = c {
            for r in raw {
                // SAFETY: SCM_RIGHTS just installed `r` in our fd table (with CLOEXEC);
                // nothing else refers to it, so taking ownership is sound and ensures it
                // is closed exactly once.
                #[allow(unsafe_code)]
                fds.push(unsafe { OwnedFd::from_raw_fd(r) });
            }
        }
    }
    if msg
        .flags
        .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC)
    {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "truncated"));
    }
    Ok((msg.bytes, fds))
}

/// Sends one message with optional fds (the server side; used by the standalone pod file
/// mode and by tests).
pub fn send_with_fds(fd: RawFd, msg: &[u8], fds: &[RawFd]) -> io::Result<()> {
    let cmsgs = if fds.is_empty() {
        vec![]
    } else {
        vec![socket::ControlMessage::ScmRights(fds)]
    };
    socket::sendmsg::<()>(
        fd,
        &[IoSlice::new(msg)],
        &cmsgs,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .map(|_| ())
    .map_err(io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_requires_exactly_one_fd() {
        let add = zds::WorkloadRequest {
            payload: Some(zds::workload_request::Payload::Add(zds::AddWorkload {
                uid: "u".into(),
                workload_info: None,
            })),
        }
        .encode_to_vec();
        assert!(matches!(
            decode_request(&add, vec![]),
            Err(ZdsError::Protocol(_))
        ));
        let ns = OwnedFd::from(std::fs::File::open("/proc/self/ns/net").unwrap());
        match decode_request(&add, vec![ns]).unwrap() {
            ZdsEvent::Add { uid, .. } => assert_eq!(uid, "u"),
            other => panic!("{other:?}"),
        }
        // A file that is not a namespace is refused.
        let not_ns = OwnedFd::from(std::fs::File::open("/proc/self/status").unwrap());
        assert!(decode_request(&add, vec![not_ns]).is_err());
    }

    #[test]
    fn other_messages_carry_no_fds() {
        let del = zds::WorkloadRequest {
            payload: Some(zds::workload_request::Payload::Del(zds::DelWorkload {
                uid: "u".into(),
            })),
        }
        .encode_to_vec();
        assert!(matches!(
            decode_request(&del, vec![]).unwrap(),
            ZdsEvent::Del { uid } if uid == "u"
        ));
        let ns = OwnedFd::from(std::fs::File::open("/proc/self/ns/net").unwrap());
        assert!(decode_request(&del, vec![ns]).is_err());
        assert!(decode_request(&[0xff, 0xff], vec![]).is_err());
        assert!(decode_request(&[], vec![]).is_err(), "empty request");
    }

    #[test]
    fn handover_decodes_and_carries_no_fds() {
        let h = zds::WorkloadRequest {
            payload: Some(zds::workload_request::Payload::Handover(zds::Handover {})),
        }
        .encode_to_vec();
        assert!(matches!(
            decode_request(&h, vec![]).unwrap(),
            ZdsEvent::Handover
        ));
        let ns = OwnedFd::from(std::fs::File::open("/proc/self/ns/net").unwrap());
        assert!(decode_request(&h, vec![ns]).is_err());
    }

    #[tokio::test]
    async fn fd_passing_over_a_socketpair() {
        let (a, b) = socket::socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        )
        .unwrap();
        let client = ZdsConnection::from_fd(a).unwrap();
        let ns = std::fs::File::open("/proc/self/ns/net").unwrap();
        let add = zds::WorkloadRequest {
            payload: Some(zds::workload_request::Payload::Add(zds::AddWorkload {
                uid: "pod-1".into(),
                workload_info: Some(zds::WorkloadInfo {
                    name: "p".into(),
                    namespace: "ns".into(),
                    service_account: "sa".into(),
                }),
            })),
        };
        send_with_fds(b.as_raw_fd(), &add.encode_to_vec(), &[ns.as_raw_fd()]).unwrap();
        match client.recv().await.unwrap() {
            ZdsEvent::Add { uid, info, netns } => {
                assert_eq!(uid, "pod-1");
                assert_eq!(info.namespace, "ns");
                let ours = Netns::open("/proc/self/ns/net").unwrap();
                assert_eq!(
                    netns.inode(),
                    ours.inode(),
                    "the fd refers to the namespace sent"
                );
            }
            other => panic!("{other:?}"),
        }
        client.ack(None).await.unwrap();
        let mut buf = [0u8; 64];
        let n = socket::recv(b.as_raw_fd(), &mut buf, MsgFlags::empty()).unwrap();
        let resp = zds::WorkloadResponse::decode(&buf[..n]).unwrap();
        assert_eq!(
            resp,
            zds::WorkloadResponse::decode(encode_ack(None).as_slice()).unwrap()
        );
        drop(b);
        assert!(matches!(client.recv().await, Err(ZdsError::Closed)));
    }
}
