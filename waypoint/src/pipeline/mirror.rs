//! Stage: whether a request's mirrored copy (`RequestMirror`) may be sent, and for how
//! long. A mirror is sent off and never waited for, each holding its copy of the request
//! (its head, and its body up to 4 MiB) until the mirror answers and has taken the body,
//! so what mirrors hold together is bounded here: a mirror that answers slowly or never,
//! under many requests, would otherwise grow the waypoint without limit. Past the budget
//! a copy is not sent (the request itself is unaffected) and counted; each copy gives up
//! after the rule's timeouts, [`MIRROR_TIMEOUT`] at the latest.

use crate::body::Body;
use bytes::Bytes;
use hyper::body::{Frame, SizeHint};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
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

/// The bytes a copy of a request keeps: its body, its URI and its headers (whose values
/// share the buffer the request's head was read into, kept alive by every copy).
pub fn request_bytes(parts: &http::request::Parts, body_len: usize) -> usize {
    let uri = parts.uri.authority().map_or(0, |a| a.as_str().len())
        + parts.uri.path_and_query().map_or(0, |p| p.as_str().len());
    let headers: usize = parts
        .headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len())
        .sum();
    body_len.saturating_add(uri).saturating_add(headers)
}

/// How much of the budget (in KiB) a copy of `bytes` bytes ([`request_bytes`]) takes.
pub fn mirror_cost(bytes: usize) -> u32 {
    let kib = bytes.max(MIRROR_MIN_COST).div_ceil(UNIT);
    u32::try_from(kib).unwrap_or(u32::MAX)
}

/// How long a copy may take: the rule's request or backend timeout if shorter.
pub fn mirror_timeout(request: Option<Duration>, backend: Option<Duration>) -> Duration {
    [request, backend]
        .into_iter()
        .flatten()
        .fold(MIRROR_TIMEOUT, Duration::min)
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

    /// A place for a copy of `bytes` bytes ([`request_bytes`]), if the budget has room now
    /// (never waits: a mirror must not hold up the request it copies). Freed once every
    /// holder (the copy's task, its body) is gone.
    pub fn try_take(&self, bytes: usize) -> Option<Place> {
        self.places
            .clone()
            .try_acquire_many_owned(mirror_cost(bytes))
            .ok()
            .map(|permit| Place {
                _held: Arc::new(permit),
            })
    }

    /// The part of the budget no copy holds now, in bytes.
    pub fn free(&self) -> usize {
        self.places.available_permits() * UNIT
    }
}

/// A copy's place in the budget: the copy's task holds it until the copy ends, and its
/// body ([`Place::hold_body`]) until the upstream has taken or dropped it (HTTP/2 sends a
/// body on after the answer, for as long as the peer's flow control lets it).
#[derive(Debug, Clone)]
pub struct Place {
    _held: Arc<OwnedSemaphorePermit>,
}

impl Place {
    pub fn hold_body(&self, body: Body) -> Body {
        use http_body_util::BodyExt;
        HeldBody {
            inner: body,
            _place: self.clone(),
        }
        .boxed()
    }
}

/// A body that keeps its copy's place until it is dropped.
struct HeldBody {
    inner: Body,
    _place: Place,
}

impl hyper::body::Body for HeldBody {
    type Data = Bytes;
    type Error = <Body as hyper::body::Body>::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
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
    fn a_copy_never_waits_longer_than_the_rule_or_the_bound() {
        assert_eq!(mirror_timeout(None, None), MIRROR_TIMEOUT);
        let (short, shorter) = (Duration::from_millis(200), Duration::from_millis(100));
        assert_eq!(mirror_timeout(Some(short), None), short);
        assert_eq!(mirror_timeout(None, Some(short)), short);
        assert_eq!(mirror_timeout(Some(short), Some(shorter)), shorter);
        assert_eq!(mirror_timeout(Some(shorter), Some(short)), shorter);
        let long = Some(Duration::from_secs(3600));
        assert_eq!(mirror_timeout(long, long), MIRROR_TIMEOUT);
    }

    #[test]
    fn a_copy_counts_its_head_as_well_as_its_body() {
        let big = "x".repeat(300 << 10);
        let req = http::Request::builder()
            .uri("http://api.shop/path?q=1")
            .header("x-big", big.as_str())
            .body(())
            .unwrap();
        let (parts, ()) = req.into_parts();
        let bytes = request_bytes(&parts, 10);
        assert!(bytes >= (300 << 10) + 10, "{bytes}");
        assert!(mirror_cost(bytes) > 300, "{}", mirror_cost(bytes));
        assert_eq!(request_bytes(&parts, usize::MAX), usize::MAX);
    }

    /// The place is free only once the task's and the body's holds are both gone.
    #[tokio::test]
    async fn a_place_is_held_by_the_copy_and_by_its_body() {
        let limit = MirrorLimit::new(MIRROR_MIN_COST);
        let place = limit.try_take(0).expect("room for one");
        let body = place.hold_body(crate::body::full("copy"));
        drop(place);
        assert!(limit.try_take(0).is_none(), "the body still holds it");
        assert_eq!(limit.free(), 0);
        drop(body);
        assert_eq!(limit.free(), MIRROR_MIN_COST);
    }
}
