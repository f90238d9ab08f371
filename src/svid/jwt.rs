//! JWT-SVID minting: the header and claims Sigil writes, signed with a cached
//! aws-lc ES256 key (no re-parsing of the key per token).
//!
//! Header: exactly `alg` = `ES256`, `kid`, `typ` = `JWT` (what the Rust
//! `spiffe` crate and py-spiffe accept). Claims: `sub`, `aud` (one string: the
//! one tool), `exp`, `iat`, `jti`, optional `iss`, `acr`, `amr`, `cnf`.

use crate::id::SpiffeId;
use crate::key::{KeyError, PrivateKey};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Serialize;

/// The claims of a JWT-SVID Sigil mints.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct JwtSvidClaims {
    /// The workload's SPIFFE ID.
    pub sub: SpiffeId,
    /// Exactly one audience: the tool this token is for.
    pub aud: String,
    /// Expiry, Unix seconds.
    pub exp: i64,
    /// Issued at, Unix seconds.
    pub iat: i64,
    /// Random token ID.
    pub jti: String,
    /// Issuer, if configured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    /// Assurance level (`sigil:al1` …).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acr: Option<String>,
    /// Attestation methods.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub amr: Vec<String>,
    /// Proof-of-possession binding (RFC 7800).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cnf: Option<Confirmation>,
}

/// RFC 7800 `cnf` with a JWK thumbprint.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Confirmation {
    /// RFC 7638 thumbprint of the bound key.
    pub jkt: String,
}

/// An ES256 signing key with its `kid`.
pub struct JwtSigner {
    kid: String,
    key: aws_lc_rs::signature::EcdsaKeyPair,
    rng: aws_lc_rs::rand::SystemRandom,
}

impl std::fmt::Debug for JwtSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "JwtSigner(kid={}, key=<redacted>)", self.kid)
    }
}

/// Signing failed (the key is unusable or the RNG failed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("JWT signing failed")]
pub struct SignError;

impl JwtSigner {
    /// Loads a PKCS#8 P-256 key.
    pub fn new(kid: impl Into<String>, key: &PrivateKey) -> Result<Self, KeyError> {
        let key = aws_lc_rs::signature::EcdsaKeyPair::from_pkcs8(
            &aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            key.secret_pkcs8_der(),
        )
        .map_err(|_| KeyError::Unsupported)?;
        Ok(Self {
            kid: kid.into(),
            key,
            rng: aws_lc_rs::rand::SystemRandom::new(),
        })
    }

    /// The key ID.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The public key as an uncompressed SEC1 point.
    pub fn public_key_sec1(&self) -> Vec<u8> {
        use aws_lc_rs::signature::KeyPair;
        self.key.public_key().as_ref().to_vec()
    }

    /// Signs the claims into a compact JWS.
    pub fn sign(&self, claims: &JwtSvidClaims) -> Result<String, SignError> {
        let header = serde_json::json!({ "alg": "ES256", "kid": self.kid, "typ": "JWT" });
        let claims = serde_json::to_vec(claims).map_err(|_| SignError)?;
        self.sign_raw(header.to_string().as_bytes(), &claims)
    }

    /// Signs arbitrary header and claims bytes. For tests and tools that
    /// build unusual tokens; [`Self::sign`] is what issuers use.
    pub fn sign_raw(&self, header: &[u8], claims: &[u8]) -> Result<String, SignError> {
        let mut out = URL_SAFE_NO_PAD.encode(header);
        out.push('.');
        out.push_str(&URL_SAFE_NO_PAD.encode(claims));
        let sig = self
            .key
            .sign(&self.rng, out.as_bytes())
            .map_err(|_| SignError)?;
        out.push('.');
        out.push_str(&URL_SAFE_NO_PAD.encode(sig.as_ref()));
        Ok(out)
    }
}

/// A random 128-bit token ID, base64url.
pub fn random_jti() -> String {
    let mut b = [0u8; 16];
    // An RNG failure leaves zeros; aws-lc's RNG does not fail in practice,
    // and a jti is an identifier, not a secret.
    let _ = aws_lc_rs::rand::fill(&mut b);
    URL_SAFE_NO_PAD.encode(b)
}
