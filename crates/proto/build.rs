//! Compiles `proto/patchflow/v1/patchflow.proto` into Rust types, tonic client and server stubs,
//! and a file descriptor set for gRPC reflection. `protoc` comes from `protoc-bin-vendored`, so
//! no system installation is needed.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let proto_root = manifest_dir.join("../../proto");
    let proto_file = proto_root.join("patchflow/v1/patchflow.proto");
    println!("cargo:rerun-if-changed={}", proto_file.display());

    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let include = protoc_bin_vendored::include_path()?;
    // SAFETY: build scripts are single-threaded; nothing else reads the environment concurrently.
    unsafe {
        std::env::set_var("PROTOC", protoc);
        std::env::set_var("PROTOC_INCLUDE", &include);
    }

    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("patchflow_descriptor.bin"))
        .bytes(".")
        .compile_protos(&[proto_file], &[proto_root, include])?;
    Ok(())
}
