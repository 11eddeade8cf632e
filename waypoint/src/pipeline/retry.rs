//! Stage: whether a try's outcome is tried again (the rule's retry codes and attempts,
//! a retry budget shared by the waypoint), and how long to wait first.

use super::UpstreamError;
use crate::route::Retry;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

/// The backoff when the rule says none.
pub const DEFAULT_BACKOFF: Duration = Duration::from_millis(25);

/// Retries may add at most 20% (and at least 3 concurrent) on top of the requests in
/// flight, so a failing backend is not hammered by its own retries.
#[derive(Default, Debug)]
pub struct RetryBudget {
    in_flight: AtomicUsize,
    retrying: AtomicUsize,
}

impl RetryBudget {
    pub fn request_started(&self) {
        self.in_flight.fetch_add(1, Relaxed);
    }
    pub fn request_done(&self) {
        self.in_flight.fetch_sub(1, Relaxed);
    }
    /// Takes a place for one retry, if the budget has one.
    pub fn try_retry(&self) -> bool {
        let allowed = (self.in_flight.load(Relaxed) / 5).max(3);
        if self.retrying.fetch_add(1, Relaxed) < allowed {
            true
        } else {
            self.retrying.fetch_sub(1, Relaxed);
            false
        }
    }
    pub fn retry_done(&self) {
        self.retrying.fetch_sub(1, Relaxed);
    }
}

/// Whether the outcome of a try (its status, or why there is none) calls for another.
pub fn retriable(outcome: Result<http::StatusCode, &UpstreamError>, retry: &Retry) -> bool {
    match outcome {
        Ok(status) => retry.codes.contains(&status.as_u16()),
        Err(e) => e.retriable(),
    }
}

/// Whether to try again after `tried` retries: the outcome calls for it, attempts remain
/// and (checked last, since it takes a place) the budget allows it.
pub fn again(retriable: bool, tried: u32, retry: &Retry, budget: &RetryBudget) -> bool {
    retriable && tried < retry.attempts && budget.try_retry()
}

/// The wait before a retry: the backoff jittered by `roll` in [0, 1) to 75%–125%.
pub fn backoff(base: Duration, roll: f64) -> Duration {
    base.mul_f64(roll * 0.5 + 0.75)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::StatusCode;

    fn retry(attempts: u32, codes: &[u16]) -> Retry {
        Retry {
            codes: codes.to_vec(),
            attempts,
            backoff: DEFAULT_BACKOFF,
        }
    }

    #[test]
    fn conditions() {
        let r = retry(2, &[500, 503]);
        assert!(retriable(Ok(StatusCode::SERVICE_UNAVAILABLE), &r));
        assert!(
            !retriable(Ok(StatusCode::BAD_GATEWAY), &r),
            "502 is not in the codes"
        );
        assert!(!retriable(Ok(StatusCode::OK), &r));
        assert!(retriable(
            Err(&UpstreamError::Connect("refused".into())),
            &r
        ));
        assert!(retriable(Err(&UpstreamError::Timeout), &r));
        assert!(!retriable(
            Err(&UpstreamError::BodyTooLarge("big".into())),
            &r
        ));
    }

    #[test]
    fn attempts_and_budget() {
        let r = retry(2, &[503]);
        let budget = RetryBudget::default();
        assert!(!again(false, 0, &r, &budget), "not retriable");
        assert!(again(true, 0, &r, &budget));
        assert!(again(true, 1, &r, &budget));
        assert!(!again(true, 2, &r, &budget), "attempts used up");
        // Two places taken above; the budget allows 3 with nothing in flight.
        assert!(again(true, 0, &r, &budget));
        assert!(!again(true, 0, &r, &budget), "the budget is spent");
        budget.retry_done();
        assert!(again(true, 0, &r, &budget), "a place came back");
        // 20% of the requests in flight once that is more than 3.
        let big = RetryBudget::default();
        for _ in 0..25 {
            big.request_started();
        }
        let taken = (0..10).filter(|_| big.try_retry()).count();
        assert_eq!(taken, 5);
    }

    #[test]
    fn backoff_is_jittered_within_a_quarter() {
        let base = Duration::from_millis(100);
        assert_eq!(backoff(base, 0.0), Duration::from_millis(75));
        assert_eq!(backoff(base, 0.5), Duration::from_millis(100));
        assert!(backoff(base, 0.999) < Duration::from_millis(125));
    }
}
