//! The secondary: accepts replication connections (one per replicated
//! directory), applies their operations in order, acknowledges them.
//!
//! Per connection, a reader thread decrypts and decodes, an applier thread
//! applies ([`Applier`]). `async = "second"`: the reader acknowledges each
//! batch as soon as it is received, the applier writes after. `async = "none"`:
//! the applier acknowledges once the batch is written (and synced when it
//! holds a barrier). A new connection for a directory shuts the previous one
//! down and waits for its applier to finish, so operations are never applied
//! out of order across a reconnection.

use std::{
    collections::HashMap,
    ffi::OsStr,
    net::SocketAddr,
    os::{
        fd::{AsFd, BorrowedFd, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        mpsc,
    },
    thread,
    time::Duration,
};

use tokio::{net::TcpListener, sync::mpsc::UnboundedSender};

use super::{
    RfsError,
    apply::Applier,
    channel::{self, ChannelError, ChannelKey, ChannelReceiver, ChannelSender, ShutdownHandle},
    journal::{self, Change, DirtySet, Journal},
    proto::{self, Message, Op, RelPath, Seq},
    state::{DirState, Side},
    sys,
};
use crate::config::AsyncMode;
use rustix::fs::OFlags;

/// What the secondary serves (a fixed set of directories; see [`Registry`]
/// for directories added and removed as modules change roles).
#[derive(Debug, Clone)]
pub struct SecondaryConfig {
    /// Replicated directories: name (the configured path, as the primary
    /// names it in its hello) and local directory.
    pub dirs: Vec<(String, PathBuf)>,
    /// The cluster key (at least 32 bytes).
    pub key: Vec<u8>,
    /// When to acknowledge.
    pub async_mode: AsyncMode,
    /// Bound on the handshake and hello.
    pub handshake_timeout: Duration,
}

/// Under a steady stream, an acknowledgement at least every this many
/// operations, and every this many bytes of them (a resynchronisation's
/// 1 MiB writes: the primary keeps sending while earlier ones are written,
/// and learns soon what is written).
const ACK_EVERY: u32 = 16;
const ACK_BYTES: u64 = 2 << 20;

/// One directory this node receives.
#[derive(Debug, Clone)]
pub struct SecondaryDir {
    /// The local copy.
    pub local: PathBuf,
    /// The local copy's directory, opened before anything was mounted over
    /// it (a read-only bind mount for the application); `None`: opened from
    /// `local` at each connection.
    pub root: Option<Arc<std::os::fd::OwnedFd>>,
    /// When to acknowledge live operations.
    pub async_mode: AsyncMode,
    /// Journal, activity log and synchronisation point (`None`: nothing
    /// persisted, every connection is a full resynchronisation).
    pub state: Option<DirState>,
    /// Where files this node changed alone are kept before a
    /// resynchronisation overwrites them (split brain), if anywhere.
    pub quarantine: Option<PathBuf>,
}

/// What happens on the secondary, for the daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecondaryEvent {
    /// A primary connected for a directory (a resynchronisation starts).
    Connected {
        /// Directory name.
        dir: String,
        /// The primary's address.
        peer: SocketAddr,
    },
    /// The resynchronisation completed: the copy equals the primary's and
    /// receives every write.
    InSync {
        /// Directory name.
        dir: String,
    },
    /// Files this node changed alone were set aside before being
    /// overwritten.
    Quarantined {
        /// Directory name.
        dir: String,
        /// Where.
        to: PathBuf,
        /// How many paths.
        paths: usize,
    },
    /// The connection ended.
    Disconnected {
        /// Directory name.
        dir: String,
        /// Why.
        reason: String,
    },
    /// An operation could not be applied: the copy diverges.
    Failed {
        /// Directory name.
        dir: String,
        /// The operation's sequence number.
        seq: Seq,
        /// The error number (0 when not a system error).
        errno: i32,
        /// What failed.
        detail: String,
    },
    /// A connection was refused (bad key, unknown directory, bad hello).
    Refused {
        /// Who.
        peer: SocketAddr,
        /// Why.
        reason: String,
    },
}

/// One directory's applier, owned by whichever connection is current.
struct DirSlot {
    dir: SecondaryDir,
    applier: Mutex<Option<Applier>>,
    current: Mutex<Option<ShutdownHandle>>,
    /// The copy failed to apply something since it was last in sync.
    failed: AtomicBool,
}

/// The directories this node currently receives, by name. The daemon adds a
/// module's directories when it becomes SECOND and removes them when it
/// leaves that role.
#[derive(Default)]
pub struct Registry {
    dirs: Mutex<HashMap<String, Arc<DirSlot>>>,
    /// What the listener refused.
    counters: ListenerCounters,
}

/// Replication connections this node's listener turned away before the
/// peer proved it holds the cluster key, by reason; and accept errors.
#[derive(Debug, Default)]
pub struct ListenerCounters {
    /// Closed at once: [`MAX_PENDING_HANDSHAKES`] handshakes already in
    /// progress, or [`MAX_CONNECTIONS`] connections already served.
    pub busy: AtomicU64,
    /// The handshake failed: not the cluster key, or not the protocol.
    pub handshake_failed: AtomicU64,
    /// No complete handshake within the deadline.
    pub handshake_timeout: AtomicU64,
    /// The peer closed before completing the handshake.
    pub closed: AtomicU64,
    /// `accept` failed (e.g. out of file descriptors); retried.
    pub accept_errors: AtomicU64,
}

