//! "Get this byte range of this blob": the seam between the filesystem and where layer bytes
//! live (a local file now; a registry, a cache or a fault-injecting wrapper fit the same trait).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::format::{self, Footer, Sha256Digest, Toc, FOOTER_SIZE};

/// Random access to one layer blob.
pub trait BlobSource: Send + Sync {
    /// Total size of the blob.
    fn size(&self) -> u64;
    /// Reads exactly `len` bytes at `offset` (an error if the blob is shorter).
    fn read_range(&self, offset: u64, len: u64) -> io::Result<Vec<u8>>;
    /// Whether the bytes are already on this node (then a disk cache of chunks only saves
    /// decoding, not fetching).
    fn is_local(&self) -> bool {
        false
    }
    /// How long one more request to the source costs before its bytes start (measured;
    /// `None` when unknown or negligible, as for a local file).
    fn request_latency(&self) -> Option<std::time::Duration> {
        None
    }
    /// Bytes per second a large read from the source has been arriving at (measured; `None`
    /// when unknown).
    fn transfer_rate(&self) -> Option<u64> {
        None
    }
}

/// A blob in a local file.
pub struct LocalBlob {
    file: File,
    size: u64,
}

impl LocalBlob {
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = File::open(path)?;
        let size = file.metadata()?.len();
        Ok(LocalBlob { file, size })
    }
    pub fn from_file(file: File) -> io::Result<Self> {
        let size = file.metadata()?.len();
        Ok(LocalBlob { file, size })
    }
}

impl BlobSource for LocalBlob {
    fn size(&self) -> u64 {
        self.size
    }
    fn is_local(&self) -> bool {
        true
    }
    fn read_range(&self, offset: u64, len: u64) -> io::Result<Vec<u8>> {
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= self.size)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "range {offset}+{len} is past the end of a {}-byte blob",
                        self.size
                    ),
                )
            })?;
        let mut buf = vec![0u8; (end - offset) as usize];
        self.file.read_exact_at(&mut buf, offset)?;
        Ok(buf)
    }
}

/// Errors opening a layer's index.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("layer {digest}: {source}")]
    Io {
        digest: String,
        #[source]
        source: io::Error,
    },
    #[error("layer {digest}: {source}")]
    Format {
        digest: String,
        #[source]
        source: format::FormatError,
    },
    #[error("layer {digest}: manifest annotation {annotation} is malformed")]
    BadAnnotation { digest: String, annotation: String },
}

/// Where a layer's TOC is, as far as the manifest says.
#[derive(Clone, Debug, Default)]
pub struct TocHint {
    /// Trusted TOC digest from the manifest annotation.
    pub digest: Option<Sha256Digest>,
    /// Offset and size of the TOC frame, if annotated (saves reading the footer).
    pub location: Option<(u64, u64)>,
    /// Most entries accepted (`None`: [`format::types::DEFAULT_MAX_ENTRIES`]).
    pub max_entries: Option<u32>,
}

impl TocHint {
    pub fn max_entries(&self) -> u32 {
        self.max_entries
            .unwrap_or(format::types::DEFAULT_MAX_ENTRIES)
    }
}

/// Reads a layer's TOC frame: at most two range reads (footer, then TOC), one with a location
/// hint. Returns the frame and where it lies; the caller verifies it.
pub fn read_toc_frame(
    src: &dyn BlobSource,
    digest: &str,
    hint: &TocHint,
) -> Result<(Vec<u8>, Footer), OpenError> {
    let fmt = |source| OpenError::Format {
        digest: digest.to_string(),
        source,
    };
    let io = |source| OpenError::Io {
        digest: digest.to_string(),
        source,
    };
    let size = src.size();
    let footer = match (hint.location, hint.digest) {
        (Some((toc_offset, toc_size)), Some(toc_digest)) => Footer {
            toc_offset,
            toc_size,
            toc_digest,
        },
        _ => {
            if size < FOOTER_SIZE as u64 {
                return Err(fmt(format::FormatError::NotStrata(format!(
                    "blob of {size} bytes is too short to be a strata layer"
                ))));
            }
            let bytes = src
                .read_range(size - FOOTER_SIZE as u64, FOOTER_SIZE as u64)
                .map_err(io)?;
            format::parse_footer(&bytes, size).map_err(fmt)?
        }
    };
    // Sizes from a manifest or footer are claims: cap them before anything is fetched.
    if footer.toc_size > format::types::MAX_TOC_FRAME {
        return Err(fmt(format::FormatError::CorruptToc(format!(
            "TOC of {} bytes is over the {}-byte limit",
            footer.toc_size,
            format::types::MAX_TOC_FRAME
        ))));
    }
    let toc_end = footer.toc_offset.saturating_add(footer.toc_size);
    if toc_end.saturating_add(FOOTER_SIZE as u64) != size {
        return Err(fmt(format::FormatError::CorruptToc(format!(
            "TOC at {}+{} does not end at the footer of a {size}-byte blob",
            footer.toc_offset, footer.toc_size
        ))));
    }
    let frame = src
        .read_range(footer.toc_offset, footer.toc_size)
        .map_err(io)?;
    Ok((frame, footer))
}

/// Verifies and parses a TOC frame against the manifest's digest when given, else the footer's.
pub fn parse_toc_frame(
    frame: &[u8],
    footer: &Footer,
    digest: &str,
    hint: &TocHint,
) -> Result<Toc, OpenError> {
    let trusted = hint.digest.unwrap_or(footer.toc_digest);
    format::parse_toc_limited(frame, &trusted, footer.toc_offset, hint.max_entries()).map_err(
        |source| OpenError::Format {
            digest: digest.to_string(),
            source,
        },
    )
}

/// Opens a layer's TOC (see [`read_toc_frame`] and [`parse_toc_frame`]).
pub fn open_toc(src: &dyn BlobSource, digest: &str, hint: &TocHint) -> Result<Toc, OpenError> {
    let (frame, footer) = read_toc_frame(src, digest, hint)?;
    parse_toc_frame(&frame, &footer, digest, hint)
}
