//! Writable views: kernel overlayfs over a lazy strata mount (`strata mount --upper DIR`, and
//! the root of a container). The lazy mount is the service's own (internal, setuid allowed,
//! under `ROOT/mounts/ID.lower`); the view's record restores both. `DIR` holds `upper/`,
//! `work/` and `image` (the manifest digest the upper layer was made over: a view is never
//! mounted over another image, whose files its metacopy entries would misdescribe).

use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use super::{
    is_mount_point, mount_id, resolve_mountpoint, top_mount_dev, unescape, MountInfo, MountRequest,
    MountService, ServiceError,
};
use crate::store::Store;
use crate::upper::{self, Change, UpperDirs};

/// A live writable view.
pub(super) struct Writable {
    pub(super) info: MountInfo,
    /// The lazy mount under the overlay.
    pub(super) lower: PathBuf,
    dirs: UpperDirs,
    record: PathBuf,
    /// The overlay's device number (to tell it from anything mounted over it later).
    dev: u64,
    /// The upper directory, locked (`flock`) while this view uses it.
    _lock: std::fs::File,
}

/// Where the lazy lower of the writable view at `mountpoint` is mounted.
pub fn lower_dir(store: &Store, mountpoint: &Path) -> PathBuf {
    store
        .mounts_dir()
        .join(format!("{}.lower", mount_id(mountpoint)))
}

/// Whether the topmost mount at `target` is an overlay over `lower` (ours).
pub(super) fn is_our_overlay(target: &Path, lower: &Path) -> bool {
    let t = target.to_string_lossy();
    let want = format!("lowerdir={}", lower.to_string_lossy());
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .rfind(|l| {
            l.split_whitespace()
                .nth(4)
                .is_some_and(|p| unescape(p) == t)
        })
        .is_some_and(|l| {
            let Some((_, after)) = l.split_once(" - ") else {
                return false;
            };
            let mut f = after.split_whitespace();
            f.next() == Some("overlay")
                && f.nth(1)
                    .is_some_and(|opts| opts.split(',').any(|o| unescape(o) == want))
        })
}

/// Writes a small file next to the user's upper layer: a private temp file, then a rename.
fn write_marker(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let mut f = crate::store::private_new_file(&tmp)?;
    let done = f
        .write_all(data)
        .and_then(|()| f.sync_all())
        .and_then(|()| std::fs::rename(&tmp, path));
    if done.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    done
}

fn bad(path: &Path, reason: impl Into<String>) -> ServiceError {
    ServiceError::BadMountpoint {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// A directory the daemon may hand to the kernel as part of an overlay: a real directory (not
/// a symlink), this user's, writable by nobody else. Created with `mode` if missing.
fn own_dir(path: &Path, mode: u32) -> Result<(), ServiceError> {
    match std::fs::symlink_metadata(path) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new()
                .mode(mode)
                .create(path)
                .map_err(|e| bad(path, e.to_string()))?;
        }
        Err(e) => return Err(bad(path, e.to_string())),
    }
    let md = std::fs::symlink_metadata(path).map_err(|e| bad(path, e.to_string()))?;
    if !md.file_type().is_dir() {
        return Err(bad(path, "not a directory (symlinks are refused)"));
    }
    if md.uid() != nix::unistd::geteuid().as_raw() || md.mode() & 0o022 != 0 {
        return Err(bad(
            path,
            "must belong to the daemon's user and be writable by nobody else",
        ));
    }
    Ok(())
}

impl MountService {
    /// Mounts the image lazily (internal) and kernel overlayfs over it at the request's mount
    /// point, with the upper and work directories under `req.upper`.
    pub(super) fn mount_writable(&self, req: MountRequest) -> Result<MountInfo, ServiceError> {
        let target = std::fs::canonicalize(&req.mountpoint)
            .map_err(|e| bad(&req.mountpoint, e.to_string()))?;
        if !target.is_dir() {
            return Err(bad(&target, "not a directory"));
        }
        let Some(upper_dir) = req.upper.clone() else {
            return Err(bad(&target, "no upper directory"));
        };
        self.forget_stale_view(&target);
        {
            let mounts = self.inner.mounts.lock();
            if self.inner.closing.load(Ordering::SeqCst) {
                return Err(ServiceError::Io("the daemon is shutting down".into()));
            }
            let mut pending = self.inner.pending.lock();
            if self.inner.writable.lock().contains_key(&target)
                || mounts.contains_key(&target)
                || pending.contains(&target)
                || is_mount_point(&target)
            {
                return Err(bad(&target, "something is already mounted there"));
            }
            pending.push(target.clone());
        }
        let result = self.mount_writable_at(req, &target, &upper_dir);
        self.inner.pending.lock().retain(|p| p != &target);
        self.inner.changed.notify_all();
        result
    }

