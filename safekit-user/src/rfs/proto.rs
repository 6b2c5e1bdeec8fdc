//! The replicated operations and the messages of the replication channel, as
//! a compact binary encoding (pure: no I/O).
//!
//! Every message is one tag byte followed by its fields. Integers are LEB128
//! varints (signed ones zig-zagged), byte strings are a varint length then the
//! bytes, optional fields a presence byte. Paths are [`RelPath`]s: relative to
//! the replicated directory's root, validated on decode, so a message can never
//! name anything outside the root.
//!
//! A path counted from the replicated root may be longer than `PATH_MAX`
//! (4096): a local filesystem limits the path of one system call, not the
//! depth of a tree, and an application reaches deep entries through
//! directory fds (`chdir`, `openat`). So a [`RelPath`] is bounded by
//! [`MAX_PATH`] (64 KiB, every decoder stays bounded), each component by
//! [`MAX_NAME`] (`NAME_MAX`), and no side ever hands a whole [`RelPath`] to a
//! system call: the primary works from the parent inode's handle, the
//! secondary resolves a path piece by piece, each piece shorter than
//! `PATH_MAX` (see `sys::open_beneath`).
//!
//! Each operation travels with its sequence number ([`Message::Op`]); the
//! secondary applies them in that order and acknowledges cumulatively
//! ([`Message::Ack`]: every operation up to that number).
//!
//! Operations carry the times the primary's filesystem gave the objects they
//! change (a written file's mtime, a directory's mtime after an entry was
//! added or removed), so both copies end with equal metadata and not merely
//! equal content.

use std::fmt;

use thiserror::Error;

/// A sequence number; the first operation of a connection is 1.
pub type Seq = u64;

/// Protocol version, checked in [`Message::Hello`].
pub const VERSION: u32 = 4;

/// Longest relative path on the wire (bytes): 64 KiB, sixteen times Linux's
/// `PATH_MAX` (a deep tree's path from the replicated root may exceed
/// `PATH_MAX`; see the module docs). On the primary, an operation whose path
/// from the root would be longer fails with `ENAMETOOLONG`.
pub const MAX_PATH: usize = 64 << 10;
/// Linux's `PATH_MAX` (the terminating NUL included): the longest path one
/// system call takes. Bounds symlink targets and the directory names of the
/// hellos.
pub const PATH_MAX: usize = 4096;
/// Longest path component accepted (bytes), as Linux's `NAME_MAX`.
pub const MAX_NAME: usize = 255;
/// Largest data of one [`Op::Write`] (the FUSE side writes at most 1 MiB).
pub const MAX_WRITE: usize = 16 << 20;
/// Largest extended attribute value (Linux's `XATTR_SIZE_MAX`).
pub const MAX_XATTR: usize = 64 << 10;

/// A decoding failure: the bytes are not a message of this protocol.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    /// The message ends in the middle of a field.
    #[error("message truncated while reading {0}")]
    Truncated(&'static str),
    /// A varint is longer than 64 bits.
    #[error("varint overflow in {0}")]
    Overflow(&'static str),
    /// An unknown tag.
    #[error("unknown {what} tag {tag}")]
    Tag {
        /// Which enum.
        what: &'static str,
        /// The byte found.
        tag: u8,
    },
    /// A field out of its allowed range.
    #[error("{field}: {why}")]
    Invalid {
        /// Field name.
        field: &'static str,
        /// What is wrong.
        why: &'static str,
    },
    /// Bytes left after the message.
    #[error("{0} trailing bytes after the message")]
    Trailing(usize),
    /// A path that escapes the root or is malformed.
    #[error("bad path: {0}")]
    Path(#[from] PathError),
}

/// Why a byte string is not a [`RelPath`].
#[derive(Debug, Error, PartialEq, Eq, Clone, Copy)]
pub enum PathError {
    /// Starts with `/`.
    #[error("absolute path")]
    Absolute,
    /// A `..` component.
    #[error("`..` component")]
    DotDot,
    /// A `.` component, an empty component (`a//b`) or a trailing `/`.
    #[error("empty or `.` component")]
    EmptyComponent,
    /// A NUL byte.
    #[error("NUL byte")]
    Nul,
    /// Longer than [`MAX_PATH`] or a component longer than [`MAX_NAME`].
    #[error("too long")]
    TooLong,
    /// The root itself where an entry name is needed.
    #[error("the root has no parent")]
    Root,
}

/// A path relative to the replicated directory's root: components separated
/// by `/`, none empty, `.` or `..`, no NUL. The empty path is the root.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct RelPath(Vec<u8>);

impl RelPath {
    /// The root of the replicated directory.
    #[must_use]
    pub fn root() -> Self {
        Self(Vec::new())
    }

    /// The root, borrowed.
    #[must_use]
    pub fn root_ref() -> &'static Self {
        static ROOT: RelPath = RelPath(Vec::new());
        &ROOT
    }

    /// Validates `bytes` as a relative path.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<Self, PathError> {
        let bytes = bytes.into();
        validate(&bytes)?;
        Ok(Self(bytes))
    }

    /// `self/name`, `name` being one component.
    pub fn join(&self, name: &[u8]) -> Result<Self, PathError> {
        validate_name(name)?;
        let mut v = Vec::with_capacity(self.0.len() + 1 + name.len());
        v.extend_from_slice(&self.0);
        if !v.is_empty() {
            v.push(b'/');
        }
        v.extend_from_slice(name);
        if v.len() > MAX_PATH {
            return Err(PathError::TooLong);
        }
        Ok(Self(v))
    }

    /// The bytes (`""` for the root).
    #[must_use]
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Whether this is the root.
    #[must_use]
    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }

    /// The parent directory and the last component.
    pub fn split(&self) -> Result<(&[u8], &[u8]), PathError> {
        if self.0.is_empty() {
            return Err(PathError::Root);
        }
        Ok(match self.0.iter().rposition(|&b| b == b'/') {
            Some(i) => (&self.0[..i], &self.0[i + 1..]),
            None => (&[][..], &self.0[..]),
        })
    }

    /// `name_n/.../name_1` from the names of an entry and its ancestors,
    /// nearest first (as found walking up from the entry): one allocation,
    /// each name checked, the whole bounded by [`MAX_PATH`].
    pub fn from_names_upwards(names: &[&[u8]]) -> Result<Self, PathError> {
        let mut len = 0usize;
        for n in names {
            validate_name(n)?;
            len = len.saturating_add(n.len() + 1);
            if len > MAX_PATH + 1 {
                return Err(PathError::TooLong);
            }
        }
        let mut v = Vec::with_capacity(len);
        for n in names.iter().rev() {
            if !v.is_empty() {
                v.push(b'/');
            }
            v.extend_from_slice(n);
        }
        Ok(Self(v))
    }

    /// Becomes its parent; false (unchanged) for the root.
    pub fn pop(&mut self) -> bool {
        if self.0.is_empty() {
            return false;
        }
        let keep = self.0.iter().rposition(|&b| b == b'/').unwrap_or(0);
        self.0.truncate(keep);
        true
    }

    /// Whether `self` is `other` or lies below it.
    #[must_use]
    pub fn starts_with(&self, other: &RelPath) -> bool {
        other.0.is_empty()
            || (self.0.starts_with(&other.0)
                && (self.0.len() == other.0.len() || self.0[other.0.len()] == b'/'))
    }
}

/// Lets a set ordered by path be searched by a byte prefix (the order of a
/// path is the order of its bytes).
impl std::borrow::Borrow<[u8]> for RelPath {
    fn borrow(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", String::from_utf8_lossy(&self.0))
    }
}

