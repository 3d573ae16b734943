//! Generates the herald.v1 gRPC code. No `protoc` is assumed on the machine:
//! the vendored one is used unless `PROTOC` points elsewhere.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        // SAFETY-free: build scripts are single-threaded at this point.
        unsafe { std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?) };
    }
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("herald_descriptor.bin"))
        .compile_protos(&["herald/v1/herald.proto", "herald/v1/hooks.proto"], &["."])?;
    println!("cargo:rerun-if-changed=herald/v1/herald.proto");
    println!("cargo:rerun-if-changed=herald/v1/hooks.proto");
    Ok(())
}
