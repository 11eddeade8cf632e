//! Observability in the lab: Prometheus (Debian's package) started by the lab scrapes
//! every ztunnel, node agent, waypoint and mesh-control through file-based discovery the
//! lab keeps current, and the mesh's Istio-named metrics arrive with the traffic sent.

use mesh_e2e::observe::{app_behind_waypoint, chromium, screenshot_path};
use mesh_e2e::testlab::TestLab;
use serde_json::Value;
use std::collections::BTreeMap;

/// Active targets per job, and whether each is healthy.
fn targets(t: &TestLab) -> BTreeMap<String, Vec<(String, String)>> {
    let v = t.prometheus("targets", &[("state", "active")]);
    let mut out: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    for tg in v["data"]["activeTargets"].as_array().into_iter().flatten() {
        let job = tg["labels"]["job"].as_str().unwrap_or_default().to_string();
        let addr = tg["labels"]["instance"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let health = tg["health"].as_str().unwrap_or_default().to_string();
        out.entry(job).or_default().push((addr, health));
    }
    out
}

fn sum_by_job(t: &TestLab, metric: &str) -> BTreeMap<String, f64> {
    t.promql(&format!("sum by (job) ({metric})"))
        .into_iter()
        .map(|(m, v)| (m["job"].as_str().unwrap_or_default().to_string(), v))
        .collect()
}

#[test]
fn prometheus_scrapes_every_component_and_follows_the_lab() {
    let mut t = TestLab::up_named("obs", 2, &["curl", "prometheus"]);
    t.lab.start_prometheus().unwrap();
    app_behind_waypoint(&mut t);
    for _ in 0..10 {
        t.curl("front/client", "http://10.96.0.20/ok").unwrap();
    }
    for i in 0..10 {
        let m = format!("echo-{i}");
        assert_eq!(t.tcp("front/client", "10.96.0.20:9000", &m).unwrap(), m);
    }

    // Every component is a target, and every target is up.
    let want: BTreeMap<&str, usize> = [
        ("ztunnel", 2),
        ("mesh-cni", 2),
        ("mesh-control", 1),
        ("waypoint", 1),
    ]
    .into();
    t.eventually("every target scraped and up", || {
        let got = targets(&t);
        want.iter().all(|(job, n)| {
            got.get(*job)
                .is_some_and(|v| v.len() == *n && v.iter().all(|(_, h)| h == "up"))
        })
    });
    let up: Vec<(Value, f64)> = t.promql("up");
    assert_eq!(up.len(), 6, "{up:?}");
    assert!(up.iter().all(|(_, v)| *v == 1.0), "{up:?}");

    // The mesh's metrics, from each kind of target.
    t.eventually(
        "request and TCP metrics from the waypoint and ztunnels",
        || {
            let requests = sum_by_job(&t, "istio_requests_total");
            let tcp = sum_by_job(&t, "istio_tcp_connections_opened_total");
            requests.get("waypoint").is_some_and(|n| *n >= 10.0)
                && tcp.get("ztunnel").is_some_and(|n| *n >= 10.0)
                && tcp.get("waypoint").is_some_and(|n| *n >= 10.0)
        },
    );
    // Each ztunnel reports its side: node-1's as source, node-2's as destination.
    let by_node: BTreeMap<String, f64> = t
        .promql("sum by (node, reporter) (istio_tcp_connections_opened_total{job=\"ztunnel\"})")
        .into_iter()
        .map(|(m, v)| {
            (
                format!(
                    "{}/{}",
                    m["node"].as_str().unwrap_or_default(),
                    m["reporter"].as_str().unwrap_or_default()
                ),
                v,
            )
        })
        .collect();
    assert!(
        by_node.contains_key("node-1/source") && by_node.contains_key("node-2/destination"),
        "{by_node:?}"
    );
    assert!(!t.promql("pilot_xds").is_empty(), "mesh-control's metrics");
    assert_eq!(
        t.promql("count by (job) (mesh_cni_netns_refused_total)")
            .len(),
        1,
        "the node agents' metrics"
    );

    // Components come and go: the target list follows.
    // Killed: a terminated ztunnel drains for seconds, holding its ports.
    t.lab.stop("ztunnel-2", true).unwrap();
    t.eventually("ztunnel-2 to leave the targets", || {
        targets(&t).get("ztunnel").is_some_and(|v| v.len() == 1)
    });
    t.lab.start_ztunnel(2).unwrap();
    t.eventually("ztunnel-2 to come back, up", || {
        targets(&t)
            .get("ztunnel")
            .is_some_and(|v| v.len() == 2 && v.iter().all(|(_, h)| h == "up"))
    });
    t.lab.delete_pod("back/waypoint").unwrap();
    t.eventually("the deleted waypoint to leave the targets", || {
        !targets(&t).contains_key("waypoint")
    });

    // `down` stops Prometheus (by PID) and removes its data with the lab.
    let pid = t.lab.process("prometheus").unwrap().pid;
    let data = t.lab.dir.join("prometheus/data");
    assert!(data.is_dir());
    t.lab.down().unwrap();
    // Gone, or a zombie of this test process (the lab does not reap what it spawns).
    let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    assert!(
        state.is_empty()
            || state
                .rsplit_once(") ")
                .is_some_and(|(_, r)| r.starts_with('Z')),
        "Prometheus still runs after down: {state}"
    );
    assert!(!data.exists());
}

/// The waypoint's request count for back/api, as Prometheus last scraped it.
fn api_requests(t: &TestLab) -> f64 {
    t.promql("sum(istio_requests_total{reporter=\"waypoint\",destination_service_name=\"api\"})")
        .first()
        .map(|(_, v)| *v)
        .unwrap_or(0.0)
}

/// The row of `table` whose first cells are `cells`, split into its cells.
fn row<'a>(table: &'a str, cells: &[&str]) -> Vec<&'a str> {
    table
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|c| c.starts_with(cells))
        .unwrap_or_else(|| panic!("no row {cells:?} in:\n{table}"))
}

