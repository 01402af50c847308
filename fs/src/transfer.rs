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
    #[error("starting a thread: {0}")]
    Thread(#[source] std::io::Error),
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
    pull_layers(store, registry, r, resolved, all, true, progress)
}

/// Pulls `r`'s manifest, config and strata layers' TOCs only: plain layers are left in the
/// registry too (for a caller that unpacks them elsewhere, as `strata rpull` does).
pub fn pull_metadata(
    store: &Store,
    registry: &Arc<Registry>,
    r: &Reference,
    platform: (&str, &str),
) -> Result<Descriptor, TransferError> {
    let resolved = registry.resolve(r, platform.0, platform.1)?;
    pull_layers(store, registry, r, resolved, false, false, &mut |_| {})
}

/// [`pull_metadata`] of a manifest the caller has fetched already (`resolved`, verified against
/// its digest, of `r`'s repository), for a caller that uses each layer as soon as its TOC is
/// here (`strata rpull`, which prepares the layers in containerd meanwhile): the config and
/// manifest are stored and the image named before this returns, while the TOCs of its strata
/// layers are fetched in parallel on threads of `scope`. `stored` has one call per layer,
/// made with whether its TOC is stored: from the fetching thread, or before this returns for a
/// layer with no TOC to fetch (a plain layer, or one whose blob is here). A call that is never
/// made (its thread could not start) is dropped.
pub fn pull_metadata_staged<'scope, 'env: 'scope, F>(
    scope: &'scope std::thread::Scope<'scope, 'env>,
    store: &'env Store,
    registry: &'env Arc<Registry>,
    r: &Reference,
    resolved: crate::registry::Resolved,
    stored: Vec<F>,
) -> Result<Descriptor, TransferError>
where
    F: FnOnce(Result<(), String>) + Send + 'scope,
{
    if oci::is_index(&resolved.media_type) {
        return Err(TransferError::Invalid(format!(
            "{r}: an image index where a manifest was expected"
        )));
    }
    refuse_too_many_layers(&resolved.manifest)?;
    if stored.len() != resolved.manifest.layers.len() {
        return Err(TransferError::Invalid(format!(
            "{} calls for the TOCs of {} layers",
            stored.len(),
            resolved.manifest.layers.len()
        )));
    }
    let source = repository_of(r);
    for (d, stored) in resolved.manifest.layers.iter().zip(stored) {
        if !is_strata_layer(d) || store.has_blob(&d.digest) {
            stored(Ok(()));
            continue;
        }
        // From the TOC cache if it holds this TOC intact, else from the registry.
        let src = RegistryBlob::new(registry.clone(), source.clone(), d.digest.clone(), d.size);
        let d = d.clone();
        std::thread::Builder::new()
            .name("strata-toc".into())
            .spawn_scoped(scope, move || {
                let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    open_layer_toc(store, &d, &src)
                }));
                stored(match opened {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(e)) => Err(format!("the TOC of layer {}: {e}", d.digest)),
                    Err(_) => Err(format!("fetching the TOC of layer {} panicked", d.digest)),
                });
            })
            .map_err(TransferError::Thread)?;
    }
    let config = &resolved.manifest.config;
    if !store.has_blob(&config.digest) {
        let bytes = registry.get_blob(r, &config.digest, 64 << 20)?;
        store.put_blob(&bytes)?;
    }
    name_image(store, r, &resolved)
}

