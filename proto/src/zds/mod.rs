//! ZDS, the node agent ↔ ztunnel contract: Istio's messages (generated, re-exported
//! here so `mesh_proto::zds::WorkloadRequest` names them), their codec, the legal order
//! of them (`session`) and the unix SOCK_SEQPACKET framing with fd passing (`socket`).
//! Both ends use this one module: the node agent (server) and ztunnel (client).
//!
//! On the wire: ztunnel connects and sends a `ZdsHello`; the agent sends a snapshot (an
//! `Add` carrying the pod's netns fd in SCM_RIGHTS, or a `Keep`), then `SnapshotSent`,
//! then incremental `Add`/`Del`; ztunnel answers every request with one `Ack` before the
//! next is sent. One protobuf message per datagram, at most `MAX_MESSAGE` bytes. Our
//! extension: a hello listing `handover.v1` (field 100, which Istio's decoder skips) may
//! be sent a `Handover` (field 100 of the request) once the snapshot is done.

pub use crate::generated::istio::workload::zds::*;

pub mod session;
pub mod socket;

pub use session::{OrderError, Session};

use crate::prost::Message;
use std::os::fd::OwnedFd;

/// Receive buffer size; the reference uses 1024 bytes on both sides.
pub const MAX_MESSAGE: usize = 1024;

/// What a request is, for the session's order rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Add,
    Keep,
    Del,
    SnapshotSent,
    Handover,
}

impl Kind {
    /// The kind of a wire request (`None`: no payload, or one we do not know).
    pub fn of(req: &WorkloadRequest) -> Option<Kind> {
        use workload_request::Payload;
        Some(match req.payload.as_ref()? {
            Payload::Add(_) => Kind::Add,
            Payload::Keep(_) => Kind::Keep,
            Payload::Del(_) => Kind::Del,
            Payload::SnapshotSent(_) => Kind::SnapshotSent,
            Payload::Handover(_) => Kind::Handover,
        })
    }

    /// How many fds travel with it: the netns with an Add, none otherwise.
    pub fn fds(self) -> usize {
        match self {
            Kind::Add => 1,
            _ => 0,
        }
    }
}

