//! # sigil-server
//!
//! The Sigil server: the trust anchor of a trust domain. It holds the X.509
//! CA and the JWT signing keys ([`ca`]), the registration entries, attested
//! agents and join tokens ([`store`]), and the audit log ([`audit`]); it
//! attests agents with one-time join tokens and mints X.509-SVIDs and
//! JWT-SVIDs for them over the node API ([`api::node`], TLS 1.3 via
//! [`tls`]), and is administered over a Unix socket ([`api::admin`]).
//!
//! Authorization decisions are pure functions ([`authz`], [`entry`]) so they
//! can be tested without sockets.

pub mod api {
    //! Thin gRPC handlers: validate → authenticate → authorize → act → audit.
    pub mod admin;
    pub mod http;
    pub mod node;
}
pub mod audit;
pub mod authz;
pub mod ca;
pub mod config;
pub mod entry;
pub mod model;
pub mod server;
pub mod state;
pub mod store;
pub mod tls;
pub mod tpm;
