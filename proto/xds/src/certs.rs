//! Workload certificates for the identities of pods on this node: fetched from the CA
//! (Istio's CreateCertificate with `ImpersonatedIdentity`), cached per identity, and kept
//! fresh by one refresh worker.
//!
//! - **Single flight**: one request per identity at a time; everyone who needs that
//!   identity's certificate meanwhile waits for the same answer (bounded by
//!   [`RefreshPolicy::wait_timeout`]), and one CA call is bounded by
//!   [`RefreshPolicy::request_timeout`].
//! - **One worker, one queue**: the next request of every identity sits in one priority
//!   queue (earliest first), served by one task. An identity that left the node
//!   ([`CertManager::retain`]) leaves the queue, and an answer still in flight for it is
//!   dropped: it is never renewed again.
//! - **Refresh from the time of issue**: at 40–50 % of the life that remained when the
//!   certificate arrived (never from `not_before`, which the CA back-dates), never sooner
//!   than [`RefreshPolicy::min_interval`] after the previous request. A short-lived
//!   certificate (a small `--cert-ttl`, or a CA close to its own expiry) is renewed
//!   early, but never in a loop.
//! - **Failures back off** exponentially with jitter up to [`RefreshPolicy::max_backoff`];
//!   while an identity has no certificate and is backing off, callers get its last error
//!   at once instead of starting another request. Counts are in [`CertManager::stats`].

use mesh_identity::ca::CertificateAuthority;
use mesh_identity::{SpiffeId, WorkloadCertificate, generate_csr};
use mesh_proto::ca::{
    IstioCertificateRequest, istio_certificate_service_client::IstioCertificateServiceClient,
};
use prost_types::{Struct, Value, value::Kind};
use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tonic::transport::Channel;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertFetchError {
    #[error("CA refused {id}: {status}")]
    Refused { id: SpiffeId, status: String },
    #[error("CA unreachable: {0}")]
    Unreachable(String),
    #[error("CA answered with an unusable certificate for {id}: {reason}")]
    BadResponse { id: SpiffeId, reason: String },
    #[error("local CA could not issue {id}: {reason}")]
    Local { id: SpiffeId, reason: String },
    #[error("no certificate for {id} within {waited:?}")]
    Timeout { id: SpiffeId, waited: Duration },
    #[error("{0} is no longer used on this node")]
    Forgotten(SpiffeId),
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
    Local {
        ca: Box<CertificateAuthority>,
        ttl: Duration,
    },
}

impl CertSource {
    /// The CA of the control plane `cp` (at its address), over the same TLS channel and
    /// with the same credentials as xDS.
    pub fn control_plane(
        cp: &crate::ControlPlane,
        ttl: Duration,
    ) -> Result<CertSource, crate::ConnectError> {
        Ok(CertSource::Ca {
            channel: cp.try_channel(&cp.address)?,
            token_file: cp.token_file.clone(),
            cluster_id: cp.cluster_id.clone(),
            ttl,
        })
    }

