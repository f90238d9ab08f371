//! SPIFFE mutual TLS over real loopback sockets: rustls configs built by
//! `sigil::tls`, real handshakes, SVID rotation without restart.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use sigil::bundle::{Bundle, BundleSet, X509Bundle};
use sigil::source::SharedBundles;
use sigil::tls::{SvidResolver, mtls_client_config, mtls_server_config};
use sigil::validate::x509::{ExactId, MemberOf};
use sigil::{PrivateKey, SpiffeId, TrustDomain, X509Svid};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

struct Ca {
    params: CertificateParams,
    key: KeyPair,
    der: rustls_pki_types::CertificateDer<'static>,
}

fn ca() -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let der = params.self_signed(&key).unwrap().der().clone();
    Ca { params, key, der }
}

fn svid(ca: &Ca, id: &str) -> X509Svid {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.subject_alt_names = vec![SanType::URI(id.try_into().unwrap())];
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let key = KeyPair::generate().unwrap();
    let cert = p
        .signed_by(&key, &Issuer::from_params(&ca.params, &ca.key))
        .unwrap();
    X509Svid::new(
        vec![cert.der().clone()],
        PrivateKey::from_pkcs8_der(key.serialize_der()),
    )
    .unwrap()
}

fn bundles(cas: &[(&str, &Ca)]) -> Arc<SharedBundles> {
    let set: BundleSet = cas
        .iter()
        .map(|(td, ca)| {
            let td = TrustDomain::new(td).unwrap();
            Bundle {
                x509: X509Bundle::from_ders(td.clone(), vec![ca.der.clone()]).unwrap(),
                ..Bundle::empty(td)
            }
        })
        .collect();
    Arc::new(SharedBundles::new(set))
}

/// Serves one connection per call: handshake, echo one byte, report the
/// client's leaf certificate (or the handshake error).
async fn serve_once(listener: &TcpListener, acceptor: TlsAcceptor) -> Result<Vec<u8>, String> {
    let (tcp, _) = listener.accept().await.unwrap();
    let mut tls = acceptor.accept(tcp).await.map_err(|e| e.to_string())?;
    let mut b = [0u8; 1];
    tls.read_exact(&mut b).await.map_err(|e| e.to_string())?;
    tls.write_all(&b).await.map_err(|e| e.to_string())?;
    let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    Ok(leaf)
}

async fn connect(addr: std::net::SocketAddr, connector: TlsConnector) -> Result<Vec<u8>, String> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("ignored.invalid").unwrap();
    let mut tls = connector
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    tls.write_all(b"x").await.map_err(|e| e.to_string())?;
    let mut b = [0u8; 1];
    tls.read_exact(&mut b).await.map_err(|e| e.to_string())?;
    Ok(tls.get_ref().1.peer_certificates().unwrap()[0].to_vec())
}

