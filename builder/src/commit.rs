//! `commit`: a container's upper layer becomes one strata layer of a new image.
//!
//! The upper directory (overlayfs's form) is walked and written as an OCI layer tar: whiteouts
//! (0/0 character devices) become `.wh.NAME`, opaque directories get `.wh..wh..opq`, files take
//! their content and metadata from the container's merged view (so metadata-only copy-ups and
//! renamed directories carry the image's bytes), hard links stay links. The tar goes through the
//! same converter as `strata convert`; the image config gains the diff ID and a history entry,
//! `-c` instructions change the config, and the name is written last: a crash leaves no image or
//! a complete one.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use strata_fs::oci::{self, Descriptor};
use strata_fs::reference::Reference;
use strata_fs::store::Store;

use crate::convert::{convert_layer, layer_descriptor, ConvertOptions};
use crate::BuildError;

/// What `commit` records about the new layer.
#[derive(Clone, Debug, Default)]
pub struct CommitOptions {
    /// History `comment` (`-m`).
    pub message: String,
    /// History and config `author` (`-a`).
    pub author: String,
    /// History `created_by` (the container's command).
    pub created_by: String,
    /// Dockerfile instructions applied to the config (`-c`).
    pub changes: Vec<String>,
}

/// The new image's manifest descriptor and its layer's diff ID.
#[derive(Clone, Debug)]
pub struct Committed {
    pub manifest: Descriptor,
    pub diff_id: String,
}

fn rel_name(p: &Path) -> Vec<u8> {
    p.as_os_str().as_bytes().to_vec()
}

/// The header of an empty whiteout or opaque marker file.
fn marker_header() -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_size(0);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h
}

/// A pipe between two threads in 1 MiB blocks (a kernel pipe copies twice, 64 KiB at a time):
/// at most `depth` blocks in flight. The reader sees the end when the writer is dropped; the
/// writer fails once the reader is gone.
fn block_pipe(depth: usize) -> (BlockWriter, BlockReader) {
    let (tx, rx) = crossbeam_channel::bounded(depth);
    // Read blocks go back to the writer (no fresh pages per block).
    let (back_tx, back_rx) = crossbeam_channel::bounded(depth + 1);
    (
        BlockWriter {
            tx,
            back: back_rx,
            buf: Vec::with_capacity(BLOCK),
        },
        BlockReader {
            rx,
            back: back_tx,
            block: Vec::new(),
            at: 0,
        },
    )
}

const BLOCK: usize = 1 << 20;

struct BlockWriter {
    tx: crossbeam_channel::Sender<Vec<u8>>,
    back: crossbeam_channel::Receiver<Vec<u8>>,
    buf: Vec<u8>,
}

impl Write for BlockWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let n = data.len().min(BLOCK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == BLOCK {
            self.flush()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let mut next = self
            .back
            .try_recv()
            .unwrap_or_else(|_| Vec::with_capacity(BLOCK));
        next.clear();
        let full = std::mem::replace(&mut self.buf, next);
        self.tx
            .send(full)
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::BrokenPipe))
    }
}

struct BlockReader {
    rx: crossbeam_channel::Receiver<Vec<u8>>,
    back: crossbeam_channel::Sender<Vec<u8>>,
    block: Vec<u8>,
    at: usize,
}

