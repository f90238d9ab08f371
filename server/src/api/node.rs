//! The node API (`sigil.node.v1`), served over TLS 1.3.
//!
//! Every handler runs validate → authenticate → authorize → act → audit.
//! `Attest` is the only unauthenticated RPC. Every other RPC authenticates
//! the caller **on each call** from the client certificate of its TLS
//! connection: the chain must verify against the current bundle *now*
//! (so an expired SVID on a long-lived connection stops working), the ID
//! must be an agent ID, and the store must say that agent is active and
//! that this certificate's serial is its current one. Eviction, banning and
//! renewal therefore take effect on connections that are already open.
//!
//! The caller sees a short message and the right status code; the audit
//! log gets the detail.
//!
//! TPM-bound entries (`key_binding = tpm`): every TPM attestation records
//! the AK in the agent's record. `SignX509Svids` issues for such an entry
//! only a key that AK certified (`TPM2_Certify`) with qualifying data
//! [`workload_key_qualifying_data`] of the entry, a key that is fixedTPM,
//! fixedParent and TPM-generated, and records that key's RFC 7638
//! thumbprint for (agent, entry) before answering. `MintJwtSvid` binds a
//! token (`cnf.jkt`) for such an entry only to that recorded thumbprint.

use crate::audit::AuditEvent;
use crate::authz::{self, AuthzError};
use crate::ca::CaError;
use crate::model::{Agent, AgentStatus, Entry, KeyBinding, WorkloadKey, hex, now_unix, sha256};
use crate::state::{ServerState, request_id};
use crate::store::{SpendOutcome, StoreError};
use crate::tls::PeerCerts;
use crate::tpm::BeginError;
use sigil::assurance::methods;
use sigil::proto::node::v1 as pb;
use sigil::svid::jwt::{Confirmation, JwtSvidClaims, random_jti};
use sigil::tpm::{TpmError, TpmPublic, spki_hash, verify_certify, workload_key_qualifying_data};
use sigil::{AssuranceLevel, SpiffeId, verify_x509_svid};
use std::sync::Arc;
use subtle::ConstantTimeEq;
use tonic::{Request, Response, Status};

/// Most SVIDs one `SignX509Svids` call may ask for.
pub const MAX_BATCH: usize = 1000;

/// Whether the DER SubjectPublicKeyInfo `spki_der` is an ECDSA P-256 key
/// and the very point of the TPM key `key`.
fn is_tpm_key(spki_der: &[u8], key: &TpmPublic) -> bool {
    crate::ca::parse_p256_spki(spki_der).is_ok_and(|spki| {
        use rcgen::PublicKeyData;
        key.p256_point()
            .is_some_and(|point| spki.der_bytes() == point.as_slice())
    })
}

/// Why the TPM certification of a workload key (`X509SvidRequest.tpm_key`)
/// was refused. The message is the per-result error and the audit reason.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
enum WorkloadKeyError {
    /// A TPM-bound entry, and no certification.
    #[error(
        "entry requires a TPM-bound key: tpm_key (the AK's certification of the workload key) is required"
    )]
    Missing,
    /// A certification for an entry without key binding.
    #[error("tpm_key is only for entries with a TPM key binding")]
    Unbound,
    /// The agent's record holds no AK (attested before AKs were recorded).
    #[error("no attestation key is recorded for this agent: it must attest again")]
    NoAk,
    /// The recorded AK does not parse (a corrupt record).
    #[error("the agent's recorded attestation key is unusable: {0}")]
    BadRecordedAk(TpmError),
    /// The certified key is malformed or may leave the TPM.
    #[error("workload key refused: {0}")]
    Key(TpmError),
    /// The certification does not verify against the agent's AK and the
    /// entry's qualifying data.
    #[error("workload key certification refused: {0}")]
    Certification(TpmError),
    /// The SVID's key is not the certified key.
    #[error("public_key (or the CSR's key) is not the TPM key the AK certified")]
    NotCertifiedKey,
}

/// Verifies that `cert` proves the workload key with SubjectPublicKeyInfo
/// `spki` lives in the TPM of `agent` (certified by its recorded AK, for
/// `entry`); returns the key's RFC 7638 thumbprint. Does not check that
/// the agent may have SVIDs for the entry.
fn verify_workload_key(
    agent: &Agent,
    entry: &Entry,
    cert: &pb::TpmKeyCertification,
    spki: &[u8],
) -> Result<String, WorkloadKeyError> {
    let ak = agent.tpm_ak.as_deref().ok_or(WorkloadKeyError::NoAk)?;
    let ak = TpmPublic::parse(ak).map_err(WorkloadKeyError::BadRecordedAk)?;
    let key = TpmPublic::parse(&cert.public)
        .and_then(|k| k.check_resident_signing_key().map(|()| k))
        .map_err(WorkloadKeyError::Key)?;
    verify_certify(
        &ak,
        &key,
        &cert.certify_info,
        &cert.signature,
        &workload_key_qualifying_data(&entry.id),
    )
    .map_err(WorkloadKeyError::Certification)?;
    if !is_tpm_key(spki, &key) {
        return Err(WorkloadKeyError::NotCertifiedKey);
    }
    // check_resident_signing_key admitted ECC P-256 keys only.
    let point = key.p256_point().ok_or(WorkloadKeyError::NotCertifiedKey)?;
    Ok(sigil::bundle::jwk_thumbprint_p256(&point))
}

/// The node API service.
#[derive(Debug, Clone)]
pub struct NodeApi {
    state: Arc<ServerState>,
}

impl NodeApi {
    /// A service over `state`.
    pub fn new(state: Arc<ServerState>) -> Self {
        Self { state }
    }
}

/// An agent authenticated for this call.
#[derive(Debug)]
struct Caller {
    agent: Agent,
    request_id: String,
}

impl Caller {
    fn event(&self, method: &str) -> AuditEvent {
        AuditEvent {
            request_id: self.request_id.clone(),
            caller: self.agent.spiffe_id.to_string(),
            method: method.into(),
            assurance: Some(self.agent.assurance.acr().into()),
            ..AuditEvent::default()
        }
    }
}

