//! Leader election with a `coordination.k8s.io/v1` Lease, as client-go does it: the
//! holder renews `spec.renewTime` every `renew_every`; another replica takes over once
//! the record has not changed for `leaseDurationSeconds` by its own clock (so clocks
//! need not agree), writing with the resourceVersion it read (a race loses with 409).
//! Used so that one mesh-control replica deploys waypoints; every replica serves xDS.

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, ObjectMeta, PostParams};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// (group, plural) of the Lease, for RBAC (`crate::rbac`).
pub const LEASES: (&str, &str) = ("coordination.k8s.io", "leases");

#[derive(Clone, Debug, serde::Serialize)]
pub struct LeaseConfig {
    /// Where the Lease lives (mesh-control's own namespace).
    pub namespace: String,
    pub name: String,
    /// This replica (its pod name).
    pub identity: String,
    /// Written as `leaseDurationSeconds`: how long a silent holder keeps the lease.
    pub duration: Duration,
    /// How often the holder renews and the others look.
    pub renew_every: Duration,
}

/// What to do after reading the Lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// No Lease yet: create it, holding it.
    Create,
    /// Ours: renew it.
    Renew,
    /// Free, or its holder went silent: take it over.
    TakeOver,
    /// Someone else holds it.
    Follow(String),
}

/// Decides from the Lease's holder and duration, and how long its record has stayed the
/// same as this replica saw it (`unchanged_for`, by the local clock).
pub fn decide(holder: Option<&str>, duration: Duration, me: &str, unchanged_for: Duration) -> Step {
    match holder.filter(|h| !h.is_empty()) {
        Some(h) if h == me => Step::Renew,
        None => Step::TakeOver,
        Some(_) if unchanged_for >= duration => Step::TakeOver,
        Some(h) => Step::Follow(h.to_string()),
    }
}

/// Whether a leader that last renewed `since_renewal` ago must stop acting: before its
/// lease could have expired for the others (two thirds of it, client-go's margin).
pub fn must_step_down(since_renewal: Duration, duration: Duration) -> bool {
    since_renewal >= duration * 2 / 3
}

fn now_micro() -> MicroTime {
    MicroTime(k8s_openapi::jiff::Timestamp::now())
}

/// How long one round may take before it is abandoned. A leader's round must end before
/// it has to step down (its last renewal plus two thirds of the lease), so a stalled API
/// call (kube's read timeout is minutes) can never keep it acting after the others may
/// have taken over. A follower's round is bounded the same way, from now.
pub fn step_budget(since_renewal: Option<Duration>, duration: Duration) -> Duration {
    let margin = duration * 2 / 3;
    match since_renewal {
        Some(s) => margin.saturating_sub(s),
        None => margin,
    }
}

/// Keeps trying to hold the Lease; `leader` says whether this replica holds it now.
pub async fn run(client: kube::Client, cfg: LeaseConfig, leader: watch::Sender<bool>) {
    let api: Api<Lease> = Api::namespaced(client, &cfg.namespace);
    // The record last seen (holder, renewTime) and since when, by our clock.
    let mut seen: Option<(String, Instant)> = None;
    let mut renewed: Option<Instant> = None;
    let mut tick = tokio::time::interval(cfg.renew_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        // Counted from before the request: the others see the renewal no earlier.
        let started = Instant::now();
        let budget = step_budget(renewed.map(|r| r.elapsed()), cfg.duration);
        let outcome = tokio::time::timeout(budget, step(&api, &cfg, &mut seen)).await;
        let held = match outcome {
            Ok(Ok(true)) => {
                renewed = Some(started);
                true
            }
            Ok(Ok(false)) => false,
            Ok(Err(e)) => {
                tracing::warn!(lease = %cfg.name, error = %e, "leader election: cannot read or write the Lease");
                // Keep acting only while the others cannot have taken over yet.
                renewed.is_some_and(|r| !must_step_down(r.elapsed(), cfg.duration))
            }
            Err(_) => {
                tracing::warn!(lease = %cfg.name, after = ?budget, "leader election: the API server did not answer in time");
                false
            }
        };
        if !held {
            renewed = None;
        }
        leader.send_if_modified(|l| {
            let changed = *l != held;
            if changed {
                tracing::info!(lease = %cfg.name, identity = %cfg.identity, leader = held, "leader election");
            }
            *l = held;
            changed
        });
    }
}

