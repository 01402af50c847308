//! Generates OCI images (image layout directories and Docker archives) from layer descriptions.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde_json::json;
use sha2::{Digest, Sha256};

/// How a layer blob is compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    pub fn media_type(self) -> &'static str {
        match self {
            Compression::None => "application/vnd.oci.image.layer.v1.tar",
            Compression::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
            Compression::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
        }
    }
    pub fn compress(self, tar: &[u8]) -> Result<Vec<u8>> {
        Ok(match self {
            Compression::None => tar.to_vec(),
            Compression::Gzip => {
                let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                e.write_all(tar)?;
                e.finish()?
            }
            Compression::Zstd => zstd::bulk::compress(tar, 3)?,
        })
    }
}

pub fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// A tar layer under construction.
pub struct LayerBuilder {
    b: tar::Builder<Vec<u8>>,
    mtime: u64,
}

impl Default for LayerBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl LayerBuilder {
    pub fn new() -> Self {
        let mut b = tar::Builder::new(Vec::new());
        b.mode(tar::HeaderMode::Complete);
        LayerBuilder {
            b,
            mtime: 1_700_000_000,
        }
    }

    fn header(&mut self, kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_size(size);
        self.mtime += 1;
        h.set_mtime(self.mtime);
        h
    }

    fn append(&mut self, mut h: tar::Header, path: &[u8], data: &[u8]) -> Result<()> {
        if path.len() <= 100 {
            // Raw bytes so non-UTF-8 names survive.
            let name = &mut h.as_old_mut().name;
            name.fill(0);
            name[..path.len()].copy_from_slice(path);
            h.set_cksum();
            self.b.append(&h, data)?;
        } else {
            let p = std::str::from_utf8(path).context("long paths must be UTF-8 here")?;
            self.b.append_data(&mut h, p, data)?;
        }
        Ok(())
    }

    pub fn dir(&mut self, path: &str, mode: u32) -> Result<&mut Self> {
        let h = self.header(tar::EntryType::Directory, mode, 0);
        self.append(h, format!("{path}/").as_bytes(), &[])?;
        Ok(self)
    }

    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> Result<&mut Self> {
        self.file_bytes(path.as_bytes(), mode, data)
    }

    pub fn file_bytes(&mut self, path: &[u8], mode: u32, data: &[u8]) -> Result<&mut Self> {
        let h = self.header(tar::EntryType::Regular, mode, data.len() as u64);
        self.append(h, path, data)?;
        Ok(self)
    }

    pub fn file_owned(
        &mut self,
        path: &str,
        mode: u32,
        uid: u64,
        gid: u64,
        data: &[u8],
    ) -> Result<&mut Self> {
        let mut h = self.header(tar::EntryType::Regular, mode, data.len() as u64);
        h.set_uid(uid);
        h.set_gid(gid);
        self.append(h, path.as_bytes(), data)?;
        Ok(self)
    }

