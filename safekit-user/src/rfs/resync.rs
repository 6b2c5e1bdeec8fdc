//! Resynchronisation: turns what the journal recorded about a path (byte
//! ranges, the entry, the whole subtree, the entries of a directory after a
//! name) into the operations that make the secondary's copy of it equal to
//! the primary's, reading the primary's real directory (never through the
//! FUSE mount).
//!
//! Per path: absent here → [`Op::Remove`]; else [`Op::Put`] (kind, mode,
//! owner, size, xattrs), then for a file the recorded ranges (whole file for
//! a subtree) as [`Op::Write`] for data and [`Op::Hole`] for holes found with
//! `SEEK_DATA`/`SEEK_HOLE`, for a subtree directory [`Op::Prune`] and every
//! child in name order (for [`Change::After`], the children after the
//! name), and last the times ([`Op::SetAttr`]) so the writes do not move
//! them.
//!
//! After each operation the [`Sink`] is told what of the path remains once
//! the operations sent so far are applied there, as journal records: a
//! subtree being walked is its directories' times ([`Change::Meta`]) and
//! the entries after the child being sent ([`Change::After`]), down to the
//! file being sent (its times and the ranges not yet sent). The replicator
//! makes that the journal once the secondary confirmed those operations
//! written, so an interrupted resynchronisation resumes where it stopped.

use std::{
    ffi::OsStr,
    io,
    os::{
        fd::{AsFd, BorrowedFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
};

use rustix::fs::{FileType, OFlags, SeekFrom};

use super::{
    apply,
    journal::{Change, PathChanges, RangeSet},
    proto::{self, EntryKind, NodeKind, Op, RelPath},
    sys,
};

/// Largest [`Op::Write`] a resynchronisation sends.
pub const CHUNK: usize = 1 << 20;

/// Why producing a path's operations stopped.
#[derive(Debug)]
pub enum ItemError {
    /// The link to the secondary is gone.
    Lost,
    /// Reading the primary's copy failed.
    Io(io::Error),
}

impl From<io::Error> for ItemError {
    fn from(e: io::Error) -> Self {
        ItemError::Io(e)
    }
}

/// Where a path's operations go.
pub trait Sink {
    /// Sends one operation; `Err` when the link is gone.
    fn op(&mut self, op: Op) -> Result<(), ItemError>;
    /// What of the path remains to be sent once every operation sent so far
    /// is applied (empty: the path is done).
    fn remaining(&mut self, records: Vec<(RelPath, Change)>);
    /// One more path sent (progress).
    fn path_done(&mut self);
}

fn is_enoent(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR))
}

/// How far one path of the walk is.
#[derive(Debug)]
enum Stage {
    /// Nothing sent beyond what its changes describe (for a directory: its
    /// entry and the prune, which are sent again if it stops here).
    Start,
    /// The entry is sent; its times and these ranges remain.
    Data(RangeSet),
    /// A directory: its children up to this name are begun.
    Child(Vec<u8>),
}

#[derive(Debug)]
struct Level {
    path: RelPath,
    /// What this path had to send.
    changes: PathChanges,
    stage: Stage,
    /// A directory being walked: the children left to send, in name order.
    children: Option<std::vec::IntoIter<Vec<u8>>>,
    /// Its times, sent last.
    times: (proto::Timestamp, proto::Timestamp),
}

/// A path being resynchronised, with the paths of its subtree being walked
/// (a stack: no recursion, whatever the depth).
struct Walk<'a> {
    root: &'a OwnedFd,
    sink: &'a mut dyn Sink,
    levels: Vec<Level>,
}

