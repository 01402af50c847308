//! `strata run`, `ps`, `rm`: containers on lazily mounted images. A container's root is a
//! writable view (kernel overlayfs over the lazy mount) that the node daemon mounts; the OCI
//! runtime (`runc`, or `--runtime`) runs it in the foreground.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};
use strata_builder::container::{default_name, hosts_file, ContainerRecord, Containers, Owner};
use strata_builder::runtime::{self, ImageProcess, SpecOptions, Volume};
use strata_fs::service::protocol::Request;
use strata_fs::service::MountRequest;

use super::daemon::{self, DaemonSettings};
use super::open_store;
use crate::GlobalArgs;

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Network {
    /// The host's network namespace.
    Host,
    /// A network namespace of its own with only loopback.
    None,
}

#[derive(clap::Args)]
pub struct RunArgs {
    /// Keep standard input open.
    #[arg(short = 'i', long)]
    pub interactive: bool,
    /// Give the container a terminal.
    #[arg(short = 't', long)]
    pub tty: bool,
    /// Remove the container (its writable layer too) when it exits.
    #[arg(long)]
    pub rm: bool,
    /// Run in the background and print the container's id (`logs` shows its output).
    #[arg(short = 'd', long)]
    pub detach: bool,
    /// Name of the container (default `strata_` and the start of its id).
    #[arg(long)]
    pub name: Option<String>,
    /// Environment variable `KEY=VALUE` (or `KEY`: this process's value); repeatable.
    #[arg(short = 'e', long = "env")]
    pub env: Vec<String>,
    /// File of `KEY=VALUE` lines; repeatable.
    #[arg(long)]
    pub env_file: Vec<PathBuf>,
    /// Working directory inside the container.
    #[arg(short = 'w', long)]
    pub workdir: Option<String>,
    /// USER[:GROUP] (names or ids) to run as.
    #[arg(short = 'u', long)]
    pub user: Option<String>,
    /// Replace the image's ENTRYPOINT ("" clears it).
    #[arg(long)]
    pub entrypoint: Option<String>,
    /// Bind mount HOST:CONTAINER[:ro]; repeatable.
    #[arg(short = 'v', long = "volume")]
    pub volumes: Vec<String>,
    /// Network of the container.
    #[arg(long, value_enum, default_value = "host")]
    pub network: Network,
    /// Host name inside the container (default: the start of its id).
    #[arg(long)]
    pub hostname: Option<String>,
    /// OCI runtime to run the container with.
    #[arg(long, default_value = "runc")]
    pub runtime: PathBuf,
    /// Fetch only what the container reads (no background fetch of the image's layers).
    #[arg(long)]
    pub no_prefetch: bool,
    #[command(flatten)]
    pub registry: super::registry::RegistryArgs,
    #[command(flatten)]
    pub daemon: DaemonSettings,
    /// Image to run.
    pub image: String,
    /// Command and arguments (replace the image's CMD).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<String>,
}

/// Finds an executable by name in `PATH`, or checks a path.
pub(crate) fn find_program(p: &Path) -> Option<PathBuf> {
    if p.components().count() > 1 {
        return p.is_file().then(|| p.to_path_buf());
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(p))
            .find(|c| c.is_file())
    })
}

/// `USER[:GROUP]` resolved through the container root's `/etc/passwd` and `/etc/group`, read
/// as the container would see them (never through a symlink out of the root, regular files of
/// at most 4 MiB).
pub(crate) fn resolve_user_in(rootfs: &Path, spec: &str) -> anyhow::Result<runtime::ResolvedUser> {
    let read = |p: &str| {
        strata_builder::build::fsops::read_root_file(rootfs, p, 4 << 20)
            .with_context(|| format!("reading {p} of the image"))
    };
    Ok(runtime::resolve_user(
        spec,
        &read("/etc/passwd")?,
        &read("/etc/group")?,
    )?)
}

fn now_rfc3339() -> String {
    strata_fs::rfc3339::now()
}

