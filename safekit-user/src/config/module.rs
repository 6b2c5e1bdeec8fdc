//! `modules/<AM>/module.toml`: one application module — its service, its
//! heartbeats (mirror) or membership (farm), virtual IP, replicated
//! directories, checkers and script timeouts.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    ops::Range,
    path::{Component, Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;
use toml::Spanned;

use super::{
    checkers::{self, Checkers, RawCheck, RawErrd},
    cluster::ClusterConfig,
    error::{ConfigErrors, Diag},
    recover,
    value::{AbsPath, Bandwidth, Dur, IfName, Int, Ip, Mac, Name, NodeName, Text, format_duration},
};

/// File name of a module's configuration in `modules/<AM>/`.
pub const MODULE_FILE: &str = "module.toml";
/// At most this many modules on a cluster.
pub const MAX_MODULES: usize = 32;

/// Default `service.defaultprim`.
pub const DEFAULT_DEFAULTPRIM: DefaultPrim = DefaultPrim::Alone;
/// Default `service.failover`.
pub const DEFAULT_FAILOVER: bool = true;
/// Default `service.maxloop`.
pub const DEFAULT_MAXLOOP: u32 = 3;
/// Default `service.loop_interval`.
pub const DEFAULT_LOOP_INTERVAL: Duration = Duration::from_hours(24);
/// Default `service.boot`.
pub const DEFAULT_BOOT: bool = false;
/// Default `heart.pulse` (mirror).
pub const DEFAULT_HEART_PULSE: Duration = Duration::from_millis(700);
/// Default `heart.timeout` (mirror).
pub const DEFAULT_HEART_TIMEOUT: Duration = Duration::from_secs(30);
/// Default `farm.pulse`.
pub const DEFAULT_FARM_PULSE: Duration = Duration::from_millis(100);
/// Default `farm.lost_after`, in missed pulses.
pub const DEFAULT_FARM_LOST_AFTER: u32 = 10;
/// Default `farm.power` of a node.
pub const DEFAULT_FARM_POWER: u32 = 1;
/// Default `farm.drain_timeout`: how long a graceful stop keeps serving
/// the node's established connections.
pub const DEFAULT_FARM_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Default `vip.arp_reroute`.
pub const DEFAULT_ARP_REROUTE: bool = false;
/// Default `vip.arp_interval`.
pub const DEFAULT_ARP_INTERVAL: Duration = Duration::from_secs(60);
/// Default `vip.arp_elapse`.
pub const DEFAULT_ARP_ELAPSE: Duration = Duration::from_mins(20);
/// Default `vip.garp_count`.
pub const DEFAULT_GARP_COUNT: u32 = 3;
/// Default `vip.garp_interval`.
pub const DEFAULT_GARP_INTERVAL: Duration = Duration::from_millis(100);
/// Default `vip.tcp_reset`.
pub const DEFAULT_TCP_RESET: bool = false;
/// First two bytes of a farm's default virtual MAC (then the VIP's 4 bytes).
pub const FARM_MAC_PREFIX: [u8; 2] = [0x5A, 0xFE];
/// Default `vip.rule.port`: any port.
pub const DEFAULT_RULE_PORT: u16 = 0;
/// Default `vip.rule.filter`.
pub const DEFAULT_RULE_FILTER: Filter = Filter::ClientIp;
/// Default `rfs.dir.mode`.
pub const DEFAULT_DIR_MODE: DirMode = DirMode::ReadOnly;
/// Default `rfs.async`.
pub const DEFAULT_ASYNC: AsyncMode = AsyncMode::Second;
/// Default `rfs.durability`.
pub const DEFAULT_DURABILITY: Durability = Durability::Fsync;
/// Default `rfs.resync_workers`.
pub const DEFAULT_RESYNC_WORKERS: u32 = 6;
/// Default `rfs.send_timeout`.
pub const DEFAULT_SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// Default `user.nice_stop_timeout`.
pub const DEFAULT_NICE_STOP_TIMEOUT: Duration = Duration::from_secs(300);
/// Default `user.force_stop_timeout`.
pub const DEFAULT_FORCE_STOP_TIMEOUT: Duration = Duration::from_secs(300);

/// The validated `module.toml` of one application module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleConfig {
    /// Module name (its directory name).
    pub name: String,
    /// `[service]`.
    pub service: Service,
    /// `[heart]`: heartbeats of a mirror module (defaults, unused, in a farm).
    pub heart: Heart,
    /// `[farm]`: membership of a farm module; `Some` exactly for farms.
    pub farm: Option<Farm>,
    /// `[vip]`: always `Some` for a farm.
    pub vip: Option<Vip>,
    /// `[rfs]`: replicated directories of a mirror module.
    pub rfs: Option<Rfs>,
    /// `[errd] poll_interval`.
    pub errd_poll_interval: Duration,
    /// `[[errd.proc]]`.
    pub errd: Vec<checkers::ErrdProc>,
    /// `[[check.tcp]]`.
    pub check_tcp: Vec<checkers::TcpCheck>,
    /// `[[check.ping]]`.
    pub check_ping: Vec<checkers::PingCheck>,
    /// `[[check.intf]]`.
    pub check_intf: Vec<checkers::IntfCheck>,
    /// `[[check.ip]]`.
    pub check_ip: Vec<checkers::IpCheck>,
    /// `[[check.custom]]`.
    pub check_custom: Vec<checkers::CustomCheck>,
    /// `[[check.module]]`.
    pub check_module: Vec<checkers::ModuleCheck>,
    /// `[check.splitbrain]` (mirror).
    pub splitbrain: Option<checkers::SplitBrain>,
    /// `[user]`.
    pub user: User,
}

