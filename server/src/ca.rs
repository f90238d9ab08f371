//! The X.509 CAs and the JWT signing keys, and their rotation.
//!
//! Guarantees:
//! - every certificate gets a fresh random 128-bit serial (rcgen's default
//!   serial is derived from the public key and repeats);
//! - leaves follow the SPIFFE X509-SVID profile: one URI SAN (the SPIFFE ID
//!   from the registration entry, never from the requester), CA=false,
//!   critical keyUsage digitalSignature, EKU serverAuth + clientAuth;
//! - no leaf outlives the CA that signs it;
//! - on a store that already holds state, a missing or unreadable CA key is
//!   an error ([`CaError::MissingCa`]), never a reason to make a new CA;
//! - JWT keys and X.509 CAs rotate with one state machine ([`KeyRing`]):
//!   *prepared* (published in the bundle, signs nothing) → *active* (signs)
//!   → *retired* (signs nothing, stays published until everything it
//!   signed has expired, plus a margin) → dropped. Every change of the
//!   published set bumps the bundle's persisted sequence number.
//!
//! Schedules (relative to the active key's life, created → not_after):
//!
//! | | prepare the next one at | activate it at | a retired one leaves the bundle |
//! |---|---|---|---|
//! | JWT key | 1/2 | not_after − 2 × longest JWT TTL | not_after + [`RETIRED_KEY_MARGIN_SECS`] |
//! | X.509 CA | 1/2 | 5/6 (as SPIRE), once the next CA has been published [`X509Policy::min_published`] | min(not_after, retired_at + longest leaf TTL) + [`RETIRED_CA_MARGIN_SECS`] |
//!
//! An X.509 CA is either a self-signed root (the default) or an
//! intermediate signed by an upstream CA given as files ([`UpstreamCa`]);
//! then the bundle holds the upstream certificate and issued chains carry
//! the intermediate.

use crate::model::{
    KeyState, RngError, StoredCa, StoredJwtKey, StoredX509Ca, hex, now_unix, random_bytes, sha256,
};
use crate::store::{Store, StoreError};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber, SubjectPublicKeyInfo,
};
use rustls_pki_types::CertificateDer;
use sigil::svid::jwt::JwtSigner;
use sigil::{Bundle, JwtKey, PrivateKey, SpiffeId, TrustDomain};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

/// A retired JWT key stays in the bundle this long after the last token it
/// signed can have expired.
pub const RETIRED_KEY_MARGIN_SECS: i64 = 24 * 3600;

/// A retired X.509 CA stays in the bundle this long after the last
/// certificate it signed can have expired.
pub const RETIRED_CA_MARGIN_SECS: i64 = 3600;

/// Certificates are backdated this much to absorb clock skew.
const BACKDATE_SECS: i64 = 30;

/// The two kinds of rotating keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    /// An ES256 JWT signing key.
    Jwt,
    /// An X.509 CA.
    X509,
}

impl KeyKind {
    /// The `--kind` value of the CLI.
    pub fn arg(self) -> &'static str {
        match self {
            Self::Jwt => "jwt",
            Self::X509 => "x509",
        }
    }
}

impl std::fmt::Display for KeyKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Jwt => "JWT key",
            Self::X509 => "X.509 CA",
        })
    }
}

/// CA and key failures.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CaError {
    /// The store has state but no usable CA key.
    #[error(
        "the data dir already holds server state but its CA key is missing or unreadable ({0}); refusing to start rather than create a new CA (restore the key, or use a fresh data dir)"
    )]
    MissingCa(String),
    /// The store belongs to another trust domain.
    #[error("the data dir belongs to trust domain {stored:?}, not {configured:?}")]
    TrustDomainMismatch {
        /// In the store.
        stored: String,
        /// Configured.
        configured: String,
    },
    /// The store has state but no usable JWT key.
    #[error("the data dir holds server state but no usable JWT signing key: {0}")]
    MissingJwtKey(String),
    /// `activate` without a prepared key.
    #[error("no prepared {0}: run `sigil keys prepare --kind {arg}` first", arg = .0.arg())]
    NoPreparedKey(KeyKind),
    /// No key with this ID.
    #[error("no {0} with ID {1:?}")]
    UnknownKey(KeyKind, String),
    /// The active key cannot be revoked.
    #[error("the active {0} cannot be revoked: prepare and activate another one first")]
    KeyIsActive(KeyKind),
    /// The upstream CA files are unusable.
    #[error("upstream CA: {0}")]
    Upstream(String),
    /// The CA's life is over (or too short for any certificate).
    #[error("the CA certificate has expired")]
    CaExpired,
    /// The requested key is not an ECDSA P-256 SubjectPublicKeyInfo.
    #[error("public key is not a DER ECDSA P-256 SubjectPublicKeyInfo")]
    BadPublicKey,
    /// The CSR does not parse or its signature does not verify.
    #[error("CSR does not parse or its signature does not verify")]
    BadCsr,
    /// Certificate generation failed.
    #[error("certificate generation failed: {0}")]
    Cert(String),
    /// Random generator failure.
    #[error(transparent)]
    Rng(#[from] RngError),
    /// Store failure.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<rcgen::Error> for CaError {
    fn from(e: rcgen::Error) -> Self {
        Self::Cert(e.to_string())
    }
}

/// A freshly issued certificate.
#[derive(Debug, Clone)]
pub struct Issued {
    /// Leaf first, then the intermediate CA if the CA is one (never the
    /// root: that is in the bundle).
    pub chain: Vec<CertificateDer<'static>>,
    /// Hex serial.
    pub serial: String,
    /// notAfter, Unix seconds.
    pub not_after: i64,
}

/// One X.509 CA that can sign.
pub struct Ca {
    td: TrustDomain,
    id: String,
    issuer: Issuer<'static, KeyPair>,
    cert: CertificateDer<'static>,
    /// What the bundle holds for it: `cert`, or the upstream CA certificate.
    anchor: CertificateDer<'static>,
    not_after: i64,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Ca(td={}, id={}, not_after={})",
            self.td, self.id, self.not_after
        )
    }
}

fn random_serial() -> Result<(SerialNumber, String), RngError> {
    let mut b = random_bytes::<16>()?;
    // Positive and minimally encoded: top bit clear, next bit set.
    b[0] = (b[0] & 0x7f) | 0x40;
    Ok((SerialNumber::from_slice(&b), hex(&b)))
}

fn odt(unix: i64) -> Result<time::OffsetDateTime, CaError> {
    time::OffsetDateTime::from_unix_timestamp(unix).map_err(|e| CaError::Cert(e.to_string()))
}

/// Checks that `spki_der` is an ECDSA P-256 SubjectPublicKeyInfo.
pub fn parse_p256_spki(spki_der: &[u8]) -> Result<SubjectPublicKeyInfo, CaError> {
    let spki = SubjectPublicKeyInfo::from_der(spki_der).map_err(|_| CaError::BadPublicKey)?;
    use rcgen::PublicKeyData;
    if spki.algorithm() != &rcgen::PKCS_ECDSA_P256_SHA256 {
        return Err(CaError::BadPublicKey);
    }
    Ok(spki)
}

/// The SubjectPublicKeyInfo of a PKCS#10 CSR whose self-signature
/// verifies. Nothing else of the CSR is used.
pub fn csr_public_key(csr_der: &[u8]) -> Result<Vec<u8>, CaError> {
    use x509_parser::prelude::FromDer;
    let (rest, csr) =
        x509_parser::certification_request::X509CertificationRequest::from_der(csr_der)
            .map_err(|_| CaError::BadCsr)?;
    if !rest.is_empty() {
        return Err(CaError::BadCsr);
    }
    csr.verify_signature().map_err(|_| CaError::BadCsr)?;
    Ok(csr.certification_request_info.subject_pki.raw.to_vec())
}

