//! The engine: owns the modules, turns heartbeats, timers and commands into
//! state changes, and sends heartbeats. Single task; no locks on its state.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use tokio::sync::{mpsc, oneshot};

#[path = "engine_mirror.rs"]
mod mirror_glue;
#[path = "engine_mirror_seq.rs"]
mod mirror_seq;

use mirror_glue::MirrorRt;

use super::{
    Shared, StartError, checks,
    farm::{self, Dataplane, FarmRt},
    net::LanSocket,
};
use crate::{
    config::{ClusterConfig, Config, FarmFilterBackend, Mode as ConfigMode, ModuleConfig, When},
    control::{Request, Response},
    daemon::mirror_core::Cmd,
    farm::membership::{self, View},
    heartbeat::{self, Heartbeat, HeartbeatKey, Rejected, ReplayWindow},
    metrics::Metrics,
    modlog::ModuleLog,
    paths::Paths,
    script::ScriptEnv,
    status::{
        Colour, FarmStatus, Mode, ModuleState, ModuleStatus, NodeStatus, PeerStatus, bucket_ranges,
    },
};

/// Inputs of the engine.
#[derive(Debug)]
pub enum Event {
    /// A datagram arrived on heartbeat socket `lan`.
    Datagram {
        /// Index of the LAN socket.
        lan: usize,
        /// Source address.
        from: SocketAddr,
        /// Contents.
        bytes: Vec<u8>,
    },
    /// A `safekit` command.
    Control {
        /// The request.
        req: Request,
        /// Where the answer goes.
        reply: oneshot::Sender<Response>,
    },
    /// SIGTERM or SIGINT: stop everything and exit.
    Signal,
    /// An effect run off the engine task finished.
    Effect {
        /// Module.
        module: String,
        /// What finished.
        done: EffectDone,
    },
    /// A replicated directory's link changed (primary side).
    RfsPrimary {
        /// Module.
        module: String,
        /// What happened.
        ev: crate::rfs::RfsEvent,
    },
    /// The replication listener reports (secondary side).
    RfsSecondary(crate::rfs::SecondaryEvent),
    /// A checker's result.
    Check {
        /// Module.
        module: String,
        /// Checker id within the module.
        id: String,
        /// What it checks (for the log).
        what: String,
        /// Outcome.
        result: Result<(), String>,
    },
}

/// Completion of an effect.
#[derive(Debug)]
pub enum EffectDone {
    /// Farm data plane up (or why not).
    FarmUp(Result<crate::sys::vip::Interface, String>),
    /// Farm data plane down.
    FarmDown(Result<(), String>),
    /// Mirror: primary up (VIP, ARP, `start_prim`) or why not.
    PrimaryUp(Result<super::mirror::PrimaryUp, String>),
    /// Mirror: primary down.
    PrimaryDown(Result<(), String>),
    /// Mirror: a split-brain witness answered (or none did).
    Witness(bool),
    /// Mirror: `prestart` finished (or why it failed).
    Prestart(Result<(), String>),
    /// Mirror: `poststop` finished (or why it failed).
    Poststop(Result<(), String>),
}

/// What this node knows of one peer's instance of a module.
#[derive(Debug, Default)]
struct Peer {
    state: Option<ModuleState>,
    last_seen: BTreeMap<usize, Instant>,
    lost: bool,
    payload: Vec<u8>,
}

/// One module on this node.
#[derive(Debug)]
struct Module {
    cfg: ModuleConfig,
    log: ModuleLog,
    state: ModuleState,
    /// Peers of this module (every other cluster node).
    peers: BTreeMap<String, Peer>,
    /// Heartbeat LANs (indices into the engine's sockets).
    lans: Vec<usize>,
    pulse: Duration,
    timeout: Duration,
    next_pulse: Instant,
    counter: u64,
    /// An effect is running (start or stop in progress).
    busy: bool,
    /// The operator wants it running.
    wanted: bool,
    /// Failing checkers: id -> reason.
    failing: BTreeMap<String, String>,
    /// Every checker's last result (status, API, console), cleared when
    /// the checkers stop.
    last_checks: BTreeMap<String, crate::status::CheckerStatus>,
    checks: Vec<tokio::task::JoinHandle<()>>,
    farm: Option<FarmRt>,
    mirror: Option<MirrorRt>,
    /// `stopstart`: start again once stopped.
    restart_after_stop: bool,
    /// Next evaluation of the `[[check.module]]` checkers.
    next_module_check: Instant,
}

impl Module {
    fn colour(&self) -> Colour {
        if let Some(rt) = &self.mirror {
            return rt.colour();
        }
        match self.state {
            ModuleState::Stop => Colour::Red,
            // Stuck on a failed checker: red; in transition: orange.
            ModuleState::Wait if !self.failing.is_empty() && !self.busy => Colour::Red,
            ModuleState::Wait => Colour::Orange,
            ModuleState::Alone | ModuleState::Prim | ModuleState::Up | ModuleState::Second => {
                Colour::Green
            }
        }
    }

