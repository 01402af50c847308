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
//! `A` added, `C` changed, `D` deleted, by the same rules (see [`changes`]).

use std::collections::{BTreeSet, HashSet};
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

/// Where a renamed upper directory's image contents are (`trusted.overlay.redirect`: a path
/// from the root, or a name in the same parent), if it was renamed.
fn redirect(up: &Path) -> Option<PathBuf> {
    let v = xattr::get(up, "trusted.overlay.redirect").ok().flatten()?;
    Some(PathBuf::from(std::ffi::OsStr::from_bytes(&v)))
}

/// Whether an upper-dir entry is an overlayfs whiteout (a 0/0 character device).
pub fn is_whiteout(md: &std::fs::Metadata) -> bool {
    md.file_type().is_char_device() && md.rdev() == 0
}

/// Whether an upper-dir directory hides the lower directory's contents. As root, only the
/// `trusted.` namespace counts (strata mounts overlays without `userxattr`): a container can
/// set `user.overlay.opaque` itself and must not fake deletions with it. Unprivileged (an
/// ordinary user, or root of a rootless user namespace), the marks are the `user.` ones the
/// FUSE writable layer writes there, and the layer never lets a container set them.
pub fn is_opaque(path: &Path) -> bool {
    let name = if crate::fuse_upper::privileged() {
        "trusted.overlay.opaque"
    } else {
        "user.overlay.opaque"
    };
    xattr::get(path, name)
        .ok()
        .flatten()
        .is_some_and(|v| v == b"y")
}

/// The changes in `upper` relative to `lower` (the image's root, e.g. its strata mount),
/// leaving out the paths in `exclude` and everything under them: a container's mount points,
/// which the runtime creates in its root (Docker keeps them in an init layer of their own).
///
/// The rules are those of `podman diff` / `docker container diff` on an overlay upper dir
/// (containers/storage's walk), so the two print the same lines for the same commands:
/// every upper entry is `A` (not in the image) or `C` (in it), except a directory that the
/// image has with the same mode, size and mtime (copied up only because something below it
/// changed: not listed itself); a whiteout is `D`; an opaque directory the image has is `D` (the
/// image's directory was removed) with its new contents `A` (overlayfs also marks new
/// directories opaque: those are just `A`); every directory above an `A` or a `D`
/// that is not listed already is `C`, printed just before it. In the walk's order (names
/// sorted bytewise per directory), as podman prints them.
pub fn changes(upper: &Path, lower: &Path, exclude: &[PathBuf]) -> std::io::Result<Vec<Change>> {
    let mut walk = Walk {
        upper,
        lower,
        out: Vec::new(),
        listed_dirs: BTreeSet::new(),
    };
    walk.dir(Path::new("/"), None)?;
    let mut out = walk.out;
    out.retain(|c| !exclude.iter().any(|x| c.path.starts_with(x)));
    Ok(out)
}

fn rel(p: &Path) -> &Path {
    p.strip_prefix("/").unwrap_or(p)
}

struct Walk<'a> {
    upper: &'a Path,
    lower: &'a Path,
    /// In the order podman prints: the walk's, a change's missing parents just before it.
    out: Vec<Change>,
    /// Directories visited and listed (or listed as a parent): no parent `C` line for them.
    listed_dirs: BTreeSet<PathBuf>,
}

