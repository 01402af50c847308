//! `strata`: lazily pulled container images. This binary parses arguments and calls the
//! libraries; each command group lives in its own file under `commands/`.

mod commands;
mod config;

use std::ffi::OsString;
use std::io::Write as _;
use std::path::PathBuf;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "strata",
    version,
    about = "Container images that start before they are downloaded"
)]
struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: Command,
}

/// Flags every command takes.
#[derive(clap::Args, Clone, Debug)]
pub struct GlobalArgs {
    /// Root of the local store (an OCI image layout).
    /// (Default /var/lib/strata for root, `$XDG_DATA_HOME/strata` for other users.)
    #[arg(long, global = true, env = "STRATA_ROOT", default_value_os_t = strata_fs::store::default_root())]
    pub root: PathBuf,
    /// Log filter (error, warn, info, debug, trace, or a tracing directive).
    #[arg(long, global = true, env = "STRATA_LOG", default_value = "warn")]
    pub log_level: String,
    /// Config file of node-wide defaults for these flags (default /etc/strata/config.toml when
    /// it exists; a flag or its environment variable wins over it).
    #[arg(long, global = true, env = "STRATA_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Convert an image into the strata lazy format.
    Convert(commands::convert::ConvertArgs),
    /// Run a command in a new container on a lazily mounted image.
    Run(commands::container::RunArgs),
    /// List containers.
    Ps(commands::container::PsArgs),
    /// Remove containers.
    Rm(commands::container::RmArgs),
    /// Start a stopped container again.
    Start(commands::container::StartArgs),
    /// Stop containers (SIGTERM, then SIGKILL after -t seconds).
    Stop(commands::container::StopArgs),
    /// Send a signal to containers.
    Kill(commands::container::KillArgs),
    /// Print what a detached container wrote.
    Logs(commands::container::LogsArgs),
    /// Run another process in a running container.
    Exec(commands::container::ExecArgs),
    /// Make a container's changes a new layer of a new image.
    Commit(commands::container::CommitArgs),
    /// Build an image from a Dockerfile (bases mounted lazily, steps cached).
    Build(commands::build::BuildArgs),
    /// Serve containerd's snapshots API (a proxy plugin) on a unix socket.
    Snapshotter(commands::snapshotter::SnapshotterArgs),
    /// Pull an image into containerd with its layers mounted lazily by the strata snapshotter
    /// (through containerd's API: `ctr run --snapshotter strata IMAGE` then starts at once).
    Rpull(commands::rpull::RpullArgs),
    /// Make a one-layer image from a rootfs tarball.
    Import(commands::archive::ImportArgs),
    /// Write images to a tarball (a Docker archive that is also an OCI layout).
    Save(commands::archive::SaveArgs),
    /// Load images from a Docker archive or an OCI layout tarball.
    Load(commands::archive::LoadArgs),
    /// Show an image's history.
    History(commands::container::HistoryArgs),
    #[command(hide = true)]
    ContainerMonitor(commands::container::MonitorArgs),
    /// Run a command (default: the user's shell) in the rootless user namespace, where an
    /// ordinary user's containers live (to look at or remove files owned by subordinate ids).
    Unshare(commands::rootless::UnshareArgs),
    /// (Internal) keeps an ordinary user's rootless user namespace alive.
    #[command(hide = true)]
    UsernsHolder,
    /// Mount an image read-only (lazily) at a directory.
    Mount(commands::mount::MountArgs),
    /// What changed in a writable view (A/C/D lines, like `docker container diff`).
    Diff(commands::mount::DiffArgs),
    /// List the daemon's live mounts.
    Mounts(commands::mount::MountsArgs),
    /// Unmount a strata mount.
    #[command(alias = "unmount")]
    Umount(commands::mount::UmountArgs),
    /// List images in the local store.
    #[command(alias = "ls")]
    Images(commands::images::ImagesArgs),
    /// Show a container's record, or an image's manifest, config and layers with TOC statistics.
    Inspect(commands::images::InspectArgs),
    /// Check a whole image: blobs, diff IDs, every TOC against its tar stream, every chunk.
    Verify(commands::images::VerifyArgs),
    /// Pull an image from a registry (lazy layers: metadata only).
    Pull(commands::registry::PullArgs),
    /// Push a local image to a registry.
    Push(commands::registry::PushArgs),
    /// Give a local image another name.
    Tag(commands::images::TagArgs),
    /// Remove image names from the local store.
    Rmi(commands::images::RmiArgs),
    /// Publish an access profile next to an image (found by later lazy mounts).
    PushProfile(commands::registry::PushProfileArgs),
    /// Save registry credentials (Docker's config.json).
    Login(commands::registry::LoginArgs),
    /// Remove saved registry credentials.
    Logout(commands::registry::LogoutArgs),
    /// Inspect or trim the node's disk cache of chunks.
    Cache(commands::cache::CacheArgs),
    /// Run the node daemon: one process serving every mount over ROOT/daemon.sock (other
    /// commands start one on demand when none runs).
    Daemon(commands::daemon::DaemonArgs),
    /// Show a mount's counters: bytes fetched, cache hits, fetch latency, time to mount.
    Stats(commands::mount::StatsArgs),
    /// Every live mount's counters in the Prometheus text format (`--listen ADDR` to serve them).
    Metrics(commands::metrics::MetricsArgs),
}

