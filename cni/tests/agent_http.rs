//! The node agent's readiness port (`mesh-cni agent --readiness-addr`), over real
//! loopback TCP against the real binary: idle and slow clients never hold readiness,
//! each path is routed, a request head split across reads is still read whole.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_mesh-cni");
/// A bound only a broken agent reaches (not a speed assertion).
const NEVER: Duration = Duration::from_secs(20);

/// The agent process, killed (by its PID) and its files removed even on failure.
struct Agent {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The address the agent logs once it listens: it binds port 0 itself, so no other
/// process can take the port between choosing and binding it.
fn bound_addr(line: &str) -> Option<SocketAddr> {
    if !line.contains("serving /readyz") {
        return None;
    }
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("addr="))
        .and_then(|a| a.parse().ok())
}

/// The agent's command line, its files in `dir`: a control plane that never answers
/// (port 9 on loopback: nothing listens), so it stays not ready; no host rules, no /proc
/// scan; its log on a pipe.
fn agent_command(dir: &std::path::Path, readiness: &str) -> Command {
    let p = |n: &str| dir.join(n);
    std::fs::create_dir_all(p("zds")).unwrap();
    std::fs::create_dir_all(p("plugin")).unwrap();
    std::fs::write(p("root.pem"), "").unwrap();
    std::fs::write(p("token"), "t").unwrap();
    let mut c = Command::new(BIN);
    c.arg("agent")
        .args([
            "--node-name",
            "node-1",
            "--xds-address",
            "https://127.0.0.1:9",
        ])
        .arg("--root-cert")
        .arg(p("root.pem"))
        .arg("--token-file")
        .arg(p("token"))
        .arg("--zds-socket")
        .arg(p("zds/ztunnel.sock"))
        .arg("--agent-socket")
        .arg(p("plugin/agent.sock"))
        .args(["--host-probe-snat=false", "--proc-dir", ""])
        .arg(format!("--readiness-addr={readiness}"))
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    c
}

/// A running agent, not ready (see [`agent_command`]), on a port it chose.
fn start() -> Agent {
    let dir = tempfile::tempdir().unwrap();
    let mut child = agent_command(dir.path(), "127.0.0.1:0").spawn().unwrap();
    // The log is read on a thread of its own to the end, so the agent never blocks on a
    // full pipe; the first address it reports is handed back.
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        use std::io::BufRead;
        let mut tx = Some(tx);
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(addr) = bound_addr(&line)
                && let Some(tx) = tx.take()
            {
                let _ = tx.send(addr);
            }
        }
    });
    let addr = match rx.recv_timeout(NEVER) {
        Ok(a) => a,
        Err(_) => {
            let _ = child.kill();
            let status = child.wait();
            panic!("the agent never reported its readiness address (exit: {status:?})");
        }
    };
    Agent {
        child,
        addr,
        _dir: dir,
    }
}

/// Sends `parts` (each written and flushed apart) and reads the whole answer.
fn exchange(addr: SocketAddr, parts: &[&[u8]]) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(NEVER)).unwrap();
    s.set_nodelay(true).unwrap();
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            // Lets the agent read what came so far on its own (not a timing assertion).
            std::thread::sleep(Duration::from_millis(300));
        }
        s.write_all(p).unwrap();
        s.flush().unwrap();
    }
    let mut out = Vec::new();
    s.read_to_end(&mut out)
        .expect("the agent answers and closes the connection in time");
    String::from_utf8_lossy(&out).into_owned()
}

fn get(addr: SocketAddr, path: &str) -> String {
    exchange(
        addr,
        &[format!("GET {path} HTTP/1.1\r\nHost: agent\r\n\r\n").as_bytes()],
    )
}

#[test]
fn idle_connections_do_not_hold_readiness() {
    let agent = start();
    // Connections that never send, and one that stops mid-head.
    let idle: Vec<TcpStream> = (0..20)
        .map(|_| TcpStream::connect(agent.addr).unwrap())
        .collect();
    let mut half = TcpStream::connect(agent.addr).unwrap();
    half.write_all(b"GET /readyz HTTP/1.1\r\nHo").unwrap();
    let r = get(agent.addr, "/readyz");
    assert!(r.starts_with("HTTP/1.1 503 Service Unavailable\r\n"), "{r}");
    assert!(
        r.ends_with("\r\n\r\nwaiting for the control plane\n"),
        "{r}"
    );
    drop((idle, half));
}

#[test]
fn a_request_head_split_across_reads_is_routed_whole() {
    let agent = start();
    let r = exchange(
        agent.addr,
        &[b"GET /metr", b"ics HTTP/1.1\r\nHost: agent\r\n\r\n"],
    );
    assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
    assert!(r.contains("mesh_cni_ztunnel_connections"), "{r}");
}

#[test]
fn paths_are_routed() {
    let agent = start();
    let r = get(agent.addr, "/metrics");
    assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
    assert!(r.contains("\nmesh_cni_ztunnel_connections"), "{r}");
    // Prometheus 3 refuses a scrape without a content-type.
    assert!(
        r.to_lowercase()
            .contains("\r\ncontent-type: text/plain; version=0.0.4; charset=utf-8\r\n"),
        "{r}"
    );
    let r = get(agent.addr, "/enrolment");
    assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
    let body: serde_json::Value =
        serde_json::from_str(r.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(
        (&body["node"], &body["ready"]),
        (&"node-1".into(), &false.into())
    );
    // Unknown paths are not read as readiness.
    let r = get(agent.addr, "/nothing-here");
    assert!(r.starts_with("HTTP/1.1 404 Not Found\r\n"), "{r}");
    let r = exchange(
        agent.addr,
        &[b"POST /readyz HTTP/1.1\r\nHost: agent\r\nContent-Length: 0\r\n\r\n"],
    );
    assert!(r.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"), "{r}");
}

#[test]
fn a_readiness_port_taken_by_another_process_stops_the_agent() {
    // Listening, so the agent's bind fails; a running agent the kubelet can never probe
    // would look healthy to everyone but the kubelet.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut child = agent_command(dir.path(), &taken.local_addr().unwrap().to_string())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + NEVER;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the agent kept running without its readiness port");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut log = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains("cannot serve /readyz and /metrics"), "{log}");
    assert!(log.contains("is another process using the port?"), "{log}");
}
