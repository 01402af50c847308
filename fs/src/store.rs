//! The local content store: an OCI image layout on disk.
//!
//! The root's layout is defined in [`crate::layout`]. The root and every directory under it are
//! created 0700 and files 0600: decompressed image content is readable by other users only
//! through a mount's own permission checks.
//!
//! Standard tools read it directly (`skopeo copy oci:ROOT:NAME …`). Every write goes to a temp
//! file, is fsynced, then renamed into place; a blob is stored only after its digest is checked.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use crate::format::Sha256Digest;
use crate::layout::Layout;
use crate::oci::{self, Descriptor, Index, Manifest};
use crate::reference::Reference;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store I/O error at {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("blob digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch { expected: String, actual: String },
    #[error("blob {0} is not in the store")]
    MissingBlob(String),
    #[error("unsupported digest {0:?} (only sha256 is supported)")]
    BadDigest(String),
    #[error("image {0} not found in the local store")]
    UnknownImage(String),
    #[error("corrupt store metadata {path}: {reason}")]
    Corrupt { path: PathBuf, reason: String },
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Creates `dir` and its missing parents 0700. An existing directory must belong to this user
/// (a store in a directory another user controls could be swapped under the daemon, which runs
/// as root): one that does not is refused, one that is open to others is narrowed to 0700.
pub fn create_private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_err(dir))?;
    let md = fs::symlink_metadata(dir).map_err(io_err(dir))?;
    if !md.is_dir() || md.uid() != nix_uid() {
        return Err(StoreError::Io {
            path: dir.to_path_buf(),
            source: io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "owned by uid {} (or not a directory), not by this user (uid {}): refusing \
                     to keep a store there",
                    md.uid(),
                    nix_uid()
                ),
            ),
        });
    }
    if md.mode() & 0o077 != 0 {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io_err(dir))?;
    }
    Ok(())
}

fn nix_uid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

/// The default store root (root's; see [`default_root`]).
pub const DEFAULT_ROOT: &str = "/var/lib/strata";

/// The store root when none is given: [`DEFAULT_ROOT`] for root, else the user's own
/// (`$XDG_DATA_HOME/strata`, by default `~/.local/share/strata`), as rootless podman keeps its
/// storage.
pub fn default_root() -> PathBuf {
    if nix::unistd::geteuid().is_root() {
        return PathBuf::from(DEFAULT_ROOT);
    }
    let data = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")));
    match data {
        Some(d) => d.join("strata"),
        None => PathBuf::from(DEFAULT_ROOT),
    }
}

pub struct Store {
    root: PathBuf,
    layout: Layout,
}

/// A named image in the store.
#[derive(Clone, Debug)]
pub struct ImageRecord {
    pub reference: Reference,
    pub descriptor: Descriptor,
}

