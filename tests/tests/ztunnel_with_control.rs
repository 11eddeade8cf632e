//! ztunnel configured by a real mesh-control over delta xDS, with certificates from its
//! CA (node-authorized), on two simulated nodes in network namespaces.

use mesh_e2e::cluster::*;
use mesh_e2e::net::ns_run;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

fn manifests(extra: &str) -> String {
    mesh_e2e::node::two_pod_manifests(extra)
}

#[test]
fn xds_configured_mesh_keeps_working_when_the_control_plane_dies() {
    let mut c = Cluster::new(Control::Plane(manifests("")));
    let _server = echo_server(&c.pod_b, "0.0.0.0:8080", "server-b");
    // Pod IP and Service VIP both work (the VIP is load-balanced by ztunnel).
    wait_until("first mTLS connection", || {
        talk(&c.pod_a, &format!("{POD_B}:8080"), "x").is_ok()
    });
    let via_vip = talk(&c.pod_a, "10.96.0.20:80", "vip").unwrap();
    assert!(
        via_vip.starts_with(&format!("server-b peer={POD_A}")),
        "{via_vip}"
    );
    wait_until("the client identity in ztunnel 2's access log", || {
        c.ztunnel_log(1)
            .contains("src.identity=\"spiffe://cluster.local/ns/front/sa/web\"")
    });
    wait_until("the service in ztunnel 1's access log", || {
        c.ztunnel_log(0)
            .contains("dst.service=\"api.back.svc.cluster.local\"")
    });

    // Istio's build and xDS metrics: the build, and the messages received by type.
    let metrics = |c: &Cluster| {
        ns_run(
            &c.node1.name,
            &["curl", "-sf", "http://127.0.0.1:15020/metrics"],
        )
    };
    let m = metrics(&c);
    assert!(
        m.contains(&format!(
            "istio_build{{component=\"ztunnel\",tag=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        )),
        "{m}"
    );
    for url in [
        "type.googleapis.com/istio.workload.Address",
        "type.googleapis.com/istio.security.Authorization",
    ] {
        assert!(
            m.contains(&format!("istio_xds_message_total{{url=\"{url}\"}} ")),
            "{url}: {m}"
        );
    }
    assert!(
        !m.contains("istio_xds_connection_terminations_total{"),
        "{m}"
    );
    // /config_dump in the shape `istioctl ztunnel-config` reads.
    let dump: serde_json::Value = serde_json::from_str(&ns_run(
        &c.node1.name,
        &["curl", "-sf", "http://127.0.0.1:15000/config_dump"],
    ))
    .unwrap();
    let web = dump["workloads"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["workloadIps"] == serde_json::json!([POD_A]))
        .unwrap_or_else(|| panic!("no workload with workloadIps [{POD_A}]: {dump}"));
    assert_eq!(
        (&web["serviceAccount"], &web["protocol"]),
        (&serde_json::json!("web"), &serde_json::json!("HBONE"))
    );
    let cert = &dump["certificates"][0];
    assert_eq!(cert["identity"], "spiffe://cluster.local/ns/front/sa/web");
    assert_eq!(cert["state"], "Available");
    for key in ["pem", "serialNumber", "validFrom", "expirationTime"] {
        assert!(cert["certChain"][0][key].is_string(), "{key}: {cert}");
        assert!(cert["rootCerts"][0][key].is_string(), "{key}: {cert}");
    }
    assert_eq!(dump["workloadState"]["uid-a"]["info"]["name"], "client");

    // An open connection, then the control plane goes away.
    let to: SocketAddr = format!("{POD_B}:8080").parse().unwrap();
    let mut open = c
        .pod_a
        .handle()
        .run(|| TcpStream::connect_timeout(&to, Duration::from_secs(5)))
        .unwrap()
        .unwrap();
    open.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 256];
    assert!(open.read(&mut buf).unwrap() > 0);
    c.control.as_mut().unwrap().kill();
    // ztunnel's own record that it lost the control plane, before either check.
    c.wait_log(0, "keeping the last known configuration");
    open.write_all(b"still-here").unwrap();
    let n = open.read(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"still-here", "existing connection survives");
    let again = talk(&c.pod_a, &format!("{POD_B}:8080"), "new").unwrap();
    assert!(
        again.ends_with("new"),
        "new connections work on last-known config"
    );
    assert!(
        c.ztunnel_log(0)
            .contains("keeping the last known configuration")
    );
    // The stream broke under the control plane's death (as when it restarts), and
    // reconnecting finds nobody: each counted with Istio's reason.
    wait_until("the broken stream counted as Reconnect", || {
        metrics(&c).contains("istio_xds_connection_terminations_total{reason=\"Reconnect\"} 1")
    });
    wait_until("a refused reconnection counted", || {
        metrics(&c).contains("istio_xds_connection_terminations_total{reason=\"ConnectionError\"} ")
    });
}

#[test]
fn policy_from_the_control_plane_is_enforced_and_explained() {
    let deny = r#"
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-front, namespace: back}
spec:
  action: DENY
  rules: [{from: [{source: {namespaces: [front]}}], to: [{operation: {ports: ["8081"]}}]}]
"#;
    let c = Cluster::new(Control::Plane(manifests(deny)));
    let _open = echo_server(&c.pod_b, "0.0.0.0:8080", "open");
    let _closed = echo_server(&c.pod_b, "0.0.0.0:8081", "closed");
    wait_until("mesh ready", || {
        talk(&c.pod_a, &format!("{POD_B}:8080"), "x").is_ok()
    });
    assert!(talk(&c.pod_a, &format!("{POD_B}:8081"), "x").is_err());
    wait_until("denial logged", || {
        c.ztunnel_log(1)
            .contains("explicitly denied by: back/no-front")
    });
    // meshctl explains it, from the control plane's view.
    let meshctl = mesh_e2e::binary("meshctl");
    let out = ns_run(
        &c.node1.name,
        &[
            meshctl.to_str().unwrap(),
            "authz",
            "check",
            "--from",
            "spiffe://cluster.local/ns/front/sa/web",
            "--to",
            "back/server",
            "--port",
            "8081",
        ],
    );
    assert!(out.starts_with("DENY by back/no-front"), "{out}");
    let status = ns_run(&c.node1.name, &[meshctl.to_str().unwrap(), "status"]);
    assert!(
        status.contains("node/node-1") && status.contains("node/node-2"),
        "{status}"
    );
    assert!(
        status.contains("back/server") && status.contains("on node-2"),
        "{status}"
    );
}