fn store_status(e: StoreError) -> Status {
    tracing::error!(error = %e, "store error");
    Status::internal("internal error")
}

fn ca_status(e: CaError) -> Status {
    match e {
        CaError::BadPublicKey => Status::invalid_argument(e.to_string()),
        other => {
            tracing::error!(error = %other, "CA error");
            Status::internal("internal error")
        }
    }
}

impl From<AuthzError> for Status {
    fn from(e: AuthzError) -> Self {
        Status::permission_denied(e.to_string())
    }
}

fn unavailable_audit() -> Status {
    Status::unavailable("audit log unavailable; nothing was issued")
}

impl NodeApi {
    fn audit_denied(&self, mut ev: AuditEvent, reason: impl Into<String>) {
        ev.outcome = "denied";
        ev.reason = Some(reason.into());
        let _ = self.state.audit(&ev);
    }

    /// Authenticates the calling agent from its TLS client certificate and
    /// the store, on every call.
    fn authenticate<T>(&self, req: &Request<T>, method: &str) -> Result<Caller, Status> {
        let rid = request_id();
        let base = AuditEvent {
            request_id: rid.clone(),
            caller: "unauthenticated".into(),
            method: method.into(),
            ..AuditEvent::default()
        };
        let Some(chain) = req
            .extensions()
            .get::<PeerCerts>()
            .and_then(|p| p.0.clone())
        else {
            self.audit_denied(base, "no client certificate");
            return Err(Status::unauthenticated("an agent SVID is required"));
        };
        let verified = match verify_x509_svid(
            &chain,
            &self.state.bundle_set(),
            std::time::SystemTime::now(),
            &|id: &SpiffeId| id.path().starts_with("/agent/"),
        ) {
            Ok(v) => v,
            Err(e) => {
                self.audit_denied(base, format!("client certificate refused: {e}"));
                return Err(Status::unauthenticated("agent SVID refused"));
            }
        };
        let id = verified.spiffe_id().clone();
        let mut base = base;
        base.caller = id.to_string();
        let serial = chain
            .first()
            .and_then(|c| x509_parser::parse_x509_certificate(c).ok())
            .map(|(_, c)| hex(c.raw_serial()))
            .unwrap_or_default();
        let agent = match self.state.store.agent(&id).map_err(store_status)? {
            Some(a) => a,
            None => {
                self.audit_denied(base, "unknown agent");
                return Err(Status::permission_denied("agent is not active"));
            }
        };
        if agent.status != AgentStatus::Active {
            self.audit_denied(base, format!("agent is {}", agent.status.as_str()));
            return Err(Status::permission_denied("agent is not active"));
        }
        if agent.serial != serial {
            self.audit_denied(base, "agent SVID is not the current one");
            return Err(Status::permission_denied("agent SVID is not current"));
        }
        Ok(Caller {
            agent,
            request_id: rid,
        })
    }

    fn agent_svid(
        &self,
        issued: &crate::ca::Issued,
        id: &SpiffeId,
        l: AssuranceLevel,
    ) -> pb::AgentSvid {
        pb::AgentSvid {
            spiffe_id: id.to_string(),
            cert_chain: issued.chain.iter().map(|c| c.to_vec()).collect(),
            expires_at: issued.not_after,
            assurance_level: l.acr().into(),
        }
    }

    /// TPM attestation, round 1: check the EK (certificate or allow-list)
    /// and the AK, then challenge the TPM with MakeCredential.
    fn attest_tpm_begin(
        &self,
        mut ev: AuditEvent,
        t: pb::TpmAttestation,
    ) -> Result<Response<pb::AttestResponse>, Status> {
        ev.amr = vec![methods::TPM.into()];
        let ek = match TpmPublic::parse(&t.ek_public).and_then(|k| k.check_ek().map(|()| k)) {
            Ok(k) => k,
            Err(e) => {
                self.audit_denied(ev, format!("EK refused: {e}"));
                return Err(Status::invalid_argument(format!("EK: {e}")));
            }
        };
        let ak = match TpmPublic::parse(&t.ak_public).and_then(|k| k.check_ak().map(|()| k)) {
            Ok(k) => k,
            Err(e) => {
                self.audit_denied(ev, format!("AK refused: {e}"));
                return Err(Status::invalid_argument(format!("AK: {e}")));
            }
        };
        let ek_hash = spki_hash(&ek.spki_der());
        let agent_id = self.tpm_agent_id(&ek_hash)?;
        ev.spiffe_id = Some(agent_id.to_string());
        if let Some(a) = self.state.store.agent(&agent_id).map_err(store_status)?
            && a.status == AgentStatus::Banned
        {
            self.audit_denied(ev, "agent is banned");
            return Err(Status::permission_denied("attestation failed"));
        }
        let now = now_unix();
        // An EK certificate from a configured manufacturer CA ranks highest;
        // the allow-list next.
        let mut cert_failure = None;
        let mut issuer = None;
        if !t.ek_certificate.is_empty() {
            match self.state.tpm.verify_ek_cert(&t.ek_certificate, &ek, now) {
                Ok(i) => issuer = Some(i),
                Err(e) => cert_failure = Some(e.to_string()),
            }
        }
        let level = if issuer.is_some() {
            ev.amr.push(methods::TPM_EK_CERT.into());
            AssuranceLevel::Al3
        } else if self
            .state
            .store
            .tpm_ek_allowed(&ek_hash)
            .map_err(store_status)?
        {
            ev.reason = cert_failure.map(|f| format!("EK certificate not used: {f}"));
            AssuranceLevel::Al2
        } else {
            let reason = match cert_failure {
                Some(f) => format!("{f}, and the EK hash {ek_hash} is not on the allow-list"),
                None => {
                    format!("no EK certificate, and the EK hash {ek_hash} is not on the allow-list")
                }
            };
            self.audit_denied(ev, reason);
            return Err(Status::permission_denied(
                "attestation failed: this TPM's EK is neither allowed nor certified by a configured manufacturer CA",
            ));
        };
        ev.assurance = Some(level.acr().into());
        let (session_id, cred) = match self.state.tpm.begin(&ek, ak, ek_hash, level, issuer, now) {
            Ok(x) => x,
            Err(BeginError::Busy) => {
                self.audit_denied(ev, "too many TPM attestations in progress");
                return Err(Status::resource_exhausted(
                    "too many TPM attestations in progress; retry later",
                ));
            }
            Err(e) => {
                self.audit_denied(ev, e.to_string());
                return Err(Status::internal("internal error"));
            }
        };
        ev.outcome = "challenge";
        self.state.audit(&ev).map_err(|_| unavailable_audit())?;
        Ok(Response::new(pb::AttestResponse {
            result: Some(pb::attest_response::Result::Challenge(pb::Challenge {
                session_id,
                challenge: Vec::new(),
                tpm: Some(pb::TpmChallenge {
                    credential_blob: cred.credential_blob,
                    encrypted_secret: cred.encrypted_secret,
                }),
            })),
            bundle: self.state.bundle().to_spiffe_json(),
        }))
    }

