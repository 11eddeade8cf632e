//! Delta ADS: per-client subscriptions (wildcard and named), nonces, ACK/NACK, pushes of
//! only what changed, removals, `initial_resource_versions` on reconnect. The session
//! logic is a pure state machine ([`Session`]); the tonic service is a thin loop around
//! it. Each client's responses go through a small bounded queue and the latest state is
//! read at send time, so a slow client gets coalesced updates instead of growing memory.

use mesh_proto::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource};
use prost_types::Any;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

/// One resource as served: name, content version and the encoded body.
#[derive(Clone, Debug, PartialEq)]
pub struct Served {
    pub name: String,
    pub version: String,
    pub body: Any,
    pub aliases: Vec<String>,
}

impl Served {
    pub fn new(name: String, type_url: &str, value: Vec<u8>, aliases: Vec<String>) -> Arc<Self> {
        Arc::new(Served {
            version: content_version(&value),
            name,
            body: Any {
                type_url: type_url.to_string(),
                value,
            },
            aliases,
        })
    }
}

/// FNV-1a over the encoding: equal content gives an equal version across restarts, so
/// `initial_resource_versions` from a reconnecting client skip what it already has.
pub fn content_version(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// The resources of one type as one client may see them.
pub type View = BTreeMap<String, Arc<Served>>;

#[derive(Debug, Default, Clone)]
struct TypeState {
    wildcard: bool,
    names: BTreeSet<String>,
    /// What the client holds: name → version.
    held: HashMap<String, String>,
    /// Nonces sent and not yet answered.
    outstanding: BTreeSet<String>,
    subscribed_once: bool,
    /// At least one response was sent.
    synced: bool,
}

/// What a request meant.
#[derive(Debug, PartialEq, Eq)]
pub enum RequestKind {
    Subscribe,
    Ack,
    Nack(String),
    /// An answer to a nonce we never sent (or already answered): ignored.
    Stale,
}

#[derive(Debug, Default)]
pub struct Session {
    types: HashMap<String, TypeState>,
    next_nonce: u64,
}

impl Session {
    pub fn subscribed_types(&self) -> Vec<String> {
        self.types.keys().cloned().collect()
    }

    /// Applies a client request; returns what it was.
    pub fn on_request(&mut self, req: &DeltaDiscoveryRequest) -> RequestKind {
        let st = self.types.entry(req.type_url.clone()).or_default();
        let first = !st.subscribed_once;
        st.subscribed_once = true;
        if first {
            // Legacy wildcard: a first request naming nothing means everything.
            if req.resource_names_subscribe.is_empty() && req.resource_names_unsubscribe.is_empty()
            {
                st.wildcard = true;
            }
            for (name, version) in &req.initial_resource_versions {
                st.held.insert(name.clone(), version.clone());
            }
        }
        for n in &req.resource_names_subscribe {
            if n == "*" {
                st.wildcard = true;
            } else {
                st.names.insert(n.clone());
            }
        }
        for n in &req.resource_names_unsubscribe {
            if n == "*" {
                st.wildcard = false;
            } else {
                st.names.remove(n);
            }
        }
        if req.response_nonce.is_empty() {
            return RequestKind::Subscribe;
        }
        if !st.outstanding.remove(&req.response_nonce) {
            return RequestKind::Stale;
        }
        match &req.error_detail {
            Some(e) => RequestKind::Nack(e.message.clone()),
            None => RequestKind::Ack,
        }
    }

    fn wants(st: &TypeState, name: &str) -> bool {
        st.wildcard || st.names.contains(name)
    }

    /// The response that brings the client's view of `type_url` up to date, if any.
    /// The client is assumed to take it (a NACK is logged, not retried: resending the
    /// same content would be refused again).
    pub fn diff(&mut self, type_url: &str, view: &View) -> Option<DeltaDiscoveryResponse> {
        let st = self.types.get_mut(type_url)?;
        let mut resources = Vec::new();
        for (name, r) in view {
            if Self::wants(st, name) && st.held.get(name) != Some(&r.version) {
                resources.push(Resource {
                    name: name.clone(),
                    aliases: r.aliases.clone(),
                    version: r.version.clone(),
                    resource: Some(r.body.clone()),
                    ttl: None,
                    metadata: None,
                });
            }
        }
        let mut removed: Vec<String> = st
            .held
            .keys()
            .filter(|n| !view.contains_key(*n) || !Self::wants(st, n))
            .cloned()
            .collect();
        removed.sort();
        // Nothing new: stay quiet, except for the first answer to a subscription, which
        // tells the client it is in sync even when there is nothing to send.
        if resources.is_empty() && removed.is_empty() && st.synced {
            return None;
        }
        st.synced = true;
        for r in &resources {
            st.held.insert(r.name.clone(), r.version.clone());
        }
        for n in &removed {
            st.held.remove(n);
        }
        self.next_nonce += 1;
        let nonce = self.next_nonce.to_string();
        st.outstanding.insert(nonce.clone());
        Some(DeltaDiscoveryResponse {
            system_version_info: String::new(),
            resources,
            type_url: type_url.to_string(),
            removed_resources: removed,
            nonce,
        })
    }

    /// Names and versions the client holds (for `config dump`).
    pub fn held(&self, type_url: &str) -> BTreeMap<String, String> {
        self.types
            .get(type_url)
            .map(|t| t.held.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_proto::rpc;

    const T: &str = "type.googleapis.com/istio.workload.Address";

    fn view(items: &[(&str, &[u8])]) -> View {
        items
            .iter()
            .map(|(n, v)| {
                (
                    n.to_string(),
                    Served::new(n.to_string(), T, v.to_vec(), vec![]),
                )
            })
            .collect()
    }

    fn sub(names: &[&str]) -> DeltaDiscoveryRequest {
        DeltaDiscoveryRequest {
            type_url: T.into(),
            resource_names_subscribe: names.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    fn ack(nonce: &str) -> DeltaDiscoveryRequest {
        DeltaDiscoveryRequest {
            type_url: T.into(),
            response_nonce: nonce.into(),
            ..Default::default()
        }
    }

    fn names(r: &DeltaDiscoveryResponse) -> Vec<&str> {
        r.resources.iter().map(|r| r.name.as_str()).collect()
    }

    #[test]
    fn wildcard_subscription_gets_everything_then_only_changes() {
        let mut s = Session::default();
        assert_eq!(s.on_request(&sub(&["*"])), RequestKind::Subscribe);
        let v1 = view(&[("a", b"1"), ("b", b"1")]);
        let r = s.diff(T, &v1).unwrap();
        assert_eq!(names(&r), vec!["a", "b"]);
        assert_eq!(s.on_request(&ack(&r.nonce)), RequestKind::Ack);
        assert!(s.diff(T, &v1).is_none(), "no change, no push");
        let v2 = view(&[("a", b"2"), ("c", b"1")]);
        let r = s.diff(T, &v2).unwrap();
        assert_eq!(names(&r), vec!["a", "c"], "only what changed");
        assert_eq!(r.removed_resources, vec!["b"]);
    }

    #[test]
    fn named_subscriptions_and_unsubscribe() {
        let mut s = Session::default();
        s.on_request(&sub(&["a"]));
        let v = view(&[("a", b"1"), ("b", b"1")]);
        assert_eq!(names(&s.diff(T, &v).unwrap()), vec!["a"]);
        s.on_request(&sub(&["b"]));
        assert_eq!(names(&s.diff(T, &v).unwrap()), vec!["b"]);
        let mut unsub = sub(&[]);
        unsub.resource_names_unsubscribe = vec!["a".into()];
        s.on_request(&unsub);
        let r = s.diff(T, &v).unwrap();
        assert_eq!(r.removed_resources, vec!["a"]);
        assert!(r.resources.is_empty());
    }

    #[test]
    fn empty_first_request_is_a_wildcard_and_first_sync_is_sent_even_if_empty() {
        let mut s = Session::default();
        s.on_request(&sub(&[]));
        let r = s.diff(T, &View::new()).unwrap();
        assert!(r.resources.is_empty() && r.removed_resources.is_empty());
        assert!(s.diff(T, &View::new()).is_none());
        assert_eq!(names(&s.diff(T, &view(&[("x", b"1")])).unwrap()), vec!["x"]);
    }

    #[test]
    fn nack_and_stale_nonces() {
        let mut s = Session::default();
        s.on_request(&sub(&["*"]));
        let r = s.diff(T, &view(&[("a", b"1")])).unwrap();
        let mut nack = ack(&r.nonce);
        nack.error_detail = Some(rpc::Status {
            code: 3,
            message: "bad a".into(),
            details: vec![],
        });
        assert_eq!(s.on_request(&nack), RequestKind::Nack("bad a".into()));
        assert_eq!(
            s.on_request(&ack(&r.nonce)),
            RequestKind::Stale,
            "each nonce is answered once"
        );
        assert_eq!(s.on_request(&ack("999")), RequestKind::Stale);
        assert!(
            s.diff(T, &view(&[("a", b"1")])).is_none(),
            "the same content is not resent after a NACK"
        );
    }

    #[test]
    fn reconnect_with_initial_versions_skips_unchanged_and_removes_gone() {
        let v = view(&[("a", b"1"), ("b", b"2")]);
        let mut first = Session::default();
        first.on_request(&sub(&["*"]));
        first.diff(T, &v).unwrap();
        let held = first.held(T);
        let mut held_with_gone = held.clone();
        held_with_gone.insert("gone".into(), "v0".into());
        let mut s = Session::default();
        let mut req = sub(&["*"]);
        req.initial_resource_versions = held_with_gone.into_iter().collect();
        s.on_request(&req);
        let v2 = view(&[("a", b"1"), ("b", b"3")]);
        let r = s.diff(T, &v2).unwrap();
        assert_eq!(
            names(&r),
            vec!["b"],
            "a is unchanged since the client's version"
        );
        assert_eq!(r.removed_resources, vec!["gone"]);
    }

    #[test]
    fn versions_follow_content() {
        assert_eq!(content_version(b"abc"), content_version(b"abc"));
        assert_ne!(content_version(b"abc"), content_version(b"abd"));
    }
}
