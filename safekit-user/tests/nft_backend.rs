//! The nftables backend of the farm filter takes the XDP filter's decisions,
//! frame by frame; and `safekit firewall` adds, replaces and removes its
//! table. Needs root (network namespaces, nftables, `BPF_PROG_TEST_RUN`).
//!
//! In a fresh network namespace, a veth pair: the node end (`nbA`) carries
//! the nftables filter, frames are sent into the client end (`nbB`) with an
//! `AF_PACKET` socket. For every frame, the nftables counter that moved must
//! be the one the XDP program moves for the same frame under the same VIPs,
//! rules, seed and ownership (run through `BPF_PROG_TEST_RUN`). Accepted UDP
//! frames must reach a socket bound to the VIP; dropped ones must not.

use std::{
    ffi::CString,
    fs::File,
    net::{Ipv4Addr, UdpSocket},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    process::Command,
    time::{Duration, Instant},
};

use aya::{
    maps::{Array, HashMap, PerCpuArray},
    programs::{TestRun as _, TestRunOptions, Xdp},
};
use safekit::{
    config, ebpf,
    farm::filter::{AttachMode, FilterRule},
    nft::{Backend, FarmDataplane, NftFilter, firewall},
};
use safekit_common::{
    BUCKETS, FILTER_CLIENT_IP, FILTER_CLIENT_IP_PORT, FilterConfig, PROTO_TCP, PROTO_UDP, RuleKey,
    RuleValue, VIP_FLAG_IP_ONLY, VipKey, VipValue, counter,
};

const IFMAC: [u8; 6] = [0x02, 0, 0, 0, 0x4e, 0x01];
const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x4e, 0xcc];
const VIP1: Ipv4Addr = Ipv4Addr::new(10, 79, 0, 100);
const VIP2: Ipv4Addr = Ipv4Addr::new(10, 79, 0, 101);
const VMAC1: [u8; 6] = [0x5a, 0xfe, 10, 79, 0, 100];
const VMAC2: [u8; 6] = [0x5a, 0xfe, 10, 79, 0, 101];
const NODE_ADDR: Ipv4Addr = Ipv4Addr::new(10, 79, 0, 1);
const SEED: u32 = 0x5eed;
/// UDP port of the delivery check (VIP1 balances UDP on any port).
const UDP_PORT: u16 = 7000;

fn rules1() -> Vec<FilterRule> {
    vec![
        FilterRule {
            proto: PROTO_TCP,
            port: 80,
            filter: FILTER_CLIENT_IP_PORT,
        },
        FilterRule {
            proto: PROTO_UDP,
            port: 0,
            filter: FILTER_CLIENT_IP,
        },
        FilterRule {
            proto: PROTO_TCP,
            port: 8080,
            filter: FILTER_CLIENT_IP,
        },
    ]
}

/// Every rule of VIP2 hashes the client IP: its fragments are placed.
fn rules2() -> Vec<FilterRule> {
    vec![FilterRule {
        proto: PROTO_TCP,
        port: 80,
        filter: FILTER_CLIENT_IP,
    }]
}

// ---------------------------------------------------------------- namespace

fn run(cmd: &[&str]) {
    let out = Command::new(cmd[0])
        .args(&cmd[1..])
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn output(cmd: &[&str]) -> Result<String, String> {
    let out = Command::new(cmd[0])
        .args(&cmd[1..])
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// A network namespace named `<prefix><tag>-<pid>`, deleted on drop (its
/// veths go with it). Leftovers of this prefix from dead test processes are
/// removed first.
struct Netns {
    name: String,
}

impl Netns {
    fn new(prefix: &str, tag: &str) -> Self {
        if let Ok(list) = output(&["ip", "netns", "list"]) {
            for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
                let Some(pid) = name
                    .strip_prefix(prefix)
                    .and_then(|rest| rest.rsplit('-').next())
                else {
                    continue;
                };
                if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                    let _ = output(&["ip", "netns", "del", name]);
                }
            }
        }
        let name = format!("{prefix}{tag}-{}", std::process::id());
        let _ = output(&["ip", "netns", "del", &name]);
        run(&["ip", "netns", "add", &name]);
        Self { name }
    }

    fn ip(&self, args: &[&str]) {
        let mut cmd = vec!["ip", "-n", &self.name];
        cmd.extend_from_slice(args);
        run(&cmd);
    }

    fn exec(&self, args: &[&str]) -> Result<String, String> {
        let mut cmd = vec!["ip", "netns", "exec", &self.name];
        cmd.extend_from_slice(args);
        output(&cmd)
    }

    /// Runs `f` on a thread that has entered the namespace (sockets,
    /// netlink and BPF links it opens live there).
    fn enter<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let ns = File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            // SAFETY: setns on this thread only, with a namespace fd that is
            // open for the duration of the call.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = output(&["ip", "netns", "del", &self.name]);
    }
}

