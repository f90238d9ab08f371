//! TLS 1.3 for the node API, terminated with tokio-rustls (tonic's TLS has
//! no hook for a custom verifier or for rotating certificates).
//!
//! - Server certificate: an X.509-SVID `spiffe://<td>/sigil/server` that
//!   also carries DNS SAN `localhost` and IP SAN `127.0.0.1` (plus any
//!   configured names), so an agent may check it by SPIFFE ID or by name.
//!   It is re-issued before it expires ([`CertResolver::refresh`]) and as
//!   soon as another X.509 CA becomes active.
//! - Client certificates are optional at the handshake (`Attest` has none)
//!   and, when present, must chain to a trust anchor of the current bundle
//!   ([`BundleClientVerifier`]: the anchors follow CA rotation). The handshake is only the
//!   first gate: the node API re-authenticates the presented chain and the
//!   agent's state on every call ([`PeerCerts`] carries the chain there).

use crate::ca::X509Cas;
use crate::model::now_unix;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sigil::{PrivateKey, SpiffeId};
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// The client certificate chain of a connection, if any: request
/// extensions carry it to every handler.
#[derive(Debug, Clone)]
pub struct PeerCerts(pub Option<Arc<Vec<CertificateDer<'static>>>>);

/// A server-side TLS connection that tells tonic its peer's certificates.
#[derive(Debug)]
pub struct TlsConn {
    inner: tokio_rustls::server::TlsStream<TcpStream>,
    peer: PeerCerts,
}

impl TlsConn {
    /// Wraps an accepted TLS stream.
    pub fn new(inner: tokio_rustls::server::TlsStream<TcpStream>) -> Self {
        let peer = PeerCerts(inner.get_ref().1.peer_certificates().map(|cs| {
            Arc::new(
                cs.iter()
                    .map(|c| c.clone().into_owned())
                    .collect::<Vec<_>>(),
            )
        }));
        Self { inner, peer }
    }
}

impl tonic::transport::server::Connected for TlsConn {
    type ConnectInfo = PeerCerts;

    fn connect_info(&self) -> PeerCerts {
        self.peer.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// TLS setup failures.
#[derive(Debug, thiserror::Error)]
#[error("TLS setup: {0}")]
pub struct TlsError(pub String);

/// Serves the current server certificate; [`Self::refresh`] replaces it.
#[derive(Debug)]
pub struct CertResolver {
    cas: Arc<X509Cas>,
    /// The certificate and the ID of the CA that signed it.
    current: RwLock<(Arc<CertifiedKey>, String)>,
    id: SpiffeId,
    dns: Vec<String>,
    ips: Vec<IpAddr>,
    ttl: i64,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn issue_server_cert(
    ca: &X509Cas,
    id: &SpiffeId,
    dns: &[String],
    ips: &[IpAddr],
    ttl: i64,
) -> Result<(CertifiedKey, i64), TlsError> {
    let key = PrivateKey::generate_p256().map_err(|e| TlsError(e.to_string()))?;
    let kp =
        rcgen::KeyPair::try_from(key.secret_pkcs8_der()).map_err(|e| TlsError(e.to_string()))?;
    let issued = ca
        .issue(
            &rcgen::PublicKeyData::subject_public_key_info(&kp),
            id,
            dns,
            ips,
            ttl,
            now_unix(),
        )
        .map_err(|e| TlsError(e.to_string()))?;
    // Leaf (and intermediate): the root is what the peer trusts, not
    // something to send.
    let chain = issued.chain;
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.secret_pkcs8_der().to_vec()));
    let signer = rustls::crypto::aws_lc_rs::sign::any_ecdsa_type(&der)
        .map_err(|e| TlsError(e.to_string()))?;
    Ok((CertifiedKey::new(chain, signer), issued.not_after))
}

impl CertResolver {
    /// Issues the first server certificate.
    pub fn new(
        ca: Arc<X509Cas>,
        id: SpiffeId,
        mut dns: Vec<String>,
        mut ips: Vec<IpAddr>,
        ttl: i64,
    ) -> Result<Self, TlsError> {
        if !dns.iter().any(|d| d == "localhost") {
            dns.push("localhost".into());
        }
        let lo = IpAddr::from([127, 0, 0, 1]);
        if !ips.contains(&lo) {
            ips.push(lo);
        }
        let ca_id = ca.active_id();
        let (ck, _) = issue_server_cert(&ca, &id, &dns, &ips, ttl)?;
        Ok(Self {
            cas: ca,
            current: RwLock::new((Arc::new(ck), ca_id)),
            id,
            dns,
            ips,
            ttl,
        })
    }

    /// Issues a fresh server certificate with the active CA and serves it
    /// from now on.
    pub fn refresh(&self) -> Result<Arc<CertifiedKey>, TlsError> {
        let ca_id = self.cas.active_id();
        let (ck, _) = issue_server_cert(&self.cas, &self.id, &self.dns, &self.ips, self.ttl)?;
        let ck = Arc::new(ck);
        match self.current.write() {
            Ok(mut g) => *g = (ck.clone(), ca_id),
            Err(p) => *p.into_inner() = (ck.clone(), ca_id),
        }
        Ok(ck)
    }

    /// The ID of the CA that signed the certificate served now.
    pub fn issuer_id(&self) -> String {
        match self.current.read() {
            Ok(g) => g.1.clone(),
            Err(p) => p.into_inner().1.clone(),
        }
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let (ck, ca_id) = match self.current.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        };
        // Another CA became active (an operator's `keys activate`): sign
        // with it from now on, so the certificate outlives the old CA's
        // removal from the bundle.
        if ca_id != self.cas.active_id() {
            match self.refresh() {
                Ok(fresh) => return Some(fresh),
                Err(e) => tracing::error!(error = %e, "server certificate re-issue failed"),
            }
        }
        Some(ck)
    }
}

/// Checks client certificates against the trust anchors of the current
/// bundle, rebuilding its webpki verifier when the anchors change.
pub struct BundleClientVerifier {
    cas: Arc<X509Cas>,
    current: RwLock<(Vec<CertificateDer<'static>>, Arc<dyn ClientCertVerifier>)>,
}

impl std::fmt::Debug for BundleClientVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BundleClientVerifier")
    }
}

