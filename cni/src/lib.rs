//! mesh-cni: the chained CNI plugin and the node agent that programs in-pod redirection.
#![forbid(unsafe_code)]

pub mod events;
pub mod plugin;
pub mod rules;
