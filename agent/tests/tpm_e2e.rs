//! TPM node attestation end to end: the real `sigil-server`, `sigil` and
//! `sigil-agent --tpm` binaries against a real swtpm. Build them first
//! (`cargo build -p sigil-server -p sigil-cli -p sigil-agent --features
//! sigil-agent/tpm`); the test fails with that hint when one is missing.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::swtpm::Swtpm;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const TD: &str = "tpm-e2e.sigil.test";

fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let path = exe.parent().unwrap().parent().unwrap().join(name);
    assert!(
        path.exists(),
        "{} is missing: cargo build -p sigil-server -p sigil-cli",
        path.display()
    );
    path
}

struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn tail(p: &Path) -> String {
    let t = std::fs::read_to_string(p).unwrap_or_default();
    let lines: Vec<&str> = t.lines().collect();
    lines[lines.len().saturating_sub(25)..].join("\n")
}

struct Env {
    dir: tempfile::TempDir,
    port: u16,
    server: Kill,
}

fn spawn_server(dir: &Path, port: u16, extra: &[&str]) -> Kill {
    let log = dir.join("server.log");
    let _ = std::fs::remove_file(dir.join("admin.sock"));
    let mut server = Kill(
        Command::new(bin("sigil-server"))
            .arg("run")
            .arg("--data-dir")
            .arg(dir.join("server"))
            .args(["--trust-domain", TD])
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--admin-socket")
            .arg(dir.join("admin.sock"))
            .args(extra)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while !(std::os::unix::net::UnixStream::connect(dir.join("admin.sock")).is_ok()
        && std::net::TcpStream::connect(("127.0.0.1", port)).is_ok())
    {
        assert!(
            server.0.try_wait().unwrap().is_none(),
            "server exited:\n{}",
            tail(&log)
        );
        assert!(Instant::now() < deadline, "server not ready");
        std::thread::sleep(Duration::from_millis(25));
    }
    server
}

impl Env {
    /// Stops the server and starts it again on the same data dir and port
    /// with `extra` flags.
    fn restart_server(&mut self, extra: &[&str]) {
        let _ = self.server.0.kill();
        let _ = self.server.0.wait();
        self.server = spawn_server(self.dir.path(), self.port, extra);
    }

    fn start(server_extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let server = spawn_server(dir.path(), port, server_extra);
        let env = Self { dir, port, server };
        let pem = env.cli_ok(&["bundle", "show", "--format", "pem"]);
        std::fs::write(env.dir.path().join("bundle.pem"), pem).unwrap();
        env
    }

    fn cli(&self, args: &[&str]) -> Output {
        Command::new(bin("sigil"))
            .args(args)
            .env("SIGIL_ADMIN_SOCKET", self.dir.path().join("admin.sock"))
            .env(
                "SPIFFE_ENDPOINT_SOCKET",
                format!("unix://{}", self.api_socket().display()),
            )
            .output()
            .unwrap()
    }

    fn cli_ok(&self, args: &[&str]) -> String {
        let o = self.cli(args);
        assert!(
            o.status.success(),
            "sigil {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap()
    }

    fn api_socket(&self) -> PathBuf {
        self.dir.path().join("agent/api.sock")
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("agent/data")
    }

    fn agent_cmd(&self, tcti: &str, log: &Path) -> Command {
        let mut cmd = Command::new(bin("sigil-agent"));
        cmd.arg("run")
            .arg("--server")
            .arg(format!("127.0.0.1:{}", self.port))
            .args(["--trust-domain", TD])
            .arg("--trust-bundle")
            .arg(self.dir.path().join("bundle.pem"))
            .arg("--socket")
            .arg(self.api_socket())
            .arg("--data-dir")
            .arg(self.data_dir())
            .args(["--sync-interval", "300ms", "--tpm", tcti])
            .env_remove("SIGIL_JOIN_TOKEN")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap());
        cmd
    }

    fn start_agent(&self, tcti: &str, log: &Path) -> Kill {
        let _ = std::fs::remove_file(self.api_socket());
        let mut agent = Kill(self.agent_cmd(tcti, log).spawn().unwrap());
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(self.api_socket()).is_err() {
            assert!(
                agent.0.try_wait().unwrap().is_none(),
                "agent exited:\n{}",
                tail(log)
            );
            assert!(Instant::now() < deadline, "agent not ready");
            std::thread::sleep(Duration::from_millis(25));
        }
        agent
    }

    /// Waits until `sigil fetch x509` gets an SVID for `id` from the agent.
    fn wait_for_svid(&self, id: &str, log: &Path) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let o = self.cli(&["fetch", "x509"]);
            if o.status.success() && String::from_utf8_lossy(&o.stdout).contains(id) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "no SVID for {id}: {}\n--- agent log ---\n{}",
                String::from_utf8_lossy(&o.stderr),
                tail(log)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

fn uid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    tempfile::NamedTempFile::new()
        .unwrap()
        .as_file()
        .metadata()
        .unwrap()
        .uid()
}

fn ek_hash(tcti: &str) -> String {
    let o = Command::new(bin("sigil-agent"))
        .args(["tpm", "ek-hash", "--tpm", tcti])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).unwrap().trim().to_owned()
}

