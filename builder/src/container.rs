//! Containers: a record and a directory per container under `ROOT/containers/ID/`, holding its
//! writable layer (`layer/upper`, `layer/work`), the mount point of its root (`rootfs`, a
//! writable view the node daemon mounts), its runtime bundle (`bundle/config.json`) and the
//! per-container `hosts`, `hostname` and `resolv.conf`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use strata_fs::format::Sha256Digest;
use strata_fs::store::Store;

use crate::BuildError;

/// What a container is, as recorded in `ROOT/containers/ID/container.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ContainerRecord {
    pub id: String,
    pub name: String,
    /// The image as given, and the manifest it resolved to.
    pub image: String,
    pub manifest: String,
    pub command: Vec<String>,
    /// RFC 3339.
    pub created: String,
    /// `created`, `running` or `exited`.
    pub status: String,
    #[serde(default)]
    pub exit_code: Option<i32>,
    #[serde(default)]
    pub auto_remove: bool,
    /// Where the runtime mounts things in the container's root (left out of its diff).
    #[serde(default)]
    pub mount_points: Vec<PathBuf>,
    /// The OCI runtime it runs with.
    #[serde(default = "default_runtime")]
    pub runtime: PathBuf,
    /// The strata process running it (foreground `run`, or the detached container's monitor)
    /// while it runs: if that process is killed, nobody records the exit, and the runtime is
    /// asked instead.
    #[serde(default)]
    pub owner: Option<Owner>,
}

/// A process, told apart from a later one with the same pid by its start time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    pub pid: u32,
    pub start: u64,
}

impl Owner {
    /// The process `pid`, if it runs.
    pub fn of(pid: u32) -> Option<Owner> {
        // Field 22 of /proc/PID/stat, counted after the parenthesised command name.
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let after = &stat[stat.rfind(')')? + 1..];
        let mut fields = after.split_whitespace();
        // A zombie (state Z) has ended: it runs nothing.
        if fields.next()? == "Z" {
            return None;
        }
        let start = fields.nth(18)?.parse().ok()?;
        Some(Owner { pid, start })
    }

    /// This process.
    pub fn current() -> Option<Owner> {
        Owner::of(std::process::id())
    }

    pub fn alive(&self) -> bool {
        Owner::of(self.pid) == Some(*self)
    }
}

fn default_runtime() -> PathBuf {
    PathBuf::from("runc")
}

/// A container's paths.
#[derive(Clone, Debug)]
pub struct ContainerDir {
    pub dir: PathBuf,
}

impl ContainerDir {
    pub fn record(&self) -> PathBuf {
        self.dir.join("container.json")
    }
    pub fn rootfs(&self) -> PathBuf {
        self.dir.join("rootfs")
    }
    pub fn layer(&self) -> PathBuf {
        self.dir.join("layer")
    }
    pub fn bundle(&self) -> PathBuf {
        self.dir.join("bundle")
    }
    pub fn etc_file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
    /// What a detached container writes to standard output and error.
    pub fn log(&self) -> PathBuf {
        self.dir.join("ctr.log")
    }
}

/// The containers of a store.
pub struct Containers {
    root: PathBuf,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BuildError + '_ {
    move |e| BuildError::io(path, e)
}

impl Containers {
    pub fn new(store: &Store) -> Self {
        Containers {
            root: store.layout().containers(),
        }
    }

    /// The state directory `runc --root` uses for this store's containers.
    pub fn runtime_root(&self) -> PathBuf {
        self.root.join("runc")
    }

    pub fn dir(&self, id: &str) -> ContainerDir {
        ContainerDir {
            dir: self.root.join(id),
        }
    }

    /// A new container id (64 hex digits) and its directory, created empty.
    pub fn create_dir(&self) -> Result<(String, ContainerDir), BuildError> {
        let seed = format!(
            "{}-{}-{:?}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
            std::thread::current().id()
        );
        let id = Sha256Digest::of(seed.as_bytes()).hex();
        strata_fs::store::create_private_dir(&self.root)?;
        let dir = self.dir(&id);
        std::fs::create_dir(&dir.dir).map_err(io(&dir.dir))?;
        for d in [dir.rootfs(), dir.layer(), dir.bundle()] {
            std::fs::create_dir(&d).map_err(io(&d))?;
        }
        Ok((id, dir))
    }

