//! Persistent server state behind the [`Store`] trait, and [`SledStore`], an
//! embedded sled database under the data dir.
//!
//! Durability: sled acknowledges writes before they reach the disk (it
//! fsyncs every 500 ms). Every [`SledStore`] method that changes state calls
//! `flush()` before it returns `Ok`, so a write the caller acknowledges
//! survives `kill -9` and power loss.
//!
//! Join tokens are stored only as SHA-256 hashes. Spending one is a single
//! `compare_and_swap` of the unspent record for a "spent" tombstone: of any
//! number of concurrent spenders exactly one sees its swap succeed.
//!
//! Entry changes are numbered by a store-wide revision counter. Each change
//! appends `(revision → entry id, parent id, deleted?)` to a change log in
//! the same transaction as the change itself, so an agent can ask for
//! "changes since revision N" without a full scan of the entries.
//!
//! TPM-bound workload keys ([`WorkloadKey`]) are keyed by `(agent, entry)`
//! and exist only for an entry's current parent: recording one checks, in
//! the same transaction, that the entry exists under that agent, and
//! deleting an entry or moving it to another agent removes its record in
//! the transaction that does so. An agent's records outlive its eviction
//! and re-attestation (see [`Store::put_workload_key`]).

use crate::model::{Agent, Entry, StoredCa, StoredJwtKey, StoredX509Ca, WorkloadKey};
use serde::{Deserialize, Serialize};
use sigil::SpiffeId;
use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError};
use std::path::Path;

/// Store failures.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The database reported an error (I/O, corruption).
    #[error("database error: {0}")]
    Db(String),
    /// A record does not decode.
    #[error("corrupt record in {tree}: {reason}")]
    Corrupt {
        /// Which tree.
        tree: &'static str,
        /// Why.
        reason: String,
    },
    /// The record does not exist.
    #[error("not found")]
    NotFound,
    /// The record exists already.
    #[error("already exists")]
    AlreadyExists,
    /// The record changed concurrently in a way that refuses this update.
    #[error("refused: {0}")]
    Refused(String),
}

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        Self::Db(e.to_string())
    }
}

/// What spending a join token found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpendOutcome {
    /// This caller spent the token: it was unspent and not expired.
    Spent,
    /// The token had been spent before (by this or a concurrent caller).
    AlreadySpent,
    /// The token had expired; it is now deleted.
    Expired,
    /// No such token.
    Unknown,
}

/// Entries for one agent changed since a revision.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EntryChanges {
    /// Current versions of entries created or updated since the revision.
    pub entries: Vec<Entry>,
    /// IDs of entries deleted since the revision.
    pub deleted: Vec<String>,
    /// The revision this answer is complete up to.
    pub revision: u64,
}

/// Persistent server state. Every mutating method is durable when it
/// returns `Ok`.
pub trait Store: Send + Sync + std::fmt::Debug {
    /// The trust domain the state belongs to, if the store was initialized.
    fn trust_domain(&self) -> Result<Option<String>, StoreError>;
    /// Marks the store as initialized for `td`.
    fn set_trust_domain(&self, td: &str) -> Result<(), StoreError>;

    /// The trust bundle's sequence number (0 before the first bump).
    fn bundle_sequence(&self) -> Result<u64, StoreError>;
    /// Increments the bundle sequence number and returns the new value.
    fn bump_bundle_sequence(&self) -> Result<u64, StoreError>;

    /// The X.509 CA, if any.
    fn ca(&self) -> Result<Option<StoredCa>, StoreError>;
    /// Stores the CA; refuses to replace an existing one.
    fn put_ca(&self, ca: &StoredCa) -> Result<(), StoreError>;
    /// Deletes the pre-rotation CA record (after its migration).
    fn delete_legacy_ca(&self) -> Result<(), StoreError>;

    /// All X.509 CAs of the rotation (prepared, active, retired).
    fn x509_cas(&self) -> Result<Vec<StoredX509Ca>, StoreError>;
    /// Inserts or replaces an X.509 CA.
    fn put_x509_ca(&self, ca: &StoredX509Ca) -> Result<(), StoreError>;
    /// Deletes an X.509 CA.
    fn delete_x509_ca(&self, id: &str) -> Result<(), StoreError>;

    /// All JWT keys.
    fn jwt_keys(&self) -> Result<Vec<StoredJwtKey>, StoreError>;
    /// Inserts or replaces a JWT key.
    fn put_jwt_key(&self, key: &StoredJwtKey) -> Result<(), StoreError>;
    /// Deletes a JWT key.
    fn delete_jwt_key(&self, kid: &str) -> Result<(), StoreError>;

    /// Records a join token by the SHA-256 of its value.
    fn put_join_token(&self, hash: &[u8; 32], expires_at: i64) -> Result<(), StoreError>;
    /// Spends a join token: one atomic compare-and-swap.
    fn spend_join_token(&self, hash: &[u8; 32], now: i64) -> Result<SpendOutcome, StoreError>;
    /// Deletes token records (spent or not) that expired before `before`.
    /// Returns how many were deleted.
    fn purge_join_tokens(&self, before: i64) -> Result<usize, StoreError>;

