//! `mesh-lab rollout waypoint NS/NAME`: replaces a waypoint's pod the way a Deployment
//! with `maxSurge: 1, maxUnavailable: 0` does, the lab playing kubelet and the endpoints
//! controller, so that no request is dropped:
//!
//! 1. the new pod starts (new name, same labels, service account and token) with
//!    Ready=False; the lab plays its readiness probe and marks it Ready only once its own
//!    `/healthz/ready` answers 200;
//! 2. every node's ztunnel lists it as healthy before anything happens to the old pod;
//! 3. the old pod leaves the endpoints first (Ready=False, `deletionTimestamp` set), and
//!    only when no ztunnel lists it as healthy any more is it sent SIGTERM: it drains
//!    (requests in flight finish, HTTP/2 clients get GOAWAY) and exits by itself. It is
//!    SIGKILLed only if it outlives its drain delay and deadline plus a margin, as a
//!    kubelet does after `terminationGracePeriodSeconds`. With [`Order::Kubernetes`] it
//!    is sent SIGTERM as it leaves the endpoints, as in a cluster: the ztunnels that
//!    still send to it for a moment are covered by its drain delay alone;
//! 4. its sandbox and manifest are removed.
//!
//! If the new pod never becomes ready (or known to every ztunnel), it is removed again
//! and the old pod, untouched, keeps serving.
//!
//! The order is decided by [`plan`]; the checks it waits on are pure functions over what
//! the components answer ([`listing`], [`probe_passes`]); the rest is a thin shell.

use crate::lab::{Lab, random_hex};
use serde_json::{Value, json};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

/// The label that ties a waypoint's pods to its Gateway.
const GATEWAY_LABEL: &str = "gateway.networking.k8s.io/gateway-name";
/// Where the waypoint answers its readiness probe (Istio's port).
const READINESS_PORT: u16 = 15021;
const READINESS_PATH: &str = "/healthz/ready";
/// The waypoint's own default `--drain-deadline`.
const DEFAULT_DRAIN: Duration = Duration::from_secs(5);
/// Beyond the drain deadline, how long the old pod may take to exit before SIGKILL.
const GRACE_MARGIN: Duration = Duration::from_secs(5);
/// How long the new pod may take to become ready, and the mesh to see a change.
const PROGRESS_DEADLINE: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(100);

/// When the old pod is told to stop.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Order {
    /// Once no ztunnel sends to it any more (stricter than a cluster).
    #[default]
    EndpointsFirst,
    /// As it leaves the endpoints, as Kubernetes does: its drain delay is the only cover.
    Kubernetes,
}

/// One step of a rollout, in the order [`plan`] gives them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Start the new pod, not ready.
    Start { new: String },
    /// Play its readiness probe until it passes, then mark it Ready.
    AwaitReady { new: String },
    /// Wait until every node's ztunnel lists it as healthy.
    AwaitListedHealthy { new: String },
    /// Take the old pod out of the endpoints (Ready=False, terminating).
    TakeOut { old: String },
    /// Wait until no node's ztunnel lists it as healthy.
    AwaitUnlisted { old: String },
    /// SIGTERM it and wait for it to exit (SIGKILL only after its grace period).
    Terminate { old: String },
    /// Remove its sandbox and manifest.
    Remove { old: String },
}

/// The steps that replace the pods `old` with the pod `new`, one surge pod at a time
/// and never fewer ready pods than before: the new pod is ready and known to every
/// ztunnel before any old pod leaves, and each old pod leaves the endpoints before (or,
/// in [`Order::Kubernetes`], as) it is told to stop.
pub fn plan(old: &[String], new: &str, order: Order) -> Vec<Step> {
    let new = new.to_string();
    let mut steps = vec![
        Step::Start { new: new.clone() },
        Step::AwaitReady { new: new.clone() },
        Step::AwaitListedHealthy { new },
    ];
    for o in old {
        steps.push(Step::TakeOut { old: o.clone() });
        if order == Order::EndpointsFirst {
            steps.push(Step::AwaitUnlisted { old: o.clone() });
        }
        steps.extend([
            Step::Terminate { old: o.clone() },
            Step::Remove { old: o.clone() },
        ]);
    }
    steps
}

