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
    net::SocketAddr,
    os::unix::ffi::OsStrExt as _,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread,
    time::Duration,
};

use tokio::{net::TcpListener, sync::mpsc::UnboundedSender};

use super::{
    RfsError,
    apply::Applier,
    channel::{self, ChannelError, ChannelKey, ChannelSender, ShutdownHandle},
    journal::{self, Change, DirtySet, Journal},
    proto::{self, Message, Op, RelPath, Seq},
    state::DirState,
};
use crate::config::AsyncMode;

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
/// operations.
const ACK_EVERY: u32 = 16;

/// Operations received and not yet applied, at most.
const APPLY_QUEUE: usize = 4096;

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
}

/// The directories this node currently receives, by name. The daemon adds a
/// module's directories when it becomes SECOND and removes them when it
/// leaves that role.
#[derive(Default)]
pub struct Registry {
    dirs: Mutex<HashMap<String, Arc<DirSlot>>>,
}

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

    /// Accepts connections for `name` from now on.
    pub fn add(&self, name: String, dir: SecondaryDir) {
        lock(&self.dirs).insert(
            name,
            Arc::new(DirSlot {
                dir,
                applier: Mutex::new(None),
                current: Mutex::new(None),
            }),
        );
    }

    /// Stops receiving `name`: the current connection is shut down and its
    /// applier finishes what it received. Blocking (call from
    /// `spawn_blocking` in async code).
    pub fn remove(&self, name: &str) {
        let Some(slot) = lock(&self.dirs).remove(name) else {
            return;
        };
        if let Some(h) = lock(&slot.current).take() {
            h.shutdown();
        }
        // Wait for the applier (held by the connection while it runs).
        drop(lock(&slot.applier).take());
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
}

impl Ctx {
    fn event(&self, e: SecondaryEvent) {
        if let Some(tx) = &self.events {
            let _ = tx.send(e);
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
/// `listener` until the task is dropped or aborted. Connections run on
/// their own threads.
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
    });
    loop {
        let (stream, peer) = listener.accept().await.map_err(RfsError::Accept)?;
        let stream = match stream.into_std().and_then(|s| {
            s.set_nonblocking(false)?;
            Ok(s)
        }) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(%peer, error = %e, "replication connection unusable");
                continue;
            }
        };
        let ctx = Arc::clone(&ctx);
        let spawned = thread::Builder::new()
            .name("rfs-second".into())
            .spawn(move || connection(&ctx, stream, peer));
        if let Err(e) = spawned {
            tracing::warn!(%peer, error = %e, "cannot start a replication thread");
        }
    }
}

/// The activity log of a connection, with what was received and applied
/// (it is reset only when the two meet).
struct Activity {
    log: Option<Journal>,
    received: Seq,
    applied: Seq,
}

/// What this copy may hold that the primary lacks: its activity log and
/// what it changed alone, whole tree past [`proto::MAX_SUSPECTS`].
fn suspects(al: Option<&Journal>, alone: Option<&DirtySet>) -> Vec<(RelPath, Change)> {
    let (Some(al), Some(alone)) = (al, alone) else {
        tracing::warn!("activity log or journal unreadable: asking for the whole tree");
        return vec![(RelPath::root(), Change::Tree)];
    };
    let mut set = al.dirty().clone();
    set.merge(alone);
    let recs = set.to_records();
    if recs.len() > proto::MAX_SUSPECTS {
        vec![(RelPath::root(), Change::Tree)]
    } else {
        recs
    }
}

/// Copies what this node changed alone (its journal) into a new quarantine
/// directory; returns it and the number of paths kept.
fn quarantine(
    local: &std::path::Path,
    alone: &DirtySet,
    to: &std::path::Path,
) -> std::io::Result<Option<(PathBuf, usize)>> {
    if alone.is_empty() {
        return Ok(None);
    }
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let dest = to.join(format!("{stamp}"));
    std::fs::create_dir_all(&dest)?;
    let mut n = 0;
    for (p, _) in alone.iter() {
        let rel = std::path::Path::new(std::ffi::OsStr::from_bytes(p.as_bytes()));
        if copy_tree(&local.join(rel), &dest.join(rel))? {
            n += 1;
        }
    }
    Ok(Some((dest, n)))
}

