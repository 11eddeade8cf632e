//! Whether mesh-control may be trusted: ready only when it serves xDS and every source it
//! needs has been read. A source it cannot read (the API server answers 404 for the v1
//! AuthorizationPolicy list, RBAC forbids it, ...) is a reason, never "nothing there":
//! "cannot read policies" must not become "no policies".

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceState {
    /// Not listed yet.
    Pending,
    /// Listed (and watched).
    Synced,
    /// Cannot be read: why, for the operator.
    Unavailable(String),
}

#[derive(Default)]
struct State {
    serving: bool,
    sources: BTreeMap<String, SourceState>,
}

/// Shared between the config source (which reports each kind) and the readiness
/// endpoints (`/ready`, `/debug/status`, `meshctl status`).
#[derive(Clone, Default)]
pub struct Readiness(Arc<Mutex<State>>);

impl Readiness {
    pub fn set(&self, source: &str, state: SourceState) {
        let mut st = self.0.lock().expect("readiness lock");
        st.sources.insert(source.to_string(), state);
    }

    /// xDS and the CA are being served.
    pub fn set_serving(&self) {
        self.0.lock().expect("readiness lock").serving = true;
    }

    /// Why mesh-control is not ready; empty when it is.
    pub fn problems(&self) -> Vec<String> {
        let st = self.0.lock().expect("readiness lock");
        let mut out: Vec<String> = st
            .sources
            .iter()
            .filter_map(|(name, s)| match s {
                SourceState::Synced => None,
                SourceState::Pending => Some(format!("{name}: not listed yet")),
                SourceState::Unavailable(why) => Some(format!("{name}: {why}")),
            })
            .collect();
        if !st.serving {
            out.push("xDS and CA not served yet (waiting for a complete configuration)".into());
        }
        out
    }

    pub fn is_ready(&self) -> bool {
        self.problems().is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_serving_and_every_source_is_read() {
        let r = Readiness::default();
        r.set("AuthorizationPolicy", SourceState::Pending);
        assert!(!r.is_ready());
        r.set("AuthorizationPolicy", SourceState::Synced);
        assert!(!r.is_ready(), "not serving yet");
        r.set_serving();
        assert!(r.is_ready());
        r.set(
            "AuthorizationPolicy",
            SourceState::Unavailable("404".into()),
        );
        assert_eq!(r.problems(), vec!["AuthorizationPolicy: 404".to_string()]);
    }
}
