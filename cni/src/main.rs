//! `mesh-cni`: invoked by the container runtime as a CNI plugin (CNI_COMMAND set), or run
//! as the node agent with `mesh-cni agent`.

use clap::Parser;
use mesh_cni::agent::local::{PeerPolicy, parse_uid};
use mesh_cni::agent::{Agent, AgentConfig, ViewHandler};
use mesh_cni::events::{FallbackAgent, SocketAgent};
use mesh_cni::plugin;
use std::collections::HashMap;
use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// The node agent of the mesh: programs in-pod redirection for enrolled pods and hands
/// their network namespaces to ztunnel.
#[derive(Parser, Debug, serde::Serialize)]
#[command(name = "mesh-cni agent", version)]
#[command(mut_arg("xds_address", |a| a.required(true)))]
#[command(mut_arg("root_cert", |a| a.required(true)))]
#[command(mut_arg("token_file", |a| a.required(true)))]
struct AgentArgs {
    #[arg(long, env = "NODE_NAME")]
    node_name: String,
    /// The control plane: --xds-address, --root-cert, --token-file (required here),
    /// --control-hostname, --cluster-id; the same flags as ztunnel's and the waypoint's.
    #[command(flatten)]
    #[serde(flatten)]
    control: mesh_xds::ControlPlaneArgs,
    #[arg(long, default_value = "/var/run/ztunnel/ztunnel.sock")]
    zds_socket: PathBuf,
    #[arg(long, default_value = plugin::DEFAULT_AGENT_SOCKET)]
    agent_socket: PathBuf,
    /// Capture DNS (UDP/TCP 53) to ztunnel for enrolled pods (on by default, as Istio
    /// ambient since 1.25; `--dns-capture=false` turns it off, a pod's
    /// `ambient.istio.io/dns-capture` annotation decides for that pod).
    #[arg(long, env = "AMBIENT_DNS_CAPTURE", default_value_t = true,
        action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    dns_capture: bool,
    /// SNAT kubelet probes to enrolled pods to 169.254.7.127 (node side).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    host_probe_snat: bool,
    /// procfs to scan for running pods' processes ("" to disable: pods are then known
    /// only from the plugin's ADD).
    #[arg(long, default_value = "/proc")]
    proc_dir: String,
    /// Only processes whose cgroup path (as /proc/PID/cgroup shows it) is under this root
    /// are taken as pods' ("" or "/": anywhere). Pods are recognised by the kubelet's pod
    /// cgroups (systemd or cgroupfs driver) below it.
    #[arg(long, default_value = "")]
    cgroup_root: String,
    /// The uid a plugin connecting to --agent-socket must have (SO_PEERCRED).
    #[arg(long, default_value = "0", value_parser = parse_uid)]
    plugin_peer_uid: u32,
    /// The uid ztunnel connecting to --zds-socket must have (SO_PEERCRED).
    #[arg(long, default_value = "0", value_parser = parse_uid)]
    zds_peer_uid: u32,
    /// When set, the process connecting to --zds-socket must be running this executable
    /// (the same file); it must be in a PID namespace the agent can see.
    #[arg(long)]
    zds_peer_exe: Option<PathBuf>,
    /// Readiness: GET /readyz answers 200 once the control plane's view arrived; also
    /// GET /metrics and GET /enrolment (`meshctl enrolment` reads it).
    #[arg(long, default_value = "127.0.0.1:8000")]
    readiness_addr: SocketAddr,
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    log_level: String,
}

/// Installs the chained plugin on this node and keeps it installed: copies the binary
/// into the CNI bin directory and appends our entry to the primary CNI's conflist,
/// re-applying it whenever the primary CNI rewrites the file. Stopping leaves both in
/// place (an upgrade must not open a window without redirection); `--uninstall` removes
/// them.
#[derive(Parser, Debug, serde::Serialize)]
#[command(name = "mesh-cni install", version)]
struct InstallArgs {
    /// The host's CNI config directory.
    #[arg(long, env = "CNI_NET_DIR", default_value = "/etc/cni/net.d")]
    cni_net_dir: PathBuf,
    /// The host's CNI plugin directory.
    #[arg(long, env = "CNI_BIN_DIR", default_value = "/opt/cni/bin")]
    cni_bin_dir: PathBuf,
    /// The node agent's socket, written into our conflist entry.
    #[arg(long, default_value = plugin::DEFAULT_AGENT_SOCKET)]
    agent_socket: String,
    /// How often the conflist is checked (milliseconds).
    #[arg(long, default_value_t = 1000)]
    interval_ms: u64,
    /// Install once and exit.
    #[arg(long)]
    once: bool,
    /// Remove our conflist entries and the binary, then exit.
    #[arg(long, conflicts_with = "once")]
    uninstall: bool,
    /// This installer's DaemonSet (`namespace/name`). On SIGTERM the installer asks the
    /// API server about it: gone or being deleted means the mesh is being removed, so
    /// the entry and binary are removed; otherwise (an upgrade) they stay.
    #[arg(long, env = "MESH_CNI_DAEMONSET")]
    daemonset: Option<String>,
    /// With --daemonset: this kubeconfig instead of the in-cluster service account.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    log_level: String,
}