    /// TPM attestation, round 2: the activated secret proves the AK lives
    /// in the TPM with that EK; the AK's certification proves the agent key
    /// does too. Then the agent SVID is issued for that key.
    fn attest_tpm_finish(
        &self,
        mut ev: AuditEvent,
        c: pb::ChallengeResponse,
        public_key: Vec<u8>,
    ) -> Result<Response<pb::AttestResponse>, Status> {
        ev.amr = vec![methods::TPM.into()];
        let now = now_unix();
        // Taken out whatever happens next: one answer per challenge.
        let Some(p) = self.state.tpm.take(&c.session_id, now) else {
            self.audit_denied(ev, "unknown, answered or expired TPM challenge session");
            return Err(Status::failed_precondition(
                "no such TPM challenge (expired or already answered): attest again",
            ));
        };
        let agent_id = self.tpm_agent_id(&p.ek_hash)?;
        ev.spiffe_id = Some(agent_id.to_string());
        ev.assurance = Some(p.level.acr().into());
        if p.level == AssuranceLevel::Al3 {
            ev.amr.push(methods::TPM_EK_CERT.into());
        }
        if !bool::from(c.response.as_slice().ct_eq(p.secret.as_slice())) {
            self.audit_denied(ev, "wrong credential activation answer");
            return Err(Status::permission_denied("attestation failed"));
        }
        let Some(k) = c.agent_key else {
            self.audit_denied(ev, "no certification of the agent key");
            return Err(Status::invalid_argument(
                "agent_key (the AK's certification of the agent key) is required",
            ));
        };
        let key = match TpmPublic::parse(&k.public)
            .and_then(|key| key.check_resident_signing_key().map(|()| key))
        {
            Ok(key) => key,
            Err(e) => {
                self.audit_denied(ev, format!("agent key refused: {e}"));
                return Err(Status::permission_denied(format!("agent key: {e}")));
            }
        };
        let nonce = sha256(p.secret.as_slice());
        if let Err(e) = verify_certify(&p.ak, &key, &k.certify_info, &k.signature, &nonce) {
            self.audit_denied(ev, format!("agent key certification refused: {e}"));
            return Err(Status::permission_denied(format!(
                "agent key certification: {e}"
            )));
        }
        if !is_tpm_key(&public_key, &key) {
            self.audit_denied(ev, "public_key is not the certified TPM key");
            return Err(Status::permission_denied(
                "public_key must be the TPM-resident key the AK certified",
            ));
        }
        let issued = self
            .state
            .ca
            .issue(
                &public_key,
                &agent_id,
                &[],
                &[],
                self.state.agent_svid_ttl,
                now,
            )
            .map_err(ca_status)?;
        let agent = Agent {
            spiffe_id: agent_id.clone(),
            status: AgentStatus::Active,
            assurance: p.level,
            method: methods::TPM.into(),
            serial: issued.serial.clone(),
            expires_at: issued.not_after,
            attested_at: now,
            // What certifies its workload keys from now on.
            tpm_ak: Some(p.ak.as_bytes().to_vec()),
        };
        // First attestation creates the agent; a re-attestation (restart,
        // eviction, expiry) replaces its SVID. A ban stands.
        match self.state.store.create_agent(&agent) {
            Ok(()) => {}
            Err(StoreError::AlreadyExists) => {
                let updated = self.state.store.update_agent(&agent_id, &|a| {
                    if a.status == AgentStatus::Banned {
                        return Err(StoreError::Refused("agent is banned".into()));
                    }
                    a.status = AgentStatus::Active;
                    a.assurance = agent.assurance;
                    a.method = agent.method.clone();
                    a.serial = agent.serial.clone();
                    a.expires_at = agent.expires_at;
                    a.tpm_ak = agent.tpm_ak.clone();
                    Ok(())
                });
                match updated {
                    Ok(_) => {}
                    Err(StoreError::Refused(r)) => {
                        self.audit_denied(ev, r);
                        return Err(Status::permission_denied("attestation failed"));
                    }
                    Err(e) => return Err(store_status(e)),
                }
            }
            Err(e) => return Err(store_status(e)),
        }
        ev.outcome = "ok";
        ev.serial = Some(issued.serial.clone());
        ev.reason = p.ek_issuer.map(|i| format!("EK certificate issued by {i}"));
        self.state.audit(&ev).map_err(|_| unavailable_audit())?;
        tracing::info!(agent = %agent_id, level = %p.level, "agent attested with a TPM");
        Ok(Response::new(pb::AttestResponse {
            result: Some(pb::attest_response::Result::Svid(
                self.agent_svid(&issued, &agent_id, p.level),
            )),
            bundle: self.state.bundle().to_spiffe_json(),
        }))
    }

    fn tpm_agent_id(&self, ek_hash: &str) -> Result<SpiffeId, Status> {
        self.state
            .td
            .id(&format!("/agent/tpm/{ek_hash}"))
            .map_err(|_| Status::internal("internal error"))
    }