    /// A file with PAX records (xattrs as `SCHILY.xattr.*`, sub-second mtime).
    pub fn file_pax(
        &mut self,
        path: &str,
        mode: u32,
        data: &[u8],
        pax: &[(&str, &[u8])],
    ) -> Result<&mut Self> {
        self.b
            .append_pax_extensions(pax.iter().map(|(k, v)| (*k, *v)))?;
        self.file(path, mode, data)
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> Result<&mut Self> {
        let mut h = self.header(tar::EntryType::Symlink, 0o777, 0);
        h.set_link_name(target)?;
        self.append(h, path.as_bytes(), &[])?;
        Ok(self)
    }

    pub fn hardlink(&mut self, path: &str, target: &str) -> Result<&mut Self> {
        let mut h = self.header(tar::EntryType::Link, 0o644, 0);
        h.set_link_name(target)?;
        self.append(h, path.as_bytes(), &[])?;
        Ok(self)
    }

    pub fn device(
        &mut self,
        path: &str,
        kind: tar::EntryType,
        major: u32,
        minor: u32,
    ) -> Result<&mut Self> {
        let mut h = self.header(kind, 0o660, 0);
        h.set_device_major(major)?;
        h.set_device_minor(minor)?;
        self.append(h, path.as_bytes(), &[])?;
        Ok(self)
    }

    pub fn fifo(&mut self, path: &str) -> Result<&mut Self> {
        let h = self.header(tar::EntryType::Fifo, 0o644, 0);
        self.append(h, path.as_bytes(), &[])?;
        Ok(self)
    }

    /// Appends a raw entry with an arbitrary (even hostile) name.
    pub fn raw_entry(
        &mut self,
        name: &[u8],
        kind: tar::EntryType,
        link: Option<&str>,
        data: &[u8],
    ) -> Result<&mut Self> {
        let mut h = self.header(kind, 0o644, data.len() as u64);
        {
            let old = h.as_old_mut();
            old.name.fill(0);
            old.name[..name.len()].copy_from_slice(name);
            if let Some(l) = link {
                old.linkname.fill(0);
                old.linkname[..l.len()].copy_from_slice(l.as_bytes());
            }
        }
        h.set_cksum();
        self.b.append(&h, data)?;
        Ok(self)
    }

    pub fn finish(self) -> Result<Vec<u8>> {
        Ok(self.b.into_inner()?)
    }
}

/// Builds a one-entry tar holding a real sparse file, using GNU tar (`--sparse`).
pub fn gnu_sparse_layer(name: &str, size: u64, data_at: &[(u64, &[u8])]) -> Result<Vec<u8>> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join(name);
    let f = fs::File::create(&path)?;
    f.set_len(size)?;
    for (off, bytes) in data_at {
        use std::os::unix::fs::FileExt;
        f.write_all_at(bytes, *off)?;
    }
    drop(f);
    let status = Command::new("touch")
        .arg("-d")
        .arg("@1700000500")
        .arg(&path)
        .status()?;
    if !status.success() {
        bail!("touch failed");
    }
    let out = Command::new("tar")
        .args([
            "--format=gnu",
            "--sparse",
            "--numeric-owner",
            "--owner=0",
            "--group=0",
            "-C",
        ])
        .arg(dir.path())
        .args(["-cf", "-", name])
        .output()
        .context("running GNU tar")?;
    if !out.status.success() {
        bail!("tar failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(out.stdout)
}

/// A layer ready to be written into an image.
pub struct Layer {
    pub tar: Vec<u8>,
    pub compression: Compression,
}

/// Writes an OCI image layout at `dir` holding one image tagged `tag`; returns the config JSON.
pub fn write_oci_layout(dir: &Path, tag: &str, layers: &[Layer]) -> Result<serde_json::Value> {
    write_oci_layout_with(dir, tag, layers, &|_| {})
}

/// [`write_oci_layout`] with the sample config changed by `edit` first.
pub fn write_oci_layout_with(
    dir: &Path,
    tag: &str,
    layers: &[Layer],
    edit: &dyn Fn(&mut serde_json::Value),
) -> Result<serde_json::Value> {
    let blobs = dir.join("blobs/sha256");
    fs::create_dir_all(&blobs)?;
    let put = |data: &[u8]| -> Result<String> {
        let d = sha256(data);
        fs::write(blobs.join(&d[7..]), data)?;
        Ok(d)
    };
    let mut descs = Vec::new();
    let mut diff_ids = Vec::new();
    let mut history = Vec::new();
    for (i, l) in layers.iter().enumerate() {
        let blob = l.compression.compress(&l.tar)?;
        let d = put(&blob)?;
        descs.push(
            json!({"mediaType": l.compression.media_type(), "digest": d, "size": blob.len()}),
        );
        diff_ids.push(sha256(&l.tar));
        history
            .push(json!({"created": "2024-01-01T00:00:00Z", "created_by": format!("layer {i}")}));
    }
    history
        .push(json!({"created": "2024-01-01T00:00:00Z", "created_by": "CMD", "empty_layer": true}));
    let mut config = sample_config(diff_ids, history);
    edit(&mut config);
    let config_bytes = serde_json::to_vec(&config)?;
    let cd = put(&config_bytes)?;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": config_bytes.len()},
        "layers": descs,
    });
    let mb = serde_json::to_vec(&manifest)?;
    let md = put(&mb)?;
    let index = json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": md, "size": mb.len(),
            "annotations": {"org.opencontainers.image.ref.name": tag},
            "platform": {"architecture": "amd64", "os": "linux"},
        }],
    });
    fs::write(dir.join("index.json"), serde_json::to_vec(&index)?)?;
    fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    Ok(config)
}

