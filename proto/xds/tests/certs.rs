//! The certificate manager against a real CA (the tree's CA library behind the Istio
//! CreateCertificate gRPC service), served in-process over in-memory streams so every test
//! runs on tokio's paused clock: request counts over minutes or hours of virtual time are
//! exact bounds, independent of machine speed.

use mesh_identity::SpiffeId;
use mesh_identity::ca::CertificateAuthority;
use mesh_proto::ca::istio_certificate_service_server::{
    IstioCertificateService, IstioCertificateServiceServer,
};
use mesh_proto::ca::{IstioCertificateRequest, IstioCertificateResponse};
use mesh_xds::certs::{CertFetchError, CertManager, CertSource, RefreshPolicy};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use tonic::transport::{Endpoint, Server, Uri};
use tonic::{Request, Response, Status};

const MINUTE: Duration = Duration::from_secs(60);
const HOUR: Duration = Duration::from_secs(3600);

/// How the CA answers.
const ANSWER: u8 = 0;
const UNAVAILABLE: u8 = 1;
const HANG: u8 = 2;

struct TestCa {
    ca: CertificateAuthority,
    /// Requests seen, per identity.
    seen: Mutex<HashMap<String, usize>>,
    mode: AtomicU8,
    /// While false, requests wait before being answered.
    open: tokio::sync::watch::Sender<bool>,
    /// Past this many requests in total, refuse (so a loop shows up as a count instead of
    /// spinning forever without letting the clock move).
    cap: usize,
}

#[derive(Clone)]
struct Handle(Arc<TestCa>);

impl Handle {
    fn requests(&self, id: &SpiffeId) -> usize {
        self.0
            .seen
            .lock()
            .unwrap()
            .get(&id.to_string())
            .copied()
            .unwrap_or(0)
    }
    fn total(&self) -> usize {
        self.0.seen.lock().unwrap().values().sum()
    }
    fn set_mode(&self, mode: u8) {
        self.0.mode.store(mode, Ordering::Relaxed);
    }
    fn hold(&self, held: bool) {
        self.0.open.send_replace(!held);
    }
}

#[tonic::async_trait]
impl IstioCertificateService for Handle {
    async fn create_certificate(
        &self,
        req: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let body = req.into_inner();
        let id = mesh_identity::ca::csr_identity(&body.csr)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let total = {
            let mut seen = self.0.seen.lock().unwrap();
            *seen.entry(id.to_string()).or_default() += 1;
            seen.values().sum::<usize>()
        };
        if total > self.0.cap {
            return Err(Status::resource_exhausted("too many requests"));
        }
        let mut open = self.0.open.subscribe();
        let _ = open.wait_for(|o| *o).await;
        match self.0.mode.load(Ordering::Relaxed) {
            UNAVAILABLE => return Err(Status::unavailable("CA down for the test")),
            HANG => std::future::pending::<()>().await,
            _ => {}
        }
        let ttl = Duration::from_secs(body.validity_duration.max(0) as u64);
        let chain = self
            .0
            .ca
            .sign_csr(&body.csr, &id, ttl)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(Response::new(IstioCertificateResponse {
            cert_chain: chain,
        }))
    }
}

/// A CA valid for `ca_life`, served over in-memory gRPC, and a manager asking it for
/// certificates of `ttl`.
fn setup(ca_life: Duration, ttl: Duration) -> (Handle, Arc<CertManager>) {
    setup_with(ca_life, ttl, RefreshPolicy::default())
}

fn setup_with(
    ca_life: Duration,
    ttl: Duration,
    policy: RefreshPolicy,
) -> (Handle, Arc<CertManager>) {
    let ca = Handle(Arc::new(TestCa {
        ca: CertificateAuthority::new_root("cluster.local", ca_life).unwrap(),
        seen: Mutex::default(),
        mode: AtomicU8::new(ANSWER),
        open: tokio::sync::watch::Sender::new(true),
        cap: 200,
    }));
    let (tx, rx) =
        tokio::sync::mpsc::unbounded_channel::<std::io::Result<tokio::io::DuplexStream>>();
    let service = IstioCertificateServiceServer::new(ca.clone());
    tokio::spawn(
        Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::UnboundedReceiverStream::new(rx)),
    );
    let channel = Endpoint::from_static("http://ca.test").connect_with_connector_lazy(
        tower::service_fn(move |_: Uri| {
            let tx = tx.clone();
            async move {
                let (client, server) = tokio::io::duplex(1 << 16);
                tx.send(Ok(server))
                    .map_err(|_| std::io::Error::other("CA gone"))?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(client))
            }
        }),
    );
    let certs = CertManager::with_policy(
        CertSource::Ca {
            channel,
            token_file: None,
            cluster_id: "Kubernetes".into(),
            ttl,
        },
        policy,
    );
    (ca, certs)
}

