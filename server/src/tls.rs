//! TLS 1.3 for the node API, terminated with tokio-rustls (tonic's TLS has
//! no hook for a custom verifier or for rotating certificates).
//!
//! - Server certificate: an X.509-SVID `spiffe://<td>/sigil/server` that
//!   also carries DNS SAN `localhost` and IP SAN `127.0.0.1` (plus any
//!   configured names), so an agent may check it by SPIFFE ID or by name.
//!   It is re-issued before it expires ([`CertResolver::refresh`]).
//! - Client certificates are optional at the handshake (`Attest` has none)
//!   and, when present, must chain to the CA. The handshake is only the
//!   first gate: the node API re-authenticates the presented chain and the
//!   agent's state on every call ([`PeerCerts`] carries the chain there).

use crate::ca::Ca;
use crate::model::now_unix;
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
    current: RwLock<Arc<CertifiedKey>>,
    id: SpiffeId,
    dns: Vec<String>,
    ips: Vec<IpAddr>,
    ttl: i64,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn issue_server_cert(
    ca: &Ca,
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
    // Leaf only: the root is what the peer trusts, not something to send.
    let chain = issued.chain;
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.secret_pkcs8_der().to_vec()));
    let signer = rustls::crypto::aws_lc_rs::sign::any_ecdsa_type(&der)
        .map_err(|e| TlsError(e.to_string()))?;
    Ok((CertifiedKey::new(chain, signer), issued.not_after))
}

impl CertResolver {
    /// Issues the first server certificate.
    pub fn new(
        ca: &Ca,
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
        let (ck, _) = issue_server_cert(ca, &id, &dns, &ips, ttl)?;
        Ok(Self {
            current: RwLock::new(Arc::new(ck)),
            id,
            dns,
            ips,
            ttl,
        })
    }

    /// Issues a fresh server certificate and serves it from now on.
    pub fn refresh(&self, ca: &Ca) -> Result<(), TlsError> {
        let (ck, _) = issue_server_cert(ca, &self.id, &self.dns, &self.ips, self.ttl)?;
        match self.current.write() {
            Ok(mut g) => *g = Arc::new(ck),
            Err(p) => *p.into_inner() = Arc::new(ck),
        }
        Ok(())
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        match self.current.read() {
            Ok(g) => Some(g.clone()),
            Err(p) => Some(p.into_inner().clone()),
        }
    }
}

/// The node API's TLS 1.3 server configuration.
pub fn server_config(
    ca: &Ca,
    resolver: Arc<CertResolver>,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(ca.cert().clone())
        .map_err(|e| TlsError(e.to_string()))?;
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .allow_unauthenticated()
        .build()
        .map_err(|e| TlsError(e.to_string()))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(resolver);
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}
