#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failure should abort loudly
//! `strata verify` checks a whole image, so a scanner reading the tar stream and a strata mount
//! can never see different trees under one digest; `convert` refuses what `mount` would refuse.

use std::fs;
use std::path::Path;

use strata_fs::format::{self, writer};
use strata_fs::oci::{Descriptor, Manifest};
use strata_fs::reference::Reference;
use strata_fs::store::Store;
use strata_tests::image::{
    feature_layers, scratch, write_oci_layout, Compression, Layer, LayerBuilder,
};
use strata_tests::util::{strata, strata_ok};

fn convert(tmp: &Path, root: &Path, layers: &[Layer], name: &str) -> std::process::Output {
    let src = tmp.join(format!("src-{}", name.replace(['/', ':'], "-")));
    write_oci_layout(&src, "v1", layers).unwrap();
    strata(
        root,
        &["convert", &format!("oci:{}:v1", src.display()), name],
    )
}

/// Rewrites layer `i` of `image` with `edit` applied to its TOC (tar frames untouched, so the
/// diff ID still matches), and retags the image with a manifest whose annotations and digests
/// are all consistent with the new blob: the lie only `verify` can see.
fn lie_in_toc(root: &Path, image: &str, edit: impl Fn(&mut format::Toc)) {
    let store = Store::open(root).unwrap();
    let rec = store.resolve(image).unwrap();
    let mut manifest: Manifest = store.manifest(&rec.descriptor.digest).unwrap();
    let d = manifest.layers[0].clone();
    let blob = store.read_blob(&d.digest).unwrap();
    let footer =
        format::parse_footer(&blob[blob.len() - format::FOOTER_SIZE..], blob.len() as u64).unwrap();
    let frame = &blob[footer.toc_offset as usize..(footer.toc_offset + footer.toc_size) as usize];
    let mut toc = format::parse_toc(frame, &footer.toc_digest, footer.toc_offset).unwrap();
    edit(&mut toc);
    let new_frame = writer::encode_toc_frame(&toc).unwrap();
    let new_footer = format::Footer {
        toc_offset: footer.toc_offset,
        toc_size: new_frame.len() as u64,
        toc_digest: format::Sha256Digest::of(&new_frame),
    };
    let mut new_blob = blob[..footer.toc_offset as usize].to_vec();
    new_blob.extend_from_slice(&new_frame);
    new_blob.extend_from_slice(&writer::encode_footer(&new_footer));
    let digest = store.put_blob(&new_blob).unwrap();
    let mut nd = Descriptor::new(&d.media_type, digest, new_blob.len() as u64);
    nd.annotations = d.annotations.clone();
    nd.annotations.insert(
        format::ANNOTATION_TOC_DIGEST.into(),
        new_footer.toc_digest.oci(),
    );
    nd.annotations.insert(
        format::ANNOTATION_TOC_SIZE.into(),
        new_footer.toc_size.to_string(),
    );
    manifest.layers[0] = nd;
    let bytes = serde_json::to_vec(&manifest).unwrap();
    let md = store.put_blob(&bytes).unwrap();
    let desc = Descriptor::new(&rec.descriptor.media_type, md, bytes.len() as u64);
    store.tag(&Reference::parse(image).unwrap(), desc).unwrap();
}

#[test]
fn verify_accepts_a_true_image_and_finds_every_lie() {
    let tmp = scratch("verify").unwrap();
    let root = tmp.join("store");
    let out = convert(&tmp, &root, &feature_layers(50).unwrap(), "v/good:v1");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = strata_ok(&root, &["verify", "v/good:v1"]);
    assert!(report.contains("verified"), "{report}");
    let json: serde_json::Value =
        serde_json::from_str(&strata_ok(&root, &["verify", "--json", "v/good:v1"])).unwrap();
    let layers = json.as_array().unwrap();
    assert!(layers.len() >= 2);
    assert!(layers.iter().all(|l| l["chunks"].as_u64().unwrap() > 0));

    // A TOC that says another mode than the tar header (digests all consistent).
    type Lie = Box<dyn Fn(&mut format::Toc)>;
    let lies: Vec<(&str, Lie)> = vec![
        (
            "mode",
            Box::new(|t: &mut format::Toc| {
                let e = t
                    .entries
                    .iter_mut()
                    .find(|e| e.path == b"etc/hosts")
                    .unwrap();
                e.mode = 0o4755;
            }),
        ),
        (
            "owner",
            Box::new(|t: &mut format::Toc| {
                let e = t
                    .entries
                    .iter_mut()
                    .find(|e| e.path == b"etc/passwd")
                    .unwrap();
                e.uid = 0xbad;
            }),
        ),
        (
            "hidden entry",
            Box::new(|t: &mut format::Toc| {
                t.entries.retain(|e| e.path != b"etc/hosts");
            }),
        ),
    ];
    for (what, lie) in lies {
        let name = format!("v/lie-{}:v1", what.replace(' ', "-"));
        strata_ok(&root, &["tag", "v/good:v1", &name]);
        lie_in_toc(&root, &name, lie);
        let out = strata(&root, &["verify", &name]);
        assert!(
            !out.status.success(),
            "verify accepted a TOC lying about {what}"
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("layer 1"), "{what}: {err}");
    }

    // A flipped byte in a blob.
    let store = Store::open(&root).unwrap();
    let rec = store.resolve("v/good:v1").unwrap();
    let m = store.manifest(&rec.descriptor.digest).unwrap();
    let path = store.blob_path(&m.layers[1].digest).unwrap();
    let mut bytes = fs::read(&path).unwrap();
    let at = bytes.len() / 3;
    bytes[at] ^= 0x40;
    fs::write(&path, &bytes).unwrap();
    let out = strata(&root, &["verify", "v/good:v1"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("layer 2"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    fs::remove_dir_all(&tmp).ok();
}

#[test]
fn convert_refuses_what_mount_would_refuse() {
    let tmp = scratch("verify-convert").unwrap();
    let root = tmp.join("store");
    // A hard link to a path no layer has.
    let mut l = LayerBuilder::new();
    l.dir(".", 0o755)
        .unwrap()
        .file("a", 0o644, b"a")
        .unwrap()
        .hardlink("b", "missing")
        .unwrap();
    let out = convert(
        &tmp,
        &root,
        &[Layer {
            tar: l.finish().unwrap(),
            compression: Compression::Gzip,
        }],
        "v/dangling:v1",
    );
    assert!(!out.status.success(), "a dangling hard link was converted");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("missing"), "{err}");

    // An entry under a directory a lower layer made a symlink.
    let mut lower = LayerBuilder::new();
    lower.dir(".", 0o755).unwrap().symlink("d", "/etc").unwrap();
    let mut upper = LayerBuilder::new();
    upper
        .dir(".", 0o755)
        .unwrap()
        .file("d/x", 0o644, b"escape")
        .unwrap();
    let out = convert(
        &tmp,
        &root,
        &[
            Layer {
                tar: lower.finish().unwrap(),
                compression: Compression::Gzip,
            },
            Layer {
                tar: upper.finish().unwrap(),
                compression: Compression::Gzip,
            },
        ],
        "v/through-link:v1",
    );
    assert!(
        !out.status.success(),
        "an entry under a symlink was converted"
    );
    let images = strata_ok(&root, &["images"]);
    assert!(
        !images.contains("dangling") && !images.contains("through-link"),
        "{images}"
    );
    fs::remove_dir_all(&tmp).ok();
}