    /// Join-token attestation: one atomic spend of the token.
    fn attest_join_token(
        &self,
        ev: AuditEvent,
        token: String,
        public_key: Vec<u8>,
    ) -> Result<Response<pb::AttestResponse>, Status> {
        let mut ev = ev;
        ev.amr = vec![methods::JOIN_TOKEN.into()];
        if crate::ca::parse_p256_spki(&public_key).is_err() {
            self.audit_denied(ev, "public key is not an ECDSA P-256 SubjectPublicKeyInfo");
            return Err(Status::invalid_argument(
                "public_key must be a DER ECDSA P-256 SubjectPublicKeyInfo",
            ));
        }
        if token.is_empty() || token.len() > 256 {
            self.audit_denied(ev, "malformed join token");
            return Err(Status::permission_denied("attestation failed"));
        }
        // Attest: one atomic spend.
        let hash = sha256(token.as_bytes());
        let token_id = join_token_id(&hash);
        let agent_id = self
            .state
            .td
            .id(&format!("/agent/join/{token_id}"))
            .map_err(|_| Status::internal("internal error"))?;
        ev.spiffe_id = Some(agent_id.to_string());
        ev.assurance = Some(AssuranceLevel::Al1.acr().into());
        let now = now_unix();
        match self
            .state
            .store
            .spend_join_token(&hash, now)
            .map_err(store_status)?
        {
            SpendOutcome::Spent => {}
            SpendOutcome::AlreadySpent => {
                self.audit_denied(ev, "join token reuse: already spent");
                return Err(Status::permission_denied("attestation failed"));
            }
            SpendOutcome::Expired => {
                self.audit_denied(ev, "join token expired");
                return Err(Status::permission_denied("attestation failed"));
            }
            SpendOutcome::Unknown => {
                ev.spiffe_id = None;
                self.audit_denied(ev, "unknown join token");
                return Err(Status::permission_denied("attestation failed"));
            }
        }
        // Act.
        let issued = self
            .state
            .ca
            .issue(
                &public_key,
                &agent_id,
                &[],
                &[],
                self.state.agent_svid_ttl,
                now,
            )
            .map_err(ca_status)?;
        let agent = Agent {
            spiffe_id: agent_id.clone(),
            status: AgentStatus::Active,
            assurance: AssuranceLevel::Al1,
            method: methods::JOIN_TOKEN.into(),
            serial: issued.serial.clone(),
            expires_at: issued.not_after,
            attested_at: now,
            tpm_ak: None,
        };
        self.state
            .store
            .create_agent(&agent)
            .map_err(store_status)?;
        // Audit.
        ev.outcome = "ok";
        ev.serial = Some(issued.serial.clone());
        self.state.audit(&ev).map_err(|_| unavailable_audit())?;
        tracing::info!(agent = %agent_id, "agent attested with a join token");
        Ok(Response::new(pb::AttestResponse {
            result: Some(pb::attest_response::Result::Svid(self.agent_svid(
                &issued,
                &agent_id,
                AssuranceLevel::Al1,
            ))),
            bundle: self.state.bundle().to_spiffe_json(),
        }))
    }
}

fn entry_to_pb(e: &Entry) -> pb::Entry {
    pb::Entry {
        id: e.id.clone(),
        spiffe_id: e.spiffe_id.to_string(),
        parent_id: e.parent_id.to_string(),
        selectors: e
            .selectors
            .iter()
            .map(|s| pb::Selector {
                r#type: s.kind.clone(),
                value: s.value.clone(),
            })
            .collect(),
        audiences: e.audiences.clone(),
        x509_ttl_seconds: e.x509_ttl,
        jwt_ttl_seconds: e.jwt_ttl,
        dns_names: e.dns_names.clone(),
        min_assurance: e
            .min_assurance
            .map(|l| l.acr().to_owned())
            .unwrap_or_default(),
        revision: e.revision,
        expires_at: e.expires_at.unwrap_or(0),
        key_binding: e.key_binding.as_str().into(),
    }
}

