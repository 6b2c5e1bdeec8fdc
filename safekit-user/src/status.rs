//! Module states as every interface shows them (CLI, heartbeats, HTTP,
//! metrics), and the status snapshot the daemon publishes.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A module's state on one node (SPEC §5, §6).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "UPPERCASE")]
pub enum ModuleState {
    /// Not running.
    Stop,
    /// Waiting: in transition, or stuck (peer or up-to-date data missing, a
    /// checker down).
    Wait,
    /// Mirror primary without a secondary.
    Alone,
    /// Mirror primary with an up-to-date secondary.
    Prim,
    /// Mirror secondary.
    Second,
    /// Farm member serving its share.
    Up,
}

impl ModuleState {
    /// Every state.
    pub const ALL: [ModuleState; 6] = [
        ModuleState::Stop,
        ModuleState::Wait,
        ModuleState::Alone,
        ModuleState::Prim,
        ModuleState::Second,
        ModuleState::Up,
    ];

    /// Code carried in heartbeats.
    #[must_use]
    pub fn code(self) -> u8 {
        match self {
            ModuleState::Stop => 0,
            ModuleState::Wait => 1,
            ModuleState::Alone => 2,
            ModuleState::Prim => 3,
            ModuleState::Second => 4,
            ModuleState::Up => 5,
        }
    }

    /// State of a heartbeat code.
    #[must_use]
    pub fn from_code(code: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.code() == code)
    }

    /// Exit code of `safekit state -m AM -lq`: STOP 0, WAIT 1, ALONE/UP 2,
    /// PRIM 3, SECOND 4.
    #[must_use]
    pub fn exit_code(self) -> i32 {
        match self {
            ModuleState::Stop => 0,
            ModuleState::Wait => 1,
            ModuleState::Alone | ModuleState::Up => 2,
            ModuleState::Prim => 3,
            ModuleState::Second => 4,
        }
    }

    /// Upper-case name.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            ModuleState::Stop => "STOP",
            ModuleState::Wait => "WAIT",
            ModuleState::Alone => "ALONE",
            ModuleState::Prim => "PRIM",
            ModuleState::Second => "SECOND",
            ModuleState::Up => "UP",
        }
    }

    /// True where `ready.txt` answers 200: PRIM, ALONE or UP.
    #[must_use]
    pub fn is_ready(self) -> bool {
        matches!(
            self,
            ModuleState::Prim | ModuleState::Alone | ModuleState::Up
        )
    }
}

impl std::fmt::Display for ModuleState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// State colour: red = down or stuck, orange = in transition, green = fine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Colour {
    /// Down or stuck.
    Red,
    /// In transition (resynchronising, waiting for a peer).
    Orange,
    /// Serving as intended.
    Green,
}

impl Colour {
    /// Lower-case name.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Colour::Red => "red",
            Colour::Orange => "orange",
            Colour::Green => "green",
        }
    }

    /// ANSI escape for a terminal.
    #[must_use]
    pub fn ansi(self) -> &'static str {
        match self {
            Colour::Red => "\x1b[31m",
            Colour::Orange => "\x1b[33m",
            Colour::Green => "\x1b[32m",
        }
    }
}

/// Module kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Primary/backup.
    Mirror,
    /// Active/active.
    Farm,
}

/// One element of a `[lan, ms]` pair of [`PeerStatus::last_seen_ms`] (for
/// the `OpenAPI` document only).
#[derive(Serialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum LanOrMs {
    /// LAN name.
    Lan(String),
    /// Milliseconds.
    Ms(u64),
}

/// What this node knows of a peer's instance of a module.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PeerStatus {
    /// Peer node name.
    pub node: String,
    /// Last state heard, `None` if never heard or lost.
    pub state: Option<ModuleState>,
    /// True once heartbeats stopped on every LAN for the timeout.
    pub lost: bool,
    /// Milliseconds since the last heartbeat per LAN (absent: never), as
    /// `[lan, ms]` pairs.
    #[schema(value_type = Vec<Vec<LanOrMs>>)]
    pub last_seen_ms: Vec<(String, u64)>,
}