    fn set_state(&mut self, state: ModuleState) {
        if self.state != state {
            self.log
                .info(&format!("state {} -> {}", self.state.name(), state.name()));
            self.state = state;
            // Tell the peers now rather than at the next pulse.
            self.next_pulse = Instant::now();
        }
    }
}

/// The engine.
pub struct Engine {
    paths: Paths,
    cluster: ClusterConfig,
    me: String,
    epoch: u64,
    key: HeartbeatKey,
    sockets: Vec<LanSocket>,
    modules: BTreeMap<String, Module>,
    replay: HashMap<(String, String), ReplayWindow>,
    metrics: Arc<Metrics>,
    shutting_down: bool,
    events: mpsc::Sender<Event>,
    dataplane: Dataplane,
    /// Effects still running at shutdown.
    pending: usize,
    /// Replicated directories this node receives (served on TCP 5600).
    pub(super) registry: std::sync::Arc<crate::rfs::Registry>,
    /// After a stall of this process: no peer is judged lost before this.
    stall_grace: Option<Instant>,
}

/// A gap between two turns of the main loop (which turns at least once a
/// second) longer than this means the daemon was not running.
const STALL_GAP: Duration = Duration::from_millis(1500);
/// How long the heartbeat receivers get after a stall to deliver what came
/// meanwhile.
const STALL_GRACE: Duration = Duration::from_millis(300);

impl Engine {
    /// Whether a module replicates directories (the listener is needed).
    pub(super) fn replicates(&self) -> bool {
        self.modules.values().any(|m| m.cfg.rfs.is_some())
    }

    /// This node's replication address.
    pub(super) fn replication_addr(&self) -> Option<SocketAddr> {
        let lan = self.cluster.replication_lan()?;
        let ip = *self.cluster.node(&self.me)?.addrs.get(&lan.name)?;
        Some(SocketAddr::new(ip, self.cluster.ports.replication))
    }

    /// The cluster key.
    pub(super) fn cluster_key(&self) -> &[u8] {
        &self.cluster.key
    }

    /// Builds the engine; persists a new epoch (incarnation) first, so the
    /// heartbeat counters that restart at 0 are never taken as replays.
    pub(super) fn new(
        paths: Paths,
        config: Config,
        me: String,
        sockets: Vec<LanSocket>,
        metrics: Arc<Metrics>,
        events: mpsc::Sender<Event>,
        dataplane: Dataplane,
    ) -> Result<Self, StartError> {
        let epoch = bump_epoch(&paths)?;
        let now = Instant::now();
        let key = HeartbeatKey::derive(&config.cluster.key);
        let mut modules = BTreeMap::new();
        for (name, cfg) in config.modules {
            if !cfg.service.nodes.contains(&me) {
                tracing::info!(module = %name, "not configured on this node");
                continue;
            }
            let (pulse, timeout, lan_names) = cfg.heartbeat();
            let (pulse, timeout, lan_names) = (pulse, timeout, lan_names.to_vec());
            let lans = sockets
                .iter()
                .enumerate()
                .filter(|(_, s)| lan_names.contains(&s.lan))
                .map(|(i, _)| i)
                .collect();
            let peers = cfg
                .service
                .nodes
                .iter()
                .filter(|n| **n != me)
                .map(|n| (n.clone(), Peer::default()))
                .collect();
            let log = ModuleLog::new(paths.module_log(&name));
            log.info(&format!("safekitd epoch {epoch}: module loaded on {me}"));
            modules.insert(
                name,
                Module {
                    log: log.clone(),
                    state: ModuleState::Stop,
                    peers,
                    lans,
                    pulse,
                    timeout,
                    next_pulse: now,
                    counter: 0,
                    busy: false,
                    wanted: false,
                    failing: BTreeMap::new(),
                    last_checks: BTreeMap::new(),
                    checks: Vec::new(),
                    farm: (cfg.mode() == ConfigMode::Farm).then(|| FarmRt::new(&cfg)),
                    mirror: (cfg.mode() == ConfigMode::Mirror)
                        .then(|| MirrorRt::new(&cfg, &me, &paths, &log)),
                    restart_after_stop: false,
                    next_module_check: now,
                    cfg,
                },
            );
        }
        tracing::info!(node = %me, epoch, modules = modules.len(), "safekitd started");
        Ok(Self {
            paths,
            cluster: config.cluster,
            me,
            epoch,
            key,
            sockets,
            modules,
            replay: HashMap::new(),
            metrics,
            shutting_down: false,
            events,
            dataplane,
            pending: 0,
            registry: crate::rfs::Registry::new(),
            stall_grace: None,
        })
    }

