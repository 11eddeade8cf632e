//! HBONE server: TLS (client certificate required) → HTTP/2 → one CONNECT per stream,
//! each handed to a [`ConnectHandler`] that refuses it or accepts it as a [`Tunnel`].

use crate::protocol::{ConnectRequest, Refusal};
use crate::settings::{H2Settings, keepalive_failed};
use crate::tunnel::Tunnel;
use bytes::Bytes;
use h2::RecvStream;
use h2::server::SendResponse;
use http::{HeaderMap, Response, StatusCode};
use mesh_identity::SpiffeId;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

/// One CONNECT request, with everything known about who sent it.
#[derive(Debug, Clone)]
pub struct InboundConnect {
    pub request: ConnectRequest,
    pub headers: HeaderMap,
    /// Verified from the client certificate.
    pub peer_identity: SpiffeId,
    pub peer_addr: SocketAddr,
    /// The address the HBONE connection arrived at (L3 destination).
    pub local_addr: SocketAddr,
}

/// Answers one CONNECT exactly once. Dropping it unanswered refuses with 503.
pub struct Responder {
    respond: Option<SendResponse<Bytes>>,
    recv: Option<RecvStream>,
}

impl Responder {
    pub fn refuse(mut self, refusal: &Refusal) {
        if let Some(r) = self.respond.take() {
            send_status(r, refusal.status());
        }
    }

    /// Sends 200 (with `headers`, e.g. destination baggage) and returns the tunnel.
    pub fn accept(mut self, headers: HeaderMap) -> Result<Tunnel, h2::Error> {
        let mut respond = self.respond.take().expect("responder used once");
        let recv = self.recv.take().expect("responder used once");
        let mut resp = Response::new(());
        *resp.headers_mut() = headers;
        let send = respond.send_response(resp, false)?;
        Ok(Tunnel::new(send, recv, false, None))
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        if let Some(r) = self.respond.take() {
            send_status(r, StatusCode::SERVICE_UNAVAILABLE);
        }
    }
}

fn send_status(mut respond: SendResponse<Bytes>, status: StatusCode) {
    let mut resp = Response::new(());
    *resp.status_mut() = status;
    let _ = respond.send_response(resp, true);
}

/// What to do with each CONNECT.
pub trait ConnectHandler: Send + Sync + 'static {
    fn handle(&self, req: InboundConnect, respond: Responder) -> impl Future<Output = ()> + Send;
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("TLS handshake failed: {0}")]
    Tls(io::Error),
    #[error("TLS handshake timed out")]
    TlsTimeout,
    #[error("the client did not send the HTTP/2 preface in time")]
    PrefaceTimeout,
    #[error("the client did not send its HTTP/2 SETTINGS in time")]
    SettingsTimeout,
    #[error("the client certificate carries no SPIFFE identity")]
    NoPeerIdentity,
    #[error("HTTP/2: {0}")]
    H2(#[from] h2::Error),
    #[error("peer stopped answering PINGs")]
    KeepaliveTimeout,
    #[error("socket: {0}")]
    Io(#[from] io::Error),
}

/// Serves one accepted TCP connection until the client goes away, keepalive fails, or
/// `drain` is cancelled (then GOAWAY is sent and open streams may finish).
pub async fn serve_connection<H: ConnectHandler>(
    tcp: TcpStream,
    tls: Arc<rustls::ServerConfig>,
    handler: Arc<H>,
    settings: &H2Settings,
    drain: CancellationToken,
) -> Result<(), ServeError> {
    let local_addr = tcp.local_addr()?;
    let peer_addr = tcp.peer_addr()?;
    let _ = tcp.set_nodelay(true);
    serve_stream(tcp, local_addr, peer_addr, tls, handler, settings, drain).await
}

/// How the connection's PING sequence ended: the first PING doubles as the check that the
/// client's SETTINGS arrived (they precede its answer).
enum PingEnd {
    SettingsTimeout,
    KeepaliveTimeout,
}

/// As [`serve_connection`], over any byte stream (`local_addr`/`peer_addr` as the TCP
/// connection had them). Everything before the first CONNECT is bounded by
/// `settings.handshake_timeout`: the TLS handshake, the HTTP/2 preface and the client's
/// SETTINGS, so a peer that connects and stays silent is closed.
#[allow(clippy::too_many_arguments)]
pub async fn serve_stream<IO, H>(
    io: IO,
    local_addr: SocketAddr,
    peer_addr: SocketAddr,
    tls: Arc<rustls::ServerConfig>,
    handler: Arc<H>,
    settings: &H2Settings,
    drain: CancellationToken,
) -> Result<(), ServeError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: ConnectHandler,
{
    let deadline = Instant::now() + settings.handshake_timeout;
    let tls = tokio::time::timeout_at(deadline, TlsAcceptor::from(tls).accept(io))
        .await
        .map_err(|_| ServeError::TlsTimeout)?
        .map_err(ServeError::Tls)?;
    let peer_identity = mesh_identity::peer_identity(tls.get_ref().1.peer_certificates())
        .ok_or(ServeError::NoPeerIdentity)?;
    let mut conn = tokio::time::timeout_at(deadline, settings.server_builder().handshake(tls))
        .await
        .map_err(|_| ServeError::PrefaceTimeout)??;
    let mut ping_pong = conn.ping_pong().expect("ping_pong is available once");
    let (interval, timeout) = (settings.keepalive_interval, settings.keepalive_timeout);
    let pings = async move {
        if !matches!(
            tokio::time::timeout_at(deadline, ping_pong.ping(h2::Ping::opaque())).await,
            Ok(Ok(_))
        ) {
            return PingEnd::SettingsTimeout;
        }
        keepalive_failed(ping_pong, interval, timeout).await;
        PingEnd::KeepaliveTimeout
    };
    tokio::pin!(pings);
    let mut draining = false;
    loop {
        tokio::select! {
            next = conn.accept() => {
                let Some(next) = next else { return Ok(()) };
                let (req, respond) = next?;
                let (parts, recv) = req.into_parts();
                match ConnectRequest::from_http(&parts.method, &parts.uri, &parts.headers) {
                    Err(bad) => {
                        tracing::debug!(%peer_addr, error = %bad, "refusing malformed CONNECT");
                        send_status(respond, StatusCode::BAD_REQUEST);
                    }
                    Ok(request) => {
                        let inbound = InboundConnect {
                            request,
                            headers: parts.headers,
                            peer_identity: peer_identity.clone(),
                            peer_addr,
                            local_addr,
                        };
                        let responder = Responder { respond: Some(respond), recv: Some(recv) };
                        let handler = handler.clone();
                        // Boxed on the way in: captured inline, the arguments would take
                        // room in the task for as long as the tunnel lives, next to the
                        // handler's own copy.
                        let args = Box::new((inbound, responder));
                        let fut = async move {
                            let (inbound, responder) = {
                                let b = args;
                                *b
                            };
                            handler.handle(inbound, responder).await
                        };
                        tokio::spawn(fut);
                    }
                }
            }
            _ = drain.cancelled(), if !draining => {
                draining = true;
                conn.graceful_shutdown();
            }
            end = &mut pings => return Err(match end {
                PingEnd::SettingsTimeout => ServeError::SettingsTimeout,
                PingEnd::KeepaliveTimeout => ServeError::KeepaliveTimeout,
            }),
        }
    }
}
