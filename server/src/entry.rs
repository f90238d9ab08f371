//! Registration entry validation: the only way to build an [`Entry`].
//!
//! Rules enforced on create:
//! - `spiffe_id` and `parent_id` are strict SPIFFE IDs of the server's trust
//!   domain; `spiffe_id` has a non-root path outside the reserved `/agent/`
//!   and `/sigil/` trees (so no workload can be named like an agent or the
//!   server);
//! - at least one selector, each `type:value` with non-empty parts;
//!   `unix:uid:N` / `unix:gid:N` with a canonical decimal N;
//! - selectors that do not separate processes of one uid (`unix:path`,
//!   `unix:sha256`: a process can connect and then exec) cannot be the only
//!   ones;
//! - an entry whose separating selectors are only `unix:uid:0` needs an
//!   explicit `allow_root`;
//! - audiences are non-empty printable strings without whitespace, at most
//!   [`MAX_AUDIENCE_LEN`] bytes; duplicates are removed;
//! - an expiry, if any, in the future;
//! - TTLs within [`MIN_TTL_SECS`] and the policy maxima; DNS names are
//!   syntactically valid host names.

use crate::model::{Entry, KeyBinding, Selector, hex, random_bytes};
use sigil::{AssuranceLevel, SpiffeId, TrustDomain};

/// Shortest SVID lifetime accepted, seconds.
pub const MIN_TTL_SECS: i64 = 60;
/// Longest audience string, bytes.
pub const MAX_AUDIENCE_LEN: usize = 255;

/// What a caller asks for.
#[derive(Debug, Clone, Default)]
pub struct EntryRequest {
    /// Workload SPIFFE ID.
    pub spiffe_id: String,
    /// Parent agent SPIFFE ID.
    pub parent_id: String,
    /// `type:value` selectors.
    pub selectors: Vec<String>,
    /// Allowed audiences.
    pub audiences: Vec<String>,
    /// Seconds; 0 = default.
    pub x509_ttl: i64,
    /// Seconds; 0 = default.
    pub jwt_ttl: i64,
    /// DNS SANs.
    pub dns_names: Vec<String>,
    /// Minimum assurance (`sigil:al2`, `al2`); empty = none.
    pub min_assurance: String,
    /// Allow an entry that matches only uid 0.
    pub allow_root: bool,
    /// Unix seconds after which the entry yields nothing; 0 = never.
    pub expires_at: i64,
    /// `tpm`, or empty for none.
    pub key_binding: String,
}

/// TTL policy for entries.
#[derive(Debug, Clone, Copy)]
pub struct TtlPolicy {
    /// Default X.509-SVID TTL.
    pub default_x509: i64,
    /// Longest X.509-SVID TTL.
    pub max_x509: i64,
    /// Default JWT-SVID TTL.
    pub default_jwt: i64,
    /// Longest JWT-SVID TTL.
    pub max_jwt: i64,
}

impl Default for TtlPolicy {
    fn default() -> Self {
        Self {
            default_x509: 3600,
            max_x509: 7 * 24 * 3600,
            default_jwt: 24 * 3600,
            max_jwt: 24 * 3600,
        }
    }
}

