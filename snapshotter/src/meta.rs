//! Snapshot metadata: keys, parents, kinds, labels and times, in one JSON file written
//! crash-safely (temp file, fsync, rename, directory fsync) on every change, and the
//! directories of each snapshot (`snapshots/ID/fs`, `snapshots/ID/work`).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// What a snapshot is (containerd's kinds).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    View,
    Active,
    Committed,
}

/// One snapshot.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Snapshot {
    /// Its directory's name under `snapshots/`.
    pub id: u64,
    pub kind: Kind,
    /// The committed snapshot it stands on ("" for none).
    pub parent: String,
    pub labels: BTreeMap<String, String>,
    /// Seconds and nanoseconds since the epoch.
    pub created: (i64, i32),
    pub updated: (i64, i32),
    /// A layer mounted lazily at `fs/` (by the node daemon) instead of unpacked into it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote: Option<crate::remote::RemoteLayer>,
    /// Its upper directory was (or is) mounted with overlayfs's `metacopy=on`: every overlay
    /// over it needs that option too, or the kernel refuses its metadata-only copies.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub metacopy: bool,
}

/// Errors in containerd's terms.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("snapshot {0} already exists")]
    AlreadyExists(String),
    #[error("snapshot {0} does not exist")]
    NotFound(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("snapshot metadata at {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Default, Serialize, Deserialize)]
struct Db {
    next_id: u64,
    snapshots: BTreeMap<String, Snapshot>,
}

/// The metadata of every snapshot under a root.
pub struct Meta {
    root: PathBuf,
    db: Db,
}

fn now() -> (i64, i32) {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    (d.as_secs() as i64, d.subsec_nanos() as i32)
}

impl Meta {
    /// Opens (creating) the metadata under `root`.
    pub fn open(root: &Path) -> Result<Meta, MetaError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| MetaError::Io { path, source }
        };
        // Layer contents (setuid binaries among them) are for root only.
        strata_fs::store::create_private_dir(root).map_err(|e| MetaError::Io {
            path: root.to_path_buf(),
            source: std::io::Error::other(e.to_string()),
        })?;
        strata_fs::store::create_private_dir(&root.join("snapshots")).map_err(|e| {
            MetaError::Io {
                path: root.join("snapshots"),
                source: std::io::Error::other(e.to_string()),
            }
        })?;
        let file = root.join("metadata.json");
        let mut db: Db = match std::fs::read(&file) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| MetaError::Io {
                path: file.clone(),
                source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Db::default(),
            Err(e) => return Err(io(&file)(e)),
        };
        // Never hand out a directory that exists (a crash between mkdir and save, or lost
        // metadata): ids continue after the largest one on disk.
        let on_disk = std::fs::read_dir(root.join("snapshots"))
            .map(|d| {
                d.flatten()
                    .filter_map(|e| e.file_name().to_string_lossy().parse::<u64>().ok())
                    .max()
                    .unwrap_or(0)
            })
            .unwrap_or(0);
        db.next_id = db.next_id.max(on_disk);
        Ok(Meta {
            root: root.to_path_buf(),
            db,
        })
    }

    /// Applies `change` to a copy of the metadata, saves it, and only then keeps it: a
    /// failed save changes nothing.
    fn transact<T>(
        &mut self,
        change: impl FnOnce(&mut Db) -> Result<T, MetaError>,
    ) -> Result<T, MetaError> {
        let mut next = Db {
            next_id: self.db.next_id,
            snapshots: self.db.snapshots.clone(),
        };
        let out = change(&mut next)?;
        let old = std::mem::replace(&mut self.db, next);
        if let Err(e) = self.save() {
            self.db = old;
            return Err(e);
        }
        Ok(out)
    }

    fn save(&self) -> Result<(), MetaError> {
        let file = self.root.join("metadata.json");
        let tmp = self.root.join("metadata.json.tmp");
        let io = |source| MetaError::Io {
            path: file.clone(),
            source,
        };
        let body = serde_json::to_vec_pretty(&self.db).map_err(|e| io(std::io::Error::other(e)))?;
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(&body).map_err(io)?;
        f.sync_all().map_err(io)?;
        std::fs::rename(&tmp, &file).map_err(io)?;
        if let Ok(d) = std::fs::File::open(&self.root) {
            let _ = d.sync_all();
        }
        Ok(())
    }

    /// The directory of snapshot `id`.
    pub fn dir(&self, id: u64) -> PathBuf {
        self.root.join("snapshots").join(id.to_string())
    }

    pub fn get(&self, key: &str) -> Result<&Snapshot, MetaError> {
        self.db
            .snapshots
            .get(key)
            .ok_or_else(|| MetaError::NotFound(key.to_string()))
    }

    /// The chain of committed snapshots under `parent`, nearest first.
    pub fn chain(&self, parent: &str) -> Result<Vec<u64>, MetaError> {
        let mut out = Vec::new();
        let mut at = parent.to_string();
        while !at.is_empty() {
            let s = self.get(&at)?;
            out.push(s.id);
            at = s.parent.clone();
        }
        Ok(out)
    }

    /// A new active or view snapshot `key` on `parent` (committed), its directories made.
    pub fn create(
        &mut self,
        key: &str,
        parent: &str,
        kind: Kind,
        labels: BTreeMap<String, String>,
        metacopy: bool,
    ) -> Result<Snapshot, MetaError> {
        self.insert_new(key, parent, kind, labels, metacopy, None)
    }

    /// A new committed snapshot `name` on `parent` whose `fs/` is the lazy mount of `remote`
    /// (made by the caller), its directories made: in one save, where preparing and
    /// committing take two.
    pub fn create_remote(
        &mut self,
        name: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
        remote: crate::remote::RemoteLayer,
    ) -> Result<Snapshot, MetaError> {
        self.insert_new(name, parent, Kind::Committed, labels, false, Some(remote))
    }

    fn insert_new(
        &mut self,
        key: &str,
        parent: &str,
        kind: Kind,
        labels: BTreeMap<String, String>,
        metacopy: bool,
        remote: Option<crate::remote::RemoteLayer>,
    ) -> Result<Snapshot, MetaError> {
        if key.is_empty() {
            return Err(MetaError::InvalidArgument(
                "a snapshot key cannot be empty".into(),
            ));
        }
        if self.db.snapshots.contains_key(key) {
            return Err(MetaError::AlreadyExists(key.to_string()));
        }
        if !parent.is_empty() {
            let p = self.get(parent)?;
            if p.kind != Kind::Committed {
                return Err(MetaError::InvalidArgument(format!(
                    "parent {parent} is not committed"
                )));
            }
        }
        let id = self.db.next_id + 1;
        let dir = self.dir(id);
        for d in [dir.clone(), dir.join("fs"), dir.join("work")] {
            std::fs::create_dir(&d).map_err(|source| MetaError::Io { path: d, source })?;
        }
        let t = now();
        let s = Snapshot {
            id,
            kind,
            parent: parent.to_string(),
            labels,
            created: t,
            updated: t,
            remote,
            metacopy,
        };
        let saved = self.transact(|db| {
            db.next_id = id;
            db.snapshots.insert(key.to_string(), s.clone());
            Ok(())
        });
        if let Err(e) = saved {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
        Ok(s)
    }

    /// Active `key` becomes committed `name`, with the labels given (containerd's rule).
    pub fn commit(
        &mut self,
        name: &str,
        key: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<(), MetaError> {
        self.commit_with(name, key, labels, None)
    }

    /// [`Meta::commit`], recording that the snapshot's `fs/` is the lazy mount of `remote`.
    pub fn commit_with(
        &mut self,
        name: &str,
        key: &str,
        labels: BTreeMap<String, String>,
        remote: Option<crate::remote::RemoteLayer>,
    ) -> Result<(), MetaError> {
        if name.is_empty() {
            return Err(MetaError::InvalidArgument(
                "a snapshot name cannot be empty".into(),
            ));
        }
        if self.db.snapshots.contains_key(name) {
            return Err(MetaError::AlreadyExists(name.to_string()));
        }
        let mut s = self.get(key)?.clone();
        if s.kind != Kind::Active {
            return Err(MetaError::FailedPrecondition(format!(
                "{key} is not an active snapshot"
            )));
        }
        s.kind = Kind::Committed;
        s.labels = labels;
        s.remote = remote;
        s.created = now();
        s.updated = s.created;
        self.transact(|db| {
            db.snapshots.remove(key);
            db.snapshots.insert(name.to_string(), s);
            Ok(())
        })
    }

    /// Removes `key` (not while others stand on it); its directory is left for cleanup.
    pub fn remove(&mut self, key: &str) -> Result<Snapshot, MetaError> {
        self.get(key)?;
        if self.db.snapshots.values().any(|s| s.parent == key) {
            return Err(MetaError::FailedPrecondition(format!(
                "cannot remove {key}: other snapshots stand on it"
            )));
        }
        self.transact(|db| {
            db.snapshots
                .remove(key)
                .ok_or_else(|| MetaError::NotFound(key.to_string()))
        })
    }

    /// Replaces `key`'s labels (all of them, or those named `labels.NAME` in `fields`).
    pub fn update_labels(
        &mut self,
        key: &str,
        labels: BTreeMap<String, String>,
        fields: &[String],
    ) -> Result<Snapshot, MetaError> {
        if let Some(f) = fields
            .iter()
            .find(|f| *f != "labels" && !f.starts_with("labels."))
        {
            return Err(MetaError::InvalidArgument(format!(
                "cannot update {f}: only labels can change"
            )));
        }
        self.get(key)?;
        self.transact(|db| {
            let s = db
                .snapshots
                .get_mut(key)
                .ok_or_else(|| MetaError::NotFound(key.to_string()))?;
            let labels: BTreeMap<String, String> =
                labels.into_iter().filter(|(_, v)| !v.is_empty()).collect();
            if fields.is_empty() || fields.iter().any(|f| f == "labels") {
                s.labels = labels;
            } else {
                for f in fields {
                    let name = f.trim_start_matches("labels.");
                    match labels.get(name) {
                        Some(v) => s.labels.insert(name.to_string(), v.clone()),
                        None => s.labels.remove(name),
                    };
                }
            }
            s.updated = now();
            Ok(s.clone())
        })
    }

    /// The committed snapshot containerd would find for chain ID `target` on `parent` (by its
    /// label and parent, as its Walk does): one it unpacked, or a lazy one.
    pub fn find_committed(&self, target: &str, parent: &str) -> Option<&Snapshot> {
        self.db.snapshots.values().find(|s| {
            s.kind == Kind::Committed
                && s.parent == parent
                && s.labels
                    .get(crate::remote::LABEL_TARGET)
                    .map(String::as_str)
                    == Some(target)
        })
    }

    /// The snapshots of the chain under `parent`, nearest first.
    pub fn chain_snapshots(&self, parent: &str) -> Result<Vec<&Snapshot>, MetaError> {
        let mut out = Vec::new();
        let mut at = parent;
        while !at.is_empty() {
            let s = self.get(at)?;
            out.push(s);
            at = &s.parent;
        }
        Ok(out)
    }

    pub fn all(&self) -> impl Iterator<Item = (&String, &Snapshot)> {
        self.db.snapshots.iter()
    }

    /// Where Cleanup moves orphaned directories before deleting them.
    pub fn trash_dir(&self) -> PathBuf {
        self.root.join("trash")
    }

    /// Directories under `snapshots/` no snapshot owns.
    pub fn orphans(&self) -> Vec<PathBuf> {
        let owned: std::collections::BTreeSet<String> = self
            .db
            .snapshots
            .values()
            .map(|s| s.id.to_string())
            .collect();
        std::fs::read_dir(self.root.join("snapshots"))
            .map(|d| {
                d.flatten()
                    .filter(|e| !owned.contains(&e.file_name().to_string_lossy().to_string()))
                    .map(|e| e.path())
                    .collect()
            })
            .unwrap_or_default()
    }
}
