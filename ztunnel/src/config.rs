//! ztunnel's configuration: flags or environment variables, validated once at start.

use clap::Parser;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser, Debug, Clone, serde::Serialize)]
#[command(
    name = "ztunnel",
    version,
    about = "Per-node L4 proxy of the ambient mesh: captures pod traffic, carries it over HBONE (mTLS), authorizes it.",
    after_help = "Standalone (no control plane, no node agent):\n  ztunnel --node-name node-1 --local-config mesh.yaml --local-ca ./ca --pods-file pods.yaml\n\nWith the control plane and node agent (the default in a cluster):\n  ztunnel --node-name $NODE_NAME --xds-address https://mesh-control.mesh-system.svc:15012 \\\n          --root-cert /var/run/secrets/mesh/root-cert.pem --token-file /var/run/secrets/tokens/mesh-token"
)]
pub struct Config {
    /// Name of the node this ztunnel serves.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,
    #[arg(long, env = "TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,
    /// This ztunnel's own pod (reported to the control plane).
    #[arg(long, env = "POD_NAME", default_value = "ztunnel")]
    pub pod_name: String,
    #[arg(long, env = "POD_NAMESPACE", default_value = "mesh-system")]
    pub pod_namespace: String,
    #[arg(long, env = "INSTANCE_IP", default_value = "")]
    pub instance_ip: String,
    /// Network of this node (empty: the default network).
    #[arg(long, env = "NETWORK", default_value = "")]
    pub network: String,

    /// The control plane: --xds-address, --root-cert, --control-hostname, --token-file,
    /// --cluster-id (the same flags as the node agent's and the waypoint's).
    #[command(flatten)]
    #[serde(flatten)]
    pub control: mesh_xds::ControlPlaneArgs,
    /// CA address (default: the xDS address).
    #[arg(long, env = "CA_ADDRESS")]
    pub ca_address: Option<String>,
    /// Requested workload certificate lifetime.
    #[arg(long, env = "SECRET_TTL", default_value = "24h", value_parser = mesh_proto::duration::parse)]
    #[serde(with = "secs")]
    pub cert_ttl: Duration,

