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
//!   brain resolution: the former primary keeps its role).
//!
//! Rules: a node starts in WAIT. A peer PRIM/ALONE makes it SECOND. Both
//! starting: the up-to-date node with the higher generation becomes primary,
//! then `defaultprim`. Peer silent for the heartbeat timeout (or stopped):
//! ALONE only when up to date (after the witness answered, if configured),
//! else WAIT — never the application on stale data. A SECOND losing its
//! primary takes over (unless `failover = false`).

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

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
pub(crate) struct Persisted {
    pub(crate) generation: u64,
    pub(crate) uptodate: bool,
    pub(crate) took_over: bool,
    /// Was primary when it last ran (for `defaultprim = "lastprim"`).
    pub(crate) was_primary: bool,
}

impl Default for Persisted {
    /// A node that never ran: empty data, consistent with an empty peer.
    fn default() -> Self {
        Self {
            generation: 0,
            uptodate: true,
            took_over: false,
            was_primary: false,
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
                | u8::from(self.hears_peer) << 4,
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

/// Fixed parameters.
#[derive(Debug, Clone)]
pub(crate) struct Params {
    pub(crate) me: String,
    pub(crate) peer: String,
    pub(crate) timeout: Duration,
    pub(crate) failover: bool,
    pub(crate) prefer: Prefer,
    pub(crate) keep: Keep,
    pub(crate) witness: bool,
    /// After the witness answered, a secondary waits this long before it
    /// takes over, so that a primary cut from the witness has stopped its
    /// application first (its own witness check times out within it).
    pub(crate) witness_grace: Duration,
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
    /// Ask the witness; answer with `witness`.
    CheckWitness,
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

    #[cfg(test)]
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
                self.last_peer = None;
                self.decide(now);
            }
            Cmd::Stop => {
                if self.state == MState::Stop {
                    return Err(Refused("already stopped".into()));
                }
                self.stop_to(MState::Stop);
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
        let before = self.peer;
        self.peer = Some(v);
        if before != Some(v) {
            self.decide(now);
        }
    }

    pub(crate) fn handle_timeout(&mut self, now: Instant) {
        if let Some(t) = self.takeover_at
            && now >= t
        {
            self.takeover_at = None;
            if self.peer_primary() {
                self.log("takeover cancelled: the peer is primary".into());
            } else {
                self.become_primary(true);
            }
            return;
        }
        if self.state == MState::Wait
            && self.peer.is_some_and(|v| v.state == MState::Second)
            && self.started_at.is_some_and(|t| now >= t + self.p.timeout)
            && self.last_peer.is_some_and(|t| now < t + self.p.timeout)
        {
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

    pub(crate) fn witness(&mut self, now: Instant, reachable: bool) {
        if !self.witness_pending {
            return;
        }
        self.witness_pending = false;
        let primary = matches!(self.state, MState::Prim | MState::Alone);
        match (reachable, primary) {
            // A primary that still reaches the witness goes on ALONE.
            (true, true) => {}
            (true, false) => {
                self.log(format!(
                    "witness reachable: taking over in {:?}",
                    self.p.witness_grace
                ));
                self.takeover_at = Some(now + self.p.witness_grace);
            }
            (false, true) => {
                self.log("peer and witness unreachable: stopping the application, WAIT (split brain protection)".into());
                self.stop_to(MState::Wait);
            }
            (false, false) => {
                self.log(
                    "no witness answers: WAIT instead of ALONE (split brain protection)".into(),
                );
                self.wait_since = Some(now);
                self.state = MState::Wait;
            }
        }
    }

    fn peer_reset(&mut self) {
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
        self.state = MState::Second;
        let g = self.peer.map_or(self.data.generation, |v| v.generation);
        self.persist(|d| {
            d.uptodate = false;
            d.took_over = false;
            d.was_primary = false;
            d.generation = g;
        });
        // Without replicated directories there is nothing to resynchronise:
        // the secondary is in sync as soon as it follows the primary.
    }

    /// Primary: PRIM when the peer is a secondary, else ALONE (generation
    /// moves ahead: the peer's copy is stale from now on).
    fn become_primary(&mut self, by_failover: bool) {
        // A hand-over that did not happen (the peer vanished) is over.
        self.handoff = false;
        let with_second = self.peer.is_some_and(|v| v.state == MState::Second);
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
        if self.app == App::Down {
            self.app = App::Starting;
            self.actions.push_back(Act::StartPrimary);
        }
    }

    /// Takeover without the peer, through the witness when configured.
    fn go_alone(&mut self, now: Instant) {
        if !self.data.uptodate {
            if self.state != MState::Wait {
                self.state = MState::Wait;
            }
            self.wait_since = Some(now);
            return;
        }
        if self.p.witness {
            if !self.witness_pending {
                self.witness_pending = true;
                self.actions.push_back(Act::CheckWitness);
            }
            return;
        }
        self.become_primary(true);
    }

    /// True when this node should be primary rather than the peer, both
    /// waiting.
    fn wins_against(&self, v: &View) -> bool {
        let me = (self.data.uptodate, self.data.generation);
        let them = (v.uptodate, v.generation);
        if me != them {
            return me > them;
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
        let peer = self.peer;
        match self.state {
            MState::Stop => {}
            MState::Wait => match peer {
                Some(v) if matches!(v.state, MState::Prim | MState::Alone) => {
                    if v.handoff {
                        return;
                    }
                    self.become_second();
                }
                // A hand-over is for the secondary in sync, not for a node
                // that is waiting (e.g. restarted): ignore it.
                Some(v) if v.state == MState::Wait && v.handoff => {}
                // Our own hand-over found no secondary to take it: resume
                // the normal rules.
                Some(v) if v.state == MState::Wait && self.handoff => {
                    self.handoff = false;
                    self.decide(now);
                }
                Some(v) if v.state == MState::Wait => {
                    // Both waiting: the node with the newer data, if up to
                    // date, becomes primary. Neither up to date: WAIT for
                    // an operator's prim.
                    // Only once the peer hears us: else it may be about to
                    // time out and go ALONE itself.
                    if !self.handoff && self.data.uptodate && v.hears_peer && self.wins_against(&v)
                    {
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
                // Peer stopped, or silent past the timeout.
                Some(_) => self.go_alone(now),
                None => {
                    if self.wait_since.is_some_and(|t| now >= t + self.p.timeout) {
                        self.go_alone(now);
                    }
                }
            },
            MState::Second => match peer {
                Some(v) if matches!(v.state, MState::Prim | MState::Alone) => {}
                Some(v) if v.state == MState::Wait && v.handoff => self.become_primary(false),
                Some(v) if v.state == MState::Second || v.state == MState::Wait => {}
                _ => {
                    // The primary is gone (lost or stopped).
                    if self.p.failover {
                        self.log(format!("primary {} gone: taking over", self.p.peer));
                        // In sync until the primary vanished.
                        self.persist(|d| d.uptodate = true);
                        self.go_alone(now);
                    } else {
                        self.log(
                            "primary gone and failover = false: WAIT for an operator's prim".into(),
                        );
                        self.state = MState::Wait;
                        self.wait_since = Some(now);
                    }
                }
            },
            MState::Prim | MState::Alone => match peer {
                Some(v) if v.state == MState::Second => {
                    if self.state == MState::Alone {
                        self.log(format!("{} is secondary: PRIM", self.p.peer));
                    }
                    self.state = MState::Prim;
                }
                Some(v) if matches!(v.state, MState::Prim | MState::Alone) => {
                    // Split brain: both primary. One yields, deterministically.
                    let keep_me = match &self.p.keep {
                        Keep::Node(n) => n == &self.p.me,
                        Keep::FormerPrim if self.data.took_over != v.took_over => {
                            !self.data.took_over
                        }
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
                Some(v) if v.state == MState::Wait && !v.handoff => {}
                _ => {
                    if self.state == MState::Prim {
                        self.log(format!("secondary {} gone: ALONE", self.p.peer));
                        self.state = MState::Alone;
                        self.persist(|d| d.generation += 1);
                        if self.p.witness && peer.is_none() && !self.witness_pending {
                            // Lost, not stopped: are we the side cut off?
                            self.witness_pending = true;
                            self.actions.push_back(Act::CheckWitness);
                        }
                    }
                }
            },
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
            prefer: Prefer::Node("node1".into()),
            keep: Keep::FormerPrim,
            witness: false,
            witness_grace: Duration::from_millis(500),
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
        };
        let new = Persisted {
            generation: 4,
            uptodate: true,
            took_over: true,
            was_primary: true,
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
        assert!(p.b.handle_command(p.now, Cmd::Second).is_err() || true);
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
        pa.witness = true;
        let mut c = MirrorCore::new(pa, Persisted::default());
        let now = Instant::now();
        c.handle_command(now, Cmd::Start).unwrap();
        c.handle_timeout(now + Duration::from_secs(2));
        assert_eq!(c.poll_action(), Some(Act::CheckWitness));
        c.witness(now, false);
        assert_eq!(c.state(), MState::Wait);
    }

    #[test]
    fn cut_from_peer_and_witness_the_primary_stops_the_other_takes_over_after_the_grace() {
        let mut p = Pair::new();
        p.a.p.witness = true;
        p.b.p.witness = true;
        p.a.handle_command(p.now, Cmd::Start).unwrap();
        p.b.handle_command(p.now, Cmd::Start).unwrap();
        p.exchange();
        p.now += Duration::from_secs(2);
        p.a.handle_timeout(p.now);
        p.b.handle_timeout(p.now);
        // Both ask the witness; only node2 reaches it.
        assert!(std::iter::from_fn(|| p.a.poll_action()).any(|a| a == Act::CheckWitness));
        assert!(std::iter::from_fn(|| p.b.poll_action()).any(|a| a == Act::CheckWitness));
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
    fn view_round_trips() {
        let v = View {
            state: MState::Prim,
            generation: 42,
            uptodate: true,
            took_over: false,
            was_primary: true,
            handoff: true,
            hears_peer: true,
        };
        assert_eq!(View::decode(MState::Prim, &v.encode()), Some(v));
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
}

/// Deterministic simulation: two nodes exchanging views through a lossy,
/// delaying, partitionable network, with crashes, restarts and operator
/// commands, in virtual time; invariants checked after every step.
#[cfg(test)]
mod sim {
    use std::collections::VecDeque;

    use super::*;

    const PULSE: u64 = 100;
    const TIMEOUT: u64 = 1000;

    /// SplitMix64.
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
    }

    struct Node {
        core: Option<MirrorCore>,
        disk: Persisted,
        /// Pending effect completions: (due ms, is start).
        effects: VecDeque<(u64, bool)>,
        next_pulse: u64,
    }

    fn params(me: &str, peer: &str) -> Params {
        Params {
            me: me.into(),
            peer: peer.into(),
            timeout: Duration::from_millis(TIMEOUT),
            failover: true,
            prefer: Prefer::Node("n1".into()),
            keep: Keep::FormerPrim,
            witness: false,
            witness_grace: Duration::ZERO,
        }
    }

    fn primary(n: &Node) -> bool {
        n.core
            .as_ref()
            .is_some_and(|c| matches!(c.state(), MState::Prim | MState::Alone))
    }

    /// Runs one seed; returns the trace on an invariant failure.
    fn run(seed: u64) -> Result<(), String> {
        let mut rng = Rng(seed);
        let base = Instant::now();
        let at = |ms: u64| base + Duration::from_millis(ms);
        let names = ["n1", "n2"];
        let mut nodes: Vec<Node> = (0..2)
            .map(|_| Node {
                core: None,
                disk: Persisted::default(),
                effects: VecDeque::new(),
                next_pulse: 0,
            })
            .collect();
        // In flight: (arrival ms, to, view).
        let mut wire: Vec<(u64, usize, View)> = Vec::new();
        let mut partitioned = false;
        let mut loss = 0;
        let mut healthy_since = 0u64;
        let mut trace = Vec::new();
        for i in 0..2 {
            let mut c = MirrorCore::new(params(names[i], names[1 - i]), nodes[i].disk);
            let _ = c.handle_command(at(0), Cmd::Start);
            nodes[i].core = Some(c);
        }
        let end = 60_000;
        let mut t = 0;
        while t < end {
            t += 10;
            let now = at(t);
            // Random faults and commands, rarely.
            if rng.chance(1) {
                match rng.below(8) {
                    0 => {
                        partitioned = !partitioned;
                        trace.push(format!("{t}: partition {partitioned}"));
                    }
                    1 => {
                        loss = [0, 5, 20][usize::try_from(rng.below(3)).unwrap_or(0)];
                        trace.push(format!("{t}: loss {loss}%"));
                    }
                    2 | 3 => {
                        let i = usize::try_from(rng.below(2)).unwrap_or(0);
                        if nodes[i].core.take().is_some() {
                            nodes[i].effects.clear();
                            trace.push(format!("{t}: crash {}", names[i]));
                        } else {
                            let mut c =
                                MirrorCore::new(params(names[i], names[1 - i]), nodes[i].disk);
                            let _ = c.handle_command(now, Cmd::Start);
                            nodes[i].core = Some(c);
                            trace.push(format!(
                                "{t}: restart {} with {:?}",
                                names[i], nodes[i].disk
                            ));
                        }
                    }
                    4 => {
                        let i = usize::try_from(rng.below(2)).unwrap_or(0);
                        if let Some(c) = nodes[i].core.as_mut() {
                            let r = c.handle_command(now, Cmd::Swap);
                            trace.push(format!("{t}: swap on {}: {r:?}", names[i]));
                        }
                    }
                    5 => {
                        let i = usize::try_from(rng.below(2)).unwrap_or(0);
                        if let Some(c) = nodes[i].core.as_mut() {
                            let r = if c.state() == MState::Stop {
                                c.handle_command(now, Cmd::Start)
                            } else {
                                c.handle_command(now, Cmd::Stop)
                            };
                            trace.push(format!("{t}: stop/start on {}: {r:?}", names[i]));
                        }
                    }
                    _ => {}
                }
            }
            if partitioned || loss > 20 {
                healthy_since = t;
            }
            // Deliver.
            let mut arrived = Vec::new();
            wire.retain(|(due, to, v)| {
                if *due <= t {
                    arrived.push((*to, *v));
                    false
                } else {
                    true
                }
            });
            for (to, v) in arrived {
                if let Some(c) = nodes[to].core.as_mut() {
                    c.handle_peer(now, v);
                }
            }
            for i in 0..2 {
                let n = &mut nodes[i];
                let Some(c) = n.core.as_mut() else { continue };
                if c.poll_timeout().is_some_and(|d| d <= now) {
                    c.handle_timeout(now);
                }
                while n.effects.front().is_some_and(|(due, _)| *due <= t) {
                    let (_, start) = n.effects.pop_front().unwrap_or((0, true));
                    if start {
                        c.app_started(true);
                    } else {
                        c.app_stopped(now);
                    }
                }
                while let Some(a) = c.poll_action() {
                    match a {
                        Act::Persist(d) => n.disk = d,
                        Act::StartPrimary => n.effects.push_back((t + 10 + rng.below(200), true)),
                        Act::StopPrimary => n.effects.push_back((t + 10 + rng.below(200), false)),
                        Act::CheckWitness | Act::Quarantine | Act::Log(_) => {}
                    }
                }
                if t >= n.next_pulse {
                    n.next_pulse = t + PULSE;
                    if !partitioned && !rng.chance(loss) {
                        wire.push((t + 1 + rng.below(40), 1 - i, c.view()));
                    }
                }
            }
            // Invariants.
            let both_running = nodes
                .iter()
                .all(|n| n.core.as_ref().is_some_and(|c| c.state() != MState::Stop));
            if both_running
                && t > healthy_since + 3 * TIMEOUT
                && primary(&nodes[0])
                && primary(&nodes[1])
            {
                return Err(format!(
                    "two primaries at {t} on a healthy link\n{}",
                    trace.join("\n")
                ));
            }
            for i in 0..2 {
                // A node that knows its data is not the reference never
                // becomes primary by itself while its peer is down.
                let peer_down = nodes[1 - i].core.is_none();
                if peer_down && primary(&nodes[i]) && !nodes[i].disk.uptodate {
                    return Err(format!(
                        "{} primary on data not up to date at {t}\n{}",
                        names[i],
                        trace.join("\n")
                    ));
                }
            }
        }
        // Heal: both running and started, healthy link for a while: exactly
        // one primary and one secondary, nobody stuck in a transition.
        for i in 0..2 {
            if nodes[i].core.is_none() {
                let mut c = MirrorCore::new(params(names[i], names[1 - i]), nodes[i].disk);
                let _ = c.handle_command(at(t), Cmd::Start);
                nodes[i].core = Some(c);
            } else if let Some(c) = nodes[i].core.as_mut()
                && c.state() == MState::Stop
            {
                let _ = c.handle_command(at(t), Cmd::Start);
            }
        }
        let stop = t + 10 * TIMEOUT;
        while t < stop {
            t += 10;
            let now = at(t);
            let mut arrived = Vec::new();
            wire.retain(|(due, to, v)| {
                if *due <= t {
                    arrived.push((*to, *v));
                    false
                } else {
                    true
                }
            });
            for (to, v) in arrived {
                if let Some(c) = nodes[to].core.as_mut() {
                    c.handle_peer(now, v);
                }
            }
            for i in 0..2 {
                let n = &mut nodes[i];
                let Some(c) = n.core.as_mut() else { continue };
                // An operator's stop still completing when the heal began:
                // start the module again.
                if c.state() == MState::Stop && t < stop - 5 * TIMEOUT {
                    let _ = c.handle_command(now, Cmd::Start);
                }
                if c.poll_timeout().is_some_and(|d| d <= now) {
                    c.handle_timeout(now);
                }
                while n.effects.front().is_some_and(|(due, _)| *due <= t) {
                    let (_, start) = n.effects.pop_front().unwrap_or((0, true));
                    if start {
                        c.app_started(true);
                    } else {
                        c.app_stopped(now);
                    }
                }
                while let Some(a) = c.poll_action() {
                    match a {
                        Act::Persist(d) => n.disk = d,
                        Act::StartPrimary => n.effects.push_back((t + 50, true)),
                        Act::StopPrimary => n.effects.push_back((t + 50, false)),
                        _ => {}
                    }
                }
                if t >= n.next_pulse {
                    n.next_pulse = t + PULSE;
                    wire.push((t + 5, 1 - i, c.view()));
                }
            }
        }
        let states: Vec<MState> = nodes
            .iter()
            .map(|n| n.core.as_ref().map_or(MState::Stop, MirrorCore::state))
            .collect();
        let prim = states
            .iter()
            .filter(|s| matches!(s, MState::Prim | MState::Alone))
            .count();
        let stuck = nodes
            .iter()
            .any(|n| n.core.as_ref().is_some_and(MirrorCore::in_transition));
        let both_stale = !nodes[0].disk.uptodate && !nodes[1].disk.uptodate;
        if both_stale {
            // Legitimately waiting for an operator (e.g. both crashed as
            // secondaries of each other's failovers).
            return if states.iter().all(|s| *s == MState::Wait) {
                Ok(())
            } else {
                Err(format!("both stale but {states:?}\n{}", trace.join("\n")))
            };
        }
        if prim != 1
            || stuck
            || !states.contains(&MState::Second)
            || !states.iter().any(|s| matches!(s, MState::Prim))
        {
            let dbg: Vec<String> = nodes.iter().map(|n| format!("{:?}", n.core)).collect();
            return Err(format!(
                "after heal: {states:?} (stuck: {stuck})\n{}\n{}",
                dbg.join("\n"),
                trace.join("\n")
            ));
        }
        Ok(())
    }

    #[test]
    fn thousands_of_seeds_keep_the_invariants() {
        let seeds = std::env::var("SAFEKIT_SIM_SEEDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(1500u64);
        for seed in 0..seeds {
            if let Err(e) = run(seed) {
                panic!("seed {seed}: {e}");
            }
        }
    }
}
