//! Builds and runs ztunnel from its configuration.

use crate::admin::{self, AdminState, Endpoint, LogReload};
use crate::config::Config;
use crate::drain::Drain;
use crate::identity::{CertManager, CertSource};
use crate::inpod::manager::{self, PodSource, WorkloadManager};
use crate::inpod::{netns::Netns, podfile};
use crate::local::LocalConfig;
use crate::metrics::Metrics;
use crate::proxy::{ConnTracker, NodeContext};
use crate::state::State;
use crate::updates::StateChanged;
use crate::xds::{self, ControlPlane, NodeIdentity, XdsProgress};
use mesh_identity::ca::CertificateAuthority;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

/// Loads `dir/ca-cert.pem` + `dir/ca-key.pem`, creating a new root there if absent.
pub fn load_or_create_local_ca(
    dir: &Path,
    trust_domain: &str,
) -> Result<CertificateAuthority, String> {
    let cert_path = dir.join("ca-cert.pem");
    let key_path = dir.join("ca-key.pem");
    if cert_path.exists() {
        let cert = std::fs::read_to_string(&cert_path)
            .map_err(|e| format!("{}: {e}", cert_path.display()))?;
        let key = std::fs::read_to_string(&key_path)
            .map_err(|e| format!("{}: {e}", key_path.display()))?;
        return CertificateAuthority::load(trust_domain, &cert, &key, None, &cert)
            .map_err(|e| format!("local CA in {}: {e}", dir.display()));
    }
    let ca = CertificateAuthority::new_root(trust_domain, Duration::from_secs(10 * 365 * 86400))
        .map_err(|e| e.to_string())?;
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    std::fs::write(&cert_path, ca.cert_pem())
        .map_err(|e| format!("{}: {e}", cert_path.display()))?;
    mesh_identity::write_private(&key_path, ca.key_pem().as_bytes())
        .map_err(|e| format!("{}: {e}", key_path.display()))?;
    Ok(ca)
}

