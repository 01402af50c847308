//! `strata mount` / `strata umount`: a daemon per mount, started in the background unless
//! `--foreground`; the parent returns once the mount answers.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use nix::sys::signal::{SigSet, Signal};
use serde::{Deserialize, Serialize};
use strata_fs::cache::DiskCache;
use strata_fs::fuse::{mount_session, MountConfig, StrataFs};

use super::{open_store, parse_size};
use crate::GlobalArgs;

const READY: &str = "strata-mount-ready";

#[derive(clap::Args)]
pub struct MountArgs {
    /// Image reference or manifest digest in the local store.
    pub image: String,
    /// Directory to mount on.
    pub mountpoint: PathBuf,
    /// Stay attached and serve until unmounted (or SIGINT/SIGTERM).
    #[arg(long)]
    pub foreground: bool,
    /// FUSE worker threads.
    #[arg(long, default_value_t = 4)]
    pub threads: usize,
    /// Memory cache of decompressed chunks (e.g. 256M).
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    pub memory_cache: u64,
    /// Size cap of the node's disk cache of verified chunks (shared by all mounts; 0 disables).
    #[arg(long, default_value = "10G", value_parser = parse_size)]
    pub cache_size: u64,
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
    /// Seconds to wait for the mount to become ready.
    #[arg(long, default_value_t = 120)]
    pub timeout: u64,
    #[command(flatten)]
    pub registry: super::registry::RegistryArgs,
    /// Platform to pick when the image must be pulled first (OS/ARCH).
    #[arg(long)]
    pub platform: Option<String>,
    /// Write the mount's counters (JSON, every second) here instead of ROOT/mounts/.
    #[arg(long)]
    pub stats_file: Option<PathBuf>,
    /// Internal: print a readiness line on stdout once mounted.
    #[arg(long, hide = true)]
    pub notify_ready: bool,
}

#[derive(clap::Args)]
pub struct UmountArgs {
    /// The mount point.
    pub mountpoint: PathBuf,
    /// Detach even if busy (MNT_DETACH).
    #[arg(long, short = 'l')]
    pub lazy: bool,
}

/// What a running mount daemon records under ROOT/mounts.
#[derive(Serialize, Deserialize)]
struct MountRecord {
    pid: u32,
    mountpoint: PathBuf,
    image: String,
    manifest: String,
    log: PathBuf,
    #[serde(default)]
    stats: Option<PathBuf>,
}

/// Publishes the mount's counters as a JSON file (atomically replaced) until it is unmounted.
fn spawn_stats_writer(
    stats: strata_fs::fuse::StatsHandle,
    path: PathBuf,
    image: String,
    mountpoint: PathBuf,
    time_to_mount: Duration,
) {
    let started = Instant::now();
    std::thread::spawn(move || {
        let mut last = String::new();
        let mut written = Instant::now();
        while let Some((fetch, cache)) = stats.get() {
            let files = stats.files();
            let opens = stats.passthrough_opens();
            let counters = serde_json::json!({"fetch": fetch, "disk_cache": cache,
                "file_cache": files, "passthrough_opens": opens})
            .to_string();
            // Write when counters change (checked every 100 ms), and every 5 s regardless.
            if counters != last || written.elapsed() >= Duration::from_secs(5) {
                let body = serde_json::json!({
                    "image": image,
                    "mountpoint": mountpoint,
                    "pid": std::process::id(),
                    "time_to_mount_ms": time_to_mount.as_millis() as u64,
                    "uptime_s": started.elapsed().as_secs(),
                    "fetch": fetch,
                    "avg_fetch_latency_ms": if fetch.source_reads > 0 {
                        fetch.source_micros as f64 / fetch.source_reads as f64 / 1000.0
                    } else {
                        0.0
                    },
                    "disk_cache": cache,
                    "file_cache": files,
                    "passthrough_opens": opens,
                });
                let tmp = path.with_extension("tmp");
                if std::fs::write(&tmp, body.to_string()).is_ok() {
                    let _ = std::fs::rename(&tmp, &path);
                }
                last = counters;
                written = Instant::now();
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    });
}

/// The published counters of every mount of `store` whose daemon is alive.
pub fn live_stats(store: &strata_fs::store::Store) -> Vec<serde_json::Value> {
    let Ok(dir) = std::fs::read_dir(store.mounts_dir()) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.ends_with(".json") || name.ends_with(".stats.json") {
            continue;
        }
        let Some(record) = std::fs::read(e.path())
            .ok()
            .and_then(|d| serde_json::from_slice::<MountRecord>(&d).ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{}", record.pid)).exists() {
            continue;
        }
        // A live daemon rewrites its stats at least every 5 s; an old file is a dead daemon's
        // (its pid since reused).
        let fresh = |p: &PathBuf| {
            std::fs::metadata(p)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age < Duration::from_secs(30))
        };
        let stats = record
            .stats
            .as_ref()
            .filter(|p| fresh(p))
            .and_then(|p| std::fs::read(p).ok());
        if let Some(v) = stats.and_then(|d| serde_json::from_slice(&d).ok()) {
            out.push(v);
        }
    }
    out.sort_by(|a: &serde_json::Value, b| a["mountpoint"].as_str().cmp(&b["mountpoint"].as_str()));
    out
}