impl ListenerCounters {
    /// Every counter with its metrics label.
    #[must_use]
    pub fn by_reason(&self) -> [(&'static str, u64); 5] {
        [
            ("busy", self.busy.load(Ordering::Relaxed)),
            (
                "handshake_failed",
                self.handshake_failed.load(Ordering::Relaxed),
            ),
            (
                "handshake_timeout",
                self.handshake_timeout.load(Ordering::Relaxed),
            ),
            ("closed", self.closed.load(Ordering::Relaxed)),
            ("accept_error", self.accept_errors.load(Ordering::Relaxed)),
        ]
    }
}

/// Handshakes in progress at most (each a task and a few KiB, for at most
/// the handshake deadline); connections past it are closed at once.
pub const MAX_PENDING_HANDSHAKES: usize = 32;
/// Authenticated connections served at once (each two threads): one per
/// replicated directory, plus verifications and a reconnection's overlap.
pub const MAX_CONNECTIONS: usize = 64;
/// Bytes of operations received and not yet applied, at most: past it the
/// reader waits for the applier (and stops acknowledging), which slows the
/// primary down to what this copy can write.
const APPLY_BACKLOG: u64 = 64 << 20;
/// Refused connections are logged at most this often (with a count).
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("dirs", &self.names())
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Registry {
    /// An empty registry.
    #[must_use]
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// What the listener refused so far.
    #[must_use]
    pub fn counters(&self) -> &ListenerCounters {
        &self.counters
    }

    /// Accepts connections for `name` from now on.
    pub fn add(&self, name: String, dir: SecondaryDir) {
        lock(&self.dirs).insert(
            name,
            Arc::new(DirSlot {
                dir,
                applier: Mutex::new(None),
                current: Mutex::new(None),
                failed: AtomicBool::new(false),
            }),
        );
    }

    /// Stops receiving `name`: the current connection is shut down and its
    /// applier finishes what it received. Blocking (call from
    /// `spawn_blocking` in async code). Returns true when the copy failed to
    /// apply something since it was last in sync (it lacks what the
    /// primary sent: nobody may start on it).
    pub fn remove(&self, name: &str) -> bool {
        let Some(slot) = lock(&self.dirs).remove(name) else {
            return false;
        };
        if let Some(h) = lock(&slot.current).take() {
            h.shutdown();
        }
        // Wait for the applier (held by the connection while it runs).
        drop(lock(&slot.applier).take());
        slot.failed.load(Ordering::Acquire)
    }

    /// Names served.
    #[must_use]
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = lock(&self.dirs).keys().cloned().collect();
        v.sort();
        v
    }

    fn get(&self, name: &str) -> Option<Arc<DirSlot>> {
        lock(&self.dirs).get(name).cloned()
    }
}

struct Ctx {
    key: ChannelKey,
    handshake_timeout: Duration,
    registry: Arc<Registry>,
    events: Option<UnboundedSender<SecondaryEvent>>,
    /// Authenticated connections being served.
    connections: AtomicUsize,
    refusals: Mutex<RefusalLog>,
}

impl Ctx {
    fn event(&self, e: SecondaryEvent) {
        if let Some(tx) = &self.events {
            let _ = tx.send(e);
        }
    }

    /// Counts a connection turned away before authentication, and logs it
    /// (rate-limited: anyone can cause these).
    fn refused(&self, peer: SocketAddr, e: &ChannelError) {
        let c = &self.registry.counters;
        let counter = match e {
            ChannelError::HandshakeTimeout(_) => &c.handshake_timeout,
            ChannelError::Closed => &c.closed,
            _ => &c.handshake_failed,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        lock(&self.refusals).note(peer, &e.to_string());
    }

    fn busy(&self, peer: SocketAddr, why: &str) {
        self.registry.counters.busy.fetch_add(1, Ordering::Relaxed);
        lock(&self.refusals).note(peer, why);
    }
}

/// Logs refused connections at most once per [`REFUSAL_LOG_EVERY`], with
/// how many were not logged since.
#[derive(Debug, Default)]
struct RefusalLog {
    last: Option<std::time::Instant>,
    unlogged: u64,
}

impl RefusalLog {
    fn note(&mut self, peer: SocketAddr, why: &str) {
        let now = std::time::Instant::now();
        if self.last.is_some_and(|t| now < t + REFUSAL_LOG_EVERY) {
            self.unlogged += 1;
            return;
        }
        let more = std::mem::take(&mut self.unlogged);
        self.last = Some(now);
        if more > 0 {
            tracing::warn!(%peer, reason = %why, "replication connection refused ({more} more refused since the last report)");
        } else {
            tracing::warn!(%peer, reason = %why, "replication connection refused");
        }
    }
}

/// Serves replication connections for a fixed set of directories on
/// `listener` until the task is dropped or aborted.
pub async fn serve(
    listener: TcpListener,
    config: SecondaryConfig,
    events: Option<UnboundedSender<SecondaryEvent>>,
) -> Result<(), RfsError> {
    let registry = Registry::new();
    for (name, local) in config.dirs {
        registry.add(
            name,
            SecondaryDir {
                local,
                root: None,
                async_mode: config.async_mode,
                state: None,
                quarantine: None,
            },
        );
    }
    serve_registry(
        listener,
        registry,
        &config.key,
        config.handshake_timeout,
        events,
    )
    .await
}

/// Serves replication connections for the directories of `registry` on
/// `listener` until the task is dropped or aborted.
///
/// Each connection's handshake runs as a task, within `handshake_timeout`
/// in all, at most [`MAX_PENDING_HANDSHAKES`] at once (more are closed at
/// once); only a peer that proved it holds the cluster key gets threads
/// (a reader and an applier), at most [`MAX_CONNECTIONS`] at once. A failed
/// `accept` (out of file descriptors, ...) is retried after a pause
/// ([`crate::sys::accept`]): the listener never stops by itself.
pub async fn serve_registry(
    listener: TcpListener,
    registry: Arc<Registry>,
    key: &[u8],
    handshake_timeout: Duration,
    events: Option<UnboundedSender<SecondaryEvent>>,
) -> Result<(), RfsError> {
    let key = ChannelKey::from_cluster_key(key).map_err(RfsError::Key)?;
    let ctx = Arc::new(Ctx {
        key,
        handshake_timeout,
        registry,
        events,
        connections: AtomicUsize::new(0),
        refusals: Mutex::new(RefusalLog::default()),
    });
    let pending = Arc::new(tokio::sync::Semaphore::new(MAX_PENDING_HANDSHAKES));
    let mut backoff = crate::sys::accept::AcceptBackoff::new("replication");
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => {
                backoff.ok();
                c
            }
            Err(e) => {
                ctx.registry
                    .counters
                    .accept_errors
                    .fetch_add(1, Ordering::Relaxed);
                backoff.failed(&e).await;
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&pending).try_acquire_owned() else {
            ctx.busy(
                peer,
                &format!("{MAX_PENDING_HANDSHAKES} handshakes already in progress"),
            );
            continue;
        };
        let ctx = Arc::clone(&ctx);
        tokio::spawn(async move {
            let accepted = channel::accept_async(stream, &ctx.key, ctx.handshake_timeout).await;
            drop(permit);
            let (tx, rx) = match accepted {
                Ok(c) => c,
                Err(e) => {
                    ctx.refused(peer, &e);
                    return;
                }
            };
            if ctx.connections.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
                ctx.connections.fetch_sub(1, Ordering::AcqRel);
                ctx.busy(
                    peer,
                    &format!("{MAX_CONNECTIONS} replication connections already served"),
                );
                return;
            }
            let thread_ctx = Arc::clone(&ctx);
            let spawned = thread::Builder::new()
                .name("rfs-second".into())
                .spawn(move || {
                    // Released however the connection ends, a panic too.
                    struct Slot<'a>(&'a AtomicUsize);
                    impl Drop for Slot<'_> {
                        fn drop(&mut self) {
                            self.0.fetch_sub(1, Ordering::AcqRel);
                        }
                    }
                    let _slot = Slot(&thread_ctx.connections);
                    connection(&thread_ctx, tx, rx, peer);
                });
            if let Err(e) = spawned {
                ctx.connections.fetch_sub(1, Ordering::AcqRel);
                tracing::warn!(%peer, error = %e, "cannot start a replication thread");
            }
        });
    }
}

