//! The mirror module's decisions as a pure state machine (no sockets, no
//! clock reads): the engine feeds it commands, the peer's heartbeat views,
//! effect completions and time, and executes the actions it emits in order
//! (persist first).
//!
//! Data safety rests on the persisted [`Persisted`] record, modelled on
//! DRBD's generation identifiers:
//! - `generation` moves ahead each time this node becomes primary without
//!   its peer (ALONE): from then on the peer's copy is known stale;
//! - `uptodate` is true while this node's data is the reference (it was
//!   primary), false from the moment it becomes SECOND — a secondary that
//!   restarts cannot know whether its primary went on without it;
//! - `took_over` marks a primary that got there by failover (for split
//!   brain resolution: the former primary keeps its role);
//! - `peer_may_have_taken_over`: `uptodate` alone is not enough for a
//!   primary. One whose peer could become primary without it — a secondary
//!   in sync, or a peer waiting with up-to-date data — cannot know, after a
//!   restart, whether the peer did so (and wrote) while it was down or
//!   stopped. It persists the risk as soon as it exists, before the peer
//!   can act on it, and keeps it until the peer shows it no longer can
//!   (restarted or stopped without up-to-date data, or lost for the
//!   timeout); a generation bump alone does not clear it (a secondary that
//!   has not heard it yet still believes itself in sync). See
//!   `track_takeover_risk`.
//!
//! Rules: a node starts in WAIT. A peer PRIM/ALONE makes it SECOND. Both
//! starting: the up-to-date node with the higher generation becomes primary,
//! then `defaultprim`. Peer silent for the heartbeat timeout: ALONE only
//! when up to date and no peer may have taken over (after the witness
//! answered, if configured), else WAIT (red) for the peer or an operator's
//! `prim`. Peer stopped: ALONE only when up to date and the peer's data is
//! not newer — its heartbeat shows it did not go on without us. A node that
//! is not primary and hears newer data than its own records its copy as
//! outdated. Never the application on stale data. A SECOND losing its
//! primary takes over (unless `failover = false`) only when in sync.
//!
//! A `wait` checker down ([`MirrorCore::wait_checker`]) holds the node in
//! WAIT: a primary stops its application (handing over to a secondary in
//! sync, as `swap` does), a SECOND stops following; no automatic decision
//! and no `prim`/`second` until every such checker is up again.
//!
//! Both restarted after a crash at PRIM/SECOND, they come up by themselves
//! once they hear each other: the former primary is up to date, the
//! former secondary is not (whether it was in sync or not), so the former
//! primary wins — unless the secondary took over meanwhile (a higher
//! generation, or the same one having taken over from a primary that went
//! ALONE unheard, see `compare_data`).
//!
//! Without replicated directories a SECOND is in sync once it heard its
//! primary PRIM (within a heartbeat): the primary then counts it, and has
//! recorded that it may take over. A SECOND its primary never counted
//! WAITs if that primary vanishes. In sync, it takes the primary's
//! generation, as with replication below.
//!
//! With replicated directories ([`Params::replicated`]) a SECOND is not in
//! sync as soon as it follows the primary: the replication layer first
//! resynchronises it and reports completion with
//! [`MirrorCore::replication_synced`] on both nodes (primary first), a
//! broken link with [`MirrorCore::replication_lost`]. The `synced` flag
//! ([`View::synced`]) then decides:
//! - a primary is PRIM only while its link is synced and the peer's view is
//!   a SECOND in sync; otherwise ALONE. Each time a primary's link stops
//!   being synced its generation moves ahead, as when it loses its
//!   secondary: from then on it writes without the peer;
//! - a SECOND's copy is in sync from `replication_synced` until its primary
//!   shows a generation above the one this node holds without a live link:
//!   it wrote without us (ALONE, or WAIT/STOP since). A primary that stops
//!   cleanly (WAIT, STOP at our generation) leaves it in sync. While in sync
//!   it takes the primary's generation, so that its takeover (generation +
//!   1) ends above it;
//! - a SECOND whose primary is gone takes over only when in sync, else it
//!   WAITs: never the application on a copy that was not resynchronised.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Why a node whose peer may have taken over waits (in its log line).
const PEER_MAY_BE_NEWER: &str = "peer may hold newer data";

/// States of a mirror module.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MState {
    Stop,
    Wait,
    Alone,
    Prim,
    Second,
}

/// What a node persists across restarts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[expect(
    clippy::struct_excessive_bools,
    reason = "independent facts of the record, each its own JSON field"
)]
pub(crate) struct Persisted {
    pub(crate) generation: u64,
    pub(crate) uptodate: bool,
    pub(crate) took_over: bool,
    /// Was primary when it last ran (for `defaultprim = "lastprim"`).
    pub(crate) was_primary: bool,
    /// This node is (or was) primary while its peer could become primary
    /// without it (a secondary in sync, a peer waiting with up-to-date
    /// data), and has not learnt since that it no longer can: after a
    /// restart its data is up to date only against a peer whose heartbeat
    /// shows it did not go on without it (see the module doc). Absent
    /// (false) in records written before it existed.
    #[serde(default)]
    pub(crate) peer_may_have_taken_over: bool,
}

impl Default for Persisted {
    /// A node that never ran: empty data, consistent with an empty peer.
    fn default() -> Self {
        Self {
            generation: 0,
            uptodate: true,
            took_over: false,
            was_primary: false,
            peer_may_have_taken_over: false,
        }
    }
}

/// What a node advertises in its heartbeats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[expect(
    clippy::struct_excessive_bools,
    reason = "independent flags, sent as one byte"
)]
pub(crate) struct View {
    pub(crate) state: MState,
    pub(crate) generation: u64,
    pub(crate) uptodate: bool,
    pub(crate) took_over: bool,
    pub(crate) was_primary: bool,
    /// Primary handing over (swap): the peer should take over.
    pub(crate) handoff: bool,
    /// The sender currently hears its peer: it will not take over by
    /// timeout, so the peer may decide to be primary.
    pub(crate) hears_peer: bool,
    /// On a SECOND: its copy is in sync and it receives every write. On a
    /// primary (PRIM/ALONE): its replication link to the secondary is in
    /// sync and live. False in other states. Flag bit 5.
    pub(crate) synced: bool,
    /// [`Persisted::peer_may_have_taken_over`] of the sender. Flag bit 6.
    pub(crate) peer_may_have_taken_over: bool,
}

impl View {
    /// Heartbeat payload: generation (8 bytes BE) then flags.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut v = self.generation.to_be_bytes().to_vec();
        v.push(
            u8::from(self.uptodate)
                | u8::from(self.took_over) << 1
                | u8::from(self.was_primary) << 2
                | u8::from(self.handoff) << 3
                | u8::from(self.hears_peer) << 4
                | u8::from(self.synced) << 5
                | u8::from(self.peer_may_have_taken_over) << 6,
        );
        v
    }

    /// Parses a payload (`None` if malformed).
    pub(crate) fn decode(state: MState, p: &[u8]) -> Option<Self> {
        let g: [u8; 8] = p.get(..8)?.try_into().ok()?;
        let f = *p.get(8)?;
        Some(Self {
            state,
            generation: u64::from_be_bytes(g),
            uptodate: f & 1 != 0,
            took_over: f & 2 != 0,
            was_primary: f & 4 != 0,
            handoff: f & 8 != 0,
            hears_peer: f & 16 != 0,
            synced: f & 32 != 0,
            peer_may_have_taken_over: f & 64 != 0,
        })
    }
}

/// Who stays primary when both are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Keep {
    FormerPrim,
    Node(String),
}

/// Who is preferred when both start equal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Prefer {
    None,
    Node(String),
    LastPrim,
}

/// How a node that lost its peer learns whether it may go on without it
/// (`[check.splitbrain]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Witness {
    /// No check: ALONE (up to date) after the heartbeat timeout.
    None,
    /// Pinged witnesses (SafeKit-compatible): reachable means go on, so
    /// both nodes go primary when both reach it.
    Ping,
    /// `safekit witness` daemons: go on only with their grant for the
    /// generation this node would write (see `crate::witness`), which at
    /// most one node gets.
    Arbiter,
}

/// The peer, as seen in `v`, could become primary without this node: a
/// secondary in sync, or a node waiting with up-to-date data and no record
/// that this node may have taken over.
fn could_take_over(v: &View) -> bool {
    match v.state {
        MState::Second => v.synced,
        MState::Wait | MState::Stop => v.uptodate && !v.peer_may_have_taken_over,
        MState::Prim | MState::Alone => false,
    }
}

/// Fixed parameters.
#[derive(Debug, Clone)]
pub(crate) struct Params {
    pub(crate) me: String,
    pub(crate) peer: String,
    pub(crate) timeout: Duration,
    pub(crate) failover: bool,
    pub(crate) prefer: Prefer,
    pub(crate) keep: Keep,
    pub(crate) witness: Witness,
    /// After the witness answered, a secondary waits this long before it
    /// takes over, so that a primary cut from the witness (or refused by
    /// the arbiter) has stopped its application first (its own witness
    /// check times out within it). With an arbiter it also covers the
    /// primary's heartbeat timeout: a primary that heard the secondary last
    /// just before the secondary lost it detects the loss a timeout later.
    pub(crate) witness_grace: Duration,
    /// The module has replicated directories (`[rfs]`): a SECOND is in sync
    /// only once resynchronised ([`MirrorCore::replication_synced`]) and a
    /// primary is PRIM only while its replication link is synced. Without
    /// them a SECOND is in sync as soon as it follows the primary.
    pub(crate) replicated: bool,
}

/// Operator commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cmd {
    Start,
    Stop,
    Prim,
    Second,
    PrimForce,
    Swap,
    /// Restart the application here (`stop_prim`, `start_prim`), same role.
    Restart,
}

/// Actions for the engine, executed in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Act {
    Persist(Persisted),
    /// VIP up, gratuitous ARP, `start_prim`; answer with `app_started`.
    StartPrimary,
    /// `stop_prim`, VIP down; answer with `app_stopped`.
    StopPrimary,
    /// Ask the witness (ping) or the arbiter (for the right to write
    /// `generation` without the peer); answer with `witness`.
    CheckWitness {
        generation: u64,
    },
    /// Announce the VIP again by gratuitous ARP (this node kept the
    /// primary role across a partition or a split brain: clients may hold
    /// the other node's MAC).
    Announce,
    /// Keep this node's divergent files aside before resynchronising.
    Quarantine,
    Log(String),
}

/// Where the application is on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum App {
    Down,
    Starting,
    Up,
    Stopping,
}

/// The core.
#[derive(Debug)]
#[expect(
    clippy::struct_excessive_bools,
    reason = "independent facts of the state machine, not a hidden state"
)]
pub(crate) struct MirrorCore {
    p: Params,
    data: Persisted,
    state: MState,
    app: App,
    /// What to do once the application stopped.
    after_stop: MState,
    peer: Option<View>,
    last_peer: Option<Instant>,
    wait_since: Option<Instant>,
    handoff: bool,
    witness_pending: bool,
    /// Takeover confirmed by the witness, effective at this time.
    takeover_at: Option<Instant>,
    /// When this incarnation was started: a peer SECOND seen within a
    /// timeout of it may still be the secondary of our previous incarnation,
    /// about to take over.
    started_at: Option<Instant>,
    /// SECOND: this node's copy is in sync and receives every write.
    /// PRIM/ALONE: the replication link to the secondary is in sync and
    /// live. Set on entering these roles when nothing is replicated.
    synced: bool,
    /// The last view heard from the peer was a SECOND in sync: should it
    /// fall silent, it may be taking over (a primary then asks the witness).
    peer_in_sync: bool,
    /// The last reason logged for staying in WAIT (logged once, not at
    /// every timeout).
    told_why_waiting: Option<String>,
    /// A `wait` checker of the module that is down on this node (its id):
    /// the node stays in WAIT until all are up (see
    /// [`MirrorCore::wait_checker`]).
    checker_down: Option<String>,
    /// A primary heard its peer again after losing it, or its peer entered
    /// or left a primary role: announce the VIP once the role is settled
    /// (see [`MirrorCore::decide`]).
    reannounce: bool,
    /// With an arbiter: this primary asked because its secondary in sync
    /// stopped hearing it (one-way loss); cleared when it hears it again.
    asked_for_deafness: bool,
    /// A SECOND in sync lost its primary: its copy is up to date for a
    /// takeover through the witness (in memory only; persisted as
    /// `uptodate` once it takes over). Cleared when the peer (running) is
    /// heard again, or the node stops or follows.
    lost_primary_in_sync: bool,
    /// The stop under way fences first (see [`Self::take_fence`]).
    fence: bool,
    /// The peer's last view, kept after it is lost (the generation it asks
    /// the arbiter for, see `witness_generation`).
    peer_seen: Option<View>,
    actions: std::collections::VecDeque<Act>,
}

/// A refused command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub(crate) struct Refused(pub(crate) String);

impl MirrorCore {
    pub(crate) fn new(p: Params, data: Persisted) -> Self {
        Self {
            p,
            data,
            state: MState::Stop,
            app: App::Down,
            after_stop: MState::Stop,
            peer: None,
            last_peer: None,
            wait_since: None,
            handoff: false,
            witness_pending: false,
            takeover_at: None,
            started_at: None,
            synced: false,
            peer_in_sync: false,
            told_why_waiting: None,
            checker_down: None,
            reannounce: false,
            asked_for_deafness: false,
            lost_primary_in_sync: false,
            fence: false,
            peer_seen: None,
            actions: std::collections::VecDeque::new(),
        }
    }

    pub(crate) fn state(&self) -> MState {
        self.state
    }

    /// True while the state is a transition (orange) rather than stuck.
    pub(crate) fn in_transition(&self) -> bool {
        matches!(self.app, App::Starting | App::Stopping) || self.witness_pending
    }

    /// The record this node persists (as last persisted).
    pub(crate) fn data(&self) -> Persisted {
        self.data
    }

    pub(crate) fn view(&self) -> View {
        View {
            state: self.state,
            generation: self.data.generation,
            uptodate: self.data.uptodate,
            took_over: self.data.took_over,
            was_primary: self.data.was_primary,
            handoff: self.handoff,
            hears_peer: self.peer.is_some(),
            synced: self.synced(),
            peer_may_have_taken_over: self.data.peer_may_have_taken_over,
        }
    }

    /// The peer's last view (`None`: not heard within the timeout).
    pub(crate) fn peer_view(&self) -> Option<View> {
        self.peer
    }

    /// See [`View::synced`]: on a SECOND, its copy is in sync and receives
    /// every write; on a primary, its replication link is in sync and live;
    /// false in other states. Without replicated directories: always true
    /// on PRIM and ALONE, and on a SECOND once it heard its primary PRIM
    /// (within a heartbeat of following it).
    pub(crate) fn synced(&self) -> bool {
        self.synced && matches!(self.state, MState::Second | MState::Prim | MState::Alone)
    }

    /// The replication layer reports a resynchronisation complete, live
    /// replication running. On the primary (call it first): its link to the
    /// secondary is in sync; ALONE becomes PRIM as soon as the peer's view
    /// shows a SECOND in sync. On a SECOND (call it once the primary has
    /// declared the link in sync): its copy is in sync, and it takes the
    /// primary's generation. Ignored in other states and without replicated
    /// directories; idempotent.
    ///
    /// The engine of a SECOND whose [`Self::synced`] is false (re)starts the
    /// resynchronisation: a primary that went on without it is shown by that
    /// flag dropping.
    pub(crate) fn replication_synced(&mut self, now: Instant) {
        if !self.p.replicated || self.synced() {
            return;
        }
        match self.state {
            MState::Second => {
                self.synced = true;
                self.log(format!(
                    "in sync with {}, receiving every write",
                    self.p.peer
                ));
                self.adopt_generation();
            }
            MState::Prim | MState::Alone => {
                self.synced = true;
                self.log(format!("replication to {} in sync and live", self.p.peer));
                self.decide(now);
            }
            MState::Stop | MState::Wait => {}
        }
    }

    /// The replication link broke (send timeout, connection lost). On a
    /// primary: not synced until the next [`Self::replication_synced`], and
    /// PRIM becomes ALONE with a new generation (persisted), exactly as when
    /// it loses its secondary. On a SECOND nothing changes: its copy stays
    /// valid until the primary writes without it, which the primary shows by
    /// going ALONE. Ignored without replicated directories.
    pub(crate) fn replication_lost(&mut self, _now: Instant) {
        if matches!(self.state, MState::Prim | MState::Alone) {
            self.lose_link(&format!("replication to {} lost", self.p.peer));
            self.track_takeover_risk();
        }
    }

    /// The peer-loss timeout, changed by a configuration reload: from the
    /// next judgement on.
    pub(crate) fn set_timeout(&mut self, timeout: Duration) {
        self.p.timeout = timeout;
    }

    /// This node's copy could not be written (disk full, I/O error, a failed
    /// sync) while SECOND: it is behind what the primary sent, so it is no
    /// longer in sync — on the primary's loss this node waits rather than
    /// take over on it — until a resynchronisation completes
    /// ([`Self::replication_synced`]).
    ///
    /// Also while waiting after the primary's loss (a witness asked, the
    /// grace running): the takeover is cancelled. A node already primary
    /// learns it from the mount of its directories, which refuses a copy
    /// that failed (`daemon::rfs::mount_primaries`).
    pub(crate) fn copy_failed(&mut self, _now: Instant, why: &str) {
        if !matches!(self.state, MState::Second | MState::Wait) {
            return;
        }
        let mattered = self.synced || self.lost_primary_in_sync || self.takeover_at.is_some();
        self.synced = false;
        self.lost_primary_in_sync = false;
        self.takeover_at = None;
        self.persist(|d| d.uptodate = false);
        if mattered {
            self.log(format!(
                "copy not written ({why}): not in sync, no takeover on it"
            ));
        }
    }

    /// The module's `wait` checkers on this node: `down` names one that is
    /// down, `None` when all are up (the engine passes it after every
    /// checker result; idempotent).
    ///
    /// Going down: a primary stops its application and goes WAIT, handing
    /// over to its secondary when PRIM (as `swap` does: a secondary in sync
    /// takes over, one that is not WAITs); a SECOND stops following and
    /// goes WAIT (with replicated directories its primary then goes ALONE); a waiting node drops a
    /// takeover under way. While one is down the node stays in WAIT: no
    /// automatic decision, `prim` and `second` refused (`primforce` is
    /// not). All up again: the usual rules apply (SECOND of a primary peer,
    /// else decided as at start). Recorded but without effect in STOP.
    pub(crate) fn wait_checker(&mut self, now: Instant, down: Option<String>) {
        let before = std::mem::replace(&mut self.checker_down, down.clone());
        if self.state == MState::Stop {
            return;
        }
        match (before, down) {
            (None, Some(id)) => self.checker_went_down(now, &id),
            (Some(id), None) => {
                self.log(format!(
                    "checker {id} up again: leaving WAIT by the usual rules"
                ));
                self.told_why_waiting = None;
                if self.state == MState::Wait {
                    // As at start: decide on fresh heartbeats only (the
                    // last one heard may be from a primary gone since).
                    self.wait_since = Some(now);
                    self.started_at = Some(now);
                    self.peer = None;
                    self.last_peer = None;
                    self.peer_in_sync = false;
                }
                self.decide(now);
            }
            _ => {}
        }
    }

