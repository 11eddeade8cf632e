//! Request normalisation before routing and policy, as Istio's mesh config
//! `pathNormalization` (Envoy's `normalize_path`, `merge_slashes` and
//! `path_with_escaped_slashes_action`). The normalised request is what routes and
//! policies see and what the backend receives, so a resource cannot be reached by
//! writing its path or host differently from how a policy names it. Pure: no I/O.
//!
//! - `NONE`: the path as received (a `%00` is still refused).
//! - `BASE` (the default): RFC 3986 section 6 normalisation, once (no double decoding):
//!   percent-encodings of unreserved characters (`A-Z a-z 0-9 - . _ ~`) decoded, the
//!   hex digits of the others upper-cased, backslashes turned into slashes, and dot
//!   segments removed (section 5.2.4: `..` never climbs above the root, as in Envoy).
//! - `MERGE_SLASHES`: `BASE`, then runs of slashes merged into one.
//! - `DECODE_AND_MERGE_SLASHES`: `MERGE_SLASHES`, with `%2F` and `%5C` decoded to
//!   slashes first.
//!
//! A path that cannot be normalised (a `%` not followed by two hex digits, a `%00`, a
//! fragment, a path not starting with `/`) is refused (400), never passed on as is.
//! Hosts compare without their port and a trailing dot, case-insensitively; a request
//! whose target carries an authority (absolute-form in HTTP/1.1, `:authority` in
//! HTTP/2) is about that authority, whatever its `Host` header says (RFC 9112 3.2.2).

use http::{HeaderMap, HeaderValue, Method, Uri};
use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum PathNormalization {
    None,
    #[default]
    Base,
    MergeSlashes,
    DecodeAndMergeSlashes,
}

impl FromStr for PathNormalization {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_uppercase().replace('-', "_").as_str() {
            "NONE" => Ok(PathNormalization::None),
            "BASE" | "DEFAULT" => Ok(PathNormalization::Base),
            "MERGE_SLASHES" => Ok(PathNormalization::MergeSlashes),
            "DECODE_AND_MERGE_SLASHES" => Ok(PathNormalization::DecodeAndMergeSlashes),
            _ => Err(format!(
                "{s:?} is not a path normalization (NONE, BASE, MERGE_SLASHES or DECODE_AND_MERGE_SLASHES)"
            )),
        }
    }
}

impl fmt::Display for PathNormalization {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PathNormalization::None => "NONE",
            PathNormalization::Base => "BASE",
            PathNormalization::MergeSlashes => "MERGE_SLASHES",
            PathNormalization::DecodeAndMergeSlashes => "DECODE_AND_MERGE_SLASHES",
        })
    }
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// The path (no query) as routes and policies must see it.
pub fn normalize_path(path: &str, mode: PathNormalization) -> Result<Cow<'_, str>, String> {
    let bytes = path.as_bytes();
    // A NUL is refused whatever the mode (Istio: "always rejected with 400").
    if bytes
        .windows(3)
        .any(|w| w[0] == b'%' && w[1] == b'0' && w[2] == b'0')
    {
        return Err("the path contains %00".into());
    }
    if path.contains('#') {
        return Err("the path contains a fragment".into());
    }
    if mode == PathNormalization::None || path == "*" {
        return Ok(Cow::Borrowed(path));
    }
    if !path.is_empty() && !path.starts_with(['/', '\\']) {
        return Err(format!("the path {path:?} does not start with /"));
    }
    let decode_slashes = mode == PathNormalization::DecodeAndMergeSlashes;
    // 1. Percent-encodings, once, and backslashes.
    let mut decoded = String::with_capacity(path.len().max(1));
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let (Some(hi), Some(lo)) = (
                    bytes.get(i + 1).copied().and_then(hex),
                    bytes.get(i + 2).copied().and_then(hex),
                ) else {
                    return Err(format!("invalid percent-encoding at byte {i} of the path"));
                };
                let v = hi << 4 | lo;
                if unreserved(v) {
                    decoded.push(char::from(v));
                } else if decode_slashes && (v == b'/' || v == b'\\') {
                    decoded.push('/');
                } else {
                    decoded.push('%');
                    decoded.push(char::from(b"0123456789ABCDEF"[usize::from(hi)]));
                    decoded.push(char::from(b"0123456789ABCDEF"[usize::from(lo)]));
                }
                i += 3;
            }
            b'\\' => {
                decoded.push('/');
                i += 1;
            }
            _ => {
                // Copy the run up to the next byte of interest (keeps UTF-8 intact).
                let end = bytes[i..]
                    .iter()
                    .position(|b| matches!(b, b'%' | b'\\'))
                    .map_or(bytes.len(), |p| i + p);
                decoded.push_str(&path[i..end]);
                i = end;
            }
        }
    }
    if decoded.is_empty() {
        decoded.push('/');
    }
    // 2. Dot segments (RFC 3986 5.2.4).
    let mut out = remove_dot_segments(&decoded);
    // 3. Slashes.
    if matches!(
        mode,
        PathNormalization::MergeSlashes | PathNormalization::DecodeAndMergeSlashes
    ) {
        let mut merged = String::with_capacity(out.len());
        for c in out.chars() {
            if !(c == '/' && merged.ends_with('/')) {
                merged.push(c);
            }
        }
        out = merged;
    }
    if out == path {
        Ok(Cow::Borrowed(path))
    } else {
        Ok(Cow::Owned(out))
    }
}

