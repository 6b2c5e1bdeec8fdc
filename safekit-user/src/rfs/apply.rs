//! Applies replicated operations to a directory (the secondary's copy).
//!
//! Everything goes through a directory fd of the root and `*at` calls; paths
//! are resolved with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | ...)`,
//! piece by piece when longer than `PATH_MAX` (`sys::open_beneath`: a path
//! from the root may be up to [`super::proto::MAX_PATH`]), final components
//! are never followed. [`RelPath`] already refused `..`,
//! absolute paths and NUL bytes when the message was decoded; a symlink
//! planted in the copy (say `d -> /etc`) makes the operation fail with
//! `ELOOP` instead of escaping.

use std::{
    collections::HashMap,
    ffi::OsStr,
    io,
    os::{
        fd::{AsFd, BorrowedFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::Path,
};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, RenameFlags, XattrFlags};
use thiserror::Error;

use super::{
    proto::{EntryKind, NodeKind, Op, RelPath, Timestamp, rename},
    sys,
};

/// Files kept open between writes.
const OPEN_FILES: usize = 64;

/// An operation that could not be applied.
#[derive(Debug, Error)]
#[error("{op} {path}: {source}")]
pub struct ApplyError {
    /// The operation's name.
    pub op: &'static str,
    /// Its path.
    pub path: RelPath,
    /// The system error.
    #[source]
    pub source: io::Error,
}

impl ApplyError {
    /// The errno, 0 if none.
    #[must_use]
    pub fn errno(&self) -> i32 {
        self.source.raw_os_error().unwrap_or(0)
    }
}

/// Applies operations below one root directory.
#[derive(Debug)]
pub struct Applier {
    root: OwnedFd,
    /// Open files for writes, by path; dropped on any rename or removal.
    files: HashMap<RelPath, OwnedFd>,
    /// Bytes written since the disk writeback of the open files was last
    /// started.
    unflushed: u64,
}

/// A parent directory and a final component.
struct Entry<'a> {
    dir: OwnedFd,
    name: &'a OsStr,
}

impl Applier {
    /// Opens the root directory `dir`.
    pub fn open(dir: &Path) -> io::Result<Self> {
        let root = super::mounts::open_dir(dir)?;
        Ok(Self {
            root,
            files: HashMap::new(),
            unflushed: 0,
        })
    }

    /// Applies below an already open directory.
    pub fn from_fd(root: OwnedFd) -> io::Result<Self> {
        Ok(Self {
            root,
            files: HashMap::new(),
            unflushed: 0,
        })
    }

