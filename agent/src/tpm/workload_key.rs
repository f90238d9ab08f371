//! TPM-bound workload keys: for registration entries with
//! `key_binding = "tpm"`, the workload's key is an ECC P-256 signing key
//! created in the TPM under the storage primary key, fixedTPM, fixedParent
//! and sensitiveDataOrigin: the TPM refuses to duplicate or export it, and
//! its private blob (kept in the agent's state) is encrypted by the TPM's
//! storage key, useless on any other TPM.
//!
//! Nothing here returns private material. A key is loaded only for one
//! operation (sign, certify) while the TPM lock is held and flushed again,
//! so any number of workload keys costs no TPM object slots at rest; after
//! the first load its saved context (TPM2_ContextSave) is kept in memory and
//! reloaded without the storage key (one command instead of three).

use super::agent_key::{checked_public, resident_signing_key_template, sign_loaded};
use super::attest::{SavedAk, flush, load_saved};
use super::{Op, Tpm, TpmError};
use std::sync::{Arc, Mutex, PoisonError};
use tss_esapi::handles::KeyHandle;
use tss_esapi::structures::{Private, Public};
use tss_esapi::traits::UnMarshall;
use tss_esapi::utils::TpmsContext;

/// A workload key held by the TPM. Cheap to clone.
#[derive(Clone)]
pub struct WorkloadKey(Arc<Inner>);

struct Inner {
    tpm: Tpm,
    public: Public,
    private: Private,
    tpmt: Vec<u8>,
    sec1: Vec<u8>,
    spki: Vec<u8>,
    /// The context saved after the first load; `None` until then, and
    /// again after it failed to load (the TPM was reset).
    saved: Mutex<Option<TpmsContext>>,
}

impl std::fmt::Debug for WorkloadKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkloadKey")
            .field("public_sec1_len", &self.0.sec1.len())
            .finish_non_exhaustive()
    }
}

impl Tpm {
    /// Creates a new workload key under the storage primary key. The key is
    /// not left loaded.
    pub fn create_workload_key(&self) -> Result<WorkloadKey, TpmError> {
        let template = resident_signing_key_template()?;
        let (public, private) = self.with_srk(|ctx, srk| {
            let created = ctx
                .execute_with_nullauth_session(|c| c.create(srk, template, None, None, None, None))
                .op("create a workload key")?;
            Ok((created.out_public, created.out_private))
        })?;
        self.workload_key(public, private)
    }

    /// A workload key from the blobs [`WorkloadKey::public_tpmt`] and
    /// [`WorkloadKey::private_blob`] returned earlier. Checks the public
    /// part (a TPM-resident P-256 signing key); whether this TPM can load
    /// the private part shows at the first operation.
    pub fn workload_key_from_blobs(
        &self,
        public_tpmt: &[u8],
        private: &[u8],
    ) -> Result<WorkloadKey, TpmError> {
        let public = Public::unmarshall(public_tpmt)
            .map_err(|_| TpmError::Unexpected("the workload key's TPMT_PUBLIC does not parse"))?;
        let private = Private::try_from(private.to_vec())
            .map_err(|_| TpmError::Unexpected("the workload key's private blob is malformed"))?;
        self.workload_key(public, private)
    }

    fn workload_key(&self, public: Public, private: Private) -> Result<WorkloadKey, TpmError> {
        let (tpmt, sec1, spki) = checked_public(&public).ok_or(TpmError::Unexpected(
            "the workload key is not a TPM-resident P-256 signing key",
        ))?;
        Ok(WorkloadKey(Arc::new(Inner {
            tpm: self.clone(),
            public,
            private,
            tpmt,
            sec1,
            spki,
            saved: Mutex::new(None),
        })))
    }
}

impl WorkloadKey {
    /// TPMT_PUBLIC of the key (`TpmKeyCertification.public`), to persist.
    pub fn public_tpmt(&self) -> &[u8] {
        &self.0.tpmt
    }

    /// The TPM2B_PRIVATE contents, to persist: encrypted by this TPM's
    /// storage key; no other TPM and no software can use it.
    pub fn private_blob(&self) -> &[u8] {
        self.0.private.value()
    }

    /// The uncompressed SEC1 public point.
    pub fn public_sec1(&self) -> &[u8] {
        &self.0.sec1
    }

    /// DER SubjectPublicKeyInfo.
    pub fn spki_der(&self) -> &[u8] {
        &self.0.spki
    }

    /// Runs `f` with the key loaded (from its saved context, or under the
    /// storage key), then flushes it.
    fn with_loaded<T>(
        &self,
        ctx: &mut tss_esapi::Context,
        f: impl FnOnce(&mut tss_esapi::Context, KeyHandle) -> Result<T, TpmError>,
    ) -> Result<T, TpmError> {
        let mut saved = self.0.saved.lock().unwrap_or_else(PoisonError::into_inner);
        let handle = match saved.as_ref() {
            Some(s) => match load_saved(ctx, s, "load a workload key context") {
                Ok(h) => Some(h),
                Err(e) => {
                    // A reset TPM invalidates saved contexts: load from the
                    // blobs again.
                    tracing::debug!(error = %e, "saved workload key context unusable");
                    *saved = None;
                    None
                }
            },
            None => None,
        };
        let handle = match handle {
            Some(h) => h,
            None => {
                let (public, private) = (self.0.public.clone(), self.0.private.clone());
                let h = self.0.tpm.with_srk_locked(ctx, |ctx, srk| {
                    ctx.execute_with_nullauth_session(|c| c.load(srk, private, public))
                        .op("load a workload key (was the TPM cleared?)")
                })?;
                match ctx.context_save(h.into()) {
                    Ok(s) => *saved = Some(s),
                    Err(e) => tracing::debug!(error = %e, "could not save a workload key context"),
                }
                h
            }
        };
        drop(saved);
        let out = f(ctx, handle);
        flush(ctx, handle);
        out
    }

    /// ECDSA-SHA256 signature by the TPM over a SHA-256 `digest`, as fixed
    /// `r || s` (64 bytes).
    pub fn sign_digest(&self, digest: &[u8; 32]) -> Result<[u8; 64], TpmError> {
        let mut ctx = self.0.tpm.lock();
        let (r, s) = self.with_loaded(&mut ctx, |ctx, h| sign_loaded(ctx, h, digest))?;
        let mut out = [0u8; 64];
        if r.len() > 32 || s.len() > 32 {
            return Err(TpmError::Unexpected("ECDSA signature values over 32 bytes"));
        }
        out[32 - r.len()..32].copy_from_slice(&r);
        out[64 - s.len()..].copy_from_slice(&s);
        Ok(out)
    }

    /// TPM2_Certify of this key by `ak` with `extra_data` as qualifying
    /// data: (TPMS_ATTEST, TPMT_SIGNATURE), marshalled.
    pub fn certify(&self, ak: &SavedAk, extra_data: &[u8]) -> Result<(Vec<u8>, Vec<u8>), TpmError> {
        let mut ctx = self.0.tpm.lock();
        self.with_loaded(&mut ctx, |ctx, h| ak.certify_loaded(ctx, h, extra_data))
    }

    /// The key's handle while loaded, for tests that try what the TPM must
    /// refuse (duplication). The handle is flushed when `f` returns.
    #[doc(hidden)]
    pub fn with_raw_handle<T>(
        &self,
        f: impl FnOnce(&mut tss_esapi::Context, KeyHandle) -> T,
    ) -> Result<T, TpmError> {
        let mut ctx = self.0.tpm.lock();
        self.with_loaded(&mut ctx, |ctx, h| Ok(f(ctx, h)))
    }
}
