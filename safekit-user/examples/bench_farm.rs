//! `cargo xtask bench farm`: packets per second through the farm filter,
//! side by side in one run.
//!
//! A veth pair `bA`–`bB` in a network namespace of its own. The traffic
//! generator is the `safekit_bench_tx` XDP program (returns `XDP_TX`) run
//! with `BPF_PROG_TEST_RUN` in live-frames mode on `bA`: every test frame is
//! transmitted to `bB`, where the program under test sees it. The same
//! 64-byte UDP frame to the VIP is sent for every variant:
//!
//! - `no-op XDP`: `safekit_noop` (`XDP_PASS`) attached in native mode on
//!   `bB`, the frame addressed to `bB`'s MAC;
//! - `XDP accept` / `XDP drop`: the farm filter in native mode, every bucket
//!   owned / none, the frame addressed to the VIP's virtual MAC;
//! - `nftables accept` / `nftables drop`: the nftables backend on `bB`'s
//!   ingress hook, every bucket owned / none (no XDP program: `bB` has GRO
//!   on, so the veth takes the frames in NAPI and builds skbs).
//!
//! Accepted frames end in a UDP socket bound to the VIP whose receive
//! buffer is full (the stack's drop there is the same for every accepting
//! variant). Each variant runs `ROUNDS` times, interleaved, over `FRAMES`
//! frames; the median is reported. "Processed" is what `bB`'s receive
//! queue consumed (`ethtool -S`: `rx_queue_*_xdp_packets`), over the wall
//! time from the start of the generator's run until `bB` has consumed them
//! all; generator and receiver share one CPU (the receive softirq runs when
//! each generator batch ends), so every rate includes the generator's cost.
//!
//! Two more families of frames, each against the no-op program fed the same
//! frames:
//!
//! - TCP: a 60-byte segment (ACK, valid checksums) of a connection that is
//!   established in the namespace (`10.99.0.250:40001` to the VIP's port
//!   7001): the farm filter accepts it through its socket lookup
//!   (`bpf_skc_lookup_tcp`, the flow keeping of issue 13), the stack then
//!   drops it as out of window;
//! - IPv6: a 64-byte UDP datagram from `fd99::fa` to the IPv6 VIP
//!   `fd99::64`, accepted (every bucket owned) or dropped (none), ending in
//!   a full UDP socket like the IPv4 one.
//!
//! Targets (issues "farm" and 13): XDP accept within 5 % of the no-op
//! program, with the flow lookup in place (TCP line) and for IPv6; XDP drop
//! at least 3 times the nftables drop rate.

use std::{
    collections::BTreeMap,
    fmt,
    fs::File,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd as _,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use aya::programs::{TestRun as _, TestRunAttrs, TestRunOptions, Xdp, XdpMode};
use safekit::{
    ebpf,
    farm::filter::{AttachMode, FarmFilter, FilterRule},
    nft::NftFilter,
};
use safekit_common::{BUCKETS, FILTER_CLIENT_IP_PORT, PROTO_TCP, PROTO_UDP};

/// Frames per measurement (`SAFEKIT_BENCH_FRAMES` overrides).
const FRAMES: u32 = 2_000_000;
/// Measurements per variant (interleaved).
const ROUNDS: usize = 7;
/// Frames per generator batch (at most 256; the veth ring holds 256).
const BATCH: u32 = 64;
const NS_PREFIX: &str = "skbench-";
const VIP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 100);
const VMAC: [u8; 6] = [0x5a, 0xfe, 10, 99, 0, 100];
const B_MAC: [u8; 6] = [0x02, 0, 0, 0, 0xbe, 0x0b];
const A_MAC: [u8; 6] = [0x02, 0, 0, 0, 0xbe, 0x0a];
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 250);
const PORT: u16 = 7000;
/// The established TCP connection of the TCP line: client port, VIP port.
const TCP_SPORT: u16 = 40001;
const TCP_PORT: u16 = 7001;
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd99, 0, 0, 0, 0, 0, 0, 0x64);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd99, 0, 0, 0, 0, 0, 0, 0xfa);

