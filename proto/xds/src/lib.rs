//! A delta ADS client shared by the mesh's data-plane programs. It subscribes (wildcard)
//! to the given types, hands each response to a [`Handler`], ACKs or NACKs with the
//! handler's reasons, remembers the versions of what was applied so a reconnect resumes
//! with `initial_resource_versions`, and reconnects with jittered backoff. The caller's
//! state is never touched on disconnect: last-known config stays in use.
#![forbid(unsafe_code)]

pub mod certs;
pub mod control_plane;
pub mod dispatch;

pub use control_plane::{
    ConnectError, ControlPlane, ControlPlaneArgs, CredentialError, Credentials,
};
pub use dispatch::Registry;

use mesh_proto::discovery::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse,
    aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
};
use mesh_proto::{envoy_core, rpc};
use std::collections::HashMap;
use std::time::Duration;
use tonic::transport::Channel;

const MIN_BACKOFF: Duration = Duration::from_millis(10);
const MAX_BACKOFF: Duration = Duration::from_secs(15);

/// Applies responses to the caller's state.
pub trait Handler: Send + 'static {
    /// Applies one response; returns `(resource name, reason)` for each resource that
    /// was rejected (those are NACKed and not remembered as held).
    fn apply(&mut self, resp: &DeltaDiscoveryResponse) -> Vec<(String, String)>;
    /// The stream connected (`true`) or dropped (`false`).
    fn connection(&mut self, _up: bool) {}
    /// Why the stream (or the attempt at one) ended.
    fn ended(&mut self, _why: Termination) {}
}

/// Why an xDS stream ended, in the words of Istio's
/// `istio_xds_connection_terminations{reason}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Termination {
    /// No stream was established (unreachable, refused, not authorized).
    ConnectionError,
    /// The stream failed once established.
    Error,
    /// The stream ended the way a control plane going away or recycling connections
    /// ends it (cancelled, GOAWAY, transport closing): the client reconnects at once.
    Reconnect,
    /// The control plane ended the stream with an OK status.
    Complete,
}

/// How a session ended, when not with an OK status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionError {
    /// A gRPC status, from the control plane or from the transport under the stream.
    Status { code: tonic::Code, message: String },
    /// A failure of ours (the token unreadable, the request channel closed).
    Local(String),
}

impl std::fmt::Display for SessionError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SessionError::Status { code, message } => write!(f, "{code:?}: {message}"),
            SessionError::Local(m) => f.write_str(m),
        }
    }
}

impl From<tonic::Status> for SessionError {
    fn from(s: tonic::Status) -> Self {
        SessionError::Status {
            code: s.code(),
            message: s.message().to_string(),
        }
    }
}

impl From<String> for SessionError {
    fn from(m: String) -> Self {
        SessionError::Local(m)
    }
}

impl From<&str> for SessionError {
    fn from(m: &str) -> Self {
        SessionError::Local(m.to_string())
    }
}

impl Termination {
    /// The reason for a session that `connected` (got its stream) or not and ended with
    /// `result`; the statuses Istio's ztunnel counts as `Reconnect` are the same here.
    pub fn of(connected: bool, result: &Result<(), SessionError>) -> Self {
        match (connected, result) {
            (false, _) => Termination::ConnectionError,
            (true, Ok(())) => Termination::Complete,
            (true, Err(SessionError::Status { code, message })) if is_benign(*code, message) => {
                Termination::Reconnect
            }
            (true, Err(_)) => Termination::Error,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Termination::ConnectionError => "ConnectionError",
            Termination::Error => "Error",
            Termination::Reconnect => "Reconnect",
            Termination::Complete => "Complete",
        }
    }
}

/// A status that ends a healthy stream: the server cancelled it, a deadline passed, the
/// connection went away under it (GOAWAY, max connection age, a restart).
fn is_benign(code: tonic::Code, message: &str) -> bool {
    use tonic::Code::*;
    match code {
        Unknown | Cancelled | DeadlineExceeded => true,
        Unavailable => {
            message.contains("transport is closing") || message.contains("received prior goaway")
        }
        _ => false,
    }
}

