//! ztunnel: the per-node L4 data plane of the ambient mesh.
#![deny(unsafe_code)]

pub mod drain;
pub mod identity;
pub mod inpod;
pub mod local;
pub mod metrics;
pub mod proxy;
pub mod rbac;
pub mod state;
