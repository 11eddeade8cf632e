//! The CA library behind the control plane's certificate service: a root (created or
//! loaded, possibly an intermediate under an offline root), CSR signing for exactly one
//! SPIFFE identity, and a trust bundle that may hold several roots during rotation.

use crate::cert::{CertError, cert_to_pem, certs_from_pem, inspect};
use crate::spiffe::SpiffeId;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256, SanType, SerialNumber,
};
use rustls_pki_types::CertificateDer;
use std::time::{Duration, SystemTime};
use time::OffsetDateTime;

/// Default lifetime of workload certificates when the request does not ask for one.
pub const DEFAULT_WORKLOAD_TTL: Duration = Duration::from_secs(24 * 3600);
/// Upper bound on workload certificate lifetime.
pub const MAX_WORKLOAD_TTL: Duration = Duration::from_secs(90 * 24 * 3600);
/// Backdating of `not_before`, so peers with a slightly slow clock accept fresh certificates.
const CLOCK_SKEW: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("the CSR is malformed or its signature is invalid: {0}")]
    BadCsr(rcgen::Error),
    #[error("the CSR asks for no identity, or for {0:?} rather than the identity being issued")]
    CsrIdentityMismatch(Vec<String>),
    #[error("identity {id} is outside this CA's trust domain {trust_domain:?}")]
    ForeignTrustDomain { id: SpiffeId, trust_domain: String },
    #[error("CA key or certificate is unusable: {0}")]
    BadCaMaterial(String),
    #[error("could not sign: {0}")]
    Sign(rcgen::Error),
    #[error(transparent)]
    Cert(#[from] CertError),
}

/// A signing CA.
pub struct CertificateAuthority {
    trust_domain: String,
    key: KeyPair,
    /// The signing certificate (a root, or an intermediate).
    cert: CertificateDer<'static>,
    /// Certificates between the signing certificate and the root, PEM, in order.
    intermediates_pem: Vec<String>,
    /// Every trusted root, PEM, concatenated (several during rotation).
    bundle: Vec<CertificateDer<'static>>,
    not_after: SystemTime,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("trust_domain", &self.trust_domain)
            .field("roots", &self.bundle.len())
            .finish()
    }
}

fn to_offset(t: SystemTime) -> OffsetDateTime {
    OffsetDateTime::from(t)
}

fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    // A non-crypto source is fine for uniqueness; ring's rng is used for keys.
    fill_random(&mut bytes);
    bytes[0] &= 0x7f; // positive
    SerialNumber::from_slice(&bytes)
}

fn fill_random(buf: &mut [u8]) {
    use rustls::crypto::ring::default_provider;
    default_provider()
        .secure_random
        .fill(buf)
        .expect("system random source");
}

/// Parameters of a CA certificate (root or intermediate).
fn ca_params(
    trust_domain: &str,
    common_name: String,
    not_before: SystemTime,
    not_after: SystemTime,
) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, trust_domain);
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = to_offset(not_before);
    params.not_after = to_offset(not_after);
    params.serial_number = Some(random_serial());
    params
}

