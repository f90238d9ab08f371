//! The agent's identity cache, synced from the server: the real
//! [`IdentitySource`] behind the Workload API.
//!
//! - Entries for this node are synced **incrementally** (`SyncEntries` with
//!   the last revision), bundles with `FetchBundle`.
//! - X.509-SVIDs are pre-minted for every entry: the key is generated here,
//!   only the public key goes to the server (`SignX509Svids`, batched), and
//!   each SVID is re-minted at about half its life, with jitter.
//! - The agent SVID is renewed the same way (`RenewAgent`, new key), except
//!   for agents whose key is held by a TPM: they attest again through their
//!   [`Reattestor`] (the server refuses `RenewAgent` to them).
//! - Everything lives in one state file in the data dir (mode 0600, written
//!   atomically), so a restarted agent serves its cache at once, before it
//!   reaches the server; while the server is unreachable the last snapshot
//!   keeps being served and sync retries with backoff.
//! - JWT-SVIDs are minted by the server on demand (`MintJwtSvid`); put a
//!   [`crate::jwt_cache::JwtSvidCache`] in front for caching.

use crate::bound_keys::{BoundKeyBlob, KeyHolderError, WorkloadKeyHolder};
use crate::entry::{AuthorizedAudience, KeyBinding, RegistrationEntry};
use crate::identity::{
    BoundSvid, IdentitySnapshot, IdentitySource, MintedJwtSvid, NodeAttestation, SourceError,
};
use crate::node_client::NodeClient;
use crate::selector::Selector;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use sigil::bundle::Bundle;
use sigil::proto::node::v1 as pb;
use sigil::source::SharedBundles;
use sigil::tls::SvidResolver;
use sigil::{AssuranceLevel, BundleSet, PrivateKey, SpiffeId, TrustDomain, X509Svid};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::sync::watch;

/// The state file's name in the data dir.
pub const STATE_FILE: &str = "agent-state.json";

/// SubjectPublicKeyInfo DER of a P-256 public key (uncompressed point).
pub fn p256_spki_der(sec1: &[u8]) -> Vec<u8> {
    // SEQUENCE { SEQUENCE { id-ecPublicKey, prime256v1 }, BIT STRING }
    const PREFIX: [u8; 26] = [
        0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08,
        0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
    ];
    let mut out = PREFIX.to_vec();
    out.extend_from_slice(sec1);
    out
}

/// An SVID as persisted: DER chain and PKCS#8 key, base64.
#[derive(Clone, Serialize, Deserialize)]
pub struct StoredSvid {
    /// DER certificates, leaf first.
    pub chain: Vec<String>,
    /// PKCS#8 DER.
    pub key: String,
    /// When to replace it, Unix seconds (fixed when it was received).
    #[serde(default)]
    pub refresh_at: i64,
}

impl std::fmt::Debug for StoredSvid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StoredSvid(<redacted>)")
    }
}

impl StoredSvid {
    /// Encodes an SVID received now.
    pub fn from_svid(svid: &X509Svid) -> Self {
        Self {
            chain: svid.chain().iter().map(|c| B64.encode(c)).collect(),
            key: B64.encode(svid.private_key().secret_pkcs8_der()),
            refresh_at: refresh_at(now_unix(), svid.not_after()),
        }
    }

    /// Encodes an agent SVID received now whose key is held elsewhere (a
    /// TPM): no key is stored.
    pub fn from_external_key(
        chain: &[rustls_pki_types::CertificateDer<'static>],
        not_after: i64,
    ) -> Self {
        Self {
            chain: chain.iter().map(|c| B64.encode(c)).collect(),
            key: String::new(),
            refresh_at: refresh_at(now_unix(), not_after),
        }
    }

    /// The DER chain.
    pub fn chain_ders(&self) -> Result<Vec<rustls_pki_types::CertificateDer<'static>>, String> {
        self.chain
            .iter()
            .map(|c| B64.decode(c).map(Into::into))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())
    }

    /// Decodes and checks the SVID.
    pub fn to_svid(&self) -> Result<X509Svid, String> {
        let chain = self
            .chain
            .iter()
            .map(|c| B64.decode(c).map(Into::into))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())?;
        let key = B64.decode(&self.key).map_err(|e| e.to_string())?;
        X509Svid::new(chain, PrivateKey::from_pkcs8_der(key)).map_err(|e| e.to_string())
    }
}

