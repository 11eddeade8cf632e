//! meshctl: the user CLI. Reads the control plane's debug API (local by default) and
//! generates manifests.

#[path = "meshctl/enrolment.rs"]
mod enrolment;

use clap::{Parser, Subcommand};
use mesh_control::observe;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

#[derive(Parser)]
#[command(name = "meshctl", version, about = "Inspect and operate the mesh")]
struct Cli {
    /// The control plane's debug API (mesh-control --debug-listen).
    #[arg(
        long,
        global = true,
        env = "MESH_CONTROL",
        default_value = "127.0.0.1:15014"
    )]
    control: String,
    /// Prometheus's URL, for stat, top and dashboard (the lab's: run them with
    /// `mesh-lab meshctl`, in node 1's namespace).
    #[arg(
        long,
        global = true,
        env = "MESH_PROMETHEUS",
        default_value = "http://127.0.0.1:9090"
    )]
    prometheus: String,
    /// Print the PromQL each figure comes from (to reuse in your own dashboards).
    #[arg(long, global = true)]
    show_queries: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Readiness (and why not), nodes, connected ztunnels/agents/waypoints, enrolled
    /// workloads, and each node agent's enrolment (pods not confirmed flagged with the
    /// reason). Exits 1 when mesh-control is not ready.
    Status {
        /// A node agent's --readiness-addr whose enrolment to show (repeat for each
        /// node; the agent answers its own node only).
        #[arg(long = "agent", default_value = "127.0.0.1:8000")]
        agents: Vec<String>,
    },
    /// What the control plane sent to a node's clients.
    Config {
        #[command(subcommand)]
        cmd: ConfigCmd,
    },
    /// Waypoint helpers.
    Waypoint {
        #[command(subcommand)]
        cmd: WaypointCmd,
    },
    /// Authorization helpers.
    Authz {
        #[command(subcommand)]
        cmd: AuthzCmd,
    },
    /// Golden metrics per workload or service, from Prometheus: success rate, requests/s,
    /// latency p50/p95/p99 (through waypoints), TCP connections/s and bytes/s, mTLS share.
    Stat {
        #[arg(value_parser = ["workload", "workloads", "service", "services"], default_value = "workload")]
        kind: String,
        /// Only destinations in this namespace.
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        /// The range rates are taken over (PromQL duration: 30s, 1m, 1h).
        #[arg(long, default_value = "1m")]
        window: String,
    },
    /// The busiest source → destination paths now, refreshed until interrupted.
    Top {
        #[arg(long, default_value = "1m")]
        window: String,
        /// How many paths to show.
        #[arg(long, default_value_t = 10)]
        limit: usize,
        /// Print once and exit.
        #[arg(long)]
        once: bool,
        /// Seconds between refreshes.
        #[arg(long, default_value_t = 2)]
        interval: u64,
    },
    /// A live service graph in the browser: workloads, services and waypoints, edges with
    /// rate, errors, p99 and mTLS; click a node for its metrics and configuration.
    Dashboard {
        /// Where to serve the page (loopback only).
        #[arg(long, default_value = "127.0.0.1:15080")]
        listen: SocketAddr,
        #[arg(long, default_value = "1m")]
        window: String,
        /// Also receive traces over OTLP/gRPC here (point the proxies'
        /// OTEL_EXPORTER_OTLP_TRACES_ENDPOINT at it) and show each request's journey.
        #[arg(long)]
        otlp_listen: Option<SocketAddr>,
        /// Traces kept in memory (the oldest go first).
        #[arg(long, default_value_t = observe::traces::Limits::default().traces)]
        max_traces: usize,
        /// Spans kept per trace (later ones are dropped and counted).
        #[arg(long, default_value_t = observe::traces::Limits::default().spans_per_trace)]
        max_spans_per_trace: usize,
        /// Memory for the spans held, in MiB (the oldest traces go to make room).
        #[arg(long, default_value_t = observe::traces::Limits::default().bytes >> 20)]
        max_trace_mib: usize,
    },
    /// Whether each enrolled pod's capture is confirmed (its rules read back from its
    /// network namespace as planned, and ztunnel acked it), from each node agent.
    /// Pending and failed pods are flagged with the reason; exits 1 if there are any, 2 if
    /// an agent cannot be read.
    Enrolment {
        /// A node agent's --readiness-addr (repeat for each node).
        #[arg(long = "agent", default_value = "127.0.0.1:8000")]
        agents: Vec<String>,
    },
}

