//! Fetching, verifying and caching decompressed chunks.
//!
//! A chunk comes from the memory LRU, then the node's disk cache, then its layer's
//! [`BlobSource`]. Missing chunks that sit next to each other in the blob are fetched with one
//! range read (up to [`MAX_RUN`] bytes), and every chunk is decompressed and checked against its
//! sha256 before anyone sees it or it is cached. Verified chunks are keyed by digest, so equal
//! chunks of different layers are shared, and concurrent readers of one chunk share one fetch.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use lru::LruCache;
use parking_lot::Mutex;

use crate::blob::BlobSource;
use crate::format::{self, Chunk, Sha256Digest};
use crate::packs::PackCache;

/// Largest compressed span fetched in one range read.
pub const MAX_RUN: u64 = 4 << 20;
/// Largest gap (tar headers of other entries) bridged to join two chunks into one read.
pub const MAX_GAP: u64 = 64 << 10;

/// Why a chunk could not be served.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{0}")]
pub struct ChunkError(pub String);

type Data = Arc<Vec<u8>>;
type Slot = Arc<OnceLock<Result<Data, ChunkError>>>;

struct Lru {
    map: LruCache<Sha256Digest, Data>,
    bytes: usize,
}

/// Where served chunks came from, since the cache was created.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct FetchStats {
    pub memory_hits: u64,
    pub disk_hits: u64,
    /// Chunks read from layer blobs.
    pub source_chunks: u64,
    /// Range reads of layer blobs (each may carry several chunks).
    pub source_reads: u64,
    /// Bytes read from layer blobs.
    pub source_bytes: u64,
    /// Total time spent in range reads of layer blobs, in microseconds.
    pub source_micros: u64,
    pub failures: u64,
}

/// The node-wide part of the chunk cache: one memory LRU, one table of fetches in flight and one
/// disk cache, shared by every mount a process serves (equal chunks of any image are decoded
/// once, and the memory cap holds for the node, not per mount).
pub struct ChunkPool {
    lru: Mutex<Lru>,
    capacity: usize,
    inflight: Mutex<HashMap<Sha256Digest, Slot>>,
    disk: Option<Arc<PackCache>>,
    /// Fetches for readers in progress on any mount (background work yields to them).
    active: AtomicUsize,
    /// When the last reader's fetch ended: background work waits for a quiet moment, so a
    /// reader's next fetch does not queue behind a prefetch range on the link.
    last_demand: Mutex<std::time::Instant>,
}

/// How long after a reader's fetch background prefetch stays paused: a container's start reads
/// in bursts with short gaps, and a prefetch request sent into a gap delays the next burst.
pub const DEMAND_QUIET: std::time::Duration = std::time::Duration::from_millis(500);

impl std::fmt::Debug for ChunkPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkPool")
            .field("capacity", &self.capacity)
            .field("disk", &self.disk)
            .finish_non_exhaustive()
    }
}

impl ChunkPool {
    pub fn new(capacity_bytes: usize, disk: Option<Arc<PackCache>>) -> Arc<Self> {
        Arc::new(ChunkPool {
            lru: Mutex::new(Lru {
                map: LruCache::unbounded(),
                bytes: 0,
            }),
            capacity: capacity_bytes,
            inflight: Mutex::new(HashMap::new()),
            disk,
            active: AtomicUsize::new(0),
            last_demand: Mutex::new(std::time::Instant::now() - DEMAND_QUIET),
        })
    }

    pub fn disk(&self) -> Option<&Arc<PackCache>> {
        self.disk.as_ref()
    }

    /// Bytes of decoded chunks held in memory.
    pub fn memory_bytes(&self) -> usize {
        self.lru.lock().bytes
    }

    /// Counts as a reader's fetch now (a new mount: its first reads are about to come).
    pub fn note_demand(&self) {
        *self.last_demand.lock() = std::time::Instant::now();
    }

