//! Thin system-call helpers shared by the FUSE server and the secondary's
//! applier: every path is resolved from a directory fd with `openat2`
//! (`RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS |
//! RESOLVE_NO_XDEV`), so nothing outside the replicated directory is ever
//! reached, even if the tree holds hostile symlinks. A path longer than one
//! call takes (`PATH_MAX`) is resolved in pieces, each beneath the
//! directory the previous one reached ([`open_beneath`]).

use std::{
    ffi::OsStr,
    io,
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::{Path, PathBuf},
};

use rustix::fs::{
    AtFlags, FileType, Mode, OFlags, ResolveFlags, Stat, Timespec, Timestamps, UTIME_OMIT,
};

use super::proto::Timestamp;

/// How every path below a replicated root is resolved.
pub(crate) const RESOLVE: ResolveFlags = ResolveFlags::BENEATH
    .union(ResolveFlags::NO_SYMLINKS)
    .union(ResolveFlags::NO_MAGICLINKS)
    .union(ResolveFlags::NO_XDEV);

/// rustix's errno as `io::Error`.
pub(crate) fn io(e: rustix::io::Errno) -> io::Error {
    io::Error::from_raw_os_error(e.raw_os_error())
}

/// Longest piece of a relative path resolved by one `openat2`: below
/// `PATH_MAX` (4096 with its NUL), with room to spare. A path from the
/// replicated root may be longer (see [`super::proto::MAX_PATH`]).
pub(crate) const STEP: usize = 4000;

/// `rel` cut at `/` into pieces of whole components, each at most `max`
/// bytes (a component longer than `max` is a piece of its own, which the
/// system call then refuses); none for the root.
pub(crate) fn pieces(rel: &[u8], max: usize) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut rest = rel;
    while !rest.is_empty() {
        if rest.len() <= max {
            out.push(rest);
            break;
        }
        // The last `/` that leaves a piece of at most `max` bytes.
        let cut = rest[..=max]
            .iter()
            .rposition(|&b| b == b'/')
            .filter(|&i| i > 0)
            .or_else(|| rest.iter().position(|&b| b == b'/'));
        let Some(i) = cut else {
            out.push(rest);
            break;
        };
        out.push(&rest[..i]);
        rest = &rest[i + 1..];
    }
    out
}

/// Opens a directory below `root` (read-only, usable as a dirfd and with
/// `futimens`).
pub(crate) fn open_dir(root: BorrowedFd<'_>, rel: &[u8]) -> io::Result<OwnedFd> {
    open_beneath(root, rel, OFlags::RDONLY | OFlags::DIRECTORY)
}

/// Opens a file below `root` with `flags` (symlinks refused).
///
/// The path is resolved piece by piece ([`pieces`] of at most [`STEP`]
/// bytes): each directory on the way is opened (`O_PATH`) beneath the
/// previous one with [`RESOLVE`], so a path of any length is resolved by
/// calls that each take less than `PATH_MAX`, and no piece can leave the
/// directory it starts from (no `..`, no symlink, no mount crossing): the
/// whole stays beneath `root`.
pub(crate) fn open_beneath(root: BorrowedFd<'_>, rel: &[u8], flags: OFlags) -> io::Result<OwnedFd> {
    let open = |at: BorrowedFd<'_>, piece: &[u8], flags: OFlags| {
        rustix::fs::openat2(
            at,
            OsStr::from_bytes(piece),
            flags | OFlags::CLOEXEC | OFlags::NOFOLLOW,
            Mode::empty(),
            RESOLVE,
        )
        .map_err(io)
    };
    // The common case: one call.
    if rel.len() <= STEP {
        return open(root, if rel.is_empty() { b"." } else { rel }, flags);
    }
    let mut pieces = pieces(rel, STEP);
    let last = pieces.pop().unwrap_or(b".");
    let mut here: Option<OwnedFd> = None;
    for piece in pieces {
        let at = here.as_ref().map_or(root, AsFd::as_fd);
        here = Some(open(at, piece, OFlags::PATH | OFlags::DIRECTORY)?);
    }
    open(here.as_ref().map_or(root, AsFd::as_fd), last, flags)
}

