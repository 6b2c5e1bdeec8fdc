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

/// A label value as the Prometheus text format wants it: `\`, `"` and
/// newlines escaped (`\\`, `\"`, `\n`), everything else as it is. Names
/// chosen by the operator (modules, nodes, interfaces) are validated, but a
/// replicated directory's path may hold any byte but NUL: unescaped, a `"`
/// or a newline in it would break the whole exposition.
///
/// Written here rather than taken from the `prometheus-client` crate: that
/// crate's escaping is internal to its encoder, and moving every metric to
/// its registry would change all of this file for three characters.
#[derive(Debug, Clone, Copy)]
pub struct Label<'a>(pub &'a str);

impl std::fmt::Display for Label<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut rest = self.0;
        while let Some(i) = rest.find(['\\', '"', '\n']) {
            f.write_str(&rest[..i])?;
            f.write_str(match rest.as_bytes()[i] {
                b'\\' => "\\\\",
                b'"' => "\\\"",
                _ => "\\n",
            })?;
            rest = &rest[i + 1..];
        }
        f.write_str(rest)
    }
}

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
        let node = Label(&status.node);
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
                    Label(&m.name),
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
                    Label(&m.name),
                    Label(&p.node),
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
                "safekit_heartbeats_sent_total{{node=\"{node}\",module=\"{}\"}} {}",
                Label(name),
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
                "safekit_heartbeats_received_total{{node=\"{node}\",module=\"{}\"}} {}",
                Label(name),
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
    let node = Label(&status.node);
    let dirs: Vec<_> = status
        .modules
        .iter()
        .flat_map(|m| m.rfs.iter().map(move |d| (Label(&m.name), d)))
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
                Label(&d.path),
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
                Label(&d.path),
                f(d)
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::{ModuleStatus, RfsDirStatus};

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(Label("plain/path").to_string(), "plain/path");
        assert_eq!(
            Label("a\"b\\c\nd\u{e9}").to_string(),
            "a\\\"b\\\\c\\nd\u{e9}"
        );
    }

    #[test]
    fn a_replicated_path_with_a_quote_and_a_newline_keeps_metrics_parseable() {
        let status = NodeStatus {
            cluster: "lab".into(),
            node: "node1".into(),
            epoch: 1,
            modules: vec![ModuleStatus {
                name: "web".into(),
                mode: crate::status::Mode::Mirror,
                state: ModuleState::Prim,
                colour: crate::status::Colour::Green,
                peers: vec![],
                details: vec![],
                farm: None,
                checkers: vec![],
                rfs: vec![RfsDirStatus {
                    path: "/srv/we\"ird\ndir\\".into(),
                    link: "connected".into(),
                    failure: None,
                    resync_bytes_sent: 0,
                    lost: 0,
                    progress: String::new(),
                    bytes_done: 0,
                    bytes_total: 0,
                    files_done: 0,
                    files_total: 0,
                    resync_active: false,
                    rate: 0,
                    eta_secs: None,
                }],
            }],
        };
        let text = Metrics::new(["web"]).render(&status);
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            // name{labels} value: the labels close right before the value,
            // every quote inside a value escaped.
            let (head, value) = line.rsplit_once(' ').unwrap();
            assert!(value.parse::<f64>().is_ok(), "{line}");
            let labels = head.split_once('{').unwrap().1.strip_suffix('}').unwrap();
            let mut in_value = false;
            let mut escaped = false;
            for c in labels.chars() {
                match (in_value, escaped, c) {
                    (true, false, '\\') => escaped = true,
                    (true, true, _) => escaped = false,
                    (_, false, '"') => in_value = !in_value,
                    _ => {}
                }
            }
            assert!(!in_value, "unterminated label value: {line}");
        }
        assert!(text.contains(r#"dir="/srv/we\"ird\ndir\\""#), "{text}");
    }
}
