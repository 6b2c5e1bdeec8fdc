//! The FUSE filesystem mounted over a replicated directory on the primary.
//!
//! Before mounting, the real directory is opened (`O_DIRECTORY`); every
//! request is then served with `*at` calls below that fd (the mount hides the
//! path). Inode numbers are the real ones (the root's swapped with 1); a table
//! maps each inode the kernel knows to its names (parent inode, name), which
//! gives the relative path each replicated operation carries (built walking
//! up, once per operation; it may exceed `PATH_MAX`, never
//! [`MAX_PATH`]: past it the operation fails with `ENAMETOOLONG`). An open
//! file that was unlinked has no name: writes to it stay local (nothing on
//! the secondary can reach it either).
//!
//! Node identity: every inode the kernel knows (from a lookup or a
//! creation until its last `forget`) is pinned by an `O_PATH` handle the
//! daemon holds, so the disk cannot give its number to a new file while the
//! kernel may still use it: a node id names one file for its whole life (a
//! stale handle on a deleted file stays on the deleted file, as on a local
//! filesystem). Attributes and opens go through that handle, not the path;
//! a directory's handle is the dirfd of every `*at` call in it (create,
//! mkdir, unlink, rename, link, xattrs...), so no request walks a path from
//! the root. A failed lookup is answered as a negative entry the kernel
//! caches (only this daemon changes the tree), sparing the lookup before
//! each creation.
//!
//! Ordering: one lock covers "apply locally, then submit to the replicator",
//! so the sequence numbers are the order in which the local directory
//! changed. Replies that must wait for the secondary are handed to the
//! replicator and sent from its receiver thread when the acknowledgement
//! arrives, so no FUSE thread blocks on the network.
//!
//! Durability ([`Durability`], SPEC §5):
//! - `Fsync` (default): the FUSE write-back cache is on (the kernel buffers
//!   writes and sends them on writeback, close, fsync or msync). Writes and
//!   metadata changes are answered as soon as they are applied locally and
//!   queued (or, while alone, journalled). The durability points wait:
//!   fsync/fdatasync of a file or directory, and so `O_SYNC`/`O_DSYNC`
//!   writes and msync, which the kernel turns into a writeback then an
//!   fsync request. Before any change, [`Replicator::admit`] waits while the
//!   live queue is full (back-pressure).
//! - `EveryWrite`: no write-back cache; every write and metadata change is
//!   answered once the secondary acknowledged it, and an `O_SYNC`/`O_DSYNC`
//!   write is itself a barrier.
//!
//! A barrier (fsync) is sequenced under the lock; with `async = "none"` the
//! secondary syncs before acknowledging; the local sync runs after the
//! barrier is sequenced and outside the lock (it overlaps the barrier's
//! round trip; see `fsync` for why the order holds), the reply waiting for
//! both. When the secondary is lost (send timeout), the replicator journals
//! and releases the waiting replies.
//!
//! A write request (up to 1 MiB) is applied and submitted in pieces of
//! [`WRITE_PIECE`] under one hold of the lock: the first piece travels to
//! the secondary while the next is written here.
//!
//! Under the write-back cache the kernel keeps its own mtime of a regular
//! file it wrote (it sends it with a setattr on flush), so the mtime the
//! mount shows can differ by the writeback delay from the disk's, which is
//! the one replicated.
//!
//! Reads never wait: they are served from the kernel page cache or by
//! `pread` into a per-thread buffer, or — read-only opens with passthrough
//! on — by the kernel directly from the real file (FUSE passthrough: no
//! request reaches the daemon).

use std::{
    collections::HashMap,
    ffi::{OsStr, OsString},
    io,
    os::{
        fd::{AsFd, BorrowedFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::Path,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use fuser::{
    BackingId, Errno, FileAttr, FileHandle, FileType as FuseType, Filesystem, FopenFlags,
    Generation, INodeNo, InitFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr,
    ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs,
    ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use rustix::fs::{AtFlags, FileType, Mode, OFlags, RenameFlags as RxRename, Stat, XattrFlags};

use super::{
    Durability,
    journal::Change,
    proto::{MAX_PATH, NodeKind, Op, PathError, RelPath, Timestamp, rename},
    replicator::{Completion, Replicator, Ticket},
    sys,
};

/// Attribute and entry cache lifetime given to the kernel. Every change goes
/// through this mount, so the kernel's caches stay right; short anyway.
const TTL: Duration = Duration::from_secs(1);
/// Largest write the kernel sends in one request.
pub(crate) const MAX_WRITE: u32 = 1 << 20;

/// Writes are applied and replicated in pieces of this size (see
/// [`ReplicatedFs::write_pieces`]).
const WRITE_PIECE: usize = 256 << 10;

thread_local! {
    /// Each FUSE thread's read buffer, reused across requests.
    static READ_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `pwrite`s all of `data` at `offset` unless an error stops it: the bytes
/// written, and the error if one did.
fn pwrite_some(fd: BorrowedFd<'_>, data: &[u8], offset: u64) -> (usize, Option<Errno>) {
    let mut done = 0;
    while done < data.len() {
        match rustix::io::pwrite(fd, &data[done..], offset + done as u64) {
            Ok(0) => return (done, Some(Errno::from_i32(libc::EIO))),
            Ok(n) => done += n,
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return (done, Some(Errno::from_i32(e.raw_os_error()))),
        }
    }
    (done, None)
}

/// `fdatasync` (`data_only`) or `fsync`.
fn sync_fd(fd: BorrowedFd<'_>, data_only: bool) -> Result<(), Errno> {
    let r = if data_only {
        rustix::fs::fdatasync(fd)
    } else {
        rustix::fs::fsync(fd)
    };
    r.map_err(|e| Errno::from_i32(e.raw_os_error()))
}

/// Completes `reply` with a result.
fn empty(reply: ReplyEmpty) -> impl FnOnce(Result<(), i32>) + Send + 'static {
    move |r| match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(Errno::from_i32(e)),
    }
}

/// A completion that waits for two results (a local flush and a barrier's
/// durability, in either order): the second to arrive runs it, with the
/// first error if any.
struct Join {
    /// The completion (until run), and the first result (once in).
    slot: Mutex<JoinSlot>,
}

type JoinSlot = (Option<Completion>, Option<Result<(), i32>>);

impl Join {
    fn new(done: Completion) -> Self {
        Self {
            slot: Mutex::new((Some(done), None)),
        }
    }

    fn half(&self, r: Result<(), i32>) {
        let mut slot = self
            .slot
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match slot.1.take() {
            None => slot.1 = Some(r),
            Some(first) => {
                let done = slot.0.take();
                drop(slot);
                if let Some(done) = done {
                    done(first.and(r));
                }
            }
        }
    }
}

/// The inode table: names of the inodes the kernel holds.
#[derive(Debug, Default)]
struct Tree {
    nodes: HashMap<u64, Node>,
    by_name: HashMap<(u64, OsString), u64>,
}

#[derive(Debug, Default)]
struct Node {
    names: Vec<(u64, OsString)>,
    nlookup: u64,
    /// `O_PATH` handle on the inode: pins its number while the kernel knows
    /// the node (see the module docs).
    pin: Option<Arc<OwnedFd>>,
}

impl Tree {
    /// The relative path of `ino` (its first known name), for the wire:
    /// `Ok(None)` if it has none (unlinked, or forgotten), `Err` if it is
    /// longer than [`MAX_PATH`] (an ancestor renamed deeper). Built once
    /// from the names walking up, whatever the depth.
    fn path(&self, ino: u64) -> Result<Option<RelPath>, PathError> {
        let mut names: Vec<&[u8]> = Vec::new();
        let mut len = 0usize;
        let mut cur = ino;
        // Each level adds at least two bytes (a name and a `/`).
        for _ in 0..=MAX_PATH / 2 + 1 {
            if cur == INodeNo::ROOT.0 {
                return RelPath::from_names_upwards(&names).map(Some);
            }
            let Some((parent, name)) = self.nodes.get(&cur).and_then(|n| n.names.first()) else {
                return Ok(None);
            };
            len += name.len() + 1;
            if len > MAX_PATH + 1 {
                return Err(PathError::TooLong);
            }
            names.push(name.as_bytes());
            cur = *parent;
        }
        Err(PathError::TooLong)
    }

    /// The `O_PATH` handle pinning `ino`, if the kernel knows it.
    fn pin(&self, ino: u64) -> Option<&Arc<OwnedFd>> {
        self.nodes.get(&ino)?.pin.as_ref()
    }

    /// Records that the kernel now knows `ino` as `parent/name`; `pin` is an
    /// `O_PATH` handle on that inode (kept if the node has none yet).
    fn learn(&mut self, ino: u64, parent: u64, name: &OsStr, pin: OwnedFd) {
        let key = (parent, name.to_os_string());
        if let Some(old) = self.by_name.insert(key.clone(), ino)
            && old != ino
            && let Some(n) = self.nodes.get_mut(&old)
        {
            n.names.retain(|k| *k != key);
        }
        let node = self.nodes.entry(ino).or_default();
        node.nlookup += 1;
        if node.pin.is_none() {
            node.pin = Some(Arc::new(pin));
        }
        if !node.names.contains(&key) {
            node.names.push(key);
        }
    }

    fn unlearn(&mut self, parent: u64, name: &OsStr) {
        let key = (parent, name.to_os_string());
        if let Some(ino) = self.by_name.remove(&key)
            && let Some(n) = self.nodes.get_mut(&ino)
        {
            n.names.retain(|k| *k != key);
        }
    }

    fn rename(&mut self, from: (u64, &OsStr), to: (u64, &OsStr), exchange: bool) {
        let kf = (from.0, from.1.to_os_string());
        let kt = (to.0, to.1.to_os_string());
        let a = self.by_name.remove(&kf);
        let b = self.by_name.remove(&kt);
        if let Some(b) = b
            && let Some(n) = self.nodes.get_mut(&b)
        {
            n.names.retain(|k| *k != kt);
            if exchange {
                n.names.insert(0, kf.clone());
                self.by_name.insert(kf.clone(), b);
            }
        }
        if let Some(a) = a
            && let Some(n) = self.nodes.get_mut(&a)
        {
            n.names.retain(|k| *k != kf);
            n.names.insert(0, kt.clone());
            self.by_name.insert(kt, a);
        }
    }

    fn forget(&mut self, ino: u64, n: u64) {
        if ino == INodeNo::ROOT.0 {
            return;
        }
        let gone = match self.nodes.get_mut(&ino) {
            Some(node) => {
                node.nlookup = node.nlookup.saturating_sub(n);
                node.nlookup == 0
            }
            None => false,
        };
        if gone && let Some(node) = self.nodes.remove(&ino) {
            for k in node.names {
                if self.by_name.get(&k) == Some(&ino) {
                    self.by_name.remove(&k);
                }
            }
        }
    }
}

#[derive(Debug)]
struct OpenFile {
    ino: u64,
    fd: Arc<OwnedFd>,
    /// Opened with `O_SYNC`/`O_DSYNC`: every write is a barrier.
    sync: bool,
    /// How the kernel does I/O on it.
    io: Io,
    /// Kept alive while the kernel uses it for passthrough.
    backing_id: Option<BackingId>,
    /// Bytes written since its disk writeback was last started.
    unflushed: u64,
}

/// How the kernel does I/O on an open file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Io {
    /// Through the page cache, reads and writes reaching the daemon.
    Cached,
    /// Reads straight from the real file (read-only opens).
    Passthrough,
}

#[derive(Debug)]
struct OpenDir {
    entries: Vec<(u64, FuseType, OsString)>,
}

#[derive(Debug, Default)]
struct State {
    tree: Tree,
    files: HashMap<u64, OpenFile>,
    dirs: HashMap<u64, OpenDir>,
    next_fh: u64,
}

/// The filesystem served over one replicated directory.
pub(crate) struct ReplicatedFs {
    root: Dir,
    root_ino: u64,
    state: Mutex<State>,
    repl: Arc<Replicator>,
    passthrough: bool,
    /// Which operations wait for the secondary (see the module docs).
    durability: Durability,
    /// The kernel caches writes (FUSE write-back cache, with
    /// [`Durability::Fsync`] when the kernel grants it).
    writeback: bool,
}

impl std::fmt::Debug for ReplicatedFs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicatedFs")
            .field("root_ino", &self.root_ino)
            .field("passthrough", &self.passthrough)
            .field("durability", &self.durability)
            .finish_non_exhaustive()
    }
}

