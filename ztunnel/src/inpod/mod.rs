//! In-pod mode: pods and their network namespaces arrive from the node agent over ZDS.
pub mod netns;
pub mod zds;
