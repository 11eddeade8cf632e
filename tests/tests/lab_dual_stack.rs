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
                .contains("src.identity=spiffe://cluster.local/ns/front/sa/web")
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
