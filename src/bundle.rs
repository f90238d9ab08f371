//! Trust bundles: the X.509 authorities and JWT signing keys of one trust
//! domain, and a [`BundleSet`] keyed by trust domain.
//!
//! Formats read and written: the SPIFFE bundle format (a JWKS whose keys carry
//! `use` = `x509-svid` or `jwt-svid`, plus `spiffe_sequence` and
//! `spiffe_refresh_hint`), a plain JWKS (every key is a JWT key), PEM
//! certificates (X.509 authorities only) and concatenated DER (the Workload
//! API's form).
//!
//! Checked when a bundle is loaded: every JWT key is an EC P-256 point on the
//! curve with 32-byte coordinates and a non-empty `kid`; a duplicate `kid`
//! rejects the whole bundle; duplicate JSON members reject the document; every
//! `x509-svid` entry holds exactly one parseable certificate; authorities that
//! have expired at load time are dropped. Keys with an unknown `use` are
//! ignored, as the SPIFFE bundle spec asks.
//!
//! Not checked here: whether an authority is a CA certificate suitable for
//! path building (the X.509 validator does that), revocation.

use crate::TrustDomain;
use crate::json::parse_strict;
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use serde_json::{Map, Value, json};
use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

/// A bundle document larger than this is refused before parsing.
pub const MAX_BUNDLE_BYTES: usize = 1 << 20;

/// Why a bundle could not be loaded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BundleError {
    /// Over [`MAX_BUNDLE_BYTES`].
    #[error("bundle is larger than {MAX_BUNDLE_BYTES} bytes")]
    TooLarge,
    /// Not JSON, or duplicate JSON members, or not an object with `keys`.
    #[error("bundle is not a valid JWKS document: {0}")]
    Json(String),
    /// A key entry is malformed (named by index and reason).
    #[error("bundle key #{index} is invalid: {reason}")]
    BadKey {
        /// Position in `keys`.
        index: usize,
        /// What is wrong.
        reason: &'static str,
    },
    /// Two JWT keys share a `kid`.
    #[error("bundle has duplicate kid {0:?}")]
    DuplicateKid(String),
    /// A certificate does not parse.
    #[error("bundle certificate #{0} does not parse")]
    BadCertificate(usize),
    /// PEM without certificates, or broken PEM.
    #[error("bundle PEM is invalid or holds no certificate")]
    Pem,
    /// Neither JSON nor PEM.
    #[error("bundle format not recognised (expected SPIFFE bundle JSON, JWKS or PEM)")]
    UnknownFormat,
}

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// An ES256 public key of a JWT bundle.
#[derive(Clone)]
pub struct JwtKey {
    kid: String,
    /// Uncompressed SEC1 point, 65 bytes, checked to be on P-256.
    sec1: Vec<u8>,
    /// Parsed once at load, so verification does not re-parse the point.
    parsed: aws_lc_rs::signature::ParsedPublicKey,
}

impl PartialEq for JwtKey {
    fn eq(&self, other: &Self) -> bool {
        self.kid == other.kid && self.sec1 == other.sec1
    }
}

impl Eq for JwtKey {}

impl std::fmt::Debug for JwtKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "JwtKey(kid={})", self.kid)
    }
}

