//! Runs the control plane: config source → index → delta ADS + CA over TLS, and a local
//! debug API for meshctl.

use crate::auth::Tokens;
use crate::generation::Generation;
use crate::grpc::{Ads, Ca, Shared};
use crate::index::IndexConfig;
use crate::manifest::Objects;
use crate::readiness::{Readiness, SourceState};
use crate::source::{self, DirSource};
use crate::token_review::TokenReviewer;
use mesh_identity::ca::CertificateAuthority;
use mesh_proto::ca::istio_certificate_service_server::IstioCertificateServiceServer;
use mesh_proto::discovery::aggregated_discovery_service_server::AggregatedDiscoveryServiceServer;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;

#[derive(Clone, Debug, serde::Serialize)]
pub struct ServerConfig {
    pub source: ConfigSource,
    pub state_dir: PathBuf,
    /// A read-only CA (e.g. a mounted Secret) instead of the one kept in `state_dir`.
    pub ca_dir: Option<PathBuf>,
    /// Bootstrap tokens file; required in directory mode, optional with Kubernetes
    /// (whose callers present service-account tokens).
    pub tokens: Option<PathBuf>,
    /// Kubernetes mode: the audience service-account tokens must carry.
    pub token_audiences: Vec<String>,
    /// Kubernetes mode: `namespace/name` of the ztunnel and node agent service accounts.
    pub node_proxy_accounts: Vec<String>,
    pub listen: SocketAddr,
    pub debug_listen: SocketAddr,
    /// `/ready` and `/healthz` only, for the kubelet (the debug API stays on localhost).
    pub readiness_listen: Option<SocketAddr>,
    pub dns_names: Vec<String>,
    /// Kubernetes mode: deploy a waypoint for every istio-waypoint Gateway (None: off).
    pub waypoints: Option<crate::waypoint_deploy::WaypointDeployConfig>,
    pub ip_sans: Vec<IpAddr>,
    pub trust_domain: String,
    pub cluster_id: String,
    pub root_namespace: String,
    pub excluded_namespaces: Vec<String>,
}

/// Where the mesh's configuration (namespaces, pods, services, policies, routes) comes from.
#[derive(Clone, Debug, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ConfigSource {
    /// A directory of YAML manifests, re-read when it changes.
    Directory(PathBuf),
    /// The Kubernetes API server: this kubeconfig file, else the in-cluster service
    /// account, else `$KUBECONFIG` / `~/.kube/config`.
    Kubernetes { kubeconfig: Option<PathBuf> },
}

/// Starts the chosen source: its snapshots arrive on the returned channel (None until the
/// first complete one), and the state of each thing it reads goes to `readiness`.
fn spawn_source(
    source: &ConfigSource,
    kube: Option<kube::Client>,
    readiness: &Readiness,
) -> Result<watch::Receiver<Option<Arc<Objects>>>, String> {
    let (tx, rx) = watch::channel(None::<Arc<Objects>>);
    match source {
        ConfigSource::Directory(dir) => {
            let mut src = DirSource::new(dir);
            src.scan()?;
            tx.send_replace(Some(Arc::new(src.objects())));
            readiness.set("directory", SourceState::Synced);
            tokio::spawn(source::watch(src, Duration::from_millis(250), move |o| {
                tx.send_replace(Some(Arc::new(o)));
            }));
        }
        ConfigSource::Kubernetes { .. } => {
            let client = kube.ok_or("no Kubernetes client")?;
            tracing::info!("listing and watching the Kubernetes API");
            tokio::spawn(crate::kube_source::run(
                client,
                readiness.clone(),
                move |o| {
                    tx.send_replace(Some(o));
                },
            ));
        }
    }
    Ok(rx)
}