    /// Creates an entry, assigning its revision.
    fn create_entry(&self, entry: Entry) -> Result<Entry, StoreError>;
    /// Replaces an entry (same ID), assigning a new revision. When the
    /// parent changes, the old parent's agent sees a deletion.
    fn update_entry(&self, entry: Entry) -> Result<Entry, StoreError>;
    /// Deletes an entry.
    fn delete_entry(&self, id: &str) -> Result<Entry, StoreError>;
    /// One entry.
    fn entry(&self, id: &str) -> Result<Option<Entry>, StoreError>;
    /// Every entry.
    fn entries(&self) -> Result<Vec<Entry>, StoreError>;
    /// Entries whose parent is `parent` (index scan).
    fn entries_by_parent(&self, parent: &SpiffeId) -> Result<Vec<Entry>, StoreError>;
    /// Changes to `parent`'s entries after `since`.
    fn entry_changes(&self, parent: &SpiffeId, since: u64) -> Result<EntryChanges, StoreError>;

    /// Inserts an agent; refuses to replace one.
    fn create_agent(&self, agent: &Agent) -> Result<(), StoreError>;
    /// One agent.
    fn agent(&self, id: &SpiffeId) -> Result<Option<Agent>, StoreError>;
    /// Every agent.
    fn agents(&self) -> Result<Vec<Agent>, StoreError>;
    /// Atomically applies `f` to an agent (compare-and-swap loop). `f` may
    /// refuse with an error, which is returned unchanged.
    fn update_agent(
        &self,
        id: &SpiffeId,
        f: &dyn Fn(&mut Agent) -> Result<(), StoreError>,
    ) -> Result<Agent, StoreError>;

    /// Puts an EK hash (lowercase hex SHA-256 of the EK SubjectPublicKeyInfo)
    /// on the TPM allow-list. False if it was already there.
    fn allow_tpm_ek(&self, hash: &str, now: i64) -> Result<bool, StoreError>;
    /// Takes an EK hash off the allow-list. False if it was not there.
    fn remove_tpm_ek(&self, hash: &str) -> Result<bool, StoreError>;
    /// Whether an EK hash is on the allow-list.
    fn tpm_ek_allowed(&self, hash: &str) -> Result<bool, StoreError>;
    /// The allow-list: (hash, added at) pairs in hash order.
    fn tpm_eks(&self) -> Result<Vec<(String, i64)>, StoreError>;

    /// Records the TPM-resident key accepted for entry `entry_id` of
    /// `agent`, replacing any earlier one, atomically with the check that
    /// the entry exists and `agent` is its parent ([`StoreError::NotFound`]
    /// or [`StoreError::Refused`] otherwise, and nothing is written).
    ///
    /// Lifecycle: deleting the entry, or moving it to another parent,
    /// removes the record in the same transaction. Evicting or banning the
    /// agent does not: a banned or evicted agent cannot call the node API,
    /// and an agent's ID is the hash of its TPM's EK, so after a
    /// re-attestation the record still names a key certified to be in that
    /// same TPM (and for that entry ID, which is random and never reused).
    /// The next accepted certification for the entry overwrites it.
    fn put_workload_key(
        &self,
        agent: &SpiffeId,
        entry_id: &str,
        key: &WorkloadKey,
    ) -> Result<(), StoreError>;
    /// The key recorded for entry `entry_id` of `agent`, if any.
    fn workload_key(
        &self,
        agent: &SpiffeId,
        entry_id: &str,
    ) -> Result<Option<WorkloadKey>, StoreError>;
}

const META_TRUST_DOMAIN: &[u8] = b"trust_domain";
const META_REVISION: &[u8] = b"revision";
const KEY_CA: &[u8] = b"ca";
const META_BUNDLE_SEQUENCE: &[u8] = b"bundle_sequence";

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
enum TokenRecord {
    Unspent { expires_at: i64 },
    Spent { spent_at: i64, expires_at: i64 },
}

#[derive(Debug, Serialize, Deserialize)]
struct ChangeRecord {
    entry_id: String,
    parent_id: String,
    deleted: bool,
}

/// The sled-backed [`Store`].
#[derive(Debug, Clone)]
pub struct SledStore {
    db: sled::Db,
    meta: sled::Tree,
    keys: sled::Tree,
    jwt_keys: sled::Tree,
    x509_cas: sled::Tree,
    tokens: sled::Tree,
    entries: sled::Tree,
    by_parent: sled::Tree,
    changes: sled::Tree,
    agents: sled::Tree,
    tpm_eks: sled::Tree,
    /// `agent id \0 entry id` → [`WorkloadKey`] (JSON).
    workload_keys: sled::Tree,
}

/// Runs `f`, which may block on disk I/O (an fsync), without stalling the
/// async runtime: on a multi-threaded tokio runtime through
/// `block_in_place`, elsewhere (plain threads, a current-thread runtime)
/// directly.
pub fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

fn enc<T: Serialize>(v: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(v).map_err(|e| StoreError::Db(format!("encode: {e}")))
}