/// Copies `src` (file, symlink or directory, recursively) to `dst`; false if
/// `src` does not exist.
fn copy_tree(src: &std::path::Path, dst: &std::path::Path) -> std::io::Result<bool> {
    let Ok(md) = std::fs::symlink_metadata(src) else {
        return Ok(false);
    };
    if let Some(parent) = dst.parent() {
        std::fs::create_dir_all(parent)?;
    }
    if md.is_dir() {
        std::fs::create_dir_all(dst)?;
        for e in std::fs::read_dir(src)? {
            let e = e?;
            copy_tree(&e.path(), &dst.join(e.file_name()))?;
        }
    } else if md.file_type().is_symlink() {
        let t = std::fs::read_link(src)?;
        let _ = std::fs::remove_file(dst);
        std::os::unix::fs::symlink(t, dst)?;
    } else if md.is_file() {
        std::fs::copy(src, dst)?;
    }
    Ok(true)
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
fn connection(ctx: &Ctx, stream: std::net::TcpStream, peer: SocketAddr) {
    let (mut tx, mut rx) = match channel::accept(stream, &ctx.key, ctx.handshake_timeout) {
        Ok(c) => c,
        Err(e) => {
            ctx.event(SecondaryEvent::Refused {
                peer,
                reason: e.to_string(),
            });
            return;
        }
    };
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
            .and_then(|alone| quarantine(&slot.dir.local, alone, q));
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
    let (sync_id, suspects) = match &state {
        Some(st) => (
            st.sync_id(),
            suspects(al.as_ref(), alone.as_ref().and_then(|a| a.as_ref().ok())),
        ),
        None => (0, Vec::new()),
    };
    let activity = Mutex::new(Activity {
        log: al,
        received: 0,
        applied: 0,
    });
    if let Err(e) = tx.send(&Message::Welcome { sync_id, suspects }) {
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
    // Bounded: an applier that falls behind stops the reader, the TCP
    // window fills, and the primary's own bounded queue pushes back on the
    // application (a stalled copy ends in the primary's send timeout).
    let (ops_tx, ops_rx) = mpsc::sync_channel::<Queued>(APPLY_QUEUE);
    let dir2 = dir.clone();
    let link = Link {
        ctx,
        dir: &dir2,
        tx: &tx,
        state: state.as_ref(),
        insync: &insync,
        activity: &activity,
    };
    let reason = thread::scope(|scope| {
        let applier = guard.as_mut();
        let link = &link;
        scope.spawn(move || {
            if let Some(applier) = applier {
                apply_loop(link, applier, &ops_rx);
            }
        });
        let mut last: Seq = 0;
        let mut batch = 0u32;
        let reason = loop {
            match rx.recv() {
                Ok(Message::Op { seq, op }) => {
                    if seq != last + 1 {
                        break format!("sequence gap: #{seq} after #{last}");
                    }
                    last = seq;
                    // A batch ends when nothing more is buffered, or every
                    // so many operations under a steady stream, so that
                    // acknowledgements keep flowing.
                    batch += 1;
                    let batch_end = !rx.has_buffered() || batch >= ACK_EVERY;
                    if batch_end {
                        batch = 0;
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
                    if ops_tx.send((seq, op, batch_end, on_receipt)).is_err() {
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
}

impl Link<'_> {
    fn ack(&self, seq: Seq) -> bool {
        lock(self.tx).send(&Message::Ack { seq }).is_ok()
    }

    fn fail(&self, seq: Seq, errno: i32, detail: String) {
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
            let mut j = Journal::open(&st.journal()).map_err(|e| e.to_string())?;
            j.clear().map_err(|e| e.to_string())?;
            let mut a = lock(self.activity);
            if let Some(log) = a.log.as_mut() {
                log.reset_fast().map_err(|e| e.to_string())?;
            }
        }
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
    let mut failed = false;
    let mut barriers = Barriers::default();
    while let Ok((seq, op, batch_end, acked_on_receipt)) = ops.recv() {
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
}
