//! The process lifecycle across an upgrade, as a pure state machine: Serving until the
//! node agent sends a Handover (a newer ztunnel took the node) or a signal; HandedOver
//! keeps every open connection but accepts none, until the last one ends (exit) or the
//! maximum age (drain as SIGTERM does); Draining ends in Exit. The I/O is in `app.rs`.

use crate::drain::Drain;
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Serving,
    /// Not accepting; open connections run on. `signalled`: a SIGTERM came meanwhile
    /// (Kubernetes sends one as soon as the new pod is ready); the next one drains.
    HandedOver {
        since: Instant,
        signalled: bool,
    },
    Draining,
    Exit,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// The node agent sent Handover.
    Handover { now: Instant },
    /// SIGTERM or SIGINT.
    Signal,
    /// `/quitquitquit`: drain now, whatever the phase.
    Quit,
    /// This many connections are open (sampled).
    OpenConnections(usize),
    /// The clock, to check the maximum age.
    Tick { now: Instant },
    /// The drain finished (deadline reached or nothing left).
    Drained,
}

/// What the shell must do after a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    None,
    /// Stop accepting in every pod (listeners closed, GOAWAY), keep open connections.
    StopAccepting,
    /// A signal during a handover, noted and otherwise ignored.
    SignalIgnored,
    /// Drain now: the handover's maximum age was reached.
    DrainMaxAge,
    /// Drain now: a signal or quitquitquit.
    Drain,
    /// The last connection of a handover ended: exit 0.
    ExitHandoverComplete,
    /// The drain is over: exit.
    ExitDrained,
}

impl Phase {
    /// 1 while this process takes new connections (`ztunnel_accepting`).
    pub fn accepting(&self) -> bool {
        matches!(self, Phase::Serving)
    }

    /// For `/config_dump`.
    pub fn name(&self) -> &'static str {
        match self {
            Phase::Serving => "serving",
            Phase::HandedOver { .. } => "handed_over",
            Phase::Draining => "draining",
            Phase::Exit => "exiting",
        }
    }

    /// When the handover's maximum age is reached (`None` outside a handover).
    pub fn deadline(&self, max_age: Duration) -> Option<Instant> {
        match self {
            Phase::HandedOver { since, .. } => Some(*since + max_age),
            _ => None,
        }
    }
}

/// What the process reports about its lifecycle, read by metrics (`ztunnel_accepting`,
/// `ztunnel_open_connections`), readiness and `/config_dump`; written by `app.rs`.
#[derive(Debug)]
pub struct Status {
    phase: Mutex<Phase>,
    /// The process-wide drain: it counts every open connection in every pod.
    drain: Drain,
    max_age: Duration,
}

impl Status {
    pub fn new(drain: Drain, max_age: Duration) -> Self {
        Status {
            phase: Mutex::new(Phase::Serving),
            drain,
            max_age,
        }
    }

    pub fn set(&self, phase: Phase) {
        *self.phase.lock().expect("status lock") = phase;
    }

    pub fn phase(&self) -> Phase {
        *self.phase.lock().expect("status lock")
    }

    /// Connections this process still carries, all pods.
    pub fn open_connections(&self) -> usize {
        self.drain.open_connections()
    }

    /// The `handover` section of `/config_dump`.
    pub fn json(&self) -> serde_json::Value {
        let phase = self.phase();
        let mut v = serde_json::json!({
            "state": phase.name(),
            "accepting": phase.accepting(),
            "openConnections": self.open_connections(),
            "maxAgeSeconds": self.max_age.as_secs(),
        });
        if let Phase::HandedOver { since, .. } = phase {
            v["handedOverSecondsAgo"] = since.elapsed().as_secs().into();
            v["drainsInSeconds"] = self
                .max_age
                .saturating_sub(since.elapsed())
                .as_secs()
                .into();
        }
        v
    }
}

