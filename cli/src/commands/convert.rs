use std::time::Instant;

use anyhow::Context;
use strata_builder::convert::{convert_image, ConvertOptions, Progress};
use strata_builder::source::open_source;
use strata_fs::reference::Reference;

use super::{human_bytes, open_store, parse_size};
use crate::GlobalArgs;

#[derive(clap::Args)]
pub struct ConvertArgs {
    /// Source image: oci:DIR[:TAG] or docker-archive:FILE.
    pub source: String,
    /// Name of the converted image in the local store (e.g. app:v1-strata).
    pub target: String,
    /// Uncompressed bytes per chunk (e.g. 1M, 512K).
    #[arg(long, default_value = "1M", value_parser = parse_size)]
    pub chunk_size: u64,
    /// Uncompressed bytes per chunk of ELF executables (files with an execute bit, up to
    /// 64 MiB), which `exec` pages in sparsely; 0 = --chunk-size.
    #[arg(long, default_value = "32K", value_parser = parse_size)]
    pub exec_chunk_size: u64,
    /// zstd compression level.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(i32).range(1..=19))]
    pub compression_level: i32,
    /// Compression threads (0 = one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    #[command(flatten)]
    pub registry: super::registry::RegistryArgs,
}

/// Whether a reference names its registry explicitly (`host.domain/…`, `host:port/…`,
/// `localhost/…`); such a target is pushed after converting.
fn explicit_registry(s: &str) -> bool {
    s.split_once('/').is_some_and(|(first, _)| {
        first.contains('.') || first.contains(':') || first == "localhost"
    })
}

pub fn run(g: &GlobalArgs, a: ConvertArgs) -> anyhow::Result<()> {
    let target = Reference::parse(&a.target)?;
    let chunk_size = u32::try_from(a.chunk_size)
        .ok()
        .filter(|&c| (4096..=strata_fs::format::MAX_CHUNK_SIZE).contains(&c))
        .context("--chunk-size must be between 4K and 64M")?;
    let exec_chunk_size = u32::try_from(a.exec_chunk_size)
        .ok()
        .filter(|&c| {
            c == 0 || (c % 4096 == 0 && (4096..=strata_fs::format::MAX_CHUNK_SIZE).contains(&c))
        })
        .context("--exec-chunk-size must be 0 or a multiple of 4K up to 64M (whole pages)")?;
    let store = open_store(g)?;
    let client = a.registry.client()?;
    let src =
        open_source(&a.source, Some(&client)).with_context(|| format!("reading {}", a.source))?;
    let opts = ConvertOptions {
        chunk_size,
        exec_chunk_size,
        level: a.compression_level,
        threads: a.threads,
        ..ConvertOptions::default()
    };
    let start = Instant::now();
    let mut layer_start = Instant::now();
    let report = convert_image(&store, &src, &target, &opts, &mut |p| match p {
        Progress::LayerStart { index, count, size } => {
            layer_start = Instant::now();
            println!(
                "layer {}/{count}: converting {}",
                index + 1,
                human_bytes(size)
            );
        }
        Progress::LayerDone {
            index,
            layer,
            digest,
        } => {
            let s = &layer.summary;
            let secs = layer_start.elapsed().as_secs_f64();
            println!(
                "layer {}: {} entries, {} chunks, {} → {} in {:.2}s ({:.0} MB/s) {}",
                index + 1,
                s.entries,
                s.chunks,
                human_bytes(s.uncompressed_size),
                human_bytes(s.blob_size),
                secs,
                s.uncompressed_size as f64 / 1e6 / secs.max(1e-9),
                digest
            );
        }
    })
    .with_context(|| format!("converting {} to {target}", a.source))?;
    println!(
        "converted {} → {} ({}) in {:.2}s",
        a.source,
        target,
        report.manifest.digest,
        start.elapsed().as_secs_f64()
    );
    if explicit_registry(&a.target) {
        strata_fs::transfer::push(
            &store,
            &client,
            &target.to_string(),
            &target,
            &mut super::registry::progress_printer(),
        )
        .with_context(|| format!("pushing {target}"))?;
        println!("pushed {target}");
    }
    Ok(())
}
