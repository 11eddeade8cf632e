//! `mesh-lab upgrade ztunnel-N [--binary PATH]`: a new ztunnel starts on node N beside
//! the running one, as a DaemonSet surges its pod. The old process keeps what it serves;
//! the node agent hands every pod to the new one. Once the new one is ready the lab
//! sends the old one SIGTERM, as the DaemonSet controller does when the surged pod is
//! ready: a handed-over ztunnel notes it and exits once its connections are done (it
//! never exits before that signal, as Kubernetes would restart it).
//!
//! Both processes run in the node's network namespace, so their admin, metrics and
//! readiness ports must differ: each node generation takes one of two port sets in turn
//! ([`PORT_SETS`]), recorded with the process in the lab's state. The node's installed
//! ztunnel is a symlink in its state directory ([`Lab::node_ztunnel_exe`]): the agent
//! accepts on its ZDS socket only a process running that file, so an upgrade to another
//! binary points the link at it before the new process starts.
//!
//! `mesh-lab upgrade agent-N [--binary PATH]` restarts the node agent from the new
//! binary (its own node symlink too): traffic never passes through the agent.
//!
//! The decisions (which ports, which roles, which arguments) are [`plan`], [`next_run`]
//! and [`args`]; the rest is a thin shell over the lab.

use crate::lab::{Lab, ProcEntry};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long a new ztunnel may take to be ready (configuration and pod snapshot).
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// The ports of one ztunnel process in its node's namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ZtunnelPorts {
    pub admin: u16,
    pub metrics: u16,
    pub readiness: u16,
}

/// The two port sets node generations take in turn: ztunnel's defaults, then the same
/// shifted by 100.
pub const PORT_SETS: [ZtunnelPorts; 2] = [
    ZtunnelPorts {
        admin: 15000,
        metrics: 15020,
        readiness: 15021,
    },
    ZtunnelPorts {
        admin: 15100,
        metrics: 15120,
        readiness: 15121,
    },
];

/// Which ztunnel of its node a process is: its generation (0 for the first after the
/// node came up or after all its ztunnels were stopped) and its ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ZtunnelRun {
    pub generation: u32,
    pub ports: ZtunnelPorts,
}

impl ZtunnelRun {
    pub fn new(generation: u32) -> ZtunnelRun {
        ZtunnelRun {
            generation,
            ports: PORT_SETS[(generation % 2) as usize],
        }
    }

    /// The file name (without `.log`) of this generation's log on `node`: the first
    /// keeps the name it always had; later ones get their own, as two processes write
    /// at the same time.
    pub fn log_name(&self, node: usize) -> String {
        match self.generation {
            0 => current_role(node),
            g => format!("{}.gen{g}", current_role(node)),
        }
    }
}

/// The run recorded for a ztunnel process (one recorded before ports were recorded ran
/// with ztunnel's defaults).
pub fn run_of(p: &ProcEntry) -> ZtunnelRun {
    p.ztunnel.unwrap_or(ZtunnelRun::new(0))
}

/// The role of node `node`'s current ztunnel.
pub fn current_role(node: usize) -> String {
    format!("ztunnel-{node}")
}

/// The role of the ztunnel an upgrade of node `node` replaced, while it finishes.
pub fn old_role(node: usize) -> String {
    format!("ztunnel-{node}-old")
}

/// The node of a ztunnel role (`ztunnel-N` or `ztunnel-N-old`).
pub fn node_of(role: &str) -> Option<usize> {
    let rest = role.strip_prefix("ztunnel-")?;
    rest.strip_suffix("-old").unwrap_or(rest).parse().ok()
}

