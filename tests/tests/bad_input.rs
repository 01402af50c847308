#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failure should abort loudly
//! Bad input gets a clear error, never a panic, and never touches host files: truncated and
//! corrupt blobs, hostile tar paths, symlink escapes, tampered TOCs.

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use strata_fs::store::Store;
use strata_tests::image::{noise, scratch, write_oci_layout, Compression, Layer, LayerBuilder};
use strata_tests::util::{is_mounted, strata, strata_ok, Mounted};

fn image_with(tmp: &Path, name: &str, layers: Vec<Layer>) -> PathBuf {
    let dir = tmp.join(name);
    write_oci_layout(&dir, "v1", &layers).unwrap();
    dir
}

fn simple_layer() -> Layer {
    let mut l = LayerBuilder::new();
    l.dir("etc", 0o755)
        .unwrap()
        .file("etc/passwd", 0o644, b"root:x:0:0::/root:/bin/sh\n")
        .unwrap()
        .file("big", 0o755, &noise(9, 3 << 20))
        .unwrap();
    Layer {
        tar: l.finish().unwrap(),
        compression: Compression::Gzip,
    }
}

/// Asserts that strata failed cleanly with a message containing `needle`.
fn assert_clean_failure(out: &std::process::Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "expected failure, got success: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "strata panicked: {stderr}");
    assert!(
        stderr.contains(needle),
        "error should mention {needle:?}: {stderr}"
    );
}

fn tmp_is_empty(root: &Path) -> bool {
    fs::read_dir(root.join("tmp"))
        .map(|d| d.count() == 0)
        .unwrap_or(true)
}

fn layer_blob(root: &Path, image: &str, index: usize) -> PathBuf {
    let store = Store::open(root).unwrap();
    let rec = store.resolve(image).unwrap();
    let m = store.manifest(&rec.descriptor.digest).unwrap();
    store.blob_path(&m.layers[index].digest).unwrap()
}

#[test]
fn truncated_source_layer_is_refused() {
    let tmp = scratch("truncated-src").unwrap();
    let src = image_with(&tmp, "src", vec![simple_layer()]);
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(src.join("index.json")).unwrap()).unwrap();
    let mdigest = index["manifests"][0]["digest"].as_str().unwrap();
    let manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(src.join("blobs/sha256").join(&mdigest[7..])).unwrap())
            .unwrap();
    let ldigest = manifest["layers"][0]["digest"].as_str().unwrap();
    let blob = src.join("blobs/sha256").join(&ldigest[7..]);
    let data = fs::read(&blob).unwrap();
    fs::write(&blob, &data[..data.len() / 2]).unwrap();

    let root = tmp.join("store");
    let out = strata(
        &root,
        &[
            "convert",
            &format!("oci:{}:v1", src.display()),
            "bad/truncated:v1",
        ],
    );
    assert_clean_failure(&out, "layer 1 of 1");
    assert!(
        tmp_is_empty(&root),
        "a failed convert must leave no temp files"
    );
    assert!(Store::open(&root).unwrap().images().unwrap().is_empty());
    fs::remove_dir_all(&tmp).ok();
}

#[test]
fn hostile_paths_are_refused_and_host_untouched() {
    let tmp = scratch("hostile").unwrap();
    // A short sentinel path outside the test dir (a tar name field holds 100 bytes).
    let escape = std::env::temp_dir().join(format!("strata-esc-{}", std::process::id()));
    let _ = fs::remove_dir_all(&escape);
    // `../` climbs from any extraction root up to `/`, then back down to the sentinel.
    let target = escape.join("x").display().to_string();
    let hostile = format!("{}{}", "../".repeat(12), target.trim_start_matches('/'));
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("dotdot", {
            let mut l = LayerBuilder::new();
            l.raw_entry(hostile.as_bytes(), tar::EntryType::Regular, None, b"evil")
                .unwrap();
            l.finish().unwrap()
        }),
        ("hardlink-out", {
            let mut l = LayerBuilder::new();
            l.raw_entry(
                b"passwd",
                tar::EntryType::Link,
                Some("../../etc/passwd"),
                b"",
            )
            .unwrap();
            l.finish().unwrap()
        }),
    ];
    let root = tmp.join("store");
    for (name, tar) in cases {
        let src = image_with(
            &tmp,
            name,
            vec![Layer {
                tar,
                compression: Compression::None,
            }],
        );
        let out = strata(
            &root,
            &[
                "convert",
                &format!("oci:{}:v1", src.display()),
                &format!("bad/{name}:v1"),
            ],
        );
        assert_clean_failure(&out, "refusing layer entry");
        assert!(!escape.exists(), "{name}: host path was created");
    }
    assert!(tmp_is_empty(&root));

    // An absolute symlink is fine as a symlink, but a later entry through it is refused at
    // mount time: paths never follow symlinks, so nothing can land outside the image.
    fs::create_dir_all(&escape).unwrap();
    let mut l1 = LayerBuilder::new();
    l1.symlink("abs", "/etc/passwd")
        .unwrap()
        .symlink("evil", &escape.display().to_string())
        .unwrap();
    let mut l2 = LayerBuilder::new();
    l2.file("evil/x", 0o644, b"through the symlink").unwrap();
    let ok = image_with(
        &tmp,
        "abs-ok",
        vec![Layer {
            tar: l1.finish().unwrap(),
            compression: Compression::Gzip,
        }],
    );
    strata_ok(
        &root,
        &[
            "convert",
            &format!("oci:{}:v1", ok.display()),
            "bad/abs-ok:v1",
        ],
    );
    let m = Mounted::new(&root, "bad/abs-ok:v1", &tmp.join("mnt")).unwrap();
    assert_eq!(
        fs::read_link(m.dir.join("abs")).unwrap(),
        Path::new("/etc/passwd")
    );
    m.unmount().unwrap();

    let mut l1 = LayerBuilder::new();
    l1.symlink("evil", &escape.display().to_string()).unwrap();
    let src = image_with(
        &tmp,
        "abs-escape",
        vec![
            Layer {
                tar: l1.finish().unwrap(),
                compression: Compression::Gzip,
            },
            Layer {
                tar: l2.finish().unwrap(),
                compression: Compression::Gzip,
            },
        ],
    );
    // convert refuses what mount would refuse, so no such image is ever made.
    let out = strata(
        &root,
        &[
            "convert",
            &format!("oci:{}:v1", src.display()),
            "bad/escape:v1",
        ],
    );
    assert_clean_failure(&out, "not a directory");
    assert!(!strata_ok(&root, &["images"]).contains("bad/escape"));
    fs::create_dir_all(tmp.join("mnt2")).unwrap();
    let out = strata(
        &root,
        &[
            "mount",
            "bad/escape:v1",
            &tmp.join("mnt2").display().to_string(),
        ],
    );
    assert!(!out.status.success());
    assert!(!is_mounted(&tmp.join("mnt2")));
    assert!(
        !escape.join("x").exists(),
        "host file written through a symlink"
    );
    fs::remove_dir_all(&tmp).ok();
}

