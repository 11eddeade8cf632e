//! Standalone mode without a node agent: pods and their netns paths come from a file and
//! are served to the workload manager over a socketpair, through the same ZDS code path.

use super::zds::{ZdsConnection, send_with_fds};
use mesh_proto::prost::Message;
use mesh_proto::zds;
use nix::sys::socket::{AddressFamily, MsgFlags, SockFlag, SockType, recv, socketpair};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;

#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PodFile {
    pub pods: Vec<PodEntry>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PodEntry {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    #[serde(default)]
    pub service_account: String,
    /// e.g. /var/run/netns/<name>
    pub netns: String,
}

pub fn load(path: &Path) -> Result<PodFile, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_saphyr::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// Starts a thread that plays the node agent for `pods`; returns our end of the socket.
pub fn serve(pods: PodFile) -> std::io::Result<ZdsConnection> {
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(std::io::Error::from)?;
    let nonblocking = nix::fcntl::fcntl(&ours, nix::fcntl::FcntlArg::F_GETFL)
        .map(nix::fcntl::OFlag::from_bits_truncate)
        .map_err(std::io::Error::from)?;
    nix::fcntl::fcntl(
        &ours,
        nix::fcntl::FcntlArg::F_SETFL(nonblocking | nix::fcntl::OFlag::O_NONBLOCK),
    )
    .map_err(std::io::Error::from)?;
    std::thread::Builder::new()
        .name("podfile-zds".into())
        .spawn(move || {
            if let Err(e) = play_agent(theirs, pods) {
                tracing::error!(error = %e, "pod file server stopped");
            }
        })?;
    ZdsConnection::from_fd(ours).map_err(|e| std::io::Error::other(e.to_string()))
}

fn play_agent(sock: OwnedFd, pods: PodFile) -> Result<(), String> {
    let fd = sock.as_raw_fd();
    let ack = |what: &str| -> Result<(), String> {
        let mut buf = [0u8; 1024];
        let n = recv(fd, &mut buf, MsgFlags::empty()).map_err(|e| e.to_string())?;
        let resp = zds::WorkloadResponse::decode(&buf[..n]).map_err(|e| e.to_string())?;
        if let Some(zds::workload_response::Payload::Ack(a)) = resp.payload
            && !a.error.is_empty()
        {
            tracing::error!(pod = what, error = %a.error, "ztunnel refused pod");
        }
        Ok(())
    };
    for p in pods.pods {
        let ns = std::fs::File::open(&p.netns).map_err(|e| format!("{}: {e}", p.netns))?;
        let req = zds::WorkloadRequest {
            payload: Some(zds::workload_request::Payload::Add(zds::AddWorkload {
                uid: p.uid.clone(),
                workload_info: Some(zds::WorkloadInfo {
                    name: p.name.clone(),
                    namespace: p.namespace.clone(),
                    service_account: p.service_account.clone(),
                }),
            })),
        };
        send_with_fds(fd, &req.encode_to_vec(), &[ns.as_raw_fd()]).map_err(|e| e.to_string())?;
        ack(&p.name)?;
    }
    let done = zds::WorkloadRequest {
        payload: Some(zds::workload_request::Payload::SnapshotSent(
            zds::SnapshotSent {},
        )),
    };
    send_with_fds(fd, &done.encode_to_vec(), &[]).map_err(|e| e.to_string())?;
    ack("snapshot")?;
    // Keep our end open so the manager does not see the agent leave.
    loop {
        std::thread::park();
    }
}