fn mac(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn run(cmd: &[&str]) -> Result<String> {
    let out = Command::new(cmd[0])
        .args(&cmd[1..])
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The namespace, deleted on drop (its veth pair with it).
struct Netns {
    name: String,
}

impl Netns {
    /// Creates `skbench-<pid>` (after removing leftovers of dead runs) with
    /// the veth pair, the VIP on loopback and GRO on `bB`.
    fn new() -> Result<Self> {
        for name in run(&["ip", "netns", "list"])?
            .lines()
            .filter_map(|l| l.split_whitespace().next())
        {
            if let Some(pid) = name.strip_prefix(NS_PREFIX)
                && !std::path::Path::new(&format!("/proc/{pid}")).exists()
            {
                let _ = run(&["ip", "netns", "del", name]);
            }
        }
        let ns = Self {
            name: format!("{NS_PREFIX}{}", std::process::id()),
        };
        run(&["ip", "netns", "add", &ns.name])?;
        let ip = |args: &[&str]| {
            let mut cmd = vec!["ip", "-n", &ns.name];
            cmd.extend_from_slice(args);
            run(&cmd)
        };
        let exec = |args: &[&str]| {
            let mut cmd = vec!["ip", "netns", "exec", &ns.name];
            cmd.extend_from_slice(args);
            run(&cmd)
        };
        ip(&["link", "add", "bA", "type", "veth", "peer", "name", "bB"])?;
        exec(&["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"])?;
        exec(&["sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1"])?;
        ip(&["link", "set", "bA", "address", &mac(A_MAC)])?;
        ip(&["link", "set", "bB", "address", &mac(B_MAC)])?;
        ip(&["addr", "add", "10.99.0.1/24", "dev", "bB"])?;
        ip(&["addr", "add", &format!("{VIP}/32"), "dev", "lo"])?;
        // The TCP line's client end lives here too (its socket is the
        // established connection the filter finds).
        ip(&["addr", "add", &format!("{CLIENT}/32"), "dev", "lo"])?;
        // IPv6 on lo and bB only, without DAD or router solicitations.
        for (key, value) in [
            ("bB.accept_dad", "0"),
            ("bB.router_solicitations", "0"),
            ("lo.disable_ipv6", "0"),
            ("bB.disable_ipv6", "0"),
        ] {
            exec(&["sysctl", "-qw", &format!("net.ipv6.conf.{key}={value}")])?;
        }
        ip(&["addr", "add", &format!("{VIP6}/128"), "dev", "lo", "nodad"])?;
        for l in ["lo", "bA", "bB"] {
            ip(&["link", "set", l, "up"])?;
        }
        exec(&["ethtool", "-K", "bB", "gro", "on"])?;
        Ok(ns)
    }

    /// Moves this (still single-threaded) process's main thread into the
    /// namespace: netlink, BPF links and sockets opened afterwards live
    /// there, and child processes (`ethtool`) start there.
    fn enter(&self) -> Result<()> {
        let path = format!("/run/netns/{}", self.name);
        let f = File::open(&path).with_context(|| path.clone())?;
        // SAFETY: setns on the calling thread with an fd open for the call.
        let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
        if rc != 0 {
            bail!("setns {path}: {}", std::io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = run(&["ip", "netns", "del", &self.name]);
    }
}

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

/// A 60-byte Ethernet frame: UDP from the client to the VIP (valid IPv4
/// checksum, no UDP checksum).
fn frame(dst: [u8; 6]) -> Vec<u8> {
    let payload = [0u8; 18];
    let udp_len = 8 + payload.len();
    let total = u16::try_from(20 + udp_len).unwrap_or(u16::MAX);
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&[0, 1, 0x40, 0, 64, PROTO_UDP, 0, 0]);
    ip.extend_from_slice(&CLIENT.octets());
    ip.extend_from_slice(&VIP.octets());
    let c = checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut f = Vec::new();
    f.extend_from_slice(&dst);
    f.extend_from_slice(&A_MAC);
    f.extend_from_slice(&[0x08, 0x00]);
    f.extend_from_slice(&ip);
    f.extend_from_slice(&40000u16.to_be_bytes());
    f.extend_from_slice(&PORT.to_be_bytes());
    f.extend_from_slice(&u16::try_from(udp_len).unwrap_or(0).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(&payload);
    f
}

/// A 60-byte Ethernet frame: a TCP segment (ACK, 6 bytes of data, valid
/// IPv4 and TCP checksums) of the connection CLIENT:`TCP_SPORT` → VIP:`TCP_PORT`.
fn tcp_frame(dst: [u8; 6]) -> Vec<u8> {
    let data = [0u8; 6];
    let tcp_len = 20 + data.len();
    let total = u16::try_from(20 + tcp_len).unwrap_or(u16::MAX);
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&[0, 1, 0x40, 0, 64, PROTO_TCP, 0, 0]);
    ip.extend_from_slice(&CLIENT.octets());
    ip.extend_from_slice(&VIP.octets());
    let c = checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut tcp = Vec::new();
    tcp.extend_from_slice(&TCP_SPORT.to_be_bytes());
    tcp.extend_from_slice(&TCP_PORT.to_be_bytes());
    tcp.extend_from_slice(&[
        0x10, 0, 0, 1, 0x20, 0, 0, 1, 0x50, 0x10, 0xff, 0xff, 0, 0, 0, 0,
    ]);
    tcp.extend_from_slice(&data);
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&CLIENT.octets());
    pseudo.extend_from_slice(&VIP.octets());
    pseudo.extend_from_slice(&[0, PROTO_TCP]);
    pseudo.extend_from_slice(&u16::try_from(tcp_len).unwrap_or(0).to_be_bytes());
    pseudo.extend_from_slice(&tcp);
    let c = checksum(&pseudo);
    tcp[16..18].copy_from_slice(&c.to_be_bytes());
    let mut f = Vec::new();
    f.extend_from_slice(&dst);
    f.extend_from_slice(&A_MAC);
    f.extend_from_slice(&[0x08, 0x00]);
    f.extend_from_slice(&ip);
    f.extend_from_slice(&tcp);
    f
}

/// A 64-byte Ethernet frame: UDP over IPv6 from CLIENT6 to VIP6:`PORT`
/// (UDP checksum computed: IPv6 requires it).
fn udp6_frame(dst: [u8; 6]) -> Vec<u8> {
    let payload = [0u8; 2];
    let udp_len = u16::try_from(8 + payload.len()).unwrap_or(0);
    let mut udp = Vec::new();
    udp.extend_from_slice(&40000u16.to_be_bytes());
    udp.extend_from_slice(&PORT.to_be_bytes());
    udp.extend_from_slice(&udp_len.to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(&payload);
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&CLIENT6.octets());
    pseudo.extend_from_slice(&VIP6.octets());
    pseudo.extend_from_slice(&[0, 0]);
    pseudo.extend_from_slice(&udp_len.to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, PROTO_UDP]);
    pseudo.extend_from_slice(&udp);
    let c = checksum(&pseudo);
    udp[6..8].copy_from_slice(&c.to_be_bytes());
    let mut f = Vec::new();
    f.extend_from_slice(&dst);
    f.extend_from_slice(&A_MAC);
    f.extend_from_slice(&[0x86, 0xdd]);
    f.extend_from_slice(&[0x60, 0, 0, 0]);
    f.extend_from_slice(&udp_len.to_be_bytes());
    f.extend_from_slice(&[PROTO_UDP, 64]);
    f.extend_from_slice(&CLIENT6.octets());
    f.extend_from_slice(&VIP6.octets());
    f.extend_from_slice(&udp);
    f
}

fn ifindex(name: &str) -> Result<u32> {
    let c = std::ffi::CString::new(name)?;
    // SAFETY: NUL-terminated name, only read.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if i == 0 {
        bail!("no interface {name}");
    }
    Ok(i)
}

