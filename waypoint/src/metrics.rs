//! Request metrics with Istio's names and `reporter="waypoint"`.

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
        svc: &Service,
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
            destination_service: svc.hostname.clone(),
            destination_service_name: svc.name.clone(),
            destination_service_namespace: svc.namespace.clone(),
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

pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    duration: Family<RequestLabels, Histogram>,
    request_bytes: Family<RequestLabels, Histogram>,
    response_bytes: Family<RequestLabels, Histogram>,
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
        Metrics {
            registry,
            requests,
            duration,
            request_bytes,
            response_bytes,
        }
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
