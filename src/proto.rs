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
