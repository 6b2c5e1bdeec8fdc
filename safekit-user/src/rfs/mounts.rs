//! Mounts over a replicated directory, outside the FUSE session: the
//! secondary's read-only bind mount, and clean-up of whatever a crashed
//! daemon left stacked over the directory.

use std::{
    io,
    os::fd::OwnedFd,
    path::{Path, PathBuf},
};

use rustix::{
    fs::{Mode, OFlags},
    mount::{MountFlags, MountPropagationFlags},
};

use super::sys;

/// Undoes the octal escapes of `/proc/self/mountinfo` (`\040` for a space).
fn unescape(field: &str) -> PathBuf {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && let Ok(v) = u8::from_str_radix(&field[i + 1..i + 4], 8)
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    PathBuf::from(<std::ffi::OsString as std::os::unix::ffi::OsStringExt>::from_vec(out))
}

/// How many mounts sit exactly on `dir` (this process's mount namespace).
#[must_use]
pub fn mounts_on(dir: &Path) -> usize {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return 0;
    };
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| unescape(m) == dir)
        .count()
}

/// The filesystem type of the topmost mount on `dir`, if any.
#[must_use]
pub fn top_fstype(dir: &Path) -> Option<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines()
        .rev()
        .filter(|l| l.split(' ').nth(4).is_some_and(|m| unescape(m) == dir))
        .find_map(|l| l.split(" - ").nth(1)?.split(' ').next().map(str::to_owned))
}

/// Detaches the read-only bind mounts stacked on `dir`, never a FUSE mount
/// (a primary may have mounted one meanwhile); returns how many.
#[must_use = "how many mounts were detached"]
pub fn detach_binds(dir: &Path) -> usize {
    let mut n = 0;
    for _ in 0..16 {
        match top_fstype(dir) {
            Some(t) if !t.starts_with("fuse") => {
                if sys::lazy_unmount(dir).is_err() {
                    break;
                }
                n += 1;
            }
            _ => break,
        }
    }
    n
}

/// Detaches every mount stacked on `dir` (a dead FUSE mount, a read-only
/// bind mount), lazily; returns how many.
#[must_use = "how many mounts were detached"]
pub fn detach_all(dir: &Path) -> usize {
    let mut n = 0;
    for _ in 0..16 {
        if mounts_on(dir) == 0 {
            break;
        }
        if sys::lazy_unmount(dir).is_err() {
            break;
        }
        n += 1;
    }
    n
}

/// Opens directory `dir` (read-only, close-on-exec): the handle a primary
/// reads beneath its FUSE mount, or a secondary writes beneath its
/// read-only bind mount.
pub fn open_dir(dir: &Path) -> io::Result<OwnedFd> {
    rustix::fs::open(
        dir,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(sys::io)
}

/// Opens `dir` (the handle the secondary writes through), then bind-mounts
/// it read-only over itself for the application; returns the handle.
pub fn bind_read_only(dir: &Path) -> io::Result<OwnedFd> {
    let fd = open_dir(dir)?;
    rustix::mount::mount_bind(dir, dir).map_err(sys::io)?;
    // Private: the bind must not propagate to (or from) peer mounts.
    let _ = rustix::mount::mount_change(dir, MountPropagationFlags::PRIVATE);
    if let Err(e) = rustix::mount::mount_remount(dir, MountFlags::BIND | MountFlags::RDONLY, "") {
        let _ = sys::lazy_unmount(dir);
        return Err(sys::io(e));
    }
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape("/a\\040b"), PathBuf::from("/a b"));
        assert_eq!(unescape("/plain"), PathBuf::from("/plain"));
    }
}
