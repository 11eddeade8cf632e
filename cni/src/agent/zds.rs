//! ZDS server: hands enrolled pods' network namespaces to ztunnel over a unix
//! SOCK_SEQPACKET socket (the fd in SCM_RIGHTS), wire-compatible with Istio's node agent.
//! Per connection: hello, snapshot (Add with fd, or Keep), SnapshotSent, then incremental
//! messages, each acked within 5 s. New Adds go only to the newest ztunnel (upgrades run
//! two side by side); Dels go to all.

use mesh_proto::prost::Message;
use mesh_proto::zds;
use nix::sys::socket::{
    self, AddressFamily, Backlog, ControlMessage, MsgFlags, SockFlag, SockType, UnixAddr,
};
use nix::sys::time::TimeVal;
use std::fs::File;
use std::io::IoSlice;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const ACK_TIMEOUT: Duration = Duration::from_secs(5);
const LIVENESS_PERIOD: Duration = Duration::from_secs(2);

/// A pod as handed to ztunnel.
pub struct PodEntry {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    /// `None` sends Keep (in a snapshot): the pod exists but its netns is not open.
    pub netns: Option<File>,
}

struct Conn {
    id: u64,
    fd: OwnedFd,
    /// Serializes request/ack exchanges and liveness reads.
    turn: Mutex<()>,
    alive: AtomicBool,
}

impl Conn {
    fn send(&self, msg: &[u8], fds: &[i32]) -> Result<(), String> {
        let cmsgs: Vec<ControlMessage> = if fds.is_empty() {
            vec![]
        } else {
            vec![ControlMessage::ScmRights(fds)]
        };
        socket::sendmsg::<()>(
            self.fd.as_raw_fd(),
            &[IoSlice::new(msg)],
            &cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            None,
        )
        .map(|_| ())
        .map_err(|e| format!("send: {e}"))
    }

    fn recv(&self) -> Result<Vec<u8>, String> {
        let mut buf = [0u8; 1024];
        let n = socket::recv(self.fd.as_raw_fd(), &mut buf, MsgFlags::empty()).map_err(
            |e| match e {
                nix::errno::Errno::EAGAIN => "timed out waiting for ztunnel".to_string(),
                e => format!("recv: {e}"),
            },
        )?;
        if n == 0 {
            return Err("ztunnel closed the connection".into());
        }
        Ok(buf[..n].to_vec())
    }

    /// Sends one request and waits for its ack; `Err` on I/O failure or a refusal.
    fn request(&self, req: &zds::WorkloadRequest, fd: Option<&File>) -> Result<(), String> {
        let _turn = self.turn.lock().expect("conn lock");
        let fds: Vec<i32> = fd.map(|f| f.as_raw_fd()).into_iter().collect();
        let result = self.send(&req.encode_to_vec(), &fds).and_then(|_| {
            let reply = self.recv()?;
            let resp = zds::WorkloadResponse::decode(reply.as_slice())
                .map_err(|e| format!("malformed ack: {e}"))?;
            match resp.payload {
                Some(zds::workload_response::Payload::Ack(a)) if a.error.is_empty() => Ok(()),
                Some(zds::workload_response::Payload::Ack(a)) => {
                    Err(format!("ztunnel refused: {}", a.error))
                }
                None => Err("empty response from ztunnel".into()),
            }
        });
        if let Err(e) = &result
            && !e.starts_with("ztunnel refused")
        {
            self.alive.store(false, Ordering::Relaxed);
        }
        result
    }
}

fn add_request(p: &PodEntry) -> zds::WorkloadRequest {
    zds::WorkloadRequest {
        payload: Some(zds::workload_request::Payload::Add(zds::AddWorkload {
            uid: p.uid.clone(),
            workload_info: Some(zds::WorkloadInfo {
                name: p.name.clone(),
                namespace: p.namespace.clone(),
                service_account: p.service_account.clone(),
            }),
        })),
    }
}

type Snapshot = Arc<dyn Fn() -> Vec<PodEntry> + Send + Sync>;

#[derive(Clone)]
pub struct ZdsServer {
    conns: Arc<Mutex<Vec<Arc<Conn>>>>,
}

