//! Reading a tree by directory fds, shared by the rfs tests: no syscall is
//! given more than one name, so trees deeper than `PATH_MAX` are read too.
#![allow(dead_code, unreachable_pub, reason = "each test binary uses a subset")]

use std::{
    ffi::OsStr,
    fs::File,
    io::Read as _,
    os::{fd::OwnedFd, unix::ffi::OsStrExt as _},
    path::{Path, PathBuf},
};

use rustix::fs::{AtFlags, Mode, OFlags, Stat};

/// The names in directory `dir` (without `.` and `..`).
pub fn list(dir: &OwnedFd) -> rustix::io::Result<Vec<Vec<u8>>> {
    let mut d = rustix::fs::Dir::read_from(dir)?;
    let mut out = Vec::new();
    while let Some(e) = d.read() {
        let name = e?.file_name().to_bytes().to_vec();
        if name != b"." && name != b".." {
            out.push(name);
        }
    }
    Ok(out)
}

/// `dir/name` (a directory, never through a symlink) opened.
pub fn open_sub<P: rustix::path::Arg>(dir: &OwnedFd, name: P) -> rustix::io::Result<OwnedFd> {
    rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
}

/// The whole content of `dir/name` (never through a symlink).
pub fn read_at<P: rustix::path::Arg>(dir: &OwnedFd, name: P) -> std::io::Result<Vec<u8>> {
    let fd = rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let mut data = Vec::new();
    File::from(fd).read_to_end(&mut data)?;
    Ok(data)
}

/// Calls `visit(path from the top, its directory, its name, its lstat)`
/// for every entry below the directory `top`, going into subdirectories
/// (entries that vanish meanwhile are skipped).
pub fn walk(top: OwnedFd, mut visit: impl FnMut(&Path, &OwnedFd, &OsStr, &Stat)) {
    let mut stack = vec![(PathBuf::new(), top)];
    while let Some((rel, dir)) = stack.pop() {
        let Ok(names) = list(&dir) else {
            continue;
        };
        for name in names {
            let name = OsStr::from_bytes(&name);
            let Ok(st) = rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW) else {
                continue;
            };
            let path = rel.join(name);
            visit(&path, &dir, name, &st);
            if rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::Directory
                && let Ok(sub) = open_sub(&dir, name)
            {
                stack.push((path, sub));
            }
        }
    }
}