impl JwtKey {
    /// Builds a key from an uncompressed SEC1 P-256 point, checking that it
    /// is on the curve.
    pub fn from_sec1(kid: &str, sec1: &[u8]) -> Result<Self, &'static str> {
        if kid.is_empty() {
            return Err("empty kid");
        }
        if sec1.len() != 65 || sec1[0] != 4 {
            return Err("not an uncompressed P-256 point");
        }
        // Two independent checks that the point is on the curve: p256 here,
        // and aws-lc when it parses the key for verification.
        p256::PublicKey::from_sec1_bytes(sec1).map_err(|_| "point is not on P-256")?;
        let parsed = aws_lc_rs::signature::ParsedPublicKey::new(
            &aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED,
            sec1,
        )
        .map_err(|_| "point is not on P-256")?;
        Ok(Self {
            kid: kid.to_owned(),
            sec1: sec1.to_vec(),
            parsed,
        })
    }

    /// Verifies an ES256 signature in raw `r || s` form. The caller has
    /// already checked that `r` and `s` are in range.
    pub(crate) fn verify_es256(&self, msg: &[u8], sig: &[u8]) -> bool {
        self.parsed.verify_sig(msg, sig).is_ok()
    }

    /// The key ID.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The uncompressed SEC1 point.
    pub fn sec1(&self) -> &[u8] {
        &self.sec1
    }

    /// The JWK form (without `use`).
    pub fn to_jwk(&self) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("kty".into(), "EC".into());
        m.insert("crv".into(), "P-256".into());
        m.insert("x".into(), URL_SAFE_NO_PAD.encode(&self.sec1[1..33]).into());
        m.insert(
            "y".into(),
            URL_SAFE_NO_PAD.encode(&self.sec1[33..65]).into(),
        );
        m.insert("kid".into(), self.kid.clone().into());
        m
    }

    /// RFC 7638 JWK thumbprint (SHA-256, base64url), as used in `cnf.jkt`.
    pub fn thumbprint(&self) -> String {
        jwk_thumbprint_p256(&self.sec1)
    }
}

/// RFC 7638 thumbprint of a P-256 public key given as an uncompressed point.
pub fn jwk_thumbprint_p256(sec1: &[u8]) -> String {
    let (x, y) = if sec1.len() == 65 {
        (&sec1[1..33], &sec1[33..65])
    } else {
        (&[][..], &[][..])
    };
    // Members in lexicographic order, no whitespace (RFC 7638 §3).
    let canonical = format!(
        r#"{{"crv":"P-256","kty":"EC","x":"{}","y":"{}"}}"#,
        URL_SAFE_NO_PAD.encode(x),
        URL_SAFE_NO_PAD.encode(y)
    );
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, canonical.as_bytes());
    URL_SAFE_NO_PAD.encode(digest.as_ref())
}

/// The X.509 authorities of one trust domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct X509Bundle {
    trust_domain: TrustDomain,
    authorities: Vec<CertificateDer<'static>>,
}

impl X509Bundle {
    /// A bundle with no authorities.
    pub fn empty(trust_domain: TrustDomain) -> Self {
        Self {
            trust_domain,
            authorities: Vec::new(),
        }
    }

    /// From DER certificates; unparseable ones are an error, expired ones
    /// are dropped.
    pub fn from_ders(
        trust_domain: TrustDomain,
        ders: Vec<CertificateDer<'static>>,
    ) -> Result<Self, BundleError> {
        let now = now_unix();
        let mut authorities = Vec::with_capacity(ders.len());
        for (i, der) in ders.into_iter().enumerate() {
            if !cert_is_current(&der, now).map_err(|_| BundleError::BadCertificate(i))? {
                continue;
            }
            if authority_jwk(&der).is_none() {
                return Err(BundleError::BadCertificate(i));
            }
            authorities.push(der);
        }
        let x509 = Self {
            trust_domain,
            authorities,
        };
        check_output_size(&Bundle {
            x509: x509.clone(),
            ..Bundle::empty(x509.trust_domain.clone())
        })?;
        Ok(x509)
    }

    /// From PEM `CERTIFICATE` blocks.
    pub fn from_pem(trust_domain: TrustDomain, pem: &[u8]) -> Result<Self, BundleError> {
        if pem.len() > MAX_BUNDLE_BYTES {
            return Err(BundleError::TooLarge);
        }
        let ders: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<_, _>>()
            .map_err(|_| BundleError::Pem)?;
        if ders.is_empty() {
            return Err(BundleError::Pem);
        }
        Self::from_ders(trust_domain, ders)
    }