/// The source's first complete snapshot. Nothing is served before it: serving an empty
/// set would tell every ztunnel to forget its workloads (and its policies).
async fn first_snapshot(
    rx: &mut watch::Receiver<Option<Arc<Objects>>>,
) -> Result<Arc<Objects>, String> {
    loop {
        let first = rx.borrow_and_update().clone();
        if let Some(first) = first {
            return Ok(first);
        }
        rx.changed()
            .await
            .map_err(|_| "the config source stopped before its first snapshot".to_string())?;
    }
}

/// Loads the CA from `ca_dir` when given (read-only, e.g. a mounted Secret: it must hold
/// `ca-cert.pem` and `ca-key.pem`, optionally the `root-cert.pem` bundle), else from
/// `state_dir`, creating and persisting a new root there on first start. Always writes
/// `<state_dir>/root-cert.pem` (the bundle clients trust).
pub fn load_or_create_ca(
    state_dir: &Path,
    ca_dir: Option<&Path>,
    trust_domain: &str,
) -> Result<CertificateAuthority, String> {
    use mesh_identity::bootstrap::{
        Origin, has_ca, load_ca, load_or_create_ca as load_or_create_ca_in,
    };
    std::fs::create_dir_all(state_dir).map_err(|e| format!("{}: {e}", state_dir.display()))?;
    if let Some(dir) = ca_dir
        && !has_ca(dir)
    {
        return Err(format!(
            "no CA in {}: expected ca-cert.pem and ca-key.pem (and optionally root-cert.pem, cert-chain.pem)",
            dir.display()
        ));
    }
    let ca = match ca_dir {
        Some(dir) => load_ca(dir, trust_domain),
        None => load_or_create_ca_in(state_dir, trust_domain).map(|(ca, origin)| {
            if origin == Origin::Created {
                tracing::info!(dir = %state_dir.display(), "created a new mesh root CA");
            }
            ca
        }),
    }
    .map_err(|e| e.to_string())?;
    let bundle = state_dir.join("root-cert.pem");
    std::fs::write(&bundle, ca.roots_pem()).map_err(|e| format!("{}: {e}", bundle.display()))?;
    Ok(ca)
}

/// Re-reads the tokens file when it changes (nodes and waypoints come and go); a bad
/// file is reported and the previous tokens stay in force.
async fn watch_tokens(path: PathBuf, tokens: Arc<RwLock<Tokens>>) {
    let stamp = |p: &Path| {
        std::fs::metadata(p)
            .and_then(|m| Ok((m.modified()?, m.len())))
            .ok()
    };
    let mut last = stamp(&path);
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = stamp(&path);
        if now == last {
            continue;
        }
        last = now;
        match Tokens::load(&path) {
            Ok(t) => {
                *tokens.write().expect("tokens lock") = t;
                tracing::info!(file = %path.display(), "tokens reloaded");
            }
            Err(e) => {
                tracing::error!(error = %e, "tokens file rejected; keeping the previous tokens")
            }
        }
    }
}

/// Builds a generation on a blocking thread: the index over every object is CPU work that
/// would stall xDS streams, CA requests and watches sharing the async runtime. What did
/// not change is taken from `previous` (see [`Generation::build`]).
async fn build_off_runtime(
    version: u64,
    objects: Arc<Objects>,
    previous: Option<Arc<Generation>>,
    cfg: &IndexConfig,
) -> Result<Arc<Generation>, String> {
    let cfg = cfg.clone();
    tokio::task::spawn_blocking(move || {
        Arc::new(Generation::build(
            version,
            objects,
            previous.as_deref(),
            &cfg,
        ))
    })
    .await
    .map_err(|e| format!("building the configuration failed: {e}"))
}

/// A running control plane (its listeners are bound when this returns).
pub struct Running {
    pub grpc_addr: SocketAddr,
    pub debug_addr: SocketAddr,
    pub readiness_addr: Option<SocketAddr>,
    pub readiness: Readiness,
    pub shared: Shared,
}

