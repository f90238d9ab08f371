//! The agent SVID's key: an ECC P-256 signing key that never leaves the TPM.

use super::{Op, Tpm, TpmError, der};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tss_esapi::attributes::ObjectAttributesBuilder;
use tss_esapi::constants::tss::{TPM2_RH_NULL, TPM2_ST_HASHCHECK};
use tss_esapi::handles::KeyHandle;
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, PublicAlgorithm};
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::resource_handles::Hierarchy;
use tss_esapi::interface_types::session_handles::AuthSession;
use tss_esapi::structures::{
    Digest, EccParameter, EccPoint, EccScheme, HashScheme, HashcheckTicket,
    KeyDerivationFunctionScheme, Private, Public, PublicBuilder, PublicEccParametersBuilder,
    Signature, SignatureScheme, SymmetricDefinitionObject,
};
use tss_esapi::traits::{Marshall, UnMarshall};
use tss_esapi::tss2_esys::TPMT_TK_HASHCHECK;

/// The agent key's TPMT_PUBLIC in the data dir.
pub const AGENT_KEY_PUB: &str = "tpm-agent-key.pub";
/// The agent key's TPM2B_PRIVATE contents in the data dir: encrypted by the
/// TPM's storage primary key, usable only by this TPM.
pub const AGENT_KEY_PRIV: &str = "tpm-agent-key.priv";

/// The storage primary key (SRK): ECC P-256, the TCG provisioning guide's
/// template (restricted decrypt, AES-128-CFB, noDA, zero unique), so the
/// same TPM recreates the same key after a restart.
fn srk_template() -> Result<Public, TpmError> {
    let attrs = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_no_da(true)
        .with_restricted(true)
        .with_decrypt(true)
        .build()
        .op("SRK attributes")?;
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Ecc)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attrs)
        .with_ecc_parameters(
            PublicEccParametersBuilder::new()
                .with_symmetric(SymmetricDefinitionObject::AES_128_CFB)
                .with_ecc_scheme(EccScheme::Null)
                .with_curve(EccCurve::NistP256)
                .with_key_derivation_function_scheme(KeyDerivationFunctionScheme::Null)
                .with_is_decryption_key(true)
                .with_restricted(true)
                .build()
                .op("SRK parameters")?,
        )
        .with_ecc_unique_identifier(EccPoint::new(
            EccParameter::try_from(vec![0u8; 32]).op("SRK unique")?,
            EccParameter::try_from(vec![0u8; 32]).op("SRK unique")?,
        ))
        .build()
        .op("SRK template")
}

/// The agent key and TPM-bound workload keys: ECC P-256, ECDSA-SHA256, sign
/// (not decrypt, not restricted), fixedTPM, fixedParent,
/// sensitiveDataOrigin, userWithAuth.
pub(super) fn resident_signing_key_template() -> Result<Public, TpmError> {
    let attrs = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_sign_encrypt(true)
        .with_decrypt(false)
        .with_restricted(false)
        .build()
        .op("agent key attributes")?;
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Ecc)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attrs)
        .with_ecc_parameters(
            PublicEccParametersBuilder::new()
                .with_symmetric(SymmetricDefinitionObject::Null)
                .with_ecc_scheme(EccScheme::EcDsa(HashScheme::new(HashingAlgorithm::Sha256)))
                .with_curve(EccCurve::NistP256)
                .with_key_derivation_function_scheme(KeyDerivationFunctionScheme::Null)
                .with_is_signing_key(true)
                .with_is_decryption_key(false)
                .with_restricted(false)
                .build()
                .op("agent key parameters")?,
        )
        .with_ecc_unique_identifier(EccPoint::default())
        .build()
        .op("agent key template")
}

/// The agent's TPM-resident signing key. Cheap to clone; flushed from the
/// TPM when the last clone is dropped. No method returns private material.
#[derive(Clone)]
pub struct AgentKey(Arc<Inner>);

struct Inner {
    tpm: Tpm,
    handle: KeyHandle,
    tpmt: Vec<u8>,
    sec1: Vec<u8>,
    spki: Vec<u8>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Err(e) = self.tpm.lock().flush_context(self.handle.into()) {
            tracing::warn!(error = %e, "could not flush the agent key");
        }
    }
}

impl std::fmt::Debug for AgentKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentKey")
            .field("spki_sha256", &hex_sha256(&self.0.spki))
            .finish()
    }
}

fn hex_sha256(b: &[u8]) -> String {
    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, b)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The key's TPMT_PUBLIC, checked with `sigil::tpm` (the server's own
