//! Pod identity on a running lab cluster: every pod's processes run in a kubelet-style
//! cgroup (pod UID) unique to the lab, the node agent finds running pods by it, and a pod
//! that takes its neighbour's IP never gets its neighbour's identity. `down` removes the
//! lab's cgroups, even after a crash that lost the lab's state.

use mesh_e2e::binary;
use mesh_e2e::cluster::{contains, wait_until};
use mesh_e2e::manifests::{BACK_AMBIENT, FRONT_AMBIENT, FRONT_CLIENT, back_api, join};
use mesh_e2e::net::unique;
use mesh_e2e::testlab::TestLab;
use mesh_lab::lab::Lab;
use std::time::Duration;

/// Namespaces `front` and `back` in the mesh, back/api on 10.96.0.20, and on node-1
/// front/client and front/mallory.
fn app() -> String {
    join(&[
        FRONT_AMBIENT,
        BACK_AMBIENT,
        &back_api(),
        FRONT_CLIENT,
        "apiVersion: v1
kind: Pod
metadata: {name: mallory, namespace: front}
spec: {nodeName: node-1, serviceAccountName: mallory, containers: [{name: mallory}]}
",
    ])
}

/// Story: a pod with NET_ADMIN takes its neighbour's IP; after a node agent restart it
/// must not be handed its neighbour's identity. The agent finds each running pod's
/// namespace the way the kubelet knows it (the pod UID in its processes' cgroup, which
/// the lab names as the kubelet does), then confirms it by IP, and refuses, loudly, a
/// namespace that matches two pods.
#[test]
fn a_pod_that_takes_its_neighbours_ip_never_gets_its_identity() {
    let mut t = TestLab::up(2);
    t.apply(&app());
    wait_until("mTLS for both pods of node-1", || {
        t.curl("front/client", "http://10.96.0.20/").is_ok()
            && t.curl("front/mallory", "http://10.96.0.20/").is_ok()
            && t.log("ztunnel-2")
                .contains("src.identity=\"spiffe://cluster.local/ns/front/sa/web\"")
            && t.log("ztunnel-2")
                .contains("src.identity=\"spiffe://cluster.local/ns/front/sa/mallory\"")
    });
    // The pods' processes run in kubelet-style cgroups named by pod UID, unique to the lab.
    let client = t.lab.state.pods["front/client"].clone();
    let pid = t.lab.process("pod:front/client").unwrap().pid;
    let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let want = format!(
        "{}/kubepods/besteffort/pod{}/client",
        t.lab.cgroups().unwrap().root(),
        client.uid
    );
    assert!(cg.lines().any(|l| l.ends_with(&want)), "{cg} lacks {want}");

    // Mallory takes the client's address on its loopback; the node agent restarts.
    let mallory_ns = t.lab.state.pods["front/mallory"].netns.clone();
    mesh_e2e::net::ns_run(
        &mallory_ns,
        &[
            "ip",
            "addr",
            "add",
            &format!("{}/32", client.ip),
            "dev",
            "lo",
        ],
    );
    t.lab.stop("agent-1", true).unwrap();
    t.lab.start_agent(1).unwrap();
    t.lab
        .wait_log("agent-1", "xDS connected", Duration::from_secs(15))
        .unwrap();
    t.wait_log("agent-1", "REFUSED to bind a network namespace");
    // ztunnel-1 reconnects and gets the new snapshot: the client, found by its cgroup.
    t.lab
        .wait_log("agent-1", "snapshot sent", Duration::from_secs(15))
        .unwrap();
    let agent_log = t.log("agent-1");
    let restarted = &agent_log[agent_log.rfind("starting the node agent").unwrap()..];
    assert!(
        restarted
            .lines()
            .any(|l| l.contains("by its cgroup and IP") && l.contains("front/client")),
        "{restarted}"
    );
    assert!(
        restarted.contains("pods=1"),
        "only the client in the snapshot: {restarted}"
    );
    let refusal = agent_log
        .lines()
        .rev()
        .find(|l| l.contains("REFUSED"))
        .unwrap();
    assert!(
        refusal.contains("front/mallory") && refusal.contains("front/client"),
        "{refusal}"
    );
    // The client keeps its identity, from its own namespace.
    let ztunnel2_before = t.log("ztunnel-2").len();
    wait_until("the client through the mesh again", || {
        t.curl("front/client", "http://10.96.0.20/client-after-restart")
            .is_ok()
    });
    // Mallory's namespace was handed to nobody: its traffic is refused (its redirection
    // stays), and nothing ever reaches the server as the client's identity from it.
    wait_until("mallory refused", || {
        t.curl("front/mallory", "http://10.96.0.20/").is_err()
    });
    let cap = t.capture("mallory");
    assert!(
        t.curl("front/mallory", "http://10.96.0.20/mallory-marker-8")
            .is_err()
    );
    let (bytes, _) = cap.finish();
    let seen = contains(&bytes, "mallory-marker-8");
    assert!(!seen, "nothing from mallory in the clear");
    let mallory_ip = &t.lab.state.pods["front/mallory"].ip;
    let after = t.log("ztunnel-2")[ztunnel2_before..].to_string();
    assert!(
        !after
            .lines()
            .any(|l| l.contains(&format!("src.addr={mallory_ip}:"))),
        "mallory reached the server after the restart:\n{after}"
    );
    let metrics = mesh_e2e::net::ns_run(
        &t.lab.node_ns(1),
        &["curl", "-s", "http://127.0.0.1:8000/metrics"],
    );
    assert!(
        metrics.contains("mesh_cni_netns_refused_total{reason=\"foreign_ip\"} 1"),
        "{metrics}"
    );
}

