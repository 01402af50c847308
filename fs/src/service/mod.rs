//! The mount service: one owner of the store, the registry clients, one disk cache and one
//! memory cache, serving many mounts from one process.
//!
//! `strata daemon` serves a [`MountService`] on a unix control socket ([`server`]); the CLI,
//! containers, builds and the containerd snapshotter all ask it through the same API:
//! [`MountService::mount`] → a live mount with counters, [`MountService::list`],
//! [`MountService::stats`], [`MountService::unmount`], and [`MountService::restore`] after a
//! restart. Each live mount is recorded in `ROOT/mounts/ID.json` (its request) while it lives;
//! a daemon that stops on a signal unmounts every mount but keeps the records, and the next
//! daemon mounts them again.

pub mod client;
pub mod protocol;
pub mod server;
mod writable;
pub use writable::lower_dir as writable_lower_dir;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::{Condvar, Mutex};
use serde::{Deserialize, Serialize};

use crate::cache::DiskCache;
use crate::chunks::ChunkPool;
use crate::fuse::{mount_session, MountConfig, StatsHandle, StrataFs};
use crate::reference::Reference;
use crate::registry::auth::{docker_config_path, CredentialStore};
use crate::registry::{Registry, RegistryConfig};
use crate::store::Store;

/// Why a service call failed.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("{0} is already a strata mount")]
    AlreadyMounted(PathBuf),
    #[error("{0} is not a strata mount of this daemon")]
    NotMounted(PathBuf),
    #[error("mount point {path}: {reason}")]
    BadMountpoint { path: PathBuf, reason: String },
    #[error("{0}")]
    Image(String),
    #[error("unmounting {path}: {source}")]
    Unmount {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("mounting overlayfs at {path}: {source}")]
    Overlay {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("mounting FUSE at {path}: {source}")]
    Mount {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Io(String),
}

/// Registry settings of one request (the daemon builds its client from them).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct RegistryOptions {
    /// Hosts reached over plain HTTP besides localhost and 127.0.0.0/8.
    pub insecure: Vec<String>,
    /// Seconds a registry may stay silent before a request fails (0: the default).
    pub timeout_secs: u64,
    /// Attempts per request (0: the default).
    pub attempts: u32,
    /// Directory of per-host `hosts.toml` files.
    pub hosts_dir: Option<PathBuf>,
    /// Credentials handed over with this request (the kubelet's pull secret, as the CRI passed
    /// it to the snapshotter): they win over the node's for their host. Never recorded on disk.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub passed: Option<PassedCredential>,
    /// In a mount record: the host credentials were passed for (not the credentials). Such a
    /// mount is not restored by a new daemon (it could not reach the registry as its requester
    /// did): the requester mounts it again with them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub passed_for: Option<String>,
}

/// A credential for one registry host, passed along with a request.
#[derive(Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct PassedCredential {
    pub host: String,
    /// `<token>` when `password` is an identity token.
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for PassedCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "PassedCredential({}, {}, <redacted>)",
            self.host, self.username
        )
    }
}

impl RegistryOptions {
    pub fn config(&self) -> RegistryConfig {
        let mut c = RegistryConfig {
            insecure_hosts: self.insecure.clone(),
            hosts_dir: self.hosts_dir.clone().filter(|d| d.is_dir()),
            ..RegistryConfig::default()
        };
        if self.timeout_secs > 0 {
            c.connect_timeout = Duration::from_secs(self.timeout_secs);
            c.read_timeout = Duration::from_secs(self.timeout_secs);
        }
        if self.attempts > 0 {
            c.attempts = self.attempts;
        }
        c
    }

    /// A client with the credentials of Docker's `config.json` as they are now.
    pub fn client(&self) -> Result<Arc<Registry>, ServiceError> {
        let path = docker_config_path();
        let mut creds = CredentialStore::load(path.clone())
            .map_err(|e| ServiceError::Io(format!("reading {}: {e}", path.display())))?;
        if let Some(p) = &self.passed {
            creds.insert(
                &p.host,
                crate::registry::auth::Credential {
                    username: p.username.clone(),
                    password: p.password.clone(),
                },
            );
        }
        Ok(Arc::new(Registry::new(self.config(), creds)))
    }
}

fn yes() -> bool {
    true
}
fn four() -> usize {
    4
}
fn one_mib_kb() -> u32 {
    1024
}

/// What to mount, where and how.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MountRequest {
    /// Image reference or manifest digest (local store first, then its registry).
    pub image: String,
    /// Absolute path of an existing directory.
    pub mountpoint: PathBuf,
    /// FUSE worker threads.
    #[serde(default = "four")]
    pub threads: usize,
    /// Kernel readahead of the mount in KiB.
    #[serde(default = "one_mib_kb")]
    pub read_ahead_kb: u32,
    /// Fetch the rest of the image into the disk cache in the background.
    #[serde(default = "yes")]
    pub prefetch: bool,
    /// Access profile whose files are prefetched first.
    #[serde(default)]
    pub profile: Option<PathBuf>,
    /// Record the order of first reads here when unmounted.
    #[serde(default)]
    pub record_profile: Option<PathBuf>,
    /// Serve large files by FUSE passthrough.
    #[serde(default)]
    pub passthrough: bool,
    /// Keep chunks of local layers in the disk cache too.
    #[serde(default)]
    pub cache_local: bool,
    /// `OS/ARCH` to pick when the image must be pulled.
    #[serde(default)]
    pub platform: Option<String>,
    #[serde(default)]
    pub registry: RegistryOptions,
    /// Honour setuid bits and devices (container lowers); inspection mounts are nosuid,nodev.
    #[serde(default)]
    pub setuid: bool,
    /// A writable view: kernel overlayfs at `mountpoint` over the lazy mount, with its upper
    /// and work directories under this directory (`DIR/upper`, `DIR/work`).
    #[serde(default)]
    pub upper: Option<PathBuf>,
    /// Serve the writable view with strata's FUSE writable layer, not kernel overlayfs.
    #[serde(default)]
    pub fuse_upper: bool,
    /// Mount only this layer (its manifest digest), in the form overlayfs reads a lower
    /// directory in (whiteouts as 0/0 devices, opaque directories marked): a containerd
    /// snapshot. Its plain layers are refused, never fetched whole.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer: Option<String>,
    /// A mount the service made for one of its own (the lower of a writable view): not
    /// recorded (its owner's record restores it). Never taken from a client.
    #[serde(skip)]
    pub internal: bool,
}