    /// Whether readers of any mount are waiting on fetches right now, or were a moment ago.
    pub fn busy(&self) -> bool {
        self.active.load(Ordering::Relaxed) > 0 || self.last_demand.lock().elapsed() < DEMAND_QUIET
    }
}

/// One mount's view of the [`ChunkPool`]: its own counters and its own disk-cache policy.
pub struct ChunkCache {
    pool: Arc<ChunkPool>,
    /// Use the disk cache for local blobs too (saves decoding on re-reads, costs disk space).
    cache_local: bool,
    stats: Mutex<FetchStats>,
    /// When the first range read of a layer blob came back (time to first byte).
    first_source: std::sync::OnceLock<std::time::Instant>,
}

enum Step {
    Ready(Data),
    Wait(Slot),
    Lead(Slot),
}

impl ChunkCache {
    /// A cache of its own (one mount, no sharing).
    pub fn new(capacity_bytes: usize, disk: Option<Arc<PackCache>>, cache_local: bool) -> Self {
        Self::with_pool(ChunkPool::new(capacity_bytes, disk), cache_local)
    }

    /// A view of a shared pool.
    pub fn with_pool(pool: Arc<ChunkPool>, cache_local: bool) -> Self {
        ChunkCache {
            pool,
            cache_local,
            stats: Mutex::new(FetchStats::default()),
            first_source: std::sync::OnceLock::new(),
        }
    }

    pub fn pool(&self) -> &Arc<ChunkPool> {
        &self.pool
    }

    pub fn stats(&self) -> FetchStats {
        *self.stats.lock()
    }

    /// When the first range read of a layer blob completed, if one has.
    pub fn first_source_read(&self) -> Option<std::time::Instant> {
        self.first_source.get().copied()
    }

    /// Whether readers are waiting on fetches right now.
    pub fn busy(&self) -> bool {
        self.pool.busy()
    }

    pub fn disk(&self) -> Option<&Arc<PackCache>> {
        self.pool.disk.as_ref()
    }

    pub fn contains(&self, digest: &Sha256Digest) -> bool {
        self.pool.lru.lock().map.contains(digest)
    }

    /// Whether the chunk is in memory, on disk (where this blob would be cached), or being
    /// fetched: fetching it again would be waste.
    pub fn has(&self, src: &dyn BlobSource, digest: &Sha256Digest) -> bool {
        self.contains(digest)
            || self.pool.inflight.lock().contains_key(digest)
            || self.disk_for(src).is_some_and(|d| d.contains(digest))
    }

    fn insert(&self, digest: Sha256Digest, data: Data) {
        let capacity = self.pool.capacity;
        let mut lru = self.pool.lru.lock();
        if lru.map.contains(&digest) {
            return;
        }
        lru.bytes += data.len();
        lru.map.put(digest, data);
        while lru.bytes > capacity && lru.map.len() > 1 {
            match lru.map.pop_lru() {
                Some((_, old)) => lru.bytes -= old.len(),
                None => break,
            }
        }
    }

    fn disk_for(&self, src: &dyn BlobSource) -> Option<&Arc<PackCache>> {
        self.pool
            .disk
            .as_ref()
            .filter(|_| self.cache_local || !src.is_local())
    }

    /// Warms the memory cache (and the disk cache, where it applies) with those of `chunks`
    /// that are neither cached nor being fetched (a prefetcher never sits waiting on someone
    /// else's fetch). For a reader's readahead: what it decodes must stay for the reader.
    pub fn prefetch(&self, src: &dyn BlobSource, chunks: &[Chunk]) {
        let wanted: Vec<Chunk> = {
            let inflight = self.pool.inflight.lock();
            chunks
                .iter()
                .filter(|c| !inflight.contains_key(&c.digest))
                .copied()
                .collect()
        };
        let wanted: Vec<Chunk> = wanted
            .into_iter()
            .filter(|c| !self.contains(&c.digest))
            .collect();
        if !wanted.is_empty() {
            let _ = self.fetch_many(src, &wanted, true);
        }
    }

