//! What an idle tunnel costs in heap, on both sides of HBONE together: an outbound proxy's
//! task (accept, connect, then the copy), the client's and the server's HTTP/2 stream,
//! the server's handler task with its copy to the app, and the two TCP sockets' runtime
//! registrations. Each task is built as ztunnel builds its own: the set-up boxed, then
//! the copy owning the socket, with no async fn around it keeping its arguments. Counted
//! by a global allocator, so this file is its own test binary.

use futures_util::future::{Either, FutureExt};
use hbone::client::{Client, ClientSettings, TcpDialer};
use hbone::protocol::{ConnectRequest, Refusal};
use hbone::server::{ConnectHandler, InboundConnect, Responder};
use hbone::{H2Settings, PoolKey, Tunnel};
use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};

mod common;
use common::Mesh;

/// Bytes allocated and not yet freed, by anyone in this process.
static LIVE: AtomicIsize = AtomicIsize::new(0);

struct Counting;

// SAFETY: every call is passed to the system allocator unchanged; only a count is kept.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: the caller's layout, as GlobalAlloc::alloc requires.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: ptr came from System.alloc with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: as alloc.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        // SAFETY: ptr came from System with this layout; new_size is the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Forwards each CONNECT to its authority and copies, as ztunnel's inbound does: the
/// set-up runs boxed and is freed once done, so the task keeps only the copy.
struct Forward;

impl ConnectHandler for Forward {
    fn handle(&self, req: InboundConnect, respond: Responder) -> impl Future<Output = ()> + Send {
        Box::pin(open_inbound(req, respond)).then(|opened| match opened {
            Some((tunnel, app)) => Either::Left(copy(tunnel, app)),
            None => Either::Right(std::future::ready(())),
        })
    }
}

/// The copy for as long as the tunnel lives, the socket owned by it.
fn copy(tunnel: Tunnel, tcp: TcpStream) -> impl Future<Output = ()> + Send {
    tunnel
        .copy_with_tcp_until(tcp, std::future::pending())
        .map(drop)
}

async fn open_inbound(req: InboundConnect, respond: Responder) -> Option<(Tunnel, TcpStream)> {
    let hbone::Authority::Addr(target) = req.request.authority else {
        respond.refuse(&Refusal::BadRequest("an address, please".into()));
        return None;
    };
    let Ok(app) = TcpStream::connect(target).await else {
        respond.refuse(&Refusal::Unavailable("app unreachable".into()));
        return None;
    };
    let tunnel = respond.accept(Default::default()).ok()?;
    Some((tunnel, app))
}

/// An app on its own thread: echoes one byte on each connection, then holds it open
/// (sockets kept in a vector sized up front, so holding them allocates nothing).
fn start_app(max: usize) -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::with_capacity(max);
        for s in listener.incoming() {
            let mut s = s.unwrap();
            let mut b = [0u8; 1];
            s.read_exact(&mut b).unwrap();
            s.write_all(&b).unwrap();
            held.push(s);
        }
    });
    addr
}

/// Live heap bytes once they stop changing (frames in flight settle): the same for five
/// readings 100 ms apart, so a slow machine's late frames are not taken for the level.
/// A heap still moving after a minute is a failure of its own, not a hang.
async fn settled() -> isize {
    let start = std::time::Instant::now();
    let mut last = LIVE.load(Ordering::Relaxed);
    let mut same = 0;
    while same < 5 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the heap never settled: idle tunnels keep allocating"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = LIVE.load(Ordering::Relaxed);
        same = if now == last { same + 1 } else { 0 };
        last = now;
    }
    last
}

#[tokio::test]
async fn an_idle_tunnel_costs_little_heap_on_both_sides() {
    const N: usize = 256;
    let mesh = Mesh::new();
    let (client_cert, server_cert) = (mesh.cert("client"), mesh.cert("server"));
    let app = start_app(N + 1);

    let hbone_addr =
        common::start_hbone_server(&server_cert, Arc::new(Forward), H2Settings::server()).await;

    // The outbound proxy: each accepted connection gets a task that tunnels it to `app`.
    let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let front_addr = front.local_addr().unwrap();
    let client = Arc::new(Client::new(TcpDialer, ClientSettings::default()));
    let key = PoolKey::new(
        client_cert.identity().clone(),
        vec![server_cert.identity().clone()],
        hbone_addr,
        None,
    );
    let client_cert = Arc::new(client_cert);
    tokio::spawn(async move {
        while let Ok((downstream, _)) = front.accept().await {
            let (client, key, cert) = (client.clone(), key.clone(), client_cert.clone());
            // As ztunnel's outbound: the connect runs boxed, the task keeps the copy.
            let connecting = Box::pin(async move {
                let request = ConnectRequest::new(app);
                client.connect(&key, &cert, &request).await.ok()
            });
            tokio::spawn(connecting.then(|connected| match connected {
                Some(est) => Either::Left(copy(est.tunnel, downstream)),
                None => Either::Right(std::future::ready(())),
            }));
        }
    });

    // Users on their own thread: one byte each way, then the connection stays open.
    let (open_tx, mut opened) = tokio::sync::mpsc::unbounded_channel();
    let (more_tx, more) = std::sync::mpsc::channel::<usize>();
    std::thread::spawn(move || {
        let mut held = Vec::with_capacity(N + 1);
        for n in more {
            for _ in 0..n {
                let mut s = std::net::TcpStream::connect(front_addr).unwrap();
                s.write_all(b"x").unwrap();
                let mut b = [0u8; 1];
                s.read_exact(&mut b).unwrap();
                held.push(s);
            }
            open_tx.send(()).unwrap();
        }
    });
    // The first tunnel opens the HBONE connection (TLS, pools): not an idle tunnel's cost.
    more_tx.send(1).unwrap();
    opened.recv().await.unwrap();
    let before = settled().await;
    more_tx.send(N).unwrap();
    opened.recv().await.unwrap();
    let after = settled().await;

    let per_tunnel = (after - before) / N as isize;
    println!("an idle tunnel: {per_tunnel} bytes of heap, both sides");
    // 3133 bytes: the two tasks (each the copy owning its socket and stop), the streams
    // in h2's slabs (~1.5 KiB, amortised growth), the two sockets' registrations (0.5
    // KiB). 3775 with async fns around the copy (keeping their arguments beside it), 5979
    // with the copy itself written as async fns; ~300 more with a pool key per stream.
    assert!(
        per_tunnel <= 3328,
        "an idle tunnel holds {per_tunnel} bytes of heap on the two sides together"
    );
}