    /// From concatenated DER certificates (the Workload API's encoding).
    pub fn from_concatenated_der(
        trust_domain: TrustDomain,
        der: &[u8],
    ) -> Result<Self, BundleError> {
        Self::from_ders(trust_domain, split_der_certs(der)?)
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The authorities, in load order.
    pub fn authorities(&self) -> &[CertificateDer<'static>] {
        &self.authorities
    }

    /// Adds an authority (no expiry check: the caller minted it).
    pub fn add_authority(&mut self, der: CertificateDer<'static>) {
        if !self.authorities.contains(&der) {
            self.authorities.push(der);
        }
    }

    /// Concatenated DER, as the Workload API sends bundles.
    pub fn to_concatenated_der(&self) -> Vec<u8> {
        self.authorities
            .iter()
            .flat_map(|c| c.iter().copied())
            .collect()
    }

    /// PEM `CERTIFICATE` blocks.
    pub fn to_pem(&self) -> String {
        let mut out = String::new();
        for c in &self.authorities {
            out.push_str(&pem_encode("CERTIFICATE", c));
        }
        out
    }
}

/// Splits concatenated DER certificates.
pub fn split_der_certs(mut der: &[u8]) -> Result<Vec<CertificateDer<'static>>, BundleError> {
    let mut out = Vec::new();
    while !der.is_empty() {
        let len = der_sequence_len(der).ok_or(BundleError::BadCertificate(out.len()))?;
        out.push(CertificateDer::from(der[..len].to_vec()));
        der = &der[len..];
    }
    Ok(out)
}

/// Length of the DER SEQUENCE at the start of `der`, header included.
fn der_sequence_len(der: &[u8]) -> Option<usize> {
    if der.len() < 2 || der[0] != 0x30 {
        return None;
    }
    let first = der[1] as usize;
    let (len, header) = if first < 0x80 {
        (first, 2)
    } else {
        let n = first & 0x7f;
        if n == 0 || n > 4 || der.len() < 2 + n {
            return None;
        }
        let mut len = 0usize;
        for b in &der[2..2 + n] {
            len = (len << 8) | *b as usize;
        }
        (len, 2 + n)
    };
    let total = header.checked_add(len)?;
    (total <= der.len()).then_some(total)
}

/// True when the certificate's validity includes `now`; Err when it does not
/// parse.
fn cert_is_current(der: &[u8], now: i64) -> Result<bool, ()> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|_| ())?;
    Ok(cert.validity().not_after.timestamp() >= now)
}

pub(crate) fn pem_encode(label: &str, der: &[u8]) -> String {
    let b64 = STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// The JWT signing keys of one trust domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtBundle {
    trust_domain: TrustDomain,
    keys: BTreeMap<String, JwtKey>,
}

impl JwtBundle {
    /// A bundle with no keys.
    pub fn empty(trust_domain: TrustDomain) -> Self {
        Self {
            trust_domain,
            keys: BTreeMap::new(),
        }
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The key with this `kid`.
    pub fn key(&self, kid: &str) -> Option<&JwtKey> {
        self.keys.get(kid)
    }

    /// All keys, by `kid`.
    pub fn keys(&self) -> impl Iterator<Item = &JwtKey> {
        self.keys.values()
    }

    /// Adds a key; a duplicate `kid` is an error.
    pub fn add_key(&mut self, key: JwtKey) -> Result<(), BundleError> {
        if self.keys.contains_key(&key.kid) {
            return Err(BundleError::DuplicateKid(key.kid));
        }
        self.keys.insert(key.kid.clone(), key);
        Ok(())
    }

    /// Plain JWKS JSON (the Workload API's `FetchJWTBundles` form and an OIDC
    /// `jwks_uri` document).
    pub fn to_jwks_json(&self) -> String {
        let keys: Vec<Value> = self
            .keys
            .values()
            .map(|k| {
                let mut m = k.to_jwk();
                m.insert("use".into(), "jwt-svid".into());
                Value::Object(m)
            })
            .collect();
        json!({ "keys": keys }).to_string()
    }

    /// Parses a JWKS; keys without `use` count as JWT keys.
    pub fn from_jwks(trust_domain: TrustDomain, bytes: &[u8]) -> Result<Self, BundleError> {
        Ok(Bundle::parse_jwks(trust_domain, bytes, Mode::PlainJwks)?.jwt)
    }
}

/// Both halves of a trust domain's bundle, as the SPIFFE bundle format holds
/// them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bundle {
    /// X.509 authorities.
    pub x509: X509Bundle,
    /// JWT keys.
    pub jwt: JwtBundle,
    /// `spiffe_sequence`.
    pub sequence: Option<u64>,
    /// `spiffe_refresh_hint`, seconds.
    pub refresh_hint: Option<u64>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Spiffe,
    PlainJwks,
}

