//! Runs the embedded XDP farm filter through `BPF_PROG_TEST_RUN`: proves the
//! whole eBPF toolchain (nightly, bpf-linker, aya-build, embedding, loading,
//! verifier) and checks verdicts and output frames on a table of packets.
//! Needs root (`CAP_BPF`); the suite runs as root.

use aya::{
    maps::{Array, HashMap, PerCpuArray},
    programs::{ProgramError, TestRun as _, TestRunOptions, Xdp},
};
use safekit::ebpf;
use safekit_common::{
    BUCKETS, FILTER_CLIENT_IP, FILTER_CLIENT_IP_PORT, FilterConfig, InlineRule, PROTO_TCP,
    PROTO_UDP, Rule6Key, RuleKey, RuleValue, SlotRules, Vip6Key, VipIndex, VipKey, VipValue,
    bucket_client_ip, bucket_client_ip_port, bucket_client_ip6, bucket_client_ip6_port, counter,
    tcp_flag, vip_index,
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

const VIP: [u8; 4] = [10, 9, 0, 100];
const VMAC: [u8; 6] = [0x5a, 0xfe, 10, 9, 0, 100];
const IFMAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xcc];
const VIP6: [u8; 16] = [0xfd, 0x09, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x64];
const VMAC6: [u8; 6] = [0x5a, 0xfe, 0x06, 0, 0, 0x64];
const CLIENT6: [u8; 16] = [0xfd, 0x09, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xfa];

fn eth(dst: [u8; 6], ethertype: u16) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst);
    f.extend_from_slice(&CLIENT_MAC);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f
}

fn tcp_to(daddr: [u8; 4], saddr: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
    let mut f = eth(VMAC, 0x0800);
    let mut ip = vec![0x45, 0, 0, 40, 0, 1, 0x40, 0, 64, PROTO_TCP, 0, 0];
    ip.extend_from_slice(&saddr);
    ip.extend_from_slice(&daddr);
    f.extend_from_slice(&ip);
    f.extend_from_slice(&tcp_seg(sport, dport, tcp_flag::SYN));
    f
}

/// A 20-byte TCP header with these flags.
fn tcp_seg(sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mut l4 = Vec::new();
    l4.extend_from_slice(&sport.to_be_bytes());
    l4.extend_from_slice(&dport.to_be_bytes());
    l4.resize(20, 0);
    l4[12] = 0x50; // data offset: 5 words
    l4[13] = flags;
    l4
}

struct Filter {
    bpf: aya::Ebpf,
}

impl Filter {
    fn new() -> Self {
        let mut bpf = ebpf::load().expect("loading the embedded eBPF object");
        let prog: &mut Xdp = bpf
            .program_mut(ebpf::FARM_PROGRAM)
            .expect("program in object")
            .try_into()
            .expect("an XDP program");
        prog.load().expect("verifier accepts the farm filter");
        let mut vips: HashMap<_, VipKey, VipValue> =
            HashMap::try_from(bpf.map_mut("VIPS").unwrap()).unwrap();
        vips.insert(
            &VipKey { addr: VIP },
            &VipValue {
                vmac: VMAC,
                flags: 0,
                slot: 0,
            },
            0,
        )
        .unwrap();
        let mut rules: HashMap<_, RuleKey, RuleValue> =
            HashMap::try_from(bpf.map_mut("RULES").unwrap()).unwrap();
        rules
            .insert(
                &RuleKey {
                    vip: VIP,
                    port_be: 80u16.to_be(),
                    proto: PROTO_TCP,
                    pad: 0,
                },
                &RuleValue {
                    filter: FILTER_CLIENT_IP_PORT,
                },
                0,
            )
            .unwrap();
        let mut cfg: Array<_, FilterConfig> =
            Array::try_from(bpf.map_mut("CONFIG").unwrap()).unwrap();
        cfg.set(
            0,
            &FilterConfig {
                ifmac: IFMAC,
                pad: [0; 2],
                seed: 0,
                enabled: 1,
            },
            0,
        )
        .unwrap();
        // The IPv6 VIP shares slot 0 (its buckets) with the IPv4 one.
        let mut vips6: HashMap<_, Vip6Key, VipValue> =
            HashMap::try_from(bpf.map_mut("VIPS6").unwrap()).unwrap();
        vips6
            .insert(
                &Vip6Key { addr: VIP6 },
                &VipValue {
                    vmac: VMAC6,
                    flags: 0,
                    slot: 0,
                },
                0,
            )
            .unwrap();
        let mut rules6: HashMap<_, Rule6Key, RuleValue> =
            HashMap::try_from(bpf.map_mut("RULES6").unwrap()).unwrap();
        for (proto, port, filter) in [
            (PROTO_TCP, 80u16, FILTER_CLIENT_IP_PORT),
            (PROTO_UDP, 0, FILTER_CLIENT_IP),
        ] {
            rules6
                .insert(
                    &Rule6Key {
                        vip: VIP6,
                        port_be: port.to_be(),
                        proto,
                        pad: 0,
                    },
                    &RuleValue { filter },
                    0,
                )
                .unwrap();
        }
        Self { bpf }
    }

    /// Owns exactly the even buckets.
    fn own_even_buckets(&mut self) {
        let mut owned: Array<_, u32> = Array::try_from(self.bpf.map_mut("OWNED").unwrap()).unwrap();
        for b in 0..BUCKETS {
            owned.set(b, &u32::from(b % 2 == 0), 0).unwrap();
        }
    }

    fn run(&self, frame: &[u8]) -> Result<(u32, Vec<u8>), ProgramError> {
        let prog: &Xdp = self
            .bpf
            .program(ebpf::FARM_PROGRAM)
            .unwrap()
            .try_into()
            .unwrap();
        let mut out = vec![0u8; frame.len() + 256];
        let r = prog.test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ..TestRunOptions::default()
        })?;
        out.truncate(r.data_size_out as usize);
        Ok((r.return_value, out))
    }

    fn counter(&self, index: u32) -> u64 {
        let c: PerCpuArray<_, u64> =
            PerCpuArray::try_from(self.bpf.map("COUNTERS").unwrap()).unwrap();
        c.get(&index, 0).unwrap().iter().sum()
    }
}

