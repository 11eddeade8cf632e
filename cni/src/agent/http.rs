//! The agent's HTTP endpoint (`--readiness-addr`): `GET /readyz` (200 once the control
//! plane's view arrived), `GET /metrics` (Prometheus text) and `GET /enrolment` (each
//! enrolled pod's enrolment state, JSON; loopback peers only). Served by the shared
//! admin server: each connection on its own task, bounded in time and size.

use super::Agent;
use http::StatusCode;
use mesh_admin::{Request, Response, Routes};
use std::sync::Arc;

/// The Prometheus text format's content-type: Prometheus 3 refuses a scrape without
/// one (unless told a fallback).
pub const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// What `/metrics` answers.
pub fn metrics_page(page: String) -> Response {
    Response::new(StatusCode::OK, METRICS_CONTENT_TYPE, page)
}

/// What `/readyz` answers; bodies (and the absence of a content-type) as they always were.
pub fn readiness(ready: bool) -> Response {
    if ready {
        Response::untyped(StatusCode::OK, "ready\n")
    } else {
        Response::untyped(
            StatusCode::SERVICE_UNAVAILABLE,
            "waiting for the control plane\n",
        )
    }
}

async fn enrolment(agent: Arc<Agent>, req: Request) -> Response {
    if !super::may_read_enrolment(req.peer.ip()) {
        return Response::untyped(
            StatusCode::FORBIDDEN,
            "/enrolment is served to the node itself only\n",
        );
    }
    let report = agent.enrolment().await;
    Response::untyped(
        StatusCode::OK,
        serde_json::to_string(&report).unwrap_or_default(),
    )
}

pub fn routes(agent: Arc<Agent>) -> Routes {
    let (a1, a2, a3) = (agent.clone(), agent.clone(), agent);
    Routes::new()
        .get("/readyz", move |_| {
            std::future::ready(readiness(a1.ready()))
        })
        .get("/metrics", move |_| {
            std::future::ready(metrics_page(a2.metrics().render()))
        })
        .get("/enrolment", move |req| enrolment(a3.clone(), req))
}

/// Serves [`routes`] on `addr` until the process ends.
pub async fn serve(
    addr: std::net::SocketAddr,
    agent: Arc<Agent>,
) -> Result<(), mesh_admin::BindError> {
    let l = mesh_admin::bind(addr).await?;
    // The address actually bound (port 0 picks one): what tests and operators connect to.
    let bound = l.local_addr().unwrap_or(addr);
    tracing::info!(addr = %bound, "serving /readyz, /metrics and /enrolment");
    // The kubelet probes /readyz here.
    mesh_admin::serve(l, routes(agent), mesh_admin::Limits::serving_probes()).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_typed_for_prometheus() {
        let r = metrics_page("a_total 1\n".into());
        assert_eq!(
            (r.status, r.content_type, &r.body[..]),
            (
                StatusCode::OK,
                Some("text/plain; version=0.0.4; charset=utf-8"),
                &b"a_total 1\n"[..]
            )
        );
    }

    #[test]
    fn readiness_bodies() {
        let r = readiness(true);
        assert_eq!(
            (r.status, r.content_type, &r.body[..]),
            (StatusCode::OK, None, &b"ready\n"[..])
        );
        let r = readiness(false);
        assert_eq!(
            (r.status, &r.body[..]),
            (
                StatusCode::SERVICE_UNAVAILABLE,
                &b"waiting for the control plane\n"[..]
            )
        );
    }
}
