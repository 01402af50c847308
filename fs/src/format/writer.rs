//! Writing strata layers: a tar stream cut into independent zstd frames, then the TOC and footer.
//!
//! [`LayerWriter`] appends frames in order and records offsets. Compression of chunk frames is
//! left to the caller ([`FrameCompressor`]) so that a converter can compress on many threads and
//! hand finished frames to the writer in order.

use std::io::Write;

use sha2::{Digest as _, Sha256};

use super::tar::{encode_header, padding, END_OF_ARCHIVE};
use super::types::*;
use super::{FormatError, Result};

/// A reusable zstd compressor for frames (one per thread).
pub struct FrameCompressor {
    inner: zstd::bulk::Compressor<'static>,
}

impl FrameCompressor {
    pub fn new(level: i32) -> Result<Self> {
        let mut inner = zstd::bulk::Compressor::new(level)?;
        // Chunks carry a sha256 in the TOC; a zstd checksum would only cost bytes.
        inner.include_checksum(false)?;
        inner.include_contentsize(true)?;
        Ok(FrameCompressor { inner })
    }

    /// Compresses `raw` into one independent zstd frame.
    pub fn compress(&mut self, raw: &[u8]) -> Result<Vec<u8>> {
        Ok(self.inner.compress(raw)?)
    }
}

/// Compresses `raw` into one zstd frame (convenience for single calls).
pub fn compress_frame(raw: &[u8], level: i32) -> Result<Vec<u8>> {
    FrameCompressor::new(level)?.compress(raw)
}

/// What a finished layer is: its digests and where its TOC sits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerSummary {
    pub blob_size: u64,
    /// sha256 of the uncompressed tar stream (the OCI diff ID).
    pub diff_id: Sha256Digest,
    pub footer: Footer,
    pub entries: usize,
    pub chunks: usize,
    pub uncompressed_size: u64,
}

/// Small regular files gathered into one chunk frame. The frame's content is the first file's
/// data, then for each further file the previous file's tar padding, its header blocks and its
/// data: exactly the bytes the tar stream has there, so the layer stays a plain tar+zstd stream.
#[derive(Default)]
pub struct Batch {
    entries: Vec<Entry>,
    raw: Vec<u8>,
    offsets: Vec<u32>,
}

impl Batch {
    pub fn new() -> Self {
        Batch::default()
    }

    /// Whether `entry` may join a batch: a regular file of 1 byte to [`BATCH_FILE_MAX`].
    pub fn fits(entry: &Entry) -> bool {
        entry.kind == EntryKind::Regular && entry.size > 0 && entry.size < BATCH_FILE_MAX
    }

