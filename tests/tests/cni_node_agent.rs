//! The CNI plugin and node agent in real network namespaces: the reference bridge +
//! host-local plugins with mesh-cni chained after them, invoked as a container runtime
//! does; the agent configured by a real mesh-control; a ZDS client on the other side.

use mesh_e2e::cluster::wait_until;
use mesh_e2e::net::{Netns, unique};
use mesh_e2e::proc::Proc;
use mesh_e2e::{binary, require_tool};
use mesh_lab::cgroup::{PodCgroups, mount_point};
use mesh_lab::cni_runtime::{Runtime, Sandbox, node_conflist, result_ipv4};
use mesh_proto::zds;
use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;
use ztunnel::inpod::zds::{ZdsConnection, ZdsEvent};

const TOKEN: &str = "cni-test-node-token-17a9";

struct Node {
    dir: PathBuf,
    manifests: PathBuf,
    agent: Option<Proc>,
    _control: Proc,
    runtime: Runtime,
    node: Netns,
    /// Pods' processes run in kubelet-style cgroups below a root private to this test.
    cgroups: PodCgroups,
}

fn namespaces(ambient: &[&str], pods: &str) -> String {
    let mut s = String::new();
    for ns in ["shop", "plain"] {
        let labels = if ambient.contains(&ns) {
            "{istio.io/dataplane-mode: ambient}"
        } else {
            "{}"
        };
        s.push_str(&format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}, labels: {labels}}}\n---\n"
        ));
    }
    s.push_str(pods);
    s
}

fn pod(ns: &str, name: &str, uid: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, uid: {uid}}}\nspec: {{nodeName: node-1}}\n---\n"
    )
}

impl Node {
    fn new(subnet_octet: u8, manifests: &str) -> Node {
        require_tool("nft");
        assert!(
            std::path::Path::new("/usr/lib/cni/bridge").exists(),
            "containernetworking-plugins is not installed: run scripts/install-deps.sh"
        );
        let node = Netns::new("cn");
        let dir = std::env::temp_dir().join(format!("{}-cni", node.name));
        let manifests_dir = dir.join("manifests");
        std::fs::create_dir_all(&manifests_dir).unwrap();
        std::fs::write(manifests_dir.join("mesh.yaml"), manifests).unwrap();
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
                manifests_dir.to_str().unwrap(),
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
        let bridge = unique("br");
        let runtime = Runtime {
            bin_dirs: vec![
                "/usr/lib/cni".into(),
                binary("mesh-cni").parent().unwrap().to_path_buf(),
            ],
            conflist: node_conflist(
                "lab",
                &bridge,
                &format!("10.{subnet_octet}.0.0/24"),
                &format!("10.{subnet_octet}.0.1"),
                &dir.join("ipam"),
                &dir.join("agent.sock"),
            ),
            cache_dir: dir.join("cni-cache"),
            run_in_netns: Some(node.name.clone()),
        };
        let cgroups = PodCgroups::at(mount_point().unwrap(), &unique("cg"));
        let mut n = Node {
            dir,
            manifests: manifests_dir,
            agent: None,
            _control: control,
            runtime,
            node,
            cgroups,
        };
        n.start_agent();
        n
    }

    fn start_agent(&mut self) {
        let p = Proc::spawn(
            Some(&self.node.name),
            &[
                binary("mesh-cni").to_str().unwrap(),
                "agent",
                "--node-name",
                "node-1",
                "--xds-address",
                "https://127.0.0.1:15012",
                "--root-cert",
                self.dir.join("state/root-cert.pem").to_str().unwrap(),
                "--control-hostname",
                "mesh-control.lab",
                "--token-file",
                self.dir.join("token").to_str().unwrap(),
                "--zds-socket",
                self.dir.join("zds.sock").to_str().unwrap(),
                "--agent-socket",
                self.dir.join("agent.sock").to_str().unwrap(),
                "--cgroup-root",
                self.cgroups.root(),
            ],
            &self.dir.join("agent.log"),
        );
        assert!(
            p.wait_for("xDS connected", Duration::from_secs(10)),
            "{}",
            p.output()
        );
        self.agent = Some(p);
    }

    /// Starts the pod's process (a `sleep`) as a runtime does: in the pod's cgroup
    /// (kubelet naming, by UID) and its network namespace.
    fn run_pod_process(&self, pod_ns: &Netns, uid: &str) -> Proc {
        let cg = self.cgroups.create(uid, "app").unwrap();
        let args = PodCgroups::wrap(
            &cg,
            &["ip", "netns", "exec", &pod_ns.name, "sleep", "600"].map(String::from),
        );
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let p = Proc::spawn(None, &args, &self.dir.join(format!("pod-{uid}.log")));
        let want = pod_ns.handle().inode();
        wait_until("the pod's process in its namespace", || {
            std::fs::metadata(format!("/proc/{}/ns/net", p.pid()))
                .is_ok_and(|m| std::os::unix::fs::MetadataExt::ino(&m) == want)
        });
        p
    }