/// Sum of the veth statistics whose name ends with `suffix`.
fn veth_stat(interface: &str, suffix: &str) -> Result<u64> {
    let out = run(&["ethtool", "-S", interface])?;
    Ok(out
        .lines()
        .filter_map(|l| l.trim().split_once(':'))
        .filter(|(k, _)| k.trim().ends_with(suffix))
        .filter_map(|(_, v)| v.trim().parse::<u64>().ok())
        .sum())
}

/// The traffic generator on `bA`.
struct Generator {
    bpf: aya::Ebpf,
    ctx: Vec<u8>,
}

impl Generator {
    fn new(a_index: u32) -> Result<Self> {
        let mut bpf = ebpf::load().context("loading the eBPF object")?;
        let prog: &mut Xdp = bpf
            .program_mut(ebpf::BENCH_TX_PROGRAM)
            .context("no safekit_bench_tx program")?
            .try_into()?;
        prog.load()?;
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex,
        // rx_queue_index, egress_ifindex (data_end set per frame).
        let mut ctx = vec![0u8; 24];
        ctx[12..16].copy_from_slice(&a_index.to_ne_bytes());
        Ok(Self { bpf, ctx })
    }

    /// Sends `count` copies of `frame` out of `bA`; returns the kernel's
    /// time per frame.
    fn send(&mut self, frame: &[u8], count: u32) -> Result<Duration> {
        let len = u32::try_from(frame.len())?;
        self.ctx[4..8].copy_from_slice(&len.to_ne_bytes());
        let prog: &Xdp = self
            .bpf
            .program(ebpf::BENCH_TX_PROGRAM)
            .context("no safekit_bench_tx program")?
            .try_into()?;
        let r = prog
            .test_run(TestRunOptions {
                data_in: Some(frame),
                ctx_in: Some(&self.ctx),
                repeat: count,
                attrs: TestRunAttrs::new().xdp_live_frames(BATCH),
                ..TestRunOptions::default()
            })
            .context("BPF_PROG_TEST_RUN in live-frames mode")?;
        Ok(r.duration)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Variant {
    Noop,
    XdpAccept,
    XdpDrop,
    NftAccept,
    NftDrop,
    NoopTcp,
    XdpAcceptTcp,
    Noop6,
    XdpAccept6,
    XdpDrop6,
}

impl fmt::Display for Variant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Noop => "no-op XDP (pass)",
            Self::XdpAccept => "XDP farm, accept path",
            Self::XdpDrop => "XDP farm, drop path",
            Self::NftAccept => "nftables, accept path",
            Self::NftDrop => "nftables, drop path",
            Self::NoopTcp => "TCP: no-op XDP",
            Self::XdpAcceptTcp => "TCP: XDP, flow lookup",
            Self::Noop6 => "IPv6: no-op XDP",
            Self::XdpAccept6 => "IPv6: XDP accept",
            Self::XdpDrop6 => "IPv6: XDP drop",
        })
    }
}