fn dec<T: for<'de> Deserialize<'de>>(tree: &'static str, b: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(b).map_err(|e| StoreError::Corrupt {
        tree,
        reason: e.to_string(),
    })
}

fn parent_key(parent: &str, entry_id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(parent.len() + 1 + entry_id.len());
    k.extend_from_slice(parent.as_bytes());
    k.push(0);
    k.extend_from_slice(entry_id.as_bytes());
    k
}

fn parent_prefix(parent: &str) -> Vec<u8> {
    let mut k = parent.as_bytes().to_vec();
    k.push(0);
    k
}

fn decode_rev(b: Option<sled::IVec>) -> u64 {
    b.and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
        .map(u64::from_be_bytes)
        .unwrap_or(0)
}

fn tx_err(e: TransactionError<StoreError>) -> StoreError {
    match e {
        TransactionError::Abort(e) => e,
        TransactionError::Storage(e) => e.into(),
    }
}

impl SledStore {
    /// Opens (or creates) the database in `dir`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let db = sled::Config::new().path(dir).open()?;
        Ok(Self {
            meta: db.open_tree("meta")?,
            keys: db.open_tree("keys")?,
            jwt_keys: db.open_tree("jwt_keys")?,
            x509_cas: db.open_tree("x509_cas")?,
            tokens: db.open_tree("join_tokens")?,
            entries: db.open_tree("entries")?,
            by_parent: db.open_tree("entries_by_parent")?,
            changes: db.open_tree("entry_changes")?,
            agents: db.open_tree("agents")?,
            tpm_eks: db.open_tree("tpm_ek_allow")?,
            workload_keys: db.open_tree("workload_keys")?,
            db,
        })
    }

    fn flush(&self) -> Result<(), StoreError> {
        blocking(|| self.db.flush())?;
        Ok(())
    }
}

impl Store for SledStore {
    fn trust_domain(&self) -> Result<Option<String>, StoreError> {
        self.meta
            .get(META_TRUST_DOMAIN)?
            .map(|v| {
                String::from_utf8(v.to_vec()).map_err(|e| StoreError::Corrupt {
                    tree: "meta",
                    reason: e.to_string(),
                })
            })
            .transpose()
    }

    fn set_trust_domain(&self, td: &str) -> Result<(), StoreError> {
        self.meta.insert(META_TRUST_DOMAIN, td.as_bytes())?;
        self.flush()
    }

    fn bundle_sequence(&self) -> Result<u64, StoreError> {
        Ok(decode_rev(self.meta.get(META_BUNDLE_SEQUENCE)?))
    }

    fn bump_bundle_sequence(&self) -> Result<u64, StoreError> {
        let new = self.meta.update_and_fetch(META_BUNDLE_SEQUENCE, |old| {
            let n = decode_rev(old.map(sled::IVec::from)) + 1;
            Some(n.to_be_bytes().to_vec())
        })?;
        self.flush()?;
        Ok(decode_rev(new))
    }

    fn ca(&self) -> Result<Option<StoredCa>, StoreError> {
        self.keys.get(KEY_CA)?.map(|v| dec("keys", &v)).transpose()
    }

    fn put_ca(&self, ca: &StoredCa) -> Result<(), StoreError> {
        let v = enc(ca)?;
        self.keys
            .compare_and_swap(KEY_CA, None::<&[u8]>, Some(v))?
            .map_err(|_| StoreError::AlreadyExists)?;
        self.flush()
    }

    fn delete_legacy_ca(&self) -> Result<(), StoreError> {
        self.keys.remove(KEY_CA)?;
        self.flush()
    }

    fn x509_cas(&self) -> Result<Vec<StoredX509Ca>, StoreError> {
        self.x509_cas
            .iter()
            .map(|kv| {
                let (_, v) = kv?;
                dec("x509_cas", &v)
            })
            .collect()
    }

    fn put_x509_ca(&self, ca: &StoredX509Ca) -> Result<(), StoreError> {
        self.x509_cas.insert(ca.id.as_bytes(), enc(ca)?)?;
        self.flush()
    }

    fn delete_x509_ca(&self, id: &str) -> Result<(), StoreError> {
        self.x509_cas.remove(id.as_bytes())?;
        self.flush()
    }

    fn jwt_keys(&self) -> Result<Vec<StoredJwtKey>, StoreError> {
        self.jwt_keys
            .iter()
            .map(|kv| {
                let (_, v) = kv?;
                dec("jwt_keys", &v)
            })
            .collect()
    }

    fn put_jwt_key(&self, key: &StoredJwtKey) -> Result<(), StoreError> {
        self.jwt_keys.insert(key.kid.as_bytes(), enc(key)?)?;
        self.flush()
    }

    fn delete_jwt_key(&self, kid: &str) -> Result<(), StoreError> {
        self.jwt_keys.remove(kid.as_bytes())?;
        self.flush()
    }

    fn put_join_token(&self, hash: &[u8; 32], expires_at: i64) -> Result<(), StoreError> {
        let v = enc(&TokenRecord::Unspent { expires_at })?;
        self.tokens
            .compare_and_swap(hash, None::<&[u8]>, Some(v))?
            .map_err(|_| StoreError::AlreadyExists)?;
        self.flush()
    }

