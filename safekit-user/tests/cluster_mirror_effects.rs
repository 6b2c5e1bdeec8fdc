//! Mirror module effects end to end (issue: mirror): `forcestop`, the order
//! of `prestart` / `start_prim` / `stop_prim` / `poststop`, scripts refused
//! when not root-owned, `stop_prim force` bounded by `force_stop_timeout`,
//! periodic gratuitous ARP (`arp_reroute`) and `tcp_reset`. Real daemons in
//! namespaces, a client namespace, real scripts.

mod common;

use std::{
    io::Read as _,
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    sync::mpsc,
    time::{Duration, Instant},
};

use common::{
    Lab, LabModule, alive, ask, demo_bin, has_vip, in_netns, pid_in, serial, spawn_in_netns,
    state_of, wait_for,
};
use safekit::status::ModuleState;

const PORT: u16 = 7000;

fn vip(subnet: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 77, subnet, 100)
}

/// Mirror module `name` on node1/node2 (node1 preferred), VIP
/// 10.77.`subnet`.`host`, short heartbeat timeout.
fn module(name: &str, subnet: u8, host: u8, extra: &str, scripts: &[(&str, &str)]) -> LabModule {
    LabModule {
        name: name.into(),
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
{extra}"#,
            Ipv4Addr::new(10, 77, subnet, host)
        ),
        scripts: scripts
            .iter()
            .map(|(n, t)| ((*n).to_owned(), (*t).to_owned()))
            .collect(),
    }
}

/// `start_prim`: the demo service on PORT answering with the node name,
/// its pid in `$SAFE_ROOT/demo.pid`.
fn start_demo() -> String {
    format!(
        "#!/bin/sh\n\"{}\" --listen 0.0.0.0:{PORT} --text \"$SAFE_NODE\" --pidfile \"$SAFE_ROOT/demo.pid\" >/dev/null 2>&1 &\necho \"demo service started on $SAFE_NODE\"\n",
        demo_bin().display()
    )
}

/// Shell lines killing the demo service.
const KILL_DEMO: &str = "[ -f \"$SAFE_ROOT/demo.pid\" ] && kill \"$(cat \"$SAFE_ROOT/demo.pid\")\" 2>/dev/null\nrm -f \"$SAFE_ROOT/demo.pid\"\n";

fn wait_states(lab: &Lab, want: &[(usize, ModuleState)], limit: Duration) -> bool {
    wait_for(limit, || {
        want.iter()
            .all(|(n, s)| state_of(lab, *n, "web") == Some(*s))
    })
    .is_some()
}

