//! The PromQL behind `meshctl stat`, `top` and `dashboard`, over the mesh's Istio-named
//! metrics. HTTP figures come from the waypoint (`reporter="waypoint"`: only a waypoint
//! sees requests in ambient mode); TCP figures from the ztunnel on the destination's node
//! (`reporter="destination"`), which sees every connection, with or without a waypoint.

use std::fmt;

/// What a row of `stat` is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Workload,
    Service,
}

impl Scope {
    /// The destination labels a row is grouped by: (namespace, name).
    pub fn labels(self) -> (&'static str, &'static str) {
        match self {
            Scope::Workload => ("destination_workload_namespace", "destination_workload"),
            Scope::Service => ("destination_service_namespace", "destination_service_name"),
        }
    }
}

/// A PromQL range such as `1m` or `30s`: digits then one of s, m, h.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window(String);

impl Window {
    pub fn parse(s: &str) -> Result<Window, String> {
        let (n, unit) = s.split_at(s.len().saturating_sub(1));
        if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) && matches!(unit, "s" | "m" | "h")
        {
            Ok(Window(s.to_string()))
        } else {
            Err(format!(
                "window {s:?}: give a duration like 30s, 1m or 1h (the range the rates are taken over)"
            ))
        }
    }

    pub fn seconds(&self) -> f64 {
        let (n, unit) = self.0.split_at(self.0.len() - 1);
        let n: f64 = n.parse().unwrap_or(0.0);
        n * match unit {
            "m" => 60.0,
            "h" => 3600.0,
            _ => 1.0,
        }
    }
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Which figure a query computes (each query returns one series per row).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Figure {
    /// Requests per second.
    Rps,
    /// Requests per second that did not fail with a 5xx.
    SuccessRps,
    P50,
    P95,
    P99,
    /// TCP connections opened per second.
    TcpOpened,
    /// TCP connections opened per second with mutual TLS.
    TcpMtls,
    /// Bytes per second, both directions.
    TcpBytes,
}

impl Figure {
    pub const ALL: [Figure; 8] = [
        Figure::Rps,
        Figure::SuccessRps,
        Figure::P50,
        Figure::P95,
        Figure::P99,
        Figure::TcpOpened,
        Figure::TcpMtls,
        Figure::TcpBytes,
    ];
}

/// A label matcher list for an optional namespace restriction on `ns_label`.
fn selector(base: &str, ns_label: &str, namespace: Option<&str>) -> String {
    match namespace {
        Some(ns) => format!("{base},{ns_label}=\"{}\"", escape(ns)),
        None => base.to_string(),
    }
}

/// A PromQL string literal's content.
fn escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

/// The query computing `figure` for each row of `scope` over `window`, restricted to
/// destinations in `namespace` when given.
pub fn stat_query(
    figure: Figure,
    scope: Scope,
    window: &Window,
    namespace: Option<&str>,
) -> String {
    let (ns, name) = scope.labels();
    let by = format!("{ns}, {name}");
    let http = selector("reporter=\"waypoint\"", ns, namespace);
    let tcp = selector("reporter=\"destination\"", ns, namespace);
    let quantile = |q: &str| {
        format!(
            "histogram_quantile({q}, sum by ({by}, le) (rate(istio_request_duration_milliseconds_bucket{{{http}}}[{window}])))"
        )
    };
    match figure {
        Figure::Rps => format!("sum by ({by}) (rate(istio_requests_total{{{http}}}[{window}]))"),
        Figure::SuccessRps => format!(
            "sum by ({by}) (rate(istio_requests_total{{{http},response_code!~\"5..\"}}[{window}]))"
        ),
        Figure::P50 => quantile("0.5"),
        Figure::P95 => quantile("0.95"),
        Figure::P99 => quantile("0.99"),
        Figure::TcpOpened => {
            format!("sum by ({by}) (rate(istio_tcp_connections_opened_total{{{tcp}}}[{window}]))")
        }
        Figure::TcpMtls => format!(
            "sum by ({by}) (rate(istio_tcp_connections_opened_total{{{tcp},connection_security_policy=\"mutual_tls\"}}[{window}]))"
        ),
        // Summed per row first: the two directions' series differ in their names only.
        Figure::TcpBytes => format!(
            "sum by ({by}) (rate(istio_tcp_sent_bytes_total{{{tcp}}}[{window}])) + sum by ({by}) (rate(istio_tcp_received_bytes_total{{{tcp}}}[{window}]))"
        ),
    }
}