#[derive(Subcommand)]
enum ConfigCmd {
    /// Resources (name → version) each client of the node holds.
    Dump {
        #[arg(long)]
        node: String,
    },
}

#[derive(Subcommand)]
enum WaypointCmd {
    /// Print the Gateway manifest of a waypoint for a namespace.
    Generate {
        #[arg(short = 'n', long)]
        namespace: String,
        #[arg(long, default_value = "waypoint")]
        name: String,
        /// Which traffic the waypoint handles.
        #[arg(long = "for", default_value = "service", value_parser = ["service", "workload", "all", "none"])]
        for_: String,
    },
}

#[derive(Subcommand)]
enum AuthzCmd {
    /// Which policy allows or denies a connection, and why.
    Check {
        /// Source SPIFFE id, or `plaintext`.
        #[arg(long)]
        from: String,
        /// Destination pod, namespace/pod: ztunnel's decision.
        #[arg(long, required_unless_present = "service", conflicts_with = "service")]
        to: Option<String>,
        /// Destination Service bound to a waypoint, namespace/name: the waypoint's decision.
        #[arg(long)]
        service: Option<String>,
        #[arg(long)]
        port: u16,
        /// Source IP, for policies that match on it.
        #[arg(long)]
        from_ip: Option<String>,
        /// To a Service with a waypoint: the request's method (default GET).
        #[arg(long)]
        method: Option<String>,
        /// To a Service with a waypoint: the request's path (default /).
        #[arg(long)]
        path: Option<String>,
        /// To a Service with a waypoint: the request's host (default the Service's name).
        #[arg(long)]
        host: Option<String>,
    },
}

fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A plain HTTP/1.0 GET: the debug API is local JSON; no client library needed.
fn get(control: &str, path: &str) -> Result<serde_json::Value, String> {
    let unreachable = |e: String| {
        format!(
            "cannot reach the control plane at {control}: {e}\n(is mesh-control running? set --control or MESH_CONTROL to its --debug-listen address)"
        )
    };
    let addr: SocketAddr = control
        .to_socket_addrs()
        .map_err(|e| unreachable(e.to_string()))?
        .next()
        .ok_or_else(|| unreachable("no address".into()))?;
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))
        .map_err(|e| unreachable(e.to_string()))?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {control}\r\n\r\n")
        .map_err(|e| unreachable(e.to_string()))?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)
        .map_err(|e| unreachable(e.to_string()))?;
    let (head, body) = resp
        .split_once("\r\n\r\n")
        .ok_or("malformed response from the control plane")?;
    let v: serde_json::Value = serde_json::from_str(body)
        .map_err(|e| format!("malformed JSON from the control plane: {e}"))?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        return Err(v["error"].as_str().unwrap_or(head).to_string());
    }
    Ok(v)
}

fn waypoint_yaml(namespace: &str, name: &str, for_: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata:\n  name: {name}\n  namespace: {namespace}\n  labels:\n    istio.io/waypoint-for: {for_}\nspec:\n  gatewayClassName: istio-waypoint\n  listeners:\n  - name: mesh\n    port: 15008\n    protocol: HBONE\n"
    )
}

/// Prints the status; an error when mesh-control is not ready (after printing why).
/// One finding of `/debug/status`: severity, object, field, message.
fn finding_line(x: &serde_json::Value) -> String {
    format!(
        "{:<11} {}: {}: {}",
        x["severity"].as_str().unwrap_or_default(),
        x["object"].as_str().unwrap_or_default(),
        x["field"].as_str().unwrap_or_default(),
        x["message"].as_str().unwrap_or_default()
    )
}

