//! Entry-by-entry snapshots of a directory tree, for comparing a mount with a reference unpack.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

/// Everything compared about one entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EntryInfo {
    pub kind: &'static str,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub mtime: (i64, i64),
    pub link: Option<Vec<u8>>,
    pub rdev: Option<u64>,
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    pub sha256: Option<String>,
    /// Sorted paths sharing this entry's inode (hard-link identity); empty when alone.
    pub links: Vec<Vec<u8>>,
}

/// A snapshot: relative path (bytes) → entry.
pub type Snapshot = BTreeMap<Vec<u8>, EntryInfo>;

/// Options for taking a snapshot.
#[derive(Clone, Copy, Debug, Default)]
pub struct SnapshotOptions {
    /// Compare directory mtimes (unpackers differ in whether they restore them).
    pub dir_mtimes: bool,
}

fn kind(ft: &fs::FileType) -> &'static str {
    if ft.is_dir() {
        "dir"
    } else if ft.is_symlink() {
        "symlink"
    } else if ft.is_file() {
        "file"
    } else if ft.is_char_device() {
        "char"
    } else if ft.is_block_device() {
        "block"
    } else if ft.is_fifo() {
        "fifo"
    } else {
        "socket"
    }
}

/// Walks `root` (without following symlinks) and records every entry below it.
pub fn snapshot(root: &Path, opts: SnapshotOptions) -> Result<Snapshot> {
    let mut out = Snapshot::new();
    let mut inodes: HashMap<u64, Vec<Vec<u8>>> = HashMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for item in fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let item = item?;
            let path = item.path();
            let rel = path.strip_prefix(root)?.as_os_str().as_bytes().to_vec();
            let md = fs::symlink_metadata(&path)?;
            let ft = md.file_type();
            let k = kind(&ft);
            let mut xattrs = BTreeMap::new();
            if let Ok(names) = xattr::list(&path) {
                for n in names {
                    let name = n.as_bytes().to_vec();
                    if name.starts_with(b"security.") || name.starts_with(b"system.") {
                        continue;
                    }
                    if let Ok(Some(v)) = xattr::get(&path, &n) {
                        xattrs.insert(name, v);
                    }
                }
            }
            let sha256 = if ft.is_file() {
                let mut f =
                    fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
                let mut h = Sha256::new();
                let mut buf = vec![0u8; 1 << 20];
                loop {
                    let n = f
                        .read(&mut buf)
                        .with_context(|| format!("reading {}", path.display()))?;
                    if n == 0 {
                        break;
                    }
                    h.update(&buf[..n]);
                }
                Some(hex::encode(h.finalize()))
            } else {
                None
            };
            if ft.is_dir() {
                stack.push(path.clone());
            } else if md.nlink() > 1 {
                inodes.entry(md.ino()).or_default().push(rel.clone());
            }
            let mtime = if ft.is_dir() && !opts.dir_mtimes {
                (0, 0)
            } else {
                (md.mtime(), md.mtime_nsec())
            };
            out.insert(
                rel,
                EntryInfo {
                    kind: k,
                    mode: md.mode() & 0o7777,
                    uid: md.uid(),
                    gid: md.gid(),
                    size: if ft.is_dir() { 0 } else { md.size() },
                    mtime,
                    link: ft
                        .is_symlink()
                        .then(|| fs::read_link(&path).map(|p| p.as_os_str().as_bytes().to_vec()))
                        .transpose()?,
                    rdev: (ft.is_char_device() || ft.is_block_device()).then(|| md.rdev()),
                    xattrs,
                    sha256,
                    links: Vec::new(),
                },
            );
        }
    }
    for mut group in inodes.into_values() {
        group.sort();
        for p in &group {
            if let Some(e) = out.get_mut(p) {
                e.links = group.clone();
            }
        }
    }
    Ok(out)
}

/// Describes every difference between two snapshots (empty when equal).
pub fn diff(want: &Snapshot, got: &Snapshot) -> Vec<String> {
    let mut out = Vec::new();
    for (p, w) in want {
        match got.get(p) {
            None => out.push(format!("missing: {}", String::from_utf8_lossy(p))),
            Some(g) if g != w => out.push(format!(
                "differs: {}\n  want {w:?}\n  got  {g:?}",
                String::from_utf8_lossy(p)
            )),
            _ => {}
        }
    }
    for p in got.keys() {
        if !want.contains_key(p) {
            out.push(format!("unexpected: {}", String::from_utf8_lossy(p)));
        }
    }
    out
}
