//! The `containerd.services.snapshots.v1.Snapshots` service over a unix socket: snapshots as
//! containerd's overlayfs snapshotter makes them (a directory per snapshot; active snapshots
//! mount as overlayfs over their parents' directories, or bind-mount when they have none).
//! Layers of strata images are mounted lazily instead (`crate::remote`): their committed
//! snapshots' `fs/` directories are FUSE mounts the node daemon serves.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tonic::{Request, Response, Status};

use crate::api::containerd::services::snapshots::v1 as pb;
use crate::api::containerd::types::Mount;
use crate::meta::{Kind, Meta, MetaError, Snapshot};
use crate::remote::{self, LayerMounter, RemoteLayer};

/// The service's state.
pub struct Service {
    meta: Mutex<Meta>,
    /// Mounts strata layers lazily; without it every snapshot is unpacked by containerd.
    layers: Option<Arc<dyn LayerMounter>>,
    /// One check-and-mount at a time per layer directory (restore, containers starting).
    dir_locks: Arc<DirLocks>,
}

/// A lock per directory, made on first use.
#[derive(Default)]
struct DirLocks {
    locks: Mutex<std::collections::HashMap<PathBuf, Arc<Mutex<()>>>>,
    /// Directories released without their lock (see `with`): a mount in flight into one
    /// undoes itself when it lands.
    released: Mutex<std::collections::HashSet<PathBuf>>,
}

impl DirLocks {
    fn get(&self, dir: &Path) -> Arc<Mutex<()>> {
        let mut m = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        m.entry(dir.to_path_buf()).or_default().clone()
    }

    /// Whether `dir` was released while its lock was held (and forgets it).
    fn was_released(&self, dir: &Path) -> bool {
        self.released
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(dir)
    }

    /// Whether someone holds `dir`'s lock now (a mount of it in flight).
    fn held(&self, dir: &Path) -> bool {
        let lock = {
            let m = self.locks.lock().unwrap_or_else(|p| p.into_inner());
            match m.get(dir) {
                Some(l) => l.clone(),
                None => return false,
            }
        };
        let held = matches!(lock.try_lock(), Err(std::sync::TryLockError::WouldBlock));
        held
    }

    /// Runs `f` holding `dir`'s lock, waiting for it at most `wait` (a mount of it in flight
    /// through a hung daemon never lets go): after that, runs it anyway, and the mount in
    /// flight, if it lands, is undone by its thread (`was_released`).
    fn with<T>(&self, dir: &Path, wait: std::time::Duration, f: impl FnOnce() -> T) -> T {
        let lock = self.get(dir);
        let deadline = std::time::Instant::now() + wait;
        loop {
            match lock.try_lock() {
                Ok(_held) => return f(),
                Err(std::sync::TryLockError::Poisoned(p)) => {
                    let _held = p.into_inner();
                    return f();
                }
                Err(std::sync::TryLockError::WouldBlock) => {
                    if std::time::Instant::now() >= deadline {
                        tracing::warn!(dir = %dir.display(),
                            "a mount of this layer is still in flight; going on without it");
                        self.released
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .insert(dir.to_path_buf());
                        return f();
                    }
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
            }
        }
    }
}

/// How long Remove waits for a lazy layer's mount in flight before it goes on.
const REMOVE_WAIT: std::time::Duration = std::time::Duration::from_secs(30);
/// How long a layer's mount that failed waits for a restarted daemon restoring it.
const RESTORE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// How long a container start waits for its lazy layers to answer (a hung daemon never
/// answers: FUSE requests have no timeout).
const LAYER_CHECK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

fn status(e: MetaError) -> Status {
    match e {
        MetaError::AlreadyExists(_) => Status::already_exists(e.to_string()),
        MetaError::NotFound(_) => Status::not_found(e.to_string()),
        MetaError::FailedPrecondition(_) => Status::failed_precondition(e.to_string()),
        MetaError::InvalidArgument(_) => Status::invalid_argument(e.to_string()),
        MetaError::Io { .. } => Status::internal(e.to_string()),
    }
}

fn labels(m: std::collections::HashMap<String, String>) -> BTreeMap<String, String> {
    m.into_iter().collect()
}

fn timestamp(t: (i64, i32)) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.0,
        nanos: t.1,
    }
}

fn info(name: &str, s: &Snapshot) -> pb::Info {
    pb::Info {
        name: name.to_string(),
        parent: s.parent.clone(),
        kind: match s.kind {
            Kind::View => pb::Kind::View,
            Kind::Active => pb::Kind::Active,
            Kind::Committed => pb::Kind::Committed,
        } as i32,
        created_at: Some(timestamp(s.created)),
        updated_at: Some(timestamp(s.updated)),
        labels: s.labels.clone().into_iter().collect(),
    }
}

impl Service {
    pub fn open(root: &Path, layers: Option<Arc<dyn LayerMounter>>) -> Result<Service, MetaError> {
        Ok(Service {
            meta: Mutex::new(Meta::open(root)?),
            layers,
            dir_locks: Arc::default(),
        })
    }

