//! Routes are validated by mesh-control when it reads them: what cannot be understood in
//! an HTTPRoute, GRPCRoute or HTTPFault is shown by `meshctl status` with its object and
//! field (the real binary against the real debug API of a control plane in process).

use mesh_control::server::{self, ServerConfig};
use std::time::Duration;

const MESH: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: shop}
spec: {clusterIP: 10.96.0.20, ports: [{port: 80}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: bad, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: api}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /ok}}]
    backendRefs: [{name: api, port: 80}]
  - matches: [{path: {type: RegularExpression, value: "/items/(["}}]
    backendRefs: [{name: api, port: 80}]
  - filters: [{type: ExtensionRef, extensionRef: {group: ambient-mesh.dev, kind: HTTPFault, name: missing}}]
    backendRefs: [{name: api, port: 80}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: cart, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: api}]
  rules: [{matches: [{method: {type: Prefix, service: shop.v1.Cart}}]}]
"#;

/// `meshctl --control ADDR status`: stdout.
async fn meshctl_status(debug: std::net::SocketAddr) -> String {
    tokio::task::spawn_blocking(move || {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_meshctl"))
            .args(["--control", &debug.to_string(), "status"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn a_bad_route_shows_its_findings_in_meshctl_status() {
    let dir = tempfile::tempdir().unwrap();
    let manifests = dir.path().join("manifests");
    std::fs::create_dir_all(&manifests).unwrap();
    std::fs::write(manifests.join("mesh.yaml"), MESH).unwrap();
    let tokens = dir.path().join("tokens.yaml");
    std::fs::write(
        &tokens,
        "tokens:\n- {token: node-one-token-0123456789, node: node-1}\n",
    )
    .unwrap();
    let running = server::start(ServerConfig {
        source: server::ConfigSource::Directory(manifests),
        state_dir: dir.path().join("state"),
        ca_dir: None,
        tokens: Some(tokens),
        token_audiences: vec!["istio-ca".into()],
        node_proxy_accounts: vec![],
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
    })
    .await
    .unwrap();
    let want = [
        "error       HTTPRoute shop/bad: spec.rules[1].matches[0].path.value: \"/items/([\" is not a valid regular expression",
        "error       HTTPRoute shop/bad: spec.rules[2].filters[0].extensionRef.name: HTTPFault shop/missing does not exist; the rule's requests get 500",
        "unsupported GRPCRoute shop/cart: spec.rules[0].matches[0].method.type: \"Prefix\" is not Exact or RegularExpression",
    ];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let out = loop {
        let out = meshctl_status(running.debug_addr).await;
        if out.contains("ROUTE FINDINGS") || tokio::time::Instant::now() > deadline {
            break out;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let section = out
        .split("ROUTE FINDINGS")
        .nth(1)
        .unwrap_or_else(|| panic!("no route findings: {out}"));
    for w in want {
        assert!(section.contains(w), "missing {w:?} in:\n{out}");
    }
    assert!(
        !section.contains("HTTPRoute shop/bad: spec.rules[0]"),
        "the valid rule has no finding:\n{out}"
    );
}
