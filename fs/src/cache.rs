//! The node's disk cache of verified, decompressed chunks.
//!
//! Chunks are files named by their sha256 (`DIR/ab/abcdef…`), so a chunk already present from any
//! layer of any image is never fetched or decoded again, and the cache survives daemon restarts.
//! The cache is capped in bytes with least-recently-used eviction that skips chunks in use.
//!
//! Chunk files are written without fsync (temp file, then rename) and are verified again against
//! their digest when read: a file torn by a crash or damaged on disk is dropped and refetched,
//! never served. The same structure keeps whole files for FUSE passthrough
//! ([`crate::passthrough`]), keyed by their chunk table: those are fsync'd before the rename and
//! checked only for length when opened (the kernel reads them directly).

use std::collections::HashMap;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use lru::LruCache;
use parking_lot::Mutex;

use crate::format::Sha256Digest;

/// Counters of a cache's activity since it was opened.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct CacheStats {
    pub entries: u64,
    pub bytes: u64,
    pub capacity: u64,
    pub hits: u64,
    pub misses: u64,
    pub inserted: u64,
    pub evicted: u64,
    pub corrupt: u64,
    /// Writes skipped because the disk was full.
    pub skipped_full: u64,
}

struct Index {
    lru: LruCache<Sha256Digest, u64>,
    bytes: u64,
    /// Chunks being read or written right now; eviction skips them.
    pinned: HashMap<Sha256Digest, usize>,
}

/// An entry being written ([`DiskCache::begin`]); its temporary file is removed if it is dropped
/// without [`DiskCache::commit`].
pub struct PendingEntry {
    pub file: fs::File,
    tmp: Option<PathBuf>,
    key: Sha256Digest,
}

impl Drop for PendingEntry {
    fn drop(&mut self) {
        if let Some(tmp) = self.tmp.take() {
            let _ = fs::remove_file(tmp);
        }
    }
}

/// A size-capped, content-addressed cache of chunks on local disk.
pub struct DiskCache {
    dir: PathBuf,
    capacity: u64,
    index: Mutex<Index>,
    hits: AtomicU64,
    misses: AtomicU64,
    inserted: AtomicU64,
    evicted: AtomicU64,
    corrupt: AtomicU64,
    /// Set while the disk under the cache is full: writes are skipped until then.
    full_until: Mutex<Option<std::time::Instant>>,
    /// Writes skipped because the disk was full.
    skipped: AtomicU64,
}

/// How long writes pause after the disk under the cache was found full.
const FULL_BACKOFF: std::time::Duration = std::time::Duration::from_secs(1);

