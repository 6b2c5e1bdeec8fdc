//! Farm modules across membership changes (issue 13): checkers of the
//! running service start after `start_both` and stop before `stop_both`; a
//! start during a stop waits for it; established connections stay on the
//! node that holds them while buckets move (join, graceful leave with its
//! drain, power change). Real daemons, XDP filters and clients in network
//! namespaces (prefixes `skfl1`.., subnets 10.77.101.0/24..).

mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use common::{Lab, LabModule, demo_scripts_with, serial, spawn_in_netns, status, wait_for};
use safekit::{farm::membership, status::ModuleState};

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

// ------------------------------------------------------------ flow keeping

/// One HTTP exchange on `s`: the answering node (the body) and whether the
/// server closes the connection after it.
fn exchange(s: &mut TcpStream, close: bool) -> std::io::Result<(String, bool)> {
    write!(
        s,
        "GET / HTTP/1.1\r\nHost: vip\r\n{}\r\n",
        if close { "Connection: close\r\n" } else { "" }
    )?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte)? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed before a whole response",
            ));
        }
        head.push(byte[0]);
        if head.len() > 4096 {
            return Err(std::io::Error::other("response head too long"));
        }
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    if !head.starts_with("http/1.1 200") {
        return Err(std::io::Error::other(format!("bad response: {head}")));
    }
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| std::io::Error::other("no content-length"))?;
    let mut body = vec![0u8; len];
    s.read_exact(&mut body)?;
    let closing = head.contains("connection: close");
    Ok((String::from_utf8_lossy(&body).trim().to_owned(), closing))
}

/// A failed request.
#[derive(Debug)]
struct Failure {
    /// When its connection started, relative to the load's mark (`None`:
    /// before the mark, or no mark).
    started: Option<Duration>,
    /// The node that answered the previous request of its connection
    /// (`None`: a new connection).
    node: Option<String>,
    /// What failed (printed with the failure).
    #[expect(dead_code, reason = "read through Debug when a test fails")]
    what: String,
}

/// What a load worker saw.
#[derive(Debug, Default)]
struct LoadStats {
    requests: u64,
    connections: u64,
    failed: Vec<Failure>,
    resets: u64,
    by_node: BTreeMap<String, u64>,
}

impl LoadStats {
    fn fail(
        &mut self,
        what: &str,
        e: &std::io::Error,
        started: Option<Duration>,
        node: Option<&String>,
    ) {
        if matches!(
            e.kind(),
            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::ConnectionRefused
        ) {
            self.resets += 1;
        }
        self.failed.push(Failure {
            started,
            node: node.cloned(),
            what: format!("{what}: {e}"),
        });
    }

    fn merge(&mut self, o: LoadStats) {
        self.requests += o.requests;
        self.connections += o.connections;
        self.failed.extend(o.failed);
        self.resets += o.resets;
        for (n, c) in o.by_node {
            *self.by_node.entry(n).or_default() += c;
        }
    }
}

/// Continuous HTTP load on the VIP from the client namespace: `keepalive`
/// workers reuse each connection until the server closes it, the others
/// open one connection per request (`Connection: close`).
struct Load {
    stop: Arc<AtomicBool>,
    mark: Arc<std::sync::OnceLock<std::time::Instant>>,
    workers: Vec<(bool, JoinHandle<LoadStats>)>,
}

impl Load {
    fn start(lab: &Lab, vip: SocketAddr, keepalive: usize, close: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let mark = Arc::new(std::sync::OnceLock::new());
        let ns = lab.spec().client_ns();
        let mut workers = Vec::new();
        for i in 0..keepalive + close {
            let keep = i < keepalive;
            let stop = stop.clone();
            let mark = mark.clone();
            workers.push((
                keep,
                spawn_in_netns(&ns, move || load_worker(vip, keep, &stop, &mark)),
            ));
        }
        Self {
            stop,
            mark,
            workers,
        }
    }

    /// Failures are timed from now on.
    fn mark(&self) {
        let _ = self.mark.set(std::time::Instant::now());
    }

    /// Stops the workers: (keep-alive stats, `Connection: close` stats).
    fn finish(self) -> (LoadStats, LoadStats) {
        self.stop.store(true, Ordering::SeqCst);
        let (mut keep, mut close) = (LoadStats::default(), LoadStats::default());
        for (k, h) in self.workers {
            let st = h.join().expect("load worker");
            if k { keep.merge(st) } else { close.merge(st) }
        }
        (keep, close)
    }
}

