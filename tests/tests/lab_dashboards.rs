//! The chart's Grafana dashboards (deploy/charts/ambient-mesh/dashboards) against what the
//! mesh really emits: after traffic through a waypoint and ztunnels, every metric any
//! panel or template variable queries has a series in the lab's Prometheus, and every
//! query, its template variables filled in, is one Prometheus accepts.

use mesh_e2e::manifests::*;
use mesh_e2e::testlab::TestLab;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

/// PromQL's aggregation operators, keywords and binary operators spelt as words: never
/// metric names, though (unlike functions) they may stand without a `(` right after.
const KEYWORDS: &[&str] = &[
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "atan2",
    "bool",
    "offset",
    "start",
    "end",
    "inf",
    "nan",
];

/// Keywords followed by a list of label names, not expressions.
const LABEL_LISTS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

fn is_ident_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_' || c == ':'
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// The metric names a PromQL expression reads: identifiers standing as selectors (bare,
/// or followed by `{` or `[`), not functions (followed by `(`), keywords, label names
/// (inside `{...}` or a `by (...)`-style list), strings, numbers, durations or Grafana
/// template variables (`$name`, `${name}`).
fn metric_names(expr: &str) -> BTreeSet<String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    // Skips past the closing `close`, stepping over quoted strings.
    let skip_to = |mut i: usize, close: char| -> usize {
        while i < chars.len() && chars[i] != close {
            if matches!(chars[i], '"' | '\'' | '`') {
                i = skip_string(&chars, i);
            } else {
                i += 1;
            }
        }
        i + 1
    };
    while i < chars.len() {
        let c = chars[i];
        match c {
            '"' | '\'' | '`' => i = skip_string(&chars, i),
            '{' => i = skip_to(i + 1, '}'),
            '[' => i = skip_to(i + 1, ']'),
            '$' => {
                i += 1;
                if chars.get(i) == Some(&'{') {
                    i = skip_to(i + 1, '}');
                } else {
                    while i < chars.len() && is_ident(chars[i]) {
                        i += 1;
                    }
                }
            }
            c if c.is_ascii_digit() || c == '.' => {
                // A number or a duration (5m, 1h30m, 1e3, 0x1f).
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                    i += 1;
                }
            }
            c if is_ident_start(c) => {
                let start = i;
                while i < chars.len() && is_ident(chars[i]) {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                let mut next = i;
                while next < chars.len() && chars[next].is_whitespace() {
                    next += 1;
                }
                let lower = word.to_ascii_lowercase();
                if LABEL_LISTS.contains(&lower.as_str()) && chars.get(next) == Some(&'(') {
                    i = skip_to(next + 1, ')');
                } else if chars.get(next) == Some(&'(') || KEYWORDS.contains(&lower.as_str()) {
                    // A function call or a keyword.
                } else {
                    names.insert(word);
                }
            }
            _ => i += 1,
        }
    }
    names
}

/// The index just past the string literal opening at `i`.
fn skip_string(chars: &[char], i: usize) -> usize {
    let quote = chars[i];
    let mut j = i + 1;
    while j < chars.len() && chars[j] != quote {
        if chars[j] == '\\' && quote != '`' {
            j += 1;
        }
        j += 1;
    }
    j + 1
}

/// `expr` with Grafana's template variables (`$name`, `${name}`, `${name:format}`)
/// replaced by `values`; unknown ones are left as they are (Prometheus then rejects the
/// query, which is what a dashboard using a variable it does not define deserves).
fn substitute(expr: &str, values: &BTreeMap<&str, &str>) -> String {
    let mut out = String::new();
    let mut rest = expr;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        let (name, len) = if let Some(braced) = after.strip_prefix('{') {
            match braced.find('}') {
                Some(end) => (braced[..end].split(':').next().unwrap_or(""), end + 2),
                None => ("", 0),
            }
        } else {
            let end = after.find(|c: char| !is_ident(c)).unwrap_or(after.len());
            (&after[..end], end)
        };
        match values.get(name) {
            Some(v) if len > 0 => out.push_str(v),
            _ => out.push_str(&rest[at..at + 1 + len]),
        }
        rest = &rest[at + 1 + len..];
    }
    out.push_str(rest);
    out
}

/// A Grafana Prometheus variable query (`label_values(selector, label)`,
/// `label_values(label)`, `metrics(regex)`, `query_result(expr)`) as the PromQL that
/// reads the same series; `None` for other kinds.
fn variable_promql(query: &str) -> Option<String> {
    let q = query.trim();
    if let Some(args) = q
        .strip_prefix("label_values(")
        .and_then(|a| a.strip_suffix(')'))
    {
        // The label is the last argument; the selector (if any) may contain commas.
        return Some(match args.rsplit_once(',') {
            Some((selector, label)) => format!("count by ({}) ({})", label.trim(), selector.trim()),
            None => format!("count by ({0}) ({{{0}!=\"\"}})", args.trim()),
        });
    }
    q.strip_prefix("query_result(")
        .and_then(|a| a.strip_suffix(')'))
        .map(str::to_string)
}

