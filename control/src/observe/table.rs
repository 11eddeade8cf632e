//! Prometheus answers → the rows `meshctl stat` and `top` print (and the dashboard
//! draws): pure functions over parsed samples.

use super::promql::{Figure, PATH_LABELS, PathFigure, Scope, TCP_PATH_LABELS};
use serde_json::Value;
use std::collections::BTreeMap;

/// One series of an instant vector.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

impl Sample {
    fn label(&self, k: &str) -> String {
        self.labels
            .get(k)
            .cloned()
            .unwrap_or_else(|| "unknown".into())
    }
}

/// The series of an `/api/v1/query` answer; its error when Prometheus refused the query.
pub fn parse_vector(v: &Value) -> Result<Vec<Sample>, String> {
    if v["status"] != "success" {
        return Err(format!(
            "Prometheus refused the query: {}",
            v["error"].as_str().unwrap_or("no reason given")
        ));
    }
    if v["data"]["resultType"] != "vector" {
        return Err(format!(
            "Prometheus answered a {} where a vector was expected",
            v["data"]["resultType"]
        ));
    }
    let mut out = Vec::new();
    for r in v["data"]["result"].as_array().into_iter().flatten() {
        let labels = r["metric"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
            .collect();
        let value = r["value"][1]
            .as_str()
            .and_then(|s| s.parse::<f64>().ok())
            .ok_or("Prometheus answered a sample without a value")?;
        out.push(Sample { labels, value });
    }
    Ok(out)
}

/// `part / whole`, at most 1: Prometheus extrapolates each series' rate to the window's
/// edges on its own, so a part's rate can come out a little above its whole's.
fn share(part: f64, whole: f64) -> f64 {
    (part / whole).min(1.0)
}

/// A finite value (`histogram_quantile` gives NaN without traffic).
fn finite(v: f64) -> Option<f64> {
    v.is_finite().then_some(v)
}

/// The golden metrics of one workload or service.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct StatRow {
    pub namespace: String,
    pub name: String,
    pub rps: Option<f64>,
    /// Share of requests that did not fail with a 5xx, 0..=1.
    pub success: Option<f64>,
    pub p50: Option<f64>,
    pub p95: Option<f64>,
    pub p99: Option<f64>,
    pub tcp_opened: Option<f64>,
    pub tcp_bytes: Option<f64>,
    /// Share of TCP connections with mutual TLS, 0..=1.
    pub mtls: Option<f64>,
}

/// One row per destination seen in any answer, sorted by namespace then name.
pub fn stat_rows(scope: Scope, results: &BTreeMap<Figure, Vec<Sample>>) -> Vec<StatRow> {
    let (ns_label, name_label) = scope.labels();
    let mut rows: BTreeMap<(String, String), StatRow> = BTreeMap::new();
    let mut success_rps: BTreeMap<(String, String), f64> = BTreeMap::new();
    let mut mtls_cps: BTreeMap<(String, String), f64> = BTreeMap::new();
    for (figure, samples) in results {
        for s in samples {
            let key = (s.label(ns_label), s.label(name_label));
            let row = rows.entry(key.clone()).or_insert_with(|| StatRow {
                namespace: key.0.clone(),
                name: key.1.clone(),
                ..Default::default()
            });
            let v = finite(s.value);
            match figure {
                Figure::Rps => row.rps = v,
                Figure::P50 => row.p50 = v,
                Figure::P95 => row.p95 = v,
                Figure::P99 => row.p99 = v,
                Figure::TcpOpened => row.tcp_opened = v,
                Figure::TcpBytes => row.tcp_bytes = v,
                Figure::SuccessRps => {
                    success_rps.insert(key, s.value);
                }
                Figure::TcpMtls => {
                    mtls_cps.insert(key, s.value);
                }
            }
        }
    }
    for (key, row) in rows.iter_mut() {
        // No successful series at all means every request failed.
        row.success = row
            .rps
            .filter(|r| *r > 0.0)
            .map(|r| share(success_rps.get(key).copied().unwrap_or(0.0), r));
        row.mtls = row
            .tcp_opened
            .filter(|c| *c > 0.0)
            .map(|c| share(mtls_cps.get(key).copied().unwrap_or(0.0), c));
    }
    rows.into_values().collect()
}

fn cell(v: Option<f64>, f: impl Fn(f64) -> String) -> String {
    v.map(f).unwrap_or_else(|| "-".into())
}

pub fn percent(v: f64) -> String {
    format!("{:.2}%", v * 100.0)
}

pub fn rate(v: f64) -> String {
    format!("{v:.2}/s")
}

pub fn millis(v: f64) -> String {
    format!("{v:.0}ms")
}

pub fn bytes_rate(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.1}MB/s", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.1}kB/s", v / 1e3)
    } else {
        format!("{v:.0}B/s")
    }
}

