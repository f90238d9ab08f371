//! X.509-SVIDs and the SPIFFE X509-SVID certificate rules.
//!
//! Guarantees: an [`X509Svid`] always holds a chain whose leaf obeys the leaf
//! rules and whose other certificates obey the signing-certificate rules, and
//! a private key whose public half is the leaf's. It is *not* verified
//! against any bundle: for that, see [`crate::validate::x509`].
//!
//! Leaf rules (X509-SVID spec §4–5): exactly one URI SAN, a SPIFFE ID with a
//! non-root path; basicConstraints CA=false (or absent); a critical keyUsage
//! with digitalSignature and without keyCertSign or cRLSign; an
//! extendedKeyUsage, if present, with both serverAuth and clientAuth; a key
//! of P-256, P-384 or RSA ≥ 2048 bits.
//!
//! Signing-certificate rules: basicConstraints CA=true; keyUsage with
//! keyCertSign; a URI SAN, if present, is a SPIFFE ID of the leaf's trust
//! domain.

use crate::id::{IdError, SpiffeId};
use crate::key::PrivateKey;
use rustls_pki_types::CertificateDer;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::oid_registry;

/// Why a certificate or chain is not a valid X.509-SVID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum X509SvidError {
    /// No certificate in the chain.
    #[error("certificate chain is empty")]
    EmptyChain,
    /// A certificate does not parse (or has duplicate extensions).
    #[error("certificate #{0} in the chain does not parse")]
    Unparseable(usize),
    /// The leaf has no URI SAN.
    #[error("leaf certificate has no URI SAN")]
    NoUriSan,
    /// The leaf has more than one URI SAN.
    #[error("leaf certificate has more than one URI SAN")]
    MultipleUriSans,
    /// The URI SAN is not a valid SPIFFE ID.
    #[error("leaf URI SAN is not a valid SPIFFE ID: {0}")]
    BadSpiffeId(IdError),
    /// The leaf's SPIFFE ID is the trust domain itself.
    #[error("leaf SPIFFE ID has a root path")]
    RootPathLeaf,
    /// basicConstraints CA=true on the leaf.
    #[error("leaf certificate is a CA")]
    LeafIsCa,
    /// No keyUsage extension on the leaf.
    #[error("leaf certificate has no key usage extension")]
    MissingKeyUsage,
    /// keyUsage not marked critical.
    #[error("leaf key usage extension is not critical")]
    KeyUsageNotCritical,
    /// keyUsage without digitalSignature.
    #[error("leaf key usage lacks digitalSignature")]
    MissingDigitalSignature,
    /// keyUsage with keyCertSign.
    #[error("leaf key usage has keyCertSign")]
    LeafHasKeyCertSign,
    /// keyUsage with cRLSign.
    #[error("leaf key usage has cRLSign")]
    LeafHasCrlSign,
    /// extendedKeyUsage without serverAuth and clientAuth.
    #[error("leaf extended key usage lacks serverAuth or clientAuth")]
    EkuLacksServerOrClientAuth,
    /// A key type or size below Sigil's floor.
    #[error("leaf public key is not P-256, P-384 or RSA of at least 2048 bits")]
    WeakOrUnsupportedKey,
    /// An intermediate is not a CA.
    #[error("signing certificate #{0} is not a CA")]
    SigningCertNotCa(usize),
    /// An intermediate lacks keyCertSign.
    #[error("signing certificate #{0} lacks keyCertSign")]
    SigningCertLacksKeyCertSign(usize),
    /// An intermediate names another trust domain or an invalid ID.
    #[error("signing certificate #{0} has a URI SAN outside the leaf's trust domain")]
    SigningCertWrongTrustDomain(usize),
    /// The private key is not usable or does not match the leaf.
    #[error("private key does not match the leaf certificate")]
    KeyMismatch,
    /// No bundle for the leaf's trust domain.
    #[error("no bundle for trust domain {0:?}")]
    NoBundleForTrustDomain(String),
    /// Chain verification against the bundle failed.
    #[error("certificate chain does not verify against the trust domain's bundle: {0}")]
    Untrusted(String),
    /// The authorizer refused the verified ID.
    #[error("SPIFFE ID {0} is not authorized")]
    NotAuthorized(String),
}

