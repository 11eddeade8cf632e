//! CPU profiles from running programs: ztunnel's and the waypoint's admin endpoints
//! (localhost only) answer `/debug/pprof/profile?seconds=N` with a pprof protobuf that
//! decodes and holds samples of the traffic they carried meanwhile.

use mesh_admin::profile::{Message, Profile};
use mesh_e2e::observe::app_behind_waypoint;
use mesh_e2e::testlab::TestLab;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};

/// `GET url` with curl in `cmd`'s namespace: (HTTP status, body bytes).
fn fetch(mut cmd: Command, url: &str) -> (String, Vec<u8>) {
    let out = cmd
        .args([
            "curl",
            "-s",
            "--max-time",
            "30",
            "-w",
            "\n%{http_code}",
            url,
        ])
        .output()
        .unwrap();
    let mut body = out.stdout;
    let at = body.iter().rposition(|b| *b == b'\n').unwrap_or(0);
    let status = String::from_utf8_lossy(&body[at + 1..]).into_owned();
    body.truncate(at);
    (status, body)
}

/// The profile's function names; panics unless it decodes and holds samples.
fn decode(who: &str, (status, body): (String, Vec<u8>)) -> Vec<String> {
    assert_eq!(status, "200", "{who}: {}", String::from_utf8_lossy(&body));
    let p =
        Profile::decode(&body[..]).unwrap_or_else(|e| panic!("{who}: not a pprof profile: {e}"));
    assert!(
        !p.sample.is_empty(),
        "{who}: no samples in {} bytes",
        body.len()
    );
    p.function
        .iter()
        .map(|f| p.string_table[f.name as usize].clone())
        .collect()
}

#[test]
fn ztunnel_and_waypoint_serve_cpu_profiles() {
    let mut t = TestLab::up_named("prof", 2, &["curl"]);
    app_behind_waypoint(&mut t);
    let admin = t.lab.ztunnel_ports("ztunnel-1").expect("ztunnel-1").admin;
    let done = AtomicBool::new(false);
    let (ztunnel, waypoint) = std::thread::scope(|s| {
        let profiles = s.spawn(|| {
            let mut node = Command::new("ip");
            node.args(["netns", "exec", &t.lab.node_ns(1)]);
            let z = fetch(
                node,
                &format!("http://127.0.0.1:{admin}/debug/pprof/profile?seconds=3"),
            );
            let w = fetch(
                t.in_pod("back/waypoint"),
                "http://127.0.0.1:15000/debug/pprof/profile?seconds=3",
            );
            done.store(true, Ordering::Relaxed);
            (z, w)
        });
        // Traffic through both while they are sampled.
        while !done.load(Ordering::Relaxed) {
            let _ = t.curl("front/client", "http://10.96.0.20/ok");
        }
        profiles.join().unwrap()
    });
    let z = decode("ztunnel", ztunnel);
    assert!(z.iter().any(|f| f.contains("ztunnel")), "{z:?}");
    let w = decode("waypoint", waypoint);
    assert!(w.iter().any(|f| f.contains("waypoint")), "{w:?}");

    // Localhost only: not on the node's own address.
    let mut node = Command::new("ip");
    node.args(["netns", "exec", &t.lab.node_ns(1)]);
    let node_ip = mesh_lab::lab::Lab::node_ip(1);
    let (status, _) = fetch(node, &format!("http://{node_ip}:{admin}/debug/pprof/heap"));
    assert_eq!(status, "000", "the admin endpoint answered on {node_ip}");
}