    /// Node agent's ZDS socket.
    #[arg(
        long,
        env = "INPOD_UDS",
        default_value = "/var/run/ztunnel/ztunnel.sock"
    )]
    pub zds_socket: PathBuf,
    /// Pods and netns paths from a file instead of the node agent.
    #[arg(long)]
    pub pods_file: Option<PathBuf>,
    /// Workloads, services and policies from a file instead of the control plane.
    #[arg(long)]
    pub local_config: Option<PathBuf>,
    /// Directory with ca-cert.pem and ca-key.pem: issue workload certificates locally.
    #[arg(long)]
    pub local_ca: Option<PathBuf>,

    #[arg(long, env = "ADMIN_ADDR", default_value = "127.0.0.1:15000")]
    pub admin_addr: SocketAddr,
    #[arg(long, env = "METRICS_ADDR", default_value = "[::]:15020")]
    pub metrics_addr: SocketAddr,
    #[arg(long, env = "READINESS_ADDR", default_value = "[::]:15021")]
    pub readiness_addr: SocketAddr,
    /// How long open connections may finish after SIGTERM or a pod's removal.
    #[arg(long, env = "CONNECTION_TERMINATION_DEADLINE", default_value = "5s", value_parser = mesh_proto::duration::parse)]
    #[serde(with = "secs")]
    pub drain_deadline: Duration,
    /// After a handover (the node agent moved new pods and connections to a newer
    /// ztunnel), how long this one keeps its open connections before draining them as
    /// SIGTERM does. Once it has seen SIGTERM (Kubernetes sends one when the new pod is
    /// ready) it exits as soon as the last one ends; before that it stays up, idle, as a
    /// container that exits is restarted and would take the node back.
    #[arg(long, env = "HANDOVER_MAX_AGE", default_value = "1h", value_parser = mesh_proto::duration::parse)]
    #[serde(with = "secs")]
    pub handover_max_age: Duration,
    /// Log format: text or json.
    #[arg(long, env = "LOG_FORMAT", default_value = "text")]
    pub log_format: String,
    /// Log filter, e.g. info or info,access=debug.
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    pub log_level: String,
    /// Data threads: each accepts on every pod listener and runs the connections it
    /// accepted, HBONE included, on a single-threaded runtime of its own (default: 2).
    #[arg(long, env = "ZTUNNEL_WORKER_THREADS", default_value_t = 2)]
    pub worker_threads: usize,
    /// Most connections each pod listener (outbound, inbound, HBONE) has open at once;
    /// past it, new connections are closed at once and the listener logs it.
    #[arg(long, env = "MAX_CONNECTIONS_PER_LISTENER", default_value_t = DEFAULT_MAX_CONNECTIONS_PER_LISTENER)]
    pub max_connections_per_listener: usize,

    /// DNS proxy on 15053 in every pod (answers the mesh's service names, forwards the
    /// rest); the node agent's DNS capture sends pods' port-53 traffic there.
    #[arg(long, env = "DNS_CAPTURE", default_value_t = true, action = clap::ArgAction::Set)]
    pub dns_proxy: bool,
    /// Where the DNS proxy finds its upstream resolvers (`nameserver` lines). Read again
    /// every 2 s: a change applies without a restart; a file that cannot be read or
    /// parsed, or names no resolver, keeps the ones in use (and is logged).
    #[arg(long, env = "DNS_RESOLV_CONF", default_value = "/etc/resolv.conf")]
    pub dns_resolv_conf: PathBuf,
    /// The cluster's DNS domain (`<svc>.<ns>.svc.<domain>`).
    #[arg(long, env = "CLUSTER_DOMAIN", default_value = "cluster.local")]
    pub cluster_domain: String,

    /// OTLP/gRPC collector for connection spans (a client span per tunnelled outbound
    /// connection, a server span per inbound tunnel), e.g. http://otel-collector:4317;
    /// no tracing when unset.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", value_parser = OtlpEndpoint::parse)]
    pub otlp_endpoint: Option<OtlpEndpoint>,
}

/// Where spans are exported: an `http://` or `https://` URL with a host (the OTLP/gRPC
/// port is usually 4317).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(transparent)]
pub struct OtlpEndpoint(String);