impl MountRequest {
    /// What a mount record on disk keeps of this request: all but passed credentials (they
    /// stay in memory; a mount restored after a restart uses the node's).
    pub fn recorded(&self) -> MountRequest {
        let mut r = self.clone();
        if let Some(p) = r.registry.passed.take() {
            r.registry.passed_for = Some(p.host);
        }
        r
    }

    pub fn new(image: impl Into<String>, mountpoint: impl Into<PathBuf>) -> Self {
        MountRequest {
            image: image.into(),
            mountpoint: mountpoint.into(),
            threads: 4,
            read_ahead_kb: 1024,
            prefetch: true,
            profile: None,
            record_profile: None,
            passthrough: false,
            cache_local: false,
            platform: None,
            registry: RegistryOptions::default(),
            setuid: false,
            upper: None,
            fuse_upper: false,
            layer: None,
            internal: false,
        }
    }
}

/// A live mount, as listed.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MountInfo {
    pub id: String,
    pub mountpoint: PathBuf,
    /// The image's reference as resolved in the store.
    pub image: String,
    pub manifest: String,
    /// Entries of the merged tree.
    pub entries: u64,
    /// Seconds since the epoch when it was mounted.
    pub mounted_at: u64,
    pub time_to_mount_ms: u64,
    /// Things the user should know (e.g. layers that had to be fetched whole).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// For a writable view: the directory holding its upper and work directories.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upper: Option<PathBuf>,
    /// For a mount of one layer: its digest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer: Option<String>,
    /// Listed for an ordinary user from the daemon of their rootless namespace (the path is
    /// that namespace's: `strata unshare` reaches it).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub rootless: bool,
}

/// Node-wide settings of a service.
#[derive(Clone, Debug)]
pub struct ServiceConfig {
    /// Bytes of decoded chunks kept in memory for all mounts.
    pub memory_cache: usize,
    /// Size cap of the disk caches (chunks; whole files for passthrough); 0 disables them.
    pub cache_size: u64,
    /// Threads per mount that wait on fetches for reads.
    pub fetch_threads: usize,
    /// Most entries an image may have (all layers together); bounds the memory of a TOC.
    pub max_entries: u32,
    /// Small remote reads are topped up with following chunks to this many bytes.
    pub neighbour_fetch: u64,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        ServiceConfig {
            memory_cache: 256 << 20,
            cache_size: 10 << 30,
            fetch_threads: 16,
            max_entries: crate::format::types::DEFAULT_MAX_ENTRIES,
            neighbour_fetch: crate::fuse::NEIGHBOUR_FETCH,
        }
    }
}

/// Makes an image's plain (non-strata) layers mountable (fetch whole, index on the node);
/// provided by the builder, which owns conversion.
/// Returns how many layers it had to fetch and index now.
pub type LayerIndexer =
    dyn Fn(&Store, Option<&Arc<Registry>>, &str) -> Result<usize, String> + Send + Sync;

struct Live {
    info: MountInfo,
    request: MountRequest,
    stats: StatsHandle,
    record: PathBuf,
    started: Instant,
    time_to_mount_ms: std::sync::atomic::AtomicU64,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// fuser's handle on the mount. Taken (and used) right after our own `umount2`, so that
    /// fuser never unmounts by path later, when something else may be mounted there.
    unmounter: Mutex<Option<fuser::SessionUnmounter>>,
    /// The mount's device number, to tell it from anything mounted over it later.
    dev: AtomicU64,
}

struct Inner {
    store: Store,
    config: ServiceConfig,
    pool: Arc<ChunkPool>,
    files: Mutex<Option<Arc<DiskCache>>>,
    mounts: Mutex<BTreeMap<PathBuf, Arc<Live>>>,
    /// Writable views (overlayfs over one of `mounts`), by mount point.
    writable: Mutex<BTreeMap<PathBuf, writable::Writable>>,
    /// Mount points being mounted right now (so two requests cannot race for one).
    pending: Mutex<Vec<PathBuf>>,
    /// One lock per image being pulled: the layer mounts of one image arrive together, and the
    /// others wait for the first's pull (metadata and access profile) rather than find the
    /// image half there.
    pulls: Mutex<BTreeMap<String, Arc<Mutex<()>>>>,
    changed: Condvar,
    indexer: Option<Box<LayerIndexer>>,
    /// Requests being served (an idle daemon exits only when none are).
    busy: AtomicUsize,
    last_activity: Mutex<Instant>,
    /// Set while shutting down: mounts ending now keep their records, to be restored.
    keep_records: AtomicBool,
    /// Set once a shutdown has unmounted everything: the daemon exits.
    stopped: AtomicBool,
    /// Set when a shutdown begins: no new mounts.
    closing: AtomicBool,
}

/// The mount service (cheap to clone: one shared owner).
#[derive(Clone)]
pub struct MountService {
    inner: Arc<Inner>,
}

