//! The installer as a node runs it: the real binary against a CNI config directory the
//! primary CNI keeps rewriting, then uninstalled.

use serde_json::Value;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_mesh-cni");

const BRIDGE: &str = r#"{
  "cniVersion": "1.0.0",
  "name": "kubenet",
  "plugins": [
    {"type": "bridge", "bridge": "cni0", "isGateway": true,
     "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.244.1.0/24"}]]}},
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
"#;

/// Kills the installer (by its PID, through the handle) even when an assertion fails.
struct Installer(Child);

impl Drop for Installer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn plugin_types(path: &Path) -> Vec<String> {
    let v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    v["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["type"].as_str().unwrap().to_string())
        .collect()
}

fn wait_until(what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn installs_repairs_refuses_garbage_and_uninstalls() {
    let dir = tempfile::tempdir().unwrap();
    let (net, bin) = (dir.path().join("net.d"), dir.path().join("bin"));
    std::fs::create_dir_all(&net).unwrap();
    std::fs::create_dir_all(&bin).unwrap();
    let conflist = net.join("10-kubenet.conflist");
    let args = |extra: &[&str]| {
        let mut c = Command::new(BIN);
        c.arg("install")
            .arg("--cni-net-dir")
            .arg(&net)
            .arg("--cni-bin-dir")
            .arg(&bin)
            .args(["--interval-ms", "50"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        c
    };

    // Nothing to chain into yet: --once says so and fails.
    assert!(!args(&["--once"]).status().unwrap().success());

    let installer = Installer(args(&[]).spawn().unwrap());
    std::fs::write(&conflist, BRIDGE).unwrap();
    let chained = || plugin_types(&conflist).last().map(String::as_str) == Some("mesh-cni");
    wait_until("the entry to be chained", chained);
    assert_eq!(plugin_types(&conflist), ["bridge", "portmap", "mesh-cni"]);
    assert_eq!(
        std::fs::read(bin.join("mesh-cni")).unwrap(),
        std::fs::read(BIN).unwrap()
    );

    // The primary CNI rewrites its file: repaired.
    std::fs::write(&conflist, BRIDGE).unwrap();
    wait_until("the entry to be re-chained", chained);

    // A file it cannot understand becomes the primary config: left byte for byte alone,
    // and the installer keeps running.
    let broken = net.join("05-broken.conflist");
    std::fs::write(&broken, "{\"plugins\": [").unwrap();
    let mut installer = installer;
    // A window of some ten passes (50 ms each) over the broken file.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(std::fs::read_to_string(&broken).unwrap(), "{\"plugins\": [");
    assert!(
        installer.0.try_wait().unwrap().is_none(),
        "the installer keeps running past a file it cannot understand"
    );
    // ...and keeps working: once the broken file goes and the primary CNI rewrites its
    // own, it chains it again (a pass after the broken file).
    std::fs::remove_file(&broken).unwrap();
    std::fs::write(&conflist, BRIDGE).unwrap();
    wait_until("re-chained after the broken file", chained);
    drop(installer);

    // Stopping (an upgrade) leaves everything in place; uninstall restores the file.
    assert!(chained());
    assert!(args(&["--uninstall"]).status().unwrap().success());
    let restored: Value =
        serde_json::from_str(&std::fs::read_to_string(&conflist).unwrap()).unwrap();
    assert_eq!(restored, serde_json::from_str::<Value>(BRIDGE).unwrap());
    assert!(!bin.join("mesh-cni").exists());
    // No temporary files left behind.
    let names: Vec<_> = std::fs::read_dir(&net)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, [std::ffi::OsString::from("10-kubenet.conflist")]);
}

/// The replies the fake API server gives, in turn; the last one again and again.
type Replies = std::sync::Arc<std::sync::Mutex<Vec<(u16, String)>>>;

/// A fake API server answering `GET .../daemonsets/mesh-cni` with the replies in `reply`
/// (an HTTP status and body), one connection at a time.
async fn fake_api(reply: Replies) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let reply = reply.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&got);
                let (code, body) = if head
                    .starts_with("GET /apis/apps/v1/namespaces/mesh-system/daemonsets/mesh-cni")
                {
                    let mut r = reply.lock().unwrap();
                    if r.len() > 1 {
                        r.remove(0)
                    } else {
                        r[0].clone()
                    }
                } else {
                    (400, "{}".to_string())
                };
                let resp = format!(
                    "HTTP/1.1 {code} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
            });
        }
    });
    format!("http://{addr}")
}

fn daemonset(deleting: bool) -> String {
    let mut meta = serde_json::json!({"name": "mesh-cni", "namespace": "mesh-system"});
    if deleting {
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z".into();
    }
    serde_json::json!({"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": meta,
        "spec": {"selector": {"matchLabels": {"app": "mesh-cni"}},
                 "template": {"metadata": {"labels": {"app": "mesh-cni"}}, "spec": {"containers": []}}}})
    .to_string()
}