/// A frame and what the filter must do with it.
struct Case {
    name: &'static str,
    frame: Vec<u8>,
    verdict: u32,
    /// Expected output frame (None: unchanged input).
    output: Option<Vec<u8>>,
    /// Counter that must move by one.
    counter: u32,
}

const XDP_TX: u32 = 3;
const CLIENT: [u8; 4] = [10, 9, 0, 250];

fn ipv4(proto: u8, saddr: [u8; 4], daddr: [u8; 4], frag: u16, l4: &[u8]) -> Vec<u8> {
    let total = u16::try_from(20 + l4.len()).unwrap();
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&[0, 7]);
    ip.extend_from_slice(&frag.to_be_bytes());
    ip.extend_from_slice(&[64, proto, 0, 0]);
    ip.extend_from_slice(&saddr);
    ip.extend_from_slice(&daddr);
    ip.extend_from_slice(l4);
    ip
}

fn l4_ports(sport: u16, dport: u16, len: usize) -> Vec<u8> {
    let mut l4 = Vec::new();
    l4.extend_from_slice(&sport.to_be_bytes());
    l4.extend_from_slice(&dport.to_be_bytes());
    l4.resize(len, 0);
    l4
}

fn frame(ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = eth(VMAC, ethertype);
    f.extend_from_slice(payload);
    f
}

fn vlan(tags: &[u16], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&VMAC);
    f.extend_from_slice(&CLIENT_MAC);
    for (i, t) in tags.iter().enumerate() {
        f.extend_from_slice(
            &(if i == 0 && tags.len() == 2 {
                0x88a8u16
            } else {
                0x8100u16
            })
            .to_be_bytes(),
        );
        f.extend_from_slice(&t.to_be_bytes());
    }
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn arp(op: u16, sha: [u8; 6], spa: [u8; 4], tha: [u8; 6], tpa: [u8; 4]) -> Vec<u8> {
    let mut a = vec![0, 1, 0x08, 0x00, 6, 4];
    a.extend_from_slice(&op.to_be_bytes());
    a.extend_from_slice(&sha);
    a.extend_from_slice(&spa);
    a.extend_from_slice(&tha);
    a.extend_from_slice(&tpa);
    a
}

fn with_dst(mut f: Vec<u8>, mac: [u8; 6]) -> Vec<u8> {
    f[0..6].copy_from_slice(&mac);
    f
}

fn owned(port: u16) -> bool {
    bucket_client_ip_port(CLIENT, port.to_be_bytes(), 0).is_multiple_of(2)
}

