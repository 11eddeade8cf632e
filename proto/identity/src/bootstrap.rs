//! The CA on disk, in Istio's plug-in CA layout: `ca-cert.pem` and `ca-key.pem`, with
//! an optional `root-cert.pem` bundle (the roots clients trust, during a rotation more
//! than one) and `cert-chain.pem` (the intermediates between ca-cert.pem and the root).
//! Loaded when present, else created as a new root whose key file is owner-only (0600).

use crate::ca::CertificateAuthority;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const CA_CERT: &str = "ca-cert.pem";
pub const CA_KEY: &str = "ca-key.pem";
pub const ROOT_BUNDLE: &str = "root-cert.pem";
pub const CERT_CHAIN: &str = "cert-chain.pem";
/// How long a root created here is valid.
pub const ROOT_VALIDITY: Duration = Duration::from_secs(10 * 365 * 86400);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BootstrapError {
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("CA in {dir}: {reason}")]
    Invalid { dir: PathBuf, reason: String },
    #[error("cannot create a root CA: {0}")]
    Create(String),
}

/// Whether a CA was found or made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Loaded,
    Created,
}

fn file_error(path: &Path) -> impl FnOnce(std::io::Error) -> BootstrapError + '_ {
    move |e| BootstrapError::File {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

/// Whether `dir` holds a CA (its certificate; the key must then be there too).
pub fn has_ca(dir: &Path) -> bool {
    dir.join(CA_CERT).exists()
}

/// Loads the CA in `dir`. Without `root-cert.pem` the CA's own certificate is the root.
pub fn load_ca(dir: &Path, trust_domain: &str) -> Result<CertificateAuthority, BootstrapError> {
    let cert_path = dir.join(CA_CERT);
    let key_path = dir.join(CA_KEY);
    let cert = std::fs::read_to_string(&cert_path).map_err(file_error(&cert_path))?;
    let key = std::fs::read_to_string(&key_path).map_err(file_error(&key_path))?;
    let bundle = std::fs::read_to_string(dir.join(ROOT_BUNDLE)).unwrap_or_else(|_| cert.clone());
    let chain = std::fs::read_to_string(dir.join(CERT_CHAIN)).ok();
    CertificateAuthority::load(trust_domain, &cert, &key, chain.as_deref(), &bundle).map_err(|e| {
        BootstrapError::Invalid {
            dir: dir.to_path_buf(),
            reason: e.to_string(),
        }
    })
}

/// Loads the CA in `dir`, or creates a new root there (the directory too), its key
/// written owner-only.
pub fn load_or_create_ca(
    dir: &Path,
    trust_domain: &str,
) -> Result<(CertificateAuthority, Origin), BootstrapError> {
    if has_ca(dir) {
        return Ok((load_ca(dir, trust_domain)?, Origin::Loaded));
    }
    let ca = CertificateAuthority::new_root(trust_domain, ROOT_VALIDITY)
        .map_err(|e| BootstrapError::Create(e.to_string()))?;
    std::fs::create_dir_all(dir).map_err(file_error(dir))?;
    let cert_path = dir.join(CA_CERT);
    std::fs::write(&cert_path, ca.cert_pem()).map_err(file_error(&cert_path))?;
    let key_path = dir.join(CA_KEY);
    crate::write_private(&key_path, ca.key_pem().as_bytes()).map_err(file_error(&key_path))?;
    Ok((ca, Origin::Created))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_new_root_is_created_once_then_loaded_with_its_key_owner_only() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ca");
        let (made, origin) = load_or_create_ca(&dir, "cluster.local").unwrap();
        assert_eq!(origin, Origin::Created);
        let mode = std::fs::metadata(dir.join(CA_KEY))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "ca-key.pem is {mode:o}");
        let (loaded, origin) = load_or_create_ca(&dir, "cluster.local").unwrap();
        assert_eq!(origin, Origin::Loaded);
        assert_eq!(loaded.cert_pem(), made.cert_pem(), "the same root");
        assert_eq!(loaded.roots_pem(), made.roots_pem());
    }

    #[test]
    fn a_root_bundle_beside_the_ca_is_what_clients_trust() {
        let tmp = tempfile::tempdir().unwrap();
        let (ca, _) = load_or_create_ca(tmp.path(), "cluster.local").unwrap();
        let other = CertificateAuthority::new_root("cluster.local", ROOT_VALIDITY).unwrap();
        std::fs::write(
            tmp.path().join(ROOT_BUNDLE),
            format!("{}{}", ca.cert_pem(), other.cert_pem()),
        )
        .unwrap();
        assert_eq!(
            load_ca(tmp.path(), "cluster.local").unwrap().roots().len(),
            2
        );
    }

    #[test]
    fn a_missing_key_or_a_bad_certificate_is_named_in_the_error() {
        let tmp = tempfile::tempdir().unwrap();
        load_or_create_ca(tmp.path(), "cluster.local").unwrap();
        std::fs::remove_file(tmp.path().join(CA_KEY)).unwrap();
        let e = load_or_create_ca(tmp.path(), "cluster.local").unwrap_err();
        assert!(
            matches!(&e, BootstrapError::File { path, .. } if path.ends_with(CA_KEY)),
            "{e}"
        );
        std::fs::write(tmp.path().join(CA_KEY), "not a key").unwrap();
        let e = load_ca(tmp.path(), "cluster.local").unwrap_err();
        assert!(e.to_string().starts_with("CA in "), "{e}");
    }
}
