//! Zero-reset ztunnel upgrades: a real node agent (configured by a real mesh-control, the
//! pod enrolled through the real CNI chain) and ztunnel processes started one after the
//! other, as a DaemonSet surge does. The newer one takes every new connection; the older
//! one keeps its open connections byte-exact, or drains them at its maximum age, and
//! exits once they are done and it has had the SIGTERM Kubernetes sends; without that
//! SIGTERM it stays up idle (an exit would be restarted and take the node back). A ZDS
//! client that does not advertise `handover.v1` (Istio's hello) is never sent a Handover.

use mesh_e2e::cluster::wait_until;
use mesh_e2e::net::{Netns, unique};
use mesh_e2e::proc::Proc;
use mesh_e2e::{binary, require_tool};
use mesh_lab::cgroup::{PodCgroups, mount_point};
use mesh_lab::cni_runtime::{Runtime, Sandbox, node_conflist, result_ipv4};
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::time::Duration;
use ztunnel::inpod::zds::{ZdsConnection, ZdsEvent};

const TOKEN: &str = "handover-test-node-token-5c1e";
const OCTET: u8 = 214;
const ECHO_PORT: u16 = 9000;
/// Every socket ztunnel listens on in a pod (`ss` flag, port).
const LISTENERS: [(&str, u16); 5] = [
    ("-t", 15001),
    ("-t", 15006),
    ("-t", 15008),
    ("-t", 15053),
    ("-u", 15053),
];

fn manifests(enrolled: bool) -> String {
    let labels = if enrolled {
        "{istio.io/dataplane-mode: ambient}"
    } else {
        "{}"
    };
    let mut s =
        format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: shop, labels: {labels}}}\n");
    // host-local hands out .2 then .3.
    for (name, ip) in [("web", 2), ("web2", 3)] {
        s.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: shop, uid: u-{name}}}\n\
             spec: {{nodeName: node-1, serviceAccountName: web}}\n\
             status: {{podIP: 10.{OCTET}.0.{ip}, conditions: [{{type: Ready, status: \"True\"}}]}}\n"
        ));
    }
    s
}

fn sandbox(pod: &Netns, name: &str) -> Sandbox {
    Sandbox {
        container_id: format!("c-{}", pod.name),
        netns: pod.path(),
        ifname: "eth0".into(),
        args: format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME={name};K8S_POD_UID=u-{name}"
        ),
    }
}

/// A node: mesh-control, the node agent, the CNI chain, and the ztunnels started so far.
struct Node {
    dir: PathBuf,
    manifests: PathBuf,
    ztunnels: Vec<Proc>,
    /// The pod has been added through the runtime.
    pod_added: bool,
    agents_started: usize,
    agent: Option<Proc>,
    _control: Proc,
    runtime: Runtime,
    node: Netns,
    cgroups: PodCgroups,
}

impl Node {
    fn new() -> Node {
        require_tool("nft");
        require_tool("curl");
        require_tool("ss");
        assert!(
            std::path::Path::new("/usr/lib/cni/bridge").exists(),
            "containernetworking-plugins is not installed: run scripts/install-deps.sh"
        );
        let node = Netns::new("hn");
        let dir = std::env::temp_dir().join(format!("{}-handover", node.name));
        let manifests = dir.join("manifests");
        std::fs::create_dir_all(&manifests).unwrap();
        std::fs::write(manifests.join("mesh.yaml"), self::manifests(true)).unwrap();
        std::fs::write(
            dir.join("tokens.yaml"),
            format!("tokens:\n- {{token: {TOKEN}, node: node-1}}\n"),
        )
        .unwrap();
        std::fs::write(dir.join("token"), TOKEN).unwrap();
        let control = Proc::spawn(
            Some(&node.name),
            &[
                binary("mesh-control").to_str().unwrap(),
                "--config-dir",
                manifests.to_str().unwrap(),
                "--state-dir",
                dir.join("state").to_str().unwrap(),
                "--tokens",
                dir.join("tokens.yaml").to_str().unwrap(),
                "--listen",
                "127.0.0.1:15012",
                "--dns-name",
                "mesh-control.lab",
            ],
            &dir.join("control.log"),
        );
        assert!(
            control.wait_for("serving xDS and CA", Duration::from_secs(10)),
            "{}",
            control.output()
        );
        let runtime = Runtime {
            bin_dirs: vec![
                "/usr/lib/cni".into(),
                binary("mesh-cni").parent().unwrap().to_path_buf(),
            ],
            conflist: node_conflist(
                "lab",
                &unique("br"),
                &format!("10.{OCTET}.0.0/24"),
                &format!("10.{OCTET}.0.1"),
                &dir.join("ipam"),
                &dir.join("agent.sock"),
            ),
            cache_dir: dir.join("cni-cache"),
            run_in_netns: Some(node.name.clone()),
        };
        let cgroups = PodCgroups::at(mount_point().unwrap(), &unique("cg"));
        Node {
            dir,
            manifests,
            ztunnels: Vec::new(),
            pod_added: false,
            agents_started: 0,
            agent: None,
            _control: control,
            runtime,
            node,
            cgroups,
        }
        .with_agent()
    }

