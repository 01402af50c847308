#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failure should abort loudly
//! Round-trip and robustness tests of the layer format: write → read gives the same entries,
//! the blob is a valid tar+zstd stream, and parsers survive arbitrary bytes.

use std::io::Read;

use proptest::prelude::*;
use strata_fs::format::reader::parse_toc_unverified;
use strata_fs::format::writer::{Batch, FrameCompressor, DEFAULT_TOC_FLAGS};
use strata_fs::format::*;

/// The layout of the first releases: row tables, one frame per chunk of one file.
const FIRST_LAYOUT: u16 = TOC_FLAG_ZSTD;

/// Writes a layer as `strata convert` does: small files in batches.
fn write_layer(entries: &[(Entry, Vec<u8>)], chunk_size: u32) -> (Vec<u8>, LayerSummary) {
    write_layer_with(entries, chunk_size, DEFAULT_TOC_FLAGS)
}

fn write_layer_with(
    entries: &[(Entry, Vec<u8>)],
    chunk_size: u32,
    flags: u16,
) -> (Vec<u8>, LayerSummary) {
    let mut w = LayerWriter::new(Vec::new(), chunk_size, 3)
        .unwrap()
        .with_toc_flags(flags);
    let mut c = FrameCompressor::new(3).unwrap();
    let mut batch = Batch::new();
    let flush = |w: &mut LayerWriter<Vec<u8>>, batch: &mut Batch, c: &mut FrameCompressor| {
        if !batch.is_empty() {
            let b = std::mem::take(batch);
            let frame = c.compress(b.content()).unwrap();
            let digest = Sha256Digest::of(b.content());
            w.add_batch(b, &frame, digest).unwrap();
        }
    };
    for (e, data) in entries {
        let mut e = e.clone();
        if e.kind == EntryKind::Regular {
            e.size = data.len() as u64;
        }
        if w.batches() && Batch::fits(&e) {
            if let Some(e) = batch.push(e, data).unwrap() {
                flush(&mut w, &mut batch, &mut c);
                assert!(batch.push(e, data).unwrap().is_none());
            }
            if batch.is_full() {
                flush(&mut w, &mut batch, &mut c);
            }
            continue;
        }
        flush(&mut w, &mut batch, &mut c);
        w.add_entry(e).unwrap();
        if !data.is_empty() {
            w.write_data(data, &mut c).unwrap();
        }
    }
    flush(&mut w, &mut batch, &mut c);
    w.finish().unwrap()
}

/// The blob decoded as any zstd reader decodes it, checked against the diff ID.
fn tar_stream(blob: &[u8], summary: &LayerSummary) -> Vec<u8> {
    let mut tar_bytes = Vec::new();
    zstd::stream::read::Decoder::new(blob)
        .unwrap()
        .read_to_end(&mut tar_bytes)
        .unwrap();
    assert_eq!(Sha256Digest::of(&tar_bytes), summary.diff_id);
    tar_bytes
}

fn open(blob: &[u8]) -> Toc {
    let footer = parse_footer(&blob[blob.len() - FOOTER_SIZE..], blob.len() as u64).unwrap();
    let frame = &blob[footer.toc_offset as usize..(footer.toc_offset + footer.toc_size) as usize];
    parse_toc(frame, &footer.toc_digest, footer.toc_offset).unwrap()
}

fn read_file(blob: &[u8], e: &Entry) -> Vec<u8> {
    let mut out = Vec::new();
    for c in &e.chunks {
        let frame = &blob[c.compressed_offset as usize..][..c.compressed_len as usize];
        out.extend(c.file_bytes(&decode_chunk(frame, c).unwrap()).unwrap());
    }
    out
}

