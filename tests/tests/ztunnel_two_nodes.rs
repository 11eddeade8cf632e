//! ztunnel on two simulated nodes, one pod each, redirect rules in the pods' namespaces:
//! real kernel redirection, real TLS between the nodes. Needs root (CI runs as root).

use mesh_e2e::cluster::*;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

#[test]
fn pod_to_pod_over_hbone_shows_only_tls_on_the_wire() {
    let c = Cluster::new(Control::Local(base_config("  []", "")));
    // Certificates are fetched when the pods arrive, before any traffic.
    c.wait_log(
        0,
        "certificate issued identity=spiffe://cluster.local/ns/front/sa/web",
    );
    c.wait_log(
        1,
        "certificate issued identity=spiffe://cluster.local/ns/back/sa/api",
    );
    let _server = echo_server(&c.pod_b, "0.0.0.0:8080", "server-b");
    let cap = capture(&c.node1, &c.link, &c.dir);
    let marker = "SECRET-PAYLOAD-7f3a";
    let answer = talk(&c.pod_a, &format!("{POD_B}:8080"), marker).expect("pod a reaches pod b");
    // The app sees the real client IP, and gets the bytes.
    assert!(
        answer.starts_with(&format!("server-b peer={POD_A}\n")),
        "{answer}"
    );
    assert!(answer.ends_with(marker), "{answer}");
    let (pcap, summary) = cap.finish();
    assert!(
        !contains(&pcap, marker),
        "plaintext payload crossed the node link:\n{summary}"
    );
    let lines: Vec<&str> = summary.lines().collect();
    assert!(!lines.is_empty(), "nothing captured");
    for l in &lines {
        assert!(l.contains(".15008"), "non-HBONE packet between nodes: {l}");
    }
    // Both ends logged the mTLS identities.
    c.wait_log(1, "src.identity=\"spiffe://cluster.local/ns/front/sa/web\"");
    c.wait_log(0, "dst.identity=\"spiffe://cluster.local/ns/back/sa/api\"");
    // As Istio logs it, on both ends: `dst.addr` the HBONE address, `dst.hbone_addr` the
    // target inside the tunnel.
    let addrs = format!("dst.addr={POD_B}:15008 dst.hbone_addr={POD_B}:8080 ");
    c.wait_log(0, &addrs);
    c.wait_log(1, &addrs);
}

#[test]
fn non_mesh_destination_is_passed_through_in_plaintext() {
    let c = Cluster::new(Control::Local(base_config("  []", "")));
    // A legacy server on node 2 itself, outside any pod and not in the mesh.
    let _legacy = echo_server(&c.node2, "0.0.0.0:9000", "legacy");
    let cap = capture(&c.node1, &c.link, &c.dir);
    let marker = "PASSTHROUGH-PLAINTEXT-51";
    let answer = talk(&c.pod_a, &format!("{NODE2_FABRIC}:9000"), marker).unwrap();
    assert!(answer.starts_with("legacy"), "{answer}");
    let (pcap, summary) = cap.finish();
    assert!(
        contains(&pcap, marker),
        "passthrough should be plain TCP (positive control); captured {} bytes:\n{summary}",
        pcap.len()
    );
}

#[test]
fn l4_deny_is_refused_and_logged_with_the_policy_name() {
    let policy = r#"
  - name: deny-8081
    namespace: back
    action: DENY
    rules:
      - clauses:
          - matches:
              - destinationPorts: [8081]
"#;
    let c = Cluster::new(Control::Local(base_config(policy, "")));
    let _ok = echo_server(&c.pod_b, "0.0.0.0:8080", "open");
    let _denied = echo_server(&c.pod_b, "0.0.0.0:8081", "denied");
    assert!(
        talk(&c.pod_a, &format!("{POD_B}:8080"), "hi")
            .unwrap()
            .starts_with("open")
    );
    let err = talk(&c.pod_a, &format!("{POD_B}:8081"), "hi");
    assert!(err.is_err(), "port 8081 must be refused, got {err:?}");
    c.wait_log(
        1,
        "error=\"connection closed due to policy rejection: explicitly denied by: back/deny-8081\"",
    );
}

