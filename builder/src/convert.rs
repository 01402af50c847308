//! Converting OCI/Docker images (tar, tar+gzip, tar+zstd layers) into strata layers.
//!
//! A layer streams through three stages so memory does not grow with layer size and both cores
//! work: the calling thread decompresses and walks the source tar, a pool of workers compresses
//! and hashes chunks, and a writer thread puts finished frames into the blob in order. A fixed
//! number of in-flight items bounds memory.

use std::collections::BTreeMap;
use std::io::{self, BufRead, BufReader, BufWriter, Read, Write};

use sha2::{Digest as _, Sha256};
use strata_fs::format::writer::{Batch, FrameCompressor};
use strata_fs::format::{self, Entry, EntryKind, LayerSummary, LayerWriter, Sha256Digest};
use strata_fs::oci::{self, Descriptor, Manifest};
use strata_fs::reference::Reference;
use strata_fs::store::Store;

use crate::source::{SourceImage, SourceLayer};
use crate::BuildError;

/// Conversion settings.
#[derive(Clone, Debug)]
pub struct ConvertOptions {
    pub chunk_size: u32,
    /// Chunk size of executables (regular files with an execute bit that start with the ELF
    /// magic), when smaller than `chunk_size`; 0 = `chunk_size`. `exec` touches a few scattered
    /// pages of a binary (the loader, start-up code, the data it relocates): small chunks let a
    /// lazy start fetch those pages rather than the whole binary.
    pub exec_chunk_size: u32,
    pub level: i32,
    /// Compression workers; 0 = one per core.
    pub threads: usize,
    /// Hash the source tar (its diff ID, checked against the image config's). A layer made
    /// here (commit) has no config to check and skips that pass over its bytes.
    pub hash_source: bool,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            chunk_size: format::DEFAULT_CHUNK_SIZE,
            exec_chunk_size: DEFAULT_EXEC_CHUNK_SIZE,
            level: 3,
            threads: 0,
            hash_source: true,
        }
    }
}

/// Chunk size of executables by default (see [`ConvertOptions::exec_chunk_size`]): a static
/// busybox's `exec` touches 71 of its 484 pages, in 29 of its 61 32 KiB pieces (0.50 MB of
/// 1.08 MB compressed); smaller pieces save bytes but cost a request each (docs/format.md §7).
pub const DEFAULT_EXEC_CHUNK_SIZE: u32 = 32 << 10;

/// Executables larger than this keep the layer's chunk size: every lazy mount fetches the
/// TOC first, and small chunks cost a chunk record (about 1 KB of TOC per MiB) each.
pub const MAX_EXEC_SMALL_CHUNKED: u64 = 64 << 20;

/// The ELF magic an executable's chunking is chosen by.
const ELF_MAGIC: &[u8] = b"\x7fELF";

/// Compression of a source layer, detected from its first bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    pub fn detect(head: &[u8]) -> Self {
        if head.starts_with(&[0x1f, 0x8b]) {
            Compression::Gzip
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Compression::Zstd
        } else {
            Compression::None
        }
    }
}

/// A reader that hashes what passes through it.
struct Hashing<R> {
    inner: R,
    /// `None` when another stage already hashes the same bytes.
    hasher: Option<Sha256>,
    count: u64,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(h) = &mut self.hasher {
            h.update(&buf[..n]);
        }
        self.count += n as u64;
        Ok(n)
    }
}

impl<R> Hashing<R> {
    fn new(inner: R) -> Self {
        Hashing {
            inner,
            hasher: Some(Sha256::new()),
            count: 0,
        }
    }
    fn digest(&self) -> Option<String> {
        let h = self.hasher.clone()?;
        Some(Sha256Digest(h.finalize().into()).oci())
    }
}

enum Work {
    Entry(Entry),
    Chunk(Vec<u8>),
    /// Small files sharing one frame.
    Batch(Batch),
}

enum Done {
    Entry(Entry),
    Chunk {
        frame: Vec<u8>,
        raw: Vec<u8>,
        digest: Sha256Digest,
    },
    Batch {
        batch: Batch,
        frame: Vec<u8>,
        digest: Sha256Digest,
    },
}

/// What converting one layer produced.
#[derive(Debug)]
pub struct ConvertedLayer {
    pub summary: LayerSummary,
    /// sha256 of the source's uncompressed tar (checked against the config's diff ID).
    pub source_diff_id: String,
    /// sha256 of the source's stored bytes.
    pub source_digest: String,
}

