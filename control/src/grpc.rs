//! The gRPC services: delta ADS and Istio's certificate service, both authenticated by
//! bearer token; the CA also authorizes by node (a node may only obtain identities its
//! own pods run as).

use crate::ads::{RequestKind, Session};
use crate::auth::{AuthError, Principal, Tokens, bearer};
use crate::generation::Generation;
use crate::token_review::{ReviewError, TokenReviewer};
use mesh_identity::SpiffeId;
use mesh_identity::ca::{CertificateAuthority, csr_identity};
use mesh_proto::ca::istio_certificate_service_server::IstioCertificateService;
use mesh_proto::ca::{IstioCertificateRequest, IstioCertificateResponse};
use mesh_proto::discovery::aggregated_discovery_service_server::AggregatedDiscoveryService;
use mesh_proto::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};
use tokio::sync::{mpsc, watch};
use tonic::{Request, Response, Status, Streaming};

/// Per-client response queue depth. Small on purpose: the session reads the newest
/// state when it can send, so waiting coalesces updates instead of queueing them.
const CLIENT_QUEUE: usize = 4;

/// A connected xDS client, for `meshctl status` and `config dump`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ClientInfo {
    pub id: u64,
    pub principal: String,
    pub node_id: String,
    pub connected_at: String,
    pub types: Vec<String>,
    /// type → (name → version) the client holds.
    pub held: BTreeMap<String, BTreeMap<String, String>>,
    pub acks: u64,
    pub nacks: u64,
    pub last_nack: Option<String>,
}

#[derive(Clone)]
pub struct Shared {
    pub generation: watch::Receiver<Arc<Generation>>,
    pub tokens: Arc<RwLock<Tokens>>,
    /// Kubernetes mode: service-account tokens are checked with the API server.
    pub reviewer: Option<Arc<TokenReviewer>>,
    pub ca: Arc<RwLock<CertificateAuthority>>,
    pub clients: Arc<Mutex<HashMap<u64, ClientInfo>>>,
    pub next_client: Arc<AtomicU64>,
}

/// What an unauthenticated caller is told, whatever the reason (a missing or unknown
/// token, the API server's verdict, an account that is not a node proxy's nor a
/// waypoint's): the reason goes to the log, never to the caller.
pub const UNAUTHENTICATED: &str = "authentication failed";
/// What a peer that caused too many failed TokenReviews is told.
pub const RATE_LIMITED: &str = "too many failed authentication attempts; retry later";
/// What a caller is told when the API server gave no verdict on its token (throttled,
/// unreachable): not a refusal.
pub const REVIEW_UNAVAILABLE: &str = "credentials cannot be checked now; retry later";

impl Shared {
    /// A bootstrap token from the tokens file, else (Kubernetes mode) a service-account
    /// token the API server vouches for.
    async fn authenticate<T>(&self, req: &Request<T>, what: &str) -> Result<Principal, Status> {
        let peer = req.remote_addr();
        let result = async {
            let token = bearer(req.metadata()).map_err(|e| ReviewError::Refused(e.to_string()))?;
            if let Some(p) = self.tokens.read().expect("tokens lock").lookup(token) {
                return Ok(p);
            }
            let Some(reviewer) = &self.reviewer else {
                return Err(ReviewError::Refused(AuthError::Unknown.to_string()));
            };
            let objects = self.generation.borrow().objects.clone();
            reviewer
                .authenticate(token, peer.map(|a| a.ip()), &objects)
                .await
        }
        .await;
        let peer = peer.map(|a| a.to_string()).unwrap_or_default();
        result.map_err(|e| match e {
            ReviewError::Refused(reason) => {
                tracing::warn!(%peer, %reason, "{what}: refused unauthenticated caller");
                Status::unauthenticated(UNAUTHENTICATED)
            }
            ReviewError::RateLimited => {
                tracing::warn!(%peer, "{what}: refused caller over its failed-authentication budget (no TokenReview)");
                Status::resource_exhausted(RATE_LIMITED)
            }
            ReviewError::Unavailable(reason) => {
                tracing::warn!(%peer, %reason, "{what}: the API server gave no verdict on the caller's token");
                Status::unavailable(REVIEW_UNAVAILABLE)
            }
        })
    }
}

pub struct Ads(pub Shared);

