//! `strata verify`: checks that a whole image is what its digests say, so a scanner reading the
//! tar stream and strata reading through the TOC can never see different trees under one digest.
//!
//! For every layer: the blob hashes to its descriptor digest; the decompressed tar stream hashes
//! to the config's diff ID; for a strata layer, the tar stream is exactly the canonical encoding
//! of the TOC (every header byte for byte, every file's bytes hashing chunk by chunk to the TOC's
//! digests, zero padding, the end-of-archive marker), and every chunk frame decodes at its
//! recorded offset to bytes with its recorded digest.

use std::fs::File;
use std::io::{self, BufReader, Read};
use std::os::unix::fs::FileExt;

use sha2::{Digest as _, Sha256};
use strata_fs::format::{self, tar, EntryKind, Sha256Digest, Toc};
use strata_fs::oci::Descriptor;
use strata_fs::store::Store;

use crate::BuildError;

/// What was checked in one layer.
#[derive(Clone, Debug, serde::Serialize)]
pub struct LayerReport {
    pub digest: String,
    pub strata: bool,
    pub entries: u64,
    pub chunks: u64,
    pub tar_bytes: u64,
}

/// Verifies every layer of `image` (all its blobs must be in the store).
pub fn verify_image(store: &Store, image: &str) -> Result<Vec<LayerReport>, BuildError> {
    let record = store.resolve(image)?;
    let manifest = store.manifest(&record.descriptor.digest)?;
    let config: serde_json::Value =
        serde_json::from_slice(&store.read_blob(&manifest.config.digest)?)
            .map_err(|e| BuildError::Source(format!("image config: {e}")))?;
    let diff_ids: Vec<String> = config["rootfs"]["diff_ids"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    if diff_ids.len() != manifest.layers.len() {
        return Err(BuildError::Source(format!(
            "config lists {} diff IDs for {} layers",
            diff_ids.len(),
            manifest.layers.len()
        )));
    }
    manifest
        .layers
        .iter()
        .zip(&diff_ids)
        .enumerate()
        .map(|(i, (d, diff_id))| {
            verify_layer(store, d, diff_id).map_err(|e| {
                BuildError::Layer(format!(
                    "layer {} of {} ({}): {e}",
                    i + 1,
                    manifest.layers.len(),
                    d.digest
                ))
            })
        })
        .collect()
}

/// A reader that hashes what passes through it.
struct Hashing<R> {
    inner: R,
    hash: Sha256,
    bytes: u64,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
}

fn mismatch(what: String) -> BuildError {
    BuildError::Layer(what)
}

fn verify_layer(store: &Store, d: &Descriptor, diff_id: &str) -> Result<LayerReport, BuildError> {
    if !store.has_blob(&d.digest) {
        return Err(BuildError::Source(
            "blob is not in the store (pull the image with --all first)".into(),
        ));
    }
    let path = store.blob_path(&d.digest)?;
    let strata = strata_fs::image::is_strata_layer(d);
    let toc = if strata {
        let blob = strata_fs::blob::LocalBlob::open(&path).map_err(|e| BuildError::io(&path, e))?;
        Some(
            strata_fs::image::open_layer_toc(store, d, &blob)
                .map_err(|e| BuildError::Layer(e.to_string()))?,
        )
    } else {
        None
    };
    let file = File::open(&path).map_err(|e| BuildError::io(&path, e))?;
    let mut stored = Hashing {
        inner: BufReader::with_capacity(1 << 20, file),
        hash: Sha256::new(),
        bytes: 0,
    };
    let (tar_digest, tar_bytes) = {
        let decoded = decoder(&d.media_type, &mut stored)?;
        let mut tar_stream = Hashing {
            inner: decoded,
            hash: Sha256::new(),
            bytes: 0,
        };
        if let Some(toc) = &toc {
            walk(&mut tar_stream, toc)?;
        }
        io::copy(&mut tar_stream, &mut io::sink()).map_err(BuildError::Read)?;
        (
            format!("sha256:{}", hex::encode(tar_stream.hash.finalize_reset())),
            tar_stream.bytes,
        )
    };
    io::copy(&mut stored, &mut io::sink()).map_err(BuildError::Read)?;
    let blob_digest = format!("sha256:{}", hex::encode(stored.hash.finalize_reset()));
    if blob_digest != d.digest {
        return Err(BuildError::DigestMismatch {
            what: "blob".into(),
            expected: d.digest.clone(),
            actual: blob_digest,
        });
    }
    if tar_digest != diff_id {
        return Err(BuildError::DigestMismatch {
            what: "uncompressed tar stream (diff ID)".into(),
            expected: diff_id.to_string(),
            actual: tar_digest,
        });
    }
    let (mut entries, mut chunks) = (0u64, 0u64);
    if let Some(toc) = &toc {
        // The random-access path: each chunk frame decodes at its recorded offset.
        let file = File::open(&path).map_err(|e| BuildError::io(&path, e))?;
        let mut frame = Vec::new();
        let mut last = None;
        for e in &toc.entries {
            for c in &e.chunks {
                let frame_id = (
                    c.compressed_offset,
                    c.compressed_len,
                    c.uncompressed_len,
                    c.digest,
                );
                if last.replace(frame_id) == Some(frame_id) {
                    continue; // the next file of a batch: its frame was just checked
                }
                frame.resize(c.compressed_len as usize, 0);
                file.read_exact_at(&mut frame, c.compressed_offset)
                    .map_err(|err| BuildError::io(&path, err))?;
                format::decode_chunk(&frame, c).map_err(|err| {
                    mismatch(format!(
                        "{}: chunk at file offset {}: {err}",
                        String::from_utf8_lossy(&e.path),
                        c.file_offset
                    ))
                })?;
                chunks += 1;
            }
        }
        entries = toc.entries.len() as u64;
    }
    Ok(LayerReport {
        digest: d.digest.clone(),
        strata,
        entries,
        chunks,
        tar_bytes,
    })
}

/// The decompressed tar stream of a layer of `media_type`.
fn decoder<'a>(media_type: &str, r: &'a mut dyn Read) -> Result<Box<dyn Read + 'a>, BuildError> {
    Ok(
        if media_type.ends_with("+zstd") || media_type.ends_with(".zstd") {
            Box::new(zstd::stream::read::Decoder::new(r).map_err(BuildError::Read)?)
        } else if media_type.ends_with("+gzip")
            || media_type.ends_with(".gzip")
            || media_type.ends_with("tar.gzip")
        {
            Box::new(flate2::read::MultiGzDecoder::new(r))
        } else if media_type.ends_with(".tar") || media_type.ends_with("tar") {
            Box::new(r)
        } else {
            return Err(BuildError::Source(format!(
                "unknown layer media type {media_type}"
            )));
        },
    )
}

