//! `strata mount` / `umount` / `stats`: requests to the node daemon's mount service.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use nix::sys::signal::{SigSet, Signal};
use strata_fs::service::protocol::Request;
use strata_fs::service::{resolve_mountpoint, MountInfo, MountRequest};

use super::daemon::{self, DaemonSettings};
use crate::GlobalArgs;

#[derive(clap::Args)]
pub struct MountArgs {
    /// Image reference or manifest digest in the local store.
    pub image: String,
    /// Directory to mount on.
    pub mountpoint: PathBuf,
    /// Stay attached until the mount is unmounted (SIGINT/SIGTERM unmount it).
    #[arg(long)]
    pub foreground: bool,
    /// FUSE worker threads.
    #[arg(long, default_value_t = 4)]
    pub threads: usize,
    /// Record the order of first reads (an access profile) into FILE when unmounted.
    #[arg(long, value_name = "FILE")]
    pub record_profile: Option<PathBuf>,
    /// Prefetch the files of this access profile first, in order (from --record-profile).
    #[arg(long, value_name = "FILE")]
    pub profile: Option<PathBuf>,
    /// Do not fetch the rest of the image in the background after mounting.
    /// (`--no-prefetch=false` undoes a config file's `mount.prefetch = false`.)
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", action = clap::ArgAction::Set, default_value_t = false)]
    pub no_prefetch: bool,
    /// Also keep chunks of layers from the local store in the disk cache: re-reads skip
    /// decompression at the cost of disk space (remote layers are always cached).
    /// (`--cache-local=false` undoes a config file's `cache.local = true`.)
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", action = clap::ArgAction::Set, default_value_t = false)]
    pub cache_local: bool,
    /// Serve files of 1 MiB and more by FUSE passthrough: the first open queues a verified
    /// whole copy into ROOT/cache/files (capped by --cache-size too), later opens read it
    /// through the kernel at local-disk speed. Every open then reaches the daemon, which costs
    /// workloads that open many small files.
    /// (`--passthrough=false` undoes a config file's `mount.passthrough = true`.)
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", action = clap::ArgAction::Set, default_value_t = false)]
    pub passthrough: bool,
    /// Kernel readahead for the mount in KiB (the kernel's FUSE default is 128).
    #[arg(long, default_value_t = 1024)]
    pub read_ahead_kb: u32,
    #[command(flatten)]
    pub registry: super::registry::RegistryArgs,
    /// Platform to pick when the image must be pulled first (OS/ARCH).
    #[arg(long)]
    pub platform: Option<String>,
    /// Mount a writable view: kernel overlayfs over the lazy mount, with its upper and work
    /// directories under DIR (kept after unmounting: mount again with the same DIR to go on).
    #[arg(long, value_name = "DIR")]
    pub upper: Option<PathBuf>,
    /// Serve the writable view from strata's own FUSE writable layer instead of kernel
    /// overlayfs (work in progress).
    #[arg(long, requires = "upper")]
    pub fuse_upper: bool,
    /// Node-wide settings, used when this command starts the daemon.
    #[command(flatten)]
    pub daemon: DaemonSettings,
}

#[derive(clap::Args)]
pub struct UmountArgs {
    /// The mount point.
    pub mountpoint: PathBuf,
    /// Detach even if busy (MNT_DETACH).
    #[arg(long, short = 'l')]
    pub lazy: bool,
}

