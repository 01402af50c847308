use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use strata_fs::cache::DiskCache;

use super::{human_bytes, parse_size};
use crate::GlobalArgs;

#[derive(clap::Args)]
pub struct CacheArgs {
    #[command(subcommand)]
    pub command: CacheCommand,
}

#[derive(Subcommand)]
pub enum CacheCommand {
    /// Show what the chunk cache holds.
    Stats {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Evict least-recently-used chunks until the cache fits a size.
    Gc {
        /// Size to trim to (0 empties the cache).
        #[arg(long, default_value = "10G", value_parser = parse_size)]
        max_size: u64,
    },
}

/// The chunk cache's directory under the store root.
pub fn cache_dir(g: &GlobalArgs) -> PathBuf {
    g.root.join("cache/chunks")
}

pub fn run(g: &GlobalArgs, a: CacheArgs) -> anyhow::Result<()> {
    let dir = cache_dir(g);
    // Opening with an unlimited cap only indexes; eviction happens on request.
    let cache =
        DiskCache::open(&dir, u64::MAX).with_context(|| format!("opening {}", dir.display()))?;
    match a.command {
        CacheCommand::Stats { json } => {
            let s = cache.stats();
            if json {
                println!(
                    "{}",
                    serde_json::json!({"dir": dir, "chunks": s.entries, "bytes": s.bytes})
                );
            } else {
                println!(
                    "{}: {} chunks, {}",
                    dir.display(),
                    s.entries,
                    human_bytes(s.bytes)
                );
            }
        }
        CacheCommand::Gc { max_size } => {
            let before = cache.stats();
            cache.evict_to(max_size);
            let after = cache.stats();
            println!(
                "removed {} chunks ({}); {} chunks, {} remain",
                before.entries - after.entries,
                human_bytes(before.bytes - after.bytes),
                after.entries,
                human_bytes(after.bytes)
            );
        }
    }
    Ok(())
}
