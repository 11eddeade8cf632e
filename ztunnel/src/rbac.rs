//! L4 authorization: the shared evaluator (see `mesh-authz`).
pub use mesh_authz::{ConnectionInfo, Decision, evaluate};
