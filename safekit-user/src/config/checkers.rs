//! Checkers of a module (SPEC §7): `[[errd.proc]]` process counts and the
//! `[check]` tables — tcp, ping, intf, ip, custom, module, splitbrain.
//!
//! Each checker is active in some states (`when`, `class` for errd) and has
//! an action when it fails. Checkers active before the module starts
//! (`when = "pre"`) can only hold it in WAIT (`wait`) or log (`noaction`);
//! the others restart it locally (`restart`), stop and start it, possibly
//! failing over (`stopstart`), stop it (`stop`) or log (`noaction`).

use std::{
    net::IpAddr,
    ops::Range,
    path::{Component, PathBuf},
    time::Duration,
};

use serde::Deserialize;
use toml::Spanned;

use super::{
    module::{Ctx, Mode, quoted},
    value::{Arbiter, Dur, Host, IfName, Int, Ip, Name, NodeName, Port, Text, format_duration},
};
use crate::status::ModuleState;

/// Default `errd.poll_interval`.
pub const DEFAULT_ERRD_POLL_INTERVAL: Duration = Duration::from_secs(10);
/// Default `errd.proc.atleast`.
pub const DEFAULT_ATLEAST: u32 = 1;
/// Default `errd.proc.action`.
pub const DEFAULT_ERRD_ACTION: CheckAction = CheckAction::StopStart;
/// Default checker `interval`.
pub const DEFAULT_CHECK_INTERVAL: Duration = Duration::from_secs(10);
/// Default checker `timeout`.
pub const DEFAULT_CHECK_TIMEOUT: Duration = Duration::from_secs(5);
/// Default action of a checker active while the module runs.
pub const DEFAULT_RUNNING_ACTION: CheckAction = CheckAction::Restart;
/// Default action of a `when = "pre"` checker.
pub const DEFAULT_PRE_ACTION: CheckAction = CheckAction::Wait;
/// Default `check.splitbrain.timeout`: how long to wait for the witness.
pub const DEFAULT_SPLITBRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Default `check.module.states`: the other module is ready.
pub const DEFAULT_MODULE_STATES: [ModuleState; 3] =
    [ModuleState::Prim, ModuleState::Alone, ModuleState::Up];
/// Longest errd process name: Linux truncates `comm` to 15 bytes.
pub const MAX_PROC_NAME_LEN: usize = 15;

/// What a failing checker does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
pub enum CheckAction {
    /// Restart the application locally (`stop_*` then `start_*`), counted
    /// against `maxloop`.
    #[serde(rename = "restart")]
    Restart,
    /// Stop and start the module, which may fail over; counted against
    /// `maxloop`.
    #[serde(rename = "stopstart")]
    StopStart,
    /// Stop the module on this node (a mirror fails over).
    #[serde(rename = "stop")]
    Stop,
    /// Hold the module in WAIT until the checker passes (`when = "pre"`).
    #[serde(rename = "wait")]
    Wait,
    /// Only log.
    #[serde(rename = "noaction")]
    NoAction,
}

impl CheckAction {
    fn name(self) -> &'static str {
        match self {
            CheckAction::Restart => "restart",
            CheckAction::StopStart => "stopstart",
            CheckAction::Stop => "stop",
            CheckAction::Wait => "wait",
            CheckAction::NoAction => "noaction",
        }
    }
}

/// When a checker (or an errd process class) is active.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum When {
    /// From before `prestart` to after `poststop`: whenever the module is
    /// started on the node, whatever its state.
    Pre,
    /// On the primary (PRIM or ALONE), between `start_prim` and `stop_prim`.
    Prim,
    /// On the secondary.
    Second,
    /// On a farm node that is UP (between `start_both` and `stop_both`), or
    /// on both mirror nodes.
    Both,
}

impl When {
    fn name(self) -> &'static str {
        match self {
            When::Pre => "pre",
            When::Prim => "prim",
            When::Second => "second",
            When::Both => "both",
        }
    }
}

/// `errd.proc.class`: when the process is monitored.
pub type ProcClass = When;

/// `[[errd.proc]]`: at least `atleast` processes named `name` must run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrdProc {
    /// Process name as in `/proc/PID/comm` (at most 15 bytes).
    pub name: String,
    /// Fewest processes that must run.
    pub atleast: u32,
    /// What to do when fewer run.
    pub action: CheckAction,
    /// When the process is monitored.
    pub class: ProcClass,
}