fn webpki_verifier(
    anchors: &[CertificateDer<'static>],
) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for a in anchors {
        roots.add(a.clone()).map_err(|e| TlsError(e.to_string()))?;
    }
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .allow_unauthenticated()
        .build()
        .map_err(|e| TlsError(e.to_string()))
}

impl BundleClientVerifier {
    /// A verifier over the anchors of `cas`.
    pub fn new(cas: Arc<X509Cas>) -> Result<Self, TlsError> {
        let anchors = cas.anchors();
        let v = webpki_verifier(&anchors)?;
        Ok(Self {
            cas,
            current: RwLock::new((anchors, v)),
        })
    }

    fn verifier(&self) -> Arc<dyn ClientCertVerifier> {
        let anchors = self.cas.anchors();
        {
            let g = match self.current.read() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            if g.0 == anchors {
                return g.1.clone();
            }
        }
        match webpki_verifier(&anchors) {
            Ok(v) => {
                let mut g = match self.current.write() {
                    Ok(g) => g,
                    Err(p) => p.into_inner(),
                };
                *g = (anchors, v.clone());
                v
            }
            Err(e) => {
                tracing::error!(error = %e, "client verifier rebuild failed");
                match self.current.read() {
                    Ok(g) => g.1.clone(),
                    Err(p) => p.into_inner().1.clone(),
                }
            }
        }
    }
}

impl ClientCertVerifier for BundleClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: rustls_pki_types::UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.verifier()
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.verifier().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.verifier().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.verifier().supported_verify_schemes()
    }
}

/// The node API's TLS 1.3 server configuration: full handshakes only.
pub fn server_config(
    ca: Arc<X509Cas>,
    resolver: Arc<CertResolver>,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let verifier = Arc::new(BundleClientVerifier::new(ca)?);
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(resolver);
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    // No session resumption: a resumed session presents no certificate, so
    // the client verifier (chain against the current bundle) would not run
    // again. Agents keep their connections open; a full handshake per
    // connection costs them nothing noticeable.
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    cfg.send_tls13_tickets = 0;
    Ok(Arc::new(cfg))
}