/// Every query of a dashboard: (where it is, the expression). Panels nest in rows;
/// template variables of type `query` count too.
fn dashboard_queries(dashboard: &Value) -> Vec<(String, String)> {
    fn panels(list: &Value, out: &mut Vec<(String, String)>) {
        for p in list.as_array().into_iter().flatten() {
            let title = p["title"].as_str().unwrap_or("untitled");
            for t in p["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = t["expr"].as_str() {
                    out.push((format!("panel {title:?}"), expr.to_string()));
                }
            }
            panels(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    panels(&dashboard["panels"], &mut out);
    for v in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if v["type"] != "query" {
            continue;
        }
        let q = v["query"]["query"].as_str().or(v["query"].as_str());
        let name = v["name"].as_str().unwrap_or_default();
        match q.and_then(variable_promql) {
            Some(expr) => out.push((format!("variable {name:?}"), expr)),
            None => out.push((format!("variable {name:?}"), format!("unparsed: {q:?}"))),
        }
    }
    out
}

/// The names of a dashboard's template variables.
fn defined_variables(dashboard: &Value) -> BTreeSet<String> {
    dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v["name"].as_str().map(str::to_string))
        .collect()
}

/// Of `values`, those a dashboard may use: Grafana's own (`__...`) and its variables.
fn for_dashboard<'a>(
    values: &BTreeMap<&'a str, &'a str>,
    defined: &BTreeSet<String>,
) -> BTreeMap<&'a str, &'a str> {
    values
        .iter()
        .filter(|(k, _)| k.starts_with("__") || defined.contains(**k))
        .map(|(k, v)| (*k, *v))
        .collect()
}

fn dashboards_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/charts/ambient-mesh/dashboards")
}

/// Each dashboard file's name and parsed JSON.
fn dashboards() -> Vec<(String, Value)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dashboards_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            let json = serde_json::from_slice(&std::fs::read(&p).unwrap())
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            (name, json)
        })
        .collect()
}

/// back/api's Service: HTTP on port 80, TCP echo on 9000.
const API_SERVICE: &str = "apiVersion: v1
kind: Service
metadata: {name: api, namespace: back}
spec:
  selector: {app: api}
  clusterIP: 10.96.0.20
  ports: [{name: http, port: 80, targetPort: http}, {name: tcp-legacy, port: 9000, targetPort: 9000}]
";