fn sample() -> Vec<(Entry, Vec<u8>)> {
    let mut v = Vec::new();
    let mut root = Entry::new(Vec::new(), EntryKind::Directory);
    root.mtime_sec = 1_700_000_000;
    v.push((root, vec![]));
    v.push((Entry::new(b"etc".to_vec(), EntryKind::Directory), vec![]));
    let mut f = Entry::new(b"etc/hosts".to_vec(), EntryKind::Regular);
    f.mode = 0o4755;
    f.uid = 1000;
    f.gid = 3_000_000; // needs PAX
    f.mtime_sec = 1_600_000_000;
    f.mtime_nsec = 123_456_789;
    f.xattrs = vec![(b"user.k".to_vec(), b"v\0binary".to_vec())];
    v.push((f, b"127.0.0.1 localhost\n".repeat(100)));
    v.push((Entry::new(b"empty".to_vec(), EntryKind::Regular), vec![]));
    let mut s = Entry::new(b"link".to_vec(), EntryKind::Symlink);
    s.link = b"/etc/hosts".to_vec();
    v.push((s, vec![]));
    let mut h = Entry::new(b"hard".to_vec(), EntryKind::Hardlink);
    h.link = b"etc/hosts".to_vec();
    v.push((h, vec![]));
    let mut d = Entry::new(b"null".to_vec(), EntryKind::CharDevice);
    d.dev_major = 1;
    d.dev_minor = 3;
    v.push((d, vec![]));
    v.push((Entry::new(b"fifo".to_vec(), EntryKind::Fifo), vec![]));
    v.push((
        Entry::new(vec![b'n', 0xff, 0xfe], EntryKind::Regular),
        b"x".to_vec(),
    ));
    let long = [b"d/".repeat(80), b"file".to_vec()].concat();
    v.push((
        Entry::new(long, EntryKind::Regular),
        vec![7u8; 4096 * 4 + 1],
    ));
    v
}

#[test]
fn round_trip_entries_and_data() {
    round_trip(DEFAULT_TOC_FLAGS);
    round_trip(FIRST_LAYOUT);
    round_trip(TOC_FLAG_ZSTD | TOC_FLAG_COLUMNS);
}

fn round_trip(flags: u16) {
    let entries = sample();
    let (blob, summary) = write_layer_with(&entries, 4096, flags);
    assert_eq!(summary.blob_size, blob.len() as u64);
    let toc = open(&blob);
    assert_eq!(toc.entries.len(), entries.len());
    for ((want, data), got) in entries.iter().zip(&toc.entries) {
        assert_eq!(want.path, got.path);
        assert_eq!(want.kind, got.kind);
        assert_eq!(want.mode, got.mode);
        assert_eq!((want.uid, want.gid), (got.uid, got.gid));
        assert_eq!(
            (want.mtime_sec, want.mtime_nsec),
            (got.mtime_sec, got.mtime_nsec)
        );
        assert_eq!(want.link, got.link);
        assert_eq!(want.xattrs, got.xattrs);
        assert_eq!(
            (want.dev_major, want.dev_minor),
            (got.dev_major, got.dev_minor)
        );
        assert_eq!(&read_file(&blob, got), data);
    }
    // The long file (too large for a batch) is split into 5 chunks at the chunk size.
    assert_eq!(toc.entries[9].chunks.len(), 5);
}

#[test]
fn blob_is_a_standard_tar_zstd_stream() {
    standard_stream(DEFAULT_TOC_FLAGS);
    standard_stream(FIRST_LAYOUT);
}

