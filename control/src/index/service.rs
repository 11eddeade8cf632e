//! Kubernetes Service → istio.workload.Service.

use super::IndexConfig;
use super::waypoint::{self, TrafficKind};
use crate::k8s::{IntOrString, Service};
use crate::manifest::Objects;
use mesh_proto::workload as pb;
use std::net::IpAddr;

pub use mesh_authz::ip_bytes;

/// From `appProtocol`, else the port name's prefix (`http-web`, `grpc`, ...).
pub fn app_protocol(app_protocol: Option<&str>, port_name: Option<&str>) -> pb::AppProtocol {
    use pb::AppProtocol::*;
    let by = |s: &str| -> Option<pb::AppProtocol> {
        let s = s.to_ascii_lowercase();
        let p = s.split(['-', '_']).next().unwrap_or_default();
        Some(match p {
            "http" => Http11,
            "http2" | "kubernetes.io/h2c" | "h2c" => Http2,
            "grpc" | "grpc-web" => Grpc,
            "tcp" => Tcp,
            "tls" | "https" | "kubernetes.io/wss" => Tls,
            _ => return None,
        })
    };
    app_protocol
        .and_then(by)
        .or_else(|| port_name.and_then(by))
        .unwrap_or(Unknown)
}

pub fn cluster_ips(svc: &Service) -> Vec<IpAddr> {
    let mut ips: Vec<&str> = svc.spec.cluster_ips.iter().map(String::as_str).collect();
    if ips.is_empty() {
        ips.extend(svc.spec.cluster_ip.as_deref());
    }
    ips.into_iter().filter_map(|s| s.parse().ok()).collect()
}

/// Whether `svc` is an `ExternalName` Service: ambient does not implement them (as
/// istiod), so they are not published and DNS requests for them go to the upstream.
pub fn is_external_name(svc: &Service) -> bool {
    svc.spec.type_.as_deref() == Some("ExternalName")
}

