//! HTTP/2 settings for HBONE, as in the reference: 4 MiB stream and 16 MiB connection
//! windows, 1 MiB frames, PING every 10 s with a 20 s timeout, 10 s to set a connection up.

use std::time::Duration;

const MIB: u32 = 1024 * 1024;

#[derive(Clone, Debug)]
pub struct H2Settings {
    pub stream_window: u32,
    pub connection_window: u32,
    pub max_frame_size: u32,
    pub max_header_list_size: u32,
    /// Server: advertised limit. Client: most streams we put on one connection (the peer's
    /// advertised limit caps it further).
    pub max_concurrent_streams: u32,
    pub max_send_buffer: usize,
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    /// Longest a new connection may take from TCP to HTTP/2 ready: the TLS handshake, the
    /// preface and the peer's SETTINGS (server and client alike).
    pub handshake_timeout: Duration,
}

impl H2Settings {
    pub fn server() -> Self {
        H2Settings {
            stream_window: 4 * MIB,
            connection_window: 16 * MIB,
            max_frame_size: MIB,
            max_header_list_size: 64 * 1024,
            max_concurrent_streams: 200,
            max_send_buffer: 400 * 1024,
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(20),
            handshake_timeout: Duration::from_secs(10),
        }
    }

    pub fn client() -> Self {
        H2Settings {
            max_header_list_size: 16 * 1024,
            max_concurrent_streams: 100,
            max_send_buffer: 4 * MIB as usize,
            ..Self::server()
        }
    }

    pub(crate) fn server_builder(&self) -> h2::server::Builder {
        let mut b = h2::server::Builder::new();
        b.initial_window_size(self.stream_window)
            .initial_connection_window_size(self.connection_window)
            .max_frame_size(self.max_frame_size)
            .max_header_list_size(self.max_header_list_size)
            .max_concurrent_streams(self.max_concurrent_streams)
            .max_send_buffer_size(self.max_send_buffer);
        b
    }

    pub(crate) fn client_builder(&self) -> h2::client::Builder {
        let mut b = h2::client::Builder::new();
        b.initial_window_size(self.stream_window)
            .initial_connection_window_size(self.connection_window)
            .max_frame_size(self.max_frame_size)
            .max_header_list_size(self.max_header_list_size)
            .max_send_buffer_size(self.max_send_buffer)
            .enable_push(false);
        b
    }
}

/// Sends a PING every `interval`; resolves when one goes unanswered for `timeout`.
/// The connection must be polled concurrently for the answer to arrive.
pub(crate) async fn keepalive_failed(
    mut ping_pong: h2::PingPong,
    interval: Duration,
    timeout: Duration,
) {
    loop {
        tokio::time::sleep(interval).await;
        match tokio::time::timeout(timeout, ping_pong.ping(h2::Ping::opaque())).await {
            Ok(Ok(_)) => continue,
            _ => return,
        }
    }
}