#[expect(clippy::too_many_lines, reason = "the packet table")]
#[expect(
    clippy::maybe_infinite_iter,
    reason = "a port in each bucket class exists within 1024.."
)]
fn cases() -> Vec<Case> {
    use counter::*;
    use tcp_flag::{ACK, FIN, RST};
    let p_own = (1024u16..).find(|p| owned(*p)).unwrap();
    let p_foreign = (1024u16..).find(|p| !owned(*p)).unwrap();
    let tcp_own = frame(
        0x0800,
        &ipv4(
            PROTO_TCP,
            CLIENT,
            VIP,
            0,
            &tcp_seg(p_own, 80, tcp_flag::SYN),
        ),
    );
    let tcp_foreign = frame(
        0x0800,
        &ipv4(
            PROTO_TCP,
            CLIENT,
            VIP,
            0,
            &tcp_seg(p_foreign, 80, tcp_flag::SYN),
        ),
    );
    // The UDP rule hashes the client IP only: one client of each class.
    let udp_client = |owned: bool| {
        (1u8..=254)
            .map(|i| [10, 9, 1, i])
            .find(|c| bucket_client_ip(*c, 0).is_multiple_of(2) == owned)
            .unwrap()
    };
    let udp_to_vip = |client: [u8; 4]| {
        frame(
            0x0800,
            &ipv4(PROTO_UDP, client, VIP, 0, &l4_ports(5353, 9999, 8)),
        )
    };
    let udp_own = udp_to_vip(udp_client(true));
    let udp_foreign = udp_to_vip(udp_client(false));
    let icmp = frame(0x0800, &ipv4(1, CLIENT, VIP, 0, &[8, 0, 0, 0, 0, 1, 0, 1]));
    let not_vip = frame(
        0x0800,
        &ipv4(
            PROTO_TCP,
            CLIENT,
            [10, 9, 0, 1],
            0,
            &tcp_seg(p_foreign, 80, tcp_flag::SYN),
        ),
    );
    let tcp_other_port = frame(
        0x0800,
        &ipv4(
            PROTO_TCP,
            CLIENT,
            VIP,
            0,
            &tcp_seg(p_foreign, 22, tcp_flag::SYN),
        ),
    );
    // Non-first fragment (offset 8 * 185 bytes) to the TCP rule VIP: no
    // ports, and that VIP hashes ports, so it cannot be placed.
    let frag_tail = frame(0x0800, &ipv4(PROTO_TCP, CLIENT, VIP, 185, &[0; 32]));
    // First fragment (MF set, offset 0) carries the ports: placed normally.
    let frag_head = frame(
        0x0800,
        &ipv4(
            PROTO_TCP,
            CLIENT,
            VIP,
            0x2000,
            &tcp_seg(p_own, 80, tcp_flag::SYN),
        ),
    );
    let arp_req = frame(0x0806, &arp(1, CLIENT_MAC, CLIENT, [0; 6], VIP));
    let mut arp_reply_out = Vec::new();
    arp_reply_out.extend_from_slice(&CLIENT_MAC);
    // Ethernet source: the node's own MAC, never the virtual one.
    arp_reply_out.extend_from_slice(&IFMAC);
    arp_reply_out.extend_from_slice(&0x0806u16.to_be_bytes());
    arp_reply_out.extend_from_slice(&arp(2, VMAC, VIP, CLIENT_MAC, CLIENT));
    let arp_req_other = frame(0x0806, &arp(1, CLIENT_MAC, CLIENT, [0; 6], [10, 9, 0, 1]));
    let arp_reply_in = frame(0x0806, &arp(2, CLIENT_MAC, CLIENT, VMAC, VIP));
    let vlan_own = vlan(
        &[10],
        0x0800,
        &ipv4(
            PROTO_TCP,
            CLIENT,
            VIP,
            0,
            &tcp_seg(p_own, 80, tcp_flag::SYN),
        ),
    );
    let qinq_foreign = vlan(
        &[10, 20],
        0x0800,
        &ipv4(
            PROTO_TCP,
            CLIENT,
            VIP,
            0,
            &tcp_seg(p_foreign, 80, tcp_flag::SYN),
        ),
    );
    // Segments of connections (no SYN) that no local socket holds: the
    // owner of the bucket leaves them to the node holding the connection
    // (a previous owner), the others drop them as before.
    let seg = |port: u16, flags: u8| {
        frame(
            0x0800,
            &ipv4(PROTO_TCP, CLIENT, VIP, 0, &tcp_seg(port, 80, flags)),
        )
    };
    let mut tcp_cut_flags = frame(0x0800, &ipv4(PROTO_TCP, CLIENT, VIP, 0, &[]));
    tcp_cut_flags.extend_from_slice(&tcp_seg(p_own, 80, ACK)[..12]);
    let mut moved = vec![
        Case {
            name: "TCP ACK, owned bucket, no local socket: another node's flow, left alone",
            frame: seg(p_own, ACK),
            verdict: XDP_DROP,
            output: None,
            counter: DROP_NO_FLOW,
        },
        Case {
            name: "TCP ACK, foreign bucket, no local socket",
            frame: seg(p_foreign, ACK),
            verdict: XDP_DROP,
            output: None,
            counter: DROP_NOT_OWNER,
        },
        Case {
            name: "TCP RST, owned bucket, no local socket",
            frame: seg(p_own, RST),
            verdict: XDP_DROP,
            output: None,
            counter: DROP_NO_FLOW,
        },
        Case {
            name: "TCP FIN+ACK, foreign bucket, no local socket",
            frame: seg(p_foreign, FIN | ACK),
            verdict: XDP_DROP,
            output: None,
            counter: DROP_NOT_OWNER,
        },
        Case {
            name: "TCP SYN+ACK to the VIP, owned bucket, no local socket: not a new connection",
            frame: seg(p_own, tcp_flag::SYN | ACK),
            verdict: XDP_DROP,
            output: None,
            counter: DROP_NO_FLOW,
        },
        Case {
            name: "TCP to the VIP cut before the flags",
            frame: tcp_cut_flags,
            verdict: XDP_DROP,
            output: None,
            counter: DROP_MALFORMED,
        },
    ];
    let mut truncated_l4 = frame(0x0800, &ipv4(PROTO_TCP, CLIENT, VIP, 0, &[]));
    truncated_l4.extend_from_slice(&[0x12]);
    let mut bad_ihl = frame(
        0x0800,
        &ipv4(
            PROTO_TCP,
            CLIENT,
            VIP,
            0,
            &tcp_seg(p_own, 80, tcp_flag::SYN),
        ),
    );
    bad_ihl[14] = 0x43; // IHL 3 words < 20 bytes
    let runt = eth(VMAC, 0x0800)[..13].to_vec();
    let mut ip_cut = frame(0x0800, &ipv4(PROTO_TCP, CLIENT, VIP, 0, &[]));
    ip_cut.truncate(14 + 10); // before the addresses
    // An 802.1Q tag whose inner EtherType is cut off.
    let mut vlan_cut = eth(VMAC, 0x8100);
    vlan_cut.extend_from_slice(&[0, 10]);
    let mut arp_cut = frame(0x0806, &arp(1, CLIENT_MAC, CLIENT, [0; 6], VIP));
    arp_cut.truncate(14 + 20); // before the target address
    let mut table = vec![
        Case {
            name: "TCP SYN, owned bucket",
            output: Some(with_dst(tcp_own.clone(), IFMAC)),
            frame: tcp_own,
            verdict: XDP_PASS,
            counter: ACCEPT,
        },
        Case {
            name: "TCP SYN, foreign bucket",
            frame: tcp_foreign,
            verdict: XDP_DROP,
            output: None,
            counter: DROP_NOT_OWNER,
        },
        Case {
            name: "UDP, any-port rule hashing the client IP, owned bucket",
            output: Some(with_dst(udp_own.clone(), IFMAC)),
            frame: udp_own,
            verdict: XDP_PASS,
            counter: ACCEPT,
        },
        Case {
            name: "UDP, any-port rule hashing the client IP, foreign bucket",
            frame: udp_foreign,
            verdict: XDP_DROP,
            output: None,
            counter: DROP_NOT_OWNER,
        },
        Case {
            name: "ICMP to the VIP: no rule, untouched",
            frame: icmp,
            verdict: XDP_PASS,
            output: None,
            counter: PASS_NO_RULE,
        },
        Case {
            name: "TCP to a non-VIP address, untouched",
            frame: not_vip,
            verdict: XDP_PASS,
            output: None,
            counter: PASS_OTHER,
        },
        Case {
            name: "TCP to the VIP on a port without rule",
            frame: tcp_other_port,
            verdict: XDP_PASS,
            output: None,
            counter: PASS_NO_RULE,
        },
        Case {
            name: "non-first fragment under a port rule",
            frame: frag_tail,
            verdict: XDP_DROP,
            output: None,
            counter: DROP_FRAGMENT,
        },
        Case {
            name: "first fragment, owned",
            output: Some(with_dst(frag_head.clone(), IFMAC)),
            frame: frag_head,
            verdict: XDP_PASS,
            counter: ACCEPT,
        },
        Case {
            name: "ARP request for the VIP: answered with the virtual MAC",
            frame: arp_req,
            verdict: XDP_TX,
            output: Some(arp_reply_out),
            counter: ARP_REPLY,
        },
        Case {
            name: "ARP request for another address",
            frame: arp_req_other,
            verdict: XDP_PASS,
            output: None,
            counter: PASS_OTHER,
        },
        Case {
            name: "ARP reply (not a request), untouched",
            frame: arp_reply_in,
            verdict: XDP_PASS,
            output: None,
            counter: PASS_OTHER,
        },
        Case {
            name: "802.1Q-tagged TCP, owned",
            output: Some(with_dst(vlan_own.clone(), IFMAC)),
            frame: vlan_own,
            verdict: XDP_PASS,
            counter: ACCEPT,
        },
        Case {
            name: "QinQ-tagged TCP, foreign",
            frame: qinq_foreign,
            verdict: XDP_DROP,
            output: None,
            counter: DROP_NOT_OWNER,
        },
        Case {
            name: "TCP to the VIP cut inside the ports",
            frame: truncated_l4,
            verdict: XDP_DROP,
            output: None,
            counter: DROP_MALFORMED,
        },
        Case {
            name: "IPv4 header length below 20",
            frame: bad_ihl,
            verdict: XDP_DROP,
            output: None,
            counter: DROP_MALFORMED,
        },
        Case {
            name: "runt Ethernet frame",
            frame: runt,
            verdict: XDP_PASS,
            output: None,
            counter: PASS_UNPARSED,
        },
        Case {
            name: "IPv4 cut before the addresses",
            frame: ip_cut,
            verdict: XDP_PASS,
            output: None,
            counter: PASS_UNPARSED,
        },
        Case {
            name: "802.1Q tag cut before the inner EtherType",
            frame: vlan_cut,
            verdict: XDP_PASS,
            output: None,
            counter: PASS_UNPARSED,
        },
        Case {
            name: "ARP request cut before the target address",
            frame: arp_cut,
            verdict: XDP_PASS,
            output: None,
            counter: PASS_UNPARSED,
        },
    ];
    table.append(&mut moved);
    table
}

