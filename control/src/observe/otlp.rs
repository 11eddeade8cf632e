//! The dashboard's OTLP/gRPC trace receiver (the `TraceService` Jaeger, Tempo and the
//! OpenTelemetry Collector serve): what senders export goes into the bounded [`Store`].

use super::traces::Store;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTracePartialSuccess, ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

/// The largest export request taken (gRPC's usual default; what the waypoint sends
/// stays under it).
pub const MAX_REQUEST_BYTES: usize = 4 << 20;

pub type Shared = Arc<Mutex<Store>>;

struct Receiver(Shared);

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let rejected = self
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .ingest(req.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: (rejected > 0).then(|| ExportTracePartialSuccess {
                rejected_spans: rejected as i64,
                error_message:
                    "dropped by the dashboard's bounded store (invalid, duplicate or over its caps)"
                        .into(),
            }),
        }))
    }
}

/// Serves OTLP/gRPC on `listener` into `store` until the runtime ends.
pub async fn serve(listener: tokio::net::TcpListener, store: Shared) -> Result<(), String> {
    let svc = TraceServiceServer::new(Receiver(store)).max_decoding_message_size(MAX_REQUEST_BYTES);
    tonic::transport::Server::builder()
        // Senders are many proxies, each with one connection: bound what each may hold.
        .concurrency_limit_per_connection(16)
        .add_service(svc)
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
        .await
        .map_err(|e| format!("OTLP receiver: {e}"))
}

/// Binds `addr` and serves OTLP on a thread of its own (the dashboard's HTTP side is
/// synchronous); returns the bound address.
pub fn spawn(addr: SocketAddr, store: Shared) -> Result<SocketAddr, String> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| format!("OTLP receiver: {e}"))?;
    let listener = rt
        .block_on(tokio::net::TcpListener::bind(addr))
        .map_err(|e| format!("--otlp-listen {addr}: cannot listen: {e}"))?;
    let bound = listener.local_addr().map_err(|e| e.to_string())?;
    std::thread::spawn(move || {
        if let Err(e) = rt.block_on(serve(listener, store)) {
            eprintln!("{e}");
        }
    });
    Ok(bound)
}