impl Bundle {
    /// An empty bundle.
    pub fn empty(trust_domain: TrustDomain) -> Self {
        Self {
            x509: X509Bundle::empty(trust_domain.clone()),
            jwt: JwtBundle::empty(trust_domain),
            sequence: None,
            refresh_hint: None,
        }
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        self.x509.trust_domain()
    }

    /// Parses a SPIFFE bundle document.
    pub fn from_spiffe_json(trust_domain: TrustDomain, bytes: &[u8]) -> Result<Self, BundleError> {
        Self::parse_jwks(trust_domain, bytes, Mode::Spiffe)
    }

    /// Reads any supported format: SPIFFE bundle JSON, plain JWKS (JSON whose
    /// keys carry no `use`), or PEM certificates.
    pub fn parse_any(trust_domain: TrustDomain, bytes: &[u8]) -> Result<Self, BundleError> {
        if bytes.len() > MAX_BUNDLE_BYTES {
            return Err(BundleError::TooLarge);
        }
        let trimmed = bytes.trim_ascii_start();
        if trimmed.starts_with(b"{") {
            let doc = parse_strict(trimmed).map_err(|e| BundleError::Json(e.to_string()))?;
            let has_use = doc
                .get("keys")
                .and_then(Value::as_array)
                .is_some_and(|ks| ks.iter().any(|k| k.get("use").is_some()));
            let spiffe = has_use
                || doc.get("spiffe_sequence").is_some()
                || doc.get("spiffe_refresh_hint").is_some();
            let mode = if spiffe {
                Mode::Spiffe
            } else {
                Mode::PlainJwks
            };
            return Self::from_doc(trust_domain, &doc, mode);
        }
        if trimmed.starts_with(b"-----BEGIN") {
            let x509 = X509Bundle::from_pem(trust_domain.clone(), trimmed)?;
            return Ok(Self {
                x509,
                ..Self::empty(trust_domain)
            });
        }
        Err(BundleError::UnknownFormat)
    }

    fn parse_jwks(
        trust_domain: TrustDomain,
        bytes: &[u8],
        mode: Mode,
    ) -> Result<Self, BundleError> {
        if bytes.len() > MAX_BUNDLE_BYTES {
            return Err(BundleError::TooLarge);
        }
        let doc = parse_strict(bytes).map_err(|e| BundleError::Json(e.to_string()))?;
        Self::from_doc(trust_domain, &doc, mode)
    }

