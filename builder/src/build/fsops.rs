//! File operations of a build step on a root directory (a writable view of the stage):
//! paths resolve inside the root the way they would inside the container (symlinks, absolute
//! or relative, never lead out of it), and COPY/ADD/WORKDIR write there with Docker's rules.

use std::collections::BTreeSet;
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::dockerfile::ignore::{glob, Ignore};
use crate::BuildError;

/// `path` (absolute inside the root, or relative to it) as a host path under `root`, with
/// every symlink on the way resolved inside the root (`..` stops at the root), as a chroot
/// would resolve it. The last component is not followed unless `follow_last`.
pub fn secure_join(root: &Path, path: &str, follow_last: bool) -> io::Result<PathBuf> {
    let mut todo: Vec<String> = components(path).into_iter().rev().collect();
    let mut at: Vec<String> = Vec::new();
    let mut links = 0;
    while let Some(c) = todo.pop() {
        if c == ".." {
            at.pop();
            continue;
        }
        let candidate = at
            .iter()
            .fold(root.to_path_buf(), |p, s| p.join(s))
            .join(&c);
        let last = todo.is_empty();
        match fs::symlink_metadata(&candidate) {
            Ok(md) if md.file_type().is_symlink() && (!last || follow_last) => {
                links += 1;
                if links > 40 {
                    return Err(io::Error::from_raw_os_error(libc::ELOOP));
                }
                let target = fs::read_link(&candidate)?;
                let target = target.to_string_lossy().to_string();
                if target.starts_with('/') {
                    at.clear();
                }
                for t in components(&target).into_iter().rev() {
                    todo.push(t);
                }
            }
            _ => at.push(c),
        }
    }
    Ok(at.iter().fold(root.to_path_buf(), |p, s| p.join(s)))
}

/// A small text file of a root (`/etc/passwd`, `/etc/group`) as the container would read it:
/// resolved inside the root, a regular file only, at most `cap` bytes; empty when missing.
pub fn read_root_file(root: &Path, path: &str, cap: u64) -> io::Result<String> {
    let host = secure_join(root, path, true)?;
    let md = match fs::metadata(&host) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(String::new()),
        Err(e) => return Err(e),
    };
    if !md.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{path} in the image is not a regular file"),
        ));
    }
    let mut text = String::new();
    fs::File::open(&host)?.take(cap).read_to_string(&mut text)?;
    Ok(text)
}

fn components(path: &str) -> Vec<String> {
    Path::new(path)
        .components()
        .filter_map(|c| match c {
            Component::Normal(s) => Some(s.to_string_lossy().to_string()),
            Component::ParentDir => Some("..".to_string()),
            _ => None,
        })
        .collect()
}

/// Owner and mode settings of COPY/ADD.
#[derive(Clone, Copy, Debug, Default)]
pub struct CopyOwnership {
    /// `--chown` (resolved); `None`: root for build-context files, kept for `--from` ones.
    pub chown: Option<(u32, u32)>,
    /// `--chmod`.
    pub chmod: Option<u32>,
    /// Sources come from another image or stage: keep their owners without `--chown`.
    pub keep_owners: bool,
}

/// Creates `dir` (absolute inside the root) and its missing parents, root-owned 0755, as
/// WORKDIR and COPY do; true if anything was created.
pub fn mkdir_all(root: &Path, dir: &str, owner: Option<(u32, u32)>) -> io::Result<bool> {
    let mut created = false;
    let mut sofar = String::new();
    for c in components(dir) {
        if c == ".." {
            continue;
        }
        sofar.push('/');
        sofar.push_str(&c);
        let host = secure_join(root, &sofar, true)?;
        match fs::symlink_metadata(&host) {
            Ok(md) if md.is_dir() => {}
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{sofar} exists and is not a directory"),
                ))
            }
            Err(_) => {
                fs::create_dir(&host)?;
                fs::set_permissions(&host, fs::Permissions::from_mode(0o755))?;
                let (u, g) = owner.unwrap_or((0, 0));
                std::os::unix::fs::lchown(&host, Some(u), Some(g))?;
                created = true;
            }
        }
    }
    Ok(created)
}

