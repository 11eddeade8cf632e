//! The process lifecycle across an upgrade, as a pure state machine: Serving until the
//! node agent sends a Handover (a newer ztunnel took the node) or a signal; HandedOver
//! keeps every open connection but accepts none, until the last one ends or the maximum
//! age (drain as SIGTERM does). A handed-over process exits only once it has seen a
//! SIGTERM: under Kubernetes a container that exits on its own is restarted, and the old
//! version would come back as the newest ztunnel and take the node back. Until then it
//! waits Idle (no listeners, not ready). Draining ends in Exit (or Idle, for a max-age
//! drain not yet signalled). The I/O is in `app.rs`.

use crate::drain::Drain;
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Serving,
    /// Not accepting; open connections run on. `signalled`: a SIGTERM came meanwhile
    /// (Kubernetes sends one as soon as the new pod is ready): it exits once they end,
    /// and the next signal drains.
    HandedOver {
        since: Instant,
        signalled: bool,
    },
    /// Closing what is left. `exit_after`: exit once done; otherwise (the handover's
    /// maximum age, before any SIGTERM) wait Idle for one.
    Draining {
        exit_after: bool,
    },
    /// Handed over with nothing left open, waiting for SIGTERM to exit.
    Idle,
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
    /// A signal during a handover, noted: exit once the open connections end.
    SignalIgnored,
    /// A signal during a max-age drain, noted: exit once it is done.
    SignalNoted,
    /// Drain now: the handover's maximum age was reached.
    DrainMaxAge,
    /// Drain now: a signal or quitquitquit.
    Drain,
    /// Nothing left open and no SIGTERM yet: stay up, idle, until one comes.
    Idle,
    /// The last connection of a signalled handover ended, or the signal came when
    /// nothing was left: exit 0.
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
            Phase::Draining { .. } => "draining",
            Phase::Idle => "idle",
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
        self.json_at(Instant::now())
    }

    fn json_at(&self, now: Instant) -> serde_json::Value {
        let phase = self.phase();
        let mut v = serde_json::json!({
            "state": phase.name(),
            "accepting": phase.accepting(),
            "openConnections": self.open_connections(),
            "maxAgeSeconds": self.max_age.as_secs(),
        });
        if let Phase::HandedOver { since, signalled } = phase {
            let ago = now.saturating_duration_since(since);
            v["handedOverSecondsAgo"] = ago.as_secs().into();
            v["drainsInSeconds"] = self.max_age.saturating_sub(ago).as_secs().into();
            v["signalled"] = signalled.into();
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
        (P::Draining { exit_after: true }, Event::Drained) => (P::Exit, A::ExitDrained),
        (P::Draining { exit_after: false }, Event::Drained) => (P::Idle, A::Idle),
        (P::Draining { exit_after: false }, Event::Signal) => {
            (P::Draining { exit_after: true }, A::SignalNoted)
        }
        (P::Draining { .. }, Event::Quit) => (P::Draining { exit_after: true }, A::None),
        (p @ P::Draining { .. }, _) => (p, A::None),
        // Nothing is open: a signal or quitquitquit ends it at once.
        (P::Idle, Event::Signal | Event::Quit) => (P::Exit, A::ExitHandoverComplete),
        (P::Idle, _) => (P::Idle, A::None),
        (_, Event::Quit) => (P::Draining { exit_after: true }, A::Drain),
        (P::Serving, Event::Handover { now }) => (
            P::HandedOver {
                since: now,
                signalled: false,
            },
            A::StopAccepting,
        ),
        (P::Serving, Event::Signal) => (P::Draining { exit_after: true }, A::Drain),
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
        ) => (P::Draining { exit_after: true }, A::Drain),
        (
            P::HandedOver {
                signalled: true, ..
            },
            Event::OpenConnections(0),
        ) => (P::Exit, A::ExitHandoverComplete),
        (
            P::HandedOver {
                signalled: false, ..
            },
            Event::OpenConnections(0),
        ) => (P::Idle, A::Idle),
        (P::HandedOver { since, signalled }, Event::Tick { now }) if now >= since + max_age => (
            P::Draining {
                exit_after: signalled,
            },
            A::DrainMaxAge,
        ),
        (p @ P::HandedOver { .. }, _) => (p, A::None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AGE: Duration = Duration::from_secs(3600);
    const DRAIN_EXIT: Phase = Phase::Draining { exit_after: true };

    fn handed_over(t0: Instant) -> Phase {
        step(Phase::Serving, Event::Handover { now: t0 }, AGE).0
    }

    fn signalled(t0: Instant) -> Phase {
        step(handed_over(t0), Event::Signal, AGE).0
    }

    #[test]
    fn handover_stops_accepting_then_exits_after_sigterm_and_the_last_connection() {
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
        // A second Handover changes nothing.
        assert_eq!(step(p, Event::Handover { now: t0 }, AGE), (p, Action::None));
        let (p, a) = step(p, Event::Signal, AGE);
        assert_eq!(a, Action::SignalIgnored);
        assert_eq!(step(p, Event::OpenConnections(2), AGE), (p, Action::None));
        assert_eq!(
            step(p, Event::OpenConnections(0), AGE),
            (Phase::Exit, Action::ExitHandoverComplete)
        );
    }

    #[test]
    fn without_sigterm_a_handed_over_process_with_nothing_open_stays_up_idle() {
        // A DaemonSet restarts a container that exits: the old version would come back.
        let (p, a) = step(handed_over(Instant::now()), Event::OpenConnections(0), AGE);
        assert_eq!((p, a), (Phase::Idle, Action::Idle));
        assert!(!p.accepting());
        assert_eq!(p.name(), "idle");
        for e in [
            Event::OpenConnections(0),
            Event::Tick {
                now: Instant::now() + AGE * 2,
            },
            Event::Handover {
                now: Instant::now(),
            },
            Event::Drained,
        ] {
            assert_eq!(step(p, e, AGE), (Phase::Idle, Action::None), "{e:?}");
        }
        assert_eq!(
            step(p, Event::Signal, AGE),
            (Phase::Exit, Action::ExitHandoverComplete)
        );
        assert_eq!(
            step(p, Event::Quit, AGE),
            (Phase::Exit, Action::ExitHandoverComplete)
        );
    }

    #[test]
    fn max_age_drains_then_waits_for_sigterm_unless_it_came_already() {
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
        assert_eq!(
            (p, a),
            (Phase::Draining { exit_after: false }, Action::DrainMaxAge)
        );
        assert_eq!(step(p, Event::OpenConnections(0), AGE), (p, Action::None));
        assert_eq!(step(p, Event::Drained, AGE), (Phase::Idle, Action::Idle));
        // A SIGTERM during that drain: exit once it is done.
        let (p2, a) = step(p, Event::Signal, AGE);
        assert_eq!((p2, a), (DRAIN_EXIT, Action::SignalNoted));
        assert_eq!(
            step(p2, Event::Drained, AGE),
            (Phase::Exit, Action::ExitDrained)
        );
        // Signalled before the maximum age: the drain ends in exit.
        let (p, a) = step(signalled(t0), Event::Tick { now: t0 + AGE }, AGE);
        assert_eq!((p, a), (DRAIN_EXIT, Action::DrainMaxAge));
        assert_eq!(
            step(p, Event::Drained, AGE),
            (Phase::Exit, Action::ExitDrained)
        );
    }

    #[test]
    fn the_first_signal_during_a_handover_is_noted_the_second_drains() {
        let t0 = Instant::now();
        let (p, a) = step(handed_over(t0), Event::Signal, AGE);
        assert_eq!(a, Action::SignalIgnored);
        assert!(matches!(p, Phase::HandedOver { since, signalled: true } if since == t0));
        assert_eq!(step(p, Event::Signal, AGE), (DRAIN_EXIT, Action::Drain));
    }

    #[test]
    fn without_a_handover_a_signal_drains_as_before() {
        assert!(Phase::Serving.accepting());
        assert_eq!(
            step(Phase::Serving, Event::Signal, AGE),
            (DRAIN_EXIT, Action::Drain)
        );
        assert_eq!(
            step(DRAIN_EXIT, Event::Drained, AGE),
            (Phase::Exit, Action::ExitDrained)
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
                DRAIN_EXIT,
                Event::Handover {
                    now: Instant::now()
                },
                AGE
            ),
            (DRAIN_EXIT, Action::None)
        );
    }

    #[test]
    fn quit_drains_from_any_live_phase_and_exits_after() {
        let t0 = Instant::now();
        assert_eq!(
            step(handed_over(t0), Event::Quit, AGE),
            (DRAIN_EXIT, Action::Drain)
        );
        assert_eq!(
            step(Phase::Serving, Event::Quit, AGE),
            (DRAIN_EXIT, Action::Drain)
        );
        assert_eq!(
            step(Phase::Draining { exit_after: false }, Event::Quit, AGE),
            (DRAIN_EXIT, Action::None)
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
        let t0 = Instant::now();
        status.set(handed_over(t0));
        let v = status.json_at(t0 + Duration::from_secs(600));
        assert_eq!(
            (&v["state"], &v["accepting"]),
            (&"handed_over".into(), &false.into())
        );
        assert_eq!(v["maxAgeSeconds"], 3600);
        assert_eq!(v["handedOverSecondsAgo"], 600);
        assert_eq!(v["drainsInSeconds"], 3000);
        assert_eq!(v["signalled"], false);
        status.set(Phase::Idle);
        assert_eq!(status.json()["state"], "idle");
    }
}
