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
use strata_tests::util::{
    busybox_image, daemon_pid, kill_node_daemon, strata_bin, strata_ok, strata_with,
};

/// A child process killed (and reaped) when dropped.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A short directory under /tmp for containerd's state and the sockets (Unix socket paths
/// must stay short), the snapshotter's socket in it, and the node's strata root under `tmp`.
fn node_dirs(tmp: &Path) -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
    let run = tempfile::Builder::new()
        .prefix("strata-ctd")
        .tempdir_in("/tmp")
        .unwrap();
    let snap_sock = run.path().join("s.sock");
    (run, snap_sock, tmp.join("node"))
}

fn wait_for_socket(p: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !p.exists() {
        assert!(Instant::now() < deadline, "{} never appeared", p.display());
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn snapshotter(root: &Path, sock: &Path) -> Daemon {
    snapshotter_with(root, sock, &[])
}

fn snapshotter_with(root: &Path, sock: &Path, args: &[&str]) -> Daemon {
    snapshotter_env(root, sock, args, &[])
}

fn snapshotter_env(root: &Path, sock: &Path, args: &[&str], env: &[(&str, &Path)]) -> Daemon {
    let child = Command::new(strata_bin())
        .arg("--root")
        .arg(root)
        .arg("snapshotter")
        .arg("--address")
        .arg(sock)
        .args(args)
        .envs(env.iter().copied())
        .spawn()
        .unwrap();
    wait_for_socket(sock);
    Daemon(child)
}

/// containerd started with its own config, root, state and socket, the strata plugin at
/// `snap_sock`.
struct Containerd {
    sock: std::path::PathBuf,
    _daemon: Daemon,
}

impl Containerd {
    fn start(tmp: &Path, run: &Path, snap_sock: &Path) -> Containerd {
        Containerd::start_with(tmp, run, snap_sock, "")
    }

    /// [`Containerd::start`] with more of containerd's config (plugin sections).
    fn start_with(tmp: &Path, run: &Path, snap_sock: &Path, extra: &str) -> Containerd {
        let sock = run.join("c.sock");
        let config = tmp.join("containerd.toml");
        fs::write(
            &config,
            format!(
                "version = 2\nroot = \"{}\"\nstate = \"{}\"\n[grpc]\n  address = \"{}\"\n\
                 [proxy_plugins]\n  [proxy_plugins.strata]\n    type = \"snapshot\"\n    address = \"{}\"\n",
                tmp.join("ctd-root").display(),
                run.join("state").display(),
                sock.display(),
                snap_sock.display()
            ) + extra,
        )
        .unwrap();
        let log = fs::File::create(tmp.join("containerd.log")).unwrap();
        let daemon = Daemon(
            Command::new("containerd")
                .arg("--config")
                .arg(&config)
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap(),
        );
        wait_for_socket(&sock);
        Containerd {
            sock,
            _daemon: daemon,
        }
    }

    fn try_ctr(&self, args: &[&str]) -> std::process::Output {
        Command::new("ctr")
            .arg("-a")
            .arg(&self.sock)
            .args(args)
            .output()
            .unwrap()
    }

    fn ctr(&self, args: &[&str]) -> String {
        let o = self.try_ctr(args);
        assert!(
            o.status.success(),
            "ctr {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// `ctr plugins ls` lists the strata snapshotter as ok.
    fn assert_plugin_ok(&self) {
        let plugins = self.ctr(&["plugins", "ls"]);
        assert!(
            plugins.lines().any(|l| l.contains("snapshotter")
                && l.contains("strata")
                && l.trim_end().ends_with("ok")),
            "{plugins}"
        );
    }

    /// Runs `ctr` until it succeeds (containerd reaches a restarted plugin after its gRPC
    /// reconnect backoff).
    fn ctr_eventually(&self, args: &[&str]) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let o = self.try_ctr(args);
            if o.status.success() {
                return String::from_utf8_lossy(&o.stdout).into_owned();
            }
            assert!(
                Instant::now() < deadline,
                "ctr {args:?} kept failing: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

#[test]
fn containerd_runs_containers_on_strata_snapshots() {
    let tmp = scratch("snapshotter").unwrap();
    let reg = TestRegistry::start(&tmp.join("registry"), None).unwrap();
    let image = busybox_image(&tmp, &reg.addr);
    // containerd's socket paths must stay short (unix socket limit): a directory under /tmp.
    let (run, snap_sock, root) = node_dirs(&tmp);
    let mut snap = snapshotter(&root, &snap_sock);
    let ctd = Containerd::start(&tmp, run.path(), &snap_sock);
    let ctr = |args: &[&str]| ctd.ctr(args);
    ctd.assert_plugin_ok();
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
    let listed = ctd.ctr_eventually(&["snapshots", "--snapshotter", "strata", "ls"]);
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

/// Sums the response bytes of access-log lines about `digest`, and whether every one of them
/// was a range answer (206).
fn blob_requests(lines: &[String], digest: &str) -> (u64, usize, bool) {
    let mut bytes = 0;
    let mut count = 0;
    let mut ranged = true;
    for l in lines
        .iter()
        .filter(|l| l.contains(digest) && l.contains("\"GET "))
    {
        let Some(after) = l.split("HTTP/1.1\" ").nth(1) else {
            continue;
        };
        let mut f = after.split_whitespace();
        let status = f.next().unwrap_or("");
        bytes += f.next().and_then(|b| b.parse::<u64>().ok()).unwrap_or(0);
        count += 1;
        ranged &= status == "206";
    }
    (bytes, count, ranged)
}

/// A two-layer strata image in the registry, its layer digests, and its gzip OCI layout.
struct LazyImage {
    image: String,
    layers: Vec<String>,
    src: std::path::PathBuf,
}

/// Busybox, then a layer that adds os-release and an 8 MiB file nobody reads, deletes a file
/// of the first layer and makes one of its directories opaque; converted, pushed to
/// `registry` as `lazy/app:v1`.
fn lazy_image(tmp: &Path, registry: &str) -> LazyImage {
    lazy_image_env(tmp, registry, &[])
}

/// [`lazy_image`], pushed with `env` (a `DOCKER_CONFIG` logged in to an auth registry).
fn lazy_image_env(tmp: &Path, registry: &str, env: &[(&str, &Path)]) -> LazyImage {
    use strata_tests::image::{noise, write_oci_layout, Compression, Layer, LayerBuilder};
    use strata_tests::util::busybox_layer;
    let mut top = LayerBuilder::new();
    top.dir("etc", 0o755)
        .unwrap()
        .file(
            "etc/os-release",
            0o644,
            b"NAME=\"strata test\"\nID=strata\n",
        )
        .unwrap()
        .dir("opt", 0o755)
        .unwrap()
        .file("opt/big.bin", 0o644, &noise(3, 8 << 20))
        .unwrap()
        .dir("opt/d", 0o755)
        .unwrap()
        .file("opt/d/.wh.f1", 0o644, b"")
        .unwrap()
        .dir("opt/keep", 0o755)
        .unwrap()
        .file("opt/keep/.wh..wh..opq", 0o644, b"")
        .unwrap()
        .file("opt/keep/new", 0o644, b"new\n")
        .unwrap()
        // No entry of its own for /tmp (busybox's is 1777): it must keep those attributes.
        .file("tmp/marker", 0o644, b"m\n")
        .unwrap();
    let layers = [
        Layer {
            tar: busybox_layer(),
            compression: Compression::Gzip,
        },
        Layer {
            tar: top.finish().unwrap(),
            compression: Compression::Gzip,
        },
    ];
    let src = tmp.join("src");
    write_oci_layout(&src, "v1", &layers).unwrap();
    let local = tmp.join("local");
    strata_ok(
        &local,
        &[
            "convert",
            &format!("oci:{}:v1", src.display()),
            "lazy/app:v1",
        ],
    );
    let image = format!("{registry}/lazy/app:v1");
    let pushed = strata_with(&local, env, &["push", "lazy/app:v1", &image], None);
    assert!(
        pushed.status.success(),
        "{}",
        String::from_utf8_lossy(&pushed.stderr)
    );
    let strata_layers: Vec<String> = {
        let m = strata_ok(&local, &["inspect", "lazy/app:v1"]);
        let m: serde_json::Value = serde_json::from_str(&m).unwrap();
        m["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["digest"].as_str().unwrap().to_string())
            .collect()
    };
    LazyImage {
        image,
        layers: strata_layers,
        src,
    }
}

/// Pushes the gzip OCI layout `src` (tag v1) as `plain/app:v1`, as anyone else publishes
/// images (no TOC); answers its reference and layer digests.
fn push_plain(src: &Path, registry: &str) -> String {
    let plain = format!("{registry}/plain/app:v1");
    let o = Command::new("skopeo")
        .args(["copy", "--quiet", "--dest-tls-verify=false"])
        .arg(format!("oci:{}:v1", src.display()))
        .arg(format!("docker://{plain}"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    plain
}

/// The layer digests of the image in the OCI layout `src`.
fn layout_layers(src: &Path) -> Vec<String> {
    let read =
        |p: &Path| -> serde_json::Value { serde_json::from_slice(&fs::read(p).unwrap()).unwrap() };
    let index = read(&src.join("index.json"));
    let m = index["manifests"][0]["digest"].as_str().unwrap();
    let manifest = read(&src.join("blobs/sha256").join(&m[7..]));
    manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["digest"].as_str().unwrap().to_string())
        .collect()
}

/// An access profile published for an image reaches the node with `strata rpull --profile`, and each
/// lazy layer's mount fetches what it names first: of the big file, only the chunk its range
/// falls in; of busybox, all of it (a line without ranges).
#[test]
fn rpull_brings_the_published_profile_to_the_layer_mounts() {
    let tmp = scratch("snapshotter-profile").unwrap();
    let reg = TestRegistry::start(&tmp.join("registry"), None).unwrap();
    let LazyImage { image, layers, .. } = lazy_image(&tmp, &reg.addr);
    let profile = tmp.join("profile.txt");
    let text = "opt/big.bin\t4194304+4096\nbin/busybox\n";
    fs::write(&profile, text).unwrap();
    let local = tmp.join("local");
    strata_ok(
        &local,
        &["push-profile", &profile.to_string_lossy(), &image],
    );
    let manifest: serde_json::Value =
        serde_json::from_str(&strata_ok(&local, &["inspect", "lazy/app:v1"])).unwrap();
    let digest = manifest["digest"].as_str().unwrap().replacen(':', "-", 1);

    let (run, snap_sock, root) = node_dirs(&tmp);
    let snap = snapshotter(&root, &snap_sock);
    let ctd = Containerd::start(&tmp, run.path(), &snap_sock);
    let sock = ctd.sock.to_string_lossy().to_string();
    let out = strata_ok(&root, &["rpull", "--profile", "--address", &sock, &image]);
    assert!(out.contains("2 mounted lazily"), "{out}");
    assert_eq!(
        fs::read_to_string(root.join(format!("profiles/{digest}.txt"))).unwrap(),
        text
    );
    // The layer mounts go on in the background: a container start waits for them.
    let ran = ctd.ctr(&[
        "run",
        "--rm",
        "--snapshotter",
        "strata",
        &image,
        "p1",
        "cat",
        "/etc/os-release",
    ]);
    assert_eq!(ran, "NAME=\"strata test\"\nID=strata\n");
    let named = |layer: &str| -> Option<u64> {
        let here = format!("layer=\"{layer}\"");
        strata_ok(&root, &["metrics"])
            .lines()
            .find(|l| l.starts_with("strata_mount_profile_chunks{") && l.contains(&here))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
    };
    // Every chunk of busybox (a line without ranges names the whole file).
    let toc = strata_ok(&local, &["inspect", "--toc", "lazy/app:v1"]);
    let busybox_chunks = toc
        .lines()
        .skip_while(|l| !l.ends_with(" bin/busybox"))
        .skip(1)
        .take_while(|l| l.trim_start().starts_with("chunk "))
        .filter_map(|l| l.split_whitespace().last())
        .collect::<std::collections::HashSet<_>>()
        .len() as u64;
    assert!(busybox_chunks > 1, "{toc}");
    assert_eq!(named(&layers[0]), Some(busybox_chunks));
    assert_eq!(named(&layers[1]), Some(1), "one chunk of the big file");

    ctd.ctr(&["image", "rm", "--sync", &image]);
    assert_all_gone(&ctd, "default", &root);
    // The profile goes with the last of strata's names of the manifest.
    strata_ok(&root, &["rmi", &image]);
    assert!(!root.join(format!("profiles/{digest}.txt")).exists());
    drop(ctd);
    drop(snap);
    stop_node_daemon(&root);
    fs::remove_dir_all(&tmp).ok();
}

/// Waits until the strata snapshotter has no snapshots in namespace `ns` and nothing is
/// mounted under `root`.
fn assert_all_gone(ctd: &Containerd, ns: &str, root: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = ctd.ctr(&["-n", ns, "snapshots", "--snapshotter", "strata", "ls"]);
        if left.lines().count() <= 1 {
            break;
        }
        assert!(Instant::now() < deadline, "snapshots left: {left}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mounts = fs::read_to_string("/proc/self/mounts").unwrap();
        if !mounts.contains(&*root.to_string_lossy()) {
            break;
        }
        assert!(Instant::now() < deadline, "mounts left: {mounts}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// containerd's CRI plugin (the kubelet's way in) on the strata snapshotter, passing layer
/// annotations as labels.
const CRI_CONFIG: &str = "[plugins.\"io.containerd.grpc.v1.cri\".containerd]\n  \
    snapshotter = \"strata\"\n  disable_snapshot_annotations = false\n";

#[test]
fn the_cri_pulls_strata_images_lazily() {
    let tmp = scratch("snapshotter-cri").unwrap();
    let reg = TestRegistry::start(&tmp.join("registry"), None).unwrap();
    let LazyImage { image, layers, src } = lazy_image(&tmp, &reg.addr);
    let plain = push_plain(&src, &reg.addr);
    let (run, snap_sock, root) = node_dirs(&tmp);
    let _snap = snapshotter_with(&root, &snap_sock, &["--no-prefetch"]);
    let ctd = Containerd::start_with(&tmp, run.path(), &snap_sock, CRI_CONFIG);
    ctd.assert_plugin_ok();

    // As the kubelet pulls: containerd's unpacker asks the snapshotter for each layer with
    // the CRI's labels; nothing but metadata and TOCs is fetched.
    let before = reg.log_lines().len();
    let id = strata_tests::cri::pull(&ctd.sock, &image).unwrap();
    assert!(id.starts_with("sha256:"), "{id}");
    let lines: Vec<String> = reg.log_lines().into_iter().skip(before).collect();
    for d in &layers {
        let (bytes, _, ranged) = blob_requests(&lines, d);
        assert!(
            ranged && bytes < 1 << 20,
            "layer {d}: {bytes} bytes: {lines:#?}"
        );
    }
    let snaps = ctd.ctr(&["-n", "k8s.io", "snapshots", "--snapshotter", "strata", "ls"]);
    assert_eq!(snaps.matches("Committed").count(), 2, "{snaps}");
    let out = run_k8s(
        &ctd,
        &image,
        "c1",
        &["/bin/sh", "-c", "cat /etc/os-release; ls /opt/d"],
    );
    assert_eq!(out, "NAME=\"strata test\"\nID=strata\nf2\n");

    // A plain image: containerd downloads its layers (once: the node daemon fetches none)
    // and unpacks them into ordinary snapshots.
    let before = reg.log_lines().len();
    strata_tests::cri::pull(&ctd.sock, &plain).unwrap();
    let lines: Vec<String> = reg.log_lines().into_iter().skip(before).collect();
    for d in layout_layers(&src) {
        let gets = lines
            .iter()
            .filter(|l| l.contains(&d) && l.contains("\"GET "))
            .count();
        assert_eq!(gets, 1, "layer {d} fetched {gets} times: {lines:#?}");
    }
    let out = run_k8s(&ctd, &plain, "p1", &["cat", "/etc/os-release"]);
    assert_eq!(out, "NAME=\"strata test\"\nID=strata\n");

    strata_tests::cri::remove(&ctd.sock, &image).unwrap();
    strata_tests::cri::remove(&ctd.sock, &plain).unwrap();
    assert_all_gone(&ctd, "k8s.io", &root);
    drop(ctd);
    stop_node_daemon(&root);
    fs::remove_dir_all(&tmp).ok();
}

/// Stops the node daemon of `root`, unmounting what it serves.
fn stop_node_daemon(root: &Path) {
    let _ = Command::new(strata_bin())
        .arg("--root")
        .arg(root)
        .args(["daemon", "--stop", "--forget"])
        .output();
}

/// `ctr run --rm` of `image` in the CRI's namespace on the strata snapshotter.
fn run_k8s(ctd: &Containerd, image: &str, name: &str, cmd: &[&str]) -> String {
    let mut a = vec![
        "-n",
        "k8s.io",
        "run",
        "--rm",
        "--snapshotter",
        "strata",
        image,
        name,
    ];
    a.extend_from_slice(cmd);
    ctd.ctr(&a)
}

/// Every file under `dir` that contains `needle` (a secret must never reach the disk).
fn files_containing(dir: &Path, needle: &[u8]) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in fs::read_dir(&d).into_iter().flatten().flatten() {
            let (p, t) = (e.path(), e.file_type().unwrap());
            if t.is_dir() && !t.is_symlink() {
                todo.push(p);
            } else if t.is_file()
                && fs::read(&p).is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle))
            {
                out.push(p);
            }
        }
    }
    out
}

#[test]
fn pull_secrets_passed_by_the_cri_reach_lazy_layers() {
    let tmp = scratch("snapshotter-cri-auth").unwrap();
    let user = ("tester", "s3cret-cri");
    let reg = TestRegistry::start(&tmp.join("registry"), Some(user)).unwrap();
    let docker = tmp.join("docker");
    let login = strata_with(
        &tmp.join("local"),
        &[("DOCKER_CONFIG", docker.as_path())],
        &["login", "-u", user.0, "--password-stdin", &reg.addr],
        Some(user.1.as_bytes()),
    );
    assert!(
        login.status.success(),
        "{}",
        String::from_utf8_lossy(&login.stderr)
    );
    let LazyImage { image, layers, .. } =
        lazy_image_env(&tmp, &reg.addr, &[("DOCKER_CONFIG", docker.as_path())]);
    let (run, snap_sock, root) = node_dirs(&tmp);
    let cri_sock = run.path().join("cri.sock");
    // The node itself has no credentials for the registry: only the kubelet's pull secret.
    let empty = tmp.join("no-docker-config");
    fs::create_dir_all(&empty).unwrap();
    let upstream = run.path().join("c.sock");
    let _snap = snapshotter_env(
        &root,
        &snap_sock,
        &[
            "--no-prefetch",
            "--cri-image-proxy",
            &cri_sock.to_string_lossy(),
            "--cri-upstream",
            &upstream.to_string_lossy(),
        ],
        &[("DOCKER_CONFIG", empty.as_path())],
    );
    let ctd = Containerd::start_with(&tmp, run.path(), &snap_sock, CRI_CONFIG);
    assert_eq!(ctd.sock, upstream);
    ctd.assert_plugin_ok();

    // Straight to containerd, the secret never reaches the snapshotter: the layers fall back
    // to containerd, which downloads them whole.
    let before = reg.log_lines().len();
    strata_tests::cri::pull_with_auth(&ctd.sock, &image, Some(user)).unwrap();
    let lines: Vec<String> = reg.log_lines().into_iter().skip(before).collect();
    // Whole downloads: the top layer's 8 MiB of noise came over.
    let whole: u64 = layers.iter().map(|d| blob_requests(&lines, d).0).sum();
    assert!(whole > 8 << 20, "{whole} bytes of layers: {lines:#?}");
    strata_tests::cri::remove(&ctd.sock, &image).unwrap();
    assert_all_gone(&ctd, "k8s.io", &root);

    // Through the proxy (the kubelet's --image-service-endpoint): lazy, with the secret.
    let before = reg.log_lines().len();
    let id = strata_tests::cri::pull_with_auth(&cri_sock, &image, Some(user)).unwrap();
    assert!(id.starts_with("sha256:"), "{id}");
    let lines: Vec<String> = reg.log_lines().into_iter().skip(before).collect();
    for d in &layers {
        let (bytes, count, ranged) = blob_requests(&lines, d);
        assert!(
            count > 0 && ranged && bytes < 1 << 20,
            "layer {d}: {bytes} bytes: {lines:#?}"
        );
    }
    let out = run_k8s(&ctd, &image, "a1", &["cat", "/etc/os-release"]);
    assert_eq!(out, "NAME=\"strata test\"\nID=strata\n");
    // kill -9 of the node daemon: a new one does not restore these mounts (it has no
    // credentials); the snapshotter mounts them again with the secret it holds, and chunks
    // nobody fetched yet come from the registry.
    kill_node_daemon(&root);
    let before = reg.log_lines().len();
    let out = run_k8s(
        &ctd,
        &image,
        "a2",
        &["/bin/sh", "-c", "cat /opt/big.bin > /dev/null && echo read"],
    );
    assert_eq!(out, "read\n");
    let lines: Vec<String> = reg.log_lines().into_iter().skip(before).collect();
    let fetched: u64 = layers.iter().map(|d| blob_requests(&lines, d).0).sum();
    assert!(
        fetched > 4 << 20,
        "{fetched} bytes after the restart: {lines:#?}"
    );
    // The secret lives in memory only.
    let leaked = files_containing(&root, user.1.as_bytes());
    assert!(leaked.is_empty(), "secret written to {leaked:?}");
    // Other calls go through the proxy too.
    strata_tests::cri::remove(&cri_sock, &image).unwrap();
    assert_all_gone(&ctd, "k8s.io", &root);
    drop(ctd);
    stop_node_daemon(&root);
    fs::remove_dir_all(&tmp).ok();
}

#[test]
fn containerd_pulls_strata_images_lazily() {
    let tmp = scratch("snapshotter-lazy").unwrap();
    let reg = TestRegistry::start(&tmp.join("registry"), None).unwrap();
    let LazyImage {
        image,
        layers: strata_layers,
        src,
    } = lazy_image(&tmp, &reg.addr);
    // The same image as published by anyone else (gzip, no TOC): the fallback path.
    let plain = push_plain(&src, &reg.addr);

    let (run, snap_sock, root) = node_dirs(&tmp);
    // No background prefetch: the registry log then shows exactly what containers read.
    let mut snap = snapshotter_with(&root, &snap_sock, &["--no-prefetch"]);
    let ctd = Containerd::start(&tmp, run.path(), &snap_sock);
    let sock = ctd.sock.to_string_lossy().to_string();
    ctd.assert_plugin_ok();

    let before = reg.log_lines().len();
    let out = strata_ok(&root, &["rpull", "--address", &sock, &image]);
    assert!(out.contains("2 mounted lazily, 0 unpacked"), "{out}");
    let snaps = ctd.ctr(&["snapshots", "--snapshotter", "strata", "ls"]);
    assert_eq!(snaps.matches("Committed").count(), 2, "{snaps}");
    let run_in = |name: &str, args: &[&str]| -> String {
        let mut a = vec!["run", "--rm", "--snapshotter", "strata", &image, name];
        a.extend_from_slice(args);
        ctd.ctr(&a)
    };
    assert_eq!(
        run_in("c1", &["cat", "/etc/os-release"]),
        "NAME=\"strata test\"\nID=strata\n"
    );
    // The upper layer's whiteout and opaque directory hold in the overlay of lazy layers.
    assert_eq!(
        run_in(
            "c2",
            &[
                "/bin/sh",
                "-c",
                "ls /opt/d; ls /opt/keep; cat /opt/e/g; stat -c %a /tmp"
            ]
        ),
        "f2\nnew\neg\n1777\n"
    );
    // Only manifest, config, TOCs and the chunks read went over the wire: every layer request
    // was a range read, and the 8 MiB file nobody read was not fetched.
    let lines: Vec<String> = reg.log_lines().into_iter().skip(before).collect();
    let mut layer_bytes = 0;
    for d in &strata_layers {
        let (bytes, count, ranged) = blob_requests(&lines, d);
        assert!(
            count > 0 && ranged,
            "layer {d}: {count} requests, not all ranges: {lines:#?}"
        );
        layer_bytes += bytes;
    }
    assert!(
        layer_bytes < 4 << 20,
        "fetched {layer_bytes} bytes of layers"
    );
    assert!(
        lines
            .iter()
            .all(|l| l.contains("/manifests/") || l.contains("/blobs/") || l.contains("GET /v2/ ")),
        "{lines:#?}"
    );

    // Per-layer metrics: bytes fetched and time to first byte of each lazy snapshot.
    let metrics = strata_ok(&root, &["metrics"]);
    for d in &strata_layers {
        let here = format!("layer=\"{d}\"");
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with("strata_blob_read_bytes_total{")
                    && l.contains(&here)
                    && !l.ends_with(" 0")),
            "{metrics}"
        );
        assert!(
            metrics.lines().any(
                |l| l.starts_with("strata_mount_time_to_first_byte_seconds{") && l.contains(&here)
            ),
            "{metrics}"
        );
    }

    // A running container, and a second one writing: each has its own upper layer. (runc's
    // state of containerd's containers is under /run/containerd: a name of this run only.)
    let long = format!("long-{}", std::process::id());
    ctd.ctr(&[
        "run",
        "-d",
        "--snapshotter",
        "strata",
        &image,
        &long,
        "sleep",
        "600",
    ]);
    assert_eq!(
        run_in(
            "writer",
            &[
                "/bin/sh",
                "-c",
                "echo changed > /etc/os-release; echo y > /new; cat /new"
            ]
        ),
        "y\n"
    );
    let exec = |id: &str, args: &[&str]| -> String {
        let mut a = vec!["task", "exec", "--exec-id", id, &long];
        a.extend_from_slice(args);
        ctd.ctr(&a)
    };
    assert_eq!(
        exec(
            "e1",
            &[
                "/bin/sh",
                "-c",
                "cat /etc/os-release; test -e /new || echo clean"
            ]
        ),
        "NAME=\"strata test\"\nID=strata\nclean\n"
    );

    // kill -9 of the plugin while the container runs: its lazy layers belong to the node
    // daemon, so its reads (even of chunks never fetched) keep working; the restarted
    // plugin serves new containers.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(snap.0.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let _ = snap.0.wait();
    assert_eq!(
        exec("e2", &["cat", "/opt/f/h", "/opt/keep/new"]),
        "fh\nnew\n"
    );
    let _ = fs::remove_file(&snap_sock);
    let _snap = snapshotter_with(&root, &snap_sock, &["--no-prefetch"]);
    assert_eq!(
        ctd.ctr_eventually(&["snapshots", "--snapshotter", "strata", "ls"])
            .matches("Committed")
            .count(),
        2
    );
    assert_eq!(run_in("c3", &["cat", "/opt/d/f2"]), "two\n");

    // kill -9 of the node daemon: the layers' FUSE mounts die with it (the running container
    // loses them, as documented); the next container's Prepare finds them dead, and they are
    // mounted again (by the restarted daemon's restore, or the snapshotter).
    let daemon = kill_node_daemon(&root);
    assert_eq!(run_in("c3b", &["cat", "/opt/f/g"]), "fg\n");
    // …by a new daemon (started on demand by the snapshotter's mount request).
    assert!(daemon_pid(&root).is_some_and(|p| p != daemon));
    // A daemon stopped with --forget takes its mounts along and restores none: the next
    // container's layers are mounted again by the snapshotter.
    strata_ok(&root, &["daemon", "--stop", "--forget"]);
    assert!(!strata_tests::util::is_mounted(
        &root.join("snapshotter/snapshots/1/fs")
    ));
    assert_eq!(run_in("c3c", &["cat", "/opt/keep/new"]), "new\n");

    // The plain gzip image: not lazily pullable, unpacked into ordinary snapshots.
    let out = strata_ok(&root, &["rpull", "--address", &sock, &plain]);
    assert!(out.contains("0 mounted lazily, 2 unpacked"), "{out}");
    let out = ctd.ctr(&[
        "run",
        "--rm",
        "--snapshotter",
        "strata",
        &plain,
        "p1",
        "cat",
        "/etc/os-release",
    ]);
    assert_eq!(out, "NAME=\"strata test\"\nID=strata\n");

    // The registry goes away: what was read once (now in the node's cache) still starts.
    assert_eq!(
        run_in("c4", &["/bin/sh", "-c", "cat /opt/big.bin | wc -c"]).trim(),
        (8 << 20).to_string()
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(reg.pid() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert_eq!(
        run_in(
            "c5",
            &[
                "/bin/sh",
                "-c",
                "cat /opt/big.bin | wc -c; cat /opt/keep/new"
            ]
        ),
        format!("{}\nnew\n", 8 << 20).replace(' ', "")
    );
    let out = ctd.ctr(&[
        "run",
        "--rm",
        "--snapshotter",
        "strata",
        &plain,
        "p2",
        "cat",
        "/opt/d/f2",
    ]);
    assert_eq!(out, "two\n");

    // Removing the containers and images: the snapshots go, and so do the lazy mounts.
    let o = ctd.try_ctr(&["task", "kill", "-s", "SIGKILL", &long]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ctd.try_ctr(&["task", "delete", &long]).status.success() {
        assert!(Instant::now() < deadline, "task long never stopped");
        std::thread::sleep(Duration::from_millis(200));
    }
    ctd.ctr(&["container", "rm", &long]);
    ctd.ctr(&["image", "rm", "--sync", &image, &plain]);
    assert_all_gone(&ctd, "default", &root);
    let dirs = fs::read_dir(root.join("snapshotter/snapshots"))
        .unwrap()
        .count();
    assert_eq!(dirs, 0, "snapshot directories left");
    drop(ctd);
    stop_node_daemon(&root);
    fs::remove_dir_all(&tmp).ok();
}

/// A layer whose TOC the registry serves corrupt: `rpull` fails naming it, without hanging, and
/// leaves nothing in containerd (no image, no lease, no snapshot).
#[test]
fn rpull_of_a_corrupt_toc_fails_and_leaves_nothing() {
    let tmp = scratch("snapshotter-bad-toc").unwrap();
    let reg_dir = tmp.join("registry");
    let reg = TestRegistry::start(&reg_dir, None).unwrap();
    let image = busybox_image(&tmp, &reg.addr);
    // The layer's TOC where the manifest places it, one byte flipped in the registry's copy.
    let local = tmp.join("local");
    let json =
        |p: &Path| -> serde_json::Value { serde_json::from_slice(&fs::read(p).unwrap()).unwrap() };
    let blob = |root: &Path, d: &str| root.join("blobs/sha256").join(&d["sha256:".len()..]);
    let index = json(&local.join("index.json"));
    let manifest_digest = index["manifests"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let manifest = json(&blob(&local, &manifest_digest));
    let layer = &manifest["layers"][0];
    let digest = layer["digest"].as_str().unwrap();
    let number =
        |key: &str| -> u64 { layer["annotations"][key].as_str().unwrap().parse().unwrap() };
    let (offset, size) = (
        number("dev.strata.toc.offset"),
        number("dev.strata.toc.size"),
    );
    let hex = &digest["sha256:".len()..];
    let data = reg_dir.join(format!(
        "data/docker/registry/v2/blobs/sha256/{}/{hex}/data",
        &hex[..2]
    ));
    let mut bytes = fs::read(&data).unwrap();
    bytes[(offset + size / 2) as usize] ^= 0xff;
    fs::write(&data, bytes).unwrap();

    let (run, snap_sock, root) = node_dirs(&tmp);
    let _snap = snapshotter(&root, &snap_sock);
    let ctd = Containerd::start(&tmp, run.path(), &snap_sock);
    let rpull = Command::new(strata_bin())
        .arg("--root")
        .arg(&root)
        .args(["rpull", "--address"])
        .arg(&ctd.sock)
        .arg(&image)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = nix::unistd::Pid::from_raw(rpull.id() as i32);
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || done.send(rpull.wait_with_output()));
    let Ok(out) = finished.recv_timeout(Duration::from_secs(60)) else {
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        panic!("rpull hangs on a corrupt TOC");
    };
    let out = out.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("the TOC of layer {digest}")),
        "{stderr}"
    );
    assert_eq!(ctd.ctr(&["images", "ls", "-q"]), "");
    assert!(!ctd.ctr(&["leases", "ls"]).contains("strata-rpull"));
    let snaps = ctd.ctr(&["snapshots", "--snapshotter", "strata", "ls"]);
    assert_eq!(snaps.lines().count(), 1, "{snaps}");
    drop(ctd);
    stop_node_daemon(&root);
    fs::remove_dir_all(&tmp).ok();
}
