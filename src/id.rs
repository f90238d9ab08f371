//! SPIFFE IDs and trust domains, parsed exactly as the SPIFFE ID specification
//! says.
//!
//! Guarantees: a [`SpiffeId`] or [`TrustDomain`] value is always valid. Parsing
//! never normalises: an input that is not already in canonical form (upper-case
//! letters in the trust domain, percent-encoding, `.` or `..` segments, a
//! trailing `/`, a port, userinfo, a query or a fragment) is rejected, never
//! repaired, so `parse(s).to_string() == s` for every accepted `s`.

use std::fmt;
use std::str::FromStr;

/// "SPIFFE IDs MUST be prefixed with `spiffe://`" — the scheme is matched
/// case-sensitively: the spec requires it lower-case.
pub const SPIFFE_SCHEME_PREFIX: &str = "spiffe://";

/// "The maximum length of a SPIFFE ID is 2048 bytes."
pub const MAX_SPIFFE_ID_LEN: usize = 2048;

/// "Trust domain names are … no more than 255 bytes long."
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;

/// Why a string is not a valid SPIFFE ID or trust domain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdError {
    /// The input is empty.
    #[error("SPIFFE ID is empty")]
    Empty,
    /// The input does not start with exactly `spiffe://`.
    #[error("scheme is missing or not `spiffe`")]
    WrongScheme,
    /// Nothing between `spiffe://` and the path.
    #[error("trust domain is missing")]
    MissingTrustDomain,
    /// A trust domain byte outside `[a-z0-9._-]` (this covers upper case,
    /// ports, userinfo, percent-encoding, queries and fragments).
    #[error(
        "trust domain characters are limited to lowercase letters, numbers, dots, dashes, and underscores"
    )]
    BadTrustDomainChar,
    /// Trust domain longer than [`MAX_TRUST_DOMAIN_LEN`].
    #[error("trust domain is longer than 255 bytes")]
    TrustDomainTooLong,
    /// `//` in the path, or a path of just `/`.
    #[error("path cannot contain empty segments")]
    EmptySegment,
    /// A `.` or `..` path segment.
    #[error("path cannot contain dot segments")]
    DotSegment,
    /// A path byte outside `[a-zA-Z0-9._-]`.
    #[error(
        "path segment characters are limited to letters, numbers, dots, dashes, and underscores"
    )]
    BadPathChar,
    /// The path ends with `/`.
    #[error("path cannot have a trailing slash")]
    TrailingSlash,
    /// Longer than [`MAX_SPIFFE_ID_LEN`].
    #[error("SPIFFE ID is longer than 2048 bytes")]
    TooLong,
}

fn is_td_byte(b: u8) -> bool {
    matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'-' | b'_')
}

fn is_path_byte(b: u8) -> bool {
    matches!(b, b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'.' | b'-' | b'_')
}

fn check_trust_domain_name(name: &str) -> Result<(), IdError> {
    if name.is_empty() {
        return Err(IdError::MissingTrustDomain);
    }
    if name.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(IdError::TrustDomainTooLong);
    }
    if !name.bytes().all(is_td_byte) {
        return Err(IdError::BadTrustDomainChar);
    }
    Ok(())
}

/// Checks a SPIFFE ID path: empty, or `/`-separated non-empty segments.
fn check_path(path: &str) -> Result<(), IdError> {
    if path.is_empty() {
        return Ok(());
    }
    // The caller guarantees a path starts with '/'.
    let rest = &path[1..];
    if rest.is_empty() {
        // "spiffe://td/" — a trailing slash on the root.
        return Err(IdError::TrailingSlash);
    }
    let segments: Vec<&str> = rest.split('/').collect();
    let last = segments.len() - 1;
    for (i, seg) in segments.iter().enumerate() {
        if seg.is_empty() {
            return Err(if i == last {
                IdError::TrailingSlash
            } else {
                IdError::EmptySegment
            });
        }
        if *seg == "." || *seg == ".." {
            return Err(IdError::DotSegment);
        }
        if !seg.bytes().all(is_path_byte) {
            return Err(IdError::BadPathChar);
        }
    }
    Ok(())
}

/// A SPIFFE trust domain name such as `example.org`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TrustDomain {
    name: String,
}

impl TrustDomain {
    /// Parses a bare trust domain name (`example.org`) or a trust domain ID
    /// (`spiffe://example.org`, with no path).
    pub fn new(s: &str) -> Result<Self, IdError> {
        if let Some(rest) = s.strip_prefix(SPIFFE_SCHEME_PREFIX) {
            let id = SpiffeId::parse(s)?;
            if !id.path().is_empty() {
                return Err(IdError::BadTrustDomainChar);
            }
            return Ok(Self {
                name: rest.to_owned(),
            });
        }
        if s.is_empty() {
            return Err(IdError::MissingTrustDomain);
        }
        check_trust_domain_name(s)?;
        Ok(Self { name: s.to_owned() })
    }