    /// Writes those of `chunks` held in memory to the disk cache (where the blob's chunks are
    /// cached) unless it has them; answers how many it wrote.
    pub fn spill_to_disk(&self, src: &dyn BlobSource, chunks: &[Chunk]) -> usize {
        let Some(disk) = self.disk_for(src) else {
            return 0;
        };
        let mut wrote = 0;
        for c in chunks {
            if disk.contains(&c.digest) {
                continue;
            }
            let Some(data) = self.pool.lru.lock().map.peek(&c.digest).cloned() else {
                continue;
            };
            match disk.put(&c.digest, &data) {
                Ok(()) => wrote += 1,
                Err(e) => tracing::warn!(chunk = %c.digest, "cannot write to the disk cache: {e}"),
            }
        }
        wrote
    }

    /// Those of `chunks` neither in memory nor being fetched.
    fn neither_held_nor_coming(&self, chunks: &[Chunk]) -> Vec<Chunk> {
        let inflight = self.pool.inflight.lock();
        chunks
            .iter()
            .filter(|c| !inflight.contains_key(&c.digest) && !self.contains(&c.digest))
            .copied()
            .collect()
    }

    /// Fetches chunks into the disk cache only (background prefetch: the memory cache is kept
    /// for what readers use).
    pub fn prefetch_to_disk(&self, src: &dyn BlobSource, chunks: &[Chunk]) {
        let wanted = self.neither_held_nor_coming(chunks);
        if !wanted.is_empty() && self.disk_for(src).is_some() {
            let _ = self.fetch_many(src, &wanted, false);
        }
    }

    /// Warms the memory cache with those of `chunks` not cached or being fetched, reading only
    /// the chunks themselves (no gap between two is bridged, so scattered chunks cost no bytes
    /// in between) with up to `parallel` range reads in flight. For an access profile's chunks,
    /// a few pages here and there of each file, fetched while a container is being set up: they
    /// are not written to the disk cache now (dirty pages there would slow every fsync on the
    /// filesystem, containerd's and the snapshotter's among them); [`Self::spill_to_disk`]
    /// writes them later.
    pub fn prefetch_scattered(&self, src: &dyn BlobSource, chunks: &[Chunk], parallel: usize) {
        let wanted = self.neither_held_nor_coming(chunks);
        if !wanted.is_empty() {
            let shape = Shape {
                max_gap: 0,
                parallel,
                write_disk: false,
            };
            let _ = self.fetch_shaped(src, &wanted, true, shape);
        }
    }

    /// Returns the verified bytes of `chunk`.
    pub fn get(&self, src: &dyn BlobSource, chunk: &Chunk) -> Result<Data, ChunkError> {
        self.get_many(src, std::slice::from_ref(chunk))
            .pop()
            .unwrap_or_else(|| Err(ChunkError("no result".into())))
    }

    /// Returns the verified bytes of each of `chunks` (in order), fetching missing neighbours
    /// with shared range reads.
    pub fn get_many(
        &self,
        src: &dyn BlobSource,
        chunks: &[Chunk],
    ) -> Vec<Result<Data, ChunkError>> {
        self.pool.active.fetch_add(1, Ordering::Relaxed);
        let before = self.stats();
        let out = self.fetch_many(src, chunks, true);
        let after = self.stats();
        // Only a reader that had to wait for the disk or a blob pauses background work.
        if after.disk_hits != before.disk_hits || after.source_reads != before.source_reads {
            *self.pool.last_demand.lock() = std::time::Instant::now();
        }
        self.pool.active.fetch_sub(1, Ordering::Relaxed);
        out
    }

    fn fetch_many(
        &self,
        src: &dyn BlobSource,
        chunks: &[Chunk],
        memory: bool,
    ) -> Vec<Result<Data, ChunkError>> {
        let shape = Shape {
            max_gap: MAX_GAP,
            parallel: 1,
            write_disk: true,
        };
        self.fetch_shaped(src, chunks, memory, shape)
    }

