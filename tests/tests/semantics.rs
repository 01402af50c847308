#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failure should abort loudly
//! The POSIX semantics suite (`strata_tests::semantics`) on a writable view of a lazily
//! mounted image: kernel overlayfs over the lazy mount (`strata mount --upper`). Every check,
//! then a randomized sequence of operations compared with the same sequence on a plain
//! directory holding the same tree.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use strata_tests::image::scratch;
use strata_tests::registry::TestRegistry;
use strata_tests::semantics;
use strata_tests::util::{kill_node_daemon, publish_layer, strata_ok, UnmountUnder};

fn mount_view(root: &Path, image: &str, upper: &Path, mnt: &Path, fuse: bool) {
    fs::create_dir_all(mnt).unwrap();
    let (u, m) = (upper.to_string_lossy(), mnt.to_string_lossy());
    let mut args = vec!["mount", "--upper", &u, image, &m];
    if fuse {
        args.push("--fuse-upper");
    }
    strata_ok(root, &args);
}

#[test]
fn writable_views_have_posix_semantics() {
    suite(false);
}

#[test]
fn fuse_writable_views_have_posix_semantics() {
    suite(true);
}

fn suite(fuse: bool) {
    let tmp = scratch("semantics").unwrap();
    let reg = TestRegistry::start(&tmp.join("registry"), None).unwrap();
    let image = publish_layer(
        &tmp,
        &reg.addr,
        semantics::lower_layer().unwrap(),
        "sem/x:v1",
    );
    // Under /tmp with 0755 parents: the permission checks run as nobody, who must reach it.
    let base = tempfile::Builder::new()
        .prefix("strata-sem")
        .tempdir_in("/tmp")
        .unwrap();
    fs::set_permissions(base.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let root = tmp.join("node");

    let mnt = base.path().join("view");
    mount_view(&root, &image, &tmp.join("upper"), &mnt, fuse);
    // Never a way to setuid files or devices of the image (as the kernel overlay's view).
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let line = info
        .lines()
        .rfind(|l| l.split_whitespace().nth(4) == Some(&*mnt.to_string_lossy()))
        .unwrap();
    assert!(line.contains("nosuid") && line.contains("nodev"), "{line}");
    if fuse {
        stale_names_are_not_followed(&mnt, base.path());
    }
    let failures = semantics::run(&mnt);
    strata_ok(&root, &["umount", &mnt.to_string_lossy()]);
    // A chmod and a chown of an image file copied no data (overlayfs's metacopy). The
    // kernel's overlay, asked for metacopy=on, copies data over this lower all the same.
    let copied = fs::metadata(tmp.join("upper/upper/meta/d"))
        .unwrap_or_else(|e| panic!("meta/d not copied up ({e}); failures: {failures:#?}"));
    assert_eq!(copied.uid(), 78);
    if fuse {
        assert_eq!(
            copied.blocks(),
            0,
            "meta/d's metadata change copied its data"
        );
    }

    // The randomized sequence, on a fresh view and a plain copy of it.
    let mnt2 = base.path().join("view2");
    mount_view(&root, &image, &tmp.join("upper2"), &mnt2, fuse);
    let plain = base.path().join("plain");
    let cp = Command::new("cp")
        .arg("-a")
        .arg(mnt2.join("."))
        .arg(&plain)
        .status()
        .unwrap();
    assert!(cp.success());
    let random = [11, 2024]
        .iter()
        .map(|&seed| semantics::compare_random(&mnt2, &plain, seed, 400))
        .find_map(Result::err);
    strata_ok(&root, &["umount", &mnt2.to_string_lossy()]);

    // The checks bite: on the read-only lazy mount of the same image, the writing ones fail.
    let ro = base.path().join("ro");
    fs::create_dir_all(&ro).unwrap();
    strata_ok(&root, &["mount", &image, &ro.to_string_lossy()]);
    let refused = semantics::run(&ro);
    strata_ok(&root, &["umount", &ro.to_string_lossy()]);
    strata_ok(&root, &["daemon", "--stop"]);
    assert!(
        refused.len() >= 18,
        "a read-only mount passed: {refused:#?}"
    );

    // What the FUSE writable layer cannot do yet, named (the test fails when one starts
    // working, to be taken off this list).
    let known: &[&str] = &[];
    let gap = |f: &String| known.iter().any(|k| f.starts_with(&format!("{k}: ")));
    for k in known {
        assert!(
            failures.iter().any(|f| f.starts_with(&format!("{k}: "))),
            "{k} works on the FUSE writable layer now: take it off the list"
        );
    }
    let mut all: Vec<String> = failures.into_iter().filter(|f| !gap(f)).collect();
    all.extend(random.map(|e| format!("random sequence: {e:#}")));
    assert!(all.is_empty(), "{}", all.join("\n"));
    fs::remove_dir_all(&tmp).ok();
}

/// An open file whose name was replaced (here by a symlink to a file outside the view): fchmod
/// through it must not reach whatever the name now holds.
fn stale_names_are_not_followed(mnt: &Path, outside: &Path) {
    use std::os::unix::fs::MetadataExt;
    let victim = outside.join("victim");
    fs::write(&victim, b"host\n").unwrap();
    fs::set_permissions(&victim, fs::Permissions::from_mode(0o600)).unwrap();
    let x = mnt.join("data/x");
    fs::write(&x, b"x\n").unwrap();
    let held = fs::File::open(&x).unwrap();
    std::os::unix::fs::symlink(&victim, mnt.join("data/y")).unwrap();
    fs::rename(mnt.join("data/y"), &x).unwrap();
    let _ = held.set_permissions(fs::Permissions::from_mode(0o666));
    assert_eq!(
        fs::metadata(&victim).unwrap().mode() & 0o777,
        0o600,
        "chmod reached the host"
    );
    fs::remove_file(&x).unwrap();
}

/// The writer of the SIGKILL test: new files and appends to an image file, each fsynced and
/// then logged (path, length, sha256 of the content that far) in a log outside the view; busy
/// renames and unlinks in between, never logged.
const WRITER: &str = r#"
import hashlib, os, sys
view, log = sys.argv[1], sys.argv[2]
out = open(log, "a")
def logged(rel):
    data = open(os.path.join(view, rel), "rb").read()
    out.write("%s %d %s\n" % (rel, len(data), hashlib.sha256(data).hexdigest()))
    out.flush(); os.fsync(out.fileno())
os.makedirs(os.path.join(view, "new"), exist_ok=True)
i = 0
while True:
    rel = "new/f%d" % i
    with open(os.path.join(view, rel), "wb") as f:
        f.write(os.urandom(1 + (i * 7919) % (300 << 10)))
        f.flush(); os.fsync(f.fileno())
    logged(rel)
    with open(os.path.join(view, "etc/motd"), "ab") as f:
        f.write(b"line %d\n" % i)
        f.flush(); os.fsync(f.fileno())
    logged("etc/motd")
    scratch = os.path.join(view, "new/scratch%d" % (i % 4))
    with open(scratch, "wb") as f:
        f.write(os.urandom(64 << 10))
    os.rename(scratch, scratch + ".moved")
    os.unlink(scratch + ".moved")
    i += 1
"#;

/// SIGKILL of the daemon serving a FUSE writable view while a writer runs: the next daemon
/// mounts the view again from its record; every file the writer fsynced is intact, the upper
/// directory reads as a consistent set of changes.
#[test]
fn fuse_writable_views_survive_sigkill() {
    use sha2::Digest;
    let tmp = scratch("semantics-kill").unwrap();
    let reg = TestRegistry::start(&tmp.join("registry"), None).unwrap();
    let image = publish_layer(
        &tmp,
        &reg.addr,
        semantics::lower_layer().unwrap(),
        "sem/kill:v1",
    );
    let root = tmp.join("node");
    let mnt = tmp.join("view");
    let upper = tmp.join("upper");
    mount_view(&root, &image, &upper, &mnt, true);
    let log = tmp.join("synced.log");
    let mut writer = Command::new("python3")
        .arg("-c")
        .arg(WRITER)
        .arg(&mnt)
        .arg(&log)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while fs::read_to_string(&log).map_or(0, |l| l.lines().count()) < 60 {
        assert!(std::time::Instant::now() < deadline, "the writer is stuck");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    kill_node_daemon(&root);
    // The writer fails on the dead mount (ENOTCONN); stopped either way.
    std::thread::sleep(std::time::Duration::from_millis(300));
    let _ = writer.kill();
    let _ = writer.wait();
    assert!(
        fs::read(mnt.join("etc/group")).is_err(),
        "the view outlived its daemon"
    );

    // The next daemon (started by the next mount: the image's, read-only, to compare with)
    // detaches the dead view and mounts it again from its record.
    let lower = tmp.join("lower");
    fs::create_dir_all(&lower).unwrap();
    strata_ok(&root, &["mount", &image, &lower.to_string_lossy()]);
    let synced = fs::read_to_string(&log).unwrap();
    let mut last = std::collections::BTreeMap::new();
    for line in synced.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        // The last line may be torn by the kill: only whole lines count.
        if f.len() == 3 && f[2].len() == 64 {
            last.insert(
                f[0].to_string(),
                (f[1].parse::<usize>().unwrap(), f[2].to_string()),
            );
        }
    }
    assert!(last.len() > 20, "{} files logged", last.len());
    for (rel, (len, sum)) in &last {
        let data = fs::read(mnt.join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"));
        // Appends after the last fsync may or may not have reached the daemon.
        assert!(
            data.len() >= *len,
            "{rel}: {} bytes, {len} synced",
            data.len()
        );
        assert_eq!(
            hex::encode(sha2::Sha256::digest(&data[..*len])),
            *sum,
            "{rel}: the synced content changed"
        );
    }
    // Every name the view lists reads, and no copy-up temporary shows.
    let mut names = 0;
    for e in walkdir(&mnt) {
        let md = fs::symlink_metadata(&e).unwrap();
        if md.is_file() {
            fs::read(&e).unwrap_or_else(|err| panic!("{}: {err}", e.display()));
        }
        names += 1;
    }
    assert!(names > last.len());
    // The upper directory reads as changes against the image: the logged files added, the
    // image file changed, the rest of the image untouched.
    let changes = strata_fs::upper::changes(&upper.join("upper"), &lower, &[]).unwrap();
    strata_ok(&root, &["umount", &lower.to_string_lossy()]);
    let kinds: std::collections::HashMap<String, char> = changes
        .iter()
        .map(|c| (c.path.to_string_lossy().into_owned(), c.kind.letter()))
        .collect();
    for rel in last.keys() {
        let want = if rel.starts_with("new/") { 'A' } else { 'C' };
        assert_eq!(
            kinds.get(&format!("/{rel}")),
            Some(&want),
            "{rel}: {changes:?}"
        );
    }
    assert!(!kinds.contains_key("/etc/group"), "{changes:?}");
    assert_eq!(fs::read(mnt.join("etc/group")).unwrap(), b"root:x:0:\n");
    strata_ok(&root, &["umount", &mnt.to_string_lossy()]);
    strata_ok(&root, &["daemon", "--stop"]);
}

/// A crash of the machine right after copy-ups that were never synced: the upper directory's
/// ext4 is shut down without flushing its journal (EXT4_IOC_SHUTDOWN, NOLOGFLUSH), which
/// leaves the disk as a power cut would. Copy-ups are synced in batches (`fuse_upper`'s
/// `unsynced`): every copied-up file must read after the crash as the image's content or a
/// later one, never cut short, and every fsynced file as written.
#[test]
fn fuse_copy_ups_survive_a_crash() {
    let tmp = scratch("semantics-crash").unwrap();
    let _unmount = UnmountUnder(tmp.clone());
    let reg = TestRegistry::start(&tmp.join("registry"), None).unwrap();
    let n = 120;
    let content = |i: usize| -> Vec<u8> {
        let mut v = format!("file {i}\n").repeat(600 + 37 * i).into_bytes();
        v.truncate(4000 + 311 * i);
        v
    };
    let mut l = strata_tests::image::LayerBuilder::new();
    l.dir(".", 0o755).unwrap().dir("c", 0o755).unwrap();
    for i in 0..n {
        l.file(&format!("c/f{i}"), 0o644, &content(i)).unwrap();
    }
    let image = publish_layer(&tmp, &reg.addr, l.finish().unwrap(), "sem/crash:v1");
    // The daemon (started by this mount) syncs copy-ups only when asked: the crash finds them
    // all unsynced.
    let Ext4View {
        root,
        img,
        fsdir,
        upper,
        mnt,
    } = Ext4View::mount(&tmp, &image);
    let (img, dir) = (img.display(), fsdir.display());
    for i in 0..n {
        let mut f = fs::OpenOptions::new()
            .append(true)
            .open(mnt.join(format!("c/f{i}")))
            .unwrap();
        std::io::Write::write_all(&mut f, b"+appended\n").unwrap();
        // Every tenth file is fsynced: it must survive whole. Its fsync commits the journal,
        // so the renames of the copy-ups before it are on disk, but not their data.
        if i % 10 == 9 {
            f.sync_all().unwrap();
        }
    }
    sh(&format!(
        "python3 -c 'import fcntl,os,struct; fd=os.open(\"{dir}\", os.O_RDONLY); \
         fcntl.ioctl(fd, 0x8004587d, struct.pack(\"I\", 2))'"
    ));
    // The view cannot sync any more; it goes, and the filesystem comes back from its journal.
    strata_ok(&root, &["umount", &mnt.to_string_lossy()]);
    // The daemon lets go of the upper filesystem when the view's session ends, just after.
    let umount = format!("for _ in $(seq 100); do umount {dir} && exit 0; sleep 0.1; done; exit 1");
    sh(&umount);
    sh(&format!("mount -o loop {img} {dir}"));
    let records: Vec<std::path::PathBuf> = fs::read_dir(upper.join("work/unsynced"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().is_some_and(|n| n != "mount"))
        .collect();
    assert!(
        !records.is_empty(),
        "no copy-up was left unsynced: the crash tested nothing"
    );
    let cut_short = (0..n)
        .filter(|i| {
            fs::metadata(upper.join(format!("upper/c/f{i}")))
                .is_ok_and(|m| m.len() < content(*i).len() as u64)
        })
        .count();
    eprintln!(
        "after the crash: {} records, {cut_short} upper files cut short",
        records.len()
    );
    // A `sync` elsewhere on the machine (another test's) may have written the copies before
    // the crash: what the crash could have cut short is cut short here, as it would be.
    for r in &records {
        let rel = fs::read_link(r).unwrap();
        let f = fs::OpenOptions::new()
            .write(true)
            .open(upper.join("upper").join(rel))
            .unwrap();
        f.set_len(0).unwrap();
        f.sync_all().unwrap();
    }

    mount_view(&root, &image, &upper, &mnt, true);
    for i in 0..n {
        let got = fs::read(mnt.join(format!("c/f{i}"))).unwrap();
        let mut appended = content(i);
        appended.extend_from_slice(b"+appended\n");
        if i % 10 == 9 {
            assert!(got == appended, "c/f{i}: fsynced, yet {} bytes", got.len());
        } else {
            assert!(
                got == content(i) || got == appended,
                "c/f{i}: {} bytes, neither the image's {} nor the appended {}",
                got.len(),
                content(i).len(),
                appended.len()
            );
        }
    }
    let left = fs::read_dir(upper.join("work/unsynced"))
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_name() != "mount")
        .count();
    assert_eq!(left, 0, "records outlived the recovery");
    strata_ok(&root, &["umount", &mnt.to_string_lossy()]);
    strata_ok(&root, &["daemon", "--stop"]);
    sh(&umount);
}

/// A killed daemon, the machine and the upper's filesystem still up: copy-ups it had not
/// synced yet are in the page cache, and the next daemon keeps them (one `syncfs`) instead of
/// giving the files their image content back.
#[test]
fn fuse_copy_ups_survive_a_killed_daemon() {
    let tmp = scratch("semantics-killed").unwrap();
    let _unmount = UnmountUnder(tmp.clone());
    let reg = TestRegistry::start(&tmp.join("registry"), None).unwrap();
    let image = publish_layer(
        &tmp,
        &reg.addr,
        semantics::lower_layer().unwrap(),
        "sem/killed:v1",
    );
    let Ext4View {
        root,
        fsdir,
        upper,
        mnt,
        ..
    } = Ext4View::mount(&tmp, &image);
    let dir = fsdir.display();
    let files = ["etc/motd", "etc/group", "dir/keep/x", "meta/b", "app/v1"];
    for f in files {
        let mut h = fs::OpenOptions::new()
            .append(true)
            .open(mnt.join(f))
            .unwrap();
        std::io::Write::write_all(&mut h, b"+kept\n").unwrap();
    }
    // The appends reach the daemon (a close flushes the writeback cache), then it dies.
    let records = fs::read_dir(upper.join("work/unsynced"))
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_name() != "mount")
        .count();
    assert_eq!(records, files.len(), "copy-ups left unsynced");
    kill_node_daemon(&root);
    std::thread::sleep(std::time::Duration::from_millis(300));
    // The next daemon (started by the next mount) mounts the view again from its record.
    let lower = tmp.join("lower");
    fs::create_dir_all(&lower).unwrap();
    strata_ok(&root, &["mount", &image, &lower.to_string_lossy()]);
    for f in files {
        let got = fs::read_to_string(mnt.join(f)).unwrap();
        let image_content = fs::read_to_string(lower.join(f)).unwrap();
        assert_eq!(got, format!("{image_content}+kept\n"), "{f}");
    }
    strata_ok(&root, &["umount", &lower.to_string_lossy()]);
    strata_ok(&root, &["umount", &mnt.to_string_lossy()]);
    strata_ok(&root, &["daemon", "--stop"]);
    sh(&format!(
        "for _ in $(seq 100); do umount {dir} && exit 0; sleep 0.1; done; exit 1"
    ));
}

/// `sh -c CMD`, which must succeed.
fn sh(cmd: &str) {
    let out = Command::new("sh").arg("-c").arg(cmd).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A FUSE writable view of `image` whose upper directory is on an ext4 of its own (a loop
/// file, mounted at `fsdir`), its daemon syncing copy-ups only when asked.
struct Ext4View {
    root: std::path::PathBuf,
    img: std::path::PathBuf,
    fsdir: std::path::PathBuf,
    upper: std::path::PathBuf,
    mnt: std::path::PathBuf,
}

impl Ext4View {
    fn mount(tmp: &Path, image: &str) -> Ext4View {
        let v = Ext4View {
            root: tmp.join("node"),
            img: tmp.join("upper.img"),
            fsdir: tmp.join("fs"),
            upper: tmp.join("fs/ctr"),
            mnt: tmp.join("view"),
        };
        fs::create_dir_all(&v.fsdir).unwrap();
        fs::create_dir_all(&v.mnt).unwrap();
        let (img, dir) = (v.img.display(), v.fsdir.display());
        sh(&format!(
            "truncate -s 128M {img} && mkfs.ext4 -q -F {img} && mount -o loop {img} {dir}"
        ));
        let out = Command::new(strata_tests::util::strata_bin())
            .arg("--root")
            .arg(&v.root)
            .args(["mount", "--fuse-upper", "--upper"])
            .arg(&v.upper)
            .arg(image)
            .arg(&v.mnt)
            .env("STRATA_UPPER_SYNC_MS", "3600000")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        v
    }
}

/// Every path under `dir` (not following symlinks).
fn walkdir(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if fs::symlink_metadata(&p).unwrap().is_dir() {
            out.extend(walkdir(&p));
        }
        out.push(p);
    }
    out
}
