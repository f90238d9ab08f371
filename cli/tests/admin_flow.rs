//! The whole admin flow with the real `sigil` binary: token and entry from
//! the CLI, a test agent attests and mints over the node API (real TLS 1.3),
//! `sigil validate` checks what was minted, `sigil agent evict` cuts the
//! agent off on its already-open connection. The server runs in-process
//! from the `sigil-server` library.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use rcgen::PublicKeyData;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use serde_json::Value;
use sigil::proto::node::v1 as node;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tonic::transport::{Channel, Endpoint};

struct Server {
    rt: Option<tokio::runtime::Runtime>,
    dir: tempfile::TempDir,
    socket: PathBuf,
    addr: SocketAddr,
}

impl Server {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("admin.sock");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let args = sigil_server::config::RunArgs {
            data_dir: Some(dir.path().join("data")),
            trust_domain: Some("example.org".into()),
            listen: Some(addr),
            admin_socket: Some(socket.clone()),
            ..Default::default()
        };
        let cfg = sigil_server::config::Config::load(&args).unwrap();
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.spawn(sigil_server::server::run(cfg));
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(&socket).is_err()
            || std::net::TcpStream::connect(addr).is_err()
        {
            assert!(Instant::now() < deadline, "server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self {
            rt: Some(rt),
            dir,
            socket,
            addr,
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

fn sigil(socket: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sigil"))
        .arg("--admin-socket")
        .arg(socket)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn json_ok(out: Output) -> Value {
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

async fn channel(
    addr: SocketAddr,
    ca_pem: &[u8],
    client: Option<(Vec<CertificateDer<'static>>, Vec<u8>)>,
) -> Channel {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    let bundle =
        sigil::X509Bundle::from_pem(sigil::TrustDomain::new("example.org").unwrap(), ca_pem)
            .unwrap();
    for a in bundle.authorities() {
        roots.add(a.clone()).unwrap();
    }
    let b = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots);
    let mut cfg = match client {
        Some((chain, key)) => b
            .with_client_auth_cert(chain, PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key)))
            .unwrap(),
        None => b.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let connector = connector.clone();
            async move {
                let tcp = tokio::net::TcpStream::connect(addr).await?;
                let tls = connector
                    .connect(ServerName::try_from("localhost").unwrap(), tcp)
                    .await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        }))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_token_entry_then_agent_mints_and_cli_validates_and_evicts() {
    let server = Server::start();
    let s = server.socket.clone();
    let work = server.dir.path();

    // The operator: a token, and the CA bundle with the fingerprint it names.
    let t = json_ok(sigil(
        &s,
        &["token", "create", "--ttl", "10m", "--output", "json"],
    ));
    let pem = sigil(&s, &["bundle", "show", "--format", "pem"]).stdout;
    let fp = sigil_server::model::hex(&sigil_server::model::sha256(&pem));
    assert_eq!(t["bundle_sha256"], fp.as_str());
    let agent_id = t["agent_id"].as_str().unwrap().to_owned();

    // The agent: attests over TLS, trusting only that bundle.
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut anon = node::node_client::NodeClient::new(channel(server.addr, &pem, None).await);
    let resp = anon
        .attest(node::AttestRequest {
            method: Some(node::attest_request::Method::JoinToken(
                node::JoinTokenAttestation {
                    token: t["token"].as_str().unwrap().into(),
                },
            )),
            public_key: key.subject_public_key_info(),
        })
        .await
        .unwrap()
        .into_inner();
    let Some(node::attest_response::Result::Svid(svid)) = resp.result else {
        panic!("no SVID");
    };
    assert_eq!(svid.spiffe_id, agent_id);
    let chain: Vec<CertificateDer<'static>> = svid
        .cert_chain
        .into_iter()
        .map(CertificateDer::from)
        .collect();
    let mut agent = node::node_client::NodeClient::new(
        channel(server.addr, &pem, Some((chain, key.serialize_der()))).await,
    );

    // The operator registers a workload under that agent.
    let agents = json_ok(sigil(&s, &["agent", "list", "--output", "json"]));
    assert_eq!(agents[0]["spiffe_id"], agent_id.as_str());
    let e = json_ok(sigil(
        &s,
        &[
            "entry",
            "create",
            "--spiffe-id",
            "spiffe://example.org/ai/scheduler",
            "--parent-id",
            &agent_id,
            "--selector",
            "unix:uid:1000",
            "--audience",
            "ehr-fhir",
            "--audience",
            "calendar",
            "--output",
            "json",
        ],
    ));
    assert_eq!(e["spiffe_id"], "spiffe://example.org/ai/scheduler");

    // The agent mints a JWT-SVID; `sigil validate jwt` accepts it as the
    // ehr-fhir tool and refuses it as the payments tool.
    let token = agent
        .mint_jwt_svid(node::MintJwtSvidRequest {
            spiffe_id: "spiffe://example.org/ai/scheduler".into(),
            audience: "ehr-fhir".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    let spiffe = sigil(&s, &["bundle", "show", "--format", "spiffe"]).stdout;
    let bundle_file = work.join("bundle.json");
    std::fs::write(&bundle_file, &spiffe).unwrap();
    let bundle_arg = format!("example.org={}", bundle_file.display());
    let ok = sigil(
        &s,
        &[
            "validate",
            "jwt",
            "--audience",
            "ehr-fhir",
            "--bundle",
            &bundle_arg,
            &token,
        ],
    );
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let claims: Value = serde_json::from_slice(&ok.stdout).unwrap();
    assert!(
        claims
            .to_string()
            .contains("spiffe://example.org/ai/scheduler")
    );
    let wrong = sigil(
        &s,
        &[
            "validate",
            "jwt",
            "--audience",
            "payments",
            "--bundle",
            &bundle_arg,
            &token,
        ],
    );
    assert_eq!(wrong.status.code(), Some(1));

    // X.509-SVID: `sigil validate x509` accepts the chain.
    let wkey = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let r = agent
        .sign_x509_svids(node::SignX509SvidsRequest {
            requests: vec![node::X509SvidRequest {
                entry_id: e["id"].as_str().unwrap().into(),
                public_key: wkey.subject_public_key_info(),
                ..Default::default()
            }],
        })
        .await
        .unwrap()
        .into_inner();
    let leaf = &r.results[0].cert_chain[0];
    let leaf_pem = {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD.encode(leaf);
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
    let chain_file = work.join("chain.pem");
    std::fs::write(&chain_file, leaf_pem).unwrap();
    let x = sigil(
        &s,
        &[
            "validate",
            "x509",
            "--bundle",
            &bundle_arg,
            chain_file.to_str().unwrap(),
        ],
    );
    assert!(x.status.success(), "{}", String::from_utf8_lossy(&x.stderr));

    // A disallowed audience is refused.
    let denied = agent
        .mint_jwt_svid(node::MintJwtSvidRequest {
            spiffe_id: "spiffe://example.org/ai/scheduler".into(),
            audience: "payments".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);

    // `sigil agent evict`: the agent's next call on the same connection fails.
    let ev = json_ok(sigil(
        &s,
        &["agent", "evict", &agent_id, "--output", "json"],
    ));
    assert_eq!(ev["status"], "evicted");
    let after = agent
        .fetch_bundle(node::FetchBundleRequest {})
        .await
        .unwrap_err();
    assert_eq!(after.code(), tonic::Code::PermissionDenied);
    let shown = json_ok(sigil(&s, &["agent", "show", &agent_id, "--output", "json"]));
    assert_eq!(shown["status"], "evicted");
}