/// The activity log of a connection, with what was received and applied
/// (it is reset only when the two meet).
struct Activity {
    log: Option<Journal>,
    received: Seq,
    applied: Seq,
}

/// Bytes of suspects in a welcome at most (paths may be long, see
/// [`proto::MAX_PATH`]): past it, the whole tree is asked for, and the
/// welcome stays far below the channel's largest message.
const SUSPECT_BYTES: usize = 8 << 20;

/// What this copy may hold that the primary lacks: its activity log and
/// what it changed alone, whole tree past [`proto::MAX_SUSPECTS`] entries or
/// [`SUSPECT_BYTES`].
fn suspects(al: Option<&Journal>, alone: Option<&DirtySet>) -> Vec<(RelPath, Change)> {
    let (Some(al), Some(alone)) = (al, alone) else {
        tracing::warn!("activity log or journal unreadable: asking for the whole tree");
        return vec![(RelPath::root(), Change::Tree)];
    };
    let mut set = al.dirty().clone();
    set.merge(alone);
    let recs = set.to_records();
    let bytes: usize = recs.iter().map(|(p, _)| p.as_bytes().len() + 24).sum();
    if recs.len() > proto::MAX_SUSPECTS || bytes > SUSPECT_BYTES {
        vec![(RelPath::root(), Change::Tree)]
    } else {
        recs
    }
}

/// Most bytes a quarantine copies: past it nothing is copied (nor
/// overwritten), the resynchronisation is refused with a clear error.
pub const QUARANTINE_MAX: u64 = 1 << 30;

/// The fingerprint of the divergence last quarantined, in a directory's
/// state (removed when the copy is in sync again).
const QUARANTINED: &str = "quarantined";

/// Copies what this node changed alone (its journal) into a new quarantine
/// directory, once per divergence: its fingerprint is kept in `mark` (in
/// the directory's state), so a primary that reconnects before the
/// resynchronisation completes does not get it copied again. Returns the
/// new directory and the number of paths kept (`None`: nothing to keep, or
/// already kept). Past `max` bytes it copies nothing and fails.
fn quarantine(
    local: &std::path::Path,
    alone: &DirtySet,
    to: &std::path::Path,
    mark: Option<&std::path::Path>,
    max: u64,
) -> std::io::Result<Option<(PathBuf, usize)>> {
    if alone.is_empty() {
        return Ok(None);
    }
    let mut fingerprint = blake3::Hasher::new();
    for (p, c) in alone.to_records() {
        fingerprint.update(p.as_bytes());
        fingerprint.update(format!(" {c:?}\n").as_bytes());
    }
    let fingerprint = fingerprint.finalize().to_hex().to_string();
    if let Some(mark) = mark
        && std::fs::read_to_string(mark).is_ok_and(|m| m.lines().next() == Some(&fingerprint))
    {
        return Ok(None);
    }
    // Paths from the copy's root may be longer than PATH_MAX: everything is
    // reached from directory fds, piece by piece, never following a symlink.
    let src = super::mounts::open_dir(local)?;
    let mut bytes = 0u64;
    for (p, _) in alone.iter() {
        bytes = bytes.saturating_add(tree_bytes(src.as_fd(), p)?);
    }
    if bytes > max {
        return Err(std::io::Error::other(format!(
            "the {bytes} bytes this node changed alone exceed the quarantine cap of {max}: nothing copied, nothing overwritten, this copy is not resynchronised; keep what matters from {} by hand, then remove this directory's journal (var/lib/safekit/<AM>/rfs/<dir>/journal) and start the module again",
            local.display()
        )));
    }
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    std::fs::create_dir_all(to)?;
    // A directory of its own, even for two quarantines in one second.
    let mut dest = to.join(format!("{stamp}"));
    for k in 1.. {
        match std::fs::create_dir(&dest) {
            Ok(()) => break,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && k < 1000 => {
                dest = to.join(format!("{stamp}-{k}"));
            }
            Err(e) => return Err(e),
        }
    }
    let kept = super::mounts::open_dir(&dest)?;
    let mut n = 0;
    for (p, _) in alone.iter() {
        if copy_tree(src.as_fd(), kept.as_fd(), p)? {
            n += 1;
        }
    }
    if let Some(mark) = mark {
        crate::paths::write_durably(
            mark,
            format!("{fingerprint}\n{}\n", dest.display()).as_bytes(),
        )?;
    }
    Ok(Some((dest, n)))
}

