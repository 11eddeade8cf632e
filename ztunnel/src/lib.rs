//! ztunnel: the per-node L4 data plane of the ambient mesh.
#![deny(unsafe_code)]

pub mod admin;
pub mod app;
pub mod config;
pub mod config_dump;
pub mod dns;
pub mod drain;
pub mod handover;
pub mod inpod;
pub mod local;
pub mod metrics;
pub mod netns;
pub mod proxy;
pub mod rbac;
pub mod trace;
pub mod updates;
pub mod xds;

/// Workload/service/policy state (shared with the waypoint).
pub use mesh_discovery as state;
/// Workload certificates (shared with the waypoint).
pub use mesh_xds::certs as identity;
