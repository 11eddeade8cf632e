//! The waypoint's data path: HBONE in (the CONNECT authority names the original
//! destination: a Service VIP:port or a pod IP:port, which must be bound to this
//! waypoint), request normalisation, HTTP routing and L7 policy for HTTP ports, L4 policy
//! and plain TCP for the others, and HBONE out to the chosen endpoint's ztunnel.
//!
//! This is the I/O shell: every decision is a stage of [`crate::pipeline`], and the
//! configuration is read per request from one [`Snapshot`] of the current version.

use crate::authz::Decision;
use crate::binding::{self, Bound, Dest, Me};
use crate::body::local;
use crate::in_flight::{AtDrain, InFlight};
use crate::metrics::{Metrics, RequestLabels, TcpConnection, set_tcp_destination, tcp_labels};
use crate::normalize::PathNormalization;
use crate::pipeline::mirror::{self, MirrorLimit};
use crate::pipeline::policy::{Peer, Seen};
use crate::pipeline::timeout::within;
use crate::pipeline::{Local, UpstreamError, admit, fault, filters, policy, retry, routing};
use crate::route::{RequestInfo, Rule};
use crate::snapshot::Snapshot;
use crate::upstream_pool::{EndpointKey, UpstreamPool};
use bytes::Bytes;
use hbone::{Authority, ConnectHandler, InboundConnect, Refusal, Responder};
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use mesh_discovery::{Service, Workload};
use mesh_identity::SpiffeId;
use mesh_proto::workload::AppProtocol;
use mesh_threads::PerThread;
use mesh_xds::certs::CertManager;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

pub use crate::body::Body;
pub use crate::pipeline::retry::RetryBudget;
pub use crate::snapshot::{Config, ConfigStore, Target};

/// How long the data path waits for the waypoint's certificate (a slow CA delays, never
/// blocks, a connection).
pub const CERT_WAIT: Duration = Duration::from_secs(5);

