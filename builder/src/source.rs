//! Where images come from for conversion: an OCI image layout directory (`oci:DIR[:TAG]`) or a
//! Docker archive (`docker-archive:FILE`, what `docker save` writes).

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use std::sync::Arc;
use strata_fs::oci::{self, Descriptor, Index, Manifest};

use strata_fs::reference::Reference;
use strata_fs::registry::Registry;
use strata_fs::store::read_verified;

use crate::BuildError;

/// One layer of a source image.
pub struct SourceLayer {
    /// Digest of the blob as stored (compressed), when the source knows it.
    pub digest: Option<String>,
    /// Size of the blob as stored.
    pub size: u64,
    /// Where its bytes are.
    location: Location,
}

enum Location {
    File(PathBuf),
    /// A blob in a registry repository.
    Registry(Arc<Registry>, Reference),
    /// A member of an (uncompressed) outer tar: `offset..offset+size` of `path`.
    Slice(PathBuf, u64),
}

impl SourceLayer {
    /// Opens the layer's stored (possibly compressed) bytes.
    pub fn open(&self) -> Result<Box<dyn Read + Send>, BuildError> {
        match &self.location {
            Location::File(p) => {
                let f = File::open(p).map_err(|e| BuildError::io(p, e))?;
                Ok(Box::new(f))
            }
            Location::Registry(reg, r) => {
                let digest = self.digest.clone().unwrap_or_default();
                reg.open_blob(r, &digest)
                    .map_err(|e| BuildError::Source(format!("fetching layer {digest}: {e}")))
            }
            Location::Slice(p, offset) => {
                let mut f = File::open(p).map_err(|e| BuildError::io(p, e))?;
                f.seek(SeekFrom::Start(*offset))
                    .map_err(|e| BuildError::io(p, e))?;
                Ok(Box::new(f.take(self.size)))
            }
        }
    }
}

/// An image read from a source, ready to convert.
pub struct SourceImage {
    /// Raw config JSON.
    pub config: Vec<u8>,
    pub layers: Vec<SourceLayer>,
    /// Manifest annotations to carry over.
    pub annotations: oci::Annotations,
}

/// Parses `oci:DIR[:TAG]`, `docker-archive:FILE` or a registry reference (`[docker://]REF`) and
/// reads the image's metadata.
pub fn open_source(
    spec: &str,
    registry: Option<&Arc<Registry>>,
) -> Result<SourceImage, BuildError> {
    if let Some(rest) = spec.strip_prefix("oci:") {
        let (dir, tag) = match rest.split_once(':') {
            Some((d, t)) => (d, Some(t)),
            None => (rest, None),
        };
        open_oci_layout(Path::new(dir), tag)
    } else if let Some(file) = spec.strip_prefix("docker-archive:") {
        open_docker_archive(Path::new(file))
    } else {
        let r = Reference::parse(spec.strip_prefix("docker://").unwrap_or(spec)).map_err(|e| {
            BuildError::Source(format!(
                "{e} (sources are oci:DIR[:TAG], docker-archive:FILE or a registry reference)"
            ))
        })?;
        let reg = registry
            .ok_or_else(|| BuildError::Source("no registry client for a registry source".into()))?;
        open_registry(reg, &r)
    }
}

fn open_registry(reg: &Arc<Registry>, r: &Reference) -> Result<SourceImage, BuildError> {
    let (os, arch) = oci::host_platform();
    let resolved = reg
        .resolve(r, os, arch)
        .map_err(|e| BuildError::Source(format!("resolving {r}: {e}")))?;
    let manifest = resolved.manifest;
    let config = reg
        .get_blob(r, &manifest.config.digest, 64 << 20)
        .map_err(|e| BuildError::Source(format!("fetching the config of {r}: {e}")))?;
    let layers = manifest
        .layers
        .iter()
        .map(|l| SourceLayer {
            digest: Some(l.digest.clone()),
            size: l.size,
            location: Location::Registry(reg.clone(), r.clone()),
        })
        .collect();
    Ok(SourceImage {
        config,
        layers,
        annotations: manifest.annotations,
    })
}

fn parse_json<T: for<'de> Deserialize<'de>>(data: &[u8], what: &str) -> Result<T, BuildError> {
    serde_json::from_slice(data).map_err(|e| BuildError::Source(format!("{what}: {e}")))
}

