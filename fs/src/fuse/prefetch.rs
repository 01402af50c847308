//! A mount's background work on its remote layers: fetching what its access profile names as
//! soon as it is up, then every other chunk into the node's disk cache while readers pause.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::Shared;
use crate::blob::BlobSource;
use crate::format::Chunk;
use crate::tree::Tree;

/// Chunks of one layer (its index in the mount's layers).
type LayerChunks = (usize, Vec<Chunk>);

/// The chunks of remote layers that a profile names, in the profile's order (each chunk once):
/// the chunks of a ranged line that overlap its ranges, all chunks of a whole file. A profile
/// may come from a registry: the work is bounded by the chunks it can name
/// ([`MAX_PROFILE_VISITS`]), however its lines repeat.
fn profile_chunks(
    tree: &Tree,
    blobs: &[Arc<dyn BlobSource>],
    profile: &[crate::profile::Line],
) -> Vec<LayerChunks> {
    let mut seen = std::collections::HashSet::new();
    let mut whole = std::collections::HashSet::new();
    let mut visits = 0usize;
    let mut out: Vec<LayerChunks> = Vec::new();
    for line in profile {
        // The line as a path first (a whole file); else the path and ranges it gives.
        let (ino, ranges) = match tree.lookup_path(&line.text) {
            Some(ino) => (ino, None),
            None => match &line.ranged {
                Some((path, ranges)) => match tree.lookup_path(path) {
                    Some(ino) => (ino, Some(ranges)),
                    None => continue,
                },
                None => continue,
            },
        };
        if whole.contains(&ino) {
            continue;
        }
        let Some(d) = tree.get(ino).and_then(|n| n.data) else {
            continue;
        };
        if blobs.get(d.layer as usize).is_none_or(|b| b.is_local()) {
            continue;
        }
        let Some(e) = tree.data_entry(d) else {
            continue;
        };
        let mut chunks: Vec<Chunk> = Vec::new();
        let mut take = |c: &Chunk| {
            visits += 1;
            if seen.insert(c.digest) {
                chunks.push(*c);
            }
        };
        // Too many ranges parse as one that covers the file: that is the whole file too.
        let ranges = ranges.filter(|r| r.as_slice() != [(0, u64::MAX)]);
        match ranges {
            None => {
                whole.insert(ino);
                e.chunks.iter().for_each(&mut take);
            }
            // Sorted and disjoint (as parsed): each range walks only the chunks it overlaps.
            Some(ranges) => {
                for &(off, len) in ranges {
                    let end = off.saturating_add(len);
                    let first = e.chunks.partition_point(|c| c.file_end() <= off);
                    e.chunks[first..]
                        .iter()
                        .take_while(|c| c.file_offset < end)
                        .for_each(&mut take);
                }
            }
        }
        match out.last_mut() {
            Some((layer, v)) if *layer == d.layer as usize => v.extend(chunks),
            _ => out.push((d.layer as usize, chunks)),
        }
        if visits > MAX_PROFILE_VISITS {
            tracing::warn!("the access profile names too many chunks; the rest of it is ignored");
            break;
        }
    }
    out.retain(|(_, v)| !v.is_empty());
    out
}

/// Chunks a profile may make [`profile_chunks`] look at (4 TiB of 1 MiB chunks).
const MAX_PROFILE_VISITS: usize = 1 << 22;

