//! Connection-pool bookkeeping, free of I/O: which HTTP/2 connection a new stream goes
//! on, when another connection is needed, and when idle ones are let go.

use mesh_identity::SpiffeId;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Connections are shared only between requests that agree on all four.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PoolKey {
    /// Identity we present.
    pub src_id: SpiffeId,
    /// Identities the server may present (sorted, so order does not split the pool).
    pub dst_ids: Vec<SpiffeId>,
    /// Next hop, normally `ip:15008`.
    pub dst: SocketAddr,
    /// Local source IP, when the socket is bound to one (the pod's IP).
    pub src_ip: Option<IpAddr>,
}

impl PoolKey {
    pub fn new(
        src_id: SpiffeId,
        mut dst_ids: Vec<SpiffeId>,
        dst: SocketAddr,
        src_ip: Option<IpAddr>,
    ) -> Self {
        dst_ids.sort();
        dst_ids.dedup();
        PoolKey {
            src_id,
            dst_ids,
            dst,
            src_ip,
        }
    }
}

pub type ConnId = u64;

#[derive(Debug)]
struct Entry<C> {
    id: ConnId,
    /// The key this connection is pooled under, shared with its streams (they give their
    /// slot back by it) rather than copied for each.
    key: Arc<PoolKey>,
    conn: C,
    active: usize,
    limit: usize,
    idle_since: Option<Instant>,
}

/// The pool's ledger. `C` is the connection handle (an h2 `SendRequest` in the client).
#[derive(Debug)]
pub struct PoolBook<C> {
    conns: HashMap<Arc<PoolKey>, Vec<Entry<C>>>,
    next_id: ConnId,
    idle_timeout: Duration,
}

impl<C: Clone> PoolBook<C> {
    pub fn new(idle_timeout: Duration) -> Self {
        PoolBook {
            conns: HashMap::new(),
            next_id: 1,
            idle_timeout,
        }
    }

    /// Takes a stream slot on an existing connection with room, if any, with the key that
    /// connection is pooled under (shared: a stream gives its slot back by it).
    pub fn checkout(&mut self, key: &PoolKey) -> Option<(ConnId, C, Arc<PoolKey>)> {
        let entries = self.conns.get_mut(key)?;
        // Prefer the busiest connection with room, so idle ones can age out.
        let e = entries
            .iter_mut()
            .filter(|e| e.active < e.limit)
            .max_by_key(|e| e.active)?;
        e.active += 1;
        e.idle_since = None;
        Some((e.id, e.conn.clone(), e.key.clone()))
    }

    /// Records a new connection with one stream already taken.
    pub fn insert(&mut self, key: Arc<PoolKey>, conn: C, limit: usize) -> ConnId {
        let id = self.next_id;
        self.next_id += 1;
        self.conns.entry(key.clone()).or_default().push(Entry {
            id,
            key,
            conn,
            active: 1,
            limit: limit.max(1),
            idle_since: None,
        });
        id
    }

    /// A stream ended.
    pub fn release(&mut self, key: &PoolKey, id: ConnId, now: Instant) {
        if let Some(e) = self
            .conns
            .get_mut(key)
            .and_then(|v| v.iter_mut().find(|e| e.id == id))
        {
            e.active = e.active.saturating_sub(1);
            if e.active == 0 {
                e.idle_since = Some(now);
            }
        }
    }

    /// The connection is unusable (GOAWAY, error, closed): never hand it out again.
    pub fn evict(&mut self, key: &PoolKey, id: ConnId) -> Option<C> {
        let entries = self.conns.get_mut(key)?;
        let pos = entries.iter().position(|e| e.id == id)?;
        let e = entries.swap_remove(pos);
        if entries.is_empty() {
            self.conns.remove(key);
        }
        Some(e.conn)
    }

    /// Removes connections idle for longer than the timeout and returns them to be closed.
    pub fn expire_idle(&mut self, now: Instant) -> Vec<C> {
        let mut out = Vec::new();
        let timeout = self.idle_timeout;
        self.conns.retain(|_, entries| {
            entries.retain(|e| {
                let expired = e
                    .idle_since
                    .is_some_and(|t| now.saturating_duration_since(t) >= timeout);
                if expired {
                    out.push(e.conn.clone());
                }
                !expired
            });
            !entries.is_empty()
        });
        out
    }

