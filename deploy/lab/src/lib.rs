//! mesh-lab: a real multi-node cluster built from Linux network namespaces on one
//! machine, with pods attached by the reference CNI plugins and mesh-cni chained after
//! them.
#![forbid(unsafe_code)]

pub mod cni_runtime;