fn load_worker(
    vip: SocketAddr,
    keepalive: bool,
    stop: &AtomicBool,
    mark: &std::sync::OnceLock<std::time::Instant>,
) -> LoadStats {
    let mut st = LoadStats::default();
    while !stop.load(Ordering::SeqCst) {
        let started = mark
            .get()
            .map(|m| std::time::Instant::now().saturating_duration_since(*m));
        let mut s = match TcpStream::connect_timeout(&vip, Duration::from_secs(3)) {
            Ok(s) => s,
            Err(e) => {
                st.fail("connect", &e, started, None);
                continue;
            }
        };
        st.connections += 1;
        let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
        let _ = s.set_nodelay(true);
        let mut last: Option<String> = None;
        loop {
            match exchange(&mut s, !keepalive) {
                Ok((node, closing)) => {
                    st.requests += 1;
                    *st.by_node.entry(node.clone()).or_default() += 1;
                    if closing {
                        // Read the server's FIN, then close: no reset.
                        let mut rest = Vec::new();
                        if let Err(e) = s.read_to_end(&mut rest) {
                            st.fail("reading the close", &e, started, Some(&node));
                        }
                        break;
                    }
                    last = Some(node);
                }
                Err(e) => {
                    st.fail("request", &e, started, last.as_ref());
                    break;
                }
            }
            std::thread::sleep(Duration::from_millis(5));
            if stop.load(Ordering::SeqCst) {
                break;
            }
        }
    }
    st
}

/// What the client's interface saw from the VIP's port 80.
#[derive(Debug, Default)]
struct Capture {
    /// SYN-ACKs by (client port, acknowledged ISN + 1): the source MACs.
    syn_acks: BTreeMap<(u16, u32), BTreeSet<[u8; 6]>>,
    /// RSTs from the VIP.
    resets: Vec<u16>,
    frames: u64,
}

/// Captures, on the client's `eth0` (`AF_PACKET`), every TCP segment from
/// `vip`:80 until `stop`.
fn capture(lab: &Lab, vip: Ipv4Addr, stop: Arc<AtomicBool>) -> JoinHandle<Capture> {
    spawn_in_netns(&lab.spec().client_ns(), move || {
        let proto = u16::try_from(libc::ETH_P_ALL).unwrap().to_be();
        // SAFETY: plain socket(2); the fd is owned below.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
        assert!(
            fd >= 0,
            "AF_PACKET socket: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: fd was just returned by socket(2) and is owned here only.
        let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        // SAFETY: NUL-terminated name.
        let index = unsafe { libc::if_nametoindex(c"eth0".as_ptr()) };
        assert!(index > 0);
        // SAFETY: zeroed sockaddr_ll, then the fields bind(2) reads.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = u16::try_from(libc::AF_PACKET).unwrap();
        sll.sll_protocol = proto;
        sll.sll_ifindex = i32::try_from(index).unwrap();
        // SAFETY: valid sockaddr_ll of the size given.
        let rc = unsafe {
            libc::bind(
                fd,
                (&raw const sll).cast(),
                u32::try_from(std::mem::size_of::<libc::sockaddr_ll>()).unwrap(),
            )
        };
        assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 100_000,
        };
        // SAFETY: setsockopt with a timeval of the size given.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const tv).cast(),
                u32::try_from(std::mem::size_of::<libc::timeval>()).unwrap(),
            );
        }
        let mut cap = Capture::default();
        let mut buf = [0u8; 2048];
        while !stop.load(Ordering::SeqCst) {
            // SAFETY: recv into a buffer of the size given.
            let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
            let Ok(n) = usize::try_from(n) else { continue };
            let f = &buf[..n];
            if n < 14 + 20 + 20 || f[12..14] != [0x08, 0x00] || f[14 + 9] != 6 {
                continue;
            }
            if f[14 + 12..14 + 16] != vip.octets() {
                continue;
            }
            let l4 = 14 + usize::from(f[14] & 0x0f) * 4;
            if n < l4 + 14 || f[l4..l4 + 2] != 80u16.to_be_bytes() {
                continue;
            }
            cap.frames += 1;
            let dport = u16::from_be_bytes([f[l4 + 2], f[l4 + 3]]);
            let ack = u32::from_be_bytes([f[l4 + 8], f[l4 + 9], f[l4 + 10], f[l4 + 11]]);
            let flags = f[l4 + 13];
            let mut src = [0u8; 6];
            src.copy_from_slice(&f[6..12]);
            if flags & 0x12 == 0x12 {
                cap.syn_acks.entry((dport, ack)).or_default().insert(src);
            }
            if flags & 0x04 != 0 {
                cap.resets.push(dport);
            }
        }
        drop(sock);
        cap
    })
}

/// A keep-alive connection held by the test from a chosen client port.
fn hold(lab: &Lab, vip: SocketAddr, port: u16) -> (TcpStream, String) {
    hold_from(lab, vip, SocketAddr::from((lab.spec().client_addr(), port)))
}

