//! # Sigil
//!
//! SPIFFE identity for AI agents and the tools they call. This crate is what
//! the Sigil server, agent and CLI share, and what a tool links to validate
//! the identities presented to it:
//!
//! - [`SpiffeId`] and [`TrustDomain`], parsed exactly per the SPIFFE ID spec;
//! - [`X509Svid`] (chain + key, SPIFFE certificate rules enforced);
//! - bundles ([`bundle`]): SPIFFE bundle format, JWKS, PEM; a [`BundleSet`]
//!   keyed by trust domain;
//! - validation ([`validate`]): hardened JWT-SVID validation returning a
//!   [`VerifiedJwtSvid`] only the validator can build, and X.509-SVID
//!   verification returning a [`VerifiedX509Svid`];
//! - the Workload API endpoint address ([`endpoint`]) and, with the
//!   `workload-client` feature, a Workload API client.
//!
//! A tool that only validates JWT-SVIDs depends on this crate with
//! `default-features = false` and compiles no gRPC stack.

pub mod assurance;
pub mod bundle;
pub mod endpoint;
pub mod id;
mod json;
pub mod key;
pub mod source;
pub mod svid;
pub mod validate;

#[cfg(feature = "proto")]
pub mod proto;

#[cfg(feature = "tls")]
pub mod tls;

#[cfg(feature = "layer")]
pub mod layer;

#[cfg(feature = "http-source")]
pub mod http_source;

#[cfg(feature = "tpm")]
pub mod tpm;

#[cfg(feature = "workload-client")]
pub mod workload;

#[cfg(feature = "workload-client")]
pub mod workload_keys;

pub use assurance::AssuranceLevel;
pub use bundle::{Bundle, BundleError, BundleSet, JwtBundle, JwtKey, X509Bundle};
pub use id::{IdError, SpiffeId, TrustDomain};
pub use key::PrivateKey;
pub use svid::x509::{X509Svid, X509SvidError};
pub use validate::jwt::{JwtSvidError, JwtSvidValidator, VerifiedJwtSvid};
pub use validate::x509::{Authorizer, VerifiedX509Svid, verify_x509_svid};
