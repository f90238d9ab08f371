//! JWT-SVID validation, hardened beyond generic JWT libraries.
//!
//! [`JwtSvidValidator::validate`] runs these checks, in this order, and stops
//! at the first failure:
//!
//! 1. size cap ([`DEFAULT_MAX_TOKEN_BYTES`]) before any parsing;
//! 2. exactly three segments, each strict unpadded base64url (no padding, no
//!    `+`/`/`, no non-zero trailing bits: one token, one encoding);
//! 3. header: strict JSON (duplicate members rejected), members limited to
//!    `alg`, `kid`, `typ`; `alg` exactly `ES256` (the validator fixes the
//!    algorithm: never `none`, never HS*, never what the token asks for);
//!    `typ` absent, `JWT` or `JOSE`; `kid` a non-empty string;
//! 4. claims: strict JSON object (duplicate members rejected);
//! 5. `sub`: a string that is a strict SPIFFE ID;
//! 6. `kid` looked up only among the JWT keys of the bundle of `sub`'s own
//!    trust domain — no other bundle, no fallback to another key;
//! 7. signature: exactly 64 raw bytes, `r` and `s` in `[1, n-1]` (no
//!    "psychic signatures"), ES256 verification over `header.payload`;
//! 8. `exp` required (a number), not in the past beyond the leeway; `nbf` and
//!    `iat`, when present, numbers not in the future beyond the leeway
//!    (leeway ≤ 60 s);
//! 9. lifetime `exp − iat` (or `exp − now` without `iat`) at most the cap
//!    (default 24 h + leeway);
//! 10. `aud` required: a string or a non-empty array of strings, one of which
//!     equals this tool's audience byte for byte; by default the token must
//!     carry exactly one audience (Sigil's per-tool audience), so a token
//!     minted for two tools cannot be replayed from one to the other;
//! 11. `acr` a string and `amr` an array of strings, when present.
//!
//! Not checked: `iss` (SPIFFE does not fix it; compare
//! [`VerifiedJwtSvid::claims`] yourself), `jti` replay (a tool that needs
//! one-time use must keep its own cache), revocation.

use crate::assurance::AssuranceLevel;
use crate::bundle::BundleSet;
use crate::id::{IdError, SpiffeId};
use crate::json::parse_strict;
use crate::validate::pop::{ProofError, ProofRequest, ReplayCache, VerifiedProof, verify_proof};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Map, Value};
use std::time::{SystemTime, UNIX_EPOCH};

/// Tokens longer than this are refused before parsing.
pub const DEFAULT_MAX_TOKEN_BYTES: usize = 8 * 1024;
/// Clock skew tolerated for `exp`, `nbf` and `iat`, seconds (also the most a
/// caller may configure).
pub const MAX_LEEWAY_SECS: i64 = 60;
/// The default cap on `exp − iat`: Sigil's 24 h JWT-SVID TTL plus leeway.
pub const DEFAULT_MAX_LIFETIME_SECS: i64 = 24 * 3600 + MAX_LEEWAY_SECS;

/// The only signature algorithm accepted.
pub const ALG_ES256: &str = "ES256";

/// Which part of a token a failure is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Segment {
    /// The JOSE header.
    Header,
    /// The claims.
    Claims,
    /// The signature.
    Signature,
}