/// Converts one source layer stream into a strata layer written to `out`.
pub fn convert_layer<W: Write + Send>(
    input: impl Read,
    out: W,
    opts: &ConvertOptions,
) -> Result<(W, ConvertedLayer), BuildError> {
    let mut stored = Hashing::new(BufReader::with_capacity(1 << 20, input));
    let compression = Compression::detect(stored.inner.fill_buf().map_err(BuildError::Read)?);
    if compression == Compression::None {
        // The stored bytes are the tar stream, which is hashed below anyway.
        stored.hasher = None;
    }
    let decoded: Box<dyn Read + '_> = match compression {
        Compression::None => Box::new(&mut stored),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(&mut stored)),
        Compression::Zstd => {
            Box::new(zstd::stream::read::Decoder::new(&mut stored).map_err(BuildError::Read)?)
        }
    };
    let mut tar_stream = Hashing::new(decoded);
    if !opts.hash_source {
        tar_stream.hasher = None;
    }
    let threads = if opts.threads == 0 {
        std::thread::available_parallelism().map_or(2, |n| n.get())
    } else {
        opts.threads
    };
    let in_flight = threads * 8;
    let (work_tx, work_rx) = crossbeam_channel::bounded::<(u64, Work)>(in_flight);
    let (done_tx, done_rx) =
        crossbeam_channel::bounded::<(u64, Result<Done, BuildError>)>(in_flight);
    let (token_tx, token_rx) = crossbeam_channel::bounded::<()>(in_flight);
    for _ in 0..in_flight {
        let _ = token_tx.send(());
    }
    // Chunk buffers go back to the reader once written: fresh 1 MiB allocations are fresh
    // pages from the kernel, faulted in and zeroed each time.
    let (recycle_tx, recycle_rx) = crossbeam_channel::bounded::<Vec<u8>>(in_flight);
    let writer = LayerWriter::new(
        BufWriter::with_capacity(1 << 20, out),
        opts.chunk_size,
        opts.level,
    )?;
    let batching = writer.batches();

    let result = std::thread::scope(|s| {
        for _ in 0..threads {
            let work_rx = work_rx.clone();
            let done_tx = done_tx.clone();
            let level = opts.level;
            s.spawn(move || {
                let mut compressor = match FrameCompressor::new(level) {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = done_tx.send((0, Err(e.into())));
                        return;
                    }
                };
                for (seq, work) in work_rx {
                    let done = match work {
                        Work::Entry(e) => Ok(Done::Entry(e)),
                        Work::Chunk(raw) => compressor
                            .compress(&raw)
                            .map(|frame| Done::Chunk {
                                frame,
                                digest: Sha256Digest::of(&raw),
                                raw,
                            })
                            .map_err(BuildError::from),
                        Work::Batch(batch) => compressor
                            .compress(batch.content())
                            .map(|frame| Done::Batch {
                                frame,
                                digest: Sha256Digest::of(batch.content()),
                                batch,
                            })
                            .map_err(BuildError::from),
                    };
                    if done_tx.send((seq, done)).is_err() {
                        return;
                    }
                }
            });
        }
        drop(done_tx);
        drop(work_rx);

        // The writer holds the only token sender: if it stops (a full disk), the reader's
        // wait for a token ends instead of blocking forever.
        let token_tx = token_tx;
        let writer_thread = s.spawn(move || -> Result<(W, LayerSummary), BuildError> {
            let mut writer = writer;
            let mut next = 0u64;
            let mut pending: BTreeMap<u64, Done> = BTreeMap::new();
            for (seq, done) in done_rx {
                pending.insert(seq, done?);
                while let Some(done) = pending.remove(&next) {
                    match done {
                        Done::Entry(e) => writer.add_entry(e)?,
                        Done::Chunk { frame, raw, digest } => {
                            writer.add_chunk(&frame, &raw, digest)?;
                            let _ = recycle_tx.try_send(raw);
                        }
                        Done::Batch {
                            batch,
                            frame,
                            digest,
                        } => writer.add_batch(batch, &frame, digest)?,
                    }
                    next += 1;
                    let _ = token_tx.send(());
                }
            }
            if !pending.is_empty() {
                return Err(BuildError::Source(
                    "conversion pipeline stopped early".into(),
                ));
            }
            let (out, summary) = writer.finish()?;
            let out = out
                .into_inner()
                .map_err(|e| BuildError::Write(e.into_error()))?;
            Ok((out, summary))
        });

        let read_result = (|| -> Result<(), BuildError> {
            let mut seq = 0u64;
            let mut send = |work: Work| -> Result<(), BuildError> {
                token_rx
                    .recv()
                    .map_err(|_| BuildError::Pipeline("writer stopped"))?;
                work_tx
                    .send((seq, work))
                    .map_err(|_| BuildError::Pipeline("workers stopped"))?;
                seq += 1;
                Ok(())
            };
            // Small files go into batches that share one frame (and one chunk record).
            let mut batch = Batch::new();
            let mut archive = tar::Archive::new(&mut tar_stream);
            for item in archive.entries().map_err(BuildError::Read)? {
                let mut item = item.map_err(|e| BuildError::Layer(format!("reading tar: {e}")))?;
                let Some(entry) = entry_from_tar(&mut item)? else {
                    continue;
                };
                if batching && Batch::fits(&entry) {
                    let mut data = vec![0u8; entry.size as usize];
                    item.read_exact(&mut data).map_err(|e| {
                        BuildError::Layer(format!("reading file data: {e} (truncated layer?)"))
                    })?;
                    if let Some(entry) = batch.push(entry, &data)? {
                        // Its headers would make the frame too large: it opens the next batch.
                        send(Work::Batch(std::mem::take(&mut batch)))?;
                        if batch.push(entry, &data)?.is_some() {
                            return Err(BuildError::Pipeline("an empty batch refused a file"));
                        }
                    }
                    if batch.is_full() {
                        send(Work::Batch(std::mem::take(&mut batch)))?;
                    }
                    continue;
                }
                if !batch.is_empty() {
                    send(Work::Batch(std::mem::take(&mut batch)))?;
                }
                let size = entry.size;
                let mode = entry.mode;
                let is_file = entry.kind == EntryKind::Regular;
                send(Work::Entry(entry))?;
                if is_file {
                    // An executable's first piece decides its chunking: small chunks only
                    // for ELF binaries (a script is read through, not paged in).
                    let exec = opts.exec_chunk_size > 0
                        && opts.exec_chunk_size < opts.chunk_size
                        && mode & 0o111 != 0
                        && size > u64::from(opts.exec_chunk_size)
                        && size <= MAX_EXEC_SMALL_CHUNKED;
                    let mut piece = if exec {
                        opts.exec_chunk_size
                    } else {
                        opts.chunk_size
                    };
                    let mut first = true;
                    let mut left = size;
                    while left > 0 {
                        let n = left.min(u64::from(piece)) as usize;
                        let mut buf = recycle_rx.try_recv().unwrap_or_default();
                        buf.clear();
                        buf.resize(n, 0);
                        item.read_exact(&mut buf).map_err(|e| {
                            BuildError::Layer(format!("reading file data: {e} (truncated layer?)"))
                        })?;
                        if exec && first && !buf.starts_with(ELF_MAGIC) {
                            piece = opts.chunk_size;
                        }
                        first = false;
                        send(Work::Chunk(buf))?;
                        left -= n as u64;
                    }
                }
            }
            if !batch.is_empty() {
                send(Work::Batch(batch))?;
            }
            // Drain the rest (trailing zero blocks, padding) so the digests cover every byte.
            io::copy(&mut tar_stream, &mut io::sink()).map_err(BuildError::Read)?;
            Ok(())
        })();
        drop(work_tx);
        let summary = writer_thread
            .join()
            .map_err(|_| BuildError::Source("writer thread panicked".into()))?;
        // The first cause: a writer failure (no space left) stops the reader, which then only
        // sees the pipeline gone; a reader failure (a bad tar) stops the writer early.
        match (summary, read_result) {
            (Ok(s), Ok(())) => Ok(s),
            (Err(e), Err(BuildError::Pipeline(_))) | (Err(e @ BuildError::Io { .. }), _) => Err(e),
            (Err(e @ BuildError::Write(_)), _) | (Err(e @ BuildError::Format(_)), _) => Err(e),
            (_, Err(e)) => Err(e),
            (Err(e), Ok(())) => Err(e),
        }
    })?;
    let (out, summary) = result;
    let source_diff_id = tar_stream.digest().unwrap_or_default();
    drop(tar_stream);
    io::copy(&mut stored, &mut io::sink()).map_err(BuildError::Read)?;
    let source_digest = stored.digest().unwrap_or_else(|| source_diff_id.clone());
    Ok((
        out,
        ConvertedLayer {
            summary,
            source_diff_id,
            source_digest,
        },
    ))
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Parses a PAX decimal time (`1600000000.5`, `-1.25`) into seconds and nanoseconds.
fn parse_pax_time(v: &[u8]) -> Option<(i64, u32)> {
    let s = std::str::from_utf8(v).ok()?;
    let (neg, s) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    let sec: i64 = int.parse().ok()?;
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let mut digits: String = frac.chars().take(9).collect();
    while digits.len() < 9 {
        digits.push('0');
    }
    let nsec: u32 = digits.parse().ok()?;
    if !neg {
        return Some((sec, nsec));
    }
    if nsec == 0 {
        Some((-sec, 0))
    } else {
        Some((-sec - 1, 1_000_000_000 - nsec))
    }
}

