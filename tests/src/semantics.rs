//! A POSIX semantics suite for writable views: the image's files (a lazy lower) under a writable
//! upper layer, as a container sees its root. It runs against any directory that shows
//! [`lower_layer`]'s tree: kernel overlayfs over a lazy mount today, strata's FUSE writable mode
//! when it lands; the randomized part also runs on a plain directory, the reference.
//!
//! Every check runs even when an earlier one failed; [`run`] returns the failures, named.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context, Result};

use crate::image::{noise, LayerBuilder};

/// Size of the large lower file (more than one chunk).
const BIG: usize = 3 << 20;

/// The lower layer every check expects (as a tar).
pub fn lower_layer() -> Result<Vec<u8>> {
    let mut l = LayerBuilder::new();
    l.dir(".", 0o755)?
        .dir("etc", 0o755)?
        .file("etc/motd", 0o644, b"welcome\n")?
        .file("etc/group", 0o644, b"root:x:0:\n")?
        .file("etc/passwd", 0o644, b"root:x:0:0::/root:/bin/sh\n")?
        .file_pax(
            "etc/labelled",
            0o644,
            b"labelled\n",
            &[("SCHILY.xattr.user.label", b"image")],
        )?
        .dir("data", 0o755)?
        .file("data/big.bin", 0o644, &noise(7, BIG))?
        .file("data/hard1", 0o644, b"linked\n")?
        .hardlink("data/hard2", "data/hard1")?
        .dir("dir", 0o755)?
        .dir("dir/a", 0o755)?
        .dir("dir/a/b", 0o755)?
        .file("dir/a/b/file", 0o644, b"deep\n")?
        .dir("dir/keep", 0o755)?
        .file("dir/keep/x", 0o644, b"x\n")?
        .file("dir/keep/y", 0o644, b"y\n")?
        .dir("dir/empty", 0o755)?
        .dir("dir/full", 0o755)?
        .file("dir/full/z", 0o644, b"z\n")?
        .symlink("link", "etc/motd")?
        .dir("app", 0o755)?
        .file("app/v1", 0o644, b"v1\n")?
        .dir("ro", 0o755)?
        .file("ro/file", 0o444, b"read only\n")?
        .dir("priv", 0o700)?
        .file("priv/secret", 0o600, b"secret\n")?
        .dir("tmp", 0o1777)?
        .dir("meta", 0o755)?
        .file("meta/a", 0o644, &noise(3, 200 << 10))?
        .file("meta/b", 0o644, b"bee\n")?
        .file("meta/d", 0o644, &noise(4, 8 << 10))?;
    l.finish()
}

/// Runs every check on the view at `root`; answers the failures (empty: all passed).
pub fn run(root: &Path) -> Vec<String> {
    type Check = fn(&Path) -> Result<()>;
    let checks: &[(&str, Check)] = &[
        ("copy-up on write", copy_up_on_write),
        ("copy-up on truncate", copy_up_on_truncate),
        ("metadata changes", metadata_changes),
        ("metadata, then data changes", metadata_then_data),
        ("xattrs", xattrs),
        ("st_ino stable across copy-up", inode_stable),
        ("whiteouts", whiteouts),
        ("opaque directories", opaque_dirs),
        ("rmdir of a non-empty dir", rmdir_not_empty),
        ("rename of files", rename_files),
        ("rename of directories", rename_dirs),
        ("rename onto a deleted name", rename_onto_deleted),
        ("hard links", hard_links),
        ("symlinks", symlinks),
        ("mknod", special_files),
        ("fallocate", fallocate),
        ("O_APPEND", append),
        ("O_TMPFILE", tmpfile),
        ("sparse writes", sparse),
        ("mmap writes", mmap_writes),
        ("fsync", fsync),
        (
            "truncate or write without CAP_FSETID drops setuid",
            truncate_drops_setuid,
        ),
        ("statfs", statfs),
        ("locks", locks),
        ("unlink of an open file", unlink_open),
        ("overlong names", long_names),
        ("permissions as a non-root user", permissions),
    ];
    checks
        .iter()
        .filter_map(|(name, check)| check(root).err().map(|e| format!("{name}: {e:#}")))
        .collect()
}