fn cli(lab: &Lab, node: usize, args: &[&str]) -> (bool, String) {
    let out = lab.safekit(node, args).expect("running safekit");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn start(lab: &Lab, node: usize, module: &str) {
    let (ok, text) = cli(lab, node, &["start", "-m", module]);
    assert!(ok, "start {module} on node{node}: {text}");
}

/// The demo service's answer through the VIP, from the client namespace.
fn answer(lab: &Lab, subnet: u8, src_port: u16) -> Result<String, String> {
    let src = SocketAddr::from((lab.spec().client_addr(), src_port));
    let dst = SocketAddr::from((vip(subnet), PORT));
    in_netns(&lab.spec().client_ns(), move || ask(src, dst))
}

/// Node `node` answers through the VIP within 5 s.
fn serves(lab: &Lab, subnet: u8, src_port: u16, node: usize) -> bool {
    let want = format!("node{node}");
    wait_for(Duration::from_secs(5), || {
        answer(lab, subnet, src_port).as_deref() == Ok(want.as_str())
    })
    .is_some()
}

/// The module log of node `node`.
fn log(lab: &Lab, node: usize) -> String {
    std::fs::read_to_string(lab.root(node).join("var/log/safekit/web.log")).unwrap_or_default()
}

#[test]
fn forcestop_runs_stop_prim_force_at_once_and_interrupts_a_hanging_stop() {
    let _serial = serial();
    let subnet = 71;
    // The nice stop_prim hangs (60 s, below nice_stop_timeout); `force`
    // stops the service at once.
    let stop_prim = format!(
        "#!/bin/sh\nif [ \"$1\" = force ]; then\n{KILL_DEMO}echo forced >> \"$SAFE_ROOT/forced\"\nexit 0\nfi\necho $$ > \"$SAFE_ROOT/nice.pid\"\nexec sleep 60\n"
    );
    let m = module(
        "web",
        subnet,
        100,
        "\n[user]\nnice_stop_timeout = \"90s\"\n",
        &[("start_prim", &start_demo()), ("stop_prim", &stop_prim)],
    );
    let mut lab = common::lab("skme1", subnet, 2, vec![m]);
    lab.start_daemon(1).unwrap();
    lab.start_daemon(2).unwrap();
    start(&lab, 1, "web");
    start(&lab, 2, "web");
    assert!(
        wait_states(
            &lab,
            &[(1, ModuleState::Prim), (2, ModuleState::Second)],
            Duration::from_secs(10)
        ),
        "not PRIM/SECOND"
    );
    assert!(serves(&lab, subnet, 40001, 1));
    let demo1 = pid_in(&lab, 1, "demo.pid").expect("node1's demo pid");

    // forcestop on the primary: STOP at once, without the nice stop_prim.
    let t0 = Instant::now();
    let (ok, text) = cli(&lab, 1, &["forcestop", "-m", "web"]);
    assert!(ok, "forcestop: {text}");
    assert!(
        wait_states(&lab, &[(1, ModuleState::Stop)], Duration::from_secs(10)),
        "node1 not STOP after forcestop: {:?}",
        state_of(&lab, 1, "web")
    );
    let took = t0.elapsed();
    println!("forcestop: STOP after {took:?}");
    assert!(took < Duration::from_secs(10));
    assert!(!alive(demo1), "node1's service still runs");
    assert!(!has_vip(&lab, 1, vip(subnet)), "the VIP stayed on node1");
    assert!(
        !lab.root(1).join("nice.pid").exists(),
        "the nice stop_prim ran: {}",
        log(&lab, 1)
    );
    assert!(log(&lab, 1).contains("running stop_prim force"));
    // The peer takes over.
    assert!(wait_states(
        &lab,
        &[(2, ModuleState::Alone)],
        Duration::from_secs(5)
    ));
    assert!(serves(&lab, subnet, 40002, 2));

    // node1 returns (SECOND); a plain stop of node2 hangs in stop_prim...
    start(&lab, 1, "web");
    assert!(
        wait_states(
            &lab,
            &[(1, ModuleState::Second), (2, ModuleState::Prim)],
            Duration::from_secs(10)
        ),
        "node1 back: {:?} {:?}",
        state_of(&lab, 1, "web"),
        state_of(&lab, 2, "web")
    );
    let demo2 = pid_in(&lab, 2, "demo.pid").expect("node2's demo pid");
    let (ok, text) = cli(&lab, 2, &["stop", "-m", "web"]);
    assert!(ok, "stop: {text}");
    let nice = wait_for(Duration::from_secs(5), || {
        pid_in(&lab, 2, "nice.pid").is_some()
    })
    .and_then(|_| pid_in(&lab, 2, "nice.pid"))
    .expect("the nice stop_prim runs on node2");
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        state_of(&lab, 2, "web"),
        Some(ModuleState::Prim),
        "still stopping"
    );
    assert!(alive(nice));
    // ... and forcestop ends it at once.
    let t0 = Instant::now();
    let (ok, text) = cli(&lab, 2, &["forcestop", "-m", "web"]);
    assert!(ok, "forcestop: {text}");
    assert!(
        wait_states(&lab, &[(2, ModuleState::Stop)], Duration::from_secs(10)),
        "node2 not STOP after forcestop: {:?}",
        state_of(&lab, 2, "web")
    );
    println!(
        "forcestop during a hanging stop_prim: STOP after {:?}",
        t0.elapsed()
    );
    assert!(!alive(nice), "the hanging stop_prim was not killed");
    assert!(!alive(demo2), "node2's service still runs");
    assert!(!has_vip(&lab, 2, vip(subnet)), "the VIP stayed on node2");
    assert!(log(&lab, 2).contains("interrupted by forcestop"));
    assert!(wait_states(
        &lab,
        &[(1, ModuleState::Alone)],
        Duration::from_secs(5)
    ));
    assert!(serves(&lab, subnet, 40003, 1));
}