    fn fetch_shaped(
        &self,
        src: &dyn BlobSource,
        chunks: &[Chunk],
        memory: bool,
        shape: Shape,
    ) -> Vec<Result<Data, ChunkError>> {
        let mut steps = Vec::with_capacity(chunks.len());
        for c in chunks {
            if let Some(d) = self.pool.lru.lock().map.get(&c.digest) {
                self.stats.lock().memory_hits += 1;
                steps.push(Step::Ready(d.clone()));
                continue;
            }
            let mut inflight = self.pool.inflight.lock();
            match inflight.get(&c.digest) {
                Some(slot) => steps.push(Step::Wait(slot.clone())),
                None => {
                    let slot: Slot = Arc::new(OnceLock::new());
                    inflight.insert(c.digest, slot.clone());
                    steps.push(Step::Lead(slot));
                }
            }
        }
        // Whatever happens below (even a panic), the slots this call leads get a result and
        // leave the in-flight map, so no reader waits forever.
        let guard = LeadGuard {
            cache: self,
            led: chunks
                .iter()
                .zip(&steps)
                .filter_map(|(c, s)| match s {
                    Step::Lead(slot) => Some((c.digest, slot.clone())),
                    _ => None,
                })
                .collect(),
        };
        // Fetch what this call leads: disk cache first, then coalesced reads of the blob.
        let mut to_fetch: Vec<(Chunk, Slot)> = Vec::new();
        let disk = self.disk_for(src);
        let write_to = disk.filter(|_| shape.write_disk);
        for (c, step) in chunks.iter().zip(&steps) {
            if let Step::Lead(slot) = step {
                if let Some(data) = disk.and_then(|d| d.get(&c.digest, c.uncompressed_len as usize))
                {
                    self.stats.lock().disk_hits += 1;
                    let data = Arc::new(data);
                    if memory {
                        self.insert(c.digest, data.clone());
                    }
                    let _ = slot.set(Ok(data));
                } else if !to_fetch.iter().any(|(f, _)| f.digest == c.digest) {
                    to_fetch.push((*c, slot.clone()));
                }
            }
        }
        to_fetch.sort_by_key(|(c, _)| c.compressed_offset);
        let runs = runs(&to_fetch, shape.max_gap);
        if shape.parallel <= 1 || runs.len() <= 1 {
            for run in runs {
                self.fetch_run(src, run, write_to, memory);
            }
        } else {
            // Workers take the runs in order.
            let next = AtomicUsize::new(0);
            std::thread::scope(|scope| {
                for _ in 0..shape.parallel.min(runs.len()) {
                    scope.spawn(|| {
                        while let Some(run) = runs.get(next.fetch_add(1, Ordering::Relaxed)) {
                            self.fetch_run(src, run, write_to, memory);
                        }
                    });
                }
            });
        }
        drop(guard);
        steps
            .into_iter()
            .map(|s| match s {
                Step::Ready(d) => Ok(d),
                Step::Wait(slot) | Step::Lead(slot) => slot.wait().clone(),
            })
            .collect()
    }