/// A control plane whose debug and readiness endpoints are up (and say why it is not
/// ready) and whose source is being read; xDS and the CA are served by [`Starting::serve`].
pub struct Starting {
    pub debug_addr: SocketAddr,
    pub readiness_addr: Option<SocketAddr>,
    pub readiness: Readiness,
    cfg: ServerConfig,
    kube: Option<kube::Client>,
    tokens: Arc<RwLock<Tokens>>,
    reviewer: Option<Arc<TokenReviewer>>,
    ca: CertificateAuthority,
    serving_cert: (String, String),
    updates: watch::Receiver<Option<Arc<Objects>>>,
    shared: Arc<OnceLock<Shared>>,
}

/// Binds, waits for the first complete configuration, then serves.
pub async fn start(cfg: ServerConfig) -> Result<Running, String> {
    bind(cfg).await?.serve().await
}

/// Loads credentials and the CA, starts the source and binds the debug and readiness
/// endpoints.
pub async fn bind(cfg: ServerConfig) -> Result<Starting, String> {
    let kube_config = match &cfg.source {
        ConfigSource::Kubernetes { kubeconfig } => Some(
            mesh_kube::config(kubeconfig.as_deref())
                .await
                .map_err(|e| e.to_string())?,
        ),
        ConfigSource::Directory(_) => None,
    };
    let kube = kube_config
        .clone()
        .map(mesh_kube::client)
        .transpose()
        .map_err(|e| e.to_string())?;
    let tokens = match (&cfg.tokens, &kube) {
        (Some(path), _) => {
            let tokens = Arc::new(RwLock::new(Tokens::load(path)?));
            tokio::spawn(watch_tokens(path.clone(), tokens.clone()));
            tokens
        }
        (None, Some(_)) => Arc::new(RwLock::new(Tokens::default())),
        (None, None) => {
            return Err("a tokens file is required in directory mode (--tokens)".into());
        }
    };
    let reviewer = kube_config
        .map(crate::token_review::review_client)
        .transpose()
        .map_err(|e| e.to_string())?
        .map(|client| {
            Arc::new(TokenReviewer::new(
                client,
                cfg.token_audiences.clone(),
                cfg.node_proxy_accounts.clone(),
            ))
        });
    let ca = load_or_create_ca(&cfg.state_dir, cfg.ca_dir.as_deref(), &cfg.trust_domain)?;
    let serving_cert = ca
        .issue_server_cert(
            &cfg.dns_names,
            &cfg.ip_sans,
            Duration::from_secs(365 * 86400),
        )
        .map_err(|e| format!("serving certificate: {e}"))?;
    let readiness = Readiness::default();
    let shared = Arc::new(OnceLock::new());
    let debug = crate::debug::DebugState {
        shared: shared.clone(),
        readiness: readiness.clone(),
        trust_domain: cfg.trust_domain.clone(),
    };
    let debug_addr = crate::debug::serve(cfg.debug_listen, debug.clone(), false)
        .await
        .map_err(|e| e.to_string())?;
    let readiness_addr = match cfg.readiness_listen {
        Some(addr) => Some(
            crate::debug::serve(addr, debug, true)
                .await
                .map_err(|e| e.to_string())?,
        ),
        None => None,
    };
    let updates = spawn_source(&cfg.source, kube.clone(), &readiness)?;
    Ok(Starting {
        debug_addr,
        readiness_addr,
        readiness,
        cfg,
        kube,
        tokens,
        reviewer,
        ca,
        serving_cert,
        updates,
        shared,
    })
}