impl Walk<'_> {
    /// Walks the upper directory `at`; `from` is the image directory it merges when that is
    /// elsewhere (a renamed directory, `redirect_dir=on`): its entries the upper dir lacks are
    /// listed as a copy would have made them.
    fn dir(&mut self, at: &Path, from: Option<&Path>) -> std::io::Result<()> {
        let dir = self.upper.join(rel(at));
        let mut names: Vec<OsString> = std::fs::read_dir(&dir)?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()?;
        if let Some(from) = from {
            let have: HashSet<OsString> = names.iter().cloned().collect();
            if let Ok(entries) = std::fs::read_dir(self.lower.join(rel(from))) {
                for e in entries.flatten() {
                    if !have.contains(&e.file_name()) {
                        names.push(e.file_name());
                    }
                }
            }
        }
        names.sort();
        for name in names {
            let path = at.join(&name);
            let up = self.upper.join(rel(&path));
            let Ok(md) = std::fs::symlink_metadata(&up) else {
                // Only in the renamed directory's source: copied here, with all below it.
                if let Some(from) = from {
                    self.all_copied(&path, &self.lower.join(rel(from)).join(&name));
                }
                continue;
            };
            if from.is_some() && is_whiteout(&md) {
                continue; // removed from a renamed directory: it was never here
            }
            if let Some(kind) = self.classify(&path, &up, &md) {
                self.record(&path, kind, md.is_dir());
            }
            if md.is_dir() {
                // A relative redirect names an entry of the parent's image directory.
                let source = match redirect(&up) {
                    Some(r) if r.starts_with("/") => Some(r),
                    Some(r) => Some(from.unwrap_or(at).join(r)),
                    None if is_opaque(&up) => None,
                    None => from.map(|f| f.join(&name)),
                };
                self.dir(&path, source.as_deref())?;
            }
        }
        Ok(())
    }

    fn record(&mut self, path: &Path, kind: Kind, is_dir: bool) {
        if is_dir {
            self.listed_dirs.insert(path.to_path_buf());
        }
        if kind != Kind::Changed {
            self.parents_changed(path);
        }
        self.out.push(Change {
            path: path.to_path_buf(),
            kind,
        });
    }

    /// The image's entry `source` and everything below it, copied to `path` (a renamed
    /// directory's contents): `C` where the image has `path`, `A` elsewhere.
    fn all_copied(&mut self, path: &Path, source: &Path) {
        let kind = if self.in_image(path).is_some() {
            Kind::Changed
        } else {
            Kind::Added
        };
        let is_dir = std::fs::symlink_metadata(source).is_ok_and(|m| m.is_dir());
        self.record(path, kind, is_dir);
        if is_dir {
            if let Ok(entries) = std::fs::read_dir(source) {
                let mut entries: Vec<_> = entries.flatten().collect();
                entries.sort_by_key(|e| e.file_name());
                for e in entries {
                    self.all_copied(&path.join(e.file_name()), &e.path());
                }
            }
        }
    }

    /// The image's entry at `path`, as podman looks it up in a layer directory (`os.Stat`:
    /// symlinks followed, a dangling one is absent).
    fn in_image(&self, path: &Path) -> Option<std::fs::Metadata> {
        std::fs::metadata(self.lower.join(rel(path))).ok()
    }

    /// What an upper entry says happened at `path`; `None` for a directory the image has
    /// unchanged.
    fn classify(&self, path: &Path, up: &Path, md: &std::fs::Metadata) -> Option<Kind> {
        if is_whiteout(md) {
            return Some(Kind::Deleted);
        }
        let Some(low) = self.in_image(path) else {
            return Some(Kind::Added);
        };
        // The image's directory was removed and this one made anew (or renamed into its
        // place): podman's copy would be an opaque directory.
        if md.is_dir() && (is_opaque(up) || redirect(up).is_some()) {
            return Some(Kind::Deleted);
        }
        let same_dir = md.is_dir()
            && low.is_dir()
            && md.mode() == low.mode()
            && md.size() == low.size()
            && same_time(
                (md.mtime(), md.mtime_nsec()),
                (low.mtime(), low.mtime_nsec()),
            );
        (!same_dir).then_some(Kind::Changed)
    }

    /// The directories above an `A` or `D` not listed yet, as `C` lines before it (top down).
    fn parents_changed(&mut self, path: &Path) {
        let mut missing = Vec::new();
        let mut parent = path.parent();
        while let Some(dir) = parent.filter(|d| *d != Path::new("/")) {
            if self.listed_dirs.insert(dir.to_path_buf()) {
                missing.push(dir.to_path_buf());
            }
            parent = dir.parent();
        }
        for dir in missing.into_iter().rev() {
            self.out.push(Change {
                path: dir,
                kind: Kind::Changed,
            });
        }
    }
}