/// The labels of a path (source workload → destination).
pub const PATH_LABELS: [&str; 4] = [
    "source_workload_namespace",
    "source_workload",
    "destination_service_namespace",
    "destination_service_name",
];
pub const TCP_PATH_LABELS: [&str; 4] = [
    "source_workload_namespace",
    "source_workload",
    "destination_workload_namespace",
    "destination_workload",
];

/// Which figure a path query computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PathFigure {
    Rps,
    ErrorRps,
    P99,
    /// TCP connections per second between workloads, and those with mTLS.
    TcpOpened,
    TcpMtls,
}

impl PathFigure {
    pub const ALL: [PathFigure; 5] = [
        PathFigure::Rps,
        PathFigure::ErrorRps,
        PathFigure::P99,
        PathFigure::TcpOpened,
        PathFigure::TcpMtls,
    ];
}

/// The query computing `figure` per source → destination path over `window`.
pub fn path_query(figure: PathFigure, window: &Window) -> String {
    let by = PATH_LABELS.join(", ");
    let tcp_by = TCP_PATH_LABELS.join(", ");
    let http = "reporter=\"waypoint\"";
    let tcp = "reporter=\"destination\"";
    match figure {
        PathFigure::Rps => {
            format!("sum by ({by}) (rate(istio_requests_total{{{http}}}[{window}]))")
        }
        PathFigure::ErrorRps => format!(
            "sum by ({by}) (rate(istio_requests_total{{{http},response_code=~\"5..\"}}[{window}]))"
        ),
        PathFigure::P99 => format!(
            "histogram_quantile(0.99, sum by ({by}, le) (rate(istio_request_duration_milliseconds_bucket{{{http}}}[{window}])))"
        ),
        PathFigure::TcpOpened => format!(
            "sum by ({tcp_by}) (rate(istio_tcp_connections_opened_total{{{tcp}}}[{window}]))"
        ),
        PathFigure::TcpMtls => format!(
            "sum by ({tcp_by}) (rate(istio_tcp_connections_opened_total{{{tcp},connection_security_policy=\"mutual_tls\"}}[{window}]))"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(s: &str) -> Window {
        Window::parse(s).unwrap()
    }

    #[test]
    fn windows_are_validated() {
        assert_eq!(w("90s").seconds(), 90.0);
        assert_eq!(w("2m").seconds(), 120.0);
        assert_eq!(w("1h").seconds(), 3600.0);
        for bad in ["", "m", "1", "1d", "1m)", "-1m", "1.5m"] {
            assert!(Window::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn workload_request_rate_reads_the_waypoint() {
        assert_eq!(
            stat_query(Figure::Rps, Scope::Workload, &w("1m"), None),
            "sum by (destination_workload_namespace, destination_workload) (rate(istio_requests_total{reporter=\"waypoint\"}[1m]))"
        );
    }

    #[test]
    fn success_excludes_5xx_and_the_namespace_filter_is_escaped() {
        let q = stat_query(Figure::SuccessRps, Scope::Service, &w("30s"), Some("a\"b"));
        assert_eq!(
            q,
            "sum by (destination_service_namespace, destination_service_name) (rate(istio_requests_total{reporter=\"waypoint\",destination_service_namespace=\"a\\\"b\",response_code!~\"5..\"}[30s]))"
        );
    }

    #[test]
    fn latency_quantiles_come_from_the_duration_buckets() {
        let q = stat_query(Figure::P99, Scope::Workload, &w("1m"), Some("back"));
        assert_eq!(
            q,
            "histogram_quantile(0.99, sum by (destination_workload_namespace, destination_workload, le) (rate(istio_request_duration_milliseconds_bucket{reporter=\"waypoint\",destination_workload_namespace=\"back\"}[1m])))"
        );
    }

    #[test]
    fn tcp_figures_read_the_destination_ztunnel() {
        let q = stat_query(Figure::TcpMtls, Scope::Workload, &w("1m"), None);
        assert!(q.contains("istio_tcp_connections_opened_total{reporter=\"destination\",connection_security_policy=\"mutual_tls\"}[1m]"), "{q}");
        let q = stat_query(Figure::TcpBytes, Scope::Service, &w("1m"), None);
        assert!(
            q.contains("istio_tcp_sent_bytes_total")
                && q.contains("istio_tcp_received_bytes_total"),
            "{q}"
        );
    }

    #[test]
    fn path_queries_group_by_source_and_destination() {
        let q = path_query(PathFigure::ErrorRps, &w("1m"));
        assert_eq!(
            q,
            "sum by (source_workload_namespace, source_workload, destination_service_namespace, destination_service_name) (rate(istio_requests_total{reporter=\"waypoint\",response_code=~\"5..\"}[1m]))"
        );
        assert!(path_query(PathFigure::TcpOpened, &w("1m")).contains("destination_workload)"));
    }
}
