//! The guided demo: a sample app in two namespaces, its traffic in plaintext, then the
//! same traffic carried over HBONE after labelling the namespaces — shown by the access
//! logs (mTLS identities), the metrics and a capture on the fabric.

use crate::lab::Lab;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const APP: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: front}
---
apiVersion: v1
kind: Namespace
metadata: {name: back}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: api, namespace: back}
---
apiVersion: v1
kind: Pod
metadata: {name: api, namespace: back, labels: {app: api, version: v1}}
spec:
  nodeName: node-2
  serviceAccountName: api
  containers: [{name: api, ports: [{name: http, containerPort: 8080}]}]
---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: back}
spec:
  selector: {app: api}
  clusterIP: 10.96.0.20
  ports: [{name: http, port: 80, targetPort: http}]
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: front, labels: {app: client}}
spec:
  nodeName: node-1
  serviceAccountName: web
  containers: [{name: client}]
"#;

const AMBIENT: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: front, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: back, labels: {istio.io/dataplane-mode: ambient}}
"#;

const WAYPOINT: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: api-v2, namespace: back, labels: {app: api, version: v2}}
spec:
  nodeName: node-2
  serviceAccountName: api
  containers: [{name: api, ports: [{name: http, containerPort: 8080}]}]
---
apiVersion: v1
kind: Service
metadata: {name: api-v1, namespace: back}
spec: {selector: {app: api, version: v1}, ports: [{name: http, port: 80, targetPort: http}]}
---
apiVersion: v1
kind: Service
metadata: {name: api-v2, namespace: back}
spec: {selector: {app: api, version: v2}, ports: [{name: http, port: 80, targetPort: http}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: back}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
apiVersion: v1
kind: Namespace
metadata: {name: back, labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: api-split, namespace: back}
spec:
  parentRefs: [{group: "", kind: Service, name: api, port: 80}]
  rules:
  - backendRefs: [{name: api-v1, port: 80, weight: 90}, {name: api-v2, port: 80, weight: 10}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-admin, namespace: back}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  action: DENY
  rules: [{to: [{operation: {paths: ["/admin*"]}}]}]
"#;

fn step(n: u32, title: &str) {
    println!("\n\x1b[1m== {n}. {title}\x1b[0m");
}

fn curl(lab: &Lab, marker: &str) -> Result<String, String> {
    let p = lab.state.pods.get("front/client").ok_or("no client pod")?;
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &p.netns,
            "curl",
            "-s",
            "--max-time",
            "5",
            &format!("http://10.96.0.20/{marker}"),
        ])
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!("curl failed (exit {:?})", out.status.code()))
    }
}

struct Capture {
    child: std::process::Child,
    file: std::path::PathBuf,
}

/// One request from the client to `marker` while the fabric is captured into `pcap`,
/// both shown; returns (TCP packets, of which on 15008, marker seen in plaintext).
fn request_on_the_fabric(
    lab: &Lab,
    pcap: &str,
    marker: &str,
    seen_word: &str,
) -> Result<(usize, usize, bool), String> {
    let cap = capture(lab, &lab.dir.join(pcap))?;
    let answer = curl(lab, marker)?;
    println!(
        "  client> curl http://10.96.0.20/{marker}\n  {}",
        answer.trim()
    );
    let (total, hbone, seen) = cap.finish(marker);
    println!(
        "  capture of pod traffic on the fabric: {total} TCP packets, {hbone} on port 15008, request visible in plaintext: {}",
        if seen { seen_word } else { "no" }
    );
    Ok((total, hbone, seen))
}

fn capture(lab: &Lab, file: &Path) -> Result<Capture, String> {
    let child = Command::new("ip")
        .args([
            "netns",
            "exec",
            &lab.fabric_ns(),
            "tcpdump",
            "-i",
            "br0",
            "--immediate-mode",
            "-U",
            "-n",
            "-s",
            "0",
            "-w",
        ])
        .arg(file)
        // Pod traffic only: the control plane's own TLS crosses the fabric too.
        .arg("tcp and net 10.244.0.0/16")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| format!("tcpdump: {e}"))?;
    std::thread::sleep(Duration::from_millis(700));
    Ok(Capture {
        child,
        file: file.to_path_buf(),
    })
}

