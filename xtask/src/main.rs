//! `cargo xtask <task>`: setup, run, test, lab, bench.

use std::process::Command;

use anyhow::Result;
use clap::{Parser, Subcommand};
use xtask::{run, setup, workspace_root};

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
    /// Setup, build, and run every test (unit, eBPF, privileged cluster tests).
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.task {
        Task::Setup => setup::setup(),
        Task::Test { args } => test(&args),
    }
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(workspace_root());
    c
}

fn test(args: &[String]) -> Result<()> {
    setup::setup()?;
    run(cargo().args(["build", "--workspace", "--bins"]))?;
    run(cargo()
        .args(["test", "--workspace", "--no-fail-fast"])
        .args(args))
}
