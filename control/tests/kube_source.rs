//! The Kubernetes source against a fake API server on loopback that serves list (with
//! resourceVersion) and watch (newline-delimited events), so kube's real watcher runs:
//! initial lists, incremental events, a 410 Gone forcing a re-list, a CRD that is not
//! installed, and a malformed object that must not wipe the rest.

mod common;
mod fake_api;

use common::ca_request;
use fake_api::{CONTROL_NAMESPACE, Fake, FakeState, Refusal, write_kubeconfig};
use mesh_control::manifest::Objects;
use mesh_identity::{SpiffeId, generate_csr};
use mesh_proto::ca::istio_certificate_service_client::IstioCertificateServiceClient;
use mesh_proto::discovery::DeltaDiscoveryRequest;
use mesh_proto::discovery::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use serde_json::{Value, json};
use std::time::Duration;
use tokio::sync::mpsc;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

fn ns(name: &str, labels: Value) -> Value {
    json!({"metadata": {"name": name, "labels": labels}})
}

fn pod(ns: &str, name: &str, ip: &str) -> Value {
    json!({"metadata": {"name": name, "namespace": ns, "uid": format!("uid-{name}")},
           "spec": {"nodeName": "node-1", "serviceAccountName": "web"},
           "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": "True"}]}})
}

/// `default/kubernetes` as a real API server lists it (kubeadm, 1.28-1.33): no selector,
/// its endpoints only in the EndpointSlice the API server keeps, with managedFields.
fn kubernetes_service() -> Value {
    json!({"metadata": {"name": "kubernetes", "namespace": "default", "uid": "3f1c1a0e",
                        "resourceVersion": "200", "creationTimestamp": "2026-11-01T10:00:00Z",
                        "labels": {"component": "apiserver", "provider": "kubernetes"},
                        "managedFields": [{"manager": "kube-apiserver", "operation": "Update",
                                           "apiVersion": "v1", "time": "2026-11-01T10:00:00Z",
                                           "fieldsType": "FieldsV1",
                                           "fieldsV1": {"f:metadata": {"f:labels": {".": {}, "f:component": {}, "f:provider": {}}},
                                                        "f:spec": {"f:clusterIP": {}, "f:ports": {}}}}]},
           "spec": {"clusterIP": "10.96.0.1", "clusterIPs": ["10.96.0.1"],
                    "internalTrafficPolicy": "Cluster", "ipFamilies": ["IPv4"],
                    "ipFamilyPolicy": "SingleStack", "sessionAffinity": "None", "type": "ClusterIP",
                    "ports": [{"name": "https", "port": 443, "protocol": "TCP", "targetPort": 6443}]},
           "status": {"loadBalancer": {}}})
}

fn kubernetes_endpoint_slice(api_server_ip: &str) -> Value {
    json!({"metadata": {"name": "kubernetes", "namespace": "default", "uid": "8a2d9c11",
                        "resourceVersion": "201", "generation": 1,
                        "creationTimestamp": "2026-11-01T10:00:00Z",
                        "labels": {"kubernetes.io/service-name": "kubernetes"},
                        "managedFields": [{"manager": "kube-apiserver", "operation": "Update",
                                           "apiVersion": "discovery.k8s.io/v1",
                                           "time": "2026-11-01T10:00:00Z", "fieldsType": "FieldsV1",
                                           "fieldsV1": {"f:addressType": {}, "f:endpoints": {}, "f:ports": {}}}]},
           "addressType": "IPv4",
           "endpoints": [{"addresses": [api_server_ip], "conditions": {"ready": true}}],
           "ports": [{"name": "https", "port": 6443, "protocol": "TCP"}]})
}

/// mesh-control in Kubernetes mode on loopback, state in `dir`, no tokens file.
fn kube_mode(
    dir: &std::path::Path,
    kubeconfig: std::path::PathBuf,
) -> mesh_control::server::ServerConfig {
    mesh_control::server::ServerConfig {
        source: mesh_control::server::ConfigSource::Kubernetes {
            kubeconfig: Some(kubeconfig),
        },
        state_dir: dir.join("state"),
        ca_dir: None,
        tokens: None,
        token_audiences: vec!["istio-ca".into()],
        node_proxy_accounts: vec!["mesh-system/ztunnel".into()],
        listen: "127.0.0.1:0".parse().unwrap(),
        debug_listen: "127.0.0.1:0".parse().unwrap(),
        readiness_listen: None,
        waypoints: None,
        dns_names: vec!["mesh-control.test".into()],
        ip_sans: vec![],
        trust_domain: "cluster.local".into(),
        cluster_id: "Kubernetes".into(),
        root_namespace: "istio-system".into(),
        excluded_namespaces: vec![],
    }
}

async fn next(
    rx: &mut mpsc::UnboundedReceiver<std::sync::Arc<Objects>>,
    what: &str,
    f: impl Fn(&Objects) -> bool,
) -> std::sync::Arc<Objects> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let o = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
            .unwrap();
        if f(&o) {
            return o;
        }
    }
}

#[tokio::test]
async fn lists_watches_relists_after_410_and_skips_bad_objects() {
    let fake = Fake::default();
    fake.set(
        "namespaces",
        vec![ns("shop", json!({"istio.io/dataplane-mode": "ambient"}))],
    );
    fake.set("pods", vec![pod("shop", "web-1", "10.10.1.5")]);
    fake.0.lock().unwrap().missing.push("httpfaults".into());
    let url = fake.serve().await;
    let client = kube::Client::try_from(kube::Config::new(url.parse().unwrap())).unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let readiness = mesh_control::readiness::Readiness::default();
    tokio::spawn(mesh_control::kube_source::run(
        client,
        readiness.clone(),
        move |o| {
            let _ = tx.send(o);
        },
    ));

    // Initial lists (an optional kind whose CRD is missing counts as empty).
    let o = next(&mut rx, "the initial state", |o| o.pods.len() == 1).await;
    assert!(
        readiness.problems().iter().all(|p| p.starts_with("xDS")),
        "every kind is read: {:?}",
        readiness.problems()
    );
    assert!(o.namespaces.contains_key("shop"));
    // The same objects feed the index: the pod is an enrolled workload.
    let r = mesh_control::index::compute(&o, &Default::default());
    assert!(r.addresses.contains_key("Kubernetes//Pod/shop/web-1"));

    // Watch events.
    fake.push("pods", "ADDED", pod("shop", "web-2", "10.10.1.6"));
    next(&mut rx, "an added pod", |o| o.pods.len() == 2).await;
    fake.push("pods", "DELETED", pod("shop", "web-1", "10.10.1.5"));
    let o = next(&mut rx, "a deleted pod", |o| o.pods.len() == 1).await;
    assert!(
        o.pods
            .contains_key(&("shop".to_string(), "web-2".to_string()))
    );

    // 410 Gone: the watcher re-lists and sees what changed meanwhile.
    fake.set(
        "pods",
        vec![
            pod("shop", "web-2", "10.10.1.6"),
            pod("shop", "web-3", "10.10.1.7"),
        ],
    );
    fake.expire("pods");
    let o = next(&mut rx, "the re-list after 410", |o| {
        o.pods.len() == 2
            && o.pods
                .contains_key(&("shop".to_string(), "web-3".to_string()))
    })
    .await;
    assert!(
        !o.pods
            .contains_key(&("shop".to_string(), "web-1".to_string()))
    );

    // A malformed object is skipped; everything else stays.
    fake.push("services", "ADDED", json!({"metadata": {"name": "bad", "namespace": "shop"}, "spec": {"ports": [{"port": "not-a-number"}]}}));
    fake.push("services", "ADDED", json!({"metadata": {"name": "good", "namespace": "shop"}, "spec": {"clusterIP": "10.96.0.9", "ports": [{"port": 80}]}}));
    let o = next(&mut rx, "the good service", |o| {
        o.services
            .contains_key(&("shop".to_string(), "good".to_string()))
    })
    .await;
    assert!(
        !o.services
            .contains_key(&("shop".to_string(), "bad".to_string()))
    );
    assert_eq!(o.pods.len(), 2, "a bad object never wipes the rest");
    fake.assert_authorized();
}

