//! The writable layer: kernel overlayfs over a lazy strata mount, and the changes it holds.
//!
//! A writable view (a container's root, `strata mount --upper`) is `overlay` with the image's
//! strata mount as its lower directory and an upper and a work directory on local disk, mounted
//! with `metacopy=on` (a chmod or chown of a lower file copies no data and fetches nothing),
//! `redirect_dir=on` and `index=on`: the form containerd's overlayfs snapshotter, stargz and
//! Nydus use.
//!
//! The upper directory is in kernel overlayfs's own form: a deletion is a 0/0 character device
//! (a whiteout), a directory whose lower contents are hidden carries `trusted.overlay.opaque`
//! (`user.overlay.opaque` when unprivileged), and a metadata-only copy-up (`metacopy=on`) holds
//! no data. Changes are reported as `docker container diff` and `podman diff` report them:
//! `A` added, `C` changed, `D` deleted, sorted by path; every directory above a change that
//! exists in the image is `C` too.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// What happened to a path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub enum Kind {
    #[serde(rename = "A")]
    Added,
    #[serde(rename = "C")]
    Changed,
    #[serde(rename = "D")]
    Deleted,
}

impl Kind {
    pub fn letter(self) -> char {
        match self {
            Kind::Added => 'A',
            Kind::Changed => 'C',
            Kind::Deleted => 'D',
        }
    }
}

/// One change: a path inside the container (starting with `/`) and what happened to it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Change {
    pub path: PathBuf,
    pub kind: Kind,
}

/// Whether an upper-dir entry is an overlayfs whiteout (a 0/0 character device).
pub fn is_whiteout(md: &std::fs::Metadata) -> bool {
    md.file_type().is_char_device() && md.rdev() == 0
}

/// Whether an upper-dir directory hides the lower directory's contents. Only the `trusted.`
/// namespace counts (strata mounts overlays without `userxattr`): a container can set
/// `user.overlay.opaque` itself and must not fake deletions with it.
pub fn is_opaque(path: &Path) -> bool {
    xattr::get(path, "trusted.overlay.opaque")
        .ok()
        .flatten()
        .is_some_and(|v| v == b"y")
}

/// The changes in `upper` relative to `lower` (the image's root, e.g. its strata mount),
/// leaving out the paths in `exclude` and everything under them: a container's mount points,
/// which the runtime creates in its root (Docker keeps them in an init layer of their own).
pub fn changes(upper: &Path, lower: &Path, exclude: &[PathBuf]) -> std::io::Result<Vec<Change>> {
    let mut out: BTreeMap<PathBuf, Kind> = BTreeMap::new();
    walk(upper, lower, Path::new("/"), &mut out)?;
    out.retain(|p, _| !exclude.iter().any(|x| p.starts_with(x)));
    // Every directory above a change that the image has is changed too.
    let changed: Vec<PathBuf> = out.keys().cloned().collect();
    for p in changed {
        let mut parent = p.parent();
        while let Some(dir) = parent {
            if dir == Path::new("/") {
                break;
            }
            if !out.contains_key(dir) && exists(&lower.join(rel(dir))) {
                out.insert(dir.to_path_buf(), Kind::Changed);
            }
            parent = dir.parent();
        }
    }
    Ok(out
        .into_iter()
        .map(|(path, kind)| Change { path, kind })
        .collect())
}

fn rel(p: &Path) -> &Path {
    p.strip_prefix("/").unwrap_or(p)
}

fn exists(p: &Path) -> bool {
    std::fs::symlink_metadata(p).is_ok()
}

fn walk(
    upper: &Path,
    lower: &Path,
    at: &Path,
    out: &mut BTreeMap<PathBuf, Kind>,
) -> std::io::Result<()> {
    let dir = upper.join(rel(at));
    let mut names: Vec<OsString> = std::fs::read_dir(&dir)?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()?;
    names.sort();
    for name in names {
        let path = at.join(&name);
        let up = upper.join(rel(&path));
        let md = std::fs::symlink_metadata(&up)?;
        let low = lower.join(rel(&path));
        let low_md = std::fs::symlink_metadata(&low).ok();
        if is_whiteout(&md) {
            out.insert(path, Kind::Deleted);
            continue;
        }
        if md.is_dir() {
            let opaque = is_opaque(&up);
            match &low_md {
                Some(l) if l.is_dir() => {
                    if opaque {
                        out.insert(path.clone(), Kind::Changed);
                        deleted_under(&up, &low, &path, out)?;
                    } else if meta_differs(&md, l) {
                        out.insert(path.clone(), Kind::Changed);
                    }
                }
                // A directory replacing a file, or a new one.
                Some(_) => {
                    out.insert(path.clone(), Kind::Changed);
                }
                None => {
                    out.insert(path.clone(), Kind::Added);
                }
            }
            walk(upper, lower, &path, out)?;
            continue;
        }
        let kind = if low_md.is_some() {
            Kind::Changed
        } else {
            Kind::Added
        };
        out.insert(path, kind);
    }
    Ok(())
}

