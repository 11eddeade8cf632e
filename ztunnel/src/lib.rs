//! ztunnel: the per-node L4 data plane of the ambient mesh.
pub mod rbac;
pub mod state;
