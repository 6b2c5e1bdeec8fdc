//! A dead daemon leaves no claim (SPEC §11, §12): the mirror VIP's ARP is
//! answered only by a tcx program held by safekitd's BPF link, the
//! applications run in per-module cgroups that the daemon's guard kills when
//! it dies, and a restarted daemon cleans what is left before acting. Real
//! daemons in namespaces, a client namespace watching ARP with `AF_PACKET`.

mod common;

use std::{
    net::{Ipv4Addr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use common::{
    Lab, LabModule, alive, ask_within, demo_bin, has_vip, pid_in, serial, spawn_in_netns, state_of,
    wait_for,
};
use safekit::status::ModuleState;

const PORT: u16 = 7000;
const FARM_PORT: u16 = 7001;

fn vip(subnet: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 77, subnet, 100)
}

fn farm_vip(subnet: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 77, subnet, 110)
}

/// `start_prim`: the demo service answering with the node name, its pid in
/// `$SAFE_ROOT/demo.pid`.
fn start_demo() -> String {
    format!(
        "#!/bin/sh\n\"{}\" --listen 0.0.0.0:{PORT} --text \"$SAFE_NODE\" --pidfile \"$SAFE_ROOT/demo.pid\" >/dev/null 2>&1 &\n",
        demo_bin().display()
    )
}

const STOP_DEMO: &str = "#!/bin/sh\n[ -f \"$SAFE_ROOT/demo.pid\" ] && kill \"$(cat \"$SAFE_ROOT/demo.pid\")\" 2>/dev/null\nrm -f \"$SAFE_ROOT/demo.pid\"\nexit 0\n";

fn mirror_module(subnet: u8, timeout: &str) -> LabModule {
    LabModule {
        name: "web".into(),
        toml: format!(
            r#"[service]
mode = "mirror"
defaultprim = "node1"
nodes = ["node1", "node2"]

[heart]
pulse = "100ms"
timeout = "{timeout}"

[vip]
addrs = ["{}"]
garp_count = 3
garp_interval = "50ms"
"#,
            vip(subnet)
        ),
        scripts: vec![
            ("start_prim".into(), start_demo()),
            ("stop_prim".into(), STOP_DEMO.into()),
        ],
    }
}

fn wait_state(lab: &Lab, node: usize, name: &str, want: ModuleState, limit: Duration) -> bool {
    wait_for(limit, || state_of(lab, node, name) == Some(want)).is_some()
}

fn cli(lab: &Lab, node: usize, args: &[&str]) -> String {
    let out = lab.safekit(node, args).expect("running safekit");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "safekit {args:?} on node{node}: {text}"
    );
    text
}

fn mac_of(lab: &Lab, ns: &str) -> [u8; 6] {
    let out = lab
        .exec(ns, &["cat", "/sys/class/net/eth0/address"])
        .expect("reading a MAC");
    parse_mac(String::from_utf8_lossy(&out.stdout).trim()).expect("a MAC")
}

fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    Some(mac)
}

/// The client's neighbour entry for `ip`: its MAC, if any.
fn neigh_mac(lab: &Lab, ip: Ipv4Addr) -> Option<[u8; 6]> {
    let out = lab
        .exec(
            &lab.spec().client_ns(),
            &["ip", "neigh", "show", &ip.to_string(), "dev", "eth0"],
        )
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut words = text.split_whitespace();
    words.find(|w| *w == "lladdr")?;
    parse_mac(words.next()?)
}

fn log(lab: &Lab, node: usize, module: &str) -> String {
    std::fs::read_to_string(lab.root(node).join(format!("var/log/safekit/{module}.log")))
        .unwrap_or_default()
}

/// An ARP frame about the VIP seen by the client (not sent by it).
#[derive(Debug, Clone, Copy)]
struct ArpSeen {
    at: Instant,
    /// 1 request (a gratuitous ARP), 2 reply.
    op: u16,
    /// Sender hardware address.
    sha: [u8; 6],
}

