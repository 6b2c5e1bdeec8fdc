//! safekitd as a service (SPEC §12): `boot = true`, the systemd
//! notifications (`READY`, `STATUS`, `WATCHDOG`, `STOPPING` on a
//! `NOTIFY_SOCKET` the test listens on, as systemd would), SIGTERM (what
//! `systemctl stop` sends) stopping every module cleanly, and a daemon
//! restarted after `kill -9` (what `Restart=on-failure` does) resuming by
//! the mirror rules. Real daemons in namespaces, a replicated directory,
//! the demo service started by `start_prim`, a client on the VIP.

mod common;

use std::{
    net::{Ipv4Addr, SocketAddr},
    os::unix::net::UnixDatagram,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use common::{Lab, LabModule, ask, demo_bin, has_vip, in_netns, serial, status, wait_for};
use safekit::status::{Colour, ModuleState};

const MODULE: &str = "web";
const DIR: &str = "/srv/data";
const PORT: u16 = 7000;
/// `WATCHDOG_USEC` given to the daemons: 2 s (pings due every second).
const WATCHDOG: Duration = Duration::from_secs(2);

fn vip(subnet: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 77, subnet, 100)
}

/// A replicated mirror module started at boot; its scripts record what
/// they did in `$SAFE_ROOT/events` and run the demo service.
fn module(subnet: u8) -> LabModule {
    let demo = demo_bin();
    LabModule {
        name: MODULE.into(),
        toml: format!(
            r#"[service]
mode = "mirror"
nodes = ["node1", "node2"]
boot = true

[heart]
pulse = "100ms"
timeout = "1s"

[vip]
addrs = ["{}"]
garp_count = 2
garp_interval = "50ms"

[rfs]
send_timeout = "1s"
[[rfs.dir]]
path = "{DIR}"
"#,
            vip(subnet)
        ),
        scripts: vec![
            (
                "start_prim".into(),
                format!(
                    "#!/bin/sh\necho \"start_prim $SAFE_NODE\" >> \"$SAFE_ROOT/events\"\n\"{}\" --listen 0.0.0.0:{PORT} --text \"$SAFE_NODE\" --pidfile \"$SAFE_ROOT/demo.pid\" >/dev/null 2>&1 &\n",
                    demo.display()
                ),
            ),
            (
                "stop_prim".into(),
                "#!/bin/sh\necho \"stop_prim $SAFE_NODE $1\" >> \"$SAFE_ROOT/events\"\n[ -f \"$SAFE_ROOT/demo.pid\" ] && kill \"$(cat \"$SAFE_ROOT/demo.pid\")\" 2>/dev/null\nrm -f \"$SAFE_ROOT/demo.pid\"\nexit 0\n".into(),
            ),
        ],
    }
}

/// A `NOTIFY_SOCKET` as systemd provides it: every datagram, stamped.
struct Notifications {
    path: PathBuf,
    got: Arc<Mutex<Vec<(Instant, String)>>>,
}

impl Notifications {
    fn listen(path: PathBuf) -> Self {
        let _ = std::fs::remove_file(&path);
        let sock = UnixDatagram::bind(&path).expect("bind the notify socket");
        let got = Arc::new(Mutex::new(Vec::new()));
        let store = Arc::clone(&got);
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            while let Ok(n) = sock.recv(&mut buf) {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                store.lock().unwrap().push((Instant::now(), text));
            }
        });
        Self { path, got }
    }

    fn env(&self) -> Vec<(String, String)> {
        vec![
            ("NOTIFY_SOCKET".into(), self.path.display().to_string()),
            ("WATCHDOG_USEC".into(), WATCHDOG.as_micros().to_string()),
        ]
    }

    /// Times of the messages holding line `line` (e.g. `READY=1`).
    fn times(&self, line: &str) -> Vec<Instant> {
        self.got
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, m)| m.lines().any(|l| l == line))
            .map(|(t, _)| *t)
            .collect()
    }

    /// Every `STATUS=` text received, in order.
    fn statuses(&self) -> Vec<String> {
        self.got
            .lock()
            .unwrap()
            .iter()
            .flat_map(|(_, m)| {
                m.lines()
                    .filter_map(|l| l.strip_prefix("STATUS="))
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            })
            .collect()
    }
}

fn start(lab: &mut Lab, node: usize, n: &Notifications) {
    let env = n.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    lab.start_daemon_with_env(node, &env).unwrap();
}

