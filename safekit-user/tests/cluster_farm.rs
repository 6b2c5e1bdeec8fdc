//! Farm module end to end (issue: farm): 3 nodes and a client on a bridge,
//! real XDP filters, a VIP answered by ARP from XDP with the virtual MAC, the
//! demo service started by `start_both`.

mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use common::{
    Lab, LabModule, ask_many, ask_within, demo_scripts, serial, spawn_in_netns, status, wait_for,
};
use safekit::control::{self, Request, Response};

const SUBNET: u8 = 21;
/// The farm's pulse (`pulse = "100ms"` below); a peer is lost after 10.
const PULSE: Duration = Duration::from_millis(100);
/// After a kill, every new connection must succeed once the loss is
/// detected (10 pulses) and a few pulses more have passed (views agree,
/// buckets written).
const TAKEOVER_GRACE: Duration = Duration::from_millis(15 * 100);
/// How long the client probes the VIP after a kill.
const PROBE_WINDOW: Duration = Duration::from_millis(3500);

fn vip() -> Ipv4Addr {
    Ipv4Addr::new(10, 77, SUBNET, 200)
}
fn vip_ip_only() -> Ipv4Addr {
    Ipv4Addr::new(10, 77, SUBNET, 201)
}

/// The modules, with extra `[farm]` keys (e.g. the filter backend).
fn modules_with(farm_extra: &str) -> Vec<LabModule> {
    vec![
        LabModule {
            name: "front".into(),
            toml: format!(
                r#"[service]
mode = "farm"

[farm]
pulse = "100ms"
{farm_extra}

[vip]
addrs = ["{}"]
[[vip.rule]]
proto = "tcp"
port = 80
filter = "client_ip_port"

[[check.tcp]]
host = "127.0.0.1"
port = 80
interval = "200ms"
timeout = "200ms"
"#,
                vip()
            ),
            scripts: demo_scripts("start_both", "stop_both", "0.0.0.0:80"),
        },
        // Same service, another VIP, balanced by client IP only.
        LabModule {
            name: "sticky".into(),
            toml: format!(
                r#"[service]
mode = "farm"

[farm]
pulse = "100ms"
{farm_extra}

[vip]
addrs = ["{}"]
[[vip.rule]]
proto = "tcp"
port = 80
filter = "client_ip"
"#,
                vip_ip_only()
            ),
            scripts: vec![],
        },
    ]
}

fn buckets(lab: &Lab, node: usize, module: &str) -> (BTreeSet<String>, BTreeSet<u32>) {
    let st = status(lab, node);
    let f = st
        .module(module)
        .and_then(|m| m.farm.clone())
        .unwrap_or_else(|| panic!("no farm status on node{node}"));
    (
        f.view.into_iter().collect(),
        f.buckets.into_iter().collect(),
    )
}

/// Every listed node sees exactly `members`, and their buckets partition the 256.
fn settled(
    lab: &Lab,
    nodes: &[usize],
    module: &str,
    members: &[&str],
) -> Option<Vec<BTreeSet<u32>>> {
    let want: BTreeSet<String> = members.iter().map(|s| (*s).to_owned()).collect();
    let mut all = Vec::new();
    for &n in nodes {
        let (view, b) = buckets(lab, n, module);
        if view != want {
            return None;
        }
        all.push(b);
    }
    let total: usize = all.iter().map(BTreeSet::len).sum();
    let union: BTreeSet<u32> = all.iter().flatten().copied().collect();
    (total == 256 && union.len() == 256).then_some(all)
}

fn which(lab: &Lab, node: usize, module: &str, client: Ipv4Addr, port: Option<u16>) -> String {
    let sock = lab.root(node).join("run/safekit/safekitd.sock");
    let req = Request::FarmWhich {
        module: module.into(),
        client: client.into(),
        port,
        dport: Some(80),
    };
    match control::call(&sock, &req, Duration::from_secs(5)).unwrap() {
        Response::Which { node: Some(n), .. } => n,
        other => panic!("which-node: {other:?}"),
    }
}

