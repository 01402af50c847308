//! `strata daemon`: the node daemon serving the mount service on `ROOT/daemon.sock`, and the
//! client side every other command uses to reach it (starting it on demand).

use std::io::{BufRead, BufReader};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::{SigSet, Signal};
use strata_fs::layout::Layout;
use strata_fs::service::client::{CallError, Client};
use strata_fs::service::protocol::Request;
use strata_fs::service::{server, MountService, ServiceConfig};

use super::parse_size;
use crate::GlobalArgs;

const READY: &str = "strata-daemon-ready";

/// How long an on-demand daemon stays up with no mount and no request.
const IDLE_GRACE: Duration = Duration::from_secs(2);

/// Node-wide settings: they belong to the daemon (one cache, one cap for every mount).
#[derive(clap::Args, Clone, Debug)]
pub struct DaemonSettings {
    /// Memory cache of decompressed chunks, shared by every mount (e.g. 256M).
    #[arg(long, env = "STRATA_MEMORY_CACHE", default_value = "256M", value_parser = parse_size)]
    pub memory_cache: u64,
    /// Size cap of the node's disk cache of verified chunks, shared by every mount (0 disables;
    /// also caps the whole-file cache of passthrough mounts).
    #[arg(long, env = "STRATA_CACHE_SIZE", default_value = "10G", value_parser = parse_size)]
    pub cache_size: u64,
    /// Most entries (files, dirs, links) an image may have, all layers together: bounds the
    /// memory a hostile TOC can cost.
    #[arg(long, env = "STRATA_MAX_ENTRIES", default_value_t = strata_fs::format::types::DEFAULT_MAX_ENTRIES)]
    pub max_entries: u32,
    /// A lazy read of a small file fetches the chunks that follow it in the layer blob too, up
    /// to this many compressed bytes per request (0: only what was read).
    #[arg(long, env = "STRATA_NEIGHBOUR_FETCH", default_value = "256K", value_parser = parse_size)]
    pub neighbour_fetch: u64,
}

impl DaemonSettings {
    fn service_config(&self) -> ServiceConfig {
        ServiceConfig {
            memory_cache: usize::try_from(self.memory_cache).unwrap_or(usize::MAX),
            cache_size: self.cache_size,
            max_entries: self.max_entries,
            neighbour_fetch: self.neighbour_fetch,
            ..ServiceConfig::default()
        }
    }

    fn to_args(&self) -> Vec<String> {
        vec![
            "--memory-cache".into(),
            self.memory_cache.to_string(),
            "--cache-size".into(),
            self.cache_size.to_string(),
            "--max-entries".into(),
            self.max_entries.to_string(),
            "--neighbour-fetch".into(),
            self.neighbour_fetch.to_string(),
        ]
    }
}

#[derive(clap::Args)]
pub struct DaemonArgs {
    #[command(flatten)]
    pub settings: DaemonSettings,
    /// Exit once no mount is left and no request came for a moment (how commands start the
    /// daemon on demand).
    #[arg(long)]
    pub exit_when_idle: bool,
    /// Stop the running daemon instead: it unmounts everything (mounts are restored by the
    /// next daemon) and exits; returns once it has.
    #[arg(long)]
    pub stop: bool,
    /// With --stop: forget the mounts instead of restoring them with the next daemon.
    #[arg(long, requires = "stop")]
    pub forget: bool,
    /// Internal: print a readiness line on stdout once the socket answers.
    #[arg(long, hide = true)]
    pub notify_ready: bool,
}

