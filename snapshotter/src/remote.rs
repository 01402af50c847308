//! Remote snapshots: a layer of a strata image mounted lazily as a committed snapshot, so
//! containerd unpacks (and downloads) nothing for it.
//!
//! containerd's unpacker prepares each layer with the labels of its descriptor that start with
//! `containerd.io/snapshot/` (the CRI sets `cri.image-ref`, `cri.manifest-digest` and
//! `cri.layer-digest` there when `disable_snapshot_annotations = false`; `strata rpull` sets
//! the same ones) plus `containerd.io/snapshot.ref`, the chain ID it will look the result up
//! by. When those name a strata layer the service mounts it and answers `AlreadyExists`;
//! containerd then finds the committed snapshot by that label and parent.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use strata_fs::reference::Reference;

/// The chain ID the unpacker will look the prepared layer up by.
pub const LABEL_TARGET: &str = "containerd.io/snapshot.ref";
/// The image reference (tag or digest) the layer was pulled for.
pub const LABEL_IMAGE_REF: &str = "containerd.io/snapshot/cri.image-ref";
/// The manifest the layer belongs to.
pub const LABEL_MANIFEST: &str = "containerd.io/snapshot/cri.manifest-digest";
/// The layer's (compressed) digest.
pub const LABEL_LAYER: &str = "containerd.io/snapshot/cri.layer-digest";
/// Every layer of the image, comma separated (the CRI's hint for prefetching).
pub const LABEL_IMAGE_LAYERS: &str = "containerd.io/snapshot/cri.image-layers";
/// Marks a snapshot this service mounted lazily (set on the committed snapshot).
pub const LABEL_REMOTE: &str = "containerd.io/snapshot/remote";

/// Which layer of which image a remote snapshot shows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteLayer {
    /// `REPOSITORY@MANIFEST-DIGEST`: the image pinned to the manifest containerd pulled.
    pub image: String,
    /// The layer's digest in that manifest.
    pub layer: String,
}

fn is_digest(s: &str) -> bool {
    s.strip_prefix("sha256:")
        .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
}

/// The layer Prepare's labels name, if they name one completely and well formed.
pub fn layer_of(labels: &BTreeMap<String, String>) -> Option<RemoteLayer> {
    let image = labels.get(LABEL_IMAGE_REF)?;
    let manifest = labels.get(LABEL_MANIFEST)?;
    let layer = labels.get(LABEL_LAYER)?;
    if !is_digest(manifest) || !is_digest(layer) {
        return None;
    }
    let mut r = Reference::parse(image).ok()?;
    r.tag = None;
    r.digest = Some(manifest.clone());
    Some(RemoteLayer {
        image: r.to_string(),
        layer: layer.clone(),
    })
}

/// The name a lazily mounted layer is committed under: one per chain ID and parent
/// (containerd finds it by its labels and parent, never by name).
pub fn committed_name(target: &str, parent: &str) -> String {
    use sha2::Digest;
    let h = sha2::Sha256::digest(parent.as_bytes());
    let hex: String = h.iter().map(|b| format!("{b:02x}")).collect();
    format!("strata-remote/{target}/{hex}")
}

/// What mounts layers: the node daemon, which owns the store, the cache and every mount (so
/// the mounts outlive a restart of the snapshotter).
pub trait LayerMounter: Send + Sync + 'static {
    /// Mounts `layer.layer` of `layer.image` lazily at `dir` (an empty directory), in the form
    /// overlayfs reads a lower layer in; returns once the mount answers.
    fn mount(&self, layer: &RemoteLayer, dir: &Path) -> Result<(), String>;
    /// Whether mounting `layer` needs nothing from its registry (the image's manifest and
    /// config, and the TOCs of this strata layer and of every layer below it, are on this
    /// node, as `strata rpull` leaves them): the mount can then fail only for local reasons
    /// (a TOC over the daemon's entry limit, a full disk), and may go on after Prepare has
    /// answered.
    fn is_local(&self, layer: &RemoteLayer) -> bool;
    /// Unmounts `dir` (detaching it if busy).
    fn unmount(&self, dir: &Path) -> Result<(), String>;
    /// The chain ID of `layer.layer` in its image (from the image's config, in the store once
    /// the layer is mounted).
    fn chain_id(&self, layer: &RemoteLayer) -> Result<String, String>;
}

/// The diff IDs an image config lists (`rootfs.diff_ids`), bottom layer first.
pub fn diff_ids(config: &serde_json::Value) -> Vec<String> {
    config["rootfs"]["diff_ids"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|d| d.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// containerd's chain IDs of a stack of diff IDs (the OCI image spec's `ChainID`).
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for d in diff_ids {
        let next = match out.last() {
            None => d.clone(),
            Some(prev) => {
                use sha2::Digest;
                let h = sha2::Sha256::digest(format!("{prev} {d}").as_bytes());
                format!(
                    "sha256:{}",
                    h.iter().map(|b| format!("{b:02x}")).collect::<String>()
                )
            }
        };
        out.push(next);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_name_a_layer_only_when_complete() {
        let d = format!("sha256:{}", "a".repeat(64));
        let l = format!("sha256:{}", "b".repeat(64));
        let mut labels: BTreeMap<String, String> = [
            (LABEL_IMAGE_REF, "localhost:5000/app:v1"),
            (LABEL_MANIFEST, d.as_str()),
            (LABEL_LAYER, l.as_str()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let got = layer_of(&labels).unwrap();
        assert_eq!(got.image, format!("localhost:5000/app@{d}"));
        assert_eq!(got.layer, l);
        labels.insert(LABEL_LAYER.into(), "sha256:zz".into());
        assert!(layer_of(&labels).is_none());
        labels.remove(LABEL_LAYER);
        assert!(layer_of(&labels).is_none());
        assert_ne!(committed_name("t", ""), committed_name("t", "p"));
    }

    #[test]
    fn chain_ids_follow_the_image_spec() {
        let a = format!("sha256:{}", "a".repeat(64));
        let b = format!("sha256:{}", "b".repeat(64));
        let c = chain_ids(&[a.clone(), b.clone()]);
        assert_eq!(c[0], a);
        // printf '%s %s' "$a" "$b" | sha256sum
        let expected = "sha256:ccd722928bd92476ba1745586fed6e45a102504185ad88cd89e01ff116fd146c";
        assert_eq!(c[1], expected);
    }
}
