// Generates the gRPC code with a vendored protoc, so a fresh machine needs no protobuf install.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    std::env::set_var("PROTOC", protoc);
    println!("cargo:rerun-if-changed=atoll/v1/control.proto");
    tonic_prost_build::configure().compile_protos(&["atoll/v1/control.proto"], &["."])?;
    Ok(())
}
