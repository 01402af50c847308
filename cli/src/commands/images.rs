use anyhow::Context;
use serde_json::json;
use strata_fs::format::dump::dump;
use strata_fs::image::open;

use super::{human_bytes, open_store};
use crate::GlobalArgs;

#[derive(clap::Args)]
pub struct ImagesArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Also list the build cache's images (`localhost/strata-build-cache`).
    #[arg(short = 'a', long)]
    pub all: bool,
}

#[derive(clap::Args)]
pub struct InspectArgs {
    /// Image reference or manifest digest (prefix).
    pub image: String,
    /// Print every layer's TOC listing instead of JSON.
    #[arg(long)]
    pub toc: bool,
    #[command(flatten)]
    pub registry: super::registry::RegistryArgs,
}

pub fn images(g: &GlobalArgs, a: ImagesArgs) -> anyhow::Result<()> {
    let store = open_store(g)?;
    let mut rows = Vec::new();
    for rec in store.images()? {
        if !a.all
            && rec
                .reference
                .to_string()
                .starts_with(super::build::CACHE_REPO)
        {
            continue;
        }
        let manifest = store.manifest(&rec.descriptor.digest);
        let (layers, size, created) = match &manifest {
            Ok(m) => {
                let created = store
                    .read_blob(&m.config.digest)
                    .ok()
                    .and_then(|c| serde_json::from_slice::<serde_json::Value>(&c).ok())
                    .and_then(|c| {
                        c.get("created")
                            .and_then(|v| v.as_str())
                            .map(str::to_string)
                    })
                    .unwrap_or_default();
                (
                    m.layers.len(),
                    m.layers.iter().map(|l| l.size).sum::<u64>(),
                    created,
                )
            }
            Err(_) => (0, 0, String::new()),
        };
        let lazy = manifest.as_ref().is_ok_and(|m| {
            !m.layers.is_empty()
                && m.layers.iter().all(|l| {
                    l.annotations
                        .contains_key(strata_fs::format::ANNOTATION_TOC_DIGEST)
                })
        });
        rows.push((rec, layers, size, created, lazy));
    }
    rows.sort_by(|a, b| a.0.reference.cmp(&b.0.reference));
    if a.json {
        let list: Vec<_> = rows
            .iter()
            .map(|(rec, layers, size, created, lazy)| {
                json!({
                    "reference": rec.reference.to_string(),
                    "repository": rec.reference.name(),
                    "tag": rec.reference.tag,
                    "digest": rec.descriptor.digest,
                    "layers": layers,
                    "size": size,
                    "created": created,
                    "strata": lazy,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(());
    }
    println!(
        "{:<40} {:<16} {:<19} {:>6} {:>10}  FORMAT",
        "REPOSITORY", "TAG", "DIGEST", "LAYERS", "SIZE"
    );
    for (rec, layers, size, _, lazy) in &rows {
        let r = &rec.reference;
        let familiar = r.familiar();
        let repo = familiar
            .split_once(':')
            .map_or(familiar.as_str(), |(n, _)| n);
        let repo = if r.registry.contains(':') {
            r.name()
        } else {
            repo.to_string()
        };
        println!(
            "{:<40} {:<16} {:<19} {:>6} {:>10}  {}",
            repo,
            r.tag.as_deref().unwrap_or("<none>"),
            &rec.descriptor.digest[..rec.descriptor.digest.len().min(19)],
            layers,
            human_bytes(*size),
            if *lazy { "strata" } else { "oci" }
        );
    }
    Ok(())
}

pub fn inspect(g: &GlobalArgs, a: InspectArgs) -> anyhow::Result<()> {
    let store = open_store(g)?;
    // A container of that name or id first, as `docker inspect` does.
    let containers = strata_builder::container::Containers::new(&store);
    if let Ok(c) = containers.find(&a.image) {
        let dir = containers.dir(&c.id);
        let mut v = serde_json::to_value(&c)?;
        v["rootfs"] = serde_json::json!(dir.rootfs());
        v["upper"] = serde_json::json!(dir.layer().join("upper"));
        v["bundle"] = serde_json::json!(dir.bundle());
        v["log"] = serde_json::json!(dir.log());
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let client = a.registry.client()?;
    let image =
        open(&store, &a.image, Some(&client)).with_context(|| format!("opening {}", a.image))?;
    if a.toc {
        for (i, l) in image.layers.iter().enumerate() {
            println!("# layer {} {}", i + 1, l.descriptor.digest);
            print!("{}", dump(&l.toc));
        }
        return Ok(());
    }
    let layers: Vec<_> = image
        .layers
        .iter()
        .map(|l| {
            json!({
                "digest": l.descriptor.digest,
                "mediaType": l.descriptor.media_type,
                "size": l.descriptor.size,
                "annotations": l.descriptor.annotations,
                "toc": {
                    "entries": l.toc.entries.len(),
                    "chunks": l.toc.chunk_count(),
                    "chunkSize": l.toc.chunk_size,
                    "compressedBytes": l.toc.compressed_chunk_bytes(),
                    "uncompressedBytes": l.toc.uncompressed_bytes(),
                }
            })
        })
        .collect();
    let out = json!({
        "reference": image.reference.to_string(),
        "digest": image.manifest_digest,
        "manifest": image.manifest,
        "config": image.config,
        "layers": layers,
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

#[derive(clap::Args)]
pub struct TagArgs {
    /// Existing image (reference or digest).
    pub source: String,
    /// New name.
    pub target: String,
}

pub fn tag(g: &GlobalArgs, a: TagArgs) -> anyhow::Result<()> {
    let store = open_store(g)?;
    let rec = store.resolve(&a.source)?;
    let target = strata_fs::reference::Reference::parse(&a.target)?;
    super::build::refuse_cache_name(&target)?;
    store.tag(&target, rec.descriptor)?;
    Ok(())
}

#[derive(clap::Args)]
pub struct RmiArgs {
    /// Image names to remove.
    #[arg(required = true)]
    pub images: Vec<String>,
}

pub fn rmi(g: &GlobalArgs, a: RmiArgs) -> anyhow::Result<()> {
    let store = open_store(g)?;
    let mut failed = false;
    for image in &a.images {
        match store.resolve(image) {
            Ok(rec) => {
                store.untag(&rec.reference)?;
                println!("Untagged: {}", rec.reference);
                // The access profile kept for its manifest goes with the last name of it.
                let digest = &rec.descriptor.digest;
                let named = store
                    .images()
                    .map(|all| all.iter().any(|i| &i.descriptor.digest == digest));
                if let (Ok(false), Some(path)) = (named, store.layout().profile_of(digest)) {
                    strata_fs::service::remove_stale_profile(&path);
                }
            }
            Err(e) => {
                eprintln!("strata: error: {e}");
                failed = true;
            }
        }
    }
    if failed {
        anyhow::bail!("some images were not removed");
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct VerifyArgs {
    /// Image reference or manifest digest; an image not in the store, or whose layers are
    /// not all here, is pulled whole first.
    pub image: String,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub registry: super::registry::RegistryArgs,
}

/// Fetches the layers of a lazily pulled `image` that are not in the store, by digest, from
/// the repository the image came from.
pub fn fetch_missing_layers(
    store: &strata_fs::store::Store,
    client: &std::sync::Arc<strata_fs::registry::Registry>,
    image: &str,
) -> anyhow::Result<()> {
    let rec = store.resolve(image)?;
    let m = store.manifest(&rec.descriptor.digest)?;
    if m.layers.iter().all(|l| store.has_blob(&l.digest)) {
        return Ok(());
    }
    let src = strata_fs::image::source_of(&rec)
        .with_context(|| format!("{image}: layers are missing and no source is known"))?;
    for l in m.layers.iter().filter(|l| !store.has_blob(&l.digest)) {
        let mut reader = client
            .open_blob(&src, &l.digest)
            .with_context(|| format!("fetching layer {} from {src}", l.digest))?;
        let mut w = store.blob_writer()?;
        std::io::copy(&mut reader, &mut w)
            .with_context(|| format!("fetching layer {}", l.digest))?;
        w.commit(Some(&l.digest))?;
    }
    Ok(())
}

/// `strata verify IMAGE`: every blob against its digest, every layer's tar stream against its
/// diff ID and (strata layers) its TOC, every chunk at its offset.
pub fn verify(g: &GlobalArgs, a: VerifyArgs) -> anyhow::Result<()> {
    let store = open_store(g)?;
    match store.resolve(&a.image) {
        // In the store with layers missing (lazily pulled): fetch those blobs.
        Ok(_) => fetch_missing_layers(&store, &a.registry.client()?, &a.image)?,
        Err(_) => {
            let r = strata_fs::reference::Reference::parse(&a.image)?;
            let client = a.registry.client()?;
            let (os, arch) = super::registry::platform(None)?;
            strata_fs::transfer::pull(&store, &client, &r, (&os, &arch), true, &mut |_| {})
                .with_context(|| format!("pulling {r} to verify it"))?;
        }
    }
    let report = strata_builder::verify::verify_image(&store, &a.image)
        .with_context(|| format!("verifying {}", a.image))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    for l in &report {
        println!(
            "{}  {}",
            l.digest,
            if l.strata {
                format!(
                    "ok: {} entries, {} chunks, {} tar bytes match the TOC",
                    l.entries, l.chunks, l.tar_bytes
                )
            } else {
                format!("ok: blob and diff ID ({} tar bytes)", l.tar_bytes)
            }
        );
    }
    println!("{}: verified {} layers", a.image, report.len());
    Ok(())
}