/// RFC 3986 5.2.4 on an absolute path: `.` segments go, `..` removes the segment before
/// it (never above the root); a path ending in `.` or `..` keeps its trailing slash.
fn remove_dot_segments(path: &str) -> String {
    let segments: Vec<&str> = path.strip_prefix('/').unwrap_or(path).split('/').collect();
    let mut out: Vec<&str> = Vec::with_capacity(segments.len());
    for s in &segments {
        match *s {
            "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    let mut r = String::with_capacity(path.len());
    r.push('/');
    r.push_str(&out.join("/"));
    if matches!(segments.last(), Some(&".") | Some(&"..")) && !r.ends_with('/') {
        r.push('/');
    }
    r
}

/// A request's authority, as policies match it and as the backend receives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    /// Lower case, no port, no trailing dot: what `hosts` in a policy are matched on.
    pub name: String,
    /// `name[:port]`: the `Host` the backend receives.
    pub header: String,
}

/// Normalises an authority (`Host` header value or URI authority).
pub fn normalize_host(raw: &str) -> Result<Host, String> {
    if raw.contains('@') {
        return Err(format!("the authority {raw:?} carries user information"));
    }
    let a: http::uri::Authority = raw
        .parse()
        .map_err(|_| format!("{raw:?} is not a valid authority"))?;
    let mut name = a.host().to_ascii_lowercase();
    if name.ends_with('.') {
        name.pop();
    }
    let valid = if let Some(v6) = name.strip_prefix('[') {
        v6.strip_suffix(']')
            .is_some_and(|a| a.parse::<std::net::Ipv6Addr>().is_ok())
    } else {
        !name.is_empty()
            && !name.ends_with('.')
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
    };
    if !valid {
        return Err(format!("{raw:?} is not a valid host"));
    }
    // What follows the host: nothing, or `:` and a port number.
    let header = match a.as_str().strip_prefix(a.host()) {
        Some("") => name.clone(),
        Some(rest) => match rest.strip_prefix(':').map(str::parse::<u16>) {
            Some(Ok(p)) => format!("{name}:{p}"),
            _ => return Err(format!("{raw:?} has an invalid port")),
        },
        None => return Err(format!("{raw:?} is not a valid authority")),
    };
    Ok(Host { name, header })
}

/// The authority a request is about: the request target's when it has one (absolute-form
/// or `:authority`; RFC 9112 3.2.2 says to ignore `Host` then), else the single `Host`
/// header; `None` when neither is present. More than one `Host` header is an error.
pub fn request_authority<'a>(
    uri: &'a Uri,
    headers: &'a HeaderMap,
) -> Result<Option<&'a str>, String> {
    let mut hosts = headers.get_all(http::header::HOST).iter();
    let first = hosts.next();
    if hosts.next().is_some() {
        return Err("more than one Host header".into());
    }
    if let Some(a) = uri.authority() {
        return Ok(Some(a.as_str()));
    }
    match first {
        Some(v) => v
            .to_str()
            .map(Some)
            .map_err(|_| "the Host header is not visible ASCII".into()),
        None => Ok(None),
    }
}

/// Methods are case-sensitive tokens, and backends differ on `get` vs `GET`; as Istio,
/// a method that is not upper case is refused rather than matched one way by policy and
/// another by the backend.
pub fn check_method(m: &Method) -> Result<(), String> {
    if m.as_str().bytes().any(|b| b.is_ascii_lowercase()) {
        Err(format!("the method {:?} is not upper case", m.as_str()))
    } else {
        Ok(())
    }
}