/// checks): an ECC P-256 unrestricted signing key, fixedTPM, fixedParent,
/// sensitiveDataOrigin. Returns (TPMT_PUBLIC, SEC1 point, SPKI).
pub(super) fn checked_public(public: &Public) -> Option<(Vec<u8>, Vec<u8>, Vec<u8>)> {
    let tpmt = public.marshall().ok()?;
    let parsed = sigil::tpm::TpmPublic::parse(&tpmt).ok()?;
    parsed.check_resident_signing_key().ok()?;
    let sec1 = parsed.p256_point()?.to_vec();
    Some((tpmt, sec1, parsed.spki_der()))
}

pub(super) fn write_private(path: &Path, bytes: &[u8]) -> Result<(), TpmError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let blob_err = |source| TpmError::Blob {
        path: path.to_owned(),
        source,
    };
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(blob_err)?;
    f.write_all(bytes).map_err(blob_err)?;
    f.sync_all().map_err(blob_err)?;
    std::fs::rename(&tmp, path).map_err(blob_err)
}

impl Tpm {
    pub(super) fn with_srk<T>(
        &self,
        f: impl FnOnce(&mut tss_esapi::Context, KeyHandle) -> Result<T, TpmError>,
    ) -> Result<T, TpmError> {
        self.with_srk_locked(&mut self.lock(), f)
    }

    /// [`Self::with_srk`] for a caller that holds the TPM lock.
    pub(super) fn with_srk_locked<T>(
        &self,
        ctx: &mut tss_esapi::Context,
        f: impl FnOnce(&mut tss_esapi::Context, KeyHandle) -> Result<T, TpmError>,
    ) -> Result<T, TpmError> {
        let template = srk_template()?;
        let srk = ctx
            .execute_with_nullauth_session(|c| {
                c.create_primary(Hierarchy::Owner, template, None, None, None, None)
            })
            .op("create the storage primary key")?
            .key_handle;
        let out = f(ctx, srk);
        // A loaded child stays usable after its parent is flushed.
        if let Err(e) = ctx.flush_context(srk.into()) {
            tracing::warn!(error = %e, "could not flush the storage primary key");
        }
        out
    }

    /// Loads the agent key saved in `dir`, or creates one and saves its
    /// blobs there (mode 0600) if there is none, or if the saved one is
    /// incomplete, corrupt or not loadable (the TPM's owner hierarchy was
    /// cleared). Replacing the key is safe: every attestation certifies the
    /// current key with the AK, and the agent attests at every start.
    pub fn load_or_create_agent_key(&self, dir: &Path) -> Result<AgentKey, TpmError> {
        let (pub_path, priv_path) = (dir.join(AGENT_KEY_PUB), dir.join(AGENT_KEY_PRIV));
        if pub_path.exists() || priv_path.exists() {
            match self.load_agent_key(dir) {
                Ok(key) => return Ok(key),
                Err(
                    e @ (TpmError::Blob { .. }
                    | TpmError::CorruptBlob(_)
                    | TpmError::Command { .. }),
                ) => {
                    tracing::warn!(error = %e, "the saved TPM agent key cannot be used; creating a new one");
                }
                Err(e) => return Err(e),
            }
        }
        let template = resident_signing_key_template()?;
        let (public, private, handle) = self.with_srk(|ctx, srk| {
            let created = ctx
                .execute_with_nullauth_session(|c| c.create(srk, template, None, None, None, None))
                .op("create the agent key")?;
            let handle = ctx
                .execute_with_nullauth_session(|c| {
                    c.load(srk, created.out_private.clone(), created.out_public.clone())
                })
                .op("load the agent key")?;
            Ok((created.out_public, created.out_private, handle))
        })?;
        let key = self.agent_key(handle, public)?;
        write_private(&priv_path, private.value())?;
        write_private(&pub_path, &key.0.tpmt)?;
        tracing::info!(key = ?key, "created a TPM agent key");
        Ok(key)
    }

    /// Loads the agent key saved in `dir` (after a restart).
    pub fn load_agent_key(&self, dir: &Path) -> Result<AgentKey, TpmError> {
        let (pub_path, priv_path) = (dir.join(AGENT_KEY_PUB), dir.join(AGENT_KEY_PRIV));
        let read = |p: &PathBuf| {
            std::fs::read(p).map_err(|source| TpmError::Blob {
                path: p.clone(),
                source,
            })
        };
        let public = Public::unmarshall(&read(&pub_path)?)
            .map_err(|_| TpmError::CorruptBlob(pub_path.clone()))?;
        let private = Private::try_from(read(&priv_path)?)
            .map_err(|_| TpmError::CorruptBlob(priv_path.clone()))?;
        if checked_public(&public).is_none() {
            return Err(TpmError::CorruptBlob(pub_path));
        }
        let handle = self.with_srk(|ctx, srk| {
            ctx.execute_with_nullauth_session(|c| c.load(srk, private, public.clone()))
                .op("load the agent key (was the TPM cleared?)")
        })?;
        self.agent_key(handle, public)
    }

