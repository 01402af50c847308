#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failure should abort loudly
//! `strata run` on a lazily pulled busybox image with real runc: Docker's ENTRYPOINT/CMD
//! rules, exit codes, -e/-w/-u, --hostname, --rm leaving nothing behind, `ps -a`, `rm`, and bad
//! input refused before anything is created.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use strata_tests::image::scratch;
use strata_tests::registry::TestRegistry;
use strata_tests::util::{busybox_image, strata, strata_bin, strata_ok};

fn run(root: &Path, args: &[&str]) -> std::process::Output {
    Command::new(strata_bin())
        .arg("--root")
        .arg(root)
        .arg("run")
        .args(args)
        .output()
        .unwrap()
}

fn stdout(o: &std::process::Output) -> String {
    assert!(
        o.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn run_containers_on_a_lazy_image() {
    let tmp = scratch("containers").unwrap();
    let reg = TestRegistry::start(&tmp.join("registry"), None).unwrap();
    let image = busybox_image(&tmp, &reg.addr);
    let root = tmp.join("node");

    // ENTRYPOINT + CMD from the image, from a fresh store (lazily).
    assert_eq!(stdout(&run(&root, &["--rm", &image])), "hi\n");
    // Trailing arguments replace CMD; the exit code is the container's.
    let o = run(&root, &["--rm", &image, "-c", "exit 3"]);
    assert_eq!(
        o.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // --entrypoint replaces ENTRYPOINT and drops CMD.
    assert_eq!(
        stdout(&run(
            &root,
            &["--rm", "--entrypoint", "/bin/echo", &image, "a", "b"]
        )),
        "a b\n"
    );
    // Environment (image's and -e), working directory, user resolved in the image, host name.
    let o = run(
        &root,
        &[
            "--rm",
            "-e",
            "FOO=bar",
            "-w",
            "/tmp",
            "-u",
            "app",
            "--hostname",
            "box",
            &image,
            "-c",
            "echo $GREETING $FOO $(pwd) $(id -u):$(id -g) $(hostname) $HOME",
        ],
    );
    assert_eq!(stdout(&o), "hello bar /tmp 1000:1000 box /home/app\n");
    // /etc/hosts and /etc/hostname come from the container's own files.
    let o = run(
        &root,
        &[
            "--rm",
            "--hostname",
            "box",
            &image,
            "-c",
            "cat /etc/hostname",
        ],
    );
    assert_eq!(stdout(&o), "box\n");

    // --rm leaves nothing: no containers, no mounts under the store.
    let ps: serde_json::Value =
        serde_json::from_str(&strata_ok(&root, &["ps", "-a", "--json"])).unwrap();
    assert_eq!(ps.as_array().unwrap().len(), 0, "{ps}");
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap();
    assert!(
        !mounts.contains(&root.to_string_lossy().to_string()),
        "{mounts}"
    );

    // Without --rm the container stays (exited) with its changes, until `strata rm`.
    stdout(&run(
        &root,
        &["--name", "keep", &image, "-c", "echo data > /new"],
    ));
    let ps: serde_json::Value =
        serde_json::from_str(&strata_ok(&root, &["ps", "-a", "--json"])).unwrap();
    let c = &ps.as_array().unwrap()[0];
    assert_eq!(
        (c["name"].as_str(), c["status"].as_str()),
        (Some("keep"), Some("exited"))
    );
    assert_eq!(c["exit_code"], 0);
    let id = c["id"].as_str().unwrap().to_string();
    let upper = root.join("containers").join(&id).join("layer/upper/new");
    assert_eq!(fs::read(&upper).unwrap(), b"data\n");
    // /etc: the runtime made the mount points /etc/hosts etc. in it (podman prints it too).
    assert_eq!(strata_ok(&root, &["diff", "keep"]), "C /etc\nA /new\n");
    // A name is taken only once.
    let o = run(&root, &["--name", "keep", &image, "-c", "true"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("already in use"));
    // commit: the changes (a new file, a deletion) become a layer of a new image.
    stdout(&run(
        &root,
        &[
            "--name",
            "edit",
            &image,
            "-c",
            "echo more > /etc/extra; rm /etc/group",
        ],
    ));
    let bad = strata(
        &root,
        &["commit", "-c", "FROBNICATE x", "edit", "c/mine:v1"],
    );
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("FROBNICATE"));
    let digest = strata_ok(
        &root,
        &[
            "commit",
            "-m",
            "my change",
            "-a",
            "me",
            "-c",
            "ENV ADDED=yes",
            "edit",
            "c/mine:v1",
        ],
    );
    assert!(digest.trim().starts_with("sha256:"), "{digest}");
    let hist: serde_json::Value =
        serde_json::from_str(&strata_ok(&root, &["history", "--json", "c/mine:v1"])).unwrap();
    let top = &hist.as_array().unwrap()[0];
    assert_eq!(top["comment"], "my change");
    assert!(
        top["created_by"].as_str().unwrap().contains("echo more"),
        "{top}"
    );
    assert!(top["size"].as_u64().unwrap() > 0);
    assert!(strata_ok(&root, &["history", "c/mine:v1"]).contains("my change"));
    let o = run(
        &root,
        &[
            "--rm",
            "c/mine:v1",
            "-c",
            "cat /etc/extra; echo $ADDED; ls /etc",
        ],
    );
    let out = stdout(&o);
    assert!(out.starts_with("more\nyes\n"), "{out}");
    assert!(
        !out.contains("group"),
        "the whiteout did not survive the commit: {out}"
    );
    // The committed image verifies and is an ordinary image of the store.
    strata_ok(&root, &["verify", "c/mine:v1"]);
    // Pushed, then mounted lazily on a fresh store: the same tree.
    let pushed = format!("{}/c/mine:v1", reg.addr);
    strata_ok(&root, &["push", "c/mine:v1", &pushed]);
    let fresh = tmp.join("fresh");
    let mnt = tmp.join("mnt");
    let m = strata_tests::util::Mounted::new(&fresh, &pushed, &mnt).unwrap();
    assert_eq!(fs::read(mnt.join("etc/extra")).unwrap(), b"more\n");
    assert!(!mnt.join("etc/group").exists());
    assert!(mnt.join("etc/passwd").exists());
    m.unmount().unwrap();
    strata_ok(&fresh, &["daemon", "--stop"]);
    strata_ok(&root, &["rm", "edit"]);

    strata_ok(&root, &["rm", "keep"]);
    assert!(!root.join("containers").join(&id).exists());

    // Bad input: a clear error and no half-created container.
    for (args, needle) in [
        (
            vec!["--rm", "-u", "nosuchuser", image.as_str(), "-c", "true"],
            "nosuchuser",
        ),
        (
            vec!["--rm", "--runtime", "/nonexistent/runc", image.as_str()],
            "runtime",
        ),
        (vec!["--rm", "127.0.0.1:1/none/such:v1"], "none/such"),
    ] {
        let o = run(&root, &args);
        assert!(!o.status.success(), "{args:?} succeeded");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
        let left: Vec<_> = fs::read_dir(root.join("containers"))
            .map(|d| d.flatten().filter(|e| e.file_name() != "runc").collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "{args:?} left {left:?}");
    }
    // Detached: -d, logs, stop, start, kill, rm.
    let id = stdout(&run(
        &root,
        &[
            "-d",
            "--name",
            "bg",
            &image,
            "-c",
            "echo started; sleep 300",
        ],
    ));
    assert_eq!(id.trim().len(), 64, "{id}");
    let logs = || strata_ok(&root, &["logs", "bg"]);
    let wait_for = |what: &dyn Fn() -> bool, why: &str| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !what() {
            assert!(std::time::Instant::now() < deadline, "{why}");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    };
    wait_for(
        &|| logs().contains("started"),
        "no output from the detached container",
    );
    let status = || -> (String, serde_json::Value) {
        let ps: serde_json::Value =
            serde_json::from_str(&strata_ok(&root, &["ps", "-a", "--json"])).unwrap();
        let c = ps
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "bg")
            .unwrap()
            .clone();
        (
            c["status"].as_str().unwrap().to_string(),
            c["exit_code"].clone(),
        )
    };
    assert_eq!(status().0, "running");
    // The shell is PID 1 and ignores SIGTERM: stop kills it after -t.
    strata_ok(&root, &["stop", "-t", "1", "bg"]);
    let (s, code) = status();
    assert_eq!(s, "exited");
    assert!(code == 137 || code == 143, "{code}");
    strata_ok(&root, &["start", "bg"]);
    wait_for(
        &|| logs().matches("started").count() == 2,
        "restart did not run",
    );
    assert_eq!(status().0, "running");
    // exec in the running container: output, user, exit code.
    assert_eq!(
        strata_ok(&root, &["exec", "bg", "/bin/echo", "inside"]),
        "inside\n"
    );
    assert_eq!(
        strata_ok(&root, &["exec", "-u", "app", "bg", "/bin/id", "-u"]),
        "1000\n"
    );
    let o = strata(&root, &["exec", "bg", "/bin/sh", "-c", "exit 4"]);
    assert_eq!(o.status.code(), Some(4));
    let info: serde_json::Value =
        serde_json::from_str(&strata_ok(&root, &["inspect", "bg"])).unwrap();
    assert_eq!(info["name"], "bg");
    assert!(info["rootfs"].as_str().unwrap().ends_with("/rootfs"));
    strata_ok(&root, &["kill", "bg"]);
    wait_for(&|| status().0 == "exited", "kill did not end it");
    assert_eq!(status().1, 137);
    strata_ok(&root, &["rm", "bg"]);
    // A detached --rm container removes itself when it ends.
    stdout(&run(
        &root,
        &["-d", "--rm", "--name", "gone", &image, "-c", "true"],
    ));
    wait_for(
        &|| {
            let ps: serde_json::Value =
                serde_json::from_str(&strata_ok(&root, &["ps", "-a", "--json"])).unwrap();
            ps.as_array().unwrap().is_empty()
        },
        "--rm container left behind",
    );

    let out = strata(&root, &["daemon", "--stop"]);
    assert!(out.status.success());
    // overlayfs's queries to the lower (and their interrupts) were answered cleanly.
    let log = fs::read_to_string(root.join("daemon.log")).unwrap_or_default();
    assert!(!log.contains("Failed to send FUSE reply"), "{log}");
    assert!(!log.contains("ERROR"), "{log}");
    fs::remove_dir_all(&tmp).ok();
}

fn pids_of(pattern: &str) -> Vec<i32> {
    let o = Command::new("pgrep")
        .args(["-f", "--", pattern])
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

fn mounts_under(root: &Path) -> Vec<String> {
    fs::read_to_string("/proc/self/mounts")
        .unwrap()
        .lines()
        .filter(|l| l.contains(&*root.to_string_lossy()))
        .map(str::to_string)
        .collect()
}

/// chmod -R / chown -R over a lazily mounted image fetch no file data; SIGKILL of every strata
/// process while a container writes loses no fsynced file and leaves no stray mount; crun runs
/// containers too.
#[test]
fn containers_survive_faults_and_metadata_changes_fetch_nothing() {
    let tmp = scratch("containers-faults").unwrap();
    let reg = TestRegistry::start(&tmp.join("registry"), None).unwrap();
    let image = busybox_image(&tmp, &reg.addr);
    let root = tmp.join("node");
    let wait_for = |what: &dyn Fn() -> bool, why: &str| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while !what() {
            assert!(std::time::Instant::now() < deadline, "{why}");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    };

    // chmod -R / chown -R in a container: metadata only, nothing fetched.
    stdout(&run(
        &root,
        &[
            "-d",
            "--no-prefetch",
            "--name",
            "meta",
            &image,
            "-c",
            "sleep 300",
        ],
    ));
    let fetched = || -> u64 {
        let v: serde_json::Value =
            serde_json::from_str(&strata_ok(&root, &["stats", "--json", "meta"])).unwrap();
        v["fetch"]["source_bytes"].as_u64().unwrap()
    };
    wait_for(
        &|| strata_ok(&root, &["ps", "--json"]).contains("meta"),
        "not running",
    );
    // busybox itself is read in full first: its chmod and chown code is fetched then.
    strata_ok(
        &root,
        &["exec", "meta", "sh", "-c", "cat /bin/busybox > /dev/null"],
    );
    let before = fetched();
    strata_ok(
        &root,
        &[
            "exec", "meta", "chmod", "-R", "g+w", "/bin", "/etc", "/opt", "/usr",
        ],
    );
    strata_ok(
        &root,
        &[
            "exec",
            "meta",
            "chown",
            "-R",
            "1000:1000",
            "/opt",
            "/bin",
            "/usr",
        ],
    );
    assert_eq!(fetched(), before, "chmod -R / chown -R fetched file data");
    assert_eq!(
        strata_ok(
            &root,
            &["exec", "meta", "stat", "-c", "%a %u", "/opt/data.bin"]
        ),
        "664 1000\n"
    );
    // Reading the data does fetch (the counter is live).
    strata_ok(&root, &["exec", "meta", "cat", "/opt/data.bin"]);
    assert!(fetched() >= before + (1 << 20), "reading fetched nothing");
    strata_ok(&root, &["rm", "-f", "meta"]);

    // crun runs the same containers.
    assert_eq!(
        stdout(&run(
            &root,
            &["--rm", "--runtime", "crun", &image, "-c", "echo via crun"]
        )),
        "via crun\n"
    );

    // A container writing and fsyncing files; then SIGKILL of every strata process.
    let script = "i=0; while true; do echo payload-$i > /tmp/f$i && sync && echo $i >> /tmp/done \
                  && sync; i=$((i+1)); done";
    stdout(&run(&root, &["-d", "--name", "w", &image, "-c", script]));
    let info: serde_json::Value =
        serde_json::from_str(&strata_ok(&root, &["inspect", "w"])).unwrap();
    let upper = PathBuf::from(info["upper"].as_str().unwrap());
    wait_for(
        &|| {
            fs::read_to_string(upper.join("tmp/done"))
                .map(|s| s.lines().count() > 50)
                .unwrap_or(false)
        },
        "the container wrote nothing",
    );
    let root_s = root.to_string_lossy().to_string();
    let strata_pids = pids_of(&format!("--root {root_s} "));
    assert!(
        strata_pids.len() >= 2,
        "daemon and monitor: {strata_pids:?}"
    );
    for pid in &strata_pids {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(*pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    // The node comes back: stop the orphaned container, start it again on restored mounts.
    strata_ok(&root, &["stop", "-t", "1", "w"]);
    let done = fs::read_to_string(upper.join("tmp/done")).unwrap();
    let done: Vec<&str> = done.lines().filter(|l| !l.is_empty()).collect();
    let check = |label: &str| {
        for i in &done[..done.len() - 1] {
            let f = fs::read_to_string(upper.join(format!("tmp/f{i}"))).unwrap();
            assert_eq!(f, format!("payload-{i}\n"), "{label}: f{i}");
        }
    };
    check("after SIGKILL");
    strata_ok(&root, &["start", "w"]);
    wait_for(
        &|| {
            fs::read_to_string(upper.join("tmp/done"))
                .map(|s| s.lines().filter(|l| *l == "0").count() == 2)
                .unwrap_or(false)
        },
        "the restarted container did not run",
    );
    let o = strata(&root, &["exec", "w", "cat", &format!("/tmp/f{}", done[0])]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // rm -f: nothing left behind, the store intact.
    strata_ok(&root, &["rm", "-f", "w"]);
    assert!(!root
        .join("containers")
        .join(info["id"].as_str().unwrap())
        .exists());
    strata_ok(&root, &["verify", &image]);
    strata_ok(&root, &["daemon", "--stop"]);
    let left = mounts_under(&root);
    assert!(left.is_empty(), "stray mounts: {left:?}");
    fs::remove_dir_all(&tmp).ok();
}
