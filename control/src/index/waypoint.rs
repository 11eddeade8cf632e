//! Binding services and workloads to waypoints: `istio.io/use-waypoint` on the object or
//! its namespace names a Gateway of class `istio-waypoint` whose `istio.io/waypoint-for`
//! admits that kind of traffic.

use super::IndexConfig;
use crate::k8s::Labels;
use crate::manifest::Objects;
use mesh_proto::workload as pb;

pub const USE_WAYPOINT: &str = "istio.io/use-waypoint";
pub const USE_WAYPOINT_NAMESPACE: &str = "istio.io/use-waypoint-namespace";
pub const WAYPOINT_FOR: &str = "istio.io/waypoint-for";
pub const WAYPOINT_CLASS: &str = "istio-waypoint";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrafficKind {
    Service,
    Workload,
}

/// The waypoint for an object with `labels` in namespace `ns`, if it binds to one.
pub fn resolve(
    objs: &Objects,
    cfg: &IndexConfig,
    ns: &str,
    labels: &Labels,
    kind: TrafficKind,
) -> Option<pb::GatewayAddress> {
    let ns_labels = objs.namespaces.get(ns).map(|n| &n.metadata.labels);
    let from_ns = || ns_labels.and_then(|l| l.get(USE_WAYPOINT));
    let (name, wp_ns) = match labels.get(USE_WAYPOINT) {
        Some(name) => (name, labels.get(USE_WAYPOINT_NAMESPACE)),
        None => (
            from_ns()?,
            ns_labels.and_then(|l| l.get(USE_WAYPOINT_NAMESPACE)),
        ),
    };
    if name == "none" {
        return None;
    }
    let wp_ns = wp_ns.map(String::as_str).unwrap_or(ns);
    let gw = objs.gateways.get(&(wp_ns.to_string(), name.clone()))?;
    if gw.spec.gateway_class_name != WAYPOINT_CLASS {
        return None;
    }
    let admits = match gw
        .metadata
        .labels
        .get(WAYPOINT_FOR)
        .map(String::as_str)
        .unwrap_or("service")
    {
        "all" => true,
        "service" => kind == TrafficKind::Service,
        "workload" => kind == TrafficKind::Workload,
        _ => false,
    };
    if !admits {
        return None;
    }
    // The waypoint counts once its Service exists (its instances are that Service's
    // endpoints).
    objs.services.get(&(wp_ns.to_string(), name.clone()))?;
    Some(pb::GatewayAddress {
        destination: Some(pb::gateway_address::Destination::Hostname(
            pb::NamespacedHostname {
                namespace: wp_ns.to_string(),
                hostname: cfg.service_hostname(wp_ns, name),
            },
        )),
        hbone_mtls_port: u32::from(mesh_proto::ports::HBONE),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::{Gateway, Namespace, ObjectMeta, Service};

    fn setup(waypoint_for: Option<&str>) -> Objects {
        let mut o = Objects::default();
        let mut ns = Namespace::default();
        ns.metadata.name = "shop".into();
        ns.metadata.labels.insert(USE_WAYPOINT.into(), "wp".into());
        o.namespaces.insert("shop".into(), ns);
        let mut gw = Gateway {
            metadata: ObjectMeta {
                name: "wp".into(),
                namespace: Some("shop".into()),
                ..Default::default()
            },
            ..Default::default()
        };
        if let Some(f) = waypoint_for {
            gw.metadata.labels.insert(WAYPOINT_FOR.into(), f.into());
        }
        gw.spec.gateway_class_name = WAYPOINT_CLASS.into();
        o.gateways.insert(("shop".into(), "wp".into()), gw);
        let mut svc = Service::default();
        svc.metadata.name = "wp".into();
        svc.metadata.namespace = Some("shop".into());
        o.services
            .insert(("shop".into(), "wp".into()), std::sync::Arc::new(svc));
        o
    }

    #[test]
    fn namespace_label_binds_services_by_default() {
        let o = setup(None);
        let cfg = IndexConfig::default();
        let gw = resolve(&o, &cfg, "shop", &Labels::new(), TrafficKind::Service).unwrap();
        assert_eq!(gw.hbone_mtls_port, 15008);
        match gw.destination.unwrap() {
            pb::gateway_address::Destination::Hostname(h) => {
                assert_eq!(h.hostname, "wp.shop.svc.cluster.local")
            }
            other => panic!("{other:?}"),
        }
        assert!(resolve(&o, &cfg, "shop", &Labels::new(), TrafficKind::Workload).is_none());
        let all = setup(Some("all"));
        assert!(resolve(&all, &cfg, "shop", &Labels::new(), TrafficKind::Workload).is_some());
    }

    #[test]
    fn object_label_overrides_and_none_opts_out() {
        let o = setup(None);
        let cfg = IndexConfig::default();
        let none: Labels = [(USE_WAYPOINT.to_string(), "none".to_string())].into();
        assert!(resolve(&o, &cfg, "shop", &none, TrafficKind::Service).is_none());
        let other: Labels = [(USE_WAYPOINT.to_string(), "missing".to_string())].into();
        assert!(resolve(&o, &cfg, "shop", &other, TrafficKind::Service).is_none());
    }
}
