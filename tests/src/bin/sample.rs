#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failure should abort loudly
//! `strata-sample`: writes the feature-complete sample image used by the demo, the tests and
//! the benchmarks, as an OCI image layout (and optionally a Docker archive).

use std::path::PathBuf;

use clap::Parser;
use strata_tests::image::{
    feature_layers, noise, text, write_docker_archive, write_oci_layout, Compression, Layer,
    LayerBuilder,
};

#[derive(Parser)]
struct Args {
    /// Directory to write the OCI image layout to.
    out: PathBuf,
    /// Tag of the image inside the layout.
    #[arg(long, default_value = "v1")]
    tag: String,
    /// Number of small files in the `many/` directory.
    #[arg(long, default_value_t = 10_000)]
    small_files: usize,
    /// Also write a Docker archive here.
    #[arg(long)]
    docker_archive: Option<PathBuf>,
    /// Add a layer holding one large file of this many MiB (`large.bin`, mixed content).
    #[arg(long, default_value_t = 0)]
    large_file_mib: usize,
    /// Fill the large file with the bytes of these files (repeated as needed) instead of
    /// synthetic data: real binaries make compression and decode speeds realistic.
    #[arg(long, num_args = 1..)]
    large_file_from: Vec<PathBuf>,
    /// Compression of the layers: none, gzip or zstd.
    #[arg(long, default_value = "gzip")]
    compression: String,
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let compression = match a.compression.as_str() {
        "none" => Compression::None,
        "gzip" => Compression::Gzip,
        "zstd" => Compression::Zstd,
        other => anyhow::bail!("unknown compression {other:?}"),
    };
    let mut layers = feature_layers(a.small_files)?;
    if a.large_file_mib > 0 {
        let len = a.large_file_mib << 20;
        let mut data = Vec::with_capacity(len);
        'fill: while !a.large_file_from.is_empty() {
            for f in &a.large_file_from {
                let bytes = std::fs::read(f)?;
                let take = bytes.len().min(len - data.len());
                data.extend_from_slice(&bytes[..take]);
                if data.len() == len {
                    break 'fill;
                }
            }
        }
        if data.is_empty() {
            data = text(7, len / 2);
            data.extend(noise(8, len - data.len()));
        }
        let mut l = LayerBuilder::new();
        l.file("large.bin", 0o644, &data)?;
        layers.push(Layer {
            tar: l.finish()?,
            compression,
        });
    }
    for l in &mut layers {
        l.compression = compression;
    }
    write_oci_layout(&a.out, &a.tag, &layers)?;
    if let Some(f) = &a.docker_archive {
        write_docker_archive(f, &a.tag, &layers)?;
    }
    println!(
        "wrote {}:{} ({} layers)",
        a.out.display(),
        a.tag,
        layers.len()
    );
    Ok(())
}
