//! How a data-plane program reaches the control plane: the flags every program takes
//! (one spelling, one set of environment variables), the TLS channel verified against
//! our root, and the credentials (bearer token, cluster id) put on every call, to xDS
//! and to the CA alike.

use std::path::{Path, PathBuf};
use std::time::Duration;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

/// The control-plane connection flags shared by ztunnel, the node agent and the waypoint.
/// Each is optional here (ztunnel may run without a control plane); a program that
/// cannot, marks them required on its command (see [`ControlPlaneArgs::REQUIRED`]).
#[derive(clap::Args, Debug, Clone, Default, serde::Serialize)]
pub struct ControlPlaneArgs {
    /// Control plane xDS address, e.g. https://10.0.0.1:15012.
    #[arg(long, env = "XDS_ADDRESS")]
    pub xds_address: Option<String>,
    /// PEM root(s) that sign the control plane's serving certificate.
    #[arg(long, env = "XDS_ROOT_CA")]
    pub root_cert: Option<PathBuf>,
    /// Name checked on the control plane's certificate (default: host of the address).
    #[arg(long, env = "ALT_XDS_HOSTNAME")]
    pub control_hostname: Option<String>,
    /// Bearer token presented to the control plane and its CA.
    #[arg(long, env = "TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// This cluster's id, sent as `clusterid` metadata on every call.
    #[arg(long, env = "CLUSTER_ID", default_value = "Kubernetes")]
    pub cluster_id: String,
}

/// Why the control plane cannot be reached as configured.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectError {
    #[error("--{0} is required to reach the control plane")]
    Missing(&'static str),
    #[error("cannot read the control plane's root certificate {path}: {reason}")]
    Root { path: PathBuf, reason: String },
    #[error("control plane address {address:?}: {reason}")]
    Address { address: String, reason: String },
}

/// Why credentials could not be put on a call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialError {
    #[error("cannot read the token {path}: {reason}")]
    Unreadable { path: PathBuf, reason: String },
    #[error("the token in {0} is not a valid header value")]
    NotAHeader(PathBuf),
}

impl ControlPlaneArgs {
    /// The flag ids a program that always needs the control plane marks required with
    /// `#[command(mut_arg(..., |a| a.required(true)))]` (the agent and the waypoint).
    pub const REQUIRED: [&'static str; 3] = ["xds_address", "root_cert", "token_file"];

    /// The credentials to put on every call.
    pub fn credentials(&self) -> Credentials {
        Credentials {
            token_file: self.token_file.clone(),
            cluster_id: self.cluster_id.clone(),
        }
    }

    /// The control plane at `--xds-address`, its root read from `--root-cert` (a missing
    /// root is an empty one: no server can then be verified).
    pub fn control_plane(&self) -> Result<ControlPlane, ConnectError> {
        let address = self
            .xds_address
            .clone()
            .ok_or(ConnectError::Missing("xds-address"))?;
        self.control_plane_at(&address)
    }

    /// The same control plane settings for another address (ztunnel's `--ca-address`).
    pub fn control_plane_at(&self, address: &str) -> Result<ControlPlane, ConnectError> {
        let root_pem = match &self.root_cert {
            Some(p) => std::fs::read_to_string(p).map_err(|e| ConnectError::Root {
                path: p.clone(),
                reason: e.to_string(),
            })?,
            None => String::new(),
        };
        Ok(ControlPlane {
            address: address.to_string(),
            root_pem,
            hostname: self.control_hostname.clone(),
            token_file: self.token_file.clone(),
            cluster_id: self.cluster_id.clone(),
        })
    }
}

/// How to reach and authenticate to the control plane.
#[derive(Clone, Debug)]
pub struct ControlPlane {
    pub address: String,
    pub root_pem: String,
    /// Name checked on the control plane's certificate (default: host of the address).
    pub hostname: Option<String>,
    pub token_file: Option<PathBuf>,
    pub cluster_id: String,
}

impl ControlPlane {
    /// A lazily connecting gRPC channel to `address` over TLS verified against the root
    /// (the one channel builder: xDS and the CA use it alike).
    pub fn channel(&self, address: &str) -> Result<Channel, String> {
        self.try_channel(address).map_err(|e| e.to_string())
    }

