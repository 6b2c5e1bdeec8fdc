//! Mirror module end to end (issue: mirror): real daemons in namespaces, a
//! client namespace, the demo TCP service started by `start_prim`, a VIP
//! moved by gratuitous ARP.

mod common;

use std::{
    net::{Ipv4Addr, SocketAddr},
    time::Duration,
};

use common::{Lab, LabModule, ask, demo_scripts, in_netns, serial, status, wait_for};
use safekit::status::ModuleState;

const PORT: u16 = 7000;

fn vip(subnet: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 77, subnet, 100)
}

fn module(subnet: u8, extra: &str) -> LabModule {
    LabModule {
        name: "web".into(),
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
            vip(subnet)
        ),
        scripts: demo_scripts("start_prim", "stop_prim", &format!("0.0.0.0:{PORT}")),
    }
}

fn state(lab: &Lab, node: usize) -> Option<ModuleState> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| status(lab, node)))
        .ok()
        .and_then(|s| s.module("web").map(|m| m.state))
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

/// The demo service's answer through the VIP, from the client namespace.
fn answer(lab: &Lab, subnet: u8, src_port: u16) -> Result<String, String> {
    let src = SocketAddr::from((lab.spec().client_addr(), src_port));
    let dst = SocketAddr::from((vip(subnet), PORT));
    in_netns(&lab.spec().client_ns(), move || ask(src, dst))
}

fn mac_of(lab: &Lab, node: usize) -> String {
    let out = lab
        .exec(
            &lab.spec().node_ns(node),
            &["cat", "/sys/class/net/eth0/address"],
        )
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn neigh(lab: &Lab, subnet: u8) -> String {
    let out = lab
        .exec(
            &lab.spec().client_ns(),
            &[
                "ip",
                "neigh",
                "show",
                &vip(subnet).to_string(),
                "dev",
                "eth0",
            ],
        )
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn start_both(lab: &mut Lab) {
    lab.start_daemon(1).unwrap();
    lab.start_daemon(2).unwrap();
    for n in [1, 2] {
        let (ok, text) = cli(lab, n, &["start", "-m", "web"]);
        assert!(ok, "start on node{n}: {text}");
    }
}

#[test]
fn failover_by_gratuitous_arp_then_failback_and_swap() {
    let _serial = serial();
    let subnet = 31;
    let mut lab = common::lab("skmr1", subnet, 2, vec![module(subnet, "")]);
    start_both(&mut lab);
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
        .is_some()
    );
    assert!(
        neigh(&lab, subnet).contains(&mac_of(&lab, 1)),
        "client learnt node1's MAC"
    );

    // kill -9 of node1's daemon and of its service.
    let pid = std::fs::read_to_string(lab.root(1).join("demo.pid")).unwrap();
    lab.kill_daemon(1);
    // SAFETY: kill(2) of the demo service pid node1's script recorded.
    unsafe { libc::kill(pid.trim().parse().unwrap(), libc::SIGKILL) };
    // From now on the client sends nothing to the VIP until node2 is ALONE:
    // record every ARP request the client sends meanwhile.
    let client_ns = lab.spec().client_ns();
    let watcher = std::thread::spawn(move || {
        in_netns(&client_ns, || count_arp_requests(Duration::from_secs(4)))
    });
    assert!(
        wait_states(&lab, &[(2, ModuleState::Alone)], Duration::from_secs(5)),
        "node2 not ALONE"
    );
    std::thread::sleep(Duration::from_millis(300));
    let node2_mac = mac_of(&lab, 2);
    let entry = neigh(&lab, subnet);
    assert!(
        entry.contains(&node2_mac),
        "client's entry for the VIP did not move to node2 ({node2_mac}): {entry}"
    );
    assert_eq!(
        watcher.join().unwrap(),
        0,
        "the client sent ARP requests: the move was not by gratuitous ARP alone"
    );
    assert_eq!(answer(&lab, subnet, 40002).as_deref(), Ok("node2"));

    // node1 returns: SECOND.
    lab.start_daemon(1).unwrap();
    let (ok, text) = cli(&lab, 1, &["start", "-m", "web"]);
    assert!(ok, "{text}");
    assert!(
        wait_states(
            &lab,
            &[(1, ModuleState::Second), (2, ModuleState::Prim)],
            Duration::from_secs(10)
        ),
        "after return: {:?} {:?}",
        state(&lab, 1),
        state(&lab, 2)
    );

    // swap: node1 PRIM, node2 SECOND, the service moved.
    let (ok, text) = cli(&lab, 2, &["swap", "-m", "web"]);
    assert!(ok, "swap: {text}");
    assert!(
        wait_states(
            &lab,
            &[(1, ModuleState::Prim), (2, ModuleState::Second)],
            Duration::from_secs(10)
        ),
        "after swap: {:?} {:?}",
        state(&lab, 1),
        state(&lab, 2)
    );
    assert!(
        wait_for(Duration::from_secs(5), || answer(&lab, subnet, 40003)
            .as_deref()
            == Ok("node1"))
        .is_some()
    );
}

/// ARP requests sent by this namespace's eth0 during `d`.
fn count_arp_requests(d: Duration) -> usize {
    // SAFETY: plain socket syscalls on a fd we own and close.
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
        let mut own = [0u8; 6];
        let mac = std::fs::read_to_string("/sys/class/net/eth0/address").unwrap();
        for (i, b) in mac.trim().split(':').enumerate() {
            own[i] = u8::from_str_radix(b, 16).unwrap();
        }
        let start = std::time::Instant::now();
        let mut n = 0;
        let mut buf = [0u8; 128];
        while start.elapsed() < d {
            let r = libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0);
            // Ethernet source = us, ARP opcode 1 (request).
            if r >= 42 && buf[6..12] == own && buf[20..22] == [0, 1] {
                n += 1;
            }
        }
        libc::close(fd);
        n
    }
}

