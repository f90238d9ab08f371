//! X.509-SVID verification for tools and mTLS peers.
//!
//! [`verify_x509_svid`] checks, in order:
//! 1. the leaf rules of the X509-SVID spec (see [`crate::svid::x509`]) and the
//!    signing-certificate rules for every other certificate presented;
//! 2. that a bundle exists for the leaf's **own** trust domain (no other
//!    bundle is ever tried);
//! 3. path building and signatures to an authority of that bundle that is
//!    valid at the time of the check (expired or not-yet-valid authorities
//!    are never used as anchors), with rustls-webpki; validity periods of leaf
//!    and intermediates; EKU clientAuth if an EKU is present;
//! 4. the [`Authorizer`] on the verified SPIFFE ID.
//!
//! Not checked: revocation (SPIFFE relies on short lifetimes), name
//! constraints (rustls-webpki rejects URI name constraints outright, so
//! SPIFFE CAs must not carry any), DNS SANs.

use crate::bundle::BundleSet;
use crate::id::{SpiffeId, TrustDomain};
use crate::svid::x509::{X509SvidError, check_chain};
use rustls_pki_types::{CertificateDer, UnixTime};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A chain that passed every check of [`verify_x509_svid`]. Only this module
/// can build one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedX509Svid {
    id: SpiffeId,
    not_after: i64,
}

impl VerifiedX509Svid {
    /// The verified SPIFFE ID.
    pub fn spiffe_id(&self) -> &SpiffeId {
        &self.id
    }

    /// The leaf's notAfter, Unix seconds.
    pub fn not_after(&self) -> i64 {
        self.not_after
    }
}

/// Decides whether a verified SPIFFE ID may proceed.
pub trait Authorizer: Send + Sync {
    /// `true` to accept.
    fn authorize(&self, id: &SpiffeId) -> bool;
}

/// Accepts any verified ID.
#[derive(Debug, Clone, Copy, Default)]
pub struct AnyId;

impl Authorizer for AnyId {
    fn authorize(&self, _: &SpiffeId) -> bool {
        true
    }
}

/// Accepts exactly one ID.
#[derive(Debug, Clone)]
pub struct ExactId(pub SpiffeId);

impl Authorizer for ExactId {
    fn authorize(&self, id: &SpiffeId) -> bool {
        *id == self.0
    }
}

/// Accepts IDs of one trust domain.
#[derive(Debug, Clone)]
pub struct MemberOf(pub TrustDomain);

impl Authorizer for MemberOf {
    fn authorize(&self, id: &SpiffeId) -> bool {
        id.is_member_of(&self.0)
    }
}

impl<F: Fn(&SpiffeId) -> bool + Send + Sync> Authorizer for F {
    fn authorize(&self, id: &SpiffeId) -> bool {
        self(id)
    }
}

