//! Endorsement key, attestation key, credential activation and TPM2_Certify.

use super::agent_key::AgentKey;
use super::{Op, Tpm, TpmError, der};
use tss_esapi::abstraction::{AsymmetricAlgorithmSelection, ak, ek};
use tss_esapi::attributes::SessionAttributesBuilder;
use tss_esapi::constants::SessionType;
use tss_esapi::handles::{AuthHandle, KeyHandle, SessionHandle};
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, SignatureSchemeAlgorithm};
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::key_bits::RsaKeyBits;
use tss_esapi::interface_types::resource_handles::Hierarchy;
use tss_esapi::interface_types::session_handles::{AuthSession, PolicySession};
use tss_esapi::structures::{
    Data, EncryptedSecret, IdObject, Public, SignatureScheme, SymmetricDefinition,
};
use tss_esapi::traits::Marshall;
use tss_esapi::utils::TpmsContext;

/// NV index of the RSA 2048 EK certificate (TCG EK Credential Profile 2.3,
/// section 2.2.1.4).
pub const RSA_2048_EK_CERT_NV_INDEX: u32 = 0x01c0_0002;

const EK_ALG: AsymmetricAlgorithmSelection = AsymmetricAlgorithmSelection::Rsa(RsaKeyBits::Rsa2048);

/// An endorsement key and a fresh attestation key for one node attestation.
///
/// Neither stays loaded between TPM operations: both are kept as saved
/// contexts (TPM2_ContextSave) and loaded only inside one locked operation,
/// then flushed again. A TPM without a resource manager (swtpm holds three
/// transient objects) can then serve the agent key and workload keys while
/// an attestation waits for the server.
pub struct Attestation {
    tpm: Tpm,
    ek: TpmsContext,
    ak: SavedAk,
    ek_public: Public,
    ek_certificate: Option<Vec<u8>>,
}

impl std::fmt::Debug for Attestation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attestation")
            .field("has_ek_certificate", &self.ek_certificate.is_some())
            .finish_non_exhaustive()
    }
}

/// The attestation key of an attestation, kept as a saved context after
/// the attestation succeeded: it certifies TPM-bound workload keys for the
/// server (`X509SvidRequest.tpm_key`), which trusts it because the
/// credential activation bound it to this TPM's EK. Valid until the TPM is
/// reset (a reboot); the agent attests again at every start.
#[derive(Clone)]
pub struct SavedAk {
    context: TpmsContext,
    public: Public,
}

impl std::fmt::Debug for SavedAk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SavedAk")
    }
}

/// Loads a saved object context; the caller flushes the handle.
pub(super) fn load_saved(
    ctx: &mut tss_esapi::Context,
    saved: &TpmsContext,
    op: &'static str,
) -> Result<KeyHandle, TpmError> {
    ctx.context_load(saved.clone()).map(KeyHandle::from).op(op)
}

/// Saves the context of a loaded object and flushes it.
fn save_and_flush(
    ctx: &mut tss_esapi::Context,
    handle: KeyHandle,
    op: &'static str,
) -> Result<TpmsContext, TpmError> {
    let saved = ctx.context_save(handle.into()).op(op);
    if let Err(e) = ctx.flush_context(handle.into()) {
        tracing::warn!(error = %e, "could not flush a TPM object after saving it");
    }
    saved
}

/// Flushes `handle`, logging a failure.
pub(super) fn flush(ctx: &mut tss_esapi::Context, handle: KeyHandle) {
    if let Err(e) = ctx.flush_context(handle.into()) {
        tracing::warn!(error = %e, "could not flush a TPM object");
    }
}

fn marshall(p: &Public) -> Result<Vec<u8>, TpmError> {
    p.marshall().op("marshal TPMT_PUBLIC")
}

