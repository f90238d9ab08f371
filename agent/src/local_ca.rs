//! An in-process CA and JWT signer that implements [`IdentitySource`].
//!
//! This is a real minting component, not a mock: ECDSA P-256 keys, random
//! 128-bit serials, X.509-SVIDs per the SPIFFE leaf profile (one URI SAN,
//! CA=false, critical keyUsage digitalSignature, extendedKeyUsage serverAuth
//! and clientAuth; every leaf is checked by [`X509Svid::new`]) and ES256
//! JWT-SVIDs from [`JwtSigner`]. It serves tests and single-host demos, where
//! no server is involved; the agent proper gets its SVIDs from the server.
//!
//! Rotation: each X.509-SVID is re-minted at about half its life (minus up to
//! a tenth of it as jitter) by the task [`LocalCa::spawn_rotation`] starts.
//! [`LocalCa::rotate_ca`] replaces the CA and keeps the old one in the bundle
//! so SVIDs it signed stay valid until they rotate.

use crate::entry::{AuthorizedAudience, RegistrationEntry};
use crate::identity::{
    IdentitySnapshot, IdentitySource, MintedJwtSvid, NodeAttestation, SourceError,
};
use futures::future::BoxFuture;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls_pki_types::CertificateDer;
use sigil::svid::jwt::{JwtSigner, JwtSvidClaims, random_jti};
use sigil::{Bundle, JwtBundle, JwtKey, PrivateKey, SpiffeId, TrustDomain, X509Bundle, X509Svid};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use time::OffsetDateTime;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

/// How far `notBefore` is backdated, for clock skew.
const BACKDATE: Duration = Duration::from_secs(10);

/// [`LocalCa`] settings.
#[derive(Debug, Clone)]
pub struct LocalCaConfig {
    /// The trust domain.
    pub trust_domain: TrustDomain,
    /// The node attestation recorded in JWT-SVIDs (`acr`, `amr`).
    pub node: NodeAttestation,
    /// CA certificate lifetime.
    pub ca_ttl: Duration,
    /// `iss` of JWT-SVIDs, if any.
    pub jwt_issuer: Option<String>,
}

impl LocalCaConfig {
    /// A 7-day CA for `trust_domain` on a join-token (AL1) node.
    pub fn new(trust_domain: TrustDomain) -> Self {
        Self {
            trust_domain,
            node: NodeAttestation {
                level: sigil::AssuranceLevel::Al1,
                method: sigil::assurance::methods::JOIN_TOKEN.to_owned(),
            },
            ca_ttl: Duration::from_secs(7 * 24 * 3600),
            jwt_issuer: None,
        }
    }
}

/// Minting failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LocalCaError {
    /// Certificate generation failed.
    #[error("certificate generation failed: {0}")]
    Certificate(String),
    /// Key generation or loading failed.
    #[error("key handling failed: {0}")]
    Key(String),
    /// The minted leaf broke an X.509-SVID rule (a bug).
    #[error("minted certificate is not a valid X.509-SVID: {0}")]
    Svid(#[from] sigil::X509SvidError),
}

impl From<time::error::ComponentRange> for LocalCaError {
    fn from(e: time::error::ComponentRange) -> Self {
        Self::Certificate(e.to_string())
    }
}

impl From<rcgen::Error> for LocalCaError {
    fn from(e: rcgen::Error) -> Self {
        Self::Certificate(e.to_string())
    }
}

struct Ca {
    key: KeyPair,
    params: CertificateParams,
    der: CertificateDer<'static>,
    not_after: OffsetDateTime,
}

struct MintedX509 {
    svid: Arc<X509Svid>,
    refresh_at: Instant,
}

struct State {
    ca: Ca,
    /// Previous CAs, still in the bundle.
    retired: Vec<CertificateDer<'static>>,
    jwt: JwtSigner,
    entries: Vec<Arc<RegistrationEntry>>,
    svids: BTreeMap<String, MintedX509>,
    federated: BTreeMap<TrustDomain, Bundle>,
    sequence: u64,
}

