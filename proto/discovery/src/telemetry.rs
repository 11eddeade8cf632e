//! Istio's TCP metric labels (`istio_tcp_*`), the one set ztunnel and the waypoint both
//! report (with their own `reporter`), so dashboards built for Istio read either. Every
//! value comes from configuration or a verified identity, never from a peer.
//!
//! Names and derivations are Istio's: `*_app` and `*_version` are the workload's canonical
//! name and revision (which the control plane takes from `service.istio.io/canonical-*`,
//! then `app.kubernetes.io/name|version`, then `app`/`version`, as istiod does); the
//! locality labels (`source_region`, `source_zone`, `destination_region`,
//! `destination_zone`) appear once either end's workload is known, as Istio's ztunnel
//! writes them.

use crate::Workload;
use crate::types::Service;
use prometheus_client::encoding::{EncodeLabelSet, LabelSetEncoder};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    pub reporter: &'static str,
    pub source_workload: String,
    pub source_canonical_service: String,
    pub source_canonical_revision: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub source_app: String,
    pub source_version: String,
    pub source_cluster: String,
    pub destination_service: String,
    pub destination_service_namespace: String,
    pub destination_service_name: String,
    pub destination_workload: String,
    pub destination_canonical_service: String,
    pub destination_canonical_revision: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_app: String,
    pub destination_version: String,
    pub destination_cluster: String,
    pub request_protocol: &'static str,
    pub response_flags: &'static str,
    pub connection_security_policy: &'static str,
    #[prometheus(flatten)]
    pub locality: Localities,
}

/// Where both ends run; written only when set (no workload known: no locality labels).
#[derive(Clone, Debug, Default, Hash, PartialEq, Eq)]
pub struct Localities(pub Option<LocalityLabels>);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LocalityLabels {
    pub source_region: String,
    pub source_zone: String,
    pub destination_region: String,
    pub destination_zone: String,
}

impl Default for LocalityLabels {
    fn default() -> Self {
        let u = || "unknown".to_string();
        LocalityLabels {
            source_region: u(),
            source_zone: u(),
            destination_region: u(),
            destination_zone: u(),
        }
    }
}

impl EncodeLabelSet for Localities {
    fn encode(&self, encoder: &mut LabelSetEncoder<'_>) -> Result<(), std::fmt::Error> {
        match &self.0 {
            Some(l) => l.encode(encoder),
            None => Ok(()),
        }
    }
}

impl TcpLabels {
    /// Every value `unknown`, a clean TCP connection without mTLS.
    pub fn new(reporter: &'static str) -> Self {
        let u = || "unknown".to_string();
        TcpLabels {
            reporter,
            source_workload: u(),
            source_canonical_service: u(),
            source_canonical_revision: u(),
            source_workload_namespace: u(),
            source_principal: u(),
            source_app: u(),
            source_version: u(),
            source_cluster: u(),
            destination_service: u(),
            destination_service_namespace: u(),
            destination_service_name: u(),
            destination_workload: u(),
            destination_canonical_service: u(),
            destination_canonical_revision: u(),
            destination_workload_namespace: u(),
            destination_principal: u(),
            destination_app: u(),
            destination_version: u(),
            destination_cluster: u(),
            request_protocol: "tcp",
            response_flags: "-",
            connection_security_policy: "unknown",
            locality: Localities(None),
        }
    }

    /// The source workload's labels (not its principal: that comes from the handshake).
    pub fn with_source(mut self, w: Option<&Workload>) -> Self {
        if let Some(w) = w {
            self.source_workload = or_unknown(Some(w.telemetry_name()));
            self.source_canonical_service = or_unknown(Some(&w.canonical_name));
            self.source_canonical_revision = or_unknown(Some(&w.canonical_revision));
            self.source_workload_namespace = or_unknown(Some(&w.namespace));
            self.source_app = or_unknown(Some(&w.canonical_name));
            self.source_version = or_unknown(Some(&w.canonical_revision));
            self.source_cluster = or_unknown(Some(&w.cluster_id));
            let l = self.locality.0.get_or_insert_with(Default::default);
            l.source_region = or_unknown(Some(&w.locality.region));
            l.source_zone = or_unknown(Some(&w.locality.zone));
        }
        self
    }

    /// The destination workload's labels (not its principal: the caller knows which
    /// identity was verified or expected).
    pub fn set_destination(&mut self, w: &Workload) {
        self.destination_workload = or_unknown(Some(w.telemetry_name()));
        self.destination_canonical_service = or_unknown(Some(&w.canonical_name));
        self.destination_canonical_revision = or_unknown(Some(&w.canonical_revision));
        self.destination_workload_namespace = or_unknown(Some(&w.namespace));
        self.destination_app = or_unknown(Some(&w.canonical_name));
        self.destination_version = or_unknown(Some(&w.canonical_revision));
        self.destination_cluster = or_unknown(Some(&w.cluster_id));
        let l = self.locality.0.get_or_insert_with(Default::default);
        l.destination_region = or_unknown(Some(&w.locality.region));
        l.destination_zone = or_unknown(Some(&w.locality.zone));
    }

    pub fn with_destination(mut self, w: Option<&Workload>) -> Self {
        if let Some(w) = w {
            self.set_destination(w);
        }
        self
    }

    /// The service's own name and namespace (never split from the hostname).
    pub fn with_destination_service(mut self, s: Option<&Service>) -> Self {
        if let Some(s) = s {
            self.destination_service = or_unknown(Some(&s.hostname));
            self.destination_service_namespace = or_unknown(Some(&s.namespace));
            self.destination_service_name = or_unknown(Some(&s.name));
        }
        self
    }
}

/// A label value as Istio writes it: `unknown` when absent or empty.
pub fn or_unknown(s: Option<&str>) -> String {
    match s {
        Some(v) if !v.is_empty() => v.to_string(),
        _ => "unknown".to_string(),
    }
}

#[cfg(test)]
mod tests;
