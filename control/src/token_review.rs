//! Kubernetes mode authentication: callers present a service-account token (ztunnel sends
//! its projected token, audience `istio-ca`), which the API server vouches for through a
//! TokenReview. The reviewed identity then maps to a principal:
//! - a node proxy service account (ztunnel, node agent) → the node its pod runs on, taken
//!   from the token's bound node (`authentication.kubernetes.io/node-name`) or else the
//!   bound pod's `spec.nodeName`;
//! - the service account of a waypoint Gateway (same namespace and name) → that waypoint.
//!
//! Positive reviews are cached briefly so a reconnect storm does not become a
//! TokenReview storm, and concurrent callers with the same token share one review. Refusals are cached too (shorter, keyed by a keyed hash of the
//! token), and each peer address may cause only a few failed reviews (a token bucket):
//! past that, its unknown tokens are refused without asking the API server. Both maps
//! are bounded. Callers get no detail of why (see `grpc`); the detail is logged.
//!
//! An API server that throttles (429) is asked again after its `Retry-After`, a bounded
//! number of times within a bounded wait; past that, or when the API server cannot be
//! asked at all, the caller is told to retry later (never "unauthenticated": the token
//! may well be valid), and nothing is cached.

use crate::auth::Principal;
use crate::index::waypoint::WAYPOINT_CLASS;
use crate::manifest::Objects;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use kube::api::PostParams;
use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::OnceCell;

const NODE_NAME: &str = "authentication.kubernetes.io/node-name";
const POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const CACHE_TTL: Duration = Duration::from_secs(60);
const CACHE_MAX: usize = 10_000;
/// A refused token is refused again without a review for this long.
pub const REFUSED_TTL: Duration = Duration::from_secs(5);
const REFUSED_MAX: usize = 4096;
/// Reviews a peer may have outstanding or failed in a burst...
pub const PEER_BURST: u32 = 8;
/// ...and one more per this interval.
pub const PEER_REFILL: Duration = Duration::from_secs(1);
/// Peers tracked; past this, new peers share one bucket.
const PEERS_MAX: usize = 4096;
/// A review throttled by the API server (429) is asked again at most this many times...
pub const THROTTLE_RETRIES: u32 = 3;
/// ...waiting its `Retry-After`, capped at this...
pub const RETRY_AFTER_MAX: Duration = Duration::from_secs(5);
/// ...(this when it names none), and never more than this in all.
pub const RETRY_AFTER_DEFAULT: Duration = Duration::from_secs(1);
pub const THROTTLE_WAIT_MAX: Duration = Duration::from_secs(10);
/// Reviews in flight tracked for sharing; past this, abandoned ones are dropped.
const INFLIGHT_MAX: usize = 4096;

/// Why a token was not accepted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReviewError {
    /// Refused (the detail is for the log only).
    Refused(String),
    /// The peer caused too many failed reviews; the API server was not asked.
    RateLimited,
    /// The API server gave no verdict (throttled past the retry budget, unreachable, or
    /// refusing mesh-control itself): the caller should retry; nothing is cached.
    Unavailable(String),
}

/// A client for TokenReviews: kube's own retry layer is off (it retries 429s up to 15
/// times over minutes) because a caller is waiting; `TokenReviewer` retries within
/// its own bounds.
pub fn review_client(mut config: kube::Config) -> Result<kube::Client, mesh_kube::KubeError> {
    config.default_retry = false;
    mesh_kube::client(config)
}

/// The wait before asking a throttled API server again, or None when the retries or the
/// total wait would be spent. `retry_after` is the 429's `Retry-After`.
pub fn throttle_delay(
    retries_done: u32,
    retry_after: Option<Duration>,
    waited: Duration,
) -> Option<Duration> {
    if retries_done >= THROTTLE_RETRIES {
        return None;
    }
    let d = retry_after
        .unwrap_or(RETRY_AFTER_DEFAULT)
        .min(RETRY_AFTER_MAX);
    (waited + d <= THROTTLE_WAIT_MAX).then_some(d)
}

/// `Retry-After` in seconds (what the API server sends; an HTTP date is not used by it).
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    value.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// One TokenReview call's outcome, before any retry.
enum Call {
    Reviewed(TokenReviewStatus),
    Throttled(Option<Duration>),
    Failed(String),
}

type Shared = Arc<OnceCell<Result<Principal, ReviewError>>>;

