//! The I/O shell: accepts connections and serves each on its own task, bounded in time
//! and size, answering from a [`Routes`] table.

use crate::admission::{Admit, ConnId, Table};
use crate::routes::{Request, Response, Routes};
use bytes::Bytes;
use http::StatusCode;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

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
    /// Connections served at once. Each connection is accepted at once (none waits in
    /// the listen backlog); at the cap the oldest one that has not sent its request head
    /// is closed to make room, or the new one when every slot is serving a request.
    pub max_connections: usize,
    /// Connections served at once from one peer address, so that one pod cannot hold
    /// every slot; past it the peer's own oldest idle connection is closed.
    pub max_connections_per_peer: usize,
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
            max_connections_per_peer: 32,
            keep_alive: false,
        }
    }
}

impl Limits {
    /// For a server that answers kubelet probes: a probe sends its request head at once
    /// and gives up after 1 s by default, so an idle connection is not worth more than 2 s.
    pub fn serving_probes() -> Self {
        Limits {
            header_read_timeout: Duration::from_secs(2),
            ..Limits::default()
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
    let table = Arc::new(Mutex::new(Table::new(
        limits.max_connections,
        limits.max_connections_per_peer,
    )));
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of file descriptors, most likely: wait rather than spin.
                tracing::debug!(error = %e, "admin accept");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let close = Arc::new(Notify::new());
        let decision = lock(&table).admit(peer.ip(), close.clone());
        let id = match decision {
            Admit::Serve(id) => id,
            Admit::ServeEvicting(id, victim) => {
                // A stored permit: the victim's task closes even if not yet polled.
                victim.notify_one();
                id
            }
            Admit::Refuse(why) => {
                tracing::debug!(%peer, ?why, "admin connection refused");
                continue;
            }
        };
        let routes = routes.clone();
        let table = table.clone();
        tokio::spawn(async move {
            let _entry = Entry {
                table: table.clone(),
                id,
            };
            tokio::select! {
                _ = connection(tcp, peer, routes, limits, table, id) => {}
                _ = close.notified() => {}
            }
        });
    }
}

fn lock<H>(t: &Mutex<Table<H>>) -> std::sync::MutexGuard<'_, Table<H>> {
    t.lock().unwrap_or_else(|e| e.into_inner())
}

type Conns = Arc<Mutex<Table<Arc<Notify>>>>;

/// Takes a connection out of the table however its task ends.
struct Entry {
    table: Conns,
    id: ConnId,
}

impl Drop for Entry {
    fn drop(&mut self) {
        lock(&self.table).remove(self.id);
    }
}

async fn connection(
    tcp: TcpStream,
    peer: SocketAddr,
    routes: Arc<Routes>,
    limits: Limits,
    table: Conns,
    id: ConnId,
) {
    let svc = hyper::service::service_fn(move |req| {
        // Serving a request now: not to be closed to make room.
        lock(&table).head_received(id);
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