    /// Mounts again every lazy layer that is not mounted and answering (after a reboot, a
    /// daemon stopped with `--forget` or killed): run in the background once the socket is
    /// served; containers need a layer only when they start, and each start checks its layers
    /// again ([`Service::ensure_lowers`]). Failures are logged.
    pub fn restore(&self) {
        let Some(layers) = &self.layers else { return };
        let remote: Vec<(String, PathBuf, RemoteLayer)> = match self.meta() {
            Ok(meta) => meta
                .all()
                .filter_map(|(k, s)| {
                    Some((k.clone(), meta.dir(s.id).join("fs"), s.remote.clone()?))
                })
                .collect(),
            Err(_) => return,
        };
        for (key, dir, layer) in remote {
            let lock = self.dir_locks.get(&dir);
            let _held = lock.lock().unwrap_or_else(|p| p.into_inner());
            // Removed meanwhile (containerd's GC): nothing to mount.
            let exists = self
                .meta()
                .is_ok_and(|m| m.get(&key).is_ok_and(|s| m.dir(s.id).join("fs") == dir));
            if !exists {
                continue;
            }
            if let Err(e) = ensure_layer(&dir, &layer, layers.as_ref(), RESTORE_WAIT) {
                tracing::error!(snapshot = %key, layer = %layer.layer, "{e}");
            }
        }
    }

    /// Makes sure every lazy layer under `parent` is mounted and answering (mounting it again
    /// if not): an overlay over an empty directory in its place would silently lack the
    /// layer.
    async fn ensure_lowers(&self, parent: &str) -> Result<(), Status> {
        let remote: Vec<(PathBuf, RemoteLayer)> = {
            let meta = self.meta()?;
            meta.chain_snapshots(parent)
                .map_err(status)?
                .into_iter()
                .filter_map(|s| Some((meta.dir(s.id).join("fs"), s.remote.clone()?)))
                .collect()
        };
        if remote.is_empty() {
            return Ok(());
        }
        let layers = self.layers.clone();
        let locks = self.dir_locks.clone();
        // Off the async workers, and bounded: a hung daemon blocks statfs forever.
        let check = tokio::task::spawn_blocking(move || {
            for (dir, layer) in &remote {
                if layer_state(dir) == LayerState::Live {
                    continue;
                }
                let Some(layers) = &layers else {
                    return Err(format!(
                        "lazy layer {} is not mounted and this snapshotter runs with --no-lazy",
                        dir.display()
                    ));
                };
                let lock = locks.get(dir);
                let _held = lock.lock().unwrap_or_else(|p| p.into_inner());
                ensure_layer(dir, layer, layers.as_ref(), RESTORE_WAIT)?;
            }
            Ok(())
        });
        match tokio::time::timeout(LAYER_CHECK_TIMEOUT, check).await {
            Err(_) => Err(Status::unavailable(
                "the lazy layers did not answer in time (still mounting them, or is the strata daemon hung?)",
            )),
            Ok(joined) => joined
                .map_err(|e| Status::internal(e.to_string()))?
                .map_err(Status::unavailable),
        }
    }

    /// Mounts the layer Prepare's labels name as committed snapshot (containerd's chain ID
    /// `target` on `parent`). `Ok` once containerd can find it; an error means the caller
    /// should prepare an ordinary snapshot instead.
    async fn prepare_remote(
        &self,
        key: &str,
        parent: &str,
        target: &str,
        layer: RemoteLayer,
        labels: BTreeMap<String, String>,
    ) -> Result<(), String> {
        let Some(layers) = self.layers.clone() else {
            return Err("lazy layers are off".into());
        };
        if self.has_remote(target, parent, &layer)? {
            return Ok(());
        }
        // Truly the layer containerd expects there: the chain ID of the image's diff IDs up to
        // this layer must be the one containerd will look it up by. Checked once the image's
        // metadata is on this node (so that a mount that fetches it first checks it after).
        let check_chain = {
            let expected = target.to_string();
            move |m: &dyn LayerMounter, l: &RemoteLayer| {
                let chain = m.chain_id(l)?;
                if chain != expected {
                    return Err(format!(
                        "the image's config gives this layer chain ID {chain}, containerd expects {expected}"
                    ));
                }
                Ok(())
            }
        };
        let local = {
            let (mounter, wanted, check) = (layers.clone(), layer.clone(), check_chain.clone());
            tokio::task::spawn_blocking(move || {
                // Everything the mount reads is on this node (`strata rpull` put it there).
                if !mounter.is_local(&wanted) {
                    return Ok(false);
                }
                check(mounter.as_ref(), &wanted).map(|()| true)
            })
            .await
            .map_err(|e| e.to_string())??
        };
        if local {
            self.prepare_remote_in_background(parent, target, layer, labels, layers)
                .await
        } else {
            self.prepare_remote_in_line(key, parent, target, layer, labels, layers, check_chain)
                .await
        }
    }

    /// Whether `target` on `parent` is mounted lazily already (an error if another image's
    /// layer claims it).
    fn has_remote(&self, target: &str, parent: &str, layer: &RemoteLayer) -> Result<bool, String> {
        let meta = self.meta().map_err(|e| e.to_string())?;
        remote_in(&meta, target, parent, layer)
    }