/// A TPM-bound workload key and its current X.509-SVID, as persisted.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredBoundSvid {
    /// The key's blobs (sealed by the TPM).
    pub key: BoundKeyBlob,
    /// DER certificates, leaf first, base64; empty until the server signed.
    pub chain: Vec<String>,
    /// When to replace the certificate, Unix seconds.
    #[serde(default)]
    pub refresh_at: i64,
}

impl StoredBoundSvid {
    /// The SVID to publish: the chain, checked to certify this key.
    fn to_bound(&self) -> Result<(BoundSvid, SpiffeId), String> {
        let chain = self
            .chain
            .iter()
            .map(|c| B64.decode(c).map(Into::into))
            .collect::<Result<Vec<rustls_pki_types::CertificateDer<'static>>, _>>()
            .map_err(|e| e.to_string())?;
        let public = self.key.public().map_err(|e| e.to_string())?;
        let (id, not_after) =
            X509Svid::check_external_key(&chain, &public.sec1).map_err(|e| e.to_string())?;
        Ok((
            BoundSvid {
                chain,
                not_after,
                public_sec1: public.sec1,
                jkt: public.jkt,
            },
            id,
        ))
    }
}

/// A registration entry as the server sent it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct StoredEntry {
    /// Entry ID.
    pub id: String,
    /// SPIFFE ID issued.
    pub spiffe_id: String,
    /// `type:value` selectors.
    pub selectors: Vec<String>,
    /// Allowed audiences.
    pub audiences: Vec<String>,
    /// X.509-SVID TTL, seconds.
    pub x509_ttl_seconds: i64,
    /// JWT-SVID TTL, seconds.
    pub jwt_ttl_seconds: i64,
    /// Minimum node assurance (`sigil:al2`), empty for none.
    pub min_assurance: String,
    /// The server's revision of this entry.
    pub revision: u64,
    /// When the entry stops issuing, Unix seconds; 0 for never.
    #[serde(default)]
    pub expires_at: i64,
    /// `tpm` when the workload key must live in the TPM; empty otherwise.
    #[serde(default)]
    pub key_binding: String,
}

impl From<pb::Entry> for StoredEntry {
    fn from(e: pb::Entry) -> Self {
        Self {
            id: e.id,
            spiffe_id: e.spiffe_id,
            selectors: e
                .selectors
                .into_iter()
                .map(|s| format!("{}:{}", s.r#type, s.value))
                .collect(),
            audiences: e.audiences,
            x509_ttl_seconds: e.x509_ttl_seconds,
            jwt_ttl_seconds: e.jwt_ttl_seconds,
            min_assurance: e.min_assurance,
            revision: e.revision,
            expires_at: e.expires_at,
            key_binding: e.key_binding,
        }
    }
}

impl StoredEntry {
    fn key_binding(&self) -> Result<KeyBinding, String> {
        match self.key_binding.as_str() {
            "" => Ok(KeyBinding::None),
            "tpm" => Ok(KeyBinding::Tpm),
            other => Err(format!("unknown key binding {other:?}")),
        }
    }

    fn to_entry(&self) -> Result<RegistrationEntry, String> {
        let id = SpiffeId::parse(&self.spiffe_id).map_err(|e| e.to_string())?;
        let key_binding = self.key_binding()?;
        let selectors = self
            .selectors
            .iter()
            .map(|s| Selector::parse(s).map_err(|e| e.to_string()))
            .collect::<Result<Vec<_>, _>>()?;
        let mut e = RegistrationEntry::new(self.id.clone(), id, selectors);
        e.key_binding = key_binding;
        e.audiences = self.audiences.clone();
        if self.x509_ttl_seconds > 0 {
            e.x509_ttl = Duration::from_secs(self.x509_ttl_seconds as u64);
        }
        if self.jwt_ttl_seconds > 0 {
            e.jwt_ttl = Duration::from_secs(self.jwt_ttl_seconds as u64);
        }
        if !self.min_assurance.is_empty() {
            e.min_assurance = Some(
                self.min_assurance
                    .parse()
                    .map_err(|e: sigil::assurance::UnknownAssuranceLevel| e.to_string())?,
            );
        }
        Ok(e)
    }
}

/// Everything the agent keeps across restarts.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentState {
    /// Trust domain name.
    pub trust_domain: String,
    /// This agent's SPIFFE ID.
    pub agent_id: String,
    /// Assurance level granted at attestation (`sigil:al1` …).
    pub assurance: String,
    /// Attestation method (`join_token`, `tpm`).
    pub method: String,
    /// The agent SVID.
    pub agent_svid: StoredSvid,
    /// The trust domain's bundle, SPIFFE JSON.
    pub bundle: String,
    /// Last synced entry revision.
    pub revision: u64,
    /// Entries for this node, by ID.
    pub entries: BTreeMap<String, StoredEntry>,
    /// Workload X.509-SVIDs by entry ID.
    pub svids: BTreeMap<String, StoredSvid>,
    /// TPM-bound workload keys and their X.509-SVIDs by entry ID.
    #[serde(default)]
    pub bound: BTreeMap<String, StoredBoundSvid>,
}

impl AgentState {
    /// Loads the state file, if there is one.
    pub fn load(data_dir: &Path) -> Result<Option<Self>, String> {
        let path = data_dir.join(STATE_FILE);
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| format!("{}: {e}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("{}: {e}", path.display())),
        }
    }

