//! The primary's side of one replicated directory: sequences operations,
//! sends them, tracks acknowledgements, completes the FUSE replies waiting on
//! them, and goes ALONE (journalling) when the secondary is lost.
//!
//! Threads per connection: a sender (drains the outbox into the channel) and
//! a receiver (acks, failures, and the send-timeout check on every read
//! timeout tick). Nothing the application waits on ever blocks on the network
//! past `send_timeout`: when the oldest unacknowledged operation is older than
//! that, the receiver declares the secondary lost, shuts the socket down (which
//! unblocks a sender stuck on a full TCP buffer), journals every
//! unacknowledged operation, and completes every waiter.
//!
//! A resynchronisation ([`Replicator::resync`]) sends what the journal
//! records, round after round, and checkpoints as the secondary confirms:
//! every `CHECKPOINT_BYTES` or `CHECKPOINT_EVERY` it takes what remains
//! of the round (`Round`) and queues a barrier; once the barrier is
//! acknowledged (written and synced there), the journal is rewritten to
//! that plus what the application changed since the round began. An
//! interrupted resynchronisation, full ones included (their id is recorded
//! on both sides, [`Op::FullSync`]), resumes from the journal.

use std::{
    collections::{BTreeMap, VecDeque},
    net::SocketAddr,
    os::fd::OwnedFd,
    path::PathBuf,
    sync::{
        Arc, Condvar, Mutex, MutexGuard, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use tokio::sync::mpsc::UnboundedSender;

use super::{
    RfsError, RfsEvent,
    channel::{self, ChannelError, ChannelKey, ChannelReceiver, ChannelSender, ShutdownHandle},
    journal::{Change, DirtySet, Journal, PathChanges},
    proto::{self, Message, Op, RelPath, Seq},
    resync,
    state::{self, DirState, Side},
};

/// Whether the secondary receives the operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    /// Operations are sent and acknowledged (the module is PRIM).
    Connected,
    /// A returning secondary receives what it lacks while the application
    /// goes on: changes are journalled (the module is ALONE).
    Resyncing,
    /// No secondary: changes are journalled (the module is ALONE).
    Alone,
}

/// What the FUSE side is told once an operation is durable.
pub(crate) type Completion = Box<dyn FnOnce(Result<(), i32>) + Send>;

/// A submitted operation: the connection (epoch) and sequence number it was
/// sent with, if it was sent.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ticket(Option<(u64, Seq)>);

impl Ticket {
    /// Nothing to wait for.
    pub(crate) const DONE: Ticket = Ticket(None);
}

/// Counters, exported by the daemon as metrics.
#[derive(Debug, Default)]
pub struct Counters {
    /// Operations sent.
    pub ops_sent: AtomicU64,
    /// Bytes of written data sent.
    pub bytes_sent: AtomicU64,
    /// Highest sequence number acknowledged.
    pub acked: AtomicU64,
    /// Times the secondary was lost.
    pub lost: AtomicU64,
    /// Journal records appended while ALONE.
    pub journalled: AtomicU64,
    /// Bytes of file data sent by resynchronisations.
    pub resync_bytes: AtomicU64,
    /// Resynchronisation checkpoints: the journal rewritten to what remains
    /// once the secondary confirmed the operations before them written.
    pub checkpoints: AtomicU64,
}

/// A sent operation: sequence, when, what to journal if it is lost, size.
type Inflight = (Seq, Instant, Vec<(RelPath, Change)>, u64);

struct Shared {
    state: LinkState,
    /// Connection generation; threads of an older one exit.
    epoch: u64,
    next_seq: Seq,
    acked: Seq,
    outbox: Vec<Vec<u8>>,
    /// Sent, not yet acknowledged: sequence, when, what to journal if lost.
    inflight: VecDeque<Inflight>,
    waiters: BTreeMap<Seq, Vec<Completion>>,
    /// Bytes sent and not yet acknowledged.
    inflight_bytes: u64,
    journal: Option<Journal>,
    journal_failed: bool,
    /// While resynchronising: every change since the round's snapshot.
    fresh: DirtySet,
    /// Activity log: changes sent and not yet acknowledged (live).
    al: Option<Journal>,
    /// The synchronisation point being established (its `InSync` seq, id).
    insync: Option<(Seq, u64)>,
    /// Resynchronisation checkpoints sent: the seq of their barrier and
    /// what remained of the round once everything before it is applied.
    checkpoints: VecDeque<(Seq, DirtySet)>,
    shutdown: Option<ShutdownHandle>,
}

/// See the module documentation.
pub(crate) struct Replicator {
    dir: String,
    send_timeout: Duration,
    shared: Mutex<Shared>,
    wake: Condvar,
    /// Signalled on acknowledgements and losses (resync flow control).
    acks: Condvar,
    events: UnboundedSender<RfsEvent>,
    pub(crate) counters: Counters,
    /// Taken (shared) by the filesystem across each local change and its
    /// submission; taken exclusively by the last resynchronisation step, so
    /// that no change is half done while it switches to live replication.
    pub(crate) gate: RwLock<()>,
    /// Synchronisation point and activity log on disk.
    state: Option<DirState>,
    pub(crate) progress: Mutex<Progress>,
}

/// Where a resynchronisation is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Progress {
    /// Running.
    pub active: bool,
    /// Full (every file) rather than what changed.
    pub full: bool,
    /// Resumes a full resynchronisation that was interrupted: sends what
    /// the journal says remains of it.
    pub resumed: bool,
    /// Round (1 = the first pass).
    pub round: u32,
    /// Paths sent.
    pub files_done: u64,
    /// Paths known to send.
    pub files_total: u64,
    /// Bytes of file data sent.
    pub bytes_done: u64,
    /// Bytes of file data known to send.
    pub bytes_total: u64,
    /// Seconds since it started.
    pub elapsed: Duration,
    /// When it started (for the rate).
    #[doc(hidden)]
    pub started: Option<Instant>,
}