/// Why an entry was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EntryError {
    /// `spiffe_id` is not a valid SPIFFE ID.
    #[error("spiffe_id: {0}")]
    BadSpiffeId(sigil::IdError),
    /// `parent_id` is not a valid SPIFFE ID.
    #[error("parent_id: {0}")]
    BadParentId(sigil::IdError),
    /// An ID of another trust domain.
    #[error("{0} is not in trust domain {1}")]
    ForeignTrustDomain(String, String),
    /// `spiffe_id` is the trust domain itself.
    #[error("spiffe_id must have a path")]
    RootSpiffeId,
    /// `spiffe_id` under a reserved path.
    #[error("spiffe_id {0} is under a reserved path (/agent/, /sigil/)")]
    ReservedPath(String),
    /// No selectors.
    #[error("at least one selector is required")]
    NoSelectors,
    /// A selector is not `type:value`.
    #[error("selector {0:?} is not of the form type:value")]
    BadSelector(String),
    /// Only `unix:path`/`unix:sha256`.
    #[error(
        "unix:path and unix:sha256 do not separate processes of one user; add a uid, gid or systemd selector"
    )]
    OnlyWeakSelectors,
    /// Only `unix:uid:0` without the flag.
    #[error("an entry that matches only uid 0 needs --allow-root")]
    RootOnlyNeedsFlag,
    /// A malformed audience.
    #[error("audience {0:?} is empty, too long or contains whitespace or control characters")]
    BadAudience(String),
    /// A TTL outside the policy.
    #[error("{what} TTL {got}s is outside {min}s..={max}s")]
    BadTtl {
        /// `x509` or `jwt`.
        what: &'static str,
        /// Requested.
        got: i64,
        /// Minimum.
        min: i64,
        /// Maximum.
        max: i64,
    },
    /// A malformed DNS name.
    #[error("dns name {0:?} is not a valid host name")]
    BadDnsName(String),
    /// An expiry that is not in the future.
    #[error("expiry {0} is not in the future")]
    ExpiryInPast(i64),
    /// An unknown assurance level.
    #[error("unknown assurance level {0:?}")]
    BadAssurance(String),
    /// A key binding other than `tpm`.
    #[error("unknown key binding {0:?} (only \"tpm\")")]
    BadKeyBinding(String),
    /// The random generator failed.
    #[error("random generator failed")]
    Rng,
}

fn parse_selector(s: &str) -> Result<Selector, EntryError> {
    let bad = || EntryError::BadSelector(s.to_owned());
    let (kind, value) = s.split_once(':').ok_or_else(bad)?;
    if kind.is_empty()
        || value.is_empty()
        || !kind
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
        || value.chars().any(char::is_control)
    {
        return Err(bad());
    }
    // Numeric unix selectors must be canonical: `uid:00` would otherwise
    // dodge the uid-0 rule and never match what the agent reports.
    if kind == "unix"
        && let Some(n) = value
            .strip_prefix("uid:")
            .or_else(|| value.strip_prefix("gid:"))
        && !is_canonical_u32(n)
    {
        return Err(bad());
    }
    Ok(Selector {
        kind: kind.to_owned(),
        value: value.to_owned(),
    })
}

fn is_canonical_u32(s: &str) -> bool {
    s.parse::<u32>().is_ok_and(|n| n.to_string() == s)
}

fn is_weak(s: &Selector) -> bool {
    s.kind == "unix" && (s.value.starts_with("path:") || s.value.starts_with("sha256:"))
}

fn valid_audience(a: &str) -> bool {
    !a.is_empty()
        && a.len() <= MAX_AUDIENCE_LEN
        && !a.chars().any(|c| c.is_whitespace() || c.is_control())
}

