//! Network namespaces and veth links with unique names, removed on drop.

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// The prefix every name made by this test process starts with.
pub fn unique_prefix() -> String {
    format!("m{:x}", std::process::id() % 100_000)
}

/// A short name unique to this process and call: fits interface names (15 bytes).
pub fn unique(tag: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let pid = std::process::id() % 100_000;
    format!("m{pid:x}{n:x}{tag}")
}

/// Runs a command, panicking with its output if it fails.
pub fn run(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a command inside a namespace.
pub fn ns_run(ns: &str, args: &[&str]) -> String {
    let mut full = vec!["ip", "netns", "exec", ns];
    full.extend_from_slice(args);
    run(&full)
}

/// A network namespace, deleted (with everything in it) on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Self {
        let name = unique(tag);
        run(&["ip", "netns", "add", &name]);
        let ns = Netns { name };
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    pub fn path(&self) -> String {
        format!("/var/run/netns/{}", self.name)
    }

    pub fn exec(&self, args: &[&str]) -> String {
        ns_run(&self.name, args)
    }

    pub fn sysctl(&self, key: &str, value: &str) {
        self.exec(&["sysctl", "-qw", &format!("{key}={value}")]);
    }

    /// Opens the namespace for entering from this process (e.g. to create sockets).
    pub fn handle(&self) -> ztunnel::netns::Netns {
        ztunnel::netns::Netns::open(&self.path()).expect("open netns")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Veths inside go with the namespace.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Connects two namespaces with a veth pair; returns the interface names (a side, b side).
pub fn veth(a: &Netns, a_addr: &str, b: &Netns, b_addr: &str) -> (String, String) {
    let ia = unique("a");
    let ib = unique("b");
    run(&[
        "ip", "link", "add", &ia, "type", "veth", "peer", "name", &ib,
    ]);
    run(&["ip", "link", "set", &ia, "netns", &a.name]);
    run(&["ip", "link", "set", &ib, "netns", &b.name]);
    a.exec(&["ip", "addr", "add", a_addr, "dev", &ia]);
    b.exec(&["ip", "addr", "add", b_addr, "dev", &ib]);
    a.exec(&["ip", "link", "set", &ia, "up"]);
    b.exec(&["ip", "link", "set", &ib, "up"]);
    (ia, ib)
}
