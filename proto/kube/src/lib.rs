//! One way to reach the Kubernetes API server, for the control plane and the node
//! agent's installer: a given kubeconfig, else the in-cluster service account or
//! `$KUBECONFIG` / `~/.kube/config`. A crate of its own so that the contracts in
//! `mesh-proto` (used by every data-plane program) do not pull in a Kubernetes client.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("kubeconfig {path}: {reason}")]
    Kubeconfig { path: PathBuf, reason: String },
    #[error(
        "no Kubernetes credentials (not in a pod, and no usable KUBECONFIG or ~/.kube/config): {0}"
    )]
    NoCredentials(String),
    #[error("Kubernetes client: {0}")]
    Client(String),
}

/// The client configuration from `kubeconfig`, else inferred. kube's retry layer is on
/// (relied on, not left to a default): a 429 (API priority and fairness), 503 or 504
/// is retried after the server's Retry-After, not reported as a failure. A caller that
/// retries itself turns it off on its copy.
pub async fn config(kubeconfig: Option<&Path>) -> Result<kube::Config, KubeError> {
    let bad = |path: &Path, e: &dyn std::fmt::Display| KubeError::Kubeconfig {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let mut config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path).map_err(|e| bad(path, &e))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .map_err(|e| bad(path, &e))?
        }
        None => kube::Config::infer()
            .await
            .map_err(|e| KubeError::NoCredentials(e.to_string()))?,
    };
    config.default_retry = true;
    Ok(config)
}

/// A client for `config`.
pub fn client(config: kube::Config) -> Result<kube::Client, KubeError> {
    kube::Client::try_from(config).map_err(|e| KubeError::Client(e.to_string()))
}

/// A client from `kubeconfig`, else inferred ([`config`], then [`client`]).
pub async fn connect(kubeconfig: Option<&Path>) -> Result<kube::Client, KubeError> {
    client(config(kubeconfig).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_kubeconfig_is_read_and_its_problems_name_the_file() {
        let dir = std::env::temp_dir().join(format!("mesh-kube-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("kubeconfig");
        std::fs::write(
            &path,
            "apiVersion: v1\nkind: Config\ncurrent-context: c\n\
             clusters: [{name: k, cluster: {server: 'https://127.0.0.1:6443', insecure-skip-tls-verify: true}}]\n\
             users: [{name: u, user: {token: t}}]\n\
             contexts: [{name: c, context: {cluster: k, user: u}}]\n",
        )
        .unwrap();
        let c = config(Some(&path)).await.unwrap();
        assert_eq!(c.cluster_url.to_string(), "https://127.0.0.1:6443/");
        assert!(c.default_retry);
        assert!(client(c).is_ok());
        std::fs::write(&path, "not: [a kubeconfig").unwrap();
        let e = config(Some(&path)).await.unwrap_err();
        assert!(
            matches!(&e, KubeError::Kubeconfig { path: p, .. } if p == &path),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
