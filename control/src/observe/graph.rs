//! The service graph `meshctl dashboard` draws, built from Prometheus answers: nodes are
//! workloads, services and waypoints (each in its namespace); edges carry the traffic.
//!
//! HTTP goes client workload → Service (requests/s, 5xx share, p99, as the waypoint
//! reported them) → the waypoint that served it (`namespace`/`pod` target labels of the
//! reporting waypoint, as Prometheus's usual Kubernetes relabelling and the lab set them).
//! TCP edges come from the destination's ztunnel: workload → workload, connections/s and
//! the mTLS share. Requests reported by a waypoint arrived over HBONE: always mTLS.
//!
//! Denials ride on the same edges: connections the destination's ztunnel refused by
//! policy (`istio_tcp_connections_failed_total{response_flags="DENY"}`) and the
//! waypoint's 403 answers (its request metrics carry no response flags, so an RBAC
//! denial is told apart by its code only; an app's own 403 counts too).

use super::promql::Window;
use super::table::Sample;
use serde::Serialize;
use std::collections::BTreeMap;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum GraphFigure {
    HttpRps,
    HttpErrors,
    HttpP99,
    TcpOpened,
    TcpMtls,
    TcpDenied,
    HttpDenied,
}

impl GraphFigure {
    pub const ALL: [GraphFigure; 7] = [
        GraphFigure::HttpRps,
        GraphFigure::HttpErrors,
        GraphFigure::HttpP99,
        GraphFigure::TcpOpened,
        GraphFigure::TcpMtls,
        GraphFigure::TcpDenied,
        GraphFigure::HttpDenied,
    ];
}

const HTTP_BY: &str = "source_workload_namespace, source_workload, destination_service_namespace, destination_service_name, namespace, pod";
const TCP_BY: &str = "source_workload_namespace, source_workload, destination_workload_namespace, destination_workload";