fn standard_stream(flags: u16) {
    let entries = sample();
    let (blob, summary) = write_layer_with(&entries, 4096, flags);
    let tar_bytes = tar_stream(&blob, &summary);
    let mut archive = ::tar::Archive::new(&tar_bytes[..]);
    let mut seen = 0;
    for (item, (want, data)) in archive.entries().unwrap().zip(&entries) {
        let mut item = item.unwrap();
        let path = item.path_bytes().into_owned();
        let want_path = if want.path.is_empty() {
            b"./".to_vec()
        } else if want.kind == EntryKind::Directory {
            [want.path.clone(), b"/".to_vec()].concat()
        } else {
            want.path.clone()
        };
        assert_eq!(path, want_path);
        assert_eq!(item.header().mode().unwrap(), want.mode);
        assert_eq!(item.header().uid().unwrap(), u64::from(want.uid));
        assert_eq!(item.header().gid().unwrap(), u64::from(want.gid));
        if want.kind == EntryKind::Regular {
            let mut got = Vec::new();
            item.read_to_end(&mut got).unwrap();
            assert_eq!(&got, data);
        }
        if !want.xattrs.is_empty() {
            let pax: Vec<_> = item
                .pax_extensions()
                .unwrap()
                .unwrap()
                .map(|x| x.unwrap().key_bytes().to_vec())
                .collect();
            assert!(pax.contains(&b"SCHILY.xattr.user.k".to_vec()));
        }
        seen += 1;
    }
    assert_eq!(seen, entries.len());
}

fn many_small_files() -> Vec<(Entry, Vec<u8>)> {
    let mut v = vec![(Entry::new(b"man".to_vec(), EntryKind::Directory), vec![])];
    for i in 0..200u32 {
        let data: Vec<u8> = (0..(100 + i * 37 % 3000))
            .map(|k| (k * 7 + i) as u8)
            .collect();
        v.push((
            Entry::new(format!("man/page{i}.1").into_bytes(), EntryKind::Regular),
            data,
        ));
    }
    v.push((
        Entry::new(b"man/big".to_vec(), EntryKind::Regular),
        vec![3u8; 40_000],
    ));
    v
}

#[test]
fn small_files_share_batch_frames() {
    let entries = many_small_files();
    let (blob, summary) = write_layer(&entries, 16 << 10);
    let toc = open(&blob);
    let frames = toc.chunk_count();
    assert!(frames < 30, "{frames} frames for 200 small files");
    assert_eq!(summary.chunks, frames);
    assert!(toc
        .entries
        .iter()
        .any(|e| e.chunks.iter().any(|c| c.is_batched())));
    for ((want, data), got) in entries.iter().zip(&toc.entries) {
        assert_eq!(want.path, got.path);
        assert_eq!(&read_file(&blob, got), data);
    }
    // Still one standard tar stream, byte for byte.
    let tar_bytes = tar_stream(&blob, &summary);
    let mut archive = ::tar::Archive::new(&tar_bytes[..]);
    for (item, (_, data)) in archive.entries().unwrap().zip(&entries) {
        let mut got = Vec::new();
        item.unwrap().read_to_end(&mut got).unwrap();
        assert_eq!(&got, data);
    }
    // A batched layer cannot be written in the first layout.
    assert!(writer::encode_toc_body(&toc, FIRST_LAYOUT).is_err());
}

/// The row-form body of a batched layer, and the record offsets of its entries.
fn batched_body() -> (Vec<u8>, Toc, u64) {
    let (blob, _) = write_layer(&many_small_files(), 16 << 10);
    let toc = open(&blob);
    let footer = parse_footer(&blob[blob.len() - FOOTER_SIZE..], blob.len() as u64).unwrap();
    let body = writer::encode_toc_body(&toc, TOC_FLAG_ZSTD | TOC_FLAG_BATCHES).unwrap();
    (body, toc, footer.toc_offset)
}

fn record(i: usize) -> usize {
    BODY_HEADER_SIZE + i * ENTRY_RECORD_SIZE
}

