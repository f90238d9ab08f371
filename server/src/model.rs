//! The server's records: registration entries, attested agents, keys.
//!
//! These are what the [`crate::store::Store`] persists. Entries are built only
//! through [`crate::entry::validate`], so a stored entry always satisfied the
//! creation rules.

use serde::{Deserialize, Serialize};
use sigil::{AssuranceLevel, SpiffeId};

/// A workload selector, `type:value` (e.g. type `unix`, value `uid:1000`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Selector {
    /// The attestor type, e.g. `unix`.
    pub kind: String,
    /// The attestor-specific value, e.g. `uid:1000`.
    pub value: String,
}

impl std::fmt::Display for Selector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.kind, self.value)
    }
}

/// A registration entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Random entry ID (hex).
    pub id: String,
    /// The workload's SPIFFE ID.
    pub spiffe_id: SpiffeId,
    /// The agent that may obtain SVIDs for this entry.
    pub parent_id: SpiffeId,
    /// Workload selectors; all must match.
    pub selectors: Vec<Selector>,
    /// Audiences a JWT-SVID may be minted for (exact match). Empty: none.
    pub audiences: Vec<String>,
    /// X.509-SVID lifetime, seconds.
    pub x509_ttl: i64,
    /// JWT-SVID lifetime, seconds.
    pub jwt_ttl: i64,
    /// DNS SANs for the X.509-SVID.
    pub dns_names: Vec<String>,
    /// Minimum node assurance level, as its `acr` value.
    #[serde(with = "opt_assurance")]
    pub min_assurance: Option<AssuranceLevel>,
    /// After this (Unix seconds) the entry yields no SVIDs. None: never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<i64>,
    /// Where the workload's key must live.
    #[serde(default)]
    pub key_binding: KeyBinding,
    /// Store revision of the last change to this entry.
    pub revision: u64,
    /// Creation time, Unix seconds.
    pub created_at: i64,
}

/// Where a workload's private key must live.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyBinding {
    /// Anywhere: the Workload API hands the key to the workload.
    #[default]
    None,
    /// In the agent's TPM, never exported; JWT-SVIDs carry `cnf`.
    Tpm,
}

impl KeyBinding {
    /// The name used in the APIs (`""` or `tpm`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "",
            Self::Tpm => "tpm",
        }
    }
}

/// Status of an attested agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AgentStatus {
    /// May call the node API.
    Active,
    /// Removed by an operator; its SVID is refused.
    Evicted,
    /// Banned by an operator; its SVID is refused and it may not renew.
    Banned,
}

impl AgentStatus {
    /// The name used in the admin API and CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Evicted => "evicted",
            Self::Banned => "banned",
        }
    }
}

/// An attested agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Agent {
    /// `spiffe://<td>/agent/join/<token id>`.
    pub spiffe_id: SpiffeId,
    /// Active, evicted or banned.
    pub status: AgentStatus,
    /// How strongly the node was attested.
    #[serde(with = "assurance")]
    pub assurance: AssuranceLevel,
    /// Attestation method (`join_token`).
    pub method: String,
    /// Hex serial of the only agent SVID currently accepted.
    pub serial: String,
    /// notAfter of that SVID, Unix seconds.
    pub expires_at: i64,
    /// First attestation, Unix seconds.
    pub attested_at: i64,
    /// TPMT_PUBLIC of the attestation key of the agent's latest TPM
    /// attestation: the key whose `TPM2_Certify` proves a workload key
    /// lives in this agent's TPM. None for a join-token agent, and for TPM
    /// agents last attested by a server that did not record it (they must
    /// attest again before they can get SVIDs for TPM-bound entries).
    #[serde(default, with = "opt_b64", skip_serializing_if = "Option::is_none")]
    pub tpm_ak: Option<Vec<u8>>,
}

/// A TPM-resident workload key the server accepted for one (agent, entry):
/// the agent's AK certified it, with qualifying data naming the entry, in a
/// `SignX509Svids` call. `MintJwtSvid` binds tokens (`cnf.jkt`) for that
/// entry only to this key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadKey {
    /// RFC 7638 SHA-256 thumbprint of the key's JWK, base64url.
    pub jkt: String,
    /// When the certification was accepted, Unix seconds.
    pub certified_at: i64,
}