    /// Adds a file and its data (the caller checks [`Self::fits`], and sends the batch once
    /// [`Self::is_full`]). A file whose tar headers would take the frame past [`BATCH_MAX`]
    /// is handed back: the caller sends this batch and starts the next with it (an empty
    /// batch takes any file that fits).
    pub fn push(&mut self, mut entry: Entry, data: &[u8]) -> Result<Option<Entry>> {
        if !Self::fits(&entry) || entry.size != data.len() as u64 {
            return Err(FormatError::InvalidEntry {
                path: String::from_utf8_lossy(&entry.path).into_owned(),
                reason: "only regular files of 1 byte to 16 KiB, with all their data, join a batch"
                    .into(),
            });
        }
        validate_path(&entry.path).map_err(|r| FormatError::InvalidEntry {
            path: String::from_utf8_lossy(&entry.path).into_owned(),
            reason: r.to_string(),
        })?;
        entry.chunks.clear();
        if let Some(prev) = self.entries.last() {
            let header = encode_header(&entry)?;
            let pad = padding(prev.size);
            if self.raw.len() + pad + header.len() + data.len() > BATCH_MAX {
                return Ok(Some(entry));
            }
            self.raw.resize(self.raw.len() + pad, 0);
            self.raw.extend_from_slice(&header);
        }
        self.offsets.push(self.raw.len() as u32);
        self.raw.extend_from_slice(data);
        self.entries.push(entry);
        Ok(None)
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether the frame has reached [`BATCH_TARGET`] bytes (the caller then sends it).
    pub fn is_full(&self) -> bool {
        self.raw.len() >= BATCH_TARGET
    }

    /// The frame's content, to compress and hash.
    pub fn content(&self) -> &[u8] {
        &self.raw
    }
}

/// Streams a strata layer to `out`. The blob digest is the caller's to compute (a content
/// store hashes what it is given anyway; hashing twice costs convert throughput).
pub struct LayerWriter<W: Write> {
    out: W,
    offset: u64,
    diff_hash: Sha256,
    toc: Toc,
    header_compressor: FrameCompressor,
    /// Index of the regular file whose chunks are being added.
    open_file: Option<usize>,
    /// Bytes of the open file covered by chunks so far.
    open_written: u64,
    uncompressed_size: u64,
    /// TOC flags written (see `docs/format.md`); batches need [`TOC_FLAG_BATCHES`].
    toc_flags: u16,
}

/// The TOC flags a writer uses unless told otherwise.
pub const DEFAULT_TOC_FLAGS: u16 = TOC_FLAG_ZSTD | TOC_FLAG_COLUMNS | TOC_FLAG_BATCHES;

impl<W: Write> LayerWriter<W> {
    pub fn new(out: W, chunk_size: u32, level: i32) -> Result<Self> {
        Ok(LayerWriter {
            toc_flags: DEFAULT_TOC_FLAGS,
            out,
            offset: 0,
            diff_hash: Sha256::new(),
            toc: Toc {
                chunk_size,
                entries: Vec::new(),
            },
            header_compressor: FrameCompressor::new(level)?,
            open_file: None,
            open_written: 0,
            uncompressed_size: 0,
        })
    }

    pub fn chunk_size(&self) -> u32 {
        self.toc.chunk_size
    }

    /// Writes the TOC with `flags` instead of [`DEFAULT_TOC_FLAGS`] (`TOC_FLAG_ZSTD` alone is the
    /// layout of the first strata releases, which readers without batches understand).
    pub fn with_toc_flags(mut self, flags: u16) -> Self {
        self.toc_flags = flags;
        self
    }

    /// Whether [`Self::add_batch`] may be used.
    pub fn batches(&self) -> bool {
        self.toc_flags & TOC_FLAG_BATCHES != 0
    }

    /// Appends a batch of small files: the first file's header frame, then the batch frame
    /// (`frame` must be one zstd frame of `batch.content()`, `digest` its sha256).
    pub fn add_batch(&mut self, batch: Batch, frame: &[u8], digest: Sha256Digest) -> Result<()> {
        let Some(first) = batch.entries.first() else {
            return Ok(());
        };
        if batch.entries.len() > 1 && !self.batches() {
            return Err(FormatError::InvalidEntry {
                path: String::from_utf8_lossy(&first.path).into_owned(),
                reason: "batched files need the TOC's batches flag".into(),
            });
        }
        if batch.raw.len() > MAX_BATCH_FRAME as usize {
            return Err(FormatError::InvalidEntry {
                path: String::from_utf8_lossy(&first.path).into_owned(),
                reason: format!("batch frame of {} bytes", batch.raw.len()),
            });
        }
        let prev_size = self.close_file()?;
        let mut raw = vec![0u8; padding(prev_size)];
        raw.extend_from_slice(&encode_header(first)?);
        let header = self.header_compressor.compress(&raw)?;
        self.emit(&header, &raw)?;
        let compressed_len = u32::try_from(frame.len()).map_err(|_| FormatError::CorruptChunk {
            offset: self.offset,
            reason: "compressed frame over 4 GiB".into(),
        })?;
        let at = self.emit(frame, &batch.raw)?;
        let uncompressed_len = batch.raw.len() as u32;
        for (mut entry, data_offset) in batch.entries.into_iter().zip(batch.offsets) {
            entry.chunks = vec![Chunk {
                data_offset,
                data_len: entry.size as u32,
                ..Chunk::whole(at, compressed_len, uncompressed_len, 0, digest)
            }];
            self.toc.entries.push(entry);
        }
        // The last file's padding opens the next header frame.
        self.open_file = Some(self.toc.entries.len() - 1);
        self.open_written = self.toc.entries.last().map_or(0, |e| e.size);
        Ok(())
    }

