//! mesh-cni: the chained CNI plugin and the node agent that programs in-pod redirection.
#![deny(unsafe_code)]

pub mod agent;
pub mod cache;
pub mod events;
pub mod install;
pub mod plugin;
pub mod rules;
