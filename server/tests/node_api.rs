//! End-to-end: the real `sigil-server` binary, the admin API over its Unix
//! socket, the node API over real TLS 1.3, and validation of what it mints
//! with the `sigil` library.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use rustls_pki_types::CertificateDer;
use sigil::proto::admin::v1 as admin;
use sigil::proto::node::v1 as node;
use sigil::validate::x509::ExactId;
use sigil::{Bundle, BundleSet, JwtSvidValidator, SpiffeId, TrustDomain, verify_x509_svid};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::SystemTime;

async fn bundle_set(c: &mut node::node_client::NodeClient<tonic::transport::Channel>) -> BundleSet {
    let b = c
        .fetch_bundle(node::FetchBundleRequest {})
        .await
        .unwrap()
        .into_inner();
    let bundle =
        Bundle::from_spiffe_json(TrustDomain::new(TD).unwrap(), b.bundle.as_bytes()).unwrap();
    [bundle].into_iter().collect()
}

async fn create_entry(server: &Server, agent: &str, id: &str, auds: &[&str]) -> admin::Entry {
    server
        .admin()
        .await
        .create_entry(admin::CreateEntryRequest {
            spiffe_id: id.into(),
            parent_id: agent.into(),
            selectors: vec!["unix:uid:1000".into()],
            audiences: auds.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test]
async fn attest_then_mint_and_validate_x509_and_jwt_svids() {
    let server = Server::start();
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&server.admin_socket)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "admin socket mode");
    let ca = ca_cert(&server).await;
    let agent = attest(&server, &ca).await;
    assert!(agent.id.starts_with("spiffe://example.org/agent/join/"));

    // The agent SVID itself verifies as an X.509-SVID of the trust domain.
    let mut c = agent.client(&server, &ca, Arc::default()).await;
    let bundles = bundle_set(&mut c).await;
    let agent_id = SpiffeId::parse(&agent.id).unwrap();
    verify_x509_svid(
        &agent.chain,
        &bundles,
        SystemTime::now(),
        &ExactId(agent_id.clone()),
    )
    .unwrap();

    let workload = "spiffe://example.org/ai/scheduler";
    let e = create_entry(&server, &agent.id, workload, &["ehr-fhir", "calendar"]).await;

    // Incremental sync: everything, then nothing new, then the delete.
    let s1 = c
        .sync_entries(node::SyncEntriesRequest { since_revision: 0 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s1.entries.len(), 1);
    assert_eq!(s1.entries[0].id, e.id);
    assert_eq!(s1.entries[0].audiences, ["ehr-fhir", "calendar"]);
    let s2 = c
        .sync_entries(node::SyncEntriesRequest {
            since_revision: s1.revision,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(s2.entries.is_empty() && s2.deleted_entry_ids.is_empty());

    // X.509-SVID for a workload key.
    let wkey = Key::new();
    let r = c
        .sign_x509_svids(node::SignX509SvidsRequest {
            requests: vec![
                node::X509SvidRequest {
                    entry_id: e.id.clone(),
                    public_key: wkey.spki(),
                    ..Default::default()
                },
                node::X509SvidRequest {
                    entry_id: "nope".into(),
                    public_key: wkey.spki(),
                    ..Default::default()
                },
            ],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.results.len(), 2);
    assert_eq!(r.results[0].error, "");
    assert_eq!(r.results[0].spiffe_id, workload);
    assert!(!r.results[1].error.is_empty());
    let chain: Vec<CertificateDer<'static>> = r.results[0]
        .cert_chain
        .iter()
        .cloned()
        .map(CertificateDer::from)
        .collect();
    let v = verify_x509_svid(
        &chain,
        &bundles,
        SystemTime::now(),
        &ExactId(SpiffeId::parse(workload).unwrap()),
    )
    .unwrap();
    let ttl = v.not_after() - r.results[0].expires_at;
    assert_eq!(ttl, 0);
    // openssl agrees: the leaf chains to the CA for client and server use.
    let tmp = tempfile::tempdir().unwrap();
    let pem = |c: &[u8]| {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD.encode(c);
        let lines: Vec<&str> = b64
            .as_bytes()
            .chunks(64)
            .map(|l| std::str::from_utf8(l).unwrap())
            .collect();
        format!(
            "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
            lines.join("\n")
        )
    };
    std::fs::write(tmp.path().join("ca.pem"), pem(&ca)).unwrap();
    std::fs::write(tmp.path().join("leaf.pem"), pem(&chain[0])).unwrap();
    for purpose in ["sslclient", "sslserver"] {
        let out = std::process::Command::new("openssl")
            .args([
                "verify", "-CAfile", "ca.pem", "-purpose", purpose, "leaf.pem",
            ])
            .current_dir(tmp.path())
            .output()
            .expect("openssl must be installed for this test");
        assert!(
            out.status.success(),
            "openssl verify: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // And the key matches: the library's X509Svid accepts chain + key.
    sigil::X509Svid::new(
        chain.clone(),
        sigil::PrivateKey::from_pkcs8_der(wkey.pkcs8()),
    )
    .unwrap();

    // JWT-SVID for an allowed audience validates with the library.
    let j = c
        .mint_jwt_svid(node::MintJwtSvidRequest {
            spiffe_id: workload.into(),
            audience: "ehr-fhir".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let verified = JwtSvidValidator::new("ehr-fhir")
        .validate(&j.token, &bundles, SystemTime::now())
        .unwrap();
    assert_eq!(verified.spiffe_id().as_str(), workload);
    assert_eq!(verified.audience(), ["ehr-fhir"]);
    assert_eq!(verified.assurance(), Some(sigil::AssuranceLevel::Al1));
    assert_eq!(verified.amr(), ["join_token", "peercred"]);
    assert_eq!(verified.expiry(), j.expires_at);
    // The token is for ehr-fhir only.
    assert!(
        JwtSvidValidator::new("calendar")
            .validate(&j.token, &bundles, SystemTime::now())
            .is_err()
    );

    // A disallowed audience: PermissionDenied and an audit line.
    let denied = c
        .mint_jwt_svid(node::MintJwtSvidRequest {
            spiffe_id: workload.into(),
            audience: "payments".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);
    // An ID that has no entry under this agent: also refused.
    let denied = c
        .mint_jwt_svid(node::MintJwtSvidRequest {
            spiffe_id: "spiffe://example.org/someone/else".into(),
            audience: "ehr-fhir".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);

    let lines = server.audit_lines();
    let refusal = lines
        .iter()
        .find(|l| l["method"] == "node.MintJwtSvid" && l["audience"] == "payments")
        .expect("audit line for the refusal");
    assert_eq!(refusal["outcome"], "denied");
    assert_eq!(refusal["caller"], agent.id.as_str());
    assert_eq!(refusal["spiffe_id"], workload);
    assert_eq!(refusal["assurance"], "sigil:al1");
    assert!(refusal["reason"].as_str().unwrap().contains("audience"));
    let mint = lines
        .iter()
        .find(|l| l["method"] == "node.MintJwtSvid" && l["outcome"] == "ok")
        .unwrap();
    assert_eq!(mint["jti"], verified.jti().unwrap());
    assert!(lines.iter().any(|l| l["method"] == "node.SignX509Svids"
        && l["outcome"] == "ok"
        && l["spiffe_id"] == workload));
    assert!(
        lines
            .iter()
            .any(|l| l["method"] == "node.Attest" && l["outcome"] == "ok")
    );
    // Never a token in the log.
    let raw = std::fs::read_to_string(server.audit_log()).unwrap();
    assert!(!raw.contains(&j.token));

    // Deleting the entry shows up in the next incremental sync.
    server
        .admin()
        .await
        .delete_entry(admin::DeleteEntryRequest { id: e.id.clone() })
        .await
        .unwrap();
    let s3 = c
        .sync_entries(node::SyncEntriesRequest {
            since_revision: s2.revision,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s3.deleted_entry_ids, vec![e.id.clone()]);
    assert!(s3.revision > s2.revision);
}

#[tokio::test]
async fn calls_without_a_current_agent_svid_are_refused() {
    let server = Server::start();
    let ca = ca_cert(&server).await;
    // No client certificate.
    let mut anon = node_channel(server.addr, &ca, None, Arc::default())
        .await
        .unwrap();
    let err = anon
        .fetch_bundle(node::FetchBundleRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    // grpc.health.v1 answers without a client certificate.
    let ch = tls_channel(server.addr, &ca, None, Arc::default())
        .await
        .unwrap();
    let health = tonic_health::pb::health_client::HealthClient::new(ch)
        .check(tonic_health::pb::HealthCheckRequest {
            service: "sigil.node.v1.Node".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        health.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    // A spent token cannot attest again; a bogus one never could.
    let mut admin = server.admin().await;
    let t = admin
        .create_join_token(admin::CreateJoinTokenRequest { ttl_seconds: 60 })
        .await
        .unwrap()
        .into_inner();
    // 64 lowercase hex digits: never starts with `-`, so it is never taken
    // for a flag on the agent's command line.
    assert!(
        t.token.len() == 64
            && t.token
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
        "{}",
        t.token
    );
    let k = Key::new();
    let req = |token: String| node::AttestRequest {
        method: Some(node::attest_request::Method::JoinToken(
            node::JoinTokenAttestation { token },
        )),
        public_key: k.spki(),
    };
    anon.attest(req(t.token.clone())).await.unwrap();
    let again = anon.attest(req(t.token.clone())).await.unwrap_err();
    assert_eq!(again.code(), tonic::Code::PermissionDenied);
    let bogus = anon.attest(req("bogus".into())).await.unwrap_err();
    assert_eq!(bogus.code(), tonic::Code::PermissionDenied);

    // Renewal makes the old SVID stop working, on the same connection.
    let agent = attest(&server, &ca).await;
    let connects = Arc::new(AtomicUsize::new(0));
    let mut c = agent.client(&server, &ca, connects.clone()).await;
    let new_key = Key::new();
    let renewed = c
        .renew_agent(node::RenewAgentRequest {
            public_key: new_key.spki(),
        })
        .await
        .unwrap()
        .into_inner()
        .svid
        .unwrap();
    assert_eq!(renewed.spiffe_id, agent.id);
    let stale = c
        .fetch_bundle(node::FetchBundleRequest {})
        .await
        .unwrap_err();
    assert_eq!(stale.code(), tonic::Code::PermissionDenied);
    let fresh = Agent {
        id: agent.id.clone(),
        chain: renewed
            .cert_chain
            .into_iter()
            .map(CertificateDer::from)
            .collect(),
        key: new_key,
    };
    let mut c2 = fresh.client(&server, &ca, Arc::default()).await;
    c2.fetch_bundle(node::FetchBundleRequest {}).await.unwrap();
    assert_eq!(connects.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn eviction_and_ban_apply_to_already_open_connections() {
    let server = Server::start();
    let ca = ca_cert(&server).await;
    for ban in [false, true] {
        let agent = attest(&server, &ca).await;
        let connects = Arc::new(AtomicUsize::new(0));
        let mut c = agent.client(&server, &ca, connects.clone()).await;
        c.fetch_bundle(node::FetchBundleRequest {}).await.unwrap();
        let req = admin::GetAgentRequest {
            spiffe_id: agent.id.clone(),
        };
        let mut admin = server.admin().await;
        let a = if ban {
            admin.ban_agent(req).await
        } else {
            admin.evict_agent(req).await
        }
        .unwrap()
        .into_inner();
        assert_eq!(a.status, if ban { "banned" } else { "evicted" });
        // Same channel, same TLS connection: the next call fails.
        let err = c
            .fetch_bundle(node::FetchBundleRequest {})
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied, "ban={ban}");
        let err = c
            .renew_agent(node::RenewAgentRequest {
                public_key: Key::new().spki(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        assert_eq!(connects.load(Ordering::SeqCst), 1, "one connection only");
        // A new connection does not help either.
        let mut c2 = agent.client(&server, &ca, Arc::default()).await;
        assert!(c2.fetch_bundle(node::FetchBundleRequest {}).await.is_err());
    }
    let listed = server
        .admin()
        .await
        .list_agents(admin::ListAgentsRequest {})
        .await
        .unwrap()
        .into_inner();
    let mut statuses: Vec<_> = listed.agents.iter().map(|a| a.status.clone()).collect();
    statuses.sort();
    assert_eq!(statuses, ["banned", "evicted"]);
    assert!(server.audit_lines().iter().any(
        |l| l["outcome"] == "denied" && l["reason"].as_str().unwrap_or("").contains("evicted")
    ));
}

#[tokio::test]
async fn fifty_concurrent_attestations_with_one_token_have_one_winner() {
    let server = Server::start();
    let ca = ca_cert(&server).await;
    let token = server
        .admin()
        .await
        .create_join_token(admin::CreateJoinTokenRequest { ttl_seconds: 600 })
        .await
        .unwrap()
        .into_inner()
        .token;
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let token = token.clone();
        let ca = ca.clone();
        let addr = server.addr;
        tasks.push(tokio::spawn(async move {
            let mut c = node_channel(addr, &ca, None, Arc::default()).await.unwrap();
            c.attest(node::AttestRequest {
                method: Some(node::attest_request::Method::JoinToken(
                    node::JoinTokenAttestation { token },
                )),
                public_key: Key::new().spki(),
            })
            .await
        }));
    }
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(s) => assert_eq!(s.code(), tonic::Code::PermissionDenied),
        }
    }
    assert_eq!(ok, 1);
    let lines = server.audit_lines();
    let attests: Vec<_> = lines
        .iter()
        .filter(|l| l["method"] == "node.Attest")
        .collect();
    assert_eq!(attests.iter().filter(|l| l["outcome"] == "ok").count(), 1);
    let reuse = attests
        .iter()
        .filter(|l| l["outcome"] == "denied" && l["reason"].as_str().unwrap().contains("reuse"))
        .count();
    assert_eq!(reuse, 49);
    // The token itself is never logged.
    assert!(
        !std::fs::read_to_string(server.audit_log())
            .unwrap()
            .contains(&token)
    );
}

#[tokio::test]
async fn kill_9_keeps_state_and_missing_ca_key_refuses_start() {
    let mut server = Server::start();
    let ca = ca_cert(&server).await;
    let agent = attest(&server, &ca).await;
    let e = create_entry(&server, &agent.id, "spiffe://example.org/w", &["a"]).await;
    let spent = server
        .admin()
        .await
        .create_join_token(admin::CreateJoinTokenRequest { ttl_seconds: 600 })
        .await
        .unwrap()
        .into_inner()
        .token;
    let mut anon = node_channel(server.addr, &ca, None, Arc::default())
        .await
        .unwrap();
    let attest_req = |token: String| node::AttestRequest {
        method: Some(node::attest_request::Method::JoinToken(
            node::JoinTokenAttestation { token },
        )),
        public_key: Key::new().spki(),
    };
    anon.attest(attest_req(spent.clone())).await.unwrap();
    let mut c = agent.client(&server, &ca, Arc::default()).await;
    let j = c
        .mint_jwt_svid(node::MintJwtSvidRequest {
            spiffe_id: "spiffe://example.org/w".into(),
            audience: "a".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();

    // kill -9 in the middle of a mint loop.
    let mut looper = agent.client(&server, &ca, Arc::default()).await;
    let minting = tokio::spawn(async move {
        let mut tokens = Vec::new();
        while let Ok(r) = looper
            .mint_jwt_svid(node::MintJwtSvidRequest {
                spiffe_id: "spiffe://example.org/w".into(),
                audience: "a".into(),
                ..Default::default()
            })
            .await
        {
            tokens.push(r.into_inner().token);
        }
        tokens
    });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    server.kill();
    let minted = minting.await.unwrap();
    assert!(!minted.is_empty());
    server.spawn_and_wait();

    // Same CA, entry still there, spent token still spent, agent still works,
    // JWT minted before the kill still validates against the bundle.
    assert_eq!(ca_cert(&server).await, ca);
    let got = server
        .admin()
        .await
        .get_entry(admin::GetEntryRequest { id: e.id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.spiffe_id, "spiffe://example.org/w");
    let mut anon = node_channel(server.addr, &ca, None, Arc::default())
        .await
        .unwrap();
    let err = anon.attest(attest_req(spent)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    let mut c = agent.client(&server, &ca, Arc::default()).await;
    let bundles = bundle_set(&mut c).await;
    JwtSvidValidator::new("a")
        .validate(&j.token, &bundles, SystemTime::now())
        .unwrap();
    let jti = JwtSvidValidator::new("a")
        .validate(&j.token, &bundles, SystemTime::now())
        .unwrap()
        .jti()
        .unwrap()
        .to_owned();
    let lines = server.audit_lines();
    assert!(lines.iter().any(|l| l["jti"] == jti.as_str()));
    // Every token returned before the kill validates and has an audit line.
    let logged: std::collections::HashSet<&str> =
        lines.iter().filter_map(|l| l["jti"].as_str()).collect();
    for t in &minted {
        let v = JwtSvidValidator::new("a")
            .validate(t, &bundles, SystemTime::now())
            .unwrap();
        assert!(logged.contains(v.jti().unwrap()), "unlogged jti");
    }

    // Delete the CA key from the stopped server's database: it refuses to
    // start and says why, and does not make a new CA.
    server.kill();
    {
        let db = sled::open(server.data_dir().join("db")).unwrap();
        db.open_tree("x509_cas").unwrap().clear().unwrap();
        db.flush().unwrap();
    }
    let out = server.command().output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("CA key is missing"), "{stderr}");
    assert!(stderr.contains("refusing to start"), "{stderr}");
}

#[tokio::test]
async fn http_endpoint_serves_bundle_keys_oidc_health_and_metrics() {
    let server = Server::start();
    let ca = ca_cert(&server).await;
    // One attestation, so /metrics has something to count.
    attest(&server, &ca).await;
    let (st, body) = server.http_get("/bundle");
    assert_eq!(st, 200);
    let b = Bundle::from_spiffe_json(TrustDomain::new(TD).unwrap(), body.as_bytes()).unwrap();
    assert_eq!(b.x509.authorities()[0], ca);
    assert_eq!(b.jwt.keys().count(), 1);
    let (st, body) = server.http_get("/keys");
    assert_eq!(st, 200);
    let jwks = sigil::JwtBundle::from_jwks(TrustDomain::new(TD).unwrap(), body.as_bytes()).unwrap();
    assert_eq!(jwks.keys().count(), 1);
    let (st, body) = server.http_get("/.well-known/openid-configuration");
    assert_eq!(st, 200);
    let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(doc["issuer"], "https://sigil.example.org");
    assert_eq!(doc["jwks_uri"], "https://sigil.example.org/keys");
    assert_eq!(server.http_get("/live").0, 200);
    assert_eq!(server.http_get("/ready").0, 200);
    assert_eq!(server.http_get("/nope").0, 404);
    let (st, metrics) = server.http_get("/metrics");
    assert_eq!(st, 200);
    assert!(
        metrics.contains("sigil_events_total{method=\"node.Attest\",outcome=\"ok\"} 1"),
        "{metrics}"
    );
}

/// A resumed TLS 1.3 session carries no client certificate: the verifier
/// would not see it again against the current bundle. The node API does
/// full handshakes only, even for a client that offers to resume.
#[tokio::test]
async fn node_api_never_resumes_tls_sessions() {
    use tokio::io::AsyncReadExt;
    let server = Server::start();
    let ca = ca_cert(&server).await;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca).unwrap();
    // rustls clients keep session tickets and offer them by default.
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    for i in 0..3 {
        let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let mut tls = connector.connect(name, tcp).await.unwrap();
        assert_eq!(
            tls.get_ref().1.handshake_kind(),
            Some(rustls::HandshakeKind::Full),
            "connection {i}"
        );
        // Read what the server sends after the handshake (tickets, if it
        // issued any, and its HTTP/2 SETTINGS).
        let mut buf = [0u8; 256];
        let _ =
            tokio::time::timeout(std::time::Duration::from_millis(300), tls.read(&mut buf)).await;
    }
}
