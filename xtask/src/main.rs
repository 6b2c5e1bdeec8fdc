//! `cargo xtask <task>`: setup, run, test, lab, bench.

mod bench;

use anyhow::Result;
use clap::{Parser, Subcommand};
use xtask::{
    demo, fuzz,
    package::{self, cargo},
    run, setup, system_test,
};

#[derive(Parser)]
#[command(about = "safekit developer tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what this machine lacks (Debian packages, toolchains, bpf-linker).
    Setup,
    /// Setup, build, bring up a lab and show the product working.
    Run,
    /// Build the binaries (debug).
    Build,
    /// Lab of network namespaces with safekitd in each node.
    Lab {
        #[command(subcommand)]
        cmd: LabCmd,
    },
    /// Setup, build, and run every test (unit, eBPF, privileged cluster tests).
    Test {
        /// Also the system test (a few minutes): the Debian package on two
        /// Debian 12 machines booted with systemd (`system-test`).
        #[arg(long)]
        all: bool,
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Build the cargo-fuzz targets (pinned nightly) and run each one.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60, conflicts_with = "runs")]
        seconds: u64,
        /// Executions per target instead of a time.
        #[arg(long)]
        runs: Option<u64>,
        /// Only this target (default: every one).
        target: Option<String>,
    },
    /// Build the Debian package (cargo-deb) into target/debian/, checked
    /// with lintian.
    Package,
    /// The Debian package installed on two Debian 12 machines (debootstrap,
    /// systemd-nspawn -b) on a bridge: service, boot = true, restart after
    /// kill -9, watchdog, systemctl stop, upgrade/remove/purge.
    SystemTest,
    /// Benchmarks: figures and ratios measured side by side in one run.
    Bench {
        #[command(subcommand)]
        what: bench::Bench,
    },
}

#[derive(Subcommand)]
enum LabCmd {
    /// Create the lab (bridge, node and client namespaces, configs, keys)
    /// and start safekitd in every node.
    Up {
        /// Number of nodes.
        #[arg(long, default_value_t = 3)]
        nodes: usize,
    },
    /// Remove everything the lab made.
    Down,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.task {
        Task::Setup => setup::setup(),
        Task::Build => {
            setup::setup()?;
            build()
        }
        Task::Run => {
            setup::setup()?;
            build()?;
            demo::run()
        }
        Task::Lab {
            cmd: LabCmd::Up { nodes },
        } => {
            setup::setup()?;
            build()?;
            demo::lab_up(nodes)?.persist();
            demo::print_lab_help(nodes);
            Ok(())
        }
        Task::Lab { cmd: LabCmd::Down } => {
            demo::lab_down();
            Ok(())
        }
        Task::Test { all, args } => {
            test(&args)?;
            if all {
                system_test::system_test()?;
            }
            Ok(())
        }
        Task::Fuzz {
            seconds,
            runs,
            target,
        } => {
            setup::setup()?;
            let budget = runs.map_or(fuzz::Budget::Seconds(seconds), fuzz::Budget::Runs);
            let outcomes = fuzz::fuzz(budget, target.as_deref())?;
            let failed = outcomes.iter().filter(|o| o.failure.is_some()).count();
            if failed > 0 {
                anyhow::bail!("{failed} fuzz target(s) crashed (inputs in target/fuzz/artifacts/)");
            }
            Ok(())
        }
        Task::Package => package::package(None).map(|_| ()),
        Task::SystemTest => system_test::system_test(),
        Task::Bench { what } => bench::bench(&what),
    }
}

fn build() -> Result<()> {
    run(cargo().args(["build", "--bins"]))
}

fn test(args: &[String]) -> Result<()> {
    setup::setup()?;
    build()?;
    // Default members only: safekit-ebpf is built by safekit-user's build.rs
    // for the BPF target, never for the host.
    let mut child = cargo()
        .args(["test", "--no-fail-fast"])
        .args(args)
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let (mut passed, mut failed, mut ignored) = (0u64, 0u64, 0u64);
    if let Some(out) = child.stdout.take() {
        use std::io::BufRead as _;
        for line in std::io::BufReader::new(out).lines() {
            let line = line?;
            println!("{line}");
            if let Some(rest) = line.strip_prefix("test result: ") {
                let count = |word: &str| -> u64 {
                    rest.split(';')
                        .find_map(|p| p.trim().strip_suffix(word).map(str::trim))
                        .and_then(|n| n.rsplit(' ').next())
                        .and_then(|n| n.parse().ok())
                        .unwrap_or(0)
                };
                passed += count("passed");
                failed += count("failed");
                ignored += count("ignored");
            }
        }
    }
    let status = child.wait()?;
    // A short run of every fuzz target (the whole suite only: not when a
    // test filter is given), each counted as a test.
    let fuzz_seconds = std::env::var("SAFEKIT_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(FUZZ_SMOKE_SECONDS);
    if args.is_empty() && fuzz_seconds > 0 {
        match fuzz::fuzz(fuzz::Budget::Seconds(fuzz_seconds), None) {
            Ok(outcomes) => {
                for o in outcomes {
                    if o.failure.is_some() {
                        failed += 1;
                    } else {
                        passed += 1;
                    }
                }
            }
            Err(e) => {
                println!("fuzz: {e:#}");
                failed += 1;
            }
        }
    }
    // One closing line for the whole suite.
    println!("summary: {passed} passed, {failed} failed, {ignored} skipped");
    if !status.success() {
        anyhow::bail!("cargo test failed: {status}");
    }
    if failed > 0 {
        anyhow::bail!("{failed} failed");
    }
    Ok(())
}

/// Seconds each fuzz target runs in `cargo xtask test`
/// (`SAFEKIT_FUZZ_SECONDS`, 0 to skip).
const FUZZ_SMOKE_SECONDS: u64 = 3;
