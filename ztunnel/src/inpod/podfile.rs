//! Standalone mode without a node agent: pods and their netns paths come from a file and
//! are served to the workload manager over a socketpair, through the same ZDS code path.

use mesh_proto::prost::Message;
use mesh_proto::zds;
use mesh_proto::zds::socket::{SeqPacket, recv_blocking, send_blocking};
use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
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

/// Starts a thread that plays the node agent for `pods`; returns our end of the socket
/// (the workload manager says hello on it).
pub fn serve(pods: PodFile) -> std::io::Result<SeqPacket> {
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(std::io::Error::from)?;
    std::thread::Builder::new()
        .name("podfile-zds".into())
        .spawn(move || {
            if let Err(e) = play_agent(theirs, pods) {
                tracing::error!(error = %e, "pod file server stopped");
            }
        })?;
    SeqPacket::from_fd(ours)
}

fn play_agent(sock: OwnedFd, pods: PodFile) -> Result<(), String> {
    let fd = sock.as_fd();
    zds::decode_hello(&recv_blocking(fd).map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
    let ack = |what: &str| -> Result<(), String> {
        match zds::decode_ack(&recv_blocking(fd).map_err(|e| e.to_string())?) {
            Err(zds::ZdsError::Refused(error)) => {
                tracing::error!(pod = what, %error, "ztunnel refused pod");
                Ok(())
            }
            r => r.map_err(|e| e.to_string()),
        }
    };
    for p in pods.pods {
        let ns = std::fs::File::open(&p.netns).map_err(|e| format!("{}: {e}", p.netns))?;
        let (req, _) = zds::Request::Add {
            uid: p.uid.clone(),
            info: zds::WorkloadInfo {
                name: p.name.clone(),
                namespace: p.namespace.clone(),
                service_account: p.service_account.clone(),
            },
            netns: (),
        }
        .into_wire();
        send_blocking(fd, &req.encode_to_vec(), &[ns.as_raw_fd()]).map_err(|e| e.to_string())?;
        ack(&p.name)?;
    }
    let (done, _) = zds::Request::<()>::SnapshotSent.into_wire();
    send_blocking(fd, &done.encode_to_vec(), &[]).map_err(|e| e.to_string())?;
    ack("snapshot")?;
    // Keep our end open so the manager does not see the agent leave.
    loop {
        std::thread::park();
    }
}