/// Facts read from a leaf that satisfied the leaf rules.
#[derive(Debug, Clone)]
pub(crate) struct LeafFacts {
    pub id: SpiffeId,
    pub not_after: i64,
    pub public_key: Vec<u8>,
}

/// Checks the leaf rules and returns the SPIFFE ID and expiry.
pub(crate) fn check_leaf(der: &[u8]) -> Result<LeafFacts, X509SvidError> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|_| X509SvidError::Unparseable(0))?;
    let id = single_spiffe_uri(&cert)?;
    if id.path().is_empty() {
        return Err(X509SvidError::RootPathLeaf);
    }
    let bc = cert
        .basic_constraints()
        .map_err(|_| X509SvidError::Unparseable(0))?;
    if bc.is_some_and(|b| b.value.ca) {
        return Err(X509SvidError::LeafIsCa);
    }
    let ku = cert
        .key_usage()
        .map_err(|_| X509SvidError::Unparseable(0))?
        .ok_or(X509SvidError::MissingKeyUsage)?;
    if !ku.critical {
        return Err(X509SvidError::KeyUsageNotCritical);
    }
    if !ku.value.digital_signature() {
        return Err(X509SvidError::MissingDigitalSignature);
    }
    if ku.value.key_cert_sign() {
        return Err(X509SvidError::LeafHasKeyCertSign);
    }
    if ku.value.crl_sign() {
        return Err(X509SvidError::LeafHasCrlSign);
    }
    if let Some(eku) = cert
        .extended_key_usage()
        .map_err(|_| X509SvidError::Unparseable(0))?
        && !(eku.value.server_auth && eku.value.client_auth)
    {
        return Err(X509SvidError::EkuLacksServerOrClientAuth);
    }
    check_key_strength(&cert)?;
    Ok(LeafFacts {
        id,
        not_after: cert.validity().not_after.timestamp(),
        public_key: cert.public_key().subject_public_key.data.to_vec(),
    })
}

fn check_key_strength(cert: &X509Certificate<'_>) -> Result<(), X509SvidError> {
    use x509_parser::public_key::PublicKey;
    let spki = cert.public_key();
    match spki.parsed() {
        Ok(PublicKey::EC(point)) => {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok());
            let ok = curve.is_some_and(|c| {
                c == oid_registry::OID_EC_P256 || c == oid_registry::OID_NIST_EC_P384
            });
            if ok && !point.data().is_empty() {
                Ok(())
            } else {
                Err(X509SvidError::WeakOrUnsupportedKey)
            }
        }
        Ok(PublicKey::RSA(rsa)) if rsa.key_size() >= 2048 => Ok(()),
        _ => Err(X509SvidError::WeakOrUnsupportedKey),
    }
}

fn uri_sans<'a>(cert: &'a X509Certificate<'a>) -> Result<Vec<&'a str>, X509SvidError> {
    let san = cert
        .subject_alternative_name()
        .map_err(|_| X509SvidError::Unparseable(0))?;
    Ok(san
        .map(|s| {
            s.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) => Some(*u),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default())
}

fn single_spiffe_uri(cert: &X509Certificate<'_>) -> Result<SpiffeId, X509SvidError> {
    match uri_sans(cert)?.as_slice() {
        [] => Err(X509SvidError::NoUriSan),
        [one] => SpiffeId::parse(one).map_err(X509SvidError::BadSpiffeId),
        _ => Err(X509SvidError::MultipleUriSans),
    }
}

/// Checks the signing-certificate rules for `chain[index]`.
pub(crate) fn check_signing_cert(
    der: &[u8],
    index: usize,
    leaf: &SpiffeId,
) -> Result<(), X509SvidError> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|_| X509SvidError::Unparseable(index))?;
    let bc = cert
        .basic_constraints()
        .map_err(|_| X509SvidError::Unparseable(index))?;
    if !bc.is_some_and(|b| b.value.ca) {
        return Err(X509SvidError::SigningCertNotCa(index));
    }
    let ku = cert
        .key_usage()
        .map_err(|_| X509SvidError::Unparseable(index))?;
    if !ku.is_some_and(|k| k.value.key_cert_sign()) {
        return Err(X509SvidError::SigningCertLacksKeyCertSign(index));
    }
    for uri in uri_sans(&cert).map_err(|_| X509SvidError::Unparseable(index))? {
        match SpiffeId::parse(uri) {
            Ok(id) if id.trust_domain_name() == leaf.trust_domain_name() => {}
            _ => return Err(X509SvidError::SigningCertWrongTrustDomain(index)),
        }
    }
    Ok(())
}

