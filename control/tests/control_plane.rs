//! mesh-control end to end, in process: manifests on disk → delta ADS over TLS to a real
//! tonic client; the CA over the same port.

mod common;

use common::ca_request;
use mesh_control::server::{self, ServerConfig};
use mesh_identity::{SpiffeId, WorkloadCertificate, generate_csr};
use mesh_proto::ca::istio_certificate_service_client::IstioCertificateServiceClient;
use mesh_proto::discovery::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use mesh_proto::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use mesh_proto::prost::Message;
use mesh_proto::{cni, rpc, type_url, workload as pb};
use std::time::Duration;
use tokio::sync::mpsc;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

const TOKEN_1: &str = "node-one-token-0123456789";
const TOKEN_2: &str = "node-two-token-0123456789";

const MESH: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, uid: 1111-aaaa, labels: {app: web}}
spec: {nodeName: node-1, serviceAccountName: web}
status: {podIP: 10.10.1.5, conditions: [{type: Ready, status: "True"}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {selector: {app: web}, clusterIP: 10.96.0.10, ports: [{port: 80, targetPort: 8080}]}
"#;

struct Plane {
    dir: tempfile::TempDir,
    running: server::Running,
}

async fn start() -> Plane {
    let dir = tempfile::tempdir().unwrap();
    let cfg_dir = dir.path().join("manifests");
    std::fs::create_dir_all(&cfg_dir).unwrap();
    std::fs::write(cfg_dir.join("mesh.yaml"), MESH).unwrap();
    std::fs::write(
        dir.path().join("tokens.yaml"),
        format!(
            "tokens:\n- {{token: {TOKEN_1}, node: node-1}}\n- {{token: {TOKEN_2}, node: node-2}}\n"
        ),
    )
    .unwrap();
    let running = server::start(ServerConfig {
        source: mesh_control::server::ConfigSource::Directory(cfg_dir),
        state_dir: dir.path().join("state"),
        ca_dir: None,
        tokens: Some(dir.path().join("tokens.yaml")),
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
        excluded_namespaces: vec!["kube-system".into()],
    })
    .await
    .unwrap();
    Plane { dir, running }
}

impl Plane {
    fn channel(&self) -> Channel {
        let root = std::fs::read_to_string(self.dir.path().join("state/root-cert.pem")).unwrap();
        Endpoint::from_shared(format!("https://{}", self.running.grpc_addr))
            .unwrap()
            .tls_config(
                ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(root))
                    .domain_name("mesh-control.test"),
            )
            .unwrap()
            .connect_lazy()
    }

    fn write(&self, name: &str, text: &str) {
        let p = self.dir.path().join("manifests").join(name);
        // Bump the size too, so the change is noticed even within one mtime tick.
        std::fs::write(p, text).unwrap();
    }
}

struct Stream {
    tx: mpsc::Sender<DeltaDiscoveryRequest>,
    rx: tonic::Streaming<DeltaDiscoveryResponse>,
}

async fn subscribe(
    ch: Channel,
    token: &str,
    type_url: &str,
    initial: &[(String, String)],
) -> Result<Stream, tonic::Status> {
    let (tx, rx) = mpsc::channel(8);
    tx.send(DeltaDiscoveryRequest {
        type_url: type_url.into(),
        resource_names_subscribe: vec!["*".into()],
        initial_resource_versions: initial.iter().cloned().collect(),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let resp = AggregatedDiscoveryServiceClient::new(ch)
        .delta_aggregated_resources(req)
        .await?;
    Ok(Stream {
        tx,
        rx: resp.into_inner(),
    })
}

impl Stream {
    async fn next(&mut self) -> DeltaDiscoveryResponse {
        tokio::time::timeout(Duration::from_secs(10), self.rx.message())
            .await
            .expect("a response within 10 s")
            .unwrap()
            .expect("stream open")
    }

    async fn ack(&self, r: &DeltaDiscoveryResponse) {
        self.tx
            .send(DeltaDiscoveryRequest {
                type_url: r.type_url.clone(),
                response_nonce: r.nonce.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
}

/// Polls `f` every 20 ms for up to 10 s; panics naming `what` otherwise.
async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn names(r: &DeltaDiscoveryResponse) -> Vec<String> {
    let mut v: Vec<String> = r.resources.iter().map(|r| r.name.clone()).collect();
    v.sort();
    v
}

#[tokio::test]
async fn directory_edits_reach_a_subscribed_client_as_deltas() {
    let plane = start().await;
    let mut s = subscribe(plane.channel(), TOKEN_1, type_url::ADDRESS, &[])
        .await
        .unwrap();
    let first = s.next().await;
    assert_eq!(
        names(&first),
        vec![
            "Kubernetes//Pod/shop/web",
            "shop/web.shop.svc.cluster.local"
        ]
    );
    let wl = first
        .resources
        .iter()
        .find(|r| r.name.starts_with("Kubernetes"))
        .unwrap();
    assert_eq!(wl.aliases, vec!["/10.10.1.5"]);
    let addr = pb::Address::decode(wl.resource.as_ref().unwrap().value.as_slice()).unwrap();
    let Some(pb::address::Type::Workload(w)) = addr.r#type else {
        panic!()
    };
    assert_eq!(w.tunnel_protocol, pb::TunnelProtocol::Hbone as i32);
    s.ack(&first).await;

    // Add a pod: only the new workload arrives (the service's endpoints live on workloads).
    plane.write(
        "more.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: web-2, namespace: shop, labels: {app: web}}\nspec: {nodeName: node-2}\nstatus: {podIP: 10.10.2.5}\n",
    );
    let delta = s.next().await;
    assert_eq!(names(&delta), vec!["Kubernetes//Pod/shop/web-2"]);
    assert!(delta.removed_resources.is_empty());
    s.ack(&delta).await;

    // A malformed edit changes nothing. The server's own record says it read the edit
    // (every directory publish bumps the version, a rejected file too)...
    let status = || mesh_control::debug::status(&plane.running.shared);
    let v0 = status()["version"].as_u64().unwrap();
    plane.write(
        "more.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: [oops\n",
    );
    until("the malformed edit to be read", || {
        status()["version"].as_u64().unwrap() > v0
    })
    .await;
    // ...and still holds web-2: in its directory, for a new client, and the subscribed
    // client is sent no change.
    assert_eq!(status()["addresses"], 3, "{}", status());
    let mut fresh = subscribe(plane.channel(), TOKEN_1, type_url::ADDRESS, &[])
        .await
        .unwrap();
    assert_eq!(
        names(&fresh.next().await),
        vec![
            "Kubernetes//Pod/shop/web",
            "Kubernetes//Pod/shop/web-2",
            "shop/web.shop.svc.cluster.local"
        ]
    );
    if let Ok(m) = tokio::time::timeout(Duration::from_millis(300), s.rx.message()).await {
        panic!("a malformed edit sent a change: {m:?}");
    }
    // Removing the file removes the workload.
    std::fs::remove_file(plane.dir.path().join("manifests/more.yaml")).unwrap();
    let delta = s.next().await;
    assert!(delta.resources.is_empty(), "{:?}", names(&delta));
    assert_eq!(delta.removed_resources, vec!["Kubernetes//Pod/shop/web-2"]);
}

#[tokio::test]
async fn nack_is_recorded_and_reconnect_resumes_from_versions() {
    let plane = start().await;
    let mut s = subscribe(plane.channel(), TOKEN_1, type_url::ADDRESS, &[])
        .await
        .unwrap();
    let first = s.next().await;
    let held: Vec<(String, String)> = first
        .resources
        .iter()
        .map(|r| (r.name.clone(), r.version.clone()))
        .collect();
    s.tx.send(DeltaDiscoveryRequest {
        type_url: first.type_url.clone(),
        response_nonce: first.nonce.clone(),
        error_detail: Some(rpc::Status {
            code: 3,
            message: "test rejects".into(),
            details: vec![],
        }),
        ..Default::default()
    })
    .await
    .unwrap();
    until("the NACK to be recorded", || {
        mesh_control::debug::status(&plane.running.shared)["clients"][0]["nacks"] == 1
    })
    .await;
    let status = mesh_control::debug::status(&plane.running.shared);
    let c = &status["clients"][0];
    assert_eq!(c["nacks"], 1);
    assert_eq!(c["lastNack"], "test rejects");
    drop(s);

    // Reconnect claiming one resource at its current version and one that is gone.
    let mut claimed = vec![held[0].clone()];
    claimed.push(("Kubernetes//Pod/shop/gone".into(), "0".into()));
    let mut s = subscribe(plane.channel(), TOKEN_1, type_url::ADDRESS, &claimed)
        .await
        .unwrap();
    let r = s.next().await;
    assert_eq!(
        names(&r),
        vec![held[1].0.clone()],
        "the unchanged resource is not resent"
    );
    assert_eq!(r.removed_resources, vec!["Kubernetes//Pod/shop/gone"]);
}

#[tokio::test]
async fn unauthenticated_clients_are_refused() {
    let plane = start().await;
    let err = subscribe(
        plane.channel(),
        "not-a-known-token-000",
        type_url::ADDRESS,
        &[],
    )
    .await;
    let status = match err {
        Err(s) => s,
        Ok(mut s) => s.rx.message().await.unwrap_err(),
    };
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    // One fixed message whatever the reason: nothing about tokens or accounts.
    assert_eq!(status.message(), mesh_control::grpc::UNAUTHENTICATED);

    let web = SpiffeId::new("cluster.local", "shop", "web").unwrap();
    let csr = generate_csr(&web).unwrap();
    let mut ca = IstioCertificateServiceClient::new(plane.channel());
    for token in [None, Some("not-a-known-token-000")] {
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
}

#[tokio::test]
async fn node_agents_get_their_own_nodes_pods() {
    let plane = start().await;
    let mut s1 = subscribe(plane.channel(), TOKEN_1, type_url::NODE_POD, &[])
        .await
        .unwrap();
    let r = s1.next().await;
    assert_eq!(names(&r), vec!["shop/web"]);
    let decode = |r: &DeltaDiscoveryResponse| {
        cni::NodePod::decode(r.resources[0].resource.as_ref().unwrap().value.as_slice()).unwrap()
    };
    let p = decode(&r);
    assert_eq!(p.uid, "1111-aaaa");
    assert_eq!(p.ips, vec!["10.10.1.5"]);
    assert!(p.enrolled);
    s1.ack(&r).await;
    let mut s2 = subscribe(plane.channel(), TOKEN_2, type_url::NODE_POD, &[])
        .await
        .unwrap();
    assert!(s2.next().await.resources.is_empty(), "node-2 runs no pod");
    // Unlabel the namespace: node-1's pod leaves the mesh.
    plane.write(
        "mesh.yaml",
        &MESH.replace("labels: {istio.io/dataplane-mode: ambient}", "labels: {}"),
    );
    let r = s1.next().await;
    assert!(!decode(&r).enrolled);
}

#[tokio::test]
async fn ca_issues_only_identities_running_on_the_callers_node() {
    let plane = start().await;
    let mut ca = IstioCertificateServiceClient::new(plane.channel());
    let web = SpiffeId::new("cluster.local", "shop", "web").unwrap();
    let csr = generate_csr(&web).unwrap();
    let chain = ca
        .create_certificate(ca_request(&csr.csr_pem, &web, Some(TOKEN_1)))
        .await
        .unwrap()
        .into_inner()
        .cert_chain;
    let cert = WorkloadCertificate::from_ca_response(&web, &csr.key, &chain).unwrap();
    let life = cert
        .not_after()
        .duration_since(std::time::SystemTime::now())
        .unwrap();
    assert!(life <= Duration::from_secs(3600));
    // node-2 runs no pod as shop/web.
    let err = ca
        .create_certificate(ca_request(&csr.csr_pem, &web, Some(TOKEN_2)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert!(
        err.message().contains("node-2 runs no pod as"),
        "{}",
        err.message()
    );
    let err = ca
        .create_certificate(ca_request(&csr.csr_pem, &web, None))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    let err = ca
        .create_certificate(ca_request("not a csr", &web, Some(TOKEN_1)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
}

#[tokio::test]
async fn restart_keeps_the_root_and_rotation_serves_both_roots() {
    let plane = start().await;
    let state = plane.dir.path().join("state");
    let root_before = std::fs::read_to_string(state.join("root-cert.pem")).unwrap();
    // Same state dir again: the same root.
    let again = mesh_control::server::load_or_create_ca(&state, None, "cluster.local").unwrap();
    assert_eq!(again.roots_pem(), root_before);
    // Rotation: a new root signs, the old one stays trusted in the bundle.
    let old = std::fs::read_to_string(state.join("ca-cert.pem")).unwrap();
    let new = mesh_identity::ca::CertificateAuthority::new_root(
        "cluster.local",
        Duration::from_secs(86400),
    )
    .unwrap();
    std::fs::write(state.join("ca-cert.pem"), new.cert_pem()).unwrap();
    std::fs::write(state.join("ca-key.pem"), new.key_pem()).unwrap();
    std::fs::write(
        state.join("root-cert.pem"),
        format!("{}{}", new.cert_pem(), old),
    )
    .unwrap();
    let rotated = mesh_control::server::load_or_create_ca(&state, None, "cluster.local").unwrap();
    assert_eq!(rotated.roots().len(), 2);
    let id = SpiffeId::new("cluster.local", "shop", "web").unwrap();
    let csr = generate_csr(&id).unwrap();
    let chain = rotated
        .sign_csr(&csr.csr_pem, &id, Duration::from_secs(600))
        .unwrap();
    let cert = WorkloadCertificate::from_ca_response(&id, &csr.key, &chain).unwrap();
    assert_eq!(cert.roots().len(), 2, "clients receive both roots");
}

/// A key left without its certificate (a creation cut short, a partial copy) is never
/// overwritten by a new root: the start fails naming the file to delete. (A new key is
/// owner-only from its creation: mesh-identity's bootstrap tests.)
#[test]
fn a_ca_key_without_its_certificate_is_kept_and_named() {
    use std::os::unix::fs::PermissionsExt;
    let state = tempfile::tempdir().unwrap();
    let key = state.path().join("ca-key.pem");
    std::fs::write(&key, "stale").unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e =
        mesh_control::server::load_or_create_ca(state.path(), None, "cluster.local").unwrap_err();
    assert!(e.contains("ca-key.pem") && e.contains("delete"), "{e}");
    assert_eq!(std::fs::read_to_string(&key).unwrap(), "stale");
    std::fs::remove_file(&key).unwrap();
    mesh_control::server::load_or_create_ca(state.path(), None, "cluster.local").unwrap();
    let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "ca-key.pem is {mode:o}");
}

/// The root the Helm chart generates (genCAWithKey: ECDSA P-256 in SEC1 PEM, with server
/// and client EKUs on the root), used read-only from a mounted Secret.
#[test]
fn a_root_generated_by_the_helm_chart_signs_from_a_read_only_ca_dir() {
    let ca_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/testdata/helm-ca");
    let state = tempfile::tempdir().unwrap();
    let ca = mesh_control::server::load_or_create_ca(state.path(), Some(&ca_dir), "cluster.local")
        .unwrap();
    assert_eq!(
        std::fs::read_to_string(state.path().join("root-cert.pem")).unwrap(),
        ca.roots_pem()
    );
    assert!(
        !state.path().join("ca-key.pem").exists(),
        "the key is never copied"
    );
    let id = SpiffeId::new("cluster.local", "shop", "web").unwrap();
    let csr = generate_csr(&id).unwrap();
    let chain = ca
        .sign_csr(&csr.csr_pem, &id, Duration::from_secs(600))
        .unwrap();
    let cert = WorkloadCertificate::from_ca_response(&id, &csr.key, &chain).unwrap();
    assert_eq!(cert.roots().len(), 1);
    // Workloads holding such certificates complete mTLS with each other (the root's
    // EKUs do not get in the way of path validation).
    mtls_handshake(&cert, &id);

    let empty = tempfile::tempdir().unwrap();
    let Err(err) =
        mesh_control::server::load_or_create_ca(state.path(), Some(empty.path()), "cluster.local")
    else {
        panic!("an empty CA dir must be an error, not a new root");
    };
    assert!(err.contains("expected ca-cert.pem"), "{err}");
}

/// A full TLS 1.3 mutual handshake in memory between two holders of `cert`.
fn mtls_handshake(cert: &WorkloadCertificate, id: &SpiffeId) {
    use std::sync::Arc;
    let client_cfg = mesh_identity::client_config(cert, vec![id.clone()]).unwrap();
    let server_cfg = mesh_identity::server_config(cert).unwrap();
    let name = rustls::pki_types::ServerName::try_from("0.0.0.0").unwrap();
    let mut client = rustls::ClientConnection::new(Arc::new(client_cfg), name).unwrap();
    let mut server = rustls::ServerConnection::new(Arc::new(server_cfg)).unwrap();
    for _ in 0..10 {
        let mut buf = Vec::new();
        client.write_tls(&mut buf).unwrap();
        server.read_tls(&mut &buf[..]).unwrap();
        server
            .process_new_packets()
            .expect("server accepts the client");
        buf.clear();
        server.write_tls(&mut buf).unwrap();
        client.read_tls(&mut &buf[..]).unwrap();
        client
            .process_new_packets()
            .expect("client accepts the server");
        if !client.is_handshaking() && !server.is_handshaking() {
            let peer = mesh_identity::peer_identity(server.peer_certificates());
            assert_eq!(peer.as_ref(), Some(id));
            return;
        }
    }
    panic!("handshake did not complete");
}