/// (hex serial, notBefore, notAfter) of a certificate.
fn cert_facts(der: &[u8]) -> Result<(String, i64, i64), String> {
    let (_, c) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("CA certificate does not parse: {e}"))?;
    Ok((
        hex(c.raw_serial()),
        c.validity().not_before.timestamp(),
        c.validity().not_after.timestamp(),
    ))
}

/// Whether `key` is the key of the certificate `cert`.
fn key_matches_cert(key: &KeyPair, cert: &[u8]) -> Result<bool, String> {
    let (_, c) = x509_parser::parse_x509_certificate(cert)
        .map_err(|e| format!("certificate does not parse: {e}"))?;
    Ok(c.public_key().subject_public_key.data.as_ref() == rcgen::PublicKeyData::der_bytes(key))
}

/// An upstream CA given as files: the server's CAs are then intermediates
/// it signs, and the bundle holds its certificate. Its key is read at start
/// and held in memory only (never written to the store or a log).
pub struct UpstreamCa {
    cert: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
    not_after: i64,
}

impl std::fmt::Debug for UpstreamCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "UpstreamCa(sha256={}, not_after={}, key=<redacted>)",
            hex(&sha256(&self.cert)),
            self.not_after
        )
    }
}

impl UpstreamCa {
    /// Reads a PEM certificate and a PEM P-256 private key (PKCS#8 or SEC1).
    pub fn from_pem_files(cert: &std::path::Path, key: &std::path::Path) -> Result<Self, CaError> {
        let c = std::fs::read(cert)
            .map_err(|e| CaError::Upstream(format!("reading {}: {e}", cert.display())))?;
        let k = std::fs::read(key)
            .map_err(|e| CaError::Upstream(format!("reading {}: {e}", key.display())))?;
        Self::from_pem(&c, &k, now_unix())
    }

    /// Parses and checks the upstream certificate and key: the certificate
    /// must be a CA certificate valid at `now`, the key a P-256 key whose
    /// public half is the certificate's.
    pub fn from_pem(cert_pem: &[u8], key_pem: &[u8], now: i64) -> Result<Self, CaError> {
        use rustls_pki_types::pem::PemObject;
        let cert = CertificateDer::from_pem_slice(cert_pem)
            .map_err(|e| CaError::Upstream(format!("certificate PEM: {e}")))?;
        let key_der = rustls_pki_types::PrivateKeyDer::from_pem_slice(key_pem)
            .map_err(|_| CaError::Upstream("private key PEM does not parse".into()))?;
        let key = KeyPair::from_der_and_sign_algo(&key_der, &rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|_| CaError::Upstream("the private key is not an ECDSA P-256 key".into()))?;
        {
            let (_, c) = x509_parser::parse_x509_certificate(&cert)
                .map_err(|e| CaError::Upstream(format!("certificate does not parse: {e}")))?;
            if !c.is_ca() {
                return Err(CaError::Upstream(
                    "the certificate is not a CA certificate (basicConstraints cA)".into(),
                ));
            }
            if c.validity().not_after.timestamp() <= now
                || c.validity().not_before.timestamp() > now
            {
                return Err(CaError::Upstream("the certificate is not valid now".into()));
            }
        }
        if !key_matches_cert(&key, &cert).map_err(CaError::Upstream)? {
            return Err(CaError::Upstream(
                "the private key does not match the upstream CA certificate".into(),
            ));
        }
        let (_, _, not_after) = cert_facts(&cert).map_err(CaError::Upstream)?;
        let issuer = Issuer::from_ca_cert_der(&cert, key)
            .map_err(|e| CaError::Upstream(format!("certificate unusable as issuer: {e}")))?;
        Ok(Self {
            cert: cert.into_owned(),
            issuer,
            not_after,
        })
    }

    /// The upstream CA certificate (the trust anchor).
    pub fn cert(&self) -> &CertificateDer<'static> {
        &self.cert
    }
}

/// Makes a new CA: a self-signed root, or an intermediate under `upstream`.
fn new_ca(
    td: &TrustDomain,
    ttl: i64,
    now: i64,
    upstream: Option<&UpstreamCa>,
    state: KeyState,
) -> Result<StoredX509Ca, CaError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    let (serial, serial_hex) = random_serial()?;
    params.serial_number = Some(serial);
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "SPIFFE");
    let what = if upstream.is_some() {
        "Sigil intermediate CA"
    } else {
        "Sigil CA"
    };
    dn.push(DnType::CommonName, format!("{what} {}", td.name()));
    params.distinguished_name = dn;
    params.subject_alt_names = vec![SanType::URI(
        td.id_string()
            .try_into()
            .map_err(|e: rcgen::Error| CaError::Cert(e.to_string()))?,
    )];
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let mut not_after = now + ttl;
    params.not_before = odt(now - BACKDATE_SECS)?;
    let (cert, anchor) = match upstream {
        None => {
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.not_after = odt(not_after)?;
            (params.self_signed(&key)?.der().to_vec(), None)
        }
        Some(up) => {
            // An intermediate never outlives its upstream.
            not_after = not_after.min(up.not_after);
            if not_after <= now {
                return Err(CaError::Upstream("the upstream CA has expired".into()));
            }
            params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
            params.use_authority_key_identifier_extension = true;
            params.not_after = odt(not_after)?;
            (
                params.signed_by(&key, &up.issuer)?.der().to_vec(),
                Some(up.cert.to_vec()),
            )
        }
    };
    Ok(StoredX509Ca {
        id: serial_hex,
        pkcs8: key.serialize_der(),
        cert,
        upstream: anchor,
        state,
        created_at: now,
        not_after,
        retired_at: None,
    })
}

impl Ca {
    /// Makes a new self-signed root CA for `td`, valid `ttl` seconds.
    pub fn generate(td: &TrustDomain, ttl: i64, now: i64) -> Result<(Self, StoredX509Ca), CaError> {
        let stored = new_ca(td, ttl, now, None, KeyState::Active)?;
        let ca = Self::from_stored(td, &stored)?;
        Ok((ca, stored))
    }

    /// Loads a persisted CA, checking that its key matches its certificate.
    pub fn from_stored(td: &TrustDomain, s: &StoredX509Ca) -> Result<Self, CaError> {
        let bad = |why: String| CaError::MissingCa(format!("CA {}: {why}", s.id));
        let key = KeyPair::try_from(s.pkcs8.as_slice())
            .map_err(|e| bad(format!("key does not parse: {e}")))?;
        let cert = CertificateDer::from(s.cert.clone());
        let (_, _, not_after) = cert_facts(&cert).map_err(bad)?;
        if !key_matches_cert(&key, &cert).map_err(bad)? {
            return Err(bad("key does not match the CA certificate".into()));
        }
        let anchor = match &s.upstream {
            Some(up) => CertificateDer::from(up.clone()),
            None => cert.clone(),
        };
        let issuer = Issuer::from_ca_cert_der(&cert, key)
            .map_err(|e| bad(format!("certificate unusable: {e}")))?;
        Ok(Self {
            td: td.clone(),
            id: s.id.clone(),
            issuer,
            cert,
            anchor,
            not_after,
        })
    }

    /// The CA certificate.
    pub fn cert(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// The trust anchor in the bundle for this CA: its own certificate, or
    /// the upstream CA certificate.
    pub fn anchor(&self) -> &CertificateDer<'static> {
        &self.anchor
    }

    /// The CA's ID (hex serial).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The CA's notAfter, Unix seconds.
    pub fn not_after(&self) -> i64 {
        self.not_after
    }

