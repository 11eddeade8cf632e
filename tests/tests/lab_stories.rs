//! The user stories on a real lab cluster (nodes and pods as network namespaces, the
//! reference CNI plugins, every mesh component running as a process).

use mesh_e2e::cluster::{Capture, contains, wait_until};
use mesh_e2e::manifests::{
    BACK_API_POD_WITH_TCP_ECHO, BACK_USES_WAYPOINT, FRONT_CLIENT, WAYPOINT_GATEWAY, join,
};
use mesh_e2e::net::unique;
use mesh_e2e::testlab::TestLab;
use mesh_e2e::{binary, require_tool};
use mesh_lab::lab::Lab;
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// (payload seen, every packet on 15008)
fn finish(cap: Capture, marker: &str) -> (bool, bool) {
    let (bytes, summary) = cap.finish();
    let all_hbone = !summary.is_empty() && summary.lines().all(|l| l.contains(".15008"));
    (contains(&bytes, marker), all_hbone)
}

/// Namespaces `front` and `back` (not in the mesh), back/api serving HTTP and TCP echo on
/// 10.96.0.20, front/client.
fn app() -> String {
    join(&[
        r#"apiVersion: v1
kind: Namespace
metadata: {name: front}
---
apiVersion: v1
kind: Namespace
metadata: {name: back}
"#,
        BACK_API_POD_WITH_TCP_ECHO,
        r#"apiVersion: v1
kind: Service
metadata: {name: api, namespace: back}
spec:
  selector: {app: api}
  clusterIP: 10.96.0.20
  ports: [{name: http, port: 80, targetPort: http}, {name: tcp-legacy, port: 9000, targetPort: 9000}]
"#,
        FRONT_CLIENT,
    ])
}

fn ambient(on: bool) -> String {
    let l = if on {
        "{istio.io/dataplane-mode: ambient}"
    } else {
        "{}"
    };
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: front, labels: {l}}}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: back, labels: {l}}}\n"
    )
}

#[test]
fn labelling_a_namespace_enrols_running_pods_and_unlabelling_reverts() {
    let mut t = TestLab::up(2);
    t.apply(&app());
    wait_until("the app", || {
        t.curl("front/client", "http://10.96.0.20/").is_ok()
    });

    // Before: plaintext on the fabric.
    let cap = t.capture("before");
    assert!(
        t.curl("front/client", "http://10.96.0.20/plain-marker-1")
            .unwrap()
            .contains("plain-marker-1")
    );
    let (seen, _) = finish(cap, "plain-marker-1");
    assert!(
        seen,
        "before the mesh the request is plaintext (positive control)"
    );

    // Label the namespaces: the same running pods are enrolled, no restart.
    let api_pid = t.lab.process("pod:back/api").unwrap().pid;
    t.apply(&ambient(true));
    t.wait_log("agent-1", "pod enrolled");
    t.wait_log("agent-2", "pod enrolled");
    wait_until("mTLS", || {
        t.curl("front/client", "http://10.96.0.20/").is_ok()
            && t.log("ztunnel-2")
                .contains("src.identity=\"spiffe://cluster.local/ns/front/sa/web\"")
    });
    let cap = t.capture("after");
    let answer = t
        .curl("front/client", "http://10.96.0.20/mesh-marker-2")
        .unwrap_or_else(|e| {
            panic!(
                "{e}\nztunnel-1:\n{}\nztunnel-2:\n{}",
                t.log("ztunnel-1"),
                t.log("ztunnel-2")
            )
        });
    assert!(
        answer.contains("from 10.244.1.2"),
        "the app still sees the client's IP: {answer}"
    );
    // Story (c): a legacy plain-TCP server, reached only over mTLS.
    let echoed = t
        .tcp("front/client", "10.96.0.20:9000", "legacy-marker-3")
        .unwrap_or_else(|e| panic!("{e}{}", t.all_logs()));
    assert_eq!(echoed, "legacy-marker-3");
    let (seen_http, all_hbone) = finish(cap, "mesh-marker-2");
    assert!(
        !seen_http && all_hbone,
        "only HBONE on the fabric after labelling"
    );
    let bytes = std::fs::read(t.lab.dir.join("after.pcap")).unwrap();
    assert!(
        !contains(&bytes, "legacy-marker-3"),
        "the legacy TCP payload never crosses in the clear"
    );
    assert_eq!(
        t.lab.process("pod:back/api").unwrap().pid,
        api_pid,
        "the pod was not restarted"
    );

    // Unlabel: back to plaintext.
    t.apply(&ambient(false));
    t.wait_log("agent-2", "pod removed from the mesh");
    t.wait_log("agent-1", "pod removed from the mesh");
    wait_until("plaintext again", || {
        let cap = t.capture("unlabelled");
        let ok = t
            .curl("front/client", "http://10.96.0.20/plain-again-4")
            .is_ok();
        let (seen, _) = finish(cap, "plain-again-4");
        ok && seen
    });
}