fn print_status(v: &serde_json::Value) -> Result<(), String> {
    let problems: Vec<&str> = v["problems"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p.as_str())
        .collect();
    if v["ready"].as_bool() == Some(true) {
        println!("mesh-control: READY");
    } else {
        println!("mesh-control: NOT READY");
        for p in &problems {
            println!("  {p}");
        }
    }
    if v.get("version").is_none() {
        return Err("mesh-control is not ready (not serving yet)".into());
    }
    println!("configuration version {}", v["version"]);
    println!("\nNODES");
    for n in v["nodes"].as_array().into_iter().flatten() {
        let name = n.as_str().unwrap_or_default();
        let enrolled = v["enrolled"][name].as_array().map(|a| a.len()).unwrap_or(0);
        println!("  {name:<20} enrolled workloads: {enrolled}");
    }
    println!("\nCONNECTED CLIENTS");
    let clients = v["clients"].as_array().cloned().unwrap_or_default();
    if clients.is_empty() {
        println!("  (none)");
    }
    for c in clients {
        let kind = if c["nodeId"]
            .as_str()
            .unwrap_or_default()
            .starts_with("ztunnel~")
        {
            "ztunnel"
        } else if c["principal"]
            .as_str()
            .unwrap_or_default()
            .starts_with("waypoint/")
        {
            "waypoint"
        } else {
            "node-agent"
        };
        println!(
            "  {:<10} {:<28} since {}  acks {} nacks {}{}",
            kind,
            c["principal"].as_str().unwrap_or_default(),
            c["connectedAt"].as_str().unwrap_or_default(),
            c["acks"],
            c["nacks"],
            c["lastNack"]
                .as_str()
                .map(|m| format!(" (last: {m})"))
                .unwrap_or_default()
        );
    }
    println!("\nENROLLED WORKLOADS");
    for (node, pods) in v["enrolled"].as_object().into_iter().flatten() {
        for p in pods.as_array().into_iter().flatten() {
            println!("  {:<40} on {node}", p.as_str().unwrap_or_default());
        }
    }
    let sections = [
        (
            "policyFindings",
            "POLICY FINDINGS (errors and unsupported fields are enforced fail closed)",
        ),
        (
            "routeFindings",
            "ROUTE FINDINGS (a rule that cannot be applied answers 500; a match that cannot be evaluated matches nothing)",
        ),
    ];
    for (key, title) in sections {
        if let Some(f) = v[key].as_array().filter(|f| !f.is_empty()) {
            println!("\n{title}");
            for x in f {
                println!("  {}", finding_line(x));
            }
        }
    }
    if let Some(w) = v["warnings"].as_array().filter(|w| !w.is_empty()) {
        println!("\nWARNINGS");
        for x in w {
            println!("  {}", x.as_str().unwrap_or_default());
        }
    }
    if v["ready"].as_bool() == Some(true) {
        Ok(())
    } else {
        Err("mesh-control is not ready".into())
    }
}

/// The ENROLMENT section of `meshctl status`: each node agent's own account (an agent
/// that cannot be read is said so, it does not hide the rest).
fn print_enrolment(agents: &[String]) {
    println!("\nENROLMENT (from the node agents; details: meshctl enrolment)");
    for a in agents {
        match enrolment::fetch(a) {
            Ok(v) => print!("{}", enrolment::summary(&v)),
            Err(e) => println!("  {a}: {}", e.lines().next().unwrap_or_default()),
        }
    }
}

/// Runs `queries` against Prometheus; with `show`, prints each before its answer is used.
fn run_queries<K: Ord + Copy>(
    prometheus: &str,
    queries: Vec<(K, String)>,
    show: bool,
) -> Result<BTreeMap<K, Vec<observe::table::Sample>>, String> {
    let ep = observe::client::Endpoint::parse(prometheus)?;
    let mut out = BTreeMap::new();
    for (k, q) in queries {
        if show {
            println!("# {q}");
        }
        let v = observe::client::query(&ep, &q)?;
        out.insert(k, observe::table::parse_vector(&v)?);
    }
    if show {
        println!();
    }
    Ok(out)
}