    /// [`Self::prepare_remote`] of a layer whose metadata is all on this node: the committed
    /// snapshot is recorded at once and the mount goes on in the background, holding the
    /// directory's lock from before Prepare answers, so the layers of an image mount side by
    /// side while containerd prepares the next ones. A container start (`ensure_lowers`) and
    /// Remove wait for the lock; a mount that failed is tried again by the container start,
    /// which reports it (as it is after a restart, for every lazy layer).
    async fn prepare_remote_in_background(
        &self,
        parent: &str,
        target: &str,
        layer: RemoteLayer,
        mut labels: BTreeMap<String, String>,
        layers: Arc<dyn LayerMounter>,
    ) -> Result<(), String> {
        labels.insert(remote::LABEL_REMOTE.into(), "strata".into());
        let name = remote::committed_name(target, parent);
        let dir = {
            let mut meta = self.meta().map_err(|e| e.to_string())?;
            // Prepared meanwhile by another namespace's pull: that one is found.
            if remote_in(&meta, target, parent, &layer)? {
                return Ok(());
            }
            let s = meta
                .create_remote(&name, parent, labels, layer.clone())
                .map_err(|e| e.to_string())?;
            meta.dir(s.id).join("fs")
        };
        let (mount_dir, locks, wanted) = (dir.clone(), self.dir_locks.clone(), layer.clone());
        let mounter = layers.clone();
        let started = tokio::task::spawn_blocking(move || {
            let (locked_tx, locked) = std::sync::mpsc::channel();
            std::thread::Builder::new()
                .name("strata-layer-mount".into())
                .spawn(move || {
                    let lock = locks.get(&mount_dir);
                    let _held = lock.lock().unwrap_or_else(|p| p.into_inner());
                    let _ = locked_tx.send(());
                    // Mounted already if a container start or a restart's restore took the
                    // lock first (the record was there before it).
                    // (No wait for a daemon restoring it: the container start tries again.)
                    let mounted = ensure_layer(
                        &mount_dir,
                        &wanted,
                        mounter.as_ref(),
                        std::time::Duration::ZERO,
                    );
                    if locks.was_released(&mount_dir) {
                        // Removed while this mount was in flight (Remove stopped waiting).
                        release_dir(&mount_dir, Some(&mounter));
                    } else if let Err(e) = mounted {
                        tracing::warn!(layer = %wanted.layer, image = %wanted.image,
                            dir = %mount_dir.display(),
                            "mounting a lazy layer failed (a container start tries again): {e}");
                    }
                })
                .map_err(|e| format!("starting the layer's mount: {e}"))?;
            locked
                .recv()
                .map_err(|_| "the layer's mount ended before it started".to_string())
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r);
        match started {
            Ok(()) => {
                tracing::info!(target, layer = %layer.layer, image = %layer.image, "layer mounted lazily");
            }
            // The record stays, as after a restart: the container start mounts the layer (others
            // may have found the record already).
            Err(e) => tracing::warn!(layer = %layer.layer, image = %layer.image,
                dir = %dir.display(), "the layer's mount did not start (a container start will): {e}"),
        }
        Ok(())
    }

    /// [`Self::prepare_remote`] of a layer whose metadata the mount fetches first: prepared as
    /// `key`, mounted before Prepare answers (a registry that cannot be reached makes this an
    /// ordinary snapshot), then committed.
    #[allow(clippy::too_many_arguments)]
    async fn prepare_remote_in_line(
        &self,
        key: &str,
        parent: &str,
        target: &str,
        layer: RemoteLayer,
        labels: BTreeMap<String, String>,
        layers: Arc<dyn LayerMounter>,
        check_chain: impl Fn(&dyn LayerMounter, &RemoteLayer) -> Result<(), String> + Send + 'static,
    ) -> Result<(), String> {
        let dir = {
            let mut meta = self.meta().map_err(|e| e.to_string())?;
            let s = meta
                .create(key, parent, Kind::Active, labels.clone(), false)
                .map_err(|e| e.to_string())?;
            meta.dir(s.id).join("fs")
        };
        let (mount_dir, mounter, wanted) = (dir.clone(), layers.clone(), layer.clone());
        let mounted = tokio::task::spawn_blocking(move || {
            mounter.mount(&wanted, &mount_dir)?;
            check_chain(mounter.as_ref(), &wanted)
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r);
        let committed = mounted.and_then(|()| {
            let mut labels = labels;
            labels.insert(remote::LABEL_REMOTE.into(), "strata".into());
            let name = remote::committed_name(target, parent);
            let mut meta = self.meta().map_err(|e| e.to_string())?;
            match meta.commit_with(&name, key, labels, Some(layer.clone())) {
                Ok(()) => Ok(true),
                // Prepared meanwhile by another namespace's pull: that one is found.
                Err(MetaError::AlreadyExists(_)) => Ok(false),
                Err(e) => Err(e.to_string()),
            }
        });
        match committed {
            Ok(true) => {
                tracing::info!(target, layer = %layer.layer, image = %layer.image, "layer mounted lazily");
                Ok(())
            }
            other => {
                // Undo: the key is prepared again as an ordinary snapshot (or was found).
                if let Ok(mut meta) = self.meta() {
                    let _ = meta.remove(key);
                }
                let locks = self.dir_locks.clone();
                let _ = tokio::task::spawn_blocking(move || {
                    locks.with(&dir, REMOVE_WAIT, || release_dir(&dir, Some(&layers)))
                })
                .await;
                other.map(|_| ())
            }
        }
    }

    fn meta(&self) -> Result<std::sync::MutexGuard<'_, Meta>, Status> {
        self.meta
            .lock()
            .map_err(|_| Status::internal("snapshot metadata lock poisoned"))
    }

    /// The mounts of snapshot `key`, as containerd's overlayfs snapshotter gives them.
    fn mounts_of(meta: &Meta, key: &str) -> Result<Vec<Mount>, Status> {
        let s = meta.get(key).map_err(status)?;
        if s.kind == Kind::Committed {
            return Err(Status::failed_precondition(format!(
                "{key} is committed: only active and view snapshots have mounts"
            )));
        }
        let lowers: Vec<PathBuf> = meta
            .chain(&s.parent)
            .map_err(status)?
            .into_iter()
            .map(|id| meta.dir(id).join("fs"))
            .collect();
        let dir = meta.dir(s.id);
        let path = |p: &Path| p.to_string_lossy().to_string();
        if s.kind == Kind::View && lowers.len() == 1 {
            return Ok(vec![Mount {
                r#type: "bind".into(),
                source: path(&lowers[0]),
                target: String::new(),
                options: vec!["ro".into(), "rbind".into()],
            }]);
        }
        if lowers.is_empty() {
            let ro = if s.kind == Kind::View { "ro" } else { "rw" };
            return Ok(vec![Mount {
                r#type: "bind".into(),
                source: path(&dir.join("fs")),
                target: String::new(),
                options: vec![ro.into(), "rbind".into()],
            }]);
        }
        let lowerdir = lowers.iter().map(|p| path(p)).collect::<Vec<_>>().join(":");
        let mut options = vec!["index=off".to_string()];
        // An upper written with metacopy=on (decided when the snapshot was prepared) needs it
        // in every overlay that has it, as upper or lower.
        let metacopy = s.metacopy
            || meta
                .chain_snapshots(&s.parent)
                .map_err(status)?
                .iter()
                .any(|l| l.metacopy);
        if metacopy {
            options.push("metacopy=on".into());
        }
        if s.kind == Kind::Active {
            options.push(format!("workdir={}", path(&dir.join("work"))));
            options.push(format!("upperdir={}", path(&dir.join("fs"))));
        }
        options.push(format!("lowerdir={lowerdir}"));
        Ok(vec![Mount {
            r#type: "overlay".into(),
            source: "overlay".into(),
            target: String::new(),
            options,
        }])
    }

    fn create(
        &self,
        key: &str,
        parent: &str,
        kind: Kind,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>, Status> {
        let mut meta = self.meta()?;
        // Over lazy layers, a chmod or chown then copies metadata up, not the file's bytes
        // (which would fetch all of it). The lazy lowers never pass overlayfs xattrs through
        // from image content, so they cannot forge metacopy origins.
        let metacopy = kind == Kind::Active
            && metacopy_supported()
            && meta
                .chain_snapshots(parent)
                .map_err(status)?
                .iter()
                .any(|l| l.remote.is_some());
        meta.create(key, parent, kind, labels, metacopy)
            .map_err(status)?;
        Self::mounts_of(&meta, key)
    }
}

/// What is at a lazy layer's directory.
#[derive(Debug, PartialEq, Eq)]
enum LayerState {
    /// A mount whose daemon answers statfs (never cached by the kernel, unlike the attributes
    /// a stat returns).
    Live,
    /// The plain directory: nothing mounted.
    NotMounted,
    /// A FUSE mount whose daemon is gone (ENOTCONN, ECONNABORTED).
    Dead,
    /// Something else failed: left alone.
    Unknown(String),
}

fn layer_state(dir: &Path) -> LayerState {
    use nix::errno::Errno;
    use std::os::unix::fs::MetadataExt;
    let dead = |e: Errno| matches!(e, Errno::ENOTCONN | Errno::ECONNABORTED);
    if let Err(e) = nix::sys::statfs::statfs(dir) {
        return if dead(e) {
            LayerState::Dead
        } else {
            LayerState::Unknown(e.to_string())
        };
    }
    match (std::fs::metadata(dir), dir.parent().map(std::fs::metadata)) {
        (Ok(d), Some(Ok(p))) if d.dev() != p.dev() => LayerState::Live,
        (Ok(_), Some(Ok(_))) => LayerState::NotMounted,
        (Err(e), _) if e.raw_os_error().is_some_and(|c| dead(Errno::from_raw(c))) => {
            LayerState::Dead
        }
        (Err(e), _) | (_, Some(Err(e))) => LayerState::Unknown(e.to_string()),
        (_, None) => LayerState::Unknown("no parent directory".into()),
    }
}

/// Mounts `layer` at `dir` unless it is mounted and answering; a dead mount there (its daemon
/// was killed) is detached first. Callers hold `dir`'s lock.
fn ensure_layer(
    dir: &Path,
    layer: &RemoteLayer,
    mounter: &dyn LayerMounter,
    restore_wait: std::time::Duration,
) -> Result<(), String> {
    let failed = |why: String| {
        format!(
            "lazy layer {} of {} at {}: {why}",
            layer.layer,
            layer.image,
            dir.display()
        )
    };
    match layer_state(dir) {
        LayerState::Live => return Ok(()),
        LayerState::NotMounted => {}
        LayerState::Dead => {
            if !strata_fs::service::is_strata_mount(dir) {
                return Err(failed(
                    "something other than the layer is mounted there".into(),
                ));
            }
            let _ = nix::mount::umount2(dir, nix::mount::MntFlags::MNT_DETACH);
        }
        LayerState::Unknown(e) => return Err(failed(e)),
    }
    match mounter.mount(layer, dir) {
        Ok(()) => Ok(()),
        Err(e) => {
            // A restarted daemon restoring its record of this mount meanwhile: wait for it.
            let deadline = std::time::Instant::now() + restore_wait;
            while std::time::Instant::now() < deadline {
                if layer_state(dir) == LayerState::Live {
                    return Ok(());
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            Err(failed(format!(
                "not mounted, and mounting it again failed: {e}"
            )))
        }
    }
}

/// Whether this kernel's overlayfs knows `metacopy=on` (its parameter shows once the module is
/// loaded: load it first).
fn metacopy_supported() -> bool {
    static SUPPORTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *SUPPORTED.get_or_init(|| {
        let param = Path::new("/sys/module/overlay/parameters/metacopy");
        if !param.exists() {
            let _ = std::process::Command::new("modprobe")
                .arg("overlay")
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status();
        }
        param.exists()
    })
}

/// Whether `target` on `parent` is mounted lazily in `meta` (an error if another image's layer
/// claims it).
fn remote_in(meta: &Meta, target: &str, parent: &str, layer: &RemoteLayer) -> Result<bool, String> {
    match meta.find_committed(target, parent) {
        Some(s) if s.remote.as_ref().is_none_or(|r| r.layer == layer.layer) => Ok(true),
        // Another image's layer claims this chain ID: containerd unpacks this one (and
        // checks its diff ID) rather than share that one.
        Some(_) => Err(format!(
            "a lazy snapshot of another layer already has chain ID {target}"
        )),
        None => Ok(false),
    }
}

/// Removes a snapshot's directory; a lazy layer mounted at its `fs/` is unmounted first (and
/// the directory left for Cleanup if it stays mounted: never delete through a mount).
fn release_dir(fs_dir: &Path, layers: Option<&Arc<dyn LayerMounter>>) {
    if strata_fs::service::is_mount_point(fs_dir) {
        if let Some(l) = layers {
            if let Err(e) = l.unmount(fs_dir) {
                tracing::warn!(dir = %fs_dir.display(), "unmounting a lazy layer: {e}");
            }
        }
        if strata_fs::service::is_mount_point(fs_dir) {
            tracing::warn!(dir = %fs_dir.display(), "still mounted: left for Cleanup");
            return;
        }
    }
    let Some(dir) = fs_dir.parent() else { return };
    if let Err(e) = std::fs::remove_dir_all(dir) {
        // Left for Cleanup (e.g. still mounted somewhere).
        tracing::warn!(dir = %dir.display(), "removing a snapshot's directory: {e}");
    }
}

/// Disk use of a directory tree: bytes of its files' blocks and its inodes.
fn usage(dir: &Path) -> (i64, i64) {
    use std::os::unix::fs::MetadataExt;
    let mut size = 0i64;
    let mut inodes = 0i64;
    let mut seen = std::collections::HashSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(md) = std::fs::symlink_metadata(e.path()) else {
                continue;
            };
            if seen.insert((md.dev(), md.ino())) {
                inodes += 1;
                size += (md.blocks() * 512) as i64;
            }
            if md.is_dir() {
                stack.push(e.path());
            }
        }
    }
    (size, inodes)
}

/// Encoded bytes of snapshot infos per List message.
const LIST_BATCH_BYTES: usize = 1 << 20;

type ListStream = std::pin::Pin<
    Box<dyn tokio_stream::Stream<Item = Result<pb::ListSnapshotsResponse, Status>> + Send>,
>;

#[tonic::async_trait]
impl pb::snapshots_server::Snapshots for Service {
    async fn prepare(
        &self,
        request: Request<pb::PrepareSnapshotRequest>,
    ) -> Result<Response<pb::PrepareSnapshotResponse>, Status> {
        let r = request.into_inner();
        let labels = labels(r.labels);
        if let (Some(target), Some(layer)) =
            (labels.get(remote::LABEL_TARGET), remote::layer_of(&labels))
        {
            if self.layers.is_some() {
                let target = target.clone();
                match self
                    .prepare_remote(&r.key, &r.parent, &target, layer.clone(), labels.clone())
                    .await
                {
                    Ok(()) => {
                        return Err(Status::already_exists(format!(
                            "target snapshot {target:?}: mounted lazily"
                        )))
                    }
                    Err(e) => tracing::info!(layer = %layer.layer, image = %layer.image,
                        "not mounted lazily, containerd unpacks it: {e}"),
                }
            }
        }
        self.ensure_lowers(&r.parent).await?;
        let mounts = self.create(&r.key, &r.parent, Kind::Active, labels)?;
        Ok(Response::new(pb::PrepareSnapshotResponse { mounts }))
    }

    async fn view(
        &self,
        request: Request<pb::ViewSnapshotRequest>,
    ) -> Result<Response<pb::ViewSnapshotResponse>, Status> {
        let r = request.into_inner();
        self.ensure_lowers(&r.parent).await?;
        let mounts = self.create(&r.key, &r.parent, Kind::View, labels(r.labels))?;
        Ok(Response::new(pb::ViewSnapshotResponse { mounts }))
    }

    async fn mounts(
        &self,
        request: Request<pb::MountsRequest>,
    ) -> Result<Response<pb::MountsResponse>, Status> {
        let r = request.into_inner();
        let parent = self.meta()?.get(&r.key).map_err(status)?.parent.clone();
        self.ensure_lowers(&parent).await?;
        let meta = self.meta()?;
        Ok(Response::new(pb::MountsResponse {
            mounts: Self::mounts_of(&meta, &r.key)?,
        }))
    }

    async fn commit(
        &self,
        request: Request<pb::CommitSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let r = request.into_inner();
        self.meta()?
            .commit(&r.name, &r.key, labels(r.labels))
            .map_err(status)?;
        Ok(Response::new(()))
    }

    async fn remove(
        &self,
        request: Request<pb::RemoveSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let r = request.into_inner();
        let dir = {
            let mut meta = self.meta()?;
            let s = meta.remove(&r.key).map_err(status)?;
            meta.dir(s.id).join("fs")
        };
        let layers = self.layers.clone();
        let locks = self.dir_locks.clone();
        tokio::task::spawn_blocking(move || {
            // A lazy layer's mount may still be going on in the background: after it.
            locks.with(&dir, REMOVE_WAIT, || release_dir(&dir, layers.as_ref()))
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(()))
    }

    async fn stat(
        &self,
        request: Request<pb::StatSnapshotRequest>,
    ) -> Result<Response<pb::StatSnapshotResponse>, Status> {
        let r = request.into_inner();
        let meta = self.meta()?;
        let s = meta.get(&r.key).map_err(status)?;
        Ok(Response::new(pb::StatSnapshotResponse {
            info: Some(info(&r.key, s)),
        }))
    }

    async fn update(
        &self,
        request: Request<pb::UpdateSnapshotRequest>,
    ) -> Result<Response<pb::UpdateSnapshotResponse>, Status> {
        let r = request.into_inner();
        let i = r
            .info
            .ok_or_else(|| Status::invalid_argument("update without info"))?;
        let fields = r.update_mask.map(|m| m.paths).unwrap_or_default();
        let s = self
            .meta()?
            .update_labels(&i.name, labels(i.labels), &fields)
            .map_err(status)?;
        Ok(Response::new(pb::UpdateSnapshotResponse {
            info: Some(info(&i.name, &s)),
        }))
    }

    type ListStream = ListStream;

    async fn list(
        &self,
        _request: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<Self::ListStream>, Status> {
        let infos: Vec<pb::Info> = self.meta()?.all().map(|(k, s)| info(k, s)).collect();
        // Batches of at most ~1 MiB (labels come from images and may be large; containerd
        // accepts messages of 16 MiB).
        let mut batches: Vec<Result<pb::ListSnapshotsResponse, Status>> = Vec::new();
        let mut batch: Vec<pb::Info> = Vec::new();
        let mut bytes = 0;
        for i in infos {
            let len = prost::Message::encoded_len(&i);
            if !batch.is_empty() && bytes + len > LIST_BATCH_BYTES {
                batches.push(Ok(pb::ListSnapshotsResponse {
                    info: std::mem::take(&mut batch),
                }));
                bytes = 0;
            }
            bytes += len;
            batch.push(i);
        }
        if !batch.is_empty() {
            batches.push(Ok(pb::ListSnapshotsResponse { info: batch }));
        }
        Ok(Response::new(Box::pin(tokio_stream::iter(batches))))
    }

    async fn usage(
        &self,
        request: Request<pb::UsageRequest>,
    ) -> Result<Response<pb::UsageResponse>, Status> {
        let r = request.into_inner();
        let dir = {
            let meta = self.meta()?;
            let s = meta.get(&r.key).map_err(status)?;
            if s.remote.is_some() {
                // A lazy layer takes no space in the snapshot (its chunks are the node
                // cache's, shared and capped): walking its mount would only count the image.
                return Ok(Response::new(pb::UsageResponse { size: 0, inodes: 0 }));
            }
            meta.dir(s.id).join("fs")
        };
        let (size, inodes) = tokio::task::spawn_blocking(move || usage(&dir))
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(pb::UsageResponse { size, inodes }))
    }

    async fn cleanup(&self, _request: Request<pb::CleanupRequest>) -> Result<Response<()>, Status> {
        // Lazy layers left mounted on orphans (an interrupted Prepare or Remove) are unmounted
        // first, without the lock (ids only grow: no Prepare is given an orphan's id).
        // An orphan whose layer is being mounted or released (its lock held: a Remove waiting
        // for a background mount) is the holder's to finish: left for a later Cleanup.
        let busy = |d: &Path| self.dir_locks.held(&d.join("fs"));
        let orphans: Vec<PathBuf> = self
            .meta()?
            .orphans()
            .into_iter()
            .filter(|d| !busy(d))
            .collect();
        let layers = self.layers.clone();
        let mounted: Vec<PathBuf> = orphans
            .iter()
            .map(|d| d.join("fs"))
            .filter(|f| strata_fs::service::is_mount_point(f))
            .collect();
        tokio::task::spawn_blocking(move || {
            for f in &mounted {
                if let Some(l) = &layers {
                    let _ = l.unmount(f);
                }
            }
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?;
        // Then what is not mounted is moved aside under the lock and deleted after.
        let trash = {
            let meta = self.meta()?;
            let trash = meta.trash_dir();
            for d in meta.orphans() {
                if busy(&d) || strata_fs::service::is_mount_point(&d.join("fs")) {
                    continue;
                }
                if let Some(name) = d.file_name() {
                    let _ = std::fs::create_dir_all(&trash);
                    let _ = std::fs::rename(&d, trash.join(name));
                }
            }
            trash
        };
        tokio::task::spawn_blocking(move || {
            let _ = std::fs::remove_dir_all(trash);
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(()))
    }
}

/// Serves the snapshots API on the unix socket `address` with snapshots under `root`, until
/// SIGINT or SIGTERM.
/// With `cri`, the CRI image-service proxy (`crate::cri`) is served too.
pub fn serve(
    root: &Path,
    address: &Path,
    layers: Option<Arc<dyn LayerMounter>>,
    cri: Option<crate::cri::CriProxy>,
) -> anyhow::Result<()> {
    strata_fs::store::create_private_dir(root)?;
    // Mount points are compared with the kernel's (canonical) view of them.
    let root = &std::fs::canonicalize(root)?;
    let service = Arc::new(Service::open(root, layers)?);
    // One server per root: a second would keep its own copy of the metadata.
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(root.join("lock"))?;
    let _lock = match nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(l) => l,
        Err(_) => anyhow::bail!("a strata snapshotter already serves {}", root.display()),
    };
    // Probed once, before any lock is held (it may load the overlay module).
    let _ = metacopy_supported();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let _ = std::fs::remove_file(address);
        if let Some(dir) = address.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let listener = tokio::net::UnixListener::bind(address)?;
        std::fs::set_permissions(address, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        {
            // Serving first: containers need their layers only when they start, and each
            // start checks them again.
            let service = service.clone();
            std::thread::spawn(move || service.restore());
        }
        let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
        let shutdown = async {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .ok();
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = async { if let Some(t) = term.as_mut() { t.recv().await; } else { std::future::pending::<()>().await } } => {}
            }
        };
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let cri_task = match cri {
            Some(c) => {
                let _ = std::fs::remove_file(&c.listen);
                if let Some(dir) = c.listen.parent() {
                    std::fs::create_dir_all(dir)?;
                }
                let listener = tokio::net::UnixListener::bind(&c.listen)?;
                std::fs::set_permissions(
                    &c.listen,
                    std::os::unix::fs::PermissionsExt::from_mode(0o600),
                )?;
                let proxy = crate::cri::ImageServiceProxy::new(&c.upstream, c.creds)?;
                let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
                let mut stop = stop_rx.clone();
                let listen = c.listen.clone();
                Some(tokio::spawn(async move {
                    let r = tonic::transport::Server::builder()
                        .add_service(proxy)
                        .serve_with_incoming_shutdown(incoming, async move {
                            let _ = stop.changed().await;
                        })
                        .await;
                    let _ = std::fs::remove_file(&listen);
                    r
                }))
            }
            None => None,
        };
        let served = tonic::transport::Server::builder()
            .add_service(pb::snapshots_server::SnapshotsServer::from_arc(service))
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await;
        let _ = stop_tx.send(true);
        if let Some(t) = cri_task {
            if let Ok(Err(e)) = t.await {
                tracing::error!("the CRI image-service proxy failed: {e}");
            }
        }
        let _ = std::fs::remove_file(address);
        served?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use pb::snapshots_server::Snapshots;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Mounts a tmpfs as "the layer", failing its first `fails` mounts; the first mount waits
    /// for `gate` to open.
    struct FakeLayers {
        chain: String,
        fails: AtomicUsize,
        mounts: AtomicUsize,
        gate: Mutex<Option<std::sync::mpsc::Receiver<()>>>,
    }

    impl LayerMounter for FakeLayers {
        fn mount(&self, _layer: &RemoteLayer, dir: &Path) -> Result<(), String> {
            let gate = self.gate.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some(gate) = gate {
                let _ = gate.recv_timeout(std::time::Duration::from_secs(10));
            }
            if self
                .fails
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                return Err("injected mount failure".into());
            }
            nix::mount::mount(
                Some("tmpfs"),
                dir,
                Some("tmpfs"),
                nix::mount::MsFlags::empty(),
                None::<&str>,
            )
            .map_err(|e| e.to_string())?;
            self.mounts.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        fn unmount(&self, dir: &Path) -> Result<(), String> {
            nix::mount::umount2(dir, nix::mount::MntFlags::MNT_DETACH).map_err(|e| e.to_string())
        }
        fn chain_id(&self, _layer: &RemoteLayer) -> Result<String, String> {
            Ok(self.chain.clone())
        }
        fn is_local(&self, _layer: &RemoteLayer) -> bool {
            true
        }
    }

    /// A layer mounted in the background whose mount fails: Prepare has answered
    /// `AlreadyExists`, so the container start that comes next waits for it, mounts it again,
    /// and gets an overlay over the mounted layer; Remove unmounts it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_background_mount_is_retried_by_the_container_start() {
        if !nix::unistd::geteuid().is_root() {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI runs this test as root"
            );
            eprintln!("skipped: needs root (mounts a tmpfs)");
            return;
        }
        let root = std::env::temp_dir().join(format!(
            "strata-snap-bg-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        ));
        let chain = format!("sha256:{}", "c".repeat(64));
        let (open_gate, gate) = std::sync::mpsc::channel();
        let fake = Arc::new(FakeLayers {
            chain: chain.clone(),
            fails: AtomicUsize::new(1),
            mounts: AtomicUsize::new(0),
            gate: Mutex::new(Some(gate)),
        });
        /// Whatever happens, nothing stays mounted under the test's root.
        struct Unmount(PathBuf);
        impl Drop for Unmount {
            fn drop(&mut self) {
                if let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") {
                    for m in mounts.lines().filter_map(|l| l.split(' ').nth(1)) {
                        if Path::new(m).starts_with(&self.0) {
                            let _ = nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH);
                        }
                    }
                }
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
        std::fs::create_dir_all(&root).unwrap();
        let root = root.canonicalize().unwrap();
        let _cleanup = Unmount(root.clone());
        let svc =
            Arc::new(Service::open(&root, Some(fake.clone() as Arc<dyn LayerMounter>)).unwrap());
        let labels: std::collections::HashMap<String, String> = [
            (remote::LABEL_TARGET, chain.clone()),
            (remote::LABEL_IMAGE_REF, "localhost:5000/app:v1".to_string()),
            (remote::LABEL_MANIFEST, format!("sha256:{}", "a".repeat(64))),
            (remote::LABEL_LAYER, format!("sha256:{}", "b".repeat(64))),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let answered = svc
            .prepare(Request::new(pb::PrepareSnapshotRequest {
                snapshotter: "strata".into(),
                key: "extract-0".into(),
                parent: String::new(),
                labels,
            }))
            .await;
        assert_eq!(
            answered.err().map(|s| s.code()),
            Some(tonic::Code::AlreadyExists)
        );
        // Answered while the mount waits at the gate, the committed snapshot recorded (with no
        // active one before it).
        assert_eq!(fake.fails.load(Ordering::SeqCst), 1);
        {
            let meta = svc.meta().unwrap();
            assert!(meta.get("extract-0").is_err());
            assert!(meta.find_committed(&chain, "").is_some());
        }
        let start = {
            let svc = svc.clone();
            let parent = remote::committed_name(&chain, "");
            tokio::spawn(async move {
                svc.prepare(Request::new(pb::PrepareSnapshotRequest {
                    snapshotter: "strata".into(),
                    key: "container".into(),
                    // containerd names the parent by the key it was committed under.
                    parent,
                    labels: Default::default(),
                }))
                .await
            })
        };
        // The container start waits for the mount in flight rather than mounting beside it.
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        assert!(!start.is_finished());
        assert_eq!(fake.fails.load(Ordering::SeqCst), 1);
        open_gate.send(()).unwrap();
        let prepared = start
            .await
            .unwrap()
            .expect("the container start mounts the layer again");
        assert_eq!(fake.mounts.load(Ordering::SeqCst), 1);
        assert_eq!(fake.fails.load(Ordering::SeqCst), 0);
        let layer_dir = {
            let meta = svc.meta().unwrap();
            let committed = meta.find_committed(&chain, "").unwrap();
            meta.dir(committed.id).join("fs")
        };
        assert!(strata_fs::service::is_mount_point(&layer_dir));
        let options = &prepared.into_inner().mounts[0].options;
        assert!(
            options
                .iter()
                .any(|o| o.contains(&*layer_dir.to_string_lossy())),
            "{options:?}"
        );
        for key in ["container".to_string(), remote::committed_name(&chain, "")] {
            svc.remove(Request::new(pb::RemoveSnapshotRequest {
                snapshotter: "strata".into(),
                key,
            }))
            .await
            .unwrap();
        }
        assert!(!strata_fs::service::is_mount_point(&layer_dir));
    }

    #[test]
    fn dir_locks_tell_held_and_bound_the_wait() {
        let locks = Arc::new(DirLocks::default());
        let dir = Path::new("/nonexistent/layer/fs");
        assert!(!locks.held(dir));
        let lock = locks.get(dir);
        let guard = lock.lock().unwrap();
        assert!(locks.held(dir));
        let started = std::time::Instant::now();
        let ran = locks.with(dir, std::time::Duration::from_millis(50), || 7);
        assert_eq!(ran, 7);
        assert!(started.elapsed() >= std::time::Duration::from_millis(50));
        // Released without the lock: the holder is told once.
        assert!(locks.was_released(dir));
        assert!(!locks.was_released(dir));
        drop(guard);
        assert!(!locks.held(dir));
        assert_eq!(locks.with(dir, std::time::Duration::from_secs(5), || 8), 8);
        assert!(!locks.was_released(dir));
    }
}
