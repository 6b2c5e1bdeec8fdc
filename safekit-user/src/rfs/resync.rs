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

/// Emits the operations that bring `path` on the secondary to its state
/// here, for the recorded `changes`.
#[expect(
    clippy::too_many_lines,
    reason = "one path in order: entry, content, children, times"
)]
pub fn item_ops(
    root: &OwnedFd,
    path: &RelPath,
    changes: &PathChanges,
    emit: &mut Emit<'_>,
    done: &dyn Fn(),
) -> Result<(), ItemError> {
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
                let fd = sys::open_beneath(
                    root.as_fd(),
                    path.as_bytes(),
                    OFlags::RDONLY | OFlags::NONBLOCK,
                )?;
                let mtime = sys::mtime(&st);
                for (start, end) in ranges {
                    file_range(fd.as_fd(), path, start, end, mtime, emit)?;
                }
            }
        }
        EntryKind::Dir if changes.tree => {
            let sub = if path.is_root() {
                sys::open_dir(root.as_fd(), b"")?
            } else {
                sys::open_dir(root.as_fd(), path.as_bytes())?
            };
            let names = apply::list_dir(sub.as_fd())?;
            if names.len() > proto::MAX_PRUNE {
                return Err(io::Error::from_raw_os_error(libc::EFBIG).into());
            }
            emit(Op::Prune {
                path: path.clone(),
                keep: names.clone(),
            })?;
            let whole = PathChanges {
                tree: true,
                ..PathChanges::default()
            };
            for n in names {
                let child = path
                    .join(&n)
                    .map_err(|_| io::Error::from_raw_os_error(libc::ENAMETOOLONG))?;
                item_ops(root, &child, &whole, emit, done)?;
            }
        }
        _ => {}
    }
    emit(Op::SetAttr {
        path: path.clone(),
        mode: None,
        uid: None,
        gid: None,
        atime: Some(sys::atime(&st)),
        mtime: Some(sys::mtime(&st)),
    })?;
    done();
    Ok(())
}

/// Paths and data bytes below (and including) `path`, for the progress
/// totals of a subtree before it is sent.
pub fn count_tree(root: &OwnedFd, path: &RelPath) -> io::Result<(u64, u64)> {
    let (mut paths, mut bytes) = (1u64, 0u64);
    let st = if path.is_root() {
        sys::fstat(root)?
    } else {
        let (parent, name) = path
            .split()
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let d = sys::open_dir(root.as_fd(), parent)?;
        sys::stat_at(d.as_fd(), OsStr::from_bytes(name))?
    };
    match sys::file_type(&st) {
        FileType::RegularFile => {
            bytes += u64::try_from(st.st_size)
                .unwrap_or(0)
                .min(u64::try_from(st.st_blocks).unwrap_or(0) * 512);
        }
        FileType::Directory => {
            let d = sys::open_dir(root.as_fd(), path.as_bytes())?;
            for n in apply::list_dir(d.as_fd())? {
                let child = path
                    .join(&n)
                    .map_err(|_| io::Error::from_raw_os_error(libc::ENAMETOOLONG))?;
                match count_tree(root, &child) {
                    Ok((p, b)) => {
                        paths += p;
                        bytes += b;
                    }
                    // Gone meanwhile.
                    Err(e) if is_enoent(&e) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        _ => {}
    }
    Ok((paths, bytes))
}

/// The path is gone here: gone there too.
fn removed(path: &RelPath, emit: &mut Emit<'_>, done: &dyn Fn()) -> Result<(), ItemError> {
    emit(Op::Remove { path: path.clone() })?;
    done();
    Ok(())
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
