//! Human-readable listing of a TOC: the body of `strata inspect --toc` and of golden tests.

use std::fmt::Write as _;

use super::types::{EntryKind, Toc};

fn show(bytes: &[u8]) -> String {
    // Escape non-UTF-8 and control bytes so a dump is one line per entry and diffable.
    let mut out = String::new();
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            if c.is_control() || c == '\\' {
                out.extend(c.escape_default());
            } else {
                out.push(c);
            }
        }
        for b in chunk.invalid() {
            let _ = write!(out, "\\x{b:02x}");
        }
    }
    out
}

/// One line per entry, then one indented line per chunk.
pub fn dump(toc: &Toc) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "toc chunk_size={} entries={} chunks={} bytes={}",
        toc.chunk_size,
        toc.entries.len(),
        toc.chunk_count(),
        toc.uncompressed_bytes()
    );
    for e in &toc.entries {
        let path = if e.path.is_empty() {
            ".".to_string()
        } else {
            show(&e.path)
        };
        let _ = write!(
            s,
            "{:<8} {:04o} {}:{} size={} mtime={}.{:09} {}",
            e.kind.name(),
            e.mode,
            e.uid,
            e.gid,
            e.size,
            e.mtime_sec,
            e.mtime_nsec,
            path
        );
        match e.kind {
            EntryKind::Symlink | EntryKind::Hardlink => {
                let _ = write!(s, " -> {}", show(&e.link));
            }
            EntryKind::CharDevice | EntryKind::BlockDevice => {
                let _ = write!(s, " dev={},{}", e.dev_major, e.dev_minor);
            }
            _ => {}
        }
        for (k, v) in &e.xattrs {
            let _ = write!(s, " xattr:{}={}", show(k), show(v));
        }
        s.push('\n');
        for c in &e.chunks {
            let _ = write!(
                s,
                "  chunk file@{}+{} blob@{}+{} {}",
                c.file_offset, c.data_len, c.compressed_offset, c.compressed_len, c.digest
            );
            if c.is_batched() {
                let _ = write!(s, " batch@{}/{}", c.data_offset, c.uncompressed_len);
            }
            s.push('\n');
        }
    }
    s
}
