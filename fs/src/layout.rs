//! Where everything lives under the store root: the one definition of the root's layout.
//!
//! ```text
//! ROOT/                     0700 (0711 when another user must traverse to a mount point)
//! ROOT/oci-layout           {"imageLayoutVersion": "1.0.0"}
//! ROOT/index.json           one descriptor per named image
//! ROOT/blobs/sha256/HEX     content-addressed blobs
//! ROOT/tmp/                 in-progress writes (same filesystem, so rename is atomic)
//! ROOT/tocs/HEX             verified TOC frames of lazily pulled layers
//! ROOT/indexed/HEX.json     strata descriptors of plain layers indexed on this node
//! ROOT/profiles/            access profiles fetched next to images
//! CACHE/packs/N.pack        the node's disk cache of verified chunks, in pack files
//! CACHE/files/ab/KEY        whole files for FUSE passthrough
//! ROOT/mounts/ID.json       the daemon's record of each live mount (restored after a restart)
//! ROOT/containers/          containers (upper dirs and metadata)
//! ROOT/daemon.sock          the node daemon's control socket (0600)
//! ROOT/daemon.lock          held by the running daemon
//! ROOT/daemon.log           the on-demand daemon's log
//! ROOT/.lock                serialises index.json updates
//! ```
//!
//! `CACHE` is `ROOT/cache`, except for an ordinary user's default root
//! (`$XDG_DATA_HOME/strata`), whose caches go where a user's caches go: `$XDG_CACHE_HOME/strata`
//! (by default `~/.cache/strata`), out of backups and disposable as the spec says.
//!
//! strata re-run in an ordinary user's rootless user namespace (for containers and builds;
//! `STRATA_USERNS` set) runs a node daemon of its own, whose mounts live in that
//! namespace: its daemon files, mount records, containers and caches are under `ROOT/userns/`
//! (`STATE`), the images and blobs are the same store's.

use std::path::{Path, PathBuf};

/// Paths under one store root.
#[derive(Clone, Debug)]
pub struct Layout {
    root: PathBuf,
    /// Where the daemon's own files go: `root`, or `root/userns` in a user namespace.
    state: PathBuf,
    cache: PathBuf,
}

/// Whether this process is strata re-run in an ordinary user's rootless user namespace
/// (`STRATA_USERNS` set there, root of a user namespace other than the initial one). Root of
/// another user namespace (a system container's) keeps the usual layout.
pub fn in_user_namespace() -> bool {
    std::env::var_os("STRATA_USERNS").is_some()
        && nix::unistd::geteuid().is_root()
        && !crate::fuse_upper::privileged()
}

/// Where the caches of `root` live (see the module's table).
fn cache_root(root: &Path) -> PathBuf {
    if !nix::unistd::geteuid().is_root() && root == crate::store::default_root() {
        let cache = std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .filter(|p| p.is_absolute())
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")));
        if let Some(c) = cache {
            return c.join("strata");
        }
    }
    root.join("cache")
}

impl Layout {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        let root = root.into();
        if in_user_namespace() {
            let state = root.join("userns");
            let cache = state.join("cache");
            return Layout { root, state, cache };
        }
        let cache = cache_root(&root);
        Layout {
            state: root.clone(),
            root,
            cache,
        }
    }

    /// The directory of the chunk and file caches.
    pub fn cache(&self) -> &Path {
        &self.cache
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn blobs(&self) -> PathBuf {
        self.root.join("blobs/sha256")
    }

    pub fn tmp(&self) -> PathBuf {
        self.root.join("tmp")
    }

    pub fn index(&self) -> PathBuf {
        self.root.join("index.json")
    }

    pub fn index_lock(&self) -> PathBuf {
        self.root.join(".lock")
    }

    pub fn tocs(&self) -> PathBuf {
        self.root.join("tocs")
    }

    pub fn indexed(&self) -> PathBuf {
        self.root.join("indexed")
    }

    pub fn profiles(&self) -> PathBuf {
        self.root.join("profiles")
    }

    /// Where the access profile published for the image with this manifest digest is kept
    /// (`None` for a digest that is not `ALGORITHM:HEX`).
    pub fn profile_of(&self, manifest_digest: &str) -> Option<PathBuf> {
        let (algorithm, hex) = manifest_digest.split_once(':')?;
        let plain = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric());
        (plain(algorithm) && plain(hex))
            .then(|| self.profiles().join(format!("{algorithm}-{hex}.txt")))
    }

    pub fn chunk_cache(&self) -> PathBuf {
        self.cache.join("packs")
    }

    /// Where chunk files were kept before packs (removed when found).
    pub fn old_chunk_cache(&self) -> PathBuf {
        self.cache.join("chunks")
    }

    pub fn file_cache(&self) -> PathBuf {
        self.cache.join("files")
    }

    pub fn mounts(&self) -> PathBuf {
        self.state.join("mounts")
    }

    pub fn containers(&self) -> PathBuf {
        self.state.join("containers")
    }

    pub fn socket(&self) -> PathBuf {
        self.state.join("daemon.sock")
    }

    pub fn daemon_lock(&self) -> PathBuf {
        self.state.join("daemon.lock")
    }

    pub fn daemon_log(&self) -> PathBuf {
        self.state.join("daemon.log")
    }

    /// The directory of the daemon's own files (`ROOT`, or `ROOT/userns`).
    pub fn state(&self) -> &Path {
        &self.state
    }
}