impl fmt::Display for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            f.write_str(".")
        } else {
            f.write_str(&String::from_utf8_lossy(&self.0))
        }
    }
}

/// Checks one path component.
pub fn validate_name(name: &[u8]) -> Result<(), PathError> {
    match name {
        [] | b"." => Err(PathError::EmptyComponent),
        b".." => Err(PathError::DotDot),
        _ if name.len() > MAX_NAME => Err(PathError::TooLong),
        _ if name.contains(&0) => Err(PathError::Nul),
        _ if name.contains(&b'/') => Err(PathError::EmptyComponent),
        _ => Ok(()),
    }
}

fn validate(bytes: &[u8]) -> Result<(), PathError> {
    if bytes.is_empty() {
        return Ok(());
    }
    if bytes.len() > MAX_PATH {
        return Err(PathError::TooLong);
    }
    if bytes[0] == b'/' {
        return Err(PathError::Absolute);
    }
    bytes.split(|&b| b == b'/').try_for_each(validate_name)
}

/// A point in time as the filesystem stores it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Timestamp {
    /// Seconds since the epoch.
    pub sec: i64,
    /// Nanoseconds, `< 1_000_000_000`.
    pub nsec: u32,
}

/// Kinds of non-directory nodes created by [`Op::Mknod`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeKind {
    /// Regular file.
    File,
    /// Named pipe.
    Fifo,
    /// Unix socket node.
    Socket,
    /// Character device.
    CharDev,
    /// Block device.
    BlockDev,
}

/// What [`Op::Put`] makes exist at a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    /// A non-directory node (regular file, fifo, socket, device).
    Node(NodeKind),
    /// A directory.
    Dir,
    /// A symbolic link (its target in [`Op::Put`]'s `target`).
    Symlink,
}

/// A change recorded in a journal or reported by a returning secondary:
/// see [`super::journal::Change`].
pub use super::journal::Change;

/// `renameat2` flags carried by [`Op::Rename`].
pub mod rename {
    /// Fail if the target exists.
    pub const NOREPLACE: u32 = 1;
    /// Swap source and target atomically.
    pub const EXCHANGE: u32 = 2;
}

/// One replicated operation. Ownership and modes are the final ones the
/// primary observed (after its umask and setgid inheritance): the secondary
/// applies them as given, whatever its own process umask.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// `pwrite(path, data, offset)`, then the file's mtime.
    Write {
        /// File.
        path: RelPath,
        /// Byte offset.
        offset: u64,
        /// Bytes written.
        data: Vec<u8>,
        /// mtime after the write.
        mtime: Timestamp,
    },
    /// `truncate(path, size)` (up or down), then the file's mtime.
    Truncate {
        /// File.
        path: RelPath,
        /// New size.
        size: u64,
        /// mtime after the truncate.
        mtime: Timestamp,
    },
    /// Creates a non-directory node (regular file included).
    Mknod {
        /// New entry.
        path: RelPath,
        /// Its kind.
        kind: NodeKind,
        /// Permission bits (`0o7777`).
        mode: u32,
        /// Device number for device nodes.
        rdev: u64,
        /// Owner.
        uid: u32,
        /// Group.
        gid: u32,
        /// atime = mtime of the new node.
        mtime: Timestamp,
        /// Parent directory's mtime after the creation.
        dir_mtime: Timestamp,
    },
    /// Creates a directory.
    Mkdir {
        /// New directory.
        path: RelPath,
        /// Permission bits (`0o7777`).
        mode: u32,
        /// Owner.
        uid: u32,
        /// Group.
        gid: u32,
        /// atime = mtime of the new directory.
        mtime: Timestamp,
        /// Parent directory's mtime after the creation.
        dir_mtime: Timestamp,
    },
    /// Removes a non-directory entry.
    Unlink {
        /// Entry.
        path: RelPath,
        /// Parent directory's mtime after the removal.
        dir_mtime: Timestamp,
    },
    /// Removes an empty directory.
    Rmdir {
        /// Directory.
        path: RelPath,
        /// Parent directory's mtime after the removal.
        dir_mtime: Timestamp,
    },
    /// `renameat2(from, to, flags)` ([`rename`] flags).
    Rename {
        /// Source.
        from: RelPath,
        /// Target (replaced if it exists, unless `NOREPLACE`).
        to: RelPath,
        /// [`rename`] flags.
        flags: u32,
        /// Source parent's mtime after the rename.
        from_dir_mtime: Timestamp,
        /// Target parent's mtime after the rename.
        to_dir_mtime: Timestamp,
    },
    /// Creates a symbolic link.
    Symlink {
        /// New link.
        path: RelPath,
        /// What it points to (stored as is, never followed by the secondary).
        target: Vec<u8>,
        /// Owner.
        uid: u32,
        /// Group.
        gid: u32,
        /// atime = mtime of the link.
        mtime: Timestamp,
        /// Parent directory's mtime after the creation.
        dir_mtime: Timestamp,
    },
    /// Creates a hard link.
    Link {
        /// Existing file.
        existing: RelPath,
        /// New name.
        path: RelPath,
        /// New name's parent's mtime after the link.
        dir_mtime: Timestamp,
    },
    /// chown, chmod, utimes (each only when present), in that order.
    SetAttr {
        /// Object (never followed if a symlink).
        path: RelPath,
        /// Permission bits.
        mode: Option<u32>,
        /// Owner.
        uid: Option<u32>,
        /// Group.
        gid: Option<u32>,
        /// Access time.
        atime: Option<Timestamp>,
        /// Modification time.
        mtime: Option<Timestamp>,
    },
    /// Sets an extended attribute (created or replaced).
    SetXattr {
        /// Object.
        path: RelPath,
        /// Attribute name (`user.x`, ...).
        name: Vec<u8>,
        /// Value.
        value: Vec<u8>,
    },
    /// Removes an extended attribute.
    RemoveXattr {
        /// Object.
        path: RelPath,
        /// Attribute name.
        name: Vec<u8>,
    },
    /// Durability barrier: the application called fsync/fdatasync (or wrote
    /// with `O_SYNC`). With `async = "none"` the secondary syncs the file to
    /// its disk before acknowledging.
    Fsync {
        /// File to sync; the root means the whole directory's filesystem.
        path: RelPath,
        /// fdatasync rather than fsync.
        data_only: bool,
    },
    /// Resynchronisation: make the entry at `path` exist as `kind` (whatever
    /// was there of another kind is removed, recursively), with this mode,
    /// owner, size (files), device number, symlink target and exactly these
    /// extended attributes. Contents follow as [`Op::Write`]/[`Op::Hole`],
    /// times as a final [`Op::SetAttr`].
    Put {
        /// Entry (the root for the directory itself).
        path: RelPath,
        /// Its kind.
        kind: EntryKind,
        /// Permission bits (`0o7777`).
        mode: u32,
        /// Owner.
        uid: u32,
        /// Group.
        gid: u32,
        /// Size of a regular file.
        size: u64,
        /// Device number of a device node.
        rdev: u64,
        /// Target of a symlink (empty otherwise).
        target: Vec<u8>,
        /// Every extended attribute, name and value.
        xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    },
    /// Resynchronisation: remove whatever is at `path` (recursively); absent
    /// is fine.
    Remove {
        /// Entry.
        path: RelPath,
    },
    /// Resynchronisation: directory `path` holds only these names; any other
    /// entry is removed (recursively).
    Prune {
        /// Directory.
        path: RelPath,
        /// Names to keep.
        keep: Vec<Vec<u8>>,
    },
    /// Resynchronisation: bytes `[offset, offset + len)` of a file are a hole
    /// (zeros) on the primary.
    Hole {
        /// File.
        path: RelPath,
        /// First byte.
        offset: u64,
        /// Length.
        len: u64,
    },
    /// End of a resynchronisation: the secondary's copy now equals the
    /// primary's; both record `sync_id`, and every later operation is live.
    InSync {
        /// Identifies this synchronisation point on both nodes.
        sync_id: u64,
    },
    /// Start of a full resynchronisation: the secondary records `resume_id`
    /// (durably, before applying what follows) and reports it in its next
    /// [`Message::Welcome`]; a primary that recorded the same id sends only
    /// what its journal says remains, instead of the whole tree again.
    FullSync {
        /// Identifies this full resynchronisation on both nodes.
        resume_id: u64,
    },
}

