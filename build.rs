//! Generates the gRPC code for the Workload API and Sigil's own APIs with a
//! pure-Rust protobuf compiler (protox): no system `protoc` is needed.

fn main() {
    #[cfg(feature = "proto")]
    if let Err(e) = proto::generate() {
        // A build script reports failure by exiting non-zero; printing the
        // error first makes it readable in cargo's output.
        eprintln!("proto generation failed: {e}");
        std::process::exit(1);
    }
}

#[cfg(feature = "proto")]
mod proto {
    pub const FILES: &[&str] = &[
        "proto/spiffe/workload/workload.proto",
        "proto/sigil/node/v1/node.proto",
        "proto/sigil/admin/v1/admin.proto",
        "proto/sigil/workload/v1/keys.proto",
    ];

    pub fn generate() -> Result<(), Box<dyn std::error::Error>> {
        for f in FILES {
            println!("cargo:rerun-if-changed={f}");
        }
        let fds = protox::compile(FILES, ["proto"])?;
        tonic_prost_build::configure()
            .build_client(true)
            .build_server(true)
            .compile_fds(fds)?;
        Ok(())
    }
}
