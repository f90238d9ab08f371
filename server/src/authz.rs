//! Authorization: pure decisions over entries, agents and requests.
//!
//! A JWT-SVID is minted only with an [`AudienceAllowed`] in hand, and only
//! [`authorize_jwt`] makes one: the caller's entry for that SPIFFE ID must
//! list the audience exactly (no wildcard, no prefix, no case folding), and
//! the agent's assurance must meet the entry's minimum.

use crate::model::Entry;
use sigil::{AssuranceLevel, SpiffeId};

/// Proof that a JWT-SVID for this SPIFFE ID and audience is allowed; only
/// [`authorize_jwt`] builds it. Carries the entry that allowed it.
#[derive(Debug)]
pub struct AudienceAllowed {
    entry: Entry,
}

impl AudienceAllowed {
    /// The entry that allowed the audience.
    pub fn entry(&self) -> &Entry {
        &self.entry
    }
}

/// Proof that an X.509-SVID for this entry is allowed.
#[derive(Debug)]
pub struct X509Allowed(());

/// Why a mint was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthzError {
    /// No entry of this agent has the SPIFFE ID.
    #[error("no registration entry for this SPIFFE ID under the calling agent")]
    NoEntry,
    /// The entry does not list the audience.
    #[error("audience not allowed by the registration entry")]
    AudienceNotAllowed,
    /// The agent's assurance is below the entry's minimum.
    #[error("node assurance {have} is below the entry's minimum {need}")]
    AssuranceTooLow {
        /// The agent's.
        have: AssuranceLevel,
        /// The entry's.
        need: AssuranceLevel,
    },
    /// The entry belongs to another agent.
    #[error("entry belongs to another agent")]
    NotParent,
    /// The entry's expiry has passed.
    #[error("registration entry has expired")]
    EntryExpired,
}

fn assurance_ok(e: &Entry, have: AssuranceLevel, now: i64) -> Result<(), AuthzError> {
    if e.expires_at.is_some_and(|t| now >= t) {
        return Err(AuthzError::EntryExpired);
    }
    match e.min_assurance {
        Some(need) if have < need => Err(AuthzError::AssuranceTooLow { have, need }),
        _ => Ok(()),
    }
}

/// Picks the entry among `agent_entries` (the calling agent's) that allows
/// a JWT-SVID for `id` and `audience` at time `now` (entry not expired,
/// assurance sufficient).
pub fn authorize_jwt(
    agent_entries: &[Entry],
    id: &SpiffeId,
    audience: &str,
    have: AssuranceLevel,
    now: i64,
) -> Result<AudienceAllowed, AuthzError> {
    let mut candidates = agent_entries
        .iter()
        .filter(|e| &e.spiffe_id == id)
        .peekable();
    if candidates.peek().is_none() {
        return Err(AuthzError::NoEntry);
    }
    let mut err = AuthzError::AudienceNotAllowed;
    for e in candidates {
        if !e.audiences.iter().any(|a| a == audience) {
            continue;
        }
        match assurance_ok(e, have, now) {
            Ok(()) => return Ok(AudienceAllowed { entry: e.clone() }),
            Err(e) => err = e,
        }
    }
    Err(err)
}

/// Checks that `agent` may get an X.509-SVID for `entry`.
pub fn authorize_x509(
    entry: &Entry,
    agent: &SpiffeId,
    have: AssuranceLevel,
    now: i64,
) -> Result<X509Allowed, AuthzError> {
    if &entry.parent_id != agent {
        return Err(AuthzError::NotParent);
    }
    assurance_ok(entry, have, now)?;
    Ok(X509Allowed(()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Selector;

    fn entry(id: &str, auds: &[&str], min: Option<AssuranceLevel>) -> Entry {
        Entry {
            id: "e".into(),
            spiffe_id: SpiffeId::parse(id).unwrap(),
            parent_id: SpiffeId::parse("spiffe://td/agent/join/a").unwrap(),
            selectors: vec![Selector {
                kind: "unix".into(),
                value: "uid:1".into(),
            }],
            audiences: auds.iter().map(|s| s.to_string()).collect(),
            x509_ttl: 60,
            jwt_ttl: 60,
            dns_names: vec![],
            min_assurance: min,
            expires_at: None,
            key_binding: Default::default(),
            revision: 1,
            created_at: 0,
        }
    }

    #[test]
    fn audience_is_exact_match_only() {
        let id = SpiffeId::parse("spiffe://td/w").unwrap();
        let es = [entry("spiffe://td/w", &["ehr-fhir", "calendar"], None)];
        let l = AssuranceLevel::Al1;
        assert!(authorize_jwt(&es, &id, "ehr-fhir", l, 0).is_ok());
        assert!(authorize_jwt(&es, &id, "calendar", l, 0).is_ok());
        for bad in [
            "",
            "ehr",
            "ehr-fhir2",
            "EHR-FHIR",
            "ehr-fhir ",
            "*",
            "payments",
        ] {
            assert_eq!(
                authorize_jwt(&es, &id, bad, l, 0).unwrap_err(),
                AuthzError::AudienceNotAllowed,
                "{bad:?}"
            );
        }
        let other = SpiffeId::parse("spiffe://td/x").unwrap();
        assert_eq!(
            authorize_jwt(&es, &other, "ehr-fhir", l, 0).unwrap_err(),
            AuthzError::NoEntry
        );
        let none = [entry("spiffe://td/w", &[], None)];
        assert_eq!(
            authorize_jwt(&none, &id, "ehr-fhir", l, 0).unwrap_err(),
            AuthzError::AudienceNotAllowed
        );
    }

    #[test]
    fn expired_entries_allow_nothing() {
        let id = SpiffeId::parse("spiffe://td/w").unwrap();
        let mut e = entry("spiffe://td/w", &["a"], None);
        e.expires_at = Some(100);
        let es = [e];
        let l = AssuranceLevel::Al1;
        assert!(authorize_jwt(&es, &id, "a", l, 99).is_ok());
        assert_eq!(
            authorize_jwt(&es, &id, "a", l, 100).unwrap_err(),
            AuthzError::EntryExpired
        );
        let agent = SpiffeId::parse("spiffe://td/agent/join/a").unwrap();
        assert!(authorize_x509(&es[0], &agent, l, 99).is_ok());
        assert_eq!(
            authorize_x509(&es[0], &agent, l, 100).unwrap_err(),
            AuthzError::EntryExpired
        );
    }

    #[test]
    fn assurance_minimum() {
        let id = SpiffeId::parse("spiffe://td/w").unwrap();
        let es = [entry("spiffe://td/w", &["a"], Some(AssuranceLevel::Al2))];
        assert_eq!(
            authorize_jwt(&es, &id, "a", AssuranceLevel::Al1, 0).unwrap_err(),
            AuthzError::AssuranceTooLow {
                have: AssuranceLevel::Al1,
                need: AssuranceLevel::Al2
            }
        );
        assert!(authorize_jwt(&es, &id, "a", AssuranceLevel::Al3, 0).is_ok());
        let agent = SpiffeId::parse("spiffe://td/agent/join/a").unwrap();
        assert!(authorize_x509(&es[0], &agent, AssuranceLevel::Al1, 0).is_err());
        assert!(authorize_x509(&es[0], &agent, AssuranceLevel::Al2, 0).is_ok());
        let other = SpiffeId::parse("spiffe://td/agent/join/b").unwrap();
        assert_eq!(
            authorize_x509(&es[0], &other, AssuranceLevel::Al2, 0).unwrap_err(),
            AuthzError::NotParent
        );
    }
}
