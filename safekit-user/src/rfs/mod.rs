//! Replication of a mirror module's directories (`[[rfs.dir]]`), SPEC §5.
//!
//! # Data path
//!
//! On the primary, [`Primary::start`] opens the real directory, mounts a FUSE
//! filesystem ([`fs`]) over it and serves every request with `*at` calls on
//! that directory fd. Each change applied locally is submitted, in the order it
//! was applied, to the [`replicator`], which numbers it, encodes it
//! ([`proto`]) and sends it over the [`channel`] (Noise `NNpsk0` keyed by the
//! cluster key, TCP 5600) to the secondary. With `durability = "fsync"` (the
//! default) the FUSE reply goes out at once, except at the durability points
//! (fsync, fdatasync, `O_SYNC`/`O_DSYNC` writes, msync), which wait for the
//! secondary's acknowledgement; with `"every_write"` every reply waits (see
//! [`fs`]).
//!
//! On the secondary, [`secondary::serve`] accepts one connection per
//! directory, and an [`apply::Applier`] applies the operations in order under
//! the local copy, acknowledging on receipt (`async = "second"`) or once
//! written (`async = "none"`).
//!
//! If the secondary does not acknowledge within `send_timeout`, or the
//! connection breaks, the primary goes ALONE ([`RfsEvent::SecondaryLost`]),
//! releases the waiting replies and from then on records each change in the
//! [`journal`] (fsynced before the application's reply), so a reintegration
//! needs to send only what changed.
//!
//! The live queue is bounded on both sides: the primary's application waits
//! while 16 MiB are sent and unacknowledged ([`replicator`]), the
//! secondary's reader while 4096 operations wait for its applier.
//!
//! A returning secondary is resynchronised from the journal while the
//! application goes on ([`Primary::resync`], [`resync`]); the journal
//! shrinks as the secondary confirms what it wrote, so an interrupted
//! resynchronisation (full ones included) resumes where it stopped.
//!
//! # Not yet
//!
//! `fallocate` is refused (`EOPNOTSUPP`, so `posix_fallocate` falls back to
//! writes); hard links created while ALONE are resynchronised as copies.

pub mod apply;
pub mod channel;
pub mod fs;
pub mod journal;
pub mod mounts;
pub mod proto;
pub mod replicator;
pub mod resync;
pub mod secondary;
pub mod state;
mod sys;
pub mod verify;