fn errno_of(r: std::io::Result<impl Sized>) -> Option<i32> {
    r.err().and_then(|e| e.raw_os_error())
}

fn copy_up_on_write(root: &Path) -> Result<()> {
    let p = root.join("etc/motd");
    let mut f = OpenOptions::new().append(true).open(&p)?;
    f.write_all(b"more\n")?;
    drop(f);
    ensure!(fs::read(&p)? == b"welcome\nmore\n", "content after append");
    // The hard-linked name of another file is untouched.
    ensure!(fs::read(root.join("etc/group"))? == b"root:x:0:\n");
    Ok(())
}

fn copy_up_on_truncate(root: &Path) -> Result<()> {
    let p = root.join("data/big.bin");
    let f = OpenOptions::new().write(true).open(&p)?;
    f.set_len(10)?;
    drop(f);
    ensure!(
        fs::read(&p)? == noise(7, BIG)[..10],
        "content after truncate"
    );
    Ok(())
}

fn metadata_changes(root: &Path) -> Result<()> {
    let p = root.join("etc/passwd");
    fs::set_permissions(&p, fs::Permissions::from_mode(0o600))?;
    nix::unistd::chown(
        &p,
        Some(nix::unistd::Uid::from_raw(4242)),
        Some(nix::unistd::Gid::from_raw(4343)),
    )?;
    let t = nix::sys::time::TimeSpec::new(1_000_000_000, 0);
    nix::sys::stat::utimensat(
        None,
        &p,
        &t,
        &t,
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )?;
    let md = fs::metadata(&p)?;
    ensure!(md.mode() & 0o7777 == 0o600, "mode {:o}", md.mode());
    ensure!((md.uid(), md.gid()) == (4242, 4343), "owner");
    ensure!(md.mtime() == 1_000_000_000, "mtime {}", md.mtime());
    ensure!(
        fs::read(&p)? == b"root:x:0:0::/root:/bin/sh\n",
        "content kept"
    );
    Ok(())
}

/// A file whose metadata changed (a metadata-only copy-up where the view has one) keeps its
/// content, its identity and the new metadata when its data changes or it is renamed.
fn metadata_then_data(root: &Path) -> Result<()> {
    let a = root.join("meta/a");
    let ino = fs::metadata(&a)?.ino();
    // Opened for reading before anything changes: it must follow the copy-up.
    let early = File::open(&a)?;
    fs::set_permissions(&a, fs::Permissions::from_mode(0o640))?;
    xattr::set(&a, "user.strata.k", b"v")?;
    ensure!(fs::read(&a)? == noise(3, 200 << 10), "content after chmod");
    let mut f = OpenOptions::new().append(true).open(&a)?;
    f.write_all(b"tail")?;
    drop(f);
    let mut want = noise(3, 200 << 10);
    want.extend_from_slice(b"tail");
    ensure!(fs::read(&a)? == want, "content after the append");
    // Read through the early open with the page cache dropped (the read reaches the
    // filesystem): the appended bytes are there.
    nix::unistd::sync();
    fs::write("/proc/sys/vm/drop_caches", "1")?;
    let mut tail = [0u8; 4];
    let n = std::os::unix::fs::FileExt::read_at(&early, &mut tail, (200 << 10) as u64)?;
    ensure!(
        &tail[..n] == b"tail",
        "an open taken before the copy-up read {:?}",
        &tail[..n]
    );
    let md = fs::metadata(&a)?;
    ensure!(md.mode() & 0o7777 == 0o640, "mode {:o}", md.mode());
    ensure!(md.ino() == ino, "st_ino {ino} -> {}", md.ino());
    ensure!(
        xattr::get(&a, "user.strata.k")?.as_deref() == Some(&b"v"[..]),
        "xattr lost on the data copy-up"
    );
    let b = root.join("meta/b");
    nix::unistd::chown(&b, Some(nix::unistd::Uid::from_raw(77)), None)?;
    fs::rename(&b, root.join("meta/c"))?;
    ensure!(
        fs::read(root.join("meta/c"))? == b"bee\n",
        "content after rename"
    );
    ensure!(
        fs::metadata(root.join("meta/c"))?.uid() == 77,
        "owner after rename"
    );
    ensure!(!b.exists(), "old name still there");
    let d = root.join("meta/d");
    fs::set_permissions(&d, fs::Permissions::from_mode(0o600))?;
    nix::unistd::chown(&d, Some(nix::unistd::Uid::from_raw(78)), None)?;
    ensure!(fs::read(&d)? == noise(4, 8 << 10), "content after chown");
    ensure!(
        fs::metadata(&d)?.blocks() > 0,
        "a file whose metadata changed shows no blocks"
    );
    Ok(())
}

