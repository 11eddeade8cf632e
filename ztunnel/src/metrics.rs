//! Prometheus metrics with Istio's names and labels, and the per-connection access log.
//!
//! Every label value comes from our own configuration (workloads and services from xDS or
//! the local file, identities from certificates our CA issued, fixed strings), never from
//! what a peer sends: the number of series is bounded by the configuration, whatever the
//! traffic.

use crate::identity::CertManager;
use crate::state::{Service, Workload};
use mesh_identity::SpiffeId;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::registry::Registry;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Outbound,
    Inbound,
}

impl Direction {
    fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }
    fn reporter(self) -> &'static str {
        match self {
            Direction::Outbound => "source",
            Direction::Inbound => "destination",
        }
    }
}

mod access_log;
pub use access_log::{AccessLog, Completion, denial_error};
pub use mesh_discovery::telemetry::TcpLabels;
use mesh_discovery::telemetry::or_unknown;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReporterLabel {
    reporter: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    reason: &'static str,
}

/// The xDS type of a message; only types we subscribed to reach the counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UrlLabel {
    url: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    component: &'static str,
    tag: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabel {
    listener: &'static str,
}

impl ListenerLabel {
    pub fn new(listener: &'static str) -> Self {
        ListenerLabel { listener }
    }
}

/// Certificate requests and the identities failing them, read from the manager on scrape.
struct CertCollector(Arc<CertManager>);

/// `ztunnel_accepting` and `ztunnel_open_connections`: what this process holds, so two
/// ztunnels side by side during a handover can be told apart.
#[derive(Debug)]
struct LifecycleCollector(Arc<crate::handover::Status>);

impl Collector for LifecycleCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for (name, help, v) in [
            (
                "accepting",
                "1 while this process takes new connections; 0 once handed over or draining",
                self.0.phase().accepting() as i64,
            ),
            (
                "open_connections",
                "Connections this process still carries, all pods",
                self.0.open_connections() as i64,
            ),
        ] {
            let g = ConstGauge::new(v);
            g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)?;
        }
        Ok(())
    }
}

impl std::fmt::Debug for CertCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CertCollector")
    }
}

impl Collector for CertCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = self.0.stats();
        let mut requests = encoder.encode_descriptor(
            "certificate_requests",
            "Certificate requests to the CA, by outcome",
            None,
            MetricType::Counter,
        )?;
        for (outcome, n) in [("issued", s.issued), ("failed", s.failed)] {
            ConstCounter::new(n).encode(requests.encode_family(&[("outcome", outcome)])?)?;
        }
        for (name, help, v) in [
            (
                "certificate_identities",
                "Identities this node holds certificates for",
                s.identities,
            ),
            (
                "certificate_identities_failing",
                "Identities whose latest certificate request failed (backing off)",
                s.failing,
            ),
        ] {
            let g = ConstGauge::new(v as i64);
            g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)?;
        }
        Ok(())
    }
}

/// Connection spans dropped (exporter queue full, or the collector did not take them),
/// read from the tracer on scrape.
struct TracerCollector(Arc<mesh_trace::Tracer>);

impl std::fmt::Debug for TracerCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TracerCollector")
    }
}

impl Collector for TracerCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let c = ConstCounter::new(self.0.dropped());
        c.encode(encoder.encode_descriptor(
            "trace_spans_dropped",
            "Connection spans dropped: the exporter's queue was full or the OTLP collector did not take them",
            None,
            c.metric_type(),
        )?)
    }
}

pub struct Metrics {
    pub registry: Registry,
    opened: Family<TcpLabels, Counter>,
    closed: Family<TcpLabels, Counter>,
    failed: Family<TcpLabels, Counter>,
    sent: Family<TcpLabels, Counter>,
    received: Family<TcpLabels, Counter>,
    sockets_open: Family<ReporterLabel, Gauge>,
    pub active_proxies: Gauge,
    pub proxies_started: Counter,
    pub proxies_stopped: Counter,
    /// Handovers where `net.ipv4.tcp_migrate_req` could not be set in a pod.
    pub handover_migrate_req_failures: Counter,
    xds_connection_terminations: Family<ReasonLabel, Counter>,
    xds_messages: Family<UrlLabel, Counter>,
    /// Connections closed at once because their listener was at its cap.
    pub connections_refused: Family<ListenerLabel, Counter>,
    /// The DNS proxy's (`istio_dns_*`).
    pub dns: crate::dns::metrics::DnsMetrics,
}

