//! Compiles `proto/quire/v1/*.proto` with protox (pure Rust, no `protoc` needed) and generates the
//! prost messages and tonic services into `OUT_DIR`, plus the encoded descriptor set that gRPC
//! server reflection serves.

use prost::Message as _;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/quire/v1/scribe.proto",
        "proto/quire/v1/api.proto",
        "proto/quire/v1/peer.proto",
    ];
    for file in files {
        println!("cargo:rerun-if-changed={file}");
    }
    let descriptors = protox::compile(files, ["proto"])?;
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("quire_descriptor.bin"),
        descriptors.encode_to_vec(),
    )?;
    tonic_build::configure()
        .bytes(["."])
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}
