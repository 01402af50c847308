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
        std::fs::create_dir_all(root.join("snapshots")).map_err(io(root))?;
        let file = root.join("metadata.json");
        let db = match std::fs::read(&file) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| MetaError::Io {
                path: file.clone(),
                source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Db::default(),
            Err(e) => return Err(io(&file)(e)),
        };
        Ok(Meta {
            root: root.to_path_buf(),
            db,
        })
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
    ) -> Result<Snapshot, MetaError> {
        if self.db.snapshots.contains_key(key) {
            return Err(MetaError::AlreadyExists(key.to_string()));
        }
        if !parent.is_empty() {
            let p = self.get(parent)?;
            if p.kind != Kind::Committed {
                return Err(MetaError::FailedPrecondition(format!(
                    "parent {parent} is not committed"
                )));
            }
        }
        self.db.next_id += 1;
        let id = self.db.next_id;
        let dir = self.dir(id);
        for d in [dir.join("fs"), dir.join("work")] {
            std::fs::create_dir_all(&d).map_err(|source| MetaError::Io { path: d, source })?;
        }
        let t = now();
        let s = Snapshot {
            id,
            kind,
            parent: parent.to_string(),
            labels,
            created: t,
            updated: t,
        };
        self.db.snapshots.insert(key.to_string(), s.clone());
        self.save()?;
        Ok(s)
    }

    /// Active `key` becomes committed `name`.
    pub fn commit(
        &mut self,
        name: &str,
        key: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<(), MetaError> {
        if self.db.snapshots.contains_key(name) {
            return Err(MetaError::AlreadyExists(name.to_string()));
        }
        let mut s = self.get(key)?.clone();
        if s.kind != Kind::Active {
            return Err(MetaError::FailedPrecondition(format!(
                "{key} is not an active snapshot"
            )));
        }
        self.db.snapshots.remove(key);
        s.kind = Kind::Committed;
        s.labels.extend(labels);
        s.updated = now();
        self.db.snapshots.insert(name.to_string(), s);
        self.save()
    }

    /// Removes `key` (not while others stand on it); its directory is left for cleanup.
    pub fn remove(&mut self, key: &str) -> Result<Snapshot, MetaError> {
        self.get(key)?;
        if self.db.snapshots.values().any(|s| s.parent == key) {
            return Err(MetaError::FailedPrecondition(format!(
                "cannot remove {key}: other snapshots stand on it"
            )));
        }
        let s = self
            .db
            .snapshots
            .remove(key)
            .ok_or_else(|| MetaError::NotFound(key.to_string()))?;
        self.save()?;
        Ok(s)
    }

    /// Replaces `key`'s labels (all of them, or those named `labels.NAME` in `fields`).
    pub fn update_labels(
        &mut self,
        key: &str,
        labels: BTreeMap<String, String>,
        fields: &[String],
    ) -> Result<Snapshot, MetaError> {
        let s = self
            .db
            .snapshots
            .get_mut(key)
            .ok_or_else(|| MetaError::NotFound(key.to_string()))?;
        if fields.is_empty() || fields.iter().any(|f| f == "labels") {
            s.labels = labels;
        } else {
            for f in fields {
                let Some(name) = f.strip_prefix("labels.") else {
                    return Err(MetaError::FailedPrecondition(format!(
                        "cannot update {f}: only labels can change"
                    )));
                };
                match labels.get(name) {
                    Some(v) => s.labels.insert(name.to_string(), v.clone()),
                    None => s.labels.remove(name),
                };
            }
        }
        s.updated = now();
        let out = s.clone();
        self.save()?;
        Ok(out)
    }

    pub fn all(&self) -> impl Iterator<Item = (&String, &Snapshot)> {
        self.db.snapshots.iter()
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