impl MountService {
    /// Opens the store at `root` and the node's caches.
    pub fn open(
        root: &Path,
        config: ServiceConfig,
        indexer: Option<Box<LayerIndexer>>,
    ) -> Result<Self, ServiceError> {
        let store = Store::open(root).map_err(|e| ServiceError::Io(e.to_string()))?;
        let disk = if config.cache_size > 0 {
            let old = store.layout().old_chunk_cache();
            if old.is_dir() {
                tracing::info!(dir = %old.display(), "removing the chunk cache of an older version");
                let _ = std::fs::remove_dir_all(&old);
            }
            let dir = store.layout().chunk_cache();
            let cache = crate::packs::PackCache::open(&dir, config.cache_size).map_err(|e| {
                ServiceError::Io(format!("opening the chunk cache {}: {e}", dir.display()))
            })?;
            Some(Arc::new(cache))
        } else {
            None
        };
        let pool = ChunkPool::new(config.memory_cache, disk);
        Ok(MountService {
            inner: Arc::new(Inner {
                store,
                config,
                pool,
                files: Mutex::new(None),
                mounts: Mutex::new(BTreeMap::new()),
                writable: Mutex::new(BTreeMap::new()),
                pending: Mutex::new(Vec::new()),
                pulls: Mutex::new(BTreeMap::new()),
                changed: Condvar::new(),
                indexer,
                busy: AtomicUsize::new(0),
                last_activity: Mutex::new(Instant::now()),
                keep_records: AtomicBool::new(false),
                stopped: AtomicBool::new(false),
                closing: AtomicBool::new(false),
            }),
        })
    }

    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// Whether the service is shutting down (or an idle daemon decided to exit).
    pub fn is_closing(&self) -> bool {
        self.inner.closing.load(Ordering::SeqCst)
    }

    /// The node-wide chunk pool (its disk cache is the node's one chunk cache).
    pub fn pool(&self) -> &Arc<ChunkPool> {
        &self.inner.pool
    }

    /// Notes that a request is being served until the guard drops.
    pub fn activity(&self) -> ActivityGuard {
        self.inner.busy.fetch_add(1, Ordering::SeqCst);
        ActivityGuard(self.inner.clone())
    }

    /// Mounts an image; returns once the mount answers.
    pub fn mount(&self, req: MountRequest) -> Result<MountInfo, ServiceError> {
        let _busy = self.activity();
        if req.upper.is_some() && req.layer.is_some() {
            return Err(ServiceError::Image(
                "a mount of one layer cannot be a writable view".into(),
            ));
        }
        if req.upper.is_some() {
            return self.mount_writable(req);
        }
        let mountpoint =
            std::fs::canonicalize(&req.mountpoint).map_err(|e| ServiceError::BadMountpoint {
                path: req.mountpoint.clone(),
                reason: e.to_string(),
            })?;
        if !mountpoint.is_dir() {
            return Err(ServiceError::BadMountpoint {
                path: mountpoint,
                reason: "not a directory".into(),
            });
        }
        {
            let mounts = self.inner.mounts.lock();
            if self.inner.closing.load(Ordering::SeqCst) {
                return Err(ServiceError::Io("the daemon is shutting down".into()));
            }
            let mut pending = self.inner.pending.lock();
            if mounts.contains_key(&mountpoint) || pending.contains(&mountpoint) {
                return Err(ServiceError::AlreadyMounted(mountpoint));
            }
            // Never on top of another filesystem: unmounting ours would then be ambiguous.
            if is_mount_point(&mountpoint) {
                return Err(ServiceError::BadMountpoint {
                    path: mountpoint,
                    reason: "something is already mounted there".into(),
                });
            }
            pending.push(mountpoint.clone());
        }
        let result = self.mount_at(req, &mountpoint);
        self.inner.pending.lock().retain(|p| p != &mountpoint);
        self.inner.changed.notify_all();
        result
    }

