//! Proof of possession for key-bound JWT-SVIDs (`cnf.jkt`), in the form of
//! OAuth DPoP proofs (RFC 9449).
//!
//! A JWT-SVID whose key lives in a TPM carries `cnf: {"jkt": <RFC 7638
//! thumbprint of that key>}` (RFC 7800). Stolen, the token alone is useless:
//! each request must also carry a fresh proof, a small JWS signed by that
//! key, naming the request (`htm`, `htu`), the time (`iat`), a unique `jti`
//! and the token's hash (`ath`). HTTP clients send it in the `DPoP` header
//! with `Authorization: DPoP <token>`.
//!
//! [`verify_proof`] checks, in order: size; three strict base64url
//! segments; header members exactly `typ` (`dpop+jwt`), `alg` (`ES256`) and
//! `jwk` (a public P-256 key: `kty`, `crv`, `x`, `y` only, never `d`); the
//! key's thumbprint equals the token's `cnf.jkt`; the ES256 signature (range
//! checked); claims `htm` and `htu` (query and fragment ignored) equal the
//! request's, `iat` within [`MAX_PROOF_AGE_SECS`] in the past and the leeway
//! in the future, `ath` the SHA-256 of the token, `jti` present; and, with a
//! [`ReplayCache`], that the `jti` was not seen before.

use crate::bundle::{JwtKey, jwk_thumbprint_p256};
use crate::json::parse_strict;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::sync::Mutex;

/// Proofs longer than this are refused before parsing.
pub const MAX_PROOF_BYTES: usize = 4 * 1024;
/// How old (by `iat`) a proof may be.
pub const MAX_PROOF_AGE_SECS: i64 = 60;
/// The proof's `typ`.
pub const PROOF_TYP: &str = "dpop+jwt";
/// Longest `jti` accepted.
const MAX_JTI: usize = 128;

/// Why a proof was refused. Messages never contain the proof or token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProofError {
    /// Larger than [`MAX_PROOF_BYTES`].
    #[error("proof is too large")]
    TooLarge,
    /// Not a compact JWS of strict base64url segments with JSON objects.
    #[error("proof is not a well-formed JWS: {0}")]
    Malformed(&'static str),
    /// A header member other than `typ`, `alg`, `jwk`, or a bad value.
    #[error("proof header: {0}")]
    BadHeader(&'static str),
    /// The proof's key is not the one the token is bound to.
    #[error("proof is signed by another key than the token is bound to")]
    WrongKey,
    /// The signature does not verify.
    #[error("proof signature does not verify")]
    BadSignature,
    /// A claim is missing or has the wrong type.
    #[error("proof claim {0} is missing or malformed")]
    BadClaim(&'static str),
    /// `htm`/`htu` name another request.
    #[error("proof is for another request ({0})")]
    WrongRequest(&'static str),
    /// `iat` is too old or in the future.
    #[error("proof is stale or from the future")]
    Stale,
    /// `ath` is not the hash of this token.
    #[error("proof is for another token")]
    WrongToken,
    /// The `jti` was seen before.
    #[error("proof was replayed")]
    Replayed,
    /// Signing failed (building a proof).
    #[error("signing the proof failed: {0}")]
    Signing(String),
}

/// The request a proof must name.
#[derive(Debug, Clone, Copy)]
pub struct ProofRequest<'a> {
    /// HTTP method, e.g. `GET` (gRPC: `POST`).
    pub method: &'a str,
    /// The request's absolute URI as the client addressed it, e.g.
    /// `https://ehr.example/fhir/Patient`; query and fragment are ignored.
    pub uri: &'a str,
}

/// What a verified proof established.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedProof {
    /// The thumbprint of the key that signed it (= the token's `cnf.jkt`).
    pub jkt: String,
    /// The proof's `jti`.
    pub jti: String,
    /// The proof's `iat`.
    pub issued_at: i64,
}

/// Remembers proof `jti`s until they are too old to be accepted anyway, so
/// each proof is accepted once. Bounded: when full of live entries it
/// refuses new proofs (fails closed) rather than forgetting.
#[derive(Debug)]
pub struct ReplayCache {
    seen: Mutex<HashMap<(String, String), i64>>,
    capacity: usize,
}

impl ReplayCache {
    /// A cache holding at most `capacity` live proofs.
    pub fn new(capacity: usize) -> Self {
        Self {
            seen: Mutex::new(HashMap::new()),
            capacity,
        }
    }

    /// Records `(jkt, jti)`; false if it was already there (or the cache is
    /// full of live entries).
    fn insert(&self, jkt: &str, jti: &str, iat: i64, now: i64) -> bool {
        let Ok(mut seen) = self.seen.lock() else {
            return false;
        };
        let key = (jkt.to_owned(), jti.to_owned());
        if seen.contains_key(&key) {
            return false;
        }
        if seen.len() >= self.capacity {
            seen.retain(|_, until| *until >= now);
            if seen.len() >= self.capacity {
                return false;
            }
        }
        seen.insert(
            key,
            iat + MAX_PROOF_AGE_SECS + crate::validate::jwt::MAX_LEEWAY_SECS,
        );
        true
    }
}

impl Default for ReplayCache {
    fn default() -> Self {
        Self::new(100_000)
    }
}

fn b64(s: &str) -> Result<Vec<u8>, ProofError> {
    URL_SAFE_NO_PAD
        .decode(s)
        .map_err(|_| ProofError::Malformed("segment is not strict base64url"))
}

fn object(bytes: &[u8]) -> Result<Map<String, Value>, ProofError> {
    match parse_strict(bytes) {
        Ok(Value::Object(m)) => Ok(m),
        _ => Err(ProofError::Malformed("segment is not a strict JSON object")),
    }
}

/// `htu` comparison: the URI without query and fragment (RFC 9449 §4.3).
fn htu_base(uri: &str) -> &str {
    let end = uri.find(['?', '#']).unwrap_or(uri.len());
    &uri[..end]
}

/// The base64url SHA-256 of a token: the proof's `ath`.
pub fn token_hash(token: &str) -> String {
    URL_SAFE_NO_PAD.encode(aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        token.as_bytes(),
    ))
}

