//! The body type every part of the data path passes along, and the waypoint's own
//! answers (its own module, so the proxy, the counted bodies and the upstream pool all
//! depend on it rather than on each other).

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::{BodyExt, Full, combinators::BoxBody};

pub type Body = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// A body of `bytes`, sent whole.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).map_err(|e| match e {}).boxed()
}

/// An answer from the waypoint itself, in plain text.
pub fn local(status: StatusCode, body: String) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "text/plain")
        .body(full(body))
        .expect("valid response")
}
