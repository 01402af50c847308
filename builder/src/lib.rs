//! strata-builder: making images — conversion to the strata format and image sources.

pub mod build;
pub mod commit;
pub mod container;
pub mod convert;
pub mod dockerfile;
pub mod runtime;
pub mod source;
pub mod verify;

use std::io;
use std::path::{Path, PathBuf};

/// Errors from building and converting images.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("reading source layer: {0}")]
    Read(#[source] io::Error),
    #[error("writing layer: {0}")]
    Write(#[source] io::Error),
    #[error("{0}")]
    Source(String),
    #[error("{0}")]
    Layer(String),
    /// A stage of a conversion pipeline stopped because another failed (its error is the one
    /// to report).
    #[error("conversion pipeline stopped: {0}")]
    Pipeline(&'static str),
    #[error("refusing layer entry {path:?}: {reason}")]
    HostilePath { path: String, reason: &'static str },
    #[error("{what} digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch {
        what: String,
        expected: String,
        actual: String,
    },
    #[error("the converted image could not be mounted, so it is not kept: {0}")]
    Unmountable(String),
    #[error(transparent)]
    Format(#[from] strata_fs::format::FormatError),
    #[error(transparent)]
    Store(#[from] strata_fs::store::StoreError),
}

impl BuildError {
    pub(crate) fn io(path: &Path, source: io::Error) -> Self {
        BuildError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}