/// `strata run`: create a container from an image and run it in the foreground; the exit code
/// is the container's.
pub fn run(g: &GlobalArgs, a: RunArgs) -> anyhow::Result<()> {
    // Everything that can be checked before anything is created.
    let runtime = find_program(&a.runtime)
        .with_context(|| format!("OCI runtime {} not found", a.runtime.display()))?;
    let volumes: Vec<Volume> = a
        .volumes
        .iter()
        .map(|v| v.parse())
        .collect::<Result<_, _>>()?;
    let mut env = Vec::new();
    for f in &a.env_file {
        let text =
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        env.extend(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(str::to_string),
        );
    }
    env.extend(a.env.iter().cloned());
    let store = open_store(g)?;
    let containers = Containers::new(&store);
    if let Some(n) = &a.name {
        if containers.name_taken(n) {
            bail!("the container name {n:?} is already in use");
        }
    }
    let (id, dir) = containers.create_dir()?;
    let rootfs = dir.rootfs();
    // From here on a failure removes what was made: no half-created container.
    let cleanup = |g: &GlobalArgs| {
        let _ = daemon::call_running(
            g,
            &Request::Unmount {
                mountpoint: rootfs.clone(),
                lazy: true,
            },
        );
        let _ = containers.remove_dir(&id);
    };
    let prepared = (|| -> anyhow::Result<(ContainerRecord, PathBuf)> {
        let mut req = MountRequest::new(a.image.clone(), rootfs.clone());
        req.upper = Some(dir.layer());
        req.setuid = true;
        req.prefetch = !a.no_prefetch;
        req.registry = a.registry.options();
        let info = daemon::call(g, &a.daemon, &Request::Mount(Box::new(req)))
            .with_context(|| format!("mounting {}", a.image))?;
        let manifest = info["manifest"].as_str().unwrap_or_default().to_string();
        let m = store.manifest(&manifest)?;
        let config: serde_json::Value = serde_json::from_slice(&store.read_blob(&m.config.digest)?)
            .context("the image config")?;
        let image = ImageProcess::from_config(&config);
        let args = runtime::process_args(&image, a.entrypoint.as_deref(), &a.command)?;
        let user_spec = a.user.clone().unwrap_or_else(|| image.user.clone());
        let user = resolve_user_in(&rootfs, &user_spec)?;
        let hostname = a.hostname.clone().unwrap_or_else(|| id[..12].to_string());
        let etc = [
            ("hosts", hosts_file(&hostname)),
            ("hostname", format!("{hostname}\n")),
            (
                "resolv.conf",
                std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default(),
            ),
        ];
        let mut etc_files = Vec::new();
        for (name, body) in etc {
            let path = dir.etc_file(name);
            std::fs::write(&path, body).with_context(|| format!("writing {}", path.display()))?;
            etc_files.push((path, PathBuf::from("/etc").join(name)));
        }
        let spec = runtime::container_spec(&SpecOptions {
            rootfs: rootfs.clone(),
            env: runtime::environment(&image.env, &env, &hostname, &user.home, a.tty),
            cwd: a
                .workdir
                .clone()
                .unwrap_or_else(|| image.working_dir.clone()),
            args: args.clone(),
            user,
            hostname,
            tty: a.tty,
            host_network: matches!(a.network, Network::Host),
            etc_files,
            volumes,
        })?;
        let mount_points: Vec<PathBuf> = spec
            .mounts()
            .iter()
            .flatten()
            .map(|m| m.destination().clone())
            .collect();
        let bundle = dir.bundle();
        std::fs::write(
            bundle.join("config.json"),
            serde_json::to_vec_pretty(&spec)?,
        )
        .context("writing the runtime bundle")?;
        let record = ContainerRecord {
            id: id.clone(),
            name: a.name.clone().unwrap_or_else(|| default_name(&id)),
            image: a.image.clone(),
            manifest,
            command: args,
            created: now_rfc3339(),
            status: "running".into(),
            exit_code: None,
            auto_remove: a.rm,
            mount_points,
            runtime: runtime.clone(),
            owner: None,
        };
        containers.save(&record)?;
        Ok((record, bundle))
    })();
    let (mut record, _bundle) = match prepared {
        Ok(p) => p,
        Err(e) => {
            cleanup(g);
            return Err(e);
        }
    };
    if a.detach {
        spawn_monitor(g, &record, &containers)?;
        println!("{id}");
        return Ok(());
    }
    let code = run_attached(g, &containers, &mut record, a.interactive || a.tty)?;
    if code != 0 {
        std::process::exit(code);
    }
    Ok(())
}

