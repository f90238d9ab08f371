//! The tool side end to end: the real `sigil-server` and `sigil-agent`, the
//! compiled example tool (`examples/ehr_tool.rs`) and example agents
//! (`examples/agent_client.rs`, `examples/python/agent.py` with the
//! unmodified py-spiffe) as processes over real sockets.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
use common::*;

use sigil::X509Svid;
use sigil::source::SharedBundles;
use sigil::tls::{SvidResolver, mtls_client_config};
use sigil::validate::x509::AnyId;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The example tool, running.
struct Tool {
    _proc: Proc,
    port: u16,
    mtls_port: u16,
    log: PathBuf,
}

impl Tool {
    fn start(s: &Sigil, name: &str, min_assurance: &str) -> Self {
        let (port, mtls_port) = (free_port(), free_port());
        let log = s.dir.path().join(format!("{name}.log"));
        let child = Command::new(example("ehr_tool"))
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--mtls-listen", &format!("127.0.0.1:{mtls_port}")])
            .args(["--min-assurance", min_assurance])
            .env("SPIFFE_ENDPOINT_SOCKET", s.endpoint())
            .env("RUST_LOG", "info,sigil::layer=debug")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut proc = Proc(Some(child));
        wait_for(
            name,
            proc.0.as_mut().unwrap(),
            Some(&log),
            Duration::from_secs(20),
            || {
                std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
                    && std::net::TcpStream::connect(("127.0.0.1", mtls_port)).is_ok()
            },
        );
        Self {
            _proc: proc,
            port,
            mtls_port,
            log,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap()
    }
}

/// A plain HTTP/1.1 GET; returns the status, the `WWW-Authenticate` header
/// and the body.
fn get(port: u16, path: &str, bearer: Option<&str>) -> (u16, Option<String>, String) {
    let mut tcp = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let auth = bearer
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        tcp,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut resp = String::new();
    tcp.read_to_string(&mut resp).unwrap();
    parse_response(&resp)
}

fn parse_response(resp: &str) -> (u16, Option<String>, String) {
    let (head, body) = resp.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let www = head.lines().find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.eq_ignore_ascii_case("www-authenticate")
            .then(|| value.trim().to_owned())
    });
    (status, www, body.to_owned())
}