#[test]
fn prestart_completes_before_start_prim_and_poststop_follows_stop_prim() {
    let _serial = serial();
    let subnet = 72;
    let prestart = "#!/bin/sh\nrm -f \"$SAFE_ROOT/prestart.done\"\nsleep 1\necho done > \"$SAFE_ROOT/prestart.done\"\n";
    let start_prim = format!(
        "#!/bin/sh\nif [ ! -f \"$SAFE_ROOT/prestart.done\" ]; then echo \"prestart has not finished\"; exit 1; fi\n{}",
        start_demo().trim_start_matches("#!/bin/sh\n")
    );
    let stop_prim =
        format!("#!/bin/sh\nsleep 0.5\n{KILL_DEMO}echo done > \"$SAFE_ROOT/stop_prim.done\"\n");
    let poststop = "#!/bin/sh\nif [ -f \"$SAFE_ROOT/stop_prim.done\" ]; then echo after > \"$SAFE_ROOT/poststop.done\"; else echo before > \"$SAFE_ROOT/poststop.done\"; fi\n";
    let m = module(
        "web",
        subnet,
        100,
        "",
        &[
            ("prestart", prestart),
            ("start_prim", &start_prim),
            ("stop_prim", &stop_prim),
            ("poststop", poststop),
        ],
    );
    let mut lab = common::lab("skme2", subnet, 2, vec![m]);
    lab.start_daemon(1).unwrap();
    lab.start_daemon(2).unwrap();
    start(&lab, 1, "web");
    start(&lab, 2, "web");
    assert!(
        wait_states(
            &lab,
            &[(1, ModuleState::Prim), (2, ModuleState::Second)],
            Duration::from_secs(10)
        ),
        "not PRIM/SECOND: {:?} {:?}\n{}",
        state_of(&lab, 1, "web"),
        state_of(&lab, 2, "web"),
        log(&lab, 1)
    );
    assert!(serves(&lab, subnet, 40001, 1), "{}", log(&lab, 1));
    let text = log(&lab, 1);
    assert!(
        !text.contains("prestart has not finished"),
        "start_prim ran before prestart finished:\n{text}"
    );
    // node2's prestart (1 s) runs beside node1's: SECOND does not wait for
    // it, so it may still run when node1 is PRIM.
    assert!(
        wait_for(Duration::from_secs(5), || lab
            .root(2)
            .join("prestart.done")
            .exists())
        .is_some(),
        "node2's prestart"
    );

    // Stopped: poststop runs, after stop_prim.
    let (ok, text) = cli(&lab, 1, &["stop", "-m", "web"]);
    assert!(ok, "stop: {text}");
    let done = lab.root(1).join("poststop.done");
    assert!(
        wait_for(Duration::from_secs(10), || done.exists()).is_some(),
        "poststop did not run:\n{}",
        log(&lab, 1)
    );
    assert_eq!(
        std::fs::read_to_string(&done).unwrap().trim(),
        "after",
        "poststop ran before stop_prim finished"
    );
    assert_eq!(state_of(&lab, 1, "web"), Some(ModuleState::Stop));
    assert!(wait_states(
        &lab,
        &[(2, ModuleState::Alone)],
        Duration::from_secs(5)
    ));
    assert!(serves(&lab, subnet, 40002, 2));

    // A stop while prestart still runs: start_prim never runs.
    let (ok, text) = cli(&lab, 2, &["stop", "-m", "web"]);
    assert!(ok, "stop node2: {text}");
    assert!(wait_states(
        &lab,
        &[(2, ModuleState::Stop)],
        Duration::from_secs(10)
    ));
    std::fs::remove_file(&done).unwrap();
    let started = |lab: &Lab| log(lab, 1).matches("running start_prim").count();
    let before = started(&lab);
    let (ok, text) = cli(&lab, 1, &["prim", "-m", "web"]);
    assert!(ok, "prim: {text}");
    std::thread::sleep(Duration::from_millis(300));
    let (ok, text) = cli(&lab, 1, &["stop", "-m", "web"]);
    assert!(ok, "stop during prestart: {text}");
    assert!(
        wait_for(Duration::from_secs(10), || done.exists()).is_some(),
        "poststop after the cancelled start:\n{}",
        log(&lab, 1)
    );
    assert_eq!(state_of(&lab, 1, "web"), Some(ModuleState::Stop));
    let text = log(&lab, 1);
    assert_eq!(started(&lab), before, "start_prim ran:\n{text}");
    assert!(text.contains("stopped before start_prim ran"), "{text}");
    assert!(!has_vip(&lab, 1, vip(subnet)), "the VIP is on node1");
}