    fn mount_at(
        &self,
        mut req: MountRequest,
        mountpoint: &Path,
    ) -> Result<MountInfo, ServiceError> {
        let started = Instant::now();
        req.mountpoint = mountpoint.to_path_buf();
        let store = &self.inner.store;
        let client = req.registry.client()?;
        self.pull_if_missing(&mut req, &client)?;
        let mut warnings = Vec::new();
        if req.layer.is_some() {
            // One layer for containerd: a plain one is containerd's to unpack.
        } else if let Some(index) = &self.inner.indexer {
            let indexed = index(store, Some(&client), &req.image).map_err(|e| {
                ServiceError::Image(format!("indexing the plain layers of {}: {e}", req.image))
            })?;
            if indexed > 0 {
                warnings.push(format!(
                    "{} is not lazily pullable ({indexed} plain layers fetched whole and indexed \
                     on this node); `strata convert` it to start containers lazily",
                    req.image
                ));
            }
        }
        let open = |below| {
            crate::image::open_selected(
                store,
                &req.image,
                Some(&client),
                self.inner.config.max_entries,
                req.layer.as_deref(),
                below,
            )
            .map_err(|e| ServiceError::Image(format!("opening {}: {e}", req.image)))
        };
        let t_pulled = started.elapsed();
        let mut image = open(false)?;
        // A layer alone that lacks parent directories takes their attributes from the layers
        // below: open those only then (most layers list their parents).
        if req.layer.is_some()
            && image
                .layers
                .last()
                .is_some_and(|l| crate::tree::has_missing_parents(&l.toc))
        {
            image = open(true)?;
        }
        let reference = image.reference.to_string();
        let manifest = image.manifest_digest.clone();
        let (tree, blobs) = if req.layer.is_some() {
            image.into_lower_tree()
        } else {
            image.into_tree()
        }
        .map_err(|e| ServiceError::Image(format!("merging the layers of {reference}: {e}")))?;
        let entries = tree.len() as u64;
        let t_tree = started.elapsed();
        let profile =
            match &req.profile {
                Some(p) => crate::profile::parse(&read_limited(p, MAX_PROFILE).map_err(|e| {
                    ServiceError::Io(format!("reading profile {}: {e}", p.display()))
                })?),
                // The profile published for this manifest, when a pull (`strata rpull`, an earlier
                // mount) fetched one.
                None if req.prefetch => match store.layout().profile_of(&manifest) {
                    Some(stored) => match read_limited(&stored, MAX_PROFILE) {
                        Ok(text) => crate::profile::parse(&text),
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
                        Err(e) => {
                            tracing::warn!(profile = %stored.display(),
                                "cannot read the access profile: {e}");
                            Vec::new()
                        }
                    },
                    None => Vec::new(),
                },
                None => Vec::new(),
            };
        let config = MountConfig {
            threads: req.threads.clamp(1, 64),
            memory_cache: self.inner.config.memory_cache,
            fsname: format!("strata:{reference}"),
            disk_cache: self.inner.pool.disk().cloned(),
            cache_local: req.cache_local,
            background_prefetch: req.prefetch,
            profile,
            record_profile: req.record_profile.clone(),
            passthrough: if req.passthrough {
                Some(self.file_cache()?)
            } else {
                None
            },
            pool: Some(self.inner.pool.clone()),
            setuid: req.setuid,
            fetch_threads: self.inner.config.fetch_threads,
            neighbour_fetch: self.inner.config.neighbour_fetch,
        };
        let fs = StrataFs::new(tree, blobs, &config);
        let stats = fs.stats_handle();
        let id = mount_id(mountpoint);
        let record = store.mounts_dir().join(format!("{id}.json"));
        // Recorded before the kernel mount: a crash from here on leaves a record the next
        // daemon restores (detaching a dead mount) or drops; a mount that fails removes it.
        let body = serde_json::json!({"request": req.recorded(), "info": {"id": id, "mountpoint": mountpoint}});
        if req.internal {
            // Its owner's record restores it.
        } else if let Err(e) = write_record(store, &req, &record, body.to_string().as_bytes()) {
            tracing::warn!(mountpoint = %mountpoint.display(),
                "cannot record the mount (it will not be restored after a restart): {e}");
        }
        // Pulling may have taken a while: still nothing mounted there?
        if is_mount_point(mountpoint) {
            let _ = std::fs::remove_file(&record);
            return Err(ServiceError::BadMountpoint {
                path: mountpoint.to_path_buf(),
                reason: "something is already mounted there".into(),
            });
        }
        let mut session = match mount_session(fs, mountpoint, &config) {
            Ok(s) => s,
            Err(source) => {
                let _ = std::fs::remove_file(&record);
                return Err(ServiceError::Mount {
                    path: mountpoint.to_path_buf(),
                    source,
                });
            }
        };
        let t_kernel = started.elapsed();
        let unmounter = session.unmount_callable();
        let info = MountInfo {
            id,
            mountpoint: mountpoint.to_path_buf(),
            image: reference.clone(),
            manifest,
            entries,
            mounted_at: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            time_to_mount_ms: 0,
            warnings,
            upper: None,
            layer: req.layer.clone(),
            rootless: false,
        };
        let live = Arc::new(Live {
            info,
            request: req,
            stats,
            record,
            started,
            time_to_mount_ms: Default::default(),
            thread: Mutex::new(None),
            unmounter: Mutex::new(Some(unmounter)),
            dev: AtomicU64::new(0),
        });
        {
            let mut mounts = self.inner.mounts.lock();
            if self.inner.closing.load(Ordering::SeqCst) {
                drop(mounts);
                // Dropping the session unmounts it (nothing else is mounted there).
                drop(session);
                let _ = std::fs::remove_file(&live.record);
                return Err(ServiceError::Io("the daemon is shutting down".into()));
            }
            mounts.insert(mountpoint.to_path_buf(), live.clone());
        }
        let weak = Arc::downgrade(&self.inner);
        let ended = live.clone();
        let spawned = std::thread::Builder::new()
            .name("strata-session".into())
            .spawn(move || {
                let result = session.run();
                if let Some(inner) = weak.upgrade() {
                    inner.ended(&ended, result);
                }
            });
        let thread = match spawned {
            Ok(t) => t,
            Err(e) => {
                // The session went with the closure: fuser unmounted it. Forget the mount.
                self.inner.mounts.lock().remove(mountpoint);
                let _ = std::fs::remove_file(&live.record);
                return Err(ServiceError::Io(format!(
                    "starting the session thread: {e}"
                )));
            }
        };
        *live.thread.lock() = Some(thread);
        // The first request through the mount waits for the kernel's INIT to be answered.
        let answered = std::fs::metadata(mountpoint);
        let t_answer = started.elapsed();
        match answered {
            Ok(md) => {
                use std::os::unix::fs::MetadataExt;
                live.dev.store(md.dev(), Ordering::SeqCst);
                set_read_ahead(md.dev(), live.request.read_ahead_kb);
            }
            Err(e) => {
                let _ = self.unmount(mountpoint, true);
                return Err(ServiceError::Mount {
                    path: mountpoint.to_path_buf(),
                    source: e,
                });
            }
        }
        let mut info = live.info.clone();
        info.time_to_mount_ms = started.elapsed().as_millis() as u64;
        live.time_to_mount_ms
            .store(info.time_to_mount_ms, Ordering::Relaxed);
        let body = serde_json::json!({"request": live.request.recorded(), "info": info});
        if live.request.internal {
            // Not recorded.
        } else if let Err(e) = write_record(
            store,
            &live.request,
            &live.record,
            body.to_string().as_bytes(),
        ) {
            tracing::warn!(mountpoint = %mountpoint.display(), "cannot update the mount record: {e}");
        }
        tracing::info!(image = %reference, mountpoint = %mountpoint.display(), entries,
            "mounted in {:.3}s (metadata {:.3}s, TOCs and tree {:.3}s, kernel mount {:.3}s, first answer {:.3}s)",
            started.elapsed().as_secs_f64(), t_pulled.as_secs_f64(),
            (t_tree - t_pulled).as_secs_f64(), (t_kernel - t_tree).as_secs_f64(),
            (t_answer - t_kernel).as_secs_f64());
        Ok(info)
    }

