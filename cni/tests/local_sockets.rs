//! The agent's local control sockets under abuse: the plugin socket and the ZDS socket
//! are 0600 in a 0700 directory; a peer of another uid is refused by SO_PEERCRED even
//! when the file permissions are loosened; an oversized request is refused without the
//! agent reading (or holding) it; idle clients never hold up others and are closed.
//!
//! Connections "from another uid" come from this test binary re-run as uid 65534 (the
//! `as_child` entry below, which does nothing in a normal run).

use mesh_cni::agent::local::PeerPolicy;
use mesh_cni::agent::{Agent, AgentConfig};
use mesh_proto::prost::Message;
use mesh_proto::zds;
use nix::sys::socket::{self, AddressFamily, MsgFlags, SockFlag, SockType, UnixAddr};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

const CHILD_ENV: &str = "MESH_CNI_SOCKET_TEST_CHILD";
const NOBODY: u32 = 65534;

/// In a child run (uid 65534): connects as told and prints what happened.
#[test]
fn as_child() {
    let Ok(what) = std::env::var(CHILD_ENV) else {
        return;
    };
    let (kind, path) = what.split_once(':').unwrap();
    let result = match kind {
        "stream" => stream_request(Path::new(path), CHECK),
        "seqpacket" => seqpacket_hello(Path::new(path)).map(|m| format!("{} bytes", m.len())),
        _ => unreachable!(),
    };
    println!(
        "CHILD-RESULT {}",
        match result {
            Ok(r) => format!("ok {r}"),
            Err(e) => format!("err {e}"),
        }
    );
}

const CHECK: &str = r#"{"cmd":"check","namespace":"shop","name":"web","netns":"/nonexistent"}"#;

/// One request line; the reply line, or why there was none.
fn stream_request(path: &Path, line: &str) -> Result<String, String> {
    let mut s = UnixStream::connect(path).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(format!("{line}\n").as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    let mut reply = String::new();
    BufReader::new(&s)
        .read_line(&mut reply)
        .map_err(|e| format!("read: {e}"))?;
    if reply.is_empty() {
        return Err("closed without a reply".into());
    }
    Ok(reply)
}

fn seqpacket_connect(path: &Path) -> Result<OwnedFd, String> {
    let fd = socket::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| e.to_string())?;
    let t = nix::sys::time::TimeVal::new(10, 0);
    socket::setsockopt(&fd, socket::sockopt::ReceiveTimeout, &t).unwrap();
    socket::connect(fd.as_raw_fd(), &UnixAddr::new(path).unwrap())
        .map_err(|e| format!("connect: {e}"))?;
    Ok(fd)
}

fn recv(fd: &OwnedFd) -> Result<Vec<u8>, String> {
    let mut buf = [0u8; 1024];
    let n = socket::recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty())
        .map_err(|e| format!("recv: {e}"))?;
    if n == 0 {
        return Err("closed".into());
    }
    Ok(buf[..n].to_vec())
}

/// Connects as ztunnel does and says hello; the first message back.
fn seqpacket_hello(path: &Path) -> Result<Vec<u8>, String> {
    let fd = seqpacket_connect(path)?;
    let hello = zds::ZdsHello {
        version: zds::Version::V1 as i32,
        capabilities: vec![],
    }
    .encode_to_vec();
    socket::send(fd.as_raw_fd(), &hello, MsgFlags::MSG_NOSIGNAL)
        .map_err(|e| format!("send: {e}"))?;
    recv(&fd)
}

