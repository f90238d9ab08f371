//! The Workload API end to end, in process: a real Unix socket in a temp
//! dir, real peer credentials and `/proc` attestation, a real in-process CA
//! ([`LocalCa`]), and the unmodified Rust `spiffe` crate as the client.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use sigil::proto::workload as pb;
use sigil_agent::audit::{AuditEvent, MemoryAudit, Outcome};
use sigil_agent::entry::{AuthorizedAudience, RegistrationEntry};
use sigil_agent::identity::{IdentitySnapshot, IdentitySource, MintedJwtSvid, SourceError};
use sigil_agent::jwt_cache::JwtSvidCache;
use sigil_agent::local_ca::{LocalCa, LocalCaConfig, RotationTask};
use sigil_agent::selector::Selector;
use sigil_agent::workload_api::{WorkloadApi, bind_socket};
use sigil_agent::workload_attest::UnixAttestor;
use spiffe::{JwtSvid, WorkloadApiClient, WorkloadApiError};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};
use tokio::sync::oneshot;
use tokio_stream::StreamExt;
use tonic::transport::Channel;

const TD: &str = "example.org";
const WORKLOAD: &str = "spiffe://example.org/ai/triage-agent";
const NOBODY: &str = "spiffe://example.org/ai/nobody-agent";
const NOBODY_UID: u32 = 65534;
const CHILD_ENV: &str = "SIGIL_AGENT_TEST_CHILD_SOCKET";

fn my_uid() -> u32 {
    rustix::process::geteuid().as_raw()
}

/// One attestor for the whole test binary, so the test executable is hashed
/// once.
fn attestor() -> Arc<UnixAttestor> {
    static A: OnceLock<Arc<UnixAttestor>> = OnceLock::new();
    A.get_or_init(|| Arc::new(UnixAttestor::default())).clone()
}

fn entry(id: &str, spiffe_id: &str, selector: &str, audiences: &[&str]) -> RegistrationEntry {
    let mut e = RegistrationEntry::new(
        id,
        sigil::SpiffeId::parse(spiffe_id).unwrap(),
        vec![Selector::parse(selector).unwrap()],
    );
    e.audiences = audiences.iter().map(|s| s.to_string()).collect();
    e
}

/// The default registration: this test process's uid gets WORKLOAD, allowed
/// two tools.
fn my_entry() -> RegistrationEntry {
    entry(
        "e-triage",
        WORKLOAD,
        &format!("unix:uid:{}", my_uid()),
        &["ehr-fhir", "calendar"],
    )
}

struct Agent {
    _dir: tempfile::TempDir,
    socket: PathBuf,
    ca: LocalCa,
    audit: Arc<MemoryAudit>,
    _rotation: RotationTask,
    shutdown: Option<oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<()>>,
}

impl Agent {
    async fn start(entries: Vec<RegistrationEntry>) -> Self {
        Self::start_with(entries, |ca| Arc::new(ca)).await
    }

    async fn start_with(
        entries: Vec<RegistrationEntry>,
        wrap: impl FnOnce(LocalCa) -> Arc<dyn IdentitySource>,
    ) -> Self {
        Self::start_configured(entries, wrap, |api| api).await
    }