/// `safekit state -v -m front` on `node`: the buckets listed for each node
/// (count, and the ranges expanded), as the CLI prints them.
fn state_buckets(lab: &Lab, node: usize) -> BTreeMap<String, (usize, BTreeSet<u32>)> {
    let out = lab.safekit(node, &["state", "-v", "-m", "front"]).unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "state -v on node{node}: {text}");
    let mut lines = text.lines();
    assert!(
        lines.any(|l| l.trim_start().starts_with("buckets by node")),
        "no per-node buckets in state -v of node{node}:\n{text}"
    );
    let mut got = BTreeMap::new();
    for l in lines.take_while(|l| l.starts_with("        ")) {
        // "        node1: 85 buckets (0-1,5,...)"
        let (name, rest) = l.trim().split_once(": ").expect("node: count");
        let (count, ranges) = rest
            .split_once(" buckets (")
            .expect("count buckets (ranges)");
        let mut set = BTreeSet::new();
        for r in ranges
            .trim_end_matches(')')
            .split(',')
            .filter(|r| *r != "none")
        {
            let (a, b) = r.split_once('-').unwrap_or((r, r));
            set.extend(a.parse::<u32>().unwrap()..=b.parse::<u32>().unwrap());
        }
        got.insert(name.to_owned(), (count.parse().unwrap(), set));
    }
    got
}

/// `state -v` on `node` lists exactly `nodes`, each with the bucket count
/// it reports itself, the counts summing to 256 (a partition).
fn assert_state_lists_every_node(lab: &Lab, node: usize, nodes: &[usize]) {
    let listed = state_buckets(lab, node);
    let want: BTreeSet<String> = nodes.iter().map(|n| format!("node{n}")).collect();
    assert_eq!(
        listed.keys().cloned().collect::<BTreeSet<_>>(),
        want,
        "state -v on node{node}: {listed:?}"
    );
    let mut union = BTreeSet::new();
    for &n in nodes {
        let (count, set) = &listed[&format!("node{n}")];
        assert_eq!(*count, set.len(), "node{n}: count and ranges disagree");
        let (_, own) = buckets(lab, n, "front");
        assert_eq!(set, &own, "state -v on node{node}: node{n}'s buckets");
        union.extend(set.iter().copied());
    }
    let total: usize = listed.values().map(|(c, _)| c).sum();
    assert_eq!(total, 256, "state -v on node{node}: {listed:?}");
    assert_eq!(union.len(), 256);
}

/// One connection of the probe: when it started (after the kill), its
/// source port, the node that answered (or why not).
type Probe = (Duration, u16, Result<String, String>);

/// From the client namespace, alongside the test: one connection after
/// another to `dst`, each from a new source port, until `window` after
/// `since`.
fn probe(
    lab: &Lab,
    dst: SocketAddr,
    ports: std::ops::Range<u16>,
    since: Instant,
    window: Duration,
) -> std::thread::JoinHandle<Vec<Probe>> {
    let spec = lab.spec().clone();
    let client = spec.client_addr();
    spawn_in_netns(&spec.client_ns(), move || {
        let mut out = Vec::new();
        for port in ports {
            let at = since.elapsed();
            if at >= window {
                break;
            }
            let src = SocketAddr::from((client, port));
            out.push((at, port, ask_within(src, dst, PULSE * 5)));
            std::thread::sleep(Duration::from_millis(5));
        }
        out
    })
}

