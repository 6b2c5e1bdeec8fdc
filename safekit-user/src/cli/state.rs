//! `safekit state [-m AM] [-v] [-lq]`.

use std::io::IsTerminal as _;

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
    /// (STOP 0, WAIT 1, ALONE/UP 2, PRIM 3, SECOND 4).
    #[arg(short = 'q', long)]
    pub quiet: bool,
}

pub(super) fn run(paths: &Paths, args: &StateArgs) -> i32 {
    let status = match super::call(paths, &Request::State) {
        Ok(Response::State { status }) => status,
        Ok(Response::Error { error }) => {
            eprintln!("safekit: {error}");
            return 1;
        }
        Ok(_) => {
            eprintln!("safekit: unexpected answer from safekitd");
            return 1;
        }
        Err(e) => {
            if args.quiet {
                // No daemon: nothing runs, the module is stopped.
                return ModuleState::Stop.exit_code();
            }
            eprintln!("safekit: {e}");
            return 1;
        }
    };
    let modules: Vec<&ModuleStatus> = match &args.module {
        Some(name) => {
            if let Some(m) = status.module(name) {
                vec![m]
            } else {
                eprintln!(
                    "safekit: no module {name:?} on node {} (modules: {})",
                    status.node,
                    status
                        .modules
                        .iter()
                        .map(|m| m.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                return 1;
            }
        }
        None => status.modules.iter().collect(),
    };
    if args.quiet {
        return if let (Some(_), Some(m)) = (&args.module, modules.first()) {
            m.state.exit_code()
        } else {
            eprintln!("safekit: -q needs -m AM");
            1
        };
    }
    print!(
        "{}",
        render(&status, &modules, args, std::io::stdout().is_terminal())
    );
    0
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