impl Variant {
    /// The frame this variant is fed.
    fn frame(self) -> Vec<u8> {
        let dst = if matches!(self, Self::Noop | Self::NoopTcp | Self::Noop6) {
            B_MAC
        } else {
            VMAC
        };
        match self {
            Self::NoopTcp | Self::XdpAcceptTcp => tcp_frame(dst),
            Self::Noop6 | Self::XdpAccept6 | Self::XdpDrop6 => udp6_frame(dst),
            _ => frame(dst),
        }
    }
}

const VARIANTS: [Variant; 10] = [
    Variant::Noop,
    Variant::XdpAccept,
    Variant::XdpDrop,
    Variant::NftAccept,
    Variant::NftDrop,
    Variant::NoopTcp,
    Variant::XdpAcceptTcp,
    Variant::Noop6,
    Variant::XdpAccept6,
    Variant::XdpDrop6,
];

/// What the variant attached to `bB` (detached when dropped).
enum Attached {
    /// The loaded object keeps the no-op program attached.
    Noop {
        _attached: aya::Ebpf,
    },
    Xdp(Box<FarmFilter>),
    Nft(Box<NftFilter>),
}

fn rules() -> [FilterRule; 2] {
    [
        FilterRule {
            proto: PROTO_UDP,
            port: PORT,
            filter: FILTER_CLIENT_IP_PORT,
        },
        FilterRule {
            proto: PROTO_TCP,
            port: TCP_PORT,
            filter: FILTER_CLIENT_IP_PORT,
        },
    ]
}

fn attach(v: Variant) -> Result<Attached> {
    let owned = vec![
        matches!(
            v,
            Variant::XdpAccept | Variant::NftAccept | Variant::XdpAccept6
        );
        BUCKETS as usize
    ];
    Ok(match v {
        Variant::Noop | Variant::NoopTcp | Variant::Noop6 => {
            let mut bpf = ebpf::load()?;
            let prog: &mut Xdp = bpf
                .program_mut(ebpf::NOOP_PROGRAM)
                .context("no safekit_noop program")?
                .try_into()?;
            prog.load()?;
            prog.attach(c"bB", XdpMode::Driver)
                .context("attaching the no-op program (native)")?;
            Attached::Noop { _attached: bpf }
        }
        Variant::XdpAccept
        | Variant::XdpDrop
        | Variant::XdpAcceptTcp
        | Variant::XdpAccept6
        | Variant::XdpDrop6 => {
            // The TCP line owns no bucket: its segments are accepted through
            // the socket lookup alone.
            let mut f = FarmFilter::attach("bB", AttachMode::Native)?;
            f.enable(B_MAC, 0)?;
            f.add_vip(VIP, VMAC, &rules())?;
            f.set_owned(VIP, &owned)?;
            f.add_vip(VIP6, VMAC, &rules())?;
            f.set_owned(VIP6, &owned)?;
            // No daemon here to push the lease forward: one that never
            // lapses (the check itself still runs on the accept path).
            f.set_lease(VIP, u64::MAX)?;
            f.set_lease(VIP6, u64::MAX)?;
            Attached::Xdp(Box::new(f))
        }
        Variant::NftAccept | Variant::NftDrop => {
            let mut f = NftFilter::attach("bB", AttachMode::Native)?;
            f.enable(B_MAC, 0)?;
            f.add_vip(VIP, VMAC, &rules()[..1])?;
            f.set_owned(VIP, &owned)?;
            Attached::Nft(Box::new(f))
        }
    })
}