/// The whole control plane in Kubernetes mode: it waits for the first complete sync
/// before serving, then follows the API server.
#[tokio::test]
async fn control_plane_serves_what_the_api_server_holds() {
    let fake = Fake::default();
    fake.set(
        "namespaces",
        vec![ns("shop", json!({"istio.io/dataplane-mode": "ambient"}))],
    );
    fake.set("pods", vec![pod("shop", "web-1", "10.10.1.5")]);
    let url = fake.serve().await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = write_kubeconfig(dir.path(), &url);
    let running = mesh_control::server::start(kube_mode(dir.path(), kubeconfig))
        .await
        .unwrap();
    let mut generation = running.shared.generation.clone();
    let has = |g: &mesh_control::generation::Generation, key: &str| {
        g.resources.addresses.contains_key(key)
    };
    // Served from the first generation on: never an empty set before the sync.
    assert!(has(&generation.borrow(), "Kubernetes//Pod/shop/web-1"));

    fake.push("pods", "ADDED", pod("shop", "web-2", "10.10.1.6"));
    tokio::time::timeout(
        Duration::from_secs(15),
        generation.wait_for(|g| has(g, "Kubernetes//Pod/shop/web-2")),
    )
    .await
    .expect("the new pod reaches the served configuration")
    .unwrap();

    // CA: ztunnel's service-account token, vouched for by TokenReview and bound to
    // node-1, may obtain identities of node-1's pods only.
    fake.0.lock().unwrap().reviews.insert(
        "ztunnel-node-1-token".into(),
        json!({"authenticated": true, "user": {
            "username": "system:serviceaccount:mesh-system:ztunnel",
            "extra": {"authentication.kubernetes.io/node-name": ["node-1"]}}}),
    );
    let root = std::fs::read_to_string(dir.path().join("state/root-cert.pem")).unwrap();
    let channel = Endpoint::from_shared(format!("https://{}", running.grpc_addr))
        .unwrap()
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(root))
                .domain_name("mesh-control.test"),
        )
        .unwrap()
        .connect_lazy();
    let mut ca = IstioCertificateServiceClient::new(channel);
    let web = SpiffeId::new("cluster.local", "shop", "web").unwrap();
    let csr = generate_csr(&web).unwrap();
    let issued = ca
        .create_certificate(ca_request(&csr.csr_pem, &web, Some("ztunnel-node-1-token")))
        .await
        .expect("a reviewed ztunnel token on the pod's node gets the certificate");
    assert!(!issued.into_inner().cert_chain.is_empty());
    assert_eq!(
        fake.0.lock().unwrap().audiences_seen.last(),
        Some(&json!(["istio-ca"]))
    );

    let other = SpiffeId::new("cluster.local", "shop", "admin").unwrap();
    let err = ca
        .create_certificate(ca_request(
            &csr.csr_pem,
            &other,
            Some("ztunnel-node-1-token"),
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");

    let err = ca
        .create_certificate(ca_request(&csr.csr_pem, &web, Some("forged-token")))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    assert_eq!(err.message(), mesh_control::grpc::UNAUTHENTICATED);
    fake.assert_authorized();
}

#[tokio::test]
async fn unreachable_kubeconfig_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let err = match mesh_control::server::start(kube_mode(
        dir.path(),
        dir.path().join("missing-kubeconfig"),
    ))
    .await
    {
        Ok(_) => panic!("started without a kubeconfig"),
        Err(e) => e,
    };
    assert!(err.contains("missing-kubeconfig"), "{err}");
}