/// Headers as policies see them: a header sent several times is one value, joined with
/// `,` (as Istio); `None` when nothing is repeated.
pub fn merged_for_policy(h: &HeaderMap) -> Option<HeaderMap> {
    if h.keys_len() == h.len() {
        return None;
    }
    let mut out = HeaderMap::with_capacity(h.keys_len());
    for name in h.keys() {
        let values: Vec<&[u8]> = h.get_all(name).iter().map(HeaderValue::as_bytes).collect();
        let joined = values.join(&b","[..]);
        if let Ok(v) = HeaderValue::from_bytes(&joined) {
            out.insert(name.clone(), v);
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use PathNormalization::*;

    fn n(p: &str, m: PathNormalization) -> Result<String, String> {
        normalize_path(p, m).map(Cow::into_owned)
    }

    /// Ways of writing `/admin` (or something under it), each with what every mode makes
    /// of it.
    #[test]
    fn encodings_of_admin() {
        // (path, NONE, BASE, MERGE_SLASHES, DECODE_AND_MERGE_SLASHES)
        let table: &[(&str, &str, &str, &str, &str)] = &[
            ("/admin", "/admin", "/admin", "/admin", "/admin"),
            ("/%61dmin", "/%61dmin", "/admin", "/admin", "/admin"),
            (
                "/%61%64%6d%69%6e",
                "/%61%64%6d%69%6e",
                "/admin",
                "/admin",
                "/admin",
            ),
            (
                "/%61%64%6D%69%6E",
                "/%61%64%6D%69%6E",
                "/admin",
                "/admin",
                "/admin",
            ),
            ("/ad%6Din", "/ad%6Din", "/admin", "/admin", "/admin"),
            ("/ad%6din", "/ad%6din", "/admin", "/admin", "/admin"),
            ("/./admin", "/./admin", "/admin", "/admin", "/admin"),
            ("/x/../admin", "/x/../admin", "/admin", "/admin", "/admin"),
            (
                "/x/y/../../admin",
                "/x/y/../../admin",
                "/admin",
                "/admin",
                "/admin",
            ),
            ("/../admin", "/../admin", "/admin", "/admin", "/admin"),
            ("/../../admin", "/../../admin", "/admin", "/admin", "/admin"),
            ("/%2e/admin", "/%2e/admin", "/admin", "/admin", "/admin"),
            (
                "/x/%2E%2E/admin",
                "/x/%2E%2E/admin",
                "/admin",
                "/admin",
                "/admin",
            ),
            (
                "/x/.%2e/admin",
                "/x/.%2e/admin",
                "/admin",
                "/admin",
                "/admin",
            ),
            ("\\admin", "\\admin", "/admin", "/admin", "/admin"),
            (
                "/x\\..\\admin",
                "/x\\..\\admin",
                "/admin",
                "/admin",
                "/admin",
            ),
            ("//admin", "//admin", "//admin", "/admin", "/admin"),
            (
                "///admin//users",
                "///admin//users",
                "///admin//users",
                "/admin/users",
                "/admin/users",
            ),
            (
                "/x//../admin",
                "/x//../admin",
                "/x/admin",
                "/x/admin",
                "/x/admin",
            ),
            (
                "/admin%2f",
                "/admin%2f",
                "/admin%2F",
                "/admin%2F",
                "/admin/",
            ),
            (
                "/admin%2Fusers",
                "/admin%2Fusers",
                "/admin%2Fusers",
                "/admin%2Fusers",
                "/admin/users",
            ),
            ("/%2fadmin", "/%2fadmin", "/%2Fadmin", "/%2Fadmin", "/admin"),
            (
                "/%2F%2Fadmin",
                "/%2F%2Fadmin",
                "/%2F%2Fadmin",
                "/%2F%2Fadmin",
                "/admin",
            ),
            ("/%5cadmin", "/%5cadmin", "/%5Cadmin", "/%5Cadmin", "/admin"),
            (
                "/x%2f..%2fadmin",
                "/x%2f..%2fadmin",
                "/x%2F..%2Fadmin",
                "/x%2F..%2Fadmin",
                "/admin",
            ),
            ("/admin/.", "/admin/.", "/admin/", "/admin/", "/admin/"),
            (
                "/admin/x/..",
                "/admin/x/..",
                "/admin/",
                "/admin/",
                "/admin/",
            ),
            ("/%41dmin", "/%41dmin", "/Admin", "/Admin", "/Admin"),
        ];
        for (p, none, base, merge, decode) in table {
            assert_eq!(n(p, None).as_deref(), Ok(*none), "NONE {p}");
            assert_eq!(n(p, Base).as_deref(), Ok(*base), "BASE {p}");
            assert_eq!(
                n(p, MergeSlashes).as_deref(),
                Ok(*merge),
                "MERGE_SLASHES {p}"
            );
            assert_eq!(
                n(p, DecodeAndMergeSlashes).as_deref(),
                Ok(*decode),
                "DECODE_AND_MERGE_SLASHES {p}"
            );
        }
    }

    #[test]
    fn decoding_happens_once_and_keeps_reserved_characters_encoded() {
        // %25 is '%': decoding it would let "%2561" become "%61" and then "a".
        assert_eq!(n("/%2561dmin", Base).unwrap(), "/%2561dmin");
        assert_eq!(
            n("/%252e%252e/admin", DecodeAndMergeSlashes).unwrap(),
            "/%252e%252e/admin"
        );
        assert_eq!(n("/a%3fb%23c%20d", Base).unwrap(), "/a%3Fb%23c%20d");
        assert_eq!(n("/caf%c3%a9", Base).unwrap(), "/caf%C3%A9");
        assert_eq!(n("/%7e%5f%2d%2e", Base).unwrap(), "/~_-.");
        // Already normal: borrowed, not copied.
        assert!(matches!(normalize_path("/a/b", Base), Ok(Cow::Borrowed(_))));
    }

    #[test]
    fn what_cannot_be_normalised_is_refused() {
        for bad in [
            "/adm%zzin",
            "/admin%",
            "/admin%2",
            "/%g1",
            "/%00admin",
            "/a#frag",
            "admin",
        ] {
            assert!(n(bad, Base).is_err(), "{bad}");
            assert!(n(bad, DecodeAndMergeSlashes).is_err(), "{bad}");
        }
        assert!(n("/x%00", None).is_err(), "%00 is refused in every mode");
        assert!(n("/x%zz", None).is_ok(), "NONE passes the rest as is");
        assert_eq!(n("*", Base).unwrap(), "*");
        assert_eq!(n("", Base).unwrap(), "/");
    }

    #[test]
    fn modes_parse_and_print() {
        for m in [None, Base, MergeSlashes, DecodeAndMergeSlashes] {
            assert_eq!(m.to_string().parse::<PathNormalization>(), Ok(m));
        }
        assert_eq!("merge-slashes".parse(), Ok(MergeSlashes));
        assert!("DECODE".parse::<PathNormalization>().is_err());
        assert_eq!(PathNormalization::default(), Base);
    }

    #[test]
    fn hosts_ignore_port_trailing_dot_and_case() {
        for raw in [
            "api.back.svc.cluster.local",
            "API.Back.svc.cluster.local",
            "api.back.svc.cluster.local.",
            "api.back.svc.cluster.local:80",
            "Api.back.svc.cluster.local.:8080",
        ] {
            assert_eq!(
                normalize_host(raw).unwrap().name,
                "api.back.svc.cluster.local",
                "{raw}"
            );
        }
        assert_eq!(
            normalize_host("API.back.:8080").unwrap().header,
            "api.back:8080"
        );
        assert_eq!(normalize_host("10.96.0.20").unwrap().header, "10.96.0.20");
        assert_eq!(
            normalize_host("[fd00::1]:80").unwrap().header,
            "[fd00::1]:80"
        );
        for bad in [
            "",
            ".",
            "a..",
            "user@api.back",
            "api back",
            "api.back:x",
            "api.back:",
            "a%62c",
            "[zz]",
        ] {
            assert!(normalize_host(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_request_target_authority_wins_over_host() {
        let mut h = HeaderMap::new();
        h.insert("host", "secret.back".parse().unwrap());
        let absolute: Uri = "http://api.back/x".parse().unwrap();
        assert_eq!(request_authority(&absolute, &h), Ok(Some("api.back")));
        let origin: Uri = "/x".parse().unwrap();
        assert_eq!(request_authority(&origin, &h), Ok(Some("secret.back")));
        assert_eq!(
            request_authority(&origin, &HeaderMap::new()),
            Ok(Option::None)
        );
        h.append("host", "api.back".parse().unwrap());
        assert!(request_authority(&origin, &h).is_err(), "two Host headers");
    }

    #[test]
    fn methods_and_repeated_headers() {
        assert!(check_method(&Method::GET).is_ok());
        assert!(check_method(&Method::from_bytes(b"PURGE").unwrap()).is_ok());
        assert!(check_method(&Method::from_bytes(b"get").unwrap()).is_err());
        assert!(check_method(&Method::from_bytes(b"Delete").unwrap()).is_err());
        let mut h = HeaderMap::new();
        h.insert("x-user", "bob".parse().unwrap());
        assert!(merged_for_policy(&h).is_none());
        h.append("x-user", "alice".parse().unwrap());
        h.insert("x-other", "1".parse().unwrap());
        let m = merged_for_policy(&h).unwrap();
        assert_eq!(m["x-user"], "bob,alice");
        assert_eq!(m["x-other"], "1");
    }
}
