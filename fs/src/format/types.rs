//! Record types and fixed layouts of the strata layer format (see `docs/format.md`).

use sha2::{Digest as _, Sha256};

/// Magic number of the zstd skippable frames strata uses (the TOC and the footer).
pub const SKIPPABLE_MAGIC: u32 = 0x184D_2A5E;
/// Size of a skippable frame header: magic (u32) + payload size (u32).
pub const SKIPPABLE_HEADER_SIZE: usize = 8;

/// Footer magic, at byte 8 of the footer.
pub const FOOTER_MAGIC: [u8; 8] = *b"STRATAFT";
/// Total size of the footer, skippable frame header included.
pub const FOOTER_SIZE: usize = 80;
/// Footer format version this build writes and reads.
pub const FOOTER_VERSION: u16 = 1;

/// TOC magic, first bytes of the TOC frame payload.
pub const TOC_MAGIC: [u8; 8] = *b"STRATOC\0";
/// TOC format version this build writes and reads.
pub const TOC_VERSION: u16 = 1;
/// Size of the TOC payload header that precedes the (compressed) body.
pub const TOC_HEADER_SIZE: usize = 32;
/// Incompatible TOC flag: the body is one zstd frame.
pub const TOC_FLAG_ZSTD: u16 = 1;
/// Incompatible TOC flag: the entry and chunk tables are stored byte-transposed (byte 0 of every
/// record, then byte 1, ...), which lets zstd see each field as one run of similar values.
pub const TOC_FLAG_COLUMNS: u16 = 2;
/// Incompatible TOC flag: small files may share one chunk frame (a *batch*), each entry saying
/// where its bytes start in the frame.
pub const TOC_FLAG_BATCHES: u16 = 4;
/// Incompatible TOC flags this build understands.
pub const TOC_KNOWN_FLAGS: u16 = TOC_FLAG_ZSTD | TOC_FLAG_COLUMNS | TOC_FLAG_BATCHES;
/// Files smaller than this share batch frames (when the writer batches).
pub const BATCH_FILE_MAX: u64 = 16 << 10;
/// A batch frame is closed once its content reaches this many bytes.
pub const BATCH_TARGET: usize = 32 << 10;
/// A writer never makes a batch frame larger than this (a file whose tar headers would take it
/// past starts the next batch).
pub const BATCH_MAX: usize = 64 << 10;
/// Largest frame a reader accepts holding more than one file's bytes: a read of one small file
/// decodes its whole batch.
pub const MAX_BATCH_FRAME: u32 = 1 << 20;
/// Size of the body header (counts).
pub const BODY_HEADER_SIZE: usize = 48;
/// Size of one entry record.
pub const ENTRY_RECORD_SIZE: usize = 80;
/// Size of one chunk record.
pub const CHUNK_RECORD_SIZE: usize = 64;
/// Size of one xattr record.
pub const XATTR_RECORD_SIZE: usize = 16;
/// Largest uncompressed chunk a reader accepts (guards memory on hostile input).
pub const MAX_CHUNK_SIZE: u32 = 64 << 20;
/// Largest uncompressed TOC body a reader accepts.
pub const MAX_TOC_BODY: u64 = 1 << 31;
/// Largest compressed chunk frame a reader accepts: zstd's worst-case bound for
/// [`MAX_CHUNK_SIZE`] bytes (so one range read never asks for more than this per chunk).
pub const MAX_COMPRESSED_CHUNK: u32 = MAX_CHUNK_SIZE + (MAX_CHUNK_SIZE >> 7) + (128 << 10);
/// Largest TOC frame a reader reads (checked before anything is allocated or fetched).
pub const MAX_TOC_FRAME: u64 = 512 << 20;
/// Default limit on entries per image (all layers together); configurable by the reader.
pub const DEFAULT_MAX_ENTRIES: u32 = 1_000_000;

/// Default chunk size; chosen by measurement, see `docs/benchmarks.md`.
pub const DEFAULT_CHUNK_SIZE: u32 = 1 << 20;

/// Layer descriptor annotation carrying the TOC frame's digest (`sha256:<hex>`).
pub const ANNOTATION_TOC_DIGEST: &str = "dev.strata.toc.digest";
/// Layer descriptor annotation carrying the TOC frame's offset in the blob.
pub const ANNOTATION_TOC_OFFSET: &str = "dev.strata.toc.offset";
/// Layer descriptor annotation carrying the TOC frame's length in bytes.
pub const ANNOTATION_TOC_SIZE: &str = "dev.strata.toc.size";
/// Media type of strata layers: plain OCI zstd-compressed tar.
pub const MEDIA_TYPE_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+zstd";

