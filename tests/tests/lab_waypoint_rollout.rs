//! A waypoint rollout drops no request, on a real lab cluster: HTTP/1.1 keep-alive
//! clients (curl, and hyper sending POSTs and never retrying one) and an HTTP/2
//! keep-alive client (hyper) send requests through the namespace's waypoint all through
//! `rollout waypoint`; none fails. Requests in flight when the old pod starts its drain
//! (held by the app until then) finish with their full answer; the old pod's process
//! exits by itself; afterwards every new request is served by the new pod, as each pod's
//! own access log and metrics show. The story runs twice: with the old pod told to stop
//! once every ztunnel has dropped it, and in Kubernetes' order (endpoint removal and
//! SIGTERM together), where its drain delay is the only cover.

use mesh_e2e::manifests::{
    BACK_USES_WAYPOINT, FRONT_AMBIENT, FRONT_CLIENT, WAYPOINT_GATEWAY, back_api, join,
};
use mesh_e2e::testlab::TestLab;
use mesh_lab::rollout::{Ended, Listing, Order};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

const OLD: &str = "back/waypoint";
const API: &str = "http://10.96.0.20";

/// What a client saw: requests answered 200 with the app's answer, and every failure.
#[derive(Default, Debug)]
struct Seen {
    ok: usize,
    /// HTTP/2 requests sent again on a new connection: never processed on their first.
    resent: Vec<String>,
    failures: Vec<String>,
}

/// `curl` from inside the pod at `netns`, `urls` one after the other on one keep-alive
/// connection (curl reconnects, and retries a request whose reused connection closed
/// before any answer, as HTTP/1.1 clients do); each URL's status code.
fn curl_keepalive(netns: &str, urls: &[String], rate: Option<&str>) -> (bool, Vec<String>) {
    let mut cmd = Command::new("ip");
    cmd.args([
        "netns",
        "exec",
        netns,
        "curl",
        "-s",
        "-S",
        "--max-time",
        "60",
    ]);
    if let Some(r) = rate {
        cmd.args(["--rate", r]);
    }
    for u in urls {
        cmd.args(["-o", "/dev/null", "-w", "%{http_code}\\n", u]);
    }
    let out = cmd.output().unwrap();
    let codes = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    if !out.status.success() {
        eprintln!("curl: {}", String::from_utf8_lossy(&out.stderr));
    }
    (out.status.success(), codes)
}

/// An HTTP/1.1 keep-alive client: batches of requests on one connection each, until
/// `stop`; counts its batches in `batches`.
fn h1_client(
    netns: String,
    tag: &'static str,
    stop: Arc<AtomicBool>,
    batches: Arc<AtomicUsize>,
) -> Seen {
    let mut seen = Seen::default();
    let mut round = 0;
    while !stop.load(Ordering::SeqCst) {
        let urls: Vec<String> = (0..20)
            .map(|i| format!("{API}/{tag}-{round}-{i}"))
            .collect();
        let (ok, codes) = curl_keepalive(&netns, &urls, Some("20/s"));
        for (i, u) in urls.iter().enumerate() {
            match codes.get(i).map(String::as_str) {
                Some("200") => seen.ok += 1,
                other => seen.failures.push(format!("{u}: {other:?}")),
            }
        }
        if !ok {
            seen.failures.push(format!("curl of round {round} failed"));
        }
        round += 1;
        batches.fetch_add(1, Ordering::SeqCst);
    }
    seen
}

type H2 = hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>>;