/// Runs `as_child` as uid/gid 65534 from a copy of this binary it can execute.
fn as_nobody(what: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let exe = dir.path().join("child");
    std::fs::copy(std::env::current_exe().unwrap(), &exe).unwrap();
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = std::process::Command::new(&exe)
        .args(["--exact", "as_child", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, what)
        .uid(NOBODY)
        .gid(NOBODY)
        .current_dir("/")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout
        .lines()
        .find_map(|l| l.split_once("CHILD-RESULT ").map(|(_, r)| r))
        .map(str::to_string)
        .unwrap_or_else(|| {
            panic!(
                "child printed no result: {stdout}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
}

struct TestAgent {
    agent: Arc<Agent>,
    dir: PathBuf,
    _tmp: tempfile::TempDir,
}

impl TestAgent {
    fn plugin(&self) -> PathBuf {
        self.dir.join("agent.sock")
    }
    fn zds(&self) -> PathBuf {
        self.dir.with_file_name("zrun").join("zds.sock")
    }
    fn count(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        self.agent.metrics().get(name, labels)
    }
}

async fn start(plugin_uid: u32) -> TestAgent {
    start_with(
        PeerPolicy {
            uid: plugin_uid,
            exe: None,
        },
        PeerPolicy::default(),
    )
    .await
}

async fn start_with(plugin_peer: PeerPolicy, zds_peer: PeerPolicy) -> TestAgent {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("run");
    let agent = Agent::start(AgentConfig {
        node_name: "node-1".into(),
        zds_socket: tmp.path().join("zrun/zds.sock"),
        agent_socket: dir.join("agent.sock"),
        dns_capture: false,
        host_probe_snat: false,
        proc_dir: None,
        cgroup_root: String::new(),
        plugin_peer,
        zds_peer,
    })
    .unwrap();
    // The control plane's (empty) view: ZDS snapshots can be answered.
    agent.apply_view(vec![]).await;
    let listener = agent.bind_plugin_socket().unwrap();
    tokio::spawn(agent.clone().serve_plugin_on(listener));
    TestAgent {
        agent,
        dir,
        _tmp: tmp,
    }
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::block_in_place(f)
}

/// The ZDS handshake as root (ztunnel): hello, then SnapshotSent (acked).
fn zds_handshake(path: &Path) -> Result<(), String> {
    let fd = seqpacket_connect(path)?;
    let hello = zds::ZdsHello {
        version: zds::Version::V1 as i32,
        capabilities: vec![],
    }
    .encode_to_vec();
    socket::send(fd.as_raw_fd(), &hello, MsgFlags::MSG_NOSIGNAL).map_err(|e| e.to_string())?;
    let msg = zds::WorkloadRequest::decode(recv(&fd)?.as_slice()).map_err(|e| e.to_string())?;
    if !matches!(
        msg.payload,
        Some(zds::workload_request::Payload::SnapshotSent(_))
    ) {
        return Err(format!("expected SnapshotSent, got {msg:?}"));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sockets_are_private_and_other_uids_are_refused() {
    let t = start(0).await;
    assert_eq!(mode(&t.dir), 0o700, "socket directory");
    assert_eq!(mode(&t.plugin()), 0o600, "plugin socket");
    assert_eq!(mode(&t.zds()), 0o600, "ZDS socket");
    assert_eq!(
        mode(t.zds().parent().unwrap()),
        0o700,
        "ZDS socket directory"
    );
    // Root (the runtime's plugin, ztunnel) is served.
    let (p, z) = (t.plugin(), t.zds());
    let reply = blocking(move || stream_request(&p, CHECK)).unwrap();
    assert!(reply.contains("\"result\":\"ok\""), "{reply}");
    blocking(move || zds_handshake(&z)).unwrap();

    // uid 65534 cannot even reach them...
    let p = t.plugin().display().to_string();
    let r = blocking(move || as_nobody(&format!("stream:{p}")));
    assert!(r.contains("Permission denied"), "{r}");
    // ...and with the permissions loosened (a mistake, a hostPath with other modes),
    // SO_PEERCRED still refuses it before a byte is read.
    std::fs::set_permissions(&t.dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(t.plugin(), std::fs::Permissions::from_mode(0o666)).unwrap();
    std::fs::set_permissions(t.zds(), std::fs::Permissions::from_mode(0o666)).unwrap();
    std::fs::set_permissions(
        t.zds().parent().unwrap(),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    let p = t.plugin().display().to_string();
    let r = blocking(move || as_nobody(&format!("stream:{p}")));
    assert!(r.starts_with("err"), "plugin socket served uid 65534: {r}");
    let z = t.zds().display().to_string();
    let r = blocking(move || as_nobody(&format!("seqpacket:{z}")));
    assert!(r.starts_with("err"), "ZDS served uid 65534: {r}");
    assert_eq!(
        t.count("mesh_cni_local_peer_refused_total", &[("socket", "agent")]),
        1
    );
    assert_eq!(
        t.count("mesh_cni_local_peer_refused_total", &[("socket", "zds")]),
        1
    );
    // Root is still served.
    let p = t.plugin();
    assert!(blocking(move || stream_request(&p, CHECK)).is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_expected_uid_is_configured() {
    // Expecting uid 65534: root is refused, 65534 is served, and the socket (and its
    // directory) belong to that uid so it can reach it.
    let t = start(NOBODY).await;
    let meta = std::fs::metadata(t.plugin()).unwrap();
    assert_eq!(
        std::os::unix::fs::MetadataExt::uid(&meta),
        NOBODY,
        "socket owner"
    );
    let p = t.plugin();
    assert!(blocking(move || stream_request(&p, CHECK)).is_err());
    let p = t.plugin().display().to_string();
    let r = blocking(move || as_nobody(&format!("stream:{p}")));
    assert!(
        r.starts_with("ok") && r.contains("\"result\":\"ok\""),
        "{r}"
    );
    // The binary validates the setting.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mesh-cni"))
        .args(["agent", "--zds-peer-uid", "4294967295"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not a valid uid"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_request_is_refused_without_growing_memory() {
    let t = start(0).await;
    let p = t.plugin();
    let before = rss_kb();
    let (written, reply) = blocking(move || {
        let mut s = UnixStream::connect(&p).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        // 256 MiB without a newline.
        let chunk = vec![b'{'; 1 << 20];
        let mut written = 0usize;
        for _ in 0..256 {
            match s.write(&chunk) {
                Ok(n) => written += n,
                Err(_) => break,
            }
        }
        let mut reply = Vec::new();
        let _ = s.read_to_end(&mut reply);
        (written, String::from_utf8_lossy(&reply).into_owned())
    });
    let grown = rss_kb().saturating_sub(before);
    assert!(
        written < 16 << 20,
        "the agent kept reading: {written} bytes accepted"
    );
    assert!(
        reply.contains("request longer than 65536 bytes"),
        "reply: {reply:?}"
    );
    assert!(grown < 16 * 1024, "RSS grew by {grown} kB");
    assert_eq!(
        t.count(
            "mesh_cni_local_request_refused_total",
            &[("socket", "agent"), ("reason", "too_long")]
        ),
        1
    );
    // Still serving.
    let p = t.plugin();
    assert!(blocking(move || stream_request(&p, CHECK)).is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_clients_do_not_block_others_and_are_closed() {
    let t = start(0).await;
    // Idle clients on both sockets: connected, sending nothing (or half a line).
    let mut idle: Vec<UnixStream> = (0..10)
        .map(|_| UnixStream::connect(t.plugin()).unwrap())
        .collect();
    idle[0].write_all(b"{\"cmd\":").unwrap();
    let idle_zds: Vec<OwnedFd> = (0..3)
        .map(|_| seqpacket_connect(&t.zds()).unwrap())
        .collect();
    // Others are served while the idle ones are still connected (still open, not yet
    // closed by the read timeout).
    let (p, z) = (t.plugin(), t.zds());
    blocking(move || {
        stream_request(&p, CHECK).unwrap();
        zds_handshake(&z).unwrap();
    });
    for s in &idle {
        s.set_nonblocking(true).unwrap();
        let mut b = [0u8; 1];
        assert_eq!(
            (&*s).read(&mut b).map_err(|e| e.kind()),
            Err(std::io::ErrorKind::WouldBlock),
            "an idle client was already closed: the others waited for it"
        );
        s.set_nonblocking(false).unwrap();
    }
    // The idle ones are closed after the read timeout (5 s), not kept forever.
    let closed = blocking(move || {
        let mut n = 0;
        for mut s in idle.drain(..) {
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut b = [0u8; 1];
            if matches!(s.read(&mut b), Ok(0)) {
                n += 1;
            }
        }
        for fd in &idle_zds {
            if recv(fd) == Err("closed".to_string()) {
                n += 1;
            }
        }
        n
    });
    assert_eq!(closed, 13, "every idle client was closed");
    assert!(
        t.count(
            "mesh_cni_local_request_refused_total",
            &[("socket", "agent"), ("reason", "timeout")]
        ) >= 10
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_zds_peer_must_run_the_expected_executable() {
    // Expecting /bin/sh: this (root) process is not it.
    let t = start_with(
        PeerPolicy::default(),
        PeerPolicy {
            uid: 0,
            exe: Some("/bin/sh".into()),
        },
    )
    .await;
    let z = t.zds();
    assert!(blocking(move || zds_handshake(&z)).is_err());
    assert_eq!(
        t.count("mesh_cni_local_peer_refused_total", &[("socket", "zds")]),
        1
    );
    // Expecting this very binary: served.
    let t = start_with(
        PeerPolicy::default(),
        PeerPolicy {
            uid: 0,
            exe: Some(std::env::current_exe().unwrap()),
        },
    )
    .await;
    let z = t.zds();
    blocking(move || zds_handshake(&z)).unwrap();
}