    fn from_doc(trust_domain: TrustDomain, doc: &Value, mode: Mode) -> Result<Self, BundleError> {
        let obj = doc
            .as_object()
            .ok_or_else(|| BundleError::Json("not an object".into()))?;
        let keys = obj
            .get("keys")
            .and_then(Value::as_array)
            .ok_or_else(|| BundleError::Json("missing `keys` array".into()))?;
        let opt_u64 = |name: &str| -> Result<Option<u64>, BundleError> {
            match obj.get(name) {
                None => Ok(None),
                Some(v) => v.as_u64().map(Some).ok_or_else(|| {
                    BundleError::Json(format!("`{name}` is not a non-negative integer"))
                }),
            }
        };
        let mut bundle = Self::empty(trust_domain.clone());
        bundle.sequence = opt_u64("spiffe_sequence")?;
        bundle.refresh_hint = opt_u64("spiffe_refresh_hint")?;
        let now = now_unix();
        for (index, key) in keys.iter().enumerate() {
            let bad = |reason| BundleError::BadKey { index, reason };
            let key = key.as_object().ok_or(bad("not an object"))?;
            let use_ = match key.get("use") {
                None if mode == Mode::PlainJwks => "jwt-svid",
                None => return Err(bad("missing `use`")),
                Some(Value::String(s)) => s.as_str(),
                Some(_) => return Err(bad("`use` is not a string")),
            };
            match use_ {
                "x509-svid" => {
                    let x5c = key
                        .get("x5c")
                        .and_then(Value::as_array)
                        .ok_or(bad("x509-svid key without `x5c`"))?;
                    let [cert] = x5c.as_slice() else {
                        return Err(bad("`x5c` must hold exactly one certificate"));
                    };
                    let der = cert
                        .as_str()
                        .and_then(|s| STANDARD.decode(s).ok())
                        .ok_or(bad("`x5c` entry is not base64"))?;
                    if authority_jwk(&der).is_none() {
                        return Err(bad("`x5c` certificate key is not EC P-256/P-384 or RSA"));
                    }
                    match cert_is_current(&der, now) {
                        Ok(true) => bundle.x509.authorities.push(CertificateDer::from(der)),
                        Ok(false) => {} // expired authority: dropped
                        Err(()) => return Err(bad("`x5c` certificate does not parse")),
                    }
                }
                "jwt-svid" => {
                    let key = parse_ec_jwk(key).map_err(bad)?;
                    bundle.jwt.add_key(key)?;
                }
                _ => {} // unknown use: ignored per the SPIFFE bundle spec
            }
        }
        check_output_size(&bundle)?;
        Ok(bundle)
    }

    /// The SPIFFE bundle document.
    pub fn to_spiffe_json(&self) -> String {
        let mut keys = Vec::new();
        for c in self.x509.authorities() {
            // Loading refuses authorities without a JWK form, so this is
            // only empty for authorities added directly by an issuer.
            let mut m = authority_jwk(c).unwrap_or_default();
            m.insert("use".into(), "x509-svid".into());
            m.insert("x5c".into(), json!([STANDARD.encode(c.as_ref())]));
            keys.push(Value::Object(m));
        }
        for k in self.jwt.keys() {
            let mut m = k.to_jwk();
            m.insert("use".into(), "jwt-svid".into());
            keys.push(Value::Object(m));
        }
        let mut doc = Map::new();
        doc.insert("keys".into(), Value::Array(keys));
        if let Some(s) = self.sequence {
            doc.insert("spiffe_sequence".into(), s.into());
        }
        if let Some(h) = self.refresh_hint {
            doc.insert("spiffe_refresh_hint".into(), h.into());
        }
        Value::Object(doc).to_string()
    }
}

/// The JWK members (`kty` and the public key) of an authority's key: EC
/// P-256/P-384 or RSA. `None` for key types a JWK here cannot express.
fn authority_jwk(der: &[u8]) -> Option<Map<String, Value>> {
    use x509_parser::public_key::PublicKey;
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let spki = cert.public_key();
    let mut m = Map::new();
    match spki.parsed().ok()? {
        PublicKey::EC(point) => {
            let curve = spki.algorithm.parameters.as_ref()?.as_oid().ok()?;
            let (crv, n) = if curve == x509_parser::oid_registry::OID_EC_P256 {
                ("P-256", 32)
            } else if curve == x509_parser::oid_registry::OID_NIST_EC_P384 {
                ("P-384", 48)
            } else {
                return None;
            };
            let p = point.data();
            if p.len() != 1 + 2 * n || p[0] != 4 {
                return None;
            }
            m.insert("kty".into(), "EC".into());
            m.insert("crv".into(), crv.into());
            m.insert("x".into(), URL_SAFE_NO_PAD.encode(&p[1..1 + n]).into());
            m.insert("y".into(), URL_SAFE_NO_PAD.encode(&p[1 + n..]).into());
        }
        PublicKey::RSA(rsa) => {
            let strip = |b: &[u8]| -> Vec<u8> {
                let i = b.iter().position(|x| *x != 0).unwrap_or(b.len());
                b[i..].to_vec()
            };
            m.insert("kty".into(), "RSA".into());
            m.insert(
                "n".into(),
                URL_SAFE_NO_PAD.encode(strip(rsa.modulus)).into(),
            );
            m.insert(
                "e".into(),
                URL_SAFE_NO_PAD.encode(strip(rsa.exponent)).into(),
            );
        }
        _ => return None,
    }
    Some(m)
}

