//! Stage: the rule's fault injection (as Envoy's fault filter, before the router):
//! delay, then abort, each for its percentage of requests.

use crate::route::{self, Fault};
use http::StatusCode;
use std::time::Duration;

/// What the fault filter does to one request.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Injected {
    pub delay: Option<Duration>,
    pub abort: Option<StatusCode>,
}

/// Decides for one request; `roll()` is uniform in [0, 100), drawn once for the delay
/// and once for the abort.
pub fn decide(fault: &Fault, mut roll: impl FnMut() -> f64) -> Injected {
    let delay = fault
        .delay
        .and_then(|(d, pct)| route::fault_applies(pct, roll()).then_some(d));
    let abort = fault.abort.and_then(|(status, pct)| {
        route::fault_applies(pct, roll())
            .then(|| StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
    });
    Injected { delay, abort }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delay_and_abort_by_percentage() {
        let f = Fault {
            delay: Some((Duration::from_millis(50), Some(25.0))),
            abort: Some((418, None)),
        };
        let mut rolls = [10.0, 99.0].into_iter();
        assert_eq!(
            decide(&f, || rolls.next().unwrap()),
            Injected {
                delay: Some(Duration::from_millis(50)),
                abort: Some(StatusCode::IM_A_TEAPOT)
            },
            "10 is within 25%; no percentage means every request"
        );
        let mut rolls = [30.0, 0.0].into_iter();
        assert_eq!(
            decide(&f, || rolls.next().unwrap()).delay,
            None,
            "30 is past 25%"
        );
        let half = Fault {
            delay: None,
            abort: Some((503, Some(50.0))),
        };
        assert_eq!(
            decide(&half, || 49.0).abort,
            Some(StatusCode::SERVICE_UNAVAILABLE)
        );
        assert_eq!(decide(&half, || 50.0).abort, None);
        assert_eq!(decide(&Fault::default(), || 0.0), Injected::default());
    }

    #[test]
    fn an_unusable_abort_status_answers_500() {
        let f = Fault {
            delay: None,
            abort: Some((1000, None)),
        };
        assert_eq!(
            decide(&f, || 0.0).abort,
            Some(StatusCode::INTERNAL_SERVER_ERROR)
        );
    }
}