/// Runs a created container in the foreground with the runtime, records how it ended and, for
/// `--rm`, removes it; returns its exit code.
fn run_attached(
    g: &GlobalArgs,
    containers: &Containers,
    record: &mut ContainerRecord,
    stdin: bool,
) -> anyhow::Result<i32> {
    let dir = containers.dir(&record.id);
    let runtime = find_program(&record.runtime)
        .with_context(|| format!("OCI runtime {} not found", record.runtime.display()))?;
    // A previous run leaves the runtime's state behind: start from none.
    let _ = Command::new(&runtime)
        .arg("--root")
        .arg(containers.runtime_root())
        .args(["delete", "--force", &record.id])
        .output();
    record.status = "running".into();
    record.exit_code = None;
    record.owner = Owner::current();
    containers.save(record)?;
    let status = status_forwarding_signals(
        Command::new(&runtime)
            .arg("--root")
            .arg(containers.runtime_root())
            .arg("run")
            .arg("--bundle")
            .arg(dir.bundle())
            .arg(&record.id)
            .stdin(if stdin {
                std::process::Stdio::inherit()
            } else {
                std::process::Stdio::null()
            }),
    )
    .with_context(|| format!("starting {}", runtime.display()));
    let code = match &status {
        Ok(s) => s
            .code()
            .unwrap_or_else(|| 128 + std::os::unix::process::ExitStatusExt::signal(s).unwrap_or(0)),
        Err(_) => 125,
    };
    record.status = "exited".into();
    record.exit_code = Some(code);
    record.owner = None;
    if record.auto_remove {
        let _ = Command::new(&runtime)
            .arg("--root")
            .arg(containers.runtime_root())
            .args(["delete", "--force", &record.id])
            .output();
        let _ = daemon::call_running(
            g,
            &Request::Unmount {
                mountpoint: dir.rootfs(),
                lazy: true,
            },
        );
        let _ = containers.remove_dir(&record.id);
    } else if dir.dir.exists() {
        // (Removed meanwhile by `rm -f`: nothing to record.)
        containers.save(record)?;
    }
    status?;
    Ok(code)
}

/// The signals `strata run`/`exec` pass on to the container, as `docker run` does.
const FORWARDED: [i32; 6] = [
    signal_hook::consts::SIGINT,
    signal_hook::consts::SIGTERM,
    signal_hook::consts::SIGHUP,
    signal_hook::consts::SIGQUIT,
    signal_hook::consts::SIGUSR1,
    signal_hook::consts::SIGUSR2,
];

/// Runs the runtime (`runc run`/`exec` in the foreground) to its end, passing on the signals
/// this process is sent: the runtime forwards them to the container's process. A signal from
/// the terminal (Ctrl-C, without `-t`) already reaches the runtime, which shares our process
/// group, and is not sent twice. Meanwhile those signals do not end this process, so a
/// container that survives them keeps its record and `--rm` still cleans up.
fn status_forwarding_signals(cmd: &mut Command) -> std::io::Result<std::process::ExitStatus> {
    use signal_hook::iterator::exfiltrator::WithOrigin;
    use signal_hook::low_level::siginfo::Cause;
    let mut signals = signal_hook::iterator::SignalsInfo::<WithOrigin>::new(FORWARDED)?;
    let mut child = cmd.spawn()?;
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX));
    let handle = signals.handle();
    let proxy = std::thread::spawn(move || {
        for origin in signals.forever() {
            if matches!(origin.cause, Cause::Kernel) {
                continue;
            }
            if let Ok(sig) = nix::sys::signal::Signal::try_from(origin.signal) {
                let _ = nix::sys::signal::kill(pid, sig);
            }
        }
    });
    let status = child.wait();
    handle.close();
    let _ = proxy.join();
    status
}

