//! `safekit rfs verify`: both copies of a replicated directory compared by
//! content checksum (BLAKE3), kind, mode, owner, size, mtime, extended
//! attributes (ACLs included), device numbers and hard-link grouping.
//!
//! The primary computes the manifest of its real directory (beneath the
//! FUSE mount), opens a verification connection to the secondary (same
//! authenticated channel, [`Message::Verify`] instead of a hello), receives
//! the secondary's manifest and lists the differences. Changes the
//! application makes meanwhile show up as differences: verify a quiet
//! directory, or run it twice.

use std::{
    collections::BTreeMap,
    ffi::OsStr,
    io,
    net::SocketAddr,
    os::{
        fd::{AsFd, BorrowedFd},
        unix::ffi::OsStrExt,
    },
    time::Duration,
};

use rustix::fs::{FileType, OFlags};

use super::{
    RfsError, apply,
    channel::{self, ChannelKey, ChannelSender},
    proto::{self, MANIFEST_CHUNK, ManifestEntry, Message, RelPath, Timestamp},
    sys,
};

/// The manifest of the tree below `root`, in path order.
pub fn manifest(root: BorrowedFd<'_>) -> io::Result<Vec<ManifestEntry>> {
    let mut out = Vec::new();
    walk(root, &RelPath::root(), &mut out)?;
    out.sort_by(|a, b| a.0.path.cmp(&b.0.path));
    // Hard links: every path of an inode named more than once in the tree
    // points at the first of them.
    let mut first: BTreeMap<u64, (RelPath, usize)> = BTreeMap::new();
    for (e, ino) in out.iter().filter(|(_, ino)| *ino != 0) {
        first
            .entry(*ino)
            .and_modify(|f| f.1 += 1)
            .or_insert((e.path.clone(), 1));
    }
    Ok(out
        .into_iter()
        .map(|(mut e, ino)| {
            if let Some((p, n)) = first.get(&ino)
                && *n > 1
            {
                e.link = p.as_bytes().to_vec();
            }
            e
        })
        .collect())
}

