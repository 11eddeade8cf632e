//! The wire contracts every two programs of the mesh share.
//!
//! Generated from `protos/` at build time. Package names, message names and field
//! numbers match Istio's and Envoy's, so an upstream peer can take the place of any of
//! our programs. Convenience aliases sit at the crate root (`workload`, `security`, ...).
// Unsafe only where an fd changes hands, each block with its SAFETY comment: taking
// ownership of fds received over ZDS, and registering an owned ZDS socket with tokio's
// reactor (`zds::socket`).
#![deny(unsafe_code)]

/// Generated code, nested exactly as the protobuf packages so cross-package paths resolve.
#[allow(clippy::all, clippy::pedantic)]
pub mod generated {
    pub mod istio {
        pub mod workload {
            include!(concat!(env!("OUT_DIR"), "/istio.workload.rs"));
            pub mod zds {
                include!(concat!(env!("OUT_DIR"), "/istio.workload.zds.rs"));
            }
        }
        pub mod security {
            include!(concat!(env!("OUT_DIR"), "/istio.security.rs"));
        }
        pub mod v1 {
            pub mod auth {
                include!(concat!(env!("OUT_DIR"), "/istio.v1.auth.rs"));
            }
        }
    }
    pub mod envoy {
        pub mod service {
            pub mod discovery {
                pub mod v3 {
                    include!(concat!(env!("OUT_DIR"), "/envoy.service.discovery.v3.rs"));
                }
            }
        }
        pub mod config {
            pub mod core {
                pub mod v3 {
                    include!(concat!(env!("OUT_DIR"), "/envoy.config.core.v3.rs"));
                }
            }
        }
    }
    pub mod mesh {
        pub mod cni {
            pub mod v1 {
                include!(concat!(env!("OUT_DIR"), "/mesh.cni.v1.rs"));
            }
        }
        pub mod waypoint {
            pub mod v1 {
                include!(concat!(env!("OUT_DIR"), "/mesh.waypoint.v1.rs"));
            }
        }
        pub mod echo {
            pub mod v1 {
                include!(concat!(env!("OUT_DIR"), "/mesh.echo.v1.rs"));
            }
        }
    }
    pub mod google {
        pub mod rpc {
            include!(concat!(env!("OUT_DIR"), "/google.rpc.rs"));
        }
    }
}

pub use generated::envoy::config::core::v3 as envoy_core;
pub use generated::envoy::service::discovery::v3 as discovery;
pub use generated::google::rpc;
pub use generated::istio::security;
pub use generated::istio::v1::auth as ca;
pub use generated::istio::workload;
pub use generated::mesh::cni::v1 as cni;
pub use generated::mesh::echo::v1 as echo;
pub use generated::mesh::waypoint::v1 as waypoint;

pub mod duration;
pub mod process;
pub mod zds;

pub use prost;
pub use prost_types;

/// xDS type URLs.
pub mod type_url {
    /// Workloads and services, looked up by uid, `ns/hostname` or `<network>/<ip>` alias.
    pub const ADDRESS: &str = "type.googleapis.com/istio.workload.Address";
    /// L4 authorization policies, keyed `ns/name`.
    pub const AUTHORIZATION: &str = "type.googleapis.com/istio.security.Authorization";
    /// Workload-only view (served for compatibility; ztunnel uses ADDRESS).
    pub const WORKLOAD: &str = "type.googleapis.com/istio.workload.Workload";
    /// Every pod on a node and whether it is enrolled (ours), keyed `ns/name`, per node.
    pub const NODE_POD: &str = "type.googleapis.com/mesh.cni.v1.NodePod";
    /// HTTPRoutes for the services a waypoint serves (ours), keyed `ns/name`.
    pub const HTTP_ROUTE: &str = "type.googleapis.com/mesh.waypoint.v1.HttpRoute";
    /// AuthorizationPolicies targeting a waypoint or its services (ours), keyed `ns/name`.
    pub const L7_POLICY: &str = "type.googleapis.com/mesh.waypoint.v1.L7Policy";
}

/// gRPC metadata key under which a node proxy names the identity it requests a
/// certificate for (in the CSR request's `metadata` Struct).
pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";

/// ZDS capabilities (`ZdsHello.capabilities`, our extension).
pub mod zds_capability {
    /// The ztunnel understands `Handover`: it stops accepting, keeps its open
    /// connections, and exits once they have ended and it has seen SIGTERM.
    pub const HANDOVER_V1: &str = "handover.v1";
}

/// Well-known ports (ztunnel in each pod netns, waypoints, admin).
pub mod ports {
    pub const OUTBOUND: u16 = 15001;
    pub const INBOUND_PLAINTEXT: u16 = 15006;
    pub const HBONE: u16 = 15008;
    pub const DNS: u16 = 15053;
    pub const SOCKS5: u16 = 15080;
    pub const ADMIN: u16 = 15000;
    pub const METRICS: u16 = 15020;
    pub const READINESS: u16 = 15021;

    /// Ports that must never be the target of proxied traffic (loop protection).
    pub fn is_proxy_port(port: u16) -> bool {
        matches!(port, OUTBOUND | INBOUND_PLAINTEXT | HBONE | SOCKS5)
    }
}
