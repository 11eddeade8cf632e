//! The CA's certificates checked by the mesh verifiers in real TLS 1.3 handshakes.

use mesh_identity::ca::CertificateAuthority;
use mesh_identity::cert::generate_csr;
use mesh_identity::{IdentityError, SpiffeId, WorkloadCertificate, client_config, server_config};
use rustls::CertificateError;
use rustls_pki_types::ServerName;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::{TlsAcceptor, TlsConnector};

const DAY: Duration = Duration::from_secs(86400);

fn id(td: &str, ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::new(td, ns, sa).unwrap()
}

fn issue(ca: &CertificateAuthority, who: &SpiffeId) -> WorkloadCertificate {
    let csr = generate_csr(who).unwrap();
    let chain = ca.sign_csr(&csr.csr_pem, who, DAY).unwrap();
    WorkloadCertificate::from_ca_response(who, &csr.key, &chain).unwrap()
}

fn issue_between(
    ca: &CertificateAuthority,
    who: &SpiffeId,
    from: SystemTime,
    to: SystemTime,
) -> WorkloadCertificate {
    let csr = generate_csr(who).unwrap();
    let chain = ca
        .sign_csr_valid_between(&csr.csr_pem, who, from, to)
        .unwrap();
    WorkloadCertificate::from_ca_response(who, &csr.key, &chain).unwrap()
}

/// Which side failed and why.
#[derive(Debug)]
struct Outcome {
    client: Result<(), rustls::Error>,
    server: Result<Option<SpiffeId>, rustls::Error>,
}

fn tls_error(e: std::io::Error) -> rustls::Error {
    match e.into_inner() {
        Some(inner) => match inner.downcast::<rustls::Error>() {
            Ok(e) => *e,
            Err(other) => rustls::Error::General(other.to_string()),
        },
        None => rustls::Error::General("io".into()),
    }
}

async fn handshake(
    client_cert: &WorkloadCertificate,
    expect: Vec<SpiffeId>,
    server_cert: &WorkloadCertificate,
) -> Outcome {
    let connector = TlsConnector::from(Arc::new(client_config(client_cert, expect).unwrap()));
    let acceptor = TlsAcceptor::from(Arc::new(server_config(server_cert).unwrap()));
    let (c, s) = tokio::io::duplex(64 * 1024);
    let server = tokio::spawn(async move {
        let mut tls = acceptor.accept(s).await.map_err(tls_error)?;
        let peer = mesh_identity::peer_identity(tls.get_ref().1.peer_certificates());
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await.map_err(tls_error)?;
        tls.write_all(&buf).await.map_err(tls_error)?;
        tls.flush().await.map_err(tls_error)?;
        Ok(peer)
    });
    let client = async {
        let name = ServerName::try_from("0.0.0.0").unwrap();
        let mut tls = connector.connect(name, c).await.map_err(tls_error)?;
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        tls.write_all(b"ping").await.map_err(tls_error)?;
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await.map_err(tls_error)?;
        assert_eq!(&buf, b"ping");
        Ok(())
    }
    .await;
    let server = server.await.unwrap();
    Outcome { client, server }
}

#[tokio::test]
async fn valid_chain_is_accepted_and_peer_identity_exposed() {
    let ca = CertificateAuthority::new_root("cluster.local", 365 * DAY).unwrap();
    let a = id("cluster.local", "ns-a", "client");
    let b = id("cluster.local", "ns-b", "server");
    let out = handshake(&issue(&ca, &a), vec![b.clone()], &issue(&ca, &b)).await;
    out.client.unwrap();
    assert_eq!(out.server.unwrap(), Some(a));
}

#[tokio::test]
async fn chain_through_an_intermediate_is_accepted() {
    let root = CertificateAuthority::new_root("cluster.local", 365 * DAY).unwrap();
    let (cert, key) = root.issue_intermediate(30 * DAY).unwrap();
    let ca =
        CertificateAuthority::load("cluster.local", &cert, &key, None, &root.roots_pem()).unwrap();
    let a = id("cluster.local", "a", "a");
    let b = id("cluster.local", "b", "b");
    let (ca_a, ca_b) = (issue(&ca, &a), issue(&ca, &b));
    assert_eq!(ca_a.chain().len(), 2, "leaf + intermediate");
    let out = handshake(&ca_a, vec![b.clone()], &ca_b).await;
    out.client.unwrap();
    assert_eq!(out.server.unwrap(), Some(a));
}