fn is_disk_full(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

impl std::fmt::Debug for DiskCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskCache")
            .field("dir", &self.dir)
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

fn hex_name(d: &Sha256Digest) -> String {
    d.hex()
}

impl DiskCache {
    /// Opens the cache in `dir` (creating it), indexing the chunks already there, oldest first.
    pub fn open(dir: impl Into<PathBuf>, capacity: u64) -> io::Result<Self> {
        let dir = dir.into();
        crate::store::create_private_dir(&dir.join("tmp")).map_err(io::Error::other)?;
        // Leftovers of interrupted writes: temp files of processes that no longer run (other
        // live daemons may be writing theirs right now).
        for e in fs::read_dir(dir.join("tmp"))?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let pid = name.split('-').nth(1).and_then(|p| p.parse::<u32>().ok());
            let alive = pid.is_some_and(|p| Path::new(&format!("/proc/{p}")).exists());
            if !alive {
                let _ = fs::remove_file(e.path());
            }
        }
        let mut found: Vec<(SystemTime, Sha256Digest, u64)> = Vec::new();
        for shard in fs::read_dir(&dir)?.flatten() {
            let name = shard.file_name();
            let name = name.to_string_lossy();
            if name.len() != 2 || !shard.path().is_dir() {
                continue;
            }
            for e in fs::read_dir(shard.path())?.flatten() {
                let Some(d) = Sha256Digest::parse(&e.file_name().to_string_lossy()) else {
                    continue;
                };
                if let Ok(md) = e.metadata() {
                    let t = md
                        .accessed()
                        .or_else(|_| md.modified())
                        .unwrap_or(SystemTime::UNIX_EPOCH);
                    found.push((t, d, md.len()));
                }
            }
        }
        found.sort();
        let mut index = Index {
            lru: LruCache::unbounded(),
            bytes: 0,
            pinned: HashMap::new(),
        };
        for (_, d, len) in found {
            index.bytes += len;
            index.lru.put(d, len);
        }
        let cache = DiskCache {
            dir,
            capacity,
            index: Mutex::new(index),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            inserted: AtomicU64::new(0),
            evicted: AtomicU64::new(0),
            corrupt: AtomicU64::new(0),
            full_until: Mutex::new(None),
            skipped: AtomicU64::new(0),
        };
        cache.evict_to(capacity);
        Ok(cache)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The size cap in bytes.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    fn path(&self, d: &Sha256Digest) -> PathBuf {
        let h = hex_name(d);
        self.dir.join(&h[..2]).join(h)
    }

    fn pin(&self, d: &Sha256Digest) {
        *self.index.lock().pinned.entry(*d).or_insert(0) += 1;
    }

    fn unpin(&self, d: &Sha256Digest) {
        let mut idx = self.index.lock();
        if let Some(n) = idx.pinned.get_mut(d) {
            *n -= 1;
            if *n == 0 {
                idx.pinned.remove(d);
            }
        }
    }

    /// Whether the chunk is cached (without reading it).
    pub fn contains(&self, d: &Sha256Digest) -> bool {
        self.index.lock().lru.contains(d)
    }

    /// Returns the chunk's bytes if cached and intact (`len` bytes hashing to `d`).
    pub fn get(&self, d: &Sha256Digest, len: usize) -> Option<Vec<u8>> {
        if !self.index.lock().lru.contains(d) {
            self.misses.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        self.pin(d);
        let path = self.path(d);
        let data = fs::read(&path).ok();
        let ok = data
            .as_ref()
            .is_some_and(|b| b.len() == len && &Sha256Digest::of(b) == d);
        let result = if ok {
            self.index.lock().lru.get(d);
            self.hits.fetch_add(1, Ordering::Relaxed);
            data
        } else {
            self.drop_entry(d, data.is_some());
            None
        };
        self.unpin(d);
        result
    }

    /// Stores a verified chunk (the caller has checked `data` hashes to `d`). A full disk is
    /// not an error: the chunk is served uncached, writes pause briefly and resume by themselves
    /// once space returns.
    pub fn put(&self, d: &Sha256Digest, data: &[u8]) -> io::Result<()> {
        if self.paused() {
            self.skipped.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        match self.insert_with(d, data.len() as u64, false, |f| f.write_all(data)) {
            Err(e) if is_disk_full(&e) => {
                self.note_full();
                Ok(())
            }
            Ok(()) => {
                self.note_space();
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Whether writes are paused because the disk was full a moment ago.
    fn paused(&self) -> bool {
        self.full_until
            .lock()
            .is_some_and(|t| std::time::Instant::now() < t)
    }

    fn note_full(&self) {
        self.skipped.fetch_add(1, Ordering::Relaxed);
        let mut g = self.full_until.lock();
        if g.is_none() {
            tracing::warn!(dir = %self.dir.display(),
                "the disk under the cache is full: serving without caching until space returns");
        }
        *g = Some(std::time::Instant::now() + FULL_BACKOFF);
    }

    fn note_space(&self) {
        let mut g = self.full_until.lock();
        if g.take().is_some() {
            tracing::info!(dir = %self.dir.display(), "space returned: caching resumed");
        }
    }

    /// Opens the entry `d` for reading without verifying its bytes, for entries whose key is
    /// not the digest of their bytes (whole files written by [`DiskCache::insert_with`] with
    /// `sync`, so a crash cannot leave them torn). An entry of the wrong length is damaged: it
    /// is dropped. Counts as a use for eviction.
    pub fn open_trusted(&self, d: &Sha256Digest, len: u64) -> Option<fs::File> {
        if self.index.lock().lru.get(d).is_none() {
            self.misses.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let path = self.path(d);
        let file = fs::File::open(&path).ok();
        if file
            .as_ref()
            .is_some_and(|f| f.metadata().is_ok_and(|m| m.len() == len))
        {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return file;
        }
        self.drop_entry(d, file.is_some());
        None
    }

    /// Forgets an entry that is missing or (`damaged`) fails its check, counting a miss.
    fn drop_entry(&self, d: &Sha256Digest, damaged: bool) {
        if damaged {
            tracing::warn!(entry = %d, "cache entry is damaged; dropping it");
            self.corrupt.fetch_add(1, Ordering::Relaxed);
        }
        let _ = fs::remove_file(self.path(d));
        let mut idx = self.index.lock();
        if let Some(n) = idx.lru.pop(d) {
            idx.bytes -= n;
        }
        drop(idx);
        self.misses.fetch_add(1, Ordering::Relaxed);
    }

    /// Stores `len` bytes under `d`, written by `fill` into a temporary file that is renamed
    /// into place only once complete (and, with `sync`, on stable storage first).
    pub fn insert_with(
        &self,
        d: &Sha256Digest,
        len: u64,
        sync: bool,
        fill: impl FnOnce(&mut fs::File) -> io::Result<()>,
    ) -> io::Result<()> {
        if self.capacity < len || self.contains(d) {
            return Ok(());
        }
        let mut entry = self.begin(d)?;
        fill(&mut entry.file)?;
        self.commit(entry, len, sync)
    }

    /// Starts a new entry `d`: a temporary file to fill, then [`DiskCache::commit`] (dropping
    /// the entry instead removes the file).
    pub fn begin(&self, d: &Sha256Digest) -> io::Result<PendingEntry> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let tmp = self
            .dir
            .join("tmp")
            .join(format!("{}-{}-{n}", hex_name(d), std::process::id()));
        Ok(PendingEntry {
            file: crate::store::private_new_file(&tmp)?,
            tmp: Some(tmp),
            key: *d,
        })
    }

    /// Sizes a pending entry to `len` bytes and renames it into place (with `sync`, after
    /// fsync, and fsyncs the directory after), then evicts down to the cap.
    pub fn commit(&self, mut entry: PendingEntry, len: u64, sync: bool) -> io::Result<()> {
        let d = entry.key;
        if self.capacity < len || self.contains(&d) {
            return Ok(()); // dropping the entry removes its file
        }
        let path = self.path(&d);
        self.pin(&d);
        let renamed = (|| {
            let tmp = entry
                .tmp
                .clone()
                .ok_or_else(|| io::Error::other("entry committed"))?;
            if let Some(parent) = path.parent() {
                crate::store::create_private_dir(parent).map_err(io::Error::other)?;
            }
            entry.file.set_len(len)?;
            if sync {
                entry.file.sync_all()?;
            }
            fs::rename(&tmp, &path)?;
            entry.tmp = None;
            Ok(())
        })();
        // Once renamed, the entry is there: index it even if a directory sync below fails.
        if renamed.is_ok() {
            let mut idx = self.index.lock();
            if idx.lru.put(d, len).is_none() {
                idx.bytes += len;
            }
            drop(idx);
            self.inserted.fetch_add(1, Ordering::Relaxed);
        }
        let res = renamed.and_then(|()| {
            if sync {
                // The shard directory, and the cache directory (the shard may be new).
                for dir in [path.parent(), Some(self.dir.as_path())]
                    .into_iter()
                    .flatten()
                {
                    fs::File::open(dir)?.sync_all()?;
                }
            }
            Ok(())
        });
        self.unpin(&d);
        self.evict_to(self.capacity);
        res
    }

    /// Evicts least-recently-used chunks not in use until at most `target` bytes remain.
    pub fn evict_to(&self, target: u64) {
        let mut victims = Vec::new();
        {
            let mut idx = self.index.lock();
            while idx.bytes > target {
                let candidate = idx
                    .lru
                    .iter()
                    .rev()
                    .map(|(d, _)| *d)
                    .find(|d| !idx.pinned.contains_key(d));
                let Some(d) = candidate else { break };
                if let Some(n) = idx.lru.pop(&d) {
                    idx.bytes -= n;
                    victims.push(d);
                }
            }
        }
        for d in victims {
            let _ = fs::remove_file(self.path(&d));
            self.evicted.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn stats(&self) -> CacheStats {
        let idx = self.index.lock();
        CacheStats {
            entries: idx.lru.len() as u64,
            bytes: idx.bytes,
            capacity: self.capacity,
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            inserted: self.inserted.load(Ordering::Relaxed),
            evicted: self.evicted.load(Ordering::Relaxed),
            corrupt: self.corrupt.load(Ordering::Relaxed),
            skipped_full: self.skipped.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(i: u8, len: usize) -> (Sha256Digest, Vec<u8>) {
        let data = vec![i; len];
        (Sha256Digest::of(&data), data)
    }

    #[test]
    fn put_get_evict_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DiskCache::open(dir.path(), 3000).unwrap();
        let (a, da) = chunk(1, 1000);
        let (b, db) = chunk(2, 1000);
        let (c, dc) = chunk(3, 1000);
        let (e, de) = chunk(4, 1000);
        cache.put(&a, &da).unwrap();
        cache.put(&b, &db).unwrap();
        cache.put(&c, &dc).unwrap();
        assert_eq!(cache.get(&a, 1000).as_deref(), Some(&da[..])); // a is now most recent
        cache.put(&e, &de).unwrap(); // evicts b, the least recently used
        assert!(!cache.contains(&b) && cache.contains(&a) && cache.contains(&e));
        assert_eq!(cache.stats().bytes, 3000);
        drop(cache);
        let reopened = DiskCache::open(dir.path(), 3000).unwrap();
        assert_eq!(reopened.stats().entries, 3);
        assert_eq!(reopened.get(&c, 1000).as_deref(), Some(&dc[..]));
    }

    #[test]
    fn damaged_chunks_are_dropped_not_served() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DiskCache::open(dir.path(), 1 << 20).unwrap();
        let (a, da) = chunk(7, 4096);
        cache.put(&a, &da).unwrap();
        let mut bad = da.clone();
        bad[10] ^= 1;
        fs::write(cache.path(&a), &bad).unwrap();
        assert!(cache.get(&a, 4096).is_none());
        assert!(!cache.contains(&a));
        assert_eq!(cache.stats().corrupt, 1);
    }

    #[test]
    fn pinned_chunks_are_not_evicted() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DiskCache::open(dir.path(), 2000).unwrap();
        let (a, da) = chunk(1, 1000);
        let (b, db) = chunk(2, 1000);
        cache.put(&a, &da).unwrap();
        cache.put(&b, &db).unwrap();
        cache.pin(&a);
        cache.evict_to(1000);
        assert!(cache.contains(&a) && !cache.contains(&b));
        cache.unpin(&a);
        cache.evict_to(0);
        assert!(!cache.contains(&a));
    }
}