/// Why a JWT-SVID was refused. Messages are safe to show a caller: they
/// never contain the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JwtSvidError {
    /// Larger than the cap.
    #[error("token is larger than {0} bytes")]
    TooLarge(usize),
    /// Not three dot-separated segments.
    #[error("token is not three dot-separated segments")]
    NotThreeSegments,
    /// A segment is not strict unpadded base64url.
    #[error("{0:?} segment is not strict base64url")]
    BadBase64(Segment),
    /// A segment is not a strict JSON object (includes duplicate members).
    #[error("{0:?} is not a valid JSON object: {1}")]
    BadJson(Segment, String),
    /// A header member other than `alg`, `kid`, `typ`.
    #[error("header member {0:?} is not allowed")]
    UnexpectedHeaderMember(String),
    /// `alg` is missing or not ES256.
    #[error("algorithm {0:?} is not allowed (only ES256)")]
    AlgorithmNotAllowed(String),
    /// `typ` is present and not `JWT`/`JOSE`.
    #[error("header typ is not JWT or JOSE")]
    BadType,
    /// No `kid`.
    #[error("header has no kid")]
    MissingKeyId,
    /// No `sub` string.
    #[error("token has no sub claim")]
    MissingSubject,
    /// `sub` is not a valid SPIFFE ID.
    #[error("sub is not a valid SPIFFE ID: {0}")]
    BadSubject(IdError),
    /// No bundle for `sub`'s trust domain.
    #[error("no bundle for trust domain {0:?}")]
    NoBundleForTrustDomain(String),
    /// `kid` not among the trust domain's JWT keys.
    #[error("kid {0:?} is not in the trust domain's JWT bundle")]
    UnknownKeyId(String),
    /// Signature not 64 bytes, or r/s out of range.
    #[error("signature is not a well-formed ES256 signature")]
    MalformedSignature,
    /// Signature does not verify.
    #[error("signature does not verify")]
    BadSignature,
    /// No `exp`.
    #[error("token has no exp claim")]
    MissingExpiry,
    /// A claim has the wrong JSON type (named).
    #[error("claim {0} has the wrong type")]
    BadClaimType(&'static str),
    /// `exp` is in the past.
    #[error("token has expired")]
    Expired,
    /// The token is bound to a key (`cnf`) and no proof of possession was
    /// given: use [`JwtSvidValidator::validate_with_proof`].
    #[error("token is bound to a key (cnf): a proof of possession is required")]
    ProofRequired,
    /// The proof of possession was refused.
    #[error("{0}")]
    Proof(#[from] ProofError),
    /// `nbf` is in the future.
    #[error("token is not yet valid (nbf)")]
    NotYetValid,
    /// `iat` is in the future.
    #[error("token was issued in the future (iat)")]
    IssuedInFuture,
    /// `exp − iat` over the cap.
    #[error("token lifetime exceeds the maximum")]
    LifetimeTooLong,
    /// No `aud`.
    #[error("token has no aud claim")]
    MissingAudience,
    /// This tool's audience is not in `aud`.
    #[error("token audience does not match")]
    AudienceMismatch,
    /// More than one audience where one is required.
    #[error("token carries more than one audience")]
    MultipleAudiences,
}

/// A JWT-SVID that passed every check of [`JwtSvidValidator::validate`].
/// Only that function can build one.
#[derive(Debug, Clone, PartialEq)]
pub struct VerifiedJwtSvid {
    id: SpiffeId,
    audience: Vec<String>,
    expiry: i64,
    issued_at: Option<i64>,
    jti: Option<String>,
    kid: String,
    acr: Option<String>,
    amr: Vec<String>,
    cnf_jkt: Option<String>,
    proof: Option<VerifiedProof>,
    claims: Map<String, Value>,
}

impl VerifiedJwtSvid {
    /// The verified SPIFFE ID (`sub`).
    pub fn spiffe_id(&self) -> &SpiffeId {
        &self.id
    }
    /// The audiences (`aud`), one of which is the validator's.
    pub fn audience(&self) -> &[String] {
        &self.audience
    }
    /// `exp`, Unix seconds.
    pub fn expiry(&self) -> i64 {
        self.expiry
    }
    /// `iat`, Unix seconds.
    pub fn issued_at(&self) -> Option<i64> {
        self.issued_at
    }
    /// `jti`.
    pub fn jti(&self) -> Option<&str> {
        self.jti.as_deref()
    }
    /// The `kid` that signed it.
    pub fn kid(&self) -> &str {
        &self.kid
    }
    /// The raw `acr` claim.
    pub fn acr(&self) -> Option<&str> {
        self.acr.as_deref()
    }
    /// `acr` read as a Sigil assurance level (`None` when absent or foreign).
    pub fn assurance(&self) -> Option<AssuranceLevel> {
        self.acr.as_deref().and_then(|a| a.parse().ok())
    }
    /// The `amr` methods.
    pub fn amr(&self) -> &[String] {
        &self.amr
    }
    /// `cnf.jkt`: the thumbprint of the key this token is bound to. A
    /// token with one is only ever returned with its proof verified.
    pub fn cnf_jkt(&self) -> Option<&str> {
        self.cnf_jkt.as_deref()
    }
    /// The proof of possession that was verified for a key-bound token.
    pub fn proof(&self) -> Option<&VerifiedProof> {
        self.proof.as_ref()
    }
    /// Every claim, as sent.
    pub fn claims(&self) -> &Map<String, Value> {
        &self.claims
    }
}

/// Validates JWT-SVIDs for one audience: the tool's own name.
#[derive(Debug, Clone)]
pub struct JwtSvidValidator {
    audience: String,
    leeway: i64,
    max_lifetime: i64,
    max_token_bytes: usize,
    single_audience: bool,
}

impl JwtSvidValidator {
    /// A validator for tokens addressed to `audience`, with the defaults
    /// listed in the module docs.
    pub fn new(audience: impl Into<String>) -> Self {
        Self {
            audience: audience.into(),
            leeway: MAX_LEEWAY_SECS,
            max_lifetime: DEFAULT_MAX_LIFETIME_SECS,
            max_token_bytes: DEFAULT_MAX_TOKEN_BYTES,
            single_audience: true,
        }
    }

    /// Clock-skew leeway in seconds, clamped to `0..=60`.
    pub fn with_leeway(mut self, secs: i64) -> Self {
        self.leeway = secs.clamp(0, MAX_LEEWAY_SECS);
        self
    }

    /// Cap on `exp − iat`, seconds.
    pub fn with_max_lifetime(mut self, secs: i64) -> Self {
        self.max_lifetime = secs.max(0);
        self
    }

    /// Accepts tokens that list several audiences, as long as one is ours.
    /// Off by default: a multi-audience token can be replayed between tools.
    pub fn allow_multiple_audiences(mut self) -> Self {
        self.single_audience = false;
        self
    }

    /// The audience this validator accepts.
    pub fn audience(&self) -> &str {
        &self.audience
    }

    /// Runs every check in the module docs. A token bound to a key
    /// (`cnf`) is refused with [`JwtSvidError::ProofRequired`]: it is only
    /// good together with a proof, see [`Self::validate_with_proof`].
    pub fn validate(
        &self,
        token: &str,
        bundles: &BundleSet,
        now: SystemTime,
    ) -> Result<VerifiedJwtSvid, JwtSvidError> {
        let v = self.validate_token(token, bundles, now)?;
        if v.cnf_jkt.is_some() {
            return Err(JwtSvidError::ProofRequired);
        }
        Ok(v)
    }

    /// [`Self::validate`], and for a token bound to a key (`cnf.jkt`) also
    /// the proof of possession for `request` (see [`crate::validate::pop`]);
    /// with `replay`, each proof is accepted once. A token without `cnf`
    /// needs no proof (one given is not checked).
    pub fn validate_with_proof(
        &self,
        token: &str,
        proof: Option<&str>,
        request: &ProofRequest<'_>,
        bundles: &BundleSet,
        now: SystemTime,
        replay: Option<&ReplayCache>,
    ) -> Result<VerifiedJwtSvid, JwtSvidError> {
        let mut v = self.validate_token(token, bundles, now)?;
        let Some(jkt) = v.cnf_jkt.as_deref() else {
            return Ok(v);
        };
        let proof = proof.ok_or(JwtSvidError::ProofRequired)?;
        let now = now
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        v.proof = Some(verify_proof(
            proof,
            token,
            jkt,
            request,
            now,
            self.leeway,
            replay,
        )?);
        Ok(v)
    }

    fn validate_token(
        &self,
        token: &str,
        bundles: &BundleSet,
        now: SystemTime,
    ) -> Result<VerifiedJwtSvid, JwtSvidError> {
        // 1. Size before anything else.
        if token.len() > self.max_token_bytes {
            return Err(JwtSvidError::TooLarge(self.max_token_bytes));
        }
        // 2. Three strict base64url segments.
        let mut parts = token.split('.');
        let (Some(h64), Some(c64), Some(s64), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(JwtSvidError::NotThreeSegments);
        };
        let header = b64(h64, Segment::Header)?;
        let claims = b64(c64, Segment::Claims)?;
        let sig = b64(s64, Segment::Signature)?;

        // 3. Header.
        let header = json_object(&header, Segment::Header)?;
        for k in header.keys() {
            if !matches!(k.as_str(), "alg" | "kid" | "typ") {
                return Err(JwtSvidError::UnexpectedHeaderMember(k.clone()));
            }
        }
        match header.get("alg") {
            Some(Value::String(a)) if a == ALG_ES256 => {}
            Some(Value::String(a)) => return Err(JwtSvidError::AlgorithmNotAllowed(a.clone())),
            Some(other) => return Err(JwtSvidError::AlgorithmNotAllowed(other.to_string())),
            None => return Err(JwtSvidError::AlgorithmNotAllowed(String::new())),
        }
        match header.get("typ") {
            None => {}
            Some(Value::String(t)) if t == "JWT" || t == "JOSE" => {}
            Some(_) => return Err(JwtSvidError::BadType),
        }
        let kid = match header.get("kid") {
            Some(Value::String(k)) if !k.is_empty() => k.clone(),
            _ => return Err(JwtSvidError::MissingKeyId),
        };

        // 4. Claims.
        let claims = json_object(&claims, Segment::Claims)?;

        // 5. Subject.
        let sub = match claims.get("sub") {
            Some(Value::String(s)) => s,
            Some(_) => return Err(JwtSvidError::BadClaimType("sub")),
            None => return Err(JwtSvidError::MissingSubject),
        };
        let id = SpiffeId::parse(sub).map_err(JwtSvidError::BadSubject)?;

        // 6. Key of sub's own trust domain only.
        let bundle = bundles
            .get_by_name(id.trust_domain_name())
            .ok_or_else(|| JwtSvidError::NoBundleForTrustDomain(id.trust_domain_name().into()))?;
        let key = bundle
            .jwt
            .key(&kid)
            .ok_or_else(|| JwtSvidError::UnknownKeyId(kid.clone()))?;

        // 7. Signature.
        if sig.len() != 64 || !scalar_in_range(&sig[..32]) || !scalar_in_range(&sig[32..]) {
            return Err(JwtSvidError::MalformedSignature);
        }
        // `split` guarantees h64 and c64 are followed by '.', so this slice is
        // exactly "header.claims".
        let signed = &token.as_bytes()[..h64.len() + 1 + c64.len()];
        if !key.verify_es256(signed, &sig) {
            return Err(JwtSvidError::BadSignature);
        }

        // 8. Times.
        let now = now
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        let exp = numeric(&claims, "exp")?.ok_or(JwtSvidError::MissingExpiry)?;
        if exp <= now.saturating_sub(self.leeway) {
            return Err(JwtSvidError::Expired);
        }
        if let Some(nbf) = numeric(&claims, "nbf")?
            && nbf > now.saturating_add(self.leeway)
        {
            return Err(JwtSvidError::NotYetValid);
        }
        let iat = numeric(&claims, "iat")?;
        if let Some(iat) = iat
            && iat > now.saturating_add(self.leeway)
        {
            return Err(JwtSvidError::IssuedInFuture);
        }
        // 9. Lifetime.
        let start = iat.unwrap_or(now);
        if exp.saturating_sub(start) > self.max_lifetime {
            return Err(JwtSvidError::LifetimeTooLong);
        }

        // 10. Audience.
        let audience: Vec<String> = match claims.get("aud") {
            None => return Err(JwtSvidError::MissingAudience),
            Some(Value::String(a)) => vec![a.clone()],
            Some(Value::Array(items)) if !items.is_empty() => items
                .iter()
                .map(|v| v.as_str().map(str::to_owned))
                .collect::<Option<_>>()
                .ok_or(JwtSvidError::BadClaimType("aud"))?,
            Some(_) => return Err(JwtSvidError::BadClaimType("aud")),
        };
        if !audience
            .iter()
            .any(|a| a.as_bytes() == self.audience.as_bytes())
        {
            return Err(JwtSvidError::AudienceMismatch);
        }
        if self.single_audience && audience.len() != 1 {
            return Err(JwtSvidError::MultipleAudiences);
        }

        // 11. Optional typed claims.
        let acr = match claims.get("acr") {
            None => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(_) => return Err(JwtSvidError::BadClaimType("acr")),
        };
        let amr = match claims.get("amr") {
            None => Vec::new(),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| v.as_str().map(str::to_owned))
                .collect::<Option<_>>()
                .ok_or(JwtSvidError::BadClaimType("amr"))?,
            Some(_) => return Err(JwtSvidError::BadClaimType("amr")),
        };
        let jti = match claims.get("jti") {
            None => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(_) => return Err(JwtSvidError::BadClaimType("jti")),
        };
        let cnf_jkt = match claims.get("cnf") {
            None => None,
            Some(Value::Object(c)) => match c.get("jkt") {
                Some(Value::String(j)) => Some(j.clone()),
                _ => return Err(JwtSvidError::BadClaimType("cnf")),
            },
            Some(_) => return Err(JwtSvidError::BadClaimType("cnf")),
        };

        Ok(VerifiedJwtSvid {
            id,
            audience,
            expiry: exp,
            issued_at: iat,
            jti,
            kid,
            acr,
            amr,
            cnf_jkt,
            proof: None,
            claims,
        })
    }
}

