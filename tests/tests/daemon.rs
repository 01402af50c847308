#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failure should abort loudly
//! The node daemon: one process serves every mount of a store with one disk cache and one cap;
//! unmounting one mount leaves the others serving; a restarted daemon restores its mounts;
//! other users reach neither the store, the caches nor the socket; a full disk under the store
//! degrades to uncached serving; a stalled registry does not stall lookups.

use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use strata_tests::image::{noise, scratch, Compression, LayerBuilder};
use strata_tests::proxy::{Fault, FaultProxy};
use strata_tests::registry::TestRegistry;
use strata_tests::util::{
    convert_one_layer, is_mounted, publish_layer, strata, strata_bin, strata_ok, Mounted,
};

const MIB: usize = 1 << 20;

/// A `strata daemon` started by the test; stopped (and killed by PID if need be) when dropped.
struct Daemon {
    root: PathBuf,
    child: Child,
}

impl Daemon {
    fn start(root: &Path, extra: &[&str]) -> Daemon {
        let mut child = Command::new(strata_bin())
            .arg("--root")
            .arg(root)
            .arg("daemon")
            .arg("--notify-ready")
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "strata-daemon-ready", "daemon did not start");
        Daemon {
            root: root.to_path_buf(),
            child,
        }
    }

    fn stop(mut self) {
        strata_ok(&self.root, &["daemon", "--stop"]);
        let status = self.child.wait().unwrap();
        assert!(status.success(), "daemon exited with {status}");
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = strata(&self.root, &["daemon", "--stop"]);
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// An image of `n` files of 1 MiB, `prefix0`…, pushed to `reg` as `name`; returns its remote
/// reference.
fn remote_image(tmp: &Path, reg: &TestRegistry, name: &str, prefix: &str, n: u64) -> String {
    let mut l = LayerBuilder::new();
    l.dir(".", 0o755).unwrap();
    for i in 0..n {
        l.file(&format!("{prefix}{i}"), 0o644, &noise(seed(prefix, i), MIB))
            .unwrap();
    }
    publish_layer(tmp, &reg.addr, l.finish().unwrap(), name)
}

fn seed(prefix: &str, i: u64) -> u64 {
    u64::from(prefix.as_bytes()[0]) * 1000 + i
}

fn stats(root: &Path, mnt: &Path) -> serde_json::Value {
    serde_json::from_str(&strata_ok(
        root,
        &["stats", "--json", &mnt.to_string_lossy()],
    ))
    .unwrap()
}

/// Bytes of every file on disk under the store's chunk cache (its packs).
fn cache_on_disk(root: &Path) -> u64 {
    let Ok(entries) = fs::read_dir(root.join("cache/packs")) else {
        return 0;
    };
    entries
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum()
}

#[test]
fn one_daemon_serves_concurrent_mounts_with_one_cache_and_restores_them() {
    let tmp = scratch("daemon").unwrap();
    let reg = TestRegistry::start(&tmp.join("registry"), None).unwrap();
    let a = remote_image(&tmp, &reg, "test/a:v1", "a", 6);
    let b = remote_image(&tmp, &reg, "test/b:v1", "b", 6);
    let root = tmp.join("node");
    // A 3 MiB cap for 12 MiB of distinct data read by three mounts at once.
    let cap = 3 * MIB as u64;
    let daemon = Daemon::start(&root, &["--cache-size", "3M"]);
    let mnts: Vec<PathBuf> = (1..=3).map(|i| tmp.join(format!("m{i}"))).collect();
    let images = [&a, &a, &b];
    let mut mounted = Vec::new();
    for (m, image) in mnts.iter().zip(images) {
        mounted.push(Mounted::with_args(&root, image, m, &["--no-prefetch"]).unwrap());
    }
    // Every mount is served by the same process.
    let pids: Vec<u64> = mnts
        .iter()
        .map(|m| stats(&root, m)["pid"].as_u64().unwrap())
        .collect();
    assert!(
        pids.iter().all(|p| *p == u64::from(daemon.child.id())),
        "{pids:?}"
    );

    // Parallel readers on all three mounts while the cache size is sampled.
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (done, root) = (done.clone(), root.clone());
        std::thread::spawn(move || {
            let mut peak = 0;
            let deadline = Instant::now() + Duration::from_secs(120);
            while !done.load(Ordering::Relaxed) && Instant::now() < deadline {
                peak = peak.max(cache_on_disk(&root));
                std::thread::yield_now();
            }
            peak
        })
    };
    let readers: Vec<_> = mnts
        .iter()
        .zip(["a", "a", "b"])
        .flat_map(|(m, prefix)| {
            // Two readers per mount, on different halves.
            (0..2u64).map(move |half| (m.clone(), prefix, half))
        })
        .map(|(m, prefix, half)| {
            std::thread::spawn(move || {
                for i in (half * 3)..(half * 3 + 3) {
                    let got = fs::read(m.join(format!("{prefix}{i}"))).unwrap();
                    assert!(got == noise(seed(prefix, i), MIB), "{prefix}{i} differs");
                }
            })
        })
        .collect();
    let n_readers = readers.len() as u64;
    for r in readers {
        r.join().unwrap();
    }
    done.store(true, Ordering::Relaxed);
    let peak = sampler.join().unwrap();
    assert!(
        peak <= cap + n_readers * MIB as u64,
        "cache peaked at {peak} bytes, cap {cap} + {n_readers} chunks"
    );
    assert!(cache_on_disk(&root) <= cap, "{}", cache_on_disk(&root));
    let node: serde_json::Value =
        serde_json::from_str(&strata_ok(&root, &["cache", "stats", "--json"])).unwrap();
    assert!(node["bytes"].as_u64().unwrap() <= cap, "{node}");

    // Unmounting one leaves the others serving.
    let m2 = mounted.remove(1);
    m2.unmount().unwrap();
    assert!(!is_mounted(&mnts[1]));
    assert_eq!(
        fs::read(mnts[0].join("a5")).unwrap(),
        noise(seed("a", 5), MIB)
    );
    assert_eq!(
        fs::read(mnts[2].join("b0")).unwrap(),
        noise(seed("b", 0), MIB)
    );
    let listed: Vec<serde_json::Value> =
        serde_json::from_str(&strata_ok(&root, &["mounts", "--json"])).unwrap();
    assert_eq!(listed.len(), 2, "{listed:?}");

    // A stopped daemon unmounts everything; the next one mounts the same again.
    daemon.stop();
    assert!(!is_mounted(&mnts[0]) && !is_mounted(&mnts[2]));
    let daemon = Daemon::start(&root, &["--cache-size", "3M"]);
    assert!(is_mounted(&mnts[0]) && is_mounted(&mnts[2]) && !is_mounted(&mnts[1]));
    assert_eq!(
        fs::read(mnts[0].join("a1")).unwrap(),
        noise(seed("a", 1), MIB)
    );
    assert_eq!(
        fs::read(mnts[2].join("b4")).unwrap(),
        noise(seed("b", 4), MIB)
    );

    // After a crash (SIGKILL) the mounts are dead; the next daemon detaches and restores them.
    let mut daemon = daemon;
    daemon.child.kill().unwrap();
    daemon.child.wait().unwrap();
    assert!(fs::read(mnts[0].join("a2")).is_err());
    let daemon = Daemon::start(&root, &["--cache-size", "3M"]);
    assert_eq!(
        fs::read(mnts[0].join("a2")).unwrap(),
        noise(seed("a", 2), MIB)
    );
    assert_eq!(
        fs::read(mnts[2].join("b2")).unwrap(),
        noise(seed("b", 2), MIB)
    );
    for m in [&mnts[0], &mnts[2]] {
        strata_ok(&root, &["umount", &m.to_string_lossy()]);
    }
    daemon.stop();
    drop(mounted);
    fs::remove_dir_all(&tmp).ok();
}