#[test]
fn meshctl_stat_and_top_report_the_traffic_sent() {
    let mut t = TestLab::up_named("stat", 2, &["curl", "prometheus"]);
    t.lab.start_prometheus().unwrap();
    app_behind_waypoint(&mut t);
    // Both outcomes' series exist before the measured window starts, so Prometheus
    // samples them at the same instants and extrapolates both alike (their counts are
    // well above zero: it never shortens either's extrapolation towards zero): the
    // ratio of their rates is exactly the traffic's.
    t.in_pod("front/client")
        .args([
            "bash",
            "-c",
            "for i in $(seq 20); do curl -s -o /dev/null --max-time 5 http://10.96.0.20/ok; \
             curl -s -o /dev/null --max-time 5 http://10.96.0.20/status/503; done",
        ])
        .status()
        .unwrap();
    assert_eq!(
        t.tcp("front/client", "10.96.0.20:9000", "warm").unwrap(),
        "warm"
    );
    t.eventually("the 200, 503 and TCP bytes series in Prometheus", || {
        t.promql("istio_requests_total{reporter=\"waypoint\",response_code=~\"200|503\"} >= 20")
            .len()
            == 2
            && !t
                .promql("istio_tcp_received_bytes_total{reporter=\"destination\",destination_workload=\"api\"}")
                .is_empty()
    });
    // Two scrapes later, so the window below starts after both series do.
    std::thread::sleep(std::time::Duration::from_secs(5));
    let before = api_requests(&t);
    let t0 = std::time::Instant::now();
    // 30 successes and 10 failures.
    let out = t
        .in_pod("front/client")
        .args([
            "bash",
            "-c",
            "for i in $(seq 30); do curl -s -o /dev/null -w '%{http_code} ' --max-time 5 http://10.96.0.20/ok; done; \
             for i in $(seq 10); do curl -s -o /dev/null -w '%{http_code} ' --max-time 5 http://10.96.0.20/status/503; done",
        ])
        .output()
        .unwrap();
    let codes = String::from_utf8_lossy(&out.stdout);
    // And TCP connections, each its own mTLS connection to api's ztunnel.
    for i in 0..5 {
        let m = format!("echo-{i}");
        assert_eq!(t.tcp("front/client", "10.96.0.20:9000", &m).unwrap(), m);
    }
    assert_eq!(codes.matches("200").count(), 30, "{codes}");
    assert_eq!(codes.matches("503").count(), 10, "{codes}");
    t.eventually("Prometheus to have scraped all 40 requests", || {
        api_requests(&t) == before + 40.0
    });
    // The window reaches back to the last scrape before the traffic (2 s interval), and
    // is long against that interval: Prometheus extrapolates a rate to the window's
    // edges, by up to an interval at each end.
    let window = 20;
    std::thread::sleep(std::time::Duration::from_secs(window - 3).saturating_sub(t0.elapsed()));
    let w = format!("{window}s");

    let stat = t.meshctl(&[
        "stat",
        "workload",
        "-n",
        "back",
        "--window",
        &w,
        "--show-queries",
    ]);
    assert!(
        stat.contains("# sum by (destination_workload_namespace, destination_workload) (rate(istio_requests_total{reporter=\"waypoint\",destination_workload_namespace=\"back\"}"),
        "the queries are shown:\n{stat}"
    );
    let api = row(&stat, &["back", "api"]);
    // Prometheus extrapolates each series' rate to the window's edges on its own (less
    // so for a series whose count is close to zero), so ratios of rates are close, not
    // exact: allow 5 points.
    let pct = |cell: &str| -> f64 { cell.trim_end_matches('%').parse().unwrap() };
    let success = pct(api[2]);
    assert!(
        (70.0..=80.0).contains(&success),
        "30 of 40 requests succeeded (75%), {success}% shown:\n{stat}"
    );
    // Requests/s × window ≈ 40, give or take the extrapolation (at most 2 s of 20 at
    // each end): allow 25%.
    let rps: f64 = api[3].trim_end_matches("/s").parse().unwrap();
    let seen = rps * window as f64;
    assert!(
        (30.0..=50.0).contains(&seen),
        "{seen} requests, 40 sent:\n{stat}"
    );
    for p in &api[4..7] {
        assert!(p.ends_with("ms"), "latency quantiles shown:\n{stat}");
    }
    // The waypoint → api connections are mTLS (ztunnel on node-2 reports them).
    assert_ne!(api[7], "0.00/s", "TCP connections opened:\n{stat}");
    assert!(api[8].ends_with("B/s"), "TCP bytes:\n{stat}");
    assert_eq!(api[9], "100.00%", "mTLS share:\n{stat}");

    let by_service = t.meshctl(&["stat", "services", "--window", &w]);
    let success = pct(row(&by_service, &["back", "api"])[2]);
    assert!((70.0..=80.0).contains(&success), "{by_service}");

    let top = t.meshctl(&["top", "--once", "--window", &w]);
    let path = row(&top, &["front/client", "back/api", "http"]);
    let errors = pct(path[4]);
    assert!((20.0..=30.0).contains(&errors), "10 of 40 failed:\n{top}");
    let first = top.lines().nth(1).unwrap_or_default();
    assert!(
        first.starts_with("front/client") && first.contains("back/api"),
        "the client → api path is the busiest:\n{top}"
    );
}

