//! End to end: the real `sigil-server`, `sigil-agent` and `sigil` binaries,
//! real sockets, temp dirs, free ports; workloads use the unmodified Rust
//! `spiffe` crate. Processes are killed on drop.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use spiffe::WorkloadApiError;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

mod common;
use common::*;

fn status_code(e: &WorkloadApiError) -> Option<spiffe::transport::GrpcStatusCode> {
    match e {
        WorkloadApiError::Transport(spiffe::transport::TransportError::Status(s)) => Some(s.code()),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn workloads_get_svids_through_real_server_and_agent() {
    let s = Sigil::start();
    let id = s.register(
        "/workload/triage",
        &["--audience", "ehr-fhir", "--audience", "calendar"],
    );
    let svid = s.wait_for_svid(&id).await;

    // The X.509-SVID verifies under Sigil's strict verifier with the
    // server's published bundle, and with openssl.
    let chain: Vec<rustls_pki_types::CertificateDer<'static>> = svid
        .cert_chain()
        .iter()
        .map(|c| c.as_bytes().to_vec().into())
        .collect();
    let bundles = s.server_bundle();
    let v = sigil::verify_x509_svid(
        &chain,
        &bundles,
        SystemTime::now(),
        &sigil::validate::x509::AnyId,
    )
    .unwrap();
    assert_eq!(v.spiffe_id().as_str(), id);
    let out = s.dir.path().join("svid");
    s.cli_ok(&["fetch", "x509", "--out", out.to_str().unwrap()]);
    let o = Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(out.join("bundle.pem"))
        .arg(out.join("svid.pem"))
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "openssl verify: {}",
        String::from_utf8_lossy(&o.stderr)
    );

    // A JWT-SVID for an allowed tool: exactly that audience, and it
    // validates with the library against the server's bundle.
    let client = s.client().await;
    let jwt = client.fetch_jwt_svid(["ehr-fhir"], None).await.unwrap();
    assert_eq!(jwt.audience(), ["ehr-fhir"]);
    let ok = sigil::JwtSvidValidator::new("ehr-fhir")
        .validate(jwt.token(), &bundles, SystemTime::now())
        .unwrap();
    assert_eq!(ok.spiffe_id().as_str(), id);
    assert_eq!(ok.acr(), Some("sigil:al1"));
    // …not for the other tool.
    assert!(
        sigil::JwtSvidValidator::new("calendar")
            .validate(jwt.token(), &bundles, SystemTime::now())
            .is_err()
    );
    // ValidateJWTSVID through the agent.
    let v = client
        .validate_jwt_token("ehr-fhir", jwt.token())
        .await
        .unwrap();
    assert_eq!(v.spiffe_id().to_string(), id);

    // A tool the entry does not list: PermissionDenied, and the server's
    // audit log has nothing minted for it.
    let err = client.fetch_jwt_svid(["payments"], None).await.unwrap_err();
    assert!(
        matches!(err, WorkloadApiError::PermissionDenied(_)),
        "{err:?}"
    );
    let audit = std::fs::read_to_string(s.dir.path().join("server/audit.log")).unwrap();
    assert!(audit.contains("\"audience\":\"ehr-fhir\""));
    assert!(!audit.contains("\"audience\":\"payments\""));
    let agent_audit = std::fs::read_to_string(s.dir.path().join("agent/data/audit.log")).unwrap();
    assert!(
        agent_audit
            .lines()
            .any(|l| l.contains("\"payments\"") && l.contains("\"denied\""))
    );

    // Without the `workload.spiffe.io` header: InvalidArgument (sigil's
    // generated client adds no header by itself).
    let path = s.api_socket();
    let channel = tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(path).await?,
                ))
            }
        }))
        .await
        .unwrap();
    let mut raw =
        sigil::proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient::new(channel);
    let err = raw
        .fetch_jwtsvid(sigil::proto::workload::JwtsvidRequest {
            audience: vec!["ehr-fhir".into()],
            spiffe_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);

    // A process of another user gets nothing of this user's identity.
    if rustix_uid() == 0 {
        use std::os::unix::fs::PermissionsExt;
        use std::os::unix::process::CommandExt;
        let pub_dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(pub_dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let cli = pub_dir.path().join("sigil");
        std::fs::copy(bin("sigil", "sigil-cli"), &cli).unwrap();
        std::fs::set_permissions(s.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        for what in [
            &["fetch", "jwt", "--audience", "ehr-fhir"][..],
            &["fetch", "x509"][..],
        ] {
            let o = Command::new(&cli)
                .args(what)
                .env("SPIFFE_ENDPOINT_SOCKET", s.endpoint())
                .uid(65534)
                .gid(65534)
                .output()
                .unwrap();
            assert_eq!(o.status.code(), Some(1), "{what:?}");
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(err.contains("PermissionDenied"), "{what:?}: {err}");
        }
    }

    // The sigil CLI over $SPIFFE_ENDPOINT_SOCKET.
    let token = s.cli_ok(&["fetch", "jwt", "--audience", "calendar"]);
    assert_eq!(token.trim().split('.').count(), 3);
    let o = s.cli(&["fetch", "jwt", "--audience", "payments"]);
    assert_eq!(o.status.code(), Some(1));
}

#[tokio::test(flavor = "multi_thread")]
async fn server_outage_restart_and_rotation() {
    // Short agent SVIDs, so renewal happens during the test.
    let mut s = Sigil::start_with(&["--agent-svid-ttl", "40s"]);
    let serial = |s: &Sigil| {
        let v: serde_json::Value =
            serde_json::from_str(&s.cli_ok(&["agent", "show", &s.agent_id, "--output", "json"]))
                .unwrap();
        v["serial"].as_str().unwrap().to_owned()
    };
    let first_serial = serial(&s);
    let id = s.register(
        "/workload/scheduler",
        &[
            "--audience",
            "ehr-fhir",
            "--audience",
            "calendar",
            "--x509-ttl",
            "60s",
        ],
    );
    let first = s.wait_for_svid(&id).await;
    let client = s.client().await;
    let jwt = client.fetch_jwt_token(["ehr-fhir"], None).await.unwrap();

    // Server down: cached SVIDs are served at once; a JWT for an audience
    // never requested before is Unavailable.
    s.server.kill();
    for _ in 0..5 {
        let t = Instant::now();
        let ctx = client.fetch_x509_context().await.unwrap();
        assert!(
            t.elapsed() < Duration::from_millis(50),
            "X.509 fetch took {:?}",
            t.elapsed()
        );
        assert_eq!(ctx.default_svid().unwrap().spiffe_id().to_string(), id);
        let t = Instant::now();
        assert_eq!(
            client.fetch_jwt_token(["ehr-fhir"], None).await.unwrap(),
            jwt
        );
        assert!(
            t.elapsed() < Duration::from_millis(50),
            "JWT fetch took {:?}",
            t.elapsed()
        );
    }
    let err = client.fetch_jwt_svid(["calendar"], None).await.unwrap_err();
    assert_eq!(
        status_code(&err),
        Some(spiffe::transport::GrpcStatusCode::Unavailable),
        "{err:?}"
    );

    // Agent restart while the server is still down: the persisted cache is
    // served within a second, without a join token.
    s.agent.kill();
    let t = Instant::now();
    s.start_agent(None);
    let ctx = s.client().await.fetch_x509_context().await.unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "restart took {:?}",
        t.elapsed()
    );
    assert_eq!(ctx.default_svid().unwrap().spiffe_id().to_string(), id);

    // Server back: the stream resumes and rotation goes on — with a 60 s
    // TTL the X.509 stream pushes a new SVID before the old one expires.
    s.start_server();
    let client = s.client().await;
    let mut stream = client.stream_x509_contexts().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(50);
    let rotated = loop {
        let next = tokio::time::timeout(Duration::from_secs(50), futures_next(&mut stream))
            .await
            .expect("no X.509 update")
            .unwrap()
            .unwrap();
        let svid = next.default_svid().unwrap().clone();
        if svid.leaf().as_bytes() != first.leaf().as_bytes() {
            break svid;
        }
        assert!(Instant::now() < deadline, "no rotation");
    };
    let not_after = |c: &[u8]| {
        x509_parser::parse_x509_certificate(c)
            .unwrap()
            .1
            .validity()
            .not_after
            .timestamp()
    };
    assert!(not_after(rotated.leaf().as_bytes()) > not_after(first.leaf().as_bytes()));
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(
        now < not_after(first.leaf().as_bytes()),
        "rotated only after the old SVID expired"
    );
    // New mints work again.
    client.fetch_jwt_svid(["calendar"], None).await.unwrap();
    // And the agent renewed its own SVID (40 s TTL) once the server was back.
    assert_ne!(serial(&s), first_serial, "agent SVID was not renewed");
}

async fn futures_next<S: futures::Stream + Unpin>(s: &mut S) -> Option<S::Item> {
    use futures::StreamExt;
    s.next().await
}