/// The pair: `nbA` (node, filtered) and `nbB` (client side), no IPv6 (no
/// stray router solicitations), VIPs on loopback as the daemon sets them.
fn lab(tag: &str) -> Netns {
    let ns = Netns::new("sknb", tag);
    ns.ip(&["link", "add", "nbA", "type", "veth", "peer", "name", "nbB"]);
    for (k, v) in [
        ("net.ipv6.conf.all.disable_ipv6", "1"),
        ("net.ipv6.conf.default.disable_ipv6", "1"),
        ("net.ipv4.conf.all.rp_filter", "0"),
        ("net.ipv4.conf.default.rp_filter", "0"),
    ] {
        ns.exec(&["sysctl", "-qw", &format!("{k}={v}")])
            .unwrap_or_else(|e| panic!("sysctl {k}: {e}"));
    }
    // As the daemon does: the VIPs on loopback are not answered by the
    // kernel on the LAN interface.
    ns.exec(&["sysctl", "-qw", "net.ipv4.conf.nbA.arp_ignore=1"])
        .unwrap_or_else(|e| panic!("sysctl arp_ignore: {e}"));
    ns.ip(&["link", "set", "nbA", "address", "02:00:00:00:4e:01"]);
    ns.ip(&["link", "set", "nbB", "address", "02:00:00:00:4e:cc"]);
    ns.ip(&["addr", "add", &format!("{NODE_ADDR}/24"), "dev", "nbA"]);
    for l in ["lo", "nbA", "nbB"] {
        ns.ip(&["link", "set", l, "up"]);
    }
    for v in [VIP1, VIP2] {
        ns.ip(&["addr", "add", &format!("{v}/32"), "dev", "lo"]);
    }
    ns
}

// ---------------------------------------------------------------- frames

fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !u16::try_from(sum).unwrap_or(0)
}

/// An IPv4 packet (valid header checksum) around `l4`.
fn ipv4(proto: u8, saddr: Ipv4Addr, daddr: Ipv4Addr, frag: u16, l4: &[u8]) -> Vec<u8> {
    let total = u16::try_from(20 + l4.len()).unwrap();
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&[0, 7]);
    ip.extend_from_slice(&frag.to_be_bytes());
    ip.extend_from_slice(&[64, proto, 0, 0]);
    ip.extend_from_slice(&saddr.octets());
    ip.extend_from_slice(&daddr.octets());
    let c = checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    ip.extend_from_slice(l4);
    ip
}

/// Transport header with these ports (UDP: length set, checksum 0 = none).
fn l4(proto: u8, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&sport.to_be_bytes());
    v.extend_from_slice(&dport.to_be_bytes());
    if proto == PROTO_UDP {
        let len = u16::try_from(8 + payload.len()).unwrap();
        v.extend_from_slice(&len.to_be_bytes());
        v.extend_from_slice(&[0, 0]);
    } else {
        v.resize(20, 0);
        v[12] = 0x50; // data offset 5 words
        v[13] = 0x02; // SYN
    }
    v.extend_from_slice(payload);
    v
}

fn eth(dst: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst);
    f.extend_from_slice(&CLIENT_MAC);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn to_vip(vmac: [u8; 6], packet: &[u8]) -> Vec<u8> {
    eth(vmac, 0x0800, packet)
}

fn client(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 79, 0, 10 + i)
}

