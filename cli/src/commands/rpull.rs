//! `strata rpull`: pulls an image into a containerd namespace through containerd's own API,
//! with the labels that let a remote snapshotter mount its layers lazily (the role
//! `ctr-remote image rpull` plays for the stargz snapshotter; Debian's `ctr` sets no such
//! labels itself).
//!
//! The manifest, config and TOCs go into strata's store (the snapshotter's daemon reads them
//! there); the manifest and config also go into containerd's content store, labelled so its
//! garbage collector keeps them and the snapshots with the image. Each layer is prepared with
//! `containerd.io/snapshot.ref` (its chain ID) and the CRI's layer labels as soon as its TOC
//! and those below it are stored (the TOCs come in parallel, and containerd's lease is taken
//! while the registry answers): the strata snapshotter mounts a strata layer lazily and answers
//! `AlreadyExists`; any other layer (or another snapshotter) gets an ordinary snapshot, which
//! this command fills the way containerd's unpacker does (the blob into the content store, then
//! containerd's diff service applies it).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use strata_fs::reference::Reference;
use strata_fs::registry::{Registry, Resolved};
use strata_snapshotter::api::containerd::types::Descriptor as CtrDescriptor;
use strata_snapshotter::client::{Containerd, Prepared};
use strata_snapshotter::remote;
use tokio::sync::oneshot;

use super::open_store;
use super::registry::{platform, RegistryArgs};
use crate::GlobalArgs;

#[derive(clap::Args)]
pub struct RpullArgs {
    /// Image reference (Docker's grammar).
    pub reference: String,
    /// containerd's socket.
    #[arg(
        long,
        short = 'a',
        env = "CONTAINERD_ADDRESS",
        default_value = "/run/containerd/containerd.sock"
    )]
    pub address: PathBuf,
    /// containerd namespace.
    #[arg(
        long,
        short = 'n',
        env = "CONTAINERD_NAMESPACE",
        default_value = "default"
    )]
    pub namespace: String,
    /// The snapshotter to unpack into (as named in containerd's config).
    #[arg(long, default_value = "strata")]
    pub snapshotter: String,
    /// Platform to pick from an index (OS/ARCH).
    #[arg(long)]
    pub platform: Option<String>,
    /// Also fetch the access profile published for the image (`strata push-profile`), looked
    /// up through the registry's referrers API and referrers tag, and keep it with the image:
    /// each lazy layer's mount then fetches what it names as soon as it is up. Off by default:
    /// without it the registry sees only the manifest, config, TOCs and chunks.
    #[arg(long)]
    pub profile: bool,
    #[command(flatten)]
    pub registry: RegistryArgs,
}

/// Longest value containerd accepts for a label (4 KiB for key and value together).
const MAX_LABEL: usize = 4000;

pub fn rpull(g: &GlobalArgs, a: RpullArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let r = Reference::parse(&a.reference)?;
    let store = open_store(g)?;
    let registry = a.registry.client()?;
    let (os, arch) = platform(a.platform.as_deref())?;
    let nonce = format!(
        "{}-{}",
        std::process::id(),
        started.elapsed().as_nanos() ^ now_nanos()
    );
    // One worker: the session below makes progress on it while this thread waits for the
    // registry outside the runtime.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    // containerd's connection and the pull's lease, taken while the registry answers.
    let session = rt.spawn({
        let (address, namespace) = (a.address.clone(), a.namespace.clone());
        let lease = format!("strata-rpull-{nonce}");
        async move {
            let mut ctd = Containerd::connect(&address, &namespace)
                .await
                .map_err(anyhow::Error::msg)?;
            ctd.take_lease(&lease).await?;
            anyhow::Ok(ctd)
        }
    });
    std::thread::scope(|scope| {
        let pulled = fetch_metadata(scope, &a, &r, &store, &registry, (&os, &arch));
        rt.block_on(async {
            let session = session
                .await
                .map_err(|e| anyhow::anyhow!("connecting to containerd: {e}"))?;
            let (pulled, mut ctd) = match (pulled, session) {
                (Ok(p), Ok(ctd)) => (p, ctd),
                (Err(e), Ok(mut ctd)) => {
                    let _ = ctd.release_lease().await;
                    return Err(e);
                }
                (Err(e), Err(_)) | (Ok(_), Err(e)) => return Err(e),
            };
            let result = unpack(&a, &r, &store, &registry, &mut ctd, pulled, &nonce, started).await;
            let released = ctd.release_lease().await;
            let counts = result?;
            released?;
            anyhow::Ok(counts)
        })
    })
    .map(|(layers, lazy, unpacked)| {
        let there = layers - lazy - unpacked;
        let secs = started.elapsed().as_secs_f64();
        println!(
            "{r}: {layers} layers, {lazy} mounted lazily, {unpacked} unpacked, \
             {there} already there ({secs:.2}s)"
        );
    })
}