fn request(type_url: &str) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        type_url: type_url.to_string(),
        ..Default::default()
    }
}

/// Runs forever: connect, subscribe to `types`, apply, ACK/NACK; reconnect with backoff.
pub async fn run(
    cp: ControlPlane,
    node: envoy_core::Node,
    types: Vec<&'static str>,
    mut handler: impl Handler,
) {
    let channel = match cp.channel(&cp.address) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "xDS disabled: invalid control plane settings");
            return;
        }
    };
    let mut held: HashMap<&'static str, HashMap<String, String>> =
        types.iter().map(|t| (*t, HashMap::new())).collect();
    let mut backoff = Backoff::new();
    loop {
        let mut connected = false;
        let r = session(
            &cp,
            &node,
            &types,
            channel.clone(),
            &mut handler,
            &mut held,
            &mut backoff,
            &mut connected,
        )
        .await;
        handler.connection(false);
        let why = Termination::of(connected, &r);
        handler.ended(why);
        match r {
            Ok(()) => tracing::warn!("xDS stream closed by the control plane"),
            Err(e) if why == Termination::Reconnect => {
                tracing::info!(reason = %e,
                    "xDS stream ended (control plane gone or recycling connections); reconnecting, keeping the last known configuration");
            }
            Err(e) => {
                tracing::warn!(error = %e, "xDS stream failed; keeping the last known configuration")
            }
        }
        let jitter = rand::random::<f64>() * 0.5 + 0.75;
        tokio::time::sleep(backoff.after(why).mul_f64(jitter)).await;
    }
}

/// The wait before reconnecting. Only a message received resets it ([`Backoff::reset`]):
/// a stream that ends before bringing one backs off further whatever the reason, a
/// benign-looking one included, or a control plane that accepts streams and closes them
/// at once would be reconnected to in a tight loop.
#[derive(Debug)]
struct Backoff(Duration);

impl Backoff {
    fn new() -> Self {
        Backoff(MIN_BACKOFF)
    }

    fn reset(&mut self) {
        self.0 = MIN_BACKOFF;
    }

    /// The wait after a stream that ended as `why` (before jitter); the next one doubles.
    fn after(&mut self, _why: Termination) -> Duration {
        let wait = self.0;
        self.0 = (self.0 * 2).min(MAX_BACKOFF);
        wait
    }
}

