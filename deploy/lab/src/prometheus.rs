//! Prometheus in the lab (`mesh-lab up --observe`): Debian's `prometheus` runs in node
//! 1's namespace, listening on that namespace's loopback only, its data in the lab's
//! state directory. It finds what to scrape through file-based service discovery: one
//! JSON file per job, rewritten from the lab's state whenever a component or a pod comes
//! or goes, so a stopped ztunnel or a deleted waypoint drops out of the target list.

use crate::lab::State;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::Path;

/// Where Prometheus listens, inside node 1's namespace (where meshctl runs too).
pub const LISTEN: &str = "127.0.0.1:9090";
/// Short, so a test sees its traffic within seconds; the lab is small.
pub const SCRAPE_INTERVAL: &str = "2s";
/// The scrape jobs, one file-SD file each.
pub const JOBS: [&str; 4] = ["ztunnel", "waypoint", "mesh-cni", "mesh-control"];

/// One thing to scrape: `job` picks the file, `labels` become target labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub job: &'static str,
    pub address: String,
    pub labels: BTreeMap<String, String>,
}

/// Every running component and waypoint pod of the lab, as Prometheus reaches it from
/// node 1: each ztunnel process (a node runs two during an upgrade) on its node's
/// address and its own metrics port, labelled with its PID; node agents on port 8000,
/// waypoints on their pod IP (15020), mesh-control on node 1's loopback (debug API).
pub fn targets(state: &State) -> Vec<Target> {
    let mut out = Vec::new();
    let node_ip = crate::lab::Lab::node_ip;
    for p in &state.procs {
        let labels = |extra: &[(&str, String)]| {
            let mut l: BTreeMap<String, String> = extra
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect();
            l.insert("lab_process".into(), p.role.clone());
            l
        };
        let node = |role: &str| {
            p.role
                .strip_prefix(role)
                .and_then(|n| n.parse::<usize>().ok())
        };
        if let Some(i) = crate::upgrade::node_of(&p.role) {
            let port = crate::upgrade::run_of(p).ports.metrics;
            out.push(Target {
                job: "ztunnel",
                address: format!("{}:{port}", node_ip(i)),
                labels: labels(&[("node", format!("node-{i}")), ("pid", p.pid.to_string())]),
            });
        } else if let Some(i) = node("agent-") {
            out.push(Target {
                job: "mesh-cni",
                address: format!("{}:8000", node_ip(i)),
                labels: labels(&[("node", format!("node-{i}"))]),
            });
        } else if p.role == "control" {
            out.push(Target {
                job: "mesh-control",
                address: "127.0.0.1:15014".into(),
                labels: labels(&[("node", "node-1".into())]),
            });
        } else if let Some(key) = p.role.strip_prefix("pod:")
            && let Some(pod) = state.pods.get(key)
            && pod.waypoint
        {
            out.push(Target {
                job: "waypoint",
                // In brackets when IPv6 (an IPv6-only lab's pods).
                address: if pod.ip.contains(':') {
                    format!("[{}]:15020", pod.ip)
                } else {
                    format!("{}:15020", pod.ip)
                },
                labels: labels(&[
                    ("node", format!("node-{}", pod.node)),
                    ("namespace", pod.namespace.clone()),
                    ("pod", pod.name.clone()),
                ]),
            });
        }
    }
    out
}

/// The file-SD document of `job`: one group per target (an empty list when none).
pub fn file_sd(job: &str, targets: &[Target]) -> Value {
    Value::Array(
        targets
            .iter()
            .filter(|t| t.job == job)
            .map(|t| json!({"targets": [t.address], "labels": t.labels}))
            .collect(),
    )
}

/// `prometheus.yml`: one job per kind of target, each reading its file in `sd_dir`.
pub fn config(sd_dir: &Path) -> String {
    let mut s = format!(
        "# Written by mesh-lab; the target files next to it are rewritten as the lab changes.\n\
         global:\n  scrape_interval: {SCRAPE_INTERVAL}\n  evaluation_interval: {SCRAPE_INTERVAL}\n\
         scrape_configs:\n"
    );
    for job in JOBS {
        s.push_str(&format!(
            "  - job_name: {job}\n    metrics_path: /metrics\n    file_sd_configs:\n      - files: ['{}']\n        refresh_interval: 5s\n",
            sd_dir.join(format!("{job}.json")).display()
        ));
    }
    s
}

/// The command line of Prometheus for a lab whose Prometheus files are under `dir`.
pub fn command(dir: &Path) -> Vec<String> {
    vec![
        "prometheus".into(),
        format!("--config.file={}", dir.join("prometheus.yml").display()),
        format!("--storage.tsdb.path={}", dir.join("data").display()),
        format!("--web.listen-address={LISTEN}"),
        // Small and short-lived: the lab's data goes with the lab.
        "--storage.tsdb.retention.time=1d".into(),
    ]
}