/// (group, plural) of the reviews created.
pub const TOKEN_REVIEWS: (&str, &str) = ("authentication.k8s.io", "tokenreviews");

pub struct TokenReviewer {
    client: kube::Client,
    audiences: Vec<String>,
    /// `namespace/name` of the node proxies' service accounts.
    node_proxy_accounts: Vec<String>,
    cache: Mutex<HashMap<String, (Principal, Instant)>>,
    /// Keyed hashes of recently refused tokens.
    refused: Mutex<HashMap<u64, Instant>>,
    hasher: RandomState,
    limiter: Mutex<PeerLimiter>,
    /// Reviews in flight by token: a caller with the same token waits for the same one.
    inflight: Mutex<HashMap<String, Shared>>,
}

impl TokenReviewer {
    pub fn new(
        client: kube::Client,
        audiences: Vec<String>,
        node_proxy_accounts: Vec<String>,
    ) -> Self {
        TokenReviewer {
            client,
            audiences,
            node_proxy_accounts,
            cache: Mutex::new(HashMap::new()),
            refused: Mutex::new(HashMap::new()),
            hasher: RandomState::new(),
            limiter: Mutex::new(PeerLimiter::new(PEER_BURST, PEER_REFILL, PEERS_MAX)),
            inflight: Mutex::new(HashMap::new()),
        }
    }

    /// Who presents `token` (from `peer`): a cached verdict, else a TokenReview when the
    /// peer is within its budget.
    pub async fn authenticate(
        &self,
        token: &str,
        peer: Option<IpAddr>,
        objects: &Objects,
    ) -> Result<Principal, ReviewError> {
        if let Some((p, at)) = self.cache.lock().expect("cache lock").get(token)
            && at.elapsed() < CACHE_TTL
        {
            return Ok(p.clone());
        }
        let hash = self.hasher.hash_one(token);
        if let Some(at) = self.refused.lock().expect("refused lock").get(&hash)
            && at.elapsed() < REFUSED_TTL
        {
            return Err(ReviewError::Refused(
                "refused again (recently refused token)".into(),
            ));
        }
        // Each caller is charged to its own peer's budget, before sharing a review: one
        // peer over budget must not turn away the others, nor escape its own limit.
        if !self
            .limiter
            .lock()
            .expect("limiter lock")
            .take(peer, Instant::now())
        {
            return Err(ReviewError::RateLimited);
        }
        // One review per token at a time: who comes while it runs shares its verdict.
        let cell = {
            let mut inflight = self.inflight.lock().expect("inflight lock");
            if inflight.len() >= INFLIGHT_MAX && !inflight.contains_key(token) {
                // Abandoned (every waiter gone before a verdict).
                inflight.retain(|_, c| Arc::strong_count(c) > 1);
            }
            inflight.entry(token.to_string()).or_default().clone()
        };
        let result = cell
            .get_or_init(|| self.review_once(token, objects))
            .await
            .clone();
        {
            let mut inflight = self.inflight.lock().expect("inflight lock");
            if inflight.get(token).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
                inflight.remove(token);
            }
        }
        if result.is_ok() {
            // Only failures count against the peer.
            self.limiter.lock().expect("limiter lock").refund(peer);
        }
        result
    }

    /// One review, its verdict cached (never RateLimited: callers are charged before).
    async fn review_once(&self, token: &str, objects: &Objects) -> Result<Principal, ReviewError> {
        match self.review(token, objects).await {
            Ok(p) => {
                let mut cache = self.cache.lock().expect("cache lock");
                insert_bounded(
                    &mut cache,
                    token.to_string(),
                    (p.clone(), Instant::now()),
                    CACHE_MAX,
                    |(_, at)| at.elapsed() < CACHE_TTL,
                );
                Ok(p)
            }
            Err(ReviewError::Refused(e)) => {
                let hash = self.hasher.hash_one(token);
                let mut refused = self.refused.lock().expect("refused lock");
                insert_bounded(&mut refused, hash, Instant::now(), REFUSED_MAX, |at| {
                    at.elapsed() < REFUSED_TTL
                });
                Err(ReviewError::Refused(e))
            }
            Err(e) => Err(e),
        }
    }

    /// Asks the API server, again after a 429 within the retry budget.
    async fn review(&self, token: &str, objects: &Objects) -> Result<Principal, ReviewError> {
        let mut waited = Duration::ZERO;
        for retries in 0.. {
            match self.call(token).await {
                Call::Reviewed(status) => {
                    return principal_from_review(&status, objects, &self.node_proxy_accounts)
                        .map_err(ReviewError::Refused);
                }
                Call::Failed(e) => return Err(ReviewError::Unavailable(e)),
                Call::Throttled(after) => match throttle_delay(retries, after, waited) {
                    Some(d) => {
                        tracing::debug!(wait = ?d, "TokenReview throttled by the API server (429); retrying");
                        tokio::time::sleep(d).await;
                        waited += d;
                    }
                    None => {
                        return Err(ReviewError::Unavailable(format!(
                            "TokenReview throttled by the API server (429) {} times in {waited:?}; the caller is told to retry",
                            retries + 1
                        )));
                    }
                },
            }
        }
        unreachable!("the retry loop returns")
    }

    /// One TokenReview, its `Retry-After` read when throttled.
    async fn call(&self, token: &str) -> Call {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                audiences: (!self.audiences.is_empty()).then(|| self.audiences.clone()),
            },
            ..Default::default()
        };
        let body = match serde_json::to_vec(&review) {
            Ok(b) => b,
            Err(e) => return Call::Failed(format!("TokenReview: {e}")),
        };
        let (group, plural) = TOKEN_REVIEWS;
        let req = match kube::core::Request::new(format!("/apis/{group}/v1/{plural}"))
            .create(&PostParams::default(), body)
        {
            Ok(r) => r,
            Err(e) => return Call::Failed(format!("TokenReview: {e}")),
        };
        let res = match self.client.send(req.map(kube::client::Body::from)).await {
            Ok(r) => r,
            Err(e) => {
                return Call::Failed(format!(
                    "TokenReview failed (is the API server reachable?): {e}"
                ));
            }
        };
        let code = res.status();
        if code == http::StatusCode::TOO_MANY_REQUESTS {
            return Call::Throttled(
                res.headers()
                    .get(http::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(parse_retry_after),
            );
        }
        let body = match res.into_body().collect_bytes().await {
            Ok(b) => b,
            Err(e) => return Call::Failed(format!("TokenReview: reading the answer: {e}")),
        };
        if !code.is_success() {
            return Call::Failed(format!(
                "TokenReview answered {code} (may mesh-control create tokenreviews?): {}",
                String::from_utf8_lossy(&body)
            ));
        }
        match serde_json::from_slice::<TokenReview>(&body) {
            Ok(r) => Call::Reviewed(r.status.unwrap_or_default()),
            Err(e) => Call::Failed(format!("TokenReview: unreadable answer: {e}")),
        }
    }
}