/// Why an upgrade cannot start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    NoSuchNode { given: String, nodes: usize },
    NotRunning { node: usize },
    OldStillRunning { node: usize, pid: u32 },
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refused::NoSuchNode { given, nodes } => write!(
                f,
                "no component {given:?} to upgrade: give ztunnel-1 .. ztunnel-{nodes} or agent-1 .. agent-{nodes}"
            ),
            Refused::NotRunning { node } => write!(
                f,
                "ztunnel-{node} is not running: an upgrade hands over from a running ztunnel \
                 (start it with `mesh-lab start ztunnel-{node}`)"
            ),
            Refused::OldStillRunning { node, pid } => write!(
                f,
                "ztunnel-{node}-old (pid {pid}) from the last upgrade still serves connections \
                 and holds the other ports: wait for it to exit, or end it with \
                 `mesh-lab stop ztunnel-{node}-old`"
            ),
        }
    }
}

/// What an upgrade of one node's ztunnel does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub node: usize,
    /// The running ztunnel (its PID), recorded as `ztunnel-N-old` from now on.
    pub retire: u32,
    /// The record of an earlier old ztunnel that has exited, dropped.
    pub forget: Option<u32>,
    /// The new process, recorded as `ztunnel-N`.
    pub run: ZtunnelRun,
}

/// The upgrade of node `node`'s ztunnel, from the lab's records (`alive`: whether a
/// PID's process runs).
pub fn plan(
    node: usize,
    procs: &[ProcEntry],
    alive: &dyn Fn(u32) -> bool,
) -> Result<Plan, Refused> {
    let current = procs
        .iter()
        .find(|p| p.role == current_role(node) && alive(p.pid))
        .ok_or(Refused::NotRunning { node })?;
    let old = procs.iter().find(|p| p.role == old_role(node));
    if let Some(o) = old.filter(|o| alive(o.pid)) {
        return Err(Refused::OldStillRunning { node, pid: o.pid });
    }
    Ok(Plan {
        node,
        retire: current.pid,
        forget: old.map(|o| o.pid),
        run: ZtunnelRun::new(run_of(current).generation + 1),
    })
}

/// The run of a ztunnel started on node `node` (`mesh-lab start`, a reboot): after a
/// still running old one, the other port set; otherwise the first generation.
pub fn next_run(node: usize, procs: &[ProcEntry], alive: &dyn Fn(u32) -> bool) -> ZtunnelRun {
    procs
        .iter()
        .find(|p| p.role == old_role(node) && alive(p.pid))
        .map_or(ZtunnelRun::new(0), |o| {
            ZtunnelRun::new(run_of(o).generation + 1)
        })
}

/// A ztunnel's command line: `exe`, the node's arguments (`base`), and its ports, on
/// the addresses ztunnel's defaults use (admin on loopback only).
pub fn args(exe: &str, base: &[String], ports: ZtunnelPorts) -> Vec<String> {
    let mut a = vec![exe.to_string()];
    a.extend(base.iter().cloned());
    a.extend([
        "--admin-addr".into(),
        format!("127.0.0.1:{}", ports.admin),
        "--metrics-addr".into(),
        format!("[::]:{}", ports.metrics),
        "--readiness-addr".into(),
        format!("[::]:{}", ports.readiness),
    ]);
    a
}

/// What `mesh-lab upgrade ztunnel-N` did.
#[derive(Debug, Clone)]
pub struct Upgraded {
    pub node: usize,
    pub old_pid: u32,
    pub new_pid: u32,
    pub ports: ZtunnelPorts,
    pub exe: PathBuf,
    /// Where the old process was when the upgrade returned.
    pub old: OldZtunnel,
}

/// The replaced ztunnel once the new one is ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OldZtunnel {
    /// It stopped accepting and serves its established connections until they end.
    Draining,
    /// It had nothing left to serve and exited.
    Exited,
    /// It still accepts new connections (the node agent has not handed it over).
    Accepting,
    /// It reports no `ztunnel_accepting`: a ztunnel without the handover, which keeps
    /// accepting until stopped.
    NoHandover,
}