    /// The main loop: wait for an event or the next deadline, step, publish.
    pub(super) async fn run(mut self, mut rx: mpsc::Receiver<Event>, shared: Arc<Shared>) {
        let mut last = Instant::now();
        loop {
            // During a stall grace, only events and its end wake the loop
            // (other deadlines are past and would spin it).
            let deadline = self.stall_grace.unwrap_or_else(|| self.next_deadline());
            tokio::select! {
                ev = rx.recv() => match ev {
                    Some(ev) => self.handle_event(Instant::now(), ev),
                    None => return,
                },
                () = tokio::time::sleep_until(deadline.into()) => {}
            }
            let now = Instant::now();
            // The loop runs at least once a second: a longer gap means this
            // process was not running (SIGSTOP, a paused VM, starvation).
            // Heartbeats that arrived meanwhile wait in the sockets: let the
            // receivers deliver them before judging any peer lost.
            let gap = now.saturating_duration_since(last);
            last = now;
            if gap > STALL_GAP {
                tracing::warn!(
                    ?gap,
                    "safekitd was not running for a while: peers get a grace before being judged"
                );
                self.stall_grace = Some(now + STALL_GRACE);
            }
            match self.stall_grace {
                Some(t) if now < t => self.send_due_heartbeats(now),
                _ => {
                    self.stall_grace = None;
                    self.handle_timeout(now);
                }
            }
            *shared.status.write().await = self.status(now);
            shared.changes.send_modify(|n| *n = n.wrapping_add(1));
            if self.shutting_down && self.pending == 0 {
                tracing::info!("safekitd stopped");
                let _ = std::fs::remove_file(self.paths.control_socket());
                return;
            }
        }
    }

    fn next_deadline(&self) -> Instant {
        let now = Instant::now();
        let mut next = now + Duration::from_secs(1);
        for m in self.modules.values() {
            next = next.min(m.next_pulse);
            if !m.cfg.check_module.is_empty() && m.state != ModuleState::Stop {
                next = next.min(m.next_module_check);
            }
            if let Some(t) = m.mirror.as_ref().and_then(|rt| rt.core.poll_timeout()) {
                next = next.min(t);
            }
            for p in m.peers.values() {
                if let Some(last) = p.last_seen.values().max()
                    && !p.lost
                {
                    next = next.min(*last + m.timeout);
                }
            }
        }
        next
    }

    fn handle_event(&mut self, now: Instant, ev: Event) {
        match ev {
            Event::Datagram { lan, from, bytes } => {
                if let Err(why) = self.handle_datagram(now, lan, from, &bytes) {
                    self.metrics.reject(why);
                    tracing::debug!(%from, reason = why.label(), "heartbeat rejected");
                }
            }
            Event::Control {
                req: Request::RfsVerify { module },
                reply,
            } => self.rfs_verify(&module, reply),
            Event::Control { req, reply } => {
                let resp = self.handle_request(now, req);
                let _ = reply.send(resp);
            }
            Event::Signal => {
                self.stop_all();
                self.shutting_down = true;
            }
            Event::Effect { module, done } => self.effect_done(&module, done),
            Event::RfsPrimary { module, ev } => self.rfs_primary_event(&module, ev),
            Event::RfsSecondary(ev) => self.rfs_secondary_event(ev),
            Event::Check {
                module,
                id,
                what,
                result,
            } => self.check_result(&module, id, &what, result),
        }
    }

    fn handle_datagram(
        &mut self,
        now: Instant,
        lan: usize,
        from: SocketAddr,
        bytes: &[u8],
    ) -> Result<(), Rejected> {
        let hb = heartbeat::decode(bytes, &self.key)?;
        if hb.cluster != self.cluster.name {
            return Err(Rejected::WrongCluster);
        }
        if hb.node == self.me {
            return Err(Rejected::UnknownNode);
        }
        let node = self.cluster.node(&hb.node).ok_or(Rejected::UnknownNode)?;
        let lan_name = &self.sockets[lan].lan;
        if node.addrs.get(lan_name) != Some(&from.ip()) {
            return Err(Rejected::WrongSource);
        }
        let module = self
            .modules
            .get_mut(&hb.module)
            .ok_or(Rejected::UnknownModule)?;
        let state = ModuleState::from_code(hb.state).ok_or(Rejected::Malformed)?;
        let peer = module
            .peers
            .get_mut(&hb.node)
            .ok_or(Rejected::UnknownModule)?;
        let window = self
            .replay
            .entry((hb.node.clone(), hb.module.clone()))
            .or_default();
        if !window.check_and_record(hb.epoch, hb.counter) {
            return Err(Rejected::Replay);
        }
        if let Some(c) = self.metrics.modules.get(&hb.module) {
            c.heartbeats_received.fetch_add(1, Ordering::Relaxed);
        }
        if peer.lost || peer.state != Some(state) {
            module.log.info(&format!(
                "peer {} is {}{}",
                hb.node,
                state.name(),
                if peer.lost { " (back)" } else { "" }
            ));
        }
        let changed = peer.lost || peer.state != Some(state) || peer.payload != hb.payload;
        peer.lost = false;
        peer.state = Some(state);
        peer.payload = hb.payload;
        peer.last_seen.insert(lan, now);
        let name = hb.module;
        if self.modules.get(&name).is_some_and(|m| m.mirror.is_some()) {
            let payload = self.modules[&name].peers[&hb.node].payload.clone();
            self.mirror_peer(&name, now, state, &payload);
        } else if changed {
            self.farm_refresh(&name);
        }
        Ok(())
    }