/// The sources a COPY/ADD names in `base` (the build context, or another root): globs
/// expanded (Go's `filepath.Match` per segment), `.dockerignore` applied to the context,
/// sorted; relative paths inside `base`. An unmatched pattern is an error, as in Docker.
pub fn expand_sources(
    base: &Path,
    patterns: &[String],
    ignore: Option<&Ignore>,
) -> Result<Vec<String>, BuildError> {
    let mut out = Vec::new();
    for pat in patterns {
        let segs = components(pat);
        if segs.iter().any(|s| s == "..") {
            return Err(BuildError::Source(format!(
                "{pat}: sources outside the build context are not allowed"
            )));
        }
        let mut found: Vec<String> = Vec::new();
        walk_glob(base, &segs, String::new(), &mut found)?;
        found.retain(|p| ignore.is_none_or(|ig| p.is_empty() || !ig.excluded(p)));
        // What a source resolves to is judged too: a symlink must not reach an ignored file.
        if let Some(ig) = ignore {
            for p in &found {
                let host = secure_join(base, p, true).map_err(|e| BuildError::io(base, e))?;
                let rel = resolved_rel(base, &host);
                if !rel.is_empty() && ig.excluded(&rel) {
                    return Err(BuildError::Source(format!(
                        "{p}: resolves to {rel}, which .dockerignore excludes"
                    )));
                }
            }
        }
        if found.is_empty() {
            return Err(BuildError::Source(format!(
                "{pat}: no such file or directory in the build context"
            )));
        }
        found.sort();
        out.extend(found);
    }
    Ok(out)
}

fn walk_glob(
    base: &Path,
    segs: &[String],
    sofar: String,
    out: &mut Vec<String>,
) -> Result<(), BuildError> {
    let Some((first, rest)) = segs.split_first() else {
        out.push(sofar);
        return Ok(());
    };
    let join = |name: &str| {
        if sofar.is_empty() {
            name.to_string()
        } else {
            format!("{sofar}/{name}")
        }
    };
    let meta = first.contains(['*', '?', '[', '\\']);
    if !meta {
        let p = secure_join(base, &join(first), rest.is_empty())
            .map_err(|e| BuildError::io(base, e))?;
        if fs::symlink_metadata(&p).is_ok() {
            walk_glob(base, rest, join(first), out)?;
        }
        return Ok(());
    }
    let dir = secure_join(base, &sofar, true).map_err(|e| BuildError::io(base, e))?;
    let Ok(entries) = fs::read_dir(&dir) else {
        return Ok(());
    };
    let mut names: Vec<String> = entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect();
    names.sort();
    for n in names {
        if glob(first, &n) {
            walk_glob(base, rest, join(&n), out)?;
        }
    }
    Ok(())
}