impl Op {
    /// The main path the operation changes (for logs and journal).
    #[must_use]
    pub fn path(&self) -> &RelPath {
        match self {
            Op::Write { path, .. }
            | Op::Truncate { path, .. }
            | Op::Mknod { path, .. }
            | Op::Mkdir { path, .. }
            | Op::Unlink { path, .. }
            | Op::Rmdir { path, .. }
            | Op::Symlink { path, .. }
            | Op::Link { path, .. }
            | Op::SetAttr { path, .. }
            | Op::SetXattr { path, .. }
            | Op::RemoveXattr { path, .. }
            | Op::Fsync { path, .. }
            | Op::Put { path, .. }
            | Op::Remove { path }
            | Op::Prune { path, .. }
            | Op::Hole { path, .. } => path,
            Op::Rename { to, .. } => to,
            Op::InSync { .. } | Op::FullSync { .. } => RelPath::root_ref(),
        }
    }

    /// Short name for logs and errors.
    #[must_use]
    pub fn name(&self) -> &'static str {
        match self {
            Op::Write { .. } => "write",
            Op::Truncate { .. } => "truncate",
            Op::Mknod { .. } => "mknod",
            Op::Mkdir { .. } => "mkdir",
            Op::Unlink { .. } => "unlink",
            Op::Rmdir { .. } => "rmdir",
            Op::Rename { .. } => "rename",
            Op::Symlink { .. } => "symlink",
            Op::Link { .. } => "link",
            Op::SetAttr { .. } => "setattr",
            Op::SetXattr { .. } => "setxattr",
            Op::RemoveXattr { .. } => "removexattr",
            Op::Fsync { .. } => "fsync",
            Op::Put { .. } => "put",
            Op::Remove { .. } => "remove",
            Op::Prune { .. } => "prune",
            Op::Hole { .. } => "hole",
            Op::InSync { .. } => "insync",
            Op::FullSync { .. } => "fullsync",
        }
    }
}

/// One entry of a copy's manifest (`safekit rfs verify`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestEntry {
    /// Path below the replicated directory.
    pub path: RelPath,
    /// 0 file, 1 directory, 2 symlink, 3 other.
    pub kind: u8,
    /// Permission bits.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Size (files).
    pub size: u64,
    /// Modification time (files and symlinks; zero for directories).
    pub mtime: Timestamp,
    /// BLAKE3 of the content (files), the target (symlinks), else empty.
    pub digest: Vec<u8>,
    /// BLAKE3 of the extended attributes (ACLs included), names sorted;
    /// empty when there are none.
    pub xattrs: Vec<u8>,
    /// Device number (character and block devices; else 0).
    pub rdev: u64,
    /// Hard links: the first path (in path order) of the tree naming the
    /// same inode, when another path does; else empty.
    pub link: Vec<u8>,
}

/// Most entries in one [`Message::Manifest`].
pub const MANIFEST_CHUNK: usize = 2048;

/// A message on the replication channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Primary → secondary, first message: which replicated directory this
    /// connection carries (its configured path, the same on both nodes).
    Hello {
        /// [`VERSION`].
        version: u32,
        /// Replicated directory name.
        dir: String,
    },
    /// Secondary → primary: the directory is open, operations may flow.
    /// `sync_id`: the last synchronisation point this copy completed (0:
    /// none, or not trustworthy — a full resynchronisation is needed);
    /// `suspects`: what this copy may have that the primary lacks (its
    /// activity log and what it changed alone), to be overwritten.
    Welcome {
        /// Last completed [`Op::InSync`] here, 0 if none.
        sync_id: u64,
        /// Paths and ranges to resynchronise from the primary.
        suspects: Vec<(RelPath, Change)>,
        /// The [`Op::FullSync`] this copy received since its last
        /// synchronisation point (0: none, or not trustworthy).
        resume_id: u64,
    },
    /// Primary → secondary: one operation.
    Op {
        /// Its sequence number (consecutive from 1).
        seq: Seq,
        /// The operation.
        op: Op,
    },
    /// Secondary → primary: every operation up to `seq` is received
    /// (`async = "second"`) or written (`async = "none"`).
    Ack {
        /// Highest sequence number covered.
        seq: Seq,
    },
    /// Secondary → primary: operation `seq` could not be applied; the copies
    /// diverge and need a resynchronisation.
    Failed {
        /// The operation.
        seq: Seq,
        /// `errno` or 0.
        errno: i32,
        /// What failed.
        detail: String,
    },
    /// Primary → secondary, first message of a verification connection
    /// (instead of [`Message::Hello`]): send the manifest of `dir`.
    Verify {
        /// [`VERSION`].
        version: u32,
        /// Replicated directory name.
        dir: String,
    },
    /// Secondary → primary: part of its manifest, in path order.
    Manifest {
        /// Entries.
        entries: Vec<ManifestEntry>,
    },
    /// Secondary → primary: the manifest is complete.
    ManifestEnd,
    /// Either side: refusal or orderly close, with the reason.
    Bye {
        /// Why.
        reason: String,
    },
}

// ---------------------------------------------------------------- encoding

const OP_WRITE: u8 = 1;
const OP_TRUNCATE: u8 = 2;
const OP_MKNOD: u8 = 3;
const OP_MKDIR: u8 = 4;
const OP_UNLINK: u8 = 5;
const OP_RMDIR: u8 = 6;
const OP_RENAME: u8 = 7;
const OP_SYMLINK: u8 = 8;
const OP_LINK: u8 = 9;
const OP_SETATTR: u8 = 10;
const OP_SETXATTR: u8 = 11;
const OP_REMOVEXATTR: u8 = 12;
const OP_FSYNC: u8 = 13;
const OP_PUT: u8 = 14;
const OP_REMOVE: u8 = 15;
const OP_PRUNE: u8 = 16;
const OP_HOLE: u8 = 17;
const OP_INSYNC: u8 = 18;
const OP_FULLSYNC: u8 = 19;

/// Most suspects a [`Message::Welcome`] carries; past that the secondary
/// asks for the whole tree.
pub const MAX_SUSPECTS: usize = 50_000;
/// Most names in an [`Op::Prune`].
pub const MAX_PRUNE: usize = 50_000;
/// Most extended attributes in an [`Op::Put`].
pub const MAX_XATTRS: usize = 1024;

const MSG_HELLO: u8 = 1;
const MSG_WELCOME: u8 = 2;
const MSG_OP: u8 = 3;
const MSG_ACK: u8 = 4;
const MSG_FAILED: u8 = 5;
const MSG_BYE: u8 = 6;
const MSG_VERIFY: u8 = 7;
const MSG_MANIFEST: u8 = 8;
const MSG_MANIFEST_END: u8 = 9;

/// Appends LEB128 `v`.
pub(crate) fn put_u64(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        #[expect(clippy::cast_possible_truncation, reason = "low 7 bits")]
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    #[expect(clippy::cast_possible_truncation, reason = "v < 0x80")]
    out.push(v as u8);
}