    /// Issues an X.509-SVID for `id` and the P-256 key `spki_der`, valid
    /// `ttl` seconds but never past the CA. The chain is the leaf, then
    /// the CA certificate when it is an intermediate.
    pub fn issue(
        &self,
        spki_der: &[u8],
        id: &SpiffeId,
        dns_names: &[String],
        ips: &[IpAddr],
        ttl: i64,
        now: i64,
    ) -> Result<Issued, CaError> {
        let spki = parse_p256_spki(spki_der)?;
        let not_after = (now + ttl).min(self.not_after);
        if not_after <= now {
            return Err(CaError::CaExpired);
        }
        let mut params = CertificateParams::default();
        let (serial, serial_hex) = random_serial()?;
        params.serial_number = Some(serial);
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "SPIFFE");
        params.distinguished_name = dn;
        let mut sans = vec![SanType::URI(
            id.as_str()
                .try_into()
                .map_err(|e: rcgen::Error| CaError::Cert(e.to_string()))?,
        )];
        for d in dns_names {
            sans.push(SanType::DnsName(
                d.as_str()
                    .try_into()
                    .map_err(|e: rcgen::Error| CaError::Cert(e.to_string()))?,
            ));
        }
        sans.extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        params.subject_alt_names = sans;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.not_before = odt(now - BACKDATE_SECS)?;
        params.not_after = odt(not_after)?;
        let cert = params.signed_by(&spki, &self.issuer)?;
        let mut chain = vec![cert.der().clone()];
        if self.anchor != self.cert {
            chain.push(self.cert.clone());
        }
        Ok(Issued {
            chain,
            serial: serial_hex,
            not_after,
        })
    }
}

/// The trust bundle's sequence number: persisted, bumped on every change
/// of the published key set (JWT keys and X.509 CAs), so it only grows.
#[derive(Debug)]
pub struct BundleSequence {
    store: Arc<dyn Store>,
    current: AtomicU64,
}

impl BundleSequence {
    /// Loads the sequence (starting it at 1 on a fresh store).
    pub fn load(store: Arc<dyn Store>) -> Result<Arc<Self>, CaError> {
        let mut seq = store.bundle_sequence()?;
        if seq == 0 {
            seq = store.bump_bundle_sequence()?;
        }
        Ok(Arc::new(Self {
            store,
            current: AtomicU64::new(seq),
        }))
    }

    /// The current value.
    pub fn get(&self) -> u64 {
        self.current.load(Ordering::SeqCst)
    }

    fn bump(&self) -> Result<(), CaError> {
        let n = self.store.bump_bundle_sequence()?;
        self.current.fetch_max(n, Ordering::SeqCst);
        Ok(())
    }
}

/// A persisted key that goes through the rotation states.
pub trait RotatingKey: Clone + Send + Sync + std::fmt::Debug {
    /// Its ID (JWT `kid`, X.509 CA serial).
    fn id(&self) -> &str;
    /// Its state.
    fn state(&self) -> KeyState;
    /// Creation, Unix seconds.
    fn created_at(&self) -> i64;
    /// End of its life, Unix seconds.
    fn not_after(&self) -> i64;
    /// When it was retired, Unix seconds.
    fn retired_at(&self) -> Option<i64>;
    /// Moves it to `state` at `now`.
    fn set_state(&mut self, state: KeyState, now: i64);
}

/// What differs between the kinds of rotating keys: how they are made,
/// loaded and persisted, and when they change state.
pub trait Lifecycle: Send + Sync + std::fmt::Debug {
    /// The persisted key.
    type Key: RotatingKey;
    /// What the active key signs with.
    type Signer: Send + Sync + std::fmt::Debug;
    /// Which kind this is.
    const KIND: KeyKind;
    /// A new key in `state`.
    fn generate(&self, state: KeyState, now: i64) -> Result<Self::Key, CaError>;
    /// The signer of a key.
    fn signer(&self, key: &Self::Key) -> Result<Self::Signer, CaError>;
    /// When to prepare the successor of `active`.
    fn prepare_at(&self, active: &Self::Key) -> i64;
    /// When to activate the successor of `active`.
    fn activate_at(&self, active: &Self::Key) -> i64;
    /// How long a prepared key is published before an automatic
    /// activation may use it (unless the active one has expired).
    fn min_published(&self, _active: &Self::Key) -> i64 {
        0
    }
    /// After this, a retired key leaves the bundle.
    fn drop_at(&self, retired: &Self::Key) -> i64;
    /// Every persisted key.
    fn load_all(&self, store: &dyn Store) -> Result<Vec<Self::Key>, StoreError>;
    /// Persists a key.
    fn put(&self, store: &dyn Store, key: &Self::Key) -> Result<(), StoreError>;
    /// Deletes a key.
    fn delete(&self, store: &dyn Store, id: &str) -> Result<(), StoreError>;
    /// The error for "no usable key" on a store with state.
    fn missing(&self, why: String) -> CaError;
}

/// Keys of one kind: one active, at most one prepared, some retired.
pub struct KeyRing<L: Lifecycle> {
    store: Arc<dyn Store>,
    life: L,
    sequence: Arc<BundleSequence>,
    inner: RwLock<Ring<L>>,
}

struct Ring<L: Lifecycle> {
    all: Vec<L::Key>,
    active: Arc<L::Signer>,
    active_id: String,
}

impl<L: Lifecycle> std::fmt::Debug for KeyRing<L> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let g = self.read();
        f.debug_struct("KeyRing")
            .field("life", &self.life)
            .field("keys", &g.all)
            .field("active", &g.active_id)
            .finish()
    }
}

fn newest<K: RotatingKey>(all: &[K], state: KeyState) -> Option<&K> {
    all.iter()
        .filter(|k| k.state() == state)
        .max_by_key(|k| k.created_at())
}

