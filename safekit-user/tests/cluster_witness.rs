//! Partitions and their healing with real daemons (issue 12 item 2, SPEC §5
//! "Split brain", §11): the heartbeat link between the two nodes is cut
//! with blackhole routes (the client and the witness machine, the client
//! namespace, stay reachable unless said), then restored.
//!
//! - full partition without witness, healed while a client probes the VIP
//!   every 20 ms: the node that keeps the primary role announces the VIP at
//!   once, so the client is answered by it again within 1 s of the heal;
//! - heartbeat link cut while both nodes reach the arbitrating witness
//!   (`safekit witness` in the client namespace): exactly one primary at
//!   every 50 ms sample of the window, the other WAIT; after the heal
//!   PRIM/SECOND again with equal copies of the replicated directory, no
//!   operator action;
//! - the same with the witness down: nobody takes over (both WAIT), and the
//!   pair comes back by itself after the heal;
//! - ping witness reachable from node2 only: node2 takes over, node1 waits,
//!   and after the heal node1 resynchronises and becomes SECOND by itself,
//!   copies equal.

mod common;

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use common::{Lab, LabModule, ask_within, demo_scripts, serial, spawn_in_netns, status, wait_for};
use safekit::status::{Colour, ModuleState};

const MODULE: &str = "web";
const PORT: u16 = 7000;
const WITNESS_PORT: u16 = 8889;
/// The replicated directory as the application sees it.
const DIR: &str = "/srv/data";

fn vip(subnet: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 77, subnet, 100)
}

/// The witness machine: the client namespace.
fn witness_ip(subnet: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 77, subnet, 250)
}

/// A mirror module (pulse 100 ms, timeout 1 s, node1 preferred) with the
/// demo service behind a VIP; `rfs` adds the replicated `/srv/data`;
/// `extra` is appended (e.g. `[check.splitbrain]`).
fn module(subnet: u8, rfs: bool, extra: &str) -> LabModule {
    let rfs = if rfs {
        format!("\n[rfs]\nsend_timeout = \"1s\"\n[[rfs.dir]]\npath = \"{DIR}\"\n")
    } else {
        String::new()
    };
    LabModule {
        name: MODULE.into(),
        toml: format!(
            r#"[service]
mode = "mirror"
nodes = ["node1", "node2"]

[heart]
pulse = "100ms"
timeout = "1s"

[vip]
addrs = ["{}"]
garp_count = 3
garp_interval = "50ms"
{rfs}{extra}"#,
            vip(subnet)
        ),
        scripts: demo_scripts("start_prim", "stop_prim", &format!("0.0.0.0:{PORT}")),
    }
}

/// Detaches every mount at or below `base`, deepest first.
fn unmount_under(base: &Path) {
    for _ in 0..20 {
        let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
            return;
        };
        let mut points: Vec<PathBuf> = info
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .map(|p| PathBuf::from(p.replace("\\040", " ")))
            .filter(|p| p.starts_with(base))
            .collect();
        if points.is_empty() {
            return;
        }
        points.sort();
        for p in points.iter().rev() {
            let _ = rustix::mount::unmount(p, rustix::mount::UnmountFlags::DETACH);
        }
    }
}

/// Two nodes running the module, and maybe a `safekit witness`; torn down
/// on drop (witness and daemons killed by pid, mounts detached, the lab
/// removes its namespaces, links and routes).
struct Rig {
    lab: Lab,
    dir: PathBuf,
    subnet: u8,
    witness: Option<Child>,
}

impl Rig {
    fn new(prefix: &str, subnet: u8, m: LabModule) -> Self {
        let dir = PathBuf::from(format!("/tmp/safekit-test-{prefix}"));
        unmount_under(&dir);
        let lab = common::lab(prefix, subnet, 2, vec![m]);
        Self {
            lab,
            dir,
            subnet,
            witness: None,
        }
    }