impl MountArgs {
    fn request(&self, mountpoint: &Path) -> MountRequest {
        MountRequest {
            image: self.image.clone(),
            mountpoint: mountpoint.to_path_buf(),
            threads: self.threads,
            read_ahead_kb: self.read_ahead_kb,
            prefetch: !self.no_prefetch,
            profile: self.profile.as_ref().map(|p| absolute(p)),
            record_profile: self.record_profile.as_ref().map(|p| absolute(p)),
            passthrough: self.passthrough,
            cache_local: self.cache_local,
            platform: self.platform.clone(),
            registry: self.registry.options(),
            setuid: false,
            upper: self.upper.as_ref().map(|p| absolute(p)),
            fuse_upper: self.fuse_upper,
            layer: None,
            internal: false,
        }
    }
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// `strata mount`: asks the node daemon (started on demand) to mount the image; returns once
/// the mount answers, or with `--foreground` once it is unmounted again.
pub fn mount(g: &GlobalArgs, a: MountArgs) -> anyhow::Result<()> {
    let mountpoint = std::fs::canonicalize(&a.mountpoint)
        .with_context(|| format!("mount point {}", a.mountpoint.display()))?;
    if !mountpoint.is_dir() {
        bail!("mount point {} is not a directory", mountpoint.display());
    }
    if a.foreground {
        // Termination signals unmount; block them before any thread starts.
        let mut signals = SigSet::empty();
        signals.add(Signal::SIGINT);
        signals.add(Signal::SIGTERM);
        signals.add(Signal::SIGHUP);
        signals.thread_block().context("blocking signals")?;
        let g2 = g.clone();
        let mp = mountpoint.clone();
        std::thread::spawn(move || {
            if signals.wait().is_ok() {
                let req = Request::Unmount {
                    mountpoint: mp,
                    lazy: true,
                };
                if let Err(e) = daemon::call_running(&g2, &req) {
                    tracing::warn!("unmount failed: {e:#}");
                }
            }
        });
    }
    let info = daemon::call(
        g,
        &a.daemon,
        &Request::Mount(Box::new(a.request(&mountpoint))),
    )
    .with_context(|| format!("mounting {} at {}", a.image, mountpoint.display()))?;
    let info: MountInfo = serde_json::from_value(info).context("the daemon's answer")?;
    for w in &info.warnings {
        eprintln!("strata: warning: {w}");
    }
    println!(
        "mounted {} at {} in {} ms",
        info.image,
        info.mountpoint.display(),
        info.time_to_mount_ms
    );
    if a.foreground {
        daemon::call(
            g,
            &a.daemon,
            &Request::Wait {
                mountpoint: mountpoint.clone(),
            },
        )?;
    }
    Ok(())
}

pub fn umount(g: &GlobalArgs, a: UmountArgs) -> anyhow::Result<()> {
    // A dead mount cannot be stat'ed: do not canonicalize through it.
    let mountpoint = resolve_mountpoint(&a.mountpoint);
    let req = Request::Unmount {
        mountpoint: mountpoint.clone(),
        lazy: a.lazy,
    };
    if daemon::call_running(g, &req)?.is_some() {
        return Ok(());
    }
    // No daemon runs: what is left can only be a dead strata mount (its daemon was killed).
    if !strata_fs::service::is_strata_mount(&mountpoint) {
        bail!("{} is not a strata mount", mountpoint.display());
    }
    let flags = if a.lazy {
        nix::mount::MntFlags::MNT_DETACH
    } else {
        nix::mount::MntFlags::empty()
    };
    nix::mount::umount2(&mountpoint, flags)
        .with_context(|| format!("unmounting {}", mountpoint.display()))?;
    Ok(())
}

#[derive(clap::Args)]
pub struct StatsArgs {
    /// The mount point (or a container: its root).
    pub mountpoint: PathBuf,
    /// Print the raw JSON.
    #[arg(long)]
    pub json: bool,
}

/// `strata stats MOUNTPOINT`: a mount's counters, from the daemon.
pub fn stats(g: &GlobalArgs, a: StatsArgs) -> anyhow::Result<()> {
    let mut mountpoint = resolve_mountpoint(&a.mountpoint);
    if !mountpoint.is_dir() {
        // A container: the counters of its root.
        let store = super::open_store(g)?;
        let containers = strata_builder::container::Containers::new(&store);
        let r = containers.find(&a.mountpoint.to_string_lossy())?;
        mountpoint = containers.dir(&r.id).rootfs();
    }
    let req = Request::Stats {
        mountpoint: mountpoint.clone(),
    };
    let v = daemon::call_running(g, &req)?.with_context(|| {
        format!(
            "{} is not a strata mount of this store (no daemon runs)",
            mountpoint.display()
        )
    })?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let f = &v["fetch"];
    let n = |x: &serde_json::Value| x.as_u64().unwrap_or(0);
    println!("image:          {}", v["image"].as_str().unwrap_or(""));
    println!("mounted in:     {} ms", n(&v["time_to_mount_ms"]));
    println!(
        "fetched:        {} in {} range reads ({} chunks), avg {:.1} ms",
        super::human_bytes(n(&f["source_bytes"])),
        n(&f["source_reads"]),
        n(&f["source_chunks"]),
        v["avg_fetch_latency_ms"].as_f64().unwrap_or(0.0)
    );
    println!("memory hits:    {}", n(&f["memory_hits"]));
    println!("disk hits:      {}", n(&f["disk_hits"]));
    println!("failures:       {}", n(&f["failures"]));
    if let Some(c) = v["disk_cache"].as_object() {
        println!(
            "disk cache:     {} chunks, {} of {}",
            c.get("entries").and_then(|x| x.as_u64()).unwrap_or(0),
            super::human_bytes(c.get("bytes").and_then(|x| x.as_u64()).unwrap_or(0)),
            super::human_bytes(c.get("capacity").and_then(|x| x.as_u64()).unwrap_or(0)),
        );
    }
    if let Some(c) = v["file_cache"].as_object() {
        let get = |k: &str| c.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
        println!(
            "passthrough:    {} opens served by the kernel, {} files written, {} files ({}) cached",
            v["passthrough_opens"].as_u64().unwrap_or(0),
            get("inserted"),
            get("entries"),
            super::human_bytes(get("bytes")),
        );
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct MountsArgs {
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `strata mounts`: the daemon's live mounts.
pub fn mounts(g: &GlobalArgs, a: MountsArgs) -> anyhow::Result<()> {
    let list = daemon::call_running(g, &Request::List)?.unwrap_or(serde_json::json!([]));
    let mut list: Vec<MountInfo> = serde_json::from_value(list).context("the daemon's answer")?;
    // An ordinary user's containers: mounted by the daemon of the rootless namespace.
    // A failure there is a warning: the user's own mounts are listed either way.
    match super::rootless::inside(g, &["mounts", "--json"]) {
        Ok(None) => {}
        Ok(Some(out)) if out.status.success() => {
            match serde_json::from_slice::<Vec<MountInfo>>(&out.stdout) {
                Ok(inner) => list.extend(inner.into_iter().map(|mut m| {
                    m.rootless = true;
                    m
                })),
                Err(e) => eprintln!("strata: warning: the rootless namespace's daemon: {e}"),
            }
        }
        Ok(Some(out)) => eprintln!(
            "strata: warning: listing the mounts of the rootless namespace: {}",
            super::rootless::failure(&out)
        ),
        Err(e) => eprintln!("strata: warning: {e:#}"),
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(());
    }
    println!(
        "{:<40} {:<50} {:>9} {:>8}",
        "MOUNTPOINT", "IMAGE", "ENTRIES", "MOUNT MS"
    );
    for m in list {
        // A path of the rootless namespace's daemon: seen there (`strata unshare`).
        let at = if m.rootless {
            format!("{} (rootless ns)", m.mountpoint.display())
        } else {
            m.mountpoint.display().to_string()
        };
        println!(
            "{:<40} {:<50} {:>9} {:>8}",
            at, m.image, m.entries, m.time_to_mount_ms
        );
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct DiffArgs {
    /// A container (name or id), or a writable view (`strata mount --upper DIR IMAGE MNT`).
    pub mountpoint: PathBuf,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `strata diff MNT`: what changed in a writable view, as `docker container diff` prints it.
pub fn diff(g: &GlobalArgs, a: DiffArgs) -> anyhow::Result<()> {
    let mut mountpoint = resolve_mountpoint(&a.mountpoint);
    let mut exclude = Vec::new();
    if !mountpoint.is_dir() {
        // A container: its root is a writable view; its mount points are not its changes.
        let store = super::open_store(g)?;
        let containers = strata_builder::container::Containers::new(&store);
        let r = containers.find(&a.mountpoint.to_string_lossy())?;
        mountpoint = containers.dir(&r.id).rootfs();
        exclude = r.mount_points;
    }
    let v = daemon::call_running(
        g,
        &Request::Diff {
            mountpoint: mountpoint.clone(),
            exclude,
        },
    )?
    .with_context(|| {
        format!(
            "{} is not a strata mount (no daemon runs)",
            mountpoint.display()
        )
    })?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    for c in v.as_array().map(Vec::as_slice).unwrap_or_default() {
        println!(
            "{} {}",
            c["kind"].as_str().unwrap_or("?"),
            c["path"].as_str().unwrap_or("")
        );
    }
    Ok(())
}