fn errno(e: &io::Error) -> Errno {
    Errno::from_i32(e.raw_os_error().unwrap_or(libc::EIO))
}

fn to_system_time(t: Timestamp) -> SystemTime {
    if t.sec >= 0 {
        UNIX_EPOCH + Duration::new(t.sec.unsigned_abs(), t.nsec)
    } else {
        UNIX_EPOCH - Duration::from_secs(t.sec.unsigned_abs())
            + Duration::from_nanos(u64::from(t.nsec))
    }
}

fn from_system_time(t: SystemTime) -> Timestamp {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => Timestamp {
            sec: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            nsec: d.subsec_nanos(),
        },
        Err(e) => {
            let d = e.duration();
            let mut sec = -i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
            let mut nsec = d.subsec_nanos();
            if nsec > 0 {
                sec -= 1;
                nsec = 1_000_000_000 - nsec;
            }
            Timestamp { sec, nsec }
        }
    }
}

fn fuse_type(ft: FileType) -> FuseType {
    match ft {
        FileType::Directory => FuseType::Directory,
        FileType::Symlink => FuseType::Symlink,
        FileType::Fifo => FuseType::NamedPipe,
        FileType::Socket => FuseType::Socket,
        FileType::CharacterDevice => FuseType::CharDevice,
        FileType::BlockDevice => FuseType::BlockDevice,
        _ => FuseType::RegularFile,
    }
}

/// Open flags passed to the real file: the access mode and status flags;
/// `O_APPEND` is dropped because the kernel already gives the append offset
/// (and `pwrite` on an `O_APPEND` fd would ignore it), creation flags and
/// `O_DIRECT` too (the daemon's buffers are not aligned).
fn real_open_flags(flags: i32) -> OFlags {
    let keep = libc::O_ACCMODE | libc::O_NOATIME;
    #[expect(clippy::cast_sign_loss, reason = "flag bits")]
    OFlags::from_bits_retain((flags & keep) as u32)
}

fn is_sync(flags: i32) -> bool {
    flags & (libc::O_SYNC | libc::O_DSYNC) != 0
}

/// What a setattr request changes.
#[derive(Debug, Clone, Copy)]
struct AttrChange {
    mode: Option<u32>,
    uid: Option<u32>,
    gid: Option<u32>,
    size: Option<u64>,
    atime: Option<TimeOrNow>,
    mtime: Option<TimeOrNow>,
    /// A truncate by an unprivileged caller: clear the set-id bits as the
    /// VFS would ([`killed_mode`]).
    kill_suid: bool,
}

/// `mode` once a write or truncate by a caller without `CAP_FSETID` has
/// cleared its set-id bits (the VFS's rule: set-user-ID always, set-group-ID
/// only with group execute); `None` if nothing changes.
fn killed_mode(mode: u32) -> Option<u32> {
    let mut kill = libc::S_ISUID;
    if mode & libc::S_IXGRP != 0 {
        kill |= libc::S_ISGID;
    }
    (mode & kill != 0).then_some(mode & !kill & 0o7777)
}

/// A directory handle: the root's fd, a directory node's `O_PATH` pin, or
/// a directory opened by path. Every `*at` call takes it as its dirfd.
type Dir = Arc<OwnedFd>;

/// A parent directory handle and a name inside it.
struct Entry {
    dir: Dir,
    name: OsString,
}

/// [`ReplicatedFs::lock`]'s guard: the state, then the gate (dropped in
/// that order).
struct Locked<'a> {
    st: MutexGuard<'a, State>,
    _gate: std::sync::RwLockReadGuard<'a, ()>,
}