#[test]
fn a_script_not_owned_by_root_is_refused_and_a_failing_stop_prim_is_forced_within_its_timeout() {
    let _serial = serial();
    let subnet = 73;
    // stop_prim fails; `stop_prim force` stops the service, then hangs
    // past force_stop_timeout (1 s) and is killed.
    let stop_prim = format!(
        "#!/bin/sh\nif [ \"$1\" != force ]; then echo \"nice stop fails\"; exit 1; fi\n{KILL_DEMO}echo $$ > \"$SAFE_ROOT/force.pid\"\nexec sleep 60\n"
    );
    let m = module(
        "web",
        subnet,
        100,
        "\n[user]\nforce_stop_timeout = \"1s\"\n",
        &[
            ("start_prim", &start_demo()),
            ("stop_prim", &stop_prim),
            // Holds start_prim back until node1 is PRIM with node2 in sync
            // (a heartbeat exchange): a SECOND its primary never counted
            // does not take over (SPEC §5), and start_prim no longer waits
            // for the gratuitous ARP burst that used to give that time.
            ("prestart", "#!/bin/sh\nsleep 0.5\n"),
        ],
    );
    let mut lab = common::lab("skme3", subnet, 2, vec![m]);
    // node1's start_prim belongs to nobody.
    let script = lab.root(1).join("etc/safekit/modules/web/bin/start_prim");
    std::os::unix::fs::chown(&script, Some(65534), Some(65534)).unwrap();
    lab.start_daemon(1).unwrap();
    lab.start_daemon(2).unwrap();
    start(&lab, 1, "web");
    start(&lab, 2, "web");
    // node1 would be primary but refuses its start_prim: it stops there and
    // node2 takes over.
    assert!(
        wait_states(
            &lab,
            &[(1, ModuleState::Stop), (2, ModuleState::Alone)],
            Duration::from_secs(15)
        ),
        "{:?} {:?}\n{}",
        state_of(&lab, 1, "web"),
        state_of(&lab, 2, "web"),
        log(&lab, 1)
    );
    let text = log(&lab, 1);
    assert!(
        text.contains(&format!(
            "refusing to run {}: {} is owned by uid 65534, not root",
            script.display(),
            script.display()
        )),
        "no clear refusal in node1's log:\n{text}"
    );
    assert!(
        !lab.root(1).join("demo.pid").exists(),
        "node1 ran its start_prim"
    );
    assert!(!has_vip(&lab, 1, vip(subnet)), "the VIP stayed on node1");
    assert!(serves(&lab, subnet, 40001, 2));

    // node2's stop_prim fails: stop_prim force runs, killed after 1 s.
    let demo = pid_in(&lab, 2, "demo.pid").expect("node2's demo pid");
    let t0 = Instant::now();
    let (ok, text) = cli(&lab, 2, &["stop", "-m", "web"]);
    assert!(ok, "stop: {text}");
    assert!(
        wait_states(&lab, &[(2, ModuleState::Stop)], Duration::from_secs(15)),
        "node2 not STOP: {:?}\n{}",
        state_of(&lab, 2, "web"),
        log(&lab, 2)
    );
    let took = t0.elapsed();
    println!("failing stop_prim, hanging stop_prim force: STOP after {took:?}");
    assert!(
        took >= Duration::from_secs(1),
        "the force stop was not waited for"
    );
    let force = pid_in(&lab, 2, "force.pid").expect("stop_prim force ran");
    assert!(!alive(force), "stop_prim force outlived force_stop_timeout");
    assert!(!alive(demo), "node2's service still runs");
    assert!(!has_vip(&lab, 2, vip(subnet)), "the VIP stayed on node2");
    let text = log(&lab, 2);
    assert!(text.contains("nice stop fails"), "{text}");
    assert!(text.contains("timed out after 1s"), "{text}");
}