/// The UDP rule of the packet table: any port, hashing the client IP only.
fn add_udp_any_rule(f: &mut Filter) {
    let mut rules: HashMap<_, RuleKey, RuleValue> =
        HashMap::try_from(f.bpf.map_mut("RULES").unwrap()).unwrap();
    rules
        .insert(
            &RuleKey {
                vip: VIP,
                port_be: 0,
                proto: PROTO_UDP,
                pad: 0,
            },
            &RuleValue {
                filter: FILTER_CLIENT_IP,
            },
            0,
        )
        .unwrap();
}

/// The maps as hand-written tools fill them: the VIP in `VIPS`, its rules
/// in `RULES`.
#[test]
fn packet_table() {
    let mut f = Filter::new();
    f.own_even_buckets();
    add_udp_any_rule(&mut f);
    run_table(&f, cases());
}

/// The maps as the daemon fills them: the VIP also in the VIP index, its
/// rules inline in `SLOT_RULES`. `RULES` is emptied, so every rule matched
/// here comes from the fast path; a non-VIP address at the VIP's index
/// position is still untouched.
#[test]
fn packet_table_through_the_vip_index() {
    let mut f = Filter::new();
    f.own_even_buckets();
    {
        let mut sr: Array<_, SlotRules> =
            Array::try_from(f.bpf.map_mut("SLOT_RULES").unwrap()).unwrap();
        let mut r = SlotRules {
            count: 2,
            ..SlotRules::default()
        };
        r.rules[0] = InlineRule {
            port_be: 80u16.to_be(),
            proto: PROTO_TCP,
            pad: 0,
            filter: FILTER_CLIENT_IP_PORT,
        };
        r.rules[1] = InlineRule {
            port_be: 0,
            proto: PROTO_UDP,
            pad: 0,
            filter: FILTER_CLIENT_IP,
        };
        sr.set(0, &r, 0).unwrap();
        let mut ix: Array<_, VipIndex> =
            Array::try_from(f.bpf.map_mut("VIP_INDEX").unwrap()).unwrap();
        let entry = VipIndex {
            addr: VIP,
            slot_plus_one: 1,
        };
        ix.set(vip_index(VIP), &entry, 0).unwrap();
        let mut rules: HashMap<_, RuleKey, RuleValue> =
            HashMap::try_from(f.bpf.map_mut("RULES").unwrap()).unwrap();
        let keys: Vec<RuleKey> = rules.keys().map(Result::unwrap).collect();
        for k in keys {
            rules.remove(&k).unwrap();
        }
    }
    let mut table = cases();
    let same_position = [10, 9, 7, VIP[3]];
    table.push(Case {
        name: "TCP to a non-VIP address at the VIP's index position, untouched",
        frame: tcp_to(same_position, CLIENT, 40000, 80),
        verdict: XDP_PASS,
        output: None,
        counter: counter::PASS_OTHER,
    });
    run_table(&f, table);
}

