//! Which connections the server keeps (pure): a cap per peer address so one client
//! cannot take every slot, and at either cap the oldest connection still waiting for its
//! request head (the peer's own, at the peer's cap) makes room. Nothing waits in the kernel's backlog, where a kubelet
//! probe would time out behind idle connections.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

/// A connection's number in the [`Table`], in accept order.
pub type ConnId = u64;

/// What to do with a connection just accepted.
#[derive(Debug, PartialEq, Eq)]
pub enum Admit<H> {
    /// Serve it.
    Serve(ConnId),
    /// Serve it after closing the given connection (one that never sent a request head).
    ServeEvicting(ConnId, H),
    /// Close it: its peer holds its share already, or every slot is serving a request.
    Refuse(Refusal),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    PeerCap,
    Full,
}

struct Entry<H> {
    peer: IpAddr,
    head_received: bool,
    handle: H,
}

/// The connections being served. `H` is how the shell closes one (a notifier).
pub struct Table<H> {
    max_total: usize,
    max_per_peer: usize,
    next: ConnId,
    // Ordered by id, so the first entry without a head is the oldest idle one.
    conns: BTreeMap<ConnId, Entry<H>>,
    per_peer: HashMap<IpAddr, usize>,
}

/// The address a peer is counted under: an IPv4 client of a `[::]` listener appears as
/// `::ffff:a.b.c.d` and is the same peer as `a.b.c.d`.
pub fn peer_key(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

impl<H> Table<H> {
    pub fn new(max_total: usize, max_per_peer: usize) -> Self {
        Table {
            max_total: max_total.max(1),
            max_per_peer: max_per_peer.max(1),
            next: 0,
            conns: BTreeMap::new(),
            per_peer: HashMap::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.conns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    /// Decides on a connection from `peer`; when served, it is in the table until
    /// [`Table::remove`].
    pub fn admit(&mut self, peer: IpAddr, handle: H) -> Admit<H> {
        let peer = peer_key(peer);
        let mut evicted = None;
        // A peer sharing an address with the kubelet (a host-network pod) makes room
        // from its own idle connections rather than shutting the address out.
        if self.per_peer.get(&peer).copied().unwrap_or(0) >= self.max_per_peer {
            let Some(victim) = self.oldest_idle(Some(peer)) else {
                return Admit::Refuse(Refusal::PeerCap);
            };
            evicted = self.remove(victim);
        } else if self.conns.len() >= self.max_total {
            let Some(victim) = self.oldest_idle(None) else {
                return Admit::Refuse(Refusal::Full);
            };
            evicted = self.remove(victim);
        }
        let id = self.next;
        self.next += 1;
        self.conns.insert(
            id,
            Entry {
                peer,
                head_received: false,
                handle,
            },
        );
        *self.per_peer.entry(peer).or_insert(0) += 1;
        match evicted {
            Some(h) => Admit::ServeEvicting(id, h),
            None => Admit::Serve(id),
        }
    }

    fn oldest_idle(&self, of: Option<IpAddr>) -> Option<ConnId> {
        self.conns
            .iter()
            .find(|(_, e)| !e.head_received && of.is_none_or(|p| p == e.peer))
            .map(|(id, _)| *id)
    }

    /// The connection sent a request head: it is serving, not idle, and is not evicted.
    pub fn head_received(&mut self, id: ConnId) {
        if let Some(e) = self.conns.get_mut(&id) {
            e.head_received = true;
        }
    }

    /// Forgets a connection (ended, or evicted); its handle if it was still there.
    pub fn remove(&mut self, id: ConnId) -> Option<H> {
        let e = self.conns.remove(&id)?;
        if let Some(n) = self.per_peer.get_mut(&e.peer) {
            *n -= 1;
            if *n == 0 {
                self.per_peer.remove(&e.peer);
            }
        }
        Some(e.handle)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn one_peer_gets_its_share_only() {
        let mut t = Table::new(10, 2);
        assert_eq!(t.admit(ip("10.0.0.1"), 'a'), Admit::Serve(0));
        assert_eq!(t.admit(ip("10.0.0.1"), 'b'), Admit::Serve(1));
        assert_eq!(t.admit(ip("10.0.0.2"), 'x'), Admit::Serve(2));
        // Over its share: the peer's own oldest idle connection goes, not another's.
        assert_eq!(t.admit(ip("10.0.0.1"), 'c'), Admit::ServeEvicting(3, 'a'));
        // The same client over a [::] listener.
        assert_eq!(
            t.admit(ip("::ffff:10.0.0.1"), 'd'),
            Admit::ServeEvicting(4, 'b')
        );
        // Both of its connections serving a request: refused.
        t.head_received(3);
        t.head_received(4);
        assert_eq!(
            t.admit(ip("10.0.0.1"), 'e'),
            Admit::Refuse(Refusal::PeerCap)
        );
        assert_eq!(t.admit(ip("10.0.0.3"), 'f'), Admit::Serve(5));
        // A connection that ends frees its peer's share.
        assert_eq!(t.remove(3), Some('c'));
        assert_eq!(t.admit(ip("10.0.0.1"), 'g'), Admit::Serve(6));
        assert_eq!(t.len(), 4);
    }

    #[test]
    fn at_the_cap_the_oldest_idle_connection_makes_room() {
        let mut t = Table::new(3, 3);
        assert_eq!(t.admit(ip("10.0.0.1"), 'a'), Admit::Serve(0));
        assert_eq!(t.admit(ip("10.0.0.2"), 'b'), Admit::Serve(1));
        assert_eq!(t.admit(ip("10.0.0.3"), 'c'), Admit::Serve(2));
        // 0 is serving a request: 1 is the oldest idle one.
        t.head_received(0);
        assert_eq!(t.admit(ip("10.0.0.4"), 'd'), Admit::ServeEvicting(3, 'b'));
        assert_eq!(t.len(), 3);
        // The evicted connection's end is a no-op, and its peer's count went down.
        assert_eq!(t.remove(1), None);
        assert_eq!(t.admit(ip("10.0.0.5"), 'e'), Admit::ServeEvicting(4, 'c'));
        // Every slot serving a request: refuse rather than cut a request short.
        t.head_received(3);
        t.head_received(4);
        assert_eq!(t.admit(ip("10.0.0.6"), 'f'), Admit::Refuse(Refusal::Full));
        assert_eq!(t.remove(3), Some('d'));
        assert_eq!(t.admit(ip("10.0.0.6"), 'g'), Admit::Serve(5));
    }

    #[test]
    fn counts_return_to_zero() {
        let mut t = Table::new(4, 1);
        for round in 0..3 {
            let Admit::Serve(id) = t.admit(ip("10.0.0.1"), round) else {
                panic!("round {round}: refused");
            };
            t.remove(id);
        }
        assert!(t.is_empty());
        assert!(t.per_peer.is_empty());
    }
}
