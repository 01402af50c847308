//! The FUSE adapter: kernel requests → [`Tree`] lookups and chunk reads.
//!
//! Layers are immutable, so the kernel may cache entries, attributes, directory listings and
//! file pages for as long as the mount lives. Errors become errno values in one place
//! ([`Errno`] mapping in [`FsError::errno`]).

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    InitFlags, KernelConfig, LockOwner, MountOption, OpenAccMode, OpenFlags, ReplyAttr, ReplyData,
    ReplyDirectory, ReplyDirectoryPlus, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyXattr, Request,
    SessionACL,
};
use parking_lot::Mutex;

use crate::blob::BlobSource;
use crate::cache::DiskCache;
use crate::chunks::{ChunkCache, ChunkPool, FetchStats};
use crate::format::{Chunk, EntryKind};
use crate::opstats::{Op, OpStats};
use crate::passthrough::{self, OpenPlan, Passthrough, FH_BACKED, FH_CACHED};
use crate::tree::{Ino, Node, Tree};

mod prefetch;
mod recorder;

use prefetch::start_background_prefetch;
use recorder::Recorder;

/// Chunks decoded ahead of a sequential reader.
const READAHEAD_CHUNKS: usize = 3;
/// A read of a small chunk at least this large is taken for sequential (see `read`).
const SEQUENTIAL_READ: u64 = 64 << 10;

/// The link a page fault's extra chunks are sized for until a large read has measured the real
/// one (20 Mbit/s): at this rate they take no longer to arrive than the request they may save
/// (see `latency_window`).
const SLOW_LINK_BYTES_PER_SEC: u64 = 2_500_000;

/// The most a page fault's range read carries beyond what it needs (with what it needs, under
/// the 4 MiB a range read may carry, so it stays one request).
const MAX_LATENCY_WINDOW: u64 = 3 << 20;

/// The chunks of `after` (those following a read's chunks in the same file) that one range
/// read carries with the read, for a source `latency` away at `rate` bytes per second: on a
/// distant registry a request costs more than the bytes, so a page fault in an executable's
/// small chunks takes the chunks after it, as many as the link moves in one `latency` (they
/// cost no more time than the request they may save; the next faults of `exec` mostly land
/// ahead). Nearby on a slow link (a few ms), none: every fault fetches only its own chunk.
/// Stops at the first chunk that is not `missing`, so the read stays one range.
fn latency_window(
    after: &[Chunk],
    latency: Duration,
    rate: u64,
    missing: impl Fn(&Chunk) -> bool,
) -> Vec<Chunk> {
    let budget = (latency.as_micros() as u64).saturating_mul(rate) / 1_000_000;
    let budget = budget.min(MAX_LATENCY_WINDOW);
    let mut bytes = 0u64;
    let mut out = Vec::new();
    for c in after {
        bytes += u64::from(c.compressed_len);
        if bytes > budget || !missing(c) {
            break;
        }
        out.push(*c);
    }
    out
}

/// How long the kernel may cache entries and attributes: layers never change.
const TTL: Duration = Duration::from_secs(365 * 24 * 3600);

/// Failures a FUSE request can meet.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("no such entry")]
    NotFound,
    #[error("not a directory")]
    NotDir,
    #[error("read-only filesystem")]
    ReadOnly,
    #[error("no such attribute")]
    NoAttr,
    #[error("buffer too small")]
    Range,
    #[error("invalid argument")]
    Invalid,
    #[error("I/O error: {0}")]
    Io(String),
}

impl FsError {
    /// The one place errors become errno values.
    pub fn errno(&self) -> Errno {
        match self {
            FsError::NotFound => Errno::ENOENT,
            FsError::NotDir => Errno::ENOTDIR,
            FsError::ReadOnly => Errno::EROFS,
            FsError::NoAttr => Errno::ENODATA,
            FsError::Range => Errno::ERANGE,
            FsError::Invalid => Errno::EINVAL,
            FsError::Io(_) => Errno::EIO,
        }
    }
}

/// Mount settings.
#[derive(Clone, Debug)]
pub struct MountConfig {
    /// FUSE worker threads.
    pub threads: usize,
    /// Bytes of decompressed chunks kept in memory.
    pub memory_cache: usize,
    /// Name shown as the mount source (e.g. the image reference).
    pub fsname: String,
    /// The node's disk cache of verified chunks, if any.
    pub disk_cache: Option<Arc<crate::packs::PackCache>>,
    /// Cache chunks of local layer blobs on disk too.
    pub cache_local: bool,
    /// After mounting, fetch the rest of every remote layer into the disk cache in the
    /// background, yielding to readers.
    pub background_prefetch: bool,
    /// An access profile ([`crate::profile`]): the chunks it names are fetched as soon as the
    /// mount is up, before the rest of the background prefetch and without waiting for readers
    /// to pause (they are what the workload is about to read).
    pub profile: Vec<crate::profile::Line>,
    /// Record the order of first reads and write it here when unmounted.
    pub record_profile: Option<std::path::PathBuf>,
    /// Serve large files by FUSE passthrough from whole copies kept in this cache (see
    /// [`crate::passthrough`]); every open then reaches the daemon.
    pub passthrough: Option<Arc<DiskCache>>,
    /// The node-wide chunk pool to share (memory LRU, fetches in flight, disk cache); without
    /// one the mount gets a pool of its own from `memory_cache` and `disk_cache`.
    pub pool: Option<Arc<ChunkPool>>,
    /// Honour setuid/setgid bits and device files (a container's lower layer); inspection
    /// mounts stay `nosuid,nodev`.
    pub setuid: bool,
    /// Threads that wait on fetches for reads, so FUSE workers never block on a registry.
    pub fetch_threads: usize,
    /// A read from a remote layer needing fewer compressed bytes than this takes the chunks
    /// that follow it in the blob up to this many (0: only what the read needs).
    pub neighbour_fetch: u64,
}

