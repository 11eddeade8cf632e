//! Sockets ztunnel creates inside a pod's network namespace. Every one carries the mark
//! 0x539 so the pod's redirect rules let it through.

use crate::netns::Netns;
use socket2::{Domain, Protocol, SockRef, Socket, Type};
use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::time::Duration;
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// SO_MARK on ztunnel's pod-netns sockets (Istio's InpodMark).
pub const ZTUNNEL_MARK: u32 = 0x539;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

fn stream_socket(domain: Domain) -> io::Result<Socket> {
    let s = Socket::new(domain, Type::STREAM.cloexec(), Some(Protocol::TCP))?;
    s.set_mark(ZTUNNEL_MARK)?;
    s.set_nonblocking(true)?;
    Ok(s)
}

/// Listens on `[::]:port` (dual stack; `0.0.0.0` if the pod has no IPv6) inside `netns`,
/// with SO_REUSEPORT so a second ztunnel can listen too during an upgrade.
pub fn listen_in(netns: &Netns, port: u16) -> io::Result<TcpListener> {
    let socket = netns.run(|| -> io::Result<Socket> {
        let v6 = stream_socket(Domain::IPV6).and_then(|s| {
            s.set_only_v6(false)?;
            s.set_reuse_address(true)?;
            s.set_reuse_port(true)?;
            s.bind(&SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)).into())?;
            Ok(s)
        });
        let s = match v6 {
            Ok(s) => s,
            Err(_) => {
                let s = stream_socket(Domain::IPV4)?;
                s.set_reuse_address(true)?;
                s.set_reuse_port(true)?;
                s.bind(&SocketAddr::from(([0, 0, 0, 0], port)).into())?;
                s
            }
        };
        s.listen(1024)?;
        Ok(s)
    })??;
    TcpListener::from_std(socket.into())
}

/// Makes the kernel move connections still queued on a closing listener to another
/// listener of its SO_REUSEPORT group (the newer ztunnel's) instead of resetting them
/// (`net.ipv4.tcp_migrate_req`, Linux 5.14+; per network namespace, IPv6 included).
pub fn enable_migrate_req(netns: &Netns) -> io::Result<()> {
    // /proc/sys/net resolves to the namespace of the thread that opens it.
    netns.run(|| std::fs::write("/proc/sys/net/ipv4/tcp_migrate_req", "1"))?
}

/// Connects from inside `netns` to `dst`. With `spoof_src`, the socket is transparent and
/// bound to that address, so the app sees the original client as the source.
pub async fn connect_in(
    netns: &Netns,
    dst: SocketAddr,
    spoof_src: Option<IpAddr>,
) -> io::Result<TcpStream> {
    let socket = netns.run(|| -> io::Result<Socket> {
        let s = stream_socket(Domain::for_address(dst))?;
        if let Some(src) = spoof_src {
            if dst.is_ipv4() {
                s.set_ip_transparent_v4(true)?;
            } else {
                s.set_ip_transparent_v6(true)?;
            }
            s.bind(&SocketAddr::new(src, 0).into())?;
        }
        Ok(s)
    })??;
    let socket = TcpSocket::from_std_stream(socket.into());
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(dst))
        .await
        .map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connect to {dst} timed out"),
            )
        })??;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// The destination the app asked for before REDIRECT sent it to us.
pub fn original_dst(s: &TcpStream) -> io::Result<SocketAddr> {
    let sock = SockRef::from(s);
    let local = s.local_addr()?;
    let addr = match local {
        SocketAddr::V4(_) => sock.original_dst_v4()?,
        SocketAddr::V6(a) if a.ip().to_ipv4_mapped().is_some() => sock.original_dst_v4()?,
        SocketAddr::V6(_) => sock.original_dst_v6()?,
    };
    addr.as_socket()
        .map(canonical)
        .ok_or_else(|| io::Error::other("original destination is not an IP address"))
}

/// IPv4-mapped IPv6 addresses (from dual-stack listeners) as plain IPv4.
pub fn canonical(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::from((v4, v6.port())),
            None => a,
        },
        v4 => v4,
    }
}

/// HBONE dialer for one pod: sockets created in its netns.
#[derive(Clone, Debug)]
pub struct NetnsDialer {
    pub netns: Netns,
}

impl hbone::Dialer for NetnsDialer {
    async fn dial(&self, dst: SocketAddr, _src_ip: Option<IpAddr>) -> io::Result<TcpStream> {
        connect_in(&self.netns, dst, None).await
    }
}
