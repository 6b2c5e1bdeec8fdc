//! Heartbeats between real daemons in network namespaces (issue: foundation).
//!
//! - two nodes see each other's module state within two pulses, and a
//!   `kill -9`ed daemon is reported lost within timeout + one pulse;
//! - a third namespace sends forged, bit-flipped, truncated and replayed
//!   heartbeats: none is accepted, each is counted by reason in /metrics, and
//!   nothing changes;
//! - `ready.txt` answers 404 for a stopped and for an unknown module.

mod common;

use std::{
    net::{Ipv4Addr, SocketAddr},
    time::Duration,
};

use common::{
    LabModule, capture_heartbeat, http_get, metric, send_spoofed, serial, status, wait_for,
};
use safekit::{
    heartbeat::{Heartbeat, HeartbeatKey, encode},
    status::ModuleState,
};

const PULSE: Duration = Duration::from_millis(100);
/// Farm membership: lost after 10 missed pulses.
const TIMEOUT: Duration = Duration::from_millis(1000);

fn farm_module(vip: Ipv4Addr) -> LabModule {
    LabModule {
        name: "front".into(),
        toml: format!(
            r#"[service]
mode = "farm"

[farm]
pulse = "100ms"
lans = ["default"]

[vip]
addrs = ["{vip}"]
[[vip.rule]]
proto = "tcp"
port = 80
filter = "client_ip_port"
"#
        ),
        scripts: vec![],
    }
}

fn peer_state(lab: &common::Lab, node: usize, module: &str, peer: &str) -> Option<ModuleState> {
    let st = status(lab, node);
    st.module(module)?
        .peers
        .iter()
        .find(|p| p.node == peer)
        .and_then(|p| p.state)
}

#[test]
fn peers_see_module_states_and_detect_a_killed_daemon() {
    let _serial = serial();
    let mut lab = common::lab(
        "skhb1",
        11,
        2,
        vec![farm_module(Ipv4Addr::new(10, 77, 11, 200))],
    );
    lab.start_daemon(1).unwrap();
    lab.start_daemon(2).unwrap();

    // Both running, module stopped: each sees the other's STOP.
    assert!(
        wait_for(Duration::from_secs(3), || {
            peer_state(&lab, 1, "front", "node2") == Some(ModuleState::Stop)
                && peer_state(&lab, 2, "front", "node1") == Some(ModuleState::Stop)
        })
        .is_some(),
        "nodes never saw each other"
    );

    // Start on node1: node2 sees UP within two pulses.
    let out = lab.safekit(1, &["start", "-m", "front"]).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen = wait_for(Duration::from_secs(3), || {
        peer_state(&lab, 2, "front", "node1") == Some(ModuleState::Up)
    })
    .expect("node2 never saw node1 UP");
    assert!(
        seen <= 2 * PULSE,
        "node2 saw node1's UP after {seen:?}, more than two pulses"
    );

    // kill -9 node1's daemon: node2 reports it lost within timeout + a pulse.
    lab.kill_daemon(1);
    let lost = wait_for(Duration::from_secs(5), || {
        let st = status(&lab, 2);
        st.module("front")
            .and_then(|m| m.peers.iter().find(|p| p.node == "node1"))
            .is_some_and(|p| p.lost && p.state.is_none())
    })
    .expect("node2 never reported node1 lost");
    assert!(lost <= TIMEOUT + PULSE, "peer lost reported after {lost:?}");
    // And the CLI says so.
    let out = lab.safekit(2, &["state", "-m", "front"]).unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("node1: lost"), "{text}");
}