impl Default for MountConfig {
    fn default() -> Self {
        MountConfig {
            threads: 4,
            memory_cache: 256 << 20,
            fsname: "strata".into(),
            disk_cache: None,
            cache_local: false,
            background_prefetch: true,
            profile: Vec::new(),
            record_profile: None,
            passthrough: None,
            pool: None,
            setuid: false,
            fetch_threads: 16,
            neighbour_fetch: NEIGHBOUR_FETCH,
        }
    }
}

struct Shared {
    tree: Tree,
    blobs: Vec<Arc<dyn BlobSource>>,
    cache: ChunkCache,
    ops: OpStats,
    /// Per remote layer, its small files' chunks in blob order (empty for local layers): a
    /// small file's read that must go to the registry takes the small files that follow it
    /// in the same request.
    blob_order: Vec<Vec<Chunk>>,
    neighbour_fetch: u64,
    /// Runs of small-file reads through the blobs (several readers may each have one): (layer,
    /// index in `blob_order` of the last chunk fetched, neighbour window in bytes), most recent
    /// last. Scattered reads fetch no neighbours; reads that follow one another through a blob
    /// double their run's window up to `neighbour_fetch`.
    sequences: Mutex<Vec<(u32, usize, u64)>>,
    /// The background prefetch has fetched every chunk of the remote layers.
    prefetched: std::sync::atomic::AtomicBool,
    /// Chunks of remote layers the access profile named (fetched first), once known.
    profile_chunks: std::sync::atomic::AtomicU64,
}

/// Runs of small-file reads tracked at once.
const RUNS: usize = 8;

/// A small-file read continues a run when it starts at most this many blob bytes after the
/// previous read's chunk (a few small files skipped, as a reader of a directory does).
const RUN_GAP: u64 = 16 << 10;

/// The first neighbour window of a run of small-file reads through a blob.
const FIRST_WINDOW: u64 = 32 << 10;

/// A fetch from a remote layer smaller than this is topped up with the chunks that follow it
/// in the blob (files of the same directory, usually read next): one round trip for many small
/// files instead of one each.
pub const NEIGHBOUR_FETCH: u64 = 256 << 10;

/// Files of one chunk up to this size are small files.
const SMALL_CHUNK: u32 = 64 << 10;

/// A read waiting for chunks that are not in memory, handed from a FUSE worker to a fetch
/// thread.
struct PendingRead {
    ino: Ino,
    offset: u64,
    size: u32,
    reply: ReplyData,
    started: std::time::Instant,
}

/// Chunks of one layer to warm ahead of a sequential reader.
type Readahead = (u32, Vec<Chunk>);

/// A handle to a mount's counters that outlives the session borrow (for a stats writer).
#[derive(Clone)]
pub struct StatsHandle(std::sync::Weak<Shared>, Option<Arc<Passthrough>>);

impl StatsHandle {
    /// Fetch counters, and the disk cache's if there is one; `None` once unmounted.
    pub fn get(&self) -> Option<(FetchStats, Option<crate::cache::CacheStats>)> {
        let s = self.0.upgrade()?;
        Some((s.cache.stats(), s.cache.disk().map(|d| d.stats())))
    }

    /// Counters of the whole-file cache of a passthrough mount.
    pub fn files(&self) -> Option<crate::cache::CacheStats> {
        self.1.as_ref().map(|p| p.files.stats())
    }

    /// Opens served by FUSE passthrough (a passthrough mount only).
    pub fn passthrough_opens(&self) -> Option<u64> {
        self.1.as_ref().map(|p| p.opens())
    }

    /// When the first range read of a layer blob completed.
    pub fn first_source_read(&self) -> Option<std::time::Instant> {
        self.0.upgrade()?.cache.first_source_read()
    }

    /// Whether the background prefetch has brought every remote chunk to the disk cache.
    pub fn prefetched(&self) -> bool {
        self.0
            .upgrade()
            .is_some_and(|s| s.prefetched.load(Ordering::Relaxed))
    }

    /// Chunks of the mount's remote layers its access profile named (fetched first).
    pub fn profile_chunks(&self) -> u64 {
        self.0
            .upgrade()
            .map_or(0, |s| s.profile_chunks.load(Ordering::Relaxed))
    }

    /// Latency histograms of the FUSE operations served so far.
    pub fn ops(&self) -> Option<crate::opstats::OpSnapshot> {
        self.0.upgrade().map(|s| s.ops.snapshot())
    }

    /// The extended attributes the mount shows for the entry at `path` (relative to its root,
    /// no symlinks followed); `None` when there is no such entry or the mount is gone.
    pub fn xattrs_of(&self, path: &std::path::Path) -> Option<Vec<(Vec<u8>, Vec<u8>)>> {
        use std::os::unix::ffi::OsStrExt;
        let s = self.0.upgrade()?;
        let ino = s.tree.lookup_path(path.as_os_str().as_bytes())?;
        let n = s.tree.get(ino)?;
        Some(
            visible_xattrs(n)
                .map(|(k, v)| (k.to_vec(), v.to_vec()))
                .collect(),
        )
    }

    /// The content of the regular file at `path` (relative to the mount's root, no symlinks
    /// followed) when it is at most `max` bytes and its chunks cover it without holes: every
    /// chunk from the caches or its layer's blob, verified, as a read through the mount would
    /// serve it. `None` when the mount cannot answer so (gone, no such file, larger, sparse).
    pub fn whole_file(&self, path: &std::path::Path, max: u64) -> Option<Result<Vec<u8>, String>> {
        use std::os::unix::ffi::OsStrExt;
        let s = self.0.upgrade()?;
        let n = s
            .tree
            .get(s.tree.lookup_path(path.as_os_str().as_bytes())?)?;
        if n.kind != EntryKind::Regular || n.size > max {
            return None;
        }
        if n.size == 0 {
            return Some(Ok(Vec::new()));
        }
        let (layer, chunks) = s.chunks(n)?;
        let mut end = 0;
        for c in chunks {
            if c.file_offset != end {
                return None;
            }
            end = c.file_end();
        }
        if end != n.size {
            return None;
        }
        let blob = s.blobs.get(layer as usize)?;
        let mut out = Vec::with_capacity(n.size as usize);
        for (c, frame) in chunks.iter().zip(s.cache.get_many(blob.as_ref(), chunks)) {
            let frame = match frame {
                Ok(f) => f,
                Err(e) => return Some(Err(e.0)),
            };
            match c.file_bytes(&frame) {
                Some(b) => out.extend_from_slice(b),
                None => return Some(Err("chunk shorter than its TOC record".into())),
            }
        }
        Some(Ok(out))
    }

