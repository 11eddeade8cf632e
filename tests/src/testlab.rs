//! A lab cluster for a test: up in a private state directory under a unique name, torn
//! down (processes, namespaces, cgroups) when dropped, also when the test panics; and
//! the ways a test talks to it (from inside a pod, to a component's log, to meshctl).

use crate::cluster::{Capture, capture_in, capture_in_snaplen, wait_until};
use crate::net::unique;
use crate::{binary, require_tool};
use mesh_lab::ip_family::IpFamily;
use mesh_lab::lab::Lab;
use std::process::Command;
use std::time::{Duration, Instant};

pub struct TestLab {
    pub lab: Lab,
    _root: tempfile::TempDir,
}

impl Drop for TestLab {
    fn drop(&mut self) {
        let _ = self.lab.down();
    }
}

impl TestLab {
    /// A lab of `nodes` nodes, with the workspace's binaries; curl and tcpdump required.
    pub fn up(nodes: usize) -> TestLab {
        TestLab::up_named("l", nodes, &["curl", "tcpdump"])
    }

    /// A lab of `nodes` nodes named after `tag` (made unique), requiring `tools` first.
    pub fn up_named(tag: &str, nodes: usize, tools: &[&str]) -> TestLab {
        TestLab::up_family(tag, nodes, tools, false)
    }

    /// [`TestLab::up_named`], its pods `dual_stack` (an IPv4 and an IPv6 address each).
    pub fn up_family(tag: &str, nodes: usize, tools: &[&str], dual_stack: bool) -> TestLab {
        let family = if dual_stack {
            IpFamily::DualStack
        } else {
            IpFamily::Ipv4
        };
        TestLab::up_lab(tag, nodes, tools, family, false)
    }

    /// [`TestLab::up_named`] as `mesh-lab up --ip-family ipv6` makes it: pods with an
    /// IPv6 address only, Services with IPv6 VIPs.
    pub fn up_ipv6_only(tag: &str, nodes: usize, tools: &[&str]) -> TestLab {
        TestLab::up_lab(tag, nodes, tools, IpFamily::Ipv6, false)
    }

    /// [`TestLab::up_named`] as `mesh-lab up --observe` makes it: with Prometheus, the
    /// dashboard and its trace receiver.
    pub fn up_observed(tag: &str, nodes: usize, tools: &[&str]) -> TestLab {
        TestLab::up_lab(tag, nodes, tools, IpFamily::Ipv4, true)
    }

    fn up_lab(tag: &str, nodes: usize, tools: &[&str], family: IpFamily, observe: bool) -> TestLab {
        for tool in tools {
            require_tool(tool);
        }
        let root = tempfile::tempdir().unwrap();
        let bins = binary("ztunnel").parent().unwrap().to_path_buf();
        let mut lab = Lab::open_with_binaries(&unique(tag), root.path(), &bins).unwrap();
        let up = lab.up_family(nodes, family, observe);
        // Dropped (torn down) before failing when only part of it came up.
        let t = TestLab { lab, _root: root };
        up.unwrap();
        t
    }

    pub fn apply(&mut self, yaml: &str) {
        self.lab.apply(yaml, "test.yaml").unwrap();
    }

    /// A manifest the cluster holds under `file` (replaced when held again), written
    /// straight into the control plane's manifest directory, unvalidated: as an API
    /// server that accepted it would hold it (`apply` validates first).
    pub fn hold_manifest(&self, file: &str, yaml: &str) {
        let dir = self.lab.dir.join("manifests");
        let tmp = dir.join(format!("{file}.tmp"));
        std::fs::write(&tmp, yaml).unwrap();
        std::fs::rename(&tmp, dir.join(format!("{file}.yaml"))).unwrap();
    }

    /// A component's whole log (every run of it).
    pub fn log(&self, role: &str) -> String {
        std::fs::read_to_string(self.lab.log_path(role).unwrap()).unwrap_or_default()
    }

    /// Every component's log, for failure messages.
    pub fn all_logs(&self) -> String {
        let mut out = String::new();
        for p in &self.lab.state.procs {
            out.push_str(&format!(
                "\n----- {} -----\n{}",
                p.role,
                std::fs::read_to_string(&p.log).unwrap_or_default()
            ));
        }
        out
    }

    /// How long `role`'s log is now: an offset for [`TestLab::log_since`], so a check
    /// reads only the lines a later event wrote.
    pub fn log_len(&self, role: &str) -> usize {
        std::fs::metadata(self.lab.log_path(role).unwrap()).map_or(0, |m| m.len() as usize)
    }

