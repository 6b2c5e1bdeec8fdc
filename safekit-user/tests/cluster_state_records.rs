//! State records that fail safe (issue 12, item 3), against real daemons.
//!
//! - a mirror module with a replicated directory whose peer is down: with
//!   its `mirror.json` missing (first start), corrupt, or unreadable, the
//!   node stays in WAIT (sampled over three heartbeat timeouts), never
//!   ALONE, and `state -v` says why; an operator's `prim` makes it ALONE,
//!   and from then on the record is good: a restart goes ALONE by itself;
//! - a heartbeat captured from an older incarnation of a peer, replayed
//!   after the receiving node restarted while the peer is down: refused as a
//!   replay and counted, the peer not taken for alive.
//!
//! Prefixes and subnets: `skbd1` / 10.77.121.0/24, `skbd2` /
//! 10.77.122.0/24.

mod common;

use std::{
    net::SocketAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

use common::{
    LabModule, capture_heartbeat, http_get, metric, send_spoofed, serial, status, wait_for,
};
use safekit::status::ModuleState;

const PREFIX: &str = "skbd1";
const SUBNET: u8 = 121;
const MODULE: &str = "rec";
const TIMEOUT: Duration = Duration::from_secs(1);

/// A mirror module replicating `/srv/data`, pulse 100 ms / timeout 1 s.
fn mirror_module() -> LabModule {
    LabModule {
        name: MODULE.into(),
        toml: r#"[service]
mode = "mirror"
nodes = ["node1", "node2"]

[heart]
pulse = "100ms"
timeout = "1s"

[rfs]
send_timeout = "1s"
[[rfs.dir]]
path = "/srv/data"
"#
        .into(),
        scripts: vec![],
    }
}

/// A farm module (its heartbeats are the replay material).
fn farm_module(lab_vip: std::net::Ipv4Addr) -> LabModule {
    LabModule {
        name: "front".into(),
        toml: format!(
            r#"[service]
mode = "farm"

[farm]
pulse = "100ms"
lans = ["default"]

[vip]
addrs = ["{lab_vip}"]
[[vip.rule]]
proto = "tcp"
port = 80
"#
        ),
        scripts: vec![],
    }
}

fn state(lab: &common::Lab, i: usize) -> Option<ModuleState> {
    status(lab, i).module(MODULE).map(|m| m.state)
}

fn cli(lab: &common::Lab, i: usize, args: &[&str]) -> (bool, String) {
    let out = lab.safekit(i, args).expect("run safekit");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn record_file(lab: &common::Lab) -> PathBuf {
    lab.root(1)
        .join("var/lib/safekit")
        .join(MODULE)
        .join("mirror.json")
}

/// Starts the module on node1 (its peer's daemon is down) and samples its
/// state every 50 ms for three heartbeat timeouts: it must wait the whole
/// time. Returns `state -v`.
fn starts_and_waits(lab: &common::Lab, case: &str) -> String {
    let (ok, text) = cli(lab, 1, &["start", "-m", MODULE]);
    assert!(ok, "{case}: start: {text}");
    let end = Instant::now() + 3 * TIMEOUT;
    let mut samples = 0;
    while Instant::now() < end {
        let s = state(lab, 1);
        assert!(
            matches!(s, Some(ModuleState::Wait)),
            "{case}: {s:?} while the data is not known up to date (sample {samples})"
        );
        samples += 1;
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(samples > 20, "{case}: only {samples} samples");
    let (ok, text) = cli(lab, 1, &["state", "-m", MODULE, "-v"]);
    assert!(ok, "{case}: state -v: {text}");
    text
}

/// Stops the module, restarts node1's safekitd (the record is read at
/// start).
fn restart_node1(lab: &mut common::Lab) {
    let _ = cli(lab, 1, &["stop", "-m", MODULE]);
    wait_for(Duration::from_secs(10), || {
        state(lab, 1) == Some(ModuleState::Stop)
    })
    .expect("module stopped");
    lab.kill_daemon(1);
    lab.start_daemon(1).expect("restart safekitd");
}

#[test]
fn missing_corrupt_or_unreadable_records_wait_for_prim_never_alone() {
    let _serial = serial();
    let mut lab = common::lab(PREFIX, SUBNET, 2, vec![mirror_module()]);
    // node2's daemon never runs: the peer is down throughout.
    lab.start_daemon(1).expect("start safekitd");
    let file = record_file(&lab);

    // First start: no record.
    assert!(!file.exists());
    let text = starts_and_waits(&lab, "missing");
    assert!(
        text.contains("no state record") && text.contains(&format!("safekit prim -m {MODULE}")),
        "state -v does not say why: {text}"
    );
    let log = std::fs::read_to_string(lab.root(1).join(format!("var/log/safekit/{MODULE}.log")))
        .unwrap_or_default();
    assert!(log.contains("no state record"), "module log: {log}");

    // Corrupt.
    restart_node1(&mut lab);
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    std::fs::write(&file, b"{\"generation\": 4, \"uptodate\": tr").unwrap();
    restart_node1(&mut lab);
    let text = starts_and_waits(&lab, "corrupt");
    assert!(text.contains("corrupt"), "state -v: {text}");

    // Unreadable (an I/O error: a directory where the file should be).
    restart_node1(&mut lab);
    std::fs::remove_file(&file).unwrap();
    std::fs::create_dir(&file).unwrap();
    restart_node1(&mut lab);
    let text = starts_and_waits(&lab, "unreadable");
    assert!(text.contains("unreadable"), "state -v: {text}");

    // The operator names this node's data the reference: ALONE.
    restart_node1(&mut lab);
    std::fs::remove_dir(&file).unwrap();
    restart_node1(&mut lab);
    let (ok, text) = cli(&lab, 1, &["prim", "-m", MODULE]);
    assert!(ok, "prim: {text}");
    wait_for(Duration::from_secs(10), || {
        state(&lab, 1) == Some(ModuleState::Alone)
    })
    .unwrap_or_else(|| panic!("not ALONE after prim: {:?}", state(&lab, 1)));
    let (_, text) = cli(&lab, 1, &["state", "-m", MODULE, "-v"]);
    assert!(text.contains("up to date"), "state -v: {text}");
    // A good record: after a restart, the peer still down, ALONE by itself
    // after the heartbeat timeout — the waits above were the records'.
    restart_node1(&mut lab);
    let (ok, text) = cli(&lab, 1, &["start", "-m", MODULE]);
    assert!(ok, "start: {text}");
    wait_for(5 * TIMEOUT, || state(&lab, 1) == Some(ModuleState::Alone)).unwrap_or_else(|| {
        panic!(
            "a good record did not go ALONE: {:?}",
            cli(&lab, 1, &["state", "-m", MODULE, "-v"]).1
        )
    });
    let _ = cli(&lab, 1, &["stop", "-m", MODULE]);
}

#[test]
fn a_heartbeat_of_an_older_peer_incarnation_is_refused_after_the_receiver_restarts() {
    let _serial = serial();
    let vip = std::net::Ipv4Addr::new(10, 77, 122, 200);
    let mut lab = common::lab("skbd2", 122, 2, vec![farm_module(vip)]);
    let spec = lab.spec().clone();
    let (node1, node2) = (spec.node_addr(1), spec.node_addr(2));
    let peer_up = |lab: &common::Lab| {
        status(lab, 1)
            .module("front")
            .and_then(|m| m.peers.iter().find(|p| p.node == "node2").cloned())
            .is_some_and(|p| !p.lost && p.state == Some(ModuleState::Up))
    };
    lab.start_daemon(1).expect("start node1");
    lab.start_daemon(2).expect("start node2");
    let (ok, text) = cli(&lab, 2, &["start", "-m", "front"]);
    assert!(ok, "{text}");
    wait_for(Duration::from_secs(5), || peer_up(&lab)).expect("node1 hears node2");

    // A genuine heartbeat of node2's first incarnation, from node1's wire.
    let old = common::in_netns(&spec.node_ns(1), move || {
        capture_heartbeat(node2, Duration::from_secs(3))
    });

    // node2 restarts (a new epoch), node1 hears it, then node2 goes down.
    lab.kill_daemon(2);
    wait_for(Duration::from_secs(5), || !peer_up(&lab)).expect("node2 lost");
    lab.start_daemon(2).expect("restart node2");
    let (ok, text) = cli(&lab, 2, &["start", "-m", "front"]);
    assert!(ok, "{text}");
    wait_for(Duration::from_secs(5), || peer_up(&lab)).expect("node1 hears node2 again");
    lab.kill_daemon(2);

    // The receiver restarts: its replay windows are new.
    lab.kill_daemon(1);
    lab.start_daemon(1).expect("restart node1");

    // The old incarnation's heartbeat, replayed with node2's address.
    let client = spec.client_ns();
    let replayed = old.clone();
    common::in_netns(&client, move || {
        for _ in 0..3 {
            send_spoofed(node2, node1, &replayed);
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    let metrics_addr = SocketAddr::from((node1, 9010));
    let name = "safekit_heartbeats_rejected_total{node=\"node1\",reason=\"replay\"}";
    let counted = wait_for(Duration::from_secs(3), || {
        metric(&http_get(&client, metrics_addr, "/metrics").1, name) == Some(3.0)
    });
    let body = http_get(&client, metrics_addr, "/metrics").1;
    assert!(counted.is_some(), "3 replays not counted:\n{body}");
    assert_eq!(
        metric(
            &body,
            "safekit_heartbeats_received_total{node=\"node1\",module=\"front\"}"
        ),
        Some(0.0),
        "a replayed heartbeat was accepted:\n{body}"
    );
    // Nothing changed: node2 is not taken for alive.
    assert!(!peer_up(&lab), "node1 took the replay for node2 alive");
}