/// Standard error for log lines; a failed write (a full disk under a redirected log) is dropped,
/// never fatal.
struct QuietStderr;

impl std::io::Write for QuietStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = std::io::stderr().write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stderr().flush();
        Ok(())
    }
}

/// Drops fuser's report of a reply the kernel no longer wanted (ENOENT: the request was
/// interrupted, e.g. by the Go runtime's preemption signals in `runc init` during an exec, and
/// answered meanwhile). That is FUSE's normal outcome for an interrupted request, which libfuse
/// does not report either; every other failed reply still is.
struct InterruptedReplies;

impl<S> tracing_subscriber::layer::Filter<S> for InterruptedReplies {
    fn enabled(
        &self,
        _meta: &tracing::Metadata<'_>,
        _cx: &tracing_subscriber::layer::Context<'_, S>,
    ) -> bool {
        true
    }

    fn event_enabled(
        &self,
        event: &tracing::Event<'_>,
        _cx: &tracing_subscriber::layer::Context<'_, S>,
    ) -> bool {
        struct Message(bool);
        impl tracing::field::Visit for Message {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                if field.name() == "message" {
                    let text = format!("{value:?}");
                    self.0 |= text.starts_with("Failed to send FUSE reply")
                        && text.contains("(os error 2)");
                }
            }
        }
        // (fuser logs through `log`: the event's own target is "log".)
        let target = event.metadata().target();
        if !(target == "log" || target.starts_with("fuser")) {
            return true;
        }
        let mut m = Message(false);
        event.record(&mut m);
        !m.0
    }
}

