//! The boundary between whatever holds identities (the agent's cache synced
//! from the server; [`crate::local_ca::LocalCa`] in tests and demos) and the
//! Workload API that hands them out.
//!
//! The Workload API sees only [`IdentitySource`]: a watched
//! [`IdentitySnapshot`] (entries for this node, their pre-minted X.509-SVIDs,
//! bundles) and a call to mint a JWT-SVID for an audience already
//! authorized ([`AuthorizedAudience`]). The source never sees callers,
//! selectors or sockets; the Workload API never sees keys it did not get in a
//! snapshot.

use crate::entry::{AuthorizedAudience, RegistrationEntry};
use futures::future::BoxFuture;
use rustls_pki_types::CertificateDer;
use sigil::{AssuranceLevel, BundleSet, SpiffeId, TrustDomain, X509Svid};
use std::collections::BTreeMap;
use std::sync::Arc;
use tokio::sync::watch;

/// How this node was attested to the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeAttestation {
    /// The assurance level the server granted.
    pub level: AssuranceLevel,
    /// The method (`join_token`, `tpm`), for `amr` and the audit log.
    pub method: String,
}

/// Everything the Workload API needs to answer X.509 and bundle requests,
/// at one instant. Sources publish a new snapshot on every change (entry
/// update, SVID rotation, bundle change); streams push on every change.
#[derive(Debug, Clone)]
pub struct IdentitySnapshot {
    /// This node's trust domain.
    pub trust_domain: TrustDomain,
    /// How the node was attested.
    pub node: NodeAttestation,
    /// The registration entries authorized for this node.
    pub entries: Vec<Arc<RegistrationEntry>>,
    /// The current X.509-SVID of each entry, by entry ID. An entry without
    /// one yet is not served until it has one.
    pub x509_svids: BTreeMap<String, Arc<X509Svid>>,
    /// The current X.509-SVID of each TPM-bound entry, by entry ID:
    /// certificates only, the key stays in the TPM.
    pub bound_svids: BTreeMap<String, Arc<BoundSvid>>,
    /// Bundles: this trust domain's and federated ones, X.509 and JWT.
    pub bundles: BundleSet,
}

impl IdentitySnapshot {
    /// An empty snapshot (no entries, no bundles).
    pub fn empty(trust_domain: TrustDomain, node: NodeAttestation) -> Self {
        Self {
            trust_domain,
            node,
            entries: Vec::new(),
            x509_svids: BTreeMap::new(),
            bound_svids: BTreeMap::new(),
            bundles: BundleSet::new(),
        }
    }
}

/// The X.509-SVID of a TPM-bound entry: no private key, only what the
/// workload needs to present it and to ask the agent to sign.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BoundSvid {
    /// DER certificates, leaf first; the leaf certifies the TPM key.
    pub chain: Vec<CertificateDer<'static>>,
    /// notAfter of the leaf, Unix seconds.
    pub not_after: i64,
    /// The TPM key's uncompressed SEC1 point.
    pub public_sec1: Vec<u8>,
    /// The key's RFC 7638 thumbprint (`cnf.jkt` of bound JWT-SVIDs).
    pub jkt: String,
}

/// A minted JWT-SVID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MintedJwtSvid {
    /// The identity in `sub`.
    pub spiffe_id: SpiffeId,
    /// The compact JWS.
    pub token: String,
    /// `exp`, Unix seconds.
    pub expiry: i64,
}

/// Why a source could not mint.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SourceError {
    /// The minting authority is unreachable and nothing usable is cached
    /// (gRPC `Unavailable`).
    #[error("identity source unavailable: {0}")]
    Unavailable(String),
    /// The entry is not (or no longer) known to the source (gRPC
    /// `PermissionDenied`).
    #[error("entry {0} is unknown to the identity source")]
    UnknownEntry(String),
    /// Anything else (gRPC `Internal`).
    #[error("identity source failed: {0}")]
    Internal(String),
}

/// What the Workload API asks of the component that holds identities.
pub trait IdentitySource: Send + Sync + 'static {
    /// The current snapshot, and every later one. The receiver always holds
    /// a value; a closed channel means the source shut down.
    fn subscribe(&self) -> watch::Receiver<Arc<IdentitySnapshot>>;

    /// A JWT-SVID for the authorized entry carrying exactly the authorized
    /// audience. Sources may cache tokens per (entry, audience). For a
    /// TPM-bound entry the token is bound (`cnf.jkt`) to the entry's TPM key.
    fn fetch_jwt_svid<'a>(
        &'a self,
        authorized: &'a AuthorizedAudience,
    ) -> BoxFuture<'a, Result<MintedJwtSvid, SourceError>>;

    /// Signs a SHA-256 digest with the TPM key of `entry` (one of the
    /// snapshot's `bound_svids`): fixed `r || s`. The caller has attested
    /// and matched the entry. Sources without TPM-bound keys refuse.
    fn sign_with_bound_key<'a>(
        &'a self,
        entry: &'a RegistrationEntry,
        digest: [u8; 32],
    ) -> BoxFuture<'a, Result<[u8; 64], SourceError>> {
        let _ = digest;
        Box::pin(async move { Err(SourceError::UnknownEntry(entry.id.clone())) })
    }
}