#[test]
fn policy_strict_and_component_failures() {
    let mut t = TestLab::up(2);
    t.apply(&app());
    t.apply(&ambient(true));
    // A pod outside the mesh, on node 2.
    t.apply("apiVersion: v1\nkind: Namespace\nmetadata: {name: outside}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: legacy-client, namespace: outside}\nspec: {nodeName: node-2, containers: [{name: c}]}\n");
    t.wait_log("agent-2", "pod enrolled");
    wait_until("mTLS", || {
        t.tcp("front/client", "10.96.0.20:9000", "x")
            .is_ok_and(|s| s == "x")
    });

    // L4 DENY from the control plane, logged with the policy's name.
    let deny_from = t.log_len("ztunnel-2");
    t.apply("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: no-echo, namespace: back}\nspec:\n  action: DENY\n  rules: [{to: [{operation: {ports: [\"9000\"]}}]}]\n");
    // Every try is a new connection, and only ztunnel-2's record of refusing one by this
    // policy ends the wait: a connection that failed for another reason (a timeout on a
    // slow machine, before the policy arrived) proves nothing.
    t.eventually("ztunnel-2 refusing port 9000 by back/no-echo", || {
        let refused = t
            .tcp("front/client", "10.96.0.20:9000", "x")
            .map_or(true, |s| s.is_empty());
        refused
            && t.log_since("ztunnel-2", deny_from)
                .contains("explicitly denied by: back/no-echo")
    });
    if let Err(e) = t.curl("front/client", "http://10.96.0.20/") {
        panic!(
            "other ports must be unaffected: {e}\nztunnel-1:\n{}\nztunnel-2:\n{}",
            t.log("ztunnel-1"),
            t.log("ztunnel-2")
        );
    }

    // STRICT: plaintext from outside the mesh is refused, mTLS still works.
    assert!(
        t.curl("outside/legacy-client", "http://10.96.0.20/")
            .is_ok(),
        "permissive by default"
    );
    let strict_from = t.log_len("ztunnel-2");
    t.apply("apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: back}\nspec: {mtls: {mode: STRICT}}\n");
    // Refused by ztunnel-2 for STRICT (its own record says so), after the connection was
    // set up (curl 52/56), not a connection nothing took (7) or a timeout (28). Every try
    // is a new request: one that failed for another reason (in flight when STRICT arrived,
    // or timed out on a slow machine) ends nothing.
    let mut exit = 0;
    t.eventually("ztunnel-2 refusing plaintext for STRICT", || {
        exit = t.curl_exit("outside/legacy-client", "http://10.96.0.20/");
        exit != 0
            && t.log_since("ztunnel-2", strict_from)
                .contains("explicitly denied by: istio-system/istio_converted_static_strict")
    });
    assert!(
        exit == 52 || exit == 56,
        "plaintext closed by ztunnel, not refused or timed out: curl exit {exit}"
    );
    assert!(t.curl("front/client", "http://10.96.0.20/").is_ok());

    // The node agent restarts: nothing breaks.
    t.lab.stop("agent-1", true).unwrap();
    assert!(t.curl("front/client", "http://10.96.0.20/").is_ok());
    t.lab.start_agent(1).unwrap();
    t.lab
        .wait_log("agent-1", "xDS connected", Duration::from_secs(10))
        .unwrap();
    // The new agent's own record: it confirmed the client's enrolment again.
    t.eventually("the new agent confirming front/client", || {
        t.confirmed(1, "front/client")
    });
    if let Err(e) = t.curl("front/client", "http://10.96.0.20/") {
        let ls = std::process::Command::new("sh")
            .args(["-c", "ls -i /var/run/netns"])
            .output()
            .unwrap();
        panic!(
            "after the agent restart: {e}\n{}{}",
            String::from_utf8_lossy(&ls.stdout),
            t.all_logs()
        );
    }

    // The control plane dies: traffic continues on last-known config.
    t.lab.stop("control", true).unwrap();
    t.lab
        .wait_log(
            "ztunnel-1",
            "keeping the last known configuration",
            Duration::from_secs(30),
        )
        .unwrap();
    assert!(
        t.curl("front/client", "http://10.96.0.20/after-control")
            .unwrap()
            .contains("after-control")
    );

    // ztunnel on node 1 dies: the client's traffic is refused, never sent in the clear.
    t.lab.stop("ztunnel-1", true).unwrap();
    let cap = t.capture("zt-down");
    assert!(
        t.curl("front/client", "http://10.96.0.20/must-not-leak-5")
            .is_err()
    );
    let (seen, _) = finish(cap, "must-not-leak-5");
    assert!(!seen, "nothing in the clear with ztunnel down");

    // ztunnel restarts (the control plane is still down: it waits for it, the pods keep
    // their rules and are not restarted) and traffic recovers once it is back.
    let client_pid = t.lab.process("pod:front/client").unwrap().pid;
    t.lab.start_ztunnel(1).unwrap();
    // The new ztunnel runs and holds off the node agent until it has a configuration.
    t.lab
        .wait_log(
            "ztunnel-1",
            "waiting for the configuration before connecting to the node agent",
            Duration::from_secs(30),
        )
        .unwrap_or_else(|e| panic!("{e}{}", t.all_logs()));
    let run = t.lab.process("ztunnel-1").unwrap().log_offset as usize;
    let cap = t.capture("zt-no-config");
    assert!(
        t.curl("front/client", "http://10.96.0.20/no-config-7")
            .is_err(),
        "no config yet: still refused"
    );
    let (seen, _) = finish(cap, "no-config-7");
    assert!(!seen, "nothing in the clear before the configuration");
    let started = |log: &str| {
        log.lines()
            .any(|l| l.contains("pod proxy started") && l.contains("front/client"))
    };
    assert!(
        !started(&t.log_since("ztunnel-1", run)),
        "no pod proxy before the configuration:\n{}",
        t.log_since("ztunnel-1", run)
    );
    t.lab.start_control().unwrap();
    wait_until("traffic to recover", || {
        t.curl("front/client", "http://10.96.0.20/recovered")
            .is_ok()
    });
    assert!(
        started(&t.log_since("ztunnel-1", run)),
        "the new ztunnel took the pod once configured:\n{}",
        t.log_since("ztunnel-1", run)
    );
    assert_eq!(t.lab.process("pod:front/client").unwrap().pid, client_pid);
}

