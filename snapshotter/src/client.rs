//! A client of containerd's own gRPC API (content, images, leases, diff and snapshots
//! services) over its unix socket, for `strata rpull`: every call carries the namespace, and
//! the pull's lease once one is taken (containerd's garbage collector leaves leased content and
//! snapshots alone until the image references them).

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};

use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Code, Request};

use crate::api::containerd::services::content::v1 as content;
use crate::api::containerd::services::diff::v1 as diff;
use crate::api::containerd::services::images::v1 as images;
use crate::api::containerd::services::leases::v1 as leases;
use crate::api::containerd::services::snapshots::v1 as snapshots;
use crate::api::containerd::types::{Descriptor, Mount};

/// A failed call, with what was being done.
#[derive(Debug, thiserror::Error)]
#[error("containerd: {what}: {status}")]
pub struct CallError {
    pub what: String,
    pub status: tonic::Status,
}

type Result<T> = std::result::Result<T, CallError>;

fn failed(what: impl Into<String>) -> impl FnOnce(tonic::Status) -> CallError {
    let what = what.into();
    move |status| CallError { what, status }
}

/// Content writes made by this process (for unique ingest refs).
static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Bytes per message when streaming content (containerd's own clients use 1 MiB).
const WRITE_CHUNK: usize = 1 << 20;

/// A connection to containerd in one namespace.
pub struct Containerd {
    channel: Channel,
    namespace: String,
    lease: Option<String>,
}

/// What Prepare gave: mounts to unpack into, or a snapshot the snapshotter already had.
pub enum Prepared {
    Mounts(Vec<Mount>),
    AlreadyExists,
}

impl Containerd {
    /// Connects to containerd's socket at `socket`.
    pub async fn connect(socket: &Path, namespace: &str) -> std::result::Result<Self, String> {
        let path: PathBuf = socket.to_path_buf();
        // The URI is never dialled: the connector opens the unix socket.
        let channel = Endpoint::try_from("http://containerd.sock")
            .map_err(|e| e.to_string())?
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let path = path.clone();
                async move {
                    let s = tokio::net::UnixStream::connect(path).await?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
                }
            }))
            .await
            .map_err(|e| format!("connecting to containerd at {}: {e}", socket.display()))?;
        if namespace.is_empty() || tonic::metadata::MetadataValue::try_from(namespace).is_err() {
            return Err(format!("invalid containerd namespace {namespace:?}"));
        }
        Ok(Containerd {
            channel,
            namespace: namespace.to_string(),
            lease: None,
        })
    }

    fn req<T>(&self, msg: T) -> Request<T> {
        let mut r = Request::new(msg);
        if let Ok(v) = self.namespace.parse() {
            r.metadata_mut().insert("containerd-namespace", v);
        }
        if let Some(Ok(v)) = self.lease.as_ref().map(|l| l.parse()) {
            r.metadata_mut().insert("containerd-lease", v);
        }
        r
    }

    /// Takes a lease (expiring after an hour if never released) for the calls that follow.
    pub async fn take_lease(&mut self, id: &str) -> Result<()> {
        let expire = strata_fs::rfc3339::format(
            std::time::SystemTime::now() + std::time::Duration::from_secs(3600),
        );
        let labels = HashMap::from([("containerd.io/gc.expire".to_string(), expire)]);
        let req = self.req(leases::CreateRequest {
            id: id.to_string(),
            labels,
        });
        leases::leases_client::LeasesClient::new(self.channel.clone())
            .create(req)
            .await
            .map_err(failed("creating a lease"))?;
        self.lease = Some(id.to_string());
        Ok(())
    }

    /// Releases the lease taken (what it protected is then kept by references alone).
    pub async fn release_lease(&mut self) -> Result<()> {
        let Some(id) = self.lease.take() else {
            return Ok(());
        };
        let req = self.req(leases::DeleteRequest { id, sync: false });
        leases::leases_client::LeasesClient::new(self.channel.clone())
            .delete(req)
            .await
            .map_err(failed("releasing the lease"))?;
        Ok(())
    }

    /// Whether the content store has `digest`.
    pub async fn has_content(&self, digest: &str) -> Result<bool> {
        let req = self.req(content::InfoRequest {
            digest: digest.to_string(),
        });
        match content::content_client::ContentClient::new(self.channel.clone())
            .info(req)
            .await
        {
            Ok(_) => Ok(true),
            Err(s) if s.code() == Code::NotFound => Ok(false),
            Err(s) => Err(failed(format!("looking up {digest}"))(s)),
        }
    }

    /// Sets `labels` on content that exists.
    pub async fn label_content(
        &self,
        digest: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<()> {
        let req = self.req(content::UpdateRequest {
            info: Some(content::Info {
                digest: digest.to_string(),
                labels: labels.clone().into_iter().collect(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: labels.keys().map(|k| format!("labels.{k}")).collect(),
            }),
        });
        content::content_client::ContentClient::new(self.channel.clone())
            .update(req)
            .await
            .map_err(failed(format!("labelling {digest}")))?;
        Ok(())
    }

    /// Writes `size` bytes read from `reader` as content `digest` (verified by containerd),
    /// with `labels`; content already there only gets the labels.
    pub async fn write_content(
        &self,
        digest: &str,
        size: u64,
        reader: Box<dyn Read + Send>,
        labels: &BTreeMap<String, String>,
    ) -> Result<()> {
        if self.has_content(digest).await? {
            return self.label_content(digest, labels).await;
        }
        let what = format!("writing {digest}");
        let (tx, rx) = tokio::sync::mpsc::channel::<content::WriteContentRequest>(4);
        // One ingest per write: two pulls sharing a blob do not contend for a ref's lock.
        let reference = format!(
            "strata-rpull-{}-{}-{digest}",
            std::process::id(),
            WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let (digest_s, labels_m) = (digest.to_string(), labels.clone());
        // The reader blocks (a registry download): feed the stream from a thread.
        let feeder = tokio::task::spawn_blocking(move || -> std::result::Result<(), String> {
            let mut reader = reader;
            let mut offset = 0u64;
            let mut buf = vec![0u8; WRITE_CHUNK];
            loop {
                let mut filled = 0;
                while filled < buf.len() {
                    let n = reader
                        .read(&mut buf[filled..])
                        .map_err(|e| format!("reading {digest_s}: {e}"))?;
                    if n == 0 {
                        break;
                    }
                    filled += n;
                }
                let last = filled < buf.len() || offset + filled as u64 >= size;
                let action = if last {
                    content::WriteAction::Commit
                } else {
                    content::WriteAction::Write
                };
                let msg = content::WriteContentRequest {
                    action: action as i32,
                    r#ref: reference.clone(),
                    total: size as i64,
                    expected: digest_s.clone(),
                    offset: offset as i64,
                    data: buf[..filled].to_vec(),
                    labels: if last {
                        labels_m.clone().into_iter().collect()
                    } else {
                        HashMap::new()
                    },
                };
                offset += filled as u64;
                if tx.blocking_send(msg).is_err() {
                    return Err("containerd closed the write".into());
                }
                if last {
                    return Ok(());
                }
            }
        });
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
        let call = content::content_client::ContentClient::new(self.channel.clone())
            .write(self.req(stream))
            .await;
        let result = match call {
            Ok(resp) => {
                let mut responses = resp.into_inner();
                loop {
                    match responses.message().await {
                        Ok(Some(_)) => continue,
                        Ok(None) => break Ok(()),
                        Err(s) => break Err(s),
                    }
                }
            }
            Err(s) => Err(s),
        };
        let fed = feeder
            .await
            .map_err(|e| tonic::Status::internal(e.to_string()))
            .and_then(|r| r.map_err(tonic::Status::unavailable));
        match (result, fed) {
            (Err(s), _) if s.code() == Code::AlreadyExists => {
                self.label_content(digest, labels).await
            }
            (Err(s), _) | (Ok(()), Err(s)) => Err(failed(what)(s)),
            (Ok(()), Ok(())) => Ok(()),
        }
    }

    /// Creates image `name` pointing at `target`, or points the existing one there.
    pub async fn put_image(
        &self,
        name: &str,
        target: Descriptor,
        labels: HashMap<String, String>,
    ) -> Result<()> {
        let now = prost_types::Timestamp::from(std::time::SystemTime::now());
        let image = images::Image {
            name: name.to_string(),
            labels,
            target: Some(target),
            created_at: Some(now),
            updated_at: Some(now),
        };
        let mut client = images::images_client::ImagesClient::new(self.channel.clone());
        match client
            .create(self.req(images::CreateImageRequest {
                image: Some(image.clone()),
            }))
            .await
        {
            Ok(_) => Ok(()),
            Err(s) if s.code() == Code::AlreadyExists => {
                client
                    .update(self.req(images::UpdateImageRequest {
                        image: Some(image),
                        update_mask: None,
                    }))
                    .await
                    .map_err(failed(format!("updating image {name}")))?;
                Ok(())
            }
            Err(s) => Err(failed(format!("creating image {name}"))(s)),
        }
    }

    /// Whether snapshot `key` exists in `snapshotter`.
    pub async fn snapshot_exists(&self, snapshotter: &str, key: &str) -> Result<bool> {
        let req = self.req(snapshots::StatSnapshotRequest {
            snapshotter: snapshotter.to_string(),
            key: key.to_string(),
        });
        match snapshots::snapshots_client::SnapshotsClient::new(self.channel.clone())
            .stat(req)
            .await
        {
            Ok(_) => Ok(true),
            Err(s) if s.code() == Code::NotFound => Ok(false),
            Err(s) => Err(failed(format!("looking up snapshot {key}"))(s)),
        }
    }

    pub async fn prepare(
        &self,
        snapshotter: &str,
        key: &str,
        parent: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<Prepared> {
        let req = self.req(snapshots::PrepareSnapshotRequest {
            snapshotter: snapshotter.to_string(),
            key: key.to_string(),
            parent: parent.to_string(),
            labels: labels.clone().into_iter().collect(),
        });
        match snapshots::snapshots_client::SnapshotsClient::new(self.channel.clone())
            .prepare(req)
            .await
        {
            Ok(r) => Ok(Prepared::Mounts(r.into_inner().mounts)),
            Err(s) if s.code() == Code::AlreadyExists => Ok(Prepared::AlreadyExists),
            Err(s) => Err(failed(format!("preparing snapshot {key}"))(s)),
        }
    }

    pub async fn commit(
        &self,
        snapshotter: &str,
        name: &str,
        key: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<()> {
        let req = self.req(snapshots::CommitSnapshotRequest {
            snapshotter: snapshotter.to_string(),
            name: name.to_string(),
            key: key.to_string(),
            labels: labels.clone().into_iter().collect(),
        });
        snapshots::snapshots_client::SnapshotsClient::new(self.channel.clone())
            .commit(req)
            .await
            .map_err(failed(format!("committing snapshot {name}")))?;
        Ok(())
    }

    pub async fn remove_snapshot(&self, snapshotter: &str, key: &str) -> Result<()> {
        let req = self.req(snapshots::RemoveSnapshotRequest {
            snapshotter: snapshotter.to_string(),
            key: key.to_string(),
        });
        snapshots::snapshots_client::SnapshotsClient::new(self.channel.clone())
            .remove(req)
            .await
            .map_err(failed(format!("removing snapshot {key}")))?;
        Ok(())
    }

    /// Unpacks layer `layer` (in the content store) into `mounts` with containerd's applier;
    /// answers the descriptor of what was applied (its digest is the layer's diff ID).
    pub async fn apply(&self, layer: Descriptor, mounts: Vec<Mount>) -> Result<Descriptor> {
        let what = format!("unpacking layer {}", layer.digest);
        let req = self.req(diff::ApplyRequest {
            diff: Some(layer),
            mounts,
            payloads: HashMap::new(),
        });
        let r = diff::diff_client::DiffClient::new(self.channel.clone())
            .apply(req)
            .await
            .map_err(failed(what.clone()))?;
        r.into_inner().applied.ok_or_else(|| CallError {
            what,
            status: tonic::Status::internal("no descriptor in the answer"),
        })
    }
}
