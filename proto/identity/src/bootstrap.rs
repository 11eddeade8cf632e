//! The CA on disk, in Istio's plug-in CA layout: `ca-cert.pem` and `ca-key.pem`, with
//! an optional `root-cert.pem` bundle (the roots clients trust, during a rotation more
//! than one) and `cert-chain.pem` (the intermediates between ca-cert.pem and the root).
//! Loaded when present, else created as a new root whose key file is owner-only (0600).
//!
//! Creation is crash-safe and single: under an exclusive lock on `ca.lock`, the key then
//! the certificate are each written to a temporary file, synced and renamed into place.
//! A directory holding only one of the two is refused, never completed or overwritten.

use crate::ca::CertificateAuthority;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const CA_CERT: &str = "ca-cert.pem";
pub const CA_KEY: &str = "ca-key.pem";
pub const ROOT_BUNDLE: &str = "root-cert.pem";
pub const CERT_CHAIN: &str = "cert-chain.pem";
/// Held (flock) while deciding whether to create and creating.
pub const LOCK: &str = "ca.lock";
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
    #[error(
        "{present} exists but {missing} does not (a creation cut short, or a partial copy): \
         delete {present} to have a new CA created, or put back the matching {missing_name}"
    )]
    HalfCa {
        present: PathBuf,
        missing: PathBuf,
        missing_name: &'static str,
    },
}

/// What the files on disk call for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    Load,
    Create,
    /// Exactly one of the two exists: the one named is there, the other missing.
    Refuse {
        present: &'static str,
        missing: &'static str,
    },
}

/// Decides from which of `ca-cert.pem` and `ca-key.pem` exist.
pub fn plan(cert_exists: bool, key_exists: bool) -> Plan {
    match (cert_exists, key_exists) {
        (true, true) => Plan::Load,
        (false, false) => Plan::Create,
        (true, false) => Plan::Refuse {
            present: CA_CERT,
            missing: CA_KEY,
        },
        (false, true) => Plan::Refuse {
            present: CA_KEY,
            missing: CA_CERT,
        },
    }
}

/// Whether a key file's mode lets others than its owner read or write it.
pub fn key_mode_too_wide(mode: u32) -> bool {
    mode & 0o077 != 0
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
    let cert_path = dir.join(CA_CERT);
    let key_path = dir.join(CA_KEY);
    // Both present: no lock needed (a read-only mount cannot take one).
    if !(cert_path.exists() && key_path.exists()) {
        std::fs::create_dir_all(dir).map_err(file_error(dir))?;
        let lock_path = dir.join(LOCK);
        // Held until dropped; the kernel releases it if this process dies.
        let _lock = lock(&lock_path).map_err(file_error(&lock_path))?;
        match plan(cert_path.exists(), key_path.exists()) {
            Plan::Load => {}
            Plan::Create => return create(dir, trust_domain).map(|ca| (ca, Origin::Created)),
            Plan::Refuse { present, missing } => {
                return Err(BootstrapError::HalfCa {
                    present: dir.join(present),
                    missing: dir.join(missing),
                    missing_name: missing,
                });
            }
        }
    }
    warn_if_key_readable(&key_path);
    Ok((load_ca(dir, trust_domain)?, Origin::Loaded))
}

fn lock(path: &Path) -> std::io::Result<std::fs::File> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)?;
    rustix::fs::flock(&f, rustix::fs::FlockOperation::LockExclusive)?;
    Ok(f)
}

fn warn_if_key_readable(key_path: &Path) {
    if let Ok(meta) = std::fs::metadata(key_path)
        && key_mode_too_wide(meta.permissions().mode())
    {
        tracing::warn!(
            path = %key_path.display(),
            mode = format!("{:o}", meta.permissions().mode() & 0o777),
            "the CA key is readable by others than its owner: chmod 600 it"
        );
    }
}

fn create(dir: &Path, trust_domain: &str) -> Result<CertificateAuthority, BootstrapError> {
    let ca = CertificateAuthority::new_root(trust_domain, ROOT_VALIDITY)
        .map_err(|e| BootstrapError::Create(e.to_string()))?;
    // The key first: a crash before the certificate leaves a key alone, which is
    // refused with a message, never a certificate whose key is lost.
    let key_path = dir.join(CA_KEY);
    replace_file(&key_path, ca.key_pem().as_bytes(), 0o600).map_err(file_error(&key_path))?;
    let cert_path = dir.join(CA_CERT);
    replace_file(&cert_path, ca.cert_pem().as_bytes(), 0o644).map_err(file_error(&cert_path))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(file_error(dir))?;
    Ok(ca)
}