/// The filter's own count of what it decided (accepted or dropped).
fn decided(a: &Attached) -> Result<Option<u64>> {
    use safekit_common::counter::{ACCEPT, ACCEPT_FLOW, DROP_NO_FLOW, DROP_NOT_OWNER};
    let c = match a {
        Attached::Noop { .. } => return Ok(None),
        Attached::Xdp(f) => f.counters()?,
        Attached::Nft(f) => f.counters()?,
    };
    Ok(Some(
        [ACCEPT, ACCEPT_FLOW, DROP_NOT_OWNER, DROP_NO_FLOW]
            .iter()
            .map(|&i| c.get(i as usize).copied().unwrap_or(0))
            .sum(),
    ))
}

/// One measurement.
#[derive(Debug, Clone, Copy)]
struct Sample {
    /// Frames `bB` consumed per second.
    pps: f64,
    /// Frames the generator could not hand to `bB` (ring full).
    lost: u64,
    /// Kernel's time per frame in the generator's run.
    per_frame: Duration,
}

fn measure(generator: &mut Generator, v: Variant, frames: u32) -> Result<Sample> {
    let attached = attach(v)?;
    let f = v.frame();
    // Warm-up (caches, page pool).
    generator.send(&f, frames / 20 + 1)?;
    std::thread::sleep(Duration::from_millis(50));
    let rx0 = veth_stat("bB", "_xdp_packets")?;
    let err0 = veth_stat("bA", "xdp_xmit_err")?;
    let dec0 = decided(&attached)?;
    let t0 = Instant::now();
    let per_frame = generator.send(&f, frames)?;
    let mut elapsed = t0.elapsed();
    // Whatever `bB` has not consumed yet (softirq deferred to ksoftirqd)
    // still counts: wait until its count stops moving.
    let mut rx = veth_stat("bB", "_xdp_packets")?;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        std::thread::sleep(Duration::from_millis(5));
        let now = veth_stat("bB", "_xdp_packets")?;
        if now == rx || Instant::now() > deadline {
            break;
        }
        rx = now;
        elapsed = t0.elapsed();
    }
    let processed = rx - rx0;
    let lost = veth_stat("bA", "xdp_xmit_err")? - err0;
    if let (Some(d0), Some(d1)) = (dec0, decided(&attached)?)
        && d1 - d0 < processed * 99 / 100
    {
        bail!(
            "{v}: the filter decided {} frames of {processed} processed",
            d1 - d0
        );
    }
    drop(attached);
    #[expect(clippy::cast_precision_loss, reason = "frame counts far below 2^52")]
    let pps = processed as f64 / elapsed.as_secs_f64();
    Ok(Sample {
        pps,
        lost,
        per_frame,
    })
}

