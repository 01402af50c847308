//! Generates the CRI image-service client the snapshotter test pulls through (protox, no
//! protoc binary).

fn main() -> anyhow::Result<()> {
    let proto = "proto/cri_image.proto";
    let fds = protox::compile([proto], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(false)
        .compile_fds(fds)?;
    println!("cargo:rerun-if-changed={proto}");
    Ok(())
}