    fn spend_join_token(&self, hash: &[u8; 32], now: i64) -> Result<SpendOutcome, StoreError> {
        let Some(current) = self.tokens.get(hash)? else {
            return Ok(SpendOutcome::Unknown);
        };
        let expires_at = match dec("join_tokens", &current)? {
            TokenRecord::Spent { .. } => return Ok(SpendOutcome::AlreadySpent),
            TokenRecord::Unspent { expires_at } => expires_at,
        };
        if now >= expires_at {
            // Expired: delete it, whoever wins the race.
            let _ = self
                .tokens
                .compare_and_swap(hash, Some(&current), None::<&[u8]>)?;
            self.flush()?;
            return Ok(SpendOutcome::Expired);
        }
        let tombstone = enc(&TokenRecord::Spent {
            spent_at: now,
            expires_at,
        })?;
        // The one atomic step: only the caller whose swap succeeds spent it.
        match self
            .tokens
            .compare_and_swap(hash, Some(&current), Some(tombstone))?
        {
            Ok(()) => {
                self.flush()?;
                Ok(SpendOutcome::Spent)
            }
            Err(_) => Ok(SpendOutcome::AlreadySpent),
        }
    }

    fn purge_join_tokens(&self, before: i64) -> Result<usize, StoreError> {
        let mut n = 0;
        for kv in self.tokens.iter() {
            let (k, v) = kv?;
            let expires_at = match dec("join_tokens", &v)? {
                TokenRecord::Unspent { expires_at } | TokenRecord::Spent { expires_at, .. } => {
                    expires_at
                }
            };
            // Compare-and-delete, so a concurrent spend is never undone.
            if expires_at < before
                && self
                    .tokens
                    .compare_and_swap(&k, Some(&v), None::<&[u8]>)?
                    .is_ok()
            {
                n += 1;
            }
        }
        if n > 0 {
            self.flush()?;
        }
        Ok(n)
    }

    fn create_entry(&self, entry: Entry) -> Result<Entry, StoreError> {
        let idx = parent_key(entry.parent_id.as_str(), &entry.id);
        let out = (&self.meta, &self.entries, &self.by_parent, &self.changes)
            .transaction(|(meta, entries, by_parent, changes)| {
                if entries.get(entry.id.as_bytes())?.is_some() {
                    return Err(ConflictableTransactionError::Abort(
                        StoreError::AlreadyExists,
                    ));
                }
                let rev = decode_rev(meta.get(META_REVISION)?) + 1;
                let mut e = entry.clone();
                e.revision = rev;
                let change = ChangeRecord {
                    entry_id: e.id.clone(),
                    parent_id: e.parent_id.to_string(),
                    deleted: false,
                };
                let ev = enc(&e).map_err(ConflictableTransactionError::Abort)?;
                let cv = enc(&change).map_err(ConflictableTransactionError::Abort)?;
                meta.insert(META_REVISION, &rev.to_be_bytes())?;
                entries.insert(e.id.as_bytes(), ev)?;
                by_parent.insert(idx.clone(), &[])?;
                changes.insert(&rev.to_be_bytes(), cv)?;
                Ok(e)
            })
            .map_err(tx_err)?;
        self.flush()?;
        Ok(out)
    }

    fn update_entry(&self, entry: Entry) -> Result<Entry, StoreError> {
        let out = (
            &self.meta,
            &self.entries,
            &self.by_parent,
            &self.changes,
            &self.workload_keys,
        )
            .transaction(|(meta, entries, by_parent, changes, workload_keys)| {
                let Some(old) = entries.get(entry.id.as_bytes())? else {
                    return Err(ConflictableTransactionError::Abort(StoreError::NotFound));
                };
                let old: Entry =
                    dec("entries", &old).map_err(ConflictableTransactionError::Abort)?;
                let mut rev = decode_rev(meta.get(META_REVISION)?);
                if old.parent_id != entry.parent_id {
                    rev += 1;
                    let gone = ChangeRecord {
                        entry_id: old.id.clone(),
                        parent_id: old.parent_id.to_string(),
                        deleted: true,
                    };
                    let gv = enc(&gone).map_err(ConflictableTransactionError::Abort)?;
                    changes.insert(&rev.to_be_bytes(), gv)?;
                    by_parent.remove(parent_key(old.parent_id.as_str(), &old.id))?;
                    by_parent.insert(parent_key(entry.parent_id.as_str(), &entry.id), &[])?;
                    // The old parent's TPM holds the certified key, not the
                    // new one's.
                    workload_keys.remove(parent_key(old.parent_id.as_str(), &old.id))?;
                }
                rev += 1;
                let mut e = entry.clone();
                e.revision = rev;
                e.created_at = old.created_at;
                let change = ChangeRecord {
                    entry_id: e.id.clone(),
                    parent_id: e.parent_id.to_string(),
                    deleted: false,
                };
                let ev = enc(&e).map_err(ConflictableTransactionError::Abort)?;
                let cv = enc(&change).map_err(ConflictableTransactionError::Abort)?;
                meta.insert(META_REVISION, &rev.to_be_bytes())?;
                entries.insert(e.id.as_bytes(), ev)?;
                changes.insert(&rev.to_be_bytes(), cv)?;
                Ok(e)
            })
            .map_err(tx_err)?;
        self.flush()?;
        Ok(out)
    }

