//! Generates containerd's snapshots gRPC API from the proto files Debian ships in
//! `golang-github-containerd-containerd-dev` (scripts/setup.sh installs it), compiled by protox
//! (no protoc binary). Only `snapshots.proto` is listed: it imports `types/mount.proto`.

use std::path::Path;

fn main() -> anyhow::Result<()> {
    let gocode = std::env::var("STRATA_GOCODE").unwrap_or_else(|_| "/usr/share/gocode/src".into());
    let root = Path::new(&gocode);
    let proto =
        root.join("github.com/containerd/containerd/api/services/snapshots/v1/snapshots.proto");
    if !proto.exists() {
        anyhow::bail!(
            "{} is missing: install golang-github-containerd-containerd-dev (scripts/setup.sh)",
            proto.display()
        );
    }
    let gogo = root.join("github.com/gogo/protobuf");
    let fds = protox::compile([&proto], [root, gogo.as_path()])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    println!("cargo:rerun-if-changed={}", proto.display());
    println!(
        "cargo:rerun-if-changed={}",
        root.join("github.com/containerd/containerd/api/types/mount.proto")
            .display()
    );
    println!("cargo:rerun-if-env-changed=STRATA_GOCODE");
    Ok(())
}
