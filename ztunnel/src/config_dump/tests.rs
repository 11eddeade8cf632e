use super::*;
use crate::identity::{CertManager, CertSource};
use crate::state::{LoadBalancing, PortMapping};
use mesh_identity::SpiffeId;
use mesh_identity::ca::CertificateAuthority;
use mesh_proto::workload::AppProtocol;
use std::collections::HashMap;
use std::time::Duration;

const KEYS: &str = include_str!("istioctl_keys.json");

fn workload() -> Workload {
    Workload {
        uid: "Kubernetes//Pod/back/api-1".into(),
        name: "api-1".into(),
        namespace: "back".into(),
        addresses: vec!["10.244.1.5".parse().unwrap()],
        network: String::new(),
        hbone: true,
        identity: SpiffeId::new("cluster.local", "back", "api").unwrap(),
        waypoint: Some(GatewayAddress::Hostname {
            namespace: "back".into(),
            hostname: "waypoint.back.svc.cluster.local".into(),
            port: 15008,
        }),
        node: "node-1".into(),
        canonical_name: "api".into(),
        canonical_revision: "v1".into(),
        workload_name: "api".into(),
        services: HashMap::from([(
            "back/api.back.svc.cluster.local".into(),
            vec![PortMapping {
                service_port: 80,
                target_port: 8080,
                app_protocol: AppProtocol::Unknown,
            }],
        )]),
        authorization_policies: vec!["back/deny-admin".into()],
        healthy: true,
        cluster_id: "Kubernetes".into(),
        locality: Locality {
            region: "eu".into(),
            zone: "eu-1".into(),
            subzone: "a".into(),
        },
        host_network: false,
        capacity: 1,
    }
}

fn service() -> Service {
    Service {
        name: "api".into(),
        namespace: "back".into(),
        hostname: "api.back.svc.cluster.local".into(),
        vips: vec![(String::new(), "10.96.0.10".parse().unwrap())],
        ports: vec![PortMapping {
            service_port: 80,
            target_port: 8080,
            app_protocol: AppProtocol::Unknown,
        }],
        subject_alt_names: vec![],
        waypoint: Some(GatewayAddress::Ip {
            ip: "10.244.1.9".parse().unwrap(),
            port: 15008,
        }),
        load_balancing: LoadBalancing {
            preferences: vec![Scope::Zone],
            mode: LbMode::Failover,
            allow_unhealthy: false,
        },
    }
}

fn policy() -> Policy {
    Policy {
        name: "deny-admin".into(),
        namespace: "back".into(),
        scope: PolicyScope::Namespace,
        action: Action::Deny,
        dry_run: false,
        rules: vec![vec![vec![Match {
            namespaces: vec![StringMatch::Exact("front".into())],
            not_principals: vec![StringMatch::Prefix("spiffe://x".into())],
            source_ips: vec![IpNet {
                addr: "10.0.0.0".parse().unwrap(),
                prefix: 8,
            }],
            destination_ports: vec![9000],
            service_accounts: vec![("front".into(), "web".into())],
            ..Default::default()
        }]]],
        problems: vec![],
    }
}

/// A dump with every kind of entry, its certificate issued by a real CA.
async fn full_dump() -> Value {
    let ca = CertificateAuthority::new_root("cluster.local", Duration::from_secs(3600)).unwrap();
    let certs = CertManager::new(CertSource::Local {
        ca: Box::new(ca),
        ttl: Duration::from_secs(600),
    });
    let w = workload();
    certs.get(&w.identity).await.unwrap();
    let mut st = State::default();
    st.insert_workload(w);
    st.insert_service(service());
    st.insert_policy(policy());
    let pods = vec![PodState {
        uid: "Kubernetes//Pod/back/api-1".into(),
        name: "api-1".into(),
        namespace: "back".into(),
        service_account: "api".into(),
        state: "Up",
        netns_inode: 42,
        open_connections: 0,
    }];
    config_dump(&st, &certs.status(), &pods, &json!({}))
}

/// Every key of `obj` is a documented name (or one of ours), and every required one is
/// there.
fn check(keys: &Value, kind: &str, obj: &Value) {
    let names = |k: &str| -> Vec<&str> {
        keys[kind][k]
            .as_array()
            .unwrap_or_else(|| panic!("fixture lacks {kind}.{k}"))
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect()
    };
    let (documented, required, ours) = (names("documented"), names("required"), names("ours"));
    let o = obj
        .as_object()
        .unwrap_or_else(|| panic!("{kind} is no object: {obj}"));
    for k in o.keys() {
        assert!(
            documented.contains(&k.as_str()) || ours.contains(&k.as_str()),
            "{kind}: key {k:?} is not one of Istio's names"
        );
    }
    for k in required {
        assert!(o.contains_key(k), "{kind}: Istio's key {k:?} is missing");
    }
}

