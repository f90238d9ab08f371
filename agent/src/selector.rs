//! Selectors: the facts workload attestation establishes about a caller,
//! written `type:value` (`unix:uid:1000`, `systemd:unit:nginx.service`).
//!
//! A selector is compared byte for byte; there is no pattern matching. A
//! [`Selector`] is always well formed once built: a non-empty type of
//! `[a-z0-9_-]` and a non-empty value without control characters.

use std::fmt;
use std::str::FromStr;

/// The longest selector value accepted (a path or a hash fits easily).
pub const MAX_SELECTOR_VALUE_LEN: usize = 4096;

/// One attested fact about a workload.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Selector {
    kind: String,
    value: String,
}

/// Why a selector string is not well formed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SelectorError {
    /// No `:` separating type and value.
    #[error("selector must be TYPE:VALUE")]
    MissingSeparator,
    /// The type is empty or has characters outside `[a-z0-9_-]`.
    #[error("selector type must be non-empty [a-z0-9_-]")]
    BadType,
    /// The value is empty.
    #[error("selector value is empty")]
    EmptyValue,
    /// The value has a control character.
    #[error("selector value has a control character")]
    ControlCharacter,
    /// The value is longer than [`MAX_SELECTOR_VALUE_LEN`].
    #[error("selector value is too long")]
    TooLong,
}

impl Selector {
    /// Builds a selector from its type (`unix`) and value (`uid:1000`).
    pub fn new(kind: &str, value: impl Into<String>) -> Result<Self, SelectorError> {
        let value = value.into();
        if kind.is_empty()
            || !kind
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
        {
            return Err(SelectorError::BadType);
        }
        if value.is_empty() {
            return Err(SelectorError::EmptyValue);
        }
        if value.len() > MAX_SELECTOR_VALUE_LEN {
            return Err(SelectorError::TooLong);
        }
        if value.chars().any(char::is_control) {
            return Err(SelectorError::ControlCharacter);
        }
        Ok(Self {
            kind: kind.to_owned(),
            value,
        })
    }

    /// Parses `type:value`; the value may itself contain `:`.
    pub fn parse(s: &str) -> Result<Self, SelectorError> {
        let (kind, value) = s.split_once(':').ok_or(SelectorError::MissingSeparator)?;
        Self::new(kind, value)
    }

    /// The type, e.g. `unix`.
    pub fn kind(&self) -> &str {
        &self.kind
    }

    /// The value, e.g. `uid:1000`.
    pub fn value(&self) -> &str {
        &self.value
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind, self.value)
    }
}

impl fmt::Debug for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Selector({self})")
    }
}

impl FromStr for Selector {
    type Err = SelectorError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_table() {
        let ok = [
            ("unix:uid:1000", "unix", "uid:1000"),
            ("unix:path:/usr/bin/a b", "unix", "path:/usr/bin/a b"),
            (
                "systemd:unit:nginx.service",
                "systemd",
                "unit:nginx.service",
            ),
            ("k8s-x_1:v", "k8s-x_1", "v"),
        ];
        for (s, k, v) in ok {
            let sel = Selector::parse(s).unwrap();
            assert_eq!((sel.kind(), sel.value()), (k, v), "{s}");
            assert_eq!(sel.to_string(), s);
        }
        let bad = [
            ("unix", SelectorError::MissingSeparator),
            (":uid:1", SelectorError::BadType),
            ("Unix:uid:1", SelectorError::BadType),
            ("un ix:uid:1", SelectorError::BadType),
            ("unix:", SelectorError::EmptyValue),
            ("unix:uid:1\n", SelectorError::ControlCharacter),
        ];
        for (s, e) in bad {
            assert_eq!(Selector::parse(s), Err(e), "{s:?}");
        }
        let long = format!("unix:{}", "a".repeat(MAX_SELECTOR_VALUE_LEN + 1));
        assert_eq!(Selector::parse(&long), Err(SelectorError::TooLong));
    }
}
