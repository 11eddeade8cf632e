//! The copy between one tunnel and its TCP connection, written as one future by hand.
//!
//! An idle tunnel's task lives as long as its connection, so the copy's state is paid per
//! open connection. Written with async blocks (two directions joined, raced against the
//! stop, each awaiting readiness and h2 futures), that state was 2.5 KiB; here it is the
//! tunnel, the TCP side (owned or borrowed), the two directions' positions and the byte
//! counts (about 230 bytes), plus the caller's stop. Waiting uses the slots the socket
//! and the stream already have for one task (`poll_read_ready`, `poll_write_ready`,
//! `poll_capacity`, `poll_data`), so waiting stores nothing either. Owning the TCP side
//! and the stop lets a caller's task be this future and little else (no async fn keeping
//! its arguments beside it).

use super::{
    CopyError, CopyStats, EndKind, StreamEnd, Tunnel, classify_end, finish_send, h2_io_error,
    peer_reset_now, reset_error,
};
use bytes::{Buf, Bytes, BytesMut};
use std::borrow::Borrow;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use tokio::net::TcpStream;

/// Read sizes on the TCP side: a read that fills its buffer doubles the next one, up to
/// the maximum, so bulk transfers read large while request/response traffic does not
/// allocate (and touch) large buffers for a few hundred bytes. Buffers are only
/// allocated once the socket is readable, so idle tunnels hold none.
const READ_CHUNK_MIN: usize = 16 * 1024;
const READ_CHUNK: usize = 128 * 1024;

/// The size of the read after one of `chunk` bytes that read `n`.
fn next_read_size(chunk: usize, n: usize) -> usize {
    if n >= chunk {
        (chunk * 2).min(READ_CHUNK)
    } else {
        chunk
    }
}

/// From the TCP side into the stream.
#[derive(Debug)]
enum Upload {
    /// Waiting for the socket to be readable; the next read's size.
    Reading { chunk: usize },
    /// Handing what was read to the stream as flow control allows.
    Sending { data: Bytes, next: usize },
    /// Our END_STREAM is handed to h2; the reason, if the peer had reset the stream by
    /// then (judged once the download has ended too).
    Done(Option<h2::Reason>),
}

/// From the stream to the TCP side.
#[derive(Debug)]
enum Download {
    /// Waiting for the peer's next DATA frame.
    Receiving,
    /// Writing a frame's data; its `window` (the frame's size) is released to the peer
    /// only once all of it is written, so an app that reads slowly holds the peer back.
    Writing { data: Bytes, window: usize },
    /// The peer's END_STREAM was passed on as FIN.
    Done,
}

pin_project_lite::pin_project! {
    /// A tunnel's copy with its TCP connection ([`Tunnel::copy_with_tcp_until`]): both
    /// directions, each until its EOF (passed on as a half-close), the first error ending
    /// both, or `stop` ending the copy as a failure. Owns the tunnel, the TCP side `T`
    /// (a `TcpStream` or a reference to one) and the stop, so this is all an idle
    /// connection's copy keeps.
    pub struct TunnelCopy<T, S> {
        state: CopyState<T>,
        #[pin]
        stop: S,
    }
}

/// Everything but the stop: never pinned, so the two directions borrow it plainly.
struct CopyState<T> {
    tunnel: Tunnel,
    tcp: T,
    stats: CopyStats,
    upload: Upload,
    download: Download,
}

impl<T: Borrow<TcpStream>, S: Future<Output = io::Error>> TunnelCopy<T, S> {
    pub(super) fn new(mut tunnel: Tunnel, tcp: T, stop: S) -> Self {
        // Data already taken off the stream (a caller read part of it first) goes first.
        let pending = std::mem::take(&mut tunnel.pending);
        let download = if pending.is_empty() {
            Download::Receiving
        } else {
            Download::Writing {
                window: pending.len(),
                data: pending,
            }
        };
        TunnelCopy {
            state: CopyState {
                tunnel,
                tcp,
                stats: CopyStats::default(),
                upload: Upload::Reading {
                    chunk: READ_CHUNK_MIN,
                },
                download,
            },
            stop,
        }
    }
}

