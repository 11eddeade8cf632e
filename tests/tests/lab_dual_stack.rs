//! A story over IPv6 on a dual-stack lab: an enrolled pod calls another pod's IPv6
//! address; the call crosses nodes as HBONE only (mTLS on 15008), the app sees the
//! caller's own IPv6 address (ztunnel's spoofed connection, its replies brought back by
//! the pod's IPv6 policy route), and the caller's identity is checked.

use mesh_e2e::cluster::{capture_in, contains, wait_until};
use mesh_e2e::manifests::{
    BACK_AMBIENT, BACK_API_POD_WITH_TCP_ECHO, FRONT_AMBIENT, FRONT_CLIENT, join,
};
use mesh_e2e::testlab::TestLab;

#[test]
fn enrolled_pods_talk_over_ipv6_through_hbone_with_the_callers_address() {
    let mut t = TestLab::up_family("v6", 2, &["curl", "tcpdump"], true);
    t.apply(&join(&[
        FRONT_AMBIENT,
        BACK_AMBIENT,
        BACK_API_POD_WITH_TCP_ECHO,
        FRONT_CLIENT,
    ]));
    let api6 = t.lab.state.pods["back/api"]
        .ip6
        .clone()
        .expect("api has IPv6");
    let client6 = t.lab.state.pods["front/client"]
        .ip6
        .clone()
        .expect("client has IPv6");
    let url = |path: &str| format!("http://[{api6}]:8080/{path}");
    wait_until("the IPv6 call through the mesh", || {
        t.curl("front/client", &url("")).is_ok()
            && t.log("ztunnel-2")
                .contains("src.identity=\"spiffe://cluster.local/ns/front/sa/web\"")
    });

    let cap = capture_in(
        &t.lab.fabric_ns(),
        "br0",
        &t.lab.dir,
        "v6",
        "ip6 and tcp and net fd00:10:244::/48",
    );
    let answer = t
        .curl("front/client", &url("v6-marker-1"))
        .unwrap_or_else(|e| panic!("{e}{}", t.all_logs()));
    assert!(
        answer.contains(&format!("from {client6}")),
        "the app sees the caller's IPv6 address: {answer}"
    );
    let echoed = t
        .tcp("front/client", &format!("[{api6}]:9000"), "v6-legacy-2")
        .unwrap_or_else(|e| panic!("{e}{}", t.all_logs()));
    assert_eq!(echoed, "v6-legacy-2");
    let (bytes, summary) = cap.finish();
    assert!(!summary.is_empty(), "IPv6 pod traffic crossed the fabric");
    assert!(
        summary.lines().all(|l| l.contains(".15008")),
        "only HBONE between the nodes:\n{summary}"
    );
    assert!(!contains(&bytes, "v6-marker-1") && !contains(&bytes, "v6-legacy-2"));
}

/// `dig +short` from inside `pod`, one try.
fn dig_short(t: &TestLab, pod: &str, args: &[&str]) -> Vec<String> {
    let out = t
        .in_pod(pod)
        .args(["dig", "+short", "+time=2", "+tries=1"])
        .args(args)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

/// DNS capture over IPv6: a dual-stack pod asking an IPv6 server is answered by its
/// ztunnel (on [::1]:15053) with the Service's IPv6 VIP, and names outside the mesh are
/// forwarded to an IPv6 upstream (dnsmasq in a lab pod).
#[test]
fn dual_stack_pod_resolves_over_ipv6_through_the_dns_proxy() {
    mesh_e2e::require_tool("dnsmasq");
    let mut t = TestLab::up_family("v6dns", 1, &["dig"], true);
    let dnsmasq = String::from_utf8(
        std::process::Command::new("sh")
            .args(["-c", "command -v dnsmasq"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap()
    .trim()
    .to_string();
    let pid_file = t.lab.dir.join("dnsmasq.pid");
    t.apply(&format!(
        r#"apiVersion: v1
kind: Namespace
metadata: {{name: upstream}}
---
apiVersion: v1
kind: Pod
metadata: {{name: dns, namespace: upstream}}
spec: {{nodeName: node-1, containers: [{{name: dns, command: ["{dnsmasq}", "--keep-in-foreground", "--log-facility=-", "--no-resolv", "--no-hosts", "--user=root", "--pid-file={}", "--local=/outside.example/", "--address=/www.outside.example/203.0.113.7"]}}]}}
"#,
        pid_file.display()
    ));
    t.apply(
        r#"apiVersion: v1
kind: Namespace
metadata: {name: front, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: back, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: front, annotations: {ambient.istio.io/dns-capture: "true"}}
spec: {nodeName: node-1, serviceAccountName: web, containers: [{name: client}]}
---
apiVersion: v1
kind: Pod
metadata: {name: plain, namespace: front, annotations: {ambient.istio.io/dns-capture: "false"}}
spec: {nodeName: node-1, serviceAccountName: web, containers: [{name: plain}]}
---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: back}
spec:
  selector: {app: api}
  clusterIP: 10.96.0.20
  clusterIPs: [10.96.0.20, "fd00:96::20"]
  ipFamilies: [IPv4, IPv6]
  ports: [{name: http, port: 80}]
"#,
    );
    let up6 = t.lab.state.pods["upstream/dns"].ip6.clone().unwrap();
    std::fs::write(t.lab.node_resolv_conf(1), format!("nameserver {up6}\n")).unwrap();
    t.lab.stop("ztunnel-1", true).unwrap();
    t.lab.start_ztunnel(1).unwrap();
    let at = format!("@{up6}");

    // Control: asked directly, the upstream knows nothing of the mesh.
    t.eventually("dnsmasq answering over IPv6", || {
        dig_short(&t, "front/plain", &[&at, "www.outside.example"]) == ["203.0.113.7"]
    });
    assert!(dig_short(&t, "front/plain", &[&at, "AAAA", "api.back"]).is_empty());

    t.eventually("the IPv6 VIP from the DNS proxy", || {
        dig_short(&t, "front/client", &[&at, "AAAA", "api.back"]) == ["fd00:96::20"]
    });
    assert_eq!(
        dig_short(
            &t,
            "front/client",
            &[&at, "A", "api.back.svc.cluster.local"]
        ),
        ["10.96.0.20"]
    );
    assert_eq!(
        dig_short(&t, "front/client", &[&at, "+tcp", "AAAA", "api.back.svc"]),
        ["fd00:96::20"],
        "TCP over IPv6 too"
    );
    // Forwarded from the pod to the IPv6 upstream.
    assert_eq!(
        dig_short(&t, "front/client", &[&at, "www.outside.example"]),
        ["203.0.113.7"]
    );
}
