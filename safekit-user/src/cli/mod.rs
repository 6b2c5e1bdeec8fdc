//! The `safekit` command line (clap derive), one file per group of
//! subcommands. Each command talks to the node's daemon over the control
//! socket found from `--root` / `SAFEKIT_ROOT`.
//!
//! Exit codes: 0 success; 1 failure (refused, daemon unreachable, ...);
//! `state -m AM -lq` exits with the module's state instead (STOP 0, WAIT 1,
//! ALONE/UP 2, PRIM 3, SECOND 4, see [`ModuleState::exit_code`]); a bad
//! command line, or `-m AM` naming no module of this node, exits
//! [`EXIT_USAGE`] (64), and `state -lq` exits [`EXIT_DAEMON`] (69) when
//! safekitd cannot be asked: none of these reads as a state.
//!
//! [`ModuleState::exit_code`]: crate::status::ModuleState::exit_code

mod config_apply;
mod config_check;
mod farm;
mod firewall;
mod log;
mod module_cmd;
mod rfs;
mod snapshot;
mod state;
mod user;
mod wait;
mod witness;

use std::{path::PathBuf, time::Duration};

use clap::{Parser, Subcommand};

use crate::{
    control::{self, MirrorCmd, Request, Response},
    paths::Paths,
};

/// Exit code of a bad command line, or of `-m AM` naming no module of this
/// node (`EX_USAGE` of sysexits.h): not clap's 2 nor 1, which `state -lq`
/// uses for ALONE/UP and WAIT.
pub const EXIT_USAGE: i32 = 64;
/// Exit code of `state -lq` when safekitd cannot be asked although it may
/// run (no permission on its socket, an error, an unreadable answer, a
/// timeout): `EX_UNAVAILABLE`.
pub const EXIT_DAEMON: i32 = 69;

/// Control a safekit node.
#[derive(Parser, Debug)]
#[command(
    name = "safekit",
    version,
    after_help = "Exit codes: 0 done, 1 failed; `state -m AM -lq`: STOP 0, WAIT 1, ALONE/UP 2, \
PRIM 3, SECOND 4 (STOP also when safekitd is not running); 64 bad command line or no such \
module on this node; 69 (`state -lq`) safekitd could not be asked."
)]
pub struct Cli {
    /// Root of the node's paths (as given to safekitd); default `/`.
    #[arg(long, global = true, env = "SAFEKIT_ROOT")]
    pub root: Option<PathBuf>,
    /// Subcommand.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Show module states (all modules, or one with -m).
    State(state::StateArgs),
    /// Start a module on this node.
    Start(ModuleArg),
    /// Stop a module on this node.
    Stop(ModuleArg),
    /// Stop every module and the daemon of this node.
    Shutdown,
    /// Force this node primary (mirror; refused if the peer is primary).
    Prim(MirrorArgs),
    /// Force this node secondary (mirror; refused if the peer is not primary).
    Second(MirrorArgs),
    /// Primary even when data may be inconsistent (mirror).
    Primforce(ModuleArg),
    /// Exchange roles: run on the primary (mirror).
    Swap(MirrorArgs),
    /// Restart the application on this node, same role.
    Restart(ModuleArg),
    /// Stop the module on this node and start it again (may fail over).
    Stopstart(ModuleArg),
    /// Stop at once (`stop_prim force`).
    Forcestop(ModuleArg),
    /// Set a resource up or down (`-r custom.<name> -v up|down`), for custom
    /// checker scripts.
    Set(SetArgs),
    /// Wait until the module runs (ALONE, PRIM, SECOND or UP).
    Waitstart(wait::WaitArgs),
    /// Wait until the module is stopped.
    Waitstop(wait::WaitArgs),
    /// Wait until the module is in one of the given states.
    Waitstate(wait::WaitStateArgs),
    /// Print a module's log, newest last (`-n N`: the last N lines; `-f`:
    /// then follow it, across log rotations).
    #[command(visible_alias = "log")]
    Logview(log::LogArgs),
    /// Write an information line into a module's log (for scripts).
    Printi(log::PrintArgs),
    /// Write an error line into a module's log (for scripts).
    Printe(log::PrintArgs),
    /// Farm commands.
    Farm {
        /// Subcommand.
        #[command(subcommand)]
        command: farm::FarmCommand,
    },
    /// Write a support bundle (config without key, logs, state, status).
    Snapshot(snapshot::SnapshotArgs),
    /// Open the cluster's ports to its nodes in nftables, or close them.
    Firewall {
        /// Subcommand.
        #[command(subcommand)]
        command: firewall::FirewallCommand,
    },
    /// Replicated directories of mirror modules.
    Rfs {
        /// Subcommand.
        #[command(subcommand)]
        command: rfs::RfsCommand,
    },
    /// Run the arbitrating witness of `[check.splitbrain] arbiter` (on a
    /// third machine; UDP, authenticated with the cluster key).
    Witness(witness::WitnessArgs),
    /// REST API and console users (users.toml).
    User {
        /// Subcommand.
        #[command(subcommand)]
        command: user::UserCommand,
    },
    /// REST API bearer keys (apikeys.toml).
    Apikey {
        /// Subcommand.
        #[command(subcommand)]
        command: user::ApiKeyCommand,
    },
    /// HTTPS certificates (a cluster CA and one per node).
    Certs {
        /// Subcommand.
        #[command(subcommand)]
        command: user::CertsCommand,
    },
    /// Configuration commands.
    Config {
        /// Subcommand.
        #[command(subcommand)]
        command: ConfigCommand,
    },
}