fn stat(cli: &Cli, kind: &str, namespace: Option<&str>, window: &str) -> Result<(), String> {
    use observe::promql::{Figure, Scope, Window, stat_query};
    let scope = if kind.starts_with("service") {
        Scope::Service
    } else {
        Scope::Workload
    };
    let window = Window::parse(window)?;
    let queries = Figure::ALL
        .iter()
        .map(|f| (*f, stat_query(*f, scope, &window, namespace)))
        .collect();
    let results = run_queries(&cli.prometheus, queries, cli.show_queries)?;
    let rows = observe::table::stat_rows(scope, &results);
    print!("{}", observe::table::render_stat(scope, &rows));
    Ok(())
}

fn top(cli: &Cli, window: &str, limit: usize, once: bool, interval: u64) -> Result<(), String> {
    use observe::promql::{PathFigure, Window, path_query};
    let window = Window::parse(window)?;
    let mut show = cli.show_queries;
    loop {
        let queries = PathFigure::ALL
            .iter()
            .map(|f| (*f, path_query(*f, &window)))
            .collect();
        let results = run_queries(&cli.prometheus, queries, show)?;
        // The queries are shown once; then only the table refreshes.
        show = false;
        let table = observe::table::render_paths(&observe::table::path_rows(&results, limit));
        if once {
            print!("{table}");
            return Ok(());
        }
        // Clear the screen, then the table and when it was taken.
        print!("\x1b[2J\x1b[H{table}\n(window {window}, every {interval}s; Ctrl-C to stop)\n");
        std::io::stdout().flush().ok();
        std::thread::sleep(Duration::from_secs(interval.max(1)));
    }
}

fn dashboard(
    cli: &Cli,
    listen: SocketAddr,
    window: &str,
    otlp: Option<SocketAddr>,
    limits: observe::traces::Limits,
) -> Result<(), String> {
    // The page shows the mesh's traffic and configuration: never beyond this machine.
    if !listen.ip().is_loopback() {
        return Err(format!(
            "--listen {listen}: the dashboard serves on loopback only (use ssh -L to reach it from elsewhere)"
        ));
    }
    let d = observe::dashboard::Dashboard {
        prometheus: observe::client::Endpoint::parse(&cli.prometheus)?,
        control: cli.control.clone(),
        window: observe::promql::Window::parse(window)?,
        traces: None,
    };
    let l = std::net::TcpListener::bind(listen)
        .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    let d = match otlp {
        Some(addr) => {
            let store =
                std::sync::Arc::new(std::sync::Mutex::new(observe::traces::Store::new(limits)));
            let bound = observe::otlp::spawn(addr, store.clone())?;
            println!("receiving traces over OTLP/gRPC on {bound}");
            observe::dashboard::Dashboard {
                traces: Some(store),
                ..d
            }
        }
        None => d,
    };
    println!(
        "dashboard on http://{}/ (Ctrl-C to stop)",
        l.local_addr().map_err(|e| e.to_string())?
    );
    std::io::stdout().flush().ok();
    d.serve(l);
    Ok(())
}

