//! Passthrough of upper files: a file that lives in the upper directory is handed to the kernel
//! as the FUSE file's backing file, so its reads, writes and mmaps go straight to the upper
//! filesystem (its page cache, its writeback) without a round trip to the daemon.
//!
//! The kernel registers backing files only for a daemon with `CAP_SYS_ADMIN` in the initial user
//! namespace, and negotiates passthrough only without the writeback cache: a view whose daemon
//! holds it (root) serves upper files by passthrough and has no writeback cache; any other (a
//! rootless one) keeps the writeback cache instead.
//!
//! The kernel also refuses to mix the two kinds of open on one inode (an open of the wrong kind
//! fails with EIO), and every passthrough open of an inode must name the same backing file.
//! So the daemon counts, per FUSE inode, its opens of each kind:
//! - a lower file (never written, or a metadata-only copy-up) opens through the page cache
//!   (`FOPEN_KEEP_CACHE`: its bytes never change), and so does an upper file while such an open
//!   of the same inode is live (its writes then go through the daemon, without a writeback
//!   cache: correct, and slower);
//! - an upper file otherwise opens by passthrough, its backing id registered at the inode's
//!   first passthrough open and closed when the last one is released.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use fuser::{
    BackingId, Errno, FileAttr, FileHandle, FopenFlags, Generation, ReplyCreate, ReplyOpen,
};
use parking_lot::Mutex;

/// How a reply hands out an open file: `ReplyOpen` and `ReplyCreate` alike.
pub(super) trait OpenReply {
    fn open_backing(&self, file: &File) -> io::Result<BackingId>;
    fn passthrough(self, fh: u64, id: &BackingId);
    fn cached(self, fh: u64, flags: FopenFlags);
    fn error(self, e: Errno);
}

impl OpenReply for ReplyOpen {
    fn open_backing(&self, file: &File) -> io::Result<BackingId> {
        ReplyOpen::open_backing(self, file)
    }
    fn passthrough(self, fh: u64, id: &BackingId) {
        self.opened_passthrough(FileHandle(fh), FopenFlags::empty(), id);
    }
    fn cached(self, fh: u64, flags: FopenFlags) {
        self.opened(FileHandle(fh), flags);
    }
    fn error(self, e: Errno) {
        ReplyOpen::error(self, e);
    }
}

/// A create's reply: the new entry's attributes go with the open.
pub(super) struct Created {
    pub reply: ReplyCreate,
    pub attr: FileAttr,
    pub ttl: std::time::Duration,
}

impl OpenReply for Created {
    fn open_backing(&self, file: &File) -> io::Result<BackingId> {
        self.reply.open_backing(file)
    }
    fn passthrough(self, fh: u64, id: &BackingId) {
        let (ttl, fh) = (self.ttl, FileHandle(fh));
        let flags = FopenFlags::empty();
        self.reply
            .created_passthrough(&ttl, &self.attr, Generation(0), fh, flags, id);
    }
    fn cached(self, fh: u64, flags: FopenFlags) {
        let (ttl, fh) = (self.ttl, FileHandle(fh));
        self.reply
            .created(&ttl, &self.attr, Generation(0), fh, flags);
    }
    fn error(self, e: Errno) {
        self.reply.error(e);
    }
}

/// One FUSE inode's live opens.
#[derive(Default)]
struct Opens {
    cached: u32,
    backed: Option<Backed>,
}

/// The backing file of an inode's passthrough opens.
struct Backed {
    id: BackingId,
    /// The upper file (a descriptor of its own), for questions about it (`backing_file`).
    upper: Arc<File>,
    /// The upper file's device and inode: every passthrough open must be of this file.
    file: (u64, u64),
    opens: u32,
}

#[derive(Default)]
struct Table {
    inodes: HashMap<u64, Opens>,
    /// Handle → its inode, and whether it is a passthrough open.
    handles: HashMap<u64, (u64, bool)>,
}

/// Which opens go by passthrough (see the module's documentation).
#[derive(Default)]
pub(super) struct IoModes {
    /// Negotiated at INIT (the writeback cache is off then).
    negotiated: AtomicBool,
    /// New backing files may be registered: turned off for good when the kernel refuses one.
    enabled: AtomicBool,
    table: Mutex<Table>,
}