/// Inserts into a map kept under `max` entries: stale entries go first, then all.
fn insert_bounded<K: std::hash::Hash + Eq, V>(
    map: &mut HashMap<K, V>,
    key: K,
    value: V,
    max: usize,
    fresh: impl Fn(&V) -> bool,
) {
    if map.len() >= max {
        map.retain(|_, v| fresh(v));
        if map.len() >= max {
            map.clear();
        }
    }
    map.insert(key, value);
}

/// Token buckets per peer address, bounded: when `max_peers` are tracked, buckets that
/// have refilled (idle peers) are dropped, and if none has, new peers share one overflow
/// bucket, so many addresses cannot grow the map nor get a fresh budget each.
pub struct PeerLimiter {
    burst: u32,
    refill: Duration,
    max_peers: usize,
    peers: HashMap<Option<IpAddr>, Bucket>,
    overflow: Bucket,
}

#[derive(Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn level(&self, burst: u32, refill: Duration, now: Instant) -> f64 {
        let gained = now.saturating_duration_since(self.at).as_secs_f64() / refill.as_secs_f64();
        (self.tokens + gained).min(burst as f64)
    }
}

impl PeerLimiter {
    pub fn new(burst: u32, refill: Duration, max_peers: usize) -> Self {
        let full = |now| Bucket {
            tokens: burst as f64,
            at: now,
        };
        PeerLimiter {
            burst,
            refill,
            max_peers,
            peers: HashMap::new(),
            overflow: full(Instant::now()),
        }
    }