/// A batch frame being checked against the tar stream: every byte read while it is open is
/// hashed until its length is reached.
struct OpenFrame {
    hash: Sha256,
    digest: Sha256Digest,
    len: u64,
    seen: u64,
}

/// Reads exact sections of the tar stream, feeding an open batch frame.
struct Sections<'a> {
    r: &'a mut dyn Read,
    frame: Option<OpenFrame>,
}

impl Sections<'_> {
    /// Reads `n` bytes: a batched file's data when `data`, else headers, padding or a whole
    /// chunk (where a batch frame must not end).
    fn read(
        &mut self,
        n: usize,
        data: bool,
        buf: &mut Vec<u8>,
        what: &dyn Fn() -> String,
    ) -> Result<(), BuildError> {
        buf.resize(n, 0);
        self.r
            .read_exact(buf)
            .map_err(|e| mismatch(format!("tar stream ends early at {}: {e}", what())))?;
        if let Some(f) = &mut self.frame {
            let take = (f.len - f.seen).min(n as u64) as usize;
            f.hash.update(&buf[..take]);
            f.seen += take as u64;
            if f.seen == f.len {
                if !data || take != n {
                    return Err(mismatch(format!(
                        "a batch frame ends inside {} instead of at the end of a file's data",
                        what()
                    )));
                }
                let actual = Sha256Digest(f.hash.finalize_reset().into());
                let digest = f.digest;
                self.frame = None;
                if actual != digest {
                    return Err(mismatch(format!(
                        "the tar stream's bytes of the batch frame ending in {} differ from the \
                         TOC's chunk",
                        what()
                    )));
                }
            }
        }
        Ok(())
    }
}