impl Store {
    /// Opens (creating if needed) the store at `root`.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        let layout = Layout::new(&root);
        create_private_dir(&root)?;
        for d in [
            layout.blobs(),
            layout.tmp(),
            layout.state().to_path_buf(),
            layout.mounts(),
        ] {
            create_private_dir(&d)?;
        }
        let store = Store { root, layout };
        let layout = store.root.join("oci-layout");
        if !layout.exists() {
            store.write_atomic(&layout, br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        }
        let index = store.root.join("index.json");
        if !index.exists() {
            let body =
                serde_json::to_vec_pretty(&Index::default()).map_err(|e| StoreError::Corrupt {
                    path: index.clone(),
                    reason: e.to_string(),
                })?;
            store.write_atomic(&index, &body)?;
        }
        Ok(store)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Paths under the root.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    pub fn mounts_dir(&self) -> PathBuf {
        self.layout.mounts()
    }

    /// Path of a blob by digest (`sha256:HEX`).
    pub fn blob_path(&self, digest: &str) -> Result<PathBuf> {
        let d = Sha256Digest::parse(digest)
            .filter(|_| digest.starts_with("sha256:"))
            .ok_or_else(|| StoreError::BadDigest(digest.to_string()))?;
        Ok(self.root.join("blobs/sha256").join(d.hex()))
    }

    pub fn has_blob(&self, digest: &str) -> bool {
        self.blob_path(digest).is_ok_and(|p| p.exists())
    }

    /// Reads a (small) blob whole and verifies its digest.
    pub fn read_blob(&self, digest: &str) -> Result<Vec<u8>> {
        let path = self.blob_path(digest)?;
        let data = match fs::read(&path) {
            Ok(d) => d,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StoreError::MissingBlob(digest.to_string()))
            }
            Err(e) => return Err(io_err(&path)(e)),
        };
        let actual = Sha256Digest::of(&data).oci();
        if actual != digest {
            return Err(StoreError::DigestMismatch {
                expected: digest.to_string(),
                actual,
            });
        }
        Ok(data)
    }

    /// Opens a blob for reading (no verification: callers verify by chunk or stream).
    pub fn open_blob(&self, digest: &str) -> Result<File> {
        let path = self.blob_path(digest)?;
        File::open(&path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => StoreError::MissingBlob(digest.to_string()),
            _ => io_err(&path)(e),
        })
    }

    /// Stores `data`; returns its digest.
    pub fn put_blob(&self, data: &[u8]) -> Result<String> {
        let mut w = self.blob_writer()?;
        w.write_all(data).map_err(io_err(&self.root))?;
        w.commit(None)
    }

    /// Starts a streaming blob write.
    pub fn blob_writer(&self) -> Result<BlobWriter> {
        let tmp = tempfile_in(&self.root.join("tmp"))?;
        Ok(BlobWriter {
            file: tmp.0,
            path: Some(tmp.1),
            hasher: Sha256::new(),
            size: 0,
            blobs: self.root.join("blobs/sha256"),
        })
    }

    /// Writes a file under the store root crash-safely (temp, fsync, rename).
    pub fn write_file(&self, dest: &Path, data: &[u8]) -> Result<()> {
        if let Some(parent) = dest.parent() {
            create_private_dir(parent)?;
        }
        self.write_atomic(dest, data)
    }

    /// [`Self::write_file`] without the fsyncs, for a file that only matters while the machine
    /// is up, or that its reader verifies (a TOC in the cache, a mount's record): a process
    /// that dies leaves it whole or absent; a machine that dies may leave it empty or torn,
    /// which its reader drops. A pull then waits on no disk flush for it.
    pub fn write_file_unsynced(&self, dest: &Path, data: &[u8]) -> Result<()> {
        if let Some(parent) = dest.parent() {
            create_private_dir(parent)?;
        }
        let (mut f, tmp) = tempfile_in(&self.root.join("tmp"))?;
        let res = f.write_all(data).and_then(|()| fs::rename(&tmp, dest));
        if res.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        res.map_err(io_err(dest))
    }

    fn write_atomic(&self, dest: &Path, data: &[u8]) -> Result<()> {
        let (mut f, tmp) = tempfile_in(&self.root.join("tmp"))?;
        let res = (|| {
            f.write_all(data)?;
            f.sync_all()?;
            fs::rename(&tmp, dest)?;
            sync_dir(dest.parent().unwrap_or(Path::new(".")))
        })();
        if res.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        res.map_err(io_err(dest))
    }

    fn lock(&self) -> Result<File> {
        use std::os::unix::fs::OpenOptionsExt;
        let path = self.layout.index_lock();
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(io_err(&path))?;
        f.lock().map_err(io_err(&path))?;
        Ok(f)
    }

    fn read_index(&self) -> Result<Index> {
        let path = self.root.join("index.json");
        let data = fs::read(&path).map_err(io_err(&path))?;
        serde_json::from_slice(&data).map_err(|e| StoreError::Corrupt {
            path,
            reason: e.to_string(),
        })
    }

    /// Names `reference` → `descriptor` (replacing an earlier image of that name).
    pub fn tag(&self, reference: &Reference, mut descriptor: Descriptor) -> Result<()> {
        let _guard = self.lock()?;
        let mut index = self.read_index()?;
        let name = reference.to_string();
        index.manifests.retain(|d| {
            d.annotations
                .get(oci::ANNOTATION_REF_NAME)
                .map(String::as_str)
                != Some(name.as_str())
        });
        descriptor
            .annotations
            .insert(oci::ANNOTATION_REF_NAME.to_string(), name);
        index.manifests.push(descriptor);
        let body = serde_json::to_vec_pretty(&index).map_err(|e| StoreError::Corrupt {
            path: self.root.join("index.json"),
            reason: e.to_string(),
        })?;
        self.write_atomic(&self.root.join("index.json"), &body)
    }

    /// Removes a name; returns whether it existed. Blobs stay until garbage collection.
    pub fn untag(&self, reference: &Reference) -> Result<bool> {
        let _guard = self.lock()?;
        let mut index = self.read_index()?;
        let name = reference.to_string();
        let before = index.manifests.len();
        index.manifests.retain(|d| {
            d.annotations
                .get(oci::ANNOTATION_REF_NAME)
                .map(String::as_str)
                != Some(name.as_str())
        });
        if index.manifests.len() == before {
            return Ok(false);
        }
        let body = serde_json::to_vec_pretty(&index).map_err(|e| StoreError::Corrupt {
            path: self.root.join("index.json"),
            reason: e.to_string(),
        })?;
        self.write_atomic(&self.root.join("index.json"), &body)?;
        Ok(true)
    }

    /// Every named image.
    pub fn images(&self) -> Result<Vec<ImageRecord>> {
        let index = self.read_index()?;
        Ok(index
            .manifests
            .into_iter()
            .filter_map(|d| {
                let name = d.annotations.get(oci::ANNOTATION_REF_NAME)?;
                let reference = Reference::parse(name).ok()?;
                Some(ImageRecord {
                    reference,
                    descriptor: d,
                })
            })
            .collect())
    }

    /// Finds an image by reference, or by (a unique prefix of) its manifest digest; `repo:tag`
    /// also finds the image last named `repo:tag@digest` (as `strata rpull` names images).
    pub fn resolve(&self, image: &str) -> Result<ImageRecord> {
        let images = self.images()?;
        if let Ok(r) = Reference::parse(image) {
            if let Some(rec) = images.iter().find(|i| i.reference == r) {
                return Ok(rec.clone());
            }
            if let Some(d) = &r.digest {
                if let Some(rec) = images.iter().find(|i| &i.descriptor.digest == d) {
                    return Ok(rec.clone());
                }
            } else if r.tag.is_some() {
                // A tag names the image last pulled pinned by it (`repo:tag@digest`, as `rpull`
                // keeps every manifest the tag named, for the lazy layers mounted from them).
                if let Some(rec) = images.iter().rev().find(|i| {
                    i.reference.digest.is_some()
                        && i.reference.registry == r.registry
                        && i.reference.repository == r.repository
                        && i.reference.tag == r.tag
                }) {
                    return Ok(rec.clone());
                }
            }
        }
        let hex = image.strip_prefix("sha256:").unwrap_or(image);
        if hex.len() >= 6 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            let hits: Vec<_> = images
                .iter()
                .filter(|i| i.descriptor.digest.starts_with(&format!("sha256:{hex}")))
                .collect();
            if let [one] = hits.as_slice() {
                return Ok((*one).clone());
            }
        }
        Err(StoreError::UnknownImage(image.to_string()))
    }

    /// Reads and parses a manifest by digest.
    pub fn manifest(&self, digest: &str) -> Result<Manifest> {
        let data = self.read_blob(digest)?;
        serde_json::from_slice(&data).map_err(|e| StoreError::Corrupt {
            path: self.blob_path(digest).unwrap_or_default(),
            reason: format!("manifest: {e}"),
        })
    }
}

