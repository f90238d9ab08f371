//! What every API handler shares.

use crate::audit::{AuditEvent, AuditSink};
use crate::ca::{self, JwtKeys, X509Cas};
use crate::entry::TtlPolicy;
use crate::model::{hex, random_bytes};
use crate::store::Store;
use sigil::{Bundle, BundleSet, TrustDomain};
use std::sync::Arc;

/// Server state shared by the node and admin APIs.
#[derive(Debug)]
pub struct ServerState {
    /// The trust domain.
    pub td: TrustDomain,
    /// Persistent state.
    pub store: Arc<dyn Store>,
    /// The X.509 CAs (the active one signs).
    pub ca: Arc<X509Cas>,
    /// The JWT keys.
    pub jwt: JwtKeys,
    /// The audit log.
    pub audit: Arc<dyn AuditSink>,
    /// Entry TTL policy.
    pub ttl: TtlPolicy,
    /// Agent SVID lifetime, seconds.
    pub agent_svid_ttl: i64,
    /// `iss` claim of JWT-SVIDs, if any.
    pub jwt_issuer: Option<String>,
    /// Counters for `/metrics`.
    pub metrics: Metrics,
    /// TPM node attestation: EK trust and challenges in flight.
    pub tpm: crate::tpm::TpmAttestor,
}

/// Audit events counted by method and outcome: every attestation, mint
/// and refusal is audited, so this is what `/metrics` exports.
#[derive(Debug, Default)]
pub struct Metrics {
    counts: std::sync::Mutex<std::collections::BTreeMap<(String, &'static str), u64>>,
}

impl Metrics {
    /// Counts one event.
    pub fn count(&self, method: &str, outcome: &'static str) {
        let mut g = match self.counts.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        *g.entry((method.to_owned(), outcome)).or_insert(0) += 1;
    }

    /// Prometheus text exposition.
    pub fn prometheus(&self) -> String {
        let g = match self.counts.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let mut out = String::from(
            "# HELP sigil_events_total Audited events by API method and outcome.\n# TYPE sigil_events_total counter\n",
        );
        for ((method, outcome), n) in g.iter() {
            out.push_str(&format!(
                "sigil_events_total{{method=\"{method}\",outcome=\"{outcome}\"}} {n}\n"
            ));
        }
        out
    }
}

impl ServerState {
    /// The trust bundle as published now. Its sequence number grows with
    /// every change of the published keys.
    pub fn bundle(&self) -> Bundle {
        ca::bundle(&self.td, &self.ca, &self.jwt)
    }

    /// The bundle as a one-element set (for verification).
    pub fn bundle_set(&self) -> BundleSet {
        [self.bundle()].into_iter().collect()
    }

    /// Writes an audit line.
    /// Caller-supplied strings (IDs, audiences) are clipped to
    /// [`MAX_AUDIT_FIELD`] bytes so a request cannot bloat the log.
    pub fn audit(&self, ev: &AuditEvent) -> Result<(), crate::audit::AuditError> {
        self.metrics.count(&ev.method, ev.outcome);
        let mut ev = ev.clone();
        for f in [&mut ev.spiffe_id, &mut ev.audience, &mut ev.reason] {
            if let Some(s) = f.as_mut() {
                clip(s, MAX_AUDIT_FIELD);
            }
        }
        let ev = &ev;
        let r = self.audit.record(ev);
        if let Err(e) = &r {
            tracing::error!(error = %e, method = %ev.method, "audit log write failed");
        }
        r
    }
}

/// Longest caller-supplied string written to the audit log, bytes.
pub const MAX_AUDIT_FIELD: usize = 2048;

/// Truncates `s` to at most `max` bytes on a char boundary, marking the cut.
fn clip(s: &mut String, max: usize) {
    if s.len() <= max {
        return;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.truncate(end);
    s.push('…');
}

/// A random request ID.
pub fn request_id() -> String {
    random_bytes::<8>().map(|b| hex(&b)).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clip_respects_char_boundaries() {
        let mut s = "ééé".to_owned();
        clip(&mut s, 3);
        assert_eq!(s, "é…");
        let mut short = "abc".to_owned();
        clip(&mut short, 3);
        assert_eq!(short, "abc");
    }
}
