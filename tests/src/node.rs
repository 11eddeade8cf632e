//! Shared by the node tests (ztunnel with a real mesh-control): the two pods of
//! [`crate::cluster`] as Kubernetes manifests.

use crate::cluster::{POD_A, POD_B};

/// Namespaces front and back (ambient), pods client (front/web, node 1) and server
/// (back/api, node 2), Service back/api (10.96.0.20:80 → 8080), then `extra`.
pub fn two_pod_manifests(extra: &str) -> String {
    format!(
        r#"
apiVersion: v1
kind: Namespace
metadata: {{name: front, labels: {{istio.io/dataplane-mode: ambient}}}}
---
apiVersion: v1
kind: Namespace
metadata: {{name: back, labels: {{istio.io/dataplane-mode: ambient}}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: client, namespace: front, uid: uid-a, labels: {{app: client}}}}
spec: {{nodeName: node-1, serviceAccountName: web}}
status: {{podIP: {POD_A}, conditions: [{{type: Ready, status: "True"}}]}}
---
apiVersion: v1
kind: Pod
metadata: {{name: server, namespace: back, uid: uid-b, labels: {{app: server}}}}
spec: {{nodeName: node-2, serviceAccountName: api}}
status: {{podIP: {POD_B}, conditions: [{{type: Ready, status: "True"}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: api, namespace: back}}
spec: {{selector: {{app: server}}, clusterIP: 10.96.0.20, ports: [{{port: 80, targetPort: 8080}}]}}
{extra}
"#
    )
}
