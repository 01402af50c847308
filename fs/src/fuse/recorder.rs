//! The access-profile recorder of a mount (`--record-profile`): which files a workload read
//! first, and which byte ranges of each ([`crate::profile`] has the format).

use std::time::UNIX_EPOCH;

use parking_lot::Mutex;

use crate::tree::{Ino, Tree};

/// Records the files first read, in order, and the ranges read of each (an access profile).
pub(super) struct Recorder {
    pub(super) path: std::path::PathBuf,
    pub(super) seen: Mutex<crate::profile::Recording<Ino>>,
}

impl Recorder {
    pub(super) fn note_read(&self, ino: Ino, offset: u64, size: u32, file_size: u64) {
        self.seen
            .lock()
            .read(ino, offset, u64::from(size), file_size);
    }

    pub(super) fn note_whole(&self, ino: Ino) {
        self.seen.lock().whole(ino);
    }

    /// Writes the profile ([`crate::profile`]: paths as they are in the image, with ranges).
    pub(super) fn save(&self, tree: &Tree) -> std::io::Result<()> {
        let paths = tree.paths();
        let out = self.seen.lock().render(|ino| paths.get(&ino).cloned());
        // The daemon runs as root and the path is the client's: never write through a link
        // someone planted; a fresh private file, renamed over the target.
        let name = self
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = self.path.with_file_name(format!(
            ".{name}.{}-{}.tmp",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        ));
        let mut f = crate::store::private_new_file(&tmp)?;
        let written = std::io::Write::write_all(&mut f, &out)
            .and_then(|()| f.sync_all())
            .and_then(|()| std::fs::rename(&tmp, &self.path));
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        written
    }
}
