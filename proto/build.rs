//! Generates the gRPC code from generate.proto. `protox` (a protobuf compiler in Rust) parses it
//! into a descriptor set that tonic-build turns into code, so builds need no `protoc` binary.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=generate.proto");
    let descriptors = protox::compile(["generate.proto"], ["."])?;
    tonic_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(descriptors)?;
    Ok(())
}
