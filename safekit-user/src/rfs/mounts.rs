//! Mounts over a replicated directory, outside the FUSE session: the
//! secondary's read-only bind mount, and clean-up of what a crashed daemon
//! left stacked over the directory — only that: a replicated directory may
//! itself be a mount point (the database's own disk), which is never
//! detached. Our FUSE mounts are known by source and type
//! ([`FUSE_SOURCE`]), our bind mount by the unique mount id
//! recorded when it was made ([`BindRecord`]).

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
pub(crate) fn unescape(field: &str) -> PathBuf {
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

/// One line of `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct MountEntry {
    id: u64,
    parent: u64,
    /// The device, `major:minor`.
    dev: String,
    point: PathBuf,
    fstype: String,
    source: String,
}

/// Parses one mountinfo line (`id parent maj:min root point opts [tags] -
/// fstype source superopts`); `None` if malformed.
fn parse_mountinfo_line(line: &str) -> Option<MountEntry> {
    let (left, right) = line.split_once(" - ")?;
    let mut l = left.split(' ');
    let id = l.next()?.parse().ok()?;
    let parent = l.next()?.parse().ok()?;
    let dev = l.next()?.to_owned();
    let point = unescape(l.nth(1)?);
    let mut r = right.split(' ');
    let fstype = r.next()?.to_owned();
    let source = unescape(r.next()?).to_string_lossy().into_owned();
    Some(MountEntry {
        id,
        parent,
        dev,
        point,
        fstype,
        source,
    })
}

/// The mounts stacked exactly on `dir` (this process's mount namespace),
/// bottom first.
fn stack_on(dir: &Path) -> Vec<MountEntry> {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    stack_in(&info, dir)
}

fn stack_in(info: &str, dir: &Path) -> Vec<MountEntry> {
    let on: Vec<MountEntry> = info
        .lines()
        .filter_map(parse_mountinfo_line)
        .filter(|m| m.point == dir)
        .collect();
    // Each mount of the stack is the parent of the next one.
    let mut out = Vec::with_capacity(on.len());
    let mut cur = on.iter().find(|m| !on.iter().any(|o| o.id == m.parent));
    while let Some(m) = cur {
        out.push(m.clone());
        cur = on.iter().find(|o| o.parent == m.id);
        if out.len() > on.len() {
            break;
        }
    }
    out
}

/// The source (FUSE `fsname`) of every FUSE mount safekitd makes: how a
/// restarted daemon recognises its own, with the type (`fuse`, or `fuse.`
/// and the subtype [`FUSE_SUBTYPE`] where the mount carries it).
pub const FUSE_SOURCE: &str = "safekit-rfs";
/// See [`FUSE_SOURCE`].
pub const FUSE_SUBTYPE: &str = "safekit";

fn is_our_fuse(m: &MountEntry) -> bool {
    let fuse = m.fstype == "fuse" || m.fstype.strip_prefix("fuse.") == Some(FUSE_SUBTYPE);
    fuse && m.source == FUSE_SOURCE
}

/// Lifts the kernel's strict per-device dirty-page limit off this daemon's
/// FUSE mount on `dir` (`/sys/class/bdi/<dev>/strict_limit` = 0). The
/// kernel sets it on every FUSE mount against untrusted daemons: the
/// mount's dirty pages are then held to about 1 % of the dirty limit, and
/// every writer beyond it sleeps in the page-cache throttle (PostgreSQL's
/// backends, say, at every dirty buffer they evict). safekitd is trusted
/// (root, its own mount): the mount is then throttled like a local
/// filesystem, by the global limits. Best effort: `Err` says why it could
/// not, the mount works all the same.
pub fn relax_dirty_limit(dir: &Path) -> io::Result<()> {
    let ours = stack_on(dir)
        .into_iter()
        .rev()
        .find(is_our_fuse)
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no safekit FUSE mount"))?;
    std::fs::write(format!("/sys/class/bdi/{}/strict_limit", ours.dev), "0")
}

/// Where a daemon records the read-only bind mount it made over a
/// replicated directory: the boot and the mount's unique id (never reused
/// within a boot), so that only that mount is ever detached — a bind mount
/// looks exactly like the filesystem it binds (an operator's ext4 mounted on
/// the directory, say) in `/proc/self/mountinfo`.
#[derive(Debug, Clone)]
pub struct BindRecord(pub PathBuf);

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// The unique id of the topmost mount at `dir` (`STATX_MNT_ID_UNIQUE`,
/// kernel ≥ 6.8; else the reusable id, tagged so the two never compare
/// equal).
fn mount_id(dir: &Path) -> Option<String> {
    use rustix::fs::{AtFlags, StatxFlags};
    let unique = StatxFlags::from_bits_retain(libc::STATX_MNT_ID_UNIQUE);
    let sx = rustix::fs::statx(
        rustix::fs::CWD,
        dir,
        AtFlags::SYMLINK_NOFOLLOW,
        unique | StatxFlags::MNT_ID,
    )
    .ok()?;
    let tag = if StatxFlags::from_bits_retain(sx.stx_mask).contains(unique) {
        "u"
    } else {
        "r"
    };
    Some(format!("{tag}{}", sx.stx_mnt_id))
}