/// Builds a TOC entry from a source tar entry; `None` for entries that carry no file.
fn entry_from_tar<R: Read>(item: &mut tar::Entry<'_, R>) -> Result<Option<Entry>, BuildError> {
    use tar::EntryType as T;
    let header = item.header().clone();
    let raw_path = item.path_bytes().into_owned();
    let path = format::normalize_path(&raw_path).map_err(|reason| BuildError::HostilePath {
        path: lossy(&raw_path),
        reason,
    })?;
    let shown = lossy(&raw_path);
    let bad =
        |what: &str, e: io::Error| BuildError::Layer(format!("entry {shown:?}: bad {what}: {e}"));
    let mut kind = match header.entry_type() {
        T::Regular | T::Continuous | T::GNUSparse => EntryKind::Regular,
        T::Link => EntryKind::Hardlink,
        T::Symlink => EntryKind::Symlink,
        T::Char => EntryKind::CharDevice,
        T::Block => EntryKind::BlockDevice,
        T::Directory => EntryKind::Directory,
        T::Fifo => EntryKind::Fifo,
        T::XGlobalHeader => return Ok(None),
        other => {
            return Err(BuildError::Layer(format!(
                "entry {shown:?}: unsupported tar entry type {:?}",
                other.as_byte() as char
            )))
        }
    };
    // Pre-POSIX tars mark directories only by a trailing slash.
    if kind == EntryKind::Regular && raw_path.ends_with(b"/") && item.size() == 0 {
        kind = EntryKind::Directory;
    }
    if path.is_empty() && kind != EntryKind::Directory {
        return Err(BuildError::HostilePath {
            path: shown,
            reason: "the layer root can only be a directory",
        });
    }
    let mut e = Entry::new(path, kind);
    e.mode = header.mode().map_err(|x| bad("mode", x))? & 0o7777;
    let id = |v: u64, what: &str| {
        u32::try_from(v)
            .map_err(|_| BuildError::Layer(format!("entry {shown:?}: {what} {v} too large")))
    };
    e.uid = id(header.uid().map_err(|x| bad("uid", x))?, "uid")?;
    e.gid = id(header.gid().map_err(|x| bad("gid", x))?, "gid")?;
    e.mtime_sec = header.mtime().map_err(|x| bad("mtime", x))? as i64;
    if kind == EntryKind::Regular {
        e.size = item.size();
    }
    match kind {
        EntryKind::Hardlink => {
            let target = item.link_name_bytes().unwrap_or_default().into_owned();
            let norm =
                format::normalize_path(&target).map_err(|reason| BuildError::HostilePath {
                    path: format!("{shown} (hard link to {})", lossy(&target)),
                    reason,
                })?;
            if norm.is_empty() {
                return Err(BuildError::Layer(format!(
                    "entry {shown:?}: hard link without a target"
                )));
            }
            e.link = norm;
        }
        EntryKind::Symlink => {
            let target = item.link_name_bytes().unwrap_or_default().into_owned();
            if target.is_empty() || target.contains(&0) {
                return Err(BuildError::Layer(format!(
                    "entry {shown:?}: symlink without a target"
                )));
            }
            e.link = target;
        }
        EntryKind::CharDevice | EntryKind::BlockDevice => {
            e.dev_major = header
                .device_major()
                .map_err(|x| bad("device", x))?
                .unwrap_or(0);
            e.dev_minor = header
                .device_minor()
                .map_err(|x| bad("device", x))?
                .unwrap_or(0);
        }
        _ => {}
    }
    if let Some(exts) = item.pax_extensions().map_err(|x| bad("PAX header", x))? {
        for ext in exts {
            let ext = ext.map_err(|x| bad("PAX record", x))?;
            let key = ext.key_bytes();
            let value = ext.value_bytes();
            let num = || {
                std::str::from_utf8(value)
                    .ok()
                    .and_then(|v| v.parse::<u64>().ok())
            };
            match key {
                b"uid" => e.uid = id(num().unwrap_or(u64::from(e.uid)), "uid")?,
                b"gid" => e.gid = id(num().unwrap_or(u64::from(e.gid)), "gid")?,
                b"mtime" => {
                    if let Some((s, ns)) = parse_pax_time(value) {
                        e.mtime_sec = s;
                        e.mtime_nsec = ns;
                    }
                }
                _ => {
                    if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                        if !name.is_empty() {
                            e.xattrs.push((name.to_vec(), value.to_vec()));
                        }
                    }
                }
            }
        }
    }
    Ok(Some(e))
}

