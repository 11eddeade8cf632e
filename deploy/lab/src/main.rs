use clap::{Parser, Subcommand};
use mesh_lab::lab::{DEFAULT_ROOT, Lab};
use std::path::PathBuf;

/// A real multi-node mesh cluster on one machine, built from network namespaces.
#[derive(Parser)]
#[command(name = "mesh-lab", version)]
struct Cli {
    /// Lab name: prefixes everything it creates, so several labs can coexist.
    #[arg(long, global = true, env = "MESH_LAB", default_value = "lab")]
    name: String,
    /// Where labs keep their state, manifests and logs.
    #[arg(long, global = true, default_value = DEFAULT_ROOT)]
    state_root: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the cluster (idempotent).
    Up {
        #[arg(long, default_value_t = 2)]
        nodes: usize,
        /// Also run Prometheus (Debian's package) in node 1's namespace on 127.0.0.1:9090,
        /// scraping every ztunnel, waypoint, node agent and mesh-control, and the dashboard
        /// with its OTLP trace receiver (node 1's address, port 4317), which every ztunnel
        /// and waypoint exports to.
        #[arg(long)]
        observe: bool,
        /// Give every pod an IPv6 address beside its IPv4 one (fd00:10:244:<node>::/64).
        #[arg(long)]
        dual_stack: bool,
        /// The pods' address family: ipv4 (the default), dual (as --dual-stack) or ipv6
        /// (an IPv6 address only, fd00:10:244:<node>::/64; Services get IPv6 VIPs).
        #[arg(long, value_name = "ipv4|ipv6|dual")]
        ip_family: Option<String>,
    },
    /// Remove everything the lab made (also after a crash).
    Down,
    /// Nodes, components and pods.
    Status,
    /// Apply a manifest file (namespaces, pods, services, policies, gateways...).
    Apply {
        #[arg(short = 'f', long)]
        file: PathBuf,
    },
    /// Delete a pod (namespace/name).
    Delete { pod: String },
    /// Run a command inside a pod: mesh-lab exec shop/web -- curl -s http://10.96.0.10/
    Exec {
        pod: String,
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
    /// Print a component's log (control, ztunnel-N, agent-N, pod:NS/NAME).
    Logs { component: String },
    /// Stop a component (ztunnel-N, agent-N, control), with SIGKILL if --kill.
    Stop {
        component: String,
        #[arg(long)]
        kill: bool,
    },
    /// Start a node's stopped ztunnel or agent again.
    Start { component: String },
    /// Upgrade a node's ztunnel without a reset: a new one (from --binary, or the lab's)
    /// starts beside the running one on the other port set and takes every new
    /// connection once ready; the old one, now ztunnel-N-old, is sent SIGTERM (as the
    /// DaemonSet controller does), keeps its established connections and exits when
    /// they end. agent-N: the node agent restarted from the
    /// new binary (traffic never passes through it).
    Upgrade {
        /// ztunnel-N or agent-N
        component: String,
        /// The new binary (default: the one next to mesh-lab).
        #[arg(long)]
        binary: Option<PathBuf>,
    },
    /// Reboot a node: every process on it killed (SIGKILL), its runtime state (sockets,
    /// the agent's cache, pod network namespaces) removed, then its components and pods
    /// back as a kubelet brings them, each pod's sandbox recreated through the CNI chain.
    Reboot {
        /// node-N
        node: String,
        /// The order the node's agent, ztunnel and pods come back in (pods may come
        /// before the agent: their sandboxes are retried until ADD succeeds).
        #[arg(long, default_value = "agent,ztunnel,pods")]
        order: mesh_lab::reboot::BootOrder,
        /// When each pod's lost sandbox is released (CNI DEL): before its new one is
        /// made, or after the node's pods are back (as a kubelet does after a reboot).
        #[arg(long, default_value = "before")]
        release: mesh_lab::reboot::Release,
    },
    /// Roll out a waypoint as a Deployment with maxSurge 1, maxUnavailable 0 does: the
    /// new pod gets traffic once ready, the old one leaves the endpoints, then drains and
    /// exits (`rollout waypoint back/waypoint`).
    Rollout {
        /// What to roll out: `waypoint`.
        #[arg(value_parser = ["waypoint"])]
        kind: String,
        /// The waypoint's Gateway (namespace/name).
        gateway: String,
        /// The new pod's waypoint binary (default: the one the old pod runs).
        #[arg(long)]
        binary: Option<PathBuf>,
        /// Send the old pod SIGTERM as it leaves the endpoints, as Kubernetes does (its
        /// drain delay covers the ztunnels that still send to it), rather than once every
        /// ztunnel has dropped it.
        #[arg(long)]
        k8s_order: bool,
    },
    /// Run meshctl against the lab's control plane.
    Meshctl {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The service graph and request journeys in your browser: forwards 127.0.0.1:15080
    /// here to the dashboard `up --observe` runs in node 1's namespace (beside Prometheus,
    /// with the trace receiver every ztunnel and waypoint exports to).
    Dashboard,
    /// The guided demo: plaintext, then the same traffic over the mesh.
    Demo {
        /// Leave the lab up at the end.
        #[arg(long)]
        keep: bool,
        /// Run Prometheus too and end with the golden metrics it collected.
        #[arg(long)]
        observe: bool,
    },
    /// Measure direct vs mesh vs mesh + waypoint (and HAProxy) on a fresh 2-node lab:
    /// throughput, req/s, latency at a fixed rate, connections/s, CPU, memory, scale.
    Bench {
        /// Repeat the whole set; medians and min–max are reported.
        #[arg(long, default_value_t = 1)]
        runs: usize,
        /// Seconds per measurement.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Idle tunnelled connections to hold for the memory-per-connection figures.
        #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
        scale: Vec<usize>,
        /// Seconds to wait after the load before reading "RSS after".
        #[arg(long, default_value_t = 10)]
        settle: u64,
        /// Short measurements to check the bench itself works (figures not meaningful).
        #[arg(long)]
        quick: bool,
        /// Where to write every figure as JSON.
        #[arg(long, default_value = "mesh-lab-bench.json")]
        out: PathBuf,
        /// Leave the lab up at the end.
        #[arg(long)]
        keep: bool,
        /// Also measure another ztunnel build in the same run, alternating with the lab's
        /// (repeatable; the n-th pairs with the n-th --waypoint).
        #[arg(long, value_name = "PATH", alias = "compare-ztunnel")]
        ztunnel: Vec<PathBuf>,
        /// Also measure another waypoint build in the same run (repeatable).
        #[arg(long, value_name = "PATH", alias = "compare-waypoint")]
        waypoint: Vec<PathBuf>,
        /// Record a CPU profile (perf record -g) of the ztunnels (mesh path) and the
        /// waypoint (waypoint path) under each load into DIR/<load>-<binary>.perf.data
        /// (`make profile` draws them as flame graphs). Figures taken while profiling are
        /// slowed by it.
        #[arg(long, value_name = "DIR")]
        profile: Option<PathBuf>,
    },
    /// Holds N connections open (run inside a pod by the bench).
    #[command(hide = true)]
    BenchHold {
        #[arg(long)]
        to: std::net::SocketAddr,
        #[arg(long)]
        count: usize,
    },
    /// New connections per second against an HTTP server (run inside a pod by the bench).
    #[command(hide = true)]
    BenchConnect {
        #[arg(long)]
        to: std::net::SocketAddr,
        #[arg(long)]
        path: String,
        #[arg(long)]
        seconds: u64,
    },
    /// The sample app (run inside pods by the lab).
    App {
        #[arg(long, default_value = "app")]
        name: String,
        #[arg(long)]
        http: Option<u16>,
        #[arg(long)]
        tcp_echo: Option<u16>,
        /// gRPC echo (mesh.echo.v1.Echo).
        #[arg(long)]
        grpc: Option<u16>,
    },
}

fn run(cli: Cli) -> Result<i32, String> {
    if let Cmd::App {
        name,
        http,
        tcp_echo,
        grpc,
    } = cli.cmd
    {
        let rt = tokio::runtime::Runtime::new().map_err(|e| e.to_string())?;
        rt.block_on(mesh_lab::app::run(mesh_lab::app::AppConfig {
            name,
            http_port: http,
            tcp_echo_port: tcp_echo,
            grpc_port: grpc,
        }))
        .map_err(|e| e.to_string())?;
        return Ok(0);
    }
    if let Cmd::BenchHold { to, count } = cli.cmd {
        mesh_lab::bench::hold_connections(to, count)?;
        return Ok(0);
    }
    if let Cmd::BenchConnect { to, path, seconds } = &cli.cmd {
        mesh_lab::bench::connect_loop(*to, path, *seconds)?;
        return Ok(0);
    }
    let mut lab = Lab::open(&cli.name, &cli.state_root)?;
    match cli.cmd {
        Cmd::Up {
            nodes,
            observe,
            dual_stack,
            ip_family,
        } => {
            let was_up = lab.is_up();
            let family =
                mesh_lab::ip_family::IpFamily::from_args(ip_family.as_deref(), dual_stack)?;
            lab.up_family(nodes, family, observe)?;
            println!(
                "{}",
                if was_up {
                    "lab is already up"
                } else {
                    "lab is up"
                }
            );
            print!("{}", lab.status());
        }
        Cmd::Down => {
            lab.down()?;
            println!("lab {} removed", cli.name);
        }
        Cmd::Status => print!("{}", lab.status()),
        Cmd::Apply { file } => {
            let text =
                std::fs::read_to_string(&file).map_err(|e| format!("{}: {e}", file.display()))?;
            for line in lab.apply(&text, &file.to_string_lossy())? {
                println!("{line}");
            }
        }
        Cmd::Delete { pod } => {
            lab.delete_pod(&pod)?;
            println!("pod {pod} deleted");
        }
        Cmd::Exec { pod, cmd } => return lab.exec(&pod, &cmd),
        Cmd::Logs { component } => {
            let path = lab.log_path(&component)?;
            print!(
                "{}",
                std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?
            );
        }
        Cmd::Stop { component, kill } => {
            lab.stop(&component, kill)?;
            println!("{component} stopped");
        }
        Cmd::Start { component } => {
            match component.split_once('-') {
                Some(("ztunnel", n)) => lab.start_ztunnel(n.parse().map_err(|_| "ztunnel-N")?)?,
                Some(("agent", n)) => lab.start_agent(n.parse().map_err(|_| "agent-N")?)?,
                _ if component == "control" => lab.start_control()?,
                _ if component == "prometheus" => lab.start_prometheus()?,
                _ if component == "dashboard" => lab.start_trace_receiver()?,
                _ => {
                    return Err(format!(
                        "cannot start {component}: give control, prometheus, dashboard, ztunnel-N or agent-N"
                    ));
                }
            }
            println!("{component} started");
        }
        Cmd::Reboot {
            node,
            order,
            release,
        } => {
            let n = mesh_lab::reboot::parse_node(&node, lab.state.nodes)?;
            let report = lab.reboot_with(n, order, release, &mut |_, _| Ok(()))?;
            for e in &report.events {
                println!("{e}");
            }
            if !report.not_started.is_empty() {
                return Err(format!(
                    "node-{n} is back, but these pods did not start: {}",
                    report.not_started.join(", ")
                ));
            }
            println!("node-{n} rebooted");
        }
        Cmd::Rollout {
            kind: _,
            gateway,
            binary,
            k8s_order,
        } => {
            let (ns, name) = gateway
                .split_once('/')
                .ok_or("give the waypoint's Gateway as namespace/name")?;
            let order = if k8s_order {
                mesh_lab::rollout::Order::Kubernetes
            } else {
                mesh_lab::rollout::Order::EndpointsFirst
            };
            let report =
                lab.rollout_waypoint(ns, name, binary.as_deref(), order, &mut |e| println!("{e}"))?;
            println!("waypoint {gateway} rolled out to pod {}", report.new_pod);
        }
        Cmd::Upgrade { component, binary } => {
            println!(
                "{}",
                mesh_lab::upgrade::run(&mut lab, &component, binary.as_deref())?
            );
        }
        Cmd::Meshctl { args } => {
            let mut cmd = vec![lab.bin_dir.join("meshctl").to_string_lossy().into_owned()];
            cmd.extend(args);
            let status = std::process::Command::new("ip")
                .args(["netns", "exec", &lab.node_ns(1)])
                .args(&cmd)
                .status()
                .map_err(|e| e.to_string())?;
            return Ok(status.code().unwrap_or(1));
        }
        Cmd::Dashboard => {
            let Some(pid) = lab.process("dashboard").map(|p| p.pid) else {
                return Err("the lab has no dashboard: run `mesh-lab up --observe` first".into());
            };
            let inner: std::net::SocketAddr = mesh_lab::traces::DASHBOARD_LISTEN
                .parse()
                .expect("a socket address");
            // The same port here: the page is served for its own port only.
            let port = inner.port();
            let listener = std::net::TcpListener::bind(("127.0.0.1", port))
                .map_err(|e| format!("cannot listen on 127.0.0.1:{port}: {e}"))?;
            println!("dashboard on http://127.0.0.1:{port}/ (Ctrl-C to stop)");
            use std::io::Write;
            std::io::stdout().flush().ok();
            let netns = std::path::Path::new("/var/run/netns").join(lab.node_ns(1));
            std::thread::spawn(move || mesh_lab::forward::serve(listener, netns, inner));
            // Forwards while the lab's dashboard runs.
            while std::path::Path::new(&format!("/proc/{pid}")).exists() {
                std::thread::sleep(std::time::Duration::from_secs(1));
            }
            return Err("the lab's dashboard ended (`mesh-lab logs dashboard`)".into());
        }
        Cmd::Demo { keep, observe } => return mesh_lab::demo::run(&mut lab, keep, observe),
        Cmd::Bench {
            runs,
            seconds,
            scale,
            settle,
            quick,
            out,
            keep,
            ztunnel,
            waypoint,
            profile,
        } => {
            let builds = mesh_lab::bench_builds::builds(&ztunnel, &waypoint);
            let opts = if quick {
                mesh_lab::bench::BenchOptions {
                    keep,
                    builds,
                    profile,
                    ..mesh_lab::bench::BenchOptions::quick(out)
                }
            } else {
                mesh_lab::bench::BenchOptions {
                    runs: runs.max(1),
                    seconds: seconds.max(1),
                    scale,
                    settle: std::time::Duration::from_secs(settle),
                    out,
                    keep,
                    builds,
                    profile,
                }
            };
            return mesh_lab::bench::run(&mut lab, &opts);
        }
        Cmd::App { .. } | Cmd::BenchHold { .. } | Cmd::BenchConnect { .. } => {
            unreachable!("handled above")
        }
    }
    Ok(0)
}

fn main() {
    // Lab processes inherit the CLI's limits; the bench holds thousands of connections.
    mesh_lab::bench::raise_open_files_limit();
    match run(Cli::parse()) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("mesh-lab: {e}");
            std::process::exit(1);
        }
    }
}