/// Kubernetes mode with waypoint deployment: an istio-waypoint Gateway is applied as a
/// ServiceAccount, root ConfigMap, Deployment and Service, and the Service's address is
/// published in the Gateway's status.
#[tokio::test]
async fn waypoint_gateways_are_deployed_and_their_address_published() {
    let fake = Fake::default();
    fake.set("namespaces", vec![ns("shop", json!({}))]);
    fake.set(
        "gateways",
        vec![
            json!({"metadata": {"name": "waypoint", "namespace": "shop", "uid": "gw-1", "generation": 3},
                   "spec": {"gatewayClassName": "istio-waypoint",
                            "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]}}),
            json!({"metadata": {"name": "ingress", "namespace": "shop", "uid": "gw-2"},
                   "spec": {"gatewayClassName": "istio",
                            "listeners": [{"name": "http", "port": 80, "protocol": "HTTP"}]}}),
        ],
    );
    let url = fake.serve().await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = write_kubeconfig(dir.path(), &url);
    let _running = mesh_control::server::start(mesh_control::server::ServerConfig {
        waypoints: Some(mesh_control::waypoint_deploy::WaypointDeployConfig {
            image: "registry.example.com/mesh:1".into(),
            xds_address: "https://mesh-control.mesh-system.svc:15012".into(),
            trust_domain: "cluster.local".into(),
            cluster_id: "Kubernetes".into(),
            log_level: "info".into(),
            lease: None,
        }),
        ..kube_mode(dir.path(), kubeconfig)
    })
    .await
    .unwrap();

    let status_path = "/apis/gateway.networking.k8s.io/v1/namespaces/shop/gateways/waypoint/status";
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let patches = loop {
        let patches = fake.0.lock().unwrap().patches.clone();
        if patches.iter().any(|(p, _)| p == status_path) {
            break patches;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no status patch; patches so far: {patches:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let paths: Vec<&str> = patches.iter().map(|(p, _)| p.as_str()).collect();
    for expected in [
        "/api/v1/namespaces/shop/serviceaccounts/waypoint",
        "/api/v1/namespaces/shop/configmaps/waypoint-mesh-ca-root",
        "/apis/apps/v1/namespaces/shop/deployments/waypoint",
        "/api/v1/namespaces/shop/services/waypoint",
    ] {
        assert!(
            paths.contains(&expected),
            "{expected} not applied: {paths:?}"
        );
    }
    assert!(
        !paths.iter().any(|p| p.contains("ingress")),
        "a Gateway of another class is left alone: {paths:?}"
    );
    let body = |path: &str| &patches.iter().find(|(p, _)| p == path).unwrap().1;
    let status = body(status_path);
    assert_eq!(status["status"]["addresses"][0]["value"], "10.96.0.77");
    // `kubectl wait --for=condition=Programmed` and Gateway API tooling read these.
    let conditions = status["status"]["conditions"].as_array().unwrap();
    for c in conditions {
        assert_gateway_api_condition(c);
    }
    for t in ["Accepted", "Programmed"] {
        let c = conditions.iter().find(|c| c["type"] == t);
        let c = c.unwrap_or_else(|| panic!("no {t} condition: {status}"));
        assert_eq!(
            (&c["status"], &c["reason"], &c["observedGeneration"]),
            (&json!("True"), &json!(t), &json!(3)),
            "{c}"
        );
    }
    // Server-side apply of the status subresource by our field manager.
    let (_, query, content_type) = fake
        .0
        .lock()
        .unwrap()
        .patch_params
        .iter()
        .find(|(p, _, _)| p == status_path)
        .cloned()
        .unwrap();
    assert_eq!(content_type, "application/apply-patch+yaml");
    assert!(
        query.contains("fieldManager=mesh-control") && query.contains("force=true"),
        "{query}"
    );
    let root = std::fs::read_to_string(dir.path().join("state/root-cert.pem")).unwrap();
    assert_eq!(
        body("/api/v1/namespaces/shop/configmaps/waypoint-mesh-ca-root")["data"]["root-cert.pem"],
        root.as_str()
    );
    let deployment = body("/apis/apps/v1/namespaces/shop/deployments/waypoint");
    assert_eq!(deployment["metadata"]["ownerReferences"][0]["uid"], "gw-1");
    assert_eq!(
        deployment["spec"]["template"]["spec"]["serviceAccountName"],
        "waypoint"
    );
    fake.assert_authorized();
}

/// A condition as the Gateway API CRDs validate it (`metav1.Condition`): every required
/// field, the status enum, the reason's pattern, an RFC 3339 time and a generation.
fn assert_gateway_api_condition(c: &Value) {
    let keys: std::collections::BTreeSet<&str> =
        c.as_object().unwrap().keys().map(String::as_str).collect();
    for required in ["type", "status", "reason", "message", "lastTransitionTime"] {
        assert!(keys.contains(required), "{required} missing: {c}");
    }
    assert!(
        keys.iter().all(|k| [
            "type",
            "status",
            "reason",
            "message",
            "lastTransitionTime",
            "observedGeneration"
        ]
        .contains(k)),
        "unknown field: {c}"
    );
    assert!(["True", "False", "Unknown"].contains(&c["status"].as_str().unwrap()));
    let reason = c["reason"].as_str().unwrap();
    assert!(
        reason.starts_with(|ch: char| ch.is_ascii_alphabetic())
            && reason
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || "_,:".contains(ch))
            && !reason.ends_with([',', ':'])
            && reason.len() <= 1024,
        "reason {reason:?}"
    );
    assert!(c["message"].as_str().unwrap().len() <= 32768);
    let t = c["lastTransitionTime"].as_str().unwrap();
    time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|e| panic!("lastTransitionTime {t:?}: {e}"));
    assert!(
        c["observedGeneration"].as_i64().is_some_and(|g| g >= 0),
        "{c}"
    );
}

/// A ztunnel's reviewed token, bound to `node`.
fn ztunnel_review(node: &str) -> Value {
    json!({"authenticated": true, "user": {
        "username": "system:serviceaccount:mesh-system:ztunnel",
        "extra": {"authentication.kubernetes.io/node-name": [node]}}})
}

/// mesh-control in Kubernetes mode against `fake`, serving; its state in the directory.
async fn kube_plane(fake: &Fake) -> (tempfile::TempDir, mesh_control::server::Running) {
    let url = fake.serve().await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = write_kubeconfig(dir.path(), &url);
    let running = mesh_control::server::start(kube_mode(dir.path(), kubeconfig))
        .await
        .unwrap();
    (dir, running)
}

/// A CA client of `running` (root from `dir`).
fn ca_client(
    dir: &std::path::Path,
    running: &mesh_control::server::Running,
) -> IstioCertificateServiceClient<tonic::transport::Channel> {
    IstioCertificateServiceClient::new(channel(dir, running))
}

fn channel(
    dir: &std::path::Path,
    running: &mesh_control::server::Running,
) -> tonic::transport::Channel {
    let root = std::fs::read_to_string(dir.join("state/root-cert.pem")).unwrap();
    Endpoint::from_shared(format!("https://{}", running.grpc_addr))
        .unwrap()
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(root))
                .domain_name("mesh-control.test"),
        )
        .unwrap()
        .connect_lazy()
}

/// Unauthenticated callers of the CA and of xDS learn nothing: not the API server's
/// words, not which accounts are accepted. Every reason gets the same status and message.
#[tokio::test]
async fn unauthenticated_callers_get_one_generic_error() {
    let fake = Fake::default();
    fake.set("pods", vec![pod("shop", "web-1", "10.10.1.5")]);
    {
        let mut st = fake.0.lock().unwrap();
        // A ztunnel token, but issued for another audience.
        st.reviews
            .insert("other-audience-token".into(), ztunnel_review("node-1"));
        st.token_audience
            .insert("other-audience-token".into(), "vault".into());
        // A genuine token of an account that is neither a node proxy's nor a waypoint's.
        st.reviews.insert(
            "web-token".into(),
            json!({"authenticated": true, "user": {"username": "system:serviceaccount:shop:web"}}),
        );
    }
    let (dir, running) = kube_plane(&fake).await;
    let mut ca = ca_client(dir.path(), &running);
    let web = SpiffeId::new("cluster.local", "shop", "web").unwrap();
    let csr = generate_csr(&web).unwrap();
    let tokens = [
        None,
        Some("forged-token"),
        Some("other-audience-token"),
        Some("web-token"),
    ];
    for token in tokens {
        let err = ca
            .create_certificate(ca_request(&csr.csr_pem, &web, token))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated, "{token:?}");
        assert_eq!(
            err.message(),
            mesh_control::grpc::UNAUTHENTICATED,
            "{token:?}"
        );
    }
    // xDS: the same answer.
    let mut ads = AggregatedDiscoveryServiceClient::new(channel(dir.path(), &running));
    for token in tokens {
        let mut req = tonic::Request::new(tokio_stream::iter(vec![DeltaDiscoveryRequest {
            type_url: mesh_proto::type_url::ADDRESS.into(),
            ..Default::default()
        }]));
        if let Some(t) = token {
            req.metadata_mut()
                .insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
        let status = match ads.delta_aggregated_resources(req).await {
            Err(s) => s,
            Ok(r) => r.into_inner().message().await.unwrap_err(),
        };
        assert_eq!(status.code(), tonic::Code::Unauthenticated, "{token:?}");
        assert_eq!(
            status.message(),
            mesh_control::grpc::UNAUTHENTICATED,
            "{token:?}"
        );
    }
    // They were refused by the API server's verdict (and the mapping), not skipped.
    let reviewed = fake.0.lock().unwrap().reviewed.clone();
    for t in ["forged-token", "other-audience-token", "web-token"] {
        assert!(reviewed.iter().any(|r| r == t), "{t} not reviewed");
    }
}

/// A refused token is not reviewed again for a while, and one address flooding the CA
/// with new bad tokens reaches the API server only a few times.
#[tokio::test]
async fn failed_reviews_are_cached_and_rate_limited_per_peer() {
    use mesh_control::token_review::PEER_BURST;
    let fake = Fake::default();
    fake.set("pods", vec![pod("shop", "web-1", "10.10.1.5")]);
    fake.0
        .lock()
        .unwrap()
        .reviews
        .insert("ztunnel-node-1-token".into(), ztunnel_review("node-1"));
    let (dir, running) = kube_plane(&fake).await;
    let mut ca = ca_client(dir.path(), &running);
    let web = SpiffeId::new("cluster.local", "shop", "web").unwrap();
    let csr = generate_csr(&web).unwrap();
    let good = ca_request(&csr.csr_pem, &web, Some("ztunnel-node-1-token"));
    ca.create_certificate(good).await.expect("a valid token");
    let count = |prefix: &str| {
        fake.0
            .lock()
            .unwrap()
            .reviewed
            .iter()
            .filter(|t| t.starts_with(prefix))
            .count()
    };

    // The same refused token, again and again: one review.
    for _ in 0..5 {
        let err = ca
            .create_certificate(ca_request(&csr.csr_pem, &web, Some("forged-token")))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
    }
    assert_eq!(count("forged-token"), 1, "refusals are cached");

    // A flood of distinct bad tokens from one address.
    let began = std::time::Instant::now();
    let mut limited = 0;
    const FLOOD: usize = 40;
    for i in 0..FLOOD {
        let token = format!("flood-{i}");
        let err = ca
            .create_certificate(ca_request(&csr.csr_pem, &web, Some(&token)))
            .await
            .unwrap_err();
        match err.code() {
            tonic::Code::Unauthenticated => {
                assert_eq!(err.message(), mesh_control::grpc::UNAUTHENTICATED)
            }
            tonic::Code::ResourceExhausted => {
                assert_eq!(err.message(), mesh_control::grpc::RATE_LIMITED);
                limited += 1;
            }
            c => panic!("{token}: {c:?} {err:?}"),
        }
    }
    // The burst (one already spent on forged-token) plus what refilled meanwhile.
    let budget = PEER_BURST as usize + began.elapsed().as_secs() as usize + 1;
    let reviewed = count("flood-");
    assert!(
        reviewed <= budget,
        "{reviewed} of {FLOOD} bad tokens reached the API server (budget {budget})"
    );
    assert_eq!(limited, FLOOD - reviewed);

    // A caller whose valid token is cached is not locked out by its address's budget.
    let good = ca_request(&csr.csr_pem, &web, Some("ztunnel-node-1-token"));
    ca.create_certificate(good)
        .await
        .expect("a cached valid token");
}

/// `GET path` on `addr`: (status code, body).
async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(
        format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut out = String::new();
    tcp.read_to_string(&mut out).await.unwrap();
    let code = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .unwrap_or_default();
    (code, body.to_string())
}

/// `meshctl --control ADDR status`: (success, stdout).
async fn meshctl_status(debug: std::net::SocketAddr) -> (bool, String) {
    tokio::task::spawn_blocking(move || {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_meshctl"))
            .args(["--control", &debug.to_string(), "status"])
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    })
    .await
    .unwrap()
}

/// Polls `/ready` until it answers `want` with a body containing `needle`.
async fn wait_ready(addr: std::net::SocketAddr, want: u16, needle: &str, what: &str) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (code, body) = http_get(addr, "/ready").await;
        if code == want && body.contains(needle) {
            return body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: /ready answers {code}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The API server does not serve security.istio.io/v1 AuthorizationPolicy (404: the CRD
/// is missing, or only an older version is installed). That is "cannot read policies",
/// never "no policies": mesh-control is not ready and serves nothing until it can read
/// them, and if they become unreadable later it turns not ready and keeps the policies
/// it has.
#[tokio::test]
async fn a_missing_policy_crd_version_makes_mesh_control_not_ready() {
    let fake = Fake::default();
    fake.set(
        "namespaces",
        vec![ns("shop", json!({"istio.io/dataplane-mode": "ambient"}))],
    );
    fake.set("pods", vec![pod("shop", "web-1", "10.10.1.5")]);
    fake.set(
        "authorizationpolicies",
        vec![json!({"metadata": {"name": "deny-evil", "namespace": "shop"},
                    "spec": {"action": "DENY", "rules": [{"from": [{"source": {"namespaces": ["evil"]}}]}]}})],
    );
    fake.0
        .lock()
        .unwrap()
        .missing
        .push("authorizationpolicies".into());
    let url = fake.serve().await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = write_kubeconfig(dir.path(), &url);
    let starting = mesh_control::server::bind(mesh_control::server::ServerConfig {
        readiness_listen: Some("127.0.0.1:0".parse().unwrap()),
        ..kube_mode(dir.path(), kubeconfig)
    })
    .await
    .unwrap();
    let (ready_addr, debug_addr) = (starting.readiness_addr.unwrap(), starting.debug_addr);
    let serve = tokio::spawn(starting.serve());

    let body = wait_ready(ready_addr, 503, "404", "while the CRD is missing").await;
    assert!(
        body.contains("AuthorizationPolicy: the API server does not serve AuthorizationPolicy at security.istio.io/v1 or security.istio.io/v1beta1 (404)"),
        "{body}"
    );
    let (ok, out) = meshctl_status(debug_addr).await;
    assert!(!ok, "meshctl status succeeds while not ready: {out}");
    assert!(
        out.contains("NOT READY") && out.contains("AuthorizationPolicy"),
        "{out}"
    );
    // Every other kind is listed: only the policies hold the configuration back (the
    // source publishes within 100 ms of its last list).
    let others = wait_ready(ready_addr, 503, "404", "every other kind listed").await;
    let v: Value = serde_json::from_str(&others).unwrap();
    let listed = |v: &Value| v["problems"].as_array().unwrap().len() == 2;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut v = v;
    while !listed(&v) {
        assert!(tokio::time::Instant::now() < deadline, "{v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
        v = serde_json::from_str(&http_get(ready_addr, "/ready").await.1).unwrap();
    }
    // A negative window, not a wait for a condition: had it gone on to serve without
    // the policies, it would within the source's 100 ms debounce; 500 ms is 5 of them.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !serve.is_finished(),
        "xDS is served although the policies cannot be read"
    );

    // The CRD version appears: ready, with the policy.
    fake.0.lock().unwrap().missing.clear();
    let running = tokio::time::timeout(Duration::from_secs(30), serve)
        .await
        .expect("served once the policies can be read")
        .unwrap()
        .unwrap();
    let has_policy = |running: &mesh_control::server::Running| {
        let g = running.shared.generation.borrow().clone();
        g.objects
            .authorization_policies
            .contains_key(&("shop".to_string(), "deny-evil".to_string()))
            && g.resources
                .authorizations
                .keys()
                .any(|k| k.contains("deny-evil"))
    };
    assert!(has_policy(&running));
    wait_ready(ready_addr, 200, "", "once the CRD is served").await;
    let (ok, out) = meshctl_status(debug_addr).await;
    assert!(ok && out.contains("READY"), "{out}");

    // Unreadable again later: not ready, and the policy stays in force.
    fake.0
        .lock()
        .unwrap()
        .missing
        .push("authorizationpolicies".into());
    fake.expire("authorizationpolicies");
    wait_ready(ready_addr, 503, "404", "after the CRD went away").await;
    assert!(has_policy(&running), "the policy stays in force");
}

/// The Kubernetes API (`kubernetes.default.svc`, a Service without a selector) is
/// reachable from enrolled pods: its endpoint comes from its EndpointSlice and is served
/// as a plaintext (non-HBONE) endpoint, which the data plane's state resolves the VIP to,
/// on the slice's port. A changed slice moves it.
#[tokio::test]
async fn services_without_a_selector_get_their_endpoints_from_endpoint_slices() {
    let fake = Fake::default();
    fake.set(
        "namespaces",
        vec![
            ns("default", json!({})),
            ns("shop", json!({"istio.io/dataplane-mode": "ambient"})),
        ],
    );
    // Pods as a real cluster lists them: dual-stack `podIPs`, and a hostNetwork pod
    // (kube-proxy) whose address is its node's.
    let mut web = pod("shop", "web-1", "10.10.1.5");
    web["status"]["podIPs"] = json!([{"ip": "10.10.1.5"}, {"ip": "fd00:10:10:1::5"}]);
    let proxy = json!({"metadata": {"name": "kube-proxy-7xk2q", "namespace": "kube-system", "uid": "uid-kp",
                                    "ownerReferences": [{"kind": "DaemonSet", "name": "kube-proxy"}]},
                       "spec": {"nodeName": "node-1", "hostNetwork": true, "serviceAccountName": "kube-proxy"},
                       "status": {"podIP": "172.18.0.3", "podIPs": [{"ip": "172.18.0.3"}],
                                  "conditions": [{"type": "Ready", "status": "True"}]}});
    fake.set("pods", vec![web, proxy]);
    fake.set("services", vec![kubernetes_service()]);
    fake.set(
        "endpointslices",
        vec![kubernetes_endpoint_slice("172.18.0.2")],
    );
    let (_dir, running) = kube_plane(&fake).await;

    // What ztunnel would do with the served addresses, by the same state it keeps.
    let plan = |g: &mesh_control::generation::Generation| {
        let mut st = mesh_discovery::State::default();
        for a in g.resources.addresses.values() {
            st.apply_address(a).unwrap();
        }
        let src = st.workload("Kubernetes//Pod/shop/web-1").cloned();
        assert!(src.as_ref().is_some_and(|w| w.hbone), "web-1 is enrolled");
        let Some(mesh_discovery::Destination::Service(svc)) =
            st.destination("", "10.96.0.1".parse().unwrap())
        else {
            panic!("the API server's VIP is not a known service");
        };
        st.pick_endpoint(&svc, 443, src.as_deref())
            .map(|(w, port)| (w.addresses.clone(), port, w.hbone))
    };
    let served = running.shared.generation.borrow().clone();
    {
        let mut st = mesh_discovery::State::default();
        for a in served.resources.addresses.values() {
            st.apply_address(a).unwrap();
        }
        let web = st.workload("Kubernetes//Pod/shop/web-1").unwrap();
        assert_eq!(web.addresses.len(), 2, "both families: {:?}", web.addresses);
        // A node's address is not a pod's: never looked up as the hostNetwork pod.
        assert!(
            st.workload("Kubernetes//Pod/kube-system/kube-proxy-7xk2q")
                .is_some()
        );
        assert!(st.destination("", "172.18.0.3".parse().unwrap()).is_none());
        let node_pods = &served.resources.node_pods["node-1"];
        assert_eq!(node_pods.len(), 1, "hostNetwork pods are never captured");
    }
    assert_eq!(
        plan(&served),
        Some((vec!["172.18.0.2".parse().unwrap()], 6443, false)),
        "kubernetes.default.svc:443 goes in plaintext to the API server on 6443"
    );
    assert!(
        served.resources.addresses.contains_key(
            "Kubernetes/discovery.k8s.io/EndpointSlice/default/kubernetes/172.18.0.2"
        ),
        "Istio's uid for an EndpointSlice endpoint"
    );

    fake.push(
        "endpointslices",
        "MODIFIED",
        kubernetes_endpoint_slice("172.18.0.9"),
    );
    let mut generation = running.shared.generation.clone();
    let moved = tokio::time::timeout(
        Duration::from_secs(15),
        generation.wait_for(|g| {
            g.resources.addresses.contains_key(
                "Kubernetes/discovery.k8s.io/EndpointSlice/default/kubernetes/172.18.0.9",
            )
        }),
    )
    .await
    .expect("the changed slice is served")
    .unwrap()
    .clone();
    assert_eq!(
        plan(&moved),
        Some((vec!["172.18.0.9".parse().unwrap()], 6443, false))
    );
    fake.assert_authorized();
}

/// A TokenReviewer against `fake`, its client built as mesh-control builds it.
fn reviewer(url: &str) -> mesh_control::token_review::TokenReviewer {
    let client =
        mesh_control::token_review::review_client(kube::Config::new(url.parse().unwrap())).unwrap();
    mesh_control::token_review::TokenReviewer::new(
        client,
        vec!["istio-ca".into()],
        vec!["mesh-system/ztunnel".into()],
    )
}

/// Many callers presenting the same token at once (a node's reconnect storm) cause one
/// TokenReview, and all get its verdict.
#[tokio::test]
async fn concurrent_identical_tokens_share_one_review() {
    let fake = Fake::default();
    {
        let mut st = fake.0.lock().unwrap();
        st.reviews
            .insert("ztunnel-node-1-token".into(), ztunnel_review("node-1"));
        // Long enough for every caller to start while the first review is out.
        st.review_hold = Duration::from_millis(500);
    }
    let url = fake.serve().await;
    let reviewer = reviewer(&url);
    let objects = Objects::default();
    // From as many addresses (pods of one node behind SNAT look alike, but not always).
    let peer = |i: u8| Some(std::net::IpAddr::from([10, 0, 0, i]));
    let verdicts = futures_util::future::join_all(
        (0..16).map(|i| reviewer.authenticate("ztunnel-node-1-token", peer(i), &objects)),
    )
    .await;
    for v in verdicts {
        assert_eq!(v, Ok(mesh_control::auth::Principal::Node("node-1".into())));
    }
    assert_eq!(fake.0.lock().unwrap().reviewed.len(), 1, "one review");
    // Refusals are shared the same way.
    let verdicts = futures_util::future::join_all(
        (0..16).map(|i| reviewer.authenticate("forged-token", peer(i), &objects)),
    )
    .await;
    assert!(
        verdicts
            .iter()
            .all(|v| matches!(v, Err(mesh_control::token_review::ReviewError::Refused(_))))
    );
    assert_eq!(fake.0.lock().unwrap().reviewed.len(), 2);
}

/// Callers sharing one review are each charged to their own peer: a peer over its
/// budget is refused even while another peer's review of the same token is out, and
/// never turns that other peer away.
#[tokio::test]
async fn a_shared_review_charges_every_caller_to_its_own_peer() {
    use mesh_control::token_review::ReviewError;
    let fake = Fake::default();
    fake.0
        .lock()
        .unwrap()
        .reviews
        .insert("ztunnel-node-1-token".into(), ztunnel_review("node-1"));
    let url = fake.serve().await;
    let reviewer = reviewer(&url);
    let objects = Objects::default();
    let a = Some(std::net::IpAddr::from([10, 0, 0, 1]));
    let b = Some(std::net::IpAddr::from([10, 0, 0, 2]));
    // Peer a spends its budget on bad tokens.
    for i in 0.. {
        let v = reviewer
            .authenticate(&format!("bad-{i}"), a, &objects)
            .await;
        if v == Err(ReviewError::RateLimited) {
            break;
        }
        assert!(i < 100, "peer a is never limited: {v:?}");
    }
    // Long enough for the second caller to come while the first review is out.
    fake.0.lock().unwrap().review_hold = Duration::from_millis(200);
    let reviews = fake.0.lock().unwrap().reviewed.len();

    // b's review is out when a comes with the same token: a is still over its budget.
    let (vb, va) = tokio::join!(
        reviewer.authenticate("shared-bad-token", b, &objects),
        reviewer.authenticate("shared-bad-token", a, &objects),
    );
    assert!(matches!(vb, Err(ReviewError::Refused(_))), "{vb:?}");
    assert_eq!(va, Err(ReviewError::RateLimited));
    // a first: it is refused alone, b is reviewed.
    let (va, vb) = tokio::join!(
        reviewer.authenticate("ztunnel-node-1-token", a, &objects),
        reviewer.authenticate("ztunnel-node-1-token", b, &objects),
    );
    assert_eq!(va, Err(ReviewError::RateLimited));
    assert_eq!(vb, Ok(mesh_control::auth::Principal::Node("node-1".into())));
    assert_eq!(fake.0.lock().unwrap().reviewed.len(), reviews + 2);
}

/// A 429 from the API server is retried after its Retry-After; throttled past the
/// retry budget, the caller is told to retry later (gRPC UNAVAILABLE), never
/// "unauthenticated", and the token is not remembered as refused.
#[tokio::test]
async fn throttled_token_reviews_are_retried_and_never_refused() {
    use mesh_control::token_review::{ReviewError, THROTTLE_RETRIES};
    let fake = Fake::default();
    fake.set("pods", vec![pod("shop", "web-1", "10.10.1.5")]);
    fake.0
        .lock()
        .unwrap()
        .reviews
        .insert("ztunnel-node-1-token".into(), ztunnel_review("node-1"));
    let url = fake.serve().await;
    let reviewer = reviewer(&url);
    let objects = Objects::default();
    let count = || fake.0.lock().unwrap().reviewed.len();

    // Twice throttled with Retry-After: 1, then answered.
    fake.0
        .lock()
        .unwrap()
        .throttle
        .insert("ztunnel-node-1-token".into(), (2, Some(1)));
    let began = std::time::Instant::now();
    assert_eq!(
        reviewer
            .authenticate("ztunnel-node-1-token", None, &objects)
            .await,
        Ok(mesh_control::auth::Principal::Node("node-1".into()))
    );
    assert!(
        began.elapsed() >= Duration::from_secs(2),
        "Retry-After honoured: {:?}",
        began.elapsed()
    );
    assert_eq!(count(), 3);

    // Throttled for good: a bounded number of attempts, then "retry later".
    fake.0
        .lock()
        .unwrap()
        .throttle
        .insert("other-token".into(), (u32::MAX, Some(1)));
    fake.0
        .lock()
        .unwrap()
        .reviews
        .insert("other-token".into(), ztunnel_review("node-2"));
    let before = count();
    let v = reviewer.authenticate("other-token", None, &objects).await;
    assert!(matches!(v, Err(ReviewError::Unavailable(_))), "{v:?}");
    assert_eq!(count() - before, THROTTLE_RETRIES as usize + 1);
    // Not remembered as refused: once the API server answers, the token is good.
    fake.0.lock().unwrap().throttle.clear();
    assert_eq!(
        reviewer.authenticate("other-token", None, &objects).await,
        Ok(mesh_control::auth::Principal::Node("node-2".into()))
    );

    // Through the CA, as ztunnel sees it.
    fake.0
        .lock()
        .unwrap()
        .throttle
        .insert("ztunnel-node-1-token".into(), (u32::MAX, None));
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = write_kubeconfig(dir.path(), &url);
    let running = mesh_control::server::start(kube_mode(dir.path(), kubeconfig))
        .await
        .unwrap();
    let mut ca = ca_client(dir.path(), &running);
    let web = SpiffeId::new("cluster.local", "shop", "web").unwrap();
    let csr = generate_csr(&web).unwrap();
    let err = ca
        .create_certificate(ca_request(&csr.csr_pem, &web, Some("ztunnel-node-1-token")))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert_eq!(err.message(), mesh_control::grpc::REVIEW_UNAVAILABLE);
    fake.0.lock().unwrap().throttle.clear();
    ca.create_certificate(ca_request(&csr.csr_pem, &web, Some("ztunnel-node-1-token")))
        .await
        .expect("the same token, once the API server answers");
    fake.assert_authorized();
}

/// mesh-control with waypoint deployment, one of several replicas (`identity` in the
/// Lease), against the API server at `url`.
async fn replica(url: &str, identity: &str) -> (tempfile::TempDir, mesh_control::server::Running) {
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = write_kubeconfig(dir.path(), url);
    let running = mesh_control::server::start(mesh_control::server::ServerConfig {
        waypoints: Some(mesh_control::waypoint_deploy::WaypointDeployConfig {
            image: "registry.example.com/mesh:1".into(),
            xds_address: "https://mesh-control.mesh-system.svc:15012".into(),
            trust_domain: "cluster.local".into(),
            cluster_id: "Kubernetes".into(),
            log_level: "info".into(),
            lease: Some(mesh_control::leader::LeaseConfig {
                namespace: "mesh-system".into(),
                name: "mesh-control-waypoints".into(),
                identity: identity.into(),
                duration: Duration::from_secs(2),
                renew_every: Duration::from_millis(200),
            }),
        }),
        ..kube_mode(dir.path(), kubeconfig)
    })
    .await
    .unwrap();
    (dir, running)
}

/// Waits (up to 30 s) until `f` holds of the fake's state.
async fn until(fake: &Fake, what: &str, f: impl Fn(&FakeState) -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !f(&fake.0.lock().unwrap()) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Two replicas: only the Lease's holder deploys waypoints; when it is cut off from the
/// API server the other takes over, and a deleted waypoint Deployment is put back.
#[tokio::test]
async fn one_replica_deploys_waypoints_and_repairs_what_is_deleted() {
    const DEPLOYMENT: &str = "/apis/apps/v1/namespaces/shop/deployments/waypoint";
    const STATUS: &str =
        "/apis/gateway.networking.k8s.io/v1/namespaces/shop/gateways/waypoint/status";
    let gateway = |generation: u64| {
        json!({"metadata": {"name": "waypoint", "namespace": "shop", "uid": "gw-1", "generation": generation},
               "spec": {"gatewayClassName": "istio-waypoint",
                        "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]}})
    };
    let fake = Fake::default();
    fake.set("namespaces", vec![ns("shop", json!({}))]);
    fake.set("gateways", vec![gateway(1)]);
    let (url_a, url_b) = (fake.serve_as("a").await, fake.serve_as("b").await);
    let applied_by = |st: &FakeState, who: &str, path: &str| {
        st.patch_from
            .iter()
            .filter(|(t, p)| t == who && p == path)
            .count()
    };
    let holder = |st: &FakeState| {
        st.objects
            .get("leases")
            .and_then(|l| l.first())
            .map(|l| l["spec"].clone())
    };

    let _a = replica(&url_a, "replica-a").await;
    until(&fake, "replica a to deploy the waypoint", |st| {
        applied_by(st, "a", DEPLOYMENT) > 0
    })
    .await;
    assert_eq!(
        holder(&fake.0.lock().unwrap()).unwrap()["holderIdentity"],
        "replica-a"
    );
    let _b = replica(&url_b, "replica-b").await;
    until(&fake, "replica b to read the Lease", |st| {
        st.requests.iter().any(|(t, m, p)| {
            t == "b" && m == "GET" && p.ends_with("/leases/mesh-control-waypoints")
        })
    })
    .await;

    // A change both replicas see: only the leader acts on it.
    fake.push("gateways", "MODIFIED", gateway(2));
    until(&fake, "replica a to program generation 2", |st| {
        st.patches
            .iter()
            .any(|(p, b)| p == STATUS && b["status"]["conditions"][0]["observedGeneration"] == 2)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !fake
            .0
            .lock()
            .unwrap()
            .patch_from
            .iter()
            .any(|(t, _)| t == "b"),
        "a follower wrote: {:?}",
        fake.0.lock().unwrap().patch_from
    );

    // Replica a is cut off: b takes the Lease over once it has gone unrenewed for its
    // duration, and deploys.
    fake.0.lock().unwrap().dead.push("a".into());
    until(&fake, "replica b to take over and deploy", |st| {
        applied_by(st, "b", DEPLOYMENT) > 0
    })
    .await;
    let lease = holder(&fake.0.lock().unwrap()).unwrap();
    assert_eq!(lease["holderIdentity"], "replica-b");
    assert_eq!(lease["leaseTransitions"], 1);
    assert_eq!(lease["leaseDurationSeconds"], 2);

    // The waypoint's Deployment is deleted: it is put back.
    let before = applied_by(&fake.0.lock().unwrap(), "b", DEPLOYMENT);
    let deployment = fake
        .get("deployments", "waypoint")
        .expect("the applied Deployment is stored");
    fake.push("deployments", "DELETED", deployment);
    until(&fake, "the deleted Deployment to be put back", |st| {
        applied_by(st, "b", DEPLOYMENT) > before
    })
    .await;
    fake.assert_authorized();
}

/// A leader whose Lease renewal hangs (the API server accepts the request and never
/// answers; kube's own read timeout is minutes) stops acting by itself, before the
/// others may take the Lease over.
#[tokio::test]
async fn a_leader_whose_renewal_hangs_steps_down() {
    let fake = Fake::default();
    let url = fake.serve_as("a").await;
    let client = kube::Client::try_from(kube::Config::new(url.parse().unwrap())).unwrap();
    let (tx, mut leader) = tokio::sync::watch::channel(false);
    tokio::spawn(mesh_control::leader::run(
        client,
        mesh_control::leader::LeaseConfig {
            namespace: CONTROL_NAMESPACE.into(),
            name: "mesh-control-waypoints".into(),
            identity: "replica-a".into(),
            duration: Duration::from_secs(3),
            renew_every: Duration::from_millis(200),
        },
        tx,
    ));
    tokio::time::timeout(Duration::from_secs(30), leader.wait_for(|l| *l))
        .await
        .expect("replica a to take the Lease")
        .unwrap();
    fake.0.lock().unwrap().hung.push("a".into());
    let renewals = |st: &FakeState| st.requests.iter().filter(|(t, _, _)| t == "a").count();
    let before = renewals(&fake.0.lock().unwrap());
    until(&fake, "a renewal to be sent and hang", |st| {
        renewals(st) > before
    })
    .await;
    tokio::time::timeout(Duration::from_secs(30), leader.wait_for(|l| !*l))
        .await
        .expect("the leader to step down while its renewal hangs")
        .unwrap();
}

/// A leader that loses the Lease in the middle of a pass (its renewals stall while one
/// Gateway's apply is slow) writes nothing more: the next Gateway waits until it leads
/// again.
#[tokio::test]
async fn a_leader_that_loses_the_lease_mid_pass_stops_writing() {
    const FIRST: &str = "/namespaces/shop/deployments/a-waypoint";
    const FIRST_STATUS: &str = "/namespaces/shop/gateways/a-waypoint/status";
    const SECOND: &str = "/namespaces/shop/deployments/b-waypoint";
    let gateway = |name: &str| {
        json!({"metadata": {"name": name, "namespace": "shop", "uid": format!("uid-{name}"), "generation": 1},
               "spec": {"gatewayClassName": "istio-waypoint",
                        "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]}})
    };
    let fake = Fake::default();
    fake.set("namespaces", vec![ns("shop", json!({}))]);
    fake.set(
        "gateways",
        vec![gateway("a-waypoint"), gateway("b-waypoint")],
    );
    // The first Gateway's apply is slow.
    fake.0.lock().unwrap().held.push(FIRST.into());
    let url = fake.serve_as("a").await;
    let _a = replica(&url, "replica-a").await;
    let seen = |st: &FakeState, m: &str, p: &str| {
        st.requests
            .iter()
            .position(|(_, method, path)| method == m && path.ends_with(p))
    };
    until(&fake, "the first Gateway's apply", |st| {
        seen(st, "PATCH", FIRST).is_some()
    })
    .await;
    // Its renewals stall too; a round that ended without renewing means it no longer
    // leads (the next round starts only after that).
    let lease_gets = |st: &FakeState| {
        st.requests
            .iter()
            .filter(|(_, m, p)| m == "GET" && p.ends_with("/leases/mesh-control-waypoints"))
            .count()
    };
    let before = {
        let mut st = fake.0.lock().unwrap();
        st.held.push("/leases/".into());
        lease_gets(&st)
    };
    until(&fake, "a renewal round to give up", |st| {
        lease_gets(st) >= before + 2
    })
    .await;
    // The slow apply finishes; then the API server answers Lease requests again.
    fake.0.lock().unwrap().held.retain(|h| h != FIRST);
    until(&fake, "the first Gateway's status", |st| {
        seen(st, "PATCH", FIRST_STATUS).is_some()
    })
    .await;
    let released = fake.0.lock().unwrap().requests.len();
    fake.0.lock().unwrap().held.clear();
    until(&fake, "the second Gateway's apply", |st| {
        seen(st, "PATCH", SECOND).is_some()
    })
    .await;
    let st = fake.0.lock().unwrap();
    let second = seen(&st, "PATCH", SECOND).unwrap();
    let renewed = st.requests[released..]
        .iter()
        .position(|(_, m, p)| m == "PUT" && p.ends_with("/leases/mesh-control-waypoints"))
        .map(|i| i + released);
    assert!(
        renewed.is_some_and(|r| r < second),
        "the second Gateway was applied without the Lease: {:?}",
        st.requests
    );
}

/// Older Istio CRDs serve security.istio.io at v1beta1 only: the policies are read there
/// (same schema) and enforced, never "no policies".
#[tokio::test]
async fn policies_are_read_at_v1beta1_when_v1_is_not_served() {
    let fake = Fake::default();
    fake.set(
        "namespaces",
        vec![ns("shop", json!({"istio.io/dataplane-mode": "ambient"}))],
    );
    fake.set("pods", vec![pod("shop", "web-1", "10.10.1.5")]);
    fake.set(
        "authorizationpolicies",
        vec![json!({"apiVersion": "security.istio.io/v1beta1", "kind": "AuthorizationPolicy",
                    "metadata": {"name": "deny-evil", "namespace": "shop"},
                    "spec": {"action": "DENY", "rules": [{"from": [{"source": {"namespaces": ["evil"]}}]}]}})],
    );
    {
        let mut st = fake.0.lock().unwrap();
        st.missing.push("v1/authorizationpolicies".into());
        st.missing.push("v1/peerauthentications".into());
    }
    let (_dir, running) = tokio::time::timeout(Duration::from_secs(30), kube_plane(&fake))
        .await
        .expect("served: the policies are readable at v1beta1");
    let g = running.shared.generation.borrow().clone();
    assert!(
        g.resources.authorizations.contains_key("shop/deny-evil"),
        "the v1beta1 policy is enforced: {:?}",
        g.resources.authorizations.keys().collect::<Vec<_>>()
    );
    let st = fake.0.lock().unwrap();
    let listed = |path: &str| st.requests.iter().any(|(_, m, p)| m == "GET" && p == path);
    assert!(listed(
        "/apis/security.istio.io/v1beta1/authorizationpolicies"
    ));
    assert!(listed(
        "/apis/security.istio.io/v1beta1/peerauthentications"
    ));
    drop(st);
    fake.assert_authorized();
}

/// The watch protocol as a real API server speaks it, which the source relies on: lists
/// in pages (`limit`/`continue`), a watch that ends (its `timeoutSeconds`) resumed from
/// the last version seen with the gap replayed (nothing lost, no re-list), BOOKMARKs
/// keeping a quiet watch's version fresh across a compaction, and 410 Gone with a
/// re-list when the version is too old anyway.
#[tokio::test]
async fn lists_page_and_watches_resume_replay_bookmark_and_relist() {
    let fake = Fake::default();
    fake.set(
        "namespaces",
        vec![ns("shop", json!({"istio.io/dataplane-mode": "ambient"}))],
    );
    const PODS: usize = 1205;
    fake.set(
        "pods",
        (0..PODS)
            .map(|i| {
                pod(
                    "shop",
                    &format!("p-{i:04}"),
                    &format!("10.10.{}.{}", i / 250, i % 250 + 1),
                )
            })
            .collect(),
    );
    let url = fake.serve().await;
    let client = kube::Client::try_from(kube::Config::new(url.parse().unwrap())).unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel();
    tokio::spawn(mesh_control::kube_source::run(
        client,
        mesh_control::readiness::Readiness::default(),
        move |o| {
            let _ = tx.send(o);
        },
    ));
    next(&mut rx, "every page of pods", |o| o.pods.len() == PODS).await;
    let pod_lists = || {
        fake.0
            .lock()
            .unwrap()
            .lists
            .iter()
            .filter(|(p, _, _)| p == "pods")
            .cloned()
            .collect::<Vec<_>>()
    };
    let lists = pod_lists();
    assert!(
        lists.len() >= 3 && lists.iter().all(|(_, l, _)| l.is_some()),
        "paged: {lists:?}"
    );
    assert_eq!(
        lists.iter().filter(|(_, _, c)| c.is_some()).count(),
        lists.len() - 1
    );
    let has =
        |o: &Objects, name: &str| o.pods.contains_key(&("shop".to_string(), name.to_string()));

    // The watch ends; a pod added before the client resumes is replayed to it.
    fake.close_watches("pods");
    fake.push("pods", "ADDED", pod("shop", "in-the-gap", "10.20.0.1"));
    next(&mut rx, "the pod added in the gap", |o| {
        has(o, "in-the-gap")
    })
    .await;
    assert_eq!(pod_lists().len(), lists.len(), "resumed, not re-listed");

    // Compaction after a bookmark: the quiet watch resumes from the bookmark's version.
    fake.push("services", "ADDED", json!({"metadata": {"name": "busy", "namespace": "shop"},
                                          "spec": {"clusterIP": "10.96.0.9", "ports": [{"port": 80}]}}));
    fake.compact("pods", "v1", "Pod");
    fake.close_watches("pods");
    fake.push("pods", "ADDED", pod("shop", "after-bookmark", "10.20.0.2"));
    next(&mut rx, "the pod added after the compaction", |o| {
        has(o, "after-bookmark")
    })
    .await;
    assert_eq!(
        pod_lists().len(),
        lists.len(),
        "a bookmark spares the re-list"
    );

    // Compacted past the watch's version with no bookmark: 410 Gone, then a re-list
    // that has what changed meanwhile.
    fake.push("services", "ADDED", json!({"metadata": {"name": "busier", "namespace": "shop"},
                                          "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80}]}}));
    fake.compact_silently();
    fake.close_watches("pods");
    fake.set("pods", vec![pod("shop", "after-410", "10.20.0.3")]);
    let o = next(&mut rx, "the re-list after 410", |o| has(o, "after-410")).await;
    assert_eq!(o.pods.len(), 1, "the re-list replaces what was held");
    assert!(pod_lists().len() > lists.len());
    fake.assert_authorized();
}

/// TokenReview answers as API servers of different ages give them for ztunnel's
/// projected token: 1.28 binds the pod only (its node comes from the pod), 1.32 binds the
/// node too. Both vouch for that node's pods, and only those.
#[tokio::test]
async fn token_reviews_of_1_28_and_1_32_api_servers_bind_the_node() {
    let fake = Fake::default();
    let mut ztunnel = pod("mesh-system", "ztunnel-x7k2p", "10.10.1.2");
    ztunnel["spec"]["serviceAccountName"] = json!("ztunnel");
    fake.set(
        "pods",
        vec![
            pod("shop", "web-1", "10.10.1.5"),
            ztunnel,
            json!({"metadata": {"name": "db-1", "namespace": "shop", "uid": "uid-db-1"},
                   "spec": {"nodeName": "node-2", "serviceAccountName": "db"},
                   "status": {"podIP": "10.10.2.5", "conditions": [{"type": "Ready", "status": "True"}]}}),
        ],
    );
    let user = |extra: Value| {
        json!({"authenticated": true, "audiences": ["istio-ca"], "user": {
            "username": "system:serviceaccount:mesh-system:ztunnel",
            "uid": "5b0f1c9e-7a51-4c59-9a1e-0c1d2e3f4a5b",
            "groups": ["system:serviceaccounts", "system:serviceaccounts:mesh-system", "system:authenticated"],
            "extra": extra}})
    };
    {
        let mut st = fake.0.lock().unwrap();
        st.reviews.insert(
            "token-1.28".into(),
            user(
                json!({"authentication.kubernetes.io/pod-name": ["ztunnel-x7k2p"],
                        "authentication.kubernetes.io/pod-uid": ["uid-ztunnel-x7k2p"]}),
            ),
        );
        st.reviews.insert(
            "token-1.32".into(),
            user(json!({"authentication.kubernetes.io/credential-id": ["JTI=4f8c2a51-0d3e-4b6f-9e21-7c5d8a9b0e12"],
                        "authentication.kubernetes.io/node-name": ["node-1"],
                        "authentication.kubernetes.io/node-uid": ["0e6a3c2d-1f4b-4a8e-b9c7-d5e4f3a2b1c0"],
                        "authentication.kubernetes.io/pod-name": ["ztunnel-x7k2p"],
                        "authentication.kubernetes.io/pod-uid": ["uid-ztunnel-x7k2p"]})),
        );
    }
    let (dir, running) = kube_plane(&fake).await;
    let mut ca = ca_client(dir.path(), &running);
    let web = SpiffeId::new("cluster.local", "shop", "web").unwrap();
    let db = SpiffeId::new("cluster.local", "shop", "db").unwrap();
    for token in ["token-1.28", "token-1.32"] {
        let csr = generate_csr(&web).unwrap();
        ca.create_certificate(ca_request(&csr.csr_pem, &web, Some(token)))
            .await
            .unwrap_or_else(|e| panic!("{token}: a pod on the token's node: {e:?}"));
        let csr = generate_csr(&db).unwrap();
        let err = ca
            .create_certificate(ca_request(&csr.csr_pem, &db, Some(token)))
            .await
            .unwrap_err();
        assert_eq!(
            err.code(),
            tonic::Code::PermissionDenied,
            "{token}: another node's pod"
        );
    }
    fake.assert_authorized();
}

/// Waits until mesh-control's readiness problems satisfy `f`.
async fn until_problems(
    running: &mesh_control::server::Running,
    what: &str,
    f: impl Fn(&[String]) -> bool,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let problems = running.readiness.problems();
        if f(&problems) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: {problems:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The API server refuses lists on demand, as a real one does. A 429 (API priority and
/// fairness) is retried after its `Retry-After`, not before. A 403 (a role taken away)
/// or 401 (an expired token) on a re-list makes mesh-control not ready, saying why, while
/// it keeps serving what it last read; it is ready again once it can list.
#[tokio::test]
async fn throttled_lists_wait_their_retry_after_and_refused_lists_make_it_not_ready() {
    let fake = Fake::default();
    fake.set(
        "namespaces",
        vec![ns("shop", json!({"istio.io/dataplane-mode": "ambient"}))],
    );
    fake.set("pods", vec![pod("shop", "web-1", "10.10.1.5")]);
    fake.0.lock().unwrap().refuse.insert(
        "pods".into(),
        Refusal {
            code: 429,
            times: 1,
            retry_after: Some(2),
        },
    );
    let (_dir, running) = kube_plane(&fake).await;
    let served = |running: &mesh_control::server::Running| {
        running
            .shared
            .generation
            .borrow()
            .resources
            .addresses
            .contains_key("Kubernetes//Pod/shop/web-1")
    };
    assert!(
        served(&running),
        "served once the throttled list is retried"
    );
    let pods: Vec<_> = fake
        .0
        .lock()
        .unwrap()
        .answered
        .iter()
        .filter(|(p, ..)| p == "pods")
        .cloned()
        .collect();
    assert_eq!(
        pods.iter()
            .map(|(_, code, _)| *code)
            .take(2)
            .collect::<Vec<_>>(),
        [429, 200]
    );
    assert!(
        pods[1].2 - pods[0].2 >= Duration::from_secs(2),
        "retried {:?} after a 429 asking for 2 s",
        pods[1].2 - pods[0].2
    );

    for (code, reason) in [(403, "Forbidden"), (401, "Unauthorized")] {
        fake.0.lock().unwrap().refuse.insert(
            "pods".into(),
            Refusal {
                code,
                times: u32::MAX,
                retry_after: None,
            },
        );
        // The watch ends with 410 Gone: the pods must be listed again.
        fake.expire("pods");
        until_problems(&running, &format!("{code} reported"), |p| {
            p.iter()
                .any(|p| p.starts_with("Pod: cannot list Pod") && p.contains(reason))
        })
        .await;
        // A generation built after the refusal: an event on a kind that still lists, and
        // the generation that carries it (a wipe would be published by then).
        let marker = format!("after-{code}");
        fake.push("services", "ADDED", json!({"metadata": {"name": marker, "namespace": "shop"},
                                              "spec": {"clusterIP": format!("10.96.1.{}", code % 256), "ports": [{"port": 80}]}}));
        let mut generation = running.shared.generation.clone();
        tokio::time::timeout(
            Duration::from_secs(15),
            generation.wait_for(|g| g.resources.addresses.keys().any(|k| k.contains(&marker))),
        )
        .await
        .expect("a service added after the refusal is served")
        .unwrap();
        assert!(served(&running), "{code}: the last-known pods are kept");
        fake.0.lock().unwrap().refuse.remove("pods");
        until_problems(&running, &format!("ready again after {code}"), |p| {
            p.is_empty()
        })
        .await;
        assert!(served(&running));
    }
    fake.assert_authorized();
}