impl Walk<'_> {
    /// Sends `op`, then tells the sink what remains.
    fn emit(&mut self, op: Op) -> Result<(), ItemError> {
        self.sink.op(op)?;
        let rest = self.remaining();
        self.sink.remaining(rest);
        Ok(())
    }

    /// What remains of the walk once what it sent is applied, as journal
    /// records.
    fn remaining(&self) -> Vec<(RelPath, Change)> {
        let mut out = Vec::new();
        for l in &self.levels {
            match &l.stage {
                Stage::Start => {
                    let c = &l.changes;
                    if c.tree {
                        out.push((l.path.clone(), Change::Tree));
                        continue;
                    }
                    if c.meta {
                        out.push((l.path.clone(), Change::Meta));
                    }
                    if let Some(a) = &c.after {
                        match l.path.join(a) {
                            Ok(p) => out.push((p, Change::After)),
                            Err(_) => out.push((l.path.clone(), Change::Tree)),
                        }
                    }
                    for (start, end) in c.ranges.iter() {
                        out.push((l.path.clone(), Change::Range { start, end }));
                    }
                }
                Stage::Data(ranges) => {
                    out.push((l.path.clone(), Change::Meta));
                    for (start, end) in ranges.iter() {
                        out.push((l.path.clone(), Change::Range { start, end }));
                    }
                }
                Stage::Child(name) => {
                    out.push((l.path.clone(), Change::Meta));
                    match l.path.join(name) {
                        Ok(p) => out.push((p, Change::After)),
                        // Cannot happen (the child was joined); whole.
                        Err(_) => out.push((l.path.clone(), Change::Tree)),
                    }
                }
            }
        }
        out
    }

    fn top(&mut self) -> &mut Level {
        let n = self.levels.len();
        &mut self.levels[n - 1]
    }

    /// The path at the top of the stack is done.
    fn pop_done(&mut self) {
        self.levels.pop();
        let rest = self.remaining();
        self.sink.remaining(rest);
        self.sink.path_done();
    }
}

/// Emits the operations that bring `path` on the secondary to its state
/// here, for the recorded `changes`, telling `sink` after each what
/// remains.
///
/// A subtree is walked without recursion (a stack of directories, each
/// with the names of its children left), and each entry is reached through
/// its parent directory, opened from the root piece by piece
/// (`sys::open_dir`): a tree of any depth is sent with one or two
/// directories open at a time.
pub fn item_ops(
    root: &OwnedFd,
    path: &RelPath,
    changes: &PathChanges,
    sink: &mut dyn Sink,
) -> Result<(), ItemError> {
    let mut w = Walk {
        root,
        sink,
        levels: Vec::new(),
    };
    let whole = PathChanges {
        tree: true,
        ..PathChanges::default()
    };
    let mut next = Some((path.clone(), changes.clone()));
    loop {
        if let Some((path, changes)) = next.take() {
            w.levels.push(Level {
                path,
                changes,
                stage: Stage::Start,
                children: None,
                times: Default::default(),
            });
            match visit(&mut w)? {
                Visited::Removed => {}
                Visited::Sent { children: None } => times_last(&mut w)?,
                Visited::Sent {
                    children: Some(names),
                } => w.top().children = Some(names.into_iter()),
            }
        }
        let Some(top) = w.levels.last_mut() else {
            return Ok(());
        };
        match top.children.as_mut().and_then(Iterator::next) {
            Some(name) => {
                let child = top
                    .path
                    .join(&name)
                    .map_err(|_| io::Error::from_raw_os_error(libc::ENAMETOOLONG))?;
                top.stage = Stage::Child(name);
                next = Some((child, whole.clone()));
            }
            None => times_last(&mut w)?,
        }
    }
}

/// What [`visit`] found at a path.
enum Visited {
    /// Gone here: removed there (already emitted, the path popped).
    Removed,
    /// The entry (and a file's content) is sent; its times go last, after
    /// the children of a directory being walked (their names, in order).
    Sent { children: Option<Vec<Vec<u8>>> },
}

/// The times of the path at the top of the walk, sent after its content
/// and children; the path is done.
fn times_last(w: &mut Walk<'_>) -> Result<(), ItemError> {
    let top = w.top();
    let (path, (atime, mtime)) = (top.path.clone(), top.times);
    w.emit(Op::SetAttr {
        path,
        mode: None,
        uid: None,
        gid: None,
        atime: Some(atime),
        mtime: Some(mtime),
    })?;
    w.pop_done();
    Ok(())
}

