//! ztunnel on two simulated nodes, one pod each, redirect rules in the pods' namespaces:
//! real kernel redirection, real TLS between the nodes. Needs root (CI runs as root).

use mesh_e2e::net::{Netns, veth};
use mesh_e2e::proc::Proc;
use mesh_e2e::{binary, require_tool};
use mesh_identity::ca::CertificateAuthority;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

const POD_A: &str = "10.201.1.2";
const POD_B: &str = "10.201.2.2";
const NODE2_FABRIC: &str = "10.200.0.2";

struct Cluster {
    dir: PathBuf,
    config: PathBuf,
    // Drop order: processes before namespaces.
    ztunnels: Vec<Option<Proc>>,
    link: String,
    node1: Netns,
    node2: Netns,
    pod_a: Netns,
    pod_b: Netns,
}

fn pod_rules(pod: &Netns) {
    let script = mesh_cni::rules::pod_ruleset(&Default::default());
    let path = std::env::temp_dir().join(format!("{}.nft", pod.name));
    std::fs::write(&path, script).unwrap();
    pod.exec(&["nft", "-f", path.to_str().unwrap()]);
    let _ = std::fs::remove_file(path);
    pod.exec(&[
        "ip",
        "rule",
        "add",
        "fwmark",
        "0x111/0xfff",
        "pref",
        "32764",
        "lookup",
        "100",
    ]);
    pod.exec(&[
        "ip",
        "route",
        "add",
        "local",
        "0.0.0.0/0",
        "dev",
        "lo",
        "table",
        "100",
    ]);
}

fn base_config(extra_policies: &str, b_policies: &str) -> String {
    format!(
        r#"
workloads:
  - name: client
    namespace: front
    serviceAccount: web
    addresses: ["{POD_A}"]
    node: node-1
    protocol: HBONE
  - name: server
    namespace: back
    serviceAccount: api
    addresses: ["{POD_B}"]
    node: node-2
    protocol: HBONE
    authorizationPolicies: [{b_policies}]
policies:
{extra_policies}
"#
    )
}

impl Cluster {
    fn new(config: &str) -> Self {
        require_tool("nft");
        let node1 = Netns::new("n1");
        let node2 = Netns::new("n2");
        let pod_a = Netns::new("pa");
        let pod_b = Netns::new("pb");
        let (link, _) = veth(&node1, "10.200.0.1/30", &node2, "10.200.0.2/30");
        let (_, a_eth) = veth(&node1, "10.201.1.1/24", &pod_a, &format!("{POD_A}/24"));
        let (_, b_eth) = veth(&node2, "10.201.2.1/24", &pod_b, &format!("{POD_B}/24"));
        let _ = (a_eth, b_eth);
        for n in [&node1, &node2] {
            n.sysctl("net.ipv4.ip_forward", "1");
        }
        node1.exec(&["ip", "route", "add", "10.201.2.0/24", "via", "10.200.0.2"]);
        node2.exec(&["ip", "route", "add", "10.201.1.0/24", "via", "10.200.0.1"]);
        pod_a.exec(&["ip", "route", "add", "default", "via", "10.201.1.1"]);
        pod_b.exec(&["ip", "route", "add", "default", "via", "10.201.2.1"]);
        pod_rules(&pod_a);
        pod_rules(&pod_b);

        let dir = std::env::temp_dir().join(format!("{}-state", node1.name));
        std::fs::create_dir_all(dir.join("ca")).unwrap();
        let ca =
            CertificateAuthority::new_root("cluster.local", Duration::from_secs(86400)).unwrap();
        std::fs::write(dir.join("ca/ca-cert.pem"), ca.cert_pem()).unwrap();
        std::fs::write(dir.join("ca/ca-key.pem"), ca.key_pem()).unwrap();
        let config_path = dir.join("mesh.yaml");
        std::fs::write(&config_path, config).unwrap();
        let mut c = Cluster {
            dir,
            config: config_path,
            ztunnels: vec![None, None],
            link,
            node1,
            node2,
            pod_a,
            pod_b,
        };
        c.start_ztunnel(0);
        c.start_ztunnel(1);
        c
    }

