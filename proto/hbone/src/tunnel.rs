//! One tunnelled TCP connection: an HTTP/2 stream pair, usable as `AsyncRead + AsyncWrite`
//! or, on the hot path, copied to and from a `TcpStream` without intermediate copies.

use bytes::{Buf, Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
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

/// Byte counts of a running copy, updated as each chunk is handed on, so that whoever
/// stops the copy early (drain, policy) still knows what moved.
#[derive(Debug, Default)]
pub struct CopyProgress {
    sent: AtomicU64,
    received: AtomicU64,
}

impl CopyProgress {
    pub fn stats(&self) -> CopyStats {
        CopyStats {
            sent: self.sent.load(Ordering::Relaxed),
            received: self.received.load(Ordering::Relaxed),
        }
    }
}

/// A copy that failed, with the bytes it had moved by then.
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct CopyError {
    pub error: io::Error,
    pub stats: CopyStats,
}

/// What the copy knows about a stream when it ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamEnd {
    /// Our side reached EOF and every byte before it was handed to the stream.
    pub sent_all: bool,
    /// The peer's END_STREAM arrived and every byte before it was passed on.
    pub received_all: bool,
    /// Why the peer reset the stream, if it did.
    pub peer_reset: Option<h2::Reason>,
}

/// How a stream ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndKind {
    /// Everything both sides sent was delivered.
    Clean,
    /// Data may have been lost: a failure.
    Failed,
}

/// Classifies a stream's end. A peer that resets with NO_ERROR or CANCEL once our side
/// has finished only releases the stream: h2 resets with NO_ERROR when a server drops a
/// stream after its END_STREAM without waiting for ours (RFC 9113 §8.1), and with CANCEL
/// when a peer drops a stream it no longer needs (its END_STREAM, if still queued, is
/// discarded then). Everything it sent before was passed on. A reset while we still had
/// data to send lost it, and any other reason is a failure: a tunnel whose TCP side
/// failed resets with CONNECT_ERROR (RFC 9113 §8.5).
pub fn classify_end(end: StreamEnd) -> EndKind {
    match end.peer_reset {
        None if end.sent_all && end.received_all => EndKind::Clean,
        None => EndKind::Failed,
        Some(h2::Reason::NO_ERROR) | Some(h2::Reason::CANCEL) if end.sent_all => EndKind::Clean,
        Some(_) => EndKind::Failed,
    }
}

/// The reason of a reset the peer sent, if `e` is one.
fn remote_reset(e: &h2::Error) -> Option<h2::Reason> {
    if e.is_reset() && e.is_remote() {
        e.reason()
    } else {
        None
    }
}

/// The peer's reset reason if the stream was reset by the peer, without waiting.
fn peer_reset_now(send: &mut SendStream<Bytes>, cx: &mut Context<'_>) -> Option<h2::Reason> {
    match send.poll_reset(cx) {
        Poll::Ready(Ok(reason)) => Some(reason),
        _ => None,
    }
}

fn reset_error(reason: h2::Reason) -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionReset,
        format!("stream reset by peer ({reason:?}: {reason})"),
    )
}

fn h2_io_error(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e
            .into_io()
            .unwrap_or_else(|| io::Error::other("h2 I/O error"));
    }
    if let Some(reason) = remote_reset(&e) {
        return reset_error(reason);
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

    /// Aborts the stream so the peer sees a failure rather than a clean end: the TCP
    /// connection behind it failed (RST_STREAM(CONNECT_ERROR), RFC 9113 §8.5).
    pub fn reset(&mut self) {
        self.send.send_reset(h2::Reason::CONNECT_ERROR);
    }

    /// Copies both ways between this tunnel and `tcp` until both directions have ended.
    /// EOF on either side is passed on as a half-close (END_STREAM / FIN); an error on
    /// either side aborts both (RST_STREAM / RST). A peer that releases the stream once
    /// everything was delivered is a normal end ([`classify_end`]); on failure the error
    /// carries the bytes moved so far.
    pub async fn copy_with_tcp(self, tcp: &TcpStream) -> Result<CopyStats, CopyError> {
        self.copy_with_tcp_counted(tcp, &CopyProgress::default())
            .await
    }

    /// [`Self::copy_with_tcp`], counting into `progress` as bytes are handed on.
    pub async fn copy_with_tcp_counted(
        mut self,
        tcp: &TcpStream,
        progress: &CopyProgress,
    ) -> Result<CopyStats, CopyError> {
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
                        // Everything we had is handed over. A peer that already reset
                        // the stream is judged once the download has ended too.
                        return match finish_send(send, write_closed) {
                            Ok(()) => Ok::<_, io::Error>(None),
                            Err(e) => {
                                match poll_fn(|cx| Poll::Ready(peer_reset_now(send, cx))).await {
                                    Some(reason) => Ok(Some(reason)),
                                    None => Err(e),
                                }
                            }
                        };
                    }
                    Ok(n) => {
                        if n == chunk {
                            chunk = (chunk * 2).min(READ_CHUNK);
                        }
                        send_all(send, buf.freeze(), &progress.sent).await?;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(e),
                }
            }
        };
        let download = async {
            if !pending.is_empty() {
                write_all(tcp, &pending).await?;
                progress
                    .received
                    .fetch_add(pending.len() as u64, Ordering::Relaxed);
            }
            let mut peer_reset = None;
            while let Some(chunk) = poll_fn(|cx| recv.poll_data(cx)).await {
                let chunk = match chunk {
                    Ok(c) => c,
                    // The peer may just have released the stream: pass its end on as FIN;
                    // the upload decides, by whether data of ours was still due.
                    Err(e) => match remote_reset(&e) {
                        Some(r @ (h2::Reason::NO_ERROR | h2::Reason::CANCEL)) => {
                            peer_reset = Some(r);
                            break;
                        }
                        _ => return Err(h2_io_error(e)),
                    },
                };
                write_all(tcp, &chunk).await?;
                progress
                    .received
                    .fetch_add(chunk.len() as u64, Ordering::Relaxed);
                let _ = recv.flow_control().release_capacity(chunk.len());
            }
            // The peer half-closed: pass the FIN on.
            socket2::SockRef::from(tcp).shutdown(std::net::Shutdown::Write)?;
            Ok::<_, io::Error>(peer_reset)
        };
        // Each direction runs until its EOF; the first error ends both and is made visible
        // to both ends.
        let error = match tokio::try_join!(upload, download) {
            Ok((None, None)) => return Ok(progress.stats()),
            // Our side finished (the upload only ends at EOF), but the peer reset the
            // stream: a release or a failure, depending on why.
            Ok((upload_reset, download_reset)) => {
                let end = StreamEnd {
                    sent_all: true,
                    received_all: download_reset.is_none(),
                    peer_reset: upload_reset.or(download_reset),
                };
                match classify_end(end) {
                    EndKind::Clean => return Ok(progress.stats()),
                    EndKind::Failed => {
                        reset_error(end.peer_reset.unwrap_or(h2::Reason::CONNECT_ERROR))
                    }
                }
            }
            Err(e) => e,
        };
        // RFC 9113 §8.5: a failed tunnel is CONNECT_ERROR on the stream, RST on the TCP side.
        self.send.send_reset(h2::Reason::CONNECT_ERROR);
        let _ = socket2::SockRef::from(tcp).set_linger(Some(std::time::Duration::ZERO));
        Err(CopyError {
            error,
            stats: progress.stats(),
        })
    }
}