/// Fetches what the access profile names, at once (into memory, in small parallel range reads,
/// in the profile's order); then, with `rest`, every chunk of the remote layers into the disk
/// cache, the profile's first (written from memory), then the others in blob order and in
/// coalesced batches, pausing while readers are waiting on fetches.
pub(super) fn start_background_prefetch(
    shared: std::sync::Weak<Shared>,
    profile: Vec<crate::profile::Line>,
    rest: bool,
) {
    let _ = std::thread::Builder::new()
        .name("strata-prefetch".into())
        .spawn(move || {
            let (profiled, jobs): (Vec<LayerChunks>, Option<Vec<LayerChunks>>) = {
                let Some(s) = shared.upgrade() else { return };
                let profiled = profile_chunks(&s.tree, &s.blobs, &profile);
                drop(profile);
                let named: usize = profiled.iter().map(|(_, v)| v.len()).sum();
                s.profile_chunks.store(named as u64, Ordering::Relaxed);
                if !rest || s.cache.disk().is_none() {
                    // Without a disk cache only the profile is worth fetching (into memory).
                    (profiled, None)
                } else {
                    // The profile's chunks first: their fetch kept them in memory only, this
                    // pass writes them to the disk cache (or fetches them, if evicted).
                    let mut seen: std::collections::HashSet<_> = profiled
                        .iter()
                        .flat_map(|(_, v)| v.iter().map(|c| c.digest))
                        .collect();
                    let mut jobs = profiled.clone();
                    let rest = s
                        .tree
                        .layers
                        .iter()
                        .enumerate()
                        .filter(|(i, _)| s.blobs.get(*i).is_some_and(|b| !b.is_local()))
                        .map(|(i, toc)| {
                            let mut chunks: Vec<Chunk> = toc
                                .entries
                                .iter()
                                .flat_map(|e| e.chunks.iter().copied())
                                .filter(|c| seen.insert(c.digest))
                                .collect();
                            chunks.sort_by_key(|c| c.compressed_offset);
                            (i, chunks)
                        });
                    jobs.extend(rest);
                    (profiled, Some(jobs))
                }
            };
            if !profiled.is_empty() {
                let started = std::time::Instant::now();
                let mut n = 0usize;
                for (layer, chunks) in &profiled {
                    // In the profile's order, a batch at a time, so a reader that catches up
                    // waits on a small batch; each batch's chunks are fetched in parallel. The
                    // mount is held a batch at a time: an unmount ends this.
                    for batch in chunks.chunks(PROFILE_BATCH_CHUNKS) {
                        let Some(s) = shared.upgrade() else { return };
                        let Some(b) = s.blobs.get(*layer) else {
                            break;
                        };
                        s.cache
                            .prefetch_scattered(b.as_ref(), batch, PROFILE_PARALLEL);
                        n += batch.len();
                    }
                }
                tracing::info!(
                    chunks = n,
                    "profile prefetch done in {:.3}s",
                    started.elapsed().as_secs_f64()
                );
            }
            let Some(jobs) = jobs else { return };
            let started = std::time::Instant::now();
            let mut fetched = 0usize;
            for (layer, chunks) in jobs {
                let mut batch: Vec<Chunk> = Vec::new();
                let mut batch_bytes = 0u64;
                for c in chunks.into_iter().chain(std::iter::once(SENTINEL)) {
                    let flush = c.compressed_len == 0
                        || batch_bytes + u64::from(c.compressed_len) > PREFETCH_BATCH;
                    if flush && !batch.is_empty() {
                        // Yield to readers; hold nothing of the mount while waiting.
                        while shared.upgrade().is_some_and(|s| s.cache.busy()) {
                            std::thread::sleep(Duration::from_millis(10));
                        }
                        let Some(s) = shared.upgrade() else { return };
                        let missing: Vec<Chunk> = batch
                            .iter()
                            .filter(|c| s.cache.disk().is_some_and(|d| !d.contains(&c.digest)))
                            .copied()
                            .collect();
                        if let Some(b) = s.blobs.get(layer) {
                            // Chunks in memory (the profile's, readers') go to disk from there.
                            s.cache.spill_to_disk(b.as_ref(), &missing);
                            let missing: Vec<Chunk> = missing
                                .into_iter()
                                .filter(|c| s.cache.disk().is_some_and(|d| !d.contains(&c.digest)))
                                .collect();
                            fetched += missing.len();
                            s.cache.prefetch_to_disk(b.as_ref(), &missing);
                        }
                        batch.clear();
                        batch_bytes = 0;
                    }
                    if c.compressed_len > 0 {
                        batch_bytes += u64::from(c.compressed_len);
                        batch.push(c);
                    }
                }
            }
            if let Some(s) = shared.upgrade() {
                s.prefetched.store(true, Ordering::Relaxed);
            }
            tracing::info!(
                chunks = fetched,
                "background prefetch done in {:.1}s",
                started.elapsed().as_secs_f64()
            );
        });
}

