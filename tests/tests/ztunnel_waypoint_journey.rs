//! One request's journey as one trace: curl in pod A → ztunnel (node 1) → waypoint →
//! ztunnel (node 2) → the app in pod B, over real HBONE, with both ztunnels and the
//! waypoint exporting spans to a real OTLP/gRPC receiver. The ztunnels are the real
//! binaries on two simulated nodes (`cluster.rs`); the waypoint runs in this process, in
//! a namespace of its own beside node 2, as do the receiver and the app. Needs root.

use mesh_discovery::State;
use mesh_e2e::cluster::*;
use mesh_e2e::net::{Netns, veth};
use mesh_identity::SpiffeId;
use mesh_identity::ca::CertificateAuthority;
use mesh_proto::workload as pb;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::trace::v1::Span;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The side namespace: the waypoint and the OTLP receiver.
const SIDE: &str = "10.201.3.2";
const WAYPOINT: &str = SIDE;
const VIP: &str = "10.96.0.10";

/// Spans as the collector got them, each with its resource's `service.name`.
#[derive(Default, Clone)]
struct Receiver(Arc<Mutex<Vec<(String, Span)>>>);

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        for rs in req.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|a| a.key == "service.name")
                .and_then(|a| match a.value.as_ref()?.value.as_ref()? {
                    opentelemetry_proto::tonic::common::v1::any_value::Value::StringValue(s) => {
                        Some(s.clone())
                    }
                    _ => None,
                })
                .unwrap_or_default();
            for ss in rs.scope_spans {
                let mut got = self.0.lock().unwrap();
                got.extend(ss.spans.into_iter().map(|s| (service.clone(), s)));
            }
        }
        Ok(tonic::Response::new(Default::default()))
    }
}

fn config() -> String {
    format!(
        r#"
workloads:
  - name: client
    namespace: front
    serviceAccount: web
    addresses: ["{POD_A}"]
    node: node-1
    protocol: HBONE
  - name: server
    namespace: back
    serviceAccount: api
    addresses: ["{POD_B}"]
    node: node-2
    protocol: HBONE
    services:
      back/api.back.svc.cluster.local: [{{servicePort: 80, targetPort: 8080}}]
  - name: waypoint
    namespace: back
    serviceAccount: waypoint
    addresses: ["{WAYPOINT}"]
    node: node-2
    protocol: HBONE
services:
  - name: api
    namespace: back
    hostname: api.back.svc.cluster.local
    addresses: ["{VIP}"]
    ports: [{{servicePort: 80, targetPort: 8080, appProtocol: HTTP11}}]
    waypoint: {{address: "{WAYPOINT}"}}
policies: []
"#
    )
}

/// What the waypoint knows from its control plane: the service bound to it and its
/// endpoint.
fn waypoint_state() -> State {
    let mut st = State::default();
    let service = pb::Address {
        r#type: Some(pb::address::Type::Service(pb::Service {
            name: "api".into(),
            namespace: "back".into(),
            hostname: "api.back.svc.cluster.local".into(),
            addresses: vec![pb::NetworkAddress {
                network: String::new(),
                address: mesh_authz::ip_bytes(VIP.parse().unwrap()),
                length: None,
            }],
            ports: vec![pb::Port {
                service_port: 80,
                target_port: 8080,
                app_protocol: pb::AppProtocol::Http11 as i32,
            }],
            waypoint: Some(pb::GatewayAddress {
                destination: Some(pb::gateway_address::Destination::Hostname(
                    pb::NamespacedHostname {
                        namespace: "back".into(),
                        hostname: "waypoint.back.svc.cluster.local".into(),
                    },
                )),
                hbone_mtls_port: 15008,
            }),
            ..Default::default()
        })),
    };
    let endpoint = pb::Address {
        r#type: Some(pb::address::Type::Workload(pb::Workload {
            uid: "c//Pod/back/server".into(),
            name: "server".into(),
            namespace: "back".into(),
            addresses: vec![mesh_authz::ip_bytes(POD_B.parse().unwrap())],
            tunnel_protocol: pb::TunnelProtocol::Hbone as i32,
            service_account: "api".into(),
            services: [(
                "back/api.back.svc.cluster.local".to_string(),
                pb::PortList {
                    ports: vec![pb::Port {
                        service_port: 80,
                        target_port: 8080,
                        app_protocol: 0,
                    }],
                },
            )]
            .into(),
            ..Default::default()
        })),
    };
    st.apply_address(&service).unwrap();
    st.apply_address(&endpoint).unwrap();
    st
}

