//! Bundles fetched over HTTP(S) from a server's bundle or JWKS endpoint
//! (feature `http-source`), e.g. `sigil-server`'s `/bundle` or `/keys`.
//!
//! The first fetch must succeed. After that a background task refreshes the
//! bundle every `spiffe_refresh_hint` seconds (clamped to 5 s … 1 h; 5 min
//! when the document has none); a failed fetch or a document that does not
//! load keeps the last good bundle and is retried with backoff. The answer
//! is capped at [`crate::bundle::MAX_BUNDLE_BYTES`]; only status 200 counts.
//!
//! HTTPS uses the rustls client config you pass (its roots decide whom to
//! trust); plain HTTP is for loopback and tests.

use crate::bundle::{Bundle, BundleSet, MAX_BUNDLE_BYTES};
use crate::id::TrustDomain;
use crate::source::{BundleSource, SharedBundles};
use http_body_util::{BodyExt, Empty, Limited};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Per-request deadline.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a fetch failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HttpSourceError {
    /// Not an `http://` or `https://` URL with a host.
    #[error("bundle URL must be http:// or https://HOST[:PORT]/PATH")]
    BadUrl,
    /// `https://` without a TLS config.
    #[error("an https bundle URL needs a TLS client config")]
    NoTlsConfig,
    /// Connection, TLS or HTTP failure.
    #[error("fetching the bundle failed: {0}")]
    Fetch(String),
    /// A status other than 200.
    #[error("bundle endpoint answered HTTP {0}")]
    Status(u16),
    /// The document does not load.
    #[error("bundle document is invalid: {0}")]
    Bundle(String),
}

#[derive(Clone)]
struct Target {
    tls: bool,
    host: String,
    port: u16,
    uri: http::Uri,
}

fn parse_url(url: &str) -> Result<Target, HttpSourceError> {
    let uri: http::Uri = url.parse().map_err(|_| HttpSourceError::BadUrl)?;
    let tls = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => return Err(HttpSourceError::BadUrl),
    };
    let host = uri.host().ok_or(HttpSourceError::BadUrl)?.to_owned();
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    Ok(Target {
        tls,
        host,
        port,
        uri,
    })
}

async fn fetch(
    t: &Target,
    tls: Option<&Arc<rustls::ClientConfig>>,
    td: &TrustDomain,
) -> Result<Bundle, HttpSourceError> {
    let fail = |e: &dyn std::fmt::Display| HttpSourceError::Fetch(e.to_string());
    let tcp = tokio::net::TcpStream::connect((t.host.trim_matches(['[', ']']), t.port))
        .await
        .map_err(|e| fail(&e))?;
    let path = t
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "/".into());
    let req = http::Request::get(path)
        .header(http::header::HOST, format!("{}:{}", t.host, t.port))
        .header(http::header::ACCEPT, "application/json")
        .body(Empty::<bytes::Bytes>::new())
        .map_err(|e| fail(&e))?;
    let resp = if t.tls {
        let cfg = tls.ok_or(HttpSourceError::NoTlsConfig)?;
        let name =
            rustls::pki_types::ServerName::try_from(t.host.trim_matches(['[', ']']).to_owned())
                .map_err(|e| fail(&e))?;
        let stream = tokio_rustls::TlsConnector::from(cfg.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| fail(&e))?;
        send(hyper_util::rt::TokioIo::new(stream), req).await?
    } else {
        send(hyper_util::rt::TokioIo::new(tcp), req).await?
    };
    if resp.status() != http::StatusCode::OK {
        return Err(HttpSourceError::Status(resp.status().as_u16()));
    }
    let body = Limited::new(resp.into_body(), MAX_BUNDLE_BYTES)
        .collect()
        .await
        .map_err(|e| fail(&e))?
        .to_bytes();
    Bundle::parse_any(td.clone(), &body).map_err(|e| HttpSourceError::Bundle(e.to_string()))
}

async fn send<IO>(
    io: IO,
    req: http::Request<Empty<bytes::Bytes>>,
) -> Result<http::Response<hyper::body::Incoming>, HttpSourceError>
where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let fail = |e: &dyn std::fmt::Display| HttpSourceError::Fetch(e.to_string());
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| fail(&e))?;
    tokio::spawn(conn);
    sender.send_request(req).await.map_err(|e| fail(&e))
}

fn refresh_interval(b: &Bundle) -> Duration {
    Duration::from_secs(b.refresh_hint.unwrap_or(300).clamp(5, 3600))
}

/// A bundle kept current from an HTTP(S) endpoint.
#[derive(Debug)]
pub struct HttpBundleSource {
    shared: Arc<SharedBundles>,
    last_error: Arc<Mutex<Option<HttpSourceError>>>,
    task: tokio::task::JoinHandle<()>,
}