/// After node3's kill: node3 answered nothing, and every connection
/// started once the takeover grace had passed was served by node1 or node2.
fn assert_survivors_serve(probes: &[Probe]) {
    let mut late = 0;
    let mut early_failed = 0;
    for (at, port, answer) in probes {
        match answer {
            Ok(who) => assert!(
                who == "node1" || who == "node2",
                "{at:?} after node3's kill, source port {port} was served by {who}"
            ),
            Err(e) => {
                assert!(
                    *at < TAKEOVER_GRACE,
                    "{at:?} after node3's kill (grace {TAKEOVER_GRACE:?}), source port {port}: {e}"
                );
                early_failed += 1;
            }
        }
        if *at >= TAKEOVER_GRACE {
            late += 1;
        }
    }
    eprintln!(
        "{} probes after the kill: {early_failed} failed before the takeover grace, {late} after it, all served by node1/node2",
        probes.len()
    );
    assert!(late >= 20, "only {late} probes after the grace: {probes:?}");
}

/// `kill -9` of node3's safekitd while the client probes `dst`: node3's
/// filter (`what`, seen in the output of `show` in its namespace as
/// `marker`) is there before and gone right after; node1 and node2 take
/// node3's buckets over (the time it took is returned); node3 answered no
/// probe, and every probe after [`TAKEOVER_GRACE`] was served.
fn kill_node3_while_probing(
    lab: &mut Lab,
    dst: SocketAddr,
    what: &str,
    show: &[&str],
    marker: &str,
) -> Duration {
    let before = node_output(lab, 3, show);
    assert!(before.contains(marker), "no {what} on node3:\n{before}");
    lab.kill_daemon(3);
    let killed = Instant::now();
    let probes = probe(lab, dst, 30000..40000, killed, PROBE_WINDOW);
    let left = node_output(lab, 3, show);
    assert!(
        !left.contains(marker),
        "node3's {what} outlived its daemon:\n{left}"
    );
    let after = wait_for(Duration::from_secs(5), || {
        settled(lab, &[1, 2], "front", &["node1", "node2"]).is_some()
    })
    .expect("node1 and node2 never took over node3's buckets");
    eprintln!(
        "node3's buckets taken over {:?} after the kill (pulse 100 ms, lost after 10)",
        killed.elapsed()
    );
    assert_survivors_serve(&probes.join().expect("probe thread"));
    after
}