    fn with_agent(mut self) -> Node {
        self.start_agent();
        self
    }

    /// Starts the node agent (again), its log in a file of its own.
    fn start_agent(&mut self) {
        self.agents_started += 1;
        let (dir, cgroups) = (&self.dir, &self.cgroups);
        let log = dir.join(format!("agent-{}.log", self.agents_started));
        let agent = Proc::spawn(
            Some(&self.node.name),
            &[
                binary("mesh-cni").to_str().unwrap(),
                "agent",
                "--node-name",
                "node-1",
                "--xds-address",
                "https://127.0.0.1:15012",
                "--root-cert",
                dir.join("state/root-cert.pem").to_str().unwrap(),
                "--control-hostname",
                "mesh-control.lab",
                "--token-file",
                dir.join("token").to_str().unwrap(),
                "--zds-socket",
                dir.join("zds.sock").to_str().unwrap(),
                "--agent-socket",
                dir.join("agent.sock").to_str().unwrap(),
                "--cgroup-root",
                cgroups.root(),
            ],
            &log,
        );
        assert!(
            agent.wait_for("xDS connected", Duration::from_secs(10)),
            "{}",
            agent.output()
        );
        self.agent = Some(agent);
    }

    /// Starts the pod's process (a `sleep`) as a runtime does: in the pod's cgroup (by
    /// UID) and its network namespace, so a restarted agent finds the pod's namespace.
    fn run_pod_process(&self, pod: &Netns, uid: &str) -> Proc {
        let cg = self.cgroups.create(uid, "app").unwrap();
        let args = PodCgroups::wrap(
            &cg,
            &["ip", "netns", "exec", &pod.name, "sleep", "600"].map(String::from),
        );
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let p = Proc::spawn(None, &args, &self.dir.join(format!("pod-{uid}.log")));
        let want = pod.handle().inode();
        wait_until("the pod's process in its namespace", || {
            std::fs::metadata(format!("/proc/{}/ns/net", p.pid()))
                .is_ok_and(|m| std::os::unix::fs::MetadataExt::ino(&m) == want)
        });
        p
    }

    /// Starts the next ztunnel (index = how many came before), with its own admin,
    /// metrics and readiness ports, and waits until it serves the pod (or, before the pod
    /// exists, until it has its snapshot).
    fn start_ztunnel(&mut self, extra: &[&str]) -> usize {
        let i = self.spawn_ztunnel("https://127.0.0.1:15012", extra);
        let p = &self.ztunnels[i];
        let ready = match self.pod_added {
            true => p.wait_for("pod proxy started", Duration::from_secs(15)),
            false => p.wait_for("connected to the node agent", Duration::from_secs(15)),
        };
        assert!(ready, "ztunnel {i} did not start: {}", p.output());
        i
    }

