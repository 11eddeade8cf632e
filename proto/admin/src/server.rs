//! The I/O shell: accepts connections and serves each on its own task, bounded in time
//! and size, answering from a [`Routes`] table.

use crate::routes::{Request, Response, Routes};
use bytes::Bytes;
use http::StatusCode;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

/// The bounds every connection is served within.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// How long a client may take to send a request's headers, counted from the
    /// connection's start or from the end of its previous response: an idle connection
    /// is closed after this.
    pub header_read_timeout: Duration,
    /// How long reading a request's body may take.
    pub body_read_timeout: Duration,
    /// Request bodies longer than this are refused (413).
    pub max_body: usize,
    /// Request heads longer than this are refused (431); at least 8192.
    pub max_header_bytes: usize,
    /// How long one connection may last, whatever it does (a CPU profile takes at most
    /// a minute).
    pub max_connection_age: Duration,
    /// Connections served at once; more wait in the listen backlog.
    pub max_connections: usize,
    /// Whether a connection may carry more than one request. Off by default: each
    /// response ends with `connection: close`, as clients that read to the end expect.
    pub keep_alive: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(10),
            max_body: 64 * 1024,
            max_header_bytes: 16 * 1024,
            max_connection_age: Duration::from_secs(300),
            max_connections: 1024,
            keep_alive: false,
        }
    }
}

/// An endpoint could not listen.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr}: {source} (is another process using the port?)")]
pub struct BindError {
    pub addr: SocketAddr,
    #[source]
    pub source: std::io::Error,
}

/// Binds `addr` for [`serve`].
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, BindError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| BindError { addr, source })
}

/// Serves `routes` on `listener` on a task of its own until the runtime ends.
pub fn spawn(listener: TcpListener, routes: Routes, limits: Limits) -> tokio::task::JoinHandle<()> {
    tokio::spawn(serve(listener, routes, limits))
}

/// Serves `routes` on `listener`: each connection on its own task.
pub async fn serve(listener: TcpListener, routes: Routes, limits: Limits) {
    let routes = Arc::new(routes);
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of file descriptors, most likely: wait rather than spin.
                tracing::debug!(error = %e, "admin accept");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let routes = routes.clone();
        tokio::spawn(async move {
            connection(tcp, peer, routes, limits).await;
            drop(slot);
        });
    }
}

async fn connection(tcp: TcpStream, peer: SocketAddr, routes: Arc<Routes>, limits: Limits) {
    let svc = hyper::service::service_fn(move |req| {
        let routes = routes.clone();
        async move { Ok::<_, std::convert::Infallible>(handle(&routes, req, peer, limits).await) }
    });
    let mut b = hyper::server::conn::http1::Builder::new();
    b.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192))
        .keep_alive(limits.keep_alive);
    let conn = b.serve_connection(TokioIo::new(tcp), svc);
    let _ = tokio::time::timeout(limits.max_connection_age, conn).await;
}

async fn handle(
    routes: &Routes,
    req: http::Request<Incoming>,
    peer: SocketAddr,
    limits: Limits,
) -> http::Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let read = tokio::time::timeout(
        limits.body_read_timeout,
        Limited::new(body, limits.max_body).collect(),
    )
    .await;
    let body = match read {
        Ok(Ok(b)) => b.to_bytes(),
        Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => {
            return to_http(Response::text(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body over {} bytes\n", limits.max_body),
            ));
        }
        _ => {
            return to_http(Response::text(
                StatusCode::BAD_REQUEST,
                "request body not received\n",
            ));
        }
    };
    let request = Request {
        method: parts.method,
        path: parts.uri.path().to_string(),
        query: parts.uri.query().map(str::to_string),
        peer,
        body,
    };
    to_http(routes.answer(request).await)
}

fn to_http(r: Response) -> http::Response<Full<Bytes>> {
    let mut b = http::Response::builder().status(r.status);
    if let Some(ct) = r.content_type {
        b = b.header(http::header::CONTENT_TYPE, ct);
    }
    for (k, v) in r.headers {
        b = b.header(k, v);
    }
    b.body(Full::new(r.body)).unwrap_or_else(|e| {
        // A handler's header value that is not valid HTTP: say so rather than drop it.
        let mut resp = http::Response::new(Full::new(Bytes::from(format!("bad response: {e}\n"))));
        *resp.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
        resp
    })
}