fn rfc3339(t: SystemTime) -> String {
    time::OffsetDateTime::from(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for Ads {
    type DeltaAggregatedResourcesStream =
        tokio_stream::wrappers::ReceiverStream<Result<DeltaDiscoveryResponse, Status>>;

    async fn delta_aggregated_resources(
        &self,
        req: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let principal = self.0.authenticate(&req, "xDS").await?;
        let shared = self.0.clone();
        let id = shared.next_client.fetch_add(1, Ordering::Relaxed);
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(CLIENT_QUEUE);
        shared.clients.lock().expect("clients lock").insert(
            id,
            ClientInfo {
                id,
                principal: principal.to_string(),
                node_id: String::new(),
                connected_at: rfc3339(SystemTime::now()),
                types: vec![],
                held: BTreeMap::new(),
                acks: 0,
                nacks: 0,
                last_nack: None,
            },
        );
        tracing::info!(client = id, %principal, "xDS client connected");
        tokio::spawn(async move {
            let mut session = Session::default();
            let mut gen_rx = shared.generation.clone();
            let result: Result<(), String> = async {
                loop {
                    let types: Vec<String> = tokio::select! {
                        msg = inbound.message() => {
                            let Some(r) = msg.map_err(|e| e.to_string())? else { return Ok(()) };
                            let kind = session.on_request(&r);
                            let mut clients = shared.clients.lock().expect("clients lock");
                            if let Some(c) = clients.get_mut(&id) {
                                if let Some(n) = &r.node {
                                    c.node_id = n.id.clone();
                                }
                                match &kind {
                                    RequestKind::Ack => c.acks += 1,
                                    RequestKind::Nack(m) => {
                                        c.nacks += 1;
                                        c.last_nack = Some(m.clone());
                                    }
                                    _ => {}
                                }
                                c.types = session.subscribed_types();
                            }
                            if let RequestKind::Nack(m) = &kind {
                                tracing::warn!(client = id, %principal, type_url = %r.type_url, error = %m, "client NACKed an update");
                            }
                            vec![r.type_url]
                        }
                        changed = gen_rx.changed() => {
                            changed.map_err(|_| "control plane shutting down".to_string())?;
                            session.subscribed_types()
                        }
                    };
                    for t in types {
                        let generation = gen_rx.borrow().clone();
                        let Some(view) = generation.view(&t, &principal) else {
                            tracing::warn!(client = id, type_url = %t, "subscription to an unknown or forbidden type ignored");
                            continue;
                        };
                        if let Some(resp) = session.diff(&t, &view) {
                            tx.send(Ok(resp)).await.map_err(|_| "client gone".to_string())?;
                        }
                        if let Some(c) = shared.clients.lock().expect("clients lock").get_mut(&id) {
                            c.held.insert(t.clone(), session.held(&t));
                        }
                    }
                }
            }
            .await;
            shared.clients.lock().expect("clients lock").remove(&id);
            match result {
                Ok(()) => tracing::info!(client = id, "xDS client disconnected"),
                Err(e) => tracing::info!(client = id, reason = %e, "xDS client disconnected"),
            }
        });
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(
            rx,
        )))
    }
}

pub struct Ca(pub Shared);

/// Node authorization: may `who` obtain a certificate for `id`?
pub fn authorize_identity(
    generation: &Generation,
    trust_domain: &str,
    who: &Principal,
    id: &SpiffeId,
) -> Result<(), String> {
    if id.trust_domain() != trust_domain {
        return Err(format!("{id} is outside trust domain {trust_domain}"));
    }
    match who {
        Principal::Node(node) => {
            let runs = generation.objects.pods.values().any(|p| {
                p.spec.node_name.as_deref() == Some(node.as_str())
                    && p.metadata.ns() == id.namespace()
                    && p.spec.service_account_name.as_deref().unwrap_or("default")
                        == id.service_account()
                    && !matches!(
                        p.status.phase.as_deref(),
                        Some("Succeeded") | Some("Failed")
                    )
            });
            if runs {
                Ok(())
            } else {
                Err(format!("node {node} runs no pod as {id}"))
            }
        }
        Principal::Waypoint { namespace, name } => {
            if id.namespace() == namespace && id.service_account() == name {
                Ok(())
            } else {
                Err(format!(
                    "waypoint {namespace}/{name} may only obtain its own identity, not {id}"
                ))
            }
        }
    }
}

#[tonic::async_trait]
impl IstioCertificateService for Ca {
    async fn create_certificate(
        &self,
        req: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let principal = self.0.authenticate(&req, "CA").await?;
        let body = req.into_inner();
        let impersonated = body.metadata.as_ref().and_then(|m| {
            match m
                .fields
                .get(mesh_proto::IMPERSONATED_IDENTITY)?
                .kind
                .as_ref()?
            {
                prost_types::value::Kind::StringValue(s) => Some(s.clone()),
                _ => None,
            }
        });
        let id: SpiffeId = match impersonated {
            Some(s) => s
                .parse()
                .map_err(|e| Status::invalid_argument(format!("ImpersonatedIdentity: {e}")))?,
            None => csr_identity(&body.csr).map_err(|e| Status::invalid_argument(e.to_string()))?,
        };
        let generation = self.0.generation.borrow().clone();
        let ca = self.0.ca.read().expect("ca lock");
        if let Err(reason) = authorize_identity(&generation, ca.trust_domain(), &principal, &id) {
            tracing::warn!(%principal, identity = %id, %reason, "certificate refused");
            return Err(Status::permission_denied(reason));
        }
        let ttl = Duration::from_secs(body.validity_duration.max(0) as u64);
        let chain = ca.sign_csr(&body.csr, &id, ttl).map_err(|e| {
            tracing::warn!(%principal, identity = %id, error = %e, "certificate refused");
            Status::invalid_argument(e.to_string())
        })?;
        tracing::info!(%principal, identity = %id, "certificate issued");
        Ok(Response::new(IstioCertificateResponse {
            cert_chain: chain,
        }))
    }
}
