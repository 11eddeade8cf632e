//! `meshctl dashboard`: a small web page (inline JS and SVG, nothing fetched from
//! elsewhere) drawing the service graph, refreshed from Prometheus; a node's details
//! add its golden metrics and what mesh-control's debug API says about it. With a trace
//! receiver (`--otlp-listen`), it also lists recent traces and shows one request's
//! journey as a timeline. Served on loopback, one thread per connection.

use super::client::{Endpoint, get_json, query};
use super::graph::{Graph, GraphFigure, build, graph_query, parse_id};
use super::promql::{Figure, Scope, Window, stat_query};
use super::table::{Sample, parse_vector, stat_rows};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

const PAGE: &str = include_str!("dashboard.html");

#[derive(Clone)]
pub struct Dashboard {
    pub prometheus: Endpoint,
    /// mesh-control's debug API, `host:port`.
    pub control: String,
    pub window: Window,
    /// Traces received over OTLP (`None`: no receiver runs).
    pub traces: Option<super::otlp::Shared>,
}

/// What a request asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    Page,
    Graph,
    Node(String),
    Traces,
    Trace(String),
    NotFound,
}

/// The route of a request target (`/path?query`).
pub fn route(target: &str) -> Route {
    let (path, q) = target.split_once('?').unwrap_or((target, ""));
    match path {
        "/" | "/index.html" => Route::Page,
        "/api/graph" => Route::Graph,
        "/api/traces" => Route::Traces,
        p if p.starts_with("/api/traces/") => Route::Trace(p["/api/traces/".len()..].into()),
        "/api/node" => q
            .split('&')
            .find_map(|kv| kv.strip_prefix("id="))
            .map(|v| Route::Node(crate::debug::percent_decode(v)))
            .unwrap_or(Route::NotFound),
        _ => Route::NotFound,
    }
}

/// Whether a request's `Host` header names this loopback server (`port` is the one it
/// listens on). Anything else is refused: a DNS-rebinding page (evil.example resolving
/// to 127.0.0.1) would otherwise read the graph and node details from the browser.
pub fn host_allowed(host: Option<&str>, port: u16) -> bool {
    let Some(host) = host else { return false };
    let Some((name, p)) = host.trim().rsplit_once(':') else {
        return false;
    };
    p.parse::<u16>() == Ok(port)
        && matches!(
            name.to_ascii_lowercase().as_str(),
            "127.0.0.1" | "localhost" | "[::1]"
        )
}

/// The page with `graph` inlined, so it draws without waiting for a request.
pub fn page(graph: &Graph) -> String {
    page_with(graph, None)
}

/// [`page`], noting why the graph is empty (Prometheus cannot be read): the traces
/// still show.
pub fn page_with(graph: &Graph, error: Option<&str>) -> String {
    // Inside <script>: "</" must not end the element.
    let json = serde_json::to_string(graph)
        .unwrap_or_else(|_| "{}".into())
        .replace("</", "<\\/");
    let error = serde_json::to_string(&error)
        .unwrap_or_else(|_| "null".into())
        .replace("</", "<\\/");
    // Split, not replaced: a value holding a placeholder's name stays as it is.
    let (head, rest) = PAGE
        .split_once("__INITIAL_GRAPH__")
        .expect("the page has the graph placeholder");
    let (middle, tail) = rest
        .split_once("__GRAPH_ERROR__")
        .expect("the page has the error placeholder after the graph's");
    format!("{head}{json}{middle}{error}{tail}")
}