/// Runs the daemon until SIGINT/SIGTERM/SIGHUP or a shutdown request (mounts are unmounted
/// and restored by the next daemon), or, with `--exit-when-idle`, until idle.
pub fn run(g: &GlobalArgs, a: DaemonArgs) -> anyhow::Result<()> {
    if a.stop {
        return stop(g, a.forget);
    }
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGHUP);
    signals.thread_block().context("blocking signals")?;

    // Packs, sockets, FUSE and registry connections: take the descriptors the node allows.
    if let Ok((_, hard)) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
    {
        let _ =
            nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard);
    }
    // The lock first: a daemon that is refused must not touch the running one's caches.
    let layout = Layout::new(&g.root);
    let lock = open_lock(g)?;
    let _lock = match Flock::lock(lock, FlockArg::LockExclusiveNonblock) {
        Ok(l) => l,
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
            bail!("a strata daemon already serves {}", g.root.display())
        }
        Err((_, e)) => bail!("locking {}: {e}", layout.daemon_lock().display()),
    };
    let service = MountService::open(
        &g.root,
        a.settings.service_config(),
        Some(Box::new(|store, client, image| {
            strata_builder::convert::index_plain_layers(
                store,
                client,
                image,
                &strata_builder::convert::ConvertOptions::default(),
            )
            .map_err(|e| format!("{e:#}"))
        })),
    )
    .with_context(|| format!("opening store {}", g.root.display()))?;
    let listener = server::bind(&layout.socket())
        .with_context(|| format!("binding {}", layout.socket().display()))?;
    for (mp, result) in service.restore() {
        if let Err(e) = result {
            tracing::error!(mountpoint = %mp.display(), "not restored: {e}");
        }
    }
    let srv = service.clone();
    std::thread::Builder::new()
        .name("strata-accept".into())
        .spawn(move || server::serve(srv, listener))
        .context("starting the control socket thread")?;
    let sig_service = service.clone();
    std::thread::Builder::new()
        .name("strata-signals".into())
        .spawn(move || {
            if let Ok(sig) = signals.wait() {
                tracing::info!("received {sig:?}: unmounting everything (restored on restart)");
                sig_service.shutdown(true);
            }
        })
        .context("starting the signal thread")?;
    tracing::info!(root = %g.root.display(), pid = std::process::id(), "daemon ready");
    if a.notify_ready {
        println!("{READY}");
    }
    service.wait_stop(a.exit_when_idle.then_some(IDLE_GRACE));
    let _ = std::fs::remove_file(layout.socket());
    Ok(())
}

/// Opens (creating the store root and the file if needed) the lock a running daemon holds.
pub fn open_lock(g: &GlobalArgs) -> anyhow::Result<std::fs::File> {
    let layout = Layout::new(&g.root);
    strata_fs::store::create_private_dir(&g.root)
        .with_context(|| format!("opening store {}", g.root.display()))?;
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(layout.daemon_lock())
        .with_context(|| format!("opening {}", layout.daemon_lock().display()))
}

/// Asks the daemon to stop and waits until it has exited (its lock is free).
fn stop(g: &GlobalArgs, forget: bool) -> anyhow::Result<()> {
    let layout = Layout::new(&g.root);
    let Some(pid) = call_running(g, &Request::Ping)?.and_then(|v| v["pid"].as_u64()) else {
        println!("no strata daemon runs for {}", g.root.display());
        stop_inside(g);
        return Ok(());
    };
    call_running(g, &Request::Shutdown { forget })?;
    let lock = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(layout.daemon_lock())
        .with_context(|| format!("opening {}", layout.daemon_lock().display()))?;
    let _exited = Flock::lock(lock, FlockArg::LockExclusive)
        .map_err(|(_, e)| anyhow::anyhow!("waiting for the daemon to exit: {e}"))?;
    // The lock is released while the process exits; its other files (under the store) close
    // in the same exit: wait for the process itself to be gone (or a zombie, its files closed).
    let stat = std::path::PathBuf::from(format!("/proc/{pid}/stat"));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        match std::fs::read_to_string(&stat) {
            Ok(s)
                if s.rsplit_once(')')
                    .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')) =>
            {
                break
            }
            Ok(_) => std::thread::sleep(Duration::from_millis(5)),
            Err(_) => break,
        }
    }
    println!("strata daemon stopped");
    stop_inside(g);
    Ok(())
}

