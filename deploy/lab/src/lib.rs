//! mesh-lab: a real multi-node cluster built from Linux network namespaces on one
//! machine, with pods attached by the reference CNI plugins and mesh-cni chained after
//! them. The demo, the end-to-end suite and the benchmarks run on it.
#![forbid(unsafe_code)]

pub mod app;
pub mod bench;
pub mod bench_builds;
pub mod bench_profile;
pub mod bench_report;
pub mod cgroup;
pub mod cni_runtime;
pub mod demo;
pub mod ending;
pub mod forward;
pub mod ip_family;
pub mod lab;
pub mod prometheus;
pub mod reboot;
pub mod rollout;
pub mod service_vips;
pub mod traces;
pub mod upgrade;
