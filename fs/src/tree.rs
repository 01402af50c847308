//! The merged, read-only view of a layer stack, with OCI layer semantics: later layers override
//! earlier ones, `.wh.NAME` deletes NAME from lower layers, `.wh..wh..opq` hides every lower
//! entry of its directory, whiteout files never show, hard links share one inode.
//!
//! [`Tree::build_lower`] shows one layer alone in the form kernel overlayfs reads a lower layer
//! in (containerd's snapshots: one directory per layer): a whiteout is a 0/0 character device
//! named as the entry it deletes, an opaque directory carries `trusted.overlay.opaque=y`.

use std::collections::HashMap;

use crate::format::{Entry, EntryKind, Toc};

pub type Ino = u64;
pub const ROOT_INO: Ino = 1;

const WHITEOUT_PREFIX: &[u8] = b".wh.";
const OPAQUE: &[u8] = b".wh..wh..opq";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TreeError {
    #[error("layer {layer}: entry {path:?} {reason}")]
    Invalid {
        layer: usize,
        path: String,
        reason: String,
    },
}

/// Where a regular file's bytes are: entry `entry` of layer `layer`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataRef {
    pub layer: u32,
    pub entry: u32,
}

/// One inode of the merged tree.
#[derive(Clone, Debug)]
pub struct Node {
    pub kind: EntryKind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub mtime_sec: i64,
    pub mtime_nsec: u32,
    pub dev_major: u32,
    pub dev_minor: u32,
    pub nlink: u32,
    pub parent: Ino,
    /// Symlink target.
    pub link: Vec<u8>,
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    pub data: Option<DataRef>,
    /// Directory children, sorted by name.
    pub children: Vec<(Box<[u8]>, Ino)>,
    /// An opaque directory of a layer shown alone ([`Tree::build_lower`]): it hides the entries
    /// of the layers below it in an overlay.
    pub opaque: bool,
}

/// The merged tree of a layer stack; inode `n` is `nodes[n - 1]`.
pub struct Tree {
    nodes: Vec<Node>,
    /// The layers' TOCs, for file data: their entries keep kind, size and chunks only (names,
    /// link targets and xattrs live in the nodes).
    pub layers: Vec<Toc>,
}

struct Building {
    node: Node,
    children: HashMap<Vec<u8>, usize>,
}

fn new_node(e: &Entry, layer: usize, index: usize) -> Node {
    Node {
        kind: e.kind,
        mode: e.mode & 0o7777,
        uid: e.uid,
        gid: e.gid,
        size: if e.kind == EntryKind::Regular {
            e.size
        } else {
            0
        },
        mtime_sec: e.mtime_sec,
        mtime_nsec: e.mtime_nsec,
        dev_major: e.dev_major,
        dev_minor: e.dev_minor,
        nlink: 1,
        parent: 0,
        link: if e.kind == EntryKind::Symlink {
            e.link.clone()
        } else {
            Vec::new()
        },
        xattrs: e.xattrs.clone(),
        data: (e.kind == EntryKind::Regular && e.size > 0).then_some(DataRef {
            layer: layer as u32,
            entry: index as u32,
        }),
        children: Vec::new(),
        opaque: false,
    }
}

fn implicit_dir() -> Node {
    let mut e = Entry::new(Vec::new(), EntryKind::Directory);
    e.mode = 0o755;
    new_node(&e, 0, 0)
}

fn split(path: &[u8]) -> (&[u8], &[u8]) {
    match path.iter().rposition(|&b| b == b'/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => (&[], path),
    }
}

struct Builder<'a> {
    nodes: Vec<Building>,
    layer: usize,
    /// Where directories missing from a layer shown alone take their attributes from: the
    /// merged layers below it (overlayfs takes a directory's attributes from the topmost
    /// layer that has it, so a plain 0755 root-owned one would change them).
    below: Option<&'a Tree>,
}

