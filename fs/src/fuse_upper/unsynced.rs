//! Copy-ups made durable in batches instead of one fsync each.
//!
//! A data copy-up writes the file into `work/`, then renames it into the upper layer. Synced
//! before the rename (as kernel overlayfs does), a crash can never show a half-copied file,
//! but the sync costs more than the copy of a small file. Here the copy is not synced: before
//! the rename, a record `work/unsynced/INO-BTIME` (a symlink to the file's path in the upper
//! layer) is made, which a journaling filesystem commits no later than the rename. A thread
//! syncs the whole filesystem about once a second (`syncfs`) and then drops the records of
//! every copy-up made before it; an fsync of the file itself does the same for that file.
//!
//! A record found when the layer is mounted again means the copy-up may not have reached the
//! disk. If the upper filesystem stayed mounted since (same boot, same mount: only the daemon
//! died), the data is in the page cache, and one `syncfs` makes it durable. Otherwise the file
//! (if it is still the recorded inode) gets the lower's data again: never fsynced since the
//! copy-up, the lower's content is a state it legitimately had. A rename or link of such a
//! file, or of any directory, first syncs every pending copy-up, so records never name moved
//! files.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use parking_lot::{Condvar, Mutex};

/// Pending copy-ups that start a sync at once instead of waiting for the next tick.
const BATCH: usize = 4096;
/// How long a copy-up stays unsynced at most while the daemon runs (`STRATA_UPPER_SYNC_MS`
/// in the daemon's environment sets another period: the crash tests lengthen it).
const TICK: Duration = Duration::from_secs(1);
/// Where the records live, under the work directory.
const DIR: &str = "unsynced";
/// The record of the mount the records were made under (`BOOT_ID MNT_ID`).
const MOUNT: &str = "mount";

/// A copy-up's record, made before its rename.
pub(super) struct Record {
    ino: u64,
    path: PathBuf,
}

#[derive(Default)]
struct State {
    /// Upper inode → its record.
    files: HashMap<u64, PathBuf>,
    stop: bool,
}

/// The copy-ups of one upper layer not yet known to be on disk.
pub(super) struct Unsynced {
    dir: PathBuf,
    /// The records' directory, open: `syncfs` of the upper's filesystem, fsync of removals.
    dir_fd: File,
    state: Mutex<State>,
    wake: Condvar,
    /// One sync at a time (a record goes only after a sync that began after its copy-up).
    settling: Mutex<()>,
    tick: Duration,
}

/// A file's identity in a record's name: inode and birth time (an inode number alone may be
/// reused after a crash).
fn record_name(md: &fs::Metadata) -> String {
    let born = md
        .created()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    format!("{}-{born}", md.ino())
}

/// Which boot and which mount of the filesystem `dir` is on: unchanged only if everything
/// written there since is still in the page cache or on disk.
fn mount_identity(dir: &File) -> io::Result<String> {
    let boot = fs::read_to_string("/proc/sys/kernel/random/boot_id")?;
    let info = fs::read_to_string(format!("/proc/self/fdinfo/{}", dir.as_raw_fd()))?;
    let mnt = info
        .lines()
        .find_map(|l| l.strip_prefix("mnt_id:"))
        .map(str::trim)
        .ok_or_else(|| io::Error::other("no mnt_id in fdinfo"))?;
    Ok(format!("{} {mnt}\n", boot.trim()))
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
        let u = Unsynced {
            dir,
            dir_fd,
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
            settling: Mutex::new(()),
            tick: std::env::var("STRATA_UPPER_SYNC_MS")
                .ok()
                .and_then(|v| v.parse().ok())
                .map_or(TICK, Duration::from_millis),
        };
        u.recover(restore)?;
        let u = Arc::new(u);
        let bg = u.clone();
        std::thread::Builder::new()
            .name("strata-upper-sync".into())
            .spawn(move || bg.run())?;
        Ok(u)
    }

    fn recover(&self, restore: impl Fn(&Path, &str) -> io::Result<()>) -> io::Result<()> {
        let now = mount_identity(&self.dir_fd)?;
        let marker = self.dir.join(MOUNT);
        let same_mount = fs::read_to_string(&marker).is_ok_and(|m| m == now);
        let mut records = Vec::new();
        for e in fs::read_dir(&self.dir)? {
            let e = e?;
            if e.file_name().as_bytes() != MOUNT.as_bytes() {
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
            self.dir_fd.sync_all()?;
        }
        if !same_mount {
            let tmp = self.dir.join(format!("{MOUNT}.tmp"));
            fs::write(&tmp, &now)?;
            fs::rename(&tmp, &marker)?;
        }
        Ok(())
    }

    /// Whether record `name` (from [`Self::open`]'s `restore`) is the file `md`.
    pub(super) fn names(name: &str, md: &fs::Metadata) -> bool {
        record_name(md) == name
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
        })
    }

    /// The recorded file was renamed into place: pending until the next sync.
    pub(super) fn added(&self, r: Record) {
        let mut st = self.state.lock();
        st.files.insert(r.ino, r.path);
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

    pub(super) fn any(&self) -> bool {
        !self.state.lock().files.is_empty()
    }

    /// fsync (or fdatasync) of an upper file: a pending copy-up's record goes with it.
    pub(super) fn sync_file(&self, f: &File, datasync: bool) -> io::Result<()> {
        let ino = f.metadata()?.ino();
        let Some(record) = self.state.lock().files.remove(&ino) else {
            return if datasync {
                f.sync_data()
            } else {
                f.sync_all()
            };
        };
        let r = (|| {
            f.sync_all()?;
            fs::remove_file(&record)?;
            self.dir_fd.sync_all()
        })();
        if r.is_err() && fs::symlink_metadata(&record).is_ok() {
            self.state.lock().files.insert(ino, record);
        }
        r
    }

    /// Syncs the upper's filesystem and drops the records of every copy-up made before.
    pub(super) fn settle(&self) -> io::Result<()> {
        let _one = self.settling.lock();
        let batch: Vec<u64> = self.state.lock().files.keys().copied().collect();
        if batch.is_empty() {
            return Ok(());
        }
        nix::unistd::syncfs(self.dir_fd.as_raw_fd())?;
        let done: Vec<PathBuf> = {
            let mut st = self.state.lock();
            batch.iter().filter_map(|i| st.files.remove(i)).collect()
        };
        for r in done {
            let _ = fs::remove_file(r);
        }
        Ok(())
    }

    fn run(&self) {
        loop {
            {
                let mut st = self.state.lock();
                if st.stop {
                    return;
                }
                if st.files.len() < BATCH {
                    self.wake.wait_for(&mut st, self.tick);
                }
                if st.stop {
                    return;
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