/// Gratuitous ARPs (sender and target address `v`) seen on this
/// namespace's eth0 during `d`, for each address of `vips`.
fn count_garps(vips: &[Ipv4Addr], d: Duration) -> Vec<usize> {
    let mut counts = vec![0; vips.len()];
    // SAFETY: plain socket syscalls on a fd we own and close; recv writes
    // at most buf.len() bytes into buf.
    unsafe {
        let proto = u16::try_from(libc::ETH_P_ARP).unwrap().to_be();
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto));
        assert!(fd >= 0, "{}", std::io::Error::last_os_error());
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 100_000,
        };
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const tv).cast(),
            u32::try_from(size_of::<libc::timeval>()).unwrap(),
        );
        let start = Instant::now();
        let mut buf = [0u8; 128];
        while start.elapsed() < d {
            let r = libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0);
            if r < 42 {
                continue;
            }
            let (spa, tpa) = (&buf[28..32], &buf[38..42]);
            for (i, v) in vips.iter().enumerate() {
                if spa == v.octets() && tpa == v.octets() {
                    counts[i] += 1;
                }
            }
        }
        libc::close(fd);
    }
    counts
}

#[test]
fn arp_reroute_keeps_announcing_the_vip_and_without_it_nothing_follows_the_takeover() {
    let _serial = serial();
    let subnet = 74;
    let (with, without) = (
        Ipv4Addr::new(10, 77, subnet, 100),
        Ipv4Addr::new(10, 77, subnet, 101),
    );
    let reroute = module(
        "web",
        subnet,
        100,
        "arp_reroute = true\narp_interval = \"200ms\"\narp_elapse = \"30s\"\n",
        &[],
    );
    let plain = module("plain", subnet, 101, "", &[]);
    let mut lab = common::lab("skme4", subnet, 2, vec![reroute, plain]);
    lab.start_daemon(1).unwrap();
    lab.start_daemon(2).unwrap();
    for name in ["web", "plain"] {
        start(&lab, 1, name);
        start(&lab, 2, name);
    }
    assert!(
        wait_for(Duration::from_secs(10), || {
            ["web", "plain"]
                .iter()
                .all(|m| state_of(&lab, 1, m) == Some(ModuleState::Prim))
        })
        .is_some(),
        "node1 not primary of both modules"
    );
    // The takeover bursts (3 x 50 ms) are over.
    std::thread::sleep(Duration::from_millis(500));
    let vips = [with, without];
    let counts = in_netns(&lab.spec().client_ns(), move || {
        count_garps(&vips, Duration::from_millis(1200))
    });
    println!(
        "gratuitous ARPs over 1.2 s: arp_reroute {}, without {}",
        counts[0], counts[1]
    );
    assert!(
        counts[0] >= 3,
        "arp_reroute (every 200 ms): only {} gratuitous ARPs in 1.2 s",
        counts[0]
    );
    assert_eq!(counts[1], 0, "gratuitous ARPs without arp_reroute");
    // They stop with the primary.
    let (ok, text) = cli(&lab, 1, &["stop", "-m", "web"]);
    assert!(ok, "{text}");
    assert!(
        wait_for(Duration::from_secs(10), || state_of(&lab, 1, "web")
            == Some(ModuleState::Stop))
        .is_some()
    );
    let node1_mac = {
        let out = lab
            .exec(
                &lab.spec().node_ns(1),
                &["cat", "/sys/class/net/eth0/address"],
            )
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    // node2 took over and announces from its own MAC; node1 sends nothing
    // more: count frames from node1's MAC only.
    let client = lab.spec().client_ns();
    let from_node1 = in_netns(&client, move || {
        count_garps_from(&node1_mac, with, Duration::from_millis(1000))
    });
    assert_eq!(
        from_node1, 0,
        "node1 still announces the VIP after stopping"
    );
}

/// Gratuitous ARPs for `v` sent from Ethernet address `mac` during `d`.
fn count_garps_from(mac: &str, v: Ipv4Addr, d: Duration) -> usize {
    let mut want = [0u8; 6];
    for (i, b) in mac.split(':').enumerate() {
        want[i] = u8::from_str_radix(b, 16).unwrap();
    }
    // SAFETY: as in count_garps.
    unsafe {
        let proto = u16::try_from(libc::ETH_P_ARP).unwrap().to_be();
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto));
        assert!(fd >= 0);
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 100_000,
        };
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const tv).cast(),
            u32::try_from(size_of::<libc::timeval>()).unwrap(),
        );
        let start = Instant::now();
        let mut n = 0;
        let mut buf = [0u8; 128];
        while start.elapsed() < d {
            let r = libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0);
            if r >= 42
                && buf[6..12] == want
                && buf[28..32] == v.octets()
                && buf[38..42] == v.octets()
            {
                n += 1;
            }
        }
        libc::close(fd);
        n
    }
}