/// A namespace beside node 2 (at `SIDE`), routed from node 1: where the receiver (and
/// the waypoint) run.
fn side_namespace(c: &Cluster) -> Netns {
    let ns = Netns::new("pw");
    veth(&c.node2, "10.201.3.1/24", &ns, &format!("{SIDE}/24"));
    ns.exec(&["ip", "route", "add", "default", "via", "10.201.3.1"]);
    c.node1
        .exec(&["ip", "route", "add", "10.201.3.0/24", "via", NODE2_FABRIC]);
    ns
}

/// The receiver and, given the cluster's CA directory, the waypoint: on a current-thread
/// runtime of a thread that stays in `ns` (everything they bind or dial is in it).
/// Returns once they listen.
fn start_receiver_and_waypoint(ns: &Netns, receiver: Receiver, ca_dir: Option<&std::path::Path>) {
    let handle = ns.handle();
    let ca = ca_dir.map(|d| {
        (
            std::fs::read_to_string(d.join("ca-cert.pem")).unwrap(),
            std::fs::read_to_string(d.join("ca-key.pem")).unwrap(),
        )
    });
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // The thread enters the namespace for good: it serves nothing else.
        let _ = handle.run(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let otlp = tokio::net::TcpListener::bind((SIDE, 4317)).await.unwrap();
                tokio::spawn(
                    tonic::transport::Server::builder()
                        .add_service(TraceServiceServer::new(receiver))
                        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(otlp)),
                );
                let Some((ca_cert, ca_key)) = ca else {
                    ready_tx.send(()).unwrap();
                    return std::future::pending().await;
                };
                let ca =
                    CertificateAuthority::load("cluster.local", &ca_cert, &ca_key, None, &ca_cert)
                        .unwrap();
                let certs = mesh_xds::certs::CertManager::new(mesh_xds::certs::CertSource::Local {
                    ca: Box::new(ca),
                    ttl: Duration::from_secs(3600),
                });
                let id = SpiffeId::new("cluster.local", "back", "waypoint").unwrap();
                let creds = certs.get(&id).await.unwrap();
                let wp = Arc::new(waypoint::proxy::Waypoint {
                    identity: id,
                    config: Arc::new(waypoint::proxy::ConfigStore::new(waypoint::proxy::Config {
                        discovery: waypoint_state(),
                        ..Default::default()
                    })),
                    certs,
                    client: mesh_threads::PerThread::one(hbone::Client::new(
                        hbone::TcpDialer,
                        hbone::ClientSettings::default(),
                    )),
                    metrics: Arc::new(waypoint::metrics::Metrics::new()),
                    budget: Default::default(),
                    balancer: Arc::new(waypoint::balancer::Balancer::new(Default::default())),
                    pool: Default::default(),
                    normalization: Default::default(),
                    shutdown: CancellationToken::new(),
                    idle_grace: waypoint::in_flight::IDLE_GRACE,
                    tracer: mesh_trace::Tracer::otlp(
                        format!("http://{WAYPOINT}:4317"),
                        mesh_trace::Origin {
                            service: "waypoint.back".into(),
                            scope: "mesh-waypoint",
                        },
                    ),
                    mirrors: Default::default(),
                });
                let hbone = tokio::net::TcpListener::bind((WAYPOINT, 15008))
                    .await
                    .unwrap();
                ready_tx.send(()).unwrap();
                let handler = Arc::new(waypoint::proxy::Handler(wp));
                loop {
                    let (tcp, _) = hbone.accept().await.unwrap();
                    let (tls, h) = (creds.server_config.clone(), handler.clone());
                    tokio::spawn(async move {
                        let _ = hbone::serve_connection(
                            tcp,
                            tls,
                            h,
                            &hbone::H2Settings::server(),
                            CancellationToken::new(),
                        )
                        .await;
                    });
                }
            })
        });
    });
    ready_rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the waypoint did not start");
}