    /// The bare name, e.g. `example.org`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The trust domain's own ID, `spiffe://<name>`, as used to key bundles on
    /// the Workload API.
    pub fn id_string(&self) -> String {
        format!("{SPIFFE_SCHEME_PREFIX}{}", self.name)
    }

    /// The SPIFFE ID `spiffe://<name><path>`; `path` must be empty or start
    /// with `/`.
    pub fn id(&self, path: &str) -> Result<SpiffeId, IdError> {
        SpiffeId::parse(&format!("{SPIFFE_SCHEME_PREFIX}{}{path}", self.name))
    }
}

// `TrustDomain` orders and compares by `name` alone, so borrowing it as the
// name is consistent with `Ord`/`Eq`/`Hash`: maps keyed by trust domain can be
// queried with a `&str` without allocating.
impl std::borrow::Borrow<str> for TrustDomain {
    fn borrow(&self) -> &str {
        &self.name
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

impl fmt::Debug for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TrustDomain({})", self.name)
    }
}

impl FromStr for TrustDomain {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

/// A SPIFFE ID: `spiffe://<trust domain><path>`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SpiffeId {
    /// The whole ID as given (it is canonical, since nothing is repaired).
    id: String,
    /// Byte offset where the path starts (== id.len() when the path is empty).
    path_start: usize,
}

impl SpiffeId {
    /// Parses a SPIFFE ID, rejecting everything the specification forbids.
    pub fn parse(s: &str) -> Result<Self, IdError> {
        if s.is_empty() {
            return Err(IdError::Empty);
        }
        if s.len() > MAX_SPIFFE_ID_LEN {
            return Err(IdError::TooLong);
        }
        let rest = s
            .strip_prefix(SPIFFE_SCHEME_PREFIX)
            .ok_or(IdError::WrongScheme)?;
        let (td, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        check_trust_domain_name(td)?;
        check_path(path)?;
        Ok(Self {
            id: s.to_owned(),
            path_start: SPIFFE_SCHEME_PREFIX.len() + td.len(),
        })
    }

    /// The trust domain this ID belongs to.
    pub fn trust_domain(&self) -> TrustDomain {
        TrustDomain {
            name: self.trust_domain_name().to_owned(),
        }
    }

    /// The trust domain name, without allocating.
    pub fn trust_domain_name(&self) -> &str {
        &self.id[SPIFFE_SCHEME_PREFIX.len()..self.path_start]
    }

    /// The path, empty or starting with `/`.
    pub fn path(&self) -> &str {
        &self.id[self.path_start..]
    }

    /// True when this ID belongs to `td`.
    pub fn is_member_of(&self, td: &TrustDomain) -> bool {
        self.trust_domain_name() == td.name()
    }

    /// The ID as a string.
    pub fn as_str(&self) -> &str {
        &self.id
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.id)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeId({})", self.id)
    }
}

impl FromStr for SpiffeId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl serde::Serialize for SpiffeId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.id)
    }
}

impl<'de> serde::Deserialize<'de> for SpiffeId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl serde::Serialize for TrustDomain {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.name)
    }
}

