//! `mesh-lab bench`: one lab, two nodes, a client pod on node-1 and servers on node-2,
//! measured side by side without the mesh, through two ztunnels, and through two
//! ztunnels and a waypoint; HAProxy doing the same HTTP routing as the waypoint is
//! measured in the same run for comparison. Real load tools only: iperf3 and h2load.

use crate::bench_builds::{self as builds, Build};
use crate::bench_profile::Recording;
use crate::bench_report::{self as report, Figures};
use crate::demo::wait;
use crate::lab::Lab;
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub runs: usize,
    /// Length of each measurement.
    pub seconds: u64,
    /// Idle tunnelled connections to hold open for the scale figures.
    pub scale: Vec<usize>,
    /// Pause after the load before "RSS 10 s after".
    pub settle: Duration,
    pub out: PathBuf,
    pub keep: bool,
    /// The builds compared in each run, the lab's own first (see [`builds::builds`]).
    pub builds: Vec<Build>,
    /// Where to record a CPU profile of each proxy under each load (none if `None`).
    pub profile: Option<PathBuf>,
}

impl BenchOptions {
    /// Short measurements, for checking that the bench works (CI), not for figures.
    pub fn quick(out: PathBuf) -> Self {
        BenchOptions {
            runs: 1,
            seconds: 1,
            scale: vec![100],
            settle: Duration::from_secs(1),
            out,
            keep: false,
            builds: vec![Build::default()],
            profile: None,
        }
    }
}

/// Requests per second of the fixed-rate latency runs (10 connections at 100 req/s).
const FIXED_RATE: f64 = 1000.0;
const SERVER_VIP: &str = "10.96.0.50";
const IPERF_VIP: &str = "10.96.0.51";
const CLIENT: &str = "bench/client";

const PODS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: bench}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: server, namespace: bench}
---
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: bench, labels: {app: server}}
spec:
  nodeName: node-2
  serviceAccountName: server
  containers: [{name: server, ports: [{name: http, containerPort: 8080}, {name: tcp-echo, containerPort: 9000}]}]
---
apiVersion: v1
kind: Service
metadata: {name: server, namespace: bench}
spec:
  selector: {app: server}
  clusterIP: 10.96.0.50
  ports: [{name: http, port: 80, targetPort: 8080}, {name: tcp-echo, port: 9000, targetPort: 9000}]
---
apiVersion: v1
kind: Pod
metadata: {name: iperf, namespace: bench, labels: {app: iperf}}
spec:
  nodeName: node-2
  serviceAccountName: server
  containers: [{name: iperf, command: [iperf3, -s, -p, "5201"]}]
---
apiVersion: v1
kind: Service
metadata: {name: iperf, namespace: bench}
spec:
  selector: {app: iperf}
  clusterIP: 10.96.0.51
  ports: [{name: tcp-iperf, port: 5201, targetPort: 5201}]
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: bench, labels: {app: client}}
spec:
  nodeName: node-1
  serviceAccountName: client
  containers: [{name: client}]
"#;

/// The waypoint's routing; HAProxy is configured to do the same (see `haproxy_config`).
const WAYPOINT: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: bench}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: bench, namespace: bench}
spec:
  parentRefs: [{group: "", kind: Service, name: server, port: 80}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /api}}]
    filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x-bench, value: routed}]}}]
    backendRefs: [{name: server, port: 80}]
  - backendRefs: [{name: server, port: 80}]
"#;

fn haproxy_config(server_ip: &str) -> String {
    format!(
        "global\n    maxconn 8000\n    nbthread 2\n\
defaults\n    mode http\n    timeout connect 5s\n    timeout client 60s\n    timeout server 60s\n    http-reuse always\n\
frontend bench\n    bind 0.0.0.0:8080\n    acl api path_beg /api\n    http-request set-header x-bench routed if api\n    default_backend server\n\
backend server\n    server s1 {server_ip}:8080\n"
    )
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Path3 {
    Direct,
    Mesh,
    Waypoint,
}

impl Path3 {
    fn name(self) -> &'static str {
        match self {
            Path3::Direct => "direct",
            Path3::Mesh => "mesh",
            Path3::Waypoint => "waypoint",
        }
    }

    fn namespace(self) -> &'static str {
        match self {
            Path3::Direct => {
                "apiVersion: v1\nkind: Namespace\nmetadata: {name: bench, labels: {}}\n"
            }
            Path3::Mesh => {
                "apiVersion: v1\nkind: Namespace\nmetadata: {name: bench, labels: {istio.io/dataplane-mode: ambient}}\n"
            }
            Path3::Waypoint => {
                "apiVersion: v1\nkind: Namespace\nmetadata: {name: bench, labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}}\n"
            }
        }
    }
}

