//! HBONE: TCP tunnelled over mTLS HTTP/2 CONNECT (port 15008).
//!
//! - [`protocol`]: authority, headers and status rules, no I/O.
//! - [`pool`]: which connection a stream goes on, no I/O.
//! - [`server`] / [`client`]: the thin I/O shells around them.
//! - [`tunnel`]: one proxied connection, with a zero-copy TCP copy loop.
#![forbid(unsafe_code)]

pub mod client;
pub mod pool;
pub mod protocol;
pub mod server;
pub mod settings;
pub mod tunnel;

pub use client::{Client, ClientSettings, ConnectError, Dialer, Established, TcpDialer};
pub use pool::PoolKey;
pub use protocol::{Authority, ConnectRequest, Forwarded, Refusal, Refused, TraceParent};
pub use server::{
    ConnectHandler, InboundConnect, Responder, ServeError, serve_connection, serve_stream,
};
pub use settings::H2Settings;
pub use tunnel::{CopyStats, Tunnel};
