//! Helpers shared by the control plane's integration tests.

use mesh_identity::SpiffeId;
use mesh_proto::ca::IstioCertificateRequest;
use prost_types::{Struct, Value, value::Kind};

/// A CreateCertificate request as ztunnel sends it: the CSR, the identity it acts for,
/// and its bearer token.
pub fn ca_request(
    csr: &str,
    id: &SpiffeId,
    token: Option<&str>,
) -> tonic::Request<IstioCertificateRequest> {
    let mut req = tonic::Request::new(IstioCertificateRequest {
        csr: csr.into(),
        validity_duration: 3600,
        metadata: Some(Struct {
            fields: [(
                "ImpersonatedIdentity".to_string(),
                Value {
                    kind: Some(Kind::StringValue(id.to_string())),
                },
            )]
            .into(),
        }),
    });
    if let Some(t) = token {
        req.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    req
}
