//! The waypoint's data path: HBONE in (the CONNECT authority names the original
//! destination: a Service VIP:port or a pod IP:port), HTTP routing and L7 policy for HTTP
//! ports, plain TCP for the others, and HBONE out to the chosen endpoint's ztunnel.

use crate::authz::{self, Decision, Policy};
use crate::metrics::{Metrics, RequestLabels};
use crate::route::{self, RequestInfo, Route};
use crate::upstream_pool::{EndpointKey, UpstreamPool};
use bytes::Bytes;
use hbone::{Authority, ConnectHandler, InboundConnect, Refusal, Responder};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use mesh_discovery::{Destination, Service, State, Workload};
use mesh_identity::SpiffeId;
use mesh_proto::workload::AppProtocol;
use mesh_xds::certs::CertManager;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Instant;

pub type Body = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

fn boxed_response(r: Response<Incoming>) -> Response<Body> {
    r.map(|b| {
        b.map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
            .boxed()
    })
}

/// Awaits `fut`, answering 504 if it takes longer than `limit`.
async fn within<T>(
    limit: Option<std::time::Duration>,
    fut: impl std::future::Future<Output = Result<T, (StatusCode, String)>>,
) -> Result<T, (StatusCode, String)> {
    match limit {
        Some(t) => tokio::time::timeout(t, fut).await.unwrap_or_else(|_| {
            Err((
                StatusCode::GATEWAY_TIMEOUT,
                "upstream request timeout".into(),
            ))
        }),
        None => fut.await,
    }
}

/// Reads a whole body of at most `limit` bytes (written out rather than with
/// `http_body_util::Limited`, whose error conversion on a boxed error defeats the
/// compiler's lifetime inference in this async code).
async fn buffer_body(mut body: Body, limit: usize) -> Result<Bytes, String> {
    let mut out = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| e.to_string())?;
        if let Some(data) = frame.data_ref() {
            if out.len() + data.len() > limit {
                return Err(format!("body larger than {limit} bytes"));
            }
            out.extend_from_slice(data);
        }
    }
    Ok(out.freeze())
}

/// The response body, counted; both sizes are recorded when it has been sent.
fn counted_response(
    resp: Response<Body>,
    metrics: Arc<Metrics>,
    labels: RequestLabels,
    request_bytes: Arc<std::sync::atomic::AtomicU64>,
) -> Response<Body> {
    let done: Box<dyn FnOnce(u64) + Send + Sync> = Box::new(move |response| {
        let request = request_bytes.load(std::sync::atomic::Ordering::Relaxed);
        metrics.record_sizes(&labels, request, response);
    });
    resp.map(|b| {
        let count = Arc::new(std::sync::atomic::AtomicU64::new(0));
        crate::counted::Counted::new(b, count, Some(done)).boxed()
    })
}

/// The incoming request body, boxed and counted (a plain fn: a closure here trips
/// higher-ranked lifetime inference in the connection future).
fn counted_request(b: Incoming, count: Arc<std::sync::atomic::AtomicU64>) -> Body {
    fn boxed(e: hyper::Error) -> Box<dyn std::error::Error + Send + Sync + 'static> {
        Box::new(e)
    }
    crate::counted::Counted::new(b.map_err(boxed).boxed(), count, None).boxed()
}

/// Everything the waypoint knows, from xDS.
#[derive(Default)]
pub struct Config {
    pub discovery: State,
    pub routes: BTreeMap<String, Route>,
    pub policies: BTreeMap<String, (Policy, Vec<Target>)>,
}

/// What an L7 policy targets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Gateway,
    Service { namespace: String, name: String },
}

pub struct Waypoint {
    pub identity: SpiffeId,
    pub config: Arc<RwLock<Config>>,
    pub certs: Arc<CertManager>,
    pub client: hbone::Client,
    pub metrics: Arc<Metrics>,
    pub budget: Arc<RetryBudget>,
    pub balancer: Arc<crate::balancer::Balancer>,
    pub pool: Arc<UpstreamPool>,
}

/// Bodies larger than this are not buffered for retries or mirroring (413).
const MAX_BUFFERED_BODY: usize = 4 << 20;

/// Retries may add at most 20% (and at least 3 concurrent) on top of the requests in
/// flight, so a failing backend is not hammered by its own retries.
#[derive(Default, Debug)]
pub struct RetryBudget {
    in_flight: std::sync::atomic::AtomicUsize,
    retrying: std::sync::atomic::AtomicUsize,
}

