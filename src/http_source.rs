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
//! trust); plain HTTP is for loopback and tests. Redirects are not followed.
//!
//! # OIDC discovery
//!
//! [`HttpBundleSource::start_oidc`] starts from an issuer URL (a server's
//! `jwt_issuer`): it reads `<issuer>/.well-known/openid-configuration`
//! once (OpenID Connect Discovery 1.0 §4), takes its `jwks_uri`, then
//! refreshes the JWKS there as above. It refuses, before trusting any key:
//!
//! - an issuer that is not `https://`, except `http://` to a loopback host
//!   (`localhost`, 127.0.0.0/8, `::1`), and any issuer with a query,
//!   fragment or userinfo;
//! - a discovery document that is not 200, not a JSON object (duplicate
//!   members included), or over [`MAX_DISCOVERY_BYTES`];
//! - an `issuer` member different from the issuer asked for (§4.3; a
//!   trailing `/` aside);
//! - a `jwks_uri` that is missing or not a string, or that is not
//!   `https://` — except, for an `http://` loopback issuer, `http://` on
//!   the issuer's own origin (same host and port). So `https://` is never
//!   downgraded, plain HTTP never leaves the machine, and an `https://`
//!   `jwks_uri` on another host is accepted as OIDC allows: the document
//!   came over TLS from the issuer, and the host is checked with the same
//!   roots.
//!
//! The discovery document is read once; a `jwks_uri` that changes later
//! needs a new source.

use crate::bundle::{Bundle, BundleSet, MAX_BUNDLE_BYTES};
use crate::id::TrustDomain;
use crate::source::{BundleSource, SharedBundles};
use http_body_util::{BodyExt, Empty, Limited};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Per-request deadline.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// The largest OIDC discovery document read.
pub const MAX_DISCOVERY_BYTES: usize = 64 * 1024;

/// Where OIDC Discovery puts the provider configuration, under the issuer.
pub const DISCOVERY_PATH: &str = "/.well-known/openid-configuration";

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
    /// An OIDC issuer that is not `https://` (or `http://` to a loopback
    /// host), or has a query, fragment or userinfo.
    #[error("OIDC issuer must be https://HOST[:PORT][/PATH] (http:// only to a loopback host)")]
    BadIssuer,
    /// The discovery document is not JSON, not an object, or names
    /// another issuer.
    #[error("OIDC discovery document is invalid: {0}")]
    Discovery(String),
    /// The discovery document's `jwks_uri` is missing or not allowed.
    #[error("OIDC jwks_uri refused: {0}")]
    JwksUri(String),
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
    let body = fetch_body(t, tls, MAX_BUNDLE_BYTES).await?;
    Bundle::parse_any(td.clone(), &body).map_err(|e| HttpSourceError::Bundle(e.to_string()))
}

/// One GET; the body of a 200 answer, at most `limit` bytes.
async fn fetch_body(
    t: &Target,
    tls: Option<&Arc<rustls::ClientConfig>>,
    limit: usize,
) -> Result<bytes::Bytes, HttpSourceError> {
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
    Ok(Limited::new(resp.into_body(), limit)
        .collect()
        .await
        .map_err(|e| fail(&e))?
        .to_bytes())
}

/// Whether `host` (as in a URL, IPv6 in brackets) is this machine.
fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// An issuer URL, checked (see the module docs), without a trailing `/`.
fn parse_issuer(issuer: &str) -> Result<(String, Target), HttpSourceError> {
    if issuer.contains(['?', '#', '@']) {
        return Err(HttpSourceError::BadIssuer);
    }
    let issuer = issuer.trim_end_matches('/');
    let t = parse_url(issuer).map_err(|_| HttpSourceError::BadIssuer)?;
    if !t.tls && !is_loopback(&t.host) {
        return Err(HttpSourceError::BadIssuer);
    }
    Ok((issuer.to_owned(), t))
}

/// Checks a discovery document's `jwks_uri` against the issuer it came from.
fn check_jwks_uri(issuer: &Target, jwks_uri: &str) -> Result<Target, HttpSourceError> {
    let refused = |why: &str| HttpSourceError::JwksUri(why.to_owned());
    if jwks_uri.contains(['#', '@']) {
        return Err(refused("it has a fragment or userinfo"));
    }
    let t = parse_url(jwks_uri).map_err(|_| refused("not an http(s) URL with a host"))?;
    if t.tls {
        return Ok(t);
    }
    if issuer.tls {
        return Err(refused("http:// for an https:// issuer"));
    }
    // http:// only on the loopback issuer's own origin.
    if !t.host.eq_ignore_ascii_case(&issuer.host) || t.port != issuer.port {
        return Err(refused("http:// on another origin than the issuer"));
    }
    Ok(t)
}