impl<T: Borrow<TcpStream>> CopyState<T> {
    fn poll_upload(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<h2::Reason>>> {
        let tcp = self.tcp.borrow();
        let send = &mut self.tunnel.send;
        loop {
            match &mut self.upload {
                Upload::Done(peer_reset) => return Poll::Ready(Ok(*peer_reset)),
                Upload::Reading { chunk } => {
                    let chunk = *chunk;
                    ready!(tcp.poll_read_ready(cx))?;
                    let mut buf = BytesMut::with_capacity(chunk);
                    match tcp.try_read_buf(&mut buf) {
                        Ok(0) => {
                            // Everything we had is handed over. A peer that already reset
                            // the stream is judged once the download has ended too.
                            let peer_reset = match finish_send(send, &mut self.tunnel.write_closed)
                            {
                                Ok(()) => None,
                                Err(e) => match peer_reset_now(send, cx) {
                                    Some(reason) => Some(reason),
                                    None => return Poll::Ready(Err(e)),
                                },
                            };
                            self.upload = Upload::Done(peer_reset);
                        }
                        Ok(n) => {
                            self.upload = Upload::Sending {
                                data: buf.freeze(),
                                next: next_read_size(chunk, n),
                            }
                        }
                        // Readiness was stale; try_read cleared it, so the next poll waits.
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => return Poll::Ready(Err(e)),
                    }
                }
                Upload::Sending { data, next } => {
                    if data.is_empty() {
                        self.upload = Upload::Reading { chunk: *next };
                        continue;
                    }
                    send.reserve_capacity(data.len());
                    let granted = match ready!(send.poll_capacity(cx)) {
                        None => {
                            return Poll::Ready(Err(io::Error::new(
                                io::ErrorKind::BrokenPipe,
                                "stream closed",
                            )));
                        }
                        Some(Err(e)) => return Poll::Ready(Err(h2_io_error(e))),
                        Some(Ok(granted)) => granted,
                    };
                    if granted == 0 {
                        continue;
                    }
                    let piece = data.split_to(granted.min(data.len()));
                    let n = piece.len() as u64;
                    send.send_data(piece, false).map_err(h2_io_error)?;
                    self.stats.sent += n;
                }
            }
        }
    }

    fn poll_download(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let tcp = self.tcp.borrow();
        let recv = self.tunnel.recv.as_mut().expect("taken only on drop");
        loop {
            match &mut self.download {
                Download::Done => return Poll::Ready(Ok(())),
                Download::Writing { data, window } => {
                    while !data.is_empty() {
                        ready!(tcp.poll_write_ready(cx))?;
                        match tcp.try_write(data) {
                            Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                            Ok(n) => {
                                data.advance(n);
                                self.stats.received += n as u64;
                            }
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                            Err(e) => return Poll::Ready(Err(e)),
                        }
                    }
                    let _ = recv.flow_control().release_capacity(*window);
                    self.download = Download::Receiving;
                }
                // h2 (0.4.20) keeps a received END_STREAM when a reset follows it, so an
                // error here means the peer's data ended without END_STREAM: a reset of any
                // reason before it is a broken transfer, never passed on as FIN.
                Download::Receiving => match ready!(recv.poll_data(cx)) {
                    Some(Ok(data)) => {
                        self.download = Download::Writing {
                            window: data.len(),
                            data,
                        }
                    }
                    Some(Err(e)) => return Poll::Ready(Err(h2_io_error(e))),
                    None => {
                        // The peer half-closed: pass the FIN on.
                        socket2::SockRef::from(tcp).shutdown(std::net::Shutdown::Write)?;
                        self.download = Download::Done;
                    }
                },
            }
        }
    }

    /// Both directions, `Ok` only for an end [`classify_end`] calls clean.
    fn poll_both(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Both directions are polled on every wake-up (each is cheap when it has nothing
        // to do); either's error ends the copy.
        let upload = self.poll_upload(cx)?;
        let download = self.poll_download(cx)?;
        let (Poll::Ready(peer_reset), Poll::Ready(())) = (upload, download) else {
            return Poll::Pending;
        };
        // Both directions reached their EOF; the peer may have reset the stream since.
        let end = StreamEnd {
            sent_all: true,
            received_all: true,
            peer_reset,
        };
        Poll::Ready(match classify_end(end) {
            EndKind::Clean => Ok(()),
            EndKind::Failed => Err(reset_error(peer_reset.unwrap_or(h2::Reason::CONNECT_ERROR))),
        })
    }
}

impl<T: Borrow<TcpStream>, S: Future<Output = io::Error>> Future for TunnelCopy<T, S> {
    type Output = Result<CopyStats, CopyError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let state = this.state;
        let error = match this.stop.poll(cx) {
            Poll::Ready(e) => e,
            Poll::Pending => match ready!(state.poll_both(cx)) {
                Ok(()) => {
                    state.tunnel.read_eof = true;
                    return Poll::Ready(Ok(state.stats));
                }
                Err(e) => e,
            },
        };
        // RFC 9113 §8.5: a failed tunnel is CONNECT_ERROR on the stream, RST on the TCP side.
        state.tunnel.reset();
        let _ =
            socket2::SockRef::from(state.tcp.borrow()).set_linger(Some(std::time::Duration::ZERO));
        Poll::Ready(Err(CopyError {
            error,
            stats: state.stats,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_grow_only_when_they_fill_the_buffer() {
        assert_eq!(next_read_size(READ_CHUNK_MIN, 100), READ_CHUNK_MIN);
        assert_eq!(
            next_read_size(READ_CHUNK_MIN, READ_CHUNK_MIN),
            2 * READ_CHUNK_MIN
        );
        assert_eq!(next_read_size(READ_CHUNK, READ_CHUNK), READ_CHUNK);
    }

    /// The copy, tunnel and TCP connection included, is what an idle connection's copy
    /// keeps (it was 2.5 KiB as async fns and blocks).
    #[test]
    fn the_copy_state_is_small() {
        type Stop = std::future::Pending<io::Error>;
        let size = std::mem::size_of::<TunnelCopy<TcpStream, Stop>>();
        assert!(size <= 256, "the copy's state is {size} bytes");
    }
}