#[test]
fn the_stale_node_waits_and_prim_forces_it() {
    let _serial = serial();
    let subnet = 32;
    let mut lab = common::lab("skmr2", subnet, 2, vec![module(subnet, "")]);
    start_both(&mut lab);
    assert!(wait_states(
        &lab,
        &[(1, ModuleState::Prim), (2, ModuleState::Second)],
        Duration::from_secs(10)
    ));
    // node2 goes away (SECOND), node1 goes on ALONE and its data moves ahead.
    lab.kill_daemon(2);
    assert!(wait_states(
        &lab,
        &[(1, ModuleState::Alone)],
        Duration::from_secs(5)
    ));
    // Both stopped; only node2 (stale) is started: WAIT, never ALONE.
    let (ok, text) = cli(&lab, 1, &["stop", "-m", "web"]);
    assert!(ok, "{text}");
    assert!(wait_states(
        &lab,
        &[(1, ModuleState::Stop)],
        Duration::from_secs(5)
    ));
    lab.kill_daemon(1);
    lab.start_daemon(2).unwrap();
    let (ok, text) = cli(&lab, 2, &["start", "-m", "web"]);
    assert!(ok, "{text}");
    std::thread::sleep(Duration::from_millis(2500)); // > heartbeat timeout
    assert_eq!(
        state(&lab, 2),
        Some(ModuleState::Wait),
        "stale node must not start the application"
    );
    // The operator forces it.
    let (ok, text) = cli(&lab, 2, &["prim", "-m", "web"]);
    assert!(ok, "prim: {text}");
    assert!(wait_states(
        &lab,
        &[(2, ModuleState::Alone)],
        Duration::from_secs(5)
    ));
    assert!(
        wait_for(Duration::from_secs(5), || answer(&lab, subnet, 40011)
            .as_deref()
            == Ok("node2"))
        .is_some()
    );
}

/// Both node states at once; true when both run the application.
fn both_primary(lab: &Lab) -> bool {
    let p = |s: Option<ModuleState>| matches!(s, Some(ModuleState::Prim | ModuleState::Alone));
    p(state(lab, 1)) && p(state(lab, 2))
}

