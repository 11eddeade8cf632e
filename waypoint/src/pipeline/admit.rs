//! Stage: the request normalised in place (path, authority, `Host`) before anything
//! looks at it; the host policies match on, or why the request cannot be served (400).

use crate::normalize::{self, PathNormalization};
use http::Request;

/// Normalises `req`; `default_host` is the authority to assume when the request names
/// none (the destination Service's hostname, or the pod's address).
pub fn admit<B>(
    req: &mut Request<B>,
    default_host: impl FnOnce() -> String,
    mode: PathNormalization,
) -> Result<normalize::Host, String> {
    normalize::check_method(req.method())?;
    if req.method() == http::Method::CONNECT {
        // A tunnel inside the tunnel would carry bytes no route or policy sees.
        return Err("CONNECT is not served on an HTTP port".into());
    }
    let host = match normalize::request_authority(req.uri(), req.headers())? {
        Some(a) => normalize::normalize_host(a)?,
        None => normalize::normalize_host(&default_host())?,
    };
    let path = normalize::normalize_path(req.uri().path(), mode)?;
    let authority = req.uri().authority().map(|a| a.as_str());
    // The same form as received (origin-form, or with an authority), with the
    // normalised path and authority; rebuilt only when one of them changed.
    if matches!(path, std::borrow::Cow::Owned(_)) || authority.is_some_and(|a| a != host.header) {
        let pq = match req.uri().query() {
            Some(q) => format!("{path}?{q}"),
            None => path.into_owned(),
        };
        let target = if authority.is_some() {
            let scheme = req.uri().scheme_str().unwrap_or("http");
            format!("{scheme}://{}{pq}", host.header)
        } else {
            pq
        };
        *req.uri_mut() = target
            .parse()
            .map_err(|e| format!("the normalised request target is invalid: {e}"))?;
    }
    // The backend gets the Host policy saw.
    if req.headers().get(http::header::HOST).map(|h| h.as_bytes()) != Some(host.header.as_bytes()) {
        let value = http::HeaderValue::from_str(&host.header)
            .map_err(|_| format!("{:?} is not a valid Host", host.header))?;
        req.headers_mut().insert(http::header::HOST, value);
    }
    Ok(host)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc_host() -> String {
        "api.shop.svc.cluster.local".into()
    }

    #[test]
    fn path_normalised_and_host_set_from_the_destination() {
        let mut req = Request::get("/a/../b//c?x=1").body(()).unwrap();
        let host = admit(&mut req, svc_host, PathNormalization::MergeSlashes).unwrap();
        assert_eq!(req.uri(), "/b/c?x=1");
        assert_eq!(req.headers()["host"], "api.shop.svc.cluster.local");
        assert_eq!(host.header, "api.shop.svc.cluster.local");
    }

    #[test]
    fn the_request_authority_wins_over_the_destination() {
        let mut req = Request::get("http://API.example:8080/x").body(()).unwrap();
        let host = admit(&mut req, svc_host, PathNormalization::Base).unwrap();
        assert_eq!(req.headers()["host"], host.header.as_str());
        assert_eq!(req.uri().authority().unwrap().as_str(), host.header);
    }

    #[test]
    fn connect_is_refused() {
        let mut req = Request::connect("api:80").body(()).unwrap();
        assert!(
            admit(&mut req, svc_host, PathNormalization::Base)
                .unwrap_err()
                .contains("CONNECT")
        );
    }
}