fn run_table(f: &Filter, table: Vec<Case>) {
    let mut failures = Vec::new();
    let mut skipped = Vec::new();
    for case in table {
        let before: Vec<u64> = (0..counter::COUNT).map(|i| f.counter(i)).collect();
        let (verdict, out) = match f.run(&case.frame) {
            Ok(r) => r,
            Err(e) => {
                // BPF_PROG_TEST_RUN refuses XDP input shorter than an
                // Ethernet header (EINVAL): such a frame cannot be fed to
                // the program this way (a NIC would not deliver it either).
                if case.frame.len() < 14 {
                    let why = std::error::Error::source(&e)
                        .map_or_else(|| e.to_string(), |s| format!("{e}: {s}"));
                    println!(
                        "SKIPPED {:?}: the kernel refuses a {}-byte test frame ({why}); not checked",
                        case.name,
                        case.frame.len()
                    );
                    skipped.push(case.name);
                    continue;
                }
                panic!("{}: test run failed: {e}", case.name);
            }
        };
        let after: Vec<u64> = (0..counter::COUNT).map(|i| f.counter(i)).collect();
        let expected_out = case.output.clone().unwrap_or_else(|| case.frame.clone());
        if verdict != case.verdict {
            failures.push(format!(
                "{}: verdict {verdict}, expected {}",
                case.name, case.verdict
            ));
        }
        if case.verdict != XDP_DROP && out != expected_out {
            failures.push(format!(
                "{}: output frame differs\n got {out:02x?}\nwant {expected_out:02x?}",
                case.name
            ));
        }
        for i in 0..counter::COUNT {
            let moved = after[i as usize] - before[i as usize];
            let want = u64::from(i == case.counter);
            if moved != want {
                failures.push(format!(
                    "{}: counter {i} moved by {moved}, expected {want}",
                    case.name
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(
        skipped.iter().all(|n| *n == "runt Ethernet frame"),
        "skipped: {skipped:?}"
    );
}

#[test]
#[expect(
    clippy::maybe_infinite_iter,
    reason = "a port in each bucket class exists within 1024.."
)]
fn farm_filter_accepts_owned_buckets_drops_the_rest_and_ignores_other_traffic() {
    let mut f = Filter::new();
    f.own_even_buckets();

    // Find one client port in an owned bucket and one in a foreign bucket,
    // as user space computes them.
    let client = [10, 9, 0, 250];
    let owned_port = (1024u16..)
        .find(|p| bucket_client_ip_port(client, p.to_be_bytes(), 0).is_multiple_of(2))
        .unwrap();
    let foreign_port = (1024u16..)
        .find(|p| bucket_client_ip_port(client, p.to_be_bytes(), 0) % 2 == 1)
        .unwrap();

    // Owned: passed, destination MAC rewritten to the interface's own.
    let frame = tcp_to(VIP, client, owned_port, 80);
    let (verdict, out) = f.run(&frame).unwrap();
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(&out[0..6], &IFMAC);
    assert_eq!(&out[6..], &frame[6..], "only the destination MAC changes");

    // Foreign bucket: dropped.
    let (verdict, _) = f.run(&tcp_to(VIP, client, foreign_port, 80)).unwrap();
    assert_eq!(verdict, XDP_DROP);

    // Not a VIP: untouched.
    let other = tcp_to([10, 9, 0, 1], client, foreign_port, 80);
    let (verdict, out) = f.run(&other).unwrap();
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(out, other);

    assert_eq!(f.counter(counter::ACCEPT), 1);
    assert_eq!(f.counter(counter::DROP_NOT_OWNER), 1);
    assert_eq!(f.counter(counter::PASS_OTHER), 1);
}

#[test]
fn the_filters_log_records_reach_user_space() {
    let mut f = Filter::new();
    f.own_even_buckets();
    // The reader the daemon starts with every XDP filter (EbpfLog).
    let log = ebpf::EbpfLog::start(&mut f.bpf, "test").expect("the eBPF log reader starts");
    let p_own = (1024u16..2048).find(|p| owned(*p)).unwrap();
    let mut bad_ihl = frame(
        0x0800,
        &ipv4(
            PROTO_TCP,
            CLIENT,
            VIP,
            0,
            &tcp_seg(p_own, 80, tcp_flag::SYN),
        ),
    );
    bad_ihl[14] = 0x43;
    let (verdict, _) = f.run(&bad_ihl).unwrap();
    assert_eq!(verdict, XDP_DROP);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while log.records() == 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!(log.records(), 1, "one record for one malformed frame");
    let last = log.last().unwrap_or_default();
    assert!(last.contains("malformed IPv4 header"), "{last:?}");
}

/// Network namespace of the socket test (`skfl6`: issue 13's prefix),
/// removed on drop.
struct TestNetns(&'static str);

impl TestNetns {
    fn new(name: &'static str) -> Self {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", name])
            .output();
        let ip = |args: &[&str]| {
            let out = std::process::Command::new("ip")
                .args(args)
                .output()
                .unwrap();
            assert!(out.status.success(), "ip {args:?}: {out:?}");
        };
        ip(&["netns", "add", name]);
        ip(&["-n", name, "link", "set", "lo", "up"]);
        ip(&["-n", name, "addr", "add", "10.9.0.100/32", "dev", "lo"]);
        ip(&["-n", name, "addr", "add", "10.9.0.250/32", "dev", "lo"]);
        ip(&[
            "-n",
            name,
            "addr",
            "add",
            "fd09::64/128",
            "dev",
            "lo",
            "nodad",
        ]);
        ip(&[
            "-n",
            name,
            "addr",
            "add",
            "fd09::fa/128",
            "dev",
            "lo",
            "nodad",
        ]);
        Self(name)
    }

    /// Runs `f` on a thread inside the namespace.
    fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        use std::os::fd::AsRawFd as _;
        let path = format!("/var/run/netns/{}", self.0);
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path).unwrap();
            // SAFETY: setns of this thread only, with a valid namespace fd.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}");
            f()
        })
        .join()
        .unwrap()
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", self.0])
            .output();
    }
}

/// A connection from CLIENT:`port` to VIP:80 on loopback: (client, server).
fn connect_from(
    listener: &std::net::TcpListener,
    port: u16,
) -> (std::net::TcpStream, std::net::TcpStream) {
    connect_between(
        listener,
        std::net::SocketAddr::from((CLIENT, port)),
        std::net::SocketAddr::from((VIP, 80)),
    )
}

fn connect_between(
    listener: &std::net::TcpListener,
    from: std::net::SocketAddr,
    to: std::net::SocketAddr,
) -> (std::net::TcpStream, std::net::TcpStream) {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::for_address(from), Type::STREAM, None).unwrap();
    s.set_reuse_address(true).unwrap();
    s.bind(&from.into()).unwrap();
    s.connect(&to.into()).unwrap();
    let (server, _) = listener.accept().unwrap();
    (s.into(), server)
}

