//! The path table: which handler answers a request, or why none does. Pure: the server
//! asks [`Routes::decide`] and runs what it returns.

use bytes::Bytes;
use http::{Method, StatusCode};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

/// A request as handlers see it: the body already read (and bounded).
#[derive(Clone, Debug)]
pub struct Request {
    pub method: Method,
    pub path: String,
    pub query: Option<String>,
    pub peer: SocketAddr,
    pub body: Bytes,
}

impl Request {
    /// The first value of `key` in the query string, percent-decoded.
    pub fn param(&self, key: &str) -> Option<String> {
        crate::query_param(self.query.as_deref(), key)
    }
}

/// A whole response. `content_type: None` sends no content-type header (as some
/// endpoints always did; clients read them as they are).
#[derive(Clone, Debug, PartialEq)]
pub struct Response {
    pub status: StatusCode,
    pub content_type: Option<&'static str>,
    pub headers: Vec<(&'static str, String)>,
    pub body: Bytes,
}

impl Response {
    pub fn new(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Self {
        Response {
            status,
            content_type: Some(content_type),
            headers: Vec::new(),
            body: body.into(),
        }
    }

    /// `text/plain`.
    pub fn text(status: StatusCode, body: impl Into<Bytes>) -> Self {
        Self::new(status, "text/plain", body)
    }

    /// No content-type header.
    pub fn untyped(status: StatusCode, body: impl Into<Bytes>) -> Self {
        Response {
            status,
            content_type: None,
            headers: Vec::new(),
            body: body.into(),
        }
    }

    pub fn with_header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }
}

type BoxFuture = Pin<Box<dyn Future<Output = Response> + Send>>;

/// A handler: any async function of the request.
pub type Handler = Arc<dyn Fn(Request) -> BoxFuture + Send + Sync>;

fn handler<F, Fut>(f: F) -> Handler
where
    F: Fn(Request) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response> + Send + 'static,
{
    Arc::new(move |r| Box::pin(f(r)))
}

/// Which methods a route takes.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Methods {
    /// GET, and HEAD (the same answer without its body).
    Get,
    Only(Method),
    Any,
}

impl Methods {
    fn allows(&self, m: &Method) -> bool {
        match self {
            Methods::Get => m == Method::GET || m == Method::HEAD,
            Methods::Only(only) => m == only,
            Methods::Any => true,
        }
    }

    fn names(&self) -> Vec<&str> {
        match self {
            Methods::Get => vec!["GET", "HEAD"],
            Methods::Only(m) => vec![m.as_str()],
            Methods::Any => vec![],
        }
    }
}

struct Route {
    path: &'static str,
    methods: Methods,
    handler: Handler,
}

/// What the table says of a request.
pub enum Decision<'a> {
    Handle(&'a Handler),
    /// No route has this path: the table's not-found handler answers.
    NotFound(&'a Handler),
    /// The path exists, not for this method; `allow` lists the methods it takes.
    MethodNotAllowed {
        allow: String,
    },
}

impl std::fmt::Debug for Decision<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Decision::Handle(_) => f.write_str("Handle"),
            Decision::NotFound(_) => f.write_str("NotFound"),
            Decision::MethodNotAllowed { allow } => write!(f, "MethodNotAllowed({allow})"),
        }
    }
}

/// A table of exact paths, each with its methods and handler.
pub struct Routes {
    routes: Vec<Route>,
    not_found: Handler,
}

impl Default for Routes {
    fn default() -> Self {
        Self::new()
    }
}

impl Routes {
    /// An empty table: every path answers 404 `not found` (text/plain).
    pub fn new() -> Self {
        Routes {
            routes: Vec::new(),
            not_found: handler(|_| async { Response::text(StatusCode::NOT_FOUND, "not found\n") }),
        }
    }

    fn add(mut self, path: &'static str, methods: Methods, h: Handler) -> Self {
        assert!(
            !self.routes.iter().any(|r| r.path == path),
            "route {path} given twice"
        );
        self.routes.push(Route {
            path,
            methods,
            handler: h,
        });
        self
    }