fn run_install(args: Vec<String>) -> i32 {
    use mesh_cni::install;
    let a = InstallArgs::parse_from(args);
    init_logging(&a.log_level);
    tracing::info!(config = %serde_json::to_string(&a).unwrap_or_default(), "starting the installer");
    if a.uninstall {
        let problems = install::uninstall(&a.cni_net_dir, &a.cni_bin_dir);
        for p in &problems {
            tracing::error!("{p}");
        }
        return if problems.is_empty() { 0 } else { 1 };
    }
    let exe = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => {
            tracing::error!("cannot find this program's binary: {e}");
            return 1;
        }
    };
    match install::install_binary(&exe, &a.cni_bin_dir) {
        Ok(true) => tracing::info!(dir = %a.cni_bin_dir.display(), "plugin binary installed"),
        Ok(false) => {}
        Err(e) => {
            tracing::error!(dir = %a.cni_bin_dir.display(), "cannot install the plugin binary: {e}");
            return 1;
        }
    }
    if a.once {
        return match install::reconcile(&a.cni_net_dir, &a.agent_socket) {
            Ok(changed) => {
                if let Some(file) = changed {
                    tracing::info!(file = %file.display(), "chained mesh-cni into the primary CNI config");
                }
                0
            }
            Err(e) => {
                tracing::error!("{e}");
                1
            }
        };
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(keep_installed(a))
}