    fn handle_request(&mut self, now: Instant, req: Request) -> Response {
        match req {
            Request::State => Response::State {
                status: self.status(now),
            },
            Request::Start { module } => match self.start_module(&module) {
                Ok(message) => Response::Ok { message },
                Err(error) => Response::Error { error },
            },
            Request::Stop { module } => match self.stop_module(&module) {
                Ok(message) => Response::Ok { message },
                Err(error) => Response::Error { error },
            },
            Request::FarmWhich {
                module,
                client,
                port,
                dport,
            } => match self.farm_which(&module, client, port, dport) {
                Ok(r) => r,
                Err(error) => Response::Error { error },
            },
            Request::RfsVerify { .. } => Response::Error {
                error: "verify is answered asynchronously".into(),
            },
            Request::Mirror {
                module,
                cmd,
                fullsync,
            } => {
                use crate::control::MirrorCmd as M;
                if fullsync {
                    self.rfs_fullsync(&module, cmd == M::Second);
                }
                let r = match cmd {
                    M::Prim => self.mirror_command(&module, Cmd::Prim),
                    M::Second => self.mirror_command(&module, Cmd::Second),
                    M::PrimForce => self.mirror_command(&module, Cmd::PrimForce),
                    M::Swap => self.mirror_command(&module, Cmd::Swap),
                    M::Restart => self.mirror_command(&module, Cmd::Restart),
                    M::ForceStop => self.mirror_forcestop(&module),
                    M::StopStart => {
                        let r = self.mirror_command(&module, Cmd::Stop);
                        if r.is_ok()
                            && let Some(m) = self.modules.get_mut(&module)
                        {
                            m.restart_after_stop = true;
                        }
                        r
                    }
                };
                match r {
                    Ok(message) => Response::Ok { message },
                    Err(error) => Response::Error { error },
                }
            }
            Request::SetResource {
                module,
                resource,
                up,
            } => {
                let known = self.modules.get(&module).map(|m| {
                    resource
                        .strip_prefix("custom.")
                        .is_some_and(|n| m.cfg.check_custom.iter().any(|c| c.name == n))
                });
                match known {
                    None => Response::Error {
                        error: format!("no module {module:?} on this node"),
                    },
                    Some(false) => Response::Error {
                        error: format!(
                            "module {module} has no resource {resource:?} (custom.<name> of a [[check.custom]])"
                        ),
                    },
                    Some(true) => {
                        let what = resource.replace('.', " ");
                        let result = if up {
                            Ok(())
                        } else {
                            Err("set down".to_owned())
                        };
                        self.check_result(&module, resource.clone(), &what, result);
                        Response::Ok {
                            message: format!(
                                "{resource} of {module} set {}",
                                if up { "up" } else { "down" }
                            ),
                        }
                    }
                }
            }
            Request::Shutdown => {
                self.stop_all();
                self.shutting_down = true;
                Response::Ok {
                    message: format!("safekitd on {} is shutting down", self.me),
                }
            }
        }
    }

    fn module_mut(&mut self, name: &str) -> Result<&mut Module, String> {
        let known: Vec<String> = self.modules.keys().cloned().collect();
        self.modules.get_mut(name).ok_or_else(|| {
            format!(
                "no module {name:?} on this node (modules: {})",
                known.join(", ")
            )
        })
    }

    fn start_module(&mut self, name: &str) -> Result<String, String> {
        let me = self.me.clone();
        let root = self.paths.root().to_path_buf();
        let module_dir = self.paths.module_dir(name);
        let tx = self.events.clone();
        let dataplane = self.dataplane.clone();
        let m = self.module_mut(name)?;
        if m.busy {
            return Err(format!("module {name} is busy ({}), try again", m.state));
        }
        if m.state != ModuleState::Stop {
            return Err(format!("module {name} is already started ({})", m.state));
        }
        m.log.info("start requested");
        m.wanted = true;
        match m.cfg.mode() {
            ConfigMode::Farm => {
                m.set_state(ModuleState::Wait);
                m.busy = true;
                m.failing.clear();
                m.last_checks.clear();
                let job = farm_job(m, &me, &root, module_dir.clone(), dataplane);
                m.checks =
                    checks::spawn(&m.cfg, &[When::Both, When::Pre], &tx, &job.env, &module_dir);
                let module = name.to_owned();
                tokio::spawn(async move {
                    let r = farm::up(job).await;
                    let _ = tx
                        .send(Event::Effect {
                            module,
                            done: EffectDone::FarmUp(r),
                        })
                        .await;
                });
                Ok(format!("module {name} starting"))
            }
            ConfigMode::Mirror => {
                m.busy = false;
                self.mirror_command(name, Cmd::Start)
            }
        }
    }

