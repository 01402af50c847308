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

/// Ranges of one line parsed before the line counts as the whole file, before merging.
const RAW_RANGES: usize = 8 * MAX_RANGES;

/// Lines of a profile read; the rest is ignored (a profile may come from a registry).
pub const MAX_LINES: usize = 1 << 20;

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

/// Parses a profile (empty lines skipped, at most [`MAX_LINES`]). A line's ranges come out
/// sorted and merged; more than [`MAX_RANGES`] of them stand for the whole file.
pub fn parse(text: &[u8]) -> Vec<Line> {
    text.split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .take(MAX_LINES)
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
    let number = |n: &str| {
        (!n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
            .then(|| n.parse::<u64>().ok())
            .flatten()
    };
    let mut spans: Vec<(u64, u64)> = Vec::new();
    for r in s.split(',') {
        let (off, len) = r.split_once('+')?;
        let (off, len) = (number(off)?, number(len)?);
        let end = off.checked_add(len)?;
        if spans.len() >= RAW_RANGES {
            // Whatever else the line holds: the whole file (and no memory for the rest).
            return Some(vec![(0, u64::MAX)]);
        }
        if off < end {
            spans.push((off, end));
        }
    }
    spans.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (start, end) in spans {
        match merged.last_mut() {
            Some(last) if start <= last.1 => last.1 = last.1.max(end),
            _ => merged.push((start, end)),
        }
    }
    if merged.len() > MAX_RANGES {
        return Some(vec![(0, u64::MAX)]);
    }
    Some(merged.into_iter().map(|(s, e)| (s, e - s)).collect())
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
        // Overflowing ranges, signs and empty numbers are not ranges.
        assert_eq!(parse(b"a\t18446744073709551615+2\n")[0].ranged, None);
        assert_eq!(parse(b"a\t0++5\n")[0].ranged, None);
        assert_eq!(parse(b"a\t+5\n")[0].ranged, None);
        // Sorted and merged, empty ones dropped; too many: the whole file.
        assert_eq!(
            parse(b"a\t100+10,0+10,5+10,200+0\n")[0].ranged,
            Some((b"a".to_vec(), vec![(0, 15), (100, 10)]))
        );
        let many: Vec<String> = (0..=MAX_RANGES).map(|i| format!("{}+1", i * 10)).collect();
        let line = format!("a\t{}\n", many.join(","));
        assert_eq!(
            parse(line.as_bytes())[0].ranged,
            Some((b"a".to_vec(), vec![(0, u64::MAX)]))
        );
        // However they would merge, a line of very many ranges is not held in memory.
        let line = format!("a\t{}\n", vec!["0+1"; RAW_RANGES + 1].join(","));
        assert_eq!(
            parse(line.as_bytes())[0].ranged,
            Some((b"a".to_vec(), vec![(0, u64::MAX)]))
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]
        /// Any bytes parse (a profile comes from a registry); ranges come out sorted, disjoint,
        /// within bounds.
        #[test]
        fn any_bytes_parse(text in proptest::collection::vec(
            proptest::prop_oneof![
                proptest::prelude::Just(b'\t'), proptest::prelude::Just(b'\n'),
                proptest::prelude::Just(b'+'), proptest::prelude::Just(b','),
                b'0'..=b'9', proptest::prelude::any::<u8>()],
            0..200))
        {
            for line in parse(&text) {
                if let Some((_, ranges)) = line.ranged {
                    for w in ranges.windows(2) {
                        proptest::prop_assert!(w[0].0.saturating_add(w[0].1) < w[1].0);
                    }
                    for (off, len) in ranges {
                        proptest::prop_assert!(len > 0 && off.checked_add(len).is_some());
                    }
                }
            }
        }

        /// What the recorder writes parses back to the same spans.
        #[test]
        fn recordings_parse_back(reads in proptest::collection::vec((0u64..1 << 20, 1u64..1 << 16), 1..40)) {
            let mut r = Recording::default();
            for (off, len) in &reads {
                r.read(1u64, *off, *len, u64::MAX);
            }
            let text = r.render(|_| Some(b"f".to_vec()));
            let lines = parse(&text);
            proptest::prop_assert_eq!(lines.len(), 1);
            let Some(Reads::Spans(spans)) = r.reads.get(&1) else {
                return Err(proptest::test_runner::TestCaseError::fail("not spans"));
            };
            let want: Ranges = spans.iter().map(|(s, e)| (*s, e - s)).collect();
            proptest::prop_assert_eq!(lines[0].ranged.clone(), Some((b"f".to_vec(), want)));
        }
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
