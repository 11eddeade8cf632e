//! One tunnelled TCP connection: an HTTP/2 stream pair, usable as `AsyncRead + AsyncWrite`
//! or, on the hot path, copied to and from a `TcpStream` without intermediate copies.

use bytes::{Buf, Bytes};
use h2::{RecvStream, SendStream};
use std::borrow::Borrow;
use std::future::{Future, poll_fn};
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

mod copy;
pub use copy::TunnelCopy;

/// Called once when the stream is finished (returns its slot to the pool).
pub(crate) type OnDrop = Box<dyn FnOnce() + Send + Sync>;

/// How long a dropped client-side tunnel waits for the peer's END_STREAM ([`Linger`]).
const LINGER: std::time::Duration = std::time::Duration::from_secs(10);

pub struct Tunnel {
    send: SendStream<Bytes>,
    /// Taken only when a dropped tunnel lingers.
    recv: Option<RecvStream>,
    /// Remainder of the last DATA frame, not yet read by the caller.
    pending: Bytes,
    read_eof: bool,
    write_closed: bool,
    /// We reset the stream (a failure): nothing is left to deliver.
    reset_sent: bool,
    /// Our side opened the stream (an h2 client), see [`Linger`].
    linger: bool,
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
        let on_drop = self.on_drop.take();
        let linger = Linger::decide(LingerState {
            client: self.linger,
            write_closed: self.write_closed,
            read_eof: self.read_eof,
            reset_sent: self.reset_sent,
        });
        if linger == Linger::UntilPeerEnds
            && let (Some(recv), Ok(rt)) = (self.recv.take(), tokio::runtime::Handle::try_current())
        {
            rt.spawn(linger_until_peer_ends(recv, on_drop));
            return;
        }
        if let Some(f) = on_drop {
            f();
        }
    }
}

/// What a tunnel knows about its stream when it is dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct LingerState {
    client: bool,
    write_closed: bool,
    read_eof: bool,
    reset_sent: bool,
}

/// What dropping a tunnel does to its stream. An h2 client dropping a stream the peer
/// has not finished resets it with CANCEL and discards what it still had queued —
/// including our END_STREAM, so a peer would see a clean end as a failure. A client
/// tunnel whose side is finished therefore keeps its receive half until the peer ends
/// too (bounded by [`LINGER`]) while h2 sends the queued END_STREAM. A server's drop
/// needs no help: h2 sends its queued END_STREAM, then RST_STREAM(NO_ERROR).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Linger {
    /// Drop now: the stream is complete, failed, a server's, or ours was not finished
    /// (CANCEL is then the truth).
    No,
    UntilPeerEnds,
}

impl Linger {
    fn decide(s: LingerState) -> Linger {
        if s.client && s.write_closed && !s.read_eof && !s.reset_sent {
            Linger::UntilPeerEnds
        } else {
            Linger::No
        }
    }
}

