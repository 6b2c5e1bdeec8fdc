//! The engine's side of mirror modules: feeds the pure core
//! ([`super::super::mirror_core::MirrorCore`]) with commands, the peer's
//! views, effect completions, checker results and time, and executes its
//! actions in order — persist first (synchronously, fsynced), then the
//! effects, which run off the engine task and come back as events.

use std::time::{Duration, Instant};

use super::{AfterStop, EffectDone, Engine, Event, Module, mirror_seq::Sequencer};
use crate::{
    config::{CheckAction, DefaultPrim, ModuleConfig, SplitBrainKeep, When},
    daemon::{
        checks,
        mirror::{self as fx, MirrorJob, PrimaryUp},
        mirror_core::{
            Act, Cmd, Keep, MState, MirrorCore, Params, Persisted, Prefer, View, Witness,
        },
        rfs::{self as rfsfx, Link, RfsRt},
    },
    modlog::ModuleLog,
    paths::Paths,
    script::ScriptEnv,
    status::{Colour, ModuleState},
};

/// Runtime of a mirror module on this node.
#[derive(Debug)]
pub(super) struct MirrorRt {
    pub(super) core: MirrorCore,
    pub(super) primary: Option<PrimaryUp>,
    /// Replicated directories (`[rfs]`).
    pub(super) rfs: Option<RfsRt>,
    /// Checker-triggered restarts inside the current `loop_interval`.
    pub(super) loops: Vec<Instant>,
    /// Its effects, one at a time.
    pub(super) seq: Sequencer,
    /// The state record could not be used at start (missing with
    /// replicated directories, unreadable, corrupt): why the data is not
    /// known up to date, shown by `state -v` until a new record is written.
    pub(super) why_not_uptodate: Option<String>,
}

/// The symbolic name of the errors a copy can meet (`errno N` otherwise).
fn errno_name(e: i32) -> String {
    match e {
        libc::ENOSPC => "ENOSPC".into(),
        libc::EDQUOT => "EDQUOT".into(),
        libc::EIO => "EIO".into(),
        libc::EROFS => "EROFS".into(),
        libc::EFBIG => "EFBIG".into(),
        libc::EACCES => "EACCES".into(),
        libc::EPERM => "EPERM".into(),
        libc::ENOENT => "ENOENT".into(),
        e => format!("errno {e}"),
    }
}

pub(super) fn to_state(s: MState) -> ModuleState {
    match s {
        MState::Stop => ModuleState::Stop,
        MState::Wait => ModuleState::Wait,
        MState::Alone => ModuleState::Alone,
        MState::Prim => ModuleState::Prim,
        MState::Second => ModuleState::Second,
    }
}

fn from_state(s: ModuleState) -> MState {
    match s {
        ModuleState::Stop | ModuleState::Up => MState::Stop,
        ModuleState::Wait => MState::Wait,
        ModuleState::Alone => MState::Alone,
        ModuleState::Prim => MState::Prim,
        ModuleState::Second => MState::Second,
    }
}

impl MirrorRt {
    pub(super) fn new(cfg: &ModuleConfig, me: &str, paths: &Paths, log: &ModuleLog) -> Self {
        let peer = cfg
            .service
            .nodes
            .iter()
            .find(|n| *n != me)
            .cloned()
            .unwrap_or_default();
        let params = Params {
            me: me.to_owned(),
            peer,
            timeout: cfg.heart.timeout,
            failover: cfg.service.failover,
            prefer: match &cfg.service.defaultprim {
                DefaultPrim::Alone => Prefer::None,
                DefaultPrim::Node(n) => Prefer::Node(n.clone()),
                DefaultPrim::LastPrim => Prefer::LastPrim,
            },
            keep: match &cfg.service.splitbrain_keep {
                SplitBrainKeep::FormerPrim => Keep::FormerPrim,
                SplitBrainKeep::Node(n) => Keep::Node(n.clone()),
            },
            witness: match &cfg.splitbrain {
                Some(s) if !s.arbiter.is_empty() => Witness::Arbiter,
                Some(s) if !s.witness.is_empty() => Witness::Ping,
                _ => Witness::None,
            },
            witness_grace: cfg.splitbrain.as_ref().map_or(Duration::ZERO, |s| {
                // With an arbiter the primary may detect the loss up to a
                // heartbeat timeout after the secondary did (see
                // `Params::witness_grace`).
                let detect = if s.arbiter.is_empty() {
                    Duration::ZERO
                } else {
                    cfg.heart.timeout
                };
                detect + s.timeout + Duration::from_millis(500)
            }),
            replicated: cfg.rfs.is_some(),
        };
        let rfs = RfsRt::new(cfg, paths);
        if let Some(r) = &rfs {
            rfsfx::clean_leftovers(&r.dirs, log);
        }
        if cfg.rfs.as_ref().is_some_and(|r| !r.exclude.is_empty()) {
            log.error("rfs.exclude is not applied yet: every file of the replicated directories is replicated");
        }
        let loaded = load_persisted(
            &persisted_file(paths, &cfg.name),
            cfg.rfs.is_some(),
            &cfg.name,
        );
        if let Some(why) = &loaded.why_not_uptodate {
            log.error(why);
        }
        Self {
            core: MirrorCore::new(params, loaded.data),
            why_not_uptodate: loaded.why_not_uptodate,
            primary: None,
            rfs,
            loops: Vec::new(),
            seq: Sequencer::new(),
        }
    }

