//! Manifests: multi-document YAML files of Kubernetes objects. Each problem is reported
//! with the file, the document's index and the field path.

use crate::k8s::*;
use serde::de::DeserializeOwned;
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Everything the control plane observes, keyed by (namespace, name) (namespace "" for
/// cluster-scoped kinds).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Objects {
    pub namespaces: BTreeMap<String, Namespace>,
    pub nodes: BTreeMap<String, Node>,
    /// The numerous kinds are shared: a snapshot of 10,000 pods copies pointers, and a
    /// changed pod is one new allocation.
    pub pods: BTreeMap<(String, String), Arc<Pod>>,
    pub services: BTreeMap<(String, String), Arc<Service>>,
    pub endpoint_slices: BTreeMap<(String, String), Arc<EndpointSlice>>,
    pub service_accounts: BTreeMap<(String, String), ServiceAccount>,
    pub authorization_policies: BTreeMap<(String, String), AuthorizationPolicy>,
    pub peer_authentications: BTreeMap<(String, String), PeerAuthentication>,
    pub gateways: BTreeMap<(String, String), Gateway>,
    pub http_routes: BTreeMap<(String, String), HttpRoute>,
    /// GRPCRoutes, their specs unread like HTTPRoutes'.
    pub grpc_routes: BTreeMap<(String, String), HttpRoute>,
    pub http_faults: BTreeMap<(String, String), crate::k8s::HttpFault>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManifestError {
    pub file: PathBuf,
    /// 0-based index of the YAML document in the file, when known.
    pub document: Option<usize>,
    /// Field path, e.g. `spec.ports[0].port`.
    pub path: Option<String>,
    pub message: String,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(d) = self.document {
            write!(f, " (document {d})")?;
        }
        if let Some(p) = &self.path {
            write!(f, " at {p}")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ManifestError {}

fn typed<T: DeserializeOwned>(
    file: &Path,
    doc: usize,
    value: serde_json::Value,
) -> Result<T, ManifestError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        ManifestError {
            file: file.to_path_buf(),
            document: Some(doc),
            path: (path != ".").then_some(path),
            message: e.into_inner().to_string(),
        }
    })
}

impl Objects {
    /// Adds `other`'s objects (later files win on a name clash).
    pub fn merge(&mut self, other: &Objects) {
        self.namespaces.extend(other.namespaces.clone());
        self.nodes.extend(other.nodes.clone());
        self.pods.extend(other.pods.clone());
        self.services.extend(other.services.clone());
        self.endpoint_slices.extend(other.endpoint_slices.clone());
        self.service_accounts.extend(other.service_accounts.clone());
        self.authorization_policies
            .extend(other.authorization_policies.clone());
        self.peer_authentications
            .extend(other.peer_authentications.clone());
        self.gateways.extend(other.gateways.clone());
        self.http_routes.extend(other.http_routes.clone());
        self.grpc_routes.extend(other.grpc_routes.clone());
        self.http_faults.extend(other.http_faults.clone());
    }

    /// Moves `other`'s objects in (its win on a name clash): cheap when `other` is small.
    pub fn absorb(&mut self, other: Objects) {
        self.namespaces.extend(other.namespaces);
        self.nodes.extend(other.nodes);
        self.pods.extend(other.pods);
        self.services.extend(other.services);
        self.endpoint_slices.extend(other.endpoint_slices);
        self.service_accounts.extend(other.service_accounts);
        self.authorization_policies
            .extend(other.authorization_policies);
        self.peer_authentications.extend(other.peer_authentications);
        self.gateways.extend(other.gateways);
        self.http_routes.extend(other.http_routes);
        self.grpc_routes.extend(other.grpc_routes);
        self.http_faults.extend(other.http_faults);
    }

    /// Removes the object `kind` `namespace/name` (cluster-scoped kinds by name alone).
    pub fn remove(&mut self, kind: &str, namespace: &str, name: &str) {
        let ns = if namespace.is_empty() {
            "default"
        } else {
            namespace
        };
        let key = (ns.to_string(), name.to_string());
        match kind {
            "Namespace" => drop(self.namespaces.remove(name)),
            "Node" => drop(self.nodes.remove(name)),
            "Pod" => drop(self.pods.remove(&key)),
            "Service" => drop(self.services.remove(&key)),
            "EndpointSlice" => drop(self.endpoint_slices.remove(&key)),
            "ServiceAccount" => drop(self.service_accounts.remove(&key)),
            "AuthorizationPolicy" => drop(self.authorization_policies.remove(&key)),
            "PeerAuthentication" => drop(self.peer_authentications.remove(&key)),
            "Gateway" => drop(self.gateways.remove(&key)),
            "HTTPRoute" => drop(self.http_routes.remove(&key)),
            "GRPCRoute" => drop(self.grpc_routes.remove(&key)),
            "HTTPFault" => drop(self.http_faults.remove(&key)),
            _ => {}
        }
    }