/// The parent directory of `p` below `root` and its last name (the root:
/// itself and `.`); `None` if the parent does not exist.
fn parent_of<'p>(
    root: BorrowedFd<'_>,
    p: &'p RelPath,
) -> std::io::Result<Option<(OwnedFd, &'p OsStr)>> {
    let (parent, name) = p.split().unwrap_or((&[][..], &b"."[..]));
    match sys::open_dir(root, parent) {
        Ok(d) => Ok(Some((d, OsStr::from_bytes(name)))),
        Err(e) if is_gone(&e) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Not there as a path of the copy: missing, or reached through a symlink
/// (never followed: what it points to is not this copy's).
fn is_gone(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOENT | libc::ENOTDIR | libc::ELOOP)
    )
}

/// `parent/name` as bytes (relative to some directory).
fn below(parent: &[u8], name: &[u8]) -> Vec<u8> {
    let mut v = parent.to_vec();
    if !v.is_empty() {
        v.push(b'/');
    }
    v.extend_from_slice(name);
    v
}

/// Bytes of the regular files at or under `p` below `root` (0 if it does
/// not exist). Walked without recursion, one directory open at a time.
fn tree_bytes(root: BorrowedFd<'_>, p: &RelPath) -> std::io::Result<u64> {
    let Some((top, name)) = parent_of(root, p)? else {
        return Ok(0);
    };
    let mut total = 0u64;
    // Paths below `top`.
    let mut stack = vec![name.as_bytes().to_vec()];
    while let Some(rel) = stack.pop() {
        let (parent, name) = match rel.iter().rposition(|&b| b == b'/') {
            Some(i) => (&rel[..i], &rel[i + 1..]),
            None => (&[][..], &rel[..]),
        };
        let d = match sys::open_dir(top.as_fd(), parent) {
            Ok(d) => d,
            Err(e) if is_gone(&e) => continue,
            Err(e) => return Err(e),
        };
        let st = match sys::stat_at(d.as_fd(), OsStr::from_bytes(name)) {
            Ok(st) => st,
            Err(e) if is_gone(&e) => continue,
            Err(e) => return Err(e),
        };
        match sys::file_type(&st) {
            rustix::fs::FileType::RegularFile => {
                total = total.saturating_add(u64::try_from(st.st_size).unwrap_or(0));
            }
            rustix::fs::FileType::Directory => {
                let sub = sys::open_dir(top.as_fd(), &rel)?;
                for child in super::apply::list_dir(sub.as_fd())? {
                    stack.push(below(&rel, &child));
                }
            }
            _ => {}
        }
    }
    Ok(total)
}

/// Copies `p` (file, symlink or directory, recursively) from below `src`
/// to the same path below `dst`, making the directories on the way; false
/// if `p` does not exist. Walked without recursion, every directory reached
/// from `src` or `dst` piece by piece, never following a symlink.
fn copy_tree(src: BorrowedFd<'_>, dst: BorrowedFd<'_>, p: &RelPath) -> std::io::Result<bool> {
    let Some((from, name)) = parent_of(src, p)? else {
        return Ok(false);
    };
    if let Err(e) = sys::stat_at(from.as_fd(), name) {
        return if is_gone(&e) { Ok(false) } else { Err(e) };
    }
    // The destination's parent, made level by level.
    let mut to = sys::open_dir(dst, b"")?;
    if let Ok((parent, _)) = p.split() {
        for c in parent.split(|&b| b == b'/').filter(|c| !c.is_empty()) {
            to = make_dir(to.as_fd(), OsStr::from_bytes(c), 0o755)?;
        }
    }
    // Paths below `from` and `to`.
    let mut stack = vec![name.as_bytes().to_vec()];
    while let Some(rel) = stack.pop() {
        let (parent, name) = match rel.iter().rposition(|&b| b == b'/') {
            Some(i) => (&rel[..i], &rel[i + 1..]),
            None => (&[][..], &rel[..]),
        };
        let name = OsStr::from_bytes(name);
        let (sd, dd) = (
            sys::open_dir(from.as_fd(), parent)?,
            sys::open_dir(to.as_fd(), parent)?,
        );
        let st = match sys::stat_at(sd.as_fd(), name) {
            Ok(st) => st,
            Err(e) if is_gone(&e) => continue,
            Err(e) => return Err(e),
        };
        match sys::file_type(&st) {
            rustix::fs::FileType::Directory => {
                let _ = make_dir(dd.as_fd(), name, 0o755)?;
                let sub = sys::open_beneath(
                    sd.as_fd(),
                    name.as_bytes(),
                    OFlags::RDONLY | OFlags::DIRECTORY,
                )?;
                for child in super::apply::list_dir(sub.as_fd())? {
                    stack.push(below(&rel, &child));
                }
            }
            rustix::fs::FileType::Symlink => {
                let target =
                    rustix::fs::readlinkat(sd.as_fd(), name, Vec::new()).map_err(sys::io)?;
                let _ = rustix::fs::unlinkat(dd.as_fd(), name, rustix::fs::AtFlags::empty());
                rustix::fs::symlinkat(target.as_c_str(), dd.as_fd(), name).map_err(sys::io)?;
            }
            rustix::fs::FileType::RegularFile => {
                let mut r = std::fs::File::from(sys::open_beneath(
                    sd.as_fd(),
                    name.as_bytes(),
                    OFlags::RDONLY | OFlags::NONBLOCK,
                )?);
                let mut w = std::fs::File::from(
                    rustix::fs::openat(
                        dd.as_fd(),
                        name,
                        OFlags::WRONLY
                            | OFlags::CREATE
                            | OFlags::TRUNC
                            | OFlags::NOFOLLOW
                            | OFlags::CLOEXEC,
                        rustix::fs::Mode::from_raw_mode(sys::perm(&st)),
                    )
                    .map_err(sys::io)?,
                );
                std::io::copy(&mut r, &mut w)?;
            }
            _ => {}
        }
    }
    Ok(true)
}

