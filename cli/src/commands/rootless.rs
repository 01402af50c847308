//! Containers and builds for an ordinary user: the rootless user namespace.
//!
//! As rootless podman does, an ordinary user's containers run in a user namespace where the
//! user is root (uid and gid 0 map to the user) and uids/gids 1..65536 map to the user's
//! subordinate ranges (`/etc/subuid`, `/etc/subgid`, mapped by the setuid `newuidmap` and
//! `newgidmap` through `unshare --map-auto`), with a mount namespace of its own. One holder
//! process (`strata userns-holder`, its pid in `ROOT/userns.pid`) keeps the namespaces alive;
//! `run`, `exec`, `start`, `stop`, `kill`, `logs`, `ps`, `rm`, `commit`, `build` and the `diff`
//! of a container re-run themselves inside it through `nsenter`, and `strata unshare CMD` runs
//! any command there (as `podman unshare`); `inspect` and `stats` of a container run there too,
//! and `mounts` and `daemon --stop` also reach the daemon there. Without subordinate ids only
//! the user is mapped. There, strata is root of the
//! namespace: its node daemon (a second one, files under `ROOT/userns/`; the images are the
//! same store's) mounts FUSE itself, the writable layer is strata's FUSE layer (kernel
//! overlayfs refuses metacopy and trusted xattrs in a user namespace), and runc runs the
//! container rootless. Image files owned by root show as the user's outside the namespace,
//! those of uid N as the user's N-th subordinate uid, as rootless podman shows them.

use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::GlobalArgs;

fn pid_file(root: &Path) -> PathBuf {
    root.join("userns.pid")
}

/// Set in the environment of strata re-run in the rootless namespace: its node daemon keeps
/// its files apart (`strata_fs::layout`).
pub const MARKER: &str = "STRATA_USERNS";

/// The holder's pid, if one runs for `root`: a live process of this user, in a user namespace
/// other than ours, whose command line is strata's holder for this root.
fn running_holder(root: &Path) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(pid_file(root))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let args: Vec<&[u8]> = cmd.split(|&b| b == 0).collect();
    let is_holder = args.len() >= 3
        && args[args.len() - 2] == b"userns-holder"
        && args
            .windows(2)
            .any(|w| w[0] == b"--root" && w[1] == root.as_os_str().as_encoded_bytes());
    let uid = std::fs::metadata(format!("/proc/{pid}"))
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
        .ok()?;
    let other_ns = std::fs::read_link(format!("/proc/{pid}/ns/user")).ok()?
        != std::fs::read_link("/proc/self/ns/user").ok()?;
    (is_holder && other_ns && uid == nix::unistd::geteuid().as_raw()).then_some(pid)
}