/// Copies `sources` (relative paths in `base`) to `dest` inside `root` with Docker's rules:
/// a directory source copies its contents; several sources, or a `dest` ending in `/` or
/// naming a directory, put each source under it; missing parents are created.
pub fn copy_sources(
    base: &Path,
    sources: &[String],
    root: &Path,
    dest: &str,
    own: CopyOwnership,
    ignore: Option<&Ignore>,
) -> Result<(), BuildError> {
    // `..` in the destination resolves lexically, as Docker cleans it.
    let trailing = dest.ends_with('/');
    let dest = format!("/{}", clean(dest).join("/"));
    let dest_is_dir = trailing
        || sources.len() > 1
        || secure_join(root, &dest, true)
            .ok()
            .and_then(|p| fs::metadata(p).ok())
            .is_some_and(|m| m.is_dir());
    for src in sources {
        let host_src = secure_join(base, src, true).map_err(|e| BuildError::io(base, e))?;
        // What the source resolves to is what the ignore rules judge (a symlink must not
        // reach an ignored file).
        let resolved = resolved_rel(base, &host_src);
        if ignore.is_some_and(|ig| !resolved.is_empty() && ig.excluded(&resolved)) {
            return Err(BuildError::Source(format!(
                "{src}: resolves to {resolved}, which .dockerignore excludes"
            )));
        }
        let md = fs::metadata(&host_src).map_err(|e| BuildError::io(&host_src, e))?;
        let target = if md.is_dir() {
            dest.clone()
        } else if dest_is_dir {
            let name = Path::new(src)
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default();
            format!("{}/{name}", dest.trim_end_matches('/'))
        } else {
            dest.clone()
        };
        if let Some(parent) = Path::new(&target).parent() {
            mkdir_all(root, &parent.to_string_lossy(), own.chown)
                .map_err(|e| BuildError::io(Path::new(&target), e))?;
        }
        if md.is_dir() {
            let existed = secure_join(root, &target, true)
                .ok()
                .is_some_and(|p| fs::metadata(p).is_ok_and(|m| m.is_dir()));
            mkdir_all(root, &target, own.chown)
                .map_err(|e| BuildError::io(Path::new(&target), e))?;
            let host_dst = secure_join(root, &target, true).map_err(|e| BuildError::io(root, e))?;
            copy_tree(&host_src, &host_dst, &resolved, own, ignore)?;
            // A directory made here takes the source's mode (and owner rules); an existing
            // one keeps its own, as buildkit's copy.
            if !existed {
                apply_meta(&host_dst, &md, own)?;
            }
        } else {
            let host_dst =
                secure_join(root, &target, false).map_err(|e| BuildError::io(root, e))?;
            copy_entry(&host_src, &host_dst, own)?;
        }
    }
    Ok(())
}

/// `host` (under `base`) as a path relative to `base`.
fn resolved_rel(base: &Path, host: &Path) -> String {
    host.strip_prefix(base)
        .map(|p| p.to_string_lossy().to_string())
        .unwrap_or_default()
}

/// Lexically cleaned components of a path inside a root (`..` stops at the root).
fn clean(path: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for c in components(path) {
        if c == ".." {
            out.pop();
        } else {
            out.push(c);
        }
    }
    out
}

/// Whether a directory entry at `rel` is left out by the ignore rules, and whether the walk
/// must still go below it (a later `!` pattern may re-include something there).
fn skip_entry(ignore: Option<&Ignore>, rel: &str, is_dir: bool) -> bool {
    match ignore {
        Some(ig) if ig.excluded(rel) => !(is_dir && ig.may_include_below(rel)),
        _ => false,
    }
}

fn copy_tree(
    src: &Path,
    dst: &Path,
    rel: &str,
    own: CopyOwnership,
    ignore: Option<&Ignore>,
) -> Result<(), BuildError> {
    let mut names: Vec<_> = fs::read_dir(src)
        .map_err(|e| BuildError::io(src, e))?
        .flatten()
        .map(|e| e.file_name())
        .collect();
    names.sort();
    for n in names {
        let child_rel = if rel.is_empty() {
            n.to_string_lossy().to_string()
        } else {
            format!("{rel}/{}", n.to_string_lossy())
        };
        let s = src.join(&n);
        let md = fs::symlink_metadata(&s).map_err(|e| BuildError::io(&s, e))?;
        if skip_entry(ignore, &child_rel, md.is_dir()) {
            continue;
        }
        let d = dst.join(&n);
        if md.is_dir() {
            let created = match fs::symlink_metadata(&d) {
                Ok(m) if m.is_dir() => false,
                Ok(_) => {
                    remove(&d)?;
                    fs::create_dir(&d).map_err(|e| BuildError::io(&d, e))?;
                    true
                }
                Err(_) => {
                    fs::create_dir(&d).map_err(|e| BuildError::io(&d, e))?;
                    true
                }
            };
            copy_tree(&s, &d, &child_rel, own, ignore)?;
            if created {
                apply_meta(&d, &md, own)?;
            }
        } else {
            copy_entry(&s, &d, own)?;
        }
    }
    Ok(())
}

