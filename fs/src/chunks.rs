//! Fetching, verifying and caching decompressed chunks in memory.
//!
//! A chunk is read from its layer's [`BlobSource`], decompressed and checked against its sha256
//! before anyone sees it. Verified chunks live in a byte-capped LRU keyed by digest (so equal
//! chunks of different layers are shared), and concurrent readers of one chunk share one fetch.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use lru::LruCache;
use parking_lot::Mutex;

use crate::blob::BlobSource;
use crate::cache::DiskCache;
use crate::format::{self, Chunk, Sha256Digest};

/// Why a chunk could not be served.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{0}")]
pub struct ChunkError(pub String);

type Slot = Arc<OnceLock<Result<Arc<Vec<u8>>, ChunkError>>>;

struct Lru {
    map: LruCache<Sha256Digest, Arc<Vec<u8>>>,
    bytes: usize,
}

/// Where served chunks came from, since the cache was created.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct FetchStats {
    pub memory_hits: u64,
    pub disk_hits: u64,
    pub source_reads: u64,
    /// Compressed bytes read from layer blobs.
    pub source_bytes: u64,
    pub failures: u64,
}

/// Memory cache of verified, decompressed chunks, in front of an optional disk cache.
pub struct ChunkCache {
    lru: Mutex<Lru>,
    capacity: usize,
    inflight: Mutex<HashMap<Sha256Digest, Slot>>,
    disk: Option<Arc<DiskCache>>,
    /// Use the disk cache for local blobs too (saves decoding on re-reads, costs disk space).
    cache_local: bool,
    stats: Mutex<FetchStats>,
}

impl ChunkCache {
    pub fn new(capacity_bytes: usize, disk: Option<Arc<DiskCache>>, cache_local: bool) -> Self {
        ChunkCache {
            lru: Mutex::new(Lru {
                map: LruCache::unbounded(),
                bytes: 0,
            }),
            capacity: capacity_bytes,
            inflight: Mutex::new(HashMap::new()),
            disk,
            cache_local,
            stats: Mutex::new(FetchStats::default()),
        }
    }

    pub fn stats(&self) -> FetchStats {
        *self.stats.lock()
    }

    pub fn contains(&self, digest: &Sha256Digest) -> bool {
        self.lru.lock().map.contains(digest)
    }

    fn insert(&self, digest: Sha256Digest, data: Arc<Vec<u8>>) {
        let mut lru = self.lru.lock();
        if lru.map.contains(&digest) {
            return;
        }
        lru.bytes += data.len();
        lru.map.put(digest, data);
        while lru.bytes > self.capacity && lru.map.len() > 1 {
            match lru.map.pop_lru() {
                Some((_, old)) => lru.bytes -= old.len(),
                None => break,
            }
        }
    }

    /// Warms the cache with `chunk` unless it is cached or already being fetched (a prefetcher
    /// must never sit waiting on someone else's fetch).
    pub fn prefetch(&self, src: &dyn BlobSource, chunk: &Chunk) {
        if self.contains(&chunk.digest) || self.inflight.lock().contains_key(&chunk.digest) {
            return;
        }
        let _ = self.get(src, chunk);
    }

    /// Returns the verified bytes of `chunk`, fetching them from `src` if needed.
    pub fn get(&self, src: &dyn BlobSource, chunk: &Chunk) -> Result<Arc<Vec<u8>>, ChunkError> {
        if let Some(d) = self.lru.lock().map.get(&chunk.digest) {
            self.stats.lock().memory_hits += 1;
            return Ok(d.clone());
        }
        let slot = self
            .inflight
            .lock()
            .entry(chunk.digest)
            .or_insert_with(|| Arc::new(OnceLock::new()))
            .clone();
        let result = slot
            .get_or_init(|| {
                let data = self.load(src, chunk)?;
                self.insert(chunk.digest, data.clone());
                Ok(data)
            })
            .clone();
        let mut inflight = self.inflight.lock();
        if inflight
            .get(&chunk.digest)
            .is_some_and(|s| Arc::ptr_eq(s, &slot))
        {
            inflight.remove(&chunk.digest);
        }
        result
    }
}

impl ChunkCache {
    /// Disk cache first, then the layer blob (verified, then written to the disk cache).
    fn load(&self, src: &dyn BlobSource, chunk: &Chunk) -> Result<Arc<Vec<u8>>, ChunkError> {
        let disk = self
            .disk
            .as_ref()
            .filter(|_| self.cache_local || !src.is_local());
        if let Some(disk) = disk {
            if let Some(data) = disk.get(&chunk.digest, chunk.uncompressed_len as usize) {
                self.stats.lock().disk_hits += 1;
                return Ok(Arc::new(data));
            }
        }
        let result = fetch(src, chunk);
        let mut stats = self.stats.lock();
        match &result {
            Ok(_) => {
                stats.source_reads += 1;
                stats.source_bytes += u64::from(chunk.compressed_len);
            }
            Err(_) => stats.failures += 1,
        }
        drop(stats);
        let data = result?;
        if let Some(disk) = disk {
            if let Err(e) = disk.put(&chunk.digest, &data) {
                tracing::warn!(chunk = %chunk.digest, "cannot write to the disk cache: {e}");
            }
        }
        Ok(data)
    }
}

fn fetch(src: &dyn BlobSource, chunk: &Chunk) -> Result<Arc<Vec<u8>>, ChunkError> {
    let compressed = src
        .read_range(chunk.compressed_offset, u64::from(chunk.compressed_len))
        .map_err(|e| {
            ChunkError(format!(
                "reading chunk at {}+{}: {e}",
                chunk.compressed_offset, chunk.compressed_len
            ))
        })?;
    let data = format::decode_chunk(&compressed, chunk).map_err(|e| ChunkError(e.to_string()))?;
    Ok(Arc::new(data))
}
