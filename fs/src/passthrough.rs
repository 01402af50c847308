//! Whole files on the node's disk, handed to the kernel with FUSE passthrough.
//!
//! With `strata mount --passthrough`, the first open of a regular file of at least
//! [`MIN_SIZE`] bytes queues it to be written out whole, from verified chunks, into a cache of
//! files keyed by content ([`file_key`]); the file is fsync'd before it is renamed into place,
//! so a crash never leaves a torn one. Later opens give the kernel that file as the backing
//! file: reads and mmap then go to the local filesystem (its page cache, readahead and large
//! folios) without the daemon. Bytes were verified when the file was written; they are not
//! verified again on each read.
//!
//! The price: the kernel must send every open to the daemon (no `FUSE_NO_OPEN_SUPPORT`), which
//! costs workloads that open many small files one round trip each. That is why it is a choice
//! per mount and not the default.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use fuser::BackingId;
use parking_lot::Mutex;
use sha2::{Digest as _, Sha256};

use crate::blob::BlobSource;
use crate::cache::{DiskCache, PendingEntry};
use crate::chunks::{ChunkCache, MAX_RUN};
use crate::format::{Chunk, Sha256Digest};
use crate::tree::Ino;

/// Smallest file served by passthrough: below one chunk the kernel's FUSE page cache serves
/// re-reads as well, and a whole file per small file would only cost inodes.
pub const MIN_SIZE: u64 = 1 << 20;

/// The cache key of a file's content: its size and its chunk table (offsets, lengths and
/// digests of the decompressed chunks), so equal files in any layer share one entry.
pub fn file_key(size: u64, chunks: &[Chunk]) -> Sha256Digest {
    let mut h = Sha256::new();
    h.update(b"strata-file-v1\0");
    h.update(size.to_le_bytes());
    for c in chunks {
        h.update(c.file_offset.to_le_bytes());
        h.update(c.data_len.to_le_bytes());
        h.update(c.digest.0);
        if c.data_offset != 0 {
            h.update(c.data_offset.to_le_bytes());
        }
    }
    Sha256Digest(h.finalize().into())
}

/// A copy being written: readers' decoded chunks land in it as they are served, and the
/// writer thread ([`materialize`]) fills in the rest.
pub struct Building {
    pub key: Sha256Digest,
    pub size: u64,
    /// The copy's temporary file (a second descriptor), written without holding `state`.
    file: fs::File,
    state: Mutex<BuildState>,
}

/// Where each chunk of a copy stands.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Slot {
    Missing,
    Writing,
    Written,
}

struct BuildState {
    /// `None` once committed or abandoned.
    entry: Option<PendingEntry>,
    chunks: Vec<Slot>,
}

impl Building {
    /// Writes chunk `index` of the file (verified `data`) unless it is there or being written.
    pub fn put(&self, index: usize, chunk: &Chunk, frame: &[u8]) -> io::Result<()> {
        let Some(data) = chunk.file_bytes(frame) else {
            return Err(io::Error::other(
                "decoded chunk shorter than its TOC record",
            ));
        };
        {
            let mut st = self.state.lock();
            let open = st.entry.is_some();
            match st.chunks.get_mut(index) {
                Some(slot) if open && *slot == Slot::Missing => *slot = Slot::Writing,
                _ => return Ok(()),
            }
        }
        // Zeros stay a hole (sparse files are stored as chunks of zeros).
        let res = if is_zero(data) {
            Ok(())
        } else {
            self.file.write_all_at(data, chunk.file_offset)
        };
        if let Some(slot) = self.state.lock().chunks.get_mut(index) {
            *slot = if res.is_ok() {
                Slot::Written
            } else {
                Slot::Missing
            };
        }
        res
    }

    fn missing(&self) -> Vec<usize> {
        let st = self.state.lock();
        (0..st.chunks.len())
            .filter(|&i| st.chunks[i] == Slot::Missing)
            .collect()
    }

