#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failure should abort loudly
//! Golden test: a small fixture layer's bytes are pinned (blob digest, diff ID, footer bytes and
//! the TOC dump), so any change to the on-disk format is deliberate and shows in review.
//! The fixture and field offsets follow `docs/format.md`; regenerate the golden files with
//! `STRATA_BLESS=1 cargo test -p strata-fs --test golden` after a deliberate format change.

use std::path::PathBuf;

use strata_fs::format::dump::dump;
use strata_fs::format::writer::{Batch, FrameCompressor, DEFAULT_TOC_FLAGS};
use strata_fs::format::*;

/// The fixture in the first releases' layout (`batched`: false, TOC flag `ZSTD` alone: what
/// this writer produces in that layout, which differs from the first releases' bytes only in the
/// TOC's zstd level and empty strings at offset 0), or in the current one with two small files
/// sharing a batch frame.
fn fixture(batched: bool) -> (Vec<u8>, LayerSummary) {
    let flags = if batched {
        DEFAULT_TOC_FLAGS
    } else {
        TOC_FLAG_ZSTD
    };
    let mut w = LayerWriter::new(Vec::new(), 64, 3)
        .unwrap()
        .with_toc_flags(flags);
    let mut c = FrameCompressor::new(3).unwrap();
    let mut root = Entry::new(Vec::new(), EntryKind::Directory);
    root.mtime_sec = 1_700_000_000;
    w.add_entry(root).unwrap();
    let mut f = Entry::new(b"hello.txt".to_vec(), EntryKind::Regular);
    let data = b"hello, strata! this file spans two chunks of 64 bytes each, and a bit.\n";
    f.size = data.len() as u64;
    f.mode = 0o644;
    f.uid = 1000;
    f.gid = 1000;
    f.mtime_sec = 1_700_000_001;
    f.xattrs = vec![(b"user.note".to_vec(), b"golden".to_vec())];
    w.add_entry(f).unwrap();
    w.write_data(data, &mut c).unwrap();
    let mut l = Entry::new(b"link".to_vec(), EntryKind::Symlink);
    l.link = b"hello.txt".to_vec();
    l.mode = 0o777;
    w.add_entry(l).unwrap();
    let mut wh = Entry::new(b".wh.old".to_vec(), EntryKind::Regular);
    wh.mode = 0;
    w.add_entry(wh).unwrap();
    if batched {
        let mut batch = Batch::new();
        for (name, body) in [("a.conf", &b"a = 1\n"[..]), ("b.conf", &b"b = 2\n"[..])] {
            let mut e = Entry::new(name.as_bytes().to_vec(), EntryKind::Regular);
            e.size = body.len() as u64;
            e.mtime_sec = 1_700_000_002;
            assert!(batch.push(e, body).unwrap().is_none());
        }
        let frame = c.compress(batch.content()).unwrap();
        let digest = Sha256Digest::of(batch.content());
        w.add_batch(batch, &frame, digest).unwrap();
    }
    w.finish().unwrap()
}

fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

#[test]
fn fixture_layer_matches_golden() {
    check(false, "small.txt");
    check(true, "batched.txt");
}

fn check(batched: bool, golden: &str) {
    let (blob, summary) = fixture(batched);
    let footer = &blob[blob.len() - FOOTER_SIZE..];
    // Field offsets from docs/format.md, "Footer".
    assert_eq!(&footer[0..4], &SKIPPABLE_MAGIC.to_le_bytes());
    assert_eq!(u32::from_le_bytes(footer[4..8].try_into().unwrap()), 72);
    assert_eq!(&footer[8..16], b"STRATAFT");
    assert_eq!(u16::from_le_bytes(footer[16..18].try_into().unwrap()), 1);
    assert_eq!(
        u64::from_le_bytes(footer[24..32].try_into().unwrap()),
        summary.footer.toc_offset
    );
    assert_eq!(&footer[40..72], &summary.footer.toc_digest.0);
    let toc = &blob[summary.footer.toc_offset as usize..];
    assert_eq!(&toc[8..16], b"STRATOC\0");

    let parsed = parse_toc(
        &blob[summary.footer.toc_offset as usize..blob.len() - FOOTER_SIZE],
        &summary.footer.toc_digest,
        summary.footer.toc_offset,
    )
    .unwrap();
    let text = format!(
        "blob {}\nsize {}\ndiff_id {}\ntoc {}+{} {}\nfooter {}\n{}",
        Sha256Digest::of(&blob),
        summary.blob_size,
        summary.diff_id,
        summary.footer.toc_offset,
        summary.footer.toc_size,
        summary.footer.toc_digest,
        hex::encode(footer),
        dump(&parsed)
    );
    let path = golden_dir().join(golden);
    if std::env::var_os("STRATA_BLESS").is_some() {
        std::fs::write(&path, &text).unwrap();
    }
    let want =
        std::fs::read_to_string(&path).expect("golden file (run with STRATA_BLESS=1 to create)");
    assert_eq!(
        text, want,
        "layer bytes changed; if deliberate, bless and document in docs/format.md"
    );
}