    /// The agent's metrics (served on its readiness address in the node's namespace).
    fn metrics(&self) -> String {
        self.node.exec(&[
            "curl",
            "-s",
            "--max-time",
            "5",
            "http://127.0.0.1:8000/metrics",
        ])
    }

    fn write(&self, text: &str) {
        std::fs::write(self.manifests.join("mesh.yaml"), text).unwrap();
    }

    /// mesh-control's configuration version (its own count of what it published; 0 when
    /// it does not answer), from its debug API in the node's namespace.
    fn control_version(&self) -> u64 {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.node.name])
            .args(["curl", "-s", "--max-time", "5"])
            .arg("http://127.0.0.1:15014/debug/status")
            .output()
            .unwrap();
        serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .ok()
            .and_then(|v| v["version"].as_u64())
            .unwrap_or(0)
    }

    /// [`Node::write`], then waits until mesh-control has published what it read.
    fn write_published(&self, text: &str) {
        let before = self.control_version();
        self.write(text);
        wait_until("mesh-control to publish the edit", || {
            self.control_version() > before
        });
    }

    fn sandbox(&self, pod_ns: &Netns, ns: &str, name: &str, uid: &str) -> Sandbox {
        Sandbox {
            container_id: format!("c-{}", pod_ns.name),
            netns: pod_ns.path(),
            ifname: "eth0".into(),
            args: format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE={ns};K8S_POD_NAME={name};K8S_POD_UID={uid}"
            ),
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.agent = None;
        self.cgroups.remove_all();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn tables(ns: &Netns) -> Vec<String> {
    let out = ns.exec(&["nft", "-j", "list", "tables"]);
    mesh_cni::agent::redirect::parse_tables_json(&out).unwrap()
}

fn captured(ns: &Netns) -> bool {
    let t = tables(ns);
    t.contains(&"inet ambient-nat".to_string())
        && t.contains(&"inet ambient-mangle".to_string())
        && ns
            .exec(&["ip", "rule", "show"])
            .contains("fwmark 0x111/0xfff lookup 100")
        && (!has_v6(ns) || captured_v6(ns))
}

/// A pod with a global IPv6 address (dual stack).
fn has_v6(ns: &Netns) -> bool {
    !ns.exec(&["ip", "-6", "-o", "addr", "show", "scope", "global"])
        .trim()
        .is_empty()
}

/// The IPv6 policy route for ztunnel's spoofed connections.
fn captured_v6(ns: &Netns) -> bool {
    ns.exec(&["ip", "-6", "rule", "show"])
        .contains("fwmark 0x111/0xfff lookup 100")
        && ns
            .exec(&["ip", "-6", "route", "show", "table", "100"])
            .contains("local default dev lo")
}

fn clean(ns: &Netns) -> bool {
    // `ip route show table 100` fails when the table does not exist: that is clean too.
    let routes = Command::new("ip")
        .args([
            "netns", "exec", &ns.name, "ip", "route", "show", "table", "100",
        ])
        .output()
        .unwrap();
    let routes6 = Command::new("ip")
        .args([
            "netns", "exec", &ns.name, "ip", "-6", "route", "show", "table", "100",
        ])
        .output()
        .unwrap();
    tables(ns).iter().all(|t| !t.contains("ambient"))
        && !ns.exec(&["ip", "rule", "show"]).contains("0x111")
        && !ns.exec(&["ip", "-6", "rule", "show"]).contains("0x111")
        && (!routes.status.success() || routes.stdout.is_empty())
        && (!routes6.status.success() || routes6.stdout.is_empty())
}

async fn zds_client(node: &Node) -> ZdsConnection {
    ZdsConnection::connect(&node.dir.join("zds.sock"))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrolled_pod_lifecycle_through_the_runtime() {
    let mut node = Node::new(210, &namespaces(&["shop"], &pod("shop", "web", "u-web")));
    let pod_ns = Netns::new("cp");
    let sb = node.sandbox(&pod_ns, "shop", "web", "u-web");
    let result = node
        .runtime
        .add(&sb)
        .expect("ADD through bridge, host-local and mesh-cni");
    let ip = result_ipv4(&result).expect("host-local gave the pod an address");
    assert!(
        result["interfaces"].is_array(),
        "prevResult passed through: {result}"
    );
    assert!(
        captured(&pod_ns),
        "redirect rules in the pod: {:?}",
        tables(&pod_ns)
    );
    node.runtime.check(&sb).expect("CHECK");
    // CHECK reads the rules back as the agent does: the guard deleted, CHECK fails.
    pod_ns.exec(&["nft", "delete", "table", "inet", "ambient-guard"]);
    let e = node.runtime.check(&sb).unwrap_err();
    assert!(
        format!("{} {}", e.msg, e.details).contains("table inet ambient-guard is missing"),
        "{e:?}"
    );

    // Traffic: a connection from the pod lands on 15001 with its original destination.
    let listener = pod_ns
        .handle()
        .run(|| TcpListener::bind("0.0.0.0:15001"))
        .unwrap()
        .unwrap();
    let target: SocketAddr = "10.210.0.1:9999".parse().unwrap();
    let _c = pod_ns
        .handle()
        .run(|| TcpStream::connect_timeout(&target, Duration::from_secs(3)))
        .unwrap()
        .expect("redirected to the 15001 listener");
    let (accepted, peer) = listener.accept().unwrap();
    assert_eq!(peer.ip().to_string(), ip);
    let orig = socket2::SockRef::from(&accepted)
        .original_dst_v4()
        .unwrap()
        .as_socket()
        .unwrap();
    assert_eq!(orig, target, "SO_ORIGINAL_DST names the real destination");
    drop(listener);

    // Kubelet probes from the node are SNATed to 169.254.7.127 and reach the app
    // directly (no ztunnel here: anything captured would be refused).
    wait_until("the pod IP in the probe set", || {
        node.node
            .exec(&["nft", "list", "set", "ip", "ambient-host", "probes"])
            .contains(&ip)
    });
    let app = pod_ns
        .handle()
        .run(|| TcpListener::bind("0.0.0.0:8080"))
        .unwrap()
        .unwrap();
    let pod_addr: SocketAddr = format!("{ip}:8080").parse().unwrap();
    let probe = node
        .node
        .handle()
        .run(|| TcpStream::connect_timeout(&pod_addr, Duration::from_secs(3)))
        .unwrap();
    assert!(
        probe.is_ok(),
        "a node-local probe reaches the app: {probe:?}"
    );
    let (_probe_conn, seen_from) = app.accept().unwrap();
    assert_eq!(
        seen_from.ip().to_string(),
        "169.254.7.127",
        "probe source is the SNAT address"
    );
    drop(app);

    // ZDS: a ztunnel gets the pod with an fd that refers to the pod's namespace.
    let zt = zds_client(&node).await;
    match zt.recv().await.unwrap() {
        ZdsEvent::Add { uid, info, netns } => {
            assert_eq!(uid, "u-web");
            assert_eq!(
                (info.namespace.as_str(), info.name.as_str()),
                ("shop", "web")
            );
            assert_eq!(
                netns.inode(),
                pod_ns.handle().inode(),
                "the fd is the pod's netns"
            );
        }
        other => panic!("expected Add, got {other:?}"),
    }
    zt.ack(None).await.unwrap();
    assert!(matches!(zt.recv().await.unwrap(), ZdsEvent::SnapshotSent));
    zt.ack(None).await.unwrap();

    // Unlabel the namespace: rules removed, ztunnel told, nothing left behind.
    node.write(&namespaces(&[], &pod("shop", "web", "u-web")));
    match tokio::time::timeout(Duration::from_secs(10), zt.recv())
        .await
        .unwrap()
        .unwrap()
    {
        ZdsEvent::Del { uid } => assert_eq!(uid, "u-web"),
        other => panic!("expected Del, got {other:?}"),
    }
    zt.ack(None).await.unwrap();
    wait_until("rules removed", || clean(&pod_ns));
    wait_until("the pod IP out of the probe set", || {
        !node
            .node
            .exec(&["nft", "list", "set", "ip", "ambient-host", "probes"])
            .contains(&ip)
    });
    node.runtime.del(&sb).expect("DEL");
    node.agent.as_mut().unwrap().stop(Duration::from_secs(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn labelling_a_namespace_enrols_running_pods_and_agent_restart_reconciles() {
    let mut node = Node::new(211, &namespaces(&[], &pod("plain", "legacy", "u-legacy")));
    let pod_ns = Netns::new("cq");
    let sb = node.sandbox(&pod_ns, "plain", "legacy", "u-legacy");
    node.runtime
        .add(&sb)
        .expect("ADD of a pod outside the mesh");
    assert!(clean(&pod_ns), "not enrolled: no rules");
    // The pod is dual stack: its IPv6 replies need the policy route too.
    pod_ns.exec(&[
        "ip",
        "-6",
        "addr",
        "add",
        "fd00:211::5/64",
        "dev",
        "eth0",
        "nodad",
    ]);
    assert!(has_v6(&pod_ns));

    // Label the namespace: the running pod is enrolled without a restart.
    node.write(&namespaces(&["plain"], &pod("plain", "legacy", "u-legacy")));
    wait_until("live enrolment", || captured(&pod_ns));
    assert!(captured_v6(&pod_ns), "IPv6 policy routing in place");

    // Restart the agent: it forgets the plugin's ADD, finds the namespace the way the
    // kubelet knows it (the pod's process by the pod UID in its cgroup, confirmed by the
    // pod's IP, written back by the runtime), keeps the rules, and hands the pod to
    // ztunnel again.
    let _app = node.run_pod_process(&pod_ns, "u-legacy");
    let result: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            node.dir
                .join(format!("cni-cache/{}-eth0.json", sb.container_id)),
        )
        .unwrap(),
    )
    .unwrap();
    let ip = result_ipv4(&result).unwrap();
    node.write_published(&namespaces(
        &["plain"],
        &format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: legacy, namespace: plain, uid: u-legacy}}\nspec: {{nodeName: node-1}}\nstatus: {{podIP: {ip}}}\n"),
    ));
    node.agent.as_mut().unwrap().kill();
    assert!(captured(&pod_ns), "rules survive the agent");
    node.start_agent();
    let zt = zds_client(&node).await;
    let ev = tokio::time::timeout(Duration::from_secs(15), zt.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(ev, ZdsEvent::Add { ref uid, ref netns, .. } if uid == "u-legacy" && netns.inode() == pod_ns.handle().inode()),
        "{ev:?}"
    );
    zt.ack(None).await.unwrap();
    assert!(captured(&pod_ns));
    // Since the restart the agent knows no container ID for the namespace, so a DEL
    // cannot be told from a late one for a lost sandbox: the capture stays, and the
    // pod's removal from the control plane takes it away.
    node.runtime.del(&sb).unwrap();
    assert!(captured(&pod_ns), "fails closed");
    node.write(&namespaces(&["plain"], ""));
    wait_until("the deleted pod's rules removed", || clean(&pod_ns));
    let _ = zds::Version::V1;
}

/// Every pod a connecting ztunnel is given in the snapshot: (uid, netns inode).
async fn snapshot(node: &Node) -> Vec<(String, u64)> {
    let zt = zds_client(node).await;
    let mut pods = Vec::new();
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(15), zt.recv())
            .await
            .expect("the snapshot in time")
            .unwrap();
        zt.ack(None).await.unwrap();
        match ev {
            ZdsEvent::Add { uid, netns, .. } => pods.push((uid, netns.inode())),
            ZdsEvent::SnapshotSent => return pods,
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_carrying_its_neighbours_ip_never_gets_its_identity() {
    let pods = |ips: Option<(&str, &str)>| {
        let status = |ip: Option<&str>| {
            ip.map(|ip| format!("status: {{podIP: {ip}}}\n"))
                .unwrap_or_default()
        };
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: attacker, namespace: shop, uid: u-attacker}}\nspec: {{nodeName: node-1, serviceAccountName: attacker}}\n{}---\n\
             apiVersion: v1\nkind: Pod\nmetadata: {{name: victim, namespace: shop, uid: u-victim}}\nspec: {{nodeName: node-1, serviceAccountName: victim}}\n{}---\n",
            status(ips.map(|i| i.0)),
            status(ips.map(|i| i.1))
        )
    };
    let mut node = Node::new(213, &namespaces(&["shop"], &pods(None)));
    let a_ns = Netns::new("ca");
    let b_ns = Netns::new("cb");
    let a_sb = node.sandbox(&a_ns, "shop", "attacker", "u-attacker");
    let b_sb = node.sandbox(&b_ns, "shop", "victim", "u-victim");
    let a_ip = result_ipv4(&node.runtime.add(&a_sb).expect("ADD attacker")).unwrap();
    let b_ip = result_ipv4(&node.runtime.add(&b_sb).expect("ADD victim")).unwrap();
    assert!(captured(&a_ns) && captured(&b_ns));
    let _a = node.run_pod_process(&a_ns, "u-attacker");
    let _b = node.run_pod_process(&b_ns, "u-victim");
    node.write(&namespaces(&["shop"], &pods(Some((&a_ip, &b_ip)))));

    // The attacker (NET_ADMIN in its own pod) puts its neighbour's address on its
    // loopback; then the agent restarts and must find both pods' namespaces again (once
    // the control plane has told it their IPs).
    a_ns.exec(&["ip", "addr", "add", &format!("{b_ip}/32"), "dev", "lo"]);
    node.agent.as_mut().unwrap().kill();
    node.start_agent();
    let agent_log = || node.agent.as_ref().unwrap().output();
    wait_until("both pods looked up", || {
        let log = agent_log();
        (log.contains("REFUSED") || log.contains("by its cgroup and IP pod=\"shop/attacker\""))
            && log.contains("by its cgroup and IP pod=\"shop/victim\"")
    });
    let given = snapshot(&node).await;
    let (a_inode, b_inode) = (a_ns.handle().inode(), b_ns.handle().inode());
    assert!(
        given.contains(&("u-victim".to_string(), b_inode)),
        "the victim keeps its own namespace: {given:?}"
    );
    assert!(
        !given
            .iter()
            .any(|(uid, inode)| *inode == a_inode || uid == "u-attacker"),
        "the attacker's namespace matches two pods: refused, never handed over: {given:?}"
    );
    let log = node.agent.as_ref().unwrap().output();
    assert!(
        log.contains("REFUSED to bind a network namespace") && log.contains("shop/attacker"),
        "refused loudly: {log}"
    );
    let metrics = node.metrics();
    assert!(
        metrics.contains("mesh_cni_netns_refused_total{reason=\"foreign_ip\"} 1"),
        "{metrics}"
    );
    // Its rules stay: its traffic is refused, never sent around the mesh.
    assert!(captured(&a_ns));

    // Once it drops the stolen address it is itself again.
    a_ns.exec(&["ip", "addr", "del", &format!("{b_ip}/32"), "dev", "lo"]);
    node.agent.as_mut().unwrap().kill();
    node.start_agent();
    wait_until("both pods found", || {
        let log = node.agent.as_ref().unwrap().output();
        log.contains("by its cgroup and IP pod=\"shop/victim\"")
            && log.contains("by its cgroup and IP pod=\"shop/attacker\"")
    });
    let given = snapshot(&node).await;
    assert!(
        given.contains(&("u-attacker".to_string(), a_inode)),
        "{given:?}"
    );
    assert!(
        given.contains(&("u-victim".to_string(), b_inode)),
        "{given:?}"
    );
    node.runtime.del(&a_sb).unwrap();
    node.runtime.del(&b_sb).unwrap();
}

