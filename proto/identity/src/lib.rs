//! Mesh identity: SPIFFE ids, workload certificates, the rustls configs that verify peers
//! by identity, and the CA library the control plane signs with.
#![forbid(unsafe_code)]

pub mod bootstrap;
pub mod ca;
pub mod cert;
pub mod identity_error;
pub mod keyfile;
pub mod pkcs8;
pub mod spiffe;
pub mod tls;

pub use cert::{CertError, CertInfo, WorkloadCertificate, generate_csr};
pub use identity_error::IdentityError;
pub use keyfile::write_private;
pub use spiffe::{DEFAULT_TRUST_DOMAIN, SpiffeId, SpiffeIdError};
pub use tls::{client_config, peer_identity, provider, server_config};