    /// Writes the state file atomically with mode 0600.
    pub fn save(&self, data_dir: &Path) -> std::io::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let tmp = data_dir.join(format!("{STATE_FILE}.tmp"));
        let bytes = serde_json::to_vec(self).map_err(std::io::Error::other)?;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, data_dir.join(STATE_FILE))
    }

    /// The trust domain.
    pub fn td(&self) -> Result<TrustDomain, String> {
        TrustDomain::new(&self.trust_domain).map_err(|e| e.to_string())
    }

    /// The bundle, parsed.
    pub fn parsed_bundle(&self) -> Result<Bundle, String> {
        Bundle::from_spiffe_json(self.td()?, self.bundle.as_bytes()).map_err(|e| e.to_string())
    }
}

/// When an SVID received at `received` should be replaced: half its
/// remaining life, less up to a tenth of it as jitter, so a fleet does not
/// renew in lockstep. (Not from notBefore: servers backdate it for clock
/// skew.)
fn refresh_at(received: i64, not_after: i64) -> i64 {
    let life = (not_after - received).max(0);
    let mut b = [0u8; 4];
    let _ = aws_lc_rs::rand::fill(&mut b);
    let jitter = if life >= 10 {
        i64::from(u32::from_le_bytes(b)) % (life / 10)
    } else {
        0
    };
    received + life / 2 - jitter
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// An agent SVID obtained by attesting again.
#[derive(Debug, Clone)]
pub struct Reattested {
    /// DER chain, leaf first, already checked against the attestor's key.
    pub chain: Vec<rustls_pki_types::CertificateDer<'static>>,
    /// notAfter of the leaf, Unix seconds.
    pub not_after: i64,
    /// The assurance level granted (`sigil:al2` …).
    pub assurance_level: String,
}

/// How an agent whose SVID key it cannot replace at will (a TPM-resident
/// key) gets a new agent SVID: by attesting again.
pub trait Reattestor: Send + Sync + 'static {
    /// The key the agent SVID certifies; TLS handshakes sign with it.
    fn signing_key(&self) -> Arc<dyn tokio_rustls::rustls::sign::SigningKey>;
    /// Attests again, authenticating the server with `bundles`.
    fn reattest(&self, bundles: Arc<SharedBundles>) -> BoxFuture<'_, Result<Reattested, String>>;
}

struct Live {
    state: AgentState,
    /// Parsed workload SVIDs and when to replace them.
    svids: BTreeMap<String, (Arc<X509Svid>, i64)>,
    /// Parsed TPM-bound SVIDs and when to replace them.
    bound: BTreeMap<String, (Arc<BoundSvid>, i64)>,
    agent_refresh_at: i64,
}

/// The cache. Cheap to clone.
#[derive(Clone)]
pub struct ServerIdentitySource {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ServerIdentitySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServerIdentitySource")
    }
}