    pub(super) fn colour(&self) -> Colour {
        match self.core.state() {
            MState::Wait if self.core.in_transition() => Colour::Orange,
            // Resynchronising.
            MState::Second if !self.core.synced() => Colour::Orange,
            MState::Stop | MState::Wait => Colour::Red,
            MState::Alone | MState::Prim | MState::Second => Colour::Green,
        }
    }

    /// Heartbeat payload.
    pub(super) fn payload(&self) -> Vec<u8> {
        self.core.view().encode()
    }
}

fn persisted_file(paths: &Paths, module: &str) -> std::path::PathBuf {
    paths.module_state_dir(module).join("mirror.json")
}

/// Beside the record: present when its last write failed (whatever record
/// is there, if any, is not this node's latest knowledge).
fn failed_marker(file: &std::path::Path) -> std::path::PathBuf {
    file.with_file_name("mirror.json.failed")
}

/// The record could not be written: a marker says so (an empty file, made
/// even on a full disk while inodes remain) and the older record goes, the
/// directory synced — so that a restart never takes an older record, nor
/// the absence of one, for this node's knowledge. Returns what was done.
fn fail_record(file: &std::path::Path) -> String {
    let marked = std::fs::File::create(failed_marker(file)).and_then(|f| f.sync_all());
    let removed = match std::fs::remove_file(file) {
        Ok(()) => "the previous record removed",
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => "no previous record",
        Err(_) => "the previous record could not be removed",
    };
    if let Some(dir) = file.parent() {
        let _ = std::fs::File::open(dir).and_then(|d| d.sync_all());
    }
    match marked {
        Ok(()) => format!(
            "marked as failed, {removed}: at its next start this node's data is not taken as up to date"
        ),
        Err(e) => format!("{removed}; the failure marker could not be written either ({e})"),
    }
}

/// What a node knows of its data at start: the persisted record, and why
/// the data is not known up to date when the record could not be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Loaded {
    pub(super) data: Persisted,
    pub(super) why_not_uptodate: Option<String>,
}

/// Reads the persisted record. It fails safe: a record that cannot be read
/// (I/O error, permissions, not a record) never means "up to date", nor
/// does a missing one for a module with replicated directories — its copy
/// may be anything (the reference product's first start needs `prim` too). Only a module
/// without replicated directories that never ran starts from the default
/// (empty data, consistent with an empty peer).
pub(super) fn load_persisted(file: &std::path::Path, replicated: bool, module: &str) -> Loaded {
    let remedy = format!(
        "it will not become primary by itself: run `safekit prim -m {module}` on the node holding the reference data"
    );
    let unknown = |why: String| Loaded {
        data: Persisted {
            uptodate: false,
            ..Persisted::default()
        },
        why_not_uptodate: Some(why),
    };
    if failed_marker(file).exists() {
        return unknown(format!(
            "the last write of the state record {} failed: this node's data is not known up to date; {remedy}",
            file.display()
        ));
    }
    match std::fs::read(file) {
        Ok(bytes) => match parse_persisted(&bytes) {
            Ok(data) => Loaded {
                data,
                why_not_uptodate: None,
            },
            Err(e) => unknown(format!(
                "state record {} is corrupt ({e}): this node's data is not known up to date; {remedy}",
                file.display()
            )),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if replicated {
                unknown(format!(
                    "no state record ({}): first start of this module on this node, its data is not known up to date; {remedy}",
                    file.display()
                ))
            } else {
                Loaded {
                    data: Persisted::default(),
                    why_not_uptodate: None,
                }
            }
        }
        Err(e) => unknown(format!(
            "state record {} is unreadable ({e}): this node's data is not known up to date; {remedy}",
            file.display()
        )),
    }
}

/// Decodes the bytes of `mirror.json`.
pub(crate) fn parse_persisted(bytes: &[u8]) -> Result<Persisted, serde_json::Error> {
    serde_json::from_slice(bytes)
}

