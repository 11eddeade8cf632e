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

use std::time::Duration;

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
pub fn parse_duration(s: &str) -> Option<Duration> {
    let mut rest = s;
    let mut parts = 0;
    let mut total = Duration::ZERO;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 || digits > 5 {
            return None;
        }
        let n: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let (unit, len) = if rest.starts_with("ms") {
            (Duration::from_millis(n), 2)
        } else if rest.starts_with('h') {
            (Duration::from_secs(3600 * n), 1)
        } else if rest.starts_with('m') {
            (Duration::from_secs(60 * n), 1)
        } else if rest.starts_with('s') {
            (Duration::from_secs(n), 1)
        } else {
            return None;
        };
        rest = &rest[len..];
        total += unit;
        parts += 1;
    }
    (1..=4).contains(&parts).then_some(total)
}

/// Whether a fault applies to a request, given a uniform roll in [0, 100); no percentage:
/// every request.
pub fn fault_applies(percentage: Option<f64>, roll: f64) -> bool {
    percentage.is_none_or(|p| roll < p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_follow_gep_2257() {
        assert_eq!(parse_duration("10s"), Some(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("1h"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_duration("0s"), Some(Duration::ZERO));
        for bad in ["", "5", "ten", "1.5s", "123456s", "1s2s3s4s5s", "-1s", "1d"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
    }

    #[test]
    fn faults_apply_by_percentage() {
        assert!(fault_applies(Some(50.0), 49.9));
        assert!(!fault_applies(Some(50.0), 50.0));
        assert!(fault_applies(None, 99.9), "no percentage: every request");
        assert!(!fault_applies(Some(0.0), 0.0));
    }
}
