//! Images in and out as files: `strata import` makes a one-layer image from a rootfs tarball.

use std::io::Read;
use std::path::PathBuf;

use anyhow::Context;
use serde_json::json;
use strata_builder::commit::{apply_change, save_image};
use strata_builder::convert::{convert_layer, layer_descriptor, ConvertOptions};
use strata_fs::reference::Reference;

use super::open_store;
use crate::GlobalArgs;

#[derive(clap::Args)]
pub struct ImportArgs {
    /// Dockerfile instruction to apply to the image config (CMD, ENTRYPOINT, ENV, WORKDIR,
    /// USER, LABEL, EXPOSE, VOLUME, STOPSIGNAL); repeatable.
    #[arg(short = 'c', long = "change")]
    pub changes: Vec<String>,
    /// History comment.
    #[arg(short = 'm', long)]
    pub message: Option<String>,
    /// The rootfs tarball (plain, gzip or zstd), or `-` for standard input.
    pub file: PathBuf,
    /// Name of the new image (default: `localhost/import:` and the start of its layer's digest).
    pub reference: Option<String>,
}

/// `strata import`: a rootfs tarball becomes a one-layer image (hostile paths refused, as in
/// `convert`).
pub fn import(g: &GlobalArgs, a: ImportArgs) -> anyhow::Result<()> {
    let mut config = json!({"config": {}});
    for c in &a.changes {
        apply_change(&mut config, c)?;
    }
    let dst = a.reference.as_deref().map(Reference::parse).transpose()?;
    let store = open_store(g)?;
    let input: Box<dyn Read> = if a.file.as_os_str() == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        Box::new(
            std::fs::File::open(&a.file)
                .with_context(|| format!("opening {}", a.file.display()))?,
        )
    };
    let (blob, c) = convert_layer(input, store.blob_writer()?, &ConvertOptions::default())
        .with_context(|| format!("importing {}", a.file.display()))?;
    let digest = blob.commit(None)?;
    let layer = layer_descriptor(digest, &c.summary);
    let diff_id = c.summary.diff_id.oci();
    let now = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    let (os, arch) = strata_fs::oci::host_platform();
    config["architecture"] = json!(arch);
    config["os"] = json!(os);
    config["created"] = json!(now);
    config["rootfs"] = json!({"type": "layers", "diff_ids": [diff_id]});
    let mut entry =
        json!({"created": now, "created_by": format!("strata import {}", a.file.display())});
    if let Some(m) = &a.message {
        entry["comment"] = json!(m);
    }
    config["history"] = json!([entry]);
    let dst = match dst {
        Some(d) => d,
        None => Reference::parse(&format!(
            "localhost/import:{}",
            &diff_id.trim_start_matches("sha256:")[..12]
        ))?,
    };
    let template = super::build::scratch_manifest()?;
    let desc = save_image(
        &store,
        &template,
        vec![layer],
        &config,
        &Default::default(),
        &dst,
    )?;
    println!("{}", desc.digest);
    Ok(())
}