    /// Pulls the image's metadata (and its published access profile) when it is not in the
    /// store yet; lazy layers stay in the registry.
    fn pull_if_missing(
        &self,
        req: &mut MountRequest,
        client: &Arc<Registry>,
    ) -> Result<(), ServiceError> {
        let store = &self.inner.store;
        let lock = {
            let mut pulls = self.inner.pulls.lock();
            // In the store and not being pulled (a pull tags the image before it has fetched
            // the profile): nothing to do.
            if !pulls.contains_key(&req.image) && store.resolve(&req.image).is_ok() {
                return Ok(());
            }
            pulls.entry(req.image.clone()).or_default().clone()
        };
        let pulled = {
            let _pulling = lock.lock();
            self.pull_now(req, client)
        };
        let mut pulls = self.inner.pulls.lock();
        if Arc::strong_count(&lock) <= 2 {
            pulls.remove(&req.image);
        }
        pulled
    }

    /// [`Self::pull_if_missing`] with the image's pull lock held.
    fn pull_now(&self, req: &mut MountRequest, client: &Arc<Registry>) -> Result<(), ServiceError> {
        let store = &self.inner.store;
        if store.resolve(&req.image).is_ok() {
            // Pulled by the request this one waited for.
            return Ok(());
        }
        let r = Reference::parse(&req.image).map_err(|e| ServiceError::Image(e.to_string()))?;
        let (os, arch) = match &req.platform {
            Some(p) => match p.split_once('/') {
                Some((os, arch)) if !os.is_empty() && !arch.is_empty() => {
                    (os.to_string(), arch.to_string())
                }
                _ => return Err(ServiceError::Image("platform must be OS/ARCH".into())),
            },
            None => {
                let (os, arch) = crate::oci::host_platform();
                (os.to_string(), arch.to_string())
            }
        };
        // A layer for containerd: plain layers are containerd's to fetch, never the node's.
        let pulled = if req.layer.is_some() {
            crate::transfer::pull_metadata(store, client, &r, (&os, &arch))
        } else {
            crate::transfer::pull(store, client, &r, (&os, &arch), false, &mut |_| {})
        }
        .map_err(|e| ServiceError::Image(format!("pulling {r}: {e}")))?;
        if req.profile.is_none() && req.prefetch {
            // Profiles are bound to the manifest digest: one recorded for another build of the
            // same tag is never used.
            let stored = store.layout().profile_of(&pulled.digest);
            match (
                crate::transfer::fetch_profile(client, &r, &pulled.digest),
                stored,
            ) {
                (Ok(Some(profile)), Some(path)) => match store.write_file(&path, &profile) {
                    Ok(()) => {
                        tracing::info!(image = %r, "using the published access profile");
                        req.profile = Some(path);
                    }
                    Err(e) => tracing::warn!(image = %r, "cannot keep the access profile: {e}"),
                },
                (Ok(Some(_)), None) => {
                    tracing::warn!(image = %r, "no place for the access profile of {}", pulled.digest)
                }
                // None published (any more): an older one kept for this manifest goes.
                (Ok(None), Some(path)) => remove_stale_profile(&path),
                (Ok(None), None) => {}
                (Err(e), _) => tracing::warn!(image = %r, "cannot fetch the access profile: {e}"),
            }
        }
        Ok(())
    }

    /// The whole-file cache of passthrough mounts (opened on first use, shared by all).
    fn file_cache(&self) -> Result<Arc<DiskCache>, ServiceError> {
        let cap = self.inner.config.cache_size;
        if cap == 0 {
            return Err(ServiceError::Io(
                "passthrough keeps whole files in the disk cache: the cache size must not be 0"
                    .into(),
            ));
        }
        let mut files = self.inner.files.lock();
        if let Some(f) = &*files {
            return Ok(f.clone());
        }
        let dir = self.inner.store.layout().file_cache();
        let cache = Arc::new(DiskCache::open(&dir, cap).map_err(|e| {
            ServiceError::Io(format!("opening the file cache {}: {e}", dir.display()))
        })?);
        *files = Some(cache.clone());
        Ok(cache)
    }

    /// Unmounts `mountpoint`. Without `lazy` it fails if the mount is busy and otherwise waits
    /// for its session to end; with `lazy` it detaches the mount at once and returns (the
    /// session ends when the last user lets go). A dead strata mount left by a crashed daemon
    /// is detached too; anything that is not a strata mount is refused.
    pub fn unmount(&self, mountpoint: &Path, lazy: bool) -> Result<(), ServiceError> {
        let _busy = self.activity();
        let mountpoint = resolve_mountpoint(mountpoint);
        if self.is_view(&mountpoint) {
            return self.unmount_writable(&mountpoint, lazy);
        }
        if let Some(view) = self.is_view_lower(&mountpoint) {
            return Err(ServiceError::BadMountpoint {
                path: mountpoint,
                reason: format!("it belongs to the writable view {}", view.display()),
            });
        }
        self.unmount_lazy_mount(&mountpoint, lazy)
    }