/// An Istio plug-in CA two levels below the root: `cert-chain.pem` holds the signing
/// certificate, the intermediate above it and the root; leaves are served with both
/// intermediates (once each) and verify against the root alone.
#[tokio::test]
async fn istio_cert_chain_with_two_intermediates_is_served_whole() {
    let root = CertificateAuthority::new_root("cluster.local", 365 * DAY).unwrap();
    let (upper, upper_key) = root.issue_intermediate(60 * DAY).unwrap();
    let upper_ca =
        CertificateAuthority::load("cluster.local", &upper, &upper_key, None, &root.roots_pem())
            .unwrap();
    let (signing, signing_key) = upper_ca.issue_intermediate(30 * DAY).unwrap();
    let cert_chain_pem = format!("{signing}{upper}{}", root.roots_pem());
    let ca = CertificateAuthority::load(
        "cluster.local",
        &signing,
        &signing_key,
        Some(&cert_chain_pem),
        &root.roots_pem(),
    )
    .unwrap();
    let a = id("cluster.local", "a", "a");
    let b = id("cluster.local", "b", "b");
    let (ca_a, ca_b) = (issue(&ca, &a), issue(&ca, &b));
    assert_eq!(
        ca_a.chain().len(),
        3,
        "leaf + signing intermediate + the one above it"
    );
    let out = handshake(&ca_a, vec![b.clone()], &ca_b).await;
    out.client.unwrap();
    assert_eq!(out.server.unwrap(), Some(a));
}

#[tokio::test]
async fn wrong_identity_is_refused_by_the_client() {
    let ca = CertificateAuthority::new_root("cluster.local", 365 * DAY).unwrap();
    let a = id("cluster.local", "a", "a");
    let b = id("cluster.local", "b", "b");
    let imposter = id("cluster.local", "b", "not-b");
    let out = handshake(&issue(&ca, &a), vec![b], &issue(&ca, &imposter)).await;
    let err = out.client.unwrap_err();
    assert!(
        matches!(
            IdentityError::from_rustls(&err),
            Some(IdentityError::UnexpectedIdentity { .. })
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn unknown_root_is_refused() {
    let ours = CertificateAuthority::new_root("cluster.local", 365 * DAY).unwrap();
    let theirs = CertificateAuthority::new_root("cluster.local", 365 * DAY).unwrap();
    let a = id("cluster.local", "a", "a");
    let b = id("cluster.local", "b", "b");
    // Client trusts `ours`; the server's certificate is from `theirs`.
    let out = handshake(&issue(&ours, &a), vec![b.clone()], &issue(&theirs, &b)).await;
    let err = out.client.unwrap_err();
    assert!(
        matches!(
            err,
            rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)
        ),
        "{err:?}"
    );
    // Server trusts `ours`; the client's certificate is from `theirs` (while the client
    // itself trusts `ours`, so it gets as far as presenting it).
    let client = issue(&theirs, &a).with_roots(ours.roots().to_vec());
    let out = handshake(&client, vec![b.clone()], &issue(&ours, &b)).await;
    let err = out.server.unwrap_err();
    assert!(
        matches!(
            err,
            rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)
        ),
        "{err:?}"
    );
}

fn is_expired(e: &rustls::Error) -> bool {
    matches!(
        e,
        rustls::Error::InvalidCertificate(
            CertificateError::Expired | CertificateError::ExpiredContext { .. }
        )
    )
}

fn is_not_yet_valid(e: &rustls::Error) -> bool {
    matches!(
        e,
        rustls::Error::InvalidCertificate(
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. }
        )
    )
}

#[tokio::test]
async fn expired_and_not_yet_valid_are_refused_distinctly() {
    let ca = CertificateAuthority::new_root("cluster.local", 365 * DAY).unwrap();
    let a = id("cluster.local", "a", "a");
    let b = id("cluster.local", "b", "b");
    let now = SystemTime::now();
    let expired = issue_between(&ca, &b, now - 2 * DAY, now - DAY);
    let future = issue_between(&ca, &b, now + DAY, now + 2 * DAY);
    let client = issue(&ca, &a);

    let err = handshake(&client, vec![b.clone()], &expired)
        .await
        .client
        .unwrap_err();
    assert!(is_expired(&err), "{err:?}");
    let err = handshake(&client, vec![b.clone()], &future)
        .await
        .client
        .unwrap_err();
    assert!(is_not_yet_valid(&err), "{err:?}");

    // And the server refuses an expired client.
    let expired_client = issue_between(&ca, &a, now - 2 * DAY, now - DAY);
    let err = handshake(&expired_client, vec![b.clone()], &issue(&ca, &b))
        .await
        .server
        .unwrap_err();
    assert!(is_expired(&err), "{err:?}");
}