#[test]
fn hostile_batches_are_refused() {
    let flags = TOC_FLAG_ZSTD | TOC_FLAG_BATCHES;
    let (body, toc, end) = batched_body();
    assert_eq!(reader::parse_body(&body, end, flags).unwrap(), toc);
    // The second file of the first batch: it shares the first file's frame.
    let second = toc
        .entries
        .iter()
        .position(|e| e.chunks.first().is_some_and(|c| c.data_offset > 0))
        .unwrap();
    let refused = |mutate: &dyn Fn(&mut Vec<u8>), why: &str| {
        let mut b = body.clone();
        mutate(&mut b);
        match reader::parse_body(&b, end, flags) {
            Ok(_) => panic!("{why}: accepted"),
            Err(e) => assert!(e.to_string().contains(why), "{why}: {e}"),
        }
    };
    // Starting inside the previous file's bytes.
    refused(
        &|b| b[record(second) + 76..][..4].copy_from_slice(&0u32.to_le_bytes()),
        "shares a batch frame",
    );
    // Running past the frame.
    refused(
        &|b| b[record(second) + 76..][..4].copy_from_slice(&(1u32 << 20).to_le_bytes()),
        "run past",
    );
    // Read as the first layout, the shared record is out of order.
    let err = reader::parse_body(&body, end, TOC_FLAG_ZSTD)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("out of order") || err.contains("cover"),
        "{err}"
    );
    // A directory cannot share a frame.
    refused(
        &|b| b[record(0) + 72..][..4].copy_from_slice(&1u32.to_le_bytes()),
        "only regular files",
    );
    // An empty file with a chunk.
    refused(
        &|b| b[record(second) + 16..][..8].copy_from_slice(&0u64.to_le_bytes()),
        "empty file has no chunks",
    );
    // A second record for the same frame (so sharing without the sharing rules).
    let chunks_at = record(toc.entries.len());
    refused(
        &|b| {
            let first = b[chunks_at..chunks_at + 8].to_vec();
            b[chunks_at + CHUNK_RECORD_SIZE..][..8].copy_from_slice(&first);
        },
        "out of blob order",
    );
    // A directory between two files of one batch: the second cannot share the frame.
    let mut split = toc.clone();
    split.entries.insert(
        second,
        Entry::new(b"man/between".to_vec(), EntryKind::Directory),
    );
    // (The writer refuses to write it; as bytes, it is the duplicated record above.)
    let err = writer::encode_toc_body(&split, flags)
        .unwrap_err()
        .to_string();
    assert!(err.contains("not consecutive"), "{err}");
}

#[test]
fn body_counts_that_overflow_are_refused() {
    // 0 entries, 0 chunks, 1 xattr and a string table of 2^64 - 16 bytes: the sum wraps to
    // the body's own length.
    let mut b = vec![0u8; BODY_HEADER_SIZE];
    b[8..12].copy_from_slice(&1u32.to_le_bytes());
    b[16..24].copy_from_slice(&(u64::MAX - 15).to_le_bytes());
    for flags in [FIRST_LAYOUT, DEFAULT_TOC_FLAGS] {
        assert!(reader::parse_body(&b, 1 << 20, flags).is_err());
    }
}

#[test]
fn implicit_paths_must_have_no_offset() {
    let flags = DEFAULT_TOC_FLAGS;
    let (_, toc, end) = batched_body();
    let body = writer::encode_toc_body(&toc, flags).unwrap();
    assert_eq!(reader::parse_body(&body, end, flags).unwrap(), toc);
    // Byte 36 of the records: in columns, 36 × entries past the first record byte.
    let mut b = body.clone();
    b[BODY_HEADER_SIZE + 36 * toc.entries.len() + 5] = 1;
    let err = reader::parse_body(&b, end, flags).unwrap_err().to_string();
    assert!(err.contains("path offset"), "{err}");
}

#[test]
fn flipped_byte_in_chunk_is_detected() {
    let (mut blob, _) = write_layer(&sample(), 4096);
    let toc = open(&blob);
    let c = toc.entries[2].chunks[0];
    let at = c.compressed_offset as usize + c.compressed_len as usize / 2;
    blob[at] ^= 0x40;
    let frame = &blob[c.compressed_offset as usize..][..c.compressed_len as usize];
    assert!(decode_chunk(frame, &c).is_err());
}