fn id(sa: &str) -> SpiffeId {
    SpiffeId::new("cluster.local", "ns", sa).unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_40s_certificate_is_renewed_on_a_schedule_not_in_a_loop() {
    // The CA back-dates not_before by a minute, so a 40 s certificate is "past half-life"
    // the moment it is issued: renewal must be planned from when it arrived.
    let (ca, certs) = setup(HOUR, Duration::from_secs(40));
    let a = id("a");
    let first = certs.get(&a).await.unwrap();
    tokio::time::sleep(2 * MINUTE).await;
    let n = ca.requests(&a);
    // 40–50 % of 40 s: at least 16 s apart, so at most 1 + 120 / 16 requests.
    assert!(n <= 8, "{n} requests in two minutes");
    assert!(n >= 2, "the certificate must still be renewed ({n})");
    let now = certs.get(&a).await.unwrap();
    assert_ne!(first.cert.info().serial_hex, now.cert.info().serial_hex);
}

#[tokio::test(start_paused = true)]
async fn a_ca_about_to_expire_does_not_start_a_loop() {
    // The CA caps every certificate at its own expiry, 30 s away.
    let (ca, certs) = setup(Duration::from_secs(30), Duration::from_secs(24 * 3600));
    let a = id("a");
    certs.get(&a).await.unwrap();
    tokio::time::sleep(2 * MINUTE).await;
    let n = ca.requests(&a);
    // 40–50 % of 30 s: at least 12 s apart.
    assert!((2..=11).contains(&n), "{n} requests in two minutes");
}

#[tokio::test(start_paused = true)]
async fn certificates_that_arrive_expired_are_failures_spaced_by_the_floor() {
    // A CA already past its own expiry issues certificates that are dead on arrival.
    let (ca, certs) = setup(Duration::ZERO, Duration::from_secs(40));
    let a = id("a");
    let err = certs.get(&a).await.unwrap_err();
    assert!(matches!(err, CertFetchError::BadResponse { .. }), "{err}");
    tokio::time::sleep(2 * MINUTE).await;
    let n = ca.requests(&a);
    // Never more than one request per 5 s floor, whatever the backoff says.
    assert!(n <= 1 + 120 / 5, "{n} requests in two minutes");
    assert_eq!(certs.stats().failing, 1);
}

#[tokio::test(start_paused = true)]
async fn failures_back_off_exponentially_are_counted_and_recover() {
    let (ca, certs) = setup(HOUR, HOUR);
    let a = id("a");
    ca.set_mode(UNAVAILABLE);
    let err = certs.get(&a).await.unwrap_err();
    assert!(matches!(err, CertFetchError::Unreachable(_)), "{err}");
    // While backing off, callers get the last error at once: no request per caller.
    let before = ca.requests(&a);
    let t = Instant::now();
    for _ in 0..100 {
        assert!(certs.get(&a).await.is_err());
    }
    assert_eq!(t.elapsed(), Duration::ZERO);
    assert_eq!(ca.requests(&a), before);

    tokio::time::sleep(10 * MINUTE).await;
    let n = ca.requests(&a);
    // Delays of at least max(5 s, ½·2^(k-1) s) capped at ½·150 s: about 14 in ten
    // minutes; a fixed 5 s retry would be 120.
    assert!((5..=16).contains(&n), "{n} requests in ten minutes");
    let stats = certs.stats();
    assert_eq!(stats.failed as usize, n);
    assert_eq!((stats.issued, stats.failing), (0, 1));
    assert_eq!(certs.failing().len(), 1);
    assert_eq!(certs.status()[0].consecutive_failures as usize, n);

    // The CA comes back: the next planned retry (at most the capped backoff away) heals it.
    ca.set_mode(ANSWER);
    tokio::time::sleep(Duration::from_secs(151)).await;
    assert!(certs.failing().is_empty());
    // Held without anyone asking again (the waypoint's readiness relies on it).
    assert!(certs.holds_valid(&a));
    certs.get(&a).await.unwrap();
    assert_eq!(certs.stats().issued, 1);
}

#[tokio::test(start_paused = true)]
async fn a_renewal_failure_keeps_the_current_certificate_in_use() {
    let (ca, certs) = setup(HOUR, Duration::from_secs(600));
    let a = id("a");
    let first = certs.get(&a).await.unwrap();
    ca.set_mode(UNAVAILABLE);
    tokio::time::sleep(5 * MINUTE).await; // past the 4–5 min refresh point
    assert_eq!(certs.stats().failing, 1, "the renewal failed");
    let still = certs.get(&a).await.unwrap();
    assert_eq!(first.cert.info().serial_hex, still.cert.info().serial_hex);
}

#[tokio::test(start_paused = true)]
async fn an_identity_that_left_the_node_is_never_requested_again() {
    let (ca, certs) = setup(24 * HOUR, HOUR);
    let (gone, stays) = (id("gone"), id("stays"));
    certs.get(&gone).await.unwrap();
    certs.get(&stays).await.unwrap();
    certs.retain(|i| *i == stays);
    tokio::time::sleep(3 * HOUR).await;
    assert_eq!(ca.requests(&gone), 1, "renewed after it left the node");
    // 1 h certificates are renewed every 24–30 min.
    let n = ca.requests(&stays);
    assert!((6..=9).contains(&n), "{n}");
    assert_eq!(certs.stats().identities, 1);
}

#[tokio::test(start_paused = true)]
async fn an_answer_in_flight_for_a_departed_identity_is_dropped() {
    let (ca, certs) = setup(24 * HOUR, HOUR);
    let gone = id("gone");
    ca.hold(true);
    let waiter = {
        let (certs, gone) = (certs.clone(), gone.clone());
        tokio::spawn(async move { certs.get(&gone).await })
    };
    while ca.requests(&gone) == 0 {
        tokio::task::yield_now().await;
    }
    certs.retain(|_| false);
    ca.hold(false);
    let err = waiter.await.unwrap().unwrap_err();
    assert!(matches!(err, CertFetchError::Forgotten(_)), "{err}");
    tokio::time::sleep(3 * HOUR).await;
    assert_eq!(ca.requests(&gone), 1);
    assert!(
        certs.status().is_empty(),
        "the answer re-created the identity"
    );
}

#[tokio::test(start_paused = true)]
async fn concurrent_callers_share_one_request_per_identity() {
    let (ca, certs) = setup(24 * HOUR, HOUR);
    ca.hold(true);
    let mut waiters = Vec::new();
    for i in 0..100 {
        let (certs, who) = (certs.clone(), id(if i % 2 == 0 { "even" } else { "odd" }));
        waiters.push(tokio::spawn(async move { certs.get(&who).await }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    ca.hold(false);
    let mut serials = std::collections::BTreeSet::new();
    for w in waiters {
        serials.insert(w.await.unwrap().unwrap().cert.info().serial_hex.clone());
    }
    assert_eq!(serials.len(), 2, "one certificate per identity");
    assert_eq!((ca.requests(&id("even")), ca.requests(&id("odd"))), (1, 1));
}

#[tokio::test(start_paused = true)]
async fn waiting_for_a_certificate_and_the_ca_call_are_both_bounded() {
    let policy = RefreshPolicy::default();
    let (wait, request) = (policy.wait_timeout, policy.request_timeout);
    let (ca, certs) = setup_with(24 * HOUR, HOUR, policy);
    ca.set_mode(HANG);
    let a = id("a");
    let t = Instant::now();
    let err = certs.get(&a).await.unwrap_err();
    assert!(matches!(err, CertFetchError::Timeout { .. }), "{err}");
    assert_eq!(t.elapsed(), wait);
    // The CA recovers, but the call already made stays hung: it is abandoned at the
    // request timeout, and the retry (after a short backoff) is answered.
    ca.set_mode(ANSWER);
    tokio::time::sleep(request).await;
    let stats = certs.stats();
    assert_eq!((stats.failed, stats.issued), (1, 1));
    certs.get(&a).await.unwrap();
    assert_eq!(ca.total(), 2);
}