fn xattrs(root: &Path) -> Result<()> {
    let p = root.join("dir/keep/x");
    xattr::set(&p, "user.strata.test", b"v1")?;
    ensure!(xattr::get(&p, "user.strata.test")?.as_deref() == Some(&b"v1"[..]));
    let names: Vec<_> = xattr::list(&p)?.collect();
    ensure!(
        names.iter().any(|n| n == "user.strata.test"),
        "listed: {names:?}"
    );
    ensure!(
        !names.iter().any(|n| n.as_bytes().contains(&b'.')
            && (n.as_bytes().starts_with(b"trusted.overlay")
                || n.as_bytes().starts_with(b"user.overlay"))),
        "overlay's own xattrs leak: {names:?}"
    );
    xattr::remove(&p, "user.strata.test")?;
    ensure!(xattr::get(&p, "user.strata.test")?.is_none());
    ensure!(fs::read(&p)? == b"x\n");
    // An image file's own xattrs survive the copy-up of its data.
    let l = root.join("etc/labelled");
    ensure!(xattr::get(&l, "user.label")?.as_deref() == Some(&b"image"[..]));
    OpenOptions::new()
        .append(true)
        .open(&l)?
        .write_all(b"more\n")?;
    ensure!(fs::read(&l)? == b"labelled\nmore\n");
    let label = xattr::get(&l, "user.label")?;
    ensure!(
        label.as_deref() == Some(&b"image"[..]),
        "after copy-up: {label:?}"
    );
    Ok(())
}

fn inode_stable(root: &Path) -> Result<()> {
    let p = root.join("dir/keep/y");
    let before = fs::metadata(&p)?.ino();
    fs::write(&p, b"changed\n")?;
    let after = fs::metadata(&p)?.ino();
    ensure!(before == after, "st_ino {before} -> {after}");
    Ok(())
}

fn whiteouts(root: &Path) -> Result<()> {
    let p = root.join("etc/group");
    fs::remove_file(&p)?;
    ensure!(errno_of(fs::symlink_metadata(&p)) == Some(libc::ENOENT));
    let names: Vec<_> = fs::read_dir(root.join("etc"))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<std::io::Result<_>>()?;
    ensure!(!names.iter().any(|n| n == "group"), "listed: {names:?}");
    fs::write(&p, b"again\n")?;
    ensure!(fs::read(&p)? == b"again\n");
    Ok(())
}

fn opaque_dirs(root: &Path) -> Result<()> {
    let d = root.join("dir/full");
    fs::remove_dir_all(&d)?;
    fs::create_dir(&d)?;
    let left: Vec<_> = fs::read_dir(&d)?.collect();
    ensure!(
        left.is_empty(),
        "a recreated dir shows {} lower entries",
        left.len()
    );
    Ok(())
}

fn rmdir_not_empty(root: &Path) -> Result<()> {
    let e = errno_of(fs::remove_dir(root.join("dir/keep")));
    ensure!(e == Some(libc::ENOTEMPTY), "errno {e:?}");
    fs::remove_dir(root.join("dir/empty"))?;
    ensure!(!root.join("dir/empty").exists());
    Ok(())
}