    /// Replaces every object of `kind` by `from`'s (a re-list of that kind).
    pub fn replace_kind(&mut self, kind: &str, from: Objects) {
        match kind {
            "Namespace" => self.namespaces = from.namespaces,
            "Node" => self.nodes = from.nodes,
            "Pod" => self.pods = from.pods,
            "Service" => self.services = from.services,
            "EndpointSlice" => self.endpoint_slices = from.endpoint_slices,
            "ServiceAccount" => self.service_accounts = from.service_accounts,
            "AuthorizationPolicy" => self.authorization_policies = from.authorization_policies,
            "PeerAuthentication" => self.peer_authentications = from.peer_authentications,
            "Gateway" => self.gateways = from.gateways,
            "HTTPRoute" => self.http_routes = from.http_routes,
            "GRPCRoute" => self.grpc_routes = from.grpc_routes,
            "HTTPFault" => self.http_faults = from.http_faults,
            _ => {}
        }
    }

    /// Parses one file's text and adds its objects. On any error nothing from this file
    /// is added.
    pub fn add_file(&mut self, file: &Path, text: &str) -> Result<usize, ManifestError> {
        let docs: Vec<serde_json::Value> =
            serde_saphyr::from_multiple(text).map_err(|e| ManifestError {
                file: file.to_path_buf(),
                document: None,
                path: None,
                message: format!("not valid YAML: {e}"),
            })?;
        let mut staged = self.clone();
        let mut count = 0;
        for (i, doc) in docs.into_iter().enumerate() {
            if doc.is_null() {
                continue; // empty document (e.g. a trailing ---)
            }
            staged.add_document(file, i, doc)?;
            count += 1;
        }
        *self = staged;
        Ok(count)
    }