#[test]
fn malformed_input_gets_cni_error_codes() {
    let bin = binary("mesh-cni");
    let run = |stdin: &str, cmd: &str| {
        let mut child = Command::new(&bin)
            .env_clear()
            .env("CNI_COMMAND", cmd)
            .env("CNI_CONTAINERID", "c")
            .env("CNI_NETNS", "/var/run/netns/none")
            .env("CNI_IFNAME", "eth0")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        (out.status.code(), v)
    };
    let (code, v) = run("{not json", "ADD");
    assert_eq!(code, Some(1));
    assert_eq!(v["code"], 6);
    assert!(v["msg"].as_str().unwrap().contains("not valid JSON"));
    let (_, v) = run(r#"{"cniVersion":"9.9.9","name":"x"}"#, "ADD");
    assert_eq!(v["code"], 1);
    let (_, v) = run(
        r#"{"cniVersion":"1.0.0","name":"x","type":"mesh-cni"}"#,
        "ADD",
    );
    assert_eq!(v["code"], 7, "{v}");
    let (code, v) = run("", "VERSION");
    assert_eq!(code, Some(0));
    assert!(
        v["supportedVersions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s == "0.3.1")
    );
}

#[test]
fn add_fails_closed_when_the_agent_is_unreachable() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let node = Netns::new("cz");
    let pod_ns = Netns::new("cy");
    let runtime = Runtime {
        bin_dirs: vec![
            "/usr/lib/cni".into(),
            binary("mesh-cni").parent().unwrap().to_path_buf(),
        ],
        conflist: node_conflist(
            "lab",
            &unique("br"),
            "10.212.0.0/24",
            "10.212.0.1",
            &dir.join("ipam"),
            &dir.join("missing.sock"),
        ),
        cache_dir: dir.join("cache"),
        run_in_netns: Some(node.name.clone()),
    };
    let sb = Sandbox {
        container_id: "c1".into(),
        netns: pod_ns.path(),
        ifname: "eth0".into(),
        args: "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web".into(),
    };
    let err = runtime.add(&sb).unwrap_err();
    assert_eq!(err.plugin, "mesh-cni", "{err}");
    assert_eq!(err.code, Some(11), "{err}");
    assert!(err.msg.contains("not started unprotected"), "{err}");
    let _ = runtime.del(&sb);
}

/// The agent's read-back on a real namespace: what `program` leaves there is what was
/// planned; a table deleted or a rule added from outside is a named difference.
#[test]
fn rules_read_back_from_a_namespace_match_the_plan_until_changed() {
    require_tool("nft");
    let pod_ns = Netns::new("rb");
    let ns = mesh_cni::agent::netns::Netns::open(&pod_ns.path()).unwrap();
    let opts = mesh_cni::rules::PodRuleOptions::default();
    // Nothing programmed yet: nothing confirmed.
    assert!(mesh_cni::agent::read_back(&ns, &opts).is_err());
    mesh_cni::agent::program(&ns, &opts).unwrap();
    mesh_cni::agent::read_back(&ns, &opts).unwrap();
    // Another plan (DNS capture) does not match these rules.
    let dns = mesh_cni::rules::PodRuleOptions {
        dns_capture: true,
        ..Default::default()
    };
    assert!(mesh_cni::agent::read_back(&ns, &dns).is_err());
    // A rule inserted ahead of the redirects (a bypass) is a difference.
    pod_ns.exec(&[
        "nft",
        "insert",
        "rule",
        "inet",
        "ambient-nat",
        "output",
        "accept",
    ]);
    let e = mesh_cni::agent::read_back(&ns, &opts).unwrap_err();
    assert!(e.contains("chain output in table inet ambient-nat"), "{e}");
    // Re-programming restores the plan; deleting a table is named.
    mesh_cni::agent::program(&ns, &opts).unwrap();
    mesh_cni::agent::read_back(&ns, &opts).unwrap();
    pod_ns.exec(&["nft", "delete", "table", "inet", "ambient-nat"]);
    assert_eq!(
        mesh_cni::agent::read_back(&ns, &opts).unwrap_err(),
        "table inet ambient-nat is missing"
    );
    // The pod's own tables are not ours to compare.
    mesh_cni::agent::program(&ns, &opts).unwrap();
    pod_ns.exec(&["nft", "add", "table", "inet", "app-own"]);
    let baseline = mesh_cni::agent::read_back(&ns, &opts).unwrap();
    // Read again (and after re-programming), the same nft lists the same rules exactly.
    let again = mesh_cni::agent::read_back(&ns, &opts).unwrap();
    mesh_cni::agent::enrolment::compare_baseline(&baseline, &again).unwrap();
    // A redirect narrowed to one port keeps the planned verdicts, not the baseline.
    let listed: serde_json::Value = serde_json::from_str(&pod_ns.exec(&[
        "nft",
        "-j",
        "list",
        "chain",
        "inet",
        "ambient-nat",
        "output",
    ]))
    .unwrap();
    let handle = listed["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .rev()
        .find_map(|i| i["rule"]["handle"].as_u64())
        .unwrap()
        .to_string();
    pod_ns.exec(&[
        "nft",
        "replace",
        "rule",
        "inet",
        "ambient-nat",
        "output",
        "handle",
        &handle,
        "tcp",
        "dport",
        "1",
        "redirect",
        "to",
        ":15001",
    ]);
    let narrowed = mesh_cni::agent::read_back(&ns, &opts).unwrap();
    let e = mesh_cni::agent::enrolment::compare_baseline(&baseline, &narrowed).unwrap_err();
    assert!(e.contains("changed since the pod was programmed"), "{e}");
    // A dormant capture table (all its chains disabled) is a difference.
    pod_ns.exec(&[
        "nft",
        "add",
        "table",
        "inet",
        "ambient-nat",
        "{ flags dormant; }",
    ]);
    let e = mesh_cni::agent::read_back(&ns, &opts).unwrap_err();
    assert!(e.contains("table inet ambient-nat has flags"), "{e}");
    // The policy rule at another preference is not the policy rule.
    mesh_cni::agent::program(&ns, &opts).unwrap();
    pod_ns.exec(&["ip", "rule", "del", "pref", "32764"]);
    pod_ns.exec(&[
        "ip",
        "rule",
        "add",
        "fwmark",
        "0x111/0xfff",
        "pref",
        "32765",
        "lookup",
        "100",
    ]);
    let e = mesh_cni::agent::read_back(&ns, &opts).unwrap_err();
    assert!(e.contains("IPv4 policy rule"), "{e}");
}

/// The guard on a real namespace: with the capture tables deleted from outside, a
/// plaintext client on another host cannot reach the app around ztunnel; ztunnel's
/// HBONE port stays reachable; a pod that bypasses inbound capture has no inbound guard.
#[test]
fn the_guard_refuses_plaintext_inbound_when_the_capture_is_removed() {
    require_tool("nft");
    let pod_ns = Netns::new("gi");
    let peer = Netns::new("gp");
    mesh_e2e::net::veth(&pod_ns, "10.213.0.2/24", &peer, "10.213.0.1/24");
    pod_ns.exec(&["ip", "link", "set", "lo", "up"]);
    let ns = mesh_cni::agent::netns::Netns::open(&pod_ns.path()).unwrap();
    let listen = |port: u16| {
        pod_ns
            .handle()
            .run(move || TcpListener::bind(("0.0.0.0", port)))
            .unwrap()
            .unwrap()
    };
    let connect = |port: u16| {
        let to: SocketAddr = format!("10.213.0.2:{port}").parse().unwrap();
        peer.handle()
            .run(move || TcpStream::connect_timeout(&to, Duration::from_secs(3)))
            .unwrap()
    };
    let _app = listen(8080);
    let _hbone = listen(15008);
    // Unguarded, the app is reachable (the test can see a refusal at all).
    connect(8080).expect("no rules: the app is reachable");

    let opts = mesh_cni::rules::PodRuleOptions::default();
    mesh_cni::agent::program(&ns, &opts).unwrap();
    pod_ns.exec(&["nft", "delete", "table", "inet", "ambient-nat"]);
    let e = connect(8080).expect_err("the guard refuses the app port");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
    connect(15008).expect("HBONE to ztunnel stays reachable");

    let bypass = mesh_cni::rules::PodRuleOptions {
        bypass_inbound: true,
        ..Default::default()
    };
    mesh_cni::agent::program(&ns, &bypass).unwrap();
    mesh_cni::agent::read_back(&ns, &bypass).unwrap();
    connect(8080).expect("inbound capture bypassed: no inbound guard");
    // Removal takes the guard and the capture away together.
    mesh_cni::agent::unprogram(&ns).unwrap();
    let left = pod_ns.exec(&["nft", "list", "tables"]);
    assert!(!left.contains("ambient-"), "{left}");
}

/// After a reboot (or any re-creation of a pod's sandbox) the runtime may release the
/// pod's lost sandbox only after it made the new one: that DEL names the old container
/// and a namespace that is gone. The pod's new sandbox keeps its capture (a DEL that
/// removed it would let the running pod send plaintext until the agent's next pass);
/// the new sandbox's own DEL still removes it.
#[test]
fn a_del_for_a_lost_sandbox_leaves_the_pods_new_sandbox_captured() {
    let node = Node::new(214, &namespaces(&["shop"], &pod("shop", "web", "u-web")));
    let old_ns = Netns::new("co");
    let old = node.sandbox(&old_ns, "shop", "web", "u-web");
    node.runtime.add(&old).expect("ADD of the first sandbox");
    assert!(captured(&old_ns));
    // The node reboots: the first sandbox's namespace is lost, a new one is made.
    drop(old_ns);
    let new_ns = Netns::new("cw");
    let new = node.sandbox(&new_ns, "shop", "web", "u-web");
    node.runtime.add(&new).expect("ADD of the new sandbox");
    assert!(captured(&new_ns));
    // The lost sandbox released only now: DEL succeeds, the new sandbox is untouched.
    node.runtime
        .del(&old)
        .expect("DEL of the lost sandbox succeeds");
    assert!(
        captured(&new_ns),
        "a DEL for the lost sandbox removed the new sandbox's capture: {:?}",
        tables(&new_ns)
    );
    node.runtime.check(&new).expect("CHECK of the new sandbox");
    node.runtime.del(&new).expect("DEL of the new sandbox");
    assert!(clean(&new_ns), "its own DEL removes its capture");
}

/// Whether the agent holds a handle on the namespace with this inode (an open fd).
fn agent_holds(node: &Node, inode: u64) -> bool {
    let pid = node.agent.as_ref().expect("agent running").pid();
    let want = format!("net:[{inode}]");
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .any(|l| l.to_string_lossy() == want)
}

/// A runtime that reuses one namespace path for every sandbox of a pod, and releases the
/// lost sandbox only after making the new one, with the agent restarted in between (so
/// it knows the new namespace by the pod's cgroup, not by ADD): the late DEL names the
/// old container and the path that is now the new sandbox's. The capture stays. A DEL
/// the agent cannot tie to the current sandbox (empty CNI_NETNS) leaves it too; once
/// the pod leaves the control plane's view, its rules go and the agent lets go of its
/// namespace (no record or open handle left behind).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_del_at_a_reused_path_after_an_agent_restart_keeps_the_capture() {
    let mut node = Node::new(215, &namespaces(&["shop"], &pod("shop", "web", "u-web")));
    let pod_ns = Netns::new("cu");
    let old = node.sandbox(&pod_ns, "shop", "web", "u-web");
    node.runtime.add(&old).expect("ADD of the first sandbox");
    assert!(captured(&pod_ns));
    // The node reboots: the namespace is lost, the new sandbox's is made at the same path.
    mesh_e2e::net::run(&["ip", "netns", "del", &pod_ns.name]);
    mesh_e2e::net::run(&["ip", "netns", "add", &pod_ns.name]);
    pod_ns.exec(&["ip", "link", "set", "lo", "up"]);
    let new = Sandbox {
        container_id: format!("{}-2", old.container_id),
        ..old.clone()
    };
    let result = node.runtime.add(&new).expect("ADD of the new sandbox");
    assert!(captured(&pod_ns));
    let inode = pod_ns.handle().inode();
    // The agent restarts: it finds the new namespace by the pod's cgroup and IP.
    let _app = node.run_pod_process(&pod_ns, "u-web");
    let ip = result_ipv4(&result).unwrap();
    node.write_published(&namespaces(
        &["shop"],
        &format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: web, namespace: shop, uid: u-web}}\nspec: {{nodeName: node-1}}\nstatus: {{podIP: {ip}}}\n"),
    ));
    node.agent.as_mut().unwrap().kill();
    node.start_agent();
    let zt = zds_client(&node).await;
    let ev = tokio::time::timeout(Duration::from_secs(15), zt.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(ev, ZdsEvent::Add { ref uid, ref netns, .. } if uid == "u-web" && netns.inode() == inode),
        "{ev:?}"
    );
    zt.ack(None).await.unwrap();
    assert!(agent_holds(&node, inode), "the agent found the namespace");

    // The lost sandbox is released only now, naming the reused path.
    node.runtime
        .del(&old)
        .expect("DEL of the lost sandbox succeeds");
    assert!(
        captured(&pod_ns),
        "a late DEL at a reused path removed the new sandbox's capture: {:?}",
        tables(&pod_ns)
    );
    // A DEL without a namespace: nothing ties it to the current sandbox either.
    let no_netns = Sandbox {
        netns: String::new(),
        ..new.clone()
    };
    node.runtime.del(&no_netns).expect("DEL without CNI_NETNS");
    assert!(
        captured(&pod_ns),
        "fails closed while the pod is in the mesh"
    );

    // The pod is deleted: its rules go and so does the agent's handle on its namespace.
    node.write(&namespaces(&["shop"], ""));
    wait_until("the deleted pod's rules removed", || clean(&pod_ns));
    wait_until("the agent lets go of the deleted pod's namespace", || {
        !agent_holds(&node, inode)
    });
}

