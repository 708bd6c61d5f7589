//! Generates the gRPC code from generate.proto with a vendored protoc, so builds need no system protoc.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; the variable is read by tonic-build below.
    unsafe { std::env::set_var("PROTOC", protoc) };
    println!("cargo:rerun-if-changed=generate.proto");
    tonic_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_protos(&["generate.proto"], &["."])?;
    Ok(())
}