impl ModuleConfig {
    /// Mirror or farm.
    #[must_use]
    pub fn mode(&self) -> Mode {
        self.service.mode
    }

    /// Pulse, peer-lost timeout and LANs of the module's heartbeats: `[heart]`
    /// for a mirror, `[farm]` for a farm.
    #[must_use]
    pub fn heartbeat(&self) -> (Duration, Duration, &[String]) {
        match &self.farm {
            Some(f) => (f.pulse, f.lost_timeout(), &f.lans),
            None => (self.heart.pulse, self.heart.timeout, &self.heart.lans),
        }
    }
}

/// Kind of module.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Primary/backup with replication.
    Mirror,
    /// N active nodes behind one VIP.
    Farm,
}

impl Mode {
    /// The word used in the config.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Mode::Mirror => "mirror",
            Mode::Farm => "farm",
        }
    }
}

/// `[service]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    /// Mirror or farm.
    pub mode: Mode,
    /// Nodes that run the module (default: every cluster node; a mirror runs
    /// on exactly 2).
    pub nodes: Vec<String>,
    /// Which node should be primary (mirror).
    pub defaultprim: DefaultPrim,
    /// Automatic failover; when false an operator runs `safekit prim`.
    pub failover: bool,
    /// Checker-triggered restarts allowed within `loop_interval`.
    pub maxloop: u32,
    /// Window of `maxloop`.
    pub loop_interval: Duration,
    /// Start the module when the node boots.
    pub boot: bool,
    /// After a split brain heals, which ALONE node stays primary (mirror).
    pub splitbrain_keep: SplitBrainKeep,
}

/// `service.defaultprim`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DefaultPrim {
    /// No preferred node: whoever becomes primary stays primary.
    Alone,
    /// This node is preferred: after reintegration the module swaps back to it.
    Node(String),
    /// The node that was primary last time is preferred when both start.
    LastPrim,
}

/// `service.splitbrain_keep`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SplitBrainKeep {
    /// The node that was primary before the split stays primary; the one
    /// that took over becomes SECOND.
    FormerPrim,
    /// This node stays primary.
    Node(String),
}

/// Default `service.splitbrain_keep`.
pub const DEFAULT_SPLITBRAIN_KEEP: SplitBrainKeep = SplitBrainKeep::FormerPrim;

/// `[heart]` of a mirror module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Heart {
    /// Interval between heartbeats.
    pub pulse: Duration,
    /// Peer lost after this long without heartbeats on every LAN.
    pub timeout: Duration,
    /// Heartbeat LANs (default: every heartbeat LAN of the cluster).
    pub lans: Vec<String>,
}

/// `[farm]` membership.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Farm {
    /// Interval between membership heartbeats.
    pub pulse: Duration,
    /// A node is lost after this many missed pulses.
    pub lost_after: u32,
    /// Membership LANs (default: every heartbeat LAN of the cluster).
    pub lans: Vec<String>,
    /// Weight of each module node in bucket assignment (every node present).
    pub power: BTreeMap<String, u32>,
    /// Which filter implements the buckets.
    pub filter: FarmFilterBackend,
    /// A graceful stop serves the node's established connections until
    /// they close or this long has passed, then runs `stop_both` (0: no
    /// drain).
    pub drain_timeout: Duration,
}

/// `farm.filter`: the data plane of the farm filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FarmFilterBackend {
    /// The XDP program (fails if it cannot attach).
    Xdp,
    /// nftables rules (netdev ingress) with a user-space ARP responder.
    Nftables,
    /// XDP, falling back to nftables where XDP cannot attach.
    Auto,
}

/// Default `farm.filter`.
pub const DEFAULT_FARM_FILTER: FarmFilterBackend = FarmFilterBackend::Auto;

impl Farm {
    /// `pulse * lost_after`.
    #[must_use]
    pub fn lost_timeout(&self) -> Duration {
        self.pulse.saturating_mul(self.lost_after)
    }
}

/// `[vip]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vip {
    /// Virtual addresses (at least one).
    pub addrs: Vec<IpAddr>,
    /// Interface to put them on; `None`: the interface whose subnet holds them.
    pub interface: Option<String>,
    /// Keep announcing the VIP by gratuitous ARP after a takeover.
    pub arp_reroute: bool,
    /// Interval of those announcements.
    pub arp_interval: Duration,
    /// For how long after a takeover they go on.
    pub arp_elapse: Duration,
    /// Gratuitous ARPs sent right after the VIP is added.
    pub garp_count: u32,
    /// Interval between those.
    pub garp_interval: Duration,
    /// Reset TCP connections to the VIP when it moves.
    pub tcp_reset: bool,
    /// Farm: virtual MAC the VIP answers ARP with (default `5A:FE` + the
    /// first VIP's 4 bytes). `None` for a mirror.
    pub mac: Option<[u8; 6]>,
    /// Farm: load-balancing rules (at least one). Empty for a mirror.
    pub rules: Vec<Rule>,
}

/// `[[vip.rule]]`: which traffic the farm filter shares, and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Rule {
    /// Transport protocol.
    pub proto: Proto,
    /// Destination port; 0 = any port.
    pub port: u16,
    /// What is hashed to choose the node.
    pub filter: Filter,
}

