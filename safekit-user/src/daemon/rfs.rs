//! The replicated directories of a mirror module in the daemon: the FUSE
//! primaries mounted while this node is primary, the read-only copies
//! registered with the replication listener while it is SECOND, and the
//! state of each directory's link. The decisions stay in the mirror core;
//! this is the edge.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use crate::{
    config::{DirMode, ModuleConfig},
    paths::Paths,
    rfs::{
        self, DirState, LinkState, Primary, PrimaryParams, Progress, Registry, ResyncOpts,
        SecondaryDir, mounts,
    },
    status::RfsDirStatus,
};

/// One replicated directory of a module.
#[derive(Debug, Clone)]
pub(super) struct RfsDir {
    /// Name on the wire: `<module>:<configured path>`.
    pub(super) wire: String,
    /// The configured path (as the application sees it).
    pub(super) path: String,
    /// Where it is on this node (under the daemon's root).
    pub(super) local: PathBuf,
    /// Journal, activity log, synchronisation point.
    pub(super) state: DirState,
    /// Where files changed alone go before a resynchronisation.
    pub(super) quarantine: PathBuf,
    /// Read-only for the application on the secondary.
    pub(super) read_only: bool,
}

/// The primary side of one directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Link {
    Alone,
    Resyncing,
    Connected,
}

/// Replication runtime of a mirror module.
#[derive(Debug)]
pub(super) struct RfsRt {
    pub(super) dirs: Vec<RfsDir>,
    params: PrimaryParams,
    async_mode: crate::config::AsyncMode,
    /// Mounted while primary (same order as `dirs`).
    pub(super) primaries: Vec<Primary>,
    /// Primary side: each directory's link.
    pub(super) links: Vec<Link>,
    /// Secondary side: each directory in sync.
    pub(super) in_sync: Vec<bool>,
    /// Registered as secondary (read-only copies in place).
    pub(super) secondary: bool,
    /// No resynchronisation attempt before this.
    pub(super) next_try: Instant,
    /// The next resynchronisation is full (`fullsync`).
    pub(super) full_next: bool,
    /// Times a secondary was lost, per directory.
    pub(super) lost: Vec<u64>,
    /// Why a copy could not be written, per directory (see
    /// [`RfsDirStatus::failure`]).
    pub(super) failure: Vec<Option<String>>,
    /// Wait before the next resynchronisation attempt: 1 s, doubled after
    /// each secondary that failed to write (up to [`MAX_RETRY`]), back to
    /// 1 s once connected.
    pub(super) retry: Duration,
}

/// The longest wait between resynchronisation attempts to a secondary that
/// keeps failing to write its copy.
pub(super) const MAX_RETRY: Duration = Duration::from_secs(60);
/// The first wait.
pub(super) const FIRST_RETRY: Duration = Duration::from_secs(1);

/// Wire name of a module's directory.
fn wire_name(module: &str, path: &str) -> String {
    format!("{module}:{path}")
}

/// The module a wire name belongs to.
pub(super) fn module_of(wire: &str) -> Option<&str> {
    wire.split_once(':').map(|(m, _)| m)
}

impl RfsRt {
    pub(super) fn new(cfg: &ModuleConfig, paths: &Paths) -> Option<Self> {
        let rfs = cfg.rfs.as_ref()?;
        let base = paths.module_state_dir(&cfg.name);
        let dirs: Vec<RfsDir> = rfs
            .dirs
            .iter()
            .map(|d| {
                let path = d.path.display().to_string();
                let tag = format!(
                    "{}-{}",
                    path.trim_matches('/').replace('/', "_"),
                    &blake3::hash(path.as_bytes()).to_hex()[..8]
                );
                RfsDir {
                    wire: wire_name(&cfg.name, &path),
                    local: paths.under_root(&d.path),
                    state: DirState::new(base.join("rfs").join(&tag)),
                    quarantine: base.join("quarantine").join(&tag),
                    read_only: d.mode == DirMode::ReadOnly,
                    path,
                }
            })
            .collect();
        let mut params = PrimaryParams::new(String::new());
        params.send_timeout = rfs.send_timeout;
        params.durability = rfs.durability;
        params.resync = ResyncOpts {
            full: false,
            workers: usize::try_from(rfs.resync_workers).unwrap_or(6),
            bandwidth: rfs.resync_bandwidth,
        };
        let n = dirs.len();
        Some(Self {
            dirs,
            params,
            async_mode: rfs.async_mode,
            primaries: Vec::new(),
            links: vec![Link::Alone; n],
            in_sync: vec![false; n],
            secondary: false,
            next_try: Instant::now(),
            full_next: false,
            lost: vec![0; n],
            failure: vec![None; n],
            retry: FIRST_RETRY,
        })
    }