/// The agent's own count of ztunnels taking new pods.
fn serving_ztunnels(node: &Node) -> Option<u64> {
    node.metrics()
        .lines()
        .find_map(|l| l.strip_prefix("mesh_cni_ztunnel_connections{state=\"serving\"} "))
        .and_then(|n| n.trim().parse().ok())
}

/// One ztunnel that takes the ZDS connection and then never answers holds up no CNI
/// ADD: the agent sends ZDS messages after releasing its pod lock, so while it still
/// waits for the ack of one pod's Add (its connection to that ztunnel still open; it
/// gives up after its 5 s ack timeout), ADDs for that pod and for others have completed
/// with their rules in place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ztunnel_that_never_acks_holds_up_no_cni_add() {
    let pods = format!("{}{}", pod("shop", "a", "u-a"), pod("shop", "b", "u-b"));
    let node = Node::new(216, &namespaces(&["shop"], &pods));
    // A ztunnel takes the (empty) snapshot, then goes silent.
    let zt = zds_client(&node).await;
    assert!(matches!(zt.recv().await.unwrap(), ZdsEvent::SnapshotSent));
    zt.ack(None).await.unwrap();
    wait_until("the agent serves the ztunnel", || {
        serving_ztunnels(&node) == Some(1)
    });

    let ns_a = Netns::new("ca");
    let sb_a = node.sandbox(&ns_a, "shop", "a", "u-a");
    node.runtime.add(&sb_a).expect("ADD of pod a");
    assert!(captured(&ns_a));
    // The ztunnel got a's Add and sits on it.
    match zt.recv().await.unwrap() {
        ZdsEvent::Add { uid, .. } => assert_eq!(uid, "u-a"),
        other => panic!("expected Add, got {other:?}"),
    }
    let ns_b = Netns::new("cb");
    let sb_b = node.sandbox(&ns_b, "shop", "b", "u-b");
    node.runtime
        .add(&sb_b)
        .expect("ADD of pod b while the ztunnel sits on a's Add");
    assert!(captured(&ns_b));
    assert_eq!(
        serving_ztunnels(&node),
        Some(1),
        "both ADDs completed while the agent still waited for a's ack on an open connection"
    );
    // The agent gives up on the silent ztunnel (its ack timeout), and says so.
    wait_until("the silent ztunnel dropped", || {
        serving_ztunnels(&node) == Some(0)
    });
    drop(zt);
    node.runtime.del(&sb_b).expect("DEL of pod b");
    node.runtime.del(&sb_a).expect("DEL of pod a");
    assert!(clean(&ns_a) && clean(&ns_b));
}

