//! The DNS proxy's metrics, named and labelled as Istio's ztunnel: requests, upstream
//! requests and failures, upstream duration. Label values come from a closed set of query
//! types and from xDS (the asking pod's canonical service and revision). One of ours beside
//! them: datagrams from the upstream that were not the awaited reply (spoofing attempts,
//! late replies).

use crate::state::Workload;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DnsLabels {
    pub request_query_type: &'static str,
    pub request_protocol: &'static str,
    pub source_canonical_service: String,
    pub source_canonical_revision: String,
}

impl DnsLabels {
    pub fn new(query_type: &'static str, protocol: &'static str, src: Option<&Workload>) -> Self {
        let or_unknown = |s: Option<&str>| match s {
            Some(v) if !v.is_empty() => v.to_string(),
            _ => "unknown".to_string(),
        };
        DnsLabels {
            request_query_type: query_type,
            request_protocol: protocol,
            source_canonical_service: or_unknown(src.map(|w| w.canonical_name.as_str())),
            source_canonical_revision: or_unknown(src.map(|w| w.canonical_revision.as_str())),
        }
    }
}

type DurationFamily = Family<DnsLabels, Histogram, fn() -> Histogram>;

#[derive(Clone, Debug)]
pub struct DnsMetrics {
    pub requests: Family<DnsLabels, Counter>,
    pub upstream_requests: Family<DnsLabels, Counter>,
    pub upstream_failures: Family<DnsLabels, Counter>,
    pub upstream_duration: DurationFamily,
    /// Not in Istio: registered under `ztunnel_` by [`DnsMetrics::register_own`].
    pub upstream_strays: Counter,
}

fn duration_histogram() -> Histogram {
    // Istio's buckets.
    Histogram::new([0.001, 0.005, 0.01, 0.1, 1.0, 5.0])
}

impl DnsMetrics {
    /// Registered in `istio` (the `istio_` prefix).
    pub fn register(istio: &mut Registry) -> DnsMetrics {
        let m = DnsMetrics {
            requests: Family::default(),
            upstream_requests: Family::default(),
            upstream_failures: Family::default(),
            upstream_duration: Family::new_with_constructor(duration_histogram),
            upstream_strays: Counter::default(),
        };
        istio.register(
            "dns_requests",
            "DNS requests the proxy received",
            m.requests.clone(),
        );
        istio.register(
            "dns_upstream_requests",
            "DNS requests forwarded to the upstream resolvers",
            m.upstream_requests.clone(),
        );
        istio.register(
            "dns_upstream_failures",
            "DNS requests the upstream resolvers did not answer",
            m.upstream_failures.clone(),
        );
        istio.register_with_unit(
            "dns_upstream_request_duration",
            "Time the upstream resolvers took to answer",
            Unit::Seconds,
            m.upstream_duration.clone(),
        );
        m
    }

    /// Registers ours in `ztunnel` (the `ztunnel_` prefix).
    pub fn register_own(&self, ztunnel: &mut Registry) {
        ztunnel.register(
            "dns_upstream_ignored_datagrams",
            "Datagrams from the upstream resolvers that were not the awaited reply (another ID or question), ignored",
            self.upstream_strays.clone(),
        );
    }
}
