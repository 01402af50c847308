#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failure should abort loudly
//! Docker's interactive walk-through on a lazily pulled image, side by side with podman:
//! `strata run -it` driven through a real pty, `strata diff` printing exactly what `podman diff`
//! prints for the same commands, `commit`, `history`, running the committed image, pushing it
//! and mounting it on a fresh store, running it under podman, and unpacking its layers with GNU
//! tar to the container's merged view, entry by entry.

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use strata_tests::image::scratch;
use strata_tests::registry::TestRegistry;
use strata_tests::snapshot::{self, Snapshot, SnapshotOptions};
use strata_tests::util::{busybox_image_with, strata_bin, strata_ok, unpack_with_tar};

/// What the user types in the container: creates, modifies, deletes, links, renames a directory
/// the image has, replaces one (opaque), and touches a binary (metadata-only copy-up).
const COMMANDS: &[&str] = &[
    "echo hi > /new.txt",
    "rm /etc/motd",
    "echo x >> /etc/group",
    "echo h > /etc/hostname",
    "mkdir -p /var/lib/x",
    "mkdir -p /tmp/a/b && touch /tmp/a/b/c && rm -rf /tmp/a",
    "ln /etc/passwd /etc/pw2",
    "rm -rf /opt/d && mkdir /opt/d && echo n > /opt/d/n",
    "mv /opt/keep /opt/moved && mv /opt/moved/sub /opt/moved/sub2 && echo k3 > /opt/moved/sub2/k3",
    "rm -rf /opt/f && mv /opt/e /opt/f",
    "echo new > /usr/share/doc/pkg/new",
    "touch /bin/busybox",
    "chmod 700 /root",
];

/// podman with its own storage under `dir` (no network, rlimits this machine allows).
struct Podman {
    root: PathBuf,
    /// podman refuses a run root path longer than 50 bytes: a short one under /tmp.
    runroot: tempfile::TempDir,
}

impl Podman {
    fn cmd(&self) -> Command {
        let mut c = Command::new("podman");
        c.arg("--root")
            .arg(self.root.join("root"))
            .arg("--runroot")
            .arg(self.runroot.path())
            .args(["--storage-driver", "overlay", "--events-backend", "file"]);
        c
    }

    fn ok(&self, args: &[&str]) -> String {
        let o = self.cmd().args(args).output().expect("podman runs");
        assert!(
            o.status.success(),
            "podman {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    fn run(&self, extra: &[&str]) -> String {
        let mut args = vec![
            "run",
            "--network",
            "none",
            "--tls-verify=false",
            "--ulimit",
            "nofile=20000:20000",
            "--ulimit",
            "nproc=1000:1000",
        ];
        args.extend_from_slice(extra);
        self.ok(&args)
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = self.cmd().args(["rm", "-af"]).output();
        let _ = self.cmd().args(["rmi", "-af"]).output();
        let _ = self.cmd().args(["system", "reset", "-f"]).output();
    }
}

/// A process on the slave side of a new pty (its controlling terminal), and what it printed.
struct PtyChild {
    child: std::process::Child,
    master: fs::File,
    output: Arc<Mutex<Vec<u8>>>,
}

impl PtyChild {
    fn spawn(program: &Path, args: &[&str]) -> PtyChild {
        let pty = nix::pty::openpty(None, None).unwrap();
        let slave = fs::File::from(pty.slave);
        // `setsid -c`: a session of its own with the pty as controlling terminal.
        let child = Command::new("setsid")
            .arg("-c")
            .arg(program)
            .args(args)
            .stdin(Stdio::from(slave.try_clone().unwrap()))
            .stdout(Stdio::from(slave.try_clone().unwrap()))
            .stderr(Stdio::from(slave))
            .spawn()
            .unwrap();
        let master = fs::File::from(pty.master);
        let output = Arc::new(Mutex::new(Vec::new()));
        let (mut reader, out) = (master.try_clone().unwrap(), output.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            // EIO once the last slave descriptor closes.
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 {
                    break;
                }
                out.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        PtyChild {
            child,
            master,
            output,
        }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.output.lock().unwrap()).into_owned()
    }

