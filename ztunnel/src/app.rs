//! Builds and runs ztunnel from its configuration.

use crate::admin::{self, AdminState, Endpoint, LogReload};
use crate::config::Config;
use crate::drain::Drain;
use crate::handover::{self, Action, Event, Phase, Status};
use crate::identity::{CertManager, CertSource};
use crate::inpod::manager::{self, PodSource, WorkloadManager};
use crate::inpod::podfile;
use crate::local::LocalConfig;
use crate::metrics::Metrics;
use crate::netns::Netns;
use crate::proxy::{ConnTracker, NodeContext};
use crate::state::State;
use crate::updates::StateChanged;
use crate::xds::{self, NodeIdentity, XdsProgress};
use mesh_identity::ca::CertificateAuthority;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

/// Loads `dir/ca-cert.pem` + `dir/ca-key.pem`, creating a new root there if absent.
pub fn load_or_create_local_ca(
    dir: &Path,
    trust_domain: &str,
) -> Result<CertificateAuthority, String> {
    mesh_identity::bootstrap::load_or_create_ca(dir, trust_domain)
        .map(|(ca, _)| ca)
        .map_err(|e| format!("local {e}"))
}

/// Watches the local config file and applies it whenever it changes.
async fn watch_local_config(
    path: std::path::PathBuf,
    cluster_id: String,
    state: Arc<RwLock<State>>,
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
                    drop(st);
                    changed.notify();
                    tracing::info!(file = %path.display(), addresses = addresses.len(),
                        policies = policies.len(), "local configuration applied");
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
/// the pod snapshot, and no identity whose latest certificate request failed. A process
/// handed over or draining is never ready again: it takes no new connections.
fn not_ready(
    is_local: bool,
    config_ready: bool,
    snapshot: bool,
    certs_failing: usize,
    phase: Phase,
) -> Vec<&'static str> {
    let mut p = Vec::new();
    match phase {
        Phase::Serving => {}
        Phase::HandedOver { .. } | Phase::Idle => p.push("handed over"),
        Phase::Draining { .. } | Phase::Exit => p.push("draining"),
    }
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
    // Open connections are re-checked after each update, outside the state's write lock.
    let recheck = tokio::spawn(
        tracker
            .clone()
            .recheck_on_change(state.clone(), state_changed.subscribe()),
    );
    // Without the re-check no policy update would close an open connection again: a
    // re-check task that dies takes the process down (fail closed) rather than serve on.
    tokio::spawn(async move {
        if let Err(e) = recheck.await {
            tracing::error!(error = %e, "connection re-check task failed; exiting");
            std::process::exit(1);
        }
    });
    let control = |address: &str| {
        cfg.control
            .control_plane_at(address)
            .map_err(|e| e.to_string())
    };
    let cert_source = match (
        &cfg.local_ca,
        cfg.ca_address.as_ref().or(cfg.control.xds_address.as_ref()),
    ) {
        (Some(dir), _) => CertSource::Local {
            ca: Box::new(load_or_create_local_ca(dir, &cfg.trust_domain)?),
            ttl: cfg.cert_ttl,
        },
        (None, Some(addr)) => {
            CertSource::control_plane(&control(addr)?, cfg.cert_ttl).map_err(|e| e.to_string())?
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
    let drain = Drain::new();
    let lifecycle = Arc::new(Status::new(drain.clone(), cfg.handover_max_age));
    let metrics = Metrics::for_process(
        Some(certs.clone()),
        Some(tracer.clone()),
        Some(lifecycle.clone()),
    );
    let ctx = Arc::new(NodeContext {
        state: state.clone(),
        certs: certs.clone(),
        metrics: metrics.clone(),
        network: cfg.network.clone(),
        trust_domain: cfg.trust_domain.clone(),
        cluster_id: cfg.control.cluster_id.clone(),
        tracker: tracker.clone(),
        state_changed: state_changed.clone(),
        max_connections_per_listener: cfg.max_connections_per_listener,
        dns: cfg.dns_proxy.then(|| {
            let settings =
                crate::dns::server::DnsSettings::new(&cfg.cluster_domain, &cfg.dns_resolv_conf);
            tokio::spawn(crate::dns::resolv::keep_current(
                cfg.dns_resolv_conf.clone(),
                settings.upstreams.clone(),
                crate::dns::resolv::POLL,
            ));
            Arc::new(settings)
        }),
        tracer,
        data_plane: mesh_threads::DataPlane::start("ztunnel-data", cfg.worker_threads)
            .map_err(|e| format!("cannot start the data threads: {e}"))?,
    });
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
            cfg.control.cluster_id.clone(),
            state.clone(),
            state_changed.clone(),
            local_loaded.clone(),
        ));
    } else if let Some(addr) = &cfg.control.xds_address {
        let node = NodeIdentity {
            node_name: cfg.node_name.clone(),
            pod_name: cfg.pod_name.clone(),
            pod_namespace: cfg.pod_namespace.clone(),
            instance_ip: cfg.instance_ip.clone(),
        };
        tokio::spawn(xds::run(
            control(addr)?,
            node,
            state.clone(),
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
    // The node agent hands the node over to the newest ztunnel that has acked its pod
    // snapshot: connect only once this one can serve (configuration synced), or a
    // ztunnel that never syncs (control plane unreachable, bad token) would take every
    // pod's new connections and fail them. Readiness waits for both.
    let config_synced = {
        let (local, progress, is_local) = (
            local_loaded.clone(),
            progress.clone(),
            cfg.local_config.is_some(),
        );
        move || match is_local {
            true => local.load(Ordering::Relaxed),
            false => progress.synced(),
        }
    };
    {
        let manager = manager.clone();
        tokio::spawn(async move {
            if !config_synced() {
                tracing::info!("waiting for the configuration before connecting to the node agent");
                while !config_synced() {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            manager::run(pods, manager).await
        });
    }

    let shutdown = tokio_util::sync::CancellationToken::new();
    let pending = {
        let (local, progress, snapshot, is_local, certs, lifecycle) = (
            local_loaded.clone(),
            progress.clone(),
            snapshot.clone(),
            cfg.local_config.is_some(),
            certs.clone(),
            lifecycle.clone(),
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
                lifecycle.phase(),
            )
        })
    };
    let handed_over = manager
        .lock()
        .expect("manager lock")
        .handed_over
        .subscribe();
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
        lifecycle: lifecycle.clone(),
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

    lifecycle_loop(
        drain,
        lifecycle,
        handed_over,
        shutdown,
        cfg.drain_deadline,
        cfg.handover_max_age,
    )
    .await
}

/// Drives the lifecycle state machine (`crate::handover`) from signals, the node agent's
/// Handover, the open connection count and the clock, until it says exit.
async fn lifecycle_loop(
    drain: Drain,
    status: Arc<Status>,
    mut handed_over: tokio::sync::watch::Receiver<bool>,
    shutdown: tokio_util::sync::CancellationToken,
    drain_deadline: Duration,
    max_age: Duration,
) -> Result<(), String> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
    let mut phase = Phase::Serving;
    let mut draining: Option<tokio::task::JoinHandle<()>> = None;
    let (mut handover_seen, mut quit_seen) = (false, false);
    loop {
        let handed = matches!(phase, Phase::HandedOver { .. });
        let (events, cause) = tokio::select! {
            _ = term.recv() => (vec![Event::Signal], "SIGTERM"),
            _ = int.recv() => (vec![Event::Signal], "SIGINT"),
            _ = shutdown.cancelled(), if !quit_seen => {
                quit_seen = true;
                (vec![Event::Quit], "quitquitquit")
            }
            r = handed_over.wait_for(|h| *h), if !handover_seen => {
                handover_seen = true;
                if r.is_err() {
                    continue; // The manager is gone; nothing more will come.
                }
                (vec![Event::Handover { now: Instant::now() }], "handover")
            }
            _ = async {
                match draining.as_mut() {
                    Some(t) => { let _ = t.await; }
                    None => std::future::pending().await,
                }
            } => {
                draining = None;
                (vec![Event::Drained], "drain")
            }
            // Connections end and the clock runs: sampled while handed over.
            _ = tokio::time::sleep(Duration::from_millis(100)), if handed => (
                vec![
                    Event::OpenConnections(drain.open_connections()),
                    Event::Tick { now: Instant::now() },
                ],
                "tick",
            ),
        };
        for event in events {
            let (next, action) = handover::step(phase, event, max_age);
            phase = next;
            status.set(phase);
            match action {
                Action::None => {}
                Action::StopAccepting => {
                    drain.stop_accepting_now();
                    tracing::info!(
                        open = drain.open_connections(),
                        max_age = ?max_age,
                        "handed over: {} connections still open",
                        drain.open_connections()
                    );
                }
                Action::SignalIgnored => tracing::info!(
                    open = drain.open_connections(),
                    "{cause} during a handover: open connections run on until they end or the maximum age, then exit; signal again to drain now"
                ),
                Action::SignalNoted => {
                    tracing::info!("{cause} during the max-age drain: exiting once it is done")
                }
                Action::Idle => tracing::info!(
                    "handed over with nothing left open: idle until SIGTERM (no listeners, not ready)"
                ),
                Action::DrainMaxAge | Action::Drain => {
                    if action == Action::DrainMaxAge {
                        tracing::info!(
                            open = drain.open_connections(),
                            "handover max age reached: draining"
                        );
                    } else {
                        tracing::info!("{cause}: draining");
                    }
                    let d = drain.clone();
                    draining = Some(tokio::spawn(async move { d.run(drain_deadline).await }));
                }
                Action::ExitHandoverComplete => {
                    tracing::info!("handover complete: exiting");
                    return Ok(());
                }
                Action::ExitDrained => {
                    tracing::info!("drained; exiting");
                    return Ok(());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::not_ready;
    use crate::handover::Phase;

    const S: Phase = Phase::Serving;

    #[test]
    fn readiness_names_what_is_missing_including_failing_certificates() {
        assert!(not_ready(false, true, true, 0, S).is_empty());
        assert_eq!(not_ready(true, false, true, 0, S), vec!["local config"]);
        assert_eq!(
            not_ready(false, false, false, 0, S),
            vec!["xds", "pod snapshot"]
        );
        let p = not_ready(false, true, true, 2, S);
        assert_eq!(p.len(), 1);
        assert!(p[0].starts_with("certificates"), "{p:?}");
    }

    #[test]
    fn a_handed_over_process_is_not_ready() {
        let h = Phase::HandedOver {
            since: std::time::Instant::now(),
            signalled: false,
        };
        assert_eq!(not_ready(false, true, true, 0, h), vec!["handed over"]);
        assert_eq!(
            not_ready(false, true, true, 0, Phase::Idle),
            vec!["handed over"]
        );
        assert_eq!(
            not_ready(false, true, true, 0, Phase::Draining { exit_after: true }),
            vec!["draining"]
        );
    }
}