impl std::ops::Deref for Locked<'_> {
    type Target = State;
    fn deref(&self) -> &State {
        &self.st
    }
}

impl std::ops::DerefMut for Locked<'_> {
    fn deref_mut(&mut self) -> &mut State {
        &mut self.st
    }
}

impl ReplicatedFs {
    pub(crate) fn new(
        root: OwnedFd,
        repl: Arc<Replicator>,
        passthrough: bool,
        durability: Durability,
    ) -> io::Result<Self> {
        let st = sys::fstat(&root)?;
        Ok(Self {
            root: Arc::new(root),
            root_ino: st.st_ino,
            state: Mutex::new(State {
                next_fh: 1,
                ..State::default()
            }),
            repl,
            passthrough,
            durability,
            writeback: false,
        })
    }

    /// Every operation waits for the secondary ([`Durability::EveryWrite`]).
    fn strict(&self) -> bool {
        self.durability == Durability::EveryWrite
    }

    /// The state, with the replicator's gate held (shared) for as long: a
    /// change applied here and its submission are never split by the last
    /// step of a resynchronisation.
    fn lock(&self) -> Locked<'_> {
        let gate = self
            .repl
            .gate
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let st = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Locked { st, _gate: gate }
    }

    /// Flags to open the real file with: [`real_open_flags`], and
    /// read-write instead of write-only under the write-back cache (the
    /// kernel reads around a partial page write through any handle).
    fn real_flags(&self, flags: i32) -> OFlags {
        let f = real_open_flags(flags);
        if self.writeback && flags & libc::O_ACCMODE == libc::O_WRONLY {
            (f - OFlags::WRONLY) | OFlags::RDWR
        } else {
            f
        }
    }

    /// Real inode number → FUSE inode number (the root and 1 swapped).
    fn fuse_ino(&self, real: u64) -> u64 {
        if real == self.root_ino {
            INodeNo::ROOT.0
        } else if real == INodeNo::ROOT.0 {
            self.root_ino
        } else {
            real
        }
    }

    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "stat fields in range"
    )]
    #[allow(
        clippy::unnecessary_cast,
        clippy::useless_conversion,
        reason = "types differ by arch"
    )]
    fn attr(&self, st: &Stat) -> FileAttr {
        FileAttr {
            ino: INodeNo(self.fuse_ino(st.st_ino as u64)),
            size: st.st_size as u64,
            blocks: st.st_blocks as u64,
            atime: to_system_time(sys::atime(st)),
            mtime: to_system_time(sys::mtime(st)),
            ctime: to_system_time(sys::ctime(st)),
            crtime: UNIX_EPOCH,
            kind: fuse_type(sys::file_type(st)),
            perm: (st.st_mode & 0o7777) as u16,
            nlink: st.st_nlink as u32,
            uid: st.st_uid,
            gid: st.st_gid,
            rdev: st.st_rdev as u32,
            blksize: st.st_blksize as u32,
            flags: 0,
        }
    }

    fn root(&self) -> BorrowedFd<'_> {
        self.root.as_fd()
    }

    /// The path of node `ino` for the wire: ENOENT if it has no name,
    /// ENAMETOOLONG past [`MAX_PATH`].
    fn path(st: &State, ino: INodeNo) -> Result<RelPath, Errno> {
        Self::maybe_path(st, ino)?.ok_or(Errno::ENOENT)
    }

    /// The path of node `ino` for the wire, `None` if it has no name (an
    /// open file unlinked: its changes stay local); ENAMETOOLONG past
    /// [`MAX_PATH`] (never a silent local-only change).
    fn maybe_path(st: &State, ino: INodeNo) -> Result<Option<RelPath>, Errno> {
        st.tree
            .path(ino.0)
            .map_err(|_| Errno::from_i32(libc::ENAMETOOLONG))
    }

    /// The handle of directory node `ino`, if the kernel knows it.
    fn dir_fd(&self, st: &State, ino: u64) -> Option<Dir> {
        if ino == INodeNo::ROOT.0 {
            Some(Arc::clone(&self.root))
        } else {
            st.tree.pin(ino).cloned()
        }
    }

    /// The path of directory node `ino` (for the wire) and its handle (for
    /// the local calls: no path walk, whatever its depth). Every node the
    /// kernel knows is pinned, so a node without a handle is gone.
    fn dir_of(&self, st: &State, ino: INodeNo) -> Result<(RelPath, Dir), Errno> {
        let p = Self::path(st, ino)?;
        let fd = self.dir_fd(st, ino.0).ok_or(Errno::ENOENT)?;
        Ok((p, fd))
    }

    /// A readable directory fd on a directory handle (a pin is `O_PATH`).
    fn readable(dir: &Dir) -> Result<OwnedFd, Errno> {
        sys::open_dir(dir.as_fd(), b"").map_err(|e| errno(&e))
    }

    /// The parent handle and name of node `ino` (its first known name; the
    /// root: itself and `"."`).
    fn entry_of(&self, st: &State, ino: INodeNo) -> Result<Entry, Errno> {
        if ino == INodeNo::ROOT {
            return Ok(Entry {
                dir: Arc::clone(&self.root),
                name: OsString::from("."),
            });
        }
        let (parent, name) = st
            .tree
            .nodes
            .get(&ino.0)
            .and_then(|n| n.names.first())
            .ok_or(Errno::ENOENT)?;
        // The parent is pinned as long as the kernel knows the node.
        let dir = self.dir_fd(st, *parent).ok_or(Errno::ENOENT)?;
        Ok(Entry {
            dir,
            name: name.clone(),
        })
    }

    fn child(parent: &RelPath, name: &OsStr) -> Result<RelPath, Errno> {
        parent
            .join(name.as_bytes())
            .map_err(|_| Errno::from_i32(libc::ENAMETOOLONG))
    }

    /// An fd on the file of an open handle, or of any open handle of `ino`.
    fn open_fd(st: &State, ino: INodeNo, fh: Option<FileHandle>) -> Option<Arc<OwnedFd>> {
        fh.and_then(|fh| st.files.get(&fh.0))
            .or_else(|| st.files.values().find(|f| f.ino == ino.0))
            .map(|f| Arc::clone(&f.fd))
    }

    fn stat_ino(&self, st: &State, ino: INodeNo, fh: Option<FileHandle>) -> Result<Stat, Errno> {
        if ino == INodeNo::ROOT {
            return sys::fstat(self.root()).map_err(|e| errno(&e));
        }
        if let Some(pin) = st.tree.pin(ino.0) {
            return sys::fstat(pin.as_fd()).map_err(|e| errno(&e));
        }
        let fd = Self::open_fd(st, ino, fh).ok_or(Errno::ENOENT)?;
        sys::fstat(fd.as_fd()).map_err(|e| errno(&e))
    }

    /// Owner and mode of a node just created by the daemon (running as root)
    /// on behalf of `req`: the caller's uid, its gid or the directory's when
    /// the directory is setgid, the requested mode whatever our own umask.
    fn own_new(req: &Request, e: &Entry, mode: u32, is_dir: bool) -> Result<Stat, Errno> {
        let dst = sys::fstat(e.dir.as_fd()).map_err(|e| errno(&e))?;
        let gid = if dst.st_mode & libc::S_ISGID != 0 {
            dst.st_gid
        } else {
            req.gid()
        };
        sys::chown_at(e.dir.as_fd(), &e.name, Some(req.uid()), Some(gid)).map_err(|e| errno(&e))?;
        let st = sys::stat_at(e.dir.as_fd(), &e.name).map_err(|e| errno(&e))?;
        let mut want = mode & 0o7777;
        if is_dir {
            want |= st.st_mode & libc::S_ISGID;
        }
        if sys::perm(&st) != want && sys::file_type(&st) != FileType::Symlink {
            sys::chmod_at(e.dir.as_fd(), &e.name, want).map_err(|e| errno(&e))?;
            return sys::stat_at(e.dir.as_fd(), &e.name).map_err(|e| errno(&e));
        }
        Ok(st)
    }

    /// The `O_PATH` handle pinning a node just created as `e` (whose stat
    /// is `stat`).
    fn pin_new(e: &Entry, stat: &Stat) -> Result<OwnedFd, Errno> {
        let (pin, now) = sys::pin_at(e.dir.as_fd(), &e.name).map_err(|e| errno(&e))?;
        if now.st_ino != stat.st_ino {
            // Replaced beneath the mount between the two calls: not ours.
            return Err(Errno::from_i32(libc::ESTALE));
        }
        Ok(pin)
    }

    fn dir_mtime(e: &Entry) -> Result<Timestamp, Errno> {
        Ok(sys::mtime(
            &sys::fstat(e.dir.as_fd()).map_err(|e| errno(&e))?,
        ))
    }

    /// Writes `data` at `offset` locally and submits it, in pieces of
    /// [`WRITE_PIECE`], each submitted as soon as it is on the local file:
    /// the secondary receives one while the next is written here (the
    /// kernel sends one request at a time and each waits for its
    /// acknowledgement, so without pieces nothing would overlap). Called
    /// under the lock, so the pieces are sequenced in order and nothing
    /// comes between them. Returns the bytes written and the ticket of the
    /// last piece (acknowledgements are cumulative). A local failure after
    /// some bytes is a short write of what was written (and replicated);
    /// only a failure of the first byte is an error.
    fn write_pieces(
        &self,
        fd: BorrowedFd<'_>,
        path: Option<&RelPath>,
        offset: u64,
        data: &[u8],
    ) -> Result<(usize, Ticket), Errno> {
        let (mut done, mut ticket) = (0, Ticket::DONE);
        for piece in data.chunks(WRITE_PIECE) {
            let at = offset + done as u64;
            let (n, err) = pwrite_some(fd, piece, at);
            if n > 0 {
                done += n;
                if let Some(path) = path {
                    // The mtime the secondary sets; were fstat to fail, the
                    // bytes must be replicated all the same.
                    let mtime = sys::fstat(fd).map_or_else(
                        |_| from_system_time(SystemTime::now()),
                        |st| sys::mtime(&st),
                    );
                    ticket = self.repl.submit_write(path, at, &piece[..n], mtime);
                }
            }
            if let Some(e) = err {
                if done == 0 {
                    return Err(e);
                }
                break;
            }
        }
        Ok((done, ticket))
    }

    fn submit(&self, op: &Op, changes: &[(RelPath, Change)]) -> Ticket {
        self.repl.submit(op, changes.to_vec())
    }

    fn then(&self, ticket: Ticket, f: impl FnOnce(Result<(), i32>) + Send + 'static) {
        let done: Completion = Box::new(f);
        self.repl.when_durable(ticket, done);
    }

    /// Replies to an operation that is not a durability point: at once
    /// (applied locally and queued for the secondary, or journalled while
    /// alone), or, with [`Durability::EveryWrite`], once durable.
    fn answer(&self, ticket: Ticket, f: impl FnOnce(Result<(), i32>) + Send + 'static) {
        if self.strict() {
            self.then(ticket, f);
        } else {
            self.repl.when_queued(ticket, Box::new(f));
        }
    }

    /// Like [`then`](Self::then), and `f` also waits for `flush` (the local
    /// disk flush of a barrier), run here after `ticket` was registered: the
    /// flush, outside the lock, overlaps the barrier's round trip, and the
    /// registration is as prompt as any other operation's.
    fn then_flushed(
        &self,
        ticket: Ticket,
        flush: impl FnOnce() -> Result<(), Errno>,
        f: impl FnOnce(Result<(), i32>) + Send + 'static,
    ) {
        let join = Arc::new(Join::new(Box::new(f)));
        let durable = Arc::clone(&join);
        self.then(ticket, move |r| durable.half(r));
        join.half(flush().map_err(Errno::code));
    }

    /// Common path of mknod/mkdir/symlink: replies with the new entry (see
    /// [`answer`](Self::answer) for when).
    fn reply_created_entry(&self, ticket: Ticket, attr: FileAttr, reply: ReplyEntry) {
        self.answer(ticket, move |r| match r {
            Ok(()) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(Errno::from_i32(e)),
        });
    }

    fn reply_empty(&self, ticket: Ticket, reply: ReplyEmpty) {
        self.answer(ticket, empty(reply));
    }

    #[expect(
        clippy::too_many_lines,
        reason = "chown, chmod, truncate, times in order"
    )]
    fn do_setattr(
        &self,
        ino: INodeNo,
        fh: Option<FileHandle>,
        set: AttrChange,
    ) -> Result<(FileAttr, Ticket), Errno> {
        let AttrChange {
            mut mode,
            uid,
            gid,
            size,
            atime: access,
            mtime: modify,
            kill_suid,
        } = set;
        let st = self.lock();
        let path = Self::maybe_path(&st, ino)?;
        let held = Self::open_fd(&st, ino, fh);
        let mut ticket = None;
        if let Some(size) = size {
            // Through the node's own handle, never a path from the root.
            let reopen = || {
                let pin = st.tree.pin(ino.0).ok_or(Errno::ENOENT)?;
                sys::reopen(pin.as_fd(), OFlags::WRONLY)
                    .map(Arc::new)
                    .map_err(|e| errno(&e))
            };
            let fd = match &held {
                Some(fd) => Arc::clone(fd),
                None => reopen()?,
            };
            // A read-only handle cannot truncate; reopen writable then.
            if let Err(e) = rustix::fs::ftruncate(fd.as_fd(), size) {
                if held.is_none() {
                    return Err(Errno::from_i32(e.raw_os_error()));
                }
                let fd = reopen()?;
                rustix::fs::ftruncate(fd.as_fd(), size)
                    .map_err(|e| Errno::from_i32(e.raw_os_error()))?;
            }
            if let Some(p) = &path {
                let stat = self.stat_ino(&st, ino, fh)?;
                ticket = Some(self.submit(
                    &Op::Truncate {
                        path: p.clone(),
                        size,
                        mtime: sys::mtime(&stat),
                    },
                    // The size, and every byte from the new end on: a
                    // truncate down then up leaves zeros there.
                    &[
                        (p.clone(), Change::Meta),
                        (
                            p.clone(),
                            Change::Range {
                                start: size,
                                end: u64::MAX,
                            },
                        ),
                    ],
                ));
            }
        }
        if kill_suid && size.is_some() && mode.is_none() {
            mode = killed_mode(sys::perm(&self.stat_ino(&st, ino, fh)?));
        }
        let now = from_system_time(SystemTime::now());
        let resolve = |t: Option<TimeOrNow>| {
            t.map(|t| match t {
                TimeOrNow::Now => now,
                TimeOrNow::SpecificTime(t) => from_system_time(t),
            })
        };
        let (atime, mtime) = (resolve(access), resolve(modify));
        if mode.is_some() || uid.is_some() || gid.is_some() || atime.is_some() || mtime.is_some() {
            if path.is_some() {
                let e = self.entry_of(&st, ino)?;
                if uid.is_some() || gid.is_some() {
                    sys::chown_at(e.dir.as_fd(), &e.name, uid, gid).map_err(|e| errno(&e))?;
                }
                if let Some(m) = mode {
                    sys::chmod_at(e.dir.as_fd(), &e.name, m & 0o7777).map_err(|e| errno(&e))?;
                }
                if atime.is_some() || mtime.is_some() {
                    sys::set_times_at(e.dir.as_fd(), &e.name, atime, mtime)
                        .map_err(|e| errno(&e))?;
                }
            } else {
                // Unlinked but open: change it locally, nothing to send.
                let fd = held.as_ref().ok_or(Errno::ENOENT)?;
                if uid.is_some() || gid.is_some() {
                    rustix::fs::fchown(
                        fd.as_fd(),
                        uid.map(rustix::fs::Uid::from_raw),
                        gid.map(rustix::fs::Gid::from_raw),
                    )
                    .map_err(|e| Errno::from_i32(e.raw_os_error()))?;
                }
                if let Some(m) = mode {
                    rustix::fs::fchmod(fd.as_fd(), Mode::from_raw_mode(m & 0o7777))
                        .map_err(|e| Errno::from_i32(e.raw_os_error()))?;
                }
                if let Some(m) = mtime {
                    sys::set_fd_mtime(fd.as_fd(), m).map_err(|e| errno(&e))?;
                }
            }
            if let Some(p) = &path {
                let stat = self.stat_ino(&st, ino, fh)?;
                let owner_or_mode = mode.is_some() || uid.is_some() || gid.is_some();
                ticket = Some(self.submit(
                    &Op::SetAttr {
                        path: p.clone(),
                        // The final mode: chown may have cleared set-id bits.
                        mode: owner_or_mode.then(|| sys::perm(&stat)),
                        uid,
                        gid,
                        atime,
                        mtime,
                    },
                    &[(p.clone(), Change::Meta)],
                ));
            }
        }
        let stat = self.stat_ino(&st, ino, fh)?;
        drop(st);
        Ok((self.attr(&stat), ticket.unwrap_or(Ticket::DONE)))
    }

    fn read_dir(&self, ino: INodeNo) -> Result<OpenDir, Errno> {
        let st = self.lock();
        let (_, dir) = self.dir_of(&st, ino)?;
        let parent_ino = st
            .tree
            .nodes
            .get(&ino.0)
            .and_then(|n| n.names.first())
            .map_or(INodeNo::ROOT.0, |k| k.0);
        drop(st);
        let fd = Self::readable(&dir)?;
        let mut dir = rustix::fs::Dir::new(fd).map_err(|e| Errno::from_i32(e.raw_os_error()))?;
        let mut entries = Vec::new();
        while let Some(ent) = dir.read() {
            let ent = ent.map_err(|e| Errno::from_i32(e.raw_os_error()))?;
            let name = OsStr::from_bytes(ent.file_name().to_bytes()).to_os_string();
            let fino = match name.as_bytes() {
                b"." => ino.0,
                b".." => parent_ino,
                _ => self.fuse_ino(ent.ino()),
            };
            entries.push((fino, fuse_type(ent.file_type()), name));
        }
        Ok(OpenDir { entries })
    }
}

