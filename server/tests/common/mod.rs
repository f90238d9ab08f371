//! Helpers for end-to-end tests: a real `sigil-server` process on a temp
//! dir and a free port, an admin client over its Unix socket, and node API
//! clients over real TLS 1.3.
#![allow(dead_code)]

use hyper_util::rt::TokioIo;
use rcgen::{KeyPair, PublicKeyData};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use sigil::proto::admin::v1 as admin;
use sigil::proto::node::v1 as node;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tonic::transport::{Channel, Endpoint};

pub const TD: &str = "example.org";

/// A running server, killed on drop.
pub struct Server {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub addr: SocketAddr,
    pub http: SocketAddr,
    pub admin_socket: PathBuf,
    /// Appended to the `sigil-server run` flags.
    pub extra_args: Vec<String>,
}

pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

impl Server {
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn audit_log(&self) -> PathBuf {
        self.data_dir().join("audit.log")
    }

    pub fn audit_lines(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.audit_log())
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// Starts a server on a fresh temp dir.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Same, with extra `sigil-server run` flags.
    pub fn start_with(extra: &[String]) -> Self {
        let mut s = Self::unstarted();
        s.extra_args = extra.to_vec();
        s.spawn_and_wait();
        s
    }

    /// A server on a fresh temp dir, not started yet (set `extra_args`,
    /// write files into `dir`, then `spawn_and_wait`).
    pub fn unstarted() -> Self {
        let dir = tempfile::tempdir().unwrap();
        Self {
            child: None,
            addr: SocketAddr::from(([127, 0, 0, 1], free_port())),
            http: SocketAddr::from(([127, 0, 0, 1], free_port())),
            admin_socket: dir.path().join("admin.sock"),
            extra_args: Vec::new(),
            dir,
        }
    }

    pub fn command(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_sigil-server"));
        c.arg("run")
            .arg("--data-dir")
            .arg(self.data_dir())
            .arg("--trust-domain")
            .arg(TD)
            .arg("--listen")
            .arg(self.addr.to_string())
            .arg("--admin-socket")
            .arg(&self.admin_socket)
            .arg("--http-listen")
            .arg(self.http.to_string())
            .arg("--jwt-issuer")
            .arg("https://sigil.example.org")
            .args(&self.extra_args)
            .env("RUST_LOG", "warn");
        c
    }

    pub fn spawn_and_wait(&mut self) {
        let child = self
            .command()
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let up = std::os::unix::net::UnixStream::connect(&self.admin_socket).is_ok()
                && std::net::TcpStream::connect(self.addr).is_ok()
                && std::net::TcpStream::connect(self.http).is_ok();
            if up {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("sigil-server exited early: {status}");
            }
            assert!(Instant::now() < deadline, "sigil-server did not start");
            std::thread::sleep(Duration::from_millis(30));
        }
    }

    /// SIGKILL and wait.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// A blocking HTTP/1.1 GET: (status, body).
    pub fn http_get(&self, path: &str) -> (u16, String) {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(self.http).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut resp = String::new();
        s.read_to_string(&mut resp).unwrap();
        let status = resp[9..12].parse().unwrap();
        let body = resp.split_once("\r\n\r\n").unwrap().1.to_owned();
        (status, body)
    }

    pub async fn admin(&self) -> admin::admin_client::AdminClient<Channel> {
        admin_client(&self.admin_socket).await
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

pub async fn admin_client(path: &Path) -> admin::admin_client::AdminClient<Channel> {
    let path = path.to_path_buf();
    let ch = Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                let s = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(TokioIo::new(s))
            }
        }))
        .await
        .unwrap();
    admin::admin_client::AdminClient::new(ch)
}

/// A P-256 key pair: SPKI DER and PKCS#8 DER.
pub struct Key {
    pub kp: KeyPair,
}

impl Key {
    pub fn new() -> Self {
        Self {
            kp: KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap(),
        }
    }
    pub fn spki(&self) -> Vec<u8> {
        self.kp.subject_public_key_info()
    }
    pub fn pkcs8(&self) -> Vec<u8> {
        self.kp.serialize_der()
    }
}

/// A node API channel over TLS 1.3, trusting `ca`, checking the server by
/// the name `localhost`, optionally presenting a client certificate.
/// `connects` counts TCP+TLS connections made.
pub async fn node_channel(
    addr: SocketAddr,
    ca: &CertificateDer<'static>,
    client: Option<(Vec<CertificateDer<'static>>, Vec<u8>)>,
    connects: Arc<AtomicUsize>,
) -> Result<node::node_client::NodeClient<Channel>, tonic::transport::Error> {
    Ok(node::node_client::NodeClient::new(
        tls_channel(addr, ca, client, connects).await?,
    ))
}

/// A gRPC channel over TLS 1.3 to the node port.
pub async fn tls_channel(
    addr: SocketAddr,
    ca: &CertificateDer<'static>,
    client: Option<(Vec<CertificateDer<'static>>, Vec<u8>)>,
    connects: Arc<AtomicUsize>,
) -> Result<Channel, tonic::transport::Error> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).unwrap();
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
    let ch = Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let connector = connector.clone();
            let connects = connects.clone();
            async move {
                let tcp = tokio::net::TcpStream::connect(addr).await?;
                let name = ServerName::try_from("localhost").unwrap();
                let tls = connector.connect(name, tcp).await?;
                connects.fetch_add(1, Ordering::SeqCst);
                Ok::<_, std::io::Error>(TokioIo::new(tls))
            }
        }))
        .await?;
    Ok(ch)
}

/// The CA certificate, from the admin API's bundle.
pub async fn ca_cert(server: &Server) -> CertificateDer<'static> {
    let b = server
        .admin()
        .await
        .get_bundle(admin::GetBundleRequest {})
        .await
        .unwrap()
        .into_inner();
    let bundle =
        sigil::Bundle::from_spiffe_json(sigil::TrustDomain::new(TD).unwrap(), b.spiffe.as_bytes())
            .unwrap();
    bundle.x509.authorities()[0].clone()
}

/// An attested agent: its SVID chain and key.
pub struct Agent {
    pub id: String,
    pub chain: Vec<CertificateDer<'static>>,
    pub key: Key,
}

pub async fn attest(server: &Server, ca: &CertificateDer<'static>) -> Agent {
    let token = server
        .admin()
        .await
        .create_join_token(admin::CreateJoinTokenRequest { ttl_seconds: 600 })
        .await
        .unwrap()
        .into_inner();
    let key = Key::new();
    let mut c = node_channel(server.addr, ca, None, Arc::default())
        .await
        .unwrap();
    let resp = c
        .attest(node::AttestRequest {
            method: Some(node::attest_request::Method::JoinToken(
                node::JoinTokenAttestation { token: token.token },
            )),
            public_key: key.spki(),
        })
        .await
        .unwrap()
        .into_inner();
    let Some(node::attest_response::Result::Svid(svid)) = resp.result else {
        panic!("no SVID");
    };
    assert_eq!(svid.spiffe_id, token.agent_id);
    Agent {
        id: svid.spiffe_id,
        chain: svid
            .cert_chain
            .into_iter()
            .map(CertificateDer::from)
            .collect(),
        key,
    }
}

impl Agent {
    pub async fn client(
        &self,
        server: &Server,
        ca: &CertificateDer<'static>,
        connects: Arc<AtomicUsize>,
    ) -> node::node_client::NodeClient<Channel> {
        node_channel(
            server.addr,
            ca,
            Some((self.chain.clone(), self.key.pkcs8())),
            connects,
        )
        .await
        .unwrap()
    }
}
