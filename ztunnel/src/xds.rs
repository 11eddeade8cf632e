//! Delta ADS client: subscribes to Address and Authorization, applies each resource
//! through the same validation as local config, ACKs or NACKs (with reasons), keeps the
//! last-known state across disconnects and resumes with `initial_resource_versions`.

use crate::proxy::ConnTracker;
use crate::state::State;
use mesh_proto::discovery::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse,
    aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
};
use mesh_proto::prost::Message;
use mesh_proto::{envoy_core, rpc, security, type_url, workload};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

const MIN_BACKOFF: Duration = Duration::from_millis(10);
const MAX_BACKOFF: Duration = Duration::from_secs(15);
const TYPES: [&str; 2] = [type_url::ADDRESS, type_url::AUTHORIZATION];

/// How to reach and authenticate to the control plane.
#[derive(Clone, Debug)]
pub struct ControlPlane {
    pub address: String,
    pub root_pem: String,
    pub hostname: Option<String>,
    pub token_file: Option<PathBuf>,
    pub cluster_id: String,
}

impl ControlPlane {
    /// A lazily connecting gRPC channel over TLS verified against the root.
    pub fn channel(&self, address: &str) -> Result<Channel, String> {
        let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&self.root_pem));
        if let Some(h) = &self.hostname {
            tls = tls.domain_name(h.clone());
        }
        let ep = Endpoint::from_shared(address.to_string())
            .map_err(|e| format!("control plane address {address:?}: {e}"))?
            .tls_config(tls)
            .map_err(|e| format!("TLS for {address}: {e}"))?
            .connect_timeout(Duration::from_secs(10))
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(20));
        Ok(ep.connect_lazy())
    }

    fn authorize<T>(&self, req: &mut tonic::Request<T>) -> Result<(), String> {
        if let Some(path) = &self.token_file {
            let token = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read token {}: {e}", path.display()))?;
            let v = format!("Bearer {}", token.trim())
                .parse()
                .map_err(|_| "token is not a valid header value".to_string())?;
            req.metadata_mut().insert("authorization", v);
        }
        if let Ok(v) = self.cluster_id.parse() {
            req.metadata_mut().insert("clusterid", v);
        }
        Ok(())
    }
}

/// Who we are to the control plane.
#[derive(Clone, Debug)]
pub struct NodeIdentity {
    pub node_name: String,
    pub pod_name: String,
    pub pod_namespace: String,
    pub instance_ip: String,
}

impl NodeIdentity {
    fn to_node(&self) -> envoy_core::Node {
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

/// Applies one response to the state; returns the NACK reasons (empty: ACK).
pub fn apply_response(
    state: &mut State,
    versions: &mut HashMap<String, String>,
    resp: &DeltaDiscoveryResponse,
) -> Vec<String> {
    let mut errors = Vec::new();
    for res in &resp.resources {
        let Some(any) = &res.resource else {
            errors.push(format!("{}: resource body missing", res.name));
            continue;
        };
        let applied = match resp.type_url.as_str() {
            type_url::ADDRESS => workload::Address::decode(any.value.as_slice())
                .map_err(|e| format!("{}: cannot decode Address: {e}", res.name))
                .and_then(|a| {
                    state
                        .apply_address(&a)
                        .map_err(|e| format!("{}: {e}", res.name))
                }),
            type_url::AUTHORIZATION => security::Authorization::decode(any.value.as_slice())
                .map_err(|e| format!("{}: cannot decode Authorization: {e}", res.name))
                .and_then(|a| {
                    state
                        .apply_authorization(&a)
                        .map_err(|e| format!("{}: {e}", res.name))
                }),
            other => Err(format!("unexpected type {other}")),
        };
        match applied {
            Ok(()) => {
                versions.insert(res.name.clone(), res.version.clone());
            }
            Err(e) => errors.push(e),
        }
    }
    for name in &resp.removed_resources {
        match resp.type_url.as_str() {
            type_url::ADDRESS => {
                state.remove_address(name);
            }
            type_url::AUTHORIZATION => {
                state.remove_policy(name);
            }
            _ => {}
        }
        versions.remove(name);
    }
    errors
}

fn request(type_url: &str) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        type_url: type_url.to_string(),
        ..Default::default()
    }
}