/// `fstatat(dir, name, AT_SYMLINK_NOFOLLOW)`.
pub(crate) fn stat_at(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<Stat> {
    rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW).map_err(io)
}

/// Opens `dir/name` itself with `O_PATH` (a symlink is not followed) and
/// stats it through that fd: the handle that pins the inode for as long as
/// the kernel knows it (its number cannot be reused meanwhile), and the
/// attributes of exactly that inode.
pub(crate) fn pin_at(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<(OwnedFd, Stat)> {
    let fd = rustix::fs::openat(
        dir,
        name,
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(io)?;
    let st = fstat(&fd)?;
    Ok((fd, st))
}

/// Opens the inode an `O_PATH` handle pins, with `flags`, through
/// `/proc/self/fd` (the way a process reopens a handle of its own): it
/// reaches the inode whatever its names are now, an unlinked one included.
pub(crate) fn reopen(pin: BorrowedFd<'_>, flags: OFlags) -> io::Result<OwnedFd> {
    rustix::fs::open(proc_fd(pin), flags | OFlags::CLOEXEC, Mode::empty()).map_err(io)
}

/// Raises this process's soft limit of open files to its hard limit: the
/// primary holds one `O_PATH` handle per inode the kernel knows under its
/// mount, as many as the kernel caches.
pub(crate) fn raise_fd_limit() {
    let lim = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    if lim.current < lim.maximum {
        let _ = rustix::process::setrlimit(
            rustix::process::Resource::Nofile,
            rustix::process::Rlimit {
                current: lim.maximum,
                maximum: lim.maximum,
            },
        );
    }
}

/// `fstat(fd)`.
pub(crate) fn fstat(fd: impl AsFd) -> io::Result<Stat> {
    rustix::fs::fstat(fd).map_err(io)
}

/// A stat's mtime.
#[allow(
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::useless_conversion,
    clippy::unnecessary_cast,
    reason = "stat field types differ between architectures; values are in range"
)]
pub(crate) fn mtime(st: &Stat) -> Timestamp {
    Timestamp {
        sec: st.st_mtime as i64,
        nsec: st.st_mtime_nsec as u32,
    }
}

/// A stat's atime.
#[allow(
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::useless_conversion,
    clippy::unnecessary_cast,
    reason = "stat field types differ between architectures; values are in range"
)]
pub(crate) fn atime(st: &Stat) -> Timestamp {
    Timestamp {
        sec: st.st_atime as i64,
        nsec: st.st_atime_nsec as u32,
    }
}

/// A stat's ctime.
#[allow(
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::useless_conversion,
    clippy::unnecessary_cast,
    reason = "stat field types differ between architectures; values are in range"
)]
pub(crate) fn ctime(st: &Stat) -> Timestamp {
    Timestamp {
        sec: st.st_ctime as i64,
        nsec: st.st_ctime_nsec as u32,
    }
}

/// The stat's permission bits.
pub(crate) fn perm(st: &Stat) -> u32 {
    st.st_mode & 0o7777
}

/// The stat's file type.
pub(crate) fn file_type(st: &Stat) -> FileType {
    FileType::from_raw_mode(st.st_mode)
}

fn timespec(t: Option<Timestamp>) -> Timespec {
    match t {
        Some(t) => Timespec {
            tv_sec: t.sec,
            tv_nsec: i64::from(t.nsec),
        },
        None => Timespec {
            tv_sec: 0,
            tv_nsec: UTIME_OMIT,
        },
    }
}

/// Sets times of `dir/name` without following a symlink (`None`: unchanged).
pub(crate) fn set_times_at(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    atime: Option<Timestamp>,
    mtime: Option<Timestamp>,
) -> io::Result<()> {
    let ts = Timestamps {
        last_access: timespec(atime),
        last_modification: timespec(mtime),
    };
    rustix::fs::utimensat(dir, name, &ts, AtFlags::SYMLINK_NOFOLLOW).map_err(io)
}

