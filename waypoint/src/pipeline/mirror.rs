//! Stage: whether a request's mirrored copy (`RequestMirror`) may be sent, and for how
//! long. A mirror is sent off and never waited for, each holding its copy of the request
//! (the body up to 4 MiB) until the mirror answers, so what mirrors hold together is
//! bounded here: a mirror that answers slowly or never, under many requests, would
//! otherwise grow the waypoint without limit. Past the budget a copy is not sent (the
//! request itself is unaffected) and counted; each copy gives up after [`MIRROR_TIMEOUT`]
//! at the latest.

use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// How long a mirrored copy may take at most (Envoy's default route timeout), shorter
/// when the rule's backend timeout is.
pub const MIRROR_TIMEOUT: Duration = Duration::from_secs(15);

/// Request bytes that the mirrors in flight may hold together.
pub const MIRROR_BUDGET: usize = 64 << 20;

/// What one copy counts against the budget at least, body or not: so at most
/// `MIRROR_BUDGET / MIRROR_MIN_COST` (1,024) copies are in flight, each with its task and
/// upstream stream.
pub const MIRROR_MIN_COST: usize = 64 << 10;

/// The budget is kept in KiB: a semaphore counts in `u32`.
const UNIT: usize = 1024;

/// How much of the budget (in KiB) a copy with a body of `body_len` bytes takes.
pub fn mirror_cost(body_len: usize) -> u32 {
    let kib = body_len.max(MIRROR_MIN_COST).div_ceil(UNIT);
    u32::try_from(kib).unwrap_or(u32::MAX)
}

/// How long a copy may take: the rule's backend timeout if it has a shorter one.
pub fn mirror_timeout(backend_timeout: Option<Duration>) -> Duration {
    backend_timeout.map_or(MIRROR_TIMEOUT, |t| t.min(MIRROR_TIMEOUT))
}

/// The waypoint's mirror budget: a copy is sent only with a place in it, held until the
/// copy ends.
#[derive(Debug)]
pub struct MirrorLimit {
    places: Arc<Semaphore>,
}

impl MirrorLimit {
    /// A budget of `bytes` (rounded down to whole KiB).
    pub fn new(bytes: usize) -> Self {
        MirrorLimit {
            places: Arc::new(Semaphore::new((bytes / UNIT).min(Semaphore::MAX_PERMITS))),
        }
    }

    /// A place for a copy with a body of `body_len` bytes, if the budget has room now
    /// (never waits: a mirror must not hold up the request it copies).
    pub fn try_take(&self, body_len: usize) -> Option<OwnedSemaphorePermit> {
        self.places
            .clone()
            .try_acquire_many_owned(mirror_cost(body_len))
            .ok()
    }

    /// The part of the budget no copy holds now, in bytes.
    pub fn free(&self) -> usize {
        self.places.available_permits() * UNIT
    }
}

impl Default for MirrorLimit {
    fn default() -> Self {
        MirrorLimit::new(MIRROR_BUDGET)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_costs_its_body_and_at_least_the_minimum() {
        assert_eq!(mirror_cost(0), 64);
        assert_eq!(mirror_cost(MIRROR_MIN_COST), 64);
        assert_eq!(mirror_cost(MIRROR_MIN_COST + 1), 65);
        assert_eq!(mirror_cost(4 << 20), 4096);
        assert_eq!(mirror_cost(usize::MAX), u32::MAX);
    }

    #[test]
    fn the_budget_bounds_copies_in_flight_by_count_and_by_bytes() {
        let limit = MirrorLimit::default();
        // Bodiless copies: 1,024 at most.
        let held: Vec<_> = (0..1024).map_while(|_| limit.try_take(0)).collect();
        assert_eq!(held.len(), MIRROR_BUDGET / MIRROR_MIN_COST);
        assert!(limit.try_take(0).is_none(), "the 1,025th copy is not sent");
        // A copy that ends gives its place back.
        drop(held);
        // 4 MiB bodies: 16 at most.
        let big: Vec<_> = (0..100).map_while(|_| limit.try_take(4 << 20)).collect();
        assert_eq!(big.len(), 16);
        assert!(limit.try_take(0).is_none());
        drop(big);
        assert!(limit.try_take(4 << 20).is_some());
    }

    #[test]
    fn a_copy_never_waits_longer_than_the_bound() {
        assert_eq!(mirror_timeout(None), MIRROR_TIMEOUT);
        let short = Duration::from_millis(200);
        assert_eq!(mirror_timeout(Some(short)), short);
        assert_eq!(
            mirror_timeout(Some(Duration::from_secs(3600))),
            MIRROR_TIMEOUT
        );
    }
}
