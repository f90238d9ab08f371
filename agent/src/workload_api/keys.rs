//! `sigil.workload.v1.WorkloadKeys`: the workload key service for entries
//! with `key_binding = "tpm"`, on the Workload API socket.
//!
//! Same order as the standard API: the security header, then the request
//! fields, then attestation of the socket peer, then the caller's entries.
//! Only TPM-bound entries whose key the agent holds (and whose X.509-SVID
//! the server issued) are served here; everything else is
//! `PermissionDenied`, audited with the reason. No call returns private key
//! material: the key signs inside the TPM.

use super::{Caller, NO_IDENTITY, WorkloadApi, check_header, join};
use crate::audit::Outcome;
use crate::entry::{
    AuthzError, KeyBinding, RegistrationEntry, authorize_jwt, check_audience, requested_spiffe_id,
};
use crate::identity::IdentitySnapshot;
use sigil::proto::keys::v1 as pb;
use std::sync::Arc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

/// The caller's TPM-bound entries that have an SVID in `snap`.
fn bound_entries<'a>(
    snap: &IdentitySnapshot,
    matched: &[&'a Arc<RegistrationEntry>],
) -> Vec<&'a Arc<RegistrationEntry>> {
    matched
        .iter()
        .filter(|e| e.key_binding == KeyBinding::Tpm && snap.bound_svids.contains_key(&e.id))
        .copied()
        .collect()
}

fn bound_svids_response(
    snap: &IdentitySnapshot,
    entries: &[&Arc<RegistrationEntry>],
) -> Option<pb::FetchX509SvidsResponse> {
    let svids: Vec<_> = bound_entries(snap, entries)
        .into_iter()
        .filter_map(|e| {
            let svid = snap.bound_svids.get(&e.id)?;
            let bundle = snap
                .bundles
                .get(&e.spiffe_id.trust_domain())
                .map(|b| b.x509.to_concatenated_der())
                .unwrap_or_default();
            Some(pb::BoundX509Svid {
                spiffe_id: e.spiffe_id.to_string(),
                cert_chain: svid.chain.iter().map(|c| c.to_vec()).collect(),
                bundle,
                expires_at: svid.not_after,
            })
        })
        .collect();
    // Entries matched but no bound SVID yet: wait for the next update.
    (!svids.is_empty()).then_some(pb::FetchX509SvidsResponse { svids })
}

impl WorkloadApi {
    /// Attests the caller and keeps its TPM-bound entries; none is
    /// `PermissionDenied` with an audit line.
    async fn attest_bound<T>(
        &self,
        rpc: &'static str,
        req: &Request<T>,
    ) -> Result<(Caller, Vec<Arc<RegistrationEntry>>), Status> {
        let (caller, matched) = self.attest_and_match(rpc, req).await?;
        let snap = self.source.subscribe().borrow().clone();
        let refs: Vec<_> = matched.iter().collect();
        let bound: Vec<_> = bound_entries(&snap, &refs).into_iter().cloned().collect();
        if bound.is_empty() {
            let mut e = self.event(rpc, Some(&caller), Outcome::Denied);
            e.entry_ids = matched.iter().map(|e| e.id.clone()).collect();
            e.reason = Some(format!(
                "none of the caller's entries (selectors [{}]) has a TPM-bound key on this agent",
                join(caller.selectors())
            ));
            self.audit.record(&e);
            return Err(Status::permission_denied(NO_IDENTITY));
        }
        Ok((caller, bound))
    }
}

#[tonic::async_trait]
impl pb::workload_keys_server::WorkloadKeys for WorkloadApi {
    type FetchX509SvidsStream = ReceiverStream<Result<pb::FetchX509SvidsResponse, Status>>;

    async fn fetch_x509_svids(
        &self,
        request: Request<pb::FetchX509SvidsRequest>,
    ) -> Result<Response<Self::FetchX509SvidsStream>, Status> {
        const RPC: &str = "WorkloadKeys.FetchX509Svids";
        check_header(request.metadata())?;
        let (caller, bound) = self.attest_bound(RPC, &request).await?;
        let mut e = self.event(RPC, Some(&caller), Outcome::Allowed);
        e.entry_ids = bound.iter().map(|e| e.id.clone()).collect();
        e.spiffe_ids = bound.iter().map(|e| e.spiffe_id.to_string()).collect();
        self.audit.record(&e);
        Ok(Response::new(self.stream(
            RPC,
            caller,
            bound_svids_response,
        )))
    }

