//! A node reboot never lets a pod bypass the mesh, on a real lab cluster: node 2 is
//! rebooted twice (`mesh-lab reboot`), once with its pods recreated before its node
//! agent (and ztunnel before the agent), once with the agent first and the pods before
//! ztunnel. A capture on node 2's uplink runs through both; a pod of node 2 whose own
//! process is a loop of plaintext HTTP requests to a pod on node 1 runs from the moment
//! it exists. Nothing of it crosses the fabric in plaintext (only HBONE, port 15008); a
//! pod whose ADD fails while the agent is down is not started; once the node is back,
//! every pod is confirmed and the loop's requests go through over mTLS. The lost
//! sandboxes are released (CNI DEL) only after the new ones were made, as a kubelet
//! does after a real reboot: at the end of the first reboot, and after a restart of the
//! node agent in the second.

use mesh_e2e::cluster::contains;
use mesh_e2e::manifests::{BACK_AMBIENT, BACK_API_POD_WITH_TCP_ECHO, FRONT_AMBIENT, join};
use mesh_e2e::testlab::TestLab;
use mesh_lab::lab::Lab;
use mesh_lab::reboot::{Boot, BootOrder, Event, Release, Report};
use std::time::{Duration, Instant};

/// The pod on node 1 the loop talks to.
const FRONT_SERVER: &str = "apiVersion: v1
kind: Pod
metadata: {name: server, namespace: front, labels: {app: server}}
spec:
  nodeName: node-1
  serviceAccountName: server
  containers: [{name: server, ports: [{name: http, containerPort: 8080}]}]
";

/// What every request of the loop carries: never to be seen on the fabric.
const MARKER: &str = "reboot-plaintext-marker";

/// Pod `back/looper` on node 2: its process requests `server_ip:8080` forever, a line
/// per attempt (`ok N` / `fail N`) in its log.
fn looper(server_ip: &str) -> String {
    let script = format!(
        "i=0; while :; do i=$((i+1)); \
         if curl -s -o /dev/null --max-time 2 http://{server_ip}:8080/{MARKER}-$i; \
         then echo ok $i; else echo fail $i; fi; sleep 0.2; done"
    );
    serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "looper", "namespace": "back", "labels": {"app": "looper"}},
        "spec": {"nodeName": "node-2", "serviceAccountName": "looper",
                 "containers": [{"name": "looper", "command": ["sh", "-c", script]}]}
    })
    .to_string()
}

const NODE2_PODS: [&str; 2] = ["back/api", "back/looper"];

fn confirmed(t: &TestLab, node: usize, pods: &[&str]) -> bool {
    let (ok, out) = t.meshctl_on(node, &["enrolment"]);
    ok && pods.iter().all(|pod| {
        out.lines()
            .any(|l| l.contains(pod) && l.trim_end().ends_with("confirmed"))
    })
}

/// What the current run of `role` wrote to its log.
fn current_log(t: &TestLab, role: &str) -> String {
    current_log_of(&t.lab, role)
}

fn current_log_of(lab: &Lab, role: &str) -> String {
    let p = lab.process(role).unwrap();
    let all = std::fs::read(&p.log).unwrap_or_default();
    String::from_utf8_lossy(all.get(p.log_offset as usize..).unwrap_or_default()).into_owned()
}

/// The reboot as `mesh-lab reboot` prints it, for the test's output.
fn print_events(r: &Report) {
    for e in &r.events {
        eprintln!("reboot: {e}");
    }
}

fn position(r: &Report, f: impl Fn(&Event) -> bool) -> Option<usize> {
    r.events.iter().position(f)
}

fn started(r: &Report, what: &str) -> usize {
    position(r, |e| matches!(e, Event::Started(w) if w == what))
        .unwrap_or_else(|| panic!("{what} not started: {:#?}", r.events))
}

/// The lost sandbox of `pod` released (CNI DEL) without an error.
fn released(r: &Report, pod: &str) -> usize {
    position(
        r,
        |e| matches!(e, Event::Released { pod: p, error: None } if p == pod),
    )
    .unwrap_or_else(|| panic!("{pod}'s lost sandbox not released: {:#?}", r.events))
}