/// Time per frame of a program alone, `BPF_PROG_TEST_RUN` repeating one
/// frame (no generator, no veth, no stack): the filter's own cost.
fn program_cost(program: &str, owned: bool, frame: &[u8]) -> Result<Duration> {
    use aya::maps::{Array, HashMap};
    use safekit_common::{FilterConfig, Rule6Key, RuleKey, RuleValue, Vip6Key, VipKey, VipValue};
    let mut bpf = ebpf::load()?;
    if program == ebpf::FARM_PROGRAM {
        let mut vips: HashMap<_, VipKey, VipValue> =
            HashMap::try_from(bpf.map_mut("VIPS").context("VIPS")?)?;
        let value = VipValue {
            vmac: VMAC,
            flags: 0,
            slot: 0,
        };
        vips.insert(&VipKey { addr: VIP.octets() }, &value, 0)?;
        let mut rules: HashMap<_, RuleKey, RuleValue> =
            HashMap::try_from(bpf.map_mut("RULES").context("RULES")?)?;
        let key = RuleKey {
            vip: VIP.octets(),
            port_be: PORT.to_be(),
            proto: PROTO_UDP,
            pad: 0,
        };
        rules.insert(
            &key,
            &RuleValue {
                filter: FILTER_CLIENT_IP_PORT,
            },
            0,
        )?;
        let tcp = RuleKey {
            port_be: TCP_PORT.to_be(),
            proto: PROTO_TCP,
            ..key
        };
        rules.insert(
            &tcp,
            &RuleValue {
                filter: FILTER_CLIENT_IP_PORT,
            },
            0,
        )?;
        let mut vips6: HashMap<_, Vip6Key, VipValue> =
            HashMap::try_from(bpf.map_mut("VIPS6").context("VIPS6")?)?;
        vips6.insert(
            &Vip6Key {
                addr: VIP6.octets(),
            },
            &value,
            0,
        )?;
        let mut rules6: HashMap<_, Rule6Key, RuleValue> =
            HashMap::try_from(bpf.map_mut("RULES6").context("RULES6")?)?;
        let key6 = Rule6Key {
            vip: VIP6.octets(),
            port_be: PORT.to_be(),
            proto: PROTO_UDP,
            pad: 0,
        };
        rules6.insert(
            &key6,
            &RuleValue {
                filter: FILTER_CLIENT_IP_PORT,
            },
            0,
        )?;
        let mut own: Array<_, u32> = Array::try_from(bpf.map_mut("OWNED").context("OWNED")?)?;
        for b in 0..BUCKETS {
            own.set(b, &u32::from(owned), 0)?;
        }
        let mut cfg: Array<_, FilterConfig> =
            Array::try_from(bpf.map_mut("CONFIG").context("CONFIG")?)?;
        let c = FilterConfig {
            ifmac: B_MAC,
            pad: [0; 2],
            seed: 0,
            enabled: 1,
        };
        cfg.set(0, &c, 0)?;
    }
    let prog: &mut Xdp = bpf
        .program_mut(program)
        .with_context(|| format!("no {program} program"))?
        .try_into()?;
    prog.load()?;
    let mut best = Duration::MAX;
    for _ in 0..3 {
        let r = prog.test_run(TestRunOptions {
            data_in: Some(frame),
            repeat: 1_000_000,
            ..TestRunOptions::default()
        })?;
        best = best.min(r.duration);
    }
    Ok(best)
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s.get(s.len() / 2).copied().unwrap_or(0.0)
}

/// The sockets accepted frames end in, kept open for the run.
struct Sockets {
    _sink: UdpSocket,
    _sink6: UdpSocket,
    _client: TcpStream,
    _server: TcpStream,
}

/// Accepted UDP frames end in sockets nobody reads, their buffers full after
/// the first frames, so the stack drops them there; the TCP line's frames
/// belong to an established connection with both ends in this namespace.
fn sockets() -> Result<Sockets> {
    let sink = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)?;
    sink.set_recv_buffer_size(1)?;
    sink.bind(&SocketAddr::from((VIP, PORT)).into())?;
    let sink6 = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::DGRAM, None)?;
    sink6.set_recv_buffer_size(1)?;
    sink6.bind(&SocketAddr::from((VIP6, PORT)).into())?;
    let listener = TcpListener::bind(SocketAddr::from((VIP, TCP_PORT)))?;
    let client = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    client.bind(&SocketAddr::from((CLIENT, TCP_SPORT)).into())?;
    client.connect(&SocketAddr::from((VIP, TCP_PORT)).into())?;
    let (server, _) = listener.accept()?;
    Ok(Sockets {
        _sink: sink.into(),
        _sink6: sink6.into(),
        _client: client.into(),
        _server: server,
    })
}