    /// The root directory fd.
    #[must_use]
    pub fn root(&self) -> BorrowedFd<'_> {
        self.root.as_fd()
    }

    /// Applies one operation. With `sync`, an [`Op::Fsync`] reaches the disk
    /// before this returns.
    pub fn apply(&mut self, op: &Op, sync: bool) -> Result<(), ApplyError> {
        self.apply_inner(op, sync).map_err(|source| ApplyError {
            op: op.name(),
            path: op.path().clone(),
            source,
        })
    }

    fn entry<'p>(&self, path: &'p RelPath) -> io::Result<Entry<'p>> {
        let (parent, name) = path
            .split()
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        Ok(Entry {
            dir: sys::open_dir(self.root.as_fd(), parent)?,
            name: OsStr::from_bytes(name),
        })
    }

    /// The entry for `path`, the root being `(root, ".")`.
    fn target<'p>(&self, path: &'p RelPath) -> io::Result<Entry<'p>> {
        if path.is_root() {
            Ok(Entry {
                dir: sys::open_dir(self.root.as_fd(), b"")?,
                name: OsStr::new("."),
            })
        } else {
            self.entry(path)
        }
    }

    fn file(&mut self, path: &RelPath) -> io::Result<BorrowedFd<'_>> {
        if !self.files.contains_key(path) {
            if self.files.len() >= OPEN_FILES {
                self.files.clear();
            }
            let fd = sys::open_beneath(
                self.root.as_fd(),
                path.as_bytes(),
                OFlags::WRONLY | OFlags::NONBLOCK,
            )?;
            self.files.insert(path.clone(), fd);
        }
        self.files
            .get(path)
            .map(AsFd::as_fd)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EBADF))
    }

    #[expect(clippy::too_many_lines, reason = "one arm per operation")]
    fn apply_inner(&mut self, op: &Op, sync: bool) -> io::Result<()> {
        match op {
            Op::Write {
                path,
                offset,
                data,
                mtime,
            } => {
                let fd = self.file(path)?;
                sys::write_all_at(fd, data, *offset)?;
                sys::set_fd_mtime(fd, *mtime)?;
                self.unflushed += data.len() as u64;
                if self.unflushed >= sys::WRITEBACK_AFTER {
                    // Writes stream in: their pages go to disk meanwhile,
                    // not all at the next barrier's sync.
                    self.unflushed = 0;
                    for fd in self.files.values() {
                        sys::start_writeback(fd.as_fd());
                    }
                }
                Ok(())
            }
            Op::Truncate { path, size, mtime } => {
                let fd = self.file(path)?;
                rustix::fs::ftruncate(fd, *size).map_err(sys::io)?;
                sys::set_fd_mtime(fd, *mtime)
            }
            Op::Mknod {
                path,
                kind,
                mode,
                rdev,
                uid,
                gid,
                mtime,
                dir_mtime,
            } => {
                let e = self.entry(path)?;
                let ft = match kind {
                    NodeKind::File => FileType::RegularFile,
                    NodeKind::Fifo => FileType::Fifo,
                    NodeKind::Socket => FileType::Socket,
                    NodeKind::CharDev => FileType::CharacterDevice,
                    NodeKind::BlockDev => FileType::BlockDevice,
                };
                rustix::fs::mknodat(&e.dir, e.name, ft, Mode::from_raw_mode(*mode), *rdev)
                    .map_err(sys::io)?;
                created(&e, *mode, *uid, *gid, *mtime, *dir_mtime)
            }
            Op::Mkdir {
                path,
                mode,
                uid,
                gid,
                mtime,
                dir_mtime,
            } => {
                let e = self.entry(path)?;
                rustix::fs::mkdirat(&e.dir, e.name, Mode::from_raw_mode(*mode)).map_err(sys::io)?;
                created(&e, *mode, *uid, *gid, *mtime, *dir_mtime)
            }
            Op::Unlink { path, dir_mtime } | Op::Rmdir { path, dir_mtime } => {
                self.files.clear();
                let e = self.entry(path)?;
                let flags = if matches!(op, Op::Rmdir { .. }) {
                    AtFlags::REMOVEDIR
                } else {
                    AtFlags::empty()
                };
                rustix::fs::unlinkat(&e.dir, e.name, flags).map_err(sys::io)?;
                sys::set_fd_mtime(e.dir.as_fd(), *dir_mtime)
            }
            Op::Rename {
                from,
                to,
                flags,
                from_dir_mtime,
                to_dir_mtime,
            } => {
                self.files.clear();
                let a = self.entry(from)?;
                let b = self.entry(to)?;
                let mut f = RenameFlags::empty();
                if flags & rename::NOREPLACE != 0 {
                    f |= RenameFlags::NOREPLACE;
                }
                if flags & rename::EXCHANGE != 0 {
                    f |= RenameFlags::EXCHANGE;
                }
                rustix::fs::renameat_with(&a.dir, a.name, &b.dir, b.name, f).map_err(sys::io)?;
                sys::set_fd_mtime(a.dir.as_fd(), *from_dir_mtime)?;
                sys::set_fd_mtime(b.dir.as_fd(), *to_dir_mtime)
            }
            Op::Symlink {
                path,
                target,
                uid,
                gid,
                mtime,
                dir_mtime,
            } => {
                let e = self.entry(path)?;
                rustix::fs::symlinkat(OsStr::from_bytes(target), &e.dir, e.name)
                    .map_err(sys::io)?;
                sys::chown_at(e.dir.as_fd(), e.name, Some(*uid), Some(*gid))?;
                sys::set_times_at(e.dir.as_fd(), e.name, Some(*mtime), Some(*mtime))?;
                sys::set_fd_mtime(e.dir.as_fd(), *dir_mtime)
            }
            Op::Link {
                existing,
                path,
                dir_mtime,
            } => {
                let a = self.entry(existing)?;
                let b = self.entry(path)?;
                rustix::fs::linkat(&a.dir, a.name, &b.dir, b.name, AtFlags::empty())
                    .map_err(sys::io)?;
                sys::set_fd_mtime(b.dir.as_fd(), *dir_mtime)
            }
            Op::SetAttr {
                path,
                mode,
                uid,
                gid,
                atime,
                mtime,
            } => {
                let e = self.target(path)?;
                if uid.is_some() || gid.is_some() {
                    sys::chown_at(e.dir.as_fd(), e.name, *uid, *gid)?;
                }
                if let Some(m) = mode {
                    sys::chmod_at(e.dir.as_fd(), e.name, *m)?;
                }
                if atime.is_some() || mtime.is_some() {
                    sys::set_times_at(e.dir.as_fd(), e.name, *atime, *mtime)?;
                }
                Ok(())
            }
            Op::SetXattr { path, name, value } => {
                let e = self.target(path)?;
                rustix::fs::lsetxattr(
                    sys::proc_entry(e.dir.as_fd(), e.name),
                    OsStr::from_bytes(name),
                    value,
                    XattrFlags::empty(),
                )
                .map_err(sys::io)
            }
            Op::RemoveXattr { path, name } => {
                let e = self.target(path)?;
                rustix::fs::lremovexattr(
                    sys::proc_entry(e.dir.as_fd(), e.name),
                    OsStr::from_bytes(name),
                )
                .map_err(sys::io)
            }
            Op::Fsync { path, data_only } => {
                if !sync {
                    return Ok(());
                }
                if path.is_root() {
                    return rustix::fs::syncfs(&self.root).map_err(sys::io);
                }
                let fd = sys::open_beneath(
                    self.root.as_fd(),
                    path.as_bytes(),
                    OFlags::RDONLY | OFlags::NONBLOCK,
                )?;
                if *data_only {
                    rustix::fs::fdatasync(&fd).map_err(sys::io)?;
                } else {
                    rustix::fs::fsync(&fd).map_err(sys::io)?;
                }
                // The entry itself: a new file's name is durable once its
                // directory is synced.
                let e = self.entry(path)?;
                rustix::fs::fsync(&e.dir).map_err(sys::io)
            }
            Op::Put {
                path,
                kind,
                mode,
                uid,
                gid,
                size,
                rdev,
                target,
                xattrs,
            } => self.put(
                path,
                *kind,
                *mode,
                (*uid, *gid),
                *size,
                *rdev,
                target,
                xattrs,
            ),
            Op::Remove { path } => {
                self.files.clear();
                let e = self.entry(path)?;
                match remove_tree(e.dir.as_fd(), e.name) {
                    Err(err) if err.raw_os_error() == Some(libc::ENOENT) => Ok(()),
                    r => r,
                }
            }
            Op::Prune { path, keep } => {
                let dir = sys::open_dir(self.root.as_fd(), path.as_bytes())?;
                let keep: std::collections::HashSet<&[u8]> =
                    keep.iter().map(Vec::as_slice).collect();
                let mut extra = Vec::new();
                for name in list_dir(dir.as_fd())? {
                    if !keep.contains(name.as_slice()) {
                        extra.push(name);
                    }
                }
                if !extra.is_empty() {
                    self.files.clear();
                }
                for name in extra {
                    remove_tree(dir.as_fd(), OsStr::from_bytes(&name))?;
                }
                Ok(())
            }
            Op::Hole { path, offset, len } => {
                let fd = self.file(path)?;
                punch_hole(fd, *offset, *len)
            }
            // A synchronisation point: nothing on disk (the caller records it).
            Op::InSync { .. } | Op::FullSync { .. } => Ok(()),
        }
    }

    /// [`Op::Put`]: the entry exists as `kind` with these attributes.
    #[expect(clippy::too_many_arguments, reason = "the fields of Op::Put")]
    fn put(
        &mut self,
        path: &RelPath,
        kind: EntryKind,
        mode: u32,
        (uid, gid): (u32, u32),
        size: u64,
        rdev: u64,
        target: &[u8],
        xattrs: &[(Vec<u8>, Vec<u8>)],
    ) -> io::Result<()> {
        let e = self.target(path)?;
        let existing = match sys::stat_at(e.dir.as_fd(), e.name) {
            Ok(st) => Some(st),
            Err(err) if err.raw_os_error() == Some(libc::ENOENT) => None,
            Err(err) => return Err(err),
        };
        let want = match kind {
            EntryKind::Dir => FileType::Directory,
            EntryKind::Symlink => FileType::Symlink,
            EntryKind::Node(k) => node_type(k),
        };
        let same = existing.as_ref().is_some_and(|st| {
            let ft = sys::file_type(st);
            ft == want
                && match kind {
                    EntryKind::Symlink => rustix::fs::readlinkat(e.dir.as_fd(), e.name, Vec::new())
                        .is_ok_and(|t| t.as_bytes() == target),
                    EntryKind::Node(NodeKind::CharDev | NodeKind::BlockDev) => st.st_rdev == rdev,
                    _ => true,
                }
        });
        if existing.is_some() && !same {
            if path.is_root() {
                return Err(io::Error::from_raw_os_error(libc::ENOTDIR));
            }
            self.files.clear();
            remove_tree(e.dir.as_fd(), e.name)?;
        }
        if !same {
            let m = Mode::from_raw_mode(mode);
            match kind {
                EntryKind::Dir => rustix::fs::mkdirat(&e.dir, e.name, m).map_err(sys::io)?,
                EntryKind::Symlink => {
                    rustix::fs::symlinkat(OsStr::from_bytes(target), &e.dir, e.name)
                        .map_err(sys::io)?;
                }
                EntryKind::Node(k) => {
                    rustix::fs::mknodat(&e.dir, e.name, node_type(k), m, rdev).map_err(sys::io)?;
                }
            }
        }
        sys::chown_at(e.dir.as_fd(), e.name, Some(uid), Some(gid))?;
        if kind != EntryKind::Symlink {
            sys::chmod_at(e.dir.as_fd(), e.name, mode)?;
        }
        if kind == EntryKind::Node(NodeKind::File) {
            let fd = self.file(path)?;
            rustix::fs::ftruncate(fd, size).map_err(sys::io)?;
        }
        if kind != EntryKind::Symlink || !xattrs.is_empty() {
            let e = self.target(path)?;
            let obj = sys::proc_entry(e.dir.as_fd(), e.name);
            let have = sys::list_xattrs(&obj)?;
            for name in have.split(|&b| b == 0).filter(|n| !n.is_empty()) {
                if !xattrs.iter().any(|(n, _)| n == name) {
                    rustix::fs::lremovexattr(&obj, OsStr::from_bytes(name)).map_err(sys::io)?;
                }
            }
            for (name, value) in xattrs {
                rustix::fs::lsetxattr(&obj, OsStr::from_bytes(name), value, XattrFlags::empty())
                    .map_err(sys::io)?;
            }
        }
        Ok(())
    }
}