fn record_name(mountpoint: &Path) -> String {
    let s = mountpoint.to_string_lossy();
    let hash = strata_fs::format::Sha256Digest::of(s.as_bytes()).hex();
    format!("{}.json", &hash[..16])
}

pub fn mount(g: &GlobalArgs, a: MountArgs) -> anyhow::Result<()> {
    let mountpoint = std::fs::canonicalize(&a.mountpoint)
        .with_context(|| format!("mount point {}", a.mountpoint.display()))?;
    if !mountpoint.is_dir() {
        bail!("mount point {} is not a directory", mountpoint.display());
    }
    let store = open_store(g)?;
    let mut a = a;
    if store.resolve(&a.image).is_err() {
        // Not here yet: pull its metadata (lazy layers stay in the registry).
        let r = strata_fs::reference::Reference::parse(&a.image)?;
        let client = a.registry.client()?;
        let (os, arch) = super::registry::platform(a.platform.as_deref())?;
        strata_fs::transfer::pull(&store, &client, &r, (&os, &arch), false, &mut |_| {})
            .with_context(|| format!("pulling {r}"))?;
        // An access profile published next to the image is prefetched first.
        if a.profile.is_none() && !a.no_prefetch {
            match strata_fs::transfer::fetch_profile(&client, &r) {
                Ok(Some(profile)) => {
                    let path = store.root().join("profiles").join(format!(
                        "{}.txt",
                        strata_fs::format::Sha256Digest::of(r.to_string().as_bytes()).hex()
                    ));
                    store.write_file(&path, &profile)?;
                    tracing::info!(image = %r, "using the published access profile");
                    a.profile = Some(path);
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(image = %r, "cannot fetch the access profile: {e}"),
            }
        }
    }
    // Plain OCI layers cannot be read lazily: fetch and index them on this node first.
    strata_builder::convert::index_plain_layers(
        &store,
        Some(&a.registry.client()?),
        &a.image,
        &strata_builder::convert::ConvertOptions::default(),
    )
    .with_context(|| format!("indexing the plain layers of {}", a.image))?;
    if a.foreground {
        return serve(g, &a, &mountpoint);
    }
    let log = store
        .mounts_dir()
        .join(record_name(&mountpoint).replace(".json", ".log"));
    let log_file =
        std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
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
        .arg("mount")
        .arg(&a.image)
        .arg(&mountpoint)
        .arg("--foreground")
        .arg("--notify-ready")
        .args(["--threads", &a.threads.to_string()])
        .args(["--read-ahead-kb", &a.read_ahead_kb.to_string()])
        .args(["--memory-cache", &a.memory_cache.to_string()])
        .args(["--cache-size", &a.cache_size.to_string()])
        // On/off settings are passed with their value: the daemon reads the config file too.
        .arg(format!("--cache-local={}", a.cache_local))
        .arg(format!("--passthrough={}", a.passthrough))
        .arg(format!("--no-prefetch={}", a.no_prefetch))
        .args(
            a.record_profile
                .iter()
                .flat_map(|p| [std::ffi::OsStr::new("--record-profile"), p.as_os_str()]),
        )
        .args(
            a.profile
                .iter()
                .flat_map(|p| [std::ffi::OsStr::new("--profile"), p.as_os_str()]),
        )
        .args(
            a.stats_file
                .iter()
                .flat_map(|p| [std::ffi::OsStr::new("--stats-file"), p.as_os_str()]),
        )
        .args(a.registry.to_args())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log_file)
        .process_group(0)
        .spawn()
        .context("starting the mount daemon")?;
    let stdout = child.stdout.take().context("daemon stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let ok = BufReader::new(stdout).read_line(&mut line).is_ok() && line.trim() == READY;
        let _ = tx.send(ok);
    });
    match rx.recv_timeout(Duration::from_secs(a.timeout)) {
        Ok(true) => {
            println!(
                "mounted {} at {} (pid {})",
                a.image,
                mountpoint.display(),
                child.id()
            );
            Ok(())
        }
        Ok(false) => {
            let _ = child.wait();
            let msg = std::fs::read_to_string(&log).unwrap_or_default();
            let msg = msg
                .lines()
                .rfind(|l| !l.trim().is_empty())
                .unwrap_or("")
                .to_string();
            bail!(
                "mount daemon failed: {}",
                msg.trim_start_matches("strata: error: ")
            )
        }
        Err(_) => {
            let _ = child.kill();
            bail!(
                "mount did not become ready within {}s (log: {})",
                a.timeout,
                log.display()
            )
        }
    }
}

