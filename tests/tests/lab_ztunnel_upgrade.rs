//! Upgrading ztunnel never touches traffic, on a real lab cluster: a long-lived iperf3
//! stream, an HTTP/2 keep-alive connection making requests throughout and a byte-pattern
//! TCP echo run across `mesh-lab upgrade` of the ztunnel on node 1, then on node 2. No
//! reset, no byte lost; every new connection after an upgrade is carried by the new
//! process (each process's own metrics say so); each old process gets the SIGTERM the
//! DaemonSet controller sends once the new pod is ready, keeps its connections after it,
//! and exits once they end; only HBONE crosses the fabric throughout.

use mesh_e2e::cluster::{contains, wait_until};
use mesh_e2e::manifests::{
    BACK_AMBIENT, BACK_API_POD_WITH_TCP_ECHO, FRONT_AMBIENT, FRONT_CLIENT, join,
};
use mesh_e2e::proc::Proc;
use mesh_e2e::testlab::{TestLab, echo_chunk, metric_sum, wait_exit};
use mesh_lab::upgrade::accepting;
use std::io::Read;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

const SERVICE: &str = "apiVersion: v1
kind: Service
metadata: {name: api, namespace: back}
spec:
  selector: {app: api}
  clusterIP: 10.96.0.20
  ports: [{name: http, port: 80, targetPort: http}, {name: tcp-legacy, port: 9000, targetPort: 9000}]
";