/// The table of frames: (name, frame).
#[expect(clippy::too_many_lines, reason = "the frame table")]
fn frames() -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = Vec::new();
    for i in 0..32u8 {
        let sport = 1024 + u16::from(i) * 37;
        v.push((
            format!("TCP VIP1:80 from {}:{sport}", client(i % 8)),
            to_vip(
                VMAC1,
                &ipv4(
                    PROTO_TCP,
                    client(i % 8),
                    VIP1,
                    0,
                    &l4(PROTO_TCP, sport, 80, &[]),
                ),
            ),
        ));
    }
    for i in 0..16u8 {
        v.push((
            format!("UDP VIP1:{} from {}", 5000 + u16::from(i), client(i)),
            to_vip(
                VMAC1,
                &ipv4(
                    PROTO_UDP,
                    client(i),
                    VIP1,
                    0,
                    &l4(PROTO_UDP, 40000, 5000 + u16::from(i), b"x"),
                ),
            ),
        ));
    }
    for i in 0..8u8 {
        v.push((
            format!("TCP VIP1:8080 (client IP rule) from {}", client(20 + i)),
            to_vip(
                VMAC1,
                &ipv4(
                    PROTO_TCP,
                    client(20 + i),
                    VIP1,
                    0,
                    &l4(PROTO_TCP, 33000, 8080, &[]),
                ),
            ),
        ));
        v.push((
            format!("TCP VIP2:80 from {}", client(30 + i)),
            to_vip(
                VMAC2,
                &ipv4(
                    PROTO_TCP,
                    client(30 + i),
                    VIP2,
                    0,
                    &l4(PROTO_TCP, 34000 + u16::from(i), 80, &[]),
                ),
            ),
        ));
        // Non-first fragments: dropped under VIP1 (port rules), placed by
        // client IP under VIP2.
        v.push((
            format!("non-first fragment to VIP2 from {}", client(40 + i)),
            to_vip(VMAC2, &ipv4(PROTO_TCP, client(40 + i), VIP2, 185, &[0; 32])),
        ));
        v.push((
            format!("first fragment to VIP1:80 from {}", client(i)),
            to_vip(
                VMAC1,
                &ipv4(
                    PROTO_TCP,
                    client(i),
                    VIP1,
                    0x2000,
                    &l4(PROTO_TCP, 2000 + u16::from(i), 80, &[]),
                ),
            ),
        ));
        // A single 802.1Q tag: the stack removes it before the ingress hook.
        let mut tagged = Vec::new();
        tagged.extend_from_slice(&VMAC1);
        tagged.extend_from_slice(&CLIENT_MAC);
        tagged.extend_from_slice(&[0x81, 0x00, 0x00, 10, 0x08, 0x00]);
        tagged.extend_from_slice(&ipv4(
            PROTO_TCP,
            client(i),
            VIP1,
            0,
            &l4(PROTO_TCP, 3000 + u16::from(i), 80, &[]),
        ));
        v.push((format!("802.1Q TCP VIP1:80 from {}", client(i)), tagged));
    }
    let c = client(1);
    v.push((
        "non-first fragment to VIP1".into(),
        to_vip(VMAC1, &ipv4(PROTO_TCP, c, VIP1, 185, &[0; 32])),
    ));
    v.push((
        "TCP VIP1:22, no rule".into(),
        to_vip(
            VMAC1,
            &ipv4(PROTO_TCP, c, VIP1, 0, &l4(PROTO_TCP, 5555, 22, &[])),
        ),
    ));
    v.push((
        "ICMP echo to VIP1".into(),
        to_vip(VMAC1, &ipv4(1, c, VIP1, 0, &[8, 0, 0xf7, 0xfe, 0, 1, 0, 0])),
    ));
    v.push((
        "TCP to the node address".into(),
        eth(
            IFMAC,
            0x0800,
            &ipv4(PROTO_TCP, c, NODE_ADDR, 0, &l4(PROTO_TCP, 5555, 80, &[])),
        ),
    ));
    v.push((
        "UDP to another address".into(),
        to_vip(
            VMAC1,
            &ipv4(
                PROTO_UDP,
                c,
                Ipv4Addr::new(10, 79, 0, 99),
                0,
                &l4(PROTO_UDP, 5555, 7000, b"x"),
            ),
        ),
    ));
    let mut bad_ihl = ipv4(PROTO_TCP, c, VIP1, 0, &l4(PROTO_TCP, 5555, 80, &[]));
    bad_ihl[0] = 0x43;
    v.push(("IPv4 header length 12".into(), to_vip(VMAC1, &bad_ihl)));
    let mut bad_version = ipv4(PROTO_TCP, c, VIP1, 0, &l4(PROTO_TCP, 5555, 80, &[]));
    bad_version[0] = 0x65;
    v.push((
        "IP version 6 in an IPv4 frame".into(),
        to_vip(VMAC1, &bad_version),
    ));
    v.push((
        "TCP to VIP1 cut inside the ports".into(),
        to_vip(VMAC1, &ipv4(PROTO_TCP, c, VIP1, 0, &[0x12])),
    ));
    let mut ipv6 = vec![0x60, 0, 0, 0, 0, 8, 17, 64];
    ipv6.extend_from_slice(&[0; 32]);
    ipv6.extend_from_slice(&l4(PROTO_UDP, 1, 2, &[]));
    v.push(("IPv6 UDP".into(), eth(VMAC1, 0x86dd, &ipv6)));
    v
}

