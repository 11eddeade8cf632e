//! Traces in the lab (`up --observe`): every ztunnel and waypoint exports its spans over
//! OTLP to the dashboard the lab runs, and one request's journey through the waypoint —
//! the source ztunnel, the waypoint's server span, each upstream attempt (a retry, a
//! fault), the destination ztunnel — is one trace with a complete parent chain, drawn by
//! the dashboard as a timeline.

use mesh_e2e::manifests::*;
use mesh_e2e::observe::*;
use mesh_e2e::testlab::TestLab;
use serde_json::Value;

/// Pod back/flaky (HTTP on 8080, node 2) and its Service (10.96.0.30, port 80).
fn flaky() -> (String, String) {
    let app = http_app("back", "flaky", "10.96.0.30");
    let (pod, service) = app.split_once("---\n").expect("a pod and a service");
    (pod.to_string(), service.to_string())
}

/// The waypoint's route for back/flaky: /status/503 retried twice on 503, /chaos aborted
/// with 503 by an HTTPFault (no upstream asked).
const FLAKY_ROUTE: &str = "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: flaky, namespace: back}
spec:
  parentRefs: [{group: \"\", kind: Service, name: flaky, port: 80}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /status/503}}]
    retry: {codes: [503], attempts: 2, backoff: 10ms}
    backendRefs: [{name: flaky, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /chaos}}]
    filters: [{type: ExtensionRef, extensionRef: {group: ambient-mesh.dev, kind: HTTPFault, name: unavailable}}]
    backendRefs: [{name: flaky, port: 80}]
  - backendRefs: [{name: flaky, port: 80}]
---
apiVersion: ambient-mesh.dev/v1alpha1
kind: HTTPFault
metadata: {name: unavailable, namespace: back}
spec: {abort: {httpStatus: 503}}
";

fn str_of<'a>(span: &'a Value, field: &str) -> &'a str {
    span[field].as_str().unwrap_or_default()
}

fn attr<'a>(span: &'a Value, key: &str) -> Option<&'a str> {
    span["attributes"]
        .as_array()?
        .iter()
        .find(|kv| kv[0] == key)
        .and_then(|kv| kv[1].as_str())
}