/// `dir/name` as a directory (made with `mode` if missing), opened.
fn make_dir(dir: BorrowedFd<'_>, name: &OsStr, mode: u32) -> std::io::Result<OwnedFd> {
    match rustix::fs::mkdirat(dir, name, rustix::fs::Mode::from_raw_mode(mode)) {
        Ok(()) | Err(rustix::io::Errno::EXIST) => {}
        Err(e) => return Err(sys::io(e)),
    }
    sys::open_beneath(dir, name.as_bytes(), OFlags::RDONLY | OFlags::DIRECTORY)
}

/// A verification connection: the manifest of the local copy.
fn serve_verify(ctx: &Ctx, mut tx: ChannelSender, dir: &str, peer: SocketAddr) {
    let Some(slot) = ctx.registry.get(dir) else {
        let reason = format!("no replicated directory {dir:?} here");
        let _ = tx.send(&Message::Bye {
            reason: reason.clone(),
        });
        ctx.event(SecondaryEvent::Refused { peer, reason });
        return;
    };
    let root = match &slot.dir.root {
        Some(fd) => fd.try_clone(),
        None => super::mounts::open_dir(&slot.dir.local),
    };
    let r = root
        .map_err(|e| format!("open {}: {e}", slot.dir.local.display()))
        .and_then(|fd| super::verify::send_manifest(&mut tx, std::os::fd::AsFd::as_fd(&fd)));
    if let Err(reason) = r {
        let _ = tx.send(&Message::Bye { reason });
    }
}