/// A sha256 digest.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Sha256Digest(pub [u8; 32]);

impl Sha256Digest {
    pub fn of(bytes: &[u8]) -> Self {
        Sha256Digest(Sha256::digest(bytes).into())
    }
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }
    /// `sha256:<hex>`, the OCI digest string.
    pub fn oci(&self) -> String {
        format!("sha256:{}", self.hex())
    }
    /// Parses `sha256:<hex>` or bare hex.
    pub fn parse(s: &str) -> Option<Self> {
        let hex_part = s.strip_prefix("sha256:").unwrap_or(s);
        let mut out = [0u8; 32];
        hex::decode_to_slice(hex_part, &mut out).ok()?;
        Some(Sha256Digest(out))
    }
}

impl std::fmt::Debug for Sha256Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sha256:{}", self.hex())
    }
}

impl std::fmt::Display for Sha256Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sha256:{}", self.hex())
    }
}

/// Kind of a TOC entry. The numeric values are the on-disk encoding.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum EntryKind {
    Regular = 0,
    Directory = 1,
    Symlink = 2,
    Hardlink = 3,
    CharDevice = 4,
    BlockDevice = 5,
    Fifo = 6,
}

impl EntryKind {
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0 => EntryKind::Regular,
            1 => EntryKind::Directory,
            2 => EntryKind::Symlink,
            3 => EntryKind::Hardlink,
            4 => EntryKind::CharDevice,
            5 => EntryKind::BlockDevice,
            6 => EntryKind::Fifo,
            _ => return None,
        })
    }
    pub fn name(self) -> &'static str {
        match self {
            EntryKind::Regular => "file",
            EntryKind::Directory => "dir",
            EntryKind::Symlink => "symlink",
            EntryKind::Hardlink => "hardlink",
            EntryKind::CharDevice => "char",
            EntryKind::BlockDevice => "block",
            EntryKind::Fifo => "fifo",
        }
    }
}

/// One chunk of a regular file: an independent zstd frame in the blob, or the file's part of a
/// batch frame that several small files share.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Chunk {
    /// Offset of the compressed frame in the blob.
    pub compressed_offset: u64,
    /// Length of the compressed frame.
    pub compressed_len: u32,
    /// Length of the frame's decompressed bytes.
    pub uncompressed_len: u32,
    /// Offset within the file of the bytes this chunk holds.
    pub file_offset: u64,
    /// sha256 of the frame's decompressed bytes (what the cache is keyed by).
    pub digest: Sha256Digest,
    /// Where the file's bytes start in the decompressed frame (0 unless batched).
    pub data_offset: u32,
    /// How many of the file's bytes the frame holds (`uncompressed_len` unless batched).
    pub data_len: u32,
}

impl Chunk {
    /// A chunk that is a whole frame of one file's bytes.
    pub fn whole(
        compressed_offset: u64,
        compressed_len: u32,
        uncompressed_len: u32,
        file_offset: u64,
        digest: Sha256Digest,
    ) -> Self {
        Chunk {
            compressed_offset,
            compressed_len,
            uncompressed_len,
            file_offset,
            digest,
            data_offset: 0,
            data_len: uncompressed_len,
        }
    }
    /// Whether the frame holds anything besides this file's bytes.
    pub fn is_batched(&self) -> bool {
        self.data_offset != 0 || self.data_len != self.uncompressed_len
    }
    /// The file's bytes in the decoded frame `frame` (`None` if `frame` is too short).
    pub fn file_bytes<'a>(&self, frame: &'a [u8]) -> Option<&'a [u8]> {
        let from = self.data_offset as usize;
        frame.get(from..from + self.data_len as usize)
    }
    /// The file offset just past this chunk's bytes.
    pub fn file_end(&self) -> u64 {
        self.file_offset + u64::from(self.data_len)
    }
}

