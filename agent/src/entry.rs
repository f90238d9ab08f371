//! Registration entries and the pure decisions made with them: which entries
//! a caller's selectors earn, and which audiences an entry may mint JWT-SVIDs
//! for.
//!
//! Rules, each with a table test below:
//!
//! - an entry matches when it has at least one selector and **every** one of
//!   its selectors is among the caller's (an entry with no selectors matches
//!   nobody);
//! - an entry with a minimum assurance level matches only on a node attested
//!   at that level or above;
//! - a JWT-SVID request names exactly one non-empty audience, and an entry
//!   may mint it only when the audience is on the entry's list, byte for
//!   byte; the only way to get an [`AuthorizedAudience`] is
//!   [`authorize_jwt`].

use crate::selector::Selector;
use sigil::{AssuranceLevel, SpiffeId, TrustDomain};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

/// Default X.509-SVID lifetime.
pub const DEFAULT_X509_TTL: Duration = Duration::from_secs(3600);
/// Default JWT-SVID lifetime.
pub const DEFAULT_JWT_TTL: Duration = Duration::from_secs(24 * 3600);
/// The longest audience accepted in a request.
pub const MAX_AUDIENCE_LEN: usize = 256;

/// A registration entry as the agent sees it: who gets which identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistrationEntry {
    /// The entry's ID (server-assigned).
    pub id: String,
    /// The identity this entry issues.
    pub spiffe_id: SpiffeId,
    /// All of these must be attested for a caller to match.
    pub selectors: Vec<Selector>,
    /// Audiences this identity may obtain JWT-SVIDs for.
    pub audiences: Vec<String>,
    /// Node assurance required, if any.
    pub min_assurance: Option<AssuranceLevel>,
    /// Foreign trust domains whose bundles the workload receives.
    pub federates_with: Vec<TrustDomain>,
    /// X.509-SVID lifetime.
    pub x509_ttl: Duration,
    /// JWT-SVID lifetime.
    pub jwt_ttl: Duration,
    /// Where the workload's key lives.
    pub key_binding: KeyBinding,
}

/// Where an entry's workload key lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum KeyBinding {
    /// A software key the agent generates and hands to the workload with
    /// its X.509-SVID (the standard Workload API).
    #[default]
    None,
    /// A key in the agent's TPM that never leaves it: served only by the
    /// workload key service (`sigil.workload.v1`), never by the standard
    /// Workload API, which must hand out a private key.
    Tpm,
}

impl RegistrationEntry {
    /// An entry with default TTLs, no audiences, no assurance floor and no
    /// federation.
    pub fn new(id: impl Into<String>, spiffe_id: SpiffeId, selectors: Vec<Selector>) -> Self {
        Self {
            id: id.into(),
            spiffe_id,
            selectors,
            audiences: Vec::new(),
            min_assurance: None,
            federates_with: Vec::new(),
            x509_ttl: DEFAULT_X509_TTL,
            jwt_ttl: DEFAULT_JWT_TTL,
            key_binding: KeyBinding::None,
        }
    }
}

/// True when `entry` is earned by a caller with `selectors` on a node
/// attested at `node_level`.
pub fn entry_matches(
    entry: &RegistrationEntry,
    selectors: &BTreeSet<Selector>,
    node_level: AssuranceLevel,
) -> bool {
    !entry.selectors.is_empty()
        && entry.selectors.iter().all(|s| selectors.contains(s))
        && entry.min_assurance.is_none_or(|min| node_level >= min)
}

/// The entries a caller earns, in a stable order (SPIFFE ID, then entry ID),
/// so the first one (the default SVID) does not change between calls.
pub fn matching_entries<'a>(
    entries: &'a [Arc<RegistrationEntry>],
    selectors: &BTreeSet<Selector>,
    node_level: AssuranceLevel,
) -> Vec<&'a Arc<RegistrationEntry>> {
    let mut out: Vec<_> = entries
        .iter()
        .filter(|e| entry_matches(e, selectors, node_level))
        .collect();
    out.sort_by(|a, b| (&a.spiffe_id, &a.id).cmp(&(&b.spiffe_id, &b.id)));
    out
}

/// A malformed JWT-SVID request (gRPC `InvalidArgument`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    /// No audience, or an empty one.
    #[error("audience must be specified")]
    EmptyAudience,
    /// More than one audience: Sigil mints one token per tool.
    #[error("exactly one audience must be requested")]
    MultipleAudiences,
    /// An audience too long or with control characters.
    #[error("audience is malformed")]
    BadAudience,
    /// `spiffe_id` is set but not a SPIFFE ID.
    #[error("spiffe_id is malformed")]
    BadSpiffeId,
}

/// Checks the audience list of a `FetchJWTSVID` request: exactly one
/// non-empty, printable audience of at most [`MAX_AUDIENCE_LEN`] bytes.
pub fn single_audience(audiences: &[String]) -> Result<&str, RequestError> {
    let aud = match audiences {
        [] => return Err(RequestError::EmptyAudience),
        [one] => one.as_str(),
        _ => return Err(RequestError::MultipleAudiences),
    };
    check_audience(aud)?;
    Ok(aud)
}

