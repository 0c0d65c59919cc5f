//! Compiles `flotte/v1/*.proto` with protox (pure Rust, no system `protoc`)
//! and writes the file descriptor set used by gRPC reflection.

use std::path::PathBuf;

const PROTO_FILES: &[&str] = &[
    "flotte/v1/enrollment.proto",
    "flotte/v1/agent.proto",
    "flotte/v1/admin.proto",
    "flotte/v1/trust.proto",
    "flotte/v1/repair.proto",
    "flotte/v1/rollouts.proto",
    "flotte/v1/access.proto",
    "flotte/v1/integrity.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for file in PROTO_FILES {
        println!("cargo:rerun-if-changed={file}");
    }
    let descriptors = protox::compile(PROTO_FILES, ["."])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let descriptor_bytes = prost::Message::encode_to_vec(&descriptors);
    std::fs::write(out_dir.join("flotte_descriptor.bin"), descriptor_bytes)?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Smaller per-call buffers than tonic's default (src/codec.rs).
        .codec_path("crate::codec::CompactBufferCodec")
        .compile_fds(descriptors)?;
    Ok(())
}
