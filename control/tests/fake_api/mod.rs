//! A test Kubernetes API server on loopback, shared by the integration tests that run
//! mesh-control in Kubernetes mode: list (paged by `limit`/`continue`, with
//! resourceVersion) and watch (newline-delimited events, replay from a version,
//! BOOKMARKs, 410 Gone, closed at `timeoutSeconds`), authorization from mesh-control's
//! RBAC (403 outside it), server-side apply, Leases and TokenReviews.

// Each test binary uses a different part of it.
#![allow(dead_code)]

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::Frame;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;

/// One open watch response: events are written to it as body frames.
type WatchSender = mpsc::UnboundedSender<Result<Frame<Bytes>, Infallible>>;

#[derive(Default)]
pub struct FakeState {
    pub rv: u64,
    pub objects: BTreeMap<String, Vec<Value>>,
    /// Open watches by plural, and whether each asked for BOOKMARK events.
    watchers: BTreeMap<String, Vec<(WatchSender, bool)>>,
    /// Every event, as the API server keeps them for watches that resume: (resource
    /// version, plural, line).
    pub log: Vec<(u64, String, String)>,
    /// Events up to this version are compacted away: resuming before it is 410 Gone.
    pub compacted: u64,
    /// List requests received: (plural, limit, continue) as asked.
    pub lists: Vec<(String, Option<usize>, Option<String>)>,
    /// Plurals whose CRD is "not installed" (404): `plural` at every version, or
    /// `version/plural` at that version only.
    pub missing: Vec<String>,
    /// TokenReview: token → the `status` the API server answers with.
    pub reviews: BTreeMap<String, Value>,
    /// Audiences asked for in TokenReviews.
    pub audiences_seen: Vec<Value>,
    /// Tokens reviewed, in order.
    pub reviewed: Vec<String>,
    /// TokenReview: token → the only audience it was issued for (else any).
    pub token_audience: BTreeMap<String, String>,
    /// Server-side applies received: (path, body).
    pub patches: Vec<(String, Value)>,
    /// Their query strings and content types: (path, query, content type).
    pub patch_params: Vec<(String, String, String)>,
    /// TokenReview: token → (how many more reviews get 429, its Retry-After seconds).
    pub throttle: BTreeMap<String, (u32, Option<u64>)>,
    /// TokenReview: how long each review takes to answer.
    pub review_hold: Duration,
    /// Requests received: (listener tag, method, path).
    pub requests: Vec<(String, String, String)>,
    /// Server-side applies received, by listener tag: (tag, path).
    pub patch_from: Vec<(String, String)>,
    /// Listener tags whose requests fail (a replica cut off from the API server).
    pub dead: Vec<String>,
    /// Listener tags whose requests are never answered (a stalled API call).
    pub hung: Vec<String>,
    /// Requests whose path contains one of these wait until it is removed.
    pub held: Vec<String>,
    /// Requests refused by RBAC (403): (verb, group, resource, namespace).
    pub denied: Vec<String>,
    /// Lists and watches of a plural answered with an error on demand (an expired token:
    /// 401, a role taken away: 403, API priority and fairness: 429).
    pub refuse: BTreeMap<String, Refusal>,
    /// Lists and watches of each plural, with the status answered and when.
    pub answered: Vec<(String, u16, std::time::Instant)>,
}

/// An error the test API server answers a plural's lists and watches with.
#[derive(Clone, Debug)]
pub struct Refusal {
    /// 401, 403 or 429.
    pub code: u16,
    /// How many more requests are refused (then answered again).
    pub times: u32,
    /// The `Retry-After` header of a 429, in seconds.
    pub retry_after: Option<u64>,
}

#[derive(Clone, Default)]
pub struct Fake(pub Arc<Mutex<FakeState>>);

pub type Body = BoxBody<Bytes, Infallible>;

/// (plural, name, subresource) of an API path: `/api/v1/namespaces/shop/pods/web/status`
/// or `/apis/apps/v1/deployments`.
fn parse_path(path: &str) -> (String, Option<String>, Option<String>) {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let mut rest: &[&str] = match segs.first() {
        Some(&"api") => segs.get(2..).unwrap_or_default(),
        _ => segs.get(3..).unwrap_or_default(),
    };
    if rest.first() == Some(&"namespaces") && rest.len() >= 3 {
        rest = &rest[2..];
    }
    let at = |i: usize| rest.get(i).map(|s| s.to_string());
    (at(0).unwrap_or_default(), at(1), at(2))
}