struct Inner {
    config: LocalCaConfig,
    state: Mutex<State>,
    tx: watch::Sender<Arc<IdentitySnapshot>>,
    wake: Notify,
}

/// An in-process CA and JWT signer. Cheap to clone (shared state).
#[derive(Clone)]
pub struct LocalCa {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for LocalCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LocalCa({})", self.inner.config.trust_domain)
    }
}

/// The rotation task; stops when dropped.
#[derive(Debug)]
pub struct RotationTask(tokio::task::JoinHandle<()>);

impl Drop for RotationTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl LocalCa {
    /// A new CA with fresh keys and no entries.
    pub fn new(config: LocalCaConfig) -> Result<Self, LocalCaError> {
        let ca = new_ca(&config)?;
        let jwt = new_jwt_signer()?;
        let state = State {
            ca,
            retired: Vec::new(),
            jwt,
            entries: Vec::new(),
            svids: BTreeMap::new(),
            federated: BTreeMap::new(),
            sequence: 1,
        };
        let snapshot = snapshot(&config, &state)?;
        let (tx, _) = watch::channel(Arc::new(snapshot));
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                state: Mutex::new(state),
                tx,
                wake: Notify::new(),
            }),
        })
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.inner.config.trust_domain
    }

    /// This trust domain's bundle (X.509 authorities and JWT keys).
    pub fn bundle(&self) -> Bundle {
        let snap = self.inner.tx.borrow();
        snap.bundles
            .get(&self.inner.config.trust_domain)
            .cloned()
            .unwrap_or_else(|| Bundle::empty(self.inner.config.trust_domain.clone()))
    }

    /// Replaces the registration entries, mints SVIDs for new or changed
    /// ones, drops those of removed ones and publishes.
    pub fn set_entries(&self, entries: Vec<RegistrationEntry>) -> Result<(), LocalCaError> {
        let mut st = self.lock();
        let entries: Vec<Arc<RegistrationEntry>> = entries.into_iter().map(Arc::new).collect();
        let mut svids = BTreeMap::new();
        for e in &entries {
            let keep = st.svids.remove(&e.id).filter(|_| {
                st.entries
                    .iter()
                    .any(|old| old.id == e.id && old.spiffe_id == e.spiffe_id)
            });
            let minted = match keep {
                Some(m) => m,
                None => mint_x509(&st.ca, &e.spiffe_id, e.x509_ttl)?,
            };
            svids.insert(e.id.clone(), minted);
        }
        st.svids = svids;
        st.entries = entries;
        self.publish(&mut st)
    }

    /// Replaces the CA (the old one stays in the bundle) and re-mints every
    /// X.509-SVID under the new one.
    pub fn rotate_ca(&self) -> Result<(), LocalCaError> {
        let mut st = self.lock();
        let ca = new_ca(&self.inner.config)?;
        let old = std::mem::replace(&mut st.ca, ca);
        st.retired.push(old.der);
        let entries = st.entries.clone();
        for e in entries {
            let m = mint_x509(&st.ca, &e.spiffe_id, e.x509_ttl)?;
            st.svids.insert(e.id.clone(), m);
        }
        self.publish(&mut st)
    }

    /// Adds or replaces the bundle of a federated trust domain.
    pub fn set_federated_bundle(&self, bundle: Bundle) -> Result<(), LocalCaError> {
        let mut st = self.lock();
        st.federated.insert(bundle.trust_domain().clone(), bundle);
        self.publish(&mut st)
    }

    /// Mints a stand-alone X.509-SVID (not tied to an entry).
    pub fn mint_x509_svid(
        &self,
        spiffe_id: &SpiffeId,
        ttl: Duration,
    ) -> Result<X509Svid, LocalCaError> {
        let st = self.lock();
        let m = mint_x509(&st.ca, spiffe_id, ttl)?;
        Ok(Arc::unwrap_or_clone(m.svid))
    }

    /// Starts the task that re-mints X.509-SVIDs at about half life.
    pub fn spawn_rotation(&self) -> RotationTask {
        let ca = self.clone();
        RotationTask(tokio::spawn(async move { ca.rotate_forever().await }))
    }

    async fn rotate_forever(self) {
        loop {
            let next = self.lock().svids.values().map(|m| m.refresh_at).min();
            let sleep = async {
                match next {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = sleep => {
                    if let Err(e) = self.rotate_due() {
                        tracing::error!(error = %e, "X.509-SVID rotation failed; retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
                () = self.inner.wake.notified() => {}
            }
        }
    }

    fn rotate_due(&self) -> Result<(), LocalCaError> {
        let mut st = self.lock();
        let now = Instant::now();
        let due: Vec<Arc<RegistrationEntry>> = st
            .entries
            .iter()
            .filter(|e| st.svids.get(&e.id).is_none_or(|m| m.refresh_at <= now))
            .cloned()
            .collect();
        if due.is_empty() {
            return Ok(());
        }
        for e in due {
            let m = mint_x509(&st.ca, &e.spiffe_id, e.x509_ttl)?;
            st.svids.insert(e.id.clone(), m);
        }
        self.publish(&mut st)
    }

    fn publish(&self, st: &mut State) -> Result<(), LocalCaError> {
        st.sequence += 1;
        let snap = snapshot(&self.inner.config, st)?;
        self.inner.tx.send_replace(Arc::new(snap));
        self.inner.wake.notify_one();
        Ok(())
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // State is replaced field by field only after minting succeeded, so
        // a panic elsewhere cannot leave it half-updated.
        self.inner
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn mint_jwt(&self, authorized: &AuthorizedAudience) -> Result<MintedJwtSvid, SourceError> {
        let st = self.lock();
        let entry = authorized.entry();
        if !st
            .entries
            .iter()
            .any(|e| e.id == entry.id && e.spiffe_id == entry.spiffe_id)
        {
            return Err(SourceError::UnknownEntry(entry.id.clone()));
        }
        let now = unix_now();
        let ttl = i64::try_from(entry.jwt_ttl.as_secs()).unwrap_or(i64::MAX);
        let node = &self.inner.config.node;
        let claims = JwtSvidClaims {
            sub: entry.spiffe_id.clone(),
            aud: authorized.audience().to_owned(),
            exp: now.saturating_add(ttl),
            iat: now,
            jti: random_jti(),
            iss: self.inner.config.jwt_issuer.clone(),
            acr: Some(node.level.acr().to_owned()),
            amr: vec![
                node.method.clone(),
                sigil::assurance::methods::PEERCRED.to_owned(),
            ],
            cnf: None,
        };
        let token = st
            .jwt
            .sign(&claims)
            .map_err(|e| SourceError::Internal(e.to_string()))?;
        Ok(MintedJwtSvid {
            spiffe_id: claims.sub,
            token,
            expiry: claims.exp,
        })
    }
}

impl IdentitySource for LocalCa {
    fn subscribe(&self) -> watch::Receiver<Arc<IdentitySnapshot>> {
        self.inner.tx.subscribe()
    }

    fn fetch_jwt_svid<'a>(
        &'a self,
        authorized: &'a AuthorizedAudience,
    ) -> BoxFuture<'a, Result<MintedJwtSvid, SourceError>> {
        Box::pin(async move { self.mint_jwt(authorized) })
    }
}

fn snapshot(config: &LocalCaConfig, st: &State) -> Result<IdentitySnapshot, LocalCaError> {
    let td = config.trust_domain.clone();
    let mut x509 = X509Bundle::empty(td.clone());
    x509.add_authority(st.ca.der.clone());
    for der in &st.retired {
        x509.add_authority(der.clone());
    }
    let mut jwt = JwtBundle::empty(td.clone());
    let key = JwtKey::from_sec1(st.jwt.kid(), &st.jwt.public_key_sec1())
        .map_err(|e| LocalCaError::Key(e.to_owned()))?;
    jwt.add_key(key)
        .map_err(|e| LocalCaError::Key(e.to_string()))?;
    let mut snap = IdentitySnapshot::empty(td.clone(), config.node.clone());
    snap.bundles.insert(Bundle {
        x509,
        jwt,
        sequence: Some(st.sequence),
        ..Bundle::empty(td)
    });
    for b in st.federated.values() {
        snap.bundles.insert(b.clone());
    }
    snap.entries = st.entries.clone();
    snap.x509_svids = st
        .svids
        .iter()
        .map(|(id, m)| (id.clone(), Arc::clone(&m.svid)))
        .collect();
    Ok(snap)
}

fn random_bytes<const N: usize>() -> Result<[u8; N], LocalCaError> {
    let mut b = [0u8; N];
    aws_lc_rs::rand::fill(&mut b).map_err(|_| LocalCaError::Key("RNG failed".into()))?;
    Ok(b)
}

/// A random positive 128-bit serial (rcgen's default repeats per key).
fn random_serial() -> Result<SerialNumber, LocalCaError> {
    let mut b = random_bytes::<16>()?;
    b[0] = (b[0] & 0x7f) | 0x40;
    Ok(SerialNumber::from_slice(&b))
}

fn dn(cn: Option<&str>) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Sigil");
    if let Some(cn) = cn {
        dn.push(DnType::CommonName, cn);
    }
    dn
}

fn uri_san(id: &str) -> Result<SanType, LocalCaError> {
    Ok(SanType::URI(id.to_owned().try_into()?))
}

fn new_ca(config: &LocalCaConfig) -> Result<Ca, LocalCaError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = dn(Some("Sigil local CA"));
    params.subject_alt_names = vec![uri_san(&config.trust_domain.id_string())?];
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.serial_number = Some(random_serial()?);
    let now = OffsetDateTime::now_utc();
    params.not_before = now - BACKDATE;
    params.not_after = now + config.ca_ttl;
    let cert = params.self_signed(&key)?;
    Ok(Ca {
        key,
        der: cert.der().clone(),
        not_after: params.not_after,
        params,
    })
}