/// Flow keeping with real sockets (issue 13): the program asks the kernel
/// whether a local socket holds the connection. Bucket ownership decides
/// SYNs only; any other segment of a connection this node holds is
/// accepted in a bucket it no longer owns (it was its previous owner), and
/// the segments of a connection it does not hold are left alone even in a
/// bucket it owns now. A listener holds no connection; a `TIME_WAIT`
/// socket holds only the FIN or RST its peer may still send.
#[test]
#[expect(
    clippy::maybe_infinite_iter,
    reason = "a port in each bucket class exists within 1024.."
)]
#[expect(clippy::too_many_lines, reason = "the socket table")]
fn established_flows_stay_with_the_node_that_holds_them() {
    use std::io::Read as _;
    use tcp_flag::{ACK, FIN, RST, SYN};
    let ns = TestNetns::new("skfl6");
    let failures = ns.run(|| {
        let mut f = Filter::new();
        f.own_even_buckets();
        let listener = std::net::TcpListener::bind(std::net::SocketAddr::from((VIP, 80))).unwrap();
        let foreign = |from: u16| (from..).find(|p| !owned(*p)).unwrap();
        let own = |from: u16| (from..).find(|p| owned(*p)).unwrap();
        // An established connection in a bucket this node does not own
        // (moved away) and one in a bucket it owns.
        let p_moved = foreign(20000);
        let _c1 = connect_from(&listener, p_moved);
        let p_kept = own(20000);
        let _c2 = connect_from(&listener, p_kept);
        // A connection the server closed first: its socket is in TIME_WAIT.
        let p_tw = foreign(p_moved + 1);
        {
            let (mut client, server) = connect_from(&listener, p_tw);
            drop(server);
            let mut buf = [0u8; 1];
            assert_eq!(client.read(&mut buf).unwrap(), 0);
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
        // The same over IPv6: a connection in a bucket moved away.
        let listener6 =
            std::net::TcpListener::bind(std::net::SocketAddr::from((VIP6, 80))).unwrap();
        let p6 = (20000u16..).find(|p| !owned6(*p)).unwrap();
        let _c6 = connect_between(
            &listener6,
            std::net::SocketAddr::from((CLIENT6, p6)),
            std::net::SocketAddr::from((VIP6, 80)),
        );
        let p6_none = (30000u16..).find(|p| owned6(*p)).unwrap();
        let seg6 = |port: u16, flags: u8| {
            frame(
                0x86dd,
                &ipv6(PROTO_TCP, CLIENT6, VIP6, 64, &tcp_seg(port, 80, flags)),
            )
        };
        // No connection on these ports: only the listener matches.
        let p_none_own = own(30000);
        let p_none_foreign = foreign(30000);
        let seg = |port: u16, flags: u8| {
            frame(
                0x0800,
                &ipv4(PROTO_TCP, CLIENT, VIP, 0, &tcp_seg(port, 80, flags)),
            )
        };
        let accept = |frame: Vec<u8>| Some(with_dst(frame, IFMAC));
        let table = vec![
            Case {
                name: "IPv6: ACK of an established connection in a bucket moved away: kept",
                output: accept(seg6(p6, ACK)),
                frame: seg6(p6, ACK),
                verdict: XDP_PASS,
                counter: counter::ACCEPT_FLOW,
            },
            Case {
                name: "IPv6: ACK, owned bucket, only the listener",
                frame: seg6(p6_none, ACK),
                verdict: XDP_DROP,
                output: None,
                counter: counter::DROP_NO_FLOW,
            },
            Case {
                name: "ACK of an established connection in a bucket moved away: kept",
                output: accept(seg(p_moved, ACK)),
                frame: seg(p_moved, ACK),
                verdict: XDP_PASS,
                counter: counter::ACCEPT_FLOW,
            },
            Case {
                name: "FIN+ACK of an established connection in a bucket moved away: kept",
                output: accept(seg(p_moved, FIN | ACK)),
                frame: seg(p_moved, FIN | ACK),
                verdict: XDP_PASS,
                counter: counter::ACCEPT_FLOW,
            },
            Case {
                name: "RST of an established connection in a bucket moved away: kept",
                output: accept(seg(p_moved, RST | ACK)),
                frame: seg(p_moved, RST | ACK),
                verdict: XDP_PASS,
                counter: counter::ACCEPT_FLOW,
            },
            Case {
                name: "SYN on the ports of a held connection, bucket moved away: new owner's",
                frame: seg(p_moved, SYN),
                verdict: XDP_DROP,
                output: None,
                counter: counter::DROP_NOT_OWNER,
            },
            Case {
                name: "ACK of an established connection in an owned bucket",
                output: accept(seg(p_kept, ACK)),
                frame: seg(p_kept, ACK),
                verdict: XDP_PASS,
                counter: counter::ACCEPT_FLOW,
            },
            Case {
                name: "ACK, owned bucket, only the listener: another node's flow",
                frame: seg(p_none_own, ACK),
                verdict: XDP_DROP,
                output: None,
                counter: counter::DROP_NO_FLOW,
            },
            Case {
                name: "SYN, owned bucket, only the listener: new connection",
                output: accept(seg(p_none_own, SYN)),
                frame: seg(p_none_own, SYN),
                verdict: XDP_PASS,
                counter: counter::ACCEPT,
            },
            Case {
                name: "ACK, foreign bucket, only the listener",
                frame: seg(p_none_foreign, ACK),
                verdict: XDP_DROP,
                output: None,
                counter: counter::DROP_NOT_OWNER,
            },
            Case {
                name: "FIN to a TIME_WAIT socket, bucket moved away: kept",
                output: accept(seg(p_tw, FIN | ACK)),
                frame: seg(p_tw, FIN | ACK),
                verdict: XDP_PASS,
                counter: counter::ACCEPT_FLOW,
            },
            Case {
                name: "ACK to a TIME_WAIT socket, bucket moved away: not held",
                frame: seg(p_tw, ACK),
                verdict: XDP_DROP,
                output: None,
                counter: counter::DROP_NOT_OWNER,
            },
        ];
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_table(&f, table)))
            .err()
            .map(|e| {
                e.downcast_ref::<String>()
                    .cloned()
                    .unwrap_or_else(|| "panic".into())
            })
    });
    assert!(failures.is_none(), "{}", failures.unwrap_or_default());
}

// ------------------------------------------------------------------ IPv6

/// An IPv6 packet: header (hop limit 64, or 255 for ND) and payload.
fn ipv6(next: u8, saddr: [u8; 16], daddr: [u8; 16], hop: u8, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0x60, 0, 0, 0];
    p.extend_from_slice(&u16::try_from(payload.len()).unwrap().to_be_bytes());
    p.push(next);
    p.push(hop);
    p.extend_from_slice(&saddr);
    p.extend_from_slice(&daddr);
    p.extend_from_slice(payload);
    p
}

/// An extension header (hop-by-hop, routing, destination options) of 8
/// bytes followed by `rest`.
fn ext(next: u8, rest: &[u8]) -> Vec<u8> {
    let mut e = vec![next, 0, 1, 4, 0, 0, 0, 0];
    e.extend_from_slice(rest);
    e
}