    async fn sign_digest(
        &self,
        request: Request<pb::SignDigestRequest>,
    ) -> Result<Response<pb::SignDigestResponse>, Status> {
        const RPC: &str = "WorkloadKeys.SignDigest";
        check_header(request.metadata())?;
        let req = request.get_ref();
        let digest: [u8; 32] = req
            .digest
            .as_slice()
            .try_into()
            .map_err(|_| Status::invalid_argument("digest must be a 32-byte SHA-256 digest"))?;
        let Some(requested) = requested_spiffe_id(&req.spiffe_id)? else {
            return Err(Status::invalid_argument("spiffe_id must be specified"));
        };
        let (caller, bound) = self.attest_bound(RPC, &request).await?;
        let mut event = self.event(RPC, Some(&caller), Outcome::Allowed);
        event.spiffe_ids = vec![requested.to_string()];
        let Some(entry) = bound.iter().find(|e| e.spiffe_id == requested) else {
            event.outcome = Outcome::Denied;
            event.reason = Some(AuthzError::SpiffeIdNotEntitled(requested).to_string());
            self.audit.record(&event);
            return Err(Status::permission_denied(NO_IDENTITY));
        };
        event.entry_ids = vec![entry.id.clone()];
        match self.source.sign_with_bound_key(entry, digest).await {
            Ok(sig) => {
                self.audit.record(&event);
                Ok(Response::new(pb::SignDigestResponse {
                    signature: sig.to_vec(),
                }))
            }
            Err(e) => Err(self.source_failed(event, e)),
        }
    }

    async fn fetch_bound_jwt_svid(
        &self,
        request: Request<pb::FetchBoundJwtSvidRequest>,
    ) -> Result<Response<pb::FetchBoundJwtSvidResponse>, Status> {
        const RPC: &str = "WorkloadKeys.FetchBoundJwtSvid";
        check_header(request.metadata())?;
        let req = request.get_ref();
        check_audience(&req.audience)?;
        let audience = req.audience.clone();
        let requested = requested_spiffe_id(&req.spiffe_id)?;
        let (caller, bound) = self.attest_bound(RPC, &request).await?;
        let refs: Vec<_> = bound.iter().collect();
        let mut event = self.event(RPC, Some(&caller), Outcome::Allowed);
        event.audience = Some(audience.clone());
        // One token, bound to one key: the first authorized identity (or
        // the requested one). `authorize_jwt` never returns an empty list.
        let authorized = match authorize_jwt(&refs, requested.as_ref(), &audience)
            .and_then(|a| a.into_iter().next().ok_or(AuthzError::NoMatchingEntry))
        {
            Ok(a) => a,
            Err(e) => {
                event.outcome = Outcome::Denied;
                event.entry_ids = bound.iter().map(|e| e.id.clone()).collect();
                event.reason = Some(e.to_string());
                self.audit.record(&event);
                return Err(e.into());
            }
        };
        event.entry_ids = vec![authorized.entry().id.clone()];
        event.spiffe_ids = vec![authorized.entry().spiffe_id.to_string()];
        // The key the token will be bound to, as the snapshot serves it.
        let public_key = self
            .source
            .subscribe()
            .borrow()
            .bound_svids
            .get(&authorized.entry().id)
            .map(|s| s.public_sec1.clone());
        let Some(public_key) = public_key else {
            event.outcome = Outcome::Error;
            event.reason = Some("the TPM-bound key is not certified yet".into());
            self.audit.record(&event);
            return Err(Status::unavailable("identity temporarily unavailable"));
        };
        match self.source.fetch_jwt_svid(&authorized).await {
            Ok(minted) => {
                self.audit.record(&event);
                Ok(Response::new(pb::FetchBoundJwtSvidResponse {
                    spiffe_id: minted.spiffe_id.to_string(),
                    token: minted.token,
                    expires_at: minted.expiry,
                    public_key,
                }))
            }
            Err(e) => Err(self.source_failed(event, e)),
        }
    }
}
