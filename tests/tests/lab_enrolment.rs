//! Enrolment you can check, on a real lab cluster: every pod of an enrolled namespace is
//! confirmed (its rules read back from its network namespace as planned, ztunnel's ack);
//! a pod whose rules are changed from outside is flagged failed, with the reason, in
//! `meshctl enrolment` and the agent's metric, never sends plaintext off the node, and
//! cannot be reached in plaintext around ztunnel.

use mesh_e2e::binary;
use mesh_e2e::cluster::{contains, wait_until};
use mesh_e2e::manifests::{
    BACK_AMBIENT, BACK_API_POD_WITH_TCP_ECHO, FRONT_AMBIENT, FRONT_CLIENT, join,
};
use mesh_e2e::testlab::TestLab;
use mesh_lab::lab::Lab;
use std::process::Command;

const SERVICE: &str = "apiVersion: v1
kind: Service
metadata: {name: api, namespace: back}
spec:
  selector: {app: api}
  clusterIP: 10.96.0.20
  ports: [{name: http, port: 80, targetPort: http}]
";

/// A second enrolled pod on node-1, left alone.
const FRONT_OTHER: &str = "apiVersion: v1
kind: Pod
metadata: {name: other, namespace: front, labels: {app: other}}
spec: {nodeName: node-1, serviceAccountName: web, containers: [{name: other}]}
";

fn confirmed_line(report: &str, pod: &str) -> bool {
    report
        .lines()
        .any(|l| l.contains(pod) && l.trim_end().ends_with("confirmed"))
}