/// Re-applies the entry every interval until SIGTERM/SIGINT, then decides whether this is
/// an upgrade (keep) or the mesh going away (uninstall).
async fn keep_installed(a: InstallArgs) -> i32 {
    use mesh_cni::install::{self, OnStop};
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return 1;
    };
    let mut last_problem = None;
    loop {
        match install::reconcile(&a.cni_net_dir, &a.agent_socket) {
            Ok(changed) => {
                if let Some(file) = changed {
                    tracing::info!(file = %file.display(), "chained mesh-cni into the primary CNI config");
                }
                last_problem = None;
            }
            // Reported once per distinct problem, not every interval.
            Err(e) => {
                if last_problem.as_ref() != Some(&e) {
                    tracing::warn!("{e}");
                    last_problem = Some(e);
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(a.interval_ms.max(50))) => {}
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    let Some(ds) = &a.daemonset else {
        tracing::info!(
            "stopping; the entry and binary stay (no --daemonset to tell an uninstall from an upgrade)"
        );
        return 0;
    };
    let state = match ds.split_once('/') {
        None => Err(format!("--daemonset {ds} is not namespace/name")),
        Some((ns, name)) => match install::kube_client(a.kubeconfig.as_deref()).await {
            Ok(client) => {
                let ask = || {
                    let client = client.clone();
                    async move {
                        tokio::time::timeout(
                            install::STOP_ASK_TIMEOUT,
                            install::daemonset_state(client, ns, name),
                        )
                        .await
                        .unwrap_or_else(|_| {
                            Err(format!(
                                "the API server did not answer within {:?}",
                                install::STOP_ASK_TIMEOUT
                            ))
                        })
                    }
                };
                install::settled_state(ask, install::ACCESS_RECHECKS, install::ACCESS_RECHECK_GAP)
                    .await
            }
            Err(e) => Err(e),
        },
    };
    match install::on_stop(ds, state) {
        OnStop::Keep(why) => {
            tracing::info!("stopping; the entry and binary stay: {why}");
            0
        }
        OnStop::Uninstall(why) => {
            tracing::info!("stopping and uninstalling: {why}");
            let problems = install::uninstall(&a.cni_net_dir, &a.cni_bin_dir);
            for p in &problems {
                tracing::error!("{p}");
            }
            i32::from(!problems.is_empty())
        }
    }
}

fn run_plugin() -> i32 {
    let vars: HashMap<String, String> = std::env::vars().collect();
    let mut stdin = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut stdin);
    let version = serde_json::from_slice::<serde_json::Value>(&stdin)
        .ok()
        .and_then(|v| v["cniVersion"].as_str().map(str::to_string))
        .filter(|v| plugin::SUPPORTED_VERSIONS.contains(&v.as_str()))
        .unwrap_or_else(|| "1.0.0".into());
    let result = plugin::Env::from_vars(&vars).and_then(|env| {
        plugin::run(
            &env,
            &stdin,
            &FallbackAgent {
                agent: SocketAgent {
                    timeout: Duration::from_secs(15),
                },
                cache: None,
            },
        )
    });
    match result {
        Ok(out) => {
            print!("{out}");
            0
        }
        Err(e) => {
            print!("{}", e.to_json(&version));
            1
        }
    }
}

fn init_logging(level: &str) {
    mesh_log::init_or_exit("mesh-cni", level, mesh_log::Format::Text);
}

fn run_agent(args: Vec<String>) -> i32 {
    let a = AgentArgs::parse_from(args);
    init_logging(&a.log_level);
    tracing::info!(config = %serde_json::to_string(&a).unwrap_or_default(), "starting the node agent");
    let cp = match a.control.control_plane() {
        Ok(cp) => cp,
        Err(e) => {
            eprintln!("mesh-cni agent: {e}");
            return 2;
        }
    };
    let cfg = AgentConfig {
        node_name: a.node_name.clone(),
        zds_socket: a.zds_socket.clone(),
        agent_socket: a.agent_socket.clone(),
        dns_capture: a.dns_capture,
        host_probe_snat: a.host_probe_snat,
        proc_dir: Some(a.proc_dir.clone())
            .filter(|p| !p.is_empty())
            .map(PathBuf::from),
        cgroup_root: a.cgroup_root.clone(),
        plugin_peer: PeerPolicy {
            uid: a.plugin_peer_uid,
            exe: None,
        },
        zds_peer: PeerPolicy {
            uid: a.zds_peer_uid,
            exe: a.zds_peer_exe.clone(),
        },
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(async move {
        let agent = match Agent::start(cfg) {
            Ok(a) => a,
            Err(e) => {
                tracing::error!("node agent failed to start: {e}");
                return 1;
            }
        };
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let node = mesh_proto::envoy_core::Node {
            id: format!("cni-agent~{}", a.node_name),
            user_agent_name: "mesh-cni".into(),
            ..Default::default()
        };
        tokio::spawn(mesh_xds::run(
            cp,
            node,
            mesh_cni::agent::view_types(),
            ViewHandler {
                tx,
                connected: agent.xds_connected(),
            },
        ));
        let a2 = agent.clone();
        tokio::spawn(async move {
            while let Some(updates) = rx.recv().await {
                a2.apply_view(updates).await;
            }
        });
        let a3 = agent.clone();
        tokio::spawn(async move {
            if let Err(e) = a3.serve_plugin().await {
                tracing::error!("plugin socket: {e}");
                std::process::exit(1);
            }
        });
        tokio::spawn(agent.clone().resync_loop());
        tokio::spawn(readiness(a.readiness_addr, agent.clone()));
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("signals");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        // Pod redirection stays in place: enrolled pods stay protected while we are away.
        tracing::info!("node agent stopping; pod redirection is left in place");
        0
    })
}

/// `GET /readyz`, `GET /metrics` and `GET /enrolment` (see `mesh_cni::agent::http`).
async fn readiness(addr: SocketAddr, agent: std::sync::Arc<Agent>) {
    if let Err(e) = mesh_cni::agent::http::serve(addr, agent).await {
        // Never ready in the kubelet's eyes and nobody told why: exit, so it shows.
        tracing::error!("cannot serve /readyz and /metrics: {e}");
        std::process::exit(1);
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let sub = args.get(1).cloned().unwrap_or_default();
    let code = if sub == "agent" || sub == "install" {
        let mut rest = vec![format!("mesh-cni {sub}")];
        rest.extend(args.into_iter().skip(2));
        if sub == "agent" {
            run_agent(rest)
        } else {
            run_install(rest)
        }
    } else if std::env::var_os("CNI_COMMAND").is_some() {
        run_plugin()
    } else {
        eprintln!(
            "mesh-cni: a chained CNI plugin (run by the container runtime with CNI_COMMAND set)\n\
             the node agent: `mesh-cni agent --help`, or its installer: `mesh-cni install --help`"
        );
        2
    };
    std::process::exit(code);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dns_capture(extra: &[&str]) -> bool {
        let mut args = vec![
            "mesh-cni agent",
            "--node-name=n",
            "--xds-address=https://cp:15012",
            "--root-cert=/r.pem",
            "--token-file=/t",
        ];
        args.extend_from_slice(extra);
        AgentArgs::try_parse_from(args).unwrap().dns_capture
    }

    #[test]
    fn dns_capture_is_on_unless_turned_off() {
        // The environment would override the default under test.
        assert!(std::env::var_os("AMBIENT_DNS_CAPTURE").is_none());
        assert!(dns_capture(&[]), "on by default");
        assert!(
            dns_capture(&["--dns-capture"]),
            "the flag alone still means on"
        );
        assert!(dns_capture(&["--dns-capture=true"]));
        assert!(!dns_capture(&["--dns-capture=false"]));
    }

    #[test]
    fn the_control_plane_flags_stay_required() {
        let all = [
            "--node-name=n",
            "--xds-address=https://cp:15012",
            "--root-cert=/r.pem",
            "--token-file=/t",
        ];
        let a = AgentArgs::try_parse_from(std::iter::once("mesh-cni agent").chain(all)).unwrap();
        assert_eq!(a.control.xds_address.as_deref(), Some("https://cp:15012"));
        assert_eq!(a.control.cluster_id, "Kubernetes");
        for missing in &all[1..] {
            let args = all.iter().filter(|a| *a != missing);
            let e = AgentArgs::try_parse_from(std::iter::once(&"mesh-cni agent").chain(args))
                .unwrap_err();
            assert_eq!(
                e.kind(),
                clap::error::ErrorKind::MissingRequiredArgument,
                "{missing}"
            );
        }
    }
}