#[test]
fn split_brain_with_a_witness_reachable_only_from_node2() {
    let _serial = serial();
    let subnet = 33;
    let witness = Ipv4Addr::new(10, 77, subnet, 250); // the client namespace
    let extra = format!("\n[check.splitbrain]\nwitness = [\"{witness}\"]\ntimeout = \"500ms\"\n");
    let mut lab = common::lab("skmr3", subnet, 2, vec![module(subnet, &extra)]);
    start_both(&mut lab);
    assert!(wait_states(
        &lab,
        &[(1, ModuleState::Prim), (2, ModuleState::Second)],
        Duration::from_secs(10)
    ));
    let spec = lab.spec().clone();
    let (n1, n2) = (spec.node_addr(1).to_string(), spec.node_addr(2).to_string());
    // Cut the inter-node link both ways; node1 also loses the witness.
    for (ns, dst) in [
        (spec.node_ns(1), n2.as_str()),
        (spec.node_ns(1), &witness.to_string()),
        (spec.node_ns(2), n1.as_str()),
    ] {
        let out = lab
            .exec(
                &ns,
                &["ip", "route", "add", "blackhole", &format!("{dst}/32")],
            )
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Watch for 6 s: never both primary; then node2 ALONE, node1 WAIT.
    let start = std::time::Instant::now();
    while start.elapsed() < Duration::from_secs(6) {
        assert!(
            !both_primary(&lab),
            "both nodes primary at {:?}",
            start.elapsed()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(state(&lab, 2), Some(ModuleState::Alone));
    assert_eq!(state(&lab, 1), Some(ModuleState::Wait));
    assert!(
        !lab.root(1).join("demo.pid").exists(),
        "node1 still runs the application"
    );
}

#[test]
fn errd_restarts_the_application_then_past_maxloop_stops_and_fails_over() {
    let _serial = serial();
    let subnet = 34;
    let extra = "\n[errd]\npoll_interval = \"200ms\"\n[[errd.proc]]\nname = \"safekit-demo\"\natleast = 1\naction = \"restart\"\nclass = \"prim\"\n";
    let mut m = module(subnet, extra);
    m.toml = m.toml.replace(
        "nodes = [\"node1\", \"node2\"]",
        "nodes = [\"node1\", \"node2\"]\nmaxloop = 2",
    );
    let mut lab = common::lab("skmr4", subnet, 2, vec![m]);
    start_both(&mut lab);
    assert!(wait_states(
        &lab,
        &[(1, ModuleState::Prim), (2, ModuleState::Second)],
        Duration::from_secs(10)
    ));
    let pid = |lab: &Lab| {
        std::fs::read_to_string(lab.root(1).join("demo.pid"))
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok())
    };
    for round in 1..=2 {
        let old = wait_for(Duration::from_secs(5), || pid(&lab).is_some())
            .and_then(|_| pid(&lab))
            .expect("demo pid");
        // SAFETY: kill(2) of the demo service started by node1's script.
        unsafe { libc::kill(old, libc::SIGKILL) };
        assert!(
            wait_for(Duration::from_secs(5), || pid(&lab)
                .is_some_and(|p| p != old))
            .is_some(),
            "round {round}: not restarted"
        );
        assert!(
            wait_for(Duration::from_secs(5), || answer(
                &lab,
                subnet,
                40020 + round
            )
            .as_deref()
                == Ok("node1"))
            .is_some()
        );
        assert_eq!(state(&lab, 1), Some(ModuleState::Prim));
    }
    // Third failure: past maxloop, the module stops on node1 and node2 takes over.
    let old = wait_for(Duration::from_secs(5), || pid(&lab).is_some())
        .and_then(|_| pid(&lab))
        .unwrap();
    // SAFETY: as above.
    unsafe { libc::kill(old, libc::SIGKILL) };
    assert!(
        wait_states(
            &lab,
            &[(1, ModuleState::Stop), (2, ModuleState::Alone)],
            Duration::from_secs(10)
        ),
        "after maxloop: {:?} {:?}",
        state(&lab, 1),
        state(&lab, 2)
    );
    assert!(
        wait_for(Duration::from_secs(5), || answer(&lab, subnet, 40030)
            .as_deref()
            == Ok("node2"))
        .is_some()
    );
}
