//! Reused HTTP connections to endpoints. Each one rides its own HBONE stream, so reuse
//! saves a CONNECT round trip and a handshake per request. HTTP/1.1 connections return
//! to the pool once their response body has been read to the end; an HTTP/2 connection
//! is shared by every request to its endpoint.

use crate::body::Body;
use hyper::client::conn::{http1, http2};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One endpoint as the pool sees it: the workload (an address can be reused by another
/// workload with another identity) and the target port.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct EndpointKey {
    pub workload_uid: String,
    pub addr: SocketAddr,
}

#[derive(Clone, Copy, Debug)]
pub struct PoolLimits {
    /// Idle HTTP/1.1 connections kept per endpoint; more are closed when they go idle.
    pub max_idle_per_endpoint: usize,
    /// An idle connection unused for this long is closed.
    pub idle_timeout: Duration,
}

impl Default for PoolLimits {
    fn default() -> Self {
        PoolLimits {
            max_idle_per_endpoint: 32,
            idle_timeout: Duration::from_secs(60),
        }
    }
}

#[derive(Default)]
struct Endpoint {
    /// Idle HTTP/1.1 connections, most recently used last.
    h1: Vec<(http1::SendRequest<Body>, Instant)>,
    h2: Option<(http2::SendRequest<Body>, Instant)>,
    /// Held while an HTTP/2 connection is being opened, so that concurrent first requests
    /// wait for that one instead of each opening their own.
    h2_dial: Option<Arc<tokio::sync::Mutex<()>>>,
}

impl Endpoint {
    fn is_unused(&self) -> bool {
        self.h1.is_empty()
            && self.h2.is_none()
            && self
                .h2_dial
                .as_ref()
                .is_none_or(|d| Arc::strong_count(d) == 1)
    }
}

pub struct UpstreamPool {
    limits: PoolLimits,
    endpoints: Mutex<HashMap<EndpointKey, Endpoint>>,
}

impl Default for UpstreamPool {
    fn default() -> Self {
        Self::new(PoolLimits::default())
    }
}

impl UpstreamPool {
    pub fn new(limits: PoolLimits) -> Self {
        UpstreamPool {
            limits,
            endpoints: Mutex::new(HashMap::new()),
        }
    }

    /// The most recently used idle HTTP/1.1 connection to `key` that is still open.
    pub fn take_h1(&self, key: &EndpointKey, now: Instant) -> Option<http1::SendRequest<Body>> {
        let mut eps = self.endpoints.lock().expect("pool lock");
        let ep = eps.get_mut(key)?;
        let mut found = None;
        while let Some((s, since)) = ep.h1.pop() {
            if !s.is_closed()
                && s.is_ready()
                && now.duration_since(since) < self.limits.idle_timeout
            {
                found = Some(s);
                break;
            }
        }
        if ep.is_unused() {
            eps.remove(key);
        }
        found
    }

    /// Gives back an HTTP/1.1 connection that is ready for another request.
    pub fn put_h1(&self, key: EndpointKey, sender: http1::SendRequest<Body>, now: Instant) {
        if sender.is_closed() {
            return;
        }
        let mut eps = self.endpoints.lock().expect("pool lock");
        let ep = eps.entry(key).or_default();
        if ep.h1.len() < self.limits.max_idle_per_endpoint {
            ep.h1.push((sender, now));
        }
    }

    /// The shared HTTP/2 connection to `key`, if it is still open.
    pub fn h2(&self, key: &EndpointKey, now: Instant) -> Option<http2::SendRequest<Body>> {
        let mut eps = self.endpoints.lock().expect("pool lock");
        let ep = eps.get_mut(key)?;
        match &mut ep.h2 {
            Some((s, used)) if !s.is_closed() => {
                *used = now;
                Some(s.clone())
            }
            _ => {
                ep.h2 = None;
                None
            }
        }
    }

    /// The lock to hold while opening the HTTP/2 connection to `key`.
    pub fn h2_dial_lock(&self, key: &EndpointKey) -> Arc<tokio::sync::Mutex<()>> {
        self.endpoints
            .lock()
            .expect("pool lock")
            .entry(key.clone())
            .or_default()
            .h2_dial
            .get_or_insert_with(Default::default)
            .clone()
    }