/// Holds a finished client stream until the peer's END_STREAM (the stream then closes
/// with no reset), a reset, or [`LINGER`]. Data still arriving has nobody to read it:
/// the stream is dropped at once, which h2 turns into CANCEL, as after the bound.
async fn linger_until_peer_ends(mut recv: RecvStream, on_drop: Option<OnDrop>) {
    let _ = tokio::time::timeout(LINGER, async {
        if let Some(Ok(data)) = poll_fn(|cx| recv.poll_data(cx)).await {
            let _ = recv.flow_control().release_capacity(data.len());
        }
    })
    .await;
    drop(recv);
    if let Some(f) = on_drop {
        f();
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

/// Classifies a stream's end. Clean only when everything both sides sent was delivered
/// (our END_STREAM was handed to h2, the peer's reached us) and the peer did not reset
/// the stream, or reset it with NO_ERROR — what h2 does when a server drops a stream it finished sending
/// without waiting for ours (RFC 9113 §8.1; its END_STREAM goes out first). CANCEL is
/// never clean: an h2 client dropping a stream discards what it had queued, and our own
/// ends (drain, policy) and Istio's send it on failures. Any other reason is a failure
/// too: a tunnel whose TCP side failed resets with CONNECT_ERROR (RFC 9113 §8.5).
pub fn classify_end(end: StreamEnd) -> EndKind {
    match end.peer_reset {
        _ if !(end.sent_all && end.received_all) => EndKind::Failed,
        None | Some(h2::Reason::NO_ERROR) => EndKind::Clean,
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
    /// `client`: our side opened the stream (see [`Linger`]).
    pub(crate) fn new(
        send: SendStream<Bytes>,
        recv: RecvStream,
        client: bool,
        on_drop: Option<OnDrop>,
    ) -> Self {
        Tunnel {
            send,
            recv: Some(recv),
            pending: Bytes::new(),
            read_eof: false,
            write_closed: false,
            reset_sent: false,
            linger: client,
            on_drop,
        }
    }

    fn recv(&mut self) -> &mut RecvStream {
        self.recv.as_mut().expect("taken only on drop")
    }

    /// Aborts the stream so the peer sees a failure rather than a clean end: the TCP
    /// connection behind it failed (RST_STREAM(CONNECT_ERROR), RFC 9113 §8.5).
    pub fn reset(&mut self) {
        self.reset_sent = true;
        self.send.send_reset(h2::Reason::CONNECT_ERROR);
    }

    /// Copies both ways between this tunnel and `tcp` until both directions have ended.
    /// EOF on either side is passed on as a half-close (END_STREAM / FIN); an error on
    /// either side, or a reset by the peer before its END_STREAM, aborts both
    /// (RST_STREAM / RST). How the end is judged is [`classify_end`]; the bytes moved come
    /// back either way (on failure inside the error).
    pub fn copy_with_tcp(
        self,
        tcp: &TcpStream,
    ) -> TunnelCopy<&TcpStream, std::future::Pending<io::Error>> {
        self.copy_with_tcp_until(tcp, std::future::pending())
    }

    /// [`Self::copy_with_tcp`], aborted as a failure when `stop` completes (drain,
    /// policy): both ends then see a failure (RST_STREAM(CONNECT_ERROR), TCP RST) rather
    /// than a silently dropped stream, and the copy returns `stop`'s error with the bytes
    /// moved until then. The copy owns `tcp` (a `TcpStream`, or a reference to one) and
    /// `stop`, so a task can be the copy and little else.
    pub fn copy_with_tcp_until<T: Borrow<TcpStream>, S: Future<Output = io::Error>>(
        self,
        tcp: T,
        stop: S,
    ) -> TunnelCopy<T, S> {
        TunnelCopy::new(self, tcp, stop)
    }
}

/// Half-closes our direction (END_STREAM), once.
fn finish_send(send: &mut SendStream<Bytes>, closed: &mut bool) -> io::Result<()> {
    if !*closed {
        *closed = true;
        send.send_data(Bytes::new(), true).map_err(h2_io_error)?;
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
                let _ = self.recv().flow_control().release_capacity(n);
                return Poll::Ready(Ok(()));
            }
            if self.read_eof {
                return Poll::Ready(Ok(()));
            }
            match ready!(self.recv().poll_data(cx)) {
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
    fn no_error_after_the_peers_end_stream_is_clean() {
        // A server dropping the stream after its END_STREAM (RFC 9113 §8.1).
        assert_eq!(end(true, true, Some(Reason::NO_ERROR)), EndKind::Clean);
    }

    #[test]
    fn a_reset_before_the_peers_end_stream_is_a_failure() {
        // Indistinguishable from a peer that crashed mid-answer.
        for reason in [Reason::NO_ERROR, Reason::CANCEL, Reason::CONNECT_ERROR] {
            assert_eq!(
                end(true, false, Some(reason)),
                EndKind::Failed,
                "{reason:?}"
            );
        }
    }

    #[test]
    fn cancel_is_never_clean() {
        // h2 clients discard their queued END_STREAM on CANCEL; Istio's ztunnel and our
        // drain/policy ends send it on failures.
        for (sent_all, received_all) in [(true, true), (true, false), (false, true)] {
            assert_eq!(
                end(sent_all, received_all, Some(Reason::CANCEL)),
                EndKind::Failed
            );
        }
    }

    #[test]
    fn linger_only_for_a_finished_client_stream_awaiting_the_peer() {
        let finished = LingerState {
            client: true,
            write_closed: true,
            read_eof: false,
            reset_sent: false,
        };
        assert_eq!(Linger::decide(finished), Linger::UntilPeerEnds);
        for s in [
            LingerState {
                client: false,
                ..finished
            },
            LingerState {
                write_closed: false,
                ..finished
            },
            LingerState {
                read_eof: true,
                ..finished
            },
            LingerState {
                reset_sent: true,
                ..finished
            },
        ] {
            assert_eq!(Linger::decide(s), Linger::No, "{s:?}");
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
}
