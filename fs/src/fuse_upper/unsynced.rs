//! Copy-ups made durable in batches instead of one fsync each.
//!
//! A data copy-up writes the file into `work/`, then renames it into the upper layer. Synced
//! before the rename (as kernel overlayfs does), a crash can never show a half-copied file,
//! but the sync costs more than the copy of a small file. Here, on ext4 and XFS, the copy is
//! not synced: before the rename, a record `work/unsynced/INO-BIRTH` (a symlink to the file's
//! path in the upper layer) is made, which their ordered metadata journals commit no later than
//! the rename. A thread syncs the filesystem about once a second (`syncfs`), then removes the
//! records of every copy-up made before and syncs their directory; an fsync of the file does
//! the same for that file. An entry leaves the in-memory list only once its record's removal is
//! durable, so a file is never believed synced while a record of it may survive a crash.
//! Elsewhere (btrfs and f2fs log fsyncs per file, with no such order), and for files with
//! other names (the `work/index` link would outlive a record), every copy is fsynced first.
//!
//! A record found when the layer is mounted again means the copy-up may not have reached the
//! disk. If the upper filesystem stayed mounted since (same boot id, same unique mount id; no
//! sync failed), only the daemon died: the data is in the page cache, and one `syncfs` keeps
//! it. Otherwise the file, if it is still the recorded inode, becomes a metadata-only copy-up
//! again (its data read from the lower, its attributes kept): never fsynced since the copy-up,
//! the lower's content is a state it legitimately had. Renames and links that would move a
//! recorded path (a pending file, a directory above one) sync every pending copy-up first.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::{Duration, UNIX_EPOCH};

use parking_lot::{Condvar, Mutex};

/// Pending copy-ups that start a sync at once instead of waiting for the next tick.
const BATCH: usize = 4096;
/// How long a copy-up stays unsynced at most while the daemon runs (`STRATA_UPPER_SYNC_MS`
/// in the daemon's environment sets another period, at least 10 ms: the crash test
/// lengthens it).
const TICK: Duration = Duration::from_secs(1);
/// Where the records live, under the work directory.
const DIR: &str = "unsynced";
/// The identity of the mount the records were made under (`BOOT_ID MOUNT_ID`).
const MOUNT: &str = "mount";
/// Present when a sync failed: the records stand whatever the mount.
const FAILED: &str = "failed";

/// `STATX_MNT_ID_UNIQUE` (Linux 6.8): a mount id never reused.
const STATX_MNT_ID_UNIQUE: u32 = 0x4000;

/// Every layer's pending copy-ups, for a daemon that stops (see [`settle_all`]).
static LAYERS: Mutex<Vec<Weak<Unsynced>>> = parking_lot::const_mutex(Vec::new());

/// Syncs the pending copy-ups of every writable layer of this process (a daemon stopping:
/// its sessions may not get to do it before the process ends).
pub fn settle_all() {
    let layers: Vec<Arc<Unsynced>> = LAYERS.lock().iter().filter_map(Weak::upgrade).collect();
    for l in layers {
        if let Err(e) = l.settle() {
            tracing::warn!("syncing copy-ups in {}: {e}", l.dir.display());
        }
    }
}

/// A copy-up's record, made before its rename.
pub(super) struct Record {
    ino: u64,
    path: PathBuf,
    rel: PathBuf,
}

struct Entry {
    record: PathBuf,
    /// Where the file is in the upper layer.
    rel: PathBuf,
}

#[derive(Default)]
struct State {
    /// Upper inode → its record.
    files: HashMap<u64, Entry>,
    stop: bool,
    /// A sync failed: no record goes any more (the next mount restores them all).
    failed: bool,
}

/// The copy-ups of one upper layer not yet known to be on disk.
pub(super) struct Unsynced {
    dir: PathBuf,
    /// The records' directory, open: `syncfs` of the upper's filesystem, fsync of removals.
    dir_fd: File,
    /// Whether copies are recorded (ext4, XFS) rather than fsynced one by one.
    batched: bool,
    state: Mutex<State>,
    wake: Condvar,
    /// One sync at a time (a record goes only after a sync that began after its copy-up).
    settling: Mutex<()>,
    tick: Duration,
}

/// A file's identity in a record's name: inode and birth time (an inode number alone may be
/// reused after a crash; 0 where the filesystem keeps no birth time).
fn record_name(md: &fs::Metadata) -> String {
    let born = md
        .created()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    format!("{}-{born}", md.ino())
}

