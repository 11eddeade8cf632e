//! HTTP endpoints: admin on localhost (config dump, log level, quit), Prometheus metrics,
//! readiness.

use crate::identity::CertManager;
use crate::inpod::manager::WorkloadManager;
use crate::metrics::Metrics;
use crate::state::{GatewayAddress, State};
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use serde_json::{Value, json};
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
}

fn gateway_json(g: &Option<GatewayAddress>) -> Value {
    match g {
        None => Value::Null,
        Some(GatewayAddress::Ip { ip, port }) => json!({"address": ip.to_string(), "port": port}),
        Some(GatewayAddress::Hostname {
            namespace,
            hostname,
            port,
        }) => {
            json!({"service": format!("{namespace}/{hostname}"), "port": port})
        }
    }
}

pub fn config_dump(a: &AdminState) -> Value {
    let st = a.state.read().expect("state lock");
    let mut workloads: Vec<Value> = st
        .workloads()
        .map(|w| {
            json!({
                "uid": w.uid, "name": w.name, "namespace": w.namespace,
                "addresses": w.addresses.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
                "node": w.node, "protocol": if w.hbone { "HBONE" } else { "NONE" },
                "identity": w.identity.to_string(), "healthy": w.healthy,
                "waypoint": gateway_json(&w.waypoint),
                "services": w.services.keys().collect::<Vec<_>>(),
                "authorizationPolicies": w.authorization_policies,
            })
        })
        .collect();
    workloads.sort_by_key(|v| v["uid"].as_str().unwrap_or_default().to_string());
    let mut services: Vec<Value> = st
        .services()
        .map(|s| {
            json!({
                "name": s.name, "namespace": s.namespace, "hostname": s.hostname,
                "vips": s.vips.iter().map(|(n, ip)| format!("{n}/{ip}")).collect::<Vec<_>>(),
                "ports": s.ports.iter().map(|p| json!({"servicePort": p.service_port, "targetPort": p.target_port})).collect::<Vec<_>>(),
                "waypoint": gateway_json(&s.waypoint),
            })
        })
        .collect();
    services.sort_by_key(|v| v["hostname"].as_str().unwrap_or_default().to_string());
    let mut policies: Vec<Value> = st
        .policies()
        .map(|p| {
            json!({
                "name": p.name, "namespace": p.namespace, "scope": format!("{:?}", p.scope),
                "action": format!("{:?}", p.action), "dryRun": p.dry_run, "rules": p.rules.len(),
            })
        })
        .collect();
    policies.sort_by_key(|v| format!("{}/{}", v["namespace"], v["name"]));
    drop(st);
    json!({
        "workloads": workloads,
        "services": services,
        "policies": policies,
        "certificates": a.certs.status(),
        "workloadState": a.manager.lock().expect("manager lock").pods(),
        "config": a.config,
        "version": env!("CARGO_PKG_VERSION"),
    })
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
        "/metrics" | "/stats/prometheus" => respond(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            a.metrics.encode(),
        ),
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