/// The SPIFFE identity a CSR asks for (its only URI SAN), after checking its signature.
pub fn csr_identity(csr_pem: &str) -> Result<SpiffeId, CaError> {
    let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(CaError::BadCsr)?;
    let uris: Vec<String> = csr
        .params
        .subject_alt_names
        .iter()
        .filter_map(|san| match san {
            SanType::URI(u) => Some(u.as_str().to_string()),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [one] => one
            .parse()
            .map_err(|_| CaError::CsrIdentityMismatch(uris.clone())),
        _ => Err(CaError::CsrIdentityMismatch(uris)),
    }
}

fn key_matches_cert(key: &KeyPair, cert: &CertificateDer<'_>) -> Result<bool, CaError> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, parsed) =
        X509Certificate::from_der(cert).map_err(|e| CaError::BadCaMaterial(e.to_string()))?;
    Ok(parsed.public_key().subject_public_key.data.as_ref() == key.public_key_raw())
}

impl CertificateAuthority {
    /// Creates a new self-signed root for `trust_domain`, valid for `validity`.
    pub fn new_root(trust_domain: &str, validity: Duration) -> Result<Self, CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(CaError::Sign)?;
        let now = SystemTime::now();
        // A distinct name per root, so that during rotation each certificate names the
        // root that signed it and an unknown root reads as such (not as a bad signature).
        let mut tag = [0u8; 4];
        fill_random(&mut tag);
        let tag: String = tag.iter().map(|b| format!("{b:02x}")).collect();
        let params = ca_params(
            trust_domain,
            format!("mesh root CA {trust_domain} {tag}"),
            now - CLOCK_SKEW,
            now + validity,
        );
        let cert = params.self_signed(&key).map_err(CaError::Sign)?;
        let der = cert.der().clone();
        Ok(CertificateAuthority {
            trust_domain: trust_domain.to_string(),
            key,
            cert: der.clone(),
            intermediates_pem: Vec::new(),
            bundle: vec![der],
            not_after: now + validity,
        })
    }

    /// Loads a CA from PEM: the signing certificate and its key, the chain up to (not
    /// including) the root (Istio's `cert-chain.pem`, with the signing certificate and
    /// the root in it, is accepted as well), and the root bundle. For a self-signed root, `chain` is empty
    /// and `root_bundle` may be the root itself (or that plus older roots).
    pub fn load(
        trust_domain: &str,
        cert_pem: &str,
        key_pem: &str,
        chain_pem: Option<&str>,
        root_bundle_pem: &str,
    ) -> Result<Self, CaError> {
        let pkcs8 = crate::pkcs8::private_key_to_pkcs8(key_pem)
            .map_err(|e| CaError::BadCaMaterial(format!("CA key: {e}")))?;
        let key =
            KeyPair::try_from(pkcs8).map_err(|e| CaError::BadCaMaterial(format!("CA key: {e}")))?;
        let cert = certs_from_pem("CA certificate", cert_pem)?
            .into_iter()
            .next()
            .expect("certs_from_pem returns at least one");
        // Make sure the key belongs to the certificate and rcgen can issue from it.
        Issuer::from_ca_cert_der(&cert, &key)
            .map_err(|e| CaError::BadCaMaterial(format!("CA certificate: {e}")))?;
        let info = inspect(&cert)?;
        if !key_matches_cert(&key, &cert)? {
            return Err(CaError::BadCaMaterial(
                "the CA key does not belong to the CA certificate".into(),
            ));
        }
        let bundle = certs_from_pem("root bundle", root_bundle_pem)?;
        // Istio's plug-in CA `cert-chain.pem` starts with the signing certificate and ends
        // with the root: both are already served in their own place, so only the
        // intermediates between them are kept.
        let intermediates_pem = match chain_pem {
            Some(pem) if !pem.trim().is_empty() => certs_from_pem("CA chain", pem)?
                .iter()
                .filter(|c| **c != cert && !bundle.contains(c))
                .map(|c| cert_to_pem(c))
                .collect(),
            _ => Vec::new(),
        };
        Ok(CertificateAuthority {
            trust_domain: trust_domain.to_string(),
            key,
            cert,
            intermediates_pem,
            bundle,
            not_after: info.not_after,
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The signing certificate as PEM (to persist it).
    pub fn cert_pem(&self) -> String {
        cert_to_pem(&self.cert)
    }

    /// The signing key as PKCS#8 PEM (to persist it).
    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// Every trusted root, concatenated PEM.
    pub fn roots_pem(&self) -> String {
        self.bundle.iter().map(|c| cert_to_pem(c)).collect()
    }

    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.bundle
    }

    /// Adds a root to the bundle (e.g. the previous root during rotation), so certificates
    /// issued under either verify.
    pub fn trust_additional_roots(&mut self, pem: &str) -> Result<(), CaError> {
        for root in certs_from_pem("additional root", pem)? {
            if !self.bundle.contains(&root) {
                self.bundle.push(root);
            }
        }
        Ok(())
    }

    /// Signs `csr_pem` for `identity`, valid from now for `ttl` (0 → default, capped at
    /// the maximum and at the CA's own expiry). Returns the chain: leaf, intermediates,
    /// then the root bundle as the last element.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        identity: &SpiffeId,
        ttl: Duration,
    ) -> Result<Vec<String>, CaError> {
        let ttl = if ttl.is_zero() {
            DEFAULT_WORKLOAD_TTL
        } else {
            ttl.min(MAX_WORKLOAD_TTL)
        };
        let now = SystemTime::now();
        let not_after = (now + ttl).min(self.not_after);
        self.sign_csr_valid_between(csr_pem, identity, now - CLOCK_SKEW, not_after)
    }

    /// As [`sign_csr`](Self::sign_csr) with an explicit validity window.
    pub fn sign_csr_valid_between(
        &self,
        csr_pem: &str,
        identity: &SpiffeId,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<Vec<String>, CaError> {
        if identity.trust_domain() != self.trust_domain {
            return Err(CaError::ForeignTrustDomain {
                id: identity.clone(),
                trust_domain: self.trust_domain.clone(),
            });
        }
        let mut csr =
            CertificateSigningRequestParams::from_pem(csr_pem).map_err(CaError::BadCsr)?;
        // The CSR may carry only the identity being issued (or none at all: the issued
        // identity always replaces whatever the CSR asked for).
        let requested: Vec<String> = csr
            .params
            .subject_alt_names
            .iter()
            .map(|san| match san {
                SanType::URI(u) => u.as_str().to_string(),
                other => format!("{other:?}"),
            })
            .collect();
        let want = identity.to_string();
        if requested.iter().any(|r| *r != want) {
            return Err(CaError::CsrIdentityMismatch(requested));
        }
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(want.try_into().map_err(CaError::Sign)?)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_before = to_offset(not_before);
        params.not_after = to_offset(not_after);
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;
        csr.params = params;
        let issuer = Issuer::from_ca_cert_der(&self.cert, &self.key)
            .map_err(|e| CaError::BadCaMaterial(e.to_string()))?;
        let leaf = csr.signed_by(&issuer).map_err(CaError::Sign)?;

        let mut chain = Vec::with_capacity(2 + self.intermediates_pem.len());
        chain.push(leaf.pem());
        let signing_is_root = self.bundle.contains(&self.cert);
        if !signing_is_root {
            chain.push(self.cert_pem());
        }
        chain.extend(self.intermediates_pem.iter().cloned());
        chain.push(self.roots_pem());
        Ok(chain)
    }

    /// A TLS serving certificate for the control plane itself (DNS and IP SANs, server
    /// auth), returned as (chain PEM: leaf then intermediates, key PEM).
    pub fn issue_server_cert(
        &self,
        dns_names: &[String],
        ips: &[std::net::IpAddr],
        validity: Duration,
    ) -> Result<(String, String), CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(CaError::Sign)?;
        let now = SystemTime::now();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            dns_names
                .first()
                .cloned()
                .unwrap_or_else(|| "mesh-control".into()),
        );
        params.distinguished_name = dn;
        let mut sans = Vec::new();
        for d in dns_names {
            sans.push(SanType::DnsName(
                d.clone().try_into().map_err(CaError::Sign)?,
            ));
        }
        for ip in ips {
            sans.push(SanType::IpAddress(*ip));
        }
        params.subject_alt_names = sans;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.not_before = to_offset(now - CLOCK_SKEW);
        params.not_after = to_offset((now + validity).min(self.not_after));
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;
        let issuer = Issuer::from_ca_cert_der(&self.cert, &self.key)
            .map_err(|e| CaError::BadCaMaterial(e.to_string()))?;
        let cert = params.signed_by(&key, &issuer).map_err(CaError::Sign)?;
        let mut chain = cert.pem();
        if !self.bundle.contains(&self.cert) {
            chain.push_str(&self.cert_pem());
        }
        for i in &self.intermediates_pem {
            chain.push_str(i);
        }
        Ok((chain, key.serialize_pem()))
    }

    /// Issues an intermediate CA certificate signed by this CA (for tests and for
    /// operators who keep the root offline).
    pub fn issue_intermediate(&self, validity: Duration) -> Result<(String, String), CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(CaError::Sign)?;
        let now = SystemTime::now();
        let mut params = ca_params(
            &self.trust_domain,
            "mesh intermediate CA".into(),
            now - CLOCK_SKEW,
            (now + validity).min(self.not_after),
        );
        params.use_authority_key_identifier_extension = true;
        let issuer = Issuer::from_ca_cert_der(&self.cert, &self.key)
            .map_err(|e| CaError::BadCaMaterial(e.to_string()))?;
        let cert = params.signed_by(&key, &issuer).map_err(CaError::Sign)?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}