fn pull_layers(
    store: &Store,
    registry: &Arc<Registry>,
    r: &Reference,
    resolved: crate::registry::Resolved,
    all: bool,
    plain: bool,
    progress: &mut dyn FnMut(Progress<'_>),
) -> Result<Descriptor, TransferError> {
    let manifest = &resolved.manifest;
    refuse_too_many_layers(manifest)?;
    progress(Progress::Blob {
        what: "config",
        digest: &manifest.config.digest,
        size: manifest.config.size,
    });
    // The config is fetched beside the TOCs (below), each its own request.
    let config = (!store.has_blob(&manifest.config.digest)).then(|| {
        let registry = registry.clone();
        let (r, digest) = (r.clone(), manifest.config.digest.clone());
        std::thread::spawn(move || registry.get_blob(&r, &digest, 64 << 20))
    });
    let source = repository_of(r);
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
    if let Some(fetch) = config {
        let bytes = fetch
            .join()
            .map_err(|_| TransferError::Invalid("the config fetch panicked".into()))??;
        store.put_blob(&bytes)?;
    }
    progress(Progress::Done { moved: true });
    for r in results {
        r?;
    }
    let count = manifest.layers.len();
    for (i, l) in manifest.layers.iter().enumerate() {
        if lazy.iter().any(|d| d.digest == l.digest) || store.has_blob(&l.digest) || !plain {
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
    name_image(store, r, &resolved)
}

/// A manifest of more layers than an image may have is refused before anything is fetched
/// for them (a TOC's fetch takes a thread).
fn refuse_too_many_layers(m: &oci::Manifest) -> Result<(), TransferError> {
    match m.layers.len() {
        n if n > crate::image::MAX_LAYERS => Err(ImageError::TooManyLayers(n).into()),
        _ => Ok(()),
    }
}

/// `r` without its tag or digest: where its blobs are.
fn repository_of(r: &Reference) -> Reference {
    Reference {
        registry: r.registry.clone(),
        repository: r.repository.clone(),
        tag: None,
        digest: None,
    }
}

/// Stores `resolved`'s manifest and names the image `r` (with the repository it came from).
fn name_image(
    store: &Store,
    r: &Reference,
    resolved: &crate::registry::Resolved,
) -> Result<Descriptor, TransferError> {
    let source = repository_of(r);
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

/// Artifact type and layer media type of a published access profile.
pub const MEDIA_TYPE_PROFILE: &str = "application/vnd.strata.profile.v1+text";
const EMPTY_CONFIG: &[u8] = b"{}";
const MEDIA_TYPE_EMPTY: &str = "application/vnd.oci.empty.v1+json";
/// Annotation with the time a profile was published (the newest one is used).
const ANNOTATION_CREATED: &str = "org.opencontainers.image.created";

/// The tag of the OCI referrers tag schema for `digest` (`sha256:HEX` → `sha256-HEX`): an index
/// of the manifests that refer to it, for registries without the referrers API.
pub fn referrers_tag(digest: &str) -> String {
    digest.replacen(':', "-", 1)
}

fn repo_at(r: &Reference, tag: Option<String>) -> Reference {
    Reference {
        registry: r.registry.clone(),
        repository: r.repository.clone(),
        tag,
        digest: None,
    }
}

/// Publishes an access profile (paths in first-read order) for the image `r`, bound to its
/// manifest digest: an OCI artifact whose `subject` is the image's manifest, found through the
/// referrers API or, where the registry has none, the referrers tag schema. Returns the
/// profile manifest's digest and the manifest digest it refers to.
pub fn push_profile(
    registry: &Arc<Registry>,
    r: &Reference,
    profile: &[u8],
) -> Result<(String, String), TransferError> {
    let (os, arch) = oci::host_platform();
    let subject = registry.resolve(r, os, arch)?;
    let repo = repo_at(r, None);
    let blob_digest = crate::format::Sha256Digest::of(profile).oci();
    let config_digest = crate::format::Sha256Digest::of(EMPTY_CONFIG).oci();
    for (digest, data) in [(&blob_digest, profile), (&config_digest, EMPTY_CONFIG)] {
        if registry.blob_size(&repo, digest)?.is_none() {
            registry.upload_blob(&repo, digest, &mut &data[..], 16 << 20, &mut |_| {})?;
        }
    }
    let created = crate::rfc3339::now();
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": oci::MEDIA_TYPE_MANIFEST,
        "artifactType": MEDIA_TYPE_PROFILE,
        "config": {"mediaType": MEDIA_TYPE_EMPTY, "digest": config_digest, "size": EMPTY_CONFIG.len()},
        "layers": [{"mediaType": MEDIA_TYPE_PROFILE, "digest": blob_digest, "size": profile.len()}],
        "subject": {"mediaType": subject.media_type, "digest": subject.digest, "size": subject.bytes.len()},
        "annotations": {ANNOTATION_CREATED: created},
    });
    let bytes = serde_json::to_vec(&manifest).map_err(|e| TransferError::Invalid(e.to_string()))?;
    let digest = crate::format::Sha256Digest::of(&bytes).oci();
    registry.put_manifest(&repo, &digest, oci::MEDIA_TYPE_MANIFEST, &bytes)?;
    // A registry with the referrers API indexes the subject itself; otherwise keep the index at
    // the schema's tag up to date (this profile replaces any earlier one).
    let listed = registry
        .referrers(&repo, &subject.digest, MEDIA_TYPE_PROFILE)?
        .is_some_and(|l| l.iter().any(|d| d.digest == digest));
    if !listed {
        let tag = referrers_tag(&subject.digest);
        let mut index = match registry.fetch_manifest(&repo, &tag) {
            Ok(found) => serde_json::from_slice::<oci::Index>(&found.bytes)
                .map_err(|e| TransferError::Invalid(format!("referrers index {tag}: {e}")))?,
            Err(RegistryError::Status { status: 404, .. }) => oci::Index::default(),
            Err(e) => return Err(e.into()),
        };
        index.media_type = Some(oci::MEDIA_TYPE_INDEX.to_string());
        index
            .manifests
            .retain(|d| crate::registry::artifact_type_of(d) != Some(MEDIA_TYPE_PROFILE));
        let mut d =
            oci::Descriptor::new(oci::MEDIA_TYPE_MANIFEST, digest.clone(), bytes.len() as u64);
        d.extra
            .insert("artifactType".into(), MEDIA_TYPE_PROFILE.into());
        d.annotations.insert(ANNOTATION_CREATED.into(), created);
        index.manifests.push(d);
        let body = serde_json::to_vec(&index).map_err(|e| TransferError::Invalid(e.to_string()))?;
        registry.put_manifest(
            &repo_at(r, Some(tag.clone())),
            &tag,
            oci::MEDIA_TYPE_INDEX,
            &body,
        )?;
    }
    Ok((digest, subject.digest))
}

/// Fetches the newest access profile published for the image whose manifest digest is
/// `manifest_digest` in `r`'s repository, if any (referrers API, then the tag schema).
pub fn fetch_profile(
    registry: &Arc<Registry>,
    r: &Reference,
    manifest_digest: &str,
) -> Result<Option<Vec<u8>>, TransferError> {
    let repo = repo_at(r, None);
    let tag = referrers_tag(manifest_digest);
    // The referrers API and the tag schema side by side: a registry without the API (such as
    // docker-registry 2.8) costs no extra round trip.
    let (api, by_tag) = std::thread::scope(|s| {
        let by_tag = s.spawn(|| registry.fetch_manifest(&repo, &tag));
        let api = registry.referrers(&repo, manifest_digest, MEDIA_TYPE_PROFILE);
        (api, by_tag.join())
    });
    // A registry whose referrers API fails (some answer 400 or 405 rather than 404) may still
    // have the tag.
    let mut found = match api {
        Ok(found) => found.unwrap_or_default(),
        // The tag schema answers for a registry whose API fails (some answer 400 or 405
        // rather than 404): with the tag, or with a 404 for it (no profile).
        Err(e)
            if by_tag.as_ref().is_ok_and(|t| {
                matches!(t, Ok(_) | Err(RegistryError::Status { status: 404, .. }))
            }) =>
        {
            tracing::debug!("referrers API of {repo}: {e}; using the referrers tag");
            Vec::new()
        }
        Err(e) => return Err(e.into()),
    };
    if found.is_empty() {
        let by_tag = by_tag.map_err(|_| {
            TransferError::Invalid(format!("looking up {tag}: the lookup panicked"))
        })?;
        match by_tag {
            Ok(index) => {
                let index: oci::Index = serde_json::from_slice(&index.bytes)
                    .map_err(|e| TransferError::Invalid(format!("referrers index {tag}: {e}")))?;
                found = index
                    .manifests
                    .into_iter()
                    .filter(|d| crate::registry::artifact_type_of(d) == Some(MEDIA_TYPE_PROFILE))
                    .collect();
            }
            Err(RegistryError::Status { status: 404, .. }) => return Ok(None),
            Err(e) => return Err(e.into()),
        }
    }
    // RFC 3339 times in UTC sort as strings.
    let Some(newest) = found.iter().max_by(|a, b| {
        a.annotations
            .get(ANNOTATION_CREATED)
            .cmp(&b.annotations.get(ANNOTATION_CREATED))
    }) else {
        return Ok(None);
    };
    let manifest = registry.fetch_manifest(&repo, &newest.digest)?;
    // The artifact must really be about this image.
    let subject = serde_json::from_slice::<serde_json::Value>(&manifest.bytes)
        .ok()
        .and_then(|v| v["subject"]["digest"].as_str().map(str::to_string));
    if subject.as_deref() != Some(manifest_digest) {
        return Err(TransferError::Invalid(format!(
            "profile {} does not refer to {manifest_digest}",
            newest.digest
        )));
    }
    let Some(layer) = manifest
        .manifest
        .layers
        .iter()
        .find(|l| l.media_type == MEDIA_TYPE_PROFILE)
    else {
        return Ok(None);
    };
    Ok(Some(registry.get_blob(&repo, &layer.digest, 64 << 20)?))
}