/// Which boot and which mount of the filesystem `dir` is on: unchanged only if everything
/// written there since is still in the page cache or on disk. The unique mount id (never
/// reused) where the kernel has it; a rootless namespace made anew sees new ids, which only
/// costs a restore of the last second's copy-ups.
fn mount_identity(dir: &File) -> io::Result<String> {
    let boot = fs::read_to_string("/proc/sys/kernel/random/boot_id")?;
    let want = rustix::fs::StatxFlags::MNT_ID
        | rustix::fs::StatxFlags::from_bits_retain(STATX_MNT_ID_UNIQUE);
    let st = rustix::fs::statx(dir, "", rustix::fs::AtFlags::EMPTY_PATH, want)?;
    // Without unique ids (before Linux 6.8) a remount may get the old id back: no identity,
    // so the records are always restored.
    if st.stx_mask & STATX_MNT_ID_UNIQUE == 0 {
        return Ok(format!("{} unknown {}\n", boot.trim(), std::process::id()));
    }
    Ok(format!(
        "{} {} {}\n",
        boot.trim(),
        st.stx_mnt_id,
        st.stx_ino
    ))
}

/// Whether the ext2/3/4 filesystem `dir` is on keeps a journal (jbd2 lists it as `DEV-8`).
fn has_journal(dir: &File) -> bool {
    let Ok(md) = dir.metadata() else {
        return false;
    };
    let (major, minor) = (
        nix::sys::stat::major(md.dev()),
        nix::sys::stat::minor(md.dev()),
    );
    let Ok(uevent) = fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/uevent")) else {
        return false;
    };
    let Some(name) = uevent.lines().find_map(|l| l.strip_prefix("DEVNAME=")) else {
        return false;
    };
    let want = format!("{}-", name.replace('/', "!"));
    fs::read_dir("/proc/fs/jbd2").is_ok_and(|d| {
        d.flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with(&want))
    })
}

/// Writes `data` to `path` durably (temporary file, fsync, rename; the caller syncs the
/// directory).
fn write_synced(path: &Path, data: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp)?;
    io::Write::write_all(&mut f, data)?;
    f.sync_all()?;
    fs::rename(&tmp, path)
}