/// From inside the client namespace until `stop`: a broadcast ARP request
/// for `target` every 20 ms, and every ARP frame whose sender is `target`
/// recorded (replies to those requests, gratuitous ARPs).
/// `own` is the client's MAC (this thread's /sys is the host's: the
/// interface index comes from the namespace itself).
fn watch_arp(
    target: Ipv4Addr,
    client_ip: Ipv4Addr,
    own: [u8; 6],
    stop: &AtomicBool,
) -> Vec<ArpSeen> {
    // SAFETY: a NUL-terminated name.
    let ifindex = unsafe { libc::if_nametoindex(c"eth0".as_ptr()) };
    assert!(ifindex > 0, "no eth0 in the client namespace");
    let ifindex = i32::try_from(ifindex).unwrap();
    let proto = u16::try_from(libc::ETH_P_ARP).unwrap().to_be();
    // SAFETY: socket(2); the fd is closed below.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
    assert!(fd >= 0, "AF_PACKET: {}", std::io::Error::last_os_error());
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 5_000,
    };
    // SAFETY: a valid timeval and its size.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const tv).cast(),
            u32::try_from(size_of::<libc::timeval>()).unwrap(),
        );
    }
    let mut req = [0u8; 42];
    req[0..6].copy_from_slice(&[0xff; 6]);
    req[6..12].copy_from_slice(&own);
    req[12..14].copy_from_slice(&[0x08, 0x06]);
    req[14..22].copy_from_slice(&[0, 1, 0x08, 0x00, 6, 4, 0, 1]);
    req[22..28].copy_from_slice(&own);
    req[28..32].copy_from_slice(&client_ip.octets());
    req[38..42].copy_from_slice(&target.octets());
    // SAFETY: sockaddr_ll is plain data; all-zero is valid.
    let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sa.sll_family = u16::try_from(libc::AF_PACKET).unwrap();
    sa.sll_protocol = proto;
    sa.sll_ifindex = ifindex;
    sa.sll_halen = 6;
    sa.sll_addr[..6].copy_from_slice(&[0xff; 6]);
    let mut seen = Vec::new();
    let mut next_probe = Instant::now();
    let mut buf = [0u8; 128];
    while !stop.load(Ordering::Relaxed) {
        if Instant::now() >= next_probe {
            // SAFETY: the frame and the address are valid for the call.
            unsafe {
                libc::sendto(
                    fd,
                    req.as_ptr().cast(),
                    req.len(),
                    0,
                    (&raw const sa).cast(),
                    u32::try_from(size_of::<libc::sockaddr_ll>()).unwrap(),
                );
            }
            next_probe += Duration::from_millis(20);
        }
        // SAFETY: the buffer is valid for its length.
        let r = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
        if r >= 42 && buf[6..12] != own && buf[28..32] == target.octets() {
            let mut sha = [0u8; 6];
            sha.copy_from_slice(&buf[22..28]);
            seen.push(ArpSeen {
                at: Instant::now(),
                op: u16::from_be_bytes([buf[20], buf[21]]),
                sha,
            });
        }
    }
    // SAFETY: our fd, closed once.
    unsafe { libc::close(fd) };
    seen
}