/// `cmd` run in node `node`'s namespace, its standard output.
fn node_output(lab: &Lab, node: usize, cmd: &[&str]) -> String {
    let out = lab.exec(&lab.spec().node_ns(node), cmd).unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Every node's XDP filter accepted its share, dropped the others' and
/// answered ARP (its /metrics).
fn assert_every_filter_served_its_share(lab: &Lab) {
    let spec = lab.spec();
    for n in 1..=3 {
        let body = common::http_get(
            &spec.client_ns(),
            SocketAddr::from((spec.node_addr(n), 9010)),
            "/metrics",
        )
        .1;
        for verdict in ["accept", "drop_not_owner", "arp_reply"] {
            let key = format!(
                "safekit_xdp_packets_total{{node=\"node{n}\",interface=\"eth0\",verdict=\"{verdict}\"}}"
            );
            let v = common::metric(&body, &key).unwrap_or(0.0);
            assert!(v > 0.0, "node{n}: {key} = {v}\n{body}");
        }
        // Frames too short to parse have their counter too.
        let key = format!(
            "safekit_xdp_packets_total{{node=\"node{n}\",interface=\"eth0\",verdict=\"pass_unparsed\"}}"
        );
        assert!(common::metric(&body, &key).is_some(), "node{n}: no {key}");
    }
}

fn start_farm(nodes: usize) -> Lab {
    start_farm_with(nodes, "")
}

fn start_farm_with(nodes: usize, farm_extra: &str) -> Lab {
    let mut lab = common::lab("skfm", SUBNET, nodes, modules_with(farm_extra));
    for i in 1..=nodes {
        lab.start_daemon(i).unwrap();
    }
    for i in 1..=nodes {
        for m in ["front", "sticky"] {
            let out = lab.safekit(i, &["start", "-m", m]).unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    lab
}

#[test]
fn farm_balances_fails_over_and_rebalances() {
    let _serial = serial();
    let mut lab = start_farm(3);
    let spec = lab.spec().clone();
    let client_ns = spec.client_ns();
    let client = spec.client_addr();
    let all = ["node1", "node2", "node3"];
    let before = wait_for(Duration::from_secs(10), || {
        settled(&lab, &[1, 2, 3], "front", &all).is_some()
    })
    .and_then(|_| settled(&lab, &[1, 2, 3], "front", &all))
    .expect("the farm never settled with three members");
    assert!(
        wait_for(Duration::from_secs(10), || settled(
            &lab,
            &[1, 2, 3],
            "sticky",
            &all
        )
        .is_some())
        .is_some()
    );

    // 600 connections from distinct source ports: each answered by exactly
    // the node which-node predicts; shares 33 % ± 8 points.
    let dst = SocketAddr::from((vip(), 80));
    let answers = ask_many(&client_ns, client, 20000..20600, dst);
    let mut shares: BTreeMap<String, usize> = BTreeMap::new();
    for (port, answer) in &answers {
        let got = answer
            .as_ref()
            .unwrap_or_else(|e| panic!("connection from port {port}: {e}"));
        let predicted = which(&lab, 1, "front", client, Some(*port));
        assert_eq!(got, &predicted, "source port {port}");
        *shares.entry(got.clone()).or_default() += 1;
    }
    eprintln!("shares over 600 connections: {shares:?}");
    assert_eq!(shares.len(), 3);
    for (node, n) in &shares {
        let pct = f64::from(u32::try_from(*n).unwrap()) * 100.0 / 600.0;
        assert!((25.0..=41.0).contains(&pct), "{node} served {pct:.1} %");
    }

    // `state -v` on any node lists every node's buckets.
    assert_state_lists_every_node(&lab, 1, &[1, 2, 3]);
    assert_state_lists_every_node(&lab, 3, &[1, 2, 3]);
    let log = std::fs::read_to_string(lab.root(1).join("var/log/safekit/front.log")).unwrap();
    assert!(
        log.contains("its eBPF log records go to the daemon log"),
        "the eBPF log reader did not start:\n{log}"
    );

    // Every node's XDP filter accepted its share and dropped the others'.
    assert_every_filter_served_its_share(&lab);

    // client_ip: one client IP always reaches the same node.
    let sticky_dst = SocketAddr::from((vip_ip_only(), 80));
    let sticky = ask_many(&client_ns, client, 21000..21040, sticky_dst);
    let expected = which(&lab, 2, "sticky", client, None);
    for (port, answer) in &sticky {
        assert_eq!(
            answer.as_deref(),
            Ok(expected.as_str()),
            "client_ip rule, source port {port}"
        );
    }

    // kill -9 of node3's safekitd: node1 and node2 take node3's buckets and
    // only those; node3 accepts nothing from the kill on (its XDP program's
    // BPF link died with the daemon); every new connection once the loss is
    // detected is served by node1 or node2.
    let (b1, b2) = (before[0].clone(), before[1].clone());
    let after = kill_node3_while_probing(
        &mut lab,
        dst,
        "XDP program",
        &["ip", "-d", "link", "show", "dev", "eth0"],
        "xdp",
    );
    assert!(
        after <= Duration::from_millis(1500),
        "takeover took {after:?}"
    );
    let two = settled(&lab, &[1, 2], "front", &["node1", "node2"]).unwrap();
    assert!(two[0].is_superset(&b1), "node1's own buckets moved");
    assert!(two[1].is_superset(&b2), "node2's own buckets moved");
    assert_state_lists_every_node(&lab, 2, &[1, 2]);

    // node3 returns: exactly its old buckets go back to it.
    lab.start_daemon(3).unwrap();
    assert!(
        lab.safekit(3, &["start", "-m", "front"])
            .unwrap()
            .status
            .success()
    );
    assert!(
        wait_for(Duration::from_secs(10), || settled(
            &lab,
            &[1, 2, 3],
            "front",
            &all
        )
        .is_some())
        .is_some()
    );
    let back = settled(&lab, &[1, 2, 3], "front", &all).unwrap();
    assert_eq!(
        back, before,
        "after node3 returned, ownership is not what it was"
    );
}

#[test]
fn a_failed_checker_takes_the_node_out_until_it_recovers() {
    let _serial = serial();
    let lab = start_farm(3);
    let spec = lab.spec().clone();
    let all = ["node1", "node2", "node3"];
    assert!(
        wait_for(Duration::from_secs(10), || settled(
            &lab,
            &[1, 2, 3],
            "front",
            &all
        )
        .is_some())
        .is_some()
    );

    // Stop node2's service behind safekit's back.
    let pid = std::fs::read_to_string(lab.root(2).join("demo.pid")).unwrap();
    // SAFETY: kill(2) of the demo service pid the node's script recorded.
    unsafe { libc::kill(pid.trim().parse().unwrap(), libc::SIGKILL) };
    assert!(
        wait_for(Duration::from_secs(5), || settled(
            &lab,
            &[1, 3],
            "front",
            &["node1", "node3"]
        )
        .is_some())
        .is_some(),
        "node2 did not leave the farm"
    );
    let st = status(&lab, 2);
    assert_eq!(
        st.module("front").unwrap().state,
        safekit::status::ModuleState::Wait
    );
    let dst = SocketAddr::from((vip(), 80));
    for (port, answer) in ask_many(&spec.client_ns(), spec.client_addr(), 23000..23060, dst) {
        let got = answer.unwrap_or_else(|e| panic!("port {port}: {e}"));
        assert!(
            got == "node1" || got == "node3",
            "port {port} served by {got}"
        );
    }

    // Restart the service: node2 comes back.
    let script = lab.root(2).join("etc/safekit/modules/front/bin/start_both");
    let out = lab
        .exec(
            &spec.node_ns(2),
            &[
                "env",
                "SAFE_NODE=node2",
                &format!("SAFE_ROOT={}", lab.root(2).display()),
                "sh",
                &script.display().to_string(),
            ],
        )
        .unwrap();
    assert!(out.status.success());
    assert!(
        wait_for(Duration::from_secs(5), || settled(
            &lab,
            &[1, 2, 3],
            "front",
            &all
        )
        .is_some())
        .is_some(),
        "node2 did not come back"
    );
}

#[test]
fn the_nftables_backend_serves_the_farm_the_same_way() {
    let _serial = serial();
    let mut lab = start_farm_with(3, "filter = \"nftables\"");
    let spec = lab.spec().clone();
    let all = ["node1", "node2", "node3"];
    assert!(
        wait_for(Duration::from_secs(10), || settled(
            &lab,
            &[1, 2, 3],
            "front",
            &all
        )
        .is_some())
        .is_some(),
        "the farm never settled"
    );
    let log = std::fs::read_to_string(lab.root(1).join("var/log/safekit/front.log")).unwrap();
    assert!(log.contains("nftables farm filter attached"), "{log}");
    let dst = SocketAddr::from((vip(), 80));
    let mut seen = BTreeSet::new();
    for (port, answer) in ask_many(&spec.client_ns(), spec.client_addr(), 24000..24150, dst) {
        let got = answer.unwrap_or_else(|e| panic!("port {port}: {e}"));
        assert_eq!(
            got,
            which(&lab, 1, "front", spec.client_addr(), Some(port)),
            "port {port}"
        );
        seen.insert(got);
    }
    assert_eq!(seen.len(), 3, "every node served a share");

    // kill -9 of node3's safekitd: its table, owned by the daemon's netlink
    // socket, goes with it, so node3 accepts nothing while node1 and node2
    // take its buckets over; every new connection once the loss is
    // detected is served by node1 or node2.
    kill_node3_while_probing(
        &mut lab,
        dst,
        "nftables farm table",
        &["nft", "list", "tables"],
        "safekit_farm_eth0",
    );
}