    fn checker_went_down(&mut self, now: Instant, id: &str) {
        self.takeover_at = None;
        match self.state {
            MState::Prim | MState::Alone => {
                let to = if self.state == MState::Prim {
                    format!("handing over to {}", self.p.peer)
                } else {
                    "no secondary in sync to take over".to_owned()
                };
                self.log(format!(
                    "checker {id} down: stopping the application here ({to}); WAIT until it recovers"
                ));
                // Shown while it stops, as by `swap`: a SECOND in sync
                // takes over, a peer waiting does not follow this node,
                // and a peer primary too (split brain) keeps its role.
                self.handoff = true;
                self.stop_to(MState::Wait);
            }
            MState::Second => {
                self.log(format!(
                    "checker {id} down: this node stops being secondary; WAIT until it recovers"
                ));
                self.state = MState::Wait;
                self.wait_since = Some(now);
            }
            MState::Wait => {
                self.witness_pending = false;
                self.decide(now);
            }
            MState::Stop => {}
        }
    }

    /// A primary whose replication link is no longer in sync writes without
    /// the secondary from now on: its generation moves ahead (the peer's
    /// copy is stale) and PRIM becomes ALONE. Nothing without replicated
    /// directories or when the link was not synced.
    fn lose_link(&mut self, why: &str) {
        if !self.p.replicated || !self.synced {
            return;
        }
        self.synced = false;
        if self.state == MState::Prim {
            self.log(format!("{why}: ALONE"));
            self.state = MState::Alone;
        } else {
            self.log(format!("{why}: the secondary's copy falls behind"));
        }
        self.persist(|d| d.generation += 1);
    }

    /// A SECOND in sync holds its primary's data: it takes the primary's
    /// generation (when above its own), so that its takeover (generation +
    /// 1) ends above the former primary's.
    fn adopt_generation(&mut self) {
        if let Some(v) = self.peer
            && matches!(v.state, MState::Prim | MState::Alone)
            && v.generation > self.data.generation
        {
            self.persist(|d| d.generation = v.generation);
        }
    }

    pub(crate) fn poll_action(&mut self) -> Option<Act> {
        self.actions.pop_front()
    }

    fn log(&mut self, s: String) {
        self.actions.push_back(Act::Log(s));
    }

    fn persist(&mut self, f: impl FnOnce(&mut Persisted)) {
        let before = self.data;
        f(&mut self.data);
        if self.data != before {
            self.actions.push_back(Act::Persist(self.data));
        }
    }

    fn peer_primary(&self) -> bool {
        self.peer
            .is_some_and(|v| matches!(v.state, MState::Prim | MState::Alone))
    }

