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
}

impl<W: Write> LayerWriter<W> {
    pub fn new(out: W, chunk_size: u32, level: i32) -> Result<Self> {
        Ok(LayerWriter {
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
        self.toc.entries[i].chunks.push(Chunk {
            compressed_offset: at,
            compressed_len,
            uncompressed_len: raw.len() as u32,
            file_offset,
            digest,
        });
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

        let toc_frame = encode_toc_frame(&self.toc)?;
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

/// Encodes the uncompressed TOC body (see `docs/format.md`, "TOC body").
pub fn encode_toc_body(toc: &Toc) -> Result<Vec<u8>> {
    let chunk_count = toc.chunk_count();
    let xattr_count: usize = toc.entries.iter().map(|e| e.xattrs.len()).sum();
    let mut strings = Strings { bytes: Vec::new() };
    let mut entries = Vec::with_capacity(toc.entries.len() * ENTRY_RECORD_SIZE);
    let mut chunks = Vec::with_capacity(chunk_count * CHUNK_RECORD_SIZE);
    let mut xattrs = Vec::with_capacity(xattr_count * XATTR_RECORD_SIZE);
    let mut chunk_index = 0u32;
    let mut xattr_index = 0u32;
    for e in &toc.entries {
        let (path_off, path_len) = strings.add(&e.path)?;
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
        r[68..72].copy_from_slice(&chunk_index.to_le_bytes());
        r[72..76].copy_from_slice(&count(e.chunks.len(), "chunks")?.to_le_bytes());
        entries.extend_from_slice(&r);
        for (k, v) in &e.xattrs {
            let (ko, kl) = strings.add(k)?;
            let (vo, vl) = strings.add(v)?;
            for x in [ko, kl, vo, vl] {
                xattrs.extend_from_slice(&x.to_le_bytes());
            }
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
        xattr_index += count(e.xattrs.len(), "xattrs")?;
        chunk_index += count(e.chunks.len(), "chunks")?;
    }
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

/// Encodes the whole TOC skippable frame (header, TOC header, compressed body).
pub fn encode_toc_frame(toc: &Toc) -> Result<Vec<u8>> {
    let body = encode_toc_body(toc)?;
    let compressed = zstd::bulk::compress(&body, 3)?;
    let payload_len = TOC_HEADER_SIZE + compressed.len();
    let payload_len_u32 = u32::try_from(payload_len)
        .map_err(|_| FormatError::CorruptToc("compressed TOC over 4 GiB".into()))?;
    let mut out = Vec::with_capacity(SKIPPABLE_HEADER_SIZE + payload_len);
    out.extend_from_slice(&SKIPPABLE_MAGIC.to_le_bytes());
    out.extend_from_slice(&payload_len_u32.to_le_bytes());
    out.extend_from_slice(&TOC_MAGIC);
    out.extend_from_slice(&TOC_VERSION.to_le_bytes());
    out.extend_from_slice(&TOC_FLAG_ZSTD.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes()); // compatible flags
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&0u64.to_le_bytes()); // reserved
    out.extend_from_slice(&compressed);
    Ok(out)
}