impl HttpBundleSource {
    /// Fetches `url` once (it must work), then keeps refreshing in the
    /// background. `tls` is required for `https://`.
    pub async fn start(
        url: &str,
        td: TrustDomain,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> Result<Self, HttpSourceError> {
        Self::start_with_refresh(url, td, tls, None).await
    }

    /// Like [`Self::start`], refreshing every `refresh` instead of per the
    /// document's `spiffe_refresh_hint`.
    pub async fn start_with_refresh(
        url: &str,
        td: TrustDomain,
        tls: Option<Arc<rustls::ClientConfig>>,
        refresh: Option<Duration>,
    ) -> Result<Self, HttpSourceError> {
        let target = parse_url(url)?;
        if target.tls && tls.is_none() {
            return Err(HttpSourceError::NoTlsConfig);
        }
        let first = tokio::time::timeout(FETCH_TIMEOUT, fetch(&target, tls.as_ref(), &td))
            .await
            .map_err(|_| HttpSourceError::Fetch("timed out".into()))??;
        let pick = move |b: &Bundle| refresh.unwrap_or_else(|| refresh_interval(b));
        let mut interval = pick(&first);
        let shared = Arc::new(SharedBundles::new([first].into_iter().collect()));
        let last_error = Arc::new(Mutex::new(None));
        let (s, errs) = (shared.clone(), last_error.clone());
        let task = tokio::spawn(async move {
            let mut backoff = Duration::from_secs(1);
            let mut wait = interval;
            loop {
                tokio::time::sleep(wait).await;
                let got = tokio::time::timeout(FETCH_TIMEOUT, fetch(&target, tls.as_ref(), &td))
                    .await
                    .unwrap_or_else(|_| Err(HttpSourceError::Fetch("timed out".into())));
                match got {
                    Ok(b) => {
                        interval = pick(&b);
                        s.update([b].into_iter().collect::<BundleSet>());
                        if let Ok(mut e) = errs.lock() {
                            *e = None;
                        }
                        backoff = Duration::from_secs(1);
                        wait = interval;
                    }
                    Err(e) => {
                        if let Ok(mut slot) = errs.lock() {
                            *slot = Some(e);
                        }
                        wait = backoff.min(interval);
                        backoff = (backoff * 2).min(Duration::from_secs(60));
                    }
                }
            }
        });
        Ok(Self {
            shared,
            last_error,
            task,
        })
    }

    /// The error of the last refresh, if it failed (the previous bundle is
    /// still in use).
    pub fn last_error(&self) -> Option<HttpSourceError> {
        self.last_error.lock().ok().and_then(|e| e.clone())
    }
}

impl BundleSource for HttpBundleSource {
    fn bundles(&self) -> Arc<BundleSet> {
        self.shared.bundles()
    }
}

impl Drop for HttpBundleSource {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert!(parse_url("http://127.0.0.1:8080/keys").is_ok());
        let t = parse_url("https://sigil.example.org/bundle").unwrap();
        assert!(t.tls && t.port == 443);
        assert_eq!(parse_url("ftp://x/y").err(), Some(HttpSourceError::BadUrl));
        assert_eq!(parse_url("/keys").err(), Some(HttpSourceError::BadUrl));
    }

    /// A one-shot HTTPS server (rcgen certificate for `localhost`) answering
    /// `status` with `body`; returns the port and the certificate.
    async fn https_once(
        status: &'static str,
        body: String,
    ) -> (u16, rustls::pki_types::CertificateDer<'static>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let der = cert.der().clone();
        let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![der.clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (tcp, _) = l.accept().await.unwrap();
            // A client that refuses our certificate ends the handshake.
            let Ok(mut tls) = acceptor.accept(tcp).await else {
                return;
            };
            let mut buf = Vec::new();
            let mut chunk = [0u8; 1024];
            while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = tls.read(&mut chunk).await.unwrap();
                if n == 0 {
                    break;
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            let resp = format!(
                "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            tls.write_all(resp.as_bytes()).await.unwrap();
            tls.shutdown().await.unwrap();
        });
        (port, der)
    }

    #[tokio::test]
    async fn fetches_over_https_with_the_given_roots_only() {
        let td = TrustDomain::new("example.org").unwrap();
        let pk = crate::PrivateKey::generate_p256()
            .unwrap()
            .public_key_sec1()
            .unwrap();
        let mut b = Bundle::empty(td.clone());
        b.jwt
            .add_key(crate::JwtKey::from_sec1("k9", &pk).unwrap())
            .unwrap();
        let doc = b.to_spiffe_json();

        let (port, cert) = https_once("200 OK", doc.clone()).await;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert).unwrap();
        let tls = Arc::new(
            rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::aws_lc_rs::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
        );
        let src = HttpBundleSource::start(
            &format!("https://localhost:{port}/bundle"),
            td.clone(),
            Some(tls),
        )
        .await
        .unwrap();
        assert!(src.bundles().get(&td).unwrap().jwt.key("k9").is_some());

        // A server whose certificate is not in the roots is refused.
        let (port, _) = https_once("200 OK", doc).await;
        let other_roots = Arc::new(
            rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::aws_lc_rs::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth(),
        );
        let err = HttpBundleSource::start(
            &format!("https://localhost:{port}/bundle"),
            td,
            Some(other_roots),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, HttpSourceError::Fetch(_)), "{err:?}");
    }

    #[tokio::test]
    async fn https_needs_a_tls_config() {
        let td = TrustDomain::new("example.org").unwrap();
        assert_eq!(
            HttpBundleSource::start("https://127.0.0.1:1/keys", td, None)
                .await
                .err(),
            Some(HttpSourceError::NoTlsConfig)
        );
    }
}
