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
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(std::fs::read_to_string(&broken).unwrap(), "{\"plugins\": [");
    std::fs::remove_file(&broken).unwrap();
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