/// Sends `data` as DATA frames as flow control allows.
/// Counts each chunk into `sent` once h2 has taken it.
async fn send_all(
    send: &mut SendStream<Bytes>,
    mut data: Bytes,
    sent: &AtomicU64,
) -> io::Result<()> {
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
        let n = chunk.len() as u64;
        send.send_data(chunk, false).map_err(h2_io_error)?;
        sent.fetch_add(n, Ordering::Relaxed);
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
                            Ok(reason) => reset_error(reason),
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

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let Err(e) = finish_send(&mut this.send, &mut this.write_closed) else {
            return Poll::Ready(Ok(()));
        };
        // A peer that already reset the stream after all its data was read is no failure.
        let Some(reason) = peer_reset_now(&mut this.send, cx) else {
            return Poll::Ready(Err(e));
        };
        let end = StreamEnd {
            sent_all: true,
            received_all: this.read_eof && this.pending.is_empty(),
            peer_reset: Some(reason),
        };
        Poll::Ready(match classify_end(end) {
            EndKind::Clean => Ok(()),
            EndKind::Failed => Err(reset_error(reason)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use h2::Reason;

    fn end(sent_all: bool, received_all: bool, peer_reset: Option<Reason>) -> EndKind {
        classify_end(StreamEnd {
            sent_all,
            received_all,
            peer_reset,
        })
    }

    #[test]
    fn both_directions_done_is_clean() {
        assert_eq!(end(true, true, None), EndKind::Clean);
    }

    #[test]
    fn release_once_our_side_finished_is_clean() {
        // A server dropping the stream after its END_STREAM (RFC 9113 §8.1), or a peer
        // dropping a stream it no longer needs, its END_STREAM possibly discarded.
        for received_all in [true, false] {
            assert_eq!(
                end(true, received_all, Some(Reason::NO_ERROR)),
                EndKind::Clean
            );
            assert_eq!(
                end(true, received_all, Some(Reason::CANCEL)),
                EndKind::Clean
            );
        }
    }

    #[test]
    fn reset_with_our_data_still_due_is_a_failure() {
        for reason in [Reason::NO_ERROR, Reason::CANCEL, Reason::CONNECT_ERROR] {
            assert_eq!(
                end(false, true, Some(reason)),
                EndKind::Failed,
                "{reason:?}"
            );
            assert_eq!(
                end(false, false, Some(reason)),
                EndKind::Failed,
                "{reason:?}"
            );
        }
        assert_eq!(end(false, true, None), EndKind::Failed);
        assert_eq!(end(true, false, None), EndKind::Failed);
    }

    #[test]
    fn error_reasons_stay_failures_even_when_complete() {
        for reason in [
            Reason::CONNECT_ERROR,
            Reason::PROTOCOL_ERROR,
            Reason::INTERNAL_ERROR,
            Reason::FLOW_CONTROL_ERROR,
            Reason::REFUSED_STREAM,
        ] {
            assert_eq!(end(true, true, Some(reason)), EndKind::Failed, "{reason:?}");
        }
    }

    #[test]
    fn progress_reports_what_was_counted() {
        let p = CopyProgress::default();
        p.sent.fetch_add(3, Ordering::Relaxed);
        p.received.fetch_add(5, Ordering::Relaxed);
        assert_eq!(
            p.stats(),
            CopyStats {
                sent: 3,
                received: 5
            }
        );
    }
}
