//! `safekit rfs verify`: both copies of a replicated directory compared by
//! content checksum (BLAKE3), kind, mode, owner, size and mtime.
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
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

fn walk(root: BorrowedFd<'_>, dir: &RelPath, out: &mut Vec<ManifestEntry>) -> io::Result<()> {
    let d = sys::open_dir(root, dir.as_bytes())?;
    for name in apply::list_dir(d.as_fd())? {
        let path = dir
            .join(&name)
            .map_err(|_| io::Error::from_raw_os_error(libc::ENAMETOOLONG))?;
        let st = match sys::stat_at(d.as_fd(), OsStr::from_bytes(&name)) {
            Ok(st) => st,
            // Removed meanwhile.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
            Err(e) => return Err(e),
        };
        let ft = sys::file_type(&st);
        let (kind, digest, mtime) = match ft {
            FileType::RegularFile => (0, hash_file(root, &path)?, sys::mtime(&st)),
            FileType::Directory => (1, Vec::new(), Timestamp::default()),
            FileType::Symlink => (
                2,
                rustix::fs::readlinkat(d.as_fd(), OsStr::from_bytes(&name), Vec::new())
                    .map_err(sys::io)?
                    .into_bytes(),
                sys::mtime(&st),
            ),
            _ => (3, Vec::new(), sys::mtime(&st)),
        };
        out.push(ManifestEntry {
            path: path.clone(),
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
        });
        if kind == 1 {
            walk(root, &path, out)?;
        }
    }
    Ok(())
}

fn hash_file(root: BorrowedFd<'_>, path: &RelPath) -> io::Result<Vec<u8>> {
    let fd = sys::open_beneath(root, path.as_bytes(), OFlags::RDONLY | OFlags::NONBLOCK)?;
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

/// Sends the manifest of `root` on a verification connection.
pub(crate) fn send_manifest(tx: &mut ChannelSender, root: BorrowedFd<'_>) -> Result<(), String> {
    let entries = manifest(root).map_err(|e| format!("manifest: {e}"))?;
    for chunk in entries.chunks(MANIFEST_CHUNK) {
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
        }
    }

    #[test]
    fn differences_are_named() {
        let a = vec![e("a", 1), e("b", 1), e("c", 1)];
        let mut c2 = e("c", 1);
        c2.mode = 0o600;
        let b = vec![e("b", 2), c2, e("d", 1)];
        assert_eq!(
            compare(&a, &b),
            vec![
                "only on the primary: a".to_string(),
                "content differs: b".into(),
                "mode differs: c".into(),
                "only on the secondary: d".into(),
            ]
        );
        assert_eq!(compare(&a, &a), [] as [std::string::String; 0]);
    }

    #[test]
    fn manifest_of_a_tree() {
        let d = std::env::temp_dir().join(format!("rfs-verify-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("x")).expect("mkdir");
        std::fs::write(d.join("x/f"), b"hello").expect("write");
        std::os::unix::fs::symlink("x/f", d.join("l")).expect("symlink");
        let fd = rustix::fs::open(
            &d,
            OFlags::RDONLY | OFlags::DIRECTORY,
            rustix::fs::Mode::empty(),
        )
        .expect("open");
        let m = manifest(fd.as_fd()).expect("manifest");
        let names: Vec<String> = m.iter().map(|e| e.path.to_string()).collect();
        assert_eq!(names, vec!["l", "x", "x/f"]);
        assert_eq!(m[2].digest, blake3::hash(b"hello").as_bytes().to_vec());
        assert_eq!(m[0].digest, b"x/f".to_vec());
        let _ = std::fs::remove_dir_all(&d);
    }
}
