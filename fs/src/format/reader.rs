//! Reading strata layers: footer, TOC and chunks, validating everything against hostile input.
//!
//! Nothing here trusts the bytes it is given: every count, offset and length is checked before
//! use, and parsers return errors, never panic.

use super::types::*;
use super::{FormatError, Result};

fn corrupt(msg: impl Into<String>) -> FormatError {
    FormatError::CorruptToc(msg.into())
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Parses the fixed-size footer found in the last [`FOOTER_SIZE`] bytes of a blob of
/// `blob_size` bytes, and checks that the TOC it points to lies inside the blob.
pub fn parse_footer(b: &[u8], blob_size: u64) -> Result<Footer> {
    if b.len() != FOOTER_SIZE {
        return Err(FormatError::NotStrata(format!(
            "footer must be {FOOTER_SIZE} bytes, got {}",
            b.len()
        )));
    }
    if u32_at(b, 0) != SKIPPABLE_MAGIC
        || u32_at(b, 4) as usize != FOOTER_SIZE - SKIPPABLE_HEADER_SIZE
        || b[8..16] != FOOTER_MAGIC
    {
        return Err(FormatError::NotStrata(
            "no strata footer at the end of the blob (truncated, or not converted)".into(),
        ));
    }
    let version = u16_at(b, 16);
    if version != FOOTER_VERSION {
        return Err(FormatError::UnsupportedVersion {
            what: "footer",
            version,
            supported: FOOTER_VERSION,
        });
    }
    let flags = u16_at(b, 18);
    if flags != 0 {
        return Err(FormatError::IncompatibleFlags {
            what: "footer",
            flags: u32::from(flags),
        });
    }
    let mut digest = [0u8; 32];
    digest.copy_from_slice(&b[40..72]);
    let footer = Footer {
        toc_offset: u64_at(b, 24),
        toc_size: u64_at(b, 32),
        toc_digest: Sha256Digest(digest),
    };
    let data_end = blob_size.checked_sub(FOOTER_SIZE as u64).ok_or_else(|| {
        FormatError::NotStrata(format!(
            "blob of {blob_size} bytes is smaller than a footer"
        ))
    })?;
    let toc_end = footer.toc_offset.checked_add(footer.toc_size);
    if footer.toc_size < (SKIPPABLE_HEADER_SIZE + TOC_HEADER_SIZE) as u64
        || toc_end != Some(data_end)
    {
        return Err(corrupt(format!(
            "footer places the TOC at {}+{} but it must end where the footer starts ({data_end})",
            footer.toc_offset, footer.toc_size
        )));
    }
    Ok(footer)
}

/// Parses and validates a TOC frame (the bytes `toc_offset..toc_offset+toc_size` of the blob).
///
/// `expected` is the TOC digest from a trusted source (the manifest annotation); the frame is
/// refused if it does not match. Every chunk must lie inside `0..toc_offset`, the tar data
/// region of the blob.
pub fn parse_toc(frame: &[u8], expected: &Sha256Digest, toc_offset: u64) -> Result<Toc> {
    parse_toc_limited(frame, expected, toc_offset, DEFAULT_MAX_ENTRIES)
}

/// [`parse_toc`] refusing a TOC of more than `max_entries` entries before decoding them (a
/// small hostile blob can declare millions of entries that decompress from a few kilobytes).
pub fn parse_toc_limited(
    frame: &[u8],
    expected: &Sha256Digest,
    toc_offset: u64,
    max_entries: u32,
) -> Result<Toc> {
    let actual = Sha256Digest::of(frame);
    if &actual != expected {
        return Err(FormatError::TocDigestMismatch {
            expected: expected.oci(),
            actual: actual.oci(),
        });
    }
    parse_toc_unverified_limited(frame, toc_offset, max_entries)
}

/// Like [`parse_toc`] without the digest check (for fuzzing and for tools that already checked).
pub fn parse_toc_unverified(frame: &[u8], toc_offset: u64) -> Result<Toc> {
    parse_toc_unverified_limited(frame, toc_offset, DEFAULT_MAX_ENTRIES)
}

fn parse_toc_unverified_limited(frame: &[u8], toc_offset: u64, max_entries: u32) -> Result<Toc> {
    if frame.len() as u64 > MAX_TOC_FRAME {
        return Err(corrupt(format!(
            "TOC frame of {} bytes is over the {MAX_TOC_FRAME}-byte limit",
            frame.len()
        )));
    }
    if frame.len() < SKIPPABLE_HEADER_SIZE + TOC_HEADER_SIZE {
        return Err(corrupt("TOC frame too short"));
    }
    if u32_at(frame, 0) != SKIPPABLE_MAGIC
        || u32_at(frame, 4) as usize != frame.len() - SKIPPABLE_HEADER_SIZE
    {
        return Err(corrupt("TOC is not a well-formed zstd skippable frame"));
    }
    let h = &frame[SKIPPABLE_HEADER_SIZE..];
    if h[0..8] != TOC_MAGIC {
        return Err(corrupt("bad TOC magic"));
    }
    let version = u16_at(h, 8);
    if version != TOC_VERSION {
        return Err(FormatError::UnsupportedVersion {
            what: "TOC",
            version,
            supported: TOC_VERSION,
        });
    }
    let flags = u16_at(h, 10);
    if flags & !TOC_KNOWN_FLAGS != 0 {
        return Err(FormatError::IncompatibleFlags {
            what: "TOC",
            flags: u32::from(flags & !TOC_KNOWN_FLAGS),
        });
    }
    let body_len = u64_at(h, 16);
    if body_len > MAX_TOC_BODY {
        return Err(corrupt(format!(
            "TOC body of {body_len} bytes is too large"
        )));
    }
    let raw = &h[TOC_HEADER_SIZE..];
    // The entry count is checked against the limit before the body is inflated: only the
    // body header is decoded first.
    let mut head = [0u8; BODY_HEADER_SIZE];
    let head_ok = if flags & TOC_FLAG_ZSTD != 0 {
        zstd::stream::read::Decoder::with_buffer(raw)
            .and_then(|mut d| std::io::Read::read_exact(&mut d, &mut head))
            .is_ok()
    } else {
        raw.get(..BODY_HEADER_SIZE)
            .map(|b| head.copy_from_slice(b))
            .is_some()
    };
    if !head_ok {
        return Err(corrupt("TOC body too short or does not decompress"));
    }
    let declared = u32_at(&head, 0);
    if declared > max_entries {
        return Err(FormatError::TooManyEntries {
            entries: u64::from(declared),
            limit: u64::from(max_entries),
        });
    }
    // The counts must fit the declared body before anything is inflated.
    if body_size(&head).is_none_or(|need| need != body_len) {
        return Err(corrupt(format!(
            "TOC body of {body_len} bytes does not match its counts"
        )));
    }
    let body = if flags & TOC_FLAG_ZSTD != 0 {
        let b = zstd::bulk::decompress(raw, body_len as usize)
            .map_err(|e| corrupt(format!("TOC body does not decompress: {e}")))?;
        if b.len() as u64 != body_len {
            return Err(corrupt("TOC body length differs from its header"));
        }
        b
    } else {
        if raw.len() as u64 != body_len {
            return Err(corrupt("TOC body length differs from its header"));
        }
        raw.to_vec()
    };
    parse_body(&body, toc_offset, flags)
}

/// The body length the counts of a body header (its first 48 bytes) add up to.
fn body_size(head: &[u8]) -> Option<u64> {
    let n_entries = u64::from(u32_at(head, 0));
    let n_chunks = u64::from(u32_at(head, 4));
    let n_xattrs = u64::from(u32_at(head, 8));
    (BODY_HEADER_SIZE as u64)
        .checked_add(n_entries * ENTRY_RECORD_SIZE as u64)?
        .checked_add(n_chunks * CHUNK_RECORD_SIZE as u64)?
        .checked_add(n_xattrs * XATTR_RECORD_SIZE as u64)?
        .checked_add(u64_at(head, 16))
}

/// Undoes [`super::writer::transpose`] for a table of `width`-byte records, appending the
/// records to `out`.
fn untranspose_into(table: &[u8], width: usize, out: &mut Vec<u8>) {
    let n = table.len() / width;
    let at = out.len();
    out.resize(at + n * width, 0);
    let rows = &mut out[at..];
    for (j, column) in table.chunks_exact(n.max(1)).take(width).enumerate() {
        for (i, &b) in column.iter().enumerate() {
            rows[i * width + j] = b;
        }
    }
}

/// Decodes the uncompressed TOC body written with TOC `flags`.
pub fn parse_body(b: &[u8], data_end: u64, flags: u16) -> Result<Toc> {
    if b.len() < BODY_HEADER_SIZE {
        return Err(corrupt("TOC body too short"));
    }
    if body_size(b).is_none_or(|need| need != b.len() as u64) {
        return Err(corrupt(format!(
            "TOC body is {} bytes but its counts need another length",
            b.len()
        )));
    }
    if flags & TOC_FLAG_COLUMNS != 0 {
        // The counts fit the body (checked above).
        let entries_len = u32_at(b, 0) as usize * ENTRY_RECORD_SIZE;
        let chunks_len = u32_at(b, 4) as usize * CHUNK_RECORD_SIZE;
        let tables_end = BODY_HEADER_SIZE + entries_len + chunks_len;
        let mut rows = Vec::with_capacity(b.len());
        rows.extend_from_slice(&b[..BODY_HEADER_SIZE]);
        untranspose_into(
            &b[BODY_HEADER_SIZE..BODY_HEADER_SIZE + entries_len],
            ENTRY_RECORD_SIZE,
            &mut rows,
        );
        untranspose_into(
            &b[BODY_HEADER_SIZE + entries_len..tables_end],
            CHUNK_RECORD_SIZE,
            &mut rows,
        );
        rows.extend_from_slice(&b[tables_end..]);
        return parse_rows(&rows, data_end, flags);
    }
    parse_rows(b, data_end, flags)
}

/// Decodes a body whose tables are stored row by row.
fn parse_rows(b: &[u8], data_end: u64, flags: u16) -> Result<Toc> {
    let batches = flags & TOC_FLAG_BATCHES != 0;
    // With columns, entry paths open the string table in entry order (offset fields are 0).
    let implicit_paths = flags & TOC_FLAG_COLUMNS != 0;
    let mut next_path = 0u32;
    let n_entries = u32_at(b, 0) as usize;
    let n_chunks = u32_at(b, 4) as usize;
    let n_xattrs = u32_at(b, 8) as usize;
    let chunk_size = u32_at(b, 12);
    let strings_len = u64_at(b, 16);
    if body_size(b).is_none_or(|need| need != b.len() as u64) {
        return Err(corrupt(format!(
            "TOC body is {} bytes but its counts ({n_entries} entries, {n_chunks} chunks, \
             {n_xattrs} xattrs, {strings_len} string bytes) need another length",
            b.len()
        )));
    }
    let entries_at = BODY_HEADER_SIZE;
    let chunks_at = entries_at + n_entries * ENTRY_RECORD_SIZE;
    let xattrs_at = chunks_at + n_chunks * CHUNK_RECORD_SIZE;
    let strings_at = xattrs_at + n_xattrs * XATTR_RECORD_SIZE;
    let strings = &b[strings_at..];
    // References may overlap (a writer may share equal strings), so what they copy out is
    // budgeted: a small TOC must not make a reader allocate without bound.
    let budget = (b.len() as u64).saturating_mul(4).saturating_add(1 << 20);
    let copied = std::cell::Cell::new(0u64);
    let string = |off: u32, len: u32, what: &str| -> Result<Vec<u8>> {
        let (off, len) = (off as usize, len as usize);
        copied.set(copied.get() + len as u64);
        if copied.get() > budget {
            return Err(corrupt(format!(
                "string references add up to more than {budget} bytes (overlapping references?)"
            )));
        }
        off.checked_add(len)
            .filter(|&end| end <= strings.len())
            .map(|end| strings[off..end].to_vec())
            .ok_or_else(|| corrupt(format!("{what} points outside the string table")))
    };

    let mut entries = Vec::with_capacity(n_entries);
    let mut next_chunk = 0usize;
    let mut next_xattr = 0usize;
    // Where the bytes of the last file with exactly one chunk end in that chunk's frame: the
    // next file may share the frame (a batch) only past that point.
    let mut batch_end: Option<u64> = None;
    // Chunk records lie in blob order without overlapping (as a writer appends frames): a
    // frame is shared only by reusing its record, under the rules above.
    let mut blob_end = 0u64;
    for i in 0..n_entries {
        let r = &b[entries_at + i * ENTRY_RECORD_SIZE..][..ENTRY_RECORD_SIZE];
        let kind = EntryKind::from_u8(r[0])
            .ok_or_else(|| corrupt(format!("entry {i} has unknown kind {}", r[0])))?;
        let path = if implicit_paths {
            let len = u32_at(r, 40);
            if u32_at(r, 36) != 0 {
                return Err(corrupt(format!(
                    "entry {i} has a path offset with implicit paths"
                )));
            }
            let at = next_path;
            next_path = next_path
                .checked_add(len)
                .ok_or_else(|| corrupt("path lengths overflow"))?;
            string(at, len, "entry path")?
        } else {
            string(u32_at(r, 36), u32_at(r, 40), "entry path")?
        };
        let bad = |reason: String| FormatError::InvalidEntry {
            path: String::from_utf8_lossy(&path).into_owned(),
            reason,
        };
        validate_path(&path).map_err(|e| bad(e.to_string()))?;
        if path.is_empty() && kind != EntryKind::Directory {
            return Err(bad("the layer root must be a directory".into()));
        }
        let link = string(u32_at(r, 44), u32_at(r, 48), "link target")?;
        let xattr_first = u32_at(r, 60) as usize;
        let xattr_n = u32_at(r, 64) as usize;
        let chunk_first = u32_at(r, 68) as usize;
        let chunk_n = u32_at(r, 72) as usize;
        // Tables are laid out in entry order; anything else is a malformed (or hostile) TOC.
        if xattr_first != next_xattr || xattr_first + xattr_n > n_xattrs {
            return Err(bad("xattr range out of order or out of bounds".into()));
        }
        let data_offset = if batches { u32_at(r, 76) } else { 0 };
        let shares = batches && chunk_n == 1 && chunk_first + 1 == next_chunk;
        if shares && batch_end.is_none_or(|end| u64::from(data_offset) < end) {
            return Err(bad(
                "shares a batch frame without following the previous file's bytes".into(),
            ));
        }
        if (chunk_first != next_chunk && !shares) || chunk_first + chunk_n > n_chunks {
            return Err(bad("chunk range out of order or out of bounds".into()));
        }
        if data_offset != 0 && chunk_n != 1 {
            return Err(bad("only a file of one chunk may start inside it".into()));
        }
        next_xattr += xattr_n;
        next_chunk = chunk_first + chunk_n;
        let mut xattrs = Vec::with_capacity(xattr_n);
        for x in xattr_first..xattr_first + xattr_n {
            let xr = &b[xattrs_at + x * XATTR_RECORD_SIZE..][..XATTR_RECORD_SIZE];
            let k = string(u32_at(xr, 0), u32_at(xr, 4), "xattr name")?;
            let v = string(u32_at(xr, 8), u32_at(xr, 12), "xattr value")?;
            if k.is_empty() || k.contains(&0) {
                return Err(bad("xattr name is empty or contains NUL".into()));
            }
            xattrs.push((k, v));
        }
        let size = u64_at(r, 16);
        if kind == EntryKind::Regular && size == 0 && chunk_n != 0 {
            return Err(bad("an empty file has no chunks".into()));
        }
        let mut chunks = Vec::with_capacity(chunk_n);
        let mut covered = 0u64;
        for c in chunk_first..chunk_first + chunk_n {
            let cr = &b[chunks_at + c * CHUNK_RECORD_SIZE..][..CHUNK_RECORD_SIZE];
            let mut digest = [0u8; 32];
            digest.copy_from_slice(&cr[24..56]);
            let mut chunk = Chunk::whole(
                u64_at(cr, 0),
                u32_at(cr, 8),
                u32_at(cr, 12),
                u64_at(cr, 16),
                Sha256Digest(digest),
            );
            let end = chunk
                .compressed_offset
                .checked_add(u64::from(chunk.compressed_len));
            if chunk.compressed_len == 0
                || chunk.compressed_len > MAX_COMPRESSED_CHUNK
                || end.is_none_or(|e| e > data_end)
            {
                return Err(bad(format!(
                    "chunk at {}+{} lies outside the blob's data ({data_end} bytes)",
                    chunk.compressed_offset, chunk.compressed_len
                )));
            }
            if chunk.uncompressed_len == 0 || chunk.uncompressed_len > MAX_CHUNK_SIZE {
                return Err(bad(format!(
                    "chunk of {} bytes is empty or over the {MAX_CHUNK_SIZE}-byte limit",
                    chunk.uncompressed_len
                )));
            }
            if chunk.file_offset != covered {
                return Err(bad("chunks do not cover the file contiguously".into()));
            }
            if !(shares && c == chunk_first) {
                if chunk.compressed_offset < blob_end {
                    return Err(bad(format!(
                        "chunk at {} is out of blob order or overlaps the one before",
                        chunk.compressed_offset
                    )));
                }
                blob_end = chunk.compressed_offset + u64::from(chunk.compressed_len);
            }
            if chunk_n == 1 && batches {
                // The file's bytes are `data_offset..data_offset + size` of the frame.
                let end = u64::from(data_offset).saturating_add(size);
                if end > u64::from(chunk.uncompressed_len) {
                    return Err(bad(format!(
                        "{size} bytes at {data_offset} run past the {}-byte frame",
                        chunk.uncompressed_len
                    )));
                }
                if end < u64::from(chunk.uncompressed_len)
                    && chunk.uncompressed_len > MAX_BATCH_FRAME
                {
                    return Err(bad(format!(
                        "a batch frame of {} bytes is over the {MAX_BATCH_FRAME}-byte limit",
                        chunk.uncompressed_len
                    )));
                }
                chunk.data_offset = data_offset;
                chunk.data_len = size as u32;
                batch_end = Some(end);
            }
            covered += u64::from(chunk.data_len);
            chunks.push(chunk);
        }
        if chunk_n != 1 {
            batch_end = None;
        }
        match kind {
            EntryKind::Regular if covered != size => {
                return Err(bad(format!("chunks cover {covered} of {size} bytes")));
            }
            EntryKind::Regular => {}
            _ if size != 0 || chunk_n != 0 => {
                return Err(bad("only regular files have a size and chunks".into()));
            }
            EntryKind::Symlink | EntryKind::Hardlink if link.is_empty() => {
                return Err(bad("link without a target".into()));
            }
            _ => {}
        }
        entries.push(Entry {
            path,
            kind,
            mode: u32_at(r, 4) & 0o7777,
            uid: u32_at(r, 8),
            gid: u32_at(r, 12),
            size,
            mtime_sec: u64_at(r, 24) as i64,
            mtime_nsec: u32_at(r, 32).min(999_999_999),
            link,
            dev_major: u32_at(r, 52),
            dev_minor: u32_at(r, 56),
            xattrs,
            chunks,
        });
    }
    if next_chunk != n_chunks || next_xattr != n_xattrs {
        return Err(corrupt("chunk or xattr table has records no entry uses"));
    }
    Ok(Toc {
        chunk_size,
        entries,
    })
}

thread_local! {
    /// One decompression context per thread: creating one per chunk costs an allocation and
    /// initialisation of its workspace every time.
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// Decompresses one frame into exactly `capacity` bytes at most.
fn decompress(frame: &[u8], capacity: usize) -> std::io::Result<Vec<u8>> {
    DECOMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(zstd::bulk::Decompressor::new()?);
        }
        match slot.as_mut() {
            Some(d) => d.decompress(frame, capacity),
            None => zstd::bulk::decompress(frame, capacity),
        }
    })
}

/// Decompresses one chunk frame and verifies it against the chunk's sha256.
/// Wrong bytes are never returned: a mismatch is an error.
pub fn decode_chunk(compressed: &[u8], chunk: &Chunk) -> Result<Vec<u8>> {
    let fail = |reason: String| FormatError::CorruptChunk {
        offset: chunk.compressed_offset,
        reason,
    };
    if compressed.len() != chunk.compressed_len as usize {
        return Err(fail(format!(
            "got {} compressed bytes, expected {}",
            compressed.len(),
            chunk.compressed_len
        )));
    }
    let data = decompress(compressed, chunk.uncompressed_len as usize)
        .map_err(|e| fail(format!("zstd: {e}")))?;
    if data.len() != chunk.uncompressed_len as usize {
        return Err(fail(format!(
            "decompressed to {} bytes, expected {}",
            data.len(),
            chunk.uncompressed_len
        )));
    }
    let actual = Sha256Digest::of(&data);
    if actual != chunk.digest {
        return Err(FormatError::ChunkDigestMismatch {
            offset: chunk.compressed_offset,
            expected: chunk.digest.oci(),
            actual: actual.oci(),
        });
    }
    Ok(data)
}
