//! SPIFFE identities of the form `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

/// The trust domain used when none is configured.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
const SCHEME: &str = "spiffe://";

/// A workload identity: one per Kubernetes service account. Shared, so a clone is a
/// reference count: every open connection's report and policy record carries its peers'
/// identities (three strings each when they were copied).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId(Arc<Parts>);

#[derive(PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Parts {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpiffeId")
            .field("trust_domain", &self.0.trust_domain)
            .field("namespace", &self.0.namespace)
            .field("service_account", &self.0.service_account)
            .finish()
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpiffeIdError {
    #[error("identity {0:?} does not start with spiffe://")]
    MissingScheme(String),
    #[error(
        "identity {0:?} is not of the form spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>"
    )]
    BadShape(String),
    #[error(
        "trust domain {0:?} is invalid: use lowercase letters, digits, '.', '-' and '_' (at most 255 characters)"
    )]
    BadTrustDomain(String),
    #[error(
        "{what} {value:?} is invalid: use 1-253 characters from a-z, 0-9, '.', '-', '_' (no '/')"
    )]
    BadSegment { what: &'static str, value: String },
}

impl SpiffeId {
    /// Builds and validates an identity from its parts.
    pub fn new(
        trust_domain: impl Into<String>,
        namespace: impl Into<String>,
        service_account: impl Into<String>,
    ) -> Result<Self, SpiffeIdError> {
        let id = Parts {
            trust_domain: trust_domain.into(),
            namespace: namespace.into(),
            service_account: service_account.into(),
        };
        validate_trust_domain(&id.trust_domain)?;
        validate_segment("namespace", &id.namespace)?;
        validate_segment("service account", &id.service_account)?;
        Ok(SpiffeId(Arc::new(id)))
    }

    pub fn trust_domain(&self) -> &str {
        &self.0.trust_domain
    }
    pub fn namespace(&self) -> &str {
        &self.0.namespace
    }
    pub fn service_account(&self) -> &str {
        &self.0.service_account
    }

    /// The form AuthorizationPolicy principals use: the URI without `spiffe://`.
    pub fn principal(&self) -> String {
        format!(
            "{}/ns/{}/sa/{}",
            self.0.trust_domain, self.0.namespace, self.0.service_account
        )
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{SCHEME}{}/ns/{}/sa/{}",
            self.0.trust_domain, self.0.namespace, self.0.service_account
        )
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rest = s
            .strip_prefix(SCHEME)
            .ok_or_else(|| SpiffeIdError::MissingScheme(s.to_string()))?;
        let mut parts = rest.split('/');
        let (Some(td), Some("ns"), Some(ns), Some("sa"), Some(sa), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(SpiffeIdError::BadShape(s.to_string()));
        };
        SpiffeId::new(td, ns, sa)
    }
}

fn validate_trust_domain(td: &str) -> Result<(), SpiffeIdError> {
    let ok = !td.is_empty()
        && td.len() <= 255
        && td
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(SpiffeIdError::BadTrustDomain(td.to_string()))
    }
}

fn validate_segment(what: &'static str, value: &str) -> Result<(), SpiffeIdError> {
    // Kubernetes names are DNS-1123 subdomains/labels; allow '_' as SPIFFE path segments do.
    let ok = !value.is_empty()
        && value.len() <= 253
        && value != "."
        && value != ".."
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(SpiffeIdError::BadSegment {
            what,
            value: value.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_formats() {
        let id: SpiffeId = "spiffe://cluster.local/ns/default/sa/bookinfo"
            .parse()
            .unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), "default");
        assert_eq!(id.service_account(), "bookinfo");
        assert_eq!(
            id.to_string(),
            "spiffe://cluster.local/ns/default/sa/bookinfo"
        );
        assert_eq!(id.principal(), "cluster.local/ns/default/sa/bookinfo");
    }

    #[test]
    fn clones_share_and_compare_by_value() {
        let a: SpiffeId = "spiffe://td/ns/a/sa/b".parse().unwrap();
        let b = a.clone();
        assert!(
            std::ptr::eq(a.service_account(), b.service_account()),
            "a clone copied the strings"
        );
        let parsed_again: SpiffeId = "spiffe://td/ns/a/sa/b".parse().unwrap();
        assert_eq!(a, parsed_again);
        let mut ids: Vec<SpiffeId> = [
            "spiffe://td/ns/b/sa/a",
            "spiffe://td/ns/a/sa/z",
            "spiffe://ta/ns/z/sa/z",
        ]
        .map(|s| s.parse().unwrap())
        .into();
        ids.sort();
        let sorted: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
        assert_eq!(
            sorted,
            [
                "spiffe://ta/ns/z/sa/z",
                "spiffe://td/ns/a/sa/z",
                "spiffe://td/ns/b/sa/a"
            ]
        );
        assert_eq!(
            format!("{a:?}"),
            r#"SpiffeId { trust_domain: "td", namespace: "a", service_account: "b" }"#
        );
    }

    #[test]
    fn rejects_malformed() {
        use SpiffeIdError::*;
        type Check = fn(&SpiffeIdError) -> bool;
        let cases: &[(&str, Check)] = &[
            ("cluster.local/ns/a/sa/b", |e| matches!(e, MissingScheme(_))),
            ("spiffe://td/ns/a", |e| matches!(e, BadShape(_))),
            ("spiffe://td/ns/a/sa/b/extra", |e| matches!(e, BadShape(_))),
            ("spiffe://td/namespace/a/sa/b", |e| matches!(e, BadShape(_))),
            ("spiffe://TD/ns/a/sa/b", |e| matches!(e, BadTrustDomain(_))),
            ("spiffe:///ns/a/sa/b", |e| matches!(e, BadTrustDomain(_))),
            ("spiffe://td/ns//sa/b", |e| matches!(e, BadSegment { .. })),
            ("spiffe://td/ns/a/sa/B", |e| matches!(e, BadSegment { .. })),
            ("spiffe://td/ns/../sa/b", |e| matches!(e, BadSegment { .. })),
        ];
        for (input, check) in cases {
            let err = input.parse::<SpiffeId>().unwrap_err();
            assert!(check(&err), "{input}: unexpected {err:?}");
        }
    }
}