    /// Unmounts a lazy (FUSE) mount, a client's or one of the service's own.
    fn unmount_lazy_mount(&self, mountpoint: &Path, lazy: bool) -> Result<(), ServiceError> {
        let mountpoint = mountpoint.to_path_buf();
        let live = {
            let mounts = self.inner.mounts.lock();
            if self.inner.pending.lock().contains(&mountpoint) {
                return Err(ServiceError::BadMountpoint {
                    path: mountpoint,
                    reason: "it is being mounted right now".into(),
                });
            }
            mounts.get(&mountpoint).cloned()
        };
        let flags = if lazy {
            nix::mount::MntFlags::MNT_DETACH
        } else {
            nix::mount::MntFlags::empty()
        };
        let umount = |path: &Path| {
            nix::mount::umount2(path, flags).map_err(|e| ServiceError::Unmount {
                path: path.to_path_buf(),
                source: e.into(),
            })
        };
        let Some(live) = live else {
            if is_strata_mount(&mountpoint) {
                umount(&mountpoint)?;
                let _ = std::fs::remove_file(
                    self.inner
                        .store
                        .mounts_dir()
                        .join(format!("{}.json", mount_id(&mountpoint))),
                );
                return Ok(());
            }
            return Err(ServiceError::NotMounted(mountpoint));
        };
        // Only ever the mount we made: not something mounted over it since.
        let dev = live.dev.load(Ordering::SeqCst);
        if dev != 0 && top_mount_dev(&mountpoint).is_some_and(|top| top != dev) {
            return Err(ServiceError::BadMountpoint {
                path: mountpoint,
                reason: "another filesystem is mounted over the strata mount: unmount it first"
                    .into(),
            });
        }
        // fuser's own handle unmounts by path; spent first, while the top mount is ours (it
        // fails if busy, and is spent either way), so fuser never unmounts by path later.
        let spent = live.unmounter.lock().take().map(|mut u| u.unmount());
        match spent {
            Some(Ok(())) if !is_mount_point(&mountpoint) => {}
            _ => umount(&mountpoint)?,
        }
        {
            let mut mounts = self.inner.mounts.lock();
            if mounts
                .get(&mountpoint)
                .is_some_and(|l| Arc::ptr_eq(l, &live))
            {
                mounts.remove(&mountpoint);
            }
        }
        if !self.inner.keep_records.load(Ordering::SeqCst) {
            let _ = std::fs::remove_file(&live.record);
        }
        self.inner.changed.notify_all();
        if !lazy {
            let thread = live.thread.lock().take();
            if let Some(t) = thread {
                let _ = t.join();
            }
        }
        Ok(())
    }

    /// Live mounts, by mount point.
    pub fn list(&self) -> Vec<MountInfo> {
        let mut out: Vec<MountInfo> = self
            .inner
            .mounts
            .lock()
            .values()
            .filter(|l| !l.request.internal)
            .map(|l| {
                let mut i = l.info.clone();
                i.time_to_mount_ms = time_to_mount(l);
                i
            })
            .collect();
        out.extend(self.inner.writable.lock().values().map(|w| w.info.clone()));
        out.sort_by(|a, b| a.mountpoint.cmp(&b.mountpoint));
        out
    }

    /// A mount's counters (JSON: fetches, caches, passthrough, FUSE op latency histograms).
    pub fn stats(&self, mountpoint: &Path) -> Result<serde_json::Value, ServiceError> {
        let mountpoint = resolve_mountpoint(mountpoint);
        // A writable view's counters are its lazy lower's.
        let lower = self
            .inner
            .writable
            .lock()
            .get(&mountpoint)
            .map(|w| w.lower.clone());
        if let Some(lower) = lower {
            let mut v = self.stats(&lower)?;
            v["mountpoint"] = serde_json::json!(mountpoint);
            v["lower"] = serde_json::json!(lower);
            return Ok(v);
        }
        let live = self
            .inner
            .mounts
            .lock()
            .get(&mountpoint)
            .cloned()
            .ok_or(ServiceError::NotMounted(mountpoint))?;
        Ok(mount_stats(&live))
    }

    /// Every live mount's counters and the node's.
    pub fn metrics(&self) -> serde_json::Value {
        let mounts: Vec<Arc<Live>> = self.inner.mounts.lock().values().cloned().collect();
        serde_json::json!({
            "node": self.node_stats(),
            "mounts": mounts.iter().map(|l| mount_stats(l)).collect::<Vec<_>>(),
        })
    }

    /// The node's caches.
    pub fn node_stats(&self) -> serde_json::Value {
        let files = self.inner.files.lock().as_ref().map(|f| f.stats());
        serde_json::json!({
            "pid": std::process::id(),
            "mounts": self.inner.mounts.lock().len(),
            "memory_cache_bytes": self.inner.pool.memory_bytes(),
            "memory_cache_capacity": self.inner.config.memory_cache,
            "disk_cache": self.inner.pool.disk().map(|d| d.stats()),
            "file_cache": files,
        })
    }

    /// Trims the node's disk caches to `max` bytes (least recently used packs and files first;
    /// a reader of a removed pack finishes through its open descriptor or refetches).
    pub fn cache_gc(&self, max: u64) -> serde_json::Value {
        if let Some(d) = self.inner.pool.disk() {
            d.evict_to(max);
        }
        if let Some(f) = self.inner.files.lock().as_ref() {
            f.evict_to(max);
        }
        self.node_stats()
    }

