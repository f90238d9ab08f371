//! The audit log: one JSON object per line, one line per authentication,
//! attestation, mint and refusal.
//!
//! Fields: `time` (RFC 3339, UTC), `request_id`, `caller` (an agent's SPIFFE
//! ID, `uid:<n>` on the admin socket, or `unauthenticated`), `method`,
//! `assurance`, `spiffe_id`, `audience`, `outcome` (`ok`, `denied`,
//! `error`), `reason`, `jti`. By construction an [`AuditEvent`] has no field
//! for a token, a join-token value or a key.
//!
//! A line is written with a single `write` to a file opened with
//! `O_APPEND`, so it is in the kernel before the caller returns a credential
//! (it survives `kill -9`). A mint whose line cannot be written fails.

use serde::Serialize;
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;

/// One audit record.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct AuditEvent {
    /// Set by the sink.
    pub time: String,
    /// Random per request.
    pub request_id: String,
    /// Who called.
    pub caller: String,
    /// The API method.
    pub method: String,
    /// The caller's assurance level (`sigil:al1`), when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub assurance: Option<String>,
    /// The SPIFFE ID concerned.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spiffe_id: Option<String>,
    /// The audience concerned.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audience: Option<String>,
    /// `ok`, `denied` or `error`.
    pub outcome: &'static str,
    /// Why (for refusals and errors).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// `jti` of a minted JWT-SVID.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
    /// Serial of a minted X.509-SVID.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// How the subject authenticated (`join_token`, `tpm`, `tpm_ek_cert`),
    /// as in the `amr` claim: `method` names the API call, this the proof.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub amr: Vec<String>,
}

/// The audit line could not be written.
#[derive(Debug, thiserror::Error)]
#[error("audit log write failed: {0}")]
pub struct AuditError(pub String);

/// Where audit lines go.
pub trait AuditSink: Send + Sync + std::fmt::Debug {
    /// Writes one line; `Ok` means it is recorded.
    fn record(&self, ev: &AuditEvent) -> Result<(), AuditError>;
}

/// Appends lines to a file.
#[derive(Debug)]
pub struct FileAuditSink {
    file: Mutex<std::fs::File>,
}

impl FileAuditSink {
    /// Opens `path` for appending (mode 0600 when created).
    pub fn open(path: &Path) -> std::io::Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)?;
        Ok(Self {
            file: Mutex::new(file),
        })
    }
}

/// RFC 3339 UTC timestamp with milliseconds.
pub fn rfc3339_now() -> String {
    let now = time::OffsetDateTime::now_utc();
    now.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| now.unix_timestamp().to_string())
}

impl AuditSink for FileAuditSink {
    fn record(&self, ev: &AuditEvent) -> Result<(), AuditError> {
        let mut ev = ev.clone();
        ev.time = rfc3339_now();
        let mut line = serde_json::to_vec(&ev).map_err(|e| AuditError(e.to_string()))?;
        line.push(b'\n');
        let mut f = self
            .file
            .lock()
            .map_err(|_| AuditError("poisoned".into()))?;
        crate::store::blocking(|| f.write_all(&line)).map_err(|e| AuditError(e.to_string()))
    }
}

/// Keeps lines in memory; can be told to fail (tests and fault injection).
#[derive(Debug, Default)]
pub struct MemoryAuditSink {
    lines: Mutex<Vec<AuditEvent>>,
    fail: std::sync::atomic::AtomicBool,
}

impl MemoryAuditSink {
    /// Makes every later write fail (`true`) or succeed (`false`).
    pub fn set_failing(&self, fail: bool) {
        self.fail.store(fail, std::sync::atomic::Ordering::SeqCst);
    }

    /// The lines recorded so far.
    pub fn lines(&self) -> Vec<AuditEvent> {
        match self.lines.lock() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }
}

impl AuditSink for MemoryAuditSink {
    fn record(&self, ev: &AuditEvent) -> Result<(), AuditError> {
        if self.fail.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(AuditError("injected failure".into()));
        }
        let mut g = self
            .lines
            .lock()
            .map_err(|_| AuditError("poisoned".into()))?;
        g.push(ev.clone());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_one_json_object_per_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("audit.log");
        let sink = FileAuditSink::open(&p).unwrap();
        for i in 0..3 {
            sink.record(&AuditEvent {
                request_id: format!("r{i}"),
                caller: "uid:0".into(),
                method: "m".into(),
                outcome: "ok",
                jti: Some("j".into()),
                ..AuditEvent::default()
            })
            .unwrap();
        }
        let text = std::fs::read_to_string(&p).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[2]["request_id"], "r2");
        assert_eq!(lines[0]["outcome"], "ok");
        assert!(lines[0]["time"].as_str().unwrap().ends_with('Z'));
        assert!(lines[0].get("audience").is_none());
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
}
