//! The DNS proxy on 15053 in every pod: answers A/AAAA for the mesh's service names from
//! xDS and forwards everything else to the upstream resolvers, as Istio's ztunnel does.
//!
//! - [`resolve`]: which answer for which name (pure);
//! - [`message`]: the wire format (hickory-proto), sizes, truncation and EDNS (pure);
//! - [`forward`]: the upstream exchange, from the pod's network namespace;
//! - [`resolv`]: the upstream resolvers, kept current with `--dns-resolv-conf`;
//! - [`server`]: the per-pod listeners and their limits;
//! - [`metrics`]: Istio's `istio_dns_*` metrics.

pub mod forward;
pub mod message;
pub mod metrics;
pub mod resolv;
pub mod resolve;
pub mod server;
