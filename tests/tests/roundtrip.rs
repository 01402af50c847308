#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failure should abort loudly
//! The foundation round trip, as root with a real FUSE mount: a generated multi-layer image
//! converted and mounted equals, entry by entry, the tree `umoci unpack` makes of the source; and
//! the converted image is itself a valid OCI image that standard tools unpack to the same tree.

use std::path::Path;
use std::process::Command;

use strata_tests::image::{
    feature_layers, scratch, write_docker_archive, write_oci_layout, Compression, Layer,
};
use strata_tests::snapshot::{diff, snapshot, Snapshot, SnapshotOptions};
use strata_tests::util::{run, strata_ok, Mounted};

const SNAP: SnapshotOptions = SnapshotOptions { dir_mtimes: true };

fn umoci_unpack(layout: &Path, tag: &str, bundle: &Path) -> Snapshot {
    run(Command::new("umoci")
        .arg("unpack")
        .arg("--image")
        .arg(format!("{}:{tag}", layout.display()))
        .arg(bundle))
    .expect("umoci unpack");
    snapshot(&bundle.join("rootfs"), SNAP).expect("snapshot reference")
}

fn assert_same(want: &Snapshot, got: &Snapshot, what: &str) {
    let d = diff(want, got);
    assert!(
        d.is_empty(),
        "{what}: {} differences:\n{}",
        d.len(),
        d.join("\n")
    );
}

#[test]
fn converted_mount_equals_umoci_unpack() {
    let tmp = scratch("roundtrip").unwrap();
    let layers = feature_layers(10_000).unwrap();
    let src = tmp.join("src");
    write_oci_layout(&src, "v1", &layers).unwrap();
    let want = umoci_unpack(&src, "v1", &tmp.join("bundle"));
    // The fixture really has what the issue lists.
    for p in [
        &b"data/boundary"[..],
        b"data/empty",
        b"sparse-100M",
        b"data/caf\xe9-latin1",
        b"dev/null",
        b"dev/sda",
        b"run/initctl",
        b"usr/bin/ls",
        b"many/d09/f09999.txt",
        b"opq/new",
    ] {
        assert!(
            want.contains_key(p),
            "fixture lacks {}",
            String::from_utf8_lossy(p)
        );
    }
    assert!(!want.contains_key(&b"del/gone"[..]) && !want.contains_key(&b"opq/old-a"[..]));
    assert_eq!(want[&b"usr/bin/ls"[..]].links.len(), 3);
    let x = &want[&b"data/xattrs"[..]];
    assert_eq!(
        x.xattrs.get(&b"user.comment"[..]).map(Vec::as_slice),
        Some(&b"hello"[..])
    );
    assert_eq!(x.mtime, (1_700_000_123, 250_000_000));
    assert_eq!(want[&b"usr/bin/su"[..]].mode, 0o4755);
    assert_eq!(want[&b"tmp"[..]].mode, 0o1777);
    assert_eq!(
        (want[&b"data/owned"[..]].uid, want[&b"data/owned"[..]].gid),
        (1000, 1001)
    );
    assert!(want[&b"dev/null"[..]].rdev.is_some());

    let root = tmp.join("store");
    strata_ok(
        &root,
        &[
            "convert",
            &format!("oci:{}:v1", src.display()),
            "test/roundtrip:v1",
        ],
    );
    let m = Mounted::new(&root, "test/roundtrip:v1", &tmp.join("mnt")).unwrap();
    let got = snapshot(&m.dir, SNAP).unwrap();
    assert_same(&want, &got, "mount vs umoci unpack");
    m.unmount().unwrap();

    // The same image from a Docker archive and from zstd-compressed layers converts identically.
    let archive = tmp.join("image.tar");
    write_docker_archive(&archive, "v1", &layers).unwrap();
    strata_ok(
        &root,
        &[
            "convert",
            &format!("docker-archive:{}", archive.display()),
            "test/archive:v1",
        ],
    );
    let zstd_layers: Vec<Layer> = layers
        .iter()
        .map(|l| Layer {
            tar: l.tar.clone(),
            compression: Compression::Zstd,
        })
        .collect();
    let zsrc = tmp.join("src-zstd");
    write_oci_layout(&zsrc, "v1", &zstd_layers).unwrap();
    strata_ok(
        &root,
        &[
            "convert",
            &format!("oci:{}:v1", zsrc.display()),
            "test/zstd:v1",
        ],
    );
    for image in ["test/archive:v1", "test/zstd:v1"] {
        let m = Mounted::new(&root, image, &tmp.join("mnt2")).unwrap();
        let got = snapshot(&m.dir, SNAP).unwrap();
        assert_same(&want, &got, image);
        m.unmount().unwrap();
    }

    // Backward compatibility: skopeo copies the strata image out of the store (which is an OCI
    // layout) re-compressing its zstd layers to gzip with its own decoder, and umoci unpacks it.
    let out = tmp.join("exported");
    run(Command::new("skopeo")
        .args(["copy", "--dest-compress-format", "gzip"])
        .arg(format!(
            "oci:{}:docker.io/test/roundtrip:v1",
            root.display()
        ))
        .arg(format!("oci:{}:v1", out.display())))
    .expect("skopeo copy");
    let exported = umoci_unpack(&out, "v1", &tmp.join("bundle2"));
    assert_same(&want, &exported, "skopeo+umoci of the converted image");

    // The converted image keeps the source config (entrypoint, cmd, env, history) with the new
    // layers' diff IDs, and `images --json` lists it as a strata image.
    let src_config = write_oci_layout(&tmp.join("src-again"), "v1", &layers).unwrap();
    let inspected: serde_json::Value =
        serde_json::from_str(&strata_ok(&root, &["inspect", "test/roundtrip:v1"])).unwrap();
    let config = &inspected["config"];
    for key in ["Entrypoint", "Cmd", "Env", "WorkingDir"] {
        assert_eq!(config["config"][key], src_config["config"][key], "{key}");
    }
    assert_eq!(config["history"], src_config["history"]);
    let diff_ids = config["rootfs"]["diff_ids"].as_array().unwrap();
    assert_eq!(diff_ids.len(), 3);
    assert_ne!(
        config["rootfs"]["diff_ids"],
        src_config["rootfs"]["diff_ids"]
    );
    for (i, l) in inspected["layers"].as_array().unwrap().iter().enumerate() {
        let blob = std::fs::read(
            root.join("blobs/sha256")
                .join(&l["digest"].as_str().unwrap()[7..]),
        )
        .unwrap();
        let tar = zstd::stream::decode_all(&blob[..]).unwrap();
        assert_eq!(
            strata_tests::image::sha256(&tar),
            diff_ids[i].as_str().unwrap(),
            "diff ID of layer {i}"
        );
        assert!(l["toc"]["entries"].as_u64().unwrap() > 0);
    }
    let images: serde_json::Value =
        serde_json::from_str(&strata_ok(&root, &["images", "--json"])).unwrap();
    let listed = images
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["reference"] == "docker.io/test/roundtrip:v1")
        .expect("image listed");
    assert_eq!(listed["strata"], true);
    assert_eq!(listed["layers"], 3);

    // GNU tar reads every converted layer as tar+zstd.
    let manifest: serde_json::Value =
        serde_json::from_str(&strata_ok(&root, &["inspect", "test/roundtrip:v1"])).unwrap();
    for l in manifest["layers"].as_array().unwrap() {
        let digest = l["digest"].as_str().unwrap();
        let blob = root.join("blobs/sha256").join(&digest[7..]);
        run(Command::new("tar").arg("--zstd").arg("-tf").arg(&blob)).expect("tar --zstd -t");
        assert_eq!(
            l["mediaType"],
            "application/vnd.oci.image.layer.v1.tar+zstd"
        );
    }
    std::fs::remove_dir_all(&tmp).ok();
}

