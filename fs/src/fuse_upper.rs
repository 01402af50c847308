//! strata's own writable layer in FUSE: the merged view of a lower directory (a lazy strata
//! mount) and an upper directory in kernel overlayfs's on-disk form, for where kernel overlayfs
//! cannot be mounted (an unprivileged user, a sandbox that forbids overlay mounts).
//!
//! `strata mount --upper DIR --fuse-upper` (chosen by itself where kernel overlayfs cannot give
//! this form: an ordinary user, root of a rootless user namespace). Path-based: every path resolved
//! beneath its layer's root without following symlinks (`openat2(RESOLVE_BENEATH |
//! RESOLVE_NO_SYMLINKS)` for the parent, kept open a while, then the last name through
//! `/proc/self/fd`); copy-ups read the lower's small files and xattrs in-process when the lower
//! is the daemon's own lazy mount (`lower_files`, `lower_xattrs`); which
//! directories show lower children is remembered per path (cleared when directories move, go or
//! turn opaque), so a request probes its own name only. An inode is acted on only while its path
//! still resolves to it (else ESTALE: a name replaced since must never redirect a chmod or an open
//! to another file); lower errors other than ENOENT are errors, never "deleted"; one lock
//! serialises copy-ups and namespace changes. A root daemon hands upper files to the kernel by
//! FUSE passthrough (`direct`); any other runs with the kernel's writeback cache (the daemon drops
//! setuid/setgid and capabilities on unprivileged writes itself, `handle_killpriv_v2`). Names and
//! attributes are cached for a minute (every change goes through this daemon). `O_TMPFILE` makes
//! an unnamed file in `work/` that a link names in the upper layer (FUSE's TMPFILE request, parsed
//! by the workspace's copy of fuser: `vendor/fuser/STRATA.md`). It passes the semantics suite
//! (`tests/src/semantics.rs`). Not yet: `redirect_dir` (a renamed lower directory is copied up
//! whole), FORGET (the inode table grows with the names seen), copy-ups outside the lock,
//! whiteouts and directories built in `work/` then renamed (atomic against crashes), passthrough
//! for files never written (opens keep the page cache: `FOPEN_KEEP_CACHE`).
//!
//! Unprivileged (not root of the initial user namespace), the marks are `user.overlay.*`, and a
//! copy-up the daemon cannot chown (an ordinary user's) keeps the image's owner in
//! `user.strata.owner`, which the view shows as the owner.
//!
//! The upper directory's form is overlayfs's: a deleted lower entry is a whiteout (a 0/0 character
//! device, which kernels since 5.8 let anyone make; where refused, an empty file with
//! `user.overlay.whiteout`, its directory marked `user.overlay.opaque=x`), a directory hiding the
//! lower one carries `overlay.opaque=y`. Copy-up copies data (synced in batches: `unsynced`),
//! owner, mode, times and xattrs, through a temporary file in the work directory renamed into
//! place; a metadata change copies no data (`metacopy`: a sparse file of the lower's size marked
//! `overlay.metacopy`, read from the lower until its data is copied up on a write, truncate, link
//! or rename). Lower hard links are copied up once and linked through `work/index/INO` (overlayfs's
//! `index=on` idea), across remounts too. A lower directory renamed is copied up whole first (no
//! `redirect_dir`).

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{
    DirBuilderExt, FileExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt,
};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    KernelConfig, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow,
};
use parking_lot::Mutex;

mod direct;
mod unsynced;
use direct::{Created, IoModes, OpenReply};
pub use unsynced::settle_all;
use unsynced::Unsynced;

/// Writes of at least this size are a streaming writer's (see `write`).
const STREAM_WRITE: usize = 256 << 10;

/// How long the kernel may keep names and attributes: every change goes through this daemon
/// (the lower never changes), which answers each with fresh attributes.
const TTL: Duration = Duration::from_secs(60);

/// Which layer a path lives in.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum Layer {
    Upper,
    Lower,
}

/// A descriptor closed when dropped (nix hands out raw ones).
struct Fd(RawFd);

impl Drop for Fd {
    fn drop(&mut self) {
        let _ = nix::unistd::close(self.0);
    }
}

/// A path whose parent was resolved safely: `path` names the entry through `/proc/self/fd`.
struct At {
    _parent: Option<std::sync::Arc<Fd>>,
    path: PathBuf,
}

/// Parent directories resolved lately (`UpperFs::at`), by layer and path: most requests name
/// entries of the few directories a workload is busy in. Emptied whenever a directory is
/// removed, moved or replaced (`dirs_changed`); a descriptor opened across such a change is
/// not kept (the generation moved on).
#[derive(Default)]
struct Parents {
    generation: u64,
    /// A directory is being removed or moved: nothing is taken from or put in `fds` until
    /// the change is over (`dirs_changed`).
    changing: bool,
    fds: HashMap<(Layer, PathBuf), std::sync::Arc<Fd>>,
}

/// Parent directories kept at most (a directory tree walk must not pin every directory, nor
/// several views use up the daemon's descriptors).
const PARENTS_KEPT: usize = 256;

/// What a relative path is in the merged view.
#[derive(Clone)]
struct Found {
    /// Whether the upper entry is an opaque directory (it replaced the lower one).
    opaque: bool,
    upper: Option<fs::Metadata>,
    /// The lower entry, when the view's parents let it show (whatever the upper holds).
    lower: Option<fs::Metadata>,
}

impl Found {
    fn top(&self) -> Option<(&fs::Metadata, Layer)> {
        self.upper
            .as_ref()
            .map(|m| (m, Layer::Upper))
            .or(self.lower.as_ref().map(|m| (m, Layer::Lower)))
    }
}

/// Identity of a file: its lower inode (kept across copy-up) or its upper one.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum Key {
    Lower(u64),
    Upper(u64),
}

#[derive(Default)]
struct Inodes {
    next: u64,
    by_key: HashMap<Key, u64>,
    /// FUSE inode → its identity (what a path must still resolve to before it is acted on).
    keys: HashMap<u64, Key>,
    /// FUSE inode → a path it was last seen at.
    paths: HashMap<u64, PathBuf>,
    /// Upper inode → the lower inode it was copied up from.
    origin: HashMap<u64, u64>,
}

enum Handle {
    /// A file of the upper layer.
    File(File),
    /// A lower file opened for reading (never written; its attributes are not the view's: a
    /// metadata-only copy-up holds those).
    Lower(LowerRead),
    Dir(Listing),
}

/// A read-only open served by the lower file until the file's data is copied up: then by the
/// upper copy (as overlayfs's open files follow a copy-up), so reads through an open taken
/// before a write see that write.
struct LowerRead {
    /// The file reads go to, and the copy-up count it was current for.
    file: Mutex<(std::sync::Arc<File>, u64)>,
}

/// A directory's entries as listed at open: inode, kind, name and (where known) the
/// attributes READDIRPLUS answers with.
type Listing = Vec<(u64, FileType, OsString, Option<FileAttr>)>;

/// The merged writable view of `lower` (read-only) under `upper`.
pub struct UpperFs {
    upper_root: File,
    lower_root: File,
    work: PathBuf,
    /// `trusted.` as root, `user.` otherwise.
    ns: &'static str,
    inodes: Mutex<Inodes>,
    handles: Mutex<HashMap<u64, std::sync::Arc<Handle>>>,
    next_fh: AtomicU64,
    /// Serialises copy-ups and namespace changes (simple and correct first).
    big: Mutex<()>,
    /// Directories of the view seen lately: whether their children may come from the lower.
    dirs: Mutex<DirViews>,
    /// Parent directories opened lately.
    parents: Mutex<Parents>,
    /// Data copy-ups made: a read-only open of a lower file looks again when this moved.
    data_copies: AtomicU64,
    /// Data copy-ups not yet synced (`unsynced`: one filesystem sync a second for them all).
    unsynced: std::sync::Arc<Unsynced>,
    /// Which opens the kernel serves itself from the upper file (`direct`).
    io: IoModes,
    /// The lower's xattrs by path, known without asking it (the daemon's own lazy mount).
    lower_xattrs: Option<LowerXattrs>,
    /// The lower's small files by path, read without a trip through its mount (ditto).
    lower_files: Option<LowerFiles>,
    /// Files made by `open(O_TMPFILE)` that have no name yet, by FUSE inode: unnamed files in
    /// the work directory, kept while open (a link gives them a name in the upper layer).
    anon: Mutex<HashMap<u64, Anon>>,
}

/// Answers the extended attributes of the lower's entry at a path (`None`: not known).
pub type LowerXattrs = Box<dyn Fn(&Path) -> Option<Vec<(Vec<u8>, Vec<u8>)>> + Send + Sync>;

/// Answers the content of the lower's regular file at a path if it is at most the given size
/// (`None`: not known so; an error: the lower failed to read it).
pub type LowerFiles = Box<dyn Fn(&Path, u64) -> Option<Result<Vec<u8>, String>> + Send + Sync>;

/// Files up to this size are copied up from the lower's content read in-process (when the
/// lower is the daemon's own mount): larger ones stream through the lower's mount.
const IN_PROCESS_COPY: u64 = 4 << 20;

/// An unnamed file (`O_TMPFILE`) and how many opens of it are live.
struct Anon {
    file: std::sync::Arc<File>,
    opens: u32,
}

/// Which directories of the view show lower children, by path: a lookup resolves its parent
/// here instead of walking every component through both layers. Cleared whenever directories
/// are removed, moved or made opaque; an answer computed across such a change is not kept (the
/// generation moved on).
#[derive(Default)]
struct DirViews {
    generation: u64,
    lower_children: HashMap<PathBuf, bool>,
}

fn errno(e: &io::Error) -> Errno {
    Errno::from_i32(e.raw_os_error().unwrap_or(libc::EIO))
}

fn open_dir_path(p: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
        .open(p)
}

fn kind_of(t: fs::FileType) -> FileType {
    if t.is_dir() {
        FileType::Directory
    } else if t.is_symlink() {
        FileType::Symlink
    } else if t.is_char_device() {
        FileType::CharDevice
    } else if t.is_block_device() {
        FileType::BlockDevice
    } else if t.is_fifo() {
        FileType::NamedPipe
    } else if t.is_socket() {
        FileType::Socket
    } else {
        FileType::RegularFile
    }
}

fn time_of(sec: i64, nsec: i64) -> SystemTime {
    if sec >= 0 {
        UNIX_EPOCH + Duration::new(sec as u64, nsec as u32)
    } else {
        UNIX_EPOCH - Duration::from_secs(sec.unsigned_abs()) + Duration::from_nanos(nsec as u64)
    }
}

