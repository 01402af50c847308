//! `strata-sample`: writes the feature-complete sample image used by the demo, the tests and
//! the benchmarks, as an OCI image layout (and optionally a Docker archive).

use std::path::PathBuf;

use clap::Parser;
use strata_tests::image::{feature_layers, write_docker_archive, write_oci_layout};

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
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let layers = feature_layers(a.small_files)?;
    write_oci_layout(&a.out, &a.tag, &layers)?;
    if let Some(f) = &a.docker_archive {
        write_docker_archive(f, &a.tag, &layers)?;
    }
    println!("wrote {}:{} ({} layers)", a.out.display(), a.tag, layers.len());
    Ok(())
}