#[test]
fn truncated_blob_has_no_footer() {
    let (blob, _) = write_layer(&sample(), 4096);
    let cut = &blob[..blob.len() - 10];
    let err = parse_footer(&cut[cut.len() - FOOTER_SIZE..], cut.len() as u64).unwrap_err();
    assert!(err.to_string().contains("not a strata layer"), "{err}");
}

#[test]
fn toc_offsets_outside_blob_are_refused() {
    let (blob, _) = write_layer(&sample(), 4096);
    let mut toc = open(&blob);
    let footer = parse_footer(&blob[blob.len() - FOOTER_SIZE..], blob.len() as u64).unwrap();
    toc.entries[2].chunks[0].compressed_offset = footer.toc_offset + 10_000;
    let frame = writer::encode_toc_frame(&toc).unwrap();
    // Even with a matching digest, the reader refuses chunks outside the data region.
    let err = parse_toc(&frame, &Sha256Digest::of(&frame), footer.toc_offset).unwrap_err();
    assert!(err.to_string().contains("outside the blob"), "{err}");
}

#[test]
fn toc_digest_mismatch_is_refused() {
    let (blob, _) = write_layer(&sample(), 4096);
    let footer = parse_footer(&blob[blob.len() - FOOTER_SIZE..], blob.len() as u64).unwrap();
    let frame = &blob[footer.toc_offset as usize..][..footer.toc_size as usize];
    let wrong = Sha256Digest::of(b"other");
    assert!(matches!(
        parse_toc(frame, &wrong, footer.toc_offset),
        Err(FormatError::TocDigestMismatch { .. })
    ));
}

#[test]
fn hostile_paths_are_refused_by_the_writer() {
    let mut w = LayerWriter::new(Vec::new(), 4096, 3).unwrap();
    assert!(w
        .add_entry(Entry::new(b"../../etc/x".to_vec(), EntryKind::Regular))
        .is_err());
    assert!(w
        .add_entry(Entry::new(b"/etc/x".to_vec(), EntryKind::Regular))
        .is_err());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn footer_parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200), size in any::<u64>()) {
        let _ = parse_footer(&bytes, size);
    }

    #[test]
    fn toc_parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..4096), end in any::<u64>()) {
        let _ = parse_toc_unverified(&bytes, end);
        for flags in [FIRST_LAYOUT, DEFAULT_TOC_FLAGS, TOC_FLAG_BATCHES, TOC_FLAG_COLUMNS] {
            let _ = reader::parse_body(&bytes, end, flags);
        }
    }

    #[test]
    fn mutated_toc_body_never_panics(pos in any::<prop::sample::Index>(), val in any::<u8>(), end in any::<u64>()) {
        let (blob, _) = write_layer(&sample(), 4096);
        let toc = open(&blob);
        for flags in [DEFAULT_TOC_FLAGS, FIRST_LAYOUT] {
            let mut body = writer::encode_toc_body(&toc, flags).unwrap_or_default();
            if body.is_empty() {
                continue; // batched files cannot be written in the first layout
            }
            let i = pos.index(body.len());
            body[i] = val;
            let _ = reader::parse_body(&body, end, flags);
        }
    }

    #[test]
    fn random_files_round_trip(files in proptest::collection::vec((
        "[a-z]{1,12}", prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..20_000),
            proptest::collection::vec(any::<u8>(), 0..600),
        ], 0u32..0o7777), 1..40)) {
        let mut entries = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for (name, data, mode) in files {
            if !seen.insert(name.clone()) { continue; }
            let mut e = Entry::new(name.into_bytes(), EntryKind::Regular);
            e.mode = mode;
            entries.push((e, data));
        }
        let (blob, _) = write_layer(&entries, 1000);
        let toc = open(&blob);
        for ((want, data), got) in entries.iter().zip(&toc.entries) {
            prop_assert_eq!(&want.path, &got.path);
            prop_assert_eq!(want.mode, got.mode);
            prop_assert_eq!(&read_file(&blob, got), data);
        }
    }
}