fn state(lab: &Lab, node: usize) -> Option<(ModuleState, Colour)> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| status(lab, node)))
        .ok()
        .and_then(|s| s.module(MODULE).map(|m| (m.state, m.colour)))
}

fn wait_states(lab: &Lab, want: &[(usize, ModuleState)], limit: Duration) -> bool {
    wait_for(limit, || {
        want.iter()
            .all(|(n, s)| state(lab, *n).map(|(st, _)| st) == Some(*s))
    })
    .is_some()
}

/// Both green PRIM/SECOND, one way or the other: the primary's number.
fn pair_in_sync(lab: &Lab) -> Option<usize> {
    let green = |n| {
        state(lab, n)
            .filter(|(_, c)| *c == Colour::Green)
            .map(|(s, _)| s)
    };
    match (green(1), green(2)) {
        (Some(ModuleState::Prim), Some(ModuleState::Second)) => Some(1),
        (Some(ModuleState::Second), Some(ModuleState::Prim)) => Some(2),
        _ => None,
    }
}

fn answer(lab: &Lab, subnet: u8, src_port: u16) -> Result<String, String> {
    let src = SocketAddr::from((lab.spec().client_addr(), src_port));
    let dst = SocketAddr::from((vip(subnet), PORT));
    in_netns(&lab.spec().client_ns(), move || ask(src, dst))
}