fn put_i64(out: &mut Vec<u8>, v: i64) {
    #[expect(clippy::cast_sign_loss, reason = "zig-zag encoding")]
    put_u64(out, ((v << 1) ^ (v >> 63)) as u64);
}

pub(crate) fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_u64(out, b.len() as u64);
    out.extend_from_slice(b);
}

fn put_time(out: &mut Vec<u8>, t: Timestamp) {
    put_i64(out, t.sec);
    put_u64(out, u64::from(t.nsec));
}

fn put_opt_u32(out: &mut Vec<u8>, v: Option<u32>) {
    match v {
        None => out.push(0),
        Some(v) => {
            out.push(1);
            put_u64(out, u64::from(v));
        }
    }
}

fn put_opt_time(out: &mut Vec<u8>, v: Option<Timestamp>) {
    match v {
        None => out.push(0),
        Some(t) => {
            out.push(1);
            put_time(out, t);
        }
    }
}

fn kind_tag(k: NodeKind) -> u8 {
    match k {
        NodeKind::File => 0,
        NodeKind::Fifo => 1,
        NodeKind::Socket => 2,
        NodeKind::CharDev => 3,
        NodeKind::BlockDev => 4,
    }
}

/// Appends the encoding of an [`Op::Write`] from its borrowed parts (the
/// FUSE write path encodes the kernel's buffer without an owned copy).
pub fn encode_write(out: &mut Vec<u8>, path: &RelPath, offset: u64, data: &[u8], mtime: Timestamp) {
    out.push(OP_WRITE);
    put_bytes(out, path.as_bytes());
    put_u64(out, offset);
    put_time(out, mtime);
    put_bytes(out, data);
}

/// Appends the encoding of `op`.
#[expect(clippy::too_many_lines, reason = "one arm per operation")]
pub fn encode_op(out: &mut Vec<u8>, op: &Op) {
    match op {
        Op::Write {
            path,
            offset,
            data,
            mtime,
        } => encode_write(out, path, *offset, data, *mtime),
        Op::Truncate { path, size, mtime } => {
            out.push(OP_TRUNCATE);
            put_bytes(out, path.as_bytes());
            put_u64(out, *size);
            put_time(out, *mtime);
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
            out.push(OP_MKNOD);
            put_bytes(out, path.as_bytes());
            out.push(kind_tag(*kind));
            put_u64(out, u64::from(*mode));
            put_u64(out, *rdev);
            put_u64(out, u64::from(*uid));
            put_u64(out, u64::from(*gid));
            put_time(out, *mtime);
            put_time(out, *dir_mtime);
        }
        Op::Mkdir {
            path,
            mode,
            uid,
            gid,
            mtime,
            dir_mtime,
        } => {
            out.push(OP_MKDIR);
            put_bytes(out, path.as_bytes());
            put_u64(out, u64::from(*mode));
            put_u64(out, u64::from(*uid));
            put_u64(out, u64::from(*gid));
            put_time(out, *mtime);
            put_time(out, *dir_mtime);
        }
        Op::Unlink { path, dir_mtime } | Op::Rmdir { path, dir_mtime } => {
            out.push(if matches!(op, Op::Unlink { .. }) {
                OP_UNLINK
            } else {
                OP_RMDIR
            });
            put_bytes(out, path.as_bytes());
            put_time(out, *dir_mtime);
        }
        Op::Rename {
            from,
            to,
            flags,
            from_dir_mtime,
            to_dir_mtime,
        } => {
            out.push(OP_RENAME);
            put_bytes(out, from.as_bytes());
            put_bytes(out, to.as_bytes());
            put_u64(out, u64::from(*flags));
            put_time(out, *from_dir_mtime);
            put_time(out, *to_dir_mtime);
        }
        Op::Symlink {
            path,
            target,
            uid,
            gid,
            mtime,
            dir_mtime,
        } => {
            out.push(OP_SYMLINK);
            put_bytes(out, path.as_bytes());
            put_bytes(out, target);
            put_u64(out, u64::from(*uid));
            put_u64(out, u64::from(*gid));
            put_time(out, *mtime);
            put_time(out, *dir_mtime);
        }
        Op::Link {
            existing,
            path,
            dir_mtime,
        } => {
            out.push(OP_LINK);
            put_bytes(out, existing.as_bytes());
            put_bytes(out, path.as_bytes());
            put_time(out, *dir_mtime);
        }
        Op::SetAttr {
            path,
            mode,
            uid,
            gid,
            atime,
            mtime,
        } => {
            out.push(OP_SETATTR);
            put_bytes(out, path.as_bytes());
            put_opt_u32(out, *mode);
            put_opt_u32(out, *uid);
            put_opt_u32(out, *gid);
            put_opt_time(out, *atime);
            put_opt_time(out, *mtime);
        }
        Op::SetXattr { path, name, value } => {
            out.push(OP_SETXATTR);
            put_bytes(out, path.as_bytes());
            put_bytes(out, name);
            put_bytes(out, value);
        }
        Op::RemoveXattr { path, name } => {
            out.push(OP_REMOVEXATTR);
            put_bytes(out, path.as_bytes());
            put_bytes(out, name);
        }
        Op::Fsync { path, data_only } => {
            out.push(OP_FSYNC);
            put_bytes(out, path.as_bytes());
            out.push(u8::from(*data_only));
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
        } => {
            out.push(OP_PUT);
            put_bytes(out, path.as_bytes());
            out.push(match kind {
                EntryKind::Node(k) => kind_tag(*k),
                EntryKind::Dir => 5,
                EntryKind::Symlink => 6,
            });
            put_u64(out, u64::from(*mode));
            put_u64(out, u64::from(*uid));
            put_u64(out, u64::from(*gid));
            put_u64(out, *size);
            put_u64(out, *rdev);
            put_bytes(out, target);
            put_u64(out, xattrs.len() as u64);
            for (n, v) in xattrs {
                put_bytes(out, n);
                put_bytes(out, v);
            }
        }
        Op::Remove { path } => {
            out.push(OP_REMOVE);
            put_bytes(out, path.as_bytes());
        }
        Op::Prune { path, keep } => {
            out.push(OP_PRUNE);
            put_bytes(out, path.as_bytes());
            put_u64(out, keep.len() as u64);
            for n in keep {
                put_bytes(out, n);
            }
        }
        Op::Hole { path, offset, len } => {
            out.push(OP_HOLE);
            put_bytes(out, path.as_bytes());
            put_u64(out, *offset);
            put_u64(out, *len);
        }
        Op::InSync { sync_id } => {
            out.push(OP_INSYNC);
            put_u64(out, *sync_id);
        }
        Op::FullSync { resume_id } => {
            out.push(OP_FULLSYNC);
            put_u64(out, *resume_id);
        }
    }
}

/// Appends a change (suspect list encoding).
pub(crate) fn put_change(out: &mut Vec<u8>, path: &RelPath, change: Change) {
    put_bytes(out, path.as_bytes());
    match change {
        Change::Range { start, end } => {
            out.push(0);
            put_u64(out, start);
            put_u64(out, end);
        }
        Change::Meta => out.push(1),
        Change::Tree => out.push(2),
        Change::After => out.push(3),
    }
}

/// Appends the encoding of `Message::Op { seq, op }` from a borrowed
/// operation (no copy of a write's data).
pub fn encode_op_message(out: &mut Vec<u8>, seq: Seq, op: &Op) {
    encode_op_header(out, seq);
    encode_op(out, op);
}