fn rename_files(root: &Path) -> Result<()> {
    fs::rename(root.join("ro/file"), root.join("ro/moved"))?;
    ensure!(!root.join("ro/file").exists());
    ensure!(fs::read(root.join("ro/moved"))? == b"read only\n");
    // Over an existing lower file.
    fs::write(root.join("new-motd"), b"replaced\n")?;
    fs::rename(root.join("new-motd"), root.join("etc/passwd"))?;
    ensure!(fs::read(root.join("etc/passwd"))? == b"replaced\n");
    ensure!(!root.join("new-motd").exists());
    Ok(())
}

fn rename_dirs(root: &Path) -> Result<()> {
    // A lower directory with contents, across parents.
    fs::rename(root.join("dir/a"), root.join("moved-a"))?;
    ensure!(!root.join("dir/a").exists());
    ensure!(fs::read(root.join("moved-a/b/file"))? == b"deep\n");
    // Over an existing empty directory; over a non-empty one is refused.
    fs::create_dir(root.join("target"))?;
    fs::rename(root.join("moved-a"), root.join("target"))?;
    ensure!(fs::read(root.join("target/b/file"))? == b"deep\n");
    let e = errno_of(fs::rename(root.join("target"), root.join("dir/keep")));
    ensure!(
        e == Some(libc::ENOTEMPTY) || e == Some(libc::EEXIST),
        "errno {e:?}"
    );
    Ok(())
}

fn rename_onto_deleted(root: &Path) -> Result<()> {
    // `rm -rf /opt/app && mv /tmp/app /opt/app`, as upgrades do.
    fs::remove_dir_all(root.join("app"))?;
    fs::create_dir(root.join("tmp/app"))?;
    fs::write(root.join("tmp/app/v2"), b"v2\n")?;
    fs::rename(root.join("tmp/app"), root.join("app"))?;
    let names: Vec<_> = fs::read_dir(root.join("app"))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<std::io::Result<_>>()?;
    ensure!(names == ["v2"], "app holds {names:?}");
    // A file onto a deleted file's name.
    fs::remove_file(root.join("app/v2"))?;
    fs::write(root.join("tmp/v3"), b"v3\n")?;
    fs::rename(root.join("tmp/v3"), root.join("app/v2"))?;
    ensure!(fs::read(root.join("app/v2"))? == b"v3\n");
    Ok(())
}

fn hard_links(root: &Path) -> Result<()> {
    let (a, b) = (root.join("data/hard1"), root.join("data/hard2"));
    let (ma, mb) = (fs::metadata(&a)?, fs::metadata(&b)?);
    ensure!(ma.ino() == mb.ino() && ma.nlink() == 2, "lower hard links");
    // A write through one name shows through the other (copy-up keeps them together).
    fs::write(&a, b"both\n")?;
    ensure!(fs::read(&b)? == b"both\n", "the other name after a write");
    // The other name opened while one is open for writing (one inode for the kernel).
    let mut w = OpenOptions::new().append(true).open(&a)?;
    w.write_all(b"more\n")?;
    let other = fs::read(&b).context("reading the other name while one is open")?;
    ensure!(
        other == b"both\nmore\n",
        "the other name while open: {other:?}"
    );
    drop(w);
    let c = root.join("data/hard3");
    fs::hard_link(root.join("etc/motd"), &c)?;
    let (mm, mc) = (fs::metadata(root.join("etc/motd"))?, fs::metadata(&c)?);
    ensure!(mm.ino() == mc.ino() && mc.nlink() >= 2, "new hard link");
    Ok(())
}

fn symlinks(root: &Path) -> Result<()> {
    ensure!(fs::read_link(root.join("link"))? == Path::new("etc/motd"));
    symlink("../etc/passwd", root.join("data/sym"))?;
    ensure!(fs::read_link(root.join("data/sym"))? == Path::new("../etc/passwd"));
    ensure!(fs::symlink_metadata(root.join("data/sym"))?
        .file_type()
        .is_symlink());
    fs::remove_file(root.join("link"))?;
    ensure!(fs::symlink_metadata(root.join("link")).is_err());
    Ok(())
}

