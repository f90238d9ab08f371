//! End-to-end: the real `sigil` binary's admin commands against a Sigil
//! server (run in-process from the `sigil-server` library, on a temp dir and
//! a free port).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

struct Server {
    rt: Option<tokio::runtime::Runtime>,
    _dir: tempfile::TempDir,
    socket: PathBuf,
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
        let args = sigil_server::config::RunArgs {
            data_dir: Some(dir.path().join("data")),
            trust_domain: Some("example.org".into()),
            listen: Some(([127, 0, 0, 1], port).into()),
            admin_socket: Some(socket.clone()),
            ..Default::default()
        };
        let cfg = sigil_server::config::Config::load(&args).unwrap();
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.spawn(sigil_server::server::run(cfg));
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            assert!(Instant::now() < deadline, "server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self {
            rt: Some(rt),
            _dir: dir,
            socket,
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
        .env_remove("SIGIL_ADMIN_SOCKET")
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

fn sha256_hex(data: &[u8]) -> String {
    // A tiny dependency-free check would be long; use the same digest the
    // server uses through the library's dependency tree.
    let d = sigil_server::model::sha256(data);
    sigil_server::model::hex(&d)
}

#[test]
fn token_entry_agent_and_bundle_commands() {
    let server = Server::start();
    let s = &server.socket;

    // token create: the token, the agent ID, the bundle fingerprint.
    let t = json_ok(sigil(
        s,
        &["token", "create", "--ttl", "10m", "--output", "json"],
    ));
    assert!(t["token"].as_str().unwrap().len() >= 40);
    let agent_id = t["agent_id"].as_str().unwrap();
    assert!(agent_id.starts_with("spiffe://example.org/agent/join/"));
    let pem = sigil(s, &["bundle", "show", "--format", "pem"]);
    assert!(pem.status.success());
    assert_eq!(t["bundle_sha256"], sha256_hex(&pem.stdout));
    // Text output too.
    let text = sigil(s, &["token", "create", "--ttl", "1h"]);
    assert!(String::from_utf8_lossy(&text.stdout).contains("Token"));

    // entry create (socket from the environment this time).
    let out = Command::new(env!("CARGO_BIN_EXE_sigil"))
        .env("SIGIL_ADMIN_SOCKET", s)
        .args([
            "entry",
            "create",
            "--spiffe-id",
            "spiffe://example.org/ai/scheduler",
            "--parent-id",
            agent_id,
            "--selector",
            "unix:uid:1000",
            "--audience",
            "ehr-fhir",
            "--audience",
            "calendar",
            "--x509-ttl",
            "1h",
            "--jwt-ttl",
            "15m",
            "--expires-in",
            "30d",
            "--output",
            "json",
        ])
        .output()
        .unwrap();
    let e = json_ok(out);
    let id = e["id"].as_str().unwrap().to_owned();
    assert_eq!(e["spiffe_id"], "spiffe://example.org/ai/scheduler");
    assert_eq!(e["audiences"], serde_json::json!(["ehr-fhir", "calendar"]));
    assert_eq!(e["jwt_ttl_seconds"], 900);
    assert_eq!(e["x509_ttl_seconds"], 3600);
    let expires = e["expires_at"].as_i64().unwrap();
    let created = e["created_at"].as_i64().unwrap();
    assert!((expires - created - 30 * 86400).abs() < 60);

    // The same entry again is refused.
    let dup = Command::new(env!("CARGO_BIN_EXE_sigil"))
        .env("SIGIL_ADMIN_SOCKET", s)
        .args([
            "entry",
            "create",
            "--spiffe-id",
            "spiffe://example.org/ai/scheduler",
            "--parent-id",
            agent_id,
            "--selector",
            "unix:uid:1000",
        ])
        .output()
        .unwrap();
    assert_eq!(dup.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&dup.stderr).contains("AlreadyExists"));

    // entry update replaces the fields, keeps the ID, bumps the revision.
    let up = json_ok(sigil(
        s,
        &[
            "entry",
            "update",
            &id,
            "--spiffe-id",
            "spiffe://example.org/ai/scheduler",
            "--parent-id",
            agent_id,
            "--selector",
            "unix:uid:1001",
            "--audience",
            "calendar",
            "--output",
            "json",
        ],
    ));
    assert_eq!(up["id"], id.as_str());
    assert_eq!(up["audiences"], serde_json::json!(["calendar"]));
    assert_eq!(up["selectors"], serde_json::json!(["unix:uid:1001"]));
    assert!(up["revision"].as_u64().unwrap() > e["revision"].as_u64().unwrap());
    let list = json_ok(sigil(s, &["entry", "list", "--output", "json"]));
    assert_eq!(list.as_array().unwrap().len(), 1);
    let shown = json_ok(sigil(s, &["entry", "show", &id, "--output", "json"]));
    assert_eq!(shown["id"], id.as_str());

    // A refused entry: exit 1 and one line on stderr.
    let bad = sigil(
        s,
        &[
            "entry",
            "create",
            "--spiffe-id",
            "spiffe://example.org/x",
            "--parent-id",
            agent_id,
            "--selector",
            "unix:path:/usr/bin/python3",
        ],
    );
    assert_eq!(bad.status.code(), Some(1));
    let err = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("InvalidArgument"), "{err}");
    let root = sigil(
        s,
        &[
            "entry",
            "create",
            "--spiffe-id",
            "spiffe://example.org/x",
            "--parent-id",
            agent_id,
            "--selector",
            "unix:uid:0",
            "--allow-root",
            "--output",
            "json",
        ],
    );
    assert!(root.status.success());

