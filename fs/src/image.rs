//! Opening an image for reading: manifest, config and every layer's TOC (in parallel), with
//! layer bytes from the local store or, for lazily pulled images, from their registry.

use std::path::PathBuf;
use std::sync::Arc;

use crate::blob::{parse_toc_frame, read_toc_frame, BlobSource, LocalBlob, OpenError, TocHint};
use crate::format::{self, Footer, Sha256Digest, Toc};
use crate::oci::{Descriptor, Manifest};
use crate::reference::Reference;
use crate::registry::{Registry, RegistryBlob};
use crate::store::{Store, StoreError};
use crate::tree::{Tree, TreeError};

/// Annotation (in the store's index.json) naming the repository a lazily pulled image's blobs
/// live in (`registry/repository`).
pub const ANNOTATION_SOURCE: &str = "dev.strata.source";

/// The repository an image's blobs come from (its `dev.strata.source` annotation), if any.
pub fn source_of(record: &crate::store::ImageRecord) -> Option<Reference> {
    record
        .descriptor
        .annotations
        .get(ANNOTATION_SOURCE)
        .and_then(|s| Reference::parse(s).ok())
}

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Open(#[from] OpenError),
    #[error(transparent)]
    Tree(#[from] TreeError),
    #[error(transparent)]
    Registry(#[from] crate::registry::RegistryError),
    #[error("layer {digest} has media type {media_type}, not a strata layer; run `strata convert` first")]
    NotStrata { digest: String, media_type: String },
    #[error("the image has no layer {0}")]
    NoLayer(String),
    #[error("layer {0} is neither in the local store nor in a known registry repository")]
    NoSource(String),
    #[error("config {0} is not valid JSON: {1}")]
    BadConfig(String, String),
    #[error("image has {0} layers, over the limit of {MAX_LAYERS}")]
    TooManyLayers(usize),
    #[error("image has {entries} entries in its layers, over the limit of {limit} (raise the daemon's --max-entries if the image is genuine)")]
    TooManyEntries { entries: u64, limit: u64 },
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

    /// The top layer alone as an overlayfs lower directory ([`Tree::build_lower`]), the layers
    /// under it (as [`open_selected`] opened them) giving the attributes of directories it
    /// lacks.
    pub fn into_lower_tree(mut self) -> Result<(Tree, Vec<Arc<dyn BlobSource>>), ImageError> {
        let top = self
            .layers
            .pop()
            .ok_or_else(|| ImageError::NoLayer("(an image without layers)".into()))?;
        let below = if self.layers.is_empty() {
            None
        } else {
            // Only the directories the top layer lacks are looked up below: a tree of what
            // decides those (a few entries of each layer) instead of every entry of every layer.
            let wanted = crate::tree::missing_parents(&top.toc);
            let tocs: Vec<_> = self.layers.into_iter().map(|l| l.toc).collect();
            let skeletons: Option<Vec<_>> = tocs
                .iter()
                .map(|t| crate::tree::skeleton(t, &wanted))
                .collect();
            Some(Tree::build(skeletons.unwrap_or(tocs))?)
        };
        Ok((Tree::build_lower(top.toc, below.as_ref())?, vec![top.blob]))
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
    Ok(TocHint {
        digest,
        location,
        max_entries: None,
    })
}

/// Whether a layer descriptor is a strata layer (zstd tar with a TOC annotation).
pub fn is_strata_layer(d: &Descriptor) -> bool {
    d.media_type == format::MEDIA_TYPE_LAYER
        && d.annotations.contains_key(format::ANNOTATION_TOC_DIGEST)
}

/// Where the strata descriptor of a locally indexed plain layer is recorded
/// (`ROOT/indexed/<hex>.json`): plain layers are fetched whole, converted on this node, and
/// served from the converted blob.
pub fn index_path(store: &Store, layer_digest: &str) -> Result<PathBuf, StoreError> {
    let blob = store.blob_path(layer_digest)?;
    let name = blob
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(store.root().join("indexed").join(format!("{name}.json")))
}

fn toc_cache_path(store: &Store, layer_digest: &str) -> Result<PathBuf, StoreError> {
    let blob = store.blob_path(layer_digest)?;
    let name = blob
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    Ok(store.root().join("tocs").join(name))
}

/// Whether a layer's TOC is on this node (the whole blob, or its TOC in the TOC cache, of the
/// size the descriptor gives): opening the layer then needs no request. A cached TOC a crash
/// left empty or short does not count; its content is verified when it is opened.
pub fn has_toc(store: &Store, d: &Descriptor) -> bool {
    if store.has_blob(&d.digest) {
        return true;
    }
    let Ok(Some((_, size))) = toc_hint(d).map(|h| h.location) else {
        return false;
    };
    toc_cache_path(store, &d.digest)
        .ok()
        .and_then(|p| std::fs::metadata(p).ok())
        .is_some_and(|m| m.is_file() && m.len() == size)
}

/// Opens one layer's TOC: from the local TOC cache, else read from `src` (and cached; a lazily
/// pulled image keeps its TOCs so remounting needs no request).
pub fn open_layer_toc(
    store: &Store,
    d: &Descriptor,
    src: &dyn BlobSource,
) -> Result<Toc, ImageError> {
    open_layer_toc_limited(store, d, src, format::types::DEFAULT_MAX_ENTRIES)
}

/// [`open_layer_toc`] refusing a layer of more than `max_entries` entries.
pub fn open_layer_toc_limited(
    store: &Store,
    d: &Descriptor,
    src: &dyn BlobSource,
    max_entries: u32,
) -> Result<Toc, ImageError> {
    let mut hint = toc_hint(d)?;
    hint.max_entries = Some(max_entries);
    let cache = toc_cache_path(store, &d.digest)?;
    if let (Some(trusted), Some((offset, size)), Ok(frame)) =
        (hint.digest, hint.location, std::fs::read(&cache))
    {
        let footer = Footer {
            toc_offset: offset,
            toc_size: size,
            toc_digest: trusted,
        };
        match parse_toc_frame(&frame, &footer, &d.digest, &hint) {
            Ok(toc) => return Ok(toc),
            Err(e) => tracing::warn!(layer = %d.digest, "cached TOC unusable, refetching: {e}"),
        }
    }
    let (frame, footer) = read_toc_frame(src, &d.digest, &hint)?;
    let toc = parse_toc_frame(&frame, &footer, &d.digest, &hint)?;
    if !src.is_local() {
        // Verified whenever it is read (above): a torn copy is fetched again.
        store.write_file_unsynced(&cache, &frame)?;
    }
    Ok(toc)
}

/// Opens an image from the local store; layers missing locally are read from the registry the
/// image was pulled from (needs `registry`).
pub fn open(
    store: &Store,
    image: &str,
    registry: Option<&Arc<Registry>>,
) -> Result<OpenedImage, ImageError> {
    open_limited(store, image, registry, format::types::DEFAULT_MAX_ENTRIES)
}

/// [`open`] refusing an image of more than `max_entries` entries (all layers together): each
/// layer is refused before its entries are decoded, the sum after.
pub fn open_limited(
    store: &Store,
    image: &str,
    registry: Option<&Arc<Registry>>,
    max_entries: u32,
) -> Result<OpenedImage, ImageError> {
    open_selected(store, image, registry, max_entries, None, false)
}

/// [`open_limited`] keeping only the first layer whose manifest digest is `only` (when given),
/// and with `below` the layers under it too: for a layer mounted alone, as containerd's
/// snapshots need (the layers below lend attributes to directories it lacks).
pub fn open_selected(
    store: &Store,
    image: &str,
    registry: Option<&Arc<Registry>>,
    max_entries: u32,
    only: Option<&str>,
    below: bool,
) -> Result<OpenedImage, ImageError> {
    let record = store.resolve(image)?;
    let manifest = store.manifest(&record.descriptor.digest)?;
    let config_bytes = store.read_blob(&manifest.config.digest)?;
    let config = serde_json::from_slice(&config_bytes)
        .map_err(|e| ImageError::BadConfig(manifest.config.digest.clone(), e.to_string()))?;
    // Plain layers are served from their local strata index (see `index_path`).
    let mut layers = Vec::with_capacity(manifest.layers.len());
    let wanted = match only {
        None => manifest.layers.len(),
        Some(d) => {
            manifest
                .layers
                .iter()
                .position(|l| l.digest == d)
                .ok_or_else(|| ImageError::NoLayer(d.to_string()))?
                + 1
        }
    };
    let first = if only.is_some() && !below {
        wanted - 1
    } else {
        0
    };
    for l in manifest.layers[..wanted].iter().skip(first) {
        if is_strata_layer(l) {
            layers.push(l.clone());
            continue;
        }
        let indexed = std::fs::read(index_path(store, &l.digest)?)
            .ok()
            .and_then(|b| serde_json::from_slice::<Descriptor>(&b).ok())
            .filter(|d| is_strata_layer(d) && store.has_blob(&d.digest));
        match indexed {
            Some(d) => layers.push(d),
            None => {
                return Err(ImageError::NotStrata {
                    digest: l.digest.clone(),
                    media_type: l.media_type.clone(),
                })
            }
        }
    }
    let source = source_of(&record);
    if layers.len() > MAX_LAYERS {
        return Err(ImageError::TooManyLayers(layers.len()));
    }
    // A few layers at a time, each allowed what is left of the image's entry budget: memory
    // stays bounded by the budget times the batch, whatever the manifest lists.
    let mut opened_layers: Vec<OpenedLayer> = Vec::with_capacity(layers.len());
    let mut entries = 0u64;
    for batch in layers.chunks(PARALLEL_OPENS) {
        let left = u64::from(max_entries).saturating_sub(entries) as u32;
        let opened: Vec<Result<OpenedLayer, ImageError>> = std::thread::scope(|s| {
            let handles: Vec<_> = batch
                .iter()
                .map(|d| {
                    let source = source.clone();
                    s.spawn(move || open_one(store, registry, source, d, left))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(ImageError::NoSource("layer open panicked".into())))
                })
                .collect()
        });
        for l in opened {
            let l = l.map_err(|e| match e {
                ImageError::Open(OpenError::Format {
                    source: format::FormatError::TooManyEntries { entries: n, .. },
                    ..
                }) => ImageError::TooManyEntries {
                    entries: entries + n,
                    limit: u64::from(max_entries),
                },
                other => other,
            })?;
            entries += l.toc.entries.len() as u64;
            if entries > u64::from(max_entries) {
                return Err(ImageError::TooManyEntries {
                    entries,
                    limit: u64::from(max_entries),
                });
            }
            opened_layers.push(l);
        }
    }
    let layers = opened_layers;
    Ok(OpenedImage {
        reference: record.reference,
        manifest_digest: record.descriptor.digest,
        manifest,
        config,
        layers,
    })
}

/// Most layers an image may have (Docker's limit is 127).
pub const MAX_LAYERS: usize = 256;
/// Layers whose TOCs are opened at once.
const PARALLEL_OPENS: usize = 8;

/// Opens one layer: its blob (local, else in the registry) and its TOC (at most `max_entries`).
fn open_one(
    store: &Store,
    registry: Option<&Arc<Registry>>,
    source: Option<Reference>,
    d: &Descriptor,
    max_entries: u32,
) -> Result<OpenedLayer, ImageError> {
    let blob: Arc<dyn BlobSource> = if store.has_blob(&d.digest) {
        let file = store.open_blob(&d.digest)?;
        Arc::new(LocalBlob::from_file(file).map_err(|source| OpenError::Io {
            digest: d.digest.clone(),
            source,
        })?)
    } else {
        match (registry, source) {
            (Some(reg), Some(src)) => Arc::new(RegistryBlob::new(
                reg.clone(),
                src,
                d.digest.clone(),
                d.size,
            )),
            _ => return Err(ImageError::NoSource(d.digest.clone())),
        }
    };
    let toc = open_layer_toc_limited(store, d, blob.as_ref(), max_entries)?;
    Ok(OpenedLayer {
        descriptor: d.clone(),
        toc,
        blob,
    })
}

/// Opens an image whose layers are all in the local store.
pub fn open_local(store: &Store, image: &str) -> Result<OpenedImage, ImageError> {
    open(store, image, None)
}
