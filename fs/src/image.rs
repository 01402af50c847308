//! Opening an image for reading: manifest, config and every layer's TOC (in parallel).

use std::sync::Arc;

use crate::blob::{open_toc, BlobSource, LocalBlob, OpenError, TocHint};
use crate::format::{self, Sha256Digest, Toc};
use crate::oci::{Descriptor, Manifest};
use crate::reference::Reference;
use crate::store::{Store, StoreError};
use crate::tree::{Tree, TreeError};

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Open(#[from] OpenError),
    #[error(transparent)]
    Tree(#[from] TreeError),
    #[error("layer {digest} has media type {media_type}, not a strata layer; run `strata convert` first")]
    NotStrata { digest: String, media_type: String },
    #[error("manifest {0} is not valid JSON: {1}")]
    BadConfig(String, String),
}

/// One opened layer.
pub struct OpenedLayer {
    pub descriptor: Descriptor,
    pub toc: Toc,
    pub blob: Arc<dyn BlobSource>,
}

/// An image with every layer's index in memory.
pub struct OpenedImage {
    pub reference: Reference,
    pub manifest_digest: String,
    pub manifest: Manifest,
    pub config: serde_json::Value,
    pub layers: Vec<OpenedLayer>,
}

impl OpenedImage {
    /// Builds the merged tree; hands back the blobs in layer order.
    pub fn into_tree(self) -> Result<(Tree, Vec<Arc<dyn BlobSource>>), ImageError> {
        let mut tocs = Vec::with_capacity(self.layers.len());
        let mut blobs = Vec::with_capacity(self.layers.len());
        for l in self.layers {
            tocs.push(l.toc);
            blobs.push(l.blob);
        }
        Ok((Tree::build(tocs)?, blobs))
    }
}

/// The TOC location a layer descriptor's annotations give.
pub fn toc_hint(d: &Descriptor) -> Result<TocHint, OpenError> {
    let bad = |a: &str| OpenError::BadAnnotation {
        digest: d.digest.clone(),
        annotation: a.to_string(),
    };
    let digest = match d.annotations.get(format::ANNOTATION_TOC_DIGEST) {
        Some(s) => Some(Sha256Digest::parse(s).ok_or_else(|| bad(format::ANNOTATION_TOC_DIGEST))?),
        None => None,
    };
    let num = |a: &str| -> Result<Option<u64>, OpenError> {
        d.annotations
            .get(a)
            .map(|v| v.parse::<u64>().map_err(|_| bad(a)))
            .transpose()
    };
    let location = match (
        num(format::ANNOTATION_TOC_OFFSET)?,
        num(format::ANNOTATION_TOC_SIZE)?,
    ) {
        (Some(o), Some(s)) => Some((o, s)),
        _ => None,
    };
    Ok(TocHint { digest, location })
}

/// Opens an image from the local store.
pub fn open_local(store: &Store, image: &str) -> Result<OpenedImage, ImageError> {
    let record = store.resolve(image)?;
    let manifest = store.manifest(&record.descriptor.digest)?;
    let config_bytes = store.read_blob(&manifest.config.digest)?;
    let config = serde_json::from_slice(&config_bytes)
        .map_err(|e| ImageError::BadConfig(manifest.config.digest.clone(), e.to_string()))?;
    for l in &manifest.layers {
        if l.media_type != format::MEDIA_TYPE_LAYER {
            return Err(ImageError::NotStrata {
                digest: l.digest.clone(),
                media_type: l.media_type.clone(),
            });
        }
    }
    let opened: Vec<Result<OpenedLayer, ImageError>> = std::thread::scope(|s| {
        let handles: Vec<_> = manifest
            .layers
            .iter()
            .map(|d| {
                s.spawn(move || -> Result<OpenedLayer, ImageError> {
                    let file = store.open_blob(&d.digest)?;
                    let blob = LocalBlob::from_file(file).map_err(|source| OpenError::Io {
                        digest: d.digest.clone(),
                        source,
                    })?;
                    let toc = open_toc(&blob, &d.digest, &toc_hint(d)?)?;
                    Ok(OpenedLayer {
                        descriptor: d.clone(),
                        toc,
                        blob: Arc::new(blob),
                    })
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(ImageError::BadConfig("layer".into(), "panicked".into()))
                })
            })
            .collect()
    });
    let layers = opened.into_iter().collect::<Result<Vec<_>, _>>()?;
    Ok(OpenedImage {
        reference: record.reference,
        manifest_digest: record.descriptor.digest,
        manifest,
        config,
        layers,
    })
}