    /// Takes one review from `peer`'s budget; false when it has none left.
    pub fn take(&mut self, peer: Option<IpAddr>, now: Instant) -> bool {
        let (burst, refill) = (self.burst, self.refill);
        if !self.peers.contains_key(&peer) && self.peers.len() >= self.max_peers {
            self.peers
                .retain(|_, b| b.level(burst, refill, now) < burst as f64);
        }
        let bucket = if self.peers.contains_key(&peer) || self.peers.len() < self.max_peers {
            self.peers.entry(peer).or_insert(Bucket {
                tokens: burst as f64,
                at: now,
            })
        } else {
            &mut self.overflow
        };
        let level = bucket.level(burst, refill, now);
        *bucket = Bucket {
            tokens: level,
            at: now,
        };
        if level >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Gives back the review taken for a token that turned out valid.
    pub fn refund(&mut self, peer: Option<IpAddr>) {
        let burst = self.burst as f64;
        let bucket = match self.peers.get_mut(&peer) {
            Some(b) => b,
            None => &mut self.overflow,
        };
        bucket.tokens = (bucket.tokens + 1.0).min(burst);
    }

    pub fn tracked(&self) -> usize {
        self.peers.len()
    }
}

/// Maps a TokenReview's verdict to who the caller is (pure: no I/O).
pub fn principal_from_review(
    status: &TokenReviewStatus,
    objects: &Objects,
    node_proxy_accounts: &[String],
) -> Result<Principal, String> {
    if status.authenticated != Some(true) {
        return Err(format!(
            "the API server rejected the token: {}",
            status.error.as_deref().unwrap_or("not authenticated")
        ));
    }
    let user = status
        .user
        .as_ref()
        .ok_or("the TokenReview names no user")?;
    let username = user.username.as_deref().unwrap_or_default();
    let (ns, sa) = username
        .strip_prefix("system:serviceaccount:")
        .and_then(|rest| rest.split_once(':'))
        .ok_or_else(|| format!("{username} is not a service account"))?;
    let extra = |key: &str| {
        user.extra
            .as_ref()
            .and_then(|e| e.get(key))
            .and_then(|v| v.first())
            .cloned()
    };
    let account = format!("{ns}/{sa}");
    if node_proxy_accounts.contains(&account) {
        if let Some(node) = extra(NODE_NAME) {
            return Ok(Principal::Node(node));
        }
        let pod = extra(POD_NAME).ok_or_else(|| {
            format!("the token of {account} is not bound to a pod; use a projected service-account token")
        })?;
        let pod = objects
            .pods
            .get(&(ns.to_string(), pod.clone()))
            .ok_or_else(|| {
                format!("pod {ns}/{pod} (bound to the token of {account}) is not known")
            })?;
        return pod
            .spec
            .node_name
            .clone()
            .map(Principal::Node)
            .ok_or_else(|| format!("pod {ns}/{} is not scheduled on a node", pod.metadata.name));
    }
    let waypoint = objects
        .gateways
        .get(&(ns.to_string(), sa.to_string()))
        .is_some_and(|g| g.spec.gateway_class_name == WAYPOINT_CLASS);
    if waypoint {
        return Ok(Principal::Waypoint {
            namespace: ns.into(),
            name: sa.into(),
        });
    }
    Err(format!(
        "service account {account} is neither a node proxy ({}) nor a waypoint's",
        node_proxy_accounts.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::authentication::v1::UserInfo;

    #[test]
    fn throttled_reviews_wait_retry_after_within_bounds() {
        let s = Duration::from_secs;
        assert_eq!(throttle_delay(0, Some(s(2)), s(0)), Some(s(2)));
        assert_eq!(throttle_delay(0, None, s(0)), Some(RETRY_AFTER_DEFAULT));
        assert_eq!(
            throttle_delay(0, Some(s(600)), s(0)),
            Some(RETRY_AFTER_MAX),
            "a huge Retry-After is capped"
        );
        assert_eq!(throttle_delay(THROTTLE_RETRIES, Some(s(1)), s(0)), None);
        assert_eq!(
            throttle_delay(1, Some(s(4)), s(7)),
            None,
            "the total wait stays within {THROTTLE_WAIT_MAX:?}"
        );
        assert_eq!(parse_retry_after(" 3"), Some(s(3)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
    }

    #[test]
    fn each_peer_has_a_bounded_budget_that_refills() {
        let t0 = Instant::now();
        let mut l = PeerLimiter::new(3, Duration::from_secs(1), 4);
        let a = Some("10.0.0.1".parse().unwrap());
        let b = Some("10.0.0.2".parse().unwrap());
        assert!((0..3).all(|_| l.take(a, t0)));
        assert!(!l.take(a, t0), "over the burst");
        assert!(l.take(b, t0), "another peer has its own budget");
        assert!(!l.take(a, t0 + Duration::from_millis(900)));
        assert!(l.take(a, t0 + Duration::from_millis(1100)), "refilled");
        // A valid token gives its review back.
        l.refund(a);
        assert!(l.take(a, t0 + Duration::from_millis(1100)));
    }

    #[test]
    fn many_peers_neither_grow_the_map_nor_get_fresh_budgets() {
        let t0 = Instant::now();
        let mut l = PeerLimiter::new(2, Duration::from_secs(60), 16);
        let mut allowed = 0;
        for i in 0..1000u32 {
            let ip = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            allowed += (0..2).filter(|_| l.take(Some(ip), t0)).count();
        }
        assert!(l.tracked() <= 16, "{}", l.tracked());
        // 16 tracked peers x 2, plus the shared overflow bucket's 2.
        assert_eq!(allowed, 16 * 2 + 2);
        // Idle peers (refilled) make room again.
        let later = t0 + Duration::from_secs(600);
        let fresh = Some(IpAddr::from(std::net::Ipv4Addr::new(192, 0, 2, 1)));
        assert!(l.take(fresh, later));
        assert!(l.tracked() <= 16);
    }
    use std::collections::BTreeMap;

    fn objects() -> Objects {
        let mut o = Objects::default();
        let yaml = "apiVersion: v1\nkind: Pod\nmetadata: {name: ztunnel-abc, namespace: mesh-system}\nspec: {nodeName: node-2}\n---\n\
                    apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: waypoint, namespace: shop}\n\
                    spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}\n---\n\
                    apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: ingress, namespace: shop}\n\
                    spec: {gatewayClassName: istio, listeners: [{name: http, port: 80, protocol: HTTP}]}\n";
        for (i, doc) in yaml.split("---\n").enumerate() {
            let v: serde_json::Value = serde_saphyr::from_str(doc).unwrap();
            o.add_document(std::path::Path::new("t.yaml"), i, v)
                .unwrap();
        }
        o
    }

    fn status(user: &str, extra: &[(&str, &str)]) -> TokenReviewStatus {
        TokenReviewStatus {
            authenticated: Some(true),
            user: Some(UserInfo {
                username: Some(user.into()),
                extra: Some(
                    extra
                        .iter()
                        .map(|(k, v)| (k.to_string(), vec![v.to_string()]))
                        .collect::<BTreeMap<_, _>>(),
                ),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn maps_reviews_to_principals() {
        let o = objects();
        let proxies = vec!["mesh-system/ztunnel".to_string()];
        let sa = "system:serviceaccount:mesh-system:ztunnel";
        assert_eq!(
            principal_from_review(&status(sa, &[(NODE_NAME, "node-1")]), &o, &proxies),
            Ok(Principal::Node("node-1".into()))
        );
        // Older API servers bind only the pod: its node comes from the pod.
        assert_eq!(
            principal_from_review(&status(sa, &[(POD_NAME, "ztunnel-abc")]), &o, &proxies),
            Ok(Principal::Node("node-2".into()))
        );
        let e = principal_from_review(&status(sa, &[]), &o, &proxies).unwrap_err();
        assert!(e.contains("not bound to a pod"), "{e}");
        let e =
            principal_from_review(&status(sa, &[(POD_NAME, "gone")]), &o, &proxies).unwrap_err();
        assert!(e.contains("not known"), "{e}");

        assert_eq!(
            principal_from_review(
                &status("system:serviceaccount:shop:waypoint", &[]),
                &o,
                &proxies
            ),
            Ok(Principal::Waypoint {
                namespace: "shop".into(),
                name: "waypoint".into()
            })
        );
        // A Gateway of another class, an ordinary workload, a user: refused.
        for who in [
            "system:serviceaccount:shop:ingress",
            "system:serviceaccount:shop:web",
            "alice",
        ] {
            assert!(
                principal_from_review(&status(who, &[]), &o, &proxies).is_err(),
                "{who}"
            );
        }
        let mut rejected = status(sa, &[(NODE_NAME, "node-1")]);
        rejected.authenticated = Some(false);
        rejected.error = Some("token has expired".into());
        let e = principal_from_review(&rejected, &o, &proxies).unwrap_err();
        assert!(e.contains("token has expired"), "{e}");
    }
}
