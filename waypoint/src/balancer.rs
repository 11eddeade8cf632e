//! Choosing an endpoint per request: power of two choices on outstanding requests among
//! endpoints not ejected; passive outlier ejection after consecutive 5xx or connection
//! failures (Istio's `consecutive5xxErrors` behaviour, ejection time growing with each
//! ejection, at most a bounded share of a service's endpoints); and a per-service limit
//! of requests in flight, beyond which requests fail fast (503) instead of queueing.
//!
//! The decisions are pure functions of the state and the random rolls passed in, so they
//! are tested without sockets.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct BalancerConfig {
    /// Consecutive failures that eject an endpoint.
    pub consecutive_errors: u32,
    /// First ejection time; the n-th ejection lasts n times this (capped at 10×).
    pub base_ejection: Duration,
    /// At most this share of a service's endpoints is ejected (at least one may be).
    pub max_ejection_percent: usize,
    /// Requests in flight per service before new ones are refused.
    pub max_requests_per_service: usize,
}

impl Default for BalancerConfig {
    fn default() -> Self {
        BalancerConfig {
            consecutive_errors: 5,
            base_ejection: Duration::from_secs(30),
            max_ejection_percent: 50,
            max_requests_per_service: 4096,
        }
    }
}

#[derive(Default, Debug)]
struct Host {
    outstanding: usize,
    consecutive_failures: u32,
    ejected_until: Option<Instant>,
    times_ejected: u32,
}

impl Host {
    fn ejected(&self, now: Instant) -> bool {
        self.ejected_until.is_some_and(|t| now < t)
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Choice {
    /// Index into the candidates.
    Endpoint(usize),
    NoEndpoint,
    /// The service already has `max_requests_per_service` requests in flight.
    Overflow,
}

#[derive(Debug, Default)]
pub struct Balancer {
    cfg: BalancerConfig,
    hosts: Mutex<HashMap<String, Host>>,
}

/// A request in flight to an endpoint; dropping it ends the request.
pub struct InFlight {
    balancer: Arc<Balancer>,
    uid: String,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut hosts = self.balancer.hosts.lock().expect("balancer lock");
        if let Some(h) = hosts.get_mut(&self.uid) {
            h.outstanding = h.outstanding.saturating_sub(1);
        }
    }
}

impl Balancer {
    pub fn new(cfg: BalancerConfig) -> Self {
        Balancer {
            cfg,
            hosts: Mutex::new(HashMap::new()),
        }
    }

    /// Picks among `uids` (one service's candidate endpoints) with two random rolls.
    pub fn choose(&self, uids: &[&str], rolls: (usize, usize), now: Instant) -> Choice {
        if uids.is_empty() {
            return Choice::NoEndpoint;
        }
        let hosts = self.hosts.lock().expect("balancer lock");
        let load = |uid: &str| hosts.get(uid).map_or(0, |h| h.outstanding);
        let in_flight: usize = uids.iter().map(|u| load(u)).sum();
        if in_flight >= self.cfg.max_requests_per_service {
            return Choice::Overflow;
        }
        let mut eligible: Vec<usize> = (0..uids.len())
            .filter(|&i| !hosts.get(uids[i]).is_some_and(|h| h.ejected(now)))
            .collect();
        if eligible.is_empty() {
            // Every endpoint ejected: trying one beats failing every request.
            eligible = (0..uids.len()).collect();
        }
        let n = eligible.len();
        if n == 1 {
            return Choice::Endpoint(eligible[0]);
        }
        let a = rolls.0 % n;
        let mut b = rolls.1 % (n - 1);
        if b >= a {
            b += 1;
        }
        let (a, b) = (eligible[a], eligible[b]);
        Choice::Endpoint(if load(uids[b]) < load(uids[a]) { b } else { a })
    }

    /// Counts a request to `uid` as in flight until the guard is dropped.
    pub fn begin(self: &Arc<Self>, uid: &str) -> InFlight {
        self.hosts
            .lock()
            .expect("balancer lock")
            .entry(uid.to_string())
            .or_default()
            .outstanding += 1;
        InFlight {
            balancer: self.clone(),
            uid: uid.to_string(),
        }
    }