/// Whether a rollout that failed at `step` removes its new pod again: only while no old
/// pod has been touched (the old pods then serve as before the rollout).
pub fn rolls_back(step: &Step) -> bool {
    matches!(
        step,
        Step::AwaitReady { .. } | Step::AwaitListedHealthy { .. }
    )
}

/// Whether pod manifest `doc` can be the new pod's template: Ready and not terminating
/// (a pod left over from an interrupted rollout is neither).
pub fn is_template(doc: &Value) -> bool {
    doc["metadata"].get("deletionTimestamp").is_none()
        && doc["status"]["conditions"].as_array().is_some_and(|cs| {
            cs.iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        })
}

/// A container's whole command line: `command` then `args`, as the kubelet runs it.
pub fn container_argv(container: &Value) -> Vec<String> {
    ["command", "args"]
        .iter()
        .flat_map(|k| container[*k].as_array().cloned().unwrap_or_default())
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect()
}

/// The name of the pod that replaces Gateway `gateway`'s: the Gateway's name and a
/// random suffix, as a ReplicaSet names its pods.
pub fn surge_name(gateway: &str, suffix: &str) -> String {
    format!("{gateway}-{suffix}")
}

/// How a ztunnel's `/config_dump` lists the workload with address `ip`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listing {
    Healthy,
    Unhealthy,
    Absent,
}

/// What `dump` (a ztunnel's `/config_dump`) says of the workload at `ip`.
pub fn listing(dump: &Value, ip: &str) -> Listing {
    let found = dump["workloads"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|w| {
            w["workloadIps"]
                .as_array()
                .is_some_and(|ips| ips.iter().any(|a| a.as_str() == Some(ip)))
        });
    match found {
        None => Listing::Absent,
        Some(w) if w["status"] == "Healthy" => Listing::Healthy,
        Some(_) => Listing::Unhealthy,
    }
}

/// A readiness probe's answer passes as a kubelet counts it: 200 to 399.
pub fn probe_passes(status: u16) -> bool {
    (200..400).contains(&status)
}

/// The new pod's manifest, made from an old pod's: a new name, no UID, no node (the
/// scheduler picks), no status, the waypoint binary replaced by `binary` if given, and a
/// readiness probe (the lab plays it before the pod gets traffic).
pub fn surge_pod(old: &Value, new_name: &str, binary: Option<&str>) -> Value {
    let mut doc = old.clone();
    doc["metadata"]["name"] = json!(new_name);
    if let Some(meta) = doc["metadata"].as_object_mut() {
        for k in ["uid", "deletionTimestamp", "resourceVersion"] {
            meta.remove(k);
        }
    }
    if let Some(spec) = doc["spec"].as_object_mut() {
        spec.remove("nodeName");
    }
    if let Some(o) = doc.as_object_mut() {
        o.remove("status");
    }
    let container = &mut doc["spec"]["containers"][0];
    if let Some(bin) = binary
        && let Some(cmd) = container["command"].as_array_mut()
        && !cmd.is_empty()
    {
        cmd[0] = json!(bin);
    }
    container["readinessProbe"] = json!({
        "httpGet": {"path": READINESS_PATH, "port": READINESS_PORT},
        "periodSeconds": 1,
    });
    doc
}

/// `doc` (a pod's manifest) with its Ready condition set to `ready`.
pub fn with_ready(doc: &Value, ready: bool) -> Value {
    let mut doc = doc.clone();
    let value = json!(if ready { "True" } else { "False" });
    let conditions = &mut doc["status"]["conditions"];
    match conditions
        .as_array_mut()
        .and_then(|cs| cs.iter_mut().find(|c| c["type"] == "Ready"))
    {
        Some(c) => c["status"] = value,
        None => {
            let mut cs = conditions.as_array().cloned().unwrap_or_default();
            cs.push(json!({"type": "Ready", "status": value}));
            *conditions = Value::Array(cs);
        }
    }
    doc
}

