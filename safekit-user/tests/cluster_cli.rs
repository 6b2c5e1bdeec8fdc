//! The `safekit` command line against real daemons (issue: foundation):
//!
//! - `state -m AM -lq` exit codes STOP 0, WAIT 1, ALONE 2, PRIM 3, SECOND 4
//!   on a two-node mirror module, with `ready.txt` 200 on PRIM and ALONE,
//!   404 on SECOND, WAIT and STOP; `state` and `state -v` show mode, state
//!   and the peer's state;
//! - an unknown module exits 64, never a state code, and names the module;
//! - `log`, `printi`, `printe`, `shutdown`;
//! - `config check --root DIR` on a bad config dir and on the shipped
//!   examples.

mod common;

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use common::{Lab, LabModule, demo_scripts, http_get, serial, wait_for};

/// Exit code of a bad command line or an unknown module.
const EXIT_USAGE: i32 = 64;

/// The mirror module `web`: no replicated directory, no VIP, short timeouts.
fn web(service_extra: &str, scripts: Vec<(String, String)>) -> LabModule {
    LabModule {
        name: "web".into(),
        toml: format!(
            r#"[service]
mode = "mirror"
defaultprim = "node1"
nodes = ["node1", "node2"]
{service_extra}
[heart]
pulse = "100ms"
timeout = "1s"
"#
        ),
        scripts,
    }
}

/// A farm module that stays stopped (listed by `safekit state`).
fn front(vip: Ipv4Addr) -> LabModule {
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
filter = "client_ip"
"#
        ),
        scripts: vec![],
    }
}

/// What one `safekit` run gave.
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn safekit(lab: &Lab, node: usize, args: &[&str]) -> Run {
    let out = lab.safekit(node, args).expect("running safekit");
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `safekit state -m web -lq` on `node`: its exit code.
fn lq(lab: &Lab, node: usize) -> Option<i32> {
    safekit(lab, node, &["state", "-m", "web", "-lq"]).code
}

/// Waits until every `(node, exit code of -lq)` holds.
fn wait_lq(lab: &Lab, want: &[(usize, i32)], limit: Duration) -> bool {
    wait_for(limit, || want.iter().all(|(n, c)| lq(lab, *n) == Some(*c))).is_some()
}

/// HTTP status of `ready.txt` of `web` on `node`, asked from the client.
fn ready(lab: &Lab, node: usize) -> u16 {
    let spec = lab.spec();
    http_get(
        &spec.client_ns(),
        SocketAddr::from((spec.node_addr(node), 9010)),
        "/var/modules/web/ready.txt",
    )
    .0
}

/// The line of `module` in `safekit state` output.
fn line_of<'a>(text: &'a str, module: &str) -> &'a str {
    text.lines()
        .find(|l| l.split_whitespace().next() == Some(module))
        .unwrap_or_else(|| panic!("no line for {module} in:\n{text}"))
}

const STOP: i32 = 0;
const WAIT: i32 = 1;
const ALONE: i32 = 2;
const PRIM: i32 = 3;
const SECOND: i32 = 4;