/// A fragment header at `offset` (8-byte units), more fragments set.
fn frag6(next: u8, offset: u16, rest: &[u8]) -> Vec<u8> {
    let mut e = vec![next, 0];
    e.extend_from_slice(&((offset << 3) | 1).to_be_bytes());
    e.extend_from_slice(&[0, 0, 0, 9]);
    e.extend_from_slice(rest);
    e
}

fn csum(parts: &[&[u8]]) -> u16 {
    let mut sum = 0u32;
    for p in parts {
        for c in p.chunks(2) {
            sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !u16::try_from(sum).unwrap()
}

/// A Neighbour Solicitation for `target` from `src` (with its link-layer
/// address option unless `src` is unspecified).
fn ns(src: [u8; 16], target: [u8; 16]) -> Vec<u8> {
    let mut icmp = vec![135, 0, 0, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(&target);
    if src != [0; 16] {
        icmp.extend_from_slice(&[1, 1]);
        icmp.extend_from_slice(&CLIENT_MAC);
    }
    let mut dst = [0u8; 16];
    dst[..2].copy_from_slice(&[0xff, 0x02]);
    dst[11] = 1;
    dst[12] = 0xff;
    dst[13..].copy_from_slice(&target[13..]);
    let len = u32::try_from(icmp.len()).unwrap().to_be_bytes();
    let c = csum(&[&src, &dst, &len, &[0, 0, 0, 58], &icmp]);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let mut f = eth(
        [0x33, 0x33, 0xff, target[13], target[14], target[15]],
        0x86dd,
    );
    f.extend_from_slice(&ipv6(58, src, dst, 255, &icmp));
    f
}

/// The advertisement the filter must send for `ns(src, VIP6)`.
fn na(src: [u8; 16]) -> Vec<u8> {
    let dad = src == [0; 16];
    let mut all = [0u8; 16];
    all[..2].copy_from_slice(&[0xff, 0x02]);
    all[15] = 1;
    let (dst, dst_mac, flags) = if dad {
        (all, [0x33, 0x33, 0, 0, 0, 1], 0x20)
    } else {
        (src, CLIENT_MAC, 0x60)
    };
    let mut icmp = vec![136, 0, 0, 0, flags, 0, 0, 0];
    icmp.extend_from_slice(&VIP6);
    icmp.extend_from_slice(&[2, 1]);
    icmp.extend_from_slice(&VMAC6);
    let c = csum(&[&VIP6, &dst, &[0, 0, 0, 32], &[0, 0, 0, 58], &icmp]);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let mut f = Vec::new();
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&IFMAC);
    f.extend_from_slice(&0x86ddu16.to_be_bytes());
    f.extend_from_slice(&ipv6(58, VIP6, dst, 255, &icmp));
    f
}

fn owned6(port: u16) -> bool {
    bucket_client_ip6_port(CLIENT6, port.to_be_bytes(), 0).is_multiple_of(2)
}

#[expect(clippy::too_many_lines, reason = "the packet table")]
#[expect(
    clippy::maybe_infinite_iter,
    reason = "a port in each bucket class exists within 1024.."
)]
fn cases6() -> Vec<Case> {
    use counter::*;
    use tcp_flag::{ACK, SYN};
    let p_own = (1024u16..).find(|p| owned6(*p)).unwrap();
    let p_foreign = (1024u16..).find(|p| !owned6(*p)).unwrap();
    let v6 = |payload: Vec<u8>, next: u8| frame(0x86dd, &ipv6(next, CLIENT6, VIP6, 64, &payload));
    let tcp = |port: u16, flags: u8| tcp_seg(port, 80, flags);
    let udp_client = |owned: bool| {
        (1u8..=254)
            .map(|i| {
                let mut c = CLIENT6;
                c[15] = i;
                c
            })
            .find(|c| bucket_client_ip6(*c, 0).is_multiple_of(2) == owned)
            .unwrap()
    };
    let udp = |client: [u8; 16]| {
        frame(
            0x86dd,
            &ipv6(PROTO_UDP, client, VIP6, 64, &l4_ports(5353, 9999, 8)),
        )
    };
    let pass = |f: &Vec<u8>| Some(with_dst(f.clone(), IFMAC));
    let tcp_own = v6(tcp(p_own, SYN), PROTO_TCP);
    let tcp_foreign = v6(tcp(p_foreign, SYN), PROTO_TCP);
    let ack_own = v6(tcp(p_own, ACK), PROTO_TCP);
    let hbh = v6(ext(PROTO_TCP, &tcp(p_own, SYN)), 0);
    let chain = v6(ext(43, &ext(PROTO_TCP, &tcp(p_own, SYN))), 60);
    let first_frag = v6(frag6(PROTO_TCP, 0, &tcp(p_own, SYN)), 44);
    let tail_frag = v6(frag6(PROTO_TCP, 185, &[0; 24]), 44);
    let too_many = v6(
        ext(
            0,
            &ext(0, &ext(0, &ext(0, &ext(PROTO_TCP, &tcp(p_own, SYN))))),
        ),
        0,
    );
    let mut cut_ext = v6(ext(PROTO_TCP, &[]), 0);
    cut_ext.truncate(14 + 40 + 1);
    let mut cut_ports = v6(Vec::new(), PROTO_TCP);
    cut_ports.push(0x12);
    let mut cut_dst = v6(Vec::new(), PROTO_TCP);
    cut_dst.truncate(14 + 30);
    let echo = v6(vec![128, 0, 0, 0, 0, 1, 0, 1], 58);
    let mut other_target = VIP6;
    other_target[15] = 0x65;
    let u_own = udp(udp_client(true));
    let u_foreign = udp(udp_client(false));
    vec![
        Case {
            name: "IPv6 TCP SYN, owned bucket",
            output: pass(&tcp_own),
            frame: tcp_own,
            verdict: XDP_PASS,
            counter: ACCEPT,
        },
        Case {
            name: "IPv6 TCP SYN, foreign bucket",
            frame: tcp_foreign,
            verdict: XDP_DROP,
            output: None,
            counter: DROP_NOT_OWNER,
        },
        Case {
            name: "IPv6 TCP ACK, owned bucket, no local socket",
            frame: ack_own,
            verdict: XDP_DROP,
            output: None,
            counter: DROP_NO_FLOW,
        },
        Case {
            name: "IPv6 UDP, any-port rule hashing the client address, owned",
            output: pass(&u_own),
            frame: u_own,
            verdict: XDP_PASS,
            counter: ACCEPT,
        },
        Case {
            name: "IPv6 UDP, any-port rule hashing the client address, foreign",
            frame: u_foreign,
            verdict: XDP_DROP,
            output: None,
            counter: DROP_NOT_OWNER,
        },
        Case {
            name: "ICMPv6 echo request to the VIP: no rule, untouched",
            frame: echo,
            verdict: XDP_PASS,
            output: None,
            counter: PASS_NO_RULE,
        },
        Case {
            name: "Neighbour Solicitation for the VIP: advertisement of the virtual MAC",
            frame: ns(CLIENT6, VIP6),
            verdict: XDP_TX,
            output: Some(na(CLIENT6)),
            counter: NS_REPLY,
        },
        Case {
            name: "Neighbour Solicitation for the VIP from :: (DAD): advertisement to all nodes",
            frame: ns([0; 16], VIP6),
            verdict: XDP_TX,
            output: Some(na([0; 16])),
            counter: NS_REPLY,
        },
        Case {
            name: "Neighbour Solicitation for another address, untouched",
            frame: ns(CLIENT6, other_target),
            verdict: XDP_PASS,
            output: None,
            counter: PASS_OTHER,
        },
        Case {
            name: "IPv6 hop-by-hop header, then TCP SYN, owned",
            output: pass(&hbh),
            frame: hbh,
            verdict: XDP_PASS,
            counter: ACCEPT,
        },
        Case {
            name: "IPv6 destination options and routing headers, then TCP SYN, owned",
            output: pass(&chain),
            frame: chain,
            verdict: XDP_PASS,
            counter: ACCEPT,
        },
        Case {
            name: "IPv6 first fragment (offset 0), TCP SYN, owned",
            output: pass(&first_frag),
            frame: first_frag,
            verdict: XDP_PASS,
            counter: ACCEPT,
        },
        Case {
            name: "IPv6 non-first fragment under a port rule",
            frame: tail_frag,
            verdict: XDP_DROP,
            output: None,
            counter: DROP_FRAGMENT,
        },
        Case {
            name: "IPv6 with five extension headers (more than the filter walks)",
            frame: too_many,
            verdict: XDP_DROP,
            output: None,
            counter: DROP_MALFORMED,
        },
        Case {
            name: "IPv6 cut inside an extension header",
            frame: cut_ext,
            verdict: XDP_DROP,
            output: None,
            counter: DROP_MALFORMED,
        },
        Case {
            name: "IPv6 TCP cut inside the ports",
            frame: cut_ports,
            verdict: XDP_DROP,
            output: None,
            counter: DROP_MALFORMED,
        },
        Case {
            name: "IPv6 cut before the destination address",
            frame: cut_dst,
            verdict: XDP_PASS,
            output: None,
            counter: PASS_UNPARSED,
        },
    ]
}

