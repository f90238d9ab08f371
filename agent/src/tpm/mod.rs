//! Every TPM 2.0 call of the agent (feature `tpm`), through tss-esapi.
//!
//! - [`Tpm::open`] connects through a TCTI (`device:/dev/tpmrm0` on a real
//!   host, `swtpm:host=127.0.0.1,port=P` for a simulator), flushes the
//!   transient objects a crashed client left behind (a TPM without a resource
//!   manager holds only three), and warns loudly when the TPM is a software
//!   one.
//! - [`Tpm::start_attestation`] creates the endorsement key (RSA 2048, TCG
//!   default template) and a fresh attestation key under it;
//!   [`Attestation::activate_credential`] and [`Attestation::certify`] answer
//!   the server's challenge. Both keys are flushed when the
//!   [`Attestation`] is dropped.
//! - [`AgentKey`]: the agent SVID's key, an ECC P-256 signing key created
//!   under a deterministic storage primary key; its blobs live in the data
//!   dir (the private blob is encrypted by the TPM and useless elsewhere) and
//!   are reloaded after a restart. It signs in the TPM; no function returns
//!   private material.
//! - [`WorkloadKey`]: the keys of entries with `key_binding = "tpm"`, made
//!   the same way, certified by the AK of the latest attestation
//!   ([`SavedAk`]) for the server, and loaded only for one operation at a
//!   time.
//! - Between operations only the agent key stays loaded: the EK and AK of an
//!   attestation and the workload keys are saved contexts, so a TPM without
//!   a resource manager (swtpm: three object slots) never runs out.
//!
//! The tss-esapi context is not `Sync`: it sits behind a mutex, and every
//! call blocks the calling thread for one or more TPM commands (about a
//! millisecond on swtpm). From async code, call from a blocking task.

mod agent_key;
mod attest;
mod der;
mod node;
mod workload_key;

pub use agent_key::{AGENT_KEY_PRIV, AGENT_KEY_PUB, AgentKey, TpmSigningKey};
pub use attest::{Attestation, SavedAk};
pub use node::{TpmAttestError, TpmAttested, TpmNodeAttestor, TpmWorkloadKeys};
pub use workload_key::WorkloadKey;

use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use tss_esapi::constants::CapabilityType;
use tss_esapi::constants::tss::{TPM2_LOADED_SESSION_FIRST, TPM2_TRANSIENT_FIRST};
use tss_esapi::handles::TpmHandle;
use tss_esapi::structures::CapabilityData;
use tss_esapi::{Context, TctiNameConf};

/// The TCTI to document as default: the kernel's resource manager.
pub use crate::run::DEFAULT_TCTI;

/// Why a TPM operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TpmError {
    /// The TCTI string does not parse, or the TPM cannot be reached.
    #[error("TPM at {tcti:?}: {reason}")]
    Open {
        /// The TCTI string.
        tcti: String,
        /// What failed.
        reason: String,
    },
    /// A TPM command failed.
    #[error("TPM {op}: {source}")]
    Command {
        /// What was being done.
        op: &'static str,
        /// The TSS error.
        #[source]
        source: tss_esapi::Error,
    },
    /// The TPM answered with something this code does not accept.
    #[error("unexpected TPM output: {0}")]
    Unexpected(&'static str),
    /// A saved key blob could not be read or written.
    #[error("agent key blob {path}: {source}")]
    Blob {
        /// The file.
        path: std::path::PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A saved key blob does not parse or is not the agent key.
    #[error("agent key blob {0} is corrupt")]
    CorruptBlob(std::path::PathBuf),
}

trait Op<T> {
    fn op(self, op: &'static str) -> Result<T, TpmError>;
}

impl<T> Op<T> for Result<T, tss_esapi::Error> {
    fn op(self, op: &'static str) -> Result<T, TpmError> {
        self.map_err(|source| TpmError::Command { op, source })
    }
}

/// Who made the TPM, from its fixed properties.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TpmVendor {
    /// TPM_PT_MANUFACTURER as ASCII (`IBM`, `IFX`, `STM`, `MSFT`…).
    pub manufacturer: String,
    /// TPM_PT_VENDOR_STRING_1..4 concatenated.
    pub vendor: String,
    /// A simulator or software TPM (swtpm/libtpms, the IBM or Microsoft
    /// reference simulator): no hardware protection for the keys.
    pub software: bool,
}

/// A connection to one TPM. Cheap to clone; all clones share one context.
#[derive(Clone)]
pub struct Tpm {
    ctx: Arc<Mutex<Context>>,
    vendor: Arc<TpmVendor>,
}

impl std::fmt::Debug for Tpm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tpm").field("vendor", &self.vendor).finish()
    }
}

fn ascii(v: u32) -> String {
    v.to_be_bytes()
        .iter()
        .filter(|b| b.is_ascii_graphic() || **b == b' ')
        .map(|b| char::from(*b))
        .collect::<String>()
        .trim()
        .to_owned()
}