/// `safekit config ...`.
#[derive(Subcommand, Debug)]
pub enum ConfigCommand {
    /// Validate cluster.toml and every module.toml without touching a
    /// running module.
    Check,
    /// Check this node's configuration, then send cluster.toml and the
    /// module directories (module.toml, bin/) to every node, which checks,
    /// installs (keeping the previous version) and reloads it; a running
    /// module takes what can change at once, the rest at its next start.
    Apply {
        /// Only this module's directory (with cluster.toml).
        #[arg(short = 'm', long = "module")]
        module: Option<String>,
    },
    /// Apply, on every node, the configuration this node had before its
    /// last change.
    Rollback,
}

/// `safekit set -m AM -r custom.NAME -v up|down`.
#[derive(clap::Args, Debug)]
pub struct SetArgs {
    /// Module name.
    #[arg(short = 'm', long = "module", env = "SAFEMODULE")]
    pub module: String,
    /// Resource, `custom.<name>`.
    #[arg(short = 'r', long = "resource")]
    pub resource: String,
    /// `up` or `down`.
    #[arg(short = 'v', long = "value", value_parser = ["up", "down"])]
    pub value: String,
}

/// `-m AM` and an optional sync mode word (`fullsync`, `nosync`).
#[derive(clap::Args, Debug)]
pub struct MirrorArgs {
    /// Module name.
    #[arg(short = 'm', long = "module", env = "SAFEMODULE")]
    pub module: String,
    /// `fullsync` (copy everything) or `nosync` (skip the resync): accepted
    /// for modules with replicated directories.
    #[arg(value_parser = ["fullsync", "nosync"])]
    pub sync: Option<String>,
}

/// `-m AM` (or `SAFEMODULE`).
#[derive(clap::Args, Debug)]
pub struct ModuleArg {
    /// Module name.
    #[arg(short = 'm', long = "module", env = "SAFEMODULE")]
    pub module: String,
}