    /// Starts the next ztunnel with its xDS (and CA) at `xds`, without waiting.
    fn spawn_ztunnel(&mut self, xds: &str, extra: &[&str]) -> usize {
        let i = self.ztunnels.len();
        let port = |n: usize| format!("127.0.0.1:{}", 16000 + i * 10 + n);
        let mut args = vec![
            binary("ztunnel").to_str().unwrap().to_string(),
            "--node-name".into(),
            "node-1".into(),
            "--xds-address".into(),
            xds.into(),
            "--root-cert".into(),
            self.dir
                .join("state/root-cert.pem")
                .to_str()
                .unwrap()
                .into(),
            "--control-hostname".into(),
            "mesh-control.lab".into(),
            "--token-file".into(),
            self.dir.join("token").to_str().unwrap().into(),
            "--zds-socket".into(),
            self.dir.join("zds.sock").to_str().unwrap().into(),
            "--admin-addr".into(),
            port(0),
            "--metrics-addr".into(),
            port(1),
            "--readiness-addr".into(),
            port(2),
            "--drain-deadline".into(),
            "1s".into(),
            "--log-level".into(),
            "info,access=debug".into(),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let p = Proc::spawn(
            Some(&self.node.name),
            &args,
            &self.dir.join(format!("ztunnel-{i}.log")),
        );
        self.ztunnels.push(p);
        i
    }

    fn get(&self, url: &str) -> String {
        self.node
            .exec(&["curl", "-s", "--max-time", "5", url])
            .to_string()
    }

    /// One unlabelled gauge or counter of ztunnel `i`.
    fn zt_metric(&self, i: usize, name: &str) -> Option<i64> {
        let text = self.get(&format!("http://127.0.0.1:{}/metrics", 16000 + i * 10 + 1));
        metric(&text, name)
    }

    fn agent_metrics(&self) -> String {
        self.get("http://127.0.0.1:8000/metrics")
    }

    fn agent_log(&self) -> String {
        self.agent.as_ref().unwrap().output()
    }

    fn zt_log(&self, i: usize) -> String {
        self.ztunnels[i].output()
    }

    /// ztunnel `i`'s `handover` section of `/config_dump`.
    fn zt_handover(&self, i: usize) -> serde_json::Value {
        let page = self.get(&format!("http://127.0.0.1:{}/config_dump", 16000 + i * 10));
        serde_json::from_str::<serde_json::Value>(&page)
            .map(|d| d["handover"].clone())
            .unwrap_or_default()
    }

    /// ztunnel `i` has nothing left open and waits, idle, for a SIGTERM: it says so,
    /// and (after saying so) still answers as a live, not-ready process.
    fn assert_idle_until_sigterm(&self, i: usize) {
        wait_until("the handed-over ztunnel idle", || {
            self.zt_log(i)
                .contains("handed over with nothing left open: idle until SIGTERM")
        });
        let state = self.zt_handover(i);
        assert_eq!(state["state"], "idle", "{state}\n{}", self.zt_log(i));
        let ready = self.get(&format!(
            "http://127.0.0.1:{}/healthz/ready",
            16000 + i * 10 + 2
        ));
        assert!(ready.contains("handed over"), "{ready}");
        assert!(
            !self.zt_log(i).contains("handover complete: exiting"),
            "{}",
            self.zt_log(i)
        );
    }

    /// SIGTERM to ztunnel `i` (started by this test, by PID); it exits with status 0.
    fn sigterm_and_wait_exit(&mut self, i: usize) {
        let pid = self.ztunnels[i].pid();
        mesh_e2e::net::run(&["kill", "-TERM", &pid.to_string()]);
        let status = self.ztunnels[i]
            .wait_exit(Duration::from_secs(20))
            .unwrap_or_else(|| {
                panic!(
                    "ztunnel {i} still running after SIGTERM:\n{}",
                    self.zt_log(i)
                )
            });
        assert!(status.success(), "{status:?}:\n{}", self.zt_log(i));
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.ztunnels.clear();
        self.agent = None;
        self.cgroups.remove_all();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The value of `name` (whole line match, no labels) in Prometheus text.
fn metric(text: &str, name: &str) -> Option<i64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// An echo server in the node's namespace (the pod's traffic to it goes through ztunnel's
/// outbound listener: an unknown destination, passed through).
fn echo_server(node: &Netns, addr: SocketAddr) {
    let listener = node
        .handle()
        .run(|| TcpListener::bind(addr))
        .unwrap()
        .unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            std::thread::spawn(move || {
                let mut read = conn.try_clone().unwrap();
                let _ = std::io::copy(&mut read, &mut conn);
                let _ = conn.shutdown(Shutdown::Write);
            });
        }
    });
}

