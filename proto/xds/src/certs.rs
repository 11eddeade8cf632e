//! Workload certificates for the identities of pods on this node: fetched from the CA
//! (Istio's CreateCertificate with `ImpersonatedIdentity`), cached per identity, renewed
//! at half-life, retried with backoff while the current certificate stays in use.

use mesh_identity::ca::CertificateAuthority;
use mesh_identity::{SpiffeId, WorkloadCertificate, generate_csr};
use mesh_proto::ca::{
    IstioCertificateRequest, istio_certificate_service_client::IstioCertificateServiceClient,
};
use prost_types::{Struct, Value, value::Kind};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tonic::transport::Channel;

const MAX_BACKOFF: Duration = Duration::from_secs(150);
const INITIAL_BACKOFF: Duration = Duration::from_millis(500);

#[derive(Debug, Clone, thiserror::Error)]
pub enum CertFetchError {
    #[error("CA refused {id}: {status}")]
    Refused { id: SpiffeId, status: String },
    #[error("CA unreachable: {0}")]
    Unreachable(String),
    #[error("CA answered with an unusable certificate for {id}: {reason}")]
    BadResponse { id: SpiffeId, reason: String },
    #[error("local CA could not issue {id}: {reason}")]
    Local { id: SpiffeId, reason: String },
}

/// Where certificates come from.
pub enum CertSource {
    /// The control plane's CA, authenticated with this node's bearer token.
    Ca {
        channel: Channel,
        token_file: Option<PathBuf>,
        cluster_id: String,
        ttl: Duration,
    },
    /// A CA key on local disk: for running ztunnel with no control plane.
    Local(Box<CertificateAuthority>),
}

impl CertSource {
    async fn issue(&self, id: &SpiffeId) -> Result<WorkloadCertificate, CertFetchError> {
        let csr = generate_csr(id).map_err(|e| CertFetchError::Local {
            id: id.clone(),
            reason: e.to_string(),
        })?;
        let chain = match self {
            CertSource::Local(ca) => ca
                .sign_csr(&csr.csr_pem, id, Duration::from_secs(24 * 3600))
                .map_err(|e| CertFetchError::Local {
                    id: id.clone(),
                    reason: e.to_string(),
                })?,
            CertSource::Ca {
                channel,
                token_file,
                cluster_id,
                ttl,
            } => {
                let mut req = tonic::Request::new(IstioCertificateRequest {
                    csr: csr.csr_pem.clone(),
                    validity_duration: ttl.as_secs() as i64,
                    metadata: Some(Struct {
                        fields: [(
                            mesh_proto::IMPERSONATED_IDENTITY.to_string(),
                            Value {
                                kind: Some(Kind::StringValue(id.to_string())),
                            },
                        )]
                        .into(),
                    }),
                });
                if let Some(path) = token_file {
                    let token = std::fs::read_to_string(path).map_err(|e| {
                        CertFetchError::Unreachable(format!(
                            "cannot read the node token {}: {e}",
                            path.display()
                        ))
                    })?;
                    let value = format!("Bearer {}", token.trim()).parse().map_err(|_| {
                        CertFetchError::Unreachable("token is not a valid header".into())
                    })?;
                    req.metadata_mut().insert("authorization", value);
                }
                if let Ok(v) = cluster_id.parse() {
                    req.metadata_mut().insert("clusterid", v);
                }
                let resp = IstioCertificateServiceClient::new(channel.clone())
                    .create_certificate(req)
                    .await
                    .map_err(|s| match s.code() {
                        tonic::Code::Unavailable
                        | tonic::Code::DeadlineExceeded
                        | tonic::Code::Unknown => {
                            CertFetchError::Unreachable(s.message().to_string())
                        }
                        _ => CertFetchError::Refused {
                            id: id.clone(),
                            status: format!("{:?}: {}", s.code(), s.message()),
                        },
                    })?;
                resp.into_inner().cert_chain
            }
        };
        WorkloadCertificate::from_ca_response(id, &csr.key, &chain).map_err(|e| {
            CertFetchError::BadResponse {
                id: id.clone(),
                reason: e.to_string(),
            }
        })
    }
}

/// A certificate with the TLS server configuration built from it.
pub struct Credentials {
    pub cert: WorkloadCertificate,
    pub server_config: Arc<rustls::ServerConfig>,
}

#[derive(Default)]
struct Slot {
    current: Option<Arc<Credentials>>,
    /// Serializes fetches for one identity.
    fetching: Arc<tokio::sync::Mutex<()>>,
    last_error: Option<String>,
    renewing: bool,
}

pub struct CertManager {
    source: CertSource,
    slots: Mutex<HashMap<SpiffeId, Slot>>,
}