/// What mesh-control's `/debug/status` says about a node of the graph: where its pods
/// are enrolled, a waypoint's xDS connection, policy findings in its namespace.
pub fn node_config(status: &Value, kind: &str, ns: &str, name: &str) -> Value {
    let mut enrolled = Vec::new();
    for (node, pods) in status["enrolled"].as_object().into_iter().flatten() {
        for p in pods
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
        {
            let Some((pns, pname)) = p.split_once('/') else {
                continue;
            };
            // A workload's pods are named after it (deployment pods carry a suffix).
            if pns == ns && (pname == name || pname.starts_with(&format!("{name}-"))) {
                enrolled.push(json!({"pod": p, "node": node}));
            }
        }
    }
    let principal = format!("waypoint/{ns}/{name}");
    let xds: Vec<Value> = status["clients"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| kind == "waypoint" && c["principal"] == principal.as_str())
        .cloned()
        .collect();
    let findings: Vec<Value> = status["policyFindings"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|f| {
            f["object"]
                .as_str()
                .is_some_and(|o| o.contains(&format!("{ns}/")))
        })
        .cloned()
        .collect();
    let mut v = json!({
        "configurationVersion": status["version"],
        "ready": status["ready"],
        "policyFindingsInNamespace": findings,
    });
    if kind != "service" {
        v["enrolledPods"] = json!(enrolled);
    }
    if kind == "waypoint" {
        v["xdsConnections"] = json!(xds);
    }
    v
}

impl Dashboard {
    fn run_all<K: Ord + Copy>(
        &self,
        qs: Vec<(K, String)>,
    ) -> Result<BTreeMap<K, Vec<Sample>>, String> {
        let mut out = BTreeMap::new();
        for (k, q) in qs {
            out.insert(k, parse_vector(&query(&self.prometheus, &q)?)?);
        }
        Ok(out)
    }

    pub fn graph(&self) -> Result<Graph, String> {
        let qs = GraphFigure::ALL
            .iter()
            .map(|f| (*f, graph_query(*f, &self.window)))
            .collect();
        Ok(build(&self.run_all(qs)?))
    }

    pub fn node(&self, id: &str) -> Result<Value, String> {
        let (kind, ns, name) = parse_id(id).ok_or_else(|| format!("no such node id {id:?}"))?;
        let scope = if kind == "service" {
            Scope::Service
        } else {
            Scope::Workload
        };
        let qs = Figure::ALL
            .iter()
            .map(|f| (*f, stat_query(*f, scope, &self.window, Some(ns))))
            .collect();
        let rows = stat_rows(scope, &self.run_all(qs)?);
        let metrics = rows.into_iter().find(|r| r.name == name);
        let status = get_json(&self.control, "/debug/status", "mesh-control", "--control")?;
        Ok(json!({
            "id": id,
            "window": self.window.to_string(),
            "metrics": metrics,
            "config": node_config(&status, kind, ns, name),
        }))
    }

    fn respond(&self, target: &str) -> (u16, &'static str, String) {
        let json_of = |r: Result<Value, String>| match r {
            Ok(v) => (200, "application/json", v.to_string()),
            Err(e) => (502, "application/json", json!({"error": e}).to_string()),
        };
        match route(target) {
            Route::Page => {
                let (g, e) = match self.graph() {
                    Ok(g) => (g, None),
                    Err(e) => (Graph::default(), Some(e)),
                };
                (200, "text/html; charset=utf-8", page_with(&g, e.as_deref()))
            }
            Route::Graph => json_of(
                self.graph()
                    .and_then(|g| serde_json::to_value(g).map_err(|e| e.to_string())),
            ),
            Route::Node(id) => json_of(self.node(&id)),
            Route::Traces => match &self.traces {
                Some(t) => json_of(Ok(t.lock().unwrap_or_else(|e| e.into_inner()).list())),
                None => json_of(Ok(json!({"receiving": false, "traces": []}))),
            },
            Route::Trace(id) => match self
                .traces
                .as_ref()
                .and_then(|t| t.lock().unwrap_or_else(|e| e.into_inner()).trace(&id))
            {
                Some(v) => json_of(Ok(v)),
                None => (
                    404,
                    "application/json",
                    json!({"error": "no such trace (evicted, or never received)"}).to_string(),
                ),
            },
            Route::NotFound => (
                404,
                "application/json",
                json!({"error": "unknown path", "paths": ["/", "/api/graph", "/api/node?id=", "/api/traces", "/api/traces/<trace id>"]})
                    .to_string(),
            ),
        }
    }