/// One module on this node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ModuleStatus {
    /// Module name.
    pub name: String,
    /// Kind.
    pub mode: Mode,
    /// Local state.
    pub state: ModuleState,
    /// Local colour.
    pub colour: Colour,
    /// Every peer of this module.
    pub peers: Vec<PeerStatus>,
    /// Details for `state -v` (key, value), in display order: checkers
    /// and their last results, resynchronisation, ...
    #[schema(value_type = Vec<Vec<String>>)]
    pub details: Vec<(String, String)>,
    /// Farm modules: membership and buckets.
    pub farm: Option<FarmStatus>,
    /// Mirror modules: each replicated directory.
    #[serde(default)]
    pub rfs: Vec<RfsDirStatus>,
    /// Each checker's last result while the module runs.
    #[serde(default)]
    pub checkers: Vec<CheckerStatus>,
}

/// The last result of one checker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CheckerStatus {
    /// Checker id (`tcp0`, `custom.db`, ...).
    pub id: String,
    /// What it checks.
    pub what: String,
    /// Up at its last check.
    pub up: bool,
    /// Why it is down.
    pub reason: Option<String>,
    /// When that result came, Unix time in milliseconds.
    pub at_ms: u64,
}

/// Every value of [`RfsDirStatus::link`].
pub const RFS_LINKS: [&str; 7] = [
    "alone",
    "resyncing",
    "connected",
    "receiving",
    "in sync",
    "failed",
    "idle",
];

/// One replicated directory of a mirror module on this node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RfsDirStatus {
    /// The configured path.
    pub path: String,
    /// Primary: `alone`, `resyncing`, `connected`; secondary: `receiving`,
    /// `in sync`, `failed` (this copy could not be written); `idle`
    /// otherwise.
    pub link: String,
    /// Secondary: why this copy could not be written (disk full, I/O
    /// error), until it is in sync again; primary: why the secondary
    /// failed, until it is connected again.
    #[serde(default)]
    pub failure: Option<String>,
    /// File data sent by resynchronisations from this node (cumulative).
    pub resync_bytes_sent: u64,
    /// Times the secondary was lost.
    pub lost: u64,
    /// The current (or last) resynchronisation, in words.
    pub progress: String,
    /// Its bytes done.
    pub bytes_done: u64,
    /// Its bytes known to send.
    pub bytes_total: u64,
    /// Its paths done.
    pub files_done: u64,
    /// Its paths known to send.
    pub files_total: u64,
    /// It is running.
    pub resync_active: bool,
    /// Its rate so far, bytes per second.
    #[serde(default)]
    pub rate: u64,
    /// Its estimated time left, seconds (while running).
    #[serde(default)]
    pub eta_secs: Option<u64>,
}

/// A farm module's membership as this node sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct FarmStatus {
    /// Members this node believes UP.
    pub view: Vec<String>,
    /// Buckets this node accepts.
    pub buckets: Vec<u32>,
    /// Buckets of every member of `view`, by node name, under the
    /// assignment of that view (`farm::assign`, the same pure function every
    /// node computes): what each node serves once the members agree.
    #[serde(default)]
    pub assignment: BTreeMap<String, Vec<u32>>,
    /// Draining (graceful stop): the connections left to serve.
    #[serde(default)]
    pub draining: Option<u32>,
}

/// Sorted bucket numbers as ranges, "0-3,7,9-10" ("none" when empty).
#[must_use]
pub fn bucket_ranges(v: &[u32]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < v.len() {
        let start = v[i];
        let mut end = start;
        while i + 1 < v.len() && v[i + 1] == end + 1 {
            i += 1;
            end = v[i];
        }
        out.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
        i += 1;
    }
    if out.is_empty() {
        "none".into()
    } else {
        out.join(",")
    }
}

/// The node and its modules, as `safekit state` shows them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NodeStatus {
    /// Cluster name.
    pub cluster: String,
    /// This node's name.
    pub node: String,
    /// Daemon incarnation.
    pub epoch: u64,
    /// Every module, by name.
    pub modules: Vec<ModuleStatus>,
}

impl NodeStatus {
    /// The module called `name`.
    #[must_use]
    pub fn module(&self, name: &str) -> Option<&ModuleStatus> {
        self.modules.iter().find(|m| m.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_ranges_are_compact() {
        assert_eq!(bucket_ranges(&[]), "none");
        assert_eq!(bucket_ranges(&[5]), "5");
        assert_eq!(bucket_ranges(&[0, 1, 2, 3, 7, 9, 10]), "0-3,7,9-10");
        let all: Vec<u32> = (0..256).collect();
        assert_eq!(bucket_ranges(&all), "0-255");
    }
}