    fn stop_module(&mut self, name: &str) -> Result<String, String> {
        let m = self.module_mut(name)?;
        if m.mirror.is_some() {
            m.wanted = false;
            m.restart_after_stop = false;
            return self.mirror_command(name, Cmd::Stop);
        }
        if m.state == ModuleState::Stop && !m.busy {
            return Err(format!("module {name} is already stopped"));
        }
        m.log.info("stop requested");
        m.wanted = false;
        if m.busy {
            // The running start completes, then effect_done stops it.
            return Ok(format!("module {name} stopping after its start completes"));
        }
        self.begin_stop(name);
        Ok(format!("module {name} stopping"))
    }

    /// Releases everything the module holds, in a safe order: buckets first
    /// (synchronously, so no bucket stays owned once STOP is announced),
    /// then the effects.
    fn begin_stop(&mut self, name: &str) {
        let me = self.me.clone();
        let root = self.paths.root().to_path_buf();
        let module_dir = self.paths.module_dir(name);
        let tx = self.events.clone();
        let dataplane = self.dataplane.clone();
        let Some(m) = self.modules.get_mut(name) else {
            return;
        };
        for h in m.checks.drain(..) {
            h.abort();
        }
        m.failing.clear();
        m.last_checks.clear();
        if let Some(f) = m.farm.as_mut() {
            if let Err(e) = f.apply_owned(&dataplane, vec![false; safekit_common::BUCKETS as usize])
            {
                m.log.error(&format!("releasing buckets: {e}"));
            }
            f.view.clear();
            let iface = f.iface.take();
            let job = farm_job(m, &me, &root, module_dir, dataplane);
            m.busy = true;
            m.set_state(ModuleState::Wait);
            self.pending += 1;
            let module = name.to_owned();
            tokio::spawn(async move {
                let r = farm::down(job, iface).await;
                let _ = tx
                    .send(Event::Effect {
                        module,
                        done: EffectDone::FarmDown(r),
                    })
                    .await;
            });
        } else {
            m.set_state(ModuleState::Stop);
        }
    }

    fn effect_done(&mut self, name: &str, done: EffectDone) {
        if !matches!(done, EffectDone::FarmUp(_) | EffectDone::FarmDown(_)) {
            self.mirror_effect(name, done);
            return;
        }
        let shutting_down = self.shutting_down;
        let Some(m) = self.modules.get_mut(name) else {
            return;
        };
        m.busy = false;
        match done {
            EffectDone::FarmUp(Ok(iface)) => {
                if let Some(f) = m.farm.as_mut() {
                    f.iface = Some(iface);
                }
                if !m.wanted || shutting_down {
                    self.begin_stop(name);
                    return;
                }
                let state = if m.failing.is_empty() {
                    ModuleState::Up
                } else {
                    ModuleState::Wait
                };
                m.set_state(state);
                self.farm_refresh(name);
            }
            EffectDone::FarmUp(Err(e)) => {
                m.log.error(&format!("start failed: {e}"));
                m.wanted = false;
                self.begin_stop(name);
            }
            EffectDone::PrimaryUp(_)
            | EffectDone::PrimaryDown(_)
            | EffectDone::Witness(_)
            | EffectDone::Prestart(_)
            | EffectDone::Poststop(_) => {}
            EffectDone::FarmDown(r) => {
                self.pending = self.pending.saturating_sub(1);
                if let Err(e) = r {
                    m.log.error(&format!("stop: {e}"));
                }
                m.set_state(ModuleState::Stop);
                if m.wanted && !shutting_down {
                    // A start arrived while stopping.
                    m.wanted = false;
                    let _ = self.start_module(name);
                }
            }
        }
    }

    fn check_result(&mut self, name: &str, id: String, what: &str, result: Result<(), String>) {
        let Some(m) = self.modules.get_mut(name) else {
            return;
        };
        if m.state == ModuleState::Stop && !m.busy {
            return;
        }
        m.last_checks.insert(
            id.clone(),
            crate::status::CheckerStatus {
                id: id.clone(),
                what: what.to_owned(),
                up: result.is_ok(),
                reason: result.as_ref().err().cloned(),
                at_ms: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            },
        );
        let before = m.failing.is_empty();
        let failed_now = result.is_err();
        let check_id = id.clone();
        let mut recovered = false;
        match result {
            Ok(()) => {
                if m.failing.remove(&id).is_some() {
                    recovered = true;
                    m.log.info(&format!("checker {what} is up again"));
                }
            }
            Err(why) => {
                if !m.failing.contains_key(&id) {
                    m.log.error(&format!("checker {what} is down: {why}"));
                }
                m.failing.insert(id, why);
            }
        }
        let after = m.failing.is_empty();
        if m.mirror.is_some() {
            // Failures, and recoveries (a `wait` checker up again).
            if failed_now || recovered {
                self.mirror_check(name, &check_id, failed_now);
            }
            return;
        }
        if before == after || m.busy {
            return;
        }
        // Farm: a failed checker takes the node out of the farm until it
        // recovers.
        if m.farm.is_some() {
            let state = if after {
                ModuleState::Up
            } else {
                ModuleState::Wait
            };
            m.set_state(state);
            self.farm_refresh(name);
        }
    }