/// Appends the header of a [`Message::Op`]: what precedes the operation's
/// own encoding.
pub fn encode_op_header(out: &mut Vec<u8>, seq: Seq) {
    out.push(MSG_OP);
    put_u64(out, seq);
}

/// Appends the encoding of `msg`.
pub fn encode(out: &mut Vec<u8>, msg: &Message) {
    match msg {
        Message::Hello { version, dir } => {
            out.push(MSG_HELLO);
            put_u64(out, u64::from(*version));
            put_bytes(out, dir.as_bytes());
        }
        Message::Welcome {
            sync_id,
            suspects,
            resume_id,
        } => {
            out.push(MSG_WELCOME);
            put_u64(out, *sync_id);
            put_u64(out, suspects.len() as u64);
            for (p, c) in suspects {
                put_change(out, p, *c);
            }
            put_u64(out, *resume_id);
        }
        Message::Op { seq, op } => encode_op_message(out, *seq, op),
        Message::Ack { seq } => {
            out.push(MSG_ACK);
            put_u64(out, *seq);
        }
        Message::Failed { seq, errno, detail } => {
            out.push(MSG_FAILED);
            put_u64(out, *seq);
            put_i64(out, i64::from(*errno));
            put_bytes(out, detail.as_bytes());
        }
        Message::Bye { reason } => {
            out.push(MSG_BYE);
            put_bytes(out, reason.as_bytes());
        }
        Message::Verify { version, dir } => {
            out.push(MSG_VERIFY);
            put_u64(out, u64::from(*version));
            put_bytes(out, dir.as_bytes());
        }
        Message::Manifest { entries } => {
            out.push(MSG_MANIFEST);
            put_u64(out, entries.len() as u64);
            for e in entries {
                put_bytes(out, e.path.as_bytes());
                out.push(e.kind);
                put_u64(out, u64::from(e.mode));
                put_u64(out, u64::from(e.uid));
                put_u64(out, u64::from(e.gid));
                put_u64(out, e.size);
                put_time(out, e.mtime);
                put_bytes(out, &e.digest);
                put_bytes(out, &e.xattrs);
                put_u64(out, e.rdev);
                put_bytes(out, &e.link);
            }
        }
        Message::ManifestEnd => out.push(MSG_MANIFEST_END),
    }
}

/// Encodes `msg` into a new buffer.
#[must_use]
pub fn to_bytes(msg: &Message) -> Vec<u8> {
    let mut v = Vec::new();
    encode(&mut v, msg);
    v
}

// ---------------------------------------------------------------- decoding

/// A bounds-checked reader over a message.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len()
    }

    pub(crate) fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        let (&b, rest) = self.buf.split_first().ok_or(DecodeError::Truncated(what))?;
        self.buf = rest;
        Ok(b)
    }

    pub(crate) fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.u8(what)?;
            let bits = u64::from(b & 0x7f);
            if shift == 63 && bits > 1 {
                return Err(DecodeError::Overflow(what));
            }
            v |= bits << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(DecodeError::Overflow(what))
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        u32::try_from(self.u64(what)?).map_err(|_| DecodeError::Invalid {
            field: what,
            why: "does not fit 32 bits",
        })
    }

    fn i64(&mut self, what: &'static str) -> Result<i64, DecodeError> {
        let z = self.u64(what)?;
        #[expect(clippy::cast_possible_wrap, reason = "zig-zag decoding")]
        Ok(((z >> 1) as i64) ^ -((z & 1) as i64))
    }

    pub(crate) fn bytes(
        &mut self,
        what: &'static str,
        max: usize,
    ) -> Result<&'a [u8], DecodeError> {
        let len = self.u64(what)?;
        let len = usize::try_from(len)
            .ok()
            .filter(|&l| l <= max)
            .ok_or(DecodeError::Invalid {
                field: what,
                why: "too long",
            })?;
        if self.buf.len() < len {
            return Err(DecodeError::Truncated(what));
        }
        let (b, rest) = self.buf.split_at(len);
        self.buf = rest;
        Ok(b)
    }

    pub(crate) fn path(&mut self, what: &'static str) -> Result<RelPath, DecodeError> {
        Ok(RelPath::new(self.bytes(what, MAX_PATH)?)?)
    }

    fn entry(&mut self, what: &'static str) -> Result<RelPath, DecodeError> {
        let p = self.path(what)?;
        if p.is_root() {
            return Err(PathError::Root.into());
        }
        Ok(p)
    }

    fn time(&mut self, what: &'static str) -> Result<Timestamp, DecodeError> {
        let sec = self.i64(what)?;
        let nsec = self.u32(what)?;
        if nsec >= 1_000_000_000 {
            return Err(DecodeError::Invalid {
                field: what,
                why: "nanoseconds >= 1e9",
            });
        }
        Ok(Timestamp { sec, nsec })
    }

    fn opt_u32(&mut self, what: &'static str) -> Result<Option<u32>, DecodeError> {
        match self.u8(what)? {
            0 => Ok(None),
            1 => Ok(Some(self.u32(what)?)),
            tag => Err(DecodeError::Tag { what, tag }),
        }
    }

    fn opt_time(&mut self, what: &'static str) -> Result<Option<Timestamp>, DecodeError> {
        match self.u8(what)? {
            0 => Ok(None),
            1 => Ok(Some(self.time(what)?)),
            tag => Err(DecodeError::Tag { what, tag }),
        }
    }

    fn mode(&mut self) -> Result<u32, DecodeError> {
        let m = self.u32("mode")?;
        if m & !0o7777 != 0 {
            return Err(DecodeError::Invalid {
                field: "mode",
                why: "bits outside 0o7777",
            });
        }
        Ok(m)
    }

    /// A count of items, at most `max` (and never more than bytes left).
    fn count(&mut self, what: &'static str, max: usize) -> Result<usize, DecodeError> {
        usize::try_from(self.u64(what)?)
            .ok()
            .filter(|&n| n <= max && n <= self.buf.len())
            .ok_or(DecodeError::Invalid {
                field: what,
                why: "too many items",
            })
    }

    /// A suspect (path and change).
    pub(crate) fn change(&mut self) -> Result<(RelPath, Change), DecodeError> {
        let path = self.path("change.path")?;
        let change = match self.u8("change.kind")? {
            0 => {
                let start = self.u64("change.start")?;
                let end = self.u64("change.end")?;
                if end < start {
                    return Err(DecodeError::Invalid {
                        field: "change.end",
                        why: "before start",
                    });
                }
                Change::Range { start, end }
            }
            1 => Change::Meta,
            2 => Change::Tree,
            3 => Change::After,
            tag => {
                return Err(DecodeError::Tag {
                    what: "change",
                    tag,
                });
            }
        };
        Ok((path, change))
    }

    fn string(&mut self, what: &'static str, max: usize) -> Result<String, DecodeError> {
        String::from_utf8(self.bytes(what, max)?.to_vec()).map_err(|_| DecodeError::Invalid {
            field: what,
            why: "not UTF-8",
        })
    }
}

