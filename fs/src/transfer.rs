//! Moving images between a registry and the local store: `pull` (metadata only for strata
//! images: manifest, config and TOCs; data stays lazy) and `push`.

use std::io::{Read, Write};
use std::sync::Arc;

use crate::image::{is_strata_layer, open_layer_toc, ImageError, ANNOTATION_SOURCE};
use crate::oci::{self, Descriptor};
use crate::reference::Reference;
use crate::registry::{Registry, RegistryBlob, RegistryError};
use crate::store::Store;

/// What a transfer is doing, for progress display.
#[derive(Debug)]
pub enum Progress<'a> {
    /// Starting on a blob (`what`: "config", "layer 2/5", …).
    Blob {
        what: &'a str,
        digest: &'a str,
        size: u64,
    },
    /// Bytes of the current blob moved so far.
    Bytes(u64),
    /// The current blob is done; `moved` is false when nothing had to move.
    Done { moved: bool },
}

#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("{0}")]
    Invalid(String),
}

/// Pulls `r` into the store. Strata layers stay in the registry (only their TOCs are fetched,
/// one range request each, in parallel) unless `all`; other layers are downloaded whole.
pub fn pull(
    store: &Store,
    registry: &Arc<Registry>,
    r: &Reference,
    platform: (&str, &str),
    all: bool,
    progress: &mut dyn FnMut(Progress<'_>),
) -> Result<Descriptor, TransferError> {
    let resolved = registry.resolve(r, platform.0, platform.1)?;
    let manifest = resolved.manifest;
    progress(Progress::Blob {
        what: "config",
        digest: &manifest.config.digest,
        size: manifest.config.size,
    });
    if !store.has_blob(&manifest.config.digest) {
        let config = registry.get_blob(r, &manifest.config.digest, 64 << 20)?;
        store.put_blob(&config)?;
    }
    progress(Progress::Done { moved: true });
    let source = Reference {
        registry: r.registry.clone(),
        repository: r.repository.clone(),
        tag: None,
        digest: None,
    };
    // TOCs of lazy layers, in parallel.
    let lazy: Vec<&Descriptor> = manifest
        .layers
        .iter()
        .filter(|l| !all && is_strata_layer(l) && !store.has_blob(&l.digest))
        .collect();
    let results: Vec<Result<(), ImageError>> = std::thread::scope(|s| {
        let handles: Vec<_> = lazy
            .iter()
            .map(|d| {
                let src =
                    RegistryBlob::new(registry.clone(), source.clone(), d.digest.clone(), d.size);
                s.spawn(move || open_layer_toc(store, d, &src).map(|_| ()))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(ImageError::NoSource("TOC fetch panicked".into())))
            })
            .collect()
    });
    for r in results {
        r?;
    }
    let count = manifest.layers.len();
    for (i, l) in manifest.layers.iter().enumerate() {
        if lazy.iter().any(|d| d.digest == l.digest) || store.has_blob(&l.digest) {
            continue;
        }
        let what = format!("layer {}/{count}", i + 1);
        progress(Progress::Blob {
            what: &what,
            digest: &l.digest,
            size: l.size,
        });
        let mut reader = registry.open_blob(r, &l.digest)?;
        let mut w = store.blob_writer()?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = reader
                .read(&mut buf)
                .map_err(|e| TransferError::Invalid(format!("downloading {}: {e}", l.digest)))?;
            if n == 0 {
                break;
            }
            w.write_all(&buf[..n])
                .map_err(|e| TransferError::Invalid(format!("writing {}: {e}", l.digest)))?;
            progress(Progress::Bytes(w.size()));
        }
        w.commit(Some(&l.digest))?;
        progress(Progress::Done { moved: true });
    }
    let digest = store.put_blob(&resolved.bytes)?;
    if digest != resolved.digest {
        return Err(TransferError::Invalid(format!(
            "manifest digest changed while storing: {} vs {digest}",
            resolved.digest
        )));
    }
    let media_type = if resolved.media_type == oci::MEDIA_TYPE_DOCKER_MANIFEST {
        oci::MEDIA_TYPE_DOCKER_MANIFEST
    } else {
        oci::MEDIA_TYPE_MANIFEST
    };
    let mut d = Descriptor::new(media_type, digest, resolved.bytes.len() as u64);
    d.annotations
        .insert(ANNOTATION_SOURCE.into(), source.name());
    store.tag(r, d.clone())?;
    Ok(d)
}