    /// Recomputes a farm module's view and bucket ownership after a change
    /// of local state or of a peer's state or view.
    fn farm_refresh(&mut self, name: &str) {
        let me = self.me.clone();
        let dataplane = self.dataplane.clone();
        let Some(m) = self.modules.get_mut(name) else {
            return;
        };
        let Some(f) = m.farm.as_mut() else {
            return;
        };
        let up = |p: &Peer| !p.lost && p.state == Some(ModuleState::Up);
        let mut view: View = m
            .peers
            .iter()
            .filter(|(_, p)| up(p))
            .map(|(n, _)| n.clone())
            .collect();
        if m.state == ModuleState::Up {
            view.insert(me.clone());
        }
        let peer_views: Vec<View> = m
            .peers
            .values()
            .filter(|p| up(p))
            .filter_map(|p| membership::decode_view(&p.payload))
            .collect();
        let owned = membership::owned(&me, &f.powers, &view, &peer_views);
        if owned != f.owned {
            let n = owned.iter().filter(|b| **b).count();
            if let Err(e) = f.apply_owned(&dataplane, owned) {
                m.log.error(&format!("updating bucket ownership: {e}"));
            } else {
                m.log
                    .info(&format!("owns {n} of {} buckets", safekit_common::BUCKETS));
            }
        }
        if view != f.view {
            m.log.info(&format!(
                "farm membership: {}",
                view.iter()
                    .map(String::as_str)
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
            f.view = view;
            // Tell the peers at once, and re-announce the VIP.
            m.next_pulse = Instant::now();
            if let (Some(iface), Some(v)) = (f.iface.clone(), m.cfg.vip.as_ref()) {
                tokio::spawn(farm::announce(
                    iface,
                    f.vips.clone(),
                    f.vmac,
                    v.garp_count,
                    v.garp_interval,
                    m.log.clone(),
                ));
            }
        }
    }

    fn farm_which(
        &mut self,
        name: &str,
        client: std::net::IpAddr,
        port: Option<u16>,
        dport: Option<u16>,
    ) -> Result<Response, String> {
        let m = self.module_mut(name)?;
        let f = m
            .farm
            .as_ref()
            .ok_or_else(|| format!("module {name} is not a farm module"))?;
        let std::net::IpAddr::V4(ip) = client else {
            return Err("farm filters are IPv4 only".into());
        };
        let rule = match dport {
            Some(d) => f
                .rules
                .iter()
                .find(|r| r.port == d)
                .or_else(|| f.rules.iter().find(|r| r.port == 0))
                .ok_or_else(|| format!("module {name} has no rule for port {d}"))?,
            None => f.rules.first().ok_or("module has no rule")?,
        };
        let (bucket, filter) = if rule.filter == safekit_common::FILTER_CLIENT_IP {
            (
                safekit_common::bucket_client_ip(ip.octets(), 0),
                "client_ip",
            )
        } else {
            let p = port.ok_or("this rule hashes the client port too: give IP:PORT")?;
            (
                safekit_common::bucket_client_ip_port(ip.octets(), p.to_be_bytes(), 0),
                "client_ip_port",
            )
        };
        let node = membership::assignment(&f.view, &f.powers)
            .owner(bucket)
            .map(str::to_owned);
        Ok(Response::Which {
            bucket,
            node,
            filter: filter.to_owned(),
        })
    }

    /// `[[check.module]]`: another module (here or on a node) must be in
    /// one of the accepted states. Evaluated from what this node knows:
    /// its own modules, and its peers' states from heartbeats.
    fn module_checks(&mut self, now: Instant) {
        let mut results = Vec::new();
        for (name, m) in &self.modules {
            if m.cfg.check_module.is_empty()
                || now < m.next_module_check
                || (m.state == ModuleState::Stop && !m.busy)
            {
                continue;
            }
            for (i, c) in m.cfg.check_module.iter().enumerate() {
                let node = c.node.clone().unwrap_or_else(|| self.me.clone());
                let seen = if node == self.me {
                    self.modules.get(&c.name).map(|o| o.state)
                } else {
                    self.modules
                        .get(&c.name)
                        .and_then(|o| o.peers.get(&node))
                        .and_then(|p| p.state)
                };
                let result = match seen {
                    Some(st) if c.states.contains(&st) => Ok(()),
                    Some(st) => Err(format!("{} on {node} is {st}", c.name)),
                    None => Err(format!("state of {} on {node} unknown", c.name)),
                };
                results.push((
                    name.clone(),
                    format!("module{i}"),
                    format!("module {} on {node}", c.name),
                    result,
                ));
            }
        }
        for (name, id, what, result) in results {
            if let Some(m) = self.modules.get_mut(&name) {
                let every = m
                    .cfg
                    .check_module
                    .iter()
                    .map(|c| c.interval)
                    .min()
                    .unwrap_or(Duration::from_secs(10));
                m.next_module_check = now + every;
            }
            self.check_result(&name, id, &what, result);
        }
    }

    fn stop_all(&mut self) {
        let names: Vec<String> = self.modules.keys().cloned().collect();
        for name in names {
            let Some(m) = self.modules.get_mut(&name) else {
                continue;
            };
            m.wanted = false;
            if m.mirror.is_some() {
                if m.state != ModuleState::Stop {
                    m.log.info("stopping: safekitd shutdown");
                    let _ = self.mirror_command(&name, Cmd::Stop);
                }
                continue;
            }
            if m.state != ModuleState::Stop && !m.busy {
                m.log.info("stopping: safekitd shutdown");
                self.begin_stop(&name);
            }
        }
    }

    fn handle_timeout(&mut self, now: Instant) {
        self.mirror_timeouts(now);
        self.module_checks(now);
        // Peers silent on every LAN for the timeout are lost.
        let mut refresh = Vec::new();
        for m in self.modules.values_mut() {
            let timeout = m.timeout;
            let mut lost = Vec::new();
            for (name, p) in &mut m.peers {
                if !p.lost
                    && let Some(last) = p.last_seen.values().max()
                    && now.duration_since(*last) >= timeout
                {
                    p.lost = true;
                    p.state = None;
                    lost.push(name.clone());
                }
            }
            for name in &lost {
                m.log.error(&format!(
                    "peer {name} lost: no heartbeat on any LAN for {timeout:?}"
                ));
            }
            if !lost.is_empty() {
                refresh.push(m.cfg.name.clone());
            }
        }
        for name in refresh {
            self.farm_refresh(&name);
        }
        self.send_due_heartbeats(now);
    }

    /// Sends the heartbeats that are due.
    fn send_due_heartbeats(&mut self, now: Instant) {
        let names: Vec<String> = self.modules.keys().cloned().collect();
        for name in names {
            let due = self.modules.get(&name).is_some_and(|m| m.next_pulse <= now);
            if due {
                self.send_heartbeats(&name);
                if let Some(m) = self.modules.get_mut(&name) {
                    m.next_pulse = now + m.pulse;
                }
            }
        }
    }

    fn send_heartbeats(&mut self, name: &str) {
        let Some(m) = self.modules.get_mut(name) else {
            return;
        };
        for &lan in &m.lans {
            let sock = &self.sockets[lan];
            for peer in m.peers.keys() {
                let Some(addr) = self.cluster.node(peer).and_then(|n| n.addrs.get(&sock.lan))
                else {
                    continue;
                };
                m.counter += 1;
                let hb = Heartbeat {
                    cluster: self.cluster.name.clone(),
                    node: self.me.clone(),
                    module: name.to_owned(),
                    state: m.state.code(),
                    epoch: self.epoch,
                    counter: m.counter,
                    payload: match (&m.farm, &m.mirror) {
                        (Some(f), _) => membership::encode_view(&f.view),
                        (_, Some(rt)) => rt.payload(),
                        _ => Vec::new(),
                    },
                };
                let bytes = match heartbeat::encode(&hb, &self.key) {
                    Ok(b) => b,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot encode heartbeat");
                        continue;
                    }
                };
                let to = SocketAddr::new(*addr, self.cluster.ports.heartbeat);
                match sock.socket.try_send_to(&bytes, to) {
                    Ok(_) => {
                        if let Some(c) = self.metrics.modules.get(name) {
                            c.heartbeats_sent.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Err(e) => tracing::debug!(%to, error = %e, "heartbeat not sent"),
                }
            }
        }
    }

    /// The status snapshot.
    pub(super) fn status(&self, now: Instant) -> NodeStatus {
        NodeStatus {
            cluster: self.cluster.name.clone(),
            node: self.me.clone(),
            epoch: self.epoch,
            modules: self
                .modules
                .values()
                .map(|m| ModuleStatus {
                    name: m.cfg.name.clone(),
                    mode: match m.cfg.service.mode {
                        ConfigMode::Mirror => Mode::Mirror,
                        ConfigMode::Farm => Mode::Farm,
                    },
                    state: m.state,
                    colour: m.colour(),
                    peers: m
                        .peers
                        .iter()
                        .map(|(n, p)| PeerStatus {
                            node: n.clone(),
                            state: if p.lost { None } else { p.state },
                            lost: p.lost,
                            last_seen_ms: p
                                .last_seen
                                .iter()
                                .map(|(lan, t)| {
                                    (
                                        self.sockets[*lan].lan.clone(),
                                        u64::try_from(now.duration_since(*t).as_millis())
                                            .unwrap_or(u64::MAX),
                                    )
                                })
                                .collect(),
                        })
                        .collect(),
                    details: module_details(m),
                    checkers: m.last_checks.values().cloned().collect(),
                    rfs: m
                        .mirror
                        .as_ref()
                        .and_then(|r| r.rfs.as_ref())
                        .map(super::rfs::RfsRt::status)
                        .unwrap_or_default(),
                    farm: m.farm.as_ref().map(|f| {
                        let assignment = membership::assignment(&f.view, &f.powers);
                        FarmStatus {
                            view: f.view.iter().cloned().collect(),
                            buckets: f
                                .owned
                                .iter()
                                .enumerate()
                                .filter(|(_, o)| **o)
                                .filter_map(|(b, _)| u32::try_from(b).ok())
                                .collect(),
                            assignment: f
                                .view
                                .iter()
                                .map(|n| (n.clone(), assignment.buckets_of(n)))
                                .collect(),
                        }
                    }),
                })
                .collect(),
        }
    }
}

fn module_details(m: &Module) -> Vec<(String, String)> {
    let mut d = vec![
        ("pulse".into(), format!("{:?}", m.pulse)),
        ("timeout".into(), format!("{:?}", m.timeout)),
        ("heartbeat counter".into(), m.counter.to_string()),
    ];
    for (id, why) in &m.failing {
        d.push((format!("checker {id}"), format!("down: {why}")));
    }
    if let Some(r) = m.mirror.as_ref().and_then(|r| r.rfs.as_ref()) {
        for st in r.status() {
            let mut v = st.link.clone();
            if let Some(why) = &st.failure {
                v.push_str(" (");
                v.push_str(why);
                v.push(')');
            }
            if !st.progress.is_empty() {
                v.push_str("; ");
                v.push_str(&st.progress);
            }
            d.push((format!("rfs {}", st.path), v));
        }
    }
    if let Some(f) = &m.farm {
        d.push((
            "membership".into(),
            f.view
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>()
                .join(", "),
        ));
        let owned: Vec<u32> = f
            .owned
            .iter()
            .enumerate()
            .filter(|(_, o)| **o)
            .filter_map(|(b, _)| u32::try_from(b).ok())
            .collect();
        d.push((
            "buckets".into(),
            format!("{} owned: {}", owned.len(), bucket_ranges(&owned)),
        ));
        if let Some(i) = &f.iface {
            d.push(("interface".into(), i.name.clone()));
        }
    }
    d
}

fn farm_job(
    m: &Module,
    me: &str,
    root: &std::path::Path,
    module_dir: std::path::PathBuf,
    dataplane: Dataplane,
) -> farm::FarmJob {
    let f = m.farm.as_ref();
    farm::FarmJob {
        module_dir,
        interface: m.cfg.vip.as_ref().and_then(|v| v.interface.clone()),
        vips: f.map(|f| f.vips.clone()).unwrap_or_default(),
        vmac: f.map_or([0; 6], |f| f.vmac),
        rules: f.map(|f| f.rules.clone()).unwrap_or_default(),
        env: ScriptEnv {
            root: root.to_path_buf(),
            module: m.cfg.name.clone(),
            node: me.to_owned(),
            bin_dir: std::env::current_exe()
                .ok()
                .and_then(|p| p.parent().map(std::path::Path::to_path_buf)),
        },
        script_timeout: m.cfg.user.nice_stop_timeout,
        log: m.log.clone(),
        dataplane,
        backend: match m.cfg.farm.as_ref().map(|f| f.filter) {
            Some(FarmFilterBackend::Xdp) => crate::nft::dataplane::Backend::Xdp,
            Some(FarmFilterBackend::Nftables) => crate::nft::dataplane::Backend::Nftables,
            _ => crate::nft::dataplane::Backend::XdpOrNftables,
        },
    }
}

/// Reads, increments and durably writes the daemon epoch.
fn bump_epoch(paths: &Paths) -> Result<u64, StartError> {
    let dir = paths.state_dir();
    let file = dir.join("epoch");
    let io = |op, source| StartError::Io {
        op,
        path: file.display().to_string(),
        source,
    };
    std::fs::create_dir_all(&dir).map_err(|e| io("creating the directory of", e))?;
    let previous = match std::fs::read_to_string(&file) {
        Ok(s) => s.trim().parse::<u64>().unwrap_or(0),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(io("reading", e)),
    };
    let epoch = previous + 1;
    let tmp = dir.join("epoch.tmp");
    {
        use std::io::Write as _;
        let mut f = std::fs::File::create(&tmp).map_err(|e| io("writing", e))?;
        f.write_all(format!("{epoch}\n").as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(|e| io("writing", e))?;
    }
    std::fs::rename(&tmp, &file).map_err(|e| io("renaming", e))?;
    Ok(epoch)
}
