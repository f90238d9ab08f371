//! Generated protobuf and gRPC code.

/// The SPIFFE Workload API. The proto has no package, so the generated code
/// lands in `_.rs`.
pub mod workload {
    #![allow(
        missing_docs,
        clippy::all,
        clippy::pedantic,
        missing_debug_implementations
    )]
    include!(concat!(env!("OUT_DIR"), "/_.rs"));
}

/// Sigil's node API (agent ↔ server), `sigil.node.v1`.
pub mod node {
    /// Version 1.
    pub mod v1 {
        #![allow(
            missing_docs,
            clippy::all,
            clippy::pedantic,
            missing_debug_implementations
        )]
        include!(concat!(env!("OUT_DIR"), "/sigil.node.v1.rs"));
    }
}

/// Sigil's admin API (CLI ↔ server, Unix socket), `sigil.admin.v1`.
pub mod admin {
    /// Version 1.
    pub mod v1 {
        #![allow(
            missing_docs,
            clippy::all,
            clippy::pedantic,
            missing_debug_implementations
        )]
        include!(concat!(env!("OUT_DIR"), "/sigil.admin.v1.rs"));
    }
}

/// Sigil's workload key service (TPM-bound workload keys), on the agent's
/// Workload API socket, `sigil.workload.v1`.
pub mod keys {
    /// Version 1.
    pub mod v1 {
        #![allow(
            missing_docs,
            clippy::all,
            clippy::pedantic,
            missing_debug_implementations
        )]
        include!(concat!(env!("OUT_DIR"), "/sigil.workload.v1.rs"));
    }
}
