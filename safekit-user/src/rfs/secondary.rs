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
    path::PathBuf,
    sync::{Arc, Mutex, mpsc},
    thread,
    time::Duration,
};

use tokio::{net::TcpListener, sync::mpsc::UnboundedSender};

use super::{
    RfsError,
    apply::Applier,
    channel::{self, ChannelError, ChannelKey, ChannelSender, ShutdownHandle},
    proto::{self, Message, Op, Seq},
};
use crate::config::AsyncMode;

/// What the secondary serves.
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

/// What happens on the secondary, for the daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecondaryEvent {
    /// A primary connected for a directory.
    Connected {
        /// Directory name.
        dir: String,
        /// The primary's address.
        peer: SocketAddr,
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
    local: PathBuf,
    applier: Mutex<Option<Applier>>,
    current: Mutex<Option<ShutdownHandle>>,
}

struct Ctx {
    key: ChannelKey,
    async_mode: AsyncMode,
    handshake_timeout: Duration,
    dirs: HashMap<String, Arc<DirSlot>>,
    events: Option<UnboundedSender<SecondaryEvent>>,
}

impl Ctx {
    fn event(&self, e: SecondaryEvent) {
        if let Some(tx) = &self.events {
            let _ = tx.send(e);
        }
    }
}

/// Serves replication connections on `listener` until the task is dropped or
/// aborted. Connections run on their own threads.
pub async fn serve(
    listener: TcpListener,
    config: SecondaryConfig,
    events: Option<UnboundedSender<SecondaryEvent>>,
) -> Result<(), RfsError> {
    let key = ChannelKey::from_cluster_key(&config.key).map_err(RfsError::Key)?;
    let ctx = Arc::new(Ctx {
        key,
        async_mode: config.async_mode,
        handshake_timeout: config.handshake_timeout,
        dirs: config
            .dirs
            .into_iter()
            .map(|(name, local)| {
                (
                    name,
                    Arc::new(DirSlot {
                        local,
                        applier: Mutex::new(None),
                        current: Mutex::new(None),
                    }),
                )
            })
            .collect(),
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
        other => {
            let reason = format!("expected hello, got {other:?}");
            let _ = tx.send(&Message::Bye {
                reason: reason.clone(),
            });
            ctx.event(SecondaryEvent::Refused { peer, reason });
            return;
        }
    };
    let Some(slot) = ctx.dirs.get(&dir).cloned() else {
        let reason = format!("no replicated directory {dir:?} here");
        let _ = tx.send(&Message::Bye {
            reason: reason.clone(),
        });
        ctx.event(SecondaryEvent::Refused { peer, reason });
        return;
    };
    // Take over from the previous connection, then wait for its applier.
    if let Ok(handle) = tx.shutdown_handle() {
        let old = slot
            .current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .replace(handle);
        if let Some(old) = old {
            old.shutdown();
        }
    }
    let mut guard = slot
        .applier
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if guard.is_none() {
        match Applier::open(&slot.local) {
            Ok(a) => *guard = Some(a),
            Err(e) => {
                let reason = format!("cannot open {}: {e}", slot.local.display());
                let _ = tx.send(&Message::Bye {
                    reason: reason.clone(),
                });
                ctx.event(SecondaryEvent::Refused { peer, reason });
                return;
            }
        }
    }
    if let Err(e) = tx.send(&Message::Welcome) {
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
    let tx = Arc::new(Mutex::new(tx));
    let (ops_tx, ops_rx) = mpsc::channel::<(Seq, Op, bool)>();
    let reason = thread::scope(|scope| {
        let applier = guard.as_mut();
        let tx2 = Arc::clone(&tx);
        let dir2 = dir.clone();
        let mode = ctx.async_mode;
        scope.spawn(move || {
            if let Some(applier) = applier {
                apply_loop(ctx, &dir2, applier, &ops_rx, &tx2, mode);
            }
        });
        let mut last: Seq = 0;
        let reason = loop {
            match rx.recv() {
                Ok(Message::Op { seq, op }) => {
                    if seq != last + 1 {
                        break format!("sequence gap: #{seq} after #{last}");
                    }
                    last = seq;
                    let batch_end = !rx.has_buffered();
                    if ops_tx.send((seq, op, batch_end)).is_err() {
                        break "applier stopped".to_string();
                    }
                    if batch_end && ctx.async_mode == AsyncMode::Second {
                        let mut t = tx.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
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

fn apply_loop(
    ctx: &Ctx,
    dir: &str,
    applier: &mut Applier,
    ops: &mpsc::Receiver<(Seq, Op, bool)>,
    tx: &Mutex<ChannelSender>,
    mode: AsyncMode,
) {
    let mut failed = false;
    while let Ok((seq, op, batch_end)) = ops.recv() {
        if let Err(e) = applier.apply(&op, true) {
            tracing::warn!(%dir, seq, error = %e, "cannot apply replicated operation");
            if !failed {
                failed = true;
                ctx.event(SecondaryEvent::Failed {
                    dir: dir.to_string(),
                    seq,
                    detail: e.to_string(),
                });
                let mut t = tx.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                let _ = t.send(&Message::Failed {
                    seq,
                    errno: e.errno(),
                    detail: e.to_string(),
                });
            }
        }
        if batch_end && mode == AsyncMode::None {
            let mut t = tx.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if t.send(&Message::Ack { seq }).is_err() {
                return;
            }
        }
    }
}