impl Starting {
    /// Waits for the source's first complete snapshot (forever if a required kind cannot
    /// be read), then serves xDS and the CA.
    pub async fn serve(self) -> Result<Running, String> {
        let Starting {
            debug_addr,
            readiness_addr,
            readiness,
            cfg,
            kube,
            tokens,
            reviewer,
            ca,
            serving_cert: (chain, key),
            mut updates,
            shared: shared_cell,
        } = self;
        let index_cfg = IndexConfig {
            cluster_id: cfg.cluster_id.clone(),
            trust_domain: cfg.trust_domain.clone(),
            root_namespace: cfg.root_namespace.clone(),
            excluded_namespaces: cfg.excluded_namespaces.clone(),
            ..Default::default()
        };

        // Config source → generations.
        let objects = first_snapshot(&mut updates).await?;
        let ca = Arc::new(RwLock::new(ca));
        match (&kube, &cfg.waypoints) {
            (Some(client), Some(wp)) => {
                let ca = ca.clone();
                tokio::spawn(crate::waypoint_deploy::run(
                    client.clone(),
                    wp.clone(),
                    updates.clone(),
                    move || ca.read().expect("ca lock").roots_pem(),
                ));
            }
            (None, Some(_)) => {
                tracing::warn!("waypoint deployment needs --source kubernetes; ignored")
            }
            _ => {}
        }
        let first = build_off_runtime(1, objects, None, &index_cfg).await?;
        for w in &first.resources.warnings {
            tracing::warn!("{w}");
        }
        let (gen_tx, gen_rx) = watch::channel(first.clone());
        let build_state = readiness.clone();
        tokio::spawn(async move {
            let mut version = 1;
            let mut previous = first;
            while updates.changed().await.is_ok() {
                let Some(objects) = updates.borrow_and_update().clone() else {
                    continue;
                };
                version += 1;
                let g =
                    match build_off_runtime(version, objects, Some(previous.clone()), &index_cfg)
                        .await
                    {
                        Ok(g) => {
                            build_state.set("configuration", SourceState::Synced);
                            g
                        }
                        // A build that panicked (a bug meeting some input): the last good
                        // configuration stays served and streams stay open; not ready, with
                        // the reason, until a later change builds.
                        Err(e) => {
                            tracing::error!("{e}; still serving version {}", previous.version);
                            build_state.set(
                                "configuration",
                                SourceState::Unavailable(format!(
                                    "{e}; serving the last good configuration (version {})",
                                    previous.version
                                )),
                            );
                            continue;
                        }
                    };
                for w in &g.resources.warnings {
                    tracing::warn!("{w}");
                }
                tracing::info!(
                    version,
                    addresses = g.addresses.len(),
                    policies = g.authorizations.len(),
                    "configuration updated"
                );
                previous = g.clone();
                gen_tx.send_replace(g);
            }
        });

        let shared = Shared {
            generation: gen_rx,
            tokens,
            reviewer,
            ca,
            clients: Arc::new(Mutex::new(Default::default())),
            next_client: Arc::new(AtomicU64::new(1)),
        };
        let listener = TcpListener::bind(cfg.listen)
            .await
            .map_err(|e| format!("cannot listen on {}: {e}", cfg.listen))?;
        let grpc_addr = listener.local_addr().map_err(|e| e.to_string())?;
        let identity = tonic::transport::Identity::from_pem(chain, key);
        let server = tonic::transport::Server::builder()
            .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
            .map_err(|e| format!("TLS: {e}"))?
            .http2_keepalive_interval(Some(Duration::from_secs(10)))
            .http2_keepalive_timeout(Some(Duration::from_secs(20)))
            .add_service(AggregatedDiscoveryServiceServer::new(Ads(shared.clone())))
            .add_service(IstioCertificateServiceServer::new(Ca(shared.clone())));
        tokio::spawn(async move {
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            if let Err(e) = server.serve_with_incoming(incoming).await {
                tracing::error!(error = %e, "gRPC server stopped");
            }
        });
        let _ = shared_cell.set(shared.clone());
        readiness.set_serving();
        tracing::info!(%grpc_addr, %debug_addr, "mesh-control serving xDS and CA");
        Ok(Running {
            grpc_addr,
            debug_addr,
            readiness_addr,
            readiness,
            shared,
        })
    }
}