/// `meshctl dashboard` running in node 1's namespace; killed (by its PID) when dropped.
struct DashboardProcess(std::process::Child);

impl DashboardProcess {
    /// On node 1's 127.0.0.1:15090, rates over 5 minutes.
    fn start(t: &TestLab) -> Self {
        DashboardProcess(
            std::process::Command::new("ip")
                .args(["netns", "exec", &t.lab.node_ns(1)])
                .arg(mesh_e2e::binary("meshctl"))
                .args(["dashboard", "--listen", "127.0.0.1:15090", "--window", "5m"])
                .stdout(std::process::Stdio::null())
                .spawn()
                .unwrap(),
        )
    }
}

impl Drop for DashboardProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The dashboard's `/api/graph` answer; Null when it has none.
fn dashboard_graph(t: &TestLab) -> Value {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &t.lab.node_ns(1)])
        .args([
            "curl",
            "-s",
            "--max-time",
            "10",
            "http://127.0.0.1:15090/api/graph",
        ])
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

#[test]
fn the_dashboard_draws_the_service_graph_in_chromium() {
    let mut t = TestLab::up_named("dash", 2, &["curl", "prometheus", "chromium"]);
    t.lab.start_prometheus().unwrap();
    app_behind_waypoint(&mut t);
    // A first request of each kind makes the series; Prometheus's rates count what
    // comes after a series' first sample.
    let send = |t: &TestLab, ok: usize, failed: usize, tcp: usize| {
        for _ in 0..ok {
            t.curl("front/client", "http://10.96.0.20/ok").unwrap();
        }
        for _ in 0..failed {
            assert_eq!(
                t.status("front/client", "http://10.96.0.20/status/503"),
                "503"
            );
        }
        for i in 0..tcp {
            let m = format!("echo-{i}");
            assert_eq!(t.tcp("front/client", "10.96.0.20:9000", &m).unwrap(), m);
        }
    };
    send(&t, 1, 1, 1);
    t.eventually("the first traffic in Prometheus", || {
        !t.promql("istio_requests_total{reporter=\"waypoint\",response_code=\"503\"}")
            .is_empty()
            && !t
                .promql("istio_tcp_connections_opened_total{reporter=\"destination\",destination_workload=\"api\"}")
                .is_empty()
    });
    send(&t, 20, 5, 3);
    t.eventually("all of it scraped", || {
        let count = |code: &str| {
            t.promql(&format!(
                "sum(istio_requests_total{{reporter=\"waypoint\",response_code=\"{code}\"}})"
            ))
            .first()
            .map(|(_, v)| *v)
        };
        count("503") == Some(6.0) && count("200").is_some_and(|n| n >= 21.0)
    });
    let dashboard = DashboardProcess::start(&t);
    // Rates need two scrapes of the traffic in the window, and each edge comes from its
    // own target (the client's edge from the waypoint, the waypoint's from api's
    // ztunnel), scraped at its own moment: every edge the page is checked for is waited
    // for, not just the first.
    t.eventually("the dashboard's graph with every edge of the story", || {
        let graph = dashboard_graph(&t);
        let edge = |from: &str, to: &str| {
            graph["edges"].as_array().is_some_and(|e| {
                e.iter().any(|e| {
                    e["from"] == from
                        && e["to"] == to
                        && (e["protocol"] == "via" || e["rate"].as_f64() > Some(0.0))
                })
            })
        };
        edge("workload:front/client", "service:back/api")
            && edge("service:back/api", "waypoint:back/waypoint")
            && edge("waypoint:back/waypoint", "workload:back/api")
    });

    let profile = tempfile::tempdir().unwrap();
    let dom = chromium(
        &t,
        profile.path(),
        &["--dump-dom"],
        "http://127.0.0.1:15090/#service:back/api",
    );
    for node in [
        "data-id=\"workload:front/client\" data-kind=\"workload\" data-namespace=\"front\"",
        "data-id=\"service:back/api\" data-kind=\"service\" data-namespace=\"back\"",
        "data-id=\"waypoint:back/waypoint\" data-kind=\"waypoint\" data-namespace=\"back\"",
        "data-id=\"workload:back/api\" data-kind=\"workload\"",
        "data-namespace=\"front\"><i",
    ] {
        assert!(dom.contains(node), "{node} in the page:\n{dom}");
    }
    for edge in [
        // HTTP through the waypoint: mTLS by construction (HBONE).
        "data-from=\"workload:front/client\" data-to=\"service:back/api\" data-protocol=\"http\" data-security=\"mtls\"",
        "data-from=\"service:back/api\" data-to=\"waypoint:back/waypoint\" data-protocol=\"via\"",
        // The waypoint's connections to api, reported by api's ztunnel as mTLS.
        "data-from=\"waypoint:back/waypoint\" data-to=\"workload:back/api\" data-protocol=\"tcp\"",
    ] {
        assert!(dom.contains(edge), "{edge} in the page:\n{dom}");
    }
    // The edge's label: 5 of 25 requests failed.
    let label = dom
        .split("data-from=\"workload:front/client\" data-to=\"service:back/api\"")
        .nth(1)
        .and_then(|s| s.split("</text>").next())
        .unwrap_or_default();
    let err: f64 = label
        .split(" · ")
        .find(|p| p.ends_with("% err"))
        .and_then(|p| p.trim_end_matches("% err").parse().ok())
        .unwrap_or_else(|| panic!("error rate on the edge: {label}"));
    // Rates are extrapolated per series to the window's edges: allow 5 points.
    assert!((15.0..=25.0).contains(&err), "20% errors expected: {label}");
    // The node selected by the URL: its golden metrics and mesh-control's view.
    assert!(
        dom.contains("<h2 id=\"detail-title\">service:back/api</h2>"),
        "{dom}"
    );
    assert!(dom.contains("<tr data-metric=\"success rate\">"), "{dom}");
    assert!(dom.contains("configurationVersion"), "{dom}");

    let png = screenshot_path("dashboard.png");
    chromium(
        &t,
        profile.path(),
        &[
            &format!("--screenshot={}", png.display()),
            "--window-size=1400,800",
        ],
        "http://127.0.0.1:15090/#workload:back/api",
    );
    let bytes = std::fs::read(&png).unwrap_or_default();
    assert!(
        bytes.starts_with(b"\x89PNG\r\n\x1a\n"),
        "a PNG at {}",
        png.display()
    );
    drop(dashboard);
}