/// An X.509-SVID with its private key: a chain (leaf first) that obeys the
/// SPIFFE certificate rules and a key that matches the leaf.
#[derive(Debug, Clone)]
pub struct X509Svid {
    id: SpiffeId,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKey,
    not_after: i64,
}

impl X509Svid {
    /// Checks the chain against the SPIFFE rules and the key against the leaf.
    pub fn new(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKey,
    ) -> Result<Self, X509SvidError> {
        let leaf = check_chain(&chain)?;
        match key.public_key_sec1() {
            Ok(pk) if pk == leaf.public_key => {}
            _ => return Err(X509SvidError::KeyMismatch),
        }
        Ok(Self {
            id: leaf.id,
            chain,
            key,
            not_after: leaf.not_after,
        })
    }

    /// Checks a chain whose private key is held elsewhere (a TPM): the
    /// SPIFFE certificate rules, and that the leaf certifies
    /// `public_key_sec1` (uncompressed point). Returns the SPIFFE ID and
    /// notAfter (Unix seconds). Like [`Self::new`], it does not check the
    /// chain against a bundle.
    pub fn check_external_key(
        chain: &[CertificateDer<'_>],
        public_key_sec1: &[u8],
    ) -> Result<(SpiffeId, i64), X509SvidError> {
        let leaf = check_chain(chain)?;
        if leaf.public_key != public_key_sec1 {
            return Err(X509SvidError::KeyMismatch);
        }
        Ok((leaf.id, leaf.not_after))
    }

    /// From the Workload API's encoding: concatenated DER chain + PKCS#8 DER.
    pub fn from_der(chain: &[u8], key_pkcs8: &[u8]) -> Result<Self, X509SvidError> {
        let certs =
            crate::bundle::split_der_certs(chain).map_err(|_| X509SvidError::Unparseable(0))?;
        Self::new(certs, PrivateKey::from_pkcs8_der(key_pkcs8.to_vec()))
    }

    /// The SPIFFE ID.
    pub fn spiffe_id(&self) -> &SpiffeId {
        &self.id
    }

    /// The chain, leaf first.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// The leaf certificate.
    pub fn leaf(&self) -> &CertificateDer<'static> {
        // `new` refuses an empty chain.
        &self.chain[0]
    }

    /// The private key.
    pub fn private_key(&self) -> &PrivateKey {
        &self.key
    }

    /// The leaf's notAfter, Unix seconds.
    pub fn not_after(&self) -> i64 {
        self.not_after
    }

    /// The chain as concatenated DER.
    pub fn chain_der(&self) -> Vec<u8> {
        self.chain.iter().flat_map(|c| c.iter().copied()).collect()
    }

    /// The chain as PEM.
    pub fn chain_pem(&self) -> String {
        self.chain
            .iter()
            .map(|c| crate::bundle::pem_encode("CERTIFICATE", c))
            .collect()
    }

    /// The key as PKCS#8 PEM. Handle with care.
    pub fn key_pem(&self) -> zeroize::Zeroizing<String> {
        zeroize::Zeroizing::new(crate::bundle::pem_encode(
            "PRIVATE KEY",
            self.key.secret_pkcs8_der(),
        ))
    }
}

/// Checks leaf and signing-certificate rules on a whole chain.
pub(crate) fn check_chain(chain: &[CertificateDer<'_>]) -> Result<LeafFacts, X509SvidError> {
    let leaf = chain.first().ok_or(X509SvidError::EmptyChain)?;
    let facts = check_leaf(leaf)?;
    for (i, c) in chain.iter().enumerate().skip(1) {
        check_signing_cert(c, i, &facts.id)?;
    }
    Ok(facts)
}
