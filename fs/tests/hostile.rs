#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failure should abort loudly
//! Hostile layers cost bounded memory: a tiny TOC that declares millions of entries is refused
//! before they are decoded, a TOC larger than the limit is refused before it is fetched, and a
//! chunk claiming a huge compressed length is refused at parse time.

use std::time::{Duration, Instant};

use strata_fs::blob::{read_toc_frame, BlobSource, TocHint};
use strata_fs::format::reader::parse_toc_unverified;
use strata_fs::format::*;

/// A TOC frame whose body declares `entries` entries of zeros (zstd squeezes them to nothing).
fn frame_declaring(entries: u32) -> Vec<u8> {
    use std::io::Write;
    let mut header = vec![0u8; BODY_HEADER_SIZE];
    header[0..4].copy_from_slice(&entries.to_le_bytes());
    let body_len = (BODY_HEADER_SIZE + entries as usize * ENTRY_RECORD_SIZE) as u64;
    // Streamed: the test never holds the inflated body either.
    let mut enc = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
    enc.write_all(&header).unwrap();
    let zeros = vec![0u8; 1 << 20];
    let mut left = body_len - BODY_HEADER_SIZE as u64;
    while left > 0 {
        let n = left.min(zeros.len() as u64) as usize;
        enc.write_all(&zeros[..n]).unwrap();
        left -= n as u64;
    }
    let compressed = enc.finish().unwrap();
    let mut payload = Vec::new();
    payload.extend_from_slice(b"STRATOC\0");
    payload.extend_from_slice(&TOC_VERSION.to_le_bytes());
    payload.extend_from_slice(&TOC_FLAG_ZSTD.to_le_bytes());
    payload.extend_from_slice(&0u32.to_le_bytes());
    payload.extend_from_slice(&body_len.to_le_bytes());
    payload.extend_from_slice(&0u64.to_le_bytes());
    payload.extend_from_slice(&compressed);
    let mut frame = Vec::new();
    frame.extend_from_slice(&SKIPPABLE_MAGIC.to_le_bytes());
    frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    frame.extend_from_slice(&payload);
    frame
}

#[test]
fn millions_of_declared_entries_are_refused_before_decoding() {
    let frame = frame_declaring(5_000_000);
    assert!(frame.len() < 100_000, "{} bytes", frame.len());
    let start = Instant::now();
    let err = parse_toc_unverified(&frame, u64::MAX / 2).unwrap_err();
    assert!(
        matches!(
            err,
            FormatError::TooManyEntries {
                entries: 5_000_000,
                ..
            }
        ),
        "{err}"
    );
    // Refused from the body header alone: no 400 MB body was inflated.
    assert!(
        start.elapsed() < Duration::from_millis(500),
        "{:?}",
        start.elapsed()
    );
    let limited = parse_toc_limited(&frame, &Sha256Digest::of(&frame), u64::MAX / 2, 10);
    assert!(matches!(
        limited,
        Err(FormatError::TooManyEntries { limit: 10, .. })
    ));
}

struct Claims(u64);

impl BlobSource for Claims {
    fn size(&self) -> u64 {
        self.0
    }
    fn read_range(&self, _offset: u64, len: u64) -> std::io::Result<Vec<u8>> {
        panic!("read {len} bytes of a blob whose TOC size is absurd")
    }
}

#[test]
fn a_toc_size_of_many_gigabytes_is_refused_before_any_read() {
    let size = 100u64 << 30;
    let hint = TocHint {
        digest: Some(Sha256Digest([1; 32])),
        location: Some((1 << 20, size - (1 << 20) - FOOTER_SIZE as u64)),
        max_entries: None,
    };
    let err = read_toc_frame(&Claims(size), "sha256:x", &hint).unwrap_err();
    assert!(err.to_string().contains("limit"), "{err}");
}