/// An HTTP/1.1 app in `ns` on :8080 that answers every request `200 ok` and closes
/// (so the tunnel to it, and its spans, end with the request).
fn http_app(ns: &Netns) {
    let listener = ns
        .handle()
        .run(|| TcpListener::bind("0.0.0.0:8080"))
        .unwrap()
        .unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut s) = conn else { return };
            std::thread::spawn(move || {
                let mut req = Vec::new();
                let mut buf = [0u8; 4096];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = s.write_all(
                    b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nconnection: close\r\n\r\napp",
                );
            });
        }
    });
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn one_request_through_ztunnel_waypoint_ztunnel_is_one_trace() {
    mesh_e2e::require_tool("curl");
    let c = Cluster::with_ztunnel_args(
        Control::Local(config()),
        &["--otlp-endpoint", &format!("http://{SIDE}:4317")],
    );
    // The waypoint's own namespace, beside node 2, routed from node 1.
    let pw = side_namespace(&c);
    let receiver = Receiver::default();
    start_receiver_and_waypoint(&pw, receiver.clone(), Some(&c.dir.join("ca")));
    http_app(&c.pod_b);

    let out = c.pod_a.exec(&[
        "curl",
        "-sS",
        "-m",
        "10",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &format!("http://{VIP}/journey"),
    ]);
    assert_eq!(out.trim(), "200", "{}", c.ztunnel_log(0));

    // Four spans: node 1's connection (client), the waypoint's request (server) and
    // attempt (client), node 2's tunnel (server). Each ends with its connection.
    let want = |spans: &[(String, Span)]| {
        let has = |svc: &str, kind: i32| spans.iter().any(|(s, x)| s == svc && x.kind == kind);
        has("ztunnel.node-1", 3)
            && has("waypoint.back", 2)
            && has("waypoint.back", 3)
            && has("ztunnel.node-2", 2)
    };
    for _ in 0..300 {
        if want(&receiver.0.lock().unwrap()) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let spans = receiver.0.lock().unwrap().clone();
    assert!(
        want(&spans),
        "missing spans: {spans:#?}\n{}\n{}",
        c.ztunnel_log(0),
        c.ztunnel_log(1)
    );
    let one = |svc: &str, kind: i32| {
        let v: Vec<&Span> = spans
            .iter()
            .filter(|(s, x)| s == svc && x.kind == kind)
            .map(|(_, x)| x)
            .collect();
        assert_eq!(v.len(), 1, "one {svc} span of kind {kind}: {spans:#?}");
        v[0].clone()
    };
    let source = one("ztunnel.node-1", 3);
    let server = one("waypoint.back", 2);
    let attempt = one("waypoint.back", 3);
    let destination = one("ztunnel.node-2", 2);
    let trace = hex(&source.trace_id);
    for s in [&server, &attempt, &destination] {
        assert_eq!(hex(&s.trace_id), trace, "one trace: {spans:#?}");
    }
    // The parent chain, complete: the source ztunnel's span is the root.
    assert!(source.parent_span_id.is_empty(), "{source:?}");
    assert_eq!(server.parent_span_id, source.span_id, "waypoint ← CONNECT");
    assert_eq!(attempt.parent_span_id, server.span_id, "attempt ← request");
    assert_eq!(
        destination.parent_span_id, attempt.span_id,
        "destination ztunnel ← the attempt's CONNECT"
    );
    // What the connection spans say.
    let attr = |s: &Span, key: &str| {
        s.attributes
            .iter()
            .find(|a| a.key == key)
            .and_then(|a| a.value.as_ref()?.value.clone())
            .map(|v| format!("{v:?}"))
            .unwrap_or_default()
    };
    assert!(
        attr(&source, "src.workload").contains("front/client"),
        "{source:?}"
    );
    assert!(attr(&source, "dst.service").contains("api.back.svc.cluster.local"));
    assert!(attr(&destination, "src.identity").contains("ns/back/sa/waypoint"));
    assert!(attr(&destination, "dst.workload").contains("back/server"));
    // Both ends finished cleanly with the bytes they moved, although the waypoint may
    // release its stream before the source's END_STREAM (RST_STREAM(NO_ERROR)).
    for s in [&source, &destination] {
        for key in ["bytes_sent", "bytes_recv"] {
            let v = attr(s, key);
            assert!(
                v.starts_with("IntValue") && v != "IntValue(0)",
                "{key}: {s:?}"
            );
        }
        assert_eq!(attr(s, "response_flags"), "StringValue(\"-\")", "{s:?}");
        assert_eq!(attr(s, "error.message"), "", "{s:?}");
    }
    // The access logs and the byte metrics say the same.
    for (i, node) in [(0, &c.node1), (1, &c.node2)] {
        let log = c.ztunnel_log(i);
        let done: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("connection complete"))
            // Only the connection under test, between pod A and pod B (either address).
            .filter(|l| l.contains(&format!("={POD_A}:")) || l.contains(&format!("={POD_B}:")))
            .collect();
        assert!(!done.is_empty(), "node {}: {log}", i + 1);
        for line in done {
            assert!(!line.contains("error="), "node {}: {line}", i + 1);
            assert!(!line.contains("bytes_sent=0"), "node {}: {line}", i + 1);
        }
        let m = mesh_e2e::net::ns_run(
            &node.name,
            &["curl", "-sf", "http://127.0.0.1:15020/metrics"],
        );
        for name in [
            "istio_tcp_sent_bytes_total",
            "istio_tcp_received_bytes_total",
        ] {
            let total: f64 = m
                .lines()
                .filter(|l| l.starts_with(&format!("{name}{{")))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum();
            assert!(total > 0.0, "node {}: {name}: {m}", i + 1);
        }
    }

    // A request with its own trace keeps it (the app's trace wins) and links the
    // connection's span; what follows the waypoint joins the app's trace.
    let app_trace = "0af7651916cd43dd8448eb211c80319c";
    let app_span = "b7ad6b7169203331";
    let out = c.pod_a.exec(&[
        "curl",
        "-sS",
        "-m",
        "10",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-H",
        &format!("traceparent: 00-{app_trace}-{app_span}-01"),
        &format!("http://{VIP}/app-traced"),
    ]);
    assert_eq!(out.trim(), "200");
    let app_spans = |spans: &[(String, Span)]| -> Vec<(String, Span)> {
        spans
            .iter()
            .filter(|(_, s)| hex(&s.trace_id) == app_trace)
            .cloned()
            .collect()
    };
    // The app's trace (waypoint server and attempt, node 2's tunnel), and node 1's second
    // connection span, which ends when curl closes.
    let done = |spans: &[(String, Span)]| {
        app_spans(spans).len() >= 3
            && spans.iter().filter(|(s, _)| s == "ztunnel.node-1").count() >= 2
    };
    for _ in 0..300 {
        if done(&receiver.0.lock().unwrap()) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let all = receiver.0.lock().unwrap().clone();
    let traced = app_spans(&all);
    let find = |svc: &str, kind: i32| {
        traced
            .iter()
            .find(|(s, x)| s == svc && x.kind == kind)
            .map(|(_, x)| x.clone())
            .unwrap_or_else(|| panic!("no {svc} span of kind {kind} in the app's trace: {all:#?}"))
    };
    let server = find("waypoint.back", 2);
    let attempt = find("waypoint.back", 3);
    let destination = find("ztunnel.node-2", 2);
    assert_eq!(
        hex(&server.parent_span_id),
        app_span,
        "the app's span is the parent"
    );
    assert_eq!(attempt.parent_span_id, server.span_id);
    assert_eq!(destination.parent_span_id, attempt.span_id);
    assert_eq!(server.links.len(), 1, "{server:?}");
    let link = &server.links[0];
    let connection = all
        .iter()
        .find(|(svc, s)| svc == "ztunnel.node-1" && s.span_id == link.span_id)
        .map(|(_, s)| s.clone())
        .unwrap_or_else(|| panic!("the link names no span of the source ztunnel: {all:#?}"));
    assert_eq!(link.trace_id, connection.trace_id);
    assert_ne!(
        hex(&connection.trace_id),
        app_trace,
        "the connection keeps its own trace"
    );
    drop(pw);
}

/// Policy denial, visible in the trace: both ends' spans have an error status, the
/// destination's names the policy, and it is still the child of the source's.
#[test]
fn a_denied_connection_is_an_error_on_both_ends_naming_the_policy() {
    let policy = r#"
  - name: deny-8081
    namespace: back
    action: DENY
    rules:
      - clauses:
          - matches:
              - destinationPorts: [8081]
"#;
    let c = Cluster::with_ztunnel_args(
        Control::Local(base_config(policy, "")),
        &["--otlp-endpoint", &format!("http://{SIDE}:4317")],
    );
    let pw = side_namespace(&c);
    let receiver = Receiver::default();
    start_receiver_and_waypoint(&pw, receiver.clone(), None);
    let _denied = echo_server(&c.pod_b, "0.0.0.0:8081", "denied");
    let err = talk(&c.pod_a, &format!("{POD_B}:8081"), "hi");
    assert!(err.is_err(), "port 8081 must be refused, got {err:?}");
    let both = |spans: &[(String, Span)]| {
        spans.iter().any(|(s, _)| s == "ztunnel.node-1")
            && spans.iter().any(|(s, _)| s == "ztunnel.node-2")
    };
    for _ in 0..300 {
        if both(&receiver.0.lock().unwrap()) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let spans = receiver.0.lock().unwrap().clone();
    assert!(both(&spans), "missing spans: {spans:#?}");
    let of = |svc: &str| spans.iter().find(|(s, _)| s == svc).unwrap().1.clone();
    let (source, destination) = (of("ztunnel.node-1"), of("ztunnel.node-2"));
    let attr = |s: &Span, key: &str| {
        s.attributes
            .iter()
            .find(|a| a.key == key)
            .and_then(|a| a.value.as_ref()?.value.clone())
            .map(|v| format!("{v:?}"))
            .unwrap_or_default()
    };
    for s in [&source, &destination] {
        assert_eq!(s.status.as_ref().map(|s| s.code), Some(2), "error: {s:?}");
        assert!(attr(s, "response_flags").contains("DENY"), "{s:?}");
    }
    assert!(
        attr(&destination, "error.message").contains("explicitly denied by: back/deny-8081"),
        "{destination:?}"
    );
    assert_eq!(destination.trace_id, source.trace_id);
    assert_eq!(destination.parent_span_id, source.span_id);
    drop(pw);
}