#[expect(clippy::too_many_lines, reason = "one arm per operation")]
fn decode_op_from(r: &mut Reader<'_>) -> Result<Op, DecodeError> {
    let tag = r.u8("op")?;
    Ok(match tag {
        OP_WRITE => {
            let path = r.entry("write.path")?;
            let offset = r.u64("write.offset")?;
            let mtime = r.time("write.mtime")?;
            let data = r.bytes("write.data", MAX_WRITE)?.to_vec();
            Op::Write {
                path,
                offset,
                data,
                mtime,
            }
        }
        OP_TRUNCATE => Op::Truncate {
            path: r.entry("truncate.path")?,
            size: r.u64("truncate.size")?,
            mtime: r.time("truncate.mtime")?,
        },
        OP_MKNOD => {
            let path = r.entry("mknod.path")?;
            let kind = match r.u8("mknod.kind")? {
                0 => NodeKind::File,
                1 => NodeKind::Fifo,
                2 => NodeKind::Socket,
                3 => NodeKind::CharDev,
                4 => NodeKind::BlockDev,
                tag => {
                    return Err(DecodeError::Tag {
                        what: "node kind",
                        tag,
                    });
                }
            };
            Op::Mknod {
                path,
                kind,
                mode: r.mode()?,
                rdev: r.u64("mknod.rdev")?,
                uid: r.u32("mknod.uid")?,
                gid: r.u32("mknod.gid")?,
                mtime: r.time("mknod.mtime")?,
                dir_mtime: r.time("mknod.dir_mtime")?,
            }
        }
        OP_MKDIR => Op::Mkdir {
            path: r.entry("mkdir.path")?,
            mode: r.mode()?,
            uid: r.u32("mkdir.uid")?,
            gid: r.u32("mkdir.gid")?,
            mtime: r.time("mkdir.mtime")?,
            dir_mtime: r.time("mkdir.dir_mtime")?,
        },
        OP_UNLINK => Op::Unlink {
            path: r.entry("unlink.path")?,
            dir_mtime: r.time("unlink.dir_mtime")?,
        },
        OP_RMDIR => Op::Rmdir {
            path: r.entry("rmdir.path")?,
            dir_mtime: r.time("rmdir.dir_mtime")?,
        },
        OP_RENAME => {
            let from = r.entry("rename.from")?;
            let to = r.entry("rename.to")?;
            let flags = r.u32("rename.flags")?;
            if flags & !(rename::NOREPLACE | rename::EXCHANGE) != 0
                || flags == rename::NOREPLACE | rename::EXCHANGE
            {
                return Err(DecodeError::Invalid {
                    field: "rename.flags",
                    why: "unknown or conflicting flags",
                });
            }
            Op::Rename {
                from,
                to,
                flags,
                from_dir_mtime: r.time("rename.from_dir_mtime")?,
                to_dir_mtime: r.time("rename.to_dir_mtime")?,
            }
        }
        OP_SYMLINK => {
            let path = r.entry("symlink.path")?;
            let target = r.bytes("symlink.target", PATH_MAX)?;
            if target.is_empty() || target.contains(&0) {
                return Err(DecodeError::Invalid {
                    field: "symlink.target",
                    why: "empty or contains NUL",
                });
            }
            Op::Symlink {
                path,
                target: target.to_vec(),
                uid: r.u32("symlink.uid")?,
                gid: r.u32("symlink.gid")?,
                mtime: r.time("symlink.mtime")?,
                dir_mtime: r.time("symlink.dir_mtime")?,
            }
        }
        OP_LINK => Op::Link {
            existing: r.entry("link.existing")?,
            path: r.entry("link.path")?,
            dir_mtime: r.time("link.dir_mtime")?,
        },
        OP_SETATTR => {
            let path = r.path("setattr.path")?;
            let mode = r.opt_u32("setattr.mode")?;
            if mode.is_some_and(|m| m & !0o7777 != 0) {
                return Err(DecodeError::Invalid {
                    field: "setattr.mode",
                    why: "bits outside 0o7777",
                });
            }
            Op::SetAttr {
                path,
                mode,
                uid: r.opt_u32("setattr.uid")?,
                gid: r.opt_u32("setattr.gid")?,
                atime: r.opt_time("setattr.atime")?,
                mtime: r.opt_time("setattr.mtime")?,
            }
        }
        OP_SETXATTR => {
            let path = r.path("setxattr.path")?;
            let name = xattr_name(r, "setxattr.name")?;
            let value = r.bytes("setxattr.value", MAX_XATTR)?.to_vec();
            Op::SetXattr { path, name, value }
        }
        OP_REMOVEXATTR => Op::RemoveXattr {
            path: r.path("removexattr.path")?,
            name: xattr_name(r, "removexattr.name")?,
        },
        OP_FSYNC => Op::Fsync {
            path: r.path("fsync.path")?,
            data_only: match r.u8("fsync.data_only")? {
                0 => false,
                1 => true,
                tag => return Err(DecodeError::Tag { what: "bool", tag }),
            },
        },
        OP_PUT => {
            let path = r.path("put.path")?;
            let kind = match r.u8("put.kind")? {
                0 => EntryKind::Node(NodeKind::File),
                1 => EntryKind::Node(NodeKind::Fifo),
                2 => EntryKind::Node(NodeKind::Socket),
                3 => EntryKind::Node(NodeKind::CharDev),
                4 => EntryKind::Node(NodeKind::BlockDev),
                5 => EntryKind::Dir,
                6 => EntryKind::Symlink,
                tag => {
                    return Err(DecodeError::Tag {
                        what: "entry kind",
                        tag,
                    });
                }
            };
            if path.is_root() && kind != EntryKind::Dir {
                return Err(PathError::Root.into());
            }
            let mode = r.mode()?;
            let uid = r.u32("put.uid")?;
            let gid = r.u32("put.gid")?;
            let size = r.u64("put.size")?;
            let rdev = r.u64("put.rdev")?;
            let target = r.bytes("put.target", PATH_MAX)?.to_vec();
            if kind == EntryKind::Symlink && (target.is_empty() || target.contains(&0)) {
                return Err(DecodeError::Invalid {
                    field: "put.target",
                    why: "empty or contains NUL",
                });
            }
            let n = r.count("put.xattrs", MAX_XATTRS)?;
            let mut xattrs = Vec::with_capacity(n);
            for _ in 0..n {
                let name = xattr_name(r, "put.xattr.name")?;
                let value = r.bytes("put.xattr.value", MAX_XATTR)?.to_vec();
                xattrs.push((name, value));
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
            }
        }
        OP_REMOVE => Op::Remove {
            path: r.entry("remove.path")?,
        },
        OP_PRUNE => {
            let path = r.path("prune.path")?;
            let n = r.count("prune.keep", MAX_PRUNE)?;
            let mut keep = Vec::with_capacity(n);
            for _ in 0..n {
                let name = r.bytes("prune.name", MAX_NAME)?;
                validate_name(name)?;
                keep.push(name.to_vec());
            }
            Op::Prune { path, keep }
        }
        OP_HOLE => Op::Hole {
            path: r.entry("hole.path")?,
            offset: r.u64("hole.offset")?,
            len: r.u64("hole.len")?,
        },
        OP_INSYNC => Op::InSync {
            sync_id: r.u64("insync.sync_id")?,
        },
        OP_FULLSYNC => Op::FullSync {
            resume_id: r.u64("fullsync.resume_id")?,
        },
        tag => return Err(DecodeError::Tag { what: "op", tag }),
    })
}

fn xattr_name(r: &mut Reader<'_>, what: &'static str) -> Result<Vec<u8>, DecodeError> {
    let n = r.bytes(what, MAX_NAME)?;
    if n.is_empty() || n.contains(&0) {
        return Err(DecodeError::Invalid {
            field: what,
            why: "empty or contains NUL",
        });
    }
    Ok(n.to_vec())
}

/// Decodes one operation (exactly the whole buffer).
pub fn decode_op(buf: &[u8]) -> Result<Op, DecodeError> {
    let mut r = Reader::new(buf);
    let op = decode_op_from(&mut r)?;
    match r.remaining() {
        0 => Ok(op),
        n => Err(DecodeError::Trailing(n)),
    }
}

