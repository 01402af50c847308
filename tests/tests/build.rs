#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failure should abort loudly
//! `strata build` on a lazily pulled busybox base, side by side with `buildah bud`: Docker's
//! textbook examples (ENTRYPOINT + CMD, WORKDIR vs `RUN cd`, `--chown`, ADD of a local tar), the
//! same file trees and config fields as buildah's, history rows, and the layer cache.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use strata_tests::image::scratch;
use strata_tests::registry::TestRegistry;
use strata_tests::snapshot::{self, Snapshot, SnapshotOptions};
use strata_tests::util::{busybox_image, strata, strata_bin, strata_ok, Mounted};

/// buildah with storage of its own (a short run root: podman's tools refuse long ones).
struct Buildah {
    root: PathBuf,
    runroot: tempfile::TempDir,
}

impl Buildah {
    fn new(tmp: &Path) -> Buildah {
        Buildah {
            root: tmp.join("buildah"),
            runroot: tempfile::Builder::new()
                .prefix("strata-ba")
                .tempdir_in("/tmp")
                .unwrap(),
        }
    }

    fn cmd(&self) -> Command {
        let mut c = Command::new("buildah");
        c.arg("--root")
            .arg(&self.root)
            .arg("--runroot")
            .arg(self.runroot.path())
            .args(["--storage-driver", "overlay"]);
        c
    }

