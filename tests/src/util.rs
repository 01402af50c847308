//! Running the strata binary and system tools from tests.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// The `strata` binary built next to the test executable (target/<profile>/strata).
pub fn strata_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("STRATA_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let bin = dir.join("strata");
    assert!(
        bin.exists(),
        "{} not built: run `cargo build --bins` first (or set STRATA_BIN)",
        bin.display()
    );
    bin
}

/// Runs `strata --root ROOT ARGS…`.
pub fn strata(root: &Path, args: &[&str]) -> Output {
    Command::new(strata_bin())
        .arg("--root")
        .arg(root)
        .args(args)
        .output()
        .expect("running strata")
}

/// Runs strata and fails the test with its output if it does not succeed.
pub fn strata_ok(root: &Path, args: &[&str]) -> String {
    let out = strata(root, args);
    assert!(
        out.status.success(),
        "strata {args:?} failed:\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a command; returns stdout or an error with stderr.
pub fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether `dir` is a mount point (per /proc/self/mountinfo).
pub fn is_mounted(dir: &Path) -> bool {
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split_whitespace().nth(4) == Some(dir.to_string_lossy().as_ref()))
}

/// A strata mount that is unmounted when dropped (so a failing test cleans up).
pub struct Mounted {
    pub root: PathBuf,
    pub dir: PathBuf,
}

impl Mounted {
    pub fn new(root: &Path, image: &str, dir: &Path) -> Result<Self> {
        Self::with_args(root, image, dir, &[])
    }

    /// Mounts with extra `strata mount` flags.
    pub fn with_args(root: &Path, image: &str, dir: &Path, extra: &[&str]) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let d = dir.to_string_lossy().to_string();
        let mut args = vec!["mount", image, d.as_str()];
        args.extend_from_slice(extra);
        let out = strata(root, &args);
        if !out.status.success() {
            bail!("mount failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        if !is_mounted(dir) {
            bail!("strata mount returned but {} is not mounted", dir.display());
        }
        Ok(Mounted {
            root: root.to_path_buf(),
            dir: dir.to_path_buf(),
        })
    }

    pub fn unmount(mut self) -> Result<()> {
        self.unmount_inner()
    }

    fn unmount_inner(&mut self) -> Result<()> {
        if !is_mounted(&self.dir) {
            return Ok(());
        }
        let out = strata(&self.root, &["umount", &self.dir.to_string_lossy()]);
        if !out.status.success() {
            bail!("umount failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while is_mounted(&self.dir) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if is_mounted(&self.dir) {
            let _ = strata(
                &self.root,
                &["umount", "--lazy", &self.dir.to_string_lossy()],
            );
        }
    }
}

/// Runs strata with extra environment variables and optional standard input.
pub fn strata_with(
    root: &Path,
    env: &[(&str, &Path)],
    args: &[&str],
    stdin: Option<&[u8]>,
) -> Output {
    use std::io::Write;
    use std::process::Stdio;
    let mut cmd = Command::new(strata_bin());
    cmd.arg("--root").arg(root).args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("running strata");
    if let (Some(data), Some(mut input)) = (stdin, child.stdin.take()) {
        input.write_all(data).expect("writing stdin");
    }
    child.wait_with_output().expect("waiting for strata")
}

/// Writes a one-layer OCI layout under `tmp/src` and converts it into the store at `root` as
/// `name` (tag `v1` of the layout).
pub fn convert_one_layer(
    tmp: &Path,
    root: &Path,
    tar: Vec<u8>,
    compression: crate::image::Compression,
    name: &str,
) {
    let src = tmp.join("src");
    crate::image::write_oci_layout(&src, "v1", &[crate::image::Layer { tar, compression }])
        .expect("writing the OCI layout");
    strata_ok(
        root,
        &["convert", &format!("oci:{}:v1", src.display()), name],
    );
}

/// Converts a one-layer image (`tar`, gzip) in a store of its own under `tmp/local`, pushes it
/// to the registry at `registry` (`host:port`) as `name`, and returns the remote reference.
pub fn publish_layer(tmp: &Path, registry: &str, tar: Vec<u8>, name: &str) -> String {
    let local = tmp.join("local");
    let src = tmp.join(format!("src-{}", name.replace(['/', ':'], "-")));
    convert_one_layer(&src, &local, tar, crate::image::Compression::Gzip, name);
    let remote = format!("{registry}/{name}");
    strata_ok(&local, &["push", name, &remote]);
    remote
}

/// A busybox-static image pushed to the registry at `registry` as `c/busybox:v1` (a small base
/// the container tests build themselves): busybox and its applets in /bin, `/usr/bin/sh`,
/// users root and app (1000), /etc/motd, /var, /tmp, and /opt with directories to remove and
/// rename. Entrypoint `/usr/bin/sh`, cmd `-c "echo hi"` (the sample config).
pub fn busybox_image(tmp: &Path, registry: &str) -> String {
    busybox_image_with(tmp, registry, "c/busybox:v1", &|_| {})
}

/// [`busybox_image`] as `name`, its config changed by `edit`.
pub fn busybox_image_with(
    tmp: &Path,
    registry: &str,
    name: &str,
    edit: &dyn Fn(&mut serde_json::Value),
) -> String {
    let local = tmp.join("local");
    let src = tmp.join(format!("src-{}", name.replace(['/', ':'], "-")));
    let layer = crate::image::Layer {
        tar: busybox_layer(),
        compression: crate::image::Compression::Gzip,
    };
    crate::image::write_oci_layout_with(&src, "v1", &[layer], edit).expect("the OCI layout");
    strata_ok(
        &local,
        &["convert", &format!("oci:{}:v1", src.display()), name],
    );
    let remote = format!("{registry}/{name}");
    strata_ok(&local, &["push", name, &remote]);
    remote
}

/// The tar of [`busybox_image`]'s one layer.
pub fn busybox_layer() -> Vec<u8> {
    let busybox = std::fs::read("/bin/busybox").expect("busybox-static is installed (setup.sh)");
    let mut l = crate::image::LayerBuilder::new();
    let r: Result<()> = (|| {
        l.dir(".", 0o755)?
            .dir("bin", 0o755)?
            .file("bin/busybox", 0o755, &busybox)?
            .dir("usr", 0o755)?
            .dir("usr/bin", 0o755)?
            .symlink("usr/bin/sh", "/bin/busybox")?
            .dir("etc", 0o755)?
            .file(
                "etc/passwd",
                0o644,
                b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n",
            )?
            .file("etc/group", 0o644, b"root:x:0:\napp:x:1000:\n")?
            .file("etc/motd", 0o644, b"welcome\n")?
            .dir("var", 0o755)?
            .dir("tmp", 0o1777)?
            .dir("root", 0o700)?
            .dir("opt", 0o755)?
            .dir("opt/d", 0o755)?
            .file("opt/d/f1", 0o644, b"one\n")?
            .file("opt/d/f2", 0o644, b"two\n")?
            .dir("opt/keep", 0o755)?
            .file("opt/keep/k1", 0o644, b"k1\n")?
            .dir("opt/keep/sub", 0o750)?
            .file("opt/keep/sub/k2", 0o600, b"k2\n")?
            .file("opt/data.bin", 0o644, &crate::image::noise(7, 4 << 20))?
            .dir("opt/e", 0o755)?
            .file("opt/e/g", 0o644, b"eg\n")?
            .dir("opt/f", 0o755)?
            .file("opt/f/g", 0o644, b"fg\n")?
            .file("opt/f/h", 0o644, b"fh\n")?
            .dir("usr/share", 0o755)?
            .dir("usr/share/doc", 0o755)?
            .dir("usr/share/doc/pkg", 0o755)?
            .file("usr/share/doc/pkg/README", 0o644, b"readme\n")?;
        for tool in [
            "sh", "echo", "cat", "id", "hostname", "pwd", "env", "ls", "true", "rm", "mkdir",
            "touch", "ln", "chmod", "chown", "mv", "tty", "sleep", "sync", "dd", "stat", "find",
            "ping",
        ] {
            l.symlink(&format!("bin/{tool}"), "busybox")?;
        }
        Ok(())
    })();
    r.expect("building the busybox layer");
    l.finish().expect("busybox layer")
}

/// Unpacks an OCI image's layers (from a skopeo `oci:` copy) with GNU tar, applying whiteouts
/// and opaque markers as the image spec says: before a layer's entries, its `.wh.NAME` files
/// remove NAME and its `.wh..wh..opq` files empty their directory.
pub fn unpack_with_tar(layout: &Path, dest: &Path) {
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let blob = |digest: &str| layout.join("blobs/sha256").join(&digest["sha256:".len()..]);
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(blob(index["manifests"][0]["digest"].as_str().unwrap())).unwrap(),
    )
    .unwrap();
    std::fs::create_dir_all(dest).unwrap();
    for layer in manifest["layers"].as_array().unwrap() {
        let file = blob(layer["digest"].as_str().unwrap());
        let list = Command::new("tar")
            .arg("--zstd")
            .arg("-tf")
            .arg(&file)
            .output()
            .unwrap();
        assert!(list.status.success());
        for name in String::from_utf8_lossy(&list.stdout).lines() {
            let path = Path::new(name.trim_start_matches("./"));
            let Some(base) = path.file_name().map(|b| b.to_string_lossy().to_string()) else {
                continue; // the root
            };
            let parent = dest.join(path.parent().unwrap_or(Path::new("")));
            if base == ".wh..wh..opq" {
                for e in std::fs::read_dir(&parent).into_iter().flatten().flatten() {
                    let p = e.path();
                    if p.is_dir() && !p.is_symlink() {
                        std::fs::remove_dir_all(&p).unwrap();
                    } else {
                        std::fs::remove_file(&p).unwrap();
                    }
                }
            } else if let Some(gone) = base.strip_prefix(".wh.") {
                let p = parent.join(gone);
                match std::fs::symlink_metadata(&p) {
                    Ok(m) if m.is_dir() => std::fs::remove_dir_all(&p).unwrap(),
                    Ok(_) => std::fs::remove_file(&p).unwrap(),
                    Err(_) => {}
                }
            }
        }
        let x = Command::new("tar")
            .args([
                "--zstd",
                "-xpf",
                &file.to_string_lossy(),
                "--numeric-owner",
                "--xattrs",
                "--xattrs-include=*",
                "--wildcards",
                "--exclude=.wh.*",
                "--exclude=*/.wh.*",
                "-C",
                &dest.to_string_lossy(),
            ])
            .output()
            .unwrap();
        assert!(x.status.success(), "{}", String::from_utf8_lossy(&x.stderr));
    }
}

/// The pid of the node daemon serving `root`, from /proc.
pub fn daemon_pid(root: &Path) -> Option<i32> {
    let root = root.to_string_lossy().to_string();
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: i32 = e.file_name().to_str()?.parse().ok()?;
        let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
        let args: Vec<String> = cmd
            .split(|&b| b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let at_root = args.windows(2).any(|w| w[0] == "--root" && w[1] == root);
        (at_root && args.iter().any(|a| a == "daemon")).then_some(pid)
    })
}

/// kill -9 of the node daemon of `root`; answers its pid.
pub fn kill_node_daemon(root: &Path) -> i32 {
    let daemon = daemon_pid(root).expect("the node daemon runs");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(200));
    daemon
}

/// Lazily unmounts, when dropped (a failed test too), every mount under a directory.
pub struct UnmountUnder(pub PathBuf);

impl Drop for UnmountUnder {
    fn drop(&mut self) {
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut under: Vec<&str> = info
            .lines()
            .filter_map(|l| l.split_whitespace().nth(4))
            .filter(|m| std::path::Path::new(m).starts_with(&self.0))
            .collect();
        under.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in under {
            let _ = nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}