    /// Mounts again what the records of a previous daemon list (after a restart or a crash):
    /// a dead mount still at the mount point is detached first. A record that cannot be
    /// mounted again is dropped, and the failure returned.
    pub fn restore(&self) -> Vec<(PathBuf, Result<MountInfo, ServiceError>)> {
        let dir = self.inner.store.mounts_dir();
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for e in entries.flatten() {
            let path = e.path();
            if path.extension().is_none_or(|x| x != "json") {
                continue;
            }
            let request = std::fs::read(&path)
                .ok()
                .and_then(|d| serde_json::from_slice::<serde_json::Value>(&d).ok())
                .and_then(|v| serde_json::from_value::<MountRequest>(v["request"].clone()).ok());
            let Some(request) = request else {
                tracing::warn!(record = %path.display(), "dropping an unreadable mount record");
                let _ = std::fs::remove_file(&path);
                continue;
            };
            let mp = request.mountpoint.clone();
            // What a crashed daemon left: its FUSE mount (dead), or a writable view's overlay
            // and the dead lazy mount under it.
            let mut dead = vec![mp.clone()];
            if request.upper.is_some() {
                dead.insert(0, writable::lower_dir(&self.inner.store, &mp));
            }
            for d in dead.iter().rev() {
                // Only what is ours: our overlay over our `.lower`, or a strata mount.
                let overlay =
                    request.upper.is_some() && d == &mp && writable::is_our_overlay(d, &dead[0]);
                if overlay || is_strata_mount(d) {
                    if let Err(e) = nix::mount::umount2(d, nix::mount::MntFlags::MNT_DETACH) {
                        tracing::warn!(mountpoint = %d.display(), "cannot detach a dead mount: {e}");
                    }
                }
            }
            if request.registry.passed_for.is_some() {
                tracing::info!(mountpoint = %mp.display(),
                    "not restored: mounted with credentials its requester passed (it mounts it again)");
                let _ = std::fs::remove_file(&path);
                continue;
            }
            let result = self.mount(request);
            match &result {
                Ok(_) => tracing::info!(mountpoint = %mp.display(), "mount restored"),
                Err(e) => {
                    tracing::error!(mountpoint = %mp.display(), "cannot restore mount: {e}");
                    let _ = std::fs::remove_file(&path);
                }
            }
            out.push((mp, result));
        }
        out
    }

    /// Unmounts everything (detaching busy mounts); with `keep_records`, the next daemon
    /// restores them.
    pub fn shutdown(&self, keep_records: bool) {
        self.inner
            .keep_records
            .store(keep_records, Ordering::SeqCst);
        let mounts: Vec<PathBuf> = {
            let mounts = self.inner.mounts.lock();
            self.inner.closing.store(true, Ordering::SeqCst);
            mounts.keys().cloned().collect()
        };
        let views: Vec<PathBuf> = self.inner.writable.lock().keys().cloned().collect();
        // FUSE writable layers sync their copy-ups when their sessions end, which a daemon
        // about to exit may not wait for: now, and again once they are detached.
        crate::fuse_upper::settle_all();
        for mp in views.into_iter().chain(mounts) {
            match self.unmount(&mp, true) {
                // A writable view's lower went with its view.
                Ok(()) | Err(ServiceError::NotMounted(_)) => {}
                Err(e) => tracing::warn!(mountpoint = %mp.display(), "{e}"),
            }
        }
        crate::fuse_upper::settle_all();
        self.inner.stopped.store(true, Ordering::SeqCst);
        let _guard = self.inner.mounts.lock();
        self.inner.changed.notify_all();
    }

    /// Blocks until a shutdown has finished, or (with `idle`) until no mount lives and no
    /// request has been served for that long.
    pub fn wait_stop(&self, idle: Option<Duration>) {
        let mut mounts = self.inner.mounts.lock();
        loop {
            if self.inner.stopped.load(Ordering::SeqCst) {
                return;
            }
            let mut wait = Duration::from_secs(3600);
            if let Some(grace) = idle {
                let quiet = self.inner.last_activity.lock().elapsed();
                let idle_now = mounts.is_empty()
                    && self.inner.busy.load(Ordering::SeqCst) == 0
                    && self.inner.pending.lock().is_empty();
                if idle_now && quiet >= grace {
                    self.inner.closing.store(true, Ordering::SeqCst);
                    return;
                }
                wait = if idle_now {
                    grace.saturating_sub(quiet)
                } else {
                    grace
                };
            }
            self.inner
                .changed
                .wait_for(&mut mounts, wait.max(Duration::from_millis(10)));
        }
    }

    /// Blocks until `mountpoint` is no longer mounted by this service.
    pub fn wait_unmounted(&self, mountpoint: &Path) {
        let mountpoint = resolve_mountpoint(mountpoint);
        let mut mounts = self.inner.mounts.lock();
        while mounts.contains_key(&mountpoint)
            || self.inner.writable.lock().contains_key(&mountpoint)
        {
            self.inner.changed.wait(&mut mounts);
        }
    }
}

/// Counts a request in progress (see [`MountService::activity`]).
pub struct ActivityGuard(Arc<Inner>);

impl Drop for ActivityGuard {
    fn drop(&mut self) {
        *self.0.last_activity.lock() = Instant::now();
        self.0.busy.fetch_sub(1, Ordering::SeqCst);
        self.0.changed.notify_all();
    }
}

impl Inner {
    /// A session ended (unmounted by us, by `umount`, or failed).
    fn ended(&self, live: &Arc<Live>, result: std::io::Result<()>) {
        let mp = &live.info.mountpoint;
        match result {
            Ok(()) => tracing::info!(mountpoint = %mp.display(), "unmounted"),
            Err(e) => tracing::error!(mountpoint = %mp.display(), "session ended: {e}"),
        }
        let ours = {
            let mut mounts = self.mounts.lock();
            let ours = mounts.get(mp).is_some_and(|l| Arc::ptr_eq(l, live));
            if ours {
                mounts.remove(mp);
            }
            ours
        };
        // Unmounted through us, the record is already gone (and the path may hold a newer
        // mount with a record of the same name): only a session that ended on its own drops it.
        if ours && !self.keep_records.load(Ordering::SeqCst) {
            let _ = std::fs::remove_file(&live.record);
        }
        *self.last_activity.lock() = Instant::now();
        self.changed.notify_all();
    }
}

