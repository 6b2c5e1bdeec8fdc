//! `safekit config apply` and `config rollback` on a 3-node lab (issue 9,
//! SPEC §8): a checker interval and a script changed on node1 reach every
//! node, running modules never leave their state (sampled every 50 ms over
//! the whole window), `state -v` shows the new interval; a bad
//! configuration is refused on every node with its file, line and key, and
//! nothing is written; a node down during an apply is listed unreachable
//! and catches up with a later apply; a rollback restores the previous
//! version everywhere.

mod common;

use std::{
    fs,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use common::{Lab, LabModule, demo_scripts, serial, wait_for};
use safekit::{
    control::{self, Request, Response},
    status::ModuleState,
};

const MODULE: &str = "web";

fn module(subnet: u8, interval: &str) -> String {
    format!(
        r#"[service]
mode = "mirror"
defaultprim = "node1"
nodes = ["node1", "node2"]

[heart]
pulse = "100ms"
timeout = "1s"

[vip]
addrs = ["10.77.{subnet}.100"]
garp_count = 2
garp_interval = "50ms"

[[check.ping]]
host = "127.0.0.1"
interval = "{interval}"
timeout = "1s"
"#
    )
}

fn lab() -> Lab {
    let subnet = 171;
    common::lab(
        "skca1",
        subnet,
        3,
        vec![LabModule {
            name: MODULE.into(),
            toml: module(subnet, "1s"),
            scripts: demo_scripts("start_prim", "stop_prim", "0.0.0.0:8097"),
        }],
    )
}

fn state(sock: &std::path::Path) -> Option<ModuleState> {
    match control::call(sock, &Request::State, Duration::from_secs(1)) {
        Ok(Response::State { status }) => status.module(MODULE).map(|m| m.state),
        _ => None,
    }
}

fn module_dir(lab: &Lab, i: usize) -> PathBuf {
    lab.root(i).join("etc/safekit/modules").join(MODULE)
}

fn cli(lab: &Lab, i: usize, args: &[&str]) -> (i32, String) {
    let out = lab.safekit(i, args).expect("run safekit");
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Samples node1 PRIM and node2 SECOND every 50 ms until stopped; returns
/// every sample that was not.
struct Sampler {
    stop: Arc<AtomicBool>,
    bad: Arc<Mutex<Vec<String>>>,
    handle: Option<std::thread::JoinHandle<usize>>,
}

impl Sampler {
    fn start(lab: &Lab) -> Self {
        let socks: Vec<PathBuf> = (1..=2)
            .map(|i| lab.root(i).join("run/safekit/safekitd.sock"))
            .collect();
        let stop = Arc::new(AtomicBool::new(false));
        let bad = Arc::new(Mutex::new(Vec::new()));
        let (stop2, bad2) = (stop.clone(), bad.clone());
        let handle = std::thread::spawn(move || {
            let mut n = 0;
            while !stop2.load(Ordering::Relaxed) {
                let got = (state(&socks[0]), state(&socks[1]));
                if got != (Some(ModuleState::Prim), Some(ModuleState::Second)) {
                    bad2.lock().unwrap().push(format!("{got:?}"));
                }
                n += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
            n
        });
        Self {
            stop,
            bad,
            handle: Some(handle),
        }
    }

    fn finish(mut self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let n = self.handle.take().unwrap().join().expect("sampler");
        (n, self.bad.lock().unwrap().clone())
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[test]
#[expect(
    clippy::too_many_lines,
    reason = "one scenario: apply, bad config, node down, catch up, rollback"
)]
fn config_apply_reaches_every_node_without_changing_any_state() {
    let _serial = serial();
    let mut lab = lab();
    for i in 1..=3 {
        lab.start_daemon(i).expect("start safekitd");
    }
    for i in 1..=2 {
        let (code, text) = cli(&lab, i, &["start", "-m", MODULE]);
        assert_eq!(code, 0, "start on node{i}: {text}");
    }
    let s1 = lab.root(1).join("run/safekit/safekitd.sock");
    let s2 = lab.root(2).join("run/safekit/safekitd.sock");
    wait_for(Duration::from_secs(15), || {
        state(&s1) == Some(ModuleState::Prim) && state(&s2) == Some(ModuleState::Second)
    })
    .expect("node1 PRIM, node2 SECOND");

    // A checker interval and a script changed on node1, applied.
    let sampler = Sampler::start(&lab);
    let d1 = module_dir(&lab, 1);
    fs::write(d1.join("module.toml"), module(171, "3s")).expect("edit module.toml");
    let script = d1.join("bin/start_prim");
    let mut text = fs::read_to_string(&script).expect("read start_prim");
    text.push_str("# version 2\n");
    fs::write(&script, &text).expect("edit start_prim");
    let (code, out) = cli(&lab, 1, &["config", "apply"]);
    assert_eq!(code, 0, "config apply: {out}");
    for i in 1..=3 {
        assert!(out.contains(&format!("node{i}: applied")), "{out}");
    }
    assert!(out.contains("applied now: checkers"), "{out}");
    for i in 2..=3 {
        let d = module_dir(&lab, i);
        assert_eq!(
            fs::read_to_string(d.join("module.toml")).expect("read"),
            module(171, "3s"),
            "node{i}'s module.toml"
        );
        assert_eq!(
            fs::read_to_string(d.join("bin/start_prim")).expect("read"),
            text,
            "node{i}'s start_prim"
        );
    }
    for i in 1..=2 {
        let (_, v) = cli(&lab, i, &["state", "-m", MODULE, "-v"]);
        assert!(
            v.contains("ping 127.0.0.1 every 3s: up"),
            "node{i} state -v:\n{v}"
        );
    }
    std::thread::sleep(Duration::from_secs(2));
    let (n_samples, bad) = sampler.finish();
    assert!(
        bad.is_empty(),
        "states changed during the apply ({} of {n_samples} samples): {bad:?}",
        bad.len()
    );
    println!("apply: {n_samples} samples, node1 PRIM and node2 SECOND in every one");

    // A bad configuration: refused on every node, nothing written.
    let good = fs::read_to_string(d1.join("module.toml")).expect("read");
    let bad_toml = good.replace("pulse = \"100ms\"", "pulse = \"fast\"");
    fs::write(d1.join("module.toml"), &bad_toml).expect("edit");
    let (code, out) = cli(&lab, 1, &["config", "apply"]);
    assert_eq!(code, 1, "{out}");
    for i in 1..=3 {
        assert!(
            out.contains(&format!("node{i}: refused")),
            "node{i} not refused: {out}"
        );
    }
    assert!(
        out.contains("module.toml")
            && out.contains("heart.pulse")
            && out.contains("module.toml:7: heart.pulse"),
        "no file/line/key in: {out}"
    );
    for i in 2..=3 {
        assert_eq!(
            fs::read_to_string(module_dir(&lab, i).join("module.toml")).expect("read"),
            good,
            "node{i}'s module.toml changed by a refused apply"
        );
    }
    fs::write(d1.join("module.toml"), &good).expect("restore");

    // node3 down during an apply: unreachable; a later apply catches up.
    lab.kill_daemon(3);
    fs::write(d1.join("module.toml"), module(171, "2s")).expect("edit");
    let (code, out) = cli(&lab, 1, &["config", "apply"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("node3: unreachable"), "{out}");
    assert!(out.contains("node2: applied"), "{out}");
    assert_eq!(
        fs::read_to_string(module_dir(&lab, 3).join("module.toml")).expect("read"),
        module(171, "3s")
    );
    lab.start_daemon(3).expect("restart node3");
    let caught_up = wait_for(Duration::from_secs(10), || {
        let (code, out) = cli(&lab, 1, &["config", "apply"]);
        code == 0 && out.contains("node3: applied") && out.contains("node2: unchanged")
    });
    assert!(caught_up.is_some(), "node3 never caught up");
    assert_eq!(
        fs::read_to_string(module_dir(&lab, 3).join("module.toml")).expect("read"),
        module(171, "2s")
    );

    // Rollback: the version before the last change (3s), everywhere.
    let (code, out) = cli(&lab, 1, &["config", "rollback"]);
    assert_eq!(code, 0, "rollback: {out}");
    for i in 1..=3 {
        assert_eq!(
            fs::read_to_string(module_dir(&lab, i).join("module.toml")).expect("read"),
            module(171, "3s"),
            "node{i} after the rollback"
        );
    }
    assert_eq!(state(&s1), Some(ModuleState::Prim));
    assert_eq!(state(&s2), Some(ModuleState::Second));

    // An unauthenticated configuration is refused and counted nowhere.
    let resp = common::http_post_raw(
        &lab.spec().client_ns(),
        std::net::SocketAddr::from((lab.spec().node_addr(2), 9010)),
        "/internal/v1/config",
        b"{\"cluster_toml\":\"\",\"modules\":{}}",
    );
    assert!(resp.starts_with("HTTP/1.1 401"), "{resp}");
}