/// The entry at the top of the walk: [`Op::Put`], a file's ranges, a
/// directory's [`Op::Prune`] when walked (its children are the caller's to
/// send).
#[expect(
    clippy::too_many_lines,
    reason = "one entry in order: kind, entry, content"
)]
fn visit(w: &mut Walk<'_>) -> Result<Visited, ItemError> {
    let root = w.root;
    let path = w.top().path.clone();
    let path = &path;
    // The entry and its parent directory (the root: itself).
    let (dir, name): (OwnedFd, &OsStr) = if path.is_root() {
        (sys::open_dir(root.as_fd(), b"")?, OsStr::new("."))
    } else {
        let (parent, name) = path
            .split()
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        match sys::open_dir(root.as_fd(), parent) {
            Ok(d) => (d, OsStr::from_bytes(name)),
            Err(e) if is_enoent(&e) => return removed(w, path),
            Err(e) => return Err(e.into()),
        }
    };
    let st = match sys::stat_at(dir.as_fd(), name) {
        Ok(st) => st,
        Err(e) if is_enoent(&e) && !path.is_root() => {
            return removed(w, path);
        }
        Err(e) => return Err(e.into()),
    };
    let ft = sys::file_type(&st);
    let kind = match ft {
        FileType::Directory => EntryKind::Dir,
        FileType::Symlink => EntryKind::Symlink,
        FileType::Fifo => EntryKind::Node(NodeKind::Fifo),
        FileType::Socket => EntryKind::Node(NodeKind::Socket),
        FileType::CharacterDevice => EntryKind::Node(NodeKind::CharDev),
        FileType::BlockDevice => EntryKind::Node(NodeKind::BlockDev),
        _ => EntryKind::Node(NodeKind::File),
    };
    let target = if kind == EntryKind::Symlink {
        rustix::fs::readlinkat(dir.as_fd(), name, Vec::new())
            .map_err(sys::io)?
            .into_bytes()
    } else {
        Vec::new()
    };
    let size = u64::try_from(st.st_size).unwrap_or(0);
    let (tree, after) = {
        let c = &w.top().changes;
        (c.tree, c.after.clone())
    };
    // The ranges this path has to send (a file).
    let ranges = {
        let mut r = RangeSet::default();
        if kind == EntryKind::Node(NodeKind::File) {
            if tree {
                r.insert(0, size);
            } else {
                for (s, e) in w.top().changes.ranges.iter() {
                    r.insert(s.min(size), e.min(size));
                }
            }
        }
        r
    };
    let put = Op::Put {
        path: path.clone(),
        kind,
        mode: sys::perm(&st),
        uid: st.st_uid,
        gid: st.st_gid,
        size: if kind == EntryKind::Node(NodeKind::File) {
            size
        } else {
            0
        },
        rdev: st.st_rdev,
        target,
        xattrs: xattrs(dir.as_fd(), name, kind)?,
    };
    w.top().times = (sys::atime(&st), sys::mtime(&st));
    let walks_children = kind == EntryKind::Dir && (tree || after.is_some());
    if !walks_children {
        // Once the entry is there: its times and data remain.
        w.top().stage = Stage::Data(ranges.clone());
    }
    w.emit(put)?;
    // The entry itself, beneath its parent (one short piece).
    let open = |flags| sys::open_beneath(dir.as_fd(), name.as_bytes(), flags);
    match kind {
        EntryKind::Node(NodeKind::File) if !ranges.is_empty() => {
            let fd = open(OFlags::RDONLY | OFlags::NONBLOCK)?;
            let mtime = sys::mtime(&st);
            for (start, end) in ranges.iter() {
                file_range(w, fd.as_fd(), path, start, end, mtime)?;
            }
        }
        EntryKind::Dir if walks_children => {
            let sub = open(OFlags::RDONLY | OFlags::DIRECTORY)?;
            let mut names = apply::list_dir(sub.as_fd())?;
            if names.len() > proto::MAX_PRUNE {
                return Err(io::Error::from_raw_os_error(libc::EFBIG).into());
            }
            // Name order: what is done is what sorts before the cursor.
            names.sort_unstable();
            // Everything else there goes; entries removed here since an
            // interrupted walk passed them go too.
            w.emit(Op::Prune {
                path: path.clone(),
                keep: names.clone(),
            })?;
            if let (false, Some(a)) = (tree, &after) {
                names.retain(|n| n > a);
            }
            return Ok(Visited::Sent {
                children: Some(names),
            });
        }
        _ => {}
    }
    Ok(Visited::Sent { children: None })
}

