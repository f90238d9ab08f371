//! Validation of SVIDs presented by others: what a tool links.

pub mod jwt;
pub mod pop;
pub mod x509;