impl IoModes {
    pub fn enable(&self) {
        self.negotiated.store(true, Ordering::Relaxed);
        self.enabled.store(true, Ordering::Relaxed);
    }

    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    /// Answers the open `fh` of inode `ino`: by passthrough of `upper` (the upper file the
    /// handle holds, `None` for a lower file) where the inode's other opens allow it, else
    /// through the page cache. False when it answered an error (the caller drops the handle).
    pub fn answer(&self, ino: u64, fh: u64, upper: Option<&File>, reply: impl OpenReply) -> bool {
        let mut t = self.table.lock();
        let t = &mut *t;
        let opens = t.inodes.entry(ino).or_default();
        // An inode with a backing file keeps it, even once new ones are refused.
        let direct = match upper {
            Some(f) if (self.enabled() || opens.backed.is_some()) && opens.cached == 0 => Some(f),
            _ => None,
        };
        let Some(file) = direct else {
            if opens.backed.is_some() {
                // Not expected: every passthrough open is of a complete upper file, and an
                // open of a name of it still in the lower gets that file (`open`); the kernel
                // would fail this one with EIO.
                tracing::warn!(
                    ino,
                    "an open through the page cache beside passthrough opens"
                );
                return refuse(t, ino, reply);
            }
            opens.cached += 1;
            t.handles.insert(fh, (ino, false));
            // An upper file's page cache is kept only while nothing else writes it: with
            // passthrough on, writes of other opens may have gone to the backing file.
            let flags = if upper.is_some() && self.negotiated.load(Ordering::Relaxed) {
                FopenFlags::empty()
            } else {
                FopenFlags::FOPEN_KEEP_CACHE
            };
            reply.cached(fh, flags);
            return true;
        };
        let identity = match file.metadata() {
            Ok(md) => (md.dev(), md.ino()),
            Err(e) => {
                reply.error(Errno::from_i32(e.raw_os_error().unwrap_or(libc::EIO)));
                return forget_if_idle(t, ino, false);
            }
        };
        if let Some(b) = &mut opens.backed {
            if b.file != identity {
                tracing::warn!(ino, "passthrough opens of two different upper files");
                return refuse(t, ino, reply);
            }
            b.opens += 1;
            t.handles.insert(fh, (ino, true));
            reply.passthrough(fh, &b.id);
            return true;
        }
        match (reply.open_backing(file), file.try_clone()) {
            (Ok(id), Ok(upper)) => {
                let b = opens.backed.insert(Backed {
                    id,
                    upper: Arc::new(upper),
                    file: identity,
                    opens: 1,
                });
                t.handles.insert(fh, (ino, true));
                reply.passthrough(fh, &b.id);
            }
            (Err(e), _) | (_, Err(e)) => {
                // A refusal that will not change (no passthrough on this connection, a backing
                // filesystem that cannot be stacked on) stops passthrough for this view; others
                // (out of memory or descriptors) only for this open.
                let lasting = [libc::EPERM, libc::EOPNOTSUPP, libc::ELOOP, libc::ENOTTY]
                    .contains(&e.raw_os_error().unwrap_or(0));
                tracing::warn!(ino, "the kernel refused a passthrough backing file: {e}");
                if lasting {
                    tracing::warn!("serving this view's files through the daemon from now on");
                    self.enabled.store(false, Ordering::Relaxed);
                }
                opens.cached += 1;
                t.handles.insert(fh, (ino, false));
                reply.cached(fh, FopenFlags::empty());
            }
        }
        true
    }

    /// The upper file inode `ino` is open by passthrough to, if it is.
    pub fn backing_file(&self, ino: u64) -> Option<Arc<File>> {
        let t = self.table.lock();
        t.inodes.get(&ino)?.backed.as_ref().map(|b| b.upper.clone())
    }

    /// The open `fh` is released: the inode's backing file is closed with its last
    /// passthrough open (the kernel keeps its own reference while it needs one).
    pub fn release(&self, fh: u64) {
        let mut t = self.table.lock();
        let t = &mut *t;
        let Some((ino, direct)) = t.handles.remove(&fh) else {
            return;
        };
        if let Some(opens) = t.inodes.get_mut(&ino) {
            if direct {
                if let Some(b) = &mut opens.backed {
                    b.opens = b.opens.saturating_sub(1);
                    if b.opens == 0 {
                        opens.backed = None;
                    }
                }
            } else {
                opens.cached = opens.cached.saturating_sub(1);
            }
        }
        forget_if_idle(t, ino, true);
    }
}

/// Replies EBUSY to an open the kernel would refuse.
fn refuse(t: &mut Table, ino: u64, reply: impl OpenReply) -> bool {
    reply.error(Errno::EBUSY);
    forget_if_idle(t, ino, false)
}

/// Drops `ino`'s entry once it has no open left; answers `answered`.
fn forget_if_idle(t: &mut Table, ino: u64, answered: bool) -> bool {
    if t.inodes
        .get(&ino)
        .is_some_and(|o| o.cached == 0 && o.backed.is_none())
    {
        t.inodes.remove(&ino);
    }
    answered
}