    /// Whether the mount's filesystem still exists.
    pub fn alive(&self) -> bool {
        self.0.strong_count() > 0
    }
}

/// A read-only filesystem serving a merged layer tree.
pub struct StrataFs {
    shared: Arc<Shared>,
    prefetch: SyncSender<Readahead>,
    prefetch_rx: Mutex<Option<Receiver<Readahead>>>,
    readahead_threads: usize,
    no_open: bool,
    no_opendir: bool,
    background_prefetch: bool,
    profile: Vec<crate::profile::Line>,
    recorder: Option<Recorder>,
    passthrough: Option<Arc<Passthrough>>,
    /// Files to write out whole for passthrough (inode, content key).
    materialize: SyncSender<Ino>,
    materialize_rx: Mutex<Option<Receiver<Ino>>>,
    /// Reads that must wait for a fetch go to these threads.
    reads: crossbeam_channel::Sender<PendingRead>,
    reads_rx: Mutex<Option<crossbeam_channel::Receiver<PendingRead>>>,
    fetch_threads: usize,
}

/// Runs one request's work; a panic in it is logged and the request answered with EIO (fuser
/// answers a dropped reply with EIO) instead of taking the worker thread down.
fn shielded(op: &str, f: impl FnOnce()) {
    if let Err(panic) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        let msg = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        tracing::error!(op, "request handler panicked (answered EIO): {msg}");
    }
}

fn system_time(sec: i64, nsec: u32) -> SystemTime {
    if sec >= 0 {
        UNIX_EPOCH + Duration::new(sec as u64, nsec)
    } else {
        UNIX_EPOCH - Duration::from_secs(sec.unsigned_abs()) + Duration::from_nanos(u64::from(nsec))
    }
}

fn file_type(kind: EntryKind) -> FileType {
    match kind {
        EntryKind::Regular | EntryKind::Hardlink => FileType::RegularFile,
        EntryKind::Directory => FileType::Directory,
        EntryKind::Symlink => FileType::Symlink,
        EntryKind::CharDevice => FileType::CharDevice,
        EntryKind::BlockDevice => FileType::BlockDevice,
        EntryKind::Fifo => FileType::NamedPipe,
    }
}

/// Linux `makedev` encoding, truncated to the 32 bits FUSE carries.
fn makedev(major: u32, minor: u32) -> u32 {
    (minor & 0xff) | ((major & 0xfff) << 8) | ((minor & !0xff) << 12)
}