impl Progress {
    /// Bytes per second so far.
    #[must_use]
    #[expect(clippy::cast_precision_loss, reason = "a rate")]
    pub fn rate(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.bytes_done as f64 / secs
        } else {
            0.0
        }
    }

    /// Estimated time left.
    #[must_use]
    #[expect(clippy::cast_precision_loss, reason = "an estimate")]
    pub fn eta(&self) -> Option<Duration> {
        let rate = self.rate();
        (rate > 0.0).then(|| {
            Duration::from_secs_f64(
                (self.bytes_total.saturating_sub(self.bytes_done) as f64 / rate).min(1e9),
            )
        })
    }
}

/// How to resynchronise.
#[derive(Debug, Clone, Copy)]
pub struct ResyncOpts {
    /// Send everything, whatever the journal says.
    pub full: bool,
    /// Paths copied in parallel.
    pub workers: usize,
    /// Bytes per second, `None`: no cap.
    pub bandwidth: Option<u64>,
}

impl Default for ResyncOpts {
    fn default() -> Self {
        Self {
            full: false,
            workers: 6,
            bandwidth: None,
        }
    }
}

impl std::fmt::Debug for Replicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replicator")
            .field("dir", &self.dir)
            .field("state", &self.state())
            .finish_non_exhaustive()
    }
}

/// Whether the oldest unacknowledged operation waited too long (pure).
pub(crate) fn overdue(oldest: Option<Instant>, now: Instant, timeout: Duration) -> bool {
    oldest.is_some_and(|t| now.saturating_duration_since(t) >= timeout)
}