/// The total of `istio_tcp_connections_failed_total{response_flags="DENY"}` the
/// destination ztunnels reported, as Prometheus last scraped it.
fn denied_connections(t: &TestLab) -> Option<f64> {
    t.promql(
        "sum(istio_tcp_connections_failed_total{reporter=\"destination\",response_flags=\"DENY\"})",
    )
    .first()
    .map(|(_, v)| *v)
}

/// The waypoint's 403 answers for back/api, as Prometheus last scraped them.
fn forbidden_requests(t: &TestLab) -> Option<f64> {
    t.promql("sum(istio_requests_total{reporter=\"waypoint\",destination_service_name=\"api\",response_code=\"403\"})")
        .first()
        .map(|(_, v)| *v)
}

/// The `<g>` of the edge `from` → `to` in the page's DOM, up to its closing tag.
fn edge_markup<'a>(dom: &'a str, from: &str, to: &str) -> &'a str {
    let at = dom
        .find(&format!("data-from=\"{from}\" data-to=\"{to}\""))
        .unwrap_or_else(|| panic!("no edge {from} → {to} in the page:\n{dom}"));
    let start = dom[..at].rfind("<g ").unwrap_or(at);
    let end = dom[at..].find("</g>").map_or(dom.len(), |e| at + e);
    &dom[start..end]
}

