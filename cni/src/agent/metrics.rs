//! The agent's counters, served as Prometheus text on the readiness address
//! (`GET /metrics`). Every label value is one of ours, never peer data.

use super::cgroup::Refusal;
use std::collections::BTreeMap;
use std::sync::Mutex;

type Key = (&'static str, Vec<(&'static str, &'static str)>);

const HELP: [(&str, &str); 4] = [
    (
        "mesh_cni_netns_refused_total",
        "Pod network namespaces not bound to a pod because they match more than one pod (or the pod has several).",
    ),
    (
        "mesh_cni_local_peer_refused_total",
        "Connections to a local control socket refused by the SO_PEERCRED check.",
    ),
    (
        "mesh_cni_local_request_refused_total",
        "Local control socket requests refused: too long, too slow, or too many at once.",
    ),
    (
        "mesh_cni_ztunnel_handovers_total",
        "Handovers sent: an older ztunnel told to stop accepting because a newer one took its snapshot.",
    ),
];

const ZTUNNELS: &str = "mesh_cni_ztunnel_connections";
const ZTUNNELS_HELP: &str = "Connected ztunnels: serving (takes new pods) or handed_over (keeps its open connections until they end).";

const ZDS_QUEUE: &str = "mesh_cni_zds_queue_depth";
const ZDS_QUEUE_HELP: &str = "Pods with a ZDS message (Add or Del) waiting to be sent to ztunnel.";

const ENROLMENT: &str = "mesh_cni_pod_enrolment";
const ENROLMENT_HELP: &str = "Enrolled pods on this node by enrolment state: confirmed (rules read back as planned and ztunnel acked), pending, failed.";

pub struct Metrics {
    counters: Mutex<BTreeMap<Key, u64>>,
    /// `mesh_cni_pod_enrolment` by state.
    enrolment: Mutex<BTreeMap<&'static str, u64>>,
    /// `mesh_cni_ztunnel_connections`: (serving, handed_over).
    ztunnels: Mutex<(u64, u64)>,
    /// `mesh_cni_zds_queue_depth`.
    zds_queue: std::sync::atomic::AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        let m = Metrics {
            counters: Mutex::default(),
            enrolment: Mutex::default(),
            ztunnels: Mutex::default(),
            zds_queue: Default::default(),
        };
        m.add("mesh_cni_ztunnel_handovers_total", vec![], 0);
        for s in ["pending", "confirmed", "failed"] {
            m.set_enrolment(s, 0);
        }
        // Present at 0 from the start, so an alert can tell "none" from "not exported".
        for r in Refusal::ALL {
            m.add(
                "mesh_cni_netns_refused_total",
                vec![("reason", r.label())],
                0,
            );
        }
        for s in ["agent", "zds"] {
            m.add("mesh_cni_local_peer_refused_total", vec![("socket", s)], 0);
        }
        for reason in ["too_long", "timeout", "busy"] {
            m.add(
                "mesh_cni_local_request_refused_total",
                vec![("socket", "agent"), ("reason", reason)],
                0,
            );
        }
        m
    }
}

impl Metrics {
    fn add(&self, name: &'static str, labels: Vec<(&'static str, &'static str)>, n: u64) {
        *self
            .counters
            .lock()
            .expect("metrics lock")
            .entry((name, labels))
            .or_default() += n;
    }

    pub fn inc_netns_refused(&self, r: Refusal) {
        self.add(
            "mesh_cni_netns_refused_total",
            vec![("reason", r.label())],
            1,
        );
    }

    pub fn inc_peer_refused(&self, socket: &'static str) {
        self.add(
            "mesh_cni_local_peer_refused_total",
            vec![("socket", socket)],
            1,
        );
    }

    pub fn inc_request_refused(&self, socket: &'static str, reason: &'static str) {
        self.add(
            "mesh_cni_local_request_refused_total",
            vec![("socket", socket), ("reason", reason)],
            1,
        );
    }

    pub fn set_enrolment(&self, state: &'static str, pods: u64) {
        self.enrolment
            .lock()
            .expect("metrics lock")
            .insert(state, pods);
    }

    pub fn inc_ztunnel_handovers(&self) {
        self.add("mesh_cni_ztunnel_handovers_total", vec![], 1);
    }

    pub fn set_ztunnel_connections(&self, serving: u64, handed_over: u64) {
        *self.ztunnels.lock().expect("metrics lock") = (serving, handed_over);
    }