    /// Records how a request to `uid` (one of `service_uids`) ended. Returns true when
    /// this ejected it.
    pub fn report(&self, uid: &str, ok: bool, service_uids: &[&str], now: Instant) -> bool {
        let mut hosts = self.hosts.lock().expect("balancer lock");
        let ejected_now = service_uids
            .iter()
            .filter(|u| hosts.get(**u).is_some_and(|h| h.ejected(now)))
            .count();
        let max_ejected = (service_uids.len() * self.cfg.max_ejection_percent / 100).max(1);
        let h = hosts.entry(uid.to_string()).or_default();
        if ok {
            h.consecutive_failures = 0;
            return false;
        }
        h.consecutive_failures += 1;
        if h.consecutive_failures < self.cfg.consecutive_errors
            || h.ejected(now)
            || ejected_now >= max_ejected
        {
            return false;
        }
        h.times_ejected += 1;
        h.consecutive_failures = 0;
        h.ejected_until = Some(now + self.cfg.base_ejection * h.times_ejected.min(10));
        true
    }

    /// Forgets endpoints no longer in any service.
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        self.hosts
            .lock()
            .expect("balancer lock")
            .retain(|uid, h| h.outstanding > 0 || keep(uid));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> BalancerConfig {
        BalancerConfig {
            consecutive_errors: 3,
            base_ejection: Duration::from_secs(10),
            max_ejection_percent: 50,
            max_requests_per_service: 4,
        }
    }

    #[test]
    fn two_choices_prefer_the_less_loaded() {
        let b = Arc::new(Balancer::new(cfg()));
        let now = Instant::now();
        let uids = ["a", "b", "c"];
        let _busy = b.begin("a");
        // Rolls picking a and b: b has fewer requests in flight.
        assert_eq!(b.choose(&uids, (0, 0), now), Choice::Endpoint(1));
        // Rolls picking b and a (order swapped): still b.
        assert_eq!(b.choose(&uids, (1, 0), now), Choice::Endpoint(1));
        // Equal load: the first roll wins.
        assert_eq!(b.choose(&uids, (1, 1), now), Choice::Endpoint(1));
        assert_eq!(b.choose(&uids, (2, 0), now), Choice::Endpoint(2));
        assert_eq!(b.choose(&[], (0, 0), now), Choice::NoEndpoint);
    }

    #[test]
    fn in_flight_requests_end_with_their_guard_and_overflow_fails_fast() {
        let b = Arc::new(Balancer::new(cfg()));
        let now = Instant::now();
        let guards: Vec<_> = (0..4).map(|_| b.begin("a")).collect();
        assert_eq!(b.choose(&["a", "b"], (0, 0), now), Choice::Overflow);
        drop(guards);
        assert_eq!(b.choose(&["a", "b"], (0, 0), now), Choice::Endpoint(0));
    }

    #[test]
    fn consecutive_failures_eject_for_growing_times_within_the_cap() {
        let b = Balancer::new(cfg());
        let t0 = Instant::now();
        let uids = ["a", "b", "c", "d"];
        assert!(!b.report("a", false, &uids, t0));
        assert!(
            !b.report("a", true, &uids, t0),
            "a success resets the count"
        );
        assert!(!b.report("a", false, &uids, t0));
        assert!(!b.report("a", false, &uids, t0));
        assert!(
            b.report("a", false, &uids, t0),
            "third consecutive failure ejects"
        );
        // Never chosen while ejected, whatever the rolls.
        for r in 0..12 {
            assert_ne!(b.choose(&uids, (r, r + 1), t0), Choice::Endpoint(0));
        }
        // Back after the ejection time; a second ejection lasts twice as long.
        let t1 = t0 + Duration::from_secs(11);
        assert_eq!(b.choose(&["a"], (0, 0), t1), Choice::Endpoint(0));
        for _ in 0..3 {
            b.report("a", false, &uids, t1);
        }
        let t2 = t1 + Duration::from_secs(15);
        assert!(b.choose(&uids, (0, 1), t2) != Choice::Endpoint(0));
        assert!(b.hosts.lock().unwrap()["a"].ejected(t2));
        assert!(!b.hosts.lock().unwrap()["a"].ejected(t1 + Duration::from_secs(21)));

        // At most half of the endpoints: b is ejected, c is not.
        for _ in 0..3 {
            b.report("b", false, &uids, t2);
        }
        for _ in 0..3 {
            assert!(!b.report("c", false, &uids, t2), "max ejection reached");
        }
    }

    #[test]
    fn all_ejected_still_routes() {
        let b = Balancer::new(cfg());
        let t0 = Instant::now();
        for _ in 0..3 {
            b.report("only", false, &["only"], t0);
        }
        assert!(b.hosts.lock().unwrap()["only"].ejected(t0));
        assert_eq!(b.choose(&["only"], (5, 7), t0), Choice::Endpoint(0));
    }
}
