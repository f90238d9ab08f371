//! The HTTP(S) endpoint (optional, `--http-listen`): what tools and
//! operators read without a client certificate.
//!
//! | path | body |
//! |---|---|
//! | `/bundle` | the SPIFFE bundle (JSON) |
//! | `/keys` | the JWT keys as a plain JWKS |
//! | `/.well-known/openid-configuration` | OIDC discovery (only when `jwt_issuer` is set, since JWT-SVIDs carry `iss` only then) |
//! | `/live` | 200 while the process runs |
//! | `/ready` | 200 when the store answers |
//! | `/metrics` | Prometheus text: audit events by method and outcome |
//!
//! It serves public data only. With `--http-tls-cert`/`--http-tls-key` it
//! serves HTTPS (TLS 1.2 and 1.3, rustls with aws-lc-rs) with that web-PKI
//! certificate, re-reading both files when they change
//! ([`FileCertResolver`]); OIDC federation needs HTTPS, so `jwt_issuer` must
//! then be an `https://` URL (checked at start).

use crate::state::ServerState;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use rustls::ServerConfig;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};
use tokio::net::TcpListener;

fn reply(status: StatusCode, ctype: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    if let Ok(v) = hyper::header::HeaderValue::from_str(ctype) {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

/// Answers one request.
pub fn handle(state: &ServerState, method: &Method, path: &str) -> Response<Full<Bytes>> {
    const JSON: &str = "application/json";
    const TEXT: &str = "text/plain; charset=utf-8";
    if method != Method::GET && method != Method::HEAD {
        return reply(StatusCode::METHOD_NOT_ALLOWED, TEXT, "method not allowed\n");
    }
    match path {
        "/bundle" => reply(StatusCode::OK, JSON, state.bundle().to_spiffe_json()),
        "/keys" => reply(StatusCode::OK, JSON, state.bundle().jwt.to_jwks_json()),
        "/.well-known/openid-configuration" => match &state.jwt_issuer {
            Some(iss) => {
                let iss = iss.trim_end_matches('/');
                let doc = serde_json::json!({
                    "issuer": iss,
                    "jwks_uri": format!("{iss}/keys"),
                    "id_token_signing_alg_values_supported": ["ES256"],
                    "response_types_supported": ["id_token"],
                    "subject_types_supported": ["public"],
                    "claims_supported": ["sub", "aud", "exp", "iat", "iss", "jti", "acr", "amr"],
                });
                reply(StatusCode::OK, JSON, doc.to_string())
            }
            None => reply(
                StatusCode::NOT_FOUND,
                TEXT,
                "OIDC discovery needs jwt_issuer in the server configuration\n",
            ),
        },
        "/live" => reply(StatusCode::OK, TEXT, "ok\n"),
        "/ready" => match state.store.trust_domain() {
            Ok(Some(_)) => reply(StatusCode::OK, TEXT, "ready\n"),
            _ => reply(StatusCode::SERVICE_UNAVAILABLE, TEXT, "not ready\n"),
        },
        "/metrics" => reply(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            state.metrics.prometheus(),
        ),
        _ => reply(StatusCode::NOT_FOUND, TEXT, "not found\n"),
    }
}

/// HTTPS certificate failures.
#[derive(Debug, thiserror::Error)]
#[error("HTTPS certificate: {0}")]
pub struct HttpTlsError(String);

/// Serves the certificate and key from two PEM files, re-reading them (at
/// most once a second, on a handshake) when either file's modification
/// time changes. A reload that fails keeps the previous certificate.
pub struct FileCertResolver {
    cert: PathBuf,
    key: PathBuf,
    current: RwLock<Loaded>,
    last_check: Mutex<Instant>,
}

struct Loaded {
    stamp: (Option<SystemTime>, Option<SystemTime>),
    ck: Arc<CertifiedKey>,
}

impl std::fmt::Debug for FileCertResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileCertResolver")
            .field("cert", &self.cert)
            .field("key", &self.key)
            .finish()
    }
}

fn mtime(p: &Path) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