#[expect(
    clippy::too_many_lines,
    reason = "the connection's life in order: handshake, hello, takeover, loop"
)]
fn connection(ctx: &Ctx, mut tx: ChannelSender, mut rx: ChannelReceiver, peer: SocketAddr) {
    let _ = rx.set_read_timeout(Some(ctx.handshake_timeout));
    let dir = match rx.recv() {
        Ok(Message::Hello { version, dir }) if version == proto::VERSION => dir,
        Ok(Message::Verify { version, dir }) if version == proto::VERSION => {
            serve_verify(ctx, tx, &dir, peer);
            return;
        }
        other => {
            let reason = format!("expected hello (version {}), got {other:?}", proto::VERSION);
            let _ = tx.send(&Message::Bye {
                reason: reason.clone(),
            });
            ctx.event(SecondaryEvent::Refused { peer, reason });
            return;
        }
    };
    let Some(slot) = ctx.registry.get(&dir) else {
        let reason = format!("no replicated directory {dir:?} here");
        let _ = tx.send(&Message::Bye {
            reason: reason.clone(),
        });
        ctx.event(SecondaryEvent::Refused { peer, reason });
        return;
    };
    // Take over from the previous connection, then wait for its applier.
    if let Ok(handle) = tx.shutdown_handle() {
        let old = lock(&slot.current).replace(handle);
        if let Some(old) = old {
            old.shutdown();
        }
    }
    let mut guard = lock(&slot.applier);
    if guard.is_none() {
        let opened = match &slot.dir.root {
            Some(fd) => fd.try_clone().and_then(Applier::from_fd),
            None => Applier::open(&slot.dir.local),
        };
        match opened {
            Ok(a) => *guard = Some(a),
            Err(e) => {
                let reason = format!("cannot open {}: {e}", slot.dir.local.display());
                let _ = tx.send(&Message::Bye {
                    reason: reason.clone(),
                });
                ctx.event(SecondaryEvent::Refused { peer, reason });
                return;
            }
        }
    }
    let state = slot.dir.state.clone();
    // This copy's own records, read once: the activity log (kept for the
    // live phase) and what this node changed alone.
    let al = state.as_ref().and_then(|st| {
        st.create().ok()?;
        Journal::open(&st.al()).ok()
    });
    let alone = state
        .as_ref()
        .map(|st| Journal::open(&st.journal()).map(|j| j.dirty().clone()));
    if let (Some(alone), Some(q)) = (&alone, &slot.dir.quarantine) {
        let kept = alone
            .as_ref()
            .map_err(|e| std::io::Error::other(e.to_string()))
            .and_then(|alone| {
                let mark = state.as_ref().map(|st| st.dir().join(QUARANTINED));
                quarantine(&slot.dir.local, alone, q, mark.as_deref(), QUARANTINE_MAX)
            });
        match kept {
            Ok(Some((to, paths))) => {
                tracing::warn!(%dir, to = %to.display(), paths, "files changed alone quarantined before resynchronisation");
                ctx.event(SecondaryEvent::Quarantined {
                    dir: dir.clone(),
                    to,
                    paths,
                });
            }
            Ok(None) => {}
            Err(e) => {
                let reason = format!("cannot quarantine divergent files: {e}");
                let _ = tx.send(&Message::Bye {
                    reason: reason.clone(),
                });
                ctx.event(SecondaryEvent::Refused { peer, reason });
                return;
            }
        }
    }
    let (sync_id, suspects, resume_id) = match &state {
        Some(st) => {
            // This copy is a secondary's now: what it sent as a primary is
            // over (its journal is no longer what a peer lacks).
            if let Err(e) = st.forget_resume(Side::Sent) {
                tracing::warn!(%dir, error = %e, "forgetting a sent full resynchronisation");
            }
            // A copy that failed to apply something is not what the
            // primary's journal says it is.
            let resume = if slot.failed.load(Ordering::Acquire) {
                0
            } else {
                st.resume_id(Side::Received)
            };
            (
                st.sync_id(),
                suspects(al.as_ref(), alone.as_ref().and_then(|a| a.as_ref().ok())),
                resume,
            )
        }
        None => (0, Vec::new(), 0),
    };
    let activity = Mutex::new(Activity {
        log: al,
        received: 0,
        applied: 0,
    });
    if let Err(e) = tx.send(&Message::Welcome {
        sync_id,
        suspects,
        resume_id,
    }) {
        ctx.event(SecondaryEvent::Disconnected {
            dir,
            reason: e.to_string(),
        });
        return;
    }
    let _ = rx.set_read_timeout(None);
    ctx.event(SecondaryEvent::Connected {
        dir: dir.clone(),
        peer,
    });
    let mode = slot.dir.async_mode;
    let insync = AtomicBool::new(false);
    let tx = Mutex::new(tx);
    let (ops_tx, ops_rx) = mpsc::channel::<(Seq, Op, bool, bool)>();
    let backlog = Backlog::new(APPLY_BACKLOG);
    let dir2 = dir.clone();
    let link = Link {
        ctx,
        dir: &dir2,
        tx: &tx,
        state: state.as_ref(),
        insync: &insync,
        activity: &activity,
        backlog: &backlog,
        failed: &slot.failed,
    };
    let reason = thread::scope(|scope| {
        let applier = guard.as_mut();
        let link = &link;
        scope.spawn(move || {
            if let Some(applier) = applier {
                apply_loop(link, applier, &ops_rx);
            } else {
                link.backlog.close();
            }
        });
        let mut last: Seq = 0;
        let (mut batch, mut batch_bytes) = (0u32, 0u64);
        let reason = loop {
            match rx.recv() {
                Ok(Message::Op { seq, op }) => {
                    if seq != last + 1 {
                        break format!("sequence gap: #{seq} after #{last}");
                    }
                    last = seq;
                    // A batch ends when nothing more is buffered, or every
                    // so many operations or bytes under a steady stream, so
                    // that acknowledgements keep flowing.
                    batch += 1;
                    batch_bytes += weight(&op);
                    let batch_end =
                        !rx.has_buffered() || batch >= ACK_EVERY || batch_bytes >= ACK_BYTES;
                    if batch_end {
                        batch = 0;
                        batch_bytes = 0;
                    }
                    // Live and acknowledged on receipt: in the activity log
                    // first, so a crash before it is written is known.
                    let on_receipt = mode == AsyncMode::Second && insync.load(Ordering::Acquire);
                    if on_receipt {
                        let mut a = lock(&activity);
                        a.received = seq;
                        let changes = journal::changes_of(&op);
                        if let Some(log) = a.log.as_mut() {
                            for (p, c) in changes {
                                let _ = log.record(&p, c);
                            }
                        }
                    }
                    // Back-pressure: wait while the applier is that far
                    // behind.
                    if !backlog.take(weight(&op))
                        || ops_tx.send((seq, op, batch_end, on_receipt)).is_err()
                    {
                        break "applier stopped".to_string();
                    }
                    if batch_end && on_receipt {
                        let mut t = lock(&tx);
                        if let Err(e) = t.send(&Message::Ack { seq }) {
                            break e.to_string();
                        }
                    }
                }
                Ok(Message::Bye { reason }) => break format!("primary closed: {reason}"),
                Ok(other) => break format!("unexpected {other:?}"),
                Err(ChannelError::Closed) => break "connection closed".to_string(),
                Err(e) => break e.to_string(),
            }
        };
        drop(ops_tx);
        reason
    });
    drop(guard);
    tracing::info!(%dir, %reason, "replication connection ended");
    ctx.event(SecondaryEvent::Disconnected { dir, reason });
}

/// What the applier thread shares with its connection.
struct Link<'a> {
    ctx: &'a Ctx,
    dir: &'a str,
    tx: &'a Mutex<ChannelSender>,
    state: Option<&'a DirState>,
    insync: &'a AtomicBool,
    activity: &'a Mutex<Activity>,
    backlog: &'a Backlog,
    /// The slot's "failed since in sync" flag.
    failed: &'a AtomicBool,
}

impl Link<'_> {
    fn ack(&self, seq: Seq) -> bool {
        lock(self.tx).send(&Message::Ack { seq }).is_ok()
    }

    fn fail(&self, seq: Seq, errno: i32, detail: String) {
        self.failed.store(true, Ordering::Release);
        self.ctx.event(SecondaryEvent::Failed {
            dir: self.dir.to_string(),
            seq,
            errno,
            detail: detail.clone(),
        });
        let _ = lock(self.tx).send(&Message::Failed { seq, errno, detail });
    }

    /// The copy reached synchronisation point `id`: record it, forget the
    /// activity log and what this node changed alone.
    fn in_sync(&self, id: u64) -> Result<(), String> {
        if let Some(st) = self.state {
            st.set_sync_id(id)
                .map_err(|e| format!("recording the synchronisation point: {e}"))?;
            for side in [Side::Received, Side::Sent] {
                st.forget_resume(side)
                    .map_err(|e| format!("forgetting the full resynchronisation: {e}"))?;
            }
            let mut j = Journal::open(&st.journal()).map_err(|e| e.to_string())?;
            j.clear().map_err(|e| e.to_string())?;
            // That divergence is over: the next one is kept again.
            match std::fs::remove_file(st.dir().join(QUARANTINED)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.to_string()),
                _ => {}
            }
            let mut a = lock(self.activity);
            if let Some(log) = a.log.as_mut() {
                log.reset_fast().map_err(|e| e.to_string())?;
            }
        }
        self.failed.store(false, Ordering::Release);
        self.insync.store(true, Ordering::Release);
        self.ctx.event(SecondaryEvent::InSync {
            dir: self.dir.to_string(),
        });
        Ok(())
    }
}

