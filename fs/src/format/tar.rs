//! Encoding of tar headers for strata layers.
//!
//! strata writes its own headers (rather than copying the source's) so that every layer has one
//! canonical shape: POSIX ustar headers, preceded by a PAX extended header when a value does not
//! fit (long names, large ids or sizes, sub-second mtimes, xattrs).

use super::types::{Entry, EntryKind};
use super::{FormatError, Result};

pub const BLOCK: usize = 512;

/// Bytes of zero padding that follow `size` bytes of file data.
pub fn padding(size: u64) -> usize {
    let rem = (size % BLOCK as u64) as usize;
    if rem == 0 {
        0
    } else {
        BLOCK - rem
    }
}

/// The end-of-archive marker: two zero blocks.
pub const END_OF_ARCHIVE: [u8; 2 * BLOCK] = [0; 2 * BLOCK];

/// Encodes the tar header block(s) for `entry` (PAX header first when needed).
pub fn encode_header(entry: &Entry) -> Result<Vec<u8>> {
    let invalid = |reason: &str| FormatError::InvalidEntry {
        path: String::from_utf8_lossy(&entry.path).into_owned(),
        reason: reason.to_string(),
    };
    let mut name = if entry.path.is_empty() {
        b".".to_vec()
    } else {
        entry.path.clone()
    };
    if entry.kind == EntryKind::Directory {
        name.push(b'/');
    }
    let mut pax: Vec<u8> = Vec::new();
    if name.len() > 100 {
        pax_record(&mut pax, b"path", &name);
    }
    if entry.link.len() > 100 {
        pax_record(&mut pax, b"linkpath", &entry.link);
    }
    let size = if entry.kind == EntryKind::Regular {
        entry.size
    } else {
        0
    };
    const MAX_OCTAL_7: u64 = 0o7777777;
    const MAX_OCTAL_11: u64 = 0o77777777777;
    if u64::from(entry.uid) > MAX_OCTAL_7 {
        pax_record(&mut pax, b"uid", entry.uid.to_string().as_bytes());
    }
    if u64::from(entry.gid) > MAX_OCTAL_7 {
        pax_record(&mut pax, b"gid", entry.gid.to_string().as_bytes());
    }
    if size > MAX_OCTAL_11 {
        pax_record(&mut pax, b"size", size.to_string().as_bytes());
    }
    let mtime_fits = entry.mtime_sec >= 0 && (entry.mtime_sec as u64) <= MAX_OCTAL_11;
    if entry.mtime_nsec != 0 || !mtime_fits {
        if entry.mtime_nsec >= 1_000_000_000 {
            return Err(invalid("mtime nanoseconds out of range"));
        }
        let v = if entry.mtime_nsec == 0 {
            entry.mtime_sec.to_string()
        } else if entry.mtime_sec >= 0 {
            format!("{}.{:09}", entry.mtime_sec, entry.mtime_nsec)
        } else {
            // PAX times are a decimal number: -1.25 is 1.25 s before the epoch.
            let total = i128::from(entry.mtime_sec) * 1_000_000_000 + i128::from(entry.mtime_nsec);
            let abs = total.unsigned_abs();
            format!("-{}.{:09}", abs / 1_000_000_000, abs % 1_000_000_000)
        };
        pax_record(&mut pax, b"mtime", v.as_bytes());
    }
    for (k, v) in &entry.xattrs {
        if k.is_empty() || k.contains(&b'=') || k.contains(&0) {
            return Err(invalid("xattr name is empty or contains '=' or NUL"));
        }
        let mut key = b"SCHILY.xattr.".to_vec();
        key.extend_from_slice(k);
        pax_record(&mut pax, &key, v);
    }

    let mut out = Vec::with_capacity(BLOCK * 3);
    if !pax.is_empty() {
        let mut h = [0u8; BLOCK];
        put_bytes(&mut h[0..100], b"././@PaxHeader");
        put_octal(&mut h[100..108], 0o644);
        put_octal(&mut h[108..116], 0);
        put_octal(&mut h[116..124], 0);
        put_octal(&mut h[124..136], pax.len() as u64);
        put_octal(&mut h[136..148], 0);
        h[156] = b'x';
        finish_ustar(&mut h);
        out.extend_from_slice(&h);
        let pad = padding(pax.len() as u64);
        out.extend_from_slice(&pax);
        out.resize(out.len() + pad, 0);
    }

    let mut h = [0u8; BLOCK];
    put_bytes(&mut h[0..100], &name[..name.len().min(100)]);
    put_octal(&mut h[100..108], u64::from(entry.mode & 0o7777));
    put_octal(&mut h[108..116], u64::from(entry.uid).min(MAX_OCTAL_7));
    put_octal(&mut h[116..124], u64::from(entry.gid).min(MAX_OCTAL_7));
    put_octal(&mut h[124..136], if size > MAX_OCTAL_11 { 0 } else { size });
    put_octal(
        &mut h[136..148],
        if mtime_fits {
            entry.mtime_sec as u64
        } else {
            0
        },
    );
    h[156] = match entry.kind {
        EntryKind::Regular => b'0',
        EntryKind::Hardlink => b'1',
        EntryKind::Symlink => b'2',
        EntryKind::CharDevice => b'3',
        EntryKind::BlockDevice => b'4',
        EntryKind::Directory => b'5',
        EntryKind::Fifo => b'6',
    };
    put_bytes(&mut h[157..257], &entry.link[..entry.link.len().min(100)]);
    if matches!(entry.kind, EntryKind::CharDevice | EntryKind::BlockDevice) {
        put_number(&mut h[329..337], u64::from(entry.dev_major));
        put_number(&mut h[337..345], u64::from(entry.dev_minor));
    }
    finish_ustar(&mut h);
    out.extend_from_slice(&h);
    Ok(out)
}