impl ZdsServer {
    /// Listens on `path` (replacing a stale socket). `snapshot` lists the pods a newly
    /// connected ztunnel must receive.
    pub fn start(path: &Path, snapshot: Snapshot) -> Result<ZdsServer, String> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        let _ = std::fs::remove_file(path);
        let fd = socket::socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(|e| format!("socket: {e}"))?;
        let addr = UnixAddr::new(path).map_err(|e| format!("{}: {e}", path.display()))?;
        socket::bind(fd.as_raw_fd(), &addr).map_err(|e| format!("bind {}: {e}", path.display()))?;
        socket::listen(&fd, Backlog::new(16).expect("valid backlog"))
            .map_err(|e| format!("listen: {e}"))?;
        let server = ZdsServer {
            conns: Arc::default(),
        };
        let s = server.clone();
        let next = Arc::new(AtomicU64::new(1));
        std::thread::Builder::new()
            .name("zds-accept".into())
            .spawn(move || {
                loop {
                    match socket::accept(fd.as_raw_fd()) {
                        Ok(raw) => {
                            // SAFETY: accept(2) just created `raw`; nothing else owns it, so
                            // taking ownership closes it exactly once.
                            #[allow(unsafe_code)]
                            let owned =
                                unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) };
                            let id = next.fetch_add(1, Ordering::Relaxed);
                            let (s, snapshot) = (s.clone(), snapshot.clone());
                            std::thread::spawn(move || s.serve(id, owned, snapshot));
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "ZDS accept failed");
                            std::thread::sleep(Duration::from_millis(100));
                        }
                    }
                }
            })
            .map_err(|e| e.to_string())?;
        Ok(server)
    }

    fn serve(&self, id: u64, fd: OwnedFd, snapshot: Snapshot) {
        let timeout = TimeVal::new(ACK_TIMEOUT.as_secs() as i64, 0);
        let _ = socket::setsockopt(&fd, socket::sockopt::ReceiveTimeout, &timeout);
        let _ = socket::setsockopt(&fd, socket::sockopt::SendTimeout, &timeout);
        let conn = Arc::new(Conn {
            id,
            fd,
            turn: Mutex::new(()),
            alive: AtomicBool::new(true),
        });
        let handshake = (|| -> Result<usize, String> {
            let hello = zds::ZdsHello::decode(conn.recv()?.as_slice())
                .map_err(|e| format!("malformed hello: {e}"))?;
            if hello.version != zds::Version::V1 as i32 {
                return Err(format!("unsupported ZDS version {}", hello.version));
            }
            let pods = snapshot();
            for p in &pods {
                let req = match &p.netns {
                    Some(_) => add_request(p),
                    None => zds::WorkloadRequest {
                        payload: Some(zds::workload_request::Payload::Keep(zds::KeepWorkload {
                            uid: p.uid.clone(),
                        })),
                    },
                };
                if let Err(e) = conn.request(&req, p.netns.as_ref()) {
                    if !e.starts_with("ztunnel refused") {
                        return Err(e);
                    }
                    tracing::warn!(conn = id, pod = %format!("{}/{}", p.namespace, p.name), error = %e, "snapshot entry refused");
                }
            }
            conn.request(
                &zds::WorkloadRequest {
                    payload: Some(zds::workload_request::Payload::SnapshotSent(
                        zds::SnapshotSent {},
                    )),
                },
                None,
            )?;
            Ok(pods.len())
        })();
        match handshake {
            Ok(n) => tracing::info!(conn = id, pods = n, "ztunnel connected; snapshot sent"),
            Err(e) => {
                tracing::warn!(conn = id, error = %e, "ztunnel connection failed during the snapshot");
                return;
            }
        }
        self.conns.lock().expect("conns lock").push(conn.clone());
        // Liveness: a short non-blocking peek; EOF means ztunnel is gone.
        while conn.alive.load(Ordering::Relaxed) {
            std::thread::sleep(LIVENESS_PERIOD);
            let _turn = conn.turn.lock().expect("conn lock");
            let mut b = [0u8; 1];
            match socket::recv(
                conn.fd.as_raw_fd(),
                &mut b,
                MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
            ) {
                Ok(0) => conn.alive.store(false, Ordering::Relaxed),
                Ok(_) => {
                    tracing::warn!(conn = id, "unexpected data from ztunnel; closing");
                    conn.alive.store(false, Ordering::Relaxed);
                }
                Err(nix::errno::Errno::EAGAIN) => {}
                Err(_) => conn.alive.store(false, Ordering::Relaxed),
            }
        }
        tracing::info!(conn = id, "ztunnel disconnected");
        self.conns
            .lock()
            .expect("conns lock")
            .retain(|c| c.id != id);
    }

    fn live(&self) -> Vec<Arc<Conn>> {
        self.conns
            .lock()
            .expect("conns lock")
            .iter()
            .filter(|c| c.alive.load(Ordering::Relaxed))
            .cloned()
            .collect()
    }

    pub fn connected(&self) -> usize {
        self.live().len()
    }

    /// Sends an Add to the newest ztunnel and waits for its ack.
    pub fn add(&self, pod: &PodEntry) -> Result<(), String> {
        let newest = self.live().pop().ok_or("no ztunnel is connected")?;
        newest.request(&add_request(pod), pod.netns.as_ref())
    }

    /// Sends a Del to every connected ztunnel.
    pub fn del(&self, uid: &str) {
        let req = zds::WorkloadRequest {
            payload: Some(zds::workload_request::Payload::Del(zds::DelWorkload {
                uid: uid.to_string(),
            })),
        };
        for c in self.live() {
            if let Err(e) = c.request(&req, None) {
                tracing::warn!(conn = c.id, uid, error = %e, "Del not acknowledged");
            }
        }
    }
}