fn main() {
    let args: Vec<OsString> = std::env::args_os().collect();
    let defaults = match config::locate(&args) {
        Some(path) => config::load(&path).unwrap_or_else(|e| {
            eprintln!("strata: error: {e:#}");
            std::process::exit(2);
        }),
        None => config::Defaults::default(),
    };
    let matches = config::apply(Cli::command(), &defaults).get_matches_from(args);
    let mut cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    // The daemon keeps paths under the root (mounts, records): never relative to a client's
    // working directory.
    if let Ok(abs) = std::path::absolute(&cli.global.root) {
        cli.global.root = abs;
    }
    // fuser logs an expected failure to unmount an already unmounted session at warn.
    let directive = if cli.global.log_level.contains("fuser") {
        cli.global.log_level.clone()
    } else {
        format!("{},fuser=error", cli.global.log_level)
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&directive)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    {
        use tracing_subscriber::layer::SubscriberExt as _;
        use tracing_subscriber::util::SubscriberInitExt as _;
        use tracing_subscriber::Layer as _;
        tracing_subscriber::registry()
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(|| QuietStderr)
                    .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                    .with_filter(InterruptedReplies)
                    .with_filter(filter),
            )
            .init();
    }
    // An ordinary user's containers and builds live in the user's rootless user namespace.
    let in_userns = match &cli.command {
        Command::Run(_)
        | Command::Ps(_)
        | Command::Rm(_)
        | Command::Start(_)
        | Command::Stop(_)
        | Command::Kill(_)
        | Command::Logs(_)
        | Command::Commit(_)
        | Command::Exec(_)
        | Command::Build(_)
        | Command::Unshare(_) => true,
        // A container's changes (a writable view of the user's own is a directory here).
        Command::Diff(a) => !a.mountpoint.is_dir(),
        // A container's record or counters.
        Command::Inspect(a) => commands::rootless::names_container(&cli.global, &a.image),
        Command::Stats(a) => {
            !a.mountpoint.is_dir()
                && commands::rootless::names_container(&cli.global, &a.mountpoint.to_string_lossy())
        }
        _ => false,
    };
    if in_userns {
        if let Err(e) = commands::rootless::reenter(&cli.global) {
            eprintln!("strata: error: {e:#}");
            std::process::exit(125);
        }
    }
    let result = match cli.command {
        Command::Convert(a) => commands::convert::run(&cli.global, a),
        Command::Mount(a) => commands::mount::mount(&cli.global, a),
        Command::Run(a) => commands::container::run(&cli.global, a),
        Command::Ps(a) => commands::container::ps(&cli.global, a),
        Command::Rm(a) => commands::container::rm(&cli.global, a),
        Command::Start(a) => commands::container::start(&cli.global, a),
        Command::Stop(a) => commands::container::stop(&cli.global, a),
        Command::Kill(a) => commands::container::kill(&cli.global, a),
        Command::Logs(a) => commands::container::logs(&cli.global, a),
        Command::Commit(a) => commands::container::commit(&cli.global, a),
        Command::Exec(a) => commands::container::exec(&cli.global, a),
        Command::History(a) => commands::container::history(&cli.global, a),
        Command::Build(a) => commands::build::build(&cli.global, a),
        Command::Import(a) => commands::archive::import(&cli.global, a),
        Command::Snapshotter(a) => commands::snapshotter::serve(&cli.global, a),
        Command::Rpull(a) => commands::rpull::rpull(&cli.global, a),
        Command::Save(a) => commands::archive::save(&cli.global, a),
        Command::Load(a) => commands::archive::load(&cli.global, a),
        Command::ContainerMonitor(a) => commands::container::monitor(&cli.global, a),
        Command::UsernsHolder => commands::rootless::hold(&cli.global),
        Command::Unshare(a) => commands::rootless::unshare(a),
        Command::Daemon(a) => commands::daemon::run(&cli.global, a),
        Command::Umount(a) => commands::mount::umount(&cli.global, a),
        Command::Mounts(a) => commands::mount::mounts(&cli.global, a),
        Command::Diff(a) => commands::mount::diff(&cli.global, a),
        Command::Images(a) => commands::images::images(&cli.global, a),
        Command::Inspect(a) => commands::images::inspect(&cli.global, a),
        Command::Verify(a) => commands::images::verify(&cli.global, a),
        Command::Cache(a) => commands::cache::run(&cli.global, a),
        Command::Stats(a) => commands::mount::stats(&cli.global, a),
        Command::Metrics(a) => commands::metrics::run(&cli.global, a),
        Command::Pull(a) => commands::registry::pull(&cli.global, a),
        Command::Push(a) => commands::registry::push(&cli.global, a),
        Command::Tag(a) => commands::images::tag(&cli.global, a),
        Command::Rmi(a) => commands::images::rmi(&cli.global, a),
        Command::PushProfile(a) => commands::registry::push_profile(&cli.global, a),
        Command::Login(a) => commands::registry::login(&cli.global, a),
        Command::Logout(a) => commands::registry::logout(&cli.global, a),
    };
    if let Err(e) = result {
        let _ = writeln!(std::io::stderr(), "strata: error: {e:#}");
        std::process::exit(1);
    }
}
