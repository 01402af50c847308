#![allow(clippy::unwrap_used)] // benchmark code: a failure should abort loudly
//! Micro-benchmarks of the layer format:
//! - chunk decode + verify at several chunk sizes (with the compression ratio each achieves),
//!   the measurement behind the default chunk size;
//! - opening (parsing + validating) a 100k-entry TOC;
//! - merging a tree and looking paths up.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use strata_fs::format::writer::{encode_toc_frame, FrameCompressor};
use strata_fs::format::*;
use strata_fs::tree::Tree;
use strata_tests::image::{noise, text};

/// Real shared libraries from this machine when present (realistic to compress), else a
/// synthetic mix: 2/3 text-like, 1/3 incompressible.
fn corpus(len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(len);
    if let Ok(dir) = std::fs::read_dir("/usr/lib/x86_64-linux-gnu") {
        let mut files: Vec<_> = dir.filter_map(|e| e.ok()).map(|e| e.path()).collect();
        files.sort();
        for f in files.iter().filter(|p| p.to_string_lossy().contains(".so")) {
            if let Ok(b) = std::fs::read(f) {
                v.extend_from_slice(&b[..b.len().min(len - v.len())]);
            }
            if v.len() == len {
                eprintln!("corpus: real shared libraries");
                return v;
            }
        }
    }
    v.clear();
    v.extend(text(1, len * 2 / 3));
    v.extend(noise(2, len - v.len()));
    eprintln!("corpus: synthetic");
    v
}

fn chunk_size(c: &mut Criterion) {
    let data = corpus(16 << 20);
    let mut group = c.benchmark_group("chunk_decode_verify");
    group.sample_size(10);
    for size in [64usize << 10, 256 << 10, 512 << 10, 1 << 20, 4 << 20] {
        let mut comp = FrameCompressor::new(3).unwrap();
        let mut frames = Vec::new();
        let mut compressed = 0usize;
        for (i, piece) in data.chunks(size).enumerate() {
            let frame = comp.compress(piece).unwrap();
            compressed += frame.len();
            let chunk = Chunk::whole(
                0,
                frame.len() as u32,
                piece.len() as u32,
                (i * size) as u64,
                Sha256Digest::of(piece),
            );
            frames.push((frame, chunk));
        }
        eprintln!(
            "chunk {:>5} KiB: ratio {:.3} ({} frames)",
            size >> 10,
            data.len() as f64 / compressed as f64,
            frames.len()
        );
        group.throughput(Throughput::Bytes(data.len() as u64));
        group.bench_with_input(
            BenchmarkId::from_parameter(size >> 10),
            &frames,
            |b, frames| {
                b.iter(|| {
                    for (f, c) in frames {
                        black_box(decode_chunk(f, c).unwrap());
                    }
                })
            },
        );
    }
    group.finish();
}

fn big_toc(n: usize) -> Toc {
    let mut entries = Vec::with_capacity(n);
    entries.push(Entry::new(Vec::new(), EntryKind::Directory));
    for d in 0..(n / 1000) {
        entries.push(Entry::new(
            format!("usr/lib/d{d:03}").into_bytes(),
            EntryKind::Directory,
        ));
    }
    let mut off = 0u64;
    while entries.len() < n {
        let i = entries.len();
        let mut e = Entry::new(
            format!("usr/lib/d{:03}/file-{i}.py", (i / 1000) % (n / 1000)).into_bytes(),
            EntryKind::Regular,
        );
        e.size = 3000;
        e.mtime_sec = 1_700_000_000 + i as i64;
        e.chunks.push(Chunk::whole(
            off,
            1000,
            3000,
            0,
            Sha256Digest::of(&i.to_le_bytes()),
        ));
        off += 1500;
        entries.push(e);
    }
    Toc {
        chunk_size: 1 << 20,
        entries,
    }
}

fn toc_open(c: &mut Criterion) {
    let toc = big_toc(100_000);
    let frame = encode_toc_frame(&toc).unwrap();
    let digest = Sha256Digest::of(&frame);
    eprintln!("100k-entry TOC frame: {} bytes", frame.len());
    let mut group = c.benchmark_group("toc");
    group.sample_size(10);
    group.bench_function("open_100k_entries", |b| {
        b.iter(|| black_box(parse_toc(&frame, &digest, u64::MAX / 2).unwrap()))
    });
    group.bench_function("build_tree_100k_entries", |b| {
        b.iter(|| black_box(Tree::build(vec![toc.clone()]).unwrap()))
    });
    let tree = Tree::build(vec![toc.clone()]).unwrap();
    group.bench_function("lookup_path", |b| {
        b.iter(|| black_box(tree.lookup_path(b"usr/lib/d050/file-50500.py")))
    });
    group.finish();
}

criterion_group!(benches, chunk_size, toc_open);
criterion_main!(benches);