    /// Next time `handle_timeout` has something to do.
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        if let Some(t) = self.takeover_at {
            return Some(t);
        }
        if self.witness_pending {
            return self.last_peer.map(|t| t + self.p.timeout);
        }
        match self.state {
            MState::Stop => None,
            MState::Wait => {
                let peer = match self.last_peer {
                    Some(t) => Some(t + self.p.timeout),
                    None => self.wait_since.map(|t| t + self.p.timeout),
                };
                let settle = self
                    .started_at
                    .map(|t| t + self.p.timeout)
                    .filter(|_| self.peer.is_some_and(|v| v.state == MState::Second));
                match (peer, settle) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                }
            }
            _ => self.last_peer.map(|t| t + self.p.timeout),
        }
    }

    pub(crate) fn handle_command(&mut self, now: Instant, cmd: Cmd) -> Result<(), Refused> {
        match cmd {
            Cmd::Start => {
                if self.state != MState::Stop {
                    return Err(Refused(format!("already started ({:?})", self.state)));
                }
                self.state = MState::Wait;
                self.wait_since = Some(now);
                self.started_at = Some(now);
                // Decide on fresh heartbeats only.
                self.peer = None;
                self.peer_seen = None;
                self.last_peer = None;
                self.peer_in_sync = false;
                self.told_why_waiting = None;
                self.decide(now);
            }
            Cmd::Stop => {
                if self.state == MState::Stop {
                    return Err(Refused("already stopped".into()));
                }
                self.stop_to(MState::Stop);
            }
            Cmd::Prim | Cmd::Second if self.checker_down.is_some() => {
                let id = self.checker_down.as_deref().unwrap_or_default();
                return Err(Refused(format!(
                    "checker {id} is down: this node stays in WAIT until it recovers (primforce overrides)"
                )));
            }
            Cmd::Prim | Cmd::PrimForce => {
                if cmd == Cmd::Prim && self.peer_primary() {
                    return Err(Refused(format!("the peer {} is primary", self.p.peer)));
                }
                if matches!(self.state, MState::Prim | MState::Alone) {
                    return Err(Refused("already primary".into()));
                }
                if self.state == MState::Stop {
                    self.wait_since = Some(now);
                }
                self.log("operator forces this node primary".into());
                self.become_primary(false);
            }
            Cmd::Second => {
                if !self.peer_primary() {
                    return Err(Refused(format!("the peer {} is not primary", self.p.peer)));
                }
                if self.state == MState::Second {
                    return Err(Refused("already secondary".into()));
                }
                if self.state == MState::Stop {
                    self.wait_since = Some(now);
                }
                self.stop_to(MState::Second);
            }
            Cmd::Restart => {
                if !(matches!(self.state, MState::Prim | MState::Alone) && self.app == App::Up) {
                    return Err(Refused(
                        "restart needs the application running here (PRIM or ALONE)".into(),
                    ));
                }
                self.log("restarting the application".into());
                self.stop_to(self.state);
            }
            Cmd::Swap => {
                let primary = matches!(self.state, MState::Prim);
                if !primary {
                    return Err(Refused(
                        "swap runs on the primary, with a secondary in sync (PRIM)".into(),
                    ));
                }
                self.log(format!("swap: handing over to {}", self.p.peer));
                self.handoff = true;
                self.stop_to(MState::Wait);
            }
        }
        Ok(())
    }

    /// A heartbeat of the peer (its state and view).
    pub(crate) fn handle_peer(&mut self, now: Instant, v: View) {
        self.last_peer = Some(now);
        self.peer_seen = Some(v);
        let before = self.peer;
        if v.state != MState::Stop {
            self.lost_primary_in_sync = false;
        }
        let primary = |s: MState| matches!(s, MState::Prim | MState::Alone);
        if primary(self.state) && before.is_none_or(|b| primary(b.state) != primary(v.state)) {
            // Back after a loss (a partition healed, or it restarted), or a
            // split brain begins or ends: whoever keeps the role announces.
            self.reannounce = true;
        }
        self.peer = Some(v);
        self.peer_in_sync = v.state == MState::Second && v.synced;
        self.outdated_by(&v);
        // A stopped peer is judged on a heartbeat heard late enough after
        // our WAIT (see `stop_heard_after_our_wait`): the same view again
        // may decide.
        if before != Some(v) || (self.state == MState::Wait && v.state == MState::Stop) {
            self.decide(now);
        }
    }

    /// How long after going WAIT a peer's STOP heartbeat must arrive to
    /// count: longer than any heartbeat takes to travel and be read. Two
    /// nodes started within that time each hear the other's STOP sent
    /// before its start; counting those, both would go ALONE.
    fn stop_settle(&self) -> Duration {
        (self.p.timeout / 2).min(Duration::from_secs(1))
    }

    /// The last heartbeat (a STOP) arrived [`Self::stop_settle`] or more
    /// after this node went WAIT: the peer knew we were waiting and stayed
    /// stopped.
    fn stop_heard_after_our_wait(&self) -> bool {
        match (self.last_peer, self.wait_since) {
            (Some(heard), Some(waiting)) => heard >= waiting + self.stop_settle(),
            _ => false,
        }
    }

    pub(crate) fn handle_timeout(&mut self, now: Instant) {
        if let Some(t) = self.takeover_at
            && now >= t
        {
            self.takeover_at = None;
            // The peer back during the grace, or our copy found outdated
            // meanwhile: no takeover, the usual rules decide with the peer.
            let why = if self.checker_down.is_some() {
                Some("a wait checker is down")
            } else if self.peer_primary() {
                Some("the peer is primary")
            } else if self.peer.is_some_and(|v| v.state != MState::Stop) {
                Some("the peer is heard again")
            } else if self
                .peer
                .is_some_and(|v| v.generation > self.data.generation)
            {
                // Stopped, at a generation above ours: it wrote without us
                // (e.g. ALONE after the replication link broke) before it
                // stopped; our copy lacks that.
                self.lost_primary_in_sync = false;
                Some("the peer, stopped, holds newer data")
            } else if !(self.data.uptodate || self.lost_primary_in_sync) {
                Some("this node's copy is outdated")
            } else {
                None
            };
            match why {
                Some(why) => {
                    self.log(format!("takeover cancelled: {why}"));
                    self.decide(now);
                }
                None => self.become_primary(true),
            }
            return;
        }
        if self.state == MState::Wait
            && self.peer.is_some_and(|v| v.state == MState::Second)
            && self.started_at.is_some_and(|t| now >= t + self.p.timeout)
            && self.last_peer.is_some_and(|t| now < t + self.p.timeout)
        {
            // Settled: no timer for it any more (it would fire at once
            // again should the node keep waiting, e.g. not up to date).
            self.started_at = None;
            self.decide(now);
            return;
        }
        if let Some(t) = self.last_peer
            && now >= t + self.p.timeout
        {
            self.log(format!(
                "peer {} lost (no heartbeat for {:?})",
                self.p.peer, self.p.timeout
            ));
            self.last_peer = None;
            self.peer = None;
            self.decide(now);
        } else if self.state == MState::Wait
            && self.last_peer.is_none()
            && self.wait_since.is_some_and(|t| now >= t + self.p.timeout)
        {
            self.decide(now);
            // Still waiting (stale data): look again after another timeout.
            if self.state == MState::Wait && !self.witness_pending {
                self.wait_since = Some(now);
            }
        }
    }

    pub(crate) fn app_started(&mut self, ok: bool) {
        if self.app != App::Starting {
            return;
        }
        if ok {
            self.app = App::Up;
            // A preferred peer that came back in sync while this node was
            // starting: hand back now.
            if let Some(v) = self.peer {
                self.swap_back_to_defaultprim(&v);
            }
        } else {
            self.app = App::Up;
            self.log("start_prim failed: stopping the module here".into());
            self.stop_to(MState::Stop);
        }
    }

    pub(crate) fn app_stopped(&mut self, now: Instant) {
        if self.app != App::Stopping {
            return;
        }
        self.app = App::Down;
        let next = self.after_stop;
        match next {
            MState::Stop => {
                self.state = MState::Stop;
                self.peer_reset();
            }
            // The primary to follow may have left its role meanwhile (e.g.
            // restarted, and now following this node, which it saw still
            // primary): both SECOND, nobody would ever be primary. Decide
            // afresh instead.
            MState::Second if self.checker_down.is_some() => {
                self.state = MState::Wait;
                self.wait_since = Some(now);
                self.decide(now);
            }
            MState::Second if !self.peer_primary() => {
                self.log(format!(
                    "{} is not primary any more: WAIT instead of SECOND",
                    self.p.peer
                ));
                self.state = MState::Wait;
                self.wait_since = Some(now);
                self.decide(now);
            }
            MState::Second => {
                self.become_second();
            }
            MState::Prim | MState::Alone => {
                self.app = App::Starting;
                self.actions.push_back(Act::StartPrimary);
            }
            MState::Wait => {
                self.state = MState::Wait;
                self.wait_since = Some(now);
                self.decide(now);
            }
        }
    }

    /// The witness's answer to [`Act::CheckWitness`]: `ok` is "reachable"
    /// for a pinged witness, "granted" for an arbiter (false also when no
    /// arbiter answered in time). Then the rules apply again to what was
    /// heard meanwhile: a peer back during the check is followed (a node
    /// that waited becomes SECOND of a primary peer by itself).
    pub(crate) fn witness(&mut self, now: Instant, ok: bool) {
        if !self.witness_pending {
            return;
        }
        self.witness_pending = false;
        let primary = matches!(self.state, MState::Prim | MState::Alone);
        let arbiter = self.p.witness == Witness::Arbiter;
        match (ok, primary) {
            // A primary that still reaches the witness (or holds the
            // arbiter's grant) goes on ALONE: its peer, if alive, cannot
            // get it and waits.
            (true, true) => {
                if arbiter {
                    self.log(
                        "the arbiter granted this node the primary role without its peer".into(),
                    );
                }
                self.track_takeover_risk();
            }
            (true, false) => {
                let what = if arbiter {
                    "the arbiter granted the takeover"
                } else {
                    "witness reachable"
                };
                self.log(format!("{what}: taking over in {:?}", self.p.witness_grace));
                self.takeover_at = Some(now + self.p.witness_grace);
                return;
            }
            (false, true) => {
                let why = if arbiter {
                    "peer lost and no grant from the arbiter"
                } else {
                    "peer and witness unreachable"
                };
                self.log(format!(
                    "{why}: stopping the application, WAIT (split brain protection)"
                ));
                // The peer may be taking over right now: after this, this
                // node's data is up to date only against a peer heard
                // again (or an operator's prim).
                self.persist(|d| d.peer_may_have_taken_over = true);
                // Clients are cut off before `stop_prim` runs (it may take
                // its nice timeout, longer than the peer's grace).
                self.fence = true;
                self.stop_to(MState::Wait);
            }
            (false, false) => {
                let why = if arbiter {
                    "no grant from the arbiter (refused, or no answer)"
                } else {
                    "no witness answers"
                };
                self.log(format!(
                    "{why}: WAIT instead of ALONE (split brain protection)"
                ));
                self.wait_since = Some(now);
                self.state = MState::Wait;
            }
        }
        self.decide(now);
    }

    /// The generation this node asks the arbiter for: the one it writes
    /// without its peer. A node that is not primary, or PRIM, moves one
    /// ahead when it does; ALONE already did when it lost its secondary.
    ///
    /// A primary whose peer could take over asks for the generation that
    /// peer asks for (its generation + 1, as last heard): the peer may not
    /// have heard this node's latest generation (a one-way loss), and both
    /// sides of a cut must ask for the same one so that one only is granted.
    fn witness_generation(&self) -> u64 {
        let primary = matches!(self.state, MState::Prim | MState::Alone);
        if primary
            && let Some(v) = self.peer_seen
            && could_take_over(&v)
        {
            return v.generation + 1;
        }
        self.data.generation + u64::from(self.state != MState::Alone)
    }

    fn ask_witness(&mut self) {
        if !self.witness_pending {
            self.witness_pending = true;
            let generation = self.witness_generation();
            self.actions.push_back(Act::CheckWitness { generation });
        }
    }

    /// The stop asked last is split brain protection: the VIPs go before
    /// `stop_prim` (read once, by the engine that runs the stop).
    pub(crate) fn take_fence(&mut self) -> bool {
        std::mem::take(&mut self.fence)
    }

    fn peer_reset(&mut self) {
        self.lost_primary_in_sync = false;
        self.takeover_at = None;
        self.wait_since = None;
        self.handoff = false;
        self.witness_pending = false;
    }

    /// Stops the application if it runs, then goes to `next`.
    fn stop_to(&mut self, next: MState) {
        self.witness_pending = false;
        match self.app {
            App::Up | App::Starting => {
                self.app = App::Stopping;
                self.after_stop = next;
                self.actions.push_back(Act::StopPrimary);
            }
            App::Stopping => self.after_stop = next,
            App::Down => match next {
                MState::Stop => {
                    self.state = MState::Stop;
                    self.peer_reset();
                }
                MState::Second => self.become_second(),
                s => self.state = s,
            },
        }
    }

    fn become_second(&mut self) {
        self.handoff = false;
        self.lost_primary_in_sync = false;
        self.state = MState::Second;
        let g = self.peer.map_or(self.data.generation, |v| v.generation);
        self.persist(|d| {
            d.uptodate = false;
            d.took_over = false;
            d.was_primary = false;
            d.peer_may_have_taken_over = false;
            d.generation = g;
        });
        // Without replicated directories there is nothing to resynchronise:
        // the secondary is in sync as soon as its primary counts it (PRIM,
        // see `decide_second`) — not before: a primary that vanished
        // before it heard this SECOND does not know it may be superseded.
        self.synced = !self.p.replicated && self.peer.is_some_and(|v| v.state == MState::Prim);
        if self.p.replicated {
            self.log(format!("SECOND: resynchronising from {}", self.p.peer));
        }
    }

    /// Primary: PRIM when the peer is a secondary, else ALONE (generation
    /// moves ahead: the peer's copy is stale from now on).
    fn become_primary(&mut self, by_failover: bool) {
        // A hand-over that did not happen (the peer vanished) is over.
        self.handoff = false;
        self.lost_primary_in_sync = false;
        // With replicated directories the link to the secondary is not in
        // sync yet (`replication_synced` makes it PRIM): ALONE.
        self.synced = !self.p.replicated;
        let with_second = self.synced && self.peer.is_some_and(|v| v.state == MState::Second);
        let alone = !with_second;
        self.persist(|d| {
            d.uptodate = true;
            d.was_primary = true;
            if alone {
                d.generation += 1;
                d.took_over = by_failover;
            }
        });
        self.state = if with_second {
            MState::Prim
        } else {
            MState::Alone
        };
        self.track_takeover_risk();
        if self.app == App::Down {
            self.app = App::Starting;
            self.actions.push_back(Act::StartPrimary);
        }
    }

    /// A node that is not primary learns that its peer holds newer data (up
    /// to date at a higher generation, or at ours having taken over from
    /// us, see [`Self::compare_data`]: it was primary without us): its own
    /// copy is outdated, and stays so when the peer then vanishes — else,
    /// stopped or waiting meanwhile, it would go ALONE on stale data once
    /// the peer crashed. In both modes: without replicated directories the
    /// peer's writes are just as missing here.
    fn outdated_by(&mut self, v: &View) {
        if self.data.uptodate
            && !matches!(self.state, MState::Prim | MState::Alone)
            && v.uptodate
            && self.compare_data(v) == std::cmp::Ordering::Less
        {
            self.log(format!(
                "{} holds newer data (generation {}, this node {}): this node's copy is outdated",
                self.p.peer, v.generation, self.data.generation
            ));
            self.persist(|d| d.uptodate = false);
        }
    }

    /// A primary keeps [`Persisted::peer_may_have_taken_over`] in line:
    /// true while its peer could become primary should this node vanish —
    /// then it cannot know, after a restart, whether the peer went on
    /// without it. Set as soon as:
    /// - its secondary may count its copy in sync: with replicated
    ///   directories when this side's link is synced (`replication_synced`
    ///   reaches the primary first), without them when it is PRIM (its
    ///   SECOND counts itself in sync only once it heard PRIM);
    /// - the peer waits or is stopped with up-to-date data (and no flag of
    ///   its own, which would make it wait for this node): until it hears
    ///   this node primary it may go ALONE by itself (two nodes starting
    ///   together, the winner vanishing before the other heard it won);
    /// - the peer is primary too (split brain).
    ///
    /// Kept while the peer is a SECOND, even one showing a copy not in
    /// sync: that view may have been sent just before its
    /// resynchronisation completed (this side is told first). Cleared once
    /// the peer shows it cannot take over: waiting or stopped without
    /// up-to-date data or with its own flag (a secondary restarted or
    /// stopped, a former primary waiting for this node), or no peer
    /// heard for the timeout (dead — or cut off, a split brain, which the
    /// witness covers). A generation bump does not clear it: a secondary
    /// that has not heard it yet still believes itself in sync.
    fn track_takeover_risk(&mut self) {
        if !matches!(self.state, MState::Prim | MState::Alone) {
            return;
        }
        let second_in_sync = if self.p.replicated {
            self.synced
        } else {
            self.state == MState::Prim
        };
        let (could, still) = self.peer.map_or((false, false), |v| match v.state {
            // Flagged itself, it waits to hear this node before any move.
            MState::Wait | MState::Stop => {
                let alone = v.uptodate && !v.peer_may_have_taken_over;
                (alone, alone)
            }
            MState::Second => (v.synced, true),
            MState::Prim | MState::Alone => (true, true),
        });
        // Asking the witness whether the peer may take over: the risk
        // stands until it answers (a restart meanwhile must not find it
        // cleared).
        let asking = self.witness_pending && self.data.peer_may_have_taken_over;
        let risk =
            second_in_sync || could || asking || (self.data.peer_may_have_taken_over && still);
        self.persist(|d| d.peer_may_have_taken_over = risk);
    }

    /// Logs why this node stays in WAIT, once per reason.
    fn tell_why_waiting(&mut self, why: String) {
        if self.told_why_waiting.as_ref() != Some(&why) {
            self.log(why.clone());
            self.told_why_waiting = Some(why);
        }
    }

    /// A SECOND that is not in sync lost its primary: its copy may miss
    /// writes, so WAIT (for the primary or an operator), never ALONE.
    fn wait_not_in_sync(&mut self, now: Instant) {
        self.lost_primary_in_sync = false;
        self.log("primary gone while this node was not in sync: WAIT (data not up to date)".into());
        self.state = MState::Wait;
        self.wait_since = Some(now);
    }

    /// Takeover without the peer, through the witness when configured.
    /// Only on data known up to date: `uptodate`, and either no peer that
    /// may have taken over since, or `peer_not_newer` (the peer is heard,
    /// stopped, and its data is not newer). Else WAIT.
    fn go_alone(&mut self, now: Instant, peer_not_newer: bool) {
        let may_be_superseded = self.data.peer_may_have_taken_over && !peer_not_newer;
        let uptodate = self.data.uptodate || self.lost_primary_in_sync;
        if !uptodate || may_be_superseded {
            if uptodate {
                self.tell_why_waiting(format!(
                    "{} could take over when this node was last primary and may have: WAIT ({PEER_MAY_BE_NEWER}) until it is heard, or an operator's prim",
                    self.p.peer
                ));
            }
            if self.state != MState::Wait {
                self.state = MState::Wait;
            }
            self.wait_since = Some(now);
            return;
        }
        if self.p.witness != Witness::None {
            // Granted already: the takeover is due (`takeover_at`).
            if self.takeover_at.is_none() {
                self.ask_witness();
            }
            return;
        }
        self.become_primary(true);
    }

    /// `defaultprim = "<peer>"` (the default primary server of `SafeKit`): a node
    /// that took over from the preferred one, PRIM with it back as a SECOND
    /// in sync (reintegrated), hands the role back to it at once, as `swap`
    /// does (its application stops here and starts
    /// there). Not while the application is starting or stopping, nor with
    /// a `wait` checker down (that hands over by itself).
    fn swap_back_to_defaultprim(&mut self, v: &View) {
        let preferred_peer = matches!(&self.p.prefer, Prefer::Node(n) if *n == self.p.peer);
        // Only a primary that took the role over by failover: after a
        // `swap` (or a hand-over by a wait checker) the operator's choice
        // stands.
        if preferred_peer
            && self.data.took_over
            && self.state == MState::Prim
            && v.state == MState::Second
            && v.synced
            && self.app == App::Up
            && !self.handoff
            && self.checker_down.is_none()
        {
            self.log(format!(
                "defaultprim: {} is back and in sync: swapping back to it",
                self.p.peer
            ));
            self.handoff = true;
            self.stop_to(MState::Wait);
        }
    }

    /// This node's data against the peer's (advertised in `v`): up to date
    /// first, then the generation. At the same generation, both up to
    /// date, a node whose peer may have taken over yields to a peer that
    /// took over without having seen it primary (its own flag clear): both
    /// moved on from the same generation, in turn — this node's link broke,
    /// it went ALONE and vanished before its secondary heard it; the
    /// secondary, still in sync, took over later. When both flags are set
    /// both were primary at once (split brain): no data order, the usual
    /// preference decides.
    ///
    /// A SECOND's copy never wins: `uptodate` is false from the moment it
    /// becomes SECOND (it holds its primary's generation, but not
    /// necessarily its data), and turns true only when a SECOND in sync
    /// takes over. So two nodes both restarted after a crash at PRIM and
    /// SECOND compare as primary (up to date) above secondary, whether the
    /// secondary was in sync or not.
    fn compare_data(&self, v: &View) -> std::cmp::Ordering {
        let me = (self.data.uptodate, self.data.generation);
        let them = (v.uptodate, v.generation);
        me.cmp(&them).then_with(|| {
            let i_yield =
                self.data.peer_may_have_taken_over && v.took_over && !v.peer_may_have_taken_over;
            let they_yield = v.peer_may_have_taken_over
                && self.data.took_over
                && !self.data.peer_may_have_taken_over;
            they_yield.cmp(&i_yield)
        })
    }

    /// True when this node should be primary rather than the peer, both
    /// waiting.
    fn wins_against(&self, v: &View) -> bool {
        match self.compare_data(v) {
            std::cmp::Ordering::Less => return false,
            std::cmp::Ordering::Greater => return true,
            std::cmp::Ordering::Equal => {}
        }
        match &self.p.prefer {
            Prefer::Node(n) => n == &self.p.me,
            Prefer::LastPrim if self.data.was_primary != v.was_primary => self.data.was_primary,
            _ => self.p.me < self.p.peer,
        }
    }

    /// The rules, applied after any change.
    fn decide(&mut self, now: Instant) {
        if self.app == App::Stopping || self.witness_pending {
            return;
        }
        if self.state == MState::Wait
            && let Some(id) = &self.checker_down
        {
            let why = format!(
                "checker {id} down: WAIT until it recovers, neither primary nor secondary (primforce overrides)"
            );
            self.tell_why_waiting(why);
            return;
        }
        let peer = self.peer;
        match self.state {
            MState::Stop => {}
            MState::Wait => self.decide_wait(now, peer),
            MState::Second => self.decide_second(now, peer),
            MState::Prim | MState::Alone => {
                self.decide_primary(peer);
                self.track_takeover_risk();
            }
        }
        if self.state != MState::Wait {
            self.told_why_waiting = None;
        }
        if std::mem::take(&mut self.reannounce)
            && matches!(self.state, MState::Prim | MState::Alone)
            && self.app == App::Up
            && !self.witness_pending
        {
            self.actions.push_back(Act::Announce);
        }
    }

    /// WAIT: become SECOND of a primary, primary against a waiting or
    /// secondary peer, or ALONE without a peer, when up to date.
    fn decide_wait(&mut self, now: Instant, peer: Option<View>) {
        match peer {
            Some(v) if matches!(v.state, MState::Prim | MState::Alone) => {
                if v.handoff {
                    return;
                }
                self.become_second();
            }
            // Our own hand-over found no secondary to take it: resume
            // the normal rules. (First: both may be handing over, e.g. a
            // swap and a wait checker down on the other side.)
            Some(v) if v.state == MState::Wait && self.handoff => {
                self.handoff = false;
                self.decide(now);
            }
            // A hand-over is for the secondary in sync, not for a node
            // that is waiting (e.g. restarted): ignore it.
            Some(v) if v.state == MState::Wait && v.handoff => {}
            Some(v) if v.state == MState::Wait => {
                // Both waiting: the node with the newer data, if up to
                // date, becomes primary. Neither up to date: WAIT for
                // an operator's prim.
                // Only once the peer hears us: else it may be about to
                // time out and go ALONE itself.
                if !self.handoff && self.data.uptodate && v.hears_peer && self.wins_against(&v) {
                    self.become_primary(false);
                }
            }
            Some(v) if v.state == MState::Second => {
                // Within a timeout of our start, that SECOND may be the
                // secondary of our previous incarnation, taking over
                // right now: let it either take over or see us first.
                let settled = self.started_at.is_none_or(|t| now >= t + self.p.timeout);
                if self.data.uptodate && !self.handoff && settled && v.hears_peer {
                    self.become_primary(false);
                }
            }
            // Peer stopped: ALONE unless its data is newer (it went on
            // without us); a stopped peer shows it did not take over when
            // its data is not newer. (`outdated_by` has already marked our
            // copy outdated in that case; the rule is kept explicit here.)
            Some(v) => {
                if !self.stop_heard_after_our_wait() {
                    // A STOP sent before the peer could know we wait: it
                    // may be starting too, with our own stale STOP in
                    // hand. A later heartbeat decides.
                    return;
                }
                if self.compare_data(&v) == std::cmp::Ordering::Less {
                    self.lost_primary_in_sync = false;
                    self.tell_why_waiting(format!(
                        "{} (stopped) holds newer data: WAIT for it, or an operator's prim",
                        self.p.peer
                    ));
                    self.wait_since = Some(now);
                } else {
                    self.go_alone(now, true);
                }
            }
            // Silent past the timeout.
            None => {
                if self.wait_since.is_some_and(|t| now >= t + self.p.timeout) {
                    self.go_alone(now, false);
                }
            }
        }
    }

    /// SECOND: follow the primary, take over when it is gone (in sync).
    fn decide_second(&mut self, now: Instant, peer: Option<View>) {
        // (Not a PRIM below the generation we follow at: a heartbeat sent
        // before the primary went ALONE, arriving late.)
        if !self.p.replicated
            && peer.is_some_and(|v| v.state == MState::Prim && v.generation >= self.data.generation)
        {
            // The primary counts us (it has recorded that we may take
            // over): in sync, at its generation, so that our takeover ends
            // above it — it may have become PRIM again at a higher one
            // since we followed it.
            self.synced = true;
            self.adopt_generation();
        }
        if !self.p.replicated
            && self.synced
            && let Some(v) = peer
            && v.state != MState::Prim
            && v.generation > self.data.generation
        {
            // Not PRIM, above the generation we followed at: it stopped
            // counting us (e.g. it saw us waiting, the PRIM heartbeat that
            // made us follow was stale) and wrote without us, whether it
            // is still ALONE or stopped since.
            self.log(format!(
                "primary {} went on without this node (generation {} above {}): not in sync any more",
                self.p.peer, v.generation, self.data.generation
            ));
            self.synced = false;
            self.lost_primary_in_sync = false;
        }
        if self.p.replicated
            && self.synced
            && let Some(v) = peer
        {
            // A generation above ours without a live link: the primary
            // wrote without us (it went ALONE, whether it still is, or
            // stopped since). Not a heartbeat sent during our resync: the
            // primary was at our generation then.
            if v.generation > self.data.generation
                && !(matches!(v.state, MState::Prim | MState::Alone) && v.synced)
            {
                self.log(format!(
                    "primary {} went on without this node (generation {} above {}): not in sync any more",
                    self.p.peer, v.generation, self.data.generation
                ));
                self.synced = false;
                self.lost_primary_in_sync = false;
            } else if v.state == MState::Prim || v.synced {
                self.adopt_generation();
            }
        }
        match peer {
            Some(v) if matches!(v.state, MState::Prim | MState::Alone) => {}
            // A hand-over is for a secondary in sync; one that is not
            // cannot take the role (the primary then resumes it).
            Some(v) if v.state == MState::Wait && v.handoff => {
                if self.synced {
                    self.become_primary(false);
                } else {
                    self.wait_not_in_sync(now);
                }
            }
            // A primary stopping cleanly (WAIT, STOP) leaves us in sync.
            Some(v) if v.state == MState::Second || v.state == MState::Wait => {}
            _ if !self.synced => self.wait_not_in_sync(now),
            _ => {
                // The primary is gone (lost or stopped).
                if self.p.failover {
                    self.log(format!("primary {} gone: taking over", self.p.peer));
                    // In sync until the primary vanished: up to date for
                    // this takeover — not persisted before it happens (a
                    // restart while the witness is asked would otherwise
                    // take the copy for the reference, whatever the peer
                    // did since).
                    self.lost_primary_in_sync = true;
                    self.go_alone(now, false);
                } else {
                    self.log(
                        "primary gone and failover = false: WAIT for an operator's prim".into(),
                    );
                    self.state = MState::Wait;
                    self.wait_since = Some(now);
                }
            }
        }
    }

    /// PRIM/ALONE: PRIM with a secondary (in sync), split brain, peer lost.
    fn decide_primary(&mut self, peer: Option<View>) {
        if peer.is_none_or(|v| v.hears_peer) {
            self.asked_for_deafness = false;
        }
        match peer {
            // With an arbiter: a peer that could take over (a secondary in
            // sync, or waiting with up-to-date data) no longer hears this
            // node (a one-way loss) and is asking for the takeover. Ask
            // too: only one of both gets the grant.
            Some(v)
                if !v.hears_peer
                    && self.p.witness == Witness::Arbiter
                    && !self.asked_for_deafness
                    && could_take_over(&v) =>
            {
                self.asked_for_deafness = true;
                self.log(format!(
                    "{} could take over and does not hear this node: asking the arbiter",
                    self.p.peer
                ));
                self.ask_witness();
            }
            Some(v) if v.state == MState::Second => {
                if !self.p.replicated || (self.synced && v.synced) {
                    if self.state == MState::Alone {
                        self.log(format!("{} is secondary: PRIM", self.p.peer));
                    }
                    self.state = MState::Prim;
                    self.swap_back_to_defaultprim(&v);
                } else if self.state == MState::Prim {
                    // PRIM sees its secondary not in sync (restarted).
                    self.lose_link(&format!("secondary {} not in sync any more", self.p.peer));
                }
                // ALONE: PRIM once the link and the secondary are synced.
            }
            Some(v) if matches!(v.state, MState::Prim | MState::Alone) => {
                self.lose_link(&format!("{} is primary too", self.p.peer));
                // Split brain: both primary. One yields, deterministically.
                let keep_me = match &self.p.keep {
                    // It is handing over (stopping): keep the role.
                    _ if v.handoff => true,
                    Keep::Node(n) => n == &self.p.me,
                    Keep::FormerPrim if self.data.took_over != v.took_over => !self.data.took_over,
                    Keep::FormerPrim => self.p.me < self.p.peer,
                };
                if !keep_me {
                    self.log(format!(
                        "split brain: {} stays primary; this node becomes SECOND, its divergent files quarantined",
                        self.p.peer
                    ));
                    self.actions.push_back(Act::Quarantine);
                    self.stop_to(MState::Second);
                }
            }
            // A restarting peer: it will be SECOND. Its copy must be
            // resynchronised first.
            Some(v) if v.state == MState::Wait && !v.handoff => {
                // Without replicated directories PRIM stays: going ALONE
                // (a new generation) would let the peer, restarting,
                // follow a PRIM heartbeat still in flight and count itself
                // in sync.
                self.lose_link(&format!("secondary {} left SECOND", self.p.peer));
            }
            _ => {
                // A secondary in sync that falls silent may be taking
                // over. With replication this primary may be ALONE
                // already (link lost first) while the peer still
                // believed itself in sync.
                let peer_in_sync = std::mem::take(&mut self.peer_in_sync);
                // So may a peer this node recorded could (e.g. waiting with
                // up-to-date data when this node went ALONE at start): the
                // record is cleared after this step.
                let may_take_over = self.state == MState::Prim
                    || (self.p.replicated && peer_in_sync)
                    || self.data.peer_may_have_taken_over;
                if self.p.replicated {
                    self.lose_link(&format!("secondary {} gone", self.p.peer));
                } else if self.state == MState::Prim {
                    self.log(format!("secondary {} gone: ALONE", self.p.peer));
                    self.state = MState::Alone;
                    self.persist(|d| d.generation += 1);
                }
                if may_take_over && self.p.witness != Witness::None && peer.is_none() {
                    // Lost, not stopped: are we the side cut off?
                    self.ask_witness();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(me: &str, peer: &str) -> Params {
        Params {
            me: me.into(),
            peer: peer.into(),
            timeout: Duration::from_secs(1),
            failover: true,
            // No preferred node (node1 still wins ties by name): with one,
            // the pair swaps back to it (see `defaultprim_swaps_back`).
            prefer: Prefer::None,
            keep: Keep::FormerPrim,
            witness: Witness::None,
            witness_grace: Duration::from_millis(500),
            replicated: false,
        }
    }

    /// Two cores wired by hand, effects completed at once.
    struct Pair {
        a: MirrorCore,
        b: MirrorCore,
        now: Instant,
    }

    fn run_actions(c: &mut MirrorCore, now: Instant) {
        while let Some(a) = c.poll_action() {
            match a {
                Act::StartPrimary => c.app_started(true),
                Act::StopPrimary => c.app_stopped(now),
                _ => {}
            }
        }
    }

    impl Pair {
        fn new() -> Self {
            Self {
                a: MirrorCore::new(params("node1", "node2"), Persisted::default()),
                b: MirrorCore::new(params("node2", "node1"), Persisted::default()),
                now: Instant::now(),
            }
        }
        fn exchange(&mut self) {
            for _ in 0..6 {
                let (va, vb) = (self.a.view(), self.b.view());
                self.a.handle_peer(self.now, vb);
                run_actions(&mut self.a, self.now);
                self.b.handle_peer(self.now, va);
                run_actions(&mut self.b, self.now);
            }
        }
    }

    #[test]
    fn both_start_then_defaultprim_decides() {
        let mut p = Pair::new();
        p.a.handle_command(p.now, Cmd::Start).unwrap();
        p.b.handle_command(p.now, Cmd::Start).unwrap();
        p.exchange();
        assert_eq!((p.a.state(), p.b.state()), (MState::Prim, MState::Second));
    }

    #[test]
    fn secondary_takes_over_and_a_stale_node_waits() {
        let mut p = Pair::new();
        p.a.handle_command(p.now, Cmd::Start).unwrap();
        p.b.handle_command(p.now, Cmd::Start).unwrap();
        p.exchange();
        // node1 dies: node2 takes over after the timeout.
        p.now += Duration::from_secs(2);
        p.b.handle_timeout(p.now);
        run_actions(&mut p.b, p.now);
        assert_eq!(p.b.state(), MState::Alone);
        // node1 had been killed as PRIM: restarted alone it is up to date
        // by its own record, but meets node2 ALONE: SECOND.
        let mut a = MirrorCore::new(params("node1", "node2"), p.a.data());
        a.handle_command(p.now, Cmd::Start).unwrap();
        a.handle_peer(p.now, p.b.view());
        run_actions(&mut a, p.now);
        assert_eq!(a.state(), MState::Second);
        // A secondary restarted without its peer waits: stale data.
        let mut a2 = MirrorCore::new(params("node1", "node2"), a.data());
        a2.handle_command(p.now, Cmd::Start).unwrap();
        p.now += Duration::from_secs(3);
        a2.handle_timeout(p.now);
        run_actions(&mut a2, p.now);
        assert_eq!(a2.state(), MState::Wait);
        a2.handle_command(p.now, Cmd::Prim).unwrap();
        run_actions(&mut a2, p.now);
        assert_eq!(a2.state(), MState::Alone);
    }

    #[test]
    fn newer_data_wins_over_defaultprim() {
        let old = Persisted {
            generation: 3,
            uptodate: true,
            took_over: false,
            was_primary: true,
            peer_may_have_taken_over: false,
        };
        let new = Persisted {
            generation: 4,
            uptodate: true,
            took_over: true,
            was_primary: true,
            peer_may_have_taken_over: false,
        };
        let mut a = MirrorCore::new(params("node1", "node2"), old);
        let mut b = MirrorCore::new(params("node2", "node1"), new);
        let now = Instant::now();
        a.handle_command(now, Cmd::Start).unwrap();
        b.handle_command(now, Cmd::Start).unwrap();
        for _ in 0..6 {
            let (va, vb) = (a.view(), b.view());
            a.handle_peer(now, vb);
            run_actions(&mut a, now);
            b.handle_peer(now, va);
            run_actions(&mut b, now);
        }
        assert_eq!((a.state(), b.state()), (MState::Second, MState::Prim));
    }

    #[test]
    fn swap_exchanges_roles() {
        let mut p = Pair::new();
        p.a.handle_command(p.now, Cmd::Start).unwrap();
        p.b.handle_command(p.now, Cmd::Start).unwrap();
        p.exchange();
        p.a.handle_command(p.now, Cmd::Swap).unwrap();
        run_actions(&mut p.a, p.now);
        p.exchange();
        assert_eq!((p.a.state(), p.b.state()), (MState::Second, MState::Prim));
        // node2 is primary now: it cannot become secondary of a secondary.
        assert!(p.b.handle_command(p.now, Cmd::Second).is_err());
    }

    #[test]
    fn split_brain_former_primary_keeps_its_role() {
        let mut p = Pair::new();
        p.a.handle_command(p.now, Cmd::Start).unwrap();
        p.b.handle_command(p.now, Cmd::Start).unwrap();
        p.exchange();
        // Link cut: node1 (PRIM) goes ALONE, node2 takes over.
        p.now += Duration::from_secs(2);
        p.a.handle_timeout(p.now);
        run_actions(&mut p.a, p.now);
        p.b.handle_timeout(p.now);
        run_actions(&mut p.b, p.now);
        assert_eq!((p.a.state(), p.b.state()), (MState::Alone, MState::Alone));
        // Link back: node2 (took over) yields.
        p.exchange();
        assert_eq!((p.a.state(), p.b.state()), (MState::Prim, MState::Second));
    }

    #[test]
    fn witness_unreachable_means_wait() {
        let mut pa = params("node2", "node1");
        pa.witness = Witness::Ping;
        let mut c = MirrorCore::new(pa, Persisted::default());
        let now = Instant::now();
        c.handle_command(now, Cmd::Start).unwrap();
        c.handle_timeout(now + Duration::from_secs(2));
        assert_eq!(c.poll_action(), Some(Act::CheckWitness { generation: 1 }));
        c.witness(now, false);
        assert_eq!(c.state(), MState::Wait);
    }

    #[test]
    fn cut_from_peer_and_witness_the_primary_stops_the_other_takes_over_after_the_grace() {
        let mut p = Pair::new();
        p.a.p.witness = Witness::Ping;
        p.b.p.witness = Witness::Ping;
        p.a.handle_command(p.now, Cmd::Start).unwrap();
        p.b.handle_command(p.now, Cmd::Start).unwrap();
        p.exchange();
        p.now += Duration::from_secs(2);
        p.a.handle_timeout(p.now);
        p.b.handle_timeout(p.now);
        // Both ask the witness; only node2 reaches it.
        assert!(
            std::iter::from_fn(|| p.a.poll_action()).any(|a| matches!(a, Act::CheckWitness { .. }))
        );
        assert!(
            std::iter::from_fn(|| p.b.poll_action()).any(|a| matches!(a, Act::CheckWitness { .. }))
        );
        p.b.witness(p.now, true);
        assert_eq!(p.b.state(), MState::Second, "waits for the grace period");
        p.a.witness(p.now, false);
        run_actions(&mut p.a, p.now);
        assert_eq!(p.a.state(), MState::Wait);
        p.now += Duration::from_secs(1);
        p.b.handle_timeout(p.now);
        run_actions(&mut p.b, p.now);
        assert_eq!(p.b.state(), MState::Alone);
    }

    #[test]
    fn a_stopped_peer_heard_with_newer_data_during_the_grace_cancels_the_takeover() {
        let mut p = Pair::in_sync(true);
        p.a.p.witness = Witness::Ping;
        p.b.p.witness = Witness::Ping;
        p.now += Duration::from_secs(2);
        p.b.handle_timeout(p.now);
        let _ = std::iter::from_fn(|| p.b.poll_action()).count();
        p.b.witness(p.now, true);
        // node1's daemon restarted with the module stopped, at a generation
        // above node2's (it went ALONE before it vanished).
        let mut stopped = p.a.view();
        stopped.state = MState::Stop;
        stopped.generation = p.b.data().generation + 1;
        p.b.handle_peer(p.now, stopped);
        for _ in 0..5 {
            p.now += Duration::from_secs(2);
            p.b.handle_peer(p.now, stopped);
            p.b.handle_timeout(p.now);
            let acts = drain(&mut p.b, p.now);
            assert!(!acts.contains(&Act::StartPrimary), "{acts:?}");
        }
        assert!(!matches!(p.b.state(), MState::Alone | MState::Prim));
    }

    #[test]
    fn a_primary_refused_by_the_witness_fences_before_its_stop() {
        // Cut from its peer and the witness: its stop fences first (the
        // peer may take over after its grace, sooner than stop_prim ends).
        let mut p = Pair::in_sync(false);
        p.a.p.witness = Witness::Ping;
        p.now += Duration::from_secs(2);
        p.a.handle_timeout(p.now);
        let _ = std::iter::from_fn(|| p.a.poll_action()).count();
        p.a.witness(p.now, false);
        assert!(std::iter::from_fn(|| p.a.poll_action()).any(|a| a == Act::StopPrimary));
        assert!(p.a.take_fence(), "the split brain stop fences first");
        assert!(!p.a.take_fence(), "read once");
        // An operator's stop does not.
        let mut p = Pair::in_sync(false);
        p.a.handle_command(p.now, Cmd::Stop).unwrap();
        assert!(std::iter::from_fn(|| p.a.poll_action()).any(|a| a == Act::StopPrimary));
        assert!(!p.a.take_fence());
    }

    #[test]
    fn a_copy_that_fails_during_the_takeover_grace_cancels_the_takeover() {
        // Replicated pair in sync with a ping witness; the primary is lost,
        // node2 reaches the witness and waits for the grace: its applier
        // then reports a write it could not make. No takeover.
        let mut p = Pair::in_sync(true);
        p.a.p.witness = Witness::Ping;
        p.b.p.witness = Witness::Ping;
        p.now += Duration::from_secs(2);
        p.b.handle_timeout(p.now);
        let _ = std::iter::from_fn(|| p.b.poll_action()).count();
        p.b.witness(p.now, true);
        assert_ne!(p.b.state(), MState::Alone, "waits for the grace period");
        p.b.copy_failed(p.now, "/srv/data: ENOSPC");
        for _ in 0..5 {
            p.now += Duration::from_secs(2);
            p.b.handle_timeout(p.now);
            let acts = drain(&mut p.b, p.now);
            assert!(!acts.contains(&Act::StartPrimary), "{acts:?}");
            assert!(!matches!(p.b.state(), MState::Alone | MState::Prim));
        }
        assert!(!p.b.data().uptodate);
    }

    /// Heartbeat link cut, both reach the arbiter: both ask for the same
    /// generation, one is granted. After the heal the other follows by
    /// itself — even when the heal came while it was asking — and the
    /// primary that kept its role announces the VIP again.
    #[test]
    fn arbiter_grants_one_side_and_the_other_follows_after_the_heal() {
        let mut p = Pair::new();
        p.a.p.witness = Witness::Arbiter;
        p.b.p.witness = Witness::Arbiter;
        p.a.handle_command(p.now, Cmd::Start).unwrap();
        p.b.handle_command(p.now, Cmd::Start).unwrap();
        p.exchange();
        assert_eq!((p.a.state(), p.b.state()), (MState::Prim, MState::Second));
        p.now += Duration::from_secs(2);
        p.a.handle_timeout(p.now);
        p.b.handle_timeout(p.now);
        let asked = |c: &mut MirrorCore| {
            std::iter::from_fn(|| c.poll_action()).find_map(|a| match a {
                Act::CheckWitness { generation } => Some(generation),
                _ => None,
            })
        };
        let (ga, gb) = (asked(&mut p.a), asked(&mut p.b));
        assert!(
            ga.is_some() && ga == gb,
            "same generation asked: {ga:?} {gb:?}"
        );
        // node1 (the primary) is granted, node2 refused.
        p.a.witness(p.now, true);
        assert_eq!(p.a.state(), MState::Alone);
        p.b.witness(p.now, false);
        assert_eq!(p.b.state(), MState::Wait);
        // node2 asks again after a timeout; the heal comes while it asks.
        p.now += Duration::from_secs(2);
        p.b.handle_timeout(p.now);
        assert!(asked(&mut p.b).is_some());
        let va = p.a.view();
        p.b.handle_peer(p.now, va);
        p.b.witness(p.now, false);
        run_actions(&mut p.b, p.now);
        assert_eq!(p.b.state(), MState::Second, "follows the primary by itself");
        let vb = p.b.view();
        p.a.handle_peer(p.now, vb);
        assert!(drain(&mut p.a, p.now).contains(&Act::Announce));
        p.exchange();
        assert_eq!((p.a.state(), p.b.state()), (MState::Prim, MState::Second));
    }

    /// Split brain without a witness: when heartbeats return, the node that
    /// keeps the role announces the VIP at once, the other yields.
    #[test]
    fn after_a_split_brain_the_primary_that_stays_announces_the_vip() {
        let mut p = Pair::new();
        p.a.handle_command(p.now, Cmd::Start).unwrap();
        p.b.handle_command(p.now, Cmd::Start).unwrap();
        p.exchange();
        p.now += Duration::from_secs(2);
        p.a.handle_timeout(p.now);
        p.b.handle_timeout(p.now);
        run_actions(&mut p.a, p.now);
        run_actions(&mut p.b, p.now);
        assert_eq!((p.a.state(), p.b.state()), (MState::Alone, MState::Alone));
        let vb = p.b.view();
        p.a.handle_peer(p.now, vb);
        let acts = drain(&mut p.a, p.now);
        assert!(acts.contains(&Act::Announce), "{acts:?}");
        let va = p.a.view();
        p.b.handle_peer(p.now, va);
        let acts = drain(&mut p.b, p.now);
        assert!(!acts.contains(&Act::Announce), "{acts:?}");
        p.exchange();
        assert_eq!((p.a.state(), p.b.state()), (MState::Prim, MState::Second));
    }

    #[test]
    fn view_round_trips() {
        let v = View {
            state: MState::Prim,
            generation: 42,
            uptodate: true,
            took_over: false,
            was_primary: true,
            handoff: true,
            hears_peer: true,
            synced: true,
            peer_may_have_taken_over: true,
        };
        assert_eq!(View::decode(MState::Prim, &v.encode()), Some(v));
        assert_eq!(v.encode()[8], 0b111_1101);
        let w = View {
            synced: false,
            peer_may_have_taken_over: false,
            ..v
        };
        assert_eq!(View::decode(MState::Prim, &w.encode()), Some(w));
        assert_eq!(w.encode()[8], 0b1_1101);
        assert_eq!(View::decode(MState::Prim, &[1, 2]), None);
    }

    #[test]
    fn prim_refused_while_the_peer_is_primary() {
        let mut p = Pair::new();
        p.a.handle_command(p.now, Cmd::Start).unwrap();
        p.b.handle_command(p.now, Cmd::Start).unwrap();
        p.exchange();
        assert!(p.b.handle_command(p.now, Cmd::Prim).is_err());
        assert!(p.a.handle_command(p.now, Cmd::Second).is_err());
    }

    /// Completes the effects at once; returns every action.
    fn drain(c: &mut MirrorCore, now: Instant) -> Vec<Act> {
        let mut out = Vec::new();
        while let Some(a) = c.poll_action() {
            match a {
                Act::StartPrimary => c.app_started(true),
                Act::StopPrimary => c.app_stopped(now),
                _ => {}
            }
            out.push(a);
        }
        out
    }

    const NOT_IN_SYNC: &str =
        "primary gone while this node was not in sync: WAIT (data not up to date)";

    impl Pair {
        fn with(replicated: bool) -> Self {
            if replicated {
                Self::replicated()
            } else {
                Self::new()
            }
        }

        /// Two nodes of a module with replicated directories.
        fn replicated() -> Self {
            let mut p = Self::new();
            p.a.p.replicated = true;
            p.b.p.replicated = true;
            p
        }

        /// Both started: node1 ALONE, node2 SECOND resynchronising.
        fn started_replicated() -> Self {
            let mut p = Self::replicated();
            p.a.handle_command(p.now, Cmd::Start).unwrap();
            p.b.handle_command(p.now, Cmd::Start).unwrap();
            p.exchange();
            assert_eq!((p.a.state(), p.b.state()), (MState::Alone, MState::Second));
            p
        }

        /// The resynchronisation of node2 from node1 completes: the
        /// primary is told first, then the secondary.
        fn resync_b(&mut self) {
            self.a.replication_synced(self.now);
            run_actions(&mut self.a, self.now);
            self.b.replication_synced(self.now);
            run_actions(&mut self.b, self.now);
        }
    }

    #[test]
    fn without_replication_a_second_is_in_sync_at_once() {
        let mut p = Pair::new();
        p.a.handle_command(p.now, Cmd::Start).unwrap();
        p.b.handle_command(p.now, Cmd::Start).unwrap();
        p.exchange();
        assert_eq!((p.a.state(), p.b.state()), (MState::Prim, MState::Second));
        assert!(p.a.synced() && p.b.synced());
        assert!(p.b.view().synced);
        // The replication calls are no-ops there.
        p.a.replication_lost(p.now);
        assert_eq!(p.a.poll_action(), None);
        assert_eq!(p.a.state(), MState::Prim);
    }

    #[test]
    fn replicated_the_secondary_resyncs_then_prim() {
        let mut p = Pair::started_replicated();
        assert!(!p.a.synced() && !p.b.synced());
        assert!(!p.b.view().synced);
        let g = p.a.data().generation;
        assert_eq!(p.b.data().generation, g);
        // More heartbeats do not make it PRIM: the copy is not in sync.
        p.exchange();
        assert_eq!((p.a.state(), p.b.state()), (MState::Alone, MState::Second));
        // The primary's link is in sync first: ALONE until the secondary
        // confirms.
        p.a.replication_synced(p.now);
        run_actions(&mut p.a, p.now);
        assert_eq!(p.a.state(), MState::Alone);
        assert!(p.a.synced() && p.a.view().synced);
        p.b.replication_synced(p.now);
        run_actions(&mut p.b, p.now);
        assert!(p.b.synced());
        p.exchange();
        assert_eq!((p.a.state(), p.b.state()), (MState::Prim, MState::Second));
        assert!(p.a.synced() && p.b.synced());
        // No new generation on the way to PRIM; idempotent.
        assert_eq!((p.a.data().generation, p.b.data().generation), (g, g));
        p.resync_b();
        assert_eq!((p.a.state(), p.b.state()), (MState::Prim, MState::Second));
        assert_eq!(p.a.data().generation, g);
    }

    #[test]
    fn replicated_primary_dies_during_resync_the_secondary_waits() {
        let mut p = Pair::started_replicated();
        p.now += Duration::from_secs(2);
        p.b.handle_timeout(p.now);
        let acts = drain(&mut p.b, p.now);
        assert!(acts.contains(&Act::Log(NOT_IN_SYNC.into())), "{acts:?}");
        assert!(!acts.contains(&Act::StartPrimary));
        assert_eq!(p.b.state(), MState::Wait);
        assert!(!p.b.data().uptodate);
        // And it keeps waiting: an operator's prim, or the primary, decides.
        for _ in 0..5 {
            p.now += Duration::from_secs(2);
            p.b.handle_timeout(p.now);
            assert!(!drain(&mut p.b, p.now).contains(&Act::StartPrimary));
            assert_eq!(p.b.state(), MState::Wait);
        }
        // The primary comes back: it is primary again, node2 resyncs.
        let mut a = MirrorCore::new(p.a.p.clone(), p.a.data());
        a.handle_command(p.now, Cmd::Start).unwrap();
        p.a = a;
        p.exchange();
        assert_eq!((p.a.state(), p.b.state()), (MState::Alone, MState::Second));
    }

    #[test]
    fn replicated_primary_stopped_during_resync_the_secondary_waits() {
        let mut p = Pair::started_replicated();
        p.a.handle_command(p.now, Cmd::Stop).unwrap();
        run_actions(&mut p.a, p.now);
        p.b.handle_peer(p.now, p.a.view());
        let acts = drain(&mut p.b, p.now);
        assert!(acts.contains(&Act::Log(NOT_IN_SYNC.into())), "{acts:?}");
        assert_eq!(p.b.state(), MState::Wait);
    }

    #[test]
    fn replicated_primary_dies_after_sync_the_secondary_takes_over_above_its_generation() {
        let mut p = Pair::started_replicated();
        p.resync_b();
        p.exchange();
        assert_eq!((p.a.state(), p.b.state()), (MState::Prim, MState::Second));
        let old = p.a.data().generation;
        p.now += Duration::from_secs(2);
        p.b.handle_timeout(p.now);
        let acts = drain(&mut p.b, p.now);
        assert!(acts.contains(&Act::StartPrimary), "{acts:?}");
        assert_eq!(p.b.state(), MState::Alone);
        assert!(p.b.data().uptodate);
        assert!(p.b.data().generation > old);
        // Both restarted: node2's newer data wins over defaultprim (node1).
        let mut a = MirrorCore::new(p.a.p.clone(), p.a.data());
        let mut b = MirrorCore::new(p.b.p.clone(), p.b.data());
        a.handle_command(p.now, Cmd::Start).unwrap();
        b.handle_command(p.now, Cmd::Start).unwrap();
        (p.a, p.b) = (a, b);
        p.exchange();
        assert_eq!((p.a.state(), p.b.state()), (MState::Second, MState::Alone));
    }

    #[test]
    fn replicated_primary_stopped_cleanly_after_sync_the_secondary_takes_over() {
        let mut p = Pair::started_replicated();
        p.resync_b();
        p.exchange();
        p.a.handle_command(p.now, Cmd::Stop).unwrap();
        run_actions(&mut p.a, p.now);
        p.exchange();
        assert_eq!((p.a.state(), p.b.state()), (MState::Stop, MState::Alone));
    }

    #[test]
    fn replicated_link_lost_goes_alone_then_synced_again_prim() {
        let mut p = Pair::started_replicated();
        p.resync_b();
        p.exchange();
        let g = p.a.data().generation;
        p.a.replication_lost(p.now);
        let acts = drain(&mut p.a, p.now);
        assert!(
            acts.iter()
                .any(|a| matches!(a, Act::Persist(d) if d.generation == g + 1)),
            "{acts:?}"
        );
        assert_eq!(p.a.state(), MState::Alone);
        assert!(!p.a.synced());
        // Idempotent, and nothing on the secondary.
        p.a.replication_lost(p.now);
        assert_eq!(p.a.poll_action(), None);
        p.b.replication_lost(p.now);
        assert_eq!(p.b.poll_action(), None);
        assert!(p.b.synced());
        // The secondary sees its primary ALONE: its copy falls behind.
        p.exchange();
        assert_eq!((p.a.state(), p.b.state()), (MState::Alone, MState::Second));
        assert!(!p.b.synced());
        assert_eq!(p.b.data().generation, g);
        p.resync_b();
        p.exchange();
        assert_eq!((p.a.state(), p.b.state()), (MState::Prim, MState::Second));
        // In sync, it took the primary's generation: its takeover ends
        // above the former primary.
        assert_eq!(p.b.data().generation, g + 1);
        p.now += Duration::from_secs(2);
        p.b.handle_timeout(p.now);
        run_actions(&mut p.b, p.now);
        assert_eq!(p.b.state(), MState::Alone);
        assert_eq!(p.b.data().generation, g + 2);
    }

    #[test]
    fn replicated_peer_alone_clears_a_seconds_synced_flag_but_not_an_old_heartbeat() {
        let mut p = Pair::started_replicated();
        // A heartbeat sent during the resynchronisation, delivered after it.
        let old = p.a.view();
        p.a.replication_synced(p.now);
        run_actions(&mut p.a, p.now);
        p.b.handle_peer(p.now, p.a.view());
        p.b.replication_synced(p.now);
        run_actions(&mut p.b, p.now);
        p.b.handle_peer(p.now, old);
        run_actions(&mut p.b, p.now);
        assert!(p.b.synced(), "the primary was at our generation then");
        p.exchange();
        assert_eq!((p.a.state(), p.b.state()), (MState::Prim, MState::Second));
        // The primary goes on ALONE (it lost its link): not in sync.
        p.a.replication_lost(p.now);
        run_actions(&mut p.a, p.now);
        p.b.handle_peer(p.now, p.a.view());
        let acts = drain(&mut p.b, p.now);
        assert!(!p.b.synced(), "{acts:?}");
        assert!(!p.b.view().synced);
        assert_eq!(p.b.state(), MState::Second);
        // Then the primary dies: WAIT, not ALONE.
        p.now += Duration::from_secs(2);
        p.b.handle_timeout(p.now);
        assert!(drain(&mut p.b, p.now).contains(&Act::Log(NOT_IN_SYNC.into())));
        assert_eq!(p.b.state(), MState::Wait);
    }

    #[test]
    fn replicated_primary_wrote_alone_then_stopped_the_secondary_waits() {
        let mut p = Pair::started_replicated();
        p.resync_b();
        p.exchange();
        // The link breaks, the primary goes on ALONE and is stopped before
        // the secondary heard it ALONE: its STOP view is at a higher
        // generation.
        p.a.replication_lost(p.now);
        run_actions(&mut p.a, p.now);
        p.a.handle_command(p.now, Cmd::Stop).unwrap();
        run_actions(&mut p.a, p.now);
        assert_eq!(p.a.state(), MState::Stop);
        p.b.handle_peer(p.now, p.a.view());
        let acts = drain(&mut p.b, p.now);
        assert!(acts.contains(&Act::Log(NOT_IN_SYNC.into())), "{acts:?}");
        assert!(!acts.contains(&Act::StartPrimary));
        assert_eq!(p.b.state(), MState::Wait);
    }

    #[test]
    fn replicated_outdated_node_does_not_go_alone_when_the_newer_peer_vanishes() {
        let mut p = Pair::started_replicated();
        p.resync_b();
        p.exchange();
        // node1 stopped cleanly: node2 takes over, then is stopped too.
        p.a.handle_command(p.now, Cmd::Stop).unwrap();
        run_actions(&mut p.a, p.now);
        p.exchange();
        assert_eq!((p.a.state(), p.b.state()), (MState::Stop, MState::Alone));
        // Stopped, it hears node2 ALONE at a higher generation.
        assert!(p.a.data().generation < p.b.data().generation);
        assert!(!p.a.data().uptodate, "it heard the newer generation");
        p.b.handle_command(p.now, Cmd::Stop).unwrap();
        run_actions(&mut p.b, p.now);
        // node1 started alone later: WAIT, not ALONE on outdated data.
        let mut a = MirrorCore::new(p.a.p.clone(), p.a.data());
        a.handle_command(p.now, Cmd::Start).unwrap();
        p.now += Duration::from_secs(3);
        a.handle_timeout(p.now);
        assert!(!drain(&mut a, p.now).contains(&Act::StartPrimary));
        assert_eq!(a.state(), MState::Wait);
    }

    #[test]
    fn replicated_prim_goes_alone_when_its_secondary_restarts() {
        let mut p = Pair::started_replicated();
        p.resync_b();
        p.exchange();
        let g = p.a.data().generation;
        // node2 restarts within the timeout and is SECOND again at once.
        let mut b = MirrorCore::new(p.b.p.clone(), p.b.data());
        b.handle_command(p.now, Cmd::Start).unwrap();
        b.handle_peer(p.now, p.a.view());
        run_actions(&mut b, p.now);
        assert_eq!(b.state(), MState::Second);
        assert!(!b.synced());
        p.a.handle_peer(p.now, b.view());
        run_actions(&mut p.a, p.now);
        assert_eq!(p.a.state(), MState::Alone);
        assert_eq!(p.a.data().generation, g + 1);
    }

    #[test]
    fn replicated_swap_hands_over_to_the_secondary_in_sync() {
        let mut p = Pair::started_replicated();
        p.resync_b();
        p.exchange();
        p.a.handle_command(p.now, Cmd::Swap).unwrap();
        run_actions(&mut p.a, p.now);
        p.exchange();
        assert_eq!((p.a.state(), p.b.state()), (MState::Second, MState::Alone));
        p.b.replication_synced(p.now);
        run_actions(&mut p.b, p.now);
        p.a.replication_synced(p.now);
        run_actions(&mut p.a, p.now);
        p.exchange();
        assert_eq!((p.a.state(), p.b.state()), (MState::Second, MState::Prim));
    }

    #[test]
    fn replicated_swap_whose_link_breaks_is_not_taken_by_a_secondary_out_of_sync() {
        let mut p = Pair::started_replicated();
        p.resync_b();
        p.exchange();
        let g = p.a.data().generation;
        p.a.handle_command(p.now, Cmd::Swap).unwrap();
        // While its application stops, the link breaks: the primary wrote
        // without node2 (ALONE, generation + 1) before handing over.
        p.a.replication_lost(p.now);
        p.a.app_stopped(p.now);
        drain(&mut p.a, p.now);
        let v = p.a.view();
        assert_eq!(
            (v.state, v.handoff, v.generation),
            (MState::Wait, true, g + 1)
        );
        p.b.handle_peer(p.now, v);
        let acts = drain(&mut p.b, p.now);
        assert!(!acts.contains(&Act::StartPrimary), "{acts:?}");
        assert!(acts.contains(&Act::Log(NOT_IN_SYNC.into())), "{acts:?}");
        assert_eq!(p.b.state(), MState::Wait);
        // node1 resumes its role; node2 resynchronises.
        p.exchange();
        assert_eq!((p.a.state(), p.b.state()), (MState::Alone, MState::Second));
    }

    #[test]
    fn replicated_primary_alone_after_link_loss_asks_the_witness_when_its_secondary_falls_silent() {
        let mut p = Pair::started_replicated();
        p.a.p.witness = Witness::Ping;
        p.b.p.witness = Witness::Ping;
        p.resync_b();
        p.exchange();
        assert_eq!((p.a.state(), p.b.state()), (MState::Prim, MState::Second));
        // The link breaks first (ALONE), then the heartbeats: the secondary,
        // which never heard it ALONE, still believes itself in sync and may
        // take over. The primary asks the witness as it would from PRIM.
        p.a.replication_lost(p.now);
        run_actions(&mut p.a, p.now);
        assert_eq!(p.a.state(), MState::Alone);
        p.now += Duration::from_secs(2);
        p.a.handle_timeout(p.now);
        assert!(
            drain(&mut p.a, p.now)
                .iter()
                .any(|a| matches!(a, Act::CheckWitness { .. }))
        );
        p.a.witness(p.now, false);
        run_actions(&mut p.a, p.now);
        assert_eq!(p.a.state(), MState::Wait);
    }

    #[test]
    fn replicated_swap_refused_while_resynchronising() {
        let mut p = Pair::started_replicated();
        assert!(p.a.handle_command(p.now, Cmd::Swap).is_err());
    }

    // A node that was primary with a secondary in sync cannot know, after a
    // restart, whether that secondary took over: the audit's paths A and B,
    // in both modes.

    /// A new incarnation of `c` (crash, restart of the daemon), started.
    fn restart(c: &MirrorCore, now: Instant) -> MirrorCore {
        let mut n = MirrorCore::new(c.p.clone(), c.data());
        n.handle_command(now, Cmd::Start).unwrap();
        n
    }

    impl Pair {
        /// node1 PRIM, node2 SECOND in sync.
        fn in_sync(replicated: bool) -> Self {
            let mut p = if replicated {
                let mut p = Self::started_replicated();
                p.resync_b();
                p
            } else {
                let mut p = Self::new();
                p.a.handle_command(p.now, Cmd::Start).unwrap();
                p.b.handle_command(p.now, Cmd::Start).unwrap();
                p
            };
            p.exchange();
            assert_eq!((p.a.state(), p.b.state()), (MState::Prim, MState::Second));
            assert!(p.b.synced());
            p
        }

        /// Both nodes crashed; both restarted, node `prefer` preferred.
        fn both_restarted(&mut self, prefer: &str) {
            self.a = restart(&self.a, self.now);
            self.b = restart(&self.b, self.now);
            self.a.p.prefer = Prefer::Node(prefer.into());
            self.b.p.prefer = Prefer::Node(prefer.into());
        }

        /// node1 is killed: node2 takes over after the timeout.
        fn a_dies_b_takes_over(&mut self) {
            self.now += Duration::from_secs(2);
            self.b.handle_timeout(self.now);
            assert!(drain(&mut self.b, self.now).contains(&Act::StartPrimary));
            assert_eq!(self.b.state(), MState::Alone);
        }
    }

    /// Timeouts pass with nobody heard: `c` must not start the application.
    fn stays_waiting(c: &mut MirrorCore, now: &mut Instant, peer: Option<View>) -> Vec<Act> {
        let mut all = Vec::new();
        for _ in 0..5 {
            *now += Duration::from_secs(2);
            if let Some(v) = peer {
                c.handle_peer(*now, v);
            }
            c.handle_timeout(*now);
            let acts = drain(c, *now);
            assert!(!acts.contains(&Act::StartPrimary), "{acts:?}");
            assert_eq!(c.state(), MState::Wait);
            all.extend(acts);
        }
        all
    }

    fn says_peer_may_be_newer(acts: &[Act]) -> usize {
        acts.iter()
            .filter(|a| matches!(a, Act::Log(l) if l.contains(PEER_MAY_BE_NEWER)))
            .count()
    }

    #[test]
    fn path_a_a_former_prim_restarted_alone_waits_then_prim_makes_it_alone() {
        for replicated in [false, true] {
            let mut p = Pair::in_sync(replicated);
            assert!(p.a.data().uptodate && p.a.data().peer_may_have_taken_over);
            // node1 is killed; node2 takes over, writes, and dies too.
            p.a_dies_b_takes_over();
            assert!(p.b.data().generation > p.a.data().generation);
            // node1 restarted alone: up to date by its own record, but its
            // secondary may have gone on: WAIT (red), said once.
            let mut a = restart(&p.a, p.now);
            let acts = stays_waiting(&mut a, &mut p.now, None);
            assert_eq!(says_peer_may_be_newer(&acts), 1, "{acts:?}");
            assert!(!a.in_transition(), "red: stuck, not in transition");
            // The operator decides.
            a.handle_command(p.now, Cmd::Prim).unwrap();
            assert!(drain(&mut a, p.now).contains(&Act::StartPrimary));
            assert_eq!(a.state(), MState::Alone);
            assert!(!a.data().peer_may_have_taken_over);
        }
    }

    #[test]
    fn path_b_a_former_prim_never_goes_alone_against_a_stopped_peer_with_newer_data() {
        for replicated in [false, true] {
            let mut p = Pair::in_sync(replicated);
            p.a_dies_b_takes_over();
            // node2's module is stopped; its daemon goes on advertising its
            // data (a higher generation).
            p.b.handle_command(p.now, Cmd::Stop).unwrap();
            run_actions(&mut p.b, p.now);
            assert_eq!(p.b.state(), MState::Stop);
            let mut a = restart(&p.a, p.now);
            a.handle_peer(p.now, p.b.view());
            assert!(!drain(&mut a, p.now).contains(&Act::StartPrimary));
            assert_eq!(a.state(), MState::Wait);
            assert!(!a.data().uptodate, "outdated by the newer peer");
            stays_waiting(&mut a, &mut p.now, Some(p.b.view()));
            // Still WAIT once node2's daemon is gone as well.
            stays_waiting(&mut a, &mut p.now, None);
            a.handle_command(p.now, Cmd::Prim).unwrap();
            run_actions(&mut a, p.now);
            assert_eq!(a.state(), MState::Alone);
            // Started, node2 follows the forced primary.
            p.b.handle_command(p.now, Cmd::Start).unwrap();
            p.a = a;
            p.exchange();
            assert_eq!(p.b.state(), MState::Second);
        }
    }

    #[test]
    fn two_nodes_started_together_never_both_go_alone_on_each_others_old_stop() {
        // Both stopped, both started within a few ms: each hears the
        // other's STOP sent before that one's start. Neither goes ALONE on
        // it; once they hear each other WAIT, one becomes primary.
        let mut p = Pair::new();
        let (sa, sb) = (p.a.view(), p.b.view());
        p.a.handle_command(p.now, Cmd::Start).unwrap();
        p.b.handle_command(p.now, Cmd::Start).unwrap();
        p.now += Duration::from_millis(30);
        p.a.handle_peer(p.now, sb);
        p.b.handle_peer(p.now, sa);
        assert!(!drain(&mut p.a, p.now).contains(&Act::StartPrimary));
        assert!(!drain(&mut p.b, p.now).contains(&Act::StartPrimary));
        p.exchange();
        let primaries = [p.a.state(), p.b.state()]
            .iter()
            .filter(|s| matches!(s, MState::Prim | MState::Alone))
            .count();
        assert_eq!(primaries, 1, "{:?} {:?}", p.a.state(), p.b.state());
    }

    #[test]
    fn a_former_prim_hearing_its_secondary_stopped_without_taking_over_goes_alone() {
        for replicated in [false, true] {
            let mut p = Pair::in_sync(replicated);
            // node1 is killed, node2's module stopped before its timeout.
            p.b.handle_command(p.now, Cmd::Stop).unwrap();
            run_actions(&mut p.b, p.now);
            let mut a = restart(&p.a, p.now);
            // A STOP heard at once may predate the peer's own start: not
            // yet; the same STOP a settle later counts.
            a.handle_peer(p.now, p.b.view());
            assert!(!drain(&mut a, p.now).contains(&Act::StartPrimary));
            assert_eq!(a.state(), MState::Wait);
            p.now += Duration::from_secs(1);
            a.handle_peer(p.now, p.b.view());
            assert!(drain(&mut a, p.now).contains(&Act::StartPrimary));
            assert_eq!(a.state(), MState::Alone);
            // The stopped peer is stale and cannot take over.
            assert!(!a.data().peer_may_have_taken_over);
        }
    }

    #[test]
    fn after_a_double_crash_in_sync_both_restarted_come_up_prim_and_second() {
        for replicated in [false, true] {
            // Whatever defaultprim says: the former primary's data is the
            // reference (the SECOND's record is not up to date).
            for prefer in ["node1", "node2"] {
                let mut p = Pair::in_sync(replicated);
                let g = p.a.data().generation;
                assert_eq!(p.b.data().generation, g);
                p.both_restarted(prefer);
                // node2 first, alone for a while: WAIT (stale), and node1
                // alone would wait too; then they hear each other.
                stays_waiting(&mut p.b, &mut p.now, None);
                p.exchange();
                if replicated {
                    assert_eq!((p.a.state(), p.b.state()), (MState::Alone, MState::Second));
                    p.resync_b();
                    p.exchange();
                }
                assert_eq!(
                    (p.a.state(), p.b.state()),
                    (MState::Prim, MState::Second),
                    "prefer {prefer}, replicated {replicated}"
                );
            }
        }
    }

    /// `defaultprim = "node1"`: node1 fails, node2 takes over; node1
    /// returns as SECOND and, once in sync, the pair swaps back to it by
    /// itself — not before (a SECOND resynchronising is not handed the
    /// role).
    #[test]
    fn defaultprim_swaps_back_once_the_preferred_node_is_in_sync() {
        for replicated in [false, true] {
            let mut p = Pair::in_sync(replicated);
            p.a.p.prefer = Prefer::Node("node1".into());
            p.b.p.prefer = Prefer::Node("node1".into());
            p.a_dies_b_takes_over();
            assert_eq!(p.b.state(), MState::Alone);
            p.a = restart(&p.a, p.now);
            p.exchange();
            if replicated {
                // node2 ALONE while node1 resynchronises: no swap yet.
                assert_eq!((p.a.state(), p.b.state()), (MState::Second, MState::Alone));
                assert!(!p.b.view().handoff);
                p.b.replication_synced(p.now);
                run_actions(&mut p.b, p.now);
                p.a.replication_synced(p.now);
                run_actions(&mut p.a, p.now);
                let va = p.a.view();
                p.b.handle_peer(p.now, va);
                let acts = drain(&mut p.b, p.now);
                assert!(
                    acts.iter()
                        .any(|a| matches!(a, Act::Log(l) if l.starts_with("defaultprim: "))),
                    "{acts:?}"
                );
                p.exchange();
            }
            // (Without replication node1 is in sync as soon as it follows:
            // the swap back happened within the exchange.)
            assert!(
                matches!(p.a.state(), MState::Alone | MState::Prim),
                "replicated {replicated}: {:?}",
                p.a.state()
            );
            assert_eq!(p.b.state(), MState::Second, "replicated {replicated}");
        }
    }

    #[test]
    fn a_second_not_in_sync_never_wins_a_tie() {
        // Crashed while node2 was resynchronising (same generation as the
        // primary, which was ALONE): node1 wins, even with node2
        // preferred.
        let mut p = Pair::started_replicated();
        assert_eq!(p.a.data().generation, p.b.data().generation);
        p.both_restarted("node2");
        p.exchange();
        assert_eq!((p.a.state(), p.b.state()), (MState::Alone, MState::Second));
        // PRIM in sync, the link breaks: node1 ALONE (generation + 1)
        // while node2 still believes itself in sync; node2 hears it and is
        // not in sync any more. Both crash.
        let mut p = Pair::in_sync(true);
        p.a.replication_lost(p.now);
        run_actions(&mut p.a, p.now);
        assert!(
            p.a.data().peer_may_have_taken_over,
            "node2 may not have heard it yet"
        );
        p.exchange();
        assert!(!p.b.synced());
        p.both_restarted("node2");
        // node2 alone waits (stale), whatever the time.
        stays_waiting(&mut p.b, &mut p.now, None);
        p.exchange();
        assert_eq!((p.a.state(), p.b.state()), (MState::Alone, MState::Second));
    }

    #[test]
    fn a_secondary_whose_copy_could_not_be_written_never_takes_over() {
        // PRIM/SECOND in sync; node2's disk fills: its copy is behind. The
        // primary is killed before node2 hears anything else: node2 waits.
        let mut p = Pair::in_sync(true);
        p.b.copy_failed(p.now, "/srv/data: ENOSPC");
        assert!(!p.b.synced());
        assert_eq!(p.b.state(), MState::Second);
        p.now += Duration::from_secs(2);
        p.b.handle_timeout(p.now);
        let acts = drain(&mut p.b, p.now);
        assert!(!acts.contains(&Act::StartPrimary), "{acts:?}");
        assert_eq!(p.b.state(), MState::Wait);
        assert!(!p.b.data().uptodate);
        stays_waiting(&mut p.b, &mut p.now, None);
        // A resynchronisation completes later: in sync again.
        let mut p = Pair::in_sync(true);
        p.b.copy_failed(p.now, "/srv/data: EIO");
        p.b.replication_synced(p.now);
        assert!(p.b.synced());
    }

    #[test]
    fn a_takeover_wins_the_tie_against_a_primary_that_went_alone_unheard() {
        // PRIM in sync; the replication link breaks: node1 goes ALONE
        // (generation + 1) and is killed before node2 heard it. node2,
        // still in sync, takes over at the same generation.
        let mut p = Pair::in_sync(true);
        p.a.replication_lost(p.now);
        run_actions(&mut p.a, p.now);
        p.a_dies_b_takes_over();
        assert_eq!(p.a.data().generation, p.b.data().generation);
        assert!(p.a.data().peer_may_have_taken_over && p.b.data().took_over);
        // node2 dies as well; both restarted, node1 preferred: node2's
        // data, written after node1 vanished, wins.
        p.both_restarted("node1");
        p.exchange();
        assert_eq!((p.a.state(), p.b.state()), (MState::Second, MState::Alone));
    }

    #[test]
    fn without_replication_a_second_its_primary_never_counted_does_not_take_over() {
        let mut p = Pair::new();
        p.a.handle_command(p.now, Cmd::Start).unwrap();
        p.b.handle_command(p.now, Cmd::Start).unwrap();
        // Both waiting; node1 wins and goes ALONE: node2, up to date and
        // waiting, could still go ALONE by itself.
        for _ in 0..2 {
            let (va, vb) = (p.a.view(), p.b.view());
            p.a.handle_peer(p.now, vb);
            run_actions(&mut p.a, p.now);
            p.b.handle_peer(p.now, va);
            run_actions(&mut p.b, p.now);
        }
        assert_eq!(p.a.state(), MState::Alone);
        assert!(p.a.data().peer_may_have_taken_over);
        // node2 follows the ALONE primary, which dies before it heard it.
        p.b.handle_peer(p.now, p.a.view());
        run_actions(&mut p.b, p.now);
        assert_eq!(p.b.state(), MState::Second);
        assert!(!p.b.synced());
        p.now += Duration::from_secs(2);
        p.b.handle_timeout(p.now);
        let acts = drain(&mut p.b, p.now);
        assert!(acts.contains(&Act::Log(NOT_IN_SYNC.into())), "{acts:?}");
        assert_eq!(p.b.state(), MState::Wait);
        // node1 restarted: it wins against node2, waiting and stale.
        p.a = restart(&p.a, p.now);
        p.exchange();
        assert_eq!((p.a.state(), p.b.state()), (MState::Prim, MState::Second));
        assert!(p.b.synced(), "counted by its PRIM");
    }

    #[test]
    fn without_replication_a_second_in_sync_takes_its_primarys_generation() {
        let mut p = Pair::new();
        p.a.handle_command(p.now, Cmd::Start).unwrap();
        p.b.handle_command(p.now, Cmd::Start).unwrap();
        p.b.handle_peer(p.now, p.a.view());
        run_actions(&mut p.b, p.now);
        // node2 waiting, hearing node1: delivered late below.
        let late = p.b.view();
        p.exchange();
        assert_eq!((p.a.state(), p.b.state()), (MState::Prim, MState::Second));
        // node1 restarts and takes that late view for node2's state: it
        // wins and goes ALONE, generation + 1, while node2 still follows.
        p.a = restart(&p.a, p.now);
        p.a.handle_peer(p.now, late);
        run_actions(&mut p.a, p.now);
        assert_eq!(p.a.state(), MState::Alone);
        p.exchange();
        assert_eq!((p.a.state(), p.b.state()), (MState::Prim, MState::Second));
        let g = p.a.data().generation;
        assert_eq!(
            p.b.data().generation,
            g,
            "in sync at its primary's generation"
        );
        // So its takeover ends above the former primary.
        p.a_dies_b_takes_over();
        assert_eq!(p.b.data().generation, g + 1);
    }

    #[test]
    fn a_stopped_node_that_heard_its_peer_go_on_without_it_never_goes_alone_later() {
        for replicated in [false, true] {
            let mut p = if replicated {
                Pair::replicated()
            } else {
                Pair::new()
            };
            // node2's module stays stopped; node1 goes ALONE and writes.
            p.a.handle_command(p.now, Cmd::Start).unwrap();
            p.now += Duration::from_secs(2);
            p.a.handle_timeout(p.now);
            run_actions(&mut p.a, p.now);
            assert_eq!(p.a.state(), MState::Alone);
            // node2's daemon hears it: its own copy is outdated.
            p.b.handle_peer(p.now, p.a.view());
            drain(&mut p.b, p.now);
            assert!(!p.b.data().uptodate);
            // node1 dies; node2, started alone later, waits.
            let mut b = restart(&p.b, p.now);
            stays_waiting(&mut b, &mut p.now, None);
        }
    }

    #[test]
    fn a_primary_that_lost_its_secondary_restarts_alone_on_its_data() {
        for replicated in [false, true] {
            let mut p = Pair::in_sync(replicated);
            // node2 dies: node1 ALONE; its peer is stale from now on.
            p.now += Duration::from_secs(2);
            p.a.handle_timeout(p.now);
            run_actions(&mut p.a, p.now);
            assert_eq!(p.a.state(), MState::Alone);
            assert!(!p.a.data().peer_may_have_taken_over);
            // node1 killed and restarted alone: ALONE after the timeout.
            let mut a = restart(&p.a, p.now);
            p.now += Duration::from_secs(2);
            a.handle_timeout(p.now);
            assert!(drain(&mut a, p.now).contains(&Act::StartPrimary));
            assert_eq!(a.state(), MState::Alone);
        }
    }

    #[test]
    fn a_record_written_before_the_flag_existed_reads_as_no_peer_in_sync() {
        let d: Persisted = serde_json::from_str(
            r#"{"generation":3,"uptodate":true,"took_over":false,"was_primary":true}"#,
        )
        .unwrap();
        assert!(!d.peer_may_have_taken_over);
        assert_eq!(d.generation, 3);
    }

    /// `wait` checkers ([`MirrorCore::wait_checker`]).
    mod wait_checker {
        use super::*;

        fn logs(acts: &[Act]) -> String {
            acts.iter()
                .filter_map(|a| match a {
                    Act::Log(l) => Some(l.as_str()),
                    _ => None,
                })
                .collect::<Vec<_>>()
                .join("\n")
        }

        /// Both started without replication: node1 PRIM, node2 SECOND.
        fn prim_second(replicated: bool) -> Pair {
            let mut p = Pair::with(replicated);
            p.a.handle_command(p.now, Cmd::Start).unwrap();
            p.b.handle_command(p.now, Cmd::Start).unwrap();
            p.exchange();
            if replicated {
                p.a.replication_synced(p.now);
                drain(&mut p.a, p.now);
                p.b.replication_synced(p.now);
                drain(&mut p.b, p.now);
                p.exchange();
            }
            assert_eq!((p.a.state(), p.b.state()), (MState::Prim, MState::Second));
            p
        }

        #[test]
        fn a_wait_checker_down_on_prim_hands_over_then_up_again_it_is_second() {
            for replicated in [false, true] {
                let mut p = prim_second(replicated);
                p.a.wait_checker(p.now, Some("ping0".into()));
                let acts = drain(&mut p.a, p.now);
                assert!(acts.contains(&Act::StopPrimary), "{acts:?}");
                assert!(logs(&acts).contains("checker ping0 down"), "{acts:?}");
                assert_eq!(p.a.state(), MState::Wait);
                assert!(p.a.view().handoff);
                p.exchange();
                assert_eq!((p.a.state(), p.b.state()), (MState::Wait, MState::Alone));
                // Stuck: red, neither primary nor secondary, by any rule.
                assert!(!p.a.in_transition());
                let err = p.a.handle_command(p.now, Cmd::Prim).unwrap_err();
                assert!(err.0.contains("checker ping0 is down"), "{err}");
                assert!(p.a.handle_command(p.now, Cmd::Second).is_err());
                p.now += Duration::from_secs(3);
                p.a.handle_timeout(p.now);
                p.exchange();
                assert_eq!((p.a.state(), p.b.state()), (MState::Wait, MState::Alone));
                // Up again: SECOND of the primary.
                p.a.wait_checker(p.now, None);
                drain(&mut p.a, p.now);
                // On fresh heartbeats.
                assert_eq!(p.a.state(), MState::Wait);
                p.exchange();
                if replicated {
                    assert_eq!(p.a.state(), MState::Second);
                    p.b.replication_synced(p.now);
                    drain(&mut p.b, p.now);
                    p.a.replication_synced(p.now);
                    drain(&mut p.a, p.now);
                }
                p.exchange();
                assert_eq!((p.a.state(), p.b.state()), (MState::Second, MState::Prim));
            }
        }

        #[test]
        fn a_wait_checker_down_on_alone_stops_the_application_and_nobody_runs_it() {
            let mut p = Pair::new();
            p.a.handle_command(p.now, Cmd::Start).unwrap();
            p.now += Duration::from_secs(1);
            p.a.handle_timeout(p.now);
            drain(&mut p.a, p.now);
            assert_eq!(p.a.state(), MState::Alone);
            p.a.wait_checker(p.now, Some("custom.db".into()));
            let acts = drain(&mut p.a, p.now);
            assert!(acts.contains(&Act::StopPrimary), "{acts:?}");
            assert_eq!(p.a.state(), MState::Wait);
            assert!(p.a.view().handoff, "shows it leaves the role");
            // The timeouts pass: no ALONE while the checker is down.
            for _ in 0..5 {
                p.now += Duration::from_secs(1);
                p.a.handle_timeout(p.now);
                let acts = drain(&mut p.a, p.now);
                assert!(!acts.contains(&Act::StartPrimary), "{acts:?}");
            }
            assert_eq!(p.a.state(), MState::Wait);
            // Another checker result, still down: nothing changes.
            p.a.wait_checker(p.now, Some("custom.db".into()));
            assert_eq!(drain(&mut p.a, p.now), vec![]);
            // Up again: decided as at start (peer silent: ALONE after the
            // timeout, its data up to date).
            p.a.wait_checker(p.now, None);
            drain(&mut p.a, p.now);
            assert_eq!(p.a.state(), MState::Wait);
            p.now += Duration::from_secs(1);
            p.a.handle_timeout(p.now);
            let acts = drain(&mut p.a, p.now);
            assert!(acts.contains(&Act::StartPrimary), "{acts:?}");
            assert_eq!(p.a.state(), MState::Alone);
        }

        #[test]
        fn primforce_overrides_a_wait_checker_down() {
            let mut p = Pair::new();
            p.a.handle_command(p.now, Cmd::Start).unwrap();
            p.a.wait_checker(p.now, Some("intf0".into()));
            drain(&mut p.a, p.now);
            assert!(p.a.handle_command(p.now, Cmd::Prim).is_err());
            p.a.handle_command(p.now, Cmd::PrimForce).unwrap();
            let acts = drain(&mut p.a, p.now);
            assert!(acts.contains(&Act::StartPrimary), "{acts:?}");
            assert_eq!(p.a.state(), MState::Alone);
        }

        #[test]
        fn a_wait_checker_down_on_the_second_makes_it_wait_for_good_once_its_primary_wrote_alone() {
            for replicated in [false, true] {
                let mut p = prim_second(replicated);
                let g = p.a.data().generation;
                p.b.wait_checker(p.now, Some("ping0".into()));
                let acts = drain(&mut p.b, p.now);
                assert!(!acts.contains(&Act::StartPrimary), "{acts:?}");
                assert_eq!(p.b.state(), MState::Wait);
                p.exchange();
                if replicated {
                    assert_eq!((p.a.state(), p.b.state()), (MState::Alone, MState::Wait));
                    assert_eq!(p.a.data().generation, g + 1, "writes without node2 now");
                } else {
                    // Nothing to replicate: the primary keeps its role.
                    assert_eq!((p.a.state(), p.b.state()), (MState::Prim, MState::Wait));
                }
                // node1 dies: node2, whose checker is down, does not take over,
                // nor once its checker is up (its copy is stale).
                p.now += Duration::from_secs(2);
                p.b.handle_timeout(p.now);
                p.b.wait_checker(p.now, None);
                p.now += Duration::from_secs(2);
                p.b.handle_timeout(p.now);
                let acts = drain(&mut p.b, p.now);
                assert!(!acts.contains(&Act::StartPrimary), "{acts:?}");
                assert_eq!(p.b.state(), MState::Wait);
            }
        }

        #[test]
        fn a_second_whose_wait_checker_recovers_follows_its_primary_again() {
            let mut p = prim_second(false);
            p.b.wait_checker(p.now, Some("module0".into()));
            drain(&mut p.b, p.now);
            p.exchange();
            assert_eq!(p.b.state(), MState::Wait);
            p.b.wait_checker(p.now, None);
            drain(&mut p.b, p.now);
            p.exchange();
            assert_eq!((p.a.state(), p.b.state()), (MState::Prim, MState::Second));
        }

        #[test]
        fn a_node_started_with_a_wait_checker_down_never_follows_nor_leads() {
            let mut p = Pair::new();
            p.b.wait_checker(p.now, Some("ping0".into()));
            p.a.handle_command(p.now, Cmd::Start).unwrap();
            p.b.handle_command(p.now, Cmd::Start).unwrap();
            p.exchange();
            p.now += Duration::from_secs(2);
            p.a.handle_timeout(p.now);
            p.b.handle_timeout(p.now);
            p.exchange();
            // node2 would be SECOND: it waits; node1 may be primary alone.
            assert_eq!((p.a.state(), p.b.state()), (MState::Alone, MState::Wait));
            let acts = drain(&mut p.b, p.now);
            assert!(!acts.contains(&Act::StartPrimary), "{acts:?}");
        }
    }
}

/// Deterministic simulation: two nodes exchanging views through a lossy,
/// delaying, partitionable network, with crashes, restarts, clean stops and
/// operator commands, in virtual time; invariants checked after every step.
///
/// The data is modelled in both modes, as a tree of versions: each write of
/// an application is a new version, child of the one its node held. A
/// write reaches the secondary only when it receives every write: over a
/// live replication link with replicated directories; without them, while
/// it is a SECOND in sync (counted by its PRIM: the mode's premise is that
/// it then holds the primary's data, copied at that moment) and the network
/// carries it. A PRIM that cannot reach its secondary blocks until it goes
/// ALONE, as synchronous replication does. Every start of the application is
/// checked against the data its peer holds (on its disk, running or not):
/// the node must hold all of it, except when nothing it could know told it
/// otherwise — histories that split while both ran (partition, split brain)
/// or while it was a secondary believing itself in sync (writes its primary
/// made after their link broke, unknown to it), and a node that never ran.
/// A node that was down or stopped while its peer wrote has no such excuse:
/// it must not take its own copy for the newest (SPEC §5).
///
/// Half of the seeds run with replicated directories. There the
/// replication layer is modelled too: a resynchronisation of a SECOND from
/// its primary (random duration, cancelled when either leaves its role or
/// the network splits) copies the primary's data and ends in
/// `replication_synced` on both; a live link breaks on a partition, a cut,
/// a crash or a role change, and the primary then gets `replication_lost`
/// within the send timeout.
#[cfg(test)]
mod sim {
    use std::collections::VecDeque;

    use super::*;

    const PULSE: u64 = 100;
    const TIMEOUT: u64 = 1000;
    const TICK: u64 = 10;
    const NAMES: [&str; 2] = ["n1", "n2"];

    fn name(i: usize) -> &'static str {
        NAMES[i]
    }

    /// `SplitMix64`.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
        fn chance(&mut self, percent: u64) -> bool {
            self.below(100) < percent
        }
        fn node(&mut self) -> usize {
            usize::from(self.chance(50))
        }
    }

    /// Every version of the data ever written: the parent of each (version
    /// 0, the empty data both nodes start with, is its own). A child is
    /// always numbered above its parent.
    struct Versions(Vec<usize>);

    impl Versions {
        fn write(&mut self, on: usize) -> usize {
            self.0.push(on);
            self.0.len() - 1
        }

        /// Data at version `holder` contains every write that made `v`.
        fn holds(&self, holder: usize, v: usize) -> bool {
            let mut h = holder;
            while h > v {
                h = self.0[h];
            }
            h == v
        }
    }

    /// The peer holds writes this node lacks, since `since`.
    #[derive(Debug, Clone, Copy)]
    struct Gap {
        since: u64,
        /// At the first of them this node was running as a secondary or a
        /// primary, or both nodes had been primary at once since the last
        /// reconciliation: it may not learn of them before it starts.
        excusable: bool,
    }

    /// A heartbeat in flight.
    struct Msg {
        due: u64,
        sent: u64,
        to: usize,
        view: View,
        /// The sender's data then (the model's, not on the wire).
        ver: usize,
    }

    #[expect(
        clippy::struct_excessive_bools,
        reason = "independent facts the invariants look at"
    )]
    struct Node {
        core: Option<MirrorCore>,
        disk: Persisted,
        /// The version of the data on this node's disk.
        ver: usize,
        /// False from becoming SECOND until it holds its primary's data:
        /// what it held of its own is given up (quarantined, replaced).
        counts: bool,
        gap: Option<Gap>,
        /// A heartbeat sent after the gap began reached this node while it
        /// was the writer's SECOND, or showed newer data (up to date at a
        /// higher generation) while it was not primary: it could know its
        /// data is behind.
        knows_behind: bool,
        /// Became SECOND and no resynchronisation completed since.
        unsynced_follower: bool,
        /// Its record is not the one of a node that never ran.
        ran: bool,
        /// SECOND in sync at its last step.
        was_in_sync: bool,
        /// The data of the peer at its last PRIM heartbeat heard.
        prim_ver: Option<usize>,
        /// Pending effect completions: (due ms, is start).
        effects: VecDeque<(u64, bool)>,
        next_pulse: u64,
        /// `replication_lost` due (a primary whose link broke).
        lost_at: Option<u64>,
        /// `replication_synced` due (a secondary, after its primary).
        synced_at: Option<u64>,
        /// Since when this node is PRIM without a SECOND in sync.
        prim_alone_since: Option<u64>,
        was: MState,
    }

    /// What a seed went through, to check the simulation explores it.
    #[derive(Default)]
    struct Stats {
        resyncs: u64,
        takeovers_in_sync: u64,
        waits_not_in_sync: u64,
        links_lost: u64,
        writes: u64,
        /// Starts of the application checked against a peer's data.
        starts_checked: u64,
        /// Waits because the peer may have taken over since.
        waits_peer_may_be_newer: u64,
        /// Boots of a node while its peer was down or stopped.
        lonely_boots: u64,
        /// A `wait` checker went down on a primary, and on a secondary.
        checker_downs_on_primary: u64,
        checker_downs_on_second: u64,
        /// Arbiter answers: granted, refused; witness checks unanswered.
        witness_grants: u64,
        witness_refusals: u64,
        witness_silent: u64,
        /// A primary asked the arbiter because its secondary stopped
        /// hearing it, and so did the secondary (a cut, not a crash).
        arbitrated_cuts: u64,
        /// Automatic swaps back to `defaultprim`.
        swaps_back: u64,
    }

    impl Stats {
        fn add(&mut self, s: &Self) {
            self.resyncs += s.resyncs;
            self.takeovers_in_sync += s.takeovers_in_sync;
            self.waits_not_in_sync += s.waits_not_in_sync;
            self.links_lost += s.links_lost;
            self.writes += s.writes;
            self.starts_checked += s.starts_checked;
            self.waits_peer_may_be_newer += s.waits_peer_may_be_newer;
            self.lonely_boots += s.lonely_boots;
            self.checker_downs_on_primary += s.checker_downs_on_primary;
            self.checker_downs_on_second += s.checker_downs_on_second;
            self.witness_grants += s.witness_grants;
            self.witness_refusals += s.witness_refusals;
            self.witness_silent += s.witness_silent;
            self.arbitrated_cuts += s.arbitrated_cuts;
            self.swaps_back += s.swaps_back;
        }
    }

    /// A witness check under way (one per node at most).
    #[derive(Debug, Clone, Copy)]
    struct WitnessCheck {
        generation: u64,
        /// The request reaches the witness (`None`: lost).
        arrives: Option<u64>,
        /// The answer reaches the node: (when, ok).
        answer: Option<(u64, bool)>,
        /// No answer by then: the check fails.
        deadline: u64,
    }

    #[expect(
        clippy::struct_excessive_bools,
        reason = "independent facts of the simulated world (network, witness)"
    )]
    struct World {
        rng: Rng,
        base: Instant,
        nodes: [Node; 2],
        versions: Versions,
        /// Since the last time one node took the other's data: both have
        /// been primary at once, or one went ALONE cut off from the other
        /// alive, or one that never ran started while the other had,
        /// or one started the application on data lacking the other's
        /// writes without a way to know it. Judged on the world (network,
        /// processes, data), never on the cores' records.
        split: bool,
        wire: Vec<Msg>,
        partitioned: bool,
        loss: u64,
        healthy_since: u64,
        replicated: bool,
        send_timeout: u64,
        /// Live replication: the primary's index.
        link: Option<usize>,
        /// Resynchronisation under way: (primary, due ms).
        resync: Option<(usize, u64)>,
        /// Since when a `wait` checker is down on each node (its
        /// environment: it stays down across crashes and restarts).
        checker_down: [Option<u64>; 2],
        witness: Witness,
        /// `defaultprim = "n1"` (automatic swap back), else no preference.
        prefer_n1: bool,
        /// Node i cannot reach the witness (nor it node i).
        witness_cut: [bool; 2],
        witness_down: bool,
        /// This node receives no heartbeat (its peer does).
        deaf: Option<usize>,
        /// The arbiter's grants (the real state machine).
        grants: crate::witness::grants::Grants,
        checks: [Option<WitnessCheck>; 2],
        stats: Stats,
        trace: Vec<String>,
    }

    /// How long a node waits for the witness.
    const WITNESS_TIMEOUT: u64 = 500;

    fn params(me: &str, peer: &str, replicated: bool, witness: Witness, prefer: bool) -> Params {
        Params {
            me: me.into(),
            peer: peer.into(),
            timeout: Duration::from_millis(TIMEOUT),
            failover: true,
            prefer: if prefer {
                Prefer::Node("n1".into())
            } else {
                Prefer::None
            },
            keep: Keep::FormerPrim,
            witness,
            // As the engine computes it.
            witness_grace: Duration::from_millis(match witness {
                Witness::None => 0,
                Witness::Ping => WITNESS_TIMEOUT + 500,
                Witness::Arbiter => TIMEOUT + WITNESS_TIMEOUT + 500,
            }),
            replicated,
        }
    }

    fn node() -> Node {
        Node {
            core: None,
            disk: Persisted::default(),
            ver: 0,
            counts: true,
            gap: None,
            knows_behind: false,
            unsynced_follower: false,
            ran: false,
            was_in_sync: false,
            prim_ver: None,
            effects: VecDeque::new(),
            next_pulse: 0,
            lost_at: None,
            synced_at: None,
            prim_alone_since: None,
            was: MState::Stop,
        }
    }

    fn is_primary(s: MState) -> bool {
        matches!(s, MState::Prim | MState::Alone)
    }

    impl World {
        fn new(seed: u64) -> Self {
            let mut rng = Rng(seed);
            let replicated = seed % 2 == 1;
            let witness = [Witness::None, Witness::Ping, Witness::Arbiter]
                [usize::try_from(seed / 2 % 3).unwrap_or(0)];
            let prefer_n1 = (seed / 6).is_multiple_of(2);
            let send_timeout = 100 + rng.below(TIMEOUT * 3 / 2);
            Self {
                rng,
                base: Instant::now(),
                nodes: [node(), node()],
                versions: Versions(vec![0]),
                split: false,
                wire: Vec::new(),
                partitioned: false,
                loss: 0,
                healthy_since: 0,
                replicated,
                send_timeout,
                link: None,
                resync: None,
                checker_down: [None; 2],
                witness,
                prefer_n1,
                witness_cut: [false; 2],
                witness_down: false,
                deaf: None,
                grants: crate::witness::grants::Grants::default(),
                checks: [None; 2],
                stats: Stats::default(),
                trace: vec![format!(
                    "replicated: {replicated}, send timeout {send_timeout} ms, witness {witness:?}, defaultprim n1: {prefer_n1}"
                )],
            }
        }

        fn at(&self, ms: u64) -> Instant {
            self.base + Duration::from_millis(ms)
        }

        fn state(&self, i: usize) -> MState {
            self.nodes[i]
                .core
                .as_ref()
                .map_or(MState::Stop, MirrorCore::state)
        }

        fn synced(&self, i: usize) -> bool {
            self.nodes[i].core.as_ref().is_some_and(MirrorCore::synced)
        }

        fn fail(&self, what: &str) -> String {
            let dbg: Vec<String> = self
                .nodes
                .iter()
                .map(|n| format!("{:?} data v{}", n.core, n.ver))
                .collect();
            format!("{what}\n{}\n{}", dbg.join("\n"), self.trace.join("\n"))
        }

        /// A new incarnation of node `i`, started.
        fn boot(&mut self, i: usize, t: u64) {
            let now = self.at(t);
            if self.state(1 - i) == MState::Stop {
                self.stats.lonely_boots += 1;
            }
            let n = &mut self.nodes[i];
            let mut c = MirrorCore::new(
                params(
                    name(i),
                    name(1 - i),
                    self.replicated,
                    self.witness,
                    self.prefer_n1,
                ),
                n.disk,
            );
            let _ = c.handle_command(now, Cmd::Start);
            // Its checkers start with the module and report at once.
            if self.checker_down[i].is_some() {
                c.wait_checker(now, Some("ping0".into()));
            }
            n.core = Some(c);
            n.was = MState::Wait;
            self.trace.push(format!(
                "{t}: restart {} with {:?}, data v{}",
                name(i),
                n.disk,
                n.ver
            ));
        }

        fn crash(&mut self, i: usize, t: u64) {
            let n = &mut self.nodes[i];
            n.core = None;
            n.effects.clear();
            n.lost_at = None;
            n.synced_at = None;
            n.was = MState::Stop;
            n.was_in_sync = false;
            self.checks[i] = None;
            self.trace.push(format!("{t}: crash {}", name(i)));
        }

        /// Random faults and commands, rarely.
        fn faults(&mut self, t: u64) {
            if !self.rng.chance(1) {
                return;
            }
            let now = self.at(t);
            match self.rng.below(12) {
                0 => {
                    self.partitioned = !self.partitioned;
                    self.trace
                        .push(format!("{t}: partition {}", self.partitioned));
                }
                1 => {
                    self.loss = [0, 5, 20]
                        [usize::from(self.rng.chance(33)) + usize::from(self.rng.chance(50))];
                    self.trace.push(format!("{t}: loss {}%", self.loss));
                }
                2 | 3 => {
                    let i = self.rng.node();
                    if self.nodes[i].core.is_some() {
                        self.crash(i, t);
                    } else {
                        self.boot(i, t);
                    }
                }
                4 => {
                    let i = self.rng.node();
                    if let Some(c) = self.nodes[i].core.as_mut() {
                        let r = c.handle_command(now, Cmd::Swap);
                        self.trace.push(format!("{t}: swap on {}: {r:?}", name(i)));
                    }
                }
                // Clean stop or start of the module (the daemon runs on).
                5 => {
                    let i = self.rng.node();
                    if let Some(c) = self.nodes[i].core.as_mut() {
                        let r = if c.state() == MState::Stop {
                            c.handle_command(now, Cmd::Start)
                        } else {
                            c.handle_command(now, Cmd::Stop)
                        };
                        self.trace
                            .push(format!("{t}: stop/start on {}: {r:?}", name(i)));
                    }
                }
                // The replication connection alone breaks.
                6 if self.link.is_some() => self.break_link(t, "cut"),
                // A node restarts at once (kill -9, daemon started again).
                7 => {
                    let i = self.rng.node();
                    if self.nodes[i].core.is_some() {
                        self.crash(i, t);
                        self.boot(i, t);
                    }
                }
                // A `wait` checker goes down or up again.
                8 => {
                    let i = self.rng.node();
                    let down = self.checker_down[i].is_none();
                    self.set_checker(i, t, down);
                }
                // A node loses the witness, or gets it back.
                9 => {
                    let i = self.rng.node();
                    self.witness_cut[i] = !self.witness_cut[i];
                    self.trace.push(format!(
                        "{t}: witness cut from {} {}",
                        name(i),
                        self.witness_cut[i]
                    ));
                }
                // One node stops receiving heartbeats (a one-way loss;
                // replication still flows), or hears again. Only with an
                // arbiter: without one, both sides of a one-way loss may
                // take over at the same generation (two histories the
                // generations cannot order; a known limit, see the
                // module doc).
                11 if self.witness == Witness::Arbiter => {
                    self.deaf = match self.deaf {
                        Some(_) => None,
                        None => Some(self.rng.node()),
                    };
                    self.trace.push(format!("{t}: deaf {:?}", self.deaf));
                }
                10 => {
                    self.witness_down = !self.witness_down;
                    self.trace
                        .push(format!("{t}: witness down {}", self.witness_down));
                }
                _ => {}
            }
        }

        fn set_checker(&mut self, i: usize, t: u64, down: bool) {
            let now = self.at(t);
            let state = self.state(i);
            self.checker_down[i] = down.then_some(t);
            if down && is_primary(state) {
                self.stats.checker_downs_on_primary += 1;
            }
            if down && state == MState::Second {
                self.stats.checker_downs_on_second += 1;
            }
            if let Some(c) = self.nodes[i].core.as_mut() {
                c.wait_checker(now, down.then(|| "ping0".to_owned()));
            }
            self.trace.push(format!(
                "{t}: checker on {} {}",
                name(i),
                if down { "down" } else { "up" }
            ));
        }

        fn deliver(&mut self, t: u64) {
            let now = self.at(t);
            let mut arrived = Vec::new();
            self.wire.retain(|m| {
                if m.due <= t {
                    arrived.push((m.to, m.sent, m.view, m.ver));
                    false
                } else {
                    true
                }
            });
            for (to, sent, view, ver) in arrived {
                let n = &mut self.nodes[to];
                let Some(c) = n.core.as_mut() else { continue };
                if view.state == MState::Prim {
                    n.prim_ver = Some(ver);
                }
                // Heard after the write it lacks, as the writer's SECOND or
                // in a view showing newer data. (Not a view at a lower
                // generation to a node that is not its SECOND: two
                // histories that diverged while each ran alone in turn,
                // indistinguishable by generation.)
                if n.gap.is_some_and(|g| sent >= g.since)
                    && !is_primary(c.state())
                    && (c.state() == MState::Second
                        || (view.uptodate && view.generation > n.disk.generation))
                {
                    n.knows_behind = true;
                }
                c.handle_peer(now, view);
            }
        }

        /// Both nodes hold the same data (a copy or a write that reached
        /// the secondary): nobody lacks anything, the split is over.
        fn same_data(&mut self) {
            for n in &mut self.nodes {
                n.gap = None;
                n.knows_behind = false;
                n.counts = true;
            }
            self.split = false;
        }

        /// Node `to` takes the data of `from` (resynchronisation).
        fn copy_data(&mut self, from: usize, to: usize) {
            self.nodes[to].ver = self.nodes[from].ver;
            self.same_data();
        }

        /// Node `to` takes data at version `v`, written by its peer (which
        /// may hold more since).
        fn take_data(&mut self, to: usize, v: usize) {
            let p = 1 - to;
            self.nodes[to].ver = v;
            self.nodes[to].counts = true;
            if self.versions.holds(v, self.nodes[p].ver) {
                self.same_data();
            } else {
                self.nodes[p].gap = None;
                self.nodes[p].knows_behind = false;
            }
        }

        /// Whether the application on primary `p` can write now (`None`: it
        /// blocks), and whether its peer receives the write.
        fn write_reaches(&self, p: usize) -> Option<bool> {
            let c = self.nodes[p].core.as_ref()?;
            if self.replicated {
                if self.link == Some(p) {
                    Some(true)
                } else if c.synced() {
                    // Believes its link synced while it is broken: blocks
                    // until it learns (synchronous replication).
                    None
                } else {
                    Some(false)
                }
            } else if self.state(1 - p) == MState::Second && self.synced(1 - p) && !self.partitioned
            {
                Some(true)
            } else if c.state() == MState::Prim {
                None
            } else {
                Some(false)
            }
        }

        /// The application on `p` writes a new version.
        fn write(&mut self, p: usize, t: u64, to_peer: bool) {
            let s = 1 - p;
            let v = self.versions.write(self.nodes[p].ver);
            self.nodes[p].ver = v;
            self.stats.writes += 1;
            if to_peer {
                self.nodes[s].ver = v;
                self.same_data();
            } else if self.nodes[s].gap.is_none() {
                let running = self.nodes[s].core.is_some()
                    && matches!(self.state(s), MState::Second | MState::Prim | MState::Alone);
                self.nodes[s].gap = Some(Gap {
                    since: t,
                    excusable: running || self.split,
                });
            }
        }

        /// Node `i` starts the application: it must hold what its peer
        /// holds unless it could not know better (see the module doc).
        fn check_start(&mut self, i: usize, t: u64) -> Result<(), String> {
            let (n, p) = (&self.nodes[i], &self.nodes[1 - i]);
            self.stats.starts_checked += u64::from(p.counts);
            if !n.ran && p.ran {
                // A node that never ran cannot know its peer did: its
                // start opens a second history (by design, SPEC §5).
                self.split = true;
            }
            if !p.counts || self.versions.holds(n.ver, p.ver) {
                return Ok(());
            }
            let could_know = n.knows_behind || (n.unsynced_follower && n.gap.is_some());
            let diverged = !self.versions.holds(p.ver, n.ver);
            let excusable = !n.ran || n.gap.is_some_and(|g| g.excusable);
            if !could_know && (diverged || excusable) {
                // Two histories from now on, as in a split brain.
                self.split = true;
                if let Some(g) = self.nodes[i].gap.as_mut() {
                    g.excusable = true;
                }
                return Ok(());
            }
            let (nv, pv, gap) = (n.ver, p.ver, n.gap);
            Err(self.fail(&format!(
                "{} starts the application at {t} on data v{nv} without its peer's v{pv} (gap {gap:?}, could know: {could_know}, diverged: {diverged})",
                name(i)
            )))
        }

        fn break_link(&mut self, t: u64, why: &str) {
            let Some(p) = self.link.take() else { return };
            self.nodes[1 - p].synced_at = None;
            if self.nodes[p].core.is_some() {
                let due = t + 1 + self.rng.below(self.send_timeout);
                self.nodes[p].lost_at.get_or_insert(due);
            }
            self.trace
                .push(format!("{t}: replication from {} broken ({why})", name(p)));
        }

        /// The replication layer: live link, resynchronisation, reports.
        fn replication(&mut self, t: u64) {
            let now = self.at(t);
            if let Some(p) = self.link {
                let s = 1 - p;
                let holds = !self.partitioned
                    && is_primary(self.state(p))
                    && self.state(s) == MState::Second
                    && self.synced(p)
                    // A SECOND not in sync asks for a new resync.
                    && (self.synced(s) || self.nodes[s].synced_at.is_some());
                if !holds {
                    self.break_link(t, "condition gone");
                }
            }
            if let Some((p, due)) = self.resync {
                let s = 1 - p;
                if self.partitioned || !is_primary(self.state(p)) || self.state(s) != MState::Second
                {
                    self.resync = None;
                    self.trace.push(format!("{t}: resync cancelled"));
                } else if t >= due {
                    self.resync = None;
                    self.link = Some(p);
                    self.stats.resyncs += 1;
                    // Both hold the primary's data now (what the
                    // secondary had of its own is gone).
                    self.copy_data(p, s);
                    if let Some(c) = self.nodes[p].core.as_mut() {
                        c.replication_synced(now);
                    }
                    self.nodes[s].unsynced_follower = false;
                    self.nodes[s].synced_at = Some(t + self.rng.below(60));
                    self.trace.push(format!("{t}: resync of {} done", name(s)));
                }
            }
            if self.link.is_none() && self.resync.is_none() && !self.partitioned {
                for p in 0..2 {
                    let hears_second = self.nodes[p]
                        .core
                        .as_ref()
                        .and_then(|c| c.peer)
                        .is_some_and(|v| v.state == MState::Second);
                    if is_primary(self.state(p))
                        && self.state(1 - p) == MState::Second
                        && hears_second
                        && self.nodes[p].lost_at.is_none()
                    {
                        let due = t + 200 + self.rng.below(3000);
                        self.resync = Some((p, due));
                        self.trace
                            .push(format!("{t}: resync of {} from {}", name(1 - p), name(p)));
                    }
                }
            }
            for i in 0..2 {
                let n = &mut self.nodes[i];
                if n.lost_at.is_some_and(|d| d <= t) {
                    n.lost_at = None;
                    if let Some(c) = n.core.as_mut() {
                        self.stats.links_lost += 1;
                        c.replication_lost(now);
                        self.trace
                            .push(format!("{t}: replication lost on {}", name(i)));
                    }
                }
                if n.synced_at.is_some_and(|d| d <= t) {
                    n.synced_at = None;
                    if self.link == Some(1 - i)
                        && let Some(c) = n.core.as_mut()
                    {
                        c.replication_synced(now);
                    }
                }
            }
        }

        /// One node's timers, effects, writes, actions and heartbeat.
        fn step_node(&mut self, i: usize, t: u64, heal: bool) -> Result<(), String> {
            let now = self.at(t);
            let n = &mut self.nodes[i];
            let Some(core) = n.core.as_mut() else {
                return Ok(());
            };
            if core.poll_timeout().is_some_and(|due| due <= now) {
                core.handle_timeout(now);
            }
            while n.effects.front().is_some_and(|(due, _)| *due <= t) {
                let (_, start) = n.effects.pop_front().unwrap_or((0, true));
                if start {
                    core.app_started(true);
                } else {
                    core.app_stopped(now);
                }
            }
            let writing = core.app == App::Up && is_primary(core.state());
            let acts: Vec<Act> = std::iter::from_fn(|| core.poll_action()).collect();
            if writing
                && self.rng.chance(20)
                && let Some(to_peer) = self.write_reaches(i)
            {
                self.write(i, t, to_peer);
            }
            for a in acts {
                match a {
                    Act::Persist(d) => self.nodes[i].disk = d,
                    Act::StartPrimary => {
                        self.check_start(i, t)?;
                        let n = &mut self.nodes[i];
                        // Its data is the one the application runs on now.
                        n.counts = true;
                        if self.replicated
                            && n.was == MState::Second
                            && n.core.as_ref().is_some_and(|c| c.state() == MState::Alone)
                        {
                            self.stats.takeovers_in_sync += 1;
                        }
                        let delay = if heal { 50 } else { 10 + self.rng.below(200) };
                        self.nodes[i].effects.push_back((t + delay, true));
                    }
                    Act::StopPrimary => {
                        let delay = if heal { 50 } else { 10 + self.rng.below(200) };
                        self.nodes[i].effects.push_back((t + delay, false));
                    }
                    Act::Log(l) => {
                        if l.starts_with("primary gone while this node was not") {
                            self.stats.waits_not_in_sync += 1;
                        }
                        if l.contains(PEER_MAY_BE_NEWER) {
                            self.stats.waits_peer_may_be_newer += 1;
                        }
                        if l.starts_with("defaultprim: ") {
                            self.stats.swaps_back += 1;
                        }
                        if l.contains("does not hear this node: asking the arbiter") {
                            self.stats.arbitrated_cuts += 1;
                        }
                        self.trace.push(format!("{t}: {}: {l}", name(i)));
                    }
                    Act::CheckWitness { generation } => self.ask_witness(i, t, generation),
                    Act::Quarantine | Act::Announce => {}
                }
            }
            self.role_changes(i);
            self.pulse(i, t, heal);
            Ok(())
        }

        /// What node `i`'s new state means for the world's data.
        fn role_changes(&mut self, i: usize) {
            let p = 1 - i;
            let state = self.state(i);
            // ALONE (started, or PRIM that lost its secondary) cut off from
            // a live peer, which it cannot tell from a dead one: a split
            // brain (SPEC §5: both go ALONE without a witness).
            if state == MState::Alone
                && self.nodes[i].was != MState::Alone
                && (self.partitioned || self.deaf == Some(i))
                && self.nodes[p].core.is_some()
            {
                self.split = true;
            }
            let synced = self.synced(i);
            let n = &mut self.nodes[i];
            let entered_second = state == MState::Second && n.was != MState::Second;
            let now_in_sync = state == MState::Second && synced && !n.was_in_sync;
            n.was = state;
            n.was_in_sync = state == MState::Second && synced;
            n.ran |= n.disk != Persisted::default();
            if entered_second {
                // What this node held of its own will be replaced by the
                // primary's data.
                n.counts = false;
                n.unsynced_follower |= self.replicated;
                let peer = &mut self.nodes[p];
                peer.gap = None;
                peer.knows_behind = false;
            }
            if now_in_sync && !self.replicated {
                // Without replicated directories a SECOND counted by its
                // PRIM holds its data: the mode's premise. (A PRIM blocks
                // until its SECOND is in sync: it wrote nothing since.)
                if let Some(v) = self.nodes[i].prim_ver
                    && !self.versions.holds(self.nodes[i].ver, v)
                {
                    self.take_data(i, v);
                }
            }
        }

        /// Node `i`'s heartbeat, when due.
        fn pulse(&mut self, i: usize, t: u64, heal: bool) {
            let n = &mut self.nodes[i];
            if t < n.next_pulse {
                return;
            }
            n.next_pulse = t + PULSE;
            let deaf = self.deaf == Some(1 - i);
            if heal || (!self.partitioned && !deaf && !self.rng.chance(self.loss)) {
                let due = t + if heal { 5 } else { 1 + self.rng.below(40) };
                if let Some(view) = n.core.as_ref().map(MirrorCore::view) {
                    self.wire.push(Msg {
                        due,
                        sent: t,
                        to: 1 - i,
                        view,
                        ver: n.ver,
                    });
                }
            }
        }

        fn check(&mut self, t: u64) -> Result<(), String> {
            let both_running = (0..2).all(|i| self.state(i) != MState::Stop);
            if self.witness == Witness::Arbiter
                && is_primary(self.state(0))
                && is_primary(self.state(1))
            {
                return Err(self.fail(&format!("two primaries at {t} with an arbitrating witness")));
            }
            if is_primary(self.state(0)) && is_primary(self.state(1)) {
                self.split = true;
                if both_running && t > self.healthy_since + 3 * TIMEOUT {
                    return Err(self.fail(&format!("two primaries at {t} on a healthy link")));
                }
            }
            for i in 0..2 {
                // A `wait` checker down: never SECOND, and a primary has
                // stopped its application within the time to do so.
                if let Some(since) = self.checker_down[i] {
                    let state = self.state(i);
                    if state == MState::Second || (is_primary(state) && t > since + 300) {
                        return Err(self.fail(&format!(
                            "{} {state:?} at {t} with a wait checker down since {since}",
                            name(i)
                        )));
                    }
                }
                // A node that knows its data is not the reference never
                // becomes primary by itself while its peer is down.
                let peer_down = self.nodes[1 - i].core.is_none();
                if peer_down && is_primary(self.state(i)) && !self.nodes[i].disk.uptodate {
                    return Err(self.fail(&format!(
                        "{} primary on data not up to date at {t}",
                        name(i)
                    )));
                }
                // PRIM only with a SECOND in sync, give or take the time
                // to notice a loss (send timeout, heartbeat timeout).
                if self.replicated && self.state(i) == MState::Prim {
                    let ok = self.state(1 - i) == MState::Second && self.synced(1 - i);
                    let since = &mut self.nodes[i].prim_alone_since;
                    if ok {
                        *since = None;
                    } else if t - *since.get_or_insert(t)
                        > self.send_timeout.max(TIMEOUT) + 2 * PULSE + 100
                    {
                        return Err(
                            self.fail(&format!("{} PRIM without a SECOND in sync at {t}", name(i)))
                        );
                    }
                } else {
                    self.nodes[i].prim_alone_since = None;
                }
            }
            Ok(())
        }

        fn witness_reaches(&self, i: usize) -> bool {
            !self.witness_down && !self.witness_cut[i]
        }

        /// Node `i` asks the witness (ping or arbiter).
        fn ask_witness(&mut self, i: usize, t: u64, generation: u64) {
            let arrives = self.witness_reaches(i).then(|| t + 1 + self.rng.below(150));
            self.checks[i] = Some(WitnessCheck {
                generation,
                arrives,
                answer: None,
                deadline: t + WITNESS_TIMEOUT,
            });
            self.trace.push(format!(
                "{t}: {} asks the witness for generation {generation}",
                name(i)
            ));
        }

        /// Requests reaching the witness, answers reaching the nodes.
        fn witness_step(&mut self, t: u64) {
            let now = self.at(t);
            for i in 0..2 {
                let Some(mut c) = self.checks[i] else {
                    continue;
                };
                if let Some(at) = c.arrives
                    && at <= t
                {
                    c.arrives = None;
                    if !self.witness_down {
                        let ok = match self.witness {
                            Witness::Arbiter => {
                                let d = self.grants.decide(&crate::witness::codec::Request {
                                    cluster: "sim".into(),
                                    module: "m".into(),
                                    node: name(i).into(),
                                    generation: c.generation,
                                    nonce: 0,
                                });
                                self.trace.push(format!(
                                    "{t}: witness {:?} {} generation {} (held by {} at {})",
                                    d.verdict,
                                    name(i),
                                    c.generation,
                                    d.holder,
                                    d.held
                                ));
                                d.verdict == crate::witness::codec::Verdict::Granted
                            }
                            _ => true,
                        };
                        c.answer = Some((t + 1 + self.rng.below(150), ok));
                    }
                }
                let answered = match c.answer {
                    Some((at, ok)) if at <= t && at < c.deadline => {
                        // Lost on the way back when cut meanwhile.
                        if self.witness_reaches(i) {
                            Some(ok)
                        } else {
                            c.answer = None;
                            None
                        }
                    }
                    _ => None,
                };
                let result = match answered {
                    Some(ok) => Some(ok),
                    None if t >= c.deadline => {
                        self.stats.witness_silent += 1;
                        Some(false)
                    }
                    None => None,
                };
                self.checks[i] = Some(c);
                if let Some(ok) = result {
                    self.checks[i] = None;
                    if answered.is_some() && self.witness == Witness::Arbiter {
                        if ok {
                            self.stats.witness_grants += 1;
                        } else {
                            self.stats.witness_refusals += 1;
                        }
                    }
                    self.trace
                        .push(format!("{t}: witness answer to {}: {ok}", name(i)));
                    if let Some(core) = self.nodes[i].core.as_mut() {
                        core.witness(now, ok);
                    }
                }
            }
        }

        fn tick(&mut self, t: u64, heal: bool) -> Result<(), String> {
            if !heal {
                self.faults(t);
                if self.partitioned || self.deaf.is_some() || self.loss > 20 {
                    self.healthy_since = t;
                }
            }
            self.deliver(t);
            self.witness_step(t);
            if self.replicated {
                self.replication(t);
            }
            for i in 0..2 {
                self.step_node(i, t, heal)?;
            }
            self.check(t)
        }

        /// After the heal: exactly one primary and one secondary (both in
        /// sync: PRIM), nobody stuck in a transition — or both waiting for
        /// an operator when neither holds data known up to date.
        fn final_check(&self) -> Result<(), String> {
            let states = [self.state(0), self.state(1)];
            let prim = states.iter().filter(|s| is_primary(**s)).count();
            let stuck = self
                .nodes
                .iter()
                .any(|n| n.core.as_ref().is_some_and(MirrorCore::in_transition));
            if !self.nodes[0].disk.uptodate && !self.nodes[1].disk.uptodate {
                // Legitimately waiting for an operator (e.g. both crashed
                // as secondaries of each other's failovers).
                return if states.iter().all(|s| *s == MState::Wait) {
                    Ok(())
                } else {
                    Err(self.fail(&format!("both stale but {states:?}")))
                };
            }
            let second_in_sync = (0..2).any(|i| states[i] == MState::Second && self.synced(i));
            if prim != 1 || stuck || !second_in_sync || !states.contains(&MState::Prim) {
                return Err(self.fail(&format!("after heal: {states:?} (stuck: {stuck})")));
            }
            // defaultprim: back on the preferred node once it is in sync,
            // when the other took the role over by failover.
            if self.prefer_n1 && states[0] != MState::Prim && self.nodes[1].disk.took_over {
                return Err(self.fail(&format!(
                    "after heal: {states:?}, not swapped back to defaultprim n1"
                )));
            }
            Ok(())
        }
    }

    /// Runs one seed; returns the trace on an invariant failure.
    fn run(seed: u64) -> Result<Stats, String> {
        let mut w = World::new(seed);
        for i in 0..2 {
            w.boot(i, 0);
        }
        let mut t = 0;
        while t < 60_000 {
            t += TICK;
            w.tick(t, false)?;
        }
        // Heal: both running and started, healthy link for a while.
        w.partitioned = false;
        w.witness_cut = [false; 2];
        w.witness_down = false;
        w.deaf = None;
        w.loss = 0;
        w.trace.push(format!("{t}: heal"));
        for i in 0..2 {
            if w.checker_down[i].is_some() {
                w.set_checker(i, t, false);
            }
            if w.nodes[i].core.is_none() {
                w.boot(i, t);
            }
        }
        let healed = t;
        let stop = t + 15 * TIMEOUT;
        while t < stop {
            t += TICK;
            // A module stopped by the operator (or whose stop was still
            // completing when the heal began): start it again. Not both in
            // the same instant: each could then take the other's last STOP
            // heartbeat, still in flight, for the peer's current state and
            // go ALONE (a known race of simultaneous starts, resolved as a
            // split brain; out of scope here).
            for i in 0..2 {
                let now = w.at(t);
                if let Some(c) = w.nodes[i].core.as_mut()
                    && c.state() == MState::Stop
                    && t >= healed + 3 * PULSE * u64::from(i == 1)
                    && t < stop - 5 * TIMEOUT
                {
                    let _ = c.handle_command(now, Cmd::Start);
                }
            }
            w.tick(t, true)?;
        }
        w.final_check()?;
        Ok(w.stats)
    }

    #[test]
    fn thousands_of_seeds_keep_the_invariants() {
        let seeds = std::env::var("SAFEKIT_SIM_SEEDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(1500u64);
        // `SAFEKIT_SIM_SEED=n`: that seed only (to read its trace).
        let range = match std::env::var("SAFEKIT_SIM_SEED").map(|s| s.parse::<u64>()) {
            Ok(Ok(n)) => n..n + 1,
            _ => 0..seeds,
        };
        let mut total = Stats::default();
        for seed in range {
            match run(seed) {
                Ok(s) => total.add(&s),
                Err(e) => panic!("seed {seed}: {e}"),
            }
        }
        eprintln!(
            "{seeds} seeds: {} writes, {} starts checked against the peer's data, {} boots of a node whose peer was down, {} waits for a peer that may have taken over, {} resyncs, {} replication losses, {} takeovers in sync, {} waits not in sync, wait checkers down on {} primaries and {} secondaries",
            total.writes,
            total.starts_checked,
            total.lonely_boots,
            total.waits_peer_may_be_newer,
            total.resyncs,
            total.links_lost,
            total.takeovers_in_sync,
            total.waits_not_in_sync,
            total.checker_downs_on_primary,
            total.checker_downs_on_second
        );
        eprintln!(
            "arbiter: {} grants, {} refusals; {} witness checks unanswered; {} primaries asked for a secondary that stopped hearing them; {} swaps back to defaultprim",
            total.witness_grants,
            total.witness_refusals,
            total.witness_silent,
            total.arbitrated_cuts,
            total.swaps_back
        );
        if seeds >= 100 {
            // The replicated paths are explored, and so are restarts of a
            // node that may be stale.
            assert!(total.resyncs > 0 && total.links_lost > 0);
            assert!(total.takeovers_in_sync > 0 && total.waits_not_in_sync > 0);
            assert!(total.writes > 0 && total.starts_checked > 0 && total.lonely_boots > 0);
            assert!(total.waits_peer_may_be_newer > 0);
            assert!(total.checker_downs_on_primary > 0 && total.checker_downs_on_second > 0);
            assert!(total.witness_grants > 0 && total.witness_refusals > 0);
            assert!(total.witness_silent > 0 && total.swaps_back > 0);
        }
    }
}
