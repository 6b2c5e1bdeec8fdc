//! `cargo xtask fuzz [--seconds N | --runs N] [TARGET]`: builds the
//! cargo-fuzz targets of `fuzz/` with the pinned nightly and runs each one.
//!
//! The targets are built with optimisations, debug assertions and overflow
//! checks, and without a sanitizer: every harnessed decoder is safe Rust (no
//! `unsafe` on those paths), so what a fuzzer can find is a panic, an
//! overflow, a hang or an allocation without bound, which libFuzzer catches
//! by itself; `AddressSanitizer` would halve the executions per second for
//! nothing more.
//!
//! Each run reads the seed corpus `fuzz/corpus/<target>/` and the past
//! crashes `fuzz/regressions/<target>/` (both in the repository, never
//! written) and grows a working corpus in `target/fuzz/corpus/<target>/`.
//! A crash is saved in `target/fuzz/artifacts/<target>/` and fails the run:
//! copy it into `fuzz/regressions/<target>/` with the fix, where the unit
//! test `fuzzing::tests` replays it on the stable toolchain too.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};

use crate::{run, setup, workspace_root};

/// How long each target runs.
#[derive(Debug, Clone, Copy)]
pub enum Budget {
    /// Seconds per target.
    Seconds(u64),
    /// Executions per target.
    Runs(u64),
}

/// What one target's run did.
#[derive(Debug)]
pub struct Outcome {
    /// Target name.
    pub target: String,
    /// Inputs executed.
    pub executions: u64,
    /// Executions per second.
    pub per_second: u64,
    /// Peak resident memory (MiB).
    pub peak_rss_mb: u64,
    /// None when it found nothing; else what failed.
    pub failure: Option<String>,
}

/// Largest input per target: what the decoder can actually be fed (a
/// heartbeat datagram, an ARP frame, ...), libFuzzer's 4096 otherwise.
fn max_len(target: &str) -> usize {
    match target {
        // heartbeat::codec::MAX_LEN
        "heartbeat" | "farm_view" => 1400,
        // The ARP responder's receive buffer.
        "arp" => 2048,
        // channel: room for a few whole frames and messages past a frame;
        // rfs_message, journal: a rename's two paths at the wire limit
        // (rfs::proto::MAX_PATH, 64 KiB each) with room past it.
        "channel" | "rfs_message" | "journal" => 1 << 18,
        _ => 4096,
    }
}

fn fuzz_dir() -> PathBuf {
    workspace_root().join("fuzz")
}

/// The targets: `fuzz/fuzz_targets/*.rs`, sorted.
pub fn targets() -> Result<Vec<String>> {
    let dir = fuzz_dir().join("fuzz_targets");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(Result::ok)
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_suffix(".rs"))
                .map(str::to_owned)
        })
        .collect();
    names.sort();
    Ok(names)
}

/// `cargo +NIGHTLY fuzz build` of every target.
fn build(nightly: &str) -> Result<PathBuf> {
    let root = workspace_root();
    let target_dir = root.join("target/fuzz");
    run(Command::new("cargo")
        .arg(format!("+{nightly}"))
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO")
        .current_dir(&root)
        .args(["fuzz", "build", "-O", "-a", "-s", "none", "--target-dir"])
        .arg(&target_dir))?;
    Ok(target_dir.join("x86_64-unknown-linux-gnu/release"))
}

/// Builds and runs `only` (or every target) for `budget` each.
pub fn fuzz(budget: Budget, only: Option<&str>) -> Result<Vec<Outcome>> {
    let root = workspace_root();
    let nightly = setup::toolchain_channel(&root.join("safekit-ebpf/rust-toolchain.toml"))?;
    let all = targets()?;
    let chosen: Vec<String> = match only {
        Some(t) if all.iter().any(|n| n == t) => vec![t.to_owned()],
        Some(t) => bail!("no fuzz target {t:?}; targets: {}", all.join(", ")),
        None => all,
    };
    let bins = build(&nightly)?;
    let mut outcomes = Vec::new();
    for t in &chosen {
        let o = run_target(&bins, t, budget)?;
        match &o.failure {
            None => println!(
                "fuzz {}: {} executions ({}/s, peak RSS {} MiB), no crash",
                o.target, o.executions, o.per_second, o.peak_rss_mb
            ),
            Some(f) => println!(
                "fuzz {}: FAILED after {} executions: {f}",
                o.target, o.executions
            ),
        }
        outcomes.push(o);
    }
    Ok(outcomes)
}

fn run_target(bins: &Path, target: &str, budget: Budget) -> Result<Outcome> {
    let root = workspace_root();
    let work = root.join("target/fuzz/corpus").join(target);
    let artifacts = root.join("target/fuzz/artifacts").join(target);
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    std::fs::create_dir_all(&artifacts)
        .with_context(|| format!("creating {}", artifacts.display()))?;
    let mut cmd = Command::new(bins.join(target));
    cmd.arg(&work);
    for dir in ["corpus", "regressions"] {
        let d = fuzz_dir().join(dir).join(target);
        if d.is_dir() {
            cmd.arg(d);
        }
    }
    match budget {
        Budget::Seconds(s) => cmd.arg(format!("-max_total_time={s}")),
        Budget::Runs(n) => cmd.arg(format!("-runs={n}")),
    };
    let mut prefix = artifacts.into_os_string();
    prefix.push("/");
    let mut arg = std::ffi::OsString::from("-artifact_prefix=");
    arg.push(prefix);
    cmd.arg(arg)
        .arg(format!("-max_len={}", max_len(target)))
        // An input that takes this long is a hang.
        .arg("-timeout=10")
        .arg("-print_final_stats=1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let out = cmd
        .output()
        .with_context(|| format!("running fuzz target {target}"))?;
    let log = String::from_utf8_lossy(&out.stderr);
    let stat = |name: &str| -> u64 {
        log.lines()
            .find_map(|l| l.strip_prefix(&format!("stat::{name}:")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    let failure = (!out.status.success()).then(|| {
        // libFuzzer's own account: the panic or error, then where the
        // input was saved.
        log.lines()
            .filter(|l| {
                l.contains("panicked")
                    || l.contains("ERROR")
                    || l.contains("Test unit written")
                    || l.contains("SUMMARY")
            })
            .collect::<Vec<_>>()
            .join("\n")
    });
    Ok(Outcome {
        target: target.to_owned(),
        executions: stat("number_of_executed_units"),
        per_second: stat("average_exec_per_sec"),
        peak_rss_mb: stat("peak_rss_mb"),
        failure,
    })
}

/// The version `setup` installs.
pub const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// Installs cargo-fuzz when missing (idempotent).
pub fn install_cargo_fuzz(stable: &str) -> Result<()> {
    let have = Command::new("cargo")
        .arg(format!("+{stable}"))
        .args(["fuzz", "--version"])
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(CARGO_FUZZ_VERSION));
    if have {
        return Ok(());
    }
    eprintln!("setup: installing cargo-fuzz {CARGO_FUZZ_VERSION}");
    run(Command::new("cargo")
        .arg(format!("+{stable}"))
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO")
        .args([
            "install",
            &format!("cargo-fuzz@{CARGO_FUZZ_VERSION}"),
            "--locked",
        ]))
}
