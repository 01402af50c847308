//! Generates containerd's gRPC APIs from the proto files Debian ships in
//! `golang-github-containerd-containerd-dev` (scripts/setup.sh installs it), compiled by protox
//! (no protoc binary): the snapshots service (served), and the content, images, leases and
//! diff services (called by `strata rpull`); they import `types/*.proto`.

use std::path::Path;

fn main() -> anyhow::Result<()> {
    let gocode = std::env::var("STRATA_GOCODE").unwrap_or_else(|_| "/usr/share/gocode/src".into());
    let root = Path::new(&gocode);
    let api = root.join("github.com/containerd/containerd/api");
    let protos: Vec<_> = [
        "snapshots/v1/snapshots.proto",
        "content/v1/content.proto",
        "images/v1/images.proto",
        "leases/v1/leases.proto",
        "diff/v1/diff.proto",
    ]
    .iter()
    .map(|p| api.join("services").join(p))
    .collect();
    for proto in &protos {
        if !proto.exists() {
            anyhow::bail!(
                "{} is missing: install golang-github-containerd-containerd-dev (scripts/setup.sh)",
                proto.display()
            );
        }
        println!("cargo:rerun-if-changed={}", proto.display());
    }
    let gogo = root.join("github.com/gogo/protobuf");
    let fds = protox::compile(&protos, [root, gogo.as_path()])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    for t in ["mount.proto", "descriptor.proto"] {
        println!(
            "cargo:rerun-if-changed={}",
            api.join("types").join(t).display()
        );
    }
    println!("cargo:rerun-if-env-changed=STRATA_GOCODE");
    Ok(())
}