    fn delete_entry(&self, id: &str) -> Result<Entry, StoreError> {
        let out = (
            &self.meta,
            &self.entries,
            &self.by_parent,
            &self.changes,
            &self.workload_keys,
        )
            .transaction(|(meta, entries, by_parent, changes, workload_keys)| {
                let Some(old) = entries.get(id.as_bytes())? else {
                    return Err(ConflictableTransactionError::Abort(StoreError::NotFound));
                };
                let old: Entry =
                    dec("entries", &old).map_err(ConflictableTransactionError::Abort)?;
                let rev = decode_rev(meta.get(META_REVISION)?) + 1;
                let change = ChangeRecord {
                    entry_id: old.id.clone(),
                    parent_id: old.parent_id.to_string(),
                    deleted: true,
                };
                let cv = enc(&change).map_err(ConflictableTransactionError::Abort)?;
                meta.insert(META_REVISION, &rev.to_be_bytes())?;
                entries.remove(id.as_bytes())?;
                by_parent.remove(parent_key(old.parent_id.as_str(), id))?;
                workload_keys.remove(parent_key(old.parent_id.as_str(), id))?;
                changes.insert(&rev.to_be_bytes(), cv)?;
                Ok(old)
            })
            .map_err(tx_err)?;
        self.flush()?;
        Ok(out)
    }

    fn entry(&self, id: &str) -> Result<Option<Entry>, StoreError> {
        self.entries
            .get(id.as_bytes())?
            .map(|v| dec("entries", &v))
            .transpose()
    }

    fn entries(&self) -> Result<Vec<Entry>, StoreError> {
        self.entries
            .iter()
            .map(|kv| {
                let (_, v) = kv?;
                dec("entries", &v)
            })
            .collect()
    }

    fn entries_by_parent(&self, parent: &SpiffeId) -> Result<Vec<Entry>, StoreError> {
        let prefix = parent_prefix(parent.as_str());
        let mut out = Vec::new();
        for kv in self.by_parent.scan_prefix(&prefix) {
            let (k, _) = kv?;
            let id = &k[prefix.len()..];
            if let Some(v) = self.entries.get(id)? {
                out.push(dec("entries", &v)?);
            }
        }
        Ok(out)
    }

    fn entry_changes(&self, parent: &SpiffeId, since: u64) -> Result<EntryChanges, StoreError> {
        // Read the revision first: every change up to it is in the log.
        let revision = decode_rev(self.meta.get(META_REVISION)?);
        if since >= revision {
            return Ok(EntryChanges {
                revision,
                ..EntryChanges::default()
            });
        }
        if since == 0 {
            // A first sync is the agent's current entries, from the parent
            // index: no scan of the whole change log. An entry created after
            // `revision` was read may show up here and again next time; an
            // upsert makes that harmless.
            return Ok(EntryChanges {
                entries: self.entries_by_parent(parent)?,
                deleted: Vec::new(),
                revision,
            });
        }
        let mut last: std::collections::BTreeMap<String, bool> = Default::default();
        let start = (since + 1).to_be_bytes();
        let end = revision.to_be_bytes();
        for kv in self.changes.range(start..=end) {
            let (_, v) = kv?;
            let c: ChangeRecord = dec("entry_changes", &v)?;
            if c.parent_id == parent.as_str() {
                last.insert(c.entry_id, c.deleted);
            }
        }
        let mut out = EntryChanges {
            revision,
            ..EntryChanges::default()
        };
        for (id, deleted) in last {
            if deleted {
                out.deleted.push(id);
                continue;
            }
            match self.entry(&id)? {
                // Deleted after `revision` was read: the next sync says so.
                Some(e) if e.revision <= revision => out.entries.push(e),
                Some(_) | None => {}
            }
        }
        Ok(out)
    }

    fn create_agent(&self, agent: &Agent) -> Result<(), StoreError> {
        let v = enc(agent)?;
        self.agents
            .compare_and_swap(agent.spiffe_id.as_str(), None::<&[u8]>, Some(v))?
            .map_err(|_| StoreError::AlreadyExists)?;
        self.flush()
    }

    fn agent(&self, id: &SpiffeId) -> Result<Option<Agent>, StoreError> {
        self.agents
            .get(id.as_str())?
            .map(|v| dec("agents", &v))
            .transpose()
    }

    fn agents(&self) -> Result<Vec<Agent>, StoreError> {
        self.agents
            .iter()
            .map(|kv| {
                let (_, v) = kv?;
                dec("agents", &v)
            })
            .collect()
    }