    pub fn set_zds_queue_depth(&self, pods: u64) {
        self.zds_queue
            .store(pods, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        self.counters
            .lock()
            .expect("metrics lock")
            .iter()
            .find(|((n, l), _)| *n == name && l.as_slice() == labels)
            .map(|(_, v)| *v)
            .unwrap_or(0)
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let counters = self.counters.lock().expect("metrics lock");
        let mut out = String::new();
        for (name, help) in HELP {
            out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} counter\n"));
            for ((n, labels), v) in counters.iter() {
                if *n != name {
                    continue;
                }
                let l: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
                if l.is_empty() {
                    out.push_str(&format!("{name} {v}\n"));
                } else {
                    out.push_str(&format!("{name}{{{}}} {v}\n", l.join(",")));
                }
            }
        }
        out.push_str(&format!(
            "# HELP {ENROLMENT} {ENROLMENT_HELP}\n# TYPE {ENROLMENT} gauge\n"
        ));
        for (state, n) in self.enrolment.lock().expect("metrics lock").iter() {
            out.push_str(&format!("{ENROLMENT}{{state=\"{state}\"}} {n}\n"));
        }
        let (serving, handed_over) = *self.ztunnels.lock().expect("metrics lock");
        out.push_str(&format!(
            "# HELP {ZTUNNELS} {ZTUNNELS_HELP}\n# TYPE {ZTUNNELS} gauge\n\
             {ZTUNNELS}{{state=\"serving\"}} {serving}\n\
             {ZTUNNELS}{{state=\"handed_over\"}} {handed_over}\n"
        ));
        let depth = self.zds_queue.load(std::sync::atomic::Ordering::Relaxed);
        out.push_str(&format!(
            "# HELP {ZDS_QUEUE} {ZDS_QUEUE_HELP}\n# TYPE {ZDS_QUEUE} gauge\n{ZDS_QUEUE} {depth}\n"
        ));
        // CPU, memory and descriptors, as every Prometheus client exports them.
        mesh_proto::process::append(&mut out, mesh_proto::process::Format::Prometheus);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_with_fixed_labels() {
        let m = Metrics::default();
        m.inc_netns_refused(Refusal::ForeignIp);
        m.inc_peer_refused("agent");
        m.inc_peer_refused("agent");
        let text = m.render();
        assert!(
            text.contains("mesh_cni_netns_refused_total{reason=\"foreign_ip\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("mesh_cni_netns_refused_total{reason=\"shared_netns\"} 0\n"));
        assert!(text.contains("mesh_cni_local_peer_refused_total{socket=\"agent\"} 2\n"));
        assert!(text.contains("# TYPE mesh_cni_local_request_refused_total counter\n"));
        assert!(text.contains("mesh_cni_pod_enrolment{state=\"failed\"} 0\n"));
        assert!(text.contains("\nprocess_resident_memory_bytes "), "{text}");
        m.set_enrolment("failed", 2);
        assert!(
            m.render()
                .contains("# TYPE mesh_cni_pod_enrolment gauge\nmesh_cni_pod_enrolment{state=\"confirmed\"} 0\nmesh_cni_pod_enrolment{state=\"failed\"} 2\n")
        );
        assert_eq!(
            m.get("mesh_cni_local_peer_refused_total", &[("socket", "agent")]),
            2
        );
    }

    #[test]
    fn renders_ztunnel_connections_and_handovers() {
        let m = Metrics::default();
        let text = m.render();
        assert!(
            text.contains("mesh_cni_ztunnel_handovers_total 0\n"),
            "{text}"
        );
        assert!(text.contains("mesh_cni_ztunnel_connections{state=\"serving\"} 0\n"));
        assert!(
            text.contains("# TYPE mesh_cni_zds_queue_depth gauge\nmesh_cni_zds_queue_depth 0\n")
        );
        m.set_zds_queue_depth(3);
        assert!(m.render().contains("\nmesh_cni_zds_queue_depth 3\n"));
        m.set_ztunnel_connections(1, 1);
        m.inc_ztunnel_handovers();
        let text = m.render();
        assert!(text.contains("# TYPE mesh_cni_ztunnel_handovers_total counter\nmesh_cni_ztunnel_handovers_total 1\n"), "{text}");
        assert!(text.contains("# TYPE mesh_cni_ztunnel_connections gauge\nmesh_cni_ztunnel_connections{state=\"serving\"} 1\nmesh_cni_ztunnel_connections{state=\"handed_over\"} 1\n"), "{text}");
    }
}