/// Writes the record durably (write, fsync, rename, fsync the directory).
fn store_persisted(paths: &Paths, module: &str, data: &Persisted) -> std::io::Result<()> {
    let text = serde_json::to_string_pretty(data).map_err(std::io::Error::other)?;
    let file = persisted_file(paths, module);
    crate::paths::write_durably(&file, text.as_bytes())?;
    // Written: the record is this node's knowledge again.
    match std::fs::remove_file(failed_marker(&file)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

impl Engine {
    pub(super) fn mirror_job(&self, m: &Module) -> MirrorJob {
        let vip = m.cfg.vip.as_ref();
        MirrorJob {
            module_dir: self.paths.module_dir(&m.cfg.name),
            interface: vip.and_then(|v| v.interface.clone()),
            vips: vip.map(|v| v.addrs.clone()).unwrap_or_default(),
            garp_count: vip.map_or(3, |v| v.garp_count),
            garp_interval: vip.map_or(std::time::Duration::from_millis(100), |v| v.garp_interval),
            reroute: vip
                .filter(|v| v.arp_reroute)
                .map(|v| (v.arp_interval, v.arp_elapse)),
            tcp_reset: vip.is_some_and(|v| v.tcp_reset),
            env: ScriptEnv {
                root: self.paths.root().to_path_buf(),
                module: m.cfg.name.clone(),
                node: self.me.clone(),
                bin_dir: std::env::current_exe()
                    .ok()
                    .and_then(|p| p.parent().map(std::path::Path::to_path_buf)),
                cgroup: self.cgroups.as_ref().map(|c| c.module(&m.cfg.name)),
            },
            nice_timeout: m.cfg.user.nice_stop_timeout,
            force_timeout: m.cfg.user.force_stop_timeout,
            log: m.log.clone(),
            force: m.mirror.as_ref().map_or_else(
                || tokio::sync::watch::channel(false).1,
                |rt| rt.seq.force_rx(),
            ),
            fence_first: false,
        }
    }

    /// A command for a mirror module.
    pub(super) fn mirror_command(&mut self, name: &str, cmd: Cmd) -> Result<String, String> {
        let tx = self.events.clone();
        let m = self.module_mut(name)?;
        let rt = m
            .mirror
            .as_mut()
            .ok_or_else(|| format!("module {name} is not a mirror module"))?;
        let was_stopped = rt.core.state() == MState::Stop;
        rt.core
            .handle_command(Instant::now(), cmd)
            .map_err(|e| format!("{name}: {e}"))?;
        m.log.info(&format!("command {cmd:?}"));
        if was_stopped {
            m.wanted = true;
            self.mirror_begin(name);
            if let Some(env) = self.modules.get(name).map(|m| self.mirror_env(m)) {
                let dir = self.paths.module_dir(name);
                if let Some(m) = self.modules.get_mut(name) {
                    m.checks = checks::spawn(
                        &m.cfg,
                        &[When::Pre, When::Prim, When::Second, When::Both],
                        &tx,
                        &env,
                        &dir,
                    );
                    m.checks_when = vec![When::Pre, When::Prim, When::Second, When::Both];
                }
            }
        }
        self.mirror_drain(name);
        Ok(format!("{name}: {cmd:?} accepted"))
    }

    pub(super) fn mirror_env(&self, m: &Module) -> ScriptEnv {
        self.mirror_job(m).env
    }

    /// Executes the core's pending actions, in the order it emits them, and
    /// publishes the resulting state.
    pub(super) fn mirror_drain(&mut self, name: &str) {
        loop {
            let Some(rt) = self.modules.get_mut(name).and_then(|m| m.mirror.as_mut()) else {
                return;
            };
            let Some(action) = rt.core.poll_action() else {
                break;
            };
            self.mirror_action(name, action);
        }
        let Some(m) = self.modules.get_mut(name) else {
            return;
        };
        let Some(rt) = m.mirror.as_ref() else { return };
        let st = to_state(rt.core.state());
        let stopped = st == ModuleState::Stop && !m.busy;
        m.set_state(st);
        self.rfs_reconcile(name);
        let Some(m) = self.modules.get_mut(name) else {
            return;
        };
        if stopped && m.after_stop == AfterStop::Restart {
            m.after_stop = AfterStop::Nothing;
            m.log.info("stopstart: starting again");
            if let Some(rt) = m.mirror.as_mut()
                && rt.core.handle_command(Instant::now(), Cmd::Start).is_ok()
            {
                self.mirror_drain(name);
                return;
            }
        }
        if stopped {
            for h in m.checks.drain(..) {
                h.abort();
            }
            m.checks_when.clear();
            m.failing.clear();
            m.last_checks.clear();
            if let Some(rt) = m.mirror.as_mut() {
                rt.core.wait_checker(Instant::now(), None);
            }
            self.mirror_end(name);
            // A start that arrived during the stop: once `poststop` is done
            // too (mirror_end queued it: busy again until it finishes).
            if let Some(m) = self.modules.get_mut(name)
                && m.after_stop == AfterStop::Start
                && !m.busy
                && !self.shutting_down
            {
                m.after_stop = AfterStop::Nothing;
                m.log.info("stopped: starting as requested during the stop");
                if let Err(e) = self.mirror_command(name, Cmd::Start)
                    && let Some(m) = self.modules.get_mut(name)
                {
                    m.log.error(&format!("start after stop: {e}"));
                }
            }
        }
    }

    fn mirror_action(&mut self, name: &str, action: Act) {
        if matches!(action, Act::StartPrimary | Act::StopPrimary) {
            self.mirror_step(name, super::mirror_seq::Step::Core(action));
        } else {
            self.mirror_act(name, action);
        }
    }

    /// Executes one action (effects through [`Self::mirror_step`]).
    #[expect(clippy::too_many_lines, reason = "one arm per action of the core")]
    pub(super) fn mirror_act(&mut self, name: &str, action: Act) {
        let Some(m) = self.modules.get(name) else {
            return;
        };
        let job = self.mirror_job(m);
        let tx = self.events.clone();
        let module = name.to_owned();
        match action {
            Act::Persist(data) => {
                if let Err(e) = store_persisted(&self.paths, name, &data) {
                    // Fail safe: an older record (or none, read as a first
                    // start) must not stand for what this node knows now.
                    let done = fail_record(&persisted_file(&self.paths, name));
                    m.log.error(&format!(
                        "persisting the data generation: {e} (the record is {done})"
                    ));
                } else if let Some(rt) = self.modules.get_mut(name).and_then(|m| m.mirror.as_mut())
                {
                    rt.why_not_uptodate = None;
                }
            }
            Act::Log(text) => m.log.info(&text),
            Act::Quarantine => {
                if m.mirror.as_ref().is_some_and(|rt| rt.rfs.is_some()) {
                    m.log.info(
                        "quarantine: what this node changed alone is copied aside when the resynchronisation from the peer starts",
                    );
                } else {
                    m.log.info(
                        "quarantine: no replicated directory in this module, nothing to keep aside",
                    );
                }
            }
            Act::StartPrimary => {
                self.pending += 1;
                let registry = std::sync::Arc::clone(&self.registry);
                let key = self.cluster.key.clone();
                let mut rfs_job = None;
                if let Some(m) = self.modules.get_mut(name) {
                    m.busy = true;
                    if let Some(r) = m.mirror.as_mut().and_then(|rt| rt.rfs.as_mut()) {
                        // Mounting removes the secondary's registration.
                        r.secondary = false;
                        r.in_sync.iter_mut().for_each(|s| *s = false);
                        rfs_job = Some(r.mount_job());
                    }
                }
                tokio::spawn(async move {
                    let r = primary_up_with_rfs(job, rfs_job, key, registry, &module, &tx).await;
                    let _ = tx
                        .send(Event::Effect {
                            module,
                            done: EffectDone::PrimaryUp(r),
                        })
                        .await;
                });
            }
            Act::StopPrimary => {
                let mut job = job;
                let rt = self.modules.get_mut(name).and_then(|m| {
                    m.busy = true;
                    m.mirror.as_mut()
                });
                let (up, prims) = match rt {
                    Some(rt) => {
                        job.fence_first = rt.core.take_fence();
                        let prims = rt.rfs.as_mut().map_or_else(Vec::new, |r| {
                            r.links.iter_mut().for_each(|l| *l = Link::Alone);
                            std::mem::take(&mut r.primaries)
                        });
                        (rt.primary.take(), prims)
                    }
                    None => (None, Vec::new()),
                };
                self.pending += 1;
                tokio::spawn(async move {
                    let log = job.log.clone();
                    let r = fx::primary_down(job, up).await;
                    // After stop_prim: the application no longer writes.
                    if !prims.is_empty() {
                        let _ = tokio::task::spawn_blocking(move || {
                            rfsfx::stop_primaries(prims, &log);
                        })
                        .await;
                    }
                    let _ = tx
                        .send(Event::Effect {
                            module,
                            done: EffectDone::PrimaryDown(r),
                        })
                        .await;
                });
            }
            Act::Announce => {
                if let Some(up) = m.mirror.as_ref().and_then(|rt| rt.primary.as_ref()) {
                    fx::reannounce(&job, up);
                }
            }
            Act::CheckWitness { generation } => {
                let (witness, arbiters, timeout) = m
                    .cfg
                    .splitbrain
                    .as_ref()
                    .map(|s| (s.witness.clone(), s.arbiter.clone(), s.timeout))
                    .unwrap_or_default();
                let request = crate::witness::codec::Request {
                    cluster: self.cluster.name.clone(),
                    module: module.clone(),
                    node: self.me.clone(),
                    generation,
                    nonce: 0,
                };
                let key = crate::witness::codec::WitnessKey::derive(&self.cluster.key);
                // When both sides of a cut reach the arbiter, the running
                // primary should keep its role (no failover for a cut
                // heartbeat link): a node that is not primary asks a pulse
                // later, after the primary's claim.
                let primary = m
                    .mirror
                    .as_ref()
                    .is_some_and(|rt| matches!(rt.core.state(), MState::Prim | MState::Alone));
                let delay = if primary || arbiters.is_empty() {
                    Duration::ZERO
                } else {
                    m.cfg.heart.pulse + Duration::from_millis(100)
                };
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    let mut ok = false;
                    for w in &witness {
                        if checks::ping(&w.to_string(), timeout).await.is_ok() {
                            ok = true;
                            break;
                        }
                    }
                    if !arbiters.is_empty() {
                        let answer =
                            crate::daemon::arbiter::ask(&arbiters, request, &key, timeout).await;
                        job.log.info(&format!(
                            "arbiter: {} ({})",
                            if answer.granted {
                                "granted"
                            } else {
                                "not granted"
                            },
                            answer.detail
                        ));
                        ok = answer.granted;
                    }
                    let _ = tx
                        .send(Event::Effect {
                            module,
                            done: EffectDone::Witness(ok),
                        })
                        .await;
                });
            }
        }
    }

    /// A mirror effect completed.
    pub(super) fn mirror_effect(&mut self, name: &str, done: EffectDone) {
        let now = Instant::now();
        let Some(m) = self.modules.get_mut(name) else {
            return;
        };
        let Some(rt) = m.mirror.as_mut() else { return };
        let sequenced = !matches!(done, EffectDone::Witness(_));
        match done {
            EffectDone::PrimaryUp(r) => {
                self.pending = self.pending.saturating_sub(1);
                m.busy = false;
                let ok = match r {
                    Ok(mut up) => {
                        if let Some(rfs) = rt.rfs.as_mut() {
                            rfs.primaries = std::mem::take(&mut up.rfs);
                            rfs.links.iter_mut().for_each(|l| *l = Link::Alone);
                            rfs.next_try = now;
                        }
                        rt.primary = Some(up);
                        true
                    }
                    Err(e) => {
                        m.log.error(&format!("becoming primary: {e}"));
                        false
                    }
                };
                rt.core.app_started(ok);
            }
            EffectDone::PrimaryDown(r) => {
                self.pending = self.pending.saturating_sub(1);
                m.busy = false;
                if let Err(e) = r {
                    m.log.error(&format!("stopping the primary: {e}"));
                }
                rt.core.app_stopped(now);
            }
            EffectDone::Prestart(r) => {
                self.pending = self.pending.saturating_sub(1);
                if let Err(e) = r {
                    m.log.error(&format!("prestart: {e}: stopping the module"));
                    m.wanted = false;
                    let _ = rt.core.handle_command(now, Cmd::Stop);
                }
            }
            EffectDone::Poststop(r) => {
                self.pending = self.pending.saturating_sub(1);
                if let Err(e) = r {
                    m.log.error(&format!("poststop: {e}"));
                }
            }
            EffectDone::Witness(ok) => rt.core.witness(now, ok),
            EffectDone::FarmUp(_) | EffectDone::FarmDown(_) => {}
        }
        if sequenced {
            rt.seq.finished();
            m.busy = rt.seq.busy();
        }
        // What the core asks now queues behind the effects already waiting.
        self.mirror_drain(name);
        if sequenced {
            self.mirror_next_step(name);
        }
    }

    /// A peer heartbeat for a mirror module.
    pub(super) fn mirror_peer(
        &mut self,
        name: &str,
        now: Instant,
        state: ModuleState,
        payload: &[u8],
    ) {
        let Some(rt) = self.modules.get_mut(name).and_then(|m| m.mirror.as_mut()) else {
            return;
        };
        if let Some(v) = View::decode(from_state(state), payload) {
            rt.core.handle_peer(now, v);
        }
        self.mirror_drain(name);
    }

    /// Timers of mirror modules.
    pub(super) fn mirror_timeouts(&mut self, now: Instant) {
        let due: Vec<String> = self
            .modules
            .iter()
            .filter(|(_, m)| {
                m.mirror
                    .as_ref()
                    .and_then(|rt| rt.core.poll_timeout())
                    .is_some_and(|t| t <= now)
            })
            .map(|(n, _)| n.clone())
            .collect();
        for name in due {
            if let Some(rt) = self.modules.get_mut(&name).and_then(|m| m.mirror.as_mut()) {
                rt.core.handle_timeout(now);
            }
            self.mirror_drain(&name);
        }
    }

    /// A checker of a mirror module failed or recovered (after
    /// `m.failing` was updated).
    pub(super) fn mirror_check(&mut self, name: &str, id: &str, failed: bool) {
        let now = Instant::now();
        let Some(m) = self.modules.get_mut(name) else {
            return;
        };
        let Some(meta) = checks::meta(&m.cfg, id) else {
            return;
        };
        let Some(rt) = m.mirror.as_mut() else { return };
        if meta.action == CheckAction::Wait {
            // The core holds the node in WAIT while any is down.
            let down = m
                .failing
                .keys()
                .find(|k| checks::meta(&m.cfg, k).is_some_and(|c| c.action == CheckAction::Wait))
                .cloned();
            rt.core.wait_checker(now, down);
            self.mirror_drain(name);
            return;
        }
        let st = rt.core.state();
        let applies = match meta.when {
            When::Prim => matches!(st, MState::Prim | MState::Alone),
            When::Second => st == MState::Second,
            When::Both => st != MState::Stop,
            When::Pre => st == MState::Wait,
        };
        if !applies || !failed || m.busy {
            return;
        }
        let action = meta.action;
        let cmd = match action {
            CheckAction::NoAction | CheckAction::Wait => return,
            CheckAction::Stop => Cmd::Stop,
            CheckAction::Restart | CheckAction::StopStart => {
                let window = m.cfg.service.loop_interval;
                rt.loops.retain(|t| now.duration_since(*t) < window);
                if rt.loops.len() >= m.cfg.service.maxloop as usize {
                    m.log.error(&format!(
                        "checker {id}: {} restarts within {:?} (maxloop): stopping the module here",
                        rt.loops.len(),
                        window
                    ));
                    rt.loops.clear();
                    Cmd::Stop
                } else {
                    rt.loops.push(now);
                    if action == CheckAction::Restart && matches!(st, MState::Prim | MState::Alone)
                    {
                        Cmd::Restart
                    } else {
                        Cmd::Stop
                    }
                }
            }
        };
        m.log.info(&format!("checker {id} failed: {cmd:?}"));
        let restart_module = action == CheckAction::StopStart && cmd == Cmd::Stop;
        if rt.core.handle_command(now, cmd).is_ok() {
            self.mirror_drain(name);
        }
        if restart_module {
            // stopstart: the module starts again once stopped.
            if let Some(m) = self.modules.get_mut(name) {
                m.after_stop = AfterStop::Restart;
            }
        }
    }
}

