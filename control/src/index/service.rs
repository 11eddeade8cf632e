//! Kubernetes Service → istio.workload.Service.

use super::IndexConfig;
use super::waypoint::{self, TrafficKind};
use crate::k8s::{IntOrString, Service};
use crate::manifest::Objects;
use mesh_proto::workload as pb;
use std::net::IpAddr;

pub fn ip_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v) => v.octets().to_vec(),
        IpAddr::V6(v) => v.octets().to_vec(),
    }
}

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

pub fn service(objs: &Objects, cfg: &IndexConfig, svc: &Service) -> Option<pb::Service> {
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
}