/// A lookup answer with node id 0: "no such name", cached by the kernel for the entry's TTL.
fn negative_attr() -> FileAttr {
    FileAttr {
        ino: INodeNo(0),
        size: 0,
        blocks: 0,
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind: FileType::RegularFile,
        perm: 0,
        nlink: 0,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

fn attr(ino: Ino, n: &Node) -> FileAttr {
    let t = system_time(n.mtime_sec, n.mtime_nsec);
    let size = match n.kind {
        EntryKind::Symlink => n.link.len() as u64,
        EntryKind::Directory => 4096,
        _ => n.size,
    };
    FileAttr {
        ino: INodeNo(ino),
        size,
        blocks: size.div_ceil(512),
        atime: t,
        mtime: t,
        ctime: t,
        crtime: t,
        kind: file_type(n.kind),
        perm: (n.mode & 0o7777) as u16,
        nlink: n.nlink,
        uid: n.uid,
        gid: n.gid,
        rdev: makedev(n.dev_major, n.dev_minor),
        blksize: 4096,
        flags: 0,
    }
}

impl Shared {
    fn node(&self, ino: INodeNo) -> Result<&Node, FsError> {
        self.tree.get(ino.0).ok_or(FsError::NotFound)
    }

    fn chunks(&self, n: &Node) -> Option<(u32, &[Chunk])> {
        let data = n.data?;
        let e = self.tree.data_entry(data)?;
        Some((data.layer, &e.chunks))
    }

    /// Chunks that follow `needed` in a remote layer's blob and are cached nowhere, up to
    /// [`NEIGHBOUR_FETCH`] compressed bytes in all (none when `needed` is cached or large).
    fn neighbours(&self, layer: u32, blob: &dyn BlobSource, needed: &[Chunk]) -> Vec<Chunk> {
        let Some(order) = self
            .blob_order
            .get(layer as usize)
            .filter(|o| !o.is_empty())
        else {
            return Vec::new();
        };
        // Only a small file's read (one small chunk, so it is in `order`) takes neighbours, and
        // only small files are taken: a large file's chunks are read by their own readers (and
        // readahead), and would turn a small read into a large one on a slow link.
        let ([one], Some(from)) = (
            needed,
            order
                .binary_search_by_key(&needed[0].compressed_offset, |c| c.compressed_offset)
                .ok(),
        ) else {
            return Vec::new();
        };
        if self.cache.has(blob, &one.digest) {
            return Vec::new();
        }
        // Like readahead: only a read that continues a run through the blob (a small file
        // within RUN_GAP bytes after the last one fetched) takes neighbours, in a window that
        // grows with the run. Bytes, not files: one batch frame holds a dozen small files.
        let continues = |last: usize| {
            order.get(last).is_some_and(|l| {
                let end = l.compressed_offset + u64::from(l.compressed_len);
                from > last && order[from].compressed_offset.saturating_sub(end) <= RUN_GAP
            })
        };
        let window = {
            let mut runs = self.sequences.lock();
            let window = match runs.iter().position(|r| r.0 == layer && continues(r.1)) {
                Some(i) => {
                    let r = runs.remove(i);
                    r.2.saturating_mul(2)
                        .clamp(FIRST_WINDOW, self.neighbour_fetch.max(FIRST_WINDOW))
                }
                None => 0,
            };
            if runs.len() >= RUNS {
                runs.remove(0);
            }
            runs.push((layer, from, window));
            window.min(self.neighbour_fetch)
        };
        if window == 0 {
            return Vec::new();
        }
        let mut bytes = u64::from(one.compressed_len);
        let mut end = one.compressed_offset + u64::from(one.compressed_len);
        let mut out: Vec<Chunk> = Vec::new();
        for c in &order[from + 1..] {
            if self.cache.has(blob, &c.digest) || out.iter().any(|o| o.digest == c.digest) {
                continue;
            }
            // What one range read would carry from the last chunk taken: stop where it would
            // not bridge the gap, or past the budget.
            let gap = c.compressed_offset.saturating_sub(end);
            let cost = gap + u64::from(c.compressed_len);
            if gap > crate::chunks::MAX_GAP || bytes + cost > window {
                break;
            }
            bytes += cost;
            end = c.compressed_offset + u64::from(c.compressed_len);
            out.push(*c);
        }
        // The next read that continues the run starts after what was taken.
        if let Some(last) = out.last() {
            if let Ok(at) =
                order.binary_search_by_key(&last.compressed_offset, |c| c.compressed_offset)
            {
                let mut runs = self.sequences.lock();
                if let Some(r) = runs.iter_mut().rev().find(|r| r.0 == layer && r.1 == from) {
                    r.1 = at;
                }
            }
        }
        out
    }

    /// Whether every chunk a read needs is in the memory cache (or it needs none).
    fn in_memory(&self, n: &Node, offset: u64, size: u32) -> bool {
        if offset >= n.size || size == 0 {
            return true;
        }
        let Some((_, chunks)) = self.chunks(n) else {
            return true;
        };
        let end = n.size.min(offset + u64::from(size));
        let first = chunks.partition_point(|c| c.file_end() <= offset);
        let last = chunks.partition_point(|c| c.file_offset < end);
        chunks
            .get(first..last)
            .is_some_and(|cs| cs.iter().all(|c| self.cache.contains(&c.digest)))
    }

    /// Reads `size` bytes at `offset` and hands them to `reply` (without copying when they lie
    /// in one chunk); returns the chunks a sequential reader wants next.
    fn read(
        &self,
        n: &Node,
        offset: u64,
        size: u32,
        reply: ReplyData,
        copy: Option<&passthrough::Building>,
    ) -> Option<(u32, Vec<Chunk>)> {
        if offset >= n.size || size == 0 {
            reply.data(&[]);
            return None;
        }
        let end = n.size.min(offset + u64::from(size));
        let fail = |reply: ReplyData, msg: String| {
            reply.error(FsError::Io(msg).errno());
            None
        };
        let Some((layer, chunks)) = self.chunks(n) else {
            return fail(reply, "file has no data".into());
        };
        let Some(blob) = self.blobs.get(layer as usize) else {
            return fail(reply, "layer missing".into());
        };
        let first = chunks.partition_point(|c| c.file_end() <= offset);
        let last = chunks.partition_point(|c| c.file_offset < end);
        if first >= last {
            return fail(reply, "chunk table ends early".into());
        }
        // All chunks of this read in one call, so missing neighbours share a range read.
        let needed = &chunks[first..last];
        let mut wanted = needed.to_vec();
        wanted.extend(self.neighbours(layer, blob.as_ref(), needed));
        if let Some(latency) = blob.request_latency() {
            let small = needed.iter().all(|c| c.uncompressed_len <= SMALL_CHUNK);
            let cached = |c: &Chunk| self.cache.has(blob.as_ref(), &c.digest);
            if chunks.len() > 1 && small && !needed.iter().all(cached) {
                // Sized for a slow link until a large read has measured this one.
                let rate = blob.transfer_rate().unwrap_or(SLOW_LINK_BYTES_PER_SEC);
                let window = latency_window(&chunks[last..], latency, rate, |c| !cached(c));
                tracing::debug!(?latency, rate, chunks = window.len(), "page fault window");
                wanted.extend(window);
            }
        }
        let mut pieces = Vec::with_capacity(needed.len());
        for (c, data) in needed
            .iter()
            .zip(self.cache.get_many(blob.as_ref(), &wanted))
        {
            let data = match data {
                Ok(d) => d,
                Err(e) => {
                    tracing::error!(
                        layer,
                        offset = c.compressed_offset,
                        "chunk read failed: {e}"
                    );
                    return fail(reply, e.0);
                }
            };
            // Offsets in the decoded frame: a batched file's bytes start inside it.
            let base = c.data_offset as usize;
            let from = base + offset.saturating_sub(c.file_offset) as usize;
            let to = base + ((end - c.file_offset) as usize).min(c.data_len as usize);
            if to > data.len() {
                return fail(reply, "chunk shorter than its TOC record".into());
            }
            pieces.push((data, from, to));
        }
        // A read that reaches the second half of its last chunk is likely sequential: warm the
        // next few chunks so every core decodes while the reader consumes. Not for a page
        // fault in a small chunk (an executable's, paged in here and there by `exec`): a
        // sequential reader's reads that small would be the kernel's smallest readahead.
        let sequential = pieces.last().is_some_and(|(d, _, to)| to * 2 >= d.len())
            && (end - offset >= SEQUENTIAL_READ
                || needed
                    .last()
                    .is_some_and(|c| c.uncompressed_len > SEQUENTIAL_READ as u32));
        match pieces.as_slice() {
            [(d, from, to)] => reply.data(&d[*from..*to]),
            _ => {
                let mut out = Vec::with_capacity((end - offset) as usize);
                for (d, from, to) in &pieces {
                    out.extend_from_slice(&d[*from..*to]);
                }
                reply.data(&out);
            }
        }
        // A passthrough copy of this file is being written: what was just decoded goes in.
        if let Some(b) = copy {
            for (k, (c, (d, _, _))) in needed.iter().zip(&pieces).enumerate() {
                if let Err(e) = b.put(first + k, c, d) {
                    tracing::warn!("cannot write to a passthrough copy: {e}");
                }
            }
        }
        if !sequential {
            return None;
        }
        let next: Vec<Chunk> = chunks
            .iter()
            .skip(last)
            .take(READAHEAD_CHUNKS)
            .filter(|c| !self.cache.contains(&c.digest))
            .copied()
            .collect();
        (!next.is_empty()).then_some((layer, next))
    }
}

impl StrataFs {
    pub fn new(tree: Tree, blobs: Vec<Arc<dyn BlobSource>>, config: &MountConfig) -> Self {
        let (tx, rx) = sync_channel(64);
        let (mtx, mrx) = sync_channel(1024);
        let (rtx, rrx) = crossbeam_channel::unbounded();
        let pool = config
            .pool
            .clone()
            .unwrap_or_else(|| ChunkPool::new(config.memory_cache, config.disk_cache.clone()));
        StrataFs {
            shared: Arc::new(Shared {
                blob_order: blob_order(&tree, &blobs),
                neighbour_fetch: config.neighbour_fetch,
                sequences: Mutex::new(Vec::new()),
                prefetched: std::sync::atomic::AtomicBool::new(false),
                profile_chunks: std::sync::atomic::AtomicU64::new(0),
                tree,
                blobs,
                cache: ChunkCache::with_pool(pool, config.cache_local),
                ops: OpStats::default(),
            }),
            reads: rtx,
            reads_rx: Mutex::new(Some(rrx)),
            fetch_threads: config.fetch_threads.max(1),
            prefetch: tx,
            prefetch_rx: Mutex::new(Some(rx)),
            readahead_threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
            no_open: false,
            no_opendir: false,
            background_prefetch: config.background_prefetch,
            profile: config.profile.clone(),
            recorder: config.record_profile.clone().map(|path| Recorder {
                path,
                seen: Mutex::new(Default::default()),
            }),
            passthrough: config
                .passthrough
                .clone()
                .map(|files| Arc::new(Passthrough::new(files))),
            materialize: mtx,
            materialize_rx: Mutex::new(Some(mrx)),
        }
    }

    /// Writes out whole, one at a time, the files queued by opens in passthrough mode.
    fn start_materializer(&self) {
        let (Some(rx), Some(pt)) = (self.materialize_rx.lock().take(), self.passthrough.clone())
        else {
            return;
        };
        let shared = Arc::downgrade(&self.shared);
        let _ = std::thread::Builder::new()
            .name("strata-materialize".into())
            .spawn(move || {
                let mut queue: std::collections::VecDeque<Ino> = Default::default();
                loop {
                    if queue.is_empty() {
                        match rx.recv() {
                            Ok(ino) => queue.push_back(ino),
                            Err(_) => break,
                        }
                    }
                    queue.extend(rx.try_iter());
                    let Some(s) = shared.upgrade() else { break };
                    // A copy is finished once nothing has its file open (until then, chunks
                    // decoded for readers go into it as they are served) and no reader is
                    // waiting on a fetch: the first reader never competes with it.
                    let ready = (!s.cache.busy())
                        .then(|| queue.iter().position(|&i| !pt.is_open(i)))
                        .flatten();
                    let Some(ino) = ready.and_then(|at| queue.remove(at)) else {
                        drop(s);
                        std::thread::sleep(Duration::from_millis(50));
                        continue;
                    };
                    let Some(b) = pt.building(ino) else { continue };
                    let started = std::time::Instant::now();
                    let result = match s.tree.get(ino).and_then(|n| s.chunks(n)) {
                        Some((layer, chunks)) => match s.blobs.get(layer as usize) {
                            Some(src) => passthrough::materialize(
                                &s.cache,
                                src.as_ref(),
                                chunks,
                                &b,
                                &pt.files,
                            ),
                            None => Err(std::io::Error::other("layer missing")),
                        },
                        None => Err(std::io::Error::other("file has no data")),
                    };
                    match result {
                        Ok(()) => tracing::debug!(
                            ino,
                            "file written for passthrough in {:.2}s",
                            started.elapsed().as_secs_f64()
                        ),
                        Err(e) => tracing::warn!(ino, "cannot write file for passthrough: {e}"),
                    }
                    pt.finish(ino);
                }
            });
    }

    /// Opens `ino` in passthrough mode: with its whole-file copy as the backing file when one
    /// is ready and the inode is not open through the page cache; otherwise through the page
    /// cache, queueing the copy to be written.
    fn open_passthrough(&self, pt: &Passthrough, ino: Ino, n: &Node, reply: ReplyOpen) {
        // Reads of passthrough opens never reach the daemon: record the file at open.
        if let Some(r) = &self.recorder {
            r.note_whole(ino);
        }
        let Some((_, chunks)) = self.shared.chunks(n) else {
            return reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE);
        };
        // Reply with `id` as a passthrough open, or through the page cache without one.
        let answer = |reply: ReplyOpen, id: Option<&fuser::BackingId>| match id {
            Some(id) => {
                pt.served();
                reply.opened_passthrough(FileHandle(FH_BACKED), FopenFlags::empty(), id)
            }
            None => reply.opened(FileHandle(FH_CACHED), FopenFlags::FOPEN_KEEP_CACHE),
        };
        let key = pt.key(ino, n.size, chunks);
        match pt.plan(ino, &key, n.size) {
            OpenPlan::Reuse => pt.with_backing(ino, |id| answer(reply, id)),
            OpenPlan::Cached => {
                if pt.usable() && pt.start_copy(ino, key, n.size, chunks.len()).is_some() {
                    if let Err(e) = self.materialize.try_send(ino) {
                        tracing::debug!("passthrough queue full or gone: {e}");
                        pt.finish(ino);
                    }
                }
                answer(reply, None)
            }
            OpenPlan::Backing(_) if !pt.usable() => pt.add_fallback(ino, |id| answer(reply, id)),
            OpenPlan::Backing(file) => match reply.open_backing(&file) {
                Ok(id) => pt.add_backing(ino, id, |id| answer(reply, id)),
                Err(e) => {
                    // Refusals that will not change stop passthrough for this mount; others
                    // (out of memory or descriptors) only for this open.
                    let lasting = [Errno::EPERM, Errno::EOPNOTSUPP, Errno::ELOOP, Errno::ENOTTY]
                        .iter()
                        .any(|&code| e.raw_os_error() == Some(code.code()));
                    tracing::warn!(ino, "the kernel refused a passthrough backing file: {e}");
                    if lasting {
                        tracing::warn!("serving this mount's files through the daemon");
                        pt.refuse();
                    }
                    pt.add_fallback(ino, |id| answer(reply, id))
                }
            },
        }
    }

    /// Threads that serve reads whose chunks must be fetched (disk cache or blob).
    fn start_fetchers(&self) {
        let Some(rx) = self.reads_rx.lock().take() else {
            return;
        };
        for i in 0..self.fetch_threads {
            let shared = Arc::downgrade(&self.shared);
            let rx = rx.clone();
            let prefetch = self.prefetch.clone();
            let passthrough = self.passthrough.clone();
            let _ = std::thread::Builder::new()
                .name(format!("strata-fetch-{i}"))
                .spawn(move || {
                    while let Ok(p) = rx.recv() {
                        let Some(s) = shared.upgrade() else { break };
                        shielded("read", || {
                            let Ok(n) = s.node(INodeNo(p.ino)) else {
                                return p.reply.error(FsError::NotFound.errno());
                            };
                            let copy = passthrough.as_ref().and_then(|pt| pt.building(p.ino));
                            if let Some(next) =
                                s.read(n, p.offset, p.size, p.reply, copy.as_deref())
                            {
                                let _ = prefetch.try_send(next);
                            }
                            s.ops.record(Op::Read, p.started.elapsed());
                        });
                    }
                });
        }
    }

    fn start_prefetcher(&self) {
        let Some(rx) = self.prefetch_rx.lock().take() else {
            return;
        };
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..self.readahead_threads {
            let shared = Arc::downgrade(&self.shared);
            let rx = rx.clone();
            let _ = std::thread::Builder::new()
                .name(format!("strata-readahead-{i}"))
                .spawn(move || loop {
                    let next = rx.lock().recv();
                    let Ok((layer, chunks)) = next else { break };
                    let Some(s) = shared.upgrade() else { break };
                    if let Some(b) = s.blobs.get(layer as usize) {
                        s.cache.prefetch(b.as_ref(), &chunks);
                    }
                });
        }
    }

    /// Where served chunks came from so far.
    pub fn fetch_stats(&self) -> FetchStats {
        self.shared.cache.stats()
    }

    /// A handle for reading the counters while the session runs.
    pub fn stats_handle(&self) -> StatsHandle {
        StatsHandle(Arc::downgrade(&self.shared), self.passthrough.clone())
    }

    fn reply_entry(&self, ino: Ino, reply: ReplyEntry) {
        match self.shared.tree.get(ino) {
            Some(n) => reply.entry(&TTL, &attr(ino, n), Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }
}

impl Filesystem for StrataFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let wanted = InitFlags::FUSE_DO_READDIRPLUS
            | InitFlags::FUSE_READDIRPLUS_AUTO
            | InitFlags::FUSE_PARALLEL_DIROPS
            | InitFlags::FUSE_CACHE_SYMLINKS
            | InitFlags::FUSE_NO_OPEN_SUPPORT
            | InitFlags::FUSE_NO_OPENDIR_SUPPORT;
        let offered = config.capabilities();
        let _ = config.add_capabilities(wanted & offered);
        // With these, answering ENOSYS to open/opendir stops the kernel sending them at all and
        // it keeps page and directory caches across opens (the immutable-layer case).
        self.no_open = offered.contains(InitFlags::FUSE_NO_OPEN_SUPPORT);
        if self.passthrough.is_some() {
            if offered.contains(InitFlags::FUSE_PASSTHROUGH)
                && config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
                && config.set_max_stack_depth(1).is_ok()
            {
                // Opens must reach the daemon to hand out backing files.
                self.no_open = false;
                self.start_materializer();
            } else {
                tracing::warn!("the kernel does not offer FUSE passthrough; serving without it");
                self.passthrough = None;
            }
        }
        self.no_opendir = offered.contains(InitFlags::FUSE_NO_OPENDIR_SUPPORT);
        let _ = config.set_max_readahead(1 << 20);
        self.start_prefetcher();
        self.start_fetchers();
        if self.background_prefetch || !self.profile.is_empty() {
            // The workload's first reads come right after the mount: prefetch waits for them
            // (the profile's part does not: it is what they are about to read).
            self.shared.cache.pool().note_demand();
            start_background_prefetch(
                Arc::downgrade(&self.shared),
                std::mem::take(&mut self.profile),
                self.background_prefetch,
            );
        }
        Ok(())
    }

    fn destroy(&mut self) {
        if let Some(r) = &self.recorder {
            match r.save(&self.shared.tree) {
                Ok(()) => tracing::info!(path = %r.path.display(), "access profile written"),
                Err(e) => {
                    tracing::error!(path = %r.path.display(), "cannot write the access profile: {e}")
                }
            }
        }
        let s = self.shared.cache.stats();
        tracing::info!(
            memory_hits = s.memory_hits,
            disk_hits = s.disk_hits,
            source_chunks = s.source_chunks,
            source_reads = s.source_reads,
            source_bytes = s.source_bytes,
            failures = s.failures,
            "unmounted"
        );
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let started = std::time::Instant::now();
        shielded("lookup", || match self.shared.tree.get(parent.0) {
            Some(p) if p.kind != EntryKind::Directory => reply.error(FsError::NotDir.errno()),
            Some(_) => match self.shared.tree.lookup(parent.0, name.as_bytes()) {
                Some(ino) => self.reply_entry(ino, reply),
                // The image never changes: the kernel may remember the name is absent (a
                // writable view over the mount asks for absent names on every create).
                None => reply.entry(&TTL, &negative_attr(), Generation(0)),
            },
            None => reply.error(FsError::NotFound.errno()),
        });
        self.shared.ops.record(Op::Lookup, started.elapsed());
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let started = std::time::Instant::now();
        shielded("getattr", || match self.shared.node(ino) {
            Ok(n) => reply.attr(&TTL, &attr(ino.0, n)),
            Err(e) => reply.error(e.errno()),
        });
        self.shared.ops.record(Op::Getattr, started.elapsed());
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let started = std::time::Instant::now();
        shielded("readlink", || match self.shared.node(ino) {
            Ok(n) if n.kind == EntryKind::Symlink => reply.data(&n.link),
            Ok(_) => reply.error(FsError::Invalid.errno()),
            Err(e) => reply.error(e.errno()),
        });
        self.shared.ops.record(Op::Readlink, started.elapsed());
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let started = std::time::Instant::now();
        shielded("open", || {
            if flags.acc_mode() != OpenAccMode::O_RDONLY {
                return reply.error(FsError::ReadOnly.errno());
            }
            match self.shared.node(ino) {
                Ok(_) if self.no_open => reply.error(Errno::ENOSYS),
                Ok(n) => match &self.passthrough {
                    Some(pt) if n.size >= passthrough::MIN_SIZE && n.data.is_some() => {
                        self.open_passthrough(pt, ino.0, n, reply)
                    }
                    _ => reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE),
                },
                Err(e) => reply.error(e.errno()),
            }
        });
        self.shared.ops.record(Op::Open, started.elapsed());
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: fuser::ReplyEmpty,
    ) {
        shielded("release", || {
            if let (Some(pt), FH_CACHED | FH_BACKED) = (&self.passthrough, fh.0) {
                pt.release(ino.0);
            }
            reply.ok();
        });
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let started = std::time::Instant::now();
        let n = match self.shared.node(ino) {
            Ok(n) => n,
            Err(e) => return reply.error(e.errno()),
        };
        if let Some(r) = &self.recorder {
            r.note_read(ino.0, offset, size, n.size);
        }
        // A read whose chunks are all in memory is answered here; any other waits for its
        // fetch on a fetch thread, so this worker stays free for lookups and attributes.
        if !self.shared.in_memory(n, offset, size) {
            let pending = PendingRead {
                ino: ino.0,
                offset,
                size,
                reply,
                started,
            };
            if let Err(e) = self.reads.send(pending) {
                e.into_inner()
                    .reply
                    .error(FsError::Io("no fetch threads".into()).errno());
            }
            return;
        }
        shielded("read", || {
            let copy = self.passthrough.as_ref().and_then(|pt| pt.building(ino.0));
            if let Some(next) = self.shared.read(n, offset, size, reply, copy.as_deref()) {
                if let Err(TrySendError::Disconnected(_)) = self.prefetch.try_send(next) {
                    tracing::debug!("readahead workers gone");
                }
            }
        });
        self.shared.ops.record(Op::Read, started.elapsed());
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock: LockOwner,
        reply: fuser::ReplyEmpty,
    ) {
        // Nothing to flush on a read-only filesystem; ENOSYS tells the kernel to stop asking.
        reply.error(Errno::ENOSYS);
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        shielded("opendir", || match self.shared.node(ino) {
            Ok(n) if n.kind == EntryKind::Directory && self.no_opendir => {
                reply.error(Errno::ENOSYS)
            }
            Ok(n) if n.kind == EntryKind::Directory => reply.opened(
                FileHandle(0),
                FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_CACHE_DIR,
            ),
            Ok(_) => reply.error(FsError::NotDir.errno()),
            Err(e) => reply.error(e.errno()),
        });
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let started = std::time::Instant::now();
        shielded("readdir", || {
            let n = match self.shared.node(ino) {
                Ok(n) => n,
                Err(e) => return reply.error(e.errno()),
            };
            for (next, name, cino) in dir_entries(ino.0, n, offset) {
                let kind = self
                    .shared
                    .tree
                    .get(cino)
                    .map_or(FileType::Directory, |c| file_type(c.kind));
                if reply.add(INodeNo(cino), next, kind, OsStr::from_bytes(name)) {
                    break;
                }
            }
            reply.ok();
        });
        self.shared.ops.record(Op::Readdir, started.elapsed());
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let started = std::time::Instant::now();
        shielded("readdir", || {
            let n = match self.shared.node(ino) {
                Ok(n) => n,
                Err(e) => return reply.error(e.errno()),
            };
            for (next, name, cino) in dir_entries(ino.0, n, offset) {
                let Some(child) = self.shared.tree.get(cino) else {
                    continue;
                };
                if reply.add(
                    INodeNo(cino),
                    next,
                    OsStr::from_bytes(name),
                    &TTL,
                    &attr(cino, child),
                    Generation(0),
                ) {
                    break;
                }
            }
            reply.ok();
        });
        self.shared.ops.record(Op::Readdir, started.elapsed());
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        shielded("statfs", || {
            let bytes: u64 = self
                .shared
                .tree
                .layers
                .iter()
                .map(|t| t.uncompressed_bytes())
                .sum();
            let files = self.shared.tree.len() as u64;
            reply.statfs(bytes.div_ceil(4096), 0, 0, files, 0, 4096, 255, 4096);
        });
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let started = std::time::Instant::now();
        shielded("getxattr", || {
            let n = match self.shared.node(ino) {
                Ok(n) => n,
                Err(e) => return reply.error(e.errno()),
            };
            match visible_xattrs(n).find(|(k, _)| *k == name.as_bytes()) {
                None => reply.error(FsError::NoAttr.errno()),
                Some((_, v)) if size == 0 => reply.size(v.len() as u32),
                Some((_, v)) if v.len() > size as usize => reply.error(FsError::Range.errno()),
                Some((_, v)) => reply.data(v),
            }
        });
        self.shared.ops.record(Op::Getxattr, started.elapsed());
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let started = std::time::Instant::now();
        shielded("getxattr", || {
            let n = match self.shared.node(ino) {
                Ok(n) => n,
                Err(e) => return reply.error(e.errno()),
            };
            let mut list = Vec::new();
            for (k, _) in visible_xattrs(n) {
                list.extend_from_slice(k);
                list.push(0);
            }
            if size == 0 {
                reply.size(list.len() as u32);
            } else if list.len() > size as usize {
                reply.error(FsError::Range.errno());
            } else {
                reply.data(&list);
            }
        });
        self.shared.ops.record(Op::Getxattr, started.elapsed());
    }
}

