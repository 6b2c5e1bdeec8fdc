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
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) use mirror_glue::parse_persisted;

use super::{
    Shared, StartError, checks,
    farm::{self, Dataplane, FarmRt},
    net::LanSocket,
    notify::ServiceManager,
};
use crate::{
    config::{ClusterConfig, Config, FarmFilterBackend, Mode as ConfigMode, ModuleConfig, When},
    control::{Request, Response},
    daemon::mirror_core::{Cmd, MState},
    farm::membership::{self, View},
    heartbeat::{self, Heartbeat, HeartbeatKey, PeerEpochs, Rejected, ReplayWindow},
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
    /// SIGHUP or `config apply`: reload the configuration (see
    /// [`Engine::reload`]); the outcome goes to `reply` when given.
    Reload {
        /// Notes per module, or why the configuration was refused.
        reply: Option<oneshot::Sender<Result<Vec<String>, String>>>,
    },
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

/// What a module does once it has stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum AfterStop {
    /// Stays stopped.
    Nothing,
    /// `stopstart`: starts again at once (a mirror, before `poststop`).
    Restart,
    /// A start arrived during the stop: starts once the stop (and, for a
    /// mirror, `poststop`) completed, as `waitstop; start`.
    Start,
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
    /// What to do once the module has stopped.
    after_stop: AfterStop,
    /// Next evaluation of the `[[check.module]]` checkers.
    next_module_check: Instant,
    /// Which checker classes run now (restarted as they are by a reload).
    checks_when: Vec<When>,
    /// A configuration applied while the module ran whose changes need a
    /// restart: taken at the next start.
    pending: Option<Box<ModuleConfig>>,
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

    /// A stop is under way (busy with the module wanted stopped, or a
    /// mirror whose core already stopped and whose effects still run).
    fn state_is_stopping(&self) -> bool {
        match &self.mirror {
            Some(rt) => rt.core.state() == crate::daemon::mirror_core::MState::Stop,
            None => true,
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
    /// The last epoch of each peer, persisted (`peer_epochs.json`).
    peer_epochs: PeerEpochs,
    /// Peers' older epochs already reported in the log (once each).
    told_old_epoch: std::collections::BTreeSet<(String, u64)>,
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
    /// `config apply` on this node.
    apply: Option<Arc<super::config_apply::ApplyCtx>>,
    /// The last replication refusal logged, and when (the same one is
    /// logged once a minute).
    last_refusal: Option<(String, Instant)>,
    /// systemd: readiness, status, watchdog.
    service: ServiceManager,
    /// The module cgroups scripts run in (`None`: cgroup v2 unavailable).
    cgroups: Option<crate::sys::cgroup::Cgroups>,
}

/// The last epoch of each peer, in the state directory.
const PEER_EPOCHS: &str = "peer_epochs.json";

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

    /// Where the control server records commands.
    pub(super) fn commands_log(&self) -> std::path::PathBuf {
        self.paths.commands_log()
    }

    /// The cluster key.
    pub(super) fn cluster_key(&self) -> &[u8] {
        &self.cluster.key
    }

    /// Builds the engine; persists a new epoch (incarnation) first, so the
    /// heartbeat counters that restart at 0 are never taken as replays.
    #[expect(
        clippy::too_many_arguments,
        reason = "the engine's dependencies, each built by daemon::run; a struct would only rename them"
    )]
    pub(super) fn new(
        paths: Paths,
        config: Config,
        me: String,
        sockets: Vec<LanSocket>,
        metrics: Arc<Metrics>,
        events: mpsc::Sender<Event>,
        dataplane: Dataplane,
        cgroups: Option<crate::sys::cgroup::Cgroups>,
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
            let m = new_module(&paths, &me, &sockets, cfg, now);
            m.log
                .info(&format!("safekitd epoch {epoch}: module loaded on {me}"));
            modules.insert(name, m);
        }
        tracing::info!(node = %me, epoch, modules = modules.len(), "safekitd started");
        let peer_epochs = load_peer_epochs(&paths.state_dir().join(PEER_EPOCHS));
        Ok(Self {
            paths,
            cluster: config.cluster,
            me,
            epoch,
            key,
            sockets,
            modules,
            replay: HashMap::new(),
            peer_epochs,
            told_old_epoch: std::collections::BTreeSet::new(),
            metrics,
            shutting_down: false,
            events,
            dataplane,
            pending: 0,
            registry: crate::rfs::Registry::new(),
            stall_grace: None,
            apply: None,
            last_refusal: None,
            service: ServiceManager::from_env(now),
            cgroups,
        })
    }

    /// Records the configuration just loaded as the one this daemon runs
    /// (what `config apply` keeps as the previous version when it changes).
    fn record_applied(&self) {
        let applied = self
            .paths
            .state_dir()
            .join(super::config_apply::APPLIED_DIR);
        if let Err(e) = crate::config::bundle::snapshot(&self.paths.etc(), &applied) {
            tracing::warn!(error = %e, "cannot record the configuration in use");
        }
    }

    /// What `config apply` needs (set before [`Self::run`]).
    pub(super) fn set_apply(&mut self, ctx: Arc<super::config_apply::ApplyCtx>) {
        self.apply = Some(ctx);
        self.record_applied();
    }

    /// `boot = true`: each such module is started as `safekit start` would
    /// (a mirror module by the usual rules: it waits rather than start the
    /// application on data that may be stale).
    fn start_boot_modules(&mut self) {
        let boot: Vec<String> = self
            .modules
            .values()
            .filter(|m| m.cfg.service.boot)
            .map(|m| m.cfg.name.clone())
            .collect();
        for name in boot {
            if let Some(m) = self.modules.get(&name) {
                m.log.info("boot = true: starting the module");
            }
            if let Err(e) = self.start_module(&name)
                && let Some(m) = self.modules.get(&name)
            {
                m.log.error(&format!("boot = true: start refused: {e}"));
            }
        }
    }

    /// The main loop: start the `boot = true` modules, tell systemd the
    /// daemon is ready, then wait for an event or the next deadline, step,
    /// publish (and ping the watchdog: only a turning loop pings it).
    pub(super) async fn run(mut self, mut rx: mpsc::Receiver<Event>, shared: Arc<Shared>) {
        self.start_boot_modules();
        let status = self.status(Instant::now());
        self.service.ready(&status);
        *shared.status.write().await = status;
        let mut last = Instant::now();
        loop {
            // During a stall grace, only events and its end wake the loop
            // (other deadlines are past and would spin it).
            let mut deadline = self.stall_grace.unwrap_or_else(|| self.next_deadline());
            if let Some(ping) = self.service.deadline() {
                deadline = deadline.min(ping);
            }
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
                // No lease is pushed forward before the peers' heartbeats
                // that came meanwhile are read.
                Some(t) if now < t => self.send_due_heartbeats(now, false),
                _ => {
                    self.stall_grace = None;
                    self.handle_timeout(now);
                }
            }
            self.service.tick(now);
            let status = self.status(now);
            self.service.status(&status);
            *shared.status.write().await = status;
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
            if let Some(d) = m.farm.as_ref().and_then(|f| f.drain) {
                next = next.min(d.next_check);
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
            Event::Control {
                req: Request::ConfigApply { module, rollback },
                reply,
            } => self.config_apply(module, rollback, reply),
            Event::Control { req, reply } => {
                let resp = self.handle_request(now, req);
                let _ = reply.send(resp);
            }
            Event::Signal => self.shutdown(),
            Event::Reload { reply } => {
                let r = self.reload();
                if let Err(e) = &r {
                    tracing::error!("reload refused, configuration unchanged:\n{e}");
                }
                if let Some(reply) = reply {
                    let _ = reply.send(r);
                }
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
        if self.peer_epochs.is_older(&hb.node, hb.epoch) {
            // Once per (peer, epoch): a peer whose state directory was
            // wiped would be refused for ever, the operator must see why.
            if self.told_old_epoch.len() < 64
                && self.told_old_epoch.insert((hb.node.clone(), hb.epoch))
            {
                tracing::warn!(
                    "heartbeat of {} with epoch {}, below its last epoch {}: refused as a replay (if {}'s var/lib/safekit was wiped, write a number above {} into its var/lib/safekit/epoch)",
                    hb.node,
                    hb.epoch,
                    self.peer_epochs.last(&hb.node).unwrap_or_default(),
                    hb.node,
                    self.peer_epochs.last(&hb.node).unwrap_or_default(),
                );
            }
            return Err(Rejected::Replay);
        }
        let window = self
            .replay
            .entry((hb.node.clone(), hb.module.clone()))
            .or_default();
        if !window.check_and_record(hb.epoch, hb.counter) {
            return Err(Rejected::Replay);
        }
        if self.peer_epochs.record(&hb.node, hb.epoch) {
            // A peer's new incarnation: once per restart of a peer.
            let file = self.paths.state_dir().join(PEER_EPOCHS);
            if let Err(e) = crate::paths::write_durably(&file, &self.peer_epochs.encode()) {
                tracing::error!("persisting {}: {e}", file.display());
            }
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
            Request::RfsVerify { .. } | Request::ConfigApply { .. } => Response::Error {
                error: "answered asynchronously".into(),
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
                    M::ForceStop => self.forcestop(&module),
                    M::StopStart => {
                        let r = self.mirror_command(&module, Cmd::Stop);
                        if r.is_ok()
                            && let Some(m) = self.modules.get_mut(&module)
                        {
                            m.after_stop = AfterStop::Restart;
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
                self.shutdown();
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
        self.take_pending(name);
        let jc = self.job_ctx(name);
        let m = self.module_mut(name)?;
        if m.busy && !m.wanted && m.state_is_stopping() {
            // A start during a stop: as `waitstop; start`, the module starts
            // again once its stop has completed.
            m.log
                .info("start requested while stopping: starting once stopped");
            m.wanted = true;
            m.after_stop = AfterStop::Start;
            return Ok(format!("module {name} starting once its stop completes"));
        }
        if m.busy {
            return Err(format!("module {name} is already starting ({})", m.state));
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
                let job = farm_job(m, &jc);
                // `when = "both"` checkers start once `start_both` succeeded
                // (effect_done); `pre` ones cover the start itself.
                m.checks = checks::spawn(&m.cfg, &[When::Pre], &jc.tx, &job.env, &jc.module_dir);
                m.checks_when = vec![When::Pre];
                let module = name.to_owned();
                let tx = jc.tx;
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

    /// `config apply` / `config rollback`: runs off the engine task (which
    /// reloads when the configuration arrives here) and answers when every
    /// node has.
    fn config_apply(
        &mut self,
        module: Option<String>,
        rollback: bool,
        reply: oneshot::Sender<Response>,
    ) {
        let Some(ctx) = self.apply.clone() else {
            let _ = reply.send(Response::Error {
                error: "configuration apply is not available".into(),
            });
            return;
        };
        if let Some(m) = &module
            && !self.modules.contains_key(m)
            && !self.paths.module_dir(m).join("module.toml").is_file()
        {
            let _ = reply.send(Response::Error {
                error: format!("no module {m:?} in this node's configuration"),
            });
            return;
        }
        let source = if rollback {
            super::config_apply::Source::Previous
        } else {
            super::config_apply::Source::Current(module)
        };
        tokio::spawn(async move {
            let nodes = super::config_apply::apply(ctx, source).await;
            let _ = reply.send(Response::Applied { nodes });
        });
    }

    /// A stopped module with a configuration waiting for its restart
    /// takes it now.
    fn take_pending(&mut self, name: &str) {
        let now = Instant::now();
        let Some(m) = self.modules.get_mut(name) else {
            return;
        };
        if m.state != ModuleState::Stop || m.busy {
            return;
        }
        let Some(cfg) = m.pending.take() else {
            return;
        };
        let fresh = new_module(&self.paths, &self.me, &self.sockets, *cfg, now);
        *m = Module {
            counter: m.counter,
            ..fresh
        };
        m.log.info("configuration applied at this start");
    }

    fn stop_module(&mut self, name: &str) -> Result<String, String> {
        let m = self.module_mut(name)?;
        m.after_stop = AfterStop::Nothing;
        if m.mirror.is_some() {
            m.wanted = false;
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
        self.begin_stop(name, true);
        Ok(format!("module {name} stopping"))
    }

    /// Releases everything the module holds, in a safe order: checkers and
    /// buckets first (synchronously, so no bucket stays owned once WAIT is
    /// announced: the peers take them and every new connection goes
    /// there), then — after the drain when `drain` and the module serves
    /// connections — the effects (`stop_both`, VIPs, filter).
    fn begin_stop(&mut self, name: &str, drain: bool) {
        let dataplane = self.dataplane.clone();
        let now = Instant::now();
        let Some(m) = self.modules.get_mut(name) else {
            return;
        };
        for h in m.checks.drain(..) {
            h.abort();
        }
        m.checks_when.clear();
        m.failing.clear();
        m.last_checks.clear();
        let Some(f) = m.farm.as_mut() else {
            m.set_state(ModuleState::Stop);
            return;
        };
        if let Err(e) = f.apply_owned(&dataplane, vec![false; safekit_common::BUCKETS as usize]) {
            m.log.error(&format!("releasing buckets: {e}"));
        }
        f.view.clear();
        let drains = drain && f.iface.is_some() && !f.drain_timeout.is_zero() && f.drain.is_none();
        if drains {
            f.drain = Some(farm::Drain {
                until: now + f.drain_timeout,
                next_check: now,
                left: 0,
            });
        }
        let timeout = f.drain_timeout;
        m.busy = true;
        m.set_state(ModuleState::Wait);
        self.pending += 1;
        if drains {
            // The filter stays: it keeps passing the segments of the
            // connections this node's sockets hold, whoever owns their
            // buckets now.
            m.log.info(&format!(
                "draining: no new connection here; established ones served until they close or for {timeout:?} at most, then stop_both"
            ));
            return;
        }
        self.farm_down(name);
    }

    /// The effects of a farm stop (after its drain): filter forgets the
    /// VIPs, `stop_both`, VIPs removed.
    fn farm_down(&mut self, name: &str) {
        let jc = self.job_ctx(name);
        let Some(m) = self.modules.get_mut(name) else {
            return;
        };
        if let Some(f) = m.farm.as_mut() {
            f.drain = None;
            let iface = f.iface.take();
            let job = farm_job(m, &jc);
            let module = name.to_owned();
            let tx = jc.tx;
            tokio::spawn(async move {
                let r = farm::down(job, iface).await;
                let _ = tx
                    .send(Event::Effect {
                        module,
                        done: EffectDone::FarmDown(r),
                    })
                    .await;
            });
        }
    }

    /// Draining farm modules: counts the connections left; once none is
    /// left or the drain timeout passed, the stop goes on.
    fn farm_drains(&mut self, now: Instant) {
        let mut done = Vec::new();
        for (name, m) in &mut self.modules {
            let Some(f) = m.farm.as_mut() else { continue };
            let Some(d) = f.drain.as_mut() else { continue };
            if now < d.next_check {
                continue;
            }
            let left = match farm::count_connections(&f.vips) {
                Ok(n) => n,
                Err(e) => {
                    m.log
                        .error(&format!("counting connections: {e}: drain ends"));
                    0
                }
            };
            d.left = left;
            d.next_check = now + farm::DRAIN_CHECK;
            if left == 0 {
                m.log.info("drained: no connection left");
                done.push(name.clone());
            } else if now >= d.until {
                m.log.info(&format!(
                    "drain timeout: {left} connection(s) left, stopping anyway"
                ));
                done.push(name.clone());
            }
        }
        for name in done {
            self.farm_down(&name);
        }
    }

    /// Pushes a farm module's filter lease forward. A lease found lapsed
    /// means this daemon did not run for the peers' loss timeout: they may
    /// have taken its buckets; it forgets their views and owns nothing until
    /// their next heartbeats say what they see now (the join rules apply).
    fn farm_lease(&mut self, name: &str) {
        let dataplane = self.dataplane.clone();
        let Some(m) = self.modules.get_mut(name) else {
            return;
        };
        let timeout = m.timeout;
        let Some(f) = m.farm.as_mut() else {
            return;
        };
        match f.refresh_lease(&dataplane, timeout) {
            Ok(false) => {}
            Ok(true) => {
                m.log.error(&format!(
                    "the filter's lease lapsed (safekitd did not run for {timeout:?}, the peers' loss timeout): buckets released until the peers are heard again"
                ));
                for p in m.peers.values_mut() {
                    p.payload.clear();
                }
                self.farm_refresh(name);
            }
            Err(e) => m.log.error(&format!("refreshing the filter's lease: {e}")),
        }
    }

    /// `forcestop`, either kind of module.
    fn forcestop(&mut self, name: &str) -> Result<String, String> {
        if self.modules.get(name).is_some_and(|m| m.farm.is_some()) {
            self.farm_forcestop(name)
        } else {
            self.mirror_forcestop(name)
        }
    }

    /// `forcestop` of a farm module: no drain (a drain under way ends now).
    fn farm_forcestop(&mut self, name: &str) -> Result<String, String> {
        let m = self.module_mut(name)?;
        m.after_stop = AfterStop::Nothing;
        m.wanted = false;
        m.log.info("forcestop requested");
        if m.farm.as_ref().is_some_and(|f| f.drain.is_some()) {
            self.farm_down(name);
            return Ok(format!("module {name}: drain cut short, stopping"));
        }
        if m.state == ModuleState::Stop && !m.busy {
            return Err(format!("module {name} is already stopped"));
        }
        if m.busy {
            return Ok(format!("module {name} stopping after its current step"));
        }
        self.begin_stop(name, false);
        Ok(format!("module {name} stopping (no drain)"))
    }

    fn effect_done(&mut self, name: &str, done: EffectDone) {
        if !matches!(done, EffectDone::FarmUp(_) | EffectDone::FarmDown(_)) {
            self.mirror_effect(name, done);
            return;
        }
        let shutting_down = self.shutting_down;
        let jc = self.job_ctx(name);
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
                    self.begin_stop(name, true);
                    return;
                }
                // Checkers of the running service: from now until before
                // `stop_both` (begin_stop aborts them first).
                let env = farm_job(m, &jc).env;
                let both = checks::spawn(&m.cfg, &[When::Both], &jc.tx, &env, &jc.module_dir);
                m.checks.extend(both);
                m.checks_when.push(When::Both);
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
                self.begin_stop(name, false);
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
                    m.after_stop = AfterStop::Nothing;
                    m.log.info("stopped: starting as requested during the stop");
                    if let Err(e) = self.start_module(name)
                        && let Some(m) = self.modules.get_mut(name)
                    {
                        m.log.error(&format!("start after stop: {e}"));
                    }
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
        let peer_views: Vec<membership::PeerView> = m
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
            (farm::client_bucket(client, None), "client_ip")
        } else {
            let p = port.ok_or("this rule hashes the client port too: give IP:PORT")?;
            (farm::client_bucket(client, Some(p)), "client_ip_port")
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

    /// Reads the configuration again (SIGHUP, `config apply`) and applies
    /// it without any state change of its own: a stopped module takes its
    /// new configuration whole; a running one takes at once what can change
    /// while it runs — heartbeat pulse and timeout, checkers (restarted as
    /// they were), gratuitous ARP settings, farm power and `drain_timeout`
    /// (scripts are read at each run) — and the rest at its next start.
    /// Returns what the operator should know, per module; an invalid
    /// configuration changes nothing.
    pub(super) fn reload(&mut self) -> Result<Vec<String>, String> {
        let config = crate::config::load(&self.paths.etc()).map_err(|e| e.to_string())?;
        let now = Instant::now();
        let mut notes = Vec::new();
        let mut farm_changed = Vec::new();
        for name in self.modules.keys() {
            if !config.modules.contains_key(name) {
                notes.push(format!(
                    "{name}: no longer configured: stays loaded until safekitd restarts"
                ));
            }
        }
        for (name, new) in config.modules {
            if !new.service.nodes.contains(&self.me) {
                if self.modules.contains_key(&name) {
                    notes.push(format!(
                        "{name}: no longer on this node: stays loaded until safekitd restarts"
                    ));
                }
                continue;
            }
            let Some(m) = self.modules.get_mut(&name) else {
                notes.push(format!("{name}: new module: loaded when safekitd restarts"));
                continue;
            };
            let current = m.pending.as_deref().unwrap_or(&m.cfg);
            if *current == new {
                continue;
            }
            if m.state == ModuleState::Stop && !m.busy {
                let log = m.log.clone();
                let fresh = new_module(&self.paths, &self.me, &self.sockets, new, now);
                *m = Module {
                    counter: m.counter,
                    ..fresh
                };
                log.info("configuration reloaded");
                notes.push(format!("{name}: reloaded"));
                continue;
            }
            let (in_place, later) = hot_changes(&m.cfg, &new);
            if hot_apply(m, &new, &in_place) {
                farm_changed.push(name.clone());
            }
            if later.is_empty() {
                m.pending = None;
            } else {
                m.pending = Some(Box::new(new));
            }
            let mut parts = Vec::new();
            if !in_place.is_empty() {
                parts.push(format!("applied now: {}", in_place.join(", ")));
            }
            if !later.is_empty() {
                parts.push(format!(
                    "needs a restart (applied at the next start): {}",
                    later.join(", ")
                ));
            }
            let line = format!("{name}: {}", parts.join("; "));
            m.log.info(&format!(
                "configuration reloaded: {}",
                &line[name.len() + 2..]
            ));
            notes.push(line);
            if in_place.iter().any(|c| c == "checkers") {
                self.respawn_checks(&name);
            }
        }
        tracing::info!(?notes, "configuration reloaded");
        self.record_applied();
        for name in farm_changed {
            self.farm_refresh(&name);
        }
        Ok(notes)
    }

    /// Restarts the module's checkers with its configuration, the same
    /// classes as were running; results of checkers that no longer exist
    /// are forgotten.
    fn respawn_checks(&mut self, name: &str) {
        let jc = self.job_ctx(name);
        let (tx, dir) = (jc.tx.clone(), jc.module_dir.clone());
        let env = match self.modules.get(name) {
            Some(m) if m.mirror.is_some() => self.mirror_env(m),
            Some(m) => farm_job(m, &jc).env,
            None => return,
        };
        let Some(m) = self.modules.get_mut(name) else {
            return;
        };
        for h in m.checks.drain(..) {
            h.abort();
        }
        let cfg = &m.cfg;
        m.failing.retain(|id, _| checks::meta(cfg, id).is_some());
        m.checks = checks::spawn(&m.cfg, &m.checks_when, &tx, &env, &dir);
    }

    /// SIGTERM (`systemctl stop`), SIGINT or `safekit shutdown`: every
    /// module stops (stop scripts, VIP removed), then the loop exits.
    fn shutdown(&mut self) {
        if !self.shutting_down {
            tracing::info!("shutdown: stopping every module");
            ServiceManager::stopping();
        }
        self.stop_all();
        self.shutting_down = true;
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
                self.begin_stop(&name, true);
            }
        }
    }

    fn handle_timeout(&mut self, now: Instant) {
        self.mirror_timeouts(now);
        self.farm_drains(now);
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
        self.send_due_heartbeats(now, true);
    }

    /// Sends the heartbeats that are due; with `lease`, pushes each farm
    /// module's filter lease forward first (so it never outlasts the
    /// peers' view of this node's last heartbeat by more than their loss
    /// timeout).
    fn send_due_heartbeats(&mut self, now: Instant, lease: bool) {
        let names: Vec<String> = self.modules.keys().cloned().collect();
        for name in names {
            let due = self.modules.get(&name).is_some_and(|m| m.next_pulse <= now);
            if due {
                if lease {
                    self.farm_lease(&name);
                }
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
                        (Some(f), _) => membership::encode_view(&f.view, &f.powers),
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
                            draining: f.drain.map(|d| d.left),
                        }
                    }),
                })
                .collect(),
        }
    }
}

/// What differs between a running module's configuration and `new`: the
/// groups applied at once, and the fields that wait for the next start.
fn hot_changes(old: &ModuleConfig, new: &ModuleConfig) -> (Vec<String>, Vec<String>) {
    let mut now = Vec::new();
    let mut later = Vec::new();
    let farm_beat = |c: &ModuleConfig| c.farm.as_ref().map(|f| (f.pulse, f.lost_after));
    if old.heartbeat().0 != new.heartbeat().0
        || old.heartbeat().1 != new.heartbeat().1
        || farm_beat(old) != farm_beat(new)
    {
        now.push("heartbeat pulse/timeout".to_owned());
    }
    if old.heartbeat().2 != new.heartbeat().2 {
        later.push("heartbeat LANs".to_owned());
    }
    if old.errd_poll_interval != new.errd_poll_interval
        || old.errd != new.errd
        || old.check_tcp != new.check_tcp
        || old.check_ping != new.check_ping
        || old.check_intf != new.check_intf
        || old.check_ip != new.check_ip
        || old.check_custom != new.check_custom
        || old.check_module != new.check_module
    {
        now.push("checkers".to_owned());
    }
    match (&old.vip, &new.vip) {
        (Some(a), Some(b)) if a == b => {}
        (Some(a), Some(b)) => {
            let mut a2 = a.clone();
            a2.garp_count = b.garp_count;
            a2.garp_interval = b.garp_interval;
            a2.arp_reroute = b.arp_reroute;
            a2.arp_interval = b.arp_interval;
            a2.arp_elapse = b.arp_elapse;
            a2.tcp_reset = b.tcp_reset;
            if a2 == *b {
                now.push("gratuitous ARP settings".to_owned());
            } else {
                later.push("vip".to_owned());
            }
        }
        (None, None) => {}
        _ => later.push("vip".to_owned()),
    }
    match (&old.farm, &new.farm) {
        (Some(a), Some(b)) => {
            let mut a2 = a.clone();
            a2.power.clone_from(&b.power);
            a2.drain_timeout = b.drain_timeout;
            a2.pulse = b.pulse;
            a2.lost_after = b.lost_after;
            if a.power != b.power || a.drain_timeout != b.drain_timeout {
                now.push("farm power/drain_timeout".to_owned());
            }
            if a2 != *b {
                later.push("farm".to_owned());
            }
        }
        (None, None) => {}
        _ => later.push("farm".to_owned()),
    }
    if old.service != new.service {
        later.push("service".to_owned());
    }
    if old.rfs != new.rfs {
        later.push("rfs".to_owned());
    }
    if old.splitbrain != new.splitbrain {
        later.push("check.splitbrain".to_owned());
    }
    if old.user != new.user {
        later.push("user".to_owned());
    }
    if old.heart != new.heart && !now.iter().any(|c| c.starts_with("heartbeat")) {
        later.push("heart".to_owned());
    }
    (now, later)
}

/// Applies the groups `what` of `new` to running module `m`; true when the
/// farm's power changed (its buckets are to be recomputed).
fn hot_apply(m: &mut Module, new: &ModuleConfig, what: &[String]) -> bool {
    let mut farm = false;
    for w in what {
        match w.as_str() {
            "heartbeat pulse/timeout" => {
                let (pulse, timeout, _) = new.heartbeat();
                m.pulse = pulse;
                m.timeout = timeout;
                m.cfg.heart.pulse = new.heart.pulse;
                m.cfg.heart.timeout = new.heart.timeout;
                if let (Some(f), Some(n)) = (m.cfg.farm.as_mut(), new.farm.as_ref()) {
                    f.pulse = n.pulse;
                    f.lost_after = n.lost_after;
                }
                if let Some(rt) = m.mirror.as_mut() {
                    rt.core.set_timeout(timeout);
                }
            }
            "checkers" => {
                m.cfg.errd_poll_interval = new.errd_poll_interval;
                m.cfg.errd.clone_from(&new.errd);
                m.cfg.check_tcp.clone_from(&new.check_tcp);
                m.cfg.check_ping.clone_from(&new.check_ping);
                m.cfg.check_intf.clone_from(&new.check_intf);
                m.cfg.check_ip.clone_from(&new.check_ip);
                m.cfg.check_custom.clone_from(&new.check_custom);
                m.cfg.check_module.clone_from(&new.check_module);
            }
            "gratuitous ARP settings" => {
                if let (Some(v), Some(n)) = (m.cfg.vip.as_mut(), new.vip.as_ref()) {
                    v.garp_count = n.garp_count;
                    v.garp_interval = n.garp_interval;
                    v.arp_reroute = n.arp_reroute;
                    v.arp_interval = n.arp_interval;
                    v.arp_elapse = n.arp_elapse;
                    v.tcp_reset = n.tcp_reset;
                }
            }
            "farm power/drain_timeout" => {
                if let (Some(fc), Some(n)) = (m.cfg.farm.as_mut(), new.farm.as_ref()) {
                    fc.power.clone_from(&n.power);
                    fc.drain_timeout = n.drain_timeout;
                }
                if let (Some(f), Some(n)) = (m.farm.as_mut(), new.farm.as_ref()) {
                    f.drain_timeout = n.drain_timeout;
                    if f.powers != n.power {
                        f.powers.clone_from(&n.power);
                        m.next_pulse = Instant::now();
                        farm = true;
                    }
                }
            }
            _ => {}
        }
    }
    farm
}

/// A module as loaded (STOP), from its configuration.
fn new_module(
    paths: &Paths,
    me: &str,
    sockets: &[LanSocket],
    cfg: ModuleConfig,
    now: Instant,
) -> Module {
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
        .filter(|n| *n != me)
        .map(|n| (n.clone(), Peer::default()))
        .collect();
    let log = ModuleLog::new(paths.module_log(&cfg.name));
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
        mirror: (cfg.mode() == ConfigMode::Mirror).then(|| MirrorRt::new(&cfg, me, paths, &log)),
        after_stop: AfterStop::Nothing,
        next_module_check: now,
        checks_when: Vec::new(),
        pending: None,
        cfg,
    }
}

fn module_details(m: &Module) -> Vec<(String, String)> {
    let mut d = vec![
        ("pulse".into(), format!("{:?}", m.pulse)),
        ("timeout".into(), format!("{:?}", m.timeout)),
        ("heartbeat counter".into(), m.counter.to_string()),
    ];
    for (id, what, every) in checks::describe(&m.cfg) {
        let state = match m.failing.get(&id) {
            Some(why) => format!("down: {why}"),
            None if m.checks_when.is_empty() => "not running".to_owned(),
            None => "up".to_owned(),
        };
        let every = every.map_or_else(String::new, |d| {
            format!(" every {}", crate::config::format_duration(d))
        });
        d.push((format!("checker {id}"), format!("{what}{every}: {state}")));
    }
    for (id, why) in &m.failing {
        if checks::meta(&m.cfg, id).is_none() {
            d.push((format!("checker {id}"), format!("down: {why}")));
        }
    }
    if let Some(p) = &m.pending {
        let (_, later) = hot_changes(&m.cfg, p);
        d.push((
            "configuration".into(),
            format!("changed, applied at the next start: {}", later.join(", ")),
        ));
    }
    if let Some(rt) = &m.mirror {
        let data = rt.core.data();
        let v = match &rt.why_not_uptodate {
            Some(why) => why.clone(),
            None if data.uptodate => format!(
                "up to date, the reference copy (generation {})",
                data.generation
            ),
            None if rt.core.state() == MState::Second => {
                format!("the primary's copy (generation {})", data.generation)
            }
            None => format!(
                "not known up to date (generation {}): this node does not become primary by itself",
                data.generation
            ),
        };
        d.push(("data".into(), v));
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
        if let Some(dr) = f.drain {
            d.push((
                "draining".into(),
                format!(
                    "{} connection(s) left; stop_both in {:?} at most",
                    dr.left,
                    dr.until.saturating_duration_since(Instant::now())
                ),
            ));
        }
    }
    d
}

/// What a farm module's effects need from the engine, taken before the
/// module is borrowed.
struct JobCtx {
    me: String,
    root: std::path::PathBuf,
    module_dir: std::path::PathBuf,
    tx: mpsc::Sender<Event>,
    dataplane: Dataplane,
    cgroup: Option<std::path::PathBuf>,
}

impl Engine {
    fn job_ctx(&self, name: &str) -> JobCtx {
        JobCtx {
            me: self.me.clone(),
            root: self.paths.root().to_path_buf(),
            module_dir: self.paths.module_dir(name),
            tx: self.events.clone(),
            dataplane: self.dataplane.clone(),
            cgroup: self.cgroups.as_ref().map(|c| c.module(name)),
        }
    }
}

fn farm_job(m: &Module, jc: &JobCtx) -> farm::FarmJob {
    let (me, root, dataplane) = (&jc.me, &jc.root, jc.dataplane.clone());
    let f = m.farm.as_ref();
    farm::FarmJob {
        module_dir: jc.module_dir.clone(),
        interface: m.cfg.vip.as_ref().and_then(|v| v.interface.clone()),
        vips: f.map(|f| f.vips.clone()).unwrap_or_default(),
        vmac: f.map_or([0; 6], |f| f.vmac),
        rules: f.map(|f| f.rules.clone()).unwrap_or_default(),
        env: ScriptEnv {
            root: root.clone(),
            module: m.cfg.name.clone(),
            node: me.to_owned(),
            bin_dir: std::env::current_exe()
                .ok()
                .and_then(|p| p.parent().map(std::path::Path::to_path_buf)),
            cgroup: jc.cgroup.clone(),
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

/// Reads, increments and durably writes the daemon epoch. A missing file
/// is a first start (epoch 1); one that cannot be read or parsed stops the
/// start: restarting at 1 would make every peer refuse this node.
fn bump_epoch(paths: &Paths) -> Result<u64, StartError> {
    let file = paths.state_dir().join("epoch");
    let io = |op, source| StartError::Io {
        op,
        path: file.display().to_string(),
        source,
    };
    let previous = match std::fs::read(&file) {
        Ok(bytes) => parse_epoch(&bytes).map_err(|why| StartError::Epoch {
            path: file.display().to_string(),
            why,
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => {
            return Err(StartError::Epoch {
                path: file.display().to_string(),
                why: e.to_string(),
            });
        }
    };
    let epoch = previous.checked_add(1).ok_or_else(|| StartError::Epoch {
        path: file.display().to_string(),
        why: "no epoch after u64::MAX".into(),
    })?;
    crate::paths::write_durably(&file, format!("{epoch}\n").as_bytes())
        .map_err(|e| io("writing", e))?;
    Ok(epoch)
}

/// Decodes the epoch file: one decimal number (and a newline).
pub(crate) fn parse_epoch(bytes: &[u8]) -> Result<u64, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "not text".to_owned())?;
    let t = text.trim();
    if t.is_empty() {
        return Err("empty".into());
    }
    t.parse::<u64>()
        .map_err(|e| format!("{t:.40?} is not an epoch: {e}"))
}

/// The last epoch of each peer, as persisted. A file that cannot be used is
/// reported and replaced by what this run sees: the protection it gives
/// (against heartbeats of a peer's older incarnation replayed before the
/// peer is heard again) then starts afresh, as it did before it existed.
fn load_peer_epochs(file: &std::path::Path) -> PeerEpochs {
    match std::fs::read(file) {
        Ok(bytes) => PeerEpochs::parse(&bytes).unwrap_or_else(|e| {
            tracing::error!(
                "{} is corrupt ({e}): the peers' last epochs are learnt again",
                file.display()
            );
            PeerEpochs::default()
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => PeerEpochs::default(),
        Err(e) => {
            tracing::error!(
                "{} is unreadable ({e}): the peers' last epochs are learnt again",
                file.display()
            );
            PeerEpochs::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_files_parse_or_say_what_is_wrong() {
        assert_eq!(parse_epoch(b"41\n"), Ok(41));
        assert_eq!(parse_epoch(b" 7 "), Ok(7));
        for bad in [
            &b""[..],
            b"\n",
            b"-1",
            b"1.5",
            b"x",
            b"\xff\xfe",
            b"99999999999999999999999",
        ] {
            assert!(parse_epoch(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn an_unreadable_epoch_file_stops_the_start_and_is_left_alone() {
        let root = std::env::temp_dir().join(format!("safekit-epoch-{}", std::process::id()));
        let paths = Paths::new(&root);
        assert_eq!(bump_epoch(&paths).unwrap(), 1, "first start");
        assert_eq!(bump_epoch(&paths).unwrap(), 2);
        let file = paths.state_dir().join("epoch");
        std::fs::write(&file, b"garbage").unwrap();
        let e = bump_epoch(&paths).unwrap_err().to_string();
        assert!(e.contains("will not start") && e.contains("garbage"), "{e}");
        assert_eq!(
            std::fs::read(&file).unwrap(),
            b"garbage",
            "left for the operator"
        );
        std::fs::write(&file, b"41\n").unwrap();
        assert_eq!(bump_epoch(&paths).unwrap(), 42);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
