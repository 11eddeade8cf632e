//! What the HBONE tests share: a CA and certificates from it, and an HBONE server.

use hbone::H2Settings;
use hbone::server::{ConnectHandler, serve_connection};
use mesh_identity::ca::CertificateAuthority;
use mesh_identity::{SpiffeId, WorkloadCertificate, generate_csr};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub const DAY: Duration = Duration::from_secs(86400);

pub struct Mesh {
    ca: CertificateAuthority,
}

impl Mesh {
    pub fn new() -> Self {
        Mesh {
            ca: CertificateAuthority::new_root("cluster.local", 30 * DAY).unwrap(),
        }
    }
    pub fn cert(&self, sa: &str) -> WorkloadCertificate {
        let id = SpiffeId::new("cluster.local", "test", sa).unwrap();
        let csr = generate_csr(&id).unwrap();
        let chain = self.ca.sign_csr(&csr.csr_pem, &id, DAY).unwrap();
        WorkloadCertificate::from_ca_response(&id, &csr.key, &chain).unwrap()
    }
}

/// An HBONE server on a loopback port with `cert`, each connection served with `handler`.
/// (Not every test binary that includes this module uses it.)
#[allow(dead_code)]
pub async fn start_hbone_server<H: ConnectHandler + 'static>(
    cert: &WorkloadCertificate,
    handler: Arc<H>,
    settings: H2Settings,
) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let tls = Arc::new(mesh_identity::server_config(cert).unwrap());
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (tls, handler, settings) = (tls.clone(), handler.clone(), settings.clone());
            tokio::spawn(async move {
                let _ =
                    serve_connection(tcp, tls, handler, &settings, CancellationToken::new()).await;
            });
        }
    });
    addr
}