impl OtlpEndpoint {
    pub fn parse(s: &str) -> Result<OtlpEndpoint, String> {
        let uri: http::Uri = s
            .trim()
            .parse()
            .map_err(|e| format!("{s:?} is not a URL like http://otel-collector:4317: {e}"))?;
        match (uri.scheme_str(), uri.host()) {
            (Some("http" | "https"), Some(h)) if !h.is_empty() => {
                Ok(OtlpEndpoint(s.trim().to_string()))
            }
            _ => Err(format!(
                "{s:?} is not an http:// or https:// URL with a host, like http://otel-collector:4317"
            )),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

pub const DEFAULT_MAX_CONNECTIONS_PER_LISTENER: usize = 16_384;
/// Above this a cap protects nothing (each connection holds at least one descriptor).
pub const MAX_CONNECTIONS_PER_LISTENER: usize = 1 << 20;

mod secs {
    pub fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{}s", d.as_secs_f64()))
    }
}

impl Config {
    /// Checks that the options form one coherent mode.
    pub fn validate(&self) -> Result<(), String> {
        if self.node_name.is_empty() {
            return Err("--node-name (NODE_NAME) is required".into());
        }
        mesh_identity::SpiffeId::new(&self.trust_domain, "x", "x")
            .map_err(|e| format!("--trust-domain: {e}"))?;
        match (&self.control.xds_address, &self.local_config) {
            (Some(_), Some(_)) => {
                return Err(
                    "use either --xds-address (control plane) or --local-config, not both".into(),
                );
            }
            (None, None) => {
                return Err("no configuration source: give --xds-address or --local-config".into());
            }
            _ => {}
        }
        if self.local_ca.is_none()
            && self.control.xds_address.is_none()
            && self.ca_address.is_none()
        {
            return Err(
                "no certificate source: give --local-ca, --ca-address or --xds-address".into(),
            );
        }
        if (self.control.xds_address.is_some() || self.ca_address.is_some())
            && self.control.root_cert.is_none()
        {
            return Err("--root-cert (XDS_ROOT_CA) is required to verify the control plane".into());
        }
        if !matches!(self.log_format.as_str(), "text" | "json") {
            return Err(format!(
                "--log-format must be text or json, not {:?}",
                self.log_format
            ));
        }
        if self.cluster_domain.trim_matches('.').is_empty()
            || !self
                .cluster_domain
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        {
            return Err(format!(
                "--cluster-domain must be a DNS domain like cluster.local, not {:?}",
                self.cluster_domain
            ));
        }
        if self.worker_threads == 0 {
            return Err("--worker-threads must be at least 1".into());
        }
        if !(1..=MAX_CONNECTIONS_PER_LISTENER).contains(&self.max_connections_per_listener) {
            return Err(format!(
                "--max-connections-per-listener must be between 1 and {MAX_CONNECTIONS_PER_LISTENER}, not {}",
                self.max_connections_per_listener
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_otlp_endpoint_is_an_http_url_and_off_by_default() {
        assert_eq!(
            OtlpEndpoint::parse("http://otel-collector:4317")
                .unwrap()
                .as_str(),
            "http://otel-collector:4317"
        );
        assert!(OtlpEndpoint::parse("https://10.0.0.1:4317").is_ok());
        for bad in ["otel-collector:4317", "grpc://c:4317", "http://", ""] {
            assert!(OtlpEndpoint::parse(bad).is_err(), "{bad}");
        }
        let base = [
            "ztunnel",
            "--node-name",
            "n",
            "--local-config",
            "c",
            "--local-ca",
            "ca",
        ];
        assert_eq!(Config::try_parse_from(base).unwrap().otlp_endpoint, None);
        let mut on = base.to_vec();
        on.extend(["--otlp-endpoint", "http://127.0.0.1:4317"]);
        let cfg = Config::try_parse_from(on).unwrap();
        assert!(
            serde_json::to_string(&cfg)
                .unwrap()
                .contains(r#""otlp_endpoint":"http://127.0.0.1:4317""#),
            "printed at start"
        );
    }

    fn parse(args: &[&str]) -> Config {
        Config::try_parse_from(std::iter::once("ztunnel").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn modes_are_validated() {
        let ok = parse(&[
            "--node-name",
            "n",
            "--local-config",
            "x.yaml",
            "--local-ca",
            "ca",
        ]);
        ok.validate().unwrap();
        let none = parse(&["--node-name", "n"]);
        assert!(
            none.validate()
                .unwrap_err()
                .contains("no configuration source")
        );
        let both = parse(&[
            "--node-name",
            "n",
            "--local-config",
            "x",
            "--xds-address",
            "https://a:1",
            "--root-cert",
            "r",
        ]);
        assert!(both.validate().unwrap_err().contains("not both"));
        let no_root = parse(&["--node-name", "n", "--xds-address", "https://a:1"]);
        assert!(no_root.validate().unwrap_err().contains("--root-cert"));
        let bad_td = parse(&[
            "--node-name",
            "n",
            "--local-config",
            "x",
            "--local-ca",
            "c",
            "--trust-domain",
            "Bad/TD",
        ]);
        assert!(bad_td.validate().is_err());
    }

    #[test]
    fn connection_cap_is_validated() {
        let base = ["--node-name", "n", "--local-config", "x", "--local-ca", "c"];
        let with = |v: &str| {
            let mut args = base.to_vec();
            args.extend(["--max-connections-per-listener", v]);
            parse(&args)
        };
        assert_eq!(
            parse(&base).max_connections_per_listener,
            DEFAULT_MAX_CONNECTIONS_PER_LISTENER
        );
        with("100").validate().unwrap();
        assert!(
            with("0")
                .validate()
                .unwrap_err()
                .contains("--max-connections-per-listener")
        );
        assert!(with("2000000").validate().is_err());
        assert!(
            Config::try_parse_from(
                ["ztunnel"]
                    .into_iter()
                    .chain(base)
                    .chain(["--max-connections-per-listener", "-1"])
            )
            .is_err()
        );
    }
}