/// One transition.
pub fn step(phase: Phase, event: Event, max_age: Duration) -> (Phase, Action) {
    use Action as A;
    use Phase as P;
    match (phase, event) {
        (P::Exit, _) => (P::Exit, A::None),
        (P::Draining, Event::Drained) => (P::Exit, A::ExitDrained),
        (P::Draining, _) => (P::Draining, A::None),
        (_, Event::Quit) => (P::Draining, A::Drain),
        (P::Serving, Event::Handover { now }) => (
            P::HandedOver {
                since: now,
                signalled: false,
            },
            A::StopAccepting,
        ),
        (P::Serving, Event::Signal) => (P::Draining, A::Drain),
        (P::Serving, _) => (P::Serving, A::None),
        (
            P::HandedOver {
                since,
                signalled: false,
            },
            Event::Signal,
        ) => (
            P::HandedOver {
                since,
                signalled: true,
            },
            A::SignalIgnored,
        ),
        (
            P::HandedOver {
                signalled: true, ..
            },
            Event::Signal,
        ) => (P::Draining, A::Drain),
        (P::HandedOver { .. }, Event::OpenConnections(0)) => (P::Exit, A::ExitHandoverComplete),
        (P::HandedOver { since, .. }, Event::Tick { now }) if now >= since + max_age => {
            (P::Draining, A::DrainMaxAge)
        }
        (p @ P::HandedOver { .. }, _) => (p, A::None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AGE: Duration = Duration::from_secs(3600);

    fn handed_over(t0: Instant) -> Phase {
        step(Phase::Serving, Event::Handover { now: t0 }, AGE).0
    }

    #[test]
    fn handover_stops_accepting_then_exits_when_the_last_connection_ends() {
        let t0 = Instant::now();
        let (p, a) = step(Phase::Serving, Event::Handover { now: t0 }, AGE);
        assert_eq!(a, Action::StopAccepting);
        assert!(!p.accepting());
        assert_eq!(p.name(), "handed_over");
        assert_eq!(
            step(p, Event::OpenConnections(3), AGE),
            (p, Action::None),
            "open connections keep it running"
        );
        assert_eq!(
            step(p, Event::OpenConnections(0), AGE),
            (Phase::Exit, Action::ExitHandoverComplete)
        );
        // A second Handover changes nothing.
        assert_eq!(step(p, Event::Handover { now: t0 }, AGE), (p, Action::None));
    }

    #[test]
    fn max_age_drains() {
        let t0 = Instant::now();
        let p = handed_over(t0);
        assert_eq!(p.deadline(AGE), Some(t0 + AGE));
        assert_eq!(
            step(
                p,
                Event::Tick {
                    now: t0 + AGE - Duration::from_millis(1)
                },
                AGE
            ),
            (p, Action::None)
        );
        let (p, a) = step(p, Event::Tick { now: t0 + AGE }, AGE);
        assert_eq!((p, a), (Phase::Draining, Action::DrainMaxAge));
        assert_eq!(step(p, Event::OpenConnections(0), AGE), (p, Action::None));
        assert_eq!(
            step(p, Event::Drained, AGE),
            (Phase::Exit, Action::ExitDrained)
        );
    }

    #[test]
    fn the_first_signal_during_a_handover_is_ignored_the_second_drains() {
        let t0 = Instant::now();
        let (p, a) = step(handed_over(t0), Event::Signal, AGE);
        assert_eq!(a, Action::SignalIgnored);
        assert!(matches!(p, Phase::HandedOver { since, signalled: true } if since == t0));
        assert_eq!(
            step(p, Event::Signal, AGE),
            (Phase::Draining, Action::Drain)
        );
        // Still exits on its own after the ignored signal.
        assert_eq!(
            step(p, Event::OpenConnections(0), AGE),
            (Phase::Exit, Action::ExitHandoverComplete)
        );
    }

    #[test]
    fn without_a_handover_a_signal_drains_as_before() {
        assert!(Phase::Serving.accepting());
        assert_eq!(
            step(Phase::Serving, Event::Signal, AGE),
            (Phase::Draining, Action::Drain)
        );
        assert_eq!(
            step(Phase::Serving, Event::OpenConnections(0), AGE),
            (Phase::Serving, Action::None),
            "no connections while serving is no reason to exit"
        );
        assert_eq!(
            step(
                Phase::Serving,
                Event::Tick {
                    now: Instant::now() + AGE * 2
                },
                AGE
            ),
            (Phase::Serving, Action::None)
        );
        // A Handover while draining is too late to matter.
        assert_eq!(
            step(
                Phase::Draining,
                Event::Handover {
                    now: Instant::now()
                },
                AGE
            ),
            (Phase::Draining, Action::None)
        );
    }

    #[test]
    fn quit_drains_from_any_live_phase() {
        let t0 = Instant::now();
        assert_eq!(
            step(handed_over(t0), Event::Quit, AGE),
            (Phase::Draining, Action::Drain)
        );
        assert_eq!(
            step(Phase::Serving, Event::Quit, AGE),
            (Phase::Draining, Action::Drain)
        );
        assert_eq!(
            step(Phase::Exit, Event::Quit, AGE),
            (Phase::Exit, Action::None)
        );
    }

    #[test]
    fn the_status_reports_phase_and_open_connections() {
        let drain = Drain::new();
        let status = Status::new(drain.clone(), AGE);
        let _conn = drain.child().guard();
        let v = status.json();
        assert_eq!(
            (&v["state"], &v["accepting"]),
            (&"serving".into(), &true.into())
        );
        assert_eq!(v["openConnections"], 1);
        status.set(handed_over(Instant::now()));
        let v = status.json();
        assert_eq!(
            (&v["state"], &v["accepting"]),
            (&"handed_over".into(), &false.into())
        );
        assert_eq!(v["maxAgeSeconds"], 3600);
        assert!(v["drainsInSeconds"].as_u64().unwrap() <= 3600, "{v}");
    }
}
