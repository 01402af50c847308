//! The control socket's protocol: one JSON object per line each way.
//!
//! A request is `{"op": NAME, ...arguments}`; the answer is `{"ok": RESULT}` or
//! `{"error": MESSAGE}`. A connection may carry several requests, one after another.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::MountRequest;

/// Longest request line accepted (a mount request is a few hundred bytes).
pub const MAX_LINE: usize = 1 << 20;

/// A call to the daemon.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Is the daemon there? Answers its pid and store root.
    Ping,
    /// Mount an image; answers the mount's [`super::MountInfo`] once it answers.
    Mount(Box<MountRequest>),
    /// Unmount a mount point (`lazy`: detach even if busy).
    Unmount {
        mountpoint: PathBuf,
        #[serde(default)]
        lazy: bool,
    },
    /// Live mounts.
    List,
    /// Answers once `mountpoint` is unmounted (for `strata mount --foreground`).
    Wait { mountpoint: PathBuf },
    /// One mount's counters.
    Stats { mountpoint: PathBuf },
    /// A writable view's changes (A/C/D) relative to its image, without `exclude` (a
    /// container's mount points).
    Diff {
        mountpoint: PathBuf,
        #[serde(default)]
        exclude: Vec<PathBuf>,
    },
    /// Every mount's counters and the node's.
    Metrics,
    /// Trim the disk caches to `max_size` bytes.
    CacheGc { max_size: u64 },
    /// Unmount everything and exit; the next daemon restores the mounts unless `forget`.
    Shutdown {
        #[serde(default)]
        forget: bool,
    },
}

/// The daemon's answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Response {
    Ok(serde_json::Value),
    Error(String),
}
