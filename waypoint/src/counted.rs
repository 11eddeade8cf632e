//! A body that counts the bytes flowing through it and reports the total once, when it
//! is dropped (fully sent, or abandoned by the peer): the sizes behind
//! `istio_request_bytes` and `istio_response_bytes`.

use crate::body::Body;
use bytes::Bytes;
use hyper::body::Frame;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

type Done = Box<dyn FnOnce(u64) + Send + Sync>;

pub struct Counted {
    inner: Body,
    count: Arc<AtomicU64>,
    done: Option<Done>,
}

impl Counted {
    pub fn new(inner: Body, count: Arc<AtomicU64>, done: Option<Done>) -> Self {
        Counted { inner, count, done }
    }
}

impl hyper::body::Body for Counted {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            self.count.fetch_add(data.len() as u64, Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        if let Some(done) = self.done.take() {
            done(self.count.load(Ordering::Relaxed));
        }
    }
}

/// A byte stream that counts what is read from it and written to it (a TCP tunnel's
/// received and sent bytes, kept even when the copy ends in an error).
pub struct CountingIo<T> {
    inner: T,
    pub read: Arc<AtomicU64>,
    pub written: Arc<AtomicU64>,
}

impl<T> CountingIo<T> {
    pub fn new(inner: T) -> Self {
        CountingIo {
            inner,
            read: Default::default(),
            written: Default::default(),
        }
    }
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for CountingIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        self.read.fetch_add(n as u64, Ordering::Relaxed);
        r
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for CountingIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            self.written.fetch_add(*n as u64, Ordering::Relaxed);
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full};
    use std::sync::Mutex;

    #[tokio::test]
    async fn counts_every_data_frame_and_reports_once_on_drop() {
        let frames = chunked(vec![b"hello".to_vec(), b", world".to_vec()]);
        let reported = Arc::new(Mutex::new(Vec::new()));
        let r = reported.clone();
        let count = Arc::new(AtomicU64::new(0));
        let body = Counted::new(
            frames,
            count.clone(),
            Some(Box::new(move |n| r.lock().unwrap().push(n))),
        );
        let bytes = body.collect().await.unwrap().to_bytes();
        assert_eq!(&bytes[..], b"hello, world");
        assert_eq!(count.load(Ordering::Relaxed), 12);
        assert_eq!(
            *reported.lock().unwrap(),
            vec![12],
            "reported once, at drop"
        );

        // An abandoned body reports what went through so far.
        let r = reported.clone();
        let body = Counted::new(
            Full::new(Bytes::from_static(b"abc"))
                .map_err(|e| match e {})
                .boxed(),
            Arc::new(AtomicU64::new(0)),
            Some(Box::new(move |n| r.lock().unwrap().push(n))),
        );
        drop(body);
        assert_eq!(*reported.lock().unwrap(), vec![12, 0]);
    }

    /// A body delivering `chunks` as separate data frames.
    struct Chunks(std::collections::VecDeque<Bytes>);

    impl hyper::body::Body for Chunks {
        type Data = Bytes;
        type Error = Box<dyn std::error::Error + Send + Sync>;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            Poll::Ready(self.0.pop_front().map(|b| Ok(Frame::data(b))))
        }
    }

    fn chunked(chunks: Vec<Vec<u8>>) -> Body {
        Chunks(chunks.into_iter().map(Bytes::from).collect()).boxed()
    }
}