/// Modification times equal, allowing for a writer that dropped the nanoseconds (tar headers
/// carry whole seconds) and rounded either way, as containers/storage compares them.
fn same_time(a: (i64, i64), b: (i64, i64)) -> bool {
    if a == b {
        return true;
    }
    if a.1 != 0 && b.1 != 0 {
        return false;
    }
    a.0 == b.0 || (b.1 == 0 && a.0 == b.0 - 1) || (a.1 == 0 && a.0 - 1 == b.0)
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
        // The image's directories are old (the upper's are made now).
        let old = nix::sys::time::TimeSpec::new(1_000_000_000, 0);
        for d in ["etc", "var", "opq", "keep"] {
            nix::sys::stat::utimensat(
                None,
                &lower.join(d),
                &old,
                &old,
                nix::sys::stat::UtimensatFlags::NoFollowSymlink,
            )
            .unwrap();
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
        // echo k >> /keep/k: /keep is copied up with its mode, size and mtime (not listed).
        fs::create_dir_all(upper.join("keep")).unwrap();
        fs::write(upper.join("keep/k"), b"lowerk").unwrap();
        let lower_keep = fs::metadata(lower.join("keep")).unwrap();
        let mtime = nix::sys::time::TimeSpec::new(lower_keep.mtime(), lower_keep.mtime_nsec());
        nix::sys::stat::utimensat(
            None,
            &upper.join("keep"),
            &mtime,
            &mtime,
            nix::sys::stat::UtimensatFlags::NoFollowSymlink,
        )
        .unwrap();
        let got = render(&changes(&upper, &lower, &[]).unwrap());
        assert_eq!(
            got,
            "C /etc\nC /etc/group\nD /etc/motd\nC /keep/k\nA /new.txt\nD /opq\nA /opq/b\n\
             C /var\nA /var/lib\nA /var/lib/x\n"
        );
        // A file added deep in directories copied up unchanged: the missing parents are
        // printed when the addition is reached, after what the walk printed before.
        fs::create_dir_all(lower.join("a/b/c")).unwrap();
        fs::create_dir_all(upper.join("a/b/c")).unwrap();
        for d in ["a", "a/b"] {
            let m = fs::metadata(lower.join(d)).unwrap();
            let ts = nix::sys::time::TimeSpec::new(m.mtime(), m.mtime_nsec());
            nix::sys::stat::utimensat(
                None,
                &upper.join(d),
                &ts,
                &ts,
                nix::sys::stat::UtimensatFlags::NoFollowSymlink,
            )
            .unwrap();
        }
        fs::write(upper.join("a/b/c/new"), b"n").unwrap();
        let c = fs::metadata(upper.join("a/b/c")).unwrap();
        let ts = nix::sys::time::TimeSpec::new(c.mtime() + 5, 0);
        nix::sys::stat::utimensat(
            None,
            &upper.join("a/b/c"),
            &ts,
            &ts,
            nix::sys::stat::UtimensatFlags::NoFollowSymlink,
        )
        .unwrap();
        let got = render(&changes(&upper, &lower, &[]).unwrap());
        assert!(
            got.starts_with("C /a/b/c\nC /a\nC /a/b\nA /a/b/c/new\nC /etc\n"),
            "{got}"
        );
        fs::remove_dir_all(upper.join("a")).unwrap();
        // Leaving out a mount point drops it and what is under it, not its parent's line.
        let got = render(&changes(&upper, &lower, &[PathBuf::from("/var/lib")]).unwrap());
        assert!(got.ends_with("A /opq/b\nC /var\n"), "{got}");
    }
}
