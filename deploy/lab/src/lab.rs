//! A lab cluster: nodes are network namespaces on a shared fabric (a bridge in a
//! lab-owned namespace), pods are network namespaces attached by the reference bridge +
//! host-local CNI plugins with mesh-cni chained, and every component runs for real:
//! one mesh-control (directory mode), and per node a ztunnel and a node agent.
//!
//! Everything the lab makes is named `<lab>-...` and recorded in its state directory, so
//! `down` removes it all, even after a crash or `kill -9` of the CLI.

use crate::cgroup::PodCgroups;
use crate::cni_runtime::{
    Runtime, Sandbox, loopback_conf, node_conflist, result_ipv4, result_ipv6, with_ipv6_range,
};
use crate::ip_family::{
    IpFamily, control_listen, ipv6_only_range, pod_addresses, pod_control_address, pod_ips,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub const DEFAULT_ROOT: &str = "/var/run/mesh-lab";
const FABRIC_NET: &str = "10.100.0";
/// IPv6 prefixes of dual-stack labs (unique local addresses: nothing leaves the lab).
const FABRIC_NET6: &str = "fd00:100";
const POD_NET6: &str = "fd00:10:244";
const CONTROL_NAME: &str = "mesh-control.lab";

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct State {
    pub nodes: usize,
    pub procs: Vec<ProcEntry>,
    pub pods: BTreeMap<String, PodEntry>,
    pub next_vip: u8,
    /// Prometheus runs and its target files are kept current (`up --observe`).
    #[serde(default)]
    pub observe: bool,
    /// Pods get an IPv6 address beside their IPv4 one.
    #[serde(default)]
    pub dual_stack: bool,
    /// Pods get an IPv6 address only (`up --ip-family ipv6`).
    #[serde(default)]
    pub ipv6_only: bool,
}

impl State {
    /// The family of the lab's pod network.
    pub fn family(&self) -> IpFamily {
        if self.ipv6_only {
            IpFamily::Ipv6
        } else if self.dual_stack {
            IpFamily::DualStack
        } else {
            IpFamily::Ipv4
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProcEntry {
    pub role: String,
    pub pid: u32,
    pub log: PathBuf,
    /// Where this process's output starts in its (appended) log.
    #[serde(default)]
    pub log_offset: u64,
    /// A ztunnel's generation on its node and its ports (`upgrade`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ztunnel: Option<crate::upgrade::ZtunnelRun>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PodEntry {
    pub namespace: String,
    pub name: String,
    pub node: usize,
    pub netns: String,
    pub container_id: String,
    /// The pod's primary address (`status.podIP`): IPv6 in an IPv6-only lab.
    pub ip: String,
    /// The pod's IPv6 address (dual-stack and IPv6-only labs).
    #[serde(default)]
    pub ip6: Option<String>,
    pub uid: String,
    /// A waypoint's pod (scraped by the lab's Prometheus).
    #[serde(default)]
    pub waypoint: bool,
}

pub struct Lab {
    pub name: String,
    pub dir: PathBuf,
    /// Where ztunnel, mesh-control, mesh-cni and mesh-lab binaries are.
    pub bin_dir: PathBuf,
    pub cni_bin_dir: PathBuf,
    pub state: State,
}

pub(crate) fn run(args: &[&str]) -> Result<String, String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("cannot run {}: {e}", args[0]))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "`{}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

pub(crate) fn ns_exec(ns: &str, args: &[&str]) -> Result<String, String> {
    let mut full = vec!["ip", "netns", "exec", ns];
    full.extend_from_slice(args);
    run(&full)
}

fn ns_exec_stdin(ns: &str, args: &[&str], stdin: &str) -> Result<(), String> {
    use std::io::Write;
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(stdin.as_bytes())
        .map_err(|e| e.to_string())?;
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`{}` in {ns}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn netns_exists(name: &str) -> bool {
    Path::new("/var/run/netns").join(name).exists()
}

pub(crate) fn random_hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        use std::io::Read;
        let _ = f.read_exact(&mut b);
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl Lab {
    /// Opens (or prepares) the lab called `name` under `root`, with the mesh's binaries
    /// next to the running executable.
    pub fn open(name: &str, root: &Path) -> Result<Lab, String> {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let bin_dir = exe.parent().ok_or("no binary directory")?.to_path_buf();
        Self::open_with_binaries(name, root, &bin_dir)
    }

    pub fn open_with_binaries(name: &str, root: &Path, bin_dir: &Path) -> Result<Lab, String> {
        if name.is_empty()
            || name.len() > 12
            || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(format!(
                "lab name {name:?}: use 1-12 letters, digits or '-'"
            ));
        }
        let bin_dir = bin_dir.to_path_buf();
        let dir = root.join(name);
        let state = std::fs::read_to_string(dir.join("state.json"))
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or_default();
        Ok(Lab {
            name: name.to_string(),
            dir,
            bin_dir,
            cni_bin_dir: PathBuf::from("/usr/lib/cni"),
            state,
        })
    }

    pub(crate) fn save(&self) -> Result<(), String> {
        std::fs::create_dir_all(&self.dir).map_err(|e| e.to_string())?;
        let tmp = self.dir.join("state.json.tmp");
        std::fs::write(
            &tmp,
            serde_json::to_vec_pretty(&self.state).map_err(|e| e.to_string())?,
        )
        .map_err(|e| e.to_string())?;
        std::fs::rename(&tmp, self.dir.join("state.json")).map_err(|e| e.to_string())?;
        // Every change of components or pods passes here: Prometheus's targets follow.
        if self.state.observe {
            crate::prometheus::write_targets(&self.prometheus_dir(), &self.state)?;
        }
        Ok(())
    }

    fn prometheus_dir(&self) -> PathBuf {
        self.dir.join("prometheus")
    }

    /// Runs the lab's Prometheus (idempotent): its configuration and target files in the
    /// state directory, the process in node 1's namespace on loopback
    /// (`prometheus::LISTEN`). Waits until it serves.
    pub fn start_prometheus(&mut self) -> Result<(), String> {
        if !self.is_up() {
            return Err(format!("lab {} is not up", self.name));
        }
        if self
            .process("prometheus")
            .is_some_and(|p| Path::new(&format!("/proc/{}", p.pid)).exists() && !is_zombie(p.pid))
        {
            return Ok(());
        }
        let dir = self.prometheus_dir();
        std::fs::create_dir_all(dir.join("data")).map_err(|e| e.to_string())?;
        std::fs::write(
            dir.join("prometheus.yml"),
            crate::prometheus::config(&dir.join("targets")),
        )
        .map_err(|e| e.to_string())?;
        self.state.observe = true;
        self.save()?;
        let mut args = crate::prometheus::command(&dir);
        args[0] = which("prometheus").ok_or(
            "prometheus is not installed: run scripts/install-deps.sh (Debian package prometheus)",
        )?;
        self.state.procs.retain(|p| p.role != "prometheus");
        self.spawn("prometheus", &self.node_ns(1), &args)?;
        self.wait_log(
            "prometheus",
            "Server is ready to receive web requests",
            Duration::from_secs(30),
        )?;
        self.start_trace_receiver()
    }

    /// Runs the lab's dashboard with its OTLP trace receiver (idempotent), then restarts
    /// the ztunnels started before observe was on, so that they export to it (waypoints
    /// get the endpoint when made: apply them after `up --observe`).
    pub fn start_trace_receiver(&mut self) -> Result<(), String> {
        if !self.running("dashboard") {
            let args = crate::traces::dashboard_command(&self.bin("meshctl"), &Self::node_ip(1));
            self.state.procs.retain(|p| p.role != "dashboard");
            self.spawn("dashboard", &self.node_ns(1), &args)?;
            self.wait_log(
                "dashboard",
                "receiving traces over OTLP/gRPC",
                Duration::from_secs(15),
            )?;
        }
        for i in 1..=self.state.nodes {
            let role = format!("ztunnel-{i}");
            let Some(p) = self.process(&role) else {
                continue;
            };
            let environ = std::fs::read(format!("/proc/{}/environ", p.pid)).unwrap_or_default();
            if crate::traces::has_endpoint(&environ) {
                continue;
            }
            let pid = p.pid;
            self.stop(&role, false)?;
            // It drains its connections first (up to its drain deadline); the new one
            // needs its ports.
            let deadline = Instant::now() + Duration::from_secs(10);
            while Path::new(&format!("/proc/{pid}")).exists()
                && !is_zombie(pid)
                && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(100));
            }
            if Path::new(&format!("/proc/{pid}")).exists() && !is_zombie(pid) && self.owns(pid) {
                let _ = run(&["kill", "-KILL", &pid.to_string()]);
            }
            self.start_ztunnel(i)?;
            self.wait_log(&role, "xDS connected", Duration::from_secs(15))?;
        }
        Ok(())
    }

    /// Whether the process recorded for `role` runs.
    fn running(&self, role: &str) -> bool {
        self.process(role)
            .is_some_and(|p| Path::new(&format!("/proc/{}", p.pid)).exists() && !is_zombie(p.pid))
    }

    pub fn fabric_ns(&self) -> String {
        format!("{}-fabric", self.name)
    }
    pub fn node_ns(&self, i: usize) -> String {
        format!("{}-node{i}", self.name)
    }
    /// The start of the names of pod `ns/name`'s sandbox namespaces (each adds its own).
    fn pod_ns(&self, ns: &str, name: &str) -> String {
        format!("{}-pod-{ns}-{name}", self.name)
    }
    pub fn node_ip(i: usize) -> String {
        format!("{FABRIC_NET}.{}", 10 + i)
    }
    fn pod_cidr(i: usize) -> String {
        format!("10.244.{i}.0/24")
    }
    /// Node `i`'s IPv6 address on the fabric (dual-stack labs).
    pub fn node_ip6(i: usize) -> String {
        format!("{FABRIC_NET6}::{}", 10 + i)
    }
    fn pod_cidr6(i: usize) -> String {
        format!("{POD_NET6}:{i}::/64")
    }
    fn manifests(&self) -> PathBuf {
        self.dir.join("manifests")
    }
    fn bin(&self, name: &str) -> String {
        self.bin_dir.join(name).to_string_lossy().into_owned()
    }

    pub fn is_up(&self) -> bool {
        self.state.nodes > 0 && netns_exists(&self.fabric_ns())
    }

    /// This lab's pod cgroups (kubelet-style, below a root unique to this lab).
    pub fn cgroups(&self) -> Result<PodCgroups, String> {
        PodCgroups::for_lab(&self.name, &self.dir)
    }

    /// Starts a daemon inside a namespace, detached from the CLI, output to logs/<role>.log.
    fn spawn(&mut self, role: &str, ns: &str, args: &[String]) -> Result<u32, String> {
        self.spawn_in(role, ns, args, None)
    }

    /// `spawn`, the process placed in cgroup `cgroup` (a pod's) before it starts.
    fn spawn_in(
        &mut self,
        role: &str,
        ns: &str,
        args: &[String],
        cgroup: Option<&Path>,
    ) -> Result<u32, String> {
        self.spawn_logged(role, role, ns, args, cgroup)
    }

    /// `spawn_in`, the output in logs/<log_name>.log.
    pub(crate) fn spawn_logged(
        &mut self,
        role: &str,
        log_name: &str,
        ns: &str,
        args: &[String],
        cgroup: Option<&Path>,
    ) -> Result<u32, String> {
        use std::os::unix::process::CommandExt;
        let logs = self.dir.join("logs");
        std::fs::create_dir_all(&logs).map_err(|e| e.to_string())?;
        let log = logs.join(format!("{}.log", log_name.replace(['/', ':'], "_")));
        // Appended: a restarted component's log keeps what came before.
        let log_offset = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(|e| e.to_string())?;
        let mut full: Vec<String> = ["ip", "netns", "exec", ns]
            .iter()
            .map(|s| s.to_string())
            .collect();
        full.extend(args.iter().cloned());
        if let Some(cg) = cgroup {
            full = PodCgroups::wrap(cg, &full);
        }
        let mut command = Command::new(&full[0]);
        // With observe on, the proxies export their spans to the lab's receiver.
        if self.state.observe
            && crate::traces::exports_traces(role, args.first().map_or("", String::as_str))
        {
            command.env(
                crate::traces::ENDPOINT_ENV,
                crate::traces::endpoint(&Self::node_ip(1)),
            );
        }
        let child = command
            .args(&full[1..])
            .env("MESH_LAB_DIR", &self.dir)
            .stdin(Stdio::null())
            .stdout(file.try_clone().map_err(|e| e.to_string())?)
            .stderr(file)
            .process_group(0)
            .spawn()
            .map_err(|e| format!("cannot start {role}: {e}"))?;
        let pid = child.id();
        self.state.procs.push(ProcEntry {
            role: role.to_string(),
            pid,
            log: log.clone(),
            log_offset,
            ztunnel: None,
        });
        self.save()?;
        Ok(pid)
    }

    /// The process recorded for `role` (ztunnel-1, control, pod:NS/NAME, ...).
    pub fn process(&self, role: &str) -> Option<&ProcEntry> {
        self.state.procs.iter().find(|p| p.role == role)
    }

    pub fn wait_log(&self, role: &str, needle: &str, timeout: Duration) -> Result<(), String> {
        let p = self
            .process(role)
            .ok_or_else(|| format!("{role} is not running"))?;
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            let all = std::fs::read(&p.log).unwrap_or_default();
            let log = String::from_utf8_lossy(all.get(p.log_offset as usize..).unwrap_or_default());
            if log.contains(needle) {
                return Ok(());
            }
            if !Path::new(&format!("/proc/{}", p.pid)).exists() {
                return Err(format!("{role} exited:\n{log}"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(format!(
            "{role} did not become ready ({needle:?} not in {})",
            p.log.display()
        ))
    }

    pub(crate) fn runtime(&self, node: usize) -> Runtime {
        let mut conflist = node_conflist(
            &format!("{}-net", self.name),
            "cni0",
            &Self::pod_cidr(node),
            &format!("10.244.{node}.1"),
            &self.dir.join(format!("node{node}/ipam")),
            &self.dir.join(format!("node{node}/agent.sock")),
        );
        let (subnet6, gateway6) = (Self::pod_cidr6(node), format!("{POD_NET6}:{node}::1"));
        match self.state.family() {
            IpFamily::Ipv4 => {}
            IpFamily::DualStack => conflist = with_ipv6_range(conflist, &subnet6, &gateway6),
            IpFamily::Ipv6 => conflist = ipv6_only_range(conflist, &subnet6, &gateway6),
        }
        Runtime {
            bin_dirs: vec![self.cni_bin_dir.clone(), self.bin_dir.clone()],
            conflist,
            cache_dir: self.dir.join(format!("node{node}/cni-cache")),
            run_in_netns: Some(self.node_ns(node)),
        }
    }

    /// Builds the cluster: fabric, nodes, control plane, and per node an agent and a
    /// ztunnel. Idempotent: an existing lab is left as it is.
    pub fn up(&mut self, nodes: usize) -> Result<(), String> {
        self.up_with(nodes, false)
    }

    /// [`Lab::up`], with `dual_stack` pods (an IPv4 and an IPv6 address each) and nodes
    /// routing both families.
    pub fn up_with(&mut self, nodes: usize, dual_stack: bool) -> Result<(), String> {
        self.up_observed(nodes, dual_stack, false)
    }

    /// [`Lab::up_with`], and with `observe` Prometheus and the dashboard with its trace
    /// receiver, the ztunnels started exporting to it from the first.
    pub fn up_observed(
        &mut self,
        nodes: usize,
        dual_stack: bool,
        observe: bool,
    ) -> Result<(), String> {
        let family = if dual_stack {
            IpFamily::DualStack
        } else {
            IpFamily::Ipv4
        };
        self.up_family(nodes, family, observe)
    }

    /// [`Lab::up_observed`] with pods of `family`: IPv4, dual stack or IPv6 only (nodes
    /// then route IPv6 too; the fabric and the control plane stay IPv4).
    pub fn up_family(
        &mut self,
        nodes: usize,
        family: IpFamily,
        observe: bool,
    ) -> Result<(), String> {
        let route6 = family.has_ipv6();
        if self.is_up() {
            return if observe {
                self.start_prometheus()
            } else {
                Ok(())
            };
        }
        if !(1..=9).contains(&nodes) {
            return Err("--nodes must be between 1 and 9".into());
        }
        // Leftovers of a crashed lab of the same name go first.
        self.down()?;
        self.state = State {
            nodes,
            next_vip: 10,
            dual_stack: family == IpFamily::DualStack,
            ipv6_only: family == IpFamily::Ipv6,
            observe,
            ..Default::default()
        };
        std::fs::create_dir_all(self.manifests()).map_err(|e| e.to_string())?;
        self.save()?;
        let fabric = self.fabric_ns();
        run(&["ip", "netns", "add", &fabric])?;
        ns_exec(&fabric, &["ip", "link", "add", "br0", "type", "bridge"])?;
        ns_exec(&fabric, &["ip", "link", "set", "br0", "up"])?;
        let mut tokens = String::from("tokens:\n");
        let mut node_manifests = String::new();
        for i in 1..=nodes {
            let ns = self.node_ns(i);
            run(&["ip", "netns", "add", &ns])?;
            run(&[
                "ip",
                "link",
                "add",
                "eth0",
                "netns",
                &ns,
                "type",
                "veth",
                "peer",
                "name",
                &format!("n{i}"),
                "netns",
                &fabric,
            ])?;
            ns_exec(
                &fabric,
                &["ip", "link", "set", &format!("n{i}"), "master", "br0", "up"],
            )?;
            ns_exec(
                &ns,
                &[
                    "ip",
                    "addr",
                    "add",
                    &format!("{}/24", Self::node_ip(i)),
                    "dev",
                    "eth0",
                ],
            )?;
            if route6 {
                // No duplicate address detection: addresses are usable at once.
                no_dad(&ns)?;
                ns_exec(
                    &ns,
                    &[
                        "ip",
                        "addr",
                        "add",
                        &format!("{}/64", Self::node_ip6(i)),
                        "dev",
                        "eth0",
                    ],
                )?;
                ns_exec(&ns, &["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"])?;
            }
            ns_exec(&ns, &["ip", "link", "set", "eth0", "up"])?;
            ns_exec(&ns, &["ip", "link", "set", "lo", "up"])?;
            ns_exec(&ns, &["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
            for j in 1..=nodes {
                if j != i {
                    ns_exec(
                        &ns,
                        &[
                            "ip",
                            "route",
                            "add",
                            &Self::pod_cidr(j),
                            "via",
                            &Self::node_ip(j),
                        ],
                    )?;
                    if route6 {
                        ns_exec(
                            &ns,
                            &[
                                "ip",
                                "-6",
                                "route",
                                "add",
                                &Self::pod_cidr6(j),
                                "via",
                                &Self::node_ip6(j),
                            ],
                        )?;
                    }
                }
            }
            let token = format!("lab-{}-{}", self.name, random_hex(16));
            std::fs::create_dir_all(self.dir.join(format!("node{i}")))
                .map_err(|e| e.to_string())?;
            std::fs::write(self.dir.join(format!("node{i}/token")), &token)
                .map_err(|e| e.to_string())?;
            tokens.push_str(&format!("- {{token: {token}, node: node-{i}}}\n"));
            node_manifests.push_str(&format!(
                "apiVersion: v1\nkind: Node\nmetadata: {{name: node-{i}}}\n---\n"
            ));
        }
        std::fs::write(self.dir.join("tokens.yaml"), tokens).map_err(|e| e.to_string())?;
        std::fs::write(self.manifests().join("nodes.yaml"), node_manifests)
            .map_err(|e| e.to_string())?;

        // The control plane runs on node 1, as a control-plane node would.
        let (listen, ip_sans) = control_listen(family, &Self::node_ip(1), &Self::node_ip6(1));
        let mut control_args: Vec<String> = vec![
            self.bin("mesh-control"),
            "--config-dir".into(),
            self.manifests().to_string_lossy().into(),
            "--state-dir".into(),
            self.dir.join("control").to_string_lossy().into(),
            "--tokens".into(),
            self.dir.join("tokens.yaml").to_string_lossy().into(),
            "--listen".into(),
            listen,
            "--dns-name".into(),
            CONTROL_NAME.into(),
        ];
        for ip in ip_sans {
            control_args.extend(["--ip-san".into(), ip]);
        }
        self.spawn_control(control_args)?;
        for i in 1..=nodes {
            self.start_node_components(i)?;
        }
        for i in 1..=nodes {
            self.wait_log(
                &format!("agent-{i}"),
                "xDS connected",
                Duration::from_secs(15),
            )?;
            self.wait_log(
                &format!("ztunnel-{i}"),
                "xDS connected",
                Duration::from_secs(15),
            )?;
        }
        if observe {
            self.start_prometheus()?;
        }
        Ok(())
    }

    fn spawn_control(&mut self, args: Vec<String>) -> Result<(), String> {
        let node1 = self.node_ns(1);
        std::fs::write(self.dir.join("control.args"), args.join("\n"))
            .map_err(|e| e.to_string())?;
        self.state.procs.retain(|p| p.role != "control");
        self.spawn("control", &node1, &args)?;
        self.wait_log("control", "serving xDS and CA", Duration::from_secs(15))
    }

    /// Starts the control plane again (after `stop control`), with the same settings.
    pub fn start_control(&mut self) -> Result<(), String> {
        let args =
            std::fs::read_to_string(self.dir.join("control.args")).map_err(|e| e.to_string())?;
        self.spawn_control(args.lines().map(str::to_string).collect())
    }

    /// How a component reaches the control plane, authenticating with `token`.
    fn control_args(&self, token: &Path) -> Vec<String> {
        vec![
            "--xds-address".into(),
            format!("https://{}:15012", Self::node_ip(1)),
            "--root-cert".into(),
            self.dir
                .join("control/root-cert.pem")
                .to_string_lossy()
                .into(),
            "--control-hostname".into(),
            CONTROL_NAME.into(),
            "--token-file".into(),
            token.to_string_lossy().into(),
        ]
    }

    /// [`Lab::control_args`] for a pod (a waypoint): over IPv6 in an IPv6-only lab.
    fn pod_control_args(&self, token: &Path) -> Vec<String> {
        let mut args = self.control_args(token);
        args[1] = pod_control_address(self.state.family(), &Self::node_ip(1), &Self::node_ip6(1));
        args
    }

    /// Node `i`'s `resolv.conf` as its ztunnel reads it, followed while it runs (the DNS
    /// proxy's upstream resolvers).
    pub fn node_resolv_conf(&self, i: usize) -> PathBuf {
        self.dir.join(format!("node{i}/resolv.conf"))
    }

    fn node_token(&self, i: usize) -> PathBuf {
        self.dir.join(format!("node{i}/token"))
    }

    /// Starts node `i`'s agent and ztunnel.
    pub fn start_node_components(&mut self, i: usize) -> Result<(), String> {
        self.start_agent(i)?;
        self.start_ztunnel(i)
    }

    pub fn start_agent(&mut self, i: usize) -> Result<(), String> {
        let ns = self.node_ns(i);
        let zds = self
            .dir
            .join(format!("node{i}/ztunnel.sock"))
            .to_string_lossy()
            .into_owned();
        // The node's installed agent (`upgrade agent-N` repoints it).
        let exe = self.node_exe(i, "mesh-cni")?;
        let exe = std::fs::canonicalize(&exe).map_err(|e| format!("{}: {e}", exe.display()))?;
        let mut agent = vec![
            exe.to_string_lossy().into_owned(),
            "agent".into(),
            "--node-name".into(),
            format!("node-{i}"),
            "--zds-socket".into(),
            zds.clone(),
            "--agent-socket".into(),
            self.dir
                .join(format!("node{i}/agent.sock"))
                .to_string_lossy()
                .into(),
            // Running pods are found by their kubelet-style cgroups, in this lab's subtree.
            "--cgroup-root".into(),
            self.cgroups()?.root().to_string(),
            // Only the node's installed ztunnel may take pods' namespaces.
            "--zds-peer-exe".into(),
            self.node_ztunnel_exe(i)?.to_string_lossy().into(),
            // Metrics (and readiness) on the node's address too, for the lab's Prometheus.
            "--readiness-addr".into(),
            "0.0.0.0:8000".into(),
        ];
        agent.extend(self.control_args(&self.node_token(i)));
        self.state.procs.retain(|p| p.role != format!("agent-{i}"));
        self.spawn(&format!("agent-{i}"), &ns, &agent)?;
        Ok(())
    }

    /// Starts node `i`'s ztunnel (`ztunnel-N`), on the ports a still running old one
    /// leaves free.
    pub fn start_ztunnel(&mut self, i: usize) -> Result<(), String> {
        let role = crate::upgrade::current_role(i);
        self.state.procs.retain(|p| p.role != role);
        let run = crate::upgrade::next_run(i, &self.state.procs, &crate::ending::alive);
        self.spawn_ztunnel(i, run).map(|_| ())
    }

    /// Node `i`'s ztunnel arguments, without the program and its ports.
    pub(crate) fn ztunnel_args(&self, i: usize) -> Vec<String> {
        let zds = self
            .dir
            .join(format!("node{i}/ztunnel.sock"))
            .to_string_lossy()
            .into_owned();
        let mut zt: Vec<String> = vec![
            "--node-name".into(),
            format!("node-{i}"),
            "--zds-socket".into(),
            zds,
            "--instance-ip".into(),
            Self::node_ip(i),
            "--pod-name".into(),
            format!("ztunnel-{i}"),
            "--log-level".into(),
            "info,access=info".into(),
            // The lab has no cluster DNS: the node's resolvers are whatever a test writes
            // here (none otherwise; nothing the lab runs leaves the lab).
            "--dns-resolv-conf".into(),
            self.node_resolv_conf(i).to_string_lossy().into(),
        ];
        zt.extend(self.control_args(&self.node_token(i)));
        zt
    }

    /// Ends the process recorded for `role` (by its PID, after checking it is ours).
    pub fn stop(&mut self, role: &str, kill: bool) -> Result<(), String> {
        let Some(p) = self.process(role).cloned() else {
            return Err(format!("no process {role} in lab {}", self.name));
        };
        crate::ending::end(
            &[p.pid],
            &|pid| self.owns(pid),
            crate::ending::Ending {
                signal: if kill { "KILL" } else { "TERM" },
                group: false,
                wait: Duration::from_millis(2500),
                then_kill: false,
            },
        );
        self.state.procs.retain(|x| x.role != role);
        self.save()
    }

    /// A process is ours if it runs in one of this lab's namespaces.
    pub(crate) fn owns(&self, pid: u32) -> bool {
        let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else {
            return false;
        };
        let want = format!("MESH_LAB_DIR={}", self.dir.display());
        env.split(|b| *b == 0).any(|kv| kv == want.as_bytes())
    }

    // ---- manifests and pods ----

    /// Applies a manifest file: objects are written for the control plane; pods are
    /// created through the CNI chain and their IPs written back.
    pub fn apply(&mut self, text: &str, source: &str) -> Result<Vec<String>, String> {
        if !self.is_up() {
            return Err(format!(
                "lab {} is not up: run `mesh-lab up` first",
                self.name
            ));
        }
        // Validate with the control plane's own parser first: nothing is applied from a
        // bad file.
        let mut check = mesh_control::manifest::Objects::default();
        check
            .add_file(Path::new(source), text)
            .map_err(|e| e.to_string())?;
        let docs: Vec<Value> = serde_saphyr::from_multiple(text).map_err(|e| e.to_string())?;
        let mut done = Vec::new();
        let mut pods = Vec::new();
        for mut doc in docs.into_iter().filter(|d| !d.is_null()) {
            let kind = doc["kind"].as_str().unwrap_or_default().to_string();
            let (ns, name) = namespace_and_name(&doc);
            match kind.as_str() {
                "Pod" => pods.push(doc),
                "Gateway" if doc["spec"]["gatewayClassName"] == "istio-waypoint" => {
                    self.write_manifest(&kind, &ns, &name, &doc)?;
                    done.push(format!("gateway {ns}/{name} configured"));
                    pods.extend(self.provision_waypoint(&ns, &name)?);
                }
                _ => {
                    if kind == "Service"
                        && crate::service_vips::assign(
                            &mut doc["spec"],
                            self.state.next_vip,
                            self.state.family(),
                        )
                        .map_err(|e| format!("service {ns}/{name}: {e}"))?
                    {
                        self.state.next_vip = self.state.next_vip.wrapping_add(1).max(10);
                    }
                    self.write_manifest(&kind, &ns, &name, &doc)?;
                    let shown = if matches!(kind.as_str(), "Namespace" | "Node") {
                        name.clone()
                    } else {
                        format!("{ns}/{name}")
                    };
                    done.push(format!("{} {shown} configured", kind.to_lowercase()));
                }
            }
        }
        for doc in pods {
            done.push(self.create_pod(doc)?);
        }
        self.save()?;
        self.program_services()?;
        Ok(done)
    }

    /// A waypoint for Gateway `ns/name`: a bootstrap token, its Service (port 15008) and
    /// its pod, which runs the waypoint and is never captured itself. Returns the pod's
    /// manifest when it does not exist yet.
    fn provision_waypoint(&mut self, ns: &str, name: &str) -> Result<Option<Value>, String> {
        // Its pods keep their Gateway's label, whatever their names (after a rollout too).
        if !self.waypoint_pods(ns, name).is_empty() {
            return Ok(None);
        }
        let token_path = self.dir.join(format!("waypoints/{ns}-{name}.token"));
        std::fs::create_dir_all(token_path.parent().expect("has a parent"))
            .map_err(|e| e.to_string())?;
        let token = format!("lab-wp-{}", random_hex(16));
        std::fs::write(&token_path, &token).map_err(|e| e.to_string())?;
        let tokens_file = self.dir.join("tokens.yaml");
        let mut tokens = std::fs::read_to_string(&tokens_file).map_err(|e| e.to_string())?;
        tokens.push_str(&format!("- {{token: {token}, waypoint: {ns}/{name}}}\n"));
        std::fs::write(&tokens_file, tokens).map_err(|e| e.to_string())?;
        // The waypoint's Service VIP of the lab's primary family.
        let vip =
            crate::service_vips::vip(self.state.next_vip, self.state.family() == IpFamily::Ipv6);
        self.state.next_vip = self.state.next_vip.wrapping_add(1).max(10);
        let svc = json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": ns, "labels": {"istio.io/use-waypoint": "none"}},
            "spec": {"selector": {"gateway.networking.k8s.io/gateway-name": name}, "clusterIP": vip,
                     "ports": [{"name": "mesh", "port": 15008, "targetPort": 15008}]}
        });
        self.write_manifest("Service", ns, name, &svc)?;
        let args: Vec<String> = vec![
            self.bin("waypoint"),
            "--name".into(),
            name.into(),
            "--namespace".into(),
            ns.into(),
        ];
        // Drains as in a cluster (the Deployment's flags).
        let drain = mesh_control::waypoint_deploy::drain_args().to_vec();
        let args = [args, self.pod_control_args(&token_path), drain].concat();
        Ok(Some(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "labels": {
                "gateway.networking.k8s.io/gateway-name": name,
                "istio.io/dataplane-mode": "none"}},
            "spec": {"serviceAccountName": name, "containers": [{"name": "waypoint", "command": args}]}
        })))
    }

    pub(crate) fn manifest_path(&self, kind: &str, ns: &str, name: &str) -> PathBuf {
        let scope = if matches!(kind, "Namespace" | "Node") {
            ""
        } else {
            ns
        };
        self.manifests()
            .join(format!("{}-{scope}-{name}.yaml", kind.to_lowercase()))
    }

    pub(crate) fn write_manifest(
        &self,
        kind: &str,
        ns: &str,
        name: &str,
        doc: &Value,
    ) -> Result<(), String> {
        // JSON is YAML: the control plane reads it as written.
        let path = self.manifest_path(kind, ns, name);
        let tmp = path.with_extension("tmp");
        std::fs::write(
            &tmp,
            serde_json::to_string_pretty(doc).map_err(|e| e.to_string())?,
        )
        .map_err(|e| e.to_string())?;
        std::fs::rename(&tmp, &path).map_err(|e| e.to_string())
    }

    fn create_pod(&mut self, mut doc: Value) -> Result<String, String> {
        let (ns, name) = namespace_and_name(&doc);
        doc["metadata"]["namespace"] = json!(ns);
        let key = format!("{ns}/{name}");
        if let Some(existing) = self.state.pods.get(&key).cloned() {
            // Labels and annotations may change on a running pod; the rest is fixed.
            doc["metadata"]["uid"] = json!(existing.uid);
            doc["spec"]["nodeName"] = json!(format!("node-{}", existing.node));
            doc["status"] = ready_status(&existing.ip, existing.ip6.as_deref());
            self.write_manifest("Pod", &ns, &name, &doc)?;
            return Ok(format!("pod {key} configured"));
        }
        let node = match doc["spec"]["nodeName"].as_str() {
            Some(n) => n
                .strip_prefix("node-")
                .and_then(|i| i.parse::<usize>().ok())
                .filter(|i| (1..=self.state.nodes).contains(i))
                .ok_or_else(|| {
                    format!(
                        "pod {key}: node {n} is not in this lab (node-1..node-{})",
                        self.state.nodes
                    )
                })?,
            None => (1..=self.state.nodes)
                .min_by_key(|i| self.state.pods.values().filter(|p| p.node == *i).count())
                .unwrap_or(1),
        };
        let uid = doc["metadata"]["uid"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| random_hex(8));
        doc["metadata"]["uid"] = json!(uid);
        doc["spec"]["nodeName"] = json!(format!("node-{node}"));
        // The control plane learns of the pod before its sandbox exists, as in Kubernetes.
        self.write_manifest("Pod", &ns, &name, &doc)?;
        match self.start_pod(&doc, node) {
            Ok(ip) => Ok(format!("pod {key} created on node-{node} with IP {ip}")),
            Err(e) => {
                let _ = std::fs::remove_file(self.manifest_path("Pod", &ns, &name));
                Err(e)
            }
        }
    }

    /// What a kubelet does for a pod it must run: its cgroup, a new sandbox (network
    /// namespace, then ADD through the CNI chain), its status (IP) written back, then its
    /// process. Nothing of the pod runs unless ADD succeeded: on failure the sandbox is
    /// removed again (`Err` says why). The pod's manifest (`doc`, with its UID) exists.
    /// Returns the pod's IPv4 address.
    pub(crate) fn start_pod(&mut self, doc: &Value, node: usize) -> Result<String, String> {
        self.start_pod_as(doc, node, true)
    }

    /// [`Lab::start_pod`], its status Ready only if `ready` (a pod whose readiness probe
    /// has yet to pass starts with Ready=False, as a kubelet reports it).
    pub(crate) fn start_pod_as(
        &mut self,
        doc: &Value,
        node: usize,
        ready: bool,
    ) -> Result<String, String> {
        let mut doc = doc.clone();
        let (ns, name) = namespace_and_name(&doc);
        let key = format!("{ns}/{name}");
        let uid = doc["metadata"]["uid"]
            .as_str()
            .ok_or_else(|| format!("pod {key} has no UID"))?
            .to_string();
        // The pod's processes run in a cgroup named like the kubelet's (pod UID).
        let container_name = doc["spec"]["containers"][0]["name"]
            .as_str()
            .unwrap_or("app")
            .to_string();
        let cgroup = self.cgroups()?.create(&uid, &container_name)?;
        // Each sandbox its own namespace path, as real runtimes make them: a late DEL for
        // a pod's lost sandbox then never names its new one.
        let sandbox = random_hex(6);
        let container_id = format!("{}-{sandbox}", self.name);
        let netns = format!("{}-{sandbox}", self.pod_ns(&ns, &name));
        run(&["ip", "netns", "add", &netns])?;
        if self.state.family().has_ipv6() {
            no_dad(&netns)?;
        }
        let sb = |ifname: &str| Sandbox {
            container_id: container_id.clone(),
            netns: format!("/var/run/netns/{netns}"),
            ifname: ifname.into(),
            args: format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE={ns};K8S_POD_NAME={name};K8S_POD_UID={uid}"
            ),
        };
        let rt = self.runtime(node);
        let lo = Runtime {
            conflist: loopback_conf(),
            ..rt.clone()
        };
        let added = lo.add(&sb("lo")).and_then(|_| rt.add(&sb("eth0")));
        let result = match added {
            Ok(r) => r,
            Err(e) => {
                let _ = rt.del(&sb("eth0"));
                let _ = run(&["ip", "netns", "del", &netns]);
                if let Ok(cg) = self.cgroups() {
                    cg.remove_pod(&uid);
                }
                return Err(format!("pod {key} was not started: {e}"));
            }
        };
        let (ip, ip6) = pod_addresses(
            self.state.family(),
            result_ipv4(&result),
            result_ipv6(&result),
        )
        .map_err(|e| format!("pod {key}: {e}"))?;
        doc["status"] = ready_status(&ip, ip6.as_deref());
        if !ready {
            doc["status"]["conditions"][0]["status"] = json!("False");
        }
        self.write_manifest("Pod", &ns, &name, &doc)?;
        self.state.pods.insert(
            key.clone(),
            PodEntry {
                namespace: ns.clone(),
                name: name.clone(),
                node,
                netns: netns.clone(),
                container_id,
                ip: ip.clone(),
                ip6,
                uid,
                waypoint: doc["metadata"]["labels"]
                    .get("gateway.networking.k8s.io/gateway-name")
                    .is_some(),
            },
        );
        self.save()?;
        // The pod's process.
        let container = &doc["spec"]["containers"][0];
        let mut cmd: Vec<String> = container["command"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        cmd.extend(
            container["args"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_str().map(str::to_string))
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default(),
        );
        if cmd.is_empty() {
            cmd = vec![
                "mesh-lab".into(),
                "app".into(),
                "--name".into(),
                key.clone(),
            ];
            for p in container["ports"].as_array().into_iter().flatten() {
                let port = p["containerPort"].as_u64().unwrap_or(0).to_string();
                let name = p["name"].as_str().unwrap_or_default();
                let flag = if name.starts_with("tcp") {
                    "--tcp-echo"
                } else if name.starts_with("grpc") {
                    "--grpc"
                } else {
                    "--http"
                };
                cmd.push(flag.into());
                cmd.push(port);
            }
        }
        if cmd[0] == "mesh-lab" {
            cmd[0] = self.bin("mesh-lab");
        }
        self.spawn_in(&format!("pod:{key}"), &netns, &cmd, Some(&cgroup))?;
        Ok(ip)
    }

    pub(crate) fn sandbox(p: &PodEntry) -> Sandbox {
        Sandbox {
            container_id: p.container_id.clone(),
            netns: format!("/var/run/netns/{}", p.netns),
            ifname: "eth0".into(),
            args: format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_UID={}",
                p.namespace, p.name, p.uid
            ),
        }
    }

    /// Deletes a pod: its process, CNI DEL, its namespace and its manifest.
    pub fn delete_pod(&mut self, key: &str) -> Result<(), String> {
        let p = self
            .state
            .pods
            .get(key)
            .cloned()
            .ok_or_else(|| format!("no pod {key}"))?;
        let _ = self.stop(&format!("pod:{key}"), true);
        let rt = self.runtime(p.node);
        let _ = rt.del(&Self::sandbox(&p));
        let _ = run(&["ip", "netns", "del", &p.netns]);
        if let Ok(cg) = self.cgroups() {
            cg.remove_pod(&p.uid);
        }
        let _ = std::fs::remove_file(self.manifest_path("Pod", &p.namespace, &p.name));
        self.state.pods.remove(key);
        self.save()?;
        self.program_services()
    }

    /// kube-proxy's job for pods outside the mesh: Service VIPs (both families) →
    /// endpoints NAT on every node ([`crate::service_vips::nat_rules`]).
    pub fn program_services(&self) -> Result<(), String> {
        let mut objs = mesh_control::manifest::Objects::default();
        for entry in std::fs::read_dir(self.manifests())
            .map_err(|e| e.to_string())?
            .flatten()
        {
            let path = entry.path();
            if let Ok(text) = std::fs::read_to_string(&path) {
                let _ = objs.add_file(&path, &text);
            }
        }
        let rules = crate::service_vips::nat_rules(&objs);
        for i in 1..=self.state.nodes {
            ns_exec_stdin(&self.node_ns(i), &["nft", "-f", "-"], &rules)?;
        }
        Ok(())
    }

    /// Runs a command inside a pod (`namespace/name`), with the terminal's stdio.
    pub fn exec(&self, pod: &str, cmd: &[String]) -> Result<i32, String> {
        let p = self.state.pods.get(pod).ok_or_else(|| {
            format!(
                "no pod {pod} in lab {} (pods: {})",
                self.name,
                self.state
                    .pods
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })?;
        let status = Command::new("ip")
            .args(["netns", "exec", &p.netns])
            .args(cmd)
            .status()
            .map_err(|e| e.to_string())?;
        Ok(status.code().unwrap_or(1))
    }

    pub fn log_path(&self, component: &str) -> Result<PathBuf, String> {
        self.process(component)
            .map(|p| p.log.clone())
            .ok_or_else(|| {
                format!(
                    "no component {component}; known: {}",
                    self.state
                        .procs
                        .iter()
                        .map(|p| p.role.clone())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })
    }

    pub fn status(&self) -> String {
        if !self.is_up() {
            return format!("lab {} is down\n", self.name);
        }
        let ipv6_only = self.state.family() == IpFamily::Ipv6;
        let mut s = format!(
            "lab {} ({} nodes{}, state in {})\n\nNODES\n",
            self.name,
            self.state.nodes,
            if ipv6_only { ", IPv6-only pods" } else { "" },
            self.dir.display()
        );
        for i in 1..=self.state.nodes {
            s.push_str(&format!(
                "  node-{i}  {}  pods {}\n",
                Self::node_ip(i),
                if ipv6_only {
                    Self::pod_cidr6(i)
                } else {
                    Self::pod_cidr(i)
                }
            ));
        }
        s.push_str("\nCOMPONENTS\n");
        for p in &self.state.procs {
            let alive = Path::new(&format!("/proc/{}", p.pid)).exists() && !is_zombie(p.pid);
            let ports = p.ztunnel.map_or(String::new(), |z| {
                format!(
                    "  admin {} metrics {} readiness {}",
                    z.ports.admin, z.ports.metrics, z.ports.readiness
                )
            });
            s.push_str(&format!(
                "  {:<32} pid {:<8} {}{ports}\n",
                p.role,
                p.pid,
                if alive { "running" } else { "EXITED" }
            ));
        }
        s.push_str("\nPODS\n");
        for (k, p) in &self.state.pods {
            s.push_str(&format!("  {k:<32} node-{}  {}\n", p.node, p.ip));
        }
        s
    }

    /// Removes everything the lab made: processes (by PID, only ours), pods (CNI DEL),
    /// namespaces, and the state directory. Works from whatever is left after a crash.
    pub fn down(&mut self) -> Result<(), String> {
        let prefix = format!("{}-", self.name);
        // Processes: those recorded, and any other process carrying our marker.
        let mut pids: Vec<u32> = self.state.procs.iter().map(|p| p.pid).collect();
        if let Ok(rd) = std::fs::read_dir("/proc") {
            for e in rd.flatten() {
                if let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() {
                    pids.push(pid);
                }
            }
        }
        crate::ending::end(
            &pids,
            &|p| self.owns(p),
            crate::ending::Ending {
                signal: "TERM",
                group: false,
                wait: Duration::from_secs(3),
                then_kill: true,
            },
        );
        // Pod cgroups (what is left in them is ours), then
        // pods: CNI DEL as the runtime would (releases host-local leases), then namespaces.
        if let Ok(cg) = self.cgroups() {
            cg.remove_all();
        }
        for p in self.state.pods.values() {
            let rt = self.runtime(p.node);
            let _ = rt.del(&Self::sandbox(p));
        }
        if let Ok(list) = run(&["ip", "netns", "list"]) {
            for line in list.lines() {
                let name = line.split_whitespace().next().unwrap_or_default();
                if name.starts_with(&prefix) {
                    let _ = run(&["ip", "netns", "del", name]);
                }
            }
        }
        if self.dir.exists() {
            std::fs::remove_dir_all(&self.dir)
                .map_err(|e| format!("{}: {e}", self.dir.display()))?;
        }
        self.state = State::default();
        Ok(())
    }
}

/// `name`'s full path on PATH.
fn which(name: &str) -> Option<String> {
    std::env::var_os("PATH")?
        .to_string_lossy()
        .split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
        .map(|p| p.to_string_lossy().into_owned())
}

pub(crate) use crate::ending::is_zombie;

fn ready_status(ip: &str, ip6: Option<&str>) -> Value {
    let ips: Vec<Value> = pod_ips(ip, ip6)
        .into_iter()
        .map(|ip| json!({"ip": ip}))
        .collect();
    json!({"phase": "Running", "podIP": ip, "podIPs": ips, "conditions": [{"type": "Ready", "status": "True"}]})
}

/// Turns off duplicate address detection in namespace `ns` (new interfaces included), so
/// IPv6 addresses work as soon as they are added.
fn no_dad(ns: &str) -> Result<(), String> {
    for key in ["all", "default"] {
        ns_exec(
            ns,
            &[
                "sysctl",
                "-qw",
                &format!("net.ipv6.conf.{key}.accept_dad=0"),
            ],
        )?;
    }
    Ok(())
}

/// A manifest's namespace ("default" when it names none, as the API server does) and name.
fn namespace_and_name(doc: &Value) -> (String, String) {
    let meta = &doc["metadata"];
    (
        meta["namespace"].as_str().unwrap_or("default").to_string(),
        meta["name"].as_str().unwrap_or_default().to_string(),
    )
}