/// What `/config_dump` shows about one identity.
#[derive(Debug, serde::Serialize)]
pub struct CertStatus {
    pub identity: String,
    pub serial: Option<String>,
    pub not_after: Option<String>,
    pub refresh_at: Option<String>,
    pub last_error: Option<String>,
}

fn rfc3339(t: SystemTime) -> String {
    time::OffsetDateTime::from(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

impl CertManager {
    pub fn new(source: CertSource) -> Arc<Self> {
        Arc::new(CertManager {
            source,
            slots: Mutex::new(HashMap::new()),
        })
    }

    fn cached(&self, id: &SpiffeId) -> (Option<Arc<Credentials>>, Arc<tokio::sync::Mutex<()>>) {
        let mut slots = self.slots.lock().expect("cert lock");
        let slot = slots.entry(id.clone()).or_default();
        let now = SystemTime::now();
        let valid = slot.current.clone().filter(|c| !c.cert.is_expired_at(now));
        (valid, slot.fetching.clone())
    }

    /// A valid certificate for `id`, fetching one if none is cached.
    pub async fn get(self: &Arc<Self>, id: &SpiffeId) -> Result<Arc<Credentials>, CertFetchError> {
        let (cached, gate) = self.cached(id);
        if let Some(c) = cached {
            return Ok(c);
        }
        let _turn = gate.lock().await;
        if let (Some(c), _) = self.cached(id) {
            return Ok(c);
        }
        let creds = self.fetch(id).await?;
        let start_renewal = {
            let mut slots = self.slots.lock().expect("cert lock");
            let slot = slots.entry(id.clone()).or_default();
            !std::mem::replace(&mut slot.renewing, true)
        };
        if start_renewal {
            self.spawn_renewal(id.clone());
        }
        Ok(creds)
    }

    async fn fetch(&self, id: &SpiffeId) -> Result<Arc<Credentials>, CertFetchError> {
        let result = self.source.issue(id).await.and_then(|cert| {
            let server_config =
                mesh_identity::server_config(&cert).map_err(|e| CertFetchError::BadResponse {
                    id: id.clone(),
                    reason: e.to_string(),
                })?;
            Ok(Arc::new(Credentials {
                cert,
                server_config: Arc::new(server_config),
            }))
        });
        let mut slots = self.slots.lock().expect("cert lock");
        let slot = slots.entry(id.clone()).or_default();
        match &result {
            Ok(c) => {
                slot.current = Some(c.clone());
                slot.last_error = None;
                tracing::info!(identity = %id, expires = %rfc3339(c.cert.not_after()), "certificate issued");
            }
            Err(e) => {
                slot.last_error = Some(e.to_string());
                tracing::warn!(identity = %id, error = %e, "certificate request failed");
            }
        }
        result
    }

    /// Renews at half-life; on failure retries with backoff, never past expiry.
    fn spawn_renewal(self: &Arc<Self>, id: SpiffeId) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut backoff = INITIAL_BACKOFF;
            loop {
                let Some(mgr) = weak.upgrade() else { return };
                let refresh_at = {
                    let slots = mgr.slots.lock().expect("cert lock");
                    let Some(slot) = slots.get(&id) else { return };
                    slot.current.as_ref().map(|c| c.cert.refresh_at())
                };
                let wait = refresh_at
                    .and_then(|t| t.duration_since(SystemTime::now()).ok())
                    .unwrap_or_default();
                drop(mgr);
                tokio::time::sleep(wait).await;
                let Some(mgr) = weak.upgrade() else { return };
                if mgr.fetch(&id).await.is_ok() {
                    backoff = INITIAL_BACKOFF;
                } else {
                    let jitter = rand::random::<f64>() * 0.5 + 0.75;
                    let delay = backoff.mul_f64(jitter);
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    drop(mgr);
                    tokio::time::sleep(delay).await;
                }
            }
        });
    }

    /// Forgets identities no longer used by any local workload.
    pub fn retain(&self, keep: impl Fn(&SpiffeId) -> bool) {
        self.slots
            .lock()
            .expect("cert lock")
            .retain(|id, _| keep(id));
    }

    pub fn status(&self) -> Vec<CertStatus> {
        let slots = self.slots.lock().expect("cert lock");
        let mut out: Vec<CertStatus> = slots
            .iter()
            .map(|(id, s)| CertStatus {
                identity: id.to_string(),
                serial: s.current.as_ref().map(|c| c.cert.info().serial_hex.clone()),
                not_after: s.current.as_ref().map(|c| rfc3339(c.cert.not_after())),
                refresh_at: s.current.as_ref().map(|c| rfc3339(c.cert.refresh_at())),
                last_error: s.last_error.clone(),
            })
            .collect();
        out.sort_by(|a, b| a.identity.cmp(&b.identity));
        out
    }
}