    fn emit(&mut self, frame: &[u8], raw: &[u8]) -> Result<u64> {
        let at = self.offset;
        self.out.write_all(frame)?;
        self.diff_hash.update(raw);
        self.offset += frame.len() as u64;
        self.uncompressed_size += raw.len() as u64;
        Ok(at)
    }

    fn close_file(&mut self) -> Result<u64> {
        if let Some(i) = self.open_file.take() {
            let e = &self.toc.entries[i];
            if self.open_written != e.size {
                return Err(FormatError::InvalidEntry {
                    path: String::from_utf8_lossy(&e.path).into_owned(),
                    reason: format!(
                        "file declared {} bytes but {} were written",
                        e.size, self.open_written
                    ),
                });
            }
            return Ok(e.size);
        }
        Ok(0)
    }

    /// Starts a new entry: writes its header frame (which also carries the previous file's tar
    /// padding). A regular file's data must follow through [`Self::add_chunk`] or
    /// [`Self::write_data`] before the next entry.
    pub fn add_entry(&mut self, mut entry: Entry) -> Result<()> {
        let prev_size = self.close_file()?;
        validate_path(&entry.path).map_err(|r| FormatError::InvalidEntry {
            path: String::from_utf8_lossy(&entry.path).into_owned(),
            reason: r.to_string(),
        })?;
        if entry.kind != EntryKind::Regular {
            entry.size = 0;
        }
        entry.chunks.clear();
        let mut raw = vec![0u8; padding(prev_size)];
        raw.extend_from_slice(&encode_header(&entry)?);
        let frame = self.header_compressor.compress(&raw)?;
        self.emit(&frame, &raw)?;
        if entry.kind == EntryKind::Regular {
            self.open_file = Some(self.toc.entries.len());
            self.open_written = 0;
        }
        self.toc.entries.push(entry);
        Ok(())
    }

    /// Appends one already-compressed chunk of the open regular file.
    /// `frame` must be a single zstd frame whose content is `raw`, and `digest` sha256(`raw`).
    pub fn add_chunk(&mut self, frame: &[u8], raw: &[u8], digest: Sha256Digest) -> Result<()> {
        let Some(i) = self.open_file else {
            return Err(FormatError::InvalidEntry {
                path: String::new(),
                reason: "chunk written with no open regular file".into(),
            });
        };
        let file_offset = self.open_written;
        if raw.is_empty() || file_offset + raw.len() as u64 > self.toc.entries[i].size {
            return Err(FormatError::InvalidEntry {
                path: String::from_utf8_lossy(&self.toc.entries[i].path).into_owned(),
                reason: "chunk is empty or runs past the declared file size".into(),
            });
        }
        let compressed_len = u32::try_from(frame.len()).map_err(|_| FormatError::CorruptChunk {
            offset: self.offset,
            reason: "compressed frame over 4 GiB".into(),
        })?;
        let at = self.emit(frame, raw)?;
        self.toc.entries[i].chunks.push(Chunk::whole(
            at,
            compressed_len,
            raw.len() as u32,
            file_offset,
            digest,
        ));
        self.open_written += raw.len() as u64;
        Ok(())
    }

    /// Chunks, compresses and appends file data on the calling thread.
    pub fn write_data(&mut self, data: &[u8], compressor: &mut FrameCompressor) -> Result<()> {
        for piece in data.chunks(self.toc.chunk_size as usize) {
            let frame = compressor.compress(piece)?;
            self.add_chunk(&frame, piece, Sha256Digest::of(piece))?;
        }
        Ok(())
    }