#[tokio::test]
async fn server_refuses_a_client_from_another_trust_domain() {
    // Both roots trusted, so only the trust-domain check can refuse.
    let mut local = CertificateAuthority::new_root("cluster.local", 365 * DAY).unwrap();
    let mut other = CertificateAuthority::new_root("other.td", 365 * DAY).unwrap();
    let (lp, op) = (local.roots_pem(), other.roots_pem());
    local.trust_additional_roots(&op).unwrap();
    other.trust_additional_roots(&lp).unwrap();
    let a = id("other.td", "a", "a");
    let b = id("cluster.local", "b", "b");
    let out = handshake(&issue(&other, &a), vec![b.clone()], &issue(&local, &b)).await;
    let err = out.server.unwrap_err();
    assert!(
        matches!(
            IdentityError::from_rustls(&err),
            Some(IdentityError::WrongTrustDomain { .. })
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn root_rotation_with_two_roots_in_the_bundle() {
    let old = CertificateAuthority::new_root("cluster.local", 365 * DAY).unwrap();
    let mut new = CertificateAuthority::new_root("cluster.local", 365 * DAY).unwrap();
    new.trust_additional_roots(&old.roots_pem()).unwrap();
    assert_eq!(new.roots().len(), 2);
    let a = id("cluster.local", "a", "a");
    let b = id("cluster.local", "b", "b");
    // A client issued by the new CA (bundle: new+old) talks to a server still on the old
    // root, whose bundle is only the old root: the client accepts (it trusts old), but the
    // server does not know the new root yet.
    let out = handshake(&issue(&new, &a), vec![b.clone()], &issue(&old, &b)).await;
    // The old-root server is the side that refuses, and for the unknown issuer.
    assert!(
        matches!(
            out.server,
            Err(rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer
            ))
        ),
        "{:?}",
        out.server
    );
    // Once the old side also trusts both roots, both directions work.
    let mut old = old;
    old.trust_additional_roots(&new.roots_pem()).unwrap();
    let out = handshake(&issue(&new, &a), vec![b.clone()], &issue(&old, &b)).await;
    out.client.unwrap();
    out.server.unwrap();
    let out = handshake(&issue(&old, &a), vec![b.clone()], &issue(&new, &b)).await;
    out.client.unwrap();
    out.server.unwrap();
}

#[test]
fn ca_refuses_foreign_trust_domain_and_mismatched_csr() {
    use mesh_identity::ca::CaError;
    let ca = CertificateAuthority::new_root("cluster.local", 365 * DAY).unwrap();
    let foreign = id("evil.td", "a", "a");
    let csr = generate_csr(&foreign).unwrap();
    assert!(matches!(
        ca.sign_csr(&csr.csr_pem, &foreign, DAY),
        Err(CaError::ForeignTrustDomain { .. })
    ));
    let asked = id("cluster.local", "a", "a");
    let other = id("cluster.local", "a", "admin");
    let csr = generate_csr(&asked).unwrap();
    assert!(matches!(
        ca.sign_csr(&csr.csr_pem, &other, DAY),
        Err(CaError::CsrIdentityMismatch(_))
    ));
    assert!(matches!(
        ca.sign_csr(
            "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
            &asked,
            DAY
        ),
        Err(CaError::BadCsr(_))
    ));
}

#[test]
fn ca_persists_and_reloads() {
    let ca = CertificateAuthority::new_root("cluster.local", 365 * DAY).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.pem"), ca.cert_pem()).unwrap();
    std::fs::write(dir.path().join("ca-key.pem"), ca.key_pem()).unwrap();
    let cert = std::fs::read_to_string(dir.path().join("ca.pem")).unwrap();
    let key = std::fs::read_to_string(dir.path().join("ca-key.pem")).unwrap();
    let reloaded = CertificateAuthority::load("cluster.local", &cert, &key, None, &cert).unwrap();
    assert_eq!(reloaded.roots_pem(), ca.roots_pem());
    // A certificate from the reloaded CA carries the identity, expires at the TTL and
    // renews at half-life.
    let who = id("cluster.local", "a", "a");
    let wc = issue(&reloaded, &who);
    let life = wc.not_after().duration_since(SystemTime::now()).unwrap();
    assert!(
        life <= DAY && life > DAY - Duration::from_secs(120),
        "{life:?}"
    );
    assert!(wc.refresh_at() < wc.not_after());
    // Mismatched key and certificate are refused.
    let other = CertificateAuthority::new_root("cluster.local", DAY).unwrap();
    assert!(
        CertificateAuthority::load("cluster.local", &cert, &other.key_pem(), None, &cert).is_err()
    );
}

#[test]
fn response_with_wrong_identity_is_refused() {
    let ca = CertificateAuthority::new_root("cluster.local", 365 * DAY).unwrap();
    let issued = id("cluster.local", "a", "a");
    let wanted = id("cluster.local", "a", "b");
    let csr = generate_csr(&issued).unwrap();
    let chain = ca.sign_csr(&csr.csr_pem, &issued, DAY).unwrap();
    assert!(WorkloadCertificate::from_ca_response(&wanted, &csr.key, &chain).is_err());
}

// ---- exactly one SPIFFE URI SAN (certificates made directly with rcgen) ----

mod san_rule {
    use super::*;
    use mesh_identity::tls::{SpiffeServerVerifier, TrustDomainClientVerifier};
    use rcgen::{
        BasicConstraints, CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, IsCa,
        Issuer, KeyPair, SanType,
    };
    use rustls::client::danger::ServerCertVerifier;
    use rustls::server::danger::ClientCertVerifier;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime};

    /// A root made by rcgen itself (not our CA library), so a leaf can carry any SANs.
    pub struct RawCa {
        issuer: Issuer<'static, KeyPair>,
        pub root: CertificateDer<'static>,
    }

    impl RawCa {
        pub fn new() -> Self {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.distinguished_name = DistinguishedName::new();
            let root = params.self_signed(&key).unwrap().der().clone();
            RawCa {
                issuer: Issuer::new(params, key),
                root,
            }
        }

        /// A leaf with exactly these SANs: `spiffe:`/`https:` strings become URI SANs,
        /// `dns:x` a DNS SAN.
        pub fn leaf(&self, sans: &[&str]) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.distinguished_name = DistinguishedName::new();
            params.is_ca = IsCa::ExplicitNoCa;
            params.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
            params.subject_alt_names = sans
                .iter()
                .map(|s| match s.strip_prefix("dns:") {
                    Some(d) => SanType::DnsName(d.to_string().try_into().unwrap()),
                    None => SanType::URI(s.to_string().try_into().unwrap()),
                })
                .collect();
            let cert = params.signed_by(&key, &self.issuer).unwrap();
            let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
            (cert.der().clone(), key)
        }
    }

    const A: &str = "spiffe://cluster.local/ns/a/sa/a";
    const B: &str = "spiffe://cluster.local/ns/b/sa/b";

    fn server_side(ca: &RawCa, leaf: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        let v = TrustDomainClientVerifier::new(std::slice::from_ref(&ca.root), "cluster.local")
            .unwrap();
        v.verify_client_cert(leaf, &[], UnixTime::now()).map(|_| ())
    }

    fn client_side(ca: &RawCa, leaf: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        let expected = vec![A.parse().unwrap(), B.parse().unwrap()];
        let v = SpiffeServerVerifier::new(std::slice::from_ref(&ca.root), expected).unwrap();
        let name = ServerName::try_from("10.0.0.1").unwrap();
        v.verify_server_cert(leaf, &[], &name, &[], UnixTime::now())
            .map(|_| ())
    }

    fn identity_error(r: Result<(), rustls::Error>) -> IdentityError {
        let err = r.expect_err("must be refused");
        IdentityError::from_rustls(&err)
            .unwrap_or_else(|| panic!("not a typed identity error: {err:?}"))
            .clone()
    }

    #[test]
    fn exactly_one_spiffe_uri_is_accepted_by_both_verifiers() {
        let ca = RawCa::new();
        let (leaf, _) = ca.leaf(&[A]);
        server_side(&ca, &leaf).unwrap();
        client_side(&ca, &leaf).unwrap();
        // DNS SANs beside the one URI do not count.
        let (leaf, _) = ca.leaf(&[A, "dns:a.example"]);
        server_side(&ca, &leaf).unwrap();
        client_side(&ca, &leaf).unwrap();
        let info = mesh_identity::cert::inspect(&leaf).unwrap();
        assert_eq!(info.identity().unwrap().to_string(), A);
    }

    #[test]
    fn zero_uris_are_refused_as_no_identity() {
        let ca = RawCa::new();
        for sans in [&[][..], &["dns:a.example"][..]] {
            let (leaf, _) = ca.leaf(sans);
            assert_eq!(
                identity_error(server_side(&ca, &leaf)),
                IdentityError::NoIdentity
            );
            assert_eq!(
                identity_error(client_side(&ca, &leaf)),
                IdentityError::NoIdentity
            );
        }
    }

    #[test]
    fn two_uris_are_refused_even_when_both_are_expected() {
        let ca = RawCa::new();
        // Both identities are in the client's expected list, and both are in our trust
        // domain: still refused, since which one the peer is would be a guess.
        for sans in [&[A, B][..], &[A, "https://a.example/"][..], &[A, A][..]] {
            let (leaf, _) = ca.leaf(sans);
            for err in [
                identity_error(server_side(&ca, &leaf)),
                identity_error(client_side(&ca, &leaf)),
            ] {
                assert!(
                    matches!(&err, IdentityError::MultipleIdentities { uris } if uris.len() == 2),
                    "{sans:?}: {err:?}"
                );
            }
        }
    }

    #[test]
    fn a_lone_non_spiffe_uri_is_refused_as_not_spiffe() {
        let ca = RawCa::new();
        for uri in [
            "https://cluster.local/ns/a/sa/a",
            "spiffe://cluster.local/a/b",
            "spiffe://cluster.local/ns/a/sa/a/extra",
        ] {
            let (leaf, _) = ca.leaf(&[uri]);
            for err in [
                identity_error(server_side(&ca, &leaf)),
                identity_error(client_side(&ca, &leaf)),
            ] {
                assert!(
                    matches!(&err, IdentityError::NotSpiffe { uri: u, .. } if u == uri),
                    "{uri}: {err:?}"
                );
            }
        }
    }

    #[test]
    fn peer_identity_and_workload_certificates_follow_the_same_rule() {
        let ca = RawCa::new();
        let (two, key) = ca.leaf(&[A, B]);
        assert_eq!(
            mesh_identity::peer_identity(Some(std::slice::from_ref(&two))),
            None
        );
        let (one, _) = ca.leaf(&[A]);
        assert_eq!(
            mesh_identity::peer_identity(Some(std::slice::from_ref(&one))),
            Some(A.parse().unwrap())
        );
        // A CA answer carrying the requested identity and another one is not used.
        let PrivateKeyDer::Pkcs8(pkcs8) = key else {
            unreachable!()
        };
        let err = WorkloadCertificate::from_parts(
            &A.parse().unwrap(),
            vec![two],
            pkcs8,
            vec![ca.root.clone()],
        )
        .unwrap_err();
        assert!(
            matches!(err, mesh_identity::CertError::WrongIdentity { .. }),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn server_refuses_a_two_uri_client_in_a_real_handshake() {
        let ca = RawCa::new();
        let (server_leaf, server_key) = ca.leaf(&[B]);
        let PrivateKeyDer::Pkcs8(server_key) = server_key else {
            unreachable!()
        };
        let server = WorkloadCertificate::from_parts(
            &B.parse().unwrap(),
            vec![server_leaf],
            server_key,
            vec![ca.root.clone()],
        )
        .unwrap();
        let (client_leaf, client_key) = ca.leaf(&[A, B]);
        let verifier =
            SpiffeServerVerifier::new(std::slice::from_ref(&ca.root), vec![B.parse().unwrap()])
                .unwrap();
        let mut config = rustls::ClientConfig::builder_with_provider(mesh_identity::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_auth_cert(vec![client_leaf], client_key)
            .unwrap();
        config.alpn_protocols = vec![b"h2".to_vec()];
        let acceptor = TlsAcceptor::from(Arc::new(server_config(&server).unwrap()));
        let (c, s) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(async move {
            let mut tls = acceptor.accept(s).await.map_err(tls_error)?;
            let mut b = [0u8; 1];
            tls.read_exact(&mut b).await.map_err(tls_error)
        });
        let client = async {
            let mut tls = TlsConnector::from(Arc::new(config))
                .connect(ServerName::try_from("0.0.0.0").unwrap(), c)
                .await?;
            tls.write_all(b"x").await?;
            let mut b = [0u8; 1];
            tls.read(&mut b).await
        };
        let _ = client.await;
        let err = server.await.unwrap().unwrap_err();
        assert!(
            matches!(
                IdentityError::from_rustls(&err),
                Some(IdentityError::MultipleIdentities { .. })
            ),
            "{err:?}"
        );
    }
}