// The loop's state it updates (held versions, backoff, whether it connected) is passed in.
#[allow(clippy::too_many_arguments)]
async fn session(
    cp: &ControlPlane,
    node: &envoy_core::Node,
    types: &[&'static str],
    channel: Channel,
    handler: &mut impl Handler,
    held: &mut HashMap<&'static str, HashMap<String, String>>,
    backoff: &mut Backoff,
    connected: &mut bool,
) -> Result<(), SessionError> {
    let (tx, rx) = tokio::sync::mpsc::channel::<DeltaDiscoveryRequest>(16);
    for (i, t) in types.iter().enumerate() {
        let mut r = request(t);
        if i == 0 {
            r.node = Some(node.clone());
        }
        r.resource_names_subscribe = vec!["*".into()];
        r.initial_resource_versions = held[t].clone();
        tx.send(r).await.map_err(|_| "request channel closed")?;
    }
    let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    cp.authorize(&mut req)?;
    let mut client =
        AggregatedDiscoveryServiceClient::new(channel).max_decoding_message_size(200 * 1024 * 1024);
    let mut stream = client.delta_aggregated_resources(req).await?.into_inner();
    *connected = true;
    handler.connection(true);
    tracing::info!(address = %cp.address, "xDS connected");
    while let Some(resp) = stream.message().await? {
        backoff.reset();
        let mut reply = request(&resp.type_url);
        reply.response_nonce = resp.nonce.clone();
        let Some(versions) = held
            .iter_mut()
            .find(|(k, _)| **k == resp.type_url)
            .map(|(_, v)| v)
        else {
            reply.error_detail = Some(rpc::Status {
                code: tonic::Code::InvalidArgument as i32,
                message: format!("type {} was not subscribed", resp.type_url),
                details: vec![],
            });
            tx.send(reply).await.map_err(|_| "request channel closed")?;
            continue;
        };
        let rejected = handler.apply(&resp);
        for r in &resp.resources {
            if !rejected.iter().any(|(n, _)| n == &r.name) {
                versions.insert(r.name.clone(), r.version.clone());
            }
        }
        for n in &resp.removed_resources {
            versions.remove(n);
        }
        if rejected.is_empty() {
            tracing::debug!(type_url = %resp.type_url, resources = resp.resources.len(),
                removed = resp.removed_resources.len(), "xDS update applied");
        } else {
            let message = rejected
                .iter()
                .map(|(n, e)| format!("{n}: {e}"))
                .collect::<Vec<_>>()
                .join("; ");
            tracing::warn!(type_url = %resp.type_url, %message, "NACK: rejected invalid resources");
            reply.error_detail = Some(rpc::Status {
                code: tonic::Code::InvalidArgument as i32,
                message,
                details: vec![],
            });
        }
        tx.send(reply).await.map_err(|_| "request channel closed")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{Backoff, MAX_BACKOFF, MIN_BACKOFF, SessionError, Termination};
    use tonic::Code;

    #[test]
    fn a_stream_ending_before_any_message_backs_off() {
        for why in [
            Termination::Reconnect,
            Termination::Error,
            Termination::ConnectionError,
            Termination::Complete,
        ] {
            let mut b = Backoff::new();
            assert_eq!(b.after(why), MIN_BACKOFF, "{why:?}");
            assert_eq!(b.after(why), MIN_BACKOFF * 2, "{why:?}: no message, longer");
            assert_eq!(b.after(why), MIN_BACKOFF * 4, "{why:?}");
            b.reset(); // a message arrived
            assert_eq!(b.after(why), MIN_BACKOFF, "{why:?}");
        }
        let mut b = Backoff::new();
        for _ in 0..20 {
            b.after(Termination::Reconnect);
        }
        assert_eq!(b.after(Termination::Reconnect), MAX_BACKOFF);
    }

    #[test]
    fn terminations_are_named_as_istio_names_them() {
        let status = |code, message: &str| {
            Err(SessionError::Status {
                code,
                message: message.into(),
            })
        };
        let reset = status(Code::Unavailable, "connection reset");
        assert_eq!(
            Termination::of(false, &reset).as_str(),
            "ConnectionError",
            "no stream was ever established"
        );
        assert_eq!(
            Termination::of(false, &status(Code::Cancelled, "")).as_str(),
            "ConnectionError"
        );
        assert_eq!(Termination::of(true, &reset).as_str(), "Error");
        assert_eq!(Termination::of(true, &Ok(())).as_str(), "Complete");
        for (code, message) in [
            (Code::Cancelled, "stream cancelled"),
            (Code::DeadlineExceeded, ""),
            (Code::Unknown, "h2 protocol error"),
            (Code::Unavailable, "error reading: received prior goaway"),
            (Code::Unavailable, "transport is closing"),
        ] {
            assert_eq!(
                Termination::of(true, &status(code, message)).as_str(),
                "Reconnect",
                "{code:?}: {message}"
            );
        }
        for (code, message) in [
            (Code::Unavailable, "tcp connect error"),
            (Code::Internal, "received prior goaway"),
            (Code::PermissionDenied, "not allowed"),
        ] {
            assert_eq!(
                Termination::of(true, &status(code, message)),
                Termination::Error,
                "{code:?}: {message}"
            );
        }
        let local = Err(SessionError::Local("request channel closed".into()));
        assert_eq!(Termination::of(true, &local), Termination::Error);
    }
}
