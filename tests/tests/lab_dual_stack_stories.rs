//! The core stories on both families of one dual-stack lab: a dual-stack Service gets an
//! IPv4 and an IPv6 VIP from the lab (as the API server allocates them), and the same
//! checks run against each: mTLS across nodes with the caller's identity and address at
//! the destination, the VIP reached from outside the mesh (the node's NAT), L4
//! authorization by identity and by IP block seen from an attacker's side, and a
//! waypoint's HTTPRoute.

use mesh_e2e::cluster::{capture_in, contains};
use mesh_e2e::manifests::{
    BACK_AMBIENT, BACK_USES_WAYPOINT, FRONT_AMBIENT, FRONT_CLIENT, WAYPOINT_GATEWAY, join,
};
use mesh_e2e::testlab::{TestLab, logged_from, url, url_host as host};

/// One address family's view of the lab.
struct Family {
    name: &'static str,
    vip: String,
    client: String,
    attacker: String,
    /// tcpdump filter for pod traffic of this family on the fabric.
    pods: &'static str,
}

const APPS: &str = r#"apiVersion: v1
kind: Pod
metadata: {name: api, namespace: back, labels: {app: api, version: v1}}
spec:
  nodeName: node-2
  serviceAccountName: api
  containers: [{name: api, ports: [{name: http, containerPort: 8080}, {name: tcp-echo, containerPort: 9000}]}]
---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: back}
spec:
  selector: {app: api}
  ipFamilyPolicy: PreferDualStack
  ports: [{name: http, port: 80, targetPort: http}, {name: tcp-legacy, port: 9000, targetPort: 9000}]
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

fn policy(name: &str, action: &str, rules: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: back}}\nspec:\n  selector: {{matchLabels: {{app: api}}}}\n  action: {action}\n  rules: {rules}\n"
    )
}