    fn handle(&self, s: TcpStream, port: u16) {
        s.set_read_timeout(Some(Duration::from_secs(10))).ok();
        let mut r = BufReader::new(&s);
        let mut line = String::new();
        if r.read_line(&mut line).is_err() {
            return;
        }
        // Only Host is needed (one, or the request is refused).
        let mut hosts = vec![];
        let mut h = String::new();
        while r.read_line(&mut h).is_ok_and(|n| n > 2) {
            if let Some((k, v)) = h.split_once(':')
                && k.trim().eq_ignore_ascii_case("host")
            {
                hosts.push(v.trim().to_string());
            }
            h.clear();
        }
        let host = match hosts.as_slice() {
            [one] => Some(one.as_str()),
            _ => None,
        };
        let target = line.split_whitespace().nth(1).unwrap_or("/");
        let (code, ctype, body) = if !host_allowed(host, port) {
            (
                403,
                "text/plain",
                format!(
                    "open the dashboard as http://127.0.0.1:{port}/ or http://localhost:{port}/\n"
                ),
            )
        } else if line.starts_with("GET ") {
            self.respond(target)
        } else {
            (405, "text/plain", "GET only\n".into())
        };
        let mut s = &s;
        let _ = write!(
            s,
            "HTTP/1.1 {code} {}\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\ncache-control: no-store\r\nconnection: close\r\n\r\n{body}",
            if code == 200 { "OK" } else { "Error" },
            body.len()
        );
    }

    /// Serves until the process ends.
    pub fn serve(self, listener: TcpListener) {
        let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
        for s in listener.incoming().flatten() {
            let d = self.clone();
            std::thread::spawn(move || d.handle(s, port));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(route("/"), Route::Page);
        assert_eq!(route("/api/graph?x=1"), Route::Graph);
        assert_eq!(
            route("/api/node?id=service%3Aback%2Fapi"),
            Route::Node("service:back/api".into())
        );
        assert_eq!(route("/api/node"), Route::NotFound);
        assert_eq!(route("/api/traces"), Route::Traces);
        assert_eq!(route("/api/traces/ab12"), Route::Trace("ab12".into()));
        assert_eq!(route("/etc/passwd"), Route::NotFound);
    }

    #[test]
    fn only_loopback_host_names_with_our_port_are_served() {
        for ok in [
            "127.0.0.1:8080",
            "localhost:8080",
            "LocalHost:8080",
            "[::1]:8080",
        ] {
            assert!(host_allowed(Some(ok), 8080), "{ok}");
        }
        for bad in [
            "evil.example:8080",
            "127.0.0.1:8081",
            "127.0.0.1",
            "localhost",
            "localhost.evil.example:8080",
            "127.0.0.2:8080",
            "[::1]",
            "",
        ] {
            assert!(!host_allowed(Some(bad), 8080), "{bad}");
        }
        assert!(!host_allowed(None, 8080));
    }

    /// The served answer over a real socket: a rebound name gets 403 before anything is
    /// asked of Prometheus; the loopback name is served (an unknown path: 404).
    #[test]
    fn a_foreign_host_is_refused_over_the_socket() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let d = Dashboard {
            // Nothing listens there: a request that reached it would fail with 502.
            prometheus: Endpoint::parse("http://127.0.0.1:1").unwrap(),
            control: "127.0.0.1:1".into(),
            window: Window::parse("5m").unwrap(),
            traces: None,
        };
        std::thread::spawn(move || d.serve(l));
        let ask = |host: &str, path: &str| {
            let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
            write!(s, "GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n").unwrap();
            let mut out = String::new();
            std::io::Read::read_to_string(&mut s, &mut out).unwrap();
            out.split_whitespace()
                .nth(1)
                .unwrap_or_default()
                .to_string()
        };
        assert_eq!(ask(&format!("evil.example:{port}"), "/api/graph"), "403");
        assert_eq!(ask(&format!("evil.example:{port}"), "/nope"), "403");
        assert_eq!(ask(&format!("localhost:{port}"), "/nope"), "404");
        assert_eq!(ask(&format!("127.0.0.1:{port}"), "/api/graph"), "502");
        // Without Prometheus the page still loads (the traces do not need it).
        assert_eq!(ask(&format!("127.0.0.1:{port}"), "/"), "200");
        assert_eq!(ask(&format!("evil.example:{port}"), "/api/traces"), "403");
        assert_eq!(ask(&format!("127.0.0.1:{port}"), "/api/traces"), "200");
        assert_eq!(ask(&format!("127.0.0.1:{port}"), "/api/traces/00"), "404");
    }

