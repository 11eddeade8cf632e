//! ztunnel: the per-node L4 data plane of the ambient mesh.
#![deny(unsafe_code)]

pub mod admin;
pub mod app;
pub mod config;
pub mod drain;
pub mod identity;
pub mod inpod;
pub mod local;
pub mod metrics;
pub mod proxy;
pub mod rbac;
pub mod state;
pub mod xds;