impl Builder<'_> {
    fn err(&self, path: &[u8], reason: impl Into<String>) -> TreeError {
        TreeError::Invalid {
            layer: self.layer,
            path: String::from_utf8_lossy(path).into_owned(),
            reason: reason.into(),
        }
    }

    fn push(&mut self, node: Node) -> usize {
        self.nodes.push(Building {
            node,
            children: HashMap::new(),
        });
        self.nodes.len() - 1
    }

    /// Finds `path`; `None` if it (or a parent) does not exist or a parent is not a directory.
    fn lookup(&self, path: &[u8]) -> Option<usize> {
        let mut cur = 0;
        if path.is_empty() {
            return Some(0);
        }
        for comp in path.split(|&b| b == b'/') {
            let n = &self.nodes[cur];
            if n.node.kind != EntryKind::Directory {
                return None;
            }
            cur = *n.children.get(comp)?;
        }
        Some(cur)
    }

    /// Finds or creates the directory `path` (creating missing parents as plain directories).
    fn ensure_dir(&mut self, path: &[u8], for_entry: &[u8]) -> Result<usize, TreeError> {
        let mut cur = 0;
        if path.is_empty() {
            return Ok(0);
        }
        let mut end = 0;
        for comp in path.split(|&b| b == b'/') {
            end += comp.len();
            let prefix = &path[..end];
            end += 1;
            cur = match self.nodes[cur].children.get(comp) {
                Some(&c) => {
                    if self.nodes[c].node.kind != EntryKind::Directory {
                        return Err(self.err(
                            for_entry,
                            format!(
                                "has a parent {:?} that is not a directory (paths never follow symlinks)",
                                String::from_utf8_lossy(path)
                            ),
                        ));
                    }
                    c
                }
                None => {
                    let mut dir = implicit_dir();
                    if let Some(n) = self
                        .below
                        .and_then(|t| t.get(t.lookup_path(prefix)?))
                        .filter(|n| n.kind == EntryKind::Directory)
                    {
                        dir.mode = n.mode;
                        dir.uid = n.uid;
                        dir.gid = n.gid;
                        dir.mtime_sec = n.mtime_sec;
                        dir.mtime_nsec = n.mtime_nsec;
                        dir.xattrs = n.xattrs.clone();
                    }
                    let d = self.push(dir);
                    self.nodes[cur].children.insert(comp.to_vec(), d);
                    d
                }
            };
        }
        Ok(cur)
    }

    fn apply_whiteouts(&mut self, toc: &Toc) {
        for e in &toc.entries {
            let (dir, name) = split(&e.path);
            if name == OPAQUE {
                if let Some(d) = self.lookup(dir) {
                    if self.nodes[d].node.kind == EntryKind::Directory {
                        self.nodes[d].children.clear();
                    }
                }
            } else if let Some(target) = name.strip_prefix(WHITEOUT_PREFIX) {
                if let Some(d) = self.lookup(dir) {
                    if self.nodes[d].node.kind == EntryKind::Directory {
                        self.nodes[d].children.remove(target);
                    }
                }
            }
        }
    }

    fn apply_entries(&mut self, toc: &Toc) -> Result<(), TreeError> {
        for (index, e) in toc.entries.iter().enumerate() {
            let (dir, name) = split(&e.path);
            if name.starts_with(WHITEOUT_PREFIX) {
                continue;
            }
            if e.path.is_empty() {
                if e.kind == EntryKind::Directory {
                    let keep = std::mem::take(&mut self.nodes[0].children);
                    self.nodes[0].node = new_node(e, self.layer, index);
                    self.nodes[0].children = keep;
                }
                continue;
            }
            let parent = self.ensure_dir(dir, &e.path)?;
            let existing = self.nodes[parent].children.get(name).copied();
            let id = match e.kind {
                EntryKind::Directory => match existing {
                    Some(x) if self.nodes[x].node.kind == EntryKind::Directory => {
                        self.nodes[x].node = new_node(e, self.layer, index);
                        x
                    }
                    _ => self.push(new_node(e, self.layer, index)),
                },
                EntryKind::Hardlink => {
                    let target = self.lookup(&e.link).ok_or_else(|| {
                        self.err(
                            &e.path,
                            format!(
                                "is a hard link to {:?}, which does not exist",
                                String::from_utf8_lossy(&e.link)
                            ),
                        )
                    })?;
                    if self.nodes[target].node.kind == EntryKind::Directory {
                        return Err(self.err(&e.path, "is a hard link to a directory"));
                    }
                    target
                }
                _ => self.push(new_node(e, self.layer, index)),
            };
            self.nodes[parent].children.insert(name.to_vec(), id);
        }
        Ok(())
    }
}