/// Starts a container in the background: a `strata container-monitor` process runs it with
/// its output in the container's log and records its exit.
fn spawn_monitor(
    g: &GlobalArgs,
    record: &ContainerRecord,
    containers: &Containers,
) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    use std::os::unix::process::CommandExt;
    let log = containers.dir(&record.id).log();
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&log)
        .with_context(|| format!("opening {}", log.display()))?;
    let err = out.try_clone()?;
    let exe = std::env::current_exe().context("locating the strata binary")?;
    let mut monitor = Command::new(exe)
        .arg("--root")
        .arg(&g.root)
        .arg("--log-level")
        .arg(&g.log_level)
        .arg("container-monitor")
        .arg(&record.id)
        .stdin(std::process::Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .spawn()
        .context("starting the container monitor")?;
    // Return once the container runs (as `docker run -d`) under the monitor (its record names
    // it, so the container never looks orphaned), or has ended already.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let started = match std::fs::read(containers.dir(&record.id).record()) {
            Ok(b) => serde_json::from_slice::<ContainerRecord>(&b).is_ok_and(|r| {
                r.status != "running"
                    || (r.owner.map(|o| o.pid) == Some(monitor.id())
                        && containers
                            .runtime_state(&r)
                            .is_some_and(|s| s != "creating"))
            }),
            Err(_) => true, // ended and removed itself (--rm)
        };
        if started {
            return Ok(());
        }
        if let Ok(Some(status)) = monitor.try_wait() {
            // A short-lived container may have run and ended already.
            let ended = std::fs::read(containers.dir(&record.id).record())
                .ok()
                .and_then(|b| serde_json::from_slice::<ContainerRecord>(&b).ok())
                .is_none_or(|r| r.status != "running");
            if ended {
                return Ok(());
            }
            bail!(
                "the container monitor ended at once ({status}): see {}",
                log.display()
            );
        }
        if std::time::Instant::now() >= deadline {
            bail!("the container monitor did not start the container");
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

#[derive(clap::Args)]
pub struct MonitorArgs {
    /// The container.
    pub id: String,
}

/// `strata container-monitor ID` (internal): runs a detached container and records its exit.
pub fn monitor(g: &GlobalArgs, a: MonitorArgs) -> anyhow::Result<()> {
    let store = open_store(g)?;
    let containers = Containers::new(&store);
    let mut record = containers.find(&a.id)?;
    run_attached(g, &containers, &mut record, false)?;
    Ok(())
}

#[derive(clap::Args)]
pub struct StartArgs {
    /// Attach: run in the foreground and exit with the container's code.
    #[arg(short = 'a', long)]
    pub attach: bool,
    #[command(flatten)]
    pub daemon: DaemonSettings,
    /// The container.
    pub container: String,
}

/// `strata start`: run a stopped container again (its writable layer kept).
pub fn start(g: &GlobalArgs, a: StartArgs) -> anyhow::Result<()> {
    let store = open_store(g)?;
    let containers = Containers::new(&store);
    let mut record = containers.find(&a.container)?;
    if record.status == "running" {
        bail!("container {} is already running", record.name);
    }
    // A killed daemon is started again and takes its mounts back (the container's root too).
    daemon::call(g, &a.daemon, &Request::Ping).context("starting the strata daemon")?;
    if !strata_fs::service::is_mount_point(&containers.dir(&record.id).rootfs()) {
        bail!(
            "the root of container {} is no longer mounted (was the daemon stopped with --forget?)",
            record.name
        );
    }
    if a.attach {
        let code = run_attached(g, &containers, &mut record, false)?;
        if code != 0 {
            std::process::exit(code);
        }
        return Ok(());
    }
    record.status = "running".into();
    record.owner = Owner::current();
    containers.save(&record)?;
    spawn_monitor(g, &record, &containers)?;
    println!("{}", record.name);
    Ok(())
}

/// Sends `signal` to a container's process through its runtime.
fn signal(containers: &Containers, r: &ContainerRecord, signal: &str) -> anyhow::Result<()> {
    let runtime = find_program(&r.runtime)
        .with_context(|| format!("OCI runtime {} not found", r.runtime.display()))?;
    let out = Command::new(runtime)
        .arg("--root")
        .arg(containers.runtime_root())
        .args(["kill", &r.id, signal])
        .output()?;
    if !out.status.success() {
        bail!(
            "signalling {}: {}",
            r.name,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Waits until the record says the container exited; false after `timeout`.
fn wait_exited(containers: &Containers, id: &str, timeout: std::time::Duration) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        match containers.find(id) {
            Ok(r) if r.status == "running" => {}
            _ => return true,
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[derive(clap::Args)]
pub struct StopArgs {
    /// Seconds to wait after SIGTERM before SIGKILL.
    #[arg(short = 't', long, default_value_t = 10)]
    pub time: u64,
    /// Containers.
    #[arg(required = true)]
    pub containers: Vec<String>,
}

/// `strata stop`: SIGTERM, then SIGKILL after `-t` seconds.
pub fn stop(g: &GlobalArgs, a: StopArgs) -> anyhow::Result<()> {
    let store = open_store(g)?;
    let containers = Containers::new(&store);
    for key in &a.containers {
        let r = containers.find(key)?;
        if r.status != "running" {
            println!("{}", r.name);
            continue;
        }
        let _ = signal(&containers, &r, "TERM");
        if !wait_exited(&containers, &r.id, std::time::Duration::from_secs(a.time)) {
            let _ = signal(&containers, &r, "KILL");
            if !wait_exited(&containers, &r.id, std::time::Duration::from_secs(10)) {
                bail!("container {} did not stop", r.name);
            }
        }
        println!("{}", r.name);
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct KillArgs {
    /// Signal to send.
    #[arg(short = 's', long, default_value = "KILL")]
    pub signal: String,
    /// Containers.
    #[arg(required = true)]
    pub containers: Vec<String>,
}

/// `strata kill`: send a signal (default SIGKILL).
pub fn kill(g: &GlobalArgs, a: KillArgs) -> anyhow::Result<()> {
    let store = open_store(g)?;
    let containers = Containers::new(&store);
    for key in &a.containers {
        let r = containers.find(key)?;
        if r.status != "running" {
            bail!("container {} is not running", r.name);
        }
        signal(&containers, &r, a.signal.trim_start_matches("SIG"))?;
        println!("{}", r.name);
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct LogsArgs {
    /// Keep printing what the container writes until it exits.
    #[arg(short = 'f', long)]
    pub follow: bool,
    /// The container.
    pub container: String,
}

/// `strata logs`: what a detached container wrote.
pub fn logs(g: &GlobalArgs, a: LogsArgs) -> anyhow::Result<()> {
    use std::io::{Read, Write};
    let store = open_store(g)?;
    let containers = Containers::new(&store);
    let r = containers.find(&a.container)?;
    let path = containers.dir(&r.id).log();
    let mut f = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let mut out = std::io::stdout();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = f.read(&mut buf)?;
        if n > 0 {
            out.write_all(&buf[..n])?;
            continue;
        }
        out.flush()?;
        let running = containers.find(&r.id).is_ok_and(|c| c.status == "running");
        if !a.follow || !running {
            // One last read: what was written just before the exit.
            let mut rest = Vec::new();
            f.read_to_end(&mut rest)?;
            out.write_all(&rest)?;
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

#[derive(clap::Args)]
pub struct PsArgs {
    /// Show every container, not only running ones.
    #[arg(short = 'a', long)]
    pub all: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `strata ps`: containers, newest first.
pub fn ps(g: &GlobalArgs, a: PsArgs) -> anyhow::Result<()> {
    let store = open_store(g)?;
    let list: Vec<ContainerRecord> = Containers::new(&store)
        .list()
        .into_iter()
        .filter(|r| a.all || r.status == "running")
        .collect();
    if a.json {
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(());
    }
    println!(
        "{:<14} {:<40} {:<30} {:<26} {:<12} NAMES",
        "CONTAINER ID", "IMAGE", "COMMAND", "CREATED", "STATUS"
    );
    for r in list {
        let status = match (r.status.as_str(), r.exit_code) {
            ("exited", Some(c)) => format!("Exited ({c})"),
            ("exited", None) => "Exited".to_string(),
            ("running", _) => "Up".to_string(),
            (s, _) => s.to_string(),
        };
        let mut cmd = r.command.join(" ");
        if cmd.chars().count() > 28 {
            cmd = cmd.chars().take(27).collect();
            cmd.push('…');
        }
        println!(
            "{:<14} {:<40} {:<30} {:<26} {:<12} {}",
            r.id.get(..12).unwrap_or(&r.id),
            r.image,
            format!("\"{cmd}\""),
            ago(&r.created),
            status,
            r.name
        );
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct RmArgs {
    /// Kill a running container first.
    #[arg(short = 'f', long)]
    pub force: bool,
    /// OCI runtime the containers run with.
    #[arg(long, default_value = "runc")]
    pub runtime: PathBuf,
    #[command(flatten)]
    pub daemon: DaemonSettings,
    /// Containers (names, ids or unique id prefixes).
    #[arg(required = true)]
    pub containers: Vec<String>,
}

/// `strata rm`: remove containers, their mounts and writable layers.
pub fn rm(g: &GlobalArgs, a: RmArgs) -> anyhow::Result<()> {
    let store = open_store(g)?;
    let containers = Containers::new(&store);
    let mut failed = false;
    for key in &a.containers {
        let result = (|| -> anyhow::Result<()> {
            let r = containers.find(key)?;
            if r.status == "running" && !a.force {
                bail!("container {} is running: stop it first or use -f", r.name);
            }
            // The runtime it runs with (crun's state is not runc's).
            let runtime = find_program(&r.runtime)
                .or_else(|| find_program(&a.runtime))
                .with_context(|| format!("OCI runtime {} not found", r.runtime.display()))?;
            let out = Command::new(runtime)
                .arg("--root")
                .arg(containers.runtime_root())
                .args(["delete", "--force", &r.id])
                .output()?;
            if !out.status.success() && containers.runtime_state(&r).is_some() {
                bail!(
                    "cannot remove container {}: {}",
                    r.name,
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            let rootfs = containers.dir(&r.id).rootfs();
            if strata_fs::service::is_mount_point(&rootfs) {
                // Through the daemon (started if it was killed: it takes its mounts back).
                let req = Request::Unmount {
                    mountpoint: rootfs.clone(),
                    lazy: true,
                };
                if let Err(e) = daemon::call(g, &a.daemon, &req) {
                    tracing::warn!("unmounting {}: {e:#}", rootfs.display());
                }
                // What no daemon holds any more: the overlay and the lazy mount under it.
                let lower = strata_fs::service::writable_lower_dir(&store, &rootfs);
                for m in [&rootfs, &lower] {
                    if strata_fs::service::is_mount_point(m) {
                        nix::mount::umount2(m.as_path(), nix::mount::MntFlags::MNT_DETACH)
                            .with_context(|| format!("unmounting {}", m.display()))?;
                    }
                }
            }
            containers.remove_dir(&r.id)?;
            println!("{}", r.name);
            Ok(())
        })();
        if let Err(e) = result {
            eprintln!("strata: error: {e:#}");
            failed = true;
        }
    }
    if failed {
        std::process::exit(1);
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct CommitArgs {
    /// Commit message (the history entry's comment).
    #[arg(short = 'm', long)]
    pub message: Option<String>,
    /// Author.
    #[arg(short = 'a', long)]
    pub author: Option<String>,
    /// Dockerfile instruction to apply to the image config (CMD, ENTRYPOINT, ENV, WORKDIR,
    /// USER, LABEL, EXPOSE, VOLUME, STOPSIGNAL); repeatable.
    #[arg(short = 'c', long = "change")]
    pub changes: Vec<String>,
    /// Pause a running container while its layer is read.
    #[arg(long)]
    pub pause: bool,
    /// The container.
    pub container: String,
    /// Name of the new image (default: the container's name).
    pub reference: Option<String>,
}

/// `strata commit`: the container's changes become a new layer of a new image.
pub fn commit(g: &GlobalArgs, a: CommitArgs) -> anyhow::Result<()> {
    let store = open_store(g)?;
    let containers = Containers::new(&store);
    let r = containers.find(&a.container)?;
    let dst = strata_fs::reference::Reference::parse(a.reference.as_deref().unwrap_or(&r.name))?;
    super::build::refuse_cache_name(&dst)?;
    // Instructions are checked before anything is read or written.
    let mut probe = serde_json::json!({"config": {}});
    for c in &a.changes {
        strata_builder::commit::apply_change(&mut probe, c)?;
    }
    let dir = containers.dir(&r.id);
    if !strata_fs::service::is_mount_point(&dir.rootfs()) {
        bail!("the root of container {} is not mounted", r.name);
    }
    let base = store.resolve(&r.manifest)?;
    let runtime = find_program(&r.runtime);
    let paused = a.pause && r.status == "running" && runtime.is_some();
    let runc = |verb: &str| {
        if let Some(rt) = &runtime {
            let _ = Command::new(rt)
                .arg("--root")
                .arg(containers.runtime_root())
                .args([verb, &r.id])
                .output();
        }
    };
    if paused {
        runc("pause");
    }
    let result = strata_builder::commit::commit(
        &store,
        &r.manifest,
        &base.descriptor.annotations,
        &dir.layer().join("upper"),
        &dir.rootfs(),
        &r.mount_points,
        &dst,
        &strata_builder::commit::CommitOptions {
            message: a.message.clone().unwrap_or_default(),
            author: a.author.clone().unwrap_or_default(),
            created_by: r.command.join(" "),
            changes: a.changes.clone(),
        },
    );
    if paused {
        runc("resume");
    }
    let committed = result.with_context(|| format!("committing {}", r.name))?;
    println!("{}", committed.manifest.digest);
    Ok(())
}

#[derive(clap::Args)]
pub struct HistoryArgs {
    /// Do not truncate the output.
    #[arg(long)]
    pub no_trunc: bool,
    /// Print only the image ids.
    #[arg(short = 'q', long)]
    pub quiet: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// The image.
    pub image: String,
}

fn ago(created: &str) -> String {
    let Ok(t) =
        time::OffsetDateTime::parse(created, &time::format_description::well_known::Rfc3339)
    else {
        return created.to_string();
    };
    format!(
        "{} ago",
        human_duration(time::OffsetDateTime::now_utc() - t)
    )
}

/// A duration as Docker prints one (go-units' `HumanDuration`): "Less than a second",
/// "About a minute", "3 hours", "2 weeks", "5 years".
fn human_duration(d: time::Duration) -> String {
    let s = d.whole_seconds().max(0);
    let (minutes, hours) = (s / 60, (s as f64 / 3600.0).round() as i64);
    match s {
        0 => "Less than a second".into(),
        1 => "1 second".into(),
        2..=59 => format!("{s} seconds"),
        _ if minutes == 1 => "About a minute".into(),
        _ if minutes < 60 => format!("{minutes} minutes"),
        _ if hours == 1 => "About an hour".into(),
        _ if hours < 48 => format!("{hours} hours"),
        _ if hours < 24 * 7 * 2 => format!("{} days", hours / 24),
        _ if hours < 24 * 30 * 2 => format!("{} weeks", hours / 24 / 7),
        _ if hours < 24 * 365 * 2 => format!("{} months", hours / 24 / 30),
        _ => format!("{} years", hours / 24 / 365),
    }
}

/// `strata history`: an image's history, newest first, with Docker's columns.
pub fn history(g: &GlobalArgs, a: HistoryArgs) -> anyhow::Result<()> {
    let store = open_store(g)?;
    let rec = store.resolve(&a.image)?;
    let m = store.manifest(&rec.descriptor.digest)?;
    let config: serde_json::Value = serde_json::from_slice(&store.read_blob(&m.config.digest)?)?;
    let empty = Vec::new();
    let hist = config["history"].as_array().unwrap_or(&empty);
    let mut layers = m.layers.iter();
    let mut rows: Vec<serde_json::Value> = Vec::new();
    for h in hist {
        let size = if h["empty_layer"].as_bool() == Some(true) {
            0
        } else {
            layers.next().map_or(0, |l| l.size)
        };
        rows.push(serde_json::json!({
            "created": h["created"].as_str().unwrap_or(""),
            "created_by": h["created_by"].as_str().unwrap_or(""),
            "size": size,
            "comment": h["comment"].as_str().unwrap_or(""),
            "empty_layer": h["empty_layer"].as_bool() == Some(true),
        }));
    }
    rows.reverse();
    // The image ID, as Docker's: the config's digest.
    let hex = m.config.digest.trim_start_matches("sha256:").to_string();
    for (i, r) in rows.iter_mut().enumerate() {
        r["id"] = serde_json::json!(if i == 0 {
            if a.no_trunc {
                m.config.digest.clone()
            } else {
                hex.get(..12).unwrap_or(&hex).to_string()
            }
        } else {
            "<missing>".to_string()
        });
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    if a.quiet {
        for r in &rows {
            println!("{}", r["id"].as_str().unwrap_or(""));
        }
        return Ok(());
    }
    println!(
        "{:<14} {:<16} {:<46} {:<10} COMMENT",
        "IMAGE", "CREATED", "CREATED BY", "SIZE"
    );
    for r in &rows {
        let mut by = r["created_by"].as_str().unwrap_or("").to_string();
        if !a.no_trunc && by.chars().count() > 45 {
            by = by.chars().take(44).collect::<String>() + "…";
        }
        println!(
            "{:<14} {:<16} {:<46} {:<10} {}",
            r["id"].as_str().unwrap_or(""),
            ago(r["created"].as_str().unwrap_or("")),
            by,
            super::human_bytes(r["size"].as_u64().unwrap_or(0)),
            r["comment"].as_str().unwrap_or("")
        );
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct ExecArgs {
    /// Keep standard input open.
    #[arg(short = 'i', long)]
    pub interactive: bool,
    /// Give the process a terminal.
    #[arg(short = 't', long)]
    pub tty: bool,
    /// Environment variable `KEY=VALUE`; repeatable.
    #[arg(short = 'e', long = "env")]
    pub env: Vec<String>,
    /// Working directory.
    #[arg(short = 'w', long)]
    pub workdir: Option<String>,
    /// USER[:GROUP] (names resolved in the container).
    #[arg(short = 'u', long)]
    pub user: Option<String>,
    /// The container.
    pub container: String,
    /// Command and arguments.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
    pub command: Vec<String>,
}

/// `strata exec`: run another process in a running container; exits with its code.
pub fn exec(g: &GlobalArgs, a: ExecArgs) -> anyhow::Result<()> {
    let store = open_store(g)?;
    let containers = Containers::new(&store);
    let r = containers.find(&a.container)?;
    if r.status != "running" {
        bail!("container {} is not running", r.name);
    }
    let runtime = find_program(&r.runtime)
        .with_context(|| format!("OCI runtime {} not found", r.runtime.display()))?;
    let rootfs = containers.dir(&r.id).rootfs();
    let mut cmd = Command::new(runtime);
    cmd.arg("--root").arg(containers.runtime_root()).arg("exec");
    if a.tty {
        cmd.arg("--tty");
    }
    if let Some(u) = &a.user {
        let user = resolve_user_in(&rootfs, u)?;
        cmd.arg("--user").arg(format!("{}:{}", user.uid, user.gid));
        for g in &user.additional_gids {
            cmd.arg("--additional-gids").arg(g.to_string());
        }
    }
    if let Some(w) = &a.workdir {
        cmd.arg("--cwd").arg(w);
    }
    for e in &a.env {
        cmd.arg("--env").arg(e);
    }
    cmd.arg(&r.id).args(&a.command);
    cmd.stdin(if a.interactive || a.tty {
        std::process::Stdio::inherit()
    } else {
        std::process::Stdio::null()
    });
    let status = status_forwarding_signals(&mut cmd).context("running the runtime")?;
    let code = status.code().unwrap_or_else(|| {
        128 + std::os::unix::process::ExitStatusExt::signal(&status).unwrap_or(0)
    });
    if code != 0 {
        std::process::exit(code);
    }
    Ok(())
}