fn node_type(k: NodeKind) -> FileType {
    match k {
        NodeKind::File => FileType::RegularFile,
        NodeKind::Fifo => FileType::Fifo,
        NodeKind::Socket => FileType::Socket,
        NodeKind::CharDev => FileType::CharacterDevice,
        NodeKind::BlockDev => FileType::BlockDevice,
    }
}

/// Names in a directory (without `.` and `..`).
pub(crate) fn list_dir(dir: BorrowedFd<'_>) -> io::Result<Vec<Vec<u8>>> {
    let mut d = rustix::fs::Dir::read_from(dir).map_err(sys::io)?;
    let mut out = Vec::new();
    while let Some(ent) = d.read() {
        let ent = ent.map_err(sys::io)?;
        let name = ent.file_name().to_bytes();
        if name != b"." && name != b".." {
            out.push(name.to_vec());
        }
    }
    Ok(out)
}

/// Removes `name` in `dir`, recursively for a directory (never following
/// symlinks). Iterative, one directory open at a time, each reached from
/// `dir` piece by piece ([`sys::open_dir`]): a tree of any depth is removed
/// without deep recursion or one fd per level.
pub(crate) fn remove_tree(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
    let st = sys::stat_at(dir, name)?;
    if sys::file_type(&st) != FileType::Directory {
        return rustix::fs::unlinkat(dir, name, AtFlags::empty()).map_err(sys::io);
    }
    // Directories below `dir` (relative paths), each emptied, then removed
    // once what was pushed after it is gone.
    let mut stack: Vec<(Vec<u8>, bool)> = vec![(name.as_bytes().to_vec(), false)];
    while let Some((rel, emptied)) = stack.pop() {
        if emptied {
            let (parent, last) = match rel.iter().rposition(|&b| b == b'/') {
                Some(i) => (&rel[..i], &rel[i + 1..]),
                None => (&[][..], &rel[..]),
            };
            let p = sys::open_dir(dir, parent)?;
            rustix::fs::unlinkat(&p, OsStr::from_bytes(last), AtFlags::REMOVEDIR)
                .map_err(sys::io)?;
            continue;
        }
        let sub = sys::open_dir(dir, &rel)?;
        stack.push((rel.clone(), true));
        for child in list_dir(sub.as_fd())? {
            let c = OsStr::from_bytes(&child);
            if sys::file_type(&sys::stat_at(sub.as_fd(), c)?) == FileType::Directory {
                let mut below = rel.clone();
                below.push(b'/');
                below.extend_from_slice(&child);
                stack.push((below, false));
            } else {
                rustix::fs::unlinkat(&sub, c, AtFlags::empty()).map_err(sys::io)?;
            }
        }
    }
    Ok(())
}