#[tokio::test]
async fn config_dump_uses_the_names_istioctl_reads() {
    let keys: Value = serde_json::from_str(KEYS).unwrap();
    let d = full_dump().await;
    check(&keys, "dump", &d);
    let w = &d["workloads"][0];
    check(&keys, "workload", w);
    check(&keys, "locality", &w["locality"]);
    check(&keys, "gateway", &w["waypoint"]);
    let s = &d["services"][0];
    check(&keys, "service", s);
    check(&keys, "gateway", &s["waypoint"]);
    check(&keys, "loadBalancer", &s["loadBalancer"]);
    let (_, e) = s["endpoints"].as_object().unwrap().iter().next().unwrap();
    check(&keys, "endpoint", e);
    let p = &d["policies"][0];
    check(&keys, "policy", p);
    // rules: [][][]PolicyMatch.
    let m = &p["rules"][0][0][0];
    check(&keys, "policyMatch", m);
    check(&keys, "stringMatch", &m["namespaces"][0]);
    check(&keys, "serviceAccountMatch", &m["serviceAccounts"][0]);
    let c = &d["certificates"][0];
    check(&keys, "certificate", c);
    check(&keys, "cert", &c["certChain"][0]);
    check(&keys, "cert", &c["rootCerts"][0]);
    // workloadState: a map keyed by uid.
    let ws = &d["workloadState"]["Kubernetes//Pod/back/api-1"];
    check(&keys, "workloadState", ws);
    check(&keys, "workloadInfo", &ws["info"]);
}

#[tokio::test]
async fn config_dump_values_have_the_types_and_forms_istio_writes() {
    let d = full_dump().await;
    let w = &d["workloads"][0];
    assert_eq!(w["workloadIps"], json!(["10.244.1.5"]));
    assert_eq!(w["protocol"], "HBONE");
    assert_eq!(w["status"], "Healthy");
    assert_eq!(w["serviceAccount"], "api");
    assert_eq!(
        w["waypoint"]["destination"],
        "back/waypoint.back.svc.cluster.local"
    );
    let s = &d["services"][0];
    assert_eq!(s["ports"], json!({"80": 8080}));
    assert_eq!(s["vips"], json!(["/10.96.0.10"]));
    assert_eq!(
        s["endpoints"]["Kubernetes//Pod/back/api-1"]["port"],
        json!({"80": 8080})
    );
    let p = &d["policies"][0];
    assert_eq!(
        (&p["scope"], &p["action"]),
        (&json!("Namespace"), &json!("Deny"))
    );
    assert_eq!(
        p["rules"][0][0][0]["namespaces"],
        json!([{"Exact": "front"}])
    );
    assert_eq!(p["rules"][0][0][0]["sourceIps"], json!(["10.0.0.0/8"]));
    let c = &d["certificates"][0];
    assert_eq!(c["identity"], "spiffe://cluster.local/ns/back/sa/api");
    assert_eq!(c["state"], "Available");
    // pem is the PEM text, base64-encoded, as istioctl decodes it.
    let pem = base64::engine::general_purpose::STANDARD
        .decode(c["certChain"][0]["pem"].as_str().unwrap())
        .unwrap();
    assert!(
        String::from_utf8(pem)
            .unwrap()
            .starts_with("-----BEGIN CERTIFICATE-----")
    );
    let serial = c["certChain"][0]["serialNumber"].as_str().unwrap();
    assert!(serial.bytes().all(|b| b.is_ascii_digit()), "{serial}");
    assert!(
        c["certChain"][0]["expirationTime"]
            .as_str()
            .unwrap()
            .ends_with('Z')
    );
    assert_eq!(
        d["workloadState"]["Kubernetes//Pod/back/api-1"]["info"]["trustDomain"],
        "cluster.local"
    );
}

#[test]
fn serials_print_in_decimal_at_any_length() {
    assert_eq!(serial_decimal("0"), "0");
    assert_eq!(serial_decimal("ff"), "255");
    assert_eq!(serial_decimal("01:00"), "256");
    assert_eq!(serial_decimal("3b9aca00"), "1000000000");
    // 2^128 - 1, beyond any machine integer.
    assert_eq!(
        serial_decimal("ffffffffffffffffffffffffffffffff"),
        "340282366920938463463374607431768211455"
    );
    // 2^160 - 1: the longest serial X.509 allows.
    assert_eq!(
        serial_decimal("ffffffffffffffffffffffffffffffffffffffff"),
        "1461501637330902918203684832716283019655932542975"
    );
}

#[test]
fn certificate_state_follows_istio() {
    let mut c = CertStatus {
        identity: "spiffe://cluster.local/ns/a/sa/b".into(),
        serial: None,
        not_after: None,
        refresh_at: None,
        last_error: None,
        consecutive_failures: 0,
        current: None,
    };
    assert_eq!(cert_state(&c), "Initializing");
    c.last_error = Some("CA refused".into());
    assert_eq!(cert_state(&c), "Unavailable: CA refused");
}
