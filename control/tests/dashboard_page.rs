//! The dashboard page in headless Chromium: label values from scraped targets that look
//! like markup are drawn as text, never run (the page from a file); spans sent over real
//! OTLP/gRPC to the dashboard's receiver show as one request's journey (the page served).

use mesh_control::observe::dashboard::{Dashboard, page};
use mesh_control::observe::graph::{Graph, Node};
use mesh_control::observe::{client::Endpoint, otlp, promql::Window, traces};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, Status};
use std::sync::{Arc, Mutex};

const EVIL: &str = r#"<img src=x onerror="document.title='pwned'">"#;

#[test]
fn label_values_that_look_like_markup_render_as_text() {
    let graph = Graph {
        namespaces: vec![EVIL.into()],
        nodes: vec![Node {
            id: format!("workload:{EVIL}/{EVIL}"),
            kind: "workload",
            namespace: EVIL.into(),
            name: EVIL.into(),
        }],
        edges: vec![],
    };
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dashboard.html");
    std::fs::write(&file, page(&graph)).unwrap();
    let dom = chromium(
        &dir.path().join("profile"),
        &["--dump-dom"],
        &format!("file://{}", file.display()),
    );
    assert!(dom.contains("id=\"legend\""), "the page was drawn: {dom}");
    // The legend and the node's labels hold the value as text.
    let escaped = "&lt;img src=x onerror=\"document.title='pwned'\"&gt;";
    assert!(
        dom.contains(&format!("namespace {escaped}")),
        "legend as text: {dom}"
    );
    assert!(
        dom.contains(&format!(">{escaped}</text>")),
        "node name as text: {dom}"
    );
    // Outside the inline JSON (raw text inside its <script>), no element was made of it.
    let (before, rest) = dom.split_once("<script id=\"initial\"").unwrap();
    let after = rest.split_once("</script>").unwrap().1;
    assert!(
        !before.contains("<img") && !after.contains("<img"),
        "an element was made of a label: {dom}"
    );
    assert!(
        dom.contains("<title>mesh dashboard</title>"),
        "a label's script ran: {dom}"
    );
}