/// `vip.rule.proto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Proto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

/// `vip.rule.filter`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Filter {
    /// Hash the client IP: a client always reaches the same node.
    ClientIp,
    /// Hash the client IP and port: a client's connections spread.
    ClientIpPort,
}

/// `[rfs]`: replication of a mirror module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rfs {
    /// Replicated directories (at least one).
    pub dirs: Vec<ReplicatedDir>,
    /// Patterns, relative to each replicated directory, not replicated.
    pub exclude: Vec<String>,
    /// When the secondary acknowledges.
    pub async_mode: AsyncMode,
    /// Which of the application's operations wait for the secondary.
    pub durability: Durability,
    /// Parallel file copies during resynchronisation.
    pub resync_workers: u32,
    /// Resynchronisation bandwidth cap, bytes per second (`None`: no cap).
    pub resync_bandwidth: Option<u64>,
    /// A write not acknowledged by the secondary within this makes the
    /// primary go ALONE.
    pub send_timeout: Duration,
}

/// `[[rfs.dir]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicatedDir {
    /// Absolute path as the application sees it (mapped under `--root`).
    pub path: PathBuf,
    /// Access on the secondary.
    pub mode: DirMode,
}

/// `rfs.dir.mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DirMode {
    /// Read-only on the secondary.
    ReadOnly,
    /// Writable on the secondary (changes made there are not replicated and
    /// are overwritten by resynchronisation).
    ReadWrite,
}

/// `rfs.async`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AsyncMode {
    /// The secondary acknowledges on receipt, writes after.
    Second,
    /// The secondary writes, then acknowledges.
    None,
}

/// `rfs.durability`: which operations the application waits for the
/// secondary on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Durability {
    /// What POSIX makes durable (fsync/fdatasync of a file or directory,
    /// `O_SYNC`/`O_DSYNC` writes, `msync`) waits for the secondary; every
    /// other change streams to it in order, the application not waiting
    /// (FUSE write-back caching for data).
    Fsync,
    /// Every write and metadata change waits for the secondary (no
    /// write-back caching), for applications that never fsync.
    EveryWrite,
}

/// `[user]`: script timeouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct User {
    /// How long `stop_prim`/`stop_both` may take.
    pub nice_stop_timeout: Duration,
    /// How long the forced stop may take.
    pub force_stop_timeout: Duration,
}

impl Default for User {
    fn default() -> Self {
        Self {
            nice_stop_timeout: DEFAULT_NICE_STOP_TIMEOUT,
            force_stop_timeout: DEFAULT_FORCE_STOP_TIMEOUT,
        }
    }
}

// ---- raw ----------------------------------------------------------------