/// Connects to the daemon of `--root`: `None` when none runs (no socket, or nobody listening);
/// any other failure (no permission, …) is an error.
pub fn connect(g: &GlobalArgs) -> anyhow::Result<Option<Client>> {
    match Client::connect(&Layout::new(&g.root).socket()) {
        Ok(c) => Ok(Some(c)),
        Err(CallError::Connect { source, .. })
            if matches!(
                source.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}

/// Connects to the daemon of `--root`, starting one (which exits when idle) if none answers.
pub fn connect_or_start(g: &GlobalArgs, settings: &DaemonSettings) -> anyhow::Result<Client> {
    let layout = Layout::new(&g.root);
    if let Some(c) = connect(g)? {
        return Ok(c);
    }
    // One starter at a time: whoever holds this lock starts the daemon, the others then find
    // its socket answering.
    for d in [&g.root, &layout.state().to_path_buf()] {
        strata_fs::store::create_private_dir(d)
            .with_context(|| format!("creating {}", d.display()))?;
    }
    let start_lock = layout.state().join("daemon.start.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&start_lock)
        .with_context(|| format!("opening {}", start_lock.display()))?;
    let _guard = Flock::lock(file, FlockArg::LockExclusive)
        .map_err(|(_, e)| anyhow::anyhow!("locking {}: {e}", start_lock.display()))?;
    if let Ok(c) = Client::connect(&layout.socket()) {
        return Ok(c);
    }
    start(g, settings, &layout.daemon_log())?;
    Client::connect(&layout.socket()).context("connecting to the daemon just started")
}

/// Starts `strata daemon --exit-when-idle` in the background and waits until it answers.
fn start(g: &GlobalArgs, settings: &DaemonSettings, log: &Path) -> anyhow::Result<()> {
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    let exe = std::env::current_exe().context("locating the strata binary")?;
    let mut child = Command::new(exe)
        .arg("--root")
        .arg(&g.root)
        .arg("--log-level")
        .arg(&g.log_level)
        .args(
            g.config
                .iter()
                .flat_map(|p| [std::ffi::OsStr::new("--config"), p.as_os_str()]),
        )
        .arg("daemon")
        .arg("--exit-when-idle")
        .arg("--notify-ready")
        .args(settings.to_args())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log_file)
        // Dozens of threads per mount: without a cap glibc gives most of them an arena of their
        // own, and fragmentation multiplies the daemon's resident memory.
        .env(
            "MALLOC_ARENA_MAX",
            std::env::var_os("MALLOC_ARENA_MAX").unwrap_or_else(|| "2".into()),
        )
        // A fixed mmap threshold of 8 MiB: each FUSE worker's 16 MiB request buffer stays an
        // untouched mapping instead of being carved (and zeroed) from the heap once glibc's
        // dynamic threshold has grown (17 MiB per mount of a 30k-file image instead of 36-55),
        // while 1 MiB chunk buffers still come from the heap (at glibc's default 128 KiB each
        // one is a fresh mapping and a large first read runs 1.4x slower).
        .env(
            "MALLOC_MMAP_THRESHOLD_",
            std::env::var_os("MALLOC_MMAP_THRESHOLD_").unwrap_or_else(|| "8388608".into()),
        )
        .process_group(0)
        .spawn()
        .context("starting the strata daemon")?;
    let stdout = child.stdout.take().context("daemon stdout")?;
    let mut line = String::new();
    let ready = BufReader::new(stdout).read_line(&mut line).is_ok() && line.trim() == READY;
    if !ready {
        let _ = child.wait();
        let msg = std::fs::read_to_string(log).unwrap_or_default();
        let last = msg.lines().rfind(|l| !l.trim().is_empty()).unwrap_or("");
        bail!(
            "the strata daemon did not start: {}",
            last.trim_start_matches("strata: error: ")
        );
    }
    // The daemon lives on after this command (and is reaped by init once this one exits).
    drop(child);
    Ok(())
}

/// Sends one request, starting the daemon if needed; an error answer becomes an error.
pub fn call(
    g: &GlobalArgs,
    settings: &DaemonSettings,
    req: &Request,
) -> anyhow::Result<serde_json::Value> {
    let mut client = connect_or_start(g, settings)?;
    match client.call(req) {
        // An idle daemon may have decided to exit just as we connected: start another.
        Err(CallError::Closed) => {
            let mut client = connect_or_start(g, settings)?;
            Ok(client.call(req)?)
        }
        other => Ok(other?),
    }
}

/// Sends one request to a running daemon; `None` when no daemon runs.
pub fn call_running(g: &GlobalArgs, req: &Request) -> anyhow::Result<Option<serde_json::Value>> {
    let Some(mut client) = connect(g)? else {
        return Ok(None);
    };
    match client.call(req) {
        // A daemon exiting as we connected: ask whoever answers now, if anyone.
        Err(CallError::Closed) => match connect(g)? {
            Some(mut c) => Ok(Some(c.call(req)?)),
            None => Ok(None),
        },
        other => Ok(Some(other?)),
    }
}

/// An ordinary user's containers have a daemon of their own, in the rootless namespace: it is
/// stopped too (its records kept, even with `--forget`: the containers' roots come back with
/// the next one). A failure there is a warning; the user's own daemon is stopped either way.
fn stop_inside(g: &GlobalArgs) {
    match super::rootless::inside(g, &["daemon", "--stop"]) {
        Ok(None) => {}
        Ok(Some(out)) if out.status.success() => {
            if String::from_utf8_lossy(&out.stdout).contains("strata daemon stopped") {
                println!("strata daemon of the rootless namespace stopped");
            }
        }
        Ok(Some(out)) => eprintln!(
            "strata: warning: stopping the daemon of the rootless namespace: {}",
            super::rootless::failure(&out)
        ),
        Err(e) => eprintln!("strata: warning: {e:#}"),
    }
}
