use clap::Parser;
use mesh_threads::PerThread;
use mesh_xds::certs::{CertManager, CertSource};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use waypoint::normalize::PathNormalization;
use waypoint::proxy::{ConfigStore, Waypoint};
use waypoint::server::{Lifecycle, ServeConfig, Stopped};

/// The L7 waypoint of a namespace: HTTP routing (Gateway API HTTPRoute) and L7
/// authorization for the services bound to it, between ztunnels, over HBONE.
#[derive(Parser, Debug, serde::Serialize)]
#[command(name = "waypoint", version)]
#[command(mut_arg("xds_address", |a| a.required(true)))]
#[command(mut_arg("root_cert", |a| a.required(true)))]
#[command(mut_arg("token_file", |a| a.required(true)))]
struct Args {
    /// The waypoint's Gateway name (also its service account).
    #[arg(long, env = "WAYPOINT_NAME")]
    name: String,
    #[arg(long, env = "POD_NAMESPACE")]
    namespace: String,
    #[arg(long, env = "TRUST_DOMAIN", default_value = "cluster.local")]
    trust_domain: String,
    /// The control plane: --xds-address, --root-cert, --token-file (required here),
    /// --control-hostname, --cluster-id; the same flags as ztunnel's and the agent's.
    #[command(flatten)]
    #[serde(flatten)]
    control: mesh_xds::ControlPlaneArgs,
    /// `[::]` takes both families (IPv4 as well where IPv6 is off on the host).
    #[arg(long, default_value = "[::]:15008")]
    listen: SocketAddr,
    /// Metrics (`/metrics`) and readiness (`/healthz/ready`); both families, as ztunnel
    /// (an IPv6-only pod is probed on its IPv6 address).
    #[arg(long, default_value = "[::]:15020")]
    metrics_addr: SocketAddr,
    /// Readiness (`/healthz/ready`), on Istio's port.
    #[arg(long, default_value = "[::]:15021")]
    readiness_addr: SocketAddr,
    /// Admin (CPU and heap profiles under `/debug/pprof/`), localhost only as Envoy's
    /// admin in Istio's waypoints.
    #[arg(long, default_value = "127.0.0.1:15000")]
    admin_addr: SocketAddr,
    /// How request paths are normalised before routing and policy (Istio's mesh config
    /// `pathNormalization`): NONE, BASE, MERGE_SLASHES or DECODE_AND_MERGE_SLASHES.
    #[arg(long, env = "PATH_NORMALIZATION", default_value = "BASE", value_parser = parse_normalization)]
    #[serde(serialize_with = "display")]
    path_normalization: PathNormalization,
    /// On SIGTERM, how long in-flight requests may take to finish before the waypoint
    /// exits anyway (5s, 500ms, 1m, 1.5s).
    #[arg(long, default_value = "5s", value_parser = mesh_proto::duration::parse)]
    #[serde(serialize_with = "display_duration")]
    drain_deadline: Duration,
    /// On SIGTERM, how long the waypoint keeps accepting new connections, its readiness
    /// already failing, before it drains: in a cluster, endpoints are removed while the
    /// pod is told to stop, and ztunnels may still send to it meanwhile.
    #[arg(long, default_value = "0s", value_parser = mesh_proto::duration::parse)]
    #[serde(serialize_with = "display_duration")]
    drain_delay: Duration,
    /// OTLP/gRPC collector for traces (a server span per request, a client span per
    /// upstream attempt), e.g. http://otel-collector:4317; no tracing when unset.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")]
    otlp_endpoint: Option<String>,
    /// Consecutive 5xx or connection failures that eject an endpoint (outlier detection).
    #[arg(long, default_value_t = 5)]
    outlier_consecutive_errors: u32,
    /// First ejection time in seconds; the n-th lasts n times this (up to 10×).
    #[arg(long, default_value_t = 30)]
    outlier_base_ejection_secs: u64,
    /// Requests in flight per destination service before new ones get 503.
    #[arg(long, default_value_t = 4096)]
    max_requests_per_service: usize,
    /// Idle HTTP/1.1 connections kept open per endpoint, on each data thread, for reuse
    /// (each data thread also has its own HTTP/2 and HBONE connections to an endpoint).
    #[arg(long, default_value_t = 32)]
    max_idle_per_endpoint: usize,
    /// Idle upstream connections are closed after this many seconds.
    #[arg(long, default_value_t = 60)]
    upstream_idle_timeout_secs: u64,
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    log_level: String,
    /// Data threads: each HBONE connection, its requests and the upstream connections they
    /// use run on one of them, a single-threaded runtime of its own (the one with the
    /// fewest connections when it is accepted); the accept loop, xDS and admin run on
    /// threads of their own.
    #[arg(long, env = "WAYPOINT_WORKER_THREADS", default_value_t = 2,
          value_parser = clap::value_parser!(u16).range(1..=256))]
    worker_threads: u16,
}

