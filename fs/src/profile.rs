//! Access profiles: the files a workload read first, in the order it first read them, and which
//! byte ranges of each.
//!
//! A profile is text, one file per line:
//!
//! ```text
//! bin/busybox<TAB>0+16384,49152+32768
//! etc/passwd
//! ```
//!
//! A line is a path in the image (bytes as they are in the image, `/`-separated, a leading `/`
//! optional), optionally followed by a TAB and the ranges read: `OFFSET+LENGTH` in bytes of the
//! file, comma-separated. A line without ranges stands for the whole file. A line that names a
//! file as it stands is that whole file; otherwise the text after its last TAB, when it parses as
//! ranges, gives the ranges of the path before it (so paths may hold TABs; they cannot hold
//! newlines, and the recorder leaves such files out). Readers that predate ranges look the whole
//! line up, find nothing, and skip it.

use std::collections::HashMap;

/// Ranges kept per file before the file counts as read whole (a random reader of a big file).
pub const MAX_RANGES: usize = 1024;

/// Byte ranges of a file: `(offset, length)`.
pub type Ranges = Vec<(u64, u64)>;

/// One line of a profile.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Line {
    /// The line as written (tried first as a path).
    pub text: Vec<u8>,
    /// The path and ranges the line gives when its text is not a path itself.
    pub ranged: Option<(Vec<u8>, Ranges)>,
}

/// Parses a profile (empty lines skipped).
pub fn parse(text: &[u8]) -> Vec<Line> {
    text.split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| Line {
            text: l.to_vec(),
            ranged: l.iter().rposition(|&b| b == b'\t').and_then(|tab| {
                let ranges = parse_ranges(std::str::from_utf8(&l[tab + 1..]).ok()?)?;
                Some((l[..tab].to_vec(), ranges))
            }),
        })
        .collect()
}

fn parse_ranges(s: &str) -> Option<Ranges> {
    s.split(',')
        .map(|r| {
            let (off, len) = r.split_once('+')?;
            let (off, len) = (off.parse::<u64>().ok()?, len.parse::<u64>().ok()?);
            off.checked_add(len)?;
            Some((off, len))
        })
        .collect()
}

/// What a workload read of one file.
#[derive(Clone, Debug, Default)]
pub enum Reads {
    /// Everything (opened for passthrough, or read in too many pieces).
    #[default]
    Whole,
    /// Sorted, disjoint, non-adjacent `(start, end)` byte spans.
    Spans(Vec<(u64, u64)>),
}

impl Reads {
    fn add(&mut self, start: u64, end: u64) {
        let Reads::Spans(spans) = self else { return };
        // Where the new span goes; it swallows every span it touches.
        let from = spans.partition_point(|s| s.1 < start);
        let to = spans.partition_point(|s| s.0 <= end);
        let (mut lo, mut hi) = (start, end);
        if from < to {
            lo = lo.min(spans[from].0);
            hi = hi.max(spans[to - 1].1);
        }
        spans.splice(from..to, std::iter::once((lo, hi)));
        if spans.len() > MAX_RANGES {
            *self = Reads::Whole;
        }
    }
}

/// Records first reads in order (the workload's side of a profile).
#[derive(Debug, Default)]
pub struct Recording<K> {
    order: Vec<K>,
    reads: HashMap<K, Reads>,
}

impl<K: Copy + Eq + std::hash::Hash> Recording<K> {
    /// `len` bytes at `offset` of `file`, which holds `size` bytes, were read (bytes past its
    /// end are not counted; a file read from start to end counts as read whole).
    pub fn read(&mut self, file: K, offset: u64, len: u64, size: u64) {
        let end = offset.saturating_add(len).min(size);
        if offset >= end {
            return;
        }
        let r = match self.reads.get_mut(&file) {
            Some(r) => r,
            None => {
                self.order.push(file);
                self.reads.entry(file).or_insert(Reads::Spans(Vec::new()))
            }
        };
        r.add(offset, end);
        if matches!(r, Reads::Spans(s) if s.as_slice() == [(0, size)]) {
            *r = Reads::Whole;
        }
    }

