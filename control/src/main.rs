use clap::Parser;
use mesh_control::server::{self, ConfigSource, ServerConfig};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum SourceKind {
    Directory,
    Kubernetes,
}

/// The mesh's control plane: reads Kubernetes objects (from the API server, or from a
/// directory of manifests watched for changes), serves workloads and policies over delta
/// xDS, and signs workload certificates (node-authorized) on the same TLS port.
#[derive(Parser, Debug)]
#[command(
    name = "mesh-control",
    version,
    after_help = "Directory mode (the default):\n  mesh-control --config-dir ./manifests --state-dir /var/lib/mesh-control --tokens tokens.yaml\nKubernetes mode:\n  mesh-control --source kubernetes --state-dir /var/lib/mesh-control --tokens tokens.yaml\n\nClients trust <state-dir>/root-cert.pem and authenticate with a bearer token listed in the tokens file."
)]
struct Args {
    /// Directory of YAML manifests (Namespace, Pod, Service, ServiceAccount, Node,
    /// AuthorizationPolicy, PeerAuthentication, Gateway, HTTPRoute, GRPCRoute).
    /// Required with `--source directory`.
    #[arg(long, env = "CONFIG_DIR")]
    config_dir: Option<PathBuf>,
    /// Where configuration comes from: a directory of manifests, or the Kubernetes API
    /// (in-cluster service account, else KUBECONFIG).
    #[arg(long, value_enum, default_value = "directory")]
    source: SourceKind,
    /// With `--source kubernetes`: this kubeconfig instead of the in-cluster service
    /// account or `$KUBECONFIG`.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Where the CA root is kept (created on first start) and root-cert.pem is written.
    #[arg(long, env = "STATE_DIR")]
    state_dir: PathBuf,
    /// Use the CA in this read-only directory (ca-cert.pem, ca-key.pem, optional
    /// root-cert.pem; PKCS#8, SEC1 or PKCS#1 keys) instead of the one in --state-dir.
    #[arg(long, env = "CA_DIR")]
    ca_dir: Option<PathBuf>,
    /// Bootstrap tokens: `tokens: [{token: ..., node: NAME} | {token: ..., waypoint: NS/NAME}]`.
    /// Required in directory mode; optional with Kubernetes, where ztunnels, node agents
    /// and waypoints present service-account tokens checked by TokenReview.
    #[arg(long, env = "TOKENS_FILE")]
    tokens: Option<PathBuf>,
    /// Kubernetes mode: the audience callers' service-account tokens must carry
    /// (repeatable; ztunnel requests `istio-ca`).
    #[arg(long = "token-audience", default_values_t = ["istio-ca".to_string()])]
    token_audiences: Vec<String>,
    /// Kubernetes mode: service accounts (`namespace/name`) of the per-node programs
    /// (ztunnel, node agent); a token of theirs authenticates as the node it is bound to.
    #[arg(long = "node-proxy-account", default_values_t = ["mesh-system/ztunnel".to_string(), "mesh-system/mesh-cni".to_string()])]
    node_proxy_accounts: Vec<String>,
    /// xDS + CA (gRPC over TLS).
    #[arg(long, default_value = "0.0.0.0:15012")]
    listen: SocketAddr,
    /// Debug API for meshctl (JSON over HTTP).
    #[arg(long, default_value = "127.0.0.1:15014")]
    debug_listen: SocketAddr,
    /// `/ready` (503 with the reasons while not ready) and `/healthz` for the kubelet;
    /// off unless given (the debug API serves `/ready` too).
    #[arg(long)]
    readiness_listen: Option<SocketAddr>,
    /// DNS names on the serving certificate (repeatable).
    #[arg(long = "dns-name", default_values_t = ["mesh-control.mesh-system.svc".to_string(), "mesh-control.mesh-system.svc.cluster.local".to_string()])]
    dns_names: Vec<String>,
    /// IP addresses on the serving certificate (repeatable).
    #[arg(long = "ip-san")]
    ip_sans: Vec<IpAddr>,
    #[arg(long, env = "TRUST_DOMAIN", default_value = "cluster.local")]
    trust_domain: String,
    #[arg(long, env = "CLUSTER_ID", default_value = "Kubernetes")]
    cluster_id: String,
    /// Policies in this namespace apply mesh-wide.
    #[arg(long, default_value = "istio-system")]
    root_namespace: String,
    /// Namespaces whose pods are never enrolled (repeatable).
    #[arg(long = "exclude-namespace", default_values_t = ["kube-system".to_string()])]
    excluded_namespaces: Vec<String>,
    /// Kubernetes mode: the image of the waypoints deployed for istio-waypoint Gateways
    /// (with /usr/local/bin/waypoint). Unset: Gateways are not deployed by mesh-control.
    #[arg(long, env = "WAYPOINT_IMAGE")]
    waypoint_image: Option<String>,
    /// The xDS address waypoints dial; default https://<first --dns-name>:<--listen port>.
    #[arg(long)]
    waypoint_xds_address: Option<String>,
    /// Namespace of the Lease that elects the one replica deploying waypoints
    /// (mesh-control's own).
    #[arg(long, env = "POD_NAMESPACE", default_value = "mesh-system")]
    lease_namespace: String,
    /// This replica in the Lease; default its pod name (POD_NAME, else HOSTNAME).
    #[arg(long, env = "POD_NAME")]
    leader_identity: Option<String>,
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    log_level: String,
}

