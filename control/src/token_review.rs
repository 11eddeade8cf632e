//! Kubernetes mode authentication: callers present a service-account token (ztunnel sends
//! its projected token, audience `istio-ca`), which the API server vouches for through a
//! TokenReview. The reviewed identity then maps to a principal:
//! - a node proxy service account (ztunnel, node agent) → the node its pod runs on, taken
//!   from the token's bound node (`authentication.kubernetes.io/node-name`) or else the
//!   bound pod's `spec.nodeName`;
//! - the service account of a waypoint Gateway (same namespace and name) → that waypoint.
//!
//! Positive reviews are cached briefly so a reconnect storm does not become a
//! TokenReview storm. Refusals are cached too (shorter, keyed by a keyed hash of the
//! token), and each peer address may cause only a few failed reviews (a token bucket):
//! past that, its unknown tokens are refused without asking the API server. Both maps
//! are bounded. Callers get no detail of why (see `grpc`); the detail is logged.

use crate::auth::Principal;
use crate::index::waypoint::WAYPOINT_CLASS;
use crate::manifest::Objects;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use kube::api::{Api, PostParams};
use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

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

/// Why a token was not accepted.
#[derive(Debug, PartialEq, Eq)]
pub enum ReviewError {
    /// Refused (the detail is for the log only).
    Refused(String),
    /// The peer caused too many failed reviews; the API server was not asked.
    RateLimited,
}

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
        if !self
            .limiter
            .lock()
            .expect("limiter lock")
            .take(peer, Instant::now())
        {
            return Err(ReviewError::RateLimited);
        }
        match self.review(token, objects).await {
            Ok(p) => {
                // Only failures count against the peer.
                self.limiter.lock().expect("limiter lock").refund(peer);
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
            Err(e) => {
                let mut refused = self.refused.lock().expect("refused lock");
                insert_bounded(&mut refused, hash, Instant::now(), REFUSED_MAX, |at| {
                    at.elapsed() < REFUSED_TTL
                });
                Err(ReviewError::Refused(e))
            }
        }
    }

    async fn review(&self, token: &str, objects: &Objects) -> Result<Principal, String> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                audiences: (!self.audiences.is_empty()).then(|| self.audiences.clone()),
            },
            ..Default::default()
        };
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let reviewed = api
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| format!("TokenReview failed (is the API server reachable, and may mesh-control create tokenreviews?): {e}"))?;
        let status = reviewed.status.unwrap_or_default();
        principal_from_review(&status, objects, &self.node_proxy_accounts)
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
