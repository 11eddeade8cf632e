//! Hop-by-hop headers (RFC 9110 §7.6.1): they describe one connection, so a proxy
//! removes them before forwarding, in both directions. Otherwise a client learns the
//! upstream connection's state (`connection: keep-alive, close` at a drain), and a
//! client can make the upstream drop headers a policy or route relied on by naming them
//! in `connection`.

use http::HeaderMap;
use http::header::{CONNECTION, HeaderName, TE, TRANSFER_ENCODING};

/// Headers that are hop-by-hop whatever `connection` says (`te: trailers` excepted: gRPC
/// needs it end to end, and it says nothing about the connection).
const ALWAYS: [&str; 3] = ["keep-alive", "proxy-connection", "upgrade"];

/// Removes `connection`, every header it names, and the headers hop-by-hop by definition.
pub fn strip(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    headers.remove(CONNECTION);
    for n in named {
        // `connection: te` must not take away `te: trailers` below.
        if n != TE {
            headers.remove(&n);
        }
    }
    for n in ALWAYS {
        headers.remove(n);
    }
    headers.remove(TRANSFER_ENCODING);
    let trailers_only = headers
        .get_all(TE)
        .iter()
        .all(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    if !trailers_only {
        headers.remove(TE);
    }
}

/// Refuses a message whose `transfer-encoding` is anything but exactly `chunked`: the
/// framing is undone on receipt and the header stripped, so any other coding (`gzip,
/// chunked`) would reach the other side silently decoded of its framing but not of its
/// coding, and be misread.
pub fn check_transfer_coding(headers: &HeaderMap) -> Result<(), String> {
    let codings: Vec<String> = headers
        .get_all(TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| {
            String::from_utf8_lossy(v.as_bytes())
                .split(',')
                .map(|c| c.trim().to_ascii_lowercase())
                .filter(|c| !c.is_empty())
                .collect::<Vec<_>>()
        })
        .collect();
    match codings.as_slice() {
        [] => Ok(()),
        [c] if c == "chunked" => Ok(()),
        _ => Err(format!(
            "transfer-encoding {:?} is not served (only chunked)",
            codings.join(", ")
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn removes_connection_and_what_it_names() {
        let mut h = map(&[
            ("connection", "keep-alive, X-Internal"),
            ("connection", "x-second"),
            ("x-internal", "secret"),
            ("x-second", "2"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "h2c"),
            ("x-kept", "yes"),
            ("authorization", "Bearer t"),
        ]);
        strip(&mut h);
        let mut left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        left.sort();
        assert_eq!(left, ["authorization", "x-kept"]);
    }

    #[test]
    fn te_trailers_survives_other_te_does_not() {
        let mut h = map(&[("te", "trailers"), ("connection", "te")]);
        strip(&mut h);
        assert_eq!(h["te"], "trailers");
        let mut h = map(&[("te", "gzip, trailers")]);
        strip(&mut h);
        assert!(h.get("te").is_none());
    }

    #[test]
    fn only_plain_chunked_framing_is_served() {
        assert!(check_transfer_coding(&map(&[])).is_ok());
        assert!(check_transfer_coding(&map(&[("transfer-encoding", "chunked")])).is_ok());
        assert!(check_transfer_coding(&map(&[("transfer-encoding", "Chunked ")])).is_ok());
        for bad in [
            &[("transfer-encoding", "gzip, chunked")][..],
            &[
                ("transfer-encoding", "gzip"),
                ("transfer-encoding", "chunked"),
            ],
            &[("transfer-encoding", "chunked, chunked")],
            &[("transfer-encoding", "identity")],
        ] {
            let e = check_transfer_coding(&map(bad)).unwrap_err();
            assert!(e.contains("only chunked"), "{e}");
        }
    }

    #[test]
    fn junk_in_connection_is_ignored_not_fatal() {
        let mut h = map(&[("connection", "  , bad header name ,x-a"), ("x-a", "1")]);
        strip(&mut h);
        assert!(h.is_empty(), "{h:?}");
    }
}