/// The join token's ID: the first 16 bytes of its SHA-256, hex. It names
/// the agent and is safe to log; the token itself never is.
/// An RFC 7638 SHA-256 thumbprint: 43 characters of unpadded base64url.
fn is_jkt(s: &str) -> bool {
    s.len() == 43
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

pub fn join_token_id(hash: &[u8; 32]) -> String {
    hex(&hash[..16])
}

#[tonic::async_trait]
impl pb::node_server::Node for NodeApi {
    async fn attest(
        &self,
        req: Request<pb::AttestRequest>,
    ) -> Result<Response<pb::AttestResponse>, Status> {
        const METHOD: &str = "node.Attest";
        let req = req.into_inner();
        let ev = AuditEvent {
            request_id: request_id(),
            caller: "unauthenticated".into(),
            method: METHOD.into(),
            ..AuditEvent::default()
        };
        match req.method {
            Some(pb::attest_request::Method::JoinToken(j)) => {
                self.attest_join_token(ev, j.token, req.public_key)
            }
            Some(pb::attest_request::Method::Tpm(t)) => self.attest_tpm_begin(ev, t),
            Some(pb::attest_request::Method::ChallengeResponse(c)) => {
                self.attest_tpm_finish(ev, c, req.public_key)
            }
            None => {
                self.audit_denied(ev, "no attestation method");
                Err(Status::invalid_argument(
                    "an attestation method is required",
                ))
            }
        }
    }
    async fn renew_agent(
        &self,
        req: Request<pb::RenewAgentRequest>,
    ) -> Result<Response<pb::RenewAgentResponse>, Status> {
        const METHOD: &str = "node.RenewAgent";
        let caller = self.authenticate(&req, METHOD)?;
        let req = req.into_inner();
        let id = caller.agent.spiffe_id.clone();
        let mut ev = caller.event(METHOD);
        ev.spiffe_id = Some(id.to_string());
        if caller.agent.method == methods::TPM {
            // Its key must stay certified by the TPM: no renewal for an
            // uncertified key; a TPM agent attests again instead.
            self.audit_denied(ev, "TPM agents re-attest instead of renewing");
            return Err(Status::failed_precondition(
                "TPM-attested agents renew by attesting again",
            ));
        }
        let now = now_unix();
        let issued = self
            .state
            .ca
            .issue(
                &req.public_key,
                &id,
                &[],
                &[],
                self.state.agent_svid_ttl,
                now,
            )
            .map_err(ca_status)?;
        let presented = caller.agent.serial.clone();
        let new_serial = issued.serial.clone();
        let not_after = issued.not_after;
        let updated = self.state.store.update_agent(&id, &|a| {
            // Re-checked atomically: an eviction or another renewal since
            // authentication wins.
            if a.status != AgentStatus::Active || a.serial != presented {
                return Err(StoreError::Refused("agent is not active".into()));
            }
            a.serial = new_serial.clone();
            a.expires_at = not_after;
            Ok(())
        });
        match updated {
            Ok(_) => {}
            Err(StoreError::Refused(r)) => {
                self.audit_denied(ev, r);
                return Err(Status::permission_denied("agent is not active"));
            }
            Err(e) => return Err(store_status(e)),
        }
        ev.outcome = "ok";
        ev.serial = Some(issued.serial.clone());
        self.state.audit(&ev).map_err(|_| unavailable_audit())?;
        Ok(Response::new(pb::RenewAgentResponse {
            svid: Some(self.agent_svid(&issued, &id, caller.agent.assurance)),
        }))
    }

    async fn sync_entries(
        &self,
        req: Request<pb::SyncEntriesRequest>,
    ) -> Result<Response<pb::SyncEntriesResponse>, Status> {
        let caller = self.authenticate(&req, "node.SyncEntries")?;
        let since = req.into_inner().since_revision;
        let ch = self
            .state
            .store
            .entry_changes(&caller.agent.spiffe_id, since)
            .map_err(store_status)?;
        // An authenticated read: audited, but nothing is issued, so a log
        // failure does not refuse it.
        let mut ev = caller.event("node.SyncEntries");
        ev.outcome = "ok";
        let _ = self.state.audit(&ev);
        Ok(Response::new(pb::SyncEntriesResponse {
            entries: ch.entries.iter().map(entry_to_pb).collect(),
            deleted_entry_ids: ch.deleted,
            revision: ch.revision,
        }))
    }

    async fn sign_x509_svids(
        &self,
        req: Request<pb::SignX509SvidsRequest>,
    ) -> Result<Response<pb::SignX509SvidsResponse>, Status> {
        const METHOD: &str = "node.SignX509Svids";
        let caller = self.authenticate(&req, METHOD)?;
        let req = req.into_inner();
        if req.requests.len() > MAX_BATCH {
            return Err(Status::invalid_argument(format!(
                "at most {MAX_BATCH} SVIDs per call"
            )));
        }
        let now = now_unix();
        let mut results = Vec::with_capacity(req.requests.len());
        for r in req.requests {
            let mut ev = caller.event(METHOD);
            let mut out = pb::X509SvidResult {
                entry_id: r.entry_id.clone(),
                ..Default::default()
            };
            let entry = self.state.store.entry(&r.entry_id).map_err(store_status)?;
            let entry = match entry {
                Some(e) => e,
                None => {
                    self.audit_denied(ev, format!("no entry {}", r.entry_id));
                    out.error = "no such entry".into();
                    results.push(out);
                    continue;
                }
            };
            ev.spiffe_id = Some(entry.spiffe_id.to_string());
            out.spiffe_id = entry.spiffe_id.to_string();
            if let Err(e) =
                authz::authorize_x509(&entry, &caller.agent.spiffe_id, caller.agent.assurance, now)
            {
                self.audit_denied(ev, e.to_string());
                out.error = e.to_string();
                results.push(out);
                continue;
            }
            if entry.key_binding == KeyBinding::Tpm && caller.agent.method != methods::TPM {
                let why = "entry requires a TPM-bound key; the agent is not TPM-attested";
                self.audit_denied(ev, why);
                out.error = why.into();
                results.push(out);
                continue;
            }
            let tpm_key = match (entry.key_binding, r.tpm_key.as_ref()) {
                (KeyBinding::Tpm, Some(k)) => Some(k),
                (KeyBinding::None, None) => None,
                (KeyBinding::Tpm, None) => {
                    let e = WorkloadKeyError::Missing;
                    self.audit_denied(ev, e.to_string());
                    out.error = e.to_string();
                    results.push(out);
                    continue;
                }
                (KeyBinding::None, Some(_)) => {
                    let e = WorkloadKeyError::Unbound;
                    self.audit_denied(ev, e.to_string());
                    out.error = e.to_string();
                    results.push(out);
                    continue;
                }
            };
            let spki = if r.csr.is_empty() {
                r.public_key.clone()
            } else {
                match crate::ca::csr_public_key(&r.csr) {
                    Ok(k) => k,
                    Err(e) => {
                        self.audit_denied(ev, e.to_string());
                        out.error = e.to_string();
                        results.push(out);
                        continue;
                    }
                }
            };
            // A TPM-bound entry: the key must be certified by this agent's
            // AK for this entry.
            let jkt = match tpm_key.map(|k| verify_workload_key(&caller.agent, &entry, k, &spki)) {
                None => None,
                Some(Ok(jkt)) => Some(jkt),
                Some(Err(e)) => {
                    self.audit_denied(ev, e.to_string());
                    out.error = match e {
                        WorkloadKeyError::BadRecordedAk(_) => "internal error".into(),
                        e => e.to_string(),
                    };
                    results.push(out);
                    continue;
                }
            };
            match self.state.ca.issue(
                &spki,
                &entry.spiffe_id,
                &entry.dns_names,
                &[],
                entry.x509_ttl,
                now,
            ) {
                Ok(issued) => {
                    if let Some(jkt) = &jkt {
                        // Durable before the SVID leaves: MintJwtSvid binds
                        // this entry's tokens to this key only.
                        let recorded = self.state.store.put_workload_key(
                            &caller.agent.spiffe_id,
                            &entry.id,
                            &WorkloadKey {
                                jkt: jkt.clone(),
                                certified_at: now,
                            },
                        );
                        match recorded {
                            Ok(()) => {}
                            // Deleted or moved to another agent meanwhile.
                            Err(StoreError::NotFound | StoreError::Refused(_)) => {
                                self.audit_denied(
                                    ev,
                                    "entry was deleted or moved to another agent meanwhile",
                                );
                                out.error = "no such entry".into();
                                results.push(out);
                                continue;
                            }
                            Err(e) => {
                                tracing::error!(error = %e, "store error");
                                let mut ev = ev;
                                ev.outcome = "error";
                                ev.reason = Some(format!("recording the workload key failed: {e}"));
                                let _ = self.state.audit(&ev);
                                out.error = "internal error".into();
                                results.push(out);
                                continue;
                            }
                        }
                        ev.reason = Some(format!(
                            "TPM-resident key {jkt} certified by the agent's AK"
                        ));
                    }
                    ev.outcome = "ok";
                    ev.serial = Some(issued.serial.clone());
                    // No credential leaves unrecorded.
                    self.state.audit(&ev).map_err(|_| unavailable_audit())?;
                    // Leaf only: the root is in the bundle (X509-SVID §5.3).
                    out.cert_chain = issued.chain.iter().map(|c| c.to_vec()).collect();
                    out.expires_at = issued.not_after;
                }
                Err(e) => {
                    let msg = e.to_string();
                    self.audit_denied(ev, msg.clone());
                    out.error = msg;
                }
            }
            results.push(out);
        }
        Ok(Response::new(pb::SignX509SvidsResponse { results }))
    }

    async fn mint_jwt_svid(
        &self,
        req: Request<pb::MintJwtSvidRequest>,
    ) -> Result<Response<pb::MintJwtSvidResponse>, Status> {
        const METHOD: &str = "node.MintJwtSvid";
        let caller = self.authenticate(&req, METHOD)?;
        let req = req.into_inner();
        let mut ev = caller.event(METHOD);
        ev.audience = Some(req.audience.clone());
        ev.spiffe_id = Some(req.spiffe_id.clone());
        // Validate.
        let id = match SpiffeId::parse(&req.spiffe_id) {
            Ok(id) => id,
            Err(e) => {
                self.audit_denied(ev, format!("bad spiffe_id: {e}"));
                return Err(Status::invalid_argument(
                    "spiffe_id is not a valid SPIFFE ID",
                ));
            }
        };
        if req.audience.is_empty() {
            self.audit_denied(ev, "no audience");
            return Err(Status::invalid_argument("exactly one audience is required"));
        }
        // Authorize.
        let entries = self
            .state
            .store
            .entries_by_parent(&caller.agent.spiffe_id)
            .map_err(store_status)?;
        let mut allowed = match authz::authorize_jwt(
            &entries,
            &id,
            &req.audience,
            caller.agent.assurance,
            now_unix(),
        ) {
            Ok(a) => a,
            Err(e) => {
                self.audit_denied(ev, e.to_string());
                return Err(e.into());
            }
        };
        // A TPM-bound entry: only a TPM-attested agent can hold its key,
        // and the token is bound to that key.
        let cnf = match (allowed.entry().key_binding, req.cnf_jkt.as_str()) {
            (KeyBinding::Tpm, _) if caller.agent.method != methods::TPM => {
                self.audit_denied(
                    ev,
                    "entry requires a TPM-bound key; the agent is not TPM-attested",
                );
                return Err(Status::permission_denied(
                    "this entry requires a TPM-bound key and the agent has no attested TPM",
                ));
            }
            (KeyBinding::Tpm, jkt) if is_jkt(jkt) => Some(Confirmation { jkt: jkt.into() }),
            (KeyBinding::Tpm, _) => {
                self.audit_denied(ev, "TPM-bound entry without a key thumbprint");
                return Err(Status::invalid_argument(
                    "cnf_jkt (the workload key's RFC 7638 thumbprint) is required for this entry",
                ));
            }
            (KeyBinding::None, "") => None,
            (KeyBinding::None, _) => {
                self.audit_denied(ev, "cnf_jkt for an entry without key binding");
                return Err(Status::invalid_argument(
                    "cnf_jkt is only for entries with a TPM key binding",
                ));
            }
        };
        if let Some(c) = &cnf {
            // Only the key this agent's AK certified for the entry
            // (SignX509Svids). Several of the agent's entries may carry this
            // SPIFFE ID (other selectors, each workload its own key): any
            // TPM-bound one that allows the audience and recorded this key.
            let mut found = None;
            let mut seen = Vec::new();
            for e in entries
                .iter()
                .filter(|e| e.spiffe_id == id && e.key_binding == KeyBinding::Tpm)
            {
                let Ok(a) = authz::authorize_jwt(
                    std::slice::from_ref(e),
                    &id,
                    &req.audience,
                    caller.agent.assurance,
                    now_unix(),
                ) else {
                    continue;
                };
                let recorded = self
                    .state
                    .store
                    .workload_key(&caller.agent.spiffe_id, &e.id)
                    .map_err(store_status)?;
                match recorded {
                    Some(k) if bool::from(k.jkt.as_bytes().ct_eq(c.jkt.as_bytes())) => {
                        found = Some(a);
                        break;
                    }
                    Some(k) => seen.push(format!("entry {}: key {}", e.id, k.jkt)),
                    None => seen.push(format!("entry {}: no certified key", e.id)),
                }
            }
            match found {
                Some(a) => allowed = a,
                None => {
                    self.audit_denied(
                        ev,
                        format!(
                            "cnf_jkt {} is not a key this agent's TPM certified for the entry ({})",
                            c.jkt,
                            seen.join("; ")
                        ),
                    );
                    return Err(Status::permission_denied(
                        "cnf_jkt is not the certified TPM key of this workload",
                    ));
                }
            }
        }
        // Act.
        let now = now_unix();
        let signer = self.state.jwt.active();
        let (signer, key_not_after) = (&signer.0, signer.1);
        let exp = (now + allowed.entry().jwt_ttl).min(key_not_after);
        if exp <= now {
            return Err(Status::unavailable("no usable JWT signing key"));
        }
        let claims = JwtSvidClaims {
            sub: id.clone(),
            aud: req.audience.clone(),
            exp,
            iat: now,
            jti: random_jti(),
            iss: self.state.jwt_issuer.clone(),
            acr: Some(caller.agent.assurance.acr().into()),
            amr: {
                let mut amr = vec![caller.agent.method.clone(), methods::PEERCRED.into()];
                if cnf.is_some() {
                    amr.push(methods::TPM_KEY.into());
                }
                amr
            },
            cnf,
        };
        let token = signer
            .sign(&claims)
            .map_err(|_| Status::internal("signing failed"))?;
        // Audit before the token leaves.
        ev.outcome = "ok";
        ev.jti = Some(claims.jti.clone());
        self.state.audit(&ev).map_err(|_| unavailable_audit())?;
        Ok(Response::new(pb::MintJwtSvidResponse {
            token,
            expires_at: exp,
        }))
    }

    async fn fetch_bundle(
        &self,
        req: Request<pb::FetchBundleRequest>,
    ) -> Result<Response<pb::FetchBundleResponse>, Status> {
        let caller = self.authenticate(&req, "node.FetchBundle")?;
        let mut ev = caller.event("node.FetchBundle");
        ev.outcome = "ok";
        let _ = self.state.audit(&ev);
        let b = self.state.bundle();
        Ok(Response::new(pb::FetchBundleResponse {
            sequence: b.sequence.unwrap_or(0),
            bundle: b.to_spiffe_json(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::MemoryAuditSink;
    use crate::ca::{JwtKeyPolicy, load_or_init};
    use crate::entry::{EntryRequest, TtlPolicy};
    use crate::store::{SledStore, Store};
    use pb::node_server::Node;
    use rcgen::PublicKeyData;
    use rustls_pki_types::CertificateDer;
    use sigil::{JwtSvidValidator, TrustDomain};

    struct Fixture {
        _dir: tempfile::TempDir,
        state: Arc<ServerState>,
        audit: Arc<MemoryAuditSink>,
        api: NodeApi,
        chain: Vec<CertificateDer<'static>>,
        agent: SpiffeId,
    }

    fn spki() -> Vec<u8> {
        rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .unwrap()
            .subject_public_key_info()
    }

    async fn fixture() -> Fixture {
        fixture_with_agent_ttl(3600).await
    }

    async fn fixture_with_agent_ttl(agent_svid_ttl: i64) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let td = TrustDomain::new("example.org").unwrap();
        let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path()).unwrap());
        let (ca, jwt) = load_or_init(store.clone(), &td, 86400, JwtKeyPolicy::default()).unwrap();
        let audit = Arc::new(MemoryAuditSink::default());
        let state = Arc::new(ServerState {
            td,
            store: store.clone(),
            ca,
            jwt,
            audit: audit.clone(),
            ttl: TtlPolicy::default(),
            agent_svid_ttl,
            jwt_issuer: None,
            metrics: Default::default(),
            tpm: crate::tpm::TpmAttestor::without_cas(),
        });
        let api = NodeApi::new(state.clone());
        let token = "t0k3n";
        store
            .put_join_token(&sha256(token.as_bytes()), now_unix() + 60)
            .unwrap();
        let resp = api
            .attest(Request::new(pb::AttestRequest {
                method: Some(pb::attest_request::Method::JoinToken(
                    pb::JoinTokenAttestation {
                        token: token.into(),
                    },
                )),
                public_key: spki(),
            }))
            .await
            .unwrap()
            .into_inner();
        let Some(pb::attest_response::Result::Svid(svid)) = resp.result else {
            panic!("no svid");
        };
        let agent = SpiffeId::parse(&svid.spiffe_id).unwrap();
        let entry = crate::entry::validate(
            &EntryRequest {
                spiffe_id: "spiffe://example.org/w".into(),
                parent_id: agent.to_string(),
                selectors: vec!["unix:uid:1000".into()],
                audiences: vec!["ehr-fhir".into()],
                jwt_ttl: 300,
                ..EntryRequest::default()
            },
            &state.td,
            &state.ttl,
            0,
        )
        .unwrap();
        store.create_entry(entry).unwrap();
        Fixture {
            _dir: dir,
            state,
            audit,
            api,
            chain: svid
                .cert_chain
                .into_iter()
                .map(CertificateDer::from)
                .collect(),
            agent,
        }
    }

    impl Fixture {
        fn req<T>(&self, msg: T) -> Request<T> {
            let mut r = Request::new(msg);
            r.extensions_mut()
                .insert(PeerCerts(Some(Arc::new(self.chain.clone()))));
            r
        }

        async fn mint(&self, aud: &str) -> Result<pb::MintJwtSvidResponse, Status> {
            self.api
                .mint_jwt_svid(self.req(pb::MintJwtSvidRequest {
                    spiffe_id: "spiffe://example.org/w".into(),
                    audience: aud.into(),
                    ..Default::default()
                }))
                .await
                .map(Response::into_inner)
        }
    }

    #[tokio::test]
    async fn jwt_claims_and_denied_audience_is_audited() {
        let f = fixture().await;
        let ok = f.mint("ehr-fhir").await.unwrap();
        let v = JwtSvidValidator::new("ehr-fhir")
            .validate(
                &ok.token,
                &f.state.bundle_set(),
                std::time::SystemTime::now(),
            )
            .unwrap();
        assert_eq!(v.expiry() - v.issued_at().unwrap(), 300);
        assert_eq!(v.acr(), Some("sigil:al1"));
        assert_eq!(v.amr(), ["join_token", "peercred"]);

        let err = f.mint("ehr-fhir-admin").await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        let lines = f.audit.lines();
        let last = lines.last().unwrap();
        assert_eq!(last.outcome, "denied");
        assert_eq!(last.audience.as_deref(), Some("ehr-fhir-admin"));
        assert_eq!(last.caller, f.agent.as_str());
        assert_eq!(
            last.reason.as_deref(),
            Some("audience not allowed by the registration entry")
        );
        let minted = lines.iter().find(|l| l.outcome == "ok" && l.jti.is_some());
        assert_eq!(minted.unwrap().jti.as_deref(), v.jti());
    }

    #[tokio::test]
    async fn mint_fails_unavailable_when_the_audit_line_cannot_be_written() {
        let f = fixture().await;
        f.audit.set_failing(true);
        let err = f.mint("ehr-fhir").await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unavailable);
        let entry_id = f.state.store.entries().unwrap()[0].id.clone();
        let err = f
            .api
            .sign_x509_svids(f.req(pb::SignX509SvidsRequest {
                requests: vec![pb::X509SvidRequest {
                    entry_id,
                    public_key: spki(),
                    ..Default::default()
                }],
            }))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unavailable);
        f.audit.set_failing(false);
        assert!(f.mint("ehr-fhir").await.is_ok());
    }

    #[tokio::test]
    async fn forced_jwt_key_rotation_keeps_old_tokens_valid() {
        let f = fixture().await;
        let before = f.mint("ehr-fhir").await.unwrap().token;
        f.state.jwt.force_rotate(now_unix()).unwrap();
        let after = f.mint("ehr-fhir").await.unwrap().token;
        let bundles = f.state.bundle_set();
        let now = std::time::SystemTime::now();
        let v1 = JwtSvidValidator::new("ehr-fhir")
            .validate(&before, &bundles, now)
            .unwrap();
        let v2 = JwtSvidValidator::new("ehr-fhir")
            .validate(&after, &bundles, now)
            .unwrap();
        assert_ne!(v1.kid(), v2.kid());
        assert_eq!(v2.kid(), f.state.jwt.active().0.kid());
    }

    #[tokio::test]
    async fn csr_identity_is_ignored_and_bad_csrs_are_refused() {
        let f = fixture().await;
        let entry_id = f.state.store.entries().unwrap()[0].id.clone();
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let params =
            rcgen::CertificateParams::new(vec!["spiffe://example.org/admin".to_owned()]).unwrap();
        let csr = params.serialize_request(&key).unwrap().der().to_vec();
        let mut bad = csr.clone();
        let n = bad.len();
        bad[n - 5] ^= 1;
        let r = f
            .api
            .sign_x509_svids(f.req(pb::SignX509SvidsRequest {
                requests: vec![
                    pb::X509SvidRequest {
                        entry_id: entry_id.clone(),
                        csr,
                        ..Default::default()
                    },
                    pb::X509SvidRequest {
                        entry_id,
                        csr: bad,
                        ..Default::default()
                    },
                ],
            }))
            .await
            .unwrap()
            .into_inner();
        let chain: Vec<CertificateDer<'static>> = r.results[0]
            .cert_chain
            .iter()
            .cloned()
            .map(CertificateDer::from)
            .collect();
        let v = verify_x509_svid(
            &chain,
            &f.state.bundle_set(),
            std::time::SystemTime::now(),
            &sigil::validate::x509::AnyId,
        )
        .unwrap();
        assert_eq!(v.spiffe_id().as_str(), "spiffe://example.org/w");
        let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0]).unwrap();
        assert_eq!(
            leaf.public_key().raw,
            rcgen::PublicKeyData::subject_public_key_info(&key).as_slice()
        );
        assert!(r.results[1].cert_chain.is_empty());
        assert!(r.results[1].error.contains("CSR"));
    }

    #[tokio::test]
    async fn an_expired_agent_svid_is_refused_per_call() {
        let f = fixture_with_agent_ttl(1).await;
        f.api
            .fetch_bundle(f.req(pb::FetchBundleRequest {}))
            .await
            .unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
        let err = f
            .api
            .fetch_bundle(f.req(pb::FetchBundleRequest {}))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
    }

    #[tokio::test]
    async fn other_agents_entries_and_foreign_certs_are_refused() {
        let f = fixture().await;
        // No certificate at all.
        let err = f
            .api
            .fetch_bundle(Request::new(pb::FetchBundleRequest {}))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
        // A workload SVID is not an agent SVID.
        let entry_id = f.state.store.entries().unwrap()[0].id.clone();
        let r = f
            .api
            .sign_x509_svids(f.req(pb::SignX509SvidsRequest {
                requests: vec![pb::X509SvidRequest {
                    entry_id,
                    public_key: spki(),
                    ..Default::default()
                }],
            }))
            .await
            .unwrap()
            .into_inner();
        let workload_chain: Vec<CertificateDer<'static>> = r.results[0]
            .cert_chain
            .iter()
            .cloned()
            .map(CertificateDer::from)
            .collect();
        let mut req = Request::new(pb::FetchBundleRequest {});
        req.extensions_mut()
            .insert(PeerCerts(Some(Arc::new(workload_chain))));
        let err = f.api.fetch_bundle(req).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
        // An entry of another agent cannot be signed.
        let other = crate::entry::validate(
            &EntryRequest {
                spiffe_id: "spiffe://example.org/other".into(),
                parent_id: "spiffe://example.org/agent/join/someone".into(),
                selectors: vec!["unix:uid:1".into()],
                audiences: vec!["ehr-fhir".into()],
                ..EntryRequest::default()
            },
            &f.state.td,
            &f.state.ttl,
            0,
        )
        .unwrap();
        let other = f.state.store.create_entry(other).unwrap();
        let r = f
            .api
            .sign_x509_svids(f.req(pb::SignX509SvidsRequest {
                requests: vec![pb::X509SvidRequest {
                    entry_id: other.id,
                    public_key: spki(),
                    ..Default::default()
                }],
            }))
            .await
            .unwrap()
            .into_inner();
        assert!(r.results[0].cert_chain.is_empty());
        assert_eq!(r.results[0].error, "entry belongs to another agent");
        let err = f
            .api
            .mint_jwt_svid(f.req(pb::MintJwtSvidRequest {
                spiffe_id: "spiffe://example.org/other".into(),
                audience: "ehr-fhir".into(),
                ..Default::default()
            }))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
    }
}
