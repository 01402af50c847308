//! The node's disk cache of verified, decompressed chunks, kept in append-only pack files.
//!
//! One file per chunk made a cold read of a cached image cost an inode lookup and a small
//! random read per chunk; packs keep the chunks of a fetch next to each other in a few large
//! files, so cold reads are sequential and the kernel's readahead works. The layout
//! (`docs/architecture.md`, "The chunk cache"):
//!
//! ```text
//! DIR/NNNNNNNN.pack   header: "STRAPACK" | version u16 | flags u16 | reserved [u8; 20]
//!                     records: magic u32 "STRK" | len u32 | sha256 [u8; 32] | reserved u64 | data
//! ```
//!
//! Writes append without fsync (space reserved under the lock, bytes written outside it, the
//! entry published after); every read is verified against the chunk's sha256 (a damaged record
//! is dropped and refetched, never served). Opening the cache scans the record headers, stopping
//! at the first that does not fit (a torn tail); the newest pack is cut back to its last whole
//! record and appended to again. The size cap holds for the sum of pack files: eviction removes
//! whole packs, least recently used first, the pack being written last. Only the pack being
//! written stays open; the others are opened per read.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::cache::CacheStats;
use crate::format::Sha256Digest;

const PACK_MAGIC: &[u8; 8] = b"STRAPACK";
const PACK_VERSION: u16 = 1;
const PACK_HEADER: u64 = 32;
const RECORD_MAGIC: u32 = u32::from_le_bytes(*b"STRK");
const RECORD_HEADER: u64 = 48;
/// Largest pack file (smaller for small caps, so eviction stays fine-grained).
const MAX_PACK: u64 = 64 << 20;
/// How long writes pause after the disk under the cache was found full.
const FULL_BACKOFF: Duration = Duration::from_secs(1);

#[derive(Clone, Copy, PartialEq, Eq)]
struct Loc {
    pack: u32,
    offset: u64,
    len: u32,
}

struct Pack {
    /// Open only for the pack being written; the others are opened per read (a node may
    /// hold thousands of packs, more than a process may keep open).
    writer: Option<Arc<File>>,
    /// Bytes reserved in the file (appends in flight included).
    size: u64,
    last_used: u64,
    chunks: Vec<Sha256Digest>,
    /// Reads in progress: eviction passes over the pack until they end.
    readers: u32,
}

struct State {
    index: HashMap<Sha256Digest, Loc>,
    packs: HashMap<u32, Pack>,
    /// The pack being appended to.
    current: Option<u32>,
    next_id: u32,
    bytes: u64,
    tick: u64,
    full_until: Option<Instant>,
}

/// A size-capped, content-addressed cache of chunks in pack files. One process opens a
/// cache directory at a time (the node daemon, or the CLI holding the daemon's lock).
pub struct PackCache {
    dir: PathBuf,
    capacity: u64,
    pack_size: u64,
    state: Mutex<State>,
    hits: AtomicU64,
    misses: AtomicU64,
    inserted: AtomicU64,
    evicted: AtomicU64,
    corrupt: AtomicU64,
    skipped: AtomicU64,
}

impl std::fmt::Debug for PackCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackCache")
            .field("dir", &self.dir)
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

fn pack_name(id: u32) -> String {
    format!("{id:08}.pack")
}

/// The id of a pack file name, only in its canonical form (`00000042.pack`).
fn pack_id(name: &str) -> Option<u32> {
    let id: u32 = name.strip_suffix(".pack")?.parse().ok()?;
    (pack_name(id) == name).then_some(id)
}

