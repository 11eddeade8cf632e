//! `mesh-lab reboot node-N`: the node loses everything a reboot loses, then comes back
//! the way a kubelet brings it back.
//!
//! Down: every process on the node (its ztunnel and node agent, its pods' processes,
//! waypoints placed there; the control plane and Prometheus on node 1) is killed with
//! SIGKILL by PID, and the node's runtime state goes: the agent's and ztunnel's sockets,
//! the agent's cache of the node's pods, the pods' cgroups and network namespaces, and
//! the node's own kernel network state made at run time (the pods' bridge, nftables).
//! What a node keeps on disk stays: its token, the CNI result cache and the IPAM leases.
//!
//! Up: the control plane first (a static pod), then the agent, ztunnel and the pods in
//! the order asked for (a DaemonSet gives no order; pods may come before the agent is
//! ready). Each pod keeps its name and UID and gets a new sandbox: the runtime releases
//! the lost one (CNI DEL) and creates a new network namespace through the CNI chain
//! (ADD). A pod whose ADD fails is not started; it is retried with a backoff, as the
//! kubelet does, until the node is back or the time is up.
//!
//! The decisions (what to kill, remove and recreate, in which order) are [`plan`] and
//! [`on_node`]; the rest is a thin shell over the lab.

use crate::cni_runtime::Sandbox;
use crate::lab::{Lab, PodEntry, ProcEntry, ns_exec, run};
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, Instant};

/// How long the pods of a rebooted node may take to start again.
const POD_START_TIMEOUT: Duration = Duration::from_secs(90);
/// How long the node's agent and ztunnel may take to reach the control plane.
const XDS_TIMEOUT: Duration = Duration::from_secs(30);

/// What a DaemonSet or the kubelet brings back after a reboot, in some order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Component {
    Agent,
    Ztunnel,
    Pods,
}

/// The order the node's agent, ztunnel and pods come back in (`agent,ztunnel,pods`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BootOrder(pub [Component; 3]);

impl Default for BootOrder {
    fn default() -> Self {
        BootOrder([Component::Agent, Component::Ztunnel, Component::Pods])
    }
}

impl FromStr for BootOrder {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let parts: Vec<Component> = s
            .split(',')
            .map(|p| match p.trim() {
                "agent" => Ok(Component::Agent),
                "ztunnel" => Ok(Component::Ztunnel),
                "pods" => Ok(Component::Pods),
                other => Err(format!(
                    "boot order {s:?}: unknown component {other:?} (give agent, ztunnel and pods)"
                )),
            })
            .collect::<Result<_, _>>()?;
        match parts[..] {
            [a, b, c] if a != b && b != c && a != c => Ok(BootOrder([a, b, c])),
            _ => Err(format!(
                "boot order {s:?}: name agent, ztunnel and pods once each, e.g. pods,ztunnel,agent"
            )),
        }
    }
}

/// When the runtime releases (CNI DEL) a pod's lost sandbox: before making the new one
/// (`before`), or after the node's pods are back (`after`), as a kubelet does after a
/// real reboot, its garbage collection finding the old sandboxes later. `Held`: not
/// at all; the lost sandboxes are handed back in the report for the caller to release
/// (`Lab::release_lost`), e.g. after restarting the node agent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Release {
    #[default]
    Before,
    After,
    Held,
}

impl FromStr for Release {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "before" => Ok(Release::Before),
            "after" => Ok(Release::After),
            _ => Err(format!(
                "release {s:?}: give before (the lost sandbox released before the new one is made) or after"
            )),
        }
    }
}

/// `node-N` (or `N`) → N, for a lab of `nodes` nodes.
pub fn parse_node(s: &str, nodes: usize) -> Result<usize, String> {
    s.strip_prefix("node-")
        .unwrap_or(s)
        .parse::<usize>()
        .ok()
        .filter(|n| (1..=nodes).contains(n))
        .ok_or_else(|| format!("no node {s:?} in this lab: give node-1 .. node-{nodes}"))
}

/// One step of the way back up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Boot {
    /// The control plane, a static pod of node 1: before anything else.
    Control,
    Agent(usize),
    Ztunnel(usize),
    /// These pods (`namespace/name`), each given a new sandbox (its lost one released
    /// before or after, as `Release` says).
    Pods(Vec<String>),
    Prometheus,
}