/// A new HTTP/2 connection to the app's Service from inside the pod at `netns`.
async fn h2_connect(netns: &str) -> Result<H2, String> {
    let to: SocketAddr = "10.96.0.20:80".parse().unwrap();
    let ns = ztunnel::netns::Netns::open(netns).unwrap();
    let tcp = ns
        .run(|| TcpStream::connect_timeout(&to, Duration::from_secs(5)))
        .unwrap()
        .map_err(|e| format!("connect: {e}"))?;
    tcp.set_nonblocking(true).unwrap();
    let io = hyper_util::rt::TokioIo::new(tokio::net::TcpStream::from_std(tcp).unwrap());
    let (sender, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
            .await
            .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(conn);
    Ok(sender)
}

/// Why an HTTP/2 request got no answer.
#[derive(Debug)]
enum H2Error {
    /// Never processed, so safe to send again on a new connection, as HTTP/2 clients do:
    /// the connection never sent it (it was going away; hyper-util's pooled client
    /// retries these), or the server's final GOAWAY said its stream was above the last
    /// one it processes (RFC 9113 §6.8; h2 fails exactly those streams with a remote
    /// GOAWAY error).
    NotSent,
    /// Sent, and failed: a dropped request (why).
    Failed(#[allow(dead_code)] String),
}

/// The server's GOAWAY (without error) named a last stream below this request's one.
fn refused_by_goaway(e: &hyper::Error) -> bool {
    std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<h2::Error>())
        .is_some_and(|h| {
            h.is_go_away() && h.is_remote() && h.reason() == Some(h2::Reason::NO_ERROR)
        })
}

/// GET `path` and read the whole answer: (status, body).
async fn h2_get(sender: &mut H2, path: &str) -> Result<(u16, String), H2Error> {
    use http_body_util::BodyExt;
    let req = http::Request::get(format!("{API}{path}"))
        .body(http_body_util::Empty::new())
        .unwrap();
    let resp = match sender.try_send_request(req).await {
        Ok(r) => r,
        Err(mut e) => {
            let not_sent = e.take_message().is_some();
            let e = e.into_error();
            return Err(if not_sent || refused_by_goaway(&e) {
                H2Error::NotSent
            } else {
                H2Error::Failed(format!("{path}: {e:?}"))
            });
        }
    };
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| H2Error::Failed(format!("{path}: body: {e}")))?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// An HTTP/2 keep-alive client: one connection for as long as it accepts requests
/// (a new one once it has been told to go away, as HTTP/2 clients do), one request at
/// a time, until `stop`. Counts the connections it made in `connections`.
async fn h2_client(
    netns: String,
    mut sender: H2,
    stop: Arc<AtomicBool>,
    connections: Arc<AtomicUsize>,
) -> (Seen, H2) {
    let mut seen = Seen::default();
    let mut i = 0;
    // The connection was told to go away: new requests go on a new one.
    let mut going_away = false;
    while !stop.load(Ordering::SeqCst) {
        // A connection that received GOAWAY (or closed) takes no new request.
        if going_away || sender.ready().await.is_err() {
            going_away = false;
            match h2_connect(&netns).await {
                Ok(s) => sender = s,
                Err(e) => {
                    seen.failures.push(format!("new connection: {e}"));
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            connections.fetch_add(1, Ordering::SeqCst);
            continue;
        }
        let path = format!("/h2-{i}");
        match h2_get(&mut sender, &path).await {
            Ok((200, body)) if body.contains(&format!(" {path} ")) => seen.ok += 1,
            Err(H2Error::NotSent) => {
                seen.resent.push(path);
                going_away = true;
                continue;
            }
            other => seen.failures.push(format!("{path}: {other:?}")),
        }
        i += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (seen, sender)
}

type H1 = hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>;

/// A new HTTP/1.1 connection to the app's Service from inside the pod at `netns`.
async fn h1_connect(netns: &str) -> Result<H1, String> {
    let to: SocketAddr = "10.96.0.20:80".parse().unwrap();
    let ns = ztunnel::netns::Netns::open(netns).unwrap();
    let tcp = ns
        .run(|| TcpStream::connect_timeout(&to, Duration::from_secs(5)))
        .unwrap()
        .map_err(|e| format!("connect: {e}"))?;
    tcp.set_nonblocking(true).unwrap();
    let io = hyper_util::rt::TokioIo::new(tokio::net::TcpStream::from_std(tcp).unwrap());
    let (sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(conn);
    Ok(sender)
}

/// An HTTP/1.1 keep-alive client that never retries: POSTs (not idempotent) one at a
/// time on one connection, a new connection only once the server said the old one ends
/// (`connection: close`) or it is seen closed before a request is sent; any request
/// without its answer (an incomplete message, a reset) is a failure. Until `stop`.
async fn h1_strict_client(netns: String, stop: Arc<AtomicBool>) -> Seen {
    use http_body_util::BodyExt;
    let mut seen = Seen::default();
    let mut sender: Option<H1> = None;
    let mut i = 0;
    while !stop.load(Ordering::SeqCst) {
        let usable = match &mut sender {
            Some(s) => s.ready().await.is_ok(),
            None => false,
        };
        let s = match (&mut sender, usable) {
            (Some(s), true) => s,
            _ => {
                match h1_connect(&netns).await {
                    Ok(s) => sender = Some(s),
                    Err(e) => {
                        seen.failures.push(format!("new connection: {e}"));
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
                continue;
            }
        };
        let path = format!("/h1strict-{i}");
        i += 1;
        let req = http::Request::post(&path)
            .header("host", "10.96.0.20")
            .body(http_body_util::Full::new(bytes::Bytes::from_static(
                b"order",
            )))
            .unwrap();
        match s.send_request(req).await {
            Ok(resp) => {
                let closes = resp
                    .headers()
                    .get("connection")
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|v| v.split(',').any(|t| t.trim() == "close"));
                let status = resp.status().as_u16();
                match resp.into_body().collect().await.map(|b| b.to_bytes()) {
                    Ok(b)
                        if status == 200
                            && String::from_utf8_lossy(&b).contains(&format!(" {path} ")) =>
                    {
                        seen.ok += 1
                    }
                    other => seen.failures.push(format!("{path}: {status} {other:?}")),
                }
                if closes {
                    sender = None;
                }
            }
            Err(e) => {
                seen.failures.push(format!("{path}: {e:?}"));
                sender = None;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    seen
}

/// Reads one HTTP/1.1 response with a `content-length`: (head, body).
fn read_response(s: &mut TcpStream) -> (String, String) {
    use std::io::Read;
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&raw).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .unwrap_or_else(|| panic!("no content-length: {head}"));
            if body.len() >= len {
                return (head.to_string(), body.to_string());
            }
        }
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "closed before a whole answer: {text:?}");
        raw.extend_from_slice(&buf[..n]);
    }
}

/// The sum of a waypoint's `istio_requests_total` series.
fn requests_total(metrics: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("istio_requests_total{"))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waypoint_rollout_drops_no_request() {
    rollout_story("wro", Order::EndpointsFirst).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waypoint_rollout_in_kubernetes_order_drops_no_request() {
    rollout_story("wrk", Order::Kubernetes).await;
}

async fn rollout_story(lab: &str, order: Order) {
    let mut t = tokio::task::block_in_place(|| {
        let mut t = TestLab::up_named(lab, 2, &["curl"]);
        t.apply(&join(&[
            FRONT_AMBIENT,
            BACK_USES_WAYPOINT,
            &back_api(),
            FRONT_CLIENT,
            WAYPOINT_GATEWAY,
        ]));
        t.eventually("traffic through the waypoint", || {
            t.curl("front/client", &format!("{API}/warm-up")).is_ok()
                && t.log(&format!("pod:{OLD}")).contains("/warm-up")
        });
        t
    });
    // The client pod's namespace: its name (for `ip netns exec`) and its path.
    let client_ns = t.lab.state.pods["front/client"].netns.clone();
    let client_ns_path = t.netns("front/client");
    let old_log: PathBuf = t.lab.log_path(&format!("pod:{OLD}")).unwrap();
    let old_pid = t.lab.process(&format!("pod:{OLD}")).unwrap().pid;

    // Requests in flight when the old pod is told to stop: the app holds them until the
    // lab has sent SIGTERM. They reach the old pod, the only one yet.
    let lab_dir = t.lab.dir.clone();
    let (h1_arrived, h1_release) = mesh_lab::app::hold_files(&lab_dir, "h1slow");
    let (h2_arrived, h2_release) = mesh_lab::app::hold_files(&lab_dir, "h2slow");
    // A keep-alive HTTP/1.1 connection (a client that never retries) that served one
    // request: its next one is partly written before the rollout and finished only once
    // the old pod's drain proper has started.
    let mut partial = {
        use std::io::Write;
        let ns = ztunnel::netns::Netns::open(&client_ns_path).unwrap();
        let to: SocketAddr = "10.96.0.20:80".parse().unwrap();
        let mut s = ns
            .run(|| TcpStream::connect_timeout(&to, Duration::from_secs(5)))
            .unwrap()
            .unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        s.write_all(b"GET /partial-first HTTP/1.1\r\nhost: 10.96.0.20\r\n\r\n")
            .unwrap();
        let (head, _) = read_response(&mut s);
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        s.write_all(b"POST /partial-second HTTP/1.1\r\nhost: 10.96.0.20\r\n")
            .unwrap();
        s
    };
    let held_h1 = {
        let ns = client_ns.clone();
        std::thread::spawn(move || curl_keepalive(&ns, &[format!("{API}/hold/h1slow")], None))
    };
    let mut sender = h2_connect(&client_ns_path).await.unwrap();
    let held_h2 = {
        let mut s = sender.clone();
        tokio::spawn(async move { h2_get(&mut s, "/hold/h2slow").await })
    };
    tokio::task::block_in_place(|| {
        t.eventually("the held requests at the app", || {
            h1_arrived.exists() && h2_arrived.exists()
        })
    });
    assert!(h2_get(&mut sender, "/h2-before").await.is_ok());

    // The keep-alive clients, all through the rollout.
    let stop = Arc::new(AtomicBool::new(false));
    let h1_batches: Vec<Arc<AtomicUsize>> = (0..2).map(|_| Arc::default()).collect();
    let h1: Vec<_> = ["h1a", "h1b"]
        .into_iter()
        .zip(&h1_batches)
        .map(|(tag, batches)| {
            let (ns, stop, batches) = (client_ns.clone(), stop.clone(), batches.clone());
            std::thread::spawn(move || h1_client(ns, tag, stop, batches))
        })
        .collect();
    let strict = tokio::spawn(h1_strict_client(client_ns_path.clone(), stop.clone()));
    let h2_connections = Arc::new(AtomicUsize::new(1));
    let h2 = tokio::spawn(h2_client(
        client_ns_path.clone(),
        sender,
        stop.clone(),
        h2_connections.clone(),
    ));

    // When the old pod is told to stop: what every ztunnel holds of it, and new
    // requests (each on a new connection) made meanwhile; then, once its drain proper
    // has started (after its drain delay), the held requests are released.
    let nodes: Vec<String> = (1..=2).map(|i| t.lab.node_ns(i)).collect();
    let old_ip = t.lab.state.pods[OLD].ip.clone();
    let mut at_sigterm = Vec::new();
    let mut during_drain = Vec::new();
    let mut events = Vec::new();
    // Whether the old pod's drain proper (`draining … open=N`) began while the requests
    // were held: what the rest of the story relies on.
    let mut drain_seen = false;
    // The new pod runs the binary given (an upgrade): here the same build, under
    // another name.
    let new_binary = t.lab.dir.join("waypoint-next");
    std::os::unix::fs::symlink(t.lab.bin_dir.join("waypoint"), &new_binary).unwrap();
    let report = tokio::task::block_in_place(|| {
        t.lab
            .rollout_waypoint("back", "waypoint", Some(&new_binary), order, &mut |e| {
                events.push(e.to_string());
                if e.contains("sent SIGTERM") {
                    for n in &nodes {
                        at_sigterm.push((n.clone(), TestLab::ztunnel_lists(n, &old_ip)));
                    }
                    for i in 0..5 {
                        let url = format!("{API}/during-drain-{i}");
                        during_drain.push(curl_keepalive(&client_ns, &[url], None));
                    }
                    for _ in 0..600 {
                        let log = std::fs::read_to_string(&old_log).unwrap_or_default();
                        if log
                            .lines()
                            .any(|l| l.contains("draining") && l.contains("open="))
                        {
                            drain_seen = true;
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    {
                        use std::io::Write;
                        partial
                            .write_all(b"content-length: 5\r\n\r\norder")
                            .unwrap();
                    }
                    std::fs::write(&h1_release, b"").unwrap();
                    std::fs::write(&h2_release, b"").unwrap();
                }
            })
            .unwrap_or_else(|e| panic!("rollout: {e}\n{events:#?}{}", t.all_logs()))
    });
    eprintln!("rollout: {events:#?}");
    assert!(
        drain_seen,
        "the old pod began its drain proper (draining … open=) while requests were in flight:\n{}",
        std::fs::read_to_string(&old_log).unwrap_or_default()
    );
    let new = report.new_pod.clone();
    assert_eq!(
        report.old_pods,
        vec![(OLD.to_string(), Some(Ended::Exited))],
        "the old pod drained and exited by itself: {events:#?}"
    );
    assert!(!mesh_lab::ending::alive(old_pid));
    let new_pid = t.lab.process(&format!("pod:{new}")).unwrap().pid;
    let cmdline = std::fs::read(format!("/proc/{new_pid}/cmdline")).unwrap();
    assert!(
        cmdline
            .split(|b| *b == 0)
            .next()
            .is_some_and(|argv0| argv0 == new_binary.as_os_str().as_encoded_bytes()),
        "the new pod runs {}",
        new_binary.display()
    );
    // Endpoints first: no ztunnel sent new connections to the old pod any more when it
    // was told to stop (in Kubernetes' order they may: the drain delay covers them).
    assert_eq!(at_sigterm.len(), 2);
    for (node, l) in &at_sigterm {
        assert!(
            order == Order::Kubernetes || *l != Listing::Healthy,
            "{node}'s ztunnel still sent to the old pod at SIGTERM"
        );
    }
    assert!(
        during_drain
            .iter()
            .all(|(ok, codes)| *ok && codes == &["200"]),
        "new requests while the old pod drained: {during_drain:?}"
    );

    // The clients keep going after it (a whole batch each started after it), then stop.
    let marks: Vec<usize> = h1_batches
        .iter()
        .map(|b| b.load(Ordering::SeqCst))
        .collect();
    tokio::task::block_in_place(|| {
        t.eventually("the clients carry on after the rollout", || {
            h1_batches
                .iter()
                .zip(&marks)
                .all(|(b, m)| b.load(Ordering::SeqCst) >= m + 2)
        })
    });
    stop.store(true, Ordering::SeqCst);
    let mut h1_seen = Vec::new();
    for c in h1 {
        h1_seen.push(c.join().unwrap());
    }
    h1_seen.push(strict.await.unwrap());
    let (h2_seen, mut sender) = h2.await.unwrap();
    for s in h1_seen.iter().chain([&h2_seen]) {
        assert!(
            s.failures.is_empty() && s.ok > 0,
            "failed requests during the rollout: {s:?}\n{events:#?}"
        );
    }
    // Each client was served by the old pod, then by the new one (each pod's own log).
    let new_log = t.log(&format!("pod:{new}"));
    let old_text = std::fs::read_to_string(&old_log).unwrap();
    for tag in ["/h1a-", "/h1b-", "/h1strict-", "/h2-"] {
        assert!(
            old_text.contains(&format!("path={tag}")) && new_log.contains(&format!("path={tag}")),
            "{tag}* requests reached both pods"
        );
    }
    eprintln!("served: {h1_seen:?} {h2_seen:?}");
    // A request sent again was indeed never processed by the old pod (its GOAWAY named
    // the right last stream); the new pod served it.
    for p in &h2_seen.resent {
        assert!(
            !old_text.contains(&format!("path={p} ")),
            "{p} was processed by the old pod"
        );
        assert!(
            new_log.contains(&format!("path={p} ")),
            "{p} was served by the new pod"
        );
    }
    assert!(
        h2_connections.load(Ordering::SeqCst) >= 2,
        "the HTTP/2 client moved to a new connection when the old pod went away"
    );

    // The request partly sent when the drain started was answered, with the end of its
    // connection.
    let (head, body) = read_response(&mut partial);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.lines()
            .any(|l| l.eq_ignore_ascii_case("connection: close")),
        "{head}"
    );
    assert!(body.contains(" /partial-second "), "{body}");
    assert!(old_text.contains("path=/partial-second "));
    // The requests in flight at SIGTERM finished with their whole answer.
    // (A hold never released answers 504.)
    let (ok, codes) = held_h1.join().unwrap();
    assert!(ok && codes == ["200"], "held HTTP/1.1 request: {codes:?}");
    let (status, body) = held_h2.await.unwrap().expect("the held HTTP/2 request");
    assert_eq!(status, 200);
    assert!(
        body.starts_with("hello from back/api: ")
            && body.contains(" /hold/h2slow ")
            && body.ends_with('\n'),
        "{body}"
    );
    assert!(old_text.contains("path=/hold/h1slow") && old_text.contains("path=/hold/h2slow"));
    // The old pod drained: it did not wait for its deadline.
    assert!(
        old_text.contains("drained") && !old_text.contains("drain deadline passed"),
        "{old_text}"
    );

    // From now on, every new request is served by the new pod: the old one's record
    // (its log, kept after it exited) has none of them, the new one's has all.
    let before = requests_total(&t.waypoint_metrics(&new));
    let urls: Vec<String> = (0..10).map(|i| format!("{API}/after-h1-{i}")).collect();
    let (ok, codes) = tokio::task::block_in_place(|| curl_keepalive(&client_ns, &urls, None));
    assert!(ok && codes.iter().all(|c| c == "200"), "{codes:?}");
    for i in 0..10 {
        let (status, _) = h2_get(&mut sender, &format!("/after-h2-{i}"))
            .await
            .unwrap();
        assert_eq!(status, 200);
    }
    let after = requests_total(&t.waypoint_metrics(&new));
    assert_eq!(
        after - before,
        20.0,
        "the new pod counted every new request"
    );
    let new_log = t.log(&format!("pod:{new}"));
    for i in 0..10 {
        // (In Kubernetes' order, the old pod may still have served these in its delay.)
        let drain = (i < 5 && order == Order::EndpointsFirst).then(|| format!("/during-drain-{i}"));
        for p in [format!("/after-h1-{i}"), format!("/after-h2-{i}")]
            .into_iter()
            .chain(drain)
        {
            assert!(
                new_log.contains(&format!("path={p} ")),
                "{p} in the new pod's log"
            );
            assert!(!old_text.contains(&p), "{p} not in the old pod's log");
        }
    }
    // The old pod is gone from the cluster; the lab knows one waypoint pod, also after
    // the Gateway is applied again.
    assert_eq!(t.lab.waypoint_pods("back", "waypoint"), vec![new.clone()]);
    assert!(!t.lab.state.pods.contains_key(OLD));
    tokio::task::block_in_place(|| t.apply(WAYPOINT_GATEWAY));
    assert_eq!(t.lab.waypoint_pods("back", "waypoint"), vec![new]);
}

/// A rollout whose new pod never gets ready (its binary exits at once) is rolled back:
/// the surge pod is removed, and the old pod, never touched, keeps serving.
#[test]
fn a_rollout_whose_new_pod_never_gets_ready_is_rolled_back() {
    let mut t = TestLab::up_named("wrb", 2, &["curl"]);
    t.apply(&join(&[
        FRONT_AMBIENT,
        BACK_USES_WAYPOINT,
        &back_api(),
        FRONT_CLIENT,
        WAYPOINT_GATEWAY,
    ]));
    t.eventually("traffic through the waypoint", || {
        t.curl("front/client", &format!("{API}/warm-up")).is_ok()
            && t.log(&format!("pod:{OLD}")).contains("/warm-up")
    });
    let old_pid = t.lab.process(&format!("pod:{OLD}")).unwrap().pid;
    let broken = t.lab.dir.join("waypoint-broken");
    std::os::unix::fs::symlink("/bin/false", &broken).unwrap();
    let mut events = Vec::new();
    let e = t
        .lab
        .rollout_waypoint(
            "back",
            "waypoint",
            Some(&broken),
            Order::Kubernetes,
            &mut |e| events.push(e.to_string()),
        )
        .expect_err("the new pod never gets ready");
    assert!(
        e.contains("exited before it was ready") && e.contains("rolled back"),
        "{e}"
    );
    assert!(
        !events.iter().any(|e| e.contains(&format!("pod {OLD} "))),
        "the old pod was never touched: {events:?}"
    );
    assert_eq!(
        t.lab.waypoint_pods("back", "waypoint"),
        vec![OLD.to_string()]
    );
    assert!(mesh_lab::ending::alive(old_pid));
    let manifests = std::fs::read_dir(t.lab.dir.join("manifests"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("pod-back-waypoint-"))
        .collect::<Vec<_>>();
    assert!(
        manifests.is_empty(),
        "the surge pod's manifest is gone: {manifests:?}"
    );
    let body = t
        .curl("front/client", &format!("{API}/after-rollback"))
        .unwrap();
    assert!(body.contains("/after-rollback"), "{body}");
    assert!(t.log(&format!("pod:{OLD}")).contains("/after-rollback"));
}
