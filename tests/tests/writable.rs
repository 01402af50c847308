#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failure should abort loudly
//! Writable views: kernel overlayfs over a lazy mount (`strata mount --upper DIR`). chmod and
//! chown of lower files copy no data and fetch nothing (metacopy); `strata diff` prints what
//! `docker container diff` / `podman diff` print; the upper dir is in overlayfs's own form and
//! survives an unmount.

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};

use strata_tests::image::{noise, scratch, LayerBuilder};
use strata_tests::registry::TestRegistry;
use strata_tests::util::{is_mounted, publish_layer, strata, strata_ok};

const MIB: usize = 1 << 20;

#[test]
fn writable_view_over_a_lazy_mount() {
    let tmp = scratch("writable").unwrap();
    let mut l = LayerBuilder::new();
    l.dir(".", 0o755)
        .unwrap()
        .dir("etc", 0o755)
        .unwrap()
        .file("etc/motd", 0o644, b"welcome\n")
        .unwrap()
        .file("etc/group", 0o644, b"root:x:0:\n")
        .unwrap()
        .dir("bin", 0o755)
        .unwrap()
        .file("bin/tool", 0o755, &noise(42, 4 * MIB))
        .unwrap()
        .dir("var", 0o755)
        .unwrap();
    let reg = TestRegistry::start(&tmp.join("registry"), None).unwrap();
    let image = publish_layer(&tmp, &reg.addr, l.finish().unwrap(), "w/x:v1");

    let root = tmp.join("node");
    let mnt = tmp.join("mnt");
    let upper = tmp.join("upper");
    fs::create_dir_all(&mnt).unwrap();
    let m = mnt.to_string_lossy().to_string();
    strata_ok(
        &root,
        &[
            "mount",
            "--upper",
            &upper.to_string_lossy(),
            &image,
            &m,
            "--no-prefetch",
        ],
    );
    assert!(is_mounted(&mnt));
    let fetched = || -> u64 {
        let v: serde_json::Value =
            serde_json::from_str(&strata_ok(&root, &["stats", "--json", &m])).unwrap();
        v["fetch"]["source_bytes"].as_u64().unwrap()
    };
    let before = fetched();

    // chmod/chown of a 4 MiB lower file: metadata only, nothing fetched.
    fs::set_permissions(mnt.join("bin/tool"), fs::Permissions::from_mode(0o700)).unwrap();
    nix::unistd::chown(
        &mnt.join("bin/tool"),
        Some(nix::unistd::Uid::from_raw(1000)),
        Some(nix::unistd::Gid::from_raw(1000)),
    )
    .unwrap();
    assert_eq!(fetched(), before, "chmod/chown fetched file data");
    let md = fs::metadata(mnt.join("bin/tool")).unwrap();
    assert_eq!(
        (md.mode() & 0o7777, md.uid(), md.len()),
        (0o700, 1000, 4 * MIB as u64)
    );
    let copied = fs::metadata(upper.join("upper/bin/tool")).unwrap();
    assert!(
        copied.blocks() < 16,
        "metacopy copied data: {} blocks",
        copied.blocks()
    );

    // podman's walk-through changes.
    fs::write(mnt.join("new.txt"), b"hi\n").unwrap();
    fs::remove_file(mnt.join("etc/motd")).unwrap();
    let mut group = fs::read(mnt.join("etc/group")).unwrap();
    group.extend_from_slice(b"x\n");
    fs::write(mnt.join("etc/group"), &group).unwrap();
    fs::create_dir_all(mnt.join("var/lib/x")).unwrap();
    let diff = strata_ok(&root, &["diff", &m]);
    // /bin was only copied up for the chmod below it: not listed (podman's rule).
    assert_eq!(
        diff,
        "C /bin/tool\nC /etc\nC /etc/group\nD /etc/motd\nA /new.txt\nC /var\nA /var/lib\nA /var/lib/x\n"
    );
    // The upper dir is in overlayfs's own form: the deletion is a 0/0 character device.
    let wh = fs::symlink_metadata(upper.join("upper/etc/motd")).unwrap();
    assert!(wh.file_type().is_char_device() && wh.rdev() == 0);
    // Reading the whole file through the view is the image's bytes.
    assert_eq!(fs::read(mnt.join("bin/tool")).unwrap(), noise(42, 4 * MIB));

    // Listed once (its lazy lower is the daemon's own), unmounted with its lower.
    let listed: serde_json::Value =
        serde_json::from_str(&strata_ok(&root, &["mounts", "--json"])).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    strata_ok(&root, &["umount", &m]);
    assert!(!is_mounted(&mnt));
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap();
    assert!(
        !mounts.contains(&root.to_string_lossy().to_string()),
        "{mounts}"
    );

    // Mounted again over the same upper dir, the changes are there.
    strata_ok(
        &root,
        &[
            "mount",
            "--upper",
            &upper.to_string_lossy(),
            &image,
            &m,
            "--no-prefetch",
        ],
    );
    assert_eq!(fs::read(mnt.join("new.txt")).unwrap(), b"hi\n");
    assert!(!mnt.join("etc/motd").exists());
    // A second view over the same upper dir while this one is mounted is refused (two writers
    // of one upper layer), by this daemon and by another one alike.
    let mnt2 = tmp.join("mnt2");
    fs::create_dir_all(&mnt2).unwrap();
    for node in [root.clone(), tmp.join("node2")] {
        let out = strata(
            &node,
            &[
                "mount",
                "--upper",
                &upper.to_string_lossy(),
                &image,
                &mnt2.to_string_lossy(),
                "--no-prefetch",
            ],
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("another mounted view"),
            "{err}"
        );
        assert!(!is_mounted(&mnt2));
    }
    strata_ok(&tmp.join("node2"), &["daemon", "--stop"]);
    strata_ok(&root, &["umount", &m]);
    strata_ok(&root, &["daemon", "--stop"]);
    fs::remove_dir_all(&tmp).ok();
}