    /// [`ControlPlane::channel`] with a typed error.
    pub fn try_channel(&self, address: &str) -> Result<Channel, ConnectError> {
        let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&self.root_pem));
        if let Some(h) = &self.hostname {
            tls = tls.domain_name(h.clone());
        }
        let bad = |reason: String| ConnectError::Address {
            address: address.to_string(),
            reason,
        };
        let ep = Endpoint::from_shared(address.to_string())
            .map_err(|e| bad(e.to_string()))?
            .tls_config(tls)
            .map_err(|e| bad(format!("TLS: {e}")))?
            .connect_timeout(Duration::from_secs(10))
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(20));
        Ok(ep.connect_lazy())
    }

    /// The credentials to put on every call.
    pub fn credentials(&self) -> Credentials {
        Credentials {
            token_file: self.token_file.clone(),
            cluster_id: self.cluster_id.clone(),
        }
    }

    /// Adds `authorization: Bearer <token>` and `clusterid` metadata.
    pub fn authorize<T>(&self, req: &mut tonic::Request<T>) -> Result<(), String> {
        self.credentials().authorize(req).map_err(|e| e.to_string())
    }
}

/// What is put on every call to the control plane: the bearer token (read again on each
/// call: projected tokens rotate on disk) and the cluster id.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Credentials {
    pub token_file: Option<PathBuf>,
    pub cluster_id: String,
}

impl Credentials {
    pub fn authorize<T>(&self, req: &mut tonic::Request<T>) -> Result<(), CredentialError> {
        authorize(req, self.token_file.as_deref(), &self.cluster_id)
    }
}