    /// Starts `safekit witness` in the client namespace with the cluster's
    /// key; its pid is recorded with the lab's (killed on the next run's
    /// cleanup too).
    fn start_witness(&mut self) {
        let bin = PathBuf::from(env!("CARGO_BIN_EXE_safekit"));
        let key = self.lab.root(1).join("etc/safekit/cluster.key");
        let state = self.dir.join("witness/witness.json");
        let out = fs::File::create(self.dir.join("witness.out")).expect("witness.out");
        let child = Command::new("ip")
            .args(["netns", "exec", &self.lab.spec().client_ns()])
            .arg(bin)
            .arg("witness")
            .arg("--listen")
            .arg(format!("{}:{WITNESS_PORT}", witness_ip(self.subnet)))
            .arg("--key")
            .arg(key)
            .arg("--state")
            .arg(state)
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("dup"))
            .stderr(out)
            .spawn()
            .expect("spawn safekit witness");
        let pids = self.dir.join("pids");
        let mut text = fs::read_to_string(&pids).unwrap_or_default();
        let _ = writeln!(text, "{}", child.id());
        fs::write(&pids, text).expect("record the witness pid");
        self.witness = Some(child);
        // Listening once the log says so.
        assert!(
            wait_for(Duration::from_secs(10), || {
                fs::read_to_string(self.dir.join("witness.out"))
                    .is_ok_and(|t| t.contains("answering"))
            })
            .is_some(),
            "safekit witness did not start: {}",
            fs::read_to_string(self.dir.join("witness.out")).unwrap_or_default()
        );
    }

    /// A first start of a replicated module (neither copy known up to
    /// date): as an operator does, `prim` on node1, the reference, then
    /// `start` on node2.
    fn start_both(&mut self) {
        for i in [1, 2] {
            self.lab.start_daemon(i).expect("start safekitd");
        }
        for (i, cmd) in [(1, "prim"), (2, "start")] {
            let (ok, text) = self.cli(i, &[cmd, "-m", MODULE]);
            assert!(ok, "{cmd} on node{i}: {text}");
        }
    }

    fn cli(&self, i: usize, args: &[&str]) -> (bool, String) {
        let out = self.lab.safekit(i, args).expect("run safekit");
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    fn module(&self, i: usize) -> Option<safekit::status::ModuleStatus> {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| status(&self.lab, i)))
            .ok()
            .and_then(|s| s.module(MODULE).cloned())
    }

    fn state(&self, i: usize) -> Option<ModuleState> {
        self.module(i).map(|m| m.state)
    }

    /// `prim` PRIM and `sec` SECOND in sync (green).
    fn in_sync(&self, prim: usize, sec: usize) -> bool {
        self.state(prim) == Some(ModuleState::Prim)
            && self.module(sec).is_some_and(|m| {
                m.state == ModuleState::Second
                    && m.colour == Colour::Green
                    && m.rfs.iter().all(|d| d.link == "in sync")
            })
    }

    fn wait(&self, what: &str, limit: Duration, cond: impl FnMut() -> bool) -> Duration {
        wait_for(limit, cond)
            .unwrap_or_else(|| panic!("{what} not within {limit:?}\n{}", self.diagnose()))
    }

    /// Cuts (or restores) IP between the two nodes, and between `also`'s
    /// node and the witness machine.
    fn cut(&self, on: bool, witness_from: Option<usize>) {
        let spec = self.lab.spec();
        let mut routes = vec![
            (spec.node_ns(1), spec.node_addr(2)),
            (spec.node_ns(2), spec.node_addr(1)),
        ];
        if let Some(i) = witness_from {
            routes.push((spec.node_ns(i), witness_ip(self.subnet)));
        }
        for (ns, dst) in routes {
            let dst = format!("{dst}/32");
            let verb = if on { "add" } else { "del" };
            let out = self
                .lab
                .exec(&ns, &["ip", "route", verb, "blackhole", &dst])
                .expect("ip route");
            assert!(
                out.status.success(),
                "ip route {verb} blackhole {dst} in {ns}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    /// Node `i`'s copy on disk (the real directory).
    fn disk(&self, i: usize) -> PathBuf {
        self.lab.root(i).join(DIR.trim_start_matches('/'))
    }

    /// The replicated directory as node `i`'s application sees it.
    fn view(&self, i: usize) -> PathBuf {
        self.lab
            .node_view(i, &self.disk(i))
            .expect("daemon running")
    }

    fn diagnose(&self) -> String {
        let mut out = String::new();
        for i in 1..=2 {
            let state = self.cli(i, &["state", "-m", MODULE, "-v"]).1;
            let log = self.cli(i, &["log", "-m", MODULE, "-n", "40"]).1;
            let _ = write!(
                out,
                "--- node{i} state -v:\n{state}\n--- node{i} module log (end):\n{log}\n"
            );
        }
        let _ = write!(
            out,
            "--- witness:\n{}",
            fs::read_to_string(self.dir.join("witness.out")).unwrap_or_default()
        );
        out
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        if let Some(mut w) = self.witness.take() {
            let _ = w.kill();
            let _ = w.wait();
        }
        for i in 1..=2 {
            self.lab.kill_daemon(i);
        }
        unmount_under(&self.dir);
    }
}

fn is_primary(s: Option<ModuleState>) -> bool {
    matches!(s, Some(ModuleState::Prim | ModuleState::Alone))
}

/// Path → BLAKE3 of the content (directories as empty), under `root`.
fn digest(root: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let Ok(entries) = fs::read_dir(root.join(&rel)) else {
            continue;
        };
        for e in entries.flatten() {
            let rel = rel.join(e.file_name());
            let p = root.join(&rel);
            if p.is_dir() {
                stack.push(rel.clone());
                out.insert(rel, String::new());
            } else {
                let data = fs::read(&p).unwrap_or_default();
                out.insert(rel, blake3::hash(&data).to_hex().to_string());
            }
        }
    }
    out
}

/// Writes `n` files named `prefix-k` through node `i`'s application view,
/// each fsynced.
fn write_files(rig: &Rig, i: usize, prefix: &str, n: usize) {
    use std::io::Write as _;
    let dir = rig.view(i);
    for k in 0..n {
        let p = dir.join(format!("{prefix}-{k}"));
        let mut f = fs::File::create(&p).unwrap_or_else(|e| panic!("create {}: {e}", p.display()));
        f.write_all(format!("{prefix} record {k}\n").repeat(100).as_bytes())
            .expect("write");
        f.sync_all().expect("fsync");
    }
}

/// Waits until node `i`'s application runs (`start_prim` ran: the
/// replicated directory is served). The state shows ALONE as soon as the
/// node decides, before its effects (mount, VIP, `start_prim`) complete.
fn wait_application(rig: &Rig, i: usize) {
    let pid = rig.lab.root(i).join("demo.pid");
    rig.wait(
        &format!("node{i}'s application running"),
        Duration::from_secs(10),
        || pid.exists(),
    );
}

/// Samples both states every 50 ms for `window`; returns the samples.
fn sample(
    rig: &Rig,
    window: Duration,
) -> Vec<(Duration, Option<ModuleState>, Option<ModuleState>)> {
    let start = Instant::now();
    let mut out = Vec::new();
    while start.elapsed() < window {
        let t = start.elapsed();
        out.push((t, rig.state(1), rig.state(2)));
        std::thread::sleep(Duration::from_millis(50));
    }
    out
}

/// After the heal: `prim` PRIM, the other SECOND in sync, and both copies
/// equal by content, with no operator action.
fn heals_to_prim_second_equal(rig: &Rig, prim: usize, what: &str) {
    let sec = 3 - prim;
    let took = rig.wait(
        &format!("{what}: node{prim} PRIM with node{sec} SECOND in sync"),
        Duration::from_secs(40),
        || rig.in_sync(prim, sec),
    );
    let start = Instant::now();
    loop {
        let (a, b) = (digest(&rig.disk(1)), digest(&rig.disk(2)));
        if a == b && !a.is_empty() {
            eprintln!(
                "{what}: PRIM/SECOND {took:?} after the heal, copies equal ({} entries)",
                a.len()
            );
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{what}: copies differ: node1 {} entries, node2 {}; different: {:?}\n{}",
            a.len(),
            b.len(),
            a.iter()
                .filter(|(p, h)| b.get(*p) != Some(*h))
                .map(|(p, _)| p)
                .chain(b.keys().filter(|p| !a.contains_key(*p)))
                .collect::<Vec<_>>(),
            rig.diagnose()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn full_partition_healed_the_client_is_answered_by_the_kept_primary_within_a_second() {
    let _serial = serial();
    let subnet = 131;
    let mut rig = Rig::new("skwt1", subnet, module(subnet, false, ""));
    rig.start_both();
    rig.wait("node1 PRIM, node2 SECOND", Duration::from_secs(10), || {
        rig.state(1) == Some(ModuleState::Prim) && rig.state(2) == Some(ModuleState::Second)
    });
    // The client probes the VIP every 20 ms from here on.
    let stop = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    let probe_thread = {
        let stop = Arc::clone(&stop);
        let src_ip = rig.lab.spec().client_addr();
        let dst = SocketAddr::from((vip(subnet), PORT));
        spawn_in_netns(&rig.lab.spec().client_ns(), move || {
            let mut out = Vec::new();
            let mut port = 20_000u16;
            while !stop.load(Ordering::Relaxed) {
                let at = t0.elapsed();
                port = if port >= 40_000 { 20_000 } else { port + 1 };
                let r = ask_within(
                    SocketAddr::from((src_ip, port)),
                    dst,
                    Duration::from_millis(200),
                );
                out.push((at, r));
                let next = at + Duration::from_millis(20);
                if let Some(d) = next.checked_sub(t0.elapsed()) {
                    std::thread::sleep(d);
                }
            }
            out
        })
    };
    rig.cut(true, None);
    // Both primary (no witness): node2 took over and announced the VIP.
    rig.wait(
        "both ALONE during the partition",
        Duration::from_secs(10),
        || rig.state(1) == Some(ModuleState::Alone) && rig.state(2) == Some(ModuleState::Alone),
    );
    std::thread::sleep(Duration::from_secs(1));
    rig.cut(false, None);
    let healed = t0.elapsed();
    rig.wait(
        "node1 PRIM, node2 SECOND after the heal",
        Duration::from_secs(15),
        || rig.state(1) == Some(ModuleState::Prim) && rig.state(2) == Some(ModuleState::Second),
    );
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    let probes = probe_thread.join().expect("prober");
    let answered_by = |from: Duration, to: Duration, node: &str| {
        probes
            .iter()
            .filter(|(at, r)| *at >= from && *at < to && r.as_deref() == Ok(node))
            .count()
    };
    assert!(
        answered_by(Duration::ZERO, healed, "node2") > 0,
        "the client was never on node2 during the partition: the test proves nothing"
    );
    let first_node1 = probes
        .iter()
        .find(|(at, r)| *at >= healed && r.as_deref() == Ok("node1"))
        .map(|(at, _)| at.saturating_sub(healed));
    let last_other = probes
        .iter()
        .rev()
        .find(|(at, r)| *at >= healed && r.as_deref() != Ok("node1"))
        .map(|(at, r)| (at.saturating_sub(healed), r.clone()));
    let after = probes.iter().filter(|(at, _)| *at >= healed).count();
    eprintln!(
        "{after} probes after the heal: first answer by node1 {first_node1:?} after it, last probe not answered by node1: {last_other:?}"
    );
    let first = first_node1.expect("node1 never answered after the heal");
    assert!(
        first <= Duration::from_secs(1),
        "node1 answered the client {first:?} after the heal\n{}",
        rig.diagnose()
    );
    // From then on, only node1 answers (the client stays on its MAC).
    if let Some((at, r)) = &last_other {
        assert!(
            *at <= Duration::from_secs(1),
            "after the heal, a probe at {at:?} got {r:?}, not node1\n{}",
            rig.diagnose()
        );
    }
}

#[test]
fn cut_heartbeat_link_with_the_arbiter_one_primary_then_prim_second_equal_copies() {
    let _serial = serial();
    let subnet = 132;
    let extra = format!(
        "\n[check.splitbrain]\narbiter = [\"{}:{WITNESS_PORT}\"]\ntimeout = \"500ms\"\n",
        witness_ip(subnet)
    );
    let mut rig = Rig::new("skwt2", subnet, module(subnet, true, &extra));
    rig.start_witness();
    rig.start_both();
    rig.wait(
        "node1 PRIM, node2 SECOND in sync",
        Duration::from_secs(30),
        || rig.in_sync(1, 2),
    );
    write_files(&rig, 1, "before", 20);
    rig.cut(true, None);
    // Peer lost after 1 s; the arbiter answers; a secondary granted would
    // wait 2 s more: 6 s covers every move.
    let samples = sample(&rig, Duration::from_secs(6));
    for (t, a, b) in &samples {
        let primaries = usize::from(is_primary(*a)) + usize::from(is_primary(*b));
        assert_eq!(
            primaries,
            1,
            "at {t:?} after the cut: node1 {a:?}, node2 {b:?}\n{}",
            rig.diagnose()
        );
    }
    let (s1, s2) = (rig.state(1), rig.state(2));
    let (prim, other) = if is_primary(s1) { (1, s2) } else { (2, s1) };
    assert_eq!(other, Some(ModuleState::Wait), "the node without the grant");
    eprintln!(
        "{} samples over 6 s: one primary in each (node{prim}), the other WAIT",
        samples.len()
    );
    // The primary keeps writing while cut off.
    write_files(&rig, prim, "during", 20);
    rig.cut(false, None);
    heals_to_prim_second_equal(&rig, prim, "arbiter");
}

#[test]
fn witness_down_as_well_nobody_takes_over_and_the_pair_comes_back_after_the_heal() {
    let _serial = serial();
    let subnet = 133;
    let extra = format!(
        "\n[check.splitbrain]\narbiter = [\"{}:{WITNESS_PORT}\"]\ntimeout = \"500ms\"\n",
        witness_ip(subnet)
    );
    // No `safekit witness` runs: the arbiter is down.
    let mut rig = Rig::new("skwt3", subnet, module(subnet, true, &extra));
    rig.start_both();
    rig.wait(
        "node1 PRIM, node2 SECOND in sync",
        Duration::from_secs(30),
        || rig.in_sync(1, 2),
    );
    write_files(&rig, 1, "before", 10);
    rig.cut(true, None);
    let samples = sample(&rig, Duration::from_secs(6));
    for (t, a, b) in &samples {
        assert!(
            !is_primary(*b),
            "node2 took over at {t:?} without the arbiter: node1 {a:?}, node2 {b:?}\n{}",
            rig.diagnose()
        );
    }
    assert_eq!(
        (rig.state(1), rig.state(2)),
        (Some(ModuleState::Wait), Some(ModuleState::Wait)),
        "{}",
        rig.diagnose()
    );
    assert!(
        !rig.lab.root(1).join("demo.pid").exists() && !rig.lab.root(2).join("demo.pid").exists(),
        "an application still runs"
    );
    eprintln!("{} samples over 6 s: no takeover, both WAIT", samples.len());
    rig.cut(false, None);
    heals_to_prim_second_equal(&rig, 1, "witness down");
}

#[test]
fn ping_witness_from_node2_only_node1_waits_then_becomes_second_by_itself() {
    let _serial = serial();
    let subnet = 134;
    let extra = format!(
        "\n[check.splitbrain]\nwitness = [\"{}\"]\ntimeout = \"500ms\"\n",
        witness_ip(subnet)
    );
    let mut rig = Rig::new("skwt4", subnet, module(subnet, true, &extra));
    rig.start_both();
    rig.wait(
        "node1 PRIM, node2 SECOND in sync",
        Duration::from_secs(30),
        || rig.in_sync(1, 2),
    );
    write_files(&rig, 1, "before", 10);
    // node1 loses node2 and the witness.
    rig.cut(true, Some(1));
    let samples = sample(&rig, Duration::from_secs(5));
    for (t, a, b) in &samples {
        assert!(
            !(is_primary(*a) && is_primary(*b)),
            "both primary at {t:?}\n{}",
            rig.diagnose()
        );
    }
    assert_eq!(
        (rig.state(1), rig.state(2)),
        (Some(ModuleState::Wait), Some(ModuleState::Alone)),
        "{}",
        rig.diagnose()
    );
    wait_application(&rig, 2);
    write_files(&rig, 2, "during", 10);
    rig.cut(false, Some(1));
    heals_to_prim_second_equal(&rig, 2, "ping witness");
}

#[test]
fn defaultprim_swaps_back_once_the_preferred_node_is_back_in_sync() {
    let _serial = serial();
    let subnet = 135;
    let mut m = module(subnet, true, "");
    m.toml = m.toml.replace(
        "nodes = [\"node1\", \"node2\"]",
        "nodes = [\"node1\", \"node2\"]\ndefaultprim = \"node1\"",
    );
    let mut rig = Rig::new("skwt5", subnet, m);
    rig.start_both();
    rig.wait(
        "node1 PRIM, node2 SECOND in sync",
        Duration::from_secs(30),
        || rig.in_sync(1, 2),
    );
    write_files(&rig, 1, "before", 10);
    // kill -9 of node1's daemon and its service: node2 takes over.
    let pid = fs::read_to_string(rig.lab.root(1).join("demo.pid")).unwrap_or_default();
    rig.lab.kill_daemon(1);
    if let Ok(p) = pid.trim().parse::<i32>() {
        // SAFETY: kill(2) of the demo service pid node1's script recorded.
        unsafe { libc::kill(p, libc::SIGKILL) };
    }
    unmount_under(&rig.disk(1));
    rig.wait("node2 ALONE", Duration::from_secs(10), || {
        rig.state(2) == Some(ModuleState::Alone)
    });
    wait_application(&rig, 2);
    write_files(&rig, 2, "while-node1-away", 10);
    // node1 returns: SECOND, resynchronised, then the pair swaps back to it
    // by itself.
    rig.lab.start_daemon(1).expect("restart safekitd");
    let (ok, text) = rig.cli(1, &["start", "-m", MODULE]);
    assert!(ok, "start on node1: {text}");
    heals_to_prim_second_equal(&rig, 1, "defaultprim swap back");
    let log = rig.cli(2, &["log", "-m", MODULE, "-n", "200"]).1;
    assert!(
        log.contains("defaultprim: node1 is back and in sync: swapping back to it"),
        "node2's log does not say why it handed over:\n{log}"
    );
    let dst = SocketAddr::from((vip(subnet), PORT));
    let src = SocketAddr::from((rig.lab.spec().client_addr(), 41_000));
    let answer = common::ask_from(&rig.lab.spec().client_ns(), src, dst);
    assert_eq!(
        answer.as_deref(),
        Ok("node1"),
        "the client's answer through the VIP"
    );
    // An operator's swap afterwards stands: no swap back from it.
    let (ok, text) = rig.cli(1, &["swap", "-m", MODULE]);
    assert!(ok, "swap: {text}");
    rig.wait("node2 PRIM after the swap", Duration::from_secs(30), || {
        rig.in_sync(2, 1)
    });
    let samples = sample(&rig, Duration::from_secs(3));
    assert!(
        samples
            .iter()
            .all(|(_, a, b)| *a == Some(ModuleState::Second) && *b == Some(ModuleState::Prim)),
        "the operator's swap was undone: {samples:?}"
    );
}