    fn agent_key(&self, handle: KeyHandle, public: Public) -> Result<AgentKey, TpmError> {
        let Some((tpmt, sec1, spki)) = checked_public(&public) else {
            let _ = self.lock().flush_context(handle.into());
            return Err(TpmError::Unexpected(
                "the agent key is not a TPM-resident P-256 signing key",
            ));
        };
        Ok(AgentKey(Arc::new(Inner {
            tpm: self.clone(),
            handle,
            tpmt,
            sec1,
            spki,
        })))
    }
}

impl AgentKey {
    pub(super) fn handle(&self) -> KeyHandle {
        self.0.handle
    }

    /// The key's handle in the TPM context, for [`Tpm::with_raw_context`].
    #[doc(hidden)]
    pub fn raw_handle(&self) -> KeyHandle {
        self.0.handle
    }

    /// TPMT_PUBLIC of the key (`TpmKeyCertification.public`).
    pub fn public_tpmt(&self) -> &[u8] {
        &self.0.tpmt
    }

    /// The uncompressed SEC1 public point.
    pub fn public_sec1(&self) -> &[u8] {
        &self.0.sec1
    }

    /// DER SubjectPublicKeyInfo (`AttestRequest.public_key`).
    pub fn spki_der(&self) -> &[u8] {
        &self.0.spki
    }

    /// ECDSA-SHA256 signature by the TPM over a SHA-256 `digest`, DER.
    pub fn sign_digest(&self, digest: &[u8; 32]) -> Result<Vec<u8>, TpmError> {
        let (r, s) = sign_loaded(&mut self.0.tpm.lock(), self.0.handle, digest)?;
        Ok(der::ecdsa_sig_der(&r, &s))
    }

    /// A rustls signing key backed by this TPM key (ECDSA P-256 SHA-256),
    /// for TLS client authentication.
    pub fn rustls_signing_key(&self) -> Arc<dyn rustls::sign::SigningKey> {
        Arc::new(TpmSigningKey(self.clone()))
    }
}

/// TPM2_Sign with the loaded key `handle` over a SHA-256 `digest`
/// (ECDSA-SHA256, password session): (r, s) as the TPM returned them.
pub(super) fn sign_loaded(
    ctx: &mut tss_esapi::Context,
    handle: KeyHandle,
    digest: &[u8; 32],
) -> Result<(Vec<u8>, Vec<u8>), TpmError> {
    let d = Digest::try_from(digest.as_slice()).op("digest")?;
    let ticket = HashcheckTicket::try_from(TPMT_TK_HASHCHECK {
        tag: TPM2_ST_HASHCHECK,
        hierarchy: TPM2_RH_NULL,
        digest: Default::default(),
    })
    .op("null hashcheck ticket")?;
    let scheme = SignatureScheme::EcDsa {
        hash_scheme: HashScheme::new(HashingAlgorithm::Sha256),
    };
    let sig = ctx
        .execute_with_session(Some(AuthSession::Password), |c| {
            c.sign(handle, d, scheme, ticket)
        })
        .op("sign")?;
    let Signature::EcDsa(sig) = sig else {
        return Err(TpmError::Unexpected("the TPM signed with another scheme"));
    };
    Ok((
        sig.signature_r().value().to_vec(),
        sig.signature_s().value().to_vec(),
    ))
}

/// rustls [`SigningKey`](rustls::sign::SigningKey) over an [`AgentKey`]:
/// hashes the handshake message with SHA-256 and signs the digest in the
/// TPM. Each signature blocks the calling thread for one TPM command.
#[derive(Debug, Clone)]
pub struct TpmSigningKey(pub AgentKey);

impl rustls::sign::SigningKey for TpmSigningKey {
    fn choose_scheme(
        &self,
        offered: &[rustls::SignatureScheme],
    ) -> Option<Box<dyn rustls::sign::Signer>> {
        offered
            .contains(&rustls::SignatureScheme::ECDSA_NISTP256_SHA256)
            .then(|| Box::new(self.clone()) as Box<dyn rustls::sign::Signer>)
    }

    fn public_key(&self) -> Option<rustls::pki_types::SubjectPublicKeyInfoDer<'_>> {
        Some(self.0.spki_der().into())
    }

    fn algorithm(&self) -> rustls::SignatureAlgorithm {
        rustls::SignatureAlgorithm::ECDSA
    }
}

impl rustls::sign::Signer for TpmSigningKey {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, message);
        let digest: [u8; 32] = digest
            .as_ref()
            .try_into()
            .map_err(|_| rustls::Error::General("SHA-256 digest is not 32 bytes".into()))?;
        self.0.sign_digest(&digest).map_err(|e| {
            tracing::warn!(error = %e, "TPM signature for TLS failed");
            rustls::Error::General("TPM signature failed".into())
        })
    }

    fn scheme(&self) -> rustls::SignatureScheme {
        rustls::SignatureScheme::ECDSA_NISTP256_SHA256
    }
}