impl Tpm {
    /// Creates the EK (RSA 2048, TCG default template: the same key every
    /// time on the same TPM) and a fresh AK under it (ECC P-256,
    /// ECDSA-SHA256, restricted, sign, fixedTPM, fixedParent,
    /// sensitiveDataOrigin, userWithAuth), and reads the EK certificate
    /// from NV if there is one.
    pub fn start_attestation(&self) -> Result<Attestation, TpmError> {
        let mut ctx = self.lock();
        let ek_template = ek::create_ek_public_from_default_template_2(EK_ALG, None)
            .op("build the EK template")?;
        let ek = ctx
            .execute_with_nullauth_session(|c| {
                c.create_primary(Hierarchy::Endorsement, ek_template, None, None, None, None)
            })
            .op("create the EK")?;
        let ek_handle = ek.key_handle;
        let rest = (|| {
            let ak = ak::create_ak_2(
                &mut ctx,
                ek_handle,
                HashingAlgorithm::Sha256,
                AsymmetricAlgorithmSelection::Ecc(EccCurve::NistP256),
                SignatureSchemeAlgorithm::EcDsa,
                None,
                None,
            )
            .op("create the AK")?;
            let ak_public = ak.out_public.clone();
            let ak_handle = ak::load_ak(&mut ctx, ek_handle, None, ak.out_private, ak.out_public)
                .op("load the AK")?;
            let cert = read_ek_certificate(&mut ctx);
            Ok((ak_handle, ak_public, cert))
        })();
        let saved = rest.and_then(|(ak, ak_public, cert)| {
            let ak_ctx = save_and_flush(&mut ctx, ak, "save the AK context")?;
            Ok((ak_ctx, ak_public, cert))
        });
        let saved = saved.and_then(|(ak_ctx, ak_public, cert)| {
            let ek_ctx = save_and_flush(&mut ctx, ek_handle, "save the EK context")?;
            Ok((ek_ctx, ak_ctx, ak_public, cert))
        });
        match saved {
            Ok((ek_ctx, ak_ctx, ak_public, cert)) => {
                let ek_certificate = match cert {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "could not read the EK certificate; sending none");
                        None
                    }
                };
                drop(ctx);
                Ok(Attestation {
                    tpm: self.clone(),
                    ek: ek_ctx,
                    ak: SavedAk {
                        context: ak_ctx,
                        public: ak_public,
                    },
                    ek_public: ek.out_public,
                    ek_certificate,
                })
            }
            Err(e) => {
                // Whatever is still loaded goes (a flushed handle fails
                // harmlessly).
                let _ = ctx.flush_context(ek_handle.into());
                Err(e)
            }
        }
    }

    /// TPMT_PUBLIC of the EK (the key is created and flushed again).
    pub fn ek_public(&self) -> Result<Vec<u8>, TpmError> {
        let mut ctx = self.lock();
        let template = ek::create_ek_public_from_default_template_2(EK_ALG, None)
            .op("build the EK template")?;
        let ek = ctx
            .execute_with_nullauth_session(|c| {
                c.create_primary(Hierarchy::Endorsement, template, None, None, None, None)
            })
            .op("create the EK")?;
        let _ = ctx.flush_context(ek.key_handle.into());
        marshall(&ek.out_public)
    }

    /// Lowercase hex SHA-256 of the EK's DER SubjectPublicKeyInfo: the last
    /// segment of `spiffe://<td>/agent/tpm/<hash>` (computed by
    /// `sigil::tpm`, the same code the server runs).
    pub fn ek_hash(&self) -> Result<String, TpmError> {
        let ek = sigil::tpm::TpmPublic::parse(&self.ek_public()?)
            .map_err(|_| TpmError::Unexpected("the EK's TPMT_PUBLIC does not parse"))?;
        Ok(sigil::tpm::spki_hash(&ek.spki_der()))
    }
}

/// The DER EK certificate from NV, `None` if the index is not defined.
fn read_ek_certificate(ctx: &mut tss_esapi::Context) -> Result<Option<Vec<u8>>, TpmError> {
    use tss_esapi::constants::CapabilityType;
    use tss_esapi::structures::CapabilityData;
    let (data, _) = ctx
        .get_capability(CapabilityType::Handles, RSA_2048_EK_CERT_NV_INDEX, 1)
        .op("list NV indices")?;
    let defined = matches!(data, CapabilityData::Handles(ref l)
        if l.iter().any(|h| u32::from(*h) == RSA_2048_EK_CERT_NV_INDEX));
    if !defined {
        return Ok(None);
    }
    let mut cert = ek::retrieve_ek_pubcert(ctx, EK_ALG).op("read the EK certificate")?;
    // Some TPMs pad the NV index; keep exactly one DER element.
    let len = der::der_element_len(&cert)
        .ok_or(TpmError::Unexpected("the EK certificate in NV is not DER"))?;
    cert.truncate(len);
    Ok(Some(cert))
}

impl Attestation {
    /// TPMT_PUBLIC of the EK.
    pub fn ek_public(&self) -> Result<Vec<u8>, TpmError> {
        marshall(&self.ek_public)
    }

    /// TPMT_PUBLIC of the AK.
    pub fn ak_public(&self) -> Result<Vec<u8>, TpmError> {
        self.ak.public_tpmt()
    }

    /// The DER EK certificate from NV, if the TPM has one.
    pub fn ek_certificate(&self) -> Option<&[u8]> {
        self.ek_certificate.as_deref()
    }

    /// The AK, to keep for certifying workload keys once the server has
    /// accepted this attestation.
    pub fn ak(&self) -> SavedAk {
        self.ak.clone()
    }