/// The client connects to the VIP every 20 ms until `stop`: (when the
/// answer came, which node answered).
fn probe(dst: SocketAddr, src_ip: Ipv4Addr, stop: &AtomicBool) -> Vec<(Instant, String)> {
    let mut answers = Vec::new();
    let mut port = 41_000u16;
    while !stop.load(Ordering::Relaxed) {
        let src = SocketAddr::from((src_ip, port));
        port = if port >= 60_000 { 41_000 } else { port + 1 };
        if let Ok(a) = ask_within(src, dst, Duration::from_millis(200)) {
            answers.push((Instant::now(), a));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    answers
}

/// The processes in node `node`'s cgroup of `module` (none when the cgroup
/// is gone).
fn cgroup_procs(lab: &Lab, node: usize, module: &str) -> Vec<i32> {
    let base = cgroup_base(lab, node);
    std::fs::read_to_string(base.join(module).join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// `<cgroup2>/safekit/<instance>` of node `node` (the lab removes it).
fn cgroup_base(lab: &Lab, node: usize) -> std::path::PathBuf {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let mount = safekit::sys::cgroup::cgroup2_mount(&mountinfo).expect("a cgroup2 mount");
    mount
        .join("safekit")
        .join(safekit::sys::cgroup::instance_name(&lab.root(node)))
}

/// Mirror module `web` (started on node1, its peer silent) ALONE there:
/// after the heartbeat timeout, or forced with `prim` (no state record yet).
fn alone_on_node1(lab: &Lab) {
    if !wait_state(lab, 1, "web", ModuleState::Alone, Duration::from_secs(5)) {
        cli(lab, 1, &["prim", "-m", "web"]);
    }
    assert!(
        wait_state(lab, 1, "web", ModuleState::Alone, Duration::from_secs(10)),
        "web not ALONE on node1: {:?}",
        state_of(lab, 1, "web")
    );
}

/// The pids node1's scripts wrote in these files (waiting up to 5 s).
fn pids<const N: usize>(lab: &Lab, files: [&str; N]) -> [i32; N] {
    assert!(
        wait_for(Duration::from_secs(5), || files
            .iter()
            .all(|f| pid_in(lab, 1, f).is_some()))
        .is_some(),
        "no pid in one of {files:?}"
    );
    files.map(|f| pid_in(lab, 1, f).unwrap_or_default())
}

#[test]
#[expect(
    clippy::too_many_lines,
    reason = "one scenario: set up, watch, kill, then every check of the window"
)]
fn kill_9_of_the_primary_daemon_leaves_no_claim() {
    let _serial = serial();
    let subnet = 161;
    let mut lab = common::lab("sklz1", subnet, 2, vec![mirror_module(subnet, "2s")]);
    lab.start_daemon(1).unwrap();
    lab.start_daemon(2).unwrap();
    cli(&lab, 1, &["start", "-m", "web"]);
    cli(&lab, 2, &["start", "-m", "web"]);
    assert!(
        wait_state(&lab, 1, "web", ModuleState::Prim, Duration::from_secs(15))
            && wait_state(&lab, 2, "web", ModuleState::Second, Duration::from_secs(15)),
        "not PRIM/SECOND: {:?} {:?}",
        state_of(&lab, 1, "web"),
        state_of(&lab, 2, "web")
    );
    let (mac1, mac2) = (
        mac_of(&lab, &lab.spec().node_ns(1)),
        mac_of(&lab, &lab.spec().node_ns(2)),
    );
    let client = lab.spec().client_addr();
    let dst = SocketAddr::from((vip(subnet), PORT));
    assert!(
        wait_for(Duration::from_secs(5), || {
            common::ask_from(
                &lab.spec().client_ns(),
                SocketAddr::from((client, 40_999)),
                dst,
            )
            .as_deref()
                == Ok("node1")
        })
        .is_some(),
        "node1 does not serve the VIP"
    );
    let demo1 = pid_in(&lab, 1, "demo.pid").expect("node1's service pid");
    assert!(
        cgroup_procs(&lab, 1, "web").contains(&demo1),
        "node1's service is not in its module cgroup"
    );
    // The VIP lives on lo; the LAN interface ignores ARP for it.
    let lo = lab
        .exec(
            &lab.spec().node_ns(1),
            &["ip", "-4", "-o", "addr", "show", "dev", "lo"],
        )
        .unwrap();
    assert!(String::from_utf8_lossy(&lo.stdout).contains(&format!(" {}/32", vip(subnet))));

    let stop = Arc::new(AtomicBool::new(false));
    let (s1, s2) = (Arc::clone(&stop), Arc::clone(&stop));
    let v = vip(subnet);
    let client_mac = mac_of(&lab, &lab.spec().client_ns());
    let arp = spawn_in_netns(&lab.spec().client_ns(), move || {
        watch_arp(v, client, client_mac, &s1)
    });
    let probes = spawn_in_netns(&lab.spec().client_ns(), move || probe(dst, client, &s2));
    std::thread::sleep(Duration::from_millis(500));

    // kill -9 of node1's safekitd only: its namespace, its service, its
    // guard stay.
    let killed_at = Instant::now();
    lab.kill_daemon(1);
    assert!(
        wait_state(&lab, 2, "web", ModuleState::Alone, Duration::from_secs(15)),
        "node2 did not take over: {:?}",
        state_of(&lab, 2, "web")
    );
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, Ordering::Relaxed);
    let arp = arp.join().expect("ARP watcher");
    let probes = probes.join().expect("prober");

    // node2's takeover: its first gratuitous ARP (or reply) for the VIP.
    let takeover = arp
        .iter()
        .find(|a| a.sha == mac2 && a.at > killed_at)
        .map(|a| a.at)
        .expect("node2 never announced the VIP");
    let before: Vec<_> = arp
        .iter()
        .filter(|a| a.at < killed_at && a.op == 2 && a.sha == mac1)
        .collect();
    assert!(
        !before.is_empty(),
        "node1's lease answered no ARP request while its daemon lived"
    );
    let node1_after: Vec<_> = arp
        .iter()
        .filter(|a| a.at >= takeover && a.sha == mac1)
        .collect();
    let node2_replies = arp
        .iter()
        .filter(|a| a.at >= takeover && a.op == 2 && a.sha == mac2)
        .count();
    let answers_after: Vec<_> = probes.iter().filter(|(t, _)| *t >= takeover).collect();
    let from_node2 = answers_after.iter().filter(|(_, a)| a == "node2").count();
    println!(
        "takeover {:?} after the kill; ARP replies from node1 before the kill: {}, from node1 after the takeover: {}, from node2 after: {node2_replies}; answers after the takeover: {} ({from_node2} from node2)",
        takeover.duration_since(killed_at),
        before.len(),
        node1_after.len(),
        answers_after.len()
    );
    assert!(
        node1_after.is_empty(),
        "node1 answered ARP for the VIP after node2's takeover: {node1_after:?}"
    );
    assert!(
        node2_replies > 0,
        "node2 answered no ARP request for the VIP"
    );
    assert!(from_node2 > 0, "no answer from node2 after its takeover");
    assert_eq!(
        from_node2,
        answers_after.len(),
        "answers other than node2's after its takeover: {answers_after:?}"
    );
    // The entry may be between two states when the window closes (a
    // resolution in flight): it must settle on node2's MAC.
    let settled = wait_for(Duration::from_secs(2), || neigh_mac(&lab, v) == Some(mac2));
    let neigh = lab
        .exec(&lab.spec().client_ns(), &["ip", "neigh", "show"])
        .unwrap();
    assert!(
        settled.is_some(),
        "the client's neighbour entry for the VIP is not node2's MAC: {}",
        String::from_utf8_lossy(&neigh.stdout)
    );
    // node1's service was stopped by its guard, the VIP removed.
    assert!(!alive(demo1), "node1's service still runs");
    assert!(
        cgroup_procs(&lab, 1, "web").is_empty(),
        "processes left in node1's module cgroup"
    );
    assert!(!has_vip(&lab, 1, v), "the VIP stayed on node1");
    assert!(
        log(&lab, 1, "web").contains("safekitd died"),
        "{}",
        log(&lab, 1, "web")
    );
}

#[test]
#[expect(
    clippy::too_many_lines,
    reason = "one scenario: leftovers made, the lease checked alone, the restart cleaning them"
)]
fn a_restarted_daemon_cleans_what_a_dead_one_and_its_guard_left() {
    let _serial = serial();
    let subnet = 162;
    // start_both says so if the previous instance still runs (a zombie
    // waiting for its reaper does not count).
    let start_both = format!(
        "#!/bin/sh\nold=\"$(cat \"$SAFE_ROOT/farm.pid\" 2>/dev/null)\"\nif [ -n \"$old\" ] && [ -e /proc/$old/status ] && ! grep -q '^State:.*Z' /proc/$old/status; then echo met >> \"$SAFE_ROOT/met\"; fi\n\"{}\" --listen 0.0.0.0:{FARM_PORT} --text \"$SAFE_NODE\" --pidfile \"$SAFE_ROOT/farm.pid\" >/dev/null 2>&1 &\n",
        demo_bin().display()
    );
    let farm = LabModule {
        name: "farm".into(),
        toml: format!(
            r#"[service]
mode = "farm"

[farm]
pulse = "100ms"

[vip]
addrs = ["{}"]
[[vip.rule]]
proto = "tcp"
port = {FARM_PORT}
filter = "client_ip_port"
"#,
            farm_vip(subnet)
        ),
        scripts: vec![("start_both".into(), start_both)],
    };
    let mut lab = common::lab("sklz2", subnet, 2, vec![farm, mirror_module(subnet, "1s")]);
    lab.start_daemon(1).unwrap();
    cli(&lab, 1, &["start", "-m", "farm"]);
    cli(&lab, 1, &["start", "-m", "web"]);
    assert!(wait_state(
        &lab,
        1,
        "farm",
        ModuleState::Up,
        Duration::from_secs(10)
    ));
    alone_on_node1(&lab);
    let [farm1, web1] = pids(&lab, ["farm.pid", "demo.pid"]);
    let mac1 = mac_of(&lab, &lab.spec().node_ns(1));
    let client = lab.spec().client_addr();
    let v = vip(subnet);
    let client_ns = lab.spec().client_ns();
    let client_mac = mac_of(&lab, &client_ns);
    let arp_for = |d: Duration| {
        let stop = Arc::new(AtomicBool::new(false));
        let s = Arc::clone(&stop);
        let h = spawn_in_netns(&client_ns, move || watch_arp(v, client, client_mac, &s));
        std::thread::sleep(d);
        stop.store(true, Ordering::Relaxed);
        h.join().expect("ARP watcher")
    };
    let replies = |seen: &[ArpSeen]| seen.iter().filter(|a| a.op == 2 && a.sha == mac1).count();
    assert!(
        replies(&arp_for(Duration::from_millis(500))) > 0,
        "node1's lease answers no ARP for the mirror VIP"
    );
    // A client that keeps node1's MAC for the VIP (as one whose entry the
    // peer's gratuitous ARP has not replaced yet): served while the lease
    // holds.
    let mac_text: Vec<String> = mac1.iter().map(|b| format!("{b:02x}")).collect();
    let pin = lab
        .exec(
            &client_ns,
            &[
                "ip",
                "neigh",
                "replace",
                &v.to_string(),
                "lladdr",
                &mac_text.join(":"),
                "dev",
                "eth0",
                "nud",
                "permanent",
            ],
        )
        .unwrap();
    assert!(pin.status.success(), "{pin:?}");
    let ask_vip = |port: u16| {
        common::in_netns(&client_ns, move || {
            ask_within(
                SocketAddr::from((client, port)),
                SocketAddr::from((v, PORT)),
                Duration::from_secs(1),
            )
        })
    };
    assert_eq!(ask_vip(42_001).as_deref(), Ok("node1"));

    // The daemon and its guard die together (the guard first, the daemon
    // stopped so that it cannot start another).
    let daemon = i32::try_from(lab.daemon_pid(1).unwrap()).unwrap();
    let guard = pid_in(&lab, 1, "run/safekit/guard.pid").expect("guard.pid");
    assert!(alive(guard), "no guard running");
    // SAFETY: kill(2) of pids this test's lab started (the daemon and the
    // guard it recorded).
    unsafe {
        libc::kill(daemon, libc::SIGSTOP);
        libc::kill(guard, libc::SIGKILL);
    }
    lab.kill_daemon(1);
    assert!(wait_for(Duration::from_secs(5), || !alive(guard)).is_some());
    // Nothing cleaned: the applications run, the mirror VIP is still on lo,
    // but the kernel dropped the lease with the daemon: no ARP answer.
    assert!(alive(farm1) && alive(web1), "the applications were stopped");
    assert!(has_vip(&lab, 1, v), "the VIP was removed");
    let after = arp_for(Duration::from_secs(1));
    assert_eq!(
        replies(&after),
        0,
        "node1 answered ARP for the VIP with no daemon: {after:?}"
    );
    // Nor is its traffic admitted: the lease program's mark is gone.
    let late = ask_vip(42_002);
    assert!(
        late.is_err(),
        "node1 served the VIP with no daemon: {late:?}"
    );
    let _ = lab.exec(
        &client_ns,
        &["ip", "neigh", "del", &v.to_string(), "dev", "eth0"],
    );

    // Restarted: the leftovers are cleaned before anything starts (before
    // the daemon answers commands).
    lab.start_daemon(1).unwrap();
    assert!(
        wait_for(Duration::from_secs(10), || state_of(&lab, 1, "farm")
            .is_some())
        .is_some(),
        "the restarted daemon does not answer"
    );
    assert!(
        !alive(farm1),
        "the farm's previous instance still runs: {}",
        std::fs::read_to_string(lab.root(1).join("safekitd.out")).unwrap_or_default()
    );
    assert!(!alive(web1), "the mirror's previous application still runs");
    assert!(!has_vip(&lab, 1, v), "the mirror VIP stayed on node1");
    assert!(
        log(&lab, 1, "farm")
            .contains("safekitd start: 1 process(es) of the module's cgroup killed"),
        "{}",
        log(&lab, 1, "farm")
    );
    cli(&lab, 1, &["start", "-m", "farm"]);
    assert!(wait_state(
        &lab,
        1,
        "farm",
        ModuleState::Up,
        Duration::from_secs(10)
    ));
    assert!(
        wait_for(Duration::from_secs(5), || pid_in(&lab, 1, "farm.pid")
            .is_some_and(|p| p != farm1 && alive(p)))
        .is_some(),
        "start_both did not start the service again"
    );
    assert!(
        !lab.root(1).join("met").exists(),
        "start_both met the previous instance"
    );
    assert_eq!(
        cgroup_procs(&lab, 1, "farm"),
        vec![pid_in(&lab, 1, "farm.pid").unwrap()],
        "the farm module's cgroup holds its new service only"
    );
}