#[test]
fn tpm_agent_attests_serves_svids_and_reattests_after_restart_without_a_token() {
    let env = Env::start(&[]);
    let swtpm = Swtpm::start();
    let tcti = swtpm.tcti();
    let hash = ek_hash(&tcti);
    assert_eq!(hash.len(), 64);
    env.cli_ok(&["tpm", "allow", &hash]);
    let agent_id = format!("spiffe://{TD}/agent/tpm/{hash}");

    let log = env.dir.path().join("agent.log");
    let agent = env.start_agent(&tcti, &log);
    let agents = env.cli_ok(&["agent", "list", "--output", "json"]);
    assert!(agents.contains(&agent_id), "{agents}");

    // The agent SVID's key is in the TPM: the state file holds none.
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(env.data_dir().join("agent-state.json")).unwrap())
            .unwrap();
    assert_eq!(state["method"], "tpm");
    assert_eq!(state["agent_svid"]["key"], "");

    // Workload SVIDs need mTLS to the server with that TPM key.
    let uid = uid();
    let sel = format!("unix:uid:{uid}");
    let wl = format!("spiffe://{TD}/workload/tpm-e2e");
    let mut args = vec![
        "entry",
        "create",
        "--spiffe-id",
        &wl,
        "--parent-id",
        &agent_id,
        "--selector",
        &sel,
    ];
    if uid == 0 {
        args.push("--allow-root");
    }
    env.cli_ok(&args);
    env.wait_for_svid(&wl, &log);

    // Restart: no token anywhere, the TPM attests again.
    drop(agent);
    let log2 = env.dir.path().join("agent2.log");
    let _agent = env.start_agent(&tcti, &log2);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !std::fs::read_to_string(&log2)
        .unwrap_or_default()
        .contains("attested again with the TPM")
    {
        assert!(
            Instant::now() < deadline,
            "no re-attestation:\n{}",
            tail(&log2)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    env.wait_for_svid(&wl, &log2);
}

#[test]
fn tpm_whose_ek_is_not_allowed_is_refused() {
    let env = Env::start(&[]);
    let swtpm = Swtpm::start();
    let log = env.dir.path().join("agent.log");
    let out = env
        .agent_cmd(&swtpm.tcti(), &log)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("attestation refused"), "{err}");
    assert!(!env.data_dir().join("agent-state.json").exists());
    let agents = env.cli_ok(&["agent", "list", "--output", "json"]);
    assert!(!agents.contains("/agent/tpm/"), "{agents}");
}

#[test]
fn tpm_with_an_ek_certificate_from_a_configured_ca_attests_without_the_allow_list() {
    let swtpm = Swtpm::start_with_ek_cert();
    let (_root, issuer) = swtpm.ek_ca_certs().unwrap();
    let env = Env::start(&["--tpm-ek-ca", issuer.to_str().unwrap()]);
    let hash = ek_hash(&swtpm.tcti());
    let log = env.dir.path().join("agent.log");
    let _agent = env.start_agent(&swtpm.tcti(), &log);
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(env.data_dir().join("agent-state.json")).unwrap())
            .unwrap();
    assert_eq!(
        state["agent_id"],
        format!("spiffe://{TD}/agent/tpm/{hash}").as_str()
    );
    // An EK certificate from a configured manufacturer CA ranks above the
    // allow-list.
    assert_eq!(state["assurance"], "sigil:al3", "{state}");
}