/// Runs forever: connect, subscribe, apply, ACK/NACK; reconnect with jittered backoff.
pub async fn run(
    cp: ControlPlane,
    node: NodeIdentity,
    state: Arc<RwLock<State>>,
    tracker: Arc<ConnTracker>,
    progress: Arc<XdsProgress>,
    metrics: Arc<crate::metrics::Metrics>,
) {
    let channel = match cp.channel(&cp.address) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "xDS disabled: invalid control plane settings");
            return;
        }
    };
    // name → version per type, kept across reconnects.
    let mut versions: HashMap<&'static str, HashMap<String, String>> =
        TYPES.iter().map(|t| (*t, HashMap::new())).collect();
    let mut backoff = MIN_BACKOFF;
    loop {
        match session(
            &cp,
            &node,
            channel.clone(),
            &state,
            &tracker,
            &progress,
            &mut versions,
            &mut backoff,
        )
        .await
        {
            Ok(()) => tracing::warn!("xDS stream closed by the control plane"),
            Err(e) => {
                tracing::warn!(error = %e, "xDS stream failed; keeping the last known configuration")
            }
        }
        progress.connected.store(false, Ordering::Relaxed);
        metrics.xds_connection_terminations.inc();
        let jitter = rand::random::<f64>() * 0.5 + 0.75;
        tokio::time::sleep(backoff.mul_f64(jitter)).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

#[allow(clippy::too_many_arguments)]
async fn session(
    cp: &ControlPlane,
    node: &NodeIdentity,
    channel: Channel,
    state: &Arc<RwLock<State>>,
    tracker: &Arc<ConnTracker>,
    progress: &Arc<XdsProgress>,
    versions: &mut HashMap<&'static str, HashMap<String, String>>,
    backoff: &mut Duration,
) -> Result<(), String> {
    let (tx, rx) = tokio::sync::mpsc::channel::<DeltaDiscoveryRequest>(16);
    for (i, t) in TYPES.iter().enumerate() {
        let mut r = request(t);
        if i == 0 {
            r.node = Some(node.to_node());
        }
        r.resource_names_subscribe = vec!["*".into()];
        r.initial_resource_versions = versions[t].clone();
        tx.send(r).await.map_err(|_| "request channel closed")?;
    }
    let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    cp.authorize(&mut req)?;
    let mut client =
        AggregatedDiscoveryServiceClient::new(channel).max_decoding_message_size(200 * 1024 * 1024);
    let mut stream = client
        .delta_aggregated_resources(req)
        .await
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
        .into_inner();
    progress.connected.store(true, Ordering::Relaxed);
    tracing::info!(address = %cp.address, "xDS connected");
    while let Some(resp) = stream
        .message()
        .await
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
    {
        *backoff = MIN_BACKOFF;
        let Some((type_key, held)) = versions.iter_mut().find(|(k, _)| **k == resp.type_url) else {
            let mut nack = request(&resp.type_url);
            nack.response_nonce = resp.nonce.clone();
            nack.error_detail = Some(rpc::Status {
                code: tonic::Code::InvalidArgument as i32,
                message: format!("type {} was not subscribed", resp.type_url),
                details: vec![],
            });
            tx.send(nack).await.map_err(|_| "request channel closed")?;
            continue;
        };
        let errors = {
            let mut st = state.write().expect("state lock");
            let errors = apply_response(&mut st, held, &resp);
            let closed = tracker.recheck(&st);
            if closed > 0 {
                tracing::info!(closed, "policy update closed open connections");
            }
            errors
        };
        let mut ack = request(type_key);
        ack.response_nonce = resp.nonce.clone();
        if errors.is_empty() {
            tracing::debug!(type_url = %resp.type_url, resources = resp.resources.len(),
                removed = resp.removed_resources.len(), "xDS update applied");
        } else {
            let message = errors.join("; ");
            tracing::warn!(type_url = %resp.type_url, %message, "NACK: rejected invalid resources");
            ack.error_detail = Some(rpc::Status {
                code: tonic::Code::InvalidArgument as i32,
                message,
                details: vec![],
            });
        }
        match *type_key {
            type_url::ADDRESS => progress.address_synced.store(true, Ordering::Relaxed),
            _ => progress.authorization_synced.store(true, Ordering::Relaxed),
        }
        tx.send(ack).await.map_err(|_| "request channel closed")?;
    }
    Ok(())
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
        let mut versions = HashMap::new();
        let resp = DeltaDiscoveryResponse {
            type_url: type_url::ADDRESS.into(),
            nonce: "1".into(),
            resources: vec![address_resource("good", vec![10, 0, 0, 1])],
            ..Default::default()
        };
        assert!(apply_response(&mut st, &mut versions, &resp).is_empty());
        let resp = DeltaDiscoveryResponse {
            type_url: type_url::ADDRESS.into(),
            nonce: "2".into(),
            resources: vec![
                address_resource("bad", vec![1, 2, 3]),
                address_resource("good2", vec![10, 0, 0, 2]),
            ],
            ..Default::default()
        };
        let errors = apply_response(&mut st, &mut versions, &resp);
        assert_eq!(errors.len(), 1);
        assert!(
            errors[0].contains("bad") && errors[0].contains("3 bytes"),
            "{errors:?}"
        );
        assert!(st.workload("good").is_some());
        assert!(st.workload("good2").is_some());
        assert!(st.workload("bad").is_none());
        assert_eq!(versions.len(), 2, "only applied resources are remembered");
        let resp = DeltaDiscoveryResponse {
            type_url: type_url::ADDRESS.into(),
            nonce: "3".into(),
            removed_resources: vec!["good".into()],
            ..Default::default()
        };
        assert!(apply_response(&mut st, &mut versions, &resp).is_empty());
        assert!(st.workload("good").is_none());
        assert!(!versions.contains_key("good"));
    }
}