    fn mount_writable_at(
        &self,
        req: MountRequest,
        target: &Path,
        upper_dir: &Path,
    ) -> Result<MountInfo, ServiceError> {
        own_dir(upper_dir, 0o700)?;
        let upper_dir =
            std::fs::canonicalize(upper_dir).map_err(|e| bad(upper_dir, e.to_string()))?;
        own_dir(&upper_dir, 0o700)?;
        if upper_dir.starts_with(target) || target.starts_with(&upper_dir) {
            return Err(bad(
                &upper_dir,
                "the upper directory and the mount point must not contain each other",
            ));
        }
        // One live view per upper directory (as kernel overlayfs refuses an upperdir in use),
        // across daemons too: two writers of one upper layer would corrupt it.
        let lock = std::fs::File::open(&upper_dir).map_err(|e| bad(&upper_dir, e.to_string()))?;
        match rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(rustix::io::Errno::WOULDBLOCK) => {
                return Err(bad(
                    &upper_dir,
                    "is the upper directory of another mounted view: unmount that one first",
                ))
            }
            Err(e) => return Err(bad(&upper_dir, format!("cannot lock it: {e}"))),
        }
        // The view's root takes the upper dir's mode: 0755 like an image root.
        let dirs = UpperDirs {
            upper: upper_dir.join("upper"),
            work: upper_dir.join("work"),
        };
        own_dir(&dirs.upper, 0o755)?;
        own_dir(&dirs.work, 0o700)?;
        let store = &self.inner.store;
        let lower = lower_dir(store, target);
        let record = store
            .mounts_dir()
            .join(format!("{}.json", mount_id(target)));
        let undo = |lower_mounted: bool| {
            if lower_mounted {
                let _ = self.unmount_internal(&lower);
            }
            let _ = std::fs::remove_dir(&lower);
            let _ = std::fs::remove_file(&record);
        };
        std::fs::create_dir_all(&lower).map_err(|e| bad(&lower, e.to_string()))?;
        // Recorded before anything is mounted: a crash leaves a record the next daemon restores.
        let mut recorded = req.clone();
        recorded.mountpoint = target.to_path_buf();
        recorded.upper = Some(upper_dir.clone());
        let write_record = |r: &MountRequest| {
            let body = serde_json::json!({"request": r.recorded(), "info": {"mountpoint": target}});
            if let Err(e) = store.write_file(&record, body.to_string().as_bytes()) {
                tracing::warn!(mountpoint = %target.display(),
                    "cannot record the mount (it will not be restored after a restart): {e}");
            }
        };
        write_record(&recorded);
        let mut lower_req = req.clone();
        lower_req.mountpoint = lower.clone();
        lower_req.upper = None;
        lower_req.internal = true;
        lower_req.setuid = true;
        let mut info = match self.mount(lower_req) {
            Ok(i) => i,
            Err(e) => {
                undo(false);
                return Err(e);
            }
        };
        // One upper layer, one image: by manifest digest, kept in DIR/image.
        let marker = upper_dir.join("image");
        match std::fs::read_to_string(&marker) {
            Ok(d) if d.trim() != info.manifest => {
                undo(true);
                return Err(bad(
                    &upper_dir,
                    format!(
                        "holds changes over image {} (this is {}): use another directory",
                        d.trim(),
                        info.manifest
                    ),
                ));
            }
            Ok(_) => {}
            Err(_) => {
                if let Err(e) = write_marker(&marker, info.manifest.as_bytes()) {
                    undo(true);
                    return Err(bad(&marker, e.to_string()));
                }
            }
        }
        // Restored by digest: the tag may move, the upper layer belongs to this manifest.
        recorded.image = info.manifest.clone();
        write_record(&recorded);
        // One form per upper directory: the FUSE layer reads its own metacopy files (data at
        // the same path below) but not kernel overlayfs's redirects and origins.
        let form = upper_dir.join("form");
        // FUSE when asked, when DIR was written by it, or when kernel overlayfs cannot give
        // this form here (an ordinary user; root of a user namespace, where overlayfs refuses
        // metacopy, index and trusted xattrs).
        let written = std::fs::read_to_string(&form).ok();
        let fuse = req.fuse_upper
            || written.as_deref().map(str::trim) == Some("strata-fuse")
            || (written.is_none() && !crate::fuse_upper::privileged());
        let want = if fuse { "strata-fuse" } else { "overlayfs" };
        match written {
            Some(f) if f.trim() != want => {
                undo(true);
                return Err(bad(
                    &upper_dir,
                    format!(
                        "was written by {} (this mount is {want}): use another directory",
                        f.trim()
                    ),
                ));
            }
            Some(_) => {}
            None => {
                let fresh = std::fs::read_dir(&dirs.upper).map_or(true, |mut d| d.next().is_none());
                if fuse && !fresh {
                    undo(true);
                    return Err(bad(
                        &upper_dir,
                        "holds changes of kernel overlayfs: use another directory for --fuse-upper",
                    ));
                }
                if let Err(e) = write_marker(&form, want.as_bytes()) {
                    undo(true);
                    return Err(bad(&form, e.to_string()));
                }
            }
        }
        let mounted = if fuse {
            // The lower is this daemon's own mount: a copy-up takes xattrs and small files'
            // data from it in-process instead of through FUSE (keyed as the mount recorded it).
            let index = self
                .inner
                .mounts
                .lock()
                .get(&info.mountpoint)
                .map(|l| l.stats.clone());
            if index.is_none() {
                tracing::warn!(lower = %lower.display(), "the view's lower is not a known mount");
            }
            mount_fuse_upper(&lower, index, &dirs, target, req.setuid)
        } else {
            upper::mount_overlay(&lower, &dirs, target, !req.setuid)
        };
        if let Err(e) = mounted {
            undo(true);
            return Err(ServiceError::Overlay {
                path: target.to_path_buf(),
                source: e,
            });
        }
        let dev = top_mount_dev(target).unwrap_or(0);
        info.mountpoint = target.to_path_buf();
        info.id = mount_id(target);
        info.upper = Some(upper_dir);
        {
            let mounts = self.inner.mounts.lock();
            if self.inner.closing.load(Ordering::SeqCst) {
                drop(mounts);
                let _ = nix::mount::umount2(target, nix::mount::MntFlags::MNT_DETACH);
                undo(true);
                return Err(ServiceError::Io("the daemon is shutting down".into()));
            }
            self.inner.writable.lock().insert(
                target.to_path_buf(),
                Writable {
                    info: info.clone(),
                    lower,
                    dirs,
                    record,
                    dev,
                    _lock: lock,
                },
            );
        }
        tracing::info!(mountpoint = %target.display(), "writable view mounted");
        Ok(info)
    }

    /// A view whose overlay was unmounted behind the daemon's back (or covered by another
    /// mount) is forgotten: its lower is unmounted and its record dropped.
    fn forget_stale_view(&self, target: &Path) {
        let stale = self
            .inner
            .writable
            .lock()
            .get(target)
            .is_some_and(|w| top_mount_dev(target) != Some(w.dev) || !is_mount_point(target));
        if stale {
            tracing::info!(mountpoint = %target.display(), "the writable view was unmounted outside strata");
            self.drop_view(target, true);
        }
    }

    /// Forgets a view (its overlay already unmounted): record, lower, `.lower`.
    fn drop_view(&self, target: &Path, lazy: bool) {
        let Some(w) = self.inner.writable.lock().remove(target) else {
            return;
        };
        if !self.inner.keep_records.load(Ordering::SeqCst) {
            let _ = std::fs::remove_file(&w.record);
        }
        if let Err(e) = self.unmount_internal_lazy(&w.lower, lazy) {
            tracing::warn!(lower = %w.lower.display(), "unmounting a writable view's lower: {e}");
        }
        let _ = std::fs::remove_dir(&w.lower);
        self.inner.changed.notify_all();
    }

    fn unmount_internal(&self, lower: &Path) -> Result<(), ServiceError> {
        self.unmount_internal_lazy(lower, true)
    }

    fn unmount_internal_lazy(&self, lower: &Path, lazy: bool) -> Result<(), ServiceError> {
        self.unmount_lazy_mount(lower, lazy)
    }

    /// Unmounts a writable view: the overlay, then its lazy lower.
    pub(super) fn unmount_writable(&self, target: &Path, lazy: bool) -> Result<(), ServiceError> {
        self.forget_stale_view(target);
        let dev = match self.inner.writable.lock().get(target) {
            Some(w) => w.dev,
            // It was unmounted outside strata: now forgotten.
            None => return Ok(()),
        };
        if top_mount_dev(target).is_some_and(|top| top != dev) {
            return Err(bad(
                target,
                "another filesystem is mounted over the writable view: unmount it first",
            ));
        }
        let flags = if lazy {
            nix::mount::MntFlags::MNT_DETACH
        } else {
            nix::mount::MntFlags::empty()
        };
        match nix::mount::umount2(target, flags) {
            // An ordinary user's FUSE view was mounted through the setuid fusermount3, which
            // unmounts it too.
            Err(nix::errno::Errno::EPERM) if !nix::unistd::geteuid().is_root() => {
                fusermount_unmount(target, lazy)?
            }
            r => r.map_err(|e| ServiceError::Unmount {
                path: target.to_path_buf(),
                source: e.into(),
            })?,
        }
        // A lazily detached busy view still holds its lower: detach that too.
        self.drop_view(target, true);
        Ok(())
    }

    /// Whether `path` is the lazy lower of a live writable view (not for clients to unmount).
    pub(super) fn is_view_lower(&self, path: &Path) -> Option<PathBuf> {
        self.inner
            .writable
            .lock()
            .iter()
            .find(|(_, w)| w.lower == path)
            .map(|(t, _)| t.clone())
    }

    /// Whether `path` is a live writable view.
    pub(super) fn is_view(&self, path: &Path) -> bool {
        self.inner.writable.lock().contains_key(path)
    }

    /// The changes a writable view holds relative to its image, leaving out `exclude` (and
    /// what is under it).
    pub fn changes(
        &self,
        mountpoint: &Path,
        exclude: &[PathBuf],
    ) -> Result<Vec<Change>, ServiceError> {
        let target = resolve_mountpoint(mountpoint);
        let (upper, lower) = {
            let views = self.inner.writable.lock();
            let w = views
                .get(&target)
                .ok_or_else(|| bad(&target, "not a writable view (mount it with --upper)"))?;
            (w.dirs.upper.clone(), w.lower.clone())
        };
        upper::changes(&upper, &lower, exclude)
            .map_err(|e| ServiceError::Io(format!("reading {}: {e}", upper.display())))
    }
}