/// Writes the target files (atomically: Prometheus may read them at any moment).
pub fn write_targets(dir: &Path, state: &State) -> Result<(), String> {
    let sd = dir.join("targets");
    std::fs::create_dir_all(&sd).map_err(|e| format!("{}: {e}", sd.display()))?;
    let all = targets(state);
    for job in JOBS {
        let path = sd.join(format!("{job}.json"));
        let tmp = sd.join(format!(".{job}.json.tmp"));
        let body = serde_json::to_vec_pretty(&file_sd(job, &all)).map_err(|e| e.to_string())?;
        std::fs::write(&tmp, body).map_err(|e| format!("{}: {e}", tmp.display()))?;
        std::fs::rename(&tmp, &path).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lab::{PodEntry, ProcEntry};

    fn proc(role: &str) -> ProcEntry {
        ProcEntry {
            role: role.into(),
            pid: 1,
            log: "/dev/null".into(),
            log_offset: 0,
            ztunnel: None,
        }
    }

    fn pod(ns: &str, name: &str, node: usize, ip: &str, waypoint: bool) -> PodEntry {
        PodEntry {
            namespace: ns.into(),
            name: name.into(),
            node,
            netns: "x".into(),
            container_id: "c".into(),
            ip: ip.into(),
            ip6: None,
            uid: "u".into(),
            waypoint,
        }
    }

    fn state() -> State {
        let mut s = State {
            nodes: 2,
            ..Default::default()
        };
        for r in [
            "control",
            "agent-1",
            "ztunnel-1",
            "agent-2",
            "ztunnel-2",
            "pod:back/waypoint",
            "pod:back/api",
            "prometheus",
        ] {
            s.procs.push(proc(r));
        }
        s.pods.insert(
            "back/waypoint".into(),
            pod("back", "waypoint", 2, "10.244.2.5", true),
        );
        s.pods.insert(
            "back/api".into(),
            pod("back", "api", 2, "10.244.2.4", false),
        );
        s
    }

    fn addresses(s: &State, job: &str) -> Vec<String> {
        targets(s)
            .into_iter()
            .filter(|t| t.job == job)
            .map(|t| t.address)
            .collect()
    }

    #[test]
    fn every_component_and_only_waypoint_pods_are_targets() {
        let s = state();
        assert_eq!(
            addresses(&s, "ztunnel"),
            ["10.100.0.11:15020", "10.100.0.12:15020"]
        );
        assert_eq!(
            addresses(&s, "mesh-cni"),
            ["10.100.0.11:8000", "10.100.0.12:8000"]
        );
        assert_eq!(addresses(&s, "mesh-control"), ["127.0.0.1:15014"]);
        assert_eq!(addresses(&s, "waypoint"), ["10.244.2.5:15020"]);
        assert_eq!(
            targets(&s).len(),
            6,
            "app pods and Prometheus are not scraped"
        );
    }

    #[test]
    fn an_ipv6_only_waypoint_is_scraped_in_brackets() {
        let mut s = state();
        s.pods.insert(
            "back/waypoint".into(),
            pod("back", "waypoint", 2, "fd00:10:244:2::5", true),
        );
        assert_eq!(addresses(&s, "waypoint"), ["[fd00:10:244:2::5]:15020"]);
    }

    #[test]
    fn stopped_components_and_deleted_pods_drop_out() {
        let mut s = state();
        s.procs
            .retain(|p| p.role != "ztunnel-2" && p.role != "pod:back/waypoint");
        assert_eq!(addresses(&s, "ztunnel"), ["10.100.0.11:15020"]);
        assert!(addresses(&s, "waypoint").is_empty());
        assert_eq!(file_sd("waypoint", &targets(&s)), json!([]));
    }

    #[test]
    fn both_ztunnels_of_an_upgrading_node_are_scraped_on_their_own_ports() {
        let mut s = state();
        let z1 = s.procs.iter_mut().find(|p| p.role == "ztunnel-1").unwrap();
        z1.role = "ztunnel-1-old".into();
        z1.pid = 100;
        let mut new = proc("ztunnel-1");
        new.pid = 101;
        new.ztunnel = Some(crate::upgrade::ZtunnelRun::new(1));
        s.procs.push(new);
        let zt: Vec<(String, String, String)> = targets(&s)
            .into_iter()
            .filter(|t| t.job == "ztunnel")
            .map(|t| {
                (
                    t.address,
                    t.labels["lab_process"].clone(),
                    t.labels["pid"].clone(),
                )
            })
            .collect();
        let row = |a: &str, r: &str, p: &str| (a.to_string(), r.to_string(), p.to_string());
        assert_eq!(
            zt,
            [
                row("10.100.0.11:15020", "ztunnel-1-old", "100"),
                row("10.100.0.12:15020", "ztunnel-2", "1"),
                row("10.100.0.11:15120", "ztunnel-1", "101"),
            ]
        );
    }

    #[test]
    fn file_sd_carries_labels() {
        let s = state();
        let doc = file_sd("waypoint", &targets(&s));
        assert_eq!(
            doc,
            json!([{"targets": ["10.244.2.5:15020"], "labels": {
                "lab_process": "pod:back/waypoint", "namespace": "back",
                "node": "node-2", "pod": "waypoint"}}])
        );
    }

    #[test]
    fn config_has_a_file_sd_job_per_kind() {
        let c = config(Path::new("/lab/prometheus/targets"));
        for job in JOBS {
            assert!(c.contains(&format!("job_name: {job}\n")), "{c}");
            assert!(
                c.contains(&format!("'/lab/prometheus/targets/{job}.json'")),
                "{c}"
            );
        }
        assert!(c.contains("scrape_interval: 2s"));
    }
}