/// The upstream's response, without its connection's headers; 502 if its framing
/// cannot be forwarded faithfully.
fn boxed_response(mut r: Response<Incoming>) -> Result<Response<Body>, UpstreamError> {
    crate::hop::check_transfer_coding(r.headers())
        .map_err(|e| UpstreamError::BadResponse(e.to_string()))?;
    crate::hop::strip(r.headers_mut());
    Ok(r.map(|b| {
        b.map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
            .boxed()
    }))
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

/// A stage's own answer.
fn answer(stop: &Local) -> Response<Body> {
    local(stop.status(), format!("{stop}\n"))
}

/// The answer when no try produced a response.
fn failed(e: &UpstreamError) -> Response<Body> {
    local(e.status(), format!("{e}\n"))
}

pub struct Waypoint {
    pub identity: SpiffeId,
    /// The configuration, one compiled snapshot per version.
    pub config: Arc<ConfigStore>,
    pub certs: Arc<CertManager>,
    /// HBONE connections to endpoints, one pool per data thread: a request's upstream
    /// tunnel rides an HTTP/2 connection driven on the request's own thread.
    pub client: PerThread<hbone::Client>,
    pub metrics: Arc<Metrics>,
    pub budget: Arc<RetryBudget>,
    pub balancer: Arc<crate::balancer::Balancer>,
    /// HTTP connections to endpoints, one pool per data thread, as `client`.
    pub pool: PerThread<Arc<UpstreamPool>>,
    /// How request paths are normalised before routing and policy.
    pub normalization: PathNormalization,
    /// Cancelled when the waypoint drains: HTTP connections finish their request in
    /// flight and close.
    pub shutdown: CancellationToken,
    /// When the drain starts, how long an idle HTTP connection is given to send its next
    /// request ([`crate::in_flight::idle_grace`]).
    pub idle_grace: Duration,
    /// Server and client spans, when an OTLP collector is configured.
    pub tracer: Arc<mesh_trace::Tracer>,
    /// What mirrored copies in flight may hold together.
    pub mirrors: Arc<MirrorLimit>,
}

/// Bodies larger than this are not buffered for retries or mirroring (413).
const MAX_BUFFERED_BODY: usize = 4 << 20;

fn is_http(p: AppProtocol) -> bool {
    matches!(
        p,
        AppProtocol::Http11 | AppProtocol::Http2 | AppProtocol::Grpc
    )
}

struct Conn {
    source: SpiffeId,
    /// The CONNECT's trace context: the source ztunnel's connection span when it traces.
    traceparent: hbone::TraceParent,
    source_addr: SocketAddr,
    source_workload: Option<Arc<Workload>>,
    target: Bound,
}

impl Conn {
    fn service(&self) -> Option<&Arc<Service>> {
        match &self.target.dest {
            Dest::Service(s) => Some(s),
            Dest::Workload(_) => None,
        }
    }

    /// The authority a request that names none is for.
    fn default_host(&self) -> String {
        match &self.target.dest {
            Dest::Service(s) => s.hostname.clone(),
            Dest::Workload(w) => w
                .addresses
                .first()
                .map(|ip| SocketAddr::new(*ip, self.target.port).to_string())
                .unwrap_or_default(),
        }
    }

    /// Who the connection is for, in logs.
    fn destination(&self) -> String {
        match &self.target.dest {
            Dest::Service(s) => s.hostname.clone(),
            Dest::Workload(w) => format!("{}/{}", w.namespace, w.name),
        }
    }
}

impl Waypoint {
    /// Opens an HBONE tunnel to `endpoint` on `port` (through its ztunnel on 15008); the
    /// CONNECT carries `trace` (the attempt's span, so the destination ztunnel's span is
    /// its child), else a fresh context as ztunnel sends.
    async fn tunnel_to(
        &self,
        ep: &Workload,
        port: u16,
        trace: Option<hbone::TraceParent>,
    ) -> Result<hbone::Tunnel, String> {
        let ip = *ep.addresses.first().ok_or("endpoint has no address")?;
        let creds = tokio::time::timeout(CERT_WAIT, self.certs.get(&self.identity))
            .await
            .map_err(|_| format!("no certificate within {CERT_WAIT:?}"))?
            .map_err(|e| e.to_string())?;
        let key = hbone::PoolKey::new(
            self.identity.clone(),
            vec![ep.identity.clone()],
            SocketAddr::new(ip, mesh_proto::ports::HBONE),
            None,
        );
        let mut req = hbone::ConnectRequest::new(SocketAddr::new(ip, port));
        if let Some(t) = trace {
            req.traceparent = t;
        }
        let est = self
            .client
            .get()
            .connect(&key, &creds.cert, &req)
            .await
            .map_err(|e| e.to_string())?;
        Ok(est.tunnel)
    }

    async fn serve_http(self: Arc<Self>, conn: Arc<Conn>, tunnel: hbone::Tunnel) {
        let shutdown = self.shutdown.clone();
        let grace = self.idle_grace;
        let in_flight = Arc::new(InFlight::default());
        let requests = in_flight.clone();
        let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
            let serving = requests.start();
            let (wp, conn) = (self.clone(), conn.clone());
            async move {
                let resp = wp.request(conn, req).await;
                drop(serving);
                Ok::<_, std::convert::Infallible>(resp)
            }
        });
        let io = hyper_util::rt::TokioIo::new(tunnel);
        let builder =
            hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
        let served = builder.serve_connection(io, svc);
        tokio::pin!(served);
        // Draining: a request being served completes, answered with `connection: close`
        // (HTTP/2: GOAWAY). An idle connection (new, or keep-alive between requests) may
        // have a request in transit or partly read, which closing would lose: it gets up
        // to the grace for it to arrive (then answered the same way), or for its end.
        let r = tokio::select! {
            r = served.as_mut() => r,
            _ = shutdown.cancelled() => {
                let (what, arrived) = in_flight.at_drain();
                let ended = match what {
                    AtDrain::CloseAfterIt => None,
                    AtDrain::AwaitNextRequest => tokio::select! {
                        r = served.as_mut() => Some(r),
                        _ = arrived => None,
                        _ = tokio::time::sleep(grace) => None,
                    },
                };
                match ended {
                    Some(r) => r,
                    None => {
                        served.as_mut().graceful_shutdown();
                        served.await
                    }
                }
            }
        };
        if let Err(e) = r {
            tracing::debug!(error = %e, "HTTP connection through the waypoint ended");
        }
    }

    async fn request(&self, conn: Arc<Conn>, req: Request<Incoming>) -> Response<Body> {
        let start = Instant::now();
        let request_bytes = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut req = req.map(|b| counted_request(b, request_bytes.clone()));
        // Policy, routes and the upstream all see the request without the client
        // connection's own headers (its framing checked first: it is stripped too).
        let framing = crate::hop::check_transfer_coding(req.headers());
        crate::hop::strip(req.headers_mut());
        let method = req.method().clone();
        let received_path = req.uri().path().to_string();
        let mut labels = RequestLabels::new(
            &conn.source,
            conn.source_workload.as_deref(),
            conn.service().map(|s| s.as_ref()),
            conn.target.protocol,
        );
        let (resp, backend, path) = match framing
            .and_then(|()| admit::admit(&mut req, || conn.default_host(), self.normalization))
        {
            Err(reason) => {
                tracing::warn!(target: "access", method = %method, path = %received_path, src.identity = %conn.source,
                    src.addr = %conn.source_addr, dst = %conn.destination(), reason = %reason,
                    "request refused: it is malformed or cannot be normalised");
                let resp = local(StatusCode::BAD_REQUEST, format!("bad request: {reason}\n"));
                (resp, "-".to_string(), received_path.clone())
            }
            Ok(host) => {
                // Traced: the upstream's parent is this request's server span.
                let server_span = self.tracer.enabled().then(|| {
                    mesh_trace::ServerSpan::begin_in(
                        req.headers()
                            .get("traceparent")
                            .and_then(|v| v.to_str().ok()),
                        Some(&conn.traceparent),
                    )
                });
                if let Some(span) = &server_span
                    && let Ok(v) = span.header().parse()
                {
                    req.headers_mut().insert("traceparent", v);
                } else if !req.headers().contains_key("traceparent")
                    && let Ok(v) = hbone::TraceParent::random().to_string().parse()
                {
                    req.headers_mut().insert("traceparent", v);
                }
                let path = req.uri().path().to_string();
                self.budget.request_started();
                let (resp, backend) = self
                    .route_and_forward(&conn, req, &method, &path, &host.name, &mut labels)
                    .await;
                self.budget.request_done();
                if let Some(span) = server_span {
                    self.tracer.record(span.finish(
                        &conn.destination(),
                        conn.target.port,
                        method.as_str(),
                        &path,
                        resp.status().as_u16(),
                    ));
                }
                (resp, backend, path)
            }
        };
        labels.response_code = resp.status().as_u16();
        self.metrics.record(&labels, start.elapsed());
        let resp = counted_response(resp, self.metrics.clone(), labels, request_bytes);
        if path == received_path {
            tracing::info!(target: "access", method = %method, path = %path, status = resp.status().as_u16(),
                src.identity = %conn.source, src.addr = %conn.source_addr, dst.service = %conn.destination(),
                backend = %backend, duration = %format!("{}ms", start.elapsed().as_millis()), "request");
        } else {
            tracing::info!(target: "access", method = %method, path = %path, received_path = %received_path,
                status = resp.status().as_u16(), src.identity = %conn.source, src.addr = %conn.source_addr,
                dst.service = %conn.destination(), backend = %backend,
                duration = %format!("{}ms", start.elapsed().as_millis()), "request");
        }
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
        // Failed closed: not even a request on a connection opened before is served.
        if self.config.failed() {
            let stop = Local::ConfigFailed;
            return (answer(&stop), stop.backend().into());
        }
        let snap = self.config.snapshot();
        let peer = Peer {
            source: &conn.source,
            source_ip: conn.source_addr.ip(),
            port: conn.target.port,
        };
        let seen = Seen {
            method,
            path,
            host,
            headers: req.headers(),
        };
        if let Err(stop) = policy::check(snap.policies_for(&conn.target.dest), peer, &seen) {
            if let Local::Denied { policy, reason } = &stop {
                tracing::warn!(target: "access", method = %method, src.identity = %conn.source, path = %path,
                    policy = %policy, reason = %reason, "request denied by authorization policy");
            }
            return (answer(&stop), stop.backend().into());
        }
        let svc = match &conn.target.dest {
            Dest::Service(s) => s,
            Dest::Workload(w) => {
                // Addressed to a pod: no routes (they attach to Services), straight to it.
                let backend = format!("{}/{}:{}", w.namespace, w.name, conn.target.port);
                labels.set_destination(w);
                return match self
                    .forward(req, w, conn.target.port, conn.target.protocol)
                    .await
                {
                    Ok(resp) => (resp, backend),
                    Err(e) => (failed(&e), backend),
                };
            }
        };
        let info = RequestInfo {
            method,
            path,
            query: req.uri().query(),
            headers: req.headers(),
        };
        let plan = match routing::plan(&snap, svc, conn.target.port, &info, |total| {
            rand::random_range(0..total)
        }) {
            Ok(plan) => plan,
            Err(stop) => {
                if let Local::RuleFailed { route, why } = &stop {
                    tracing::warn!(route = %route, %why,
                        "request failed: its route rule cannot be applied as written");
                }
                return (answer(&stop), stop.backend().into());
            }
        };
        drop(snap);
        let backend = format!(
            "{}/{}:{}",
            plan.service.namespace, plan.service.name, plan.port
        );
        let rule: Option<&Rule> = plan.rule.as_deref();
        let filters: &[crate::route::Filter] = rule.map_or(&[], |r| &r.filters);
        let at = filters::At {
            host,
            path,
            matched_prefix: rule.and_then(|r| r.matched_prefix(&info)),
        };
        // Faults first (as Envoy's fault filter runs before the router): delay, then abort.
        if let Some(f) = rule.and_then(|r| r.fault()) {
            let injected = fault::decide(f, || rand::random::<f64>() * 100.0);
            if let Some(delay) = injected.delay {
                tokio::time::sleep(delay).await;
            }
            if let Some(code) = injected.abort {
                let stop = Local::FaultAbort(code);
                return (answer(&stop), stop.backend().into());
            }
        }
        // Redirects are answered here.
        if let Some(resp) = rule.and_then(|r| filters::redirect(r, &at, req.uri().query())) {
            return (resp, "redirect".into());
        }
        filters::on_request(filters, &mut req, &at);
        let overall = rule.and_then(|r| r.request_timeout);
        let per_try = rule.and_then(|r| r.backend_request_timeout);
        let attempt = self.attempts(conn, req, &plan.service, plan.port, rule, per_try, labels);
        match within(overall, attempt).await {
            Ok(mut resp) => {
                filters::on_response(filters, &mut resp);
                (resp, backend)
            }
            Err(e) => (failed(&e), backend),
        }
    }

    /// One try: an endpoint chosen by the balancer (two choices, outliers ejected, the
    /// service's in-flight limit), the request forwarded within `per_try`, and the
    /// outcome reported back for outlier detection. Each try reads the current
    /// configuration (a retry sees endpoints that changed meanwhile).
    async fn balanced(
        &self,
        mut req: Request<Body>,
        svc: &Service,
        port: u16,
        protocol: AppProtocol,
        per_try: Option<std::time::Duration>,
        labels: &mut RequestLabels,
    ) -> Result<Response<Body>, UpstreamError> {
        use crate::balancer::Choice;
        let candidates = self
            .config
            .snapshot()
            .discovery
            .endpoint_candidates(svc, port, None);
        let uids: Vec<&str> = candidates.iter().map(|(w, _)| w.uid.as_str()).collect();
        let rolls = (
            rand::random::<u32>() as usize,
            rand::random::<u32>() as usize,
        );
        let (ep, target_port) = match self.balancer.choose(&uids, rolls, Instant::now()) {
            Choice::Endpoint(i) => candidates[i].clone(),
            Choice::NoEndpoint => {
                return Err(UpstreamError::NoEndpoint {
                    service: format!("{}/{}", svc.namespace, svc.name),
                    port,
                });
            }
            Choice::Overflow => {
                return Err(UpstreamError::Overflow {
                    service: format!("{}/{}", svc.namespace, svc.name),
                });
            }
        };
        labels.set_destination(&ep);
        let in_flight = self.balancer.begin(&ep.uid);
        let client_span = self
            .tracer
            .enabled()
            .then(|| mesh_trace::ClientSpan::begin(req.headers_mut()))
            .flatten();
        let fut = self.forward(req, &ep, target_port, protocol);
        let result = within(per_try, fut).await;
        drop(in_flight);
        if let Some(span) = client_span {
            let endpoint = format!("{}/{}", ep.namespace, ep.name);
            self.tracer.record(match &result {
                Ok(r) => span.finish(&endpoint, r.status().as_u16(), None),
                Err(e) => span.finish(&endpoint, 0, Some(&e.to_string())),
            });
        }
        let ok = match &result {
            Ok(r) => !r.status().is_server_error(),
            Err(e) => !e.status().is_server_error(),
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
        rule: Option<&Rule>,
        per_try: Option<std::time::Duration>,
        labels: &mut RequestLabels,
    ) -> Result<Response<Body>, UpstreamError> {
        let retry = rule.and_then(|r| r.retry.as_ref());
        // A copy is bounded by the rule's timeouts as the request is (and at most 15 s).
        let mirror = rule.and_then(|r| {
            let bound = mirror::mirror_timeout(r.request_timeout, per_try);
            r.mirror().map(|m| (m, bound))
        });
        if retry.is_none() && mirror.is_none() {
            return self
                .balanced(req, svc, port, conn.target.protocol, per_try, labels)
                .await;
        }
        // Boxed: only routes with retries or a mirror pay for the buffered copy's state.
        Box::pin(self.retried_or_mirrored(conn, req, svc, port, retry, mirror, per_try, labels))
            .await
    }

    /// [`Self::attempts`] for a rule with retries or a mirror: the body buffered, the
    /// mirror's copy sent off, each try a copy.
    #[allow(clippy::too_many_arguments)]
    async fn retried_or_mirrored(
        &self,
        conn: &Conn,
        req: Request<Body>,
        svc: &Service,
        port: u16,
        retry: Option<&crate::route::Retry>,
        mirror: Option<(&crate::route::Backend, Duration)>,
        per_try: Option<std::time::Duration>,
        labels: &mut RequestLabels,
    ) -> Result<Response<Body>, UpstreamError> {
        let (parts, body) = req.into_parts();
        let body = buffer_body(body, MAX_BUFFERED_BODY)
            .await
            .map_err(UpstreamError::BodyTooLarge)?;
        let copy = |uri: &http::Uri| {
            let mut r = Request::builder()
                .method(parts.method.clone())
                .uri(uri.clone())
                .version(parts.version);
            if let Some(h) = r.headers_mut() {
                *h = parts.headers.clone();
            }
            r.body(crate::body::full(body.clone()))
                .expect("valid request")
        };
        if let Some((m, bound)) = mirror {
            // The copy goes to any endpoint of the mirror service; its outcome is ignored,
            // so it takes no part in balancing or outlier detection.
            let target = {
                let snap = self.config.snapshot();
                snap.service(&m.namespace, &m.name).and_then(|ms| {
                    snap.discovery
                        .pick_endpoint(ms, m.port.unwrap_or(port), None)
                })
            };
            // Only with a place in the budget, held until the copy ends (answered, failed
            // or timed out) and its body is gone: otherwise not sent, and counted.
            if let Some((ep, tp)) = target {
                match self
                    .mirrors
                    .try_take(mirror::request_bytes(&parts, body.len()))
                {
                    Some(place) => {
                        let req = copy(&parts.uri).map(|b| place.hold_body(b));
                        let this = self.clone_for_mirror();
                        let protocol = conn.target.protocol;
                        tokio::spawn(async move {
                            let sent = this.forward(req, &ep, tp, protocol);
                            let _ = tokio::time::timeout(bound, sent).await;
                            drop(place);
                        });
                    }
                    None => self.metrics.mirror_dropped(),
                }
            }
        }
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
            let Some(r) = retry else {
                return result;
            };
            let retriable = retry::retriable(result.as_ref().map(|x| x.status()), r);
            if !retry::again(retriable, tried, r, &self.budget) {
                return result;
            }
            tried += 1;
            tracing::debug!(attempt = tried, "retrying");
            tokio::time::sleep(retry::backoff(r.backoff, rand::random::<f64>())).await;
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
            normalization: self.normalization,
            shutdown: self.shutdown.clone(),
            idle_grace: self.idle_grace,
            tracer: self.tracer.clone(),
            mirrors: self.mirrors.clone(),
        })
    }

    async fn forward(
        &self,
        mut req: Request<Body>,
        ep: &Workload,
        port: u16,
        protocol: AppProtocol,
    ) -> Result<Response<Body>, UpstreamError> {
        let unavailable = UpstreamError::Connect;
        let key = EndpointKey {
            workload_uid: ep.uid.clone(),
            addr: SocketAddr::new(
                *ep.addresses
                    .first()
                    .ok_or_else(|| unavailable("endpoint has no address".into()))?,
                port,
            ),
        };
        // A new upstream tunnel's CONNECT carries the attempt's context (pooled
        // connections keep the one of the attempt that opened them).
        let trace = req
            .headers()
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .and_then(hbone::TraceParent::parse);
        let resp = if matches!(protocol, AppProtocol::Http2 | AppProtocol::Grpc) {
            let mut sender = match self.pool.get().h2(&key, Instant::now()) {
                Some(s) => s,
                // Boxed, as the dial below: rare, and large (a TLS handshake), it would
                // otherwise make every request's future as large.
                None => Box::pin(self.dial_h2(&key, ep, port, trace)).await?,
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
            while let Some(mut sender) = self.pool.get().take_h1(&key, Instant::now()) {
                match sender.try_send_request(req).await {
                    Ok(resp) => {
                        self.recycle_h1(key, sender);
                        return boxed_response(resp);
                    }
                    Err(mut e) => match e.take_message() {
                        Some(unsent) => req = unsent,
                        None => {
                            return Err(UpstreamError::Protocol(e.into_error().to_string()));
                        }
                    },
                }
            }
            let mut sender = Box::pin(self.dial_h1(ep, port, trace)).await?;
            let resp = sender.send_request(req).await;
            if resp.is_ok() {
                self.recycle_h1(key, sender);
            }
            resp
        };
        resp.map_err(|e| UpstreamError::Protocol(e.to_string()))
            .and_then(boxed_response)
    }

    /// A new HTTP/2 connection to `key`'s endpoint, pooled, unless one was made while
    /// waiting for the right to dial.
    async fn dial_h2(
        &self,
        key: &EndpointKey,
        ep: &Workload,
        port: u16,
        trace: Option<hbone::TraceParent>,
    ) -> Result<hyper::client::conn::http2::SendRequest<Body>, UpstreamError> {
        let unavailable = UpstreamError::Connect;
        let dial = self.pool.get().h2_dial_lock(key);
        let _dialing = dial.lock().await;
        if let Some(s) = self.pool.get().h2(key, Instant::now()) {
            return Ok(s);
        }
        let tunnel = self.tunnel_to(ep, port, trace).await.map_err(unavailable)?;
        let (sender, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tunnel),
        )
        .await
        .map_err(|e| unavailable(e.to_string()))?;
        tokio::spawn(conn);
        self.pool
            .get()
            .set_h2(key.clone(), sender.clone(), Instant::now());
        Ok(sender)
    }

    /// A new HTTP/1.1 connection to the endpoint (pooled once its first response is read).
    async fn dial_h1(
        &self,
        ep: &Workload,
        port: u16,
        trace: Option<hbone::TraceParent>,
    ) -> Result<hyper::client::conn::http1::SendRequest<Body>, UpstreamError> {
        let unavailable = UpstreamError::Connect;
        let tunnel = self.tunnel_to(ep, port, trace).await.map_err(unavailable)?;
        let (sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tunnel))
                .await
                .map_err(|e| unavailable(e.to_string()))?;
        tokio::spawn(conn);
        Ok(sender)
    }

    /// Back to the pool once the response body has been read to the end (or never, when
    /// the connection closes first).
    fn recycle_h1(
        &self,
        key: EndpointKey,
        mut sender: hyper::client::conn::http1::SendRequest<Body>,
    ) {
        let pool = self.pool.get().clone();
        tokio::spawn(async move {
            if sender.ready().await.is_ok() {
                pool.put_h1(key, sender, Instant::now());
            }
        });
    }

    /// Non-HTTP ports: L4 policy (the policies for this destination, in their L4
    /// view), then TCP through to an endpoint; every connection is logged and counted.
    /// The CONNECT is answered only once the upstream tunnel is up, so a refusal reaches
    /// the client as a refusal.
    async fn serve_tcp(&self, conn: Arc<Conn>, respond: Responder) {
        let start = Instant::now();
        let mut rec = TcpConnection::open(
            self.metrics.clone(),
            tcp_labels(
                &conn.source,
                conn.source_workload.as_deref(),
                conn.service().map(|s| s.as_ref()),
            ),
        );
        let (decision, picked) = {
            let snap = self.config.snapshot();
            let decision = crate::l4::decide(
                snap.policies_for(&conn.target.dest)
                    .iter()
                    .map(|p| p.as_ref()),
                &crate::l4::Connection {
                    source: Some(&conn.source),
                    source_ip: conn.source_addr.ip(),
                    port: conn.target.port,
                },
            );
            let picked = match &conn.target.dest {
                Dest::Service(s) => snap.discovery.pick_endpoint(s, conn.target.port, None),
                Dest::Workload(w) => Some((w.clone(), conn.target.port)),
            };
            (decision, picked)
        };
        let refuse = |rec: TcpConnection, flags, refusal: Refusal, respond: Responder| {
            tracing::warn!(target: "access", protocol = "tcp", src.identity = %conn.source, src.addr = %conn.source_addr,
                dst.service = %conn.destination(), dst.port = conn.target.port, reason = %refusal.reason(),
                "connection refused");
            respond.refuse(&refusal);
            rec.finish(flags, 0, 0);
        };
        if let Decision::Deny { policy, reason } = decision {
            tracing::warn!(target: "access", protocol = "tcp", src.identity = %conn.source, src.addr = %conn.source_addr,
                dst.service = %conn.destination(), dst.port = conn.target.port, policy = %policy, reason = %reason,
                "connection denied by authorization policy");
            respond.refuse(&Refusal::Unauthorized(format!(
                "RBAC: access denied by {policy}"
            )));
            rec.finish("DENY", 0, 0);
            return;
        }
        let Some((ep, port)) = picked else {
            return refuse(
                rec,
                "UH",
                Refusal::Unavailable(format!("no healthy endpoint for {}", conn.destination())),
                respond,
            );
        };
        set_tcp_destination(&mut rec.labels, &ep);
        let upstream = match self.tunnel_to(&ep, port, Some(conn.traceparent)).await {
            Ok(t) => t,
            Err(e) => {
                return refuse(
                    rec,
                    "UF",
                    Refusal::Unavailable(format!("upstream connect error: {e}")),
                    respond,
                );
            }
        };
        let Ok(tunnel) = respond.accept(Default::default()) else {
            rec.finish("DC", 0, 0);
            return;
        };
        let mut client = crate::counted::CountingIo::new(tunnel);
        let mut upstream = upstream;
        let result = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
        let received = client.read.load(std::sync::atomic::Ordering::Relaxed);
        let sent = client.written.load(std::sync::atomic::Ordering::Relaxed);
        let error = result.err().map(|e| e.to_string()).unwrap_or_default();
        tracing::info!(target: "access", protocol = "tcp", src.identity = %conn.source, src.addr = %conn.source_addr,
            dst.service = %conn.destination(), dst.port = conn.target.port,
            dst.workload = %format!("{}/{}", ep.namespace, ep.name), bytes_sent = sent, bytes_recv = received,
            duration = %format!("{}ms", start.elapsed().as_millis()), error = %error, "connection complete");
        rec.finish("-", sent, received);
    }
}