/// back/api-v2 beside back/api (v1), a Service for each version, the waypoint for `back`,
/// an HTTPRoute (/v2 to v2, the rest split 90/10) and a DENY of /admin* at the waypoint.
fn waypoint() -> String {
    join(&[
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
  - backendRefs: [{name: api-v1, port: 80, weight: 90}, {name: api-v2, port: 80, weight: 10}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-admin, namespace: back}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  action: DENY
  rules: [{to: [{operation: {paths: ["/admin*"]}}]}]
"#,
    ])
}

#[test]
fn a_namespace_waypoint_routes_splits_denies_and_is_never_bypassed() {
    let mut t = TestLab::up(2);
    t.apply(&app().replace("labels: {app: api}}", "labels: {app: api, version: v1}}"));
    t.apply(&ambient(true));
    wait_until("mTLS", || {
        t.curl("front/client", "http://10.96.0.20/").is_ok()
    });
    t.apply(&waypoint());
    wait_until("the waypoint in the path", || {
        t.curl("front/client", "http://10.96.0.20/").is_ok()
            && t.log("pod:back/waypoint").contains("backend=back/api-")
    });
    // Path routing.
    for _ in 0..5 {
        let a = t.curl("front/client", "http://10.96.0.20/v2/x").unwrap();
        assert!(a.contains("back/api-v2"), "/v2 goes to api-v2: {a}");
    }
    // The 90/10 split over 1000 requests: expect 100 on v2; binomial sd ≈ 9.5, allow ±4 sd.
    let out = t
        .in_pod("front/client")
        .args([
            "bash",
            "-c",
            "for i in $(seq 1000); do curl -s --max-time 5 http://10.96.0.20/; done",
        ])
        .output()
        .unwrap();
    let body = String::from_utf8_lossy(&out.stdout);
    let v2 = body.matches("back/api-v2").count();
    let v1 = body.matches("hello from back/api:").count();
    assert_eq!(v1 + v2, 1000, "every request answered");
    assert!(
        (62..=138).contains(&v2),
        "split 90/10 expected, got {v1}/{v2}"
    );
    // L7 deny, named in the answer and the log.
    let denied = t
        .in_pod("front/client")
        .args([
            "curl",
            "-s",
            "-w",
            "%{http_code}",
            "http://10.96.0.20/admin/users",
        ])
        .output()
        .unwrap();
    let denied = String::from_utf8_lossy(&denied.stdout);
    assert!(
        denied.contains("RBAC: access denied by back/no-admin") && denied.ends_with("403"),
        "{denied}"
    );
    t.wait_log("pod:back/waypoint", "policy=back/no-admin");
    // Request metrics with reporter="waypoint".
    let metrics = t.waypoint_metrics("back/waypoint");
    assert!(
        metrics.contains("istio_requests_total{reporter=\"waypoint\",response_code=\"403\""),
        "{metrics}"
    );
    // The waypoint down: requests fail, they never go around it.
    let ip = |pod: &str| t.lab.state.pods[pod].ip.clone();
    let (w, api, api2) = (ip("back/waypoint"), ip("back/api"), ip("back/api-v2"));
    let web = "src.identity=\"spiffe://cluster.local/ns/front/sa/web\"";
    // Positive control: with the waypoint up, the client's ztunnel dials the waypoint.
    assert!(
        t.log("ztunnel-1")
            .contains(&format!("dst.addr={w}:15008 dst.hbone_addr=10.96.0.20:80")),
        "ztunnel-1 sent the client's requests to the waypoint:\n{}",
        t.log("ztunnel-1")
    );
    t.lab.stop("pod:back/waypoint", true).unwrap();
    let (from1, from2) = (t.log_len("ztunnel-1"), t.log_len("ztunnel-2"));
    let cap = t.capture("waypoint-down");
    assert!(
        t.curl("front/client", "http://10.96.0.20/bypass-marker-6")
            .is_err()
    );
    let (_, summary) = cap.finish();
    // The attempt went to the waypoint pod's HBONE address (`dst.addr`, as Istio logs it)
    // and failed there: ztunnel-1's own record of this request.
    let to_waypoint = format!("dst.addr={w}:15008 dst.hbone_addr=10.96.0.20:80");
    wait_until("ztunnel-1's record of the failed attempt", || {
        t.log_since("ztunnel-1", from1)
            .lines()
            .any(|l| l.contains(&to_waypoint) && l.contains("error="))
    });
    let zt1 = t.log_since("ztunnel-1", from1);
    for pod in [&api, &api2] {
        assert!(
            !zt1.contains(&format!("dst.addr={pod}:15008")),
            "ztunnel-1 dialled api pod {pod} around the waypoint:\n{zt1}"
        );
        assert!(
            !summary.contains(&format!("> {pod}.15008")),
            "a packet went to api pod {pod} around the waypoint:\n{summary}"
        );
    }
    // Positive control: the api pods' ztunnel records the waypoint as their caller (its
    // pooled connections are logged when they close, at the latest with the waypoint).
    wait_until("ztunnel-2's record of the waypoint's connections", || {
        t.log("ztunnel-2")
            .contains("src.identity=\"spiffe://cluster.local/ns/back/sa/waypoint\"")
    });
    // The server side's own record: no connection from the client reached the api pods.
    let zt2 = t.log_since("ztunnel-2", from2);
    assert!(
        !zt2.contains(web),
        "ztunnel-2 took a connection from the client itself:\n{zt2}"
    );
}