/// Mounts the replicated directories (off the engine task), forwards their
/// events to the engine, then VIP, ARP and `start_prim`.
async fn primary_up_with_rfs(
    job: MirrorJob,
    rfs_job: Option<(Vec<rfsfx::RfsDir>, crate::rfs::PrimaryParams)>,
    key: Vec<u8>,
    registry: std::sync::Arc<crate::rfs::Registry>,
    module: &str,
    tx: &tokio::sync::mpsc::Sender<Event>,
) -> Result<PrimaryUp, String> {
    let mut prims = Vec::new();
    if let Some((dirs, params)) = rfs_job {
        let mounted = tokio::task::spawn_blocking(move || {
            rfsfx::mount_primaries(&dirs, &params, &key, &registry)
        })
        .await
        .map_err(|e| format!("mount task: {e}"))??;
        for (p, mut rx) in mounted {
            job.log.info(&format!(
                "replicated directory {} served (FUSE over the real directory)",
                p.dir().display()
            ));
            let (tx, module) = (tx.clone(), module.to_owned());
            tokio::spawn(async move {
                while let Some(ev) = rx.recv().await {
                    if tx
                        .send(Event::RfsPrimary {
                            module: module.clone(),
                            ev,
                        })
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            });
            prims.push(p);
        }
    }
    match fx::primary_up(job.clone()).await {
        Ok(mut up) => {
            up.rfs = prims;
            Ok(up)
        }
        Err(e) => {
            if !prims.is_empty() {
                let log = job.log.clone();
                let _ =
                    tokio::task::spawn_blocking(move || rfsfx::stop_primaries(prims, &log)).await;
            }
            Err(e)
        }
    }
}

impl Engine {
    /// Keeps the replicated directories in line with the state: registered
    /// (read-only) while SECOND, resynchronising a SECOND peer while primary.
    pub(super) fn rfs_reconcile(&mut self, name: &str) {
        let now = Instant::now();
        let peer_addr = self.replication_peer(name);
        let registry = std::sync::Arc::clone(&self.registry);
        let Some(m) = self.modules.get_mut(name) else {
            return;
        };
        let busy = m.busy;
        let log = m.log.clone();
        let Some(rt) = m.mirror.as_mut() else { return };
        let state = rt.core.state();
        let peer = rt.core.peer_view();
        let Some(r) = rt.rfs.as_mut() else { return };
        if state == MState::Second && !r.secondary && !busy {
            match rfsfx::become_secondary(&r.dirs, r.async_mode(), &registry) {
                Ok(()) => {
                    r.secondary = true;
                    r.in_sync.iter_mut().for_each(|s| *s = false);
                    log.info("replicated directories ready to receive (read-only here)");
                }
                Err(e) => log.error(&format!("cannot receive replication: {e}")),
            }
        } else if state != MState::Second && r.secondary {
            r.secondary = false;
            r.in_sync.iter_mut().for_each(|s| *s = false);
            let dirs = r.dirs.clone();
            tokio::task::spawn_blocking(move || rfsfx::leave_secondary(&dirs, &registry));
        }
        let primary = matches!(state, MState::Prim | MState::Alone);
        let peer_second = peer.is_some_and(|v| v.state == MState::Second);
        if primary
            && peer_second
            && !r.primaries.is_empty()
            && now >= r.next_try
            && r.links.contains(&Link::Alone)
            && let Some(addr) = peer_addr
        {
            let n = r.resync(addr, now);
            if n > 0 {
                log.info(&format!("resynchronising {n} directory(ies) to {addr}"));
            }
        }
    }

    /// `fullsync`: the next resynchronisation of this module copies
    /// everything — from here (`prim fullsync`), or towards here (`second
    /// fullsync`: this copy forgets its synchronisation point, so the
    /// primary finds nothing to trust).
    pub(super) fn rfs_fullsync(&mut self, name: &str, here: bool) {
        let Some(m) = self.modules.get_mut(name) else {
            return;
        };
        let log = m.log.clone();
        let Some(r) = m.mirror.as_mut().and_then(|rt| rt.rfs.as_mut()) else {
            return;
        };
        if here {
            for d in &r.dirs {
                let forgot = d
                    .state
                    .set_sync_id(0)
                    .and_then(|()| d.state.forget_resume(crate::rfs::state::Side::Received));
                if let Err(e) = forgot {
                    log.error(&format!(
                        "{}: forgetting the synchronisation point: {e}",
                        d.path
                    ));
                }
            }
            log.info("fullsync: this copy will be resynchronised entirely");
        } else {
            r.full_next = true;
            log.info("fullsync: the next resynchronisation from here copies everything");
        }
    }

    /// `safekit rfs verify`: compares both copies off the engine task and
    /// answers when done.
    pub(super) fn rfs_verify(
        &mut self,
        name: &str,
        reply: tokio::sync::oneshot::Sender<crate::control::Response>,
    ) {
        use crate::control::Response;
        let peer = self.replication_peer(name);
        let err = |e: String| Response::Error { error: e };
        let Some(m) = self.modules.get(name) else {
            let _ = reply.send(err(format!("no module {name:?} on node {}", self.me)));
            return;
        };
        let Some(r) = m.mirror.as_ref().and_then(|rt| rt.rfs.as_ref()) else {
            let _ = reply.send(err(format!(
                "{name}: no replicated directory ([rfs]) in this module"
            )));
            return;
        };
        if r.primaries.is_empty() {
            let _ = reply.send(err(format!(
                "{name}: run verify on the primary (this node is {})",
                m.state.name()
            )));
            return;
        }
        let Some(peer) = peer else {
            let _ = reply.send(err(format!("{name}: no replication address for the peer")));
            return;
        };
        let jobs: Vec<(String, crate::rfs::Verifier)> = r
            .dirs
            .iter()
            .zip(&r.primaries)
            .map(|(d, p)| (d.path.clone(), p.verifier()))
            .collect();
        tokio::task::spawn_blocking(move || {
            let mut dirs = Vec::new();
            for (path, v) in jobs {
                match v.verify(peer) {
                    Ok((entries, diffs)) => dirs.push((path, entries, diffs)),
                    Err(e) => {
                        let _ = reply.send(Response::Error {
                            error: format!("{path}: {}", crate::rfs::error_chain(&e)),
                        });
                        return;
                    }
                }
            }
            let _ = reply.send(Response::Verified { dirs });
        });
    }

    /// The peer's replication address (replication LAN, port 5600).
    fn replication_peer(&self, name: &str) -> Option<std::net::SocketAddr> {
        let m = self.modules.get(name)?;
        let peer = m.cfg.service.nodes.iter().find(|n| **n != self.me)?;
        let lan = self.cluster.replication_lan()?;
        let ip = *self.cluster.node(peer)?.addrs.get(&lan.name)?;
        Some(std::net::SocketAddr::new(
            ip,
            self.cluster.ports.replication,
        ))
    }

    /// A primary-side replication event.
    pub(super) fn rfs_primary_event(&mut self, name: &str, ev: crate::rfs::RfsEvent) {
        use crate::rfs::RfsEvent;
        let now = Instant::now();
        let Some(m) = self.modules.get_mut(name) else {
            return;
        };
        let log = m.log.clone();
        let Some(rt) = m.mirror.as_mut() else { return };
        let Some(r) = rt.rfs.as_mut() else { return };
        match ev {
            RfsEvent::Connected { dir } => {
                if let Some(i) = r.index(&dir) {
                    r.links[i] = Link::Connected;
                    r.failure[i] = None;
                    r.retry = rfsfx::FIRST_RETRY;
                    log.info(&format!(
                        "{}: secondary in sync, live replication",
                        r.dirs[i].path
                    ));
                }
                if r.all_connected() {
                    rt.core.replication_synced(now);
                }
            }
            RfsEvent::SecondaryLost { dir, reason } => {
                if let Some(i) = r.index(&dir) {
                    r.links[i] = Link::Alone;
                    r.lost[i] += 1;
                    log.info(&format!("{}: secondary lost ({reason})", r.dirs[i].path));
                }
                r.next_try = now + r.retry;
                rt.core.replication_lost(now);
            }
            RfsEvent::SecondaryFailed {
                dir, seq, detail, ..
            } => {
                // Each attempt would fail the same way until the secondary
                // has room (or a working disk) again: back off.
                r.retry = (r.retry * 2).min(rfsfx::MAX_RETRY);
                log.error(&format!(
                    "{dir}: the secondary could not apply #{seq} ({detail}): full resynchronisation of the tree, next attempt in {:?}",
                    r.retry
                ));
                if let Some(i) = r.index(&dir) {
                    r.failure[i] = Some(format!("secondary could not write: {detail}"));
                }
            }
            RfsEvent::JournalFailed { dir, error } => {
                log.error(&format!(
                    "{dir}: journal write failed ({error}): the next resynchronisation is full"
                ));
                r.full_next = true;
            }
        }
        self.mirror_drain(name);
    }

    /// A secondary-side replication event.
    pub(super) fn rfs_secondary_event(&mut self, ev: crate::rfs::SecondaryEvent) {
        use crate::rfs::SecondaryEvent as S;
        let now = Instant::now();
        let wire = match &ev {
            S::Connected { dir, .. }
            | S::InSync { dir }
            | S::Quarantined { dir, .. }
            | S::Disconnected { dir, .. }
            | S::Failed { dir, .. } => dir.clone(),
            S::Refused { peer, reason } => {
                // A primary retries every second: the same refusal is
                // logged once a minute.
                let repeat = self.last_refusal.as_ref().is_some_and(|(r, t)| {
                    r == reason && now < *t + std::time::Duration::from_secs(60)
                });
                if !repeat {
                    tracing::warn!(%peer, %reason, "replication connection refused");
                    self.last_refusal = Some((reason.clone(), now));
                }
                return;
            }
        };
        let Some(name) = rfsfx::module_of(&wire).map(str::to_owned) else {
            return;
        };
        let Some(m) = self.modules.get_mut(&name) else {
            return;
        };
        let log = m.log.clone();
        let Some(rt) = m.mirror.as_mut() else { return };
        let Some(r) = rt.rfs.as_mut() else { return };
        let Some(i) = r.index(&wire) else { return };
        let path = r.dirs[i].path.clone();
        match ev {
            S::Connected { peer, .. } => {
                r.in_sync[i] = false;
                log.info(&format!("{path}: primary {peer} connected: resynchronising"));
            }
            S::InSync { .. } => {
                r.in_sync[i] = true;
                r.failure[i] = None;
                log.info(&format!("{path}: in sync, receiving every write"));
                if r.in_sync.iter().all(|s| *s) {
                    rt.core.replication_synced(now);
                }
            }
            S::Quarantined { to, paths, .. } => log.error(&format!(
                "{path}: {paths} path(s) this node changed alone kept in {} before the resynchronisation",
                to.display()
            )),
            S::Disconnected { reason, .. } => {
                log.info(&format!("{path}: replication connection ended ({reason})"));
            }
            S::Failed {
                seq, errno, detail, ..
            } => {
                // This copy is behind what the primary sent: never take
                // over on it, until a resynchronisation completes.
                r.in_sync[i] = false;
                let why = match errno {
                    0 => detail,
                    e => format!("{}: {detail}", errno_name(e)),
                };
                log.error(&format!(
                    "{path}: cannot write this copy (#{seq}, {why}): not in sync, this node will not take over on it"
                ));
                r.failure[i] = Some(why.clone());
                rt.core.copy_failed(now, &format!("{path}: {why}"));
            }
            S::Refused { .. } => {}
        }
        self.mirror_drain(&name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh directory, removed on drop.
    struct Dir(std::path::PathBuf);
    impl Dir {
        fn new(name: &str) -> Self {
            let d = std::env::temp_dir()
                .join(format!("safekit-mirror-json-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&d);
            std::fs::create_dir_all(&d).unwrap();
            Self(d)
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn a_record_that_cannot_be_used_never_means_up_to_date() {
        let d = Dir::new("unusable");
        let f = d.0.join("mirror.json");
        // Missing, with replicated directories: first start, needs prim.
        let l = load_persisted(&f, true, "web");
        assert!(!l.data.uptodate);
        let why = l.why_not_uptodate.unwrap();
        assert!(why.contains("no state record"), "{why}");
        assert!(why.contains("safekit prim -m web"), "{why}");
        // Missing, nothing replicated: a node that never ran, empty data.
        assert_eq!(
            load_persisted(&f, false, "web"),
            Loaded {
                data: Persisted::default(),
                why_not_uptodate: None
            }
        );
        // Corrupt, either way.
        std::fs::write(&f, b"{\"generation\": 3, \"uptodate\": tr").unwrap();
        for replicated in [true, false] {
            let l = load_persisted(&f, replicated, "web");
            assert!(!l.data.uptodate);
            assert!(l.why_not_uptodate.unwrap().contains("corrupt"));
        }
        // Unreadable (an I/O error: here EISDIR).
        std::fs::remove_file(&f).unwrap();
        std::fs::create_dir(&f).unwrap();
        let l = load_persisted(&f, false, "web");
        assert!(!l.data.uptodate);
        assert!(l.why_not_uptodate.unwrap().contains("unreadable"));
        // A good record is used as it is.
        std::fs::remove_dir(&f).unwrap();
        let good = Persisted {
            generation: 7,
            uptodate: true,
            took_over: true,
            was_primary: true,
            peer_may_have_taken_over: false,
        };
        std::fs::write(&f, serde_json::to_vec(&good).unwrap()).unwrap();
        assert_eq!(
            load_persisted(&f, true, "web"),
            Loaded {
                data: good,
                why_not_uptodate: None
            }
        );
        // A write that failed: neither the older record nor its absence
        // stands for this node's knowledge, replicated or not.
        let done = fail_record(&f);
        assert!(done.contains("marked as failed"), "{done}");
        assert!(!f.exists());
        for replicated in [true, false] {
            let l = load_persisted(&f, replicated, "web");
            assert!(!l.data.uptodate);
            assert!(l.why_not_uptodate.unwrap().contains("failed"));
        }
    }
}
