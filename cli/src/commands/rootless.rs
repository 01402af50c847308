//! Containers and builds for an ordinary user: the rootless user namespace.
//!
//! As rootless podman does, an ordinary user's containers run in a user namespace where the
//! user is root (uid and gid 0 map to the user) and uids/gids 1..65536 map to the user's
//! subordinate ranges (`/etc/subuid`, `/etc/subgid`, mapped by the setuid `newuidmap` and
//! `newgidmap` through `unshare --map-auto`), with a mount namespace of its own. One holder
//! process (`strata userns-holder`, its pid in `ROOT/userns.pid`) keeps the namespaces alive;
//! `run`, `exec`, `start`, `stop`, `kill`, `logs`, `ps`, `rm`, `commit`, `build` and the `diff`
//! of a container re-run themselves inside it through `nsenter`. There, strata is root of the
//! namespace: its node daemon (a second one, files under `ROOT/userns/`; the images are the
//! same store's) mounts FUSE itself, the writable layer is strata's FUSE layer (kernel
//! overlayfs refuses metacopy and trusted xattrs in a user namespace), and runc runs the
//! container rootless. Image files owned by root show as the user's outside the namespace,
//! those of uid N as the user's N-th subordinate uid, as rootless podman shows them.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::GlobalArgs;

fn pid_file(root: &Path) -> PathBuf {
    root.join("userns.pid")
}

/// The holder's pid, if one runs for `root`: a live process of this user whose command line
/// is strata's holder.
fn running_holder(root: &Path) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(pid_file(root))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let is_holder = cmd.split(|&b| b == 0).any(|a| a == b"userns-holder");
    let uid = std::fs::metadata(format!("/proc/{pid}"))
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
        .ok()?;
    (is_holder && uid == nix::unistd::geteuid().as_raw()).then_some(pid)
}

/// Starts the holder (in new user and mount namespaces) unless one runs; answers its pid.
fn holder(g: &GlobalArgs) -> anyhow::Result<i32> {
    std::fs::create_dir_all(&g.root).with_context(|| format!("creating {}", g.root.display()))?;
    // One holder per root, whoever asks at the same time.
    let lock_path = g.root.join("userns.lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("opening {}", lock_path.display()))?;
    let _lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| anyhow::anyhow!("locking {}: {e}", lock_path.display()))?;
    if let Some(pid) = running_holder(&g.root) {
        return Ok(pid);
    }
    let _ = std::fs::remove_file(pid_file(&g.root));
    let exe = std::env::current_exe().context("finding the strata binary")?;
    let mut child = Command::new("unshare")
        .args([
            "--user",
            "--mount",
            "--propagation",
            "private",
            "--map-auto",
            "--map-root-user",
            "--",
        ])
        .arg(&exe)
        .arg("--root")
        .arg(&g.root)
        .arg("userns-holder")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .context("running unshare (util-linux) to make the rootless user namespace")?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(pid) = running_holder(&g.root) {
            return Ok(pid);
        }
        if let Some(status) = child.try_wait()? {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut err);
            }
            bail!(
                "making the rootless user namespace failed ({status}): {}\n\
                 (it needs newuidmap/newgidmap, package uidmap, and ranges for this user in \
                 /etc/subuid and /etc/subgid)",
                err.trim()
            );
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("the rootless user namespace did not come up in 10 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `strata userns-holder`: records its pid and keeps the namespaces it was started in alive.
pub fn hold(g: &GlobalArgs) -> anyhow::Result<()> {
    let path = pid_file(&g.root);
    let tmp = g.root.join(format!("userns.pid.{}", std::process::id()));
    std::fs::write(&tmp, format!("{}\n", std::process::id()))
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// For an ordinary user, re-runs this command inside the rootless user namespace (replacing
/// this process: signals, terminal and exit status are the command's own). Returns only when
/// the command runs here.
pub fn reenter(g: &GlobalArgs) -> anyhow::Result<()> {
    if nix::unistd::geteuid().is_root() {
        return Ok(());
    }
    let pid = holder(g)?;
    let exe = std::env::current_exe().context("finding the strata binary")?;
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
    let args: Vec<_> = std::env::args_os().skip(1).collect();
    let err = Command::new("nsenter")
        .arg(format!("--target={pid}"))
        .args(["--user", "--mount"])
        .arg(format!("--wd={}", cwd.display()))
        .arg("--")
        .arg(exe)
        .args(args)
        // The same store inside (where root's default would be /var/lib/strata).
        .env("STRATA_ROOT", &g.root)
        .exec();
    Err(err).context("running nsenter (util-linux) into the rootless user namespace")
}