/// One round: read, decide, write. Ok(true) when we hold the Lease after it.
async fn step(
    api: &Api<Lease>,
    cfg: &LeaseConfig,
    seen: &mut Option<(String, Instant)>,
) -> Result<bool, kube::Error> {
    let current = api.get_opt(&cfg.name).await?;
    let spec = current
        .as_ref()
        .and_then(|l| l.spec.clone())
        .unwrap_or_default();
    let record = format!(
        "{:?}|{:?}",
        spec.holder_identity,
        spec.renew_time.as_ref().map(|t| t.0.to_string())
    );
    let unchanged_for = match seen {
        Some((r, at)) if *r == record => at.elapsed(),
        _ => {
            *seen = Some((record, Instant::now()));
            Duration::ZERO
        }
    };
    let duration = spec
        .lease_duration_seconds
        .map(|s| Duration::from_secs(s.max(1) as u64))
        .unwrap_or(cfg.duration);
    let step = match &current {
        None => Step::Create,
        Some(_) => decide(
            spec.holder_identity.as_deref(),
            duration,
            &cfg.identity,
            unchanged_for,
        ),
    };
    let now = now_micro();
    let mine = |acquire: Option<MicroTime>, transitions: i32| LeaseSpec {
        holder_identity: Some(cfg.identity.clone()),
        lease_duration_seconds: Some(cfg.duration.as_secs().max(1) as i32),
        acquire_time: acquire,
        renew_time: Some(now.clone()),
        lease_transitions: Some(transitions),
        ..Default::default()
    };
    let written = match step {
        Step::Follow(_) => return Ok(false),
        Step::Create => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(cfg.name.clone()),
                    namespace: Some(cfg.namespace.clone()),
                    ..Default::default()
                },
                spec: Some(mine(Some(now.clone()), 0)),
            };
            api.create(&PostParams::default(), &lease).await
        }
        Step::Renew | Step::TakeOver => {
            let mut lease = current.expect("read above");
            let transitions = spec.lease_transitions.unwrap_or(0);
            lease.spec = Some(if step == Step::Renew {
                mine(spec.acquire_time.clone(), transitions)
            } else {
                mine(Some(now.clone()), transitions + 1)
            });
            // Carries the resourceVersion read: a concurrent writer makes this a 409.
            api.replace(&cfg.name, &PostParams::default(), &lease).await
        }
    };
    match written {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false), // another replica won
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_silent_holder_loses_the_lease_after_its_duration() {
        let d = Duration::from_secs(15);
        let s = Duration::from_secs;
        assert_eq!(decide(Some("a"), d, "a", s(100)), Step::Renew);
        assert_eq!(decide(Some("b"), d, "a", s(3)), Step::Follow("b".into()));
        assert_eq!(decide(Some("b"), d, "a", s(15)), Step::TakeOver);
        assert_eq!(decide(None, d, "a", s(0)), Step::TakeOver);
        assert_eq!(decide(Some(""), d, "a", s(0)), Step::TakeOver);
    }

    #[test]
    fn a_leader_that_cannot_renew_stops_before_the_others_may_take_over() {
        let d = Duration::from_secs(15);
        assert!(!must_step_down(Duration::from_secs(9), d));
        assert!(must_step_down(Duration::from_secs(10), d));
        assert!(must_step_down(d, d));
    }

    #[test]
    fn a_round_ends_before_the_leader_would_have_to_step_down() {
        let d = Duration::from_secs(15);
        let s = Duration::from_secs;
        assert_eq!(step_budget(None, d), s(10));
        assert_eq!(step_budget(Some(s(4)), d), s(6));
        assert_eq!(step_budget(Some(s(12)), d), Duration::ZERO);
        // Whatever the round took, the leader has stopped when it may be overtaken.
        for since in 0..15 {
            assert!(must_step_down(s(since) + step_budget(Some(s(since)), d), d));
        }
    }
}