/// Paths and data bytes an item will send (subtrees walked), for the
/// progress totals before it is sent.
#[must_use]
pub fn count_item(root: &OwnedFd, path: &RelPath, changes: &PathChanges) -> (u64, u64) {
    if changes.tree {
        return count_tree(root, path).unwrap_or((1, 0));
    }
    let mut total = (
        1,
        changes
            .ranges
            .iter()
            .map(|(s, e)| e - s)
            .sum::<u64>()
            .min(1 << 50),
    );
    if let Some(after) = &changes.after
        && let Ok(d) = sys::open_dir(root.as_fd(), path.as_bytes())
        && let Ok(names) = apply::list_dir(d.as_fd())
    {
        for n in names.into_iter().filter(|n| n > after) {
            if let Ok(child) = path.join(&n)
                && let Ok((p, b)) = count_tree(root, &child)
            {
                total.0 += p;
                total.1 += b;
            }
        }
    }
    total
}

/// Paths and data bytes below (and including) `path`, for the progress
/// totals of a subtree before it is sent. Walked without recursion, one
/// directory open at a time (see [`item_ops`]).
pub fn count_tree(root: &OwnedFd, path: &RelPath) -> io::Result<(u64, u64)> {
    let bytes_of = |st: &rustix::fs::Stat| {
        u64::try_from(st.st_size)
            .unwrap_or(0)
            .min(u64::try_from(st.st_blocks).unwrap_or(0) * 512)
    };
    let st = if path.is_root() {
        sys::fstat(root)?
    } else {
        let (parent, name) = path
            .split()
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let d = sys::open_dir(root.as_fd(), parent)?;
        sys::stat_at(d.as_fd(), OsStr::from_bytes(name))?
    };
    let (mut paths, mut bytes) = (1u64, 0u64);
    match sys::file_type(&st) {
        FileType::RegularFile => return Ok((1, bytes_of(&st))),
        FileType::Directory => {}
        _ => return Ok((1, 0)),
    }
    // Directories with the subdirectories left to count.
    let mut stack: Vec<(RelPath, std::vec::IntoIter<Vec<u8>>)> = Vec::new();
    let mut next = Some(path.clone());
    loop {
        if let Some(dir) = next.take() {
            let d = match sys::open_dir(root.as_fd(), dir.as_bytes()) {
                Ok(d) => d,
                // Gone meanwhile.
                Err(e) if is_enoent(&e) && dir != *path => {
                    paths -= 1;
                    continue;
                }
                Err(e) => return Err(e),
            };
            let mut subdirs = Vec::new();
            for n in apply::list_dir(d.as_fd())? {
                let st = match sys::stat_at(d.as_fd(), OsStr::from_bytes(&n)) {
                    Ok(st) => st,
                    Err(e) if is_enoent(&e) => continue,
                    Err(e) => return Err(e),
                };
                paths += 1;
                match sys::file_type(&st) {
                    FileType::RegularFile => bytes += bytes_of(&st),
                    FileType::Directory => subdirs.push(n),
                    _ => {}
                }
            }
            stack.push((dir, subdirs.into_iter()));
        }
        let Some((dir, subdirs)) = stack.last_mut() else {
            return Ok((paths, bytes));
        };
        match subdirs.next() {
            Some(n) => {
                next = Some(
                    dir.join(&n)
                        .map_err(|_| io::Error::from_raw_os_error(libc::ENAMETOOLONG))?,
                );
            }
            None => {
                stack.pop();
            }
        }
    }
}