/// The token with one signature character changed (inside the signature,
/// so it still decodes).
fn tamper(token: &str) -> String {
    let i = token.rfind('.').unwrap() + 10;
    let mut t = token.to_owned();
    let c = if &t[i..=i] == "A" { "B" } else { "A" };
    t.replace_range(i..=i, c);
    t
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

/// Waits until the tool's log has a line containing all of `needles`.
fn wait_for_log(tool: &Tool, needles: &[&str]) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let log = tool.log();
        if log.lines().any(|l| needles.iter().all(|n| l.contains(n))) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no log line with {needles:?} in:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One GET over SPIFFE mTLS presenting `svid`, trusting the tool's server
/// SVID through `s`'s bundle. `Err` when the tool refused the connection.
async fn mtls_get(s: &Sigil, port: u16, svid: &X509Svid, token: &str) -> Result<String, String> {
    let config = mtls_client_config(
        Some(Arc::new(SvidResolver::new(svid).unwrap())),
        Arc::new(SharedBundles::new(s.server_bundle())),
        Arc::new(AnyId),
    )
    .unwrap();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let name = rustls_pki_types::ServerName::try_from("sigil-peer").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    // TLS 1.3: the server judges the client certificate after the client's
    // handshake is done, so a refusal shows on the first read.
    let req = format!(
        "GET /fhir/Patient/p7 HTTP/1.1\r\nHost: tool\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    );
    tls.write_all(req.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut resp = Vec::new();
    tls.read_to_end(&mut resp)
        .await
        .map_err(|e| e.to_string())?;
    if resp.is_empty() {
        return Err("connection closed without an answer".into());
    }
    Ok(String::from_utf8(resp).unwrap())
}

async fn own_x509_svid(s: &Sigil) -> X509Svid {
    let endpoint = sigil::endpoint::Endpoint::parse(&s.endpoint()).unwrap();
    let mut c = sigil::workload::WorkloadApiClient::connect(&endpoint)
        .await
        .unwrap();
    c.fetch_x509_context()
        .await
        .unwrap()
        .default_svid()
        .unwrap()
        .clone()
}

#[tokio::test(flavor = "multi_thread")]
async fn example_tool_admits_ehr_tokens_and_refuses_the_rest() {
    let s = Sigil::start();
    let id = s.register(
        "/workload/triage",
        &["--audience", "ehr-fhir", "--audience", "calendar"],
    );
    s.wait_for_svid(&id).await;
    let tool = Tool::start(&s, "ehr-tool", "al1");

    // The Rust example agent, over HTTP and over SPIFFE mTLS: 200, and the
    // tool saw (and logged) the caller's SPIFFE ID.
    let out = Command::new(example("agent_client"))
        .arg("--url")
        .arg(format!("http://127.0.0.1:{}/fhir/Patient/p1", tool.port))
        .arg("--mtls")
        .arg(format!(
            "https://127.0.0.1:{}/fhir/Patient/p1",
            tool.mtls_port
        ))
        .env("SPIFFE_ENDPOINT_SOCKET", s.endpoint())
        .output()
        .unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        out.status.success(),
        "agent_client: {stdout}\n{}\ntool log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        tool.log()
    );
    let calls: Vec<serde_json::Value> = stdout.lines().map(json).collect();
    assert_eq!(calls.len(), 2, "{stdout}");
    for (call, transport) in calls.iter().zip(["http", "mtls"]) {
        assert_eq!(call["transport"], transport);
        assert_eq!(call["status"], 200);
        assert_eq!(call["body"]["resourceType"], "Patient");
        assert_eq!(call["body"]["id"], "p1");
        assert_eq!(call["body"]["accessedBy"]["spiffeId"], id.as_str());
        assert_eq!(call["body"]["accessedBy"]["acr"], "sigil:al1");
    }
    assert!(calls[0]["body"]["accessedBy"]["mtlsPeer"].is_null());
    assert_eq!(calls[1]["body"]["accessedBy"]["mtlsPeer"], id.as_str());
    wait_for_log(&tool, &["caller authenticated", &id, "p1"]);

    let client = s.client().await;
    let ehr = client.fetch_jwt_token(["ehr-fhir"], None).await.unwrap();
    let calendar = client.fetch_jwt_token(["calendar"], None).await.unwrap();

    // A token for another tool, a forged one, none at all: 401, nothing
    // echoed.
    let (status, www, body) = get(tool.port, "/fhir/Patient/p2", Some(&calendar));
    assert_eq!(status, 401);
    assert_eq!(
        www.as_deref(),
        Some(r#"Bearer realm="sigil", error="invalid_token""#)
    );
    assert!(body.is_empty(), "{body}");
    assert_eq!(
        get(tool.port, "/fhir/Patient/p2", Some(&tamper(&ehr))).0,
        401
    );
    let (status, www, _) = get(tool.port, "/fhir/Patient/p2", None);
    assert_eq!(status, 401);
    assert_eq!(www.as_deref(), Some(r#"Bearer realm="sigil""#));
    wait_for_log(&tool, &["JWT-SVID refused", "audience does not match"]);
    assert!(!tool.log().contains(&calendar), "the tool logged a token");
    // The same ehr-fhir token is fine.
    assert_eq!(get(tool.port, "/fhir/Patient/p2", Some(&ehr)).0, 200);

    // A tool that requires more assurance than a join-token node has: the
    // valid token is refused with 403.
    let strict = Tool::start(&s, "ehr-tool-al2", "al2");
    let (status, www, body) = get(strict.port, "/fhir/Patient/p3", Some(&ehr));
    assert_eq!(status, 403);
    assert_eq!(
        www.as_deref(),
        Some(r#"Bearer realm="sigil", error="insufficient_scope""#)
    );
    assert!(body.is_empty(), "{body}");
    wait_for_log(
        &strict,
        &["caller refused by policy", "below required sigil:al2"],
    );

    // mTLS: the workload's own X.509-SVID is accepted; one from another
    // trust domain is refused at the handshake, even with a valid token.
    let own = own_x509_svid(&s).await;
    let ok = mtls_get(&s, tool.mtls_port, &own, &ehr).await.unwrap();
    assert_eq!(parse_response(&ok).0, 200, "{ok}");
    let evil = foreign_svid("spiffe://other.test/workload/triage");
    let refused = mtls_get(&s, tool.mtls_port, &evil, &ehr).await;
    assert!(refused.is_err(), "foreign SVID admitted: {refused:?}");
    wait_for_log(&tool, &["mTLS handshake refused"]);
}

/// Whether python3 can import the unmodified py-spiffe. When it cannot, the
/// Python tests are skipped, unless `SIGIL_REQUIRE_PY_SPIFFE=1`
/// (`scripts/test` sets it once it installed the package): then they fail.
fn py_spiffe() -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import spiffe"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var("SIGIL_REQUIRE_PY_SPIFFE").as_deref() != Ok("1"),
            "SIGIL_REQUIRE_PY_SPIFFE=1 but python3 cannot import spiffe: pip install -r examples/python/requirements.txt"
        );
        eprintln!("python3 with the `spiffe` package not found: skipping the py-spiffe test");
    }
    ok
}

/// The Python example agent with the unmodified py-spiffe (grpcio), given
/// the agent's socket as an absolute path, from an unrelated directory.
/// grpcio sends that path, percent-encoded, as the HTTP/2 `:authority`;
/// the agent must serve it anyway.
#[tokio::test(flavor = "multi_thread")]
async fn python_agent_with_absolute_socket_path() {
    if !py_spiffe() {
        return;
    }
    let s = Sigil::start();
    let id = s.register("/workload/py", &["--audience", "ehr-fhir"]);
    s.wait_for_svid(&id).await;
    let tool = Tool::start(&s, "ehr-tool", "al1");
    let elsewhere = tempfile::tempdir().unwrap();
    assert!(s.endpoint().starts_with("unix:///"));

    let out = Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/examples/python/agent.py"
        ))
        .arg(format!("http://127.0.0.1:{}/fhir/Patient/py1", tool.port))
        .current_dir(elsewhere.path())
        .env("SPIFFE_ENDPOINT_SOCKET", s.endpoint())
        .output()
        .unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        out.status.success(),
        "agent.py: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = json(stdout.trim());
    assert_eq!(v["spiffe_id"], id.as_str());
    assert_eq!(v["status"], 200);
    assert_eq!(v["body"]["accessedBy"]["spiffeId"], id.as_str());
    wait_for_log(&tool, &["caller authenticated", &id, "py1"]);

    // Several calls on one connection: after the first, grpcio refers to
    // `:authority` through the HPACK dynamic table. Every API, including
    // the streams, with `unix:///…` and `unix:/…`.
    let script = r#"
import sys
from spiffe import WorkloadApiClient
with WorkloadApiClient(socket_path=sys.argv[1]) as c:
    for _ in range(3):
        ctx = c.fetch_x509_context()
        jwt = c.fetch_jwt_svid(audience={"ehr-fhir"})
        bundles = c.fetch_jwt_bundles()
        x509_bundles = c.fetch_x509_bundles()
    assert str(ctx.default_svid.spiffe_id) == str(jwt.spiffe_id)
    assert bundles.get_bundle_for_trust_domain(jwt.spiffe_id.trust_domain) is not None
    print(jwt.spiffe_id)
"#;
    let path = s.api_socket();
    for endpoint in [s.endpoint(), format!("unix:{}", path.display())] {
        let out = Command::new("python3")
            .args(["-c", script, &endpoint])
            .current_dir(elsewhere.path())
            .env_remove("SPIFFE_ENDPOINT_SOCKET")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "py-spiffe with {endpoint}: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8(out.stdout).unwrap().trim(), id);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn example_tool_keeps_last_good_bundle_when_sigil_is_down() {
    let mut s = Sigil::start();
    let id = s.register("/workload/scheduler", &["--audience", "ehr-fhir"]);
    s.wait_for_svid(&id).await;
    let tool = Tool::start(&s, "ehr-tool", "al1");
    let ehr = s
        .client()
        .await
        .fetch_jwt_token(["ehr-fhir"], None)
        .await
        .unwrap();
    assert_eq!(get(tool.port, "/fhir/Patient/p1", Some(&ehr)).0, 200);

    // The server and the agent go away: the tool's FetchJWTBundles stream
    // breaks and every reconnect fails. It keeps validating with the last
    // good bundle: the token minted before is still admitted…
    s.server.kill();
    s.agent.kill();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (status, _, body) = get(tool.port, "/fhir/Patient/p4", Some(&ehr));
    assert_eq!(status, 200, "{body}");
    assert_eq!(json(&body)["accessedBy"]["spiffeId"], id.as_str());
    // …and it still validates: a tampered token is refused.
    assert_eq!(
        get(tool.port, "/fhir/Patient/p4", Some(&tamper(&ehr))).0,
        401
    );
}
