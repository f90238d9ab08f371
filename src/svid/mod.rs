//! SVID types: X.509-SVIDs with their keys, and JWT-SVID minting.

pub mod jwt;
pub mod x509;
