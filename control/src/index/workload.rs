//! Pod → istio.workload.Workload.

use super::IndexConfig;
use super::authz::StrictModes;
use super::service::{ip_bytes, is_external_name};
use super::waypoint::{self, TrafficKind};
use crate::k8s::{IntOrString, Pod};
use crate::manifest::Objects;
use mesh_proto::workload as pb;
use std::collections::HashMap;
use std::net::IpAddr;

pub fn pod_ips(pod: &Pod) -> Vec<IpAddr> {
    let mut ips: Vec<IpAddr> = pod
        .status
        .pod_ips
        .iter()
        .filter_map(|p| p.ip.parse().ok())
        .collect();
    if ips.is_empty() {
        ips.extend(
            pod.status
                .pod_ip
                .as_deref()
                .and_then(|s| s.parse::<IpAddr>().ok()),
        );
    }
    ips
}

fn is_ready(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && pod
            .status
            .conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True")
}

fn first_label<'a>(pod: &'a Pod, keys: &[&str]) -> Option<&'a str> {
    keys.iter()
        .find_map(|k| pod.metadata.labels.get(*k))
        .map(String::as_str)
}

/// Workload name and type from the owner (a ReplicaSet's Deployment, a Job...).
fn workload_identity(pod: &Pod) -> (String, pb::WorkloadType) {
    match pod.metadata.owner_references.first() {
        Some(o) if o.kind == "ReplicaSet" => {
            let name = o.name.rsplit_once('-').map(|(d, _)| d).unwrap_or(&o.name);
            (name.to_string(), pb::WorkloadType::Deployment)
        }
        Some(o) if o.kind == "Job" => (o.name.clone(), pb::WorkloadType::Job),
        Some(o) if o.kind == "CronJob" => (o.name.clone(), pb::WorkloadType::Cronjob),
        Some(o) => (o.name.clone(), pb::WorkloadType::Deployment),
        None => (pod.metadata.name.clone(), pb::WorkloadType::Pod),
    }
}