fn remove(p: &Path) -> Result<(), BuildError> {
    match fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(p).map_err(|e| BuildError::io(p, e)),
        Ok(_) => fs::remove_file(p).map_err(|e| BuildError::io(p, e)),
        Err(_) => Ok(()),
    }
}

/// One non-directory entry (file, symlink, fifo); the source's top level is followed.
fn copy_entry(src: &Path, dst: &Path, own: CopyOwnership) -> Result<(), BuildError> {
    let md = fs::symlink_metadata(src).map_err(|e| BuildError::io(src, e))?;
    if fs::symlink_metadata(dst).is_ok_and(|m| m.is_dir()) {
        return Err(BuildError::Source(format!(
            "cannot replace directory {} with a file",
            dst.display()
        )));
    } else if fs::symlink_metadata(dst).is_ok() {
        fs::remove_file(dst).map_err(|e| BuildError::io(dst, e))?;
    }
    if md.file_type().is_symlink() {
        let target = fs::read_link(src).map_err(|e| BuildError::io(src, e))?;
        std::os::unix::fs::symlink(&target, dst).map_err(|e| BuildError::io(dst, e))?;
    } else if md.is_file() {
        fs::copy(src, dst).map_err(|e| BuildError::io(dst, e))?;
    } else {
        // Devices, fifos, sockets in a context are not copied (as Docker).
        return Ok(());
    }
    apply_meta(dst, &md, own)
}

fn apply_meta(dst: &Path, src_md: &fs::Metadata, own: CopyOwnership) -> Result<(), BuildError> {
    let (uid, gid) = match (own.chown, own.keep_owners) {
        (Some(ids), _) => ids,
        (None, true) => (src_md.uid(), src_md.gid()),
        (None, false) => (0, 0),
    };
    std::os::unix::fs::lchown(dst, Some(uid), Some(gid)).map_err(|e| BuildError::io(dst, e))?;
    if src_md.file_type().is_symlink() {
        return Ok(());
    }
    let mode = own.chmod.unwrap_or(src_md.mode() & 0o7777);
    fs::set_permissions(dst, fs::Permissions::from_mode(mode))
        .map_err(|e| BuildError::io(dst, e))?;
    let mtime = nix::sys::time::TimeSpec::new(src_md.mtime(), src_md.mtime_nsec());
    nix::sys::stat::utimensat(
        None,
        dst,
        &mtime,
        &mtime,
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )
    .map_err(|e| BuildError::io(dst, e.into()))
}

/// A digest of COPY/ADD sources: every path under them, its type, mode, link target and
/// content (the cache key's input: unchanged sources, same key).
pub fn sources_digest(
    base: &Path,
    sources: &[String],
    ignore: Option<&Ignore>,
) -> Result<String, BuildError> {
    let mut h = Sha256::new();
    let mut seen = BTreeSet::new();
    for s in sources {
        let host = secure_join(base, s, true).map_err(|e| BuildError::io(base, e))?;
        let rel = resolved_rel(base, &host);
        // The name as written matters too (it names the copy).
        frame(&mut h, s.as_bytes());
        hash_tree(&host, &rel, &mut h, ignore, &mut seen)?;
    }
    Ok(format!("sha256:{}", hex::encode(h.finalize())))
}

/// Hashes `data` with its length first: no two sequences of fields hash alike.
fn frame(h: &mut Sha256, data: &[u8]) {
    h.update((data.len() as u64).to_le_bytes());
    h.update(data);
}