fn parse_normalization(s: &str) -> Result<PathNormalization, String> {
    s.parse()
}

fn display<S: serde::Serializer>(v: &PathNormalization, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

fn display_duration<S: serde::Serializer>(v: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&format_args!("{v:?}"))
}

async fn serve_admin(
    addr: SocketAddr,
    metrics: Arc<waypoint::metrics::Metrics>,
    lifecycle: Arc<Lifecycle>,
) {
    let bound = match tokio::net::TcpListener::bind(addr).await {
        // `[::]` on a host without IPv6: IPv4 only, as the HBONE listener.
        Err(e) if addr.ip() == std::net::Ipv6Addr::UNSPECIFIED => {
            let v4 = SocketAddr::from(([0, 0, 0, 0], addr.port()));
            tracing::warn!(error = %e, listen = %v4, "no IPv6 admin listener; IPv4 only");
            tokio::net::TcpListener::bind(v4).await
        }
        other => other,
    };
    match bound {
        Ok(l) => waypoint::admin::serve(l, metrics, lifecycle).await,
        Err(e) => tracing::warn!(%addr, error = %e, "cannot serve metrics and readiness"),
    }
}

fn main() {
    let a = Args::parse();
    mesh_log::init_or_exit("waypoint", &a.log_level, mesh_log::Format::Text);
    let identity = match mesh_identity::SpiffeId::new(&a.trust_domain, &a.namespace, &a.name) {
        Ok(id) => id,
        Err(e) => {
            eprintln!("waypoint: invalid identity: {e}");
            std::process::exit(2);
        }
    };
    let cp = match a.control.control_plane() {
        Ok(cp) => cp,
        Err(e) => {
            eprintln!("waypoint: {e}");
            std::process::exit(2);
        }
    };
    tracing::info!(config = %serde_json::to_string(&a).unwrap_or_default(), %identity, "starting the waypoint");
    // Freed memory goes back to the system after load (see `mesh_memory`): without it the
    // waypoint stayed near its peak (33.8 of 37.9 MiB 10 s after the bench's load).
    mesh_memory::spawn_trimmer();
    let data_plane = match mesh_threads::DataPlane::start("waypoint-data", a.worker_threads.into())
    {
        Ok(p) => p,
        Err(e) => {
            eprintln!("waypoint: cannot start the data threads: {e}");
            std::process::exit(1);
        }
    };
    // Control work only: the data path runs on `data_plane`. The accept loop runs on this
    // thread (`block_on`), xDS, certificates and admin on the one worker, so a long
    // configuration push never holds up new connections.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(async move {
        let source = match CertSource::control_plane(&cp, Duration::from_secs(24 * 3600)) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!("{e}");
                std::process::exit(2);
            }
        };
        let certs = CertManager::new(source);
        let config = Arc::new(ConfigStore::default());
        let lifecycle = Lifecycle::new();
        let node = mesh_proto::envoy_core::Node {
            id: format!("waypoint~{}~{}.{}", a.name, a.name, a.namespace),
            user_agent_name: "waypoint".into(),
            ..Default::default()
        };
        let types = waypoint::xds::types();
        tokio::spawn(mesh_xds::run(
            cp,
            node,
            types,
            waypoint::xds::Apply {
                config: config.clone(),
                lifecycle: lifecycle.clone(),
            },
        ));
        let metrics = Arc::new(waypoint::metrics::Metrics::new());
        tokio::spawn(serve_admin(
            a.metrics_addr,
            metrics.clone(),
            lifecycle.clone(),
        ));
        tokio::spawn(waypoint::admin::serve_local(a.admin_addr));
        if a.readiness_addr != a.metrics_addr {
            tokio::spawn(serve_admin(
                a.readiness_addr,
                metrics.clone(),
                lifecycle.clone(),
            ));
        }
        let limits = waypoint::upstream_pool::PoolLimits {
            max_idle_per_endpoint: a.max_idle_per_endpoint,
            idle_timeout: std::time::Duration::from_secs(a.upstream_idle_timeout_secs.max(1)),
        };
        let pool = PerThread::new(&data_plane, || {
            Arc::new(waypoint::upstream_pool::UpstreamPool::new(limits))
        });
        let wp = Arc::new(Waypoint {
            identity: identity.clone(),
            config,
            certs,
            client: PerThread::new(&data_plane, || {
                hbone::Client::new(hbone::TcpDialer, hbone::ClientSettings::default())
            }),
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
            normalization: a.path_normalization,
            shutdown: CancellationToken::new(),
            idle_grace: waypoint::in_flight::idle_grace(a.drain_deadline),
            tracer: match &a.otlp_endpoint {
                Some(e) => mesh_trace::Tracer::otlp(
                    e.clone(),
                    mesh_trace::Origin {
                        service: format!("{}.{}", a.name, a.namespace),
                        scope: "mesh-waypoint",
                    },
                ),
                None => mesh_trace::Tracer::disabled(),
            },
            mirrors: Default::default(),
        });
        for p in pool.all() {
            tokio::spawn(p.clone().run_sweeper());
        }
        tracing::info!("waiting for addresses, routes and policies from the control plane");
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("signals");
        let shutdown = async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            tracing::info!("waypoint stopping");
        };
        let cfg = ServeConfig {
            listen: a.listen,
            cert_wait: waypoint::proxy::CERT_WAIT,
            drain_deadline: a.drain_deadline,
            drain_delay: a.drain_delay,
            data_plane,
        };
        match waypoint::server::serve(wp, lifecycle, cfg, shutdown).await {
            Ok(Stopped::DeadlineExceeded { open }) => {
                tracing::warn!(open, "waypoint stopped with connections still open")
            }
            Ok(Stopped::Drained | Stopped::BeforeSync) => tracing::info!("waypoint stopped"),
            Err(e) => {
                tracing::error!("cannot listen on {}: {e}", a.listen);
                std::process::exit(1);
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_control_plane_flags_stay_required() {
        let all = [
            "--name=w",
            "--namespace=ns",
            "--xds-address=https://cp:15012",
            "--root-cert=/r.pem",
            "--token-file=/t",
        ];
        let a = Args::try_parse_from(std::iter::once("waypoint").chain(all)).unwrap();
        assert_eq!(a.control.token_file, Some("/t".into()));
        assert_eq!(a.control.cluster_id, "Kubernetes");
        for missing in &all[2..] {
            let args = all.iter().filter(|a| *a != missing);
            let e = Args::try_parse_from(std::iter::once(&"waypoint").chain(args)).unwrap_err();
            assert_eq!(
                e.kind(),
                clap::error::ErrorKind::MissingRequiredArgument,
                "{missing}"
            );
        }
    }
}