    /// Ends the tar stream and writes the TOC and the footer.
    pub fn finish(mut self) -> Result<(W, LayerSummary)> {
        let prev_size = self.close_file()?;
        let mut raw = vec![0u8; padding(prev_size)];
        raw.extend_from_slice(&END_OF_ARCHIVE);
        let frame = self.header_compressor.compress(&raw)?;
        self.emit(&frame, &raw)?;

        let toc_frame = encode_toc_frame_with(&self.toc, self.toc_flags)?;
        let toc_offset = self.offset;
        self.out.write_all(&toc_frame)?;
        self.offset += toc_frame.len() as u64;
        let footer = Footer {
            toc_offset,
            toc_size: toc_frame.len() as u64,
            toc_digest: Sha256Digest::of(&toc_frame),
        };
        let footer_bytes = encode_footer(&footer);
        self.out.write_all(&footer_bytes)?;
        self.offset += footer_bytes.len() as u64;
        self.out.flush()?;
        let summary = LayerSummary {
            blob_size: self.offset,
            diff_id: Sha256Digest(self.diff_hash.finalize().into()),
            footer,
            entries: self.toc.entries.len(),
            chunks: self.toc.chunk_count(),
            uncompressed_size: self.uncompressed_size,
        };
        Ok((self.out, summary))
    }
}

/// Encodes the footer (see `docs/format.md`, "Footer").
pub fn encode_footer(f: &Footer) -> [u8; FOOTER_SIZE] {
    let mut b = [0u8; FOOTER_SIZE];
    b[0..4].copy_from_slice(&SKIPPABLE_MAGIC.to_le_bytes());
    b[4..8].copy_from_slice(&((FOOTER_SIZE - SKIPPABLE_HEADER_SIZE) as u32).to_le_bytes());
    b[8..16].copy_from_slice(&FOOTER_MAGIC);
    b[16..18].copy_from_slice(&FOOTER_VERSION.to_le_bytes());
    // 18..20 incompatible flags, 20..24 reserved: zero.
    b[24..32].copy_from_slice(&f.toc_offset.to_le_bytes());
    b[32..40].copy_from_slice(&f.toc_size.to_le_bytes());
    b[40..72].copy_from_slice(&f.toc_digest.0);
    // 72..80 reserved: zero.
    b
}

struct Strings {
    bytes: Vec<u8>,
}

impl Strings {
    fn add(&mut self, s: &[u8]) -> Result<(u32, u32)> {
        if s.is_empty() {
            return Ok((0, 0));
        }
        let off = u32::try_from(self.bytes.len())
            .map_err(|_| FormatError::CorruptToc("string table over 4 GiB".into()))?;
        let len = u32::try_from(s.len())
            .map_err(|_| FormatError::CorruptToc("string over 4 GiB".into()))?;
        self.bytes.extend_from_slice(s);
        Ok((off, len))
    }
}

fn count(n: usize, what: &str) -> Result<u32> {
    u32::try_from(n).map_err(|_| FormatError::CorruptToc(format!("too many {what}")))
}

/// Stores a table of `width`-byte records byte-transposed: byte 0 of every record, then byte 1…
pub fn transpose(table: &[u8], width: usize) -> Vec<u8> {
    let n = table.len() / width;
    let mut out = vec![0u8; n * width];
    for (i, record) in table.chunks_exact(width).enumerate() {
        for (j, &b) in record.iter().enumerate() {
            out[j * n + i] = b;
        }
    }
    out
}

/// Encodes the uncompressed TOC body (see `docs/format.md`, "TOC body") for TOC `flags`.
pub fn encode_toc_body(toc: &Toc, flags: u16) -> Result<Vec<u8>> {
    let batches = flags & TOC_FLAG_BATCHES != 0;
    let chunk_count = toc.chunk_count();
    let xattr_count: usize = toc.entries.iter().map(|e| e.xattrs.len()).sum();
    let mut strings = Strings { bytes: Vec::new() };
    // With columns, paths are implicit: they open the string table, in entry order, and each
    // entry's path offset is 0 (the reader sums the lengths).
    let implicit_paths = flags & TOC_FLAG_COLUMNS != 0;
    if implicit_paths {
        for e in &toc.entries {
            strings.bytes.extend_from_slice(&e.path);
        }
    }
    let mut entries = Vec::with_capacity(toc.entries.len() * ENTRY_RECORD_SIZE);
    let mut chunks = Vec::with_capacity(chunk_count * CHUNK_RECORD_SIZE);
    let mut xattrs = Vec::with_capacity(xattr_count * XATTR_RECORD_SIZE);
    let mut chunk_index = 0u32;
    let mut xattr_index = 0u32;
    // The one chunk of the previous entry, when it had exactly one: a batched file in the
    // same frame shares its record.
    let mut last_single: Option<Chunk> = None;
    let same_frame = |a: &Chunk, b: &Chunk| {
        (
            a.compressed_offset,
            a.compressed_len,
            a.uncompressed_len,
            a.digest,
        ) == (
            b.compressed_offset,
            b.compressed_len,
            b.uncompressed_len,
            b.digest,
        )
    };
    for e in &toc.entries {
        let shared = match e.chunks.as_slice() {
            [c] if c.is_batched() => {
                if !batches {
                    return Err(FormatError::InvalidEntry {
                        path: String::from_utf8_lossy(&e.path).into_owned(),
                        reason: "batched file in a TOC without the batches flag".into(),
                    });
                }
                last_single.is_some_and(|l| same_frame(&l, c))
            }
            _ => false,
        };
        last_single = match e.chunks.as_slice() {
            [c] => Some(*c),
            _ => None,
        };
        let (path_off, path_len) = if implicit_paths {
            (0, count(e.path.len(), "path bytes")?)
        } else {
            strings.add(&e.path)?
        };
        let (link_off, link_len) = strings.add(&e.link)?;
        let mut r = [0u8; ENTRY_RECORD_SIZE];
        r[0] = e.kind as u8;
        r[4..8].copy_from_slice(&(e.mode & 0o7777).to_le_bytes());
        r[8..12].copy_from_slice(&e.uid.to_le_bytes());
        r[12..16].copy_from_slice(&e.gid.to_le_bytes());
        r[16..24].copy_from_slice(&e.size.to_le_bytes());
        r[24..32].copy_from_slice(&e.mtime_sec.to_le_bytes());
        r[32..36].copy_from_slice(&e.mtime_nsec.to_le_bytes());
        r[36..40].copy_from_slice(&path_off.to_le_bytes());
        r[40..44].copy_from_slice(&path_len.to_le_bytes());
        r[44..48].copy_from_slice(&link_off.to_le_bytes());
        r[48..52].copy_from_slice(&link_len.to_le_bytes());
        r[52..56].copy_from_slice(&e.dev_major.to_le_bytes());
        r[56..60].copy_from_slice(&e.dev_minor.to_le_bytes());
        r[60..64].copy_from_slice(&xattr_index.to_le_bytes());
        r[64..68].copy_from_slice(&count(e.xattrs.len(), "xattrs")?.to_le_bytes());
        let first_chunk = if shared { chunk_index - 1 } else { chunk_index };
        r[68..72].copy_from_slice(&first_chunk.to_le_bytes());
        r[72..76].copy_from_slice(&count(e.chunks.len(), "chunks")?.to_le_bytes());
        if let [c] = e.chunks.as_slice() {
            r[76..80].copy_from_slice(&c.data_offset.to_le_bytes());
        }
        entries.extend_from_slice(&r);
        for (k, v) in &e.xattrs {
            let (ko, kl) = strings.add(k)?;
            let (vo, vl) = strings.add(v)?;
            for x in [ko, kl, vo, vl] {
                xattrs.extend_from_slice(&x.to_le_bytes());
            }
        }
        xattr_index += count(e.xattrs.len(), "xattrs")?;
        if shared {
            continue;
        }
        for c in &e.chunks {
            let mut r = [0u8; CHUNK_RECORD_SIZE];
            r[0..8].copy_from_slice(&c.compressed_offset.to_le_bytes());
            r[8..12].copy_from_slice(&c.compressed_len.to_le_bytes());
            r[12..16].copy_from_slice(&c.uncompressed_len.to_le_bytes());
            r[16..24].copy_from_slice(&c.file_offset.to_le_bytes());
            r[24..56].copy_from_slice(&c.digest.0);
            chunks.extend_from_slice(&r);
        }
        chunk_index += count(e.chunks.len(), "chunks")?;
    }
    if chunk_index as usize != chunk_count {
        return Err(FormatError::CorruptToc(
            "a frame is shared by files that are not consecutive, or twice in a row".into(),
        ));
    }
    let (entries, chunks) = if flags & TOC_FLAG_COLUMNS != 0 {
        (
            transpose(&entries, ENTRY_RECORD_SIZE),
            transpose(&chunks, CHUNK_RECORD_SIZE),
        )
    } else {
        (entries, chunks)
    };
    let mut body = Vec::with_capacity(
        BODY_HEADER_SIZE + entries.len() + chunks.len() + xattrs.len() + strings.bytes.len(),
    );
    body.extend_from_slice(&count(toc.entries.len(), "entries")?.to_le_bytes());
    body.extend_from_slice(&count(chunk_count, "chunks")?.to_le_bytes());
    body.extend_from_slice(&count(xattr_count, "xattrs")?.to_le_bytes());
    body.extend_from_slice(&toc.chunk_size.to_le_bytes());
    body.extend_from_slice(&(strings.bytes.len() as u64).to_le_bytes());
    body.resize(BODY_HEADER_SIZE, 0);
    body.extend_from_slice(&entries);
    body.extend_from_slice(&chunks);
    body.extend_from_slice(&xattrs);
    body.extend_from_slice(&strings.bytes);
    Ok(body)
}

/// Encodes the whole TOC skippable frame (header, TOC header, compressed body) with
/// [`DEFAULT_TOC_FLAGS`].
pub fn encode_toc_frame(toc: &Toc) -> Result<Vec<u8>> {
    encode_toc_frame_with(toc, DEFAULT_TOC_FLAGS)
}

/// zstd level of the TOC body: every lazy mount fetches the TOC before it can serve anything,
/// so its bytes count more than the time to compress it once.
const TOC_LEVEL: i32 = 17;

/// [`encode_toc_frame`] with the given TOC flags (`TOC_FLAG_ZSTD` must be among them).
pub fn encode_toc_frame_with(toc: &Toc, flags: u16) -> Result<Vec<u8>> {
    if flags & TOC_FLAG_ZSTD == 0 || flags & !TOC_KNOWN_FLAGS != 0 {
        return Err(FormatError::CorruptToc(format!(
            "cannot write TOC flags {flags:#06x}"
        )));
    }
    let body = encode_toc_body(toc, flags)?;
    let compressed = zstd::bulk::compress(&body, TOC_LEVEL)?;
    let payload_len = TOC_HEADER_SIZE + compressed.len();
    let payload_len_u32 = u32::try_from(payload_len)
        .map_err(|_| FormatError::CorruptToc("compressed TOC over 4 GiB".into()))?;
    let mut out = Vec::with_capacity(SKIPPABLE_HEADER_SIZE + payload_len);
    out.extend_from_slice(&SKIPPABLE_MAGIC.to_le_bytes());
    out.extend_from_slice(&payload_len_u32.to_le_bytes());
    out.extend_from_slice(&TOC_MAGIC);
    out.extend_from_slice(&TOC_VERSION.to_le_bytes());
    out.extend_from_slice(&flags.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes()); // compatible flags
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&0u64.to_le_bytes()); // reserved
    out.extend_from_slice(&compressed);
    Ok(out)
}