/// One entry of a layer, as recorded in the TOC (and in the tar stream).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Normalised relative path: no leading `/` or `./`, no `.`/`..`/empty components, no NUL.
    /// The layer root is the empty path.
    pub path: Vec<u8>,
    pub kind: EntryKind,
    /// Permission and special bits (`mode & 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// File size for regular files; 0 otherwise.
    pub size: u64,
    pub mtime_sec: i64,
    pub mtime_nsec: u32,
    /// Symlink target, or the layer path a hard link points to.
    pub link: Vec<u8>,
    pub dev_major: u32,
    pub dev_minor: u32,
    /// Extended attributes in the order they were given.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// Chunks of a regular file, in file order, covering `0..size` without gaps.
    pub chunks: Vec<Chunk>,
}

impl Entry {
    pub fn new(path: Vec<u8>, kind: EntryKind) -> Self {
        Entry {
            path,
            kind,
            mode: if kind == EntryKind::Directory {
                0o755
            } else {
                0o644
            },
            uid: 0,
            gid: 0,
            size: 0,
            mtime_sec: 0,
            mtime_nsec: 0,
            link: Vec::new(),
            dev_major: 0,
            dev_minor: 0,
            xattrs: Vec::new(),
            chunks: Vec::new(),
        }
    }

    /// The last path component (empty for the root).
    pub fn name(&self) -> &[u8] {
        match self.path.iter().rposition(|&b| b == b'/') {
            Some(i) => &self.path[i + 1..],
            None => &self.path,
        }
    }
}

/// The index of one layer: every entry with its chunks.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Toc {
    /// Nominal chunk size the writer used.
    pub chunk_size: u32,
    pub entries: Vec<Entry>,
}

impl Toc {
    /// Each chunk frame of the layer once (the files of a batch share theirs).
    pub fn frames(&self) -> impl Iterator<Item = &Chunk> {
        let mut last = None;
        self.entries
            .iter()
            .flat_map(|e| e.chunks.iter())
            .filter(move |c| last.replace(c.compressed_offset) != Some(c.compressed_offset))
    }

    /// Chunk frames in the layer (a batch frame counts once).
    pub fn chunk_count(&self) -> usize {
        self.frames().count()
    }
    pub fn uncompressed_bytes(&self) -> u64 {
        self.entries
            .iter()
            .filter(|e| e.kind == EntryKind::Regular)
            .map(|e| e.size)
            .sum()
    }
    pub fn compressed_chunk_bytes(&self) -> u64 {
        self.frames().map(|c| u64::from(c.compressed_len)).sum()
    }
}

/// The decoded footer: where the TOC frame is and what it hashes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Footer {
    /// Offset of the TOC skippable frame in the blob.
    pub toc_offset: u64,
    /// Length of the TOC skippable frame, header included.
    pub toc_size: u64,
    /// sha256 of the TOC skippable frame, header included.
    pub toc_digest: Sha256Digest,
}

/// Checks that `path` is a normalised relative layer path.
pub fn validate_path(path: &[u8]) -> Result<(), &'static str> {
    if path.is_empty() {
        return Ok(());
    }
    if path.contains(&0) {
        return Err("path contains NUL");
    }
    if path.first() == Some(&b'/') {
        return Err("path is absolute");
    }
    for comp in path.split(|&b| b == b'/') {
        match comp {
            b"" => return Err("path has an empty component"),
            b"." => return Err("path has a '.' component"),
            b".." => return Err("path has a '..' component"),
            _ => {}
        }
    }
    Ok(())
}

/// Normalises a tar path: strips leading `/` and `./`, trailing `/`, and `.` components.
/// Refuses `..` components (a hostile path must never escape the layer root).
pub fn normalize_path(raw: &[u8]) -> Result<Vec<u8>, &'static str> {
    if raw.contains(&0) {
        return Err("path contains NUL");
    }
    let mut out: Vec<u8> = Vec::with_capacity(raw.len());
    for comp in raw.split(|&b| b == b'/') {
        match comp {
            b"" | b"." => continue,
            b".." => return Err("path has a '..' component"),
            c => {
                if !out.is_empty() {
                    out.push(b'/');
                }
                out.extend_from_slice(c);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize() {
        assert_eq!(normalize_path(b"./a/b/").unwrap(), b"a/b");
        assert_eq!(normalize_path(b"/a//b").unwrap(), b"a/b");
        assert_eq!(normalize_path(b"./").unwrap(), b"");
        assert!(normalize_path(b"../../etc/x").is_err());
        assert!(normalize_path(b"a/../b").is_err());
        assert!(validate_path(b"a/b").is_ok());
        assert!(validate_path(b"a//b").is_err());
        assert!(validate_path(b"/a").is_err());
    }
}
