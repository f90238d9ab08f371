//! SPIFFE mutual TLS with rustls (feature `tls`).
//!
//! - [`SpiffeServerVerifier`] (for clients) and [`SpiffeClientVerifier`] (for
//!   servers) verify the peer's X.509-SVID with [`crate::verify_x509_svid`]:
//!   the SPIFFE certificate rules, path building to an authority of the
//!   peer's **own** trust domain, then an [`Authorizer`]. Host names are not
//!   checked (SVIDs carry a URI SAN, not a DNS name): the authorizer is the
//!   name check.
//! - [`SvidResolver`] presents the current X.509-SVID; [`SvidResolver::update`]
//!   swaps it without restarting, and new handshakes use the new one.
//! - Bundles are read through a [`BundleSource`] at every handshake, so a
//!   bundle update applies to the next connection.
//! - [`mtls_server_config`] and [`mtls_client_config`] turn TLS session
//!   resumption off on their side: a resumed session carries no
//!   certificates, so it would run neither verifier and would show the
//!   peer identity of the session it resumes. Every connection is a full
//!   handshake instead, presenting the current SVID and checked against
//!   the current bundles and authorizer. (A config built otherwise, e.g.
//!   with the verifiers alone, should do the same.)
//!
//! TLS 1.3 only, aws-lc-rs provider.
//!
//! Not done here: re-checking a connection that is already open when a
//! bundle changes or a peer is revoked — an application that needs that must
//! check on each request.

use crate::source::BundleSource;
use crate::svid::x509::X509Svid;
use crate::validate::x509::Authorizer;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use std::sync::{Arc, RwLock};
use std::time::{Duration, UNIX_EPOCH};

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn algorithms() -> WebPkiSupportedAlgorithms {
    rustls::crypto::aws_lc_rs::default_provider().signature_verification_algorithms
}

fn verify_peer(
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
    bundles: &dyn BundleSource,
    authorizer: &dyn Authorizer,
) -> Result<(), rustls::Error> {
    let mut chain = Vec::with_capacity(1 + intermediates.len());
    chain.push(end_entity.clone());
    chain.extend(intermediates.iter().cloned());
    let now = UNIX_EPOCH + Duration::from_secs(now.as_secs());
    crate::verify_x509_svid(&chain, &bundles.bundles(), now, authorizer)
        .map(|_| ())
        .map_err(|e| rustls::Error::General(format!("peer X.509-SVID refused: {e}")))
}

/// What both verifiers share: the bundles, the authorizer and the handshake
/// signature algorithms.
struct PeerCheck {
    bundles: Arc<dyn BundleSource>,
    authorizer: Arc<dyn Authorizer>,
    algs: WebPkiSupportedAlgorithms,
}

impl PeerCheck {
    fn new(bundles: Arc<dyn BundleSource>, authorizer: Arc<dyn Authorizer>) -> Self {
        Self {
            bundles,
            authorizer,
            algs: algorithms(),
        }
    }

    fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<(), rustls::Error> {
        verify_peer(
            end_entity,
            intermediates,
            now,
            self.bundles.as_ref(),
            self.authorizer.as_ref(),
        )
    }

    /// The configs built here are TLS 1.3 only.
    fn tls12(&self) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn tls13(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }
}

/// A rustls server-certificate verifier for SPIFFE peers.
pub struct SpiffeServerVerifier(PeerCheck);

impl std::fmt::Debug for SpiffeServerVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SpiffeServerVerifier")
    }
}

impl SpiffeServerVerifier {
    /// Verifies servers against `bundles`, then `authorizer`.
    pub fn new(bundles: Arc<dyn BundleSource>, authorizer: Arc<dyn Authorizer>) -> Self {
        Self(PeerCheck::new(bundles, authorizer))
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.0.verify(end_entity, intermediates, now)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.tls12()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.algs.supported_schemes()
    }
}

/// A rustls client-certificate verifier for SPIFFE peers; a client
/// certificate is mandatory.
pub struct SpiffeClientVerifier(PeerCheck);

impl std::fmt::Debug for SpiffeClientVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SpiffeClientVerifier")
    }
}

