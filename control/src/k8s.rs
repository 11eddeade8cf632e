//! The Kubernetes objects the control plane reads, with only the fields it uses. Unknown
//! fields are ignored (real manifests carry many); wrong types are errors with a path.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub type Labels = BTreeMap<String, String>;

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub uid: Option<String>,
    #[serde(default)]
    pub labels: Labels,
    #[serde(default)]
    pub annotations: Labels,
    #[serde(default)]
    pub deletion_timestamp: Option<String>,
    #[serde(default)]
    pub owner_references: Vec<OwnerReference>,
    #[serde(default)]
    pub resource_version: Option<String>,
    #[serde(default)]
    pub creation_timestamp: Option<String>,
    /// Bumped by the API server on every spec change; status conditions name the one
    /// they describe (`observedGeneration`).
    #[serde(default)]
    pub generation: Option<i64>,
}

impl ObjectMeta {
    pub fn ns(&self) -> &str {
        self.namespace.as_deref().unwrap_or("default")
    }
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct OwnerReference {
    pub kind: String,
    pub name: String,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct Namespace {
    pub metadata: ObjectMeta,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct Node {
    pub metadata: ObjectMeta,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct ServiceAccount {
    pub metadata: ObjectMeta,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Pod {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: PodSpec,
    #[serde(default)]
    pub status: PodStatus,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PodSpec {
    #[serde(default)]
    pub node_name: Option<String>,
    #[serde(default)]
    pub service_account_name: Option<String>,
    #[serde(default)]
    pub host_network: bool,
    #[serde(default)]
    pub containers: Vec<Container>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Container {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub image: Option<String>,
    #[serde(default)]
    pub command: Vec<String>,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub ports: Vec<ContainerPort>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ContainerPort {
    #[serde(default)]
    pub name: Option<String>,
    pub container_port: u16,
    #[serde(default)]
    pub protocol: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PodStatus {
    #[serde(default)]
    pub phase: Option<String>,
    #[serde(default, rename = "podIP")]
    pub pod_ip: Option<String>,
    #[serde(default, rename = "podIPs")]
    pub pod_ips: Vec<PodIp>,
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct PodIp {
    pub ip: String,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: String,
    pub status: String,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Service {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: ServiceSpec,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSpec {
    /// `ClusterIP` (the default), `NodePort`, `LoadBalancer` or `ExternalName`.
    #[serde(default, rename = "type")]
    pub type_: Option<String>,
    #[serde(default)]
    pub selector: Option<Labels>,
    #[serde(default, rename = "clusterIP")]
    pub cluster_ip: Option<String>,
    #[serde(default, rename = "clusterIPs")]
    pub cluster_ips: Vec<String>,
    #[serde(default)]
    pub ports: Vec<ServicePort>,
    #[serde(default)]
    pub internal_traffic_policy: Option<String>,
    #[serde(default)]
    pub traffic_distribution: Option<String>,
    #[serde(default)]
    pub publish_not_ready_addresses: bool,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(untagged)]
pub enum IntOrString {
    Int(u16),
    String(String),
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    #[serde(default)]
    pub name: Option<String>,
    pub port: u16,
    #[serde(default)]
    pub target_port: Option<IntOrString>,
    #[serde(default)]
    pub protocol: Option<String>,
    #[serde(default)]
    pub app_protocol: Option<String>,
}

// ---- discovery.k8s.io/v1 ----

/// An EndpointSlice: the endpoints of a Service, the only source of them for a Service
/// without a selector (`default/kubernetes`, endpoints managed by hand or by an operator).
/// `endpoints` and `ports` are null, not empty, in a real API server's JSON when empty.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EndpointSlice {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub address_type: String,
    #[serde(default)]
    pub endpoints: Option<Vec<Endpoint>>,
    #[serde(default)]
    pub ports: Option<Vec<EndpointPort>>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    #[serde(default)]
    pub addresses: Vec<String>,
    #[serde(default)]
    pub conditions: EndpointConditions,
    #[serde(default)]
    pub target_ref: Option<ObjectReference>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct EndpointConditions {
    /// Unset means ready (the API's definition).
    #[serde(default)]
    pub ready: Option<bool>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct ObjectReference {
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub name: String,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct EndpointPort {
    /// The Service port's name ("" for a Service's single unnamed port).
    #[serde(default)]
    pub name: Option<String>,
    /// The port on the endpoint (the Service's target port, resolved).
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default)]
    pub protocol: Option<String>,
}

// ---- security.istio.io/v1 ----

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LabelSelector {
    #[serde(default)]
    pub match_labels: Labels,
}

impl LabelSelector {
    pub fn matches(&self, labels: &Labels) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
    }
}

/// An AuthorizationPolicy as read: its spec validated into the typed policy every
/// component enforces (`mesh_authz::k8s`), with what could not be understood recorded
/// where it sits (enforced fail closed) and reported with its field.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AuthorizationPolicy {
    pub metadata: ObjectMeta,
    pub policy: mesh_proto::waypoint::AuthorizationPolicy,
    pub findings: Vec<mesh_authz::k8s::Finding>,
    /// The spec names targetRefs (enforceable here or not): then it is a waypoint's
    /// policy, never ztunnel's.
    pub targeted: bool,
}

impl AuthorizationPolicy {
    /// Reads the object; never fails once its metadata is readable.
    pub fn read(metadata: ObjectMeta, spec: Option<&serde_json::Value>) -> Self {
        let (policy, findings) =
            mesh_authz::k8s::read(metadata.ns(), &metadata.name, &metadata.annotations, spec);
        let present = |k: &str| {
            spec.and_then(|s| s.get(k))
                .is_some_and(|v| !v.is_null() && v.as_array().is_none_or(|a| !a.is_empty()))
        };
        AuthorizationPolicy {
            metadata,
            policy,
            findings,
            targeted: present("targetRef") || present("targetRefs"),
        }
    }
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PeerAuthentication {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: PeerAuthenticationSpec,
    /// Set when the spec could not be read: the policy is then taken as STRICT for its
    /// whole scope (it may have asked for STRICT), and the problem reported.
    #[serde(skip)]
    pub unreadable: Option<(String, String)>,
}

impl PeerAuthentication {
    /// Reads the object; a spec that cannot be read makes it STRICT (fail closed), with
    /// the selector kept when that part is readable.
    pub fn read(metadata: ObjectMeta, spec: Option<&serde_json::Value>) -> Self {
        let spec = spec.cloned().unwrap_or(serde_json::Value::Null);
        match serde_path_to_error::deserialize::<_, Option<PeerAuthenticationSpec>>(&spec) {
            Ok(spec) => PeerAuthentication {
                metadata,
                spec: spec.unwrap_or_default(),
                unreadable: None,
            },
            Err(e) => {
                let field = format!("spec.{}", e.path()).replace("spec..", "spec");
                let selector = spec
                    .get("selector")
                    .and_then(|s| serde_json::from_value::<LabelSelector>(s.clone()).ok());
                PeerAuthentication {
                    metadata,
                    spec: PeerAuthenticationSpec {
                        selector,
                        mtls: Some(MtlsSetting {
                            mode: Some("STRICT".into()),
                        }),
                        port_level_mtls: Default::default(),
                    },
                    unreadable: Some((
                        field,
                        format!("{}; taken as STRICT for its whole scope", e.into_inner()),
                    )),
                }
            }
        }
    }
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PeerAuthenticationSpec {
    #[serde(default)]
    pub selector: Option<LabelSelector>,
    #[serde(default)]
    pub mtls: Option<MtlsSetting>,
    #[serde(default)]
    pub port_level_mtls: BTreeMap<String, MtlsSetting>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MtlsSetting {
    #[serde(default)]
    pub mode: Option<String>,
}

// ---- gateway.networking.k8s.io/v1 ----

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Gateway {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: GatewaySpec,
    #[serde(default)]
    pub status: Option<GatewayStatus>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GatewaySpec {
    #[serde(default)]
    pub gateway_class_name: String,
    #[serde(default)]
    pub listeners: Vec<GatewayListener>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GatewayListener {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub port: u16,
    #[serde(default)]
    pub protocol: String,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GatewayStatus {
    #[serde(default)]
    pub addresses: Vec<GatewayStatusAddress>,
    #[serde(default)]
    pub conditions: Vec<StatusCondition>,
}

/// A `metav1.Condition` as written in a status (Gateway API and most CRDs).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StatusCondition {
    #[serde(rename = "type")]
    pub type_: String,
    pub status: String,
    #[serde(default)]
    pub reason: String,
    #[serde(default)]
    pub message: String,
    #[serde(default)]
    pub last_transition_time: Option<String>,
    #[serde(default)]
    pub observed_generation: Option<i64>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GatewayStatusAddress {
    #[serde(default, rename = "type")]
    pub type_: Option<String>,
    pub value: String,
}

/// An HTTPRoute or GRPCRoute, its spec unread: `mesh_route::k8s` reads and validates it
/// when the index is computed (it needs the HTTPFaults its filters name).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HttpRoute {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: serde_json::Value,
}

// ---- ambient-mesh.dev/v1alpha1 ----

/// API group of the mesh's own resources.
pub const MESH_GROUP: &str = "ambient-mesh.dev";

/// Fault injection for waypoints, referenced from an HTTPRoute or GRPCRoute rule by an
/// `ExtensionRef` filter (`group: ambient-mesh.dev, kind: HTTPFault, name: ...`). The spec
/// has the shape of Istio's HTTPFaultInjection; it is read and validated by
/// `mesh_route::k8s::read_fault` (never refused here: a route naming an invalid fault
/// answers 500, and the fault's problems are reported with their fields).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HttpFault {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: serde_json::Value,
}