fn sample_config(diff_ids: Vec<String>, history: Vec<serde_json::Value>) -> serde_json::Value {
    json!({
        "created": "2024-01-01T00:00:00Z",
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": ["PATH=/usr/local/bin:/usr/bin:/bin", "GREETING=hello"],
            "Entrypoint": ["/usr/bin/sh"],
            "Cmd": ["-c", "echo hi"],
            "WorkingDir": "/",
        },
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": history,
    })
}

/// Writes a Docker archive (`docker save` layout, uncompressed layers) to `file`.
pub fn write_docker_archive(file: &Path, tag: &str, layers: &[Layer]) -> Result<()> {
    let mut b = tar::Builder::new(fs::File::create(file)?);
    let add = |b: &mut tar::Builder<fs::File>, name: &str, data: &[u8]| -> Result<()> {
        let mut h = tar::Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, name, data)?;
        Ok(())
    };
    let mut names = Vec::new();
    let mut diff_ids = Vec::new();
    let mut history = Vec::new();
    for (i, l) in layers.iter().enumerate() {
        let d = sha256(&l.tar);
        let name = format!("{}/layer.tar", &d[7..]);
        add(&mut b, &name, &l.tar)?;
        names.push(name);
        diff_ids.push(d);
        history
            .push(json!({"created": "2024-01-01T00:00:00Z", "created_by": format!("layer {i}")}));
    }
    let config = serde_json::to_vec(&sample_config(diff_ids, history))?;
    let config_name = format!("{}.json", &sha256(&config)[7..]);
    add(&mut b, &config_name, &config)?;
    let manifest = json!([{"Config": config_name, "RepoTags": [tag], "Layers": names}]);
    add(&mut b, "manifest.json", &serde_json::to_vec(&manifest)?)?;
    b.finish()?;
    Ok(())
}

/// Deterministic pseudo-random bytes (xorshift), compressible like real binaries are not.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Text-like bytes (compress about 3:1, like code and configs).
pub fn text(seed: u64, len: usize) -> Vec<u8> {
    const WORDS: [&str; 16] = [
        "import ",
        "def ",
        "return ",
        "self",
        ".value",
        "(x, y)",
        " = ",
        "\n",
        "    ",
        "if ",
        "else:",
        "for i in range(",
        "None",
        "True",
        "# comment ",
        "print(",
    ];
    let n = noise(seed, len);
    let mut out = Vec::with_capacity(len + 16);
    let mut i = 0;
    while out.len() < len {
        out.extend_from_slice(WORDS[(n[i % n.len()] & 15) as usize].as_bytes());
        out.extend_from_slice(format!("{}", n[(i * 7) % n.len()]).as_bytes());
        i += 1;
    }
    out.truncate(len);
    out
}

/// The chunk size strata uses by default (a file of exactly this size sits on a boundary).
pub const CHUNK: usize = 1 << 20;