/// Runs the bench on a fresh lab: up, measure, report, down (unless `keep`).
pub fn run(lab: &mut Lab, opts: &BenchOptions) -> Result<i32, String> {
    if lab.is_up() {
        return Err(format!(
            "lab {} is already up; the bench builds its own: `mesh-lab --name {} down` first, or pass another --name",
            lab.name, lab.name
        ));
    }
    for tool in ["iperf3", "h2load", "haproxy", "curl"] {
        if Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .map(|o| !o.status.success())
            .unwrap_or(true)
        {
            return Err(format!(
                "{tool} is not installed (apt-get install iperf3 nghttp2-client haproxy curl, or `make deps`)"
            ));
        }
    }
    for b in &opts.builds {
        for (flag, exe) in [("--ztunnel", &b.ztunnel), ("--waypoint", &b.waypoint)] {
            if let Some(exe) = exe
                && !exe.is_file()
            {
                return Err(format!("{flag} {}: no such file", exe.display()));
            }
        }
    }
    let started = Instant::now();
    let result = (|| {
        lab.up(2)?;
        let mut bench = Bench::prepare(lab, opts)?;
        bench.measure_all()
    })();
    match &result {
        Ok(_) => println!(
            "\nbench took {:.0} s; figures in {}",
            started.elapsed().as_secs_f64(),
            opts.out.display()
        ),
        Err(e) => eprintln!(
            "\nbench failed: {e}\n(logs: mesh-lab --name {} logs control|ztunnel-1|ztunnel-2|pod:bench/waypoint)",
            lab.name
        ),
    }
    if !opts.keep {
        lab.down()?;
    }
    result.map(|_| 0)
}