fn pax_record(out: &mut Vec<u8>, key: &[u8], value: &[u8]) {
    // "<len> <key>=<value>\n", where <len> counts the whole record including its own digits.
    let body = key.len() + value.len() + 3; // ' ', '=', '\n'
    let mut len = body + 1;
    while body + len.to_string().len() != len {
        len = body + len.to_string().len();
    }
    out.extend_from_slice(len.to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(key);
    out.push(b'=');
    out.extend_from_slice(value);
    out.push(b'\n');
}

fn put_bytes(field: &mut [u8], v: &[u8]) {
    field[..v.len()].copy_from_slice(v);
}

/// Zero-padded octal, NUL-terminated, filling the field.
fn put_octal(field: &mut [u8], v: u64) {
    let digits = field.len() - 1;
    let s = format!("{v:0digits$o}");
    field[..digits].copy_from_slice(&s.as_bytes()[s.len() - digits..]);
    field[digits] = 0;
}

/// Octal when it fits, else GNU base-256 (high bit set, big-endian).
fn put_number(field: &mut [u8], v: u64) {
    let digits = field.len() - 1;
    if v < 8u64.pow(digits as u32) {
        put_octal(field, v);
    } else {
        field.fill(0);
        let bytes = v.to_be_bytes();
        let n = field.len();
        field[n - 8..].copy_from_slice(&bytes);
        field[0] |= 0x80;
    }
}

fn finish_ustar(h: &mut [u8; BLOCK]) {
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].fill(b' ');
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    let s = format!("{sum:06o}\0 ");
    h[148..156].copy_from_slice(s.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_record_length_counts_itself() {
        let mut out = Vec::new();
        pax_record(&mut out, b"path", &[b'a'; 95]);
        let s = String::from_utf8(out.clone()).unwrap();
        let (len, _) = s.split_once(' ').unwrap();
        assert_eq!(len.parse::<usize>().unwrap(), out.len());
    }

    #[test]
    fn header_checksum_is_valid() {
        let mut e = Entry::new(b"a/b".to_vec(), EntryKind::Regular);
        e.size = 5;
        let h = encode_header(&e).unwrap();
        assert_eq!(h.len(), BLOCK);
        let mut copy = h.clone();
        copy[148..156].fill(b' ');
        let sum: u32 = copy.iter().map(|&b| u32::from(b)).sum();
        let stored = u32::from_str_radix(std::str::from_utf8(&h[148..154]).unwrap(), 8).unwrap();
        assert_eq!(sum, stored);
    }
}