#[test]
fn a_clean_shutdown_leaves_the_guard_nothing_to_do() {
    let _serial = serial();
    let subnet = 163;
    // start_prim also leaves a helper running that stop_prim does not stop:
    // as before the guard existed, a clean shutdown leaves it alone.
    let mut m = mirror_module(subnet, "1s");
    m.scripts[0]
        .1
        .push_str("sleep 300 >/dev/null 2>&1 &\necho $! > \"$SAFE_ROOT/helper.pid\"\n");
    let mut lab = common::lab("sklz3", subnet, 2, vec![m]);
    lab.start_daemon(1).unwrap();
    cli(&lab, 1, &["start", "-m", "web"]);
    alone_on_node1(&lab);
    let [demo, helper] = pids(&lab, ["demo.pid", "helper.pid"]);
    let guard = pid_in(&lab, 1, "run/safekit/guard.pid").expect("guard.pid");
    assert!(alive(guard));
    let daemon = i32::try_from(lab.daemon_pid(1).unwrap()).unwrap();
    // SAFETY: kill(2) of the daemon this lab started.
    unsafe { libc::kill(daemon, libc::SIGTERM) };
    assert!(
        lab.wait_daemon(1, Duration::from_secs(20)).is_some(),
        "safekitd did not stop on SIGTERM"
    );
    assert!(
        wait_for(Duration::from_secs(5), || !alive(guard)).is_some(),
        "the guard outlived a clean shutdown"
    );
    assert!(!alive(demo), "stop_prim did not stop the service");
    assert!(
        alive(helper),
        "the guard killed what a clean stop left running"
    );
    assert!(!has_vip(&lab, 1, vip(subnet)), "the VIP stayed on node1");
    assert!(!lab.root(1).join("run/safekit/guard.pid").exists());
    assert!(
        !log(&lab, 1, "web").contains("safekitd died"),
        "{}",
        log(&lab, 1, "web")
    );
}