impl OldZtunnel {
    /// From what the lab sees of it: whether it runs, and its `ztunnel_accepting`.
    pub fn of(alive: bool, accepting: Option<bool>) -> OldZtunnel {
        match (alive, accepting) {
            (false, _) => OldZtunnel::Exited,
            (true, Some(false)) => OldZtunnel::Draining,
            (true, Some(true)) => OldZtunnel::Accepting,
            (true, None) => OldZtunnel::NoHandover,
        }
    }

    /// Whether the lab sends it SIGTERM now that the new one is ready: as the DaemonSet
    /// controller does for any old pod that still runs.
    pub fn to_signal(self) -> bool {
        self != OldZtunnel::Exited
    }

    fn describe(self, node: usize) -> String {
        match self {
            OldZtunnel::Draining => {
                "stopped accepting and got SIGTERM; it serves its established connections and exits when they end".into()
            }
            OldZtunnel::Exited => "had no connections left and exited".into(),
            OldZtunnel::Accepting => {
                "was still accepting new connections (the node agent had not handed it over: see its log and the agent's); SIGTERM drains it".into()
            }
            OldZtunnel::NoHandover => format!(
                "reports no handover: SIGTERM drains it, as Kubernetes does (`mesh-lab stop ztunnel-{node}-old --kill` ends it now)"
            ),
        }
    }
}

impl fmt::Display for Upgraded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.node;
        write!(
            f,
            "ztunnel-{n} pid {} is ready ({}; admin {}, metrics {}, readiness {})\n\
             ztunnel-{n}-old pid {} {}",
            self.new_pid,
            self.exe.display(),
            self.ports.admin,
            self.ports.metrics,
            self.ports.readiness,
            self.old_pid,
            self.old.describe(n),
        )
    }
}

/// What `mesh-lab upgrade` upgrades.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Component {
    Ztunnel(usize),
    Agent(usize),
}

/// `ztunnel-N` or `agent-N`, for a lab of `nodes` nodes.
pub fn parse_component(s: &str, nodes: usize) -> Result<Component, Refused> {
    let node = |prefix: &str| {
        s.strip_prefix(prefix)
            .and_then(|n| n.parse().ok())
            .filter(|n| (1..=nodes).contains(n))
    };
    node("ztunnel-")
        .map(Component::Ztunnel)
        .or_else(|| node("agent-").map(Component::Agent))
        .ok_or_else(|| Refused::NoSuchNode {
            given: s.to_string(),
            nodes,
        })
}

/// `mesh-lab upgrade COMPONENT [--binary PATH]`: what it did, for the terminal.
pub fn run(lab: &mut Lab, component: &str, binary: Option<&Path>) -> Result<String, String> {
    match parse_component(component, lab.state.nodes).map_err(|e| e.to_string())? {
        Component::Ztunnel(n) => lab.upgrade_ztunnel(n, binary).map(|u| u.to_string()),
        Component::Agent(n) => lab.upgrade_agent(n, binary),
    }
}

/// The binary an upgrade installs: `binary` (resolved), or the lab's `default`.
fn resolve_binary(binary: Option<&Path>, default: PathBuf) -> Result<PathBuf, String> {
    let exe = match binary {
        Some(b) => {
            std::fs::canonicalize(b).map_err(|e| format!("--binary {}: {e}", b.display()))?
        }
        None => default,
    };
    if !is_executable(&exe) {
        return Err(format!("{} is not an executable file", exe.display()));
    }
    Ok(exe)
}

impl Lab {
    /// The node's installed ztunnel: a symlink in its state directory that the node
    /// agent checks ZDS peers against. Made pointing at the lab's ztunnel when missing.
    pub fn node_ztunnel_exe(&self, node: usize) -> Result<PathBuf, String> {
        self.node_exe(node, "ztunnel")
    }

