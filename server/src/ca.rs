//! The X.509 CA and the JWT signing keys.
//!
//! Guarantees:
//! - every certificate gets a fresh random 128-bit serial (rcgen's default
//!   serial is derived from the public key and repeats);
//! - leaves follow the SPIFFE X509-SVID profile: one URI SAN (the SPIFFE ID
//!   from the registration entry, never from the requester), CA=false,
//!   critical keyUsage digitalSignature, EKU serverAuth + clientAuth;
//! - no leaf outlives the CA;
//! - on a store that already holds state, a missing or unreadable CA key is
//!   an error ([`CaError::MissingCa`]), never a reason to make a new CA;
//! - JWT keys rotate prepare → activate → retire; a token's `exp` never
//!   exceeds its key's `not_after`, and a retired key stays published until
//!   [`RETIRED_KEY_MARGIN_SECS`] after that.

use crate::model::{JwtKeyState, RngError, StoredCa, StoredJwtKey, hex, now_unix, random_bytes};
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
use std::sync::RwLock;

/// A retired JWT key stays in the bundle this long after the last token it
/// signed can have expired.
pub const RETIRED_KEY_MARGIN_SECS: i64 = 24 * 3600;

/// Certificates are backdated this much to absorb clock skew.
const BACKDATE_SECS: i64 = 30;

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
    #[error("no prepared JWT key: run `sigil keys prepare` first")]
    NoPreparedKey,
    /// No key with this kid.
    #[error("no JWT key with kid {0:?}")]
    UnknownKey(String),
    /// The active key cannot be revoked.
    #[error("the active JWT key cannot be revoked: prepare and activate another one first")]
    KeyIsActive,
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
    /// Leaf first, then the CA.
    pub chain: Vec<CertificateDer<'static>>,
    /// Hex serial.
    pub serial: String,
    /// notAfter, Unix seconds.
    pub not_after: i64,
}

/// The X.509 CA.
pub struct Ca {
    td: TrustDomain,
    issuer: Issuer<'static, KeyPair>,
    cert: CertificateDer<'static>,
    not_after: i64,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Ca(td={}, not_after={})", self.td, self.not_after)
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

fn not_after_of(der: &[u8]) -> Result<i64, CaError> {
    let (_, c) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| CaError::MissingCa(format!("CA certificate does not parse: {e}")))?;
    Ok(c.validity().not_after.timestamp())
}