pub fn service(objs: &Objects, cfg: &IndexConfig, svc: &Service) -> Option<pb::Service> {
    if is_external_name(svc) {
        return None;
    }
    let ns = svc.metadata.ns();
    let name = &svc.metadata.name;
    let ports = svc
        .spec
        .ports
        .iter()
        .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
        .map(|p| pb::Port {
            service_port: u32::from(p.port),
            target_port: match &p.target_port {
                None => u32::from(p.port),
                Some(IntOrString::Int(t)) => u32::from(*t),
                // Named: resolved per workload in its `services` map.
                Some(IntOrString::String(s)) => s.parse().unwrap_or(0),
            },
            app_protocol: app_protocol(p.app_protocol.as_deref(), p.name.as_deref()) as i32,
        })
        .collect();
    let mut lb = if svc.spec.internal_traffic_policy.as_deref() == Some("Local") {
        Some(pb::LoadBalancing {
            routing_preference: vec![pb::load_balancing::Scope::Node as i32],
            mode: pb::load_balancing::Mode::Strict as i32,
            health_policy: 0,
        })
    } else {
        let dist = svc.spec.traffic_distribution.as_deref().or_else(|| {
            svc.metadata
                .annotations
                .get("networking.istio.io/traffic-distribution")
                .map(String::as_str)
        });
        use pb::load_balancing::Scope::*;
        let prefs = match dist {
            Some("PreferClose") | Some("PreferSameZone") => Some(vec![Network, Region, Zone]),
            Some("PreferSameNode") => Some(vec![Network, Region, Zone, Subzone, Node]),
            _ => None,
        };
        prefs.map(|p| pb::LoadBalancing {
            routing_preference: p.into_iter().map(|s| s as i32).collect(),
            mode: pb::load_balancing::Mode::Failover as i32,
            health_policy: 0,
        })
    };
    if svc.spec.publish_not_ready_addresses {
        let mut l = lb.unwrap_or_default();
        l.health_policy = pb::load_balancing::HealthPolicy::AllowAll as i32;
        lb = Some(l);
    }
    Some(pb::Service {
        name: name.clone(),
        namespace: ns.to_string(),
        hostname: cfg.service_hostname(ns, name),
        addresses: cluster_ips(svc)
            .into_iter()
            .map(|ip| pb::NetworkAddress {
                network: String::new(),
                address: ip_bytes(ip),
                length: None,
            })
            .collect(),
        ports,
        waypoint: waypoint::resolve(objs, cfg, ns, &svc.metadata.labels, TrafficKind::Service),
        load_balancing: lb,
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::ServicePort;

    #[test]
    fn protocols() {
        use pb::AppProtocol::*;
        assert_eq!(app_protocol(None, Some("http-web")), Http11);
        assert_eq!(app_protocol(None, Some("http2")), Http2);
        assert_eq!(app_protocol(None, Some("grpc")), Grpc);
        assert_eq!(app_protocol(Some("kubernetes.io/h2c"), Some("web")), Http2);
        assert_eq!(app_protocol(None, Some("redis")), Unknown);
        assert_eq!(app_protocol(None, None), Unknown);
    }

    #[test]
    fn ports_vips_and_load_balancing() {
        let mut s = Service::default();
        s.metadata.name = "web".into();
        s.metadata.namespace = Some("shop".into());
        s.spec.cluster_ip = Some("10.96.0.10".into());
        s.spec.internal_traffic_policy = Some("Local".into());
        s.spec.ports = vec![
            ServicePort {
                name: Some("http".into()),
                port: 80,
                target_port: Some(IntOrString::String("http".into())),
                ..Default::default()
            },
            ServicePort {
                port: 9000,
                ..Default::default()
            },
        ];
        let out = service(&Objects::default(), &IndexConfig::default(), &s).unwrap();
        assert_eq!(out.hostname, "web.shop.svc.cluster.local");
        assert_eq!(out.addresses[0].address, vec![10, 96, 0, 10]);
        assert_eq!(
            (out.ports[0].service_port, out.ports[0].target_port),
            (80, 0)
        );
        assert_eq!(
            (out.ports[1].service_port, out.ports[1].target_port),
            (9000, 9000)
        );
        let lb = out.load_balancing.unwrap();
        assert_eq!(lb.mode, pb::load_balancing::Mode::Strict as i32);
        assert_eq!(
            lb.routing_preference,
            vec![pb::load_balancing::Scope::Node as i32]
        );
        s.spec.internal_traffic_policy = None;
        s.spec.traffic_distribution = Some("PreferClose".into());
        let lb = service(&Objects::default(), &IndexConfig::default(), &s)
            .unwrap()
            .load_balancing
            .unwrap();
        assert_eq!(lb.mode, pb::load_balancing::Mode::Failover as i32);
        assert_eq!(lb.routing_preference.len(), 3);
    }

    /// A dual-stack Service is published with every VIP of `spec.clusterIPs`, in order
    /// (Istio's `Service.addresses` is a list), and its pods with both of their addresses:
    /// a client dialling either family finds the Service and an endpoint of that family.
    #[test]
    fn dual_stack_service_and_pods_publish_both_families() {
        let yaml = r#"
apiVersion: v1
kind: Pod
metadata: {name: api, namespace: back, labels: {app: api}}
spec: {nodeName: node-1, containers: [{name: api}]}
status:
  podIP: 10.244.1.5
  podIPs: [{ip: 10.244.1.5}, {ip: "fd00:10:244:1::5"}]
  conditions: [{type: Ready, status: "True"}]
---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: back}
spec:
  selector: {app: api}
  clusterIP: 10.96.0.20
  clusterIPs: [10.96.0.20, "fd00:96::20"]
  ipFamilies: [IPv4, IPv6]
  ipFamilyPolicy: PreferDualStack
  ports: [{name: http, port: 80, targetPort: 8080}]
"#;
        let mut objs = Objects::default();
        objs.add_file(std::path::Path::new("t"), yaml).unwrap();
        let out = super::super::compute(&objs, &IndexConfig::default());
        let Some(pb::address::Type::Service(svc)) =
            &out.addresses["back/api.back.svc.cluster.local"].r#type
        else {
            panic!("the Service is published")
        };
        let v6: std::net::Ipv6Addr = "fd00:96::20".parse().unwrap();
        let vips: Vec<&[u8]> = svc.addresses.iter().map(|a| &a.address[..]).collect();
        assert_eq!(vips, [&[10, 96, 0, 20][..], &v6.octets()[..]]);
        let Some(pb::address::Type::Workload(w)) =
            &out.addresses["Kubernetes//Pod/back/api"].r#type
        else {
            panic!("the pod is published")
        };
        let pod6: std::net::Ipv6Addr = "fd00:10:244:1::5".parse().unwrap();
        assert_eq!(w.addresses, [vec![10, 244, 1, 5], pod6.octets().to_vec()]);

        // Only `clusterIP` (a single-stack Service written before `clusterIPs`): that one;
        // headless (`None`): no VIP at all.
        let mut s = objs.services[&("back".into(), "api".into())]
            .as_ref()
            .clone();
        s.spec.cluster_ips.clear();
        assert_eq!(cluster_ips(&s), ["10.96.0.20".parse::<IpAddr>().unwrap()]);
        s.spec.cluster_ip = Some("None".into());
        s.spec.cluster_ips = vec!["None".into()];
        assert!(cluster_ips(&s).is_empty());
    }

    #[test]
    fn external_name_services_are_not_published_headless_ones_are() {
        let yaml = r#"
apiVersion: v1
kind: Service
metadata: {name: ext, namespace: back}
spec:
  type: ExternalName
  externalName: db.example.com
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: back}
spec:
  clusterIP: None
  selector: {app: db}
---
apiVersion: v1
kind: Pod
metadata: {name: db-0, namespace: back, labels: {app: db}}
spec:
  nodeName: node-1
  containers: [{name: db}]
status:
  podIPs: [{ip: 10.244.1.7}]
  conditions: [{type: Ready, status: "True"}]
"#;
        let mut objs = Objects::default();
        objs.add_file(std::path::Path::new("t"), yaml).unwrap();
        let out = super::super::compute(&objs, &IndexConfig::default());
        assert!(
            !out.addresses
                .contains_key("back/ext.back.svc.cluster.local"),
            "an ExternalName Service is the upstream's"
        );
        assert!(out.addresses.contains_key("back/db.back.svc.cluster.local"));
        let Some(pb::address::Type::Workload(w)) =
            &out.addresses["Kubernetes//Pod/back/db-0"].r#type
        else {
            panic!("the pod is published")
        };
        assert!(
            w.services.contains_key("back/db.back.svc.cluster.local"),
            "a headless Service without ports still lists its endpoints: {:?}",
            w.services
        );
    }
}