#[test]
fn tpm_agent_attests_again_before_its_svid_expires() {
    // 10 s agent SVIDs: the agent must replace its SVID by attesting again
    // (the server refuses RenewAgent to TPM agents) at about half life.
    let env = Env::start(&["--agent-svid-ttl", "10s"]);
    let swtpm = Swtpm::start();
    let tcti = swtpm.tcti();
    env.cli_ok(&["tpm", "allow", &ek_hash(&tcti)]);
    let log = env.dir.path().join("agent.log");
    let _agent = env.start_agent(&tcti, &log);
    let first: serde_json::Value =
        serde_json::from_slice(&std::fs::read(env.data_dir().join("agent-state.json")).unwrap())
            .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("attested again with the TPM")
    {
        assert!(
            Instant::now() < deadline,
            "no re-attestation:\n{}",
            tail(&log)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now: serde_json::Value = serde_json::from_slice(
            &std::fs::read(env.data_dir().join("agent-state.json")).unwrap(),
        )
        .unwrap();
        if now["agent_svid"]["chain"] != first["agent_svid"]["chain"] {
            break;
        }
        assert!(Instant::now() < deadline, "agent SVID not replaced");
        std::thread::sleep(Duration::from_millis(100));
    }
    let log_text = std::fs::read_to_string(&log).unwrap();
    // No failed sync: RenewAgent (refused to TPM agents) was never tried.
    assert!(
        !log_text.contains("sync with the server failed"),
        "{log_text}"
    );
    // Still talking to the server over mTLS with the new SVID: entries sync.
    let uid = uid();
    let sel = format!("unix:uid:{uid}");
    let wl = format!("spiffe://{TD}/workload/after-reattest");
    let hash = ek_hash_from_state(&env);
    let agent_id = format!("spiffe://{TD}/agent/tpm/{hash}");
    let mut args = vec![
        "entry",
        "create",
        "--spiffe-id",
        &wl,
        "--parent-id",
        &agent_id,
        "--selector",
        &sel,
    ];
    if uid == 0 {
        args.push("--allow-root");
    }
    env.cli_ok(&args);
    env.wait_for_svid(&wl, &log);
}

fn ek_hash_from_state(env: &Env) -> String {
    let s: serde_json::Value =
        serde_json::from_slice(&std::fs::read(env.data_dir().join("agent-state.json")).unwrap())
            .unwrap();
    s["agent_id"]
        .as_str()
        .unwrap()
        .rsplit('/')
        .next()
        .unwrap()
        .to_owned()
}

#[test]
fn reattestation_updates_the_node_assurance_level() {
    // First attested by the allow-list (al2); the server then learns the
    // manufacturer CA, and the next attestation is at al3.
    let swtpm = Swtpm::start_with_ek_cert();
    let (_root, issuer) = swtpm.ek_ca_certs().unwrap();
    let mut env = Env::start(&["--agent-svid-ttl", "10s"]);
    let tcti = swtpm.tcti();
    env.cli_ok(&["tpm", "allow", &ek_hash(&tcti)]);
    let log = env.dir.path().join("agent.log");
    let _agent = env.start_agent(&tcti, &log);
    let state_file = env.data_dir().join("agent-state.json");
    let state = || -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(&state_file).unwrap()).unwrap()
    };
    assert_eq!(state()["assurance"], "sigil:al2");
    env.restart_server(&[
        "--agent-svid-ttl",
        "10s",
        "--tpm-ek-ca",
        issuer.to_str().unwrap(),
    ]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while state()["assurance"] != "sigil:al3" {
        assert!(
            Instant::now() < deadline,
            "still {}:\n{}",
            state()["assurance"],
            tail(&log)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let path = exe
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples")
        .join(name);
    assert!(
        path.exists(),
        "{} is missing: cargo build --examples --all-features",
        path.display()
    );
    path
}

fn wait_for_port(port: u16, child: &mut Kill, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            child.0.try_wait().unwrap().is_none(),
            "exited:\n{}",
            tail(log)
        );
        assert!(Instant::now() < deadline, "port {port} not ready");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Issue 5's "TPM-bound workload keys" end to end: a workload whose entry
/// has `key_binding = "tpm"` gets an X.509-SVID for a key in the agent's
/// TPM, does mTLS with the example EHR tool through the agent's signing
/// service, and presents a JWT-SVID bound to that key with a DPoP proof.
/// No API hands out the private key.
#[test]
fn tpm_bound_workload_key_does_mtls_and_dpop_through_the_agent() {
    use sigil::endpoint::Endpoint;
    use sigil::validate::pop::{ProofRequest, SoftwareProofKey, build_proof, key_thumbprint};
    use sigil::workload_keys::{TpmKeySigner, WorkloadKeysClient};

    let env = Env::start(&[]);
    let swtpm = Swtpm::start();
    let tcti = swtpm.tcti();
    let hash = ek_hash(&tcti);
    env.cli_ok(&["tpm", "allow", &hash]);
    let agent_id = format!("spiffe://{TD}/agent/tpm/{hash}");
    let log = env.dir.path().join("agent.log");
    let _agent = env.start_agent(&tcti, &log);

    let uid = uid();
    let sel = format!("unix:uid:{uid}");
    let bound = format!("spiffe://{TD}/workload/tpm-bound");
    let tool = format!("spiffe://{TD}/tool/ehr");
    for (id, extra) in [
        (
            &bound,
            &["--audience", "ehr-fhir", "--key-binding", "tpm"][..],
        ),
        (&tool, &[][..]),
    ] {
        let mut args = vec![
            "entry",
            "create",
            "--spiffe-id",
            id,
            "--parent-id",
            &agent_id,
            "--selector",
            &sel,
        ];
        args.extend_from_slice(extra);
        if uid == 0 {
            args.push("--allow-root");
        }
        env.cli_ok(&args);
    }
    // The tool's own (software) SVID comes from the standard Workload API.
    env.wait_for_svid(&tool, &log);

    // The example tool: mTLS listener, key-bound tokens accepted with a
    // DPoP proof naming its mTLS origin.
    let (http_port, mtls_port) = (free_port(), free_port());
    let origin = format!("https://127.0.0.1:{mtls_port}");
    let tool_log = env.dir.path().join("ehr_tool.log");
    let mut ehr = Kill(
        Command::new(example("ehr_tool"))
            .args(["--listen", &format!("127.0.0.1:{http_port}")])
            .args(["--mtls-listen", &format!("127.0.0.1:{mtls_port}")])
            .args(["--proof-origin", &origin])
            .env(
                "SPIFFE_ENDPOINT_SOCKET",
                format!("unix://{}", env.api_socket().display()),
            )
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&tool_log).unwrap())
            .spawn()
            .unwrap(),
    );
    wait_for_port(mtls_port, &mut ehr, &tool_log);

    // The workload example: mTLS with the TPM key, DPoP-bound JWT-SVID.
    let url = format!("{origin}/fhir/Patient/example");
    let out = Command::new(example("tpm_workload"))
        .args(["--url", &url])
        .env(
            "SPIFFE_ENDPOINT_SOCKET",
            format!("unix://{}", env.api_socket().display()),
        )
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "tpm_workload: {}\n{}\n--- tool ---\n{}\n--- agent ---\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        tail(&tool_log),
        tail(&log)
    );
    let line: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(line["status"], 200, "{line}");
    let by = &line["body"]["accessedBy"];
    assert_eq!(by["spiffeId"], bound.as_str(), "{line}");
    // The TLS client certificate was the TPM-bound SVID.
    assert_eq!(by["mtlsPeer"], bound.as_str(), "{line}");
    let amr: Vec<&str> = by["amr"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert!(amr.contains(&"tpm") && amr.contains(&"hwk"), "{line}");

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let endpoint = Endpoint::parse(&format!("unix://{}", env.api_socket().display())).unwrap();

        // The standard Workload API never hands out the TPM-bound identity
        // (it would have to include a private key), nor JWTs for it.
        let mut std_api = sigil::workload::WorkloadApiClient::connect(&endpoint)
            .await
            .unwrap();
        let ctx = std_api.fetch_x509_context().await.unwrap();
        let ids: Vec<String> = ctx
            .svids
            .iter()
            .map(|s| s.spiffe_id().to_string())
            .collect();
        assert_eq!(ids, std::slice::from_ref(&tool));
        let e = std_api.fetch_jwt_svid("ehr-fhir", None).await.unwrap_err();
        assert_eq!(e.code(), Some(tonic::Code::PermissionDenied), "{e:?}");

        // The key service: chains only, and signatures for the caller's own
        // TPM-bound identity only.
        let mut keys = WorkloadKeysClient::connect(&endpoint).await.unwrap();
        let svids = keys.fetch_x509_svids().await.unwrap();
        assert_eq!(svids.len(), 1);
        let svid = &svids[0];
        assert_eq!(svid.spiffe_id().as_str(), bound);
        let e = keys.sign_digest(&tool, &[7; 32]).await.unwrap_err();
        assert_eq!(e.code(), Some(tonic::Code::PermissionDenied), "{e:?}");
        let e = keys
            .fetch_bound_jwt_svid("calendar", None)
            .await
            .unwrap_err();
        assert_eq!(e.code(), Some(tonic::Code::PermissionDenied), "{e:?}");

        // cnf: accepted with a proof by the TPM key; refused without one and
        // with a proof by another key.
        let jwt = keys.fetch_bound_jwt_svid("ehr-fhir", None).await.unwrap();
        let signer = TpmKeySigner::start(endpoint.clone(), svid).unwrap();
        assert_eq!(jwt.public_sec1, svid.public_sec1());
        let bundles = std_api.fetch_jwt_bundles().await.unwrap();
        let v = sigil::JwtSvidValidator::new("ehr-fhir");
        let now = std::time::SystemTime::now();
        assert_eq!(
            v.validate(&jwt.token, &bundles, now).unwrap_err(),
            sigil::JwtSvidError::ProofRequired
        );
        let req = ProofRequest {
            method: "GET",
            uri: "https://ehr.example/fhir/Patient/1",
        };
        let unix = now.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
        let proof = build_proof(&signer, &jwt.token, &req, unix).unwrap();
        let ok = v
            .validate_with_proof(&jwt.token, Some(&proof), &req, &bundles, now, None)
            .unwrap();
        assert_eq!(ok.cnf_jkt(), Some(key_thumbprint(&signer).as_str()));
        assert!(
            v.validate_with_proof(&jwt.token, None, &req, &bundles, now, None)
                .is_err()
        );
        let stranger = SoftwareProofKey::generate().unwrap();
        let forged = build_proof(&stranger, &jwt.token, &req, unix).unwrap();
        assert!(
            v.validate_with_proof(&jwt.token, Some(&forged), &req, &bundles, now, None)
                .is_err()
        );
    });

    // On disk the agent keeps TPM blobs for the bound key, no PKCS#8 and no
    // software SVID for it.
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(env.data_dir().join("agent-state.json")).unwrap())
            .unwrap();
    let bound_state = state["bound"].as_object().unwrap();
    assert_eq!(bound_state.len(), 1);
    let (entry_id, b) = bound_state.iter().next().unwrap();
    assert!(b["key"]["public"].is_string() && b["key"]["private"].is_string());
    assert!(state["svids"].get(entry_id).is_none());

    // Every key-service call was audited by the agent.
    let audit = std::fs::read_to_string(env.data_dir().join("audit.log")).unwrap();
    assert!(audit.contains("WorkloadKeys.SignDigest"), "{audit}");
    assert!(audit.contains("WorkloadKeys.FetchBoundJwtSvid"), "{audit}");
    drop(ehr);
}