    fn ok(&self, args: &[&str]) -> String {
        let o = self.cmd().args(args).output().expect("buildah runs");
        assert!(
            o.status.success(),
            "buildah {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    fn bud(&self, ctx: &Path, tag: &str) {
        self.ok(&[
            "bud",
            "--tls-verify=false",
            "--ulimit",
            "nofile=20000:20000",
            "--ulimit",
            "nproc=1000:1000",
            "--network",
            "host",
            "-t",
            tag,
            &ctx.to_string_lossy(),
        ]);
    }

    /// The image's root (mounted by buildah) and its config.
    fn tree_and_config(&self, tag: &str) -> (Snapshot, serde_json::Value) {
        let c = self.ok(&["from", tag]).trim().to_string();
        let m = self.ok(&["mount", &c]).trim().to_string();
        let tree = comparable(Path::new(&m));
        self.ok(&["umount", &c]);
        self.ok(&["rm", &c]);
        let inspect: serde_json::Value =
            serde_json::from_str(&self.ok(&["inspect", "--type", "image", tag])).unwrap();
        (tree, inspect["OCIv1"]["config"].clone())
    }
}

impl Drop for Buildah {
    fn drop(&mut self) {
        let _ = self.cmd().args(["rm", "--all"]).output();
        let _ = self.cmd().args(["rmi", "--all", "--force"]).output();
    }
}

/// What buildah leaves of its RUN mount points (strata leaves them out of layers, as Docker).
const RUN_ARTIFACTS: &[&str] = &[
    "dev",
    "proc",
    "sys",
    "run",
    "etc/hostname",
    "etc/hosts",
    "etc/resolv.conf",
];

/// A snapshot for comparing two builders: the root itself, RUN artifacts and times left out
/// (RUN makes files at different moments).
fn comparable(root: &Path) -> Snapshot {
    let mut s = snapshot::snapshot(root, SnapshotOptions::default()).unwrap();
    s.retain(|p, _| {
        let p = String::from_utf8_lossy(p);
        !p.is_empty()
            && !RUN_ARTIFACTS
                .iter()
                .any(|a| p == *a || p.starts_with(&format!("{a}/")))
    });
    for e in s.values_mut() {
        e.mtime = (0, 0);
    }
    s
}

/// The config fields Docker users rely on, buildah's own label left out.
fn fields(config: &serde_json::Value) -> serde_json::Value {
    let mut labels = config["Labels"].clone();
    if let Some(l) = labels.as_object_mut() {
        l.remove("io.buildah.version");
        if l.is_empty() {
            labels = serde_json::Value::Null;
        }
    }
    let mut env: Vec<String> = config["Env"]
        .as_array()
        .map(|a| a.iter().map(|s| s.as_str().unwrap().to_string()).collect())
        .unwrap_or_default();
    env.sort();
    serde_json::json!({
        "Cmd": config["Cmd"], "Entrypoint": config["Entrypoint"], "Env": env,
        "WorkingDir": config["WorkingDir"], "User": config["User"],
        "ExposedPorts": config["ExposedPorts"], "Labels": labels,
    })
}

fn build(root: &Path, ctx: &Path, tag: &str) -> String {
    let o = Command::new(strata_bin())
        .arg("--root")
        .arg(root)
        .args(["build", "-t", tag])
        .arg(ctx)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "strata build: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn run(root: &Path, args: &[&str]) -> String {
    let o = strata(root, &[&["run", "--rm"], args].concat());
    assert!(
        o.status.success(),
        "run {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn blobs(root: &Path) -> usize {
    fs::read_dir(root.join("blobs/sha256")).unwrap().count()
}

#[test]
fn builds_match_buildah_and_cache() {
    let tmp = scratch("build").unwrap();
    let reg = TestRegistry::start(&tmp.join("registry"), None).unwrap();
    let base = busybox_image(&tmp, &reg.addr);
    let root = tmp.join("node");
    let buildah = Buildah::new(&tmp);

    // 1. ENTRYPOINT ["ping"] + CMD: default args, trailing args, --entrypoint.
    let ping = tmp.join("ping");
    fs::create_dir_all(&ping).unwrap();
    fs::write(
        ping.join("Dockerfile"),
        format!("FROM {base}\nENTRYPOINT [\"ping\"]\nCMD [\"-c\", \"1\", \"127.0.0.1\"]\n"),
    )
    .unwrap();
    build(&root, &ping, "t/ping:v1");
    assert!(run(&root, &["t/ping:v1"]).contains("1 packets transmitted"));
    assert!(run(&root, &["t/ping:v1", "-c", "2", "127.0.0.1"]).contains("2 packets transmitted"));
    assert_eq!(
        run(&root, &["--entrypoint", "/bin/echo", "t/ping:v1", "hi"]),
        "hi\n"
    );

    // 2. WORKDIR vs `RUN cd`, --chown, ADD of a local tar, metadata.
    let ctx = tmp.join("ctx");
    fs::create_dir_all(ctx.join("dir/sub")).unwrap();
    fs::write(ctx.join("file.txt"), b"file\n").unwrap();
    fs::write(ctx.join("dir/sub/deep.txt"), b"deep\n").unwrap();
    fs::write(ctx.join("ignored.md"), b"no\n").unwrap();
    fs::write(ctx.join(".dockerignore"), b"*.md\n").unwrap();
    let tar = Command::new("tar")
        .arg("-czf")
        .arg(ctx.join("archive.tar.gz"))
        .arg("-C")
        .arg(&ctx)
        .args(["dir"])
        .status()
        .unwrap();
    assert!(tar.success());
    fs::write(
        ctx.join("Dockerfile"),
        format!(
            "ARG BASE={base}\nFROM $BASE\nARG GREETING=hello\n\
             RUN cd /tmp && touch in-tmp.txt\nRUN touch sample.txt\nWORKDIR /work\n\
             RUN touch sample.txt && echo \"$GREETING\" > greeting\n\
             COPY --chown=11:22 file.txt /owned/\nADD --chown=11:22 file.txt /added/\n\
             ADD archive.tar.gz /unpacked/\nCOPY dir /copied\nCOPY * /all/\n\
             ENV APP=demo PATH=/usr/local/bin:/usr/bin:/bin\nLABEL org.example.name=\"demo app\" v=1\n\
             EXPOSE 8080 53/udp\nUSER app\nCMD [\"-c\", \"echo $APP\"]\n"
        ),
    )
    .unwrap();
    build(&root, &ctx, "t/demo:v1");
    assert_eq!(run(&root, &["t/demo:v1"]), "demo\n");
    let listing = run(
        &root,
        &[
            "-u",
            "0",
            "--entrypoint",
            "/bin/sh",
            "t/demo:v1",
            "-c",
            "ls /sample.txt /tmp/in-tmp.txt /work/sample.txt; test ! -e /tmp/sample.txt && echo ok; \
             stat -c '%u:%g' /owned/file.txt /added/file.txt; cat /unpacked/dir/sub/deep.txt /work/greeting; \
             ls /all",
        ],
    );
    assert_eq!(
        listing,
        "/sample.txt\n/tmp/in-tmp.txt\n/work/sample.txt\nok\n11:22\n11:22\ndeep\nhello\n\
         Dockerfile\narchive.tar.gz\nfile.txt\nsub\n"
    );

    // 3. The same Dockerfiles under buildah: the same trees and config fields.
    let mnt = tmp.join("mnt");
    for (dir, tag) in [(&ping, "t/ping:v1"), (&ctx, "t/demo:v1")] {
        let btag = format!("localhost/{}", tag.replace("t/", "b-"));
        buildah.bud(dir, &btag);
        let (want, want_config) = buildah.tree_and_config(&btag);
        let m = Mounted::new(&root, tag, &mnt).unwrap();
        let got = comparable(&mnt);
        m.unmount().unwrap();
        let d = snapshot::diff(&want, &got);
        assert!(d.is_empty(), "{tag}: strata vs buildah:\n{}", d.join("\n"));
        let inspect: serde_json::Value =
            serde_json::from_str(&strata_ok(&root, &["inspect", tag])).unwrap();
        assert_eq!(
            fields(&inspect["config"]["config"]),
            fields(&want_config),
            "{tag}: config (strata, buildah)"
        );
    }

    // 4. History: one row per instruction, metadata-only ones as empty layers.
    let inspect: serde_json::Value =
        serde_json::from_str(&strata_ok(&root, &["inspect", "t/demo:v1"])).unwrap();
    let history = inspect["config"]["history"].as_array().unwrap().clone();
    let ours: Vec<&serde_json::Value> = history
        .iter()
        .filter(|h| h["comment"] == "strata build")
        .collect();
    // FROM and ARG make no rows; the 14 others do, metadata-only ones as empty layers.
    let empty: Vec<bool> = ours.iter().map(|h| h["empty_layer"] == true).collect();
    let (f, t) = (false, true);
    assert_eq!(
        empty,
        vec![f, f, t, f, f, f, f, f, f, t, t, t, t, t],
        "{history:#?}"
    );

    // 5. Cache: an unchanged rebuild runs nothing and makes no layer; a changed COPY source
    // rebuilds from that step on.
    let before = blobs(&root);
    let out = build(&root, &ctx, "t/demo:v2");
    assert!(!out.contains("Running in"), "{out}");
    assert_eq!(out.matches("Using cache").count(), 8, "{out}");
    assert!(blobs(&root) <= before + 2, "a cached rebuild wrote layers");
    fs::write(ctx.join("file.txt"), b"changed\n").unwrap();
    let out = build(&root, &ctx, "t/demo:v3");
    assert_eq!(out.matches("Using cache").count(), 3, "{out}");
    assert_eq!(
        run(&root, &["t/demo:v3", "-c", "cat /owned/file.txt"]),
        "changed\n"
    );

    // Bad Dockerfiles: the line is named, nothing is built.
    let bad = tmp.join("bad");
    fs::create_dir_all(&bad).unwrap();
    fs::write(
        bad.join("Dockerfile"),
        format!("FROM {base}\nRUN true\nFROBNICATE\n"),
    )
    .unwrap();
    let o = strata(&root, &["build", &bad.to_string_lossy()]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("Dockerfile:3") && err.contains("FROBNICATE"),
        "{err}"
    );
    fs::write(bad.join("Dockerfile"), format!("FROM {base}\nRUN exit 7\n")).unwrap();
    let o = strata(&root, &["build", &bad.to_string_lossy()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("Dockerfile:2") && err.contains("7"),
        "{err}"
    );

    strata_ok(&root, &["daemon", "--stop"]);
    let left = fs::read_to_string("/proc/self/mounts").unwrap();
    assert!(!left.contains(&*root.to_string_lossy()), "{left}");
    drop(buildah);
    fs::remove_dir_all(&tmp).ok();
}

/// A multi-stage build: a C toolchain stage (this machine's gcc, binutils and libc files in an
/// image the test assembles and imports) compiles hello.c; only the binary goes into a
/// `scratch` final stage, which holds no compiler and is far smaller. buildah builds the same.
#[test]
fn multi_stage_build_keeps_only_the_binary() {
    let tmp = scratch("build-multi").unwrap();
    let reg = TestRegistry::start(&tmp.join("registry"), None).unwrap();
    let rootfs = tmp.join("toolchain");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/toolchain-rootfs.sh");
    let st = Command::new("bash")
        .arg(&script)
        .arg(&rootfs)
        .status()
        .unwrap();
    assert!(st.success(), "assembling the toolchain");
    // `strata import` of the rootfs tarball, pushed: the base is lazy on the building node.
    let local = tmp.join("local");
    let mut tar = Command::new("tar")
        .arg("-C")
        .arg(&rootfs)
        .args(["-cf", "-", "."])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let o = Command::new(strata_bin())
        .arg("--root")
        .arg(&local)
        .args(["import", "-c", "CMD [\"/bin/sh\"]", "-", "c/toolchain:v1"])
        .stdin(tar.stdout.take().unwrap())
        .output()
        .unwrap();
    assert!(tar.wait().unwrap().success());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let base = format!("{}/c/toolchain:v1", reg.addr);
    strata_ok(&local, &["push", "c/toolchain:v1", &base]);

    let ctx = tmp.join("ctx");
    fs::create_dir_all(&ctx).unwrap();
    fs::write(
        ctx.join("hello.c"),
        "#include <stdio.h>\nint main(void) { puts(\"hello, world\"); return 0; }\n",
    )
    .unwrap();
    fs::write(
        ctx.join("Dockerfile"),
        format!(
            "FROM {base} AS build\nWORKDIR /src\nCOPY hello.c .\n\
             RUN mkdir -p /out && gcc -O2 -static -o /out/hello hello.c\n\n\
             FROM scratch\nCOPY --from=build /out/hello /hello\nCMD [\"/hello\"]\n"
        ),
    )
    .unwrap();
    let root = tmp.join("node");
    build(&root, &ctx, "t/hello:v1");
    assert_eq!(run(&root, &["t/hello:v1"]), "hello, world\n");
    let size = |image: &str| -> u64 {
        let v: serde_json::Value =
            serde_json::from_str(&strata_ok(&root, &["inspect", image])).unwrap();
        v["manifest"]["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["size"].as_u64().unwrap())
            .sum()
    };
    let (final_size, base_size) = (size("t/hello:v1"), size(&base));
    assert!(
        final_size * 20 < base_size,
        "final {final_size} B vs toolchain {base_size} B"
    );
    let mnt = tmp.join("mnt");
    let m = Mounted::new(&root, "t/hello:v1", &mnt).unwrap();
    let tree = comparable(&mnt);
    m.unmount().unwrap();
    let names: Vec<String> = tree
        .keys()
        .map(|k| String::from_utf8_lossy(k).to_string())
        .collect();
    assert_eq!(
        names,
        vec!["hello"],
        "the final image holds only the binary"
    );

    let buildah = Buildah::new(&tmp);
    buildah.bud(&ctx, "localhost/b-hello:v1");
    let (want, want_config) = buildah.tree_and_config("localhost/b-hello:v1");
    let d = snapshot::diff(&want, &tree);
    assert!(d.is_empty(), "strata vs buildah:\n{}", d.join("\n"));
    let inspect: serde_json::Value =
        serde_json::from_str(&strata_ok(&root, &["inspect", "t/hello:v1"])).unwrap();
    assert_eq!(fields(&inspect["config"]["config"]), fields(&want_config));
    strata_ok(&root, &["daemon", "--stop"]);
    drop(buildah);
    fs::remove_dir_all(&tmp).ok();
}

/// `strata save` writes a Docker archive that skopeo reads (and GNU tar unpacks to the same
/// tree); `strata load` takes it back, and takes podman's docker-archive and oci-archive.
#[test]
fn save_and_load_archives() {
    let tmp = scratch("archives").unwrap();
    let reg = TestRegistry::start(&tmp.join("registry"), None).unwrap();
    let base = busybox_image(&tmp, &reg.addr);
    let root = tmp.join("node");
    let ctx = tmp.join("ctx");
    fs::create_dir_all(&ctx).unwrap();
    fs::write(ctx.join("data.txt"), b"data\n").unwrap();
    fs::write(
        ctx.join("Dockerfile"),
        format!("FROM {base}\nRUN rm /etc/motd && mkdir /made\nCOPY data.txt /made/\n"),
    )
    .unwrap();
    build(&root, &ctx, "t/saved:v1");
    let archive = tmp.join("saved.tar");
    strata_ok(
        &root,
        &["save", "-o", &archive.to_string_lossy(), "t/saved:v1"],
    );

    // skopeo reads it as a Docker archive; its layers unpack to the image's tree.
    let layout = tmp.join("oci");
    let o = Command::new("skopeo")
        .arg("copy")
        .arg(format!("docker-archive:{}", archive.display()))
        .arg(format!("oci:{}:v1", layout.display()))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let unpacked = tmp.join("unpacked");
    strata_tests::util::unpack_with_tar(&layout, &unpacked);
    let mnt = tmp.join("mnt");
    let m = Mounted::new(&root, "t/saved:v1", &mnt).unwrap();
    let opts = SnapshotOptions::default();
    let mut want = snapshot::snapshot(&mnt, opts).unwrap();
    m.unmount().unwrap();
    let mut got = snapshot::snapshot(&unpacked, opts).unwrap();
    want.remove(&b""[..]);
    got.remove(&b""[..]);
    let d = snapshot::diff(&want, &got);
    assert!(
        d.is_empty(),
        "strata mount vs tar unpack:\n{}",
        d.join("\n")
    );
    assert!(!got.contains_key(&b"etc/motd"[..]) && got.contains_key(&b"made/data.txt"[..]));

    // strata load takes its own archive back.
    let other = tmp.join("other");
    strata_ok(&other, &["load", "-i", &archive.to_string_lossy()]);
    assert_eq!(
        run(&other, &["t/saved:v1", "-c", "cat /made/data.txt"]),
        "data\n"
    );

    // podman's archives of a gzip image (podman cannot write zstd layers to a Docker archive).
    let podman_root = tmp.join("podman");
    let runroot = tempfile::Builder::new()
        .prefix("strata-pl")
        .tempdir_in("/tmp")
        .unwrap();
    let podman = |args: &[&str]| {
        let o = Command::new("podman")
            .arg("--root")
            .arg(&podman_root)
            .arg("--runroot")
            .arg(runroot.path())
            .args(["--storage-driver", "overlay"])
            .args(args)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "podman {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    let src = tmp.join("src-c-busybox-v1");
    let name = format!("{}/c/gzbox:v1", reg.addr);
    let o = Command::new("skopeo")
        .args(["copy", "-q", "--dest-tls-verify=false"])
        .arg(format!("oci:{}:v1", src.display()))
        .arg(format!("docker://{name}"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    podman(&["pull", "-q", "--tls-verify=false", &name]);
    let docker_tar = tmp.join("podman-docker.tar");
    let oci_tar = tmp.join("podman-oci.tar");
    podman(&["save", "-o", &docker_tar.to_string_lossy(), &name]);
    podman(&[
        "save",
        "--format",
        "oci-archive",
        "-o",
        &oci_tar.to_string_lossy(),
        &name,
    ]);
    let fresh = tmp.join("fresh");
    for t in [&docker_tar, &oci_tar] {
        let out = strata_ok(&fresh, &["load", "-i", &t.to_string_lossy()]);
        assert!(out.starts_with("Loaded image: "), "{out}");
        let loaded = out.trim().trim_start_matches("Loaded image: ").to_string();
        assert_eq!(run(&fresh, &[&loaded, "-c", "echo loaded"]), "loaded\n");
    }
    podman(&["system", "reset", "-f"]);
    for r in [&root, &other, &fresh] {
        let _ = strata(r, &["daemon", "--stop"]);
    }
    fs::remove_dir_all(&tmp).ok();
}

/// ARG scoping and --build-arg, heredocs (RUN and COPY), ADD of a URL with --checksum,
/// ONBUILD triggers of a stage used as a base, --target.
#[test]
fn dockerfile_features() {
    let tmp = scratch("build-features").unwrap();
    let reg = TestRegistry::start(&tmp.join("registry"), None).unwrap();
    let base = busybox_image(&tmp, &reg.addr);
    let root = tmp.join("node");
    strata_ok(&root, &["pull", &base]);
    let inspect: serde_json::Value =
        serde_json::from_str(&strata_ok(&root, &["inspect", &base])).unwrap();
    let digest = inspect["manifest"]["config"]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let url = format!("http://{}/v2/c/busybox/blobs/{digest}", reg.addr);
    let ctx = tmp.join("ctx");
    fs::create_dir_all(&ctx).unwrap();
    let dockerfile = |checksum: &str| {
        format!(
            "ARG V=1\nFROM {base} AS first\nARG V\nARG OTHER=x\n\
             RUN echo \"v=$V other=$OTHER\" > /args\n\
             RUN <<EOF\necho heredoc > /here\nEOF\n\
             COPY <<CONF /etc/conf\nvalue=$V\nCONF\n\
             ADD --checksum={checksum} {url} /dl/blob\n\
             ONBUILD RUN echo triggered > /onbuild\n\n\
             FROM first AS second\nRUN cat /onbuild\n\n\
             FROM {base} AS unused\nRUN exit 1\n"
        )
    };
    fs::write(ctx.join("Dockerfile"), dockerfile(&digest)).unwrap();
    let o = Command::new(strata_bin())
        .arg("--root")
        .arg(&root)
        .args([
            "build",
            "--build-arg",
            "V=7",
            "--target",
            "second",
            "-t",
            "t/feat:v1",
        ])
        .arg(&ctx)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        !out.contains("exit 1"),
        "a stage the target does not need ran:\n{out}"
    );
    assert_eq!(
        run(
            &root,
            &["t/feat:v1", "-c", "cat /args /here /etc/conf /onbuild"]
        ),
        "v=7 other=x\nheredoc\nvalue=7\ntriggered\n"
    );
    // A changed build arg reaches the heredoc: no stale cache hit.
    strata_ok(
        &root,
        &[
            "build",
            "--build-arg",
            "V=8",
            "--target",
            "second",
            "-t",
            "t/feat:v2",
            &ctx.to_string_lossy(),
        ],
    );
    assert_eq!(
        run(&root, &["t/feat:v2", "-c", "cat /etc/conf"]),
        "value=8\n"
    );
    // The build cache's names are not for other images.
    let o = strata(
        &root,
        &["tag", "t/feat:v1", "localhost/strata-build-cache:0123"],
    );
    assert!(!o.status.success());
    let blob = run(&root, &["t/feat:v1", "-c", "cat /dl/blob"]);
    assert_eq!(strata_tests::image::sha256(blob.as_bytes()), digest);
    // A wrong checksum fails the build and names the URL.
    fs::write(
        ctx.join("Dockerfile"),
        dockerfile(&format!("sha256:{}", "0".repeat(64))),
    )
    .unwrap();
    let o = strata(
        &root,
        &["build", "--target", "first", &ctx.to_string_lossy()],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("checksum"), "{err}");
    strata_ok(&root, &["daemon", "--stop"]);
    fs::remove_dir_all(&tmp).ok();
}