/// The filter's own cost per frame on each path, next to the no-op program.
fn print_program_costs() -> Result<()> {
    println!("\nprogram alone (BPF_PROG_TEST_RUN, 1M runs, best of 3), ns per frame:");
    let costs = [
        ("no-op", ebpf::NOOP_PROGRAM, true, frame(B_MAC)),
        ("farm, accept path", ebpf::FARM_PROGRAM, true, frame(VMAC)),
        ("farm, drop path", ebpf::FARM_PROGRAM, false, frame(VMAC)),
        (
            "farm, TCP flow lookup",
            ebpf::FARM_PROGRAM,
            false,
            tcp_frame(VMAC),
        ),
        (
            "farm, IPv6 accept",
            ebpf::FARM_PROGRAM,
            true,
            udp6_frame(VMAC),
        ),
        (
            "farm, IPv6 drop",
            ebpf::FARM_PROGRAM,
            false,
            udp6_frame(VMAC),
        ),
    ];
    for (name, program, owned, f) in costs {
        let d = program_cost(program, owned, &f)?;
        println!("  {name:<22} {:>8.1}", d.as_secs_f64() * 1e9);
    }
    Ok(())
}

fn main() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("bench_farm needs root (network namespaces, XDP, nftables)");
    }
    let frames: u32 = std::env::var("SAFEKIT_BENCH_FRAMES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(FRAMES);
    let ns = Netns::new()?;
    ns.enter()?;
    let _sockets = sockets()?;
    let mut generator = Generator::new(ifindex("bA")?)?;
    println!(
        "farm filter benchmark: {frames} frames of 60 bytes per measurement, \
         {ROUNDS} rounds, generator batch {BATCH}, namespace {}",
        ns.name
    );
    let mut samples: BTreeMap<Variant, Vec<Sample>> = BTreeMap::new();
    for round in 0..ROUNDS {
        for i in 0..VARIANTS.len() {
            let v = VARIANTS[(i + round) % VARIANTS.len()];
            let s = measure(&mut generator, v, frames)?;
            samples.entry(v).or_default().push(s);
        }
    }
    println!(
        "\n{:<24} {:>10} {:>10} {:>10} {:>11} {:>8}",
        "variant", "Mpps", "min", "max", "ns/frame", "lost"
    );
    let mut med = BTreeMap::new();
    for v in VARIANTS {
        let s = &samples[&v];
        let pps: Vec<f64> = s.iter().map(|s| s.pps).collect();
        let m = median(&pps);
        med.insert(v, m);
        let lo = pps.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = pps.iter().copied().fold(0.0, f64::max);
        let ns: Vec<f64> = s.iter().map(|s| s.per_frame.as_secs_f64() * 1e9).collect();
        let lost: u64 = s.iter().map(|s| s.lost).sum();
        println!(
            "{:<24} {:>10.3} {:>10.3} {:>10.3} {:>11.1} {:>8}",
            v.to_string(),
            m / 1e6,
            lo / 1e6,
            hi / 1e6,
            median(&ns),
            lost
        );
    }
    print_program_costs()?;
    let tcp = med[&Variant::XdpAcceptTcp] / med[&Variant::NoopTcp];
    let v6 = med[&Variant::XdpAccept6] / med[&Variant::Noop6];
    let v6_drop = med[&Variant::XdpDrop6] / med[&Variant::NftDrop];
    let accept = med[&Variant::XdpAccept] / med[&Variant::Noop];
    let drop = med[&Variant::XdpDrop] / med[&Variant::NftDrop];
    let nft_accept = med[&Variant::NftAccept] / med[&Variant::Noop];
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
    println!("\nratios (medians):");
    println!(
        "  XDP accept / no-op XDP        {accept:>6.3}   target >= 0.95   {}",
        verdict(accept >= 0.95)
    );
    println!(
        "  XDP drop / nftables drop      {drop:>6.2}x  target >= 3x     {}",
        verdict(drop >= 3.0)
    );
    println!(
        "  TCP flow lookup / no-op XDP   {tcp:>6.3}   target >= 0.95   {}",
        verdict(tcp >= 0.95)
    );
    println!(
        "  IPv6 accept / IPv6 no-op XDP  {v6:>6.3}   target >= 0.95   {}",
        verdict(v6 >= 0.95)
    );
    println!("  IPv6 XDP drop / nftables drop {v6_drop:>6.2}x  (IPv4 nftables: it has no IPv6)");
    println!("  nftables accept / no-op XDP   {nft_accept:>6.3}   (for comparison)");
    println!(
        "\nevery rate includes the generator's cost (same CPU, same frames); \
         accepted frames are dropped by the stack at a full UDP socket."
    );
    Ok(())
}
