//! The lab's sample app, run inside pods: an HTTP server (HTTP/1.1 and h2c) that says who
//! it is and who called, and a raw TCP echo server. Each request and each echo
//! connection is logged (one line on stdout), so a test can check what the app itself saw.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use std::net::SocketAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

#[derive(Clone, Debug)]
pub struct AppConfig {
    pub name: String,
    pub http_port: Option<u16>,
    pub tcp_echo_port: Option<u16>,
    pub grpc_port: Option<u16>,
}

/// The gRPC echo service (`mesh.echo.v1.Echo`).
struct Echo {
    name: String,
}

#[tonic::async_trait]
impl mesh_proto::echo::echo_server::Echo for Echo {
    async fn echo(
        &self,
        req: tonic::Request<mesh_proto::echo::EchoRequest>,
    ) -> Result<tonic::Response<mesh_proto::echo::EchoReply>, tonic::Status> {
        Ok(tonic::Response::new(mesh_proto::echo::EchoReply {
            message: req.into_inner().message,
            served_by: self.name.clone(),
        }))
    }
}

async fn serve_grpc(name: String, port: u16) -> std::io::Result<()> {
    tonic::transport::Server::builder()
        .add_service(mesh_proto::echo::echo_server::EchoServer::new(Echo {
            name,
        }))
        .serve(SocketAddr::from(([0, 0, 0, 0], port)))
        .await
        .map_err(std::io::Error::other)
}

async fn handle(name: String, peer: SocketAddr, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    let version = format!("{:?}", req.version());
    record(&request_line(req.method().as_str(), &path, peer));
    // The authority the request reached the app with (tests check what a proxy sent).
    let host = req
        .uri()
        .authority()
        .map(|a| a.to_string())
        .or_else(|| {
            req.headers()
                .get(hyper::header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
        })
        .unwrap_or_default();
    // `/status/NNN` answers with that status (for retries and fault tests).
    let mut status = path
        .strip_prefix("/status/")
        .and_then(|c| c.parse::<u16>().ok())
        .and_then(|c| StatusCode::from_u16(c).ok())
        .unwrap_or(StatusCode::OK);
    // `/delay/MS` answers after MS milliseconds; `/hold/TOKEN` once the lab releases it
    // (requests in flight during a drain, without depending on timing).
    if let Some(ms) = path
        .strip_prefix("/delay/")
        .and_then(|ms| ms.parse::<u64>().ok())
    {
        tokio::time::sleep(std::time::Duration::from_millis(ms.min(60_000))).await;
    }
    // A hold never released answers 504: a test that counted on it being in flight
    // (and released) must not pass on an answer that merely timed out.
    if let Some(token) = path.strip_prefix("/hold/")
        && let Some(lab) = std::env::var_os("MESH_LAB_DIR")
        && hold(std::path::Path::new(&lab), token, HOLD_LIMIT).await == Held::TimedOut
    {
        status = StatusCode::GATEWAY_TIMEOUT;
    }
    let body_len = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes().len())
        .unwrap_or(0);
    let body = format!(
        "hello from {name}: {version} {path} from {} ({body_len} bytes received)\n",
        // IPv4 clients of the dual-stack listener as plain IPv4.
        peer.ip().to_canonical()
    );
    Response::builder()
        .status(status)
        .header("content-type", "text/plain")
        .header("x-served-by", &name)
        .header("x-seen-host", host)
        .body(Full::new(Bytes::from(body)))
        .expect("valid response")
}

/// Writes one line of the app's record to stdout; a closed stdout is not the app's
/// failure (it keeps serving).
fn record(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stdout().lock(), "{line}");
}

/// The app's record of one HTTP request: `request GET /path from 10.244.1.2:40000`.
fn request_line(method: &str, path: &str, peer: SocketAddr) -> String {
    format!("request {method} {path} from {}", canonical(peer))
}

/// The app's record of one echo connection and the first bytes it read (escaped, at
/// most 64): `echo connection from 10.244.1.2:40000 first="hello"`.
fn echo_line(peer: SocketAddr, first: &[u8]) -> String {
    let first = &first[..first.len().min(64)];
    format!(
        "echo connection from {} first=\"{}\"",
        canonical(peer),
        first.escape_ascii()
    )
}

/// A peer as the app reports it: IPv4 clients of the dual-stack listener as plain IPv4.
fn canonical(peer: SocketAddr) -> SocketAddr {
    SocketAddr::new(peer.ip().to_canonical(), peer.port())
}

/// Where `/hold/TOKEN` marks its arrival and waits for its release: files
/// `TOKEN.arrived` and `TOKEN.release` in `$MESH_LAB_DIR/holds` (pods share the lab's
/// filesystem), so a test knows a request is in flight and chooses when it ends.
pub fn hold_files(
    lab_dir: &std::path::Path,
    token: &str,
) -> (std::path::PathBuf, std::path::PathBuf) {
    let dir = lab_dir.join("holds");
    (
        dir.join(format!("{token}.arrived")),
        dir.join(format!("{token}.release")),
    )
}

