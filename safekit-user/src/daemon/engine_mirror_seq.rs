//! A mirror module's effects one at a time: `prestart`, becoming primary,
//! stopping being primary and `poststop` run in the order they were asked,
//! each once the previous one finished. So `start_prim` never runs before
//! `prestart` finished, a stop asked while `start_prim` runs waits for it
//! (and then finds the VIP to remove), and `poststop` comes after
//! `stop_prim`. Becoming primary asked then stopped before it began is
//! dropped with its stop: `start_prim` does not run at all.
//!
//! `forcestop` sets a flag that every effect sees through its
//! [`super::super::mirror::MirrorJob`]: the running `prestart`, `start_prim`
//! or nice `stop_prim` is killed and the stop runs `stop_prim force` at
//! once.

use std::{collections::VecDeque, time::Instant};

use tokio::sync::watch;

use super::{AfterStop, EffectDone, Engine, Event};
use crate::daemon::{
    mirror as fx,
    mirror_core::{Act, Cmd, MState},
};

/// One effect of a mirror module.
#[derive(Debug)]
pub(super) enum Step {
    Prestart,
    /// `StartPrimary` or `StopPrimary` from the core.
    Core(Act),
    Poststop,
}

/// The effects of one mirror module.
#[derive(Debug)]
pub(super) struct Sequencer {
    /// An effect runs; its completion comes back as an engine event.
    running: bool,
    /// Effects waiting for the running one, in order.
    waiting: VecDeque<Step>,
    /// `forcestop` asked (until the next start from STOP).
    force: watch::Sender<bool>,
    /// Started from STOP, `poststop` not run yet.
    started: bool,
}

impl Sequencer {
    pub(super) fn new() -> Self {
        Self {
            running: false,
            waiting: VecDeque::new(),
            force: watch::Sender::new(false),
            started: false,
        }
    }

    /// An effect runs or waits.
    pub(super) fn busy(&self) -> bool {
        self.running || !self.waiting.is_empty()
    }

    /// The running effect's completion arrived.
    pub(super) fn finished(&mut self) {
        self.running = false;
    }

    /// What effects watch for `forcestop`.
    pub(super) fn force_rx(&self) -> watch::Receiver<bool> {
        self.force.subscribe()
    }
}

impl Engine {
    /// The module leaves STOP: `forcestop` is forgotten and `prestart` is
    /// its first effect.
    pub(super) fn mirror_begin(&mut self, name: &str) {
        let Some(rt) = self.modules.get_mut(name).and_then(|m| m.mirror.as_mut()) else {
            return;
        };
        rt.seq.force.send_replace(false);
        rt.seq.started = true;
        self.mirror_step(name, Step::Prestart);
    }

    /// The module reached STOP with nothing running: `poststop`, once.
    pub(super) fn mirror_end(&mut self, name: &str) {
        let Some(rt) = self.modules.get_mut(name).and_then(|m| m.mirror.as_mut()) else {
            return;
        };
        if std::mem::take(&mut rt.seq.started) {
            self.mirror_step(name, Step::Poststop);
        }
    }

    /// `forcestop`: stop at once, `stop_prim force` without the nice
    /// `stop_prim` first (and killing one already running).
    pub(super) fn mirror_forcestop(&mut self, name: &str) -> Result<String, String> {
        let m = self.module_mut(name)?;
        let rt = m
            .mirror
            .as_mut()
            .ok_or_else(|| format!("module {name} is not a mirror module"))?;
        if rt.core.state() == MState::Stop {
            return Err(format!("{name}: already stopped"));
        }
        m.wanted = false;
        m.after_stop = AfterStop::Nothing;
        rt.seq.force.send_replace(true);
        m.log.info("forcestop requested");
        self.mirror_command(name, Cmd::Stop)
            .map(|_| format!("{name}: forcestop accepted"))
    }

    /// Runs `step` now if no effect runs or waits, else queues it.
    pub(super) fn mirror_step(&mut self, name: &str, step: Step) {
        let Some(m) = self.modules.get_mut(name) else {
            return;
        };
        let Some(rt) = m.mirror.as_mut() else { return };
        if matches!(step, Step::Core(Act::StopPrimary))
            && matches!(rt.seq.waiting.back(), Some(Step::Core(Act::StartPrimary)))
        {
            // Stopped before becoming primary began: neither runs.
            rt.seq.waiting.pop_back();
            m.log
                .info("stopped before start_prim ran: the primary is not started");
            rt.core.app_stopped(Instant::now());
            m.busy = rt.seq.busy();
            return;
        }
        if rt.seq.busy() {
            rt.seq.waiting.push_back(step);
            m.busy = true;
            return;
        }
        self.mirror_run(name, step);
    }

    /// After an effect finished ([`Sequencer::finished`], its result given
    /// to the core): the next waiting one starts.
    pub(super) fn mirror_next_step(&mut self, name: &str) {
        while let Some(rt) = self.modules.get_mut(name).and_then(|m| m.mirror.as_mut())
            && !rt.seq.running
            && let Some(step) = rt.seq.waiting.pop_front()
        {
            self.mirror_run(name, step);
        }
        if let Some(m) = self.modules.get_mut(name)
            && let Some(rt) = m.mirror.as_ref()
        {
            m.busy = rt.seq.busy();
        }
    }

    fn mirror_run(&mut self, name: &str, step: Step) {
        let Some(m) = self.modules.get_mut(name) else {
            return;
        };
        let Some(rt) = m.mirror.as_mut() else { return };
        rt.seq.running = true;
        m.busy = true;
        let prestart = match step {
            Step::Core(act) => return self.mirror_act(name, act),
            Step::Prestart => true,
            Step::Poststop => false,
        };
        let Some(m) = self.modules.get(name) else {
            return;
        };
        let job = self.mirror_job(m);
        let (tx, module) = (self.events.clone(), name.to_owned());
        self.pending += 1;
        tokio::spawn(async move {
            let done = if prestart {
                EffectDone::Prestart(fx::prestart(job).await)
            } else {
                EffectDone::Poststop(fx::poststop(job).await)
            };
            let _ = tx.send(Event::Effect { module, done }).await;
        });
    }
}