/// The path is gone here: gone there too.
fn removed(w: &mut Walk<'_>, path: &RelPath) -> Result<Visited, ItemError> {
    w.top().stage = Stage::Data(RangeSet::default());
    w.emit(Op::Remove { path: path.clone() })?;
    w.pop_done();
    Ok(Visited::Removed)
}

/// Every extended attribute of the entry (none asked of symlinks: Linux
/// keeps `user.*` off them).
fn xattrs(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    kind: EntryKind,
) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    if kind == EntryKind::Symlink {
        return Ok(Vec::new());
    }
    let obj = sys::proc_entry(dir, name);
    let list = match sys::list_xattrs(&obj) {
        Ok(l) => l,
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for n in list.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        match sys::get_xattr(&obj, OsStr::from_bytes(n)) {
            Ok(v) => out.push((n.to_vec(), v)),
            // Removed meanwhile: the journal has it for the next round.
            Err(e) if e.raw_os_error() == Some(libc::ENODATA) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// Data and holes of `[start, end)`; each piece sent leaves the ranges that
/// remain of the path at the top of the walk.
fn file_range(
    w: &mut Walk<'_>,
    fd: BorrowedFd<'_>,
    path: &RelPath,
    start: u64,
    end: u64,
    mtime: proto::Timestamp,
) -> Result<(), ItemError> {
    let sent = |w: &mut Walk<'_>, a: u64, b: u64| {
        if let Stage::Data(r) = &mut w.top().stage {
            r.remove(a, b);
        }
    };
    let mut pos = start;
    let mut buf = vec![0u8; CHUNK];
    while pos < end {
        let data = match rustix::fs::seek(fd, SeekFrom::Data(pos)) {
            Ok(d) => d.min(end),
            // No data past pos (ENXIO), or no SEEK_DATA: treat as data.
            Err(rustix::io::Errno::NXIO) => end,
            Err(_) => pos,
        };
        if data > pos {
            sent(w, pos, data);
            w.emit(Op::Hole {
                path: path.clone(),
                offset: pos,
                len: data - pos,
            })?;
        }
        if data >= end {
            break;
        }
        let hole = rustix::fs::seek(fd, SeekFrom::Hole(data)).map_or(end, |h| h.min(end));
        let mut at = data;
        while at < hole {
            let want = usize::try_from((hole - at).min(CHUNK as u64)).unwrap_or(CHUNK);
            let n = rustix::io::pread(fd, &mut buf[..want], at).map_err(sys::io)?;
            if n == 0 {
                // Truncated meanwhile: the journal has it.
                return Ok(());
            }
            sent(w, at, at + n as u64);
            w.emit(Op::Write {
                path: path.clone(),
                offset: at,
                data: buf[..n].to_vec(),
                mtime,
            })?;
            at += n as u64;
        }
        pos = if hole > data { hole } else { end };
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::{fs, os::unix::fs::FileExt, path::Path};

    use super::*;
    use crate::rfs::{apply::Applier, journal::DirtySet, mounts, verify};

    /// Records every operation and what remained after each.
    #[derive(Default)]
    struct Record {
        ops: Vec<Op>,
        /// `rest[k]`: what remained once `ops[..=k]` are applied.
        rest: Vec<Vec<(RelPath, Change)>>,
    }

    impl Sink for Record {
        fn op(&mut self, op: Op) -> Result<(), ItemError> {
            self.ops.push(op);
            self.rest.push(Vec::new());
            Ok(())
        }
        fn remaining(&mut self, records: Vec<(RelPath, Change)>) {
            if let Some(last) = self.rest.last_mut() {
                *last = records;
            }
        }
        fn path_done(&mut self) {}
    }

    /// Applies at once, counting the data sent.
    struct Apply<'a>(&'a mut Applier, u64);

    impl Sink for Apply<'_> {
        fn op(&mut self, op: Op) -> Result<(), ItemError> {
            if let Op::Write { data, .. } = &op {
                self.1 += data.len() as u64;
            }
            self.0
                .apply(&op, false)
                .map_err(|e| ItemError::Io(e.source))
        }
        fn remaining(&mut self, _: Vec<(RelPath, Change)>) {}
        fn path_done(&mut self) {}
    }

    fn data_bytes(ops: &[Op]) -> u64 {
        ops.iter()
            .map(|op| match op {
                Op::Write { data, .. } => data.len() as u64,
                _ => 0,
            })
            .sum()
    }

    fn tree(src: &Path) {
        for d in ["d1", "d2/sub", "empty"] {
            fs::create_dir_all(src.join(d)).unwrap();
        }
        let big: Vec<u8> = (0..(5 * CHUNK / 2))
            .map(|i| u8::try_from(i % 251).unwrap_or(0))
            .collect();
        fs::write(src.join("d1/big"), &big).unwrap();
        fs::write(src.join("d1/small"), b"small").unwrap();
        let sparse = fs::File::create(src.join("d2/sparse")).unwrap();
        sparse.write_at(b"tail", 3 * CHUNK as u64).unwrap();
        fs::write(src.join("d2/sub/g"), vec![7u8; 3000]).unwrap();
        fs::write(src.join("top"), vec![1u8; CHUNK + 10]).unwrap();
        std::os::unix::fs::symlink("d1/small", src.join("link")).unwrap();
    }

    /// What a secondary held before: stale entries, a file with other
    /// content, a directory where a file is.
    fn stale(dst: &Path) {
        fs::create_dir_all(dst.join("d1")).unwrap();
        fs::create_dir_all(dst.join("top")).unwrap();
        fs::write(dst.join("d1/big"), b"old").unwrap();
        fs::write(dst.join("d1/zzz"), b"gone there").unwrap();
        fs::write(dst.join("stale"), b"gone").unwrap();
    }

    #[test]
    fn a_walk_cut_after_any_operation_resumes_from_what_it_reported() {
        let base = std::env::temp_dir().join(format!("rfs-resync-walk-{}", std::process::id()));
        let _ = fs::remove_dir_all(&base);
        let (src, dst) = (base.join("src"), base.join("dst"));
        fs::create_dir_all(&src).unwrap();
        tree(&src);
        let root = mounts::open_dir(&src).unwrap();
        let whole = PathChanges {
            tree: true,
            ..PathChanges::default()
        };
        let mut full = Record::default();
        item_ops(&root, &RelPath::root(), &whole, &mut full).unwrap();
        let total = data_bytes(&full.ops);
        assert!(total >= (5 * CHUNK / 2 + CHUNK) as u64, "{total}");
        assert!(full.rest.last().unwrap().is_empty(), "done at the end");
        let want = verify::manifest(root.as_fd()).unwrap();
        for cut in 0..full.ops.len() {
            let _ = fs::remove_dir_all(&dst);
            fs::create_dir_all(&dst).unwrap();
            stale(&dst);
            let mut applier = Applier::open(&dst).unwrap();
            for op in &full.ops[..=cut] {
                applier.apply(op, false).unwrap();
            }
            // What the journal would hold: a handful of records, never the
            // whole listing of a directory.
            let rest = &full.rest[cut];
            assert!(rest.len() <= 8, "cut {cut}: {rest:?}");
            let mut set = DirtySet::default();
            for (p, c) in rest {
                set.record(p, *c);
            }
            let mut again = Apply(&mut applier, 0);
            for (p, c) in set.iter() {
                item_ops(&root, p, c, &mut again).unwrap();
            }
            let resent = again.1;
            let diff = verify::compare(&want, &verify::manifest(applier.root()).unwrap());
            assert!(
                diff.is_empty(),
                "cut {cut} ({:?}): {diff:?}",
                full.ops[cut].name()
            );
            // Nothing sent twice.
            assert_eq!(data_bytes(&full.ops[..=cut]) + resent, total, "cut {cut}");
        }
        let _ = fs::remove_dir_all(&base);
    }
}
