//! Helpers for tests that run in real network namespaces: unique names, namespaces and
//! links removed on drop (also when a test panics), child processes ended by PID.
#![forbid(unsafe_code)]

pub mod cluster;
pub mod manifests;
pub mod net;
pub mod node;
pub mod observe;
pub mod proc;
pub mod testlab;

use std::path::PathBuf;

/// A built binary of the workspace (`cargo build --workspace --bins` first).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins` before the end-to-end tests",
        path.display()
    );
    path
}

/// Fails (never skips) when a required tool is missing.
pub fn require_tool(name: &str) {
    let ok = std::process::Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        ok,
        "{name} is not installed: run scripts/install-deps.sh (make test does)"
    );
}