fn special_files(root: &Path) -> Result<()> {
    let fifo = root.join("data/fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o644))?;
    ensure!(fs::symlink_metadata(&fifo)?.file_type().is_fifo());
    if nix::unistd::geteuid().is_root() {
        let dev = root.join("data/null");
        nix::sys::stat::mknod(
            &dev,
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::from_bits_truncate(0o666),
            nix::sys::stat::makedev(1, 3),
        )?;
        let md = fs::symlink_metadata(&dev)?;
        ensure!(md.file_type().is_char_device() && md.rdev() == nix::sys::stat::makedev(1, 3));
    }
    Ok(())
}

fn fallocate(root: &Path) -> Result<()> {
    let f = File::create(root.join("data/alloc"))?;
    nix::fcntl::fallocate(
        f.as_raw_fd(),
        nix::fcntl::FallocateFlags::empty(),
        0,
        1 << 20,
    )?;
    ensure!(f.metadata()?.len() == 1 << 20);
    Ok(())
}

fn append(root: &Path) -> Result<()> {
    let p = root.join("dir/keep/x");
    for _ in 0..2 {
        let mut f = OpenOptions::new().append(true).open(&p)?;
        f.write_all(b"+\n")?;
    }
    ensure!(fs::read(&p)? == b"x\n+\n+\n");
    Ok(())
}

fn tmpfile(root: &Path) -> Result<()> {
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_TMPFILE)
        .mode(0o644)
        .open(root.join("data"))?;
    f.write_all(b"anonymous\n")?;
    let md = f.metadata()?;
    ensure!(md.nlink() == 0 && md.len() == 10, "unnamed file: {md:?}");
    f.set_permissions(fs::Permissions::from_mode(0o640))?;
    // One that is never named leaves nothing behind.
    let before = fs::read_dir(root.join("data"))?.count();
    let mut gone = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_TMPFILE)
        .mode(0o600)
        .open(root.join("data"))?;
    gone.write_all(b"scratch")?;
    drop(gone);
    ensure!(
        fs::read_dir(root.join("data"))?.count() == before,
        "an unnamed file showed up"
    );
    let from = PathBuf::from(format!("/proc/self/fd/{}", f.as_raw_fd()));
    nix::unistd::linkat(
        None,
        &from,
        None,
        &root.join("data/named"),
        nix::fcntl::AtFlags::AT_SYMLINK_FOLLOW,
    )?;
    ensure!(fs::read(root.join("data/named"))? == b"anonymous\n");
    let md = fs::metadata(root.join("data/named"))?;
    ensure!(
        md.mode() & 0o7777 == 0o640 && md.nlink() == 1,
        "named: {md:?}"
    );
    // Still the open file: a write through it shows under the name.
    f.write_all(b"more\n")?;
    ensure!(fs::read(root.join("data/named"))? == b"anonymous\nmore\n");
    Ok(())
}

fn sparse(root: &Path) -> Result<()> {
    let p = root.join("data/sparse");
    let mut f = File::create(&p)?;
    f.seek(SeekFrom::Start(1 << 30))?;
    f.write_all(b"end")?;
    drop(f);
    let md = fs::metadata(&p)?;
    ensure!(md.len() == (1 << 30) + 3, "size {}", md.len());
    ensure!(md.blocks() < 1024, "{} blocks: not sparse", md.blocks());
    let mut f = File::open(&p)?;
    let mut head = [1u8; 4096];
    f.read_exact(&mut head)?;
    ensure!(head.iter().all(|&b| b == 0));
    Ok(())
}

fn mmap_writes(root: &Path) -> Result<()> {
    // Through Python's mmap (a shared writable mapping, msync'd): no unsafe code here.
    let p = root.join("data/mapped");
    let script = "import mmap,sys\n\
f=open(sys.argv[1],'w+b'); f.truncate(8192)\n\
m=mmap.mmap(f.fileno(),8192,mmap.MAP_SHARED,mmap.PROT_READ|mmap.PROT_WRITE)\n\
m[4096:4103]=b'mapped!'; m.flush(); m.close(); f.close()\n";
    let out = Command::new("python3")
        .args(["-c", script])
        .arg(&p)
        .output()
        .context("running python3")?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let data = fs::read(&p)?;
    ensure!(data.len() == 8192 && &data[4096..4103] == b"mapped!");
    Ok(())
}