    /// Starts with the source `wrap` builds around the CA, and the API as
    /// `configure` sets it up.
    async fn start_configured(
        entries: Vec<RegistrationEntry>,
        wrap: impl FnOnce(LocalCa) -> Arc<dyn IdentitySource>,
        configure: impl FnOnce(WorkloadApi) -> WorkloadApi,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        // Other users (the setuid child) must reach the socket.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let socket = dir.path().join("public/api.sock");
        let ca = LocalCa::new(LocalCaConfig::new(sigil::TrustDomain::new(TD).unwrap())).unwrap();
        ca.set_entries(entries).unwrap();
        let rotation = ca.spawn_rotation();
        let audit = Arc::new(MemoryAudit::default());
        let api = configure(WorkloadApi::new(
            wrap(ca.clone()),
            attestor(),
            audit.clone(),
        ));
        let listener = bind_socket(&socket).unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            api.serve(listener, async {
                let _ = rx.await;
            })
            .await
            .unwrap();
        });
        Self {
            _dir: dir,
            socket,
            ca,
            audit,
            _rotation: rotation,
            shutdown: Some(tx),
            server: Some(server),
        }
    }

    fn endpoint(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    async fn client(&self) -> WorkloadApiClient {
        WorkloadApiClient::connect_to(self.endpoint())
            .await
            .unwrap()
    }

    /// Sigil's generated client, which adds no header by itself.
    async fn raw_client(&self) -> pb::spiffe_workload_api_client::SpiffeWorkloadApiClient<Channel> {
        pb::spiffe_workload_api_client::SpiffeWorkloadApiClient::new(
            raw_channel(&self.socket).await,
        )
    }

    fn events(&self, rpc: &str) -> Vec<AuditEvent> {
        self.audit
            .events()
            .into_iter()
            .filter(|e| e.rpc == rpc)
            .collect()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

async fn raw_channel(path: &Path) -> Channel {
    raw_channel_result(path).await.unwrap()
}

fn with_header<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut()
        .insert("workload.spiffe.io", "true".parse().unwrap());
    r
}

fn status_code(e: &WorkloadApiError) -> Option<tonic::Code> {
    match e {
        WorkloadApiError::NoIdentityIssued | WorkloadApiError::PermissionDenied(_) => {
            Some(tonic::Code::PermissionDenied)
        }
        e if e.is_invalid_argument() => Some(tonic::Code::InvalidArgument),
        _ => None,
    }
}

fn leaf_not_after(der: &[u8]) -> i64 {
    let (_, c) = x509_parser::parse_x509_certificate(der).unwrap();
    c.validity().not_after.timestamp()
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[tokio::test]
async fn x509_svid_and_bundle_with_the_spiffe_crate() {
    let agent = Agent::start(vec![my_entry()]).await;
    let client = agent.client().await;
    let ctx = client.fetch_x509_context().await.unwrap();
    let svid = ctx.default_svid().unwrap();
    assert_eq!(svid.spiffe_id().to_string(), WORKLOAD);
    assert_eq!(ctx.svids().len(), 1);

    // The bundle the agent served is the CA's, and the SVID chains to it
    // under Sigil's own strict verifier (leaf profile included).
    let td = spiffe::TrustDomain::new(TD).unwrap();
    let bundle = ctx.bundle_set().get(&td).unwrap();
    let ca_bundle = agent.ca.bundle();
    assert_eq!(
        bundle
            .authorities()
            .iter()
            .map(|c| c.as_bytes().to_vec())
            .collect::<Vec<_>>(),
        ca_bundle
            .x509
            .authorities()
            .iter()
            .map(|c| c.to_vec())
            .collect::<Vec<_>>()
    );
    let chain: Vec<rustls_pki_types::CertificateDer<'static>> = svid
        .cert_chain()
        .iter()
        .map(|c| rustls_pki_types::CertificateDer::from(c.as_bytes().to_vec()))
        .collect();
    let bundles: sigil::BundleSet = [ca_bundle].into_iter().collect();
    let verified = sigil::verify_x509_svid(
        &chain,
        &bundles,
        SystemTime::now(),
        &|_: &sigil::SpiffeId| true,
    )
    .unwrap();
    assert_eq!(verified.spiffe_id().as_str(), WORKLOAD);
    // The key is the leaf's (the crate parsed it as PKCS#8).
    let ours = sigil::X509Svid::from_der(
        &chain.iter().flat_map(|c| c.to_vec()).collect::<Vec<_>>(),
        svid.private_key().as_ref(),
    )
    .unwrap();
    assert!((ours.not_after() - unix_now() - 3600).abs() <= 5);

    // FetchX509Bundles agrees.
    let bundles = client.fetch_x509_bundles().await.unwrap();
    assert!(bundles.get(&td).is_some());

    let ev = agent.events("FetchX509SVID");
    assert_eq!(ev.len(), 1, "{ev:?}");
    assert_eq!(ev[0].outcome, Outcome::Allowed);
    assert_eq!(ev[0].spiffe_ids, [WORKLOAD]);
    assert_eq!(ev[0].pid, Some(std::process::id() as i32));
    assert_eq!(ev[0].uid, Some(my_uid()));
    assert_eq!(ev[0].method, "peercred");
    assert_eq!(ev[0].assurance.as_deref(), Some("sigil:al1"));
    // On Linux >= 6.5 the accept loop pins with SO_PEERPIDFD.
    let (probe, _peer) = std::os::unix::net::UnixStream::pair().unwrap();
    let have_pidfd =
        nix::sys::socket::getsockopt(&probe, nix::sys::socket::sockopt::PeerPidfd).is_ok();
    assert_eq!(
        ev[0].pin,
        Some(if have_pidfd { "pidfd" } else { "start_time" })
    );
    assert_eq!(
        ev[0].exe_path.as_deref(),
        Some(std::env::current_exe().unwrap().to_str().unwrap())
    );
    assert_eq!(ev[0].exe_sha256.as_ref().map(String::len), Some(64));
}

#[tokio::test]
async fn jwt_svid_for_an_allowed_audience_verifies_with_the_spiffe_crate() {
    let agent = Agent::start(vec![my_entry()]).await;
    let client = agent.client().await;
    let svid = client.fetch_jwt_svid(["ehr-fhir"], None).await.unwrap();
    assert_eq!(svid.spiffe_id().to_string(), WORKLOAD);
    assert_eq!(svid.audience(), ["ehr-fhir"]);

    // The JWT bundles, keyed by trust domain, verify it in the crate…
    let bundles = client.fetch_jwt_bundles().await.unwrap();
    let verified = JwtSvid::parse_and_validate(svid.token(), &bundles, &["ehr-fhir"]).unwrap();
    assert_eq!(verified.spiffe_id().to_string(), WORKLOAD);
    // …and not for another tool.
    assert!(JwtSvid::parse_and_validate(svid.token(), &bundles, &["calendar"]).is_err());

    // Sigil's hardened validator agrees, and sees the assurance claims.
    let snap_bundles: sigil::BundleSet = [agent.ca.bundle()].into_iter().collect();
    let v = sigil::JwtSvidValidator::new("ehr-fhir")
        .validate(svid.token(), &snap_bundles, SystemTime::now())
        .unwrap();
    assert_eq!(v.audience(), ["ehr-fhir"]);
    assert_eq!(v.acr(), Some("sigil:al1"));
    assert_eq!(v.amr(), ["join_token", "peercred"]);

    // Asking for our own SPIFFE ID explicitly works too.
    let id = spiffe::SpiffeId::new(WORKLOAD).unwrap();
    let again = client
        .fetch_jwt_svid(["calendar"], Some(&id))
        .await
        .unwrap();
    assert_eq!(again.audience(), ["calendar"]);

    let ev = agent.events("FetchJWTSVID");
    assert_eq!(ev.len(), 2);
    assert_eq!(ev[0].outcome, Outcome::Allowed);
    assert_eq!(ev[0].audience.as_deref(), Some("ehr-fhir"));
    assert_eq!(ev[0].entry_ids, ["e-triage"]);
}

#[tokio::test]
async fn validate_jwt_svid_through_the_agent() {
    let agent = Agent::start(vec![my_entry()]).await;
    let client = agent.client().await;
    let token = client.fetch_jwt_token(["ehr-fhir"], None).await.unwrap();
    let v = client.validate_jwt_token("ehr-fhir", &token).await.unwrap();
    assert_eq!(v.spiffe_id().to_string(), WORKLOAD);

    // Wrong audience, garbage, and a token from another CA: InvalidArgument.
    let other = LocalCa::new(LocalCaConfig::new(sigil::TrustDomain::new(TD).unwrap())).unwrap();
    other.set_entries(vec![my_entry()]).unwrap();
    let snap = other.subscribe().borrow().clone();
    let matched: Vec<_> = snap.entries.iter().collect();
    let auth = sigil_agent::entry::authorize_jwt(&matched, None, "ehr-fhir")
        .unwrap()
        .remove(0);
    let forged = other.fetch_jwt_svid(&auth).await.unwrap().token;
    for (aud, tok) in [
        ("calendar", token.as_str()),
        ("ehr-fhir", "not.a.jwt"),
        ("ehr-fhir", forged.as_str()),
    ] {
        let err = client.validate_jwt_token(aud, tok).await.unwrap_err();
        assert_eq!(
            status_code(&err),
            Some(tonic::Code::InvalidArgument),
            "{aud} {err:?}"
        );
    }
    // Claims come back as a Struct.
    let mut raw = agent.raw_client().await;
    let resp = raw
        .validate_jwtsvid(with_header(pb::ValidateJwtsvidRequest {
            audience: "ehr-fhir".into(),
            svid: token.clone(),
        }))
        .await
        .unwrap()
        .into_inner();
    let claims = resp.claims.unwrap();
    assert!(claims.fields.contains_key("exp"));
    assert!(matches!(
        claims.fields["acr"].kind,
        Some(prost_types::value::Kind::StringValue(ref s)) if s == "sigil:al1"
    ));
    let ev = agent.events("ValidateJWTSVID");
    assert_eq!(ev.len(), 5);
    assert_eq!(
        ev.iter().filter(|e| e.outcome == Outcome::Denied).count(),
        3
    );
}

#[tokio::test]
async fn disallowed_audience_is_permission_denied_and_audited() {
    let agent = Agent::start(vec![my_entry()]).await;
    let client = agent.client().await;
    let err = client.fetch_jwt_svid(["payments"], None).await.unwrap_err();
    assert_eq!(
        status_code(&err),
        Some(tonic::Code::PermissionDenied),
        "{err:?}"
    );
    // Multiple audiences are refused as malformed: one token, one tool.
    let err = client
        .fetch_jwt_svid(["ehr-fhir", "calendar"], None)
        .await
        .unwrap_err();
    assert_eq!(
        status_code(&err),
        Some(tonic::Code::InvalidArgument),
        "{err:?}"
    );

    let ev = agent.events("FetchJWTSVID");
    assert_eq!(
        ev.len(),
        1,
        "the malformed request is refused before attestation"
    );
    let e = &ev[0];
    assert_eq!(e.outcome, Outcome::Denied);
    assert_eq!(e.audience.as_deref(), Some("payments"));
    assert_eq!(e.spiffe_ids, [WORKLOAD]);
    assert!(
        e.reason.as_deref().unwrap().contains("not allowed"),
        "{e:?}"
    );
    assert_eq!(e.pid, Some(std::process::id() as i32));
    // The line is one JSON object.
    let line = e.to_json_line();
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["outcome"], "denied");
    assert_eq!(v["spiffe_id"], WORKLOAD);
    assert_eq!(v["rpc"], "FetchJWTSVID");
    assert_eq!(v["method"], "peercred");
    assert!(!line.contains('\n'));
}

#[tokio::test]
async fn empty_audience_and_bad_spiffe_id_are_invalid_argument() {
    let agent = Agent::start(vec![my_entry()]).await;
    let mut raw = agent.raw_client().await;
    for (aud, id) in [
        (vec![], ""),
        (vec![String::new()], ""),
        (vec!["ehr-fhir".to_string()], "not-a-spiffe-id"),
    ] {
        let err = raw
            .fetch_jwtsvid(with_header(pb::JwtsvidRequest {
                audience: aud,
                spiffe_id: id.into(),
            }))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    }
    let err = raw
        .validate_jwtsvid(with_header(pb::ValidateJwtsvidRequest {
            audience: String::new(),
            svid: "x.y.z".into(),
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(agent.audit.events().is_empty());
}

#[tokio::test]
async fn missing_or_wrong_header_is_invalid_argument_before_attestation() {
    let agent = Agent::start(vec![my_entry()]).await;
    let mut raw = agent.raw_client().await;
    let codes = vec![
        raw.fetch_x509svid(pb::X509svidRequest {}).await.map(|_| ()),
        raw.fetch_x509_bundles(pb::X509BundlesRequest {})
            .await
            .map(|_| ()),
        raw.fetch_jwtsvid(pb::JwtsvidRequest {
            audience: vec!["ehr-fhir".into()],
            spiffe_id: String::new(),
        })
        .await
        .map(|_| ()),
        raw.fetch_jwt_bundles(pb::JwtBundlesRequest {})
            .await
            .map(|_| ()),
        raw.validate_jwtsvid(pb::ValidateJwtsvidRequest {
            audience: "ehr-fhir".into(),
            svid: "a.b.c".into(),
        })
        .await
        .map(|_| ()),
    ];
    for c in codes {
        assert_eq!(c.unwrap_err().code(), tonic::Code::InvalidArgument);
    }
    let mut wrong = tonic::Request::new(pb::X509svidRequest {});
    wrong
        .metadata_mut()
        .insert("workload.spiffe.io", "yes".parse().unwrap());
    assert_eq!(
        raw.fetch_x509svid(wrong).await.unwrap_err().code(),
        tonic::Code::InvalidArgument
    );
    // No attestation happened, so nothing was audited.
    assert!(agent.audit.events().is_empty());
    // With the header, the same connection works.
    raw.fetch_x509svid(with_header(pb::X509svidRequest {}))
        .await
        .unwrap();
}

#[tokio::test]
async fn caller_without_an_entry_is_permission_denied() {
    let agent = Agent::start(vec![entry(
        "e-other",
        "spiffe://example.org/other",
        "unix:uid:4242",
        &["ehr-fhir"],
    )])
    .await;
    let client = agent.client().await;
    let err = client.fetch_x509_svid().await.unwrap_err();
    assert!(matches!(err, WorkloadApiError::NoIdentityIssued), "{err:?}");
    let err = client.fetch_jwt_svid(["ehr-fhir"], None).await.unwrap_err();
    assert_eq!(status_code(&err), Some(tonic::Code::PermissionDenied));
    let err = client.fetch_jwt_bundles().await.unwrap_err();
    assert_eq!(status_code(&err), Some(tonic::Code::PermissionDenied));
    let err = client.fetch_x509_bundles().await.unwrap_err();
    assert_eq!(status_code(&err), Some(tonic::Code::PermissionDenied));
    let ev = agent.audit.events();
    assert_eq!(ev.len(), 4);
    for e in ev {
        assert_eq!(e.outcome, Outcome::Denied);
        assert!(
            e.reason
                .as_deref()
                .unwrap()
                .contains(&format!("unix:uid:{}", my_uid())),
            "{e:?}"
        );
    }
}

/// Run by [`another_uid_is_denied_the_first_users_identity`] in a child
/// process under uid 65534; does nothing in the normal test run.
#[test]
fn child_helper_for_other_uid() {
    let Ok(socket) = std::env::var(CHILD_ENV) else {
        return;
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let endpoint = sigil::endpoint::Endpoint::Unix(PathBuf::from(&socket));
        let mut c = sigil::workload::WorkloadApiClient::connect(&endpoint)
            .await
            .unwrap();
        let code = |r: Result<String, sigil::workload::ClientError>| match r {
            Ok(s) => format!("ok:{s}"),
            Err(sigil::workload::ClientError::Status(s)) => format!("{:?}", s.code()),
            Err(e) => format!("error:{e}"),
        };
        let first = sigil::SpiffeId::parse(WORKLOAD).unwrap();
        let r = c
            .fetch_jwt_svid("ehr-fhir", Some(&first))
            .await
            .map(|s| s.spiffe_id.to_string());
        println!("CHILD first_user_jwt={}", code(r));
        let r = c
            .fetch_jwt_svid("ehr-fhir", None)
            .await
            .map(|s| s.spiffe_id.to_string());
        println!("CHILD own_jwt={}", code(r));
        let r = c.fetch_x509_context().await.map(|ctx| {
            ctx.svids
                .iter()
                .map(|s| s.spiffe_id().to_string())
                .collect::<Vec<_>>()
                .join(",")
        });
        println!("CHILD x509={}", code(r));
        println!("CHILD uid={}", rustix::process::geteuid().as_raw());
    });
}

#[tokio::test]
async fn another_uid_is_denied_the_first_users_identity() {
    if my_uid() != 0 {
        eprintln!("not root: cannot start a process under another uid; skipping");
        return;
    }
    let agent = Agent::start(vec![
        my_entry(),
        entry(
            "e-nobody",
            NOBODY,
            &format!("unix:uid:{NOBODY_UID}"),
            &["ehr-fhir"],
        ),
    ])
    .await;
    // Run a copy of this test binary from the 0755 temp dir, so the child
    // can execute it even when the target dir is private to root.
    let exe = agent._dir.path().join("child-test-binary");
    std::fs::copy(std::env::current_exe().unwrap(), &exe).unwrap();
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
    let socket = agent.socket.clone();
    let out = tokio::task::spawn_blocking(move || {
        use std::os::unix::process::CommandExt;
        std::process::Command::new(exe)
            .args([
                "--exact",
                "child_helper_for_other_uid",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, socket)
            .uid(NOBODY_UID)
            .gid(NOBODY_UID)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = |k: &str| {
        stdout
            .lines()
            // libtest prints "test name ... " before the first line.
            .find_map(|l| l.split_once(&format!("CHILD {k}=")).map(|(_, v)| v))
            .unwrap_or_else(|| panic!("no {k} in child output: {stdout}"))
            .to_owned()
    };
    assert_eq!(line("uid"), NOBODY_UID.to_string());
    assert_eq!(line("first_user_jwt"), "PermissionDenied");
    assert_eq!(line("own_jwt"), format!("ok:{NOBODY}"));
    assert_eq!(line("x509"), format!("ok:{NOBODY}"));

    let denied: Vec<_> = agent
        .events("FetchJWTSVID")
        .into_iter()
        .filter(|e| e.outcome == Outcome::Denied)
        .collect();
    assert_eq!(denied.len(), 1);
    assert_eq!(denied[0].uid, Some(NOBODY_UID));
    assert_eq!(denied[0].spiffe_ids, [WORKLOAD]);
}

#[tokio::test]
async fn x509_stream_pushes_a_rotated_svid_before_the_old_one_expires() {
    let mut e = my_entry();
    e.x509_ttl = Duration::from_secs(4);
    let agent = Agent::start(vec![e]).await;
    let client = agent.client().await;
    let mut stream = client.stream_x509_contexts().await.unwrap();
    let first = stream.next().await.unwrap().unwrap();
    let first_leaf = first.default_svid().unwrap().leaf().as_bytes().to_vec();
    let first_expiry = leaf_not_after(&first_leaf);
    let second = tokio::time::timeout(Duration::from_secs(4), stream.next())
        .await
        .expect("no rotation pushed within the SVID's life")
        .unwrap()
        .unwrap();
    assert!(
        unix_now() < first_expiry,
        "pushed after the old SVID expired"
    );
    let second_leaf = second.default_svid().unwrap().leaf().as_bytes().to_vec();
    assert_ne!(first_leaf, second_leaf);
    assert!(leaf_not_after(&second_leaf) >= first_expiry);
    assert_eq!(
        second.default_svid().unwrap().spiffe_id().to_string(),
        WORKLOAD
    );
}

#[tokio::test]
async fn bundle_changes_are_pushed_on_every_stream() {
    let mut e = my_entry();
    e.federates_with = vec![sigil::TrustDomain::new("partner.org").unwrap()];
    let agent = Agent::start(vec![e]).await;
    let client = agent.client().await;
    let td = spiffe::TrustDomain::new(TD).unwrap();
    let partner = spiffe::TrustDomain::new("partner.org").unwrap();
    let mut x509 = client.stream_x509_contexts().await.unwrap();
    let mut x509_bundles = client.stream_x509_bundles().await.unwrap();
    let mut jwt_bundles = client.stream_jwt_bundles().await.unwrap();
    let c0 = x509.next().await.unwrap().unwrap();
    assert_eq!(c0.bundle_set().get(&td).unwrap().authorities().len(), 1);
    assert!(c0.bundle_set().get(&partner).is_none());
    let b0 = x509_bundles.next().await.unwrap().unwrap();
    assert_eq!(b0.get(&td).unwrap().authorities().len(), 1);
    let j0 = jwt_bundles.next().await.unwrap().unwrap();
    assert!(j0.get(&td).is_some());

    // A new CA: the old one stays in the bundle; every stream pushes.
    agent.ca.rotate_ca().unwrap();
    let next = Duration::from_secs(2);
    let c1 = tokio::time::timeout(next, x509.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(c1.bundle_set().get(&td).unwrap().authorities().len(), 2);
    let b1 = tokio::time::timeout(next, x509_bundles.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(b1.get(&td).unwrap().authorities().len(), 2);

    // A federated bundle the entry federates with reaches the workload.
    let other = LocalCa::new(LocalCaConfig::new(
        sigil::TrustDomain::new("partner.org").unwrap(),
    ))
    .unwrap();
    agent.ca.set_federated_bundle(other.bundle()).unwrap();
    let c2 = tokio::time::timeout(next, x509.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        c2.bundle_set().get(&partner).unwrap().authorities().len(),
        1
    );
    let j1 = tokio::time::timeout(next, jwt_bundles.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(j1.get(&partner).is_some());
}

#[tokio::test]
async fn entry_removal_ends_the_stream_with_permission_denied() {
    let agent = Agent::start(vec![my_entry()]).await;
    let client = agent.client().await;
    let mut stream = client.stream_x509_contexts().await.unwrap();
    stream.next().await.unwrap().unwrap();
    agent.ca.set_entries(vec![]).unwrap();
    let end = tokio::time::timeout(Duration::from_secs(2), stream.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert_eq!(
        status_code(&end),
        Some(tonic::Code::PermissionDenied),
        "{end:?}"
    );
}

#[tokio::test]
async fn grpc_health_on_the_same_socket() {
    let agent = Agent::start(vec![my_entry()]).await;
    let mut health =
        tonic_health::pb::health_client::HealthClient::new(raw_channel(&agent.socket).await);
    for service in ["", "SpiffeWorkloadAPI"] {
        let resp = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            resp.status(),
            tonic_health::pb::health_check_response::ServingStatus::Serving,
            "{service:?}"
        );
    }
    let mode = std::fs::metadata(&agent.socket)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o777);
}

#[tokio::test]
async fn the_spiffe_crate_sources_follow_the_agent() {
    let mut e = my_entry();
    e.x509_ttl = Duration::from_secs(4);
    let agent = Agent::start(vec![e]).await;

    let x509 = spiffe::X509Source::builder()
        .endpoint(agent.endpoint())
        .build()
        .await
        .unwrap();
    let first = x509.svid().unwrap();
    assert_eq!(first.spiffe_id().to_string(), WORKLOAD);
    let mut updates = x509.updated();
    tokio::time::timeout(
        Duration::from_secs(4),
        updates.wait_for(|_| x509.svid().unwrap().leaf().as_bytes() != first.leaf().as_bytes()),
    )
    .await
    .expect("X509Source saw no rotation")
    .unwrap();

    let jwt = spiffe::JwtSource::builder()
        .endpoint(agent.endpoint())
        .build()
        .await
        .unwrap();
    let svid = jwt.fetch_jwt_svid(["calendar"]).await.unwrap();
    let bundles = jwt.bundle_set().unwrap();
    JwtSvid::parse_and_validate(svid.token(), bundles.as_ref(), &["calendar"]).unwrap();
    assert!(jwt.fetch_jwt_svid(["payments"]).await.is_err());
    x509.shutdown().await;
    jwt.shutdown().await;
}

/// The real CA behind a switch that simulates the server being down.
struct Switchable {
    ca: LocalCa,
    down: Arc<AtomicBool>,
}

impl IdentitySource for Switchable {
    fn subscribe(&self) -> tokio::sync::watch::Receiver<Arc<IdentitySnapshot>> {
        self.ca.subscribe()
    }
    fn fetch_jwt_svid<'a>(
        &'a self,
        a: &'a AuthorizedAudience,
    ) -> futures::future::BoxFuture<'a, Result<MintedJwtSvid, SourceError>> {
        if self.down.load(Ordering::SeqCst) {
            return Box::pin(async { Err(SourceError::Unavailable("server down".into())) });
        }
        self.ca.fetch_jwt_svid(a)
    }
}

#[tokio::test]
async fn source_outage_serves_cached_jwts_and_unavailable_for_new_audiences() {
    let down = Arc::new(AtomicBool::new(false));
    let switch = down.clone();
    let agent = Agent::start_with(vec![my_entry()], move |ca| {
        Arc::new(JwtSvidCache::new(Switchable { ca, down: switch }))
    })
    .await;
    let client = agent.client().await;
    let before = client.fetch_jwt_token(["ehr-fhir"], None).await.unwrap();
    down.store(true, Ordering::SeqCst);
    let started = std::time::Instant::now();
    let during = client.fetch_jwt_token(["ehr-fhir"], None).await.unwrap();
    assert!(started.elapsed() < Duration::from_millis(500));
    assert_eq!(before, during);
    // X.509 keeps being served from the snapshot.
    client.fetch_x509_svid().await.unwrap();
    let err = client.fetch_jwt_svid(["calendar"], None).await.unwrap_err();
    assert!(
        matches!(
            &err,
            WorkloadApiError::Transport(spiffe::transport::TransportError::Status(s))
                if s.code() == spiffe::transport::GrpcStatusCode::Unavailable
        ),
        "{err:?}"
    );
    let ev = agent.events("FetchJWTSVID");
    let last = ev.last().unwrap();
    assert_eq!(last.outcome, Outcome::Error);
    assert_eq!(last.audience.as_deref(), Some("calendar"));
}

#[tokio::test]
async fn shutdown_ends_open_streams_and_returns() {
    let mut agent = Agent::start(vec![my_entry()]).await;
    let client = agent.client().await;
    let mut stream = client.stream_x509_contexts().await.unwrap();
    stream.next().await.unwrap().unwrap();
    let _ = agent.shutdown.take().unwrap().send(());
    let end = tokio::time::timeout(Duration::from_secs(3), stream.next())
        .await
        .expect("stream still open after shutdown");
    assert!(matches!(end, None | Some(Err(_))), "{end:?}");
    tokio::time::timeout(Duration::from_secs(3), agent.server.take().unwrap())
        .await
        .expect("serve() did not return")
        .unwrap();
}

#[tokio::test]
async fn connections_are_capped_per_uid() {
    let agent = Agent::start_configured(
        vec![my_entry()],
        |ca| Arc::new(ca),
        |api| api.with_max_connections_per_uid(2),
    )
    .await;
    let call = |c: Channel| async move {
        let mut raw = pb::spiffe_workload_api_client::SpiffeWorkloadApiClient::new(c);
        tokio::time::timeout(
            Duration::from_secs(2),
            raw.fetch_jwt_bundles(with_header(pb::JwtBundlesRequest {})),
        )
        .await
        .map_err(|_| "timeout".to_string())
        .and_then(|r| r.map(|_| ()).map_err(|s| format!("{:?}", s.code())))
    };
    let a = raw_channel(&agent.socket).await;
    let b = raw_channel(&agent.socket).await;
    call(a.clone()).await.unwrap();
    call(b.clone()).await.unwrap();
    // A third connection from the same uid is closed at accept.
    let third = raw_channel_result(&agent.socket).await;
    if let Ok(c) = third {
        assert!(call(c).await.is_err());
    }
    let refused: Vec<_> = agent.events("Connect");
    assert!(!refused.is_empty());
    assert_eq!(refused[0].uid, Some(my_uid()));
    assert_eq!(refused[0].outcome, Outcome::Denied);
    // Closing one frees a slot.
    drop(a);
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    loop {
        let c = raw_channel_result(&agent.socket).await;
        if let Ok(c) = c
            && call(c).await.is_ok()
        {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "slot never freed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(b);
}

async fn raw_channel_result(path: &Path) -> Result<Channel, tonic::transport::Error> {
    let path = path.to_path_buf();
    tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                let s = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
            }
        }))
        .await
}

/// The workload key service (`sigil.workload.v1`) on the same socket: the
/// header first, then the request fields, then attestation; a caller whose
/// entries bind no key to a TPM gets nothing (this source has no TPM), and
/// every refusal after attestation is audited.
#[tokio::test]
async fn key_service_checks_header_fields_and_fails_closed_without_tpm_entries() {
    use sigil::proto::keys::v1 as keys;
    let agent = Agent::start(vec![my_entry()]).await;
    let mut raw =
        keys::workload_keys_client::WorkloadKeysClient::new(raw_channel(&agent.socket).await);
    let sign = |id: &str, digest: Vec<u8>| keys::SignDigestRequest {
        spiffe_id: id.into(),
        digest,
    };
    let bound_jwt = |aud: &str| keys::FetchBoundJwtSvidRequest {
        spiffe_id: String::new(),
        audience: aud.into(),
    };

    // No header: InvalidArgument, before attestation (nothing audited).
    let codes = vec![
        raw.fetch_x509_svids(keys::FetchX509SvidsRequest {})
            .await
            .map(|_| ()),
        raw.sign_digest(sign(WORKLOAD, vec![0; 32]))
            .await
            .map(|_| ()),
        raw.fetch_bound_jwt_svid(bound_jwt("ehr-fhir"))
            .await
            .map(|_| ()),
    ];
    for c in codes {
        assert_eq!(c.unwrap_err().code(), tonic::Code::InvalidArgument);
    }
    assert!(agent.audit.events().is_empty());

    // Malformed fields: InvalidArgument, before attestation.
    for req in [
        sign(WORKLOAD, vec![0; 31]),
        sign(WORKLOAD, vec![0; 33]),
        sign("", vec![0; 32]),
        sign("spiffe://example.org/../x", vec![0; 32]),
    ] {
        let e = raw.sign_digest(with_header(req)).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    }
    let e = raw
        .fetch_bound_jwt_svid(with_header(bound_jwt("")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(agent.audit.events().is_empty());

    // Well-formed, attested, but no TPM-bound entry: PermissionDenied, with
    // the reason in the audit log, and no key material anywhere.
    let e = raw
        .sign_digest(with_header(sign(WORKLOAD, vec![0; 32])))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    let e = raw
        .fetch_x509_svids(with_header(keys::FetchX509SvidsRequest {}))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    let e = raw
        .fetch_bound_jwt_svid(with_header(bound_jwt("ehr-fhir")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    let events = agent.audit.events();
    assert_eq!(events.len(), 3);
    for e in &events {
        assert_eq!(e.outcome, Outcome::Denied);
        assert!(
            e.reason
                .as_deref()
                .unwrap_or_default()
                .contains("TPM-bound"),
            "{e:?}"
        );
    }
}
