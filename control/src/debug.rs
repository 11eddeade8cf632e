//! The local debug API meshctl reads: `/debug/status`, `/debug/config_dump?node=N`,
//! `/debug/authz?from=SPIFFE&to=NS/POD&port=P`, `/ready`, and `/metrics` (Prometheus). Bound to localhost by default,
//! and up before xDS is served, so it can say why mesh-control is not ready. The
//! readiness listener (for the kubelet) serves `/ready`, `/healthz` and `/metrics` only.

use crate::grpc::Shared;
use crate::readiness::Readiness;
use http::StatusCode;
use mesh_admin::{Request, Response, Routes};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

pub(crate) use mesh_admin::percent_decode;

/// What the debug endpoints read: `shared` is set once xDS is served.
#[derive(Clone)]
pub struct DebugState {
    pub shared: Arc<OnceLock<Shared>>,
    pub readiness: Readiness,
    /// The mesh's trust domain, which `/debug/authz` checks identities against.
    pub trust_domain: String,
}

fn readiness(r: &Readiness) -> (StatusCode, Value) {
    let problems = r.problems();
    let code = if problems.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        json!({"ready": problems.is_empty(), "problems": problems}),
    )
}

/// `/debug/status`: readiness first, then (once serving) the configuration and clients.
pub fn status_of(state: &DebugState) -> Value {
    let (_, mut v) = readiness(&state.readiness);
    if let Some(shared) = state.shared.get()
        && let (Value::Object(out), Value::Object(more)) = (&mut v, status(shared))
    {
        out.extend(more);
    }
    v
}

pub fn status(shared: &Shared) -> Value {
    let g = shared.generation.borrow().clone();
    let clients: Vec<Value> = {
        let c = shared.clients.lock().expect("clients lock");
        let mut v: Vec<_> = c.values().cloned().collect();
        v.sort_by_key(|c| c.id);
        v.into_iter()
            .map(|c| {
                json!({"id": c.id, "principal": c.principal, "nodeId": c.node_id,
                       "connectedAt": c.connected_at, "types": c.types,
                       "acks": c.acks, "nacks": c.nacks, "lastNack": c.last_nack})
            })
            .collect()
    };
    let mut nodes: Vec<String> = g.objects.nodes.keys().cloned().collect();
    for p in g.objects.pods.values() {
        if let Some(n) = &p.spec.node_name
            && !nodes.contains(n)
        {
            nodes.push(n.clone());
        }
    }
    nodes.sort();
    let enrolled: BTreeMap<&String, Vec<String>> = g
        .resources
        .node_pods
        .iter()
        .map(|(n, pods)| {
            let names = pods
                .iter()
                .filter(|p| p.enrolled)
                .map(|p| format!("{}/{}", p.namespace, p.name))
                .collect();
            (n, names)
        })
        .collect();
    json!({
        "version": g.version,
        "nodes": nodes,
        "clients": clients,
        "enrolled": enrolled,
        "addresses": g.addresses.len(),
        "authorizations": g.authorizations.len(),
        // Policy and route findings are also logged as warnings; shown once, with their
        // fields.
        "warnings": g.resources.warnings.iter()
            .filter(|w| !g.resources.policy_findings.iter()
                .chain(&g.resources.route_findings)
                .any(|f| f.to_string() == **w))
            .collect::<Vec<_>>(),
        "policyFindings": g.resources.policy_findings,
        "routeFindings": g.resources.route_findings,
    })
}

pub fn config_dump(shared: &Shared, node: &str) -> Value {
    let want = format!("node/{node}");
    let c = shared.clients.lock().expect("clients lock");
    let clients: Vec<Value> = c
        .values()
        .filter(|c| c.principal == want)
        .map(|c| json!({"id": c.id, "nodeId": c.node_id, "held": c.held}))
        .collect();
    json!({"node": node, "clients": clients})
}

/// What `/metrics` shows: readiness, and once serving, the xDS clients and what they
/// rejected (Istio's istiod names where one exists, so its dashboards read them).
#[derive(Debug, Default, PartialEq)]
pub struct ControlMetrics {
    pub ready: bool,
    pub xds_clients: usize,
    pub xds_rejects: u64,
    pub addresses: usize,
    pub authorizations: usize,
}

pub fn control_metrics(state: &DebugState) -> ControlMetrics {
    let mut m = ControlMetrics {
        ready: state.readiness.problems().is_empty(),
        ..Default::default()
    };
    if let Some(shared) = state.shared.get() {
        let c = shared.clients.lock().expect("clients lock");
        m.xds_clients = c.len();
        m.xds_rejects = c.values().map(|c| c.nacks).sum();
        drop(c);
        let g = shared.generation.borrow().clone();
        m.addresses = g.addresses.len();
        m.authorizations = g.authorizations.len();
    }
    m
}

/// The Prometheus text format of `m`.
pub fn render_metrics(m: &ControlMetrics) -> String {
    let mut s = String::new();
    let mut one = |name: &str, kind: &str, help: &str, v: u64| {
        s.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}\n"
        ));
    };
    one(
        "mesh_control_ready",
        "gauge",
        "1 when mesh-control serves configuration",
        m.ready as u64,
    );
    one(
        "pilot_xds",
        "gauge",
        "Clients (ztunnels, node agents, waypoints) connected over xDS",
        m.xds_clients as u64,
    );
    one(
        "pilot_total_xds_rejects",
        "counter",
        "xDS responses rejected (NACKed) by the connected clients",
        m.xds_rejects,
    );
    one(
        "mesh_control_addresses",
        "gauge",
        "Workloads and services in the address table sent to ztunnels",
        m.addresses as u64,
    );
    one(
        "mesh_control_authorizations",
        "gauge",
        "Authorization policies sent to ztunnels",
        m.authorizations as u64,
    );
    s
}

