//! Compiles every file under `proto/` into tonic and prost code, and writes the descriptor set
//! that server reflection serves. protoc comes from `protoc-bin-vendored`, so a new machine needs
//! nothing but cargo.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // Cargo runs build scripts single-threaded before anything reads the environment.
    #[allow(unsafe_code)]
    unsafe {
        std::env::set_var("PROTOC", protoc);
    }
    let include = protoc_bin_vendored::include_path()?;

    let mut protos: Vec<PathBuf> = std::fs::read_dir("proto/tidings/v1")?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "proto"))
        .collect();
    protos.sort();
    // Compiled only into the descriptor set, so reflection clients can decode error details;
    // the Rust types come from tonic-types.
    protos.push(PathBuf::from("proto/google/rpc/error_details.proto"));

    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("tidings_descriptor.bin"))
        .build_client(std::env::var_os("CARGO_FEATURE_CLIENT").is_some())
        .build_server(std::env::var_os("CARGO_FEATURE_SERVER").is_some())
        // Services of later milestones answer UNIMPLEMENTED until the server overrides them.
        .generate_default_stubs(true)
        .compile_protos(&protos, &[PathBuf::from("proto"), include])?;

    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
