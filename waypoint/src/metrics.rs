//! Request and TCP connection metrics with Istio's names and `reporter="waypoint"`.

use mesh_discovery::telemetry::{TcpLabels, or_unknown};
use mesh_discovery::{Service, Workload};
use mesh_identity::SpiffeId;
use mesh_proto::workload::AppProtocol;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::time::Duration;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    reporter: &'static str,
    pub response_code: u16,
    request_protocol: &'static str,
    source_workload: String,
    source_workload_namespace: String,
    source_principal: String,
    destination_service: String,
    destination_service_name: String,
    destination_service_namespace: String,
    destination_workload: String,
    destination_workload_namespace: String,
    destination_principal: String,
}

impl RequestLabels {
    pub fn new(
        source: &SpiffeId,
        source_wl: Option<&Workload>,
        svc: Option<&Service>,
        protocol: AppProtocol,
    ) -> Self {
        RequestLabels {
            reporter: "waypoint",
            response_code: 0,
            request_protocol: if protocol == AppProtocol::Grpc {
                "grpc"
            } else {
                "http"
            },
            source_workload: source_wl
                .map(|w| w.telemetry_name().to_string())
                .unwrap_or_else(|| "unknown".into()),
            source_workload_namespace: source.namespace().to_string(),
            source_principal: source.to_string(),
            destination_service: or_unknown(svc.map(|s| s.hostname.as_str())),
            destination_service_name: or_unknown(svc.map(|s| s.name.as_str())),
            destination_service_namespace: or_unknown(svc.map(|s| s.namespace.as_str())),
            destination_workload: "unknown".into(),
            destination_workload_namespace: "unknown".into(),
            destination_principal: "unknown".into(),
        }
    }

    pub fn set_destination(&mut self, w: &Workload) {
        self.destination_workload = w.telemetry_name().to_string();
        self.destination_workload_namespace = w.namespace.clone();
        self.destination_principal = w.identity.to_string();
    }
}

/// Istio's TCP labels (`mesh_discovery::telemetry`), `reporter="waypoint"`.
pub fn tcp_labels(
    source: &SpiffeId,
    source_wl: Option<&Workload>,
    svc: Option<&Service>,
) -> TcpLabels {
    TcpLabels {
        source_workload_namespace: source.namespace().to_string(),
        source_principal: source.to_string(),
        connection_security_policy: "mutual_tls",
        ..TcpLabels::new("waypoint")
            .with_source(source_wl)
            .with_destination_service(svc)
    }
}

/// The endpoint a TCP connection went to.
pub fn set_tcp_destination(l: &mut TcpLabels, w: &Workload) {
    l.set_destination(w);
    l.destination_principal = w.identity.to_string();
}

/// One TCP connection through the waypoint: counted as opened when created, as closed
/// (with Envoy's response flags, `-` when it went well) when finished or dropped.
pub struct TcpConnection {
    metrics: std::sync::Arc<Metrics>,
    pub labels: TcpLabels,
    finished: bool,
}

impl TcpConnection {
    pub fn open(metrics: std::sync::Arc<Metrics>, labels: TcpLabels) -> Self {
        metrics.tcp_opened.get_or_create(&labels).inc();
        TcpConnection {
            metrics,
            labels,
            finished: false,
        }
    }

    /// `sent`: bytes to the client; `received`: bytes from it (Istio's convention).
    pub fn finish(mut self, flags: &'static str, sent: u64, received: u64) {
        self.finished = true;
        let mut l = self.labels.clone();
        l.response_flags = flags;
        let m = &self.metrics;
        m.tcp_closed.get_or_create(&l).inc();
        m.tcp_sent.get_or_create(&l).inc_by(sent);
        m.tcp_received.get_or_create(&l).inc_by(received);
    }
}

impl Drop for TcpConnection {
    fn drop(&mut self) {
        if !self.finished {
            let mut l = self.labels.clone();
            l.response_flags = "DC";
            self.metrics.tcp_closed.get_or_create(&l).inc();
        }
    }
}

pub struct Metrics {
    registry: Registry,
    tcp_opened: Family<TcpLabels, Counter>,
    tcp_closed: Family<TcpLabels, Counter>,
    tcp_sent: Family<TcpLabels, Counter>,
    tcp_received: Family<TcpLabels, Counter>,
    requests: Family<RequestLabels, Counter>,
    duration: Family<RequestLabels, Histogram>,
    request_bytes: Family<RequestLabels, Histogram>,
    response_bytes: Family<RequestLabels, Histogram>,
    mirrors_dropped: Counter,
}

fn size_histogram() -> Histogram {
    Histogram::new([1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9])
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        let duration = Family::<RequestLabels, Histogram>::new_with_constructor(|| {
            Histogram::new([
                1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0,
            ])
        });
        let istio = registry.sub_registry_with_prefix("istio");
        istio.register(
            "requests",
            "Requests through the waypoint",
            requests.clone(),
        );
        istio.register(
            "request_duration_milliseconds",
            "Request duration",
            duration.clone(),
        );
        let request_bytes =
            Family::<RequestLabels, Histogram>::new_with_constructor(size_histogram);
        let response_bytes =
            Family::<RequestLabels, Histogram>::new_with_constructor(size_histogram);
        istio.register("request_bytes", "Request body sizes", request_bytes.clone());
        istio.register(
            "response_bytes",
            "Response body sizes",
            response_bytes.clone(),
        );
        let tcp_opened = Family::<TcpLabels, Counter>::default();
        let tcp_closed = Family::<TcpLabels, Counter>::default();
        let tcp_sent = Family::<TcpLabels, Counter>::default();
        let tcp_received = Family::<TcpLabels, Counter>::default();
        istio.register(
            "tcp_connections_opened",
            "TCP connections opened through the waypoint",
            tcp_opened.clone(),
        );
        istio.register(
            "tcp_connections_closed",
            "TCP connections through the waypoint closed",
            tcp_closed.clone(),
        );
        istio.register(
            "tcp_sent_bytes",
            "Bytes sent to clients on TCP connections",
            tcp_sent.clone(),
        );
        istio.register(
            "tcp_received_bytes",
            "Bytes received from clients on TCP connections",
            tcp_received.clone(),
        );
        let mirrors_dropped = Counter::default();
        registry.sub_registry_with_prefix("waypoint").register(
            "mirror_requests_dropped",
            "Mirrored copies not sent: the copies in flight held their whole budget",
            mirrors_dropped.clone(),
        );
        Metrics {
            registry,
            tcp_opened,
            tcp_closed,
            tcp_sent,
            tcp_received,
            requests,
            duration,
            request_bytes,
            response_bytes,
            mirrors_dropped,
        }
    }

    /// A mirrored copy was not sent (the mirror budget was full).
    pub fn mirror_dropped(&self) {
        self.mirrors_dropped.inc();
    }

    pub fn record(&self, labels: &RequestLabels, elapsed: Duration) {
        self.requests.get_or_create(labels).inc();
        self.duration
            .get_or_create(labels)
            .observe(elapsed.as_secs_f64() * 1000.0);
    }

    /// Body sizes, recorded when the response has been sent (or abandoned).
    pub fn record_sizes(&self, labels: &RequestLabels, request: u64, response: u64) {
        self.request_bytes
            .get_or_create(labels)
            .observe(request as f64);
        self.response_bytes
            .get_or_create(labels)
            .observe(response as f64);
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
