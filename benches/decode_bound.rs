//! `strata-decode-bound ROOT IMAGE [THREADS]`: the CPU bound of a first read. Decodes and
//! verifies every chunk of a local strata image on every core, with no FUSE and no caches
//! (what a cold first read of the whole image must at least cost), and prints the seconds and
//! the bytes decoded.

use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let (Some(root), Some(image)) = (args.get(1), args.get(2)) else {
        return Err("usage: strata-decode-bound ROOT IMAGE [THREADS]".into());
    };
    let threads = match args.get(3) {
        Some(t) => t.parse()?,
        None => std::thread::available_parallelism().map_or(2, |n| n.get()),
    };
    let store = strata_fs::store::Store::open(root)?;
    let opened = strata_fs::image::open_local(&store, image)?;
    // Every chunk once (as a mount reads each file once), with the blob it lives in.
    let mut work = Vec::new();
    let mut files = Vec::new();
    for layer in &opened.layers {
        let file = store.open_blob(&layer.descriptor.digest)?;
        files.push(file);
        // The files of a batch share one frame: decoded once.
        for c in layer.toc.frames() {
            work.push((files.len() - 1, *c));
        }
    }
    let next = AtomicUsize::new(0);
    let bytes = AtomicUsize::new(0);
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                let mut frame = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some((f, c)) = work.get(i) else { break };
                    frame.resize(c.compressed_len as usize, 0);
                    if files[*f]
                        .read_exact_at(&mut frame, c.compressed_offset)
                        .is_err()
                    {
                        continue;
                    }
                    if let Ok(d) = strata_fs::format::decode_chunk(&frame, c) {
                        bytes.fetch_add(d.len(), Ordering::Relaxed);
                    }
                }
            });
        }
    });
    println!(
        "{:.4} {}",
        start.elapsed().as_secs_f64(),
        bytes.load(Ordering::Relaxed)
    );
    Ok(())
}