/// A keep-alive connection held by the test from `src`.
fn hold_from(lab: &Lab, vip: SocketAddr, src: SocketAddr) -> (TcpStream, String) {
    spawn_in_netns(&lab.spec().client_ns(), move || {
        use socket2::{Domain, Socket, Type};
        let s = Socket::new(Domain::for_address(src), Type::STREAM, None).unwrap();
        s.set_reuse_address(true).unwrap();
        s.bind(&src.into()).unwrap();
        s.connect_timeout(&vip.into(), Duration::from_secs(3))
            .unwrap_or_else(|e| panic!("held connection from {src}: {e}"));
        let mut s: TcpStream = s.into();
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let (node, closing) = exchange(&mut s, false).expect("first request");
        assert!(!closing);
        (s, node)
    })
    .join()
    .expect("hold")
}

/// Node that serves `port` of the client under `members` with `powers`.
fn owner_of(lab: &Lab, port: u16, members: &[&str], powers: &BTreeMap<String, u32>) -> String {
    let view: membership::View = members.iter().map(|s| (*s).to_owned()).collect();
    let b = safekit_common::bucket_client_ip_port(
        lab.spec().client_addr().octets(),
        port.to_be_bytes(),
        0,
    );
    membership::assignment(&view, powers)
        .owner(b)
        .expect("an owner")
        .to_owned()
}

/// A client port served by `from` under (`before`, `p0`) and by `to` under
/// (`after`, `p1`), within `range`.
fn port_moving(
    lab: &Lab,
    range: std::ops::Range<u16>,
    (before, p0, from): (&[&str], &BTreeMap<String, u32>, &str),
    (after, p1, to): (&[&str], &BTreeMap<String, u32>, &str),
) -> u16 {
    range
        .into_iter()
        .find(|p| owner_of(lab, *p, before, p0) == from && owner_of(lab, *p, after, p1) == to)
        .expect("a port whose bucket moves")
}

/// Every listed node sees `members` and the nodes' buckets partition the
/// 256 as `assignment(members, powers)` says.
fn settled_as(
    lab: &Lab,
    nodes: &[usize],
    members: &[&str],
    powers: &BTreeMap<String, u32>,
) -> bool {
    let view: membership::View = members.iter().map(|s| (*s).to_owned()).collect();
    let want = membership::assignment(&view, powers);
    nodes.iter().all(|&n| {
        let st = status(lab, n);
        let Some(f) = st.module("front").and_then(|m| m.farm.clone()) else {
            return false;
        };
        f.view.iter().cloned().collect::<membership::View>() == view
            && f.buckets == want.buckets_of(&format!("node{n}"))
    })
}

/// Three nodes serving `front` (keep-alive demo, 20 requests per
/// connection) on 10.77.`subnet`.200, settled.
fn keepalive_farm(prefix: &str, subnet: u8) -> Lab {
    let mut lab = common::lab(
        prefix,
        subnet,
        3,
        vec![front(subnet, "", "--keepalive 20", "0")],
    );
    start_three(&mut lab);
    lab
}

/// Starts the three daemons and `front` on each, until the farm settled
/// with equal powers.
fn start_three(lab: &mut Lab) {
    for i in 1..=3 {
        lab.start_daemon(i).unwrap();
    }
    for i in 1..=3 {
        let out = lab.safekit(i, &["start", "-m", "front"]).unwrap();
        assert!(out.status.success(), "{out:?}");
    }
    let all = ["node1", "node2", "node3"];
    assert!(
        wait_for(Duration::from_secs(15), || settled_as(
            lab,
            &[1, 2, 3],
            &all,
            &BTreeMap::new()
        ))
        .is_some(),
        "the farm never settled:\n{}",
        module_log(lab, 1)
    );
}