    /// Takes the pending entry once every chunk is written (waiting out writes in progress);
    /// `None` if some chunk is still missing.
    fn take_complete(&self) -> io::Result<Option<PendingEntry>> {
        loop {
            {
                let mut st = self.state.lock();
                if st.entry.is_none() {
                    return Err(io::Error::other("copy abandoned"));
                }
                if st.chunks.iter().all(|&c| c == Slot::Written) {
                    return Ok(st.entry.take());
                }
                if !st.chunks.contains(&Slot::Writing) {
                    return Ok(None);
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
}

fn is_zero(data: &[u8]) -> bool {
    let mut words = data.chunks_exact(16);
    let words_zero = words
        .by_ref()
        .all(|w| w.iter().fold(0u8, |acc, &b| acc | b) == 0);
    words_zero && words.remainder().iter().all(|&b| b == 0)
}

/// Completes `b`, the copy of a file whose chunk table is `chunks`: fetches the chunks no reader
/// has written yet (through `cache`, verified, in batches one range read can fetch), writes
/// them (holes stay holes), and commits the copy to `files` (fsync'd, then renamed).
pub fn materialize(
    cache: &ChunkCache,
    src: &dyn BlobSource,
    chunks: &[Chunk],
    b: &Building,
    files: &DiskCache,
) -> io::Result<()> {
    // Readers may be writing chunks too: fetch what is missing until nothing is.
    let mut before = Vec::new();
    loop {
        let missing = b.missing();
        if !missing.is_empty() && missing == before {
            return Err(io::Error::other("chunks of the copy cannot be written"));
        }
        fill(cache, src, chunks, b, &missing)?;
        if let Some(entry) = b.take_complete()? {
            return files.commit(entry, b.size, true);
        }
        before = missing;
    }
}

/// Fetches and writes chunks `missing` (indices into `chunks`), in batches one range read can
/// fetch.
fn fill(
    cache: &ChunkCache,
    src: &dyn BlobSource,
    chunks: &[Chunk],
    b: &Building,
    missing: &[usize],
) -> io::Result<()> {
    let mut start = 0;
    while start < missing.len() {
        let mut end = start;
        let mut bytes = 0u64;
        while end < missing.len() {
            let len = u64::from(chunks.get(missing[end]).map_or(0, |c| c.compressed_len));
            if end > start && bytes + len > MAX_RUN {
                break;
            }
            bytes += len;
            end += 1;
        }
        let batch: Vec<Chunk> = missing[start..end]
            .iter()
            .filter_map(|&i| chunks.get(i).copied())
            .collect();
        for ((&i, c), data) in missing[start..end]
            .iter()
            .zip(&batch)
            .zip(cache.get_many(src, &batch))
        {
            let data = data.map_err(|e| io::Error::other(e.0))?;
            b.put(i, c, &data)?;
        }
        start = end;
    }
    Ok(())
}

/// How an inode is open right now. The kernel requires every open of an inode that has a
/// backing file to be a passthrough open, and refuses a passthrough open while the inode is
/// open through the page cache, so an inode stays in one mode until its last release.
enum Mode {
    Cached(usize),
    Backed(BackingId, usize),
}

/// File handle of an open served through the daemon and the FUSE page cache.
pub const FH_CACHED: u64 = 1;
/// File handle of an open served by passthrough to a backing file.
pub const FH_BACKED: u64 = 2;

/// What an open of an eligible file should do.
pub enum OpenPlan {
    /// Reply with this existing backing file.
    Reuse,
    /// Serve through the page cache (the inode is open that way, or no file is ready yet).
    Cached,
    /// A cached file is ready: register it as the backing file.
    Backing(std::fs::File),
}

/// The per-mount passthrough state: the file cache and the open modes of inodes.
pub struct Passthrough {
    pub files: Arc<DiskCache>,
    modes: Mutex<HashMap<Ino, Mode>>,
    /// Copies being written, by the inode whose first open started them (and their keys, so
    /// a file reached through two inodes is written once).
    building: Mutex<Copies>,
    /// Content keys of inodes already opened (a key hashes the whole chunk table).
    keys: Mutex<HashMap<Ino, Sha256Digest>>,
    /// Set when the kernel refused a backing file: opens stop trying (and logging).
    refused: std::sync::atomic::AtomicBool,
    opens: std::sync::atomic::AtomicU64,
}

/// Copies being written: by inode, and the set of their keys.
type Copies = (HashMap<Ino, Arc<Building>>, HashSet<Sha256Digest>);

impl Passthrough {
    pub fn new(files: Arc<DiskCache>) -> Self {
        Passthrough {
            files,
            modes: Mutex::new(HashMap::new()),
            building: Mutex::new((HashMap::new(), HashSet::new())),
            keys: Mutex::new(HashMap::new()),
            refused: std::sync::atomic::AtomicBool::new(false),
            opens: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Decides how to open `ino` (a file whose content key is `key`, `size` bytes). On
    /// [`OpenPlan::Reuse`] the caller replies with [`Passthrough::with_backing`].
    pub fn plan(&self, ino: Ino, key: &Sha256Digest, size: u64) -> OpenPlan {
        let mut modes = self.modes.lock();
        match modes.get_mut(&ino) {
            Some(Mode::Backed(_, n)) => {
                *n += 1;
                return OpenPlan::Reuse;
            }
            Some(Mode::Cached(n)) => {
                *n += 1;
                return OpenPlan::Cached;
            }
            None => {}
        }
        match self.files.open_trusted(key, size) {
            Some(f) => OpenPlan::Backing(f),
            None => {
                modes.insert(ino, Mode::Cached(1));
                OpenPlan::Cached
            }
        }
    }

    /// Runs `f` with the backing id of `ino` (open in passthrough mode).
    pub fn with_backing<R>(&self, ino: Ino, f: impl FnOnce(Option<&BackingId>) -> R) -> R {
        let modes = self.modes.lock();
        match modes.get(&ino) {
            Some(Mode::Backed(id, _)) => f(Some(id)),
            _ => f(None),
        }
    }

    /// Records a registered backing file for `ino` (its first passthrough open) and runs `f`
    /// with the id to reply with, under the lock so no release comes between. If another open
    /// registered one first, that one is used (and `id` closed); if the inode was opened
    /// through the page cache meanwhile, `f` gets `None` and the open must be a cached one.
    pub fn add_backing<R>(
        &self,
        ino: Ino,
        id: BackingId,
        f: impl FnOnce(Option<&BackingId>) -> R,
    ) -> R {
        let mut modes = self.modes.lock();
        match modes.entry(ino).or_insert(Mode::Backed(id, 0)) {
            Mode::Backed(id, n) => {
                *n += 1;
                f(Some(id))
            }
            Mode::Cached(n) => {
                *n += 1;
                f(None)
            }
        }
    }

    /// Records an open planned as passthrough that could not register its backing file, and
    /// runs `f` with the id to reply with: one another open registered meanwhile (all opens of
    /// an inode with a backing file must use it), else `None` for a page-cache open.
    pub fn add_fallback<R>(&self, ino: Ino, f: impl FnOnce(Option<&BackingId>) -> R) -> R {
        let mut modes = self.modes.lock();
        match modes.entry(ino).or_insert(Mode::Cached(0)) {
            Mode::Backed(id, n) => {
                *n += 1;
                f(Some(id))
            }
            Mode::Cached(n) => {
                *n += 1;
                f(None)
            }
        }
    }

    /// Counts an open served by passthrough.
    pub fn served(&self) {
        self.opens
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Opens served by passthrough so far.
    pub fn opens(&self) -> u64 {
        self.opens.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The content key of `ino`'s file (`size` bytes in `chunks`), computed once per inode.
    pub fn key(&self, ino: Ino, size: u64, chunks: &[Chunk]) -> Sha256Digest {
        *self
            .keys
            .lock()
            .entry(ino)
            .or_insert_with(|| file_key(size, chunks))
    }

    /// Whether the kernel took backing files so far (false after the first refusal).
    pub fn usable(&self) -> bool {
        !self.refused.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Records that the kernel refused a backing file; later opens go through the page cache.
    pub fn refuse(&self) {
        self.refused
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether any open of `ino` is live.
    pub fn is_open(&self, ino: Ino) -> bool {
        self.modes.lock().contains_key(&ino)
    }

    /// One open of `ino` ended; the backing file is closed with the last one.
    pub fn release(&self, ino: Ino) {
        let mut modes = self.modes.lock();
        let last = match modes.get_mut(&ino) {
            Some(Mode::Cached(n)) | Some(Mode::Backed(_, n)) => {
                *n = n.saturating_sub(1);
                *n == 0
            }
            None => false,
        };
        if last {
            modes.remove(&ino);
        }
    }

    /// Starts writing the copy of `ino` (content `key`, `size` bytes in `chunks` chunks) unless
    /// it exists or is being written; returns it to be queued for [`materialize`].
    pub fn start_copy(
        &self,
        ino: Ino,
        key: Sha256Digest,
        size: u64,
        chunks: usize,
    ) -> Option<Arc<Building>> {
        // A copy the file cache could not keep would be fetched and thrown away on every open.
        if self.files.contains(&key) || size > self.files.capacity() / 2 {
            return None;
        }
        let mut g = self.building.lock();
        if g.0.contains_key(&ino) || !g.1.insert(key) {
            return None;
        }
        let entry = match self.files.begin(&key) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!("cannot start a passthrough copy: {e}");
                g.1.remove(&key);
                return None;
            }
        };
        let file = match entry.file.try_clone() {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!("cannot start a passthrough copy: {e}");
                g.1.remove(&key);
                return None;
            }
        };
        let b = Arc::new(Building {
            key,
            size,
            file,
            state: Mutex::new(BuildState {
                entry: Some(entry),
                chunks: vec![Slot::Missing; chunks],
            }),
        });
        g.0.insert(ino, b.clone());
        Some(b)
    }

    /// The copy of `ino` being written, if any (readers add their chunks to it).
    pub fn building(&self, ino: Ino) -> Option<Arc<Building>> {
        self.building.lock().0.get(&ino).cloned()
    }

    /// Ends the copy of `ino` (committed, or failed: its temporary file goes with it).
    pub fn finish(&self, ino: Ino) {
        let mut g = self.building.lock();
        if let Some(b) = g.0.remove(&ino) {
            g.1.remove(&b.key);
            b.state.lock().entry = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(off: u64, len: u32, d: u8) -> Chunk {
        Chunk::whole(0, len, len, off, Sha256Digest([d; 32]))
    }

    #[test]
    fn keys_follow_content() {
        let a = [chunk(0, 10, 1), chunk(10, 10, 2)];
        let b = [chunk(0, 10, 1), chunk(10, 10, 3)];
        assert_eq!(file_key(20, &a), file_key(20, &a));
        assert_ne!(file_key(20, &a), file_key(20, &b));
        assert_ne!(file_key(20, &a), file_key(30, &a)); // trailing hole
    }

    #[test]
    fn zero_chunks_are_recognised() {
        assert!(is_zero(&[0; 33]) && is_zero(&[]));
        let mut v = vec![0u8; 40];
        v[39] = 1; // in the remainder after 16-byte words
        assert!(!is_zero(&v));
        v[39] = 0;
        v[5] = 0x80;
        assert!(!is_zero(&v));
    }

    #[test]
    fn inodes_keep_one_mode_until_the_last_release() {
        let dir = tempfile::tempdir().unwrap();
        let files = Arc::new(DiskCache::open(dir.path(), 1 << 20).unwrap());
        let pt = Passthrough::new(files.clone());
        let key = Sha256Digest([9; 32]);
        assert!(matches!(pt.plan(5, &key, 4), OpenPlan::Cached));
        let b = pt.start_copy(5, key, 4, 1).unwrap();
        assert!(pt.start_copy(5, key, 4, 1).is_none()); // once
        let c = Chunk::whole(0, 4, 4, 0, Sha256Digest::of(b"data"));
        b.put(0, &c, b"data").unwrap();
        assert!(b.missing().is_empty());
        let entry = b.state.lock().entry.take().unwrap();
        files.commit(entry, 4, true).unwrap();
        pt.finish(5);
        assert!(pt.start_copy(5, key, 4, 1).is_none()); // exists now
                                                        // Still open through the page cache: a second open must not switch modes.
        assert!(matches!(pt.plan(5, &key, 4), OpenPlan::Cached));
        pt.release(5);
        pt.release(5);
        // Now the file is ready and nothing has the inode open.
        assert!(matches!(pt.plan(5, &key, 4), OpenPlan::Backing(_)));
        // A size mismatch (a damaged or foreign file) is never handed out.
        assert!(matches!(pt.plan(6, &key, 5), OpenPlan::Cached));
    }
}
