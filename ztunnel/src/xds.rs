//! Delta ADS client: subscribes to Address and Authorization, applies each resource
//! through the same validation as local config, ACKs or NACKs (with reasons), keeps the
//! last-known state across disconnects and resumes with `initial_resource_versions`.

use crate::state::State;
use crate::updates::StateChanged;
use mesh_proto::discovery::DeltaDiscoveryResponse;
use mesh_proto::prost::Message;
use mesh_proto::{envoy_core, security, type_url, workload};
use mesh_xds::Registry;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, RwLock};

pub use mesh_xds::ControlPlane;

/// Who we are to the control plane.
#[derive(Clone, Debug)]
pub struct NodeIdentity {
    pub node_name: String,
    pub pod_name: String,
    pub pod_namespace: String,
    pub instance_ip: String,
}

impl NodeIdentity {
    pub fn to_node(&self) -> envoy_core::Node {
        use prost_types::{Struct, Value, value::Kind};
        let s = |v: &str| Value {
            kind: Some(Kind::StringValue(v.to_string())),
        };
        envoy_core::Node {
            id: format!(
                "ztunnel~{}~{}.{}~{}.svc.cluster.local",
                self.instance_ip, self.pod_name, self.pod_namespace, self.pod_namespace
            ),
            cluster: String::new(),
            metadata: Some(Struct {
                fields: [
                    ("NAME".to_string(), s(&self.pod_name)),
                    ("NAMESPACE".to_string(), s(&self.pod_namespace)),
                    ("NODE_NAME".to_string(), s(&self.node_name)),
                    ("INSTANCE_IPS".to_string(), s(&self.instance_ip)),
                ]
                .into(),
            }),
            locality: None,
            user_agent_name: "ztunnel".into(),
        }
    }
}

/// Readiness: both types have been received at least once.
#[derive(Default, Debug)]
pub struct XdsProgress {
    pub address_synced: AtomicBool,
    pub authorization_synced: AtomicBool,
    pub connected: AtomicBool,
}

impl XdsProgress {
    pub fn synced(&self) -> bool {
        self.address_synced.load(Ordering::Relaxed)
            && self.authorization_synced.load(Ordering::Relaxed)
    }
}

/// The types ztunnel subscribes to, and how each is applied to the state.
static REGISTRY: LazyLock<Registry<State>> = LazyLock::new(|| {
    Registry::new()
        .with(type_url::ADDRESS, apply_address, |st, name| {
            st.remove_address(name);
        })
        .with_fail_closed(
            type_url::AUTHORIZATION,
            apply_authorization,
            |st, name| {
                st.remove_policy(name);
            },
            |st, name| deny_unreadable(st, name, "Authorization without a body".into()),
        )
});

fn apply_address(state: &mut State, _name: &str, body: &[u8]) -> Result<(), String> {
    let a = workload::Address::decode(body).map_err(|e| format!("cannot decode Address: {e}"))?;
    state.apply_address(&a).map_err(|e| e.to_string())
}

fn apply_authorization(state: &mut State, name: &str, body: &[u8]) -> Result<(), String> {
    match security::Authorization::decode(body) {
        Ok(a) => state.apply_authorization(&a).map_err(|e| e.to_string()),
        Err(e) => Err(deny_unreadable(
            state,
            name,
            format!("cannot decode Authorization: {e}"),
        )),
    }
}

/// Nothing of the policy can be read but its name (undecodable, or no body): it denies
/// everything in its namespace until a readable version arrives (a NACK never widens
/// access). Returns the NACK's reason.
fn deny_unreadable(state: &mut State, name: &str, why: String) -> String {
    let (ns, name) = name.split_once('/').unwrap_or(("", name));
    state.insert_policy(mesh_authz::Policy::fail_closed(
        ns,
        name,
        mesh_authz::PolicyScope::Namespace,
        mesh_authz::Action::Deny,
        false,
        why.clone(),
    ));
    format!("{why} (denying everything in namespace {ns:?} until it can be read)")
}

/// Applies one response to the state; returns the rejected resources and why.
pub fn apply_response(state: &mut State, resp: &DeltaDiscoveryResponse) -> Vec<(String, String)> {
    REGISTRY.apply(state, resp)
}

struct Apply {
    state: Arc<RwLock<State>>,
    changed: StateChanged,
    progress: Arc<XdsProgress>,
    metrics: Arc<crate::metrics::Metrics>,
}

impl mesh_xds::Handler for Apply {
    fn apply(&mut self, resp: &DeltaDiscoveryResponse) -> Vec<(String, String)> {
        // Only subscribed types get here (the client refuses others): bounded labels.
        self.metrics.xds_message(&resp.type_url);
        let mut st = self.state.write().expect("state lock");
        let errors = apply_response(&mut st, resp);
        drop(st);
        // Wakes the connection tracker's re-check too (see `proxy::tracker`).
        self.changed.notify();
        match resp.type_url.as_str() {
            type_url::ADDRESS => self.progress.address_synced.store(true, Ordering::Relaxed),
            type_url::AUTHORIZATION => self
                .progress
                .authorization_synced
                .store(true, Ordering::Relaxed),
            _ => {}
        }
        errors
    }