fn events(lab: &Lab, node: usize) -> Vec<String> {
    std::fs::read_to_string(lab.root(node).join("events"))
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn sigterm(lab: &mut Lab, node: usize) -> std::process::ExitStatus {
    let pid = lab.daemon_pid(node).expect("daemon running");
    // SAFETY: kill(2) of the daemon this test started; no memory involved.
    let rc = unsafe { libc::kill(i32::try_from(pid).unwrap(), libc::SIGTERM) };
    assert_eq!(rc, 0);
    lab.wait_daemon(node, Duration::from_secs(30))
        .expect("safekitd exits after SIGTERM")
}

/// Samples both nodes for `window`: neither is ever primary.
fn never_primary(lab: &Lab, nodes: &[usize], window: Duration) -> Result<usize, String> {
    let end = Instant::now() + window;
    let mut samples = 0;
    while Instant::now() < end {
        for &n in nodes {
            if let Some((s @ (ModuleState::Alone | ModuleState::Prim), _)) = state(lab, n) {
                return Err(format!("node{n} went {s:?}"));
            }
        }
        samples += 1;
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(samples)
}

/// `DIR/name` of node `node` as its daemon (and application) sees it.
fn data(lab: &Lab, node: usize, name: &str) -> PathBuf {
    lab.node_view(
        node,
        &lab.root(node).join(DIR.trim_start_matches('/')).join(name),
    )
    .expect("daemon running")
}

fn write_file(lab: &Lab, node: usize, name: &str, text: &str) {
    let p = data(lab, node, name);
    std::fs::write(&p, text).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
}

#[test]
#[expect(
    clippy::too_many_lines,
    reason = "one story: boot, prim, stop, boot on stale data, restart after kill -9"
)]
fn boot_modules_start_under_the_mirror_rules_and_sigterm_stops_them_cleanly() {
    let _serial = serial();
    let subnet = 111;
    let mut lab = common::lab("skpk1", subnet, 2, vec![module(subnet)]);
    for n in [1, 2] {
        std::fs::create_dir_all(lab.root(n).join(DIR.trim_start_matches('/'))).unwrap();
    }
    let notes: Vec<Notifications> = [1, 2]
        .iter()
        .map(|n| Notifications::listen(lab.dir().join(format!("notify{n}.sock"))))
        .collect();
    start(&mut lab, 1, &notes[0]);
    start(&mut lab, 2, &notes[1]);

    // READY once the module is loaded and, boot = true, already started.
    for (i, n) in notes.iter().enumerate() {
        assert!(
            wait_for(Duration::from_secs(10), || !n.times("READY=1").is_empty()).is_some(),
            "no READY=1 from node{}",
            i + 1
        );
        let st = state(&lab, i + 1);
        assert!(
            matches!(st, Some((s, _)) if s != ModuleState::Stop),
            "node{}: module not started by boot = true at READY: {st:?}",
            i + 1
        );
    }
    // First start of a replicated module: no copy is known up to date, so
    // both wait (never the application on data that may be stale) until
    // the operator names the reference, as SafeKit's first start asks.
    let waited = (1..=20).all(|_| {
        std::thread::sleep(Duration::from_millis(50));
        [1, 2]
            .iter()
            .all(|n| matches!(state(&lab, *n), Some((ModuleState::Wait, _))))
    });
    assert!(
        waited,
        "a first boot went primary by itself: {:?} {:?}",
        state(&lab, 1),
        state(&lab, 2)
    );
    let out = lab
        .safekit(1, &["prim", "-m", "web"])
        .expect("safekit prim");
    assert!(
        out.status.success(),
        "prim on node1: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let Some(p) = wait_for(Duration::from_secs(20), || pair_in_sync(&lab).is_some())
        .and_then(|_| pair_in_sync(&lab))
    else {
        panic!(
            "boot = true did not give PRIM/SECOND: {:?} {:?}",
            state(&lab, 1),
            state(&lab, 2)
        );
    };
    let s = 3 - p;
    let name = |n: usize| format!("node{n}");
    assert!(
        wait_for(Duration::from_secs(5), || answer(&lab, subnet, 41001)
            == Ok(name(p)))
        .is_some(),
        "the client does not reach node{p}"
    );
    let prim_status = format!("node{p}: web PRIM (green)");
    assert!(
        wait_for(Duration::from_secs(3), || notes[p - 1]
            .statuses()
            .contains(&prim_status))
        .is_some(),
        "STATUS= of node{p}: {:?}",
        notes[p - 1].statuses()
    );
    println!("boot = true on both: node{p} PRIM, node{s} SECOND");
    // The watchdog: pinged from the engine loop, never a gap as long as
    // WATCHDOG_USEC (systemd would kill the daemon).
    assert!(
        wait_for(Duration::from_secs(10), || notes[p - 1]
            .times("WATCHDOG=1")
            .len()
            >= 4)
        .is_some(),
        "watchdog pings: {}",
        notes[p - 1].times("WATCHDOG=1").len()
    );
    let pings = notes[p - 1].times("WATCHDOG=1");
    let worst = pings
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default();
    assert!(worst < WATCHDOG, "watchdog gap {worst:?}");
    println!("watchdog: {} pings, longest gap {worst:?}", pings.len());

    write_file(&lab, p, "one", "written by the first primary");

    // SIGTERM (systemctl stop) on the primary: stop_prim, VIP removed,
    // exit 0; the secondary takes over.
    let exit = sigterm(&mut lab, p);
    assert!(exit.success(), "safekitd exit after SIGTERM: {exit}");
    assert!(
        !notes[p - 1].times("STOPPING=1").is_empty(),
        "no STOPPING=1"
    );
    assert!(
        events(&lab, p).contains(&format!("stop_prim node{p} ")),
        "stop_prim did not run on node{p}: {:?}",
        events(&lab, p)
    );
    assert!(!has_vip(&lab, p, vip(subnet)), "the VIP stayed on node{p}");
    assert!(
        wait_states(&lab, &[(s, ModuleState::Alone)], Duration::from_secs(10)),
        "node{s} did not take over: {:?}",
        state(&lab, s)
    );
    assert!(
        wait_for(Duration::from_secs(5), || answer(&lab, subnet, 41002)
            == Ok(name(s)))
        .is_some(),
        "the client does not reach node{s}"
    );
    let copy = data(&lab, s, "one");
    assert_eq!(
        std::fs::read_to_string(&copy).unwrap(),
        "written by the first primary"
    );
    write_file(&lab, s, "two", "written alone");
    let exit = sigterm(&mut lab, s);
    assert!(exit.success(), "node{s} exit after SIGTERM: {exit}");
    assert!(!has_vip(&lab, s, vip(subnet)), "the VIP stayed on node{s}");

    // The first primary boots alone: its data is stale (the other went on
    // alone), so it waits, and never starts the application.
    let before = events(&lab, p).len();
    start(&mut lab, p, &notes[p - 1]);
    let samples = never_primary(&lab, &[p], Duration::from_secs(3)).unwrap();
    assert_eq!(state(&lab, p).map(|st| st.0), Some(ModuleState::Wait));
    assert_eq!(
        events(&lab, p).len(),
        before,
        "node{p} ran a script on stale data"
    );
    println!("node{p} booted alone on stale data: WAIT over {samples} samples");

    // The other boots: it has the newer data and becomes primary; the
    // first is resynchronised and gets what was written meanwhile.
    start(&mut lab, s, &notes[s - 1]);
    assert!(
        wait_for(Duration::from_secs(20), || pair_in_sync(&lab) == Some(s)).is_some(),
        "node{s} not PRIM with node{p} SECOND: {:?} {:?}",
        state(&lab, 1),
        state(&lab, 2)
    );
    let copy = data(&lab, p, "two");
    assert_eq!(std::fs::read_to_string(&copy).unwrap(), "written alone");

    // kill -9 of the primary's daemon, restarted at once as systemd's
    // Restart=on-failure does: the module resumes by the mirror rules,
    // one primary, the VIP on it only.
    lab.kill_daemon(s);
    start(&mut lab, s, &notes[s - 1]);
    let primary = wait_for(Duration::from_secs(30), || pair_in_sync(&lab).is_some())
        .and_then(|_| pair_in_sync(&lab));
    let Some(now) = primary else {
        panic!(
            "no PRIM/SECOND after the restart: {:?} {:?}",
            state(&lab, 1),
            state(&lab, 2)
        );
    };
    let other = 3 - now;
    assert!(
        wait_for(Duration::from_secs(5), || has_vip(&lab, now, vip(subnet))
            && !has_vip(&lab, other, vip(subnet)))
        .is_some(),
        "VIP on node{now} only"
    );
    assert!(
        wait_for(Duration::from_secs(5), || answer(&lab, subnet, 41003)
            == Ok(name(now)))
        .is_some(),
        "the client does not reach node{now}"
    );
    println!(
        "after kill -9 of node{s}'s daemon and its restart: node{now} PRIM, node{other} SECOND"
    );
}

/// `safekit` of this build with node `node`'s root, outside any namespace
/// (the log and the control socket are files).
fn safekit_cmd(lab: &Lab, node: usize) -> std::process::Command {
    let mut c = std::process::Command::new(common::lab::bin_dir().join("safekit"));
    c.arg("--root").arg(lab.root(node));
    c
}

/// `safekit logview -f`, killed (by its pid) when the test ends, passed or
/// not.
struct Follower(std::process::Child);

impl Drop for Follower {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn logview_follows_the_module_log_and_every_command_is_recorded_with_its_caller() {
    use std::io::BufRead as _;
    let _serial = serial();
    let subnet = 112;
    let mut lab = common::lab("skpk2", subnet, 2, vec![module(subnet)]);
    // boot = true off here: the commands start and stop the module.
    let toml = lab.root(1).join("etc/safekit/modules/web/module.toml");
    let text = std::fs::read_to_string(&toml)
        .unwrap()
        .replace("boot = true", "boot = false")
        .replace(
            "[rfs]\nsend_timeout = \"1s\"\n[[rfs.dir]]\npath = \"/srv/data\"\n",
            "",
        );
    std::fs::write(&toml, text).unwrap();
    lab.start_daemon(1).unwrap();
    let log = lab.root(1).join("var/log/safekit/web.log");
    // The daemon's own start lines are written before the follower starts
    // (its control socket is up a little before the engine logs them).
    assert!(
        wait_for(Duration::from_secs(5), || std::fs::read_to_string(&log)
            .is_ok_and(|t| t.contains("module loaded")))
        .is_some(),
        "no start line in {}",
        log.display()
    );

    // logview -f -n 0: only what is written from now on, across a rotation.
    let mut follower = Follower(
        safekit_cmd(&lab, 1)
            .args(["logview", "-m", MODULE, "-f", "-n", "0"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let seen = Arc::new(Mutex::new(Vec::<String>::new()));
    let store = Arc::clone(&seen);
    let stdout = follower.0.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            store.lock().unwrap().push(line);
        }
    });
    let has = |what: &str| seen.lock().unwrap().iter().any(|l| l.ends_with(what));
    std::thread::sleep(Duration::from_millis(500));
    let ok = |c: &mut std::process::Command| {
        let out = c.output().unwrap();
        assert!(out.status.success(), "{c:?}: {out:?}");
    };
    ok(safekit_cmd(&lab, 1).args(["printi", "-m", MODULE, "first line"]));
    ok(safekit_cmd(&lab, 1).args(["start", "-m", MODULE]));
    assert!(
        wait_for(Duration::from_secs(5), || has("| I | first line")
            && has("| I | start requested"))
        .is_some(),
        "logview -f: {:?}",
        seen.lock().unwrap()
    );
    // Rotated as logrotate does (rename; the next line makes a new file).
    std::fs::rename(&log, log.with_extension("log.1")).unwrap();
    ok(safekit_cmd(&lab, 1).args(["printi", "-m", MODULE, "after rotation"]));
    ok(safekit_cmd(&lab, 1).args(["stop", "-m", MODULE]));
    assert!(
        wait_for(Duration::from_secs(5), || has("| I | after rotation")
            && has("| I | command Stop"))
        .is_some(),
        "logview -f after the rotation: {:?}",
        seen.lock().unwrap()
    );
    drop(follower);
    let _ = reader.join();
    let seen = seen.lock().unwrap().clone();
    assert!(
        !seen.iter().any(|l| l.contains("module loaded")),
        "-n 0 printed older lines: {seen:?}"
    );
    let first = seen.iter().position(|l| l.ends_with("first line"));
    let rotated = seen.iter().position(|l| l.ends_with("after rotation"));
    assert!(first < rotated, "out of order: {seen:?}");

    // logview -n 2: the last two lines of the log, newest last.
    let out = safekit_cmd(&lab, 1)
        .args(["logview", "-m", MODULE, "-n", "2"])
        .output()
        .unwrap();
    let file = std::fs::read_to_string(&log).unwrap();
    let last2: Vec<&str> = file
        .lines()
        .rev()
        .take(2)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .collect::<Vec<_>>(),
        last2
    );

    commands_log_records_caller_command_and_result(&lab);
}

/// The commands log: time, caller (`SO_PEERCRED`), command, result; the
/// module was started and stopped once by root before.
fn commands_log_records_caller_command_and_result(lab: &Lab) {
    let ok = |c: &mut std::process::Command| {
        let out = c.output().unwrap();
        assert!(out.status.success(), "{c:?}: {out:?}");
    };
    let mut refused = safekit_cmd(lab, 1)
        .args(["swap", "-m", MODULE])
        .spawn()
        .unwrap();
    let refused_pid = refused.id();
    assert!(!refused.wait().unwrap().success());
    ok(safekit_cmd(lab, 1).args(["state"]));
    // Another user, through a socket opened to it for the test.
    let sock = lab.root(1).join("run/safekit/safekitd.sock");
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    }
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(common::lab::bin_dir().join("safekit"))
        .arg("--root")
        .arg(lab.root(1))
        .args(["start", "-m", MODULE])
        .output()
        .unwrap();
    assert!(out.status.success(), "start as uid 65534: {out:?}");
    let commands =
        std::fs::read_to_string(lab.root(1).join("var/log/safekit/commands.log")).unwrap();
    let lines: Vec<Vec<&str>> = commands.lines().map(|l| l.split(" | ").collect()).collect();
    println!("commands.log:\n{commands}");
    let entries: Vec<(&str, &str, &str)> = lines
        .iter()
        .map(|f| {
            assert_eq!(f.len(), 4, "time | caller | command | result: {f:?}");
            assert!(humantime::parse_rfc3339(f[0]).is_ok(), "time {:?}", f[0]);
            (f[1], f[2], f[3])
        })
        .collect();
    let find = |cmd: &str, n: usize| {
        entries
            .iter()
            .filter(|e| e.1 == cmd)
            .nth(n)
            .copied()
            .unwrap_or_else(|| panic!("no {cmd:?} #{n} in {commands}"))
    };
    let (caller, _, result) = find("start -m web", 0);
    assert!(caller.starts_with("uid 0 pid "), "{caller}");
    assert!(result.starts_with("ok: "), "{result}");
    assert!(find("stop -m web", 0).2.starts_with("ok: "));
    let (caller, _, result) = find("swap -m web", 0);
    assert_eq!(caller, format!("uid 0 pid {refused_pid}"));
    assert!(result.starts_with("error: "), "{result}");
    let (caller, _, result) = find("start -m web", 1);
    assert!(caller.starts_with("uid 65534 pid "), "{caller}");
    assert!(result.starts_with("ok: "), "{result}");
    assert!(
        !entries.iter().any(|e| e.1 == "state"),
        "read-only queries are not commands: {commands}"
    );
    assert_eq!(entries.len(), 4, "{commands}");
}