/// Makes `[offset, offset + len)` of a file read as zeros (a hole where the
/// filesystem can, zeros written otherwise); the size is unchanged.
fn punch_hole(fd: BorrowedFd<'_>, offset: u64, len: u64) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    let r = rustix::fs::fallocate(
        fd,
        rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
        offset,
        len,
    );
    match r {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::OPNOTSUPP) => {
            let size = sys::fstat(fd)?.st_size;
            let end = (offset + len).min(u64::try_from(size).unwrap_or(0));
            let zeros = vec![0u8; 1 << 20];
            let mut at = offset;
            while at < end {
                let n = usize::try_from((end - at).min(zeros.len() as u64)).unwrap_or(zeros.len());
                sys::write_all_at(fd, &zeros[..n], at)?;
                at += n as u64;
            }
            Ok(())
        }
        Err(e) => Err(sys::io(e)),
    }
}

/// Ownership, mode and times of a node just created, then its parent's mtime.
fn created(
    e: &Entry<'_>,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: Timestamp,
    dir_mtime: Timestamp,
) -> io::Result<()> {
    sys::chown_at(e.dir.as_fd(), e.name, Some(uid), Some(gid))?;
    // After chown (which may clear set-id bits), and whatever our umask.
    sys::chmod_at(e.dir.as_fd(), e.name, mode)?;
    sys::set_times_at(e.dir.as_fd(), e.name, Some(mtime), Some(mtime))?;
    sys::set_fd_mtime(e.dir.as_fd(), dir_mtime)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    fn p(s: &str) -> RelPath {
        RelPath::new(s).expect("path")
    }

    fn t(sec: i64) -> Timestamp {
        Timestamp { sec, nsec: 5 }
    }

    fn tmp(tag: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("rfs-apply-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("mkdir");
        d
    }

    #[test]
    fn applies_a_tree_with_metadata() {
        let d = tmp("tree");
        let mut a = Applier::open(&d).expect("open");
        let ops = [
            Op::Mkdir {
                path: p("d"),
                mode: 0o750,
                uid: 12,
                gid: 34,
                mtime: t(100),
                dir_mtime: t(101),
            },
            Op::Mknod {
                path: p("d/f"),
                kind: NodeKind::File,
                mode: 0o640,
                rdev: 0,
                uid: 0,
                gid: 0,
                mtime: t(102),
                dir_mtime: t(103),
            },
            Op::Write {
                path: p("d/f"),
                offset: 10,
                data: b"hello".to_vec(),
                mtime: t(104),
            },
            Op::Symlink {
                path: p("l"),
                target: b"d/f".to_vec(),
                uid: 5,
                gid: 6,
                mtime: t(105),
                dir_mtime: t(106),
            },
            Op::Rename {
                from: p("d/f"),
                to: p("g"),
                flags: 0,
                from_dir_mtime: t(107),
                to_dir_mtime: t(108),
            },
            Op::SetXattr {
                path: p("g"),
                name: b"user.k".to_vec(),
                value: b"v".to_vec(),
            },
        ];
        for op in &ops {
            a.apply(op, true).expect("apply");
        }
        let g = std::fs::symlink_metadata(d.join("g")).expect("g");
        assert_eq!(g.len(), 15);
        assert_eq!(g.mode() & 0o7777, 0o640);
        assert_eq!((g.mtime(), g.mtime_nsec()), (104, 5));
        let dd = std::fs::symlink_metadata(d.join("d")).expect("d");
        assert_eq!((dd.uid(), dd.gid(), dd.mode() & 0o7777), (12, 34, 0o750));
        assert_eq!(dd.mtime(), 107);
        let l = std::fs::symlink_metadata(d.join("l")).expect("l");
        assert_eq!((l.uid(), l.gid(), l.mtime()), (5, 6, 105));
        assert_eq!(
            std::fs::read_link(d.join("l")).expect("link"),
            Path::new("d/f")
        );
        assert_eq!(std::fs::metadata(&d).expect("root").mtime(), 108);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_tree_deeper_than_path_max_is_applied_and_removed() {
        let base = tmp("deep");
        let mut applier = Applier::open(&base).expect("open");
        let name = "n".repeat(200);
        let mut dir = RelPath::root();
        for i in 0..45 {
            dir = dir.join(name.as_bytes()).expect("join");
            applier
                .apply(
                    &Op::Mkdir {
                        path: dir.clone(),
                        mode: 0o755,
                        uid: 0,
                        gid: 0,
                        mtime: t(i),
                        dir_mtime: t(i),
                    },
                    true,
                )
                .expect("mkdir");
        }
        assert!(dir.as_bytes().len() > 2 * 4096);
        let file = dir.join(b"f").expect("join");
        let renamed = dir.join(b"g").expect("join");
        let ops = [
            Op::Mknod {
                path: file.clone(),
                kind: NodeKind::File,
                mode: 0o600,
                rdev: 0,
                uid: 0,
                gid: 0,
                mtime: t(50),
                dir_mtime: t(50),
            },
            Op::Write {
                path: file.clone(),
                offset: 0,
                data: b"deep".to_vec(),
                mtime: t(51),
            },
            Op::Rename {
                from: file.clone(),
                to: renamed.clone(),
                flags: 0,
                from_dir_mtime: t(52),
                to_dir_mtime: t(52),
            },
            Op::SetXattr {
                path: renamed.clone(),
                name: b"user.k".to_vec(),
                value: b"v".to_vec(),
            },
            Op::Symlink {
                path: dir.join(b"l").expect("join"),
                target: b"g".to_vec(),
                uid: 0,
                gid: 0,
                mtime: t(53),
                dir_mtime: t(53),
            },
            Op::Fsync {
                path: renamed.clone(),
                data_only: false,
            },
        ];
        for op in &ops {
            applier.apply(op, true).expect("apply");
        }
        // Read back level by level (the whole path is too long for a call).
        let deep = sys::open_dir(applier.root(), dir.as_bytes()).expect("deep dir");
        let copy = rustix::fs::openat(&deep, "g", OFlags::RDONLY, Mode::empty()).expect("open g");
        let mut buf = [0u8; 16];
        let len = rustix::io::read(&copy, &mut buf).expect("read");
        assert_eq!(&buf[..len], b"deep");
        let x = sys::get_xattr(
            &sys::proc_entry(deep.as_fd(), OsStr::new("g")),
            OsStr::new("user.k"),
        )
        .expect("xattr");
        assert_eq!(x, b"v");
        drop((copy, deep));
        // Removed whole, iteratively.
        let top = RelPath::new(name.clone()).expect("top");
        applier
            .apply(&Op::Remove { path: top }, true)
            .expect("remove");
        assert_eq!(std::fs::read_dir(&base).expect("readdir").count(), 0);
        let _ = std::fs::remove_dir_all(&base);
    }

    #[test]
    fn symlinks_in_the_copy_are_never_traversed() {
        let d = tmp("escape");
        let outside = tmp("outside");
        std::os::unix::fs::symlink(&outside, d.join("evil")).expect("symlink");
        std::fs::write(outside.join("victim"), b"keep").expect("victim");
        std::os::unix::fs::symlink(outside.join("victim"), d.join("v")).expect("symlink");
        let mut a = Applier::open(&d).expect("open");
        let attempts = [
            Op::Mknod {
                path: p("evil/new"),
                kind: NodeKind::File,
                mode: 0o644,
                rdev: 0,
                uid: 0,
                gid: 0,
                mtime: t(1),
                dir_mtime: t(1),
            },
            Op::Write {
                path: p("evil/victim"),
                offset: 0,
                data: b"pwned".to_vec(),
                mtime: t(1),
            },
            Op::Write {
                path: p("v"),
                offset: 0,
                data: b"pwned".to_vec(),
                mtime: t(1),
            },
            Op::Unlink {
                path: p("evil/victim"),
                dir_mtime: t(1),
            },
            Op::SetAttr {
                path: p("v"),
                mode: Some(0o777),
                uid: None,
                gid: None,
                atime: None,
                mtime: None,
            },
        ];
        for op in &attempts {
            let _ = a.apply(op, true);
        }
        assert_eq!(
            std::fs::read(outside.join("victim")).expect("read"),
            b"keep"
        );
        assert!(!outside.join("new").exists());
        let m = std::fs::metadata(outside.join("victim")).expect("stat");
        assert_ne!(m.mode() & 0o777, 0o777);
        let _ = std::fs::remove_dir_all(&d);
        let _ = std::fs::remove_dir_all(&outside);
    }
}