    /// The node's installed `name` (ztunnel, mesh-cni): a symlink `node<N>/<name>-exe`
    /// that upgrades repoint, made pointing at the lab's binary when missing.
    pub fn node_exe(&self, node: usize, name: &str) -> Result<PathBuf, String> {
        let link = self.dir.join(format!("node{node}/{name}-exe"));
        if std::fs::symlink_metadata(&link).is_err() {
            point_link(&link, &self.bin_dir.join(name))?;
        }
        Ok(link)
    }

    /// `mesh-lab upgrade agent-N`: the node agent restarted from `binary` (or the
    /// lab's), waited for until ready. Traffic never passes through the agent.
    pub fn upgrade_agent(&mut self, node: usize, binary: Option<&Path>) -> Result<String, String> {
        if !self.is_up() {
            return Err(format!("lab {} is not up", self.name));
        }
        let exe = resolve_binary(binary, self.bin_dir.join("mesh-cni"))?;
        let role = format!("agent-{node}");
        let old = self.process(&role).map(|p| p.pid);
        let link = self.node_exe(node, "mesh-cni")?;
        let before = std::fs::read_link(&link).map_err(|e| format!("{}: {e}", link.display()))?;
        if old.is_some() {
            self.stop(&role, false)?;
        }
        // Its sockets and port are the new one's only once it is gone.
        if let Some(pid) = old.filter(|p| !wait_gone(*p, Duration::from_secs(10))) {
            crate::ending::end(
                &[pid],
                &|p| self.owns(p),
                crate::ending::Ending {
                    signal: "KILL",
                    group: false,
                    wait: Duration::from_secs(2),
                    then_kill: false,
                },
            );
        }
        point_link(&link, &exe)?;
        let started = self
            .start_agent(node)
            .and_then(|()| self.wait_agent_ready(node));
        if let Err(e) = started {
            let _ = self.stop(&role, true);
            let _ = point_link(&link, &before);
            return Err(format!(
                "the new agent-{node} did not start: {e} (`mesh-lab start agent-{node}` starts the previous binary again)"
            ));
        }
        let new = self.process(&role).map_or(0, |p| p.pid);
        Ok(match old {
            Some(old) => format!(
                "agent-{node} pid {new} is ready ({}); pid {old} ended",
                exe.display()
            ),
            None => format!("agent-{node} pid {new} is ready ({})", exe.display()),
        })
    }

    /// Starts a ztunnel on node `node` as `run` says, from the node's installed binary,
    /// recorded as `ztunnel-N`.
    pub(crate) fn spawn_ztunnel(&mut self, node: usize, run: ZtunnelRun) -> Result<u32, String> {
        let link = self.node_ztunnel_exe(node)?;
        let exe = std::fs::canonicalize(&link)
            .map_err(|e| format!("{}: {e} (the node's installed ztunnel)", link.display()))?;
        let cmd = args(&exe.to_string_lossy(), &self.ztunnel_args(node), run.ports);
        let role = current_role(node);
        let ns = self.node_ns(node);
        let pid = self.spawn_logged(&role, &run.log_name(node), &ns, &cmd, None)?;
        if let Some(p) = self.state.procs.iter_mut().find(|p| p.pid == pid) {
            p.ztunnel = Some(run);
        }
        self.save()?;
        Ok(pid)
    }

    /// The ports of the process recorded for `role` (a ztunnel's).
    pub fn ztunnel_ports(&self, role: &str) -> Option<ZtunnelPorts> {
        self.process(role)
            .filter(|p| node_of(&p.role).is_some())
            .map(|p| run_of(p).ports)
    }