/// Verifies `proof` for `token` (whose `cnf.jkt` is `jkt`) and `request`
/// at `now` (Unix seconds), with `leeway` seconds of clock skew.
pub fn verify_proof(
    proof: &str,
    token: &str,
    jkt: &str,
    request: &ProofRequest<'_>,
    now: i64,
    leeway: i64,
    replay: Option<&ReplayCache>,
) -> Result<VerifiedProof, ProofError> {
    if proof.len() > MAX_PROOF_BYTES {
        return Err(ProofError::TooLarge);
    }
    let mut parts = proof.split('.');
    let (Some(h64), Some(c64), Some(s64), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(ProofError::Malformed("not three segments"));
    };
    let header = object(&b64(h64)?)?;
    let claims = object(&b64(c64)?)?;
    let sig = b64(s64)?;

    // Header: exactly typ, alg, jwk.
    for k in header.keys() {
        if !matches!(k.as_str(), "typ" | "alg" | "jwk") {
            return Err(ProofError::BadHeader("only typ, alg and jwk are allowed"));
        }
    }
    if header.get("typ").and_then(Value::as_str) != Some(PROOF_TYP) {
        return Err(ProofError::BadHeader("typ must be dpop+jwt"));
    }
    if header.get("alg").and_then(Value::as_str) != Some("ES256") {
        return Err(ProofError::BadHeader("alg must be ES256"));
    }
    let Some(Value::Object(jwk)) = header.get("jwk") else {
        return Err(ProofError::BadHeader("jwk must be an object"));
    };
    for k in jwk.keys() {
        if !matches!(k.as_str(), "kty" | "crv" | "x" | "y") {
            return Err(ProofError::BadHeader(
                "jwk may only hold kty, crv, x and y (never a private key)",
            ));
        }
    }
    if jwk.get("kty").and_then(Value::as_str) != Some("EC")
        || jwk.get("crv").and_then(Value::as_str) != Some("P-256")
    {
        return Err(ProofError::BadHeader("jwk must be an EC P-256 key"));
    }
    let coord = |name| -> Result<Vec<u8>, ProofError> {
        let v = jwk
            .get(name)
            .and_then(Value::as_str)
            .ok_or(ProofError::BadHeader("jwk x and y must be strings"))?;
        let b = b64(v)?;
        if b.len() != 32 {
            return Err(ProofError::BadHeader("jwk x and y must be 32 bytes"));
        }
        Ok(b)
    };
    let mut sec1 = vec![4u8];
    sec1.extend_from_slice(&coord("x")?);
    sec1.extend_from_slice(&coord("y")?);
    // The key must be the one the token is bound to.
    if jwk_thumbprint_p256(&sec1) != jkt {
        return Err(ProofError::WrongKey);
    }
    let key = JwtKey::from_sec1("dpop", &sec1)
        .map_err(|_| ProofError::BadHeader("jwk point is invalid"))?;
    if sig.len() != 64
        || !crate::validate::jwt::scalar_in_range(&sig[..32])
        || !crate::validate::jwt::scalar_in_range(&sig[32..])
    {
        return Err(ProofError::BadSignature);
    }
    let signed = &proof.as_bytes()[..h64.len() + 1 + c64.len()];
    if !key.verify_es256(signed, &sig) {
        return Err(ProofError::BadSignature);
    }

    // Claims.
    let jti = match claims.get("jti") {
        Some(Value::String(j)) if !j.is_empty() && j.len() <= MAX_JTI => j.clone(),
        _ => return Err(ProofError::BadClaim("jti")),
    };
    let htm = claims
        .get("htm")
        .and_then(Value::as_str)
        .ok_or(ProofError::BadClaim("htm"))?;
    if htm != request.method {
        return Err(ProofError::WrongRequest("htm"));
    }
    let htu = claims
        .get("htu")
        .and_then(Value::as_str)
        .ok_or(ProofError::BadClaim("htu"))?;
    if htu_base(htu) != htu_base(request.uri) {
        return Err(ProofError::WrongRequest("htu"));
    }
    let iat = claims
        .get("iat")
        .and_then(Value::as_i64)
        .ok_or(ProofError::BadClaim("iat"))?;
    if iat > now.saturating_add(leeway) || iat < now.saturating_sub(MAX_PROOF_AGE_SECS + leeway) {
        return Err(ProofError::Stale);
    }
    let ath = claims
        .get("ath")
        .and_then(Value::as_str)
        .ok_or(ProofError::BadClaim("ath"))?;
    if ath != token_hash(token) {
        return Err(ProofError::WrongToken);
    }
    if let Some(cache) = replay
        && !cache.insert(jkt, &jti, iat, now)
    {
        return Err(ProofError::Replayed);
    }
    Ok(VerifiedProof {
        jkt: jkt.to_owned(),
        jti,
        issued_at: iat,
    })
}