/// `doc` as the API server holds a pod being deleted: `deletionTimestamp` set (`now`,
/// RFC 3339) and not Ready, so that the endpoints drop it before its process is told to
/// stop.
pub fn terminating(doc: &Value, now: &str) -> Value {
    let mut doc = with_ready(doc, false);
    doc["metadata"]["deletionTimestamp"] = json!(now);
    doc
}

/// The duration a waypoint's command line gives `flag` (`--flag D` or `--flag=D`),
/// parsed as the waypoint parses it.
fn flag_duration(command: &[String], flag: &str) -> Option<Duration> {
    let with_eq = format!("{flag}=");
    let value = command.iter().enumerate().find_map(|(i, a)| {
        if a == flag {
            command.get(i + 1).map(String::as_str)
        } else {
            a.strip_prefix(&with_eq)
        }
    });
    value.and_then(|v| mesh_proto::duration::parse(v).ok())
}

/// The drain deadline a waypoint's command line gives it, else the waypoint's default.
pub fn drain_deadline(command: &[String]) -> Duration {
    flag_duration(command, "--drain-deadline").unwrap_or(DEFAULT_DRAIN)
}

/// How long the old pod may take to exit after SIGTERM before it is killed: its drain
/// delay and deadline plus a margin (a Deployment's `terminationGracePeriodSeconds`).
pub fn grace_period(command: &[String]) -> Duration {
    flag_duration(command, "--drain-delay").unwrap_or_default()
        + drain_deadline(command)
        + GRACE_MARGIN
}

/// `now` in RFC 3339 (UTC, seconds), as Kubernetes writes timestamps.
fn rfc3339(now: SystemTime) -> String {
    let secs = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The status code and body of an HTTP/1.x response.
pub fn parse_response(raw: &[u8]) -> Option<(u16, String)> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_string()))
}

/// `GET path` on `to`, from inside the network namespace at `netns` (a kubelet probes a
/// pod from its node; ztunnel's admin port is on its node's loopback).
fn http_get_in(netns: &Path, to: SocketAddr, path: &str) -> Result<(u16, String), String> {
    let netns = netns.to_path_buf();
    let path = path.to_string();
    std::thread::spawn(move || -> Result<(u16, String), String> {
        let f = std::fs::File::open(&netns).map_err(|e| format!("{}: {e}", netns.display()))?;
        // Only this short-lived thread changes namespace.
        nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| format!("cannot enter {}: {e}", netns.display()))?;
        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(2))
            .map_err(|e| format!("{to}: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(|e| e.to_string())?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {to}\r\n\r\n").as_bytes())
            .map_err(|e| format!("{to}: {e}"))?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).map_err(|e| format!("{to}: {e}"))?;
        parse_response(&raw).ok_or_else(|| format!("{to}{path}: not an HTTP answer"))
    })
    .join()
    .map_err(|_| "the request thread panicked".to_string())?
}

/// How an old pod's process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ended {
    /// It exited by itself after SIGTERM.
    Exited,
    /// It outlived its grace period and was SIGKILLed.
    Killed,
    /// It was not running.
    NotRunning,
}

/// What a rollout did.
#[derive(Debug, Default)]
pub struct Report {
    /// The new pod (`ns/name`).
    pub new_pod: String,
    /// Each old pod (`ns/name`) and how its process ended.
    pub old_pods: Vec<(String, Option<Ended>)>,
}

/// The `/config_dump` of the ztunnel in node namespace `node_ns` whose admin port (on
/// 127.0.0.1) is `admin_port`, or `None` if it does not answer with one.
pub fn ztunnel_dump_in(node_ns: &str, admin_port: u16) -> Option<Value> {
    let admin = SocketAddr::from(([127, 0, 0, 1], admin_port));
    http_get_in(&netns_path(node_ns), admin, "/config_dump")
        .ok()
        .filter(|(status, _)| *status == 200)
        .and_then(|(_, body)| serde_json::from_str(&body).ok())
}

fn netns_path(name: &str) -> PathBuf {
    Path::new("/var/run/netns").join(name)
}

