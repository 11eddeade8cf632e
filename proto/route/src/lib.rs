//! Gateway API routes for waypoints (GAMMA: parentRefs of kind Service), once for the
//! whole mesh:
//!
//! - [`k8s`]: an HTTPRoute, GRPCRoute or HTTPFault as the Kubernetes API (or a manifest)
//!   gives it, read and validated into the typed `mesh.waypoint.v1.HttpRoute`
//!   (mesh-control, when it reads the objects), with [`Finding`]s by field;
//! - [`compiled`]: that message compiled once per configuration version (regexes
//!   compiled, durations and headers parsed) and matched per request (the waypoint).
//!
//! Gateway API semantics for what cannot be understood: a filter, backend, timeout or
//! retry that cannot be applied is never skipped; the requests its rule matches get 500.
//! A match that cannot be evaluated (an invalid regex, an unsupported type) matches
//! nothing: it never widens into a match-all.
#![forbid(unsafe_code)]

pub mod compiled;
pub mod k8s;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// Not understood: the rule answers 500, or the match matches nothing.
    Error,
    /// Valid Gateway API this mesh does not implement: handled as an error.
    Unsupported,
    /// Valid, applied, but not quite as written (e.g. an ignored field); a note.
    Note,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "error",
            Severity::Unsupported => "unsupported",
            Severity::Note => "note",
        }
    }
}

/// Something in an object that is not applied exactly as written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    /// `HTTPRoute`, `GRPCRoute` or `HTTPFault`.
    pub kind: &'static str,
    pub namespace: String,
    pub name: String,
    pub severity: Severity,
    /// `spec.rules[1].matches[0].path.type`.
    pub field: String,
    pub message: String,
}

impl Finding {
    /// `HTTPRoute shop/r`.
    pub fn object(&self) -> String {
        format!("{} {}/{}", self.kind, self.namespace, self.name)
    }
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}: {}",
            self.severity.as_str(),
            self.object(),
            self.field,
            self.message
        )
    }
}

/// A Gateway API duration (GEP-2257): one to four `<1-5 digits><unit>` pairs, units
/// `h`, `m`, `s`, `ms` (`2s`, `150ms`, `1m30s`).
pub use mesh_proto::duration::parse_gateway as parse_duration;

/// Whether a fault applies to a request, given a uniform roll in [0, 100); no percentage:
/// every request.
pub fn fault_applies(percentage: Option<f64>, roll: f64) -> bool {
    percentage.is_none_or(|p| roll < p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_apply_by_percentage() {
        assert!(fault_applies(Some(50.0), 49.9));
        assert!(!fault_applies(Some(50.0), 50.0));
        assert!(fault_applies(None, 99.9), "no percentage: every request");
        assert!(!fault_applies(Some(0.0), 0.0));
    }
}
