//! Two simulated nodes, one pod each, with redirect rules in the pods' namespaces and a
//! ztunnel per node, configured either from a local file or by a real mesh-control.

use crate::net::{Netns, veth};
use crate::proc::Proc;
use crate::{binary, require_tool};
use mesh_identity::ca::CertificateAuthority;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const POD_A: &str = "10.201.1.2";
pub const POD_B: &str = "10.201.2.2";
pub const NODE1_FABRIC: &str = "10.200.0.1";
pub const NODE2_FABRIC: &str = "10.200.0.2";
const TOKENS: [&str; 2] = ["lab-node-1-token-4f9a2c71", "lab-node-2-token-8b3e6d02"];

/// Where the ztunnels get their configuration.
pub enum Control {
    /// `--local-config` with this YAML (workloads/services/policies).
    Local(String),
    /// A mesh-control in node 1's namespace, reading these Kubernetes manifests.
    Plane(String),
    /// No mesh at all: the same nodes and pods, no redirect rules, no ztunnel (the
    /// direct path benchmarks compare against).
    None,
}

pub struct Cluster {
    pub control: Option<Proc>,
    pub dir: PathBuf,
    pub config: PathBuf,
    // Drop order: processes before namespaces.
    pub ztunnels: Vec<Option<Proc>>,
    pub link: String,
    pub node1: Netns,
    pub node2: Netns,
    pub pod_a: Netns,
    pub pod_b: Netns,
    plane: bool,
    /// Extra arguments for every ztunnel.
    ztunnel_args: Vec<String>,
}

/// The redirection the node agent programs, applied by the agent's own code.
pub fn pod_rules(pod: &Netns) {
    let ns = mesh_cni::agent::netns::Netns::open(&pod.path()).unwrap();
    mesh_cni::agent::redirect::apply(&ns, &Default::default()).unwrap();
}

