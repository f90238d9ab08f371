//! The admin API (`sigil.admin.v1`), served only on a Unix socket with mode
//! 0600. The caller is identified by its peer uid (SO_PEERCRED) for the
//! audit log; access control is the socket's file mode.

use crate::audit::AuditEvent;
use crate::ca::CaError;
use crate::entry::{self, EntryError, EntryRequest};
use crate::model::{
    Agent, AgentStatus, Entry, StoredJwtKey, StoredX509Ca, hex, now_unix, random_bytes, sha256,
};
use crate::state::{ServerState, request_id};
use crate::store::StoreError;
use sigil::SpiffeId;
use sigil::proto::admin::v1 as pb;
use std::sync::Arc;
use tonic::transport::server::UdsConnectInfo;
use tonic::{Request, Response, Status};

/// Longest join-token TTL, seconds.
pub const MAX_JOIN_TOKEN_TTL: i64 = 7 * 24 * 3600;
/// Join-token TTL when the request gives none, seconds.
pub const DEFAULT_JOIN_TOKEN_TTL: i64 = 600;

/// The admin API service.
#[derive(Debug, Clone)]
pub struct AdminApi {
    state: Arc<ServerState>,
}

impl AdminApi {
    /// A service over `state`.
    pub fn new(state: Arc<ServerState>) -> Self {
        Self { state }
    }

    fn event<T>(&self, req: &Request<T>, method: &str) -> AuditEvent {
        let caller = req
            .extensions()
            .get::<UdsConnectInfo>()
            .and_then(|c| c.peer_cred)
            .map(|c| format!("uid:{}", c.uid()))
            .unwrap_or_else(|| "uid:unknown".into());
        AuditEvent {
            request_id: request_id(),
            caller,
            method: method.into(),
            outcome: "ok",
            ..AuditEvent::default()
        }
    }

    fn record(&self, ev: &AuditEvent) -> Result<(), Status> {
        self.state
            .audit(ev)
            .map_err(|_| Status::unavailable("audit log unavailable"))
    }

    fn deny(&self, mut ev: AuditEvent, reason: String) {
        ev.outcome = "denied";
        ev.reason = Some(reason);
        let _ = self.state.audit(&ev);
    }

    /// Audits one operator action on a CA or JWT key: a refusal as denied
    /// (naming `target`, the key the operator named, if any), a success
    /// with the key it acted on (`id`); a success that cannot be audited is
    /// `Unavailable`.
    fn key_op<T>(
        &self,
        mut ev: AuditEvent,
        target: Option<&str>,
        result: Result<T, CaError>,
        id: impl FnOnce(&T) -> &str,
    ) -> Result<T, Status> {
        match result {
            Ok(v) => {
                ev.reason = Some(format!("key {}", id(&v)));
                self.record(&ev)?;
                Ok(v)
            }
            Err(e) => {
                let reason = match target {
                    Some(t) => format!("key {t}: {e}"),
                    None => e.to_string(),
                };
                self.deny(ev, reason);
                Err(ca_status(e))
            }
        }
    }
}

fn store_status(e: StoreError) -> Status {
    match e {
        StoreError::NotFound => Status::not_found("not found"),
        StoreError::AlreadyExists => Status::already_exists("already exists"),
        other => {
            tracing::error!(error = %other, "store error");
            Status::internal("internal error")
        }
    }
}

impl From<EntryError> for Status {
    fn from(e: EntryError) -> Self {
        Status::invalid_argument(e.to_string())
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
        created_at: e.created_at,
        expires_at: e.expires_at.unwrap_or(0),
        key_binding: e.key_binding.as_str().into(),
    }
}

fn entry_request(r: pb::CreateEntryRequest) -> EntryRequest {
    EntryRequest {
        spiffe_id: r.spiffe_id,
        parent_id: r.parent_id,
        selectors: r.selectors,
        audiences: r.audiences,
        x509_ttl: r.x509_ttl_seconds,
        jwt_ttl: r.jwt_ttl_seconds,
        dns_names: r.dns_names,
        min_assurance: r.min_assurance,
        allow_root: r.allow_root,
        expires_at: r.expires_at,
        key_binding: r.key_binding,
    }
}