/// A blob being written; hashed as it goes, renamed into place by [`BlobWriter::commit`].
pub struct BlobWriter {
    file: File,
    path: Option<PathBuf>,
    hasher: Sha256,
    size: u64,
    blobs: PathBuf,
}

impl BlobWriter {
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Finishes the blob: checks `expected` (if given), fsyncs, and renames it into place.
    pub fn commit(mut self, expected: Option<&str>) -> Result<String> {
        let digest = Sha256Digest(self.hasher.clone().finalize().into()).oci();
        if let Some(exp) = expected {
            if exp != digest {
                return Err(StoreError::DigestMismatch {
                    expected: exp.to_string(),
                    actual: digest,
                });
            }
        }
        let tmp = self.path.take().unwrap_or_default();
        let dest = self.blobs.join(&digest["sha256:".len()..]);
        let res = (|| {
            self.file.sync_all()?;
            fs::rename(&tmp, &dest)?;
            sync_dir(&self.blobs)
        })();
        if res.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        res.map_err(io_err(&dest))?;
        Ok(digest)
    }
}

impl Write for BlobWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        if let Some(p) = self.path.take() {
            let _ = fs::remove_file(p);
        }
    }
}

fn tempfile_in(dir: &Path) -> Result<(File, PathBuf)> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    loop {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(format!(".tmp-{}-{n}", std::process::id()));
        match private_new_file(&path) {
            Ok(f) => return Ok((f, path)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(io_err(&path)(e)),
        }
    }
}