impl std::io::Read for BlockReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.at == self.block.len() {
            match self.rx.recv() {
                Ok(b) => {
                    let done = std::mem::replace(&mut self.block, b);
                    self.at = 0;
                    let _ = self.back.try_send(done);
                }
                Err(_) => return Ok(0), // the writer is done
            }
        }
        let n = out.len().min(self.block.len() - self.at);
        out[..n].copy_from_slice(&self.block[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// Reads exactly `left` bytes of a file, failing if it ends sooner.
struct Exact<'a, R> {
    inner: std::io::Take<R>,
    left: u64,
    path: &'a Path,
}

impl<R: std::io::Read> std::io::Read for Exact<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && self.left > 0 && !buf.is_empty() {
            return Err(std::io::Error::other(format!(
                "{} shrank while being committed: pause the container (--pause)",
                self.path.display()
            )));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// Whether an upper directory was renamed from elsewhere (`redirect_dir=on`): its contents are
/// partly the lower directory it came from, which the upper dir does not hold.
fn is_redirected(up: &Path) -> bool {
    xattr::get(up, "trusted.overlay.redirect")
        .ok()
        .flatten()
        .is_some()
}

/// The container-visible extended attributes of `view` that a layer keeps, as PAX records
/// (`SCHILY.xattr.NAME`), as Docker and containers/storage write them.
fn xattr_records(view: &Path) -> Result<Vec<(String, Vec<u8>)>, BuildError> {
    let names = match xattr::list(view) {
        Ok(n) => n,
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => return Ok(Vec::new()),
        Err(e) => return Err(BuildError::io(view, e)),
    };
    let mut out = Vec::new();
    for name in names {
        let Some(name) = name.to_str().map(str::to_string) else {
            continue;
        };
        // What Docker and containers/storage keep: file capabilities and user attributes
        // (not SELinux labels, ACLs, IMA or other trusted.* of the host).
        if !(name == "security.capability" || name.starts_with("user.")) {
            continue;
        }
        if let Some(value) = xattr::get(view, &name).map_err(|e| BuildError::io(view, e))? {
            out.push((format!("SCHILY.xattr.{name}"), value));
        }
    }
    out.sort();
    Ok(out)
}

/// Writes the upper directory as an OCI layer tar into `out`.
fn write_layer_tar(
    upper: &Path,
    merged: &Path,
    exclude: &[PathBuf],
    out: &mut impl Write,
) -> Result<(), BuildError> {
    let mut b = tar::Builder::new(out);
    b.mode(tar::HeaderMode::Complete);
    let mut links: HashMap<(u64, u64), PathBuf> = HashMap::new();
    // (directory, whether it is listed from the merged view: below a renamed directory every
    // entry is written, the upper dir holding only what changed since)
    let mut stack = vec![(PathBuf::new(), false)];
    while let Some((dir, whole)) = stack.pop() {
        let list_dir = if whole { merged } else { upper }.join(&dir);
        let mut names: Vec<_> = std::fs::read_dir(&list_dir)
            .map_err(|e| BuildError::io(&list_dir, e))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()
            .map_err(|e| BuildError::io(&list_dir, e))?;
        names.sort();
        for name in names {
            let rel = dir.join(&name);
            if exclude
                .iter()
                .any(|x| Path::new("/").join(&rel).starts_with(x))
            {
                continue;
            }
            let up = upper.join(&rel);
            if !whole {
                let md = std::fs::symlink_metadata(&up).map_err(|e| BuildError::io(&up, e))?;
                if strata_fs::upper::is_whiteout(&md) {
                    let mut h = marker_header();
                    let mut wh = rel_name(&dir);
                    if !wh.is_empty() {
                        wh.push(b'/');
                    }
                    wh.extend_from_slice(b".wh.");
                    wh.extend_from_slice(name.as_bytes());
                    b.append_data(&mut h, Path::new(std::ffi::OsStr::from_bytes(&wh)), &[][..])
                        .map_err(BuildError::Write)?;
                    continue;
                }
            }
            // Metadata (and content) as the container sees them.
            let view = merged.join(&rel);
            let vmd = std::fs::symlink_metadata(&view).map_err(|e| BuildError::io(&view, e))?;
            let ft = vmd.file_type();
            if ft.is_socket() {
                continue; // not kept (as Docker)
            }
            let xattrs = xattr_records(&view)?;
            if !xattrs.is_empty() {
                b.append_pax_extensions(xattrs.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
                    .map_err(BuildError::Write)?;
            }
            let mut h = tar::Header::new_gnu();
            h.set_metadata_in_mode(&vmd, tar::HeaderMode::Complete);
            if ft.is_dir() {
                h.set_size(0);
                b.append_data(&mut h, &rel, &[][..])
                    .map_err(BuildError::Write)?;
                let renamed = !whole && is_redirected(&up);
                if !whole && (renamed || strata_fs::upper::is_opaque(&up)) {
                    let mut o = marker_header();
                    b.append_data(&mut o, rel.join(".wh..wh..opq"), &[][..])
                        .map_err(BuildError::Write)?;
                }
                stack.push((rel, whole || renamed));
            } else if ft.is_file() {
                if vmd.nlink() > 1 {
                    if let Some(first) = links.get(&(vmd.dev(), vmd.ino())) {
                        h.set_entry_type(tar::EntryType::Link);
                        h.set_size(0);
                        b.append_link(&mut h, &rel, first)
                            .map_err(BuildError::Write)?;
                        continue;
                    }
                    links.insert((vmd.dev(), vmd.ino()), rel.clone());
                }
                let f = File::open(&view).map_err(|e| BuildError::io(&view, e))?;
                let f = BufReader::with_capacity(BLOCK.min(vmd.len() as usize).max(4096), f);
                // Exactly the size in the header: a file that grows or shrinks meanwhile (the
                // container runs on) fails the commit instead of corrupting the stream.
                let exact = Exact {
                    inner: f.take(vmd.len()),
                    left: vmd.len(),
                    path: &view,
                };
                b.append_data(&mut h, &rel, exact)
                    .map_err(|e| BuildError::io(&view, e))?;
            } else if ft.is_symlink() {
                let target = std::fs::read_link(&view).map_err(|e| BuildError::io(&view, e))?;
                h.set_size(0);
                b.append_link(&mut h, &rel, &target)
                    .map_err(BuildError::Write)?;
            } else {
                h.set_size(0);
                b.append_data(&mut h, &rel, &[][..])
                    .map_err(BuildError::Write)?;
            }
        }
    }
    b.finish().map_err(BuildError::Write)?;
    Ok(())
}

/// Applies one Dockerfile instruction (`-c`) to an image config's `config` object.
pub fn apply_change(config: &mut serde_json::Value, change: &str) -> Result<(), BuildError> {
    let bad = |why: &str| BuildError::Source(format!("bad -c instruction {change:?}: {why}"));
    let (word, rest) = change
        .trim()
        .split_once(char::is_whitespace)
        .ok_or_else(|| bad("expected INSTRUCTION ARGUMENTS"))?;
    let rest = rest.trim();
    let list = |s: &str| -> Result<serde_json::Value, BuildError> {
        if s.starts_with('[') {
            let v: Vec<String> =
                serde_json::from_str(s).map_err(|_| bad("not a JSON array of strings"))?;
            Ok(serde_json::json!(v))
        } else {
            Ok(serde_json::json!(["/bin/sh", "-c", s]))
        }
    };
    let c = &mut config["config"];
    if !c.is_object() {
        *c = serde_json::json!({});
    }
    match word.to_ascii_uppercase().as_str() {
        "CMD" => c["Cmd"] = list(rest)?,
        "ENTRYPOINT" => c["Entrypoint"] = list(rest)?,
        "WORKDIR" => c["WorkingDir"] = serde_json::json!(rest),
        "USER" => c["User"] = serde_json::json!(rest),
        "STOPSIGNAL" => c["StopSignal"] = serde_json::json!(rest),
        "ENV" => {
            let (k, v) = rest
                .split_once('=')
                .or_else(|| rest.split_once(char::is_whitespace))
                .ok_or_else(|| bad("expected KEY=VALUE"))?;
            let mut env: Vec<String> = c["Env"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|s| s.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default();
            env.retain(|e| e.split('=').next() != Some(k.trim()));
            env.push(format!("{}={}", k.trim(), v.trim().trim_matches('"')));
            c["Env"] = serde_json::json!(env);
        }
        "LABEL" => {
            let (k, v) = rest
                .split_once('=')
                .ok_or_else(|| bad("expected KEY=VALUE"))?;
            if !c["Labels"].is_object() {
                c["Labels"] = serde_json::json!({});
            }
            c["Labels"][k.trim().trim_matches('"')] = serde_json::json!(v.trim().trim_matches('"'));
        }
        "EXPOSE" => {
            if !c["ExposedPorts"].is_object() {
                c["ExposedPorts"] = serde_json::json!({});
            }
            for p in rest.split_whitespace() {
                let p = if p.contains('/') {
                    p.to_string()
                } else {
                    format!("{p}/tcp")
                };
                c["ExposedPorts"][p] = serde_json::json!({});
            }
        }
        "VOLUME" => {
            if !c["Volumes"].is_object() {
                c["Volumes"] = serde_json::json!({});
            }
            let paths: Vec<String> = if rest.starts_with('[') {
                serde_json::from_str(rest).map_err(|_| bad("not a JSON array of strings"))?
            } else {
                rest.split_whitespace().map(str::to_string).collect()
            };
            for p in paths {
                c["Volumes"][p] = serde_json::json!({});
            }
        }
        other => {
            return Err(bad(&format!(
                "{other} cannot be applied to an image config"
            )))
        }
    }
    Ok(())
}

/// Writes `upper` (an overlay upper directory, or any directory: then `merged` is the same
/// directory) as one strata layer in the store: the layer's descriptor and diff ID. The tar
/// streams from a walker thread straight into the converter (no temp copy).
pub fn layer_from_upper(
    store: &Store,
    upper: &Path,
    merged: &Path,
    exclude: &[PathBuf],
) -> Result<(Descriptor, String), BuildError> {
    let (writer, reader) = block_pipe(8);
    let result = std::thread::scope(|s| {
        let walker = s.spawn(move || {
            let mut w = writer;
            write_layer_tar(upper, merged, exclude, &mut w)?;
            w.flush().map_err(BuildError::Write)
        });
        let opts = ConvertOptions {
            hash_source: false,
            ..ConvertOptions::default()
        };
        let converted = convert_layer(reader, store.blob_writer()?, &opts);
        // Any walker error fails the commit (a tar cut short must not become a layer); the
        // converter's error is the cause when the walker only saw it stop reading.
        let walked = walker
            .join()
            .unwrap_or_else(|_| Err(BuildError::Source("the layer walker panicked".into())));
        let (blob, c) = match (walked, converted) {
            (Ok(()), Ok(done)) => done,
            (Err(BuildError::Write(e) | BuildError::Io { source: e, .. }), Err(conv))
                if e.kind() == std::io::ErrorKind::BrokenPipe =>
            {
                return Err(conv)
            }
            (Err(e), _) | (Ok(()), Err(e)) => return Err(e),
        };
        let digest = blob.commit(None)?;
        Ok::<_, BuildError>((layer_descriptor(digest, &c.summary), c))
    });
    let (layer, c) = result?;
    Ok((layer, c.summary.diff_id.oci()))
}

/// The annotation marking a build cache entry with its full key (set by the builder only).
pub const BUILD_KEY_ANNOTATION: &str = "dev.strata.build.key";

/// Writes `config` and a manifest of `layers` to the store and names it `dst`, keeping the
/// registry source annotations of the image the layers came from (lazily pulled layers stay
/// reachable): the manifest's descriptor.
pub fn save_image(
    store: &Store,
    template: &oci::Manifest,
    layers: Vec<Descriptor>,
    config: &serde_json::Value,
    source_annotations: &oci::Annotations,
    dst: &Reference,
) -> Result<Descriptor, BuildError> {
    let config_bytes = serde_json::to_vec(config).map_err(|e| BuildError::Source(e.to_string()))?;
    let config_digest = store.put_blob(&config_bytes)?;
    let mut new = template.clone();
    new.config = Descriptor::new(
        oci::MEDIA_TYPE_CONFIG,
        config_digest,
        config_bytes.len() as u64,
    );
    new.layers = layers;
    let bytes = serde_json::to_vec(&new).map_err(|e| BuildError::Source(e.to_string()))?;
    let digest = store.put_blob(&bytes)?;
    let mut desc = Descriptor::new(oci::MEDIA_TYPE_MANIFEST, digest, bytes.len() as u64);
    for (k, v) in source_annotations {
        // The build cache's key mark is never inherited: only the builder sets it.
        if k != oci::ANNOTATION_REF_NAME && k != BUILD_KEY_ANNOTATION {
            desc.annotations.insert(k.clone(), v.clone());
        }
    }
    store.tag(dst, desc.clone())?;
    Ok(desc)
}

/// Commits `upper` (with `merged`, the container's view of it) over the image whose manifest
/// is `base` as a new image named `dst`.
#[allow(clippy::too_many_arguments)]
pub fn commit(
    store: &Store,
    base: &str,
    base_annotations: &oci::Annotations,
    upper: &Path,
    merged: &Path,
    exclude: &[PathBuf],
    dst: &Reference,
    opts: &CommitOptions,
) -> Result<Committed, BuildError> {
    let manifest = store.manifest(base)?;
    let mut config: serde_json::Value =
        serde_json::from_slice(&store.read_blob(&manifest.config.digest)?)
            .map_err(|e| BuildError::Source(format!("image config: {e}")))?;
    for c in &opts.changes {
        apply_change(&mut config, c)?;
    }
    let (layer, diff_id) = layer_from_upper(store, upper, merged, exclude)?;

    let now = strata_fs::rfc3339::now();
    config["created"] = serde_json::json!(now);
    if !opts.author.is_empty() {
        config["author"] = serde_json::json!(opts.author);
    }
    match config["rootfs"]["diff_ids"].as_array_mut() {
        Some(ids) => ids.push(serde_json::json!(diff_id)),
        None => {
            return Err(BuildError::Source(
                "image config has no rootfs.diff_ids".into(),
            ))
        }
    }
    let mut entry = serde_json::json!({"created": now, "created_by": opts.created_by});
    if !opts.message.is_empty() {
        entry["comment"] = serde_json::json!(opts.message);
    }
    if !opts.author.is_empty() {
        entry["author"] = serde_json::json!(opts.author);
    }
    match config["history"].as_array_mut() {
        Some(h) => h.push(entry),
        None => config["history"] = serde_json::json!([entry]),
    }
    let mut layers = manifest.layers.clone();
    layers.push(layer);
    let desc = save_image(store, &manifest, layers, &config, base_annotations, dst)?;
    Ok(Committed {
        manifest: desc,
        diff_id,
    })
}