/// Adds `authorization: Bearer <token from token_file>` (when given) and `clusterid`.
pub fn authorize<T>(
    req: &mut tonic::Request<T>,
    token_file: Option<&Path>,
    cluster_id: &str,
) -> Result<(), CredentialError> {
    if let Some(path) = token_file {
        let token = std::fs::read_to_string(path).map_err(|e| CredentialError::Unreadable {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let v = bearer(&token).ok_or_else(|| CredentialError::NotAHeader(path.to_path_buf()))?;
        req.metadata_mut().insert("authorization", v);
    }
    if let Ok(v) = cluster_id.parse() {
        req.metadata_mut().insert("clusterid", v);
    }
    Ok(())
}

/// `Bearer <token>`, the token's surrounding whitespace (a trailing newline) dropped.
fn bearer(token: &str) -> Option<tonic::metadata::AsciiMetadataValue> {
    format!("Bearer {}", token.trim()).parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[derive(clap::Parser, Debug)]
    struct Optional {
        #[command(flatten)]
        cp: ControlPlaneArgs,
    }

    #[derive(clap::Parser, Debug)]
    #[command(mut_arg("xds_address", |a| a.required(true)))]
    #[command(mut_arg("root_cert", |a| a.required(true)))]
    #[command(mut_arg("token_file", |a| a.required(true)))]
    struct Required {
        #[command(flatten)]
        cp: ControlPlaneArgs,
    }

    fn parse<P: clap::Parser>(args: &[&str]) -> Result<P, clap::Error> {
        // Environment left out: only the flags decide.
        let mut cmd = P::command();
        for a in [
            "xds_address",
            "root_cert",
            "control_hostname",
            "token_file",
            "cluster_id",
        ] {
            cmd = cmd.mut_arg(a, |a| a.env(None::<&str>));
        }
        let m = cmd.try_get_matches_from(std::iter::once("p").chain(args.iter().copied()))?;
        P::from_arg_matches(&m)
    }

    #[test]
    fn the_flags_keep_their_names_env_vars_and_defaults() {
        let cmd = Optional::command();
        let env = |id: &str| {
            let a = cmd.get_arguments().find(|a| a.get_id() == id).unwrap();
            (
                a.get_long().unwrap().to_string(),
                a.get_env().map(|e| e.to_string_lossy().into_owned()),
            )
        };
        assert_eq!(
            env("xds_address"),
            ("xds-address".into(), Some("XDS_ADDRESS".into()))
        );
        assert_eq!(
            env("root_cert"),
            ("root-cert".into(), Some("XDS_ROOT_CA".into()))
        );
        assert_eq!(
            env("control_hostname"),
            ("control-hostname".into(), Some("ALT_XDS_HOSTNAME".into()))
        );
        assert_eq!(
            env("token_file"),
            ("token-file".into(), Some("TOKEN_FILE".into()))
        );
        assert_eq!(
            env("cluster_id"),
            ("cluster-id".into(), Some("CLUSTER_ID".into()))
        );
        let o: Optional = parse(&[]).unwrap();
        assert_eq!(o.cp.cluster_id, "Kubernetes");
        assert_eq!(o.cp.xds_address, None);
        let o: Optional = parse(&[
            "--xds-address=https://cp:15012",
            "--root-cert=/r.pem",
            "--control-hostname=cp.test",
            "--token-file=/t",
            "--cluster-id=east",
        ])
        .unwrap();
        assert_eq!(o.cp.xds_address.as_deref(), Some("https://cp:15012"));
        assert_eq!(o.cp.root_cert, Some(PathBuf::from("/r.pem")));
        assert_eq!(o.cp.control_hostname.as_deref(), Some("cp.test"));
        assert_eq!(o.cp.token_file, Some(PathBuf::from("/t")));
        assert_eq!(o.cp.cluster_id, "east");
    }

    #[test]
    fn programs_that_need_the_control_plane_require_its_flags() {
        Required::command().debug_assert();
        for missing in ControlPlaneArgs::REQUIRED {
            let args: Vec<String> = [
                ("xds_address", "--xds-address=https://cp:15012"),
                ("root_cert", "--root-cert=/r.pem"),
                ("token_file", "--token-file=/t"),
            ]
            .iter()
            .filter(|(id, _)| *id != missing)
            .map(|(_, a)| a.to_string())
            .collect();
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let e = parse::<Required>(&args).unwrap_err();
            assert_eq!(
                e.kind(),
                clap::error::ErrorKind::MissingRequiredArgument,
                "{missing}"
            );
        }
        assert!(
            parse::<Required>(&[
                "--xds-address=https://cp:15012",
                "--root-cert=/r.pem",
                "--token-file=/t"
            ])
            .is_ok()
        );
    }

    #[test]
    fn a_missing_address_or_unreadable_root_is_an_error_worded_for_users() {
        let args = ControlPlaneArgs::default();
        assert_eq!(
            args.control_plane().unwrap_err(),
            ConnectError::Missing("xds-address")
        );
        let args = ControlPlaneArgs {
            xds_address: Some("https://cp:15012".into()),
            root_cert: Some("/nonexistent/root.pem".into()),
            ..Default::default()
        };
        let e = args.control_plane().unwrap_err();
        assert!(
            e.to_string().starts_with(
                "cannot read the control plane's root certificate /nonexistent/root.pem"
            ),
            "{e}"
        );
    }

    #[test]
    fn credentials_carry_the_trimmed_token_and_the_cluster_id() {
        let dir = std::env::temp_dir().join(format!("mesh-xds-cred-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let token = dir.join("token");
        std::fs::write(&token, "abc.def\n").unwrap();
        let creds = Credentials {
            token_file: Some(token.clone()),
            cluster_id: "east".into(),
        };
        let mut req = tonic::Request::new(());
        creds.authorize(&mut req).unwrap();
        assert_eq!(
            req.metadata().get("authorization").unwrap(),
            "Bearer abc.def"
        );
        assert_eq!(req.metadata().get("clusterid").unwrap(), "east");
        // Read on every call: a rotated token is the one sent.
        std::fs::write(&token, "rotated").unwrap();
        let mut req = tonic::Request::new(());
        creds.authorize(&mut req).unwrap();
        assert_eq!(
            req.metadata().get("authorization").unwrap(),
            "Bearer rotated"
        );
        std::fs::write(&token, "a\nb").unwrap();
        let e = creds.authorize(&mut tonic::Request::new(())).unwrap_err();
        assert_eq!(e, CredentialError::NotAHeader(token.clone()));
        std::fs::remove_dir_all(&dir).unwrap();
        let e = creds.authorize(&mut tonic::Request::new(())).unwrap_err();
        assert!(matches!(e, CredentialError::Unreadable { .. }), "{e:?}");
        // No token file: only the cluster id.
        let mut req = tonic::Request::new(());
        Credentials::default().authorize(&mut req).unwrap();
        assert!(req.metadata().get("authorization").is_none());
    }
}
