use super::*;
use crate::types::{Locality, Workload};
use mesh_identity::SpiffeId;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

fn workload(name: &str, ns: &str, app: &str, version: &str, zone: &str) -> Workload {
    Workload {
        uid: format!("{ns}/{name}"),
        name: name.into(),
        namespace: ns.into(),
        addresses: vec![],
        network: String::new(),
        hbone: true,
        identity: SpiffeId::new("cluster.local", ns, "sa").unwrap(),
        waypoint: None,
        node: String::new(),
        canonical_name: app.into(),
        canonical_revision: version.into(),
        workload_name: format!("{name}-deploy"),
        services: Default::default(),
        authorization_policies: vec![],
        healthy: true,
        cluster_id: "Kubernetes".into(),
        locality: Locality {
            region: "eu".into(),
            zone: zone.into(),
            subzone: String::new(),
        },
        host_network: false,
        capacity: 1,
    }
}

/// The exposition text of one counter with `labels`.
fn exposed(labels: &TcpLabels) -> String {
    let mut r = Registry::default();
    let f = Family::<TcpLabels, Counter>::default();
    r.register("istio_tcp_connections_opened", "", f.clone());
    f.get_or_create(labels).inc();
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &r).unwrap();
    out
}

/// Istio's documented TCP label names (istio.io, "Istio Standard Metrics": labels), plus
/// the locality labels Istio's ztunnel adds.
const ISTIO_TCP_LABELS: &[&str] = &[
    "reporter",
    "source_workload",
    "source_canonical_service",
    "source_canonical_revision",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_cluster",
    "destination_service",
    "destination_service_namespace",
    "destination_service_name",
    "destination_workload",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_cluster",
    "request_protocol",
    "response_flags",
    "connection_security_policy",
    "source_region",
    "source_zone",
    "destination_region",
    "destination_zone",
];

#[test]
fn labels_carry_app_version_cluster_and_locality_of_both_ends() {
    let src = workload("web-1", "front", "web", "v1", "eu-1");
    let dst = workload("api-1", "back", "api", "v2", "eu-2");
    let l = TcpLabels::new("source")
        .with_source(Some(&src))
        .with_destination(Some(&dst));
    let text = exposed(&l);
    for pair in [
        "source_app=\"web\"",
        "source_version=\"v1\"",
        "source_cluster=\"Kubernetes\"",
        "source_workload=\"web-1-deploy\"",
        "destination_app=\"api\"",
        "destination_version=\"v2\"",
        "destination_cluster=\"Kubernetes\"",
        "source_region=\"eu\"",
        "source_zone=\"eu-1\"",
        "destination_region=\"eu\"",
        "destination_zone=\"eu-2\"",
    ] {
        assert!(text.contains(pair), "{pair} missing from:\n{text}");
    }
    // Every label is one of Istio's names, and all of them are there.
    let line = text.lines().find(|l| l.starts_with("istio_tcp")).unwrap();
    let inner = &line[line.find('{').unwrap() + 1..line.rfind('}').unwrap()];
    let names: Vec<&str> = inner
        .split("\",")
        .map(|kv| kv.split('=').next().unwrap())
        .collect();
    for n in &names {
        assert!(
            ISTIO_TCP_LABELS.contains(n),
            "{n} is not one of Istio's labels"
        );
    }
    for n in ISTIO_TCP_LABELS {
        assert!(names.contains(n), "{n} missing from {line}");
    }
}

#[test]
fn locality_labels_appear_only_once_a_workload_is_known() {
    let none = exposed(&TcpLabels::new("destination"));
    assert!(
        !none.contains("_region") && !none.contains("_zone"),
        "{none}"
    );
    assert!(none.contains("source_app=\"unknown\""), "{none}");
    let dst = workload("api-1", "back", "api", "v2", "");
    let one = exposed(&TcpLabels::new("destination").with_destination(Some(&dst)));
    assert!(
        one.contains("source_region=\"unknown\"") && one.contains("destination_zone=\"unknown\""),
        "{one}"
    );
    assert!(one.contains("destination_region=\"eu\""), "{one}");
}
