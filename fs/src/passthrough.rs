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
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use fuser::BackingId;
use parking_lot::Mutex;
use sha2::{Digest as _, Sha256};

use crate::blob::BlobSource;
use crate::cache::DiskCache;
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
        h.update(c.uncompressed_len.to_le_bytes());
        h.update(c.digest.0);
    }
    Sha256Digest(h.finalize().into())
}

/// Writes a file of `size` bytes from its verified chunks into `files` under `key` (holes stay
/// holes). Chunks come through `cache`, so a concurrent reader and this share fetches.
pub fn materialize(
    cache: &ChunkCache,
    src: &dyn BlobSource,
    chunks: &[Chunk],
    size: u64,
    files: &DiskCache,
    key: &Sha256Digest,
) -> io::Result<()> {
    files.insert_with(key, size, true, |f| {
        let mut start = 0;
        while start < chunks.len() {
            // Batches of neighbouring chunks one range read can fetch.
            let mut end = start;
            let mut bytes = 0u64;
            while end < chunks.len()
                && (end == start || bytes + u64::from(chunks[end].compressed_len) <= MAX_RUN)
            {
                bytes += u64::from(chunks[end].compressed_len);
                end += 1;
            }
            let batch = &chunks[start..end];
            for (c, data) in batch.iter().zip(cache.get_many(src, batch)) {
                let data = data.map_err(|e| io::Error::other(e.0))?;
                f.write_all_at(&data, c.file_offset)?;
            }
            start = end;
        }
        Ok(())
    })
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
    /// Files queued or being written (by key), so each is written once.
    pending: Mutex<HashSet<Sha256Digest>>,
}

impl Passthrough {
    pub fn new(files: Arc<DiskCache>) -> Self {
        Passthrough {
            files,
            modes: Mutex::new(HashMap::new()),
            pending: Mutex::new(HashSet::new()),
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

    /// Records that an open planned as passthrough fell back to the page cache.
    pub fn add_cached(&self, ino: Ino) {
        let mut modes = self.modes.lock();
        match modes.get_mut(&ino) {
            Some(Mode::Cached(n)) | Some(Mode::Backed(_, n)) => *n += 1,
            None => {
                modes.insert(ino, Mode::Cached(1));
            }
        }
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

    /// Marks `key` as queued for writing; false if it already is.
    pub fn claim(&self, key: Sha256Digest) -> bool {
        self.pending.lock().insert(key)
    }

    /// Clears a claim (the file was written, or writing failed and may be retried).
    pub fn unclaim(&self, key: &Sha256Digest) {
        self.pending.lock().remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(off: u64, len: u32, d: u8) -> Chunk {
        Chunk {
            compressed_offset: 0,
            compressed_len: len,
            uncompressed_len: len,
            file_offset: off,
            digest: Sha256Digest([d; 32]),
        }
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
    fn inodes_keep_one_mode_until_the_last_release() {
        let dir = tempfile::tempdir().unwrap();
        let files = Arc::new(DiskCache::open(dir.path(), 1 << 20).unwrap());
        let pt = Passthrough::new(files.clone());
        let key = Sha256Digest([9; 32]);
        assert!(matches!(pt.plan(5, &key, 4), OpenPlan::Cached));
        files
            .insert_with(&key, 4, true, |f| f.write_all_at(b"data", 0))
            .unwrap();
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