pub fn workload(
    objs: &Objects,
    cfg: &IndexConfig,
    pod: &Pod,
    enrolled: bool,
    strict: &StrictModes,
) -> Option<pb::Workload> {
    if matches!(
        pod.status.phase.as_deref(),
        Some("Succeeded") | Some("Failed")
    ) {
        return None;
    }
    let ips = pod_ips(pod);
    if ips.is_empty() {
        return None; // not running yet: nothing can reach it
    }
    let ns = pod.metadata.ns();
    let (workload_name, workload_type) = workload_identity(pod);
    let mut services = HashMap::new();
    for svc in super::in_namespace(&objs.services, ns) {
        let Some(selector) = &svc.spec.selector else {
            continue;
        };
        if selector.is_empty()
            || !selector
                .iter()
                .all(|(k, v)| pod.metadata.labels.get(k) == Some(v))
            || is_external_name(svc)
        {
            continue;
        }
        let ports = svc
            .spec
            .ports
            .iter()
            .filter_map(|p| {
                let target = match &p.target_port {
                    None => p.port,
                    Some(IntOrString::Int(t)) => *t,
                    Some(IntOrString::String(name)) => pod
                        .spec
                        .containers
                        .iter()
                        .flat_map(|c| &c.ports)
                        .find(|cp| cp.name.as_deref() == Some(name.as_str()))
                        .map(|cp| cp.container_port)?,
                };
                Some(pb::Port {
                    service_port: u32::from(p.port),
                    target_port: u32::from(target),
                    app_protocol: 0,
                })
            })
            .collect();
        services.insert(
            format!("{}/{}", ns, cfg.service_hostname(ns, &svc.metadata.name)),
            pb::PortList { ports },
        );
    }
    // A selector policy applies from the pod's namespace or the root namespace only.
    let root = (cfg.root_namespace != ns).then_some(cfg.root_namespace.as_str());
    let mut authorization_policies: Vec<String> =
        super::in_namespace(&objs.authorization_policies, ns)
            .chain(
                root.into_iter()
                    .flat_map(|r| super::in_namespace(&objs.authorization_policies, r)),
            )
            .filter(|p| super::authz::selects(p, pod, cfg))
            .map(|p| format!("{}/{}", p.metadata.ns(), p.metadata.name))
            .collect();
    authorization_policies.extend(strict.policies_for(pod));
    authorization_policies.sort();
    Some(pb::Workload {
        uid: format!("{}//Pod/{}/{}", cfg.cluster_id, ns, pod.metadata.name),
        name: pod.metadata.name.clone(),
        namespace: ns.to_string(),
        addresses: ips.into_iter().map(ip_bytes).collect(),
        tunnel_protocol: if enrolled {
            pb::TunnelProtocol::Hbone as i32
        } else {
            pb::TunnelProtocol::None as i32
        },
        trust_domain: if cfg.trust_domain == "cluster.local" {
            String::new()
        } else {
            cfg.trust_domain.clone()
        },
        service_account: pod
            .spec
            .service_account_name
            .clone()
            .unwrap_or_else(|| "default".into()),
        waypoint: waypoint::resolve(objs, cfg, ns, &pod.metadata.labels, TrafficKind::Workload),
        node: pod.spec.node_name.clone().unwrap_or_default(),
        canonical_name: first_label(
            pod,
            &[
                "service.istio.io/canonical-name",
                "app.kubernetes.io/name",
                "app",
            ],
        )
        .unwrap_or(&workload_name)
        .to_string(),
        canonical_revision: first_label(
            pod,
            &[
                "service.istio.io/canonical-revision",
                "app.kubernetes.io/version",
                "version",
            ],
        )
        .unwrap_or("latest")
        .to_string(),
        workload_type: workload_type as i32,
        workload_name,
        services,
        authorization_policies,
        status: if is_ready(pod) {
            pb::WorkloadStatus::Healthy as i32
        } else {
            pb::WorkloadStatus::Unhealthy as i32
        },
        cluster_id: cfg.cluster_id.clone(),
        network_mode: if pod.spec.host_network {
            pb::NetworkMode::HostNetwork as i32
        } else {
            pb::NetworkMode::Standard as i32
        },
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::Objects;
    use std::path::Path;

    const OBJS: &str = r#"
apiVersion: v1
kind: Pod
metadata:
  name: web-7d4b9-abcde
  namespace: shop
  labels: {app: web, version: v2}
  ownerReferences: [{kind: ReplicaSet, name: web-7d4b9}]
spec:
  nodeName: node-1
  serviceAccountName: web-sa
  containers: [{name: web, ports: [{name: http, containerPort: 8080}]}]
status:
  podIPs: [{ip: 10.10.1.5}]
  conditions: [{type: Ready, status: "True"}]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  selector: {app: web}
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80, targetPort: http}, {name: metrics, port: 9090, targetPort: 9091}]
---
apiVersion: v1
kind: Service
metadata: {name: other, namespace: shop}
spec:
  selector: {app: other}
  clusterIP: 10.96.0.11
  ports: [{port: 80}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: web-only, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  rules: [{}]
"#;

    #[test]
    fn pod_becomes_workload() {
        let mut o = Objects::default();
        o.add_file(Path::new("t"), OBJS).unwrap();
        let cfg = IndexConfig::default();
        let pod = &o.pods[&("shop".into(), "web-7d4b9-abcde".into())];
        let w = workload(&o, &cfg, pod, true, &StrictModes::default()).unwrap();
        assert_eq!(w.uid, "Kubernetes//Pod/shop/web-7d4b9-abcde");
        assert_eq!(w.addresses, vec![vec![10, 10, 1, 5]]);
        assert_eq!(w.tunnel_protocol, pb::TunnelProtocol::Hbone as i32);
        assert_eq!(w.service_account, "web-sa");
        assert_eq!(w.node, "node-1");
        assert_eq!(w.workload_name, "web");
        assert_eq!(w.canonical_name, "web");
        assert_eq!(w.canonical_revision, "v2");
        assert_eq!(w.status, pb::WorkloadStatus::Healthy as i32);
        assert_eq!(w.authorization_policies, vec!["shop/web-only"]);
        let ports = &w.services["shop/web.shop.svc.cluster.local"].ports;
        assert_eq!(
            (ports[0].service_port, ports[0].target_port),
            (80, 8080),
            "named port resolved"
        );
        assert_eq!((ports[1].service_port, ports[1].target_port), (9090, 9091));
        assert!(!w.services.contains_key("shop/other.shop.svc.cluster.local"));
        let plain = workload(&o, &cfg, pod, false, &StrictModes::default()).unwrap();
        assert_eq!(plain.tunnel_protocol, pb::TunnelProtocol::None as i32);
    }

    #[test]
    fn unready_and_unscheduled_pods() {
        let mut o = Objects::default();
        o.add_file(Path::new("t"), OBJS).unwrap();
        let cfg = IndexConfig::default();
        let mut pod = o.pods[&("shop".into(), "web-7d4b9-abcde".into())]
            .as_ref()
            .clone();
        pod.status.conditions.clear();
        let w = workload(&o, &cfg, &pod, true, &StrictModes::default()).unwrap();
        assert_eq!(w.status, pb::WorkloadStatus::Unhealthy as i32);
        pod.status.pod_ips.clear();
        assert!(workload(&o, &cfg, &pod, true, &StrictModes::default()).is_none());
    }
    /// A pod's selector policies come from its namespace and the root namespace only (a
    /// range of the sorted map: a namespace whose name starts the same is not included),
    /// each once, even for a pod of the root namespace.
    #[test]
    fn selector_policies_of_the_pods_namespace_and_the_root_namespace() {
        let policy = |ns: &str, name: &str| {
            format!(
                "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {{selector: {{matchLabels: {{app: web}}}}, rules: [{{}}]}}\n---\n"
            )
        };
        let mut yaml = String::new();
        for (ns, name) in [
            ("shop", "a"),
            ("shop", "z"),
            ("shop-2", "other"),
            ("sho", "other"),
            ("istio-system", "mesh"),
            ("back", "other"),
        ] {
            yaml += &policy(ns, name);
        }
        let mut o = Objects::default();
        o.add_file(Path::new("p"), &yaml).unwrap();
        let cfg = IndexConfig::default();
        let pod = |ns: &str| {
            let mut p = Pod::default();
            p.metadata.name = "web-1".into();
            p.metadata.namespace = Some(ns.into());
            p.metadata.labels.insert("app".into(), "web".into());
            p.status.pod_ip = Some("10.10.1.5".into());
            p
        };
        let policies = |ns: &str| {
            workload(&o, &cfg, &pod(ns), true, &StrictModes::default())
                .unwrap()
                .authorization_policies
        };
        assert_eq!(policies("shop"), ["istio-system/mesh", "shop/a", "shop/z"]);
        assert_eq!(policies("istio-system"), ["istio-system/mesh"]);
        assert_eq!(policies("empty"), ["istio-system/mesh"]);
    }
}