/// What [`fetch_metadata`] leaves for the layers' preparation.
struct Pulled {
    manifest: strata_fs::oci::Descriptor,
    /// The platform's index, if the reference named one, and the manifests it lists.
    index: Option<(Resolved, Vec<String>)>,
    /// Per layer: its TOC is stored (or cannot be; a fetch that ended without saying so drops
    /// its sender).
    tocs: Vec<oneshot::Receiver<Result<(), String>>>,
}

/// Fetches the manifest (the platform's, from an index), the config and, with `--profile`, the
/// image's access profile into the store, and starts the TOCs' fetches on `scope`: each
/// strata layer is prepared once its TOC and those below it are stored, so that the
/// snapshotter mounts it from the store.
fn fetch_metadata<'scope, 'env: 'scope>(
    scope: &'scope std::thread::Scope<'scope, 'env>,
    a: &'env RpullArgs,
    r: &Reference,
    store: &'env strata_fs::store::Store,
    registry: &'env Arc<Registry>,
    (os, arch): (&str, &str),
) -> anyhow::Result<Pulled> {
    let started = Instant::now();
    // What the reference names as it is (an index stays the image's target, as containerd's
    // own pulls keep it), then the platform's manifest, pinned by digest.
    let top = registry
        .fetch_manifest(
            r,
            r.digest.as_deref().or(r.tag.as_deref()).unwrap_or("latest"),
        )
        .with_context(|| format!("resolving {r}"))?;
    let (pinned, index, single) = if strata_fs::oci::is_index(&top.media_type) {
        let idx: strata_fs::oci::Index = serde_json::from_slice(&top.bytes)
            .with_context(|| format!("the image index of {r}"))?;
        let d = strata_fs::oci::select_platform(&idx.manifests, os, arch)
            .with_context(|| format!("{r} has no manifest for {os}/{arch}"))?;
        if strata_fs::oci::is_index(&d.media_type) {
            bail!("{r}: an index of indexes is not supported by rpull");
        }
        let pinned = Reference {
            digest: Some(d.digest.clone()),
            ..r.clone()
        };
        let children: Vec<String> = idx.manifests.iter().map(|m| m.digest.clone()).collect();
        (pinned, Some((top, children)), None)
    } else {
        let pinned = Reference {
            digest: Some(top.digest.clone()),
            ..r.clone()
        };
        // A manifest named directly is not fetched again.
        (pinned, None, Some(top))
    };
    // With --profile, the access profile published for the manifest, fetched beside the
    // metadata: the snapshotter's layer mounts prefetch what it names as soon as they are up.
    let manifest_digest = pinned.digest.clone().unwrap_or_default();
    let profile = a.profile.then(|| {
        let (pinned, digest) = (pinned.clone(), manifest_digest.clone());
        std::thread::Builder::new()
            .name("strata-profile".into())
            .spawn_scoped(scope, move || {
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    strata_fs::transfer::fetch_profile(registry, &pinned, &digest)
                }))
            })
    });
    let manifest = match single {
        Some(m) => m,
        None => registry
            .fetch_manifest(&pinned, &manifest_digest)
            .with_context(|| format!("fetching the manifest of {pinned}"))?,
    };
    let (senders, tocs): (Vec<_>, Vec<_>) = manifest
        .manifest
        .layers
        .iter()
        .map(|_| oneshot::channel())
        .unzip();
    let stored = senders.into_iter().map(|tx| {
        move |result| {
            let _ = tx.send(result);
        }
    });
    let manifest_desc = strata_fs::transfer::pull_metadata_staged(
        scope,
        store,
        registry,
        &pinned,
        manifest,
        stored.collect(),
    )
    .with_context(|| format!("pulling the metadata of {r}"))?;
    let stored = store.layout().profile_of(&manifest_desc.digest);
    let fetched = profile.map(|p| match p {
        Ok(thread) => thread.join().unwrap_or_else(Err),
        Err(e) => Ok(Err(strata_fs::transfer::TransferError::Invalid(format!(
            "starting its fetch: {e}"
        )))),
    });
    match (fetched, stored) {
        (None, _) => {}
        (Some(Ok(Ok(Some(text)))), Some(path)) => match store.write_file(&path, &text) {
            Ok(()) => tracing::info!(image = %r, "the image has a published access profile"),
            Err(e) => tracing::warn!(image = %r, "cannot keep the access profile: {e}"),
        },
        (Some(Ok(Ok(Some(_)))), None) => {
            tracing::warn!(image = %r, "no place for the access profile")
        }
        // None published (any more): an older one kept for this manifest goes.
        (Some(Ok(Ok(None))), Some(path)) => strata_fs::service::remove_stale_profile(&path),
        (Some(Ok(Ok(None))), None) => {}
        (Some(Ok(Err(e))), _) => tracing::warn!(image = %r, "cannot fetch the access profile: {e}"),
        (Some(Err(_)), _) => tracing::warn!(image = %r, "fetching the access profile panicked"),
    }
    tracing::info!(image = %r, "manifest and config pulled in {:.3}s", started.elapsed().as_secs_f64());
    Ok(Pulled {
        manifest: manifest_desc,
        index,
        tocs,
    })
}