    /// Everything `mount_primaries` needs, to run off the engine task.
    pub(super) fn mount_job(&self) -> (Vec<RfsDir>, PrimaryParams) {
        (self.dirs.clone(), self.params.clone())
    }

    pub(super) fn index(&self, wire: &str) -> Option<usize> {
        self.dirs.iter().position(|d| d.wire == wire)
    }

    /// Every directory's link is live.
    pub(super) fn all_connected(&self) -> bool {
        self.links.iter().all(|l| *l == Link::Connected)
    }

    /// Starts resynchronising every directory without a link to `peer`.
    pub(super) fn resync(&mut self, peer: SocketAddr, now: Instant) -> usize {
        let full = std::mem::take(&mut self.full_next);
        let mut n = 0;
        for (i, p) in self.primaries.iter().enumerate() {
            if self.links[i] == Link::Alone && p.state() == LinkState::Alone {
                p.resync(peer, full);
                self.links[i] = Link::Resyncing;
                n += 1;
            }
        }
        self.next_try = now + self.retry;
        n
    }

    /// Status of each directory, for `state -v` and metrics.
    pub(super) fn status(&self) -> Vec<RfsDirStatus> {
        self.dirs
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let p = self.primaries.get(i);
                let progress = p.map(Primary::progress).unwrap_or_default();
                let link = if self.secondary {
                    if self.in_sync[i] {
                        "in sync"
                    } else if self.failure[i].is_some() {
                        "failed"
                    } else {
                        "receiving"
                    }
                } else if p.is_none() {
                    "idle"
                } else {
                    match self.links[i] {
                        Link::Alone => "alone",
                        Link::Resyncing => "resyncing",
                        Link::Connected => "connected",
                    }
                };
                let counters = p.map(Primary::counters);
                RfsDirStatus {
                    path: d.path.clone(),
                    link: link.to_string(),
                    failure: self.failure[i].clone(),
                    resync_bytes_sent: counters.map_or(0, |c| {
                        c.resync_bytes.load(std::sync::atomic::Ordering::Relaxed)
                    }),
                    lost: self.lost[i],
                    progress: describe(&progress),
                    bytes_done: progress.bytes_done,
                    bytes_total: progress.bytes_total,
                    files_done: progress.files_done,
                    files_total: progress.files_total,
                    resync_active: progress.active,
                    #[expect(
                        clippy::cast_possible_truncation,
                        clippy::cast_sign_loss,
                        reason = "a rate, rounded"
                    )]
                    rate: progress.rate() as u64,
                    eta_secs: progress
                        .active
                        .then(|| progress.eta().map(|d| d.as_secs()))
                        .flatten(),
                }
            })
            .collect()
    }
}

#[expect(clippy::cast_precision_loss, reason = "display")]
fn mib(b: u64) -> f64 {
    b as f64 / f64::from(1u32 << 20)
}

/// `resync 12.0/40.0 MiB, 3/10 files, 20.1 MiB/s, ETA 2s` (or the last one).
fn describe(p: &Progress) -> String {
    if p.started.is_none() {
        return String::new();
    }
    let eta = p
        .eta()
        .map_or_else(|| "-".to_string(), |d| format!("{}s", d.as_secs()));
    format!(
        "{}{} {:.1}/{:.1} MiB, {}/{} files, {:.1} MiB/s{}",
        if p.active { "" } else { "last " },
        if p.full { "full resync" } else { "resync" },
        mib(p.bytes_done),
        mib(p.bytes_total.max(p.bytes_done)),
        p.files_done,
        p.files_total.max(p.files_done),
        p.rate() / f64::from(1u32 << 20),
        if p.active {
            format!(", ETA {eta}")
        } else {
            String::new()
        },
    )
}

