#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failure should abort loudly
//! A hostile registry costs bounded time and memory: a manifest that never ends, a range read
//! answered by an endless body, a registry that ignores Range and sends whole blobs. Errors are
//! clear, reads are EIO or correct, nothing wrong is cached, the daemon stays up.

use std::fs;
use std::process::Command;
use std::time::{Duration, Instant};

use strata_tests::image::{noise, scratch, LayerBuilder};
use strata_tests::proxy::{Fault, FaultProxy};
use strata_tests::registry::TestRegistry;
use strata_tests::util::{publish_layer, strata_bin, strata_ok, Mounted};

const MIB: usize = 1 << 20;
const EIO: i32 = 5;

/// Peak resident memory of a process in KiB (VmHWM).
fn peak_kib(pid: u64) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

#[test]
fn hostile_registry_replies_cost_bounded_time_and_memory() {
    let tmp = scratch("hostile-registry").unwrap();
    let mut l = LayerBuilder::new();
    l.dir(".", 0o755).unwrap();
    for i in 0..6u64 {
        l.file(&format!("f{i}"), 0o644, &noise(500 + i, MIB))
            .unwrap();
    }
    let reg = TestRegistry::start(&tmp.join("registry"), None).unwrap();
    publish_layer(&tmp, &reg.addr, l.finish().unwrap(), "h/x:v1");
    let proxy = FaultProxy::start(&reg.addr).unwrap();
    let image = format!("{}/h/x:v1", proxy.addr);

    // A manifest that never ends: a clear error, quickly, in bounded memory.
    proxy.set(Fault::Endless, None, "/manifests/");
    let start = Instant::now();
    let out = Command::new(strata_bin())
        .arg("--root")
        .arg(tmp.join("pull"))
        .args(["pull", &image, "--registry-attempts", "1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("pulling"), "{err}");
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "{:?}",
        start.elapsed()
    );
    let children =
        nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN).unwrap();
    // ru_maxrss is in KiB: the largest child so far, strata included.
    assert!(
        children.max_rss() < 200 << 10,
        "peak RSS {} KiB",
        children.max_rss()
    );
    proxy.clear();

    // Mount lazily through the proxy; reads then meet hostile range replies.
    let root = tmp.join("node");
    let mnt = tmp.join("mnt");
    let m = Mounted::with_args(
        &root,
        &image,
        &mnt,
        &[
            "--no-prefetch",
            "--registry-timeout",
            "5",
            "--registry-attempts",
            "1",
        ],
    )
    .unwrap();
    let stats = |k: &str| -> serde_json::Value {
        let v: serde_json::Value = serde_json::from_str(&strata_ok(
            &root,
            &["stats", "--json", &mnt.to_string_lossy()],
        ))
        .unwrap();
        v[k].clone()
    };
    let pid = stats("pid").as_u64().unwrap();

    // A range read answered by an endless 200 body: EIO in bounded time.
    proxy.set(Fault::Endless, None, "Range:");
    let start = Instant::now();
    let err = fs::read(mnt.join("f0")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(EIO), "{err}");
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "{:?}",
        start.elapsed()
    );

    // A registry that ignores Range and sends whole blobs: the bytes are still right.
    proxy.set(Fault::IgnoreRange, None, "Range:");
    assert_eq!(fs::read(mnt.join("f1")).unwrap(), noise(501, MIB));

    // Wrong bytes in range replies: EIO, and nothing wrong was cached.
    proxy.set(Fault::Corrupt, None, "Range:");
    let err = fs::read(mnt.join("f2")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(EIO), "{err}");
    proxy.clear();
    for i in 0..6u64 {
        assert_eq!(
            fs::read(mnt.join(format!("f{i}"))).unwrap(),
            noise(500 + i, MIB),
            "f{i}"
        );
    }
    // The daemon is the same process and stayed small.
    assert_eq!(stats("pid").as_u64().unwrap(), pid);
    let peak = peak_kib(pid);
    assert!(peak < 400 << 10, "daemon peak RSS {peak} KiB");
    m.unmount().unwrap();
    fs::remove_dir_all(&tmp).ok();
}