#[test]
fn the_dashboard_marks_an_edge_denied_by_policy() {
    let mut t = TestLab::up_named("deny", 2, &["curl", "prometheus", "chromium"]);
    t.lab.start_prometheus().unwrap();
    app_behind_waypoint(&mut t);
    assert_eq!(
        t.tcp("front/client", "10.96.0.20:9000", "warm").unwrap(),
        "warm"
    );
    // L4, enforced by api's ztunnel: the waypoint's connections to api's port 9000 are
    // refused; HTTP (8080) still flows on the same edge. L7, at the waypoint: /admin* on
    // the Service's port 80 answered 403 (without the port, the waypoint would refuse
    // the TCP port too: a DENY's HTTP fields are unknown there, and it fails closed).
    t.apply(
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-echo, namespace: back}
spec:
  selector: {matchLabels: {app: api}}
  action: DENY
  rules: [{to: [{operation: {ports: [\"9000\"]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-admin, namespace: back}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  action: DENY
  rules: [{to: [{operation: {ports: [\"80\"], paths: [\"/admin*\"]}}]}]
",
    );
    t.eventually("/admin to be refused by the waypoint", || {
        t.status("front/client", "http://10.96.0.20/admin") == "403"
    });
    t.eventually("the echo to be refused", || {
        t.tcp("front/client", "10.96.0.20:9000", "x")
            .map_or(true, |s| s.is_empty())
    });
    t.wait_log("ztunnel-2", "explicitly denied by: back/no-echo");
    // The series exists (first denials) before the measured ones, so its rate counts them.
    t.eventually("the first denials in Prometheus", || {
        denied_connections(&t).is_some() && forbidden_requests(&t).is_some()
    });
    let before = (
        denied_connections(&t).unwrap(),
        forbidden_requests(&t).unwrap(),
    );
    for i in 0..4 {
        let m = format!("denied-{i}");
        let got = t.tcp("front/client", "10.96.0.20:9000", &m);
        assert!(got.as_ref().map_or(true, |s| s.is_empty()), "{got:?}");
        assert_eq!(t.status("front/client", "http://10.96.0.20/admin"), "403");
        t.curl("front/client", "http://10.96.0.20/ok").unwrap();
    }
    t.eventually("the denials scraped", || {
        denied_connections(&t).is_some_and(|n| n >= before.0 + 4.0)
            && forbidden_requests(&t).is_some_and(|n| n >= before.1 + 4.0)
    });

    let dashboard = DashboardProcess::start(&t);
    let denied = |g: &Value, from: &str, to: &str| -> Option<f64> {
        g["edges"]
            .as_array()?
            .iter()
            .find(|e| e["from"] == from && e["to"] == to)?["denied"]
            .as_f64()
    };
    t.eventually("the graph's edges with their denials", || {
        let g = dashboard_graph(&t);
        denied(&g, "waypoint:back/waypoint", "workload:back/api").is_some_and(|d| d > 0.0)
            && denied(&g, "workload:front/client", "service:back/api").is_some_and(|d| d > 0.0)
    });

    let profile = tempfile::tempdir().unwrap();
    let dom = chromium(
        &t,
        profile.path(),
        &["--dump-dom"],
        "http://127.0.0.1:15090/",
    );
    let edge = edge_markup(&dom, "waypoint:back/waypoint", "workload:back/api");
    assert!(
        edge.contains("class=\"edge tcp mtls denied\""),
        "the edge drawn as denied: {edge}"
    );
    // "denied N conn/s" (or "rps (403)"), drawn as text on the edge.
    let denied_label = |edge: &str, unit: &str| {
        let label = edge
            .split("class=\"denied\">")
            .nth(1)
            .and_then(|s| s.split("</text>").next())
            .unwrap_or_else(|| panic!("a denial label on the edge: {edge}"));
        let rate: f64 = label
            .strip_prefix("denied ")
            .and_then(|l| l.strip_suffix(unit))
            .and_then(|r| r.parse().ok())
            .unwrap_or_else(|| panic!("\"denied N{unit}\": {label}"));
        assert!(rate > 0.0, "{label}");
    };
    denied_label(edge, " conn/s");
    let http = edge_markup(&dom, "workload:front/client", "service:back/api");
    assert!(
        http.contains("class=\"edge http mtls denied\""),
        "the requests' edge drawn as denied: {http}"
    );
    denied_label(http, " rps (403)");
    // Only those: the hop from the Service to its waypoint refuses nothing.
    let via = edge_markup(&dom, "service:back/api", "waypoint:back/waypoint");
    assert!(
        via.contains("class=\"edge via via\"") && !via.contains("class=\"denied\""),
        "{via}"
    );
    assert_eq!(dom.matches("class=\"denied\"").count(), 2, "{dom}");
    drop(dashboard);
}