fn as_nobody(args: &[&str]) -> std::process::Output {
    Command::new("runuser")
        .args(["-u", "nobody", "--"])
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn other_users_reach_neither_store_caches_nor_socket() {
    let tmp = scratch("daemon-users").unwrap();
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755)).unwrap();
    let mut l = LayerBuilder::new();
    l.dir(".", 0o755)
        .unwrap()
        .file("public", 0o644, b"everyone may read this\n")
        .unwrap()
        .file("secret", 0o600, b"root only\n")
        .unwrap()
        .dir("private", 0o700)
        .unwrap()
        .file("private/inside", 0o644, b"behind a 0700 directory\n")
        .unwrap();
    let root = tmp.join("store");
    convert_one_layer(
        &tmp.join("src"),
        &root,
        l.finish().unwrap(),
        Compression::Gzip,
        "test/users:v1",
    );
    let mnt = tmp.join("mnt");
    let m = Mounted::with_args(&root, "test/users:v1", &mnt, &["--cache-local"]).unwrap();
    // Root reads everything, so the chunks land in the disk cache.
    for f in ["public", "secret", "private/inside"] {
        fs::read(mnt.join(f)).unwrap();
    }
    let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&root), 0o700);
    assert_eq!(mode(&root.join("daemon.sock")), 0o600);
    assert_eq!(mode(&root.join("cache/packs")), 0o700);
    let chunk = fs::read_dir(root.join("cache/packs"))
        .unwrap()
        .flatten()
        .next()
        .expect("a pack of cached chunks")
        .path();
    assert_eq!(mode(&chunk), 0o600);
    let blob = fs::read_dir(root.join("blobs/sha256"))
        .unwrap()
        .flatten()
        .next()
        .unwrap()
        .path();

    // Through no path of the store: listing, blobs, cached chunks, the socket.
    let denied = |args: &[&str]| {
        let out = as_nobody(args);
        assert!(
            !out.status.success(),
            "nobody could run {args:?}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    };
    denied(&["ls", &root.to_string_lossy()]);
    denied(&["cat", &blob.to_string_lossy()]);
    denied(&["cat", &chunk.to_string_lossy()]);
    let bin = strata_bin();
    let out = as_nobody(&[
        &bin.to_string_lossy(),
        "--root",
        &root.to_string_lossy(),
        "stats",
        &mnt.to_string_lossy(),
    ]);
    assert!(!out.status.success());

    // Through the mount: exactly what the image's permissions allow.
    let out = as_nobody(&["cat", &mnt.join("public").to_string_lossy()]);
    assert!(out.status.success());
    assert_eq!(out.stdout, b"everyone may read this\n");
    denied(&["cat", &mnt.join("secret").to_string_lossy()]);
    denied(&["cat", &mnt.join("private/inside").to_string_lossy()]);
    denied(&["ls", &mnt.join("private").to_string_lossy()]);
    m.unmount().unwrap();
    fs::remove_dir_all(&tmp).ok();
}

#[test]
fn a_full_store_disk_serves_from_the_registry_and_caching_resumes() {
    let tmp = scratch("daemon-full").unwrap();
    let reg = TestRegistry::start(&tmp.join("registry"), None).unwrap();
    let image = remote_image(&tmp, &reg, "test/full:v1", "f", 8);
    let small = tmp.join("small");
    fs::create_dir_all(&small).unwrap();
    strata_tests::util::run(Command::new("mount").args([
        "-t",
        "tmpfs",
        "-o",
        "size=24m",
        "strata-test",
        &small.to_string_lossy(),
    ]))
    .unwrap();
    let root = small.join("store");
    let mnt = tmp.join("mnt");
    let m = Mounted::with_args(&root, &image, &mnt, &["--no-prefetch"]).unwrap();
    // Fill the filesystem to the last byte.
    let filler = small.join("filler");
    let _ = Command::new("dd")
        .args(["if=/dev/zero", "bs=1M", &format!("of={}", filler.display())])
        .stderr(Stdio::null())
        .status();
    let df = nix::sys::statvfs::statvfs(&small).unwrap();
    assert_eq!(
        df.blocks_available(),
        0,
        "the store's filesystem is not full"
    );
    for i in 0..4 {
        assert_eq!(
            fs::read(mnt.join(format!("f{i}"))).unwrap(),
            noise(seed("f", i), MIB)
        );
    }
    let s = stats(&root, &mnt);
    assert!(s["fetch"]["source_chunks"].as_u64().unwrap() >= 4, "{s}");
    let cached_while_full = s["disk_cache"]["bytes"].as_u64().unwrap();
    // Space returns: new chunks are cached again.
    fs::remove_file(&filler).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut i = 4;
    loop {
        assert_eq!(
            fs::read(mnt.join(format!("f{i}"))).unwrap(),
            noise(seed("f", i), MIB)
        );
        let s = stats(&root, &mnt);
        if s["disk_cache"]["bytes"].as_u64().unwrap() > cached_while_full {
            break;
        }
        i += 1;
        assert!(
            i < 8 && Instant::now() < deadline,
            "caching did not resume: {s}"
        );
        // The cache pauses writes for a second after a full disk; wait for the next read to
        // be after it (a time condition, not a guess at how long a fetch takes).
        std::thread::sleep(Duration::from_millis(1100));
    }
    m.unmount().unwrap();
    strata_ok(&root, &["daemon", "--stop"]);
    strata_tests::util::run(Command::new("umount").arg(&small)).unwrap();
    fs::remove_dir_all(&tmp).ok();
}

#[test]
fn lookups_answer_while_readers_wait_on_a_stalled_registry() {
    let tmp = scratch("daemon-stall").unwrap();
    let reg = TestRegistry::start(&tmp.join("registry"), None).unwrap();
    let mut l = LayerBuilder::new();
    l.dir(".", 0o755).unwrap().dir("d", 0o755).unwrap();
    for i in 0..12u64 {
        l.file(&format!("d/s{i}"), 0o644, &noise(7000 + i, MIB))
            .unwrap();
    }
    publish_layer(&tmp, &reg.addr, l.finish().unwrap(), "t/s:v1");
    let proxy = FaultProxy::start(&reg.addr).unwrap();
    let root = tmp.join("node");
    let mnt = tmp.join("mnt");
    let m = Mounted::with_args(
        &root,
        &format!("{}/t/s:v1", proxy.addr),
        &mnt,
        &[
            "--no-prefetch",
            "--registry-timeout",
            "3",
            "--registry-attempts",
            "1",
            "--threads",
            "2",
        ],
    )
    .unwrap();
    let names: Vec<String> = fs::read_dir(mnt.join("d"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 12);
    proxy.set(Fault::Hang, None, "Range:");
    // More readers than FUSE worker threads, all waiting on the silent registry.
    let readers: Vec<_> = (0..8)
        .map(|i| {
            let p = mnt.join(format!("d/s{i}"));
            std::thread::spawn(move || fs::read(p).is_err())
        })
        .collect();
    // Until they fail, lookups of listed entries and listings answer at once.
    let start = Instant::now();
    for n in &names {
        fs::metadata(mnt.join("d").join(n)).unwrap();
    }
    assert_eq!(fs::read_dir(mnt.join("d")).unwrap().count(), 12);
    fs::symlink_metadata(mnt.join("d/s11")).unwrap();
    let took = start.elapsed();
    assert!(took < Duration::from_millis(500), "lookups took {took:?}");
    for r in readers {
        assert!(
            r.join().unwrap(),
            "a read succeeded through a silent registry"
        );
    }
    proxy.clear();
    assert_eq!(fs::read(mnt.join("d/s0")).unwrap(), noise(7000, MIB));
    m.unmount().unwrap();
    fs::remove_dir_all(&tmp).ok();
}

#[test]
fn unmount_touches_only_strata_mounts_and_never_waits_on_busy_ones() {
    let tmp = scratch("daemon-umount").unwrap();
    let mut l = LayerBuilder::new();
    l.dir(".", 0o755)
        .unwrap()
        .file("f", 0o644, b"hello\n")
        .unwrap();
    let root = tmp.join("store");
    convert_one_layer(
        &tmp.join("src"),
        &root,
        l.finish().unwrap(),
        Compression::Gzip,
        "u/x:v1",
    );

    // Not a strata mount: refused, whether a daemon runs or not.
    let other = tmp.join("tmpfs");
    fs::create_dir_all(&other).unwrap();
    strata_tests::util::run(Command::new("mount").args([
        "-t",
        "tmpfs",
        "t",
        &other.to_string_lossy(),
    ]))
    .unwrap();
    let out = strata(&root, &["umount", &other.to_string_lossy()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a strata mount"));
    assert!(is_mounted(&other));
    // Nor is anything mounted on top of another filesystem.
    let out = strata(&root, &["mount", "u/x:v1", &other.to_string_lossy()]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("already mounted"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let m2 = Mounted::new(&root, "u/x:v1", &tmp.join("ok")).unwrap();
    let out = strata(&root, &["umount", &other.to_string_lossy()]);
    assert!(!out.status.success());
    assert!(is_mounted(&other));
    strata_tests::util::run(Command::new("umount").arg(&other)).unwrap();

    // A lazy unmount of a busy mount returns at once; the mount point is free again.
    let mnt = tmp.join("busy");
    let m = Mounted::new(&root, "u/x:v1", &mnt).unwrap();
    let held = fs::File::open(mnt.join("f")).unwrap();
    let start = Instant::now();
    strata_ok(&root, &["umount", "-l", &mnt.to_string_lossy()]);
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    assert!(!is_mounted(&mnt));
    let again = Mounted::new(&root, "u/x:v1", &mnt).unwrap();
    assert_eq!(fs::read(mnt.join("f")).unwrap(), b"hello\n");
    drop(held);
    drop(m);
    again.unmount().unwrap();
    m2.unmount().unwrap();

    // A store root another user owns is refused (it could be swapped under a root daemon).
    let foreign = tmp.join("foreign");
    fs::create_dir_all(&foreign).unwrap();
    nix::unistd::chown(&foreign, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
    let out = strata(&foreign, &["images"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("owned by uid 65534"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    strata_ok(&root, &["daemon", "--stop"]);
    fs::remove_dir_all(&tmp).ok();
}