use std::{
    io,
    net::SocketAddr,
    os::fd::OwnedFd,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use thiserror::Error;
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

pub use channel::{ChannelError, ChannelKey, Cipher};
pub use journal::{DirtySet, JournalError};
pub use replicator::{Counters, LinkState, Progress, ResyncOpts};
pub use secondary::{
    Registry, SecondaryConfig, SecondaryDir, SecondaryEvent, serve, serve_registry,
};
pub use state::DirState;

use crate::config::Durability;
use replicator::Replicator;

/// A replication failure, with the directory or peer it concerns.
#[derive(Debug, Error)]
pub enum RfsError {
    /// The cluster key is unusable.
    #[error("cluster key")]
    Key(#[source] ChannelError),
    /// The channel to the secondary failed.
    #[error("replication of {dir} to {peer}")]
    Channel {
        /// Directory name.
        dir: String,
        /// The secondary.
        peer: SocketAddr,
        /// What failed.
        #[source]
        source: ChannelError,
    },
    /// The secondary refused the directory.
    #[error("secondary {peer} refused {dir}: {reason}")]
    Refused {
        /// Directory name.
        dir: String,
        /// The secondary.
        peer: SocketAddr,
        /// Its reason.
        reason: String,
    },
    /// The journal could not be opened.
    #[error("journal of {dir}")]
    Journal {
        /// Directory name.
        dir: String,
        /// What failed.
        #[source]
        source: JournalError,
    },
    /// The replicated directory could not be opened.
    #[error("open replicated directory {path}")]
    Open {
        /// The directory.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The FUSE mount failed.
    #[error("mount FUSE over {path}")]
    Mount {
        /// The directory.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The FUSE session ended with an error on unmount.
    #[error("unmount FUSE from {path}")]
    Unmount {
        /// The directory.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The listener failed.
    #[error("accept replication connections")]
    Accept(#[source] io::Error),
    /// A thread could not be started.
    #[error("start a replication thread")]
    Thread(#[source] io::Error),
    /// A resynchronisation or live replication already runs.
    #[error("{dir}: a secondary is already connected or being resynchronised")]
    Busy {
        /// Directory name.
        dir: String,
    },
    /// The link was lost during the resynchronisation.
    #[error("{dir}: the secondary was lost during the resynchronisation")]
    ResyncLost {
        /// Directory name.
        dir: String,
    },
    /// A file could not be read for the resynchronisation.
    #[error("{dir}: reading for the resynchronisation")]
    ResyncRead {
        /// Directory name.
        dir: String,
        /// What failed.
        #[source]
        source: io::Error,
    },
}

/// What happens to a replicated directory on the primary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RfsEvent {
    /// The secondary is in sync and every operation now reaches it (PRIM).
    Connected {
        /// Directory name.
        dir: String,
    },
    /// The secondary is lost (send timeout, broken or refused connection):
    /// the directory goes on ALONE, journalling.
    SecondaryLost {
        /// Directory name.
        dir: String,
        /// Why.
        reason: String,
    },
    /// The secondary could not apply an operation: its copy diverges.
    SecondaryFailed {
        /// Directory name.
        dir: String,
        /// The operation.
        seq: proto::Seq,
        /// Its errno.
        errno: i32,
        /// What failed.
        detail: String,
    },
    /// The journal could not be written: acknowledged changes might be
    /// missing from a later reintegration (a full one is needed).
    JournalFailed {
        /// Directory name.
        dir: String,
        /// The error.
        error: String,
    },
}

/// How a primary replicates one directory.
#[derive(Debug, Clone)]
pub struct PrimaryParams {
    /// The directory's name on the wire: its configured path, the same on
    /// both nodes.
    pub name: String,
    /// A write not acknowledged within this makes the primary go ALONE
    /// (`rfs.send_timeout`).
    pub send_timeout: Duration,
    /// Bound on connecting and the handshake.
    pub connect_timeout: Duration,
    /// Journal file (outside the replicated directory); `None`: no journal
    /// (a full resynchronisation after any absence).
    pub journal: Option<PathBuf>,
    /// Activity log and synchronisation point (`None`: not persisted, every
    /// resynchronisation is full).
    pub state: Option<DirState>,
    /// How resynchronisations run.
    pub resync: ResyncOpts,
    /// Serve read-only opens by FUSE passthrough (the kernel reads the real
    /// file directly, no request reaches the daemon). Off by default: the
    /// kernel (6.18) requires every open of an inode that has a passthrough
    /// open to be passthrough too, and a passthrough writer would bypass
    /// replication, so a file opened for writing while a passthrough reader
    /// holds it fails with EIO. Only for directories whose files are written
    /// by replacement (write a new file, rename over).
    pub passthrough_reads: bool,
    /// Which operations wait for the secondary (`rfs.durability`).
    pub durability: Durability,
    /// FUSE request threads.
    pub threads: usize,
}

impl PrimaryParams {
    /// Defaults for directory `name`: 10 s send timeout, 5 s connect, no
    /// journal, no passthrough, durability at fsync, 2 threads.
    #[must_use]
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            send_timeout: crate::config::DEFAULT_SEND_TIMEOUT,
            connect_timeout: Duration::from_secs(5),
            journal: None,
            state: None,
            resync: ResyncOpts::default(),
            passthrough_reads: false,
            durability: crate::config::DEFAULT_DURABILITY,
            threads: 2,
        }
    }
}

/// A replicated directory served on the primary. Dropping it unmounts.
#[derive(Debug)]
pub struct Primary {
    dir: PathBuf,
    session: Option<fuser::BackgroundSession>,
    repl: Arc<Replicator>,
    key: ChannelKey,
    connect_timeout: Duration,
    /// The real directory underneath, for resynchronisation reads.
    root: Arc<OwnedFd>,
    resync: ResyncOpts,
    events: tokio::sync::mpsc::UnboundedSender<RfsEvent>,
}

impl Primary {
    /// Mounts the replicating filesystem over `dir` (ALONE: changes are
    /// journalled) and, with a peer, starts resynchronising it in the
    /// background ([`Primary::resync`]). Blocking (a few milliseconds): from
    /// async code, call it through `spawn_blocking`.
    ///
    /// A dead FUSE mount left over `dir` by a crashed daemon ("Transport
    /// endpoint is not connected") is detached first.
    #[expect(
        clippy::needless_pass_by_value,
        reason = "the parameters are the primary's own"
    )]
    pub fn start(
        dir: &Path,
        peer: Option<SocketAddr>,
        key: &[u8],
        params: PrimaryParams,
    ) -> Result<(Self, UnboundedReceiver<RfsEvent>), RfsError> {
        let key = ChannelKey::from_cluster_key(key).map_err(RfsError::Key)?;
        let (events_tx, events) = unbounded_channel();
        recover_dead_mount(dir);
        // One O_PATH handle per inode the kernel knows (see `fs`).
        sys::raise_fd_limit();
        let open_root = || {
            mounts::open_dir(dir).map_err(|source| RfsError::Open {
                path: dir.to_path_buf(),
                source,
            })
        };
        let root: OwnedFd = open_root()?;
        let reader: OwnedFd = open_root()?;
        let repl = Replicator::new(
            params.name.clone(),
            params.send_timeout,
            params.journal.clone(),
            params.state.clone(),
            events_tx.clone(),
        )?;
        let fs = fs::ReplicatedFs::new(
            root,
            Arc::clone(&repl),
            params.passthrough_reads,
            params.durability,
        )
        .map_err(|source| RfsError::Open {
            path: dir.to_path_buf(),
            source,
        })?;
        let mut config = fuser::Config::default();
        config.mount_options = vec![
            fuser::MountOption::FSName(mounts::FUSE_SOURCE.into()),
            fuser::MountOption::Subtype(mounts::FUSE_SUBTYPE.into()),
            fuser::MountOption::DefaultPermissions,
        ];
        config.acl = fuser::SessionACL::All;
        config.n_threads = Some(params.threads.max(1));
        config.clone_fd = params.threads > 1;
        let session = fuser::spawn_mount(fs, dir, &config).map_err(|source| RfsError::Mount {
            path: dir.to_path_buf(),
            source,
        })?;
        if let Err(e) = mounts::relax_dirty_limit(dir) {
            tracing::info!(dir = %dir.display(), "FUSE mount keeps the kernel's strict dirty-page limit: {e}");
        }
        let primary = Self {
            dir: dir.to_path_buf(),
            session: Some(session),
            repl,
            key,
            connect_timeout: params.connect_timeout,
            root: Arc::new(reader),
            resync: params.resync,
            events: events_tx,
        };
        if let Some(peer) = peer {
            primary.resync(peer, false);
        }
        Ok((primary, events))
    }

    /// Connects to the secondary at `peer` and resynchronises it in the
    /// background (everything with `full`, else what the journal and the
    /// secondary's own record say differ), then replicates live:
    /// [`RfsEvent::Connected`] when in sync, [`RfsEvent::SecondaryLost`] on
    /// failure (the directory stays ALONE; call again to retry).
    pub fn resync(&self, peer: SocketAddr, full: bool) {
        let repl = Arc::clone(&self.repl);
        let key = self.key.clone();
        let timeout = self.connect_timeout;
        let root = Arc::clone(&self.root);
        let opts = ResyncOpts {
            full,
            ..self.resync
        };
        let events = self.events.clone();
        let name = self.repl.name().to_string();
        let spawned = std::thread::Builder::new()
            .name("rfs-resync".into())
            .spawn(move || {
                if let Err(e) = repl.resync(peer, &key, timeout, &root, opts) {
                    // Lost links report themselves; report the rest.
                    if !matches!(e, RfsError::ResyncLost { .. }) {
                        let _ = events.send(RfsEvent::SecondaryLost {
                            dir: name,
                            reason: error_chain(&e),
                        });
                    }
                }
            });
        if let Err(e) = spawned {
            let _ = self.events.send(RfsEvent::SecondaryLost {
                dir: self.repl.name().to_string(),
                reason: format!("cannot start the resynchronisation thread: {e}"),
            });
        }
    }

    /// What `safekit rfs verify` needs, detached from the mount (sendable to
    /// a blocking task).
    #[must_use]
    pub fn verifier(&self) -> Verifier {
        Verifier {
            root: Arc::clone(&self.root),
            key: self.key.clone(),
            name: self.repl.name().to_string(),
            timeout: self.connect_timeout,
        }
    }

    /// Where the current (or last) resynchronisation is.
    #[must_use]
    pub fn progress(&self) -> Progress {
        let mut p = self
            .repl
            .progress
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        if p.active
            && let Some(t) = p.started
        {
            p.elapsed = t.elapsed();
        }
        p
    }

    /// PRIM (connected) or ALONE.
    #[must_use]
    pub fn state(&self) -> LinkState {
        self.repl.state()
    }

    /// Replication counters.
    #[must_use]
    pub fn counters(&self) -> &Counters {
        &self.repl.counters
    }

    /// What changed while ALONE (from the journal).
    #[must_use]
    pub fn dirty(&self) -> DirtySet {
        self.repl.dirty()
    }

    /// The directory served.
    #[must_use]
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Stops replicating and unmounts.
    pub fn stop(mut self) -> Result<(), RfsError> {
        self.unmount()
    }

    fn unmount(&mut self) -> Result<(), RfsError> {
        self.repl.disconnect();
        match self.session.take() {
            Some(s) => s.umount_and_join().map_err(|source| RfsError::Unmount {
                path: self.dir.clone(),
                source,
            }),
            None => Ok(()),
        }
    }
}

impl Drop for Primary {
    fn drop(&mut self) {
        if let Err(e) = self.unmount() {
            tracing::warn!(error = %error_chain(&e), "unmount failed; detaching lazily");
            let _ = sys::lazy_unmount(&self.dir);
        }
    }
}

/// Compares a primary's copy with its secondary's (`safekit rfs verify`).
#[derive(Debug, Clone)]
pub struct Verifier {
    root: Arc<OwnedFd>,
    key: ChannelKey,
    name: String,
    timeout: Duration,
}

impl Verifier {
    /// Compares with the secondary at `peer` (blocking; hashes both trees):
    /// the number of entries here and the differences, one line each
    /// (none: equal).
    pub fn verify(&self, peer: SocketAddr) -> Result<(usize, Vec<String>), RfsError> {
        let mine = verify::manifest(std::os::fd::AsFd::as_fd(&*self.root)).map_err(|source| {
            RfsError::ResyncRead {
                dir: self.name.clone(),
                source,
            }
        })?;
        let theirs = verify::remote_manifest(peer, &self.key, &self.name, self.timeout)?;
        Ok((mine.len(), verify::compare(&mine, &theirs)))
    }
}

/// Detaches dead FUSE mounts stacked over `dir` (ENOTCONN on stat).
fn recover_dead_mount(dir: &Path) {
    if let Err(e) = std::fs::metadata(dir)
        && e.raw_os_error() == Some(libc::ENOTCONN)
    {
        // Only a FUSE mount of our own; someone else's dead filesystem on
        // the directory is theirs to deal with (opening it fails below).
        let n = mounts::detach_ours(dir, None, true);
        if n > 0 {
            tracing::warn!(dir = %dir.display(), "dead FUSE mount of a previous daemon over the directory detached");
        }
    }
}

/// An error and its sources, `: `-separated.
#[must_use]
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