    /// What `role`'s log gained after `offset` (from [`TestLab::log_len`]).
    pub fn log_since(&self, role: &str, offset: usize) -> String {
        let all = std::fs::read(self.lab.log_path(role).unwrap()).unwrap_or_default();
        String::from_utf8_lossy(all.get(offset..).unwrap_or_default()).into_owned()
    }

    /// Waits until `role`'s log gains a line containing `needle` after `offset`.
    pub fn wait_log_since(&self, role: &str, offset: usize, needle: &str) {
        wait_until(
            &format!("{needle:?} in {role}'s log after byte {offset}"),
            || self.log_since(role, offset).contains(needle),
        );
    }

    /// Waits for `needle` anywhere in `role`'s log, every run of it: for lines no later
    /// event could be needed for (use [`TestLab::wait_log_since`] otherwise).
    pub fn wait_log(&self, role: &str, needle: &str) {
        wait_until(&format!("{needle:?} in {role}'s log"), || {
            self.log(role).contains(needle)
        });
    }

    /// Polls `f` every 200 ms for up to 30 s (the configuration travels control → data
    /// plane); on timeout, panics with every component's log.
    pub fn eventually(&self, what: &str, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if f() {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("timed out waiting for {what}{}", self.all_logs());
    }

    /// A pod's network namespace, as a path.
    pub fn netns(&self, pod: &str) -> String {
        format!("/var/run/netns/{}", self.lab.state.pods[pod].netns)
    }

    /// A command to run inside a pod's network namespace: `ip netns exec <its netns>`,
    /// to which the caller adds the program and its arguments.
    pub fn in_pod(&self, pod: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.lab.state.pods[pod].netns]);
        cmd
    }

    /// curl from inside a pod; `Err` when the request fails.
    pub fn curl(&self, pod: &str, url: &str) -> Result<String, String> {
        let out = self
            .in_pod(pod)
            .args(["curl", "-s", "--max-time", "5", url])
            .output()
            .unwrap();
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!("curl exit {:?}", out.status.code()))
        }
    }

    /// curl from inside a pod with `args`, the path exactly as written (the waypoint
    /// normalises it, not curl); (status, headers and body), status 0 for no answer.
    pub fn curl_response(&self, pod: &str, args: &[&str]) -> (u16, String) {
        let out = self
            .in_pod(pod)
            .args(["curl", "-s", "-i", "--max-time", "5", "--path-as-is"])
            .args(args)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        (status, text)
    }

    /// curl's exit code for a request from inside a pod: 0 answered, 7 refused (nothing
    /// listening, or a reset at connect), 28 timed out, 52/56 closed after the
    /// connection was set up (how a proxy's policy denial looks to a plaintext client).
    pub fn curl_exit(&self, pod: &str, url: &str) -> i32 {
        let out = self
            .in_pod(pod)
            .args(["curl", "-s", "-o", "/dev/null", "--max-time", "5", url])
            .output()
            .unwrap();
        out.status.code().unwrap_or(-1)
    }

    /// The HTTP status a request from inside a pod gets ("000": no answer at all), the
    /// path exactly as written (the waypoint normalises it, not curl).
    pub fn status(&self, pod: &str, url: &str) -> String {
        let out = self
            .in_pod(pod)
            .args([
                "curl",
                "-s",
                "--path-as-is",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--max-time",
                "5",
                url,
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Raw TCP from inside a pod: send, half-close, read everything.
    pub fn tcp(&self, pod: &str, to: &str, msg: &str) -> std::io::Result<String> {
        use std::io::{Read, Write};
        let to: std::net::SocketAddr = to.parse().unwrap();
        let ns = ztunnel::netns::Netns::open(&self.netns(pod))?;
        let mut s =
            ns.run(|| std::net::TcpStream::connect_timeout(&to, Duration::from_secs(5)))??;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(msg.as_bytes())?;
        s.shutdown(std::net::Shutdown::Write)?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    }

    /// A waypoint pod's metrics (its port 15020), read from inside the pod.
    pub fn waypoint_metrics(&self, pod: &str) -> String {
        let out = self
            .in_pod(pod)
            .args(["curl", "-s", "http://127.0.0.1:15020/metrics"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `meshctl` against the control plane's debug API (on node 1); stdout then stderr.
    pub fn meshctl(&self, args: &[&str]) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.lab.node_ns(1)])
            .arg(binary("meshctl"))
            .args(["--control", "127.0.0.1:15014"])
            .args(args)
            .output()
            .unwrap();
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    /// The lab's Prometheus API (`/api/v1/...`), asked from node 1 where it listens;
    /// `params` are URL-encoded by curl. The parsed JSON answer.
    pub fn prometheus(&self, api: &str, params: &[(&str, &str)]) -> serde_json::Value {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.lab.node_ns(1)]).args([
            "curl",
            "-s",
            "--max-time",
            "5",
            "-G",
        ]);
        for (k, v) in params {
            cmd.args(["--data-urlencode", &format!("{k}={v}")]);
        }
        let out = cmd
            .arg(format!(
                "http://{}/api/v1/{api}",
                mesh_lab::prometheus::LISTEN
            ))
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
    }

    /// An instant PromQL query: each series' labels and value.
    pub fn promql(&self, query: &str) -> Vec<(serde_json::Value, f64)> {
        let v = self.prometheus("query", &[("query", query)]);
        v["data"]["result"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|r| {
                let value = r["value"][1]
                    .as_str()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(f64::NAN);
                (r["metric"].clone(), value)
            })
            .collect()
    }

    /// `meshctl` run on node `node` (its node agent answers on 127.0.0.1:8000 there):
    /// (exit success, stdout then stderr).
    pub fn meshctl_on(&self, node: usize, args: &[&str]) -> (bool, String) {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.lab.node_ns(node)])
            .arg(binary("meshctl"))
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    /// A node agent's metrics (its readiness address, inside the node's namespace).
    pub fn agent_metrics(&self, node: usize) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.lab.node_ns(node)])
            .args([
                "curl",
                "-s",
                "--max-time",
                "5",
                "http://127.0.0.1:8000/metrics",
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The metrics page of the ztunnel process recorded for `role` (`ztunnel-N`, or
    /// `ztunnel-N-old` during an upgrade), read on that process's own metrics port in
    /// its node's namespace; empty when it does not answer.
    pub fn ztunnel_metrics(&self, role: &str) -> String {
        let node =
            mesh_lab::upgrade::node_of(role).unwrap_or_else(|| panic!("{role}: not a ztunnel"));
        let port = self
            .lab
            .ztunnel_ports(role)
            .unwrap_or_else(|| panic!("no process {role} in the lab"))
            .metrics;
        let out = Command::new("ip")
            .args(["netns", "exec", &self.lab.node_ns(node)])
            .args(["curl", "-s", "--max-time", "5"])
            .arg(format!("http://127.0.0.1:{port}/metrics"))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `mesh-lab upgrade ztunnel-N`: (old PID, new PID).
    pub fn upgrade_ztunnel(&mut self, node: usize) -> (u32, u32) {
        match self.lab.upgrade_ztunnel(node, None) {
            Ok(u) => (u.old_pid, u.new_pid),
            Err(e) => panic!("upgrade of ztunnel-{node}: {e}{}", self.all_logs()),
        }
    }

    /// [`TestLab::capture`], keeping the first `snaplen` bytes of each packet: enough
    /// for the headers and the start of each segment's payload, through a long transfer.
    pub fn capture_headers(&self, name: &str, snaplen: u32) -> Capture {
        capture_in_snaplen(
            &self.lab.fabric_ns(),
            "br0",
            &self.lab.dir,
            name,
            "tcp and net 10.244.0.0/16",
            snaplen,
        )
    }

    /// A capture of pod traffic only on the fabric's bridge (the control plane's own TLS
    /// also crosses the fabric), written as `<name>.pcap` in the lab's directory.
    pub fn capture(&self, name: &str) -> Capture {
        capture_in(
            &self.lab.fabric_ns(),
            "br0",
            &self.lab.dir,
            name,
            "tcp and net 10.244.0.0/16",
        )
    }
}

impl TestLab {
    /// A TCP connection made from inside a pod's namespace (so its redirection applies),
    /// with a 10 s read timeout.
    pub fn connect_from(&self, pod: &str, to: &str) -> std::net::TcpStream {
        let to: std::net::SocketAddr = to.parse().unwrap();
        let ns = ztunnel::netns::Netns::open(&self.netns(pod)).unwrap();
        let s = ns
            .run(|| std::net::TcpStream::connect_timeout(&to, Duration::from_secs(5)))
            .unwrap()
            .unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s
    }

    /// How the ztunnel of the node namespace `node_ns` (on its first admin port) lists the
    /// workload at `ip`: for callers that cannot borrow the lab.
    pub fn ztunnel_lists(node_ns: &str, ip: &str) -> mesh_lab::rollout::Listing {
        let admin = mesh_lab::upgrade::PORT_SETS[0].admin;
        let dump = mesh_lab::rollout::ztunnel_dump_in(node_ns, admin)
            .unwrap_or_else(|| panic!("{node_ns}'s ztunnel: no /config_dump"));
        mesh_lab::rollout::listing(&dump, ip)
    }

    /// Whether pod `pod` is a healthy workload to the ztunnel of every node: until then a
    /// client's ztunnel does not tunnel to it and the pod's own refuses what reaches it
    /// (the node agent may confirm a pod before the control plane has published it).
    pub fn known_to_every_ztunnel(&self, pod: &str) -> bool {
        let ip = &self.lab.state.pods[pod].ip;
        (1..=self.lab.state.nodes).all(|n| {
            self.lab.ztunnel_dump(n).is_some_and(|dump| {
                mesh_lab::rollout::listing(&dump, ip) == mesh_lab::rollout::Listing::Healthy
            })
        })
    }

    /// Whether `meshctl enrolment` on `node` says `pod` is confirmed.
    pub fn confirmed(&self, node: usize, pod: &str) -> bool {
        let (ok, out) = self.meshctl_on(node, &["enrolment"]);
        ok && out
            .lines()
            .any(|l| l.contains(pod) && l.trim_end().ends_with("confirmed"))
    }
}

/// Sends `n` bytes of a pattern that depends on `offset` on a connection to an echo
/// server and reads the echo back, whole (a byte lost, reordered or changed fails).
pub fn echo_chunk(s: &mut std::net::TcpStream, offset: usize, n: usize) {
    use std::io::{Read, Write};
    let sent: Vec<u8> = (offset..offset + n).map(|i| (i % 251) as u8).collect();
    s.write_all(&sent)
        .unwrap_or_else(|e| panic!("write at byte {offset}: {e}"));
    let mut got = vec![0u8; n];
    s.read_exact(&mut got)
        .unwrap_or_else(|e| panic!("echo of bytes {offset}..{}: {e}", offset + n));
    assert!(
        got == sent,
        "the echo of bytes {offset}..{} differs",
        offset + n
    );
}

/// The sum of metric `name` in a Prometheus/OpenMetrics page over its series carrying
/// every label of `labels` (each written `key="value"`).
pub fn metric_sum(page: &str, name: &str, labels: &[&str]) -> f64 {
    page.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(['{', ' ']))
        })
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Waits up to `timeout` for process `pid` to be gone (or a zombie of this test, which
/// started it); whether it is.
pub fn wait_exit(pid: u32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if !mesh_lab::ending::alive(pid) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    false
}

/// An IP as it goes in a URL or `host:port` (IPv6 in brackets).
pub fn url_host(ip: &str) -> String {
    if ip.contains(':') {
        format!("[{ip}]")
    } else {
        ip.to_string()
    }
}

/// `http://<ip>/<path>`.
pub fn url(ip: &str, path: &str) -> String {
    format!("http://{}/{path}", url_host(ip))
}

/// Whether a line of the access log `log` about a connection from `ip` contains `needle`.
pub fn logged_from(log: &str, ip: &str, needle: &str) -> bool {
    let from = format!("src.addr={}:", url_host(ip));
    log.lines().any(|l| l.contains(&from) && l.contains(needle))
}

#[cfg(test)]
mod tests {
    use super::metric_sum;

    #[test]
    fn metric_sum_adds_the_series_with_the_labels_asked_for() {
        let page = "# TYPE istio_tcp_connections_opened counter\n\
            istio_tcp_connections_opened_total{reporter=\"source\",x=\"a\"} 3\n\
            istio_tcp_connections_opened_total{reporter=\"destination\"} 5\n\
            istio_tcp_connections_opened_total{reporter=\"source\",x=\"b\"} 4\n\
            istio_tcp_connections_opened_totalx{reporter=\"source\"} 100\n";
        let name = "istio_tcp_connections_opened_total";
        assert_eq!(metric_sum(page, name, &["reporter=\"source\""]), 7.0);
        assert_eq!(metric_sum(page, name, &[]), 12.0);
        assert_eq!(metric_sum(page, name, &["x=\"b\""]), 4.0);
        assert_eq!(metric_sum("", name, &[]), 0.0);
    }
}