/// Mounts the replicating filesystem over each directory (blocking: run it
/// off the engine task). Whatever the secondary role or a crashed daemon
/// left there is removed first.
pub(super) fn mount_primaries(
    dirs: &[RfsDir],
    params: &PrimaryParams,
    key: &[u8],
    registry: &Registry,
) -> Result<Vec<(Primary, tokio::sync::mpsc::UnboundedReceiver<rfs::RfsEvent>)>, String> {
    let mut out = Vec::new();
    for d in dirs {
        // As SECOND until now: its applier finishes first; a copy that
        // failed to apply what it received is never served.
        if registry.remove(&d.wire) {
            return Err(format!(
                "{}: this copy could not write what the primary sent (see the log): not starting on it",
                d.path
            ));
        }
        prepare(d)?;
        let mut p = params.clone();
        p.name.clone_from(&d.wire);
        p.journal = Some(d.state.journal());
        p.state = Some(d.state.clone());
        let started = Primary::start(&d.local, None, key, p)
            .map_err(|e| format!("{}: {}", d.path, rfs::error_chain(&e)))?;
        out.push(started);
    }
    Ok(out)
}

impl RfsDir {
    /// Where this node records the read-only bind mount it puts over the
    /// directory while SECOND.
    fn bind_record(&self) -> mounts::BindRecord {
        mounts::BindRecord(self.state.dir().join("bind-mount"))
    }
}

/// What this daemon (or a crashed one) left mounted over the directory
/// detached — never anything else mounted there; the directory and its
/// state directory created.
fn prepare(d: &RfsDir) -> Result<(), String> {
    let _ = mounts::detach_ours(&d.local, Some(&d.bind_record()), true);
    std::fs::create_dir_all(&d.local).map_err(|e| format!("create {}: {e}", d.local.display()))?;
    d.state
        .create()
        .map_err(|e| format!("create {}: {e}", d.state.dir().display()))
}

/// Unmounts the primaries (blocking).
pub(super) fn stop_primaries(primaries: Vec<Primary>, log: &crate::modlog::ModuleLog) {
    for p in primaries {
        let dir = p.dir().to_path_buf();
        if let Err(e) = p.stop() {
            log.error(&format!(
                "unmounting {}: {}",
                dir.display(),
                rfs::error_chain(&e)
            ));
        }
    }
}

/// Registers the directories with the replication listener, each under a
/// read-only bind mount for the application (blocking, milliseconds).
pub(super) fn become_secondary(
    dirs: &[RfsDir],
    async_mode: crate::config::AsyncMode,
    registry: &Registry,
) -> Result<(), String> {
    for d in dirs {
        prepare(d)?;
        let root = if d.read_only {
            mounts::bind_read_only(&d.local, &d.bind_record())
                .map_err(|e| format!("read-only bind mount over {}: {e}", d.local.display()))?
        } else {
            mounts::open_dir(&d.local).map_err(|e| format!("open {}: {e}", d.local.display()))?
        };
        registry.add(
            d.wire.clone(),
            SecondaryDir {
                local: d.local.clone(),
                root: Some(Arc::new(root)),
                async_mode,
                state: Some(d.state.clone()),
                quarantine: Some(d.quarantine.clone()),
            },
        );
    }
    Ok(())
}

/// Stops receiving and removes the read-only mounts (blocking: waits for
/// the applier to finish what it received).
pub(super) fn leave_secondary(dirs: &[RfsDir], registry: &Registry) {
    for d in dirs {
        // A failure is reported by the applier's own event.
        let _ = registry.remove(&d.wire);
        // Not a FUSE mount: this node may have become primary meanwhile.
        let _ = mounts::detach_ours(&d.local, Some(&d.bind_record()), false);
    }
}

impl RfsRt {
    pub(super) fn async_mode(&self) -> crate::config::AsyncMode {
        self.async_mode
    }
}

/// Detaches mounts a crashed daemon left over the module's directories.
pub(super) fn clean_leftovers(dirs: &[RfsDir], log: &crate::modlog::ModuleLog) {
    for d in dirs {
        let n = mounts::detach_ours(&d.local, Some(&d.bind_record()), true);
        if n > 0 {
            log.info(&format!(
                "{} mount(s) left over {} by a previous daemon detached",
                n,
                d.local.display()
            ));
        }
    }
}