    pub fn set_h2(&self, key: EndpointKey, sender: http2::SendRequest<Body>, now: Instant) {
        self.endpoints
            .lock()
            .expect("pool lock")
            .entry(key)
            .or_default()
            .h2 = Some((sender, now));
    }

    /// Closes connections idle past the timeout or already closed by the peer.
    pub fn sweep(&self, now: Instant) {
        let timeout = self.limits.idle_timeout;
        let mut eps = self.endpoints.lock().expect("pool lock");
        eps.retain(|_, ep| {
            ep.h1
                .retain(|(s, since)| !s.is_closed() && now.duration_since(*since) < timeout);
            if ep
                .h2
                .as_ref()
                .is_some_and(|(s, used)| s.is_closed() || now.duration_since(*used) >= timeout)
            {
                ep.h2 = None;
            }
            if ep
                .h2_dial
                .as_ref()
                .is_some_and(|d| Arc::strong_count(d) == 1)
            {
                ep.h2_dial = None;
            }
            !ep.is_unused()
        });
    }

    /// Idle HTTP/1.1 connections and shared HTTP/2 connections currently held.
    pub fn held(&self) -> (usize, usize) {
        let eps = self.endpoints.lock().expect("pool lock");
        (
            eps.values().map(|e| e.h1.len()).sum(),
            eps.values().filter(|e| e.h2.is_some()).count(),
        )
    }

    /// Sweeps every half idle timeout, for as long as the pool is alive elsewhere.
    pub async fn run_sweeper(self: Arc<Self>) {
        let weak = Arc::downgrade(&self);
        let every = self.limits.idle_timeout / 2;
        drop(self);
        loop {
            tokio::time::sleep(every).await;
            match weak.upgrade() {
                Some(pool) => pool.sweep(Instant::now()),
                None => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::{BodyExt, Empty, Full};

    /// A sender on an in-memory HTTP/1.1 connection to a server answering 200.
    async fn h1_sender() -> http1::SendRequest<Body> {
        let (a, b) = tokio::io::duplex(4096);
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(|_req| async {
                Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::from("ok"))))
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(b), svc)
                .await;
        });
        let (s, conn) = http1::handshake(hyper_util::rt::TokioIo::new(a))
            .await
            .unwrap();
        tokio::spawn(conn);
        let mut s = s;
        s.ready().await.unwrap();
        s
    }

    fn key(n: u8) -> EndpointKey {
        EndpointKey {
            workload_uid: format!("w{n}"),
            addr: SocketAddr::from(([10, 0, 0, n], 8080)),
        }
    }

    #[tokio::test]
    async fn idle_connections_are_reused_bounded_and_expire() {
        let pool = UpstreamPool::new(PoolLimits {
            max_idle_per_endpoint: 2,
            idle_timeout: Duration::from_secs(10),
        });
        let t0 = Instant::now();
        assert!(pool.take_h1(&key(1), t0).is_none());
        for _ in 0..3 {
            pool.put_h1(key(1), h1_sender().await, t0);
        }
        assert_eq!(pool.held(), (2, 0), "at most two idle per endpoint");
        // Other endpoints are separate.
        assert!(pool.take_h1(&key(2), t0).is_none());
        let mut s = pool.take_h1(&key(1), t0).expect("an idle connection");
        let req = http::Request::get("/")
            .body(Empty::new().map_err(|e| match e {}).boxed())
            .unwrap();
        let resp = s.send_request(req).await.unwrap();
        assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), "ok");
        // Expired connections are never handed out, and the sweep drops them.
        assert!(
            pool.take_h1(&key(1), t0 + Duration::from_secs(11))
                .is_none()
        );
        pool.put_h1(key(1), s, t0);
        pool.sweep(t0 + Duration::from_secs(11));
        assert_eq!(pool.held(), (0, 0));
    }

    #[tokio::test]
    async fn a_connection_closed_by_the_peer_is_not_handed_out() {
        let pool = UpstreamPool::default();
        let (a, b) = tokio::io::duplex(64);
        let (s, conn) = http1::handshake::<_, Body>(hyper_util::rt::TokioIo::new(a))
            .await
            .unwrap();
        let conn = tokio::spawn(conn);
        pool.put_h1(key(1), s, Instant::now());
        drop(b);
        let _ = conn.await;
        assert!(pool.take_h1(&key(1), Instant::now()).is_none());
        assert_eq!(pool.held(), (0, 0));
    }
}