fn state_v(lab: &Lab, node: usize) -> String {
    let out = lab.safekit(node, &["state", "-v", "-m", "front"]).unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn metrics(lab: &Lab, node: usize) -> String {
    let spec = lab.spec();
    common::http_get(
        &spec.client_ns(),
        SocketAddr::from((spec.node_addr(node), 9010)),
        "/metrics",
    )
    .1
}

/// Issue 13, items 1 and 2: three nodes serve HTTP on the VIP under
/// continuous load from the client (keep-alive workers and
/// `Connection: close` workers side by side). node3 leaves gracefully
/// (`safekit stop`: it drains, DRAINING in `state -v` and /metrics, while
/// a held keep-alive connection of its own is still answered by it after
/// its buckets moved), comes back (a connection held on node1 or node2 in a
/// bucket node3 takes back stays where it is), then node1's `power` goes
/// to 3 on every node (SIGHUP; a held connection in a moving bucket stays
/// too). Throughout: no failed request, no reset, and no flow ever got a
/// SYN-ACK from two nodes (captured on the client's interface).
#[test]
#[expect(clippy::too_many_lines, reason = "one scenario, step by step")]
fn established_connections_survive_leave_join_and_power_change() {
    let _serial = serial();
    let subnet = 102;
    let mut lab = common::lab(
        "skfl2",
        subnet,
        3,
        vec![front(
            subnet,
            "drain_timeout = \"20s\"",
            "--keepalive 20",
            "0",
        )],
    );
    start_three(&mut lab);
    let equal: BTreeMap<String, u32> = BTreeMap::new();
    let all = ["node1", "node2", "node3"];
    let vip_ip = Ipv4Addr::new(10, 77, subnet, 200);
    let vip = SocketAddr::from((vip_ip, 80));
    let stop_capture = Arc::new(AtomicBool::new(false));
    let cap = capture(&lab, vip_ip, stop_capture.clone());
    std::thread::sleep(Duration::from_millis(200));
    let load = Load::start(&lab, vip, 4, 2);
    std::thread::sleep(Duration::from_secs(1));

    // Graceful leave of node3, holding one of its connections.
    let p3 = (40000..41000)
        .find(|p| owner_of(&lab, *p, &all, &equal) == "node3")
        .unwrap();
    let (mut held_leave, who) = hold(&lab, vip, p3);
    assert_eq!(who, "node3");
    let out = lab.safekit(3, &["stop", "-m", "front"]).unwrap();
    assert!(out.status.success());
    assert!(
        wait_for(Duration::from_secs(5), || settled_as(
            &lab,
            &[1, 2],
            &["node1", "node2"],
            &equal
        ))
        .is_some(),
        "node1 and node2 never took node3's buckets"
    );
    let text = state_v(&lab, 3);
    assert!(
        text.contains("DRAINING ("),
        "state -v of node3 while draining:\n{text}"
    );
    let body = metrics(&lab, 3);
    assert_eq!(
        common::metric(
            &body,
            "safekit_farm_draining{node=\"node3\",module=\"front\"}"
        ),
        Some(1.0),
        "{body}"
    );
    assert!(
        common::metric(
            &body,
            "safekit_farm_drain_connections{node=\"node3\",module=\"front\"}"
        )
        .is_some_and(|v| v >= 1.0),
        "{body}"
    );
    // Its bucket is node1's or node2's now; the connection is still node3's.
    let (who, _) = exchange(&mut held_leave, false).expect("held connection after node3 left");
    assert_eq!(who, "node3", "the held connection moved");
    drop(held_leave);
    assert!(
        wait_for(Duration::from_secs(15), || state(&lab, 3)
            == ModuleState::Stop)
        .is_some(),
        "node3 never finished draining:\n{}",
        state_v(&lab, 3)
    );
    let log3 = module_log(&lab, 3);
    assert!(log3.contains("drained: no connection left"), "{log3}");
    std::thread::sleep(Duration::from_millis(800));

    // node3 returns: a connection held on node1 or node2 in a bucket that
    // goes back to node3 stays on its node.
    let two = ["node1", "node2"];
    let (pj, before_j) = ["node1", "node2"]
        .iter()
        .find_map(|n| {
            (41000..43000)
                .find(|p| {
                    owner_of(&lab, *p, &two, &equal) == *n
                        && owner_of(&lab, *p, &all, &equal) == "node3"
                })
                .map(|p| (p, (*n).to_owned()))
        })
        .unwrap();
    let (mut held_join, who) = hold(&lab, vip, pj);
    assert_eq!(who, before_j);
    assert!(
        lab.safekit(3, &["start", "-m", "front"])
            .unwrap()
            .status
            .success()
    );
    assert!(
        wait_for(Duration::from_secs(10), || settled_as(
            &lab,
            &[1, 2, 3],
            &all,
            &equal
        ))
        .is_some(),
        "node3 never came back"
    );
    let (who, _) = exchange(&mut held_join, false).expect("held connection after node3 returned");
    assert_eq!(who, before_j, "the held connection moved to the new owner");
    drop(held_join);
    std::thread::sleep(Duration::from_millis(800));

    // Power change: node1 = 3 on every node, SIGHUP.
    let heavy: BTreeMap<String, u32> = [("node1".to_owned(), 3)].into();
    let pp = port_moving(
        &lab,
        43000..45000,
        (&all, &equal, "node2"),
        (&all, &heavy, "node1"),
    );
    let (mut held_power, who) = hold(&lab, vip, pp);
    assert_eq!(who, "node2");
    for i in 1..=3 {
        let path = lab.root(i).join("etc/safekit/modules/front/module.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let text = text.replace("[farm]\n", "[farm]\npower = { node1 = 3 }\n");
        std::fs::write(&path, text).unwrap();
        let pid = lab.daemon_pid(i).expect("daemon pid");
        // SAFETY: kill(2) of the daemon this test started.
        unsafe { libc::kill(i32::try_from(pid).unwrap(), libc::SIGHUP) };
    }
    assert!(
        wait_for(Duration::from_secs(10), || settled_as(
            &lab,
            &[1, 2, 3],
            &all,
            &heavy
        ))
        .is_some(),
        "the power change never settled"
    );
    let (who, _) =
        exchange(&mut held_power, false).expect("held connection after the power change");
    assert_eq!(who, "node2", "the held connection moved with its bucket");
    drop(held_power);
    std::thread::sleep(Duration::from_millis(800));

    let (keep, close) = load.finish();
    std::thread::sleep(Duration::from_millis(200));
    stop_capture.store(true, Ordering::SeqCst);
    let cap = cap.join().expect("capture");
    eprintln!(
        "keep-alive load: {} requests on {} connections, {} failed, {} resets, by node {:?}",
        keep.requests,
        keep.connections,
        keep.failed.len(),
        keep.resets,
        keep.by_node
    );
    eprintln!(
        "Connection: close load: {} requests, {} failed, {} resets, by node {:?}",
        close.requests,
        close.failed.len(),
        close.resets,
        close.by_node
    );
    eprintln!(
        "capture: {} segments from the VIP, {} SYN-ACKs, {} RSTs",
        cap.frames,
        cap.syn_acks.len(),
        cap.resets.len()
    );
    assert!(
        keep.failed.is_empty(),
        "keep-alive failures: {:?}",
        keep.failed
    );
    assert!(
        close.failed.is_empty(),
        "Connection: close failures: {:?}",
        close.failed
    );
    assert_eq!(keep.resets + close.resets, 0);
    assert!(
        cap.resets.is_empty(),
        "RSTs from the VIP to ports {:?}",
        cap.resets
    );
    let doubles: Vec<_> = cap.syn_acks.iter().filter(|(_, m)| m.len() > 1).collect();
    assert!(doubles.is_empty(), "SYN-ACKs from two nodes: {doubles:?}");
    assert!(
        keep.requests > 100 && close.requests > 50,
        "too little load"
    );
    assert_eq!(
        keep.by_node.len(),
        3,
        "every node served: {:?}",
        keep.by_node
    );
    assert!(
        cap.syn_acks.len() as u64 >= close.connections,
        "the capture missed SYN-ACKs"
    );
    // The filters kept flows and left others' flows alone.
    let body = metrics(&lab, 1);
    for verdict in ["accept_flow", "drop_no_flow"] {
        let key = format!(
            "safekit_xdp_packets_total{{node=\"node1\",interface=\"eth0\",verdict=\"{verdict}\"}}"
        );
        assert!(
            common::metric(&body, &key).is_some_and(|v| v > 0.0),
            "{key}\n{body}"
        );
    }
}

/// Issue 13: `kill -9` of node3's safekitd under the same load. Its filter
/// goes with it, so the connections node3 held are lost (nobody else
/// answers them: they are not theirs), and only those: every request that
/// failed on an established connection had been answered by node3, and
/// every connection opened once the loss timeout (10 pulses of 100 ms) and
/// a few pulses more had passed succeeded.
#[test]
fn a_killed_daemon_loses_only_its_own_connections() {
    let _serial = serial();
    let subnet = 103;
    let mut lab = keepalive_farm("skfl3", subnet);
    let equal: BTreeMap<String, u32> = BTreeMap::new();
    let vip = SocketAddr::from((Ipv4Addr::new(10, 77, subnet, 200), 80));
    let load = Load::start(&lab, vip, 4, 2);
    std::thread::sleep(Duration::from_secs(1));
    load.mark();
    lab.kill_daemon(3);
    assert!(
        wait_for(Duration::from_secs(5), || settled_as(
            &lab,
            &[1, 2],
            &["node1", "node2"],
            &equal
        ))
        .is_some(),
        "node1 and node2 never took node3's buckets"
    );
    std::thread::sleep(Duration::from_secs(4));
    let (keep, close) = load.finish();
    // Loss after 10 pulses, then views agree and buckets are written
    // within a few pulses.
    let grace = Duration::from_millis(1500);
    let mut lost_of_node3 = 0;
    for f in keep.failed.iter().chain(&close.failed) {
        match (&f.node, f.started) {
            (Some(n), _) => {
                assert_eq!(n, "node3", "a connection of {n} was lost: {f:?}");
                lost_of_node3 += 1;
            }
            (None, Some(at)) => assert!(
                at < grace,
                "a new connection failed {at:?} after the kill: {f:?}"
            ),
            (None, None) => panic!("a connection failed before the kill: {f:?}"),
        }
    }
    eprintln!(
        "after the kill: {} keep-alive and {} close requests served; {lost_of_node3} of node3's connections lost, {} new connections failed within {grace:?}",
        keep.requests,
        close.requests,
        keep.failed.len() + close.failed.len() - lost_of_node3
    );
    assert!(
        keep.by_node.contains_key("node3"),
        "node3 served before the kill"
    );
}

// ------------------------------------------------------------------ IPv6

/// The lab's nodes and client get IPv6 addresses `fd77:<subnet>::<i>/64`
/// (client `::fa`) on their LAN interface, and the cluster's node
/// addresses become those: heartbeats travel over IPv6. Before the
/// daemons start.
fn ipv6_lab(lab: &Lab, subnet: u8, nodes: usize) {
    let spec = lab.spec().clone();
    let add = |ns: &str, host: &str| {
        let out = lab
            .exec(
                ns,
                &[
                    "ip",
                    "-6",
                    "addr",
                    "add",
                    &format!("fd77:{subnet}::{host}/64"),
                    "dev",
                    "eth0",
                    "nodad",
                ],
            )
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    };
    for i in 1..=nodes {
        add(&spec.node_ns(i), &i.to_string());
    }
    add(&spec.client_ns(), "fa");
    for i in 1..=nodes {
        let path = lab.root(i).join("etc/safekit/cluster.toml");
        let mut text = std::fs::read_to_string(&path).unwrap();
        for j in 1..=nodes {
            text = text.replace(
                &format!("\"10.77.{subnet}.{j}\""),
                &format!("\"fd77:{subnet}::{j}\""),
            );
        }
        std::fs::write(&path, text).unwrap();
    }
}

fn which6(lab: &Lab, node: usize, client: std::net::Ipv6Addr, port: u16) -> String {
    let sock = lab.root(node).join("run/safekit/safekitd.sock");
    let req = safekit::control::Request::FarmWhich {
        module: "front".into(),
        client: client.into(),
        port: Some(port),
        dport: Some(80),
    };
    match safekit::control::call(&sock, &req, Duration::from_secs(5)).unwrap() {
        safekit::control::Response::Which { node: Some(n), .. } => n,
        other => panic!("which-node: {other:?}"),
    }
}

/// Issue 13, item 5: a farm on IPv6 only (VIP, client, heartbeats). 600
/// connections from distinct client ports, each answered by exactly the
/// node `which-node` predicts (every node a share); the client's neighbour
/// entry for the VIP is the virtual MAC (Neighbour Discovery answered by
/// the XDP filters); a connection held on node3 survives node3's graceful
/// leave (flow keeping over IPv6).
#[test]
#[expect(clippy::too_many_lines, reason = "one scenario, step by step")]
fn an_ipv6_farm_serves_each_client_from_the_predicted_node() {
    let _serial = serial();
    let subnet = 104;
    let mut module = front(subnet, "", "--keepalive 1000", "0");
    module.toml = module.toml.replace(
        &format!("10.77.{subnet}.200"),
        &format!("fd77:{subnet}::c8"),
    );
    for (_, text) in &mut module.scripts {
        *text = text.replace("0.0.0.0:80", "[::]:80");
    }
    let mut lab = common::lab("skfl4", subnet, 3, vec![module]);
    ipv6_lab(&lab, subnet, 3);
    for i in 1..=3 {
        lab.start_daemon(i).unwrap();
    }
    for i in 1..=3 {
        let out = lab.safekit(i, &["start", "-m", "front"]).unwrap();
        assert!(out.status.success(), "{out:?}");
    }
    let equal: BTreeMap<String, u32> = BTreeMap::new();
    let all = ["node1", "node2", "node3"];
    assert!(
        wait_for(Duration::from_secs(15), || settled_as(
            &lab,
            &[1, 2, 3],
            &all,
            &equal
        ))
        .is_some(),
        "the IPv6 farm never settled:\n{}",
        module_log(&lab, 1)
    );
    let vip6: std::net::Ipv6Addr = format!("fd77:{subnet}::c8").parse().unwrap();
    let client6: std::net::Ipv6Addr = format!("fd77:{subnet}::fa").parse().unwrap();
    let dst = SocketAddr::from((vip6, 80));
    // First contact: the client resolves the VIP (Neighbour Discovery,
    // answered by the filters) and connects.
    assert!(
        wait_for(Duration::from_secs(10), || {
            common::in_netns(&lab.spec().client_ns(), move || {
                common::ask(SocketAddr::from((client6, 29999)), dst).is_ok()
            })
        })
        .is_some(),
        "the IPv6 VIP never answered"
    );
    let answers: Vec<(u16, Result<String, String>)> =
        common::in_netns(&lab.spec().client_ns(), move || {
            (30000..30600)
                .map(|p| (p, common::ask(SocketAddr::from((client6, p)), dst)))
                .collect()
        });
    let mut shares: BTreeMap<String, usize> = BTreeMap::new();
    for (port, answer) in &answers {
        let got = answer
            .as_ref()
            .unwrap_or_else(|e| panic!("connection from [{client6}]:{port}: {e}"));
        assert_eq!(got, &which6(&lab, 2, client6, *port), "source port {port}");
        *shares.entry(got.clone()).or_default() += 1;
    }
    eprintln!("IPv6 shares over 600 connections: {shares:?}");
    assert_eq!(shares.len(), 3, "every node served a share");
    // Neighbour Discovery for the VIP was answered with the virtual MAC.
    let neigh = lab
        .exec(
            &lab.spec().client_ns(),
            &["ip", "-6", "neigh", "show", &vip6.to_string()],
        )
        .unwrap();
    let neigh = String::from_utf8_lossy(&neigh.stdout).to_lowercase();
    assert!(
        neigh.contains("5a:fe:00:00:00:c8"),
        "client's neighbour entry: {neigh}"
    );
    let body = metrics(&lab, 1);
    let key = "safekit_xdp_packets_total{node=\"node1\",interface=\"eth0\",verdict=\"ns_reply\"}";
    assert!(
        common::metric(&body, key).is_some_and(|v| v > 0.0),
        "{key}\n{body}"
    );

    // Flow keeping over IPv6: node3 leaves gracefully while the test holds
    // one of its connections.
    let p3 = (31000..32000)
        .find(|p| which6(&lab, 1, client6, *p) == "node3")
        .unwrap();
    let (mut held, who) = hold_from(&lab, dst, SocketAddr::from((client6, p3)));
    assert_eq!(who, "node3");
    assert!(
        lab.safekit(3, &["stop", "-m", "front"])
            .unwrap()
            .status
            .success()
    );
    assert!(
        wait_for(Duration::from_secs(5), || settled_as(
            &lab,
            &[1, 2],
            &["node1", "node2"],
            &equal
        ))
        .is_some(),
        "node1 and node2 never took node3's buckets"
    );
    assert!(state_v(&lab, 3).contains("DRAINING ("));
    let (who, _) = exchange(&mut held, false).expect("held IPv6 connection after node3 left");
    assert_eq!(who, "node3", "the held IPv6 connection moved");
    drop(held);
    assert!(
        wait_for(Duration::from_secs(15), || state(&lab, 3)
            == ModuleState::Stop)
        .is_some(),
        "node3 never finished draining"
    );
}

/// Issue 13, item 5: a mirror module on an IPv6 VIP fails over, and the
/// client's neighbour entry for the VIP moves to the new primary's MAC by
/// its unsolicited neighbour advertisements alone (read before the client
/// sends anything to the VIP again).
#[test]
fn an_ipv6_mirror_vip_moves_by_unsolicited_advertisement() {
    let _serial = serial();
    let subnet = 105;
    let module = LabModule {
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
addrs = ["fd77:{subnet}::64"]
garp_count = 3
garp_interval = "50ms"
"#
        ),
        scripts: common::demo_scripts("start_prim", "stop_prim", "[::]:7000"),
    };
    let mut lab = common::lab("skfl5", subnet, 2, vec![module]);
    ipv6_lab(&lab, subnet, 2);
    for i in 1..=2 {
        lab.start_daemon(i).unwrap();
    }
    for i in 1..=2 {
        assert!(
            lab.safekit(i, &["start", "-m", "web"])
                .unwrap()
                .status
                .success()
        );
    }
    let web = |n: usize| status(&lab, n).module("web").map(|m| m.state);
    assert!(
        wait_for(Duration::from_secs(15), || web(1)
            == Some(ModuleState::Prim)
            || web(1) == Some(ModuleState::Alone))
        .is_some(),
        "node1 never primary"
    );
    let vip6: std::net::Ipv6Addr = format!("fd77:{subnet}::64").parse().unwrap();
    let client6: std::net::Ipv6Addr = format!("fd77:{subnet}::fa").parse().unwrap();
    let dst = SocketAddr::from((vip6, 7000));
    let ask = |port: u16| {
        common::in_netns(&lab.spec().client_ns(), move || {
            common::ask(SocketAddr::from((client6, port)), dst)
        })
    };
    let mac_of = |n: usize| {
        let out = lab
            .exec(
                &lab.spec().node_ns(n),
                &["cat", "/sys/class/net/eth0/address"],
            )
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_lowercase()
    };
    let (mac1, mac2) = (mac_of(1), mac_of(2));

    let neigh = || {
        let out = lab
            .exec(
                &lab.spec().client_ns(),
                &["ip", "-6", "neigh", "show", &vip6.to_string()],
            )
            .unwrap();
        String::from_utf8_lossy(&out.stdout).to_lowercase()
    };
    assert!(
        wait_for(Duration::from_secs(10), || ask(40000).as_deref()
            == Ok("node1"))
        .is_some(),
        "node1 never answered on the IPv6 VIP"
    );
    assert!(neigh().contains(&mac1), "before: {}", neigh());
    // Failover: node1 stops, node2 takes the VIP over.
    assert!(
        lab.safekit(1, &["stop", "-m", "web"])
            .unwrap()
            .status
            .success()
    );
    assert!(
        wait_for(Duration::from_secs(15), || web(2)
            == Some(ModuleState::Alone))
        .is_some(),
        "node2 never took over"
    );
    assert!(
        wait_for(Duration::from_secs(2), || neigh().contains(&mac2)).is_some(),
        "the client's neighbour entry did not move to node2 ({mac2}): {}",
        neigh()
    );
    // (`start_prim` runs once the state is ALONE: the service may take a
    // moment.)
    assert!(
        wait_for(Duration::from_secs(10), || ask(40001).as_deref()
            == Ok("node2"))
        .is_some(),
        "node2 never answered on the IPv6 VIP"
    );
    let log = std::fs::read_to_string(lab.root(2).join("var/log/safekit/web.log")).unwrap();
    assert!(log.contains(&format!("VIP {vip6}/64 set on eth0")), "{log}");
}

/// Issue 12, item 4: SIGSTOP of node3's safekitd under connection load (3
/// s, three times the peers' loss timeout), then SIGCONT. node3's filter
/// stops taking new connections when its lease lapses, before node1 and
/// node2 take its buckets; back, it re-learns the membership before owning
/// anything. No flow ever got SYN-ACKs from two nodes (captured on the
/// client's interface), and node3's filter counted the lapsed lease.
#[test]
fn a_stalled_farm_daemon_never_shares_a_flow() {
    let _serial = serial();
    let subnet = 106;
    let lab = keepalive_farm("skfl6", subnet);
    let equal: BTreeMap<String, u32> = BTreeMap::new();
    let all = ["node1", "node2", "node3"];
    let vip_ip = Ipv4Addr::new(10, 77, subnet, 200);
    let stop_capture = Arc::new(AtomicBool::new(false));
    let cap = capture(&lab, vip_ip, stop_capture.clone());
    std::thread::sleep(Duration::from_millis(200));
    let load = Load::start(&lab, SocketAddr::from((vip_ip, 80)), 2, 4);
    std::thread::sleep(Duration::from_secs(1));
    let pid = i32::try_from(lab.daemon_pid(3).expect("node3's daemon")).unwrap();
    // SAFETY: kill(2) of the daemon this test started.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    std::thread::sleep(Duration::from_secs(3));
    let taken = settled_as(&lab, &[1, 2], &["node1", "node2"], &equal);
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    assert!(
        taken,
        "node1 and node2 did not take node3's buckets while it was stopped"
    );
    assert!(
        wait_for(Duration::from_secs(10), || settled_as(
            &lab,
            &[1, 2, 3],
            &all,
            &equal
        ))
        .is_some(),
        "node3 never rejoined"
    );
    std::thread::sleep(Duration::from_secs(1));
    let (keep, close) = load.finish();
    std::thread::sleep(Duration::from_millis(200));
    stop_capture.store(true, Ordering::SeqCst);
    let cap = cap.join().expect("capture");
    eprintln!(
        "load: {} keep-alive and {} close requests, {} + {} failed; capture: {} SYN-ACKs, {} RSTs",
        keep.requests,
        close.requests,
        keep.failed.len(),
        close.failed.len(),
        cap.syn_acks.len(),
        cap.resets.len()
    );
    let doubles: Vec<_> = cap.syn_acks.iter().filter(|(_, m)| m.len() > 1).collect();
    assert!(doubles.is_empty(), "SYN-ACKs from two nodes: {doubles:?}");
    assert!(close.requests > 50, "too little load");
    let body = metrics(&lab, 3);
    let key = "safekit_xdp_packets_total{node=\"node3\",interface=\"eth0\",verdict=\"drop_lease\"}";
    assert!(
        common::metric(&body, key).is_some_and(|v| v > 0.0),
        "node3's filter never dropped for a lapsed lease: {key}\n{body}"
    );
    let log3 = module_log(&lab, 3);
    assert!(log3.contains("lease lapsed"), "{log3}");
}