#[test]
fn strict_refuses_plaintext_but_not_mtls() {
    let strict = r#"
  - name: istio_converted_static_strict
    namespace: istio-system
    scope: WORKLOAD_SELECTOR
    action: DENY
    rules:
      - clauses:
          - matches:
              - notPrincipals: [{presence: {}}]
"#;
    let permissive = base_config("  []", "");
    let c = Cluster::new(Control::Local(permissive.clone()));
    let _server = echo_server(&c.pod_b, "0.0.0.0:8080", "server-b");
    // Plaintext from node 2 (not in the mesh) is captured to 15006 and accepted...
    let plain = talk(&c.node2, &format!("{POD_B}:8080"), "x").unwrap();
    assert!(plain.starts_with("server-b peer=10.201.2.1"), "{plain}");
    // ...until STRICT applies to the workload.
    let strict_from = c.ztunnel_log(1).len();
    c.set_config(&base_config(
        strict,
        "\"istio-system/istio_converted_static_strict\"",
    ));
    // Awaited, not slept on: plaintext is refused once the reload applies, and refused by
    // ztunnel-2 for STRICT, as its own record says. Every try is a new connection: one that
    // failed for another reason (a timeout on a slow machine, before the reload) ends
    // nothing.
    let refused_for_strict = || {
        c.ztunnel_log(1)
            .get(strict_from..)
            .unwrap_or_default()
            .lines()
            .any(|l| {
                l.contains("src.addr=10.201.2.1:")
                    && l.contains(
                        "explicitly denied by: istio-system/istio_converted_static_strict",
                    )
            })
    };
    wait_until("ztunnel-2 refusing plaintext for STRICT", || {
        talk(&c.node2, &format!("{POD_B}:8080"), "x").is_err() && refused_for_strict()
    });
    assert!(
        talk(&c.pod_a, &format!("{POD_B}:8080"), "x")
            .unwrap()
            .starts_with("server-b"),
        "mTLS still works"
    );
}

#[test]
fn policy_change_closes_open_connections() {
    let c = Cluster::new(Control::Local(base_config("  []", "")));
    let _server = echo_server(&c.pod_b, "0.0.0.0:8080", "server-b");
    let to: SocketAddr = format!("{POD_B}:8080").parse().unwrap();
    let mut s = c
        .pod_a
        .handle()
        .run(|| TcpStream::connect_timeout(&to, Duration::from_secs(5)))
        .unwrap()
        .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut line = [0u8; 64];
    let n = s.read(&mut line).unwrap();
    assert!(n > 0);
    // From here a read that times out means "still open", never "closed".
    s.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let deny = r#"
  - name: deny-front
    namespace: back
    action: DENY
    rules:
      - clauses:
          - matches:
              - namespaces: [{exact: front}]
"#;
    c.set_config(&base_config(deny, ""));
    // The open connection is closed by ztunnel once the new policy applies: an end of
    // stream or a reset, not a read that merely found nothing yet.
    let mut buf = [0u8; 64];
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let closed = loop {
        assert!(
            std::time::Instant::now() < deadline,
            "connection survived a policy that denies it:\n{}",
            c.ztunnel_log(1)
        );
        if let Err(e) = s.write_all(b"ping") {
            break e.to_string();
        }
        match s.read(&mut buf) {
            Ok(0) => break "end of stream".to_string(),
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe) => {
                break e.to_string();
            }
            Err(e) => panic!("reading the open connection: {e}"),
        }
    };
    // ztunnel-2's own record: it closed it for this policy.
    c.wait_log(1, "closing open connection no longer allowed by policy");
    assert!(
        c.ztunnel_log(1).lines().any(|l| l
            .contains("closing open connection no longer allowed by policy")
            && l.contains("policy=back/deny-front")),
        "closed ({closed}) by ztunnel-2 for back/deny-front:\n{}",
        c.ztunnel_log(1)
    );
}

#[test]
fn ztunnel_down_means_refused_never_plaintext() {
    let mut c = Cluster::new(Control::Local(base_config("  []", "")));
    let _server = echo_server(&c.pod_b, "0.0.0.0:8080", "server-b");
    assert!(talk(&c.pod_a, &format!("{POD_B}:8080"), "up").is_ok());
    let cap = capture(&c.node1, &c.link, &c.dir);
    c.ztunnels[0].as_mut().unwrap().kill();
    let marker = "MUST-NOT-LEAK-99";
    let r = talk(&c.pod_a, &format!("{POD_B}:8080"), marker);
    assert!(
        r.is_err(),
        "with ztunnel down the connection must be refused, got {r:?}"
    );
    let (pcap, summary) = cap.finish();
    assert!(
        !contains(&pcap, marker),
        "payload left the node in the clear:\n{summary}"
    );
    // Restarted: traffic recovers without touching the pods.
    c.start_ztunnel(0);
    let ok = (0..50).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        talk(&c.pod_a, &format!("{POD_B}:8080"), "back").is_ok()
    });
    assert!(ok, "traffic did not recover after ztunnel restarted");
}