/// Progress of an image conversion, for a progress display.
#[derive(Debug)]
pub enum Progress<'a> {
    LayerStart {
        index: usize,
        count: usize,
        size: u64,
    },
    LayerDone {
        index: usize,
        layer: &'a ConvertedLayer,
        digest: &'a str,
    },
}

/// The result of converting an image.
#[derive(Debug)]
pub struct ConvertReport {
    pub manifest: Descriptor,
    pub layers: Vec<ConvertedLayer>,
}

fn diff_ids(config: &serde_json::Value) -> Option<Vec<String>> {
    config
        .get("rootfs")?
        .get("diff_ids")?
        .as_array()?
        .iter()
        .map(|v| v.as_str().map(str::to_string))
        .collect()
}

/// The manifest descriptor of a strata layer: zstd tar media type plus the TOC annotations
/// (digest, offset, size) that let a reader open it with one range read.
pub fn layer_descriptor(digest: String, s: &LayerSummary) -> Descriptor {
    let mut d = Descriptor::new(oci::MEDIA_TYPE_LAYER_ZSTD, digest, s.blob_size);
    d.annotations.insert(
        format::ANNOTATION_TOC_DIGEST.into(),
        s.footer.toc_digest.oci(),
    );
    d.annotations.insert(
        format::ANNOTATION_TOC_OFFSET.into(),
        s.footer.toc_offset.to_string(),
    );
    d.annotations.insert(
        format::ANNOTATION_TOC_SIZE.into(),
        s.footer.toc_size.to_string(),
    );
    d
}