#[test]
fn down_cleans_up_after_a_crash_even_without_state() {
    let root = tempfile::tempdir().unwrap();
    let bins = binary("ztunnel").parent().unwrap().to_path_buf();
    let name = unique("k");
    {
        let mut lab = Lab::open_with_binaries(&name, root.path(), &bins).unwrap();
        lab.up(1).unwrap();
        lab.apply(
            "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: default}\nspec: {containers: [{name: c}]}\n",
            "crash.yaml",
        )
        .unwrap();
        // The CLI "crashes": nothing is torn down, and its state file is lost too.
        std::fs::remove_file(lab.dir.join("state.json")).unwrap();
    }
    let marker = format!("MESH_LAB_DIR={}", root.path().join(&name).display());
    let ours = || {
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter(|e| {
                std::fs::read(e.path().join("environ"))
                    .map(|env| env.split(|b| *b == 0).any(|kv| kv == marker.as_bytes()))
                    .unwrap_or(false)
            })
            .count()
    };
    let namespaces = || {
        mesh_e2e::net::run(&["ip", "netns", "list"])
            .lines()
            .filter(|l| l.starts_with(&format!("{name}-")))
            .count()
    };
    assert!(
        ours() >= 4 && namespaces() >= 3,
        "the crashed lab is still there"
    );
    let mut again = Lab::open_with_binaries(&name, root.path(), &bins).unwrap();
    again.down().unwrap();
    assert_eq!(ours(), 0, "every process of the lab is gone");
    assert_eq!(namespaces(), 0, "every namespace of the lab is gone");
    assert!(!root.path().join(&name).exists());
}

