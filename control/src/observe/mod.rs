//! Golden metrics from Prometheus for `meshctl stat`, `top` and `dashboard`: the PromQL
//! (`promql`), answers turned into rows (`table`), and a minimal HTTP client (`client`).
//! The dashboard's trace receiver: OTLP/gRPC (`otlp`) into a bounded store (`traces`).

pub mod client;
pub mod dashboard;
pub mod graph;
pub mod otlp;
pub mod promql;
pub mod table;
pub mod traces;
