//! Pooled HBONE client: streams multiplexed over mTLS HTTP/2 connections, keyed by
//! [`PoolKey`]; a new connection when the existing ones are full or going away.

use crate::pool::{ConnId, PoolBook, PoolKey};
use crate::protocol::{ConnectRequest, Refused, classify_status};
use crate::settings::{H2Settings, keepalive_failed};
use crate::tunnel::Tunnel;
use bytes::Bytes;
use h2::client::SendRequest;
use http::HeaderMap;
use mesh_identity::{IdentityError, WorkloadCertificate};
use rustls_pki_types::ServerName;
use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};
use tokio_rustls::TlsConnector;

/// Opens the TCP connection for a new HBONE connection. ztunnel's dialer creates the
/// socket inside the source pod's network namespace.
pub trait Dialer: Send + Sync + 'static {
    fn dial(
        &self,
        dst: SocketAddr,
        src_ip: Option<IpAddr>,
    ) -> impl Future<Output = io::Result<tokio::net::TcpStream>> + Send;
}

/// Connects from the current network namespace.
#[derive(Debug, Clone, Default)]
pub struct TcpDialer;

impl Dialer for TcpDialer {
    async fn dial(
        &self,
        dst: SocketAddr,
        src_ip: Option<IpAddr>,
    ) -> io::Result<tokio::net::TcpStream> {
        let socket = if dst.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        if let Some(ip) = src_ip {
            socket.bind(SocketAddr::new(ip, 0))?;
        }
        socket.connect(dst).await
    }
}

#[derive(Clone, Debug)]
pub struct ClientSettings {
    /// HTTP/2 settings; `h2.handshake_timeout` bounds TLS + HTTP/2 set-up after the dial.
    pub h2: H2Settings,
    /// Longest wait for the TCP connection.
    pub connect_timeout: Duration,
    /// Longest wait for the answer to a CONNECT (including a free stream slot).
    pub response_timeout: Duration,
    /// Connections with no stream for this long are closed.
    pub idle_timeout: Duration,
}