    fn start_ztunnel(&mut self, i: usize) {
        let (node, pod, uid, name, ns, sa) = if i == 0 {
            (&self.node1, &self.pod_a, "uid-a", "client", "front", "web")
        } else {
            (&self.node2, &self.pod_b, "uid-b", "server", "back", "api")
        };
        let pods = self.dir.join(format!("pods-{i}.yaml"));
        std::fs::write(
            &pods,
            format!(
                "pods:\n  - {{uid: {uid}, name: {name}, namespace: {ns}, serviceAccount: {sa}, netns: {}}}\n",
                pod.path()
            ),
        )
        .unwrap();
        let log = self.dir.join(format!("ztunnel-{i}.log"));
        let zt = binary("ztunnel");
        let p = Proc::spawn(
            Some(&node.name),
            &[
                zt.to_str().unwrap(),
                "--node-name",
                &format!("node-{}", i + 1),
                "--local-config",
                self.config.to_str().unwrap(),
                "--local-ca",
                self.dir.join("ca").to_str().unwrap(),
                "--pods-file",
                pods.to_str().unwrap(),
                "--log-level",
                "info,access=debug",
                "--drain-deadline",
                "1s",
            ],
            &log,
        );
        assert!(
            p.wait_for("pod proxy started", Duration::from_secs(10)),
            "ztunnel {i} did not start: {}",
            p.output()
        );
        self.ztunnels[i] = Some(p);
    }

    fn ztunnel_log(&self, i: usize) -> String {
        self.ztunnels[i]
            .as_ref()
            .map(|p| p.output())
            .unwrap_or_default()
    }

    fn set_config(&self, config: &str) {
        std::fs::write(&self.config, config).unwrap();
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.ztunnels.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A TCP server inside `ns` that echoes each connection, prefixed with `tag`, and reports
/// the peer address it saw on the first line.
fn echo_server(ns: &Netns, addr: &str, tag: &'static str) -> std::thread::JoinHandle<()> {
    let listener = ns
        .handle()
        .run(|| TcpListener::bind(addr))
        .unwrap()
        .unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut s) = conn else { return };
            std::thread::spawn(move || {
                let peer = s
                    .peer_addr()
                    .map(|a| a.ip().to_string())
                    .unwrap_or_default();
                let _ = s.write_all(format!("{tag} peer={peer}\n").as_bytes());
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    })
}

/// Connects from inside `ns` (so the pod's redirect rules apply), sends `msg`, half-closes,
/// and returns everything the server answered.
fn talk(ns: &Netns, to: &str, msg: &str) -> std::io::Result<String> {
    let to: SocketAddr = to.parse().unwrap();
    let mut s = ns
        .handle()
        .run(|| TcpStream::connect_timeout(&to, Duration::from_secs(5)))??;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(msg.as_bytes())?;
    s.shutdown(std::net::Shutdown::Write)?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    if out.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "closed without an answer",
        ));
    }
    Ok(out)
}

struct Capture {
    proc: Proc,
    file: PathBuf,
}

fn capture(ns: &Netns, iface: &str, dir: &Path) -> Capture {
    require_tool("tcpdump");
    let file = dir.join(format!("{iface}.pcap"));
    let proc = Proc::spawn(
        Some(&ns.name),
        &[
            "tcpdump",
            "-i",
            iface,
            "--immediate-mode",
            "-U",
            "-n",
            "-s",
            "0",
            "-w",
            file.to_str().unwrap(),
            "tcp",
        ],
        &dir.join(format!("{iface}.tcpdump.log")),
    );
    assert!(
        proc.wait_for("listening on", Duration::from_secs(5)),
        "tcpdump: {}",
        proc.output()
    );
    Capture { proc, file }
}