#[test]
fn the_core_stories_hold_on_the_ipv4_and_the_ipv6_vip_alike() {
    let mut t = TestLab::up_family("v6st", 2, &["curl", "tcpdump"], true);
    t.apply(&join(&[FRONT_AMBIENT, BACK_AMBIENT, APPS, FRONT_CLIENT]));

    // The lab allocated both VIPs, IPv4 first (the primary family).
    let svc: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(t.lab.dir.join("manifests/service-back-api.yaml")).unwrap(),
    )
    .unwrap();
    let vips: Vec<String> = svc["spec"]["clusterIPs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert_eq!(vips.len(), 2, "{svc}");
    assert!(vips[0].starts_with("10.96.0.") && vips[1].starts_with("fd00:96::"));
    let pod = |key: &str| t.lab.state.pods[key].clone();
    let (client, attacker, legacy) = (
        pod("front/client"),
        pod("front/attacker"),
        pod("outside/legacy"),
    );
    let families = [
        Family {
            name: "IPv4",
            vip: vips[0].clone(),
            client: client.ip.clone(),
            attacker: attacker.ip.clone(),
            pods: "tcp and net 10.244.0.0/16",
        },
        Family {
            name: "IPv6",
            vip: vips[1].clone(),
            client: client.ip6.clone().unwrap(),
            attacker: attacker.ip6.clone().unwrap(),
            pods: "ip6 and tcp and net fd00:10:244::/48",
        },
    ];
    let legacy_ips = [legacy.ip.clone(), legacy.ip6.clone().unwrap()];

    // mTLS across nodes through the VIP: only HBONE on the fabric, the app sees the
    // caller's address of that family, the destination's ztunnel its identity.
    for (f, legacy_ip) in families.iter().zip(&legacy_ips) {
        t.eventually(&format!("the {} VIP through the mesh", f.name), || {
            t.curl("front/client", &url(&f.vip, "")).is_ok()
        });
        let marker = format!("story-{}-1", f.name);
        let cap = capture_in(&t.lab.fabric_ns(), "br0", &t.lab.dir, f.name, f.pods);
        let answer = t
            .curl("front/client", &url(&f.vip, &marker))
            .unwrap_or_else(|e| panic!("{}: {e}{}", f.name, t.all_logs()));
        assert!(
            answer.contains("hello from back/api:")
                && answer.contains(&format!("from {}", f.client)),
            "{}: the app answers and sees the caller's address: {answer}",
            f.name
        );
        let echo_marker = format!("story-{}-echo", f.name);
        let echoed = t
            .tcp(
                "front/client",
                &format!("{}:9000", host(&f.vip)),
                &echo_marker,
            )
            .unwrap_or_else(|e| panic!("{}: {e}{}", f.name, t.all_logs()));
        assert_eq!(echoed, echo_marker);
        let (bytes, summary) = cap.finish();
        assert!(
            !summary.is_empty(),
            "{}: pod traffic crossed the fabric",
            f.name
        );
        assert!(
            summary.lines().all(|l| l.contains(".15008")),
            "{}: only HBONE between the nodes:\n{summary}",
            f.name
        );
        assert!(!contains(&bytes, &marker) && !contains(&bytes, &echo_marker));
        t.eventually(
            &format!("{}: the caller's identity in the destination's log", f.name),
            || {
                logged_from(
                    &t.log("ztunnel-2"),
                    &f.client,
                    "src.identity=\"spiffe://cluster.local/ns/front/sa/web\"",
                )
            },
        );
        // Before any policy, the attacker gets in too: the baseline the policies narrow.
        t.eventually(
            &format!("{}: the attacker's pod in the mesh", f.name),
            || t.curl("front/attacker", &url(&f.vip, "")).is_ok(),
        );
        // Outside the mesh, the node's NAT takes the VIP of either family to the pod.
        let plain = t
            .curl("outside/legacy", &url(&f.vip, "from-outside"))
            .unwrap_or_else(|e| panic!("{}: outside the mesh: {e}{}", f.name, t.all_logs()));
        assert!(
            plain.contains(&format!("from {legacy_ip}")),
            "{}: {plain}",
            f.name
        );
    }

    // ALLOW by identity: the right one gets in over both families, the attacker over
    // neither, and the destination's ztunnel says why.
    t.apply(&policy(
        "only-web",
        "ALLOW",
        r#"[{from: [{source: {principals: ["cluster.local/ns/front/sa/web"]}}]}]"#,
    ));
    t.eventually("the ALLOW policy", || {
        t.curl("front/attacker", &url(&families[0].vip, ""))
            .is_err()
    });
    for f in &families {
        assert!(
            t.curl("front/client", &url(&f.vip, "")).is_ok(),
            "{}: web is allowed",
            f.name
        );
        assert!(
            t.curl("front/attacker", &url(&f.vip, "")).is_err(),
            "{}: attacker refused",
            f.name
        );
        t.eventually(&format!("{}: the ALLOW miss logged", f.name), || {
            logged_from(
                &t.log("ztunnel-2"),
                &f.attacker,
                "allow policies exist, but none allowed (checked back/only-web",
            )
        });
    }

    // DENY by identity: the attacker is let in by the ALLOW now (by namespace), refused by
    // the DENY over both families.
    t.apply(&policy(
        "only-web",
        "ALLOW",
        r#"[{from: [{source: {namespaces: ["front"]}}]}]"#,
    ));
    t.apply(&policy(
        "no-attacker",
        "DENY",
        r#"[{from: [{source: {principals: ["cluster.local/ns/front/sa/attacker"]}}]}]"#,
    ));
    for f in &families {
        t.eventually(&format!("{}: the DENY by identity logged", f.name), || {
            t.curl("front/attacker", &url(&f.vip, "")).is_err()
                && logged_from(
                    &t.log("ztunnel-2"),
                    &f.attacker,
                    "explicitly denied by: back/no-attacker",
                )
        });
        assert!(
            t.curl("front/client", &url(&f.vip, "")).is_ok(),
            "{}: web is allowed",
            f.name
        );
    }

    // ipBlocks: a block of one family matches sources of that family only. Each in turn,
    // the client denied by its own address of one family still gets in over the other.
    for (i, f) in families.iter().enumerate() {
        let other = &families[1 - i];
        let prefix = if f.name == "IPv4" { 32 } else { 128 };
        t.apply(&policy(
            "no-client-ip",
            "DENY",
            &format!(
                r#"[{{from: [{{source: {{ipBlocks: ["{}/{prefix}"]}}}}]}}]"#,
                f.client
            ),
        ));
        t.eventually(&format!("{}: the DENY by ipBlocks", f.name), || {
            t.curl("front/client", &url(&f.vip, "")).is_err()
                && logged_from(
                    &t.log("ztunnel-2"),
                    &f.client,
                    "explicitly denied by: back/no-client-ip",
                )
        });
        assert!(
            t.curl("front/client", &url(&other.vip, "")).is_ok(),
            "an {} block does not match the {} source",
            f.name,
            other.name
        );
    }
    t.apply(&policy(
        "no-client-ip",
        "DENY",
        r#"[{from: [{source: {ipBlocks: ["192.0.2.0/24"]}}]}]"#,
    ));
    t.apply(&policy("only-web", "ALLOW", "[{}]"));

    // A waypoint's HTTPRoute, on both VIPs: /v2 to api-v2, the rest to api (v1).
    t.apply(&join(&[
        r#"apiVersion: v1
kind: Pod
metadata: {name: api-v2, namespace: back, labels: {app: api, version: v2}}
spec:
  nodeName: node-2
  serviceAccountName: api
  containers: [{name: api, ports: [{name: http, containerPort: 8080}]}]
---
apiVersion: v1
kind: Service
metadata: {name: api-v1, namespace: back}
spec: {selector: {app: api, version: v1}, ports: [{name: http, port: 80, targetPort: http}]}
---
apiVersion: v1
kind: Service
metadata: {name: api-v2, namespace: back}
spec: {selector: {app: api, version: v2}, ports: [{name: http, port: 80, targetPort: http}]}
"#,
        WAYPOINT_GATEWAY,
        BACK_USES_WAYPOINT,
        r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: api-split, namespace: back}
spec:
  parentRefs: [{group: "", kind: Service, name: api, port: 80}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /v2}}]
    backendRefs: [{name: api-v2, port: 80}]
  - backendRefs: [{name: api-v1, port: 80}]
"#,
    ]));
    // The Service `api` selects both pods: only the waypoint's route makes every /v2
    // request land on api-v2 and every other on api (through api-v1), each logged by the
    // waypoint.
    for f in &families {
        let routed = |path: &str, pod: &str, backend: &str| {
            let answer = t
                .curl("front/client", &url(&f.vip, path))
                .unwrap_or_default();
            answer.contains(&format!("hello from back/{pod}:"))
                && logged_path(&t.log("pod:back/waypoint"), &f.client, path, backend)
        };
        t.eventually(&format!("{}: the waypoint's route", f.name), || {
            routed(&format!("v2/{}-0", f.name), "api-v2", "api-v2")
        });
        for i in 1..=5 {
            assert!(
                routed(&format!("v2/{}-{i}", f.name), "api-v2", "api-v2"),
                "{}: /v2 to api-v2",
                f.name
            );
            assert!(
                routed(&format!("{}-{i}", f.name), "api", "api-v1"),
                "{}: the rest to api",
                f.name
            );
        }
    }

    // remoteIpBlocks at the waypoint (L7): a block of one family refuses the client's
    // requests from its address of that family (403, named in the waypoint's log), not
    // those of the other: the waypoint sees the caller's address of the family dialled.
    for (i, f) in families.iter().enumerate() {
        let other = &families[1 - i];
        let prefix = if f.name == "IPv4" { 32 } else { 128 };
        t.apply(&format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: no-client-remote, namespace: back}}\nspec:\n  targetRefs: [{{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}}]\n  action: DENY\n  rules: [{{from: [{{source: {{remoteIpBlocks: [\"{}/{prefix}\"]}}}}]}}]\n",
            f.client
        ));
        t.eventually(
            &format!("{}: the waypoint's DENY by remoteIpBlocks", f.name),
            || t.status("front/client", &url(&f.vip, "x")) == "403",
        );
        assert_eq!(
            t.status("front/client", &url(&other.vip, "x")),
            "200",
            "an {} block at the waypoint does not match the {} source",
            f.name,
            other.name
        );
    }
    t.wait_log("pod:back/waypoint", "policy=back/no-client-remote");
}

/// Whether the waypoint logged a request from `client` (its address as the family it
/// has, never IPv4-mapped) for `/path` sent to `backend`'s port 80.
fn logged_path(log: &str, client: &str, path: &str, backend: &str) -> bool {
    let (p, b) = (
        format!(" path=/{path} "),
        format!(" backend=back/{backend}:80"),
    );
    logged_from(log, client, &p) && log.lines().any(|l| l.contains(&p) && l.contains(&b))
}
