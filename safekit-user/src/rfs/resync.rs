//! Resynchronisation: turns what the journal recorded about a path (byte
//! ranges, the entry, the whole subtree) into the operations that make the
//! secondary's copy of it equal to the primary's, reading the primary's real
//! directory (never through the FUSE mount).
//!
//! Per path: absent here → [`Op::Remove`]; else [`Op::Put`] (kind, mode,
//! owner, size, xattrs), then for a file the recorded ranges (whole file for
//! a subtree) as [`Op::Write`] for data and [`Op::Hole`] for holes found with
//! `SEEK_DATA`/`SEEK_HOLE`, for a subtree directory [`Op::Prune`] and every
//! child, and last the times ([`Op::SetAttr`]) so the writes do not move them.

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
    journal::PathChanges,
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

/// Where the operations go: `emit(op)`; `Err` when the link is gone.
pub type Emit<'a> = dyn FnMut(Op) -> Result<(), ItemError> + 'a;

fn is_enoent(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR))
}

/// What [`visit`] found at a path.
enum Visited {
    /// Gone here: removed there (already emitted and counted).
    Removed,
    /// The entry (and a file's content) is sent; its times go last, after
    /// the children of a directory sent whole (their names, in order).
    Sent {
        times: (proto::Timestamp, proto::Timestamp),
        children: Option<Vec<Vec<u8>>>,
    },
}

/// A directory being sent whole: its path, the children left, its times.
struct Frame {
    path: RelPath,
    children: std::vec::IntoIter<Vec<u8>>,
    times: (proto::Timestamp, proto::Timestamp),
}

/// Emits the operations that bring `path` on the secondary to its state
/// here, for the recorded `changes`.
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
    emit: &mut Emit<'_>,
    done: &dyn Fn(),
) -> Result<(), ItemError> {
    let whole = PathChanges {
        tree: true,
        ..PathChanges::default()
    };
    let mut stack: Vec<Frame> = Vec::new();
    let mut next = Some((path.clone(), changes));
    loop {
        if let Some((path, changes)) = next.take() {
            match visit(root, &path, changes, emit, done)? {
                Visited::Removed => {}
                Visited::Sent {
                    times,
                    children: None,
                } => times_last(&path, times, emit, done)?,
                Visited::Sent {
                    times,
                    children: Some(names),
                } => stack.push(Frame {
                    path,
                    children: names.into_iter(),
                    times,
                }),
            }
        }
        let Some(top) = stack.last_mut() else {
            return Ok(());
        };
        match top.children.next() {
            Some(name) => {
                let child = top
                    .path
                    .join(&name)
                    .map_err(|_| io::Error::from_raw_os_error(libc::ENAMETOOLONG))?;
                next = Some((child, &whole));
            }
            None => {
                if let Some(f) = stack.pop() {
                    times_last(&f.path, f.times, emit, done)?;
                }
            }
        }
    }
}

/// The times of `path`, sent after its content and children.
fn times_last(
    path: &RelPath,
    (atime, mtime): (proto::Timestamp, proto::Timestamp),
    emit: &mut Emit<'_>,
    done: &dyn Fn(),
) -> Result<(), ItemError> {
    emit(Op::SetAttr {
        path: path.clone(),
        mode: None,
        uid: None,
        gid: None,
        atime: Some(atime),
        mtime: Some(mtime),
    })?;
    done();
    Ok(())
}

/// The entry at `path`: [`Op::Put`], a file's recorded ranges, a directory's
/// [`Op::Prune`] when sent whole (its children are the caller's to send).
fn visit(
    root: &OwnedFd,
    path: &RelPath,
    changes: &PathChanges,
    emit: &mut Emit<'_>,
    done: &dyn Fn(),
) -> Result<Visited, ItemError> {
    // The entry and its parent directory (the root: itself).
    let (dir, name): (OwnedFd, &OsStr) = if path.is_root() {
        (sys::open_dir(root.as_fd(), b"")?, OsStr::new("."))
    } else {
        let (parent, name) = path
            .split()
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        match sys::open_dir(root.as_fd(), parent) {
            Ok(d) => (d, OsStr::from_bytes(name)),
            Err(e) if is_enoent(&e) => return removed(path, emit, done),
            Err(e) => return Err(e.into()),
        }
    };
    let st = match sys::stat_at(dir.as_fd(), name) {
        Ok(st) => st,
        Err(e) if is_enoent(&e) && !path.is_root() => {
            return removed(path, emit, done);
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
    emit(Op::Put {
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
    })?;
    let times = (sys::atime(&st), sys::mtime(&st));
    // The entry itself, beneath its parent (one short piece).
    let open = |flags| sys::open_beneath(dir.as_fd(), name.as_bytes(), flags);
    match kind {
        EntryKind::Node(NodeKind::File) => {
            let ranges: Vec<(u64, u64)> = if changes.tree {
                vec![(0, size)]
            } else {
                changes
                    .ranges
                    .iter()
                    .map(|(s, e)| (s.min(size), e.min(size)))
                    .filter(|(s, e)| s < e)
                    .collect()
            };
            if !ranges.is_empty() {
                let fd = open(OFlags::RDONLY | OFlags::NONBLOCK)?;
                let mtime = sys::mtime(&st);
                for (start, end) in ranges {
                    file_range(fd.as_fd(), path, start, end, mtime, emit)?;
                }
            }
        }
        EntryKind::Dir if changes.tree => {
            let sub = open(OFlags::RDONLY | OFlags::DIRECTORY)?;
            let names = apply::list_dir(sub.as_fd())?;
            if names.len() > proto::MAX_PRUNE {
                return Err(io::Error::from_raw_os_error(libc::EFBIG).into());
            }
            emit(Op::Prune {
                path: path.clone(),
                keep: names.clone(),
            })?;
            return Ok(Visited::Sent {
                times,
                children: Some(names),
            });
        }
        _ => {}
    }
    Ok(Visited::Sent {
        times,
        children: None,
    })
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
fn removed(path: &RelPath, emit: &mut Emit<'_>, done: &dyn Fn()) -> Result<Visited, ItemError> {
    emit(Op::Remove { path: path.clone() })?;
    done();
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

/// Data and holes of `[start, end)`.
fn file_range(
    fd: BorrowedFd<'_>,
    path: &RelPath,
    start: u64,
    end: u64,
    mtime: proto::Timestamp,
    emit: &mut Emit<'_>,
) -> Result<(), ItemError> {
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
            emit(Op::Hole {
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
            emit(Op::Write {
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
