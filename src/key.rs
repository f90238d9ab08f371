//! Private keys. They zeroize on drop and never print in `Debug`.

use std::fmt;
use zeroize::Zeroizing;

/// An unencrypted PKCS#8 private key in DER form.
#[derive(Clone)]
pub struct PrivateKey {
    der: Zeroizing<Vec<u8>>,
}

impl PrivateKey {
    /// Wraps PKCS#8 DER bytes. The bytes are checked when the key is used
    /// (see [`crate::X509Svid::new`]), not here.
    pub fn from_pkcs8_der(der: Vec<u8>) -> Self {
        Self {
            der: Zeroizing::new(der),
        }
    }

    /// Generates a new ECDSA P-256 key.
    pub fn generate_p256() -> Result<Self, KeyError> {
        let doc = aws_lc_rs::signature::EcdsaKeyPair::generate_pkcs8(
            &aws_lc_rs::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
            &aws_lc_rs::rand::SystemRandom::new(),
        )
        .map_err(|_| KeyError::Generate)?;
        Ok(Self::from_pkcs8_der(doc.as_ref().to_vec()))
    }

    /// The PKCS#8 DER bytes. Handle with care.
    pub fn secret_pkcs8_der(&self) -> &[u8] {
        &self.der
    }

    /// The public key as an uncompressed SEC1 point, if this is an EC key of
    /// a supported curve (P-256, P-384).
    pub fn public_key_sec1(&self) -> Result<Vec<u8>, KeyError> {
        use aws_lc_rs::signature::{
            ECDSA_P256_SHA256_ASN1_SIGNING, ECDSA_P384_SHA384_ASN1_SIGNING, EcdsaKeyPair, KeyPair,
        };
        for alg in [
            &ECDSA_P256_SHA256_ASN1_SIGNING,
            &ECDSA_P384_SHA384_ASN1_SIGNING,
        ] {
            if let Ok(kp) = EcdsaKeyPair::from_pkcs8(alg, &self.der) {
                return Ok(kp.public_key().as_ref().to_vec());
            }
        }
        Err(KeyError::Unsupported)
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PrivateKey(<redacted>)")
    }
}

/// Key handling errors.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// Not a PKCS#8 EC key on P-256 or P-384.
    #[error("private key is not a PKCS#8 ECDSA P-256 or P-384 key")]
    Unsupported,
    /// The system random generator failed.
    #[error("key generation failed")]
    Generate,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_is_redacted() {
        let k = PrivateKey::generate_p256().unwrap();
        let dbg = format!("{k:?}");
        assert_eq!(dbg, "PrivateKey(<redacted>)");
        assert_eq!(k.public_key_sec1().unwrap().len(), 65);
        assert_eq!(
            PrivateKey::from_pkcs8_der(vec![1, 2, 3]).public_key_sec1(),
            Err(KeyError::Unsupported)
        );
    }
}