    /// `path` answered by `f` for GET and HEAD.
    pub fn get<F, Fut>(self, path: &'static str, f: F) -> Self
    where
        F: Fn(Request) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response> + Send + 'static,
    {
        self.add(path, Methods::Get, handler(f))
    }

    /// `path` answered by `f` for `method` only.
    pub fn method<F, Fut>(self, method: Method, path: &'static str, f: F) -> Self
    where
        F: Fn(Request) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response> + Send + 'static,
    {
        self.add(path, Methods::Only(method), handler(f))
    }

    /// `path` answered by `f` whatever the method (the handler decides).
    pub fn any<F, Fut>(self, path: &'static str, f: F) -> Self
    where
        F: Fn(Request) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response> + Send + 'static,
    {
        self.add(path, Methods::Any, handler(f))
    }

    /// What answers paths not in the table (some endpoints list their paths there).
    pub fn not_found<F, Fut>(mut self, f: F) -> Self
    where
        F: Fn(Request) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response> + Send + 'static,
    {
        self.not_found = handler(f);
        self
    }

    /// The paths in the table, in the order given.
    pub fn paths(&self) -> Vec<&'static str> {
        self.routes.iter().map(|r| r.path).collect()
    }

    /// Which handler answers `method path`, or why none does.
    pub fn decide(&self, method: &Method, path: &str) -> Decision<'_> {
        let Some(r) = self.routes.iter().find(|r| r.path == path) else {
            return Decision::NotFound(&self.not_found);
        };
        if r.methods.allows(method) {
            Decision::Handle(&r.handler)
        } else {
            Decision::MethodNotAllowed {
                allow: r.methods.names().join(", "),
            }
        }
    }

    /// Answers `req`: its route's handler, the not-found handler, or 405.
    pub async fn answer(&self, req: Request) -> Response {
        match self.decide(&req.method, &req.path) {
            Decision::Handle(h) | Decision::NotFound(h) => h(req).await,
            Decision::MethodNotAllowed { allow } => Response::text(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("{} takes {allow}\n", req.path),
            )
            .with_header("allow", allow),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(body: &'static str) -> impl Fn(Request) -> std::future::Ready<Response> {
        move |_| std::future::ready(Response::text(StatusCode::OK, body))
    }

    fn req(method: Method, path: &str) -> Request {
        Request {
            method,
            path: path.into(),
            query: None,
            peer: "127.0.0.1:1".parse().unwrap(),
            body: Bytes::new(),
        }
    }

    fn table() -> Routes {
        Routes::new()
            .get("/metrics", ok("m"))
            .method(Method::POST, "/quitquitquit", ok("q"))
            .any("/logging", ok("l"))
    }

    #[test]
    fn exact_paths_and_methods() {
        let t = table();
        assert!(matches!(
            t.decide(&Method::GET, "/metrics"),
            Decision::Handle(_)
        ));
        assert!(matches!(
            t.decide(&Method::HEAD, "/metrics"),
            Decision::Handle(_)
        ));
        assert!(matches!(
            t.decide(&Method::POST, "/quitquitquit"),
            Decision::Handle(_)
        ));
        assert!(matches!(
            t.decide(&Method::PUT, "/logging"),
            Decision::Handle(_)
        ));
        // Exact: no prefix or trailing-slash matches.
        assert!(matches!(
            t.decide(&Method::GET, "/metrics/"),
            Decision::NotFound(_)
        ));
        assert!(matches!(
            t.decide(&Method::GET, "/metric"),
            Decision::NotFound(_)
        ));
        assert!(matches!(t.decide(&Method::GET, "/"), Decision::NotFound(_)));
    }

    #[test]
    fn a_known_path_with_another_method_lists_the_allowed_ones() {
        let t = table();
        match t.decide(&Method::GET, "/quitquitquit") {
            Decision::MethodNotAllowed { allow } => assert_eq!(allow, "POST"),
            d => panic!("{d:?}"),
        }
        match t.decide(&Method::POST, "/metrics") {
            Decision::MethodNotAllowed { allow } => assert_eq!(allow, "GET, HEAD"),
            d => panic!("{d:?}"),
        }
    }

    #[tokio::test]
    async fn answers_with_the_handler_404_or_405() {
        let t = table().not_found(|r: Request| async move {
            Response::new(
                StatusCode::NOT_FOUND,
                "application/json",
                format!("{{\"path\":\"{}\"}}", r.path),
            )
        });
        assert_eq!(t.answer(req(Method::GET, "/metrics")).await.body, "m");
        let nf = t.answer(req(Method::GET, "/nope")).await;
        assert_eq!(
            (nf.status, nf.body),
            (StatusCode::NOT_FOUND, Bytes::from("{\"path\":\"/nope\"}"))
        );
        let na = t.answer(req(Method::GET, "/quitquitquit")).await;
        assert_eq!(na.status, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(na.headers, vec![("allow", "POST".to_string())]);
        let dflt = Routes::new().answer(req(Method::GET, "/x")).await;
        assert_eq!(
            (dflt.status, dflt.content_type, dflt.body),
            (
                StatusCode::NOT_FOUND,
                Some("text/plain"),
                Bytes::from("not found\n")
            )
        );
    }

    #[test]
    #[should_panic(expected = "given twice")]
    fn a_path_is_given_once() {
        let _ = Routes::new().get("/a", ok("1")).get("/a", ok("2"));
    }
}
