//! EndpointSlice endpoints that are not pods → istio.workload.Workload, as Istio does: a
//! Service without a selector (`default/kubernetes` first) has no pods, and its endpoints
//! are known only from its EndpointSlices. Each such endpoint is published as a workload
//! of the Service, without HBONE (ztunnel connects to it in plaintext, passthrough) and
//! in host-network mode (its address may be shared, so it is never looked up by IP).
//! Endpoints that name a Pod are skipped: the pod's own workload says more. So are
//! endpoints at a pod's IP without naming it: published in plaintext they would let
//! enrolled clients reach that pod around its waypoint and without their identity. A
//! Service with a selector takes its endpoints from its pods only.

use super::IndexConfig;
use super::service::ip_bytes;
use crate::k8s::EndpointSlice;
use crate::manifest::Objects;
use mesh_proto::workload as pb;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::IpAddr;

/// The label naming the Service a slice belongs to.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// The IPs of every pod in its own network namespace (host-network pods share the node's).
pub fn pod_addresses(objs: &Objects) -> HashSet<IpAddr> {
    objs.pods
        .values()
        .filter(|p| !p.spec.host_network)
        .flat_map(|p| super::workload::pod_ips(p))
        .collect()
}

/// The workloads of one slice (none when it belongs to no known Service, or to one with
/// a selector). `pod_ips`: [`pod_addresses`]. Endpoints skipped for a reason the user
/// should know are added to `warnings` (`meshctl status`).
pub fn workloads(
    objs: &Objects,
    cfg: &IndexConfig,
    es: &EndpointSlice,
    pod_ips: &HashSet<IpAddr>,
    warnings: &mut Vec<String>,
) -> Vec<pb::Workload> {
    let ns = es.metadata.ns();
    let Some(svc_name) = es.metadata.labels.get(SERVICE_NAME_LABEL) else {
        return vec![]; // not a Service's: a bag of addresses we have no use for
    };
    if es.address_type == "FQDN" {
        return vec![];
    }
    let Some(svc) = objs.services.get(&(ns.to_string(), svc_name.clone())) else {
        return vec![];
    };
    if svc.spec.selector.as_ref().is_some_and(|s| !s.is_empty()) {
        return vec![]; // its endpoints are its pods, published as the pods' workloads
    }
    // A slice port is named after the Service port it serves; its number is the target.
    let ports = es
        .ports
        .iter()
        .flatten()
        .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
        .filter_map(|p| {
            let target = p.port?;
            let name = p.name.as_deref().unwrap_or_default();
            let sp = svc
                .spec
                .ports
                .iter()
                .find(|sp| sp.name.as_deref().unwrap_or_default() == name)?;
            Some(pb::Port {
                service_port: u32::from(sp.port),
                target_port: u32::from(target),
                app_protocol: 0,
            })
        })
        .collect();
    let services = HashMap::from([(
        format!("{ns}/{}", cfg.service_hostname(ns, svc_name)),
        pb::PortList { ports },
    )]);
    let slice = format!("EndpointSlice {ns}/{}", es.metadata.name);
    let mut seen = BTreeSet::new();
    let mut out = vec![];
    for ep in es.endpoints.iter().flatten() {
        if ep.target_ref.as_ref().is_some_and(|t| t.kind == "Pod") {
            continue;
        }
        let Some(key) = ep.addresses.first() else {
            continue;
        };
        if !seen.insert(key.clone()) {
            warnings.push(format!("{slice}: {key} is listed twice; published once"));
            continue;
        }
        let Ok(addresses) = ep
            .addresses
            .iter()
            .map(|a| a.parse::<IpAddr>().map(ip_bytes))
            .collect::<Result<Vec<_>, _>>()
        else {
            warnings.push(format!(
                "{slice}: endpoint {key}: an address is not an IP; skipped"
            ));
            continue;
        };
        if let Some(ip) = ep
            .addresses
            .iter()
            .filter_map(|a| a.parse::<IpAddr>().ok())
            .find(|ip| pod_ips.contains(ip))
        {
            warnings.push(format!(
                "{slice}: endpoint {ip} is a pod's IP without naming the pod; skipped (reach the pod through a Service that selects it)"
            ));
            continue;
        }
        out.push(pb::Workload {
            uid: format!(
                "{}/discovery.k8s.io/EndpointSlice/{ns}/{}/{key}",
                cfg.cluster_id, es.metadata.name
            ),
            name: es.metadata.name.clone(),
            namespace: ns.to_string(),
            addresses,
            tunnel_protocol: pb::TunnelProtocol::None as i32,
            trust_domain: if cfg.trust_domain == "cluster.local" {
                String::new()
            } else {
                cfg.trust_domain.clone()
            },
            services: services.clone(),
            status: if ep.conditions.ready.unwrap_or(true) {
                pb::WorkloadStatus::Healthy as i32
            } else {
                pb::WorkloadStatus::Unhealthy as i32
            },
            cluster_id: cfg.cluster_id.clone(),
            network_mode: pb::NetworkMode::HostNetwork as i32,
            ..Default::default()
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// `default/kubernetes` as a kubeadm cluster has it, and a slice of a selector
    /// Service whose endpoints are pods.
    const OBJS: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: kubernetes, namespace: default, labels: {component: apiserver, provider: kubernetes}}
spec:
  clusterIP: 10.96.0.1
  clusterIPs: [10.96.0.1]
  ports: [{name: https, port: 443, protocol: TCP, targetPort: 6443}]
  type: ClusterIP
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: kubernetes
  namespace: default
  labels: {kubernetes.io/service-name: kubernetes, endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io}
addressType: IPv4
endpoints:
  - addresses: [172.18.0.2]
    conditions: {ready: true}
  - addresses: [172.18.0.3]
    conditions: {ready: false}
  - addresses: [172.18.0.2]
ports: [{name: https, port: 6443, protocol: TCP}, {name: dns, port: 53, protocol: UDP}]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  selector: {app: web}
  clusterIP: 10.96.0.10
  ports: [{port: 80}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-abcde, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
endpoints:
  - addresses: [10.10.1.5]
    targetRef: {kind: Pod, name: web-1, namespace: shop}
ports: [{name: "", port: 80, protocol: TCP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: orphan, namespace: shop, labels: {kubernetes.io/service-name: gone}}
addressType: IPv4
endpoints: [{addresses: [10.0.0.9]}]
"#;

    fn objs() -> Objects {
        let mut o = Objects::default();
        o.add_file(Path::new("t"), OBJS).unwrap();
        o
    }

    #[test]
    fn the_api_servers_endpoints_become_plaintext_workloads_of_its_service() {
        let o = objs();
        let es = &o.endpoint_slices[&("default".into(), "kubernetes".into())];
        let mut warnings = vec![];
        let ws = workloads(
            &o,
            &IndexConfig::default(),
            es,
            &pod_addresses(&o),
            &mut warnings,
        );
        assert_eq!(ws.len(), 2, "the repeated address is published once");
        assert_eq!(
            warnings,
            ["EndpointSlice default/kubernetes: 172.18.0.2 is listed twice; published once"]
        );
        let w = &ws[0];
        assert_eq!(
            w.uid,
            "Kubernetes/discovery.k8s.io/EndpointSlice/default/kubernetes/172.18.0.2"
        );
        assert_eq!(w.addresses, vec![vec![172, 18, 0, 2]]);
        assert_eq!(w.tunnel_protocol, pb::TunnelProtocol::None as i32);
        assert_eq!(w.network_mode, pb::NetworkMode::HostNetwork as i32);
        assert_eq!(w.status, pb::WorkloadStatus::Healthy as i32);
        assert!(w.service_account.is_empty());
        let ports = &w.services["default/kubernetes.default.svc.cluster.local"].ports;
        assert_eq!(ports.len(), 1, "UDP is not served: {ports:?}");
        assert_eq!((ports[0].service_port, ports[0].target_port), (443, 6443));
        assert_eq!(ws[1].status, pb::WorkloadStatus::Unhealthy as i32);
    }

    #[test]
    fn pod_endpoints_and_slices_of_unknown_services_are_skipped() {
        let o = objs();
        let cfg = IndexConfig::default();
        for name in ["web-abcde", "orphan"] {
            let es = &o.endpoint_slices[&("shop".into(), name.into())];
            assert!(
                workloads(&o, &cfg, es, &pod_addresses(&o), &mut vec![]).is_empty(),
                "{name}"
            );
        }
    }

    /// A selector-less Service whose slice lists an enrolled pod's IP without naming it,
    /// beside a host-network pod's (the node's) and an outside address; and a Service with
    /// a selector whose slice lists an outside address by hand.
    const POD_IPS: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: db-0, namespace: shop}
spec: {nodeName: n1}
status: {podIP: 10.10.1.7, podIPs: [{ip: 10.10.1.7}]}
---
apiVersion: v1
kind: Pod
metadata: {name: agent, namespace: kube-system}
spec: {nodeName: n1, hostNetwork: true}
status: {podIP: 172.18.0.5, podIPs: [{ip: 172.18.0.5}]}
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: shop}
spec: {clusterIP: 10.96.0.20, ports: [{name: pg, port: 5432}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: db-manual, namespace: shop, labels: {kubernetes.io/service-name: db}}
addressType: IPv4
endpoints:
  - addresses: [10.10.1.7]
  - addresses: [172.18.0.5]
  - addresses: [192.0.2.10]
ports: [{name: pg, port: 5432, protocol: TCP}]
---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: shop}
spec: {selector: {app: api}, clusterIP: 10.96.0.21, ports: [{name: http, port: 80}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: api-extra, namespace: shop, labels: {kubernetes.io/service-name: api}}
addressType: IPv4
endpoints: [{addresses: [192.0.2.11]}]
ports: [{name: http, port: 80, protocol: TCP}]
"#;

    #[test]
    fn a_pods_ip_is_never_published_as_a_plaintext_endpoint() {
        let mut o = Objects::default();
        o.add_file(Path::new("t"), POD_IPS).unwrap();
        let cfg = IndexConfig::default();
        let ips = pod_addresses(&o);
        let es = &o.endpoint_slices[&("shop".into(), "db-manual".into())];
        let mut warnings = vec![];
        let published: Vec<_> = workloads(&o, &cfg, es, &ips, &mut warnings)
            .into_iter()
            .map(|w| w.addresses)
            .collect();
        assert_eq!(
            published,
            vec![vec![vec![172, 18, 0, 5]], vec![vec![192, 0, 2, 10]]],
            "the pod's IP is skipped, the node's and the outside address kept"
        );
        assert_eq!(
            warnings,
            [
                "EndpointSlice shop/db-manual: endpoint 10.10.1.7 is a pod's IP without naming the pod; skipped (reach the pod through a Service that selects it)"
            ],
            "shown in meshctl status"
        );
        let es = &o.endpoint_slices[&("shop".into(), "api-extra".into())];
        assert!(
            workloads(&o, &cfg, es, &ips, &mut vec![]).is_empty(),
            "a Service with a selector takes no endpoints from slices"
        );
    }
}