/// Writes `path` whole or not at all: a temporary file with `mode` from its creation,
/// synced, then renamed over `path`.
fn replace_file(path: &Path, data: &[u8], mode: u32) -> std::io::Result<()> {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    let tmp = path.with_file_name(name);
    // A temporary file left by a crash is ours to replace (we hold the lock).
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)?;
    // The umask may have narrowed the mode; never widened it past `mode`.
    f.set_permissions(std::fs::Permissions::from_mode(mode))?;
    f.write_all(data)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)
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
            matches!(&e, BootstrapError::HalfCa { present, .. } if present.ends_with(CA_CERT)),
            "{e}"
        );
        assert!(e.to_string().contains("delete "), "{e}");
        assert!(!tmp.path().join(CA_KEY).exists(), "no key made up");
        let e = load_ca(tmp.path(), "cluster.local").unwrap_err();
        assert!(
            matches!(&e, BootstrapError::File { path, .. } if path.ends_with(CA_KEY)),
            "{e}"
        );
        std::fs::write(tmp.path().join(CA_KEY), "not a key").unwrap();
        let e = load_ca(tmp.path(), "cluster.local").unwrap_err();
        assert!(e.to_string().starts_with("CA in "), "{e}");
    }

    #[test]
    fn plans() {
        assert_eq!(plan(true, true), Plan::Load);
        assert_eq!(plan(false, false), Plan::Create);
        assert_eq!(
            plan(true, false),
            Plan::Refuse {
                present: CA_CERT,
                missing: CA_KEY
            }
        );
        assert_eq!(
            plan(false, true),
            Plan::Refuse {
                present: CA_KEY,
                missing: CA_CERT
            }
        );
    }

    #[test]
    fn key_modes() {
        assert!(!key_mode_too_wide(0o100600));
        assert!(!key_mode_too_wide(0o400));
        assert!(key_mode_too_wide(0o640));
        assert!(key_mode_too_wide(0o604));
        assert!(key_mode_too_wide(0o100644));
    }

    #[test]
    fn a_key_without_its_certificate_is_kept_and_named() {
        let tmp = tempfile::tempdir().unwrap();
        load_or_create_ca(tmp.path(), "cluster.local").unwrap();
        let key = std::fs::read(tmp.path().join(CA_KEY)).unwrap();
        std::fs::remove_file(tmp.path().join(CA_CERT)).unwrap();
        let e = load_or_create_ca(tmp.path(), "cluster.local").unwrap_err();
        assert!(
            matches!(&e, BootstrapError::HalfCa { present, missing, .. }
                if present.ends_with(CA_KEY) && missing.ends_with(CA_CERT)),
            "{e}"
        );
        assert_eq!(std::fs::read(tmp.path().join(CA_KEY)).unwrap(), key);
        assert!(!tmp.path().join(CA_CERT).exists());
    }

    #[test]
    fn a_creation_cut_short_after_the_key_leaves_no_certificate() {
        let tmp = tempfile::tempdir().unwrap();
        // The certificate's temporary file cannot be made: creation stops after the key,
        // as a crash there would.
        std::fs::create_dir(tmp.path().join(format!("{CA_CERT}.tmp"))).unwrap();
        let e = load_or_create_ca(tmp.path(), "cluster.local").unwrap_err();
        assert!(
            matches!(&e, BootstrapError::File { path, .. } if path.ends_with(CA_CERT)),
            "{e}"
        );
        assert!(
            !tmp.path().join(CA_CERT).exists(),
            "no certificate without a key"
        );
        let mode = std::fs::metadata(tmp.path().join(CA_KEY))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        // The next start says what to delete rather than failing on a missing key.
        let e = load_or_create_ca(tmp.path(), "cluster.local").unwrap_err();
        assert!(
            matches!(&e, BootstrapError::HalfCa { present, .. } if present.ends_with(CA_KEY)),
            "{e}"
        );
    }

    #[test]
    fn creators_at_once_make_one_ca() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ca");
        let certs: Vec<String> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..8)
                .map(|_| {
                    s.spawn(|| {
                        load_or_create_ca(&dir, "cluster.local")
                            .unwrap()
                            .0
                            .cert_pem()
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(
            certs.iter().all(|c| *c == certs[0]),
            "more than one CA made"
        );
        // The key on disk is the certificate's (load checks it).
        let loaded = load_ca(&dir, "cluster.local").unwrap();
        assert_eq!(loaded.cert_pem(), certs[0]);
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.ends_with(".tmp"))
            .collect();
        assert!(names.is_empty(), "{names:?}");
    }
}
