//! In-pod mode: pods and their network namespaces arrive from the node agent over ZDS.
pub mod manager;
pub mod podfile;
pub mod zds;