    // Agents: none attested yet; unknown agent is a clean error.
    let agents = json_ok(sigil(s, &["agent", "list", "--output", "json"]));
    assert!(agents.as_array().unwrap().is_empty());
    let missing = sigil(s, &["agent", "evict", agent_id]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("NotFound"));

    // Bundle formats parse with the library.
    let td = sigil::TrustDomain::new("example.org").unwrap();
    for fmt in ["pem", "jwks", "spiffe"] {
        let out = sigil(s, &["bundle", "show", "--format", fmt]);
        assert!(out.status.success(), "{fmt}");
        let b = sigil::Bundle::parse_any(td.clone(), &out.stdout).unwrap();
        match fmt {
            "pem" => assert_eq!(b.x509.authorities().len(), 1),
            "jwks" => assert_eq!(b.jwt.keys().count(), 1),
            _ => {
                assert_eq!(b.x509.authorities().len(), 1);
                assert_eq!(b.jwt.keys().count(), 1);
            }
        }
    }

    // keys: prepare publishes, activate switches the signer, the old key
    // stays published until revoked.
    let keys = json_ok(sigil(s, &["keys", "show", "--output", "json"]));
    let jwt = keys["jwt_keys"].as_array().unwrap();
    assert_eq!(jwt.len(), 1);
    assert_eq!(jwt[0]["state"], "active");
    let k1 = jwt[0]["kid"].as_str().unwrap().to_owned();
    assert_eq!(keys["x509_authorities"].as_array().unwrap().len(), 1);
    let early = sigil(s, &["keys", "activate"]);
    assert_eq!(early.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&early.stderr).contains("keys prepare"));
    let p = json_ok(sigil(s, &["keys", "prepare", "--output", "json"]));
    assert_eq!(p["state"], "prepared");
    let a = json_ok(sigil(s, &["keys", "activate", "--output", "json"]));
    assert_eq!(a["kid"], p["kid"]);
    assert_eq!(a["state"], "active");
    let jwks = sigil(s, &["bundle", "show", "--format", "jwks"]);
    let b = sigil::Bundle::parse_any(td.clone(), &jwks.stdout).unwrap();
    assert_eq!(b.jwt.keys().count(), 2);
    let active = sigil(s, &["keys", "revoke", p["kid"].as_str().unwrap()]);
    assert_eq!(active.status.code(), Some(1));
    let r = json_ok(sigil(s, &["keys", "revoke", &k1, "--output", "json"]));
    assert_eq!(r["state"], "retired");
    let jwks = sigil(s, &["bundle", "show", "--format", "jwks"]);
    let b = sigil::Bundle::parse_any(td.clone(), &jwks.stdout).unwrap();
    assert_eq!(b.jwt.keys().count(), 1);

    // keys --kind x509: the same steps for the X.509 CA; every bundle
    // change bumps spiffe_sequence.
    let seq = |s: &Path| {
        let out = sigil(s, &["bundle", "show", "--format", "spiffe"]);
        sigil::Bundle::parse_any(td.clone(), &out.stdout)
            .unwrap()
            .sequence
            .unwrap()
    };
    let pem_count = |s: &Path| {
        let out = sigil(s, &["bundle", "show", "--format", "pem"]);
        sigil::Bundle::parse_any(td.clone(), &out.stdout)
            .unwrap()
            .x509
            .authorities()
            .len()
    };
    let ca1 = keys["x509_authorities"][0].clone();
    assert_eq!(ca1["state"], "active");
    let early = sigil(s, &["keys", "activate", "--kind", "x509"]);
    assert_eq!(early.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&early.stderr).contains("keys prepare --kind x509"));
    let s0 = seq(s);
    let p = json_ok(sigil(
        s,
        &["keys", "prepare", "--kind", "x509", "--output", "json"],
    ));
    assert_eq!(p["state"], "prepared");
    assert_eq!(pem_count(s), 2, "a prepared CA is published");
    let s1 = seq(s);
    assert!(s1 > s0);
    let a = json_ok(sigil(
        s,
        &["keys", "activate", "--kind", "x509", "--output", "json"],
    ));
    assert_eq!(a["serial"], p["serial"]);
    assert_eq!(a["state"], "active");
    assert!(seq(s) > s1);
    let shown = json_ok(sigil(s, &["keys", "show", "--output", "json"]));
    let cas = shown["x509_authorities"].as_array().unwrap();
    assert_eq!(cas.len(), 2);
    assert_eq!(cas[0]["state"], "retired");
    assert_eq!(cas[0]["serial"], ca1["serial"]);
    let text = sigil(s, &["keys", "show"]);
    assert!(String::from_utf8_lossy(&text.stdout).contains(": retired"));
    let active = sigil(
        s,
        &[
            "keys",
            "revoke",
            "--kind",
            "x509",
            a["serial"].as_str().unwrap(),
        ],
    );
    assert_eq!(active.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&active.stderr).contains("cannot be revoked"));
    let unknown = sigil(s, &["keys", "revoke", "--kind", "x509", "00"]);
    assert_eq!(unknown.status.code(), Some(1));
    let r = json_ok(sigil(
        s,
        &[
            "keys",
            "revoke",
            "--kind",
            "x509",
            ca1["serial"].as_str().unwrap(),
            "--output",
            "json",
        ],
    ));
    assert_eq!(r["state"], "retired");
    assert_eq!(pem_count(s), 1, "the revoked CA left the bundle");
    let bad_kind = sigil(s, &["keys", "prepare", "--kind", "rsa"]);
    assert_eq!(bad_kind.status.code(), Some(2));

    // entry delete.
    let del = json_ok(sigil(s, &["entry", "delete", &id, "--output", "json"]));
    assert_eq!(del["id"], id.as_str());
    let gone = sigil(s, &["entry", "show", &id]);
    assert_eq!(gone.status.code(), Some(1));

    // Usage errors exit 2.
    let usage = sigil(s, &["entry", "create", "--spiffe-id", "x"]);
    assert_eq!(usage.status.code(), Some(2));
    let bad_ttl = sigil(s, &["token", "create", "--ttl", "ten"]);
    assert_eq!(bad_ttl.status.code(), Some(1));
}

#[test]
fn unreachable_socket_is_a_one_line_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = sigil(&dir.path().join("nope.sock"), &["entry", "list"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("error: cannot connect to admin socket"),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1);
}
