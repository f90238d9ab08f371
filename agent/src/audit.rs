//! The agent's audit log: one JSON object per line, one line per Workload
//! API call that attests a caller (and per refusal after attestation began).
//!
//! A line carries: `time` (RFC 3339, UTC), `event` (`workload_api`), `rpc`
//! (the Workload API method), `caller` (`uid:N pid:N`), `pid`, `uid`, `gid`,
//! `exe_path`, `exe_sha256`, `method` (the workload attestation method,
//! `peercred`), `pin` (`pidfd` or `start_time`), `assurance` (the node's `acr`), `entry_ids` and `spiffe_ids`
//! matched (and `spiffe_id` when there is exactly one), `audience`,
//! `outcome` (`ok` / `denied` / `error`, as in the server's log) and
//! `reason`. Absent values are left out. Tokens and keys never appear.

use serde::Serialize;
use std::io::Write;
use std::sync::{Mutex, PoisonError};

/// How a call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The caller got what it asked for (written `ok`).
    #[serde(rename = "ok")]
    Allowed,
    /// The caller was refused.
    Denied,
    /// The agent failed.
    Error,
}

/// One audit record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEvent {
    /// RFC 3339 UTC time.
    pub time: String,
    /// Always `workload_api` for these records.
    pub event: &'static str,
    /// The Workload API method (`FetchJWTSVID`…).
    pub rpc: &'static str,
    /// Caller pid.
    pub pid: Option<i32>,
    /// Caller uid.
    pub uid: Option<u32>,
    /// Caller gid.
    pub gid: Option<u32>,
    /// Caller executable path.
    pub exe_path: Option<String>,
    /// Caller executable SHA-256 (hex).
    pub exe_sha256: Option<String>,
    /// Workload attestation method (`peercred`).
    pub method: &'static str,
    /// How the caller's process was pinned against PID reuse: `pidfd`
    /// (`SO_PEERPIDFD`, race-free) or `start_time` (`/proc` handle and start
    /// time).
    pub pin: Option<&'static str>,
    /// Node assurance (`acr` form), when known.
    pub assurance: Option<String>,
    /// Entries matched.
    pub entry_ids: Vec<String>,
    /// SPIFFE IDs served (or requested, when refused).
    pub spiffe_ids: Vec<String>,
    /// The audience, for JWT calls.
    pub audience: Option<String>,
    /// How the call ended.
    pub outcome: Outcome,
    /// Why, for refusals and errors.
    pub reason: Option<String>,
}

impl AuditEvent {
    /// A record for `rpc` stamped now, with nothing else filled in.
    pub fn new(rpc: &'static str, outcome: Outcome) -> Self {
        Self {
            time: now_rfc3339(),
            event: "workload_api",
            rpc,
            pid: None,
            uid: None,
            gid: None,
            exe_path: None,
            exe_sha256: None,
            method: crate::workload_attest::METHOD,
            pin: None,
            assurance: None,
            entry_ids: Vec::new(),
            spiffe_ids: Vec::new(),
            audience: None,
            outcome,
            reason: None,
        }
    }

    /// The same record, stamped now (for a record prepared earlier).
    pub fn at_now(mut self) -> Self {
        self.time = now_rfc3339();
        self
    }

    /// The record as a JSON object.
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::{Value, json};
        let mut o = serde_json::Map::new();
        let mut put = |k: &str, v: Value| {
            if !v.is_null() {
                o.insert(k.to_owned(), v);
            }
        };
        put("time", json!(self.time));
        put("event", json!(self.event));
        put("rpc", json!(self.rpc));
        let caller = match (self.uid, self.pid) {
            (Some(uid), Some(pid)) => Some(format!("uid:{uid} pid:{pid}")),
            (Some(uid), None) => Some(format!("uid:{uid}")),
            _ => None,
        };
        put("caller", json!(caller));
        put("pid", json!(self.pid));
        put("uid", json!(self.uid));
        put("gid", json!(self.gid));
        put("exe_path", json!(self.exe_path));
        put("exe_sha256", json!(self.exe_sha256));
        put("method", json!(self.method));
        put("pin", json!(self.pin));
        put("assurance", json!(self.assurance));
        put("entry_ids", json!(self.entry_ids));
        put("spiffe_ids", json!(self.spiffe_ids));
        if let [one] = self.spiffe_ids.as_slice() {
            put("spiffe_id", json!(one));
        }
        put("audience", json!(self.audience));
        put("outcome", json!(self.outcome));
        put("reason", json!(self.reason));
        Value::Object(o)
    }

    /// The record as one JSON line (no trailing newline; JSON escapes any
    /// newline inside values).
    pub fn to_json_line(&self) -> String {
        self.to_json().to_string()
    }
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Where audit records go.
pub trait AuditSink: Send + Sync + 'static {
    /// Records one event. Must not block for long: it runs on the request
    /// path.
    fn record(&self, event: &AuditEvent);
}

/// Writes JSON lines to a writer (a file opened for append, or stdout),
/// flushing after each line.
#[derive(Debug)]
pub struct JsonLinesAudit<W: Write + Send> {
    out: Mutex<W>,
}

impl<W: Write + Send> JsonLinesAudit<W> {
    /// Audit to `out`.
    pub fn new(out: W) -> Self {
        Self {
            out: Mutex::new(out),
        }
    }
}

impl JsonLinesAudit<std::fs::File> {
    /// Appends to the file at `path`, creating it with mode 0600.
    pub fn append_to(path: &std::path::Path) -> std::io::Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)?;
        Ok(Self::new(f))
    }
}

impl JsonLinesAudit<std::io::Stdout> {
    /// Audit to standard output.
    pub fn stdout() -> Self {
        Self::new(std::io::stdout())
    }
}

impl<W: Write + Send + 'static> AuditSink for JsonLinesAudit<W> {
    fn record(&self, event: &AuditEvent) {
        let mut line = event.to_json_line();
        line.push('\n');
        let mut out = self.out.lock().unwrap_or_else(PoisonError::into_inner);
        if let Err(e) = out.write_all(line.as_bytes()).and_then(|()| out.flush()) {
            tracing::error!(error = %e, "cannot write audit record");
        }
    }
}

/// Keeps records in memory (tests, and a ring for diagnostics).
#[derive(Debug, Default)]
pub struct MemoryAudit {
    events: Mutex<Vec<AuditEvent>>,
}

impl MemoryAudit {
    /// The records so far.
    pub fn events(&self) -> Vec<AuditEvent> {
        self.events
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl AuditSink for MemoryAudit {
    fn record(&self, event: &AuditEvent) {
        self.events
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(event.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_lines_to_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let sink = JsonLinesAudit::append_to(&path).unwrap();
        let mut e = AuditEvent::new("FetchJWTSVID", Outcome::Denied);
        e.pid = Some(42);
        e.uid = Some(1000);
        e.audience = Some("payments".into());
        e.reason = Some("audience not allowed".into());
        sink.record(&e);
        sink.record(&AuditEvent::new("FetchX509SVID", Outcome::Allowed));
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        let v: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
        assert_eq!(v["rpc"], "FetchJWTSVID");
        assert_eq!(v["outcome"], "denied");
        assert_eq!(v["method"], "peercred");
        assert_eq!(v["pid"], 42);
        assert_eq!(v["caller"], "uid:1000 pid:42");
        assert_eq!(v["audience"], "payments");
        assert!(v.get("exe_path").is_none(), "absent values are left out");
        let ok: serde_json::Value = serde_json::from_str(lines[1]).unwrap();
        assert_eq!(ok["outcome"], "ok");
        assert!(v["time"].as_str().unwrap().ends_with('Z'));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
