//! The one HTTP module for admin, metrics and readiness, used by every program of the
//! mesh (ztunnel, the node agent, the waypoint, mesh-control).
//!
//! [`routes`] decides which handler answers a request (pure, unit-tested); [`server`] is
//! the I/O shell: one task per connection, a header-read timeout that also closes idle
//! keep-alive connections, a cap on a connection's lifetime, bounded headers and bodies,
//! and caps on concurrent connections, overall and per peer address ([`admission`]). A
//! slow or idle client therefore holds only its own task and its own share of slots:
//! readiness keeps answering the kubelet.
#![forbid(unsafe_code)]

pub mod admission;
#[cfg(feature = "profiles")]
pub mod profile;
pub mod query;
pub mod routes;
pub mod server;

pub use query::{percent_decode, query_param};
pub use routes::{Decision, Request, Response, Routes};
pub use server::{BindError, Limits, bind, serve, spawn};