/// A node's extended attributes as the mount shows them: the image's own, without overlayfs's,
/// plus `trusted.overlay.opaque=y` on an opaque directory of a layer shown alone.
fn visible_xattrs(n: &Node) -> impl Iterator<Item = (&[u8], &[u8])> {
    n.xattrs
        .iter()
        .filter(|(k, _)| !is_overlay_xattr(k))
        .map(|(k, v)| (k.as_slice(), v.as_slice()))
        .chain(
            n.opaque
                .then_some((&b"trusted.overlay.opaque"[..], &b"y"[..])),
        )
}

/// overlayfs's own attributes (`trusted.overlay.*`, `user.overlay.*`) and the FUSE writable
/// layer's record of owners (`user.strata.owner`) are never passed through
/// from image content: an image could otherwise forge whiteouts, redirects or metacopy origins
/// for an overlay mounted over this filesystem. They read as absent.
fn is_overlay_xattr(name: &[u8]) -> bool {
    name.starts_with(b"trusted.overlay.")
        || name.starts_with(b"user.overlay.")
        || name == crate::fuse_upper::OWNER_XATTR.as_bytes()
}

/// A directory's entries from `offset` on, as (offset of the next entry, name, inode):
/// `.` and `..` first, then the children in name order.
fn dir_entries(ino: Ino, n: &Node, offset: u64) -> impl Iterator<Item = (u64, &[u8], Ino)> {
    let offset = offset as usize;
    let dots = [(&b"."[..], ino), (&b".."[..], n.parent)];
    // Index straight into the sorted children: a large directory is listed in many calls.
    let first_child = offset.saturating_sub(2).min(n.children.len());
    dots.into_iter()
        .enumerate()
        .skip(offset)
        .chain(
            n.children[first_child..]
                .iter()
                .enumerate()
                .map(move |(k, (name, c))| (first_child + k + 2, (name.as_ref(), *c))),
        )
        .map(|(i, (name, c))| (i as u64 + 1, name, c))
}