impl Tree {
    /// Merges `layers` (bottom first) into one tree.
    pub fn build(layers: Vec<Toc>) -> Result<Tree, TreeError> {
        let mut b = Builder {
            nodes: Vec::new(),
            layer: 0,
            below: None,
        };
        b.push(implicit_dir());
        for (i, toc) in layers.iter().enumerate() {
            b.layer = i;
            b.apply_whiteouts(toc);
            b.apply_entries(toc)?;
        }
        Ok(Tree::number(b, layers))
    }

    /// One layer alone, as an overlayfs lower directory: its whiteouts become 0/0 character
    /// devices (unless the layer itself has an entry of that name: a directory of that name
    /// is then opaque, as it replaces the lower one) and its opaque markers mark their
    /// directory [`Node::opaque`]. Parents missing from the layer take the attributes of the
    /// same directory in `below` (the merged layers under it), else are plain directories.
    pub fn build_lower(toc: Toc, below: Option<&Tree>) -> Result<Tree, TreeError> {
        let mut b = Builder {
            nodes: Vec::new(),
            layer: 0,
            below,
        };
        b.push(implicit_dir());
        b.apply_entries(&toc)?;
        for e in &toc.entries {
            let (dir, name) = split(&e.path);
            if name == OPAQUE {
                let d = b.ensure_dir(dir, &e.path)?;
                b.nodes[d].node.opaque = true;
            } else if let Some(target) = name.strip_prefix(WHITEOUT_PREFIX) {
                if target.is_empty() || target == b"." || target == b".." || target.contains(&b'/')
                {
                    return Err(b.err(&e.path, "is a whiteout of no valid name"));
                }
                let d = b.ensure_dir(dir, &e.path)?;
                if let Some(&own) = b.nodes[d].children.get(target) {
                    // `.wh.a` with `a/…` in one layer: the lower `a` is gone, this one stays.
                    if b.nodes[own].node.kind == EntryKind::Directory {
                        b.nodes[own].node.opaque = true;
                    }
                    continue;
                }
                let mut w = Entry::new(Vec::new(), EntryKind::CharDevice);
                w.mode = 0;
                w.uid = e.uid;
                w.gid = e.gid;
                w.mtime_sec = e.mtime_sec;
                w.mtime_nsec = e.mtime_nsec;
                let id = b.push(new_node(&w, 0, 0));
                b.nodes[d].children.insert(target.to_vec(), id);
            }
        }
        Ok(Tree::number(b, vec![toc]))
    }