    /// Label values reach the page from any scraped target: it builds text with
    /// textContent / text nodes only, never by parsing markup.
    #[test]
    fn the_page_never_parses_data_as_markup() {
        for sink in [
            "innerHTML",
            "outerHTML",
            "insertAdjacentHTML",
            "document.write",
            "DOMParser",
            "createContextualFragment",
        ] {
            assert!(!PAGE.contains(sink), "{sink} in dashboard.html");
        }
    }

    #[test]
    fn the_page_inlines_the_graph_safely_and_fetches_nothing_elsewhere() {
        let g = Graph {
            namespaces: vec!["</script><b>".into()],
            ..Default::default()
        };
        let p = page(&g);
        assert!(!p.contains("__INITIAL_GRAPH__"));
        assert!(
            p.contains("<\\/script><b>"),
            "inline JSON cannot close the script"
        );
        assert_eq!(p.matches("</script>").count(), 3);
        assert!(!p.contains("__GRAPH_ERROR__"));
        let g = Graph {
            namespaces: vec!["__GRAPH_ERROR__".into()],
            ..Default::default()
        };
        let p = page_with(&g, Some("</script>down __INITIAL_GRAPH__"));
        assert!(
            p.contains("[\"__GRAPH_ERROR__\"]"),
            "values are not placeholders"
        );
        assert!(
            p.contains("\"<\\/script>down __INITIAL_GRAPH__\""),
            "the error inlined as a JSON string"
        );
        assert_eq!(p.matches("</script>").count(), 3);
        assert!(
            !p.contains("src=") && !p.contains("href="),
            "nothing loaded from elsewhere"
        );
        assert!(!p.contains("https://"));
    }

    #[test]
    fn node_config_picks_what_concerns_the_node() {
        let status = json!({
            "ready": true, "version": 7,
            "enrolled": {"node-1": ["front/client"], "node-2": ["back/api", "back/api-7f9c", "back/apiary"]},
            "clients": [{"principal": "waypoint/back/waypoint", "types": ["x"]}, {"principal": "node/node-1"}],
            "policyFindings": [{"object": "AuthorizationPolicy back/p", "message": "m"}, {"object": "AuthorizationPolicy other/q"}]
        });
        let c = node_config(&status, "workload", "back", "api");
        assert_eq!(
            c["enrolledPods"],
            json!([{"pod": "back/api", "node": "node-2"}, {"pod": "back/api-7f9c", "node": "node-2"}])
        );
        assert_eq!(c["policyFindingsInNamespace"].as_array().unwrap().len(), 1);
        assert_eq!(c["configurationVersion"], 7);
        assert!(c.get("xdsConnections").is_none());
        let w = node_config(&status, "waypoint", "back", "waypoint");
        assert_eq!(
            w["xdsConnections"][0]["principal"],
            "waypoint/back/waypoint"
        );
        let s = node_config(&status, "service", "back", "api");
        assert!(s.get("enrolledPods").is_none());
    }
}
