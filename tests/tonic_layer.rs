//! `JwtSvidLayer` in front of a real tonic server (the gRPC health service)
//! over a real socket, with JWT-SVIDs minted by a real server and agent: a
//! token for this tool is admitted and its caller reaches the service; a
//! token for another tool, none, or a valid one the policy refuses get the
//! gRPC answer gRPC clients expect (HTTP 200, trailers-only, `grpc-status`
//! 16 UNAUTHENTICATED or 7 PERMISSION_DENIED), for unary and streaming
//! calls.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
use common::*;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use sigil::layer::{JwtSvidLayer, PolicySet};
use sigil::source::BundleSource;
use sigil::workload::WorkloadJwtBundleSource;
use sigil::{AssuranceLevel, VerifiedJwtSvid};
use std::sync::{Arc, Mutex};
use tonic::Code;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};

/// A tonic server with the health service behind `layer`; the SPIFFE IDs
/// the inner service saw (from the request extensions) go to `seen`.
async fn serve<P: sigil::layer::Policy>(
    layer: JwtSvidLayer<P>,
    seen: Arc<Mutex<Vec<String>>>,
) -> u16 {
    let (_reporter, health) = tonic_health::server::health_reporter();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let record = tower::ServiceBuilder::new().layer(layer).map_request(
        move |req: http::Request<tonic::body::Body>| {
            let caller = req.extensions().get::<VerifiedJwtSvid>().unwrap();
            seen.lock().unwrap().push(caller.spiffe_id().to_string());
            req
        },
    );
    tokio::spawn(
        tonic::transport::Server::builder()
            .layer(record)
            .add_service(health)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    port
}

async fn client(
    port: u16,
    authorization: Option<String>,
) -> HealthClient<
    tonic::service::interceptor::InterceptedService<
        tonic::transport::Channel,
        impl tonic::service::Interceptor,
    >,
> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    HealthClient::with_interceptor(channel, move |mut req: tonic::Request<()>| {
        if let Some(a) = &authorization {
            req.metadata_mut()
                .insert("authorization", a.parse().unwrap());
        }
        Ok(req)
    })
}

/// One raw HTTP/2 gRPC request: the HTTP status, the response headers and
/// the body's length.
async fn raw_check(port: u16, authorization: Option<&str>) -> (u16, http::HeaderMap, usize) {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let mut req = http::Request::post(format!(
        "http://127.0.0.1:{port}/grpc.health.v1.Health/Check"
    ))
    .header("content-type", "application/grpc")
    .header("te", "trailers");
    if let Some(a) = authorization {
        req = req.header("authorization", a);
    }
    // An empty HealthCheckRequest: flag 0, length 0.
    let req = req
        .body(Full::new(Bytes::from_static(&[0, 0, 0, 0, 0])))
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    (parts.status.as_u16(), parts.headers, body.len())
}

#[tokio::test(flavor = "multi_thread")]
async fn tonic_server_behind_the_layer() {
    let s = Sigil::start();
    let id = s.register(
        "/workload/grpc",
        &["--audience", "ehr-fhir", "--audience", "calendar"],
    );
    s.wait_for_svid(&id).await;
    let c = s.client().await;
    let ehr = c.fetch_jwt_token(["ehr-fhir"], None).await.unwrap();
    let calendar = c.fetch_jwt_token(["calendar"], None).await.unwrap();
    let endpoint = sigil::endpoint::Endpoint::parse(&s.endpoint()).unwrap();
    let bundles: Arc<dyn BundleSource> =
        Arc::new(WorkloadJwtBundleSource::start(endpoint).await.unwrap());

    let seen = Arc::new(Mutex::new(Vec::new()));
    let port = serve(JwtSvidLayer::new("ehr-fhir", bundles.clone()), seen.clone()).await;

    // A token for this tool: the call goes through, and the service sees
    // the verified caller.
    let ok = client(port, Some(format!("Bearer {ehr}")))
        .await
        .check(HealthCheckRequest::default())
        .await
        .unwrap();
    assert_eq!(ok.into_inner().status(), ServingStatus::Serving);
    assert_eq!(*seen.lock().unwrap(), vec![id.clone()]);

    // A token for another tool, a tampered one, none, another scheme:
    // UNAUTHENTICATED, unary and streaming; the service never runs.
    let mut forged = ehr.clone();
    forged.pop();
    forged.push(if ehr.ends_with('A') { 'B' } else { 'A' });
    for auth in [
        Some(format!("Bearer {calendar}")),
        Some(format!("Bearer {forged}")),
        None,
        Some(format!("Basic {ehr}")),
    ] {
        let mut c = client(port, auth.clone()).await;
        let err = c.check(HealthCheckRequest::default()).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{auth:?}: {err:?}");
        assert_eq!(err.message(), "invalid or missing JWT-SVID");
        let err = c.watch(HealthCheckRequest::default()).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{auth:?}: {err:?}");
    }
    assert_eq!(seen.lock().unwrap().len(), 1);

    // On the wire: HTTP 200, a trailers-only gRPC answer, no
    // WWW-Authenticate and no token echoed.
    let (status, headers, body) = raw_check(port, Some(&format!("Bearer {calendar}"))).await;
    assert_eq!(status, 200);
    assert_eq!(body, 0);
    assert_eq!(headers["grpc-status"], "16");
    assert_eq!(headers["content-type"], "application/grpc");
    assert!(headers.get("www-authenticate").is_none());
    assert!(!format!("{headers:?}").contains(&calendar));
    let (status, headers, body) = raw_check(port, Some(&format!("Bearer {ehr}"))).await;
    assert_eq!(status, 200);
    assert!(
        headers.get("grpc-status").is_none(),
        "status is in trailers"
    );
    assert!(body > 5, "a HealthCheckResponse");
    assert_eq!(seen.lock().unwrap().len(), 2);

    // A valid token below the tool's assurance floor: PERMISSION_DENIED.
    let strict = JwtSvidLayer::new("ehr-fhir", bundles)
        .with_policy(PolicySet::new().min_assurance(AssuranceLevel::Al2));
    let port = serve(strict, seen.clone()).await;
    let err = client(port, Some(format!("Bearer {ehr}")))
        .await
        .check(HealthCheckRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert_eq!(err.message(), "caller not allowed");
    let (status, headers, body) = raw_check(port, Some(&format!("Bearer {ehr}"))).await;
    assert_eq!((status, body), (200, 0));
    assert_eq!(headers["grpc-status"], "7");
    assert_eq!(
        seen.lock().unwrap().len(),
        2,
        "the service ran for a refused call"
    );
}