    /// All of `file` is wanted.
    pub fn whole(&mut self, file: K) {
        if self.reads.insert(file, Reads::Whole).is_none() {
            self.order.push(file);
        }
    }

    /// The profile's text, with `path` naming each file (files it has no path for, or whose
    /// path holds a newline, are left out).
    pub fn render(&self, path: impl Fn(K) -> Option<Vec<u8>>) -> Vec<u8> {
        let mut out = Vec::new();
        for f in &self.order {
            let Some(p) = path(*f).filter(|p| !p.contains(&b'\n') && !p.is_empty()) else {
                continue;
            };
            out.extend_from_slice(&p);
            if let Some(Reads::Spans(spans)) = self.reads.get(f) {
                let ranges: Vec<String> = spans
                    .iter()
                    .map(|(s, e)| format!("{s}+{}", e - s))
                    .collect();
                out.push(b'\t');
                out.extend_from_slice(ranges.join(",").as_bytes());
            }
            out.push(b'\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_merge_into_spans_in_first_read_order() {
        let mut r = Recording::default();
        let size = 1 << 20;
        r.read(2u64, 4096, 4096, size);
        r.read(1, 0, 100, size);
        r.read(2, 0, 4096, size); // adjacent: joins
        r.read(2, 65536, 16384, size);
        r.read(2, 70000, 100, size); // inside
        r.whole(3);
        r.read(3, 0, 10, size); // whole stays whole
        r.read(4, size, 4096, size); // past the end: nothing
        let names = |f: u64| Some(format!("f{f}").into_bytes());
        assert_eq!(
            String::from_utf8(r.render(names)).unwrap(),
            "f2\t0+8192,65536+16384\nf1\t0+100\nf3\n"
        );
        // A span bridging two joins them.
        r.read(2, 8192, 57344, size);
        assert!(String::from_utf8(r.render(names))
            .unwrap()
            .starts_with("f2\t0+81920\n"));
        // Read to the end (the kernel asks for more than is left): the whole file.
        r.read(1, 100, 131072, 4000);
        r.read(1, 0, 100, 4000);
        assert!(String::from_utf8(r.render(names))
            .unwrap()
            .contains("\nf1\n"));
    }

    #[test]
    fn too_many_spans_mean_the_whole_file() {
        let mut r = Recording::default();
        for i in 0..=MAX_RANGES as u64 {
            r.read(7u64, i * 8192, 4096, u64::MAX);
        }
        assert_eq!(r.render(|_| Some(b"big".to_vec())), b"big\n");
    }

    #[test]
    fn lines_parse_with_and_without_ranges() {
        let p = parse(b"bin/sh\t0+4096,8192+100\netc/passwd\n\nodd\tname\nx\t1+\n");
        assert_eq!(
            p[0].ranged,
            Some((b"bin/sh".to_vec(), vec![(0, 4096), (8192, 100)]))
        );
        assert_eq!(p[1].ranged, None);
        assert_eq!(p[1].text, b"etc/passwd");
        // Not ranges: the whole line is the path.
        assert_eq!(p[2].ranged, None);
        assert_eq!(p[3].ranged, None);
        assert_eq!(p.len(), 4);
        // A path holding a TAB: split at the last one.
        let p = parse(b"a\tb\t0+1\n");
        assert_eq!(p[0].ranged, Some((b"a\tb".to_vec(), vec![(0, 1)])));
        // Overflowing ranges are not ranges.
        assert_eq!(parse(b"a\t18446744073709551615+2\n")[0].ranged, None);
    }

    #[test]
    fn files_without_a_path_or_with_a_newline_are_left_out() {
        let mut r = Recording::default();
        r.whole(1u64);
        r.whole(2);
        r.whole(3);
        let out = r.render(|f| match f {
            1 => None,
            2 => Some(b"a\nb".to_vec()),
            _ => Some(b"ok".to_vec()),
        });
        assert_eq!(out, b"ok\n");
    }
}