    /// Numbers the built tree's reachable inodes and keeps of the TOCs only what reads need.
    fn number(mut b: Builder<'_>, layers: Vec<Toc>) -> Tree {
        // Number reachable inodes densely in depth-first order; hard links keep one inode.
        let mut ino_of: Vec<Ino> = vec![0; b.nodes.len()];
        let mut nodes: Vec<Node> = Vec::new();
        let mut stack = vec![(0usize, ROOT_INO)];
        ino_of[0] = ROOT_INO;
        let mut root = b.nodes[0].node.clone();
        root.parent = ROOT_INO;
        nodes.push(root);
        while let Some((old, ino)) = stack.pop() {
            // Each directory is visited once (no hard links to directories): its names and
            // nodes are moved out, not copied.
            let mut kids: Vec<(Vec<u8>, usize)> = std::mem::take(&mut b.nodes[old].children)
                .into_iter()
                .collect();
            kids.sort_unstable();
            let mut children = Vec::with_capacity(kids.len());
            let mut subdirs = 0;
            for (name, child) in kids {
                let cino = if ino_of[child] != 0 {
                    let c = ino_of[child];
                    nodes[(c - 1) as usize].nlink += 1;
                    c
                } else {
                    let mut n = std::mem::replace(&mut b.nodes[child].node, implicit_dir());
                    n.parent = ino;
                    n.nlink = 1;
                    let is_dir = n.kind == EntryKind::Directory;
                    nodes.push(n);
                    let c = nodes.len() as Ino;
                    ino_of[child] = c;
                    if is_dir {
                        subdirs += 1;
                        stack.push((child, c));
                    }
                    c
                };
                children.push((name.into_boxed_slice(), cino));
            }
            let n = &mut nodes[(ino - 1) as usize];
            n.children = children;
            n.nlink = 2 + subdirs;
        }
        // The nodes hold names, link targets and xattrs now; a mount needs only each entry's
        // kind, size and chunks from the TOCs (about a third of a mount's memory per entry).
        let mut layers = layers;
        for e in layers.iter_mut().flat_map(|t| t.entries.iter_mut()) {
            e.path = Vec::new();
            e.link = Vec::new();
            e.xattrs = Vec::new();
        }
        Tree { nodes, layers }
    }