impl Default for ClientSettings {
    fn default() -> Self {
        ClientSettings {
            h2: H2Settings::client(),
            connect_timeout: Duration::from_secs(10),
            response_timeout: Duration::from_secs(15),
            idle_timeout: Duration::from_secs(300),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connecting to {0} timed out (is a NetworkPolicy blocking port 15008?)")]
    ConnectTimeout(SocketAddr),
    #[error("TLS/HTTP/2 set-up with {0} timed out")]
    HandshakeTimeout(SocketAddr),
    #[error("no answer to the CONNECT from {0} in time")]
    ResponseTimeout(SocketAddr),
    #[error("timed out waiting for another attempt to connect to {0}")]
    PoolTimeout(SocketAddr),
    #[error("could not connect to {dst}: {source}")]
    Dial { dst: SocketAddr, source: io::Error },
    #[error("server identity refused: {0}")]
    Identity(IdentityError),
    #[error("TLS handshake with {dst} failed: {source}")]
    Tls { dst: SocketAddr, source: io::Error },
    #[error("cannot build the TLS client configuration: {0}")]
    TlsConfig(#[from] mesh_identity::tls::TlsConfigError),
    #[error("the certificate is for {have}, but the pool key asks for {want}")]
    CertificateMismatch { have: String, want: String },
    #[error("HTTP/2: {0}")]
    H2(#[from] h2::Error),
    #[error("invalid CONNECT request: {0}")]
    Request(#[from] http::Error),
    #[error(transparent)]
    Refused(#[from] Refused),
}

type Book = Mutex<PoolBook<SendRequest<Bytes>>>;

struct Inner<D> {
    book: Book,
    /// One connection attempt at a time per key, so a burst shares the new connection.
    connecting: Mutex<HashMap<PoolKey, Arc<tokio::sync::Mutex<()>>>>,
    dialer: D,
    settings: ClientSettings,
}

/// The pool. Cheap to clone; all clones share connections.
pub struct Client<D: Dialer = TcpDialer> {
    inner: Arc<Inner<D>>,
}

impl<D: Dialer> Clone for Client<D> {
    fn clone(&self) -> Self {
        Client {
            inner: self.inner.clone(),
        }
    }
}

/// A tunnel plus the 200 response's headers (e.g. destination baggage).
#[derive(Debug)]
pub struct Established {
    pub tunnel: Tunnel,
    pub headers: HeaderMap,
}

impl<D: Dialer> Client<D> {
    /// Must be called inside a Tokio runtime (it starts the idle reaper).
    pub fn new(dialer: D, settings: ClientSettings) -> Self {
        let inner = Arc::new(Inner {
            book: Mutex::new(PoolBook::new(settings.idle_timeout)),
            connecting: Mutex::new(HashMap::new()),
            dialer,
            settings,
        });
        let weak = Arc::downgrade(&inner);
        let period = (inner.settings.idle_timeout / 4).max(Duration::from_millis(100));
        tokio::spawn(reap_idle(weak, period));
        Client { inner }
    }

    /// Open HTTP/2 connections, all keys.
    pub fn connections(&self) -> usize {
        self.inner.book.lock().expect("pool lock").connections()
    }

    /// Opens a tunnel: reuses a connection for `key` with room, or makes a new one
    /// presenting `cert` and accepting only `key.dst_ids`.
    pub async fn connect(
        &self,
        key: &PoolKey,
        cert: &WorkloadCertificate,
        req: &ConnectRequest,
    ) -> Result<Established, ConnectError> {
        if cert.identity() != &key.src_id {
            return Err(ConnectError::CertificateMismatch {
                have: cert.identity().to_string(),
                want: key.src_id.to_string(),
            });
        }
        let s = &self.inner.settings;
        // Getting a connection (waiting for another caller's attempt included) never takes
        // longer than making one would.
        let deadline = tokio::time::Instant::now() + s.connect_timeout + s.h2.handshake_timeout;
        // A pooled connection may turn out to be going away; then try the next one.
        for _ in 0..4 {
            let checkout = self.inner.book.lock().expect("pool lock").checkout(key);
            let (id, sender, pooled) = match checkout {
                Some(c) => c,
                None => {
                    let gate = self.connect_gate(key);
                    let _turn = tokio::time::timeout_at(deadline, gate.lock())
                        .await
                        .map_err(|_| ConnectError::PoolTimeout(key.dst))?;
                    let again = self.inner.book.lock().expect("pool lock").checkout(key);
                    match again {
                        Some(c) => c,
                        None => self.new_connection(key, cert, deadline).await?,
                    }
                }
            };
            match self.open_stream(pooled, id, sender, req).await {
                Err(StreamError::ConnectionGone) => {
                    self.inner.book.lock().expect("pool lock").evict(key, id);
                    continue;
                }
                Err(StreamError::Failed(e)) => return Err(e),
                Ok(est) => return Ok(est),
            }
        }
        Err(ConnectError::H2(h2::Error::from(
            h2::Reason::REFUSED_STREAM,
        )))
    }

    fn connect_gate(&self, key: &PoolKey) -> Arc<tokio::sync::Mutex<()>> {
        let mut map = self.inner.connecting.lock().expect("gate lock");
        // Forget gates nobody holds, so the map does not grow with every destination.
        map.retain(|_, g| Arc::strong_count(g) > 1);
        map.entry(key.clone()).or_default().clone()
    }

    async fn new_connection(
        &self,
        key: &PoolKey,
        cert: &WorkloadCertificate,
        deadline: tokio::time::Instant,
    ) -> Result<(ConnId, SendRequest<Bytes>, Arc<PoolKey>), ConnectError> {
        let key = Arc::new(key.clone());
        let s = &self.inner.settings;
        let dial_by = deadline.min(tokio::time::Instant::now() + s.connect_timeout);
        let tcp = tokio::time::timeout_at(dial_by, self.inner.dialer.dial(key.dst, key.src_ip))
            .await
            .map_err(|_| ConnectError::ConnectTimeout(key.dst))?
            .map_err(|source| ConnectError::Dial {
                dst: key.dst,
                source,
            })?;
        let _ = tcp.set_nodelay(true);
        // TLS, the HTTP/2 handshake and the server's SETTINGS: one bound for all three.
        let ready_by = deadline.min(tokio::time::Instant::now() + s.h2.handshake_timeout);
        let timed_out = || ConnectError::HandshakeTimeout(key.dst);
        let tls_config = mesh_identity::client_config(cert, key.dst_ids.clone())?;
        let connector = TlsConnector::from(Arc::new(tls_config));
        let name = ServerName::IpAddress(key.dst.ip().into());
        let tls = tokio::time::timeout_at(ready_by, connector.connect(name, tcp))
            .await
            .map_err(|_| timed_out())?
            .map_err(|e| tls_error(key.dst, e))?;
        let (sender, mut conn) =
            tokio::time::timeout_at(ready_by, s.h2.client_builder().handshake(tls))
                .await
                .map_err(|_| timed_out())??;
        let mut ping_pong = conn.ping_pong().expect("ping_pong is available once");

        // Drive the connection; when it ends for any reason it leaves the pool.
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<h2::PingPong>();
        let weak = Arc::downgrade(&self.inner);
        let key_for_task = key.clone();
        let (interval, timeout) = (s.h2.keepalive_interval, s.h2.keepalive_timeout);
        let id_slot = Arc::new(std::sync::OnceLock::<ConnId>::new());
        let id_for_task = id_slot.clone();
        tokio::spawn(async move {
            // `false`: set-up failed (the sender was dropped), so the connection is dropped.
            let keepalive = async move {
                match ready_rx.await {
                    Ok(pp) => {
                        keepalive_failed(pp, interval, timeout).await;
                        true
                    }
                    Err(_) => false,
                }
            };
            tokio::select! {
                r = conn => if let Err(e) = r {
                    tracing::debug!(dst = %key_for_task.dst, error = %e, "HBONE connection ended");
                },
                timed_out = keepalive => if timed_out {
                    tracing::debug!(dst = %key_for_task.dst, "HBONE keepalive timed out")
                },
            }
            if let (Some(inner), Some(id)) = (weak.upgrade(), id_for_task.get()) {
                inner
                    .book
                    .lock()
                    .expect("pool lock")
                    .evict(&key_for_task, *id);
            }
        });
        // One PING round trip: the server's SETTINGS precede its answer, so afterwards
        // its stream limit is known. (Dropping `ready_tx` on failure ends the task.)
        tokio::time::timeout_at(ready_by, ping_pong.ping(h2::Ping::opaque()))
            .await
            .map_err(|_| timed_out())??;
        let _ = ready_tx.send(ping_pong);
        let limit = sender
            .current_max_send_streams()
            .min(s.h2.max_concurrent_streams as usize);
        let id =
            self.inner
                .book
                .lock()
                .expect("pool lock")
                .insert(key.clone(), sender.clone(), limit);
        let _ = id_slot.set(id);
        Ok((id, sender, key))
    }

    /// `key` is the one the connection is pooled under: the stream's release keeps it,
    /// shared, for as long as the stream is open.
    async fn open_stream(
        &self,
        key: Arc<PoolKey>,
        id: ConnId,
        sender: SendRequest<Bytes>,
        req: &ConnectRequest,
    ) -> Result<Established, StreamError> {
        let dst = key.dst;
        let release = {
            let weak: Weak<Inner<D>> = Arc::downgrade(&self.inner);
            move || {
                if let Some(inner) = weak.upgrade() {
                    inner
                        .book
                        .lock()
                        .expect("pool lock")
                        .release(&key, id, Instant::now());
                }
            }
        };
        let mut guard = ReleaseOnDrop(Some(Box::new(release)));
        // A free stream slot and the server's answer: both within the response timeout.
        let answer_by = tokio::time::Instant::now() + self.inner.settings.response_timeout;
        let timed_out = || StreamError::Failed(ConnectError::ResponseTimeout(dst));
        let mut sender = tokio::time::timeout_at(answer_by, sender.ready())
            .await
            .map_err(|_| timed_out())?
            .map_err(|_| StreamError::ConnectionGone)?;
        let http = req.to_http().map_err(|e| StreamError::Failed(e.into()))?;
        let (response, send) = sender
            .send_request(http, false)
            .map_err(classify_stream_error)?;
        let response = tokio::time::timeout_at(answer_by, response)
            .await
            .map_err(|_| timed_out())?
            .map_err(classify_stream_error)?;
        if let Some(refused) = classify_status(response.status()) {
            return Err(StreamError::Failed(ConnectError::Refused(refused)));
        }
        let (parts, recv) = response.into_parts();
        let tunnel = Tunnel::new(send, recv, true, guard.0.take());
        Ok(Established {
            tunnel,
            headers: parts.headers,
        })
    }
}

enum StreamError {
    /// The connection refused new streams (GOAWAY/closed): retry on another.
    ConnectionGone,
    Failed(ConnectError),
}

fn classify_stream_error(e: h2::Error) -> StreamError {
    if e.is_go_away() || e.is_io() || e.reason() == Some(h2::Reason::REFUSED_STREAM) {
        StreamError::ConnectionGone
    } else {
        StreamError::Failed(ConnectError::H2(e))
    }
}

struct ReleaseOnDrop(Option<crate::tunnel::OnDrop>);

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            f();
        }
    }
}

fn tls_error(dst: SocketAddr, e: io::Error) -> ConnectError {
    if let Some(identity) = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .and_then(IdentityError::from_rustls)
    {
        return ConnectError::Identity(identity.clone());
    }
    ConnectError::Tls { dst, source: e }
}

async fn reap_idle<D: Dialer>(weak: Weak<Inner<D>>, period: Duration) {
    loop {
        tokio::time::sleep(period).await;
        let Some(inner) = weak.upgrade() else { return };
        let expired = inner
            .book
            .lock()
            .expect("pool lock")
            .expire_idle(Instant::now());
        // Dropping the last sender lets the connection close gracefully.
        drop(expired);
    }
}
