//! Why a peer's certificate was refused: shared by the certificate inspection (`cert`)
//! and the verifiers (`tls`), so neither needs the other for it.

use rustls::{CertificateError, OtherError};
use std::sync::Arc;

/// Why a peer's certificate was refused, beyond what rustls itself reports
/// (expiry, unknown issuer, bad signature).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// No URI SAN at all.
    #[error("peer certificate carries no SPIFFE identity (no URI SAN)")]
    NoIdentity,
    /// More than one URI SAN: which one the peer "is" would be ambiguous, so none is used.
    #[error("peer certificate carries {} URI SANs ({uris:?}); exactly one SPIFFE identity is required", uris.len())]
    MultipleIdentities { uris: Vec<String> },
    /// One URI SAN, but not a mesh SPIFFE identity (`spiffe://<td>/ns/<ns>/sa/<sa>`).
    #[error("peer certificate's URI SAN {uri:?} is not a SPIFFE identity: {reason}")]
    NotSpiffe { uri: String, reason: String },
    #[error("peer identity {got:?} is none of the expected {expected:?}")]
    UnexpectedIdentity {
        got: Vec<String>,
        expected: Vec<String>,
    },
    #[error("peer trust domain {got:?} differs from ours ({want:?})")]
    WrongTrustDomain { got: String, want: String },
}

impl IdentityError {
    /// Recovers our error from a rustls error, if it is one.
    pub fn from_rustls(err: &rustls::Error) -> Option<&IdentityError> {
        match err {
            rustls::Error::InvalidCertificate(CertificateError::Other(other)) => {
                other.0.downcast_ref::<IdentityError>()
            }
            _ => None,
        }
    }

    pub(crate) fn into_rustls(self) -> rustls::Error {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(self))))
    }
}
