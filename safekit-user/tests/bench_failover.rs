//! `cargo xtask bench failover`: the client-observed outage of a mirror
//! failover. Not a pass/fail test (it is `#[ignore]`d and run by xtask):
//! it prints figures.
//!
//! Two nodes, pulse 100 ms / timeout 500 ms; the client probes VIP:port
//! every 10 ms; the primary's safekitd and service are `kill -9`ed; the
//! outage is the time from the last answer of the old primary to the first
//! answer of the new one. 10 runs, alternating the victim.

mod common;

use std::{
    net::{Ipv4Addr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use common::{LabModule, ask, demo_scripts, in_netns, serial, status, wait_for};
use safekit::status::ModuleState;

const PORT: u16 = 7000;
const SUBNET: u8 = 41;
const TIMEOUT_MS: u64 = 500;
const RUNS: usize = 10;

fn state(lab: &common::Lab, node: usize) -> Option<ModuleState> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| status(lab, node)))
        .ok()
        .and_then(|s| s.module("web").map(|m| m.state))
}

#[test]
#[ignore = "benchmark: run by `cargo xtask bench failover`"]
#[expect(
    clippy::too_many_lines,
    reason = "the benchmark in order: lab, probe, runs, report"
)]
fn bench_failover() {
    let _serial = serial();
    let vip = Ipv4Addr::new(10, 77, SUBNET, 100);
    let module = LabModule {
        name: "web".into(),
        toml: format!(
            "[service]\nmode = \"mirror\"\n\n[heart]\npulse = \"100ms\"\ntimeout = \"{TIMEOUT_MS}ms\"\n\n[vip]\naddrs = [\"{vip}\"]\ngarp_count = 3\ngarp_interval = \"20ms\"\n"
        ),
        scripts: demo_scripts("start_prim", "stop_prim", &format!("0.0.0.0:{PORT}")),
    };
    let mut lab = common::lab("skbf", SUBNET, 2, vec![module]);
    for n in [1, 2] {
        lab.start_daemon(n).unwrap();
        assert!(
            lab.safekit(n, &["start", "-m", "web"])
                .unwrap()
                .status
                .success()
        );
    }
    let client_ns = lab.spec().client_ns();
    let client = lab.spec().client_addr();
    let mut outages = Vec::new();
    let mut primary = 1;
    for run in 0..RUNS {
        let secondary = 3 - primary;
        let settled = wait_for(Duration::from_secs(20), || {
            state(&lab, primary).is_some_and(|s| s == ModuleState::Prim || s == ModuleState::Alone)
                && state(&lab, secondary) == Some(ModuleState::Second)
        });
        assert!(settled.is_some(), "run {run}: not PRIM/SECOND");
        // Probe every 10 ms from the client.
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let ns = client_ns.clone();
        let base = 50000 + u16::try_from(run).unwrap() * 1000;
        let prober = std::thread::spawn(move || {
            in_netns(&ns, move || {
                let start = Instant::now();
                let mut seen = Vec::new();
                let mut port = base;
                while !stop2.load(Ordering::Relaxed) && start.elapsed() < Duration::from_secs(15) {
                    let t = start.elapsed();
                    let r = ask(
                        SocketAddr::from((client, port)),
                        SocketAddr::from((vip, PORT)),
                    )
                    .ok();
                    seen.push((t, r));
                    port = if port >= base + 999 { base } else { port + 1 };
                    std::thread::sleep(Duration::from_millis(10));
                }
                seen
            })
        });
        std::thread::sleep(Duration::from_millis(300));
        let pid = std::fs::read_to_string(lab.root(primary).join("demo.pid")).unwrap_or_default();
        lab.kill_daemon(primary);
        if let Ok(p) = pid.trim().parse::<i32>() {
            // SAFETY: kill(2) of the demo service pid recorded by the script.
            unsafe { libc::kill(p, libc::SIGKILL) };
        }
        let old = format!("node{primary}");
        let new = format!("node{secondary}");
        assert!(
            wait_for(Duration::from_secs(10), || state(&lab, secondary)
                == Some(ModuleState::Alone))
            .is_some(),
            "run {run}: node{secondary} never ALONE"
        );
        std::thread::sleep(Duration::from_millis(300));
        stop.store(true, Ordering::Relaxed);
        let seen = prober.join().unwrap();
        let last_old = seen
            .iter()
            .filter(|(_, r)| r.as_deref() == Some(old.as_str()))
            .map(|(t, _)| *t)
            .max();
        let first_new = seen
            .iter()
            .filter(|(_, r)| r.as_deref() == Some(new.as_str()))
            .map(|(t, _)| *t)
            .min();
        match (last_old, first_new) {
            (Some(a), Some(b)) if b > a => outages.push(b.checked_sub(a).unwrap()),
            other => panic!("run {run}: no clean switch observed: {other:?}"),
        }
        eprintln!(
            "run {run}: {old} -> {new}: outage {:?}",
            outages.last().unwrap()
        );
        // The victim comes back as SECOND.
        lab.start_daemon(primary).unwrap();
        assert!(
            lab.safekit(primary, &["start", "-m", "web"])
                .unwrap()
                .status
                .success()
        );
        primary = secondary;
    }
    outages.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let (min, med, max) = (
        ms(outages[0]),
        ms(outages[outages.len() / 2]),
        ms(outages[outages.len() - 1]),
    );
    let t = f64::from(u32::try_from(TIMEOUT_MS).unwrap());
    println!();
    println!(
        "failover outage seen by a client probing every 10 ms ({RUNS} runs, pulse 100 ms, timeout {TIMEOUT_MS} ms)"
    );
    println!("  min {min:7.1} ms   median {med:7.1} ms   max {max:7.1} ms");
    println!(
        "  median / timeout = {:.2}   (target: median <= timeout + 200 ms = {} ms: {})",
        med / t,
        TIMEOUT_MS + 200,
        if med <= t + 200.0 { "met" } else { "NOT met" }
    );
    println!(
        "  for scale: keepalived's default takeover ~3500 ms, Pacemaker's token timeout alone 3000 ms"
    );
}