    fn update_agent(
        &self,
        id: &SpiffeId,
        f: &dyn Fn(&mut Agent) -> Result<(), StoreError>,
    ) -> Result<Agent, StoreError> {
        loop {
            let Some(old) = self.agents.get(id.as_str())? else {
                return Err(StoreError::NotFound);
            };
            let mut agent: Agent = dec("agents", &old)?;
            f(&mut agent)?;
            let new = enc(&agent)?;
            if self
                .agents
                .compare_and_swap(id.as_str(), Some(&old), Some(new))?
                .is_ok()
            {
                self.flush()?;
                return Ok(agent);
            }
        }
    }

    fn allow_tpm_ek(&self, hash: &str, now: i64) -> Result<bool, StoreError> {
        let added = self
            .tpm_eks
            .compare_and_swap(hash, None::<&[u8]>, Some(&now.to_be_bytes()[..]))?
            .is_ok();
        self.flush()?;
        Ok(added)
    }

    fn remove_tpm_ek(&self, hash: &str) -> Result<bool, StoreError> {
        let removed = self.tpm_eks.remove(hash)?.is_some();
        self.flush()?;
        Ok(removed)
    }

    fn tpm_ek_allowed(&self, hash: &str) -> Result<bool, StoreError> {
        Ok(self.tpm_eks.contains_key(hash)?)
    }

    fn tpm_eks(&self) -> Result<Vec<(String, i64)>, StoreError> {
        self.tpm_eks
            .iter()
            .map(|kv| {
                let (k, v) = kv?;
                let hash = String::from_utf8(k.to_vec()).map_err(|e| StoreError::Corrupt {
                    tree: "tpm_ek_allow",
                    reason: e.to_string(),
                })?;
                let at = <[u8; 8]>::try_from(v.as_ref())
                    .map(i64::from_be_bytes)
                    .map_err(|_| StoreError::Corrupt {
                        tree: "tpm_ek_allow",
                        reason: "bad timestamp".into(),
                    })?;
                Ok((hash, at))
            })
            .collect()
    }

    fn put_workload_key(
        &self,
        agent: &SpiffeId,
        entry_id: &str,
        key: &WorkloadKey,
    ) -> Result<(), StoreError> {
        let v = enc(key)?;
        let k = parent_key(agent.as_str(), entry_id);
        (&self.entries, &self.workload_keys)
            .transaction(|(entries, workload_keys)| {
                let Some(e) = entries.get(entry_id.as_bytes())? else {
                    return Err(ConflictableTransactionError::Abort(StoreError::NotFound));
                };
                let e: Entry = dec("entries", &e).map_err(ConflictableTransactionError::Abort)?;
                if &e.parent_id != agent {
                    return Err(ConflictableTransactionError::Abort(StoreError::Refused(
                        "entry belongs to another agent".into(),
                    )));
                }
                workload_keys.insert(k.as_slice(), v.as_slice())?;
                Ok(())
            })
            .map_err(tx_err)?;
        self.flush()
    }

