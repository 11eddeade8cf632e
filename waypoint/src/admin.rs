//! The waypoint's metrics and readiness endpoint (`--metrics-addr`, `--readiness-addr`):
//! `GET /healthz/ready`, and the metrics at `GET /metrics` (and `/stats/prometheus`, as
//! Istio's agent serves them on 15020). Served by the shared admin server. And the
//! admin endpoint (`--admin-addr`, localhost): CPU and heap profiles.

use crate::metrics::Metrics;
use crate::server::Lifecycle;
use http::StatusCode;
use mesh_admin::{Response, Routes};
use std::sync::Arc;
use tokio::net::TcpListener;

/// What `/healthz/ready` answers for the list of what is missing.
pub fn readiness(missing: &[&str]) -> Response {
    if missing.is_empty() {
        Response::text(StatusCode::OK, "ready\n")
    } else {
        Response::text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", missing.join(", ")),
        )
    }
}

fn metrics_page(m: &Metrics) -> Response {
    let mut page = m.encode();
    mesh_proto::process::append(&mut page, mesh_proto::process::Format::Prometheus);
    Response::new(StatusCode::OK, "text/plain; version=0.0.4", page)
}

pub fn routes(metrics: Arc<Metrics>, lifecycle: Arc<Lifecycle>) -> Routes {
    let m2 = metrics.clone();
    Routes::new()
        .get("/healthz/ready", move |_| {
            std::future::ready(readiness(&lifecycle.not_ready()))
        })
        .get("/metrics", move |_| {
            std::future::ready(metrics_page(&metrics))
        })
        .get("/stats/prometheus", move |_| {
            std::future::ready(metrics_page(&m2))
        })
}

/// Serves [`routes`] on `listener` until the process ends.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, lifecycle: Arc<Lifecycle>) {
    mesh_admin::serve(
        listener,
        routes(metrics, lifecycle),
        mesh_admin::Limits::default(),
    )
    .await
}

/// The admin endpoint's paths: `/` lists them; `/debug/pprof/profile?seconds=N`,
/// `/debug/pprof/heap`.
pub fn admin_routes() -> Routes {
    mesh_admin::profile::routes(Routes::new().get("/", |_| async {
        Response::text(
            StatusCode::OK,
            "waypoint admin: /debug/pprof/profile[?seconds=N], /debug/pprof/heap\n",
        )
    }))
}

/// Serves [`admin_routes`] on `addr` until the process ends.
pub async fn serve_local(addr: std::net::SocketAddr) {
    match mesh_admin::bind(addr).await {
        Ok(l) => mesh_admin::serve(l, admin_routes(), mesh_admin::Limits::default()).await,
        Err(e) => tracing::warn!("no admin endpoint: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_says_what_is_missing() {
        assert_eq!(readiness(&[]).body, "ready\n");
        let r = readiness(&["addresses not synced", "no certificate"]);
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.body, "not ready: addresses not synced, no certificate\n");
    }
}
