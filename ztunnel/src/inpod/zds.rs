//! ZDS client: the node agent hands us pods (with their netns fd) over a unix
//! SOCK_SEQPACKET socket, one protobuf message per datagram, each acked. The codec, the
//! order rules and the framing are `mesh_proto::zds`, shared with the agent; here the
//! Add's fd becomes a `Netns` (refused unless it is one).

use crate::netns::Netns;
use mesh_proto::zds::socket::{ClientConn, SeqPacket};
use mesh_proto::zds::{ProtocolError, Request};
use std::os::fd::OwnedFd;
use std::path::Path;

pub use mesh_proto::zds::ZdsError;

/// A request from the node agent, its netns checked.
pub type ZdsEvent = Request<Netns>;

/// Turns an Add's fd into a `Netns`, refusing any other kind of file.
fn with_netns(req: Request<OwnedFd>) -> Result<ZdsEvent, ZdsError> {
    let uid = req.uid().unwrap_or_default().to_string();
    req.try_map_netns(|fd| {
        Netns::from_fd(fd).map_err(|e| {
            ZdsError::from(ProtocolError::NotANamespace {
                uid,
                reason: e.to_string(),
            })
        })
    })
}

/// Interprets one datagram and the fds that came with it (the fuzz target's entry).
pub fn decode_request(buf: &[u8], fds: Vec<OwnedFd>) -> Result<ZdsEvent, ZdsError> {
    with_netns(mesh_proto::zds::decode_request(buf, fds)?)
}

/// One connection to the node agent.
pub struct ZdsConnection(ClientConn);

impl ZdsConnection {
    /// Connects and says hello, advertising `handover.v1`.
    pub async fn connect(path: &Path) -> Result<Self, ZdsError> {
        Self::connect_with(path, &[mesh_proto::zds_capability::HANDOVER_V1]).await
    }

    /// Connects and says hello with these capabilities (none: exactly Istio's hello).
    pub async fn connect_with(path: &Path, capabilities: &[&str]) -> Result<Self, ZdsError> {
        Ok(ZdsConnection(
            ClientConn::connect(path, capabilities).await?,
        ))
    }

    /// Says our hello on an already connected socket (e.g. one end of a socketpair).
    pub async fn over(sock: SeqPacket) -> Result<Self, ZdsError> {
        Ok(ZdsConnection(
            ClientConn::over(sock, &[mesh_proto::zds_capability::HANDOVER_V1]).await?,
        ))
    }

    /// Receives one request (and its netns); one out of order ends the connection.
    pub async fn recv(&self) -> Result<ZdsEvent, ZdsError> {
        with_netns(self.0.recv().await?)
    }

    /// Acks the request received last (`error`: why it was refused).
    pub async fn ack(&self, error: Option<&str>) -> Result<(), ZdsError> {
        self.0.ack(error).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_proto::prost::Message;
    use mesh_proto::zds;
    use mesh_proto::zds::socket::ServerConn;
    use nix::sys::socket::{self, AddressFamily, SockFlag, SockType};
    use std::os::fd::AsFd;
    use std::time::Duration;

    fn add(uid: &str) -> Vec<u8> {
        zds::WorkloadRequest {
            payload: Some(zds::workload_request::Payload::Add(zds::AddWorkload {
                uid: uid.into(),
                workload_info: None,
            })),
        }
        .encode_to_vec()
    }

    #[test]
    fn an_add_must_carry_a_network_namespace() {
        let ns = OwnedFd::from(std::fs::File::open("/proc/self/ns/net").unwrap());
        match decode_request(&add("u"), vec![ns]).unwrap() {
            ZdsEvent::Add { uid, netns, .. } => {
                assert_eq!(uid, "u");
                assert_eq!(
                    netns.inode(),
                    Netns::open("/proc/self/ns/net").unwrap().inode()
                );
            }
            other => panic!("{other:?}"),
        }
        let not_ns = OwnedFd::from(std::fs::File::open("/proc/self/status").unwrap());
        assert!(matches!(
            decode_request(&add("u"), vec![not_ns]),
            Err(ZdsError::Protocol(ProtocolError::NotANamespace { ref uid, .. })) if uid == "u"
        ));
    }

    #[tokio::test]
    async fn the_agent_and_ztunnel_ends_agree() {
        let (a, b) = socket::socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        )
        .unwrap();
        let agent = ServerConn::new(SeqPacket::from_fd(b).unwrap());
        let (client, hello) = tokio::join!(
            ZdsConnection::over(SeqPacket::from_fd(a).unwrap()),
            agent.hello(Duration::from_secs(5))
        );
        let client = client.unwrap();
        assert!(mesh_proto::zds::offers_handover(&hello.unwrap()));
        let ns = std::fs::File::open("/proc/self/ns/net").unwrap();
        let req = zds::WorkloadRequest::decode(add("pod-1").as_slice()).unwrap();
        let (sent, got) = tokio::join!(
            agent.request(&req, Some(ns.as_fd()), Duration::from_secs(5)),
            async {
                let ev = client.recv().await.unwrap();
                client.ack(None).await.unwrap();
                ev
            }
        );
        sent.unwrap();
        assert!(matches!(got, ZdsEvent::Add { ref uid, .. } if uid == "pod-1"));
    }
}
