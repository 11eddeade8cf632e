//! mesh-control: watches config (a directory of manifests, or Kubernetes), computes the
//! mesh's resources, serves them over delta xDS, and runs the CA.
#![forbid(unsafe_code)]

pub mod ads;
pub mod auth;
pub mod authz_check;
pub mod debug;
pub mod generation;
pub mod grpc;
pub mod index;
pub mod k8s;
pub mod kube_source;
pub mod leader;
pub mod manifest;
pub mod observe;
pub mod rbac;
pub mod readiness;
pub mod server;
pub mod source;
pub mod token_review;
pub mod waypoint_deploy;