/// Reads `<issuer>/.well-known/openid-configuration` and returns its
/// checked `jwks_uri` (see the module docs for the rules). `tls` is
/// required for `https://`.
pub async fn discover_jwks_uri(
    issuer: &str,
    tls: Option<&Arc<rustls::ClientConfig>>,
) -> Result<String, HttpSourceError> {
    let (issuer, t) = parse_issuer(issuer)?;
    if t.tls && tls.is_none() {
        return Err(HttpSourceError::NoTlsConfig);
    }
    let mut doc_target =
        parse_url(&format!("{issuer}{DISCOVERY_PATH}")).map_err(|_| HttpSourceError::BadIssuer)?;
    doc_target.host.clone_from(&t.host);
    let body = tokio::time::timeout(
        FETCH_TIMEOUT,
        fetch_body(&doc_target, tls, MAX_DISCOVERY_BYTES),
    )
    .await
    .map_err(|_| HttpSourceError::Fetch("timed out".into()))??;
    let invalid = |why: String| HttpSourceError::Discovery(why);
    let doc = crate::json::parse_strict(&body).map_err(|e| invalid(e.to_string()))?;
    let doc = doc
        .as_object()
        .ok_or_else(|| invalid("not a JSON object".into()))?;
    match doc.get("issuer").and_then(|v| v.as_str()) {
        Some(got) if got.trim_end_matches('/') == issuer => {}
        Some(_) => return Err(invalid("its issuer is another one".into())),
        None => return Err(invalid("no issuer".into())),
    }
    let jwks_uri = match doc.get("jwks_uri") {
        Some(serde_json::Value::String(u)) => u,
        Some(_) => return Err(HttpSourceError::JwksUri("not a string".into())),
        None => return Err(HttpSourceError::JwksUri("missing".into())),
    };
    check_jwks_uri(&t, jwks_uri)?;
    if jwks_uri.starts_with("https:") && tls.is_none() {
        return Err(HttpSourceError::NoTlsConfig);
    }
    Ok(jwks_uri.clone())
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

    /// OIDC discovery: reads `<issuer>/.well-known/openid-configuration`,
    /// checks it and its `jwks_uri` (see the module docs), then keeps the
    /// JWKS at `jwks_uri` current as [`Self::start`] does. `tls` is required
    /// when the issuer or the `jwks_uri` is `https://`.
    pub async fn start_oidc(
        issuer: &str,
        td: TrustDomain,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> Result<Self, HttpSourceError> {
        let jwks_uri = discover_jwks_uri(issuer, tls.as_ref()).await?;
        Self::start(&jwks_uri, td, tls).await
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

    /// A TLS server config for `localhost` (rcgen, self-signed) and its
    /// certificate.
    fn localhost_tls() -> (
        Arc<rustls::ServerConfig>,
        rustls::pki_types::CertificateDer<'static>,
    ) {
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
        (Arc::new(cfg), der)
    }

    /// A one-shot HTTP server (HTTPS with `tls`) on 127.0.0.1 answering the
    /// first request with what `answer(port)` returns; gives the port and
    /// the request line it got.
    async fn serve_once(
        tls: Option<Arc<rustls::ServerConfig>>,
        answer: impl FnOnce(u16) -> (&'static str, String) + Send + 'static,
    ) -> (u16, tokio::sync::oneshot::Receiver<String>) {
        use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
        async fn reply<S: AsyncRead + AsyncWrite + Unpin>(
            mut s: S,
            status: &str,
            body: &str,
        ) -> String {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 1024];
            while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = s.read(&mut chunk).await.unwrap_or(0);
                if n == 0 {
                    break;
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            let resp = format!(
                "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            // The client may hang up early (an answer over its limit).
            let _ = s.write_all(resp.as_bytes()).await;
            let _ = s.shutdown().await;
            String::from_utf8_lossy(&buf)
                .lines()
                .next()
                .unwrap_or_default()
                .to_owned()
        }
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let (status, body) = answer(port);
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let (tcp, _) = l.accept().await.unwrap();
            let line = match tls {
                // A client that refuses our certificate ends the handshake.
                Some(cfg) => match tokio_rustls::TlsAcceptor::from(cfg).accept(tcp).await {
                    Ok(s) => reply(s, status, &body).await,
                    Err(_) => return,
                },
                None => reply(tcp, status, &body).await,
            };
            let _ = tx.send(line);
        });
        (port, rx)
    }

    /// A one-shot HTTPS server for `localhost` answering `status` with
    /// `body`; returns the port and the certificate.
    async fn https_once(
        status: &'static str,
        body: String,
    ) -> (u16, rustls::pki_types::CertificateDer<'static>) {
        let (cfg, der) = localhost_tls();
        let (port, _) = serve_once(Some(cfg), move |_| (status, body)).await;
        (port, der)
    }

    fn client_tls(
        roots: &[rustls::pki_types::CertificateDer<'static>],
    ) -> Arc<rustls::ClientConfig> {
        let mut store = rustls::RootCertStore::empty();
        for r in roots {
            store.add(r.clone()).unwrap();
        }
        Arc::new(
            rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::aws_lc_rs::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(store)
            .with_no_client_auth(),
        )
    }

    #[test]
    fn issuer_rules() {
        let ok = |i: &str| parse_issuer(i).map(|(s, _)| s);
        assert_eq!(
            ok("https://sigil.example.org").unwrap(),
            "https://sigil.example.org"
        );
        assert_eq!(
            ok("https://sigil.example.org/t1/").unwrap(),
            "https://sigil.example.org/t1"
        );
        for loopback in [
            "http://127.0.0.1:8082",
            "http://127.8.9.1",
            "http://localhost:1",
            "http://[::1]:1",
        ] {
            assert!(ok(loopback).is_ok(), "{loopback}");
        }
        for bad in [
            "http://sigil.example.org",
            "http://10.0.0.1:8082",
            "http://[::2]:1",
            "ftp://localhost/",
            "localhost:8082",
            "https://sigil.example.org?x=1",
            "https://sigil.example.org#x",
            "https://user@sigil.example.org",
        ] {
            assert_eq!(ok(bad), Err(HttpSourceError::BadIssuer), "{bad}");
        }
    }

    #[test]
    fn jwks_uri_rules() {
        let https = parse_url("https://sigil.example.org").unwrap();
        let local = parse_url("http://127.0.0.1:8082").unwrap();
        assert!(check_jwks_uri(&https, "https://sigil.example.org/keys").is_ok());
        // Another https host: allowed, as OIDC does (checked with the roots).
        assert!(check_jwks_uri(&https, "https://keys.example.net/jwks?v=1").is_ok());
        assert!(check_jwks_uri(&local, "http://127.0.0.1:8082/keys").is_ok());
        assert!(check_jwks_uri(&local, "https://keys.example.net/jwks").is_ok());
        for (issuer, bad) in [
            (&https, "http://sigil.example.org/keys"),
            (&https, "ftp://sigil.example.org/keys"),
            (&https, "file:///etc/keys"),
            (&https, "/keys"),
            (&https, "https://sigil.example.org/keys#k"),
            (&https, "https://u:p@sigil.example.org/keys"),
            (&local, "http://127.0.0.1:9999/keys"),
            (&local, "http://10.0.0.1:8082/keys"),
            (&local, "http://localhost:8082/keys"),
        ] {
            assert!(
                matches!(
                    check_jwks_uri(issuer, bad),
                    Err(HttpSourceError::JwksUri(_))
                ),
                "{bad}"
            );
        }
    }

    /// Serves one discovery document over plain HTTP (`doc(issuer)`) and
    /// runs discovery against it.
    async fn discover(
        status: &'static str,
        doc: impl FnOnce(&str) -> String + Send + 'static,
    ) -> Result<String, HttpSourceError> {
        let (port, got) = serve_once(None, move |port| {
            (status, doc(&format!("http://127.0.0.1:{port}")))
        })
        .await;
        let r = discover_jwks_uri(&format!("http://127.0.0.1:{port}"), None).await;
        assert_eq!(
            got.await.unwrap(),
            "GET /.well-known/openid-configuration HTTP/1.1"
        );
        r
    }

    #[tokio::test]
    async fn discovery_refusals() {
        // The good case, then one defect at a time.
        let good = |iss: &str| format!(r#"{{"issuer":"{iss}","jwks_uri":"{iss}/keys"}}"#);
        let uri = discover("200 OK", good).await.unwrap();
        assert!(uri.starts_with("http://127.0.0.1:") && uri.ends_with("/keys"));

        let jwks =
            |e: Result<String, HttpSourceError>| matches!(e, Err(HttpSourceError::JwksUri(_)));
        let doc =
            |e: Result<String, HttpSourceError>| matches!(e, Err(HttpSourceError::Discovery(_)));
        assert!(jwks(
            discover("200 OK", |iss| format!(r#"{{"issuer":"{iss}"}}"#)).await
        ));
        assert!(jwks(
            discover("200 OK", |iss| format!(
                r#"{{"issuer":"{iss}","jwks_uri":7}}"#
            ))
            .await
        ));
        assert!(jwks(
            discover("200 OK", |iss| format!(
                r#"{{"issuer":"{iss}","jwks_uri":"ftp://127.0.0.1/keys"}}"#
            ))
            .await
        ));
        assert!(jwks(
            discover("200 OK", |iss| format!(
                r#"{{"issuer":"{iss}","jwks_uri":"http://127.0.0.1:1/keys"}}"#
            ))
            .await
        ));
        assert!(doc(discover("200 OK", |iss| format!(
            r#"{{"issuer":"{iss}","jwks_uri":"#
        ))
        .await));
        assert!(doc(discover("200 OK", |_| "not json".into()).await));
        assert!(doc(
            discover("200 OK", |iss| format!(r#"["{iss}/keys"]"#)).await
        ));
        assert!(doc(discover("200 OK", |iss| format!(
            r#"{{"issuer":"{iss}","jwks_uri":"{iss}/keys","jwks_uri":"https://evil.example/keys"}}"#
        ))
        .await));
        assert!(doc(discover("200 OK", |iss| format!(
            r#"{{"issuer":"https://other.example","jwks_uri":"{iss}/keys"}}"#
        ))
        .await));
        assert!(doc(discover("200 OK", |iss| format!(
            r#"{{"jwks_uri":"{iss}/keys"}}"#
        ))
        .await));
        assert_eq!(
            discover("404 Not Found", |_| String::new()).await,
            Err(HttpSourceError::Status(404))
        );
        assert_eq!(
            discover("302 Found", |_| String::new()).await,
            Err(HttpSourceError::Status(302))
        );
        let huge = discover("200 OK", |iss| {
            format!(
                r#"{{"issuer":"{iss}","jwks_uri":"{iss}/keys","x":"{}"}}"#,
                "a".repeat(MAX_DISCOVERY_BYTES)
            )
        })
        .await;
        assert!(matches!(huge, Err(HttpSourceError::Fetch(_))), "{huge:?}");
    }

    #[tokio::test]
    async fn https_issuer_never_downgrades() {
        let (cfg, cert) = localhost_tls();
        let (port, _) = serve_once(Some(cfg), |port| {
            let iss = format!("https://localhost:{port}");
            (
                "200 OK",
                format!(r#"{{"issuer":"{iss}","jwks_uri":"http://localhost:{port}/keys"}}"#),
            )
        })
        .await;
        let tls = client_tls(&[cert]);
        let err = discover_jwks_uri(&format!("https://localhost:{port}"), Some(&tls))
            .await
            .unwrap_err();
        assert!(matches!(err, HttpSourceError::JwksUri(_)), "{err:?}");

        // An https jwks_uri is taken, and needs a TLS config.
        let (cfg, cert) = localhost_tls();
        let (port, _) = serve_once(Some(cfg), |port| {
            let iss = format!("https://localhost:{port}");
            (
                "200 OK",
                format!(r#"{{"issuer":"{iss}","jwks_uri":"{iss}/keys"}}"#),
            )
        })
        .await;
        let uri = discover_jwks_uri(
            &format!("https://localhost:{port}/"),
            Some(&client_tls(&[cert])),
        )
        .await
        .unwrap();
        assert_eq!(uri, format!("https://localhost:{port}/keys"));
        assert_eq!(
            discover_jwks_uri("https://localhost:1", None).await,
            Err(HttpSourceError::NoTlsConfig)
        );
        // A plain-HTTP issuer that is not this machine: refused before any
        // connection.
        assert_eq!(
            HttpBundleSource::start_oidc(
                "http://192.0.2.1:8082",
                TrustDomain::new("a.org").unwrap(),
                None
            )
            .await
            .err(),
            Some(HttpSourceError::BadIssuer)
        );
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
        let tls = client_tls(&[cert]);
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
        let other_roots = client_tls(&[]);
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