/// Chunks of a profile fetched per step (in its order), and range reads in flight at once.
const PROFILE_BATCH_CHUNKS: usize = 16;
const PROFILE_PARALLEL: usize = 4;

/// Compressed bytes per background prefetch request: small enough that a reader's fetch never
/// waits long behind one on a slow link (100 Mbit/s: ~80 ms), large enough to amortise the
/// round trip.
const PREFETCH_BATCH: u64 = 1 << 20;

/// Marks the end of a layer's chunk list in the prefetch loop.
const SENTINEL: Chunk = Chunk {
    compressed_offset: 0,
    compressed_len: 0,
    uncompressed_len: 0,
    file_offset: 0,
    digest: crate::format::Sha256Digest([0; 32]),
    data_offset: 0,
    data_len: 0,
};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fuse::tests::chunk;

    struct Remote;
    impl BlobSource for Remote {
        fn size(&self) -> u64 {
            u64::MAX
        }
        fn read_range(&self, _: u64, _: u64) -> std::io::Result<Vec<u8>> {
            Err(std::io::Error::other("not in this test"))
        }
    }

    #[test]
    fn a_profile_names_the_chunks_its_ranges_touch() {
        use crate::format::{Entry, EntryKind, Toc};
        let file = |path: &str, first: u64, n: u64| {
            let mut e = Entry::new(path.as_bytes().to_vec(), EntryKind::Regular);
            e.chunks = (first..first + n)
                .map(|i| {
                    let mut c = chunk(i, 16_000);
                    c.file_offset = (i - first) * (32 << 10);
                    c
                })
                .collect();
            e.size = n * (32 << 10);
            e
        };
        let toc = Toc {
            chunk_size: 32 << 10,
            entries: vec![
                Entry::new(b"bin".to_vec(), EntryKind::Directory),
                file("bin/app", 0, 8),
                file("bin/app\t0+1", 100, 2),
                file("lib", 200, 3),
            ],
        };
        let tree = Tree::build(vec![toc]).unwrap();
        let blobs: Vec<Arc<dyn BlobSource>> = vec![Arc::new(Remote)];
        let names = |text: &[u8]| -> Vec<u64> {
            let lines = crate::profile::parse(text);
            profile_chunks(&tree, &blobs, &lines)
                .into_iter()
                .flat_map(|(_, cs)| {
                    cs.into_iter()
                        .map(|c| (c.compressed_offset - 1000) / 16_000)
                })
                .collect()
        };
        // Ranges: the chunks they overlap (a range ending on a boundary stops there), in the
        // profile's order, each chunk once.
        assert_eq!(
            names(b"bin/app\t40000+10,131072+32768\nlib\nbin/app\t0+1\n"),
            vec![1, 4, 200, 201, 202, 100, 101]
        );
        // A line that names a file as it stands is that whole file.
        assert_eq!(names(b"bin/app\t0+1\n"), vec![100, 101]);
        // Paths that are not there, and a path with ranges that are not ranges, are skipped.
        assert!(names(b"nope\nbin/nope\t0+1\nbin\n").is_empty());
        // A local layer's files are not fetched.
        let local: Vec<Arc<dyn BlobSource>> = vec![Arc::new(
            crate::blob::LocalBlob::open(std::path::Path::new("/dev/null")).unwrap(),
        )];
        assert!(profile_chunks(&tree, &local, &crate::profile::parse(b"lib\n")).is_empty());
    }
}
