//! Mesh identity: SPIFFE ids, workload certificates, the rustls configs that verify peers
//! by identity, and the CA library the control plane signs with.
#![forbid(unsafe_code)]

pub mod bootstrap;
pub mod ca;
pub mod cert;
pub mod keyfile;
pub mod pkcs8;
pub mod spiffe;
pub mod tls;

pub use cert::{CertError, CertInfo, WorkloadCertificate, generate_csr};
pub use keyfile::write_private;
pub use spiffe::{DEFAULT_TRUST_DOMAIN, SpiffeId, SpiffeIdError};
pub use tls::{IdentityError, client_config, peer_identity, provider, server_config};