    /// Number of connections (all keys).
    pub fn connections(&self) -> usize {
        self.conns.values().map(Vec::len).sum()
    }

    /// Open streams on each connection of `key`.
    pub fn streams(&self, key: &PoolKey) -> Vec<usize> {
        self.conns
            .get(key)
            .map(|v| v.iter().map(|e| e.active).collect())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(port: u16) -> PoolKey {
        let id = |sa: &str| SpiffeId::new("td", "ns", sa).unwrap();
        PoolKey::new(
            id("a"),
            vec![id("c"), id("b")],
            SocketAddr::from(([10, 0, 0, 2], port)),
            None,
        )
    }

    #[test]
    fn key_ignores_identity_order() {
        let id = |sa: &str| SpiffeId::new("td", "ns", sa).unwrap();
        let k2 = PoolKey::new(
            id("a"),
            vec![id("b"), id("c"), id("b")],
            SocketAddr::from(([10, 0, 0, 2], 15008)),
            None,
        );
        assert_eq!(key(15008), k2);
    }

    #[test]
    fn fills_a_connection_then_opens_another() {
        let mut book = PoolBook::new(Duration::from_secs(300));
        let k = key(15008);
        assert!(book.checkout(&k).is_none(), "empty pool: caller must open");
        let c1 = book.insert(Arc::new(k.clone()), "c1", 3);
        assert_eq!(book.checkout(&k).unwrap().1, "c1");
        assert_eq!(book.checkout(&k).unwrap().1, "c1");
        assert!(book.checkout(&k).is_none(), "c1 is at its limit of 3");
        let c2 = book.insert(Arc::new(k.clone()), "c2", 3);
        assert_eq!(book.streams(&k), vec![3, 1]);
        // Busiest-with-room first: c2 now.
        assert_eq!(
            book.checkout(&k).map(|(id, c, _)| (id, c)),
            Some((c2, "c2"))
        );
        book.release(&k, c1, Instant::now());
        // c1 has room again and is busier than c2 (2 vs 2 → either); both are valid.
        assert!(book.checkout(&k).is_some());
        // Other keys are separate.
        assert!(book.checkout(&key(15009)).is_none());
    }

    #[test]
    fn streams_share_their_connections_key() {
        let mut book = PoolBook::new(Duration::from_secs(300));
        let k = key(15008);
        let pooled = Arc::new(k.clone());
        book.insert(pooled.clone(), "c1", 10);
        for _ in 0..3 {
            let (_, _, shared) = book.checkout(&k).unwrap();
            assert!(
                Arc::ptr_eq(&shared, &pooled),
                "a copy of the key per stream"
            );
        }
    }

    #[test]
    fn evicted_connections_are_never_reused() {
        let mut book = PoolBook::new(Duration::from_secs(300));
        let k = key(15008);
        let c1 = book.insert(Arc::new(k.clone()), "c1", 100);
        assert_eq!(book.evict(&k, c1), Some("c1"));
        assert!(book.checkout(&k).is_none());
        assert_eq!(book.connections(), 0);
        assert_eq!(book.evict(&k, c1), None);
    }

    #[test]
    fn idle_connections_expire_busy_ones_stay() {
        let mut book = PoolBook::new(Duration::from_secs(300));
        let k = key(15008);
        let t0 = Instant::now();
        let idle = book.insert(Arc::new(k.clone()), "idle", 10);
        let _busy = book.insert(Arc::new(k.clone()), "busy", 10);
        book.release(&k, idle, t0);
        assert!(book.expire_idle(t0 + Duration::from_secs(299)).is_empty());
        assert_eq!(
            book.expire_idle(t0 + Duration::from_secs(300)),
            vec!["idle"]
        );
        assert_eq!(book.connections(), 1);
        // Reuse clears the idle clock.
        let (id, _, _) = book.checkout(&k).unwrap();
        book.release(&k, id, t0);
        book.checkout(&k).unwrap();
        assert!(book.expire_idle(t0 + Duration::from_secs(1000)).is_empty());
    }
}