impl Tpm {
    /// Opens the TPM behind `tcti` (e.g. [`DEFAULT_TCTI`],
    /// `swtpm:host=127.0.0.1,port=2321`), flushes leftover transient objects
    /// and sessions, and reads the vendor (warning if it is software).
    pub fn open(tcti: &str) -> Result<Self, TpmError> {
        let open_err = |reason: String| TpmError::Open {
            tcti: tcti.to_owned(),
            reason,
        };
        let conf = TctiNameConf::from_str(tcti).map_err(|e| open_err(e.to_string()))?;
        let mut ctx = Context::new(conf).map_err(|e| open_err(e.to_string()))?;
        let flushed = flush_leftovers(&mut ctx)?;
        if flushed > 0 {
            tracing::info!(flushed, "flushed TPM handles left by an earlier client");
        }
        let vendor = read_vendor(&mut ctx)?;
        if vendor.software {
            tracing::warn!(
                manufacturer = %vendor.manufacturer,
                vendor = %vendor.vendor,
                "THIS IS A SOFTWARE TPM: its keys have no hardware protection and its \
                 attestation proves nothing about this machine; use it only for tests"
            );
        } else {
            tracing::info!(manufacturer = %vendor.manufacturer, vendor = %vendor.vendor, "TPM opened");
        }
        Ok(Self {
            ctx: Arc::new(Mutex::new(ctx)),
            vendor: Arc::new(vendor),
        })
    }

    /// Who made this TPM.
    pub fn vendor(&self) -> &TpmVendor {
        &self.vendor
    }

    fn lock(&self) -> MutexGuard<'_, Context> {
        // A panic mid-command cannot leave the context in a state Rust
        // relies on; the TPM answers the next command normally.
        self.ctx.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `f` on the raw tss-esapi context. For tests and diagnostics:
    /// what `f` loads, it must flush.
    #[doc(hidden)]
    pub fn with_raw_context<T>(&self, f: impl FnOnce(&mut Context) -> T) -> T {
        f(&mut self.lock())
    }

    /// The number of transient objects loaded in the TPM now (tests,
    /// diagnostics).
    pub fn transient_handles(&self) -> Result<usize, TpmError> {
        Ok(handles(&mut self.lock(), TPM2_TRANSIENT_FIRST)?.len())
    }

    /// The number of sessions loaded in the TPM now (tests, diagnostics).
    pub fn loaded_sessions(&self) -> Result<usize, TpmError> {
        Ok(handles(&mut self.lock(), TPM2_LOADED_SESSION_FIRST)?.len())
    }
}

fn handles(ctx: &mut Context, first: u32) -> Result<Vec<TpmHandle>, TpmError> {
    let (data, _more) = ctx
        .get_capability(CapabilityType::Handles, first, 64)
        .op("list handles")?;
    let CapabilityData::Handles(list) = data else {
        return Err(TpmError::Unexpected(
            "GetCapability(handles) answered something else",
        ));
    };
    // The list continues into the next range; keep the asked one.
    Ok(list
        .into_inner()
        .into_iter()
        .filter(|h| u32::from(*h) >> 24 == first >> 24)
        .collect())
}

/// Flushes the transient objects and loaded sessions of earlier clients.
/// Returns how many were flushed.
fn flush_leftovers(ctx: &mut Context) -> Result<usize, TpmError> {
    let mut n = 0;
    for first in [TPM2_TRANSIENT_FIRST, TPM2_LOADED_SESSION_FIRST] {
        for h in handles(ctx, first)? {
            match ctx
                .tr_from_tpm_public(h)
                .and_then(|tr| ctx.flush_context(tr))
            {
                Ok(()) => n += 1,
                Err(e) => {
                    tracing::warn!(handle = format!("{:#010x}", u32::from(h)), error = %e, "could not flush a leftover TPM handle")
                }
            }
        }
    }
    Ok(n)
}

fn read_vendor(ctx: &mut Context) -> Result<TpmVendor, TpmError> {
    use tss_esapi::constants::PropertyTag;
    let mut prop = |tag| -> Result<String, TpmError> {
        Ok(ctx
            .get_tpm_property(tag)
            .op("read TPM properties")?
            .map(ascii)
            .unwrap_or_default())
    };
    let manufacturer = prop(PropertyTag::Manufacturer)?;
    let mut vendor = String::new();
    for tag in [
        PropertyTag::VendorString1,
        PropertyTag::VendorString2,
        PropertyTag::VendorString3,
        PropertyTag::VendorString4,
    ] {
        let s = prop(tag)?;
        if !s.is_empty() {
            if !vendor.is_empty() {
                vendor.push(' ');
            }
            vendor.push_str(&s);
        }
    }
    let software = is_software(&manufacturer, &vendor);
    Ok(TpmVendor {
        manufacturer,
        vendor,
        software,
    })
}

/// swtpm (libtpms) and the IBM reference simulator report a vendor
/// string starting with `SW` (manufacturer `IBM`); other simulators say
/// so in the vendor string.
fn is_software(manufacturer: &str, vendor: &str) -> bool {
    let v = vendor.to_ascii_uppercase();
    v.starts_with("SW") || v.contains("SIMULATOR") || v.contains("SWTPM") || manufacturer == "SW"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vendor_strings() {
        assert_eq!(ascii(0x49424d00), "IBM");
        assert_eq!(ascii(0x53572020), "SW");
        assert!(is_software("IBM", "SW TPM"));
        assert!(!is_software("IFX", "SLB9670"));
        assert!(!is_software("STM", ""));
    }
}