/// Fixed-width columns: the widest cell of each column sets its width.
fn columns(rows: Vec<Vec<String>>) -> String {
    let n = rows.first().map(Vec::len).unwrap_or(0);
    let widths: Vec<usize> = (0..n)
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

pub fn render_stat(scope: Scope, rows: &[StatRow]) -> String {
    if rows.is_empty() {
        return "no traffic in the window (is Prometheus scraping the mesh? see `up` in its UI)\n"
            .into();
    }
    let mut t = vec![
        [
            "NAMESPACE",
            if scope == Scope::Workload {
                "WORKLOAD"
            } else {
                "SERVICE"
            },
            "SUCCESS",
            "RPS",
            "P50",
            "P95",
            "P99",
            "TCP CONN",
            "TCP BYTES",
            "MTLS",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for r in rows {
        t.push(vec![
            r.namespace.clone(),
            r.name.clone(),
            cell(r.success, percent),
            cell(r.rps, rate),
            cell(r.p50, millis),
            cell(r.p95, millis),
            cell(r.p99, millis),
            cell(r.tcp_opened, rate),
            cell(r.tcp_bytes, bytes_rate),
            cell(r.mtls, percent),
        ]);
    }
    columns(t)
}

/// One source → destination path.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PathRow {
    /// `namespace/workload`.
    pub source: String,
    /// `namespace/service` (HTTP, through a waypoint) or `namespace/workload` (TCP).
    pub destination: String,
    /// "http" or "tcp".
    pub protocol: &'static str,
    /// Requests per second (http) or connections opened per second (tcp).
    pub rate: f64,
    /// Share of requests failing with a 5xx (http).
    pub errors: Option<f64>,
    pub p99: Option<f64>,
    /// Share of connections with mutual TLS (tcp).
    pub mtls: Option<f64>,
}

fn path_key(s: &Sample, labels: [&str; 4]) -> (String, String) {
    (
        format!("{}/{}", s.label(labels[0]), s.label(labels[1])),
        format!("{}/{}", s.label(labels[2]), s.label(labels[3])),
    )
}

/// Every path with traffic, busiest first (ties by name), at most `limit`.
pub fn path_rows(results: &BTreeMap<PathFigure, Vec<Sample>>, limit: usize) -> Vec<PathRow> {
    let mut http: BTreeMap<(String, String), PathRow> = BTreeMap::new();
    let mut tcp: BTreeMap<(String, String), PathRow> = BTreeMap::new();
    let mut errors = BTreeMap::new();
    let mut mtls = BTreeMap::new();
    let get = |f| results.get(&f).map(Vec::as_slice).unwrap_or_default();
    for s in get(PathFigure::Rps) {
        let key = path_key(s, PATH_LABELS);
        http.insert(
            key.clone(),
            PathRow {
                source: key.0,
                destination: key.1,
                protocol: "http",
                rate: s.value,
                ..Default::default()
            },
        );
    }
    for s in get(PathFigure::ErrorRps) {
        errors.insert(path_key(s, PATH_LABELS), s.value);
    }
    for s in get(PathFigure::P99) {
        if let Some(r) = http.get_mut(&path_key(s, PATH_LABELS)) {
            r.p99 = finite(s.value);
        }
    }
    for s in get(PathFigure::TcpOpened) {
        let key = path_key(s, TCP_PATH_LABELS);
        tcp.insert(
            key.clone(),
            PathRow {
                source: key.0,
                destination: key.1,
                protocol: "tcp",
                rate: s.value,
                ..Default::default()
            },
        );
    }
    for s in get(PathFigure::TcpMtls) {
        mtls.insert(path_key(s, TCP_PATH_LABELS), s.value);
    }
    for (k, r) in http.iter_mut() {
        r.errors = (r.rate > 0.0).then(|| share(errors.get(k).copied().unwrap_or(0.0), r.rate));
    }
    for (k, r) in tcp.iter_mut() {
        r.mtls = (r.rate > 0.0).then(|| share(mtls.get(k).copied().unwrap_or(0.0), r.rate));
    }
    let mut rows: Vec<PathRow> = http
        .into_values()
        .chain(tcp.into_values())
        .filter(|r| r.rate > 0.0)
        .collect();
    rows.sort_by(|a, b| {
        b.rate
            .total_cmp(&a.rate)
            .then_with(|| (&a.source, &a.destination).cmp(&(&b.source, &b.destination)))
    });
    rows.truncate(limit);
    rows
}

pub fn render_paths(rows: &[PathRow]) -> String {
    if rows.is_empty() {
        return "no traffic in the window\n".into();
    }
    let mut t = vec![
        [
            "SOURCE",
            "DESTINATION",
            "PROTO",
            "RATE",
            "ERRORS",
            "P99",
            "MTLS",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for r in rows {
        t.push(vec![
            r.source.clone(),
            r.destination.clone(),
            r.protocol.into(),
            rate(r.rate),
            cell(r.errors, percent),
            cell(r.p99, millis),
            cell(r.mtls, percent),
        ]);
    }
    columns(t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample(labels: &[(&str, &str)], value: f64) -> Sample {
        Sample {
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            value,
        }
    }

    fn api(value: f64) -> Sample {
        sample(
            &[
                ("destination_workload_namespace", "back"),
                ("destination_workload", "api"),
            ],
            value,
        )
    }

    #[test]
    fn parses_an_instant_vector_and_explains_refusals() {
        let v = json!({"status": "success", "data": {"resultType": "vector", "result": [
            {"metric": {"destination_workload": "api"}, "value": [1.5, "0.25"]},
            {"metric": {}, "value": [1.5, "NaN"]}]}});
        let s = parse_vector(&v).unwrap();
        assert_eq!(s[0].labels["destination_workload"], "api");
        assert_eq!(s[0].value, 0.25);
        assert!(s[1].value.is_nan());
        let e = parse_vector(&json!({"status": "error", "error": "parse error at char 3"}))
            .unwrap_err();
        assert!(e.contains("parse error at char 3"), "{e}");
        assert!(
            parse_vector(
                &json!({"status": "success", "data": {"resultType": "matrix", "result": []}})
            )
            .is_err()
        );
    }

    #[test]
    fn success_rate_and_mtls_share_are_ratios_of_rates() {
        let results = BTreeMap::from([
            (Figure::Rps, vec![api(4.0)]),
            (Figure::SuccessRps, vec![api(3.0)]),
            (Figure::P99, vec![api(12.0)]),
            (Figure::P50, vec![api(f64::NAN)]),
            (Figure::TcpOpened, vec![api(2.0)]),
            (Figure::TcpMtls, vec![api(1.0)]),
        ]);
        let rows = stat_rows(Scope::Workload, &results);
        assert_eq!(rows.len(), 1);
        let r = &rows[0];
        assert_eq!((r.namespace.as_str(), r.name.as_str()), ("back", "api"));
        assert_eq!(r.success, Some(0.75));
        assert_eq!(r.mtls, Some(0.5));
        let over = BTreeMap::from([
            (Figure::TcpOpened, vec![api(2.0)]),
            (Figure::TcpMtls, vec![api(2.001)]),
        ]);
        assert_eq!(stat_rows(Scope::Workload, &over)[0].mtls, Some(1.0));
        assert_eq!(r.p99, Some(12.0));
        assert_eq!(r.p50, None, "NaN quantiles are no value");
        let text = render_stat(Scope::Workload, &rows);
        assert!(text.starts_with("NAMESPACE  WORKLOAD  SUCCESS"), "{text}");
        assert!(
            text.contains("back       api       75.00%   4.00/s"),
            "{text}"
        );
    }

    #[test]
    fn every_request_failing_is_zero_success_and_tcp_only_has_none() {
        let tcp_only = sample(
            &[
                ("destination_workload_namespace", "db"),
                ("destination_workload", "pg"),
            ],
            1.0,
        );
        let results = BTreeMap::from([
            (Figure::Rps, vec![api(2.0)]),
            (Figure::TcpOpened, vec![tcp_only]),
        ]);
        let rows = stat_rows(Scope::Workload, &results);
        assert_eq!(rows[0].success, Some(0.0));
        assert_eq!(rows[1].name, "pg");
        assert_eq!(rows[1].success, None);
        assert_eq!(rows[1].mtls, Some(0.0));
        assert!(render_stat(Scope::Workload, &rows).contains("pg"));
    }

    #[test]
    fn paths_are_sorted_busiest_first_and_limited() {
        let http = |src: &str, dst: &str, v: f64| {
            sample(
                &[
                    ("source_workload_namespace", "front"),
                    ("source_workload", src),
                    ("destination_service_namespace", "back"),
                    ("destination_service_name", dst),
                ],
                v,
            )
        };
        let tcp = sample(
            &[
                ("source_workload_namespace", "front"),
                ("source_workload", "web"),
                ("destination_workload_namespace", "back"),
                ("destination_workload", "db"),
            ],
            3.0,
        );
        let results = BTreeMap::from([
            (
                PathFigure::Rps,
                vec![http("web", "api", 10.0), http("cron", "api", 1.0)],
            ),
            (PathFigure::ErrorRps, vec![http("web", "api", 2.5)]),
            (PathFigure::P99, vec![http("web", "api", 40.0)]),
            (PathFigure::TcpOpened, vec![tcp.clone()]),
            (PathFigure::TcpMtls, vec![tcp]),
        ]);
        let rows = path_rows(&results, 10);
        let order: Vec<(&str, &str, &str)> = rows
            .iter()
            .map(|r| (r.source.as_str(), r.destination.as_str(), r.protocol))
            .collect();
        assert_eq!(
            order,
            [
                ("front/web", "back/api", "http"),
                ("front/web", "back/db", "tcp"),
                ("front/cron", "back/api", "http")
            ]
        );
        assert_eq!(rows[0].errors, Some(0.25));
        assert_eq!(rows[0].p99, Some(40.0));
        assert_eq!(rows[1].mtls, Some(1.0));
        assert_eq!(rows[2].errors, Some(0.0));
        assert_eq!(path_rows(&results, 1).len(), 1);
        let text = render_paths(&rows);
        assert!(
            text.contains("front/web   back/api     http   10.00/s  25.00%  40ms"),
            "{text}"
        );
    }
}