impl BindRecord {
    fn stamp(dir: &Path) -> Option<String> {
        Some(format!("{} {}\n", boot_id(), mount_id(dir)?))
    }

    /// Records the mount now on top of `dir` as ours.
    fn save(&self, dir: &Path) -> io::Result<()> {
        let stamp = Self::stamp(dir).ok_or_else(|| io::Error::other("no mount id"))?;
        if let Some(parent) = self.0.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&self.0, stamp)
    }

    /// Whether the mount on top of `dir` is the one recorded.
    fn is_top(&self, dir: &Path) -> bool {
        match (std::fs::read_to_string(&self.0), Self::stamp(dir)) {
            (Ok(saved), Some(now)) => saved == now,
            _ => false,
        }
    }

    fn clear(&self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Detaches, from the top of the stack on `dir`, only what safekitd made:
/// its FUSE mounts (with `fuse` set) and the read-only bind mount recorded
/// in `record`. Stops at the first mount that is not ours — an operator's
/// filesystem mounted on the directory (or anything above it) is never
/// touched. Returns how many were detached.
#[must_use = "how many mounts were detached"]
pub fn detach_ours(dir: &Path, record: Option<&BindRecord>, fuse: bool) -> usize {
    let mut n = 0;
    for _ in 0..16 {
        let Some(top) = stack_on(dir).pop() else {
            break;
        };
        let ours = if is_our_fuse(&top) {
            fuse
        } else {
            record.is_some_and(|r| r.is_top(dir))
        };
        if !ours || sys::lazy_unmount(dir).is_err() {
            break;
        }
        if !is_our_fuse(&top)
            && let Some(r) = record
        {
            r.clear();
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
/// it read-only over itself for the application, recording that mount in
/// `record` (see [`BindRecord`]); returns the handle.
pub fn bind_read_only(dir: &Path, record: &BindRecord) -> io::Result<OwnedFd> {
    let fd = open_dir(dir)?;
    rustix::mount::mount_bind(dir, dir).map_err(sys::io)?;
    // Recorded at once: whatever happens next, a restart knows it is ours.
    if let Err(e) = record.save(dir) {
        let _ = sys::lazy_unmount(dir);
        return Err(e);
    }
    // Private: the bind must not propagate to (or from) peer mounts.
    let _ = rustix::mount::mount_change(dir, MountPropagationFlags::PRIVATE);
    if let Err(e) = rustix::mount::mount_remount(dir, MountFlags::BIND | MountFlags::RDONLY, "") {
        let _ = sys::lazy_unmount(dir);
        record.clear();
        return Err(sys::io(e));
    }
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stack_on_a_directory_is_read_bottom_first() {
        let info = "\
22 1 8:1 / / rw - ext4 /dev/vda rw
40 22 7:0 / /srv/data rw,relatime - ext4 /dev/loop0 rw
41 22 0:50 / /srv/other rw - tmpfs tmpfs rw
45 40 7:0 / /srv/data ro,relatime - ext4 /dev/loop0 rw
46 45 0:60 / /srv/data rw - fuse.safekit safekit-rfs rw,user_id=0
50 22 0:61 / /srv/data\\040x rw - tmpfs tmpfs rw
";
        let s = stack_in(info, Path::new("/srv/data"));
        assert_eq!(s.iter().map(|m| m.id).collect::<Vec<_>>(), [40, 45, 46]);
        assert!(is_our_fuse(&s[2]));
        let plain = parse_mountinfo_line("8 1 0:9 / /d rw - fuse safekit-rfs rw").expect("line");
        assert!(is_our_fuse(&plain));
        assert!(!is_our_fuse(&s[0]) && !is_our_fuse(&s[1]));
        assert_eq!(s[0].source, "/dev/loop0");
        assert_eq!(stack_in(info, Path::new("/srv/data x")).len(), 1);
        assert_eq!(stack_in(info, Path::new("/srv")), []);
        // Someone else's FUSE filesystem is not ours.
        let other = parse_mountinfo_line("7 1 0:9 / /d rw - fuse.sshfs host:/x rw").expect("line");
        assert!(!is_our_fuse(&other));
        assert!(parse_mountinfo_line("garbage").is_none());
    }

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape("/a\\040b"), PathBuf::from("/a b"));
        assert_eq!(unescape("/plain"), PathBuf::from("/plain"));
    }
}