/// Creates a new file 0600 for writing, refusing to follow a symlink or reuse an existing file
/// (`O_CREAT|O_EXCL|O_NOFOLLOW`): a temp name planted by someone else is never written through.
pub fn private_new_file(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Reads a whole stream, verifying it against `expected` (used for blobs read from elsewhere).
pub fn read_verified(mut r: impl Read, expected: &str) -> Result<Vec<u8>> {
    let mut data = Vec::new();
    r.read_to_end(&mut data)
        .map_err(io_err(Path::new(expected)))?;
    let actual = Sha256Digest::of(&data).oci();
    if actual != expected {
        return Err(StoreError::DigestMismatch {
            expected: expected.to_string(),
            actual,
        });
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blobs_tags_and_resolve() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let d = store.put_blob(b"hello").unwrap();
        assert_eq!(store.read_blob(&d).unwrap(), b"hello");
        let mut w = store.blob_writer().unwrap();
        w.write_all(b"x").unwrap();
        assert!(
            w.commit(Some(&d)).is_err(),
            "wrong expected digest must fail"
        );
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
        let r = Reference::parse("app:v1").unwrap();
        store
            .tag(&r, Descriptor::new(oci::MEDIA_TYPE_MANIFEST, d.clone(), 5))
            .unwrap();
        store
            .tag(&r, Descriptor::new(oci::MEDIA_TYPE_MANIFEST, d.clone(), 5))
            .unwrap();
        assert_eq!(store.images().unwrap().len(), 1);
        assert_eq!(store.resolve("app:v1").unwrap().descriptor.digest, d);
        assert_eq!(store.resolve(&d[7..19]).unwrap().reference, r);
        assert!(store.untag(&r).unwrap());
        assert!(store.resolve("app:v1").is_err());
        // Pinned by its tag (as `rpull` names it): the tag alone finds it, and the last one so
        // pinned once the tag has moved.
        let pinned = Reference::parse(&format!("app:v1@{d}")).unwrap();
        store
            .tag(
                &pinned,
                Descriptor::new(oci::MEDIA_TYPE_MANIFEST, d.clone(), 5),
            )
            .unwrap();
        assert_eq!(store.resolve("app:v1").unwrap().reference, pinned);
        assert!(store.resolve("app:v2").is_err());
        let other = format!("sha256:{}", "1".repeat(64));
        let pinned2 = Reference::parse(&format!("app:v1@{other}")).unwrap();
        store
            .tag(
                &pinned2,
                Descriptor::new(oci::MEDIA_TYPE_MANIFEST, other, 5),
            )
            .unwrap();
        assert_eq!(store.resolve("app:v1").unwrap().reference, pinned2);
    }
}
