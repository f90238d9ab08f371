//! TPM node attestation over the node API: two `Attest` rounds.
//!
//! Round 1 sends the EK, its certificate (if the TPM has one) and a fresh
//! AK; the server answers with a MakeCredential challenge. Round 2 sends the
//! activated secret and the AK's TPM2_Certify of the agent key, with
//! qualifying data SHA-256(secret); the server issues the agent SVID for the
//! agent key. The agent's ID is `spiffe://<td>/agent/tpm/<EK hash>`.
//!
//! The same exchange renews the agent SVID ([`Reattestor`]): a TPM agent
//! does not call `RenewAgent`.

use super::{AgentKey, SavedAk, Tpm, TpmError, WorkloadKey};
use crate::bound_keys::{BoundKeyBlob, KeyCertification, KeyHolderError, WorkloadKeyHolder};
use crate::cache::{Reattested, Reattestor};
use crate::node_client::NodeClient;
use futures::future::BoxFuture;
use sigil::proto::node::v1 as pb;
use sigil::source::SharedBundles;
use sigil::{SpiffeId, TrustDomain, X509Svid};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

/// Why TPM attestation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TpmAttestError {
    /// The TPM failed.
    #[error(transparent)]
    Tpm(#[from] TpmError),
    /// The server refused or could not be reached.
    #[error("attestation refused: {} ({:?})", .0.message(), .0.code())]
    Rpc(#[from] tonic::Status),
    /// The server's answer is not what the protocol says.
    #[error("invalid attestation answer: {0}")]
    Invalid(String),
}

/// Attests this node with its TPM.
#[derive(Clone, Debug)]
pub struct TpmNodeAttestor {
    tpm: Tpm,
    key: AgentKey,
    server: String,
    td: TrustDomain,
    agent_id: SpiffeId,
    /// The AK of the latest attestation the server accepted.
    ak: Arc<Mutex<Option<SavedAk>>>,
}

/// A successful attestation.
#[derive(Debug, Clone)]
pub struct TpmAttested {
    /// The agent SVID, checked against the agent key and the expected ID.
    pub svid: Reattested,
    /// The agent's SPIFFE ID.
    pub agent_id: SpiffeId,
    /// Assurance level the server granted.
    pub assurance_level: String,
    /// The trust domain's bundle (SPIFFE JSON) the server sent.
    pub bundle: String,
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, TpmError> + Send + 'static,
) -> Result<T, TpmAttestError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| TpmAttestError::Invalid(format!("TPM task failed: {e}")))?
        .map_err(Into::into)
}

impl TpmNodeAttestor {
    /// An attestor for the trust domain `td` served at `server`
    /// (`HOST:PORT`), with `key` as the agent SVID's key. Reads the EK to
    /// know the agent's ID.
    pub async fn new(
        tpm: Tpm,
        key: AgentKey,
        server: &str,
        td: TrustDomain,
    ) -> Result<Self, TpmAttestError> {
        let t = tpm.clone();
        let ek_hash = blocking(move || t.ek_hash()).await?;
        let agent_id = td
            .id(&format!("/agent/tpm/{ek_hash}"))
            .map_err(|e| TpmAttestError::Invalid(e.to_string()))?;
        Ok(Self {
            tpm,
            key,
            server: server.to_owned(),
            td,
            agent_id,
            ak: Arc::new(Mutex::new(None)),
        })
    }

    /// The holder of this node's TPM-bound workload keys, certifying with
    /// the AK of the latest accepted attestation.
    pub fn workload_keys(&self) -> TpmWorkloadKeys {
        TpmWorkloadKeys {
            tpm: self.tpm.clone(),
            ak: self.ak.clone(),
            loaded: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// The ID this node attests as.
    pub fn agent_id(&self) -> &SpiffeId {
        &self.agent_id
    }

    /// Runs both rounds against the server, authenticated with `bundles`
    /// (no client certificate).
    pub async fn attest(&self, bundles: Arc<SharedBundles>) -> Result<TpmAttested, TpmAttestError> {
        let mut api = NodeClient::new(&self.server, &self.td, bundles, None)
            .map_err(|e| TpmAttestError::Invalid(e.to_string()))?
            .api();
        let tpm = self.tpm.clone();
        let att = blocking(move || tpm.start_attestation()).await?;
        let round1 = pb::TpmAttestation {
            ek_public: att.ek_public()?,
            ek_certificate: att.ek_certificate().map(<[u8]>::to_vec).unwrap_or_default(),
            ak_public: att.ak_public()?,
        };
        let resp = api
            .attest(pb::AttestRequest {
                method: Some(pb::attest_request::Method::Tpm(round1)),
                public_key: Vec::new(),
            })
            .await?
            .into_inner();
        let Some(pb::attest_response::Result::Challenge(challenge)) = resp.result else {
            return Err(TpmAttestError::Invalid(
                "the server did not answer the TPM attestation with a challenge".into(),
            ));
        };
        let Some(tpm_challenge) = challenge.tpm else {
            return Err(TpmAttestError::Invalid(
                "the challenge has no TPM part".into(),
            ));
        };
        let key = self.key.clone();
        let ak = att.ak();
        let (att, secret, certify_info, signature) = blocking(move || {
            let secret = att.activate_credential(
                &tpm_challenge.credential_blob,
                &tpm_challenge.encrypted_secret,
            )?;
            let nonce = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &secret);
            let (info, sig) = att.certify(&key, nonce.as_ref())?;
            Ok((att, secret, info, sig))
        })
        .await?;
        // The EK and AK are not needed any more: free their TPM slots.
        drop(att);
        let resp = api
            .attest(pb::AttestRequest {
                method: Some(pb::attest_request::Method::ChallengeResponse(
                    pb::ChallengeResponse {
                        session_id: challenge.session_id,
                        response: secret,
                        agent_key: Some(pb::TpmKeyCertification {
                            public: self.key.public_tpmt().to_vec(),
                            certify_info,
                            signature,
                        }),
                    },
                )),
                public_key: self.key.spki_der().to_vec(),
            })
            .await?
            .into_inner();
        let Some(pb::attest_response::Result::Svid(svid)) = resp.result else {
            return Err(TpmAttestError::Invalid(
                "the server answered the challenge without an agent SVID".into(),
            ));
        };
        let chain: Vec<_> = svid.cert_chain.into_iter().map(Into::into).collect();
        let (id, not_after) = X509Svid::check_external_key(&chain, self.key.public_sec1())
            .map_err(|e| TpmAttestError::Invalid(format!("agent SVID: {e}")))?;
        if id != self.agent_id {
            return Err(TpmAttestError::Invalid(format!(
                "agent SVID is for {id}, expected {}",
                self.agent_id
            )));
        }
        // The server accepted this AK: it certifies workload keys from now on.
        *self.ak.lock().unwrap_or_else(PoisonError::into_inner) = Some(ak);
        Ok(TpmAttested {
            svid: Reattested {
                chain,
                not_after,
                assurance_level: svid.assurance_level.clone(),
            },
            agent_id: id,
            assurance_level: svid.assurance_level,
            bundle: resp.bundle,
        })
    }
}

impl Reattestor for TpmNodeAttestor {
    fn signing_key(&self) -> Arc<dyn rustls::sign::SigningKey> {
        self.key.rustls_signing_key()
    }

