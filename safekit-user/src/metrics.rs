//! Counters exported on `GET /metrics` (Prometheus text format). Plain atomics
//! updated on the hot paths; rendering reads them with the latest snapshot.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    sync::atomic::{AtomicU64, Ordering},
};

use crate::{
    heartbeat::Rejected,
    status::{ModuleState, NodeStatus},
};

/// Heartbeat counters of one module.
#[derive(Debug, Default)]
pub struct ModuleCounters {
    /// Datagrams sent (one per LAN per pulse).
    pub heartbeats_sent: AtomicU64,
    /// Authentic heartbeats accepted.
    pub heartbeats_received: AtomicU64,
}

/// Every counter of the daemon.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Per module, fixed at start.
    pub modules: BTreeMap<String, ModuleCounters>,
    /// Dropped heartbeats, indexed like `Rejected::ALL`.
    rejected: [AtomicU64; Rejected::ALL.len()],
}

impl Metrics {
    /// Counters for these modules.
    #[must_use]
    pub fn new<'a>(modules: impl IntoIterator<Item = &'a str>) -> Self {
        Self {
            modules: modules
                .into_iter()
                .map(|m| (m.to_owned(), ModuleCounters::default()))
                .collect(),
            rejected: Default::default(),
        }
    }

    /// Counts a dropped heartbeat.
    pub fn reject(&self, why: Rejected) {
        if let Some(i) = Rejected::ALL.iter().position(|r| *r == why) {
            self.rejected[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Dropped heartbeats for one reason.
    #[must_use]
    pub fn rejected(&self, why: Rejected) -> u64 {
        Rejected::ALL
            .iter()
            .position(|r| *r == why)
            .map_or(0, |i| self.rejected[i].load(Ordering::Relaxed))
    }

    /// Prometheus text exposition.
    #[must_use]
    pub fn render(&self, status: &NodeStatus) -> String {
        let mut out = String::new();
        let node = &status.node;
        let _ = writeln!(
            out,
            "# HELP safekit_module_state 1 for the module's current local state.\n# TYPE safekit_module_state gauge"
        );
        for m in &status.modules {
            for s in ModuleState::ALL {
                let v = u8::from(m.state == s);
                let _ = writeln!(
                    out,
                    "safekit_module_state{{node=\"{node}\",module=\"{}\",state=\"{}\"}} {v}",
                    m.name,
                    s.name()
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP safekit_peer_up 1 while the peer's heartbeats for the module arrive.\n# TYPE safekit_peer_up gauge"
        );
        for m in &status.modules {
            for p in &m.peers {
                let _ = writeln!(
                    out,
                    "safekit_peer_up{{node=\"{node}\",module=\"{}\",peer=\"{}\"}} {}",
                    m.name,
                    p.node,
                    u8::from(p.state.is_some() && !p.lost)
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP safekit_heartbeats_sent_total Heartbeat datagrams sent.\n# TYPE safekit_heartbeats_sent_total counter"
        );
        for (name, c) in &self.modules {
            let _ = writeln!(
                out,
                "safekit_heartbeats_sent_total{{node=\"{node}\",module=\"{name}\"}} {}",
                c.heartbeats_sent.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP safekit_heartbeats_received_total Authentic heartbeats accepted.\n# TYPE safekit_heartbeats_received_total counter"
        );
        for (name, c) in &self.modules {
            let _ = writeln!(
                out,
                "safekit_heartbeats_received_total{{node=\"{node}\",module=\"{name}\"}} {}",
                c.heartbeats_received.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP safekit_heartbeats_rejected_total Heartbeats dropped, by reason.\n# TYPE safekit_heartbeats_rejected_total counter"
        );
        for (i, r) in Rejected::ALL.iter().enumerate() {
            let _ = writeln!(
                out,
                "safekit_heartbeats_rejected_total{{node=\"{node}\",reason=\"{}\"}} {}",
                r.label(),
                self.rejected[i].load(Ordering::Relaxed)
            );
        }
        out
    }
}
