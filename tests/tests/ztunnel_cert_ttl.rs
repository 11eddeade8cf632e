//! ztunnel with `--cert-ttl 40s` against the real mesh-control CA, which back-dates every
//! certificate by a minute: renewal is planned from when the certificate arrived, so each
//! identity is requested once and then not again for a quarter-minute or more (it used to
//! be requested tens of thousands of times a minute). Needs root (CI runs as root).

use mesh_e2e::cluster::*;
use mesh_e2e::net::ns_run;
use std::time::Duration;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

const WEB: &str = "spiffe://cluster.local/ns/front/sa/web";
const API: &str = "spiffe://cluster.local/ns/back/sa/api";

/// Requests for `id` the CA answered so far (from its log).
fn issued(c: &Cluster, id: &str) -> usize {
    let log = c.control.as_ref().unwrap().output();
    log.lines()
        .filter(|l| l.contains("certificate issued") && l.contains(&format!("identity={id}")))
        .count()
}

/// ztunnel's own plan for `id`, from its `/config_dump` in namespace `ns`: (when it
/// will request the certificate again, when the certificate it holds expires).
fn plan(ns: &str, id: &str) -> Option<(OffsetDateTime, OffsetDateTime)> {
    let dump: serde_json::Value = serde_json::from_str(&ns_run(
        ns,
        &["curl", "-sf", "http://127.0.0.1:15000/config_dump"],
    ))
    .ok()?;
    let cert = dump["certificates"]
        .as_array()?
        .iter()
        .find(|c| c["identity"] == id)?;
    let at = |v: &serde_json::Value| OffsetDateTime::parse(v.as_str()?, &Rfc3339).ok();
    Some((
        at(&cert["refreshAt"])?,
        at(&cert["certChain"][0]["expirationTime"])?,
    ))
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
    assert!(web <= 3 && api <= 3, "{web} and {api} requests at start-up");
    // Each ztunnel's own plan: the next request at least 16 s (40 % of the 40 s the
    // certificate had when it arrived) after its arrival, i.e. no earlier than 24 s
    // before it expires (a second's slack for the certificate's whole-second times).
    let mut plans = Vec::new();
    for (ns, id) in [(&c.node1.name, WEB), (&c.node2.name, API)] {
        let mut got = None;
        wait_until(&format!("{id}'s renewal plan in /config_dump"), || {
            got = plan(ns, id);
            got.is_some()
        });
        let (refresh_at, expires) = got.unwrap();
        assert!(
            refresh_at >= expires - Duration::from_secs(25),
            "{id}: renewal planned at {refresh_at}, less than 16 s into a certificate \
             expiring at {expires}"
        );
        plans.push(refresh_at);
    }
    // And the CA's own count agrees: no request until shortly before the first plan.
    let first = plans.into_iter().min().unwrap() - Duration::from_secs(2);
    let wait = first - OffsetDateTime::now_utc();
    if wait.is_positive() {
        std::thread::sleep(wait.unsigned_abs());
    }
    assert_eq!(
        (issued(&c, WEB), issued(&c, API)),
        (web, api),
        "certificates requested again before ztunnel's own plan"
    );
}