// ---------------------------------------------------------------- XDP side

/// The XDP farm filter loaded with the same VIPs, rules, seed and
/// ownership, run through `BPF_PROG_TEST_RUN`.
struct XdpReference {
    bpf: aya::Ebpf,
}

impl XdpReference {
    fn new() -> Self {
        let mut bpf = ebpf::load().expect("loading the embedded eBPF object");
        let prog: &mut Xdp = bpf
            .program_mut(ebpf::FARM_PROGRAM)
            .expect("farm program")
            .try_into()
            .expect("an XDP program");
        prog.load().expect("verifier accepts the farm filter");
        let mut x = Self { bpf };
        x.add_vip(VIP1, VMAC1, 0, &rules1());
        x.add_vip(VIP2, VMAC2, 1, &rules2());
        let mut cfg: Array<_, FilterConfig> =
            Array::try_from(x.bpf.map_mut("CONFIG").unwrap()).unwrap();
        cfg.set(
            0,
            &FilterConfig {
                ifmac: IFMAC,
                pad: [0; 2],
                seed: SEED,
                enabled: 1,
            },
            0,
        )
        .unwrap();
        x
    }

    fn add_vip(&mut self, vip: Ipv4Addr, vmac: [u8; 6], slot: u32, rules: &[FilterRule]) {
        let mut map: HashMap<_, RuleKey, RuleValue> =
            HashMap::try_from(self.bpf.map_mut("RULES").unwrap()).unwrap();
        for r in rules {
            let key = RuleKey {
                vip: vip.octets(),
                port_be: r.port.to_be(),
                proto: r.proto,
                pad: 0,
            };
            map.insert(&key, &RuleValue { filter: r.filter }, 0)
                .unwrap();
        }
        let ip_only = rules.iter().all(|r| r.filter == FILTER_CLIENT_IP);
        let mut vips: HashMap<_, VipKey, VipValue> =
            HashMap::try_from(self.bpf.map_mut("VIPS").unwrap()).unwrap();
        vips.insert(
            &VipKey { addr: vip.octets() },
            &VipValue {
                vmac,
                flags: if ip_only { VIP_FLAG_IP_ONLY } else { 0 },
                slot,
            },
            0,
        )
        .unwrap();
    }

    fn remove_vip(&mut self, vip: Ipv4Addr) {
        let mut vips: HashMap<_, VipKey, VipValue> =
            HashMap::try_from(self.bpf.map_mut("VIPS").unwrap()).unwrap();
        vips.remove(&VipKey { addr: vip.octets() }).unwrap();
    }

    fn set_owned(&mut self, slot: u32, owned: &[bool]) {
        let mut map: Array<_, u32> = Array::try_from(self.bpf.map_mut("OWNED").unwrap()).unwrap();
        for (b, o) in owned.iter().enumerate() {
            let b = u32::try_from(b).unwrap();
            map.set(slot * BUCKETS + b, &u32::from(*o), 0).unwrap();
        }
    }

    fn counters(&self) -> Vec<u64> {
        let c: PerCpuArray<_, u64> =
            PerCpuArray::try_from(self.bpf.map("COUNTERS").unwrap()).unwrap();
        (0..counter::COUNT)
            .map(|i| c.get(&i, 0).unwrap().iter().sum())
            .collect()
    }

    /// The counter the program moves for this frame; `PASS_OTHER` when it
    /// passes a frame too short to parse (`PASS_UNPARSED`: nftables does
    /// not match such a frame either and counts it as other traffic).
    fn decide(&self, frame: &[u8]) -> u32 {
        let prog: &Xdp = self
            .bpf
            .program(ebpf::FARM_PROGRAM)
            .unwrap()
            .try_into()
            .unwrap();
        let before = self.counters();
        let mut out = vec![0u8; frame.len() + 256];
        let r = prog
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ..TestRunOptions::default()
            })
            .expect("test run");
        let moved = moved(&before, &self.counters());
        match moved.as_slice() {
            [counter::PASS_UNPARSED] => {
                assert_eq!(r.return_value, 2, "an unparsed frame must be passed");
                counter::PASS_OTHER
            }
            [i] => *i,
            m => panic!("XDP moved counters {m:?}, expected exactly one"),
        }
    }
}