/// Operations for the applier: sequence, operation, end of a batch, and
/// whether the reader acknowledged it on receipt.
type Queued = (Seq, Op, bool, bool);

/// Applies in order. Barriers (fsync of a path) are grouped: each path
/// synced once at the end of a batch, before that batch is acknowledged
/// (`async = "none"`), so a stream of small fsyncs costs one sync per path
/// per batch, not one per operation.
fn apply_loop(link: &Link<'_>, applier: &mut Applier, ops: &mpsc::Receiver<Queued>) {
    // However it ends, the reader must not wait for it any more.
    struct Closed<'a>(&'a Backlog);
    impl Drop for Closed<'_> {
        fn drop(&mut self) {
            self.0.close();
        }
    }
    let _closed = Closed(link.backlog);
    let mut failed = false;
    let mut barriers = Barriers::default();
    while let Ok((seq, op, batch_end, acked_on_receipt)) = ops.recv() {
        let w = weight(&op);
        if let Op::Fsync { path, data_only } = &op {
            barriers.add(path, *data_only);
        } else if let Op::InSync { sync_id } = op {
            if let Err(detail) = link.in_sync(sync_id) {
                tracing::warn!(dir = %link.dir, %detail, "cannot record the synchronisation point");
                if !failed {
                    failed = true;
                    link.fail(seq, 0, detail);
                }
            }
        } else if let Op::FullSync { resume_id } = op {
            // Before anything that follows is applied: this copy is now
            // what this full resynchronisation left, and the primary's
            // journal says what remains of it.
            if let Some(st) = link.state
                && let Err(e) = st.set_resume_id(Side::Received, resume_id)
            {
                // Whatever id it had no longer describes it.
                let _ = st.forget_resume(Side::Received);
                tracing::warn!(dir = %link.dir, error = %e, "cannot record the full resynchronisation id");
            }
        } else if let Err(e) = applier.apply(&op, true) {
            tracing::warn!(dir = %link.dir, seq, error = %e, "cannot apply replicated operation");
            if !failed {
                failed = true;
                link.fail(seq, e.errno(), e.to_string());
            }
        }
        {
            let mut a = lock(link.activity);
            a.applied = seq;
            if a.applied >= a.received
                && let Some(log) = a.log.as_mut()
                && log.records() > 0
            {
                let _ = log.reset_fast();
            }
        }
        if batch_end {
            for op in barriers.take() {
                if let Err(e) = applier.apply(&op, true) {
                    tracing::warn!(dir = %link.dir, seq, error = %e, "cannot sync replicated data");
                    if !failed {
                        failed = true;
                        link.fail(seq, e.errno(), e.to_string());
                    }
                }
            }
        }
        // Resynchronisation and async = "none": acknowledged once written
        // (and synced, for the barriers of the batch).
        link.backlog.give(w);
        if batch_end && !acked_on_receipt && !link.ack(seq) {
            return;
        }
    }
}

/// The barriers of a batch not yet synced: each path once (a full sync if
/// any of its barriers asked for one).
#[derive(Debug, Default)]
struct Barriers(Vec<(RelPath, bool)>);

impl Barriers {
    fn add(&mut self, path: &RelPath, data_only: bool) {
        match self.0.iter_mut().find(|(p, _)| p == path) {
            Some((_, d)) => *d &= data_only,
            None => self.0.push((path.clone(), data_only)),
        }
    }

    /// The sync operations to run, in the order first asked.
    fn take(&mut self) -> Vec<Op> {
        self.0
            .drain(..)
            .map(|(path, data_only)| Op::Fsync { path, data_only })
            .collect()
    }
}

/// What an operation weighs in the reader-to-applier queue: its payload
/// plus a fixed overhead.
fn weight(op: &Op) -> u64 {
    let payload = match op {
        Op::Write { data, .. } => data.len(),
        Op::SetXattr { value, .. } => value.len(),
        Op::Symlink { target, .. } => target.len(),
        Op::Put { xattrs, target, .. } => {
            target.len() + xattrs.iter().map(|(n, v)| n.len() + v.len()).sum::<usize>()
        }
        Op::Prune { keep, .. } => keep.iter().map(Vec::len).sum(),
        _ => 0,
    };
    payload as u64 + 256
}

/// The bytes of operations queued for the applier, bounded: the reader
/// [`take`](Self::take)s before queueing (waiting while the bound would be
/// passed, unless the queue is empty), the applier
/// [`give`](Self::give)s back once applied.
#[derive(Debug)]
struct Backlog {
    max: u64,
    state: Mutex<(u64, bool)>,
    changed: std::sync::Condvar,
}

impl Backlog {
    fn new(max: u64) -> Self {
        Self {
            max,
            state: Mutex::new((0, false)),
            changed: std::sync::Condvar::new(),
        }
    }