/// A truncate or a write by root without CAP_FSETID (a container's root may lack it) clears
/// the setuid and setgid bits, as a truncate with it keeps them.
fn truncate_drops_setuid(root: &Path) -> Result<()> {
    let (kept, dropped) = (root.join("tmp/suid-kept"), root.join("tmp/suid-dropped"));
    for p in [&kept, &dropped] {
        fs::write(p, b"#!/bin/sh\n")?;
        fs::set_permissions(p, fs::Permissions::from_mode(0o6755))?;
    }
    let truncate = |p: &Path, drop_cap: bool| -> Result<()> {
        let mut c = Command::new("setpriv");
        if drop_cap {
            c.arg("--bounding-set=-fsetid");
        }
        let out = c.arg("truncate").arg("-s").arg("4").arg(p).output()?;
        ensure!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    };
    truncate(&kept, false)?;
    truncate(&dropped, true)?;
    let mode = |p: &Path| -> Result<u32> { Ok(fs::metadata(p)?.mode() & 0o7777) };
    ensure!(
        mode(&kept)? == 0o6755,
        "with CAP_FSETID: {:o}",
        mode(&kept)?
    );
    ensure!(
        mode(&dropped)? == 0o755,
        "without CAP_FSETID: {:o}",
        mode(&dropped)?
    );
    // A write (not a truncate) without CAP_FSETID.
    fs::set_permissions(&kept, fs::Permissions::from_mode(0o6755))?;
    let out = Command::new("setpriv")
        .arg("--bounding-set=-fsetid")
        .args(["sh", "-c", "printf x >> \"$1\"", "sh"])
        .arg(&kept)
        .output()?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        mode(&kept)? == 0o755,
        "write without CAP_FSETID: {:o}",
        mode(&kept)?
    );
    Ok(())
}

fn fsync(root: &Path) -> Result<()> {
    let mut f = File::create(root.join("data/synced"))?;
    f.write_all(b"durable\n")?;
    f.sync_all()?;
    File::open(root.join("data"))?.sync_all()?;
    Ok(())
}

fn statfs(root: &Path) -> Result<()> {
    let s = nix::sys::statvfs::statvfs(root)?;
    ensure!(s.block_size() > 0 && s.blocks() > 0, "statvfs");
    Ok(())
}

fn locks(root: &Path) -> Result<()> {
    let p = root.join("etc/motd");
    let a = File::open(&p)?;
    let b = File::open(&p)?;
    use nix::fcntl::{Flock, FlockArg};
    let a = Flock::lock(a, FlockArg::LockExclusiveNonblock).map_err(|(_, e)| e)?;
    match Flock::lock(b, FlockArg::LockExclusiveNonblock) {
        Err((_, e)) => ensure!(e == nix::errno::Errno::EWOULDBLOCK, "second flock: {e}"),
        Ok(_) => bail!("a second exclusive flock was granted"),
    }
    drop(a.unlock().map_err(|(_, e)| e)?);
    let w = OpenOptions::new().read(true).write(true).open(&p)?;
    let lock = libc::flock {
        l_type: libc::F_WRLCK as i16,
        l_whence: libc::SEEK_SET as i16,
        l_start: 0,
        l_len: 0,
        l_pid: 0,
    };
    nix::fcntl::fcntl(w.as_raw_fd(), nix::fcntl::FcntlArg::F_SETLK(&lock))?;
    Ok(())
}