/// Watches the local config file and applies it whenever it changes.
async fn watch_local_config(
    path: std::path::PathBuf,
    cluster_id: String,
    state: Arc<RwLock<State>>,
    tracker: Arc<ConnTracker>,
    changed: StateChanged,
    loaded: Arc<AtomicBool>,
) {
    let mut last: Option<SystemTime> = None;
    loop {
        let mtime = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
        if mtime.is_some() && mtime != last {
            last = mtime;
            match LocalConfig::load(&path).and_then(|c| c.to_resources(&cluster_id)) {
                Ok((addresses, policies)) => {
                    let mut st = state.write().expect("state lock");
                    for e in st.apply_snapshot(&addresses, &policies) {
                        tracing::warn!(file = %path.display(), error = %e, "invalid resource kept at its previous version");
                    }
                    let closed = tracker.recheck(&st);
                    drop(st);
                    changed.notify();
                    tracing::info!(file = %path.display(), addresses = addresses.len(),
                        policies = policies.len(), closed, "local configuration applied");
                    loaded.store(true, Ordering::Relaxed);
                }
                Err(e) => {
                    tracing::error!(error = %e, "local configuration rejected; keeping the last good one")
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// What readiness still waits for (empty: ready): the configuration (local file or xDS),
/// the pod snapshot, and no identity whose latest certificate request failed.
fn not_ready(
    is_local: bool,
    config_ready: bool,
    snapshot: bool,
    certs_failing: usize,
) -> Vec<&'static str> {
    let mut p = Vec::new();
    if !config_ready {
        p.push(if is_local { "local config" } else { "xds" });
    }
    if !snapshot {
        p.push("pod snapshot");
    }
    if certs_failing > 0 {
        p.push("certificates (renewal failing, see /config_dump)");
    }
    p
}

/// Runs ztunnel until SIGTERM/SIGINT (or /quitquitquit), then drains.
pub async fn run(cfg: Config, log_reload: LogReload) -> Result<(), String> {
    Netns::init_home().map_err(|e| format!("cannot open our network namespace: {e}"))?;
    let state = Arc::new(RwLock::new(State::default()));
    let state_changed = StateChanged::new();
    let tracker = Arc::new(ConnTracker::default());
    let root_pem = match &cfg.root_cert {
        Some(p) => Some(
            std::fs::read_to_string(p).map_err(|e| format!("root cert {}: {e}", p.display()))?,
        ),
        None => None,
    };
    let control = |address: &str| ControlPlane {
        address: address.to_string(),
        root_pem: root_pem.clone().unwrap_or_default(),
        hostname: cfg.control_hostname.clone(),
        token_file: cfg.token_file.clone(),
        cluster_id: cfg.cluster_id.clone(),
    };
    let cert_source = match (
        &cfg.local_ca,
        cfg.ca_address.as_ref().or(cfg.xds_address.as_ref()),
    ) {
        (Some(dir), _) => CertSource::Local {
            ca: Box::new(load_or_create_local_ca(dir, &cfg.trust_domain)?),
            ttl: cfg.cert_ttl,
        },
        (None, Some(addr)) => {
            let cp = control(addr);
            CertSource::Ca {
                channel: cp.channel(addr)?,
                token_file: cfg.token_file.clone(),
                cluster_id: cfg.cluster_id.clone(),
                ttl: cfg.cert_ttl,
            }
        }
        (None, None) => return Err("no certificate source".into()),
    };
    let certs = CertManager::new(cert_source);
    let tracer = match &cfg.otlp_endpoint {
        Some(e) => mesh_trace::Tracer::otlp(
            e.as_str().to_string(),
            mesh_trace::Origin {
                service: format!("ztunnel.{}", cfg.node_name),
                scope: "mesh-ztunnel",
            },
        ),
        None => mesh_trace::Tracer::disabled(),
    };
    let metrics = Metrics::with_tracer(Some(certs.clone()), Some(tracer.clone()));
    let ctx = Arc::new(NodeContext {
        state: state.clone(),
        certs: certs.clone(),
        metrics: metrics.clone(),
        network: cfg.network.clone(),
        trust_domain: cfg.trust_domain.clone(),
        cluster_id: cfg.cluster_id.clone(),
        tracker: tracker.clone(),
        state_changed: state_changed.clone(),
        max_connections_per_listener: cfg.max_connections_per_listener,
        dns: cfg.dns_proxy.then(|| {
            Arc::new(crate::dns::server::DnsSettings::new(
                &cfg.cluster_domain,
                &cfg.dns_resolv_conf,
            ))
        }),
        tracer,
    });
    let drain = Drain::new();
    let manager = WorkloadManager::new(ctx.clone(), drain.clone(), cfg.drain_deadline);
    let snapshot = manager
        .lock()
        .expect("manager lock")
        .snapshot_received
        .clone();

    // Configuration source.
    let local_loaded = Arc::new(AtomicBool::new(false));
    let progress = Arc::new(XdsProgress::default());
    if let Some(path) = &cfg.local_config {
        tokio::spawn(watch_local_config(
            path.clone(),
            cfg.cluster_id.clone(),
            state.clone(),
            tracker.clone(),
            state_changed.clone(),
            local_loaded.clone(),
        ));
    } else if let Some(addr) = &cfg.xds_address {
        let node = NodeIdentity {
            node_name: cfg.node_name.clone(),
            pod_name: cfg.pod_name.clone(),
            pod_namespace: cfg.pod_namespace.clone(),
            instance_ip: cfg.instance_ip.clone(),
        };
        tokio::spawn(xds::run(
            control(addr),
            node,
            state.clone(),
            tracker.clone(),
            state_changed.clone(),
            progress.clone(),
            metrics.clone(),
        ));
    }

    // Pod source.
    let pods = match &cfg.pods_file {
        Some(p) => PodSource::Connected(
            podfile::serve(podfile::load(p)?).map_err(|e| format!("pods file: {e}"))?,
        ),
        None => PodSource::Agent(cfg.zds_socket.clone()),
    };
    tokio::spawn(manager::run(pods, manager.clone()));

    let shutdown = tokio_util::sync::CancellationToken::new();
    let pending = {
        let (local, progress, snapshot, is_local, certs) = (
            local_loaded.clone(),
            progress.clone(),
            snapshot.clone(),
            cfg.local_config.is_some(),
            certs.clone(),
        );
        Arc::new(move || {
            not_ready(
                is_local,
                if is_local {
                    local.load(Ordering::Relaxed)
                } else {
                    progress.synced()
                },
                snapshot.load(Ordering::Relaxed),
                certs.failing().len(),
            )
        })
    };
    let admin_state = Arc::new(AdminState {
        state,
        certs,
        manager,
        metrics,
        config: serde_json::to_value(&cfg).unwrap_or_default(),
        log_reload,
        log_level: Mutex::new(cfg.log_level.clone()),
        shutdown: shutdown.clone(),
        pending,
    });
    for (addr, which) in [
        (cfg.admin_addr, Endpoint::Admin),
        (cfg.metrics_addr, Endpoint::Metrics),
        (cfg.readiness_addr, Endpoint::Readiness),
    ] {
        admin::serve(addr, which, admin_state.clone())
            .await
            .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    }

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| e.to_string())?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: draining"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: draining"),
        _ = shutdown.cancelled() => tracing::info!("quitquitquit: draining"),
    }
    drain.run(cfg.drain_deadline).await;
    tracing::info!("drained; exiting");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::not_ready;

    #[test]
    fn readiness_names_what_is_missing_including_failing_certificates() {
        assert!(not_ready(false, true, true, 0).is_empty());
        assert_eq!(not_ready(true, false, true, 0), vec!["local config"]);
        assert_eq!(
            not_ready(false, false, false, 0),
            vec!["xds", "pod snapshot"]
        );
        let p = not_ready(false, true, true, 2);
        assert_eq!(p.len(), 1);
        assert!(p[0].starts_with("certificates"), "{p:?}");
    }
}