pub fn base_config(extra_policies: &str, b_policies: &str) -> String {
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
    pub fn new(control: Control) -> Self {
        Self::with_ztunnel_args(control, &[])
    }

    /// As [`Cluster::new`], each ztunnel started with `extra` arguments too.
    pub fn with_ztunnel_args(control: Control, extra: &[&str]) -> Self {
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
        let mesh = !matches!(control, Control::None);
        if mesh {
            pod_rules(&pod_a);
            pod_rules(&pod_b);
        }

        let dir = std::env::temp_dir().join(format!("{}-state", node1.name));
        std::fs::create_dir_all(dir.join("ca")).unwrap();
        let ca =
            CertificateAuthority::new_root("cluster.local", Duration::from_secs(86400)).unwrap();
        std::fs::write(dir.join("ca/ca-cert.pem"), ca.cert_pem()).unwrap();
        mesh_identity::write_private(&dir.join("ca/ca-key.pem"), ca.key_pem().as_bytes()).unwrap();
        let (config_path, plane) = match &control {
            Control::Local(config) => {
                let p = dir.join("mesh.yaml");
                std::fs::write(&p, config).unwrap();
                (p, false)
            }
            Control::Plane(manifests) => {
                std::fs::create_dir_all(dir.join("manifests")).unwrap();
                let p = dir.join("manifests/mesh.yaml");
                std::fs::write(&p, manifests).unwrap();
                (p, true)
            }
            Control::None => (dir.join("unused"), false),
        };
        let mut c = Cluster {
            control: None,
            plane,
            dir,
            config: config_path,
            ztunnels: vec![None, None],
            link,
            node1,
            node2,
            pod_a,
            pod_b,
            ztunnel_args: extra.iter().map(|a| a.to_string()).collect(),
        };
        if plane {
            c.start_control();
        }
        if mesh {
            c.start_ztunnel(0);
            c.start_ztunnel(1);
        }
        c
    }

    /// Starts mesh-control in node 1's namespace on the node link.
    pub fn start_control(&mut self) {
        let tokens = self.dir.join("tokens.yaml");
        std::fs::write(
            &tokens,
            format!(
                "tokens:\n- {{token: {}, node: node-1}}\n- {{token: {}, node: node-2}}\n",
                TOKENS[0], TOKENS[1]
            ),
        )
        .unwrap();
        for (i, t) in TOKENS.iter().enumerate() {
            std::fs::write(self.dir.join(format!("token-{i}")), t).unwrap();
        }
        let log = self.dir.join("control.log");
        let bin = binary("mesh-control");
        let p = Proc::spawn(
            Some(&self.node1.name),
            &[
                bin.to_str().unwrap(),
                "--config-dir",
                self.dir.join("manifests").to_str().unwrap(),
                "--state-dir",
                self.dir.join("control-state").to_str().unwrap(),
                "--tokens",
                tokens.to_str().unwrap(),
                "--listen",
                &format!("{NODE1_FABRIC}:15012"),
                "--dns-name",
                "mesh-control.lab",
                "--ip-san",
                NODE1_FABRIC,
            ],
            &log,
        );
        assert!(
            p.wait_for("serving xDS and CA", Duration::from_secs(10)),
            "mesh-control did not start: {}",
            p.output()
        );
        self.control = Some(p);
    }

    pub fn start_ztunnel(&mut self, i: usize) {
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
        let node_name = format!("node-{}", i + 1);
        let mut args: Vec<String> = vec![
            zt.to_str().unwrap().into(),
            "--node-name".into(),
            node_name,
            "--pods-file".into(),
            pods.to_str().unwrap().into(),
            "--log-level".into(),
            "info,access=debug".into(),
            "--drain-deadline".into(),
            "1s".into(),
        ];
        if self.plane {
            args.extend([
                "--xds-address".into(),
                format!("https://{NODE1_FABRIC}:15012"),
                "--root-cert".into(),
                self.dir
                    .join("control-state/root-cert.pem")
                    .to_str()
                    .unwrap()
                    .into(),
                "--control-hostname".into(),
                "mesh-control.lab".into(),
                "--token-file".into(),
                self.dir.join(format!("token-{i}")).to_str().unwrap().into(),
            ]);
        } else {
            args.extend([
                "--local-config".into(),
                self.config.to_str().unwrap().into(),
                "--local-ca".into(),
                self.dir.join("ca").to_str().unwrap().into(),
            ]);
        }
        args.extend(self.ztunnel_args.iter().cloned());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let p = Proc::spawn(Some(&node.name), &args, &log);
        assert!(
            p.wait_for("pod proxy started", Duration::from_secs(10)),
            "ztunnel {i} did not start: {}",
            p.output()
        );
        self.ztunnels[i] = Some(p);
    }

    /// Waits until ztunnel `i`'s log contains `needle`; panics with the log otherwise.
    pub fn wait_log(&self, i: usize, needle: &str) {
        let ok = (0..100).any(|_| {
            if self.ztunnel_log(i).contains(needle) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
            false
        });
        assert!(
            ok,
            "ztunnel {i} never logged {needle:?}:\n{}",
            self.ztunnel_log(i)
        );
    }

    pub fn ztunnel_log(&self, i: usize) -> String {
        self.ztunnels[i]
            .as_ref()
            .map(|p| p.output())
            .unwrap_or_default()
    }

    pub fn set_config(&self, config: &str) {
        std::fs::write(&self.config, config).unwrap();
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.ztunnels.clear();
        self.control = None;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A TCP server inside `ns` that echoes each connection, prefixed with `tag`, and reports
/// the peer address it saw on the first line.
pub fn echo_server(ns: &Netns, addr: &str, tag: &'static str) -> std::thread::JoinHandle<()> {
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
pub fn talk(ns: &Netns, to: &str, msg: &str) -> std::io::Result<String> {
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

pub struct Capture {
    proc: Proc,
    file: PathBuf,
}

pub fn capture(ns: &Netns, iface: &str, dir: &Path) -> Capture {
    capture_in(&ns.name, iface, dir, iface, "tcp")
}

/// Captures `filter` on `iface` in namespace `ns` into `<dir>/<name>.pcap`.
pub fn capture_in(ns: &str, iface: &str, dir: &Path, name: &str, filter: &str) -> Capture {
    capture_in_snaplen(ns, iface, dir, name, filter, 0)
}

/// [`capture_in`], keeping only the first `snaplen` bytes of each packet (0: all of
/// it): a long bulk transfer stays small on disk.
pub fn capture_in_snaplen(
    ns: &str,
    iface: &str,
    dir: &Path,
    name: &str,
    filter: &str,
    snaplen: u32,
) -> Capture {
    require_tool("tcpdump");
    let snaplen = snaplen.to_string();
    let file = dir.join(format!("{name}.pcap"));
    let proc = Proc::spawn(
        Some(ns),
        &[
            "tcpdump",
            "-i",
            iface,
            "--immediate-mode",
            "-U",
            "-n",
            "-s",
            &snaplen,
            "-w",
            file.to_str().unwrap(),
            filter,
        ],
        &dir.join(format!("{name}.tcpdump.log")),
    );
    assert!(
        proc.wait_for("listening on", Duration::from_secs(5)),
        "tcpdump: {}",
        proc.output()
    );
    Capture { proc, file }
}

impl Capture {
    /// tcpdump is still capturing (it did not exit on its own).
    pub fn running(&mut self) -> bool {
        self.proc.running()
    }

    pub fn finish(mut self) -> (Vec<u8>, String) {
        std::thread::sleep(Duration::from_millis(300));
        self.proc.stop(Duration::from_secs(2));
        let bytes = std::fs::read(&self.file).unwrap_or_else(|e| {
            panic!(
                "capture {}: {e}; tcpdump said: {}",
                self.file.display(),
                self.proc.output()
            )
        });
        let summary = crate::net::run(&["tcpdump", "-r", self.file.to_str().unwrap(), "-nn", "-q"]);
        (bytes, summary)
    }
}

pub fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

/// Polls `f` for up to 10 s.
pub fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..100 {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out waiting for {what}");
}