fn unlink_open(root: &Path) -> Result<()> {
    let p = root.join("dir/a/b/file");
    let p = if p.exists() {
        p
    } else {
        root.join("target/b/file")
    };
    let mut f = File::open(&p)?;
    fs::remove_file(&p)?;
    let mut s = String::new();
    f.read_to_string(&mut s)?;
    ensure!(s == "deep\n", "read after unlink: {s:?}");
    ensure!(!p.exists());
    // A file written, then unlinked while open: its writes and fsync still work.
    let q = root.join("tmp/unlinked");
    let mut w = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&q)?;
    w.write_all(b"before")?;
    fs::remove_file(&q)?;
    w.write_all(b" after")?;
    w.sync_all()?;
    let mut s = String::new();
    w.seek(SeekFrom::Start(0))?;
    w.read_to_string(&mut s)?;
    ensure!(s == "before after", "read back after unlink: {s:?}");
    Ok(())
}

fn long_names(root: &Path) -> Result<()> {
    let name = "n".repeat(256);
    let e = errno_of(File::create(root.join(&name)));
    ensure!(e == Some(libc::ENAMETOOLONG), "errno {e:?}");
    let ok = "m".repeat(255);
    File::create(root.join(&ok))?;
    fs::remove_file(root.join(&ok))?;
    Ok(())
}

/// Runs `script` with sh as user and group 65534 (nobody); answers whether it succeeded.
fn as_nobody(script: &str) -> Result<bool> {
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--",
            "sh",
            "-c",
            script,
        ])
        .output()
        .context("running setpriv")?;
    Ok(out.status.success())
}

fn permissions(root: &Path) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(()); // needs a second user to switch to
    }
    let r = root.display();
    ensure!(
        as_nobody(&format!("cat {r}/dir/keep/x >/dev/null"))?,
        "nobody cannot read a 0644 file"
    );
    ensure!(
        !as_nobody(&format!("echo x >> {r}/etc/motd"))?,
        "nobody wrote a root-owned 0644 file"
    );
    ensure!(
        !as_nobody(&format!("cat {r}/priv/secret"))?,
        "nobody read inside a 0700 directory"
    );
    ensure!(
        !as_nobody(&format!("touch {r}/nobody-was-here"))?,
        "nobody created a file in a 0755 root-owned directory"
    );
    ensure!(
        as_nobody(&format!("touch {r}/tmp/mine && rm {r}/tmp/mine"))?,
        "nobody cannot use /tmp (1777)"
    );
    Ok(())
}

/// A small deterministic generator (xorshift), so a failing sequence can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[(self.next() % v.len() as u64) as usize]
    }
}

/// Paths the random sequence works on: a few names in a few directories, over the lower tree.
fn random_path(rng: &mut Rng) -> PathBuf {
    let dirs = [
        "", "etc", "dir", "dir/keep", "dir/a", "dir/a/b", "data", "new", "new/sub",
    ];
    let names = [
        "motd", "group", "x", "y", "b", "file", "f1", "f2", "sub", "keep",
    ];
    PathBuf::from(rng.pick(&dirs)).join(rng.pick(&names))
}

/// One random operation on `root`; answers its outcome (`ok` or the errno).
fn random_op(root: &Path, op: u64, a: &Path, b: &Path, data: &[u8]) -> String {
    let (pa, pb) = (root.join(a), root.join(b));
    let r: std::io::Result<()> = match op % 11 {
        0 => fs::write(&pa, data),
        1 => OpenOptions::new()
            .append(true)
            .open(&pa)
            .and_then(|mut f| f.write_all(data)),
        2 => OpenOptions::new()
            .write(true)
            .open(&pa)
            .and_then(|f| f.set_len(data.len() as u64 / 2)),
        3 => fs::remove_file(&pa),
        4 => fs::create_dir(&pa),
        5 => fs::remove_dir(&pa),
        6 => fs::rename(&pa, &pb),
        7 => fs::set_permissions(&pa, fs::Permissions::from_mode(0o600 + (op as u32 % 0o100))),
        8 => symlink(b, &pa),
        9 => fs::hard_link(&pa, &pb),
        _ => fs::read(&pa).map(|_| ()),
    };
    match r {
        Ok(()) => "ok".into(),
        Err(e) => format!("errno {}", e.raw_os_error().unwrap_or(-1)),
    }
}