    fn fetch_run(
        &self,
        src: &dyn BlobSource,
        run: &[(Chunk, Slot)],
        disk: Option<&Arc<PackCache>>,
        memory: bool,
    ) {
        let (Some((first, _)), Some((last, _))) = (run.first(), run.last()) else {
            return;
        };
        let start = first.compressed_offset;
        let end = last.compressed_offset + u64::from(last.compressed_len);
        let began = std::time::Instant::now();
        let bytes = match src.read_range(start, end - start) {
            Ok(b) => {
                let _ = self.first_source.set(std::time::Instant::now());
                let mut s = self.stats.lock();
                s.source_reads += 1;
                s.source_bytes += end - start;
                s.source_micros += began.elapsed().as_micros() as u64;
                b
            }
            Err(e) => {
                self.stats.lock().failures += run.len() as u64;
                let err = ChunkError(format!("reading blob range {start}+{}: {e}", end - start));
                for (_, slot) in run {
                    let _ = slot.set(Err(err.clone()));
                }
                return;
            }
        };
        for (c, slot) in run {
            let at = (c.compressed_offset - start) as usize;
            let frame = &bytes[at..at + c.compressed_len as usize];
            let result = format::decode_chunk(frame, c).map_err(|e| ChunkError(e.to_string()));
            let result = result.map(|data| {
                if let Some(d) = disk {
                    if let Err(e) = d.put(&c.digest, &data) {
                        tracing::warn!(chunk = %c.digest, "cannot write to the disk cache: {e}");
                    }
                }
                let data = Arc::new(data);
                if memory {
                    self.insert(c.digest, data.clone());
                }
                data
            });
            let mut s = self.stats.lock();
            match &result {
                Ok(_) => s.source_chunks += 1,
                Err(_) => s.failures += 1,
            }
            drop(s);
            let _ = slot.set(result);
        }
    }
}

/// Settles the slots a fetch leads when it ends: unset ones get an error, all leave the map.
struct LeadGuard<'a> {
    cache: &'a ChunkCache,
    led: Vec<(Sha256Digest, Slot)>,
}

impl Drop for LeadGuard<'_> {
    fn drop(&mut self) {
        let mut inflight = self.cache.pool.inflight.lock();
        for (digest, slot) in &self.led {
            let _ = slot.set(Err(ChunkError("fetch abandoned".into())));
            if inflight.get(digest).is_some_and(|s| Arc::ptr_eq(s, slot)) {
                inflight.remove(digest);
            }
        }
    }
}

/// How a fetch groups its chunks into range reads, and where fetched chunks go.
#[derive(Clone, Copy)]
struct Shape {
    /// Largest gap between two chunks that one range read bridges.
    max_gap: u64,
    /// Range reads in flight at once.
    parallel: usize,
    /// Write fetched chunks to the disk cache (where the blob's chunks are cached at all).
    write_disk: bool,
}

/// Splits chunks sorted by offset into runs that one range read can fetch (bridging gaps of up
/// to `max_gap` bytes).
fn runs<T>(sorted: &[(Chunk, T)], max_gap: u64) -> Vec<&[(Chunk, T)]> {
    let mut out = Vec::new();
    let mut begin = 0;
    for i in 1..=sorted.len() {
        let split = i == sorted.len() || {
            let prev = &sorted[i - 1].0;
            let cur = &sorted[i].0;
            let prev_end = prev.compressed_offset + u64::from(prev.compressed_len);
            let run_start = sorted[begin].0.compressed_offset;
            cur.compressed_offset < prev_end
                || cur.compressed_offset - prev_end > max_gap
                || cur.compressed_offset + u64::from(cur.compressed_len) - run_start > MAX_RUN
        };
        if split {
            out.push(&sorted[begin..i]);
            begin = i;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(off: u64, len: u32) -> (Chunk, ()) {
        (
            Chunk::whole(off, len, len, 0, Sha256Digest::of(&off.to_le_bytes())),
            (),
        )
    }

    #[test]
    fn runs_join_neighbours_within_bounds() {
        let v = vec![
            c(0, 100),
            c(150, 100),
            c(1 << 20, 100),
            c((1 << 20) + 100, 100),
        ];
        let r = runs(&v, MAX_GAP);
        assert_eq!(r.iter().map(|r| r.len()).collect::<Vec<_>>(), vec![2, 2]);
        let big: Vec<_> = (0..10).map(|i| c(i * (1 << 20), 1 << 20)).collect();
        assert!(runs(&big, MAX_GAP).iter().all(|r| r.len() <= 4));
        // Without bridging, only touching chunks share a read.
        let r = runs(&v, 0);
        assert_eq!(r.iter().map(|r| r.len()).collect::<Vec<_>>(), vec![1, 1, 2]);
    }
}