#[test]
fn every_metric_the_dashboards_query_is_emitted_and_every_query_is_valid() {
    let boards = dashboards();
    assert_eq!(boards.len(), 3, "overview, workload, components");
    let mut t = TestLab::up_named("graf", 2, &["curl", "prometheus"]);
    t.lab.start_prometheus().unwrap();
    t.apply(&join(&[
        FRONT_AMBIENT,
        FRONT_CLIENT,
        BACK_API_POD_WITH_TCP_ECHO,
        API_SERVICE,
        WAYPOINT_GATEWAY,
        BACK_USES_WAYPOINT,
    ]));
    t.eventually("requests through the waypoint", || {
        t.curl("front/client", "http://10.96.0.20/warmup").is_ok()
            && t.log("pod:back/waypoint").contains("backend=back/api")
    });
    // HTTP through the waypoint (successes and failures) and TCP through both ztunnels.
    for _ in 0..5 {
        t.curl("front/client", "http://10.96.0.20/ok").unwrap();
        assert_eq!(
            t.status("front/client", "http://10.96.0.20/status/503"),
            "503"
        );
    }
    for i in 0..5 {
        let m = format!("echo-{i}");
        assert_eq!(t.tcp("front/client", "10.96.0.20:9000", &m).unwrap(), m);
    }
    t.eventually("the traffic's series in Prometheus", || {
        [
            "istio_requests_total{reporter=\"waypoint\",response_code=\"503\"}",
            "istio_tcp_connections_closed_total{reporter=\"destination\",destination_workload=\"api\"}",
            "istio_tcp_connections_closed_total{reporter=\"source\",source_workload=\"client\"}",
        ]
        .iter()
        .all(|q| !t.promql(q).is_empty())
    });

    let metric_names_in_prometheus = || -> BTreeSet<String> {
        t.prometheus("label/__name__/values", &[])["data"]
            .as_array()
            .expect("metric names from Prometheus")
            .iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect()
    };
    // Every target's first scrape (mesh-control's, the node agents') lands too.
    // The resource panels' metrics come from every component: ztunnel, waypoint, node
    // agent and mesh-control each export them.
    t.eventually("process metrics from every kind of component", || {
        let jobs: BTreeSet<String> = t
            .promql("count by (job) (process_resident_memory_bytes > 0 and process_cpu_seconds_total > 0)")
            .iter()
            .filter_map(|(m, _)| m["job"].as_str().map(str::to_string))
            .collect();
        ["ztunnel", "waypoint", "mesh-cni", "mesh-control"]
            .iter()
            .all(|j| jobs.contains(*j))
    });
    let all_queried: BTreeSet<String> = boards
        .iter()
        .flat_map(|(_, b)| dashboard_queries(b))
        .flat_map(|(_, e)| metric_names(&e))
        .collect();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut emitted = metric_names_in_prometheus();
    while !all_queried.is_subset(&emitted) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_secs(1));
        emitted = metric_names_in_prometheus();
    }
    // Grafana's own variables, and the dashboards' for the workload that receives the
    // traffic (back/api) and the one that sends it (front/client).
    let builtin = [
        ("__rate_interval", "1m"),
        ("__interval", "1m"),
        ("__range", "1h"),
    ];
    let receiver = [("namespace", "back"), ("workload", "api")];
    let sender = [("namespace", "front"), ("workload", "client")];
    let values: BTreeMap<&str, &str> = builtin.iter().chain(&receiver).copied().collect();
    let mut missing = Vec::new();
    let mut rejected = Vec::new();
    let mut queried = BTreeSet::new();
    let mut undefined = Vec::new();
    for (file, board) in &boards {
        // Only the variables this dashboard defines, and Grafana's own (`$__...`).
        let defined = defined_variables(board);
        let values = for_dashboard(&values, &defined);
        let queries = dashboard_queries(board);
        assert!(!queries.is_empty(), "{file} has no queries");
        for (place, expr) in queries {
            let names = metric_names(&expr);
            assert!(!names.is_empty(), "{file} {place}: no metric in {expr}");
            for name in names {
                if !emitted.contains(&name) {
                    missing.push(format!("{file} {place}: {name}"));
                }
                queried.insert(name);
            }
            let query = substitute(&expr, &values);
            if query.contains('$') {
                undefined.push(format!("{file} {place}: {query}"));
            }
            let answer = t.prometheus("query", &[("query", &query)]);
            if answer["status"] != "success" {
                rejected.push(format!("{file} {place}: {query}\n  {}", answer["error"]));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "metrics the dashboards query that have no series after traffic:\n{}\n(emitted: {emitted:?})",
        missing.join("\n")
    );
    assert!(
        undefined.is_empty(),
        "queries using variables their dashboard does not define:\n{}",
        undefined.join("\n")
    );
    assert!(
        rejected.is_empty(),
        "queries Prometheus rejects:\n{}",
        rejected.join("\n")
    );
    // Every panel and variable shows data, for the receiver or the sender: a label
    // misspelt in a selector leaves a valid query that matches nothing. Rates need two
    // scrapes of the traffic.
    let subjects: Vec<BTreeMap<&str, &str>> = [receiver, sender]
        .iter()
        .map(|s| builtin.iter().chain(s).copied().collect())
        .collect();
    let without_data = || -> Vec<String> {
        let mut out = Vec::new();
        for (file, board) in &boards {
            let defined = defined_variables(board);
            let mut places: BTreeMap<String, Vec<String>> = BTreeMap::new();
            for (place, expr) in dashboard_queries(board) {
                places.entry(place).or_default().push(expr);
            }
            for (place, exprs) in places {
                let shows = subjects.iter().any(|subject| {
                    let values = for_dashboard(subject, &defined);
                    exprs
                        .iter()
                        .any(|e| !t.promql(&substitute(e, &values)).is_empty())
                });
                if !shows {
                    out.push(format!("{file} {place}: {exprs:?}"));
                }
            }
        }
        out
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut empty = without_data();
    while !empty.is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_secs(1));
        empty = without_data();
    }
    assert!(
        empty.is_empty(),
        "panels and variables with no data after traffic:\n{}",
        empty.join("\n")
    );

    // The variables offer the lab's namespace and workload (not "unknown" alone).
    for (file, board) in &boards {
        let values = for_dashboard(&values, &defined_variables(board));
        for (place, expr) in dashboard_queries(board) {
            let want = match place.as_str() {
                "variable \"namespace\"" => "back",
                "variable \"workload\"" => "api",
                _ => continue,
            };
            let offered: Vec<String> = t
                .promql(&substitute(&expr, &values))
                .iter()
                .filter_map(|(m, _)| {
                    m.as_object()
                        .and_then(|o| o.values().next())
                        .and_then(|v| v.as_str())
                        .map(str::to_string)
                })
                .collect();
            assert!(
                offered.iter().any(|o| o == want),
                "{file} {place}: {offered:?}"
            );
        }
    }
    // The dashboards cover each component's own metrics, not only the traffic's.
    for name in [
        "istio_requests_total",
        "istio_request_duration_milliseconds_bucket",
        "istio_tcp_connections_opened_total",
        "istio_tcp_sockets_open",
        "istio_xds_message_total",
        "ztunnel_certificate_identities",
        "pilot_xds",
    ] {
        assert!(queried.contains(name), "no panel queries {name}");
    }
}

