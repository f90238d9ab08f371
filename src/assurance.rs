//! Assurance levels: how strongly a node and a workload were attested.
//!
//! The three levels are an *analogy* to the authenticator assurance levels of
//! NIST SP 800-63B, not those levels themselves: NIST defines AALs for people
//! and their authenticators, while these rank how a machine proved who it is.
//!
//! | level | `acr` claim | node attested by |
//! |---|---|---|
//! | [`AssuranceLevel::Al1`] | `sigil:al1` | a one-time join token |
//! | [`AssuranceLevel::Al2`] | `sigil:al2` | a TPM whose EK hash is on an allow-list |
//! | [`AssuranceLevel::Al3`] | `sigil:al3` | a TPM whose EK certificate chains to a manufacturer CA |

use std::fmt;
use std::str::FromStr;

/// An ordered assurance level; higher is stronger.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum AssuranceLevel {
    /// Join-token node attestation (aal1-like).
    Al1 = 1,
    /// TPM credential activation, EK on an allow-list (aal2-like).
    Al2 = 2,
    /// TPM credential activation, EK certificate from a manufacturer CA
    /// (aal3-like).
    Al3 = 3,
}

/// An `acr` value that is not one of Sigil's levels.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown assurance level {0:?}")]
pub struct UnknownAssuranceLevel(pub String);

impl AssuranceLevel {
    /// The `acr` claim value.
    pub fn acr(self) -> &'static str {
        match self {
            Self::Al1 => "sigil:al1",
            Self::Al2 => "sigil:al2",
            Self::Al3 => "sigil:al3",
        }
    }
}

impl fmt::Display for AssuranceLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.acr())
    }
}

impl FromStr for AssuranceLevel {
    type Err = UnknownAssuranceLevel;
    /// Accepts the `acr` form (`sigil:al2`) and the short form (`al2`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.strip_prefix("sigil:").unwrap_or(s) {
            "al1" => Ok(Self::Al1),
            "al2" => Ok(Self::Al2),
            "al3" => Ok(Self::Al3),
            _ => Err(UnknownAssuranceLevel(s.to_owned())),
        }
    }
}

/// `amr` method names Sigil writes (RFC 8176 style: short method names).
pub mod methods {
    /// Node attested with a one-time join token.
    pub const JOIN_TOKEN: &str = "join_token";
    /// Node attested by TPM credential activation.
    pub const TPM: &str = "tpm";
    /// The TPM's EK certificate chained to a configured manufacturer CA.
    pub const TPM_EK_CERT: &str = "tpm_ek_cert";
    /// The workload was identified from its Unix socket peer credentials.
    pub const PEERCRED: &str = "peercred";
    /// The workload's key lives in the TPM.
    pub const TPM_KEY: &str = "hwk";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordering_and_names() {
        assert!(AssuranceLevel::Al3 > AssuranceLevel::Al2);
        assert!(AssuranceLevel::Al2 > AssuranceLevel::Al1);
        for l in [
            AssuranceLevel::Al1,
            AssuranceLevel::Al2,
            AssuranceLevel::Al3,
        ] {
            assert_eq!(l.acr().parse::<AssuranceLevel>().unwrap(), l);
        }
        assert_eq!(
            "al2".parse::<AssuranceLevel>().unwrap(),
            AssuranceLevel::Al2
        );
        assert!("aal2".parse::<AssuranceLevel>().is_err());
        assert!("SIGIL:AL2".parse::<AssuranceLevel>().is_err());
    }
}