fn pod_started(r: &Report, pod: &str) -> usize {
    position(
        r,
        |e| matches!(e, Event::PodStarted { pod: p, .. } if p == pod),
    )
    .unwrap_or_else(|| panic!("{pod} not started: {:#?}", r.events))
}

/// After a reboot: the node's pods all enrolled (confirmed), and the loop's requests
/// from the recreated pod answered over mTLS (ztunnel on node 1 saw its identity).
fn back_in_the_mesh(t: &TestLab, ztunnel1_from: usize) {
    t.eventually("node-2's pods confirmed after the reboot", || {
        confirmed(t, 2, &NODE2_PODS)
    });
    t.eventually("the recreated loop's requests answered", || {
        current_log(t, "pod:back/looper")
            .lines()
            .any(|l| l.starts_with("ok "))
    });
    t.eventually("over mTLS, as back/looper", || {
        t.log("ztunnel-1").get(ztunnel1_from..).is_some_and(|l| {
            l.contains("src.identity=\"spiffe://cluster.local/ns/back/sa/looper\"")
        })
    });
}

#[test]
fn a_rebooted_node_never_sends_plaintext_and_its_pods_come_back_enrolled() {
    let mut t = TestLab::up_named("rbt", 2, &["curl", "tcpdump", "nft"]);
    t.apply(&join(&[
        FRONT_AMBIENT,
        BACK_AMBIENT,
        FRONT_SERVER,
        BACK_API_POD_WITH_TCP_ECHO,
    ]));
    let server_ip = t.lab.state.pods["front/server"].ip.clone();
    t.apply(&looper(&server_ip));
    t.eventually("every pod confirmed", || {
        confirmed(&t, 1, &["front/server"]) && confirmed(&t, 2, &NODE2_PODS)
    });
    t.eventually("the loop's requests answered", || {
        t.log("pod:back/looper")
            .lines()
            .any(|l| l.starts_with("ok "))
    });

    // Everything that leaves node 2 for a pod, through both reboots. Its scope: IPv4
    // TCP to and from pod addresses (the lab is IPv4 only here; UDP is not looked at).
    let mut cap = mesh_e2e::cluster::capture_in(
        &t.lab.fabric_ns(),
        "n2",
        &t.lab.dir,
        "node2-uplink",
        "tcp and net 10.244.0.0/16",
    );
    let mut looper_ips = vec![t.lab.state.pods["back/looper"].ip.clone()];

    // 1. Pods first, then ztunnel, then the agent: every ADD fails while the agent is
    // down, and no pod starts before it is up. The lost sandboxes are released once
    // the pods are back.
    let from = t.log("ztunnel-1").len();
    let old_pids: Vec<u32> = NODE2_PODS
        .iter()
        .map(|p| t.lab.process(&format!("pod:{p}")).unwrap().pid)
        .collect();
    let order: BootOrder = "pods,ztunnel,agent".parse().unwrap();
    let r = t
        .lab
        .reboot_with(2, order, Release::After, &mut |_, _| Ok(()))
        .unwrap();
    print_events(&r);
    assert!(r.not_started.is_empty(), "{:#?}", r.events);
    for (pod, old) in NODE2_PODS.iter().zip(&old_pids) {
        assert!(
            r.events.contains(&Event::Killed {
                role: format!("pod:{pod}"),
                pid: *old
            }),
            "{pod}'s process killed: {:#?}",
            r.events
        );
        let refused = position(&r, |e| {
            matches!(e, Event::NotStarted { pod: p, reason }
                if p == pod && reason.contains("node agent unreachable"))
        })
        .unwrap_or_else(|| {
            panic!(
                "{pod}: ADD failed while the agent was down: {:#?}",
                r.events
            )
        });
        assert!(refused < started(&r, "agent-2"), "{:#?}", r.events);
        assert!(
            pod_started(&r, pod) > started(&r, "agent-2"),
            "{pod} started only once the agent was: {:#?}",
            r.events
        );
        assert!(released(&r, pod) > pod_started(&r, pod), "{:#?}", r.events);
        assert_ne!(t.lab.process(&format!("pod:{pod}")).unwrap().pid, *old);
    }
    assert!(started(&r, "ztunnel-2") < started(&r, "agent-2"));
    back_in_the_mesh(&t, from);
    looper_ips.push(t.lab.state.pods["back/looper"].ip.clone());

    // 2. The agent first, then the pods, then ztunnel: the pods start (their rules read
    // back), their traffic refused until ztunnel takes them. ztunnel is held back until
    // the recreated loop has tried (and failed) at least once, so the capture covers
    // traffic in that window.
    let from = t.log("ztunnel-1").len();
    let order: BootOrder = "agent,pods,ztunnel".parse().unwrap();
    let mut tried_before_ztunnel = false;
    let r = t
        .lab
        .reboot_with(2, order, Release::Held, &mut |lab, step| {
            if *step != Boot::Ztunnel(2) {
                return Ok(());
            }
            let deadline = Instant::now() + Duration::from_secs(60);
            while !current_log_of(lab, "pod:back/looper")
                .lines()
                .any(|l| l.starts_with("fail "))
            {
                if Instant::now() > deadline {
                    return Err("the recreated loop made no attempt before ztunnel".into());
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            tried_before_ztunnel = true;
            Ok(())
        })
        .unwrap();
    print_events(&r);
    assert!(r.not_started.is_empty(), "{:#?}", r.events);
    assert!(
        tried_before_ztunnel,
        "the loop tried before ztunnel-2 started"
    );
    for pod in NODE2_PODS {
        let at = pod_started(&r, pod);
        assert!(started(&r, "agent-2") < at && at < started(&r, "ztunnel-2"));
    }
    // The agent restarts (it knows the new sandboxes by their pods' cgroups now), then
    // the lost sandboxes are released: the new sandboxes keep their capture.
    assert_eq!(r.held.len(), NODE2_PODS.len(), "{:?}", r.held);
    t.lab.stop("agent-2", false).unwrap();
    t.lab.start_agent(2).unwrap();
    t.lab.wait_agent_ready(2).unwrap();
    let late = t.lab.release_lost(2, &r.held);
    for e in &late {
        eprintln!("late: {e}");
        assert!(matches!(e, Event::Released { error: None, .. }), "{e}");
    }
    let after_release = current_log(&t, "pod:back/looper").len();
    back_in_the_mesh(&t, from);
    t.eventually(
        "the loop's requests answered after the late release",
        || {
            current_log(&t, "pod:back/looper")
                .get(after_release..)
                .is_some_and(|l| l.lines().any(|l| l.starts_with("ok ")))
        },
    );
    let looper_ip = t.lab.state.pods["back/looper"].ip.clone();
    assert!(
        !looper_ips.contains(&looper_ip),
        "the last sandbox has an address of its own: {looper_ip} {looper_ips:?}"
    );

    // Throughout: nothing of the loop in plaintext, only HBONE between pods.
    assert!(cap.running(), "tcpdump captured until the end");
    let (bytes, summary) = cap.finish();
    eprintln!("node 2's uplink: {} packets", summary.lines().count());
    assert!(
        !contains(&bytes, MARKER),
        "a pod of the rebooted node sent plaintext across the fabric:\n{summary}{}",
        t.all_logs()
    );
    assert!(
        !summary.is_empty() && summary.lines().all(|l| l.contains(".15008")),
        "only HBONE on node 2's uplink:\n{summary}"
    );
    // The capture saw the last sandbox's HBONE traffic (after the last pod start), not
    // only what came before the reboots.
    let last = format!(" {looper_ip}.");
    assert!(
        summary
            .lines()
            .any(|l| l.contains(&last) && l.contains(".15008")),
        "HBONE from back/looper's last sandbox ({looper_ip}) captured:\n{summary}"
    );
}