/// Writes the image's content to containerd and prepares its layers there (lazily mounted by
/// the strata snapshotter, else unpacked), then names the image; counts (layers, lazy,
/// unpacked).
#[allow(clippy::too_many_arguments)]
async fn unpack(
    a: &RpullArgs,
    r: &Reference,
    store: &strata_fs::store::Store,
    registry: &Arc<Registry>,
    ctd: &mut Containerd,
    pulled: Pulled,
    nonce: &str,
    started: Instant,
) -> anyhow::Result<(usize, usize, usize)> {
    let Pulled {
        manifest: manifest_desc,
        index,
        tocs,
    } = pulled;
    let (mut tocs, mut awaited) = (tocs.into_iter(), 0);
    let manifest_bytes = store.read_blob(&manifest_desc.digest)?;
    let manifest = store.manifest(&manifest_desc.digest)?;
    let config_bytes = store.read_blob(&manifest.config.digest)?;
    let config: serde_json::Value = serde_json::from_slice(&config_bytes)
        .with_context(|| format!("config {} of {r}", manifest.config.digest))?;
    let diff_ids = remote::diff_ids(&config);
    if diff_ids.len() != manifest.layers.len() {
        bail!(
            "{r}: the config lists {} diff IDs for {} layers",
            diff_ids.len(),
            manifest.layers.len()
        );
    }
    let chains = remote::chain_ids(&diff_ids);
    let name = r.to_string();
    let source_label = format!("containerd.io/distribution.source.{}", r.registry);
    let source = r.repository.clone();
    // As the CRI sets it: this layer and the ones above it, as many as a label holds.
    let image_layers = |from: usize| {
        let mut list = String::new();
        for l in &manifest.layers[from..] {
            if list.len() + l.digest.len() + 1 > MAX_LABEL {
                break;
            }
            if !list.is_empty() {
                list.push(',');
            }
            list.push_str(&l.digest);
        }
        list
    };

    // Content (under the lease), labelled for the garbage collector, written while
    // the layers are prepared: only the image record needs it in place.
    let content = async {
        let mut config_labels = BTreeMap::from([(source_label.clone(), source.clone())]);
        if let Some(top) = chains.last() {
            config_labels.insert(
                format!("containerd.io/gc.ref.snapshot.{}", a.snapshotter),
                top.clone(),
            );
        }
        ctd.write_content(
            &manifest.config.digest,
            config_bytes.len() as u64,
            Box::new(std::io::Cursor::new(config_bytes.clone())),
            &config_labels,
        )
        .await?;
        let mut manifest_labels = BTreeMap::from([
            (source_label.clone(), source.clone()),
            (
                "containerd.io/gc.ref.content.config".to_string(),
                manifest.config.digest.clone(),
            ),
        ]);
        for (i, l) in manifest.layers.iter().enumerate() {
            manifest_labels.insert(
                format!("containerd.io/gc.ref.content.l.{i}"),
                l.digest.clone(),
            );
        }
        ctd.write_content(
            &manifest_desc.digest,
            manifest_bytes.len() as u64,
            Box::new(std::io::Cursor::new(manifest_bytes.clone())),
            &manifest_labels,
        )
        .await?;
        tracing::info!("content written at {:.3}s", started.elapsed().as_secs_f64());
        anyhow::Ok(())
    };
    // The layers, bottom up.
    let layers = async {
        let (mut lazy, mut unpacked) = (0usize, 0usize);
        for (i, l) in manifest.layers.iter().enumerate() {
            let chain = &chains[i];
            if ctd.snapshot_exists(&a.snapshotter, chain).await? {
                continue;
            }
            // Its TOC and those below it are stored.
            while awaited <= i {
                let stored = match tocs.next() {
                    Some(toc) => toc.await,
                    None => Ok(Ok(())),
                };
                match stored {
                    Ok(Ok(())) => awaited += 1,
                    Ok(Err(e)) => bail!("pulling the metadata of {r}: {e}"),
                    Err(_) => bail!("pulling the metadata of {r}: a TOC's fetch ended unanswered"),
                }
            }
            let parent = if i == 0 {
                String::new()
            } else {
                chains[i - 1].clone()
            };
            let labels = BTreeMap::from([
                (remote::LABEL_TARGET.to_string(), chain.clone()),
                (remote::LABEL_IMAGE_REF.to_string(), name.clone()),
                (
                    remote::LABEL_MANIFEST.to_string(),
                    manifest_desc.digest.clone(),
                ),
                (remote::LABEL_LAYER.to_string(), l.digest.clone()),
                (remote::LABEL_IMAGE_LAYERS.to_string(), image_layers(i)),
            ]);
            let key = format!("extract-{nonce}-{i} {chain}");
            let mounts = match ctd.prepare(&a.snapshotter, &key, &parent, &labels).await? {
                Prepared::AlreadyExists => {
                    tracing::info!(layer = %l.digest, "mounted lazily at {:.3}s",
                    started.elapsed().as_secs_f64());
                    lazy += 1;
                    continue;
                }
                Prepared::Mounts(m) => m,
            };
            let unpack = async {
                let layer_labels = BTreeMap::from([(source_label.clone(), source.clone())]);
                let reader = {
                    let registry = registry.clone();
                    let (r, d) = (r.clone(), l.digest.clone());
                    tokio::task::spawn_blocking(move || registry.open_blob(&r, &d)).await??
                };
                ctd.write_content(&l.digest, l.size, reader, &layer_labels)
                    .await?;
                let desc = CtrDescriptor {
                    media_type: l.media_type.clone(),
                    digest: l.digest.clone(),
                    size: l.size as i64,
                    annotations: HashMap::new(),
                };
                let applied = ctd.apply(desc, mounts).await?;
                if applied.digest != diff_ids[i] {
                    bail!(
                        "layer {} unpacked to {}, but the config says {}",
                        l.digest,
                        applied.digest,
                        diff_ids[i]
                    );
                }
                ctd.label_content(
                    &l.digest,
                    &BTreeMap::from([(
                        "containerd.io/uncompressed".to_string(),
                        applied.digest.clone(),
                    )]),
                )
                .await?;
                let commit_labels =
                    BTreeMap::from([(remote::LABEL_TARGET.to_string(), chain.clone())]);
                ctd.commit(&a.snapshotter, chain, &key, &commit_labels)
                    .await?;
                anyhow::Ok(())
            };
            if let Err(e) = unpack.await {
                let _ = ctd.remove_snapshot(&a.snapshotter, &key).await;
                return Err(e.context(format!("unpacking layer {} of {name}", l.digest)));
            }
            unpacked += 1;
        }
        anyhow::Ok((lazy, unpacked))
    };
    // A failure of either drops the other mid-call: what it left (content, a prepared
    // snapshot) is under the lease and goes with it; no image names any of it yet.
    let ((), (lazy, unpacked)) = tokio::try_join!(content, layers)?;
    let target = match &index {
        Some((idx, children)) => {
            let mut labels = BTreeMap::from([(source_label.clone(), source.clone())]);
            for (i, c) in children.iter().enumerate() {
                labels.insert(format!("containerd.io/gc.ref.content.m.{i}"), c.clone());
            }
            ctd.write_content(
                &idx.digest,
                idx.bytes.len() as u64,
                Box::new(std::io::Cursor::new(idx.bytes.clone())),
                &labels,
            )
            .await?;
            CtrDescriptor {
                media_type: idx.media_type.clone(),
                digest: idx.digest.clone(),
                size: idx.bytes.len() as i64,
                annotations: HashMap::new(),
            }
        }
        None => CtrDescriptor {
            media_type: manifest_desc.media_type.clone(),
            digest: manifest_desc.digest.clone(),
            size: manifest_desc.size as i64,
            annotations: HashMap::new(),
        },
    };
    ctd.put_image(&name, target, HashMap::new()).await?;
    Ok((manifest.layers.len(), lazy, unpacked))
}

fn now_nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}