struct Bench<'a> {
    lab: &'a mut Lab,
    opts: BenchOptions,
    ticks_per_sec: f64,
    /// Each build's runs (each run's figures include the direct and HAProxy figures
    /// measured in that run, shared by the builds).
    runs: Vec<Vec<Figures>>,
    /// The builds' binaries now in use.
    current: (PathBuf, PathBuf),
    /// The proxies to profile under the loads now running, and the build they are of
    /// (when several are compared).
    profiled: (Vec<(&'static str, u32)>, Option<usize>),
    /// The ztunnels have carried no load since they started: the mesh path's idle memory
    /// is read only from such ztunnels, so every run measures the same idle.
    ztunnels_fresh: bool,
}

impl<'a> Bench<'a> {
    fn prepare(lab: &'a mut Lab, opts: &BenchOptions) -> Result<Self, String> {
        println!(
            "preparing: pods, services and the waypoint on lab {}",
            lab.name
        );
        lab.apply(PODS, "bench-pods.yaml")?;
        let server_ip = lab
            .state
            .pods
            .get("bench/server")
            .ok_or("no server pod")?
            .ip
            .clone();
        let cfg = lab.dir.join("haproxy.cfg");
        std::fs::write(&cfg, haproxy_config(&server_ip)).map_err(|e| e.to_string())?;
        let haproxy = format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: haproxy, namespace: bench, labels: {{app: haproxy}}}}\nspec:\n  nodeName: node-1\n  containers: [{{name: haproxy, command: [haproxy, -db, -f, {:?}]}}]\n",
            cfg.to_string_lossy()
        );
        lab.apply(&haproxy, "bench-haproxy.yaml")?;
        // The Gateway and route are inert until the namespace asks for the waypoint.
        lab.apply(WAYPOINT, "bench-waypoint.yaml")?;
        let ticks = Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0);
        let current = (
            Build::default().ztunnel_exe(&lab.bin_dir),
            Build::default().waypoint_exe(&lab.bin_dir),
        );
        let bench = Bench {
            lab,
            opts: opts.clone(),
            ticks_per_sec: ticks,
            runs: vec![Vec::new(); opts.builds.len().max(1)],
            current,
            profiled: (Vec::new(), None),
            ztunnels_fresh: false,
        };
        wait("the server to answer", Duration::from_secs(30), || {
            bench
                .curl(&format!("http://{SERVER_VIP}/api/ready"))
                .is_ok()
        })?;
        wait("haproxy to answer", Duration::from_secs(30), || {
            bench
                .curl(&format!("http://{}/api/ready", bench.haproxy_addr()))
                .is_ok()
        })?;
        Ok(bench)
    }

    fn haproxy_addr(&self) -> String {
        format!("{}:8080", self.lab.state.pods["bench/haproxy"].ip)
    }

    fn measure_all(&mut self) -> Result<(), String> {
        let n = self.opts.builds.len().max(1);
        let total = self.opts.runs;
        for run in 0..total {
            let mut shared = Figures::new();
            println!(
                "run {}/{total}: direct ({} s per measurement)",
                run + 1,
                self.opts.seconds
            );
            self.set_path(Path3::Direct)?;
            self.measure_path(Path3::Direct, &mut shared)?;
            println!(
                "run {}/{total}: haproxy (same routing as the waypoint, no mesh)",
                run + 1
            );
            self.measure_haproxy(&mut shared)?;
            for b in builds::order(run, n) {
                let mut f = shared.clone();
                if n > 1 {
                    self.use_build(b)?;
                    self.profiled.1 = Some(b);
                }
                for path in [Path3::Mesh, Path3::Waypoint] {
                    println!(
                        "run {}/{total}: {}{}",
                        run + 1,
                        path.name(),
                        if n > 1 {
                            format!(", {}", builds::label(b))
                        } else {
                            String::new()
                        }
                    );
                    if path == Path3::Mesh && !self.ztunnels_fresh {
                        // After the last run's waypoint path they hold what that load
                        // left (2.2 against 1.2 MiB anonymous, measured), not idle.
                        self.restart_ztunnels()?;
                    }
                    self.set_path(path)?;
                    self.measure_path(path, &mut f)?;
                    if path == Path3::Mesh {
                        self.measure_scale(&mut f)?;
                    }
                }
                self.runs[b].push(f);
            }
        }
        self.report()
    }

    /// Prints each build's figures and the targets side by side; writes the JSON.
    fn report(&self) -> Result<(), String> {
        let machine = machine();
        println!(
            "\nmesh-lab bench: client pod on node-1 → server pods on node-2, {} run(s) of {} s per measurement; median (min–max)\nmachine: {machine}",
            self.opts.runs, self.opts.seconds
        );
        let mut columns = Vec::new();
        let mut json_builds = Vec::new();
        for (i, (build, runs)) in self.opts.builds.iter().zip(&self.runs).enumerate() {
            let summary = report::summarize(runs);
            let targets = report::check_targets(runs);
            let label = builds::label(i);
            println!("\n{label}: {}\n", build.describe());
            print!("{}", report::render(&summary));
            json_builds.push(serde_json::json!({
                "label": label,
                "ztunnel": build.ztunnel_exe(&self.lab.bin_dir),
                "waypoint": build.waypoint_exe(&self.lab.bin_dir),
                "runs": runs,
                "summary": summary,
                "targets": targets,
            }));
            columns.push((label, targets));
        }
        print!("{}", report::render_targets(&columns));
        let json = serde_json::json!({
            "machine": machine,
            "command": std::env::args().collect::<Vec<_>>().join(" "),
            "seconds_per_measurement": self.opts.seconds,
            // The lab's own build, as before builds could be compared.
            "runs": json_builds[0]["runs"],
            "summary": json_builds[0]["summary"],
            "targets": json_builds[0]["targets"],
            "builds": json_builds,
        });
        std::fs::write(
            &self.opts.out,
            serde_json::to_string_pretty(&json).expect("figures serialize"),
        )
        .map_err(|e| format!("{}: {e}", self.opts.out.display()))
    }

    /// Puts build `b`'s binaries in place: both ztunnels restarted from its ztunnel (the
    /// nodes' installed ztunnel repointed, as an upgrade does), the waypoint rolled out
    /// from its waypoint. Binaries already in use are left running.
    fn use_build(&mut self, b: usize) -> Result<(), String> {
        let build = self.opts.builds[b].clone();
        let (ztunnel, waypoint) = (
            build.ztunnel_exe(&self.lab.bin_dir),
            build.waypoint_exe(&self.lab.bin_dir),
        );
        if ztunnel != self.current.0 {
            println!("  ztunnels from {}", ztunnel.display());
            let exe = std::fs::canonicalize(&ztunnel)
                .map_err(|e| format!("{}: {e}", ztunnel.display()))?;
            for node in 1..=2 {
                crate::upgrade::point_link(&self.lab.node_ztunnel_exe(node)?, &exe)?;
            }
            self.restart_ztunnels()?;
            self.current.0 = ztunnel;
        }
        if waypoint != self.current.1 {
            println!("  waypoint from {}", waypoint.display());
            self.lab.rollout_waypoint(
                "bench",
                "waypoint",
                Some(&waypoint),
                crate::rollout::Order::EndpointsFirst,
                &mut |_| {},
            )?;
            self.current.1 = waypoint;
        }
        Ok(())
    }

    /// The waypoint's pod (`bench/<name>`; a rollout gives it a new name).
    fn waypoint_pod(&self) -> Result<String, String> {
        self.lab
            .waypoint_pods("bench", "waypoint")
            .into_iter()
            .find(|k| self.lab.process(&format!("pod:{k}")).is_some())
            .ok_or_else(|| "no running waypoint pod for Gateway bench/waypoint".into())
    }

    /// Labels the namespace for `path` and waits until a request really takes it.
    fn set_path(&mut self, path: Path3) -> Result<(), String> {
        self.lab.apply(path.namespace(), "bench-namespace.yaml")?;
        let url = format!("http://{SERVER_VIP}/api/probe");
        wait(
            &format!("traffic to take the {} path", path.name()),
            Duration::from_secs(40),
            || {
                let (z0, w0) = (self.ztunnel2_inbound(), self.waypoint_requests());
                if self.curl(&url).is_err() {
                    return false;
                }
                let (z1, w1) = (self.ztunnel2_inbound(), self.waypoint_requests());
                match path {
                    Path3::Direct => z1 == z0 && w1 == w0,
                    Path3::Mesh => z1 > z0 && w1 == w0,
                    Path3::Waypoint => w1 > w0,
                }
            },
        )
    }

    fn measure_path(&mut self, path: Path3, f: &mut Figures) -> Result<(), String> {
        let p = path.name();
        let procs: Vec<(&str, u32)> = match path {
            Path3::Direct => vec![],
            Path3::Mesh => vec![
                ("ztunnel1", self.pid("ztunnel-1")?),
                ("ztunnel2", self.pid("ztunnel-2")?),
            ],
            Path3::Waypoint => vec![
                ("ztunnel1", self.pid("ztunnel-1")?),
                ("ztunnel2", self.pid("ztunnel-2")?),
                (
                    "waypoint",
                    self.pid(&format!("pod:{}", self.waypoint_pod()?))?,
                ),
            ],
        };
        let pids: Vec<u32> = procs.iter().map(|(_, p)| *p).collect();
        // Memory is reported for the component the path is about.
        let watched: Vec<(&str, u32)> = match path {
            Path3::Direct => vec![],
            Path3::Mesh => procs[..2].to_vec(),
            Path3::Waypoint => procs[2..].to_vec(),
        };
        for (who, pid) in &watched {
            f.insert(format!("{who}.rss_idle_mib"), rss_mib(*pid, "VmRSS")?);
            f.insert(
                format!("{who}.rss_idle_anon_mib"),
                rss_mib(*pid, "RssAnon")?,
            );
            reset_peak(*pid)?;
        }
        let url = format!("http://{SERVER_VIP}/api/bench");
        if path != Path3::Direct {
            self.ztunnels_fresh = false;
        }
        // The component the path is about is the one profiled.
        self.profiled.0 = watched.clone();
        let measured = (|| {
            // Throughput, and CPU per GB on the single stream.
            let cpu0 = self.cpu_seconds(&pids)?;
            let (gbps, bytes) = self.load("tput1", |b| b.iperf(1))?;
            let cpu1 = self.cpu_seconds(&pids)?;
            f.insert(format!("{p}.tput1_gbps"), gbps);
            record_cpu(f, p, &procs, &cpu0, &cpu1, "gb", bytes / 1e9);
            f.insert(
                format!("{p}.tput4_gbps"),
                self.load("tput4", |b| b.iperf(4))?.0,
            );
            self.http_figures(p, &url, &procs, f)
        })();
        self.profiled.0.clear();
        measured?;
        for (who, pid) in &watched {
            f.insert(format!("{who}.rss_peak_mib"), rss_mib(*pid, "VmHWM")?);
        }
        if !watched.is_empty() {
            std::thread::sleep(self.opts.settle);
            for (who, pid) in &watched {
                f.insert(format!("{who}.rss_after_mib"), rss_mib(*pid, "VmRSS")?);
                f.insert(
                    format!("{who}.rss_after_anon_mib"),
                    rss_mib(*pid, "RssAnon")?,
                );
            }
        }
        Ok(())
    }

    fn measure_haproxy(&mut self, f: &mut Figures) -> Result<(), String> {
        let pid = self.pid("pod:bench/haproxy")?;
        f.insert("haproxy.rss_idle_mib".into(), rss_mib(pid, "VmRSS")?);
        reset_peak(pid)?;
        let url = format!("http://{}/api/bench", self.haproxy_addr());
        self.http_figures("haproxy", &url, &[("haproxy", pid)], f)?;
        f.insert("haproxy.rss_peak_mib".into(), rss_mib(pid, "VmHWM")?);
        std::thread::sleep(self.opts.settle);
        f.insert("haproxy.rss_after_mib".into(), rss_mib(pid, "VmRSS")?);
        Ok(())
    }

    /// Keep-alive req/s (and proxy CPU per 1000 requests), latency at a fixed 1000 req/s,
    /// HTTP/2, and new connections per second.
    fn http_figures(
        &self,
        p: &str,
        url: &str,
        procs: &[(&str, u32)],
        f: &mut Figures,
    ) -> Result<(), String> {
        let secs = self.opts.seconds.to_string();
        let pids: Vec<u32> = procs.iter().map(|(_, p)| *p).collect();
        let cpu0 = self.cpu_seconds(&pids)?;
        let h = self.load("h1", |b| {
            b.h2load(&["--h1", "-c", "10", "-t", "1", "-D", &secs, url])
        })?;
        let cpu1 = self.cpu_seconds(&pids)?;
        f.insert(format!("{p}.rps_h1"), h.req_per_sec);
        record_cpu(
            f,
            p,
            procs,
            &cpu0,
            &cpu1,
            "1000_req",
            h.succeeded as f64 / 1000.0,
        );
        let h1 = self.load("h1-fixed-rate", |b| b.fixed_rate(&["--h1"], url))?;
        f.insert(format!("{p}.lat_h1_p50_ms"), h1.percentiles[0]);
        f.insert(format!("{p}.lat_h1_p90_ms"), h1.percentiles[1]);
        f.insert(format!("{p}.lat_h1_p99_ms"), h1.percentiles[2]);
        f.insert(format!("{p}.lat_h1_rate_share"), h1.rate_share);
        let h = self.load("h2", |b| {
            b.h2load(&["-c", "10", "-m", "10", "-t", "1", "-D", &secs, url])
        })?;
        f.insert(format!("{p}.rps_h2"), h.req_per_sec);
        let h2 = self.load("h2-fixed-rate", |b| b.fixed_rate(&[], url))?;
        f.insert(format!("{p}.lat_h2_p99_ms"), h2.percentiles[2]);
        f.insert(format!("{p}.lat_h2_rate_share"), h2.rate_share);
        f.insert(
            format!("{p}.conn_per_s"),
            self.load("connections", |b| b.connection_rate(url))?,
        );
        Ok(())
    }

    /// Runs one load, recorded by perf for each profiled proxy when `--profile` is given.
    fn load<T>(
        &self,
        name: &str,
        run: impl FnOnce(&Self) -> Result<T, String>,
    ) -> Result<T, String> {
        let rec = Recording::start(
            self.opts.profile.as_deref(),
            name,
            &self.profiled.0,
            self.profiled.1,
        )?;
        let out = run(self);
        let stopped = rec.stop();
        let out = out?;
        stopped.map(|()| out)
    }

    /// New connections per second: 10 clients, each in a loop of connect, one request
    /// with `Connection: close`, read to the end. (h2load hangs at the end of a timed run
    /// when the server closes every connection, so the lab has its own loop for this.)
    fn connection_rate(&self, url: &str) -> Result<f64, String> {
        let (addr, path) = url
            .strip_prefix("http://")
            .and_then(|r| r.split_once('/'))
            .ok_or_else(|| format!("bad url {url}"))?;
        let addr = if addr.contains(':') {
            addr.to_string()
        } else {
            format!("{addr}:80")
        };
        let out = self.in_client(&[
            &self.lab.bin_dir.join("mesh-lab").to_string_lossy(),
            "bench-connect",
            "--to",
            &addr,
            "--path",
            &format!("/{path}"),
            "--seconds",
            &self.opts.seconds.to_string(),
        ])?;
        let v: serde_json::Value = serde_json::from_str(&out)
            .map_err(|e| format!("bench-connect printed {out:?}: {e}"))?;
        let (ok, failed) = (
            v["ok"].as_f64().unwrap_or(0.0),
            v["failed"].as_f64().unwrap_or(0.0),
        );
        if failed > 0.0 || ok == 0.0 {
            return Err(format!("new connections to {url}: {out}"));
        }
        Ok(ok / v["seconds"].as_f64().unwrap_or(1.0))
    }

    /// p50/p90/p99 at 1000 req/s in total (10 connections at 100 req/s each), from
    /// h2load's per-request log, and the share of that rate actually reached. A slow or
    /// busy machine (or a debug build) may fall behind the rate: that is a figure the
    /// report shows, never an error, so the bench never depends on the machine's speed.
    fn fixed_rate(&self, proto: &[&str], url: &str) -> Result<report::FixedRate, String> {
        let log = self.lab.dir.join("h2load-latency.log");
        let _ = std::fs::remove_file(&log);
        let secs = self.opts.seconds.to_string();
        let log_arg = format!("--log-file={}", log.display());
        let mut args: Vec<&str> = proto.to_vec();
        args.extend([
            "-c", "10", "-t", "1", "--rps", "100", "-D", &secs, &log_arg, url,
        ]);
        let h = self.h2load(&args)?;
        let text = std::fs::read_to_string(&log).map_err(|e| format!("h2load log: {e}"))?;
        Ok(report::FixedRate {
            percentiles: report::latency_percentiles(&text)?,
            rate_share: report::rate_share(h.succeeded, FIXED_RATE, self.opts.seconds),
        })
    }

    /// Runs h2load in the client pod; fails on any failed request (a correctness fault,
    /// unlike a low rate).
    fn h2load(&self, args: &[&str]) -> Result<report::H2load, String> {
        // A stuck load generator must not stall the bench.
        let limit = (self.opts.seconds + 30).to_string();
        let mut full = vec!["timeout", "-s", "KILL", &limit, "h2load"];
        full.extend_from_slice(args);
        let out = self.in_client(&full)?;
        let h = report::parse_h2load(&out)?;
        if h.failed > 0 || h.errored > 0 || h.succeeded == 0 {
            return Err(format!("h2load {}: requests failed\n{out}", args.join(" ")));
        }
        Ok(h)
    }

    fn iperf(&self, streams: usize) -> Result<(f64, f64), String> {
        let (p, t) = (streams.to_string(), self.opts.seconds.to_string());
        let out = self.in_client(&[
            "iperf3", "-c", IPERF_VIP, "-p", "5201", "-t", &t, "-P", &p, "-J",
        ])?;
        report::parse_iperf(&out)
    }

    /// Memory of freshly started ztunnels with N idle connections held open through the
    /// mesh (each has carried one byte each way, so both ztunnels hold it).
    fn measure_scale(&mut self, f: &mut Figures) -> Result<(), String> {
        for n in self.opts.scale.clone() {
            // Fresh ztunnels: memory freed after earlier load stays with the allocator and
            // would be reused by these connections, hiding what they cost.
            self.restart_ztunnels()?;
            std::thread::sleep(Duration::from_secs(1));
            let (z1, z2) = (self.pid("ztunnel-1")?, self.pid("ztunnel-2")?);
            let base = (rss_mib(z1, "VmRSS")?, rss_mib(z2, "VmRSS")?);
            let netns = self.lab.state.pods[CLIENT].netns.clone();
            let mut child = Command::new("ip")
                .args(["netns", "exec", &netns])
                .arg(self.lab.bin_dir.join("mesh-lab"))
                .args([
                    "bench-hold",
                    "--to",
                    &format!("{SERVER_VIP}:9000"),
                    "--count",
                    &n.to_string(),
                ])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .map_err(|e| format!("cannot start bench-hold: {e}"))?;
            let stdout = child.stdout.take().expect("piped");
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let mut line = String::new();
                let _ = BufReader::new(stdout).read_line(&mut line);
                let _ = tx.send(line);
            });
            let line = rx
                .recv_timeout(Duration::from_secs(180))
                .unwrap_or_default();
            if !line.starts_with("held") {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "holding {n} connections through the mesh failed: {line}"
                ));
            }
            std::thread::sleep(Duration::from_secs(1));
            let held = (rss_mib(z1, "VmRSS")?, rss_mib(z2, "VmRSS")?);
            // Closing stdin lets the holder exit, closing every connection.
            drop(child.stdin.take());
            let _ = child.wait();
            f.insert(format!("scale.{n}.ztunnel1_rss_mib"), held.0);
            f.insert(format!("scale.{n}.ztunnel2_rss_mib"), held.1);
            f.insert(
                format!("scale.{n}.ztunnels_kib_per_conn"),
                ((held.0 - base.0) + (held.1 - base.1)) * 1024.0 / n as f64,
            );
            println!(
                "  {n} idle tunnelled connections: ztunnel RSS {:.1} / {:.1} MiB",
                held.0, held.1
            );
            std::thread::sleep(Duration::from_secs(1));
        }
        self.restart_ztunnels()
    }

    /// Restarts both ztunnels (pods stay enrolled) and waits for mesh traffic again.
    fn restart_ztunnels(&mut self) -> Result<(), String> {
        for i in 1..=2 {
            let role = format!("ztunnel-{i}");
            let old = self.pid(&role)?;
            self.lab.stop(&role, true)?;
            // A process closing ten thousand sockets takes a while to exit; its ports
            // must be free before the new one binds them.
            wait(&format!("{role} to exit"), Duration::from_secs(60), || {
                std::fs::read_to_string(format!("/proc/{old}/stat"))
                    .map(|s| {
                        s.rsplit_once(')')
                            .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
                    })
                    .unwrap_or(true)
            })?;
            // Its listening ports can stay busy a moment longer: start again until the
            // new one stays up.
            let mut tries = 0;
            loop {
                self.lab.start_ztunnel(i)?;
                std::thread::sleep(Duration::from_millis(1500));
                let pid = self.pid(&role)?;
                let alive = std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
                    s.rsplit_once(')')
                        .is_some_and(|(_, r)| !r.trim_start().starts_with('Z'))
                });
                tries += 1;
                if alive {
                    break;
                }
                if tries == 10 {
                    return Err(format!(
                        "{role} does not stay up after a restart (see its log)"
                    ));
                }
                self.lab.stop(&role, true)?;
            }
        }
        self.ztunnels_fresh = true;
        self.set_path(Path3::Mesh)?;
        // Each ztunnel starts its pods' proxies one by one: the server pod answering says
        // nothing of the iperf3 pod, whose connections are reset until its own proxy is
        // up. Asked of ztunnel-2, not by traffic: no load before the idle reading.
        wait(
            "node-2's ztunnel to proxy the iperf3 pod",
            Duration::from_secs(40),
            || self.ztunnel_proxies(2, "bench", "iperf"),
        )
    }

    /// Whether node `node`'s ztunnel lists pod `namespace/name` as up (`/config_dump`).
    fn ztunnel_proxies(&self, node: usize, namespace: &str, name: &str) -> bool {
        self.lab.ztunnel_dump(node).is_some_and(|dump| {
            dump["workloadState"].as_object().is_some_and(|pods| {
                pods.values().any(|p| {
                    p["state"] == "Up"
                        && p["info"]["namespace"] == namespace
                        && p["info"]["name"] == name
                })
            })
        })
    }

    fn pid(&self, role: &str) -> Result<u32, String> {
        self.lab
            .process(role)
            .map(|p| p.pid)
            .ok_or_else(|| format!("no {role} process in the lab"))
    }

    /// CPU-seconds used so far by each process.
    fn cpu_seconds(&self, pids: &[u32]) -> Result<Vec<f64>, String> {
        pids.iter()
            .map(|pid| {
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .map_err(|e| format!("/proc/{pid}/stat: {e}"))?;
                Ok(report::cpu_ticks(&stat)? as f64 / self.ticks_per_sec)
            })
            .collect()
    }

    fn in_client(&self, args: &[&str]) -> Result<String, String> {
        in_netns(&self.lab.state.pods[CLIENT].netns, args)
    }

    fn curl(&self, url: &str) -> Result<String, String> {
        self.in_client(&["curl", "-sf", "--max-time", "3", url])
    }

    fn ztunnel2_inbound(&self) -> f64 {
        let port = self
            .lab
            .ztunnel_ports("ztunnel-2")
            .map_or(crate::upgrade::PORT_SETS[0].metrics, |p| p.metrics);
        scrape(
            &self.lab.node_ns(2),
            port,
            "istio_tcp_connections_opened_total",
        )
    }

    fn waypoint_requests(&self) -> f64 {
        self.waypoint_pod()
            .ok()
            .and_then(|k| self.lab.state.pods.get(&k))
            .map_or(0.0, |p| scrape(&p.netns, 15020, "istio_requests_total"))
    }
}

