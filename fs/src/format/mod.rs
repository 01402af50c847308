//! The strata layer format: a valid OCI `tar+zstd` layer that is also randomly readable by chunk.
//!
//! This module is a leaf: it knows bytes only (no FUSE, HTTP, disk cache or threads). The byte
//! layout is specified normatively in `docs/format.md`; the constants and record layouts here are
//! that document in code, and `tests/golden.rs` pins a fixture layer's bytes against both.
//!
//! Split the usual way: [`types`] (records and their encodings), [`writer`], [`reader`] and
//! [`dump`] (the human-readable listing behind `strata inspect` and the golden tests).

pub mod dump;
pub mod reader;
pub mod tar;
pub mod types;
pub mod writer;

pub use reader::{decode_chunk, parse_footer, parse_toc, parse_toc_limited};
pub use types::*;
pub use writer::{compress_frame, LayerSummary, LayerWriter};

/// Errors raised while reading or writing strata layers.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("not a strata layer: {0}")]
    NotStrata(String),
    #[error("unsupported strata {what} version {version} (this build reads version {supported})")]
    UnsupportedVersion {
        what: &'static str,
        version: u16,
        supported: u16,
    },
    #[error("strata {what} uses incompatible feature flags {flags:#06x} unknown to this build")]
    IncompatibleFlags { what: &'static str, flags: u32 },
    #[error("corrupt TOC: {0}")]
    CorruptToc(String),
    #[error("TOC digest mismatch: expected {expected}, got {actual}")]
    TocDigestMismatch { expected: String, actual: String },
    #[error("chunk at blob offset {offset} is corrupt: {reason}")]
    CorruptChunk { offset: u64, reason: String },
    #[error("chunk at blob offset {offset} digest mismatch: expected {expected}, got {actual}")]
    ChunkDigestMismatch {
        offset: u64,
        expected: String,
        actual: String,
    },
    #[error("TOC declares {entries} entries, over the limit of {limit} (raise the daemon's --max-entries if the image is genuine)")]
    TooManyEntries { entries: u64, limit: u64 },
    #[error("invalid entry {path:?}: {reason}")]
    InvalidEntry { path: String, reason: String },
    #[error("I/O error writing layer: {0}")]
    Io(#[from] std::io::Error),
}

pub type Result<T, E = FormatError> = std::result::Result<T, E>;