pub struct Handler(pub Arc<Waypoint>);

impl ConnectHandler for Handler {
    async fn handle(&self, mut req: InboundConnect, respond: Responder) {
        // A dual-stack listener shows an IPv4 peer as `::ffff:a.b.c.d`: it is that IPv4
        // address (for finding its workload, logs and policies' IP blocks).
        req.peer_addr = SocketAddr::new(req.peer_addr.ip().to_canonical(), req.peer_addr.port());
        let wp = self.0.clone();
        let Authority::Addr(dst) = req.request.authority else {
            tracing::warn!(target: "access", authority = ?req.request.authority, src.identity = %req.peer_identity,
                src.addr = %req.peer_addr, "CONNECT refused: the waypoint expects an ip:port authority");
            return respond.refuse(&Refusal::BadRequest(
                "the waypoint expects an ip:port authority".into(),
            ));
        };
        if wp.config.failed() {
            let why = crate::snapshot::Poisoned;
            tracing::warn!(target: "access", reason = %why, src.identity = %req.peer_identity,
                src.addr = %req.peer_addr, dst.addr = %dst, "CONNECT refused: the configuration failed closed");
            return respond.refuse(&Refusal::Unavailable(why.to_string()));
        }
        let me = Me::from_identity(&wp.identity);
        let (target, source_workload) = {
            let snap: Arc<Snapshot> = wp.config.snapshot();
            let source = snap
                .discovery
                .workload_by_ip("", req.peer_addr.ip())
                .cloned();
            (binding::resolve(&snap.discovery, &me, dst), source)
        };
        let target = match target {
            Ok(t) => t,
            Err(why) => {
                tracing::warn!(target: "access", waypoint = %format!("{}/{}", me.namespace, me.name),
                    src.identity = %req.peer_identity, src.addr = %req.peer_addr, dst.addr = %dst, reason = %why,
                    "CONNECT refused: the target is not bound to this waypoint");
                return respond.refuse(&Refusal::Forbidden(format!(
                    "{dst} is not served by waypoint {}/{}: {why}",
                    me.namespace, me.name
                )));
            }
        };
        let conn = Arc::new(Conn {
            source: req.peer_identity.clone(),
            traceparent: req.request.traceparent,
            source_addr: req.peer_addr,
            source_workload,
            target,
        });
        if is_http(conn.target.protocol) {
            let Ok(tunnel) = respond.accept(Default::default()) else {
                return;
            };
            wp.serve_http(conn, tunnel).await;
        } else {
            wp.serve_tcp(conn, respond).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of the future an async fn returns, read from its type without calling it.
    fn size3<A, B, C, F>(_: fn(A, B, C) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// hyper moves each request's future whole into place as the request starts, so its
    /// size is paid per request (it was 32 KB: a timeout that stored its future twice at
    /// each of two levels, and the upstream dial with its TLS handshake inline; 4 KiB now).
    #[test]
    fn what_a_request_keeps_while_it_is_served_stays_small() {
        let size = size3::<&'static Waypoint, Arc<Conn>, Request<Incoming>, _>(Waypoint::request);
        assert!(size <= 6 * 1024, "a request's future is {size} bytes");
    }
}
