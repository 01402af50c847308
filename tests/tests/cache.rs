#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failure should abort loudly
//! The node's disk cache of verified chunks: a remounted image reads nothing from its layer blobs
//! again, the size cap holds under a workload larger than the cap, and `cache gc` trims it.

use std::fs;
use std::path::Path;

use strata_tests::image::{noise, scratch, Compression, LayerBuilder};
use strata_tests::util::{convert_one_layer, is_mounted, strata, strata_ok};

/// Mounts with `extra` flags (through a daemon of its own: the one before is stopped), reads
/// `files`, unmounts; returns the mount's counters.
fn mount_read(root: &Path, mnt: &Path, extra: &[&str], files: &[&str]) -> serde_json::Value {
    strata_ok(root, &["daemon", "--stop"]);
    fs::create_dir_all(mnt).unwrap();
    let m = mnt.display().to_string();
    // Layers here are local, so ask for them to be cached (remote layers always are).
    let mut args = vec!["mount", "cache/test:v1", m.as_str(), "--cache-local"];
    args.extend_from_slice(extra);
    strata_ok(root, &args);
    for f in files {
        let data = fs::read(mnt.join(f)).unwrap();
        assert_eq!(data, noise(f.len() as u64, data.len()), "{f}");
    }
    let stats = serde_json::from_str(&strata_ok(root, &["stats", "--json", &m])).unwrap();
    strata_ok(root, &["umount", &m]);
    assert!(!is_mounted(mnt));
    stats
}

fn field(stats: &serde_json::Value, name: &str) -> u64 {
    stats["fetch"][name]
        .as_u64()
        .unwrap_or_else(|| panic!("{name} in {stats}"))
}

fn cache_bytes(root: &Path) -> u64 {
    let v: serde_json::Value =
        serde_json::from_str(&strata_ok(root, &["cache", "stats", "--json"])).unwrap();
    v["bytes"].as_u64().unwrap()
}

#[test]
fn disk_cache_survives_remount_and_honours_its_cap() {
    let tmp = scratch("cache").unwrap();
    let mut l = LayerBuilder::new();
    // File names double as noise seeds (by length) so contents can be checked.
    l.file("a", 0o644, &noise(1, 3 << 20)).unwrap();
    l.file("bbbbbbbb", 0o644, &noise(8, 8 << 20)).unwrap();
    let root = tmp.join("store");
    convert_one_layer(
        &tmp,
        &root,
        l.finish().unwrap(),
        Compression::Gzip,
        "cache/test:v1",
    );
    let mnt = tmp.join("mnt");

    let first = mount_read(&root, &mnt, &[], &["a"]);
    assert!(field(&first, "source_chunks") >= 3, "{first}");
    // Three 1 MiB chunks, plus the packs' headers.
    let first_bytes = cache_bytes(&root);
    assert!(
        (3 << 20..(3 << 20) + 4096).contains(&first_bytes),
        "{first_bytes}"
    );

    // A new daemon reads the same chunks from the disk cache: nothing from the blob.
    let second = mount_read(&root, &mnt, &[], &["a"]);
    assert_eq!(field(&second, "source_chunks"), 0, "{second}");
    assert!(field(&second, "disk_hits") >= 3, "{second}");

    // Reading 11 MiB through a 4 MiB cache never leaves more than 4 MiB cached.
    let capped = mount_read(&root, &mnt, &["--cache-size", "4M"], &["a", "bbbbbbbb"]);
    assert!(field(&capped, "source_chunks") >= 8, "{capped}");
    assert!(
        cache_bytes(&root) <= 4 << 20,
        "cache holds {} bytes",
        cache_bytes(&root)
    );

    // A damaged cache file is dropped and the chunk refetched, never served.
    let victim = fs::read_dir(root.join("cache/packs"))
        .unwrap()
        .flatten()
        .next()
        .unwrap()
        .path();
    let mut bytes = fs::read(&victim).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    fs::write(&victim, &bytes).unwrap();
    let after = mount_read(&root, &mnt, &["--cache-size", "4M"], &["a", "bbbbbbbb"]);
    assert!(field(&after, "failures") == 0, "{after}");

    strata_ok(&root, &["daemon", "--stop"]);
    let out = strata(&root, &["cache", "gc", "--max-size", "0"]);
    assert!(out.status.success());
    assert_eq!(cache_bytes(&root), 0);
    fs::remove_dir_all(&tmp).ok();
}
