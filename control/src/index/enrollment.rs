//! Which pods are in the mesh: namespace or pod label `istio.io/dataplane-mode=ambient`,
//! pod opt-out `none`, never host-network pods or excluded namespaces.

use super::IndexConfig;
use crate::k8s::Pod;
use crate::manifest::Objects;

pub const DATAPLANE_MODE: &str = "istio.io/dataplane-mode";

pub fn is_enrolled(objs: &Objects, cfg: &IndexConfig, pod: &Pod) -> bool {
    let ns = pod.metadata.ns();
    if pod.spec.host_network || cfg.excluded_namespaces.iter().any(|e| e == ns) {
        return false;
    }
    match pod.metadata.labels.get(DATAPLANE_MODE).map(String::as_str) {
        Some("ambient") => return true,
        Some("none") => return false,
        _ => {}
    }
    objs.namespaces
        .get(ns)
        .and_then(|n| n.metadata.labels.get(DATAPLANE_MODE))
        .is_some_and(|v| v == "ambient")
}

/// What a node agent needs to know about one pod on its node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodePod {
    pub enrolled: bool,
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub ips: Vec<String>,
    pub bypass_inbound: bool,
    pub dns_capture: Option<bool>,
}

impl NodePod {
    pub fn from_pod(pod: &Pod, enrolled: bool) -> Self {
        let ann = &pod.metadata.annotations;
        NodePod {
            enrolled,
            uid: pod.metadata.uid.clone().unwrap_or_default(),
            name: pod.metadata.name.clone(),
            namespace: pod.metadata.ns().to_string(),
            service_account: pod
                .spec
                .service_account_name
                .clone()
                .unwrap_or_else(|| "default".into()),
            ips: super::workload::pod_ips(pod)
                .iter()
                .map(|ip| ip.to_string())
                .collect(),
            bypass_inbound: ann
                .get("ambient.istio.io/bypass-inbound-capture")
                .is_some_and(|v| v == "true"),
            dns_capture: ann
                .get("ambient.istio.io/dns-capture")
                .and_then(|v| parse_bool(v)),
        }
    }
}

/// An annotation's boolean as Istio reads it (Go's `strconv.ParseBool`); `None` for
/// anything else, so the global default applies.
pub fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::{Namespace, ObjectMeta};

    fn pod(ns: &str, label: Option<&str>, host_network: bool) -> Pod {
        let mut p = Pod::default();
        p.metadata.name = "p".into();
        p.metadata.namespace = Some(ns.into());
        if let Some(l) = label {
            p.metadata.labels.insert(DATAPLANE_MODE.into(), l.into());
        }
        p.spec.host_network = host_network;
        p
    }

    fn objs(ambient_ns: &[&str]) -> Objects {
        let mut o = Objects::default();
        for ns in ["shop", "legacy", "kube-system"] {
            let mut n = Namespace {
                metadata: ObjectMeta {
                    name: ns.into(),
                    ..Default::default()
                },
            };
            if ambient_ns.contains(&ns) {
                n.metadata
                    .labels
                    .insert(DATAPLANE_MODE.into(), "ambient".into());
            }
            o.namespaces.insert(ns.into(), n);
        }
        o
    }

    #[test]
    fn rules() {
        let cfg = IndexConfig::default();
        let o = objs(&["shop", "kube-system"]);
        assert!(is_enrolled(&o, &cfg, &pod("shop", None, false)));
        assert!(
            !is_enrolled(&o, &cfg, &pod("shop", Some("none"), false)),
            "pod opt-out"
        );
        assert!(!is_enrolled(&o, &cfg, &pod("legacy", None, false)));
        assert!(
            is_enrolled(&o, &cfg, &pod("legacy", Some("ambient"), false)),
            "pod opt-in"
        );
        assert!(
            !is_enrolled(&o, &cfg, &pod("shop", None, true)),
            "host network"
        );
        assert!(!is_enrolled(&o, &cfg, &pod("shop", Some("ambient"), true)));
        assert!(
            !is_enrolled(&o, &cfg, &pod("kube-system", None, false)),
            "excluded namespace"
        );
    }

    #[test]
    fn dns_capture_annotation_reads_like_go_parse_bool() {
        let with = |v: &str| {
            let mut p = pod("shop", None, false);
            p.metadata
                .annotations
                .insert("ambient.istio.io/dns-capture".into(), v.into());
            NodePod::from_pod(&p, true).dns_capture
        };
        for v in ["1", "t", "T", "TRUE", "true", "True"] {
            assert_eq!(with(v), Some(true), "{v}");
        }
        for v in ["0", "f", "F", "FALSE", "false", "False"] {
            assert_eq!(with(v), Some(false), "{v}");
        }
        for v in ["", "yes", "no", "tRUE", " true", "2", "on"] {
            assert_eq!(with(v), None, "{v:?}: the global default");
        }
        assert_eq!(
            NodePod::from_pod(&pod("shop", None, false), true).dns_capture,
            None
        );
    }
}