fn agent_to_pb(a: &Agent) -> pb::Agent {
    pb::Agent {
        spiffe_id: a.spiffe_id.to_string(),
        status: a.status.as_str().into(),
        assurance_level: a.assurance.acr().into(),
        serial: a.serial.clone(),
        expires_at: a.expires_at,
        attested_at: a.attested_at,
        attestation_method: a.method.clone(),
    }
}

fn ca_to_pb(c: &StoredX509Ca) -> pb::X509Authority {
    pb::X509Authority {
        serial: c.id.clone(),
        not_after: c.not_after,
        sha256: hex(&sha256(&c.cert)),
        state: c.state.as_str().into(),
        created_at: c.created_at,
        retired_at: c.retired_at.unwrap_or(0),
        upstream_sha256: c
            .upstream
            .as_deref()
            .map(|u| hex(&sha256(u)))
            .unwrap_or_default(),
    }
}

fn key_to_pb(k: &StoredJwtKey) -> pb::JwtKey {
    pb::JwtKey {
        kid: k.kid.clone(),
        state: k.state.as_str().into(),
        created_at: k.created_at,
        not_after: k.not_after,
        retired_at: k.retired_at.unwrap_or(0),
    }
}

fn ca_status(e: CaError) -> Status {
    match e {
        CaError::NoPreparedKey(_) | CaError::KeyIsActive(_) => {
            Status::failed_precondition(e.to_string())
        }
        CaError::UnknownKey(..) => Status::not_found(e.to_string()),
        other => {
            tracing::error!(error = %other, "key operation failed");
            Status::internal("internal error")
        }
    }
}

fn parse_agent_id(s: &str) -> Result<SpiffeId, Status> {
    SpiffeId::parse(s).map_err(|e| Status::invalid_argument(format!("spiffe_id: {e}")))
}

/// SHA-256 (hex) of the CA bundle PEM: what an agent operator compares
/// with the bundle file they were given.
pub fn bundle_fingerprint(pem: &str) -> String {
    hex(&sha256(pem.as_bytes()))
}

