//! Workload keys, CSRs and the certificate chains a CA returns.

use crate::identity_error::IdentityError;
use crate::spiffe::SpiffeId;
use rcgen::{CertificateParams, DistinguishedName, KeyPair, PKCS_ECDSA_P256_SHA256, SanType};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("could not generate a key or CSR: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("the certificate chain is empty")]
    EmptyChain,
    #[error("no PEM certificate found in {0}")]
    NoPem(&'static str),
    #[error("PEM in {what} is malformed: {detail}")]
    BadPem { what: &'static str, detail: String },
    #[error("certificate is not valid X.509 DER: {0}")]
    BadDer(String),
    #[error("issued certificate carries {got:?}, but {want} (and nothing else) was requested")]
    WrongIdentity { want: SpiffeId, got: Vec<String> },
}

/// Parsed facts about one certificate that the mesh cares about.
#[derive(Clone, Debug)]
pub struct CertInfo {
    /// All URI SANs, as written (who the certificate is: [`CertInfo::identity`]).
    pub uris: Vec<String>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    pub serial_hex: String,
}

impl CertInfo {
    /// The certificate's identity: it must carry exactly one URI SAN, and that URI must be
    /// a SPIFFE id of the mesh's form. Zero URIs, several URIs (even if one of them is a
    /// good SPIFFE id) or a lone non-SPIFFE URI are each refused with their own error.
    pub fn identity(&self) -> Result<SpiffeId, IdentityError> {
        match self.uris.as_slice() {
            [] => Err(IdentityError::NoIdentity),
            [one] => one
                .parse()
                .map_err(|e: crate::SpiffeIdError| IdentityError::NotSpiffe {
                    uri: one.clone(),
                    reason: e.to_string(),
                }),
            _ => Err(IdentityError::MultipleIdentities {
                uris: self.uris.clone(),
            }),
        }
    }
}

/// Reads identity and validity from a DER certificate.
pub fn inspect(der: &[u8]) -> Result<CertInfo, CertError> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| CertError::BadDer(e.to_string()))?;
    let mut uris = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::URI(uri) = name {
                uris.push(uri.to_string());
            }
        }
    }
    let to_time = |t: x509_parser::time::ASN1Time| {
        let secs = t.timestamp();
        if secs >= 0 {
            UNIX_EPOCH + Duration::from_secs(secs as u64)
        } else {
            UNIX_EPOCH
        }
    };
    Ok(CertInfo {
        uris,
        not_before: to_time(cert.validity().not_before),
        not_after: to_time(cert.validity().not_after),
        serial_hex: cert.raw_serial_as_string(),
    })
}

/// Parses every certificate in a PEM string (which may hold several concatenated).
pub fn certs_from_pem(
    what: &'static str,
    pem: &str,
) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CertError::BadPem {
            what,
            detail: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(CertError::NoPem(what));
    }
    Ok(certs)
}

/// Encodes a DER certificate as PEM.
pub fn cert_to_pem(der: &[u8]) -> String {
    pem_encode("CERTIFICATE", der)
}

fn pem_encode(label: &str, der: &[u8]) -> String {
    pem::encode(&pem::Pem::new(label, der))
}

/// A fresh ECDSA P-256 key and a CSR whose only SAN is the identity's URI (no CN).
pub struct CsrAndKey {
    pub csr_pem: String,
    pub key: KeyPair,
}

pub fn generate_csr(identity: &SpiffeId) -> Result<CsrAndKey, CertError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(identity.to_string().try_into()?)];
    let csr = params.serialize_request(&key)?;
    Ok(CsrAndKey {
        csr_pem: csr.pem()?,
        key,
    })
}

/// A workload's key, certificate chain and the trust roots that came with it.
#[derive(Debug)]
pub struct WorkloadCertificate {
    identity: SpiffeId,
    /// Leaf first, then intermediates (never the roots).
    chain: Vec<CertificateDer<'static>>,
    key: PrivatePkcs8KeyDer<'static>,
    roots: Vec<CertificateDer<'static>>,
    info: CertInfo,
}

impl Clone for WorkloadCertificate {
    fn clone(&self) -> Self {
        WorkloadCertificate {
            identity: self.identity.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            roots: self.roots.clone(),
            info: self.info.clone(),
        }
    }
}

impl WorkloadCertificate {
    /// Builds from a CA response (`cert_chain`: leaf first, root bundle last) and the key
    /// the CSR was made with. Checks that the leaf carries exactly the requested identity.
    pub fn from_ca_response(
        requested: &SpiffeId,
        key: &KeyPair,
        cert_chain: &[String],
    ) -> Result<Self, CertError> {
        let (roots_pem, chain_pem) = cert_chain.split_last().ok_or(CertError::EmptyChain)?;
        let roots = certs_from_pem("root bundle", roots_pem)?;
        let mut chain = Vec::new();
        for pem in chain_pem {
            chain.extend(certs_from_pem("certificate chain", pem)?);
        }
        // A self-signed leaf (chain of one element) is its own root.
        if chain.is_empty() {
            chain.push(roots[0].clone());
        }
        Self::from_parts(
            requested,
            chain,
            PrivatePkcs8KeyDer::from(key.serialize_der()),
            roots,
        )
    }

    pub fn from_parts(
        requested: &SpiffeId,
        chain: Vec<CertificateDer<'static>>,
        key: PrivatePkcs8KeyDer<'static>,
        roots: Vec<CertificateDer<'static>>,
    ) -> Result<Self, CertError> {
        let leaf = chain.first().ok_or(CertError::EmptyChain)?;
        let info = inspect(leaf)?;
        // Exactly the requested identity, alone: what we present is what was asked for.
        if info.identity().as_ref() != Ok(requested) {
            return Err(CertError::WrongIdentity {
                want: requested.clone(),
                got: info.uris.clone(),
            });
        }
        Ok(WorkloadCertificate {
            identity: requested.clone(),
            chain,
            key,
            roots,
            info,
        })
    }

    /// The same key and chain with another trust bundle (e.g. after the mesh's roots
    /// changed).
    pub fn with_roots(mut self, roots: Vec<CertificateDer<'static>>) -> Self {
        self.roots = roots;
        self
    }

    pub fn identity(&self) -> &SpiffeId {
        &self.identity
    }
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }
    pub fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key.clone_key())
    }
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }
    pub fn info(&self) -> &CertInfo {
        &self.info
    }
    pub fn not_after(&self) -> SystemTime {
        self.info.not_after
    }

    /// When to renew: half-way through the certificate's life.
    pub fn refresh_at(&self) -> SystemTime {
        let life = self
            .info
            .not_after
            .duration_since(self.info.not_before)
            .unwrap_or_default();
        self.info.not_before + life / 2
    }

    pub fn is_expired_at(&self, now: SystemTime) -> bool {
        now >= self.info.not_after
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csr_carries_only_the_uri_san() {
        let id = SpiffeId::new("td", "ns", "sa").unwrap();
        let csr = generate_csr(&id).unwrap();
        let parsed = rcgen::CertificateSigningRequestParams::from_pem(&csr.csr_pem).unwrap();
        assert_eq!(parsed.params.subject_alt_names.len(), 1);
        match &parsed.params.subject_alt_names[0] {
            SanType::URI(u) => assert_eq!(u.as_str(), "spiffe://td/ns/ns/sa/sa"),
            other => panic!("unexpected SAN {other:?}"),
        }
        assert_eq!(parsed.params.distinguished_name.iter().count(), 0);
    }
}