/// CPU-seconds per unit of work: for the whole path (`{path}.proxy_cpu_s_per_{unit}`) and
/// per component (`{who}.cpu_s_per_{unit}`, ztunnels only on the mesh path).
fn record_cpu(
    f: &mut Figures,
    path: &str,
    procs: &[(&str, u32)],
    before: &[f64],
    after: &[f64],
    unit: &str,
    amount: f64,
) {
    if procs.is_empty() || amount <= 0.0 {
        return;
    }
    let used: Vec<f64> = before.iter().zip(after).map(|(b, a)| a - b).collect();
    f.insert(
        format!("{path}.proxy_cpu_s_per_{unit}"),
        used.iter().sum::<f64>() / amount,
    );
    if path == "waypoint" {
        for ((who, _), u) in procs.iter().zip(&used) {
            if *who == "waypoint" {
                f.insert(format!("waypoint.cpu_s_per_{unit}"), u / amount);
            }
        }
    }
}

fn in_netns(netns: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new("ip")
        .args(["netns", "exec", netns])
        .args(args)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", args[0]))?;
    if !out.status.success() {
        return Err(format!(
            "{} failed ({}): {}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The sum of a metric over all its label sets, from `:<port>/metrics` in `netns`
/// (0 when it cannot be read).
fn scrape(netns: &str, port: u16, name: &str) -> f64 {
    let text = in_netns(
        netns,
        &[
            "curl",
            "-s",
            "--max-time",
            "3",
            &format!("http://127.0.0.1:{port}/metrics"),
        ],
    )
    .unwrap_or_default();
    metric_sum(&text, name)
}

fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn rss_mib(pid: u32, key: &str) -> Result<f64, String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("/proc/{pid}/status: {e}"))?;
    Ok(report::status_kib(&status, key)? / 1024.0)
}

/// Resets the peak RSS (VmHWM) to the current RSS (proc(5), clear_refs).
fn reset_peak(pid: u32) -> Result<(), String> {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5")
        .map_err(|e| format!("/proc/{pid}/clear_refs: {e}"))
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines().find_map(|l| {
                l.strip_prefix("model name")?
                    .split_once(':')
                    .map(|(_, v)| v.trim().to_string())
            })
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cores} × {cpu}, Linux {}", kernel.trim())
}

/// `mesh-lab bench-hold`: run inside the client pod; opens `count` connections to `to`,
/// sends one byte on each and reads its echo, prints `held N`, and keeps them open until
/// stdin closes.
pub fn hold_connections(to: std::net::SocketAddr, count: usize) -> Result<(), String> {
    use std::io::Read;
    raise_open_files_limit();
    let mut conns = Vec::with_capacity(count);
    for i in 0..count {
        let mut s = std::net::TcpStream::connect_timeout(&to, Duration::from_secs(5))
            .map_err(|e| format!("connection {i} to {to}: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(|e| e.to_string())?;
        s.write_all(b"x")
            .map_err(|e| format!("connection {i}: {e}"))?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b)
            .map_err(|e| format!("connection {i}: no echo: {e}"))?;
        conns.push(s);
    }
    println!("held {}", conns.len());
    std::io::stdout().flush().map_err(|e| e.to_string())?;
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    Ok(())
}

/// `mesh-lab bench-connect`: run inside the client pod; 10 threads each open a connection,
/// send one `Connection: close` request, read the answer to the end, and start over, for
/// `seconds`. Prints `{"ok": N, "failed": M, "seconds": S}`.
pub fn connect_loop(to: std::net::SocketAddr, path: &str, seconds: u64) -> Result<(), String> {
    use std::io::Read;
    use std::sync::atomic::{AtomicU64, Ordering};
    let ok = AtomicU64::new(0);
    let failed = AtomicU64::new(0);
    let request = format!("GET {path} HTTP/1.1\r\nHost: {to}\r\nConnection: close\r\n\r\n");
    let start = Instant::now();
    let until = start + Duration::from_secs(seconds);
    std::thread::scope(|s| {
        for _ in 0..10 {
            s.spawn(|| {
                let mut buf = Vec::with_capacity(4096);
                while Instant::now() < until {
                    let mut one = || -> std::io::Result<bool> {
                        let mut c =
                            std::net::TcpStream::connect_timeout(&to, Duration::from_secs(5))?;
                        c.set_nodelay(true)?;
                        c.set_read_timeout(Some(Duration::from_secs(5)))?;
                        c.write_all(request.as_bytes())?;
                        buf.clear();
                        c.read_to_end(&mut buf)?;
                        Ok(buf.starts_with(b"HTTP/1.1 200"))
                    };
                    match one() {
                        Ok(true) => ok.fetch_add(1, Ordering::Relaxed),
                        _ => failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
            });
        }
    });
    println!(
        "{}",
        serde_json::json!({
            "ok": ok.load(Ordering::Relaxed),
            "failed": failed.load(Ordering::Relaxed),
            "seconds": start.elapsed().as_secs_f64(),
        })
    );
    Ok(())
}

/// Raises the soft open-files limit to the hard one: the bench holds thousands of
/// connections, and every lab process inherits the limit from the CLI.
pub fn raise_open_files_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
    {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}
