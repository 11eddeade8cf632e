//! The legal order of ZDS messages, as one state machine both ends feed: the hello
//! first and once; one request outstanding at a time (each acked before the next);
//! Keep only in the snapshot; SnapshotSent once; Handover only after the snapshot, only
//! to a ztunnel whose hello offered it, and once. The agent feeds what it sends and the
//! acks it receives; ztunnel what it receives and the acks it sends. No I/O, no clock.

use super::{Kind, ZdsHello};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    AwaitingHello,
    Snapshot,
    Serving,
}

/// Where one connection is in the protocol.
#[derive(Debug, Clone)]
pub struct Session {
    phase: Phase,
    /// The request sent and not acked yet.
    pending: Option<Kind>,
    handover_offered: bool,
    handed_over: bool,
}

/// A message in an order the protocol does not allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OrderError {
    #[error("{0:?} before the hello")]
    BeforeHello(Kind),
    #[error("a second hello")]
    HelloTwice,
    #[error("{next:?} while {pending:?} is not acknowledged")]
    Unacked { pending: Kind, next: Kind },
    #[error("an ack with no request outstanding")]
    AckWithoutRequest,
    #[error("Keep after the snapshot (Keep only lists a pod in the snapshot)")]
    KeepAfterSnapshot,
    #[error("a second SnapshotSent")]
    SnapshotTwice,
    #[error("Handover before the snapshot was complete")]
    HandoverBeforeSnapshot,
    #[error("Handover to a ztunnel whose hello did not offer handover.v1")]
    HandoverNotOffered,
    #[error("a second Handover")]
    HandoverTwice,
}

impl Default for Session {
    fn default() -> Self {
        Self::new()
    }
}

impl Session {
    pub fn new() -> Self {
        Session {
            phase: Phase::AwaitingHello,
            pending: None,
            handover_offered: false,
            handed_over: false,
        }
    }

    /// The hello (its version checked by `decode_hello`).
    pub fn hello(&mut self, hello: &ZdsHello) -> Result<(), OrderError> {
        if self.phase != Phase::AwaitingHello {
            return Err(OrderError::HelloTwice);
        }
        self.handover_offered = super::offers_handover(hello);
        self.phase = Phase::Snapshot;
        Ok(())
    }

    /// A request of `kind`, sent (agent) or received (ztunnel).
    pub fn request(&mut self, kind: Kind) -> Result<(), OrderError> {
        if self.phase == Phase::AwaitingHello {
            return Err(OrderError::BeforeHello(kind));
        }
        if let Some(pending) = self.pending {
            return Err(OrderError::Unacked {
                pending,
                next: kind,
            });
        }
        let serving = self.phase == Phase::Serving;
        match kind {
            Kind::Keep if serving => return Err(OrderError::KeepAfterSnapshot),
            Kind::SnapshotSent if serving => return Err(OrderError::SnapshotTwice),
            Kind::Handover if !serving => return Err(OrderError::HandoverBeforeSnapshot),
            Kind::Handover if !self.handover_offered => {
                return Err(OrderError::HandoverNotOffered);
            }
            Kind::Handover if self.handed_over => return Err(OrderError::HandoverTwice),
            _ => {}
        }
        self.pending = Some(kind);
        Ok(())
    }

    /// The ack of the outstanding request; returns what it acked.
    pub fn ack(&mut self) -> Result<Kind, OrderError> {
        let kind = self.pending.take().ok_or(OrderError::AckWithoutRequest)?;
        match kind {
            Kind::SnapshotSent => self.phase = Phase::Serving,
            Kind::Handover => self.handed_over = true,
            _ => {}
        }
        Ok(kind)
    }

    /// The hello listed `handover.v1`.
    pub fn handover_offered(&self) -> bool {
        self.handover_offered
    }

    /// SnapshotSent was acked: incremental messages from here on.
    pub fn serving(&self) -> bool {
        self.phase == Phase::Serving
    }

    /// A Handover was acked.
    pub fn handed_over(&self) -> bool {
        self.handed_over
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::zds_capability::HANDOVER_V1;

    fn hello(caps: &[&str]) -> ZdsHello {
        ZdsHello {
            version: 1,
            capabilities: caps.iter().map(|c| c.to_string()).collect(),
        }
    }

    fn step(s: &mut Session, kind: Kind) {
        s.request(kind).unwrap();
        assert_eq!(s.ack().unwrap(), kind);
    }

    fn serving(caps: &[&str]) -> Session {
        let mut s = Session::new();
        s.hello(&hello(caps)).unwrap();
        step(&mut s, Kind::SnapshotSent);
        s
    }

    #[test]
    fn the_whole_legal_order() {
        let mut s = Session::new();
        s.hello(&hello(&[HANDOVER_V1])).unwrap();
        assert!(s.handover_offered());
        step(&mut s, Kind::Add);
        step(&mut s, Kind::Keep);
        assert!(!s.serving());
        step(&mut s, Kind::SnapshotSent);
        assert!(s.serving());
        step(&mut s, Kind::Add);
        step(&mut s, Kind::Del);
        step(&mut s, Kind::Handover);
        assert!(s.handed_over());
        // Dels still reach a handed-over ztunnel.
        step(&mut s, Kind::Del);
    }

    #[test]
    fn nothing_before_the_hello_and_one_hello() {
        let mut s = Session::new();
        assert_eq!(
            s.request(Kind::Add),
            Err(OrderError::BeforeHello(Kind::Add))
        );
        assert_eq!(s.ack(), Err(OrderError::AckWithoutRequest));
        s.hello(&hello(&[])).unwrap();
        assert_eq!(s.hello(&hello(&[])), Err(OrderError::HelloTwice));
    }

    #[test]
    fn one_request_outstanding() {
        let mut s = serving(&[]);
        s.request(Kind::Add).unwrap();
        assert_eq!(
            s.request(Kind::Del),
            Err(OrderError::Unacked {
                pending: Kind::Add,
                next: Kind::Del
            })
        );
        s.ack().unwrap();
        assert_eq!(s.ack(), Err(OrderError::AckWithoutRequest));
        step(&mut s, Kind::Del);
    }

    #[test]
    fn snapshot_rules() {
        let mut s = serving(&[]);
        assert_eq!(s.request(Kind::Keep), Err(OrderError::KeepAfterSnapshot));
        assert_eq!(
            s.request(Kind::SnapshotSent),
            Err(OrderError::SnapshotTwice)
        );
        // The snapshot ends on SnapshotSent's ack, not on sending it.
        let mut s = Session::new();
        s.hello(&hello(&[HANDOVER_V1])).unwrap();
        s.request(Kind::SnapshotSent).unwrap();
        assert!(!s.serving());
        s.ack().unwrap();
        assert!(s.serving());
    }

    #[test]
    fn handover_rules() {
        let mut s = Session::new();
        s.hello(&hello(&[HANDOVER_V1])).unwrap();
        assert_eq!(
            s.request(Kind::Handover),
            Err(OrderError::HandoverBeforeSnapshot)
        );
        // Istio's hello (no capabilities) is never handed over.
        let mut istio = serving(&[]);
        assert_eq!(
            istio.request(Kind::Handover),
            Err(OrderError::HandoverNotOffered)
        );
        let mut ours = serving(&["other", HANDOVER_V1]);
        step(&mut ours, Kind::Handover);
        assert_eq!(ours.request(Kind::Handover), Err(OrderError::HandoverTwice));
    }
}
