//! The `containerd.services.snapshots.v1.Snapshots` service over a unix socket: snapshots as
//! containerd's overlayfs snapshotter makes them (a directory per snapshot; active snapshots
//! mount as overlayfs over their parents' directories, or bind-mount when they have none).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tonic::{Request, Response, Status};

use crate::api::containerd::services::snapshots::v1 as pb;
use crate::api::containerd::types::Mount;
use crate::meta::{Kind, Meta, MetaError, Snapshot};

/// The service's state.
pub struct Service {
    meta: Mutex<Meta>,
}

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
    pub fn open(root: &Path) -> Result<Service, MetaError> {
        Ok(Service {
            meta: Mutex::new(Meta::open(root)?),
        })
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
        meta.create(key, parent, kind, labels).map_err(status)?;
        Self::mounts_of(&meta, key)
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
        let mounts = self.create(&r.key, &r.parent, Kind::Active, labels(r.labels))?;
        Ok(Response::new(pb::PrepareSnapshotResponse { mounts }))
    }

    async fn view(
        &self,
        request: Request<pb::ViewSnapshotRequest>,
    ) -> Result<Response<pb::ViewSnapshotResponse>, Status> {
        let r = request.into_inner();
        let mounts = self.create(&r.key, &r.parent, Kind::View, labels(r.labels))?;
        Ok(Response::new(pb::ViewSnapshotResponse { mounts }))
    }

    async fn mounts(
        &self,
        request: Request<pb::MountsRequest>,
    ) -> Result<Response<pb::MountsResponse>, Status> {
        let r = request.into_inner();
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
            meta.dir(s.id)
        };
        tokio::task::spawn_blocking(move || {
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                // Left for Cleanup (e.g. still mounted somewhere).
                tracing::warn!(dir = %dir.display(), "removing a snapshot's directory: {e}");
            }
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
        let batches: Vec<Result<pb::ListSnapshotsResponse, Status>> = infos
            .chunks(100)
            .map(|c| Ok(pb::ListSnapshotsResponse { info: c.to_vec() }))
            .collect();
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
            meta.dir(s.id).join("fs")
        };
        let (size, inodes) = tokio::task::spawn_blocking(move || usage(&dir))
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(pb::UsageResponse { size, inodes }))
    }

    async fn cleanup(&self, _request: Request<pb::CleanupRequest>) -> Result<Response<()>, Status> {
        // Orphans are moved aside under the lock (no Prepare can be given their ids then:
        // ids only grow), and deleted after.
        let trash = {
            let meta = self.meta()?;
            let trash = meta.trash_dir();
            for d in meta.orphans() {
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
pub fn serve(root: &Path, address: &Path) -> anyhow::Result<()> {
    let service = Arc::new(Service::open(root)?);
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
        let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
        let shutdown = async {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .ok();
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = async { if let Some(t) = term.as_mut() { t.recv().await; } else { std::future::pending::<()>().await } } => {}
            }
        };
        tonic::transport::Server::builder()
            .add_service(pb::snapshots_server::SnapshotsServer::from_arc(service))
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await?;
        let _ = std::fs::remove_file(address);
        Ok(())
    })
}