/// Lifecycle of a signing key (a JWT key or an X.509 CA).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyState {
    /// Published in the bundle, not yet signing.
    Prepared,
    /// Signing.
    Active,
    /// No longer signing; published until what it signed has expired.
    Retired,
}

impl KeyState {
    /// The name used in the admin API and CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Prepared => "prepared",
            Self::Active => "active",
            Self::Retired => "retired",
        }
    }
}

/// The lifecycle of a JWT signing key (the same states as any key).
pub type JwtKeyState = KeyState;

/// A persisted JWT signing key.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredJwtKey {
    /// Key ID.
    pub kid: String,
    /// PKCS#8 DER, base64.
    #[serde(with = "b64")]
    pub pkcs8: Vec<u8>,
    /// State.
    pub state: JwtKeyState,
    /// Creation, Unix seconds.
    pub created_at: i64,
    /// No token signed by this key expires after this, Unix seconds.
    pub not_after: i64,
    /// When it stopped signing, Unix seconds.
    pub retired_at: Option<i64>,
}

impl std::fmt::Debug for StoredJwtKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredJwtKey")
            .field("kid", &self.kid)
            .field("pkcs8", &"<redacted>")
            .field("state", &self.state)
            .field("not_after", &self.not_after)
            .finish()
    }
}

/// A persisted X.509 CA of the rotation (prepared, active or retired).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredX509Ca {
    /// Hex serial of the CA certificate: its ID in the admin API.
    pub id: String,
    /// PKCS#8 DER of the CA key, base64.
    #[serde(with = "b64")]
    pub pkcs8: Vec<u8>,
    /// DER of the CA certificate, base64.
    #[serde(with = "b64")]
    pub cert: Vec<u8>,
    /// DER of the upstream CA certificate that signed it (the trust anchor
    /// published in the bundle), when the CA is an intermediate; None for a
    /// self-signed root (then `cert` is the anchor).
    #[serde(default, with = "opt_b64", skip_serializing_if = "Option::is_none")]
    pub upstream: Option<Vec<u8>>,
    /// State.
    pub state: KeyState,
    /// Creation, Unix seconds.
    pub created_at: i64,
    /// The CA certificate's notAfter, Unix seconds.
    pub not_after: i64,
    /// When it stopped signing, Unix seconds.
    #[serde(default)]
    pub retired_at: Option<i64>,
}

impl std::fmt::Debug for StoredX509Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredX509Ca")
            .field("id", &self.id)
            .field("pkcs8", &"<redacted>")
            .field("state", &self.state)
            .field("upstream", &self.upstream.is_some())
            .field("not_after", &self.not_after)
            .finish()
    }
}

/// The persisted X.509 CA of servers before CA rotation existed (one
/// self-signed root); migrated into [`StoredX509Ca`] on start.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredCa {
    /// PKCS#8 DER of the CA key, base64.
    #[serde(with = "b64")]
    pub pkcs8: Vec<u8>,
    /// DER of the CA certificate, base64.
    #[serde(with = "b64")]
    pub cert: Vec<u8>,
}

impl std::fmt::Debug for StoredCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StoredCa(<redacted>)")
    }
}

mod b64 {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        STANDARD.decode(s).map_err(serde::de::Error::custom)
    }
}

mod opt_b64 {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(b) => s.serialize_some(&STANDARD.encode(b)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|s| STANDARD.decode(s).map_err(serde::de::Error::custom))
            .transpose()
    }
}

mod assurance {
    use serde::{Deserialize, Deserializer, Serializer};
    use sigil::AssuranceLevel;

    pub fn serialize<S: Serializer>(v: &AssuranceLevel, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(v.acr())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<AssuranceLevel, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

mod opt_assurance {
    use serde::{Deserialize, Deserializer, Serializer};
    use sigil::AssuranceLevel;

    pub fn serialize<S: Serializer>(v: &Option<AssuranceLevel>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(l) => s.serialize_some(l.acr()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<AssuranceLevel>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|s| s.parse().map_err(serde::de::Error::custom))
            .transpose()
    }
}

/// Current time, Unix seconds.
pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// `n` random bytes from the system RNG.
pub fn random_bytes<const N: usize>() -> Result<[u8; N], RngError> {
    let mut b = [0u8; N];
    aws_lc_rs::rand::fill(&mut b).map_err(|_| RngError)?;
    Ok(b)
}

/// The system random generator failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("system random generator failed")]
pub struct RngError;

/// SHA-256.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}
