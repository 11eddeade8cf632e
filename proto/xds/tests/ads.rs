//! The delta ADS client against a real gRPC server over TLS on loopback: a control plane
//! whose every stream the test drives by hand (what it sends, when it ends), and whose
//! own record of what each client sent (metadata, requests) is what is asserted.

use mesh_identity::ca::CertificateAuthority;
use mesh_proto::discovery::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use mesh_proto::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource};
use mesh_proto::envoy_core;
use mesh_xds::{ControlPlane, Handler, Termination};
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::transport::{Identity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status, Streaming};

const A: &str = "type.test/A";
const B: &str = "type.test/B";
/// Guards against a hang only (a broken client); never reached when the client works.
const HANG: Duration = Duration::from_secs(60);

/// One stream as the control plane saw it open; the test answers through `send`.
struct Stream {
    authorization: Option<String>,
    cluster_id: Option<String>,
    requests: mpsc::UnboundedReceiver<DeltaDiscoveryRequest>,
    send: mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
}

impl Stream {
    async fn next(&mut self) -> DeltaDiscoveryRequest {
        tokio::time::timeout(HANG, self.requests.recv())
            .await
            .expect("a request from the client")
            .expect("the client's stream is open")
    }

    async fn respond(&self, r: DeltaDiscoveryResponse) {
        self.send.send(Ok(r)).await.expect("stream open");
    }

    async fn end(self, status: Option<Status>) {
        if let Some(s) = status {
            let _ = self.send.send(Err(s)).await;
        }
        // Dropping the sender ends the response stream (with OK when no error was sent).
    }
}