type Spans<T> = Option<Spanned<Vec<Spanned<T>>>>;
type RawPower = BTreeMap<Spanned<String>, Spanned<Int<u32, 1, 1000>>>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModule {
    service: Option<Spanned<RawService>>,
    heart: Option<Spanned<RawHeart>>,
    farm: Option<Spanned<RawFarm>>,
    vip: Option<Spanned<RawVip>>,
    rfs: Option<Spanned<RawRfs>>,
    errd: Option<Spanned<RawErrd>>,
    check: Option<Spanned<RawCheck>>,
    user: Option<Spanned<RawUser>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    mode: Option<Spanned<Mode>>,
    nodes: Spans<NodeName>,
    defaultprim: Option<Spanned<NodeName>>,
    failover: Option<Spanned<bool>>,
    maxloop: Option<Spanned<Int<u32, 0, 1000>>>,
    loop_interval: Option<Spanned<Dur>>,
    boot: Option<Spanned<bool>>,
    splitbrain_keep: Option<Spanned<NodeName>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHeart {
    pulse: Option<Spanned<Dur>>,
    timeout: Option<Spanned<Dur>>,
    lans: Spans<Name>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFarm {
    pulse: Option<Spanned<Dur>>,
    lost_after: Option<Spanned<Int<u32, 2, 1000>>>,
    lans: Spans<Name>,
    power: Option<Spanned<RawPower>>,
    filter: Option<Spanned<FarmFilterBackend>>,
    drain_timeout: Option<Spanned<Dur>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVip {
    addrs: Spans<Ip>,
    interface: Option<Spanned<IfName>>,
    arp_reroute: Option<Spanned<bool>>,
    arp_interval: Option<Spanned<Dur>>,
    arp_elapse: Option<Spanned<Dur>>,
    garp_count: Option<Spanned<Int<u32, 1, 100>>>,
    garp_interval: Option<Spanned<Dur>>,
    tcp_reset: Option<Spanned<bool>>,
    mac: Option<Spanned<Mac>>,
    rule: Spans<RawRule>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    proto: Option<Spanned<Proto>>,
    port: Option<Spanned<Int<u16, 0, 65535>>>,
    filter: Option<Spanned<Filter>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRfs {
    dir: Spans<RawDir>,
    exclude: Spans<Text>,
    #[serde(rename = "async")]
    async_mode: Option<Spanned<AsyncMode>>,
    durability: Option<Spanned<Durability>>,
    resync_workers: Option<Spanned<Int<u32, 1, 64>>>,
    resync_bandwidth: Option<Spanned<Bandwidth>>,
    send_timeout: Option<Spanned<Dur>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDir {
    path: Option<Spanned<AbsPath>>,
    mode: Option<Spanned<DirMode>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUser {
    nice_stop_timeout: Option<Spanned<Dur>>,
    force_stop_timeout: Option<Spanned<Dur>>,
}

// ---- validation -----------------------------------------------------------

/// What a module says that [`super::load`] checks against the other modules.
#[derive(Debug, Default)]
pub(super) struct Extras {
    /// Each VIP with (line, key).
    pub(super) vips: Vec<(IpAddr, Option<usize>, String)>,
    /// The farm MAC with (line, key).
    pub(super) mac: Option<([u8; 6], Option<usize>, String)>,
    /// Local modules named by `[[check.module]]`: (module, line, key).
    pub(super) module_refs: Vec<(String, Option<usize>, String)>,
}

/// Shared state of one module's validation.
pub(super) struct Ctx<'a> {
    pub(super) diag: Diag,
    /// `None` when cluster.toml itself is invalid: cross-file checks are off.
    pub(super) cluster: Option<&'a ClusterConfig>,
    /// `None` when `service.mode` is missing or bad: mode checks are off.
    pub(super) mode: Option<Mode>,
    pub(super) name: String,
    pub(super) nodes: Vec<String>,
    pub(super) extras: Extras,
}

impl Ctx<'_> {
    pub(super) fn is_farm(&self) -> bool {
        self.mode == Some(Mode::Farm)
    }

    pub(super) fn is_mirror(&self) -> bool {
        self.mode == Some(Mode::Mirror)
    }

    pub(super) fn line(&self, span: Option<&Range<usize>>) -> Option<usize> {
        span.and_then(|s| self.diag.span_line(s))
    }

    /// Errors if a mirror-only (or farm-only) table is used in the other mode.
    fn only_in(&mut self, wanted: Mode, span: &Range<usize>, key: &str, what: &str) {
        if self.mode.is_some_and(|m| m != wanted) {
            self.diag.error(
                Some(span),
                key,
                format!(
                    "{what} is only for {} modules; this module has mode = {:?}",
                    wanted.name(),
                    self.mode.map_or("", Mode::name)
                ),
            );
        }
    }

    /// Checks a list of heartbeat LANs against cluster.toml; the default is
    /// every heartbeat LAN.
    fn lans(&mut self, raw: Spans<Name>, key: &str, table: Option<&Range<usize>>) -> Vec<String> {
        let defined = self
            .cluster
            .map(|c| {
                c.heartbeat_lans()
                    .map(|l| format!("{:?}", l.name))
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default();
        let Some(raw) = raw else {
            return self.cluster.map_or_else(Vec::new, |c| {
                c.heartbeat_lans().map(|l| l.name.clone()).collect()
            });
        };
        let list_span = raw.span();
        let mut out: Vec<String> = Vec::new();
        for (i, lan) in raw.into_inner().into_iter().enumerate() {
            let span = lan.span();
            let lan = lan.into_inner().0;
            let k = format!("{key}[{i}]");
            if let Some(c) = self.cluster {
                match c.lan(&lan) {
                    None => {
                        self.diag.error(
                            Some(&span),
                            k,
                            format!(
                                "LAN {lan:?} is not defined in cluster.toml; heartbeat LANs: {defined}"
                            ),
                        );
                        continue;
                    }
                    Some(l) if !l.heartbeat => {
                        self.diag.error(
                            Some(&span),
                            k,
                            format!(
                                "LAN {lan:?} has heartbeat = false in cluster.toml; heartbeat LANs: {defined}"
                            ),
                        );
                        continue;
                    }
                    Some(_) => {}
                }
            }
            if out.contains(&lan) {
                self.diag
                    .error(Some(&span), k, format!("LAN {lan:?} is listed twice"));
                continue;
            }
            out.push(lan);
        }
        if out.is_empty() && !self.diag.has_error_at(key) {
            self.diag.error(
                Some(&list_span).or(table),
                key,
                format!("at least one heartbeat LAN is needed; heartbeat LANs: {defined}"),
            );
        }
        out
    }
}

/// Parses and validates one module; `cluster` is `None` when cluster.toml is
/// itself invalid (then the checks against it are skipped).
pub(super) fn parse(
    file: &Path,
    name: &str,
    text: &str,
    cluster: Option<&ClusterConfig>,
) -> (Result<ModuleConfig, ConfigErrors>, Extras) {
    let mut ctx = Ctx {
        diag: Diag::new(file, text),
        cluster,
        mode: None,
        name: name.to_owned(),
        nodes: Vec::new(),
        extras: Extras::default(),
    };
    if let Err(e) = super::value::check_name(name, super::value::MAX_NAME_LEN) {
        ctx.diag
            .error(None, "", format!("bad module directory name: {e}"));
    }
    let raw: Option<RawModule> = recover::deserialize(text, &mut ctx.diag);
    let module = raw.map(|raw| validate(raw, &mut ctx));
    let Ctx { diag, extras, .. } = ctx;
    match module {
        Some(m) if diag.is_ok() => (Ok(m), extras),
        _ => (Err(ConfigErrors(diag.into_errors())), extras),
    }
}

fn validate(raw: RawModule, ctx: &mut Ctx<'_>) -> ModuleConfig {
    let service = validate_service(raw.service, ctx);
    let heart = validate_heart(raw.heart, ctx);
    let farm = validate_farm(raw.farm, ctx);
    let vip = validate_vip(raw.vip, ctx);
    let rfs = validate_rfs(raw.rfs, ctx);
    let checkers = checkers::validate(raw.errd, raw.check, ctx);
    let user = validate_user(raw.user, ctx);
    let Checkers {
        errd_poll_interval,
        errd,
        tcp,
        ping,
        intf,
        ip,
        custom,
        module,
        splitbrain,
    } = checkers;
    ModuleConfig {
        name: ctx.name.clone(),
        service,
        heart,
        farm,
        vip,
        rfs,
        errd_poll_interval,
        errd,
        check_tcp: tcp,
        check_ping: ping,
        check_intf: intf,
        check_ip: ip,
        check_custom: custom,
        check_module: module,
        splitbrain,
        user,
    }
}

fn dur(raw: Option<Spanned<Dur>>, default: Duration) -> (Duration, Option<Range<usize>>) {
    raw.map_or((default, None), |d| (d.get_ref().0, Some(d.span())))
}

fn flag(raw: Option<Spanned<bool>>, default: bool) -> bool {
    raw.map_or(default, Spanned::into_inner)
}

fn validate_service(raw: Option<Spanned<RawService>>, ctx: &mut Ctx<'_>) -> Service {
    let Some(raw) = raw else {
        if !ctx.diag.has_error_at("service") {
            ctx.diag.error(
                None,
                "service",
                "missing [service] table: add [service] with mode = \"mirror\" or \"farm\"",
            );
        }
        return Service {
            mode: Mode::Mirror,
            nodes: Vec::new(),
            defaultprim: DEFAULT_DEFAULTPRIM,
            failover: DEFAULT_FAILOVER,
            maxloop: DEFAULT_MAXLOOP,
            loop_interval: DEFAULT_LOOP_INTERVAL,
            boot: DEFAULT_BOOT,
            splitbrain_keep: DEFAULT_SPLITBRAIN_KEEP,
        };
    };
    let table = raw.span();
    let raw = raw.into_inner();
    ctx.mode = raw.mode.as_ref().map(|m| *m.get_ref());
    if ctx.mode.is_none() {
        ctx.diag.missing(
            Some(&table),
            "service.mode",
            "mode = \"mirror\" (primary/backup) or \"farm\" (load balancing)",
        );
    }

    let nodes = service_nodes(raw.nodes, &table, ctx);
    ctx.nodes.clone_from(&nodes);

    let defaultprim = match raw.defaultprim {
        None => DEFAULT_DEFAULTPRIM,
        Some(d) => match keyword_or_node(d, "service.defaultprim", &["alone", "lastprim"], ctx) {
            Ok("lastprim") => DefaultPrim::LastPrim,
            Ok(_) => DefaultPrim::Alone,
            Err(node) => DefaultPrim::Node(node),
        },
    };
    let splitbrain_keep = match raw.splitbrain_keep {
        None => DEFAULT_SPLITBRAIN_KEEP,
        Some(k) => match keyword_or_node(k, "service.splitbrain_keep", &["former_prim"], ctx) {
            Ok(_) => SplitBrainKeep::FormerPrim,
            Err(node) => SplitBrainKeep::Node(node),
        },
    };

    Service {
        mode: ctx.mode.unwrap_or(Mode::Mirror),
        nodes,
        defaultprim,
        failover: flag(raw.failover, DEFAULT_FAILOVER),
        maxloop: raw.maxloop.map_or(DEFAULT_MAXLOOP, |m| m.get_ref().0),
        loop_interval: dur(raw.loop_interval, DEFAULT_LOOP_INTERVAL).0,
        boot: flag(raw.boot, DEFAULT_BOOT),
        splitbrain_keep,
    }
}

/// `service.nodes`: listed nodes of cluster.toml, or all of them; a mirror
/// runs on exactly 2, a farm on at least 2.
fn service_nodes(raw: Spans<NodeName>, table: &Range<usize>, ctx: &mut Ctx<'_>) -> Vec<String> {
    let all: Vec<String> = ctx
        .cluster
        .map(|c| c.nodes.iter().map(|n| n.name.clone()).collect())
        .unwrap_or_default();
    let known = quoted(&all);
    let (nodes, nodes_span) = match raw {
        Some(list) => {
            let span = list.span();
            let mut nodes: Vec<String> = Vec::new();
            for (i, n) in list.into_inner().into_iter().enumerate() {
                let n_span = n.span();
                let n = n.into_inner().0;
                let key = format!("service.nodes[{i}]");
                if ctx.cluster.is_some() && !all.contains(&n) {
                    ctx.diag.error(
                        Some(&n_span),
                        key,
                        format!("node {n:?} is not in cluster.toml; nodes: {known}"),
                    );
                } else if nodes.contains(&n) {
                    ctx.diag
                        .error(Some(&n_span), key, format!("node {n:?} is listed twice"));
                } else {
                    nodes.push(n);
                }
            }
            (nodes, Some(span))
        }
        None => (all, None),
    };
    if !ctx.diag.has_error_at("service.nodes") && ctx.cluster.is_some() {
        let at = nodes_span.as_ref().or(Some(table));
        match ctx.mode {
            Some(Mode::Mirror) if nodes.len() != 2 => ctx.diag.error(
                at,
                "service.nodes",
                format!(
                    "a mirror module runs on exactly 2 nodes, here {}: list them, e.g. nodes = [\"node1\", \"node2\"] (cluster nodes: {known})",
                    nodes.len()
                ),
            ),
            Some(Mode::Farm) if nodes.len() < 2 => ctx.diag.error(
                at,
                "service.nodes",
                format!(
                    "a farm module runs on at least 2 nodes, here {} (cluster nodes: {known})",
                    nodes.len()
                ),
            ),
            _ => {}
        }
    }
    nodes
}

/// A mirror-only value that is one of `keywords` (`Ok`) or a node of the
/// module (`Err(node)`).
fn keyword_or_node(
    raw: Spanned<NodeName>,
    key: &str,
    keywords: &[&'static str],
    ctx: &mut Ctx<'_>,
) -> Result<&'static str, String> {
    let span = raw.span();
    let value = raw.into_inner().0;
    let what = key.rsplit('.').next().unwrap_or(key);
    ctx.only_in(Mode::Mirror, &span, key, what);
    if let Some(k) = keywords.iter().find(|k| **k == value) {
        return Ok(k);
    }
    if ctx.cluster.is_some() && !ctx.nodes.contains(&value) {
        let allowed: Vec<String> = keywords.iter().map(|k| format!("{k:?}")).collect();
        ctx.diag.error(
            Some(&span),
            key,
            format!(
                "{value:?} is not a node of this module; allowed: {} or one of {}",
                allowed.join(", "),
                quoted(&ctx.nodes)
            ),
        );
    }
    Err(value)
}

pub(super) fn quoted(names: &[String]) -> String {
    names
        .iter()
        .map(|n| format!("{n:?}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Errors unless `timeout > pulse`, at whichever of the two was written.
fn check_timeout_over_pulse(
    ctx: &mut Ctx<'_>,
    (pulse, pulse_span): (Duration, Option<Range<usize>>),
    (timeout, timeout_span): (Duration, Option<Range<usize>>),
    section: &str,
    pulse_key: &str,
    timeout_key: &str,
) {
    if timeout > pulse {
        return;
    }
    let (span, key) = match (&timeout_span, &pulse_span) {
        (Some(s), _) => (Some(s), timeout_key),
        (None, s) => (s.as_ref(), pulse_key),
    };
    ctx.diag.error(
        span,
        format!("{section}.{key}"),
        format!(
            "{timeout_key} {} must be greater than {pulse_key} {}",
            format_duration(timeout),
            format_duration(pulse)
        ),
    );
}

fn validate_heart(raw: Option<Spanned<RawHeart>>, ctx: &mut Ctx<'_>) -> Heart {
    let (table, raw) = match raw {
        Some(r) => {
            let span = r.span();
            ctx.only_in(Mode::Mirror, &span, "heart", "[heart]");
            (Some(span), Some(r.into_inner()))
        }
        None => (None, None),
    };
    let (raw_pulse, raw_timeout, raw_lans) = match raw {
        Some(r) => (r.pulse, r.timeout, r.lans),
        None => (None, None, None),
    };
    let pulse = dur(raw_pulse, DEFAULT_HEART_PULSE);
    let timeout = dur(raw_timeout, DEFAULT_HEART_TIMEOUT);
    if !ctx.is_farm() {
        check_timeout_over_pulse(
            ctx,
            pulse.clone(),
            timeout.clone(),
            "heart",
            "pulse",
            "timeout",
        );
    }
    let lans = if ctx.is_farm() {
        Vec::new()
    } else {
        ctx.lans(raw_lans, "heart.lans", table.as_ref())
    };
    Heart {
        pulse: pulse.0,
        timeout: timeout.0,
        lans,
    }
}

fn validate_farm(raw: Option<Spanned<RawFarm>>, ctx: &mut Ctx<'_>) -> Option<Farm> {
    let table = raw.as_ref().map(Spanned::span);
    if let Some(span) = &table {
        ctx.only_in(Mode::Farm, span, "farm", "[farm]");
    }
    if !ctx.is_farm() {
        return None;
    }
    let raw = raw.map(Spanned::into_inner);
    let (raw_pulse, raw_lost, raw_lans, raw_power, raw_filter, raw_drain) = match raw {
        Some(r) => (
            r.pulse,
            r.lost_after,
            r.lans,
            r.power,
            r.filter,
            r.drain_timeout,
        ),
        None => (None, None, None, None, None, None),
    };
    let drain_timeout = dur(raw_drain, DEFAULT_FARM_DRAIN_TIMEOUT).0;
    let filter = raw_filter.map_or(DEFAULT_FARM_FILTER, Spanned::into_inner);
    let pulse = dur(raw_pulse, DEFAULT_FARM_PULSE).0;
    let lost_after = raw_lost.map_or(DEFAULT_FARM_LOST_AFTER, |l| l.get_ref().0);
    let lans = ctx.lans(raw_lans, "farm.lans", table.as_ref());
    let mut power: BTreeMap<String, u32> = ctx
        .nodes
        .iter()
        .map(|n| (n.clone(), DEFAULT_FARM_POWER))
        .collect();
    if let Some(raw_power) = raw_power {
        for (node, weight) in raw_power.into_inner() {
            let span = node.span();
            let node = node.into_inner();
            let key = format!("farm.power.{node}");
            if ctx.cluster.is_some() && !power.contains_key(&node) {
                ctx.diag.error(
                    Some(&span),
                    key,
                    format!(
                        "{node:?} is not a node of this module; nodes: {}",
                        quoted(&ctx.nodes)
                    ),
                );
                continue;
            }
            power.insert(node, weight.get_ref().0);
        }
    }
    Some(Farm {
        pulse,
        lost_after,
        lans,
        power,
        filter,
        drain_timeout,
    })
}

fn validate_vip(raw: Option<Spanned<RawVip>>, ctx: &mut Ctx<'_>) -> Option<Vip> {
    let Some(raw) = raw else {
        if ctx.is_farm() && !ctx.diag.has_error_at("vip") {
            ctx.diag.error(
                None,
                "vip",
                "a farm module needs [vip] with addrs and at least one [[vip.rule]]",
            );
        }
        return None;
    };
    let table = raw.span();
    let raw = raw.into_inner();

    let addrs = vip_addrs(raw.addrs, &table, ctx);

    let arp_interval = dur(raw.arp_interval, DEFAULT_ARP_INTERVAL);
    let arp_elapse = dur(raw.arp_elapse, DEFAULT_ARP_ELAPSE);
    if arp_interval.0 > arp_elapse.0 {
        let (span, key) = match (&arp_interval.1, &arp_elapse.1) {
            (_, Some(s)) => (Some(s), "vip.arp_elapse"),
            (s, None) => (s.as_ref(), "vip.arp_interval"),
        };
        ctx.diag.error(
            span,
            key,
            format!(
                "arp_interval {} must not be longer than arp_elapse {}",
                format_duration(arp_interval.0),
                format_duration(arp_elapse.0)
            ),
        );
    }

    // Farm: virtual MAC.
    let mac = match raw.mac {
        Some(m) => {
            let span = m.span();
            ctx.only_in(Mode::Farm, &span, "vip.mac", "mac");
            let line = ctx.line(Some(&span));
            ctx.extras.mac = Some((m.get_ref().0, line, "vip.mac".to_owned()));
            Some(m.into_inner().0)
        }
        // 5A:FE + the first IPv4 VIP, else + the last four bytes of the
        // first IPv6 VIP.
        None if ctx.is_farm() => addrs
            .iter()
            .find_map(|a| match a {
                IpAddr::V4(v4) => Some(v4.octets()),
                IpAddr::V6(_) => None,
            })
            .or_else(|| {
                addrs.iter().find_map(|a| match a {
                    IpAddr::V6(v6) => {
                        let o = v6.octets();
                        Some([o[12], o[13], o[14], o[15]])
                    }
                    IpAddr::V4(_) => None,
                })
            })
            .map(|[a, b, c, d]| {
                let [p0, p1] = FARM_MAC_PREFIX;
                let mac = [p0, p1, a, b, c, d];
                ctx.extras.mac = Some((mac, ctx.line(Some(&table)), "vip.mac".to_owned()));
                mac
            }),
        None => None,
    };
    let mac = if ctx.is_farm() { mac } else { None };

    let rules = vip_rules(raw.rule, &table, ctx);

    Some(Vip {
        addrs,
        interface: raw.interface.map(|i| i.into_inner().0),
        arp_reroute: flag(raw.arp_reroute, DEFAULT_ARP_REROUTE),
        arp_interval: arp_interval.0,
        arp_elapse: arp_elapse.0,
        garp_count: raw.garp_count.map_or(DEFAULT_GARP_COUNT, |g| g.get_ref().0),
        garp_interval: dur(raw.garp_interval, DEFAULT_GARP_INTERVAL).0,
        tcp_reset: flag(raw.tcp_reset, DEFAULT_TCP_RESET),
        mac,
        rules,
    })
}

/// `vip.addrs`: free unicast addresses, IPv4 or IPv6.
fn vip_addrs(raw: Spans<Ip>, table: &Range<usize>, ctx: &mut Ctx<'_>) -> Vec<IpAddr> {
    let mut addrs: Vec<IpAddr> = Vec::new();
    match raw {
        Some(list) => {
            let list_span = list.span();
            for (i, a) in list.into_inner().into_iter().enumerate() {
                let span = a.span();
                let ip = a.into_inner().0;
                let key = format!("vip.addrs[{i}]");
                let problem = if ip.is_unspecified()
                    || ip.is_multicast()
                    || ip.is_loopback()
                    || matches!(ip, IpAddr::V4(v4) if v4.is_broadcast())
                {
                    Some(format!(
                        "{ip} cannot be a virtual IP: use a unicast address of the LAN"
                    ))
                } else if addrs.contains(&ip) {
                    Some(format!("{ip} is listed twice"))
                } else {
                    ctx.cluster.and_then(|c| c.node_by_addr(ip)).map(|n| {
                        format!(
                            "{ip} is node {:?}'s own address in cluster.toml: a VIP must be a free address",
                            n.name
                        )
                    })
                };
                if let Some(message) = problem {
                    ctx.diag.error(Some(&span), key, message);
                    continue;
                }
                let line = ctx.line(Some(&span));
                ctx.extras.vips.push((ip, line, key));
                addrs.push(ip);
            }
            if addrs.is_empty() && !ctx.diag.has_error_at("vip.addrs") {
                ctx.diag.error(
                    Some(&list_span),
                    "vip.addrs",
                    "at least one address is needed, e.g. addrs = [\"10.0.0.100\"]",
                );
            }
        }
        None => ctx.diag.missing(
            Some(table),
            "vip.addrs",
            "the virtual IP address(es), e.g. addrs = [\"10.0.0.100\"]",
        ),
    }

    addrs
}

/// `[[vip.rule]]` of a farm: at least one, one per protocol and port.
fn vip_rules(raw: Spans<RawRule>, table: &Range<usize>, ctx: &mut Ctx<'_>) -> Vec<Rule> {
    let mut rules: Vec<Rule> = Vec::new();
    match raw {
        Some(list) => {
            let list_span = list.span();
            ctx.only_in(Mode::Farm, &list_span, "vip.rule", "[[vip.rule]]");
            for (i, r) in list.into_inner().into_iter().enumerate() {
                let r_span = r.span();
                let r = r.into_inner();
                let key = format!("vip.rule[{i}]");
                let Some(proto) = r.proto else {
                    ctx.diag.missing(
                        Some(&r_span),
                        &format!("{key}.proto"),
                        "proto = \"tcp\" or \"udp\"",
                    );
                    continue;
                };
                let port = r.port.as_ref().map_or(DEFAULT_RULE_PORT, |p| p.get_ref().0);
                let rule = Rule {
                    proto: *proto.get_ref(),
                    port,
                    filter: r.filter.map_or(DEFAULT_RULE_FILTER, Spanned::into_inner),
                };
                if rules
                    .iter()
                    .any(|x| x.proto == rule.proto && x.port == rule.port)
                {
                    ctx.diag.error(
                        r.port.as_ref().map(Spanned::span).as_ref().or(Some(&r_span)),
                        format!("{key}.port"),
                        format!(
                            "another rule already covers {:?} port {port}: one rule per protocol and port",
                            rule.proto
                        ),
                    );
                    continue;
                }
                rules.push(rule);
            }
        }
        None => {
            if ctx.is_farm() {
                ctx.diag.error(
                    Some(table),
                    "vip.rule",
                    "a farm module needs at least one [[vip.rule]], e.g. proto = \"tcp\", port = 80, filter = \"client_ip\"",
                );
            }
        }
    }
    if !ctx.is_farm() {
        rules.clear();
    }
    rules
}

fn validate_rfs(raw: Option<Spanned<RawRfs>>, ctx: &mut Ctx<'_>) -> Option<Rfs> {
    let raw = raw?;
    let table = raw.span();
    ctx.only_in(Mode::Mirror, &table, "rfs", "[rfs]");
    if ctx.is_farm() {
        return None;
    }
    if let Some(c) = ctx.cluster
        && ctx.is_mirror()
        && c.replication_lan().is_none()
    {
        ctx.diag.error(
            Some(&table),
            "rfs",
            "replication needs a LAN with replication = true in cluster.toml",
        );
    }
    let raw = raw.into_inner();

    let mut dirs: Vec<ReplicatedDir> = Vec::new();
    let raw_dirs = raw.dir.map(Spanned::into_inner).unwrap_or_default();
    for (i, d) in raw_dirs.into_iter().enumerate() {
        let d_span = d.span();
        let d = d.into_inner();
        let key = format!("rfs.dir[{i}].path");
        let Some(path) = d.path else {
            ctx.diag.missing(
                Some(&d_span),
                &key,
                "the replicated directory, an absolute path such as path = \"/srv/data\"",
            );
            continue;
        };
        let p_span = path.span();
        let path = path.into_inner().0;
        if let Some(other) = dirs
            .iter()
            .find(|x| x.path.starts_with(&path) || path.starts_with(&x.path))
        {
            let why = if other.path == path {
                "is listed twice".to_owned()
            } else {
                format!(
                    "overlaps {}: replicated directories cannot be nested",
                    other.path.display()
                )
            };
            ctx.diag
                .error(Some(&p_span), key, format!("{} {why}", path.display()));
            continue;
        }
        dirs.push(ReplicatedDir {
            path,
            mode: d.mode.map_or(DEFAULT_DIR_MODE, Spanned::into_inner),
        });
    }
    if dirs.is_empty() && !ctx.diag.has_error_at("rfs.dir") {
        ctx.diag.error(
            Some(&table),
            "rfs.dir",
            "[rfs] needs at least one [[rfs.dir]] with path = \"/absolute/dir\"",
        );
    }

    let mut exclude = Vec::new();
    if let Some(list) = raw.exclude {
        for (i, pat) in list.into_inner().into_iter().enumerate() {
            let span = pat.span();
            let pat = pat.into_inner().0;
            let p = Path::new(&pat);
            if p.is_absolute() || p.components().any(|c| c == Component::ParentDir) {
                ctx.diag.error(
                    Some(&span),
                    format!("rfs.exclude[{i}]"),
                    format!(
                        "pattern {pat:?} must be relative to the replicated directory, without '..', e.g. \"*.tmp\" or \"cache/**\""
                    ),
                );
                continue;
            }
            exclude.push(pat);
        }
    }

    Some(Rfs {
        dirs,
        exclude,
        async_mode: raw.async_mode.map_or(DEFAULT_ASYNC, Spanned::into_inner),
        durability: raw
            .durability
            .map_or(DEFAULT_DURABILITY, Spanned::into_inner),
        resync_workers: raw
            .resync_workers
            .map_or(DEFAULT_RESYNC_WORKERS, |w| w.get_ref().0),
        resync_bandwidth: raw.resync_bandwidth.map(|b| b.get_ref().0),
        send_timeout: dur(raw.send_timeout, DEFAULT_SEND_TIMEOUT).0,
    })
}

fn validate_user(raw: Option<Spanned<RawUser>>, _ctx: &mut Ctx<'_>) -> User {
    let Some(raw) = raw else {
        return User::default();
    };
    let raw = raw.into_inner();
    User {
        nice_stop_timeout: dur(raw.nice_stop_timeout, DEFAULT_NICE_STOP_TIMEOUT).0,
        force_stop_timeout: dur(raw.force_stop_timeout, DEFAULT_FORCE_STOP_TIMEOUT).0,
    }
}