/// Hashes what [`copy_tree`] would copy from `p`: the same entries, ignore rules included.
fn hash_tree(
    p: &Path,
    rel: &str,
    h: &mut Sha256,
    ignore: Option<&Ignore>,
    seen: &mut BTreeSet<String>,
) -> Result<(), BuildError> {
    if !seen.insert(rel.to_string()) {
        return Ok(());
    }
    let md = fs::symlink_metadata(p).map_err(|e| BuildError::io(p, e))?;
    frame(h, rel.as_bytes());
    h.update(md.mode().to_le_bytes());
    if md.file_type().is_symlink() {
        let target = fs::read_link(p).map_err(|e| BuildError::io(p, e))?;
        frame(h, target.as_os_str().as_encoded_bytes());
    } else if md.is_file() {
        h.update(md.len().to_le_bytes());
        let mut f = fs::File::open(p).map_err(|e| BuildError::io(p, e))?;
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = f.read(&mut buf).map_err(|e| BuildError::io(p, e))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
    } else if md.is_dir() {
        let mut names: Vec<_> = fs::read_dir(p)
            .map_err(|e| BuildError::io(p, e))?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().to_string())
            .collect();
        names.sort();
        for n in names {
            let child = if rel.is_empty() {
                n.clone()
            } else {
                format!("{rel}/{n}")
            };
            let is_dir = fs::symlink_metadata(p.join(&n)).is_ok_and(|m| m.is_dir());
            if skip_entry(ignore, &child, is_dir) {
                continue;
            }
            hash_tree(&p.join(&n), &child, h, ignore, seen)?;
        }
    }
    h.update([0xff]);
    Ok(())
}

/// Whether `path` is a tar archive ADD unpacks (plain, gzip, bzip2, xz or zstd), by content.
pub fn archive_kind(path: &Path) -> Option<&'static str> {
    let mut head = [0u8; 512];
    let mut f = fs::File::open(path).ok()?;
    let mut n = 0;
    while n < head.len() {
        match f.read(&mut head[n..]) {
            Ok(0) | Err(_) => break,
            Ok(k) => n += k,
        }
    }
    let h = &head[..n];
    if h.starts_with(&[0x1f, 0x8b]) {
        Some("gzip")
    } else if h.starts_with(b"BZh") {
        Some("bzip2")
    } else if h.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        Some("xz")
    } else if h.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Some("zstd")
    } else if n >= 262 && &h[257..262] == b"ustar" {
        Some("tar")
    } else {
        None
    }
}

