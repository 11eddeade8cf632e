//! The core stories in an IPv6-only lab (`mesh-lab up --ip-family ipv6`): pods have an
//! IPv6 address only and a Service gets an IPv6 VIP, as a single-stack IPv6 cluster's API
//! server allocates it. Across nodes through the VIP only HBONE crosses the fabric, the
//! app sees the caller's IPv6 address and the destination's ztunnel its identity; an L4
//! DENY by principal refuses the attacker; a pod outside the mesh reaches the VIP through
//! the node's NAT; the DNS proxy answers AAAA for the Service; a waypoint takes the
//! Service's traffic and answers its readiness probe on its IPv6 address.

use mesh_e2e::cluster::{capture_in, contains};
use mesh_e2e::manifests::{
    BACK_AMBIENT, BACK_USES_WAYPOINT, FRONT_AMBIENT, FRONT_CLIENT, WAYPOINT_GATEWAY, join,
};
use mesh_e2e::testlab::{TestLab, logged_from, url};

const APPS: &str = r#"apiVersion: v1
kind: Pod
metadata: {name: api, namespace: back, labels: {app: api}}
spec:
  nodeName: node-2
  serviceAccountName: api
  containers: [{name: api, ports: [{name: http, containerPort: 8080}]}]
---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: back}
spec:
  selector: {app: api}
  ports: [{name: http, port: 80, targetPort: http}]
---
apiVersion: v1
kind: Pod
metadata: {name: attacker, namespace: front, labels: {app: attacker}}
spec: {nodeName: node-1, serviceAccountName: attacker, containers: [{name: attacker}]}
---
apiVersion: v1
kind: Namespace
metadata: {name: outside}
---
apiVersion: v1
kind: Pod
metadata: {name: legacy, namespace: outside}
spec: {nodeName: node-1, containers: [{name: legacy}]}
"#;

const DENY_ATTACKER: &str = r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-attacker, namespace: back}
spec:
  selector: {matchLabels: {app: api}}
  action: DENY
  rules: [{from: [{source: {principals: ["cluster.local/ns/front/sa/attacker"]}}]}]
"#;

#[test]
fn an_ipv6_only_lab_runs_the_core_stories() {
    let mut t = TestLab::up_ipv6_only("v6o", 2, &["curl", "tcpdump", "dig"]);
    t.apply(&join(&[FRONT_AMBIENT, BACK_AMBIENT, APPS, FRONT_CLIENT]));

    // Pods have no IPv4 address at all; the Service an IPv6 VIP only.
    let client = t.lab.state.pods["front/client"].ip.clone();
    let attacker = t.lab.state.pods["front/attacker"].ip.clone();
    assert!(client.starts_with("fd00:10:244:1::"), "{client}");
    let v4 = t
        .in_pod("front/client")
        .args(["ip", "-4", "-o", "addr", "show", "scope", "global"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&v4.stdout).trim(), "");
    let svc: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(t.lab.dir.join("manifests/service-back-api.yaml")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        svc["spec"]["ipFamilies"],
        serde_json::json!(["IPv6"]),
        "{svc}"
    );
    let vip = svc["spec"]["clusterIP"].as_str().unwrap().to_string();
    assert!(vip.starts_with("fd00:96::"), "{svc}");

    // mTLS across nodes through the VIP: only HBONE on the fabric, the app sees the
    // caller's IPv6 address, the destination's ztunnel its identity.
    t.eventually("the IPv6 VIP through the mesh", || {
        t.curl("front/client", &url(&vip, "")).is_ok()
    });
    let marker = "story-ipv6-only";
    let cap = capture_in(
        &t.lab.fabric_ns(),
        "br0",
        &t.lab.dir,
        "v6only",
        "ip6 and tcp and net fd00:10:244::/48",
    );
    let answer = t
        .curl("front/client", &url(&vip, marker))
        .unwrap_or_else(|e| panic!("{e}{}", t.all_logs()));
    assert!(
        answer.contains("hello from back/api:") && answer.contains(&format!("from {client}")),
        "the app answers and sees the caller's address: {answer}"
    );
    let (bytes, summary) = cap.finish();
    assert!(!summary.is_empty(), "pod traffic crossed the fabric");
    assert!(
        summary.lines().all(|l| l.contains(".15008")),
        "only HBONE between the nodes:\n{summary}"
    );
    assert!(!contains(&bytes, marker));
    t.eventually("the caller's identity in the destination's log", || {
        logged_from(
            &t.log("ztunnel-2"),
            &client,
            "src.identity=\"spiffe://cluster.local/ns/front/sa/web\"",
        )
    });

    // Outside the mesh, the node's NAT takes the IPv6 VIP to the pod.
    let legacy = t.lab.state.pods["outside/legacy"].ip.clone();
    let plain = t
        .curl("outside/legacy", &url(&vip, "from-outside"))
        .unwrap_or_else(|e| panic!("outside the mesh: {e}{}", t.all_logs()));
    assert!(plain.contains(&format!("from {legacy}")), "{plain}");

    // L4 DENY by principal: the attacker, in before, is refused and the refusal logged.
    t.eventually("the attacker's pod in the mesh", || {
        t.curl("front/attacker", &url(&vip, "")).is_ok()
    });
    t.apply(DENY_ATTACKER);
    t.eventually("the DENY by identity logged", || {
        t.curl("front/attacker", &url(&vip, "")).is_err()
            && logged_from(
                &t.log("ztunnel-2"),
                &attacker,
                "explicitly denied by: back/no-attacker",
            )
    });
    assert!(
        t.curl("front/client", &url(&vip, "")).is_ok(),
        "web is still allowed"
    );

    // DNS capture is on by default: a query to any IPv6 resolver address is answered by
    // the node's ztunnel with the Service's AAAA record.
    t.eventually("AAAA for the Service from the DNS proxy", || {
        let out = t
            .in_pod("front/client")
            .args([
                "dig",
                "+time=2",
                "+tries=1",
                "+short",
                "@fd00:10:244:1::1",
                "AAAA",
                "api.back.svc.cluster.local",
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim() == vip
    });

    // A waypoint (an IPv6-only pod too) takes the Service's traffic: the request is
    // answered through it, and it logs the caller's IPv6 address.
    t.apply(&join(&[WAYPOINT_GATEWAY, BACK_USES_WAYPOINT]));
    t.eventually("the request through the waypoint", || {
        t.curl("front/client", &url(&vip, "via-waypoint"))
            .is_ok_and(|a| a.contains("hello from back/api:"))
            && logged_from(&t.log("pod:back/waypoint"), &client, " path=/via-waypoint ")
    });

    // The kubelet probes the waypoint's readiness on its (IPv6-only) pod address. A
    // request has just been served through the waypoint, so it holds a certificate and
    // the first probe must say so: readiness asks the certificate manager the connections
    // use (it once waited for a background fetch, and a probe here saw 503).
    let waypoint = t.lab.state.pods["back/waypoint"].clone();
    let answer = std::process::Command::new("ip")
        .args(["netns", "exec", &t.lab.node_ns(waypoint.node)])
        .args(["curl", "-s", "--max-time", "5", "-w", " %{http_code}"])
        .arg(url(&waypoint.ip, "healthz/ready").replace("]/", "]:15021/"))
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    assert!(answer.ends_with(" 200"), "readiness over IPv6: {answer:?}");
}
