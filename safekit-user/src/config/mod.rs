//! Configuration: `cluster.toml` and `modules/<AM>/module.toml` (SPEC §4).
//!
//! The config dir (`/etc/safekit`, or `DIR/etc/safekit` under
//! `safekitd --root DIR`) holds `cluster.toml`, the cluster key file and one
//! directory per application module. `conf/README.md` is the reference of
//! every key.
//!
//! Each file goes TOML → raw serde structs (`deny_unknown_fields`, every leaf
//! [`toml::Spanned`]) → `validate()` → the runtime types below. Leaves are
//! checked as they are read (durations, addresses, names, ranges); the
//! validation adds defaults (named `DEFAULT_*` constants), the rules between
//! keys (mode consistency, `timeout > pulse`) and the checks against
//! `cluster.toml` (LANs and nodes a module names). Nothing stops at the first
//! error: every [`ConfigError`] names the file, the line, the dotted key and
//! what is allowed, and [`ConfigErrors`] holds them all. Like keepalived's
//! `-t`, `safekit config check` runs [`load`] and prints them.
//!
//! The module is pure apart from [`load`], which reads the files.

use std::{collections::BTreeMap, path::Path};

pub mod bundle;
mod checkers;
mod cluster;
mod error;
mod load;
mod module;
mod recover;
mod value;

#[cfg(test)]
mod tests;

pub use checkers::{
    CheckAction, CustomCheck, DEFAULT_ATLEAST, DEFAULT_CHECK_INTERVAL, DEFAULT_CHECK_TIMEOUT,
    DEFAULT_ERRD_ACTION, DEFAULT_ERRD_POLL_INTERVAL, DEFAULT_MODULE_STATES, DEFAULT_PRE_ACTION,
    DEFAULT_RUNNING_ACTION, DEFAULT_SPLITBRAIN_TIMEOUT, ErrdProc, IntfCheck, IpCheck,
    MAX_PROC_NAME_LEN, ModuleCheck, PingCheck, ProcClass, SplitBrain, TcpCheck, When,
};
pub use cluster::{
    Api, CLUSTER_FILE, ClusterConfig, DEFAULT_HEARTBEAT_PORT, DEFAULT_HTTP_PORT,
    DEFAULT_HTTPS_PORT, DEFAULT_KEY_FILE, DEFAULT_LAN_HEARTBEAT, DEFAULT_LAN_REPLICATION,
    DEFAULT_METRICS_ANONYMOUS, DEFAULT_REPLICATION_PORT, DEFAULT_SESSION_TTL, Lan, MAX_KEY_LEN,
    MAX_SESSION_TTL, MIN_KEY_LEN, MIN_NODES, MIN_SESSION_TTL, Node, Ports, RESERVED_NODE_NAMES,
};
pub use error::{ConfigError, ConfigErrors};
pub use load::MODULES_DIR;
pub use module::{
    AsyncMode, DEFAULT_ARP_ELAPSE, DEFAULT_ARP_INTERVAL, DEFAULT_ARP_REROUTE, DEFAULT_ASYNC,
    DEFAULT_BOOT, DEFAULT_DEFAULTPRIM, DEFAULT_DIR_MODE, DEFAULT_DURABILITY, DEFAULT_FAILOVER,
    DEFAULT_FARM_DRAIN_TIMEOUT, DEFAULT_FARM_FILTER, DEFAULT_FARM_LOST_AFTER, DEFAULT_FARM_POWER,
    DEFAULT_FARM_PULSE, DEFAULT_FORCE_STOP_TIMEOUT, DEFAULT_GARP_COUNT, DEFAULT_GARP_INTERVAL,
    DEFAULT_HEART_PULSE, DEFAULT_HEART_TIMEOUT, DEFAULT_LOOP_INTERVAL, DEFAULT_MAXLOOP,
    DEFAULT_NICE_STOP_TIMEOUT, DEFAULT_RESYNC_WORKERS, DEFAULT_RULE_FILTER, DEFAULT_RULE_PORT,
    DEFAULT_SEND_TIMEOUT, DEFAULT_SPLITBRAIN_KEEP, DEFAULT_TCP_RESET, DefaultPrim, DirMode,
    Durability, FARM_MAC_PREFIX, Farm, FarmFilterBackend, Filter, Heart, MAX_MODULES, MODULE_FILE,
    Mode, ModuleConfig, Proto, ReplicatedDir, Rfs, Rule, Service, SplitBrainKeep, User, Vip,
};
pub use value::{
    DURATION_UNITS, MAX_DURATION, format_duration, format_mac, parse_bandwidth, parse_duration,
};

/// The whole validated configuration of a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// `cluster.toml`, with the key read.
    pub cluster: ClusterConfig,
    /// `modules/<AM>/module.toml`, by module name.
    pub modules: BTreeMap<String, ModuleConfig>,
}

/// Reads and validates the config dir `etc`: `cluster.toml`, its key file,
/// and every `modules/<AM>/module.toml`. Returns every error found in every
/// file; module files are checked even when `cluster.toml` is invalid (then
/// without the checks that need it).
pub fn load(etc: &Path) -> Result<Config, ConfigErrors> {
    load::load(etc)
}

/// Parses and validates the text of `cluster.toml`. `file` names it in errors
/// and its directory resolves `key_file`; the key is not read
/// ([`ClusterConfig::key`] stays empty).
pub fn parse_cluster(file: &Path, text: &str) -> Result<ClusterConfig, ConfigErrors> {
    cluster::parse(file, text).map(|p| p.config)
}

/// Parses and validates the text of the `module.toml` of module `name`
/// against a validated cluster.
pub fn parse_module(
    file: &Path,
    name: &str,
    text: &str,
    cluster: &ClusterConfig,
) -> Result<ModuleConfig, ConfigErrors> {
    module::parse(file, name, text, Some(cluster)).0
}