/// Unpacks a (compressed) tar archive into `dest` (a host directory inside the root): entries
/// that would land outside it (`..`, absolute paths, through symlinks) are refused.
pub fn unpack_archive(archive: &Path, kind: &str, dest: &Path) -> Result<(), BuildError> {
    let file = fs::File::open(archive).map_err(|e| BuildError::io(archive, e))?;
    let reader: Box<dyn Read> = match kind {
        "gzip" => Box::new(flate2::read::MultiGzDecoder::new(file)),
        "zstd" => Box::new(zstd::stream::read::Decoder::new(file).map_err(BuildError::Read)?),
        "bzip2" | "xz" => {
            let tool = if kind == "bzip2" { "bzip2" } else { "xz" };
            // Decompressed to a temp file first: the tool's exit status is known before a
            // single entry is unpacked (a corrupt stream must not unpack partially).
            let mut tmp = tempfile::tempfile().map_err(BuildError::Read)?;
            let out = std::process::Command::new(tool)
                .arg("-dc")
                .stdin(file)
                .stdout(tmp.try_clone().map_err(BuildError::Read)?)
                .stderr(std::process::Stdio::piped())
                .output()
                .map_err(|e| {
                    BuildError::Source(format!(
                        "{tool} is needed to unpack {}: {e}",
                        archive.display()
                    ))
                })?;
            if !out.status.success() {
                return Err(BuildError::Source(format!(
                    "{}: {tool}: {}",
                    archive.display(),
                    String::from_utf8_lossy(&out.stderr).trim()
                )));
            }
            std::io::Seek::seek(&mut tmp, std::io::SeekFrom::Start(0)).map_err(BuildError::Read)?;
            Box::new(tmp)
        }
        _ => Box::new(file),
    };
    let mut ar = tar::Archive::new(reader);
    ar.set_preserve_permissions(true);
    ar.set_preserve_ownerships(true);
    ar.set_preserve_mtime(true);
    ar.set_unpack_xattrs(true);
    ar.set_overwrite(true);
    for entry in ar.entries().map_err(BuildError::Read)? {
        let mut entry =
            entry.map_err(|e| BuildError::Layer(format!("{}: {e}", archive.display())))?;
        let path = entry.path().map_err(BuildError::Read)?.to_path_buf();
        if path.components().any(|c| matches!(c, Component::ParentDir)) {
            return Err(BuildError::HostilePath {
                path: path.to_string_lossy().to_string(),
                reason: "`..` in an ADD archive",
            });
        }
        if !entry.unpack_in(dest).map_err(|e| {
            BuildError::Layer(format!("{}: {}: {e}", archive.display(), path.display()))
        })? {
            return Err(BuildError::HostilePath {
                path: path.to_string_lossy().to_string(),
                reason: "outside the destination",
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn secure_join_stays_inside() {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        fs::create_dir_all(r.join("usr/lib")).unwrap();
        std::os::unix::fs::symlink("/usr/lib", r.join("lib")).unwrap();
        std::os::unix::fs::symlink("../../../../etc", r.join("usr/escape")).unwrap();
        std::os::unix::fs::symlink("/", r.join("root_link")).unwrap();
        assert_eq!(secure_join(r, "/lib/x", true).unwrap(), r.join("usr/lib/x"));
        assert_eq!(
            secure_join(r, "/usr/escape/passwd", true).unwrap(),
            r.join("etc/passwd")
        );
        assert_eq!(secure_join(r, "../../..", true).unwrap(), r.to_path_buf());
        assert_eq!(
            secure_join(r, "/root_link/etc", true).unwrap(),
            r.join("etc")
        );
        assert_eq!(secure_join(r, "/lib", false).unwrap(), r.join("lib"));
        std::os::unix::fs::symlink("loop", r.join("loop")).unwrap();
        assert!(secure_join(r, "/loop/x", true).is_err());
    }

    #[test]
    fn copy_rules() {
        let t = tempfile::tempdir().unwrap();
        let (ctx, root) = (t.path().join("ctx"), t.path().join("root"));
        fs::create_dir_all(ctx.join("dir/sub")).unwrap();
        fs::create_dir_all(&root).unwrap();
        fs::write(ctx.join("a.c"), b"a").unwrap();
        fs::write(ctx.join("b.c"), b"b").unwrap();
        fs::write(ctx.join("notes.md"), b"n").unwrap();
        fs::write(ctx.join("dir/sub/f"), b"f").unwrap();
        let ig = Ignore::parse("*.md\n");
        let srcs = expand_sources(&ctx, &["*.c".into()], Some(&ig)).unwrap();
        assert_eq!(srcs, vec!["a.c", "b.c"]);
        assert!(expand_sources(&ctx, &["*.md".into()], Some(&ig)).is_err());
        assert!(expand_sources(&ctx, &["../x".into()], None).is_err());
        let own = CopyOwnership {
            chown: Some((11, 22)),
            ..Default::default()
        };
        copy_sources(&ctx, &srcs, &root, "/src/", own, Some(&ig)).unwrap();
        let md = fs::metadata(root.join("src/a.c")).unwrap();
        assert_eq!((md.uid(), md.gid()), (11, 22));
        // A directory source copies its contents.
        copy_sources(
            &ctx,
            &["dir".into()],
            &root,
            "/d",
            CopyOwnership::default(),
            None,
        )
        .unwrap();
        assert_eq!(fs::read(root.join("d/sub/f")).unwrap(), b"f");
        // A single file to a non-directory destination is renamed.
        copy_sources(
            &ctx,
            &["a.c".into()],
            &root,
            "/x/renamed",
            CopyOwnership::default(),
            None,
        )
        .unwrap();
        assert_eq!(fs::read(root.join("x/renamed")).unwrap(), b"a");
        let d1 = sources_digest(&ctx, &["dir".into()], None).unwrap();
        fs::write(ctx.join("dir/sub/f"), b"changed").unwrap();
        assert_ne!(d1, sources_digest(&ctx, &["dir".into()], None).unwrap());
    }
}