impl<L: Lifecycle> KeyRing<L> {
    /// Loads the keys; with `create` (a fresh store) makes the first one.
    /// Then runs one rotation step at `now`.
    pub fn open(
        store: Arc<dyn Store>,
        life: L,
        sequence: Arc<BundleSequence>,
        create: bool,
        now: i64,
    ) -> Result<Self, CaError> {
        let mut all = life
            .load_all(store.as_ref())
            .map_err(|e| life.missing(e.to_string()))?;
        if newest(&all, KeyState::Active).is_none() {
            if !create {
                return Err(life.missing(format!("no active {}", L::KIND)));
            }
            let k = life.generate(KeyState::Active, now)?;
            life.put(store.as_ref(), &k)?;
            all.push(k);
        }
        // Every key must load: an unreadable prepared or retired key is as
        // much a sign of a damaged store as an unreadable active one.
        for k in &all {
            life.signer(k)?;
        }
        let active_key = newest(&all, KeyState::Active)
            .cloned()
            .ok_or_else(|| life.missing(format!("no active {}", L::KIND)))?;
        let ring = Ring {
            active: Arc::new(life.signer(&active_key)?),
            active_id: active_key.id().to_owned(),
            all,
        };
        let keys = Self {
            store,
            life,
            sequence,
            inner: RwLock::new(ring),
        };
        keys.rotate(now)?;
        Ok(keys)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Ring<L>> {
        match self.inner.read() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Ring<L>> {
        match self.inner.write() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// The active signer.
    pub fn active(&self) -> Arc<L::Signer> {
        self.read().active.clone()
    }

    /// The ID of the active key.
    pub fn active_id(&self) -> String {
        self.read().active_id.clone()
    }

    /// The bundle sequence number.
    pub fn sequence(&self) -> u64 {
        self.sequence.get()
    }

    /// Keys to publish: prepared, active and retired-but-not-yet-dropped.
    pub fn published(&self) -> Vec<L::Key> {
        self.read().all.clone()
    }

    /// One rotation step at time `now`:
    /// - prepare a next key once the active one reaches
    ///   [`Lifecycle::prepare_at`];
    /// - activate the prepared key (retiring the active one) once the
    ///   active key reaches [`Lifecycle::activate_at`] and the prepared one
    ///   has been published [`Lifecycle::min_published`] (at once if the
    ///   active key has expired);
    /// - drop retired keys after [`Lifecycle::drop_at`].
    ///
    /// Returns true when the key set changed.
    pub fn rotate(&self, now: i64) -> Result<bool, CaError> {
        let mut g = self.write();
        let mut changed = false;
        let active = g
            .all
            .iter()
            .find(|k| k.id() == g.active_id)
            .cloned()
            .ok_or_else(|| {
                self.life
                    .missing(format!("the active {} vanished", L::KIND))
            })?;
        if newest(&g.all, KeyState::Prepared).is_none() && now >= self.life.prepare_at(&active) {
            let k = self.life.generate(KeyState::Prepared, now)?;
            self.life.put(self.store.as_ref(), &k)?;
            g.all.push(k);
            changed = true;
        }
        if now >= self.life.activate_at(&active)
            && let Some(p) = newest(&g.all, KeyState::Prepared)
            && (now >= p.created_at() + self.life.min_published(&active)
                || now >= active.not_after())
        {
            changed |= self.activate_locked(&mut g, now)?;
        }
        let before = g.all.len();
        let mut dropped = Vec::new();
        g.all.retain(|k| {
            let keep = !(k.state() == KeyState::Retired && now > self.life.drop_at(k));
            if !keep {
                dropped.push(k.id().to_owned());
            }
            keep
        });
        for id in dropped {
            self.life.delete(self.store.as_ref(), &id)?;
        }
        changed |= g.all.len() != before;
        if changed {
            self.sequence.bump()?;
        }
        Ok(changed)
    }

    /// Publishes a next key (or returns the one already prepared).
    pub fn prepare(&self, now: i64) -> Result<L::Key, CaError> {
        let mut g = self.write();
        if let Some(k) = newest(&g.all, KeyState::Prepared) {
            return Ok(k.clone());
        }
        let k = self.life.generate(KeyState::Prepared, now)?;
        self.life.put(self.store.as_ref(), &k)?;
        g.all.push(k.clone());
        self.sequence.bump()?;
        Ok(k)
    }

    /// Activates the prepared key and retires the active one.
    pub fn activate(&self, now: i64) -> Result<L::Key, CaError> {
        let mut g = self.write();
        if !self.activate_locked(&mut g, now)? {
            return Err(CaError::NoPreparedKey(L::KIND));
        }
        self.sequence.bump()?;
        let id = g.active_id.clone();
        g.all.iter().find(|k| k.id() == id).cloned().ok_or_else(|| {
            self.life
                .missing(format!("the active {} vanished", L::KIND))
        })
    }

    /// Removes a prepared or retired key from the bundle and the store.
    pub fn revoke(&self, id: &str) -> Result<L::Key, CaError> {
        let mut g = self.write();
        let Some(pos) = g.all.iter().position(|k| k.id() == id) else {
            return Err(CaError::UnknownKey(L::KIND, id.to_owned()));
        };
        if g.all[pos].state() == KeyState::Active {
            return Err(CaError::KeyIsActive(L::KIND));
        }
        self.life.delete(self.store.as_ref(), id)?;
        let k = g.all.remove(pos);
        self.sequence.bump()?;
        Ok(k)
    }

    /// Forces a rotation now: prepares a key if there is none, activates it
    /// and retires the active one.
    pub fn force_rotate(&self, now: i64) -> Result<(), CaError> {
        let mut g = self.write();
        if newest(&g.all, KeyState::Prepared).is_none() {
            let k = self.life.generate(KeyState::Prepared, now)?;
            self.life.put(self.store.as_ref(), &k)?;
            g.all.push(k);
        }
        self.activate_locked(&mut g, now)?;
        self.sequence.bump()
    }

    fn activate_locked(&self, g: &mut Ring<L>, now: i64) -> Result<bool, CaError> {
        let Some(mut next) = newest(&g.all, KeyState::Prepared).cloned() else {
            return Ok(false);
        };
        // Load before persisting anything: an unusable prepared key changes
        // nothing.
        let signer = self.life.signer(&next)?;
        // Persist the new active key first: a crash in between leaves two
        // active keys (the newest wins), never none.
        next.set_state(KeyState::Active, now);
        self.life.put(self.store.as_ref(), &next)?;
        let mut retired = Vec::new();
        for k in g.all.iter_mut() {
            if k.id() == next.id() {
                *k = next.clone();
            } else if k.state() == KeyState::Active {
                k.set_state(KeyState::Retired, now);
                retired.push(k.clone());
            }
        }
        for k in &retired {
            self.life.put(self.store.as_ref(), k)?;
        }
        g.active = Arc::new(signer);
        g.active_id = next.id().to_owned();
        Ok(true)
    }
}

impl RotatingKey for StoredJwtKey {
    fn id(&self) -> &str {
        &self.kid
    }
    fn state(&self) -> KeyState {
        self.state
    }
    fn created_at(&self) -> i64 {
        self.created_at
    }
    fn not_after(&self) -> i64 {
        self.not_after
    }
    fn retired_at(&self) -> Option<i64> {
        self.retired_at
    }
    fn set_state(&mut self, state: KeyState, now: i64) {
        self.state = state;
        if state == KeyState::Retired {
            self.retired_at = Some(now);
        }
    }
}

impl RotatingKey for StoredX509Ca {
    fn id(&self) -> &str {
        &self.id
    }
    fn state(&self) -> KeyState {
        self.state
    }
    fn created_at(&self) -> i64 {
        self.created_at
    }
    fn not_after(&self) -> i64 {
        self.not_after
    }
    fn retired_at(&self) -> Option<i64> {
        self.retired_at
    }
    fn set_state(&mut self, state: KeyState, now: i64) {
        self.state = state;
        if state == KeyState::Retired {
            self.retired_at = Some(now);
        }
    }
}

/// JWT key rotation policy.
#[derive(Debug, Clone, Copy)]
pub struct JwtKeyPolicy {
    /// Life of a key, seconds (≥ 6 × the longest JWT TTL).
    pub key_ttl: i64,
    /// The longest JWT-SVID TTL, seconds.
    pub max_jwt_ttl: i64,
}

impl Default for JwtKeyPolicy {
    fn default() -> Self {
        Self {
            key_ttl: 7 * 24 * 3600,
            max_jwt_ttl: 24 * 3600,
        }
    }
}

impl Lifecycle for JwtKeyPolicy {
    type Key = StoredJwtKey;
    /// The signer and the key's `not_after` (no token outlives it).
    type Signer = (JwtSigner, i64);
    const KIND: KeyKind = KeyKind::Jwt;

    fn generate(&self, state: KeyState, now: i64) -> Result<StoredJwtKey, CaError> {
        let pk = PrivateKey::generate_p256().map_err(|e| CaError::Cert(e.to_string()))?;
        Ok(StoredJwtKey {
            kid: URL_SAFE_NO_PAD.encode(random_bytes::<16>()?),
            pkcs8: pk.secret_pkcs8_der().to_vec(),
            state,
            created_at: now,
            not_after: now + self.key_ttl,
            retired_at: None,
        })
    }

    fn signer(&self, k: &StoredJwtKey) -> Result<(JwtSigner, i64), CaError> {
        let s = JwtSigner::new(k.kid.clone(), &PrivateKey::from_pkcs8_der(k.pkcs8.clone()))
            .map_err(|e| CaError::MissingJwtKey(format!("key {}: {e}", k.kid)))?;
        Ok((s, k.not_after))
    }

    fn prepare_at(&self, a: &StoredJwtKey) -> i64 {
        a.created_at + (a.not_after - a.created_at) / 2
    }

    /// Less than 2 × the longest JWT TTL left: no token is cut short.
    fn activate_at(&self, a: &StoredJwtKey) -> i64 {
        a.not_after - 2 * self.max_jwt_ttl
    }

    /// Every token it signed has expired by its `not_after`.
    fn drop_at(&self, k: &StoredJwtKey) -> i64 {
        k.not_after + RETIRED_KEY_MARGIN_SECS
    }

    fn load_all(&self, store: &dyn Store) -> Result<Vec<StoredJwtKey>, StoreError> {
        store.jwt_keys()
    }

    fn put(&self, store: &dyn Store, key: &StoredJwtKey) -> Result<(), StoreError> {
        store.put_jwt_key(key)
    }

    fn delete(&self, store: &dyn Store, id: &str) -> Result<(), StoreError> {
        store.delete_jwt_key(id)
    }

    fn missing(&self, why: String) -> CaError {
        CaError::MissingJwtKey(why)
    }
}

/// The JWT signing keys.
pub type JwtKeys = KeyRing<JwtKeyPolicy>;

impl KeyRing<JwtKeyPolicy> {
    /// Loads the JWT keys with their own view of the bundle sequence; with
    /// `create` (a fresh store) makes the first one.
    pub fn load(
        store: Arc<dyn Store>,
        policy: JwtKeyPolicy,
        create: bool,
        now: i64,
    ) -> Result<Self, CaError> {
        let seq = BundleSequence::load(store.clone())?;
        Self::open(store, policy, seq, create, now)
    }
}

/// X.509 CA rotation policy.
#[derive(Debug, Clone)]
pub struct X509Policy {
    /// The trust domain.
    pub td: TrustDomain,
    /// Life of a new CA, seconds.
    pub ca_ttl: i64,
    /// The longest life of anything a CA signs (SVIDs, agent SVIDs, the
    /// server certificate), seconds: a retired CA's last certificate has
    /// expired this long after its retirement.
    pub max_leaf_ttl: i64,
    /// The upstream CA, when the CAs are intermediates.
    pub upstream: Option<Arc<UpstreamCa>>,
}

impl X509Policy {
    /// A policy for self-signed CAs of `ca_ttl` seconds with leaves of at
    /// most 7 days.
    pub fn self_signed(td: &TrustDomain, ca_ttl: i64) -> Self {
        Self {
            td: td.clone(),
            ca_ttl,
            max_leaf_ttl: 7 * 24 * 3600,
            upstream: None,
        }
    }

    /// How long a prepared CA is published before an automatic activation:
    /// 1/12 of the active CA's life, at most 1 h (agents fetch the bundle
    /// every few seconds to minutes).
    pub fn min_published(life: i64) -> i64 {
        (life / 12).min(3600)
    }
}

impl Lifecycle for X509Policy {
    type Key = StoredX509Ca;
    type Signer = Ca;
    const KIND: KeyKind = KeyKind::X509;

    fn generate(&self, state: KeyState, now: i64) -> Result<StoredX509Ca, CaError> {
        new_ca(&self.td, self.ca_ttl, now, self.upstream.as_deref(), state)
    }

    fn signer(&self, k: &StoredX509Ca) -> Result<Ca, CaError> {
        Ca::from_stored(&self.td, k)
    }

    fn prepare_at(&self, a: &StoredX509Ca) -> i64 {
        a.created_at + (a.not_after - a.created_at) / 2
    }

    fn activate_at(&self, a: &StoredX509Ca) -> i64 {
        a.created_at + (a.not_after - a.created_at) / 6 * 5
    }

    fn min_published(&self, a: &StoredX509Ca) -> i64 {
        Self::min_published(a.not_after - a.created_at)
    }

    fn drop_at(&self, k: &StoredX509Ca) -> i64 {
        let last_leaf = match k.retired_at {
            Some(r) => (r + self.max_leaf_ttl).min(k.not_after),
            None => k.not_after,
        };
        last_leaf + RETIRED_CA_MARGIN_SECS
    }

    fn load_all(&self, store: &dyn Store) -> Result<Vec<StoredX509Ca>, StoreError> {
        store.x509_cas()
    }

    fn put(&self, store: &dyn Store, key: &StoredX509Ca) -> Result<(), StoreError> {
        store.put_x509_ca(key)
    }

    fn delete(&self, store: &dyn Store, id: &str) -> Result<(), StoreError> {
        store.delete_x509_ca(id)
    }

    fn missing(&self, why: String) -> CaError {
        CaError::MissingCa(why)
    }
}

/// The X.509 CAs.
pub type X509Cas = KeyRing<X509Policy>;

impl KeyRing<X509Policy> {
    /// Issues with the active CA (see [`Ca::issue`]).
    pub fn issue(
        &self,
        spki_der: &[u8],
        id: &SpiffeId,
        dns_names: &[String],
        ips: &[IpAddr],
        ttl: i64,
        now: i64,
    ) -> Result<Issued, CaError> {
        self.active().issue(spki_der, id, dns_names, ips, ttl, now)
    }

    /// The active CA's certificate.
    pub fn cert(&self) -> CertificateDer<'static> {
        self.active().cert().clone()
    }

    /// The active CA's notAfter.
    pub fn not_after(&self) -> i64 {
        self.active().not_after()
    }

    /// The published trust anchors, without duplicates, oldest CA first.
    pub fn anchors(&self) -> Vec<CertificateDer<'static>> {
        let mut cas = self.published();
        cas.sort_by_key(|c| c.created_at);
        let mut out: Vec<CertificateDer<'static>> = Vec::new();
        for c in cas {
            let a = CertificateDer::from(c.upstream.clone().unwrap_or(c.cert));
            if !out.contains(&a) {
                out.push(a);
            }
        }
        out
    }
}

/// Loads the CAs and JWT keys (self-signed CAs of `ca_ttl`), creating them
/// only when the store holds no state yet.
pub fn load_or_init(
    store: Arc<dyn Store>,
    td: &TrustDomain,
    ca_ttl: i64,
    policy: JwtKeyPolicy,
) -> Result<(Arc<X509Cas>, JwtKeys), CaError> {
    load_or_init_with(
        store,
        X509Policy::self_signed(td, ca_ttl),
        policy,
        now_unix(),
    )
}

/// Moves a pre-rotation CA record into the rotation as the active CA.
fn migrate_legacy_ca(store: &dyn Store, td: &TrustDomain) -> Result<(), CaError> {
    let legacy = match store.ca() {
        Ok(Some(s)) => s,
        Ok(None) => return Ok(()),
        Err(e) => return Err(CaError::MissingCa(e.to_string())),
    };
    if !store
        .x509_cas()
        .map_err(|e| CaError::MissingCa(e.to_string()))?
        .is_empty()
    {
        return Ok(());
    }
    let StoredCa { pkcs8, cert } = legacy;
    let (id, not_before, not_after) = cert_facts(&cert).map_err(CaError::MissingCa)?;
    let rec = StoredX509Ca {
        id,
        pkcs8,
        cert,
        upstream: None,
        state: KeyState::Active,
        created_at: not_before + BACKDATE_SECS,
        not_after,
        retired_at: None,
    };
    Ca::from_stored(td, &rec)?;
    store.put_x509_ca(&rec)?;
    store.delete_legacy_ca()?;
    tracing::info!(ca = %rec.id, "migrated the CA into the rotating CA set");
    Ok(())
}

/// Loads the CAs and JWT keys at `now`, creating them only when the store
/// holds no state yet.
pub fn load_or_init_with(
    store: Arc<dyn Store>,
    x509: X509Policy,
    policy: JwtKeyPolicy,
    now: i64,
) -> Result<(Arc<X509Cas>, JwtKeys), CaError> {
    let td = x509.td.clone();
    let initialized = match store.trust_domain()? {
        Some(stored) => {
            if stored != td.name() {
                return Err(CaError::TrustDomainMismatch {
                    stored,
                    configured: td.name().to_owned(),
                });
            }
            true
        }
        None => false,
    };
    migrate_legacy_ca(store.as_ref(), &td)?;
    let seq = BundleSequence::load(store.clone())?;
    // A crash during a first start may have left a CA behind: `open` keeps
    // it. Only a store without state gets a new CA.
    let cas = KeyRing::open(store.clone(), x509, seq.clone(), !initialized, now)?;
    let keys = KeyRing::open(store.clone(), policy, seq, !initialized, now)?;
    if !initialized {
        store.set_trust_domain(td.name())?;
    }
    Ok((Arc::new(cas), keys))
}

/// The trust bundle: the published X.509 trust anchors and JWT keys.
pub fn bundle(td: &TrustDomain, cas: &X509Cas, keys: &JwtKeys) -> Bundle {
    let mut b = Bundle::empty(td.clone());
    for a in cas.anchors() {
        b.x509.add_authority(a);
    }
    for k in keys.published() {
        let sec1 = PrivateKey::from_pkcs8_der(k.pkcs8.clone()).public_key_sec1();
        if let Ok(sec1) = sec1
            && let Ok(jk) = JwtKey::from_sec1(&k.kid, &sec1)
        {
            let _ = b.jwt.add_key(jk);
        }
    }
    b.sequence = Some(keys.sequence().max(cas.sequence()));
    b.refresh_hint = Some(300);
    b
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SledStore;
    use sigil::validate::x509::AnyId;
    use sigil::{BundleSet, X509Svid, verify_x509_svid};
    use std::sync::Arc;

    fn td() -> TrustDomain {
        TrustDomain::new("example.org").unwrap()
    }

    fn spki_of(k: &PrivateKey) -> Vec<u8> {
        let kp = KeyPair::try_from(k.secret_pkcs8_der()).unwrap();
        rcgen::PublicKeyData::subject_public_key_info(&kp)
    }

    #[test]
    fn leaf_follows_spiffe_profile_and_verifies() {
        let now = now_unix();
        let (ca, _) = Ca::generate(&td(), 3600 * 24, now).unwrap();
        let key = PrivateKey::generate_p256().unwrap();
        let id = SpiffeId::parse("spiffe://example.org/w/a").unwrap();
        let a = ca
            .issue(&spki_of(&key), &id, &["svc.local".into()], &[], 3600, now)
            .unwrap();
        let b = ca.issue(&spki_of(&key), &id, &[], &[], 3600, now).unwrap();
        assert_ne!(a.serial, b.serial, "serials must be random");
        let mut chain = a.chain.clone();
        chain.push(ca.cert().clone());
        // The library's SPIFFE leaf rules accept it.
        let svid = X509Svid::new(chain.clone(), key).unwrap();
        assert_eq!(svid.spiffe_id(), &id);
        let mut bundle = Bundle::empty(td());
        bundle.x509.add_authority(ca.cert().clone());
        let set: BundleSet = [bundle].into_iter().collect();
        let v = verify_x509_svid(&a.chain, &set, std::time::SystemTime::now(), &AnyId).unwrap();
        assert_eq!(v.spiffe_id(), &id);
        assert_eq!(v.not_after(), now + 3600);
    }

    #[test]
    fn csr_gives_only_its_key() {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params =
            CertificateParams::new(vec!["spiffe://example.org/evil".to_owned()]).unwrap();
        params.distinguished_name = DistinguishedName::new();
        let csr = params.serialize_request(&key).unwrap();
        let spki = csr_public_key(csr.der()).unwrap();
        assert_eq!(spki, rcgen::PublicKeyData::subject_public_key_info(&key));
        let mut tampered = csr.der().to_vec();
        let n = tampered.len();
        tampered[n - 5] ^= 1;
        assert!(matches!(csr_public_key(&tampered), Err(CaError::BadCsr)));
        assert!(matches!(csr_public_key(b"junk"), Err(CaError::BadCsr)));
    }

    #[test]
    fn leaf_never_outlives_ca_and_rejects_other_keys() {
        let now = now_unix();
        let (ca, _) = Ca::generate(&td(), 600, now).unwrap();
        let key = PrivateKey::generate_p256().unwrap();
        let id = SpiffeId::parse("spiffe://example.org/w/a").unwrap();
        let a = ca.issue(&spki_of(&key), &id, &[], &[], 3600, now).unwrap();
        assert_eq!(a.not_after, ca.not_after());
        assert!(matches!(
            ca.issue(&spki_of(&key), &id, &[], &[], 3600, now + 700),
            Err(CaError::CaExpired)
        ));
        let p384 = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        assert!(matches!(
            ca.issue(
                &rcgen::PublicKeyData::subject_public_key_info(&p384),
                &id,
                &[],
                &[],
                60,
                now
            ),
            Err(CaError::BadPublicKey)
        ));
        assert!(matches!(
            ca.issue(b"junk", &id, &[], &[], 60, now),
            Err(CaError::BadPublicKey)
        ));
    }

    #[test]
    fn state_persists_and_missing_ca_refuses_to_start() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path()).unwrap());
        let (ca, keys) = load_or_init(store.clone(), &td(), 3600, JwtKeyPolicy::default()).unwrap();
        let ca_id = ca.active_id();
        let kid = keys.active().0.kid().to_owned();
        let (ca2, keys2) =
            load_or_init(store.clone(), &td(), 3600, JwtKeyPolicy::default()).unwrap();
        assert_eq!(ca.cert(), ca2.cert());
        assert_eq!(keys2.active().0.kid(), kid);
        let other = TrustDomain::new("other.org").unwrap();
        assert!(matches!(
            load_or_init(store.clone(), &other, 3600, JwtKeyPolicy::default()),
            Err(CaError::TrustDomainMismatch { .. })
        ));
        drop((store, keys, keys2, ca, ca2));
        // Remove the CA key behind the server's back.
        {
            let db = sled::open(dir.path()).unwrap();
            db.open_tree("x509_cas")
                .unwrap()
                .remove(ca_id.as_bytes())
                .unwrap();
            db.flush().unwrap();
        }
        let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path()).unwrap());
        let err = load_or_init(store, &td(), 3600, JwtKeyPolicy::default()).unwrap_err();
        assert!(matches!(err, CaError::MissingCa(_)), "{err}");
        assert!(err.to_string().contains("refusing to start"));
    }

    #[test]
    fn jwt_rotation_prepares_activates_and_retires() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path()).unwrap());
        let policy = JwtKeyPolicy {
            key_ttl: 1000,
            max_jwt_ttl: 100,
        };
        let t0 = 1_000_000;
        let keys = JwtKeys::load(store.clone(), policy, true, t0).unwrap();
        let k1 = keys.active().0.kid().to_owned();
        assert!(!keys.rotate(t0 + 10).unwrap());
        // Half life: a prepared key is published but not signing.
        assert!(keys.rotate(t0 + 500).unwrap());
        assert_eq!(keys.published().len(), 2);
        assert_eq!(keys.active().0.kid(), k1);
        // 2 × max TTL before the end: activation.
        assert!(keys.rotate(t0 + 800).unwrap());
        let k2 = keys.active().0.kid().to_owned();
        assert_ne!(k1, k2);
        let old = keys.published().into_iter().find(|k| k.kid == k1).unwrap();
        assert_eq!(old.state, KeyState::Retired);
        // Persisted: a reload sees the same active key.
        let again = JwtKeys::load(store.clone(), policy, false, t0 + 801).unwrap();
        assert_eq!(again.active().0.kid(), k2);
        // Still published past its not_after, until the margin passes.
        keys.rotate(t0 + 1000 + RETIRED_KEY_MARGIN_SECS).unwrap();
        assert!(keys.published().iter().any(|k| k.kid == k1));
        keys.rotate(t0 + 1001 + RETIRED_KEY_MARGIN_SECS).unwrap();
        assert!(!keys.published().iter().any(|k| k.kid == k1));
    }

    #[test]
    fn manual_prepare_activate_revoke() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path()).unwrap());
        let now = now_unix();
        let keys = JwtKeys::load(store.clone(), JwtKeyPolicy::default(), true, now).unwrap();
        let k1 = keys.active().0.kid().to_owned();
        assert!(matches!(
            keys.activate(now),
            Err(CaError::NoPreparedKey(KeyKind::Jwt))
        ));
        assert!(matches!(keys.revoke(&k1), Err(CaError::KeyIsActive(_))));
        let p = keys.prepare(now).unwrap();
        assert_eq!(keys.prepare(now).unwrap().kid, p.kid, "idempotent");
        assert_eq!(keys.active().0.kid(), k1, "prepared keys do not sign");
        let a = keys.activate(now).unwrap();
        assert_eq!(a.kid, p.kid);
        assert_eq!(a.state, KeyState::Active);
        assert_eq!(keys.active().0.kid(), p.kid);
        let before_revoke = keys.sequence();
        let r = keys.revoke(&k1).unwrap();
        assert_eq!(r.state, KeyState::Retired);
        assert!(keys.sequence() > before_revoke, "sequence only grows");
        assert!(matches!(keys.revoke(&k1), Err(CaError::UnknownKey(..))));
        assert_eq!(store.jwt_keys().unwrap().len(), 1);
        let seq = keys.sequence();
        drop(keys);
        let again = JwtKeys::load(store, JwtKeyPolicy::default(), false, now).unwrap();
        assert_eq!(again.sequence(), seq, "persisted");
    }

    #[test]
    fn force_rotate_switches_kid() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path()).unwrap());
        let keys = JwtKeys::load(store, JwtKeyPolicy::default(), true, now_unix()).unwrap();
        let k1 = keys.active().0.kid().to_owned();
        keys.force_rotate(now_unix()).unwrap();
        assert_ne!(keys.active().0.kid(), k1);
        assert_eq!(keys.published().len(), 2);
    }

    // ---- X.509 CA rotation ----

    fn x509_policy(ca_ttl: i64, max_leaf_ttl: i64) -> X509Policy {
        X509Policy {
            max_leaf_ttl,
            ..X509Policy::self_signed(&td(), ca_ttl)
        }
    }

    fn open_cas(store: &Arc<dyn Store>, p: X509Policy, create: bool, now: i64) -> X509Cas {
        let seq = BundleSequence::load(store.clone()).unwrap();
        KeyRing::open(store.clone(), p, seq, create, now).unwrap()
    }

    fn verify(
        chain: &[CertificateDer<'static>],
        anchors: &[CertificateDer<'static>],
        at: i64,
    ) -> bool {
        let mut b = Bundle::empty(td());
        for a in anchors {
            b.x509.add_authority(a.clone());
        }
        let set: BundleSet = [b].into_iter().collect();
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(at as u64);
        verify_x509_svid(chain, &set, t, &AnyId).is_ok()
    }

    fn svid(cas: &X509Cas, now: i64) -> Issued {
        let key = PrivateKey::generate_p256().unwrap();
        let id = SpiffeId::parse("spiffe://example.org/w/a").unwrap();
        cas.issue(&spki_of(&key), &id, &[], &[], 60, now).unwrap()
    }

    #[test]
    fn x509_rotation_prepares_at_half_activates_at_five_sixths_and_drops_retired() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path()).unwrap());
        // Injected clock: a made-up `now` far from the real one.
        let t0 = now_unix() - 600;
        let cas = open_cas(&store, x509_policy(1200, 50), true, t0);
        let first = cas.active_id();
        let seq0 = cas.sequence();
        assert!(!cas.rotate(t0 + 10).unwrap());
        assert!(!cas.rotate(t0 + 599).unwrap());
        // Half life: the next CA is published but signs nothing.
        assert!(cas.rotate(t0 + 600).unwrap());
        assert_eq!(cas.anchors().len(), 2);
        assert_eq!(cas.active_id(), first);
        assert!(cas.sequence() > seq0, "the bundle changed");
        // Not before 5/6 of the life.
        assert!(!cas.rotate(t0 + 999).unwrap());
        assert_eq!(cas.active_id(), first);
        let old_svid = svid(&cas, t0 + 999);
        let seq1 = cas.sequence();
        assert!(cas.rotate(t0 + 1000).unwrap());
        assert!(cas.sequence() > seq1);
        let second = cas.active_id();
        assert_ne!(second, first);
        let new_svid = svid(&cas, t0 + 1000);
        let anchors = cas.anchors();
        // Both SVIDs verify against the bundle after the activation; the
        // new one only through the new CA.
        assert!(verify(&old_svid.chain, &anchors, t0 + 1000));
        assert!(verify(&new_svid.chain, &anchors, t0 + 1000));
        let new_anchor = CertificateDer::from(
            cas.published()
                .into_iter()
                .find(|c| c.id == second)
                .unwrap()
                .cert,
        );
        assert!(verify(
            &new_svid.chain,
            std::slice::from_ref(&new_anchor),
            t0 + 1000
        ));
        assert!(!verify(&old_svid.chain, &[new_anchor], t0 + 1000));
        let retired = cas.published().into_iter().find(|c| c.id == first).unwrap();
        assert_eq!(retired.state, KeyState::Retired);
        assert_eq!(retired.retired_at, Some(t0 + 1000));
        // Persisted across a restart.
        let again = open_cas(&store, x509_policy(1200, 50), false, t0 + 1001);
        assert_eq!(again.active_id(), second);
        assert_eq!(again.anchors().len(), 2);
        // The retired CA stays until its last leaf (retired_at + 50 s,
        // before its own notAfter) has expired, plus the margin.
        let gone_after = t0 + 1000 + 50 + RETIRED_CA_MARGIN_SECS;
        cas.rotate(gone_after).unwrap();
        assert!(cas.published().iter().any(|c| c.id == first));
        let seq2 = cas.sequence();
        assert!(cas.rotate(gone_after + 1).unwrap());
        assert!(!cas.published().iter().any(|c| c.id == first));
        assert!(cas.sequence() > seq2);
        assert!(store.x509_cas().unwrap().iter().all(|c| c.id != first));
    }

    #[test]
    fn x509_activation_waits_until_the_next_ca_was_published() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path()).unwrap());
        let t0 = now_unix();
        let cas = open_cas(&store, x509_policy(1200, 50), true, t0);
        let first = cas.active_id();
        // The server was down from before 1/2 until after 5/6: the next CA
        // is prepared now and must be published for a while (1/12 of the
        // life, here 100 s) before it signs.
        assert_eq!(X509Policy::min_published(1200), 100);
        assert!(cas.rotate(t0 + 1100).unwrap());
        assert_eq!(cas.active_id(), first);
        assert!(!cas.rotate(t0 + 1199).unwrap());
        assert!(cas.rotate(t0 + 1200).unwrap());
        assert_ne!(cas.active_id(), first);

        // An expired active CA is replaced at once.
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path()).unwrap());
        let cas = open_cas(&store, x509_policy(1200, 50), true, t0);
        let first = cas.active_id();
        cas.rotate(t0 + 1300).unwrap();
        assert_ne!(cas.active_id(), first);
    }

    #[test]
    fn x509_manual_prepare_activate_revoke() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path()).unwrap());
        let now = now_unix();
        let cas = open_cas(&store, x509_policy(86400, 3600), true, now);
        let first = cas.active_id();
        assert!(matches!(
            cas.activate(now),
            Err(CaError::NoPreparedKey(KeyKind::X509))
        ));
        assert!(matches!(
            cas.revoke(&first),
            Err(CaError::KeyIsActive(KeyKind::X509))
        ));
        let p = cas.prepare(now).unwrap();
        assert_eq!(cas.prepare(now).unwrap().id, p.id, "idempotent");
        assert_eq!(p.state, KeyState::Prepared);
        let before = svid(&cas, now);
        // The prepared CA signs nothing: a new SVID still chains to the first.
        let first_anchor = cas.active().anchor().clone();
        assert!(verify(&svid(&cas, now).chain, &[first_anchor], now));
        let a = cas.activate(now).unwrap();
        assert_eq!(a.id, p.id);
        assert_eq!(cas.active_id(), p.id);
        assert!(verify(&before.chain, &cas.anchors(), now));
        let seq = cas.sequence();
        let r = cas.revoke(&first).unwrap();
        assert_eq!(r.state, KeyState::Retired);
        assert!(cas.sequence() > seq);
        assert_eq!(cas.anchors().len(), 1);
        assert!(
            !verify(&before.chain, &cas.anchors(), now),
            "revoked CA left the bundle"
        );
        assert!(verify(&svid(&cas, now).chain, &cas.anchors(), now));
        assert!(matches!(cas.revoke(&first), Err(CaError::UnknownKey(..))));
        assert_eq!(store.x509_cas().unwrap().len(), 1);
        // A prepared CA can be revoked too.
        let p2 = cas.prepare(now).unwrap();
        cas.revoke(&p2.id).unwrap();
        assert_eq!(cas.anchors().len(), 1);
    }

    #[test]
    fn bundle_holds_every_published_ca_and_one_sequence() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path()).unwrap());
        let (cas, keys) =
            load_or_init(store.clone(), &td(), 86400, JwtKeyPolicy::default()).unwrap();
        let b1 = bundle(&td(), &cas, &keys);
        assert_eq!(b1.x509.authorities().len(), 1);
        cas.prepare(now_unix()).unwrap();
        let b2 = bundle(&td(), &cas, &keys);
        assert_eq!(b2.x509.authorities().len(), 2);
        assert!(b2.sequence > b1.sequence);
        keys.prepare(now_unix()).unwrap();
        let b3 = bundle(&td(), &cas, &keys);
        assert!(b3.sequence > b2.sequence, "one sequence for both kinds");
        drop((cas, keys));
        let (cas, keys) = load_or_init(store, &td(), 86400, JwtKeyPolicy::default()).unwrap();
        assert_eq!(
            bundle(&td(), &cas, &keys).sequence,
            b3.sequence,
            "persisted"
        );
    }

    #[test]
    fn legacy_ca_record_is_migrated_not_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path()).unwrap());
        let (ca, rec) = Ca::generate(&td(), 86400, now_unix()).unwrap();
        store
            .put_ca(&StoredCa {
                pkcs8: rec.pkcs8.clone(),
                cert: rec.cert.clone(),
            })
            .unwrap();
        // A JWT key and the trust domain: a store written before rotation.
        JwtKeys::load(store.clone(), JwtKeyPolicy::default(), true, now_unix()).unwrap();
        store.set_trust_domain("example.org").unwrap();
        let (cas, _) = load_or_init(store.clone(), &td(), 86400, JwtKeyPolicy::default()).unwrap();
        assert_eq!(&cas.cert(), ca.cert());
        assert_eq!(cas.active_id(), rec.id);
        assert!(store.ca().unwrap().is_none());
        let (again, _) = load_or_init(store, &td(), 86400, JwtKeyPolicy::default()).unwrap();
        assert_eq!(again.active_id(), rec.id);
    }

    #[test]
    fn unreadable_ca_key_refuses_to_start() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path()).unwrap());
        let (cas, _) = load_or_init(store.clone(), &td(), 86400, JwtKeyPolicy::default()).unwrap();
        // A passing start first.
        load_or_init(store.clone(), &td(), 86400, JwtKeyPolicy::default()).unwrap();
        let mut rec = store.x509_cas().unwrap().pop().unwrap();
        assert_eq!(rec.id, cas.active_id());
        rec.pkcs8 = vec![0x30, 0x03, 0x02, 0x01, 0x00];
        store.put_x509_ca(&rec).unwrap();
        let err = load_or_init(store.clone(), &td(), 86400, JwtKeyPolicy::default()).unwrap_err();
        assert!(matches!(err, CaError::MissingCa(_)), "{err}");
        assert!(err.to_string().contains("refusing to start"), "{err}");
        // A key of another CA is refused too.
        let (_, other) = Ca::generate(&td(), 86400, now_unix()).unwrap();
        rec.pkcs8 = other.pkcs8;
        store.put_x509_ca(&rec).unwrap();
        let err = load_or_init(store.clone(), &td(), 86400, JwtKeyPolicy::default()).unwrap_err();
        assert!(err.to_string().contains("does not match"), "{err}");
        // Nothing new was made.
        assert_eq!(store.x509_cas().unwrap().len(), 1);
    }

    // ---- upstream CA ----

    fn upstream_pem(not_after_days: i64) -> (String, String) {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = CertificateParams::default();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "Upstream Root");
        p.distinguished_name = dn;
        let now = time::OffsetDateTime::now_utc();
        p.not_before = now - time::Duration::days(1);
        p.not_after = now + time::Duration::days(not_after_days);
        let cert = p.self_signed(&key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    #[test]
    fn intermediate_under_upstream_chains_to_the_upstream_root_only() {
        let (cert_pem, key_pem) = upstream_pem(30);
        let up = Arc::new(
            UpstreamCa::from_pem(cert_pem.as_bytes(), key_pem.as_bytes(), now_unix()).unwrap(),
        );
        let root = up.cert().clone();
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path()).unwrap());
        let policy = X509Policy {
            upstream: Some(up.clone()),
            ..x509_policy(86400, 3600)
        };
        let now = now_unix();
        let (cas, keys) =
            load_or_init_with(store.clone(), policy.clone(), JwtKeyPolicy::default(), now).unwrap();
        // The bundle holds only the upstream root.
        assert_eq!(
            bundle(&td(), &cas, &keys).x509.authorities(),
            std::slice::from_ref(&root)
        );
        let s = svid(&cas, now);
        assert_eq!(s.chain.len(), 2, "leaf, intermediate");
        assert_eq!(s.chain[1], cas.cert());
        assert!(verify(&s.chain, std::slice::from_ref(&root), now));
        // Without the intermediate the leaf does not chain.
        assert!(!verify(&s.chain[..1], std::slice::from_ref(&root), now));
        // Never beyond the upstream's life.
        let rec = store.x509_cas().unwrap().pop().unwrap();
        assert!(rec.not_after <= now + 86400);
        assert!(rec.upstream.is_some());
        // Rotation: a new intermediate under the same upstream; the bundle
        // does not change its anchors.
        cas.prepare(now).unwrap();
        cas.activate(now).unwrap();
        let s2 = svid(&cas, now);
        assert_ne!(s2.chain[1], s.chain[1]);
        assert_eq!(cas.anchors(), std::slice::from_ref(&root));
        assert!(verify(&s2.chain, std::slice::from_ref(&root), now));
        assert!(verify(&s.chain, std::slice::from_ref(&root), now));
        // Restart with the same upstream: the same intermediates.
        drop((cas, keys));
        let (cas, _) = load_or_init_with(store, policy, JwtKeyPolicy::default(), now).unwrap();
        assert_eq!(cas.cert(), s2.chain[1]);
        // An intermediate is not a root: the upstream's Debug hides its key.
        assert!(format!("{up:?}").contains("redacted"));
    }

    #[test]
    fn upstream_key_must_match_and_cert_must_be_a_ca() {
        let (cert_pem, key_pem) = upstream_pem(30);
        let (_, other_key) = upstream_pem(30);
        let now = now_unix();
        assert!(UpstreamCa::from_pem(cert_pem.as_bytes(), key_pem.as_bytes(), now).is_ok());
        let err = UpstreamCa::from_pem(cert_pem.as_bytes(), other_key.as_bytes(), now).unwrap_err();
        assert!(err.to_string().contains("does not match"), "{err}");
        // A leaf certificate is not an upstream CA.
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let leaf = CertificateParams::new(vec!["leaf.example".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let err = UpstreamCa::from_pem(leaf.pem().as_bytes(), key.serialize_pem().as_bytes(), now)
            .unwrap_err();
        assert!(err.to_string().contains("not a CA"), "{err}");
        // Expired, garbage, a P-384 key.
        assert!(
            UpstreamCa::from_pem(cert_pem.as_bytes(), key_pem.as_bytes(), now + 31 * 86400)
                .is_err()
        );
        assert!(UpstreamCa::from_pem(b"junk", key_pem.as_bytes(), now).is_err());
        let p384 = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let err = UpstreamCa::from_pem(cert_pem.as_bytes(), p384.serialize_pem().as_bytes(), now)
            .unwrap_err();
        assert!(err.to_string().contains("P-256"), "{err}");
    }
}