    /// Adds one object (a document of `file`, or an object from the Kubernetes API).
    pub fn add_document(
        &mut self,
        file: &Path,
        i: usize,
        doc: serde_json::Value,
    ) -> Result<(), ManifestError> {
        let err = |path: &str, message: String| ManifestError {
            file: file.to_path_buf(),
            document: Some(i),
            path: Some(path.to_string()),
            message,
        };
        let kind = doc
            .get("kind")
            .and_then(|k| k.as_str())
            .ok_or_else(|| err("kind", "missing or not a string".into()))?
            .to_string();
        let api_version = doc
            .get("apiVersion")
            .and_then(|k| k.as_str())
            .ok_or_else(|| err("apiVersion", "missing or not a string".into()))?
            .to_string();
        if kind == "List" {
            return Err(err(
                "kind",
                "List is not supported: write one document per object".into(),
            ));
        }
        let name = doc
            .pointer("/metadata/name")
            .and_then(|n| n.as_str())
            .filter(|n| !n.is_empty())
            .ok_or_else(|| err("metadata.name", "missing".into()))?
            .to_string();
        let ns = doc
            .pointer("/metadata/namespace")
            .and_then(|n| n.as_str())
            .unwrap_or("default")
            .to_string();
        let key = (ns, name.clone());
        let group = api_version.rsplit_once('/').map(|(g, _)| g).unwrap_or("");
        match (group, kind.as_str()) {
            ("", "Namespace") => {
                self.namespaces.insert(name, typed(file, i, doc)?);
            }
            ("", "Node") => {
                self.nodes.insert(name, typed(file, i, doc)?);
            }
            ("", "Pod") => {
                self.pods.insert(key, Arc::new(typed(file, i, doc)?));
            }
            ("", "Service") => {
                self.services.insert(key, Arc::new(typed(file, i, doc)?));
            }
            ("discovery.k8s.io", "EndpointSlice") => {
                self.endpoint_slices
                    .insert(key, Arc::new(typed(file, i, doc)?));
            }
            ("", "ServiceAccount") => {
                self.service_accounts.insert(key, typed(file, i, doc)?);
            }
            ("security.istio.io", "AuthorizationPolicy") => {
                // Never refused for its spec: a policy left out would widen access. What
                // cannot be understood is enforced fail closed and reported (index).
                let metadata: ObjectMeta =
                    typed(file, i, doc.get("metadata").cloned().unwrap_or_default()).map_err(
                        |mut e| {
                            e.path = Some(format!("metadata.{}", e.path.unwrap_or_default()));
                            e
                        },
                    )?;
                let policy = AuthorizationPolicy::read(metadata, doc.get("spec"));
                self.authorization_policies.insert(key, policy);
            }
            ("security.istio.io", "PeerAuthentication") => {
                // Like an AuthorizationPolicy, never refused for its spec: left out, a
                // STRICT one would let plaintext in.
                let metadata: ObjectMeta =
                    typed(file, i, doc.get("metadata").cloned().unwrap_or_default())?;
                self.peer_authentications
                    .insert(key, PeerAuthentication::read(metadata, doc.get("spec")));
            }
            ("gateway.networking.k8s.io", "Gateway") => {
                self.gateways.insert(key, typed(file, i, doc)?);
            }
            ("gateway.networking.k8s.io", "HTTPRoute") => {
                self.http_routes.insert(key, typed(file, i, doc)?);
            }
            // Routes and faults are never refused for their spec: what cannot be
            // understood fails closed where it sits and is reported (index).
            (crate::k8s::MESH_GROUP, "HTTPFault") => {
                self.http_faults.insert(key, typed(file, i, doc)?);
            }
            ("gateway.networking.k8s.io", "GRPCRoute") => {
                self.grpc_routes.insert(key, typed(file, i, doc)?);
            }
            _ => {
                return Err(err(
                    "kind",
                    format!("{api_version} {kind} is not a kind the control plane reads"),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) const GOOD: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: shop
  labels: {istio.io/dataplane-mode: ambient}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop, labels: {app: web}}
spec:
  nodeName: node-1
  serviceAccountName: web
  containers: [{name: web, ports: [{name: http, containerPort: 8080}]}]
status:
  podIP: 10.10.1.5
  conditions: [{type: Ready, status: "True"}]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  selector: {app: web}
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80, targetPort: http}]
---
"#;

    #[test]
    fn parses_multi_document_files() {
        let mut o = Objects::default();
        assert_eq!(o.add_file(Path::new("a.yaml"), GOOD).unwrap(), 3);
        assert!(o.namespaces.contains_key("shop"));
        let pod = &o.pods[&("shop".into(), "web-1".into())];
        assert_eq!(pod.spec.node_name.as_deref(), Some("node-1"));
        assert_eq!(pod.status.pod_ip.as_deref(), Some("10.10.1.5"));
        let svc = &o.services[&("shop".into(), "web".into())];
        assert_eq!(
            svc.spec.ports[0].target_port,
            Some(IntOrString::String("http".into()))
        );
    }

    #[test]
    fn errors_name_file_document_and_field() {
        let bad = "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec:\n  ports: [{port: notanumber}]\n";
        let mut o = Objects::default();
        let e = o.add_file(Path::new("bad.yaml"), bad).unwrap_err();
        assert_eq!(e.document, Some(1));
        assert_eq!(e.path.as_deref(), Some("spec.ports[0].port"));
        assert!(
            e.to_string()
                .starts_with("bad.yaml (document 1) at spec.ports[0].port:"),
            "{e}"
        );
        assert!(
            o.namespaces.is_empty(),
            "nothing from a bad file is applied"
        );

        let e = o
            .add_file(
                Path::new("k.yaml"),
                "apiVersion: v1\nkind: Secret\nmetadata: {name: x}\n",
            )
            .unwrap_err();
        assert!(e.message.contains("not a kind"), "{e}");
        let e = o.add_file(Path::new("y.yaml"), "a: [unclosed").unwrap_err();
        assert!(e.message.contains("not valid YAML"), "{e}");
        let e = o
            .add_file(
                Path::new("n.yaml"),
                "apiVersion: v1\nkind: Pod\nmetadata: {}\n",
            )
            .unwrap_err();
        assert_eq!(e.path.as_deref(), Some("metadata.name"));
        // A policy is never refused for its spec (left out, an ALLOW would widen
        // access): the typo is named with its field, and enforced fail closed.
        o.add_file(
            Path::new("p.yaml"),
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec:\n  rules: [{form: []}]\n",
        )
        .unwrap();
        let p = &o.authorization_policies[&("default".into(), "p".into())];
        assert_eq!(
            p.findings[0].field, "spec.rules[0].form",
            "{:?}",
            p.findings
        );
        assert!(p.findings[0].message.contains("unknown field"));
    }
}