/// What a reboot of one node does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// Processes killed (role, PID).
    pub kill: Vec<(String, u32)>,
    /// The UIDs of the pods whose cgroups go.
    pub cgroups: Vec<String>,
    /// Network namespaces that go (the pods').
    pub netns: Vec<String>,
    /// Runtime files that go (sockets, the agent's cache).
    pub files: Vec<PathBuf>,
    pub boot: Vec<Boot>,
}

/// The node a process runs on: agent-N and ztunnel-N on N, a pod's on its pod's node,
/// the control plane, Prometheus and the dashboard (the lab's trace receiver) on node 1.
fn node_of(role: &str, pods: &BTreeMap<String, PodEntry>) -> Option<usize> {
    if matches!(role, "control" | "prometheus" | "dashboard") {
        return Some(1);
    }
    if let Some(key) = role.strip_prefix("pod:") {
        return pods.get(key).map(|p| p.node);
    }
    // Both ztunnels of a node being upgraded (`ztunnel-N-old` too).
    if let Some(n) = crate::upgrade::node_of(role) {
        return Some(n);
    }
    let (kind, n) = role.rsplit_once('-')?;
    matches!(kind, "agent" | "ztunnel")
        .then(|| n.parse().ok())
        .flatten()
}

/// The files a node's agent and ztunnel keep while they run (`node_dir`: the node's
/// state directory): lost in a reboot. `node-pods.json` is the agent's cache of the
/// node's pods (mesh-cni's `cache::FILE_NAME`, next to its socket).
pub fn runtime_files(node_dir: &Path) -> Vec<PathBuf> {
    [
        "agent.sock",
        "ztunnel.sock",
        "node-pods.json",
        "node-pods.json.tmp",
    ]
    .iter()
    .map(|f| node_dir.join(f))
    .collect()
}

/// The reboot of `node`: what goes, and the order things come back in.
pub fn plan(
    node: usize,
    procs: &[ProcEntry],
    pods: &BTreeMap<String, PodEntry>,
    node_dir: &Path,
    order: BootOrder,
) -> Plan {
    let kill: Vec<(String, u32)> = procs
        .iter()
        .filter(|p| node_of(&p.role, pods) == Some(node))
        .map(|p| (p.role.clone(), p.pid))
        .collect();
    let here: Vec<(&String, &PodEntry)> = pods.iter().filter(|(_, p)| p.node == node).collect();
    let was = |role: &str| kill.iter().any(|(r, _)| r == role);
    let mut boot = Vec::new();
    if was("control") {
        boot.push(Boot::Control);
    }
    // The DaemonSets' pods come back whatever ran before: that is what a DaemonSet is.
    for c in order.0 {
        boot.push(match c {
            Component::Agent => Boot::Agent(node),
            Component::Ztunnel => Boot::Ztunnel(node),
            Component::Pods => Boot::Pods(here.iter().map(|(k, _)| (*k).clone()).collect()),
        });
    }
    if was("prometheus") {
        boot.push(Boot::Prometheus);
    }
    Plan {
        kill,
        cgroups: here.iter().map(|(_, p)| p.uid.clone()).collect(),
        netns: here.iter().map(|(_, p)| p.netns.clone()).collect(),
        files: runtime_files(node_dir),
        boot,
    }
}

/// Of `procs` (PID, network namespace inode), those in one of the node's namespaces
/// (`inodes`: the node's and its pods'), not already in `known`.
pub fn on_node(procs: &[(u32, u64)], inodes: &[u64], known: &[u32]) -> Vec<u32> {
    procs
        .iter()
        .filter(|(pid, ino)| inodes.contains(ino) && !known.contains(pid))
        .map(|(pid, _)| *pid)
        .collect()
}

/// The kubelet's wait before trying a pod's sandbox again (`attempt` from 0).
pub fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(200u64.saturating_mul(1 << attempt.min(4))).min(Duration::from_secs(2))
}

