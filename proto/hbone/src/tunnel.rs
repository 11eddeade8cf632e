//! One tunnelled TCP connection: an HTTP/2 stream pair, usable as `AsyncRead + AsyncWrite`
//! or, on the hot path, copied to and from a `TcpStream` without intermediate copies.

use bytes::{Buf, Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Read sizes on the TCP side: a read that fills its buffer doubles the next one, up to
/// the maximum, so bulk transfers read large while request/response traffic does not
/// allocate (and touch) large buffers for a few hundred bytes. Buffers are only
/// allocated once the socket is readable, so idle tunnels hold none.
const READ_CHUNK_MIN: usize = 16 * 1024;
const READ_CHUNK: usize = 128 * 1024;

/// Called once when the stream is finished (returns its slot to the pool).
pub(crate) type OnDrop = Box<dyn FnOnce() + Send + Sync>;

pub struct Tunnel {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Remainder of the last DATA frame, not yet read by the caller.
    pending: Bytes,
    read_eof: bool,
    write_closed: bool,
    on_drop: Option<OnDrop>,
}

impl std::fmt::Debug for Tunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tunnel")
            .field("read_eof", &self.read_eof)
            .field("write_closed", &self.write_closed)
            .finish()
    }
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        if let Some(f) = self.on_drop.take() {
            f();
        }
    }
}

/// Bytes moved by a copy, from the tunnel's point of view.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CopyStats {
    /// From the TCP side into the tunnel.
    pub sent: u64,
    /// From the tunnel to the TCP side.
    pub received: u64,
}

fn h2_io_error(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e
            .into_io()
            .unwrap_or_else(|| io::Error::other("h2 I/O error"));
    }
    let kind = match e.reason() {
        Some(h2::Reason::NO_ERROR) | Some(h2::Reason::CANCEL) => io::ErrorKind::ConnectionReset,
        _ => io::ErrorKind::BrokenPipe,
    };
    io::Error::new(kind, e)
}

impl Tunnel {
    pub(crate) fn new(send: SendStream<Bytes>, recv: RecvStream, on_drop: Option<OnDrop>) -> Self {
        Tunnel {
            send,
            recv,
            pending: Bytes::new(),
            read_eof: false,
            write_closed: false,
            on_drop,
        }
    }

    /// Aborts the stream (RST_STREAM) so the peer sees a failure rather than a clean end.
    pub fn reset(&mut self) {
        self.send.send_reset(h2::Reason::CANCEL);
    }

    /// Copies both ways between this tunnel and `tcp` until both directions have ended.
    /// EOF on either side is passed on as a half-close (END_STREAM / FIN); an error on
    /// either side aborts both (RST_STREAM / RST).
    pub async fn copy_with_tcp(mut self, tcp: &TcpStream) -> io::Result<CopyStats> {
        let mut sent = 0u64;
        let mut received = 0u64;
        let Tunnel {
            send,
            recv,
            pending,
            write_closed,
            ..
        } = &mut self;
        let pending = std::mem::take(pending);
        let upload = async {
            let mut chunk = READ_CHUNK_MIN;
            loop {
                tcp.readable().await?;
                let mut buf = BytesMut::with_capacity(chunk);
                match tcp.try_read_buf(&mut buf) {
                    Ok(0) => {
                        finish_send(send, write_closed)?;
                        return Ok::<_, io::Error>(());
                    }
                    Ok(n) => {
                        sent += n as u64;
                        if n == chunk {
                            chunk = (chunk * 2).min(READ_CHUNK);
                        }
                        send_all(send, buf.freeze()).await?;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(e),
                }
            }
        };
        let download = async {
            if !pending.is_empty() {
                write_all(tcp, &pending).await?;
                received += pending.len() as u64;
            }
            while let Some(chunk) = poll_fn(|cx| recv.poll_data(cx)).await {
                let chunk = chunk.map_err(h2_io_error)?;
                write_all(tcp, &chunk).await?;
                received += chunk.len() as u64;
                let _ = recv.flow_control().release_capacity(chunk.len());
            }
            // The peer half-closed: pass the FIN on.
            socket2::SockRef::from(tcp).shutdown(std::net::Shutdown::Write)?;
            Ok::<_, io::Error>(())
        };
        // Each direction runs until its EOF; the first error ends both and is made visible
        // to both ends.
        if let Err(e) = tokio::try_join!(upload, download) {
            self.send.send_reset(h2::Reason::CANCEL);
            let _ = socket2::SockRef::from(tcp).set_linger(Some(std::time::Duration::ZERO));
            return Err(e);
        }
        Ok(CopyStats { sent, received })
    }
}

/// Sends `data` as DATA frames as flow control allows.
async fn send_all(send: &mut SendStream<Bytes>, mut data: Bytes) -> io::Result<()> {
    while !data.is_empty() {
        send.reserve_capacity(data.len());
        let granted = poll_fn(|cx| send.poll_capacity(cx))
            .await
            .ok_or_else(|| io::Error::new(io::ErrorKind::BrokenPipe, "stream closed"))?
            .map_err(h2_io_error)?;
        if granted == 0 {
            continue;
        }
        let chunk = data.split_to(granted.min(data.len()));
        send.send_data(chunk, false).map_err(h2_io_error)?;
    }
    Ok(())
}

/// Half-closes our direction (END_STREAM), once.
fn finish_send(send: &mut SendStream<Bytes>, closed: &mut bool) -> io::Result<()> {
    if !*closed {
        *closed = true;
        send.send_data(Bytes::new(), true).map_err(h2_io_error)?;
    }
    Ok(())
}

async fn write_all(tcp: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        tcp.writable().await?;
        match tcp.try_write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl AsyncRead for Tunnel {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            if !self.pending.is_empty() {
                let n = self.pending.len().min(buf.remaining());
                buf.put_slice(&self.pending[..n]);
                self.pending.advance(n);
                let _ = self.recv.flow_control().release_capacity(n);
                return Poll::Ready(Ok(()));
            }
            if self.read_eof {
                return Poll::Ready(Ok(()));
            }
            match ready!(self.recv.poll_data(cx)) {
                Some(Ok(data)) => self.pending = data,
                Some(Err(e)) => return Poll::Ready(Err(h2_io_error(e))),
                None => self.read_eof = true,
            }
        }
    }
}

impl AsyncWrite for Tunnel {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if self.write_closed {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        self.send.reserve_capacity(buf.len());
        loop {
            match self.send.poll_capacity(cx) {
                Poll::Ready(Some(Ok(0))) => continue,
                Poll::Ready(Some(Ok(n))) => {
                    let n = n.min(buf.len());
                    self.send
                        .send_data(Bytes::copy_from_slice(&buf[..n]), false)
                        .map_err(h2_io_error)?;
                    return Poll::Ready(Ok(n));
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(h2_io_error(e))),
                Poll::Ready(None) => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
                Poll::Pending => {
                    // Waiting for window: notice a reset from the peer meanwhile.
                    if let Poll::Ready(r) = self.send.poll_reset(cx) {
                        let e = match r {
                            Ok(reason) => io::Error::new(
                                io::ErrorKind::ConnectionReset,
                                format!("stream reset by peer: {reason}"),
                            ),
                            Err(e) => h2_io_error(e),
                        };
                        return Poll::Ready(Err(e));
                    }
                    return Poll::Pending;
                }
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // h2 writes frames as the connection task runs; nothing is held back here.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        Poll::Ready(finish_send(&mut this.send, &mut this.write_closed))
    }
}