/// Entry point; returns the process exit code.
#[must_use]
pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            // --help and --version are not errors.
            return if e.use_stderr() { EXIT_USAGE } else { 0 };
        }
    };
    let paths = Paths::from_arg_or_env(cli.root.clone());
    match cli.command {
        Command::State(args) => state::run(&paths, &args),
        Command::Start(m) => module_cmd::simple(&paths, &Request::Start { module: m.module }),
        Command::Stop(m) => module_cmd::simple(&paths, &Request::Stop { module: m.module }),
        Command::Shutdown => module_cmd::simple(&paths, &Request::Shutdown),
        Command::Prim(a) => mirror_sync_cmd(&paths, a, MirrorCmd::Prim),
        Command::Second(a) => mirror_sync_cmd(&paths, a, MirrorCmd::Second),
        Command::Primforce(a) => mirror_cmd(&paths, a.module, MirrorCmd::PrimForce),
        Command::Swap(a) => mirror_sync_cmd(&paths, a, MirrorCmd::Swap),
        Command::Restart(a) => mirror_cmd(&paths, a.module, MirrorCmd::Restart),
        Command::Stopstart(a) => mirror_cmd(&paths, a.module, MirrorCmd::StopStart),
        Command::Forcestop(a) => mirror_cmd(&paths, a.module, MirrorCmd::ForceStop),
        Command::Rfs {
            command: rfs::RfsCommand::Verify(m),
        } => rfs::verify(&paths, m.module),
        Command::Set(a) => module_cmd::simple(
            &paths,
            &Request::SetResource {
                module: a.module,
                resource: a.resource,
                up: a.value == "up",
            },
        ),
        Command::Waitstart(a) => wait::wait(&paths, &a.module, &wait::STARTED, a.timeout),
        Command::Waitstop(a) => wait::wait(
            &paths,
            &a.module,
            &[crate::status::ModuleState::Stop],
            a.timeout,
        ),
        Command::Waitstate(a) => wait::wait(&paths, &a.module, &a.states, a.timeout),
        Command::Logview(args) => log::show(&paths, &args),
        Command::Printi(args) => log::print(&paths, &args, crate::modlog::Level::Info),
        Command::Printe(args) => log::print(&paths, &args, crate::modlog::Level::Error),
        Command::Config {
            command: ConfigCommand::Check,
        } => config_check::run(&paths),
        Command::Config {
            command: ConfigCommand::Apply { module },
        } => config_apply::run(&paths, module, false),
        Command::Config {
            command: ConfigCommand::Rollback,
        } => config_apply::run(&paths, None, true),
        Command::Farm { command } => farm::run(&paths, command),
        Command::Snapshot(a) => snapshot::run(&paths, &a),
        Command::Witness(a) => witness::run(&paths, &a),
        Command::Firewall { command } => firewall::run(&paths, &command),
        Command::User { command } => user::user(&paths, command),
        Command::Apikey { command } => user::apikey(&paths, command),
        Command::Certs { command } => user::certs(&paths, &command),
    }
}

fn mirror_cmd(paths: &Paths, module: String, cmd: MirrorCmd) -> i32 {
    module_cmd::simple(
        paths,
        &Request::Mirror {
            module,
            cmd,
            fullsync: false,
        },
    )
}

/// prim/second/swap with an optional `fullsync` or `nosync`.
fn mirror_sync_cmd(paths: &Paths, a: MirrorArgs, cmd: MirrorCmd) -> i32 {
    match a.sync.as_deref() {
        // The secondary of a swap is in sync already: nothing to skip.
        Some("nosync") if cmd != MirrorCmd::Swap => {
            eprintln!(
                "safekit: nosync only applies to swap (the roles are exchanged without a resynchronisation; the secondary is in sync already)"
            );
            EXIT_USAGE
        }
        sync => module_cmd::simple(
            paths,
            &Request::Mirror {
                module: a.module,
                cmd,
                fullsync: sync == Some("fullsync"),
            },
        ),
    }
}

/// "no module "x" on node n (modules: a, b)".
pub(crate) fn no_module(name: &str, status: &crate::status::NodeStatus) -> String {
    format!(
        "no module {name:?} on node {} (modules: {})",
        status.node,
        if status.modules.is_empty() {
            "none".to_owned()
        } else {
            status
                .modules
                .iter()
                .map(|m| m.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        }
    )
}

/// True when `e` says no safekitd runs with this root: its socket is
/// absent (removed at shutdown) or refuses connections (left by a daemon
/// that died). Not a permission error: that daemon may well run.
pub(crate) fn daemon_absent(e: &control::ControlError) -> bool {
    matches!(
        e,
        control::ControlError::Connect { source, .. }
            if matches!(
                source.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            )
    )
}

/// Default time to wait for the daemon's answer.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// One request to the daemon of `paths`.
pub(crate) fn call(paths: &Paths, req: &Request) -> Result<Response, control::ControlError> {
    control::call(&paths.control_socket(), req, CALL_TIMEOUT)
}