impl<'de> serde::Deserialize<'de> for TrustDomain {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::new(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Conformance table: every rule of the SPIFFE ID spec, a good and a bad
    /// case each.
    #[test]
    fn spiffe_id_conformance() {
        let long_td = "a".repeat(MAX_TRUST_DOMAIN_LEN);
        let too_long_td = "a".repeat(MAX_TRUST_DOMAIN_LEN + 1);
        let max_path = format!("/{}", "p".repeat(MAX_SPIFFE_ID_LEN - "spiffe://td/".len()));
        let over_path = format!("{max_path}p");
        let cases: Vec<(String, Result<(), IdError>)> = vec![
            // scheme
            ("spiffe://example.org".into(), Ok(())),
            ("SPIFFE://example.org".into(), Err(IdError::WrongScheme)),
            ("Spiffe://example.org".into(), Err(IdError::WrongScheme)),
            ("https://example.org".into(), Err(IdError::WrongScheme)),
            ("spiffe:/example.org".into(), Err(IdError::WrongScheme)),
            ("example.org/workload".into(), Err(IdError::WrongScheme)),
            ("".into(), Err(IdError::Empty)),
            // trust domain
            ("spiffe://".into(), Err(IdError::MissingTrustDomain)),
            ("spiffe:///path".into(), Err(IdError::MissingTrustDomain)),
            ("spiffe://a-b_c.9/x".into(), Ok(())),
            (
                "spiffe://Example.org".into(),
                Err(IdError::BadTrustDomainChar),
            ),
            (
                "spiffe://example.org:8080/x".into(),
                Err(IdError::BadTrustDomainChar),
            ),
            (
                "spiffe://user@example.org/x".into(),
                Err(IdError::BadTrustDomainChar),
            ),
            (
                "spiffe://user:pw@example.org".into(),
                Err(IdError::BadTrustDomainChar),
            ),
            (
                "spiffe://exa%6Dple.org".into(),
                Err(IdError::BadTrustDomainChar),
            ),
            (
                "spiffe://example.org?x=1".into(),
                Err(IdError::BadTrustDomainChar),
            ),
            (
                "spiffe://example.org#frag".into(),
                Err(IdError::BadTrustDomainChar),
            ),
            (
                "spiffe://exämple.org".into(),
                Err(IdError::BadTrustDomainChar),
            ),
            (format!("spiffe://{long_td}"), Ok(())),
            (
                format!("spiffe://{too_long_td}"),
                Err(IdError::TrustDomainTooLong),
            ),
            // path
            ("spiffe://example.org/a/B/c-._9".into(), Ok(())),
            ("spiffe://example.org/".into(), Err(IdError::TrailingSlash)),
            (
                "spiffe://example.org/a/".into(),
                Err(IdError::TrailingSlash),
            ),
            ("spiffe://example.org//a".into(), Err(IdError::EmptySegment)),
            (
                "spiffe://example.org/a//b".into(),
                Err(IdError::EmptySegment),
            ),
            ("spiffe://example.org/./a".into(), Err(IdError::DotSegment)),
            ("spiffe://example.org/a/..".into(), Err(IdError::DotSegment)),
            (
                "spiffe://example.org/a/../b".into(),
                Err(IdError::DotSegment),
            ),
            ("spiffe://example.org/...".into(), Ok(())),
            ("spiffe://example.org/.a".into(), Ok(())),
            (
                "spiffe://example.org/a%20b".into(),
                Err(IdError::BadPathChar),
            ),
            (
                "spiffe://example.org/a?q=1".into(),
                Err(IdError::BadPathChar),
            ),
            ("spiffe://example.org/a#f".into(), Err(IdError::BadPathChar)),
            ("spiffe://example.org/a b".into(), Err(IdError::BadPathChar)),
            ("spiffe://example.org/a:b".into(), Err(IdError::BadPathChar)),
            ("spiffe://example.org/ä".into(), Err(IdError::BadPathChar)),
            // total length
            (format!("spiffe://td{max_path}"), Ok(())),
            (format!("spiffe://td{over_path}"), Err(IdError::TooLong)),
        ];
        for (input, want) in cases {
            let got = SpiffeId::parse(&input).map(|id| {
                // No normalisation: what parses prints back unchanged.
                assert_eq!(id.to_string(), input);
            });
            assert_eq!(got, want, "input {input:?}");
        }
    }

    #[test]
    fn parts() {
        let id = SpiffeId::parse("spiffe://example.org/ns/prod/agent").unwrap();
        assert_eq!(id.trust_domain_name(), "example.org");
        assert_eq!(id.path(), "/ns/prod/agent");
        let td = TrustDomain::new("example.org").unwrap();
        assert!(id.is_member_of(&td));
        assert!(!id.is_member_of(&TrustDomain::new("example.com").unwrap()));
        assert_eq!(td.id_string(), "spiffe://example.org");
        assert_eq!(td.id("/x").unwrap().as_str(), "spiffe://example.org/x");
        let root = SpiffeId::parse("spiffe://example.org").unwrap();
        assert_eq!(root.path(), "");
    }

    #[test]
    fn trust_domain_forms() {
        assert_eq!(
            TrustDomain::new("example.org").unwrap().name(),
            "example.org"
        );
        assert_eq!(
            TrustDomain::new("spiffe://example.org").unwrap().name(),
            "example.org"
        );
        assert!(TrustDomain::new("spiffe://example.org/path").is_err());
        assert!(TrustDomain::new("Example.org").is_err());
        assert!(TrustDomain::new("").is_err());
        assert!(TrustDomain::new("example.org/").is_err());
    }

    #[test]
    fn serde_is_strict() {
        let ok: SpiffeId = serde_json::from_str("\"spiffe://td/a\"").unwrap();
        assert_eq!(ok.as_str(), "spiffe://td/a");
        assert!(serde_json::from_str::<SpiffeId>("\"spiffe://td/../a\"").is_err());
    }
}