/// An opaque directory hides everything the image had under it that the upper dir lacks.
fn deleted_under(
    up: &Path,
    low: &Path,
    at: &Path,
    out: &mut BTreeMap<PathBuf, Kind>,
) -> std::io::Result<()> {
    let Ok(entries) = std::fs::read_dir(low) else {
        return Ok(());
    };
    for e in entries {
        let e = e?;
        let name = e.file_name();
        if !exists(&up.join(&name)) {
            out.insert(at.join(&name), Kind::Deleted);
        }
    }
    Ok(())
}

fn meta_differs(a: &std::fs::Metadata, b: &std::fs::Metadata) -> bool {
    // Directories: mode and owner only (their mtime says little; Docker does the same).
    a.mode() != b.mode() || a.uid() != b.uid() || a.gid() != b.gid()
}

/// The directories of a writable layer: `DIR/upper` and `DIR/work`.
#[derive(Clone, Debug)]
pub struct UpperDirs {
    pub upper: PathBuf,
    pub work: PathBuf,
}

impl UpperDirs {
    /// The upper and work directories under `dir` (created if missing).
    pub fn under(dir: &Path) -> std::io::Result<Self> {
        let dirs = UpperDirs {
            upper: dir.join("upper"),
            work: dir.join("work"),
        };
        std::fs::create_dir_all(&dirs.upper)?;
        std::fs::create_dir_all(&dirs.work)?;
        Ok(dirs)
    }
}

/// Escapes a path for overlayfs's option string (`:` separates lower dirs, `,` options).
fn escape_option(p: &Path) -> String {
    let mut out = String::new();
    for ch in p.to_string_lossy().chars() {
        if matches!(ch, '\\' | ':' | ',') {
            out.push('\\');
        }
        out.push(ch);
    }
    out
}

/// Mounts kernel overlayfs at `target` over the read-only `lower`; `nosuid` for views meant for
/// inspection (a container's root honours setuid bits).
pub fn mount_overlay(
    lower: &Path,
    dirs: &UpperDirs,
    target: &Path,
    nosuid: bool,
) -> std::io::Result<()> {
    use nix::mount::MsFlags;
    let options = format!(
        "lowerdir={},upperdir={},workdir={},metacopy=on,redirect_dir=on,index=on",
        escape_option(lower),
        escape_option(&dirs.upper),
        escape_option(&dirs.work)
    );
    let flags = if nosuid {
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV
    } else {
        MsFlags::empty()
    };
    nix::mount::mount(
        Some("overlay"),
        target,
        Some("overlay"),
        flags,
        Some(options.as_str()),
    )
    .map_err(std::io::Error::from)
}

/// `A /path` lines, as `docker container diff` prints them.
pub fn render(changes: &[Change]) -> String {
    let mut s = String::new();
    for c in changes {
        s.push(c.kind.letter());
        s.push(' ');
        s.push_str(&String::from_utf8_lossy(c.path.as_os_str().as_bytes()));
        s.push('\n');
    }
    s
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::fs;

    #[test]
    fn podman_order_and_letters() {
        if !nix::unistd::geteuid().is_root() {
            return; // whiteouts are device nodes: root only
        }
        let t = tempfile::tempdir().unwrap();
        let (lower, upper) = (t.path().join("lower"), t.path().join("upper"));
        for d in ["etc", "var", "opq/x", "keep"] {
            fs::create_dir_all(lower.join(d)).unwrap();
        }
        for f in ["etc/motd", "etc/group", "etc/hostname", "opq/a", "keep/k"] {
            fs::write(lower.join(f), b"lower").unwrap();
        }
        // echo hi > /new.txt; rm /etc/motd; echo x >> /etc/group; mkdir -p /var/lib/x;
        // rm -rf /opq; mkdir /opq; touch /opq/b
        fs::create_dir_all(upper.join("etc")).unwrap();
        fs::create_dir_all(upper.join("var/lib/x")).unwrap();
        fs::write(upper.join("new.txt"), b"hi").unwrap();
        fs::write(upper.join("etc/group"), b"lower\nx").unwrap();
        nix::sys::stat::mknod(
            &upper.join("etc/motd"),
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::from_bits_truncate(0o000),
            0,
        )
        .unwrap();
        fs::create_dir_all(upper.join("opq")).unwrap();
        xattr::set(upper.join("opq"), "trusted.overlay.opaque", b"y").unwrap();
        fs::write(upper.join("opq/b"), b"b").unwrap();
        let got = render(&changes(&upper, &lower, &[]).unwrap());
        assert_eq!(
            got,
            "C /etc\nC /etc/group\nD /etc/motd\nA /new.txt\nC /opq\nD /opq/a\nA /opq/b\n\
             D /opq/x\nC /var\nA /var/lib\nA /var/lib/x\n"
        );
    }
}