/// What Sigil writes must be readable by Sigil: a bundle whose SPIFFE JSON
/// form would exceed [`MAX_BUNDLE_BYTES`] is refused at load time, even when
/// its input form (PEM, a sparser JSON) was smaller.
fn check_output_size(bundle: &Bundle) -> Result<(), BundleError> {
    if bundle.to_spiffe_json().len() > MAX_BUNDLE_BYTES {
        return Err(BundleError::TooLarge);
    }
    Ok(())
}

fn parse_ec_jwk(key: &Map<String, Value>) -> Result<JwtKey, &'static str> {
    let s = |name| key.get(name).and_then(Value::as_str);
    if s("kty") != Some("EC") {
        return Err("JWT key `kty` is not EC");
    }
    if s("crv") != Some("P-256") {
        return Err("JWT key `crv` is not P-256");
    }
    let kid = s("kid").ok_or("JWT key without `kid`")?;
    let coord = |name| -> Result<Vec<u8>, &'static str> {
        let v = s(name).ok_or("missing coordinate")?;
        let b = URL_SAFE_NO_PAD
            .decode(v)
            .map_err(|_| "coordinate is not base64url")?;
        if b.len() != 32 {
            return Err("coordinate is not 32 bytes");
        }
        Ok(b)
    };
    let mut sec1 = Vec::with_capacity(65);
    sec1.push(4);
    sec1.extend(coord("x")?);
    sec1.extend(coord("y")?);
    JwtKey::from_sec1(kid, &sec1)
}

/// Bundles keyed by trust domain. Each trust domain has exactly one bundle;
/// inserting replaces it, bundles are never merged, and a lookup for one trust
/// domain never falls back to another.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BundleSet {
    bundles: BTreeMap<TrustDomain, Bundle>,
}

impl BundleSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Inserts or replaces the bundle of `bundle.trust_domain()`.
    pub fn insert(&mut self, bundle: Bundle) {
        self.bundles.insert(bundle.trust_domain().clone(), bundle);
    }

    /// The bundle of exactly this trust domain.
    pub fn get(&self, td: &TrustDomain) -> Option<&Bundle> {
        self.bundles.get(td)
    }

    /// The bundle for a trust domain given by name, without allocating a
    /// [`TrustDomain`].
    pub fn get_by_name(&self, name: &str) -> Option<&Bundle> {
        self.bundles.get(name)
    }

    /// All bundles.
    pub fn iter(&self) -> impl Iterator<Item = &Bundle> {
        self.bundles.values()
    }

    /// True when there is no bundle.
    pub fn is_empty(&self) -> bool {
        self.bundles.is_empty()
    }
}