impl AdminApi {
    fn set_status(
        &self,
        req: Request<pb::GetAgentRequest>,
        method: &str,
        status: AgentStatus,
    ) -> Result<Response<pb::Agent>, Status> {
        let mut ev = self.event(&req, method);
        let id = parse_agent_id(&req.get_ref().spiffe_id)?;
        ev.spiffe_id = Some(id.to_string());
        let updated = self.state.store.update_agent(&id, &|a| {
            // A ban is final; eviction does not lift it.
            if a.status != AgentStatus::Banned {
                a.status = status;
            }
            Ok(())
        });
        let agent = match updated {
            Ok(a) => a,
            Err(e) => {
                self.deny(ev, e.to_string());
                return Err(store_status(e));
            }
        };
        self.record(&ev)?;
        tracing::info!(agent = %id, status = agent.status.as_str(), "agent status changed");
        Ok(Response::new(agent_to_pb(&agent)))
    }
}

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminApi {
    async fn create_join_token(
        &self,
        req: Request<pb::CreateJoinTokenRequest>,
    ) -> Result<Response<pb::CreateJoinTokenResponse>, Status> {
        let mut ev = self.event(&req, "admin.CreateJoinToken");
        let ttl = match req.get_ref().ttl_seconds {
            0 => DEFAULT_JOIN_TOKEN_TTL,
            t if (1..=MAX_JOIN_TOKEN_TTL).contains(&t) => t,
            t => {
                return Err(Status::invalid_argument(format!(
                    "ttl {t}s is outside 1s..={MAX_JOIN_TOKEN_TTL}s"
                )));
            }
        };
        let secret = random_bytes::<32>().map_err(|_| Status::internal("RNG failure"))?;
        // Hex, not base64url: a token must never start with `-`, or
        // `sigil-agent run --join-token <token>` parses it as a flag.
        let token = crate::model::hex(&secret);
        let hash = sha256(token.as_bytes());
        let expires_at = now_unix() + ttl;
        self.state
            .store
            .put_join_token(&hash, expires_at)
            .map_err(store_status)?;
        let agent_id = self
            .state
            .td
            .id(&format!(
                "/agent/join/{}",
                super::node::join_token_id(&hash)
            ))
            .map_err(|_| Status::internal("internal error"))?;
        ev.spiffe_id = Some(agent_id.to_string());
        self.record(&ev)?;
        Ok(Response::new(pb::CreateJoinTokenResponse {
            token,
            agent_id: agent_id.to_string(),
            expires_at,
            bundle_sha256: bundle_fingerprint(&self.state.bundle().x509.to_pem()),
        }))
    }

    async fn update_entry(
        &self,
        req: Request<pb::UpdateEntryRequest>,
    ) -> Result<Response<pb::Entry>, Status> {
        let mut ev = self.event(&req, "admin.UpdateEntry");
        let r = req.into_inner();
        let Some(body) = r.entry else {
            return Err(Status::invalid_argument("entry is required"));
        };
        ev.spiffe_id = Some(body.spiffe_id.clone());
        let mut e = match entry::validate(
            &entry_request(body),
            &self.state.td,
            &self.state.ttl,
            now_unix(),
        ) {
            Ok(e) => e,
            Err(e) => {
                self.deny(ev, e.to_string());
                return Err(e.into());
            }
        };
        e.id = r.id;
        let e = self.state.store.update_entry(e).map_err(store_status)?;
        self.record(&ev)?;
        Ok(Response::new(entry_to_pb(&e)))
    }

    async fn create_entry(
        &self,
        req: Request<pb::CreateEntryRequest>,
    ) -> Result<Response<pb::Entry>, Status> {
        let mut ev = self.event(&req, "admin.CreateEntry");
        let r = req.into_inner();
        ev.spiffe_id = Some(r.spiffe_id.clone());
        let er = entry_request(r);
        let e = match entry::validate(&er, &self.state.td, &self.state.ttl, now_unix()) {
            Ok(e) => e,
            Err(e) => {
                self.deny(ev, e.to_string());
                return Err(e.into());
            }
        };
        // One entry per (parent, SPIFFE ID, selectors): a duplicate would make
        // deletes and audience changes ambiguous.
        let siblings = self
            .state
            .store
            .entries_by_parent(&e.parent_id)
            .map_err(store_status)?;
        if let Some(dup) = siblings
            .iter()
            .find(|o| o.spiffe_id == e.spiffe_id && o.selectors == e.selectors)
        {
            let msg = format!("an identical entry exists: {}", dup.id);
            self.deny(ev, msg.clone());
            return Err(Status::already_exists(msg));
        }
        let e = self.state.store.create_entry(e).map_err(store_status)?;
        self.record(&ev)?;
        Ok(Response::new(entry_to_pb(&e)))
    }

    async fn list_entries(
        &self,
        _req: Request<pb::ListEntriesRequest>,
    ) -> Result<Response<pb::ListEntriesResponse>, Status> {
        let entries = self.state.store.entries().map_err(store_status)?;
        Ok(Response::new(pb::ListEntriesResponse {
            entries: entries.iter().map(entry_to_pb).collect(),
        }))
    }

    async fn get_entry(
        &self,
        req: Request<pb::GetEntryRequest>,
    ) -> Result<Response<pb::Entry>, Status> {
        match self
            .state
            .store
            .entry(&req.get_ref().id)
            .map_err(store_status)?
        {
            Some(e) => Ok(Response::new(entry_to_pb(&e))),
            None => Err(Status::not_found("no such entry")),
        }
    }

    async fn delete_entry(
        &self,
        req: Request<pb::DeleteEntryRequest>,
    ) -> Result<Response<pb::Entry>, Status> {
        let mut ev = self.event(&req, "admin.DeleteEntry");
        let e = self
            .state
            .store
            .delete_entry(&req.get_ref().id)
            .map_err(store_status)?;
        ev.spiffe_id = Some(e.spiffe_id.to_string());
        self.record(&ev)?;
        Ok(Response::new(entry_to_pb(&e)))
    }

    async fn list_agents(
        &self,
        _req: Request<pb::ListAgentsRequest>,
    ) -> Result<Response<pb::ListAgentsResponse>, Status> {
        let agents = self.state.store.agents().map_err(store_status)?;
        Ok(Response::new(pb::ListAgentsResponse {
            agents: agents.iter().map(agent_to_pb).collect(),
        }))
    }

    async fn get_agent(
        &self,
        req: Request<pb::GetAgentRequest>,
    ) -> Result<Response<pb::Agent>, Status> {
        let id = parse_agent_id(&req.get_ref().spiffe_id)?;
        match self.state.store.agent(&id).map_err(store_status)? {
            Some(a) => Ok(Response::new(agent_to_pb(&a))),
            None => Err(Status::not_found("no such agent")),
        }
    }

    async fn evict_agent(
        &self,
        req: Request<pb::GetAgentRequest>,
    ) -> Result<Response<pb::Agent>, Status> {
        self.set_status(req, "admin.EvictAgent", AgentStatus::Evicted)
    }

    async fn ban_agent(
        &self,
        req: Request<pb::GetAgentRequest>,
    ) -> Result<Response<pb::Agent>, Status> {
        self.set_status(req, "admin.BanAgent", AgentStatus::Banned)
    }

    async fn get_bundle(
        &self,
        _req: Request<pb::GetBundleRequest>,
    ) -> Result<Response<pb::GetBundleResponse>, Status> {
        let b = self.state.bundle();
        Ok(Response::new(pb::GetBundleResponse {
            trust_domain: self.state.td.to_string(),
            spiffe: b.to_spiffe_json(),
            pem: b.x509.to_pem(),
            jwks: b.jwt.to_jwks_json(),
        }))
    }

    async fn list_keys(
        &self,
        _req: Request<pb::ListKeysRequest>,
    ) -> Result<Response<pb::ListKeysResponse>, Status> {
        let mut jwt_keys: Vec<pb::JwtKey> =
            self.state.jwt.published().iter().map(key_to_pb).collect();
        jwt_keys.sort_by_key(|k| k.created_at);
        let mut x509_authorities: Vec<pb::X509Authority> =
            self.state.ca.published().iter().map(ca_to_pb).collect();
        x509_authorities.sort_by_key(|k| k.created_at);
        Ok(Response::new(pb::ListKeysResponse {
            jwt_keys,
            x509_authorities,
        }))
    }

    async fn prepare_x509_ca(
        &self,
        req: Request<pb::PrepareX509CaRequest>,
    ) -> Result<Response<pb::X509Authority>, Status> {
        let ev = self.event(&req, "admin.PrepareX509Ca");
        let c = self.key_op(ev, None, self.state.ca.prepare(now_unix()), |c| &c.id)?;
        tracing::info!(ca = %c.id, "X.509 CA prepared by an operator");
        Ok(Response::new(ca_to_pb(&c)))
    }

    async fn activate_x509_ca(
        &self,
        req: Request<pb::ActivateX509CaRequest>,
    ) -> Result<Response<pb::X509Authority>, Status> {
        let ev = self.event(&req, "admin.ActivateX509Ca");
        let c = self.key_op(ev, None, self.state.ca.activate(now_unix()), |c| &c.id)?;
        tracing::info!(ca = %c.id, "X.509 CA activated by an operator");
        Ok(Response::new(ca_to_pb(&c)))
    }

    async fn revoke_x509_ca(
        &self,
        req: Request<pb::RevokeX509CaRequest>,
    ) -> Result<Response<pb::X509Authority>, Status> {
        let ev = self.event(&req, "admin.RevokeX509Ca");
        let serial = &req.get_ref().serial;
        let c = self.key_op(ev, Some(serial), self.state.ca.revoke(serial), |c| &c.id)?;
        tracing::warn!(ca = %c.id, "X.509 CA revoked by an operator");
        Ok(Response::new(ca_to_pb(&c)))
    }

    async fn prepare_jwt_key(
        &self,
        req: Request<pb::PrepareJwtKeyRequest>,
    ) -> Result<Response<pb::JwtKey>, Status> {
        let ev = self.event(&req, "admin.PrepareJwtKey");
        let k = self.key_op(ev, None, self.state.jwt.prepare(now_unix()), |k| &k.kid)?;
        tracing::info!(kid = %k.kid, "JWT key prepared by an operator");
        Ok(Response::new(key_to_pb(&k)))
    }

    async fn activate_jwt_key(
        &self,
        req: Request<pb::ActivateJwtKeyRequest>,
    ) -> Result<Response<pb::JwtKey>, Status> {
        let ev = self.event(&req, "admin.ActivateJwtKey");
        let k = self.key_op(ev, None, self.state.jwt.activate(now_unix()), |k| &k.kid)?;
        tracing::info!(kid = %k.kid, "JWT key activated by an operator");
        Ok(Response::new(key_to_pb(&k)))
    }

    async fn revoke_jwt_key(
        &self,
        req: Request<pb::RevokeJwtKeyRequest>,
    ) -> Result<Response<pb::JwtKey>, Status> {
        let ev = self.event(&req, "admin.RevokeJwtKey");
        let kid = &req.get_ref().kid;
        let k = self.key_op(ev, Some(kid), self.state.jwt.revoke(kid), |k| &k.kid)?;
        tracing::warn!(kid = %k.kid, "JWT key revoked by an operator");
        Ok(Response::new(key_to_pb(&k)))
    }

    async fn allow_tpm_ek(
        &self,
        req: Request<pb::TpmEkRequest>,
    ) -> Result<Response<pb::TpmEk>, Status> {
        let mut ev = self.event(&req, "admin.AllowTpmEk");
        let hash = req.get_ref().ek_hash.clone();
        let agent_id = match self.tpm_agent_id(&hash) {
            Ok(id) => id,
            Err(e) => {
                self.deny(ev, e.message().to_owned());
                return Err(e);
            }
        };
        ev.spiffe_id = Some(agent_id.clone());
        let now = now_unix();
        let added = self
            .state
            .store
            .allow_tpm_ek(&hash, now)
            .map_err(store_status)?;
        if !added {
            ev.reason = Some("already on the allow-list".into());
        }
        self.record(&ev)?;
        tracing::info!(ek_hash = %hash, "TPM EK allowed");
        let added_at = self
            .state
            .store
            .tpm_eks()
            .map_err(store_status)?
            .into_iter()
            .find(|(h, _)| *h == hash)
            .map_or(now, |(_, at)| at);
        Ok(Response::new(pb::TpmEk {
            ek_hash: hash,
            agent_id,
            added_at,
        }))
    }

    async fn remove_tpm_ek(
        &self,
        req: Request<pb::TpmEkRequest>,
    ) -> Result<Response<pb::TpmEk>, Status> {
        let mut ev = self.event(&req, "admin.RemoveTpmEk");
        let hash = req.get_ref().ek_hash.clone();
        let agent_id = match self.tpm_agent_id(&hash) {
            Ok(id) => id,
            Err(e) => {
                self.deny(ev, e.message().to_owned());
                return Err(e);
            }
        };
        ev.spiffe_id = Some(agent_id.clone());
        if !self
            .state
            .store
            .remove_tpm_ek(&hash)
            .map_err(store_status)?
        {
            self.deny(ev, "not on the allow-list".into());
            return Err(Status::not_found("that EK hash is not on the allow-list"));
        }
        self.record(&ev)?;
        tracing::info!(ek_hash = %hash, "TPM EK removed from the allow-list");
        Ok(Response::new(pb::TpmEk {
            ek_hash: hash,
            agent_id,
            added_at: 0,
        }))
    }

    async fn list_tpm_eks(
        &self,
        _req: Request<pb::ListTpmEksRequest>,
    ) -> Result<Response<pb::ListTpmEksResponse>, Status> {
        let eks = self
            .state
            .store
            .tpm_eks()
            .map_err(store_status)?
            .into_iter()
            .map(|(hash, added_at)| pb::TpmEk {
                agent_id: self.tpm_agent_id(&hash).unwrap_or_default(),
                ek_hash: hash,
                added_at,
            })
            .collect();
        Ok(Response::new(pb::ListTpmEksResponse { eks }))
    }
}

impl AdminApi {
    /// Checks an EK hash (64 lowercase hex digits) and returns the agent ID
    /// it names.
    fn tpm_agent_id(&self, hash: &str) -> Result<String, Status> {
        if hash.len() != 64 || !hash.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(Status::invalid_argument(
                "an EK hash is 64 lowercase hex digits (SHA-256 of the EK SubjectPublicKeyInfo)",
            ));
        }
        self.state
            .td
            .id(&format!("/agent/tpm/{hash}"))
            .map(|id| id.to_string())
            .map_err(|_| Status::internal("internal error"))
    }
}
