//! Writable views: kernel overlayfs over a lazy strata mount (`strata mount --upper DIR`, and
//! the root of a container). The lazy mount is the service's own (internal, setuid allowed,
//! under `ROOT/mounts/ID.lower`); the view's record restores both.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use super::{
    is_mount_point, mount_id, resolve_mountpoint, top_mount_dev, MountInfo, MountRequest,
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
}

/// Where the lazy lower of the writable view at `mountpoint` is mounted.
pub(super) fn lower_dir(store: &Store, mountpoint: &Path) -> PathBuf {
    store
        .mounts_dir()
        .join(format!("{}.lower", mount_id(mountpoint)))
}

impl MountService {
    /// Mounts the image lazily (internal) and kernel overlayfs over it at the request's mount
    /// point, with the upper and work directories under `req.upper`.
    pub(super) fn mount_writable(&self, req: MountRequest) -> Result<MountInfo, ServiceError> {
        let bad = |path: &Path, reason: String| ServiceError::BadMountpoint {
            path: path.to_path_buf(),
            reason,
        };
        let target = std::fs::canonicalize(&req.mountpoint)
            .map_err(|e| bad(&req.mountpoint, e.to_string()))?;
        if !target.is_dir() {
            return Err(bad(&target, "not a directory".into()));
        }
        let Some(upper_dir) = req.upper.clone() else {
            return Err(bad(&target, "no upper directory".into()));
        };
        if self.inner.closing.load(Ordering::SeqCst) {
            return Err(ServiceError::Io("the daemon is shutting down".into()));
        }
        if self.inner.writable.lock().contains_key(&target) || is_mount_point(&target) {
            return Err(bad(&target, "something is already mounted there".into()));
        }
        std::fs::create_dir_all(&upper_dir).map_err(|e| bad(&upper_dir, e.to_string()))?;
        let upper_dir =
            std::fs::canonicalize(&upper_dir).map_err(|e| bad(&upper_dir, e.to_string()))?;
        if upper_dir.starts_with(&target) || target.starts_with(&upper_dir) {
            return Err(bad(
                &upper_dir,
                "the upper directory and the mount point must not contain each other".into(),
            ));
        }
        let dirs = UpperDirs::under(&upper_dir).map_err(|e| bad(&upper_dir, e.to_string()))?;
        let store = &self.inner.store;
        let lower = lower_dir(store, &target);
        std::fs::create_dir_all(&lower).map_err(|e| bad(&lower, e.to_string()))?;
        let mut lower_req = req.clone();
        lower_req.mountpoint = lower.clone();
        lower_req.upper = None;
        lower_req.internal = true;
        lower_req.setuid = true;
        let mut info = self.mount(lower_req)?;
        // Recorded before the overlay goes up: a crash leaves a record the next daemon restores.
        let record = store
            .mounts_dir()
            .join(format!("{}.json", mount_id(&target)));
        let mut recorded = req.clone();
        recorded.mountpoint = target.clone();
        recorded.upper = Some(upper_dir.clone());
        let body = serde_json::json!({"request": recorded, "info": {"mountpoint": target}});
        if let Err(e) = store.write_file(&record, body.to_string().as_bytes()) {
            tracing::warn!(mountpoint = %target.display(),
                "cannot record the mount (it will not be restored after a restart): {e}");
        }
        if let Err(e) = upper::mount_overlay(&lower, &dirs, &target, !req.setuid) {
            let _ = std::fs::remove_file(&record);
            let _ = self.unmount(&lower, true);
            return Err(ServiceError::Mount {
                path: target,
                source: e,
            });
        }
        let dev = top_mount_dev(&target).unwrap_or(0);
        info.mountpoint = target.clone();
        info.id = mount_id(&target);
        info.upper = Some(upper_dir);
        self.inner.writable.lock().insert(
            target.clone(),
            Writable {
                info: info.clone(),
                lower,
                dirs,
                record,
                dev,
            },
        );
        tracing::info!(mountpoint = %target.display(), "writable view mounted");
        Ok(info)
    }

    /// Unmounts a writable view: the overlay, then its lazy lower.
    pub(super) fn unmount_writable(&self, target: &Path, lazy: bool) -> Result<(), ServiceError> {
        let (lower, dev, record) = {
            let views = self.inner.writable.lock();
            let w = views
                .get(target)
                .ok_or_else(|| ServiceError::NotMounted(target.to_path_buf()))?;
            (w.lower.clone(), w.dev, w.record.clone())
        };
        if dev != 0 && top_mount_dev(target).is_some_and(|top| top != dev) {
            return Err(ServiceError::BadMountpoint {
                path: target.to_path_buf(),
                reason: "another filesystem is mounted over the writable view: unmount it first"
                    .into(),
            });
        }
        let flags = if lazy {
            nix::mount::MntFlags::MNT_DETACH
        } else {
            nix::mount::MntFlags::empty()
        };
        nix::mount::umount2(target, flags).map_err(|e| ServiceError::Unmount {
            path: target.to_path_buf(),
            source: e.into(),
        })?;
        self.inner.writable.lock().remove(target);
        if !self.inner.keep_records.load(Ordering::SeqCst) {
            let _ = std::fs::remove_file(&record);
        }
        // The overlay may still hold the lower (a lazy unmount of a busy view): detach it too.
        self.unmount(&lower, true)?;
        let _ = std::fs::remove_dir(&lower);
        Ok(())
    }

    /// The changes a writable view holds relative to its image.
    pub fn changes(&self, mountpoint: &Path) -> Result<Vec<Change>, ServiceError> {
        let target = resolve_mountpoint(mountpoint);
        let (upper, lower) = {
            let views = self.inner.writable.lock();
            let w = views
                .get(&target)
                .ok_or_else(|| ServiceError::BadMountpoint {
                    path: target.clone(),
                    reason: "not a writable view (mount it with --upper)".into(),
                })?;
            (w.dirs.upper.clone(), w.lower.clone())
        };
        upper::changes(&upper, &lower)
            .map_err(|e| ServiceError::Io(format!("reading {}: {e}", upper.display())))
    }
}