    /// `mesh-lab upgrade ztunnel-N`: a new ztunnel (from `binary`, or the lab's) beside
    /// the running one, waited for until ready, then until the old one stops accepting
    /// (when it reports the handover); the running one recorded as `ztunnel-N-old`. If
    /// the new one does not become ready it is ended and the node left as it was (if
    /// the old one was already handed over, the error says so).
    pub fn upgrade_ztunnel(
        &mut self,
        node: usize,
        binary: Option<&Path>,
    ) -> Result<Upgraded, String> {
        if !self.is_up() {
            return Err(format!("lab {} is not up", self.name));
        }
        let plan =
            plan(node, &self.state.procs, &crate::ending::alive).map_err(|e| e.to_string())?;
        let exe = resolve_binary(binary, self.bin_dir.join("ztunnel"))?;
        let link = self.node_ztunnel_exe(node)?;
        let before = std::fs::read_link(&link).map_err(|e| format!("{}: {e}", link.display()))?;
        if let Some(pid) = plan.forget {
            self.state
                .procs
                .retain(|p| !(p.role == old_role(node) && p.pid == pid));
        }
        self.rename_process(plan.retire, &old_role(node));
        self.save()?;
        point_link(&link, &exe)?;
        let started = self
            .spawn_ztunnel(node, plan.run)
            .and_then(|pid| self.wait_ztunnel_ready(node, plan.run.ports).map(|()| pid));
        match started {
            Ok(new_pid) => {
                let old = self.wait_handed_over(node, plan.retire);
                if old.to_signal() {
                    self.signal_old(plan.retire);
                }
                Ok(Upgraded {
                    node,
                    old_pid: plan.retire,
                    new_pid,
                    ports: plan.run.ports,
                    exe,
                    old,
                })
            }
            Err(e) => {
                // Back as it was: the new process gone, the old one current again,
                // unless the agent already handed it over (it takes nothing back).
                let _ = self.stop(&current_role(node), true);
                let _ = point_link(&link, &before);
                let old = self.old_ztunnel_now(node, plan.retire);
                if old == OldZtunnel::Accepting || old == OldZtunnel::NoHandover {
                    self.rename_process(plan.retire, &current_role(node));
                    self.save()?;
                    return Err(format!("the new ztunnel-{node} did not start: {e}"));
                }
                self.save()?;
                Err(format!(
                    "the new ztunnel-{node} did not start: {e}\nztunnel-{node}-old pid {} {}; \
                     node-{node} needs a new ztunnel: `mesh-lab start ztunnel-{node}`",
                    plan.retire,
                    old.describe(node)
                ))
            }
        }
    }

    /// SIGTERM to the old ztunnel `pid` (the lab's own only), without waiting: it exits
    /// once its connections end.
    fn signal_old(&self, pid: u32) {
        crate::ending::end(
            &[pid],
            &|p| self.owns(p),
            crate::ending::Ending {
                signal: "TERM",
                group: false,
                wait: Duration::ZERO,
                then_kill: false,
            },
        );
    }

