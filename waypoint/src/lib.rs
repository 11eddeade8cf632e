//! The waypoint: an L7 proxy for the namespaces (or services) that ask for one. HBONE in,
//! HTTP routing from Gateway API HTTPRoutes and L7 AuthorizationPolicy, HBONE out to the
//! chosen endpoint's ztunnel.
#![forbid(unsafe_code)]

pub mod admin;
pub mod authz;
pub mod balancer;
pub mod binding;
pub mod body;
pub mod counted;
pub mod hop;
pub mod in_flight;
pub mod l4;
pub mod metrics;
/// The request normalisation policies are evaluated on (shared with `meshctl authz check`).
pub use mesh_authz::normalize;
pub mod pipeline;
pub mod proxy;
pub mod route;
pub mod server;
pub mod snapshot;
pub mod upstream_pool;
pub mod xds;