impl Ca {
    /// Makes a new self-signed root CA for `td`, valid `ttl` seconds.
    pub fn generate(td: &TrustDomain, ttl: i64, now: i64) -> Result<(Self, StoredCa), CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let (serial, _) = random_serial()?;
        params.serial_number = Some(serial);
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "SPIFFE");
        dn.push(DnType::CommonName, format!("Sigil CA {}", td.name()));
        params.distinguished_name = dn;
        params.subject_alt_names = vec![SanType::URI(
            td.id_string()
                .try_into()
                .map_err(|e: rcgen::Error| CaError::Cert(e.to_string()))?,
        )];
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = odt(now - BACKDATE_SECS)?;
        params.not_after = odt(now + ttl)?;
        let cert = params.self_signed(&key)?;
        let stored = StoredCa {
            pkcs8: key.serialize_der(),
            cert: cert.der().to_vec(),
        };
        let ca = Self::from_stored(td, &stored)?;
        Ok((ca, stored))
    }

    /// Loads a persisted CA.
    pub fn from_stored(td: &TrustDomain, s: &StoredCa) -> Result<Self, CaError> {
        let key = KeyPair::try_from(s.pkcs8.as_slice())
            .map_err(|e| CaError::MissingCa(format!("CA key does not parse: {e}")))?;
        let cert = CertificateDer::from(s.cert.clone());
        let not_after = not_after_of(&cert)?;
        {
            let (_, c) = x509_parser::parse_x509_certificate(&cert)
                .map_err(|e| CaError::MissingCa(e.to_string()))?;
            if c.public_key().subject_public_key.data.as_ref()
                != rcgen::PublicKeyData::der_bytes(&key)
            {
                return Err(CaError::MissingCa(
                    "CA key does not match the CA certificate".into(),
                ));
            }
        }
        let issuer = Issuer::from_ca_cert_der(&cert, key)
            .map_err(|e| CaError::MissingCa(format!("CA certificate unusable: {e}")))?;
        Ok(Self {
            td: td.clone(),
            issuer,
            cert,
            not_after,
        })
    }

    /// The CA certificate.
    pub fn cert(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// The CA's notAfter, Unix seconds.
    pub fn not_after(&self) -> i64 {
        self.not_after
    }

    /// Issues an X.509-SVID for `id` and the P-256 key `spki_der`, valid
    /// `ttl` seconds but never past the CA.
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
        Ok(Issued {
            chain: vec![cert.der().clone()],
            serial: serial_hex,
            not_after,
        })
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

/// The JWT signing keys: one active, maybe one prepared, some retired.
#[derive(Debug)]
pub struct JwtKeys {
    store: std::sync::Arc<dyn Store>,
    policy: JwtKeyPolicy,
    inner: RwLock<KeySet>,
    /// The bundle's sequence number: persisted, bumped on every change of
    /// the published key set, so it only grows.
    sequence: std::sync::atomic::AtomicU64,
}

#[derive(Debug)]
struct KeySet {
    all: Vec<StoredJwtKey>,
    active: std::sync::Arc<(JwtSigner, i64)>,
}

fn new_key(state: JwtKeyState, now: i64, ttl: i64) -> Result<StoredJwtKey, CaError> {
    let pk = PrivateKey::generate_p256().map_err(|e| CaError::Cert(e.to_string()))?;
    Ok(StoredJwtKey {
        kid: URL_SAFE_NO_PAD.encode(random_bytes::<16>()?),
        pkcs8: pk.secret_pkcs8_der().to_vec(),
        state,
        created_at: now,
        not_after: now + ttl,
        retired_at: None,
    })
}

fn signer(k: &StoredJwtKey) -> Result<JwtSigner, CaError> {
    JwtSigner::new(k.kid.clone(), &PrivateKey::from_pkcs8_der(k.pkcs8.clone()))
        .map_err(|e| CaError::MissingJwtKey(format!("key {}: {e}", k.kid)))
}

impl JwtKeys {
    /// Loads the keys; with `create` (a fresh store) makes the first one.
    pub fn load(
        store: std::sync::Arc<dyn Store>,
        policy: JwtKeyPolicy,
        create: bool,
        now: i64,
    ) -> Result<Self, CaError> {
        let mut all = store.jwt_keys()?;
        if !all.iter().any(|k| k.state == JwtKeyState::Active) {
            if !create {
                return Err(CaError::MissingJwtKey("no active key".into()));
            }
            let k = new_key(JwtKeyState::Active, now, policy.key_ttl)?;
            store.put_jwt_key(&k)?;
            all.push(k);
        }
        let active = Self::pick_active(&all)?;
        let mut seq = store.bundle_sequence()?;
        if seq == 0 {
            seq = store.bump_bundle_sequence()?;
        }
        let keys = Self {
            store,
            policy,
            inner: RwLock::new(KeySet { all, active }),
            sequence: std::sync::atomic::AtomicU64::new(seq),
        };
        keys.rotate(now)?;
        Ok(keys)
    }

    fn pick_active(all: &[StoredJwtKey]) -> Result<std::sync::Arc<(JwtSigner, i64)>, CaError> {
        let k = all
            .iter()
            .filter(|k| k.state == JwtKeyState::Active)
            .max_by_key(|k| k.created_at)
            .ok_or_else(|| CaError::MissingJwtKey("no active key".into()))?;
        Ok(std::sync::Arc::new((signer(k)?, k.not_after)))
    }

    /// The active signer and its `not_after`.
    pub fn active(&self) -> std::sync::Arc<(JwtSigner, i64)> {
        match self.inner.read() {
            Ok(g) => g.active.clone(),
            Err(p) => p.into_inner().active.clone(),
        }
    }

    /// The bundle sequence number.
    pub fn sequence(&self) -> u64 {
        self.sequence.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn bump(&self) -> Result<(), CaError> {
        let n = self.store.bump_bundle_sequence()?;
        self.sequence
            .fetch_max(n, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    /// Keys to publish: prepared, active and retired-but-not-yet-dropped.
    pub fn published(&self) -> Vec<StoredJwtKey> {
        match self.inner.read() {
            Ok(g) => g.all.clone(),
            Err(p) => p.into_inner().all.clone(),
        }
    }

    /// One rotation step at time `now`:
    /// - prepare a next key once the active one has used half its life;
    /// - activate the prepared key (retiring the active one) once the
    ///   active key has less than 2 × the longest JWT TTL left, so no token
    ///   is cut short;
    /// - drop retired keys [`RETIRED_KEY_MARGIN_SECS`] after their
    ///   `not_after` (every token they signed has expired by then).
    ///
    /// Returns true when the key set changed.
    pub fn rotate(&self, now: i64) -> Result<bool, CaError> {
        let mut g = match self.inner.write() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let mut changed = false;
        let active = g
            .all
            .iter()
            .filter(|k| k.state == JwtKeyState::Active)
            .max_by_key(|k| k.created_at)
            .cloned()
            .ok_or_else(|| CaError::MissingJwtKey("no active key".into()))?;
        let has_prepared = g.all.iter().any(|k| k.state == JwtKeyState::Prepared);
        let half_life = active.created_at + (active.not_after - active.created_at) / 2;
        if !has_prepared && now >= half_life {
            let k = new_key(JwtKeyState::Prepared, now, self.policy.key_ttl)?;
            self.store.put_jwt_key(&k)?;
            g.all.push(k);
            changed = true;
        }
        if now >= active.not_after - 2 * self.policy.max_jwt_ttl {
            changed |= self.activate_locked(&mut g, now)?;
        }
        let before = g.all.len();
        let mut dropped = Vec::new();
        g.all.retain(|k| {
            let keep =
                !(k.state == JwtKeyState::Retired && now > k.not_after + RETIRED_KEY_MARGIN_SECS);
            if !keep {
                dropped.push(k.kid.clone());
            }
            keep
        });
        for kid in dropped {
            self.store.delete_jwt_key(&kid)?;
        }
        changed |= g.all.len() != before;
        if changed {
            self.bump()?;
        }
        Ok(changed)
    }

    /// Publishes a next key (or returns the one already prepared).
    pub fn prepare(&self, now: i64) -> Result<StoredJwtKey, CaError> {
        let mut g = match self.inner.write() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if let Some(k) = g.all.iter().find(|k| k.state == JwtKeyState::Prepared) {
            return Ok(k.clone());
        }
        let k = new_key(JwtKeyState::Prepared, now, self.policy.key_ttl)?;
        self.store.put_jwt_key(&k)?;
        g.all.push(k.clone());
        self.bump()?;
        Ok(k)
    }

    /// Activates the prepared key and retires the active one.
    pub fn activate(&self, now: i64) -> Result<StoredJwtKey, CaError> {
        let mut g = match self.inner.write() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if !self.activate_locked(&mut g, now)? {
            return Err(CaError::NoPreparedKey);
        }
        self.bump()?;
        let kid = g.active.0.kid().to_owned();
        g.all
            .iter()
            .find(|k| k.kid == kid)
            .cloned()
            .ok_or_else(|| CaError::MissingJwtKey("active key vanished".into()))
    }

    /// Removes a prepared or retired key from the bundle and the store.
    pub fn revoke(&self, kid: &str) -> Result<StoredJwtKey, CaError> {
        let mut g = match self.inner.write() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let Some(pos) = g.all.iter().position(|k| k.kid == kid) else {
            return Err(CaError::UnknownKey(kid.to_owned()));
        };
        if g.all[pos].state == JwtKeyState::Active {
            return Err(CaError::KeyIsActive);
        }
        self.store.delete_jwt_key(kid)?;
        let k = g.all.remove(pos);
        self.bump()?;
        Ok(k)
    }

    /// Forces a rotation now: prepares a key if there is none, activates it
    /// and retires the active one.
    pub fn force_rotate(&self, now: i64) -> Result<(), CaError> {
        let mut g = match self.inner.write() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if !g.all.iter().any(|k| k.state == JwtKeyState::Prepared) {
            let k = new_key(JwtKeyState::Prepared, now, self.policy.key_ttl)?;
            self.store.put_jwt_key(&k)?;
            g.all.push(k);
        }
        self.activate_locked(&mut g, now)?;
        self.bump()
    }

    fn activate_locked(&self, g: &mut KeySet, now: i64) -> Result<bool, CaError> {
        let Some(next) = g
            .all
            .iter()
            .filter(|k| k.state == JwtKeyState::Prepared)
            .max_by_key(|k| k.created_at)
            .cloned()
        else {
            return Ok(false);
        };
        // Persist the new active key first: a crash in between leaves two
        // active keys (the newest wins), never none.
        let mut next = next;
        next.state = JwtKeyState::Active;
        self.store.put_jwt_key(&next)?;
        let mut retired = Vec::new();
        for k in g.all.iter_mut() {
            if k.kid == next.kid {
                *k = next.clone();
            } else if k.state == JwtKeyState::Active {
                k.state = JwtKeyState::Retired;
                k.retired_at = Some(now);
                retired.push(k.clone());
            }
        }
        for k in &retired {
            self.store.put_jwt_key(k)?;
        }
        g.active = std::sync::Arc::new((signer(&next)?, next.not_after));
        Ok(true)
    }
}

/// Loads the CA and JWT keys from the store, creating them only when the
/// store holds no state yet.
pub fn load_or_init(
    store: std::sync::Arc<dyn Store>,
    td: &TrustDomain,
    ca_ttl: i64,
    policy: JwtKeyPolicy,
) -> Result<(Ca, JwtKeys), CaError> {
    let now = now_unix();
    match store.trust_domain()? {
        Some(stored) => {
            if stored != td.name() {
                return Err(CaError::TrustDomainMismatch {
                    stored,
                    configured: td.name().to_owned(),
                });
            }
            let ca = match store.ca() {
                Ok(Some(s)) => Ca::from_stored(td, &s)?,
                Ok(None) => return Err(CaError::MissingCa("no CA key in the store".into())),
                Err(e) => return Err(CaError::MissingCa(e.to_string())),
            };
            let keys = JwtKeys::load(store, policy, false, now)?;
            Ok((ca, keys))
        }
        None => {
            // A crash during a first start may have left a CA behind.
            let ca = match store.ca()? {
                Some(s) => Ca::from_stored(td, &s)?,
                None => {
                    let (ca, stored) = Ca::generate(td, ca_ttl, now)?;
                    store.put_ca(&stored)?;
                    ca
                }
            };
            let keys = JwtKeys::load(store.clone(), policy, true, now)?;
            store.set_trust_domain(td.name())?;
            Ok((ca, keys))
        }
    }
}

/// The trust bundle: the CA certificate and every published JWT key.
pub fn bundle(td: &TrustDomain, ca: &Ca, keys: &JwtKeys, sequence: u64) -> Bundle {
    let mut b = Bundle::empty(td.clone());
    b.x509.add_authority(ca.cert().clone());
    for k in keys.published() {
        let sec1 = PrivateKey::from_pkcs8_der(k.pkcs8.clone()).public_key_sec1();
        if let Ok(sec1) = sec1
            && let Ok(jk) = JwtKey::from_sec1(&k.kid, &sec1)
        {
            let _ = b.jwt.add_key(jk);
        }
    }
    b.sequence = Some(sequence);
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
        drop((store, keys, keys2));
        // Remove the CA key behind the server's back.
        {
            let db = sled::open(dir.path()).unwrap();
            db.open_tree("keys").unwrap().remove("ca").unwrap();
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
        assert_eq!(old.state, JwtKeyState::Retired);
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
        assert!(matches!(keys.activate(now), Err(CaError::NoPreparedKey)));
        assert!(matches!(keys.revoke(&k1), Err(CaError::KeyIsActive)));
        let p = keys.prepare(now).unwrap();
        assert_eq!(keys.prepare(now).unwrap().kid, p.kid, "idempotent");
        assert_eq!(keys.active().0.kid(), k1, "prepared keys do not sign");
        let a = keys.activate(now).unwrap();
        assert_eq!(a.kid, p.kid);
        assert_eq!(a.state, JwtKeyState::Active);
        assert_eq!(keys.active().0.kid(), p.kid);
        let before_revoke = keys.sequence();
        let r = keys.revoke(&k1).unwrap();
        assert_eq!(r.state, JwtKeyState::Retired);
        assert!(keys.sequence() > before_revoke, "sequence only grows");
        assert!(matches!(keys.revoke(&k1), Err(CaError::UnknownKey(_))));
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
}
