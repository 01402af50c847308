use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use strata_fs::cache::{CacheStats, DiskCache};
use strata_fs::packs::PackCache;

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

/// Takes the daemon lock of `--root` (so no daemon starts while the caches are open here).
fn hold_daemon_lock(g: &GlobalArgs) -> anyhow::Result<nix::fcntl::Flock<std::fs::File>> {
    let file = super::daemon::open_lock(g)?;
    match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(l) => Ok(l),
        Err((_, e)) => anyhow::bail!(
            "a strata daemon is starting for {} ({e}); run the command again",
            g.root.display()
        ),
    }
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
    // With a daemon running, its own figures (it owns the caches).
    if let CacheCommand::Stats { json } = a.command {
        let req = strata_fs::service::protocol::Request::Metrics;
        if let Some(v) = super::daemon::call_running(g, &req)? {
            let node = &v["node"];
            let n = |p: &str| node.pointer(p).and_then(|x| x.as_u64()).unwrap_or(0);
            if json {
                let mut out = serde_json::json!({"dir": cache_dir(g), "chunks": n("/disk_cache/entries"),
                    "bytes": n("/disk_cache/bytes")});
                if node["file_cache"].is_object() {
                    out["files"] = serde_json::json!({"dir": files_dir(g),
                        "files": n("/file_cache/entries"), "bytes": n("/file_cache/bytes")});
                }
                println!("{out}");
            } else {
                println!(
                    "{}: {} chunks, {}",
                    cache_dir(g).display(),
                    n("/disk_cache/entries"),
                    human_bytes(n("/disk_cache/bytes"))
                );
            }
            return Ok(());
        }
    }
    // No daemon: open the caches here, holding the daemon's lock so none starts meanwhile (an
    // unlimited cap only indexes; eviction on request):
    // the chunk packs, and the whole-file cache of passthrough mounts when there is one.
    let _lock = hold_daemon_lock(g)?;
    type Stats = Box<dyn Fn() -> CacheStats>;
    type Evict = Box<dyn Fn(u64)>;
    let mut caches: Vec<(&str, PathBuf, Stats, Evict)> = Vec::new();
    let dir = cache_dir(g);
    let packs = std::sync::Arc::new(
        PackCache::open(&dir, u64::MAX).with_context(|| format!("opening {}", dir.display()))?,
    );
    let p2 = packs.clone();
    caches.push((
        "chunks",
        dir,
        Box::new(move || packs.stats()),
        Box::new(move |m| p2.evict_to(m)),
    ));
    let dir = files_dir(g);
    if dir.exists() {
        let files = std::sync::Arc::new(
            DiskCache::open(&dir, u64::MAX)
                .with_context(|| format!("opening {}", dir.display()))?,
        );
        let f2 = files.clone();
        caches.push((
            "files",
            dir,
            Box::new(move || files.stats()),
            Box::new(move |m| f2.evict_to(m)),
        ));
    }
    match a.command {
        CacheCommand::Stats { json } => {
            let mut out = serde_json::Map::new();
            for (what, dir, stats, _) in &caches {
                let s = stats();
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
            for (what, _, stats, evict) in &caches {
                let before = stats();
                evict(max_size);
                let after = stats();
                println!(
                    "removed {} {what} ({}); {} {what}, {} remain",
                    before.entries.saturating_sub(after.entries),
                    human_bytes(before.bytes.saturating_sub(after.bytes)),
                    after.entries,
                    human_bytes(after.bytes)
                );
            }
        }
    }
    Ok(())
}