    fn workload_key(
        &self,
        agent: &SpiffeId,
        entry_id: &str,
    ) -> Result<Option<WorkloadKey>, StoreError> {
        self.workload_keys
            .get(parent_key(agent.as_str(), entry_id))?
            .map(|v| dec("workload_keys", &v))
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{AgentStatus, Selector};
    use sigil::AssuranceLevel;
    use std::sync::{Arc, Barrier};

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).unwrap()
    }

    fn entry(n: &str, parent: &str) -> Entry {
        Entry {
            id: n.into(),
            spiffe_id: id(&format!("spiffe://td/w/{n}")),
            parent_id: id(parent),
            selectors: vec![Selector {
                kind: "unix".into(),
                value: "uid:1000".into(),
            }],
            audiences: vec!["a".into()],
            x509_ttl: 3600,
            jwt_ttl: 300,
            dns_names: vec![],
            min_assurance: None,
            expires_at: None,
            key_binding: Default::default(),
            revision: 0,
            created_at: 0,
        }
    }

    #[test]
    fn token_spend_is_single_use_and_expires() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStore::open(dir.path()).unwrap();
        let h = [7u8; 32];
        s.put_join_token(&h, 100).unwrap();
        assert!(matches!(
            s.put_join_token(&h, 100),
            Err(StoreError::AlreadyExists)
        ));
        assert_eq!(s.spend_join_token(&h, 50).unwrap(), SpendOutcome::Spent);
        assert_eq!(
            s.spend_join_token(&h, 51).unwrap(),
            SpendOutcome::AlreadySpent
        );
        assert_eq!(
            s.spend_join_token(&[8u8; 32], 51).unwrap(),
            SpendOutcome::Unknown
        );
        let e = [9u8; 32];
        s.put_join_token(&e, 100).unwrap();
        assert_eq!(s.spend_join_token(&e, 100).unwrap(), SpendOutcome::Expired);
        // Expired tokens are deleted.
        assert_eq!(s.spend_join_token(&e, 10).unwrap(), SpendOutcome::Unknown);
        // Purging drops records (here the spent one) that expired before.
        assert_eq!(s.purge_join_tokens(100).unwrap(), 0);
        assert_eq!(s.purge_join_tokens(101).unwrap(), 1);
        assert_eq!(s.spend_join_token(&h, 52).unwrap(), SpendOutcome::Unknown);
    }

    #[test]
    fn token_spend_race_has_exactly_one_winner() {
        let dir = tempfile::tempdir().unwrap();
        let s = Arc::new(SledStore::open(dir.path()).unwrap());
        for round in 0..5u8 {
            let h = [round; 32];
            s.put_join_token(&h, i64::MAX).unwrap();
            let barrier = Arc::new(Barrier::new(16));
            let handles: Vec<_> = (0..16)
                .map(|_| {
                    let s = s.clone();
                    let b = barrier.clone();
                    std::thread::spawn(move || {
                        b.wait();
                        s.spend_join_token(&h, 1).unwrap()
                    })
                })
                .collect();
            let outcomes: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
            assert_eq!(
                outcomes
                    .iter()
                    .filter(|o| **o == SpendOutcome::Spent)
                    .count(),
                1
            );
            assert!(
                outcomes
                    .iter()
                    .all(|o| matches!(o, SpendOutcome::Spent | SpendOutcome::AlreadySpent))
            );
        }
    }

    #[test]
    fn spent_token_stays_spent_after_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let h = [1u8; 32];
        {
            let s = SledStore::open(dir.path()).unwrap();
            s.put_join_token(&h, i64::MAX).unwrap();
            assert_eq!(s.spend_join_token(&h, 1).unwrap(), SpendOutcome::Spent);
        }
        let s = SledStore::open(dir.path()).unwrap();
        assert_eq!(
            s.spend_join_token(&h, 2).unwrap(),
            SpendOutcome::AlreadySpent
        );
    }

    #[test]
    fn entries_revisions_and_incremental_sync() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStore::open(dir.path()).unwrap();
        let a1 = id("spiffe://td/agent/join/a1");
        let a2 = id("spiffe://td/agent/join/a2");
        let e1 = s.create_entry(entry("e1", a1.as_str())).unwrap();
        let e2 = s.create_entry(entry("e2", a2.as_str())).unwrap();
        let e3 = s.create_entry(entry("e3", a1.as_str())).unwrap();
        assert_eq!((e1.revision, e2.revision, e3.revision), (1, 2, 3));
        assert!(matches!(
            s.create_entry(entry("e1", a1.as_str())),
            Err(StoreError::AlreadyExists)
        ));

        let all = s.entry_changes(&a1, 0).unwrap();
        assert_eq!(all.revision, 3);
        assert_eq!(
            all.entries
                .iter()
                .map(|e| e.id.as_str())
                .collect::<Vec<_>>(),
            ["e1", "e3"]
        );
        assert!(all.deleted.is_empty());
        // From the change log: only what changed after revision 1.
        let since1 = s.entry_changes(&a1, 1).unwrap();
        assert_eq!(since1.entries.len(), 1);
        assert_eq!(since1.entries[0].id, "e3");

        s.delete_entry("e1").unwrap();
        let inc = s.entry_changes(&a1, 3).unwrap();
        assert_eq!(inc.revision, 4);
        assert!(inc.entries.is_empty());
        assert_eq!(inc.deleted, ["e1"]);
        // Nothing for a2 since 2.
        let none = s.entry_changes(&a2, 2).unwrap();
        assert!(none.entries.is_empty() && none.deleted.is_empty());
        assert_eq!(none.revision, 4);

        let by_parent = s.entries_by_parent(&a1).unwrap();
        assert_eq!(by_parent.len(), 1);
        assert_eq!(by_parent[0].id, "e3");
        assert!(matches!(s.delete_entry("e1"), Err(StoreError::NotFound)));
        drop(s);
        let s = SledStore::open(dir.path()).unwrap();
        assert_eq!(s.entries().unwrap().len(), 2);
        assert_eq!(
            s.create_entry(entry("e4", a2.as_str())).unwrap().revision,
            5
        );
    }

    #[test]
    fn entry_update_and_reparenting_reach_both_agents() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStore::open(dir.path()).unwrap();
        let a1 = id("spiffe://td/agent/join/a1");
        let a2 = id("spiffe://td/agent/join/a2");
        let mut e = s.create_entry(entry("e1", a1.as_str())).unwrap();
        e.audiences = vec!["b".into()];
        let up = s.update_entry(e.clone()).unwrap();
        assert_eq!(up.revision, 2);
        let ch = s.entry_changes(&a1, 1).unwrap();
        assert_eq!(ch.entries[0].audiences, ["b"]);
        // Move it to a2: a1 sees a deletion, a2 the entry.
        e.parent_id = a2.clone();
        let moved = s.update_entry(e.clone()).unwrap();
        assert_eq!(moved.revision, 4);
        let ch1 = s.entry_changes(&a1, 2).unwrap();
        assert_eq!(ch1.deleted, ["e1"]);
        assert!(ch1.entries.is_empty());
        let ch2 = s.entry_changes(&a2, 2).unwrap();
        assert_eq!(ch2.entries.len(), 1);
        assert!(s.entries_by_parent(&a1).unwrap().is_empty());
        assert_eq!(s.entries_by_parent(&a2).unwrap().len(), 1);
        let mut ghost = e.clone();
        ghost.id = "nope".into();
        assert!(matches!(s.update_entry(ghost), Err(StoreError::NotFound)));
    }

    #[test]
    fn agents_and_cas_update() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStore::open(dir.path()).unwrap();
        let a = Agent {
            spiffe_id: id("spiffe://td/agent/join/x"),
            status: AgentStatus::Active,
            assurance: AssuranceLevel::Al1,
            method: "join_token".into(),
            serial: "01".into(),
            expires_at: 10,
            attested_at: 1,
            tpm_ak: None,
        };
        s.create_agent(&a).unwrap();
        assert!(matches!(s.create_agent(&a), Err(StoreError::AlreadyExists)));
        let up = s
            .update_agent(&a.spiffe_id, &|ag| {
                ag.status = AgentStatus::Evicted;
                Ok(())
            })
            .unwrap();
        assert_eq!(up.status, AgentStatus::Evicted);
        let refused = s.update_agent(&a.spiffe_id, &|_| Err(StoreError::Refused("no".into())));
        assert!(matches!(refused, Err(StoreError::Refused(_))));
        assert_eq!(
            s.agent(&a.spiffe_id).unwrap().unwrap().status,
            AgentStatus::Evicted
        );
        assert_eq!(s.agents().unwrap().len(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn writes_from_async_tasks_do_not_need_a_blocking_pool() {
        let dir = tempfile::tempdir().unwrap();
        let s = Arc::new(SledStore::open(dir.path()).unwrap());
        let tasks: Vec<_> = (0..8u8)
            .map(|i| {
                let s = s.clone();
                tokio::spawn(async move { s.put_join_token(&[i; 32], i64::MAX) })
            })
            .collect();
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        let on_current_thread =
            tokio::task::spawn_blocking(move || s.spend_join_token(&[0; 32], 1).unwrap());
        assert_eq!(on_current_thread.await.unwrap(), SpendOutcome::Spent);
    }

    #[test]
    fn workload_keys_exist_only_for_the_entrys_current_parent() {
        let dir = tempfile::tempdir().unwrap();
        let a1 = id("spiffe://td/agent/tpm/a1");
        let a2 = id("spiffe://td/agent/tpm/a2");
        let k = |jkt: &str| WorkloadKey {
            jkt: jkt.into(),
            certified_at: 1,
        };
        {
            let s = SledStore::open(dir.path()).unwrap();
            // No entry, or another agent's: refused, nothing written.
            assert!(matches!(
                s.put_workload_key(&a1, "e1", &k("x")),
                Err(StoreError::NotFound)
            ));
            s.create_entry(entry("e1", a1.as_str())).unwrap();
            assert!(matches!(
                s.put_workload_key(&a2, "e1", &k("x")),
                Err(StoreError::Refused(_))
            ));
            assert_eq!(s.workload_key(&a2, "e1").unwrap(), None);
            // Recorded, then overwritten.
            s.put_workload_key(&a1, "e1", &k("x")).unwrap();
            s.put_workload_key(&a1, "e1", &k("y")).unwrap();
        }
        // Durable.
        let s = SledStore::open(dir.path()).unwrap();
        assert_eq!(s.workload_key(&a1, "e1").unwrap(), Some(k("y")));
        // An update that keeps the parent keeps it; a move drops it.
        let mut e = s.entry("e1").unwrap().unwrap();
        e.audiences = vec!["b".into()];
        s.update_entry(e.clone()).unwrap();
        assert_eq!(s.workload_key(&a1, "e1").unwrap(), Some(k("y")));
        e.parent_id = a2.clone();
        s.update_entry(e.clone()).unwrap();
        assert_eq!(s.workload_key(&a1, "e1").unwrap(), None);
        // Deleting the entry drops its record.
        s.put_workload_key(&a2, "e1", &k("z")).unwrap();
        s.delete_entry("e1").unwrap();
        assert_eq!(s.workload_key(&a2, "e1").unwrap(), None);
    }

    #[test]
    fn agents_recorded_before_the_ak_field_still_load() {
        let old = br#"{"spiffe_id":"spiffe://td/agent/tpm/x","status":"active","assurance":"sigil:al2","method":"tpm","serial":"01","expires_at":10,"attested_at":1}"#;
        let a: Agent = dec("agents", old).unwrap();
        assert_eq!(a.tpm_ak, None);
        let mut with_ak = a.clone();
        with_ak.tpm_ak = Some(vec![1, 2, 3]);
        let back: Agent = dec("agents", &enc(&with_ak).unwrap()).unwrap();
        assert_eq!(back, with_ak);
        // A join-token agent's record has no AK member at all.
        assert!(
            !String::from_utf8(enc(&a).unwrap())
                .unwrap()
                .contains("tpm_ak")
        );
    }

    #[test]
    fn ca_is_never_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStore::open(dir.path()).unwrap();
        assert!(s.ca().unwrap().is_none());
        let ca = StoredCa {
            pkcs8: vec![1],
            cert: vec![2],
        };
        s.put_ca(&ca).unwrap();
        assert!(matches!(s.put_ca(&ca), Err(StoreError::AlreadyExists)));
        assert_eq!(s.ca().unwrap().unwrap(), ca);
    }
}