impl Unsynced {
    /// The pending copy-ups of the layer whose work directory is `work`. Records left by an
    /// earlier daemon are handed to `restore` (path in the upper layer, record name) unless
    /// the filesystem stayed mounted since; see the module's documentation.
    pub(super) fn open(
        work: &Path,
        restore: impl Fn(&Path, &str) -> io::Result<()>,
    ) -> io::Result<Arc<Self>> {
        let dir = work.join(DIR);
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)?;
        let dir_fd = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
            .open(&dir)?;
        let kind = nix::sys::statfs::fstatfs(&dir_fd)?.filesystem_type();
        let batched = kind == nix::sys::statfs::XFS_SUPER_MAGIC
            || (kind == nix::sys::statfs::EXT4_SUPER_MAGIC && has_journal(&dir_fd));
        let u = Unsynced {
            dir,
            dir_fd,
            batched,
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
            settling: Mutex::new(()),
            tick: std::env::var("STRATA_UPPER_SYNC_MS")
                .ok()
                .and_then(|v| v.parse().ok())
                .map_or(TICK, |ms: u64| Duration::from_millis(ms.max(10))),
        };
        u.recover(restore)?;
        let u = Arc::new(u);
        {
            let mut layers = LAYERS.lock();
            layers.retain(|w| w.strong_count() > 0);
            layers.push(Arc::downgrade(&u));
        }
        let bg = u.clone();
        std::thread::Builder::new()
            .name("strata-upper-sync".into())
            .spawn(move || bg.run())?;
        Ok(u)
    }

    fn recover(&self, restore: impl Fn(&Path, &str) -> io::Result<()>) -> io::Result<()> {
        let now = mount_identity(&self.dir_fd)?;
        let marker = self.dir.join(MOUNT);
        let failed = self.dir.join(FAILED);
        let same_mount = fs::read_to_string(&marker).is_ok_and(|m| m == now)
            && fs::symlink_metadata(&failed).is_err();
        let mut records = Vec::new();
        for e in fs::read_dir(&self.dir)? {
            let e = e?;
            let name = e.file_name();
            let ours = [MOUNT, FAILED]
                .iter()
                .any(|n| name.as_bytes() == n.as_bytes())
                || name.as_bytes().ends_with(b".tmp");
            if !ours {
                records.push(e.path());
            }
        }
        if !records.is_empty() {
            if same_mount {
                nix::unistd::syncfs(self.dir_fd.as_raw_fd())?;
            } else {
                for r in &records {
                    let (Ok(to), Some(name)) = (fs::read_link(r), r.file_name()) else {
                        continue;
                    };
                    restore(&to, &name.to_string_lossy()).map_err(|e| {
                        io::Error::new(
                            e.kind(),
                            format!(
                                "restoring {} (copied up, not synced before a crash): {e}",
                                to.display()
                            ),
                        )
                    })?;
                }
            }
            for r in &records {
                fs::remove_file(r)?;
            }
        }
        let _ = fs::remove_file(&failed);
        if fs::read_to_string(&marker).ok().as_deref() != Some(now.as_str()) {
            write_synced(&marker, now.as_bytes())?;
        }
        self.dir_fd.sync_all()
    }

    /// Whether record `name` (from [`Self::open`]'s `restore`) is the file `md`.
    pub(super) fn names(name: &str, md: &fs::Metadata) -> bool {
        record_name(md) == name
    }

    /// Whether copies of `nlink` names are recorded; if not, the caller fsyncs them.
    pub(super) fn records(&self, nlink: u64) -> bool {
        self.batched && nlink <= 1 && !self.state.lock().failed
    }

    /// Records `file` (made in `work/`, about to be renamed to `rel` in the upper layer).
    pub(super) fn record(&self, file: &Path, rel: &Path) -> io::Result<Record> {
        let md = fs::symlink_metadata(file)?;
        let path = self.dir.join(record_name(&md));
        if let Err(e) = std::os::unix::fs::symlink(rel, &path) {
            // A record of an inode of the same number and birth (clock stepped back): stale.
            if e.kind() != io::ErrorKind::AlreadyExists {
                return Err(e);
            }
            fs::remove_file(&path)?;
            std::os::unix::fs::symlink(rel, &path)?;
        }
        Ok(Record {
            ino: md.ino(),
            path,
            rel: rel.to_path_buf(),
        })
    }

    /// The recorded file was renamed into place: pending until the next sync.
    pub(super) fn added(&self, r: Record) {
        let mut st = self.state.lock();
        st.files.insert(
            r.ino,
            Entry {
                record: r.path,
                rel: r.rel,
            },
        );
        if st.files.len() >= BATCH {
            self.wake.notify_one();
        }
    }

    /// The rename after `r` failed: no copy-up to keep.
    pub(super) fn dropped(&self, r: Record) {
        let _ = fs::remove_file(r.path);
    }

    /// Whether upper inode `ino` holds a copy-up not yet synced.
    pub(super) fn pending(&self, ino: u64) -> bool {
        self.state.lock().files.contains_key(&ino)
    }

    /// Whether a pending copy-up lies under `dir` of the upper layer.
    pub(super) fn pending_under(&self, dir: &Path) -> bool {
        self.state
            .lock()
            .files
            .values()
            .any(|e| e.rel.starts_with(dir))
    }

    /// Forgets `batch` (inode, record) where the entry is still that record: its removal is
    /// durable.
    fn forget(&self, batch: &[(u64, PathBuf)]) {
        let mut st = self.state.lock();
        for (ino, record) in batch {
            if st.files.get(ino).is_some_and(|e| &e.record == record) {
                st.files.remove(ino);
            }
        }
    }

    /// fsync (or fdatasync) of an upper file: a pending copy-up's record goes with it.
    pub(super) fn sync_file(&self, f: &File, datasync: bool) -> io::Result<()> {
        let ino = f.metadata()?.ino();
        let record = {
            let st = self.state.lock();
            match st.files.get(&ino) {
                Some(e) => e.record.clone(),
                _ => {
                    drop(st);
                    return if datasync {
                        f.sync_data()
                    } else {
                        f.sync_all()
                    };
                }
            }
        };
        f.sync_all()?;
        match fs::remove_file(&record) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        self.dir_fd.sync_all()?;
        self.forget(&[(ino, record)]);
        Ok(())
    }

    /// Syncs the upper's filesystem and removes the records of every copy-up made before.
    pub(super) fn settle(&self) -> io::Result<()> {
        let _one = self.settling.lock();
        let batch: Vec<(u64, PathBuf)> = {
            let st = self.state.lock();
            if st.failed {
                return Err(io::Error::other(
                    "an earlier sync of copy-ups failed: they are restored at the next mount",
                ));
            }
            st.files
                .iter()
                .map(|(i, e)| (*i, e.record.clone()))
                .collect()
        };
        if batch.is_empty() {
            return Ok(());
        }
        if let Err(e) = nix::unistd::syncfs(self.dir_fd.as_raw_fd()) {
            // Reported once: a later sync would succeed without the lost data. The records
            // stay for good, and the next mount restores their files whatever it finds.
            self.state.lock().failed = true;
            let _ = File::create(self.dir.join(FAILED)).and_then(|_| self.dir_fd.sync_all());
            return Err(e.into());
        }
        for (_, r) in &batch {
            match fs::remove_file(r) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        self.dir_fd.sync_all()?;
        self.forget(&batch);
        Ok(())
    }

    fn run(&self) {
        loop {
            {
                let mut st = self.state.lock();
                if st.stop {
                    return;
                }
                if st.files.len() < BATCH || st.failed {
                    self.wake.wait_for(&mut st, self.tick);
                }
                if st.stop {
                    return;
                }
                // After a failed sync the records stay: nothing to do until the layer goes.
                if st.failed {
                    continue;
                }
            }
            if let Err(e) = self.settle() {
                tracing::warn!("syncing copy-ups in {}: {e}", self.dir.display());
            }
        }
    }

    /// The layer is going: everything pending is synced, the thread ends.
    pub(super) fn stop(&self) {
        if let Err(e) = self.settle() {
            tracing::warn!("syncing copy-ups in {}: {e}", self.dir.display());
        }
        self.state.lock().stop = true;
        self.wake.notify_one();
    }
}