/// Pushes the local image `image` to `dest`. Blobs the registry has are skipped; blobs of a
/// lazily pulled image are mounted from their source repository when it is on the same registry,
/// else streamed from it.
pub fn push(
    store: &Store,
    registry: &Arc<Registry>,
    image: &str,
    dest: &Reference,
    progress: &mut dyn FnMut(Progress<'_>),
) -> Result<(), TransferError> {
    let record = store.resolve(image)?;
    let manifest_bytes = store.read_blob(&record.descriptor.digest)?;
    let manifest = store.manifest(&record.descriptor.digest)?;
    let source = crate::image::source_of(&record);
    let mut blobs: Vec<(String, &Descriptor)> = manifest
        .layers
        .iter()
        .enumerate()
        .map(|(i, l)| (format!("layer {}/{}", i + 1, manifest.layers.len()), l))
        .collect();
    blobs.push(("config".to_string(), &manifest.config));
    for (what, d) in blobs {
        progress(Progress::Blob {
            what: &what,
            digest: &d.digest,
            size: d.size,
        });
        if registry.blob_size(dest, &d.digest)?.is_some() {
            progress(Progress::Done { moved: false });
            continue;
        }
        if store.has_blob(&d.digest) {
            let mut f = store.open_blob(&d.digest)?;
            registry.upload_blob(dest, &d.digest, &mut f, 16 << 20, &mut |n| {
                progress(Progress::Bytes(n))
            })?;
        } else {
            let src = source.as_ref().ok_or_else(|| {
                TransferError::Invalid(format!("blob {} is not in the store", d.digest))
            })?;
            let mounted = src.registry == dest.registry
                && registry.mount_blob(dest, &d.digest, &src.repository)?;
            if !mounted {
                let mut reader = registry.open_blob(src, &d.digest)?;
                registry.upload_blob(dest, &d.digest, &mut reader, 16 << 20, &mut |n| {
                    progress(Progress::Bytes(n))
                })?;
            }
        }
        progress(Progress::Done { moved: true });
    }
    let target = dest
        .tag
        .clone()
        .unwrap_or_else(|| record.descriptor.digest.clone());
    let media_type = manifest
        .media_type
        .clone()
        .unwrap_or_else(|| oci::MEDIA_TYPE_MANIFEST.to_string());
    registry.put_manifest(dest, &target, &media_type, &manifest_bytes)?;
    Ok(())
}

/// Tag suffix under which an image's access profile is published (`app:v1` →
/// `app:v1.strata-profile`), an OCI artifact next to the image.
pub const PROFILE_TAG_SUFFIX: &str = ".strata-profile";
/// Artifact type and layer media type of a published access profile.
pub const MEDIA_TYPE_PROFILE: &str = "application/vnd.strata.profile.v1+text";
const EMPTY_CONFIG: &[u8] = b"{}";
const MEDIA_TYPE_EMPTY: &str = "application/vnd.oci.empty.v1+json";

/// The reference a profile for `r` is published under.
pub fn profile_reference(r: &Reference) -> Reference {
    Reference {
        registry: r.registry.clone(),
        repository: r.repository.clone(),
        tag: Some(format!(
            "{}{PROFILE_TAG_SUFFIX}",
            r.tag.as_deref().unwrap_or(crate::reference::DEFAULT_TAG)
        )),
        digest: None,
    }
}

/// Publishes an access profile (paths in first-read order) for the image `r`.
pub fn push_profile(
    registry: &Arc<Registry>,
    r: &Reference,
    profile: &[u8],
) -> Result<Reference, TransferError> {
    let target = profile_reference(r);
    let blob_digest = crate::format::Sha256Digest::of(profile).oci();
    let config_digest = crate::format::Sha256Digest::of(EMPTY_CONFIG).oci();
    for (digest, data) in [(&blob_digest, profile), (&config_digest, EMPTY_CONFIG)] {
        if registry.blob_size(&target, digest)?.is_none() {
            registry.upload_blob(&target, digest, &mut &data[..], 16 << 20, &mut |_| {})?;
        }
    }
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": oci::MEDIA_TYPE_MANIFEST,
        "artifactType": MEDIA_TYPE_PROFILE,
        "config": {"mediaType": MEDIA_TYPE_EMPTY, "digest": config_digest, "size": EMPTY_CONFIG.len()},
        "layers": [{"mediaType": MEDIA_TYPE_PROFILE, "digest": blob_digest, "size": profile.len()}],
    });
    let bytes = serde_json::to_vec(&manifest).map_err(|e| TransferError::Invalid(e.to_string()))?;
    let tag = target.tag.clone().unwrap_or_default();
    registry.put_manifest(&target, &tag, oci::MEDIA_TYPE_MANIFEST, &bytes)?;
    Ok(target)
}

/// Fetches the access profile published for `r`, if any.
pub fn fetch_profile(
    registry: &Arc<Registry>,
    r: &Reference,
) -> Result<Option<Vec<u8>>, TransferError> {
    let target = profile_reference(r);
    let (os, arch) = oci::host_platform();
    let resolved = match registry.resolve(&target, os, arch) {
        Ok(m) => m,
        Err(RegistryError::Status { status: 404, .. }) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let Some(layer) = resolved
        .manifest
        .layers
        .iter()
        .find(|l| l.media_type == MEDIA_TYPE_PROFILE)
    else {
        return Ok(None);
    };
    Ok(Some(registry.get_blob(&target, &layer.digest, 64 << 20)?))
}