fn load_pair(cert: &Path, key: &Path) -> Result<CertifiedKey, HttpTlsError> {
    use rustls_pki_types::pem::PemObject;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| HttpTlsError(format!("{}: {e}", cert.display())))?
        .collect::<Result<_, _>>()
        .map_err(|e| HttpTlsError(format!("{}: {e}", cert.display())))?;
    if chain.is_empty() {
        return Err(HttpTlsError(format!(
            "{}: no certificate in the file",
            cert.display()
        )));
    }
    let der = PrivateKeyDer::from_pem_file(key)
        .map_err(|_| HttpTlsError(format!("{}: no usable PEM private key", key.display())))?;
    let signer = rustls::crypto::aws_lc_rs::sign::any_supported_type(&der)
        .map_err(|e| HttpTlsError(format!("{}: {e}", key.display())))?;
    let ck = CertifiedKey::new(chain, signer);
    ck.keys_match()
        .map_err(|_| HttpTlsError("the private key does not match the certificate".into()))?;
    Ok(ck)
}

impl FileCertResolver {
    /// Loads the pair now (it must work).
    pub fn new(cert: PathBuf, key: PathBuf) -> Result<Self, HttpTlsError> {
        let stamp = (mtime(&cert), mtime(&key));
        let ck = Arc::new(load_pair(&cert, &key)?);
        Ok(Self {
            cert,
            key,
            current: RwLock::new(Loaded { stamp, ck }),
            last_check: Mutex::new(Instant::now()),
        })
    }

    fn current(&self) -> Arc<CertifiedKey> {
        match self.current.read() {
            Ok(g) => g.ck.clone(),
            Err(p) => p.into_inner().ck.clone(),
        }
    }

    /// Re-reads the files if they changed; returns true on a reload.
    pub fn reload_if_changed(&self) -> bool {
        let stamp = (mtime(&self.cert), mtime(&self.key));
        let same = match self.current.read() {
            Ok(g) => g.stamp == stamp,
            Err(p) => p.into_inner().stamp == stamp,
        };
        if same {
            return false;
        }
        match load_pair(&self.cert, &self.key) {
            Ok(ck) => {
                let mut g = match self.current.write() {
                    Ok(g) => g,
                    Err(p) => p.into_inner(),
                };
                *g = Loaded {
                    stamp,
                    ck: Arc::new(ck),
                };
                tracing::info!(cert = %self.cert.display(), "HTTPS certificate reloaded");
                true
            }
            Err(e) => {
                // Half-written files (cert renewed, key not yet): keep the
                // old pair and retry on a later handshake.
                tracing::warn!(error = %e, "HTTPS certificate reload failed; keeping the previous one");
                false
            }
        }
    }
}

impl ResolvesServerCert for FileCertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let due = match self.last_check.lock() {
            Ok(mut t) if t.elapsed() >= Duration::from_secs(1) => {
                *t = Instant::now();
                true
            }
            _ => false,
        };
        if due {
            self.reload_if_changed();
        }
        Some(self.current())
    }
}

/// The HTTPS server configuration: TLS 1.3 and 1.2, aws-lc-rs, no client
/// certificates, HTTP/1.1.
pub fn tls_config(resolver: Arc<FileCertResolver>) -> Result<Arc<ServerConfig>, HttpTlsError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| HttpTlsError(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

async fn serve_conn<IO>(io: IO, state: Arc<ServerState>)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
        let resp = handle(&state, req.method(), req.uri().path());
        async move { Ok::<_, std::convert::Infallible>(resp) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .serve_connection(hyper_util::rt::TokioIo::new(io), svc);
    if let Err(e) = conn.await {
        tracing::debug!(error = %e, "HTTP connection error");
    }
}

/// Serves HTTP/1.1 on `listener` (over TLS when `tls` is given) until the
/// task is dropped.
pub async fn serve(listener: TcpListener, state: Arc<ServerState>, tls: Option<Arc<ServerConfig>>) {
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    loop {
        let (sock, _) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "HTTP accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let state = state.clone();
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            match acceptor {
                None => serve_conn(sock, state).await,
                Some(a) => {
                    match tokio::time::timeout(Duration::from_secs(10), a.accept(sock)).await {
                        Ok(Ok(tls)) => serve_conn(tls, state).await,
                        Ok(Err(e)) => tracing::debug!(error = %e, "HTTPS handshake failed"),
                        Err(_) => tracing::debug!("HTTPS handshake timed out"),
                    }
                }
            }
        });
    }
}