fn connect_from(pod: &Netns, to: SocketAddr) -> TcpStream {
    let s = pod
        .handle()
        .run(|| TcpStream::connect_timeout(&to, Duration::from_secs(5)))
        .unwrap()
        .expect("connect from the pod");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// Sends `n` pseudo-random bytes (from `seed`) and checks the echo is byte-exact.
fn roundtrip(s: &TcpStream, n: usize, seed: u64) {
    let data: Vec<u8> = (0..n as u64)
        .map(|i| ((i.wrapping_mul(2654435761) ^ seed) >> 7) as u8)
        .collect();
    let mut w = s.try_clone().unwrap();
    let expected = data.clone();
    let writer = std::thread::spawn(move || w.write_all(&data));
    let mut got = vec![0u8; n];
    (&*s).read_exact(&mut got).expect("echo read");
    writer.join().unwrap().expect("echo write");
    assert!(got == expected, "echo differs from what was sent");
}

/// Which processes listen on `port` in the pod (from `ss`, the kernel's view); `flag`
/// is `-t` (TCP) or `-u` (UDP).
fn listener_pids(pod: &Netns, flag: &str, port: u16) -> Vec<u32> {
    let out = pod.exec(&["ss", "-Hlnp", flag, &format!("sport = :{port}")]);
    let mut pids: Vec<u32> = out
        .split("pid=")
        .skip(1)
        .filter_map(|s| s.split(',').next()?.parse().ok())
        .collect();
    pids.sort();
    pids.dedup();
    pids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ztunnel_upgrade_hands_over_without_resetting_open_connections() {
    let mut node = Node::new();
    let a = node.start_ztunnel(&[]);
    wait_until("ztunnel 0 has its snapshot", || {
        node.agent_metrics()
            .contains("mesh_cni_ztunnel_connections{state=\"serving\"} 1\n")
    });
    let pod = Netns::new("hp");
    let sb = sandbox(&pod, "web");
    let result = node.runtime.add(&sb).expect("ADD through the CNI chain");
    node.pod_added = true;
    let _app = node.run_pod_process(&pod, "u-web");
    assert_eq!(
        result_ipv4(&result).as_deref(),
        Some(format!("10.{OCTET}.0.2").as_str())
    );
    wait_until("ztunnel 0 serves the pod", || {
        node.zt_log(a).contains("pod proxy started")
    });
    let echo: SocketAddr = format!("10.{OCTET}.0.1:{ECHO_PORT}").parse().unwrap();
    echo_server(&node.node, echo);
    // Set by the agent at enrolment (ztunnel may not be allowed to): queued connections
    // migrate to the new listener at a handover instead of being reset.
    assert_eq!(
        pod.exec(&["sysctl", "-n", "net.ipv4.tcp_migrate_req"])
            .trim(),
        "1"
    );

    // (a) A long-lived connection through ztunnel 0.
    let long = connect_from(&pod, echo);
    roundtrip(&long, 64 * 1024, 1);
    assert_eq!(node.zt_metric(a, "ztunnel_open_connections"), Some(1));
    assert_eq!(node.zt_metric(a, "ztunnel_accepting"), Some(1));
    let pid_a = node.ztunnels[a].pid();
    for (flag, port) in LISTENERS {
        assert_eq!(
            listener_pids(&pod, flag, port),
            vec![pid_a],
            "{flag} {port}"
        );
    }

    // The upgrade: a second ztunnel arrives; once it has the pod, ztunnel 0 is handed over.
    let b = node.start_ztunnel(&["--handover-max-age", "2s"]);
    let pid_b = node.ztunnels[b].pid();
    wait_until("ztunnel 0 handed over", || {
        node.zt_log(a)
            .contains("handed over: 1 connections still open")
    });
    // The open connection keeps flowing, byte-exact.
    roundtrip(&long, 256 * 1024, 2);
    let m = node.agent_metrics();
    assert!(m.contains("mesh_cni_ztunnel_handovers_total 1\n"), "{m}");
    assert!(
        m.contains("mesh_cni_ztunnel_connections{state=\"handed_over\"} 1\n")
            && m.contains("mesh_cni_ztunnel_connections{state=\"serving\"} 1\n"),
        "{m}"
    );
    // Only the new process listens in the pod now, for every port ztunnel serves.
    for (flag, port) in LISTENERS {
        wait_until("ztunnel 0's listeners closed", || {
            listener_pids(&pod, flag, port) == vec![pid_b]
        });
    }
    assert_eq!(
        pod.exec(&["sysctl", "-n", "net.ipv4.tcp_migrate_req"])
            .trim(),
        "1",
        "queued connections migrate to the new listener instead of being reset"
    );
    assert_eq!(node.zt_metric(a, "ztunnel_accepting"), Some(0));
    let ready = node.get("http://127.0.0.1:16002/healthz/ready");
    assert!(ready.contains("handed over"), "{ready}");
    let dump: serde_json::Value =
        serde_json::from_str(&node.get("http://127.0.0.1:16000/config_dump")).unwrap();
    assert_eq!(
        dump["handover"]["state"], "handed_over",
        "{}",
        dump["handover"]
    );

    // (b) A new connection lands on the new process, by each process's own count.
    let fresh = connect_from(&pod, echo);
    roundtrip(&fresh, 16 * 1024, 3);
    assert_eq!(node.zt_metric(b, "ztunnel_open_connections"), Some(1));
    assert_eq!(node.zt_metric(a, "ztunnel_open_connections"), Some(1));
    assert_eq!(node.zt_metric(b, "ztunnel_accepting"), Some(1));
    drop(fresh);

    // The agent restarts mid-handover: the handed-over ztunnel does not reconnect (it would
    // be the newest connection and take pods back); the serving one does; traffic flows.
    node.agent.as_mut().unwrap().kill();
    node.start_agent();
    wait_until("ztunnel 1 back with the new agent", || {
        let m = node.agent_metrics();
        m.contains("mesh_cni_ztunnel_connections{state=\"serving\"} 1\n")
            && m.contains("mesh_cni_ztunnel_connections{state=\"handed_over\"} 0\n")
    });
    roundtrip(&long, 64 * 1024, 9);
    assert!(
        node.zt_log(a)
            .contains("handed over: not reconnecting to the node agent")
    );
    let fresh = connect_from(&pod, echo);
    roundtrip(&fresh, 16 * 1024, 10);
    assert_eq!(node.zt_metric(b, "ztunnel_open_connections"), Some(1));
    drop(fresh);

    // A SIGTERM (Kubernetes sends one when the new pod is ready) does not cut it short.
    mesh_e2e::net::run(&["kill", "-TERM", &pid_a.to_string()]);
    wait_until("the signal noted", || {
        node.zt_log(a).contains("SIGTERM during a handover")
    });
    roundtrip(&long, 64 * 1024, 4);

    // (c) The last connection ends: ztunnel 0, signalled, exits with status 0.
    long.shutdown(Shutdown::Both).unwrap();
    drop(long);
    let status = node.ztunnels[a]
        .wait_exit(Duration::from_secs(20))
        .unwrap_or_else(|| panic!("ztunnel 0 still running:\n{}", node.zt_log(a)));
    assert!(status.success(), "{status:?}:\n{}", node.zt_log(a));
    assert!(node.zt_log(a).contains("handover complete: exiting"));

    // (d) ztunnel 1 (max age 2s) is handed over with a connection open: it drains at its
    // maximum age, the connection closed as a drain closes it; with no SIGTERM yet it
    // then waits idle, and exits on the SIGTERM.
    let held = connect_from(&pod, echo);
    roundtrip(&held, 16 * 1024, 5);
    assert_eq!(node.zt_metric(b, "ztunnel_open_connections"), Some(1));
    let c = node.start_ztunnel(&[]);
    wait_until("ztunnel 1 handed over", || {
        node.zt_log(b)
            .contains("handed over: 1 connections still open")
    });
    wait_until("ztunnel 1 at its maximum age", || {
        node.zt_log(b)
            .contains("handover max age reached: draining")
    });
    node.assert_idle_until_sigterm(b);
    let mut buf = [0u8; 16];
    let ended = (&held).read(&mut buf);
    assert!(
        matches!(ended, Ok(0)) || ended.is_err(),
        "the drained connection is closed: {ended:?}"
    );
    node.sigterm_and_wait_exit(b);
    // New connections are ztunnel 2's.
    let fresh = connect_from(&pod, echo);
    roundtrip(&fresh, 16 * 1024, 6);
    assert_eq!(node.zt_metric(c, "ztunnel_open_connections"), Some(1));
    drop(fresh);

    // A handed-over ztunnel never takes pods or traffic back: ztunnel 3 takes over from
    // ztunnel 2 (which keeps a connection) and crashes. New connections are refused, never
    // passed around the mesh, and a new pod waits (fail closed) instead of going to
    // ztunnel 2, until ztunnel 4 starts and takes it.
    let kept = connect_from(&pod, echo);
    roundtrip(&kept, 16 * 1024, 7);
    let d = node.start_ztunnel(&[]);
    wait_until("ztunnel 2 handed over", || {
        node.zt_log(c)
            .contains("handed over: 1 connections still open")
    });
    node.ztunnels[d].kill();
    wait_until("the agent sees only a handed-over ztunnel", || {
        let m = node.agent_metrics();
        m.contains("mesh_cni_ztunnel_connections{state=\"serving\"} 0\n")
            && m.contains("mesh_cni_ztunnel_connections{state=\"handed_over\"} 1\n")
    });
    let refused = pod
        .handle()
        .run(|| TcpStream::connect_timeout(&echo, Duration::from_secs(5)))
        .unwrap();
    assert!(
        refused.is_err(),
        "no ztunnel takes new connections: refused"
    );
    let pod2 = Netns::new("hq");
    let sb2 = sandbox(&pod2, "web2");
    node.runtime.add(&sb2).expect("ADD of a second pod");
    wait_until("the new pod waiting for a ztunnel", || {
        node.agent_log()
            .lines()
            .any(|l| l.contains("web2") && l.contains("no ztunnel is connected"))
    });
    roundtrip(&kept, 16 * 1024, 8);
    let e = node.start_ztunnel(&[]);
    if !node.ztunnels[e].wait_for("uid=\"u-web2\"", Duration::from_secs(10)) {
        panic!(
            "ztunnel 4 did not take the new pod:\n{}\nagent:\n{}",
            node.zt_log(e),
            node.agent_log()
        );
    }
    // (A handed-over ztunnel logs a refused Add with its uid.)
    assert!(!node.zt_log(c).contains("u-web2"), "{}", node.zt_log(c));
    // Its last connection ends before any SIGTERM: ztunnel 2 stays up, idle, and the
    // agent still counts it handed over (it never takes anything back).
    drop(kept);
    node.assert_idle_until_sigterm(c);
    assert!(
        node.agent_metrics()
            .contains("mesh_cni_ztunnel_connections{state=\"handed_over\"} 1\n")
    );
    node.sigterm_and_wait_exit(c);

    // (e) A ZDS client with Istio's hello (no capabilities) is never handed over. It runs
    // in this test's process, started before every ztunnel: ordered by process start
    // time (not by connection order) it is the oldest, so it takes nothing from ztunnel
    // 4, which keeps serving. A newer ztunnel then hands over ztunnel 4 but never it; the
    // next message it gets is a Del, queued after anything that arrival could have caused.
    let istio = ZdsConnection::connect_with(&node.dir.join("zds.sock"), &[])
        .await
        .unwrap();
    let mut seen = Vec::new();
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(10), istio.recv())
            .await
            .expect("snapshot from the agent")
            .unwrap();
        let done = matches!(ev, ZdsEvent::SnapshotSent);
        seen.push(format!("{ev:?}"));
        istio.ack(None).await.unwrap();
        if done {
            break;
        }
    }
    assert!(seen[0].starts_with("Add"), "{seen:?}");
    wait_until("both counted serving, nobody handed over", || {
        let m = node.agent_metrics();
        m.contains("mesh_cni_ztunnel_connections{state=\"serving\"} 2\n")
            && m.contains("mesh_cni_ztunnel_connections{state=\"handed_over\"} 0\n")
    });
    assert_eq!(node.zt_metric(e, "ztunnel_accepting"), Some(1));
    node.start_ztunnel(&[]);
    // ztunnel 4, handed over with nothing open, waits for its SIGTERM.
    node.assert_idle_until_sigterm(e);
    node.sigterm_and_wait_exit(e);
    wait_until("the agent counts the newest ztunnel serving", || {
        node.agent_metrics()
            .contains("mesh_cni_ztunnel_connections{state=\"serving\"} 2\n")
    });
    assert!(
        node.agent_metrics()
            .contains("mesh_cni_ztunnel_handovers_total 3\n"),
        "counted since the agent's restart: ztunnels 1, 2 and 4"
    );
    std::fs::write(node.manifests.join("mesh.yaml"), manifests(false)).unwrap();
    for _ in 0..2 {
        let next = tokio::time::timeout(Duration::from_secs(15), istio.recv())
            .await
            .expect("a message after the namespace left the mesh")
            .unwrap();
        assert!(
            matches!(&next, ZdsEvent::Del { .. }),
            "a ztunnel without handover.v1 got {next:?}"
        );
        istio.ack(None).await.unwrap();
    }
    node.runtime.del(&sb).expect("DEL");
    node.runtime.del(&sb2).expect("DEL");
}