/// BLAKE3 of the extended attributes of `dir/name` (names sorted, each name
/// and value length-prefixed); empty when it has none.
fn xattrs_digest(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<Vec<u8>> {
    let path = sys::proc_entry(dir, name);
    let list = match sys::list_xattrs(&path) {
        Ok(l) => l,
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut names: Vec<&[u8]> = list.split(|b| *b == 0).filter(|n| !n.is_empty()).collect();
    if names.is_empty() {
        return Ok(Vec::new());
    }
    names.sort_unstable();
    let mut h = blake3::Hasher::new();
    for n in names {
        let value = sys::get_xattr(&path, OsStr::from_bytes(n))?;
        h.update(&(n.len() as u64).to_le_bytes());
        h.update(n);
        h.update(&(value.len() as u64).to_le_bytes());
        h.update(&value);
    }
    Ok(h.finalize().as_bytes().to_vec())
}

/// Entries with their inode number when it has several links (else 0).
///
/// Walked without recursion: a stack of directories with the names of the
/// subdirectories left, each directory opened from the root piece by piece
/// ([`sys::open_dir`]) and its entries reached through it, so a tree of any
/// depth is read with one directory open at a time.
fn walk(
    root: BorrowedFd<'_>,
    top: &RelPath,
    out: &mut Vec<(ManifestEntry, u64)>,
) -> io::Result<()> {
    let mut stack: Vec<(RelPath, std::vec::IntoIter<Vec<u8>>)> = Vec::new();
    let mut next = Some(top.clone());
    loop {
        if let Some(dir) = next.take() {
            match sys::open_dir(root, dir.as_bytes()) {
                Ok(d) => {
                    let subdirs = entries(d.as_fd(), &dir, out)?;
                    stack.push((dir, subdirs.into_iter()));
                }
                // Removed meanwhile.
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) && dir != *top => {}
                Err(e) => return Err(e),
            }
        }
        let Some((dir, subdirs)) = stack.last_mut() else {
            return Ok(());
        };
        match subdirs.next() {
            Some(name) => {
                next = Some(
                    dir.join(&name)
                        .map_err(|_| io::Error::from_raw_os_error(libc::ENAMETOOLONG))?,
                );
            }
            None => {
                stack.pop();
            }
        }
    }
}

/// The entries of directory `d` (at `dir`) into `out`; the names of its
/// subdirectories.
fn entries(
    d: BorrowedFd<'_>,
    dir: &RelPath,
    out: &mut Vec<(ManifestEntry, u64)>,
) -> io::Result<Vec<Vec<u8>>> {
    let mut subdirs = Vec::new();
    for name in apply::list_dir(d)? {
        let path = dir
            .join(&name)
            .map_err(|_| io::Error::from_raw_os_error(libc::ENAMETOOLONG))?;
        let name = OsStr::from_bytes(&name);
        let st = match sys::stat_at(d, name) {
            Ok(st) => st,
            // Removed meanwhile.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
            Err(e) => return Err(e),
        };
        let ft = sys::file_type(&st);
        let (kind, digest, mtime) = match ft {
            FileType::RegularFile => match hash_file(d, name) {
                Ok(h) => (0, h, sys::mtime(&st)),
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
                Err(e) => return Err(e),
            },
            FileType::Directory => (1, Vec::new(), Timestamp::default()),
            FileType::Symlink => (
                2,
                rustix::fs::readlinkat(d, name, Vec::new())
                    .map_err(sys::io)?
                    .into_bytes(),
                sys::mtime(&st),
            ),
            _ => (3, Vec::new(), sys::mtime(&st)),
        };
        let xattrs = match xattrs_digest(d, name) {
            Ok(x) => x,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
            Err(e) => return Err(e),
        };
        let device = matches!(ft, FileType::CharacterDevice | FileType::BlockDevice);
        let linked = kind != 1 && st.st_nlink > 1;
        out.push((
            ManifestEntry {
                path,
                kind,
                mode: sys::perm(&st),
                uid: st.st_uid,
                gid: st.st_gid,
                size: if kind == 0 {
                    u64::try_from(st.st_size).unwrap_or(0)
                } else {
                    0
                },
                mtime,
                digest,
                xattrs,
                rdev: if device { st.st_rdev } else { 0 },
                link: Vec::new(),
            },
            if linked { st.st_ino } else { 0 },
        ));
        if kind == 1 {
            subdirs.push(name.as_bytes().to_vec());
        }
    }
    Ok(subdirs)
}

/// BLAKE3 of the content of `dir/name`.
fn hash_file(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<Vec<u8>> {
    let fd = sys::open_beneath(dir, name.as_bytes(), OFlags::RDONLY | OFlags::NONBLOCK)?;
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0u64;
    loop {
        let n = rustix::io::pread(&fd, &mut buf, at).map_err(sys::io)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        at += n as u64;
    }
    Ok(h.finalize().as_bytes().to_vec())
}

/// Bytes of manifest entries in one [`Message::Manifest`] at most (besides
/// [`MANIFEST_CHUNK`] entries): far below the channel's largest message,
/// whatever the paths' length.
const MANIFEST_BYTES: usize = 4 << 20;

/// The entries cut into messages of at most [`MANIFEST_CHUNK`] entries and
/// about [`MANIFEST_BYTES`] bytes.
fn manifest_chunks(entries: &[ManifestEntry]) -> Vec<&[ManifestEntry]> {
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0, 0usize);
    for (i, e) in entries.iter().enumerate() {
        let size = e.path.as_bytes().len() + e.digest.len() + e.xattrs.len() + e.link.len() + 64;
        if i > start && (i - start >= MANIFEST_CHUNK || bytes + size > MANIFEST_BYTES) {
            out.push(&entries[start..i]);
            start = i;
            bytes = 0;
        }
        bytes += size;
    }
    if start < entries.len() {
        out.push(&entries[start..]);
    }
    out
}

/// Sends the manifest of `root` on a verification connection.
pub(crate) fn send_manifest(tx: &mut ChannelSender, root: BorrowedFd<'_>) -> Result<(), String> {
    let entries = manifest(root).map_err(|e| format!("manifest: {e}"))?;
    for chunk in manifest_chunks(&entries) {
        tx.send(&Message::Manifest {
            entries: chunk.to_vec(),
        })
        .map_err(|e| e.to_string())?;
    }
    tx.send(&Message::ManifestEnd).map_err(|e| e.to_string())
}

/// Fetches the secondary's manifest of `dir`.
pub fn remote_manifest(
    peer: SocketAddr,
    key: &ChannelKey,
    dir: &str,
    timeout: Duration,
) -> Result<Vec<ManifestEntry>, RfsError> {
    let chan = |source| RfsError::Channel {
        dir: dir.to_string(),
        peer,
        source,
    };
    let (_tx, mut rx) = channel::dial(
        peer,
        key,
        timeout,
        &Message::Verify {
            version: proto::VERSION,
            dir: dir.to_string(),
        },
    )
    .map_err(chan)?;
    // Hashing a large copy takes time: bound each wait, not the whole.
    rx.set_read_timeout(Some(Duration::from_secs(600)))
        .map_err(chan)?;
    let mut out = Vec::new();
    loop {
        match rx.recv().map_err(chan)? {
            Message::Manifest { entries } => out.extend(entries),
            Message::ManifestEnd => return Ok(out),
            Message::Bye { reason } => {
                return Err(RfsError::Refused {
                    dir: dir.to_string(),
                    peer,
                    reason,
                });
            }
            other => {
                return Err(RfsError::Refused {
                    dir: dir.to_string(),
                    peer,
                    reason: format!("unexpected {other:?}"),
                });
            }
        }
    }
}

/// The differences between the primary's manifest and the secondary's, one
/// line each (empty: equal).
#[must_use]
pub fn compare(primary: &[ManifestEntry], secondary: &[ManifestEntry]) -> Vec<String> {
    let a: BTreeMap<&RelPath, &ManifestEntry> = primary.iter().map(|e| (&e.path, e)).collect();
    let b: BTreeMap<&RelPath, &ManifestEntry> = secondary.iter().map(|e| (&e.path, e)).collect();
    let mut out = Vec::new();
    for (p, x) in &a {
        match b.get(p) {
            None => out.push(format!("only on the primary: {p}")),
            Some(y) => {
                let mut what = Vec::new();
                if x.kind == y.kind {
                    if x.digest != y.digest {
                        what.push(if x.kind == 2 { "target" } else { "content" });
                    }
                    if x.size != y.size {
                        what.push("size");
                    }
                    if x.mtime != y.mtime {
                        what.push("mtime");
                    }
                } else {
                    what.push("kind");
                }
                if x.mode != y.mode {
                    what.push("mode");
                }
                if (x.uid, x.gid) != (y.uid, y.gid) {
                    what.push("owner");
                }
                if x.xattrs != y.xattrs {
                    what.push("xattrs");
                }
                if x.rdev != y.rdev {
                    what.push("device number");
                }
                if x.link != y.link {
                    what.push("hard links");
                }
                if !what.is_empty() {
                    out.push(format!("{} differs: {p}", what.join(", ")));
                }
            }
        }
    }
    for p in b.keys() {
        if !a.contains_key(p) {
            out.push(format!("only on the secondary: {p}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(path: &str, digest: u8) -> ManifestEntry {
        ManifestEntry {
            path: RelPath::new(path).expect("path"),
            kind: 0,
            mode: 0o644,
            uid: 0,
            gid: 0,
            size: 1,
            mtime: Timestamp { sec: 1, nsec: 0 },
            digest: vec![digest; 32],
            xattrs: Vec::new(),
            rdev: 0,
            link: Vec::new(),
        }
    }

    #[test]
    fn differences_are_named() {
        let a = vec![e("a", 1), e("b", 1), e("c", 1)];
        let mut c2 = e("c", 1);
        c2.mode = 0o600;
        let mut xattr = e("x", 1);
        xattr.xattrs = vec![1; 32];
        let mut dev = e("y", 1);
        dev.rdev = 0x0801;
        let mut link = e("z", 1);
        link.link = b"x".to_vec();
        let a = [a, vec![e("x", 1), e("y", 1), e("z", 1)]].concat();
        let b = vec![e("b", 2), c2, e("d", 1), xattr, dev, link];
        assert_eq!(
            compare(&a, &b),
            vec![
                "only on the primary: a".to_string(),
                "content differs: b".into(),
                "mode differs: c".into(),
                "xattrs differs: x".into(),
                "device number differs: y".into(),
                "hard links differs: z".into(),
                "only on the secondary: d".into(),
            ]
        );
        assert_eq!(compare(&a, &a), [] as [std::string::String; 0]);
    }

    #[test]
    fn manifest_messages_stay_small_whatever_the_paths() {
        let name = "n".repeat(250);
        let long: Vec<&str> = vec![name.as_str(); 250];
        let mut entries = Vec::new();
        for i in 0..300 {
            let mut x = e(&long.join("/"), 1);
            x.path = x.path.join(format!("f{i}").as_bytes()).expect("join");
            x.link = x.path.as_bytes().to_vec();
            entries.push(x);
        }
        entries.extend((0..5000).map(|i| e(&format!("short{i}"), 2)));
        let chunks = manifest_chunks(&entries);
        assert!(chunks.len() > 2);
        for c in &chunks {
            assert!(!c.is_empty() && c.len() <= MANIFEST_CHUNK);
            let bytes = proto::to_bytes(&Message::Manifest {
                entries: c.to_vec(),
            })
            .len();
            assert!(bytes < channel::MAX_MESSAGE / 2, "{bytes} bytes");
        }
        assert_eq!(chunks.concat(), entries);
        assert_eq!(manifest_chunks(&[]), [] as [&[ManifestEntry]; 0]);
    }

    #[test]
    fn manifest_of_a_tree_deeper_than_path_max() {
        let d = std::env::temp_dir().join(format!("rfs-verify-deep-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("mkdir");
        let root = rustix::fs::open(
            &d,
            OFlags::RDONLY | OFlags::DIRECTORY,
            rustix::fs::Mode::empty(),
        )
        .expect("open");
        let name = "d".repeat(200);
        let mut here = root.try_clone().expect("dup");
        for _ in 0..45 {
            rustix::fs::mkdirat(&here, name.as_str(), rustix::fs::Mode::from_raw_mode(0o755))
                .expect("mkdirat");
            here = rustix::fs::openat(
                &here,
                name.as_str(),
                OFlags::RDONLY,
                rustix::fs::Mode::empty(),
            )
            .expect("openat");
        }
        let f = rustix::fs::openat(
            &here,
            "bottom",
            OFlags::WRONLY | OFlags::CREATE,
            rustix::fs::Mode::from_raw_mode(0o640),
        )
        .expect("create");
        rustix::io::write(&f, b"at the bottom").expect("write");
        let m = manifest(root.as_fd()).expect("manifest");
        assert_eq!(m.len(), 46);
        let last = m.last().expect("entries");
        assert!(last.path.as_bytes().len() > 2 * 4096);
        assert!(last.path.as_bytes().ends_with(b"/bottom"));
        assert_eq!(
            last.digest,
            blake3::hash(b"at the bottom").as_bytes().to_vec()
        );
        assert_eq!(last.mode, 0o640);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn manifest_of_a_tree() {
        let d = std::env::temp_dir().join(format!("rfs-verify-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("x")).expect("mkdir");
        std::fs::write(d.join("x/f"), b"hello").expect("write");
        std::fs::hard_link(d.join("x/f"), d.join("h")).expect("link");
        rustix::fs::setxattr(d.join("x"), "user.k", b"v", rustix::fs::XattrFlags::empty())
            .expect("setxattr");
        std::os::unix::fs::symlink("x/f", d.join("l")).expect("symlink");
        let fd = rustix::fs::open(
            &d,
            OFlags::RDONLY | OFlags::DIRECTORY,
            rustix::fs::Mode::empty(),
        )
        .expect("open");
        let m = manifest(fd.as_fd()).expect("manifest");
        let names: Vec<String> = m.iter().map(|e| e.path.to_string()).collect();
        assert_eq!(names, vec!["h", "l", "x", "x/f"]);
        assert_eq!(m[3].digest, blake3::hash(b"hello").as_bytes().to_vec());
        assert_eq!(m[1].digest, b"x/f".to_vec());
        // Both names of the hard-linked file point at the first one.
        assert_eq!(
            (m[0].link.as_slice(), m[3].link.as_slice()),
            (&b"h"[..], &b"h"[..])
        );
        assert!(m[1].link.is_empty() && m[2].link.is_empty());
        assert_eq!(m[2].xattrs.len(), 32, "the directory's xattr is hashed");
        assert_eq!(m[3].xattrs, Vec::<u8>::new());
        let _ = std::fs::remove_dir_all(&d);
    }
}