fn new_jwt_signer() -> Result<JwtSigner, LocalCaError> {
    let key = PrivateKey::generate_p256().map_err(|e| LocalCaError::Key(e.to_string()))?;
    let kid = base64::Engine::encode(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD,
        random_bytes::<12>()?,
    );
    JwtSigner::new(kid, &key).map_err(|e| LocalCaError::Key(e.to_string()))
}

fn mint_x509(ca: &Ca, id: &SpiffeId, ttl: Duration) -> Result<MintedX509, LocalCaError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = dn(None);
    params.subject_alt_names = vec![uri_san(id.as_str())?];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(random_serial()?);
    let issued = Instant::now();
    let now = OffsetDateTime::now_utc();
    params.not_before = now - BACKDATE;
    // A leaf never outlives its CA. Certificates carry whole seconds, so
    // the rotation schedule uses the truncated expiry.
    let not_after = (now + ttl).min(ca.not_after).replace_nanosecond(0)?;
    params.not_after = not_after;
    let issuer = Issuer::from_params(&ca.params, &ca.key);
    let cert = params.signed_by(&key, &issuer)?;
    let svid = X509Svid::new(
        vec![cert.der().clone()],
        PrivateKey::from_pkcs8_der(key.serialize_der()),
    )?;
    // Refresh at half the remaining life, minus up to a tenth as jitter.
    let life = (not_after - now).try_into().unwrap_or(Duration::ZERO);
    let jitter_frac = f64::from(random_bytes::<1>()?[0]) / 255.0 / 10.0;
    let refresh = life.mul_f64(0.5 - jitter_frac);
    Ok(MintedX509 {
        svid: Arc::new(svid),
        refresh_at: issued + refresh,
    })
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::selector::Selector;
    use sigil::{BundleSet, JwtSvidValidator};

    fn ca() -> LocalCa {
        LocalCa::new(LocalCaConfig::new(TrustDomain::new("example.org").unwrap())).unwrap()
    }

    fn entry(id: &str, path: &str, ttl: Duration) -> RegistrationEntry {
        let mut e = RegistrationEntry::new(
            id,
            SpiffeId::parse(&format!("spiffe://example.org{path}")).unwrap(),
            vec![Selector::parse("unix:uid:1").unwrap()],
        );
        e.x509_ttl = ttl;
        e.audiences = vec!["ehr-fhir".into()];
        e
    }

    #[test]
    fn leaves_follow_the_spiffe_profile_and_verify() {
        let ca = ca();
        let id = SpiffeId::parse("spiffe://example.org/w").unwrap();
        let a = ca.mint_x509_svid(&id, Duration::from_secs(3600)).unwrap();
        let b = ca.mint_x509_svid(&id, Duration::from_secs(3600)).unwrap();
        assert_eq!(a.spiffe_id(), &id);
        let serial = |s: &X509Svid| {
            let (_, c) = x509_parser::parse_x509_certificate(s.leaf()).unwrap();
            c.raw_serial().to_vec()
        };
        assert_ne!(serial(&a), serial(&b));
        assert_eq!(serial(&a).len(), 16);
        // Key is PKCS#8 P-256.
        assert_eq!(a.private_key().public_key_sec1().unwrap().len(), 65);
        let bundles: BundleSet = [ca.bundle()].into_iter().collect();
        sigil::verify_x509_svid(a.chain(), &bundles, SystemTime::now(), &|i: &SpiffeId| {
            *i == id
        })
        .unwrap();
        let life = a.not_after() - unix_now();
        assert!((3590..=3600).contains(&life), "{life}");
    }

    #[tokio::test]
    async fn entries_rotation_and_jwt() {
        let ca = ca();
        let mut rx = ca.subscribe();
        ca.set_entries(vec![entry("e1", "/a", Duration::from_secs(2))])
            .unwrap();
        let first = rx.borrow_and_update().x509_svids["e1"].clone();
        let _task = ca.spawn_rotation();
        tokio::time::timeout(Duration::from_secs(3), rx.changed())
            .await
            .unwrap()
            .unwrap();
        let second = rx.borrow_and_update().x509_svids["e1"].clone();
        assert_ne!(first.leaf(), second.leaf());

        let snap = rx.borrow().clone();
        let matched: Vec<_> = snap.entries.iter().collect();
        let auth = crate::entry::authorize_jwt(&matched, None, "ehr-fhir")
            .unwrap()
            .remove(0);
        let jwt = ca.fetch_jwt_svid(&auth).await.unwrap();
        let v = JwtSvidValidator::new("ehr-fhir")
            .validate(&jwt.token, &snap.bundles, SystemTime::now())
            .unwrap();
        assert_eq!(v.spiffe_id().as_str(), "spiffe://example.org/a");
        assert_eq!(v.acr(), Some("sigil:al1"));
        assert_eq!(v.amr(), ["join_token", "peercred"]);

        // Removing the entry removes its SVID and its minting right.
        ca.set_entries(vec![]).unwrap();
        assert!(rx.borrow_and_update().x509_svids.is_empty());
        assert_eq!(
            ca.fetch_jwt_svid(&auth).await,
            Err(SourceError::UnknownEntry("e1".into()))
        );
    }

    #[test]
    fn ca_rotation_keeps_the_old_ca_in_the_bundle() {
        let ca = ca();
        ca.set_entries(vec![entry("e1", "/a", Duration::from_secs(3600))])
            .unwrap();
        let before = ca.bundle();
        ca.rotate_ca().unwrap();
        let after = ca.bundle();
        assert_eq!(before.x509.authorities().len(), 1);
        assert_eq!(after.x509.authorities().len(), 2);
        assert!(
            after
                .x509
                .authorities()
                .contains(&before.x509.authorities()[0])
        );
        assert!(after.sequence > before.sequence);
    }
}