impl RetryBudget {
    pub fn request_started(&self) {
        self.in_flight
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    pub fn request_done(&self) {
        self.in_flight
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
    fn try_retry(&self) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        let allowed = (self.in_flight.load(Relaxed) / 5).max(3);
        if self.retrying.fetch_add(1, Relaxed) < allowed {
            true
        } else {
            self.retrying.fetch_sub(1, Relaxed);
            false
        }
    }
    fn retry_done(&self) {
        self.retrying
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

fn local(status: StatusCode, body: String) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "text/plain")
        .body(Full::new(Bytes::from(body)).map_err(|e| match e {}).boxed())
        .expect("valid response")
}

fn is_http(p: AppProtocol) -> bool {
    matches!(
        p,
        AppProtocol::Http11 | AppProtocol::Http2 | AppProtocol::Grpc
    )
}

/// The request's view of where it is going.
#[derive(Clone)]
struct Target2 {
    service: Arc<Service>,
    port: u16,
    protocol: AppProtocol,
}

struct Conn {
    source: SpiffeId,
    source_addr: SocketAddr,
    source_workload: Option<Arc<Workload>>,
    target: Target2,
}

impl Waypoint {
    /// Opens an HBONE tunnel to `endpoint` on `port` (through its ztunnel on 15008).
    async fn tunnel_to(&self, ep: &Workload, port: u16) -> Result<hbone::Tunnel, String> {
        let ip = *ep.addresses.first().ok_or("endpoint has no address")?;
        let creds = self
            .certs
            .get(&self.identity)
            .await
            .map_err(|e| e.to_string())?;
        let key = hbone::PoolKey::new(
            self.identity.clone(),
            vec![ep.identity.clone()],
            SocketAddr::new(ip, mesh_proto::ports::HBONE),
            None,
        );
        let req = hbone::ConnectRequest::new(SocketAddr::new(ip, port));
        let est = self
            .client
            .connect(&key, &creds.cert, &req)
            .await
            .map_err(|e| e.to_string())?;
        Ok(est.tunnel)
    }