/// An iperf3 server in namespace `back` (enrolled), on node 2.
const IPERF_SERVER: &str = "apiVersion: v1
kind: Pod
metadata: {name: iperf, namespace: back, labels: {app: iperf}}
spec:
  nodeName: node-2
  containers: [{name: iperf, command: [iperf3, -s, -p, \"5201\"]}]
";

/// How long the iperf3 stream runs: both upgrades and their checks fit well inside.
const IPERF_SECONDS: u64 = 60;
/// New connections made after each upgrade, each checked to land on the new process.
const NEW_CONNECTIONS: usize = 20;
/// How long an old process may take to exit once its last connection ended.
const OLD_EXIT_TIMEOUT: Duration = Duration::from_secs(60);
const OPENED: &str = "istio_tcp_connections_opened_total";

/// Established TCP connections from inside `pod` to `to` (an address:port).
fn established(t: &TestLab, pod: &str, to: &str) -> usize {
    let out = t
        .in_pod(pod)
        .args(["ss", "-Htn", "state", "established", "dst", to])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).lines().count()
}

type H2 = hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>>;

async fn h2_get(sender: &mut H2, path: &str) -> Result<u16, String> {
    sender
        .ready()
        .await
        .map_err(|e| format!("connection: {e}"))?;
    let req = http::Request::get(format!("http://10.96.0.20{path}"))
        .body(http_body_util::Empty::new())
        .unwrap();
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("request: {e}"))?;
    Ok(resp.status().as_u16())
}

/// Connections the ztunnel process recorded for `role` opened, as it reports them
/// (`reporter`: source on the client's node, destination on the server's).
fn opened(t: &TestLab, role: &str, reporter: &str) -> f64 {
    metric_sum(
        &t.ztunnel_metrics(role),
        OPENED,
        &[&format!("reporter=\"{reporter}\"")],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ztunnel_upgrade_on_both_nodes_keeps_every_connection_and_moves_new_ones() {
    let (mut t, server_ip) = tokio::task::block_in_place(|| {
        let mut t = TestLab::up_named("upg", 2, &["curl", "tcpdump", "nft", "iperf3", "ss"]);
        t.apply(&join(&[
            FRONT_AMBIENT,
            BACK_AMBIENT,
            BACK_API_POD_WITH_TCP_ECHO,
            SERVICE,
            FRONT_CLIENT,
            IPERF_SERVER,
        ]));
        t.eventually("front/client confirmed", || t.confirmed(1, "front/client"));
        t.eventually("back/api confirmed", || t.confirmed(2, "back/api"));
        t.eventually("back/iperf confirmed", || t.confirmed(2, "back/iperf"));
        t.eventually("back/iperf known to both ztunnels", || {
            t.known_to_every_ztunnel("back/iperf")
        });
        wait_until("mTLS", || {
            t.curl("front/client", "http://10.96.0.20/").is_ok()
                && t.log("ztunnel-2")
                    .contains("src.identity=\"spiffe://cluster.local/ns/front/sa/web\"")
        });
        // (iperf3 buffers its output in a file: its socket says it listens.)
        t.eventually("the iperf3 server to listen", || {
            let out = t
                .in_pod("back/iperf")
                .args(["ss", "-Htln", "sport", "=", ":5201"])
                .output()
                .unwrap();
            !out.stdout.is_empty()
        });
        let ip = t.lab.state.pods["back/iperf"].ip.clone();
        (t, ip)
    });

    // The fabric, watched from before the first upgrade to after the last connection
    // (headers and the start of each payload: the bulk transfer stays small on disk).
    let capture = t.capture_headers("upgrades", 160);

    // The long-lived iperf3 stream: client on node 1, server on node 2, rate-limited.
    let iperf_to = format!("{server_ip}:5201");
    let mut iperf = Proc::spawn(
        Some(&t.lab.state.pods["front/client"].netns),
        &[
            "iperf3",
            "-c",
            &server_ip,
            "-p",
            "5201",
            "-t",
            &IPERF_SECONDS.to_string(),
            "-b",
            "10M",
            "-J",
        ],
        &t.lab.dir.join("iperf3-client.json"),
    );
    tokio::task::block_in_place(|| {
        // Its control connection and its data stream, both through the first ztunnels.
        t.eventually("iperf3's connections", || {
            established(&t, "front/client", &iperf_to) >= 2
        });
    });

    // The byte-pattern echo and the HTTP/2 keep-alive connection, made before any upgrade.
    let mut stream = t.connect_from("front/client", "10.96.0.20:9000");
    let mut sent = 0;
    for _ in 0..4 {
        echo_chunk(&mut stream, sent, 64 * 1024);
        sent += 64 * 1024;
    }
    let h2_tcp = t.connect_from("front/client", "10.96.0.20:80");
    h2_tcp.set_nonblocking(true).unwrap();
    let io = hyper_util::rt::TokioIo::new(tokio::net::TcpStream::from_std(h2_tcp).unwrap());
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
            .await
            .unwrap();
    let conn = tokio::spawn(conn);
    assert_eq!(h2_get(&mut sender, "/before").await, Ok(200));
    // Requests throughout, on that one connection, until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicUsize::new(0));
    let requests = {
        let (stop, answered) = (stop.clone(), answered.clone());
        tokio::spawn(async move {
            let mut results = Vec::new();
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                results.push((n, h2_get(&mut sender, &format!("/tick-{n}")).await));
                answered.fetch_add(1, Ordering::Relaxed);
                n += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            (sender, results)
        })
    };

    let mut old_pids = Vec::new();
    for (node, reporter) in [(1, "source"), (2, "destination")] {
        tokio::task::block_in_place(|| {
            let (old, new) = t.upgrade_ztunnel(node);
            assert_ne!(old, new);
            assert_eq!(
                t.lab.process(&format!("ztunnel-{node}-old")).unwrap().pid,
                old
            );
            assert_eq!(t.lab.process(&format!("ztunnel-{node}")).unwrap().pid, new);
            old_pids.push(old);
            // The upgrade sent the old one SIGTERM, as the DaemonSet controller does; it
            // noted it and carries on (the checks below run after it).
            t.eventually("the old ztunnel noted its SIGTERM", || {
                t.log(&format!("ztunnel-{node}-old"))
                    .contains("SIGTERM during a handover")
            });
            assert!(mesh_lab::ending::alive(old), "{}", t.all_logs());
            let ports = |role: &str| t.lab.ztunnel_ports(role).unwrap();
            assert_ne!(
                ports(&format!("ztunnel-{node}")),
                ports(&format!("ztunnel-{node}-old")),
                "the two processes have their own ports"
            );

            // Every new connection from now on is the new process's.
            let old_role = format!("ztunnel-{node}-old");
            let new_role = format!("ztunnel-{node}");
            let old_before = opened(&t, &old_role, reporter);
            let new_before = opened(&t, &new_role, reporter);
            for i in 0..NEW_CONNECTIONS {
                let url = format!("http://10.96.0.20/new-after-upgrade-{node}-{i}");
                let answer = t.curl("front/client", &url);
                assert!(answer.is_ok(), "{url}: {answer:?}{}", t.all_logs());
            }
            // Each connection is counted by whichever process took it.
            let delta = |role: &str, before: f64| opened(&t, role, reporter) - before;
            t.eventually("the new connections to be counted", || {
                delta(&old_role, old_before) + delta(&new_role, new_before)
                    >= NEW_CONNECTIONS as f64
            });
            let on_old = delta(&old_role, old_before);
            assert_eq!(
                on_old,
                0.0,
                "{on_old} of {NEW_CONNECTIONS} new connections landed on the old ztunnel-{node} (pid {old}), {} on the new one (pid {new})",
                delta(&new_role, new_before)
            );
            // Each process's own metrics: the old one stopped accepting and still holds
            // the long-lived connections; the new one accepts.
            let old_page = t.ztunnel_metrics(&old_role);
            assert_eq!(accepting(&old_page), Some(false), "{old_page}");
            assert!(
                metric_sum(&old_page, "ztunnel_open_connections", &[]) >= 1.0,
                "{old_page}"
            );
            assert_eq!(accepting(&t.ztunnel_metrics(&new_role)), Some(true));

            // The pods are still confirmed (the new process acknowledged them).
            t.eventually("front/client confirmed after the upgrade", || {
                t.confirmed(1, "front/client")
            });
            t.eventually("back/api confirmed after the upgrade", || {
                t.confirmed(2, "back/api")
            });
            // The HTTP/2 connection made requests after this upgrade too.
            let at = answered.load(Ordering::Relaxed);
            t.eventually("HTTP/2 requests after the upgrade", || {
                answered.load(Ordering::Relaxed) > at + 1
            });
        });
        // The same echo stream, after this upgrade.
        for _ in 0..2 {
            echo_chunk(&mut stream, sent, 64 * 1024);
            sent += 64 * 1024;
        }
    }
    // The premise: the iperf3 stream spans both upgrades.
    assert!(
        iperf.running(),
        "iperf3 ended before both upgrades were done (raise IPERF_SECONDS): {}",
        iperf.output()
    );

    // The HTTP/2 connection: every request answered, on the one connection.
    stop.store(true, Ordering::Relaxed);
    let (mut sender, results) = requests.await.unwrap();
    assert_eq!(h2_get(&mut sender, "/after").await, Ok(200));
    let failed: Vec<_> = results.iter().filter(|(_, r)| *r != Ok(200)).collect();
    assert!(
        failed.is_empty(),
        "{} requests, failed: {failed:?}",
        results.len()
    );
    assert!(
        !conn.is_finished(),
        "the HTTP/2 connection is still the same one"
    );

    // The echo stream ends cleanly: everything sent came back, nothing more.
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "{} unexpected bytes", rest.len());
    assert_eq!(sent, 8 * 64 * 1024);
    drop(stream);
    drop(sender);
    conn.await.unwrap().unwrap();

    tokio::task::block_in_place(|| {
        // iperf3 ends without error, the receiver having every byte the sender sent.
        assert!(
            wait_exit(iperf.pid(), Duration::from_secs(IPERF_SECONDS + 60)),
            "iperf3 did not end"
        );
        let out = iperf.output();
        let json: serde_json::Value = serde_json::from_str(&out[out.find('{').unwrap_or(0)..])
            .unwrap_or_else(|e| panic!("iperf3 output is not JSON ({e}): {out}"));
        assert!(json.get("error").is_none(), "iperf3: {}", json["error"]);
        let sent = json["end"]["sum_sent"]["bytes"].as_u64().unwrap_or(0);
        let received = json["end"]["sum_received"]["bytes"].as_u64().unwrap_or(0);
        assert!(sent > 0, "iperf3 sent nothing: {out}");
        assert_eq!(received, sent, "bytes received vs sent");

        // With their connections ended, the signalled old processes exit.
        for pid in &old_pids {
            assert!(
                wait_exit(*pid, OLD_EXIT_TIMEOUT),
                "old ztunnel pid {pid} still runs after its connections ended{}",
                t.all_logs()
            );
        }
        let status = t.lab.status();
        for node in 1..=2 {
            let old = format!("ztunnel-{node}-old");
            assert!(
                status
                    .lines()
                    .any(|l| l.contains(&old) && l.contains("EXITED")),
                "{status}"
            );
        }
        assert!(
            t.meshctl(&["status"]).contains("mesh-control: READY"),
            "{}",
            t.meshctl(&["status"])
        );
        // New connections still work, through the new processes.
        assert!(t.curl("front/client", "http://10.96.0.20/last").is_ok());

        // Only HBONE crossed the fabric, through both upgrades.
        let (bytes, summary) = capture.finish();
        assert!(!contains(&bytes, "new-after-upgrade"));
        assert!(
            !summary.is_empty() && summary.lines().all(|l| l.contains(".15008")),
            "only HBONE on the fabric: {}",
            summary
                .lines()
                .filter(|l| !l.contains(".15008"))
                .take(10)
                .collect::<Vec<_>>()
                .join("\n")
        );
    });
}

/// The lab's side of an upgrade: the lab's Prometheus scrapes both processes of the
/// node, each on its own port; a second upgrade waits for the old process; a reboot
/// and `down` end both processes, by PID.
#[test]
fn both_ztunnels_of_an_upgrading_node_are_scraped_and_ended_with_the_node() {
    let mut t = TestLab::up_observed("upr", 2, &["curl", "nft"]);
    t.apply(&join(&[
        FRONT_AMBIENT,
        BACK_AMBIENT,
        BACK_API_POD_WITH_TCP_ECHO,
        SERVICE,
        FRONT_CLIENT,
    ]));
    let ready = |t: &TestLab| {
        t.eventually("front/client confirmed", || t.confirmed(1, "front/client"));
        t.eventually("back/api confirmed", || t.confirmed(2, "back/api"));
        t.eventually("traffic through the mesh", || {
            t.curl("front/client", "http://10.96.0.20/").is_ok()
        });
    };
    ready(&t);
    // A connection through node 2 that keeps its old ztunnel busy.
    let mut held = t.connect_from("front/client", "10.96.0.20:9000");
    echo_chunk(&mut held, 0, 1024);
    let (old, new) = t.upgrade_ztunnel(2);

    let refused = t.lab.upgrade_ztunnel(2, None).unwrap_err();
    assert!(
        refused.contains("ztunnel-2-old") && refused.contains(&format!("pid {old}")),
        "{refused}"
    );
    assert_eq!(
        t.lab.process("ztunnel-2").unwrap().pid,
        new,
        "nothing changed"
    );

    // Each process's own metrics, in the lab's Prometheus.
    t.eventually("both ztunnels of node-2 scraped", || {
        let mut up: Vec<(String, String, bool)> = t
            .promql("up{job=\"ztunnel\",node=\"node-2\"}")
            .into_iter()
            .map(|(m, v)| {
                let label = |k: &str| m[k].as_str().unwrap_or_default().to_string();
                (label("lab_process"), label("pid"), v == 1.0)
            })
            .collect();
        up.sort();
        up == [
            ("ztunnel-2".into(), new.to_string(), true),
            ("ztunnel-2-old".into(), old.to_string(), true),
        ]
    });
    // Each target is its own process: the new one started after the old one.
    t.eventually("each process's start time", || {
        let started = |pid: u32| {
            t.promql(&format!(
                "process_start_time_seconds{{job=\"ztunnel\",pid=\"{pid}\"}}"
            ))
            .first()
            .map(|(_, v)| *v)
        };
        matches!((started(old), started(new)), (Some(o), Some(n)) if n > o)
    });
    echo_chunk(&mut held, 1024, 1024);

    // A reboot ends both, and brings back one ztunnel on the first port set.
    t.lab
        .reboot(2, mesh_lab::reboot::BootOrder::default())
        .unwrap();
    assert!(!mesh_lab::ending::alive(old) && !mesh_lab::ending::alive(new));
    assert!(t.lab.process("ztunnel-2-old").is_none());
    assert_eq!(
        t.lab.ztunnel_ports("ztunnel-2"),
        Some(mesh_lab::upgrade::PORT_SETS[0])
    );
    drop(held);
    ready(&t);

    // `down` ends both too.
    let mut held = t.connect_from("front/client", "10.96.0.20:9000");
    echo_chunk(&mut held, 0, 1024);
    let (old, new) = t.upgrade_ztunnel(2);
    t.lab.down().unwrap();
    for pid in [old, new] {
        assert!(!mesh_lab::ending::alive(pid), "pid {pid} still runs");
    }
}

/// `mesh-lab upgrade agent-N --binary PATH`: the agent runs the new binary, the pods
/// stay confirmed and an open connection carries on.
#[test]
fn an_agent_upgrade_runs_the_new_binary_and_leaves_traffic_alone() {
    let mut t = TestLab::up_named("upa", 2, &["curl", "nft"]);
    t.apply(&join(&[
        FRONT_AMBIENT,
        BACK_AMBIENT,
        BACK_API_POD_WITH_TCP_ECHO,
        SERVICE,
        FRONT_CLIENT,
    ]));
    t.eventually("front/client confirmed", || t.confirmed(1, "front/client"));
    t.eventually("traffic through the mesh", || {
        t.curl("front/client", "http://10.96.0.20/").is_ok()
    });
    let mut held = t.connect_from("front/client", "10.96.0.20:9000");
    echo_chunk(&mut held, 0, 1024);

    // The "new" binary: another name for the built one (no copy on disk).
    let next = t.lab.dir.join("mesh-cni-next");
    std::fs::hard_link(mesh_e2e::binary("mesh-cni"), &next).unwrap();
    let old = t.lab.process("agent-1").unwrap().pid;
    let said = mesh_lab::upgrade::run(&mut t.lab, "agent-1", Some(&next))
        .unwrap_or_else(|e| panic!("{e}{}", t.all_logs()));
    let new = t.lab.process("agent-1").unwrap().pid;
    assert!(said.contains(&format!("pid {new}")), "{said}");
    assert_ne!(old, new);
    assert!(!mesh_lab::ending::alive(old), "the old agent ended");
    assert_eq!(
        std::fs::read_link(format!("/proc/{new}/exe")).unwrap(),
        next,
        "the agent runs the new binary"
    );

    echo_chunk(&mut held, 1024, 1024);
    t.eventually("front/client confirmed by the new agent", || {
        t.confirmed(1, "front/client")
    });
    assert!(t.curl("front/client", "http://10.96.0.20/after").is_ok());
    // A later start (a reboot, `mesh-lab start`) keeps the installed binary.
    t.lab.stop("agent-1", false).unwrap();
    t.lab.start_agent(1).unwrap();
    t.lab.wait_agent_ready(1).unwrap();
    let again = t.lab.process("agent-1").unwrap().pid;
    assert_eq!(
        std::fs::read_link(format!("/proc/{again}/exe")).unwrap(),
        next
    );
}