/// The feature-complete sample image of the foundation issue: whiteouts, an opaque dir, hard
/// links, symlinks, devices, a fifo, xattrs, empty/sparse/boundary files, 10k small files and a
/// non-UTF-8 name, over three layers (gzip, plain tar, gzip).
pub fn feature_layers(small_files: usize) -> Result<Vec<Layer>> {
    let mut l1 = LayerBuilder::new();
    l1.dir(".", 0o755)?
        .dir("etc", 0o755)?
        .file("etc/hosts", 0o644, b"127.0.0.1 localhost\n")?
        .file("etc/passwd", 0o644, b"root:x:0:0:root:/root:/bin/sh\n")?
        .symlink("etc/localtime", "/usr/share/zoneinfo/UTC")?
        .dir("usr", 0o755)?
        .dir("usr/bin", 0o755)?
        .file("usr/bin/busybox", 0o755, &noise(1, 300_000))?
        .hardlink("usr/bin/ls", "usr/bin/busybox")?
        .hardlink("usr/bin/cat", "usr/bin/busybox")?
        .symlink("usr/bin/sh", "busybox")?
        .file("usr/bin/su", 0o4755, b"setuid")?
        .file("usr/bin/wall", 0o2755, b"setgid")?
        .dir("tmp", 0o1777)?
        .dir("dev", 0o755)?
        .device("dev/null", tar::EntryType::Char, 1, 3)?
        .device("dev/sda", tar::EntryType::Block, 8, 0)?
        .dir("run", 0o755)?
        .fifo("run/initctl")?
        .dir("data", 0o750)?
        .file("data/empty", 0o644, b"")?
        .file("data/boundary", 0o644, &noise(2, CHUNK))?
        .file("data/two-chunks-plus-one", 0o600, &text(3, 2 * CHUNK + 1))?
        .file_owned("data/owned", 0o640, 1000, 1001, b"owned by 1000:1001")?
        .file_bytes(b"data/caf\xe9-latin1", 0o644, b"non-UTF-8 name")?
        .file_pax(
            "data/xattrs",
            0o644,
            b"has xattrs",
            &[
                ("SCHILY.xattr.user.comment", b"hello"),
                ("SCHILY.xattr.user.binary", b"\x00\x01\xff"),
                ("mtime", b"1700000123.25"),
            ],
        )?
        .dir("opq", 0o755)?
        .file("opq/old-a", 0o644, b"a")?
        .file("opq/old-b", 0o644, b"b")?
        .dir("del", 0o755)?
        .file("del/gone", 0o644, b"will be deleted")?
        .file("del/stays", 0o644, b"stays")?
        .dir("removed_dir", 0o755)?
        .file("removed_dir/inner", 0o644, b"inner")?
        .dir("many", 0o755)?;
    let dirs = small_files.div_ceil(1000).max(1);
    for d in 0..dirs {
        l1.dir(&format!("many/d{d:02}"), 0o755)?;
    }
    for i in 0..small_files {
        let body = format!("small file {i}\n").repeat(1 + i % 7);
        l1.file(
            &format!("many/d{:02}/f{i:05}.txt", i / 1000),
            0o644,
            body.as_bytes(),
        )?;
    }
    let l1 = l1.finish()?;

    let mut l2 = LayerBuilder::new();
    l2.dir("del", 0o755)?
        .file("del/.wh.gone", 0o644, b"")?
        .dir("opq", 0o700)?
        .file("opq/.wh..wh..opq", 0o644, b"")?
        .file("opq/new", 0o644, b"new in layer 2")?
        .file(".wh.removed_dir", 0o644, b"")?
        .file(
            "etc/hosts",
            0o644,
            b"127.0.0.1 localhost\n10.0.0.1 layer2\n",
        )?
        .file("etc/localtime", 0o644, b"replaced symlink with a file")?
        .hardlink("data/hl-across", "usr/bin/su")?;
    let l2 = l2.finish()?;

    // A 100 MB file that is almost all holes. umoci cannot unpack GNU sparse headers, so this
    // layer stores it as a plain entry; `gnu_sparse_layer` covers the sparse header format.
    let mut sparse = vec![0u8; 100 << 20];
    sparse[..4].copy_from_slice(b"head");
    sparse[50 << 20..(50 << 20) + 4096].copy_from_slice(&noise(4, 4096));
    let n = sparse.len();
    sparse[n - 4..].copy_from_slice(b"tail");
    let mut l3 = LayerBuilder::new();
    l3.file("sparse-100M", 0o644, &sparse)?;
    let l3 = l3.finish()?;
    Ok(vec![
        Layer {
            tar: l1,
            compression: Compression::Gzip,
        },
        Layer {
            tar: l2,
            compression: Compression::None,
        },
        Layer {
            tar: l3,
            compression: Compression::Gzip,
        },
    ])
}

/// Makes a fresh temporary directory under the build's target dir (not /tmp, which may be small).
pub fn scratch(name: &str) -> Result<PathBuf> {
    let base = std::env::var_os("STRATA_TEST_TMP")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("strata-tests"));
    fs::create_dir_all(&base)?;
    let dir = tempfile::Builder::new()
        .prefix(name)
        .tempdir_in(base)?
        .keep();
    Ok(dir)
}