/// The traces (id, timeline) holding a waypoint server span that served `path`.
fn traces_of(t: &TestLab, path: &str) -> Vec<(String, Vec<Value>)> {
    let list = lab_dashboard_api(t, "/api/traces");
    let mut out = Vec::new();
    for tr in list["traces"].as_array().into_iter().flatten() {
        let id = str_of(tr, "traceId");
        let spans = lab_dashboard_api(t, &format!("/api/traces/{id}"))["spans"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if spans
            .iter()
            .any(|s| str_of(s, "kind") == "server" && attr(s, "url.path") == Some(path))
        {
            out.push((id.to_string(), spans));
        }
    }
    out
}

/// The first trace of `path` for which `complete` holds, waiting for it.
fn trace_of(t: &TestLab, path: &str, complete: impl Fn(&[Value]) -> bool) -> (String, Vec<Value>) {
    let mut found = None;
    t.eventually(&format!("the trace of {path}"), || {
        found = traces_of(t, path).into_iter().find(|(_, s)| complete(s));
        found.is_some()
    });
    found.unwrap()
}

/// The waypoint's upstream attempts in a trace.
fn attempts(spans: &[Value]) -> Vec<&Value> {
    spans
        .iter()
        .filter(|s| str_of(s, "service") == "waypoint.back" && str_of(s, "kind") == "client")
        .collect()
}

/// `mesh-lab dashboard` run for the test's lab; ended (by its PID) when dropped.
struct Forwarder(std::process::Child);

impl Drop for Forwarder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `path` of the lab's dashboard as a browser on this machine reaches it, through
/// `mesh-lab dashboard`.
fn via_mesh_lab_dashboard(t: &TestLab, path: &str) -> String {
    use std::io::BufRead;
    let mut child = std::process::Command::new(mesh_e2e::binary("mesh-lab"))
        .args(["--name", &t.lab.name, "--state-root"])
        .arg(t.lab.dir.parent().unwrap())
        .arg("dashboard")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let _forwarder = Forwarder(child);
    let mut line = String::new();
    std::io::BufReader::new(out).read_line(&mut line).unwrap();
    assert!(
        line.starts_with("dashboard on http://127.0.0.1:15080/"),
        "{line}"
    );
    let got = std::process::Command::new("curl")
        .args(["-s", "--max-time", "10"])
        .arg(format!("http://127.0.0.1:15080{path}"))
        .output()
        .unwrap();
    String::from_utf8_lossy(&got.stdout).into_owned()
}

#[test]
fn a_request_through_the_waypoint_is_one_trace_from_ztunnel_to_ztunnel() {
    let mut t = TestLab::up_observed("trace", 2, &["curl", "prometheus", "chromium"]);
    app_behind_waypoint(&mut t);
    // The route first, the pod after: no request reaches the pod before the traced one,
    // whose first attempt opens the waypoint's first tunnel to it.
    let (pod, service) = flaky();
    t.apply(&join(&[&service, FLAKY_ROUTE]));
    t.eventually("the route and its fault at the waypoint", || {
        let (code, body) = t.curl_response("front/client", &["http://10.96.0.30/chaos/ready"]);
        code == 503 && body.contains("fault filter abort")
    });
    t.apply(&pod);
    // Traffic only once the app listens: the lab publishes a pod's address before its
    // process is up (a readiness probe would hide that on a cluster), and attempts refused
    // meanwhile count towards the waypoint's outlier ejection, after which no attempt
    // reaches the app to be traced.
    t.eventually("back/flaky's app listening", || {
        t.in_pod("back/flaky")
            .args(["curl", "-s", "-o", "/dev/null", "--max-time", "2"])
            .arg("http://127.0.0.1:8080/")
            .status()
            .is_ok_and(|s| s.success())
    });
    // Until a request reaches the app: three attempts, each answered 503 by it.
    let reached = |spans: &[Value]| {
        let a = attempts(spans);
        a.len() == 3
            && a.iter()
                .all(|a| attr(a, "http.response.status_code") == Some("503"))
    };
    t.eventually("a request reaching back/flaky, retried", || {
        // Answered 503 by the waypoint until the pod is there, then by the app.
        t.status("front/client", "http://10.96.0.30/status/503");
        traces_of(&t, "/status/503")
            .iter()
            .any(|(_, spans)| reached(spans))
    });
    // The destination ztunnel's span ends with the tunnel, which the waypoint keeps for
    // reuse: the pod going ends it.
    t.lab.delete_pod("back/flaky").unwrap();

    // The request whose attempt opened the tunnel: its trace holds the destination
    // ztunnel's inbound span (waited for, with the source ztunnel's, as exporters send
    // in their own time).
    let ztunnel = |spans: &[Value], kind: &str| {
        spans
            .iter()
            .any(|s| str_of(s, "kind") == kind && str_of(s, "service").starts_with("ztunnel."))
    };
    // Retries were seen above; the tunnel's opener may have had fewer attempts (the
    // first request to a new endpoint sometimes is not retried: noted, not asserted).
    let answered = |spans: &[Value]| {
        let a = attempts(spans);
        !a.is_empty()
            && a.iter()
                .all(|a| attr(a, "http.response.status_code") == Some("503"))
    };
    let (id, spans) = trace_of(&t, "/status/503", |spans| {
        answered(spans) && ztunnel(spans, "server") && ztunnel(spans, "client")
    });
    let summary: Vec<String> = spans
        .iter()
        .map(|s| {
            format!(
                "{}{} {} {} parent={}",
                "  ".repeat(s["depth"].as_u64().unwrap_or(0) as usize),
                str_of(s, "service"),
                str_of(s, "kind"),
                str_of(s, "name"),
                s["parentId"]
            )
        })
        .collect();
    let summary = summary.join("\n");
    // One root (the source ztunnel's connection), every other span's parent held.
    let roots: Vec<&Value> = spans.iter().filter(|s| s["parentId"].is_null()).collect();
    assert_eq!(roots.len(), 1, "one root:\n{summary}");
    assert!(
        spans.iter().all(|s| s["missingParent"] == false),
        "every parent in the trace:\n{summary}"
    );
    let root = roots[0];
    assert!(
        str_of(root, "service").starts_with("ztunnel.") && str_of(root, "kind") == "client",
        "the source ztunnel's client span is the root:\n{summary}"
    );
    // The waypoint's server span, a child of the CONNECT's context.
    let server: Vec<&Value> = spans
        .iter()
        .filter(|s| str_of(s, "service") == "waypoint.back" && str_of(s, "kind") == "server")
        .collect();
    assert_eq!(server.len(), 1, "{summary}");
    let server = server[0];
    assert_eq!(server["parentId"], root["spanId"], "{summary}");
    assert_eq!(attr(server, "http.response.status_code"), Some("503"));
    assert_eq!(server["error"], true);
    // Its attempts (retries among them), sibling client spans of the server span, all 503.
    let attempts = attempts(&spans);
    assert!(!attempts.is_empty(), "{summary}");
    for (i, a) in attempts.iter().enumerate() {
        assert_eq!(a["parentId"], server["spanId"], "{summary}");
        assert_eq!(a["attempt"], i + 1, "{summary}");
        assert_eq!(a["error"], true, "{summary}");
        assert_eq!(attr(a, "http.response.status_code"), Some("503"));
    }
    // The destination ztunnel's inbound span: a child of the attempt that opened the
    // tunnel (the others reused it).
    let inbound: Vec<&Value> = spans
        .iter()
        .filter(|s| str_of(s, "service").starts_with("ztunnel.") && str_of(s, "kind") == "server")
        .collect();
    assert_eq!(inbound.len(), 1, "{summary}");
    assert!(
        attempts
            .iter()
            .any(|a| a["spanId"] == inbound[0]["parentId"]),
        "{summary}"
    );
    assert_ne!(
        str_of(inbound[0], "service"),
        str_of(root, "service"),
        "two ztunnels: front/client's on node 1, flaky's on node 2"
    );

    // The fault: the waypoint answered 503 itself, no upstream attempt.
    let (_, fault) = trace_of(&t, "/chaos/ready", |_| true);
    let wp = fault
        .iter()
        .find(|s| str_of(s, "service") == "waypoint.back")
        .unwrap();
    assert_eq!(wp["error"], true);
    assert_eq!(attr(wp, "http.response.status_code"), Some("503"));
    assert!(
        !fault
            .iter()
            .any(|s| str_of(s, "service") == "waypoint.back" && str_of(s, "kind") == "client"),
        "a fault asks no upstream: {fault:?}"
    );

    // `mesh-lab dashboard` forwards this machine's 127.0.0.1:15080 to it.
    let listed = via_mesh_lab_dashboard(&t, "/api/traces");
    assert!(
        listed.contains(&format!("\"traceId\":\"{id}\"")),
        "the trace through `mesh-lab dashboard`: {listed}"
    );

    // The journey in the page: the rows in the API's order, the retries marked.
    let profile = tempfile::tempdir().unwrap();
    let url = format!("{}#trace:{id}", lab_dashboard_url());
    let dom = chromium(&t, profile.path(), &["--dump-dom"], &url);
    let drawn: Vec<&str> = dom
        .split("data-span-id=\"")
        .skip(1)
        .filter_map(|r| r.split('"').next())
        .collect();
    let want: Vec<&str> = spans.iter().map(|s| str_of(s, "spanId")).collect();
    assert_eq!(drawn, want, "the timeline's rows:\n{summary}\n{dom}");
    assert_eq!(
        dom.matches(">retry ").count(),
        attempts.len() - 1,
        "every attempt after the first marked as a retry: {dom}"
    );
    assert!(
        dom.contains(&format!("data-trace-id=\"{id}\"")),
        "the trace listed: {dom}"
    );
    let png = screenshot_path("journey.png");
    chromium(
        &t,
        profile.path(),
        &[
            &format!("--screenshot={}", png.display()),
            "--window-size=1400,900",
        ],
        &url,
    );
    assert!(
        std::fs::read(&png)
            .unwrap_or_default()
            .starts_with(b"\x89PNG\r\n\x1a\n"),
        "a PNG at {}",
        png.display()
    );
}