/// `[[check.tcp]]`: a TCP connection to `host:port` must succeed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpCheck {
    /// IP address or DNS name.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// When active.
    pub when: When,
    /// On failure.
    pub action: CheckAction,
    /// Between two checks.
    pub interval: Duration,
    /// Connection timeout.
    pub timeout: Duration,
}

/// `[[check.ping]]`: `host` must answer ICMP echo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PingCheck {
    /// IP address or DNS name.
    pub host: String,
    /// When active.
    pub when: When,
    /// On failure.
    pub action: CheckAction,
    /// Between two checks.
    pub interval: Duration,
    /// Reply timeout.
    pub timeout: Duration,
}

/// `[[check.intf]]`: the interface's link must be up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IntfCheck {
    /// Interface name.
    pub interface: String,
    /// When active.
    pub when: When,
    /// On failure.
    pub action: CheckAction,
    /// Between two checks.
    pub interval: Duration,
}

/// `[[check.ip]]`: the address must be present on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpCheck {
    /// The address.
    pub addr: IpAddr,
    /// When active.
    pub when: When,
    /// On failure.
    pub action: CheckAction,
    /// Between two checks.
    pub interval: Duration,
}

/// `[[check.custom]]`: a script that sets the resource `custom.<name>` up or
/// down (`safekit set -r custom.<name> -v up|down`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CustomCheck {
    /// Checker name (resource `custom.<name>`).
    pub name: String,
    /// The script: relative to the module's `bin/`, or absolute.
    pub exec: PathBuf,
    /// Its arguments.
    pub args: Vec<String>,
    /// When active (the script runs only then).
    pub when: When,
    /// When the resource goes down.
    pub action: CheckAction,
}

/// `[[check.module]]`: another module must be in one of `states`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleCheck {
    /// The other module.
    pub name: String,
    /// On which node; `None`: this node.
    pub node: Option<String>,
    /// Accepted states.
    pub states: Vec<ModuleState>,
    /// When active.
    pub when: When,
    /// On failure.
    pub action: CheckAction,
    /// Between two checks.
    pub interval: Duration,
    /// Reply timeout.
    pub timeout: Duration,
}

/// `[check.splitbrain]`: before going ALONE without heartbeats, a mirror
/// node must reach at least one pinged witness, or hold the grant of a
/// majority of arbiters (`safekit witness`); otherwise it goes WAIT.
/// Exactly one of both lists is set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitBrain {
    /// Witness addresses (pinged).
    pub witness: Vec<IpAddr>,
    /// Arbitrating witnesses (`safekit witness`), UDP.
    pub arbiter: Vec<std::net::SocketAddr>,
    /// How long to wait for a witness reply.
    pub timeout: Duration,
}

// ---- raw ----------------------------------------------------------------