#[test]
fn corrupt_chunk_gives_eio_for_that_read_only() {
    let tmp = scratch("corrupt-chunk").unwrap();
    let src = image_with(&tmp, "src", vec![simple_layer()]);
    let root = tmp.join("store");
    strata_ok(
        &root,
        &[
            "convert",
            &format!("oci:{}:v1", src.display()),
            "bad/chunk:v1",
        ],
    );
    // Flip one byte in the middle of the second chunk of `big`.
    let store = Store::open(&root).unwrap();
    let image = strata_fs::image::open_local(&store, "bad/chunk:v1").unwrap();
    let big = image.layers[0]
        .toc
        .entries
        .iter()
        .find(|e| e.path == b"big")
        .unwrap();
    let c = big.chunks[1];
    let blob = layer_blob(&root, "bad/chunk:v1", 0);
    let f = fs::OpenOptions::new()
        .write(true)
        .read(true)
        .open(&blob)
        .unwrap();
    let mut b = [0u8; 1];
    let at = c.compressed_offset + u64::from(c.compressed_len) / 2;
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 0x5a], at).unwrap();
    drop(f);

    let m = Mounted::new(&root, "bad/chunk:v1", &tmp.join("mnt")).unwrap();
    for _ in 0..2 {
        let err = fs::read(m.dir.join("big")).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc_eio()), "{err}");
    }
    // The first chunk (before the damage) and other files still read.
    let f = fs::File::open(m.dir.join("big")).unwrap();
    let mut head = vec![0u8; 4096];
    f.read_exact_at(&mut head, 0).unwrap();
    assert_eq!(head, noise(9, 4096));
    drop(f);
    assert_eq!(
        fs::read(m.dir.join("etc/passwd")).unwrap(),
        b"root:x:0:0::/root:/bin/sh\n"
    );
    m.unmount().unwrap();
    fs::remove_dir_all(&tmp).ok();
}

fn libc_eio() -> i32 {
    5
}

#[test]
fn truncated_or_tampered_strata_blob_fails_to_mount() {
    let tmp = scratch("bad-blob").unwrap();
    let src = image_with(&tmp, "src", vec![simple_layer()]);
    let root = tmp.join("store");
    let mnt = tmp.join("mnt");
    fs::create_dir_all(&mnt).unwrap();
    strata_ok(
        &root,
        &[
            "convert",
            &format!("oci:{}:v1", src.display()),
            "bad/blob:v1",
        ],
    );
    let blob = layer_blob(&root, "bad/blob:v1", 0);
    let good = fs::read(&blob).unwrap();

    // Tampered TOC: the manifest's TOC digest no longer matches.
    let store = Store::open(&root).unwrap();
    let m = store
        .manifest(&store.resolve("bad/blob:v1").unwrap().descriptor.digest)
        .unwrap();
    let toc_offset: usize = m.layers[0].annotations["dev.strata.toc.offset"]
        .parse()
        .unwrap();
    let mut tampered = good.clone();
    tampered[toc_offset + 40] ^= 1;
    fs::write(&blob, &tampered).unwrap();
    let out = strata(&root, &["mount", "bad/blob:v1", &mnt.display().to_string()]);
    assert_clean_failure(&out, "TOC digest mismatch");

    // Truncated: the footer is gone.
    fs::write(&blob, &good[..good.len() - 100]).unwrap();
    let out = strata(&root, &["mount", "bad/blob:v1", &mnt.display().to_string()]);
    assert_clean_failure(&out, "bad/blob:v1");
    assert!(!is_mounted(&mnt));

    // Unknown images and missing mount points are plain errors too.
    // An image that is neither local nor reachable (nothing listens on port 1; tests never
    // reach beyond loopback).
    let out = strata(
        &root,
        &[
            "mount",
            "127.0.0.1:1/no/such:image",
            &mnt.display().to_string(),
        ],
    );
    assert_clean_failure(&out, "127.0.0.1:1/no/such:image");
    let out = strata(&root, &["mount", "bad/blob:v1", "/nonexistent/strata-mnt"]);
    assert_clean_failure(&out, "mount point");
    assert_eq!(
        fs::read_dir(&mnt).unwrap().count(),
        0,
        "a failed mount leaves the directory as it was"
    );
    fs::remove_dir_all(&tmp).ok();
}