#[tokio::test]
async fn mutual_tls_with_svids() {
    let td_ca = ca();
    let other_ca = ca();
    let server_id = "spiffe://example.org/tool/ehr-fhir";
    let server_svid = svid(&td_ca, server_id);
    let server_resolver = Arc::new(SvidResolver::new(&server_svid).unwrap());
    let server_cfg = mtls_server_config(
        server_resolver.clone(),
        bundles(&[("example.org", &td_ca)]),
        Arc::new(MemberOf(TrustDomain::new("example.org").unwrap())),
    )
    .unwrap();
    let acceptor = TlsAcceptor::from(Arc::new(server_cfg));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();

    let client = |svid: &X509Svid, expect: &str| {
        let cfg = mtls_client_config(
            Some(Arc::new(SvidResolver::new(svid).unwrap())),
            bundles(&[("example.org", &td_ca), ("other.org", &other_ca)]),
            Arc::new(ExactId(SpiffeId::parse(expect).unwrap())),
        )
        .unwrap();
        TlsConnector::from(Arc::new(cfg))
    };

    // 1. Good: both sides verify.
    let agent = svid(&td_ca, "spiffe://example.org/agent/triage");
    let (s, c) = tokio::join!(
        serve_once(&listener, acceptor.clone()),
        connect(addr, client(&agent, server_id))
    );
    assert_eq!(s.unwrap(), agent.leaf().to_vec());
    assert_eq!(c.unwrap(), server_svid.leaf().to_vec());

    // 2. A client SVID from another trust domain: the server has no bundle
    //    for other.org and refuses.
    let foreign = svid(&other_ca, "spiffe://other.org/agent/x");
    let (s, c) = tokio::join!(
        serve_once(&listener, acceptor.clone()),
        connect(addr, client(&foreign, server_id))
    );
    assert!(
        s.unwrap_err().contains("other.org"),
        "server must refuse the foreign client"
    );
    assert!(c.is_err());

    // 3. A client SVID claiming example.org but signed by other.org's CA.
    let forged = svid(&other_ca, "spiffe://example.org/agent/forged");
    let (s, _) = tokio::join!(
        serve_once(&listener, acceptor.clone()),
        connect(addr, client(&forged, server_id))
    );
    assert!(s.is_err());

    // 4. The client expects a different server ID: the client refuses.
    let (s, c) = tokio::join!(
        serve_once(&listener, acceptor.clone()),
        connect(addr, client(&agent, "spiffe://example.org/tool/calendar"))
    );
    assert!(c.unwrap_err().contains("not authorized"));
    assert!(s.is_err());

    // 5. Rotation without restart: the next handshake presents the new SVID.
    let rotated = svid(&td_ca, server_id);
    server_resolver.update(&rotated).unwrap();
    let (s, c) = tokio::join!(
        serve_once(&listener, acceptor.clone()),
        connect(addr, client(&agent, server_id))
    );
    s.unwrap();
    assert_eq!(c.unwrap(), rotated.leaf().to_vec());
}

/// A config reused across connections, as a long-running tool keeps it:
/// every connection is a full handshake, so a rotated SVID is presented and
/// a bundle or authorizer change applies to the next connection. (TLS
/// session resumption would skip certificates and verifiers: it is off.)
#[tokio::test]
async fn reused_configs_apply_rotation_and_bundle_changes_to_every_connection() {
    let td_ca = ca();
    let server_id = "spiffe://example.org/tool/ehr-fhir";
    let server_resolver = Arc::new(SvidResolver::new(&svid(&td_ca, server_id)).unwrap());
    let server_bundles = bundles(&[("example.org", &td_ca)]);
    let server_cfg = mtls_server_config(
        server_resolver.clone(),
        server_bundles.clone(),
        Arc::new(MemberOf(TrustDomain::new("example.org").unwrap())),
    )
    .unwrap();
    let acceptor = TlsAcceptor::from(Arc::new(server_cfg));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();

    let agent = svid(&td_ca, "spiffe://example.org/agent/triage");
    let client_resolver = Arc::new(SvidResolver::new(&agent).unwrap());
    let client_cfg = mtls_client_config(
        Some(client_resolver.clone()),
        bundles(&[("example.org", &td_ca)]),
        Arc::new(ExactId(SpiffeId::parse(server_id).unwrap())),
    )
    .unwrap();
    let connector = TlsConnector::from(Arc::new(client_cfg));

    let (s, c) = tokio::join!(
        serve_once(&listener, acceptor.clone()),
        connect(addr, connector.clone())
    );
    assert_eq!(s.unwrap(), agent.leaf().to_vec());
    c.unwrap();

    // Both sides rotate: the next connection, same configs, shows both
    // new SVIDs.
    let (server_rotated, agent_rotated) = (
        svid(&td_ca, server_id),
        svid(&td_ca, "spiffe://example.org/agent/triage"),
    );
    server_resolver.update(&server_rotated).unwrap();
    client_resolver.update(&agent_rotated).unwrap();
    let (s, c) = tokio::join!(
        serve_once(&listener, acceptor.clone()),
        connect(addr, connector.clone())
    );
    assert_eq!(s.unwrap(), agent_rotated.leaf().to_vec());
    assert_eq!(c.unwrap(), server_rotated.leaf().to_vec());

    // The server stops trusting the client's CA: the next connection is
    // refused, not resumed.
    server_bundles.update(BundleSet::new());
    let (s, c) = tokio::join!(
        serve_once(&listener, acceptor.clone()),
        connect(addr, connector.clone())
    );
    assert!(s.is_err(), "admitted after the bundle was removed");
    assert!(c.is_err());
}