impl Capture {
    /// (packets, packets to/from 15008, does the payload contain `marker`)
    fn finish(mut self, marker: &str) -> (usize, usize, bool) {
        std::thread::sleep(Duration::from_millis(300));
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
        let summary = Command::new("tcpdump")
            .args(["-r"])
            .arg(&self.file)
            .args(["-nn", "-q"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let bytes = std::fs::read(&self.file).unwrap_or_default();
        let seen = bytes.windows(marker.len()).any(|w| w == marker.as_bytes());
        let total = summary.lines().count();
        let hbone = summary.lines().filter(|l| l.contains(".15008")).count();
        (total, hbone, seen)
    }
}

/// Polls `f` until it holds, or fails after `timeout` naming what was awaited.
pub(crate) fn wait(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> bool,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Err(format!("timed out after {timeout:?} waiting for {what}"))
}

fn log(lab: &Lab, role: &str) -> String {
    lab.log_path(role)
        .ok()
        .and_then(|p| std::fs::read_to_string(p).ok())
        .unwrap_or_default()
}

pub fn run(lab: &mut Lab, keep: bool, observe: bool) -> Result<i32, String> {
    let result = scenario(lab, observe);
    if let Err(e) = &result {
        eprintln!(
            "\ndemo failed: {e}\n(logs: mesh-lab logs control|ztunnel-1|ztunnel-2|agent-1|agent-2)"
        );
    }
    if keep {
        println!(
            "\nThe lab stays up: mesh-lab status | mesh-lab exec front/client -- curl -s http://10.96.0.20/ | mesh-lab down"
        );
        if observe {
            println!(
                "Metrics: mesh-lab meshctl stat | mesh-lab meshctl top | mesh-lab dashboard (then open http://127.0.0.1:15080/: the service graph and request journeys)"
            );
        }
    } else {
        step(7, "tear down (use --keep to explore)");
        lab.down()?;
        println!("lab removed");
    }
    result.map(|_| 0)
}

fn scenario(lab: &mut Lab, observe: bool) -> Result<(), String> {
    step(
        1,
        "a cluster of 2 nodes: network namespaces on a fabric, real CNI plugins, mesh-control, and per node a ztunnel and a node agent",
    );
    // Observed from the start: the ztunnels export their spans from the first.
    lab.up_observed(2, false, observe)?;
    if observe {
        println!(
            "  Prometheus scrapes them all, in node-1's namespace on {}",
            crate::prometheus::LISTEN
        );
        println!(
            "  the dashboard receives every ztunnel's and waypoint's spans (OTLP) on {}",
            crate::traces::endpoint(&Lab::node_ip(1))
        );
    }
    print!("{}", lab.status());

    step(
        2,
        "a sample app: front/client on node-1 calls the Service back/api (10.96.0.20) served on node-2",
    );
    let tmp = lab.dir.join("demo-app.yaml");
    std::fs::write(&tmp, APP).map_err(|e| e.to_string())?;
    for line in lab.apply(APP, &tmp.to_string_lossy())? {
        println!("  {line}");
    }
    wait("the app to answer", Duration::from_secs(15), || {
        curl(lab, "warmup").is_ok()
    })?;

    step(
        3,
        "before the mesh: the same request, and what crosses the fabric",
    );
    request_on_the_fabric(lab, "plain.pcap", "before-the-mesh", "YES")?;

    step(
        4,
        "label both namespaces istio.io/dataplane-mode=ambient (no pod restarts)",
    );
    for line in lab.apply(AMBIENT, "ambient.yaml")? {
        println!("  {line}");
    }
    wait("both pods to be enrolled", Duration::from_secs(20), || {
        log(lab, "agent-1").contains("pod enrolled") && log(lab, "agent-2").contains("pod enrolled")
    })?;
    println!(
        "  node agents: pods enrolled, redirection programmed in their namespaces, handed to ztunnel"
    );

    step(
        5,
        "after: the same request, now carried over HBONE (mTLS + HTTP/2 CONNECT to port 15008)",
    );
    wait("mTLS traffic", Duration::from_secs(20), || {
        curl(lab, "probe").is_ok() && log(lab, "ztunnel-2").contains("src.identity=\"spiffe://")
    })?;
    let (total, hbone, seen) =
        request_on_the_fabric(lab, "mesh.pcap", "in-the-mesh", "YES (unexpected!)")?;
    let access = log(lab, "ztunnel-2");
    if let Some(line) = access
        .lines()
        .rev()
        .find(|l| l.contains("connection complete") && l.contains("src.identity=\"spiffe://"))
    {
        println!("  ztunnel on node-2 (inbound):\n    {}", line.trim());
    }
    let access = log(lab, "ztunnel-1");
    if let Some(line) = access
        .lines()
        .rev()
        .find(|l| l.contains("connection complete") && l.contains("dst.identity=\"spiffe://"))
    {
        println!("  ztunnel on node-1 (outbound):\n    {}", line.trim());
    }
    let port = lab
        .ztunnel_ports("ztunnel-2")
        .map_or(crate::upgrade::PORT_SETS[0].metrics, |p| p.metrics);
    let metrics = Command::new("ip")
        .args([
            "netns",
            "exec",
            &lab.node_ns(2),
            "curl",
            "-s",
            &format!("http://127.0.0.1:{port}/metrics"),
        ])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    println!("  metrics on node-2:");
    for l in metrics
        .lines()
        .filter(|l| l.starts_with("istio_tcp_connections_opened_total"))
        .take(2)
    {
        println!("    {l}");
    }
    if seen || hbone == 0 || hbone != total {
        return Err("the request did not go over HBONE".into());
    }

    step(
        6,
        "a waypoint for namespace back: an HTTPRoute sending 90% to api-v1 and 10% to api-v2, and an L7 policy denying /admin",
    );
    for line in lab.apply(WAYPOINT, "waypoint.yaml")? {
        println!("  {line}");
    }
    wait("the waypoint to route", Duration::from_secs(20), || {
        curl(lab, "probe").is_ok() && log(lab, "pod:back/waypoint").contains("backend=back/api-")
    })?;
    let (mut v1, mut v2) = (0, 0);
    for _ in 0..100 {
        let a = curl(lab, "split")?;
        if a.contains("back/api-v2") {
            v2 += 1;
        } else if a.contains("back/api:") {
            v1 += 1;
        }
    }
    println!("  100 requests through the waypoint: {v1} answered by api (v1), {v2} by api-v2");
    let p = lab.state.pods.get("front/client").ok_or("no client pod")?;
    let denied = Command::new("ip")
        .args([
            "netns",
            "exec",
            &p.netns,
            "curl",
            "-s",
            "-w",
            " (HTTP %{http_code})",
            "--max-time",
            "5",
            "http://10.96.0.20/admin/users",
        ])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    println!(
        "  client> curl http://10.96.0.20/admin/users\n  {}",
        denied.trim()
    );
    if let Some(line) = log(lab, "pod:back/waypoint")
        .lines()
        .rev()
        .find(|l| l.contains("denied by authorization policy"))
    {
        println!("  waypoint log:\n    {}", line.trim());
    }
    if observe {
        golden_metrics(lab)?;
    }
    Ok(())
}

/// The traffic above as Prometheus saw it, through `meshctl stat` and `top`.
fn golden_metrics(lab: &Lab) -> Result<(), String> {
    println!("\n  golden metrics from Prometheus (mesh-lab meshctl stat / top):");
    // Two scrapes, so the last requests are in.
    std::thread::sleep(Duration::from_secs(2 * 2 + 1));
    let meshctl = lab.bin_dir.join("meshctl");
    for args in [
        &["stat", "services", "-n", "back", "--window", "1m"][..],
        &["top", "--once", "--window", "1m", "--limit", "5"][..],
    ] {
        let out = Command::new("ip")
            .args(["netns", "exec", &lab.node_ns(1)])
            .arg(&meshctl)
            .args(args)
            .output()
            .map_err(|e| format!("meshctl: {e}"))?;
        println!("  $ meshctl {}", args.join(" "));
        for l in String::from_utf8_lossy(&out.stdout)
            .lines()
            .chain(String::from_utf8_lossy(&out.stderr).lines())
        {
            println!("    {l}");
        }
    }
    Ok(())
}