    /// Waits until the old ztunnel `pid` of node `node` stops accepting (the node agent
    /// hands it over once the new one has every pod), or exits.
    fn wait_handed_over(&self, node: usize, pid: u32) -> OldZtunnel {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let old = self.old_ztunnel_now(node, pid);
            if old != OldZtunnel::Accepting || Instant::now() > deadline {
                return old;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Where the old ztunnel `pid` of node `node` is now (no waiting).
    fn old_ztunnel_now(&self, node: usize, pid: u32) -> OldZtunnel {
        let port = self
            .state
            .procs
            .iter()
            .find(|p| p.pid == pid)
            .map_or(PORT_SETS[0].metrics, |p| run_of(p).ports.metrics);
        let netns = Path::new("/var/run/netns").join(self.node_ns(node));
        let page = http_get(&netns, port, "/metrics");
        // The process is looked at after its page: one that exits meanwhile answers
        // nothing, and is Exited rather than NoHandover.
        OldZtunnel::of(
            crate::ending::alive(pid),
            page.as_deref().and_then(accepting),
        )
    }

    fn rename_process(&mut self, pid: u32, role: &str) {
        if let Some(p) = self.state.procs.iter_mut().find(|p| p.pid == pid) {
            p.role = role.to_string();
        }
    }

    /// Waits until node `node`'s ztunnel on `ports` answers ready (its `/healthz/ready`:
    /// configuration and pod snapshot received).
    fn wait_ztunnel_ready(&self, node: usize, ports: ZtunnelPorts) -> Result<(), String> {
        let role = current_role(node);
        let netns = Path::new("/var/run/netns").join(self.node_ns(node));
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let p = self
                .process(&role)
                .ok_or(format!("{role} is not recorded"))?;
            // The answer must be the new process's: a stopped ztunnel still draining
            // may hold the same port.
            if listens(p.pid, ports.readiness) && http_ok(&netns, ports.readiness, "/healthz/ready")
            {
                return Ok(());
            }
            if !crate::ending::alive(p.pid) {
                return Err(format!("{role} exited (see {})", p.log.display()));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{role} was not ready within {}s (its port {}; see {})",
                    READY_TIMEOUT.as_secs(),
                    ports.readiness,
                    p.log.display()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Points symlink `link` at `target`, atomically (the agent may check it at any time).
pub(crate) fn point_link(link: &Path, target: &Path) -> Result<(), String> {
    let tmp = link.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, link).map_err(|e| format!("{}: {e}", link.display()))
}

/// The socket inodes listening on TCP port `port` in a `/proc/<pid>/net/tcp{,6}` table.
pub fn listening_inodes(table: &str, port: u16) -> Vec<u64> {
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let local_port = f.get(1)?.rsplit_once(':')?.1;
            let listening = *f.get(3)? == "0A";
            (listening && u16::from_str_radix(local_port, 16).ok()? == port)
                .then(|| f.get(9)?.parse().ok())
                .flatten()
        })
        .collect()
}

/// Process `pid` holds a socket listening on TCP port `port` (in its namespace).
fn listens(pid: u32, port: u16) -> bool {
    let inodes: Vec<u64> = ["tcp", "tcp6"]
        .iter()
        .filter_map(|t| std::fs::read_to_string(format!("/proc/{pid}/net/{t}")).ok())
        .flat_map(|table| listening_inodes(&table, port))
        .collect();
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten().any(|fd| {
        std::fs::read_link(fd.path()).is_ok_and(|l| {
            l.to_string_lossy()
                .strip_prefix("socket:[")
                .and_then(|r| r.strip_suffix(']'))
                .and_then(|n| n.parse::<u64>().ok())
                .is_some_and(|n| inodes.contains(&n))
        })
    })
}

/// Waits up to `timeout` for process `pid` to be gone; whether it is.
fn wait_gone(pid: u32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while crate::ending::alive(pid) {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    true
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// GET `path` on 127.0.0.1:`port` inside namespace `netns` answers 200.
fn http_ok(netns: &Path, port: u16, path: &str) -> bool {
    http_get(netns, port, path).is_some()
}

/// The body of a 200 answer to GET `path` on 127.0.0.1:`port` inside namespace `netns`.
fn http_get(netns: &Path, port: u16, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let (netns, path) = (netns.to_path_buf(), path.to_string());
    // A thread of its own: entering a namespace changes the calling thread only.
    std::thread::spawn(move || -> std::io::Result<Option<String>> {
        let f = std::fs::File::open(&netns)?;
        nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(std::io::Error::from)?;
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: ztunnel\r\n\r\n").as_bytes())?;
        let mut answer = Vec::new();
        s.read_to_end(&mut answer)?;
        let answer = String::from_utf8_lossy(&answer);
        let ok = answer
            .lines()
            .next()
            .is_some_and(|l| l.ends_with(" 200 OK") || l.ends_with(" 200"));
        Ok(ok.then(|| {
            answer
                .split_once("\r\n\r\n")
                .map_or(String::new(), |(_, b)| b.to_string())
        }))
    })
    .join()
    .ok()
    .and_then(|r| r.ok().flatten())
}

/// A ztunnel's `ztunnel_accepting` gauge in its metrics page; `None` when it has none.
pub fn accepting(page: &str) -> Option<bool> {
    page.lines()
        .find_map(|l| l.strip_prefix("ztunnel_accepting "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v != 0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proc(role: &str, pid: u32, generation: Option<u32>) -> ProcEntry {
        ProcEntry {
            role: role.into(),
            pid,
            log: "/dev/null".into(),
            log_offset: 0,
            ztunnel: generation.map(ZtunnelRun::new),
        }
    }

    fn alive_but(dead: &'static [u32]) -> impl Fn(u32) -> bool {
        move |p| !dead.contains(&p)
    }

    #[test]
    fn the_first_upgrade_takes_the_other_port_set_and_retires_the_running_one() {
        let procs = [
            proc("agent-1", 10, None),
            proc("ztunnel-1", 11, Some(0)),
            proc("ztunnel-2", 21, Some(0)),
        ];
        let p = plan(1, &procs, &alive_but(&[])).unwrap();
        assert_eq!(
            p,
            Plan {
                node: 1,
                retire: 11,
                forget: None,
                run: ZtunnelRun {
                    generation: 1,
                    ports: PORT_SETS[1]
                },
            }
        );
        assert_eq!(p.run.ports.metrics, 15120);
    }

    #[test]
    fn port_sets_alternate_by_generation_and_never_collide() {
        let sets: Vec<ZtunnelPorts> = (0..4).map(|g| ZtunnelRun::new(g).ports).collect();
        assert_eq!(
            sets,
            [PORT_SETS[0], PORT_SETS[1], PORT_SETS[0], PORT_SETS[1]]
        );
        let a = PORT_SETS[0];
        let b = PORT_SETS[1];
        for x in [a.admin, a.metrics, a.readiness] {
            assert!(![b.admin, b.metrics, b.readiness].contains(&x));
        }
        // A process recorded before ports were recorded ran with ztunnel's defaults.
        assert_eq!(run_of(&proc("ztunnel-1", 1, None)).ports, PORT_SETS[0]);
    }

    #[test]
    fn a_second_upgrade_waits_for_the_old_process_and_forgets_it_once_exited() {
        let procs = [
            proc("ztunnel-1-old", 11, Some(0)),
            proc("ztunnel-1", 12, Some(1)),
        ];
        assert_eq!(
            plan(1, &procs, &alive_but(&[])),
            Err(Refused::OldStillRunning { node: 1, pid: 11 })
        );
        let p = plan(1, &procs, &alive_but(&[11])).unwrap();
        assert_eq!((p.retire, p.forget), (12, Some(11)));
        assert_eq!(p.run, ZtunnelRun::new(2));
        assert_eq!(p.run.ports, PORT_SETS[0]);
    }

    #[test]
    fn no_upgrade_without_a_running_ztunnel() {
        assert_eq!(
            plan(2, &[proc("ztunnel-1", 11, Some(0))], &alive_but(&[])),
            Err(Refused::NotRunning { node: 2 })
        );
        assert_eq!(
            plan(1, &[proc("ztunnel-1", 11, Some(0))], &alive_but(&[11])),
            Err(Refused::NotRunning { node: 1 })
        );
        let msg = Refused::NotRunning { node: 1 }.to_string();
        assert!(msg.contains("mesh-lab start ztunnel-1"), "{msg}");
    }

    #[test]
    fn a_started_ztunnel_avoids_the_ports_of_a_running_old_one() {
        assert_eq!(next_run(1, &[], &alive_but(&[])), ZtunnelRun::new(0));
        let procs = [
            proc("ztunnel-1-old", 11, Some(0)),
            proc("ztunnel-2-old", 21, Some(1)),
        ];
        assert_eq!(next_run(1, &procs, &alive_but(&[])).ports, PORT_SETS[1]);
        assert_eq!(next_run(2, &procs, &alive_but(&[])).ports, PORT_SETS[0]);
        // An old one that has exited holds nothing.
        assert_eq!(next_run(1, &procs, &alive_but(&[11])), ZtunnelRun::new(0));
    }

    #[test]
    fn the_command_line_carries_the_ports_on_ztunnels_default_addresses() {
        let base = vec!["--node-name".to_string(), "node-1".to_string()];
        assert_eq!(
            args("/bin/zt", &base, PORT_SETS[1]),
            [
                "/bin/zt",
                "--node-name",
                "node-1",
                "--admin-addr",
                "127.0.0.1:15100",
                "--metrics-addr",
                "[::]:15120",
                "--readiness-addr",
                "[::]:15121"
            ]
        );
    }

    #[test]
    fn listening_sockets_are_found_by_port_and_state() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:3A98 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 111 1 0 100 0 0 10 0
   1: 00000000:3ACD 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 222 1 0 100 0 0 10 0
   2: 0100007F:3ACD 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 333 1 0 20 4 30 10 -1
";
        // 0x3ACD = 15053: the listener only, not an established connection to it.
        assert_eq!(listening_inodes(table, 15053), [222]);
        assert_eq!(listening_inodes(table, 15000), [111]);
        assert!(listening_inodes(table, 15021).is_empty());
        let table6 = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:3ACD 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 444 1 0 100 0 0 10 0
";
        assert_eq!(listening_inodes(table6, 15053), [444]);
    }

    #[test]
    fn the_old_ztunnel_is_told_apart_by_its_process_and_gauge() {
        assert_eq!(OldZtunnel::of(false, None), OldZtunnel::Exited);
        assert_eq!(OldZtunnel::of(false, Some(true)), OldZtunnel::Exited);
        assert_eq!(OldZtunnel::of(true, Some(false)), OldZtunnel::Draining);
        assert_eq!(OldZtunnel::of(true, Some(true)), OldZtunnel::Accepting);
        assert_eq!(OldZtunnel::of(true, None), OldZtunnel::NoHandover);
        assert!(
            OldZtunnel::NoHandover
                .describe(2)
                .contains("mesh-lab stop ztunnel-2-old")
        );
        // The DaemonSet controller signals every old pod still running.
        assert!(OldZtunnel::Draining.to_signal());
        assert!(OldZtunnel::Accepting.to_signal());
        assert!(OldZtunnel::NoHandover.to_signal());
        assert!(!OldZtunnel::Exited.to_signal());
    }

    #[test]
    fn the_accepting_gauge_is_read_when_reported() {
        let page =
            "# TYPE ztunnel_accepting gauge\nztunnel_accepting 0\nztunnel_open_connections 3\n";
        assert_eq!(accepting(page), Some(false));
        assert_eq!(accepting("ztunnel_accepting 1\n"), Some(true));
        assert_eq!(
            accepting("istio_build 1\n"),
            None,
            "a ztunnel without the handover"
        );
    }

    #[test]
    fn roles_and_logs_name_the_node_and_generation() {
        assert_eq!(node_of("ztunnel-3"), Some(3));
        assert_eq!(node_of("ztunnel-3-old"), Some(3));
        assert_eq!(node_of("ztunnel-x"), None);
        assert_eq!(node_of("agent-3"), None);
        assert_eq!(ZtunnelRun::new(0).log_name(2), "ztunnel-2");
        assert_eq!(ZtunnelRun::new(3).log_name(2), "ztunnel-2.gen3");
        assert_eq!(parse_component("ztunnel-2", 2), Ok(Component::Ztunnel(2)));
        assert_eq!(parse_component("agent-1", 2), Ok(Component::Agent(1)));
        assert!(parse_component("ztunnel-3", 2).is_err());
        assert!(parse_component("agent-0", 2).is_err());
        let refused = parse_component("node-1", 2).unwrap_err().to_string();
        assert!(refused.contains("ztunnel-1 .. ztunnel-2"), "{refused}");
    }
}