/// Errors of a ZDS connection, typed where callers branch on them (a refusal leaves the
/// connection usable; everything else ends it).
#[derive(Debug, thiserror::Error)]
pub enum ZdsError {
    #[error("ZDS socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("the peer closed the ZDS connection")]
    Closed,
    #[error("ZDS message was truncated (more than {MAX_MESSAGE} bytes or too many fds)")]
    Truncated,
    #[error("malformed ZDS message: {0}")]
    Decode(#[from] crate::prost::DecodeError),
    #[error("ZDS protocol violation: {0}")]
    Protocol(#[from] ProtocolError),
    /// ztunnel acked with an error: it has no proxy for the pod (the connection is fine).
    #[error("ztunnel refused: {0}")]
    Refused(String),
    #[error("timed out waiting for the peer's {0}")]
    Timeout(&'static str),
}

impl ZdsError {
    /// Whether the connection can go on after this error (only a refusal leaves it so).
    pub fn is_refusal(&self) -> bool {
        matches!(self, ZdsError::Refused(_))
    }

    /// Whether it was raised before anything was sent (a request that is not legal with
    /// its fds): the connection is untouched and can go on.
    pub fn is_unsent(&self) -> bool {
        matches!(
            self,
            ZdsError::Protocol(
                ProtocolError::EmptyRequest
                    | ProtocolError::AddFds(_)
                    | ProtocolError::StrayFds { .. }
            )
        )
    }
}

impl From<OrderError> for ZdsError {
    fn from(e: OrderError) -> Self {
        ZdsError::Protocol(ProtocolError::Order(e))
    }
}

/// A message that is well-formed protobuf but not a legal ZDS message here.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("Add must carry exactly one netns fd, got {0}")]
    AddFds(usize),
    #[error("only Add carries fds, got {got} with {kind:?}")]
    StrayFds { kind: Kind, got: usize },
    #[error("the peer sent file descriptors; it never should")]
    UnexpectedFds,
    #[error("Add without uid")]
    AddWithoutUid,
    #[error("Add {uid}: its fd is not a network namespace: {reason}")]
    NotANamespace { uid: String, reason: String },
    #[error("empty WorkloadRequest")]
    EmptyRequest,
    #[error("empty WorkloadResponse")]
    EmptyResponse,
    #[error("unsupported ZDS version {0}")]
    Version(i32),
    #[error("{0}")]
    Order(#[from] OrderError),
}

/// A decoded request, with the netns fd an Add carries as `F` (an `OwnedFd` as
/// received; the receiver may turn it into its own namespace type with `try_map_netns`).
#[derive(Debug)]
pub enum Request<F> {
    Add {
        uid: String,
        info: WorkloadInfo,
        netns: F,
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

impl<F> Request<F> {
    pub fn kind(&self) -> Kind {
        match self {
            Request::Add { .. } => Kind::Add,
            Request::Keep { .. } => Kind::Keep,
            Request::Del { .. } => Kind::Del,
            Request::SnapshotSent => Kind::SnapshotSent,
            Request::Handover => Kind::Handover,
        }
    }

    pub fn uid(&self) -> Option<&str> {
        match self {
            Request::Add { uid, .. } | Request::Keep { uid } | Request::Del { uid } => Some(uid),
            Request::SnapshotSent | Request::Handover => None,
        }
    }

    /// Converts an Add's fd (e.g. validates it is a network namespace).
    pub fn try_map_netns<G, E>(self, f: impl FnOnce(F) -> Result<G, E>) -> Result<Request<G>, E> {
        Ok(match self {
            Request::Add { uid, info, netns } => Request::Add {
                uid,
                info,
                netns: f(netns)?,
            },
            Request::Keep { uid } => Request::Keep { uid },
            Request::Del { uid } => Request::Del { uid },
            Request::SnapshotSent => Request::SnapshotSent,
            Request::Handover => Request::Handover,
        })
    }

    /// The wire message (the fd travels beside it) and the fd.
    pub fn into_wire(self) -> (WorkloadRequest, Option<F>) {
        use workload_request::Payload;
        let (payload, fd) = match self {
            Request::Add { uid, info, netns } => (
                Payload::Add(AddWorkload {
                    uid,
                    workload_info: Some(info),
                }),
                Some(netns),
            ),
            Request::Keep { uid } => (Payload::Keep(KeepWorkload { uid }), None),
            Request::Del { uid } => (Payload::Del(DelWorkload { uid }), None),
            Request::SnapshotSent => (Payload::SnapshotSent(SnapshotSent {}), None),
            Request::Handover => (Payload::Handover(Handover {}), None),
        };
        (
            WorkloadRequest {
                payload: Some(payload),
            },
            fd,
        )
    }
}

/// Interprets one datagram and the fds that came with it: an Add carries exactly one,
/// nothing else carries any.
pub fn decode_request(buf: &[u8], mut fds: Vec<OwnedFd>) -> Result<Request<OwnedFd>, ZdsError> {
    use workload_request::Payload;
    let req = WorkloadRequest::decode(buf)?;
    let kind = Kind::of(&req).ok_or(ProtocolError::EmptyRequest)?;
    match (kind, fds.len()) {
        (Kind::Add, 1) => {}
        (Kind::Add, n) => return Err(ProtocolError::AddFds(n).into()),
        (_, 0) => {}
        (kind, got) => return Err(ProtocolError::StrayFds { kind, got }.into()),
    }
    Ok(match req.payload.ok_or(ProtocolError::EmptyRequest)? {
        Payload::Add(add) => {
            if add.uid.is_empty() {
                return Err(ProtocolError::AddWithoutUid.into());
            }
            Request::Add {
                uid: add.uid,
                info: add.workload_info.unwrap_or_default(),
                netns: fds.pop().expect("checked one fd"),
            }
        }
        Payload::Keep(k) => Request::Keep { uid: k.uid },
        Payload::Del(d) => Request::Del { uid: d.uid },
        Payload::SnapshotSent(_) => Request::SnapshotSent,
        Payload::Handover(_) => Request::Handover,
    })
}

/// ztunnel's hello: version 1 and these capabilities (none: exactly Istio's hello).
pub fn encode_hello(capabilities: &[&str]) -> Vec<u8> {
    ZdsHello {
        version: Version::V1 as i32,
        capabilities: capabilities.iter().map(|c| c.to_string()).collect(),
    }
    .encode_to_vec()
}

/// The agent's reading of a hello: only version 1 is spoken.
pub fn decode_hello(buf: &[u8]) -> Result<ZdsHello, ZdsError> {
    let hello = ZdsHello::decode(buf)?;
    if hello.version != Version::V1 as i32 {
        return Err(ProtocolError::Version(hello.version).into());
    }
    Ok(hello)
}

/// Whether a hello offers our `handover.v1` extension.
pub fn offers_handover(hello: &ZdsHello) -> bool {
    hello
        .capabilities
        .iter()
        .any(|c| c == crate::zds_capability::HANDOVER_V1)
}

/// An ack: empty error for success, else why ztunnel has no proxy for the pod.
pub fn encode_ack(error: Option<&str>) -> Vec<u8> {
    WorkloadResponse {
        payload: Some(workload_response::Payload::Ack(Ack {
            error: error.unwrap_or_default().to_string(),
        })),
    }
    .encode_to_vec()
}

/// The agent's reading of an ack: `Ok(())`, or `ZdsError::Refused` with ztunnel's reason.
pub fn decode_ack(buf: &[u8]) -> Result<(), ZdsError> {
    match WorkloadResponse::decode(buf)?.payload {
        Some(workload_response::Payload::Ack(a)) if a.error.is_empty() => Ok(()),
        Some(workload_response::Payload::Ack(a)) => Err(ZdsError::Refused(a.error)),
        None => Err(ProtocolError::EmptyResponse.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn add(uid: &str) -> Vec<u8> {
        WorkloadRequest {
            payload: Some(workload_request::Payload::Add(AddWorkload {
                uid: uid.into(),
                workload_info: None,
            })),
        }
        .encode_to_vec()
    }

    fn fd() -> OwnedFd {
        OwnedFd::from(std::fs::File::open("/proc/self/ns/net").unwrap())
    }

    #[test]
    fn add_requires_exactly_one_fd() {
        assert!(matches!(
            decode_request(&add("u"), vec![]),
            Err(ZdsError::Protocol(ProtocolError::AddFds(0)))
        ));
        assert!(matches!(
            decode_request(&add("u"), vec![fd(), fd()]),
            Err(ZdsError::Protocol(ProtocolError::AddFds(2)))
        ));
        match decode_request(&add("u"), vec![fd()]).unwrap() {
            Request::Add { uid, .. } => assert_eq!(uid, "u"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            decode_request(&add(""), vec![fd()]),
            Err(ZdsError::Protocol(ProtocolError::AddWithoutUid))
        ));
    }

    #[test]
    fn other_messages_carry_no_fds() {
        for req in [
            Request::<OwnedFd>::Del { uid: "u".into() },
            Request::Keep { uid: "u".into() },
            Request::SnapshotSent,
            Request::Handover,
        ] {
            let kind = req.kind();
            let bytes = req.into_wire().0.encode_to_vec();
            assert_eq!(decode_request(&bytes, vec![]).unwrap().kind(), kind);
            assert!(matches!(
                decode_request(&bytes, vec![fd()]),
                Err(ZdsError::Protocol(ProtocolError::StrayFds { got: 1, kind: k })) if k == kind
            ));
        }
        assert!(matches!(
            decode_request(&[0xff, 0xff], vec![]),
            Err(ZdsError::Decode(_))
        ));
        assert!(matches!(
            decode_request(&[], vec![]),
            Err(ZdsError::Protocol(ProtocolError::EmptyRequest))
        ));
    }

    #[test]
    fn requests_round_trip_through_the_wire_form() {
        let (wire, fd) = Request::Add {
            uid: "u1".into(),
            info: WorkloadInfo {
                name: "p".into(),
                namespace: "ns".into(),
                service_account: "sa".into(),
            },
            netns: 7,
        }
        .into_wire();
        assert_eq!(fd, Some(7));
        assert_eq!(Kind::of(&wire), Some(Kind::Add));
        let back = decode_request(&wire.encode_to_vec(), vec![self::fd()]).unwrap();
        match back {
            Request::Add { uid, info, .. } => {
                assert_eq!(uid, "u1");
                assert_eq!(info.service_account, "sa");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn hello_and_ack() {
        let h = decode_hello(&encode_hello(&[crate::zds_capability::HANDOVER_V1])).unwrap();
        assert!(offers_handover(&h));
        assert!(!offers_handover(&decode_hello(&encode_hello(&[])).unwrap()));
        let v2 = ZdsHello {
            version: 2,
            capabilities: vec![],
        }
        .encode_to_vec();
        assert!(matches!(
            decode_hello(&v2),
            Err(ZdsError::Protocol(ProtocolError::Version(2)))
        ));
        decode_ack(&encode_ack(None)).unwrap();
        match decode_ack(&encode_ack(Some("no room"))) {
            Err(e @ ZdsError::Refused(_)) => {
                assert!(e.is_refusal());
                assert_eq!(e.to_string(), "ztunnel refused: no room");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            decode_ack(&WorkloadResponse { payload: None }.encode_to_vec()),
            Err(ZdsError::Protocol(ProtocolError::EmptyResponse))
        ));
    }
}