    fn connection(&mut self, up: bool) {
        self.progress.connected.store(up, Ordering::Relaxed);
    }

    fn ended(&mut self, why: mesh_xds::Termination) {
        self.metrics.xds_terminated(why.as_str());
    }
}

/// Runs the xDS client for Address and Authorization until the process ends.
pub async fn run(
    cp: ControlPlane,
    node: NodeIdentity,
    state: Arc<RwLock<State>>,
    changed: StateChanged,
    progress: Arc<XdsProgress>,
    metrics: Arc<crate::metrics::Metrics>,
) {
    let handler = Apply {
        state,
        changed,
        progress,
        metrics,
    };
    mesh_xds::run(cp, node.to_node(), REGISTRY.types(), handler).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_proto::discovery::Resource;

    fn address_resource(name: &str, addr: Vec<u8>) -> Resource {
        let w = workload::Address {
            r#type: Some(workload::address::Type::Workload(workload::Workload {
                uid: name.into(),
                name: "p".into(),
                namespace: "ns".into(),
                addresses: vec![addr],
                ..Default::default()
            })),
        };
        Resource {
            name: name.into(),
            version: "v1".into(),
            resource: Some(prost_types::Any {
                type_url: type_url::ADDRESS.into(),
                value: w.encode_to_vec(),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn invalid_resources_are_nacked_and_do_not_disturb_valid_state() {
        let mut st = State::default();
        let resp = DeltaDiscoveryResponse {
            type_url: type_url::ADDRESS.into(),
            nonce: "1".into(),
            resources: vec![address_resource("good", vec![10, 0, 0, 1])],
            ..Default::default()
        };
        assert!(apply_response(&mut st, &resp).is_empty());
        let resp = DeltaDiscoveryResponse {
            type_url: type_url::ADDRESS.into(),
            nonce: "2".into(),
            resources: vec![
                address_resource("bad", vec![1, 2, 3]),
                address_resource("good2", vec![10, 0, 0, 2]),
            ],
            ..Default::default()
        };
        let errors = apply_response(&mut st, &resp);
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].0, "bad");
        assert!(errors[0].1.contains("3 bytes"), "{errors:?}");
        assert!(st.workload("good").is_some());
        assert!(st.workload("good2").is_some());
        assert!(st.workload("bad").is_none());
        let resp = DeltaDiscoveryResponse {
            type_url: type_url::ADDRESS.into(),
            nonce: "3".into(),
            removed_resources: vec!["good".into()],
            ..Default::default()
        };
        assert!(apply_response(&mut st, &resp).is_empty());
        assert!(st.workload("good").is_none());
    }

    /// Applies `ns/allow-front` with `resource` as its body; whether it was NACKed and
    /// a connection into namespace `ns` is then allowed.
    fn authorization_outcome(resource: Option<prost_types::Any>) -> (Vec<(String, String)>, bool) {
        let mut st = State::default();
        let resp = DeltaDiscoveryResponse {
            type_url: type_url::AUTHORIZATION.into(),
            nonce: "1".into(),
            resources: vec![Resource {
                name: "ns/allow-front".into(),
                version: "v1".into(),
                resource,
                ..Default::default()
            }],
            ..Default::default()
        };
        let errors = apply_response(&mut st, &resp);
        let w = mesh_discovery::Workload::from_proto(&workload::Workload {
            uid: "u".into(),
            name: "p".into(),
            namespace: "ns".into(),
            addresses: vec![vec![10, 0, 0, 1]],
            ..Default::default()
        })
        .unwrap();
        let conn = mesh_authz::ConnectionInfo {
            src_identity: None,
            src_ip: [10, 0, 0, 2].into(),
            dst_ip: [10, 0, 0, 1].into(),
            dst_port: 80,
        };
        (errors, st.authorize(&w, &conn).is_allowed())
    }

    /// An Authorization that cannot even be decoded is NACKed and denies everything in
    /// its namespace meanwhile; before, it was simply absent (an ALLOW: everyone allowed).
    #[test]
    fn an_undecodable_authorization_is_nacked_and_fails_closed() {
        let (errors, allowed) = authorization_outcome(Some(prost_types::Any {
            type_url: type_url::AUTHORIZATION.into(),
            value: vec![0x0a, 0x05, b'x'],
        }));
        assert_eq!(errors.len(), 1, "NACKed");
        assert!(!allowed);
    }

    /// One sent without a body likewise: NACKed and denying, not skipped.
    #[test]
    fn an_authorization_without_a_body_is_nacked_and_fails_closed() {
        let (errors, allowed) = authorization_outcome(None);
        assert_eq!(errors.len(), 1, "NACKed");
        assert!(errors[0].1.contains("without a body"), "{errors:?}");
        assert!(!allowed);
    }
}
