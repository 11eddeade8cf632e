//! HTTP endpoints: admin on localhost (config dump, log level, quit), Prometheus metrics,
//! readiness.

use crate::identity::CertManager;
use crate::inpod::manager::WorkloadManager;
use crate::metrics::Metrics;
use crate::state::State;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use serde_json::Value;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use tokio::net::TcpListener;

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

fn respond(
    status: StatusCode,
    content_type: &str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(body.into()))
        .expect("static response parts are valid")
}

async fn admin(a: Arc<AdminState>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    match (req.method(), path) {
        (&Method::GET, "/config_dump") => {
            let body = serde_json::to_vec_pretty(&config_dump(&a)).unwrap_or_default();
            respond(StatusCode::OK, "application/json", body)
        }
        (_, "/logging") => {
            let level = req.uri().query().and_then(|q| {
                q.split('&')
                    .find_map(|kv| kv.strip_prefix("level=").map(str::to_string))
            });
            match level {
                None => {
                    let cur = a.log_level.lock().expect("log lock").clone();
                    respond(
                        StatusCode::OK,
                        "text/plain",
                        format!("current log level: {cur}\n"),
                    )
                }
                Some(l) => match (a.log_reload)(&l) {
                    Ok(()) => {
                        *a.log_level.lock().expect("log lock") = l.clone();
                        respond(
                            StatusCode::OK,
                            "text/plain",
                            format!("log level set to {l}\n"),
                        )
                    }
                    Err(e) => respond(
                        StatusCode::BAD_REQUEST,
                        "text/plain",
                        format!("invalid level {l:?}: {e}\n"),
                    ),
                },
            }
        }
        (&Method::POST, "/quitquitquit") => {
            a.shutdown.cancel();
            respond(StatusCode::OK, "text/plain", "draining\n")
        }
        (&Method::GET, "/") => respond(
            StatusCode::OK,
            "text/plain",
            "ztunnel admin: /config_dump, /logging[?level=LEVEL], POST /quitquitquit\n",
        ),
        _ => respond(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    }
}

async fn metrics(a: Arc<AdminState>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    match req.uri().path() {
        "/metrics" | "/stats/prometheus" => {
            let mut page = a.metrics.encode();
            mesh_proto::process::append(&mut page, mesh_proto::process::Format::OpenMetrics);
            respond(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                page,
            )
        }
        _ => respond(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    }
}

async fn readiness(a: Arc<AdminState>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.uri().path() != "/healthz/ready" {
        return respond(StatusCode::NOT_FOUND, "text/plain", "not found\n");
    }
    let pending = (a.pending)();
    if pending.is_empty() {
        respond(StatusCode::OK, "text/plain", "ready\n")
    } else {
        respond(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
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

/// Serves one of the endpoints on `addr` until the process ends.
pub async fn serve(addr: SocketAddr, which: Endpoint, a: Arc<AdminState>) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let a = a.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let a = a.clone();
                    async move {
                        Ok::<_, std::convert::Infallible>(match which {
                            Endpoint::Admin => admin(a, req).await,
                            Endpoint::Metrics => metrics(a, req).await,
                            Endpoint::Readiness => readiness(a, req).await,
                        })
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    Ok(())
}