fn attr_of(ino: u64, md: &fs::Metadata) -> FileAttr {
    FileAttr {
        ino: INodeNo(ino),
        size: md.size(),
        blocks: md.blocks(),
        atime: time_of(md.atime(), md.atime_nsec()),
        mtime: time_of(md.mtime(), md.mtime_nsec()),
        ctime: time_of(md.ctime(), md.ctime_nsec()),
        crtime: time_of(md.ctime(), md.ctime_nsec()),
        kind: kind_of(md.file_type()),
        perm: (md.mode() & 0o7777) as u16,
        nlink: md.nlink() as u32,
        uid: md.uid(),
        gid: md.gid(),
        rdev: md.rdev() as u32,
        blksize: 4096,
        flags: 0,
    }
}

impl Drop for UpperFs {
    fn drop(&mut self) {
        self.unsynced.stop();
    }
}

impl UpperFs {
    /// The view of `lower` under `upper`, with `work` (on `upper`'s filesystem) for copy-ups.
    pub fn new(lower: &Path, upper: &Path, work: &Path) -> io::Result<Self> {
        // Copy-ups a killed daemon left half made (never renamed into the upper layer).
        if let Ok(entries) = fs::read_dir(work) {
            for e in entries.flatten() {
                let leftover = e.file_name().as_bytes().starts_with(b"copyup.")
                    && e.file_type().is_ok_and(|t| !t.is_dir());
                if leftover {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
        let upper_root = open_dir_path(upper)?;
        let lower_root = open_dir_path(lower)?;
        let ns = if privileged() { "trusted." } else { "user." };
        let unsynced = Unsynced::open(work, |rel, name| {
            restore_copy_up(&upper_root, &lower_root, ns, rel, name)
        })?;
        Ok(UpperFs {
            upper_root,
            lower_root,
            work: work.to_path_buf(),
            ns,
            inodes: Mutex::new(Inodes {
                next: 2,
                ..Inodes::default()
            }),
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            big: Mutex::new(()),
            dirs: Mutex::new(DirViews::default()),
            parents: Mutex::new(Parents::default()),
            data_copies: AtomicU64::new(0),
            unsynced,
            io: IoModes::default(),
            anon: Mutex::new(HashMap::new()),
            lower_xattrs: None,
            lower_files: None,
        })
    }

    /// Where the lower's xattrs can be had without a round trip through its mount (its tree,
    /// when the lower is this daemon's own lazy mount): copy-ups then list none through FUSE.
    pub fn lower_xattrs(&mut self, f: LowerXattrs) {
        self.lower_xattrs = Some(f);
    }

    /// Where the lower's small files can be read without a round trip through its mount.
    pub fn lower_files(&mut self, f: LowerFiles) {
        self.lower_files = Some(f);
    }

    fn root_fd(&self, layer: Layer) -> RawFd {
        match layer {
            Layer::Upper => self.upper_root.as_raw_fd(),
            Layer::Lower => self.lower_root.as_raw_fd(),
        }
    }

    /// `rel` in `layer`, its parent opened beneath the layer's root with no symlinks (or
    /// found among those opened lately).
    fn at(&self, layer: Layer, rel: &Path) -> io::Result<At> {
        let Some(parent) = rel.parent().filter(|p| !p.as_os_str().is_empty()) else {
            return beneath(self.root_fd(layer), rel);
        };
        let name = rel
            .file_name()
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        let generation = {
            let p = self.parents.lock();
            if p.changing {
                return beneath(self.root_fd(layer), rel);
            }
            if let Some(fd) = p.fds.get(&(layer, parent.to_path_buf())) {
                return Ok(At {
                    path: PathBuf::from(format!("/proc/self/fd/{}", fd.0)).join(name),
                    _parent: Some(fd.clone()),
                });
            }
            p.generation
        };
        let at = beneath(self.root_fd(layer), rel)?;
        if let Some(fd) = &at._parent {
            let mut p = self.parents.lock();
            if p.generation == generation && !p.changing {
                if p.fds.len() >= PARENTS_KEPT {
                    p.fds.clear();
                }
                p.fds.insert((layer, parent.to_path_buf()), fd.clone());
            }
        }
        Ok(at)
    }

    fn lstat(&self, layer: Layer, rel: &Path) -> io::Result<fs::Metadata> {
        fs::symlink_metadata(&self.at(layer, rel)?.path)
    }
}

/// `rel` beneath the directory `root`, its parent opened with no symlinks followed.
fn beneath(root: RawFd, rel: &Path) -> io::Result<At> {
    {
        let (Some(parent), Some(name)) = (rel.parent(), rel.file_name()) else {
            // `/.` makes even lstat and lgetxattr go through the magic link to the directory.
            return Ok(At {
                _parent: None,
                path: PathBuf::from(format!("/proc/self/fd/{root}/.")),
            });
        };
        let fd = if parent.as_os_str().is_empty() {
            None
        } else {
            use nix::fcntl::{OFlag, OpenHow, ResolveFlag};
            let how = OpenHow::new()
                .flags(OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
                .resolve(
                    ResolveFlag::RESOLVE_BENEATH
                        | ResolveFlag::RESOLVE_NO_SYMLINKS
                        | ResolveFlag::RESOLVE_NO_MAGICLINKS,
                );
            Some(std::sync::Arc::new(Fd(nix::fcntl::openat2(
                root, parent, how,
            )?)))
        };
        let dir = fd.as_ref().map_or(root, |f| f.0);
        Ok(At {
            path: PathBuf::from(format!("/proc/self/fd/{dir}")).join(name),
            _parent: fd,
        })
    }
}

impl UpperFs {
    /// `rel` in `layer`: `None` when absent, an error when it cannot be told (a lazy lower
    /// that fails must not make image files look deleted).
    fn probe(&self, layer: Layer, rel: &Path) -> io::Result<Option<fs::Metadata>> {
        match self.lstat(layer, rel) {
            Ok(m) => Ok(Some(m)),
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn xattr_name(&self, what: &str) -> String {
        format!("{}overlay.{what}", self.ns)
    }

    fn is_whiteout(&self, layer: Layer, rel: &Path, md: &fs::Metadata) -> bool {
        let t = md.file_type();
        if t.is_char_device() && md.rdev() == 0 {
            return true;
        }
        t.is_file()
            && md.size() == 0
            && self
                .at(layer, rel)
                .ok()
                .and_then(|a| {
                    xattr::get(&a.path, self.xattr_name("whiteout"))
                        .ok()
                        .flatten()
                })
                .is_some()
    }

    fn is_opaque(&self, rel: &Path) -> bool {
        self.at(Layer::Upper, rel)
            .ok()
            .and_then(|a| {
                xattr::get(&a.path, self.xattr_name("opaque"))
                    .ok()
                    .flatten()
            })
            .is_some_and(|v| v == b"y")
    }

    /// What `rel` is in the merged view (ENOENT when hidden or absent).
    fn find(&self, rel: &Path) -> io::Result<Found> {
        let (Some(parent), Some(_)) = (rel.parent(), rel.file_name()) else {
            return Ok(Found {
                opaque: false,
                upper: self.probe(Layer::Upper, Path::new(""))?,
                lower: self.probe(Layer::Lower, Path::new(""))?,
            });
        };
        let lower_visible = self.lower_children(parent)?;
        let upper = self.probe(Layer::Upper, rel)?;
        if let Some(u) = &upper {
            if self.is_whiteout(Layer::Upper, rel, u) {
                return Err(io::Error::from_raw_os_error(libc::ENOENT));
            }
        }
        let lower = if lower_visible {
            self.probe(Layer::Lower, rel)?
        } else {
            None
        };
        if upper.is_none() && lower.is_none() {
            return Err(io::Error::from_raw_os_error(libc::ENOENT));
        }
        let opaque = upper.as_ref().is_some_and(|u| u.is_dir()) && self.is_opaque(rel);
        Ok(Found {
            opaque,
            upper,
            lower,
        })
    }

    /// Whether directory `dir` of the view shows lower children (a directory in both layers,
    /// not opaque, under parents that show it); ENOTDIR when it is not a directory.
    fn lower_children(&self, dir: &Path) -> io::Result<bool> {
        let generation = {
            let d = self.dirs.lock();
            if let Some(&v) = d.lower_children.get(dir) {
                return Ok(v);
            }
            d.generation
        };
        let f = self.find(dir)?;
        if !f.top().is_some_and(|(m, _)| m.is_dir()) {
            return Err(io::Error::from_raw_os_error(libc::ENOTDIR));
        }
        let v = f.lower.as_ref().is_some_and(|m| m.is_dir()) && !(f.upper.is_some() && f.opaque);
        let mut d = self.dirs.lock();
        if d.generation == generation {
            d.lower_children.insert(dir.to_path_buf(), v);
        }
        Ok(v)
    }

    /// Directories were removed, moved or made opaque: what `lower_children` knew is void.
    fn dirs_changed(&self) {
        let mut d = self.dirs.lock();
        d.generation += 1;
        d.lower_children.clear();
        drop(d);
        let mut p = self.parents.lock();
        p.generation += 1;
        p.changing = false;
        p.fds.clear();
    }

    /// A directory is about to be removed or moved (under the namespace lock): kept parent
    /// descriptors go, and none are kept until `dirs_changed` (which the caller must reach).
    fn dirs_changing(&self) {
        let mut p = self.parents.lock();
        p.generation += 1;
        p.changing = true;
        p.fds.clear();
    }

    /// The identity of what `f` found.
    fn key_of(t: &mut Inodes, f: &Found) -> Key {
        match (&f.upper, &f.lower) {
            (Some(u), _) => match t.origin.get(&u.ino()) {
                Some(&l) => Key::Lower(l),
                None => match &f.lower {
                    // A directory in both: the lower's identity, kept if it moves.
                    Some(l) if u.is_dir() && l.is_dir() && !f.opaque => {
                        t.origin.insert(u.ino(), l.ino());
                        Key::Lower(l.ino())
                    }
                    _ => Key::Upper(u.ino()),
                },
            },
            (None, Some(l)) => Key::Lower(l.ino()),
            (None, None) => Key::Upper(0),
        }
    }

    /// The FUSE inode of `rel` (found as `f`), remembering the path.
    fn ino_for(&self, rel: &Path, f: &Found) -> u64 {
        if rel.as_os_str().is_empty() {
            return 1;
        }
        let mut t = self.inodes.lock();
        let key = Self::key_of(&mut t, f);
        let ino = match t.by_key.get(&key) {
            Some(&i) => i,
            None => {
                let i = t.next;
                t.next += 1;
                t.by_key.insert(key, i);
                t.keys.insert(i, key);
                i
            }
        };
        t.paths.insert(ino, rel.to_path_buf());
        ino
    }

    /// The path of `ino`, checked to still name that file (a name replaced by a rename or an
    /// unlink since is ESTALE: acting on it would act on another file). Answers what is there.
    fn checked(&self, ino: INodeNo) -> io::Result<(PathBuf, Found)> {
        let rel = self.rel_of(ino)?;
        let stale = || io::Error::from_raw_os_error(libc::ESTALE);
        let f = self.find(&rel).map_err(|_| stale())?;
        if ino.0 != 1 {
            let mut t = self.inodes.lock();
            let key = Self::key_of(&mut t, &f);
            if t.keys.get(&ino.0) != Some(&key) {
                return Err(stale());
            }
        }
        Ok((rel, f))
    }

    fn path_of(&self, ino: INodeNo) -> Result<PathBuf, Errno> {
        if ino.0 == 1 {
            return Ok(PathBuf::new());
        }
        self.inodes
            .lock()
            .paths
            .get(&ino.0)
            .cloned()
            .ok_or(Errno::ENOENT)
    }

    fn rel_of(&self, ino: INodeNo) -> io::Result<PathBuf> {
        self.path_of(ino)
            .map_err(|e| io::Error::from_raw_os_error(e.code()))
    }

    /// Creates `name` in `parent` with `make` (given the upper path, and whether a whiteout was
    /// there), gives it to the caller and replies with its entry.
    fn make(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        reply: ReplyEntry,
        make: impl FnOnce(&Path, bool) -> io::Result<()>,
    ) {
        let rel = match self.child(parent, name) {
            Ok(r) => r,
            Err(e) => return reply.error(e),
        };
        let r = (|| -> io::Result<()> {
            let _g = self.big.lock();
            let had_whiteout = self.prepare_create(&rel)?;
            let at = self.at(Layer::Upper, &rel)?;
            let made = make(&at.path, had_whiteout);
            if had_whiteout {
                // A directory made opaque over a deleted one: what lookups meanwhile learnt
                // of the name (the image's directory showing through) is void.
                self.dirs_changed();
            }
            made?;
            self.own(req, &rel, &at.path)
        })();
        match r {
            Ok(()) => self.entry(&rel, reply),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn child(&self, parent: INodeNo, name: &OsStr) -> Result<PathBuf, Errno> {
        if name.len() > 255 {
            return Err(Errno::ENAMETOOLONG);
        }
        Ok(self.path_of(parent)?.join(name))
    }

    fn attr(&self, rel: &Path) -> io::Result<FileAttr> {
        let f = self.find(rel)?;
        let ino = self.ino_for(rel, &f);
        let (md, _) = f
            .top()
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT))?;
        let mut a = self.view_attr(ino, md);
        // A metadata-only copy-up holds no blocks: its data's are the lower's (as overlayfs).
        if let (Some(u), Some(l)) = (&f.upper, &f.lower) {
            if u.is_file() && l.is_file() && self.is_metacopy(rel) {
                a.blocks = l.blocks();
            }
        }
        if f.upper.is_some() && self.ns == "user." {
            if let Some((uid, gid)) = self
                .at(Layer::Upper, rel)
                .ok()
                .and_then(|at| self.recorded_owner(&at.path, md))
            {
                (a.uid, a.gid) = (uid, gid);
            }
        }
        Ok(a)
    }

    /// The attributes the view shows for `md` as inode `ino` (for an upper entry, see also
    /// [`Self::recorded_owner`]).
    fn view_attr(&self, ino: u64, md: &fs::Metadata) -> FileAttr {
        let mut a = attr_of(ino, md);
        if md.is_dir() {
            a.nlink = 2;
        }
        a
    }

    /// The owner an unprivileged daemon could not give the upper entry at `path` (`md`): the
    /// image's, kept in `user.strata.owner` ("UID:GID") when a copy-up's chown was refused.
    fn recorded_owner(&self, path: &Path, md: &fs::Metadata) -> Option<(u32, u32)> {
        if self.ns != "user." || md.uid() != nix::unistd::geteuid().as_raw() {
            return None;
        }
        let v = xattr::get(path, OWNER_XATTR).ok().flatten()?;
        let (u, g) = std::str::from_utf8(&v).ok()?.split_once(':')?;
        Some((u.parse().ok()?, g.parse().ok()?))
    }

    /// Copies the attributes of `from` (metadata `md`) onto `to` (a path in the upper layer).
    /// Gives `to` the owner, mode, xattrs and times of `from` (`md`), which is the lower's
    /// entry at `lower` when that is given.
    fn copy_attrs(
        &self,
        from: &Path,
        md: &fs::Metadata,
        to: &Path,
        lower: Option<&Path>,
    ) -> io::Result<()> {
        let t = md.file_type();
        let (uid, gid) = self
            .recorded_owner(from, md)
            .unwrap_or((md.uid(), md.gid()));
        match nix::unistd::fchownat(
            None,
            to,
            Some(uid.into()),
            Some(gid.into()),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        ) {
            // An unprivileged daemon cannot give files away: the entry stays the user's and
            // the view shows the image's owner, recorded beside it (symlinks take no user
            // xattrs: theirs shows as the user's).
            Err(nix::errno::Errno::EPERM) if self.ns == "user." => {
                if !t.is_symlink() {
                    xattr::set(to, OWNER_XATTR, format!("{uid}:{gid}").as_bytes())?;
                }
            }
            r => r?,
        }
        if !t.is_symlink() {
            fs::set_permissions(to, fs::Permissions::from_mode(md.mode() & 0o7777))?;
        }
        let known = lower.and_then(|rel| self.lower_xattrs.as_ref()?(rel));
        if let Some(list) = known {
            // What a listing through the mount would copy: ACLs and LSM labels there are the
            // kernel's to answer (no `FUSE_POSIX_ACL`; the LSM's own label), not the image's.
            for (n, v) in list {
                let n = OsStr::from_bytes(&n);
                let b = n.as_bytes();
                let copied = b.starts_with(b"user.")
                    || b.starts_with(b"trusted.")
                    || b == b"security.capability";
                if copied && !is_overlay_name(n) {
                    let _ = xattr::set(to, n, &v);
                }
            }
        } else if let Ok(names) = xattr::list(from) {
            for n in names {
                if is_overlay_name(&n) {
                    continue;
                }
                if let Ok(Some(v)) = xattr::get(from, &n) {
                    let _ = xattr::set(to, &n, &v);
                }
            }
        }
        let a = nix::sys::time::TimeSpec::new(md.atime(), md.atime_nsec());
        let m = nix::sys::time::TimeSpec::new(md.mtime(), md.mtime_nsec());
        nix::sys::stat::utimensat(
            None,
            to,
            &a,
            &m,
            nix::sys::stat::UtimensatFlags::NoFollowSymlink,
        )?;
        Ok(())
    }

    fn temp_name(&self) -> PathBuf {
        let n = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.work.join(format!("copyup.{}.{n}", std::process::id()))
    }

    /// Makes sure `rel` exists in the upper layer (copying it up, with its parents); answers
    /// its metadata there.
    fn copy_up(&self, rel: &Path) -> io::Result<fs::Metadata> {
        // A directory already in the upper layer (the parents of most copy-ups): nothing to do.
        if let Some(u) = self.probe(Layer::Upper, rel)? {
            if u.is_dir() {
                return Ok(u);
            }
        }
        self.copy_up_found(rel, self.find(rel)?)
    }

    /// [`Self::copy_up`] of `rel`, found as `f` just now (under the namespace lock).
    fn copy_up_found(&self, rel: &Path, f: Found) -> io::Result<fs::Metadata> {
        if let Some(u) = f.upper {
            return match &f.lower {
                Some(l) if u.is_file() && l.is_file() && self.is_metacopy(rel) => {
                    self.copy_up_data(rel, &u)
                }
                _ => Ok(u),
            };
        }
        if let Some(parent) = rel.parent() {
            self.copy_up(parent)?;
        }
        let Some(md) = f.lower else {
            return Err(io::Error::from_raw_os_error(libc::ENOENT));
        };
        let src = self.at(Layer::Lower, rel)?;
        let dst = self.at(Layer::Upper, rel)?;
        let t = md.file_type();
        if t.is_dir() {
            fs::DirBuilder::new().mode(0o700).create(&dst.path)?;
            self.copy_attrs(&src.path, &md, &dst.path, Some(rel))?;
            let up = fs::symlink_metadata(&dst.path)?;
            self.inodes.lock().origin.insert(up.ino(), md.ino());
            return Ok(up);
        }
        // A lower file with other names copied up already: this name links to that copy,
        // kept in the index (`work/index/INO`, as overlayfs's `index=on`) even when every name
        // of it was removed since, so the names stay one file with one set of attributes.
        let indexed = self.work.join("index").join(md.ino().to_string());
        if t.is_file() && md.nlink() > 1 && fs::hard_link(&indexed, &dst.path).is_ok() {
            self.data_copies.fetch_add(1, Ordering::SeqCst);
            return fs::symlink_metadata(&dst.path);
        }
        let tmp = self.temp_name();
        let made = (|| -> io::Result<()> {
            if t.is_symlink() {
                std::os::unix::fs::symlink(fs::read_link(&src.path)?, &tmp)?;
            } else if t.is_file() {
                self.copy_lower_data(rel, &src.path, &tmp, md.size())?;
            } else {
                let kind = if t.is_char_device() {
                    nix::sys::stat::SFlag::S_IFCHR
                } else if t.is_block_device() {
                    nix::sys::stat::SFlag::S_IFBLK
                } else if t.is_fifo() {
                    nix::sys::stat::SFlag::S_IFIFO
                } else {
                    nix::sys::stat::SFlag::S_IFSOCK
                };
                nix::sys::stat::mknod(
                    &tmp,
                    kind,
                    nix::sys::stat::Mode::from_bits_truncate(0o600),
                    md.rdev(),
                )?;
            }
            self.copy_attrs(&src.path, &md, &tmp, Some(rel))?;
            self.rename_copy(&tmp, rel, &dst.path, t.is_file().then_some(md.nlink()))
        })();
        if let Err(e) = made {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        if t.is_file() {
            self.data_copies.fetch_add(1, Ordering::SeqCst);
        }
        if t.is_file() && md.nlink() > 1 {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(self.work.join("index"))?;
            fs::hard_link(&dst.path, &indexed)?;
        }
        let up = fs::symlink_metadata(&dst.path)?;
        self.inodes.lock().origin.insert(up.ino(), md.ino());
        Ok(up)
    }

    /// Renames the copy-up `tmp` into place at `dst` (`rel` in the view). A data copy (of a
    /// file of `nlink` names) is recorded first as not yet synced, or synced (see `unsynced`).
    fn rename_copy(
        &self,
        tmp: &Path,
        rel: &Path,
        dst: &Path,
        nlink: Option<u64>,
    ) -> io::Result<()> {
        let Some(nlink) = nlink else {
            return fs::rename(tmp, dst);
        };
        if !self.unsynced.records(nlink) {
            File::open(tmp)?.sync_all()?;
            return fs::rename(tmp, dst);
        }
        let record = self.unsynced.record(tmp, rel)?;
        match fs::rename(tmp, dst) {
            Ok(()) => {
                self.unsynced.added(record);
                Ok(())
            }
            Err(e) => {
                self.unsynced.dropped(record);
                Err(e)
            }
        }
    }

    /// The file a read-only open of a lower file reads now: the upper copy once the data was
    /// copied up (looked for only when a data copy-up happened since the last look).
    fn lower_read_file(&self, ino: INodeNo, l: &LowerRead) -> std::sync::Arc<File> {
        let now = self.data_copies.load(Ordering::SeqCst);
        let mut cur = l.file.lock();
        if cur.1 != now {
            cur.1 = now;
            let upper = (|| -> io::Result<Option<File>> {
                let _g = self.big.lock();
                let (rel, f) = self.checked(ino)?;
                let copied =
                    f.upper.as_ref().is_some_and(|u| u.is_file()) && !self.is_metacopy(&rel);
                if !copied {
                    return Ok(None);
                }
                let at = self.at(Layer::Upper, &rel)?;
                let file = OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
                    .open(&at.path)?;
                Ok(file.metadata()?.is_file().then_some(file))
            })();
            if let Ok(Some(file)) = upper {
                cur.0 = std::sync::Arc::new(file);
            }
        }
        cur.0.clone()
    }

    /// Whether the upper `rel` is a metadata-only copy-up (its data still the lower's).
    fn is_metacopy(&self, rel: &Path) -> bool {
        self.at(Layer::Upper, rel)
            .ok()
            .and_then(|a| {
                xattr::get(&a.path, self.xattr_name("metacopy"))
                    .ok()
                    .flatten()
            })
            .is_some()
    }

    /// Copies the metadata of lower `rel` up and no data (overlayfs's `metacopy=on`): a
    /// chmod, chown, utimens or xattr change of an image file reads none of it. The upper
    /// file is sparse, of the lower's size, marked `overlay.metacopy`; reads go to the lower
    /// until a write copies the data up ([`Self::copy_up`]). Hard-linked files are copied up
    /// whole (their names must stay one file).
    fn copy_up_meta(&self, rel: &Path) -> io::Result<()> {
        let f = self.find(rel)?;
        if f.upper.is_some() {
            return Ok(());
        }
        let Some(md) = f.lower else {
            return Err(io::Error::from_raw_os_error(libc::ENOENT));
        };
        if !md.is_file() || md.nlink() > 1 {
            return self.copy_up(rel).map(|_| ());
        }
        if let Some(parent) = rel.parent() {
            self.copy_up(parent)?;
        }
        let src = self.at(Layer::Lower, rel)?;
        let dst = self.at(Layer::Upper, rel)?;
        let tmp = self.temp_name();
        let made = (|| -> io::Result<()> {
            let to = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            to.set_len(md.size())?;
            xattr::set(&tmp, self.xattr_name("metacopy"), b"")?;
            self.copy_attrs(&src.path, &md, &tmp, Some(rel))?;
            // No data to sync (nor does kernel overlayfs sync a metacopy): on a journaling
            // filesystem the inode and its xattrs commit no later than the rename naming it.
            drop(to);
            fs::rename(&tmp, &dst.path)
        })();
        if let Err(e) = made {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        let up = fs::symlink_metadata(&dst.path)?;
        self.inodes.lock().origin.insert(up.ino(), md.ino());
        Ok(())
    }

    /// Completes the metadata-only copy-up `rel` (upper `up`) with the lower's data:
    /// a new upper file with the data and the upper's attributes replaces it in one rename.
    fn copy_up_data(&self, rel: &Path, up: &fs::Metadata) -> io::Result<fs::Metadata> {
        let src = self.at(Layer::Lower, rel)?;
        let dst = self.at(Layer::Upper, rel)?;
        let tmp = self.temp_name();
        let made = (|| -> io::Result<()> {
            self.copy_lower_data(rel, &src.path, &tmp, up.size())?;
            // The attributes and xattrs the metacopy holds now (its overlay marks left out).
            self.copy_attrs(&dst.path, up, &tmp, None)?;
            self.rename_copy(&tmp, rel, &dst.path, Some(up.nlink()))
        })();
        if let Err(e) = made {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        self.data_copies.fetch_add(1, Ordering::SeqCst);
        let new = fs::symlink_metadata(&dst.path)?;
        // The file keeps the identity it had: its origin's, or (a metacopy made before a
        // restart, whose origin was not known) its old upper inode's, moved to the new one.
        let mut t = self.inodes.lock();
        match t.origin.remove(&up.ino()) {
            Some(origin) => {
                t.origin.insert(new.ino(), origin);
            }
            None => {
                if let Some(i) = t.by_key.remove(&Key::Upper(up.ino())) {
                    t.by_key.insert(Key::Upper(new.ino()), i);
                    t.keys.insert(i, Key::Upper(new.ino()));
                }
            }
        }
        Ok(new)
    }

    /// Writes the data of lower file `rel` (at `src`, `size` bytes) into the new file `tmp`:
    /// read in-process when the lower can answer so (`lower_files`), else through its mount.
    fn copy_lower_data(&self, rel: &Path, src: &Path, tmp: &Path, size: u64) -> io::Result<()> {
        let known = self
            .lower_files
            .as_ref()
            .and_then(|f| f(rel, size.min(IN_PROCESS_COPY)));
        match known {
            Some(Ok(data)) if data.len() as u64 == size => {
                let mut to = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(tmp)?;
                io::Write::write_all(&mut to, &data)
            }
            Some(Err(e)) => {
                tracing::error!(path = %rel.display(), "cannot read the image's file: {e}");
                Err(io::Error::other(e))
            }
            _ => copy_data(src, tmp, size),
        }
    }

    /// Copies `rel` (a directory) and everything under it up.
    fn copy_up_tree(&self, rel: &Path) -> io::Result<()> {
        self.copy_up(rel)?;
        for (name, _) in self.list(rel)? {
            let c = rel.join(&name);
            let f = self.find(&c)?;
            if f.top().is_some_and(|(m, _)| m.is_dir()) {
                self.copy_up_tree(&c)?;
            } else {
                self.copy_up(&c)?;
            }
        }
        // Nothing of the lower shows through any more: it is all here, and synced (a record
        // of a copy under an opaque directory could not be restored from the lower).
        self.unsynced.settle()?;
        let at = self.at(Layer::Upper, rel)?;
        let r = xattr::set(&at.path, self.xattr_name("opaque"), b"y");
        self.dirs_changed();
        r
    }

    /// The merged entries of directory `rel` (name, kind), whiteouts hidden.
    fn list(&self, rel: &Path) -> io::Result<Vec<(OsString, FileType)>> {
        let f = self.find(rel)?;
        let mut out: Vec<(OsString, FileType)> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        if f.upper.as_ref().is_some_and(|m| m.is_dir()) {
            for (name, md) in dir_entries(&self.at(Layer::Upper, rel)?.path)? {
                seen.insert(name.clone());
                if self.is_whiteout(Layer::Upper, &rel.join(&name), &md) {
                    continue;
                }
                out.push((name, kind_of(md.file_type())));
            }
        }
        let lower_shows = f.lower.as_ref().is_some_and(|m| m.is_dir())
            && !(f.upper.is_some() && self.is_opaque(rel));
        if lower_shows {
            for (name, md) in dir_entries(&self.at(Layer::Lower, rel)?.path)? {
                if !seen.contains(&name) {
                    out.push((name, kind_of(md.file_type())));
                }
            }
        }
        Ok(out)
    }

    /// Puts a whiteout for `rel` in the upper layer (its parent there already).
    fn whiteout(&self, rel: &Path) -> io::Result<()> {
        let at = self.at(Layer::Upper, rel)?;
        match nix::sys::stat::mknod(
            &at.path,
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::empty(),
            0,
        ) {
            Ok(()) => Ok(()),
            Err(nix::errno::Errno::EPERM) => {
                // Unprivileged: overlayfs's xwhiteout form.
                File::create(&at.path)?;
                xattr::set(&at.path, self.xattr_name("whiteout"), b"y")?;
                if let Some(p) = rel.parent() {
                    let pat = self.at(Layer::Upper, p)?;
                    if xattr::get(&pat.path, self.xattr_name("opaque"))?.is_none() {
                        xattr::set(&pat.path, self.xattr_name("opaque"), b"x")?;
                    }
                }
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Prepares the upper layer for creating `rel`: its parent copied up, a whiteout there
    /// removed (answers whether there was one: the new directory must then hide the lower).
    fn prepare_create(&self, rel: &Path) -> io::Result<bool> {
        match self.find(rel) {
            Ok(_) => return Err(io::Error::from_raw_os_error(libc::EEXIST)),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(e),
        }
        if let Some(p) = rel.parent() {
            let pm = self.copy_up(p)?;
            if !pm.is_dir() {
                return Err(io::Error::from_raw_os_error(libc::ENOTDIR));
            }
        }
        let at = self.at(Layer::Upper, rel)?;
        match fs::symlink_metadata(&at.path) {
            Ok(_) => {
                fs::remove_file(&at.path)?;
                Ok(true)
            }
            Err(_) => Ok(false),
        }
    }

    /// Gives `path` (just created) to the caller, as the kernel's own filesystems do.
    fn own(&self, req: &Request, rel: &Path, path: &Path) -> io::Result<()> {
        let mut gid = req.gid();
        if let Some(p) = rel.parent() {
            if let Ok(pm) = self.lstat(Layer::Upper, p) {
                if pm.mode() & libc::S_ISGID != 0 {
                    gid = pm.gid();
                }
            }
        }
        nix::unistd::fchownat(
            None,
            path,
            Some(req.uid().into()),
            Some(gid.into()),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )?;
        Ok(())
    }

    fn entry(&self, rel: &Path, reply: ReplyEntry) {
        match self.attr(rel) {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    /// Replies to a create (or tmpfile) with the new file's entry and an open of it; answers
    /// the inode when it made it but could not give the open out.
    fn created(&self, r: io::Result<(File, u64, FileAttr)>, reply: ReplyCreate) -> Option<u64> {
        match r {
            Ok((f, ino, attr)) => {
                let created = Created {
                    reply,
                    attr,
                    ttl: TTL,
                };
                let given = self.opened(INodeNo(ino), Ok(Handle::File(f)), created);
                (!given).then_some(ino)
            }
            Err(e) => {
                reply.error(errno(&e));
                None
            }
        }
    }

    /// The unnamed (`O_TMPFILE`) file that is inode `ino`, if it is one.
    fn anon_file(&self, ino: u64) -> Option<std::sync::Arc<File>> {
        self.anon.lock().get(&ino).map(|a| a.file.clone())
    }

    /// An open of the unnamed file `ino` that was not given out (or is released): the file
    /// goes with its last.
    fn anon_closed(&self, ino: u64) {
        let mut anon = self.anon.lock();
        if let Some(a) = anon.get_mut(&ino) {
            a.opens = a.opens.saturating_sub(1);
            if a.opens == 0 {
                anon.remove(&ino);
            }
        }
    }

    /// Replies to an open of `ino` with a new handle for `h`, or the error; answers whether
    /// the handle was given out.
    fn opened(&self, ino: INodeNo, h: io::Result<Handle>, reply: impl OpenReply) -> bool {
        let h = match h {
            Ok(h) => std::sync::Arc::new(h),
            Err(e) => {
                reply.error(errno(&e));
                return false;
            }
        };
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles.lock().insert(fh, h.clone());
        // Every change of a file's data passes through this mount (the upper directory is the
        // view's own, the lower never changes, a copy-up copies the same bytes): the kernel's
        // page cache of a file stays valid across opens, so a file read again — a library, a
        // script — is not read through the daemon again. Upper files go by passthrough where
        // the kernel allows it (`direct`).
        let upper = match &*h {
            Handle::File(f) => Some(f),
            Handle::Lower(_) => None,
            Handle::Dir(_) => {
                reply.cached(fh, FopenFlags::FOPEN_KEEP_CACHE);
                return true;
            }
        };
        let answered = self.io.answer(ino.0, fh, upper, reply);
        if !answered {
            self.handles.lock().remove(&fh);
        }
        answered
    }

    fn file(&self, fh: FileHandle) -> Result<std::sync::Arc<Handle>, Errno> {
        self.handles.lock().get(&fh.0).cloned().ok_or(Errno::EBADF)
    }

    /// An upper file's last name is gone: its inode number may come back for another file,
    /// which must not inherit its identity.
    fn forget_upper(&self, md: &fs::Metadata) {
        if md.is_dir() || md.nlink() <= 1 {
            self.inodes.lock().origin.remove(&md.ino());
        }
    }

    /// Moves the remembered paths under `from` to `to`.
    fn renamed(&self, from: &Path, to: &Path) {
        let mut t = self.inodes.lock();
        let t = &mut *t;
        for p in t.paths.values_mut() {
            if let Ok(rest) = p.strip_prefix(from) {
                *p = to.join(rest);
            }
        }
    }

    fn do_rmdir(&self, rel: &Path) -> io::Result<()> {
        let f = self.find(rel)?;
        let (md, _) = f
            .top()
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT))?;
        if !md.is_dir() {
            return Err(io::Error::from_raw_os_error(libc::ENOTDIR));
        }
        if !self.list(rel)?.is_empty() {
            return Err(io::Error::from_raw_os_error(libc::ENOTEMPTY));
        }
        if let Some(p) = rel.parent() {
            self.copy_up(p)?;
        }
        if f.upper.is_some() {
            self.dirs_changing();
            let at = self.at(Layer::Upper, rel)?;
            // Only whiteouts are left in it.
            for e in fs::read_dir(&at.path)? {
                fs::remove_file(e?.path())?;
            }
            fs::remove_dir(&at.path)?;
            if let Some(u) = &f.upper {
                self.forget_upper(u);
            }
        }
        if f.lower.is_some() {
            self.whiteout(rel)?;
        }
        Ok(())
    }

    fn do_unlink(&self, rel: &Path) -> io::Result<()> {
        let f = self.find(rel)?;
        let (md, _) = f
            .top()
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT))?;
        if md.is_dir() {
            return Err(io::Error::from_raw_os_error(libc::EISDIR));
        }
        if let Some(p) = rel.parent() {
            self.copy_up(p)?;
        }
        if let Some(u) = &f.upper {
            fs::remove_file(&self.at(Layer::Upper, rel)?.path)?;
            self.forget_upper(u);
        }
        if f.lower.is_some() {
            self.whiteout(rel)?;
        }
        Ok(())
    }

    /// Renames `from` to `to` in the view; answers whether a directory moved (what
    /// `lower_children` knew may then be void).
    fn do_rename(&self, from: &Path, to: &Path, flags: RenameFlags) -> io::Result<bool> {
        if flags.contains(RenameFlags::RENAME_EXCHANGE)
            || flags.contains(RenameFlags::RENAME_WHITEOUT)
        {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let src = self.find(from)?;
        let (smd, _) = src
            .top()
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT))?;
        let src_dir = smd.is_dir();
        if src_dir && to.starts_with(from) && to != from {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        // The target is an ancestor of the source: not empty, whatever its kind (as the VFS).
        if from.starts_with(to) && to != from {
            return Err(io::Error::from_raw_os_error(libc::ENOTEMPTY));
        }
        let dst = match self.find(to) {
            Ok(d) => Some(d),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => None,
            Err(e) => return Err(e),
        };
        if from == to {
            return Ok(false);
        }
        if let Some(d) = &dst {
            if flags.contains(RenameFlags::RENAME_NOREPLACE) {
                return Err(io::Error::from_raw_os_error(libc::EEXIST));
            }
            let dmd = d.top().map(|(m, _)| m.is_dir()).unwrap_or(false);
            if dmd && !src_dir {
                return Err(io::Error::from_raw_os_error(libc::EISDIR));
            }
            if !dmd && src_dir {
                return Err(io::Error::from_raw_os_error(libc::ENOTDIR));
            }
            if dmd && !self.list(to)?.is_empty() {
                return Err(io::Error::from_raw_os_error(libc::ENOTEMPTY));
            }
        }
        // A directory with lower contents moves whole (no redirect_dir): copied up first.
        if src_dir && src.lower.is_some() {
            self.copy_up_tree(from)?;
        } else {
            self.copy_up(from)?;
        }
        if let Some(p) = to.parent() {
            self.copy_up(p)?;
        }
        // Records of unsynced copy-ups name paths: none may move (see `unsynced`). Synced
        // before anything is removed, so a failed sync changes nothing.
        let moves_pending = if src_dir {
            self.unsynced.pending_under(from)
        } else {
            self.unsynced.pending(self.lstat(Layer::Upper, from)?.ino())
        };
        if moves_pending {
            self.unsynced.settle()?;
        }
        // From here directories go or move (after `copy_up_tree`, which ends a change of its
        // own): no parent descriptor is kept until the caller's `dirs_changed`.
        if src_dir {
            self.dirs_changing();
        }
        let dst_at = self.at(Layer::Upper, to)?;
        // A deleted image name (a whiteout in the upper layer): the rename replaces it, and a
        // directory put there must hide the image's.
        let over_whiteout = dst.is_none() && fs::symlink_metadata(&dst_at.path).is_ok();
        if over_whiteout {
            fs::remove_file(&dst_at.path)?;
        }
        // An empty target directory in the upper layer: its whiteouts go first.
        if dst
            .as_ref()
            .is_some_and(|d| d.upper.as_ref().is_some_and(|m| m.is_dir()))
        {
            for e in fs::read_dir(&dst_at.path)? {
                fs::remove_file(e?.path())?;
            }
        }
        let src_at = self.at(Layer::Upper, from)?;
        fs::rename(&src_at.path, &dst_at.path)?;
        // A directory over something of the lower: it must hide the lower one.
        if src_dir && (over_whiteout || dst.as_ref().is_some_and(|d| d.lower.is_some())) {
            xattr::set(&dst_at.path, self.xattr_name("opaque"), b"y")?;
        }
        if src.lower.is_some() {
            self.whiteout(from)?;
        }
        self.renamed(from, to);
        Ok(src_dir)
    }
}

/// The entries of the directory at `path` (never through a symlink there), with their metadata.
fn dir_entries(path: &Path) -> io::Result<Vec<(OsString, fs::Metadata)>> {
    let dir = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(path)?;
    let at = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd()));
    let mut out = Vec::new();
    for e in fs::read_dir(&at)? {
        let e = e?;
        let md = fs::symlink_metadata(e.path())?;
        out.push((e.file_name(), md));
    }
    drop(dir);
    Ok(out)
}

/// Placeholder attributes of a directory (for `.` and `..` in READDIRPLUS, which the kernel
/// reads the kind of and links nothing for).
fn attr_of_dir() -> FileAttr {
    FileAttr {
        ino: INodeNo(1),
        size: 0,
        blocks: 0,
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind: FileType::Directory,
        perm: 0o755,
        nlink: 2,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

/// A setattr time as utimensat takes it (absent: left alone).
fn timespec(t: Option<TimeOrNow>) -> nix::sys::time::TimeSpec {
    match t {
        None => nix::sys::time::TimeSpec::new(0, libc::UTIME_OMIT),
        Some(TimeOrNow::Now) => nix::sys::time::TimeSpec::new(0, libc::UTIME_NOW),
        Some(TimeOrNow::SpecificTime(t)) => {
            let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
            nix::sys::time::TimeSpec::new(d.as_secs() as i64, d.subsec_nanos() as i64)
        }
    }
}

/// Drops what a write by an unprivileged process must drop (the daemon writes as root, whose
/// writes keep them): setuid, setgid on a group-executable file, file capabilities.
fn kill_privs(f: &File) -> io::Result<()> {
    use xattr::FileExt as _;
    let mode = f.metadata()?.mode();
    let mut kill = libc::S_ISUID;
    if mode & libc::S_IXGRP != 0 {
        kill |= libc::S_ISGID;
    }
    if mode & kill != 0 {
        f.set_permissions(fs::Permissions::from_mode(mode & 0o7777 & !kill))?;
    }
    match f.remove_xattr("security.capability") {
        Err(e) if !matches!(e.raw_os_error(), Some(libc::ENODATA | libc::ENOTSUP)) => Err(e),
        _ => Ok(()),
    }
}

/// Copies the first `len` bytes of the file at `from` (never through a symlink) into a new
/// file `to` (0600), holes kept; not synced (the caller records it as `unsynced`).
fn copy_data(from: &Path, to: &Path, len: u64) -> io::Result<()> {
    let mut src = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(from)?;
    let mut dst = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(to)?;
    copy_sparse(&mut src, &mut dst, len)
}

/// After a crash, makes the upper file `rel` (if it is still the file record `name` was made
/// for) a metadata-only copy-up again: its data the lower's (read lazily, when read), its
/// owner, mode, times and xattrs kept. A copy-up the crash may have cut short then reads as
/// the image's file, a state it had.
fn restore_copy_up(upper: &File, lower: &File, ns: &str, rel: &Path, name: &str) -> io::Result<()> {
    let gone = |e: &io::Error| {
        matches!(
            e.raw_os_error(),
            Some(libc::ENOENT | libc::ENOTDIR | libc::ELOOP)
        )
    };
    if rel.is_absolute()
        || rel
            .components()
            .any(|c| !matches!(c, std::path::Component::Normal(_)))
    {
        return Ok(());
    }
    let up = match beneath(upper.as_raw_fd(), rel) {
        Err(e) if gone(&e) => return Ok(()),
        r => r?,
    };
    let md = match fs::symlink_metadata(&up.path) {
        Err(e) if gone(&e) => return Ok(()),
        r => r?,
    };
    if !md.is_file() || !Unsynced::names(name, &md) {
        return Ok(());
    }
    let low = match beneath(lower.as_raw_fd(), rel).and_then(|a| fs::symlink_metadata(&a.path)) {
        Err(e) if gone(&e) => return Ok(()),
        r => r?,
    };
    if !low.is_file() {
        return Ok(());
    }
    // Truncating drops file capabilities (and, unprivileged, setuid bits): put back after.
    let mut kept = Vec::new();
    for n in xattr::list(&up.path)? {
        if let Some(v) = xattr::get(&up.path, &n)? {
            kept.push((n, v));
        }
    }
    let open = || {
        OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&up.path)
    };
    let f = match open() {
        // A read-only file of an unprivileged daemon (its own): writable for the moment.
        Err(e) if e.raw_os_error() == Some(libc::EACCES) => {
            fs::set_permissions(&up.path, fs::Permissions::from_mode(0o600))?;
            open()?
        }
        r => r?,
    };
    let mode = fs::Permissions::from_mode(md.mode() & 0o7777);
    let made = (|| -> io::Result<()> {
        if !f.metadata()?.is_file() || f.metadata()?.ino() != md.ino() {
            return Ok(());
        }
        f.set_len(0)?;
        f.set_len(low.size())?;
        for (n, v) in &kept {
            xattr::set(&up.path, n, v)?;
        }
        xattr::set(&up.path, format!("{ns}overlay.metacopy"), b"")?;
        f.set_permissions(mode.clone())?;
        let a = nix::sys::time::TimeSpec::new(md.atime(), md.atime_nsec());
        let m = nix::sys::time::TimeSpec::new(md.mtime(), md.mtime_nsec());
        nix::sys::stat::futimens(f.as_raw_fd(), &a, &m)?;
        f.sync_all()
    })();
    // Whatever failed, the file keeps its mode (the next mount tries again).
    if made.is_err() {
        let _ = f.set_permissions(mode);
    }
    made
}

/// Copies `len` bytes, leaving holes where the source has them.
fn copy_sparse(from: &mut File, to: &mut File, len: u64) -> io::Result<()> {
    // Sized for the file (most are small: a zeroed megabyte each showed in profiles).
    let mut buf = vec![0u8; len.clamp(4096, 1 << 20) as usize];
    let (mut at, mut end) = (0u64, 0u64);
    while at < len {
        let n = from.read(&mut buf)?;
        if n == 0 {
            break;
        }
        if buf[..n].iter().any(|&b| b != 0) {
            to.write_all_at(&buf[..n], at)?;
            end = at + n as u64;
        }
        at += n as u64;
    }
    // Only where a hole ends the file or the source ran longer (a truncate of the same size
    // is not free: ext4 then flushes the data at its next commit).
    if end != len {
        to.set_len(len)?;
    }
    Ok(())
}

/// Whether the process behind `req` keeps setuid/setgid bits when it truncates a file: root
/// with CAP_FSETID (a container's root may have dropped it). A process this daemon cannot see
/// (another pid namespace) is judged by its uid alone.
fn may_keep_privs(req: &Request) -> bool {
    const CAP_FSETID: u32 = 4;
    if req.uid() != 0 {
        return false;
    }
    effective_caps(&format!("/proc/{}/status", req.pid()))
        .is_none_or(|caps| caps & (1 << CAP_FSETID) != 0)
}

/// The effective capability set in a `/proc/PID/status` file (`None`: unreadable).
fn effective_caps(status: &str) -> Option<u64> {
    fs::read_to_string(status)
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|h| u64::from_str_radix(h.trim(), 16).ok())
}

fn reply_empty(r: io::Result<()>, reply: ReplyEmpty) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(errno(&e)),
    }
}

impl Filesystem for UpperFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        let _ = config.set_max_write(1 << 20);
        let offered = config.capabilities();
        let passthrough = privileged()
            && has_cap_sys_admin()
            && offered.contains(fuser::InitFlags::FUSE_PASSTHROUGH)
            && std::env::var_os("STRATA_UPPER_PASSTHROUGH").is_none_or(|v| v != "0")
            && config
                .add_capabilities(fuser::InitFlags::FUSE_PASSTHROUGH)
                .is_ok()
            // Backing files are the upper filesystem's: one level of stacking.
            && config.set_max_stack_depth(1).is_ok();
        if passthrough {
            // Upper files are read and written by the kernel itself (`direct`); the kernel
            // refuses passthrough beside the writeback cache. Writes through the daemon (the
            // rare open beside a lower one) leave setuid/setgid to the kernel, which asks the
            // daemon to clear them with a SETATTR.
            self.io.enable();
        } else {
            // Writes land in the page cache and reach the daemon in large batches; the kernel
            // keeps sizes and times meanwhile (and may read a file opened write-only to fill a
            // page: write opens are read-write below).
            let _ = config.add_capabilities(fuser::InitFlags::FUSE_WRITEBACK_CACHE);
            // The daemon clears setuid/setgid bits and file capabilities on writes itself (see
            // `kill_privs`): the kernel then stops asking for `security.capability` before
            // every write and chown.
            let _ = config.add_capabilities(fuser::InitFlags::FUSE_HANDLE_KILLPRIV_V2);
        }
        // Directory listings carry attributes (no LOOKUP per entry after a readdir).
        let _ = config.add_capabilities(fuser::InitFlags::FUSE_DO_READDIRPLUS);
        // O_TRUNC arrives with the open (not as a separate SETATTR after it).
        let _ = config.add_capabilities(fuser::InitFlags::FUSE_ATOMIC_O_TRUNC);
        Ok(())
    }

    fn destroy(&mut self) {
        self.unsynced.stop();
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.child(parent, name) {
            Ok(rel) => self.entry(&rel, reply),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        if let Some(fh) = fh {
            if let Ok(h) = self.file(fh) {
                // Only an upper handle describes the view's file (a lower one lacks what a
                // metadata-only copy-up changed).
                if let Handle::File(f) = &*h {
                    if let Ok(md) = f.metadata() {
                        let mut a = attr_of(ino.0, &md);
                        let fd = PathBuf::from(format!("/proc/self/fd/{}", f.as_raw_fd()));
                        if let Some((uid, gid)) = self.recorded_owner(&fd, &md) {
                            (a.uid, a.gid) = (uid, gid);
                        }
                        return reply.attr(&TTL, &a);
                    }
                }
            }
        }
        if let Some(f) = self.anon_file(ino.0) {
            return match f.metadata() {
                Ok(md) => reply.attr(&TTL, &self.view_attr(ino.0, &md)),
                Err(e) => reply.error(errno(&e)),
            };
        }
        match self.rel_of(ino).and_then(|p| self.attr(&p)) {
            Ok(a) => reply.attr(&TTL, &FileAttr { ino, ..a }),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        // Sizes and times through an open upper handle (the writeback cache sends them on
        // close and fsync, also for a file unlinked or replaced since): the handle is the file.
        if let (Some(h), None, None, None) = (fh.and_then(|f| self.file(f).ok()), mode, uid, gid) {
            if let Handle::File(f) = &*h {
                let r = (|| -> io::Result<fs::Metadata> {
                    if let Some(s) = size {
                        if !may_keep_privs(req) {
                            kill_privs(f)?;
                        }
                        f.set_len(s)?;
                    }
                    if atime.is_some() || mtime.is_some() {
                        nix::sys::stat::futimens(
                            f.as_raw_fd(),
                            &timespec(atime),
                            &timespec(mtime),
                        )?;
                    }
                    f.metadata()
                })();
                return match r {
                    Ok(md) => reply.attr(&TTL, &self.view_attr(ino.0, &md)),
                    Err(e) => reply.error(errno(&e)),
                };
            }
        }
        if let Some(f) = self.anon_file(ino.0) {
            let r = (|| -> io::Result<fs::Metadata> {
                if let Some(m) = mode {
                    f.set_permissions(fs::Permissions::from_mode(m & 0o7777))?;
                }
                if uid.is_some() || gid.is_some() {
                    nix::unistd::fchown(f.as_raw_fd(), uid.map(Into::into), gid.map(Into::into))?;
                }
                if let Some(s) = size {
                    if !may_keep_privs(req) {
                        kill_privs(&f)?;
                    }
                    f.set_len(s)?;
                }
                if atime.is_some() || mtime.is_some() {
                    nix::sys::stat::futimens(f.as_raw_fd(), &timespec(atime), &timespec(mtime))?;
                }
                f.metadata()
            })();
            return match r {
                Ok(md) => reply.attr(&TTL, &self.view_attr(ino.0, &md)),
                Err(e) => reply.error(errno(&e)),
            };
        }
        let r = (|| -> io::Result<FileAttr> {
            // The check and every action under the namespace lock, on the checked path.
            let _g = self.big.lock();
            let (rel, f) = self.checked(ino)?;
            let is_link = f.top().is_some_and(|(m, _)| m.file_type().is_symlink());
            // A size change needs the data; metadata changes copy none.
            if size.is_some() {
                self.copy_up(&rel)?;
            } else if f.upper.is_none() {
                self.copy_up_meta(&rel)?;
            }
            let at = self.at(Layer::Upper, &rel)?;
            if let Some(m) = mode {
                if is_link {
                    return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
                }
                nix::sys::stat::fchmodat(
                    None,
                    &at.path,
                    nix::sys::stat::Mode::from_bits_truncate(m & 0o7777),
                    nix::sys::stat::FchmodatFlags::FollowSymlink,
                )?;
            }
            if uid.is_some() || gid.is_some() {
                nix::unistd::fchownat(
                    None,
                    &at.path,
                    uid.map(Into::into),
                    gid.map(Into::into),
                    nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
                )?;
            }
            if let Some(s) = size {
                // A truncate by anyone without CAP_FSETID drops setuid/setgid, as the
                // kernel's own filesystems do (the daemon truncates as root).
                let kill = !may_keep_privs(req);
                match fh.map(|f| self.file(f)) {
                    Some(Ok(h)) => match &*h {
                        Handle::File(f) => {
                            if kill {
                                kill_privs(f)?;
                            }
                            f.set_len(s)?
                        }
                        Handle::Dir(_) => return Err(io::Error::from_raw_os_error(libc::EISDIR)),
                        Handle::Lower(_) => return Err(io::Error::from_raw_os_error(libc::EBADF)),
                    },
                    _ => {
                        let f = OpenOptions::new()
                            .write(true)
                            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
                            .open(&at.path)?;
                        if !f.metadata()?.is_file() {
                            return Err(io::Error::from_raw_os_error(libc::EINVAL));
                        }
                        if kill {
                            kill_privs(&f)?;
                        }
                        f.set_len(s)?
                    }
                }
            }
            if atime.is_some() || mtime.is_some() {
                nix::sys::stat::utimensat(
                    None,
                    &at.path,
                    &timespec(atime),
                    &timespec(mtime),
                    nix::sys::stat::UtimensatFlags::NoFollowSymlink,
                )?;
            }
            // What is there now, still under the lock.
            let md = fs::symlink_metadata(&at.path)?;
            let mut a = self.view_attr(ino.0, &md);
            if md.is_file() && self.is_metacopy(&rel) {
                if let Ok(l) = self.lstat(Layer::Lower, &rel) {
                    a.blocks = l.blocks();
                }
            }
            if let Some((uid, gid)) = self.recorded_owner(&at.path, &md) {
                (a.uid, a.gid) = (uid, gid);
            }
            Ok(a)
        })();
        match r {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let r = self.checked(ino).and_then(|(rel, f)| {
            let layer = if f.upper.is_some() {
                Layer::Upper
            } else {
                Layer::Lower
            };
            fs::read_link(&self.at(layer, &rel)?.path)
        });
        match r {
            Ok(t) => reply.data(t.as_os_str().as_bytes()),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        self.make(req, parent, name, reply, |path, _| {
            let kind = nix::sys::stat::SFlag::from_bits_truncate(mode & libc::S_IFMT);
            nix::sys::stat::mknod(
                path,
                kind,
                nix::sys::stat::Mode::from_bits_truncate(mode & !umask & 0o7777),
                u64::from(rdev),
            )?;
            Ok(())
        });
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        self.make(req, parent, name, reply, |path, had_whiteout| {
            let mode = mode & !umask & 0o7777;
            fs::DirBuilder::new().mode(mode).create(path)?;
            fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
            if had_whiteout {
                // What the lower had there stays hidden.
                xattr::set(path, self.xattr_name("opaque"), b"y")?;
            }
            Ok(())
        });
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _g = self.big.lock();
        reply_empty(
            self.child(parent, name)
                .map_err(|e| io::Error::from_raw_os_error(e.code()))
                .and_then(|rel| self.do_unlink(&rel)),
            reply,
        );
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _g = self.big.lock();
        let r = self
            .child(parent, name)
            .map_err(|e| io::Error::from_raw_os_error(e.code()))
            .and_then(|rel| self.do_rmdir(&rel));
        self.dirs_changed();
        reply_empty(r, reply);
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        self.make(req, parent, link_name, reply, |path, _| {
            std::os::unix::fs::symlink(target, path)
        });
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let (from, to) = match (self.child(parent, name), self.child(newparent, newname)) {
            (Ok(a), Ok(b)) => (a, b),
            (Err(e), _) | (_, Err(e)) => return reply.error(e),
        };
        let _g = self.big.lock();
        let r = self.do_rename(&from, &to, flags);
        // Files moving change no directory's view (a failure half-way might have).
        if r.as_ref().map_or(true, |&dir| dir) {
            self.dirs_changed();
        }
        reply_empty(r.map(|_| ()), reply);
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let to = match self.child(newparent, newname) {
            Ok(b) => b,
            Err(e) => return reply.error(e),
        };
        let r = (|| -> io::Result<()> {
            let _g = self.big.lock();
            // An unnamed file (O_TMPFILE) gets its first name: linked from the work directory
            // (the same filesystem) into the upper layer, and a file like any other from then.
            // The descriptor is held until the link is made: one closed meanwhile (its file's
            // last release) could be reused for another file.
            if let Some(file) = self.anon_file(ino.0) {
                self.prepare_create(&to)?;
                let from = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
                nix::unistd::linkat(
                    None,
                    &from,
                    None,
                    &self.at(Layer::Upper, &to)?.path,
                    nix::fcntl::AtFlags::AT_SYMLINK_FOLLOW,
                )?;
                self.anon.lock().remove(&ino.0);
                self.inodes.lock().paths.insert(ino.0, to.clone());
                return Ok(());
            }
            let (from, _) = self.checked(ino)?;
            let md = self.copy_up(&from)?;
            if md.is_dir() {
                return Err(io::Error::from_raw_os_error(libc::EPERM));
            }
            // A second name for an unsynced copy-up: synced first (records name one path).
            if self.unsynced.pending(md.ino()) {
                self.unsynced.settle()?;
            }
            self.prepare_create(&to)?;
            fs::hard_link(
                &self.at(Layer::Upper, &from)?.path,
                &self.at(Layer::Upper, &to)?.path,
            )
        })();
        match r {
            Ok(()) => self.entry(&to, reply),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if let Some(a) = self.anon.lock().get_mut(&ino.0) {
            // An unnamed file opened again (through `/proc/PID/fd/N`).
            let acc = flags.0 & libc::O_ACCMODE;
            let r = OpenOptions::new()
                .read(true)
                .write(acc != libc::O_RDONLY)
                .custom_flags(flags.0 & (libc::O_TRUNC | libc::O_SYNC | libc::O_DSYNC))
                .open(format!("/proc/self/fd/{}", a.file.as_raw_fd()));
            let counted = r.is_ok();
            if counted {
                a.opens += 1;
            }
            if !self.opened(ino, r.map(Handle::File), reply) && counted {
                self.anon_closed(ino.0);
            }
            return;
        }
        let r = (|| -> io::Result<Handle> {
            // Checked, copied up and opened under the namespace lock: what was checked is what
            // is opened.
            let _g = self.big.lock();
            let (rel, found) = self.checked(ino)?;
            // Only regular files are opened here (the kernel serves devices and fifos itself);
            // O_APPEND stays with the kernel, which gives every write its offset.
            if !found.top().is_some_and(|(m, _)| m.is_file()) {
                return Err(io::Error::from_raw_os_error(libc::EINVAL));
            }
            let acc = flags.0 & libc::O_ACCMODE;
            let writing = acc != libc::O_RDONLY || flags.0 & libc::O_TRUNC != 0;
            let metacopy = || {
                found.upper.is_some()
                    && found.lower.as_ref().is_some_and(|l| l.is_file())
                    && self.is_metacopy(&rel)
            };
            let layer = if writing {
                self.copy_up_found(&rel, found.clone())?;
                Layer::Upper
            } else if found.upper.is_some() && !metacopy() {
                Layer::Upper
            } else if let Some(f) = self.io.backing_file(ino.0) {
                // A name of a lower hard link not copied up yet, another of whose names is
                // open by passthrough: the inode's data is that upper copy (and the kernel
                // wants every open of the inode on that backing file).
                return Ok(Handle::File(f.try_clone()?));
            } else {
                Layer::Lower
            };
            let at = self.at(layer, &rel)?;
            // Read-write even when opened write-only: the writeback cache reads to fill pages.
            let open = |read: bool| {
                OpenOptions::new()
                    .read(read)
                    .write(acc != libc::O_RDONLY)
                    .custom_flags(
                        (flags.0 & (libc::O_TRUNC | libc::O_SYNC | libc::O_DSYNC))
                            | libc::O_NOFOLLOW
                            | libc::O_NONBLOCK,
                    )
                    .open(&at.path)
            };
            let file = match open(true) {
                Err(e) if acc == libc::O_WRONLY && e.raw_os_error() == Some(libc::EACCES) => {
                    open(false)?
                }
                r => r?,
            };
            if !file.metadata()?.is_file() {
                return Err(io::Error::from_raw_os_error(libc::ESTALE));
            }
            if flags.0 & libc::O_TRUNC != 0 && !may_keep_privs(req) {
                kill_privs(&file)?;
            }
            Ok(if layer == Layer::Lower {
                Handle::Lower(LowerRead {
                    file: Mutex::new((
                        std::sync::Arc::new(file),
                        self.data_copies.load(Ordering::SeqCst),
                    )),
                })
            } else {
                Handle::File(file)
            })
        })();
        self.opened(ino, r, reply);
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyData,
    ) {
        let h = match self.file(fh) {
            Ok(h) => h,
            Err(e) => return reply.error(e),
        };
        let lower;
        let f: &File = match &*h {
            Handle::File(f) => f,
            Handle::Lower(l) => {
                lower = self.lower_read_file(ino, l);
                &lower
            }
            Handle::Dir(_) => return reply.error(Errno::EISDIR),
        };
        let mut buf = vec![0u8; size as usize];
        let mut got = 0;
        while got < buf.len() {
            match f.read_at(&mut buf[got..], offset + got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) => return reply.error(errno(&e)),
            }
        }
        reply.data(&buf[..got]);
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: fuser::WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyWrite,
    ) {
        let h = match self.file(fh) {
            Ok(h) => h,
            Err(e) => return reply.error(e),
        };
        let Handle::File(f) = &*h else {
            return reply.error(Errno::EISDIR);
        };
        if write_flags.contains(fuser::WriteFlags::FUSE_WRITE_KILL_SUIDGID) {
            if let Err(e) = kill_privs(f) {
                return reply.error(errno(&e));
            }
        }
        match f.write_all_at(data, offset) {
            Ok(()) => {
                // A large write (the writeback cache's batches of a streaming writer): its
                // pages start going to disk now, overlapping the transfer instead of waiting
                // for the final fsync, and leave the backing file's cache (the view's own page
                // cache holds them already).
                if data.len() >= STREAM_WRITE {
                    let _ = nix::fcntl::posix_fadvise(
                        f.as_raw_fd(),
                        offset as i64,
                        data.len() as i64,
                        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
                    );
                }
                reply.written(data.len() as u32)
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: fuser::LockOwner,
        reply: ReplyEmpty,
    ) {
        // Nothing to do on close (the kernel writes dirty pages back first either way, and
        // keeps locks itself): ENOSYS spares every later close the round trip.
        reply.error(Errno::ENOSYS);
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.handles.lock().remove(&fh.0);
        self.io.release(fh.0);
        // The last open of an unnamed file: it is gone (its descriptor here was the last).
        self.anon_closed(ino.0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let r = self
            .file(fh)
            .map_err(|e| io::Error::from_raw_os_error(e.code()))
            .and_then(|h| match &*h {
                Handle::File(f) => self.unsynced.sync_file(f, datasync),
                // A read-only open whose file was copied up since: the copy is synced.
                Handle::Lower(l) => {
                    let f = self.lower_read_file(ino, l);
                    if f.metadata()?.dev() == self.upper_root.metadata()?.dev() {
                        self.unsynced.sync_file(&f, datasync)
                    } else {
                        Ok(())
                    }
                }
                Handle::Dir(_) => Ok(()),
            });
        reply_empty(r, reply);
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let r = (|| -> io::Result<Listing> {
            let _g = self.big.lock();
            let (rel, _) = self.checked(ino)?;
            let mut out = vec![
                (ino.0, FileType::Directory, OsString::from("."), None),
                (1, FileType::Directory, OsString::from(".."), None),
            ];
            for (name, kind) in self.list(&rel)? {
                let c = rel.join(&name);
                let (ino, attr) = match self.attr(&c) {
                    Ok(a) => (a.ino.0, Some(a)),
                    Err(_) => (0, None),
                };
                out.push((ino, kind, name, attr));
            }
            Ok(out)
        })();
        self.opened(ino, r.map(Handle::Dir), reply);
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let h = match self.file(fh) {
            Ok(h) => h,
            Err(e) => return reply.error(e),
        };
        let Handle::Dir(list) = &*h else {
            return reply.error(Errno::ENOTDIR);
        };
        for (i, (ino, kind, name, _)) in list.iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo((*ino).max(1)), i as u64 + 1, *kind, name) {
                break;
            }
        }
        reply.ok();
    }

    /// READDIRPLUS: the entries with their attributes, so that `ls -l`, `find`, `chmod -R`
    /// need no LOOKUP per entry. `.` and `..` (never linked by the kernel) and names gone
    /// since the open carry no attributes.
    fn readdirplus(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: fuser::ReplyDirectoryPlus,
    ) {
        let h = match self.file(fh) {
            Ok(h) => h,
            Err(e) => return reply.error(e),
        };
        let Handle::Dir(list) = &*h else {
            return reply.error(Errno::ENOTDIR);
        };
        for (i, (ino, kind, name, attr)) in list.iter().enumerate().skip(offset as usize) {
            let full = match attr {
                Some(a) => reply.add(a.ino, i as u64 + 1, name, &TTL, a, Generation(0)),
                None if name == "." || name == ".." => {
                    let a = FileAttr {
                        ino: INodeNo((*ino).max(1)),
                        kind: *kind,
                        ..attr_of_dir()
                    };
                    reply.add(
                        a.ino,
                        i as u64 + 1,
                        name,
                        &Duration::ZERO,
                        &a,
                        Generation(0),
                    )
                }
                None => continue,
            };
            if full {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.handles.lock().remove(&fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        // The upper directory's entries (a directory only in the image changed nothing).
        let r = (|| -> io::Result<()> {
            let rel = self.rel_of(ino)?;
            let at = self.at(Layer::Upper, &rel)?;
            let dir = match OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
                .open(&at.path)
            {
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR)) => {
                    return Ok(())
                }
                r => r?,
            };
            if datasync {
                dir.sync_data()
            } else {
                dir.sync_all()
            }
        })();
        reply_empty(r, reply);
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match nix::sys::statvfs::fstatvfs(&self.upper_root) {
            Ok(s) => reply.statfs(
                s.blocks(),
                s.blocks_free(),
                s.blocks_available(),
                s.files(),
                s.files_free(),
                s.block_size() as u32,
                255,
                s.fragment_size() as u32,
            ),
            Err(e) => reply.error(Errno::from_i32(e as i32)),
        }
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        if is_overlay_name(name) {
            return reply.error(Errno::EPERM);
        }
        let r = (|| {
            if let Some(f) = self.anon_file(ino.0) {
                return xattr::FileExt::set_xattr(&*f, name, value);
            }
            let _g = self.big.lock();
            let (rel, _) = self.checked(ino)?;
            self.copy_up_meta(&rel)?;
            xattr::set(&self.at(Layer::Upper, &rel)?.path, name, value)
        })();
        reply_empty(r, reply);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        if is_overlay_name(name) {
            return reply.error(Errno::ENODATA);
        }
        // A file open by passthrough is a whole upper file: asked of it directly (the kernel
        // asks for `security.capability` before every write). So is an unnamed file.
        let file = self
            .io
            .backing_file(ino.0)
            .or_else(|| self.anon_file(ino.0));
        let r = match file {
            Some(f) => xattr::FileExt::get_xattr(&*f, name),
            None => self.checked(ino).and_then(|(rel, f)| {
                let layer = if f.upper.is_some() {
                    Layer::Upper
                } else {
                    Layer::Lower
                };
                xattr::get(&self.at(layer, &rel)?.path, name)
            }),
        };
        match r {
            Ok(Some(v)) if size == 0 => reply.size(v.len() as u32),
            Ok(Some(v)) if v.len() > size as usize => reply.error(Errno::ERANGE),
            Ok(Some(v)) => reply.data(&v),
            Ok(None) => reply.error(Errno::ENODATA),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let file = self
            .io
            .backing_file(ino.0)
            .or_else(|| self.anon_file(ino.0));
        let names = match file {
            Some(f) => xattr::FileExt::list_xattr(&*f).map(|l| l.collect::<Vec<_>>()),
            None => self.checked(ino).and_then(|(rel, f)| {
                let layer = if f.upper.is_some() {
                    Layer::Upper
                } else {
                    Layer::Lower
                };
                Ok(xattr::list(&self.at(layer, &rel)?.path)?.collect())
            }),
        };
        let r = names.map(|names| {
            let mut out = Vec::new();
            for n in names.iter().filter(|n| !is_overlay_name(n)) {
                out.extend_from_slice(n.as_bytes());
                out.push(0);
            }
            out
        });
        match r {
            Ok(v) if size == 0 => reply.size(v.len() as u32),
            Ok(v) if v.len() > size as usize => reply.error(Errno::ERANGE),
            Ok(v) => reply.data(&v),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        if is_overlay_name(name) {
            return reply.error(Errno::ENODATA);
        }
        let r = (|| {
            if let Some(f) = self.anon_file(ino.0) {
                return xattr::FileExt::remove_xattr(&*f, name);
            }
            let _g = self.big.lock();
            let (rel, _) = self.checked(ino)?;
            self.copy_up_meta(&rel)?;
            xattr::remove(&self.at(Layer::Upper, &rel)?.path, name)
        })();
        reply_empty(r, reply);
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let rel = match self.child(parent, name) {
            Ok(r) => r,
            Err(e) => return reply.error(e),
        };
        let r = (|| -> io::Result<(File, u64, FileAttr)> {
            let _g = self.big.lock();
            self.prepare_create(&rel)?;
            let at = self.at(Layer::Upper, &rel)?;
            // Read-write whatever the flags: the writeback cache may read to fill pages.
            let _ = flags;
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .custom_flags(libc::O_NOFOLLOW)
                .mode(mode & !umask & 0o7777)
                .open(&at.path)?;
            f.set_permissions(fs::Permissions::from_mode(mode & !umask & 0o7777))?;
            self.own(req, &rel, &at.path)?;
            // A new upper file: its identity is its upper inode (as `find` would answer).
            let md = f.metadata()?;
            let found = Found {
                opaque: false,
                upper: Some(md),
                lower: None,
            };
            let ino = self.ino_for(&rel, &found);
            let a = found
                .upper
                .as_ref()
                .map(|md| self.view_attr(ino, md))
                .ok_or_else(|| io::Error::from_raw_os_error(libc::EIO))?;
            Ok((f, ino, a))
        })();
        self.created(r, reply);
    }

    fn tmpfile(
        &self,
        req: &Request,
        parent: INodeNo,
        mode: u32,
        umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let r = (|| -> io::Result<(File, u64, FileAttr)> {
            let _g = self.big.lock();
            let (_, found) = self.checked(parent)?;
            let Some((dir, _)) = found.top().filter(|(m, _)| m.is_dir()) else {
                return Err(io::Error::from_raw_os_error(libc::ENOTDIR));
            };
            // In the work directory (the upper's filesystem): a link later names it in the
            // upper layer. Read-write whatever the flags, as `create`.
            let perm = mode & !umask & 0o7777;
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_TMPFILE)
                .mode(perm)
                .open(&self.work)?;
            let gid = if dir.mode() & libc::S_ISGID != 0 {
                dir.gid()
            } else {
                req.gid()
            };
            nix::unistd::fchown(f.as_raw_fd(), Some(req.uid().into()), Some(gid.into()))?;
            f.set_permissions(fs::Permissions::from_mode(perm))?;
            let md = f.metadata()?;
            // A FUSE inode of its own, with no path until a link names it.
            let ino = {
                let mut t = self.inodes.lock();
                let i = t.next;
                t.next += 1;
                let key = Key::Upper(md.ino());
                t.by_key.insert(key, i);
                t.keys.insert(i, key);
                i
            };
            let file = std::sync::Arc::new(f.try_clone()?);
            self.anon.lock().insert(ino, Anon { file, opens: 1 });
            Ok((f, ino, self.view_attr(ino, &md)))
        })();
        if let Some(ino) = self.created(r, reply) {
            // Never given out: the unnamed file goes.
            self.anon_closed(ino);
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let r = self
            .file(fh)
            .map_err(|e| io::Error::from_raw_os_error(e.code()))
            .and_then(|h| match &*h {
                Handle::File(f) => nix::fcntl::fallocate(
                    f.as_raw_fd(),
                    nix::fcntl::FallocateFlags::from_bits_truncate(mode),
                    offset as i64,
                    length as i64,
                )
                .map_err(io::Error::from),
                Handle::Lower(_) => Err(io::Error::from_raw_os_error(libc::EBADF)),
                Handle::Dir(_) => Err(io::Error::from_raw_os_error(libc::EISDIR)),
            });
        reply_empty(r, reply);
    }
}

/// Whether this process is root of the initial user namespace: the one that may write
/// `trusted.` xattrs (and mount kernel overlayfs with metacopy and index). Root of another user
/// namespace (a rootless container's) is not.
pub fn privileged() -> bool {
    nix::unistd::geteuid().is_root()
        && fs::read_to_string("/proc/self/uid_map")
            .is_ok_and(|m| m.split_whitespace().collect::<Vec<_>>() == ["0", "0", "4294967295"])
}

/// Whether this process holds CAP_SYS_ADMIN (the kernel's condition for passthrough backing
/// files; root can run without it).
fn has_cap_sys_admin() -> bool {
    const CAP_SYS_ADMIN: u32 = 21;
    effective_caps("/proc/self/status").is_some_and(|caps| caps & (1 << CAP_SYS_ADMIN) != 0)
}

/// Where an unprivileged daemon keeps an upper entry's image owner it could not chown to.
pub const OWNER_XATTR: &str = "user.strata.owner";

/// The xattrs of the layers' own bookkeeping: never shown, set or copied as a file's own.
fn is_overlay_name(name: &OsStr) -> bool {
    let b = name.as_bytes();
    b.starts_with(b"trusted.overlay.")
        || b.starts_with(b"user.overlay.")
        || b == OWNER_XATTR.as_bytes()
}
