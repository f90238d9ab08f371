//! The end-to-end harness shared by the tests in `tests/`: the real
//! `sigil-server`, `sigil-agent` and `sigil` binaries on temp dirs and free
//! ports, killed on drop.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use spiffe::WorkloadApiClient;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const TD: &str = "e2e.sigil.test";

/// A workspace binary, next to this test's `deps/` dir. `cargo test
/// --workspace` (the README's test command) builds every binary first; when
/// running this file alone, run `cargo build --workspace` before, or the
/// binaries may be stale.
pub fn bin(name: &str, package: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build -p {package}` (or `cargo test --workspace`)",
        path.display()
    );
    path
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits until `ready`; if the process exits first, panics with the tail of
/// its `log` (its stderr), so a failure says why it stopped.
pub fn wait_for(
    what: &str,
    child: &mut Child,
    log: Option<&std::path::Path>,
    timeout: Duration,
    mut ready: impl FnMut() -> bool,
) {
    let deadline = Instant::now() + timeout;
    while !ready() {
        if let Some(st) = child.try_wait().unwrap() {
            let tail = log
                .map(|p| {
                    let text = std::fs::read_to_string(p).unwrap_or_default();
                    let lines: Vec<&str> = text.lines().collect();
                    let from = lines.len().saturating_sub(20);
                    format!("\n--- {} ---\n{}", p.display(), lines[from..].join("\n"))
                })
                .unwrap_or_default();
            panic!("{what} exited early: {st}{tail}");
        }
        assert!(Instant::now() < deadline, "{what} not ready in {timeout:?}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

pub struct Proc(pub Option<Child>);

impl Proc {
    pub fn kill(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

pub struct Sigil {
    pub dir: tempfile::TempDir,
    /// Extra `sigil-server run` flags.
    pub server_extra: Vec<String>,
    pub port: u16,
    pub server: Proc,
    pub agent: Proc,
    pub agent_id: String,
}

impl Sigil {
    pub fn admin_socket(&self) -> PathBuf {
        self.dir.path().join("server/admin.sock")
    }
    pub fn api_socket(&self) -> PathBuf {
        self.dir.path().join("agent/api.sock")
    }
    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.api_socket().display())
    }

    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(bin("sigil", "sigil-cli"))
            .args(args)
            .env("SIGIL_ADMIN_SOCKET", self.admin_socket())
            .env("SPIFFE_ENDPOINT_SOCKET", self.endpoint())
            .output()
            .unwrap()
    }

    pub fn cli_ok(&self, args: &[&str]) -> String {
        let o = self.cli(args);
        assert!(
            o.status.success(),
            "sigil {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap()
    }

    pub fn start_server(&mut self) {
        let log = self.dir.path().join("server.log");
        let child = Command::new(bin("sigil-server", "sigil-server"))
            .arg("run")
            .arg("--data-dir")
            .arg(self.dir.path().join("server"))
            .arg("--trust-domain")
            .arg(TD)
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", self.port))
            .arg("--admin-socket")
            .arg(self.admin_socket())
            .args(&self.server_extra)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        self.server = Proc(Some(child));
        let (sock, port) = (self.admin_socket(), self.port);
        wait_for(
            "sigil-server",
            self.server.0.as_mut().unwrap(),
            Some(&log),
            Duration::from_secs(20),
            || {
                std::os::unix::net::UnixStream::connect(&sock).is_ok()
                    && std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
            },
        );
    }

    pub fn start_agent(&mut self, join_token: Option<&str>) {
        let log_path = self.dir.path().join("agent.log");
        let log = std::fs::File::create(&log_path).unwrap();
        let mut cmd = Command::new(bin("sigil-agent", "sigil-agent"));
        cmd.arg("run")
            .arg("--server")
            .arg(format!("127.0.0.1:{}", self.port))
            .arg("--trust-domain")
            .arg(TD)
            .arg("--trust-bundle")
            .arg(self.dir.path().join("bundle.pem"))
            .arg("--socket")
            .arg(self.api_socket())
            .arg("--data-dir")
            .arg(self.dir.path().join("agent/data"))
            .arg("--sync-interval")
            .arg("500ms")
            .stdout(Stdio::null())
            .stderr(log);
        if let Some(t) = join_token {
            cmd.arg("--join-token").arg(t);
        }
        self.agent = Proc(Some(cmd.spawn().unwrap()));
        let sock = self.api_socket();
        wait_for(
            "sigil-agent",
            self.agent.0.as_mut().unwrap(),
            Some(&log_path),
            Duration::from_secs(20),
            || std::os::unix::net::UnixStream::connect(&sock).is_ok(),
        );
    }

    /// Server + attested agent; no entries yet.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Same, with extra `sigil-server run` flags.
    pub fn start_with(server_extra: &[&str]) -> Self {
        let mut s = Self {
            dir: tempfile::tempdir().unwrap(),
            server_extra: server_extra.iter().map(|a| a.to_string()).collect(),
            port: free_port(),
            server: Proc(None),
            agent: Proc(None),
            agent_id: String::new(),
        };
        s.start_server();
        let pem = s.cli_ok(&["bundle", "show", "--format", "pem"]);
        std::fs::write(s.dir.path().join("bundle.pem"), pem).unwrap();
        let tok: serde_json::Value = serde_json::from_str(
            &s.cli_ok(&["token", "create", "--ttl", "10m", "--output", "json"]),
        )
        .unwrap();
        s.agent_id = tok["agent_id"].as_str().unwrap().to_owned();
        s.start_agent(tok["token"].as_str());
        s
    }

    /// An entry for this test process's uid.
    pub fn register(&self, path: &str, extra: &[&str]) -> String {
        let id = format!("spiffe://{TD}{path}");
        let uid = rustix_uid();
        let sel = format!("unix:uid:{uid}");
        let mut args = vec![
            "entry",
            "create",
            "--spiffe-id",
            &id,
            "--parent-id",
            &self.agent_id,
            "--selector",
            &sel,
            "--output",
            "json",
        ];
        if uid == 0 {
            args.push("--allow-root");
        }
        args.extend_from_slice(extra);
        self.cli_ok(&args);
        id
    }

    pub async fn client(&self) -> WorkloadApiClient {
        WorkloadApiClient::connect_to(self.endpoint())
            .await
            .unwrap()
    }

    /// Waits until the agent serves an X.509-SVID for `id`.
    pub async fn wait_for_svid(&self, id: &str) -> std::sync::Arc<spiffe::X509Svid> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(ctx) = self.client().await.fetch_x509_context().await
                && let Some(s) = ctx.svids().iter().find(|s| s.spiffe_id().to_string() == id)
            {
                return s.clone();
            }
            assert!(Instant::now() < deadline, "no SVID for {id}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn server_bundle(&self) -> sigil::BundleSet {
        let json = self.cli_ok(&["bundle", "show", "--format", "spiffe"]);
        let td = sigil::TrustDomain::new(TD).unwrap();
        [sigil::Bundle::parse_any(td, json.as_bytes()).unwrap()]
            .into_iter()
            .collect()
    }
}

pub fn rustix_uid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    // The uid this process runs as: a file it creates is owned by it.
    let f = tempfile::NamedTempFile::new().unwrap();
    f.as_file().metadata().unwrap().uid()
}

/// A compiled example of the root package, in `target/<profile>/examples/`.
/// `cargo test --workspace --all-features` builds the examples before the
/// tests run; `scripts/test` also builds them explicitly.
pub fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    let path = dir.join("examples").join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --examples --all-features` (or `cargo test --workspace --all-features`)",
        path.display()
    );
    path
}

/// An X.509-SVID for `id` from a CA Sigil never heard of (another trust
/// domain's, or a forged one).
pub fn foreign_svid(id: &str) -> sigil::X509Svid {
    use rcgen::{
        BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
        KeyUsagePurpose, SanType,
    };
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.subject_alt_names = vec![SanType::URI(id.try_into().unwrap())];
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let key = KeyPair::generate().unwrap();
    let cert = p
        .signed_by(&key, &Issuer::from_params(&ca, &ca_key))
        .unwrap();
    sigil::X509Svid::new(
        vec![cert.der().clone()],
        sigil::PrivateKey::from_pkcs8_der(key.serialize_der()),
    )
    .unwrap()
}