impl Metrics {
    /// The registry, with certificate metrics from `certs` if given.
    pub fn new(certs: Option<Arc<CertManager>>) -> Arc<Self> {
        Metrics::with_tracer(certs, None)
    }

    /// With `tracer`'s dropped spans (`ztunnel_trace_spans_dropped_total`) when tracing.
    pub fn with_tracer(
        certs: Option<Arc<CertManager>>,
        tracer: Option<Arc<mesh_trace::Tracer>>,
    ) -> Arc<Self> {
        Metrics::for_process(certs, tracer, None)
    }

    /// As [`Metrics::with_tracer`], with the process lifecycle gauges from `lifecycle`.
    pub fn for_process(
        certs: Option<Arc<CertManager>>,
        tracer: Option<Arc<mesh_trace::Tracer>>,
        lifecycle: Option<Arc<crate::handover::Status>>,
    ) -> Arc<Self> {
        let mut root = Registry::default();
        let istio = root.sub_registry_with_prefix("istio");
        let m = Metrics {
            opened: Family::default(),
            closed: Family::default(),
            failed: Family::default(),
            sent: Family::default(),
            received: Family::default(),
            sockets_open: Family::default(),
            active_proxies: Gauge::default(),
            proxies_started: Counter::default(),
            proxies_stopped: Counter::default(),
            handover_migrate_req_failures: Counter::default(),
            xds_connection_terminations: Family::default(),
            xds_messages: Family::default(),
            connections_refused: Family::default(),
            dns: crate::dns::metrics::DnsMetrics::register(istio),
            registry: Registry::default(),
        };
        istio.register(
            "tcp_connections_opened",
            "TCP connections opened",
            m.opened.clone(),
        );
        istio.register(
            "tcp_connections_closed",
            "TCP connections closed",
            m.closed.clone(),
        );
        istio.register(
            "tcp_connections_failed",
            "TCP connections that failed",
            m.failed.clone(),
        );
        istio.register(
            "tcp_sent_bytes",
            "Bytes sent during TCP connections",
            m.sent.clone(),
        );
        istio.register(
            "tcp_received_bytes",
            "Bytes received during TCP connections",
            m.received.clone(),
        );
        istio.register(
            "tcp_sockets_open",
            "Currently open proxied sockets",
            m.sockets_open.clone(),
        );
        istio.register(
            "xds_connection_terminations",
            "xDS connections ended, by reason",
            m.xds_connection_terminations.clone(),
        );
        istio.register(
            "xds_message",
            "xDS messages received, by type",
            m.xds_messages.clone(),
        );
        let build = Family::<BuildLabels, Gauge>::default();
        build
            .get_or_create(&BuildLabels {
                component: "ztunnel",
                tag: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        istio.register("build", "This ztunnel's build", build);
        let zt = root.sub_registry_with_prefix("ztunnel");
        m.dns.register_own(zt);
        zt.register(
            "listener_connections_refused",
            "Connections closed because their listener was at --max-connections-per-listener",
            m.connections_refused.clone(),
        );
        zt.register(
            "handover_migrate_req_failures",
            "Pods where a handover could not set net.ipv4.tcp_migrate_req (read-only /proc/sys): connections arriving as the listener closes may be reset",
            m.handover_migrate_req_failures.clone(),
        );
        if let Some(certs) = certs {
            zt.register_collector(Box::new(CertCollector(certs)));
        }
        if let Some(tracer) = tracer.filter(|t| t.enabled()) {
            zt.register_collector(Box::new(TracerCollector(tracer)));
        }
        if let Some(status) = lifecycle {
            zt.register_collector(Box::new(LifecycleCollector(status)));
        }
        let wm = root.sub_registry_with_prefix("workload_manager");
        wm.register(
            "active_proxy_count",
            "Pods with running proxies",
            m.active_proxies.clone(),
        );
        wm.register(
            "proxies_started",
            "Pod proxies started",
            m.proxies_started.clone(),
        );
        wm.register(
            "proxies_stopped",
            "Pod proxies stopped",
            m.proxies_stopped.clone(),
        );
        Arc::new(Metrics {
            registry: root,
            ..m
        })
    }

    /// An xDS stream ended (reason as Istio names it: `ConnectionError`, `Error`,
    /// `Reconnect`, `Complete`; see [`mesh_xds::Termination`]).
    pub fn xds_terminated(&self, reason: &'static str) {
        self.xds_connection_terminations
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    /// An xDS message of type `url` was received.
    pub fn xds_message(&self, url: &str) {
        self.xds_messages
            .get_or_create(&UrlLabel {
                url: url.to_string(),
            })
            .inc();
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// Everything known about one proxied connection, for metrics and the access log.
#[derive(Clone, Debug)]
pub struct ConnReport {
    pub direction: Direction,
    pub src_addr: SocketAddr,
    pub src: Option<Arc<Workload>>,
    pub src_identity: Option<SpiffeId>,
    /// Where the connection went: the HBONE address (`ip:15008`) when tunnelled.
    pub dst_addr: SocketAddr,
    /// The target inside the tunnel (the CONNECT authority), when tunnelled.
    pub dst_hbone_addr: Option<SocketAddr>,
    /// Always one of our services (never a name a peer sent).
    pub dst_service: Option<Arc<Service>>,
    pub dst: Option<Arc<Workload>>,
    pub dst_identity: Option<SpiffeId>,
    pub mtls: bool,
    /// The W3C trace id the connection carries (0: none yet), written as hex only when a
    /// log line is: a connection keeps 16 bytes rather than a string of its own.
    pub trace_id: u128,
    pub started: Instant,
}

/// A trace id as logs write it: 32 hex digits, or nothing when there is none.
fn trace_id_hex(id: u128) -> String {
    if id == 0 {
        String::new()
    } else {
        format!("{id:032x}")
    }
}

impl ConnReport {
    fn labels(&self, flags: &'static str) -> TcpLabels {
        let id = |i: &Option<SpiffeId>| or_unknown(i.as_ref().map(|i| i.to_string()).as_deref());
        TcpLabels {
            source_principal: id(&self.src_identity),
            destination_principal: id(&self.dst_identity),
            response_flags: flags,
            connection_security_policy: if self.mtls { "mutual_tls" } else { "unknown" },
            ..TcpLabels::new(self.direction.reporter())
                .with_source(self.src.as_deref())
                .with_destination(self.dst.as_deref())
                .with_destination_service(self.dst_service.as_deref())
        }
    }

    /// The access log's view of this connection, as Istio's ztunnel fills it: the pod's
    /// name (else its canonical service) and namespace; identities only under mTLS.
    fn access_log(&self) -> AccessLog {
        let name = |w: &Option<Arc<Workload>>| {
            w.as_ref().map(|w| {
                if w.name.is_empty() {
                    w.canonical_name.clone()
                } else {
                    w.name.clone()
                }
            })
        };
        let ns = |w: &Option<Arc<Workload>>| w.as_ref().map(|w| w.namespace.clone());
        let id = |i: &Option<SpiffeId>| i.as_ref().filter(|_| self.mtls).map(|i| i.to_string());
        AccessLog {
            src_addr: self.src_addr,
            src_workload: name(&self.src),
            src_namespace: ns(&self.src),
            src_identity: id(&self.src_identity),
            dst_addr: self.dst_addr,
            dst_hbone_addr: self.dst_hbone_addr,
            dst_service: self.dst_service.as_ref().map(|s| s.hostname.clone()),
            dst_workload: name(&self.dst),
            dst_namespace: ns(&self.dst),
            dst_identity: id(&self.dst_identity),
            direction: self.direction.as_str(),
            trace_id: trace_id_hex(self.trace_id),
        }
    }
}

/// Tracks one connection from open to close; reports on `finish` (or drop, as failed).
/// The report and the span are boxed: a connection's task carries the recorder for as
/// long as the connection lives, and in more than one place (its set-up's result, then its
/// copy), so inline they would be paid several times over (416 bytes each, 32 now).
pub struct ConnRecorder {
    metrics: Arc<Metrics>,
    report: Box<ConnReport>,
    finished: bool,
    span: Option<Box<crate::trace::ConnSpan>>,
}

/// How a connection ended.
pub enum Outcome<'a> {
    Complete {
        sent: u64,
        received: u64,
    },
    /// Refused by policy: the policy and the reason are logged.
    Denied {
        policy: Option<&'a str>,
        reason: &'a str,
    },
    Failed {
        flags: &'static str,
        error: &'a str,
        sent: u64,
        received: u64,
    },
}

impl ConnRecorder {
    pub fn open(metrics: Arc<Metrics>, report: ConnReport) -> Self {
        let labels = report.labels("-");
        metrics.opened.get_or_create(&labels).inc();
        metrics
            .sockets_open
            .get_or_create(&ReporterLabel {
                reporter: report.direction.reporter(),
            })
            .inc();
        report.access_log().opened();
        ConnRecorder {
            metrics,
            report: Box::new(report),
            finished: false,
            span: None,
        }
    }

    /// The connection's span (tracing on), ended with the connection.
    pub fn traced(mut self, span: Option<crate::trace::ConnSpan>) -> Self {
        self.span = span.map(Box::new);
        self
    }

    pub fn report_mut(&mut self) -> &mut ConnReport {
        &mut self.report
    }

    pub fn finish(mut self, outcome: Outcome<'_>) {
        self.finished = true;
        let r = &self.report;
        let duration_ms = r.started.elapsed().as_millis();
        let (flags, sent, received, error) = match outcome {
            Outcome::Complete { sent, received } => ("-", sent, received, None),
            Outcome::Denied { policy, reason } => {
                ("DENY", 0, 0, Some(denial_error(policy, reason)))
            }
            Outcome::Failed {
                flags,
                error,
                sent,
                received,
            } => (flags, sent, received, Some(error.to_string())),
        };
        let log = r.access_log();
        let done = Completion {
            bytes_sent: sent,
            bytes_recv: received,
            duration_ms,
            error,
        };
        log.complete(&done);
        if let Some(span) = self.span.take() {
            span.finish(&log, &done, flags);
        }
        let r = &self.report;
        let labels = r.labels(flags);
        let m = &self.metrics;
        m.closed.get_or_create(&labels).inc();
        if flags != "-" {
            m.failed.get_or_create(&labels).inc();
        }
        // Istio's convention: sent/received are from the reporting proxy's peer view.
        m.sent.get_or_create(&labels).inc_by(sent);
        m.received.get_or_create(&labels).inc_by(received);
    }
}

impl Drop for ConnRecorder {
    fn drop(&mut self) {
        self.metrics
            .sockets_open
            .get_or_create(&ReporterLabel {
                reporter: self.report.direction.reporter(),
            })
            .dec();
        if !self.finished {
            let labels = self.report.labels("CONNECT");
            self.metrics.closed.get_or_create(&labels).inc();
            self.metrics.failed.get_or_create(&labels).inc();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::CertSource;
    use mesh_identity::ca::CertificateAuthority;
    use std::time::Duration;

    #[test]
    fn trace_ids_are_logged_as_32_hex_digits_or_not_at_all() {
        assert_eq!(trace_id_hex(0), "");
        assert_eq!(trace_id_hex(0xab), format!("{}ab", "0".repeat(30)));
        assert_eq!(trace_id_hex(u128::MAX), "f".repeat(32));
    }

    #[tokio::test]
    async fn certificate_requests_and_failing_identities_are_exported() {
        let ca = CertificateAuthority::new_root("cluster.local", Duration::from_secs(3600));
        let certs = CertManager::new(CertSource::Local {
            ca: Box::new(ca.unwrap()),
            ttl: Duration::from_secs(600),
        });
        let metrics = Metrics::new(Some(certs.clone()));
        let ok = SpiffeId::new("cluster.local", "ns", "a").unwrap();
        let foreign = SpiffeId::new("elsewhere", "ns", "b").unwrap();
        certs.get(&ok).await.unwrap();
        certs.get(&foreign).await.unwrap_err();
        let text = metrics.encode();
        for line in [
            "ztunnel_certificate_requests_total{outcome=\"issued\"} 1",
            "ztunnel_certificate_requests_total{outcome=\"failed\"} 1",
            "ztunnel_certificate_identities 2",
            "ztunnel_certificate_identities_failing 1",
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
    }

    #[test]
    fn service_labels_come_from_the_service_not_a_hostname_split() {
        // A ServiceEntry-style hostname: name and namespace are the service's own.
        let svc = Service {
            name: "payments".into(),
            namespace: "shop".into(),
            hostname: "pay.example.com".into(),
            vips: vec![],
            ports: vec![],
            subject_alt_names: vec![],
            waypoint: None,
            load_balancing: Default::default(),
        };
        let report = ConnReport {
            direction: Direction::Inbound,
            src_addr: "10.0.0.1:1".parse().unwrap(),
            src: None,
            src_identity: None,
            dst_addr: "10.0.0.2:80".parse().unwrap(),
            dst_hbone_addr: None,
            dst_service: Some(Arc::new(svc)),
            dst: None,
            dst_identity: None,
            mtls: true,
            trace_id: 0,
            started: Instant::now(),
        };
        let l = report.labels("-");
        assert_eq!(
            (
                l.destination_service.as_str(),
                l.destination_service_name.as_str(),
                l.destination_service_namespace.as_str()
            ),
            ("pay.example.com", "payments", "shop")
        );
    }

    fn pod(name: &str, ns: &str, canonical: &str) -> Arc<Workload> {
        Arc::new(Workload {
            uid: format!("{ns}/{name}"),
            name: name.into(),
            namespace: ns.into(),
            addresses: vec![],
            network: String::new(),
            hbone: true,
            identity: SpiffeId::new("cluster.local", ns, "sa").unwrap(),
            waypoint: None,
            node: String::new(),
            canonical_name: canonical.into(),
            canonical_revision: "v1".into(),
            workload_name: String::new(),
            services: Default::default(),
            authorization_policies: vec![],
            healthy: true,
            cluster_id: "Kubernetes".into(),
            locality: Default::default(),
            host_network: false,
            capacity: 1,
        })
    }

    #[test]
    fn access_log_takes_names_and_identities_as_istio_does() {
        let mut report = ConnReport {
            direction: Direction::Outbound,
            src_addr: "10.0.0.1:1".parse().unwrap(),
            src: Some(pod("web-1", "front", "web")),
            src_identity: Some(SpiffeId::new("cluster.local", "front", "web").unwrap()),
            dst_addr: "10.0.0.2:15008".parse().unwrap(),
            dst_hbone_addr: Some("10.0.0.2:8080".parse().unwrap()),
            dst_service: None,
            // A workload known by its canonical name only.
            dst: Some(pod("", "back", "api")),
            dst_identity: Some(SpiffeId::new("cluster.local", "back", "api").unwrap()),
            mtls: true,
            trace_id: 0,
            started: Instant::now(),
        };
        let l = report.access_log();
        assert_eq!(l.src_workload.as_deref(), Some("web-1"));
        assert_eq!(l.dst_workload.as_deref(), Some("api"));
        assert_eq!(l.dst_namespace.as_deref(), Some("back"));
        assert_eq!(
            l.src_identity.as_deref(),
            Some("spiffe://cluster.local/ns/front/sa/web")
        );
        assert_eq!(l.direction, "outbound");
        // Without mTLS nobody proved an identity: none is logged.
        report.mtls = false;
        let l = report.access_log();
        assert_eq!((l.src_identity, l.dst_identity), (None, None));
    }

    #[test]
    fn dropped_spans_are_exported_when_tracing() {
        let (tracer, _rx) = mesh_trace::Tracer::with_queue(1);
        let span = mesh_trace::OpenSpan::root().finish(
            mesh_trace::Kind::Client,
            "x".into(),
            vec![],
            false,
        );
        tracer.record(span.clone());
        tracer.record(span);
        let text = Metrics::with_tracer(None, Some(tracer)).encode();
        assert!(
            text.contains("ztunnel_trace_spans_dropped_total 1\n"),
            "{text}"
        );
        let off = Metrics::with_tracer(None, Some(mesh_trace::Tracer::disabled())).encode();
        assert!(!off.contains("trace_spans_dropped"), "{off}");
    }

    #[test]
    fn lifecycle_gauges_show_what_this_process_holds() {
        let drain = crate::drain::Drain::new();
        let status = Arc::new(crate::handover::Status::new(
            drain.clone(),
            std::time::Duration::from_secs(60),
        ));
        let m = Metrics::for_process(None, None, Some(status.clone()));
        let pod = drain.child();
        let _g = pod.guard();
        let text = m.encode();
        assert!(
            text.contains("# TYPE ztunnel_accepting gauge\nztunnel_accepting 1\n"),
            "{text}"
        );
        assert!(text.contains("ztunnel_open_connections 1\n"), "{text}");
        status.set(crate::handover::Phase::HandedOver {
            since: Instant::now(),
            signalled: false,
        });
        assert!(m.encode().contains("ztunnel_accepting 0\n"));
    }

    #[test]
    fn build_and_xds_metrics_have_istios_names_and_labels() {
        let m = Metrics::new(None);
        m.xds_terminated("ConnectionError");
        m.xds_message("type.googleapis.com/istio.workload.Address");
        m.xds_message("type.googleapis.com/istio.workload.Address");
        let text = m.encode();
        for line in [
            "# TYPE istio_build gauge".to_string(),
            format!(
                "istio_build{{component=\"ztunnel\",tag=\"{}\"}} 1",
                env!("CARGO_PKG_VERSION")
            ),
            "istio_xds_connection_terminations_total{reason=\"ConnectionError\"} 1".into(),
            "istio_xds_message_total{url=\"type.googleapis.com/istio.workload.Address\"} 2".into(),
        ] {
            assert!(text.contains(&line), "{line} missing from:\n{text}");
        }
    }
}