    async fn issue(&self, id: &SpiffeId) -> Result<WorkloadCertificate, CertFetchError> {
        let csr = generate_csr(id).map_err(|e| CertFetchError::Local {
            id: id.clone(),
            reason: e.to_string(),
        })?;
        let chain = match self {
            CertSource::Local { ca, ttl } => {
                ca.sign_csr(&csr.csr_pem, id, *ttl)
                    .map_err(|e| CertFetchError::Local {
                        id: id.clone(),
                        reason: e.to_string(),
                    })?
            }
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
                crate::control_plane::authorize(&mut req, token_file.as_deref(), cluster_id)
                    .map_err(|e| CertFetchError::Unreachable(e.to_string()))?;
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

/// When certificates are requested again.
#[derive(Clone, Debug)]
pub struct RefreshPolicy {
    /// The floor: no request for an identity sooner than this after its previous one.
    pub min_interval: Duration,
    /// First retry delay after a failure; doubles per consecutive failure.
    pub initial_backoff: Duration,
    /// Cap on the retry delay.
    pub max_backoff: Duration,
    /// Longest one CA request may take.
    pub request_timeout: Duration,
    /// Longest a caller of [`CertManager::get`] waits for a certificate.
    pub wait_timeout: Duration,
}

impl Default for RefreshPolicy {
    fn default() -> Self {
        RefreshPolicy {
            min_interval: Duration::from_secs(5),
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(150),
            request_timeout: Duration::from_secs(30),
            wait_timeout: Duration::from_secs(10),
        }
    }
}

impl RefreshPolicy {
    /// When to renew a certificate that arrived at `now` with `remaining` life: 40–50 %
    /// of it (the jitter spreads renewals of many identities apart).
    pub fn refresh_in(&self, remaining: Duration) -> Duration {
        remaining.mul_f64(0.5 * rand::random_range(0.8..=1.0))
    }

    /// Delay before retrying after `failures` consecutive failures (≥ 1): exponential,
    /// capped, with full jitter in its upper half.
    pub fn backoff(&self, failures: u32) -> Duration {
        let exp = self.initial_backoff.saturating_mul(
            1u32.checked_shl(failures.saturating_sub(1))
                .unwrap_or(u32::MAX),
        );
        exp.min(self.max_backoff)
            .mul_f64(rand::random_range(0.5..=1.0))
    }
}

/// A certificate with the TLS server configuration built from it.
pub struct Credentials {
    pub cert: WorkloadCertificate,
    pub server_config: Arc<rustls::ServerConfig>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("identity", self.cert.identity())
            .field("serial", &self.cert.info().serial_hex)
            .finish()
    }
}

type Outcome = Option<Result<Arc<Credentials>, CertFetchError>>;

/// The latest answer for one identity; `seq` counts answers, so a waiter can tell a new
/// one from the one it already saw.
#[derive(Clone, Default)]
struct Answer {
    seq: u64,
    outcome: Outcome,
}

struct Slot {
    /// Distinguishes this slot from an earlier one for the same identity (removed, then
    /// added again): an answer or a queue entry for the old one is ignored.
    generation: u64,
    current: Option<Arc<Credentials>>,
    fetching: bool,
    last_request: Option<Instant>,
    /// The next request, as queued.
    due: Option<Instant>,
    failures: u32,
    last_error: Option<CertFetchError>,
    answers: watch::Sender<Answer>,
}

#[derive(Default)]
struct Book {
    slots: HashMap<SpiffeId, Slot>,
    /// The refresh queue: (when, generation, identity), earliest first.
    queue: BTreeSet<(Instant, u64, SpiffeId)>,
    next_generation: u64,
}

impl Book {
    fn unqueue(&mut self, id: &SpiffeId) {
        if let Some(slot) = self.slots.get_mut(id)
            && let Some(due) = slot.due.take()
        {
            self.queue.remove(&(due, slot.generation, id.clone()));
        }
    }

    /// Queues the next request of `id` at `at` (replacing any earlier plan).
    fn queue_at(&mut self, id: &SpiffeId, at: Instant) {
        self.unqueue(id);
        if let Some(slot) = self.slots.get_mut(id) {
            slot.due = Some(at);
            self.queue.insert((at, slot.generation, id.clone()));
        }
    }
}

/// Counters for metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CertStats {
    /// CA requests answered with a usable certificate.
    pub issued: u64,
    /// CA requests that failed (refused, unreachable, timed out, unusable answer).
    pub failed: u64,
    /// Identities currently held.
    pub identities: u64,
    /// Identities whose latest request failed (backing off).
    pub failing: u64,
}

pub struct CertManager {
    source: CertSource,
    policy: RefreshPolicy,
    book: Mutex<Book>,
    wake: Arc<Notify>,
    worker_started: AtomicBool,
    issued: AtomicU64,
    failed: AtomicU64,
}

/// What `/config_dump` shows about one identity.
#[derive(Debug, serde::Serialize)]
pub struct CertStatus {
    pub identity: String,
    pub serial: Option<String>,
    pub not_after: Option<String>,
    /// When the next request is planned.
    pub refresh_at: Option<String>,
    pub last_error: Option<String>,
    pub consecutive_failures: u32,
    /// The certificate held now (its chain and roots), if any.
    #[serde(skip)]
    pub current: Option<Arc<Credentials>>,
}

fn rfc3339(t: SystemTime) -> String {
    time::OffsetDateTime::from(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

fn valid(slot: &Slot) -> Option<Arc<Credentials>> {
    slot.current
        .clone()
        .filter(|c| !c.cert.is_expired_at(SystemTime::now()))
}

impl Drop for CertManager {
    fn drop(&mut self) {
        // Lets the worker notice that we are gone.
        self.wake.notify_one();
    }
}

impl CertManager {
    pub fn new(source: CertSource) -> Arc<Self> {
        Self::with_policy(source, RefreshPolicy::default())
    }

    pub fn with_policy(source: CertSource, policy: RefreshPolicy) -> Arc<Self> {
        Arc::new(CertManager {
            source,
            policy,
            book: Mutex::new(Book::default()),
            wake: Arc::new(Notify::new()),
            worker_started: AtomicBool::new(false),
            issued: AtomicU64::new(0),
            failed: AtomicU64::new(0),
        })
    }

    /// A valid certificate for `id`: the cached one, or the answer to the request in
    /// flight (starting one if none is and the floor allows). Waits at most
    /// `wait_timeout`; while `id` is backing off after a failure, returns that failure.
    pub async fn get(self: &Arc<Self>, id: &SpiffeId) -> Result<Arc<Credentials>, CertFetchError> {
        let (mut answers, seen) = {
            let mut book = self.book.lock().expect("cert lock");
            if !book.slots.contains_key(id) {
                book.next_generation += 1;
                let generation = book.next_generation;
                book.slots.insert(
                    id.clone(),
                    Slot {
                        generation,
                        current: None,
                        fetching: false,
                        last_request: None,
                        due: None,
                        failures: 0,
                        last_error: None,
                        answers: watch::Sender::new(Answer::default()),
                    },
                );
            }
            let slot = book.slots.get_mut(id).expect("inserted above");
            if let Some(c) = valid(slot) {
                return Ok(c);
            }
            if !slot.fetching
                && slot.failures > 0
                && let Some(e) = &slot.last_error
            {
                return Err(e.clone());
            }
            let answers = slot.answers.subscribe();
            let seen = answers.borrow().seq;
            if !slot.fetching {
                let now = Instant::now();
                let earliest = slot
                    .last_request
                    .map_or(now, |t| (t + self.policy.min_interval).max(now));
                if earliest <= now {
                    self.start_fetch(&mut book, id);
                } else if slot.due.is_none_or(|d| d > earliest) {
                    book.queue_at(id, earliest);
                    self.wake_worker();
                }
            }
            (answers, seen)
        };
        let waited = self.policy.wait_timeout;
        let next = tokio::time::timeout(waited, answers.wait_for(|a| a.seq > seen)).await;
        match next {
            Err(_) => Err(CertFetchError::Timeout {
                id: id.clone(),
                waited,
            }),
            Ok(Err(_)) => Err(CertFetchError::Forgotten(id.clone())),
            Ok(Ok(answer)) => answer
                .outcome
                .clone()
                .unwrap_or_else(|| Err(CertFetchError::Forgotten(id.clone()))),
        }
    }

    /// Marks `id` as fetching and starts its request (the caller holds the book).
    fn start_fetch(self: &Arc<Self>, book: &mut Book, id: &SpiffeId) {
        book.unqueue(id);
        let Some(slot) = book.slots.get_mut(id) else {
            return;
        };
        slot.fetching = true;
        slot.last_request = Some(Instant::now());
        let generation = slot.generation;
        let (mgr, id) = (self.clone(), id.clone());
        tokio::spawn(async move {
            let result =
                match tokio::time::timeout(mgr.policy.request_timeout, mgr.issue(&id)).await {
                    Ok(r) => r,
                    Err(_) => Err(CertFetchError::Unreachable(format!(
                        "no answer from the CA within {:?}",
                        mgr.policy.request_timeout
                    ))),
                };
            mgr.complete(&id, generation, result);
        });
    }

    async fn issue(&self, id: &SpiffeId) -> Result<Arc<Credentials>, CertFetchError> {
        let cert = self.source.issue(id).await?;
        if cert.is_expired_at(SystemTime::now()) {
            return Err(CertFetchError::BadResponse {
                id: id.clone(),
                reason: format!(
                    "the certificate arrived already expired (not after {})",
                    rfc3339(cert.not_after())
                ),
            });
        }
        let server_config =
            mesh_identity::server_config(&cert).map_err(|e| CertFetchError::BadResponse {
                id: id.clone(),
                reason: e.to_string(),
            })?;
        Ok(Arc::new(Credentials {
            cert,
            server_config: Arc::new(server_config),
        }))
    }

    /// Records an answer, plans the next request, and wakes everyone waiting for it.
    fn complete(
        self: &Arc<Self>,
        id: &SpiffeId,
        generation: u64,
        result: Result<Arc<Credentials>, CertFetchError>,
    ) {
        match &result {
            Ok(_) => self.issued.fetch_add(1, Ordering::Relaxed),
            Err(_) => self.failed.fetch_add(1, Ordering::Relaxed),
        };
        let mut book = self.book.lock().expect("cert lock");
        let Some(slot) = book
            .slots
            .get_mut(id)
            .filter(|s| s.generation == generation)
        else {
            tracing::debug!(identity = %id, "certificate answer dropped: identity left the node");
            return;
        };
        let now = Instant::now();
        slot.fetching = false;
        let floor = slot
            .last_request
            .map_or(now, |t| t + self.policy.min_interval);
        let next = match &result {
            Ok(c) => {
                slot.current = Some(c.clone());
                slot.failures = 0;
                slot.last_error = None;
                let remaining = c
                    .cert
                    .not_after()
                    .duration_since(SystemTime::now())
                    .unwrap_or_default();
                let refresh_in = self.policy.refresh_in(remaining);
                tracing::info!(identity = %id, expires = %rfc3339(c.cert.not_after()),
                    refresh_in = ?refresh_in.max(floor.saturating_duration_since(now)),
                    "certificate issued");
                now + refresh_in
            }
            Err(e) => {
                slot.failures = slot.failures.saturating_add(1);
                slot.last_error = Some(e.clone());
                let delay = self.policy.backoff(slot.failures);
                tracing::warn!(identity = %id, error = %e, failures = slot.failures,
                    retry_in = ?delay.max(floor.saturating_duration_since(now)),
                    "certificate request failed");
                now + delay
            }
        };
        slot.answers.send_modify(|a| {
            a.seq += 1;
            a.outcome = Some(result);
        });
        book.queue_at(id, next.max(floor));
        drop(book);
        self.wake_worker();
    }

    fn wake_worker(self: &Arc<Self>) {
        if !self.worker_started.swap(true, Ordering::Relaxed) {
            tokio::spawn(refresh_worker(Arc::downgrade(self), self.wake.clone()));
        }
        self.wake.notify_one();
    }

    /// Starts the requests that are due; returns when the next one is.
    fn run_due(self: &Arc<Self>) -> Option<Instant> {
        let mut book = self.book.lock().expect("cert lock");
        let now = Instant::now();
        while let Some((at, generation, id)) = book.queue.first().cloned() {
            if at > now {
                return Some(at);
            }
            book.queue.remove(&(at, generation, id.clone()));
            let Some(slot) = book
                .slots
                .get_mut(&id)
                .filter(|s| s.generation == generation)
            else {
                continue;
            };
            slot.due = None;
            if !slot.fetching {
                self.start_fetch(&mut book, &id);
            }
        }
        None
    }

    /// Whether a certificate for `id` is held and not expired: what a connection asking
    /// `get` now would be given at once (readiness reads this, never a copy of it).
    pub fn holds_valid(&self, id: &SpiffeId) -> bool {
        let book = self.book.lock().expect("cert lock");
        book.slots.get(id).and_then(valid).is_some()
    }

    /// Forgets identities no longer used by any local workload: their certificates, their
    /// place in the refresh queue, and any answer still in flight.
    pub fn retain(&self, keep: impl Fn(&SpiffeId) -> bool) {
        let mut book = self.book.lock().expect("cert lock");
        let gone: Vec<SpiffeId> = book.slots.keys().filter(|id| !keep(id)).cloned().collect();
        for id in gone {
            book.unqueue(&id);
            book.slots.remove(&id);
            tracing::info!(identity = %id, "certificate forgotten: no pod on this node uses it");
        }
    }

    pub fn stats(&self) -> CertStats {
        let book = self.book.lock().expect("cert lock");
        CertStats {
            issued: self.issued.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            identities: book.slots.len() as u64,
            failing: book.slots.values().filter(|s| s.failures > 0).count() as u64,
        }
    }

    /// Identities whose latest request failed, with the error (for readiness).
    pub fn failing(&self) -> Vec<(SpiffeId, String)> {
        let book = self.book.lock().expect("cert lock");
        let mut v: Vec<_> = book
            .slots
            .iter()
            .filter(|(_, s)| s.failures > 0)
            .map(|(id, s)| {
                let e = s.last_error.as_ref().map(ToString::to_string);
                (id.clone(), e.unwrap_or_default())
            })
            .collect();
        v.sort();
        v
    }

    pub fn status(&self) -> Vec<CertStatus> {
        let book = self.book.lock().expect("cert lock");
        let (now, wall) = (Instant::now(), SystemTime::now());
        let mut out: Vec<CertStatus> = book
            .slots
            .iter()
            .map(|(id, s)| CertStatus {
                identity: id.to_string(),
                serial: s.current.as_ref().map(|c| c.cert.info().serial_hex.clone()),
                not_after: s.current.as_ref().map(|c| rfc3339(c.cert.not_after())),
                refresh_at: s
                    .due
                    .map(|d| rfc3339(wall + d.saturating_duration_since(now))),
                last_error: s.last_error.as_ref().map(ToString::to_string),
                consecutive_failures: s.failures,
                current: s.current.clone(),
            })
            .collect();
        out.sort_by(|a, b| a.identity.cmp(&b.identity));
        out
    }
}

/// The one refresh worker: sleeps until the earliest queued request, starts what is due,
/// and goes back to sleep; woken early when the queue changes. Ends with the manager.
async fn refresh_worker(mgr: Weak<CertManager>, wake: Arc<Notify>) {
    loop {
        let next = match mgr.upgrade() {
            Some(m) => m.run_due(),
            None => return,
        };
        match next {
            Some(at) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(at) => {}
                    _ = wake.notified() => {}
                }
            }
            None => wake.notified().await,
        }
    }
}