/// How a `/hold/TOKEN` request ended.
#[derive(Debug, PartialEq, Eq)]
enum Held {
    Released,
    /// Not released within a minute.
    TimedOut,
    /// Not a hold the app can make (no lab directory, or a token that is not a name).
    Refused,
}

/// How long `/hold/TOKEN` waits for its release at most.
const HOLD_LIMIT: std::time::Duration = std::time::Duration::from_secs(60);

/// Marks `token`'s arrival under lab directory `lab`, then waits (at most `limit`) for
/// its release.
async fn hold(lab: &std::path::Path, token: &str, limit: std::time::Duration) -> Held {
    if token.is_empty()
        || !token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        return Held::Refused;
    }
    let (arrived, release) = hold_files(lab, token);
    let _ = tokio::fs::create_dir_all(arrived.parent().expect("in a directory")).await;
    let _ = tokio::fs::write(&arrived, b"").await;
    let until = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < until {
        if tokio::fs::try_exists(&release).await.unwrap_or(false) {
            return Held::Released;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    Held::TimedOut
}

/// Listens on both families (`[::]`, IPv4 mapped), or IPv4 alone where the pod has no
/// IPv6.
async fn listen(port: u16) -> std::io::Result<TcpListener> {
    match TcpListener::bind(("::", port)).await {
        Ok(l) => Ok(l),
        Err(_) => TcpListener::bind(("0.0.0.0", port)).await,
    }
}

async fn serve_http(name: String, port: u16) -> std::io::Result<()> {
    let listener = listen(port).await?;
    loop {
        let (tcp, peer) = listener.accept().await?;
        let _ = tcp.set_nodelay(true);
        let name = name.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let name = name.clone();
                async move { Ok::<_, std::convert::Infallible>(handle(name, peer, req).await) }
            });
            let _ =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                    .await;
        });
    }
}

async fn serve_echo(port: u16) -> std::io::Result<()> {
    let listener = listen(port).await?;
    loop {
        let (mut tcp, peer) = listener.accept().await?;
        tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            let mut first = true;
            loop {
                match tcp.read(&mut buf).await {
                    Ok(0) | Err(_) => {
                        if first {
                            record(&echo_line(peer, b""));
                        }
                        return;
                    }
                    Ok(n) => {
                        if std::mem::take(&mut first) {
                            record(&echo_line(peer, &buf[..n]));
                        }
                        if tcp.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
    }
}

pub async fn run(cfg: AppConfig) -> std::io::Result<()> {
    let mut tasks = Vec::new();
    if let Some(p) = cfg.http_port {
        tasks.push(tokio::spawn(serve_http(cfg.name.clone(), p)));
    }
    if let Some(p) = cfg.tcp_echo_port {
        tasks.push(tokio::spawn(serve_echo(p)));
    }
    if let Some(p) = cfg.grpc_port {
        tasks.push(tokio::spawn(serve_grpc(cfg.name.clone(), p)));
    }
    if tasks.is_empty() {
        // A client pod: stay alive, do nothing.
        std::future::pending::<()>().await;
    }
    for t in tasks {
        t.await.map_err(std::io::Error::other)??;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn requests_and_echo_connections_are_recorded_with_their_peer() {
        let v4: SocketAddr = "10.244.1.2:40000".parse().unwrap();
        let mapped: SocketAddr = "[::ffff:10.244.1.2]:40000".parse().unwrap();
        assert_eq!(
            request_line("GET", "/x/marker", mapped),
            "request GET /x/marker from 10.244.1.2:40000"
        );
        assert_eq!(
            echo_line(v4, b"hi\n\"there\""),
            "echo connection from 10.244.1.2:40000 first=\"hi\\n\\\"there\\\"\""
        );
        assert_eq!(
            echo_line(v4, &[b'a'; 100]),
            format!(
                "echo connection from 10.244.1.2:40000 first=\"{}\"",
                "a".repeat(64)
            )
        );
        assert_eq!(
            echo_line(v4, b""),
            "echo connection from 10.244.1.2:40000 first=\"\""
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_hold_is_released_or_times_out_and_says_which() {
        let dir = std::env::temp_dir().join(format!("mesh-lab-hold-{}", std::process::id()));
        let limit = Duration::from_millis(200);
        // Never released: timed out (the app answers 504, not 200).
        assert_eq!(hold(&dir, "never", limit).await, Held::TimedOut);
        let (arrived, _) = hold_files(&dir, "never");
        assert!(arrived.exists(), "its arrival is marked");
        // Released: released.
        let (_, release) = hold_files(&dir, "freed");
        std::fs::write(&release, b"").unwrap();
        assert_eq!(
            hold(&dir, "freed", Duration::from_secs(30)).await,
            Held::Released
        );
        // Not a name: not held at all.
        assert_eq!(hold(&dir, "../x", limit).await, Held::Refused);
        assert_eq!(hold(&dir, "", limit).await, Held::Refused);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