impl Capture {
    fn finish(mut self) -> (Vec<u8>, String) {
        std::thread::sleep(Duration::from_millis(300));
        self.proc.stop(Duration::from_secs(2));
        let bytes = std::fs::read(&self.file).unwrap_or_else(|e| {
            panic!(
                "capture {}: {e}; tcpdump said: {}",
                self.file.display(),
                self.proc.output()
            )
        });
        let summary =
            mesh_e2e::net::run(&["tcpdump", "-r", self.file.to_str().unwrap(), "-nn", "-q"]);
        (bytes, summary)
    }
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

#[test]
fn pod_to_pod_over_hbone_shows_only_tls_on_the_wire() {
    let c = Cluster::new(&base_config("  []", ""));
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
    std::thread::sleep(Duration::from_millis(300));
    let log_b = c.ztunnel_log(1);
    assert!(
        log_b.contains("src.identity=spiffe://cluster.local/ns/front/sa/web"),
        "inbound access log lacks the client identity:\n{log_b}"
    );
    let log_a = c.ztunnel_log(0);
    assert!(
        log_a.contains("dst.identity=spiffe://cluster.local/ns/back/sa/api"),
        "{log_a}"
    );
}

#[test]
fn non_mesh_destination_is_passed_through_in_plaintext() {
    let c = Cluster::new(&base_config("  []", ""));
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
    let c = Cluster::new(&base_config(policy, ""));
    let _ok = echo_server(&c.pod_b, "0.0.0.0:8080", "open");
    let _denied = echo_server(&c.pod_b, "0.0.0.0:8081", "denied");
    assert!(
        talk(&c.pod_a, &format!("{POD_B}:8080"), "hi")
            .unwrap()
            .starts_with("open")
    );
    let err = talk(&c.pod_a, &format!("{POD_B}:8081"), "hi");
    assert!(err.is_err(), "port 8081 must be refused, got {err:?}");
    std::thread::sleep(Duration::from_millis(300));
    let log_b = c.ztunnel_log(1);
    assert!(
        log_b.contains("connection denied by authorization policy")
            && log_b.contains("policy=back/deny-8081"),
        "denial not logged with its policy:\n{log_b}"
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
    let c = Cluster::new(&permissive);
    let _server = echo_server(&c.pod_b, "0.0.0.0:8080", "server-b");
    // Plaintext from node 2 (not in the mesh) is captured to 15006 and accepted...
    let plain = talk(&c.node2, &format!("{POD_B}:8080"), "x").unwrap();
    assert!(plain.starts_with("server-b peer=10.201.2.1"), "{plain}");
    // ...until STRICT applies to the workload.
    c.set_config(&base_config(
        strict,
        "\"istio-system/istio_converted_static_strict\"",
    ));
    std::thread::sleep(Duration::from_millis(1000));
    assert!(
        talk(&c.node2, &format!("{POD_B}:8080"), "x").is_err(),
        "plaintext must be refused under STRICT"
    );
    assert!(
        talk(&c.pod_a, &format!("{POD_B}:8080"), "x")
            .unwrap()
            .starts_with("server-b"),
        "mTLS still works"
    );
}

#[test]
fn policy_change_closes_open_connections() {
    let c = Cluster::new(&base_config("  []", ""));
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
    // The open connection is closed by ztunnel once the new policy applies.
    let mut buf = [0u8; 64];
    let closed = (0..40).any(|_| {
        let _ = s.write_all(b"ping");
        std::thread::sleep(Duration::from_millis(100));
        matches!(s.read(&mut buf), Ok(0) | Err(_))
    });
    assert!(closed, "connection survived a policy that denies it");
}

#[test]
fn ztunnel_down_means_refused_never_plaintext() {
    let mut c = Cluster::new(&base_config("  []", ""));
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