struct Inner {
    /// Replaced after every agent SVID renewal: the server checks on every
    /// call that the connection's certificate is the agent's current one, so
    /// calls must move to a new TLS connection with the new SVID.
    client: std::sync::RwLock<NodeClient>,
    server: String,
    resolver: Arc<SvidResolver>,
    tls_bundles: Arc<SharedBundles>,
    data_dir: PathBuf,
    td: TrustDomain,
    node: NodeAttestation,
    reattestor: Option<Arc<dyn Reattestor>>,
    /// Holds TPM-bound workload keys; without one, such entries are not
    /// served (fail closed).
    keys: Option<Arc<dyn WorkloadKeyHolder>>,
    live: Mutex<Live>,
    tx: watch::Sender<Arc<IdentitySnapshot>>,
}

/// Sync failed; the cache keeps serving what it has.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// The server did not answer or refused.
    #[error("node API: {0}")]
    Rpc(#[from] tonic::Status),
    /// The server's answer is invalid.
    #[error("invalid server response: {0}")]
    Invalid(String),
    /// The state file could not be written.
    #[error("state file: {0}")]
    Io(#[from] std::io::Error),
}

impl ServerIdentitySource {
    /// A cache over `state` (loaded or fresh from attestation), talking to
    /// `server`. Publishes the persisted snapshot at once.
    pub fn new(server: &str, state: AgentState, data_dir: PathBuf) -> Result<Self, String> {
        Self::with_reattestor(server, state, data_dir, None, None)
    }

    /// Like [`Self::new`]; with a `reattestor`, the agent SVID's key is the
    /// reattestor's and a due agent SVID is replaced by attesting again
    /// instead of `RenewAgent`. The first sync re-attests at once when
    /// `state.agent_svid.refresh_at` is 0. With `keys`, entries with
    /// `key_binding = "tpm"` get their key there and are served by the
    /// workload key service; without, they are skipped.
    pub fn with_reattestor(
        server: &str,
        state: AgentState,
        data_dir: PathBuf,
        reattestor: Option<Arc<dyn Reattestor>>,
        keys: Option<Arc<dyn WorkloadKeyHolder>>,
    ) -> Result<Self, String> {
        let td = state.td()?;
        let level: AssuranceLevel = state
            .assurance
            .parse()
            .map_err(|e: sigil::assurance::UnknownAssuranceLevel| e.to_string())?;
        let node = NodeAttestation {
            level,
            method: state.method.clone(),
        };
        let resolver = Arc::new(match &reattestor {
            None => SvidResolver::new(&state.agent_svid.to_svid()?).map_err(|e| e.to_string())?,
            Some(r) => {
                SvidResolver::with_signing_key(state.agent_svid.chain_ders()?, r.signing_key())
            }
        });
        let bundle = state.parsed_bundle()?;
        let tls_bundles = Arc::new(SharedBundles::new([bundle].into_iter().collect()));
        let client = std::sync::RwLock::new(
            NodeClient::new(server, &td, tls_bundles.clone(), Some(resolver.clone()))
                .map_err(|e| e.to_string())?,
        );
        let mut svids = BTreeMap::new();
        for (id, s) in &state.svids {
            // A stored SVID that no longer parses is re-minted at next sync.
            if let Ok(svid) = s.to_svid() {
                let at = s.refresh_at;
                svids.insert(id.clone(), (Arc::new(svid), at));
            }
        }
        let mut bound = BTreeMap::new();
        for (id, b) in &state.bound {
            if let Ok((svid, _)) = b.to_bound() {
                bound.insert(id.clone(), (Arc::new(svid), b.refresh_at));
            }
        }
        let live = Live {
            agent_refresh_at: state.agent_svid.refresh_at,
            state,
            svids,
            bound,
        };
        let (tx, _) = watch::channel(Arc::new(IdentitySnapshot::empty(td.clone(), node.clone())));
        let me = Self {
            inner: Arc::new(Inner {
                client,
                server: server.to_owned(),
                resolver,
                tls_bundles,
                data_dir,
                td,
                node,
                reattestor,
                keys,
                live: Mutex::new(live),
                tx,
            }),
        };
        me.publish();
        Ok(me)
    }

    fn api(&self) -> pb::node_client::NodeClient<tonic::transport::Channel> {
        self.inner
            .client
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .api()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Live> {
        self.inner
            .live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn publish(&self) {
        let snap = {
            let live = self.lock();
            let mut entries = Vec::new();
            let now = now_unix();
            // An expired entry earns nothing, even before the server says so.
            for e in live
                .state
                .entries
                .values()
                .filter(|e| e.expires_at == 0 || e.expires_at > now)
            {
                match e.to_entry() {
                    // Fail closed: an entry whose key must stay in a TPM is
                    // never served with a software key.
                    Ok(entry)
                        if entry.key_binding == KeyBinding::Tpm && self.inner.keys.is_none() =>
                    {
                        tracing::warn!(entry = %e.id, "skipping a TPM-bound entry: this agent has no TPM")
                    }
                    Ok(entry) => entries.push(Arc::new(entry)),
                    Err(err) => {
                        tracing::warn!(entry = %e.id, error = %err, "skipping invalid entry")
                    }
                }
            }
            let bundles: BundleSet = live.state.parsed_bundle().into_iter().collect();
            IdentitySnapshot {
                trust_domain: self.inner.td.clone(),
                // The level of the latest attestation (a TPM agent attests
                // again, possibly at another level).
                node: live
                    .state
                    .assurance
                    .parse()
                    .map(|level| NodeAttestation {
                        level,
                        method: live.state.method.clone(),
                    })
                    .unwrap_or_else(|_| self.inner.node.clone()),
                entries,
                x509_svids: live
                    .svids
                    .iter()
                    .map(|(k, (s, _))| (k.clone(), s.clone()))
                    .collect(),
                bound_svids: live
                    .bound
                    .iter()
                    .map(|(k, (s, _))| (k.clone(), s.clone()))
                    .collect(),
                bundles,
            }
        };
        self.inner.tx.send_replace(Arc::new(snap));
    }

    /// Follows the server: syncs every `interval`, backing off (to 30 s) while
    /// the server is unreachable. Runs until the task is dropped.
    pub async fn run(self, interval: Duration) {
        let mut backoff = Duration::from_millis(200);
        loop {
            match self.sync_once().await {
                Ok(()) => {
                    backoff = Duration::from_millis(200);
                    tokio::time::sleep(interval).await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "sync with the server failed; serving the cache");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        }
    }

    /// One round: renew the agent SVID if due, refresh the bundle, sync
    /// entries since the last revision, (re-)mint the X.509-SVIDs that are
    /// missing or due, persist, publish.
    pub async fn sync_once(&self) -> Result<(), SyncError> {
        let mut api = self.api();
        let now = now_unix();

        // Agent SVID.
        let mut level_changed = false;
        if now >= self.lock().agent_refresh_at {
            let stored = match &self.inner.reattestor {
                Some(r) => {
                    let fresh = r
                        .reattest(self.inner.tls_bundles.clone())
                        .await
                        .map_err(SyncError::Invalid)?;
                    fresh
                        .assurance_level
                        .parse::<AssuranceLevel>()
                        .map_err(|e| SyncError::Invalid(e.to_string()))?;
                    let mut live = self.lock();
                    if live.state.assurance != fresh.assurance_level {
                        tracing::info!(from = %live.state.assurance, to = %fresh.assurance_level, "node assurance level changed");
                        live.state.assurance = fresh.assurance_level.clone();
                        level_changed = true;
                    }
                    drop(live);
                    self.inner
                        .resolver
                        .update_with_signing_key(fresh.chain.clone(), r.signing_key());
                    StoredSvid::from_external_key(&fresh.chain, fresh.not_after)
                }
                None => {
                    let key = PrivateKey::generate_p256()
                        .map_err(|e| SyncError::Invalid(e.to_string()))?;
                    let spki = p256_spki_der(
                        &key.public_key_sec1()
                            .map_err(|e| SyncError::Invalid(e.to_string()))?,
                    );
                    let resp = api
                        .renew_agent(pb::RenewAgentRequest { public_key: spki })
                        .await?
                        .into_inner();
                    let svid = resp
                        .svid
                        .ok_or_else(|| SyncError::Invalid("no agent SVID".into()))?;
                    let svid =
                        X509Svid::new(svid.cert_chain.into_iter().map(Into::into).collect(), key)
                            .map_err(|e| SyncError::Invalid(e.to_string()))?;
                    self.inner
                        .resolver
                        .update(&svid)
                        .map_err(|e| SyncError::Invalid(e.to_string()))?;
                    StoredSvid::from_svid(&svid)
                }
            };
            // New connection, new certificate.
            let fresh = NodeClient::new(
                &self.inner.server,
                &self.inner.td,
                self.inner.tls_bundles.clone(),
                Some(self.inner.resolver.clone()),
            )
            .map_err(|e| SyncError::Invalid(e.to_string()))?;
            *self
                .inner
                .client
                .write()
                .unwrap_or_else(PoisonError::into_inner) = fresh;
            api = self.api();
            let mut live = self.lock();
            live.agent_refresh_at = stored.refresh_at;
            live.state.agent_svid = stored;
            live.state.save(&self.inner.data_dir)?;
            tracing::info!(
                reattested = self.inner.reattestor.is_some(),
                "agent SVID replaced"
            );
        }

        // Bundle.
        let bundle = api
            .fetch_bundle(pb::FetchBundleRequest {})
            .await?
            .into_inner()
            .bundle;
        let parsed = Bundle::from_spiffe_json(self.inner.td.clone(), bundle.as_bytes())
            .map_err(|e| SyncError::Invalid(format!("bundle: {e}")))?;
        let mut changed = level_changed;
        {
            let mut live = self.lock();
            if live.state.bundle != bundle {
                live.state.bundle = bundle;
                self.inner
                    .tls_bundles
                    .update([parsed].into_iter().collect());
                changed = true;
            }
        }

        // Entries, incrementally.
        let since = self.lock().state.revision;
        let resp = api
            .sync_entries(pb::SyncEntriesRequest {
                since_revision: since,
            })
            .await?
            .into_inner();
        let mut stale: Vec<String> = Vec::new();
        {
            let mut live = self.lock();
            for e in resp.entries {
                let e = StoredEntry::from(e);
                let id = e.id.clone();
                if live.state.entries.get(&id) != Some(&e) {
                    live.state.entries.insert(id.clone(), e);
                    // A changed entry gets a fresh SVID.
                    stale.push(id);
                    changed = true;
                }
            }
            for id in resp.deleted_entry_ids {
                changed |= live.state.entries.remove(&id).is_some();
                live.state.svids.remove(&id);
                live.svids.remove(&id);
                // The TPM key goes with its entry (its blobs were the only
                // reference to it; nothing is loaded).
                live.state.bound.remove(&id);
                live.bound.remove(&id);
            }
            if live.state.revision != resp.revision {
                live.state.revision = resp.revision;
                changed = true;
            }
            for (id, e) in &live.state.entries {
                let due = match e.key_binding() {
                    Ok(KeyBinding::None) => live.svids.get(id).map(|(_, at)| *at),
                    Ok(KeyBinding::Tpm) if self.inner.keys.is_some() => {
                        live.bound.get(id).map(|(_, at)| *at)
                    }
                    // Not served here: nothing to mint.
                    _ => continue,
                };
                if due.is_none_or(|at| at <= now) {
                    stale.push(id.clone());
                }
            }
        }
        stale.sort();
        stale.dedup();

        // X.509-SVIDs, one batch.
        if !stale.is_empty() {
            let bound_ids: Vec<String> = {
                let live = self.lock();
                stale
                    .iter()
                    .filter(|id| {
                        live.state
                            .entries
                            .get(*id)
                            .is_some_and(|e| e.key_binding() == Ok(KeyBinding::Tpm))
                    })
                    .cloned()
                    .collect()
            };
            let mut keys = BTreeMap::new();
            let mut requests = Vec::with_capacity(stale.len());
            for id in stale.iter().filter(|id| !bound_ids.contains(id)) {
                let key =
                    PrivateKey::generate_p256().map_err(|e| SyncError::Invalid(e.to_string()))?;
                let sec1 = key
                    .public_key_sec1()
                    .map_err(|e| SyncError::Invalid(e.to_string()))?;
                requests.push(pb::X509SvidRequest {
                    entry_id: id.clone(),
                    public_key: p256_spki_der(&sec1),
                    csr: Vec::new(),
                    tpm_key: None,
                });
                keys.insert(id.clone(), key);
            }
            let mut bound_keys = BTreeMap::new();
            if let Some(holder) = &self.inner.keys {
                for (id, blob, req) in self.bound_requests(holder, &bound_ids).await? {
                    requests.push(req);
                    bound_keys.insert(id, blob);
                }
            }
            let results = if requests.is_empty() {
                Vec::new()
            } else {
                api.sign_x509_svids(pb::SignX509SvidsRequest { requests })
                    .await?
                    .into_inner()
                    .results
            };
            let mut live = self.lock();
            for r in results {
                if !r.error.is_empty() {
                    tracing::warn!(entry = %r.entry_id, error = %r.error, "server refused an X.509-SVID");
                    continue;
                }
                let expected = live
                    .state
                    .entries
                    .get(&r.entry_id)
                    .map(|e| e.spiffe_id.clone());
                if let Some(blob) = bound_keys.remove(&r.entry_id) {
                    let stored = StoredBoundSvid {
                        key: blob,
                        chain: r.cert_chain.iter().map(|c| B64.encode(c)).collect(),
                        refresh_at: 0,
                    };
                    match stored.to_bound() {
                        Ok((svid, id)) if expected.as_deref() == Some(id.as_str()) => {
                            let at = refresh_at(now_unix(), svid.not_after);
                            live.state.bound.insert(
                                r.entry_id.clone(),
                                StoredBoundSvid {
                                    refresh_at: at,
                                    ..stored
                                },
                            );
                            live.bound.insert(r.entry_id, (Arc::new(svid), at));
                            changed = true;
                        }
                        Ok(_) => {
                            tracing::warn!(entry = %r.entry_id, "server returned a bound SVID for another identity")
                        }
                        Err(e) => {
                            tracing::warn!(entry = %r.entry_id, error = %e, "server returned an invalid bound SVID")
                        }
                    }
                    continue;
                }
                let Some(key) = keys.remove(&r.entry_id) else {
                    continue;
                };
                match X509Svid::new(r.cert_chain.into_iter().map(Into::into).collect(), key) {
                    Ok(svid) if expected.as_deref() == Some(svid.spiffe_id().as_str()) => {
                        let stored = StoredSvid::from_svid(&svid);
                        let at = stored.refresh_at;
                        live.state.svids.insert(r.entry_id.clone(), stored);
                        live.svids.insert(r.entry_id, (Arc::new(svid), at));
                        changed = true;
                    }
                    Ok(_) => {
                        tracing::warn!(entry = %r.entry_id, "server returned an SVID for another identity")
                    }
                    Err(e) => {
                        tracing::warn!(entry = %r.entry_id, error = %e, "server returned an invalid SVID")
                    }
                }
            }
        }

        if changed {
            self.lock().state.save(&self.inner.data_dir)?;
            self.publish();
        }
        Ok(())
    }
}

impl ServerIdentitySource {
    /// For each TPM-bound entry in `ids`: its key (made in the TPM the
    /// first time, and again if the TPM can no longer use it) and the
    /// request carrying the AK's certification of it. Keys are persisted
    /// before they are sent. An entry whose key cannot be certified now is
    /// left for the next sync.
    async fn bound_requests(
        &self,
        holder: &Arc<dyn WorkloadKeyHolder>,
        ids: &[String],
    ) -> Result<Vec<(String, BoundKeyBlob, pb::X509SvidRequest)>, SyncError> {
        let mut out = Vec::new();
        let mut created = false;
        for id in ids {
            let existing = self.lock().state.bound.get(id).map(|b| b.key.clone());
            let (holder, id_owned) = (holder.clone(), id.clone());
            let made = tokio::task::spawn_blocking(move || {
                let mut fresh = false;
                let mut blob = match existing {
                    Some(b) => b,
                    None => {
                        fresh = true;
                        holder.create()?
                    }
                };
                let cert = match holder.certify(&blob, &id_owned) {
                    Err(KeyHolderError::KeyUnusable(why)) if !fresh => {
                        tracing::warn!(entry = %id_owned, error = %why, "the TPM-bound key is unusable; making a new one");
                        fresh = true;
                        blob = holder.create()?;
                        holder.certify(&blob, &id_owned)?
                    }
                    other => other?,
                };
                Ok::<_, KeyHolderError>((blob, cert, fresh))
            })
            .await
            .map_err(|e| SyncError::Invalid(format!("TPM task: {e}")))?;
            let (blob, cert, fresh) = match made {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(entry = %id, error = %e, "cannot certify the TPM-bound key now");
                    continue;
                }
            };
            let public = match blob.public() {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(entry = %id, error = %e, "the TPM made an unexpected key");
                    continue;
                }
            };
            if fresh {
                // Persist the new key (without a certificate yet) before the
                // server sees it: its private blob is only in memory so far.
                let mut live = self.lock();
                live.state.bound.insert(
                    id.clone(),
                    StoredBoundSvid {
                        key: blob.clone(),
                        chain: Vec::new(),
                        refresh_at: 0,
                    },
                );
                live.bound.remove(id);
                created = true;
            }
            out.push((
                id.clone(),
                blob,
                pb::X509SvidRequest {
                    entry_id: id.clone(),
                    public_key: public.spki,
                    csr: Vec::new(),
                    tpm_key: Some(pb::TpmKeyCertification {
                        public: cert.public,
                        certify_info: cert.certify_info,
                        signature: cert.signature,
                    }),
                },
            ));
        }
        if created {
            self.lock().state.save(&self.inner.data_dir)?;
        }
        Ok(out)
    }
}

impl IdentitySource for ServerIdentitySource {
    fn subscribe(&self) -> watch::Receiver<Arc<IdentitySnapshot>> {
        self.inner.tx.subscribe()
    }

    fn fetch_jwt_svid<'a>(
        &'a self,
        authorized: &'a AuthorizedAudience,
    ) -> BoxFuture<'a, Result<MintedJwtSvid, SourceError>> {
        Box::pin(async move {
            let cnf_jkt = match authorized.entry().key_binding {
                KeyBinding::Tpm => self
                    .lock()
                    .bound
                    .get(&authorized.entry().id)
                    .map(|(b, _)| b.jkt.clone())
                    .ok_or_else(|| {
                        SourceError::Unavailable("the TPM-bound key is not certified yet".into())
                    })?,
                _ => String::new(),
            };
            let mut api = self.api();
            let resp = api
                .mint_jwt_svid(pb::MintJwtSvidRequest {
                    spiffe_id: authorized.entry().spiffe_id.to_string(),
                    audience: authorized.audience().to_owned(),
                    cnf_jkt,
                })
                .await
                .map_err(|s| match s.code() {
                    tonic::Code::PermissionDenied | tonic::Code::NotFound => {
                        SourceError::UnknownEntry(authorized.entry().id.clone())
                    }
                    tonic::Code::InvalidArgument | tonic::Code::Internal => {
                        SourceError::Internal(s.message().to_owned())
                    }
                    _ => SourceError::Unavailable(s.message().to_owned()),
                })?
                .into_inner();
            Ok(MintedJwtSvid {
                spiffe_id: authorized.entry().spiffe_id.clone(),
                token: resp.token,
                expiry: resp.expires_at,
            })
        })
    }

    fn sign_with_bound_key<'a>(
        &'a self,
        entry: &'a RegistrationEntry,
        digest: [u8; 32],
    ) -> BoxFuture<'a, Result<[u8; 64], SourceError>> {
        Box::pin(async move {
            let Some(holder) = self.inner.keys.clone() else {
                return Err(SourceError::UnknownEntry(entry.id.clone()));
            };
            // Only a key whose certificate is being served signs.
            let blob = {
                let live = self.lock();
                match (live.bound.get(&entry.id), live.state.bound.get(&entry.id)) {
                    (Some(_), Some(stored)) => stored.key.clone(),
                    _ => return Err(SourceError::UnknownEntry(entry.id.clone())),
                }
            };
            tokio::task::spawn_blocking(move || holder.sign(&blob, &digest))
                .await
                .map_err(|e| SourceError::Internal(format!("TPM task: {e}")))?
                .map_err(|e| match e {
                    KeyHolderError::Failed(why) => SourceError::Unavailable(why),
                    other => SourceError::Internal(other.to_string()),
                })
        })
    }
}
