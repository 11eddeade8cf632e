//! The CNI plugin fails closed: when the node agent cannot be reached (gone, a stale
//! socket, a socket that never answers), ADD returns a CNI error and the pod is not
//! started, unless a fresh cache of the agent's view names this very pod as not
//! enrolled. A stale cache, one of the old format, or one about another pod of the same
//! name never lets a pod start outside the mesh.

use mesh_cni::cache::{CachedPod, FILE_NAME, NodeCache, VERSION, now_ms};
use mesh_cni::events::{FallbackAgent, SocketAgent};
use mesh_cni::plugin::{self, Env, TRY_AGAIN_LATER};
use serde_json::Value;
use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_mesh-cni");

fn conf(socket: &Path) -> String {
    serde_json::json!({
        "cniVersion": "1.0.0", "name": "lab", "type": "mesh-cni",
        "agent_socket": socket,
        "prevResult": {"cniVersion": "1.0.0", "interfaces": [{"name": "eth0"}],
                       "ips": [{"address": "10.1.1.2/24", "interface": 0}]}
    })
    .to_string()
}

const ARGS: &str = "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web;K8S_POD_UID=u-web";

/// Runs the real plugin binary as the runtime does: (exit code, stdout JSON).
fn add(socket: &Path, args: &str) -> (Option<i32>, Value) {
    let mut child = Command::new(BIN)
        .env_clear()
        .env("CNI_COMMAND", "ADD")
        .env("CNI_CONTAINERID", "c1")
        .env("CNI_NETNS", "/var/run/netns/none")
        .env("CNI_IFNAME", "eth0")
        .env("CNI_ARGS", args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(conf(socket).as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        serde_json::from_slice(&out.stdout).unwrap_or_default(),
    )
}

fn assert_not_started((code, v): (Option<i32>, Value), why: &str) {
    assert_eq!(code, Some(1), "{why}: {v}");
    assert_eq!(v["code"], TRY_AGAIN_LATER, "{why}: {v}");
    assert!(
        v["msg"]
            .as_str()
            .unwrap_or_default()
            .contains("not started unprotected"),
        "{why}: {v}"
    );
}

fn assert_started((code, v): (Option<i32>, Value), why: &str) {
    assert_eq!(code, Some(0), "{why}: {v}");
    assert_eq!(
        v["ips"][0]["address"], "10.1.1.2/24",
        "{why}: prevResult passed on"
    );
}

fn write_cache(dir: &Path, age: Duration, uid: &str, enrolled: bool) {
    let c = NodeCache {
        version: VERSION,
        written_at_ms: now_ms() - age.as_millis() as u64,
        pods: [(
            "shop/web".to_string(),
            CachedPod {
                uid: uid.into(),
                enrolled,
            },
        )]
        .into(),
    };
    std::fs::write(dir.join(FILE_NAME), serde_json::to_vec(&c).unwrap()).unwrap();
}

#[test]
fn agent_down_fails_closed() {
    let tmp = tempfile::tempdir().unwrap();
    let sock = tmp.path().join("agent.sock");
    // No socket at all.
    assert_not_started(add(&sock, ARGS), "no agent socket");
    // A socket file left by an agent that is gone (connection refused).
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    assert_not_started(add(&sock, ARGS), "stale agent socket");
}

#[test]
fn a_stale_cache_never_starts_a_pod_outside_the_mesh() {
    let tmp = tempfile::tempdir().unwrap();
    let sock = tmp.path().join("agent.sock");
    // Positive control: a fresh cache naming this very pod as not enrolled is believed.
    write_cache(tmp.path(), Duration::from_secs(1), "u-web", false);
    assert_started(add(&sock, ARGS), "fresh cache, this pod, not enrolled");
    // Stale: the agent stopped refreshing it (gone, or cut off from the control plane).
    write_cache(tmp.path(), Duration::from_secs(60), "u-web", false);
    let r = add(&sock, ARGS);
    assert!(
        r.1["details"].as_str().unwrap().contains("stale"),
        "{}",
        r.1
    );
    assert_not_started(r, "stale cache");
    // The format an older agent wrote (no date, keyed by name only) is not believed.
    std::fs::write(tmp.path().join(FILE_NAME), r#"{"shop/web": false}"#).unwrap();
    assert_not_started(add(&sock, ARGS), "old-format cache");
    // Fresh, but about another pod of the same name (a new pod has a new UID).
    write_cache(tmp.path(), Duration::ZERO, "u-old-web", false);
    assert_not_started(add(&sock, ARGS), "cache about another pod of the same name");
    assert_not_started(
        add(&sock, "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web"),
        "no UID to compare",
    );
    // Fresh and enrolled.
    write_cache(tmp.path(), Duration::ZERO, "u-web", true);
    assert_not_started(add(&sock, ARGS), "enrolled");
    // Dated in the future (a clock jump must not make a cache live forever).
    write_cache(tmp.path(), Duration::ZERO, "u-web", false);
    let mut c: Value =
        serde_json::from_slice(&std::fs::read(tmp.path().join(FILE_NAME)).unwrap()).unwrap();
    c["writtenAtMs"] = (now_ms() + 3_600_000).into();
    std::fs::write(tmp.path().join(FILE_NAME), c.to_string()).unwrap();
    assert_not_started(add(&sock, ARGS), "cache from the future");
}

#[test]
fn no_pod_identity_fails_closed() {
    let tmp = tempfile::tempdir().unwrap();
    let (code, v) = add(&tmp.path().join("agent.sock"), "IgnoreUnknown=1");
    assert_eq!(code, Some(1), "{v}");
    assert_eq!(v["code"], plugin::INVALID_ENV, "{v}");
}

fn env() -> Env {
    let vars: HashMap<String, String> = [
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "c1"),
        ("CNI_NETNS", "/var/run/netns/none"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_ARGS", ARGS),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    Env::from_vars(&vars).unwrap()
}

/// The plugin's own code path (what main runs), with a short deadline.
fn add_in_process(socket: &Path) -> (Result<String, plugin::CniError>, Duration) {
    let agent = FallbackAgent {
        agent: SocketAgent {
            timeout: Duration::from_millis(500),
        },
        cache: None,
    };
    let t = Instant::now();
    let r = plugin::run(&env(), conf(socket).as_bytes(), &agent);
    (r, t.elapsed())
}

#[test]
fn an_agent_socket_that_never_answers_fails_closed() {
    let tmp = tempfile::tempdir().unwrap();
    let sock = tmp.path().join("agent.sock");
    // Present, listening, never accepting: connect succeeds (the backlog), no reply.
    let _l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let (r, took) = add_in_process(&sock);
    let e = r.unwrap_err();
    assert_eq!(e.code, TRY_AGAIN_LATER, "{e:?}");
    assert!(
        took < Duration::from_secs(5),
        "bounded by the deadline: {took:?}"
    );
    drop(_l);
    // Accepting and reading, but never replying.
    let _ = std::fs::remove_file(&sock);
    let l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    // It holds the connection open until the test has its answer (at most a minute), so
    // only the plugin's own read deadline can end the call, not the server letting go.
    let (done, held) = std::sync::mpsc::channel::<()>();
    let mute = std::thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        let _ = held.recv_timeout(Duration::from_secs(60));
        drop(s);
    });
    let (r, took) = add_in_process(&sock);
    // A plugin without a deadline returns only once the server let go (it is gone then).
    let _ = done.send(());
    mute.join().unwrap();
    assert_eq!(r.unwrap_err().code, TRY_AGAIN_LATER);
    // Far above the 500 ms deadline on any machine, far below the minute the server holds.
    assert!(
        took < Duration::from_secs(30),
        "bounded by the read deadline: {took:?}"
    );
    // Replying garbage, or an endless line: refused, bounded.
    let _ = std::fs::remove_file(&sock);
    let l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let chatty = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let chunk = vec![b'x'; 64 * 1024];
        for _ in 0..64 {
            if s.write_all(&chunk).is_err() {
                break;
            }
        }
    });
    let (r, _) = add_in_process(&sock);
    let e = r.unwrap_err();
    assert_eq!(e.code, TRY_AGAIN_LATER);
    assert!(e.details.contains("longer than"), "{e:?}");
    chatty.join().unwrap();
    // Even then, a fresh cache naming this pod as not enrolled is believed.
    write_cache(tmp.path(), Duration::ZERO, "u-web", false);
    let _ = std::fs::remove_file(&sock);
    let _l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    assert!(add_in_process(&sock).0.is_ok());
}