impl Replicator {
    pub(crate) fn new(
        dir: String,
        send_timeout: Duration,
        journal: Option<PathBuf>,
        state: Option<DirState>,
        events: UnboundedSender<RfsEvent>,
    ) -> Result<Arc<Self>, RfsError> {
        let jerr = |source| RfsError::Journal {
            dir: dir.clone(),
            source,
        };
        // A journal that is not there (any more) says nothing of what a
        // full resynchronisation left to send: it cannot be resumed.
        if journal.as_ref().is_none_or(|p| !p.exists())
            && let Some(st) = &state
        {
            let _ = st.forget_resume(Side::Sent);
        }
        let mut journal = journal
            .map(|p| Journal::open(&p))
            .transpose()
            .map_err(jerr)?;
        // An activity log left by a crash: those changes may differ between
        // the copies; the journal takes them over.
        let al = match &state {
            Some(st) => {
                let _ = st.create();
                // This copy is the primary's now: changed here, it is no
                // longer what a full resynchronisation towards it left.
                if let Err(e) = st.forget_resume(Side::Received) {
                    tracing::warn!(%dir, error = %e, "forgetting a received full resynchronisation");
                }
                let mut al = Journal::open(&st.al()).map_err(jerr)?;
                if let Some(j) = journal.as_mut()
                    && !al.dirty().is_empty()
                {
                    for (p, c) in al.dirty().to_records() {
                        j.record(&p, c).map_err(jerr)?;
                    }
                    j.sync().map_err(jerr)?;
                }
                al.reset_fast().map_err(jerr)?;
                Some(al)
            }
            None => None,
        };
        Ok(Arc::new(Self {
            dir,
            send_timeout,
            shared: Mutex::new(Shared {
                state: LinkState::Alone,
                epoch: 0,
                next_seq: 1,
                acked: 0,
                outbox: Vec::new(),
                inflight: VecDeque::new(),
                waiters: BTreeMap::new(),
                inflight_bytes: 0,
                journal,
                journal_failed: false,
                fresh: DirtySet::default(),
                al,
                insync: None,
                checkpoints: VecDeque::new(),
                shutdown: None,
            }),
            wake: Condvar::new(),
            acks: Condvar::new(),
            events,
            counters: Counters::default(),
            gate: RwLock::new(()),
            state,
            progress: Mutex::new(Progress::default()),
        }))
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        // A panic while holding the lock leaves consistent data (no partial
        // updates span a panic point); keep serving.
        self.shared
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The directory's name.
    pub(crate) fn name(&self) -> &str {
        &self.dir
    }

    /// Connected or alone.
    pub(crate) fn state(&self) -> LinkState {
        self.lock().state
    }

    /// The changes recorded while alone (empty without a journal).
    pub(crate) fn dirty(&self) -> DirtySet {
        self.lock()
            .journal
            .as_ref()
            .map(|j| j.dirty().clone())
            .unwrap_or_default()
    }

    /// Connects to the secondary, resynchronises it while the application
    /// goes on, then replicates live. Blocking: returns once the last step
    /// switched to live replication (the [`RfsEvent::Connected`] event
    /// follows the secondary's acknowledgement of the synchronisation
    /// point), or with the error that left the directory ALONE.
    #[expect(clippy::too_many_lines, reason = "the resynchronisation in order")]
    pub(crate) fn resync(
        self: &Arc<Self>,
        peer: SocketAddr,
        key: &ChannelKey,
        timeout: Duration,
        root: &OwnedFd,
        opts: ResyncOpts,
    ) -> Result<(), RfsError> {
        let chan = |source| RfsError::Channel {
            dir: self.dir.clone(),
            peer,
            source,
        };
        if self.lock().state != LinkState::Alone {
            return Err(RfsError::Busy {
                dir: self.dir.clone(),
            });
        }
        let (tx, mut rx) = channel::dial(
            peer,
            key,
            timeout,
            &Message::Hello {
                version: proto::VERSION,
                dir: self.dir.clone(),
            },
        )
        .map_err(chan)?;
        rx.set_read_timeout(Some(timeout)).map_err(chan)?;
        let (their_id, suspects, their_resume) = match rx.recv().map_err(chan)? {
            Message::Welcome {
                sync_id,
                suspects,
                resume_id,
            } => (sync_id, suspects, resume_id),
            Message::Bye { reason } => {
                return Err(RfsError::Refused {
                    dir: self.dir.clone(),
                    peer,
                    reason,
                });
            }
            other => {
                return Err(RfsError::Refused {
                    dir: self.dir.clone(),
                    peer,
                    reason: format!("unexpected {other:?}"),
                });
            }
        };
        let my_id = self.state.as_ref().map_or(0, DirState::sync_id);
        // A full resynchronisation that was interrupted: both recorded its
        // id, and the journal here holds what remains of it.
        let my_resume = self.state.as_ref().map_or(0, |st| st.resume_id(Side::Sent));
        let resumed = !opts.full && their_resume != 0 && their_resume == my_resume;
        let full = opts.full || ((their_id == 0 || their_id != my_id) && !resumed);
        let tick =
            (self.send_timeout / 4).clamp(Duration::from_millis(10), Duration::from_millis(200));
        rx.set_read_timeout(Some(tick)).map_err(chan)?;
        tx.set_write_timeout(Some(self.send_timeout.max(Duration::from_millis(100))))
            .map_err(chan)?;
        let shutdown = tx.shutdown_handle().map_err(chan)?;
        // Without a journal, the pending set lives here.
        let mut pending = DirtySet::default();
        let mut resume = None;
        let epoch = {
            let mut s = self.lock();
            if s.state != LinkState::Alone {
                return Err(RfsError::Busy {
                    dir: self.dir.clone(),
                });
            }
            for (p, c) in &suspects {
                self.journal_record(&mut s, p, *c);
                pending.record(p, *c);
            }
            let whole = full || s.journal_failed || s.journal.is_none();
            if whole {
                self.journal_record(&mut s, &RelPath::root(), Change::Tree);
                pending.record(&RelPath::root(), Change::Tree);
            }
            let journal_ok = self.journal_sync(&mut s).is_ok();
            if !journal_ok {
                s.journal_failed = false;
            }
            // A new full resynchronisation: its id, recorded once the
            // journal durably holds the whole tree (it then only shrinks
            // to what remains), sent first.
            if whole && journal_ok && s.journal.is_some() {
                resume = self.state.as_ref().and_then(|st| {
                    let id = state::new_sync_id();
                    match st.set_resume_id(Side::Sent, id) {
                        Ok(()) => Some(id),
                        Err(e) => {
                            tracing::warn!(dir = %self.dir, error = %e, "recording the full resynchronisation id");
                            None
                        }
                    }
                });
            }
            s.epoch += 1;
            s.state = LinkState::Resyncing;
            s.next_seq = 1;
            s.acked = 0;
            s.outbox.clear();
            s.inflight.clear();
            s.inflight_bytes = 0;
            s.fresh = DirtySet::default();
            s.insync = None;
            s.checkpoints.clear();
            s.shutdown = Some(shutdown);
            s.epoch
        };
        tracing::info!(dir = %self.dir, %peer, full, resumed, suspects = suspects.len(), cipher = tx.cipher().name(), "resynchronising the secondary");
        *self.progress_lock() = Progress {
            active: true,
            full,
            resumed,
            started: Some(Instant::now()),
            ..Progress::default()
        };
        let me = Arc::clone(self);
        let sender = thread::Builder::new()
            .name("rfs-send".into())
            .spawn(move || me.send_loop(epoch, tx));
        let me = Arc::clone(self);
        let receiver = thread::Builder::new()
            .name("rfs-recv".into())
            .spawn(move || me.recv_loop(epoch, rx));
        if let Err(e) = sender.and(receiver) {
            self.lose(epoch, &format!("cannot start replication threads: {e}"));
            return Err(RfsError::Thread(e));
        }
        let lost = || RfsError::ResyncLost {
            dir: self.dir.clone(),
        };
        if let Some(resume_id) = resume {
            self.submit_resync(epoch, &Op::FullSync { resume_id }, None)
                .map_err(|()| lost())?;
        }
        // Rounds: send a snapshot of what the secondary lacks while the
        // application goes on (its changes meanwhile gather in `fresh`).
        for round in 1..=MAX_ROUNDS {
            let snapshot = {
                let mut s = self.lock();
                s.fresh = DirtySet::default();
                s.checkpoints.clear();
                match &s.journal {
                    Some(j) => j.dirty().clone(),
                    None => std::mem::take(&mut pending),
                }
            };
            if round > 1 && small(&snapshot) {
                break;
            }
            self.progress_lock().round = round;
            self.send_set(epoch, root, &snapshot, opts)
                .map_err(|e| self.item_failed(epoch, e))?;
            let seq = self
                .submit_resync(
                    epoch,
                    &Op::Fsync {
                        path: RelPath::root(),
                        data_only: false,
                    },
                    None,
                )
                .map_err(|()| lost())?;
            self.wait_acked(epoch, seq).map_err(|()| lost())?;
            let mut s = self.lock();
            if s.epoch != epoch {
                return Err(lost());
            }
            let fresh = std::mem::take(&mut s.fresh);
            match s.journal.as_mut() {
                Some(j) => {
                    if let Err(e) = j.reset_to(fresh) {
                        drop(s);
                        self.lose(epoch, &format!("journal: {e}"));
                        return Err(lost());
                    }
                }
                None => pending = fresh,
            }
        }
        // Last step: no change half done, send the rest, the
        // synchronisation point, and go live — all before any later change.
        let gate = self
            .gate
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let rest = {
            let s = self.lock();
            if let Some(j) = &s.journal {
                j.dirty().clone()
            } else {
                let mut p = pending;
                p.merge(&s.fresh);
                p
            }
        };
        self.progress_lock().round += 1;
        if let Err(e) = self.send_set(epoch, root, &rest, opts) {
            drop(gate);
            return Err(self.item_failed(epoch, e));
        }
        let id = state::new_sync_id();
        self.submit_resync(epoch, &Op::InSync { sync_id: id }, None)
            .map_err(|()| lost())?;
        drop(gate);
        Ok(())
    }

    fn progress_lock(&self) -> MutexGuard<'_, Progress> {
        self.progress
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A path could not be read for the resynchronisation: the link is
    /// dropped (the journal still has everything).
    fn item_failed(&self, epoch: u64, e: resync::ItemError) -> RfsError {
        match e {
            resync::ItemError::Lost => RfsError::ResyncLost {
                dir: self.dir.clone(),
            },
            resync::ItemError::Io(source) => {
                self.lose(epoch, &format!("resynchronisation read failed: {source}"));
                RfsError::ResyncRead {
                    dir: self.dir.clone(),
                    source,
                }
            }
        }
    }

    /// Sends every path of `set`, `opts.workers` at a time, checkpointing
    /// as it goes (see [`Round`]).
    fn send_set(
        &self,
        epoch: u64,
        root: &OwnedFd,
        set: &DirtySet,
        opts: ResyncOpts,
    ) -> Result<(), resync::ItemError> {
        let items: Vec<_> = set.iter().map(|(p, c)| (p.clone(), c.clone())).collect();
        // Totals first (subtrees counted by a walk), so the rate gives a
        // meaningful ETA from the start.
        let (mut files, mut bytes) = (0u64, 0u64);
        for (path, c) in &items {
            let (p, b) = resync::count_item(root, path, c);
            files += p;
            bytes += b;
        }
        {
            let mut p = self.progress_lock();
            p.files_total += files;
            p.bytes_total += bytes;
        }
        let workers = opts.workers.clamp(1, 64).min(items.len().max(1));
        let round = Mutex::new(Round {
            next: 0,
            slots: vec![None; workers],
            since: 0,
            last: Instant::now(),
            checkpoints: self.lock().journal.is_some(),
        });
        let ctx = RoundCtx {
            repl: self,
            epoch,
            bandwidth: opts.bandwidth,
            items: &items,
            round: &round,
        };
        thread::scope(|scope| {
            let handles: Vec<_> = (0..workers)
                .map(|w| {
                    let ctx = &ctx;
                    scope.spawn(move || -> Result<(), resync::ItemError> {
                        loop {
                            let i = {
                                let mut r = lock_round(ctx.round);
                                let i = r.next;
                                if i >= ctx.items.len() {
                                    r.slots[w] = None;
                                    return Ok(());
                                }
                                r.next += 1;
                                // Started: what remains of it is here from
                                // now on (nothing sent yet: all of it).
                                r.slots[w] = Some((i, None));
                                i
                            };
                            let (path, changes) = &ctx.items[i];
                            let mut sink = WorkerSink { ctx, w, i };
                            resync::item_ops(root, path, changes, &mut sink)?;
                        }
                    })
                })
                .collect();
            let mut res = Ok(());
            for h in handles {
                let r = h.join().unwrap_or(Err(resync::ItemError::Lost));
                if res.is_ok() {
                    res = r;
                }
            }
            res
        })
    }

    /// Sends a checkpoint barrier for `remaining` (what remains of the
    /// round once everything sent so far is applied), unless too many are
    /// already waiting.
    fn submit_checkpoint(&self, epoch: u64, remaining: DirtySet) -> Result<(), ()> {
        let op = Op::Fsync {
            path: RelPath::root(),
            data_only: false,
        };
        let mut s = self.lock();
        if s.epoch != epoch || s.state != LinkState::Resyncing {
            return Err(());
        }
        if s.checkpoints.len() >= MAX_CHECKPOINTS {
            return Ok(());
        }
        let seq = Self::enqueue(&mut s, &op, Vec::new());
        s.checkpoints.push_back((seq, remaining));
        drop(s);
        self.sent(&op);
        Ok(())
    }

    /// Queues one resynchronisation operation (flow-controlled, paced by the
    /// bandwidth cap); its sequence number.
    fn submit_resync(&self, epoch: u64, op: &Op, bandwidth: Option<u64>) -> Result<Seq, ()> {
        let mut s = self.lock();
        while s.inflight_bytes >= MAX_INFLIGHT && !s.inflight.is_empty() {
            if s.epoch != epoch {
                return Err(());
            }
            s = self
                .acks
                .wait_timeout(s, Duration::from_millis(100))
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
        if s.epoch != epoch || s.state == LinkState::Alone {
            return Err(());
        }
        let seq = Self::enqueue(&mut s, op, Vec::new());
        if let Op::InSync { sync_id } = op {
            // Under the same lock as the queueing: its acknowledgement may
            // come back before this thread runs again. Live from here.
            s.insync = Some((seq, *sync_id));
            s.state = LinkState::Connected;
        }
        drop(s);
        self.sent(op);
        if let Op::Write { data, .. } = op {
            let n = data.len() as u64;
            self.counters.resync_bytes.fetch_add(n, Ordering::Relaxed);
            let (done, started) = {
                let mut p = self.progress_lock();
                p.bytes_done += n;
                if let Some(t) = p.started {
                    p.elapsed = t.elapsed();
                }
                (p.bytes_done, p.started)
            };
            if let (Some(cap), Some(t0)) = (bandwidth, started)
                && cap > 0
            {
                #[expect(clippy::cast_precision_loss, reason = "pacing")]
                let due = Duration::from_secs_f64(done as f64 / cap as f64);
                let spent = t0.elapsed();
                if due > spent {
                    thread::sleep(due.checked_sub(spent).unwrap().min(Duration::from_secs(1)));
                }
            }
        }
        Ok(seq)
    }

    /// Waits until `seq` is acknowledged; `Err` if the link is lost first.
    fn wait_acked(&self, epoch: u64, seq: Seq) -> Result<(), ()> {
        let mut s = self.lock();
        loop {
            if s.epoch != epoch {
                return Err(());
            }
            if s.acked >= seq {
                return Ok(());
            }
            s = self
                .acks
                .wait_timeout(s, Duration::from_millis(100))
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
    }

    /// Numbers, encodes and queues `op` for the sender (under the lock), with
    /// what to journal should it never be acknowledged.
    fn enqueue(s: &mut Shared, op: &Op, changes: Vec<(RelPath, Change)>) -> Seq {
        let capacity = match op {
            Op::Write { data, .. } => data.len() + 64,
            _ => 64,
        };
        Self::enqueue_with(s, capacity, changes, |buf| proto::encode_op(buf, op))
    }

    /// [`enqueue`](Self::enqueue) with the operation's encoding appended by
    /// `encode` (after the message header), into a buffer of `capacity`.
    fn enqueue_with(
        s: &mut Shared,
        capacity: usize,
        changes: Vec<(RelPath, Change)>,
        encode: impl FnOnce(&mut Vec<u8>),
    ) -> Seq {
        let seq = s.next_seq;
        s.next_seq += 1;
        let mut buf = Vec::with_capacity(capacity);
        proto::encode_op_header(&mut buf, seq);
        encode(&mut buf);
        let size = buf.len() as u64;
        s.outbox.push(buf);
        s.inflight.push_back((seq, Instant::now(), changes, size));
        s.inflight_bytes += size;
        seq
    }

    /// After queueing (lock released): wake the sender, count.
    fn sent(&self, op: &Op) {
        self.sent_bytes(match op {
            Op::Write { data, .. } => data.len() as u64,
            _ => 0,
        });
    }

    /// [`sent`](Self::sent) for an operation carrying `data` written bytes.
    fn sent_bytes(&self, data: u64) {
        self.wake.notify_all();
        self.counters.ops_sent.fetch_add(1, Ordering::Relaxed);
        if data > 0 {
            self.counters.bytes_sent.fetch_add(data, Ordering::Relaxed);
        }
    }

    /// Submits an operation already applied locally. The caller holds the
    /// [`Replicator::gate`] (shared) and its own ordering lock across the
    /// local apply and this call, so sequence order is the local order.
    /// `changes` is what to journal should the secondary be (or become)
    /// absent; empty for barriers.
    pub(crate) fn submit(&self, op: &Op, changes: Vec<(RelPath, Change)>) -> Ticket {
        let (capacity, data) = match op {
            Op::Write { data, .. } => (data.len() + 64, data.len() as u64),
            _ => (64, 0),
        };
        self.submit_with(changes, capacity, data, |buf| proto::encode_op(buf, op))
    }

    /// [`submit`](Self::submit) of an [`Op::Write`] from its borrowed parts:
    /// the data is copied once, into the message.
    pub(crate) fn submit_write(
        &self,
        path: &RelPath,
        offset: u64,
        data: &[u8],
        mtime: proto::Timestamp,
    ) -> Ticket {
        let end = offset + data.len() as u64;
        self.submit_with(
            vec![(path.clone(), Change::Range { start: offset, end })],
            data.len() + 64 + path.as_bytes().len(),
            data.len() as u64,
            |buf| proto::encode_write(buf, path, offset, data, mtime),
        )
    }

    /// What [`submit`](Self::submit) does, the operation given by its
    /// encoder (`capacity`: its encoded size, about; `data`: bytes written).
    fn submit_with(
        &self,
        changes: Vec<(RelPath, Change)>,
        capacity: usize,
        data: u64,
        encode: impl FnOnce(&mut Vec<u8>),
    ) -> Ticket {
        let mut s = self.lock();
        match s.state {
            LinkState::Connected => {
                if let Some(al) = s.al.as_mut() {
                    for (p, c) in &changes {
                        let _ = al.record(p, *c);
                    }
                }
                let epoch = s.epoch;
                let seq = Self::enqueue_with(&mut s, capacity, changes, encode);
                drop(s);
                self.sent_bytes(data);
                Ticket(Some((epoch, seq)))
            }
            LinkState::Resyncing => {
                for (path, change) in changes {
                    s.fresh.record(&path, change);
                    self.journal_record(&mut s, &path, change);
                }
                Ticket(None)
            }
            LinkState::Alone => {
                for (path, change) in changes {
                    self.journal_record(&mut s, &path, change);
                }
                Ticket(None)
            }
        }
    }

    fn journal_record(&self, s: &mut Shared, path: &RelPath, change: Change) {
        if let Some(j) = s.journal.as_mut() {
            match j.record(path, change) {
                Ok(()) => {
                    self.counters.journalled.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => self.journal_failed(s, &e),
            }
        }
    }

    /// The journal could not be written: it may lack changes, so neither a
    /// delta nor a resumed full resynchronisation may rely on it.
    fn journal_failed(&self, s: &mut Shared, e: &super::journal::JournalError) {
        s.journal_failed = true;
        if let Some(st) = &self.state {
            let _ = st.forget_resume(Side::Sent);
        }
        let _ = self.events.send(RfsEvent::JournalFailed {
            dir: self.dir.clone(),
            error: e.to_string(),
        });
    }

    /// Applies the newest checkpoint whose barrier `acked` covers: the
    /// secondary wrote (and synced) everything before it, so the journal
    /// becomes what remained of the round then, plus every change made
    /// since the round began.
    fn checkpoint(&self, s: &mut Shared, acked: Seq) {
        let mut ready = None;
        while s.checkpoints.front().is_some_and(|c| c.0 <= acked) {
            ready = s.checkpoints.pop_front().map(|c| c.1);
        }
        let Some(mut set) = ready else { return };
        if s.state != LinkState::Resyncing || s.journal_failed {
            return;
        }
        set.merge(&s.fresh);
        if let Some(j) = s.journal.as_mut() {
            match j.reset_to(set) {
                Ok(()) => {
                    self.counters.checkpoints.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => self.journal_failed(s, &e),
            }
        }
    }

    /// Makes the journal durable; `Err(EIO)` if it could not be written.
    fn journal_sync(&self, s: &mut Shared) -> Result<(), i32> {
        if let Some(j) = s.journal.as_mut()
            && let Err(e) = j.sync()
        {
            self.journal_failed(s, &e);
        }
        if s.journal_failed {
            Err(libc::EIO)
        } else {
            Ok(())
        }
    }

    /// Waits while the live queue (sent, not yet acknowledged) is full:
    /// back-pressure on the application rather than a queue without bound.
    /// Called before a change is applied, outside the filesystem's lock. A
    /// secondary that stops acknowledging is declared lost after
    /// `send_timeout` (the receiver thread), which ends the wait.
    pub(crate) fn admit(&self) {
        let mut s = self.lock();
        while s.state == LinkState::Connected && queue_full(s.inflight_bytes, s.inflight.len()) {
            s = self
                .acks
                .wait_timeout(s, Duration::from_millis(100))
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
    }

    /// Runs `done` once the operation is queued for the secondary (now), or,
    /// if the secondary is absent, once journalled on disk: what a change
    /// that is not a durability point waits for.
    pub(crate) fn when_queued(&self, ticket: Ticket, done: Completion) {
        let mut s = self.lock();
        let res = match ticket.0 {
            // Sent on the current connection: lost or not, it is in the
            // order of operations (journalled if the connection is lost).
            Some((epoch, _)) if epoch == s.epoch => Ok(()),
            _ => self.journal_sync(&mut s),
        };
        drop(s);
        done(res);
    }

    /// Runs `done` once the operation is durable: acknowledged by the
    /// secondary, or journalled on disk if the secondary is absent.
    pub(crate) fn when_durable(&self, ticket: Ticket, done: Completion) {
        let mut s = self.lock();
        let res = match ticket.0 {
            // Same connection, not yet acknowledged: wait for it.
            Some((epoch, seq))
                if epoch == s.epoch && s.state == LinkState::Connected && seq > s.acked =>
            {
                s.waiters.entry(seq).or_default().push(done);
                return;
            }
            Some((epoch, seq)) if epoch == s.epoch && seq <= s.acked => Ok(()),
            // Alone (from the start or since), or sent on a connection lost
            // since (its changes were journalled then): the journal has it.
            _ => self.journal_sync(&mut s),
        };
        drop(s);
        done(res);
    }

    fn send_loop(self: Arc<Self>, epoch: u64, mut tx: ChannelSender) {
        loop {
            let batch = {
                let mut s = self.lock();
                loop {
                    if s.epoch != epoch || s.state == LinkState::Alone {
                        return;
                    }
                    if !s.outbox.is_empty() {
                        break std::mem::take(&mut s.outbox);
                    }
                    s = self
                        .wake
                        .wait(s)
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                }
            };
            for m in &batch {
                tx.queue_encoded(m);
                if tx.pending() >= 1 << 20
                    && let Err(e) = tx.flush()
                {
                    self.lose(epoch, &format!("send failed: {e}"));
                    return;
                }
            }
            if let Err(e) = tx.flush() {
                self.lose(epoch, &format!("send failed: {e}"));
                return;
            }
        }
    }

    fn recv_loop(self: Arc<Self>, epoch: u64, mut rx: ChannelReceiver) {
        loop {
            if self.lock().epoch != epoch {
                return;
            }
            match rx.recv() {
                Ok(Message::Ack { seq }) => self.acked(epoch, seq),
                Ok(Message::Failed { seq, errno, detail }) => {
                    let _ = self.events.send(RfsEvent::SecondaryFailed {
                        dir: self.dir.clone(),
                        seq,
                        errno,
                        detail: detail.clone(),
                    });
                    // The copies diverge where we cannot tell: resync all.
                    {
                        let mut s = self.lock();
                        if s.epoch == epoch {
                            self.journal_record(&mut s, &RelPath::root(), Change::Tree);
                        }
                    }
                    self.lose(
                        epoch,
                        &format!("secondary failed to apply #{seq}: {detail}"),
                    );
                    return;
                }
                Ok(Message::Bye { reason }) => {
                    self.lose(epoch, &format!("secondary closed: {reason}"));
                    return;
                }
                Ok(other) => {
                    self.lose(epoch, &format!("unexpected message {other:?}"));
                    return;
                }
                Err(ChannelError::Timeout) => {
                    let oldest = self.lock().inflight.front().map(|f| f.1);
                    if overdue(oldest, Instant::now(), self.send_timeout) {
                        self.lose(
                            epoch,
                            &format!(
                                "no acknowledgement within the send timeout ({:?})",
                                self.send_timeout
                            ),
                        );
                        return;
                    }
                }
                Err(e) => {
                    self.lose(epoch, &e.to_string());
                    return;
                }
            }
        }
    }

    fn acked(&self, epoch: u64, seq: Seq) {
        let mut synced = None;
        let done: Vec<Completion> = {
            let mut s = self.lock();
            if s.epoch != epoch || seq <= s.acked {
                return;
            }
            s.acked = seq;
            while s.inflight.front().is_some_and(|f| f.0 <= seq) {
                if let Some(f) = s.inflight.pop_front() {
                    s.inflight_bytes = s.inflight_bytes.saturating_sub(f.3);
                }
            }
            self.checkpoint(&mut s, seq);
            if let Some((at, id)) = s.insync
                && seq >= at
            {
                // The secondary holds the synchronisation point: the journal
                // is obsolete, the point is ours too.
                s.insync = None;
                if let Some(j) = s.journal.as_mut()
                    && let Err(e) = j.clear()
                {
                    tracing::warn!(dir = %self.dir, error = %e, "clearing the journal");
                }
                if let Some(st) = &self.state {
                    if let Err(e) = st.set_sync_id(id) {
                        tracing::warn!(dir = %self.dir, error = %e, "recording the synchronisation point");
                    }
                    for side in [Side::Sent, Side::Received] {
                        if let Err(e) = st.forget_resume(side) {
                            tracing::warn!(dir = %self.dir, error = %e, "forgetting the full resynchronisation id");
                        }
                    }
                }
                synced = Some(());
            }
            if s.inflight.is_empty()
                && let Some(al) = s.al.as_mut()
                && al.records() > 256
            {
                let _ = al.reset_fast();
            }
            let rest = s.waiters.split_off(&(seq + 1));
            let ready = std::mem::replace(&mut s.waiters, rest);
            ready.into_values().flatten().collect()
        };
        self.acks.notify_all();
        self.counters.acked.store(seq, Ordering::Relaxed);
        if synced.is_some() {
            self.progress_lock().active = false;
            tracing::info!(dir = %self.dir, "secondary in sync: live replication");
            let _ = self.events.send(RfsEvent::Connected {
                dir: self.dir.clone(),
            });
        }
        for d in done {
            d(Ok(()));
        }
    }

    /// The secondary is gone: journal what it may lack, release every waiter,
    /// go ALONE (once per connection).
    pub(crate) fn lose(&self, epoch: u64, reason: &str) {
        let (done, res) = {
            let mut s = self.lock();
            if s.epoch != epoch || s.state == LinkState::Alone {
                return;
            }
            s.state = LinkState::Alone;
            s.epoch += 1;
            s.insync = None;
            s.checkpoints.clear();
            s.inflight_bytes = 0;
            if let Some(h) = s.shutdown.take() {
                h.shutdown();
            }
            s.outbox.clear();
            let inflight = std::mem::take(&mut s.inflight);
            for (_, _, changes, _) in inflight {
                for (path, change) in changes {
                    self.journal_record(&mut s, &path, change);
                }
            }
            let res = self.journal_sync(&mut s);
            let done: Vec<Completion> = std::mem::take(&mut s.waiters)
                .into_values()
                .flatten()
                .collect();
            (done, res)
        };
        self.wake.notify_all();
        self.acks.notify_all();
        self.progress_lock().active = false;
        self.counters.lost.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(dir = %self.dir, %reason, "secondary lost; going alone");
        let _ = self.events.send(RfsEvent::SecondaryLost {
            dir: self.dir.clone(),
            reason: reason.to_string(),
        });
        for d in done {
            d(res);
        }
    }

    /// Stops replicating (orderly): goes ALONE without an event.
    pub(crate) fn disconnect(&self) {
        let mut s = self.lock();
        if s.state != LinkState::Alone {
            s.state = LinkState::Alone;
            s.epoch += 1;
            s.insync = None;
            s.checkpoints.clear();
            // What was in flight may be missing there.
            let inflight = std::mem::take(&mut s.inflight);
            for (_, _, changes, _) in inflight {
                for (path, change) in changes {
                    self.journal_record(&mut s, &path, change);
                }
            }
            let _ = self.journal_sync(&mut s);
            if let Some(h) = s.shutdown.take() {
                h.shutdown();
            }
        }
        let done: Vec<Completion> = std::mem::take(&mut s.waiters)
            .into_values()
            .flatten()
            .collect();
        drop(s);
        self.wake.notify_all();
        self.acks.notify_all();
        for d in done {
            d(Ok(()));
        }
    }
}

/// Live operations sent and not yet acknowledged, in bytes and in number,
/// past which the application waits ([`Replicator::admit`]).
const MAX_QUEUED_BYTES: u64 = 16 << 20;
const MAX_QUEUED_OPS: usize = 1 << 16;

/// Whether the live queue is full (pure).
fn queue_full(bytes: u64, ops: usize) -> bool {
    bytes >= MAX_QUEUED_BYTES || ops >= MAX_QUEUED_OPS
}

/// At most this many rounds before the last step.
const MAX_ROUNDS: u32 = 8;
/// Resynchronisation bytes in flight before the sender waits for acks.
const MAX_INFLIGHT: u64 = 8 << 20;

/// A checkpoint at least every this many bytes of resynchronisation sent
/// (and every [`CHECKPOINT_EVERY`]): what an interruption sends again is at
/// most this plus what is in flight ([`MAX_INFLIGHT`]).
const CHECKPOINT_BYTES: u64 = 4 << 20;
/// A checkpoint at least this often while the resynchronisation sends.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);
/// Checkpoints waiting for their barrier's acknowledgement, at most.
const MAX_CHECKPOINTS: usize = 16;

/// Small enough to send in the last step, with the application paused.
fn small(set: &DirtySet) -> bool {
    set.len() <= 256
        && set.range_bytes() <= 16 << 20
        && !set.iter().any(|(_, c)| c.tree || c.after.is_some())
}

/// One round of a resynchronisation as the checkpoints see it: the items
/// (the round's snapshot, in path order) are taken in order by the
/// workers; each worker's slot holds the item it is on and what remains of
/// it once what it sent is applied (`None`: all of it).
///
/// A checkpoint takes, under this lock, what remains of the round — the
/// items not yet taken, and each slot's — and only then queues its barrier
/// (an `Fsync` of the root: the secondary syncs its filesystem), so every
/// operation that what it took reflects precedes the barrier. Once the
/// barrier is acknowledged, the journal becomes that, plus every change
/// made since the round began (`Replicator::checkpoint`).
/// An item a worker is on, and what remains of it (`None`: all of it).
type Slot = (usize, Option<Vec<(RelPath, Change)>>);

struct Round {
    next: usize,
    slots: Vec<Option<Slot>>,
    /// Bytes sent since the last checkpoint, and when it was.
    since: u64,
    last: Instant,
    /// Whether there is a journal to checkpoint.
    checkpoints: bool,
}

impl Round {
    /// What remains of the round once everything sent so far is applied.
    fn remaining(&self, items: &[(RelPath, PathChanges)]) -> DirtySet {
        let mut set = DirtySet::default();
        for (p, c) in items.iter().skip(self.next) {
            set.insert_changes(p.clone(), c.clone());
        }
        for (i, rest) in self.slots.iter().flatten() {
            match rest {
                None => {
                    if let Some((p, c)) = items.get(*i) {
                        set.insert_changes(p.clone(), c.clone());
                    }
                }
                Some(records) => {
                    for (p, c) in records {
                        set.record(p, *c);
                    }
                }
            }
        }
        set
    }
}

fn lock_round(r: &Mutex<Round>) -> MutexGuard<'_, Round> {
    r.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What the workers of a round share.
struct RoundCtx<'a> {
    repl: &'a Replicator,
    epoch: u64,
    bandwidth: Option<u64>,
    items: &'a [(RelPath, PathChanges)],
    round: &'a Mutex<Round>,
}

/// Where one worker's item goes: the operations to the secondary, what
/// remains of the item to its slot, and a checkpoint when one is due.
struct WorkerSink<'a> {
    ctx: &'a RoundCtx<'a>,
    w: usize,
    i: usize,
}

impl resync::Sink for WorkerSink<'_> {
    fn op(&mut self, op: Op) -> Result<(), resync::ItemError> {
        let size = match &op {
            Op::Write { data, .. } => data.len() as u64 + 64,
            _ => 64,
        };
        self.ctx
            .repl
            .submit_resync(self.ctx.epoch, &op, self.ctx.bandwidth)
            .map_err(|()| resync::ItemError::Lost)?;
        lock_round(self.ctx.round).since += size;
        Ok(())
    }

    fn remaining(&mut self, records: Vec<(RelPath, Change)>) {
        let due = {
            let mut r = lock_round(self.ctx.round);
            r.slots[self.w] = Some((self.i, Some(records)));
            if r.checkpoints
                && (r.since >= CHECKPOINT_BYTES || r.last.elapsed() >= CHECKPOINT_EVERY)
            {
                r.since = 0;
                r.last = Instant::now();
                Some(r.remaining(self.ctx.items))
            } else {
                None
            }
        };
        if let Some(set) = due {
            // Lost meanwhile: the next operation says so.
            let _ = self.ctx.repl.submit_checkpoint(self.ctx.epoch, set);
        }
    }

    fn path_done(&mut self) {
        self.ctx.repl.progress_lock().files_done += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_live_queue_is_bounded_in_bytes_and_operations() {
        assert!(!queue_full(0, 0));
        assert!(!queue_full(MAX_QUEUED_BYTES - 1, MAX_QUEUED_OPS - 1));
        assert!(queue_full(MAX_QUEUED_BYTES, 1));
        assert!(queue_full(64, MAX_QUEUED_OPS));
    }

    #[test]
    fn overdue_only_past_the_timeout() {
        let t0 = Instant::now();
        let to = Duration::from_millis(100);
        assert!(!overdue(None, t0 + to * 10, to));
        assert!(!overdue(Some(t0), t0 + to / 2, to));
        assert!(overdue(Some(t0), t0 + to, to));
        // A clock that went backwards never fires.
        assert!(!overdue(Some(t0 + to), t0, to));
    }
}