/// The daemon: open the image, mount, serve until unmounted or signalled.
fn serve(g: &GlobalArgs, a: &MountArgs, mountpoint: &Path) -> anyhow::Result<()> {
    // Block termination signals in every thread; one thread waits for them and unmounts.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGHUP);
    signals.thread_block().context("blocking signals")?;

    let started = Instant::now();
    let store = open_store(g)?;
    let client = a.registry.client()?;
    let image = strata_fs::image::open(&store, &a.image, Some(&client))
        .with_context(|| format!("opening {}", a.image))?;
    let reference = image.reference.to_string();
    let manifest = image.manifest_digest.clone();
    let (tree, blobs) = image.into_tree().context("merging layers")?;
    let entries = tree.len();
    let disk_cache = if a.cache_size > 0 {
        let dir = super::cache::cache_dir(g);
        let cache = DiskCache::open(&dir, a.cache_size)
            .with_context(|| format!("opening the chunk cache {}", dir.display()))?;
        Some(Arc::new(cache))
    } else {
        None
    };
    let passthrough = match (a.passthrough, a.cache_size) {
        (false, _) => None,
        (true, 0) => {
            bail!("--passthrough keeps whole files in the disk cache: --cache-size must not be 0")
        }
        (true, cap) => {
            let dir = super::cache::files_dir(g);
            let files = DiskCache::open(&dir, cap)
                .with_context(|| format!("opening the file cache {}", dir.display()))?;
            Some(Arc::new(files))
        }
    };
    let config = MountConfig {
        passthrough,
        threads: a.threads,
        memory_cache: a.memory_cache as usize,
        fsname: format!("strata:{reference}"),
        disk_cache,
        cache_local: a.cache_local,
        background_prefetch: !a.no_prefetch,
        profile: match &a.profile {
            Some(p) => std::fs::read(p)
                .with_context(|| format!("reading profile {}", p.display()))?
                .split(|&b| b == b'\n')
                .filter(|l| !l.is_empty())
                .map(<[u8]>::to_vec)
                .collect(),
            None => Vec::new(),
        },
        record_profile: a
            .record_profile
            .as_ref()
            .map(|p| std::path::absolute(p).unwrap_or_else(|_| p.clone())),
    };
    let fs = StrataFs::new(tree, blobs, &config);
    let stats = fs.stats_handle();
    let mut session = mount_session(fs, mountpoint, &config)
        .with_context(|| format!("mounting FUSE at {}", mountpoint.display()))?;
    tracing::info!(image = %reference, mountpoint = %mountpoint.display(), entries,
        "mounted in {:.3}s", started.elapsed().as_secs_f64());

    let time_to_mount = started.elapsed();
    let record_path = store.mounts_dir().join(record_name(mountpoint));
    let stats_path = a.stats_file.clone().unwrap_or_else(|| {
        store
            .mounts_dir()
            .join(record_name(mountpoint).replace(".json", ".stats.json"))
    });
    let record = MountRecord {
        pid: std::process::id(),
        mountpoint: mountpoint.to_path_buf(),
        image: reference.clone(),
        manifest,
        log: store
            .mounts_dir()
            .join(record_name(mountpoint).replace(".json", ".log")),
        stats: Some(stats_path.clone()),
    };
    spawn_stats_writer(
        stats,
        stats_path.clone(),
        reference,
        mountpoint.to_path_buf(),
        time_to_mount,
    );
    std::fs::write(&record_path, serde_json::to_vec_pretty(&record)?)
        .with_context(|| format!("writing {}", record_path.display()))?;

    let mut unmounter = session.unmount_callable();
    std::thread::spawn(move || {
        if let Ok(sig) = signals.wait() {
            tracing::info!("received {sig:?}, unmounting");
            if let Err(e) = unmounter.unmount() {
                tracing::warn!("unmount failed: {e}");
            }
        }
    });
    // Once the session answers, raise readahead and tell the parent we are ready.
    let mp = mountpoint.to_path_buf();
    let (ra, notify) = (a.read_ahead_kb, a.notify_ready);
    std::thread::spawn(move || {
        match std::fs::metadata(&mp) {
            Ok(md) => set_read_ahead(md.dev(), ra),
            Err(e) => tracing::warn!("mount does not answer: {e}"),
        }
        if notify {
            let mut out = std::io::stdout();
            let _ = writeln!(out, "{READY}");
            let _ = out.flush();
        } else {
            eprintln!("mounted at {}", mp.display());
        }
    });
    let result = session.run();
    let _ = std::fs::remove_file(&record_path);
    let _ = std::fs::remove_file(&stats_path);
    result.with_context(|| format!("serving {}", mountpoint.display()))
}