type Spans<T> = Option<Spanned<Vec<Spanned<T>>>>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawErrd {
    poll_interval: Option<Spanned<Dur>>,
    proc: Spans<RawProc>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProc {
    name: Option<Spanned<Text>>,
    atleast: Option<Spanned<Int<u32, 1, 100_000>>>,
    action: Option<Spanned<CheckAction>>,
    class: Option<Spanned<When>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCheck {
    tcp: Spans<RawTcp>,
    ping: Spans<RawPing>,
    intf: Spans<RawIntf>,
    ip: Spans<RawIp>,
    custom: Spans<RawCustom>,
    module: Spans<RawModuleCheck>,
    splitbrain: Option<Spanned<RawSplitBrain>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTcp {
    host: Option<Spanned<Host>>,
    port: Option<Spanned<Port>>,
    when: Option<Spanned<When>>,
    action: Option<Spanned<CheckAction>>,
    interval: Option<Spanned<Dur>>,
    timeout: Option<Spanned<Dur>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPing {
    host: Option<Spanned<Host>>,
    when: Option<Spanned<When>>,
    action: Option<Spanned<CheckAction>>,
    interval: Option<Spanned<Dur>>,
    timeout: Option<Spanned<Dur>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIntf {
    interface: Option<Spanned<IfName>>,
    when: Option<Spanned<When>>,
    action: Option<Spanned<CheckAction>>,
    interval: Option<Spanned<Dur>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIp {
    addr: Option<Spanned<Ip>>,
    when: Option<Spanned<When>>,
    action: Option<Spanned<CheckAction>>,
    interval: Option<Spanned<Dur>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCustom {
    name: Option<Spanned<Name>>,
    exec: Option<Spanned<Text>>,
    args: Option<Vec<Spanned<String>>>,
    when: Option<Spanned<When>>,
    action: Option<Spanned<CheckAction>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModuleCheck {
    name: Option<Spanned<Name>>,
    node: Option<Spanned<NodeName>>,
    states: Spans<Text>,
    when: Option<Spanned<When>>,
    action: Option<Spanned<CheckAction>>,
    interval: Option<Spanned<Dur>>,
    timeout: Option<Spanned<Dur>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSplitBrain {
    witness: Spans<Ip>,
    arbiter: Spans<Arbiter>,
    timeout: Option<Spanned<Dur>>,
}

// ---- validation -----------------------------------------------------------

/// Every checker of a module.
pub(super) struct Checkers {
    pub(super) errd_poll_interval: Duration,
    pub(super) errd: Vec<ErrdProc>,
    pub(super) tcp: Vec<TcpCheck>,
    pub(super) ping: Vec<PingCheck>,
    pub(super) intf: Vec<IntfCheck>,
    pub(super) ip: Vec<IpCheck>,
    pub(super) custom: Vec<CustomCheck>,
    pub(super) module: Vec<ModuleCheck>,
    pub(super) splitbrain: Option<SplitBrain>,
}

/// `when` for checkers active while the application runs: prim for a
/// mirror, both for a farm.
fn running(ctx: &Ctx<'_>) -> When {
    if ctx.is_farm() {
        When::Both
    } else {
        When::Prim
    }
}

fn spanned<T: Copy>(v: Option<&Spanned<T>>) -> (Option<T>, Option<Range<usize>>) {
    v.map_or((None, None), |v| (Some(*v.get_ref()), Some(v.span())))
}

/// Resolves `when`/`action` with their defaults and checks that they fit
/// together and the module's mode. `when_key` is `when` or `class`.
fn when_action(
    ctx: &mut Ctx<'_>,
    key: &str,
    when_key: &str,
    (when, when_span): (Option<When>, Option<Range<usize>>),
    default_when: When,
    (action, action_span): (Option<CheckAction>, Option<Range<usize>>),
    default_running_action: CheckAction,
) -> (When, CheckAction) {
    let when = when.unwrap_or(default_when);
    let action = action.unwrap_or(if when == When::Pre {
        DEFAULT_PRE_ACTION
    } else {
        default_running_action
    });
    if ctx.is_farm() && matches!(when, When::Prim | When::Second) {
        ctx.diag.error(
            when_span.as_ref(),
            format!("{key}.{when_key}"),
            format!(
                "{when_key} = {:?} does not exist in a farm module; allowed: \"both\" or \"pre\"",
                when.name()
            ),
        );
    }
    let ok = if when == When::Pre {
        matches!(action, CheckAction::Wait | CheckAction::NoAction)
    } else {
        action != CheckAction::Wait
    };
    if !ok {
        let allowed = if when == When::Pre {
            "\"wait\" or \"noaction\""
        } else {
            "\"restart\", \"stopstart\", \"stop\" or \"noaction\" (\"wait\" needs when = \"pre\")"
        };
        let (span, k) = match (&action_span, &when_span) {
            (Some(s), _) => (Some(s), "action"),
            (None, s) => (s.as_ref(), when_key),
        };
        ctx.diag.error(
            span,
            format!("{key}.{k}"),
            format!(
                "action {:?} does not fit {when_key} = {:?}; allowed: {allowed}",
                action.name(),
                when.name()
            ),
        );
    }
    (when, action)
}

/// Interval and timeout of a polled checker; the timeout cannot exceed the
/// interval.
fn interval_timeout(
    ctx: &mut Ctx<'_>,
    key: &str,
    interval: Option<&Spanned<Dur>>,
    timeout: Option<&Spanned<Dur>>,
) -> (Duration, Duration) {
    let i = interval.map_or(DEFAULT_CHECK_INTERVAL, |d| d.get_ref().0);
    let t = timeout.map_or(DEFAULT_CHECK_TIMEOUT, |d| d.get_ref().0);
    if t > i {
        let (span, k) = match (timeout, interval) {
            (Some(s), _) => (s.span(), "timeout"),
            (None, Some(s)) => (s.span(), "interval"),
            (None, None) => (0..0, "timeout"),
        };
        ctx.diag.error(
            Some(&span),
            format!("{key}.{k}"),
            format!(
                "timeout {} must not be longer than interval {}",
                format_duration(t),
                format_duration(i)
            ),
        );
    }
    (i, t)
}

/// The required `field` of table `key`, or a "missing" error.
fn required<T>(
    ctx: &mut Ctx<'_>,
    v: Option<Spanned<T>>,
    table: &Range<usize>,
    key: &str,
    allowed: &str,
) -> Option<Spanned<T>> {
    if v.is_none() {
        ctx.diag.missing(Some(table), key, allowed);
    }
    v
}

pub(super) fn validate(
    errd: Option<Spanned<RawErrd>>,
    check: Option<Spanned<RawCheck>>,
    ctx: &mut Ctx<'_>,
) -> Checkers {
    let (errd_poll_interval, errd) = validate_errd(errd, ctx);
    let mut out = Checkers {
        errd_poll_interval,
        errd,
        tcp: Vec::new(),
        ping: Vec::new(),
        intf: Vec::new(),
        ip: Vec::new(),
        custom: Vec::new(),
        module: Vec::new(),
        splitbrain: None,
    };
    let Some(check) = check else { return out };
    let check = check.into_inner();

    out.tcp = validate_tcp(check.tcp, ctx);
    out.ping = validate_ping(check.ping, ctx);
    out.intf = validate_intf(check.intf, ctx);
    out.ip = validate_ip(check.ip, ctx);
    out.custom = validate_custom(check.custom, ctx);
    for (i, c) in each(check.module) {
        if let Some(m) = validate_module_check(ctx, i, c) {
            out.module.push(m);
        }
    }

    if let Some(sb) = check.splitbrain {
        out.splitbrain = validate_splitbrain(ctx, sb);
    }
    out
}

fn validate_tcp(list: Spans<RawTcp>, ctx: &mut Ctx<'_>) -> Vec<TcpCheck> {
    let run = running(ctx);
    let mut out: Vec<TcpCheck> = Vec::new();
    for (i, c) in each(list) {
        let key = format!("check.tcp[{i}]");
        let (span, c) = (c.span(), c.into_inner());
        let host = required(
            ctx,
            c.host,
            &span,
            &format!("{key}.host"),
            "host = \"127.0.0.1\"",
        );
        let port = required(
            ctx,
            c.port,
            &span,
            &format!("{key}.port"),
            "port = 1 to 65535",
        );
        let (when, action) = when_action(
            ctx,
            &key,
            "when",
            spanned(c.when.as_ref()),
            run,
            spanned(c.action.as_ref()),
            DEFAULT_RUNNING_ACTION,
        );
        let (interval, timeout) =
            interval_timeout(ctx, &key, c.interval.as_ref(), c.timeout.as_ref());
        if let (Some(host), Some(port)) = (host, port) {
            out.push(TcpCheck {
                host: host.into_inner().0,
                port: port.get_ref().0,
                when,
                action,
                interval,
                timeout,
            });
        }
    }
    out
}

fn validate_ping(list: Spans<RawPing>, ctx: &mut Ctx<'_>) -> Vec<PingCheck> {
    let mut out: Vec<PingCheck> = Vec::new();
    for (i, c) in each(list) {
        let key = format!("check.ping[{i}]");
        let (span, c) = (c.span(), c.into_inner());
        let host = required(
            ctx,
            c.host,
            &span,
            &format!("{key}.host"),
            "host = \"10.0.0.254\"",
        );
        let (when, action) = when_action(
            ctx,
            &key,
            "when",
            spanned(c.when.as_ref()),
            When::Pre,
            spanned(c.action.as_ref()),
            DEFAULT_RUNNING_ACTION,
        );
        let (interval, timeout) =
            interval_timeout(ctx, &key, c.interval.as_ref(), c.timeout.as_ref());
        if let Some(host) = host {
            out.push(PingCheck {
                host: host.into_inner().0,
                when,
                action,
                interval,
                timeout,
            });
        }
    }
    out
}

fn validate_intf(list: Spans<RawIntf>, ctx: &mut Ctx<'_>) -> Vec<IntfCheck> {
    let mut out: Vec<IntfCheck> = Vec::new();
    for (i, c) in each(list) {
        let key = format!("check.intf[{i}]");
        let (span, c) = (c.span(), c.into_inner());
        let interface = required(
            ctx,
            c.interface,
            &span,
            &format!("{key}.interface"),
            "interface = \"eth0\"",
        );
        let (when, action) = when_action(
            ctx,
            &key,
            "when",
            spanned(c.when.as_ref()),
            When::Pre,
            spanned(c.action.as_ref()),
            DEFAULT_RUNNING_ACTION,
        );
        let interval = c
            .interval
            .as_ref()
            .map_or(DEFAULT_CHECK_INTERVAL, |d| d.get_ref().0);
        if let Some(interface) = interface {
            out.push(IntfCheck {
                interface: interface.into_inner().0,
                when,
                action,
                interval,
            });
        }
    }
    out
}

fn validate_ip(list: Spans<RawIp>, ctx: &mut Ctx<'_>) -> Vec<IpCheck> {
    let run = running(ctx);
    let mut out: Vec<IpCheck> = Vec::new();
    for (i, c) in each(list) {
        let key = format!("check.ip[{i}]");
        let (span, c) = (c.span(), c.into_inner());
        let addr = required(
            ctx,
            c.addr,
            &span,
            &format!("{key}.addr"),
            "addr = \"10.0.0.100\"",
        );
        let (when, action) = when_action(
            ctx,
            &key,
            "when",
            spanned(c.when.as_ref()),
            run,
            spanned(c.action.as_ref()),
            DEFAULT_RUNNING_ACTION,
        );
        let interval = c
            .interval
            .as_ref()
            .map_or(DEFAULT_CHECK_INTERVAL, |d| d.get_ref().0);
        if let Some(addr) = addr {
            out.push(IpCheck {
                addr: addr.get_ref().0,
                when,
                action,
                interval,
            });
        }
    }
    out
}

fn validate_custom(list: Spans<RawCustom>, ctx: &mut Ctx<'_>) -> Vec<CustomCheck> {
    let run = running(ctx);
    let mut out: Vec<CustomCheck> = Vec::new();
    for (i, c) in each(list) {
        let key = format!("check.custom[{i}]");
        let (span, c) = (c.span(), c.into_inner());
        let name = required(
            ctx,
            c.name,
            &span,
            &format!("{key}.name"),
            "name = \"appcheck\" (the resource custom.<name>)",
        );
        let (when, action) = when_action(
            ctx,
            &key,
            "when",
            spanned(c.when.as_ref()),
            run,
            spanned(c.action.as_ref()),
            DEFAULT_RUNNING_ACTION,
        );
        let Some(name) = name else { continue };
        let (name_span, name) = (name.span(), name.into_inner().0);
        if out.iter().any(|x| x.name == name) {
            ctx.diag.error(
                Some(&name_span),
                format!("{key}.name"),
                format!("duplicate custom checker name {name:?}"),
            );
            continue;
        }
        let exec = match c.exec {
            Some(e) => {
                let p = PathBuf::from(&e.get_ref().0);
                if p.components().any(|c| c == Component::ParentDir) {
                    ctx.diag.error(
                        Some(&e.span()),
                        format!("{key}.exec"),
                        "'..' is not allowed: give a path relative to the module's bin/ directory, or an absolute path",
                    );
                }
                p
            }
            None => PathBuf::from(&name),
        };
        out.push(CustomCheck {
            name,
            exec,
            args: c
                .args
                .unwrap_or_default()
                .into_iter()
                .map(Spanned::into_inner)
                .collect(),
            when,
            action,
        });
    }
    out
}

fn each<T>(list: Spans<T>) -> impl Iterator<Item = (usize, Spanned<T>)> {
    list.map(Spanned::into_inner)
        .unwrap_or_default()
        .into_iter()
        .enumerate()
}

fn validate_errd(raw: Option<Spanned<RawErrd>>, ctx: &mut Ctx<'_>) -> (Duration, Vec<ErrdProc>) {
    let Some(raw) = raw else {
        return (DEFAULT_ERRD_POLL_INTERVAL, Vec::new());
    };
    let raw = raw.into_inner();
    let poll = raw
        .poll_interval
        .as_ref()
        .map_or(DEFAULT_ERRD_POLL_INTERVAL, |d| d.get_ref().0);
    let run = running(ctx);
    let mut procs: Vec<ErrdProc> = Vec::new();
    for (i, p) in each(raw.proc) {
        let key = format!("errd.proc[{i}]");
        let (span, p) = (p.span(), p.into_inner());
        let name = required(
            ctx,
            p.name,
            &span,
            &format!("{key}.name"),
            "name = \"<process name>\" as shown by ps -o comm",
        );
        let (class, action) = when_action(
            ctx,
            &key,
            "class",
            spanned(p.class.as_ref()),
            run,
            spanned(p.action.as_ref()),
            DEFAULT_ERRD_ACTION,
        );
        let Some(name) = name else { continue };
        let (name_span, name) = (name.span(), name.into_inner().0);
        if name.len() > MAX_PROC_NAME_LEN || name.contains('/') {
            ctx.diag.error(
                Some(&name_span),
                format!("{key}.name"),
                format!(
                    "{name:?} cannot match: a process name (/proc/PID/comm, ps -o comm) has at most {MAX_PROC_NAME_LEN} bytes and no '/'; use the first {MAX_PROC_NAME_LEN} bytes of the command name"
                ),
            );
            continue;
        }
        if procs.iter().any(|x| x.name == name) {
            ctx.diag.error(
                Some(&name_span),
                format!("{key}.name"),
                format!("process {name:?} is already monitored by another [[errd.proc]]"),
            );
            continue;
        }
        procs.push(ErrdProc {
            name,
            atleast: p.atleast.map_or(DEFAULT_ATLEAST, |a| a.get_ref().0),
            action,
            class,
        });
    }
    (poll, procs)
}

fn validate_module_check(
    ctx: &mut Ctx<'_>,
    i: usize,
    c: Spanned<RawModuleCheck>,
) -> Option<ModuleCheck> {
    let key = format!("check.module[{i}]");
    let (span, c) = (c.span(), c.into_inner());
    let name = required(
        ctx,
        c.name,
        &span,
        &format!("{key}.name"),
        "name = \"<module>\", the module to watch",
    );
    let (when, action) = when_action(
        ctx,
        &key,
        "when",
        spanned(c.when.as_ref()),
        When::Pre,
        spanned(c.action.as_ref()),
        DEFAULT_RUNNING_ACTION,
    );
    let (interval, timeout) = interval_timeout(ctx, &key, c.interval.as_ref(), c.timeout.as_ref());
    let node = c.node.map(|n| {
        let (n_span, n) = (n.span(), n.into_inner().0);
        if let Some(cl) = ctx.cluster
            && cl.node(&n).is_none()
        {
            let nodes: Vec<String> = cl.nodes.iter().map(|x| x.name.clone()).collect();
            ctx.diag.error(
                Some(&n_span),
                format!("{key}.node"),
                format!(
                    "node {n:?} is not in cluster.toml; nodes: {}",
                    quoted(&nodes)
                ),
            );
        }
        n
    });
    let mut states = Vec::new();
    match c.states {
        Some(list) => {
            let list_span = list.span();
            for (j, s) in list.into_inner().into_iter().enumerate() {
                let s_span = s.span();
                let s = s.into_inner().0;
                match ModuleState::ALL
                    .into_iter()
                    .find(|st| st.name().eq_ignore_ascii_case(&s))
                {
                    Some(st) if !states.contains(&st) => states.push(st),
                    Some(_) => {}
                    None => ctx.diag.error(
                        Some(&s_span),
                        format!("{key}.states[{j}]"),
                        format!(
                            "unknown state {s:?}; allowed: \"stop\", \"wait\", \"alone\", \"prim\", \"second\", \"up\""
                        ),
                    ),
                }
            }
            if states.is_empty() && !ctx.diag.has_error_at(&format!("{key}.states")) {
                ctx.diag.error(
                    Some(&list_span),
                    format!("{key}.states"),
                    "at least one state is needed, e.g. states = [\"prim\", \"alone\"]",
                );
            }
        }
        None => states.extend(DEFAULT_MODULE_STATES),
    }
    let name = name?;
    let (name_span, name) = (name.span(), name.into_inner().0);
    if name == ctx.name && node.is_none() {
        ctx.diag.error(
            Some(&name_span),
            format!("{key}.name"),
            "a module cannot watch itself on the same node",
        );
        return None;
    }
    if node.is_none() {
        let line = ctx.line(Some(&name_span));
        ctx.extras
            .module_refs
            .push((name.clone(), line, format!("{key}.name")));
    }
    Some(ModuleCheck {
        name,
        node,
        states,
        when,
        action,
        interval,
        timeout,
    })
}

fn validate_splitbrain(ctx: &mut Ctx<'_>, sb: Spanned<RawSplitBrain>) -> Option<SplitBrain> {
    let table = sb.span();
    if ctx.mode == Some(Mode::Farm) {
        ctx.diag.error(
            Some(&table),
            "check.splitbrain",
            "[check.splitbrain] is only for mirror modules; this module has mode = \"farm\"",
        );
    }
    let sb = sb.into_inner();
    let mut witness: Vec<IpAddr> = Vec::new();
    let arbiter = match (&sb.witness, sb.arbiter) {
        (Some(_), Some(a)) => {
            ctx.diag.error(
                Some(&a.span()),
                "check.splitbrain.arbiter",
                "witness and arbiter exclude each other: witness = [IPs] pings (both nodes may go primary when both reach it), arbiter = [\"IP:port\"] asks `safekit witness` (at most one node); choose one",
            );
            Vec::new()
        }
        (_, Some(a)) => validate_arbiters(ctx, a),
        (_, None) => Vec::new(),
    };
    match sb.witness {
        None if !arbiter.is_empty() || ctx.diag.has_error_at("check.splitbrain.arbiter") => {}
        Some(list) => {
            let list_span = list.span();
            for (i, w) in list.into_inner().into_iter().enumerate() {
                let span = w.span();
                let ip = w.get_ref().0;
                let key = format!("check.splitbrain.witness[{i}]");
                if let Some(n) = ctx.cluster.and_then(|c| c.node_by_addr(ip)) {
                    ctx.diag.error(
                        Some(&span),
                        key,
                        format!(
                            "{ip} is node {:?}: a witness must be a third machine that only one side of a split can reach",
                            n.name
                        ),
                    );
                } else if witness.contains(&ip) {
                    ctx.diag
                        .error(Some(&span), key, format!("{ip} is listed twice"));
                } else {
                    witness.push(ip);
                }
            }
            if witness.is_empty() && !ctx.diag.has_error_at("check.splitbrain.witness") {
                ctx.diag.error(
                    Some(&list_span),
                    "check.splitbrain.witness",
                    "at least one witness address is needed, e.g. witness = [\"10.0.0.254\"]",
                );
            }
        }
        None => ctx.diag.missing(
            Some(&table),
            "check.splitbrain.witness",
            "witness = [\"<IP>\", ...], addresses only one side of a split can reach, or arbiter = [\"<IP>:<port>\", ...], `safekit witness` daemons",
        ),
    }
    let timeout = sb
        .timeout
        .as_ref()
        .map_or(DEFAULT_SPLITBRAIN_TIMEOUT, |d| d.get_ref().0);
    (ctx.mode != Some(Mode::Farm)).then_some(SplitBrain {
        witness,
        arbiter,
        timeout,
    })
}

/// `check.splitbrain.arbiter`: not a node, no duplicate, at least one.
fn validate_arbiters(
    ctx: &mut Ctx<'_>,
    list: Spanned<Vec<Spanned<Arbiter>>>,
) -> Vec<std::net::SocketAddr> {
    let list_span = list.span();
    let mut out: Vec<std::net::SocketAddr> = Vec::new();
    for (i, a) in list.into_inner().into_iter().enumerate() {
        let span = a.span();
        let addr = a.get_ref().0;
        let key = format!("check.splitbrain.arbiter[{i}]");
        if let Some(n) = ctx.cluster.and_then(|c| c.node_by_addr(addr.ip())) {
            ctx.diag.error(
                Some(&span),
                key,
                format!(
                    "{} is node {:?}: an arbiter runs on a third machine (`safekit witness`)",
                    addr.ip(),
                    n.name
                ),
            );
        } else if out.contains(&addr) {
            ctx.diag
                .error(Some(&span), key, format!("{addr} is listed twice"));
        } else if addr.port() == 0 {
            ctx.diag.error(
                Some(&span),
                key,
                "port 0 is not allowed: give the witness's port",
            );
        } else {
            out.push(addr);
        }
    }
    if out.is_empty() && !ctx.diag.has_error_at("check.splitbrain.arbiter") {
        ctx.diag.error(
            Some(&list_span),
            "check.splitbrain.arbiter",
            "at least one arbiter is needed, e.g. arbiter = [\"10.0.0.254:8889\"]",
        );
    }
    out
}
