#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failure should abort loudly
//! `strata mount` as an ordinary user: the store under the user's `$XDG_DATA_HOME` (here
//! `~/.local/share/strata`), the node daemon running as that user, the FUSE mount made through
//! the setuid fusermount3, lazily from a registry; the mount is the user's alone.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Output};

use strata_tests::registry::TestRegistry;
use strata_tests::util::{busybox_image, is_mounted, strata_bin, UnmountUnder};

const USER: &str = "strata-rootless";

/// The test user's uid and gid, creating the user if needed.
fn test_user() -> (u32, u32) {
    if nix::unistd::User::from_name(USER).unwrap().is_none() {
        let o = Command::new("useradd")
            .args([
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                USER,
            ])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let u = nix::unistd::User::from_name(USER).unwrap().unwrap();
    (u.uid.as_raw(), u.gid.as_raw())
}

/// Runs strata as the test user with `home` as its home (no STRATA_ROOT: the default root).
fn as_user(uid: u32, gid: u32, home: &Path, args: &[&str]) -> Output {
    Command::new("setpriv")
        .arg(format!("--reuid={uid}"))
        .arg(format!("--regid={gid}"))
        .arg("--clear-groups")
        .arg("--")
        .arg(strata_bin())
        .args(args)
        .env_clear()
        .env("HOME", home)
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .current_dir(home)
        .output()
        .unwrap()
}

/// `sh -c SCRIPT` as the test user.
fn sh_as_user(uid: u32, gid: u32, script: &str) -> Output {
    Command::new("setpriv")
        .args([
            &format!("--reuid={uid}"),
            &format!("--regid={gid}"),
            "--clear-groups",
            "--",
            "sh",
            "-c",
            script,
        ])
        .output()
        .unwrap()
}

#[test]
fn an_ordinary_user_mounts_images_lazily() {
    // /dev/fuse is 0666 on a standard system (scripts/setup.sh makes it so in containers).
    let mode = fs::metadata("/dev/fuse").unwrap().permissions().mode();
    assert_eq!(
        mode & 0o006,
        0o006,
        "/dev/fuse must be usable by everyone (scripts/setup.sh)"
    );
    let (uid, gid) = test_user();
    // Under /tmp: every user can reach it.
    let tmp = tempfile::Builder::new()
        .prefix("strata-rootless")
        .tempdir_in("/tmp")
        .unwrap();
    // Whatever happens, nothing stays mounted under it (dropped before `tmp` is removed).
    let _unmount = UnmountUnder(tmp.path().to_path_buf());
    let reg = TestRegistry::start(&tmp.path().join("registry"), None).unwrap();
    let image = busybox_image(tmp.path(), &reg.addr);
    let home = tmp.path().join("home");
    let mnt = home.join("mnt");
    fs::create_dir_all(&mnt).unwrap();
    nix::unistd::chown(&home, Some(uid.into()), Some(gid.into())).unwrap();
    nix::unistd::chown(&mnt, Some(uid.into()), Some(gid.into())).unwrap();

    let o = as_user(uid, gid, &home, &["mount", &image, mnt.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(is_mounted(&mnt));
    // The user's own store, daemon and mount.
    let root = home.join(".local/share/strata");
    assert_eq!(fs::metadata(&root).unwrap().uid(), uid);
    let read = Command::new("setpriv")
        .args([
            &format!("--reuid={uid}"),
            &format!("--regid={gid}"),
            "--clear-groups",
            "--",
        ])
        .arg("cat")
        .arg(mnt.join("etc/motd"))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&read.stdout), "welcome\n");
    // Its caches where a user's caches go ($XDG_CACHE_HOME, by default ~/.cache).
    let packs = home.join(".cache/strata/packs");
    assert_eq!(fs::metadata(&packs).unwrap().uid(), uid);
    assert!(!root.join("cache").exists());
    let listed = as_user(uid, gid, &home, &["mounts"]);
    assert!(String::from_utf8_lossy(&listed.stdout).contains(mnt.to_str().unwrap()));
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let line = mountinfo
        .lines()
        .find(|l| l.contains(mnt.to_str().unwrap()))
        .unwrap();
    assert!(line.contains(&format!("user_id={uid}")), "{line}");
    // No allow_other: even root is refused, as with any user's FUSE mount.
    assert!(fs::read(mnt.join("etc/motd")).is_err());

    let o = as_user(uid, gid, &home, &["umount", mnt.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(!is_mounted(&mnt));

    // A writable view from strata's FUSE writable layer, the user's too: writes where the
    // image lets the user write (its /tmp), in overlayfs's form under DIR, owned by the user;
    // unmounted through fusermount3.
    let dir = home.join("dir");
    let o = as_user(
        uid,
        gid,
        &home,
        &[
            "mount",
            "--upper",
            dir.to_str().unwrap(),
            "--fuse-upper",
            &image,
            mnt.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // An unnamed file (O_TMPFILE), named with linkat, is the user's as any other (a dir fd
    // makes Python call linkat with AT_SYMLINK_FOLLOW rather than link(2)).
    let tmpfile = "import os; fd = os.open('tmp', os.O_TMPFILE | os.O_RDWR, 0o640); \
        os.write(fd, b'anon\\n'); here = os.open('.', os.O_RDONLY); \
        os.link('/proc/self/fd/%d' % fd, 'tmp/anon', src_dir_fd=here, follow_symlinks=True)";
    let script = format!(
        "set -e; cd {}; echo x > tmp/a; mkdir tmp/d; echo y > tmp/d/b; mv tmp/a tmp/c; \
         python3 -c \"{tmpfile}\"; \
         cat etc/motd; ! touch etc/motd 2>/dev/null; stat -c %u:%g tmp",
        mnt.display()
    );
    let w = sh_as_user(uid, gid, &script);
    assert!(w.status.success(), "{}", String::from_utf8_lossy(&w.stderr));
    // /tmp was copied up (the daemon could not chown it to root): the view still shows the
    // image's owner.
    assert_eq!(String::from_utf8_lossy(&w.stdout), "welcome\n0:0\n");
    let o = as_user(uid, gid, &home, &["umount", mnt.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(!is_mounted(&mnt));
    let upper = dir.join("upper");
    assert_eq!(fs::read(upper.join("tmp/c")).unwrap(), b"x\n");
    assert_eq!(fs::read(upper.join("tmp/d/b")).unwrap(), b"y\n");
    let anon = upper.join("tmp/anon");
    assert_eq!(fs::read(&anon).unwrap(), b"anon\n");
    let md = fs::metadata(&anon).unwrap();
    assert_eq!((md.uid(), md.mode() & 0o7777), (uid, 0o640));
    assert!(!upper.join("tmp/a").exists());
    assert_eq!(fs::metadata(upper.join("tmp/c")).unwrap().uid(), uid);
    assert_eq!(
        xattr::get(upper.join("tmp"), "user.strata.owner")
            .unwrap()
            .as_deref(),
        Some(&b"0:0"[..])
    );
    assert!(!upper.join("etc/motd").exists());
    let _ = as_user(uid, gid, &home, &["daemon", "--stop", "--forget"]);
    let left = fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !left.contains(tmp.path().to_str().unwrap()),
        "mounts left behind"
    );
}

/// Gives the test user subordinate uid and gid ranges (as `useradd` does for a normal user).
fn subordinate_ranges() -> u32 {
    let base = 300_000;
    for (file, flag) in [
        ("/etc/subuid", "--add-subuids"),
        ("/etc/subgid", "--add-subgids"),
    ] {
        let has = fs::read_to_string(file)
            .unwrap_or_default()
            .lines()
            .any(|l| l.starts_with(&format!("{USER}:")));
        if !has {
            let o = Command::new("usermod")
                .args([flag, &format!("{base}-{}", base + 65535), USER])
                .output()
                .unwrap();
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        }
    }
    let line = fs::read_to_string("/etc/subuid").unwrap();
    let l = line
        .lines()
        .find(|l| l.starts_with(&format!("{USER}:")))
        .unwrap();
    l.split(':').nth(1).unwrap().parse().unwrap()
}

/// The containers walk-through as an ordinary user: `run` (in the user's rootless user
/// namespace, runc rootless, strata's FUSE writable layer), `diff`, a `build`, `commit`, `push`, and a
/// lazy mount of the result from the registry into another store of the user's. Owners inside
/// are the image's; on disk, uid N of the container is the user's N-th subordinate uid.
#[test]
fn an_ordinary_user_runs_commits_and_pushes_containers() {
    let (uid, gid) = test_user();
    let sub = subordinate_ranges();
    let tmp = tempfile::Builder::new()
        .prefix("strata-rootless-run")
        .tempdir_in("/tmp")
        .unwrap();
    // Whatever happens, nothing stays mounted under it (dropped before `tmp` is removed).
    let _unmount = UnmountUnder(tmp.path().to_path_buf());
    let reg = TestRegistry::start(&tmp.path().join("registry"), None).unwrap();
    let image = busybox_image(tmp.path(), &reg.addr);
    let home = tmp.path().join("home");
    fs::create_dir_all(&home).unwrap();
    nix::unistd::chown(&home, Some(uid.into()), Some(gid.into())).unwrap();
    let user = |args: &[&str]| {
        let o = as_user(uid, gid, &home, args);
        assert!(
            o.status.success(),
            "strata {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let out = user(&[
        "run",
        "--name",
        "c1",
        &image,
        // The image's ENTRYPOINT is sh.
        "-c",
        "echo hello > /tmp/greeting; mkdir /opt/app; echo v2 > /opt/app/version; \
         chown 1000:1000 /opt/app/version; rm /opt/d/f1; \
         rm -r /opt/keep; mkdir /opt/keep; echo new > /opt/keep/n; id -u; stat -c %u /etc/motd",
    ]);
    assert_eq!(out, "0\n0\n");
    let diff = user(&["diff", "c1"]);
    for want in [
        "A /tmp/greeting",
        "A /opt/app/version",
        "D /opt/d/f1",
        "D /opt/keep",
        "A /opt/keep/n",
    ] {
        assert!(
            diff.lines().any(|l| l == want),
            "{want} missing in:\n{diff}"
        );
    }
    // On disk the container's uid 1000 is the user's 1000th subordinate uid.
    let root = home.join(".local/share/strata");
    let containers = root.join("userns/containers");
    let version = fs::read_dir(&containers)
        .unwrap()
        .flatten()
        .map(|e| e.path().join("layer/upper/opt/app/version"))
        .find(|p| p.exists())
        .expect("the container's upper layer");
    assert_eq!(fs::metadata(&version).unwrap().uid(), sub + 999);

    // A build, rootless the same way.
    let ctx = home.join("ctx");
    fs::create_dir_all(&ctx).unwrap();
    fs::write(
        ctx.join("Dockerfile"),
        format!("FROM {image}\nRUN echo built > /built && chown 1000 /built\nCOPY note /note\n"),
    )
    .unwrap();
    fs::write(ctx.join("note"), "noted\n").unwrap();
    for p in [&ctx, &ctx.join("Dockerfile"), &ctx.join("note")] {
        nix::unistd::chown(p.as_path(), Some(uid.into()), Some(gid.into())).unwrap();
    }
    user(&["build", "-t", "rootless/built:v1", ctx.to_str().unwrap()]);
    let out = user(&[
        "run",
        "--rm",
        "rootless/built:v1",
        "-c",
        "cat /built /note; stat -c %u /built",
    ]);
    assert_eq!(out, "built\nnoted\n1000\n");

    // The namespace itself, for a look from the user's side (as `podman unshare`).
    assert_eq!(
        user(&["unshare", "stat", "-c", "%u", version.to_str().unwrap()]),
        "1000\n"
    );

    let pushed = format!("{}/rootless/result:v1", reg.addr);
    user(&["commit", "c1", &pushed]);
    user(&["push", &pushed]);
    // From outside the namespace: a container's record, the mounts of the namespace's daemon
    // (a running container's root among them), and `daemon --stop` stopping that daemon too.
    let rec = user(&["inspect", "c1"]);
    assert!(rec.contains("\"c1\""), "{rec}");
    user(&["run", "-d", "--name", "c2", &image, "-c", "sleep 120"]);
    let mounts = user(&["mounts", "--json"]);
    let listed: serde_json::Value = serde_json::from_str(&mounts).unwrap();
    assert!(
        mounts.contains("userns/containers/") && mounts.contains("\"rootless\": true"),
        "the running container's root is not listed as the namespace's: {listed}"
    );
    let table = user(&["mounts"]);
    assert!(table.contains("(rootless ns)"), "{table}");
    let stopped = user(&["daemon", "--stop"]);
    assert!(
        stopped.contains("strata daemon of the rootless namespace stopped"),
        "{stopped}"
    );
    user(&["rm", "-f", "c2"]);
    user(&["rm", "c1"]);
    assert!(user(&["ps", "-a"]).lines().count() <= 1);

    // The result, lazily from the registry, in another store of the user's.
    let home2 = tmp.path().join("home2");
    let mnt = home2.join("mnt");
    fs::create_dir_all(&mnt).unwrap();
    for d in [&home2, &mnt] {
        nix::unistd::chown(d, Some(uid.into()), Some(gid.into())).unwrap();
    }
    let o = as_user(uid, gid, &home2, &["mount", &pushed, mnt.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let script = format!(
        "cd {}; cat tmp/greeting opt/app/version; stat -c %u:%g opt/app/version; \
         test ! -e opt/d/f1 && echo gone; test ! -e opt/keep/k1 && cat opt/keep/n",
        mnt.display()
    );
    let look = sh_as_user(uid, gid, &script);
    assert_eq!(
        String::from_utf8_lossy(&look.stdout),
        "hello\nv2\n1000:1000\ngone\nnew\n",
        "{}",
        String::from_utf8_lossy(&look.stderr)
    );
    let o = as_user(uid, gid, &home2, &["umount", mnt.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    // Stop what the test started: the daemons, the namespace holder and every process left
    // in its namespaces (the inner daemon), found by namespace, not by name.
    let _ = as_user(uid, gid, &home2, &["daemon", "--stop", "--forget"]);
    let stopped = as_user(uid, gid, &home, &["daemon", "--stop", "--forget"]);
    assert!(stopped.status.success());
    let holder: i32 = fs::read_to_string(root.join("userns.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let ns = fs::read_link(format!("/proc/{holder}/ns/user")).unwrap();
    let in_ns = || -> Vec<i32> {
        fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().to_string_lossy().parse::<i32>().ok())
            .filter(|pid| fs::read_link(format!("/proc/{pid}/ns/user")).is_ok_and(|n| n == ns))
            .collect()
    };
    // `daemon --stop` stopped the namespace's daemon too: only the holder is left.
    let left: Vec<String> = in_ns()
        .into_iter()
        .filter(|&p| p != holder)
        // An exited daemon whose parent has not reaped it yet holds nothing.
        .filter(|p| {
            fs::read_to_string(format!("/proc/{p}/stat")).is_ok_and(|st| {
                st.rsplit_once(')')
                    .is_some_and(|(_, r)| !r.trim_start().starts_with('Z'))
            })
        })
        .map(|p| {
            let cmd = fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
            String::from_utf8_lossy(&cmd).replace('\0', " ")
        })
        .collect();
    assert!(
        left.is_empty(),
        "processes left in the namespace after `daemon --stop` ({}): {left:?}",
        String::from_utf8_lossy(&stopped.stdout)
    );
    for e in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if fs::read_link(format!("/proc/{pid}/ns/user")).is_ok_and(|n| n == ns) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
    // Upper files owned by subordinate ids: removed as root.
    let left = fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !left.contains(tmp.path().to_str().unwrap()),
        "mounts left behind"
    );
}