/// A new ztunnel that cannot reach its control plane (no xDS, no certificates) could
/// serve nothing: it never connects to the node agent, so the running one is never
/// handed over and keeps taking every new connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ztunnel_without_its_control_plane_never_takes_the_node() {
    let mut node = Node::new();
    let a = node.start_ztunnel(&[]);
    wait_until("ztunnel 0 has its snapshot", || {
        node.agent_metrics()
            .contains("mesh_cni_ztunnel_connections{state=\"serving\"} 1\n")
    });
    let pod = Netns::new("hu");
    let sb = sandbox(&pod, "web");
    node.runtime.add(&sb).expect("ADD through the CNI chain");
    node.pod_added = true;
    let _app = node.run_pod_process(&pod, "u-web");
    wait_until("ztunnel 0 serves the pod", || {
        node.zt_log(a).contains("pod proxy started")
    });
    let echo: SocketAddr = format!("10.{OCTET}.0.1:{ECHO_PORT}").parse().unwrap();
    echo_server(&node.node, echo);
    let long = connect_from(&pod, echo);
    roundtrip(&long, 16 * 1024, 1);

    // A connection counts from its accept: an HBONE connection still in its TLS handshake
    // (this client sends nothing) keeps a handed-over ztunnel from judging itself idle.
    let hbone: SocketAddr = format!("10.{OCTET}.0.2:15008").parse().unwrap();
    let handshaking = node
        .node
        .handle()
        .run(|| TcpStream::connect_timeout(&hbone, Duration::from_secs(5)))
        .unwrap()
        .expect("connect to the pod's HBONE port");
    wait_until("the handshaking HBONE connection counted", || {
        node.zt_metric(a, "ztunnel_open_connections") == Some(2)
    });
    drop(handshaking);
    wait_until("no longer counted once closed", || {
        node.zt_metric(a, "ztunnel_open_connections") == Some(1)
    });

    // Nothing listens on this port in the node's namespace.
    let b = node.spawn_ztunnel("https://127.0.0.1:15099", &[]);
    wait_until("ztunnel 1 retrying its control plane", || {
        node.zt_log(b).matches("xDS stream failed").count() >= 6
    });
    let log = node.zt_log(b);
    assert!(
        log.contains("waiting for the configuration before connecting to the node agent"),
        "{log}"
    );
    assert!(!log.contains("connected to the node agent"), "{log}");
    let m = node.agent_metrics();
    assert!(
        m.contains("mesh_cni_ztunnel_connections{state=\"serving\"} 1\n")
            && m.contains("mesh_cni_ztunnel_connections{state=\"handed_over\"} 0\n"),
        "{m}"
    );
    assert_eq!(node.zt_metric(a, "ztunnel_accepting"), Some(1));
    let ready = node.get("http://127.0.0.1:16012/healthz/ready");
    assert!(ready.contains("xds"), "ztunnel 1 is not ready: {ready}");
    // New connections still land on ztunnel 0; the open one flows on.
    let fresh = connect_from(&pod, echo);
    roundtrip(&fresh, 16 * 1024, 2);
    assert_eq!(node.zt_metric(a, "ztunnel_open_connections"), Some(2));
    roundtrip(&long, 16 * 1024, 3);
    drop((fresh, long));
    node.runtime.del(&sb).expect("DEL");
}