fn run(cli: Cli) -> Result<(), String> {
    match &cli.cmd {
        Cmd::Stat {
            kind,
            namespace,
            window,
        } => return stat(&cli, kind, namespace.as_deref(), window),
        Cmd::Top {
            window,
            limit,
            once,
            interval,
        } => return top(&cli, window, *limit, *once, *interval),
        Cmd::Dashboard {
            listen,
            window,
            otlp_listen,
            max_traces,
            max_spans_per_trace,
            max_trace_mib,
        } => {
            let limits = observe::traces::Limits {
                traces: (*max_traces).max(1),
                spans_per_trace: (*max_spans_per_trace).max(1),
                bytes: max_trace_mib.saturating_mul(1 << 20).max(1 << 20),
                ..Default::default()
            };
            return dashboard(&cli, *listen, window, *otlp_listen, limits);
        }
        _ => {}
    }
    match cli.cmd {
        Cmd::Stat { .. } | Cmd::Top { .. } | Cmd::Dashboard { .. } => {
            unreachable!("handled above")
        }
        Cmd::Status { agents } => {
            let status = get(&cli.control, "/debug/status")?;
            let ready = print_status(&status);
            print_enrolment(&agents);
            ready?
        }
        Cmd::Config {
            cmd: ConfigCmd::Dump { node },
        } => {
            let v = get(
                &cli.control,
                &format!("/debug/config_dump?node={}", encode(&node)),
            )?;
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        }
        Cmd::Enrolment { agents } => {
            let mut answers = Vec::new();
            for a in &agents {
                let answer = enrolment::fetch(a).map(|v| {
                    let (text, ok) = enrolment::render(&v);
                    print!("{text}");
                    ok
                });
                match &answer {
                    Ok(false) => eprintln!("meshctl: pods not confirmed on the agent at {a}"),
                    Err(e) => eprintln!("meshctl: {e}"),
                    Ok(true) => {}
                }
                answers.push(answer);
            }
            let code = enrolment::exit_code(&answers);
            if code != 0 {
                std::process::exit(code);
            }
        }
        Cmd::Waypoint {
            cmd:
                WaypointCmd::Generate {
                    namespace,
                    name,
                    for_,
                },
        } => {
            print!("{}", waypoint_yaml(&namespace, &name, &for_));
        }
        Cmd::Authz {
            cmd:
                AuthzCmd::Check {
                    from,
                    to,
                    service,
                    port,
                    from_ip,
                    method,
                    path: req_path,
                    host,
                },
        } => {
            let mut path = format!("/debug/authz?from={}&port={port}", encode(&from));
            for (k, v) in [
                ("to", to),
                ("service", service),
                ("fromIp", from_ip),
                ("method", method),
                ("path", req_path),
                ("host", host),
            ] {
                if let Some(v) = v {
                    path.push_str(&format!("&{k}={}", encode(&v)));
                }
            }
            let v = get(&cli.control, &path)?;
            let decision = v["decision"].as_str().unwrap_or("?");
            match decision {
                "DENY" => println!(
                    "DENY by {}: {}",
                    v["policy"].as_str().unwrap_or("(no single policy)"),
                    v["reason"].as_str().unwrap_or_default()
                ),
                _ => println!("ALLOW"),
            }
            if let Some(by) = v["enforcedBy"].as_str() {
                println!("  enforced by {by}");
            }
            for p in v["policies"].as_array().into_iter().flatten() {
                println!(
                    "  {:<6} {:<50} {}{}",
                    p["action"].as_str().unwrap_or_default(),
                    p["policy"].as_str().unwrap_or_default(),
                    if p["matched"].as_bool() == Some(true) {
                        "matched"
                    } else {
                        "no match"
                    },
                    if p["dryRun"].as_bool() == Some(true) {
                        " (dry run)"
                    } else {
                        ""
                    }
                );
                for problem in p["problems"].as_array().into_iter().flatten() {
                    println!(
                        "         fail closed: {}",
                        problem.as_str().unwrap_or_default()
                    );
                }
            }
            if let Some(n) = v["note"].as_str() {
                println!("note: {n}");
            }
        }
    }
    Ok(())
}

fn main() {
    if let Err(e) = run(Cli::parse()) {
        eprintln!("meshctl: {e}");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn waypoint_manifest_parses_as_a_gateway() {
        let y = super::waypoint_yaml("shop", "waypoint", "service");
        let mut o = mesh_control::manifest::Objects::default();
        o.add_file(std::path::Path::new("wp.yaml"), &y).unwrap();
        let gw = &o.gateways[&("shop".into(), "waypoint".into())];
        assert_eq!(gw.spec.gateway_class_name, "istio-waypoint");
        assert_eq!(gw.spec.listeners[0].port, 15008);
    }

    #[test]
    fn unreachable_control_plane_is_explained() {
        let e = super::get("127.0.0.1:1", "/debug/status").unwrap_err();
        assert!(e.contains("cannot reach the control plane"), "{e}");
    }
}
