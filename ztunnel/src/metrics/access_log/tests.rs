use super::*;
use tracing_subscriber::prelude::*;

/// The line(s) `f` logs, through the formatter ztunnel's main installs (text or JSON).
fn logged(json: bool, f: impl FnOnce()) -> String {
    let buf = mesh_log::Captured::default();
    let fmt = tracing_subscriber::fmt::layer()
        .with_target(true)
        .with_ansi(false)
        .without_time()
        .with_writer(buf.clone());
    let filter = tracing_subscriber::filter::LevelFilter::DEBUG;
    if json {
        let sub = tracing_subscriber::registry()
            .with(filter)
            .with(fmt.json().flatten_event(true));
        tracing::subscriber::with_default(sub, f);
    } else {
        let sub = tracing_subscriber::registry().with(filter).with(fmt);
        tracing::subscriber::with_default(sub, f);
    }
    buf.text()
}

fn outbound() -> AccessLog {
    AccessLog {
        src_addr: "10.244.0.5:41234".parse().unwrap(),
        src_workload: Some("web-1".into()),
        src_namespace: Some("front".into()),
        src_identity: Some("spiffe://cluster.local/ns/front/sa/web".into()),
        dst_addr: "10.244.1.7:15008".parse().unwrap(),
        dst_hbone_addr: Some("10.244.1.7:8080".parse().unwrap()),
        dst_service: Some("api.back.svc.cluster.local".into()),
        dst_workload: Some("api-1".into()),
        dst_namespace: Some("back".into()),
        dst_identity: Some("spiffe://cluster.local/ns/back/sa/api".into()),
        direction: "outbound",
        trace_id: "4bf92f3577b34da6a3ce929d0e0e4736".into(),
    }
}

fn done() -> Completion {
    Completion {
        bytes_sent: 67,
        bytes_recv: 490,
        duration_ms: 2,
        error: None,
    }
}

#[test]
fn text_line_has_istios_fields_in_istios_order_and_quoting() {
    let line = logged(false, || outbound().complete(&done()));
    let expected = " INFO access: connection complete \
        src.addr=10.244.0.5:41234 src.workload=\"web-1\" src.namespace=\"front\" \
        src.identity=\"spiffe://cluster.local/ns/front/sa/web\" \
        dst.addr=10.244.1.7:15008 dst.hbone_addr=10.244.1.7:8080 \
        dst.service=\"api.back.svc.cluster.local\" dst.workload=\"api-1\" \
        dst.namespace=\"back\" dst.identity=\"spiffe://cluster.local/ns/back/sa/api\" \
        direction=\"outbound\" bytes_sent=67 bytes_recv=490 duration=\"2ms\" \
        id=\"4bf92f3577b34da6a3ce929d0e0e4736\"\n";
    assert!(line.ends_with(expected), "{line}");
}

#[test]
fn json_line_has_istios_keys_and_types() {
    let line = logged(true, || outbound().complete(&done()));
    let v: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
    assert_eq!(v["level"], "INFO");
    assert_eq!(v["target"], "access");
    assert_eq!(v["message"], "connection complete");
    assert_eq!(v["src.addr"], "10.244.0.5:41234");
    assert_eq!(v["src.workload"], "web-1");
    assert_eq!(v["src.namespace"], "front");
    assert_eq!(v["src.identity"], "spiffe://cluster.local/ns/front/sa/web");
    assert_eq!(v["dst.addr"], "10.244.1.7:15008");
    assert_eq!(v["dst.hbone_addr"], "10.244.1.7:8080");
    assert_eq!(v["dst.service"], "api.back.svc.cluster.local");
    assert_eq!(v["dst.workload"], "api-1");
    assert_eq!(v["dst.namespace"], "back");
    assert_eq!(v["dst.identity"], "spiffe://cluster.local/ns/back/sa/api");
    assert_eq!(v["direction"], "outbound");
    assert_eq!(v["bytes_sent"], 67);
    assert_eq!(v["bytes_recv"], 490);
    assert_eq!(v["duration"], "2ms");
    assert!(v.get("error").is_none());
}

#[test]
fn unknown_values_are_left_out_and_errors_log_at_error() {
    let mut l = outbound();
    l.direction = "inbound";
    l.src_workload = None;
    l.src_namespace = None;
    l.src_identity = None;
    l.dst_hbone_addr = None;
    l.dst_service = Some(String::new());
    let c = Completion {
        error: Some(denial_error(
            Some("back/no-echo"),
            "matched DENY policy back/no-echo",
        )),
        bytes_sent: 0,
        bytes_recv: 0,
        ..done()
    };
    let line = logged(false, || l.complete(&c));
    assert!(line.starts_with("ERROR access: connection complete src.addr=10.244.0.5:41234 dst.addr=10.244.1.7:15008 dst.workload=\"api-1\""), "{line}");
    assert!(
        !line.contains("src.workload")
            && !line.contains("hbone_addr")
            && !line.contains("dst.service"),
        "{line}"
    );
    assert!(
        line.contains(" duration=\"2ms\" error=\"connection closed due to policy rejection: explicitly denied by: back/no-echo\" id="),
        "{line}"
    );
    let json = logged(true, || l.complete(&c));
    let v: serde_json::Value = serde_json::from_str(json.trim()).unwrap();
    assert_eq!(v["level"], "ERROR");
    assert_eq!(
        v["error"],
        "connection closed due to policy rejection: explicitly denied by: back/no-echo"
    );
    assert!(v.get("src.workload").is_none());
}

#[test]
fn opened_is_a_debug_line_with_the_same_fields() {
    let line = logged(false, || outbound().opened());
    assert!(
        line.starts_with(
            "DEBUG access: connection opened src.addr=10.244.0.5:41234 src.workload=\"web-1\""
        ),
        "{line}"
    );
    assert!(line.contains(" direction=\"outbound\" id="), "{line}");
}

/// The evaluator's own decisions, worded as Istio words them.
#[test]
fn denials_name_the_policy_as_istio_does() {
    use mesh_authz::{Action, ConnectionInfo, Decision, Match, Policy, PolicyScope, evaluate};
    let policy = |name: &str, action| Policy {
        name: name.into(),
        namespace: "back".into(),
        scope: PolicyScope::Namespace,
        action,
        dry_run: false,
        rules: vec![vec![vec![Match {
            destination_ports: vec![9000],
            ..Default::default()
        }]]],
        problems: vec![],
    };
    let conn = ConnectionInfo {
        src_identity: None,
        src_ip: "10.0.0.1".parse().unwrap(),
        dst_ip: "10.0.0.2".parse().unwrap(),
        dst_port: 9000,
    };
    let error = |d: Decision| match d {
        Decision::Deny { policy, reason } => denial_error(policy.as_deref(), &reason),
        other => panic!("{other:?}"),
    };
    let deny = [policy("no-echo", Action::Deny)];
    assert_eq!(
        error(evaluate(deny.iter(), &conn)),
        "connection closed due to policy rejection: explicitly denied by: back/no-echo"
    );
    let allow = [policy("only-9001", Action::Allow)];
    let conn = ConnectionInfo {
        dst_port: 9001,
        ..conn
    };
    assert_eq!(
        error(evaluate(allow.iter(), &conn)),
        "connection closed due to policy rejection: allow policies exist, but none allowed (checked back/only-9001)"
    );
}
