//! Farm modules across membership changes (issue 13): checkers of the
//! running service start after `start_both` and stop before `stop_both`; a
//! start during a stop waits for it; established connections stay on the
//! node that holds them while buckets move (join, graceful leave with its
//! drain, power change). Real daemons, XDP filters and clients in network
//! namespaces (prefixes `skfl1`.., subnets 10.77.101.0/24..).

mod common;

use std::time::Duration;

use common::{LabModule, demo_scripts_with, serial, status, wait_for};
use safekit::status::ModuleState;

/// A farm module `front` on VIP .200 port 80 with a tcp checker on the
/// service (`when = "both"` is the default of a tcp checker) and the demo
/// service started by `start_both` with `demo_args`; `stop_both` sleeps
/// `stop_sleep` after stopping the service.
fn front(subnet: u8, extra: &str, demo_args: &str, stop_sleep: &str) -> LabModule {
    let mut scripts = demo_scripts_with("start_both", "stop_both", "0.0.0.0:80", demo_args);
    if let Some((_, stop)) = scripts.iter_mut().find(|(n, _)| n == "stop_both") {
        *stop = stop.replace("exit 0\n", &format!("sleep {stop_sleep}\nexit 0\n"));
    }
    LabModule {
        name: "front".into(),
        toml: format!(
            r#"[service]
mode = "farm"

[farm]
pulse = "100ms"
{extra}

[vip]
addrs = ["10.77.{subnet}.200"]
[[vip.rule]]
proto = "tcp"
port = 80
filter = "client_ip_port"

[[check.tcp]]
host = "127.0.0.1"
port = 80
interval = "200ms"
timeout = "200ms"
"#
        ),
        scripts,
    }
}

fn module_log(lab: &common::Lab, node: usize) -> String {
    std::fs::read_to_string(lab.root(node).join("var/log/safekit/front.log")).unwrap_or_default()
}

fn state(lab: &common::Lab, node: usize) -> ModuleState {
    status(lab, node)
        .module("front")
        .expect("module front")
        .state
}

/// Items 3 and 4 of issue 13. The tcp checker probes the service that
/// `start_both` starts: it must never report it down, neither while the
/// node starts (before, it probed before `start_both` and held the start
/// in WAIT) nor while it stops (`stop_both` stops the service, then takes
/// a second). A start sent while the stop runs is accepted and the module
/// comes back UP once stopped, the service answering again.
#[test]
fn checkers_run_between_start_both_and_stop_both_and_a_start_waits_for_a_stop() {
    let _serial = serial();
    let mut lab = common::lab("skfl1", 101, 2, vec![front(101, "", "", "1")]);
    lab.start_daemon(1).unwrap();
    let ok = |out: std::process::Output| {
        assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    ok(lab.safekit(1, &["start", "-m", "front"]).unwrap());
    assert!(
        wait_for(Duration::from_secs(10), || state(&lab, 1)
            == ModuleState::Up)
        .is_some(),
        "never UP:\n{}",
        module_log(&lab, 1)
    );
    // Let the checker probe a few times while UP.
    std::thread::sleep(Duration::from_millis(600));

    // Stop, and start again while `stop_both` still runs.
    ok(lab.safekit(1, &["stop", "-m", "front"]).unwrap());
    assert!(
        wait_for(Duration::from_secs(5), || module_log(&lab, 1)
            .contains("stop_both"))
        .is_some(),
        "stop_both never ran:\n{}",
        module_log(&lab, 1)
    );
    let answer = ok(lab.safekit(1, &["start", "-m", "front"]).unwrap());
    assert!(
        answer.contains("once its stop completes"),
        "start during the stop: {answer}"
    );
    assert!(
        wait_for(Duration::from_secs(10), || {
            module_log(&lab, 1).contains("starting as requested during the stop")
                && state(&lab, 1) == ModuleState::Up
        })
        .is_some(),
        "not UP again after the stop:\n{}",
        module_log(&lab, 1)
    );
    let log = module_log(&lab, 1);
    // The stop completed (STOP) before the second start began.
    let stopped = log.find("-> STOP").expect("the module reached STOP");
    let restarted = log
        .find("starting as requested during the stop")
        .expect("restart line");
    assert!(stopped < restarted, "{log}");
    std::thread::sleep(Duration::from_millis(600));
    ok(lab.safekit(1, &["stop", "-m", "front"]).unwrap());
    assert!(
        wait_for(Duration::from_secs(10), || state(&lab, 1)
            == ModuleState::Stop)
        .is_some(),
        "never stopped"
    );
    let log = module_log(&lab, 1);
    assert!(
        !log.contains("is down"),
        "a checker reported the service down around start_both/stop_both:\n{log}"
    );
}
