//! Manifests the lab tests share, one YAML document each (ending in a newline); `join`
//! makes a file of them, in the order given (the lab creates pods, and so their
//! addresses, in file order).

/// Namespace `front`, enrolled in the mesh.
pub const FRONT_AMBIENT: &str = "apiVersion: v1
kind: Namespace
metadata: {name: front, labels: {istio.io/dataplane-mode: ambient}}
";

/// Namespace `back`, enrolled in the mesh.
pub const BACK_AMBIENT: &str = "apiVersion: v1
kind: Namespace
metadata: {name: back, labels: {istio.io/dataplane-mode: ambient}}
";

/// Namespace `back`, enrolled in the mesh, its traffic through the waypoint `waypoint`.
pub const BACK_USES_WAYPOINT: &str = "apiVersion: v1
kind: Namespace
metadata: {name: back, labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}}
";

/// The waypoint Gateway `back/waypoint`.
pub const WAYPOINT_GATEWAY: &str = "apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: back}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
";

/// Pod `front/client` on node-1, service account `web`, labelled `app: client`.
pub const FRONT_CLIENT: &str = "apiVersion: v1
kind: Pod
metadata: {name: client, namespace: front, labels: {app: client}}
spec: {nodeName: node-1, serviceAccountName: web, containers: [{name: client}]}
";

/// Pod `back/api` on node-2 (service account `api`, labelled `app: api`) serving HTTP
/// on 8080 and TCP echo on 9000; its Service is the test's own.
pub const BACK_API_POD_WITH_TCP_ECHO: &str = "apiVersion: v1
kind: Pod
metadata: {name: api, namespace: back, labels: {app: api}}
spec:
  nodeName: node-2
  serviceAccountName: api
  containers: [{name: api, ports: [{name: http, containerPort: 8080}, {name: tcp-echo, containerPort: 9000}]}]
";

/// Pod `ns/name` on node-2 (service account `name`, labelled `app: name`) serving HTTP
/// on 8080, and its Service `ns/name` on `cluster_ip`, port 80.
pub fn http_app(ns: &str, name: &str, cluster_ip: &str) -> String {
    format!(
        "apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: {ns}, labels: {{app: {name}}}}}
spec:
  nodeName: node-2
  serviceAccountName: {name}
  containers: [{{name: {name}, ports: [{{name: http, containerPort: 8080}}]}}]
---
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: {ns}}}
spec:
  selector: {{app: {name}}}
  clusterIP: {cluster_ip}
  ports: [{{name: http, port: 80, targetPort: http}}]
"
    )
}

/// `back/api` as an HTTP app on 10.96.0.20 (`http_app`).
pub fn back_api() -> String {
    http_app("back", "api", "10.96.0.20")
}

/// The documents as one file.
pub fn join(docs: &[&str]) -> String {
    docs.join("---\n")
}