/// The API version in a path (`v1` of `/api/v1/...`, `v1beta1` of `/apis/g/v1beta1/...`).
fn version_of(path: &str) -> String {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let i = if segs.first() == Some(&"api") { 1 } else { 2 };
    segs.get(i).copied().unwrap_or_default().to_string()
}

/// mesh-control's own namespace in these tests (where its Role grants the Lease).
pub const CONTROL_NAMESPACE: &str = "mesh-system";

/// A request in RBAC terms: (verb, API group, resource[/subresource], namespace).
fn rbac_request(method: &str, path: &str, query: &str) -> (String, String, String, Option<String>) {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, mut rest): (&str, &[&str]) = match segs.first() {
        Some(&"api") => ("", segs.get(2..).unwrap_or_default()),
        _ => (
            segs.get(1).copied().unwrap_or_default(),
            segs.get(3..).unwrap_or_default(),
        ),
    };
    let mut namespace = None;
    if rest.first() == Some(&"namespaces") && rest.len() >= 3 {
        namespace = Some(rest[1].to_string());
        rest = &rest[2..];
    }
    let resource = match rest.get(2) {
        Some(sub) => format!("{}/{sub}", rest[0]),
        None => rest.first().copied().unwrap_or_default().to_string(),
    };
    let watch = query
        .split('&')
        .any(|kv| kv == "watch=true" || kv == "watch=1");
    let verb = match (method, rest.len() > 1) {
        ("GET", true) => "get",
        ("GET", false) if watch => "watch",
        ("GET", false) => "list",
        ("POST", _) => "create",
        ("PUT", _) => "update",
        ("PATCH", _) => "patch",
        ("DELETE", _) => "delete",
        _ => "unknown",
    };
    (verb.into(), group.into(), resource, namespace)
}

/// Whether mesh-control's RBAC (the rules its code declares, `rbac::rules`, which
/// chart_rbac.rs proves are the chart's) allows the request.
fn authorized(verb: &str, group: &str, resource: &str, namespace: Option<&str>) -> bool {
    let key = (group.to_string(), resource.to_string());
    let allows =
        |rules: &mesh_control::rbac::Rules| rules.get(&key).is_some_and(|v| v.contains(verb));
    allows(&mesh_control::rbac::rules())
        || (namespace == Some(CONTROL_NAMESPACE) && allows(&mesh_control::rbac::namespace_rules()))
}

fn status_response(code: u16, reason: &str, message: &str) -> hyper::Response<Body> {
    let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                      "message": message, "reason": reason, "code": code});
    hyper::Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())).boxed())
        .unwrap()
}

fn json_response(code: u16, body: &Value) -> hyper::Response<Body> {
    hyper::Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())).boxed())
        .unwrap()
}

/// A refusal as the API server words it.
fn refusal(r: &Refusal, plural: &str) -> hyper::Response<Body> {
    let (reason, message) = match r.code {
        401 => ("Unauthorized", "Unauthorized".to_string()),
        403 => (
            "Forbidden",
            format!(
                "{plural} is forbidden: User \"system:serviceaccount:{CONTROL_NAMESPACE}:mesh-control\" cannot list resource \"{plural}\" at the cluster scope"
            ),
        ),
        _ => (
            "TooManyRequests",
            "Too many requests, please try again later.".to_string(),
        ),
    };
    let mut res = status_response(r.code, reason, &message);
    if let Some(secs) = r.retry_after {
        res.headers_mut()
            .insert("retry-after", secs.to_string().parse().unwrap());
    }
    res
}

impl Fake {
    pub fn set(&self, plural: &str, items: Vec<Value>) {
        self.0.lock().unwrap().objects.insert(plural.into(), items);
    }

    /// Adds/replaces an object and tells watchers.
    pub fn push(&self, plural: &str, event: &str, obj: Value) {
        let mut st = self.0.lock().unwrap();
        st.rv += 1;
        let mut obj = obj;
        obj["metadata"]["resourceVersion"] = json!(st.rv.to_string());
        let name = obj["metadata"]["name"].clone();
        let list = st.objects.entry(plural.into()).or_default();
        list.retain(|o| o["metadata"]["name"] != name);
        if event != "DELETED" {
            list.push(obj.clone());
        }
        let line = format!("{}\n", json!({"type": event, "object": obj}));
        let rv = st.rv;
        st.log.push((rv, plural.to_string(), line.clone()));
        for (w, _) in st.watchers.entry(plural.into()).or_default() {
            let _ = w.send(Ok(Frame::data(Bytes::from(line.clone()))));
        }
    }

    /// Every open watch of `plural` ends (as at its `timeoutSeconds`): the client
    /// resumes from the last version it saw.
    pub fn close_watches(&self, plural: &str) {
        self.0.lock().unwrap().watchers.remove(plural);
    }

