//! Mirror module end to end with a `wait` checker (SPEC §5: WAIT is red
//! when a checker is down): real daemons in namespaces, a client namespace,
//! the demo TCP service started by `start_prim`.

mod common;

use std::{
    net::{Ipv4Addr, SocketAddr},
    time::Duration,
};

use common::{Lab, LabModule, ask, demo_scripts, in_netns, serial, status, wait_for};
use safekit::status::{Colour, ModuleState};

const PORT: u16 = 7000;

fn vip(subnet: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 77, subnet, 100)
}

/// A mirror module with a custom `pre` checker (action `wait` by default)
/// whose script just runs: the operator sets it with `safekit set`.
fn module(subnet: u8) -> LabModule {
    let mut scripts = demo_scripts("start_prim", "stop_prim", &format!("0.0.0.0:{PORT}"));
    scripts.push(("router".into(), "#!/bin/sh\nexec sleep 100000\n".into()));
    LabModule {
        name: "web".into(),
        toml: format!(
            r#"[service]
mode = "mirror"
defaultprim = "node1"
nodes = ["node1", "node2"]

[heart]
pulse = "100ms"
timeout = "1s"

[vip]
addrs = ["{}"]
garp_count = 3
garp_interval = "50ms"

[[check.custom]]
name = "router"
when = "pre"
"#,
            vip(subnet)
        ),
        scripts,
    }
}

fn module_status(lab: &Lab, node: usize) -> Option<(ModuleState, Colour)> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| status(lab, node)))
        .ok()
        .and_then(|s| s.module("web").map(|m| (m.state, m.colour)))
}

fn state(lab: &Lab, node: usize) -> Option<ModuleState> {
    module_status(lab, node).map(|(s, _)| s)
}

fn wait_states(lab: &Lab, want: &[(usize, ModuleState)], limit: Duration) -> bool {
    wait_for(limit, || {
        want.iter().all(|(n, s)| state(lab, *n) == Some(*s))
    })
    .is_some()
}

fn cli(lab: &Lab, node: usize, args: &[&str]) -> (bool, String) {
    let out = lab.safekit(node, args).unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn answer(lab: &Lab, subnet: u8, src_port: u16) -> Result<String, String> {
    let src = SocketAddr::from((lab.spec().client_addr(), src_port));
    let dst = SocketAddr::from((vip(subnet), PORT));
    in_netns(&lab.spec().client_ns(), move || ask(src, dst))
}

#[test]
fn a_wait_checker_down_on_the_primary_moves_the_service_and_holds_it_in_wait() {
    let _serial = serial();
    let subnet = 81;
    let mut lab = common::lab("skmc1", subnet, 2, vec![module(subnet)]);
    lab.start_daemon(1).unwrap();
    lab.start_daemon(2).unwrap();
    for n in [1, 2] {
        let (ok, text) = cli(&lab, n, &["start", "-m", "web"]);
        assert!(ok, "start on node{n}: {text}");
    }
    assert!(
        wait_states(
            &lab,
            &[(1, ModuleState::Prim), (2, ModuleState::Second)],
            Duration::from_secs(10)
        ),
        "not PRIM/SECOND: {:?} {:?}",
        state(&lab, 1),
        state(&lab, 2)
    );
    assert!(
        wait_for(Duration::from_secs(5), || answer(&lab, subnet, 40001)
            .as_deref()
            == Ok("node1"))
        .is_some(),
        "node1 serves the VIP"
    );

    // The checker goes down on the primary: node1 stops the application
    // and waits (red), node2 takes over and serves the VIP.
    let (ok, text) = cli(
        &lab,
        1,
        &["set", "-m", "web", "-r", "custom.router", "-v", "down"],
    );
    assert!(ok, "set down: {text}");
    assert!(
        wait_states(
            &lab,
            &[(1, ModuleState::Wait), (2, ModuleState::Alone)],
            Duration::from_secs(10)
        ),
        "not WAIT/ALONE: {:?} {:?}",
        module_status(&lab, 1),
        module_status(&lab, 2)
    );
    assert!(
        wait_for(Duration::from_secs(5), || answer(&lab, subnet, 40002)
            .as_deref()
            == Ok("node2"))
        .is_some(),
        "node2 serves the VIP: {:?}",
        answer(&lab, subnet, 40003)
    );
    assert_eq!(
        module_status(&lab, 1),
        Some((ModuleState::Wait, Colour::Red))
    );
    // It stays there: no prim while the checker is down.
    let (ok, text) = cli(&lab, 1, &["prim", "-m", "web"]);
    assert!(!ok && text.contains("custom.router"), "prim: {text}");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(state(&lab, 1), Some(ModuleState::Wait));
    assert_eq!(answer(&lab, subnet, 40004).as_deref(), Ok("node2"));

    // Up again: node1 becomes SECOND of node2, both green.
    let (ok, text) = cli(
        &lab,
        1,
        &["set", "-m", "web", "-r", "custom.router", "-v", "up"],
    );
    assert!(ok, "set up: {text}");
    assert!(
        wait_states(
            &lab,
            &[(1, ModuleState::Second), (2, ModuleState::Prim)],
            Duration::from_secs(10)
        ),
        "not SECOND/PRIM: {:?} {:?}",
        module_status(&lab, 1),
        module_status(&lab, 2)
    );
    assert_eq!(answer(&lab, subnet, 40005).as_deref(), Ok("node2"));
}