impl Filesystem for ReplicatedFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        if config.set_max_write(MAX_WRITE).is_err() {
            tracing::debug!("kernel refused max_write of 1 MiB; using its maximum");
        }
        if !self.strict() {
            self.writeback = config
                .add_capabilities(InitFlags::FUSE_WRITEBACK_CACHE)
                .is_ok();
            if !self.writeback {
                tracing::info!(
                    "FUSE write-back cache unavailable; writes reach the daemon one by one"
                );
            }
        }
        // This daemon clears the set-id bits where a write or truncate by
        // an unprivileged caller must (FUSE_WRITE_KILL_SUIDGID, `kill_suid`
        // below): the kernel then marks the superblock SB_NOSEC and stops
        // asking for `security.capability` (a GETXATTR round trip) before
        // every write(2) — 5x the cost of an 8 KiB cached write without it.
        if config
            .add_capabilities(InitFlags::FUSE_HANDLE_KILLPRIV_V2)
            .is_err()
        {
            tracing::debug!("FUSE_HANDLE_KILLPRIV_V2 unavailable");
        }
        if self.passthrough {
            let ok = config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
                && config.set_max_stack_depth(1).is_ok();
            if !ok {
                tracing::info!("FUSE passthrough unavailable; reads go through the daemon");
                self.passthrough = false;
            }
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let mut st = self.lock();
        let r = (|| {
            let (_, dir) = self.dir_of(&st, parent)?;
            sys::pin_at(dir.as_fd(), name).map_err(|e| errno(&e))
        })();
        match r {
            Ok((pin, stat)) => {
                let attr = self.attr(&stat);
                st.tree.learn(attr.ino.0, parent.0, name, pin);
                drop(st);
                reply.entry(&TTL, &attr, Generation(0));
            }
            // Cached by the kernel for the entry lifetime: only this daemon
            // changes the tree, and a creation through it replaces the
            // negative entry.
            Err(e) if e == Errno::ENOENT => reply.entry(&TTL, &negative_entry(), Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.lock().tree.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        let st = self.lock();
        match self.stat_ino(&st, ino, fh) {
            Ok(stat) => {
                drop(st);
                reply.attr(&TTL, &self.attr(&stat));
            }
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let set = AttrChange {
            mode,
            uid,
            gid,
            size,
            atime,
            mtime,
            // The kernel leaves this to the daemon (FUSE_HANDLE_KILLPRIV_V2);
            // root stands for a caller with CAP_FSETID.
            kill_suid: req.uid() != 0,
        };
        self.repl.admit();
        match self.do_setattr(ino, fh, set) {
            Ok((attr, ticket)) => self.answer(ticket, move |r| match r {
                Ok(()) => reply.attr(&TTL, &attr),
                Err(e) => reply.error(Errno::from_i32(e)),
            }),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let st = self.lock();
        let e = self.entry_of(&st, ino);
        drop(st);
        let r = e.and_then(|e| {
            rustix::fs::readlinkat(e.dir.as_fd(), &e.name, Vec::new())
                .map_err(|e| Errno::from_i32(e.raw_os_error()))
        });
        match r {
            Ok(target) => reply.data(target.as_bytes()),
            Err(e) => reply.error(e),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        self.repl.admit();
        let mut st = self.lock();
        let r = (|| {
            let (ppath, dir) = self.dir_of(&st, parent)?;
            let path = Self::child(&ppath, name)?;
            let (ft, kind) = match mode & libc::S_IFMT {
                libc::S_IFREG | 0 => (FileType::RegularFile, NodeKind::File),
                libc::S_IFIFO => (FileType::Fifo, NodeKind::Fifo),
                libc::S_IFSOCK => (FileType::Socket, NodeKind::Socket),
                libc::S_IFCHR => (FileType::CharacterDevice, NodeKind::CharDev),
                libc::S_IFBLK => (FileType::BlockDevice, NodeKind::BlockDev),
                _ => return Err(Errno::EINVAL),
            };
            rustix::fs::mknodat(
                &dir,
                name,
                ft,
                Mode::from_raw_mode(mode & 0o7777),
                u64::from(rdev),
            )
            .map_err(|e| Errno::from_i32(e.raw_os_error()))?;
            let e = Entry {
                dir,
                name: name.to_os_string(),
            };
            let stat = Self::own_new(req, &e, mode, false)?;
            let op = Op::Mknod {
                path: path.clone(),
                kind,
                mode: sys::perm(&stat),
                rdev: u64::from(rdev),
                uid: stat.st_uid,
                gid: stat.st_gid,
                mtime: sys::mtime(&stat),
                dir_mtime: Self::dir_mtime(&e)?,
            };
            let attr = self.attr(&stat);
            let pin = Self::pin_new(&e, &stat)?;
            st.tree.learn(attr.ino.0, parent.0, name, pin);
            Ok((attr, self.submit(&op, &[(path, Change::Tree)])))
        })();
        drop(st);
        match r {
            Ok((attr, t)) => self.reply_created_entry(t, attr, reply),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        self.repl.admit();
        let mut st = self.lock();
        let r = (|| {
            let (ppath, dir) = self.dir_of(&st, parent)?;
            let path = Self::child(&ppath, name)?;
            rustix::fs::mkdirat(&dir, name, Mode::from_raw_mode(mode & 0o7777))
                .map_err(|e| Errno::from_i32(e.raw_os_error()))?;
            let e = Entry {
                dir,
                name: name.to_os_string(),
            };
            let stat = Self::own_new(req, &e, mode, true)?;
            let op = Op::Mkdir {
                path: path.clone(),
                mode: sys::perm(&stat),
                uid: stat.st_uid,
                gid: stat.st_gid,
                mtime: sys::mtime(&stat),
                dir_mtime: Self::dir_mtime(&e)?,
            };
            let attr = self.attr(&stat);
            let pin = Self::pin_new(&e, &stat)?;
            st.tree.learn(attr.ino.0, parent.0, name, pin);
            Ok((attr, self.submit(&op, &[(path, Change::Tree)])))
        })();
        drop(st);
        match r {
            Ok((attr, t)) => self.reply_created_entry(t, attr, reply),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.remove(parent, name, false, reply);
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.remove(parent, name, true, reply);
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        self.repl.admit();
        let mut st = self.lock();
        let r = (|| {
            let (ppath, dir) = self.dir_of(&st, parent)?;
            let path = Self::child(&ppath, link_name)?;
            rustix::fs::symlinkat(target, &dir, link_name)
                .map_err(|e| Errno::from_i32(e.raw_os_error()))?;
            let e = Entry {
                dir,
                name: link_name.to_os_string(),
            };
            let stat = Self::own_new(req, &e, 0o777, false)?;
            let op = Op::Symlink {
                path: path.clone(),
                target: target.as_os_str().as_bytes().to_vec(),
                uid: stat.st_uid,
                gid: stat.st_gid,
                mtime: sys::mtime(&stat),
                dir_mtime: Self::dir_mtime(&e)?,
            };
            let attr = self.attr(&stat);
            let pin = Self::pin_new(&e, &stat)?;
            st.tree.learn(attr.ino.0, parent.0, link_name, pin);
            Ok((attr, self.submit(&op, &[(path, Change::Tree)])))
        })();
        drop(st);
        match r {
            Ok((attr, t)) => self.reply_created_entry(t, attr, reply),
            Err(e) => reply.error(e),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        self.repl.admit();
        let mut st = self.lock();
        let r = (|| {
            let (pa, da) = self.dir_of(&st, parent)?;
            let (pb, db) = self.dir_of(&st, newparent)?;
            let from = Self::child(&pa, name)?;
            let to = Self::child(&pb, newname)?;
            let mut rx = RxRename::empty();
            let mut wire = 0;
            if flags.contains(RenameFlags::RENAME_NOREPLACE) {
                rx |= RxRename::NOREPLACE;
                wire |= rename::NOREPLACE;
            }
            if flags.contains(RenameFlags::RENAME_EXCHANGE) {
                rx |= RxRename::EXCHANGE;
                wire |= rename::EXCHANGE;
            }
            if flags.contains(RenameFlags::RENAME_WHITEOUT) {
                return Err(Errno::EINVAL);
            }
            rustix::fs::renameat_with(&da, name, &db, newname, rx)
                .map_err(|e| Errno::from_i32(e.raw_os_error()))?;
            st.tree.rename(
                (parent.0, name),
                (newparent.0, newname),
                flags.contains(RenameFlags::RENAME_EXCHANGE),
            );
            let op = Op::Rename {
                from: from.clone(),
                to: to.clone(),
                flags: wire,
                from_dir_mtime: sys::mtime(&sys::fstat(&da).map_err(|e| errno(&e))?),
                to_dir_mtime: sys::mtime(&sys::fstat(&db).map_err(|e| errno(&e))?),
            };
            Ok(self.submit(&op, &[(from, Change::Tree), (to, Change::Tree)]))
        })();
        drop(st);
        match r {
            Ok(t) => self.reply_empty(t, reply),
            Err(e) => reply.error(e),
        }
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        self.repl.admit();
        let mut st = self.lock();
        let r = (|| {
            let existing = Self::path(&st, ino)?;
            let src = self.entry_of(&st, ino)?;
            let (pb, db) = self.dir_of(&st, newparent)?;
            let path = Self::child(&pb, newname)?;
            rustix::fs::linkat(&src.dir, &src.name, &db, newname, AtFlags::empty())
                .map_err(|e| Errno::from_i32(e.raw_os_error()))?;
            let (pin, stat) = sys::pin_at(db.as_fd(), newname).map_err(|e| errno(&e))?;
            let op = Op::Link {
                existing,
                path: path.clone(),
                dir_mtime: sys::mtime(&sys::fstat(&db).map_err(|e| errno(&e))?),
            };
            let attr = self.attr(&stat);
            st.tree.learn(attr.ino.0, newparent.0, newname, pin);
            Ok((attr, self.submit(&op, &[(path, Change::Tree)])))
        })();
        drop(st);
        match r {
            Ok((attr, t)) => self.reply_created_entry(t, attr, reply),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let real = self.real_flags(flags.0);
        let mut st = self.lock();
        let r = (|| {
            // Through the node's own handle: the inode the kernel means,
            // an unlinked one included (as a local filesystem reopens it).
            let pin = self.dir_fd(&st, ino.0).ok_or(Errno::ENOENT)?;
            sys::reopen(pin.as_fd(), real).map_err(|e| errno(&e))
        })();
        let fd = match r {
            Ok(fd) => fd,
            Err(e) => {
                drop(st);
                return reply.error(e);
            }
        };
        let read_only = flags.0 & libc::O_ACCMODE == libc::O_RDONLY;
        // The kernel requires every open of an inode that has a passthrough
        // open to be passthrough too (else the open fails with EIO): a
        // read-only open is passthrough only when no other open exists, and
        // a writer opening later fails (see `PrimaryParams::passthrough_reads`).
        let cached = st
            .files
            .values()
            .any(|f| f.ino == ino.0 && f.io == Io::Cached);
        let backing = if self.passthrough && read_only && !cached {
            reply.open_backing(&fd).ok()
        } else {
            None
        };
        let fh = st.next_fh;
        st.next_fh += 1;
        let io = if backing.is_some() {
            Io::Passthrough
        } else {
            Io::Cached
        };
        let f = OpenFile {
            ino: ino.0,
            fd: Arc::new(fd),
            sync: is_sync(flags.0),
            io,
            backing_id: backing,
            unflushed: 0,
        };
        match (&f.backing_id, io) {
            // The reply borrows the id; the handle keeps it alive until
            // release. (FOPEN_KEEP_CACHE with passthrough makes reads fail.)
            (Some(b), _) => reply.opened_passthrough(FileHandle(fh), FopenFlags::empty(), b),
            (None, _) => reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE),
        }
        st.files.insert(fh, f);
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let fd = self.lock().files.get(&fh.0).map(|f| Arc::clone(&f.fd));
        let Some(fd) = fd else {
            return reply.error(Errno::from_i32(libc::EBADF));
        };
        let size = size as usize;
        READ_BUF.with_borrow_mut(|buf| {
            // Zeroed only when it grows (once per thread, to the largest
            // read the kernel sends).
            if buf.len() < size {
                buf.resize(size, 0);
            }
            let mut got = 0;
            while got < size {
                match rustix::io::pread(fd.as_fd(), &mut buf[got..size], offset + got as u64) {
                    Ok(0) => break,
                    Ok(n) => got += n,
                    Err(rustix::io::Errno::INTR) => {}
                    Err(e) => return reply.error(Errno::from_i32(e.raw_os_error())),
                }
            }
            reply.data(&buf[..got]);
        });
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        self.repl.admit();
        let mut st = self.lock();
        let r = (|| {
            let f = st.files.get(&fh.0).ok_or(Errno::from_i32(libc::EBADF))?;
            let fd = Arc::clone(&f.fd);
            // Strict mode: an O_SYNC/O_DSYNC write is its own barrier. At
            // fsync durability the kernel follows such a write with an
            // fsync request (generic_write_sync), the barrier then.
            let sync = self.strict() && (f.sync || is_sync(flags.0));
            let data_only = flags.0 & libc::O_SYNC != libc::O_SYNC;
            let path = Self::maybe_path(&st, ino)?;
            let (written, mut ticket) =
                self.write_pieces(fd.as_fd(), path.as_ref(), offset, data)?;
            if write_flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID) {
                // An unprivileged writer (FUSE_HANDLE_KILLPRIV_V2): the
                // set-id bits go, here and on the secondary.
                let stat = sys::fstat(fd.as_fd()).map_err(|e| errno(&e))?;
                if let Some(m) = killed_mode(sys::perm(&stat)) {
                    rustix::fs::fchmod(fd.as_fd(), Mode::from_raw_mode(m))
                        .map_err(|e| Errno::from_i32(e.raw_os_error()))?;
                    if let Some(p) = &path {
                        ticket = self.submit(
                            &Op::SetAttr {
                                path: p.clone(),
                                mode: Some(m),
                                uid: None,
                                gid: None,
                                atime: None,
                                mtime: None,
                            },
                            &[(p.clone(), Change::Meta)],
                        );
                    }
                }
            }
            if sync && let Some(path) = path {
                // Sequenced after the pieces; the local sync follows below,
                // outside the lock (see `fsync`).
                ticket = self.submit(&Op::Fsync { path, data_only }, &[]);
            }
            let writeback = st.files.get_mut(&fh.0).is_some_and(|f| {
                f.unflushed += written as u64;
                let due = f.unflushed >= sys::WRITEBACK_AFTER;
                if due {
                    f.unflushed = 0;
                }
                due
            });
            Ok((
                written,
                ticket,
                sync.then_some((Arc::clone(&fd), data_only)),
                writeback.then_some(fd),
            ))
        })();
        drop(st);
        match r {
            Ok((written, t, sync, writeback)) => {
                // A long write's pages go to disk while it goes on, not all
                // at its fsync (outside the lock: this may wait for the
                // device's queue).
                if let Some(fd) = writeback {
                    sys::start_writeback(fd.as_fd());
                }
                let len = u32::try_from(written).unwrap_or(u32::MAX);
                let done = move |r| match r {
                    Ok(()) => reply.written(len),
                    Err(e) => reply.error(Errno::from_i32(e)),
                };
                match sync {
                    Some((fd, data_only)) => {
                        self.then_flushed(t, || sync_fd(fd.as_fd(), data_only), done);
                    }
                    None => self.answer(t, done),
                }
            }
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Nothing to do at close (writes are applied as they come; the
        // kernel writes back dirty pages before sending this): ENOSYS tells
        // the kernel never to send FLUSH again, a round trip less per close.
        reply.error(Errno::ENOSYS);
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let f = self.lock().files.remove(&fh.0);
        drop(f);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        // The barrier is sequenced under the lock; the local flush runs
        // outside it, overlapping the barrier's round trip, and other
        // requests go on meanwhile. Still in order: every write this fsync
        // covers (replied to before it was called, so applied locally and
        // submitted under the lock before this request took it) has a
        // smaller sequence number than the barrier, and the local flush
        // starts after those writes reached the page cache. The reply waits
        // for both the flush and the barrier's durability.
        let st = self.lock();
        let r = Self::open_fd(&st, ino, Some(fh))
            .ok_or(Errno::from_i32(libc::EBADF))
            .and_then(|fd| {
                let t = match Self::maybe_path(&st, ino)? {
                    Some(path) => self.submit(
                        &Op::Fsync {
                            path,
                            data_only: datasync,
                        },
                        &[],
                    ),
                    None => Ticket::DONE,
                };
                Ok((fd, t))
            });
        drop(st);
        match r {
            Ok((fd, t)) => self.then_flushed(t, || sync_fd(fd.as_fd(), datasync), empty(reply)),
            Err(e) => reply.error(e),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.read_dir(ino) {
            Ok(d) => {
                let mut st = self.lock();
                let fh = st.next_fh;
                st.next_fh += 1;
                st.dirs.insert(fh, d);
                drop(st);
                reply.opened(FileHandle(fh), FopenFlags::empty());
            }
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let st = self.lock();
        let Some(d) = st.dirs.get(&fh.0) else {
            drop(st);
            return reply.error(Errno::from_i32(libc::EBADF));
        };
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        for (i, (ino, kind, name)) in d.entries.iter().enumerate().skip(start) {
            if reply.add(INodeNo(*ino), i as u64 + 1, *kind, name) {
                break;
            }
        }
        drop(st);
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.lock().dirs.remove(&fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        // As `fsync`: barrier under the lock, local flush outside it.
        let st = self.lock();
        let r = self.dir_of(&st, ino).map(|(path, fd)| {
            let t = self.submit(
                &Op::Fsync {
                    path,
                    data_only: datasync,
                },
                &[],
            );
            (fd, t)
        });
        drop(st);
        match r {
            Ok((dir, t)) => self.then_flushed(
                t,
                || sync_fd(Self::readable(&dir)?.as_fd(), false),
                empty(reply),
            ),
            Err(e) => reply.error(e),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match rustix::fs::fstatvfs(self.root()) {
            Ok(s) => reply.statfs(
                s.f_blocks,
                s.f_bfree,
                s.f_bavail,
                s.f_files,
                s.f_ffree,
                u32::try_from(s.f_bsize).unwrap_or(4096),
                u32::try_from(s.f_namemax).unwrap_or(255),
                u32::try_from(s.f_frsize).unwrap_or(4096),
            ),
            Err(e) => reply.error(Errno::from_i32(e.raw_os_error())),
        }
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        self.repl.admit();
        let st = self.lock();
        let r = (|| {
            let path = Self::path(&st, ino)?;
            let e = self.entry_of(&st, ino)?;
            #[expect(clippy::cast_sign_loss, reason = "flag bits")]
            let f = XattrFlags::from_bits_retain(flags as u32);
            rustix::fs::lsetxattr(sys::proc_entry(e.dir.as_fd(), &e.name), name, value, f)
                .map_err(|e| Errno::from_i32(e.raw_os_error()))?;
            Ok(self.submit(
                &Op::SetXattr {
                    path: path.clone(),
                    name: name.as_bytes().to_vec(),
                    value: value.to_vec(),
                },
                &[(path, Change::Meta)],
            ))
        })();
        drop(st);
        match r {
            Ok(t) => self.reply_empty(t, reply),
            Err(e) => reply.error(e),
        }
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let st = self.lock();
        let e = self.entry_of(&st, ino);
        drop(st);
        let r = e.and_then(|e| {
            sys::get_xattr(&sys::proc_entry(e.dir.as_fd(), &e.name), name).map_err(|e| errno(&e))
        });
        reply_xattr(r, size, reply);
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let st = self.lock();
        let e = self.entry_of(&st, ino);
        drop(st);
        let r = e.and_then(|e| {
            sys::list_xattrs(&sys::proc_entry(e.dir.as_fd(), &e.name)).map_err(|e| errno(&e))
        });
        reply_xattr(r, size, reply);
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.repl.admit();
        let st = self.lock();
        let r = (|| {
            let path = Self::path(&st, ino)?;
            let e = self.entry_of(&st, ino)?;
            rustix::fs::lremovexattr(sys::proc_entry(e.dir.as_fd(), &e.name), name)
                .map_err(|e| Errno::from_i32(e.raw_os_error()))?;
            Ok(self.submit(
                &Op::RemoveXattr {
                    path: path.clone(),
                    name: name.as_bytes().to_vec(),
                },
                &[(path, Change::Meta)],
            ))
        })();
        drop(st);
        match r {
            Ok(t) => self.reply_empty(t, reply),
            Err(e) => reply.error(e),
        }
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        // `default_permissions`: the kernel checks; never called in practice.
        reply.ok();
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        self.repl.admit();
        let mut st = self.lock();
        let r = (|| {
            let (ppath, dir) = self.dir_of(&st, parent)?;
            let path = Self::child(&ppath, name)?;
            let fd = rustix::fs::openat(
                &dir,
                name,
                self.real_flags(flags)
                    | OFlags::CREATE
                    | OFlags::EXCL
                    | OFlags::NOFOLLOW
                    | OFlags::CLOEXEC,
                Mode::from_raw_mode(mode & 0o7777),
            )
            .map_err(|e| Errno::from_i32(e.raw_os_error()))?;
            let e = Entry {
                dir,
                name: name.to_os_string(),
            };
            let stat = Self::own_new(req, &e, mode, false)?;
            let op = Op::Mknod {
                path: path.clone(),
                kind: NodeKind::File,
                mode: sys::perm(&stat),
                rdev: 0,
                uid: stat.st_uid,
                gid: stat.st_gid,
                mtime: sys::mtime(&stat),
                dir_mtime: Self::dir_mtime(&e)?,
            };
            let attr = self.attr(&stat);
            let pin = Self::pin_new(&e, &stat)?;
            st.tree.learn(attr.ino.0, parent.0, name, pin);
            let fh = st.next_fh;
            st.next_fh += 1;
            st.files.insert(
                fh,
                OpenFile {
                    ino: attr.ino.0,
                    fd: Arc::new(fd),
                    sync: is_sync(flags),
                    io: Io::Cached,
                    backing_id: None,
                    unflushed: 0,
                },
            );
            Ok((attr, fh, self.submit(&op, &[(path, Change::Tree)])))
        })();
        drop(st);
        match r {
            Ok((attr, fh, t)) => self.answer(t, move |r| match r {
                Ok(()) => reply.created(
                    &TTL,
                    &attr,
                    Generation(0),
                    FileHandle(fh),
                    FopenFlags::FOPEN_KEEP_CACHE,
                ),
                Err(e) => reply.error(Errno::from_i32(e)),
            }),
            Err(e) => reply.error(e),
        }
    }

    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        // No ioctl is supported (FS_IOC_GETFLAGS and the like): the answer
        // of a local filesystem to an unknown one, without a log line.
        reply.error(Errno::from_i32(libc::ENOTTY));
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _length: u64,
        _mode: i32,
        reply: ReplyEmpty,
    ) {
        // Not replicated yet: refuse, so posix_fallocate falls back to writes.
        reply.error(Errno::from_i32(libc::EOPNOTSUPP));
    }
}

impl ReplicatedFs {
    fn remove(&self, parent: INodeNo, name: &OsStr, dir: bool, reply: ReplyEmpty) {
        self.repl.admit();
        let mut st = self.lock();
        let r = (|| {
            let (ppath, pfd) = self.dir_of(&st, parent)?;
            let path = Self::child(&ppath, name)?;
            let flags = if dir {
                AtFlags::REMOVEDIR
            } else {
                AtFlags::empty()
            };
            rustix::fs::unlinkat(&pfd, name, flags)
                .map_err(|e| Errno::from_i32(e.raw_os_error()))?;
            st.tree.unlearn(parent.0, name);
            let dir_mtime = sys::mtime(&sys::fstat(&pfd).map_err(|e| errno(&e))?);
            let op = if dir {
                Op::Rmdir {
                    path: path.clone(),
                    dir_mtime,
                }
            } else {
                Op::Unlink {
                    path: path.clone(),
                    dir_mtime,
                }
            };
            Ok(self.submit(&op, &[(path, Change::Meta)]))
        })();
        drop(st);
        match r {
            Ok(t) => self.reply_empty(t, reply),
            Err(e) => reply.error(e),
        }
    }
}

/// The attributes of a negative entry (node id 0: "no such name", cached).
fn negative_entry() -> FileAttr {
    FileAttr {
        ino: INodeNo(0),
        size: 0,
        blocks: 0,
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind: FuseType::RegularFile,
        perm: 0,
        nlink: 0,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 0,
        flags: 0,
    }
}

fn reply_xattr(r: Result<Vec<u8>, Errno>, size: u32, reply: ReplyXattr) {
    match r {
        Ok(v) if size == 0 => reply.size(u32::try_from(v.len()).unwrap_or(u32::MAX)),
        Ok(v) if v.len() <= size as usize => reply.data(&v),
        Ok(_) => reply.error(Errno::from_i32(libc::ERANGE)),
        Err(e) => reply.error(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The path of `ino` in `t`, as a string.
    fn at(t: &Tree, ino: u64) -> Option<String> {
        t.path(ino).expect("not too long").map(|p| p.to_string())
    }

    #[test]
    fn tree_tracks_names_through_renames_and_unlinks() {
        // Any O_PATH handle stands for the node's pin here.
        let pin = || {
            rustix::fs::open(".", OFlags::PATH | OFlags::CLOEXEC, Mode::empty()).expect("O_PATH")
        };
        let mut t = Tree::default();
        t.learn(10, 1, OsStr::new("d"), pin());
        t.learn(11, 10, OsStr::new("f"), pin());
        assert_eq!(at(&t, 11), Some("d/f".into()));
        t.rename((1, OsStr::new("d")), (1, OsStr::new("e")), false);
        assert_eq!(at(&t, 11), Some("e/f".into()));
        // Hard link, then the first name goes: the other one remains.
        t.learn(11, 1, OsStr::new("h"), pin());
        t.unlearn(10, OsStr::new("f"));
        assert_eq!(at(&t, 11), Some("h".into()));
        t.unlearn(1, OsStr::new("h"));
        assert_eq!(at(&t, 11), None);
        // Rename over an existing entry: the target loses its name.
        t.learn(12, 1, OsStr::new("a"), pin());
        t.learn(13, 1, OsStr::new("b"), pin());
        t.rename((1, OsStr::new("a")), (1, OsStr::new("b")), false);
        assert_eq!(at(&t, 12), Some("b".into()));
        assert_eq!(at(&t, 13), None);
        // Exchange swaps.
        t.learn(14, 1, OsStr::new("c"), pin());
        t.rename((1, OsStr::new("b")), (1, OsStr::new("c")), true);
        assert_eq!(at(&t, 12), Some("c".into()));
        assert_eq!(at(&t, 14), Some("b".into()));
        assert!(t.pin(14).is_some());
        t.forget(14, 1);
        assert!(at(&t, 14).is_none() && !t.by_name.values().any(|&i| i == 14));
        // Forgotten: the handle that pinned the inode is released.
        assert!(t.pin(14).is_none());
        assert_eq!(at(&t, 1), Some(".".into()));
    }

    #[test]
    fn deep_paths_are_built_past_path_max_and_refused_past_the_wire_limit() {
        let pin = || {
            rustix::fs::open(".", OFlags::PATH | OFlags::CLOEXEC, Mode::empty()).expect("O_PATH")
        };
        let name = "n".repeat(200);
        let mut t = Tree::default();
        // 45 levels of 200-byte names below the root (inodes 100..145).
        let mut parent = INodeNo::ROOT.0;
        for ino in 100..145 {
            t.learn(ino, parent, OsStr::new(&name), pin());
            parent = ino;
        }
        let want = vec![name.as_str(); 45].join("/");
        assert!(want.len() > 2 * 4096);
        assert_eq!(at(&t, 144), Some(want));
        // Deeper than the wire allows (MAX_PATH / 201 levels fit): an
        // error, never "no name" (which would keep changes local).
        for ino in 145..=(100 + MAX_PATH as u64 / 201) {
            t.learn(ino, parent, OsStr::new(&name), pin());
            parent = ino;
        }
        assert!(t.path(parent - 1).expect("fits").is_some());
        assert_eq!(t.path(parent), Err(PathError::TooLong));
    }

    #[test]
    fn a_join_completes_once_both_halves_are_in_either_order() {
        use std::sync::mpsc;
        for (first, second, want) in [
            (Ok(()), Ok(()), Ok(())),
            (Err(5), Ok(()), Err(5)),
            (Ok(()), Err(28), Err(28)),
            (Err(5), Err(28), Err(5)),
        ] {
            let (tx, rx) = mpsc::channel();
            let join = Join::new(Box::new(move |r| tx.send(r).expect("send")));
            join.half(first);
            assert!(rx.try_recv().is_err(), "completed after one half");
            join.half(second);
            assert_eq!(rx.try_recv(), Ok(want));
        }
    }

    #[test]
    fn times_convert_both_ways() {
        for t in [
            Timestamp { sec: 0, nsec: 0 },
            Timestamp {
                sec: 1_700_000_000,
                nsec: 123,
            },
            Timestamp { sec: -2, nsec: 500 },
        ] {
            assert_eq!(from_system_time(to_system_time(t)), t);
        }
    }

    #[test]
    fn open_flags_drop_append_and_creation() {
        let f = real_open_flags(
            libc::O_WRONLY | libc::O_APPEND | libc::O_CREAT | libc::O_TRUNC | libc::O_DIRECT,
        );
        assert_eq!(f, OFlags::WRONLY);
    }
}