#[test]
fn tcp_reset_resets_the_clients_of_the_vip_when_the_primary_hands_over() {
    let _serial = serial();
    let subnet = 75;
    let held_port = 7100;
    let m = module("web", subnet, 100, "tcp_reset = true\n", &[]);
    let mut lab = common::lab("skme5", subnet, 2, vec![m]);
    lab.start_daemon(1).unwrap();
    lab.start_daemon(2).unwrap();
    start(&lab, 1, "web");
    start(&lab, 2, "web");
    assert!(wait_states(
        &lab,
        &[(1, ModuleState::Prim), (2, ModuleState::Second)],
        Duration::from_secs(10)
    ));
    // A service on node1 that holds its connections open (and is not
    // stopped by stop_prim): one client through the VIP, one through
    // node1's own address.
    let (ready_tx, ready_rx) = mpsc::channel();
    let (quit_tx, quit_rx) = mpsc::channel::<()>();
    let server = spawn_in_netns(&lab.spec().node_ns(1), move || {
        let l = TcpListener::bind(("0.0.0.0", held_port)).expect("bind");
        ready_tx.send(()).unwrap();
        let mut held = Vec::new();
        for _ in 0..2 {
            if let Ok((s, _)) = l.accept() {
                held.push(s);
            }
        }
        let _ = quit_rx.recv_timeout(Duration::from_secs(30));
        drop(held);
    });
    ready_rx.recv_timeout(Duration::from_secs(5)).unwrap();
    let node1 = lab.spec().node_addr(1);
    let v = vip(subnet);
    let (conn_tx, conn_rx) = mpsc::channel();
    let client = spawn_in_netns(&lab.spec().client_ns(), move || {
        let through_vip =
            TcpStream::connect_timeout(&SocketAddr::from((v, held_port)), Duration::from_secs(3))
                .expect("connect to the VIP");
        let direct = TcpStream::connect_timeout(
            &SocketAddr::from((node1, held_port)),
            Duration::from_secs(3),
        )
        .expect("connect to node1");
        conn_tx.send(()).unwrap();
        through_vip
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut buf = [0u8; 16];
        let r = (&through_vip).read(&mut buf);
        let at = Instant::now();
        // The connection to node1's own address is not the VIP's: intact.
        direct
            .set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let d = (&direct).read(&mut buf);
        (r.map_err(|e| e.kind()), at, d.map_err(|e| e.kind()))
    });
    conn_rx.recv_timeout(Duration::from_secs(5)).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let t0 = Instant::now();
    let (ok, text) = cli(&lab, 1, &["swap", "-m", "web"]);
    assert!(ok, "swap: {text}");
    let (through_vip, at, direct) = client.join().unwrap();
    let after = at.duration_since(t0);
    println!("client of the VIP: {through_vip:?} {after:?} after swap");
    assert!(
        matches!(
            through_vip,
            Err(std::io::ErrorKind::ConnectionReset) | Ok(0)
        ),
        "the client of the VIP was not reset: {through_vip:?}\n{}",
        log(&lab, 1)
    );
    assert!(
        after < Duration::from_secs(2),
        "reset only {after:?} after swap"
    );
    assert!(
        matches!(
            direct,
            Err(std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)
        ),
        "the connection to node1's own address was touched: {direct:?}"
    );
    assert!(log(&lab, 1).contains(&format!("TCP connections of {v} reset")));
    assert!(wait_states(
        &lab,
        &[(1, ModuleState::Second), (2, ModuleState::Prim)],
        Duration::from_secs(10)
    ));
    let _ = quit_tx.send(());
    server.join().unwrap();
}