#[test]
fn down_removes_the_labs_cgroups_even_after_a_crash_without_state() {
    let root = tempfile::tempdir().unwrap();
    let bins = binary("ztunnel").parent().unwrap().to_path_buf();
    let name = unique("g");
    // Whatever happens below, the lab goes (a failed assertion must not leave it up).
    struct Down<'a>(&'a str, &'a std::path::Path, &'a std::path::Path);
    impl Drop for Down<'_> {
        fn drop(&mut self) {
            if let Ok(mut lab) = Lab::open_with_binaries(self.0, self.1, self.2) {
                let _ = lab.down();
            }
        }
    }
    let _down = Down(&name, root.path(), &bins);
    let cgroups;
    {
        let mut lab = Lab::open_with_binaries(&name, root.path(), &bins).unwrap();
        lab.up(1).unwrap();
        lab.apply(
            "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: default, uid: 0f4b1c2e-4a5d-4e6f-8a9b-0c1d2e3f4a5b}\nspec: {containers: [{name: c}]}\n",
            "crash.yaml",
        )
        .unwrap();
        cgroups = lab.cgroups().unwrap();
        // The pod's process is in its cgroup, named by its UID as the kubelet names it.
        let pid = lab.process("pod:default/p").unwrap().pid;
        let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
        let want = format!(
            "{}/kubepods/besteffort/pod0f4b1c2e-4a5d-4e6f-8a9b-0c1d2e3f4a5b/c",
            cgroups.root()
        );
        assert!(cg.lines().any(|l| l.ends_with(&want)), "{cg} lacks {want}");
        // Another lab of the same name elsewhere has its own root.
        let other = tempfile::tempdir().unwrap();
        let twin = Lab::open_with_binaries(&name, other.path(), &bins).unwrap();
        assert_ne!(twin.cgroups().unwrap().root(), cgroups.root());
        // The CLI "crashes": nothing is torn down, and its state file is lost too.
        std::fs::remove_file(lab.dir.join("state.json")).unwrap();
    }
    assert!(cgroups.exists());
    let mut again = Lab::open_with_binaries(&name, root.path(), &bins).unwrap();
    again.down().unwrap();
    assert!(!cgroups.exists(), "the lab's cgroups are gone");
}