/// Every path under `root` (relative).
fn entries(root: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut todo = vec![PathBuf::new()];
    while let Some(rel) = todo.pop() {
        for e in fs::read_dir(root.join(&rel))? {
            let e = e?;
            let r = rel.join(e.file_name());
            if e.file_type()?.is_dir() {
                todo.push(r.clone());
            }
            out.push(r);
        }
    }
    out.sort();
    Ok(out)
}

/// A listing of the tree under `root`: path, type, mode, size, content digest or link target.
pub fn describe(root: &Path) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let mut todo = vec![PathBuf::new()];
    while let Some(rel) = todo.pop() {
        let mut names: Vec<_> = fs::read_dir(root.join(&rel))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<std::io::Result<_>>()?;
        names.sort();
        for n in names {
            let r = rel.join(&n);
            let p = root.join(&r);
            let md = fs::symlink_metadata(&p)?;
            let t = md.file_type();
            let what = if t.is_dir() {
                todo.push(r.clone());
                "dir".to_string()
            } else if t.is_symlink() {
                format!("-> {}", fs::read_link(&p)?.display())
            } else if t.is_file() {
                format!(
                    "{} bytes {}",
                    md.len(),
                    crate::image::sha256(&fs::read(&p)?)
                )
            } else {
                "special".to_string()
            };
            let mode = if t.is_symlink() {
                0
            } else {
                md.mode() & 0o7777
            };
            out.push(format!("{} {mode:o} {what}", r.display()));
        }
    }
    out.sort();
    Ok(out)
}

/// Applies the same `steps` random operations (from `seed`) to the view at `view` and the plain
/// directory `plain` (a copy of the same tree): every outcome and the final trees must agree.
pub fn compare_random(view: &Path, plain: &Path, seed: u64, steps: usize) -> Result<()> {
    let mut rng = Rng(seed | 1);
    let mut succeeded = 0;
    let mut kinds = std::collections::BTreeSet::new();
    let mut history: Vec<String> = Vec::new();
    for step in 0..steps {
        let op = rng.next();
        // Mostly on what exists (in the reference), else on new names.
        let existing = entries(plain)?;
        let pick = |rng: &mut Rng| {
            if !rng.next().is_multiple_of(3) && !existing.is_empty() {
                rng.pick(&existing).clone()
            } else {
                random_path(rng)
            }
        };
        let (a, b) = (pick(&mut rng), pick(&mut rng));
        let data = noise(rng.next(), (rng.next() % 5000) as usize);
        let got = random_op(view, op, &a, &b, &data);
        let want = random_op(plain, op, &a, &b, &data);
        history.push(format!(
            "op {} {} {} -> {want}",
            op % 11,
            a.display(),
            b.display()
        ));
        if want == "ok" {
            succeeded += 1;
            kinds.insert(op % 11);
        }
        if got != want {
            let recent = &history[history.len().saturating_sub(12)..];
            bail!(
                "step {step} (seed {seed}): op {} on {} {}: the view answered {got}, a plain \
                 directory {want}; the steps before: {recent:#?}",
                op % 11,
                a.display(),
                b.display()
            );
        }
    }
    // The sequence must do something: most operations change the tree.
    ensure!(
        succeeded * 4 >= steps && kinds.len() >= 10,
        "only {succeeded} of {steps} operations ({} kinds) succeeded: the sequence tests little",
        kinds.len()
    );
    let (v, p) = (describe(view)?, describe(plain)?);
    if v != p {
        let only_v: Vec<_> = v.iter().filter(|l| !p.contains(l)).collect();
        let only_p: Vec<_> = p.iter().filter(|l| !v.contains(l)).collect();
        // The operations that named the paths that differ.
        let named: Vec<&String> = history
            .iter()
            .filter(|h| {
                h.contains("hard")
                    || only_v.iter().chain(&only_p).any(|l| {
                        l.split(' ')
                            .next()
                            .is_some_and(|p| h.split(' ').any(|w| w == p))
                    })
            })
            .collect();
        bail!("trees differ after {steps} steps (seed {seed}): view only {only_v:#?}, plain only {only_p:#?}; operations on them: {named:#?}");
    }
    Ok(())
}
