//! `HttpBundleSource` against the real `sigil-server` HTTP endpoint: the
//! published bundle validates tokens minted through a real agent, and a
//! server outage keeps the last good bundle.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use sigil::source::BundleSource;
use std::time::{Duration, SystemTime};

mod common;
use common::*;

#[tokio::test(flavor = "multi_thread")]
async fn bundle_over_http_validates_and_survives_an_outage() {
    let http_port = free_port();
    let http = format!("127.0.0.1:{http_port}");
    let mut s = Sigil::start_with(&["--http-listen", &http]);
    let id = s.register("/workload/http", &["--audience", "ehr-fhir"]);
    s.wait_for_svid(&id).await;
    let token = s
        .client()
        .await
        .fetch_jwt_token(["ehr-fhir"], None)
        .await
        .unwrap();

    let td = sigil::TrustDomain::new(TD).unwrap();
    for path in ["/bundle", "/keys"] {
        let src = sigil::http_source::HttpBundleSource::start_with_refresh(
            &format!("http://{http}{path}"),
            td.clone(),
            None,
            Some(Duration::from_millis(200)),
        )
        .await
        .unwrap();
        let ok = sigil::JwtSvidValidator::new("ehr-fhir")
            .validate(&token, &src.bundles(), SystemTime::now())
            .unwrap();
        assert_eq!(ok.spiffe_id().as_str(), id, "{path}");
        if path == "/keys" {
            // Server down: refreshes fail, the last good bundle stays.
            s.server.kill();
            tokio::time::sleep(Duration::from_millis(1500)).await;
            assert!(src.last_error().is_some(), "a refresh must have failed");
            sigil::JwtSvidValidator::new("ehr-fhir")
                .validate(&token, &src.bundles(), SystemTime::now())
                .unwrap();
        }
    }
    // A 404 path is an error at start.
    s.start_server();
    let err = sigil::http_source::HttpBundleSource::start(&format!("http://{http}/nope"), td, None)
        .await
        .unwrap_err();
    assert_eq!(err, sigil::http_source::HttpSourceError::Status(404));
}

/// Tokens minted through a real agent validate with the keys found by OIDC
/// discovery from the server's issuer URL, over plain HTTP on loopback.
#[tokio::test(flavor = "multi_thread")]
async fn oidc_discovery_over_http_on_loopback() {
    let http = format!("127.0.0.1:{}", free_port());
    let issuer = format!("http://{http}");
    let s = Sigil::start_with(&["--http-listen", &http, "--jwt-issuer", &issuer]);
    let id = s.register("/workload/oidc", &["--audience", "ehr-fhir"]);
    s.wait_for_svid(&id).await;
    let token = s
        .client()
        .await
        .fetch_jwt_token(["ehr-fhir"], None)
        .await
        .unwrap();
    let td = sigil::TrustDomain::new(TD).unwrap();
    assert_eq!(
        sigil::http_source::discover_jwks_uri(&issuer, None)
            .await
            .unwrap(),
        format!("{issuer}/keys")
    );
    for iss in [issuer.clone(), format!("{issuer}/")] {
        let src = sigil::http_source::HttpBundleSource::start_oidc(&iss, td.clone(), None)
            .await
            .unwrap();
        let ok = sigil::JwtSvidValidator::new("ehr-fhir")
            .validate(&token, &src.bundles(), SystemTime::now())
            .unwrap();
        assert_eq!(ok.spiffe_id().as_str(), id);
    }
    // Another issuer than the one the server names: refused.
    let err = sigil::http_source::HttpBundleSource::start_oidc(
        &format!("http://localhost:{}", http.rsplit(':').next().unwrap()),
        td,
        None,
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, sigil::http_source::HttpSourceError::Discovery(_)),
        "{err:?}"
    );
}

/// The same over HTTPS (`--http-tls-cert`), trusting only the given roots;
/// and a server without `--jwt-issuer` has no discovery document.
#[tokio::test(flavor = "multi_thread")]
async fn oidc_discovery_over_https() {
    let certs = tempfile::tempdir().unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let (cert_pem, key_pem) = (certs.path().join("http.pem"), certs.path().join("http.key"));
    std::fs::write(&cert_pem, cert.pem()).unwrap();
    std::fs::write(&key_pem, key.serialize_pem()).unwrap();
    let port = free_port();
    let issuer = format!("https://localhost:{port}");
    let s = Sigil::start_with(&[
        "--http-listen",
        &format!("127.0.0.1:{port}"),
        "--http-tls-cert",
        cert_pem.to_str().unwrap(),
        "--http-tls-key",
        key_pem.to_str().unwrap(),
        "--jwt-issuer",
        &issuer,
    ]);
    let id = s.register("/workload/oidc", &["--audience", "ehr-fhir"]);
    s.wait_for_svid(&id).await;
    let token = s
        .client()
        .await
        .fetch_jwt_token(["ehr-fhir"], None)
        .await
        .unwrap();
    let td = sigil::TrustDomain::new(TD).unwrap();
    let tls = |roots: &[rustls_pki_types::CertificateDer<'static>]| {
        let mut store = rustls::RootCertStore::empty();
        for r in roots {
            store.add(r.clone()).unwrap();
        }
        std::sync::Arc::new(
            rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
                rustls::crypto::aws_lc_rs::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(store)
            .with_no_client_auth(),
        )
    };
    let src = sigil::http_source::HttpBundleSource::start_oidc(
        &issuer,
        td.clone(),
        Some(tls(&[cert.der().clone()])),
    )
    .await
    .unwrap();
    let ok = sigil::JwtSvidValidator::new("ehr-fhir")
        .validate(&token, &src.bundles(), SystemTime::now())
        .unwrap();
    assert_eq!(ok.spiffe_id().as_str(), id);
    // Roots that do not vouch for the server: refused.
    let err = sigil::http_source::HttpBundleSource::start_oidc(&issuer, td.clone(), Some(tls(&[])))
        .await
        .unwrap_err();
    assert!(
        matches!(err, sigil::http_source::HttpSourceError::Fetch(_)),
        "{err:?}"
    );

    // No issuer configured: no discovery document.
    let http = format!("127.0.0.1:{}", free_port());
    let _plain = Sigil::start_with(&["--http-listen", &http]);
    let err = sigil::http_source::HttpBundleSource::start_oidc(&format!("http://{http}"), td, None)
        .await
        .unwrap_err();
    assert_eq!(err, sigil::http_source::HttpSourceError::Status(404));
}
