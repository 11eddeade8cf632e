//! What the observability lab tests share: an app behind a waypoint, headless Chromium in
//! node 1's namespace (where Prometheus and the dashboards listen), and the lab's own
//! dashboard and trace receiver (`up --observe`).

use crate::manifests::*;
use crate::testlab::TestLab;
use serde_json::Value;

/// back/api's Service: HTTP on port 80, TCP echo on 9000.
pub const API_SERVICE: &str = "apiVersion: v1
kind: Service
metadata: {name: api, namespace: back}
spec:
  selector: {app: api}
  clusterIP: 10.96.0.20
  ports: [{name: http, port: 80, targetPort: http}, {name: tcp-legacy, port: 9000, targetPort: 9000}]
";

/// front/client → Service back/api (10.96.0.20) through the waypoint of `back`.
pub fn app_behind_waypoint(t: &mut TestLab) {
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
}

/// Headless Chromium in node 1's namespace, a fresh profile each run, nothing fetched
/// but the page: `args` then the URL; its standard output.
pub fn chromium(t: &TestLab, profile: &std::path::Path, args: &[&str], url: &str) -> String {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &t.lab.node_ns(1), "chromium"])
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            // Scripts' fetches and timers run before the DOM is dumped.
            "--virtual-time-budget=10000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(url)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The lab dashboard's page address (node 1's loopback).
pub fn lab_dashboard_url() -> String {
    format!("http://{}/", mesh_lab::traces::DASHBOARD_LISTEN)
}

/// A JSON answer of the lab's dashboard (`/api/traces`, ...); Null when it has none.
pub fn lab_dashboard_api(t: &TestLab, path: &str) -> Value {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &t.lab.node_ns(1)])
        .args(["curl", "-s", "--max-time", "10"])
        .arg(format!(
            "{}{}",
            lab_dashboard_url(),
            path.trim_start_matches('/')
        ))
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

/// Where a test's screenshot goes: beside the workspace's binaries.
pub fn screenshot_path(name: &str) -> std::path::PathBuf {
    let png = crate::binary("meshctl")
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join(name);
    let _ = std::fs::remove_file(&png);
    png
}
