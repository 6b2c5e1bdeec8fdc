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
        render_rfs(&mut out, status);
        out
    }
}

/// A numeric field of a replicated directory's status.
type Field = fn(&crate::status::RfsDirStatus) -> u64;

/// Replicated directories of mirror modules.
fn render_rfs(out: &mut String, status: &NodeStatus) {
    let node = &status.node;
    let dirs: Vec<_> = status
        .modules
        .iter()
        .flat_map(|m| m.rfs.iter().map(move |d| (m.name.as_str(), d)))
        .collect();
    if dirs.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "# HELP safekit_rfs_link 1 for the replicated directory's current link state.\n# TYPE safekit_rfs_link gauge"
    );
    for (m, d) in &dirs {
        for s in crate::status::RFS_LINKS {
            let _ = writeln!(
                out,
                "safekit_rfs_link{{node=\"{node}\",module=\"{m}\",dir=\"{}\",state=\"{s}\"}} {}",
                d.path,
                u8::from(d.link == s)
            );
        }
    }
    let gauges: [(&str, &str, Field); 9] = [
        (
            "safekit_rfs_resync_rate_bytes",
            "Rate of the current (or last) resynchronisation, bytes per second.\n# TYPE safekit_rfs_resync_rate_bytes gauge",
            |d| d.rate,
        ),
        (
            "safekit_rfs_resync_eta_seconds",
            "Estimated time left of the running resynchronisation (0 when none runs).\n# TYPE safekit_rfs_resync_eta_seconds gauge",
            |d| d.eta_secs.unwrap_or(0),
        ),
        (
            "safekit_rfs_resync_sent_bytes_total",
            "File data sent by resynchronisations from this node.\n# TYPE safekit_rfs_resync_sent_bytes_total counter",
            |d| d.resync_bytes_sent,
        ),
        (
            "safekit_rfs_secondary_lost_total",
            "Times the secondary was lost.\n# TYPE safekit_rfs_secondary_lost_total counter",
            |d| d.lost,
        ),
        (
            "safekit_rfs_resync_bytes_done",
            "Bytes sent by the current (or last) resynchronisation.\n# TYPE safekit_rfs_resync_bytes_done gauge",
            |d| d.bytes_done,
        ),
        (
            "safekit_rfs_resync_bytes_total",
            "Bytes known to send by the current (or last) resynchronisation.\n# TYPE safekit_rfs_resync_bytes_total gauge",
            |d| d.bytes_total,
        ),
        (
            "safekit_rfs_resync_files_done",
            "Paths sent by the current (or last) resynchronisation.\n# TYPE safekit_rfs_resync_files_done gauge",
            |d| d.files_done,
        ),
        (
            "safekit_rfs_resync_files_total",
            "Paths known to send by the current (or last) resynchronisation.\n# TYPE safekit_rfs_resync_files_total gauge",
            |d| d.files_total,
        ),
        (
            "safekit_rfs_resync_active",
            "1 while a resynchronisation runs.\n# TYPE safekit_rfs_resync_active gauge",
            |d| u64::from(d.resync_active),
        ),
    ];
    for (name, help, f) in gauges {
        let _ = writeln!(out, "# HELP {name} {help}");
        for (m, d) in &dirs {
            let _ = writeln!(
                out,
                "{name}{{node=\"{node}\",module=\"{m}\",dir=\"{}\"}} {}",
                d.path,
                f(d)
            );
        }
    }
}
