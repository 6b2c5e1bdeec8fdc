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

use std::{
    collections::{BTreeMap, VecDeque},
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    sync::{
        Arc, Condvar, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use tokio::sync::mpsc::UnboundedSender;

use super::{
    RfsError, RfsEvent,
    channel::{self, ChannelError, ChannelKey, ChannelReceiver, ChannelSender, ShutdownHandle},
    journal::{Change, Journal},
    proto::{self, Message, Op, RelPath, Seq},
};

/// Whether the secondary receives the operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    /// Operations are sent and acknowledged (the module is PRIM).
    Connected,
    /// No secondary: changes are journalled (the module is ALONE).
    Alone,
}

/// What the FUSE side is told once an operation is durable.
pub(crate) type Completion = Box<dyn FnOnce(Result<(), i32>) + Send>;

/// A submitted operation: its sequence number when it was sent.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ticket(Option<Seq>);

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
}

/// A sent operation: sequence, when, what to journal if it is lost.
type Inflight = (Seq, Instant, Vec<(RelPath, Change)>);

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
    journal: Option<Journal>,
    journal_failed: bool,
    shutdown: Option<ShutdownHandle>,
}

/// See the module documentation.
pub(crate) struct Replicator {
    dir: String,
    send_timeout: Duration,
    shared: Mutex<Shared>,
    wake: Condvar,
    events: UnboundedSender<RfsEvent>,
    pub(crate) counters: Counters,
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
        events: UnboundedSender<RfsEvent>,
    ) -> Result<Arc<Self>, RfsError> {
        let journal = journal
            .map(|p| Journal::open(&p))
            .transpose()
            .map_err(|source| RfsError::Journal {
                dir: dir.clone(),
                source,
            })?;
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
                journal,
                journal_failed: false,
                shutdown: None,
            }),
            wake: Condvar::new(),
            events,
            counters: Counters::default(),
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

    /// Whether the journal holds changes the secondary lacks.
    pub(crate) fn journal_dirty(&self) -> bool {
        self.lock()
            .journal
            .as_ref()
            .is_some_and(|j| !j.dirty().is_empty())
    }

    /// The changes recorded while alone (empty without a journal).
    pub(crate) fn dirty(&self) -> super::journal::DirtySet {
        self.lock()
            .journal
            .as_ref()
            .map(|j| j.dirty().clone())
            .unwrap_or_default()
    }

    /// Connects to the secondary and starts replicating (from ALONE).
    pub(crate) fn connect(
        self: &Arc<Self>,
        peer: SocketAddr,
        key: &ChannelKey,
        timeout: Duration,
    ) -> Result<(), RfsError> {
        let chan = |source| RfsError::Channel {
            dir: self.dir.clone(),
            peer,
            source,
        };
        let stream = TcpStream::connect_timeout(&peer, timeout).map_err(|source| {
            chan(ChannelError::Io {
                op: "connect",
                source,
            })
        })?;
        let (mut tx, mut rx) = channel::connect(stream, key, timeout).map_err(chan)?;
        tx.send(&Message::Hello {
            version: proto::VERSION,
            dir: self.dir.clone(),
        })
        .map_err(chan)?;
        rx.set_read_timeout(Some(timeout)).map_err(chan)?;
        match rx.recv().map_err(chan)? {
            Message::Welcome => {}
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
        }
        let tick =
            (self.send_timeout / 4).clamp(Duration::from_millis(10), Duration::from_millis(200));
        rx.set_read_timeout(Some(tick)).map_err(chan)?;
        tx.set_write_timeout(Some(self.send_timeout.max(Duration::from_millis(100))))
            .map_err(chan)?;
        let shutdown = tx.shutdown_handle().map_err(chan)?;
        let epoch = {
            let mut s = self.lock();
            s.epoch += 1;
            s.state = LinkState::Connected;
            s.next_seq = 1;
            s.acked = 0;
            s.outbox.clear();
            s.inflight.clear();
            s.shutdown = Some(shutdown);
            s.epoch
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
        let _ = self.events.send(RfsEvent::Connected {
            dir: self.dir.clone(),
            peer,
        });
        Ok(())
    }

    /// Submits an operation already applied locally. The caller holds its
    /// own ordering lock across the local apply and this call, so sequence
    /// order is the local order. `change` is what to journal should the
    /// secondary be (or become) absent; empty for barriers.
    pub(crate) fn submit(&self, op: &Op, changes: Vec<(RelPath, Change)>) -> Ticket {
        let mut s = self.lock();
        match s.state {
            LinkState::Connected => {
                let seq = s.next_seq;
                s.next_seq += 1;
                let mut buf = Vec::with_capacity(match op {
                    Op::Write { data, .. } => data.len() + 64,
                    _ => 64,
                });
                proto::encode(
                    &mut buf,
                    &Message::Op {
                        seq,
                        op: op.clone(),
                    },
                );
                s.outbox.push(buf);
                s.inflight.push_back((seq, Instant::now(), changes));
                drop(s);
                self.wake.notify_all();
                self.counters.ops_sent.fetch_add(1, Ordering::Relaxed);
                if let Op::Write { data, .. } = op {
                    self.counters
                        .bytes_sent
                        .fetch_add(data.len() as u64, Ordering::Relaxed);
                }
                Ticket(Some(seq))
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
                Err(e) => {
                    s.journal_failed = true;
                    let _ = self.events.send(RfsEvent::JournalFailed {
                        dir: self.dir.clone(),
                        error: e.to_string(),
                    });
                }
            }
        }
    }

    /// Makes the journal durable; `Err(EIO)` if it could not be written.
    fn journal_sync(&self, s: &mut Shared) -> Result<(), i32> {
        if let Some(j) = s.journal.as_mut()
            && let Err(e) = j.sync()
        {
            s.journal_failed = true;
            let _ = self.events.send(RfsEvent::JournalFailed {
                dir: self.dir.clone(),
                error: e.to_string(),
            });
        }
        if s.journal_failed {
            Err(libc::EIO)
        } else {
            Ok(())
        }
    }

    /// Runs `done` once the operation is durable: acknowledged by the
    /// secondary, or journalled on disk if the secondary is absent.
    pub(crate) fn when_durable(&self, ticket: Ticket, done: Completion) {
        let mut s = self.lock();
        let res = match ticket.0 {
            Some(seq) if s.state == LinkState::Connected && seq > s.acked => {
                s.waiters.entry(seq).or_default().push(done);
                return;
            }
            Some(seq) if seq <= s.acked => Ok(()),
            // Alone (from the start or since): the change is in the journal.
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
                    if s.epoch != epoch || s.state != LinkState::Connected {
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
        let done: Vec<Completion> = {
            let mut s = self.lock();
            if s.epoch != epoch || seq <= s.acked {
                return;
            }
            s.acked = seq;
            while s.inflight.front().is_some_and(|f| f.0 <= seq) {
                s.inflight.pop_front();
            }
            let rest = s.waiters.split_off(&(seq + 1));
            let ready = std::mem::replace(&mut s.waiters, rest);
            ready.into_values().flatten().collect()
        };
        self.counters.acked.store(seq, Ordering::Relaxed);
        for d in done {
            d(Ok(()));
        }
    }

    /// The secondary is gone: journal what it may lack, release every waiter,
    /// go ALONE (once per connection).
    pub(crate) fn lose(&self, epoch: u64, reason: &str) {
        let (done, res) = {
            let mut s = self.lock();
            if s.epoch != epoch || s.state != LinkState::Connected {
                return;
            }
            s.state = LinkState::Alone;
            s.epoch += 1;
            if let Some(h) = s.shutdown.take() {
                h.shutdown();
            }
            s.outbox.clear();
            let inflight = std::mem::take(&mut s.inflight);
            for (_, _, changes) in inflight {
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
        if s.state == LinkState::Connected {
            s.state = LinkState::Alone;
            s.epoch += 1;
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
        for d in done {
            d(Ok(()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