fn is_disk_full(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

fn open_pack(path: &Path, write: bool) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

impl PackCache {
    /// Opens the cache in `dir` (creating it), indexing the packs already there; the newest
    /// one is appended to again (cut back to its last whole record).
    pub fn open(dir: impl Into<PathBuf>, capacity: u64) -> io::Result<Self> {
        let dir = dir.into();
        crate::store::create_private_dir(&dir).map_err(io::Error::other)?;
        let mut state = State {
            index: HashMap::new(),
            packs: HashMap::new(),
            current: None,
            next_id: 0,
            bytes: 0,
            tick: 0,
            full_until: None,
        };
        let mut ids: Vec<u32> = std::fs::read_dir(&dir)?
            .flatten()
            .filter_map(|e| pack_id(&e.file_name().to_string_lossy()))
            .collect();
        ids.sort_unstable();
        let pack_size = (capacity / 8).clamp(1 << 20, MAX_PACK);
        let newest = ids.last().copied();
        for id in ids {
            let path = dir.join(pack_name(id));
            let (size, valid, records) = match scan(&path) {
                Ok(found) => found,
                Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                    tracing::warn!(pack = %path.display(), "dropping a damaged pack: {e}");
                    let _ = std::fs::remove_file(&path);
                    continue;
                }
                Err(e) => {
                    // Not this pack's fault (out of descriptors, I/O error): leave it be.
                    tracing::warn!(pack = %path.display(), "skipping a pack: {e}");
                    state.next_id = state.next_id.max(id.saturating_add(1));
                    continue;
                }
            };
            let mut chunks = Vec::with_capacity(records.len());
            for (digest, offset, len) in records {
                state.index.insert(
                    digest,
                    Loc {
                        pack: id,
                        offset,
                        len,
                    },
                );
                chunks.push(digest);
            }
            let mut pack = Pack {
                writer: None,
                size,
                last_used: 0,
                chunks,
                readers: 0,
            };
            // Keep filling the newest pack rather than starting one per daemon run.
            if Some(id) == newest && valid < pack_size {
                if let Ok(f) = open_pack(&path, true) {
                    if valid == size || f.set_len(valid).is_ok() {
                        pack.size = valid;
                        pack.writer = Some(Arc::new(f));
                        state.current = Some(id);
                    }
                }
            }
            state.bytes += pack.size;
            state.tick += 1;
            pack.last_used = state.tick;
            state.packs.insert(id, pack);
            state.next_id = state.next_id.max(id.saturating_add(1));
        }
        let cache = PackCache {
            dir,
            capacity,
            pack_size,
            state: Mutex::new(state),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            inserted: AtomicU64::new(0),
            evicted: AtomicU64::new(0),
            corrupt: AtomicU64::new(0),
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

    /// Whether the chunk is cached (without reading it).
    pub fn contains(&self, d: &Sha256Digest) -> bool {
        self.state.lock().index.contains_key(d)
    }

    /// Returns the chunk's bytes if cached and intact (`len` bytes hashing to `d`).
    pub fn get(&self, d: &Sha256Digest, len: usize) -> Option<Vec<u8>> {
        let found = {
            let mut st = self.state.lock();
            st.tick += 1;
            let tick = st.tick;
            match st.index.get(d).copied() {
                // Equal digests have equal lengths: a caller asking for another length (a
                // hostile TOC) simply misses; the entry is not damaged.
                Some(loc) if loc.len as usize == len => st.packs.get_mut(&loc.pack).map(|p| {
                    p.last_used = tick;
                    p.readers += 1;
                    (loc, p.writer.clone())
                }),
                _ => None,
            }
        };
        let Some((loc, writer)) = found else {
            self.misses.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        let file = match writer {
            Some(f) => Some(f),
            None => open_pack(&self.dir.join(pack_name(loc.pack)), false)
                .ok()
                .map(Arc::new),
        };
        let mut buf = vec![0u8; len];
        let read = file.is_some_and(|f| f.read_exact_at(&mut buf, loc.offset).is_ok());
        if let Some(p) = self.state.lock().packs.get_mut(&loc.pack) {
            p.readers = p.readers.saturating_sub(1);
        }
        if read && &Sha256Digest::of(&buf) == d {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return Some(buf);
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        if !read {
            // Not readable now (out of descriptors, I/O error, pack just evicted): a miss,
            // and the entry stays for the next reader.
            return None;
        }
        tracing::warn!(chunk = %d, "cached chunk is damaged; dropping it");
        self.corrupt.fetch_add(1, Ordering::Relaxed);
        // Drop the entry only if it is still the one read (it may have been evicted and
        // stored again meanwhile).
        let mut st = self.state.lock();
        if st.index.get(d) == Some(&loc) {
            st.index.remove(d);
        }
        None
    }

    /// Stores a verified chunk (the caller has checked `data` hashes to `d`). A full disk is
    /// not an error: the chunk stays uncached, writes pause briefly and resume by themselves.
    pub fn put(&self, d: &Sha256Digest, data: &[u8]) -> io::Result<()> {
        let len = data.len() as u64;
        if data.is_empty() || len + RECORD_HEADER + PACK_HEADER > self.capacity {
            return Ok(());
        }
        // Reserve the space under the lock; write outside it (a slow disk must not hold up
        // every reader); publish the entry once the bytes are there.
        let (id, file, offset) = {
            let mut st = self.state.lock();
            if st.index.contains_key(d) {
                return Ok(());
            }
            if st.full_until.is_some_and(|t| Instant::now() < t) {
                self.skipped.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
            match self.reserve(&mut st, RECORD_HEADER + len) {
                Ok(r) => r,
                Err(e) => return self.failed(&mut st, e),
            }
        };
        let mut header = [0u8; RECORD_HEADER as usize];
        header[..4].copy_from_slice(&RECORD_MAGIC.to_le_bytes());
        header[4..8].copy_from_slice(&(data.len() as u32).to_le_bytes());
        header[8..40].copy_from_slice(&d.0);
        let written = file
            .write_all_at(&header, offset)
            .and_then(|()| file.write_all_at(data, offset + RECORD_HEADER));
        let mut st = self.state.lock();
        match written {
            Ok(()) => {
                if let Some(pack) = st.packs.get_mut(&id) {
                    pack.chunks.push(*d);
                    st.index.insert(
                        *d,
                        Loc {
                            pack: id,
                            offset: offset + RECORD_HEADER,
                            len: data.len() as u32,
                        },
                    );
                }
                if st.full_until.take().is_some() {
                    tracing::info!(dir = %self.dir.display(), "space returned: caching resumed");
                }
            }
            Err(e) => {
                // The reserved space stays a hole (counted); no more appends to this pack, so a
                // later scan stops before the hole.
                if st.current == Some(id) {
                    st.current = None;
                    if let Some(p) = st.packs.get_mut(&id) {
                        p.writer = None;
                    }
                }
                return self.failed(&mut st, e);
            }
        }
        drop(st);
        self.inserted.fetch_add(1, Ordering::Relaxed);
        self.evict_to(self.capacity);
        Ok(())
    }

    /// A write failed: a full disk pauses writes (not an error); anything else is returned.
    fn failed(&self, st: &mut State, e: io::Error) -> io::Result<()> {
        if !is_disk_full(&e) {
            return Err(e);
        }
        self.skipped.fetch_add(1, Ordering::Relaxed);
        if st.full_until.is_none() {
            tracing::warn!(dir = %self.dir.display(),
                "the disk under the cache is full: serving without caching until space returns");
        }
        st.full_until = Some(Instant::now() + FULL_BACKOFF);
        Ok(())
    }

    /// Reserves `need` bytes at the end of the current pack (starting a new pack when it is
    /// full): the pack, its file and the offset.
    fn reserve(&self, st: &mut State, need: u64) -> io::Result<(u32, Arc<File>, u64)> {
        let fits = st
            .current
            .and_then(|id| st.packs.get(&id).map(|p| (id, p)))
            .filter(|(_, p)| p.size + need <= self.pack_size || p.size == PACK_HEADER)
            .and_then(|(id, p)| p.writer.clone().map(|f| (id, f)));
        let (id, file) = match fits {
            Some(found) => found,
            None => {
                if let Some(old) = st.current.take() {
                    if let Some(p) = st.packs.get_mut(&old) {
                        p.writer = None;
                    }
                }
                let id = st.next_id;
                st.next_id = id
                    .checked_add(1)
                    .ok_or_else(|| io::Error::other("pack ids exhausted"))?;
                let path = self.dir.join(pack_name(id));
                let file = {
                    use std::os::unix::fs::OpenOptionsExt;
                    std::fs::OpenOptions::new()
                        .read(true)
                        .write(true)
                        .create_new(true)
                        .mode(0o600)
                        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                        .open(&path)?
                };
                let mut header = [0u8; PACK_HEADER as usize];
                header[..8].copy_from_slice(PACK_MAGIC);
                header[8..10].copy_from_slice(&PACK_VERSION.to_le_bytes());
                if let Err(e) = file.write_all_at(&header, 0) {
                    let _ = std::fs::remove_file(&path);
                    return Err(e);
                }
                let file = Arc::new(file);
                st.tick += 1;
                st.packs.insert(
                    id,
                    Pack {
                        writer: Some(file.clone()),
                        size: PACK_HEADER,
                        last_used: st.tick,
                        chunks: Vec::new(),
                        readers: 0,
                    },
                );
                st.bytes += PACK_HEADER;
                st.current = Some(id);
                (id, file)
            }
        };
        st.tick += 1;
        let tick = st.tick;
        let pack = st
            .packs
            .get_mut(&id)
            .ok_or_else(|| io::Error::other("pack vanished"))?;
        let offset = pack.size;
        pack.size += need;
        pack.last_used = tick;
        st.bytes += need;
        Ok((id, file, offset))
    }

    /// Evicts least-recently-used packs until at most `target` bytes remain. The pack being
    /// written goes last, and only when `target` is 0.
    pub fn evict_to(&self, target: u64) {
        let mut victims = Vec::new();
        {
            let mut st = self.state.lock();
            while st.bytes > target {
                let current = st.current;
                let Some(id) = st
                    .packs
                    .iter()
                    .filter(|(id, p)| (Some(**id) != current && p.readers == 0) || target == 0)
                    .min_by_key(|(id, p)| (Some(**id) == current, p.last_used))
                    .map(|(id, _)| *id)
                else {
                    break;
                };
                let Some(pack) = st.packs.remove(&id) else {
                    break;
                };
                if st.current == Some(id) {
                    st.current = None;
                }
                st.bytes -= pack.size;
                for d in &pack.chunks {
                    if st.index.get(d).is_some_and(|l| l.pack == id) {
                        st.index.remove(d);
                    }
                }
                self.evicted
                    .fetch_add(pack.chunks.len() as u64, Ordering::Relaxed);
                victims.push(id);
            }
        }
        for id in victims {
            let _ = std::fs::remove_file(self.dir.join(pack_name(id)));
        }
    }

    pub fn stats(&self) -> CacheStats {
        let st = self.state.lock();
        CacheStats {
            entries: st.index.len() as u64,
            bytes: st.bytes,
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

/// (digest, offset of the data, length) of a record.
type Record = (Sha256Digest, u64, u32);

fn scan(path: &Path) -> io::Result<(u64, u64, Vec<Record>)> {
    let file = open_pack(path, false)?;
    let file_len = file.metadata()?.len();
    let mut header = [0u8; PACK_HEADER as usize];
    file.read_exact_at(&mut header, 0)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("no pack header: {e}")))?;
    if &header[..8] != PACK_MAGIC {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "not a strata pack",
        ));
    }
    let version = u16::from_le_bytes([header[8], header[9]]);
    let flags = u16::from_le_bytes([header[10], header[11]]);
    if version != PACK_VERSION || flags != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("pack version {version} flags {flags:#x} unknown to this build"),
        ));
    }
    let mut records = Vec::new();
    let mut pos = PACK_HEADER;
    let mut rec = [0u8; RECORD_HEADER as usize];
    while pos + RECORD_HEADER <= file_len {
        file.read_exact_at(&mut rec, pos)?;
        let magic = u32::from_le_bytes([rec[0], rec[1], rec[2], rec[3]]);
        let len = u32::from_le_bytes([rec[4], rec[5], rec[6], rec[7]]);
        if magic != RECORD_MAGIC
            || len == 0
            || len > crate::format::MAX_CHUNK_SIZE
            || pos + RECORD_HEADER + u64::from(len) > file_len
        {
            break;
        }
        let mut digest = [0u8; 32];
        digest.copy_from_slice(&rec[8..40]);
        records.push((Sha256Digest(digest), pos + RECORD_HEADER, len));
        pos += RECORD_HEADER + u64::from(len);
    }
    // Past `pos` is a torn tail (or a hole a failed append left): never read.
    Ok((file_len, pos, records))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn chunk(i: u8, len: usize) -> (Sha256Digest, Vec<u8>) {
        let data = vec![i; len];
        (Sha256Digest::of(&data), data)
    }

    #[test]
    fn put_get_reopen_evict_and_damage() {
        let t = tempfile::tempdir().unwrap();
        let cap = 8 << 20;
        let c = PackCache::open(t.path(), cap).unwrap();
        let chunks: Vec<_> = (0..20u8).map(|i| chunk(i, 1 << 20)).collect();
        for (d, data) in &chunks[..4] {
            c.put(d, data).unwrap();
        }
        assert_eq!(c.get(&chunks[0].0, 1 << 20).unwrap(), chunks[0].1);
        drop(c);
        // Reopened: the same chunks, from the packs' record headers.
        let c = PackCache::open(t.path(), cap).unwrap();
        assert_eq!(c.stats().entries, 4);
        assert_eq!(c.get(&chunks[3].0, 1 << 20).unwrap(), chunks[3].1);
        // More than the cap: whole packs go, the total stays under the cap.
        for (d, data) in &chunks[4..] {
            c.put(d, data).unwrap();
            assert!(c.stats().bytes <= cap, "{:?}", c.stats());
        }
        assert!(c.contains(&chunks[19].0));
        assert!(!c.contains(&chunks[4].0));
        // A damaged record is dropped, not served.
        let (d, data) = &chunks[19];
        let loc = c.state.lock().index.get(d).copied().unwrap();
        assert!(
            c.get(d, data.len() - 1).is_none(),
            "another length is a plain miss"
        );
        assert!(c.contains(d));
        let path = t.path().join(pack_name(loc.pack));
        let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        f.write_all_at(b"X", loc.offset + 10).unwrap();
        assert!(c.get(d, data.len()).is_none());
        assert!(!c.contains(d));
        assert_eq!(c.stats().corrupt, 1);
        c.evict_to(0);
        assert_eq!(c.stats().bytes, 0);
    }

    #[test]
    fn a_torn_tail_is_cut_and_the_pack_appended_to() {
        let t = tempfile::tempdir().unwrap();
        let c = PackCache::open(t.path(), 64 << 20).unwrap();
        let (a, da) = chunk(1, 1000);
        let (b, db) = chunk(2, 1000);
        c.put(&a, &da).unwrap();
        c.put(&b, &db).unwrap();
        drop(c);
        let path = t.path().join(pack_name(0));
        let len = std::fs::metadata(&path).unwrap().len();
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(len - 10).unwrap();
        let c = PackCache::open(t.path(), 64 << 20).unwrap();
        assert!(c.contains(&a) && !c.contains(&b));
        assert_eq!(c.get(&a, 1000).unwrap(), da);
        // The same pack is appended to again, from its last whole record.
        c.put(&b, &db).unwrap();
        assert_eq!(c.get(&b, 1000).unwrap(), db);
        drop(c);
        assert_eq!(std::fs::read_dir(t.path()).unwrap().count(), 1);
        let c = PackCache::open(t.path(), 64 << 20).unwrap();
        assert_eq!(c.get(&b, 1000).unwrap(), db);
    }
}