#[test]
fn every_pod_confirmed_then_a_broken_pod_is_flagged_and_fails_closed() {
    let mut t = TestLab::up_named("enr", 2, &["curl", "tcpdump", "nft"]);
    t.apply(&join(&[
        FRONT_AMBIENT,
        BACK_AMBIENT,
        BACK_API_POD_WITH_TCP_ECHO,
        SERVICE,
        FRONT_CLIENT,
        FRONT_OTHER,
    ]));

    // Every pod of the enrolled namespaces: confirmed, on each node, and meshctl says so
    // (exit 0); the metric agrees.
    t.eventually("every pod confirmed on node-1", || {
        let (ok, out) = t.meshctl_on(1, &["enrolment"]);
        ok && confirmed_line(&out, "front/client") && confirmed_line(&out, "front/other")
    });
    t.eventually("every pod confirmed on node-2", || {
        let (ok, out) = t.meshctl_on(2, &["enrolment"]);
        ok && confirmed_line(&out, "back/api")
    });
    assert!(
        t.agent_metrics(1)
            .contains("mesh_cni_pod_enrolment{state=\"confirmed\"} 2\n"),
        "{}",
        t.agent_metrics(1)
    );
    // Every pod's name and UID are for the node only: from another node the agent's
    // metrics answer, /enrolment does not; meshctl exits 2 for an agent it cannot read.
    let node1 = format!("{}:8000", Lab::node_ip(1));
    let from_node2 = |args: &[&str]| {
        Command::new("ip")
            .args(["netns", "exec", &t.lab.node_ns(2)])
            .args(args)
            .output()
            .unwrap()
    };
    let metrics = from_node2(&[
        "curl",
        "-s",
        "--max-time",
        "5",
        &format!("http://{node1}/metrics"),
    ]);
    assert!(String::from_utf8_lossy(&metrics.stdout).contains("mesh_cni_pod_enrolment"));
    let remote = from_node2(&[
        binary("meshctl").to_str().unwrap(),
        "enrolment",
        "--agent",
        &node1,
    ]);
    assert_eq!(remote.status.code(), Some(2), "{remote:?}");
    let err = String::from_utf8_lossy(&remote.stderr);
    assert!(
        err.contains("serves /enrolment to its own node only"),
        "{err}"
    );
    assert!(!String::from_utf8_lossy(&remote.stdout).contains("front/client"));
    wait_until("mTLS through the mesh", || {
        t.curl("front/client", "http://10.96.0.20/").is_ok()
    });

    // Break front/client's capture from outside: its NAT table deleted in its netns.
    let ns = t.lab.state.pods["front/client"].netns.clone();
    let del = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns,
            "nft",
            "delete",
            "table",
            "inet",
            "ambient-nat",
        ])
        .status()
        .unwrap();
    assert!(del.success());

    // At once, before the agent has looked: nothing in plaintext leaves the pod.
    let cap = t.capture("broken");
    let sent = t.curl("front/client", "http://10.96.0.20/leak-marker-1");
    let (bytes, _) = cap.finish();
    assert!(
        !contains(&bytes, "leak-marker-1"),
        "a pod whose capture is broken sent plaintext off the node (curl: {sent:?})"
    );
    assert!(sent.is_err(), "the guard refuses the connection: {sent:?}");

    // The agent's periodic read-back notices: flagged failed, with the reason, the
    // others still confirmed; meshctl exits 1; the metric counts it.
    t.eventually("front/client flagged failed", || {
        let (ok, out) = t.meshctl_on(1, &["enrolment"]);
        !ok && out.lines().any(|l| {
            l.contains("front/client")
                && l.contains("FAILED")
                && l.contains("table inet ambient-nat is missing")
        }) && confirmed_line(&out, "front/other")
    });
    // `meshctl status` flags it too, with the reason, and counts the rest as confirmed.
    let (_, status) = t.meshctl_on(1, &["status"]);
    let section = status
        .split_once("ENROLMENT")
        .map(|(_, s)| s)
        .unwrap_or_else(|| panic!("no ENROLMENT section in meshctl status:\n{status}"));
    assert!(
        section.contains("1 of 2 enrolled pods confirmed")
            && section.lines().any(|l| l.contains("front/client")
                && l.contains("FAILED")
                && l.contains("table inet ambient-nat is missing")),
        "{status}"
    );
    let m = t.agent_metrics(1);
    assert!(
        m.contains("mesh_cni_pod_enrolment{state=\"failed\"} 1\n"),
        "{m}"
    );
    assert!(
        m.contains("mesh_cni_pod_enrolment{state=\"confirmed\"} 1\n"),
        "{m}"
    );
    t.wait_log("agent-1", "the pod's redirection differs from the plan");

    // Still failed closed while flagged.
    let cap = t.capture("flagged");
    let sent = t.curl("front/client", "http://10.96.0.20/leak-marker-2");
    let (bytes, _) = cap.finish();
    assert!(sent.is_err() && !contains(&bytes, "leak-marker-2"));
    // The untouched pod on the same node still goes through the mesh.
    assert!(
        t.curl("front/other", "http://10.96.0.20/").is_ok(),
        "{}",
        t.all_logs()
    );

    // Inbound: back/api's capture deleted too. A plaintext client on the fabric (node-1,
    // not in the mesh) cannot reach the app around ztunnel's inbound authorization...
    let api = t.lab.state.pods["back/api"].clone();
    let node1 = Lab::node_ip(1);
    // curl's exit code for a plaintext request from node-1's namespace to the app.
    let direct = |path: &str| {
        Command::new("ip")
            .args(["netns", "exec", &t.lab.node_ns(1)])
            .args(["curl", "-s", "-o", "/dev/null", "--max-time", "5"])
            .arg(format!("http://{}:8080/{path}", api.ip))
            .status()
            .unwrap()
            .code()
    };
    // Positive control: with the capture in place, this client reaches the app, through
    // ztunnel-2's (permissive) plaintext inbound, which records it, and the app sees it.
    assert_eq!(direct("guard-control-8"), Some(0), "{}", t.all_logs());
    t.wait_log("ztunnel-2", &format!("src.addr={node1}:"));
    t.wait_log("pod:back/api", "request GET /guard-control-8 ");
    let zt2_from = t.log_len("ztunnel-2");
    let del = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &api.netns,
            "nft",
            "delete",
            "table",
            "inet",
            "ambient-nat",
        ])
        .status()
        .unwrap();
    assert!(del.success());
    // The guard's `reject with tcp reset`: curl 7 (refused at connect), not a timeout or
    // any other failure; neither ztunnel-2 nor the app saw the request.
    assert_eq!(
        direct("guard-marker-8"),
        Some(7),
        "the inbound guard refuses a plaintext client of a pod whose inbound capture is gone"
    );
    assert!(
        !t.log("pod:back/api").contains("guard-marker-8"),
        "the app saw the request around ztunnel"
    );
    let zt2 = t.log_since("ztunnel-2", zt2_from);
    assert!(
        !zt2.contains(&format!("src.addr={node1}:")),
        "ztunnel-2 took the request after the capture was gone:\n{zt2}"
    );
    // ...while HBONE from the mesh still reaches it through ztunnel.
    assert!(
        t.curl("front/other", "http://10.96.0.20/").is_ok(),
        "{}",
        t.all_logs()
    );
}