/// What happened, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Killed {
        role: String,
        pid: u32,
    },
    Removed(String),
    Started(String),
    /// A pod's lost sandbox released through the CNI chain (DEL).
    Released {
        pod: String,
        error: Option<String>,
    },
    /// ADD failed: the pod's sandbox was removed again and nothing of it runs.
    NotStarted {
        pod: String,
        reason: String,
    },
    PodStarted {
        pod: String,
        ip: String,
    },
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Event::Killed { role, pid } => write!(f, "killed {role} (pid {pid})"),
            Event::Removed(what) => write!(f, "removed {what}"),
            Event::Started(what) => write!(f, "started {what}"),
            Event::Released { pod, error: None } => {
                write!(f, "released the lost sandbox of pod {pod} (CNI DEL)")
            }
            Event::Released {
                pod,
                error: Some(e),
            } => write!(f, "released the lost sandbox of pod {pod} (CNI DEL: {e})"),
            Event::NotStarted { pod, reason } => {
                write!(f, "pod {pod} not started, will retry: {reason}")
            }
            Event::PodStarted { pod, ip } => write!(f, "pod {pod} started with IP {ip}"),
        }
    }
}

#[derive(Debug, Default)]
pub struct Report {
    pub events: Vec<Event>,
    /// Pods still not running when the time was up.
    pub not_started: Vec<String>,
    /// With `Release::Held`: the lost sandboxes (pod, sandbox), not released yet.
    pub held: Vec<(String, Sandbox)>,
}

fn netns_inode(path: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| m.ino())
}

/// Every process's (PID, network namespace inode).
fn all_processes() -> Vec<(u32, u64)> {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return vec![];
    };
    rd.flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let link = std::fs::read_link(format!("/proc/{pid}/ns/net")).ok()?;
            let ino = link
                .to_str()?
                .strip_prefix("net:[")?
                .strip_suffix(']')?
                .parse()
                .ok()?;
            Some((pid, ino))
        })
        .collect()
}

/// `GET /readyz` of the node agent (127.0.0.1:8000 in the node's namespace `netns`)
/// answers 200. Asked from a thread of its own that enters the namespace.
fn agent_ready(netns: &Path) -> bool {
    use std::io::{Read, Write};
    let netns = netns.to_path_buf();
    std::thread::spawn(move || -> std::io::Result<bool> {
        let f = std::fs::File::open(&netns)?;
        nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(std::io::Error::from)?;
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], 8000));
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        s.write_all(b"GET /readyz HTTP/1.0\r\nHost: agent\r\n\r\n")?;
        let mut head = [0u8; 12];
        s.read_exact(&mut head)?;
        Ok(head.ends_with(b" 200"))
    })
    .join()
    .is_ok_and(|r| r.unwrap_or(false))
}

impl Lab {
    /// Reboots node `node`, its components coming back in `order`, each lost sandbox
    /// released before its pod's new one is made.
    pub fn reboot(&mut self, node: usize, order: BootOrder) -> Result<Report, String> {
        self.reboot_with(node, order, Release::Before, &mut |_, _| Ok(()))
    }

    /// `reboot`, the lost sandboxes released as `release` says; `before_step` runs
    /// before each step of the way back up (to watch the node between two steps).
    pub fn reboot_with(
        &mut self,
        node: usize,
        order: BootOrder,
        release: Release,
        before_step: &mut dyn FnMut(&Lab, &Boot) -> Result<(), String>,
    ) -> Result<Report, String> {
        if !self.is_up() {
            return Err(format!("lab {} is not up", self.name));
        }
        parse_node(&node.to_string(), self.state.nodes)?;
        let node_dir = self.dir.join(format!("node{node}"));
        let plan = plan(node, &self.state.procs, &self.state.pods, &node_dir, order);
        let mut report = Report::default();
        self.go_down(node, &plan, &mut report)?;
        // The pods as they were: their lost sandboxes are released as they come back.
        let lost: BTreeMap<String, PodEntry> = self
            .state
            .pods
            .iter()
            .filter(|(_, p)| p.node == node)
            .map(|(k, p)| (k.clone(), p.clone()))
            .collect();
        let mut pending: Vec<String> = Vec::new();
        for step in &plan.boot {
            before_step(self, step)?;
            match step {
                Boot::Control => self.start_control()?,
                // A DaemonSet's pod counts once it is ready: the next step comes after.
                Boot::Agent(i) => {
                    self.start_agent(*i)?;
                    self.wait_agent_ready(*i)?;
                }
                Boot::Ztunnel(i) => {
                    self.start_ztunnel(*i)?;
                    self.wait_log(&format!("ztunnel-{i}"), "xDS connected", XDS_TIMEOUT)?;
                }
                Boot::Prometheus => self.start_prometheus()?,
                Boot::Pods(keys) => {
                    for key in keys {
                        if release == Release::Before {
                            report.events.extend(
                                self.release_lost(node, &[(key.clone(), Lab::sandbox(&lost[key]))]),
                            );
                        }
                        pending.push(key.clone());
                    }
                }
            }
            if let Some(what) = match step {
                Boot::Control => Some("control".to_string()),
                Boot::Agent(i) => Some(format!("agent-{i}")),
                Boot::Ztunnel(i) => Some(format!("ztunnel-{i}")),
                Boot::Prometheus => Some("prometheus".to_string()),
                Boot::Pods(_) => None,
            } {
                report.events.push(Event::Started(what));
            }
            // The kubelet keeps trying pods whose sandbox could not be made.
            self.try_pods(node, &mut pending, &mut report);
        }
        let deadline = Instant::now() + POD_START_TIMEOUT;
        let mut attempt = 0;
        while !pending.is_empty() && Instant::now() < deadline {
            std::thread::sleep(backoff(attempt));
            attempt += 1;
            self.try_pods(node, &mut pending, &mut report);
        }
        report.not_started = pending;
        let lost: Vec<(String, Sandbox)> = lost
            .iter()
            .map(|(k, p)| (k.clone(), Lab::sandbox(p)))
            .collect();
        match release {
            Release::Before => {}
            Release::After => report.events.extend(self.release_lost(node, &lost)),
            Release::Held => report.held = lost,
        }
        for role in [format!("agent-{node}"), format!("ztunnel-{node}")] {
            self.wait_log(&role, "xDS connected", XDS_TIMEOUT)?;
        }
        // kube-proxy's rules come back with the node.
        self.program_services()?;
        Ok(report)
    }

