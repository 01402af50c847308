#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failure should abort loudly
//! `strata mount --passthrough`: large files are written out whole once and then served by the
//! kernel from that copy, with the same bytes, while the daemon serves nothing for them; an inode
//! open through the page cache keeps working while its copy appears; a damaged copy is not used.

use std::fs;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::time::{Duration, Instant};

use strata_tests::image::{gnu_sparse_layer, noise, scratch, text, Compression, LayerBuilder};
use strata_tests::util::{convert_one_layer, strata_ok, Mounted};

fn stats(root: &Path, mnt: &Path) -> serde_json::Value {
    serde_json::from_str(&strata_ok(
        root,
        &["stats", "--json", &mnt.to_string_lossy()],
    ))
    .unwrap()
}

/// Chunks the daemon has served (from any source) so far.
fn served(v: &serde_json::Value) -> u64 {
    let f = &v["fetch"];
    ["memory_hits", "disk_hits", "source_chunks"]
        .iter()
        .map(|k| f[*k].as_u64().unwrap())
        .sum()
}

fn file_cache(v: &serde_json::Value, key: &str) -> u64 {
    v["file_cache"][key].as_u64().unwrap()
}

/// Waits until the mount has written `n` files for passthrough.
fn wait_written(root: &Path, mnt: &Path, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        // The stats file is refreshed every 100 ms.
        let v = stats(root, mnt);
        if file_cache(&v, "inserted") >= n {
            return;
        }
        assert!(Instant::now() < deadline, "files not written: {v}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn settle(root: &Path, mnt: &Path) -> serde_json::Value {
    std::thread::sleep(Duration::from_millis(300));
    stats(root, mnt)
}

#[test]
fn large_files_are_served_by_the_kernel_from_a_verified_copy() {
    let tmp = scratch("passthrough").unwrap();
    let big = text(1, (5 << 20) + 12345); // compressible, not chunk-aligned
    let other = noise(2, 3 << 20);
    let mut l = LayerBuilder::new();
    l.dir("d", 0o755).unwrap();
    l.file("d/big", 0o644, &big).unwrap();
    l.hardlink("d/big-link", "d/big").unwrap();
    l.file("other", 0o600, &other).unwrap();
    l.file("twin", 0o644, &big).unwrap();
    l.file("small", 0o644, b"small file\n").unwrap();
    let root = tmp.join("store");
    convert_one_layer(
        &tmp,
        &root,
        l.finish().unwrap(),
        Compression::Zstd,
        "pt/test:v1",
    );
    let mnt = tmp.join("mnt");
    let m = Mounted::with_args(&root, "pt/test:v1", &mnt, &["--passthrough"]).unwrap();

    // Small files are served as always (every open now reaches the daemon).
    assert_eq!(fs::read(mnt.join("small")).unwrap(), b"small file\n");
    assert!(fs::OpenOptions::new()
        .write(true)
        .open(mnt.join("small"))
        .is_err());

    // First open of a large file: served through the daemon, and what it reads goes into the
    // file's copy; the copy is finished only once the file is closed.
    let first = fs::File::open(mnt.join("d/big")).unwrap();
    let mut buf = vec![0u8; 4096];
    first.read_exact_at(&mut buf, 1 << 20).unwrap();
    assert_eq!(buf, big[1 << 20..(1 << 20) + 4096]);
    // The inode is open through the page cache: another open of it (here by its hard link)
    // keeps that mode (the kernel refuses a passthrough open now) and reads correctly.
    assert_eq!(fs::read(mnt.join("d/big-link")).unwrap(), big);
    assert_eq!(file_cache(&settle(&root, &mnt), "inserted"), 0);
    drop(first);
    wait_written(&root, &mnt, 1);
    // A file with the same content (another inode) uses that copy at once.
    let before = settle(&root, &mnt);
    assert_eq!(fs::read(mnt.join("twin")).unwrap(), big);
    let after = settle(&root, &mnt);
    assert_eq!(
        served(&before),
        served(&after),
        "daemon served chunks: {after}"
    );
    assert_eq!(file_cache(&after, "hits"), file_cache(&before, "hits") + 1);

    // "other" is opened but not read: its copy is written in the background all the same.
    drop(fs::File::open(mnt.join("other")).unwrap());
    wait_written(&root, &mnt, 2);
    let before = settle(&root, &mnt);
    // Read for the first time now, in full and at scattered offsets across chunk edges: the
    // bytes are right and the daemon serves none of them.
    assert_eq!(fs::read(mnt.join("other")).unwrap(), other);
    let f = fs::File::open(mnt.join("other")).unwrap();
    for at in [0usize, (1 << 20) - 7, (2 << 20) + 100, other.len() - 10] {
        let mut b = vec![0u8; 10];
        f.read_exact_at(&mut b, at as u64).unwrap();
        assert_eq!(b, other[at..at + 10], "at {at}");
    }
    drop(f);
    let after = settle(&root, &mnt);
    assert_eq!(
        served(&before),
        served(&after),
        "daemon served chunks: {after}"
    );
    assert!(file_cache(&after, "hits") > file_cache(&before, "hits"));
    let opens = |v: &serde_json::Value| v["passthrough_opens"].as_u64().unwrap();
    assert_eq!(opens(&after), opens(&before) + 2, "{after}"); // the full read, then `f`

    // The big file too, once nothing holds it open through the page cache.
    assert_eq!(fs::read(mnt.join("d/big")).unwrap(), big);
    m.unmount().unwrap();
    // A new daemon (its file cache counters start at zero).
    strata_ok(&root, &["daemon", "--stop"]);

    // A copy of the wrong size (damaged) is never handed to the kernel: the file is read
    // through the daemon from verified chunks instead.
    let files = root.join("cache/files");
    let mut damaged = 0;
    for shard in fs::read_dir(&files).unwrap().flatten() {
        if shard.file_name() == "tmp" {
            continue;
        }
        for e in fs::read_dir(shard.path()).unwrap().flatten() {
            let f = fs::OpenOptions::new().write(true).open(e.path()).unwrap();
            f.set_len(f.metadata().unwrap().len() - 1).unwrap();
            damaged += 1;
        }
    }
    assert_eq!(damaged, 2); // big (and twin, the same content) and other
    let m = Mounted::with_args(&root, "pt/test:v1", &mnt, &["--passthrough"]).unwrap();
    assert_eq!(fs::read(mnt.join("other")).unwrap(), other);
    assert_eq!(fs::read(mnt.join("d/big")).unwrap(), big);
    let v = settle(&root, &mnt);
    assert_eq!(file_cache(&v, "hits"), 0, "{v}");
    assert_eq!(file_cache(&v, "corrupt"), 2, "{v}");
    assert!(served(&v) > 0);
    m.unmount().unwrap();
}

/// A sparse file's copy keeps its holes, and reads through passthrough return its bytes.
#[test]
fn sparse_files_keep_their_holes_in_the_copy() {
    let tmp = scratch("passthrough-sparse").unwrap();
    let size = 64u64 << 20;
    let head = text(3, 100_000);
    let tail = noise(4, 5000);
    let tar = gnu_sparse_layer("sparse", size, &[(0, &head), (40 << 20, &tail)]).unwrap();
    let root = tmp.join("store");
    convert_one_layer(&tmp, &root, tar, Compression::Gzip, "pt/sparse:v1");
    let mnt = tmp.join("mnt");
    let m = Mounted::with_args(&root, "pt/sparse:v1", &mnt, &["--passthrough"]).unwrap();
    drop(fs::File::open(mnt.join("sparse")).unwrap());
    wait_written(&root, &mnt, 1);
    let data = fs::read(mnt.join("sparse")).unwrap();
    assert_eq!(data.len() as u64, size);
    assert_eq!(&data[..head.len()], &head[..]);
    assert_eq!(&data[40 << 20..(40 << 20) + tail.len()], &tail[..]);
    let zeros = |r: std::ops::Range<usize>| data[r].iter().all(|&b| b == 0);
    assert!(zeros(head.len()..40 << 20) && zeros((40 << 20) + tail.len()..data.len()));
    assert!(file_cache(&settle(&root, &mnt), "hits") >= 1);
    m.unmount().unwrap();
    // The copy on disk allocates about the data, not the 64 MiB.
    let copies: Vec<_> = fs::read_dir(root.join("cache/files"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name() != "tmp")
        .flat_map(|d| fs::read_dir(d.path()).unwrap().flatten())
        .collect();
    assert_eq!(copies.len(), 1);
    let md = copies[0].metadata().unwrap();
    assert_eq!(md.len(), size);
    assert!(
        md.blocks() * 512 < 8 << 20,
        "{} bytes allocated",
        md.blocks() * 512
    );
}