impl Lab {
    /// Node `node`'s ztunnel's `/config_dump`, from the ztunnel running there now (an
    /// upgrade moves the admin port), or `None` if it does not answer with one.
    pub fn ztunnel_dump(&self, node: usize) -> Option<Value> {
        let admin = self
            .process(&format!("ztunnel-{node}"))
            .and_then(|p| p.ztunnel)
            .map_or(crate::upgrade::PORT_SETS[0].admin, |z| z.ports.admin);
        ztunnel_dump_in(&self.node_ns(node), admin)
    }

    /// The pods (`ns/name`) of Gateway `ns/gateway`'s waypoint.
    pub fn waypoint_pods(&self, ns: &str, gateway: &str) -> Vec<String> {
        self.state
            .pods
            .iter()
            .filter(|(_, p)| p.waypoint && p.namespace == ns)
            .filter(|(_, p)| {
                self.pod_manifest(&p.namespace, &p.name)
                    .is_ok_and(|d| d["metadata"]["labels"][GATEWAY_LABEL] == gateway)
            })
            .map(|(k, _)| k.clone())
            .collect()
    }

    fn pod_manifest(&self, ns: &str, name: &str) -> Result<Value, String> {
        let path = self.manifest_path("Pod", ns, name);
        let text =
            std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Replaces Gateway `ns/gateway`'s waypoint pod as a Deployment rollout with
    /// `maxSurge: 1, maxUnavailable: 0` does (see the module's documentation), with
    /// `binary` as the new pod's waypoint if given, the old pod told to stop in `order`.
    /// `progress` hears of each step.
    pub fn rollout_waypoint(
        &mut self,
        ns: &str,
        gateway: &str,
        binary: Option<&Path>,
        order: Order,
        progress: &mut dyn FnMut(&str),
    ) -> Result<Report, String> {
        if !self.is_up() {
            return Err(format!("lab {} is not up", self.name));
        }
        let old = self.waypoint_pods(ns, gateway);
        if old.is_empty() {
            return Err(format!(
                "Gateway {ns}/{gateway} has no waypoint pod in lab {}: apply the Gateway first",
                self.name
            ));
        }
        let template = old
            .iter()
            .filter_map(|k| self.pod_manifest(ns, k.split_once('/').expect("ns/name").1).ok())
            .find(is_template)
            .ok_or_else(|| {
                format!(
                    "Gateway {ns}/{gateway} has no ready waypoint pod to copy (pods: {}); wait for one, or apply the Gateway again",
                    old.join(", ")
                )
            })?;
        let new_name = surge_name(gateway, &random_hex(3));
        let mut report = Report {
            new_pod: format!("{ns}/{new_name}"),
            old_pods: old.iter().map(|o| (o.clone(), None)).collect(),
        };
        // An absolute path: the pod may be started again later (a node reboot).
        let binary = binary
            .map(|b| match std::path::absolute(b) {
                Ok(p) if p.is_file() => Ok(p.to_string_lossy().into_owned()),
                Ok(p) => Err(format!("--binary {}: no such file", p.display())),
                Err(e) => Err(format!("--binary {}: {e}", b.display())),
            })
            .transpose()?;
        for step in plan(&old, &report.new_pod, order) {
            let undo = rolls_back(&step);
            let done = self.rollout_step(
                step,
                &template,
                &new_name,
                binary.as_deref(),
                &mut report,
                progress,
            );
            if let Err(e) = done {
                if undo {
                    let new = report.new_pod.clone();
                    return Err(match self.delete_pod(&new) {
                        Ok(()) => format!(
                            "{e}; rolled back: pod {new} removed, the old pod keeps serving"
                        ),
                        Err(d) => format!("{e}; pod {new} could not be removed either: {d}"),
                    });
                }
                return Err(e);
            }
        }
        Ok(report)
    }

    /// One step of a rollout.
    fn rollout_step(
        &mut self,
        step: Step,
        template: &Value,
        new_name: &str,
        binary: Option<&str>,
        report: &mut Report,
        progress: &mut dyn FnMut(&str),
    ) -> Result<(), String> {
        match step {
            Step::Start { new } => {
                let doc = surge_pod(template, new_name, binary);
                let ip = self.start_unready(doc)?;
                progress(&format!("pod {new} started (not ready), IP {ip}"));
            }
            Step::AwaitReady { new } => {
                self.await_ready(&new)?;
                progress(&format!("pod {new} is ready"));
            }
            Step::AwaitListedHealthy { new } => {
                let ip = self.state.pods[&new].ip.clone();
                self.await_ztunnels(&format!("{new} listed as healthy"), |l| {
                    l(&ip) == Listing::Healthy
                })?;
                progress(&format!("every ztunnel sends to {new}"));
            }
            Step::TakeOut { old } => {
                let (ons, oname) = old.split_once('/').expect("ns/name");
                let doc = self.pod_manifest(ons, oname)?;
                self.write_manifest(
                    "Pod",
                    ons,
                    oname,
                    &terminating(&doc, &rfc3339(SystemTime::now())),
                )?;
                progress(&format!("pod {old} taken out of the endpoints"));
            }
            Step::AwaitUnlisted { old } => {
                let ip = self.state.pods[&old].ip.clone();
                self.await_ztunnels(&format!("{old} no longer listed as healthy"), |l| {
                    l(&ip) != Listing::Healthy
                })?;
                progress(&format!("no ztunnel sends to {old} any more"));
            }
            Step::Terminate { old } => {
                let ended = self.terminate_pod(&old, progress)?;
                progress(&format!(
                    "pod {old} {}",
                    match ended {
                        Ended::Exited => "drained and exited",
                        Ended::Killed => "outlived its grace period: killed",
                        Ended::NotRunning => "was not running",
                    }
                ));
                if let Some(e) = report.old_pods.iter_mut().find(|(k, _)| *k == old) {
                    e.1 = Some(ended);
                }
            }
            Step::Remove { old } => {
                self.delete_pod(&old)?;
                progress(&format!("pod {old} removed"));
            }
        }
        Ok(())
    }

    /// Schedules and starts the pod `doc` with Ready=False, as a kubelet reports a pod
    /// whose readiness probe has not passed yet. Returns its IP.
    fn start_unready(&mut self, mut doc: Value) -> Result<String, String> {
        let ns = doc["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_string();
        let name = doc["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let node = (1..=self.state.nodes)
            .min_by_key(|i| self.state.pods.values().filter(|p| p.node == *i).count())
            .unwrap_or(1);
        doc["metadata"]["uid"] = json!(random_hex(8));
        doc["spec"]["nodeName"] = json!(format!("node-{node}"));
        self.write_manifest("Pod", &ns, &name, &doc)?;
        match self.start_pod_as(&doc, node, false) {
            Ok(ip) => Ok(ip),
            Err(e) => {
                let _ = std::fs::remove_file(self.manifest_path("Pod", &ns, &name));
                Err(e)
            }
        }
    }

    /// Plays pod `key`'s readiness probe from its node until it passes, then marks the
    /// pod Ready.
    fn await_ready(&mut self, key: &str) -> Result<(), String> {
        let p = self.state.pods[key].clone();
        let to = SocketAddr::new(
            p.ip.parse().map_err(|e| format!("pod IP {}: {e}", p.ip))?,
            READINESS_PORT,
        );
        let node_ns = netns_path(&self.node_ns(p.node));
        let deadline = Instant::now() + PROGRESS_DEADLINE;
        loop {
            let last = match http_get_in(&node_ns, to, READINESS_PATH) {
                Ok((status, _)) if probe_passes(status) => break,
                Ok((status, body)) => format!("{status} {}", body.trim()),
                Err(e) => e,
            };
            if !crate::ending::alive(self.process(&format!("pod:{key}")).map_or(0, |x| x.pid)) {
                return Err(format!(
                    "pod {key} exited before it was ready (`mesh-lab logs pod:{key}`)"
                ));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "pod {key} did not become ready within {PROGRESS_DEADLINE:?} (last probe: {last}); the old pod keeps serving"
                ));
            }
            std::thread::sleep(POLL);
        }
        let doc = self.pod_manifest(&p.namespace, &p.name)?;
        self.write_manifest("Pod", &p.namespace, &p.name, &with_ready(&doc, true))
    }

    /// Waits until `holds` is true of every node's ztunnel's `/config_dump` (given as a
    /// lookup of an address's [`Listing`]).
    fn await_ztunnels(
        &self,
        what: &str,
        holds: impl Fn(&dyn Fn(&str) -> Listing) -> bool,
    ) -> Result<(), String> {
        let deadline = Instant::now() + PROGRESS_DEADLINE;
        let mut pending: Vec<usize> = (1..=self.state.nodes).collect();
        loop {
            pending.retain(|&i| {
                !self
                    .ztunnel_dump(i)
                    .is_some_and(|d| holds(&|ip| listing(&d, ip)))
            });
            if pending.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                let nodes: Vec<String> = pending.iter().map(|i| format!("node-{i}")).collect();
                return Err(format!(
                    "waited {PROGRESS_DEADLINE:?} for {what} on {}: is its ztunnel connected to the control plane?",
                    nodes.join(", ")
                ));
            }
            std::thread::sleep(POLL);
        }
    }