/// Starts the holder (in new user and mount namespaces) unless one runs; answers its pid.
fn holder(g: &GlobalArgs) -> anyhow::Result<i32> {
    // The root is made (and checked to be this user's alone) before anything is written in it.
    super::open_store(g)?;
    // One holder per root, whoever asks at the same time.
    let lock_path = g.root.join("userns.lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&lock_path)
        .with_context(|| format!("opening {}", lock_path.display()))?;
    let _lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| anyhow::anyhow!("locking {}: {e}", lock_path.display()))?;
    if let Some(pid) = running_holder(&g.root) {
        return Ok(pid);
    }
    let _ = std::fs::remove_file(pid_file(&g.root));
    // A daemon of a previous holder's namespaces (the holder died: killed, logged out) would
    // keep answering with mounts the new namespace cannot see: it stops first, keeping its
    // records, so the next daemon mounts them again in the new namespace.
    let socket = g.root.join("userns/daemon.sock");
    if let Ok(mut c) = strata_fs::service::client::Client::connect(&socket) {
        let _ = c.call(&strata_fs::service::protocol::Request::Shutdown { forget: false });
        let gone = Instant::now() + Duration::from_secs(10);
        while strata_fs::service::client::Client::connect(&socket).is_ok() && Instant::now() < gone
        {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let exe = std::env::current_exe().context("finding the strata binary")?;
    let mut unshare = Command::new("unshare");
    // Mounts made on the host later (a build context, a volume's source) show inside.
    unshare.args(["--user", "--mount", "--propagation", "slave"]);
    if has_subordinate_ids() {
        unshare.arg("--map-auto");
    } else {
        // As podman: without subordinate ids only the user's own id is mapped (root inside);
        // images with files of other owners cannot be written where those files are.
        eprintln!(
            "strata: warning: no subordinate ids for this user in /etc/subuid: the rootless \
             namespace maps only the user (as root); add a range (usermod --add-subuids, \
             --add-subgids) for images with other owners"
        );
    }
    let mut child = unshare
        .args(["--map-root-user", "--"])
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
                 (it needs util-linux 2.38 or later for `unshare --map-auto`, newuidmap and \
                 newgidmap (package uidmap), and ranges for this user in /etc/subuid and \
                 /etc/subgid)",
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
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::io::Write::write_all(&mut f, format!("{}\n", std::process::id()).as_bytes())
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
    // Holding no directory busy.
    let _ = std::env::set_current_dir("/");
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

#[derive(clap::Args)]
pub struct UnshareArgs {
    /// The command and its arguments.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<std::ffi::OsString>,
}

/// `strata unshare [CMD...]`: runs CMD (default `$SHELL`, else /bin/sh) in the rootless user
/// namespace, as `podman unshare` does.
pub fn unshare(a: UnshareArgs) -> anyhow::Result<()> {
    if std::env::var_os(MARKER).is_none() {
        bail!("strata unshare is for an ordinary user (root needs no user namespace)");
    }
    let mut command = a.command;
    if command.is_empty() {
        command.push(std::env::var_os("SHELL").unwrap_or_else(|| "/bin/sh".into()));
    }
    let err = Command::new(&command[0]).args(&command[1..]).exec();
    Err(err).with_context(|| format!("running {}", command[0].to_string_lossy()))
}

/// Whether /etc/subuid gives this user subordinate ids (by name or uid).
fn has_subordinate_ids() -> bool {
    let uid = nix::unistd::geteuid();
    let name = nix::unistd::User::from_uid(uid)
        .ok()
        .flatten()
        .map(|u| u.name);
    std::fs::read_to_string("/etc/subuid").is_ok_and(|t| {
        t.lines().any(|l| {
            let owner = l.split(':').next().unwrap_or("");
            owner == uid.to_string() || Some(owner) == name.as_deref()
        })
    })
}

/// For an ordinary user, re-runs this command inside the rootless user namespace (replacing
/// this process: signals, terminal and exit status are the command's own). Returns only when
/// the command runs here.
pub fn reenter(g: &GlobalArgs) -> anyhow::Result<()> {
    if nix::unistd::geteuid().is_root() {
        return Ok(());
    }
    let pid = holder(g)?;
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
    let err = strata_in(g, pid, &cwd)?
        .args(std::env::args_os().skip(1))
        .exec();
    Err(err).context("running nsenter (util-linux) into the rootless user namespace")
}

/// `nsenter` into the namespaces of holder `pid`, in directory `cwd`, running this strata
/// binary (its arguments still to add) on the same store.
fn strata_in(g: &GlobalArgs, pid: i32, cwd: &Path) -> anyhow::Result<Command> {
    let exe = std::env::current_exe().context("finding the strata binary")?;
    let mut c = Command::new("nsenter");
    c.arg(format!("--target={pid}"))
        // Root inside as the user's own uid (mapped to 0), supplementary groups kept.
        .args(["--user", "--mount", "--preserve-credentials"])
        .arg(format!("--wd={}", cwd.display()))
        .arg("--")
        .arg(exe)
        // The same store inside (where root's default would be /var/lib/strata).
        .env("STRATA_ROOT", &g.root)
        .env(MARKER, "1");
    Ok(c)
}

/// Runs `strata ARGS` in the user's rootless namespace, if one is held and this is an
/// ordinary user outside it (so `mounts` and `daemon --stop` reach the daemon of the user's
/// containers too); answers its output, or `None` where there is no such namespace.
pub fn inside(g: &GlobalArgs, args: &[&str]) -> anyhow::Result<Option<std::process::Output>> {
    if nix::unistd::geteuid().is_root() || std::env::var_os(MARKER).is_some() {
        return Ok(None);
    }
    let Some(pid) = running_holder(&g.root) else {
        return Ok(None);
    };
    let mut child = strata_in(g, pid, Path::new("/"))?
        .arg("--log-level")
        .arg(&g.log_level)
        .args(
            g.config
                .iter()
                .flat_map(|c| [std::ffi::OsStr::new("--config"), c.as_os_str()]),
        )
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running nsenter (util-linux) into the rootless user namespace")?;
    let drain = |r: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut buf);
            }
            buf
        })
    };
    let stdout = drain(child.stdout.take().map(|r| Box::new(r) as _));
    let stderr = drain(child.stderr.take().map(|r| Box::new(r) as _));
    // A daemon there that never answers must not hang this command.
    let deadline = Instant::now() + INSIDE_TIMEOUT;
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "`strata {}` in the rootless namespace did not finish in {} s",
                args.join(" "),
                INSIDE_TIMEOUT.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Ok(Some(std::process::Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    }))
}

/// How long a command run by [`inside`] may take (a daemon stopping unmounts everything).
const INSIDE_TIMEOUT: Duration = Duration::from_secs(120);

/// Whether `key` names a container of the user's rootless namespace (its name, its id, or a
/// prefix of 12 or more characters of one id alone): `inspect` and `stats` of it run there.
pub fn names_container(g: &GlobalArgs, key: &str) -> bool {
    if nix::unistd::geteuid().is_root() || std::env::var_os(MARKER).is_some() || key.is_empty() {
        return false;
    }
    let Ok(dirs) = std::fs::read_dir(g.root.join("userns").join("containers")) else {
        return false;
    };
    let mut prefixed = 0;
    for d in dirs.flatten() {
        let Some((name, id)) = container_names(&d.path().join("container.json")) else {
            continue;
        };
        if name == key || id == key {
            return true;
        }
        if key.len() >= 12 && id.starts_with(key) {
            prefixed += 1;
        }
    }
    prefixed == 1
}

/// The name and id in a container record (a regular file of this user's, never followed
/// through a symlink, of a sane size).
fn container_names(path: &Path) -> Option<(String, String)> {
    use std::io::Read;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .ok()?;
    if !f.metadata().ok()?.is_file() {
        return None;
    }
    let mut raw = Vec::new();
    f.take(1 << 20).read_to_end(&mut raw).ok()?;
    let rec: serde_json::Value = serde_json::from_slice(&raw).ok()?;
    let field = |k: &str| rec.get(k)?.as_str().map(str::to_string);
    Some((field("name").unwrap_or_default(), field("id")?))
}

/// What a command run by [`inside`] said went wrong.
pub fn failure(out: &std::process::Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr);
    let err = err.trim().trim_start_matches("strata: error: ");
    if err.is_empty() {
        format!("it ended with {}", out.status)
    } else {
        err.to_string()
    }
}
