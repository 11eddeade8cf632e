//! The request pipeline as stages, each a decision with a narrow input and output that
//! is unit-tested alone; `proxy` is the I/O shell that threads a request through them:
//!
//! admit (normalise) → [`policy`] → [`routing`] → [`fault`] → [`filters`] (redirect,
//! request headers and rewrites) → [`retry`] and [`timeout`] around the upstream tries,
//! [`mirror`] beside them → [`filters`] (response headers).

pub mod admit;
pub mod fault;
pub mod filters;
pub mod mirror;
pub mod outcome;
pub mod policy;
pub mod retry;
pub mod routing;
pub mod timeout;

pub use outcome::{Local, UpstreamError};
