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
    strata_fs::layout::Layout::new(&g.root).chunk_cache()
}

/// Whole files kept for `mount --passthrough`.
pub fn files_dir(g: &GlobalArgs) -> PathBuf {
    strata_fs::layout::Layout::new(&g.root).file_cache()
}

pub fn run(g: &GlobalArgs, a: CacheArgs) -> anyhow::Result<()> {
    // A running daemon owns the caches: trimming goes through it, so its index stays true.
    if let CacheCommand::Gc { max_size } = a.command {
        let req = strata_fs::service::protocol::Request::CacheGc { max_size };
        if let Some(v) = super::daemon::call_running(g, &req)? {
            let n = |p: &str| v.pointer(p).and_then(|x| x.as_u64()).unwrap_or(0);
            println!(
                "the daemon trimmed its caches: {} chunks, {} remain",
                n("/disk_cache/entries"),
                human_bytes(n("/disk_cache/bytes"))
            );
            return Ok(());
        }
    }
    // The chunk cache, and the whole-file cache of passthrough mounts when there is one.
    // Opening with an unlimited cap only indexes; eviction happens on request.
    let mut caches = Vec::new();
    for (what, dir) in [("chunks", cache_dir(g)), ("files", files_dir(g))] {
        if what == "files" && !dir.exists() {
            continue;
        }
        let cache = DiskCache::open(&dir, u64::MAX)
            .with_context(|| format!("opening {}", dir.display()))?;
        caches.push((what, dir, cache));
    }
    match a.command {
        CacheCommand::Stats { json } => {
            let mut out = serde_json::Map::new();
            for (what, dir, cache) in &caches {
                let s = cache.stats();
                if json {
                    let body = serde_json::json!({"dir": dir, *what: s.entries, "bytes": s.bytes});
                    if *what == "chunks" {
                        // The chunk cache's fields at the top level, as before files existed.
                        if let serde_json::Value::Object(m) = body {
                            out.extend(m);
                        }
                    } else {
                        out.insert((*what).into(), body);
                    }
                } else {
                    println!(
                        "{}: {} {what}, {}",
                        dir.display(),
                        s.entries,
                        human_bytes(s.bytes)
                    );
                }
            }
            if json {
                println!("{}", serde_json::Value::Object(out));
            }
        }
        CacheCommand::Gc { max_size } => {
            for (what, _, cache) in &caches {
                let before = cache.stats();
                cache.evict_to(max_size);
                let after = cache.stats();
                println!(
                    "removed {} {what} ({}); {} {what}, {} remain",
                    before.entries - after.entries,
                    human_bytes(before.bytes - after.bytes),
                    after.entries,
                    human_bytes(after.bytes)
                );
            }
        }
    }
    Ok(())
}