fn unix(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Verifies an X.509-SVID chain (leaf first) against the bundle of the leaf's
/// trust domain, then runs `authorizer`.
pub fn verify_x509_svid(
    chain: &[CertificateDer<'_>],
    bundles: &BundleSet,
    now: SystemTime,
    authorizer: &dyn Authorizer,
) -> Result<VerifiedX509Svid, X509SvidError> {
    let leaf = check_chain(chain)?;
    let (id, not_after) = (leaf.id, leaf.not_after);
    let bundle = bundles
        .get_by_name(id.trust_domain_name())
        .ok_or_else(|| X509SvidError::NoBundleForTrustDomain(id.trust_domain_name().to_owned()))?;
    let now_s = unix(now);
    let anchors: Vec<_> = bundle
        .x509
        .authorities()
        .iter()
        .filter(|a| authority_is_current(a, now_s))
        .filter_map(|a| webpki::anchor_from_trusted_cert(a).ok())
        .collect();
    if anchors.is_empty() {
        return Err(X509SvidError::Untrusted(
            "the trust domain's bundle has no current authority".into(),
        ));
    }
    // Checked by `check_chain`: the chain is non-empty.
    let leaf = webpki::EndEntityCert::try_from(&chain[0])
        .map_err(|e| X509SvidError::Untrusted(e.to_string()))?;
    let time = UnixTime::since_unix_epoch(Duration::from_secs(now_s.max(0) as u64));
    leaf.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        &anchors,
        &chain[1..],
        time,
        webpki::KeyUsage::client_auth(),
        None,
        None,
    )
    .map_err(|e| X509SvidError::Untrusted(format!("{e:?}")))?;
    if !authorizer.authorize(&id) {
        return Err(X509SvidError::NotAuthorized(id.to_string()));
    }
    Ok(VerifiedX509Svid { id, not_after })
}

fn authority_is_current(der: &[u8], now: i64) -> bool {
    x509_parser::parse_x509_certificate(der).is_ok_and(|(_, c)| {
        c.validity().not_before.timestamp() <= now && now <= c.validity().not_after.timestamp()
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::bundle::{Bundle, X509Bundle};
    use crate::key::PrivateKey;
    use crate::svid::x509::X509Svid;
    use rcgen::{
        BasicConstraints, CertificateParams, CustomExtension, ExtendedKeyUsagePurpose, IsCa,
        Issuer, KeyPair, KeyUsagePurpose, SanType,
    };

    pub(crate) struct Ca {
        pub params: CertificateParams,
        pub key: KeyPair,
        pub der: CertificateDer<'static>,
    }

    fn days_from_now(d: i64) -> time::OffsetDateTime {
        let now = unix(SystemTime::now());
        time::OffsetDateTime::from_unix_timestamp(now + d * 86_400).unwrap()
    }

    pub(crate) fn ca_with(td: &str, not_before_days: i64, not_after_days: i64) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params
            .subject_alt_names
            .push(SanType::URI(format!("spiffe://{td}").try_into().unwrap()));
        params.not_before = days_from_now(not_before_days);
        params.not_after = days_from_now(not_after_days);
        let der = params.self_signed(&key).unwrap().der().clone();
        Ca { params, key, der }
    }

    pub(crate) fn ca(td: &str) -> Ca {
        ca_with(td, -1, 30)
    }

    /// A leaf profile that obeys every rule; tests break one at a time.
    pub(crate) fn good_leaf(id: &str) -> CertificateParams {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.subject_alt_names
            .push(SanType::URI(id.try_into().unwrap()));
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.not_before = days_from_now(-1);
        p.not_after = days_from_now(1);
        p
    }

    pub(crate) fn sign(params: &CertificateParams, ca: &Ca) -> (CertificateDer<'static>, KeyPair) {
        let key = KeyPair::generate().unwrap();
        let issuer = Issuer::from_params(&ca.params, &ca.key);
        (params.signed_by(&key, &issuer).unwrap().der().clone(), key)
    }

    fn set(bundles: &[&Ca], td: &str) -> BundleSet {
        let td = TrustDomain::new(td).unwrap();
        let x509 =
            X509Bundle::from_ders(td.clone(), bundles.iter().map(|c| c.der.clone()).collect())
                .unwrap();
        [Bundle {
            x509,
            ..Bundle::empty(td)
        }]
        .into_iter()
        .collect()
    }

    fn verify(chain: &[CertificateDer<'_>], set: &BundleSet) -> Result<SpiffeId, X509SvidError> {
        verify_x509_svid(chain, set, SystemTime::now(), &AnyId).map(|v| v.id)
    }

    /// Conformance table for the X509-SVID leaf rules: one good case, then
    /// one hostile variation per rule.
    #[test]
    fn leaf_rules() {
        let ca = ca("example.org");
        let bundles = set(&[&ca], "example.org");
        let id = "spiffe://example.org/workload";
        type Edit = fn(&mut CertificateParams);
        let cases: Vec<(&str, Edit, Result<(), X509SvidError>)> = vec![
            ("good", |_| {}, Ok(())),
            (
                "good without EKU",
                |p| p.extended_key_usages.clear(),
                Ok(()),
            ),
            (
                "no URI SAN",
                |p| p.subject_alt_names.clear(),
                Err(X509SvidError::NoUriSan),
            ),
            (
                "two URI SANs",
                |p| {
                    p.subject_alt_names.push(SanType::URI(
                        "spiffe://example.org/other".try_into().unwrap(),
                    ))
                },
                Err(X509SvidError::MultipleUriSans),
            ),
            (
                "non-spiffe URI",
                |p| {
                    p.subject_alt_names =
                        vec![SanType::URI("https://example.org/x".try_into().unwrap())]
                },
                Err(X509SvidError::BadSpiffeId(crate::IdError::WrongScheme)),
            ),
            (
                "root path",
                |p| {
                    p.subject_alt_names =
                        vec![SanType::URI("spiffe://example.org".try_into().unwrap())]
                },
                Err(X509SvidError::RootPathLeaf),
            ),
            (
                "leaf CA=true",
                |p| p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained),
                Err(X509SvidError::LeafIsCa),
            ),
            (
                "no key usage",
                |p| p.key_usages.clear(),
                Err(X509SvidError::MissingKeyUsage),
            ),
            (
                "key usage not critical",
                |p| {
                    p.key_usages.clear();
                    // keyUsage (2.5.29.15) BIT STRING with digitalSignature only.
                    let mut ext = CustomExtension::from_oid_content(
                        &[2, 5, 29, 15],
                        vec![0x03, 0x02, 0x07, 0x80],
                    );
                    ext.set_criticality(false);
                    p.custom_extensions.push(ext);
                },
                Err(X509SvidError::KeyUsageNotCritical),
            ),
            (
                "no digitalSignature",
                |p| p.key_usages = vec![KeyUsagePurpose::KeyEncipherment],
                Err(X509SvidError::MissingDigitalSignature),
            ),
            (
                "keyCertSign on leaf",
                |p| p.key_usages.push(KeyUsagePurpose::KeyCertSign),
                Err(X509SvidError::LeafHasKeyCertSign),
            ),
            (
                "cRLSign on leaf",
                |p| p.key_usages.push(KeyUsagePurpose::CrlSign),
                Err(X509SvidError::LeafHasCrlSign),
            ),
            (
                "EKU without clientAuth",
                |p| p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth],
                Err(X509SvidError::EkuLacksServerOrClientAuth),
            ),
            (
                "EKU without serverAuth",
                |p| p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth],
                Err(X509SvidError::EkuLacksServerOrClientAuth),
            ),
        ];
        for (name, edit, want) in cases {
            let mut p = good_leaf(id);
            edit(&mut p);
            let (der, _) = sign(&p, &ca);
            let got = verify(&[der], &bundles).map(|_| ());
            assert_eq!(got, want, "case {name}");
        }
    }

    #[test]
    fn chain_and_trust_rules() {
        let ca_a = ca("example.org");
        let bundles = set(&[&ca_a], "example.org");
        let id = "spiffe://example.org/w";

        // Good, and the verified ID is the leaf's.
        let (leaf, _) = sign(&good_leaf(id), &ca_a);
        assert_eq!(
            verify(std::slice::from_ref(&leaf), &bundles)
                .unwrap()
                .as_str(),
            id
        );

        // Wrong trust domain: the leaf names other.org, signed by example.org's
        // CA; there is no bundle for other.org, and example.org's is never tried.
        let (leaf, _) = sign(&good_leaf("spiffe://other.org/w"), &ca_a);
        assert_eq!(
            verify(&[leaf], &bundles),
            Err(X509SvidError::NoBundleForTrustDomain("other.org".into()))
        );

        // A bundle for other.org exists but the leaf was signed by example.org's
        // CA: untrusted.
        let ca_b = ca("other.org");
        let mut two = bundles.clone();
        two.insert(set(&[&ca_b], "other.org").iter().next().unwrap().clone());
        let (leaf, _) = sign(&good_leaf("spiffe://other.org/w"), &ca_a);
        assert!(matches!(
            verify(&[leaf], &two),
            Err(X509SvidError::Untrusted(_))
        ));

        // Signed by an unknown CA.
        let rogue = ca("example.org");
        let (leaf, _) = sign(&good_leaf(id), &rogue);
        assert!(matches!(
            verify(&[leaf], &bundles),
            Err(X509SvidError::Untrusted(_))
        ));

        // Expired leaf.
        let mut p = good_leaf(id);
        p.not_before = days_from_now(-3);
        p.not_after = days_from_now(-2);
        let (leaf, _) = sign(&p, &ca_a);
        assert!(matches!(
            verify(&[leaf], &bundles),
            Err(X509SvidError::Untrusted(_))
        ));

        // Expired root in the bundle: never used as an anchor, even if the
        // bundle was loaded while it was still valid (from_ders at load time
        // would have dropped it; insert it directly to model the passage of
        // time).
        let old = ca_with("example.org", -10, -5);
        let td = TrustDomain::new("example.org").unwrap();
        let mut x509 = X509Bundle::empty(td.clone());
        x509.add_authority(old.der.clone());
        let stale: BundleSet = [Bundle {
            x509,
            ..Bundle::empty(td.clone())
        }]
        .into_iter()
        .collect();
        let mut p = good_leaf(id);
        p.not_before = days_from_now(-7);
        let (leaf, _) = sign(&p, &old);
        assert!(matches!(
            verify(&[leaf], &stale),
            Err(X509SvidError::Untrusted(_))
        ));
        // ...and loading drops it.
        assert!(
            X509Bundle::from_ders(td, vec![old.der.clone()])
                .unwrap()
                .authorities()
                .is_empty()
        );
    }

    #[test]
    fn intermediates() {
        let root = ca("example.org");
        // A good intermediate.
        let mut ip = CertificateParams::new(Vec::<String>::new()).unwrap();
        ip.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ip.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        ip.not_before = days_from_now(-1);
        ip.not_after = days_from_now(10);
        let (ider, ikey) = sign(&ip, &root);
        let inter = Ca {
            params: ip.clone(),
            key: ikey,
            der: ider.clone(),
        };
        let (leaf, _) = sign(&good_leaf("spiffe://example.org/w"), &inter);
        let bundles = set(&[&root], "example.org");
        assert!(verify(&[leaf.clone(), ider], &bundles).is_ok());

        // An "intermediate" that is not a CA.
        let mut bad = ip.clone();
        bad.is_ca = IsCa::ExplicitNoCa;
        let (bder, _) = sign(&bad, &root);
        assert_eq!(
            verify(&[leaf.clone(), bder], &bundles),
            Err(X509SvidError::SigningCertNotCa(1))
        );

        // An intermediate without keyCertSign.
        let mut bad = ip.clone();
        bad.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let (bder, _) = sign(&bad, &root);
        assert_eq!(
            verify(&[leaf.clone(), bder], &bundles),
            Err(X509SvidError::SigningCertLacksKeyCertSign(1))
        );

        // An intermediate naming another trust domain.
        let mut bad = ip;
        bad.subject_alt_names = vec![SanType::URI("spiffe://other.org".try_into().unwrap())];
        let (bder, _) = sign(&bad, &root);
        assert_eq!(
            verify(&[leaf, bder], &bundles),
            Err(X509SvidError::SigningCertWrongTrustDomain(1))
        );
    }

    #[test]
    fn authorizers() {
        let ca_a = ca("example.org");
        let bundles = set(&[&ca_a], "example.org");
        let (leaf, _) = sign(&good_leaf("spiffe://example.org/w"), &ca_a);
        let chain = [leaf];
        let now = SystemTime::now();
        let id = SpiffeId::parse("spiffe://example.org/w").unwrap();
        let other = SpiffeId::parse("spiffe://example.org/x").unwrap();
        assert!(verify_x509_svid(&chain, &bundles, now, &ExactId(id)).is_ok());
        assert_eq!(
            verify_x509_svid(&chain, &bundles, now, &ExactId(other)),
            Err(X509SvidError::NotAuthorized(
                "spiffe://example.org/w".into()
            ))
        );
        let td = TrustDomain::new("example.org").unwrap();
        assert!(verify_x509_svid(&chain, &bundles, now, &MemberOf(td)).is_ok());
        let td = TrustDomain::new("other.org").unwrap();
        assert!(verify_x509_svid(&chain, &bundles, now, &MemberOf(td)).is_err());
        let closure = |id: &SpiffeId| id.path().starts_with("/w");
        assert!(verify_x509_svid(&chain, &bundles, now, &closure).is_ok());
    }

    #[test]
    fn svid_with_key() {
        let ca_a = ca("example.org");
        let (leaf, key) = sign(&good_leaf("spiffe://example.org/w"), &ca_a);
        let pk = PrivateKey::from_pkcs8_der(key.serialize_der());
        let svid = X509Svid::new(vec![leaf.clone()], pk).unwrap();
        assert_eq!(svid.spiffe_id().as_str(), "spiffe://example.org/w");
        let again =
            X509Svid::from_der(&svid.chain_der(), svid.private_key().secret_pkcs8_der()).unwrap();
        assert_eq!(again.spiffe_id(), svid.spiffe_id());
        assert!(!format!("{svid:?}").contains("BEGIN"));
        // Mismatched key.
        let other = PrivateKey::generate_p256().unwrap();
        assert_eq!(
            X509Svid::new(vec![leaf], other).unwrap_err(),
            X509SvidError::KeyMismatch
        );
        assert_eq!(
            X509Svid::new(vec![], PrivateKey::generate_p256().unwrap()).unwrap_err(),
            X509SvidError::EmptyChain
        );
    }

    #[test]
    fn svid_with_external_key() {
        let ca_a = ca("example.org");
        let (leaf, key) = sign(&good_leaf("spiffe://example.org/w"), &ca_a);
        let (id, not_after) =
            X509Svid::check_external_key(std::slice::from_ref(&leaf), key.public_key_raw())
                .unwrap();
        assert_eq!(id.as_str(), "spiffe://example.org/w");
        assert!(not_after > 0);
        // Another key, no chain, or a chain that breaks the SPIFFE rules.
        let other = PrivateKey::generate_p256().unwrap();
        assert_eq!(
            X509Svid::check_external_key(
                std::slice::from_ref(&leaf),
                &other.public_key_sec1().unwrap()
            )
            .unwrap_err(),
            X509SvidError::KeyMismatch
        );
        assert_eq!(
            X509Svid::check_external_key(&[], key.public_key_raw()).unwrap_err(),
            X509SvidError::EmptyChain
        );
        let mut no_uri = good_leaf("spiffe://example.org/w");
        no_uri.subject_alt_names.clear();
        let (bad, key) = sign(&no_uri, &ca_a);
        assert!(X509Svid::check_external_key(&[bad], key.public_key_raw()).is_err());
    }
}
