//! Images in and out as files: `import` (a rootfs tarball → a one-layer image), `save` (a
//! Docker archive that is also an OCI layout) and `load` (Docker archives and OCI layout
//! tarballs of other tools).

use std::io::Read;
use std::path::PathBuf;

use anyhow::Context;
use serde_json::json;
use strata_builder::commit::{apply_change, save_image};
use strata_builder::convert::{convert_layer, layer_descriptor, ConvertOptions};
use strata_fs::reference::Reference;

use super::open_store;
use crate::GlobalArgs;

#[derive(clap::Args)]
pub struct ImportArgs {
    /// Dockerfile instruction to apply to the image config (CMD, ENTRYPOINT, ENV, WORKDIR,
    /// USER, LABEL, EXPOSE, VOLUME, STOPSIGNAL); repeatable.
    #[arg(short = 'c', long = "change")]
    pub changes: Vec<String>,
    /// History comment.
    #[arg(short = 'm', long)]
    pub message: Option<String>,
    /// The rootfs tarball (plain, gzip or zstd), or `-` for standard input.
    pub file: PathBuf,
    /// Name of the new image (default: `localhost/import:` and the start of its layer's digest).
    pub reference: Option<String>,
}

/// `strata import`: a rootfs tarball becomes a one-layer image (hostile paths refused, as in
/// `convert`).
pub fn import(g: &GlobalArgs, a: ImportArgs) -> anyhow::Result<()> {
    let mut config = json!({"config": {}});
    for c in &a.changes {
        apply_change(&mut config, c)?;
    }
    let dst = a.reference.as_deref().map(Reference::parse).transpose()?;
    if let Some(d) = &dst {
        super::build::refuse_cache_name(d)?;
    }
    let store = open_store(g)?;
    let input: Box<dyn Read> = if a.file.as_os_str() == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        Box::new(
            std::fs::File::open(&a.file)
                .with_context(|| format!("opening {}", a.file.display()))?,
        )
    };
    let (blob, c) = convert_layer(input, store.blob_writer()?, &ConvertOptions::default())
        .with_context(|| format!("importing {}", a.file.display()))?;
    let digest = blob.commit(None)?;
    let layer = layer_descriptor(digest, &c.summary);
    let diff_id = c.summary.diff_id.oci();
    let now = strata_fs::rfc3339::now();
    let (os, arch) = strata_fs::oci::host_platform();
    config["architecture"] = json!(arch);
    config["os"] = json!(os);
    config["created"] = json!(now);
    config["rootfs"] = json!({"type": "layers", "diff_ids": [diff_id]});
    let mut entry =
        json!({"created": now, "created_by": format!("strata import {}", a.file.display())});
    if let Some(m) = &a.message {
        entry["comment"] = json!(m);
    }
    config["history"] = json!([entry]);
    let dst = match dst {
        Some(d) => d,
        None => Reference::parse(&format!(
            "localhost/import:{}",
            &diff_id.trim_start_matches("sha256:")[..12]
        ))?,
    };
    let template = super::build::scratch_manifest()?;
    let desc = save_image(
        &store,
        &template,
        vec![layer],
        &config,
        &Default::default(),
        &dst,
    )?;
    println!("{}", desc.digest);
    Ok(())
}

#[derive(clap::Args)]
pub struct SaveArgs {
    /// Write to this file (default: standard output, unless it is a terminal).
    #[arg(short = 'o', long)]
    pub output: Option<PathBuf>,
    #[command(flatten)]
    pub registry: super::registry::RegistryArgs,
    /// Images to save.
    #[arg(required = true)]
    pub images: Vec<String>,
}

/// Docker's short form of a name: `docker.io/library/x:t` → `x:t`, `docker.io/o/x:t` → `o/x:t`.
fn familiar(r: &Reference) -> String {
    let full = r.to_string();
    let s = full.strip_prefix("docker.io/").unwrap_or(&full);
    s.strip_prefix("library/").unwrap_or(s).to_string()
}

/// A layer blob's tar stream (strata and zstd layers, gzip layers, plain tars).
fn layer_reader<'a>(media_type: &str, r: Box<dyn Read + 'a>) -> anyhow::Result<Box<dyn Read + 'a>> {
    Ok(if media_type.contains("zstd") {
        Box::new(zstd::stream::read::Decoder::new(r)?)
    } else if media_type.contains("gzip") {
        Box::new(flate2::read::MultiGzDecoder::new(r))
    } else {
        r
    })
}

fn append_bytes<W: std::io::Write>(
    b: &mut tar::Builder<W>,
    name: &str,
    data: &[u8],
) -> anyhow::Result<()> {
    let mut h = tar::Header::new_ustar();
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_mtime(0);
    h.set_entry_type(tar::EntryType::Regular);
    b.append_data(&mut h, name, data)?;
    Ok(())
}