/// Each remote layer's chunks sorted by their place in the blob (empty for local layers).
fn blob_order(tree: &Tree, blobs: &[Arc<dyn BlobSource>]) -> Vec<Vec<Chunk>> {
    tree.layers
        .iter()
        .zip(blobs)
        .map(|(toc, blob)| {
            if blob.is_local() {
                return Vec::new();
            }
            // Small files only: one chunk, at most SMALL_CHUNK bytes.
            let mut v: Vec<Chunk> = toc
                .entries
                .iter()
                .filter_map(|e| match e.chunks.as_slice() {
                    [c] if c.uncompressed_len <= SMALL_CHUNK => Some(*c),
                    _ => None,
                })
                .collect();
            v.sort_by_key(|c| c.compressed_offset);
            // The files of a batch share one frame: it is fetched once.
            v.dedup_by_key(|c| c.compressed_offset);
            v
        })
        .collect()
}

/// Mounts `fs` read-only at `mountpoint`; returns the session, ready to run.
pub fn mount_session(
    fs: StrataFs,
    mountpoint: &Path,
    config: &MountConfig,
) -> std::io::Result<fuser::Session<StrataFs>> {
    let mut cfg = Config::default();
    cfg.mount_options = vec![
        MountOption::FSName(config.fsname.clone()),
        MountOption::Subtype("strata".into()),
        MountOption::RO,
        MountOption::DefaultPermissions,
        MountOption::NoAtime,
    ];
    if !config.setuid {
        cfg.mount_options.push(MountOption::NoDev);
        cfg.mount_options.push(MountOption::NoSuid);
    } else {
        cfg.mount_options.push(MountOption::Suid);
        cfg.mount_options.push(MountOption::Dev);
    }
    // Other users (root included) may use the mount when root made it; an ordinary user's
    // mount (through fusermount3, which refuses allow_other unless /etc/fuse.conf has
    // user_allow_other) is that user's alone, as FUSE mounts of ordinary users are.
    cfg.acl = if nix::unistd::geteuid().is_root() {
        SessionACL::All
    } else {
        // mount(2) is refused (EPERM): fuser falls back to the setuid fusermount3.
        SessionACL::Owner
    };
    cfg.n_threads = Some(config.threads.max(1));
    cfg.clone_fd = true;
    fuser::Session::new(fs, mountpoint, &cfg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::Sha256Digest;

    /// A chunk of 32 KiB at file offset `i` × 32 KiB, `clen` bytes in the blob.
    pub(super) fn chunk(i: u64, clen: u32) -> Chunk {
        Chunk::whole(
            1000 + i * u64::from(clen),
            clen,
            32 << 10,
            i * (32 << 10),
            Sha256Digest::of(&i.to_le_bytes()),
        )
    }

    #[test]
    fn latency_windows_grow_with_the_price_of_a_request() {
        let chunks: Vec<Chunk> = (0..400).map(|i| chunk(i, 16_000)).collect();
        let all = |_: &Chunk| true;
        let slow = SLOW_LINK_BYTES_PER_SEC;
        let ms = Duration::from_millis;
        // A registry a few ms away on a slow link: each fault fetches its own chunk only.
        assert!(latency_window(&chunks, ms(3), slow, all).is_empty());
        // 50 ms away: what 20 Mbit/s moves in 50 ms (125 kB), whole chunks.
        assert_eq!(latency_window(&chunks, ms(50), slow, all).len(), 7);
        // A fast link, measured: more for the same latency.
        assert_eq!(latency_window(&chunks, ms(3), 100_000_000, all).len(), 18);
        // Far away: capped at 3 MiB.
        let far = latency_window(&chunks, Duration::from_secs(10), slow, all);
        assert_eq!(far.len(), (MAX_LATENCY_WINDOW / 16_000) as usize);
        // One range read: it stops at the first chunk that is cached already.
        let gap = |c: &Chunk| c.file_offset != 3 * (32 << 10);
        assert_eq!(latency_window(&chunks, ms(50), slow, gap).len(), 3);
    }
}