impl FromIterator<Bundle> for BundleSet {
    fn from_iter<I: IntoIterator<Item = Bundle>>(iter: I) -> Self {
        let mut s = Self::new();
        for b in iter {
            s.insert(b);
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn td() -> TrustDomain {
        TrustDomain::new("example.org").unwrap()
    }

    fn p256_point() -> Vec<u8> {
        crate::PrivateKey::generate_p256()
            .unwrap()
            .public_key_sec1()
            .unwrap()
    }

    fn jwk(kid: &str, sec1: &[u8]) -> Value {
        json!({
            "kty": "EC", "crv": "P-256", "use": "jwt-svid", "kid": kid,
            "x": URL_SAFE_NO_PAD.encode(&sec1[1..33]),
            "y": URL_SAFE_NO_PAD.encode(&sec1[33..65]),
        })
    }

    fn ca(not_after_year: i32) -> CertificateDer<'static> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.not_before = rcgen::date_time_ymd(2000, 1, 1);
        p.not_after = rcgen::date_time_ymd(not_after_year, 1, 1);
        p.self_signed(&key).unwrap().der().clone()
    }

    #[test]
    fn spiffe_round_trip() {
        let point = p256_point();
        let mut b = Bundle::empty(td());
        b.jwt
            .add_key(JwtKey::from_sec1("k1", &point).unwrap())
            .unwrap();
        b.x509.add_authority(ca(2099));
        b.sequence = Some(7);
        b.refresh_hint = Some(300);
        let json = b.to_spiffe_json();
        let back = Bundle::from_spiffe_json(td(), json.as_bytes()).unwrap();
        assert_eq!(back, b);
        let any = Bundle::parse_any(td(), json.as_bytes()).unwrap();
        assert_eq!(any, b);
        let pem = Bundle::parse_any(td(), b.x509.to_pem().as_bytes()).unwrap();
        assert_eq!(pem.x509, b.x509);
        let der = X509Bundle::from_concatenated_der(td(), &b.x509.to_concatenated_der()).unwrap();
        assert_eq!(der, b.x509);
        let jwks = JwtBundle::from_jwks(td(), b.jwt.to_jwks_json().as_bytes()).unwrap();
        assert_eq!(jwks, b.jwt);
    }

    #[test]
    fn plain_jwks_without_use() {
        let point = p256_point();
        let mut k = jwk("k", &point);
        k.as_object_mut().unwrap().remove("use");
        let doc = json!({ "keys": [k] }).to_string();
        let b = Bundle::parse_any(td(), doc.as_bytes()).unwrap();
        assert!(b.jwt.key("k").is_some());
        // The same document read as a SPIFFE bundle needs `use`.
        assert!(Bundle::from_spiffe_json(td(), doc.as_bytes()).is_err());
    }

    #[test]
    fn load_time_checks() {
        let point = p256_point();
        // Good.
        let good = json!({ "keys": [jwk("a", &point)] }).to_string();
        assert!(Bundle::from_spiffe_json(td(), good.as_bytes()).is_ok());
        // Duplicate kid rejects the bundle.
        let dup = json!({ "keys": [jwk("a", &point), jwk("a", &p256_point())] }).to_string();
        assert_eq!(
            Bundle::from_spiffe_json(td(), dup.as_bytes()),
            Err(BundleError::DuplicateKid("a".into()))
        );
        // Point off the curve.
        let mut off = point.clone();
        off[64] ^= 1;
        let bad = json!({ "keys": [jwk("a", &off)] }).to_string();
        assert!(matches!(
            Bundle::from_spiffe_json(td(), bad.as_bytes()),
            Err(BundleError::BadKey { .. })
        ));
        // Short coordinate.
        let mut short = jwk("a", &point);
        short["x"] = Value::String(URL_SAFE_NO_PAD.encode([1u8; 31]));
        let bad = json!({ "keys": [short] }).to_string();
        assert!(Bundle::from_spiffe_json(td(), bad.as_bytes()).is_err());
        // Wrong curve / key type.
        let mut p384 = jwk("a", &point);
        p384["crv"] = "P-384".into();
        assert!(
            Bundle::from_spiffe_json(td(), json!({"keys":[p384]}).to_string().as_bytes()).is_err()
        );
        // Missing kid.
        let mut nokid = jwk("a", &point);
        nokid.as_object_mut().unwrap().remove("kid");
        assert!(
            Bundle::from_spiffe_json(td(), json!({"keys":[nokid]}).to_string().as_bytes()).is_err()
        );
        // Duplicate JSON member.
        let dupmember = br#"{"keys":[],"keys":[]}"#;
        assert!(matches!(
            Bundle::from_spiffe_json(td(), dupmember),
            Err(BundleError::Json(_))
        ));
        // Unknown `use` is ignored.
        let unknown = json!({ "keys": [{"use": "something-else", "kty": "oct"}] }).to_string();
        assert!(
            Bundle::from_spiffe_json(td(), unknown.as_bytes())
                .unwrap()
                .jwt
                .keys()
                .next()
                .is_none()
        );
        // Too large.
        let big = vec![b' '; MAX_BUNDLE_BYTES + 1];
        assert_eq!(Bundle::parse_any(td(), &big), Err(BundleError::TooLarge));
        assert_eq!(
            Bundle::parse_any(td(), b"hello"),
            Err(BundleError::UnknownFormat)
        );
    }

    #[test]
    fn expired_authorities_are_dropped() {
        let live = ca(2099);
        let dead = ca(2001);
        let b = X509Bundle::from_ders(td(), vec![live.clone(), dead]).unwrap();
        assert_eq!(b.authorities(), &[live]);
        assert!(X509Bundle::from_ders(td(), vec![CertificateDer::from(vec![0x30, 0x00])]).is_err());
    }

    /// Found by the `bundle` fuzz target: PEM input just under the cap grew
    /// past it as SPIFFE JSON, so Sigil could not read back what it wrote.
    #[test]
    fn what_loads_also_reads_back() {
        let pem = X509Bundle {
            trust_domain: td(),
            authorities: vec![ca(2099)],
        }
        .to_pem();
        let copies = MAX_BUNDLE_BYTES / pem.len();
        let big = pem.repeat(copies);
        assert!(big.len() <= MAX_BUNDLE_BYTES);
        assert_eq!(
            Bundle::parse_any(td(), big.as_bytes()),
            Err(BundleError::TooLarge)
        );
        // A modest bundle round-trips, and every authority entry has a kty.
        let b = Bundle::parse_any(td(), pem.repeat(3).as_bytes()).unwrap();
        let json = b.to_spiffe_json();
        let doc: Value = serde_json::from_str(&json).unwrap();
        for k in doc["keys"].as_array().unwrap() {
            assert_eq!(k["kty"], "EC");
            assert_eq!(k["crv"], "P-256");
        }
        assert_eq!(Bundle::from_spiffe_json(td(), json.as_bytes()).unwrap(), b);
    }

    #[test]
    fn authority_jwk_names_the_right_curve() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let der = p.self_signed(&key).unwrap().der().clone();
        let jwk = authority_jwk(&der).unwrap();
        assert_eq!(jwk["crv"], "P-384");
        assert_eq!(
            URL_SAFE_NO_PAD
                .decode(jwk["x"].as_str().unwrap())
                .unwrap()
                .len(),
            48
        );
    }

    #[test]
    fn set_never_merges() {
        let other = TrustDomain::new("other.org").unwrap();
        let mut set = BundleSet::new();
        let mut a = Bundle::empty(td());
        a.jwt
            .add_key(JwtKey::from_sec1("a", &p256_point()).unwrap())
            .unwrap();
        set.insert(a);
        let mut b = Bundle::empty(td());
        b.jwt
            .add_key(JwtKey::from_sec1("b", &p256_point()).unwrap())
            .unwrap();
        set.insert(b);
        let got = set.get(&td()).unwrap();
        assert!(got.jwt.key("a").is_none(), "replaced, not merged");
        assert!(got.jwt.key("b").is_some());
        assert!(set.get(&other).is_none());
    }

    #[test]
    fn thumbprint_matches_rfc7638_shape() {
        let point = p256_point();
        let k = JwtKey::from_sec1("k", &point).unwrap();
        assert_eq!(k.thumbprint().len(), 43);
        assert_eq!(k.thumbprint(), jwk_thumbprint_p256(&point));
    }
}