/// The agent's `mesh_cni_zds_queue_depth`.
fn zds_queue_depth(node: &Node) -> u64 {
    node.metrics()
        .lines()
        .find_map(|l| l.strip_prefix("mesh_cni_zds_queue_depth "))
        .and_then(|n| n.trim().parse().ok())
        .expect("mesh_cni_zds_queue_depth exported")
}

/// Namespace handles the agent holds open (files on nsfs, whichever path opened them).
fn agent_netns_fds(node: &Node) -> usize {
    use std::os::unix::fs::MetadataExt;
    let nsfs = std::fs::metadata("/proc/self/ns/net").unwrap().dev();
    let pid = node.agent.as_ref().expect("agent running").pid();
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::metadata(e.ok()?.path()).ok())
        .filter(|m| m.dev() == nsfs)
        .count()
}

/// A ztunnel that takes seconds to ack each message keeps the agent's ZDS sender busy;
/// a pod's ADD/DEL cycles meanwhile leave at most one message queued for it (a later Del
/// replaces a queued Add) and no namespace handle held for a queued Add (it is
/// duplicated from the pod's record only when sent).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_ztunnel_keeps_the_zds_queue_and_the_agents_fds_bounded() {
    let node = Node::new(217, &namespaces(&["shop"], &pod("shop", "c", "u-c")));
    let zt = zds_client(&node).await;
    assert!(matches!(zt.recv().await.unwrap(), ZdsEvent::SnapshotSent));
    zt.ack(None).await.unwrap();
    wait_until("the agent serves the ztunnel", || {
        serving_ztunnels(&node) == Some(1)
    });
    // Acks each message 3 s late (within the agent's 5 s ack timeout).
    let slow = tokio::spawn(async move {
        while let Ok(ev) = zt.recv().await {
            drop(ev);
            tokio::time::sleep(Duration::from_secs(3)).await;
            if zt.ack(None).await.is_err() {
                break;
            }
        }
    });
    // The agent's own (its node's namespace, if any), before any pod.
    let own = agent_netns_fds(&node);
    let (mut queued, mut held) = (0, 0);
    for _ in 0..16 {
        let ns = Netns::new("cq");
        let sb = node.sandbox(&ns, "shop", "c", "u-c");
        node.runtime.add(&sb).expect("ADD");
        assert!(captured(&ns));
        node.runtime.del(&sb).expect("DEL");
        queued = queued.max(zds_queue_depth(&node));
        held = held.max(agent_netns_fds(&node));
    }
    slow.abort();
    assert!(queued <= 1, "{queued} messages queued for one pod");
    assert!(
        // An Add in flight holds two (its pod's handle and the copy on its way to
        // ztunnel), and one may be finishing as the next starts: a constant, never one
        // per cycle (each queued Add held one before).
        held <= own + 4,
        "the agent held {held} namespace handles after the DELs ({own} of its own)"
    );
}