/// Decodes one message (exactly the whole buffer).
pub fn decode(buf: &[u8]) -> Result<Message, DecodeError> {
    let mut r = Reader::new(buf);
    let msg = match r.u8("message")? {
        MSG_HELLO => Message::Hello {
            version: r.u32("hello.version")?,
            dir: r.string("hello.dir", PATH_MAX)?,
        },
        MSG_WELCOME => {
            let sync_id = r.u64("welcome.sync_id")?;
            let n = r.count("welcome.suspects", MAX_SUSPECTS)?;
            let mut suspects = Vec::with_capacity(n);
            for _ in 0..n {
                suspects.push(r.change()?);
            }
            Message::Welcome {
                sync_id,
                suspects,
                resume_id: r.u64("welcome.resume_id")?,
            }
        }
        MSG_OP => {
            let seq = r.u64("op.seq")?;
            Message::Op {
                seq,
                op: decode_op_from(&mut r)?,
            }
        }
        MSG_ACK => Message::Ack {
            seq: r.u64("ack.seq")?,
        },
        MSG_FAILED => {
            let seq = r.u64("failed.seq")?;
            let errno =
                i32::try_from(r.i64("failed.errno")?).map_err(|_| DecodeError::Invalid {
                    field: "failed.errno",
                    why: "out of range",
                })?;
            Message::Failed {
                seq,
                errno,
                detail: r.string("failed.detail", 4096)?,
            }
        }
        MSG_BYE => Message::Bye {
            reason: r.string("bye.reason", 4096)?,
        },
        MSG_VERIFY => Message::Verify {
            version: r.u32("verify.version")?,
            dir: r.string("verify.dir", PATH_MAX)?,
        },
        MSG_MANIFEST => {
            let n = r.count("manifest.entries", MANIFEST_CHUNK)?;
            let mut entries = Vec::with_capacity(n);
            for _ in 0..n {
                entries.push(ManifestEntry {
                    path: r.path("manifest.path")?,
                    kind: r.u8("manifest.kind")?,
                    mode: r.u32("manifest.mode")?,
                    uid: r.u32("manifest.uid")?,
                    gid: r.u32("manifest.gid")?,
                    size: r.u64("manifest.size")?,
                    mtime: r.time("manifest.mtime")?,
                    digest: r.bytes("manifest.digest", PATH_MAX)?.to_vec(),
                    xattrs: r.bytes("manifest.xattrs", 64)?.to_vec(),
                    rdev: r.u64("manifest.rdev")?,
                    link: r.bytes("manifest.link", MAX_PATH)?.to_vec(),
                });
            }
            Message::Manifest { entries }
        }
        MSG_MANIFEST_END => Message::ManifestEnd,
        tag => {
            return Err(DecodeError::Tag {
                what: "message",
                tag,
            });
        }
    };
    match r.remaining() {
        0 => Ok(msg),
        n => Err(DecodeError::Trailing(n)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> RelPath {
        RelPath::new(s).expect("valid path")
    }

    fn t(sec: i64, nsec: u32) -> Timestamp {
        Timestamp { sec, nsec }
    }

    #[expect(clippy::too_many_lines, reason = "one of each")]
    fn every_op() -> Vec<Op> {
        vec![
            Op::Write {
                path: p("a/b"),
                offset: 1 << 40,
                data: vec![7; 3000],
                mtime: t(1_700_000_000, 999_999_999),
            },
            Op::Truncate {
                path: p("f"),
                size: 0,
                mtime: t(-5, 1),
            },
            Op::Mknod {
                path: p("d/fifo"),
                kind: NodeKind::Fifo,
                mode: 0o4755,
                rdev: 0x0801,
                uid: 1000,
                gid: u32::MAX,
                mtime: t(1, 2),
                dir_mtime: t(3, 4),
            },
            Op::Mkdir {
                path: p("d"),
                mode: 0o2775,
                uid: 0,
                gid: 0,
                mtime: t(5, 6),
                dir_mtime: t(7, 8),
            },
            Op::Unlink {
                path: p("x"),
                dir_mtime: t(9, 10),
            },
            Op::Rmdir {
                path: p("y/z"),
                dir_mtime: t(11, 12),
            },
            Op::Rename {
                from: p("a"),
                to: p("b/c"),
                flags: rename::EXCHANGE,
                from_dir_mtime: t(13, 14),
                to_dir_mtime: t(15, 16),
            },
            Op::Symlink {
                path: p("l"),
                target: b"../../etc/passwd".to_vec(),
                uid: 1,
                gid: 2,
                mtime: t(17, 18),
                dir_mtime: t(19, 20),
            },
            Op::Link {
                existing: p("a"),
                path: p("h"),
                dir_mtime: t(21, 22),
            },
            Op::SetAttr {
                path: RelPath::root(),
                mode: Some(0o700),
                uid: None,
                gid: Some(3),
                atime: Some(t(23, 24)),
                mtime: None,
            },
            Op::SetXattr {
                path: p("a"),
                name: b"user.k".to_vec(),
                value: vec![0, 1, 2],
            },
            Op::RemoveXattr {
                path: p("a"),
                name: b"user.k".to_vec(),
            },
            Op::Fsync {
                path: p("a"),
                data_only: true,
            },
            Op::Put {
                path: p("a/f"),
                kind: EntryKind::Node(NodeKind::File),
                mode: 0o640,
                uid: 7,
                gid: 8,
                size: 1 << 35,
                rdev: 0,
                target: vec![],
                xattrs: vec![
                    (b"user.a".to_vec(), vec![1, 2]),
                    (b"user.b".to_vec(), vec![]),
                ],
            },
            Op::Put {
                path: RelPath::root(),
                kind: EntryKind::Dir,
                mode: 0o755,
                uid: 0,
                gid: 0,
                size: 0,
                rdev: 0,
                target: vec![],
                xattrs: vec![],
            },
            Op::Put {
                path: p("l"),
                kind: EntryKind::Symlink,
                mode: 0o777,
                uid: 0,
                gid: 0,
                size: 0,
                rdev: 0,
                target: b"../x".to_vec(),
                xattrs: vec![],
            },
            Op::Remove { path: p("gone") },
            Op::Prune {
                path: RelPath::root(),
                keep: vec![b"a".to_vec(), b"l".to_vec()],
            },
            Op::Hole {
                path: p("a/f"),
                offset: 4096,
                len: 1 << 30,
            },
            Op::InSync { sync_id: 42 },
            Op::FullSync {
                resume_id: u64::MAX,
            },
        ]
    }

    #[test]
    fn every_message_round_trips() {
        let mut msgs = vec![
            Message::Hello {
                version: VERSION,
                dir: "/srv/data".into(),
            },
            Message::Welcome {
                sync_id: 0,
                suspects: vec![],
                resume_id: 0,
            },
            Message::Verify {
                version: VERSION,
                dir: "web:/srv/data".into(),
            },
            Message::Manifest {
                entries: vec![ManifestEntry {
                    path: p("a/b"),
                    kind: 0,
                    mode: 0o644,
                    uid: 1,
                    gid: 2,
                    size: 3,
                    mtime: t(5, 6),
                    digest: vec![7; 32],
                    xattrs: vec![8; 32],
                    rdev: 9,
                    link: b"a/c".to_vec(),
                }],
            },
            Message::ManifestEnd,
            Message::Welcome {
                sync_id: u64::MAX,
                suspects: vec![
                    (p("a"), Change::Meta),
                    (RelPath::root(), Change::Tree),
                    (
                        p("b/c"),
                        Change::Range {
                            start: 5,
                            end: 1 << 33,
                        },
                    ),
                    (p("d/m"), Change::After),
                ],
                resume_id: 7,
            },
            Message::Ack { seq: u64::MAX },
            Message::Failed {
                seq: 9,
                errno: -2,
                detail: "ENOENT".into(),
            },
            Message::Bye {
                reason: "bye".into(),
            },
        ];
        msgs.extend(
            every_op()
                .into_iter()
                .enumerate()
                .map(|(i, op)| Message::Op {
                    seq: i as u64 + 1,
                    op,
                }),
        );
        for m in msgs {
            let b = to_bytes(&m);
            assert_eq!(decode(&b), Ok(m.clone()), "{m:?}");
            // Every strict prefix is rejected, never misread.
            for cut in 0..b.len() {
                assert!(decode(&b[..cut]).is_err(), "{m:?} cut at {cut}");
            }
            let mut longer = b.clone();
            longer.push(0);
            assert_eq!(decode(&longer), Err(DecodeError::Trailing(1)));
        }
    }

    #[test]
    fn write_encoding_is_compact() {
        let op = Op::Write {
            path: p("data/file"),
            offset: 4096,
            data: vec![0; 4096],
            mtime: t(1_700_000_000, 123_456_789),
        };
        let mut b = Vec::new();
        encode_op(&mut b, &op);
        assert!(b.len() < 4096 + 32, "{} bytes", b.len());
    }

    #[test]
    fn paths_escaping_the_root_are_refused() {
        for bad in ["/etc", "..", "a/../b", "a/..", "a//b", "a/", "./a", "a/./b"] {
            assert!(RelPath::new(bad).is_err(), "{bad}");
        }
        assert_eq!(RelPath::new("a\0b"), Err(PathError::Nul));
        assert_eq!(RelPath::new("x".repeat(256)), Err(PathError::TooLong));
        for good in ["", "a", "a/b/c", "...", "a..b", ".hidden/x"] {
            assert!(RelPath::new(good).is_ok(), "{good}");
        }
        // A hostile encoder cannot smuggle one in either.
        let mut b = vec![MSG_OP, 1, OP_UNLINK];
        put_bytes(&mut b, b"../outside");
        put_time(&mut b, t(0, 0));
        assert_eq!(decode(&b), Err(DecodeError::Path(PathError::DotDot)));
        let mut b = vec![MSG_OP, 1, OP_UNLINK];
        put_bytes(&mut b, b"");
        put_time(&mut b, t(0, 0));
        assert_eq!(decode(&b), Err(DecodeError::Path(PathError::Root)));
    }

    #[test]
    fn relpath_helpers() {
        let a = p("a/b/c");
        assert_eq!(a.split(), Ok((&b"a/b"[..], &b"c"[..])));
        assert_eq!(p("c").split(), Ok((&b""[..], &b"c"[..])));
        assert!(RelPath::root().split().is_err());
        assert_eq!(RelPath::root().join(b"x"), Ok(p("x")));
        assert_eq!(p("x").join(b"y"), Ok(p("x/y")));
        assert!(p("x").join(b"..").is_err());
        assert!(a.starts_with(&p("a/b")));
        assert!(a.starts_with(&RelPath::root()));
        assert!(!p("a/bc").starts_with(&p("a/b")));
    }

    #[test]
    fn paths_longer_than_path_max_travel_up_to_the_wire_limit() {
        // 45 levels of 200-byte names: over twice PATH_MAX, legal on any local
        // filesystem when reached level by level.
        let name = vec![b'n'; 200];
        let names: Vec<&[u8]> = (0..45).map(|_| name.as_slice()).collect();
        let deep = RelPath::from_names_upwards(&names).expect("deep path");
        assert_eq!(deep.as_bytes().len(), 45 * 201 - 1);
        assert!(deep.as_bytes().len() > 2 * PATH_MAX);
        assert_eq!(RelPath::new(deep.as_bytes().to_vec()), Ok(deep.clone()));
        let op = Op::Rename {
            from: deep.join(b"f").expect("join"),
            to: deep.join(b"g").expect("join"),
            flags: 0,
            from_dir_mtime: t(1, 2),
            to_dir_mtime: t(3, 4),
        };
        let msg = Message::Op { seq: 7, op };
        assert_eq!(decode(&to_bytes(&msg)), Ok(msg));
        // Exactly the limit passes; one byte more fails, by every route.
        let mut full = RelPath::root();
        while full.as_bytes().len() + 201 <= MAX_PATH {
            full = full.join(&[b'x'; 200]).expect("below the limit");
        }
        let room = MAX_PATH - full.as_bytes().len() - 1;
        let full = full.join(&vec![b'z'; room]).expect("exactly MAX_PATH");
        assert_eq!(full.as_bytes().len(), MAX_PATH);
        assert_eq!(full.join(b"a"), Err(PathError::TooLong));
        let mut too_long = full.as_bytes().to_vec();
        too_long.push(b'a');
        assert_eq!(RelPath::new(too_long.clone()), Err(PathError::TooLong));
        let mut b = vec![MSG_OP, 1, OP_UNLINK];
        put_bytes(&mut b, &too_long);
        put_time(&mut b, t(0, 0));
        assert!(matches!(decode(&b), Err(DecodeError::Invalid { .. })));
        let many: Vec<&[u8]> = (0..=MAX_PATH / 2).map(|_| &b"q"[..]).collect();
        assert_eq!(RelPath::from_names_upwards(&many), Err(PathError::TooLong));
        // A name is still limited to NAME_MAX.
        let long_name = vec![b'n'; MAX_NAME + 1];
        assert_eq!(
            RelPath::from_names_upwards(&[&long_name]),
            Err(PathError::TooLong)
        );
        assert_eq!(
            RelPath::from_names_upwards(&[b"..".as_slice()]),
            Err(PathError::DotDot)
        );
    }

    #[test]
    fn relpath_built_upwards_and_popped() {
        let names: [&[u8]; 3] = [b"c", b"b", b"a"];
        let mut p3 = RelPath::from_names_upwards(&names).expect("path");
        assert_eq!(p3, p("a/b/c"));
        assert_eq!(RelPath::from_names_upwards(&[]), Ok(RelPath::root()));
        assert!(p3.pop());
        assert_eq!(p3, p("a/b"));
        assert!(p3.pop() && p3.pop());
        assert!(p3.is_root());
        assert!(!p3.pop());
    }

    #[test]
    fn hostile_lengths_and_varints_are_refused() {
        // A 2^60-byte write announced in a tiny message.
        let mut b = vec![MSG_OP, 1, OP_WRITE];
        put_bytes(&mut b, b"f");
        put_u64(&mut b, 0);
        put_time(&mut b, t(0, 0));
        put_u64(&mut b, 1 << 60);
        assert!(matches!(decode(&b), Err(DecodeError::Invalid { .. })));
        // An 11-byte varint.
        let b = [
            MSG_ACK, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
        ];
        assert!(matches!(decode(&b), Err(DecodeError::Overflow(_))));
        // Bad nanoseconds, bad mode.
        let mut b = vec![MSG_OP, 1, OP_TRUNCATE];
        put_bytes(&mut b, b"f");
        put_u64(&mut b, 0);
        put_i64(&mut b, 0);
        put_u64(&mut b, 1_000_000_000);
        assert!(matches!(decode(&b), Err(DecodeError::Invalid { .. })));
        let mut b = vec![MSG_OP, 1, OP_MKDIR];
        put_bytes(&mut b, b"d");
        put_u64(&mut b, 0o170_000);
        assert!(matches!(decode(&b), Err(DecodeError::Invalid { .. })));
    }
}