#[test]
#[expect(
    clippy::too_many_lines,
    reason = "one attack scenario, read top to bottom"
)]
fn forged_altered_truncated_and_replayed_heartbeats_are_dropped_and_counted() {
    let _serial = serial();
    let mut lab = common::lab(
        "skhb2",
        12,
        2,
        vec![farm_module(Ipv4Addr::new(10, 77, 12, 200))],
    );
    lab.start_daemon(1).unwrap();
    lab.start_daemon(2).unwrap();
    let out = lab.safekit(2, &["start", "-m", "front"]).unwrap();
    assert!(out.status.success());
    assert!(
        wait_for(Duration::from_secs(3), || peer_state(
            &lab, 1, "front", "node2"
        ) == Some(ModuleState::Up))
        .is_some()
    );

    let spec = lab.spec().clone();
    let (node1, node2) = (spec.node_addr(1), spec.node_addr(2));
    let metrics_addr = SocketAddr::from((node1, 9010));
    let ns1 = spec.node_ns(1);
    let before = http_get(&spec.client_ns(), metrics_addr, "/metrics").1;
    let received_before = metric(
        &before,
        "safekit_heartbeats_received_total{node=\"node1\",module=\"front\"}",
    )
    .unwrap();

    // A genuine heartbeat of node2, captured on node1's wire (already
    // accepted by node1): the material of the replay and alteration attacks.
    let genuine = common::in_netns(&ns1, move || {
        capture_heartbeat(node2, Duration::from_secs(3))
    });

    // Forged: the right format, the wrong key (the attacker lacks it),
    // claiming node2 says STOP.
    let forged = encode(
        &Heartbeat {
            cluster: "skhb2".into(),
            node: "node2".into(),
            module: "front".into(),
            state: ModuleState::Stop.code(),
            epoch: u64::MAX,
            counter: 1,
            payload: vec![],
        },
        &HeartbeatKey::derive(b"not the cluster key, 32 bytes long"),
    )
    .unwrap();
    let mut flipped = genuine.clone();
    flipped[5] ^= 0x01; // the state code
    let mut flipped_mac = genuine.clone();
    let last = flipped_mac.len() - 1;
    flipped_mac[last] ^= 0x80;
    let truncated = genuine[..genuine.len() - 7].to_vec();
    let replayed = genuine.clone();

    let client = spec.client_ns();
    common::in_netns(&client, move || {
        for _ in 0..3 {
            send_spoofed(node2, node1, &forged);
        }
        send_spoofed(node2, node1, &flipped);
        send_spoofed(node2, node1, &flipped_mac);
        for _ in 0..2 {
            send_spoofed(node2, node1, &truncated);
        }
        for _ in 0..4 {
            send_spoofed(node2, node1, &replayed);
        }
    });

    let expect = [("bad_mac", 5.0), ("truncated", 2.0), ("replay", 4.0)];
    let counted = wait_for(Duration::from_secs(3), || {
        let body = http_get(&client, metrics_addr, "/metrics").1;
        expect.iter().all(|(reason, n)| {
            metric(
                &body,
                &format!("safekit_heartbeats_rejected_total{{node=\"node1\",reason=\"{reason}\"}}"),
            ) == Some(*n)
        })
    });
    let body = http_get(&client, metrics_addr, "/metrics").1;
    assert!(
        counted.is_some(),
        "rejections not counted as expected:\n{body}"
    );
    // Nothing else was rejected, and nothing changed: node1 still sees
    // node2 UP, not lost, and its own module is still STOP.
    for reason in [
        "bad_version",
        "wrong_cluster",
        "unknown_node",
        "wrong_source",
        "unknown_module",
        "malformed",
    ] {
        assert_eq!(
            metric(
                &body,
                &format!("safekit_heartbeats_rejected_total{{node=\"node1\",reason=\"{reason}\"}}")
            ),
            Some(0.0),
            "{reason}"
        );
    }
    let st = status(&lab, 1);
    let front = st.module("front").unwrap();
    assert_eq!(front.state, ModuleState::Stop);
    let p = front.peers.iter().find(|p| p.node == "node2").unwrap();
    assert_eq!(p.state, Some(ModuleState::Up));
    assert!(!p.lost);
    // Genuine heartbeats kept being accepted meanwhile.
    let received_after = metric(
        &body,
        "safekit_heartbeats_received_total{node=\"node1\",module=\"front\"}",
    )
    .unwrap();
    assert!(received_after > received_before);
}

#[test]
fn ready_txt_is_404_for_stopped_and_unknown_modules_and_200_when_up() {
    let _serial = serial();
    let mut lab = common::lab(
        "skhb3",
        13,
        2,
        vec![farm_module(Ipv4Addr::new(10, 77, 13, 200))],
    );
    lab.start_daemon(1).unwrap();
    let spec = lab.spec().clone();
    let addr = SocketAddr::from((spec.node_addr(1), 9010));
    let client = spec.client_ns();
    assert_eq!(
        http_get(&client, addr, "/var/modules/front/ready.txt").0,
        404,
        "stopped module"
    );
    assert_eq!(
        http_get(&client, addr, "/var/modules/nosuch/ready.txt").0,
        404,
        "unknown module"
    );
    let out = lab.safekit(1, &["start", "-m", "front"]).unwrap();
    assert!(out.status.success());
    assert!(
        wait_for(Duration::from_secs(2), || http_get(
            &client,
            addr,
            "/var/modules/front/ready.txt"
        )
        .0 == 200)
        .is_some(),
        "UP module not ready"
    );
    // -lq exit code: UP = 2; and after stop, STOP = 0 and 404 again.
    assert_eq!(
        lab.safekit(1, &["state", "-m", "front", "-lq"])
            .unwrap()
            .status
            .code(),
        Some(2)
    );
    assert!(
        lab.safekit(1, &["stop", "-m", "front"])
            .unwrap()
            .status
            .success()
    );
    assert!(
        wait_for(Duration::from_secs(5), || {
            lab.safekit(1, &["state", "-m", "front", "-lq"])
                .unwrap()
                .status
                .code()
                == Some(0)
        })
        .is_some(),
        "module never reached STOP"
    );
    assert_eq!(
        http_get(&client, addr, "/var/modules/front/ready.txt").0,
        404
    );
}