    /// Writes a container's record crash-safely (temp file, fsync, rename).
    pub fn save(&self, r: &ContainerRecord) -> Result<(), BuildError> {
        let dir = self.dir(&r.id);
        let path = dir.record();
        // A temp name of this writer's own: two saves at once must not cross.
        let tmp = dir.dir.join(format!(
            ".container.json.{}.{:?}.tmp",
            std::process::id(),
            std::thread::current().id()
        ));
        let body = serde_json::to_vec_pretty(r).map_err(|e| BuildError::Source(e.to_string()))?;
        let write = || -> std::io::Result<()> {
            use std::io::Write;
            let _ = std::fs::remove_file(&tmp);
            let mut f = strata_fs::store::private_new_file(&tmp)?;
            f.write_all(&body)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)
        };
        write().map_err(io(&path))
    }

    /// Every container with a readable record.
    pub fn list(&self) -> Vec<ContainerRecord> {
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return Vec::new();
        };
        let mut out: Vec<ContainerRecord> = entries
            .flatten()
            .filter_map(|e| std::fs::read(e.path().join("container.json")).ok())
            .filter_map(|b| serde_json::from_slice(&b).ok())
            .map(|r| self.refresh(r))
            .collect();
        out.sort_by(|a, b| b.created.cmp(&a.created));
        out
    }

    /// What the runtime says of the container (`creating`, `created`, `running`, `paused`,
    /// `stopped`), or `None` when it knows none.
    pub fn runtime_state(&self, r: &ContainerRecord) -> Option<String> {
        std::process::Command::new(&r.runtime)
            .arg("--root")
            .arg(self.runtime_root())
            .args(["state", &r.id])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| serde_json::from_slice::<serde_json::Value>(&o.stdout).ok())
            .and_then(|v| v["status"].as_str().map(str::to_string))
    }

    /// A record that says running while the strata process running it is gone (killed):
    /// exited unless the runtime still runs it.
    fn refresh(&self, mut r: ContainerRecord) -> ContainerRecord {
        if r.status != "running" || r.owner.is_none_or(|o| o.alive()) {
            return r;
        }
        let state = self.runtime_state(&r);
        if !matches!(state.as_deref(), Some("running" | "created" | "paused")) {
            r.status = "exited".into();
            r.owner = None;
            let _ = self.save(&r);
        }
        r
    }

    /// The container named `key`: a name, a full id or a unique id prefix.
    pub fn find(&self, key: &str) -> Result<ContainerRecord, BuildError> {
        let all = self.list();
        if let Some(r) = all.iter().find(|r| r.name == key || r.id == key) {
            return Ok(r.clone());
        }
        let matches: Vec<&ContainerRecord> = all
            .iter()
            .filter(|r| !key.is_empty() && r.id.starts_with(key))
            .collect();
        match matches.as_slice() {
            [one] => Ok((*one).clone()),
            [] => Err(BuildError::Source(format!("no such container: {key}"))),
            _ => Err(BuildError::Source(format!(
                "{key} matches several containers: give more of the id"
            ))),
        }
    }

    /// Whether a container has this name already.
    pub fn name_taken(&self, name: &str) -> bool {
        self.list().iter().any(|r| r.name == name)
    }

    /// Removes a container's directory (its mounts must be gone).
    pub fn remove_dir(&self, id: &str) -> Result<(), BuildError> {
        let dir = self.dir(id);
        std::fs::remove_dir_all(&dir.dir).map_err(io(&dir.dir))
    }
}

/// A default container name: `strata_` and the first 12 digits of its id.
pub fn default_name(id: &str) -> String {
    format!("strata_{}", &id[..id.len().min(12)])
}

/// The per-container `/etc/hosts`.
pub fn hosts_file(hostname: &str) -> String {
    format!(
        "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t{hostname}\n"
    )
}