    pub fn get(&self, ino: Ino) -> Option<&Node> {
        self.nodes.get(usize::try_from(ino).ok()?.checked_sub(1)?)
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Looks `name` up in directory `parent`.
    pub fn lookup(&self, parent: Ino, name: &[u8]) -> Option<Ino> {
        let dir = self.get(parent)?;
        dir.children
            .binary_search_by(|(n, _)| n.as_ref().cmp(name))
            .ok()
            .map(|i| dir.children[i].1)
    }

    /// Resolves a slash-separated path from the root (no symlinks followed).
    pub fn lookup_path(&self, path: &[u8]) -> Option<Ino> {
        let mut cur = ROOT_INO;
        for comp in path.split(|&b| b == b'/').filter(|c| !c.is_empty()) {
            cur = self.lookup(cur, comp)?;
        }
        Some(cur)
    }

    /// Every inode's path (the first name found for hard-linked inodes).
    pub fn paths(&self) -> HashMap<Ino, Vec<u8>> {
        let mut out = HashMap::with_capacity(self.nodes.len());
        out.insert(ROOT_INO, Vec::new());
        let mut stack = vec![(ROOT_INO, Vec::new())];
        while let Some((ino, path)) = stack.pop() {
            let Some(n) = self.get(ino) else { continue };
            for (name, child) in &n.children {
                if out.contains_key(child) {
                    continue;
                }
                let mut p = path.clone();
                if !p.is_empty() {
                    p.push(b'/');
                }
                p.extend_from_slice(name);
                out.insert(*child, p.clone());
                if self
                    .get(*child)
                    .is_some_and(|c| c.kind == EntryKind::Directory)
                {
                    stack.push((*child, p));
                }
            }
        }
        out
    }

    /// The TOC entry holding a file's chunks.
    pub fn data_entry(&self, data: DataRef) -> Option<&Entry> {
        self.layers
            .get(data.layer as usize)?
            .entries
            .get(data.entry as usize)
    }
}

/// Whether some entry of `toc` (whiteouts included) has a parent directory the layer does not
/// list itself.
pub fn has_missing_parents(toc: &Toc) -> bool {
    !missing_parents(toc).is_empty()
}

/// The directories a layer's entries need but the layer does not list, with every directory
/// above them: the paths [`Tree::build_lower`] looks up in the layers below.
pub fn missing_parents(toc: &Toc) -> std::collections::HashSet<Vec<u8>> {
    let dirs: std::collections::HashSet<&[u8]> = toc
        .entries
        .iter()
        .filter(|e| e.kind == EntryKind::Directory)
        .map(|e| e.path.as_slice())
        .collect();
    let mut missing = std::collections::HashSet::new();
    for e in &toc.entries {
        let (parent, _) = split(&e.path);
        if parent.is_empty() || dirs.contains(parent) || missing.contains(parent) {
            continue;
        }
        let mut p = parent;
        while !p.is_empty() && missing.insert(p.to_vec()) {
            p = split(p).0;
        }
    }
    missing
}

/// What of a layer below decides the attributes of the directories in `wanted` (as
/// [`missing_parents`] lists them) once merged: its entries at those paths, and the whiteouts
/// and opaque markers in those directories (or the root) that may remove them. A tree built of
/// these instead of whole layers answers the same for those paths, for a fraction of the work.
/// `None` when the layer has a hard link at such a path (its target may be left out).
pub fn skeleton(toc: &Toc, wanted: &std::collections::HashSet<Vec<u8>>) -> Option<Toc> {
    let mut entries = Vec::new();
    for e in &toc.entries {
        let (dir, name) = split(&e.path);
        let keep = if wanted.contains(e.path.as_slice()) {
            if e.kind == EntryKind::Hardlink {
                return None;
            }
            true
        } else if dir.is_empty() || wanted.contains(dir) {
            name == OPAQUE
                || name.strip_prefix(WHITEOUT_PREFIX).is_some_and(|target| {
                    let mut p = dir.to_vec();
                    if !p.is_empty() {
                        p.push(b'/');
                    }
                    p.extend_from_slice(target);
                    wanted.contains(&p)
                })
        } else {
            false
        };
        if keep {
            let mut e = e.clone();
            e.chunks = Vec::new();
            if e.kind == EntryKind::Regular {
                e.size = 0;
            }
            entries.push(e);
        }
    }
    Some(Toc {
        chunk_size: toc.chunk_size,
        entries,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toc(entries: Vec<Entry>) -> Toc {
        Toc {
            chunk_size: 1024,
            entries,
        }
    }
    fn file(p: &str) -> Entry {
        Entry::new(p.as_bytes().to_vec(), EntryKind::Regular)
    }
    fn dir(p: &str) -> Entry {
        Entry::new(p.as_bytes().to_vec(), EntryKind::Directory)
    }

    #[test]
    fn whiteouts_opaque_and_hardlinks() {
        let l0 = toc(vec![
            dir("a"),
            file("a/x"),
            file("a/y"),
            dir("b"),
            file("b/keep"),
            file("b/gone"),
            file("top"),
        ]);
        let mut hl = Entry::new(b"b/hl".to_vec(), EntryKind::Hardlink);
        hl.link = b"b/keep".to_vec();
        let l1 = toc(vec![
            dir("a"),
            file("a/.wh..wh..opq"),
            file("a/new"),
            file("b/.wh.gone"),
            hl,
            file(".wh.top"),
            file("implicit/parent/f"),
        ]);
        let t = Tree::build(vec![l0, l1]).unwrap();
        assert!(t.lookup_path(b"a/x").is_none());
        assert!(t.lookup_path(b"a/new").is_some());
        assert!(t.lookup_path(b"a/.wh..wh..opq").is_none());
        assert!(t.lookup_path(b"b/gone").is_none());
        assert!(t.lookup_path(b"b/.wh.gone").is_none());
        assert!(t.lookup_path(b"top").is_none());
        let keep = t.lookup_path(b"b/keep").unwrap();
        assert_eq!(t.lookup_path(b"b/hl"), Some(keep));
        assert_eq!(t.get(keep).unwrap().nlink, 2);
        assert!(t.lookup_path(b"implicit/parent/f").is_some());
        let root = t.get(ROOT_INO).unwrap();
        assert_eq!(root.nlink, 2 + 3); // a, b, implicit
    }

    #[test]
    fn same_layer_entries_survive_their_whiteouts() {
        let l0 = toc(vec![dir("d"), file("d/old")]);
        let l1 = toc(vec![file("d/.wh..wh..opq"), file("d/mine"), file(".wh.d")]);
        // `.wh.d` removes the lower `d`, but `d/mine` from this layer stays.
        let t = Tree::build(vec![l0, l1]).unwrap();
        assert!(t.lookup_path(b"d/mine").is_some());
        assert!(t.lookup_path(b"d/old").is_none());
    }

    #[test]
    fn file_replaces_dir_and_symlink_parent_is_refused() {
        let l0 = toc(vec![dir("x"), file("x/in")]);
        let l1 = toc(vec![file("x")]);
        let t = Tree::build(vec![l0, l1]).unwrap();
        assert_eq!(
            t.get(t.lookup_path(b"x").unwrap()).unwrap().kind,
            EntryKind::Regular
        );
        let mut s = Entry::new(b"evil".to_vec(), EntryKind::Symlink);
        s.link = b"/etc".to_vec();
        let l2 = toc(vec![s, file("evil/passwd")]);
        let err = Tree::build(vec![l2]).err().unwrap();
        assert!(err.to_string().contains("not a directory"), "{err}");
    }

    #[test]
    fn a_layer_alone_shows_whiteouts_and_opaque_dirs_as_overlayfs_reads_them() {
        let l = toc(vec![
            dir("a"),
            file("a/.wh..wh..opq"),
            file("a/new"),
            file("b/.wh.gone"),
            file(".wh.top"),
            file("c"),
            file(".wh.c"),
        ]);
        let t = Tree::build_lower(l, None).unwrap();
        let a = t.get(t.lookup_path(b"a").unwrap()).unwrap();
        assert!(a.opaque);
        assert!(t.lookup_path(b"a/new").is_some());
        assert!(t.lookup_path(b"a/.wh..wh..opq").is_none());
        for w in [&b"b/gone"[..], b"top"] {
            let n = t.get(t.lookup_path(w).unwrap()).unwrap();
            assert_eq!(
                (n.kind, n.mode, n.dev_major, n.dev_minor),
                (EntryKind::CharDevice, 0, 0, 0)
            );
        }
        // The layer's own entry wins over its whiteout of the same name.
        assert_eq!(
            t.get(t.lookup_path(b"c").unwrap()).unwrap().kind,
            EntryKind::Regular
        );
        assert!(!t.get(t.lookup_path(b"b").unwrap()).unwrap().opaque);
        let bad = toc(vec![file("d/.wh.")]);
        assert!(Tree::build_lower(bad, None).is_err());
        // A directory whited out and re-created in the same layer hides the lower one.
        let l = toc(vec![file(".wh.x"), file("x/mine")]);
        let t = Tree::build_lower(l, None).unwrap();
        assert!(t.get(t.lookup_path(b"x").unwrap()).unwrap().opaque);
    }

    #[test]
    fn directories_missing_from_a_lone_layer_keep_the_attributes_below() {
        let mut tmp = dir("tmp");
        tmp.mode = 0o1777;
        let mut var = dir("var");
        var.mode = 0o755;
        var.uid = 7;
        let below = Tree::build(vec![toc(vec![tmp, var])]).unwrap();
        let l = toc(vec![file("tmp/x"), file("var/lib/.wh.gone"), file("new/f")]);
        assert!(has_missing_parents(&l));
        assert!(!has_missing_parents(&toc(vec![
            dir("a"),
            file("a/b"),
            file("c")
        ])));
        let t = Tree::build_lower(l, Some(&below)).unwrap();
        let attrs = |p: &[u8]| {
            let n = t.get(t.lookup_path(p).unwrap()).unwrap();
            (n.mode, n.uid)
        };
        assert_eq!(attrs(b"tmp"), (0o1777, 0));
        assert_eq!(attrs(b"var"), (0o755, 7));
        assert_eq!(attrs(b"var/lib"), (0o755, 0));
        assert_eq!(attrs(b"new"), (0o755, 0));
    }

    #[test]
    fn skeletons_of_the_layers_below_give_the_same_missing_parents() {
        let with = |mut e: Entry, mode: u32, uid: u32| {
            e.mode = mode;
            e.uid = uid;
            e
        };
        let l0 = toc(vec![
            with(dir("usr"), 0o750, 1),
            with(dir("usr/lib"), 0o700, 2),
            file("usr/lib/a.so"),
            with(dir("opt"), 0o711, 3),
            with(dir("opt/gone"), 0o700, 4),
            with(dir("srv"), 0o701, 5),
            with(dir("srv/x"), 0o702, 6),
            dir("var"),
            file("var/log"),
        ]);
        let l1 = toc(vec![
            // Unlisted parents of its own; a whiteout and an opaque marker on the wanted paths;
            // a file where a wanted directory was.
            file("usr/lib/b.so"),
            file("opt/.wh.gone"),
            file("srv/.wh..wh..opq"),
            with(dir("srv/y"), 0o703, 7),
            file(".wh.var"),
            file("var"),
            file("other/f"),
        ]);
        let top = toc(vec![
            file("usr/lib/c.so"),
            file("opt/gone/f"),
            file("srv/x/f"),
            file("srv/y/f"),
            file("var/f2"),
            dir("mine"),
            file("mine/f"),
        ]);
        let wanted = missing_parents(&top);
        let mut w: Vec<_> = wanted.iter().map(|p| String::from_utf8_lossy(p)).collect();
        w.sort();
        assert_eq!(
            w,
            ["opt", "opt/gone", "srv", "srv/x", "srv/y", "usr", "usr/lib", "var"]
        );
        let full = Tree::build(vec![l0.clone(), l1.clone()]).unwrap();
        let skel = Tree::build(vec![
            skeleton(&l0, &wanted).unwrap(),
            skeleton(&l1, &wanted).unwrap(),
        ])
        .unwrap();
        assert!(skel.len() < full.len());
        let lower = |below: &Tree| -> Vec<_> {
            let t = Tree::build_lower(top.clone(), Some(below)).unwrap();
            let mut out: Vec<_> = [
                "usr", "usr/lib", "opt", "opt/gone", "srv", "srv/x", "srv/y", "var",
            ]
            .iter()
            .map(|p| {
                let n = t.get(t.lookup_path(p.as_bytes()).unwrap()).unwrap();
                (p.to_string(), n.kind, n.mode, n.uid)
            })
            .collect();
            out.sort_by(|a, b| a.0.cmp(&b.0));
            out
        };
        let got = lower(&skel);
        assert_eq!(got, lower(&full));
        // What the merge decides: the lower attributes where a directory is still there,
        // plain directories where it was whited out, made opaque over, or replaced by a file.
        let mode_uid = |p: &str| {
            got.iter()
                .find(|(q, ..)| q == p)
                .map(|(_, _, m, u)| (*m, *u))
                .unwrap()
        };
        assert_eq!(mode_uid("usr/lib"), (0o700, 2));
        assert_eq!(mode_uid("srv"), (0o701, 5));
        assert_eq!(mode_uid("srv/y"), (0o703, 7));
        assert_eq!(mode_uid("opt/gone"), (0o755, 0));
        assert_eq!(mode_uid("srv/x"), (0o755, 0));
        assert_eq!(mode_uid("var"), (0o755, 0));
        // A hard link on a wanted path: no skeleton (the whole layer is used).
        let mut h = Entry::new(b"usr".to_vec(), EntryKind::Hardlink);
        h.link = b"other".to_vec();
        assert!(skeleton(&toc(vec![file("other"), h]), &wanted).is_none());
    }
}
