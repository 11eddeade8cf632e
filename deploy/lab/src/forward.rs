//! `mesh-lab dashboard`: the dashboard (like Prometheus) lives in node 1's namespace on
//! its loopback; this forwards a port on the machine's loopback to it, the way
//! `kubectl port-forward` reaches a pod. Each connection's thread enters node 1's
//! network namespace to connect, then copies both ways.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;

/// Connects to `to` from inside the network namespace at `netns` (a /var/run/netns path).
fn connect_in(netns: &PathBuf, to: SocketAddr) -> std::io::Result<TcpStream> {
    let f = std::fs::File::open(netns)?;
    // Only this thread changes namespace; it serves this one connection.
    nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)?;
    TcpStream::connect(to)
}

fn pipe(mut from: TcpStream, mut to: TcpStream) {
    let _ = std::io::copy(&mut from, &mut to);
    let _ = to.shutdown(std::net::Shutdown::Write);
}

/// Forwards every connection to `listener` to `to` in namespace `netns`, until the
/// process ends.
pub fn serve(listener: TcpListener, netns: PathBuf, to: SocketAddr) {
    for client in listener.incoming().flatten() {
        let netns = netns.clone();
        std::thread::spawn(move || {
            let Ok(upstream) = connect_in(&netns, to) else {
                return;
            };
            let (Ok(c2), Ok(u2)) = (client.try_clone(), upstream.try_clone()) else {
                return;
            };
            let t = std::thread::spawn(move || pipe(c2, u2));
            pipe(upstream, client);
            let _ = t.join();
        });
    }
}