/// Sets the mtime of an open file or directory.
pub(crate) fn set_fd_mtime(fd: BorrowedFd<'_>, mtime: Timestamp) -> io::Result<()> {
    let ts = Timestamps {
        last_access: timespec(None),
        last_modification: timespec(Some(mtime)),
    };
    rustix::fs::futimens(fd, &ts).map_err(io)
}

/// `/proc/self/fd/N`: the inode an fd refers to, as a path.
pub(crate) fn proc_fd(fd: BorrowedFd<'_>) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// `/proc/self/fd/N/name`: for the `l*xattr` calls, which then act on `name`
/// itself (never on a symlink's target) inside the directory `dir`.
pub(crate) fn proc_entry(dir: BorrowedFd<'_>, name: &OsStr) -> PathBuf {
    let mut p = proc_fd(dir);
    p.push(name);
    p
}

/// chmod `dir/name` without following it if it is a symlink (symlinks have
/// no mode of their own on Linux: nothing to do then).
pub(crate) fn chmod_at(dir: BorrowedFd<'_>, name: &OsStr, mode: u32) -> io::Result<()> {
    let fd = rustix::fs::openat(
        dir,
        name,
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(io)?;
    if file_type(&fstat(&fd)?) == FileType::Symlink {
        return Ok(());
    }
    rustix::fs::chmod(proc_fd(fd.as_fd()), Mode::from_raw_mode(mode)).map_err(io)
}

/// chown `dir/name` without following a symlink.
pub(crate) fn chown_at(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    uid: Option<u32>,
    gid: Option<u32>,
) -> io::Result<()> {
    rustix::fs::chownat(
        dir,
        name,
        uid.map(rustix::fs::Uid::from_raw),
        gid.map(rustix::fs::Gid::from_raw),
        AtFlags::SYMLINK_NOFOLLOW,
    )
    .map_err(io)
}

/// Writes all of `data` at `offset`.
/// Bytes written to a file (or, on the secondary, to its copy) after
/// which the disk writeback of its dirty pages is started
/// ([`start_writeback`]): a later fsync then finds most of them written
/// instead of writing them all while the application waits.
pub(crate) const WRITEBACK_AFTER: u64 = 8 << 20;

/// Starts writing `fd`'s dirty pages to disk without waiting for them
/// (`sync_file_range(SYNC_FILE_RANGE_WRITE)`): a hint, its failure ignored;
/// durability still comes from fsync.
pub(crate) fn start_writeback(fd: BorrowedFd<'_>) {
    // SAFETY: a valid fd for the duration of the call; no memory is passed.
    unsafe {
        libc::sync_file_range(fd.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
    }
}

pub(crate) fn write_all_at(fd: BorrowedFd<'_>, mut data: &[u8], mut offset: u64) -> io::Result<()> {
    while !data.is_empty() {
        match rustix::io::pwrite(fd, data, offset) {
            Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero)),
            Ok(n) => {
                data = &data[n..];
                offset += n as u64;
            }
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(io(e)),
        }
    }
    Ok(())
}

/// Lazily detaches whatever is mounted on `path` (`umount2(MNT_DETACH)`).
pub(crate) fn lazy_unmount(path: &Path) -> io::Result<()> {
    rustix::mount::unmount(path, rustix::mount::UnmountFlags::DETACH).map_err(io)
}

/// Reads an xattr list (`\0`-separated) of the object at `path` (not followed).
pub(crate) fn list_xattrs(path: &Path) -> io::Result<Vec<u8>> {
    loop {
        let n = rustix::fs::llistxattr_query(path).map_err(io)?;
        let mut buf = vec![0u8; n];
        match rustix::fs::llistxattr(path, &mut buf[..]) {
            Ok(m) => {
                buf.truncate(m);
                return Ok(buf);
            }
            Err(rustix::io::Errno::RANGE) => {}
            Err(e) => return Err(io(e)),
        }
    }
}

/// Reads one xattr of the object at `path` (not followed).
pub(crate) fn get_xattr(path: &Path, name: &OsStr) -> io::Result<Vec<u8>> {
    loop {
        let n = rustix::fs::lgetxattr_query(path, name).map_err(io)?;
        let mut buf = vec![0u8; n];
        match rustix::fs::lgetxattr(path, name, &mut buf[..]) {
            Ok(m) => {
                buf.truncate(m);
                return Ok(buf);
            }
            Err(rustix::io::Errno::RANGE) => {}
            Err(e) => return Err(io(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_paths_are_cut_into_whole_components() {
        assert_eq!(pieces(b"", 10), [] as [&[u8]; 0]);
        assert_eq!(pieces(b"a/b/c", 10), [&b"a/b/c"[..]]);
        assert_eq!(pieces(b"aaa/bbb/ccc", 7), [&b"aaa/bbb"[..], b"ccc"]);
        assert_eq!(pieces(b"aaa/bbb/ccc", 6), [&b"aaa"[..], b"bbb", b"ccc"]);
        // A component longer than the bound stays whole (and is refused by
        // the system call, as it would be anyway).
        assert_eq!(pieces(b"a/bbbbbbbb/c", 4), [&b"a"[..], b"bbbbbbbb", b"c"]);
        assert_eq!(pieces(b"bbbbbbbb", 4), [&b"bbbbbbbb"[..]]);
        // 45 levels of 200 bytes: pieces under PATH_MAX whose components
        // rebuild the path.
        let name = "n".repeat(200);
        let deep = vec![name.as_str(); 45].join("/");
        let got = pieces(deep.as_bytes(), STEP);
        assert!(got.len() >= 2);
        assert!(got.iter().all(|p| p.len() <= STEP && !p.is_empty()));
        assert_eq!(got.join(&b'/'), deep.as_bytes());
    }

    #[test]
    fn paths_longer_than_path_max_open_beneath_the_root() {
        let base = std::env::temp_dir().join(format!("rfs-sys-deep-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(base.join("root")).expect("mkdir");
        let root = rustix::fs::open(
            base.join("root"),
            OFlags::RDONLY | OFlags::DIRECTORY,
            Mode::empty(),
        )
        .expect("open root");
        // 45 levels of 200-byte names, made level by level.
        let name = "d".repeat(200);
        let mut here = root.try_clone().expect("dup");
        for _ in 0..45 {
            rustix::fs::mkdirat(&here, name.as_str(), Mode::from_raw_mode(0o755)).expect("mkdirat");
            here = rustix::fs::openat(&here, name.as_str(), OFlags::RDONLY, Mode::empty())
                .expect("openat");
        }
        let deep = vec![name.as_str(); 45].join("/");
        assert!(deep.len() > 2 * 4096);
        let d = open_dir(root.as_fd(), deep.as_bytes()).expect("deep directory");
        assert_eq!(
            fstat(&d).expect("stat").st_ino,
            fstat(&here).expect("stat").st_ino
        );
        // A symlink anywhere on the way is refused, in any piece.
        std::os::unix::fs::symlink(&base, base.join("root").join("link")).expect("symlink");
        let via_link = format!("link/root/{deep}");
        assert!(open_dir(root.as_fd(), via_link.as_bytes()).is_err());
        rustix::fs::symlinkat(&base, &here, "esc").expect("deep symlink");
        let deep_link = format!("{deep}/esc/root");
        assert!(open_dir(root.as_fd(), deep_link.as_bytes()).is_err());
        assert!(open_dir(here.as_fd(), b"esc/root").is_err());
        // `..` never leaves the directory a piece starts from: not from a
        // deep directory, not from the root.
        assert!(open_dir(here.as_fd(), b"..").is_err());
        assert!(open_dir(root.as_fd(), format!("../{deep}").as_bytes()).is_err());
        let _ = std::fs::remove_dir_all(&base);
    }
}