#[test]
#[expect(
    clippy::too_many_lines,
    reason = "one cluster walked through every state, read top to bottom"
)]
fn state_lq_exit_codes_ready_txt_and_state_output_of_a_mirror_module() {
    let _serial = serial();
    let subnet = 51;
    let mut lab = common::lab(
        "skcl1",
        subnet,
        2,
        vec![
            web("failover = false", vec![]),
            front(Ipv4Addr::new(10, 77, subnet, 200)),
        ],
    );
    lab.start_daemon(1).unwrap();
    lab.start_daemon(2).unwrap();

    // STOP on both: exit 0, not ready.
    for n in [1, 2] {
        assert_eq!(lq(&lab, n), Some(STOP), "node{n} STOP");
        assert_eq!(ready(&lab, n), 404, "node{n} STOP ready.txt");
    }

    // Both started: node1 (defaultprim) PRIM 3, node2 SECOND 4.
    for n in [1, 2] {
        let r = safekit(&lab, n, &["start", "-m", "web"]);
        assert_eq!(r.code, Some(0), "start on node{n}: {}", r.stderr);
    }
    assert!(
        wait_lq(&lab, &[(1, PRIM), (2, SECOND)], Duration::from_secs(10)),
        "not PRIM/SECOND: -lq gives {:?} {:?}",
        lq(&lab, 1),
        lq(&lab, 2)
    );
    assert_eq!(ready(&lab, 1), 200, "PRIM is ready");
    assert_eq!(ready(&lab, 2), 404, "SECOND is not ready");

    // `safekit state`: every module with its mode, local state (and colour,
    // stdout not being a terminal) and the peer's state.
    let r = safekit(&lab, 1, &["state"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(
        r.stdout.starts_with("node node1 (cluster skcl1)"),
        "{}",
        r.stdout
    );
    let w = line_of(&r.stdout, "web");
    for part in ["mirror", "PRIM (green)", "node2: SECOND"] {
        assert!(w.contains(part), "{part:?} missing in {w:?}");
    }
    let f = line_of(&r.stdout, "front");
    for part in ["farm", "STOP (red)", "node2: STOP"] {
        assert!(f.contains(part), "{part:?} missing in {f:?}");
    }
    let r = safekit(&lab, 2, &["state"]);
    let w = line_of(&r.stdout, "web");
    for part in ["mirror", "SECOND (green)", "node1: PRIM"] {
        assert!(w.contains(part), "{part:?} missing in {w:?}");
    }
    // -l: local state only.
    let r = safekit(&lab, 2, &["state", "-m", "web", "-l"]);
    let w = line_of(&r.stdout, "web");
    assert!(w.contains("SECOND") && !w.contains("node1"), "{w:?}");

    // `state -v`: the peer's state and when it was last heard.
    let r = safekit(&lab, 1, &["state", "-m", "web", "-v"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(
        r.stdout
            .contains("peer node2: SECOND last heartbeat: default "),
        "{}",
        r.stdout
    );
    assert!(!r.stdout.contains("front"), "-m web shows web only");
    let r = safekit(&lab, 2, &["state", "-m", "web", "-v"]);
    assert!(
        r.stdout
            .contains("peer node1: PRIM last heartbeat: default "),
        "{}",
        r.stdout
    );

    // The primary dies; with `failover = false` the secondary cannot decide
    // by itself: WAIT 1 (and it stays there), not ready.
    lab.kill_daemon(1);
    assert!(
        wait_lq(&lab, &[(2, WAIT)], Duration::from_secs(5)),
        "node2 not WAIT: {:?}",
        lq(&lab, 2)
    );
    std::thread::sleep(Duration::from_millis(2000)); // > heartbeat timeout
    assert_eq!(lq(&lab, 2), Some(WAIT), "node2 must stay WAIT");
    assert_eq!(ready(&lab, 2), 404, "WAIT is not ready");
    let r = safekit(&lab, 2, &["state", "-m", "web"]);
    let w = line_of(&r.stdout, "web");
    assert!(w.contains("WAIT (") && w.contains("node1: lost"), "{w:?}");

    // node1 (up-to-date data) returns: PRIM 3 / SECOND 4 again.
    lab.start_daemon(1).unwrap();
    let r = safekit(&lab, 1, &["start", "-m", "web"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(
        wait_lq(&lab, &[(1, PRIM), (2, SECOND)], Duration::from_secs(10)),
        "after node1's return: {:?} {:?}",
        lq(&lab, 1),
        lq(&lab, 2)
    );

    // The secondary dies: the primary goes on ALONE 2, still ready.
    lab.kill_daemon(2);
    assert!(
        wait_lq(&lab, &[(1, ALONE)], Duration::from_secs(5)),
        "node1 not ALONE: {:?}",
        lq(&lab, 1)
    );
    assert_eq!(ready(&lab, 1), 200, "ALONE is ready");
    let r = safekit(&lab, 1, &["state", "-m", "web", "-v"]);
    let w = line_of(&r.stdout, "web");
    assert!(
        w.contains("ALONE (green)") && w.contains("node2: lost"),
        "{w:?}"
    );

    // Stopped: STOP 0, not ready.
    let r = safekit(&lab, 1, &["stop", "-m", "web"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(
        wait_lq(&lab, &[(1, STOP)], Duration::from_secs(5)),
        "node1 not STOP: {:?}",
        lq(&lab, 1)
    );
    assert_eq!(ready(&lab, 1), 404, "STOP is not ready");
}

/// True while process `pid` exists.
fn alive(pid: i32) -> bool {
    // SAFETY: kill(2) with signal 0 only checks the pid; no memory involved.
    unsafe { libc::kill(pid, 0) == 0 }
}

#[test]
#[expect(
    clippy::too_many_lines,
    reason = "one node's life through the CLI, read top to bottom"
)]
fn unknown_module_log_print_and_shutdown() {
    let _serial = serial();
    let subnet = 52;
    let mut lab = common::lab(
        "skcl2",
        subnet,
        2,
        vec![web(
            "",
            demo_scripts("start_prim", "stop_prim", "0.0.0.0:7000"),
        )],
    );
    let tag = std::process::id();

    // Without a daemon: a configured module is STOP, an unknown one is not a
    // state; printi already works (the log is a file of the node).
    assert_eq!(lq(&lab, 1), Some(STOP));
    let r = safekit(&lab, 1, &["state", "-m", "nosuch", "-lq"]);
    assert_eq!(r.code, Some(EXIT_USAGE), "{}", r.stderr);
    assert!(r.stderr.contains("\"nosuch\""), "{}", r.stderr);
    let before = format!("before the daemon {tag}");
    assert_eq!(
        safekit(&lab, 1, &["printi", "-m", "web", &before]).code,
        Some(0)
    );

    lab.start_daemon(1).unwrap();

    // Unknown module, daemon running: 64 everywhere, the message names it
    // (and the modules there are).
    for args in [
        &["state", "-m", "nosuch", "-lq"][..],
        &["state", "-m", "nosuch"],
        &["state", "-m", "nosuch", "-v"],
        &["start", "-m", "nosuch"],
        &["stop", "-m", "nosuch"],
        &["prim", "-m", "nosuch"],
        &["waitstart", "-m", "nosuch", "--timeout", "1"],
        &["log", "-m", "nosuch"],
        &["printi", "-m", "nosuch", "hello"],
        &["printe", "-m", "nosuch", "hello"],
    ] {
        let r = safekit(&lab, 1, args);
        assert_eq!(r.code, Some(EXIT_USAGE), "{args:?}: {}", r.stderr);
        assert!(
            r.stderr.contains("no module \"nosuch\""),
            "{args:?}: {}",
            r.stderr
        );
    }
    let r = safekit(&lab, 1, &["state", "-m", "nosuch", "-lq"]);
    assert!(r.stderr.contains("(modules: web)"), "{}", r.stderr);
    // Bad command lines are not state codes either (clap's 2 is ALONE/UP).
    for args in [
        &["state", "-q"][..],
        &["state", "-m", "web", "-lq", "--bogus"],
        &["printi", "-m", "../../x", "hello"],
    ] {
        let r = safekit(&lab, 1, args);
        assert_eq!(r.code, Some(EXIT_USAGE), "{args:?}: {}", r.stderr);
    }
    assert_eq!(safekit(&lab, 1, &["--help"]).code, Some(0));

    // The only node up: WAIT, then ALONE after the heartbeat timeout (its
    // data is the reference: it never ran); the application runs.
    let r = safekit(&lab, 1, &["start", "-m", "web"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(
        wait_lq(&lab, &[(1, ALONE)], Duration::from_secs(5)),
        "not ALONE: {:?}",
        lq(&lab, 1)
    );
    let pid_file = lab.root(1).join("demo.pid");
    let demo = wait_for(Duration::from_secs(5), || pid_file.exists())
        .and_then(|_| std::fs::read_to_string(&pid_file).ok())
        .and_then(|p| p.trim().parse::<i32>().ok())
        .expect("start_prim ran the demo service");
    assert!(
        wait_for(Duration::from_secs(2), || alive(demo)).is_some(),
        "demo service not running"
    );

    // The start script's own output is in the log before what follows
    // (it returns once the service listens, then its output is logged).
    assert!(
        wait_for(Duration::from_secs(5), || {
            safekit(&lab, 1, &["log", "-m", "web"])
                .stdout
                .contains("demo service started on node1")
        })
        .is_some(),
        "start_prim's output never reached the log"
    );

    // printi / printe lines land in the module log, marked I and E; `log`
    // shows them with the daemon's own lines.
    let info = format!("an information line {tag}");
    let error = format!("an error line {tag}");
    let r = safekit(&lab, 1, &["printi", "-m", "web", &info]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let r = safekit(&lab, 1, &["printe", "-m", "web", &error]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let r = safekit(&lab, 1, &["log", "-m", "web"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let log = r.stdout;
    let find = |text: &str| {
        log.lines()
            .find(|l| l.ends_with(text))
            .unwrap_or_else(|| panic!("{text:?} not in the log:\n{log}"))
            .to_owned()
    };
    assert!(find(&before).contains(" | I | "), "{log}");
    assert!(find(&info).contains(" | I | "), "{log}");
    assert!(find(&error).contains(" | E | "), "{log}");
    assert!(log.contains("start requested"), "daemon lines: {log}");
    assert!(
        log.contains("demo service started on node1"),
        "script output: {log}"
    );
    // Stamped, in order.
    let pos = |t: &str| log.find(t).unwrap();
    assert!(pos(&before) < pos("start requested") && pos(&info) < pos(&error));
    let r = safekit(&lab, 1, &["log", "-m", "web", "-n", "1"]);
    assert_eq!(r.stdout.lines().count(), 1, "{}", r.stdout);
    assert!(r.stdout.trim_end().ends_with(&error), "{}", r.stdout);

    // `safekit state`: the module, its mode and state, the peer never heard.
    let r = safekit(&lab, 1, &["state"]);
    let w = line_of(&r.stdout, "web");
    for part in ["mirror", "ALONE (green)", "node2: unknown"] {
        assert!(w.contains(part), "{part:?} missing in {w:?}");
    }

    // shutdown: the module is stopped (stop_prim ran), the daemon exits 0,
    // its control socket is gone.
    let r = safekit(&lab, 1, &["shutdown"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(r.stdout.contains("shutting down"), "{}", r.stdout);
    let status = lab
        .wait_daemon(1, Duration::from_secs(30))
        .expect("safekitd still running 30 s after shutdown");
    assert!(status.success(), "safekitd exited with {status}");
    assert!(
        !lab.root(1).join("run/safekit/safekitd.sock").exists(),
        "control socket left behind"
    );
    assert!(
        wait_for(Duration::from_secs(5), || !alive(demo)).is_some(),
        "the application still runs after shutdown"
    );
    assert!(!pid_file.exists(), "stop_prim did not run");
    let log = safekit(&lab, 1, &["log", "-m", "web"]).stdout;
    assert!(log.contains("stopping: safekitd shutdown"), "{log}");
    // Nothing runs: STOP; the unknown module is still no state.
    assert_eq!(lq(&lab, 1), Some(STOP));
    let r = safekit(&lab, 1, &["state", "-m", "nosuch", "-lq"]);
    assert_eq!(r.code, Some(EXIT_USAGE), "{}", r.stderr);
    let r = safekit(&lab, 1, &["state"]);
    assert_eq!(r.code, Some(1), "no daemon: {}", r.stderr);
    assert!(r.stderr.contains("cannot reach safekitd"), "{}", r.stderr);
}

/// A config root in the temp dir, removed on drop.
struct TempRoot(PathBuf);

impl TempRoot {
    fn new(name: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("safekit-test-skcl3-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("etc/safekit/modules")).unwrap();
        Self(dir)
    }

    fn etc(&self) -> PathBuf {
        self.0.join("etc/safekit")
    }

    fn write(&self, rel: &str, text: &str) {
        let p = self.etc().join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    fn key(&self) {
        use std::os::unix::fs::PermissionsExt as _;
        let p = self.etc().join("cluster.key");
        std::fs::write(&p, [0x5a; 32]).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    }

    /// `safekit config check --root DIR`.
    fn check(&self) -> Run {
        let out = Command::new(env!("CARGO_BIN_EXE_safekit"))
            .args(["config", "check", "--root"])
            .arg(&self.0)
            .env_remove("SAFEKIT_ROOT")
            .output()
            .unwrap();
        Run {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

impl Drop for TempRoot {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn shipped(rel: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../conf")
        .join(rel);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn config_check_passes_the_shipped_examples() {
    let root = TempRoot::new("good");
    root.write("cluster.toml", &shipped("cluster.toml"));
    for m in ["web", "front"] {
        let rel = format!("modules/{m}/module.toml");
        root.write(&rel, &shipped(&rel));
    }
    root.key();
    let r = root.check();
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(r.stdout.contains("configuration OK"), "{}", r.stdout);
    assert!(r.stdout.contains("front, web"), "{}", r.stdout);
}

#[test]
fn config_check_names_file_line_and_key_of_every_error() {
    let root = TempRoot::new("bad");
    // Line 2 of cluster.toml: an unknown key.
    let cluster = shipped("cluster.toml").replacen('\n', "\ncolour = \"blue\"\n", 1);
    root.write("cluster.toml", &cluster);
    // Line 6 of web: a bad duration; line 3 of front: an unknown mode.
    root.write(
        "modules/web/module.toml",
        "[service]\nmode = \"mirror\"\n\n[heart]\npulse = \"100ms\"\ntimeout = \"7x\"\n",
    );
    root.write(
        "modules/front/module.toml",
        "# a farm\n[service]\nmode = \"farms\"\n",
    );
    let r = root.check();
    assert_ne!(r.code, Some(0), "bad config accepted: {}", r.stdout);
    let etc = root.etc();
    let expect = [
        (
            format!("{}/cluster.toml:2: colour: ", etc.display()),
            "unknown key",
        ),
        (
            format!(
                "{}/modules/web/module.toml:6: heart.timeout: ",
                etc.display()
            ),
            "\"7x\"",
        ),
        (
            format!(
                "{}/modules/front/module.toml:3: service.mode: ",
                etc.display()
            ),
            "mirror",
        ),
    ];
    for (prefix, what) in &expect {
        let line = r
            .stderr
            .lines()
            .find(|l| l.starts_with(prefix.as_str()))
            .unwrap_or_else(|| panic!("no error starting {prefix:?} in:\n{}", r.stderr));
        assert!(line.contains(what), "{line:?} should say {what:?}");
    }
    assert!(
        r.stderr.contains("configuration has 3 error(s)"),
        "{}",
        r.stderr
    );

    // A valid cluster.toml whose key file others can read: named at the
    // line of `key_file`.
    let root = TempRoot::new("key");
    root.write("cluster.toml", &shipped("cluster.toml"));
    root.key();
    let key = root.etc().join("cluster.key");
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let r = root.check();
    assert_ne!(r.code, Some(0), "readable key accepted: {}", r.stdout);
    let prefix = format!("{}/cluster.toml:2: key_file: ", root.etc().display());
    assert!(
        r.stderr
            .lines()
            .any(|l| l.starts_with(&prefix) && l.contains("mode 644")),
        "{}",
        r.stderr
    );
}

/// Listens on the control socket of `root` like a broken safekitd: reads one
/// request per connection and writes the next of `answers`.
fn fake_daemon(root: &TempRoot, answers: Vec<&'static str>) -> std::thread::JoinHandle<()> {
    use std::io::{BufRead as _, Write as _};
    let dir = root.0.join("run/safekit");
    std::fs::create_dir_all(&dir).unwrap();
    let listener = std::os::unix::net::UnixListener::bind(dir.join("safekitd.sock")).unwrap();
    std::thread::spawn(move || {
        for answer in answers {
            let (stream, _) = listener.accept().unwrap();
            let mut reader = std::io::BufReader::new(stream.try_clone().unwrap());
            let mut request = String::new();
            reader.read_line(&mut request).unwrap();
            (&stream).write_all(answer.as_bytes()).unwrap();
        }
    })
}

impl TempRoot {
    /// `safekit ARGS --root DIR`.
    fn safekit(&self, args: &[&str]) -> Run {
        let out = Command::new(env!("CARGO_BIN_EXE_safekit"))
            .args(args)
            .arg("--root")
            .arg(&self.0)
            .env_remove("SAFEKIT_ROOT")
            .env_remove("SAFEMODULE")
            .output()
            .unwrap();
        Run {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

#[test]
fn state_lq_never_reads_a_broken_daemon_as_a_state() {
    let root = TempRoot::new("fake");
    root.write("modules/web/module.toml", "[service]\nmode = \"mirror\"\n");
    let daemon = fake_daemon(
        &root,
        vec![
            "not json\n",
            "{\"result\":\"error\",\"error\":\"engine gone\"}\n",
            "",
            "not json\n",
        ],
    );
    let lq = ["state", "-m", "web", "-lq"];
    let r = root.safekit(&lq);
    assert_eq!(r.code, Some(69), "unreadable answer: {}", r.stderr);
    assert!(r.stderr.contains("unreadable answer"), "{}", r.stderr);
    let r = root.safekit(&lq);
    assert_eq!(r.code, Some(69), "error answer: {}", r.stderr);
    assert!(r.stderr.contains("engine gone"), "{}", r.stderr);
    let r = root.safekit(&lq);
    assert_eq!(r.code, Some(69), "no answer: {}", r.stderr);
    // Without -q a failure is 1.
    assert_eq!(root.safekit(&["state"]).code, Some(1));
    daemon.join().unwrap();
    // The socket of a daemon that died refuses connections: nothing runs,
    // the module is stopped; an unknown module is still no state.
    assert_eq!(root.safekit(&lq).code, Some(0));
    let r = root.safekit(&["state", "-m", "nosuch", "-lq"]);
    assert_eq!(r.code, Some(64), "{}", r.stderr);
    assert!(r.stderr.contains("\"nosuch\""), "{}", r.stderr);
}
