#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failure should abort loudly
//! Registry faults, injected by a proxy in front of a real registry: 500s and dropped
//! connections are retried and the read succeeds; a corrupted chunk is EIO for that read, never
//! cached, and the mount keeps serving; a registry that stops answering gives EIO in bounded time;
//! a restarted daemon reuses the disk cache and fetches nothing again.

use std::fs;
use std::time::{Duration, Instant};

use strata_tests::image::{noise, scratch, Compression, LayerBuilder};
use strata_tests::proxy::{Fault, FaultProxy};
use strata_tests::registry::TestRegistry;
use strata_tests::util::{convert_one_layer, strata_ok, Mounted};

const EIO: i32 = 5;

#[test]
fn registry_faults_are_retried_or_reported_and_never_corrupt_the_cache() {
    let tmp = scratch("faults").unwrap();
    let mut l = LayerBuilder::new();
    for i in 0..8u64 {
        l.file(&format!("f{i}"), 0o644, &noise(100 + i, 1 << 20))
            .unwrap();
    }
    let local = tmp.join("local");
    convert_one_layer(
        &tmp,
        &local,
        l.finish().unwrap(),
        Compression::Gzip,
        "test/faults:v1",
    );
    let reg = TestRegistry::start(&tmp.join("registry"), None).unwrap();
    strata_ok(
        &local,
        &[
            "push",
            "test/faults:v1",
            &format!("{}/test/faults:v1", reg.addr),
        ],
    );

    let proxy = FaultProxy::start(&reg.addr).unwrap();
    let image = format!("{}/test/faults:v1", proxy.addr);
    let fresh = tmp.join("fresh");
    let mnt = tmp.join("mnt");
    fs::create_dir_all(&mnt).unwrap();
    let mount = |root: &std::path::Path| {
        let m = mnt.display().to_string();
        strata_ok(
            root,
            &[
                "mount",
                &image,
                &m,
                "--no-prefetch",
                "--registry-timeout",
                "2",
                "--registry-attempts",
                "3",
            ],
        );
        Mounted {
            root: root.to_path_buf(),
            dir: mnt.clone(),
        }
    };
    let m = mount(&fresh);
    let read = |i: u64| fs::read(mnt.join(format!("f{i}")));

    // Two 500s, then success: retried.
    proxy.set(Fault::ServerError, Some(2), "Range:");
    assert_eq!(read(0).unwrap(), noise(100, 1 << 20));
    assert_eq!(proxy.faulted(), 2);

    // Two connections dropped mid-body: retried.
    proxy.set(Fault::Drop, Some(2), "Range:");
    assert_eq!(read(1).unwrap(), noise(101, 1 << 20));
    assert_eq!(proxy.faulted(), 4);

    // Corrupted bodies: EIO for that file; other files still read; once the registry behaves
    // the same file reads correctly (nothing corrupt was cached).
    proxy.set(Fault::Corrupt, None, "Range:");
    let err = read(2).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(EIO), "{err}");
    proxy.clear();
    assert_eq!(read(3).unwrap(), noise(103, 1 << 20));
    assert_eq!(read(2).unwrap(), noise(102, 1 << 20));

    // The registry stops answering: EIO after a bounded time, not a hang.
    proxy.set(Fault::Hang, None, "Range:");
    let start = Instant::now();
    let err = read(4).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(EIO), "{err}");
    assert!(
        start.elapsed() < Duration::from_secs(40),
        "took {:?}",
        start.elapsed()
    );
    proxy.clear();
    m.unmount().unwrap();

    // A new daemon on the same store serves what was read from the disk cache.
    let before = proxy.range_traffic();
    let m = mount(&fresh);
    for i in [0u64, 1, 2, 3] {
        assert_eq!(read(i).unwrap(), noise(100 + i, 1 << 20));
    }
    assert_eq!(
        proxy.range_traffic(),
        before,
        "cached chunks were fetched again"
    );
    m.unmount().unwrap();
    fs::remove_dir_all(&tmp).ok();
}