fn time_to_mount(l: &Live) -> u64 {
    l.time_to_mount_ms.load(Ordering::Relaxed)
}

fn mount_stats(l: &Live) -> serde_json::Value {
    let (fetch, disk) = l.stats.get().unwrap_or_default();
    serde_json::json!({
        "image": l.info.image,
        "manifest": l.info.manifest,
        "mountpoint": l.info.mountpoint,
        "pid": std::process::id(),
        "layer": l.info.layer,
        "time_to_mount_ms": time_to_mount(l),
        "time_to_first_byte_ms": l.stats.first_source_read()
            .map(|t| t.saturating_duration_since(l.started).as_millis() as u64),
        "prefetched": l.stats.prefetched(),
        "profile_chunks": l.stats.profile_chunks(),
        "uptime_s": l.started.elapsed().as_secs(),
        "fetch": fetch,
        "avg_fetch_latency_ms": if fetch.source_reads > 0 {
            fetch.source_micros as f64 / fetch.source_reads as f64 / 1000.0
        } else {
            0.0
        },
        "disk_cache": disk,
        "file_cache": l.stats.files(),
        "passthrough_opens": l.stats.passthrough_opens(),
        "ops": l.stats.ops().unwrap_or_default(),
    })
}

/// Largest access profile read (a path per line: millions of paths).
const MAX_PROFILE: u64 = 256 << 20;

/// Removes a stored access profile that its image no longer publishes.
pub fn remove_stale_profile(path: &Path) {
    if let Err(e) = std::fs::remove_file(path) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(profile = %path.display(), "cannot remove the old access profile: {e}");
        }
    }
}

/// Writes a mount's record. That of a containerd layer (`req.layer`) is not synced: the
/// snapshotter's own (synced) metadata mounts the layer again after the machine's crash, which
/// may leave this record empty or torn (dropped as unreadable), and a container start waits on
/// no disk flush for it. Every other mount is restored from its record alone.
fn write_record(
    store: &crate::store::Store,
    req: &MountRequest,
    path: &Path,
    body: &[u8],
) -> Result<(), crate::store::StoreError> {
    if req.layer.is_some() {
        store.write_file_unsynced(path, body)
    } else {
        store.write_file(path, body)
    }
}

/// Reads a regular file of at most `max` bytes.
fn read_limited(path: &Path, max: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let f = std::fs::File::open(path)?;
    if !f.metadata()?.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    let mut out = Vec::new();
    f.take(max + 1).read_to_end(&mut out)?;
    if out.len() as u64 > max {
        return Err(std::io::Error::other(format!("larger than {max} bytes")));
    }
    Ok(out)
}

/// A stable id for a mount point (the name of its record).
pub fn mount_id(mountpoint: &Path) -> String {
    let s = mountpoint.to_string_lossy();
    crate::format::Sha256Digest::of(s.as_bytes()).hex()[..16].to_string()
}

/// The absolute form of a mount point without stat'ing through it (a dead mount answers
/// ENOTCONN): its parent is canonicalised, its last component kept.
pub fn resolve_mountpoint(mountpoint: &Path) -> PathBuf {
    let abs = std::path::absolute(mountpoint).unwrap_or_else(|_| mountpoint.to_path_buf());
    match (abs.parent().map(std::fs::canonicalize), abs.file_name()) {
        (Some(Ok(p)), Some(name)) => p.join(name),
        _ => abs,
    }
}

/// Whether a strata FUSE filesystem is mounted at `mountpoint` (per /proc/self/mountinfo: a
/// `fuse` or `fuse.strata` mount whose source is `strata…`).
pub fn is_strata_mount(mountpoint: &Path) -> bool {
    let target = mountpoint.to_string_lossy();
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    // The topmost mount at the path decides.
    let top = info.lines().rfind(|l| {
        l.split_whitespace()
            .nth(4)
            .is_some_and(|p| unescape(p) == target)
    });
    top.into_iter().any(|l| {
        let fields: Vec<&str> = l.split_whitespace().collect();
        let after = fields
            .iter()
            .position(|f| *f == "-")
            .map(|i| &fields[i + 1..]);
        let (fstype, source) = match after {
            Some([t, s, ..]) => (*t, *s),
            _ => return false,
        };
        fields.get(4).is_some_and(|p| unescape(p) == target)
            && (fstype == "fuse" || fstype == "fuse.strata")
            && source.starts_with("strata")
    })
}

/// The device number of the topmost mount at `path` (the last mountinfo line naming it).
pub fn top_mount_dev(path: &Path) -> Option<u64> {
    let target = path.to_string_lossy();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .rfind(|l| {
            l.split_whitespace()
                .nth(4)
                .is_some_and(|p| unescape(p) == target)
        })
        .and_then(|l| {
            let (major, minor) = l.split_whitespace().nth(2)?.split_once(':')?;
            Some(nix::sys::stat::makedev(
                major.parse().ok()?,
                minor.parse().ok()?,
            ))
        })
}

/// Whether anything is mounted exactly at `path` (per /proc/self/mountinfo).
pub fn is_mount_point(path: &Path) -> bool {
    let target = path.to_string_lossy();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| {
            l.split_whitespace()
                .nth(4)
                .is_some_and(|p| unescape(p) == target)
        })
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        if let (b'\\', Some(d)) = (b[i], octal) {
            let v = d.iter().fold(0u32, |v, c| v * 8 + u32::from(c - b'0'));
            out.push(v as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn set_read_ahead(dev: u64, kb: u32) {
    let (major, minor) = (nix::sys::stat::major(dev), nix::sys::stat::minor(dev));
    let path = format!("/sys/class/bdi/{major}:{minor}/read_ahead_kb");
    if let Err(e) = std::fs::write(&path, kb.to_string()) {
        tracing::debug!("cannot set {path}: {e}");
    }
}
