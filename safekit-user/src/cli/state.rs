//! `safekit state [-m AM] [-v] [-lq]`.

use std::io::IsTerminal as _;

use super::{EXIT_DAEMON, EXIT_USAGE};
use crate::{
    control::{Request, Response},
    paths::Paths,
    status::{ModuleState, ModuleStatus, NodeStatus, bucket_ranges},
};

/// Arguments of `state`.
#[derive(clap::Args, Debug)]
pub struct StateArgs {
    /// Only this module.
    #[arg(short = 'm', long = "module", env = "SAFEMODULE")]
    pub module: Option<String>,
    /// Details: peers per LAN, timers, counters.
    #[arg(short = 'v', long)]
    pub verbose: bool,
    /// Local state only.
    #[arg(short = 'l', long)]
    pub local: bool,
    /// Quiet: print nothing, the exit code tells the local state of -m AM
    /// (STOP 0, WAIT 1, ALONE/UP 2, PRIM 3, SECOND 4; STOP too when safekitd
    /// is not running). Not a state: 64 no such module on this node (or no
    /// -m), 69 safekitd could not be asked.
    #[arg(short = 'q', long)]
    pub quiet: bool,
}

pub(super) fn run(paths: &Paths, args: &StateArgs) -> i32 {
    if args.quiet && args.module.is_none() {
        eprintln!("safekit: state -q needs -m AM (or SAFEMODULE)");
        return EXIT_USAGE;
    }
    let status = match super::call(paths, &Request::State) {
        Ok(Response::State { status }) => status,
        Ok(Response::Error { error }) => {
            eprintln!("safekit: {error}");
            return failed(args);
        }
        Ok(_) => {
            eprintln!("safekit: unexpected answer from safekitd");
            return failed(args);
        }
        Err(e) if args.quiet && super::daemon_absent(&e) => {
            // No daemon: nothing runs, a configured module is stopped.
            let name = args.module.as_deref().unwrap_or_default();
            if paths.module_dir(name).join("module.toml").is_file() {
                return ModuleState::Stop.exit_code();
            }
            eprintln!(
                "safekit: no module {name:?} on this node (no {}, and safekitd is not running)",
                paths.module_dir(name).join("module.toml").display()
            );
            return EXIT_USAGE;
        }
        Err(e) => {
            eprintln!("safekit: {e}");
            return failed(args);
        }
    };
    let modules: Vec<&ModuleStatus> = match &args.module {
        Some(name) => {
            if let Some(m) = status.module(name) {
                vec![m]
            } else {
                eprintln!("safekit: {}", super::no_module(name, &status));
                return EXIT_USAGE;
            }
        }
        None => status.modules.iter().collect(),
    };
    if args.quiet {
        return modules.first().map_or(EXIT_USAGE, |m| m.state.exit_code());
    }
    print!(
        "{}",
        render(&status, &modules, args, std::io::stdout().is_terminal())
    );
    0
}

/// Exit code of a failure: 1, except under `-q` where 1 means WAIT.
fn failed(args: &StateArgs) -> i32 {
    if args.quiet { EXIT_DAEMON } else { 1 }
}

fn paint(text: &str, m: &ModuleStatus, tty: bool) -> String {
    if tty {
        format!("{}{text}\x1b[0m", m.colour.ansi())
    } else {
        format!("{text} ({})", m.colour.name())
    }
}

/// Text of `safekit state`.
fn render(status: &NodeStatus, modules: &[&ModuleStatus], args: &StateArgs, tty: bool) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(out, "node {} (cluster {})", status.node, status.cluster);
    for m in modules {
        let mode = match m.mode {
            crate::status::Mode::Mirror => "mirror",
            crate::status::Mode::Farm => "farm",
        };
        let _ = write!(
            out,
            "  {:<16} {:<6} {}",
            m.name,
            mode,
            paint(m.state.name(), m, tty)
        );
        if let Some(left) = m.farm.as_ref().and_then(|f| f.draining) {
            let _ = write!(out, " DRAINING ({left} connections left)");
        }
        if !args.local {
            for p in &m.peers {
                let s = p
                    .state
                    .map_or(if p.lost { "lost" } else { "unknown" }, ModuleState::name);
                let _ = write!(out, "   {}: {s}", p.node);
            }
        }
        out.push('\n');
        if args.verbose {
            for (k, v) in &m.details {
                let _ = writeln!(out, "      {k}: {v}");
            }
            if let Some(f) = &m.farm {
                let _ = writeln!(
                    out,
                    "      buckets by node (assignment of {}'s view):",
                    status.node
                );
                for (node, buckets) in &f.assignment {
                    let _ = writeln!(
                        out,
                        "        {node}: {} buckets ({})",
                        buckets.len(),
                        bucket_ranges(buckets)
                    );
                }
            }
            for p in &m.peers {
                let seen: Vec<String> = p
                    .last_seen_ms
                    .iter()
                    .map(|(lan, ms)| format!("{lan} {ms} ms ago"))
                    .collect();
                let _ = writeln!(
                    out,
                    "      peer {}: {} last heartbeat: {}",
                    p.node,
                    p.state.map_or("-", ModuleState::name),
                    if seen.is_empty() {
                        "never".to_owned()
                    } else {
                        seen.join(", ")
                    }
                );
            }
        }
    }
    out
}
