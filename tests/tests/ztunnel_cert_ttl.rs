//! ztunnel with `--cert-ttl 40s` against the real mesh-control CA, which back-dates every
//! certificate by a minute: renewal is planned from when the certificate arrived, so each
//! identity is requested once and then not again for a quarter-minute or more (it used to
//! be requested tens of thousands of times a minute). Needs root (CI runs as root).

use mesh_e2e::cluster::*;
use std::time::Duration;

const WEB: &str = "spiffe://cluster.local/ns/front/sa/web";
const API: &str = "spiffe://cluster.local/ns/back/sa/api";

/// Requests for `id` the CA answered so far (from its log).
fn issued(c: &Cluster, id: &str) -> usize {
    let log = c.control.as_ref().unwrap().output();
    log.lines()
        .filter(|l| l.contains("certificate issued") && l.contains(&format!("identity={id}")))
        .count()
}

#[test]
fn a_40s_certificate_is_not_requested_in_a_loop() {
    let c = Cluster::with_ztunnel_args(
        Control::Plane(mesh_e2e::node::two_pod_manifests("")),
        &["--cert-ttl", "40s"],
    );
    c.wait_log(0, &format!("certificate issued identity={WEB}"));
    c.wait_log(1, &format!("certificate issued identity={API}"));
    let _server = echo_server(&c.pod_b, "0.0.0.0:8080", "server-b");
    wait_until("a connection over mTLS", || {
        talk(&c.pod_a, &format!("{POD_B}:8080"), "x").is_ok()
    });
    let (web, api) = (issued(&c, WEB), issued(&c, API));
    assert!(web >= 1 && api >= 1);
    std::thread::sleep(Duration::from_secs(3));
    // The next request of each is at least 16 s (40 % of 40 s) after the last answer.
    assert_eq!(
        (issued(&c, WEB), issued(&c, API)),
        (web, api),
        "certificates requested again within seconds of the last"
    );
    assert!(web <= 3 && api <= 3, "{web} and {api} requests at start-up");
}