/// Checks one audience string (also used by `ValidateJWTSVID`).
pub fn check_audience(aud: &str) -> Result<(), RequestError> {
    if aud.is_empty() {
        return Err(RequestError::EmptyAudience);
    }
    if aud.len() > MAX_AUDIENCE_LEN || aud.chars().any(char::is_control) {
        return Err(RequestError::BadAudience);
    }
    Ok(())
}

/// Parses the optional `spiffe_id` of a `FetchJWTSVID` request (empty means
/// "every identity the caller has").
pub fn requested_spiffe_id(s: &str) -> Result<Option<SpiffeId>, RequestError> {
    if s.is_empty() {
        return Ok(None);
    }
    SpiffeId::parse(s)
        .map(Some)
        .map_err(|_| RequestError::BadSpiffeId)
}

/// A refusal (gRPC `PermissionDenied`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthzError {
    /// The caller's selectors earn no entry.
    #[error("no registration entry matches the caller")]
    NoMatchingEntry,
    /// The caller asked for a SPIFFE ID none of its entries issues.
    #[error("caller is not entitled to {0}")]
    SpiffeIdNotEntitled(SpiffeId),
    /// None of the candidate entries allows the audience.
    #[error("audience {0:?} is not allowed for the caller's identity")]
    AudienceNotAllowed(String),
}

/// Proof that an entry may mint a JWT-SVID for exactly this audience. Only
/// [`authorize_jwt`] builds one, so a minting call without the check does
/// not compile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthorizedAudience {
    entry: Arc<RegistrationEntry>,
    audience: String,
}

impl AuthorizedAudience {
    /// The entry whose identity the token carries.
    pub fn entry(&self) -> &Arc<RegistrationEntry> {
        &self.entry
    }

    /// The one audience the token carries.
    pub fn audience(&self) -> &str {
        &self.audience
    }
}

