//! The DNS proxy on a real lab cluster: a pod whose DNS is captured (the default; a pod
//! annotated `ambient.istio.io/dns-capture: "false"` is not) resolves Service names to their VIPs with `dig`, a headless Service's
//! name to its ready endpoints and a StatefulSet-style pod host to its pod, gets other
//! names from an upstream resolver (dnsmasq, run by the test in a lab pod) that ztunnel
//! takes from its resolv.conf while running, and gets no answer at all while ztunnel is
//! down. Nothing leaves the lab: the upstream is a lab pod.

use mesh_e2e::require_tool;
use mesh_e2e::testlab::TestLab;
use std::process::Command;

/// The full path of `tool` (pods run their command without a shell).
fn which(tool: &str) -> String {
    require_tool(tool);
    let out = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Pod `upstream/dns` (namespace outside the mesh) running dnsmasq: authoritative for
/// `outside.example` (`www` → 203.0.113.7, `big` → 40 addresses, anything else
/// NXDOMAIN), nothing else.
fn upstream(dnsmasq: &str, dir: &std::path::Path) -> String {
    let hosts = dir.join("big.hosts");
    let lines: String = (1..=40)
        .map(|i| format!("198.51.100.{i} big.outside.example\n"))
        .collect();
    std::fs::write(&hosts, lines).unwrap();
    let args = [
        dnsmasq.to_string(),
        "--keep-in-foreground".into(),
        "--log-facility=-".into(),
        "--log-queries".into(),
        "--no-resolv".into(),
        "--no-hosts".into(),
        "--no-poll".into(),
        "--user=root".into(),
        format!("--pid-file={}", dir.join("dnsmasq.pid").display()),
        "--local=/outside.example/".into(),
        "--address=/www.outside.example/203.0.113.7".into(),
        // A selector-less headless Service: kube-dns knows it, ztunnel knows no endpoint.
        "--address=/manual.back.svc.cluster.local/192.0.2.9".into(),
        format!("--addn-hosts={}", hosts.display()),
    ];
    let command = args
        .iter()
        .map(|a| format!("{a:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "apiVersion: v1
kind: Namespace
metadata: {{name: upstream}}
---
apiVersion: v1
kind: Pod
metadata: {{name: dns, namespace: upstream}}
spec: {{nodeName: node-1, containers: [{{name: dns, command: [{command}]}}]}}
"
    )
}

/// Enrolled namespaces `front` (pod `client`, DNS captured by default; pod `plain`, not
/// captured: its annotation turns capture off; Service `local` on 10.96.0.30) and `back`
/// (Service `api` on 10.96.0.20; headless `db` over pods `db-0` and `db-1`, `cache` over
/// `api` without ports, `manual` without selector).
const MESH: &str = r#"apiVersion: v1
kind: Namespace
metadata: {name: front, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: back, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: front, labels: {app: client}}
spec: {nodeName: node-1, serviceAccountName: web, containers: [{name: client, ports: [{name: http, containerPort: 8080}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: plain, namespace: front, labels: {app: plain}, annotations: {ambient.istio.io/dns-capture: "false"}}
spec: {nodeName: node-1, serviceAccountName: web, containers: [{name: plain}]}
---
apiVersion: v1
kind: Service
metadata: {name: local, namespace: front}
spec:
  selector: {app: client}
  clusterIP: 10.96.0.30
  ports: [{name: http, port: 80, targetPort: http}]
---
apiVersion: v1
kind: Pod
metadata: {name: api, namespace: back, labels: {app: api}}
spec: {nodeName: node-1, serviceAccountName: api, containers: [{name: api, ports: [{name: http, containerPort: 8080}]}]}
---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: back}
spec:
  selector: {app: api}
  clusterIP: 10.96.0.20
  ports: [{name: http, port: 80, targetPort: http}]
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: back}
spec:
  selector: {app: db}
  clusterIP: None
  ports: [{name: pg, port: 5432}]
---
apiVersion: v1
kind: Service
metadata: {name: cache, namespace: back}
spec: {selector: {app: api}, clusterIP: None}
---
apiVersion: v1
kind: Service
metadata: {name: manual, namespace: back}
spec: {clusterIP: None}
---
apiVersion: v1
kind: Pod
metadata: {name: db-0, namespace: back, labels: {app: db}}
spec: {nodeName: node-1, hostname: db-0, subdomain: db, containers: [{name: db}]}
---
apiVersion: v1
kind: Pod
metadata: {name: db-1, namespace: back, labels: {app: db}}
spec: {nodeName: node-1, hostname: db-1, subdomain: db, containers: [{name: db}]}
"#;

/// `dig` from inside `pod`, one try; (exit success, stdout).
fn dig(t: &TestLab, pod: &str, args: &[&str]) -> (bool, String) {
    let out = t
        .in_pod(pod)
        .args(["dig", "+time=2", "+tries=1"])
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// The addresses (and CNAME targets) `dig +short` prints.
fn short(t: &TestLab, pod: &str, server: &str, args: &[&str]) -> Vec<String> {
    let at = format!("@{server}");
    let mut all = vec!["+short", at.as_str()];
    all.extend_from_slice(args);
    let (_, out) = dig(t, pod, &all);
    out.lines().map(str::to_string).collect()
}

/// Replaces node 1's resolv.conf as an editor or a kubelet does: a new file renamed over
/// the old one.
fn write_resolv_conf(t: &TestLab, text: &str) {
    let path = t.lab.node_resolv_conf(1);
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
}

/// Sets pod `ns/name`'s Ready condition as its kubelet would (the control plane reads
/// the lab's manifests as written).
fn set_ready(t: &TestLab, ns: &str, name: &str, ready: bool) {
    let path = t.lab.dir.join(format!("manifests/pod-{ns}-{name}.yaml"));
    let mut doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let conditions = doc["status"]["conditions"].as_array_mut().unwrap();
    let c = conditions
        .iter_mut()
        .find(|c| c["type"] == "Ready")
        .unwrap();
    c["status"] = serde_json::json!(if ready { "True" } else { "False" });
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, doc.to_string()).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
}

/// `back/db` is headless: its name resolves to the ready pods' addresses, `db-N.db.back`
/// to pod `db-N`; a pod that turns not ready leaves the answers. The upstream knows none
/// of these names, so the answers are ztunnel's.
fn headless_service_answers_its_ready_endpoints(t: &TestLab, up: &str) {
    let ip = |pod: &str| t.lab.state.pods[pod].ip.clone();
    let (db0, db1) = (ip("back/db-0"), ip("back/db-1"));
    let sorted = |mut v: Vec<String>| {
        v.sort();
        v
    };
    let mut both = vec![db0.clone(), db1.clone()];
    both.sort();
    t.eventually("the headless Service's endpoints", || {
        sorted(short(t, "front/client", up, &["db.back"])) == both
    });
    for name in ["db.back.svc", "db.back.svc.cluster.local"] {
        let answer = sorted(short(t, "front/client", up, &[name]));
        if answer != both {
            // Seen once in CI (an empty answer right after `db.back` had both): say what
            // the resolver saw, so the next occurrence explains itself.
            let (_, full) = dig(t, "front/client", &[&format!("@{up}"), name]);
            let log = t.log("ztunnel-1");
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            panic!(
                "{name}: {answer:?}, expected {both:?}\n{full}\nztunnel-1, last lines:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
    }
    // A pod host in its full form, as asked or after a search domain (a CNAME to it).
    let full1 = "db-1.db.back.svc.cluster.local";
    assert_eq!(
        short(t, "front/client", up, &[full1]),
        std::slice::from_ref(&db1)
    );
    assert_eq!(
        short(
            t,
            "front/client",
            up,
            &["db-1.db.back.svc.cluster.local.front.svc.cluster.local"]
        ),
        [format!("{full1}."), db1.clone()],
        "a search-list expansion"
    );
    assert_eq!(
        short(
            t,
            "front/client",
            up,
            &["+tcp", "db-0.db.back.svc.cluster.local"]
        ),
        std::slice::from_ref(&db0)
    );
    // A short form is no Kubernetes name: the upstream's (which knows none).
    assert!(
        !short(t, "front/client", up, &["db-1.db.back"]).contains(&db1),
        "db-1.db.back is not answered from the pod host"
    );
    // Headless without ports: still its endpoints. Without any endpoint ztunnel knows
    // of (no selector): the upstream answers, not an empty NOERROR.
    assert_eq!(
        short(t, "front/client", up, &["cache.back.svc.cluster.local"]),
        [ip("back/api")]
    );
    assert_eq!(
        short(t, "front/client", up, &["manual.back.svc.cluster.local"]),
        ["192.0.2.9"]
    );
    let upstream_answer = short(t, "front/plain", up, &["db.back.svc.cluster.local"]);
    assert!(
        !upstream_answer.contains(&db0),
        "the upstream does not know the headless Service: {upstream_answer:?}"
    );

    set_ready(t, "back", "db-1", false);
    t.eventually("the not-ready endpoint gone from the answer", || {
        short(t, "front/client", up, &["db.back"]) == [db0.clone()]
    });
    assert!(
        !short(t, "front/client", up, &[full1]).contains(&db1),
        "nor its pod host"
    );
    set_ready(t, "back", "db-1", true);
    t.eventually("back once ready", || {
        sorted(short(t, "front/client", up, &["db.back"])) == both
    });
}

fn ztunnel_metrics(t: &TestLab) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", &t.lab.node_ns(1)])
        .args(["curl", "-s", "http://127.0.0.1:15020/metrics"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn captured_pod_resolves_services_from_the_mesh_and_the_rest_upstream_and_fails_without_ztunnel() {
    let dnsmasq = which("dnsmasq");
    let mut t = TestLab::up_named("dns", 1, &["curl", "dig"]);
    let dns_pod = upstream(&dnsmasq, &t.lab.dir);
    t.apply(&dns_pod);
    t.apply(MESH);
    let up = t.lab.state.pods["upstream/dns"].ip.clone();

    // ztunnel started without a resolv.conf: mesh names are answered, the rest fails.
    t.eventually("the DNS proxy answering", || {
        short(&t, "front/client", &up, &["api.back"]) == ["10.96.0.20"]
    });
    let (_, none) = dig(
        &t,
        "front/client",
        &[&format!("@{up}"), "www.outside.example"],
    );
    assert!(none.contains("status: SERVFAIL"), "no upstream yet: {none}");
    // The node's resolver becomes the lab's dnsmasq while ztunnel runs: it follows the
    // file, no restart.
    write_resolv_conf(&t, &format!("nameserver {up}\n"));

    // Positive control, outside the capture: the upstream answers its own names and
    // knows nothing of the mesh's.
    t.eventually("dnsmasq answering", || {
        short(&t, "front/plain", &up, &["www.outside.example"]) == ["203.0.113.7"]
    });
    assert!(
        !short(&t, "front/plain", &up, &["api.back.svc.cluster.local"])
            .contains(&"10.96.0.20".to_string()),
        "the upstream cannot answer a mesh Service name"
    );

    // The captured pod: whatever server it asks, port 53 reaches ztunnel in the pod.
    t.eventually("forwarding to the resolver of the new resolv.conf", || {
        short(&t, "front/client", &up, &["www.outside.example"]) == ["203.0.113.7"]
    });
    assert_eq!(
        short(&t, "front/client", &up, &["api.back.svc.cluster.local"]),
        ["10.96.0.20"]
    );
    for name in ["api.back", "api.back.svc", "api.back.svc.cluster.local."] {
        assert_eq!(
            short(&t, "front/client", &up, &[name]),
            ["10.96.0.20"],
            "{name}"
        );
    }
    // The short form is the asking pod's namespace.
    assert_eq!(short(&t, "front/client", &up, &["local"]), ["10.96.0.30"]);
    assert_eq!(
        short(&t, "front/client", &up, &["+tcp", "api.back"]),
        ["10.96.0.20"],
        "over TCP too"
    );
    // A name with the pod's search domain appended: CNAME to the short name, then A.
    assert_eq!(
        short(
            &t,
            "front/client",
            &up,
            &["api.back.front.svc.cluster.local"]
        ),
        ["api.back.", "10.96.0.20"]
    );
    // Known name, no IPv6 VIP: NOERROR without records (NODATA), not NXDOMAIN.
    let (_, aaaa) = dig(&t, "front/client", &[&format!("@{up}"), "AAAA", "api.back"]);
    assert!(
        aaaa.contains("status: NOERROR") && aaaa.contains("ANSWER: 0") && aaaa.contains(" aa"),
        "{aaaa}"
    );

    // Everything else goes upstream, NXDOMAIN included, over UDP and TCP.
    assert_eq!(
        short(&t, "front/client", &up, &["www.outside.example"]),
        ["203.0.113.7"]
    );
    assert_eq!(
        short(&t, "front/client", &up, &["+tcp", "www.outside.example"]),
        ["203.0.113.7"]
    );
    let (_, nx) = dig(
        &t,
        "front/client",
        &[&format!("@{up}"), "missing.outside.example"],
    );
    assert!(nx.contains("status: NXDOMAIN"), "{nx}");
    // A reply too large for a 512-byte client: TC over UDP, then whole over TCP.
    let (_, tc) = dig(
        &t,
        "front/client",
        &[
            &format!("@{up}"),
            "+noedns",
            "+ignore",
            "big.outside.example",
        ],
    );
    assert!(tc.contains(" tc"), "truncated over UDP: {tc}");
    assert_eq!(
        short(&t, "front/client", &up, &["+noedns", "big.outside.example"]).len(),
        40,
        "dig retried over TCP and got every record"
    );

    headless_service_answers_its_ready_endpoints(&t, &up);

    // A broken resolv.conf keeps the resolver in use, and ztunnel says why.
    // (The line counted: the missing file at start logged it already.)
    let kept = "keeping the upstream resolvers in use";
    let before = t.log("ztunnel-1").matches(kept).count();
    write_resolv_conf(&t, "nameserver not-an-address\n");
    t.eventually("ztunnel rejecting the broken resolv.conf", || {
        t.log("ztunnel-1").matches(kept).count() > before
    });
    assert_eq!(
        short(&t, "front/client", &up, &["www.outside.example"]),
        ["203.0.113.7"]
    );

    // Istio's metric names, with the protocol and query type.
    let m = ztunnel_metrics(&t);
    for needle in [
        "istio_dns_requests_total{request_query_type=\"a\",request_protocol=\"udp\"",
        "istio_dns_requests_total{request_query_type=\"a\",request_protocol=\"tcp\"",
        "istio_dns_upstream_requests_total{request_query_type=\"a\"",
        "istio_dns_upstream_request_duration_seconds_bucket",
    ] {
        assert!(m.contains(needle), "{needle} in\n{m}");
    }

    // A good file again (the same resolver: nothing to log), so that the ztunnel
    // restarted below reads one and the SERVFAIL there is the upstream's absence.
    write_resolv_conf(&t, &format!("nameserver {up}\n"));

    // ztunnel down: the captured pod's DNS fails, it is never answered from elsewhere
    // (the upstream it names is up: the uncaptured pod still gets its answer).
    t.lab.stop("ztunnel-1", true).unwrap();
    let (ok, out) = dig(
        &t,
        "front/client",
        &[&format!("@{up}"), "www.outside.example"],
    );
    assert!(
        !ok && !out.contains("203.0.113.7"),
        "no answer without ztunnel: {out}"
    );
    assert_eq!(
        short(&t, "front/plain", &up, &["www.outside.example"]),
        ["203.0.113.7"]
    );

    // ztunnel back, the upstream gone: SERVFAIL, counted as an upstream failure.
    t.lab.start_ztunnel(1).unwrap();
    t.eventually("the DNS proxy back", || {
        short(&t, "front/client", &up, &["api.back"]) == ["10.96.0.20"]
    });
    assert_eq!(
        short(&t, "front/client", &up, &["www.outside.example"]),
        ["203.0.113.7"],
        "the restarted ztunnel forwards to the upstream of the good file"
    );
    t.lab.stop("pod:upstream/dns", true).unwrap();
    let (_, fail) = dig(
        &t,
        "front/client",
        &[&format!("@{up}"), "www.outside.example"],
    );
    assert!(fail.contains("status: SERVFAIL"), "{fail}");
    let m = ztunnel_metrics(&t);
    assert!(
        m.contains(
            "istio_dns_upstream_failures_total{request_query_type=\"a\",request_protocol=\"udp\""
        ),
        "{m}"
    );
}