fn moved(before: &[u64], after: &[u64]) -> Vec<u32> {
    (0..counter::COUNT)
        .filter(|&i| after[i as usize] != before[i as usize])
        .collect()
}

fn counter_name(i: u32) -> &'static str {
    match i {
        counter::PASS_OTHER => "pass_other",
        counter::ACCEPT => "accept",
        counter::DROP_NOT_OWNER => "drop_not_owner",
        counter::DROP_MALFORMED => "drop_malformed",
        counter::PASS_NO_RULE => "pass_no_rule",
        counter::ARP_REPLY => "arp_reply",
        counter::DROP_FRAGMENT => "drop_fragment",
        counter::PASS_UNPARSED => "pass_unparsed",
        counter::ACCEPT_FLOW => "accept_flow",
        counter::DROP_NO_FLOW => "drop_no_flow",
        counter::NS_REPLY => "ns_reply",
        counter::DROP_LEASE => "drop_lease",
        _ => "?",
    }
}

// ---------------------------------------------------------------- nft side

/// An `AF_PACKET` socket sending raw frames out of one interface.
struct Injector {
    fd: OwnedFd,
    ifindex: i32,
}

impl Injector {
    fn new(interface: &str) -> Self {
        let name = CString::new(interface).unwrap();
        // SAFETY: NUL-terminated name, only read.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        assert_ne!(ifindex, 0, "no interface {interface}");
        // SAFETY: plain socket creation; the fd is owned right away.
        let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
        assert!(raw >= 0, "AF_PACKET: {}", std::io::Error::last_os_error());
        // SAFETY: `raw` is a fresh fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        Self {
            fd,
            ifindex: i32::try_from(ifindex).unwrap(),
        }
    }

    /// Also receives the ARP frames seen on the interface.
    fn arp(interface: &str) -> Self {
        let i = Self::new(interface);
        let proto = libc::c_int::from(0x0806u16.to_be());
        // SAFETY: plain socket creation; the fd is owned right away.
        let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, proto) };
        assert!(raw >= 0, "AF_PACKET: {}", std::io::Error::last_os_error());
        // SAFETY: `raw` is a fresh fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: all-zero is a valid sockaddr_ll.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = u16::try_from(libc::AF_PACKET).unwrap();
        addr.sll_protocol = 0x0806u16.to_be();
        addr.sll_ifindex = i.ifindex;
        let len = u32::try_from(std::mem::size_of::<libc::sockaddr_ll>()).unwrap();
        // SAFETY: a valid address and its size.
        let rc = unsafe { libc::bind(fd.as_raw_fd(), (&raw const addr).cast(), len) };
        assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 300_000,
        };
        let tv_len = u32::try_from(std::mem::size_of::<libc::timeval>()).unwrap();
        // SAFETY: SO_RCVTIMEO with a valid timeval and its size.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const tv).cast(),
                tv_len,
            )
        };
        assert_eq!(rc, 0);
        Self { fd, ..i }
    }

    /// Incoming frames until a receive times out.
    fn incoming(&self) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut buf = [0u8; 2048];
        loop {
            // SAFETY: all-zero is a valid sockaddr_ll.
            let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut len = u32::try_from(std::mem::size_of::<libc::sockaddr_ll>()).unwrap();
            // SAFETY: buffer and address valid for their sizes.
            let n = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    0,
                    (&raw mut from).cast(),
                    &raw mut len,
                )
            };
            let Ok(n) = usize::try_from(n) else {
                return out;
            };
            if from.sll_pkttype != libc::PACKET_OUTGOING {
                out.push(buf[..n].to_vec());
            }
        }
    }

    fn send(&self, frame: &[u8]) {
        // SAFETY: all-zero is a valid sockaddr_ll.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = u16::try_from(libc::AF_PACKET).unwrap();
        addr.sll_ifindex = self.ifindex;
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&frame[..6]);
        // SAFETY: the frame and the address are valid for the lengths given.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&raw const addr).cast(),
                u32::try_from(std::mem::size_of::<libc::sockaddr_ll>()).unwrap(),
            )
        };
        assert_eq!(
            usize::try_from(n).ok(),
            Some(frame.len()),
            "sendto: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Sends the frame and returns the one nftables counter it moved.
fn nft_decide(filter: &NftFilter, inject: &Injector, name: &str, frame: &[u8]) -> u32 {
    let before = filter.counters().expect("nft counters");
    inject.send(frame);
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let now = filter.counters().expect("nft counters");
        let total: u64 = now.iter().sum::<u64>() - before.iter().sum::<u64>();
        if total > 0 {
            // Give a stray second frame the time to show.
            std::thread::sleep(Duration::from_millis(10));
            let after = filter.counters().expect("nft counters");
            let m = moved(&before, &after);
            let total: u64 = after.iter().sum::<u64>() - before.iter().sum::<u64>();
            assert_eq!(total, 1, "{name}: nft counted {total} frames: {m:?}");
            return m[0];
        }
        assert!(
            Instant::now() < deadline,
            "{name}: no nftables counter moved"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Every frame through both filters; returns the disagreements.
fn compare(
    xdp: &XdpReference,
    nft: &NftFilter,
    inject: &Injector,
    frames: &[(String, Vec<u8>)],
) -> (Vec<String>, [u32; counter::COUNT as usize]) {
    let mut bad = Vec::new();
    let mut seen = [0u32; counter::COUNT as usize];
    for (name, frame) in frames {
        let want = xdp.decide(frame);
        let got = nft_decide(nft, inject, name, frame);
        seen[want as usize] += 1;
        if want != got {
            bad.push(format!(
                "{name}: XDP {}, nftables {}",
                counter_name(want),
                counter_name(got)
            ));
        }
    }
    (bad, seen)
}

fn even() -> Vec<bool> {
    (0..BUCKETS).map(|b| b % 2 == 0).collect()
}

fn odd() -> Vec<bool> {
    (0..BUCKETS).map(|b| b % 2 == 1).collect()
}

#[test]
fn nft_backend_takes_the_xdp_decision_for_every_frame() {
    let ns = lab("d");
    let name = ns.name.clone();
    let listing = ns.enter(move || {
        let mut nft = NftFilter::attach("nbA", AttachMode::Generic).expect("attach");
        nft.enable(IFMAC, SEED).expect("enable");
        assert_eq!(nft.add_vip(VIP1, VMAC1, &rules1()).expect("add VIP1"), 0);
        assert_eq!(nft.add_vip(VIP2, VMAC2, &rules2()).expect("add VIP2"), 1);
        nft.set_owned(VIP1, &even()).expect("own VIP1");
        nft.set_owned(VIP2, &even()).expect("own VIP2");
        let mut xdp = XdpReference::new();
        xdp.set_owned(0, &even());
        xdp.set_owned(1, &even());
        let inject = Injector::new("nbB");
        let frames = frames();

        let (bad, seen) = compare(&xdp, &nft, &inject, &frames);
        assert!(bad.is_empty(), "even buckets:\n{}", bad.join("\n"));
        eprintln!(
            "{} frames, same decision: {}",
            frames.len(),
            (0..counter::COUNT)
                .filter(|&c| seen[c as usize] > 0)
                .map(|c| format!("{} {}", seen[c as usize], counter_name(c)))
                .collect::<Vec<_>>()
                .join(", ")
        );
        // The table exercised every decision.
        for c in [
            counter::ACCEPT,
            counter::DROP_NOT_OWNER,
            counter::DROP_MALFORMED,
            counter::PASS_NO_RULE,
            counter::PASS_OTHER,
            counter::DROP_FRAGMENT,
        ] {
            assert!(seen[c as usize] > 0, "no frame for {}", counter_name(c));
        }

        // Ownership moves (released, then taken): same decisions again.
        nft.set_owned(VIP1, &odd()).expect("own odd");
        xdp.set_owned(0, &odd());
        let (bad, _) = compare(&xdp, &nft, &inject, &frames);
        assert!(bad.is_empty(), "odd buckets:\n{}", bad.join("\n"));

        let listing = output(&["nft", "list", "table", "netdev", "safekit_farm_nbA"]);

        // A VIP removed is no longer filtered.
        nft.remove_vip(VIP1, &rules1()).expect("remove VIP1");
        xdp.remove_vip(VIP1);
        assert!(!nft.is_empty());
        let (bad, _) = compare(&xdp, &nft, &inject, &frames);
        assert!(bad.is_empty(), "VIP1 removed:\n{}", bad.join("\n"));
        nft.remove_vip(VIP2, &rules2()).expect("remove VIP2");
        assert!(nft.is_empty());
        drop(nft);
        let tables = output(&["nft", "list", "tables"]).unwrap_or_default();
        assert!(
            !tables.contains("safekit_farm_nbA"),
            "table left after drop: {tables}"
        );
        listing
    });
    // `nft` may fail to print what nftnl wrote; the decisions above are
    // what counts, the listing is shown for the record.
    match listing {
        Ok(l) => eprintln!("netdev table while VIP1 owned the odd buckets ({name}):\n{l}"),
        Err(e) => eprintln!("nft could not list the netdev table ({name}): {e}"),
    }
}

#[test]
fn accepted_frames_reach_the_vip_socket_and_dropped_ones_do_not() {
    let ns = lab("s");
    ns.enter(move || {
        let mut nft = NftFilter::attach("nbA", AttachMode::Generic).expect("attach");
        nft.enable(IFMAC, SEED).expect("enable");
        nft.add_vip(VIP1, VMAC1, &rules1()).expect("add VIP1");
        nft.set_owned(VIP1, &even()).expect("own");
        let sock = UdpSocket::bind((VIP1, UDP_PORT)).expect("bind VIP1");
        sock.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let inject = Injector::new("nbB");
        let (mut owned, mut foreign) = (Vec::new(), Vec::new());
        for i in 0..40u8 {
            let c = client(i);
            let bucket = safekit_common::bucket_client_ip(c.octets(), SEED);
            if bucket.is_multiple_of(2) {
                owned.push(c);
            } else {
                foreign.push(c);
            }
        }
        assert!(!owned.is_empty() && !foreign.is_empty());
        for c in owned.iter().chain(&foreign) {
            let payload = c.to_string();
            let pkt = ipv4(
                PROTO_UDP,
                *c,
                VIP1,
                0,
                &l4(PROTO_UDP, 40000, UDP_PORT, payload.as_bytes()),
            );
            inject.send(&to_vip(VMAC1, &pkt));
        }
        let mut got = Vec::new();
        let mut buf = [0u8; 64];
        while let Ok((n, from)) = sock.recv_from(&mut buf) {
            assert_eq!(from.port(), 40000);
            got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        got.sort();
        let mut want: Vec<String> = owned.iter().map(ToString::to_string).collect();
        want.sort();
        assert_eq!(
            got, want,
            "exactly the clients of owned buckets get through"
        );
        let c = nft.counters().expect("counters");
        assert_eq!(c[counter::ACCEPT as usize], owned.len() as u64);
        assert_eq!(c[counter::DROP_NOT_OWNER as usize], foreign.len() as u64);
    });
}

#[test]
fn firewall_add_is_idempotent_and_remove_cleans_up() {
    let ns = Netns::new("sknb", "f");
    let dir = std::env::temp_dir().join(format!("sknf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("cluster.toml");
    let text = r#"name = "fw"

[[lan]]
name = "default"
replication = true

[[lan]]
name = "backup"

[[node]]
name = "node1"
addrs = { default = "10.80.0.1", backup = "fd00::1" }

[[node]]
name = "node2"
addrs = { default = "10.80.0.2", backup = "fd00::2" }

[ports]
heartbeat = 18888
replication = 15600
http = 19010
https = 19453
"#;
    let cluster = config::parse_cluster(&file, text).expect("valid cluster.toml");
    let _ = std::fs::remove_dir_all(&dir);
    let list = {
        let name = ns.name.clone();
        move || {
            output(&[
                "ip",
                "netns",
                "exec",
                &name,
                "nft",
                "list",
                "table",
                "inet",
                firewall::TABLE,
            ])
        }
    };
    let (first, second, gone, removed_twice) = ns.enter(move || {
        firewall::add(&cluster).expect("firewall add");
        let first = list().expect("table listed after add");
        firewall::add(&cluster).expect("firewall add again");
        let second = list().expect("table listed after a second add");
        firewall::remove().expect("firewall remove");
        let gone = list();
        let removed_twice = firewall::remove();
        (first, second, gone, removed_twice)
    });
    assert_eq!(first, second, "adding twice gives the same ruleset");
    for want in [
        "10.80.0.1",
        "10.80.0.2",
        "fd00::1",
        "fd00::2",
        "udp dport 18888",
        "tcp dport 15600",
        "tcp dport 19010",
        "tcp dport 19453",
        "hook input",
    ] {
        assert!(first.contains(want), "{want:?} missing from:\n{first}");
    }
    let rules = first
        .lines()
        .filter(|l| l.contains("saddr @nodes") && l.trim_end().ends_with("accept"))
        .count();
    assert_eq!(rules, 8, "4 ports x 2 families:\n{first}");
    assert!(gone.is_err(), "table still there after remove: {gone:?}");
    removed_twice.expect("removing an absent table is fine");
}

#[test]
fn arp_requests_for_a_vip_get_its_virtual_mac_from_user_space() {
    let ns = lab("a");
    ns.enter(move || {
        let mut nft = NftFilter::attach("nbA", AttachMode::Generic).expect("attach");
        nft.enable(IFMAC, SEED).expect("enable");
        nft.add_vip(VIP1, VMAC1, &rules1()).expect("add VIP1");
        let client_side = Injector::arp("nbB");
        let request = |tpa: Ipv4Addr| {
            let mut a = vec![0, 1, 0x08, 0x00, 6, 4, 0, 1];
            a.extend_from_slice(&CLIENT_MAC);
            a.extend_from_slice(&client(0).octets());
            a.extend_from_slice(&[0; 6]);
            a.extend_from_slice(&tpa.octets());
            eth([0xff; 6], 0x0806, &a)
        };
        client_side.send(&request(VIP1));
        let replies: Vec<Vec<u8>> = client_side
            .incoming()
            .into_iter()
            .filter(|f| f.len() >= 42 && f[20..22] == [0, 2])
            .collect();
        assert_eq!(
            replies.len(),
            1,
            "one reply, from the responder: {replies:02x?}"
        );
        let r = &replies[0];
        assert_eq!(r[0..6], CLIENT_MAC, "to the requester");
        assert_eq!(r[6..12], IFMAC, "from the interface's own MAC");
        assert_eq!(r[22..28], VMAC1, "the VIP is at the virtual MAC");
        assert_eq!(r[28..32], VIP1.octets());
        assert_eq!(r[32..38], CLIENT_MAC);
        assert_eq!(r[38..42], client(0).octets());
        // Another address of the node: the kernel answers, not the responder.
        client_side.send(&request(NODE_ADDR));
        let replies: Vec<Vec<u8>> = client_side
            .incoming()
            .into_iter()
            .filter(|f| f.len() >= 42 && f[20..22] == [0, 2])
            .collect();
        assert_eq!(replies.len(), 1, "{replies:02x?}");
        assert_eq!(replies[0][22..28], IFMAC);
        // A removed VIP is not answered any more.
        nft.remove_vip(VIP1, &rules1()).expect("remove VIP1");
        client_side.send(&request(VIP1));
        assert!(
            client_side
                .incoming()
                .iter()
                .all(|f| f.len() < 42 || f[20..22] != [0, 2]),
            "no reply for a removed VIP"
        );
        assert_eq!(
            nft.counters().expect("counters")[counter::ARP_REPLY as usize],
            1
        );
    });
}

#[test]
fn the_dataplane_falls_back_to_nftables_where_xdp_cannot_attach() {
    let ns = lab("b");
    ns.enter(move || {
        // Loopback has no native XDP: the fallback takes nftables.
        let mut lo = FarmDataplane::attach(Backend::XdpOrNftables, "lo", AttachMode::Native)
            .expect("attach with fallback");
        assert_eq!(lo.kind(), "nftables");
        lo.enable([0; 6], SEED).expect("enable");
        lo.add_vip(VIP1.into(), VMAC1, &rules1()).expect("add VIP1");
        assert!(!lo.is_empty());
        assert!(FarmDataplane::attach(Backend::Xdp, "lo", AttachMode::Native).is_err());
        let veth = FarmDataplane::attach(Backend::XdpOrNftables, "nbA", AttachMode::Native)
            .expect("attach XDP");
        assert_eq!(veth.kind(), "XDP");
        let nft = FarmDataplane::attach(Backend::Nftables, "nbB", AttachMode::Native)
            .expect("attach nftables");
        assert_eq!(nft.kind(), "nftables");
        // The table belongs to that filter's netlink socket: nobody else
        // replaces it while it lives (a second daemon on the interface).
        let second = NftFilter::attach("nbB", AttachMode::Native)
            .expect_err("a second filter on an owned table");
        assert!(
            second.to_string().contains("Operation not permitted"),
            "{second}"
        );
        drop(nft);
        NftFilter::attach("nbB", AttachMode::Native).expect("attach once the owner is gone");
    });
}