    fn wait_for(&self, needle: &str, occurrences: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.text().matches(needle).count() < occurrences {
            assert!(
                Instant::now() < deadline,
                "no {needle:?} on the terminal:\n{}",
                self.text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn type_line(&mut self, line: &str) {
        self.master.write_all(line.as_bytes()).unwrap();
        self.master.write_all(b"\r").unwrap();
    }
}

/// A snapshot of `root` with the container's mount points (and what is under them) left out,
/// and mtimes to the second (tar headers carry whole seconds, as Docker's commit writes them).
fn tree(root: &Path, mount_points: &[String]) -> Snapshot {
    let mut s = snapshot::snapshot(root, SnapshotOptions::default()).unwrap();
    s.retain(|p, _| {
        let p = format!("/{}", String::from_utf8_lossy(p));
        !mount_points
            .iter()
            .any(|m| p == *m || p.starts_with(&format!("{m}/")))
    });
    for e in s.values_mut() {
        e.mtime.1 = 0;
    }
    s
}

fn assert_same_tree(want: &Snapshot, got: &Snapshot, what: &str) {
    let d = snapshot::diff(want, got);
    assert!(d.is_empty(), "{what} differs:\n{}", d.join("\n"));
}

#[test]
fn interactive_walkthrough_matches_podman() {
    let tmp = scratch("walkthrough").unwrap();
    let reg = TestRegistry::start(&tmp.join("registry"), None).unwrap();
    // Like Docker's busybox: no ENTRYPOINT, CMD `sh`.
    let image = busybox_image_with(&tmp, &reg.addr, "c/base:v1", &|c| {
        c["config"]["Entrypoint"] = serde_json::Value::Null;
        c["config"]["Cmd"] = serde_json::json!(["sh"]);
    });
    let root = tmp.join("node");
    let podman = Podman {
        root: tmp.join("podman"),
        runroot: tempfile::Builder::new()
            .prefix("strata-pd")
            .tempdir_in("/tmp")
            .unwrap(),
    };

    // `strata run -it --name sample IMAGE /bin/sh` on a real terminal, from a fresh store.
    let strata = strata_bin();
    let root_s = root.to_string_lossy().to_string();
    let mut sh = PtyChild::spawn(
        &strata,
        &[
            "--root", &root_s, "run", "-it", "--name", "sample", &image, "/bin/sh",
        ],
    );
    sh.wait_for("# ", 1);
    for (i, c) in COMMANDS.iter().enumerate() {
        sh.type_line(c);
        sh.wait_for("# ", i + 2);
    }
    sh.type_line("tty; exit 3");
    let status = sh.child.wait().unwrap();
    let screen = sh.text();
    assert_eq!(status.code(), Some(3), "{screen}");
    assert!(
        screen.contains("/dev/pts/0"),
        "no terminal inside:\n{screen}"
    );

    // The same commands under podman, on the same image: the same diff, line for line.
    podman.run(&[
        "--name",
        "sample",
        &image,
        "/bin/sh",
        "-c",
        &COMMANDS.join("; "),
    ]);
    let want = podman.ok(&["diff", "sample"]);
    let got = strata_ok(&root, &["diff", "sample"]);
    assert_eq!(got, want, "strata diff (left) vs podman diff (right)");
    assert!(want.contains("D /opt/d\n") && want.contains("A /opt/moved/sub2/k2\n"));

    // An extended attribute set on the container's files is committed with them.
    let info: serde_json::Value =
        serde_json::from_str(&strata_ok(&root, &["inspect", "sample"])).unwrap();
    let rootfs = PathBuf::from(info["rootfs"].as_str().unwrap());
    let mount_points: Vec<String> = info["mount_points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap().to_string())
        .collect();
    xattr::set(rootfs.join("new.txt"), "user.note", b"kept").unwrap();

    // commit, history, run the new image.
    let digest = strata_ok(&root, &["commit", "sample", "my-base"]);
    assert!(digest.trim().starts_with("sha256:"), "{digest}");
    let history = strata_ok(&root, &["history", "my-base"]);
    let lines: Vec<&str> = history.lines().collect();
    assert!(lines[0].starts_with("IMAGE"), "{history}");
    assert!(
        lines[1].contains("/bin/sh"),
        "new layer not on top:\n{history}"
    );
    assert_eq!(lines.len(), 4, "{history}"); // the base's layer and its CMD entry below
    let run = |args: &[&str]| {
        let o = Command::new(&strata)
            .arg("--root")
            .arg(&root)
            .arg("run")
            .args(args)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    assert_eq!(run(&["--rm", "my-base", "cat", "/new.txt"]), "hi\n");
    // Whiteouts, the opaque directory and the renamed one survive the commit.
    assert_eq!(
        run(&["--rm", "my-base", "ls", "/etc", "/opt", "/opt/d", "/opt/f", "/opt/moved/sub2"]),
        "/etc:\ngroup\nhostname\nhosts\npasswd\npw2\nresolv.conf\n\n/opt:\nd\ndata.bin\nf\nmoved\n\n/opt/d:\nn\n\n/opt/f:\ng\n\n/opt/moved/sub2:\nk2\nk3\n"
    );

    // Pushed, then mounted lazily on a fresh store: the container's tree.
    let merged = tree(&rootfs, &mount_points);
    assert!(merged.contains_key(b"opt/moved/sub2/k2".as_slice()));
    let pushed = format!("{}/c/my-base:v1", reg.addr);
    strata_ok(&root, &["push", "my-base", &pushed]);
    let fresh = tmp.join("fresh");
    let mnt = tmp.join("mnt");
    let m = strata_tests::util::Mounted::new(&fresh, &pushed, &mnt).unwrap();
    assert_same_tree(&merged, &tree(&mnt, &mount_points), "the fresh lazy mount");
    m.unmount().unwrap();
    strata_ok(&fresh, &["daemon", "--stop"]);

    // The committed image is a standard one: GNU tar unpacks its layers to the same tree...
    let layout = tmp.join("oci");
    let o = Command::new("skopeo")
        .args(["copy", "--src-tls-verify=false"])
        .arg(format!("docker://{pushed}"))
        .arg(format!("oci:{}:v1", layout.display()))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let unpacked = tmp.join("unpacked");
    unpack_with_tar(&layout, &unpacked);
    assert_same_tree(&merged, &tree(&unpacked, &mount_points), "tar's unpack");
    // ...and podman runs it.
    let out = podman.run(&[
        "--rm",
        &pushed,
        "cat",
        "/new.txt",
        "/opt/d/n",
        "/opt/moved/sub2/k3",
        "/opt/f/g",
    ]);
    assert_eq!(out, "hi\nn\nk3\neg\n");

    strata_ok(&root, &["rm", "sample"]);
    strata_ok(&root, &["daemon", "--stop"]);
    drop(podman);
    fs::remove_dir_all(&tmp).ok();
}
