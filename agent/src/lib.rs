//! # sigil-agent
//!
//! The Sigil node agent. This crate holds the workload-facing half:
//!
//! - [`workload_attest`]: who is calling — the caller's process, pinned at
//!   accept against PID reuse, turned into [`selector::Selector`]s
//!   (`unix:uid:1000`, `unix:sha256:…`, `systemd:unit:…`);
//! - [`entry`]: which registration entries those selectors earn, and which
//!   audiences each entry may mint JWT-SVIDs for (pure functions);
//! - [`identity`]: the narrow boundary to whatever holds the SVIDs (the cache
//!   synced from the server, or [`local_ca::LocalCa`] in tests and demos);
//! - [`jwt_cache`]: JWT-SVIDs cached per (identity, audience) until half
//!   life, served from cache while the source is unavailable;
//! - [`workload_api`]: the SPIFFE Workload API over a Unix socket;
//! - [`audit`]: one JSON line per attested Workload API call.
//!
//! Every Workload API handler runs *validate → attest → authorize → act →
//! audit*; the caller sees a generic message and the right gRPC status, the
//! audit log gets the detail.

pub mod audit;
pub mod bound_keys;
pub mod cache;
pub mod entry;
pub mod identity;
pub mod jwt_cache;
pub mod local_ca;
pub mod node_client;
pub mod run;
pub mod selector;
#[cfg(feature = "tpm")]
pub mod tpm;
pub mod workload_api;
pub mod workload_attest;