/// `strata save`: images as one tarball that is both a Docker archive (`manifest.json`,
/// `repositories`) and an OCI image layout (`index.json`, `oci-layout`), sharing one set of
/// blobs: layers as plain tars (named by their diff IDs), as `docker save` writes them.
/// Lazily pulled layers are fetched first.
pub fn save(g: &GlobalArgs, a: SaveArgs) -> anyhow::Result<()> {
    use sha2::Digest as _;
    use std::io::{Seek, Write};
    let store = open_store(g)?;
    let client = a.registry.client()?;
    if a.output.is_none() && std::io::IsTerminal::is_terminal(&std::io::stdout()) {
        anyhow::bail!("refusing to write an archive to a terminal: use -o FILE or redirect");
    }
    // The archive is assembled in a temp file next to its destination, renamed when whole.
    let out_tmp = match &a.output {
        Some(p) => {
            let dir = p
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(std::path::Path::new("."));
            Some(
                tempfile::NamedTempFile::new_in(dir)
                    .with_context(|| format!("writing {}", p.display()))?,
            )
        }
        None => None,
    };
    let sink: Box<dyn Write> = match &out_tmp {
        Some(t) => Box::new(std::io::BufWriter::with_capacity(1 << 20, t.reopen()?)),
        None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
    };
    let mut b = tar::Builder::new(sink);
    let mut written: std::collections::BTreeSet<String> = Default::default();
    let mut docker_manifest = Vec::new();
    let mut repositories = serde_json::Map::new();
    let mut index = Vec::new();
    for image in &a.images {
        super::images::fetch_missing_layers(&store, &client, image)?;
        let rec = store.resolve(image)?;
        let m = store.manifest(&rec.descriptor.digest)?;
        let config_bytes = store.read_blob(&m.config.digest)?;
        let config: serde_json::Value = serde_json::from_slice(&config_bytes)?;
        let diff_ids: Vec<String> = config["rootfs"]["diff_ids"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|d| d.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        if diff_ids.len() != m.layers.len() {
            anyhow::bail!(
                "{image}: config lists {} diff IDs for {} layers",
                diff_ids.len(),
                m.layers.len()
            );
        }
        let mut layer_paths = Vec::new();
        let mut oci_layers = Vec::new();
        for (l, diff_id) in m.layers.iter().zip(&diff_ids) {
            let hex = diff_id.trim_start_matches("sha256:").to_string();
            let name = format!("blobs/sha256/{hex}");
            // The layer's tar stream, checked against its diff ID before it is written.
            let mut tmp = tempfile::tempfile_in(store.layout().tmp())?;
            let blob = std::fs::File::open(store.blob_path(&l.digest)?)?;
            let mut r = layer_reader(&l.media_type, Box::new(blob))?;
            let mut h = sha2::Sha256::new();
            let mut buf = vec![0u8; 1 << 20];
            let mut size = 0u64;
            loop {
                let n = r.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
                tmp.write_all(&buf[..n])?;
                size += n as u64;
            }
            let got = format!("sha256:{}", hex::encode(h.finalize()));
            if &got != diff_id {
                anyhow::bail!(
                    "{image}: layer {} decompresses to {got}, not its diff ID {diff_id}",
                    l.digest
                );
            }
            if written.insert(name.clone()) {
                tmp.seek(std::io::SeekFrom::Start(0))?;
                let mut th = tar::Header::new_ustar();
                th.set_size(size);
                th.set_mode(0o644);
                th.set_mtime(0);
                th.set_entry_type(tar::EntryType::Regular);
                b.append_data(&mut th, &name, &mut tmp)?;
            }
            layer_paths.push(name);
            oci_layers.push(json!({"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": diff_id, "size": size}));
        }
        let config_name = format!(
            "blobs/sha256/{}",
            m.config.digest.trim_start_matches("sha256:")
        );
        if written.insert(config_name.clone()) {
            append_bytes(&mut b, &config_name, &config_bytes)?;
        }
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": strata_fs::oci::MEDIA_TYPE_MANIFEST,
            "config": {"mediaType": strata_fs::oci::MEDIA_TYPE_CONFIG, "digest": m.config.digest, "size": config_bytes.len()},
            "layers": oci_layers,
        });
        let mbytes = serde_json::to_vec(&manifest)?;
        let mdigest = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&mbytes)));
        let mname = format!("blobs/sha256/{}", mdigest.trim_start_matches("sha256:"));
        if written.insert(mname.clone()) {
            append_bytes(&mut b, &mname, &mbytes)?;
        }
        let reference = Reference::parse(image).unwrap_or(rec.reference.clone());
        let tag = reference.tag.clone().unwrap_or_else(|| "latest".into());
        index.push(json!({
            "mediaType": strata_fs::oci::MEDIA_TYPE_MANIFEST,
            "digest": mdigest, "size": mbytes.len(),
            "annotations": {"io.containerd.image.name": reference.to_string(), "org.opencontainers.image.ref.name": tag},
        }));
        let short = familiar(&reference);
        docker_manifest
            .push(json!({"Config": config_name, "RepoTags": [short], "Layers": layer_paths}));
        let repo = short
            .rsplit_once(':')
            .map_or(short.as_str(), |(r, _)| r)
            .to_string();
        if let Some(top) = diff_ids.last() {
            let entry = repositories.entry(repo).or_insert_with(|| json!({}));
            entry[&tag] = json!(top.trim_start_matches("sha256:"));
        }
    }
    append_bytes(&mut b, "oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    append_bytes(
        &mut b,
        "index.json",
        &serde_json::to_vec(
            &json!({"schemaVersion": 2, "mediaType": strata_fs::oci::MEDIA_TYPE_INDEX, "manifests": index}),
        )?,
    )?;
    append_bytes(
        &mut b,
        "manifest.json",
        &serde_json::to_vec(&docker_manifest)?,
    )?;
    append_bytes(&mut b, "repositories", &serde_json::to_vec(&repositories)?)?;
    let mut sink = b.into_inner()?;
    sink.flush()?;
    drop(sink);
    if let (Some(t), Some(p)) = (out_tmp, &a.output) {
        t.as_file().sync_all()?;
        t.persist(p)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct LoadArgs {
    /// Read from this file (default: standard input).
    #[arg(short = 'i', long)]
    pub input: Option<PathBuf>,
}

/// `strata load`: the images of a Docker archive (`docker save`, `podman save`, `strata save`)
/// or of an OCI layout tarball (`podman save --format oci-archive`, `skopeo copy
/// oci-archive:`), converted into the store.
pub fn load(g: &GlobalArgs, a: LoadArgs) -> anyhow::Result<()> {
    let store = open_store(g)?;
    let stdin_copy;
    let path: PathBuf = match &a.input {
        Some(p) => p.clone(),
        None => {
            let mut t = tempfile::NamedTempFile::new_in(store.layout().tmp())?;
            std::io::copy(&mut std::io::stdin().lock(), &mut t)?;
            let p = t.path().to_path_buf();
            stdin_copy = t;
            let _ = &stdin_copy;
            p
        }
    };
    let mut names = std::collections::BTreeSet::new();
    {
        let f =
            std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        let mut ar = tar::Archive::new(std::io::BufReader::new(f));
        for e in ar
            .entries()
            .with_context(|| format!("{}: not a tar archive", path.display()))?
        {
            let e = e.with_context(|| format!("{}: not a tar archive", path.display()))?;
            names.insert(
                String::from_utf8_lossy(&e.path_bytes())
                    .trim_start_matches("./")
                    .to_string(),
            );
        }
    }
    let opts = ConvertOptions::default();
    let mut loaded = 0;
    if names.contains("manifest.json") {
        for (src, tags) in strata_builder::source::docker_archive_images(&path)? {
            let tags = if tags.is_empty() {
                vec![String::new()]
            } else {
                tags
            };
            for t in tags {
                let name = if t.is_empty() {
                    let digest = format!(
                        "sha256:{}",
                        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&src.config))
                    );
                    format!("localhost/loaded:{}", &digest[7..19])
                } else {
                    t
                };
                let dst = Reference::parse(&name)?;
                super::build::refuse_cache_name(&dst)?;
                strata_builder::convert::convert_image(&store, &src, &dst, &opts, &mut |_| {})
                    .with_context(|| format!("loading {name}"))?;
                println!("Loaded image: {dst}");
                loaded += 1;
            }
        }
    } else if names.contains("index.json") {
        let dir = tempfile::Builder::new()
            .prefix("load-")
            .tempdir_in(store.layout().tmp())?;
        let f = std::fs::File::open(&path)?;
        tar::Archive::new(std::io::BufReader::new(f))
            .unpack(dir.path())
            .with_context(|| format!("unpacking {}", path.display()))?;
        let index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("index.json"))?)?;
        for m in index["manifests"].as_array().cloned().unwrap_or_default() {
            let ann = &m["annotations"];
            let refname = ann["org.opencontainers.image.ref.name"].as_str();
            let full = ann["io.containerd.image.name"].as_str();
            let Some(refname) = refname.or(full) else {
                continue;
            };
            let name = match full {
                Some(f) => f.to_string(),
                None if refname.contains('/') || refname.contains(':') => refname.to_string(),
                None => format!("localhost/loaded:{refname}"),
            };
            let src = strata_builder::source::open_source(
                &format!("oci:{}:{refname}", dir.path().display()),
                None,
            )?;
            let dst = Reference::parse(&name)?;
            super::build::refuse_cache_name(&dst)?;
            strata_builder::convert::convert_image(&store, &src, &dst, &opts, &mut |_| {})
                .with_context(|| format!("loading {name}"))?;
            println!("Loaded image: {dst}");
            loaded += 1;
        }
    } else {
        anyhow::bail!(
            "{}: neither a Docker archive (manifest.json) nor an OCI layout (index.json)",
            path.display()
        );
    }
    if loaded == 0 {
        anyhow::bail!("{}: no named images in the archive", path.display());
    }
    Ok(())
}
