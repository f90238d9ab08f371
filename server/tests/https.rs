//! The HTTP endpoint over HTTPS (`--http-tls-cert`/`--http-tls-key`): the
//! real `sigil-server` binary, real sockets, the library's
//! `HttpBundleSource` as the client, a test web-PKI CA made at run time.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use rustls_pki_types::CertificateDer;
use sigil::TrustDomain;
use sigil::http_source::HttpBundleSource;
use sigil::source::BundleSource;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A web-PKI CA and a `localhost` certificate it signed, written to
/// `dir/https.pem` and `dir/https.key`. Returns the CA certificate.
fn write_web_cert(dir: &Path) -> CertificateDer<'static> {
    let ca_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut ca = rcgen::CertificateParams::default();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(rcgen::DnType::CommonName, "Test Web CA");
    ca.distinguished_name = dn;
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    // The key first: a watcher that sees the new certificate finds its key.
    std::fs::write(dir.join("https.key"), key.serialize_pem()).unwrap();
    std::fs::write(dir.join("https.pem"), leaf.pem()).unwrap();
    ca_cert.der().clone()
}

fn client(root: &CertificateDer<'static>, tls12_only: bool) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root.clone()).unwrap();
    let b = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ));
    let b = if tls12_only {
        b.with_protocol_versions(&[&rustls::version::TLS12])
    } else {
        b.with_safe_default_protocol_versions()
    };
    Arc::new(
        b.unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// GET over HTTPS: (status line, body).
async fn https_get(
    port: u16,
    cfg: Arc<rustls::ClientConfig>,
    path: &str,
) -> std::io::Result<(String, String)> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(cfg)
        .connect(name, tcp)
        .await?;
    tls.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut resp = String::new();
    tls.read_to_string(&mut resp).await?;
    let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
    Ok((
        head.lines().next().unwrap_or_default().to_owned(),
        body.to_owned(),
    ))
}

#[tokio::test(flavor = "multi_thread")]
async fn https_endpoint_serves_the_bundle_to_http_bundle_source() {
    let mut server = Server::unstarted();
    let dir = server.dir.path().to_path_buf();
    let web_ca = write_web_cert(&dir);
    server.extra_args = vec![
        "--http-tls-cert".into(),
        dir.join("https.pem").display().to_string(),
        "--http-tls-key".into(),
        dir.join("https.key").display().to_string(),
    ];
    server.spawn_and_wait();
    let port = server.http.port();
    let td = TrustDomain::new(TD).unwrap();
    let spiffe_ca = ca_cert(&server).await;

    // HttpBundleSource over a real HTTPS socket, for /bundle and /keys.
    let src = HttpBundleSource::start(
        &format!("https://localhost:{port}/bundle"),
        td.clone(),
        Some(client(&web_ca, false)),
    )
    .await
    .unwrap();
    let b = src.bundles();
    let b = b.get(&td).unwrap();
    assert_eq!(b.x509.authorities(), std::slice::from_ref(&spiffe_ca));
    assert_eq!(b.jwt.keys().count(), 1);
    let keys = HttpBundleSource::start(
        &format!("https://localhost:{port}/keys"),
        td.clone(),
        Some(client(&web_ca, false)),
    )
    .await
    .unwrap();
    assert_eq!(keys.bundles().get(&td).unwrap().jwt.keys().count(), 1);

    // OIDC discovery names https URLs; TLS 1.2 works too.
    let (status, body) = https_get(
        port,
        client(&web_ca, true),
        "/.well-known/openid-configuration",
    )
    .await
    .unwrap();
    assert!(status.contains("200"), "{status}");
    let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(doc["issuer"], "https://sigil.example.org");
    assert_eq!(doc["jwks_uri"], "https://sigil.example.org/keys");
    let (status, _) = https_get(port, client(&web_ca, false), "/ready")
        .await
        .unwrap();
    assert!(status.contains("200"), "{status}");

    // Refused: a client that does not trust the certificate, and plain HTTP.
    let other = write_web_cert(tempfile::tempdir().unwrap().path());
    let err = HttpBundleSource::start(
        &format!("https://localhost:{port}/bundle"),
        td.clone(),
        Some(client(&other, false)),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, sigil::http_source::HttpSourceError::Fetch(_)),
        "{err}"
    );
    let plain =
        HttpBundleSource::start(&format!("http://localhost:{port}/bundle"), td.clone(), None).await;
    assert!(plain.is_err(), "plain HTTP on the HTTPS port");

    // The files change (a renewal by another CA): new handshakes use them.
    let renewed_ca = write_web_cert(&dir);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if https_get(port, client(&renewed_ca, false), "/live")
            .await
            .is_ok()
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the renewed certificate was not served"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        https_get(port, client(&web_ca, false), "/live")
            .await
            .is_err()
    );
    // A broken file keeps the last good certificate.
    std::fs::write(dir.join("https.pem"), "garbage").unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let (status, _) = https_get(port, client(&renewed_ca, false), "/live")
        .await
        .unwrap();
    assert!(status.contains("200"), "{status}");
}

#[test]
fn unusable_https_files_refuse_to_start() {
    let mut server = Server::unstarted();
    let dir = server.dir.path().to_path_buf();
    write_web_cert(&dir);
    std::fs::write(
        dir.join("other.key"),
        rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .unwrap()
            .serialize_pem(),
    )
    .unwrap();
    server.extra_args = vec![
        "--http-tls-cert".into(),
        dir.join("https.pem").display().to_string(),
        "--http-tls-key".into(),
        dir.join("other.key").display().to_string(),
    ];
    let out = server.command().output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("does not match"), "{err}");
}