fn valid_dns_name(d: &str) -> bool {
    !d.is_empty()
        && d.len() <= 253
        && d.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

fn ttl(what: &'static str, got: i64, default: i64, max: i64) -> Result<i64, EntryError> {
    if got == 0 {
        return Ok(default);
    }
    if !(MIN_TTL_SECS..=max).contains(&got) {
        return Err(EntryError::BadTtl {
            what,
            got,
            min: MIN_TTL_SECS,
            max,
        });
    }
    Ok(got)
}

/// Validates a request into an entry with a fresh random ID (revision 0:
/// the store assigns it).
pub fn validate(
    req: &EntryRequest,
    td: &TrustDomain,
    policy: &TtlPolicy,
    now: i64,
) -> Result<Entry, EntryError> {
    let spiffe_id = SpiffeId::parse(&req.spiffe_id).map_err(EntryError::BadSpiffeId)?;
    let parent_id = SpiffeId::parse(&req.parent_id).map_err(EntryError::BadParentId)?;
    for id in [&spiffe_id, &parent_id] {
        if !id.is_member_of(td) {
            return Err(EntryError::ForeignTrustDomain(
                id.to_string(),
                td.to_string(),
            ));
        }
    }
    if spiffe_id.path().is_empty() {
        return Err(EntryError::RootSpiffeId);
    }
    if spiffe_id.path().starts_with("/agent/") || spiffe_id.path().starts_with("/sigil/") {
        return Err(EntryError::ReservedPath(spiffe_id.to_string()));
    }

    let mut selectors = req
        .selectors
        .iter()
        .map(|s| parse_selector(s))
        .collect::<Result<Vec<_>, _>>()?;
    selectors.sort();
    selectors.dedup();
    if selectors.is_empty() {
        return Err(EntryError::NoSelectors);
    }
    let strong: Vec<&Selector> = selectors.iter().filter(|s| !is_weak(s)).collect();
    if strong.is_empty() {
        return Err(EntryError::OnlyWeakSelectors);
    }
    if strong
        .iter()
        .all(|s| s.kind == "unix" && s.value == "uid:0")
        && !req.allow_root
    {
        return Err(EntryError::RootOnlyNeedsFlag);
    }

    let mut audiences = Vec::new();
    for a in &req.audiences {
        if !valid_audience(a) {
            return Err(EntryError::BadAudience(a.clone()));
        }
        if !audiences.contains(a) {
            audiences.push(a.clone());
        }
    }
    for d in &req.dns_names {
        if !valid_dns_name(d) {
            return Err(EntryError::BadDnsName(d.clone()));
        }
    }
    let min_assurance = if req.min_assurance.is_empty() {
        None
    } else {
        Some(
            req.min_assurance
                .parse::<AssuranceLevel>()
                .map_err(|_| EntryError::BadAssurance(req.min_assurance.clone()))?,
        )
    };
    let key_binding = match req.key_binding.as_str() {
        "" | "none" => KeyBinding::None,
        "tpm" => KeyBinding::Tpm,
        other => return Err(EntryError::BadKeyBinding(other.to_owned())),
    };
    let expires_at = match req.expires_at {
        0 => None,
        t if t <= now => return Err(EntryError::ExpiryInPast(t)),
        t => Some(t),
    };
    Ok(Entry {
        expires_at,
        id: hex(&random_bytes::<16>().map_err(|_| EntryError::Rng)?),
        spiffe_id,
        parent_id,
        selectors,
        audiences,
        x509_ttl: ttl("x509", req.x509_ttl, policy.default_x509, policy.max_x509)?,
        jwt_ttl: ttl("jwt", req.jwt_ttl, policy.default_jwt, policy.max_jwt)?,
        dns_names: req.dns_names.clone(),
        min_assurance,
        key_binding,
        revision: 0,
        created_at: now,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> EntryRequest {
        EntryRequest {
            spiffe_id: "spiffe://example.org/ai/agent".into(),
            parent_id: "spiffe://example.org/agent/join/abc".into(),
            selectors: vec!["unix:uid:1000".into()],
            audiences: vec!["ehr-fhir".into(), "calendar".into(), "ehr-fhir".into()],
            ..EntryRequest::default()
        }
    }

    fn check(req: EntryRequest) -> Result<Entry, EntryError> {
        validate(
            &req,
            &TrustDomain::new("example.org").unwrap(),
            &TtlPolicy::default(),
            0,
        )
    }

    #[test]
    fn good_entry_gets_defaults() {
        let e = check(base()).unwrap();
        assert_eq!(e.audiences, ["ehr-fhir", "calendar"]);
        assert_eq!(e.x509_ttl, 3600);
        assert_eq!(e.jwt_ttl, 24 * 3600);
        assert_eq!(e.id.len(), 32);
        assert_ne!(check(base()).unwrap().id, e.id);
    }

    #[test]
    fn table_of_good_and_bad_requests() {
        type Edit = fn(&mut EntryRequest);
        let cases: Vec<(&str, Edit, Option<EntryError>)> = vec![
            ("uid ok", |_| {}, None),
            (
                "path with uid ok",
                |r| r.selectors = vec!["unix:path:/bin/x".into(), "unix:uid:1000".into()],
                None,
            ),
            (
                "path only",
                |r| r.selectors = vec!["unix:path:/bin/x".into()],
                Some(EntryError::OnlyWeakSelectors),
            ),
            (
                "path + sha256 only",
                |r| r.selectors = vec!["unix:path:/bin/x".into(), "unix:sha256:ab".into()],
                Some(EntryError::OnlyWeakSelectors),
            ),
            (
                "root only",
                |r| r.selectors = vec!["unix:uid:0".into()],
                Some(EntryError::RootOnlyNeedsFlag),
            ),
            (
                "root + path only",
                |r| r.selectors = vec!["unix:uid:0".into(), "unix:path:/x".into()],
                Some(EntryError::RootOnlyNeedsFlag),
            ),
            (
                "root with flag",
                |r| {
                    r.selectors = vec!["unix:uid:0".into()];
                    r.allow_root = true;
                },
                None,
            ),
            (
                "uid with leading zero",
                |r| r.selectors = vec!["unix:uid:00".into()],
                Some(EntryError::BadSelector("unix:uid:00".into())),
            ),
            (
                "uid not a number",
                |r| r.selectors = vec!["unix:uid:bob".into()],
                Some(EntryError::BadSelector("unix:uid:bob".into())),
            ),
            (
                "gid ok",
                |r| r.selectors = vec!["unix:gid:100".into()],
                None,
            ),
            (
                "other kinds are free-form",
                |r| r.selectors = vec!["systemd:unit:ehr.service".into()],
                None,
            ),
            (
                "no selectors",
                |r| r.selectors.clear(),
                Some(EntryError::NoSelectors),
            ),
            (
                "bad selector",
                |r| r.selectors = vec!["uid1000".into()],
                Some(EntryError::BadSelector("uid1000".into())),
            ),
            (
                "bad spiffe id",
                |r| r.spiffe_id = "spiffe://example.org/a/../b".into(),
                Some(EntryError::BadSpiffeId(sigil::IdError::DotSegment)),
            ),
            (
                "foreign td",
                |r| r.spiffe_id = "spiffe://other.org/a".into(),
                Some(EntryError::ForeignTrustDomain(
                    "spiffe://other.org/a".into(),
                    "example.org".into(),
                )),
            ),
            (
                "root id",
                |r| r.spiffe_id = "spiffe://example.org".into(),
                Some(EntryError::RootSpiffeId),
            ),
            (
                "reserved agent path",
                |r| r.spiffe_id = "spiffe://example.org/agent/join/x".into(),
                Some(EntryError::ReservedPath(
                    "spiffe://example.org/agent/join/x".into(),
                )),
            ),
            (
                "bad audience",
                |r| r.audiences = vec!["a b".into()],
                Some(EntryError::BadAudience("a b".into())),
            ),
            (
                "empty audience",
                |r| r.audiences = vec![String::new()],
                Some(EntryError::BadAudience(String::new())),
            ),
            (
                "jwt ttl too long",
                |r| r.jwt_ttl = 24 * 3600 + 1,
                Some(EntryError::BadTtl {
                    what: "jwt",
                    got: 24 * 3600 + 1,
                    min: 60,
                    max: 24 * 3600,
                }),
            ),
            (
                "x509 ttl too short",
                |r| r.x509_ttl = 59,
                Some(EntryError::BadTtl {
                    what: "x509",
                    got: 59,
                    min: 60,
                    max: 7 * 24 * 3600,
                }),
            ),
            (
                "bad dns",
                |r| r.dns_names = vec!["-x.example".into()],
                Some(EntryError::BadDnsName("-x.example".into())),
            ),
            (
                "good dns",
                |r| r.dns_names = vec!["api.example.org".into()],
                None,
            ),
            ("assurance", |r| r.min_assurance = "al2".into(), None),
            (
                "expiry in the past",
                |r| r.expires_at = -5,
                Some(EntryError::ExpiryInPast(-5)),
            ),
            ("expiry ahead", |r| r.expires_at = 10, None),
            (
                "key bound to the TPM",
                |r| r.key_binding = "tpm".into(),
                None,
            ),
            (
                "unknown key binding",
                |r| r.key_binding = "hsm".into(),
                Some(EntryError::BadKeyBinding("hsm".into())),
            ),
            (
                "bad assurance",
                |r| r.min_assurance = "gold".into(),
                Some(EntryError::BadAssurance("gold".into())),
            ),
        ];
        for (name, edit, want) in cases {
            let mut r = base();
            edit(&mut r);
            let got = check(r);
            match want {
                None => assert!(got.is_ok(), "{name}: {got:?}"),
                Some(e) => assert_eq!(got.unwrap_err(), e, "{name}"),
            }
        }
    }
}
