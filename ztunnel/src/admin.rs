//! HTTP endpoints: admin on localhost (config dump, log level, quit), Prometheus metrics,
//! readiness.

use crate::identity::CertManager;
use crate::inpod::manager::WorkloadManager;
use crate::metrics::Metrics;
use crate::state::State;
use http::{Method, StatusCode};
use mesh_admin::{Request, Response, Routes};
use serde_json::Value;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};

pub type LogReload = Arc<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

pub struct AdminState {
    pub state: Arc<RwLock<State>>,
    pub certs: Arc<CertManager>,
    pub manager: Arc<Mutex<WorkloadManager>>,
    pub metrics: Arc<Metrics>,
    pub config: Value,
    pub log_reload: LogReload,
    pub log_level: Mutex<String>,
    pub shutdown: tokio_util::sync::CancellationToken,
    /// Returns the list of things not yet ready (empty: ready).
    pub pending: Arc<dyn Fn() -> Vec<&'static str> + Send + Sync>,
    /// Serving, handed over or draining.
    pub lifecycle: Arc<crate::handover::Status>,
}

/// The dump `istioctl ztunnel-config` reads (see [`crate::config_dump`]).
pub fn config_dump(a: &AdminState) -> Value {
    let pods = a.manager.lock().expect("manager lock").pods();
    let certs = a.certs.status();
    let st = a.state.read().expect("state lock");
    let mut dump = crate::config_dump::config_dump(&st, &certs, &pods, &a.config);
    // Ours, beside Istio's keys (its reader ignores unknown ones).
    dump["handover"] = a.lifecycle.json();
    dump
}

async fn logging(a: Arc<AdminState>, req: Request) -> Response {
    match req.param("level") {
        None => {
            let cur = a.log_level.lock().expect("log lock").clone();
            Response::text(StatusCode::OK, format!("current log level: {cur}\n"))
        }
        Some(l) => match (a.log_reload)(&l) {
            Ok(()) => {
                *a.log_level.lock().expect("log lock") = l.clone();
                Response::text(StatusCode::OK, format!("log level set to {l}\n"))
            }
            Err(e) => Response::text(
                StatusCode::BAD_REQUEST,
                format!("invalid level {l:?}: {e}\n"),
            ),
        },
    }
}

fn metrics_page(a: &AdminState) -> Response {
    let mut page = a.metrics.encode();
    mesh_proto::process::append(&mut page, mesh_proto::process::Format::OpenMetrics);
    Response::new(
        StatusCode::OK,
        "application/openmetrics-text; version=1.0.0; charset=utf-8",
        page,
    )
}

fn readiness(a: &AdminState) -> Response {
    let pending = (a.pending)();
    if pending.is_empty() {
        Response::text(StatusCode::OK, "ready\n")
    } else {
        Response::text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("not ready, pending: {}\n", pending.join(", ")),
        )
    }
}

#[derive(Clone, Copy)]
pub enum Endpoint {
    Admin,
    Metrics,
    Readiness,
}

/// The path table of one endpoint.
pub fn routes(which: Endpoint, a: Arc<AdminState>) -> Routes {
    match which {
        Endpoint::Admin => {
            let (a1, a2, a3) = (a.clone(), a.clone(), a);
            let routes = Routes::new()
                .get("/", |_| async {
                    Response::text(
                        StatusCode::OK,
                        "ztunnel admin: /config_dump, /logging[?level=LEVEL], POST /quitquitquit, /debug/pprof/profile[?seconds=N], /debug/pprof/heap\n",
                    )
                })
                .get("/config_dump", move |_| {
                    let body = serde_json::to_vec_pretty(&config_dump(&a1)).unwrap_or_default();
                    std::future::ready(Response::new(StatusCode::OK, "application/json", body))
                })
                .any("/logging", move |req| logging(a2.clone(), req))
                .method(Method::POST, "/quitquitquit", move |_| {
                    a3.shutdown.cancel();
                    std::future::ready(Response::text(StatusCode::OK, "draining\n"))
                });
            // Localhost only, as the rest of the admin endpoint.
            mesh_admin::profile::routes(routes)
        }
        Endpoint::Metrics => {
            let a2 = a.clone();
            Routes::new()
                .get("/metrics", move |_| std::future::ready(metrics_page(&a)))
                .get("/stats/prometheus", move |_| {
                    std::future::ready(metrics_page(&a2))
                })
        }
        Endpoint::Readiness => {
            Routes::new().get("/healthz/ready", move |_| std::future::ready(readiness(&a)))
        }
    }
}

/// Serves one of the endpoints on `addr` until the process ends.
pub async fn serve(addr: SocketAddr, which: Endpoint, a: Arc<AdminState>) -> std::io::Result<()> {
    let listener = mesh_admin::bind(addr).await.map_err(|e| e.source)?;
    // The kubelet probes the readiness endpoint: an idle connection there is short-lived.
    let limits = match which {
        Endpoint::Readiness => mesh_admin::Limits::serving_probes(),
        Endpoint::Admin | Endpoint::Metrics => mesh_admin::Limits::default(),
    };
    mesh_admin::spawn(listener, routes(which, a), limits);
    Ok(())
}