    fn reattest(&self, bundles: Arc<SharedBundles>) -> BoxFuture<'_, Result<Reattested, String>> {
        Box::pin(async move {
            let done = self.attest(bundles).await.map_err(|e| e.to_string())?;
            tracing::info!(agent_id = %done.agent_id, level = %done.assurance_level, "attested again with the TPM");
            Ok(done.svid)
        })
    }
}

/// The TPM-bound workload keys of a TPM agent ([`WorkloadKeyHolder`]).
#[derive(Clone)]
pub struct TpmWorkloadKeys {
    tpm: Tpm,
    ak: Arc<Mutex<Option<SavedAk>>>,
    /// Parsed keys (with their saved contexts) by TPMT_PUBLIC.
    loaded: Arc<Mutex<HashMap<String, WorkloadKey>>>,
}

impl std::fmt::Debug for TpmWorkloadKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TpmWorkloadKeys")
    }
}

/// Upper bound on parsed keys kept in memory (one per bound entry).
const MAX_LOADED_KEYS: usize = 4096;

fn holder_error(e: TpmError) -> KeyHolderError {
    match e {
        // The private blob no longer loads under this TPM's storage key.
        TpmError::Command { op, .. } if op.starts_with("load a workload key") => {
            KeyHolderError::KeyUnusable(e.to_string())
        }
        TpmError::Unexpected(_) | TpmError::CorruptBlob(_) => {
            KeyHolderError::KeyUnusable(e.to_string())
        }
        _ => KeyHolderError::Failed(e.to_string()),
    }
}

impl TpmWorkloadKeys {
    fn key(&self, blob: &BoundKeyBlob) -> Result<WorkloadKey, KeyHolderError> {
        let mut loaded = self.loaded.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(k) = loaded.get(&blob.public) {
            return Ok(k.clone());
        }
        let (public, private) = blob.raw()?;
        let key = self
            .tpm
            .workload_key_from_blobs(&public, &private)
            .map_err(holder_error)?;
        if loaded.len() >= MAX_LOADED_KEYS {
            loaded.clear();
        }
        loaded.insert(blob.public.clone(), key.clone());
        Ok(key)
    }
}

impl WorkloadKeyHolder for TpmWorkloadKeys {
    fn create(&self) -> Result<BoundKeyBlob, KeyHolderError> {
        let key = self.tpm.create_workload_key().map_err(holder_error)?;
        let blob = BoundKeyBlob::new(key.public_tpmt(), key.private_blob());
        self.loaded
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(blob.public.clone(), key);
        Ok(blob)
    }

    fn certify(
        &self,
        blob: &BoundKeyBlob,
        entry_id: &str,
    ) -> Result<KeyCertification, KeyHolderError> {
        let ak = self
            .ak
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .ok_or(KeyHolderError::NoAttestationKey)?;
        let key = self.key(blob)?;
        let extra = sigil::tpm::workload_key_qualifying_data(entry_id);
        let (certify_info, signature) = key.certify(&ak, &extra).map_err(holder_error)?;
        Ok(KeyCertification {
            public: key.public_tpmt().to_vec(),
            certify_info,
            signature,
        })
    }

    fn sign(&self, blob: &BoundKeyBlob, digest: &[u8; 32]) -> Result<[u8; 64], KeyHolderError> {
        self.key(blob)?.sign_digest(digest).map_err(holder_error)
    }
}