/// Picks the entries to mint JWT-SVIDs from: among `matched`, those with
/// `requested` SPIFFE ID (all when `None`) that allow `audience`.
///
/// Refuses when nothing matched, when the requested ID is not among the
/// matched entries, or when no candidate allows the audience. With no
/// requested ID, candidates that do not allow the audience are left out.
pub fn authorize_jwt(
    matched: &[&Arc<RegistrationEntry>],
    requested: Option<&SpiffeId>,
    audience: &str,
) -> Result<Vec<AuthorizedAudience>, AuthzError> {
    if matched.is_empty() {
        return Err(AuthzError::NoMatchingEntry);
    }
    let candidates: Vec<_> = match requested {
        Some(id) => matched
            .iter()
            .filter(|e| &e.spiffe_id == id)
            .copied()
            .collect(),
        None => matched.to_vec(),
    };
    if let (Some(id), true) = (requested, candidates.is_empty()) {
        return Err(AuthzError::SpiffeIdNotEntitled(id.clone()));
    }
    let mut seen = BTreeSet::new();
    let out: Vec<_> = candidates
        .into_iter()
        .filter(|e| e.audiences.iter().any(|a| a == audience))
        // Two entries with the same SPIFFE ID would mint the same token.
        .filter(|e| seen.insert(e.spiffe_id.clone()))
        .map(|e| AuthorizedAudience {
            entry: Arc::clone(e),
            audience: audience.to_owned(),
        })
        .collect();
    if out.is_empty() {
        return Err(AuthzError::AudienceNotAllowed(audience.to_owned()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sel(s: &str) -> Selector {
        Selector::parse(s).unwrap()
    }

    fn entry(id: &str, spiffe: &str, sels: &[&str], auds: &[&str]) -> Arc<RegistrationEntry> {
        let mut e = RegistrationEntry::new(
            id,
            SpiffeId::parse(spiffe).unwrap(),
            sels.iter().map(|s| sel(s)).collect(),
        );
        e.audiences = auds.iter().map(|s| s.to_string()).collect();
        Arc::new(e)
    }

    fn set(sels: &[&str]) -> BTreeSet<Selector> {
        sels.iter().map(|s| sel(s)).collect()
    }

    #[test]
    fn matching_table() {
        use AssuranceLevel::*;
        let caller = set(&["unix:uid:1000", "unix:gid:1000", "unix:user:alice"]);
        // (entry selectors, min assurance, node level, caller, expected)
        let cases: &[(&[&str], Option<AssuranceLevel>, AssuranceLevel, bool)] = &[
            (&["unix:uid:1000"], None, Al1, true),
            (&["unix:uid:1000", "unix:gid:1000"], None, Al1, true),
            (&["unix:uid:1000", "unix:gid:0"], None, Al1, false), // all must match
            (&["unix:uid:0"], None, Al1, false),
            (&[], None, Al1, false), // no selectors: matches nobody
            (&["unix:uid:1000"], Some(Al2), Al1, false),
            (&["unix:uid:1000"], Some(Al2), Al2, true),
            (&["unix:uid:1000"], Some(Al2), Al3, true),
            (&["unix:uid:10000"], None, Al1, false), // no prefix matching
            (&["unix:user:Alice"], None, Al1, false), // case-sensitive
        ];
        for (i, (sels, min, node, want)) in cases.iter().enumerate() {
            let mut e = (*entry("e", "spiffe://td/w", sels, &[])).clone();
            e.min_assurance = *min;
            assert_eq!(entry_matches(&e, &caller, *node), *want, "case {i}");
        }
    }

    #[test]
    fn matching_entries_are_sorted_and_filtered() {
        let entries = vec![
            entry("3", "spiffe://td/c", &["unix:uid:1"], &[]),
            entry("1", "spiffe://td/a", &["unix:uid:1"], &[]),
            entry("2", "spiffe://td/b", &["unix:uid:2"], &[]),
            entry("0", "spiffe://td/a", &["unix:uid:1"], &[]),
        ];
        let got: Vec<_> = matching_entries(&entries, &set(&["unix:uid:1"]), AssuranceLevel::Al1)
            .iter()
            .map(|e| e.id.as_str())
            .collect();
        assert_eq!(got, ["0", "1", "3"]);
    }

    #[test]
    fn audience_request_table() {
        let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(single_audience(&s(&["ehr-fhir"])), Ok("ehr-fhir"));
        assert_eq!(single_audience(&s(&[])), Err(RequestError::EmptyAudience));
        assert_eq!(single_audience(&s(&[""])), Err(RequestError::EmptyAudience));
        assert_eq!(
            single_audience(&s(&["a", "b"])),
            Err(RequestError::MultipleAudiences)
        );
        assert_eq!(
            single_audience(&s(&["a\u{0}b"])),
            Err(RequestError::BadAudience)
        );
        let long = "a".repeat(MAX_AUDIENCE_LEN + 1);
        assert_eq!(single_audience(&[long]), Err(RequestError::BadAudience));
        assert_eq!(requested_spiffe_id(""), Ok(None));
        assert!(requested_spiffe_id("spiffe://td/x").unwrap().is_some());
        assert_eq!(
            requested_spiffe_id("spiffe://TD/x"),
            Err(RequestError::BadSpiffeId)
        );
    }

    #[test]
    fn authorize_jwt_table() {
        let a = entry(
            "a",
            "spiffe://td/a",
            &["unix:uid:1"],
            &["ehr-fhir", "calendar"],
        );
        let b = entry("b", "spiffe://td/b", &["unix:uid:1"], &["payments"]);
        let a2 = entry("a2", "spiffe://td/a", &["unix:gid:1"], &["ehr-fhir"]);
        let id = |s: &str| SpiffeId::parse(s).unwrap();
        let ids = |r: Result<Vec<AuthorizedAudience>, AuthzError>| {
            r.map(|v| {
                v.iter()
                    .map(|x| (x.entry().id.clone(), x.audience().to_owned()))
                    .collect::<Vec<_>>()
            })
        };
        let own = |v: &[(&str, &str)]| {
            Ok(v.iter()
                .map(|(e, a)| (e.to_string(), a.to_string()))
                .collect::<Vec<_>>())
        };

        assert_eq!(
            ids(authorize_jwt(&[&a, &b], None, "ehr-fhir")),
            own(&[("a", "ehr-fhir")])
        );
        assert_eq!(
            ids(authorize_jwt(&[&a, &b], None, "payments")),
            own(&[("b", "payments")])
        );
        assert_eq!(
            ids(authorize_jwt(&[&a, &b], None, "unknown-tool")),
            Err(AuthzError::AudienceNotAllowed("unknown-tool".into()))
        );
        // Case and whitespace matter.
        assert_eq!(
            ids(authorize_jwt(&[&a], None, "EHR-FHIR")),
            Err(AuthzError::AudienceNotAllowed("EHR-FHIR".into()))
        );
        // A requested ID narrows the candidates, even if another allows it.
        assert_eq!(
            ids(authorize_jwt(
                &[&a, &b],
                Some(&id("spiffe://td/b")),
                "ehr-fhir"
            )),
            Err(AuthzError::AudienceNotAllowed("ehr-fhir".into()))
        );
        assert_eq!(
            ids(authorize_jwt(
                &[&a, &b],
                Some(&id("spiffe://td/c")),
                "ehr-fhir"
            )),
            Err(AuthzError::SpiffeIdNotEntitled(id("spiffe://td/c")))
        );
        assert_eq!(
            ids(authorize_jwt(&[], None, "ehr-fhir")),
            Err(AuthzError::NoMatchingEntry)
        );
        // Two entries for one SPIFFE ID give one token.
        assert_eq!(
            ids(authorize_jwt(&[&a, &a2], None, "ehr-fhir")),
            own(&[("a", "ehr-fhir")])
        );
    }
}