/// Strict base64url: the URL-safe alphabet, no padding, zero trailing bits
/// (the base64 crate's default for this engine).
fn b64(s: &str, seg: Segment) -> Result<Vec<u8>, JwtSvidError> {
    URL_SAFE_NO_PAD
        .decode(s)
        .map_err(|_| JwtSvidError::BadBase64(seg))
}

fn json_object(bytes: &[u8], seg: Segment) -> Result<Map<String, Value>, JwtSvidError> {
    match parse_strict(bytes) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(JwtSvidError::BadJson(seg, "not an object".into())),
        Err(e) => Err(JwtSvidError::BadJson(seg, e.to_string())),
    }
}

/// A NumericDate claim: a JSON number (fractions are truncated); anything
/// else is a type error.
fn numeric(claims: &Map<String, Value>, name: &'static str) -> Result<Option<i64>, JwtSvidError> {
    match claims.get(name) {
        None => Ok(None),
        Some(Value::Number(n)) => {
            if let Some(i) = n.as_i64() {
                Ok(Some(i))
            } else if let Some(f) = n.as_f64().filter(|f| f.is_finite() && f.abs() < 1e15) {
                Ok(Some(f.trunc() as i64))
            } else {
                Err(JwtSvidError::BadClaimType(name))
            }
        }
        Some(_) => Err(JwtSvidError::BadClaimType(name)),
    }
}

/// The order of the P-256 group, big-endian.
const P256_ORDER: [u8; 32] = [
    0xff, 0xff, 0xff, 0xff, 0x00, 0x00, 0x00, 0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
    0xbc, 0xe6, 0xfa, 0xad, 0xa7, 0x17, 0x9e, 0x84, 0xf3, 0xb9, 0xca, 0xc2, 0xfc, 0x63, 0x25, 0x51,
];

/// `1 <= x < n` for a 32-byte big-endian scalar.
pub(crate) fn scalar_in_range(x: &[u8]) -> bool {
    x.len() == 32 && x.iter().any(|b| *b != 0) && x < &P256_ORDER[..]
}

#[cfg(test)]
mod tests;