    async fn serve_http(self: Arc<Self>, conn: Arc<Conn>, tunnel: hbone::Tunnel) {
        let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
            let (wp, conn) = (self.clone(), conn.clone());
            async move { Ok::<_, std::convert::Infallible>(wp.request(conn, req).await) }
        });
        let io = hyper_util::rt::TokioIo::new(tunnel);
        if let Err(e) =
            hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                .serve_connection(io, svc)
                .await
        {
            tracing::debug!(error = %e, "HTTP connection through the waypoint ended");
        }
    }

    async fn request(&self, conn: Arc<Conn>, req: Request<Incoming>) -> Response<Body> {
        let start = Instant::now();
        let request_bytes = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut req = req.map(|b| counted_request(b, request_bytes.clone()));
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let host = req
            .uri()
            .host()
            .map(str::to_string)
            .or_else(|| {
                req.headers()
                    .get(http::header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_string)
            })
            .unwrap_or_else(|| conn.target.service.hostname.clone());
        if !req.headers().contains_key("traceparent")
            && let Ok(v) = hbone::TraceParent::random().to_string().parse()
        {
            req.headers_mut().insert("traceparent", v);
        }
        self.budget.request_started();
        let mut labels = RequestLabels::new(
            &conn.source,
            conn.source_workload.as_deref(),
            &conn.target.service,
            conn.target.protocol,
        );
        let (resp, backend) = self
            .route_and_forward(&conn, req, &method, &path, &host, &mut labels)
            .await;
        self.budget.request_done();
        labels.response_code = resp.status().as_u16();
        self.metrics.record(&labels, start.elapsed());
        let resp = counted_response(resp, self.metrics.clone(), labels.clone(), request_bytes);
        tracing::info!(target: "access", method = %method, path = %path, status = resp.status().as_u16(),
            src.identity = %conn.source, src.addr = %conn.source_addr, dst.service = %conn.target.service.hostname,
            backend = %backend, duration = %format!("{}ms", start.elapsed().as_millis()), "request");
        resp
    }

    async fn route_and_forward(
        &self,
        conn: &Conn,
        mut req: Request<Body>,
        method: &http::Method,
        path: &str,
        host: &str,
        labels: &mut RequestLabels,
    ) -> (Response<Body>, String) {
        let svc = &conn.target.service;
        // 1. L7 policy.
        let decision = {
            let cfg = self.config.read().expect("config lock");
            let applicable = cfg.policies.values().filter(|(_, targets)| {
                targets.iter().any(|t| match t {
                    Target::Gateway => true,
                    Target::Service { namespace, name } => {
                        *namespace == svc.namespace && *name == svc.name
                    }
                })
            });
            authz::evaluate(
                applicable.map(|(p, _)| p),
                &authz::Request {
                    source: Some(&conn.source),
                    source_ip: conn.source_addr.ip(),
                    method: method.as_str(),
                    path,
                    host,
                    port: conn.target.port,
                    headers: req.headers(),
                },
            )
        };
        if let Decision::Deny { policy, reason } = decision {
            tracing::warn!(target: "access", method = %method, src.identity = %conn.source, path = %path,
                policy = %policy, reason = %reason, "request denied by authorization policy");
            return (
                local(
                    StatusCode::FORBIDDEN,
                    format!("RBAC: access denied by {policy}\n"),
                ),
                "-".into(),
            );
        }
        // 2. Route: the first matching rule by precedence; no route → the service itself.
        let (backend_svc, backend_port, rule) = {
            let cfg = self.config.read().expect("config lock");
            let attached: Vec<Route> = cfg
                .routes
                .values()
                .filter(|r| r.attaches_to(&svc.namespace, &svc.name, conn.target.port))
                .cloned()
                .collect();
            let info = RequestInfo {
                method,
                path,
                query: req.uri().query(),
                headers: req.headers(),
            };
            match route::select(&attached, &info) {
                Some((r, rule)) => {
                    let total = route::total_weight(rule);
                    let redirects = rule.filters.iter().any(|f| f.request_redirect.is_some());
                    if total == 0 && redirects {
                        // Answered by the redirect below; no backend is needed.
                        (svc.clone(), conn.target.port, Some(rule.clone()))
                    } else if total == 0 {
                        return (
                            local(
                                StatusCode::INTERNAL_SERVER_ERROR,
                                format!("route {}/{} has no backend\n", r.namespace, r.name),
                            ),
                            "-".into(),
                        );
                    } else {
                        let b = route::pick_backend(rule, rand::random_range(0..total))
                            .expect("weight > 0");
                        let ns = b.namespace.clone().unwrap_or_else(|| r.namespace.clone());
                        let found = cfg
                            .discovery
                            .services()
                            .find(|s| s.namespace == ns && s.name == b.name)
                            .cloned();
                        match found {
                            Some(s) => (s, b.port.unwrap_or(conn.target.port), Some(rule.clone())),
                            None => {
                                return (
                                    local(
                                        StatusCode::SERVICE_UNAVAILABLE,
                                        format!("backend {ns}/{} is not a known service\n", b.name),
                                    ),
                                    "-".into(),
                                );
                            }
                        }
                    }
                }
                None => (svc.clone(), conn.target.port, None),
            }
        };
        let backend = format!(
            "{}/{}:{backend_port}",
            backend_svc.namespace, backend_svc.name
        );
        let filters: Vec<route::Filter> = rule.iter().flat_map(|r| r.filters.clone()).collect();
        let matched_prefix = rule.as_ref().and_then(|r| {
            route::matched_prefix(
                r,
                &RequestInfo {
                    method,
                    path,
                    query: req.uri().query(),
                    headers: req.headers(),
                },
            )
        });
        // Faults first (as Envoy's fault filter runs before the router): delay, then abort.
        if let Some(fault) = filters.iter().find_map(|f| f.fault.as_ref()) {
            if let Some(d) = &fault.delay
                && route::fault_applies(d.percentage.as_ref(), rand::random::<f64>() * 100.0)
                && let Some(t) = route::parse_gateway_duration(&d.fixed_delay)
            {
                tokio::time::sleep(t).await;
            }
            if let Some(a) = &fault.abort
                && route::fault_applies(a.percentage.as_ref(), rand::random::<f64>() * 100.0)
            {
                let code = StatusCode::from_u16(a.http_status)
                    .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                return (local(code, "fault filter abort\n".into()), "fault".into());
            }
        }
        // Redirects are answered here.
        if let Some(r) = filters.iter().find_map(|f| f.request_redirect.as_ref()) {
            let (code, location) = route::redirect(
                r,
                "http",
                host,
                path,
                req.uri().query(),
                matched_prefix.as_deref(),
            );
            let resp = Response::builder()
                .status(code)
                .header(http::header::LOCATION, location)
                .body(Full::new(Bytes::new()).map_err(|e| match e {}).boxed())
                .expect("valid redirect");
            return (resp, "redirect".into());
        }
        for f in &filters {
            if let Some(m) = &f.request_header_modifier {
                m.apply(req.headers_mut());
            }
            if let Some(rw) = &f.url_rewrite {
                if let Some(h) = rw.hostname.as_deref().and_then(|h| h.parse().ok()) {
                    req.headers_mut().insert(http::header::HOST, h);
                }
                if let Some(pm) = &rw.path {
                    let new_path = route::modify_path(pm, path, matched_prefix.as_deref());
                    let pq = match req.uri().query() {
                        Some(q) => format!("{new_path}?{q}"),
                        None => new_path,
                    };
                    if let Ok(uri) = pq.parse() {
                        *req.uri_mut() = uri;
                    }
                }
            }
        }
        let retry = rule.as_ref().and_then(|r| r.retry.clone());
        let mirror = filters.iter().find_map(|f| f.request_mirror.clone());
        let timeouts = rule
            .as_ref()
            .and_then(|r| r.timeouts.clone())
            .unwrap_or_default();
        let overall = timeouts
            .request
            .as_deref()
            .and_then(route::parse_gateway_duration);
        let per_try = timeouts
            .backend_request
            .as_deref()
            .and_then(route::parse_gateway_duration);
        let attempt = self.attempts(
            conn,
            req,
            &backend_svc,
            backend_port,
            retry,
            mirror,
            per_try,
            labels,
        );
        let result = within(overall, attempt).await;
        match result {
            Ok(mut resp) => {
                for f in &filters {
                    if let Some(m) = &f.response_header_modifier {
                        m.apply(resp.headers_mut());
                    }
                }
                (resp, backend)
            }
            Err((code, msg)) => (local(code, format!("{msg}\n")), backend),
        }
    }

    /// One try: an endpoint chosen by the balancer (two choices, outliers ejected, the
    /// service's in-flight limit), the request forwarded within `per_try`, and the
    /// outcome reported back for outlier detection.
    async fn balanced(
        &self,
        req: Request<Body>,
        svc: &Service,
        port: u16,
        protocol: AppProtocol,
        per_try: Option<std::time::Duration>,
        labels: &mut RequestLabels,
    ) -> Result<Response<Body>, (StatusCode, String)> {
        use crate::balancer::Choice;
        let candidates = {
            let cfg = self.config.read().expect("config lock");
            cfg.discovery.endpoint_candidates(svc, port, None)
        };
        let uids: Vec<&str> = candidates.iter().map(|(w, _)| w.uid.as_str()).collect();
        let rolls = (
            rand::random::<u32>() as usize,
            rand::random::<u32>() as usize,
        );
        let (ep, target_port) = match self.balancer.choose(&uids, rolls, Instant::now()) {
            Choice::Endpoint(i) => candidates[i].clone(),
            Choice::NoEndpoint => {
                return Err((
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "no healthy endpoint for {}/{}:{port}",
                        svc.namespace, svc.name
                    ),
                ));
            }
            Choice::Overflow => {
                return Err((
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "upstream overflow: {}/{} has too many requests in flight",
                        svc.namespace, svc.name
                    ),
                ));
            }
        };
        labels.set_destination(&ep);
        let in_flight = self.balancer.begin(&ep.uid);
        let fut = self.forward(req, &ep, target_port, protocol);
        let result = within(per_try, fut).await;
        drop(in_flight);
        let ok = match &result {
            Ok(r) => !r.status().is_server_error(),
            Err((code, _)) => !code.is_server_error(),
        };
        if self.balancer.report(&ep.uid, ok, &uids, Instant::now()) {
            tracing::warn!(endpoint = %ep.uid, service = %format!("{}/{}", svc.namespace, svc.name), "endpoint ejected after consecutive failures");
        }
        result
    }

    /// Sends the request, mirrors it, and retries per the rule (with a fresh endpoint each
    /// time, jittered backoff and a retry budget). Bodies are buffered only when a retry or
    /// mirror needs them again.
    #[allow(clippy::too_many_arguments)]
    async fn attempts(
        &self,
        conn: &Conn,
        req: Request<Body>,
        svc: &Service,
        port: u16,
        retry: Option<route::Retry>,
        mirror: Option<route::Mirror>,
        per_try: Option<std::time::Duration>,
        labels: &mut RequestLabels,
    ) -> Result<Response<Body>, (StatusCode, String)> {
        if retry.is_none() && mirror.is_none() {
            return self
                .balanced(req, svc, port, conn.target.protocol, per_try, labels)
                .await;
        }
        let (parts, body) = req.into_parts();
        let body = buffer_body(body, MAX_BUFFERED_BODY).await.map_err(|e| {
            (
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body not buffered for retry/mirror: {e}"),
            )
        })?;
        let copy = |uri: &http::Uri| {
            let mut r = Request::builder()
                .method(parts.method.clone())
                .uri(uri.clone())
                .version(parts.version);
            if let Some(h) = r.headers_mut() {
                *h = parts.headers.clone();
            }
            r.body(Full::new(body.clone()).map_err(|e| match e {}).boxed())
                .expect("valid request")
        };
        if let Some(m) = mirror {
            let ns = m
                .backend_ref
                .namespace
                .clone()
                .unwrap_or_else(|| svc.namespace.clone());
            // The copy goes to any endpoint of the mirror service; its outcome is ignored,
            // so it takes no part in balancing or outlier detection.
            let target = {
                let cfg = self.config.read().expect("config lock");
                cfg.discovery
                    .services()
                    .find(|s| s.namespace == ns && s.name == m.backend_ref.name)
                    .and_then(|ms| {
                        cfg.discovery
                            .pick_endpoint(ms, m.backend_ref.port.unwrap_or(port), None)
                    })
            };
            if let Some((ep, tp)) = target {
                let req = copy(&parts.uri);
                let this = self.clone_for_mirror();
                let protocol = conn.target.protocol;
                tokio::spawn(async move {
                    let _ = this.forward(req, &ep, tp, protocol).await;
                });
            }
        }
        let retries = retry.as_ref().map_or(0, |r| r.attempts.unwrap_or(2));
        let codes: Vec<u16> = retry.as_ref().map(|r| r.codes.clone()).unwrap_or_default();
        let backoff = retry
            .as_ref()
            .and_then(|r| r.backoff.as_deref())
            .and_then(route::parse_gateway_duration)
            .unwrap_or(std::time::Duration::from_millis(25));
        let mut tried = 0;
        loop {
            let result = self
                .balanced(
                    copy(&parts.uri),
                    svc,
                    port,
                    conn.target.protocol,
                    per_try,
                    labels,
                )
                .await;
            let retriable = match &result {
                Ok(r) => codes.contains(&r.status().as_u16()),
                Err((code, _)) => matches!(
                    *code,
                    StatusCode::SERVICE_UNAVAILABLE
                        | StatusCode::BAD_GATEWAY
                        | StatusCode::GATEWAY_TIMEOUT
                ),
            };
            if !retriable || tried >= retries || !self.budget.try_retry() {
                return result;
            }
            tried += 1;
            tracing::debug!(attempt = tried, "retrying");
            let jitter = rand::random::<f64>() * 0.5 + 0.75;
            tokio::time::sleep(backoff.mul_f64(jitter)).await;
            self.budget.retry_done();
        }
    }

    fn clone_for_mirror(&self) -> Arc<Waypoint> {
        Arc::new(Waypoint {
            identity: self.identity.clone(),
            config: self.config.clone(),
            certs: self.certs.clone(),
            client: self.client.clone(),
            metrics: self.metrics.clone(),
            budget: self.budget.clone(),
            balancer: self.balancer.clone(),
            pool: self.pool.clone(),
        })
    }

    async fn forward(
        &self,
        mut req: Request<Body>,
        ep: &Workload,
        port: u16,
        protocol: AppProtocol,
    ) -> Result<Response<Body>, (StatusCode, String)> {
        let unavailable = |e: String| {
            (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("upstream connect error: {e}"),
            )
        };
        let key = EndpointKey {
            workload_uid: ep.uid.clone(),
            addr: SocketAddr::new(
                *ep.addresses
                    .first()
                    .ok_or_else(|| unavailable("endpoint has no address".into()))?,
                port,
            ),
        };
        let resp = if matches!(protocol, AppProtocol::Http2 | AppProtocol::Grpc) {
            let mut sender = match self.pool.h2(&key, Instant::now()) {
                Some(s) => s,
                None => {
                    let dial = self.pool.h2_dial_lock(&key);
                    let _dialing = dial.lock().await;
                    if let Some(s) = self.pool.h2(&key, Instant::now()) {
                        s
                    } else {
                        let tunnel = self.tunnel_to(ep, port).await.map_err(unavailable)?;
                        let (sender, conn) = hyper::client::conn::http2::handshake(
                            hyper_util::rt::TokioExecutor::new(),
                            hyper_util::rt::TokioIo::new(tunnel),
                        )
                        .await
                        .map_err(|e| unavailable(e.to_string()))?;
                        tokio::spawn(conn);
                        self.pool
                            .set_h2(key.clone(), sender.clone(), Instant::now());
                        sender
                    }
                }
            };
            sender.send_request(req).await
        } else {
            // HTTP/1.1 upstream: origin-form URI, Host kept.
            if let Some(pq) = req.uri().path_and_query().cloned() {
                if !req.headers().contains_key(http::header::HOST)
                    && let Some(a) = req.uri().authority().and_then(|a| a.as_str().parse().ok())
                {
                    req.headers_mut().insert(http::header::HOST, a);
                }
                *req.uri_mut() = pq.as_str().parse().expect("path is a valid URI");
            }
            *req.version_mut() = http::Version::HTTP_11;
            // An idle connection may have been closed by the endpoint meanwhile: the
            // request comes back unsent and goes on the next one (or a new one).
            while let Some(mut sender) = self.pool.take_h1(&key, Instant::now()) {
                match sender.try_send_request(req).await {
                    Ok(resp) => {
                        self.recycle_h1(key, sender);
                        return Ok(boxed_response(resp));
                    }
                    Err(mut e) => match e.take_message() {
                        Some(unsent) => req = unsent,
                        None => {
                            return Err((
                                StatusCode::BAD_GATEWAY,
                                format!("upstream error: {}", e.into_error()),
                            ));
                        }
                    },
                }
            }
            let tunnel = self.tunnel_to(ep, port).await.map_err(unavailable)?;
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tunnel))
                    .await
                    .map_err(|e| unavailable(e.to_string()))?;
            tokio::spawn(conn);
            let resp = sender.send_request(req).await;
            if resp.is_ok() {
                self.recycle_h1(key, sender);
            }
            resp
        };
        resp.map(boxed_response)
            .map_err(|e| (StatusCode::BAD_GATEWAY, format!("upstream error: {e}")))
    }

    /// Back to the pool once the response body has been read to the end (or never, when
    /// the connection closes first).
    fn recycle_h1(
        &self,
        key: EndpointKey,
        mut sender: hyper::client::conn::http1::SendRequest<Body>,
    ) {
        let pool = self.pool.clone();
        tokio::spawn(async move {
            if sender.ready().await.is_ok() {
                pool.put_h1(key, sender, Instant::now());
            }
        });
    }

    /// Non-HTTP ports: TCP through to an endpoint.
    async fn serve_tcp(&self, conn: &Conn, tunnel: hbone::Tunnel) {
        let picked = {
            let cfg = self.config.read().expect("config lock");
            cfg.discovery
                .pick_endpoint(&conn.target.service, conn.target.port, None)
        };
        let Some((ep, port)) = picked else { return };
        let Ok(upstream) = self.tunnel_to(&ep, port).await else {
            return;
        };
        let (mut a, mut b) = (tunnel, upstream);
        let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
    }
}

