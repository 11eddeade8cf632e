use clap::Parser;
use mesh_xds::certs::{CertManager, CertSource};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use waypoint::proxy::{Config, Handler, Waypoint};

/// The L7 waypoint of a namespace: HTTP routing (Gateway API HTTPRoute) and L7
/// authorization for the services bound to it, between ztunnels, over HBONE.
#[derive(Parser, Debug, serde::Serialize)]
#[command(name = "waypoint", version)]
struct Args {
    /// The waypoint's Gateway name (also its service account).
    #[arg(long, env = "WAYPOINT_NAME")]
    name: String,
    #[arg(long, env = "POD_NAMESPACE")]
    namespace: String,
    #[arg(long, env = "TRUST_DOMAIN", default_value = "cluster.local")]
    trust_domain: String,
    #[arg(long, env = "CLUSTER_ID", default_value = "Kubernetes")]
    cluster_id: String,
    #[arg(long, env = "XDS_ADDRESS")]
    xds_address: String,
    #[arg(long, env = "XDS_ROOT_CA")]
    root_cert: PathBuf,
    #[arg(long, env = "ALT_XDS_HOSTNAME")]
    control_hostname: Option<String>,
    /// This waypoint's bearer token for the control plane.
    #[arg(long, env = "TOKEN_FILE")]
    token_file: PathBuf,
    #[arg(long, default_value = "0.0.0.0:15008")]
    listen: SocketAddr,
    #[arg(long, default_value = "0.0.0.0:15020")]
    metrics_addr: SocketAddr,
    /// Consecutive 5xx or connection failures that eject an endpoint (outlier detection).
    #[arg(long, default_value_t = 5)]
    outlier_consecutive_errors: u32,
    /// First ejection time in seconds; the n-th lasts n times this (up to 10×).
    #[arg(long, default_value_t = 30)]
    outlier_base_ejection_secs: u64,
    /// Requests in flight per destination service before new ones get 503.
    #[arg(long, default_value_t = 4096)]
    max_requests_per_service: usize,
    /// Idle HTTP/1.1 connections kept open per endpoint for reuse.
    #[arg(long, default_value_t = 32)]
    max_idle_per_endpoint: usize,
    /// Idle upstream connections are closed after this many seconds.
    #[arg(long, default_value_t = 60)]
    upstream_idle_timeout_secs: u64,
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    log_level: String,
}

async fn serve_metrics(addr: SocketAddr, metrics: Arc<waypoint::metrics::Metrics>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(l) = tokio::net::TcpListener::bind(addr).await else {
        tracing::warn!(%addr, "cannot serve metrics");
        return;
    };
    loop {
        let Ok((mut s, _)) = l.accept().await else {
            continue;
        };
        let m = metrics.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            let body = m.encode();
            let _ = s
                .write_all(format!("HTTP/1.1 200 OK\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len()).as_bytes())
                .await;
        });
    }
}

fn main() {
    let a = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&a.log_level).unwrap_or_else(|_| "info".into()),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .init();
    let identity = match mesh_identity::SpiffeId::new(&a.trust_domain, &a.namespace, &a.name) {
        Ok(id) => id,
        Err(e) => {
            eprintln!("waypoint: invalid identity: {e}");
            std::process::exit(2);
        }
    };
    let root_pem = match std::fs::read_to_string(&a.root_cert) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("waypoint: --root-cert {}: {e}", a.root_cert.display());
            std::process::exit(2);
        }
    };
    tracing::info!(config = %serde_json::to_string(&a).unwrap_or_default(), %identity, "starting the waypoint");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(async move {
        let cp = mesh_xds::ControlPlane {
            address: a.xds_address.clone(),
            root_pem,
            hostname: a.control_hostname.clone(),
            token_file: Some(a.token_file.clone()),
            cluster_id: a.cluster_id.clone(),
        };
        let channel = match cp.channel(&a.xds_address) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!("{e}");
                std::process::exit(2);
            }
        };
        let certs = CertManager::new(CertSource::Ca {
            channel,
            token_file: Some(a.token_file.clone()),
            cluster_id: a.cluster_id.clone(),
            ttl: Duration::from_secs(24 * 3600),
        });
        let config = Arc::new(RwLock::new(Config::default()));
        let synced = Arc::new(AtomicBool::new(false));
        let node = mesh_proto::envoy_core::Node {
            id: format!("waypoint~{}~{}.{}", a.name, a.name, a.namespace),
            user_agent_name: "waypoint".into(),
            ..Default::default()
        };
        let types = vec![
            mesh_proto::type_url::ADDRESS,
            mesh_proto::type_url::HTTP_ROUTE,
            mesh_proto::type_url::L7_POLICY,
        ];
        tokio::spawn(mesh_xds::run(
            cp,
            node,
            types,
            waypoint::xds::Apply {
                config: config.clone(),
                synced,
            },
        ));
        let metrics = Arc::new(waypoint::metrics::Metrics::new());
        tokio::spawn(serve_metrics(a.metrics_addr, metrics.clone()));
        let pool = Arc::new(waypoint::upstream_pool::UpstreamPool::new(
            waypoint::upstream_pool::PoolLimits {
                max_idle_per_endpoint: a.max_idle_per_endpoint,
                idle_timeout: std::time::Duration::from_secs(a.upstream_idle_timeout_secs.max(1)),
            },
        ));
        let wp = Arc::new(Waypoint {
            identity: identity.clone(),
            config,
            certs: certs.clone(),
            client: hbone::Client::new(hbone::TcpDialer, hbone::ClientSettings::default()),
            metrics,
            budget: Default::default(),
            balancer: Arc::new(waypoint::balancer::Balancer::new(
                waypoint::balancer::BalancerConfig {
                    consecutive_errors: a.outlier_consecutive_errors.max(1),
                    base_ejection: std::time::Duration::from_secs(a.outlier_base_ejection_secs),
                    max_requests_per_service: a.max_requests_per_service.max(1),
                    ..Default::default()
                },
            )),
            pool: pool.clone(),
        });
        tokio::spawn(pool.run_sweeper());
        let listener = match tokio::net::TcpListener::bind(a.listen).await {
            Ok(l) => l,
            Err(e) => {
                tracing::error!("cannot listen on {}: {e}", a.listen);
                std::process::exit(1);
            }
        };
        tracing::info!(listen = %a.listen, "waypoint serving HBONE");
        let drain = CancellationToken::new();
        let handler = Arc::new(Handler(wp));
        let accept = async {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let creds = match certs.get(&identity).await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "no certificate yet; refusing the connection");
                        continue;
                    }
                };
                let (handler, drain) = (handler.clone(), drain.clone());
                tokio::spawn(async move {
                    let settings = hbone::H2Settings::server();
                    if let Err(e) = hbone::serve_connection(
                        tcp,
                        creds.server_config.clone(),
                        handler,
                        &settings,
                        drain,
                    )
                    .await
                    {
                        tracing::debug!(error = %e, "HBONE connection ended");
                    }
                });
            }
        };
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("signals");
        tokio::select! {
            _ = accept => {}
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        drain.cancel();
        tracing::info!("waypoint stopping");
    });
}
