//! The service manager's side (systemd `Type=notify`, through `sd-notify`):
//! `READY=1` once the sockets are bound and the modules loaded (and the
//! `boot = true` ones asked to start), `STATUS=` with the module states
//! whenever they change, `WATCHDOG=1` from the engine loop itself — so a
//! wedged engine stops the pings and systemd restarts the daemon — and
//! `STOPPING=1` when a shutdown begins.
//!
//! Without `NOTIFY_SOCKET` (safekitd started by hand, the test labs) every
//! call is a no-op.

use std::time::{Duration, Instant};

use sd_notify::NotifyState;

use crate::status::NodeStatus;

/// What the engine tells the service manager.
#[derive(Debug)]
pub(super) struct ServiceManager {
    /// Ping interval: half of `WATCHDOG_USEC`, as `sd_watchdog_enabled(3)`
    /// advises; `None` without a watchdog.
    ping_every: Option<Duration>,
    next_ping: Instant,
    /// Last `STATUS=` sent.
    status: String,
}

impl ServiceManager {
    /// Reads `WATCHDOG_USEC`/`WATCHDOG_PID` (set by systemd with
    /// `WatchdogSec=`).
    pub(super) fn from_env(now: Instant) -> Self {
        let ping_every = sd_notify::watchdog_enabled().map(|d| d / 2);
        if let Some(d) = ping_every {
            tracing::info!(every = ?d, "systemd watchdog: pinging from the engine loop");
        }
        Self {
            ping_every,
            next_ping: now,
            status: String::new(),
        }
    }

    /// `READY=1` with the first status line.
    pub(super) fn ready(&mut self, status: &NodeStatus) {
        self.status = status_line(status);
        send(&[NotifyState::Ready, NotifyState::Status(&self.status)]);
    }

    /// `STATUS=` when the module states changed since the last one.
    pub(super) fn status(&mut self, status: &NodeStatus) {
        let line = status_line(status);
        if line != self.status {
            send(&[NotifyState::Status(&line)]);
            self.status = line;
        }
    }

    /// `STOPPING=1`: every module is being stopped before the daemon exits.
    pub(super) fn stopping() {
        send(&[
            NotifyState::Stopping,
            NotifyState::Status("stopping every module"),
        ]);
    }

    /// Pings the watchdog when due; called on each turn of the engine loop.
    pub(super) fn tick(&mut self, now: Instant) {
        if let Some(every) = self.ping_every
            && now >= self.next_ping
        {
            send(&[NotifyState::Watchdog]);
            self.next_ping = now + every;
        }
    }

    /// When the loop must turn next at the latest for the watchdog.
    pub(super) fn deadline(&self) -> Option<Instant> {
        self.ping_every.map(|_| self.next_ping)
    }
}

fn send(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "cannot notify the service manager");
    }
}

/// `STATUS=` text: each module's state and colour, e.g. `node1: web PRIM
/// (green), front UP (green)`.
pub(super) fn status_line(status: &NodeStatus) -> String {
    if status.modules.is_empty() {
        return format!("{}: no module", status.node);
    }
    let modules: Vec<String> = status
        .modules
        .iter()
        .map(|m| format!("{} {} ({})", m.name, m.state.name(), m.colour.name()))
        .collect();
    format!("{}: {}", status.node, modules.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::{Colour, Mode, ModuleState, ModuleStatus};

    fn module(name: &str, state: ModuleState, colour: Colour) -> ModuleStatus {
        ModuleStatus {
            name: name.into(),
            mode: Mode::Mirror,
            state,
            colour,
            peers: Vec::new(),
            details: Vec::new(),
            rfs: Vec::new(),
            farm: None,
            checkers: Vec::new(),
        }
    }

    #[test]
    fn status_line_names_every_module_state_and_colour() {
        let mut st = NodeStatus {
            cluster: "c".into(),
            node: "node1".into(),
            epoch: 1,
            modules: Vec::new(),
        };
        assert_eq!(status_line(&st), "node1: no module");
        st.modules = vec![
            module("web", ModuleState::Prim, Colour::Green),
            module("db", ModuleState::Wait, Colour::Red),
        ];
        assert_eq!(status_line(&st), "node1: web PRIM (green), db WAIT (red)");
    }
}
