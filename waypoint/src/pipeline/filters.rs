//! Stage: the rule's filters. A redirect is answered here; request header modifiers and
//! URL rewrites change the request before it goes upstream; response header modifiers
//! change the backend's answer. Hop-by-hop headers are stripped after them, so a filter
//! never gets to speak for a connection.

use crate::body::{self, Body};
use crate::route::{self, Filter, Rule};
use http::{Request, Response};

/// Where the filters look: the normalised path and host, and the PathPrefix value of the
/// rule's match that matched (for ReplacePrefixMatch).
pub struct At<'a> {
    pub host: &'a str,
    pub path: &'a str,
    pub matched_prefix: Option<&'a str>,
}

/// The redirect answer, if the rule redirects.
pub fn redirect(rule: &Rule, at: &At<'_>, query: Option<&str>) -> Option<Response<Body>> {
    let r = rule.redirect()?;
    let (code, location) = route::redirect(r, "http", at.host, at.path, query, at.matched_prefix);
    Some(
        Response::builder()
            .status(code)
            .header(http::header::LOCATION, location)
            .body(body::full(bytes::Bytes::new()))
            .expect("valid redirect"),
    )
}

/// Applies the request filters of `filters` to `req`.
pub fn on_request<B>(filters: &[Filter], req: &mut Request<B>, at: &At<'_>) {
    for f in filters {
        match f {
            Filter::RequestHeaders(m) => m.apply(req.headers_mut()),
            Filter::Rewrite(rw) => {
                if let Some(h) = &rw.hostname {
                    req.headers_mut().insert(http::header::HOST, h.clone());
                }
                if let Some(pm) = &rw.path {
                    let new_path = route::modify_path(pm, at.path, at.matched_prefix);
                    let pq = match req.uri().query() {
                        Some(q) => format!("{new_path}?{q}"),
                        None => new_path,
                    };
                    if let Ok(uri) = pq.parse() {
                        *req.uri_mut() = uri;
                    }
                }
            }
            _ => {}
        }
    }
    crate::hop::strip(req.headers_mut());
}

/// Applies the response filters of `filters` to `resp`.
pub fn on_response<B>(filters: &[Filter], resp: &mut Response<B>) {
    for f in filters {
        if let Filter::ResponseHeaders(m) = f {
            m.apply(resp.headers_mut());
        }
    }
    crate::hop::strip(resp.headers_mut());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::RequestInfo;

    fn rule(json: serde_json::Value) -> std::sync::Arc<Rule> {
        let (r, errors) = route::compile_test_spec(serde_json::json!({"rules": [json]}));
        assert!(errors.is_empty(), "{errors:?}");
        r.rules[0].clone()
    }

    fn matched<'a>(rule: &'a Rule, path: &str) -> Option<&'a str> {
        let (m, h) = (http::Method::GET, http::HeaderMap::new());
        rule.matched_prefix(&RequestInfo {
            method: &m,
            path,
            query: None,
            headers: &h,
        })
    }

    #[test]
    fn request_headers_and_prefix_rewrite_and_no_hop_by_hop_header() {
        let r = rule(serde_json::json!({
            "matches": [{"path": {"type": "PathPrefix", "value": "/old"}}],
            "filters": [
                {"type": "RequestHeaderModifier", "requestHeaderModifier": {
                    "set": [{"name": "x-set", "value": "1"}], "add": [{"name": "upgrade", "value": "h2c"}],
                    "remove": ["x-gone"]}},
                {"type": "URLRewrite", "urlRewrite": {"hostname": "new.example",
                    "path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/new"}}},
            ],
            "backendRefs": [{"name": "api"}]}));
        let mut req = Request::get("/old/x?q=1")
            .header("x-gone", "a")
            .header("host", "api")
            .body(())
            .unwrap();
        let at = At {
            host: "api",
            path: "/old/x",
            matched_prefix: matched(&r, "/old/x"),
        };
        on_request(&r.filters, &mut req, &at);
        assert_eq!(req.uri(), "/new/x?q=1");
        assert_eq!(req.headers()["host"], "new.example");
        assert_eq!(req.headers()["x-set"], "1");
        assert!(!req.headers().contains_key("x-gone"));
        assert!(
            !req.headers().contains_key("upgrade"),
            "a filter cannot add a hop-by-hop header"
        );
    }

    #[test]
    fn response_headers_and_redirects() {
        let r = rule(serde_json::json!({
            "filters": [{"type": "ResponseHeaderModifier", "responseHeaderModifier": {
                "add": [{"name": "x-by", "value": "waypoint"}]}}],
            "backendRefs": [{"name": "api"}]}));
        let at = At {
            host: "api:80",
            path: "/a",
            matched_prefix: None,
        };
        assert!(redirect(&r, &at, None).is_none());
        let mut resp = Response::builder()
            .header("connection", "close")
            .body(())
            .unwrap();
        on_response(&r.filters, &mut resp);
        assert_eq!(resp.headers()["x-by"], "waypoint");
        assert!(!resp.headers().contains_key("connection"));

        let moved = rule(serde_json::json!({"filters": [{"type": "RequestRedirect",
            "requestRedirect": {"scheme": "https", "statusCode": 301}}]}));
        let resp = redirect(&moved, &at, Some("q=1")).expect("a redirect");
        assert_eq!(resp.status(), 301);
        assert_eq!(resp.headers()["location"], "https://api/a?q=1");
    }
}