/// IPv6 (issue 13): the same buckets and rules as IPv4 for TCP and UDP,
/// Neighbour Discovery for the VIP answered with the virtual MAC,
/// extension headers walked, fragments and truncated packets handled.
#[test]
fn packet_table_ipv6() {
    let mut f = Filter::new();
    f.own_even_buckets();
    run_table(&f, cases6());
}

/// Issue 12 item 4: the daemon's lease. Past its deadline
/// (`bpf_ktime_get_ns`), an owned bucket takes nothing new (counted
/// `drop_lease`); foreign buckets are unchanged; a current lease changes
/// nothing.
#[test]
fn a_lapsed_lease_stops_new_traffic_in_owned_buckets() {
    use counter::{ACCEPT, DROP_LEASE, DROP_NOT_OWNER};
    let mut f = Filter::new();
    f.own_even_buckets();
    add_udp_any_rule(&mut f);
    let p_own = (1024u16..2048).find(|p| owned(*p)).unwrap();
    let p_foreign = (1024u16..2048).find(|p| !owned(*p)).unwrap();
    let syn = |port: u16| {
        frame(
            0x0800,
            &ipv4(PROTO_TCP, CLIENT, VIP, 0, &tcp_seg(port, 80, tcp_flag::SYN)),
        )
    };
    let udp_own = (1u8..=254)
        .map(|i| [10, 9, 1, i])
        .find(|c| bucket_client_ip(*c, 0).is_multiple_of(2))
        .unwrap();
    let udp = frame(
        0x0800,
        &ipv4(PROTO_UDP, udp_own, VIP, 0, &l4_ports(5353, 9999, 8)),
    );
    let set_lease = |f: &mut Filter, v: u64| {
        let mut lease: Array<_, u64> = Array::try_from(f.bpf.map_mut("LEASE").unwrap()).unwrap();
        lease.set(0, &v, 0).unwrap();
    };
    // Lapsed (a deadline in the past).
    set_lease(&mut f, 1);
    run_table(
        &f,
        vec![
            Case {
                name: "lease lapsed: SYN in an owned bucket",
                frame: syn(p_own),
                verdict: XDP_DROP,
                output: None,
                counter: DROP_LEASE,
            },
            Case {
                name: "lease lapsed: UDP in an owned bucket",
                frame: udp.clone(),
                verdict: XDP_DROP,
                output: None,
                counter: DROP_LEASE,
            },
            Case {
                name: "lease lapsed: SYN in a foreign bucket",
                frame: syn(p_foreign),
                verdict: XDP_DROP,
                output: None,
                counter: DROP_NOT_OWNER,
            },
        ],
    );
    // Current (far in the future).
    set_lease(&mut f, u64::MAX);
    run_table(
        &f,
        vec![Case {
            name: "lease current: SYN in an owned bucket",
            output: Some(with_dst(syn(p_own), IFMAC)),
            frame: syn(p_own),
            verdict: XDP_PASS,
            counter: ACCEPT,
        }],
    );
}