/// A key that can sign proofs: a TPM-resident key behind the agent, or a
/// software key.
pub trait ProofKey {
    /// The uncompressed SEC1 P-256 public point.
    fn public_sec1(&self) -> Vec<u8>;
    /// An ES256 signature (`r || s`, 64 bytes) over `message` (the key
    /// hashes it with SHA-256).
    fn sign_es256(&self, message: &[u8]) -> Result<Vec<u8>, ProofError>;
}

/// A software P-256 key (aws-lc-rs). For workloads whose key is not in a
/// TPM, and for tests.
pub struct SoftwareProofKey(aws_lc_rs::signature::EcdsaKeyPair);

impl std::fmt::Debug for SoftwareProofKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SoftwareProofKey(<redacted>)")
    }
}

impl SoftwareProofKey {
    /// A new random key.
    pub fn generate() -> Result<Self, ProofError> {
        aws_lc_rs::signature::EcdsaKeyPair::generate(
            &aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
        )
        .map(Self)
        .map_err(|_| ProofError::Signing("key generation failed".into()))
    }

    /// From a PKCS#8 P-256 key.
    pub fn from_pkcs8(der: &[u8]) -> Result<Self, ProofError> {
        aws_lc_rs::signature::EcdsaKeyPair::from_pkcs8(
            &aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            der,
        )
        .map(Self)
        .map_err(|_| ProofError::Signing("not a P-256 PKCS#8 key".into()))
    }
}

impl ProofKey for SoftwareProofKey {
    fn public_sec1(&self) -> Vec<u8> {
        use aws_lc_rs::signature::KeyPair;
        self.0.public_key().as_ref().to_vec()
    }
    fn sign_es256(&self, message: &[u8]) -> Result<Vec<u8>, ProofError> {
        let rng = aws_lc_rs::rand::SystemRandom::new();
        self.0
            .sign(&rng, message)
            .map(|s| s.as_ref().to_vec())
            .map_err(|_| ProofError::Signing("ECDSA signing failed".into()))
    }
}

/// The RFC 7638 thumbprint of a proof key: what the token's `cnf.jkt` holds.
pub fn key_thumbprint(key: &dyn ProofKey) -> String {
    jwk_thumbprint_p256(&key.public_sec1())
}

/// Builds a proof for `token` and `request`, signed by `key`, at `now`.
pub fn build_proof(
    key: &dyn ProofKey,
    token: &str,
    request: &ProofRequest<'_>,
    now: i64,
) -> Result<String, ProofError> {
    let sec1 = key.public_sec1();
    if sec1.len() != 65 {
        return Err(ProofError::Signing("not a P-256 key".into()));
    }
    let header = serde_json::json!({
        "typ": PROOF_TYP,
        "alg": "ES256",
        "jwk": {
            "kty": "EC",
            "crv": "P-256",
            "x": URL_SAFE_NO_PAD.encode(&sec1[1..33]),
            "y": URL_SAFE_NO_PAD.encode(&sec1[33..]),
        },
    });
    let mut jti = [0u8; 16];
    aws_lc_rs::rand::fill(&mut jti).map_err(|_| ProofError::Signing("RNG failure".into()))?;
    let claims = serde_json::json!({
        "jti": URL_SAFE_NO_PAD.encode(jti),
        "htm": request.method,
        "htu": htu_base(request.uri),
        "iat": now,
        "ath": token_hash(token),
    });
    let mut out = URL_SAFE_NO_PAD.encode(header.to_string());
    out.push('.');
    out.push_str(&URL_SAFE_NO_PAD.encode(claims.to_string()));
    let sig = key.sign_es256(out.as_bytes())?;
    if sig.len() != 64 {
        return Err(ProofError::Signing("signature is not 64 bytes".into()));
    }
    out.push('.');
    out.push_str(&URL_SAFE_NO_PAD.encode(sig));
    Ok(out)
}

#[cfg(test)]
mod tests;