    /// SIGTERM to pod `key`'s process, then waits for it to exit; SIGKILL only once its
    /// grace period has passed.
    fn terminate_pod(
        &mut self,
        key: &str,
        progress: &mut dyn FnMut(&str),
    ) -> Result<Ended, String> {
        let role = format!("pod:{key}");
        let Some(pid) = self.process(&role).map(|p| p.pid) else {
            return Ok(Ended::NotRunning);
        };
        if !crate::ending::alive(pid) || !self.owns(pid) {
            return Ok(Ended::NotRunning);
        }
        let (ns, name) = key.split_once('/').expect("ns/name");
        let argv = container_argv(&self.pod_manifest(ns, name)?["spec"]["containers"][0]);
        let grace = grace_period(&argv);
        if let Err(e) = crate::lab::run(&["kill", "-TERM", &pid.to_string()]) {
            // It exited by itself since it was checked.
            if !crate::ending::alive(pid) {
                return Ok(Ended::Exited);
            }
            return Err(e);
        }
        progress(&format!("pod {key} sent SIGTERM (grace period {grace:?})"));
        let deadline = Instant::now() + grace;
        while crate::ending::alive(pid) {
            if Instant::now() > deadline {
                if self.owns(pid) {
                    let _ = crate::lab::run(&["kill", "-KILL", &pid.to_string()]);
                }
                return Ok(Ended::Killed);
            }
            std::thread::sleep(POLL);
        }
        Ok(Ended::Exited)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_new_pod_is_ready_and_known_everywhere_before_the_old_one_is_touched() {
        let steps = plan(
            &names(&["back/waypoint"]),
            "back/waypoint-abc",
            Order::EndpointsFirst,
        );
        let new = "back/waypoint-abc".to_string();
        let old = "back/waypoint".to_string();
        assert_eq!(
            steps,
            vec![
                Step::Start { new: new.clone() },
                Step::AwaitReady { new: new.clone() },
                Step::AwaitListedHealthy { new },
                Step::TakeOut { old: old.clone() },
                Step::AwaitUnlisted { old: old.clone() },
                Step::Terminate { old: old.clone() },
                Step::Remove { old },
            ]
        );
    }

    #[test]
    fn each_old_pod_leaves_the_endpoints_before_it_is_told_to_stop() {
        let steps = plan(&names(&["ns/a", "ns/b"]), "ns/c", Order::EndpointsFirst);
        for o in ["ns/a", "ns/b"] {
            let pos = |s: Step| steps.iter().position(|x| *x == s).unwrap();
            let out = pos(Step::TakeOut { old: o.into() });
            let unlisted = pos(Step::AwaitUnlisted { old: o.into() });
            let term = pos(Step::Terminate { old: o.into() });
            let removed = pos(Step::Remove { old: o.into() });
            assert!(
                out < unlisted && unlisted < term && term < removed,
                "{steps:?}"
            );
        }
        assert_eq!(steps.len(), 3 + 2 * 4);
    }

    #[test]
    fn in_kubernetes_order_the_old_pod_is_told_to_stop_as_it_leaves_the_endpoints() {
        let steps = plan(&names(&["ns/a"]), "ns/c", Order::Kubernetes);
        let (new, old) = ("ns/c".to_string(), "ns/a".to_string());
        assert_eq!(
            steps,
            vec![
                Step::Start { new: new.clone() },
                Step::AwaitReady { new: new.clone() },
                Step::AwaitListedHealthy { new },
                Step::TakeOut { old: old.clone() },
                Step::Terminate { old: old.clone() },
                Step::Remove { old },
            ]
        );
    }

    #[test]
    fn a_failure_rolls_back_only_while_no_old_pod_was_touched() {
        let steps = plan(&names(&["ns/a"]), "ns/c", Order::EndpointsFirst);
        let undone: Vec<bool> = steps.iter().map(rolls_back).collect();
        // Start cleans up after itself; the two waits on the new pod roll back; nothing
        // after the old pod left the endpoints does.
        assert_eq!(undone, [false, true, true, false, false, false, false]);
    }

    #[test]
    fn the_template_is_a_ready_pod_that_is_not_terminating() {
        let ready = json!({"metadata": {"name": "w"},
            "status": {"conditions": [{"type": "Ready", "status": "True"}]}});
        assert!(is_template(&ready));
        assert!(!is_template(&with_ready(&ready, false)));
        assert!(!is_template(&terminating(&ready, "2026-11-30T05:00:00Z")));
        let mut gone_but_ready = ready.clone();
        gone_but_ready["metadata"]["deletionTimestamp"] = json!("2026-11-30T05:00:00Z");
        assert!(!is_template(&gone_but_ready));
        assert!(!is_template(&json!({"metadata": {"name": "w"}})));
    }

    #[test]
    fn the_command_line_is_command_then_args() {
        let c = json!({"command": ["/usr/local/bin/waypoint"],
                       "args": ["--drain-delay=5s", "--drain-deadline=20s"]});
        let argv = container_argv(&c);
        assert_eq!(
            argv,
            names(&[
                "/usr/local/bin/waypoint",
                "--drain-delay=5s",
                "--drain-deadline=20s"
            ])
        );
        // The Deployment's flags are in `args`: its grace period counts them.
        assert_eq!(grace_period(&argv), Duration::from_secs(25) + GRACE_MARGIN);
        assert_eq!(
            container_argv(&json!({"command": ["w", "--x"]})),
            names(&["w", "--x"])
        );
    }

    #[test]
    fn a_workload_is_listed_by_its_address_and_status() {
        let dump = json!({"workloads": [
            {"workloadIps": ["10.244.1.5"], "status": "Healthy"},
            {"workloadIps": ["10.244.2.7", "fd00::7"], "status": "Unhealthy"},
        ]});
        assert_eq!(listing(&dump, "10.244.1.5"), Listing::Healthy);
        assert_eq!(listing(&dump, "fd00::7"), Listing::Unhealthy);
        assert_eq!(listing(&dump, "10.244.2.70"), Listing::Absent);
        assert_eq!(listing(&json!({}), "10.244.1.5"), Listing::Absent);
    }

    #[test]
    fn the_grace_period_reads_the_waypoints_flags_as_the_waypoint_does() {
        let cmd = |args: &[&str]| args.iter().map(|a| a.to_string()).collect::<Vec<_>>();
        // Forms the waypoint accepts beyond the Gateway API's: a fraction, bare seconds.
        let g = grace_period(&cmd(&[
            "waypoint",
            "--drain-delay",
            "1.5s",
            "--drain-deadline=30",
        ]));
        assert_eq!(
            g,
            Duration::from_millis(1500) + Duration::from_secs(30) + GRACE_MARGIN
        );
        assert_eq!(
            grace_period(&cmd(&["waypoint"])),
            DEFAULT_DRAIN + GRACE_MARGIN
        );
    }

    #[test]
    fn probes_pass_as_a_kubelet_counts_them() {
        assert!(probe_passes(200));
        assert!(probe_passes(302));
        assert!(!probe_passes(503));
        assert!(!probe_passes(199));
    }

    #[test]
    fn the_surge_pod_keeps_labels_account_and_token_and_gets_a_probe() {
        let old = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "waypoint", "namespace": "back", "uid": "u1",
                         "labels": {GATEWAY_LABEL: "waypoint", "istio.io/dataplane-mode": "none"}},
            "spec": {"serviceAccountName": "waypoint", "nodeName": "node-2",
                     "containers": [{"name": "waypoint",
                                     "command": ["/old/waypoint", "--token-file", "/t"]}]},
            "status": {"podIP": "10.244.2.3"}
        });
        let new = surge_pod(&old, "waypoint-abc", Some("/new/waypoint"));
        assert_eq!(new["metadata"]["name"], "waypoint-abc");
        assert_eq!(new["metadata"]["labels"], old["metadata"]["labels"]);
        assert_eq!(new["spec"]["serviceAccountName"], "waypoint");
        assert!(new["metadata"].get("uid").is_none());
        assert!(new["spec"].get("nodeName").is_none());
        assert!(new.get("status").is_none());
        let c = &new["spec"]["containers"][0];
        assert_eq!(c["command"], json!(["/new/waypoint", "--token-file", "/t"]));
        assert_eq!(c["readinessProbe"]["httpGet"]["port"], READINESS_PORT);
        assert_eq!(
            surge_pod(&old, "w", None)["spec"]["containers"][0]["command"][0],
            "/old/waypoint"
        );
    }

    #[test]
    fn readiness_and_termination_are_written_as_the_api_server_holds_them() {
        let pod = json!({"metadata": {"name": "w"},
            "status": {"podIP": "10.0.0.1", "conditions": [{"type": "Ready", "status": "False"}]}});
        let ready = with_ready(&pod, true);
        assert_eq!(
            ready["status"]["conditions"],
            json!([{"type": "Ready", "status": "True"}])
        );
        let gone = terminating(&ready, "2026-11-30T05:00:00Z");
        assert_eq!(gone["status"]["conditions"][0]["status"], "False");
        assert_eq!(
            gone["metadata"]["deletionTimestamp"],
            "2026-11-30T05:00:00Z"
        );
        // A pod without conditions gets one.
        let bare = with_ready(&json!({"status": {}}), true);
        assert_eq!(
            bare["status"]["conditions"],
            json!([{"type": "Ready", "status": "True"}])
        );
        // The control plane reads it as not ready.
        let yaml = serde_json::to_string(&json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": gone["metadata"], "status": gone["status"]}))
        .unwrap();
        let p: mesh_control::k8s::Pod = serde_json::from_str(&yaml).unwrap();
        assert!(p.metadata.deletion_timestamp.is_some());
    }

    #[test]
    fn the_grace_period_follows_the_drain_deadline() {
        let cmd = |a: &[&str]| names(a);
        assert_eq!(
            grace_period(&cmd(&["waypoint"])),
            DEFAULT_DRAIN + GRACE_MARGIN
        );
        assert_eq!(
            grace_period(&cmd(&["waypoint", "--drain-deadline", "20s"])),
            Duration::from_secs(20) + GRACE_MARGIN
        );
        assert_eq!(
            drain_deadline(&cmd(&["waypoint", "--drain-deadline=1m"])),
            Duration::from_secs(60)
        );
        assert_eq!(
            drain_deadline(&cmd(&["waypoint", "--drain-deadline=500ms"])),
            Duration::from_millis(500)
        );
        assert_eq!(
            drain_deadline(&cmd(&["w", "--drain-deadline", "x"])),
            DEFAULT_DRAIN
        );
        assert_eq!(
            drain_deadline(&cmd(&["waypoint", "--drain-deadline=1m30s"])),
            Duration::from_secs(90)
        );
        // A drain delay comes before the drain.
        assert_eq!(
            grace_period(&cmd(&["w", "--drain-delay=5s", "--drain-deadline", "20s"])),
            Duration::from_secs(25) + GRACE_MARGIN
        );
    }

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_014_861);
        assert_eq!(rfc3339(t), "2026-11-30T05:01:01Z");
        let leap = SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn responses_are_parsed() {
        assert_eq!(
            parse_response(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 6\r\n\r\nnot ok"),
            Some((503, "not ok".into()))
        );
        assert_eq!(parse_response(b"garbage"), None);
    }
}