#[test]
fn real_clients_through_the_mesh_iperf3_and_h2load() {
    require_tool("iperf3");
    require_tool("h2load");
    let mut t = TestLab::up(2);
    t.apply(&app());
    t.apply(&ambient(true));
    wait_until("mTLS", || {
        t.curl("front/client", "http://10.96.0.20/").is_ok()
            && t.log("ztunnel-2")
                .contains("src.identity=\"spiffe://cluster.local/ns/front/sa/web\"")
    });
    // h2load: HTTP/2 (h2c) through two ztunnels.
    let out = t
        .in_pod("front/client")
        .args(["h2load", "-n", "200", "-c", "4", "http://10.96.0.20/"])
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(report.contains("200 succeeded"), "{report}");
    // iperf3: a server in the api pod, the client in the client pod, one second.
    t.apply("apiVersion: v1\nkind: Pod\nmetadata: {name: iperf, namespace: back, labels: {app: iperf}}\nspec:\n  nodeName: node-2\n  containers: [{name: iperf, command: [iperf3, -s, -p, \"5201\"]}]\n");
    let server_ip = t.lab.state.pods["back/iperf"].ip.clone();
    wait_until("iperf3 through the mesh", || {
        let out = t
            .in_pod("front/client")
            .args(["iperf3", "-c", &server_ip, "-t", "1", "-J"])
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        v["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .unwrap_or(0.0)
            > 1e6
    });
    t.wait_log("ztunnel-2", "dst.workload=\"iperf");
}

/// A tonic client whose connection is made from inside the pod's namespace (so the pod's
/// redirection applies, exactly as for the app itself).
async fn grpc_echo(
    netns: &str,
    to: SocketAddr,
    msg: &str,
) -> Result<mesh_proto::echo::EchoReply, String> {
    let ns = ztunnel::netns::Netns::open(netns).map_err(|e| e.to_string())?;
    // Bounded: a call that never answers is a failed attempt (the caller retries and
    // reports the last error), never a test that waits forever.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{to}"))
        .unwrap()
        .timeout(Duration::from_secs(10))
        .connect_with_connector(tower::service_fn(move |_| {
            let ns = ns.clone();
            async move {
                let s = ns.run(|| TcpStream::connect_timeout(&to, Duration::from_secs(5)))??;
                s.set_nonblocking(true)?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::TcpStream::from_std(s)?,
                ))
            }
        }))
        .await
        .map_err(|e| e.to_string())?;
    mesh_proto::echo::echo_client::EchoClient::new(channel)
        .echo(mesh_proto::echo::EchoRequest {
            message: msg.into(),
        })
        .await
        .map(|r| r.into_inner())
        .map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_through_the_mesh_and_through_a_waypoint() {
    let mut t = tokio::task::block_in_place(|| TestLab::up(2));
    let app = app()
        .replace("labels: {app: api}}", "labels: {app: api, version: v1}}")
        .replace("{name: tcp-echo, containerPort: 9000}]", "{name: tcp-echo, containerPort: 9000}, {name: grpc, containerPort: 9090}]")
        .replace("{name: tcp-legacy, port: 9000, targetPort: 9000}]", "{name: tcp-legacy, port: 9000, targetPort: 9000}, {name: grpc, port: 9090, targetPort: 9090}]");
    tokio::task::block_in_place(|| {
        t.apply(&app);
        t.apply(&ambient(true));
        wait_until("mTLS", || {
            t.curl("front/client", "http://10.96.0.20/").is_ok()
        });
    });
    let client = t.netns("front/client");
    let vip: SocketAddr = "10.96.0.20:9090".parse().unwrap();
    // Port 80 answering does not mean the gRPC port's listener and its service port
    // have reached every component yet: wait for the first successful call.
    let mut last = Err(String::new());
    for _ in 0..50 {
        last = grpc_echo(&client, vip, "over-ztunnels").await;
        if last.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let reply = last.expect("gRPC over the ztunnels");
    assert_eq!(
        (reply.message.as_str(), reply.served_by.as_str()),
        ("over-ztunnels", "back/api")
    );
    tokio::task::block_in_place(|| {
        t.apply(&waypoint());
        wait_until("the waypoint in the path", || {
            t.log("pod:back/waypoint")
                .contains("waypoint serving HBONE")
        });
    });
    let mut through_waypoint = false;
    for _ in 0..50 {
        if let Ok(r) = grpc_echo(&client, vip, "via-waypoint").await
            && t.log("pod:back/waypoint")
                .contains("dst.service=api.back.svc.cluster.local")
        {
            assert_eq!(r.message, "via-waypoint");
            through_waypoint = t
                .log("pod:back/waypoint")
                .contains("path=/mesh.echo.v1.Echo/Echo status=200");
            if through_waypoint {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        through_waypoint,
        "gRPC went through the waypoint:\n{}",
        t.log("pod:back/waypoint")
    );
    tokio::task::block_in_place(move || drop(t));
}