fn set_read_ahead(dev: u64, kb: u32) {
    let (major, minor) = (nix::sys::stat::major(dev), nix::sys::stat::minor(dev));
    let path = format!("/sys/class/bdi/{major}:{minor}/read_ahead_kb");
    if let Err(e) = std::fs::write(&path, kb.to_string()) {
        tracing::debug!("cannot set {path}: {e}");
    }
}

pub fn umount(g: &GlobalArgs, a: UmountArgs) -> anyhow::Result<()> {
    let mountpoint = std::path::absolute(&a.mountpoint)?;
    // A dead daemon leaves a mount that cannot be stat'ed: do not canonicalize through it.
    let mountpoint = match mountpoint.parent().map(std::fs::canonicalize) {
        Some(Ok(p)) => p.join(mountpoint.file_name().unwrap_or_default()),
        _ => mountpoint,
    };
    let flags = if a.lazy {
        nix::mount::MntFlags::MNT_DETACH
    } else {
        nix::mount::MntFlags::empty()
    };
    nix::mount::umount2(&mountpoint, flags)
        .with_context(|| format!("unmounting {}", mountpoint.display()))?;
    // Wait for the daemon to finish so its exit is part of the unmount.
    let store = open_store(g)?;
    let record_path = store.mounts_dir().join(record_name(&mountpoint));
    if let Ok(data) = std::fs::read(&record_path) {
        if let Ok(rec) = serde_json::from_slice::<MountRecord>(&data) {
            let proc_path = PathBuf::from(format!("/proc/{}", rec.pid));
            let deadline = Instant::now() + Duration::from_secs(10);
            while proc_path.exists() && Instant::now() < deadline {
                if std::fs::read_to_string(proc_path.join("stat"))
                    .is_ok_and(|s| s.split_whitespace().nth(2) == Some("Z"))
                {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = std::fs::remove_file(&record_path);
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct StatsArgs {
    /// The mount point.
    pub mountpoint: PathBuf,
    /// Print the raw JSON.
    #[arg(long)]
    pub json: bool,
}

/// `strata stats MOUNTPOINT`: the counters a mount daemon publishes.
pub fn stats(g: &GlobalArgs, a: StatsArgs) -> anyhow::Result<()> {
    let mountpoint = std::fs::canonicalize(&a.mountpoint)
        .with_context(|| format!("mount point {}", a.mountpoint.display()))?;
    let store = open_store(g)?;
    let record_path = store.mounts_dir().join(record_name(&mountpoint));
    let record: MountRecord =
        serde_json::from_slice(&std::fs::read(&record_path).with_context(|| {
            format!(
                "{} is not a strata mount of this store",
                mountpoint.display()
            )
        })?)?;
    let path = record.stats.context("this mount publishes no statistics")?;
    let deadline = Instant::now() + Duration::from_secs(3);
    let data = loop {
        match std::fs::read(&path) {
            Ok(d) => break d,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        }
    };
    let v: serde_json::Value = serde_json::from_slice(&data)?;
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