/// GNU sparse entries (which umoci cannot unpack) convert to the same bytes GNU tar extracts.
#[test]
fn gnu_sparse_layer_matches_gnu_tar() {
    let tmp = scratch("sparse").unwrap();
    let tar = strata_tests::image::gnu_sparse_layer(
        "sparse-64M",
        64 << 20,
        &[
            (0, b"head"),
            (30 << 20, b"middle"),
            ((64 << 20) - 4, b"tail"),
        ],
    )
    .unwrap();
    assert_eq!(tar[156], b'S', "GNU tar should write a sparse header");
    let reference = tmp.join("ref");
    std::fs::create_dir_all(&reference).unwrap();
    std::fs::write(tmp.join("layer.tar"), &tar).unwrap();
    run(Command::new("tar")
        .args(["-xSpf"])
        .arg(tmp.join("layer.tar"))
        .arg("-C")
        .arg(&reference))
    .unwrap();
    let want = snapshot(&reference, SnapshotOptions::default()).unwrap();
    let src = tmp.join("src");
    write_oci_layout(
        &src,
        "v1",
        &[Layer {
            tar,
            compression: Compression::Gzip,
        }],
    )
    .unwrap();
    let root = tmp.join("store");
    strata_ok(
        &root,
        &[
            "convert",
            &format!("oci:{}:v1", src.display()),
            "test/sparse:v1",
        ],
    );
    let m = Mounted::new(&root, "test/sparse:v1", &tmp.join("mnt")).unwrap();
    let got = snapshot(&m.dir, SNAP).unwrap();
    assert_same(&want, &got, "GNU sparse");
    m.unmount().unwrap();
    std::fs::remove_dir_all(&tmp).ok();
}
