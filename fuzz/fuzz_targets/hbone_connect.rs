//! The HBONE CONNECT request a peer sends (after h2's HPACK decoding): method,
//! `:authority`, and the forwarded / baggage / traceparent headers, one per line. Never
//! panics, and a request the server accepts re-encodes and reads back the same.
#![no_main]

use hbone::protocol::{ConnectRequest, Forwarded, TraceParent, parse_authority};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut lines = text.split('\n');
    let (method, authority) = (lines.next().unwrap_or(""), lines.next().unwrap_or(""));
    let _ = parse_authority(authority);
    let mut headers = http::HeaderMap::new();
    for (name, v) in ["forwarded", "baggage", "traceparent"]
        .into_iter()
        .zip(lines)
    {
        let _ = (Forwarded::parse(v), TraceParent::parse(v));
        if let Ok(v) = http::HeaderValue::from_bytes(v.as_bytes()) {
            headers.insert(name, v);
        }
    }
    let (Ok(method), Ok(uri)) = (
        http::Method::from_bytes(method.as_bytes()),
        authority.parse::<http::Uri>(),
    ) else {
        return;
    };
    if let Ok(req) = ConnectRequest::from_http(&method, &uri, &headers) {
        let again = req.to_http().expect("an accepted request re-encodes");
        let back = ConnectRequest::from_http(again.method(), again.uri(), again.headers())
            .expect("a re-encoded request is accepted");
        assert_eq!(back.authority, req.authority);
        assert_eq!(back.forwarded.for_addr, req.forwarded.for_addr);
    }
});