#[derive(Clone)]
struct FakeControlPlane {
    opened: mpsc::UnboundedSender<Stream>,
    /// Streams refused at once with this status, counted down.
    refuse: std::sync::Arc<std::sync::Mutex<Vec<Status>>>,
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for FakeControlPlane {
    type DeltaAggregatedResourcesStream = ReceiverStream<Result<DeltaDiscoveryResponse, Status>>;

    async fn delta_aggregated_resources(
        &self,
        req: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        if let Some(s) = self.refuse.lock().unwrap().pop() {
            return Err(s);
        }
        let header = |k: &str| {
            req.metadata()
                .get(k)
                .map(|v| v.to_str().unwrap().to_string())
        };
        let (authorization, cluster_id) = (header("authorization"), header("clusterid"));
        let mut inbound = req.into_inner();
        let (req_tx, requests) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok(Some(r)) = inbound.message().await {
                if req_tx.send(r).is_err() {
                    break;
                }
            }
        });
        let (send, rx) = mpsc::channel(16);
        let _ = self.opened.send(Stream {
            authorization,
            cluster_id,
            requests,
            send,
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// What the client's handler was told, in order.
#[derive(Debug, PartialEq)]
enum Event {
    Applied {
        type_url: String,
        names: Vec<String>,
        removed: Vec<String>,
    },
    Up(bool),
    Ended(Termination),
}

/// Rejects every resource whose body is `bad`.
struct Recorder(mpsc::UnboundedSender<Event>);

impl Handler for Recorder {
    fn apply(&mut self, resp: &DeltaDiscoveryResponse) -> Vec<(String, String)> {
        let _ = self.0.send(Event::Applied {
            type_url: resp.type_url.clone(),
            names: resp.resources.iter().map(|r| r.name.clone()).collect(),
            removed: resp.removed_resources.clone(),
        });
        resp.resources
            .iter()
            .filter(|r| r.resource.as_ref().is_some_and(|a| a.value == b"bad"))
            .map(|r| (r.name.clone(), "unreadable".to_string()))
            .collect()
    }
    fn connection(&mut self, up: bool) {
        let _ = self.0.send(Event::Up(up));
    }
    fn ended(&mut self, why: Termination) {
        let _ = self.0.send(Event::Ended(why));
    }
}

struct Setup {
    streams: mpsc::UnboundedReceiver<Stream>,
    events: mpsc::UnboundedReceiver<Event>,
    client: tokio::task::JoinHandle<()>,
    dir: PathBuf,
}

impl Setup {
    async fn stream(&mut self) -> Stream {
        tokio::time::timeout(HANG, self.streams.recv())
            .await
            .expect("the client opens a stream")
            .unwrap()
    }

    async fn event(&mut self) -> Event {
        tokio::time::timeout(HANG, self.events.recv())
            .await
            .expect("an event from the handler")
            .unwrap()
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        self.client.abort();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A control plane with a serving certificate for `control.test` from a fresh CA, and a
/// client trusting that CA, checking that name, and presenting a token from a file.
async fn setup(test: &str, types: Vec<&'static str>, refuse: Vec<Status>) -> Setup {
    let ca = CertificateAuthority::new_root("cluster.local", Duration::from_secs(3600)).unwrap();
    let (chain, key) = ca
        .issue_server_cert(&["control.test".into()], &[], Duration::from_secs(3600))
        .unwrap();
    let listener = tokio::net::TcpListener::bind((IpAddr::V4(Ipv4Addr::LOCALHOST), 0))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let (opened, streams) = mpsc::unbounded_channel();
    let refuse = std::sync::Arc::new(std::sync::Mutex::new(refuse));
    let fake = FakeControlPlane {
        opened,
        refuse: std::sync::Arc::clone(&refuse),
    };
    let server = Server::builder()
        .tls_config(ServerTlsConfig::new().identity(Identity::from_pem(chain, key)))
        .unwrap()
        .add_service(AggregatedDiscoveryServiceServer::new(fake));
    tokio::spawn(server.serve_with_incoming(TcpListenerStream::new(listener)));

    let dir = std::env::temp_dir().join(format!("mesh-xds-ads-{test}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let token = dir.join("token");
    std::fs::write(&token, "the-token\n").unwrap();
    let cp = ControlPlane {
        address: format!("https://{addr}"),
        root_pem: ca.roots_pem(),
        hostname: Some("control.test".into()),
        token_file: Some(token),
        cluster_id: "east".into(),
    };
    let node = envoy_core::Node {
        id: "test~node".into(),
        ..Default::default()
    };
    let (tx, events) = mpsc::unbounded_channel();
    let client = tokio::spawn(mesh_xds::run(cp, node, types, Recorder(tx)));
    Setup {
        streams,
        events,
        client,
        dir,
    }
}

fn resource(name: &str, version: &str, body: &[u8]) -> Resource {
    Resource {
        name: name.into(),
        version: version.into(),
        resource: Some(prost_types::Any {
            type_url: String::new(),
            value: body.to_vec(),
        }),
        ..Default::default()
    }
}

fn response(
    type_url: &str,
    nonce: &str,
    resources: Vec<Resource>,
    removed: &[&str],
) -> DeltaDiscoveryResponse {
    DeltaDiscoveryResponse {
        type_url: type_url.into(),
        nonce: nonce.into(),
        resources,
        removed_resources: removed.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

/// The subscriptions a stream opens with: (type, node id sent, initial versions).
async fn subscriptions(
    s: &mut Stream,
    n: usize,
) -> Vec<(String, Option<String>, HashMap<String, String>)> {
    let mut out = Vec::new();
    for _ in 0..n {
        let r = s.next().await;
        assert_eq!(
            r.resource_names_subscribe,
            vec!["*".to_string()],
            "wildcard"
        );
        assert!(r.response_nonce.is_empty(), "a subscription, not an ACK");
        out.push((
            r.type_url,
            r.node.map(|n| n.id),
            r.initial_resource_versions,
        ));
    }
    out
}

#[tokio::test]
async fn subscribes_with_credentials_and_acks_or_nacks_each_response_by_nonce() {
    let mut t = setup("ack", vec![A, B], vec![]).await;
    let mut s = t.stream().await;
    assert_eq!(s.authorization.as_deref(), Some("Bearer the-token"));
    assert_eq!(s.cluster_id.as_deref(), Some("east"));
    assert_eq!(
        subscriptions(&mut s, 2).await,
        vec![
            (A.to_string(), Some("test~node".to_string()), HashMap::new()),
            (B.to_string(), None, HashMap::new()),
        ],
        "both types, the node on the first request only"
    );
    assert_eq!(t.event().await, Event::Up(true));

    s.respond(response(A, "n1", vec![resource("a1", "v1", b"ok")], &[]))
        .await;
    let ack = s.next().await;
    assert_eq!(
        (ack.type_url.as_str(), ack.response_nonce.as_str()),
        (A, "n1")
    );
    assert_eq!(ack.error_detail, None, "an ACK");

    s.respond(response(
        B,
        "n2",
        vec![resource("b1", "v1", b"bad"), resource("b2", "v1", b"ok")],
        &[],
    ))
    .await;
    let nack = s.next().await;
    assert_eq!(
        (nack.type_url.as_str(), nack.response_nonce.as_str()),
        (B, "n2")
    );
    let detail = nack.error_detail.expect("a NACK");
    assert_eq!(detail.code, tonic::Code::InvalidArgument as i32);
    assert_eq!(
        detail.message, "b1: unreadable",
        "names the rejected resource only"
    );

    // A type never subscribed to is NACKed without reaching the handler.
    s.respond(response(
        "type.test/C",
        "n3",
        vec![resource("c1", "v1", b"ok")],
        &[],
    ))
    .await;
    let nack = s.next().await;
    assert_eq!(nack.response_nonce, "n3");
    assert!(
        nack.error_detail
            .expect("a NACK")
            .message
            .contains("was not subscribed"),
    );
    assert_eq!(
        t.event().await,
        Event::Applied {
            type_url: A.into(),
            names: vec!["a1".into()],
            removed: vec![]
        }
    );
    assert_eq!(
        t.event().await,
        Event::Applied {
            type_url: B.into(),
            names: vec!["b1".into(), "b2".into()],
            removed: vec![]
        }
    );
    // Nothing for type C: the next thing the handler hears is the stream ending.
    s.end(Some(Status::permission_denied("revoked"))).await;
    assert_eq!(t.event().await, Event::Up(false));
    assert_eq!(t.event().await, Event::Ended(Termination::Error));
}

#[tokio::test]
async fn a_reconnect_resumes_with_the_versions_applied_and_not_removed() {
    let mut t = setup("resume", vec![A, B], vec![]).await;
    let mut s = t.stream().await;
    subscriptions(&mut s, 2).await;
    s.respond(response(
        A,
        "n1",
        vec![
            resource("a1", "v1", b"ok"),
            resource("a2", "v1", b"ok"),
            resource("a3", "v1", b"bad"),
        ],
        &[],
    ))
    .await;
    s.next().await;
    s.respond(response(
        A,
        "n2",
        vec![resource("a1", "v2", b"ok")],
        &["a2"],
    ))
    .await;
    s.next().await;
    s.respond(response(B, "n3", vec![resource("b1", "v7", b"ok")], &[]))
        .await;
    s.next().await;
    // The control plane goes away (a restart): a benign end.
    s.end(Some(Status::cancelled("server shutting down"))).await;

    let mut s = t.stream().await;
    let subs = subscriptions(&mut s, 2).await;
    assert_eq!(
        subs,
        vec![
            (
                A.to_string(),
                Some("test~node".to_string()),
                HashMap::from([("a1".to_string(), "v2".to_string())])
            ),
            (
                B.to_string(),
                None,
                HashMap::from([("b1".to_string(), "v7".to_string())])
            ),
        ],
        "a1 at its latest version; a2 removed; a3 rejected so never held"
    );
    // What the handler heard: the first stream ended as a reconnect, not an error.
    loop {
        match t.event().await {
            Event::Ended(why) => {
                assert_eq!(why, Termination::Reconnect);
                break;
            }
            Event::Up(_) | Event::Applied { .. } => {}
        }
    }
}

#[tokio::test]
async fn why_each_stream_ended_is_reported_and_the_client_keeps_reconnecting() {
    // The first attempt is refused before a stream exists: a connection error.
    let mut t = setup("ended", vec![A], vec![Status::unauthenticated("bad token")]).await;
    assert_eq!(t.event().await, Event::Up(false));
    assert_eq!(t.event().await, Event::Ended(Termination::ConnectionError));
    // Connected, then closed with OK by the control plane.
    let mut s = t.stream().await;
    subscriptions(&mut s, 1).await;
    assert_eq!(t.event().await, Event::Up(true));
    s.end(None).await;
    assert_eq!(t.event().await, Event::Up(false));
    assert_eq!(t.event().await, Event::Ended(Termination::Complete));
    // Reconnected; now a failure that is not a benign close.
    let mut s = t.stream().await;
    subscriptions(&mut s, 1).await;
    assert_eq!(t.event().await, Event::Up(true));
    s.end(Some(Status::internal("bug"))).await;
    assert_eq!(t.event().await, Event::Up(false));
    assert_eq!(t.event().await, Event::Ended(Termination::Error));
    // And it comes back once more, still resuming nothing (nothing was applied).
    let mut s = t.stream().await;
    let subs = subscriptions(&mut s, 1).await;
    assert_eq!(subs[0].2, HashMap::new());
}