    /// Releases lost sandboxes of node `node`'s pods through the CNI chain (DEL), as the
    /// runtime does: each with its own container ID and namespace path (gone by now).
    pub fn release_lost(&self, node: usize, lost: &[(String, Sandbox)]) -> Vec<Event> {
        lost.iter()
            .map(|(pod, sb)| Event::Released {
                pod: pod.clone(),
                error: self.runtime(node).del(sb).err().map(|e| e.to_string()),
            })
            .collect()
    }

    /// The agent of node `i` is ready as its DaemonSet's readiness probe sees it (its
    /// `/readyz`: the control plane's view arrived) and serves the plugin socket.
    pub fn wait_agent_ready(&self, i: usize) -> Result<(), String> {
        self.wait_log(&format!("agent-{i}"), "xDS connected", XDS_TIMEOUT)?;
        let socket = self.dir.join(format!("node{i}/agent.sock"));
        let netns = Path::new("/var/run/netns").join(self.node_ns(i));
        let deadline = Instant::now() + XDS_TIMEOUT;
        while !(socket.exists() && agent_ready(&netns)) {
            if Instant::now() > deadline {
                return Err(format!(
                    "agent-{i} is not ready (its /readyz, or its socket {})",
                    socket.display()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Everything on the node killed, its runtime state removed.
    fn go_down(&mut self, node: usize, plan: &Plan, report: &mut Report) -> Result<(), String> {
        let node_ns = self.node_ns(node);
        let inodes: Vec<u64> = std::iter::once(node_ns.as_str())
            .chain(plan.netns.iter().map(String::as_str))
            .filter_map(|n| netns_inode(&Path::new("/var/run/netns").join(n)))
            .collect();
        let known: Vec<u32> = plan.kill.iter().map(|(_, pid)| *pid).collect();
        let strays: Vec<(String, u32)> = on_node(&all_processes(), &inodes, &known)
            .into_iter()
            .filter(|pid| *pid != std::process::id())
            .map(|pid| (format!("a process in node-{node}'s namespaces"), pid))
            .collect();
        let victims: Vec<(String, u32)> = plan.kill.iter().cloned().chain(strays).collect();
        // Only processes that are ours (by the lab's marker), and each process group the
        // lab started (a pod's children with it); all before any is waited for.
        let pids: Vec<u32> = victims.iter().map(|(_, p)| *p).collect();
        let ended = crate::ending::end(
            &pids,
            &|p| self.owns(p),
            crate::ending::Ending {
                signal: "KILL",
                group: true,
                wait: Duration::from_secs(5),
                then_kill: false,
            },
        );
        for (role, pid) in victims.iter().filter(|(_, p)| ended.contains(p)) {
            report.events.push(Event::Killed {
                role: role.clone(),
                pid: *pid,
            });
        }
        let roles: Vec<&String> = plan.kill.iter().map(|(r, _)| r).collect();
        self.state.procs.retain(|p| !roles.contains(&&p.role));
        self.save()?;
        // What is left in the pods' cgroups dies with them.
        let cg = self.cgroups()?;
        for uid in &plan.cgroups {
            cg.remove_pod(uid);
            report
                .events
                .push(Event::Removed(format!("cgroup of pod {uid}")));
        }
        for ns in &plan.netns {
            if run(&["ip", "netns", "del", ns]).is_ok() {
                report
                    .events
                    .push(Event::Removed(format!("network namespace {ns}")));
            }
        }
        for f in &plan.files {
            if std::fs::remove_file(f).is_ok() {
                report.events.push(Event::Removed(f.display().to_string()));
            }
        }
        // The node's kernel state made at run time: the pods' bridge, every nftables
        // table (the agent's, kube-proxy's). The uplink and routes are the node's boot
        // configuration: they come back as they were.
        if ns_exec(&node_ns, &["ip", "link", "del", "cni0"]).is_ok() {
            report
                .events
                .push(Event::Removed(format!("bridge cni0 of node-{node}")));
        }
        ns_exec(&node_ns, &["nft", "flush", "ruleset"])?;
        report
            .events
            .push(Event::Removed(format!("nftables ruleset of node-{node}")));
        Ok(())
    }

    /// One attempt at each pending pod's sandbox; those that start leave `pending`.
    fn try_pods(&mut self, node: usize, pending: &mut Vec<String>, report: &mut Report) {
        let keys = std::mem::take(pending);
        for key in keys {
            match self.restart_pod(&key, node) {
                Ok(ip) => report.events.push(Event::PodStarted { pod: key, ip }),
                Err(reason) => {
                    report.events.push(Event::NotStarted {
                        pod: key.clone(),
                        reason,
                    });
                    pending.push(key);
                }
            }
        }
    }

    /// A new sandbox for the existing pod `key`, from its manifest.
    fn restart_pod(&mut self, key: &str, node: usize) -> Result<String, String> {
        let (ns, name) = key
            .split_once('/')
            .ok_or_else(|| format!("pod {key:?}: not namespace/name"))?;
        let path = self.manifest_path("Pod", ns, name);
        let text =
            std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let doc = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        self.start_pod(&doc, node)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(node: usize, uid: &str, netns: &str) -> PodEntry {
        PodEntry {
            namespace: "ns".into(),
            name: uid.into(),
            node,
            netns: netns.into(),
            container_id: format!("c-{uid}"),
            ip: "10.244.0.2".into(),
            ip6: None,
            uid: uid.into(),
            waypoint: false,
        }
    }

    fn proc(role: &str, pid: u32) -> ProcEntry {
        ProcEntry {
            role: role.into(),
            pid,
            log: PathBuf::new(),
            log_offset: 0,
            ztunnel: None,
        }
    }

    fn lab_state() -> (Vec<ProcEntry>, BTreeMap<String, PodEntry>) {
        let pods: BTreeMap<String, PodEntry> = [
            ("back/api".to_string(), pod(2, "u-api", "l-pod-back-api")),
            ("back/wp".to_string(), pod(2, "u-wp", "l-pod-back-wp")),
            ("front/web".to_string(), pod(1, "u-web", "l-pod-front-web")),
        ]
        .into();
        let procs = vec![
            proc("control", 10),
            proc("agent-1", 11),
            proc("ztunnel-1", 12),
            proc("agent-2", 21),
            proc("ztunnel-2", 22),
            proc("pod:back/api", 23),
            proc("pod:back/wp", 24),
            proc("pod:front/web", 13),
            proc("prometheus", 14),
            proc("dashboard", 15),
            proc("agent-12", 99),
        ];
        (procs, pods)
    }

    #[test]
    fn a_node_loses_its_processes_pods_and_runtime_files_only() {
        let (procs, pods) = lab_state();
        let p = plan(
            2,
            &procs,
            &pods,
            Path::new("/s/node2"),
            BootOrder::default(),
        );
        assert_eq!(
            p.kill,
            [
                ("agent-2".to_string(), 21),
                ("ztunnel-2".to_string(), 22),
                ("pod:back/api".to_string(), 23),
                ("pod:back/wp".to_string(), 24),
            ]
        );
        assert_eq!(p.cgroups, ["u-api", "u-wp"]);
        assert_eq!(p.netns, ["l-pod-back-api", "l-pod-back-wp"]);
        assert_eq!(
            p.files,
            [
                "/s/node2/agent.sock",
                "/s/node2/ztunnel.sock",
                "/s/node2/node-pods.json",
                "/s/node2/node-pods.json.tmp"
            ]
            .map(PathBuf::from)
        );
        assert_eq!(
            p.boot,
            [
                Boot::Agent(2),
                Boot::Ztunnel(2),
                Boot::Pods(vec!["back/api".into(), "back/wp".into()])
            ]
        );
    }

    #[test]
    fn node_1_brings_the_control_plane_back_first_and_prometheus_last() {
        let (procs, pods) = lab_state();
        let order: BootOrder = "pods,ztunnel,agent".parse().unwrap();
        let p = plan(1, &procs, &pods, Path::new("/s/node1"), order);
        let killed: Vec<&str> = p.kill.iter().map(|(r, _)| r.as_str()).collect();
        assert_eq!(
            killed,
            [
                "control",
                "agent-1",
                "ztunnel-1",
                "pod:front/web",
                "prometheus",
                "dashboard"
            ]
        );
        assert_eq!(
            p.boot,
            [
                Boot::Control,
                Boot::Pods(vec!["front/web".into()]),
                Boot::Ztunnel(1),
                Boot::Agent(1),
                Boot::Prometheus
            ]
        );
    }

    #[test]
    fn both_ztunnels_of_an_upgrading_node_are_killed() {
        let (mut procs, pods) = lab_state();
        procs.push(proc("ztunnel-2-old", 25));
        let p = plan(2, &procs, &pods, Path::new("/s"), BootOrder::default());
        assert!(p.kill.contains(&("ztunnel-2-old".to_string(), 25)), "{p:?}");
        let p = plan(1, &procs, &pods, Path::new("/s"), BootOrder::default());
        assert!(!p.kill.iter().any(|(r, _)| r == "ztunnel-2-old"), "{p:?}");
    }

    #[test]
    fn the_daemonsets_come_back_even_if_they_were_stopped() {
        let (mut procs, pods) = lab_state();
        procs.retain(|p| p.role != "agent-2");
        let p = plan(2, &procs, &pods, Path::new("/s"), BootOrder::default());
        assert!(p.boot.contains(&Boot::Agent(2)));
        assert!(!p.kill.iter().any(|(r, _)| r == "agent-2"));
    }

    #[test]
    fn boot_orders_name_each_component_once() {
        assert_eq!(
            "ztunnel, agent,pods".parse::<BootOrder>(),
            Ok(BootOrder([
                Component::Ztunnel,
                Component::Agent,
                Component::Pods
            ]))
        );
        for bad in [
            "agent,agent,pods",
            "agent,ztunnel",
            "agent,ztunnel,pods,pods",
            "a,b,c",
        ] {
            assert!(bad.parse::<BootOrder>().is_err(), "{bad}");
        }
        assert_eq!(parse_node("node-2", 2), Ok(2));
        assert_eq!(parse_node("1", 2), Ok(1));
        assert!(parse_node("node-3", 2).is_err());
        assert!(parse_node("node-0", 2).is_err());
    }

    #[test]
    fn strays_are_the_processes_in_the_nodes_namespaces() {
        let procs = [(1, 100), (2, 200), (3, 300), (4, 200)];
        assert_eq!(on_node(&procs, &[200, 300], &[4]), [2, 3]);
        assert!(on_node(&procs, &[], &[]).is_empty());
    }

    #[test]
    fn lost_sandboxes_are_released_before_or_after() {
        assert_eq!("before".parse(), Ok(Release::Before));
        assert_eq!("after".parse(), Ok(Release::After));
        assert!("held".parse::<Release>().is_err());
        assert!("later".parse::<Release>().is_err());
    }

    #[test]
    fn the_retry_wait_grows_to_a_cap() {
        assert_eq!(backoff(0), Duration::from_millis(200));
        assert_eq!(backoff(1), Duration::from_millis(400));
        assert_eq!(backoff(3), Duration::from_millis(1600));
        assert_eq!(backoff(4), Duration::from_secs(2));
        assert_eq!(backoff(60), Duration::from_secs(2));
    }
}