pub fn graph_query(figure: GraphFigure, window: &Window) -> String {
    let http = "reporter=\"waypoint\"";
    let tcp = "reporter=\"destination\"";
    match figure {
        GraphFigure::HttpRps => {
            format!("sum by ({HTTP_BY}) (rate(istio_requests_total{{{http}}}[{window}]))")
        }
        GraphFigure::HttpErrors => format!(
            "sum by ({HTTP_BY}) (rate(istio_requests_total{{{http},response_code=~\"5..\"}}[{window}]))"
        ),
        GraphFigure::HttpP99 => format!(
            "histogram_quantile(0.99, sum by ({HTTP_BY}, le) (rate(istio_request_duration_milliseconds_bucket{{{http}}}[{window}])))"
        ),
        GraphFigure::TcpOpened => format!(
            "sum by ({TCP_BY}) (rate(istio_tcp_connections_opened_total{{{tcp}}}[{window}]))"
        ),
        GraphFigure::TcpMtls => format!(
            "sum by ({TCP_BY}) (rate(istio_tcp_connections_opened_total{{{tcp},connection_security_policy=\"mutual_tls\"}}[{window}]))"
        ),
        GraphFigure::TcpDenied => format!(
            "sum by ({TCP_BY}) (rate(istio_tcp_connections_failed_total{{{tcp},response_flags=\"DENY\"}}[{window}]))"
        ),
        GraphFigure::HttpDenied => format!(
            "sum by ({HTTP_BY}) (rate(istio_requests_total{{{http},response_code=\"403\"}}[{window}]))"
        ),
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Node {
    /// `workload:ns/name`, `service:ns/name` or `waypoint:ns/name`.
    pub id: String,
    pub kind: &'static str,
    pub namespace: String,
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Edge {
    pub from: String,
    pub to: String,
    /// `http`, `tcp`, or `via` (a Service to the waypoint that serves it).
    pub protocol: &'static str,
    /// Requests/s (http) or connections/s (tcp).
    pub rate: f64,
    /// Share of 5xx answers (http).
    pub errors: Option<f64>,
    pub p99_ms: Option<f64>,
    /// Share of connections with mutual TLS; `None` when unknown (no new connection).
    pub mtls: Option<f64>,
    /// Refused by policy per second: connections (tcp) or 403 answers (http).
    pub denied: f64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Graph {
    pub namespaces: Vec<String>,
    pub nodes: Vec<Node>,
    pub edges: Vec<Edge>,
}

fn label(s: &Sample, k: &str) -> String {
    s.labels
        .get(k)
        .filter(|v| !v.is_empty())
        .cloned()
        .unwrap_or_else(|| "unknown".into())
}

fn id(kind: &str, ns: &str, name: &str) -> String {
    format!("{kind}:{ns}/{name}")
}

/// The graph of everything in `results`; deterministic order (by id).
pub fn build(results: &BTreeMap<GraphFigure, Vec<Sample>>) -> Graph {
    let get = |f| results.get(&f).map(Vec::as_slice).unwrap_or_default();
    let mut nodes: BTreeMap<String, Node> = BTreeMap::new();
    fn add(
        nodes: &mut BTreeMap<String, Node>,
        kind: &'static str,
        ns: String,
        name: String,
    ) -> String {
        let i = id(kind, &ns, &name);
        nodes.entry(i.clone()).or_insert(Node {
            id: i.clone(),
            kind,
            namespace: ns,
            name,
        });
        i
    }
    let mut edges: BTreeMap<(String, String, &'static str), Edge> = BTreeMap::new();
    let http_key = |s: &Sample| {
        (
            (
                label(s, "source_workload_namespace"),
                label(s, "source_workload"),
            ),
            (
                label(s, "destination_service_namespace"),
                label(s, "destination_service_name"),
            ),
            (label(s, "namespace"), label(s, "pod")),
        )
    };
    let mut http_errors: BTreeMap<(String, String), f64> = BTreeMap::new();
    let mut http_p99: BTreeMap<(String, String), f64> = BTreeMap::new();
    for s in get(GraphFigure::HttpRps) {
        let (src, svc, wp) = http_key(s);
        let from = add(&mut nodes, "workload", src.0, src.1);
        let to = add(&mut nodes, "service", svc.0, svc.1);
        let e = edges
            .entry((from.clone(), to.clone(), "http"))
            .or_insert(Edge {
                from,
                to: to.clone(),
                protocol: "http",
                rate: 0.0,
                errors: None,
                p99_ms: None,
                mtls: Some(1.0),
                denied: 0.0,
            });
        e.rate += s.value;
        if wp.1 != "unknown" {
            let w = add(&mut nodes, "waypoint", wp.0, wp.1);
            edges.entry((to.clone(), w.clone(), "via")).or_insert(Edge {
                from: to,
                to: w,
                protocol: "via",
                rate: 0.0,
                errors: None,
                p99_ms: None,
                mtls: None,
                denied: 0.0,
            });
        }
    }
    for s in get(GraphFigure::HttpErrors) {
        let (src, svc, _) = http_key(s);
        *http_errors
            .entry((
                id("workload", &src.0, &src.1),
                id("service", &svc.0, &svc.1),
            ))
            .or_default() += s.value;
    }
    for s in get(GraphFigure::HttpP99) {
        if s.value.is_finite() {
            let (src, svc, _) = http_key(s);
            let slot = http_p99
                .entry((
                    id("workload", &src.0, &src.1),
                    id("service", &svc.0, &svc.1),
                ))
                .or_insert(0.0);
            // Several waypoints on one edge: the worst of their p99s.
            *slot = slot.max(s.value);
        }
    }
    let tcp_key = |s: &Sample| {
        (
            (
                label(s, "source_workload_namespace"),
                label(s, "source_workload"),
            ),
            (
                label(s, "destination_workload_namespace"),
                label(s, "destination_workload"),
            ),
        )
    };
    let mut tcp_mtls: BTreeMap<(String, String), f64> = BTreeMap::new();
    for s in get(GraphFigure::TcpMtls) {
        let (src, dst) = tcp_key(s);
        tcp_mtls.insert(
            (
                id("workload", &src.0, &src.1),
                id("workload", &dst.0, &dst.1),
            ),
            s.value,
        );
    }
    let waypoint_ids: Vec<String> = nodes
        .values()
        .filter(|n| n.kind == "waypoint")
        .map(|n| id("workload", &n.namespace, &n.name))
        .collect();
    for s in get(GraphFigure::TcpOpened) {
        let (src, dst) = tcp_key(s);
        // A waypoint's own connections start from its waypoint node.
        let src_id = id("workload", &src.0, &src.1);
        let from = if waypoint_ids.contains(&src_id) {
            id("waypoint", &src.0, &src.1)
        } else {
            add(&mut nodes, "workload", src.0, src.1)
        };
        let to = add(&mut nodes, "workload", dst.0, dst.1);
        let mtls_rate = tcp_mtls.get(&(src_id, to.clone()));
        edges.insert(
            (from.clone(), to.clone(), "tcp"),
            Edge {
                from,
                to,
                protocol: "tcp",
                rate: s.value,
                errors: None,
                p99_ms: None,
                mtls: (s.value > 0.0)
                    .then(|| (mtls_rate.copied().unwrap_or(0.0) / s.value).min(1.0)),
                denied: 0.0,
            },
        );
    }
    // Denials after the traffic: an edge that was only ever refused still gets drawn.
    for s in get(GraphFigure::TcpDenied) {
        let (src, dst) = tcp_key(s);
        let src_id = id("workload", &src.0, &src.1);
        let from = if waypoint_ids.contains(&src_id) {
            id("waypoint", &src.0, &src.1)
        } else {
            add(&mut nodes, "workload", src.0, src.1)
        };
        let to = add(&mut nodes, "workload", dst.0, dst.1);
        edges
            .entry((from.clone(), to.clone(), "tcp"))
            .or_insert(Edge {
                from,
                to,
                protocol: "tcp",
                rate: 0.0,
                errors: None,
                p99_ms: None,
                mtls: None,
                denied: 0.0,
            })
            .denied += s.value;
    }
    for s in get(GraphFigure::HttpDenied) {
        let (src, svc, _) = http_key(s);
        let from = add(&mut nodes, "workload", src.0, src.1);
        let to = add(&mut nodes, "service", svc.0, svc.1);
        edges
            .entry((from.clone(), to.clone(), "http"))
            .or_insert(Edge {
                from,
                to,
                protocol: "http",
                rate: 0.0,
                errors: None,
                p99_ms: None,
                mtls: Some(1.0),
                denied: 0.0,
            })
            .denied += s.value;
    }
    for e in edges.values_mut().filter(|e| e.protocol == "http") {
        let k = (e.from.clone(), e.to.clone());
        e.errors =
            (e.rate > 0.0).then(|| (http_errors.get(&k).copied().unwrap_or(0.0) / e.rate).min(1.0));
        e.p99_ms = http_p99.get(&k).copied();
    }
    let mut namespaces: Vec<String> = nodes.values().map(|n| n.namespace.clone()).collect();
    namespaces.sort();
    namespaces.dedup();
    Graph {
        namespaces,
        nodes: nodes.into_values().collect(),
        edges: edges.into_values().collect(),
    }
}

/// A node id's parts: (kind, namespace, name); `None` when malformed.
pub fn parse_id(id: &str) -> Option<(&str, &str, &str)> {
    let (kind, rest) = id.split_once(':')?;
    let (ns, name) = rest.split_once('/')?;
    (matches!(kind, "workload" | "service" | "waypoint") && !ns.is_empty() && !name.is_empty())
        .then_some((kind, ns, name))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(labels: &[(&str, &str)], value: f64) -> Sample {
        Sample {
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            value,
        }
    }

    fn http(value: f64) -> Sample {
        sample(
            &[
                ("source_workload_namespace", "front"),
                ("source_workload", "client"),
                ("destination_service_namespace", "back"),
                ("destination_service_name", "api"),
                ("namespace", "back"),
                ("pod", "waypoint"),
            ],
            value,
        )
    }

    fn tcp(src: (&str, &str), dst: (&str, &str), value: f64) -> Sample {
        sample(
            &[
                ("source_workload_namespace", src.0),
                ("source_workload", src.1),
                ("destination_workload_namespace", dst.0),
                ("destination_workload", dst.1),
            ],
            value,
        )
    }

    #[test]
    fn http_through_a_waypoint_and_tcp_between_workloads() {
        let results = BTreeMap::from([
            (GraphFigure::HttpRps, vec![http(4.0)]),
            (GraphFigure::HttpErrors, vec![http(1.0)]),
            (GraphFigure::HttpP99, vec![http(25.0)]),
            (
                GraphFigure::TcpOpened,
                vec![
                    tcp(("back", "waypoint"), ("back", "api"), 2.0),
                    tcp(("front", "legacy"), ("back", "db"), 1.0),
                ],
            ),
            (
                GraphFigure::TcpMtls,
                vec![tcp(("back", "waypoint"), ("back", "api"), 2.0)],
            ),
        ]);
        let g = build(&results);
        let ids: Vec<&str> = g.nodes.iter().map(|n| n.id.as_str()).collect();
        assert_eq!(
            ids,
            [
                "service:back/api",
                "waypoint:back/waypoint",
                "workload:back/api",
                "workload:back/db",
                "workload:front/client",
                "workload:front/legacy"
            ]
        );
        assert_eq!(g.namespaces, ["back", "front"]);
        let edge = |from: &str, to: &str| {
            g.edges
                .iter()
                .find(|e| e.from == from && e.to == to)
                .unwrap_or_else(|| panic!("no edge {from} → {to}: {:?}", g.edges))
        };
        let e = edge("workload:front/client", "service:back/api");
        assert_eq!(
            (e.protocol, e.rate, e.errors, e.p99_ms, e.mtls),
            ("http", 4.0, Some(0.25), Some(25.0), Some(1.0))
        );
        assert_eq!(
            edge("service:back/api", "waypoint:back/waypoint").protocol,
            "via"
        );
        let e = edge("waypoint:back/waypoint", "workload:back/api");
        assert_eq!((e.protocol, e.mtls), ("tcp", Some(1.0)));
        let e = edge("workload:front/legacy", "workload:back/db");
        assert_eq!(e.mtls, Some(0.0), "plaintext");
    }

    #[test]
    fn idle_tcp_edges_have_unknown_mtls_and_ids_parse() {
        let results = BTreeMap::from([(
            GraphFigure::TcpOpened,
            vec![tcp(("a", "x"), ("b", "y"), 0.0)],
        )]);
        let g = build(&results);
        assert_eq!(g.edges[0].mtls, None);
        assert_eq!(
            parse_id("service:back/api"),
            Some(("service", "back", "api"))
        );
        assert_eq!(parse_id("pod:back/api"), None);
        assert_eq!(parse_id("service:back"), None);
    }

    #[test]
    fn an_edge_only_ever_denied_is_drawn_with_its_denials() {
        let results = BTreeMap::from([
            (
                GraphFigure::TcpDenied,
                vec![tcp(("front", "client"), ("back", "db"), 0.5)],
            ),
            (GraphFigure::HttpDenied, vec![http(0.25)]),
        ]);
        let g = build(&results);
        let ids: Vec<&str> = g.nodes.iter().map(|n| n.id.as_str()).collect();
        assert_eq!(
            ids,
            [
                "service:back/api",
                "workload:back/db",
                "workload:front/client"
            ]
        );
        let summary: Vec<_> = g
            .edges
            .iter()
            .map(|e| (e.from.as_str(), e.to.as_str(), e.protocol, e.rate, e.denied))
            .collect();
        assert_eq!(
            summary,
            [
                (
                    "workload:front/client",
                    "service:back/api",
                    "http",
                    0.0,
                    0.25
                ),
                ("workload:front/client", "workload:back/db", "tcp", 0.0, 0.5),
            ]
        );
        assert_eq!(g.edges[1].mtls, None, "no connection got through");
        assert_eq!(g.edges[0].errors, None);
    }

    #[test]
    fn denials_join_the_edge_that_also_carries_traffic() {
        let results = BTreeMap::from([
            (GraphFigure::HttpRps, vec![http(4.0)]),
            (GraphFigure::HttpDenied, vec![http(1.0)]),
            (
                GraphFigure::TcpOpened,
                vec![
                    tcp(("back", "waypoint"), ("back", "api"), 2.0),
                    tcp(("front", "legacy"), ("back", "db"), 1.0),
                ],
            ),
            (
                GraphFigure::TcpMtls,
                vec![tcp(("back", "waypoint"), ("back", "api"), 2.0)],
            ),
            (
                GraphFigure::TcpDenied,
                vec![tcp(("back", "waypoint"), ("back", "api"), 0.5)],
            ),
        ]);
        let g = build(&results);
        assert_eq!(g.edges.len(), 4, "no edge added: {:?}", g.edges);
        let edge = |from: &str, to: &str| {
            g.edges
                .iter()
                .find(|e| e.from == from && e.to == to)
                .unwrap_or_else(|| panic!("no edge {from} → {to}: {:?}", g.edges))
        };
        let e = edge("workload:front/client", "service:back/api");
        assert_eq!((e.rate, e.denied, e.errors), (4.0, 1.0, Some(0.0)));
        // The waypoint's connections: its own node, not a workload, keeps the denials.
        let e = edge("waypoint:back/waypoint", "workload:back/api");
        assert_eq!((e.rate, e.denied, e.mtls), (2.0, 0.5, Some(1.0)));
        assert_eq!(
            edge("workload:front/legacy", "workload:back/db").denied,
            0.0
        );
        assert_eq!(
            edge("service:back/api", "waypoint:back/waypoint").denied,
            0.0
        );
    }

    #[test]
    fn denial_queries_count_policy_refusals_grouped_like_the_traffic() {
        let w = Window::parse("1m").unwrap();
        assert_eq!(
            graph_query(GraphFigure::TcpDenied, &w),
            format!(
                "sum by ({TCP_BY}) (rate(istio_tcp_connections_failed_total{{reporter=\"destination\",response_flags=\"DENY\"}}[1m]))"
            )
        );
        assert_eq!(
            graph_query(GraphFigure::HttpDenied, &w),
            format!(
                "sum by ({HTTP_BY}) (rate(istio_requests_total{{reporter=\"waypoint\",response_code=\"403\"}}[1m]))"
            )
        );
        assert!(GraphFigure::ALL.contains(&GraphFigure::TcpDenied));
        assert!(GraphFigure::ALL.contains(&GraphFigure::HttpDenied));
    }

    #[test]
    fn graph_queries_group_http_by_waypoint_and_tcp_by_workloads() {
        let w = Window::parse("1m").unwrap();
        assert!(graph_query(GraphFigure::HttpRps, &w).contains("namespace, pod)"));
        assert!(
            graph_query(GraphFigure::TcpMtls, &w)
                .contains("connection_security_policy=\"mutual_tls\"")
        );
    }
}
