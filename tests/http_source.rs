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