    /// TPM2_ActivateCredential: the secret the server sealed to (EK, Name of
    /// the AK). `credential_blob` and `encrypted_secret` are the contents of
    /// the TPM2B_ID_OBJECT and TPM2B_ENCRYPTED_SECRET without the size (the
    /// two `TpmChallenge` fields). Fails if the challenge was not made for
    /// this EK and AK.
    pub fn activate_credential(
        &self,
        credential_blob: &[u8],
        encrypted_secret: &[u8],
    ) -> Result<Vec<u8>, TpmError> {
        let blob = IdObject::try_from(credential_blob).op("credential blob")?;
        let secret = EncryptedSecret::try_from(encrypted_secret).op("encrypted secret")?;
        let mut ctx = self.tpm.lock();
        let ek = load_saved(&mut ctx, &self.ek, "load the EK")?;
        let ak = match load_saved(&mut ctx, &self.ak.context, "load the AK") {
            Ok(ak) => ak,
            Err(e) => {
                flush(&mut ctx, ek);
                return Err(e);
            }
        };
        let out = activate(&mut ctx, ek, ak, blob, secret);
        flush(&mut ctx, ak);
        flush(&mut ctx, ek);
        out
    }

    /// TPM2_Certify of `key` by the AK with `extra_data` as qualifying data
    /// (the SHA-256 of the activated secret). Returns the marshalled
    /// TPMS_ATTEST and TPMT_SIGNATURE.
    pub fn certify(
        &self,
        key: &AgentKey,
        extra_data: &[u8],
    ) -> Result<(Vec<u8>, Vec<u8>), TpmError> {
        let mut ctx = self.tpm.lock();
        self.ak.certify_loaded(&mut ctx, key.handle(), extra_data)
    }
}

/// The ActivateCredential exchange on loaded `ek` and `ak`.
fn activate(
    ctx: &mut tss_esapi::Context,
    ek: KeyHandle,
    ak: KeyHandle,
    blob: IdObject,
    secret: EncryptedSecret,
) -> Result<Vec<u8>, TpmError> {
    // The EK's policy is PolicySecret(endorsement hierarchy): the EK is
    // used through a policy session that satisfies it; the AK through its
    // (empty) password.
    let session = ctx
        .start_auth_session(
            None,
            None,
            None,
            SessionType::Policy,
            SymmetricDefinition::AES_128_CFB,
            HashingAlgorithm::Sha256,
        )
        .op("start a policy session")?
        .ok_or(TpmError::Unexpected("no policy session"))?;
    let (attrs, mask) = SessionAttributesBuilder::new()
        .with_decrypt(true)
        .with_encrypt(true)
        .build();
    let out = ctx.execute_with_temporary_object(SessionHandle::from(session).into(), |c, _| {
        c.tr_sess_set_attributes(session, attrs, mask)?;
        let policy = PolicySession::try_from(session)?;
        c.execute_with_nullauth_session(|c| {
            c.policy_secret(
                policy,
                AuthHandle::Endorsement,
                Default::default(),
                Default::default(),
                Default::default(),
                None,
            )
        })?;
        c.execute_with_sessions((Some(AuthSession::Password), Some(session), None), |c| {
            c.activate_credential(ak, ek, blob, secret)
        })
    });
    Ok(out.op("activate the credential")?.value().to_vec())
}

impl SavedAk {
    /// TPMT_PUBLIC of the AK.
    pub fn public_tpmt(&self) -> Result<Vec<u8>, TpmError> {
        marshall(&self.public)
    }

    /// TPM2_Certify of the loaded object `key` by this AK with `extra_data`
    /// as qualifying data: (TPMS_ATTEST, TPMT_SIGNATURE), marshalled.
    pub(super) fn certify_loaded(
        &self,
        ctx: &mut tss_esapi::Context,
        key: KeyHandle,
        extra_data: &[u8],
    ) -> Result<(Vec<u8>, Vec<u8>), TpmError> {
        let data = Data::try_from(extra_data).op("qualifying data")?;
        let ak = load_saved(ctx, &self.context, "load the AK")?;
        let out = ctx
            .execute_with_sessions(
                (
                    Some(AuthSession::Password),
                    Some(AuthSession::Password),
                    None,
                ),
                |c| c.certify(key.into(), ak, data, SignatureScheme::Null),
            )
            .op("certify a key");
        flush(ctx, ak);
        let (attest, signature) = out?;
        Ok((
            attest.marshall().op("marshal TPMS_ATTEST")?,
            signature.marshall().op("marshal TPMT_SIGNATURE")?,
        ))
    }
}