/// A pod added while a new ztunnel receives its snapshot goes to the old one (the only one
/// serving) and is queued for the new one behind its snapshot: after the handover the
/// new one serves it. The window is held open by a CA that never answers the new ztunnel
/// (it waits up to 3 s for its snapshot pods' certificates before acking the snapshot).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_added_during_the_snapshot_is_queued_for_the_new_ztunnel() {
    let mut node = Node::new();
    let a = node.start_ztunnel(&[]);
    wait_until("ztunnel 0 has its snapshot", || {
        node.agent_metrics()
            .contains("mesh_cni_ztunnel_connections{state=\"serving\"} 1\n")
    });
    let pod = Netns::new("hw");
    let sb = sandbox(&pod, "web");
    node.runtime.add(&sb).expect("ADD through the CNI chain");
    node.pod_added = true;
    wait_until("ztunnel 0 serves the pod", || {
        node.zt_log(a).contains("pod proxy started")
    });
    // Accepts connections and never answers: certificate requests hang.
    let _silent_ca = node
        .node
        .handle()
        .run(|| TcpListener::bind("127.0.0.1:15097"))
        .unwrap()
        .unwrap();
    let b = node.spawn_ztunnel(
        "https://127.0.0.1:15012",
        &["--ca-address", "https://127.0.0.1:15097"],
    );
    wait_until("ztunnel 1 took the snapshot's pod", || {
        node.zt_log(b).contains("pod proxy started")
    });
    // Its snapshot is not acked yet: the new pod goes to ztunnel 0.
    let pod2 = Netns::new("hx");
    let sb2 = sandbox(&pod2, "web2");
    node.runtime.add(&sb2).expect("ADD during the snapshot");
    assert!(
        node.zt_log(a).contains("uid=\"u-web2\""),
        "the pod was added within the snapshot window, to ztunnel 0:\n{}",
        node.zt_log(a)
    );
    assert!(!node.zt_log(b).contains("pod certificates"));
    wait_until("ztunnel 0 handed over", || {
        node.zt_log(a).contains("handed over:")
    });
    let pid_b = node.ztunnels[b].pid();
    for (flag, port) in LISTENERS {
        wait_until("ztunnel 1 listens in the pod added meanwhile", || {
            listener_pids(&pod2, flag, port) == vec![pid_b]
        });
        assert_eq!(listener_pids(&pod, flag, port), vec![pid_b]);
    }
    let log = node.zt_log(b);
    assert!(
        log.contains("pod certificates not all fetched in time"),
        "{log}"
    );
    // The bounded wait stays within the agent's ack timeout: one ZDS connection.
    assert_eq!(
        log.matches("connected to the node agent").count(),
        1,
        "{log}"
    );
    node.runtime.del(&sb2).expect("DEL");
    node.runtime.del(&sb).expect("DEL");
}
