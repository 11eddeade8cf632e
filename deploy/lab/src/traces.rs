//! Traces in the lab (`up --observe`): the lab runs `meshctl dashboard --otlp-listen`
//! in node 1's namespace beside Prometheus, and every ztunnel and waypoint it starts
//! exports its spans there (`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`), so an exporter always
//! has a receiver. `mesh-lab dashboard` forwards a local port to this dashboard.

use std::path::Path;

/// The standard OTLP/gRPC port, on node 1's fabric address (reachable from every node
/// and pod).
pub const RECEIVER_PORT: u16 = 4317;
/// Where the lab's dashboard serves its page, on node 1's loopback; `mesh-lab dashboard`
/// forwards the same port on the machine's loopback to it (the dashboard serves only
/// requests naming its own port in `Host`).
pub const DASHBOARD_LISTEN: &str = "127.0.0.1:15080";
/// The variable the ztunnel and the waypoint read their OTLP endpoint from.
pub const ENDPOINT_ENV: &str = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT";

/// The receiver's OTLP endpoint, given node 1's address.
pub fn endpoint(node1_ip: &str) -> String {
    format!("http://{node1_ip}:{RECEIVER_PORT}")
}

/// Whether a process the lab starts as `role` running `program` exports traces: the
/// ztunnels and the waypoints.
pub fn exports_traces(role: &str, program: &str) -> bool {
    role.starts_with("ztunnel-") || Path::new(program).file_name() == Some("waypoint".as_ref())
}

/// Whether a process's environment (`/proc/PID/environ`) names the OTLP endpoint.
pub fn has_endpoint(environ: &[u8]) -> bool {
    environ
        .split(|b| *b == 0)
        .any(|kv| kv.starts_with(format!("{ENDPOINT_ENV}=").as_bytes()))
}

/// The lab's dashboard and trace receiver: `meshctl` at `meshctl`.
pub fn dashboard_command(meshctl: &str, node1_ip: &str) -> Vec<String> {
    [
        meshctl,
        "dashboard",
        "--listen",
        DASHBOARD_LISTEN,
        "--otlp-listen",
        &format!("{node1_ip}:{RECEIVER_PORT}"),
    ]
    .map(String::from)
    .to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ztunnels_and_waypoints_export_to_node_1() {
        assert!(exports_traces("ztunnel-2", "/bin/ztunnel"));
        assert!(exports_traces(
            "pod:back/waypoint",
            "/x/target/debug/waypoint"
        ));
        assert!(!exports_traces("pod:back/api", "/x/mesh-lab"));
        assert!(!exports_traces("agent-1", "/x/mesh-cni"));
        assert!(!exports_traces("control", "/x/mesh-control"));
        assert!(!exports_traces("prometheus", "/usr/bin/prometheus"));
        assert_eq!(endpoint("10.100.0.11"), "http://10.100.0.11:4317");
        let cmd = dashboard_command("/b/meshctl", "10.100.0.11");
        assert_eq!(cmd[4..], ["--otlp-listen", "10.100.0.11:4317"]);
    }

    #[test]
    fn the_endpoint_is_found_in_an_environment() {
        assert!(has_endpoint(
            b"PATH=/bin\0OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=http://10.100.0.11:4317\0"
        ));
        assert!(!has_endpoint(b"PATH=/bin\0MESH_LAB_DIR=/x\0"));
        assert!(!has_endpoint(b"X_OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=y\0"));
    }
}
