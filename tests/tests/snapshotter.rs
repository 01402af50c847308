#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failure should abort loudly
//! `strata snapshotter` as containerd's proxy snapshotter, with Debian's containerd and runc
//! started by the test (its own config, root, state and socket): the plugin is listed ok, an
//! image pulled through containerd unpacks into it and runs, containers' writes stay in their
//! own snapshots, removing the image leaves no snapshots or mounts, and the metadata survives a
//! kill -9 of the plugin.

use std::fs;
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use strata_tests::image::scratch;
use strata_tests::registry::TestRegistry;
use strata_tests::util::{busybox_image, strata_bin};

/// A child process killed (and reaped) when dropped.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for_socket(p: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !p.exists() {
        assert!(Instant::now() < deadline, "{} never appeared", p.display());
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn snapshotter(root: &Path, sock: &Path) -> Daemon {
    let child = Command::new(strata_bin())
        .arg("--root")
        .arg(root)
        .arg("snapshotter")
        .arg("--address")
        .arg(sock)
        .spawn()
        .unwrap();
    wait_for_socket(sock);
    Daemon(child)
}

#[test]
fn containerd_runs_containers_on_strata_snapshots() {
    let tmp = scratch("snapshotter").unwrap();
    let reg = TestRegistry::start(&tmp.join("registry"), None).unwrap();
    let image = busybox_image(&tmp, &reg.addr);
    // containerd's socket paths must stay short (unix socket limit): a directory under /tmp.
    let run = tempfile::Builder::new()
        .prefix("strata-ctd")
        .tempdir_in("/tmp")
        .unwrap();
    let (ctd_sock, snap_sock) = (run.path().join("c.sock"), run.path().join("s.sock"));
    let config = tmp.join("containerd.toml");
    fs::write(
        &config,
        format!(
            "version = 2\nroot = \"{}\"\nstate = \"{}\"\n[grpc]\n  address = \"{}\"\n\
             [proxy_plugins]\n  [proxy_plugins.strata]\n    type = \"snapshot\"\n    address = \"{}\"\n",
            tmp.join("ctd-root").display(),
            run.path().join("state").display(),
            ctd_sock.display(),
            snap_sock.display()
        ),
    )
    .unwrap();
    let root = tmp.join("node");
    let mut snap = snapshotter(&root, &snap_sock);
    let log = fs::File::create(tmp.join("containerd.log")).unwrap();
    let ctd = Daemon(
        Command::new("containerd")
            .arg("--config")
            .arg(&config)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    wait_for_socket(&ctd_sock);
    let ctr = |args: &[&str]| -> String {
        let o = Command::new("ctr")
            .arg("-a")
            .arg(&ctd_sock)
            .args(args)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "ctr {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let plugins = ctr(&["plugins", "ls"]);
    assert!(
        plugins.lines().any(|l| l.contains("snapshotter")
            && l.contains("strata")
            && l.trim_end().ends_with("ok")),
        "{plugins}"
    );
    ctr(&[
        "image",
        "pull",
        "--plain-http",
        "--snapshotter",
        "strata",
        &image,
    ]);
    let snaps = ctr(&["snapshots", "--snapshotter", "strata", "ls"]);
    assert!(snaps.contains("Committed"), "{snaps}");
    // Containers run on it; each one's writes stay in its own snapshot.
    let out = ctr(&[
        "run",
        "--rm",
        "--snapshotter",
        "strata",
        &image,
        "c1",
        "/bin/sh",
        "-c",
        "echo mine > /written; cat /written /etc/group",
    ]);
    assert_eq!(out, "mine\nroot:x:0:\napp:x:1000:\n");
    let out = ctr(&[
        "run",
        "--rm",
        "--snapshotter",
        "strata",
        &image,
        "c2",
        "/bin/sh",
        "-c",
        "test -e /written && echo leaked || echo clean",
    ]);
    assert_eq!(out, "clean\n");

    // kill -9 of the plugin: the metadata survives and the next one serves it.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(snap.0.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let _ = snap.0.wait();
    let _ = fs::remove_file(&snap_sock);
    let _snap = snapshotter(&root, &snap_sock);
    // containerd reconnects to the plugin's new socket after its gRPC backoff: new calls
    // succeed within seconds.
    let deadline = Instant::now() + Duration::from_secs(60);
    let listed = loop {
        let o = Command::new("ctr")
            .arg("-a")
            .arg(&ctd_sock)
            .args(["snapshots", "--snapshotter", "strata", "ls"])
            .output()
            .unwrap();
        if o.status.success() {
            break String::from_utf8_lossy(&o.stdout).into_owned();
        }
        assert!(
            Instant::now() < deadline,
            "containerd never reached the restarted plugin: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    assert_eq!(listed, snaps);
    let out = ctr(&[
        "run",
        "--rm",
        "--snapshotter",
        "strata",
        &image,
        "c3",
        "/bin/echo",
        "again",
    ]);
    assert_eq!(out, "again\n");

    // Removing the image: containerd's GC removes the snapshots; nothing stays mounted.
    ctr(&["image", "rm", "--sync", &image]);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = ctr(&["snapshots", "--snapshotter", "strata", "ls"]);
        if left.lines().count() <= 1 {
            break;
        }
        assert!(Instant::now() < deadline, "snapshots left: {left}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap();
    assert!(!mounts.contains(&*root.to_string_lossy()), "{mounts}");
    let dirs = fs::read_dir(root.join("snapshotter/snapshots"))
        .unwrap()
        .count();
    assert_eq!(dirs, 0, "snapshot directories left");
    drop(ctd);
    fs::remove_dir_all(&tmp).ok();
}