fn open_oci_layout(dir: &Path, tag: Option<&str>) -> Result<SourceImage, BuildError> {
    let index_path = dir.join("index.json");
    let index: Index = parse_json(
        &std::fs::read(&index_path).map_err(|e| BuildError::io(&index_path, e))?,
        "index.json",
    )?;
    let blob = |digest: &str| -> Result<PathBuf, BuildError> {
        let (algo, hex) = digest
            .split_once(':')
            .filter(|(a, h)| {
                *a == "sha256" && h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit())
            })
            .ok_or_else(|| BuildError::Source(format!("unsupported digest {digest:?}")))?;
        Ok(dir.join("blobs").join(algo).join(hex))
    };
    let read_blob = |d: &Descriptor| -> Result<Vec<u8>, BuildError> {
        let p = blob(&d.digest)?;
        let f = File::open(&p).map_err(|e| BuildError::io(&p, e))?;
        read_verified(f.take(d.size.min(64 << 20)), &d.digest).map_err(BuildError::from)
    };
    let candidates: Vec<&Descriptor> = match tag {
        Some(t) => index
            .manifests
            .iter()
            .filter(|d| {
                d.annotations
                    .get(oci::ANNOTATION_REF_NAME)
                    .map(String::as_str)
                    == Some(t)
            })
            .collect(),
        None => index.manifests.iter().collect(),
    };
    let mut desc = match candidates.as_slice() {
        [one] => (*one).clone(),
        [] => {
            return Err(BuildError::Source(format!(
                "no image {} in {}",
                tag.unwrap_or("(any)"),
                dir.display()
            )))
        }
        _ => {
            return Err(BuildError::Source(format!(
                "{} holds several images; name one as oci:DIR:TAG",
                dir.display()
            )))
        }
    };
    // Resolve nested indexes to the host platform.
    for _ in 0..4 {
        if !oci::is_index(&desc.media_type) {
            break;
        }
        let idx: Index = parse_json(&read_blob(&desc)?, "image index")?;
        let (os, arch) = oci::host_platform();
        desc = oci::select_platform(&idx.manifests, os, arch)
            .or(match idx.manifests.as_slice() {
                [one] => Some(one),
                _ => None,
            })
            .cloned()
            .ok_or_else(|| BuildError::Source(format!("no manifest for {os}/{arch}")))?;
    }
    let manifest: Manifest = parse_json(&read_blob(&desc)?, "manifest")?;
    let config = read_blob(&manifest.config)?;
    let layers = manifest
        .layers
        .iter()
        .map(|l| {
            Ok(SourceLayer {
                digest: Some(l.digest.clone()),
                size: l.size,
                location: Location::File(blob(&l.digest)?),
            })
        })
        .collect::<Result<_, BuildError>>()?;
    Ok(SourceImage {
        config,
        layers,
        annotations: manifest.annotations,
    })
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ArchiveManifest {
    config: String,
    layers: Vec<String>,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
}

fn open_docker_archive(path: &Path) -> Result<SourceImage, BuildError> {
    let mut images = docker_archive_images(path)?;
    match images.len() {
        1 => Ok(images.remove(0).0),
        n => Err(BuildError::Source(format!(
            "{} holds {n} images; exactly one is supported here",
            path.display()
        ))),
    }
}

/// Every image of a Docker archive (`docker save`, `podman save`, `strata save`) with the names
/// it gives them (`RepoTags`). Layers are read in place from the archive.
pub fn docker_archive_images(path: &Path) -> Result<Vec<(SourceImage, Vec<String>)>, BuildError> {
    // Index the outer tar once: member name → (offset, size).
    let f = File::open(path).map_err(|e| BuildError::io(path, e))?;
    let mut archive = tar::Archive::new(io::BufReader::new(f));
    let mut members: HashMap<Vec<u8>, (u64, u64)> = HashMap::new();
    let bad =
        |e: io::Error| BuildError::Source(format!("{}: not a tar archive: {e}", path.display()));
    for entry in archive.entries().map_err(bad)? {
        let entry = entry.map_err(bad)?;
        let name = strata_fs::format::normalize_path(&entry.path_bytes())
            .map_err(|r| BuildError::Source(format!("archive member: {r}")))?;
        members.insert(name, (entry.raw_file_position(), entry.size()));
    }
    let read_member = |name: &[u8]| -> Result<Vec<u8>, BuildError> {
        let (offset, size) = members.get(name).copied().ok_or_else(|| {
            BuildError::Source(format!(
                "{} missing from the archive",
                String::from_utf8_lossy(name)
            ))
        })?;
        if size > 64 << 20 {
            return Err(BuildError::Source(format!(
                "{}: too large for metadata",
                String::from_utf8_lossy(name)
            )));
        }
        let mut f = File::open(path).map_err(|e| BuildError::io(path, e))?;
        f.seek(SeekFrom::Start(offset))
            .map_err(|e| BuildError::io(path, e))?;
        let mut data = Vec::new();
        f.take(size)
            .read_to_end(&mut data)
            .map_err(|e| BuildError::io(path, e))?;
        Ok(data)
    };
    let manifests: Vec<ArchiveManifest> = parse_json(
        &read_member(b"manifest.json")
            .map_err(|_| BuildError::Source(format!("{}: no manifest.json", path.display())))?,
        "manifest.json",
    )?;
    let key = |n: &str| strata_fs::format::normalize_path(n.as_bytes()).unwrap_or_default();
    let mut out = Vec::new();
    for m in manifests {
        let config = read_member(&key(&m.config))?;
        let layers =
            m.layers
                .iter()
                .map(|l| {
                    let (offset, size) = members.get(&key(l)).copied().ok_or_else(|| {
                        BuildError::Source(format!("layer {l} missing from archive"))
                    })?;
                    Ok(SourceLayer {
                        digest: None,
                        size,
                        location: Location::Slice(path.to_path_buf(), offset),
                    })
                })
                .collect::<Result<_, BuildError>>()?;
        out.push((
            SourceImage {
                config,
                layers,
                annotations: oci::Annotations::new(),
            },
            m.repo_tags.unwrap_or_default(),
        ));
    }
    Ok(out)
}