fn main() {
    let a = Args::parse();
    mesh_log::init_or_exit("mesh-control", &a.log_level, mesh_log::Format::Text);
    if let Err(e) = mesh_identity::SpiffeId::new(&a.trust_domain, "x", "x") {
        eprintln!("mesh-control: --trust-domain: {e}");
        std::process::exit(2);
    }
    if a.kubeconfig.is_some() && matches!(a.source, SourceKind::Directory) {
        eprintln!("mesh-control: --kubeconfig is only used with --source kubernetes");
        std::process::exit(2);
    }
    let source = match (a.source, a.config_dir) {
        (SourceKind::Directory, Some(dir)) => ConfigSource::Directory(dir),
        (SourceKind::Directory, None) => {
            eprintln!("mesh-control: --config-dir is required with --source directory");
            std::process::exit(2);
        }
        (SourceKind::Kubernetes, Some(_)) => {
            eprintln!("mesh-control: --config-dir is only used with --source directory");
            std::process::exit(2);
        }
        (SourceKind::Kubernetes, None) => ConfigSource::Kubernetes {
            kubeconfig: a.kubeconfig,
        },
    };
    let waypoints =
        a.waypoint_image.clone().map(
            |image| mesh_control::waypoint_deploy::WaypointDeployConfig {
                image,
                xds_address: a.waypoint_xds_address.clone().unwrap_or_else(|| {
                    format!(
                        "https://{}:{}",
                        a.dns_names
                            .first()
                            .map(String::as_str)
                            .unwrap_or("mesh-control"),
                        a.listen.port()
                    )
                }),
                trust_domain: a.trust_domain.clone(),
                cluster_id: a.cluster_id.clone(),
                log_level: a.log_level.clone(),
                lease: Some(mesh_control::leader::LeaseConfig {
                    namespace: a.lease_namespace.clone(),
                    name: "mesh-control-waypoints".into(),
                    identity: a
                        .leader_identity
                        .clone()
                        .or_else(|| std::env::var("HOSTNAME").ok())
                        // The pid alone is 1 in every container: a random suffix keeps
                        // replicas apart.
                        .unwrap_or_else(|| format!("mesh-control-{:016x}", rand::random::<u64>())),
                    duration: std::time::Duration::from_secs(15),
                    renew_every: std::time::Duration::from_secs(2),
                }),
            },
        );
    let cfg = ServerConfig {
        waypoints,
        source,
        state_dir: a.state_dir,
        ca_dir: a.ca_dir,
        tokens: a.tokens,
        token_audiences: a.token_audiences,
        node_proxy_accounts: a.node_proxy_accounts,
        listen: a.listen,
        debug_listen: a.debug_listen,
        readiness_listen: a.readiness_listen,
        dns_names: a.dns_names,
        ip_sans: a.ip_sans,
        trust_domain: a.trust_domain,
        cluster_id: a.cluster_id,
        root_namespace: a.root_namespace,
        excluded_namespaces: a.excluded_namespaces,
    };
    tracing::info!(config = %serde_json::to_string(&cfg).unwrap_or_default(), "starting mesh-control");
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    rt.block_on(async {
        if let Err(e) = server::start(cfg).await {
            tracing::error!("mesh-control failed to start: {e}");
            std::process::exit(1);
        }
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("signal handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("mesh-control stopping");
    });
}