impl SpiffeClientVerifier {
    /// Verifies clients against `bundles`, then `authorizer`.
    pub fn new(bundles: Arc<dyn BundleSource>, authorizer: Arc<dyn Authorizer>) -> Self {
        Self(PeerCheck::new(bundles, authorizer))
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.0.verify(end_entity, intermediates, now)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.tls12()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.algs.supported_schemes()
    }
}

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// The SVID's key is not usable by rustls.
    #[error("SVID private key is not usable for TLS")]
    Key,
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// Presents the current X.509-SVID, as server or client; swap it with
/// [`Self::update`] when the SVID rotates.
pub struct SvidResolver {
    current: RwLock<Arc<CertifiedKey>>,
}

impl std::fmt::Debug for SvidResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SvidResolver")
    }
}

fn certified_key(svid: &X509Svid) -> Result<Arc<CertifiedKey>, TlsError> {
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(
        svid.private_key().secret_pkcs8_der().to_vec().into(),
    );
    let signing = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|_| TlsError::Key)?;
    Ok(Arc::new(CertifiedKey::new(svid.chain().to_vec(), signing)))
}

impl SvidResolver {
    /// Starts with `svid`.
    pub fn new(svid: &X509Svid) -> Result<Self, TlsError> {
        Ok(Self {
            current: RwLock::new(certified_key(svid)?),
        })
    }

    /// Starts with a certificate chain (leaf first) whose private key is
    /// held elsewhere, such as a TPM: `key` signs the handshakes. The caller
    /// has checked that the leaf certifies `key`.
    pub fn with_signing_key(
        chain: Vec<CertificateDer<'static>>,
        key: Arc<dyn rustls::sign::SigningKey>,
    ) -> Self {
        Self {
            current: RwLock::new(Arc::new(CertifiedKey::new(chain, key))),
        }
    }

    /// Replaces the presented chain and key (see [`Self::with_signing_key`]).
    pub fn update_with_signing_key(
        &self,
        chain: Vec<CertificateDer<'static>>,
        key: Arc<dyn rustls::sign::SigningKey>,
    ) {
        self.set(Arc::new(CertifiedKey::new(chain, key)));
    }

    /// Replaces the presented SVID; new handshakes use it.
    pub fn update(&self, svid: &X509Svid) -> Result<(), TlsError> {
        self.set(certified_key(svid)?);
        Ok(())
    }

    fn set(&self, ck: Arc<CertifiedKey>) {
        match self.current.write() {
            Ok(mut g) => *g = ck,
            Err(poisoned) => *poisoned.into_inner() = ck,
        }
    }

    fn get(&self) -> Arc<CertifiedKey> {
        match self.current.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }
}

impl rustls::server::ResolvesServerCert for SvidResolver {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.get())
    }
}

impl rustls::client::ResolvesClientCert for SvidResolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.get())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// A TLS 1.3 server config that presents `resolver`'s SVID and requires a
/// client SVID that `authorizer` accepts. Session resumption is off: every
/// connection is a full handshake (see the module docs).
pub fn mtls_server_config(
    resolver: Arc<SvidResolver>,
    bundles: Arc<dyn BundleSource>,
    authorizer: Arc<dyn Authorizer>,
) -> Result<rustls::ServerConfig, TlsError> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(SpiffeClientVerifier::new(bundles, authorizer)))
        .with_cert_resolver(resolver);
    // A resumed session skips the client certificate and its verifier.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(config)
}

/// A TLS 1.3 client config that presents `resolver`'s SVID (if any) and
/// requires a server SVID that `authorizer` accepts. Session resumption is
/// off: every connection is a full handshake (see the module docs).
pub fn mtls_client_config(
    resolver: Option<Arc<SvidResolver>>,
    bundles: Arc<dyn BundleSource>,
    authorizer: Arc<dyn Authorizer>,
) -> Result<rustls::ClientConfig, TlsError> {
    let b = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier::new(bundles, authorizer)));
    let mut config = match resolver {
        Some(r) => b.with_client_cert_resolver(r),
        None => b.with_no_client_auth(),
    };
    // A resumed session skips the server certificate and its verifier.
    config.resumption = rustls::client::Resumption::disabled();
    Ok(config)
}
