//! The engine: owns the modules, turns heartbeats, timers and commands into
//! state changes, and sends heartbeats. Single task; no locks on its state.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use tokio::sync::{mpsc, oneshot};

use super::{Shared, StartError, net::LanSocket};
use crate::{
    config::{ClusterConfig, Config, Mode as ConfigMode, ModuleConfig},
    control::{Request, Response},
    heartbeat::{self, Heartbeat, HeartbeatKey, Rejected, ReplayWindow},
    metrics::Metrics,
    modlog::ModuleLog,
    paths::Paths,
    status::{Colour, Mode, ModuleState, ModuleStatus, NodeStatus, PeerStatus},
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
}

impl Module {
    fn colour(&self) -> Colour {
        match self.state {
            ModuleState::Stop => Colour::Red,
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
}

impl Engine {
    /// Builds the engine; persists a new epoch (incarnation) first, so the
    /// heartbeat counters that restart at 0 are never taken as replays.
    pub(super) fn new(
        paths: Paths,
        config: Config,
        me: String,
        sockets: Vec<LanSocket>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, StartError> {
        let epoch = bump_epoch(&paths)?;
        let now = Instant::now();
        let key = HeartbeatKey::derive(&config.cluster.key);
        let mut modules = BTreeMap::new();
        for (name, cfg) in config.modules {
            if !cfg.service.nodes.iter().any(|n| *n == me) {
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
                    cfg,
                    log,
                    state: ModuleState::Stop,
                    peers,
                    lans,
                    pulse,
                    timeout,
                    next_pulse: now,
                    counter: 0,
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
        })
    }

    /// The main loop: wait for an event or the next deadline, step, publish.
    pub(super) async fn run(mut self, mut rx: mpsc::Receiver<Event>, shared: Arc<Shared>) {
        loop {
            let deadline = self.next_deadline();
            tokio::select! {
                ev = rx.recv() => match ev {
                    Some(ev) => self.handle_event(Instant::now(), ev),
                    None => return,
                },
                () = tokio::time::sleep_until(deadline.into()) => {}
            }
            let now = Instant::now();
            self.handle_timeout(now);
            *shared.status.write().await = self.status(now);
            if self.shutting_down {
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
            Event::Control { req, reply } => {
                let resp = self.handle_request(now, req);
                let _ = reply.send(resp);
            }
            Event::Signal => {
                self.stop_all();
                self.shutting_down = true;
            }
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
        peer.lost = false;
        peer.state = Some(state);
        peer.payload = hb.payload;
        peer.last_seen.insert(lan, now);
        Ok(())
    }

    fn handle_request(&mut self, now: Instant, req: Request) -> Response {
        match req {
            Request::State => Response::State {
                status: self.status(now),
            },
            Request::Start { module } => self.with_module(&module, |m| {
                if m.state != ModuleState::Stop {
                    return Err(format!(
                        "module {} is already started ({})",
                        m.cfg.name, m.state
                    ));
                }
                m.log.info("start requested");
                match m.cfg.service.mode {
                    ConfigMode::Farm => m.set_state(ModuleState::Up),
                    ConfigMode::Mirror => {
                        return Err("mirror modules are not runnable in this build yet".into());
                    }
                }
                Ok(format!("module {} started", m.cfg.name))
            }),
            Request::Stop { module } => self.with_module(&module, |m| {
                if m.state == ModuleState::Stop {
                    return Err(format!("module {} is already stopped", m.cfg.name));
                }
                m.log.info("stop requested");
                m.set_state(ModuleState::Stop);
                Ok(format!("module {} stopped", m.cfg.name))
            }),
            Request::Shutdown => {
                self.stop_all();
                self.shutting_down = true;
                Response::Ok {
                    message: format!("safekitd on {} is shutting down", self.me),
                }
            }
        }
    }

    fn with_module(
        &mut self,
        name: &str,
        f: impl FnOnce(&mut Module) -> Result<String, String>,
    ) -> Response {
        let Some(m) = self.modules.get_mut(name) else {
            let known: Vec<&str> = self.modules.keys().map(String::as_str).collect();
            return Response::Error {
                error: format!(
                    "no module {name:?} on this node (modules: {})",
                    known.join(", ")
                ),
            };
        };
        match f(m) {
            Ok(message) => Response::Ok { message },
            Err(error) => Response::Error { error },
        }
    }

    fn stop_all(&mut self) {
        for m in self.modules.values_mut() {
            if m.state != ModuleState::Stop {
                m.log.info("stopping: safekitd shutdown");
                m.set_state(ModuleState::Stop);
            }
        }
    }

    fn handle_timeout(&mut self, now: Instant) {
        // Peers silent on every LAN for the timeout are lost.
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
            for name in lost {
                m.log.error(&format!(
                    "peer {name} lost: no heartbeat on any LAN for {timeout:?}"
                ));
            }
        }
        // Heartbeats due.
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
                    payload: Vec::new(),
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
                    details: vec![
                        ("pulse".into(), format!("{:?}", m.pulse)),
                        ("timeout".into(), format!("{:?}", m.timeout)),
                        ("heartbeat counter".into(), m.counter.to_string()),
                    ],
                })
                .collect(),
        }
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