fn respond(status: StatusCode, body: Value) -> Response {
    Response::new(
        status,
        "application/json",
        serde_json::to_vec_pretty(&body).unwrap_or_default(),
    )
}

fn metrics_page(state: &DebugState) -> Response {
    let mut page = render_metrics(&control_metrics(state));
    mesh_proto::process::append(&mut page, mesh_proto::process::Format::Prometheus);
    Response::new(StatusCode::OK, "text/plain; version=0.0.4", page)
}

/// What `/debug/config_dump` and `/debug/authz` answer before xDS is served.
fn not_serving(state: &DebugState) -> Response {
    respond(
        StatusCode::SERVICE_UNAVAILABLE,
        json!({"error": format!("not serving yet: {}", state.readiness.problems().join("; "))}),
    )
}

fn config_dump_page(state: &DebugState, req: &Request) -> Response {
    let Some(shared) = state.shared.get() else {
        return not_serving(state);
    };
    match req.param("node") {
        Some(n) => respond(StatusCode::OK, config_dump(shared, &n)),
        None => respond(StatusCode::BAD_REQUEST, json!({"error": "give ?node=NAME"})),
    }
}

fn authz_page(state: &DebugState, req: &Request) -> Response {
    let Some(shared) = state.shared.get() else {
        return not_serving(state);
    };
    let q: BTreeMap<String, String> = req
        .query
        .as_deref()
        .unwrap_or_default()
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), percent_decode(v)))
        .collect();
    let g = shared.generation.borrow().clone();
    match crate::authz_check::check(&g, &state.trust_domain, &q) {
        Ok(v) => respond(StatusCode::OK, v),
        Err(e) => respond(StatusCode::BAD_REQUEST, json!({"error": e})),
    }
}

/// The path table: the debug API, or with `readiness_only` the readiness listener's
/// `/ready`, `/healthz` and `/metrics` (the one a cluster's Prometheus can reach).
pub fn routes(state: DebugState, readiness_only: bool) -> Routes {
    let s = state.clone();
    let mut r = Routes::new()
        .get("/ready", move |_| {
            let (code, v) = readiness(&s.readiness);
            std::future::ready(respond(code, v))
        })
        .get("/healthz", |_| {
            std::future::ready(respond(StatusCode::OK, json!({"alive": true})))
        });
    let s = state.clone();
    r = r.get("/metrics", move |_| std::future::ready(metrics_page(&s)));
    if readiness_only {
        return r.not_found(|_| {
            std::future::ready(respond(
                StatusCode::NOT_FOUND,
                json!({"error": "unknown path", "paths": ["/ready", "/healthz", "/metrics"]}),
            ))
        });
    }
    let s = state.clone();
    r = r.get("/debug/status", move |_| {
        std::future::ready(respond(StatusCode::OK, status_of(&s)))
    });
    let s = state.clone();
    r = r.get("/debug/config_dump", move |req| {
        std::future::ready(config_dump_page(&s, &req))
    });
    let s = state;
    r.get("/debug/authz", move |req| std::future::ready(authz_page(&s, &req)))
        .not_found(|_| {
            std::future::ready(respond(
                StatusCode::NOT_FOUND,
                json!({"error": "unknown path", "paths": ["/debug/status", "/debug/config_dump?node=", "/debug/authz?from=&to=&port=", "/ready", "/metrics"]}),
            ))
        })
}

/// Serves the debug API (or, with `readiness_only`, `/ready`, `/healthz` and `/metrics`
/// alone) on `addr`.
pub async fn serve(
    addr: SocketAddr,
    state: DebugState,
    readiness_only: bool,
) -> Result<SocketAddr, mesh_admin::BindError> {
    let listener = mesh_admin::bind(addr).await?;
    let local = listener
        .local_addr()
        .map_err(|source| mesh_admin::BindError { addr, source })?;
    // The kubelet probes the readiness-only endpoint: an idle connection there is short-lived.
    let limits = if readiness_only {
        mesh_admin::Limits::serving_probes()
    } else {
        mesh_admin::Limits::default()
    };
    mesh_admin::spawn(listener, routes(state, readiness_only), limits);
    Ok(local)
}

#[cfg(test)]
mod tests {
    #[test]
    fn renders_prometheus_text() {
        let text = super::render_metrics(&super::ControlMetrics {
            ready: true,
            xds_clients: 5,
            xds_rejects: 2,
            addresses: 7,
            authorizations: 1,
        });
        assert!(
            text.contains("# TYPE pilot_xds gauge\npilot_xds 5\n"),
            "{text}"
        );
        assert!(text.contains("\npilot_total_xds_rejects 2\n"), "{text}");
        assert!(text.contains("\nmesh_control_ready 1\n"), "{text}");
        assert!(text.contains("\nmesh_control_addresses 7\n"), "{text}");
    }
}