/// `fusermount3 -u [-z] target`: how an ordinary user unmounts a FUSE mount of theirs.
fn fusermount_unmount(target: &Path, lazy: bool) -> Result<(), ServiceError> {
    let mut cmd = std::process::Command::new("fusermount3");
    cmd.arg("-u");
    if lazy {
        cmd.arg("-z");
    }
    let out = cmd
        .arg("--")
        .arg(target)
        .output()
        .map_err(|e| ServiceError::Unmount {
            path: target.to_path_buf(),
            source: e,
        })?;
    if out.status.success() {
        return Ok(());
    }
    Err(ServiceError::Unmount {
        path: target.to_path_buf(),
        source: std::io::Error::other(String::from_utf8_lossy(&out.stderr).trim().to_string()),
    })
}

/// Mounts strata's FUSE writable layer (`crate::fuse_upper`) at `target`, its session served
/// on its own thread until unmounted.
fn mount_fuse_upper(
    lower: &Path,
    index: Option<crate::fuse::StatsHandle>,
    dirs: &UpperDirs,
    target: &Path,
    setuid: bool,
) -> std::io::Result<()> {
    let mut fs = crate::fuse_upper::UpperFs::new(lower, &dirs.upper, &dirs.work)?;
    if let Some(index) = index {
        let files = index.clone();
        fs.lower_xattrs(Box::new(move |rel| index.xattrs_of(rel)));
        fs.lower_files(Box::new(move |rel, max| files.whole_file(rel, max)));
    }
    let mut cfg = fuser::Config::default();
    cfg.mount_options = vec![
        fuser::MountOption::FSName("strata-upper".into()),
        fuser::MountOption::Subtype("strata".into()),
        fuser::MountOption::DefaultPermissions,
    ];
    // As the kernel overlay's view: nosuid,nodev unless a container's root asks for them.
    if setuid {
        cfg.mount_options.push(fuser::MountOption::Dev);
        cfg.mount_options.push(fuser::MountOption::Suid);
    } else {
        cfg.mount_options.push(fuser::MountOption::NoDev);
        cfg.mount_options.push(fuser::MountOption::NoSuid);
    }
    cfg.acl = if nix::unistd::geteuid().is_root() {
        fuser::SessionACL::All
    } else {
        fuser::SessionACL::Owner
    };
    cfg.n_threads = Some(4);
    let session = fuser::Session::new(fs, target, &cfg)?;
    std::thread::Builder::new()
        .name("strata-upper".into())
        .spawn(move || {
            if let Err(e) = session.run() {
                tracing::warn!("the FUSE writable layer ended: {e}");
            }
        })?;
    // The first request waits for the kernel's INIT to be answered.
    std::fs::metadata(target).map(|_| ())
}