/// Converts `src` into strata layers in `store` and names the result `dst`.
pub fn convert_image(
    store: &Store,
    src: &SourceImage,
    dst: &Reference,
    opts: &ConvertOptions,
    progress: &mut dyn FnMut(Progress<'_>),
) -> Result<ConvertReport, BuildError> {
    let mut config: serde_json::Value = serde_json::from_slice(&src.config)
        .map_err(|e| BuildError::Source(format!("image config: {e}")))?;
    let want_diff_ids = diff_ids(&config)
        .ok_or_else(|| BuildError::Source("image config has no rootfs.diff_ids".into()))?;
    if want_diff_ids.len() != src.layers.len() {
        return Err(BuildError::Source(format!(
            "image config lists {} layers but the manifest has {}",
            want_diff_ids.len(),
            src.layers.len()
        )));
    }
    let mut converted = Vec::with_capacity(src.layers.len());
    let mut descriptors = Vec::with_capacity(src.layers.len());
    for (i, layer) in src.layers.iter().enumerate() {
        progress(Progress::LayerStart {
            index: i,
            count: src.layers.len(),
            size: layer.size,
        });
        let (blob, c) = convert_one(store, layer, opts).map_err(|e| {
            BuildError::Layer(format!("layer {} of {}: {e}", i + 1, src.layers.len()))
        })?;
        if c.source_diff_id != want_diff_ids[i] {
            return Err(BuildError::DigestMismatch {
                what: format!("layer {} uncompressed content (diff ID)", i + 1),
                expected: want_diff_ids[i].clone(),
                actual: c.source_diff_id,
            });
        }
        let s = &c.summary;
        let digest = blob.commit(None)?;
        let d = layer_descriptor(digest, s);
        descriptors.push(d);
        progress(Progress::LayerDone {
            index: i,
            layer: &c,
            digest: &descriptors[i].digest,
        });
        converted.push(c);
    }
    config["rootfs"]["diff_ids"] = serde_json::Value::Array(
        converted
            .iter()
            .map(|c| serde_json::Value::String(c.summary.diff_id.oci()))
            .collect(),
    );
    let config_bytes =
        serde_json::to_vec(&config).map_err(|e| BuildError::Source(e.to_string()))?;
    let config_digest = store.put_blob(&config_bytes)?;
    let manifest = Manifest {
        schema_version: 2,
        media_type: Some(oci::MEDIA_TYPE_MANIFEST.into()),
        config: Descriptor::new(
            oci::MEDIA_TYPE_CONFIG,
            config_digest,
            config_bytes.len() as u64,
        ),
        layers: descriptors,
        annotations: src.annotations.clone(),
        extra: Default::default(),
    };
    check_mountable(store, &manifest.layers)?;
    let manifest_bytes =
        serde_json::to_vec(&manifest).map_err(|e| BuildError::Source(e.to_string()))?;
    let manifest_digest = store.put_blob(&manifest_bytes)?;
    let descriptor = Descriptor::new(
        oci::MEDIA_TYPE_MANIFEST,
        manifest_digest,
        manifest_bytes.len() as u64,
    );
    store.tag(dst, descriptor.clone())?;
    Ok(ConvertReport {
        manifest: descriptor,
        layers: converted,
    })
}

/// Refuses a layer stack that `mount` would refuse (hard links to paths no layer has, entries
/// under a symlinked directory, …): the merged tree is built from the new TOCs exactly as a
/// mount builds it.
pub fn check_mountable(store: &Store, layers: &[Descriptor]) -> Result<(), BuildError> {
    let mut tocs = Vec::with_capacity(layers.len());
    let limit = strata_fs::format::types::DEFAULT_MAX_ENTRIES as usize;
    for d in layers {
        let file = store.open_blob(&d.digest)?;
        let blob = strata_fs::blob::LocalBlob::from_file(file)
            .map_err(|e| BuildError::Unmountable(format!("layer {}: {e}", d.digest)))?;
        let toc = strata_fs::image::open_layer_toc(store, d, &blob)
            .map_err(|e| BuildError::Unmountable(format!("layer {}: {e}", d.digest)))?;
        tocs.push(toc);
    }
    let entries: usize = tocs.iter().map(|t| t.entries.len()).sum();
    if entries > limit {
        return Err(BuildError::Unmountable(format!(
            "{entries} entries, over the {limit} a mount accepts by default"
        )));
    }
    strata_fs::tree::Tree::build(tocs)
        .map(|_| ())
        .map_err(|e| BuildError::Unmountable(e.to_string()))
}

fn convert_one(
    store: &Store,
    layer: &SourceLayer,
    opts: &ConvertOptions,
) -> Result<(strata_fs::store::BlobWriter, ConvertedLayer), BuildError> {
    let input = layer.open()?;
    let (blob, c) = convert_layer(input, store.blob_writer()?, opts)?;
    if let Some(d) = &layer.digest {
        if d != &c.source_digest {
            return Err(BuildError::DigestMismatch {
                what: "source layer blob".into(),
                expected: d.clone(),
                actual: c.source_digest,
            });
        }
    }
    Ok((blob, c))
}

/// Makes every plain (non-strata) layer of `image` mountable: fetches it whole if it is not in
/// the store (verified against its digest), converts it on this node, and records the result
/// where `strata_fs::image::open` finds it. Returns how many layers were indexed.
pub fn index_plain_layers(
    store: &Store,
    registry: Option<&std::sync::Arc<strata_fs::registry::Registry>>,
    image: &str,
    opts: &ConvertOptions,
) -> Result<usize, BuildError> {
    use strata_fs::image::{index_path, is_strata_layer};
    let record = store.resolve(image)?;
    let manifest = store.manifest(&record.descriptor.digest)?;
    let source = strata_fs::image::source_of(&record);
    let mut indexed = 0;
    for (i, l) in manifest.layers.iter().enumerate() {
        if is_strata_layer(l) {
            continue;
        }
        let path = index_path(store, &l.digest)?;
        if path.exists() {
            continue;
        }
        if indexed == 0 {
            tracing::warn!(
                image = %record.reference,
                "image is not lazily pullable (plain {} layers): fetching them whole; \
                 `strata convert` it to start containers lazily",
                l.media_type
            );
        }
        if !store.has_blob(&l.digest) {
            let (Some(reg), Some(src)) = (registry, source.as_ref()) else {
                return Err(BuildError::Source(format!(
                    "layer {} is not in the store and the image has no registry source",
                    l.digest
                )));
            };
            let mut reader = reg
                .open_blob(src, &l.digest)
                .map_err(|e| BuildError::Source(e.to_string()))?;
            let mut w = store.blob_writer()?;
            io::copy(&mut reader, &mut w).map_err(BuildError::Read)?;
            w.commit(Some(&l.digest))?;
        }
        let file = store.open_blob(&l.digest)?;
        let (blob, c) = convert_layer(file, store.blob_writer()?, opts)
            .map_err(|e| BuildError::Layer(format!("indexing layer {}: {e}", i + 1)))?;
        let digest = blob.commit(None)?;
        let s = &c.summary;
        let d = layer_descriptor(digest, s);
        let body = serde_json::to_vec(&d).map_err(|e| BuildError::Source(e.to_string()))?;
        store.write_file(&path, &body)?;
        indexed += 1;
    }
    Ok(indexed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_times() {
        assert_eq!(
            parse_pax_time(b"1600000000.5"),
            Some((1_600_000_000, 500_000_000))
        );
        assert_eq!(parse_pax_time(b"12"), Some((12, 0)));
        assert_eq!(parse_pax_time(b"-1.25"), Some((-2, 750_000_000)));
        assert_eq!(parse_pax_time(b"x"), None);
    }
}

#[cfg(test)]
mod exec_chunk_tests {
    use super::*;

    fn file(t: &mut tar::Builder<Vec<u8>>, path: &str, mode: u32, data: &[u8]) {
        let mut h = tar::Header::new_ustar();
        h.set_path(path).unwrap();
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_size(data.len() as u64);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_cksum();
        t.append(&h, data).unwrap();
    }

    /// Uncompressed chunk lengths of each regular file of the converted layer, by path.
    fn chunking(opts: &ConvertOptions, files: &[(&str, u32, Vec<u8>)]) -> Vec<(String, Vec<u32>)> {
        let mut t = tar::Builder::new(Vec::new());
        for (p, m, d) in files {
            file(&mut t, p, *m, d);
        }
        let tar = t.into_inner().unwrap();
        let (blob, c) = convert_layer(tar.as_slice(), Vec::new(), opts).unwrap();
        let f = &c.summary.footer;
        let start = f.toc_offset as usize;
        let frame = &blob[start..start + f.toc_size as usize];
        let toc = format::parse_toc(frame, &f.toc_digest, f.toc_offset).unwrap();
        toc.entries
            .iter()
            .filter(|e| e.kind == EntryKind::Regular)
            .map(|e| {
                let lens = e.chunks.iter().map(|c| c.uncompressed_len).collect();
                (String::from_utf8_lossy(&e.path).into_owned(), lens)
            })
            .collect()
    }

    #[test]
    fn elf_executables_get_small_chunks() {
        let mut elf = b"\x7fELF".to_vec();
        elf.resize(100 << 10, 7);
        let mut script = b"#!/bin/sh\n".to_vec();
        script.resize(100 << 10, b'#');
        let opts = ConvertOptions {
            chunk_size: 64 << 10,
            exec_chunk_size: 16 << 10,
            ..ConvertOptions::default()
        };
        let got = chunking(
            &opts,
            &[
                ("bin/tool", 0o755, elf.clone()),
                ("lib/data.so", 0o644, elf.clone()),
                ("bin/script", 0o755, script),
            ],
        );
        let k16 = 16 << 10;
        assert_eq!(got[0].0, "bin/tool");
        assert_eq!(got[0].1, vec![k16, k16, k16, k16, k16, k16, 4 << 10]);
        // Not executable: the layer's chunk size.
        assert_eq!(got[1].1, vec![64 << 10, 36 << 10]);
        // Executable but no ELF: only the piece that told it apart is small.
        assert_eq!(got[2].1, vec![k16, 64 << 10, 20 << 10]);
        // Off: every file in the layer's chunk size.
        let off = ConvertOptions {
            exec_chunk_size: 0,
            ..opts
        };
        let got = chunking(&off, &[("bin/tool", 0o755, elf)]);
        assert_eq!(got[0].1, vec![64 << 10, 36 << 10]);
    }
}