/// An API server's error answer (`metav1.Status`).
fn status_body(code: u16, reason: &str, message: &str) -> String {
    serde_json::json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                       "message": message, "reason": reason, "code": code})
    .to_string()
}

/// SIGTERM (by PID) to an installer that keeps the entry; returns its exit status.
fn terminate(mut child: Child) -> std::process::ExitStatus {
    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the installer did not stop on SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_keeps_the_entry_on_upgrade_and_removes_it_when_the_daemonset_goes() {
    let reply: Replies = std::sync::Arc::new(std::sync::Mutex::new(vec![(200, daemonset(false))]));
    let url = fake_api(reply.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let (net, bin) = (dir.path().join("net.d"), dir.path().join("bin"));
    std::fs::create_dir_all(&net).unwrap();
    std::fs::create_dir_all(&bin).unwrap();
    let conflist = net.join("10-kubenet.conflist");
    std::fs::write(&conflist, BRIDGE).unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    let write_kubeconfig = |server: &str| {
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters: [{{name: c, cluster: {{server: '{server}'}}}}]\n\
                 users: [{{name: u, user: {{}}}}]\ncontexts: [{{name: c, context: {{cluster: c, user: u}}}}]\ncurrent-context: c\n"
            ),
        )
        .unwrap()
    };
    // Each start begins from the primary CNI's own file, so seeing the entry appear
    // proves the installer reached its loop (signal handlers are in place by then).
    let start = || {
        std::fs::write(&conflist, BRIDGE).unwrap();
        let child = Command::new(BIN)
            .arg("install")
            .arg("--cni-net-dir")
            .arg(&net)
            .arg("--cni-bin-dir")
            .arg(&bin)
            .args(["--interval-ms", "50", "--daemonset", "mesh-system/mesh-cni"])
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_until("the entry to be chained", || {
            plugin_types(&conflist).last().map(String::as_str) == Some("mesh-cni")
                && bin.join("mesh-cni").exists()
        });
        child
    };
    let chained = || plugin_types(&conflist).contains(&"mesh-cni".to_string());

    // An upgrade: the DaemonSet is still there.
    write_kubeconfig(&url);
    let status = tokio::task::block_in_place(|| terminate(start()));
    assert!(status.success());
    assert!(
        chained() && bin.join("mesh-cni").exists(),
        "an upgrade keeps everything"
    );

    // The API server cannot be reached: in doubt, keep.
    write_kubeconfig("http://127.0.0.1:9");
    let status = tokio::task::block_in_place(|| terminate(start()));
    assert!(status.success(), "{status}");
    assert!(chained(), "an unreachable API server keeps the entry");

    // The API server fails (a 500, as an overloaded etcd makes it): in doubt, keep.
    write_kubeconfig(&url);
    *reply.lock().unwrap() = vec![(
        500,
        status_body(500, "InternalError", "etcdserver: request timed out"),
    )];
    let status = tokio::task::block_in_place(|| terminate(start()));
    assert!(status.success(), "{status}");
    assert!(chained(), "a failing API server keeps the entry");

    // A transient 401 (an authenticator outage, a key rotation) during a rollout: asked
    // again, the DaemonSet is there, so the entry stays.
    *reply.lock().unwrap() = vec![
        (401, status_body(401, "Unauthorized", "Unauthorized")),
        (200, daemonset(false)),
    ];
    let status = tokio::task::block_in_place(|| terminate(start()));
    assert!(status.success(), "{status}");
    assert!(chained(), "a transient 401 keeps the entry");
    assert_eq!(reply.lock().unwrap().len(), 1, "asked again after the 401");

    // helm uninstall: the DaemonSet is being deleted, then gone; or the installer's own
    // ServiceAccount (401) or Role (403) went first, as garbage collection often does
    // (and stays gone over the re-checks).
    let forbidden = "daemonsets.apps \"mesh-cni\" is forbidden: User \"system:serviceaccount:mesh-system:mesh-cni\" \
                     cannot get resource \"daemonsets\" in API group \"apps\" in the namespace \"mesh-system\"";
    for (code, body) in [
        (200, daemonset(true)),
        (
            404,
            status_body(404, "NotFound", "daemonsets.apps \"mesh-cni\" not found"),
        ),
        (401, status_body(401, "Unauthorized", "Unauthorized")),
        (403, status_body(403, "Forbidden", forbidden)),
    ] {
        *reply.lock().unwrap() = vec![(code, body)];
        let status = tokio::task::block_in_place(|| terminate(start()));
        assert!(status.success(), "{status}");
        assert!(!chained(), "uninstall removes the entry (reply {code})");
        assert!(!bin.join("mesh-cni").exists(), "and the binary");
        let restored: Value =
            serde_json::from_str(&std::fs::read_to_string(&conflist).unwrap()).unwrap();
        assert_eq!(restored, serde_json::from_str::<Value>(BRIDGE).unwrap());
    }
}