/// Headless Chromium, a fresh profile, nothing fetched but the page: `args` then the URL;
/// its standard output.
fn chromium(profile: &std::path::Path, args: &[&str], url: &str) -> String {
    let out = std::process::Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            // The page's fetches run before the DOM is dumped.
            "--virtual-time-budget=5000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(url)
        .output()
        .expect("chromium runs (apt-get install chromium)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn attr(k: &str, v: any_value::Value) -> KeyValue {
    KeyValue {
        key: k.into(),
        value: Some(AnyValue { value: Some(v) }),
        ..Default::default()
    }
}

const TRACE: u128 = 0x4bf92f3577b34da6a3ce929d0e0e4736;

/// A span of TRACE, `ms` after a fixed start, lasting `len` ms.
fn span(id: u64, parent: u64, kind: i32, name: &str, ms: u64, len: u64, status: i64) -> Span {
    let t0 = 1_764_460_800_000_000_000u64;
    Span {
        trace_id: TRACE.to_be_bytes().to_vec(),
        span_id: id.to_be_bytes().to_vec(),
        parent_span_id: if parent == 0 {
            vec![]
        } else {
            parent.to_be_bytes().to_vec()
        },
        name: name.into(),
        kind,
        start_time_unix_nano: t0 + ms * 1_000_000,
        end_time_unix_nano: t0 + (ms + len) * 1_000_000,
        attributes: vec![attr(
            "http.response.status_code",
            any_value::Value::IntValue(status),
        )],
        status: Some(Status {
            code: if status >= 500 { 2 } else { 0 },
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn export(service: &str, spans: Vec<Span>) -> ExportTraceServiceRequest {
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: vec![attr(
                    "service.name",
                    any_value::Value::StringValue(service.into()),
                )],
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                spans,
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

/// client's ztunnel → waypoint (a 503 attempt, then a retry that succeeds) → api's
/// ztunnel, sent by three senders over OTLP/gRPC in an order unlike the journey's; the
/// page lists the trace as failed-in-part and draws its spans nested, in start order,
/// the retry and the error marked, a sender's markup as text.
#[test]
fn a_trace_received_over_otlp_shows_as_a_journey() {
    let store = Arc::new(Mutex::new(traces::Store::new(traces::Limits::default())));
    let otlp_addr = otlp::spawn(([127, 0, 0, 1], 0).into(), store.clone()).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut c = TraceServiceClient::connect(format!("http://{otlp_addr}"))
            .await
            .unwrap();
        c.export(export(
            "waypoint.back",
            vec![
                span(0x22, 0x10, 3, "upstream back/api-v2", 9, 3, 200),
                span(0x20, 0x10, 3, "upstream back/api-v1", 3, 4, 503),
                span(0x10, 0x01, 2, "api.back.svc.cluster.local:80/*", 2, 12, 200),
            ],
        ))
        .await
        .unwrap();
        c.export(export(
            "ztunnel-node-2",
            vec![
                span(0x21, 0x20, 2, "inbound api-v1", 4, 2, 503),
                span(0x23, 0x22, 2, "inbound api-v2", 10, 1, 200),
            ],
        ))
        .await
        .unwrap();
        let mut evil = span(0x01, 0, 3, EVIL, 0, 15, 200);
        evil.attributes.clear();
        c.export(export("ztunnel-node-1", vec![evil]))
            .await
            .unwrap();
    });
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let d = Dashboard {
        // No Prometheus: the graph is empty, the journeys still show.
        prometheus: Endpoint::parse("http://127.0.0.1:1").unwrap(),
        control: "127.0.0.1:1".into(),
        window: Window::parse("1m").unwrap(),
        traces: Some(store),
    };
    std::thread::spawn(move || d.serve(listener));
    let profile = tempfile::tempdir().unwrap();
    let url = format!("http://127.0.0.1:{port}/#trace:{TRACE:032x}");
    let dom = chromium(profile.path(), &["--dump-dom"], &url);

    // The list: the trace, flagged as holding errors.
    assert!(
        dom.contains(&format!(
            "<tr class=\"trace error selected\" data-trace-id=\"{TRACE:032x}\" data-errors=\"2\">"
        )),
        "the trace listed with its errors: {dom}"
    );
    // The timeline: every span once, depth-first in start order.
    let order: Vec<(String, String)> = dom
        .split("<div class=\"span ")
        .skip(1)
        .map(|row| {
            let field = |name: &str| {
                row.split(&format!("data-{name}=\""))
                    .nth(1)
                    .and_then(|r| r.split('"').next())
                    .unwrap_or_default()
                    .to_string()
            };
            (field("span-id"), field("depth"))
        })
        .collect();
    let want: Vec<(String, String)> = [
        (0x01, 0),
        (0x10, 1),
        (0x20, 2),
        (0x21, 3),
        (0x22, 2),
        (0x23, 3),
    ]
    .iter()
    .map(|(id, depth)| (format!("{id:016x}"), depth.to_string()))
    .collect();
    assert_eq!(order, want, "{dom}");
    // The failed first attempt is an error; the second is marked as the retry.
    // A span's row: from its class attribute to its duration.
    let row = |id: u64| {
        let at = dom
            .find(&format!("data-span-id=\"{id:016x}\""))
            .unwrap_or_else(|| panic!("span {id:x} drawn: {dom}"));
        let start = dom[..at].rfind("<div class=\"").unwrap() + "<div class=\"".len();
        let end = at + dom[at..].find("class=\"dur\"").unwrap();
        dom[start..end].to_string()
    };
    let first = row(0x20);
    assert!(first.starts_with("span client error\""), "{first}");
    assert!(first.contains(">ERROR 503</span>"), "{first}");
    let retry = row(0x22);
    assert!(retry.starts_with("span client retry\""), "{retry}");
    assert!(retry.contains(">retry 1</span>"), "{retry}");
    assert!(retry.contains(">waypoint.back</span>"), "{retry}");
    assert!(retry.contains(">upstream back/api-v2</span>"), "{retry}");
    // A sender's span name that looks like markup is text.
    let escaped = "&lt;img src=x onerror=\"document.title='pwned'\"&gt;";
    assert!(
        row(0x01).contains(&format!("<span class=\"name\">{escaped}</span>")),
        "{dom}"
    );
    assert!(!dom.contains("<img"), "an element was made of a span name");
    assert!(dom.contains("<title>mesh dashboard</title>"));

    let png = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("journey.png");
    let _ = std::fs::remove_file(&png);
    chromium(
        profile.path(),
        &[
            &format!("--screenshot={}", png.display()),
            "--window-size=1400,700",
        ],
        &url,
    );
    let bytes = std::fs::read(&png).unwrap_or_default();
    assert!(
        bytes.starts_with(b"\x89PNG\r\n\x1a\n"),
        "a PNG at {}",
        png.display()
    );
}
