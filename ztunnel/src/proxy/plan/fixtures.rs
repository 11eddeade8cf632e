//! State for the plan tests: workloads, services and policies as xDS would give them.

use crate::state::{GatewayAddress, LoadBalancing, Locality, PortMapping, Service, Workload};
use mesh_authz::{Action, Match, Policy, PolicyScope};
use mesh_identity::SpiffeId;
use mesh_proto::workload::AppProtocol;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

/// The key of [`service`] as workloads name it.
pub const KEY: &str = "ns/s.ns.svc.cluster.local";

pub fn wl(uid: &str, ip: [u8; 4], hbone: bool, sa: &str) -> Workload {
    Workload {
        uid: uid.into(),
        name: uid.into(),
        namespace: "ns".into(),
        addresses: vec![IpAddr::from(ip)],
        network: String::new(),
        hbone,
        identity: SpiffeId::new("cluster.local", "ns", sa).unwrap(),
        waypoint: None,
        node: "n".into(),
        canonical_name: String::new(),
        canonical_revision: String::new(),
        workload_name: String::new(),
        services: HashMap::new(),
        authorization_policies: vec![],
        healthy: true,
        cluster_id: String::new(),
        locality: Locality::default(),
        host_network: false,
        capacity: 1,
    }
}

/// `w` as an endpoint of the service `key`, its port 80 mapped to `target`.
pub fn with_svc(mut w: Workload, key: &str, target: u16) -> Workload {
    w.services.insert(
        key.into(),
        vec![PortMapping {
            service_port: 80,
            target_port: target,
            app_protocol: AppProtocol::Unknown,
        }],
    );
    w
}

/// `s.ns.svc.cluster.local` at 10.96.0.10, port 80 to 8080.
pub fn service(waypoint: Option<GatewayAddress>) -> Service {
    Service {
        name: "s".into(),
        namespace: "ns".into(),
        hostname: "s.ns.svc.cluster.local".into(),
        vips: vec![(String::new(), IpAddr::from([10, 96, 0, 10]))],
        ports: vec![PortMapping {
            service_port: 80,
            target_port: 8080,
            app_protocol: AppProtocol::Unknown,
        }],
        subject_alt_names: vec![],
        waypoint,
        load_balancing: LoadBalancing::default(),
    }
}

/// Another service (10.96.0.11) with the same ports.
pub fn other_service() -> Service {
    Service {
        name: "other".into(),
        hostname: "other.ns.svc.cluster.local".into(),
        vips: vec![(String::new(), IpAddr::from([10, 96, 0, 11]))],
        ..service(None)
    }
}

pub fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// A namespace-wide policy in `ns` with `action` for connections matching `m`.
pub fn policy(name: &str, action: Action, m: Match) -> Policy {
    Policy {
        name: name.into(),
        namespace: "ns".into(),
        scope: PolicyScope::Namespace,
        action,
        dry_run: false,
        rules: vec![vec![vec![m]]],
        problems: vec![],
    }
}

/// Denies every connection to `port` in `ns`.
pub fn deny_port(port: u16) -> Policy {
    policy(
        "deny-port",
        Action::Deny,
        Match {
            destination_ports: vec![port],
            ..Default::default()
        },
    )
}
