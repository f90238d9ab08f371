//! The boundary between the agent's cache and whatever holds TPM-bound
//! workload keys (entries with `key_binding = "tpm"`): on a TPM agent,
//! [`crate::tpm::TpmWorkloadKeys`]; on any other agent, nothing, and such
//! entries are not served (fail closed).
//!
//! The cache persists keys only as [`BoundKeyBlob`]s: the TPMT_PUBLIC and
//! the TPM-encrypted private blob, useless without the TPM that made them.
//! Every method blocks for one or more TPM commands: call them from a
//! blocking task.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};

/// A TPM-bound key as the agent's state file keeps it (base64).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BoundKeyBlob {
    /// TPMT_PUBLIC.
    pub public: String,
    /// TPM2B_PRIVATE contents, encrypted by the TPM's storage key.
    pub private: String,
}

impl std::fmt::Debug for BoundKeyBlob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BoundKeyBlob(<sealed>)")
    }
}

/// The public facts of a bound key, read from its TPMT_PUBLIC without the
/// TPM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BoundKeyPublic {
    /// TPMT_PUBLIC.
    pub tpmt: Vec<u8>,
    /// Uncompressed SEC1 point.
    pub sec1: Vec<u8>,
    /// DER SubjectPublicKeyInfo.
    pub spki: Vec<u8>,
    /// RFC 7638 thumbprint (`cnf.jkt` of its JWT-SVIDs).
    pub jkt: String,
}

impl BoundKeyBlob {
    /// From raw TPM blobs.
    pub fn new(public_tpmt: &[u8], private: &[u8]) -> Self {
        Self {
            public: B64.encode(public_tpmt),
            private: B64.encode(private),
        }
    }

    /// The raw (TPMT_PUBLIC, private blob).
    pub fn raw(&self) -> Result<(Vec<u8>, Vec<u8>), KeyHolderError> {
        let bad = |_| KeyHolderError::KeyUnusable("the stored key blob is not base64".into());
        Ok((
            B64.decode(&self.public).map_err(bad)?,
            B64.decode(&self.private).map_err(bad)?,
        ))
    }

    /// The key's public facts, checked: a TPM-resident (fixedTPM,
    /// fixedParent, sensitiveDataOrigin) P-256 signing key.
    pub fn public(&self) -> Result<BoundKeyPublic, KeyHolderError> {
        let (tpmt, _) = self.raw()?;
        let unusable = |e: sigil::tpm::TpmError| KeyHolderError::KeyUnusable(e.to_string());
        let parsed = sigil::tpm::TpmPublic::parse(&tpmt).map_err(unusable)?;
        parsed.check_resident_signing_key().map_err(unusable)?;
        let sec1 = parsed
            .p256_point()
            .ok_or_else(|| KeyHolderError::KeyUnusable("not a P-256 key".into()))?
            .to_vec();
        Ok(BoundKeyPublic {
            jkt: sigil::bundle::jwk_thumbprint_p256(&sec1),
            spki: parsed.spki_der(),
            sec1,
            tpmt,
        })
    }
}

/// The AK's certification of a bound key (`TpmKeyCertification`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyCertification {
    /// TPMT_PUBLIC of the key.
    pub public: Vec<u8>,
    /// TPMS_ATTEST.
    pub certify_info: Vec<u8>,
    /// TPMT_SIGNATURE by the AK.
    pub signature: Vec<u8>,
}

/// Why a key operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyHolderError {
    /// This key cannot be used any more (the TPM was cleared, the blob is
    /// corrupt): make a new one.
    #[error("the workload key is unusable: {0}")]
    KeyUnusable(String),
    /// No attestation key to certify with (the node has not attested since
    /// the agent started).
    #[error("no attestation key yet")]
    NoAttestationKey,
    /// The TPM failed otherwise (busy, unreachable).
    #[error("TPM: {0}")]
    Failed(String),
}

/// Holds TPM-bound workload keys.
pub trait WorkloadKeyHolder: Send + Sync + 'static {
    /// Creates a new key in the TPM.
    fn create(&self) -> Result<BoundKeyBlob, KeyHolderError>;
    /// The certification of `key` by the AK of the node's latest
    /// attestation, for registration entry `entry_id` (qualifying data
    /// [`sigil::tpm::workload_key_qualifying_data`]).
    fn certify(
        &self,
        key: &BoundKeyBlob,
        entry_id: &str,
    ) -> Result<KeyCertification, KeyHolderError>;
    /// ECDSA-SHA256 over a SHA-256 digest, fixed `r || s`.
    fn sign(&self, key: &BoundKeyBlob, digest: &[u8; 32]) -> Result<[u8; 64], KeyHolderError>;
}