pub struct Handler(pub Arc<Waypoint>);

impl ConnectHandler for Handler {
    async fn handle(&self, req: InboundConnect, respond: Responder) {
        let wp = self.0.clone();
        let Authority::Addr(dst) = req.request.authority else {
            return respond.refuse(&Refusal::BadRequest(
                "the waypoint expects an ip:port authority".into(),
            ));
        };
        let (target, source_workload) = {
            let cfg = wp.config.read().expect("config lock");
            let source = cfg
                .discovery
                .workload_by_ip("", req.peer_addr.ip())
                .cloned();
            let target = match cfg.discovery.destination("", dst.ip()) {
                Some(Destination::Service(svc)) => svc
                    .ports
                    .iter()
                    .find(|p| p.service_port == dst.port())
                    .map(|p| Target2 {
                        service: svc.clone(),
                        port: dst.port(),
                        protocol: p.app_protocol,
                    }),
                _ => None,
            };
            (target, source)
        };
        let Some(target) = target else {
            return respond.refuse(&Refusal::Unavailable(format!(
                "{dst} is not a service port this waypoint knows"
            )));
        };
        let conn = Arc::new(Conn {
            source: req.peer_identity.clone(),
            source_addr: req.peer_addr,
            source_workload,
            target,
        });
        let Ok(tunnel) = respond.accept(Default::default()) else {
            return;
        };
        if is_http(conn.target.protocol) {
            wp.serve_http(conn, tunnel).await;
        } else {
            wp.serve_tcp(&conn, tunnel).await;
        }
    }
}