#[test]
fn metric_names_are_the_selectors_not_functions_labels_or_keywords() {
    let names = |e: &str| metric_names(e).into_iter().collect::<Vec<_>>();
    assert_eq!(
        names(
            "histogram_quantile(0.99, sum by (destination_service, le) (rate(istio_request_duration_milliseconds_bucket{reporter=\"waypoint\",x=~\"$namespace\"}[$__rate_interval])))"
        ),
        ["istio_request_duration_milliseconds_bucket"]
    );
    assert_eq!(
        names(
            "sum(rate(a_total{code!~\"5..\"}[5m])) / ignoring(code) group_left(job) sum without (code) (rate(b_total[1h30m] offset 5m))"
        ),
        ["a_total", "b_total"]
    );
    // Bare selectors, binary keywords, numbers, recording-rule colons.
    assert_eq!(
        names("up == 1 and on(instance) job:requests:rate5m > bool 0.5 unless max(pilot_xds)"),
        ["job:requests:rate5m", "pilot_xds", "up"]
    );
    // Strings that look like metrics or contain braces are not read.
    assert_eq!(
        names("label_replace(m{a=\"}x{\"}, \"dst\", \"not_a_metric\", \"src\", \"(.*)\")"),
        ["m"]
    );
    // Template variables (both spellings) are not metrics; keywords in any case are not.
    assert_eq!(names("SUM BY (x) (n[${__range}]) * $scale"), ["n"]);
    assert!(names("vector(1) + time()").is_empty());
}

#[test]
fn template_variables_are_substituted_and_unknown_ones_kept() {
    let values: BTreeMap<&str, &str> = [("namespace", "back"), ("__rate_interval", "1m")].into();
    assert_eq!(
        substitute(
            "rate(m{ns=~\"$namespace\",x=\"${namespace:regex}\"}[$__rate_interval]) $other ${nope}",
            &values
        ),
        "rate(m{ns=~\"back\",x=\"back\"}[1m]) $other ${nope}"
    );
    assert_eq!(substitute("cost in $", &values), "cost in $");
}

#[test]
fn variable_queries_become_promql() {
    assert_eq!(
        variable_promql("label_values(m{a=\"x\",b=~\"$ns\"}, destination_workload)").as_deref(),
        Some("count by (destination_workload) (m{a=\"x\",b=~\"$ns\"})")
    );
    assert_eq!(
        variable_promql("label_values(job)").as_deref(),
        Some("count by (job) ({job!=\"\"})")
    );
    assert_eq!(
        variable_promql("query_result(topk(5, m))").as_deref(),
        Some("topk(5, m)")
    );
    assert_eq!(variable_promql("metrics(istio_.*)"), None);
}

#[test]
fn dashboards_are_found_in_rows_and_variables() {
    let board = serde_json::json!({
        "panels": [
            {"type": "row", "title": "r", "panels": [
                {"title": "inner", "targets": [{"expr": "a"}]}
            ]},
            {"title": "outer", "targets": [{"expr": "b"}, {"refId": "no expr"}]}
        ],
        "templating": {"list": [
            {"name": "datasource", "type": "datasource", "query": "prometheus"},
            {"name": "ns", "type": "query", "query": {"query": "label_values(c, ns)"}},
            {"name": "old", "type": "query", "query": "label_values(d, x)"}
        ]}
    });
    assert_eq!(
        defined_variables(&board).into_iter().collect::<Vec<_>>(),
        ["datasource", "ns", "old"]
    );
    assert_eq!(
        dashboard_queries(&board),
        [
            ("panel \"inner\"".to_string(), "a".to_string()),
            ("panel \"outer\"".into(), "b".into()),
            ("variable \"ns\"".into(), "count by (ns) (c)".into()),
            ("variable \"old\"".into(), "count by (x) (d)".into()),
        ]
    );
    // The chart's own dashboards parse and each has queries.
    for (file, board) in dashboards() {
        assert!(!dashboard_queries(&board).is_empty(), "{file}");
    }
}
