//! Byte counts of a plain TCP copy (`tokio::io::copy_bidirectional`), which returns none
//! when it fails: counted as they pass, they survive an error, a drain or a policy close.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Counts what is read from and written to `inner`.
pub struct Counted<T> {
    inner: T,
    /// Bytes read from `inner`.
    pub read: u64,
    /// Bytes written to `inner`.
    pub written: u64,
}

impl<T> Counted<T> {
    pub fn new(inner: T) -> Self {
        Counted {
            inner,
            read: 0,
            written: 0,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        self.read += (buf.filled().len() - before) as u64;
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            self.written += n as u64;
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A copy that fails after data moved both ways still reports what moved.
    #[tokio::test]
    async fn counts_survive_a_failed_copy() {
        let (client, near) = tokio::io::duplex(64);
        let (far, server) = tokio::io::duplex(64);
        let mut near = Counted::new(near);
        let mut far = far;
        let copy = async {
            let r = tokio::io::copy_bidirectional(&mut near, &mut far).await;
            (r, near.read, near.written)
        };
        let peers = async move {
            let (mut client, mut server) = (client, server);
            client.write_all(b"hello").await.unwrap();
            let mut got = [0u8; 5];
            server.read_exact(&mut got).await.unwrap();
            server.write_all(b"hi").await.unwrap();
            client.read_exact(&mut got[..2]).await.unwrap();
            // The server side goes away abruptly while the client still sends.
            drop(server);
            let _ = client.write_all(b"more").await;
            client
        };
        let ((r, read, written), _client) = tokio::join!(copy, peers);
        assert!(r.is_err(), "{r:?}");
        assert_eq!((read, written), (9, 2));
    }
}