    /// Waits for room for `n` bytes and takes it; false once the applier
    /// is gone.
    fn take(&self, n: u64) -> bool {
        let mut st = lock(&self.state);
        while !st.1 && st.0 > 0 && st.0 + n > self.max {
            st = self
                .changed
                .wait(st)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        if st.1 {
            return false;
        }
        st.0 += n;
        true
    }

    fn give(&self, n: u64) {
        let mut st = lock(&self.state);
        st.0 = st.0.saturating_sub(n);
        self.changed.notify_all();
    }

    fn close(&self) {
        lock(&self.state).1 = true;
        self.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn barriers_of_a_batch_sync_each_path_once_fully_if_any_asked() {
        let (a, b) = (
            RelPath::new(*b"a").expect("path"),
            RelPath::new(*b"b").expect("path"),
        );
        let mut bar = Barriers::default();
        bar.add(&a, true);
        bar.add(&b, true);
        bar.add(&a, false);
        bar.add(&a, true);
        let want = vec![
            Op::Fsync {
                path: a,
                data_only: false,
            },
            Op::Fsync {
                path: b,
                data_only: true,
            },
        ];
        assert_eq!(bar.take(), want);
        assert_eq!(bar.take(), Vec::new());
    }

    #[test]
    fn a_divergence_is_quarantined_once_and_refused_past_the_cap() {
        let base = std::env::temp_dir().join(format!("safekit-quarantine-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let (local, q) = (base.join("local"), base.join("q"));
        let mark = base.join("state/quarantined");
        let mark = Some(mark.as_path());
        std::fs::create_dir_all(local.join("d")).unwrap();
        std::fs::write(local.join("a"), vec![1u8; 3000]).unwrap();
        std::fs::write(local.join("d/b"), vec![2u8; 2000]).unwrap();
        let mut alone = DirtySet::default();
        alone.record(&RelPath::new("a").unwrap(), Change::Meta);
        alone.record(&RelPath::new("d").unwrap(), Change::Tree);
        // Past the cap: nothing copied, a clear error.
        let e = quarantine(&local, &alone, &q, mark, 4999)
            .unwrap_err()
            .to_string();
        assert!(e.contains("5000 bytes") && e.contains("cap of 4999"), "{e}");
        assert!(!q.exists() || std::fs::read_dir(&q).unwrap().count() == 0);
        // Within it: copied once.
        let (dest, n) = quarantine(&local, &alone, &q, mark, 5000).unwrap().unwrap();
        assert_eq!(n, 2);
        assert_eq!(std::fs::read(dest.join("d/b")).unwrap(), vec![2u8; 2000]);
        assert_eq!(
            quarantine(&local, &alone, &q, mark, 5000).unwrap(),
            None,
            "same divergence"
        );
        // Another divergence is kept again.
        alone.record(&RelPath::new("c").unwrap(), Change::Tree);
        std::fs::write(local.join("c"), b"c").unwrap();
        let (again, _) = quarantine(&local, &alone, &q, mark, 6000).unwrap().unwrap();
        assert_ne!(again, dest);
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn a_divergence_deeper_than_path_max_is_quarantined() {
        let base =
            std::env::temp_dir().join(format!("safekit-quarantine-deep-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let (local, quarantined) = (base.join("local"), base.join("q"));
        std::fs::create_dir_all(&local).unwrap();
        let name = "n".repeat(200);
        let mut here = super::super::mounts::open_dir(&local).unwrap();
        let mut deep = RelPath::root();
        for _ in 0..45 {
            here = make_dir(here.as_fd(), OsStr::new(&name), 0o755).unwrap();
            deep = deep.join(name.as_bytes()).unwrap();
        }
        let file = rustix::fs::openat(
            &here,
            "f",
            OFlags::WRONLY | OFlags::CREATE,
            rustix::fs::Mode::from_raw_mode(0o600),
        )
        .unwrap();
        rustix::io::write(&file, b"changed alone, deep").unwrap();
        rustix::fs::symlinkat("f", &here, "l").unwrap();
        let mut mid = deep.clone();
        for _ in 0..20 {
            mid.pop();
        }
        // A symlink in the copy to a directory outside: never followed.
        let outside = base.join("outside");
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("secret"), b"not this copy's").unwrap();
        std::os::unix::fs::symlink(&outside, local.join("evil")).unwrap();
        let mut alone = DirtySet::default();
        alone.record(&mid, Change::Tree);
        alone.record(&deep.join(b"gone").unwrap(), Change::Meta);
        alone.record(&RelPath::new("evil/secret").unwrap(), Change::Meta);
        let (dest, paths) = quarantine(&local, &alone, &quarantined, None, 1 << 20)
            .unwrap()
            .unwrap();
        assert_eq!(paths, 1, "the missing path is not counted");
        assert!(!dest.join("evil").exists(), "copied through a symlink");
        let kept = super::super::mounts::open_dir(&dest).unwrap();
        let bottom = sys::open_dir(kept.as_fd(), deep.as_bytes()).unwrap();
        let copy =
            rustix::fs::openat(&bottom, "f", OFlags::RDONLY, rustix::fs::Mode::empty()).unwrap();
        let mut buf = [0u8; 64];
        let len = rustix::io::read(&copy, &mut buf).unwrap();
        assert_eq!(&buf[..len], b"changed alone, deep");
        assert_eq!(
            rustix::fs::readlinkat(&bottom, "l", Vec::new())
                .unwrap()
                .as_bytes(),
            b"f"
        );
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn the_backlog_holds_the_reader_until_the_applier_catches_up() {
        let b = Arc::new(Backlog::new(1000));
        assert!(b.take(600));
        assert!(b.take(400));
        let reader = {
            let b = Arc::clone(&b);
            thread::spawn(move || b.take(10))
        };
        thread::sleep(Duration::from_millis(50));
        assert!(!reader.is_finished(), "full: the reader waits");
        b.give(600);
        assert!(reader.join().unwrap(), "room again");
        // Larger than the bound on its own: passes when nothing is queued.
        b.give(410);
        assert!(b.take(5000));
        let reader = {
            let b = Arc::clone(&b);
            thread::spawn(move || b.take(1))
        };
        thread::sleep(Duration::from_millis(20));
        b.close();
        assert!(!reader.join().unwrap(), "applier gone: the reader stops");
    }
}
