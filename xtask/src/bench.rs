//! `cargo xtask bench <what>`: benchmarks that print figures and ratios
//! measured side by side in one run (TESTING.md: targets belong here, not
//! in timed tests). They run as root in network namespaces of their own.

use anyhow::Result;
use clap::Subcommand;
use xtask::{run, setup};

/// What to measure.
#[derive(Subcommand)]
pub(crate) enum Bench {
    /// Packets per second through the farm filter (XDP accept and drop
    /// paths) against a no-op XDP program and the nftables backend, same
    /// generated traffic into a veth pair; prints the ratios to the targets.
    Farm,
    /// Client-observed outage of a mirror failover (VIP probed every 10 ms)
    /// over 10 runs, pulse 100 ms / timeout 500 ms: min/median/max and the
    /// ratio to the timeout.
    Failover,
    /// The replicated FUSE mount vs a plain directory of the same filesystem
    /// (and the mount with no secondary), for `async = second` and `none`
    /// at `durability = fsync`, and `second` at `every_write`: sequential
    /// 1 MiB writes, 4 KiB write+fsync, create/write/close/unlink, cold and
    /// warm sequential reads and 4 KiB random reads (MB/s, op/s, p50/p99,
    /// ratios); pgbench TPS and `pgbench -i` time (plain, ALONE, PRIM at
    /// both durabilities); then each target met or missed.
    Replication,
}

/// Runs an `#[ignore]`d benchmark test of safekit-user in release mode.
fn ignored_test(name: &str) -> Result<()> {
    run(super::cargo().args([
        "test",
        "--release",
        "-p",
        "safekit-user",
        "--test",
        name,
        "--",
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ]))
}

pub(crate) fn bench(what: &Bench) -> Result<()> {
    setup::setup()?;
    match what {
        // An example of safekit-user, not a dependency of xtask: xtask must
        // build before the eBPF toolchain exists.
        Bench::Farm => run(super::cargo().args([
            "run",
            "--release",
            "-p",
            "safekit-user",
            "--example",
            "bench_farm",
        ])),
        Bench::Failover => ignored_test("bench_failover"),
        Bench::Replication => ignored_test("rfs_bench"),
    }
}