    /// Events so far are compacted away without telling anyone: a watch resuming from
    /// before now gets 410 Gone.
    pub fn compact_silently(&self) {
        let mut st = self.0.lock().unwrap();
        st.compacted = st.rv;
        st.log.clear();
    }

    /// Events so far are compacted away (etcd compaction): a watch resuming from before
    /// now gets 410 Gone. Watches that asked for bookmarks are first told the current
    /// version (a BOOKMARK), which lets them resume without a re-list.
    pub fn compact(&self, plural: &str, api_version: &str, kind: &str) {
        let mut st = self.0.lock().unwrap();
        st.compacted = st.rv;
        st.log.clear();
        let line = format!(
            "{}\n",
            json!({"type": "BOOKMARK", "object": {"apiVersion": api_version, "kind": kind,
                   "metadata": {"resourceVersion": st.rv.to_string()}}})
        );
        for (w, bookmarks) in st.watchers.entry(plural.into()).or_default() {
            if *bookmarks {
                let _ = w.send(Ok(Frame::data(Bytes::from(line.clone()))));
            }
        }
    }

    /// Every open watch of `plural` gets 410 Gone and is closed.
    pub fn expire(&self, plural: &str) {
        let mut st = self.0.lock().unwrap();
        let line = format!(
            "{}\n",
            json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                   "message": "too old resource version", "reason": "Expired", "code": 410}})
        );
        for (w, _) in st.watchers.remove(plural).unwrap_or_default() {
            let _ = w.send(Ok(Frame::data(Bytes::from(line.clone()))));
        }
    }

    /// Every request was within mesh-control's RBAC.
    pub fn assert_authorized(&self) {
        let denied = self.0.lock().unwrap().denied.clone();
        assert!(
            denied.is_empty(),
            "requests outside mesh-control's RBAC: {denied:?}"
        );
    }

    /// The stored object `plural/name`.
    pub fn get(&self, plural: &str, name: &str) -> Option<Value> {
        let st = self.0.lock().unwrap();
        st.objects
            .get(plural)?
            .iter()
            .find(|o| o["metadata"]["name"] == name)
            .cloned()
    }

    async fn handle(
        &self,
        tag: &str,
        req: hyper::Request<hyper::body::Incoming>,
    ) -> hyper::Response<Body> {
        let (plural, name, sub) = parse_path(req.uri().path());
        let hung = self.0.lock().unwrap().hung.iter().any(|d| d == tag);
        if hung {
            self.0.lock().unwrap().requests.push((
                tag.to_string(),
                req.method().to_string(),
                req.uri().path().to_string(),
            ));
            return std::future::pending().await;
        }
        {
            let mut st = self.0.lock().unwrap();
            st.requests.push((
                tag.to_string(),
                req.method().to_string(),
                req.uri().path().to_string(),
            ));
            if st.dead.iter().any(|d| d == tag) {
                return status_response(500, "InternalError", "etcdserver: request timed out");
            }
            let (verb, group, resource, namespace) = rbac_request(
                req.method().as_str(),
                req.uri().path(),
                req.uri().query().unwrap_or_default(),
            );
            if !authorized(&verb, &group, &resource, namespace.as_deref()) {
                let what = format!("{verb} {group}/{resource} in {namespace:?}");
                st.denied.push(what.clone());
                let message = format!(
                    "{resource} is forbidden: User \"system:serviceaccount:{CONTROL_NAMESPACE}:mesh-control\" cannot {verb} resource \"{resource}\" in API group \"{group}\""
                );
                return status_response(403, "Forbidden", &message);
            }
        }
        let path = req.uri().path().to_string();
        while self.0.lock().unwrap().held.iter().any(|h| path.contains(h)) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if req.method() == hyper::Method::PATCH {
            let path = req.uri().path().to_string();
            let query = req.uri().query().unwrap_or_default().to_string();
            let content_type = req
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string();
            self.0.lock().unwrap().patch_params.push((
                path.clone(),
                query.clone(),
                content_type.clone(),
            ));
            let body = req.into_body().collect().await.unwrap().to_bytes();
            let mut obj: Value = serde_json::from_slice(&body).unwrap();
            // As the API server: an apply needs a field manager.
            if content_type == "application/apply-patch+yaml"
                && !query.split('&').any(|kv| kv.starts_with("fieldManager="))
            {
                return status_response(
                    422,
                    "Invalid",
                    "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch",
                );
            }
            {
                let mut st = self.0.lock().unwrap();
                st.patches.push((path.clone(), obj.clone()));
                st.patch_from.push((tag.to_string(), path.clone()));
            }
            if obj["kind"] == "Service" {
                obj["spec"]["clusterIP"] = json!("10.96.0.77");
            }
            // Persisted, and watchers told.
            let name = name.unwrap_or_default();
            let stored = match sub.as_deref() {
                Some("status") => self.get(&plural, &name).map(|mut o| {
                    o["status"] = obj["status"].clone();
                    o
                }),
                _ => Some(obj.clone()),
            };
            if let Some(stored) = stored {
                let event = if self.get(&plural, &name).is_some() {
                    "MODIFIED"
                } else {
                    "ADDED"
                };
                self.push(&plural, event, stored);
            }
            return json_response(200, &obj);
        }
        // Single objects (the Lease): get, create, update with optimistic concurrency.
        if plural == "leases" {
            let method = req.method().to_string();
            let body = req.into_body().collect().await.unwrap().to_bytes();
            let stored = name.as_deref().and_then(|n| self.get(&plural, n));
            let sent: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            return match (method.as_str(), stored) {
                ("GET", Some(o)) => json_response(200, &o),
                ("GET", None) => {
                    status_response(404, "NotFound", "leases.coordination.k8s.io not found")
                }
                ("POST", _)
                    if self
                        .get(
                            &plural,
                            sent["metadata"]["name"].as_str().unwrap_or_default(),
                        )
                        .is_some() =>
                {
                    status_response(
                        409,
                        "AlreadyExists",
                        "leases.coordination.k8s.io already exists",
                    )
                }
                ("POST", _) => {
                    self.push(&plural, "ADDED", sent);
                    json_response(
                        201,
                        &self
                            .get(&plural, name.as_deref().unwrap_or_default())
                            .unwrap_or_default(),
                    )
                }
                ("PUT", Some(o))
                    if o["metadata"]["resourceVersion"] == sent["metadata"]["resourceVersion"] =>
                {
                    self.push(&plural, "MODIFIED", sent);
                    json_response(200, &self.get(&plural, name.as_deref().unwrap()).unwrap())
                }
                ("PUT", _) => status_response(
                    409,
                    "Conflict",
                    "Operation cannot be fulfilled on leases.coordination.k8s.io: the object has been modified; please apply your changes to the latest version and try again",
                ),
                _ => status_response(405, "MethodNotAllowed", "not supported by this test server"),
            };
        }
        if req.method() == hyper::Method::POST && plural == "tokenreviews" {
            let body = req.into_body().collect().await.unwrap().to_bytes();
            let mut review: Value = serde_json::from_slice(&body).unwrap();
            let (review, hold) = {
                let mut st = self.0.lock().unwrap();
                st.audiences_seen.push(review["spec"]["audiences"].clone());
                let token = review["spec"]["token"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                st.reviewed.push(token.clone());
                if let Some((left, retry_after)) = st.throttle.get_mut(&token)
                    && *left > 0
                {
                    // As API priority and fairness words it: the header and the details.
                    *left -= 1;
                    let mut res = hyper::Response::builder()
                        .status(429)
                        .header("content-type", "application/json");
                    if let Some(secs) = retry_after {
                        res = res.header("retry-after", secs.to_string());
                    }
                    let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
                        "status": "Failure", "message": "Too many requests, please try again later.",
                        "reason": "TooManyRequests", "details": {"retryAfterSeconds": retry_after.unwrap_or(1)},
                        "code": 429});
                    return res
                        .body(Full::new(Bytes::from(body.to_string())).boxed())
                        .unwrap();
                }
                let asked = review["spec"]["audiences"].clone();
                review["status"] = match st.token_audience.get(&token) {
                    // As the API server words it.
                    Some(aud) if !asked.as_array().is_some_and(|a| a.contains(&json!(aud))) => {
                        json!({
                            "authenticated": false,
                            "error": format!("[invalid bearer token, token audiences [\"{aud}\"] is invalid for the target audiences {asked}]")
                        })
                    }
                    _ => st.reviews.get(&token).cloned().unwrap_or_else(
                        || json!({"authenticated": false, "error": "invalid bearer token"}),
                    ),
                };
                (review, st.review_hold)
            };
            tokio::time::sleep(hold).await;
            return hyper::Response::builder()
                .status(201)
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(review.to_string())).boxed())
                .unwrap();
        }
        let query = req.uri().query().unwrap_or_default().to_string();
        let watch = query
            .split('&')
            .any(|kv| kv == "watch=true" || kv == "watch=1");
        let version = version_of(req.uri().path());
        let mut st = self.0.lock().unwrap();
        if st.missing.contains(&plural) || st.missing.contains(&format!("{version}/{plural}")) {
            let body = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "the server could not find the requested resource"});
            return hyper::Response::builder()
                .status(404)
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(body.to_string())).boxed())
                .unwrap();
        }
        if let Some(r) = st.refuse.get_mut(&plural).filter(|r| r.times > 0) {
            r.times -= 1;
            let r = r.clone();
            st.answered
                .push((plural.clone(), r.code, std::time::Instant::now()));
            return refusal(&r, &plural);
        }
        st.answered
            .push((plural.clone(), 200, std::time::Instant::now()));
        let param = |k: &str| {
            query
                .split('&')
                .find_map(|kv| kv.strip_prefix(k)?.strip_prefix('='))
                .map(str::to_string)
        };
        if watch {
            let (tx, rx) = mpsc::unbounded_channel();
            let from: Option<u64> = param("resourceVersion").and_then(|v| v.parse().ok());
            match from {
                // Too old: the API server's answer is an ERROR event, then the end.
                Some(v) if v < st.compacted => {
                    let line = format!(
                        "{}\n",
                        json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                               "message": format!("too old resource version: {v} ({})", st.compacted), "reason": "Expired", "code": 410}})
                    );
                    let _ = tx.send(Ok(Frame::data(Bytes::from(line))));
                    drop(tx);
                }
                // Resumed: what happened since that version first, then live events.
                _ => {
                    for (rv, p, line) in &st.log {
                        if *p == plural && from.is_some_and(|v| *rv > v) {
                            let _ = tx.send(Ok(Frame::data(Bytes::from(line.clone()))));
                        }
                    }
                    let bookmarks = param("allowWatchBookmarks").as_deref() == Some("true");
                    st.watchers.entry(plural).or_default().push((tx, bookmarks));
                }
            }
            // Ended at the client's timeoutSeconds, as the API server ends it.
            let timeout = param("timeoutSeconds")
                .and_then(|t| t.parse().ok())
                .map_or(Duration::MAX, Duration::from_secs);
            let stream = futures_util::StreamExt::take_until(
                tokio_stream::wrappers::UnboundedReceiverStream::new(rx),
                tokio::time::sleep(timeout.min(Duration::from_secs(86400))),
            );
            return hyper::Response::builder()
                .header("content-type", "application/json")
                .body(BodyExt::boxed(StreamBody::new(stream)))
                .unwrap();
        }
        // Lists page by `limit`, resumed by the opaque `continue` token.
        let limit: Option<usize> = param("limit").and_then(|v| v.parse().ok());
        let cont = param("continue");
        st.lists.push((plural.clone(), limit, cont.clone()));
        let all: &[Value] = st.objects.get(&plural).map_or(&[], Vec::as_slice);
        let offset: usize = cont
            .as_deref()
            .and_then(|c| c.strip_prefix("page-"))
            .and_then(|o| o.parse().ok())
            .unwrap_or(0);
        let end = limit.map_or(all.len(), |l| (offset + l).min(all.len()));
        let items = all.get(offset..end).unwrap_or_default().to_vec();
        let mut metadata = json!({"resourceVersion": st.rv.to_string()});
        if end < all.len() {
            metadata["continue"] = json!(format!("page-{end}"));
            metadata["remainingItemCount"] = json!(all.len() - end);
        }
        let body =
            json!({"kind": "List", "apiVersion": "v1", "metadata": metadata, "items": items});
        hyper::Response::builder()
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_string())).boxed())
            .unwrap()
    }

    pub async fn serve(&self) -> String {
        self.serve_as("").await
    }

    /// Another address of the same server; requests through it are tagged `tag`.
    pub async fn serve_as(&self, tag: &str) -> String {
        let tag = tag.to_string();
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let fake = self.clone();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = l.accept().await.unwrap();
                let (fake, tag) = (fake.clone(), tag.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let (fake, tag) = (fake.clone(), tag.clone());
                        async move { Ok::<_, Infallible>(fake.handle(&tag, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        format!("http://{addr}")
    }
}

/// A kubeconfig in `dir` pointing at the fake API server.
pub fn write_kubeconfig(dir: &std::path::Path, url: &str) -> std::path::PathBuf {
    let path = dir.join("kubeconfig");
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: fake, cluster: {{server: '{url}'}}}}]\n\
             users: [{{name: u, user: {{}}}}]\ncontexts: [{{name: c, context: {{cluster: fake, user: u}}}}]\n\
             current-context: c\n"
        ),
    )
    .unwrap();
    path
}