/// Checks that the tar stream is exactly the canonical encoding of `toc`.
fn walk(r: &mut dyn Read, toc: &Toc) -> Result<(), BuildError> {
    let mut buf = Vec::new();
    let mut s = Sections { r, frame: None };
    for e in &toc.entries {
        let name = || String::from_utf8_lossy(&e.path).into_owned();
        let want = tar::encode_header(e)?;
        s.read(want.len(), false, &mut buf, &|| {
            format!("the header of {}", name())
        })?;
        if buf != want {
            return Err(mismatch(format!(
                "the tar header of {} differs from its TOC entry (a tar reader would see \
                 another tree than a strata mount)",
                name()
            )));
        }
        if e.kind != EntryKind::Regular {
            continue;
        }
        for c in &e.chunks {
            if c.is_batched() {
                // A batch frame opens with its first file's data; later files of the batch
                // start where the TOC says, after the headers in between.
                let seen = match &s.frame {
                    None if c.data_offset == 0 => {
                        s.frame = Some(OpenFrame {
                            hash: Sha256::new(),
                            digest: c.digest,
                            len: u64::from(c.uncompressed_len),
                            seen: 0,
                        });
                        0
                    }
                    Some(f) if f.digest == c.digest && f.len == u64::from(c.uncompressed_len) => {
                        f.seen
                    }
                    _ => u64::MAX,
                };
                if seen != u64::from(c.data_offset) {
                    return Err(mismatch(format!(
                        "the data of {} is not where its batch frame says",
                        name()
                    )));
                }
                s.read(c.data_len as usize, true, &mut buf, &|| {
                    format!("the data of {}", name())
                })?;
                continue;
            }
            if s.frame.is_some() {
                return Err(mismatch(format!(
                    "a batch frame ends inside the data of {}",
                    name()
                )));
            }
            s.read(c.uncompressed_len as usize, false, &mut buf, &|| {
                format!("the data of {}", name())
            })?;
            if Sha256Digest::of(&buf) != c.digest {
                return Err(mismatch(format!(
                    "the tar stream's bytes of {} at offset {} differ from the TOC's chunk",
                    name(),
                    c.file_offset
                )));
            }
        }
        s.read(tar::padding(e.size), false, &mut buf, &|| {
            format!("the padding of {}", name())
        })?;
        if buf.iter().any(|&b| b != 0) {
            return Err(mismatch(format!("non-zero padding after {}", name())));
        }
    }
    if s.frame.is_some() {
        return Err(mismatch("a batch frame runs past the last file".into()));
    }
    let r = s.r;
    let mut read = |n: usize, buf: &mut Vec<u8>, what: &dyn Fn() -> String| {
        buf.resize(n, 0);
        r.read_exact(buf)
            .map_err(|e| mismatch(format!("tar stream ends early at {}: {e}", what())))
    };
    read(tar::END_OF_ARCHIVE.len(), &mut buf, &|| {
        "the end-of-archive marker".into()
    })?;
    if buf.iter().any(|&b| b != 0) {
        return Err(mismatch(
            "entries in the tar stream that the TOC does not list".into(),
        ));
    }
    // Anything after the marker must be zero blocks too (tar readers stop at the marker, but a
    // lenient one might not).
    let mut rest = vec![0u8; 64 << 10];
    loop {
        let n = r.read(&mut rest).map_err(BuildError::Read)?;
        if n == 0 {
            return Ok(());
        }
        if rest[..n].iter().any(|&b| b != 0) {
            return Err(mismatch("data after the end of the tar archive".into()));
        }
    }
}
