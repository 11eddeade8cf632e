//! What the loopback and bounds tests share: a CA and certificates from it.

use mesh_identity::ca::CertificateAuthority;
use mesh_identity::{SpiffeId, WorkloadCertificate, generate_csr};
use std::time::Duration;

pub const DAY: Duration = Duration::from_secs(86400);

pub struct Mesh {
    ca: CertificateAuthority,
}

impl Mesh {
    pub fn new() -> Self {
        Mesh {
            ca: CertificateAuthority::new_root("cluster.local", 30 * DAY).unwrap(),
        }
    }
    pub fn cert(&self, sa: &str) -> WorkloadCertificate {
        let id = SpiffeId::new("cluster.local", "test", sa).unwrap();
        let csr = generate_csr(&id).unwrap();
        let chain = self.ca.sign_csr(&csr.csr_pem, &id, DAY).unwrap();
        WorkloadCertificate::from_ca_response(&id, &csr.key, &chain).unwrap()
    }
}
