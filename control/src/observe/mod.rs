//! Golden metrics from Prometheus for `meshctl stat`, `top` and `dashboard`: the PromQL
//! (`promql`), answers turned into rows (`table`), and a minimal HTTP client (`client`).

pub mod client;
pub mod dashboard;
pub mod graph;
pub mod promql;
pub mod table;
