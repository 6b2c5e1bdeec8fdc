//! safekit kernel side: the farm filter (XDP).
//!
//! For each frame on the LAN interface:
//! - ARP request for a VIP → answered in place with the VIP's virtual MAC
//!   (`XDP_TX`);
//! - IPv4 to a VIP matching a rule (proto, port) → `bucket = hash(client IP
//!   [, client port]) mod 256` (hash from `safekit-common`); a bucket this
//!   node owns is accepted (destination MAC rewritten to the interface's own,
//!   `XDP_PASS`), any other is dropped;
//! - everything else is untouched (`XDP_PASS`).
//!
//! Every verdict has its own per-CPU counter. The daemon fills the maps.
//!
//! A VIP the daemon published in `VIP_INDEX` costs array lookups only (VIP,
//! slot rules, ownership); any other destination, or maps filled by hand,
//! goes through the `VIPS` and `RULES` hash maps with the same decisions.
#![no_std]
#![no_main]
#![expect(
    clippy::inline_always,
    reason = "helpers of the XDP program: kept inline so the verifier sees straight-line code"
)]

mod lease;

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        bpf_sock_tuple, bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1,
        bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2, xdp_action,
    },
    helpers::generated::{
        bpf_ktime_get_ns, bpf_sk_release, bpf_skc_lookup_tcp, bpf_xdp_adjust_tail,
    },
    macros::{map, xdp},
    maps::{Array, HashMap, PerCpuArray},
    programs::XdpContext,
};
use aya_log_ebpf::warn;
use safekit_common::{
    BUCKETS, FILTER_CLIENT_IP, FilterConfig, MAX_RULES, MAX_VIPS, OWNED_ENTRIES, PROTO_TCP,
    PROTO_UDP, Rule6Key, RuleKey, RuleValue, SlotRules, VIP_FLAG_IP_ONLY, VIP_INDEX_ENTRIES,
    Vip6Key, VipIndex, VipKey, VipValue, bucket_client_ip, bucket_client_ip_port,
    bucket_client_ip6, bucket_client_ip6_port, counter, tcp_needs_lookup, tcp_verdict, vip_index,
};

/// VIPs of the farm modules on this node.
#[map]
static VIPS: HashMap<VipKey, VipValue> = HashMap::with_max_entries(MAX_VIPS, 0);
/// Balanced (VIP, proto, port) rules.
#[map]
static RULES: HashMap<RuleKey, RuleValue> = HashMap::with_max_entries(MAX_RULES, 0);
/// Fast path to the daemon's VIPs, indexed by `vip_index(addr)`: array
/// lookups only (see `safekit_common::VipIndex`).
#[map]
static VIP_INDEX: Array<VipIndex> = Array::with_max_entries(VIP_INDEX_ENTRIES, 0);
/// Rules and flags of the VIP in each slot, for the fast path.
#[map]
static SLOT_RULES: Array<SlotRules> = Array::with_max_entries(MAX_VIPS, 0);
/// Bucket ownership, one row of 256 per VIP slot: 1 when this node accepts
/// the bucket.
#[map]
static OWNED: Array<u32> = Array::with_max_entries(OWNED_ENTRIES, 0);
/// The daemon's lease on each VIP slot: a `bpf_ktime_get_ns` deadline the
/// engine pushes forward with every heartbeat it sends (by the peers' loss
/// timeout). Past it, the slot's buckets accept nothing new: a stalled
/// daemon's node stops taking connections by the time its peers take its
/// buckets over. 0: no lease (maps filled by hand).
#[map]
static LEASE: Array<u64> = Array::with_max_entries(MAX_VIPS, 0);
/// Interface settings (one entry).
#[map]
static CONFIG: Array<FilterConfig> = Array::with_max_entries(1, 0);
/// IPv6 VIPs of the farm modules on this node.
#[map]
static VIPS6: HashMap<Vip6Key, VipValue> = HashMap::with_max_entries(MAX_VIPS, 0);
/// Balanced (IPv6 VIP, proto, port) rules.
#[map]
static RULES6: HashMap<Rule6Key, RuleValue> = HashMap::with_max_entries(MAX_RULES, 0);
/// Per-CPU verdict counters, indexed by `safekit_common::counter`.
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPV6_HLEN: usize = 40;
const PROTO_ICMPV6: u8 = 58;
/// Extension headers walked before giving up (counted malformed).
const MAX_EXT_HEADERS: usize = 4;
/// Length of the neighbour advertisement the filter sends: `ICMPv6` header,
/// flags, target, target link-layer address option.
const NA_LEN: usize = 32;
/// [`NA_LEN`] as the IPv6 payload length byte.
const NA_LEN_BYTE: u8 = 32;
/// `BPF_F_CURRENT_NETNS` (-1) as the socket lookup helpers take it: the
/// network namespace of the interface.
const CURRENT_NETNS: u64 = u64::MAX;
const ETH_P_ARP: u16 = 0x0806;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const ARP_LEN: usize = 28;

#[xdp]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the signature #[xdp] requires"
)]
fn safekit_farm(ctx: XdpContext) -> u32 {
    // A frame we cannot parse is not ours to judge: let the stack decide.
    try_safekit_farm(&ctx).unwrap_or_else(|()| {
        count(counter::PASS_UNPARSED);
        xdp_action::XDP_PASS
    })
}

#[inline(always)]
fn count(index: u32) {
    if let Some(c) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *c += 1 };
    }
}

/// Bounds-checked pointer to `len` bytes at `off` in the frame.
#[inline(always)]
fn ptr_at(ctx: &XdpContext, off: usize, len: usize) -> Result<*mut u8, ()> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + len > end {
        return Err(());
    }
    Ok((start + off) as *mut u8)
}

#[inline(always)]
fn load_be16(ctx: &XdpContext, off: usize) -> Result<u16, ()> {
    let p = ptr_at(ctx, off, 2)?;
    // SAFETY: ptr_at checked that two bytes are inside the frame.
    let v = unsafe { [*p, *p.add(1)] };
    Ok(u16::from_be_bytes(v))
}

#[inline(always)]
fn load4(ctx: &XdpContext, off: usize) -> Result<[u8; 4], ()> {
    let p = ptr_at(ctx, off, 4)?;
    // SAFETY: ptr_at checked that four bytes are inside the frame.
    Ok(unsafe { [*p, *p.add(1), *p.add(2), *p.add(3)] })
}

fn try_safekit_farm(ctx: &XdpContext) -> Result<u32, ()> {
    let Some(cfg) = CONFIG.get(0) else {
        return Ok(xdp_action::XDP_PASS);
    };
    if cfg.enabled == 0 {
        count(counter::PASS_OTHER);
        return Ok(xdp_action::XDP_PASS);
    }
    // Ethernet, with up to two VLAN tags.
    let mut off = ETH_HLEN;
    let mut proto = load_be16(ctx, 12)?;
    if proto == ETH_P_8021Q || proto == ETH_P_8021AD {
        proto = load_be16(ctx, off + 2)?;
        off += 4;
        if proto == ETH_P_8021Q || proto == ETH_P_8021AD {
            proto = load_be16(ctx, off + 2)?;
            off += 4;
        }
    }
    match proto {
        ETH_P_ARP => arp(ctx, off, cfg),
        ETH_P_IP => ipv4(ctx, off, cfg),
        ETH_P_IPV6 => {
            // Two BPF functions called from here, not one from the other:
            // each call chain stays within the verifier's stack limit.
            if let Some(v) = neighbour_solicitation(ctx, off, cfg) {
                return Ok(v);
            }
            ipv6(ctx, off, cfg)
        }
        _ => {
            count(counter::PASS_OTHER);
            Ok(xdp_action::XDP_PASS)
        }
    }
}

/// Answers an ARP request for a VIP with its virtual MAC, in place. The
/// Ethernet source is the interface's own MAC: the virtual MAC never appears
/// as a source, so bridges and switches never learn it and keep flooding VIP
/// traffic to every node.
#[inline(always)]
fn arp(ctx: &XdpContext, off: usize, cfg: &FilterConfig) -> Result<u32, ()> {
    let a = ptr_at(ctx, off, ARP_LEN)?;
    // SAFETY: the whole ARP body is inside the frame (checked above).
    let hdr = unsafe { core::slice::from_raw_parts_mut(a, ARP_LEN) };
    // Ethernet/IPv4 request only.
    if hdr[0..8] != [0, 1, 0x08, 0x00, 6, 4, 0, 1] {
        count(counter::PASS_OTHER);
        return Ok(xdp_action::XDP_PASS);
    }
    let tpa = [hdr[24], hdr[25], hdr[26], hdr[27]];
    // SAFETY: the value is only read, before any update could alias it.
    let Some(vip) = (unsafe { VIPS.get(&VipKey { addr: tpa }) }) else {
        count(counter::PASS_OTHER);
        return Ok(xdp_action::XDP_PASS);
    };
    let vmac = vip.vmac;
    let mut sha = [0u8; 6];
    sha.copy_from_slice(&hdr[8..14]);
    let mut spa = [0u8; 4];
    spa.copy_from_slice(&hdr[14..18]);
    // op = reply; sender = VIP at vmac; target = the requester.
    hdr[7] = 2;
    hdr[8..14].copy_from_slice(&vmac);
    hdr[14..18].copy_from_slice(&tpa);
    hdr[18..24].copy_from_slice(&sha);
    hdr[24..28].copy_from_slice(&spa);
    let e = ptr_at(ctx, 0, 12)?;
    // SAFETY: the Ethernet addresses are inside the frame (checked above).
    let eth = unsafe { core::slice::from_raw_parts_mut(e, 12) };
    eth[0..6].copy_from_slice(&sha);
    eth[6..12].copy_from_slice(&cfg.ifmac);
    count(counter::ARP_REPLY);
    Ok(xdp_action::XDP_TX)
}

/// The VIP a packet is addressed to.
struct Vip {
    slot: u32,
    flags: u32,
    /// Its rules, when it was found through the VIP index; else they are in
    /// `RULES`.
    inline: Option<&'static SlotRules>,
}

/// The VIP at `daddr`: through the VIP index (array lookups), else through
/// `VIPS` (hash lookup).
#[inline(always)]
fn find_vip(daddr: [u8; 4]) -> Option<Vip> {
    if let Some(&ix) = VIP_INDEX.get(vip_index(daddr))
        && ix.slot_plus_one != 0
        && ix.addr == daddr
    {
        let slot = ix.slot_plus_one - 1;
        if let Some(r) = SLOT_RULES.get(slot) {
            return Some(Vip {
                slot,
                flags: r.flags,
                inline: Some(r),
            });
        }
    }
    // SAFETY: read-only lookup of a value the daemon replaces whole.
    let v = unsafe { VIPS.get(&VipKey { addr: daddr }) }?;
    Some(Vip {
        slot: v.slot,
        flags: u32::from(v.flags),
        inline: None,
    })
}

/// The filter of the rule for (proto, port) of `vip`: the rule of this
/// port, else the any-port rule of the protocol.
#[inline(always)]
fn find_rule(vip: &Vip, mut key: RuleKey) -> Option<u32> {
    if let Some(r) = vip.inline {
        let mut any = None;
        for rule in r.rules.iter().take(r.count as usize) {
            if rule.proto == key.proto {
                if rule.port_be == key.port_be {
                    return Some(rule.filter);
                }
                if rule.port_be == 0 {
                    any = Some(rule.filter);
                }
            }
        }
        return any;
    }
    // SAFETY: read-only lookup.
    if let Some(r) = unsafe { RULES.get(&key) } {
        return Some(r.filter);
    }
    key.port_be = 0;
    // SAFETY: read-only lookup.
    unsafe { RULES.get(&key) }.map(|r| r.filter)
}

#[inline(always)]
fn ipv4(ctx: &XdpContext, off: usize, cfg: &FilterConfig) -> Result<u32, ()> {
    let daddr = load4(ctx, off + 16)?;
    let Some(vip) = find_vip(daddr) else {
        count(counter::PASS_OTHER);
        return Ok(xdp_action::XDP_PASS);
    };
    let v = ptr_at(ctx, off, 20)?;
    // SAFETY: 20 bytes of IPv4 header are inside the frame (checked above).
    let (vihl, l4proto) = unsafe { (*v, *v.add(9)) };
    let ihl = usize::from(vihl & 0x0f) * 4;
    if vihl >> 4 != 4 || ihl < 20 {
        count(counter::DROP_MALFORMED);
        warn!(ctx, "malformed IPv4 header to a VIP dropped");
        return Ok(xdp_action::XDP_DROP);
    }
    if l4proto != PROTO_TCP && l4proto != PROTO_UDP {
        count(counter::PASS_NO_RULE);
        return Ok(xdp_action::XDP_PASS);
    }
    let saddr = load4(ctx, off + 12)?;
    let frag = load_be16(ctx, off + 6)? & 0x1fff;
    let l4 = off + ihl;
    let bucket = if frag != 0 {
        // Non-first fragment: no ports. Placeable only when every rule of
        // this VIP hashes the client IP alone (then it matches the first).
        if vip.flags & u32::from(VIP_FLAG_IP_ONLY) == 0 {
            count(counter::DROP_FRAGMENT);
            return Ok(xdp_action::XDP_DROP);
        }
        bucket_client_ip(saddr, cfg.seed)
    } else {
        let Ok(ports) = load4(ctx, l4) else {
            count(counter::DROP_MALFORMED);
            return Ok(xdp_action::XDP_DROP);
        };
        let key = RuleKey {
            vip: daddr,
            port_be: u16::from_ne_bytes([ports[2], ports[3]]),
            proto: l4proto,
            pad: 0,
        };
        let Some(filter) = find_rule(&vip, key) else {
            count(counter::PASS_NO_RULE);
            return Ok(xdp_action::XDP_PASS);
        };
        if filter == FILTER_CLIENT_IP {
            bucket_client_ip(saddr, cfg.seed)
        } else {
            bucket_client_ip_port(saddr, [ports[0], ports[1]], cfg.seed)
        }
    };
    let slot = vip.slot;
    let (owned, lapsed) = owns(slot, bucket);
    if l4proto == PROTO_TCP && frag == 0 {
        return tcp(ctx, cfg, l4, (owned, lapsed), |ports| {
            tcp_socket_state(ctx, saddr, daddr, ports)
        });
    }
    by_ownership(ctx, cfg, owned, lapsed)
}

/// A TCP segment at `l4`: a SYN follows bucket ownership (`owned`, and
/// whether the lease lapsed), every other segment the local socket that
/// holds its connection (`lookup` of the ports).
#[inline(always)]
fn tcp(
    ctx: &XdpContext,
    cfg: &FilterConfig,
    l4: usize,
    (owned, lapsed): (bool, bool),
    lookup: impl FnOnce([u8; 4]) -> Option<u32>,
) -> Result<u32, ()> {
    let Ok(hdr) = ptr_at(ctx, l4, 14) else {
        count(counter::DROP_MALFORMED);
        return Ok(xdp_action::XDP_DROP);
    };
    // SAFETY: 14 bytes of TCP header are inside the frame (checked).
    let (ports, flags) = unsafe { ([*hdr, *hdr.add(1), *hdr.add(2), *hdr.add(3)], *hdr.add(13)) };
    let socket = if tcp_needs_lookup(flags) {
        lookup(ports)
    } else {
        None
    };
    let verdict = lease_verdict(tcp_verdict(flags, owned, socket), lapsed);
    count(verdict);
    if verdict != counter::ACCEPT && verdict != counter::ACCEPT_FLOW {
        return Ok(xdp_action::XDP_DROP);
    }
    accept(ctx, cfg)
}

/// UDP, and fragments without ports: by bucket ownership alone.
#[inline(always)]
fn by_ownership(
    ctx: &XdpContext,
    cfg: &FilterConfig,
    owned: bool,
    lapsed: bool,
) -> Result<u32, ()> {
    if !owned {
        count(lease_verdict(counter::DROP_NOT_OWNER, lapsed));
        return Ok(xdp_action::XDP_DROP);
    }
    count(counter::ACCEPT);
    accept(ctx, cfg)
}

/// Whether this node takes new traffic of `bucket` of VIP `slot`: it owns
/// the bucket and the daemon's lease on the slot is current. The second
/// value is true when it owns the bucket but the lease has lapsed.
#[inline(always)]
fn owns(slot: u32, bucket: u32) -> (bool, bool) {
    if slot >= MAX_VIPS || OWNED.get(slot * BUCKETS + bucket).copied().unwrap_or(0) == 0 {
        return (false, false);
    }
    let lease = LEASE.get(slot).copied().unwrap_or(0);
    // SAFETY: a helper without arguments.
    if lease != 0 && unsafe { bpf_ktime_get_ns() } > lease {
        return (false, true);
    }
    (true, false)
}

/// A drop caused by a lapsed lease is counted as such.
#[inline(always)]
fn lease_verdict(verdict: u32, lapsed: bool) -> u32 {
    if lapsed && (verdict == counter::DROP_NOT_OWNER || verdict == counter::DROP_NO_FLOW) {
        counter::DROP_LEASE
    } else {
        verdict
    }
}

/// Hands an accepted frame to the local stack: destination MAC set to the
/// interface's own.
#[inline(always)]
fn accept(ctx: &XdpContext, cfg: &FilterConfig) -> Result<u32, ()> {
    let e = ptr_at(ctx, 0, 6)?;
    // SAFETY: the destination MAC is inside the frame (checked above).
    unsafe { core::slice::from_raw_parts_mut(e, 6).copy_from_slice(&cfg.ifmac) };
    Ok(xdp_action::XDP_PASS)
}

/// State of the local TCP socket (of this network namespace) that would
/// receive the segment saddr:sport -> daddr:dport: an established socket,
/// a request socket (handshake in progress), a `TIME_WAIT` one, or the
/// listener when no connection matches; `None` when there is none.
#[inline(always)]
fn tcp_socket_state(
    ctx: &XdpContext,
    saddr: [u8; 4],
    daddr: [u8; 4],
    ports: [u8; 4],
) -> Option<u32> {
    let mut tuple = bpf_sock_tuple {
        __bindgen_anon_1: aya_ebpf::bindings::bpf_sock_tuple__bindgen_ty_1 {
            ipv4: bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1 {
                saddr: u32::from_ne_bytes(saddr),
                daddr: u32::from_ne_bytes(daddr),
                sport: u16::from_ne_bytes([ports[0], ports[1]]),
                dport: u16::from_ne_bytes([ports[2], ports[3]]),
            },
        },
    };
    #[expect(clippy::cast_possible_truncation, reason = "size of a 12-byte struct")]
    socket_state(
        ctx,
        &mut tuple,
        core::mem::size_of::<bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1>() as u32,
    )
}

/// State of the socket `bpf_skc_lookup_tcp` finds for the first `size`
/// bytes of `tuple`, released at once.
#[inline(always)]
fn socket_state(ctx: &XdpContext, tuple: &mut bpf_sock_tuple, size: u32) -> Option<u32> {
    // SAFETY: the helper reads `size` bytes of the tuple on this stack; the
    // socket it returns (if any) is released below before returning.
    let sk = unsafe { bpf_skc_lookup_tcp(ctx.as_ptr(), tuple, size, CURRENT_NETNS, 0) };
    if sk.is_null() {
        return None;
    }
    // SAFETY: non-null socket from the lookup: `state` is readable on a
    // socket common; released once, right after.
    let state = unsafe { (*sk).state };
    // SAFETY: the reference taken by the lookup above.
    unsafe { bpf_sk_release(sk.cast()) };
    Some(state)
}

#[inline(always)]
fn load16(ctx: &XdpContext, off: usize) -> Result<[u8; 16], ()> {
    let p = ptr_at(ctx, off, 16)?;
    let mut out = [0u8; 16];
    // SAFETY: ptr_at checked that sixteen bytes are inside the frame.
    unsafe { core::ptr::copy_nonoverlapping(p, out.as_mut_ptr(), 16) };
    Ok(out)
}

#[inline(always)]
fn byte_at(ctx: &XdpContext, off: usize) -> Result<u8, ()> {
    let p = ptr_at(ctx, off, 1)?;
    // SAFETY: ptr_at checked that the byte is inside the frame.
    Ok(unsafe { *p })
}

/// IPv6: a Neighbour Solicitation for a VIP is answered with its virtual
/// MAC; traffic to a VIP is placed as IPv4 traffic is (same buckets, same
/// hash over the client's address and port, same flow keeping); extension
/// headers are walked (hop-by-hop, routing, destination options,
/// authentication, fragment).
// A BPF function of its own: its stack is not added to the IPv4 path's
// (the verifier's limit is 512 bytes per call chain).
#[inline(never)]
fn ipv6(ctx: &XdpContext, off: usize, cfg: &FilterConfig) -> Result<u32, ()> {
    let daddr = load16(ctx, off + 24)?;
    let saddr = load16(ctx, off + 8)?;
    let first = byte_at(ctx, off + 6)?;
    // SAFETY: read-only lookup of a value the daemon replaces whole.
    let Some(vip) = (unsafe { VIPS6.get(&Vip6Key { addr: daddr }) }) else {
        count(counter::PASS_OTHER);
        return Ok(xdp_action::XDP_PASS);
    };
    let (slot, flags) = (vip.slot, u32::from(vip.flags));
    let mut next = first;
    let mut l4 = off + IPV6_HLEN;
    let mut fragment_tail = false;
    let mut done = false;
    for _ in 0..MAX_EXT_HEADERS {
        if !matches!(next, 0 | 43 | 60 | 51 | 44) {
            done = true;
            break;
        }
        // Next header and length: the first two bytes of every extension
        // header (read as a pair: a check the verifier follows at a
        // variable offset).
        let Ok(h) = load_be16(ctx, l4) else { break };
        let [n, hlen] = h.to_be_bytes();
        let len = match next {
            // Authentication header: 4-byte units, plus 2.
            51 => (usize::from(hlen) + 2) * 4,
            // Fragment: a non-first one carries no ports.
            44 => {
                let Ok(o) = load_be16(ctx, l4 + 2) else { break };
                if o & 0xfff8 != 0 {
                    fragment_tail = true;
                }
                8
            }
            // Hop-by-hop, routing, destination options: 8-byte units.
            _ => (usize::from(hlen) + 1) * 8,
        };
        next = n;
        l4 += len;
        if fragment_tail {
            done = true;
            break;
        }
    }
    if !done {
        // Cut inside an extension header, or too many of them.
        count(counter::DROP_MALFORMED);
        return Ok(xdp_action::XDP_DROP);
    }
    if next != PROTO_TCP && next != PROTO_UDP {
        count(counter::PASS_NO_RULE);
        return Ok(xdp_action::XDP_PASS);
    }
    let bucket = if fragment_tail {
        if flags & u32::from(VIP_FLAG_IP_ONLY) == 0 {
            count(counter::DROP_FRAGMENT);
            return Ok(xdp_action::XDP_DROP);
        }
        bucket_client_ip6(saddr, cfg.seed)
    } else {
        let Ok(ports) = load4(ctx, l4) else {
            count(counter::DROP_MALFORMED);
            return Ok(xdp_action::XDP_DROP);
        };
        let port_be = u16::from_ne_bytes([ports[2], ports[3]]);
        let mut key = Rule6Key {
            vip: daddr,
            port_be,
            proto: next,
            pad: 0,
        };
        // SAFETY: read-only lookups.
        let rule = unsafe { RULES6.get(&key) }.map(|r| r.filter).or_else(|| {
            key.port_be = 0;
            // SAFETY: read-only lookup.
            unsafe { RULES6.get(&key) }.map(|r| r.filter)
        });
        let Some(filter) = rule else {
            count(counter::PASS_NO_RULE);
            return Ok(xdp_action::XDP_PASS);
        };
        if filter == FILTER_CLIENT_IP {
            bucket_client_ip6(saddr, cfg.seed)
        } else {
            bucket_client_ip6_port(saddr, [ports[0], ports[1]], cfg.seed)
        }
    };
    let (owned, lapsed) = owns(slot, bucket);
    if next == PROTO_TCP && !fragment_tail {
        return tcp(ctx, cfg, l4, (owned, lapsed), |ports| {
            tcp6_socket_state(ctx, saddr, daddr, ports)
        });
    }
    by_ownership(ctx, cfg, owned, lapsed)
}

/// As [`tcp_socket_state`], for IPv6.
#[inline(always)]
fn tcp6_socket_state(
    ctx: &XdpContext,
    saddr: [u8; 16],
    daddr: [u8; 16],
    ports: [u8; 4],
) -> Option<u32> {
    let words = |a: [u8; 16]| {
        [
            u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
            u32::from_ne_bytes([a[4], a[5], a[6], a[7]]),
            u32::from_ne_bytes([a[8], a[9], a[10], a[11]]),
            u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
        ]
    };
    let mut tuple = bpf_sock_tuple {
        __bindgen_anon_1: aya_ebpf::bindings::bpf_sock_tuple__bindgen_ty_1 {
            ipv6: bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2 {
                saddr: words(saddr),
                daddr: words(daddr),
                sport: u16::from_ne_bytes([ports[0], ports[1]]),
                dport: u16::from_ne_bytes([ports[2], ports[3]]),
            },
        },
    };
    #[expect(clippy::cast_possible_truncation, reason = "size of a 36-byte struct")]
    socket_state(
        ctx,
        &mut tuple,
        core::mem::size_of::<bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2>() as u32,
    )
}

/// One's-complement sum of big-endian 16-bit words.
#[inline(always)]
fn csum_add(mut sum: u32, bytes: &[u8]) -> u32 {
    let mut i = 0;
    while i + 1 < bytes.len() {
        sum += u32::from(u16::from_be_bytes([bytes[i], bytes[i + 1]]));
        i += 2;
    }
    sum
}

/// Answers a Neighbour Solicitation for a VIP, in place, with a Neighbour
/// Advertisement of its virtual MAC (`XDP_TX`), as ARP is for IPv4: from
/// the interface's own MAC, solicited and override flags, target
/// link-layer address option. A solicitation from the unspecified address
/// (duplicate address detection) gets the advertisement on all-nodes.
/// `None`: not a solicitation for a VIP (the caller goes on).
// A BPF function of its own: its stack is not added to the IPv4 path's
// (the verifier's limit is 512 bytes per call chain).
#[inline(never)]
fn neighbour_solicitation(ctx: &XdpContext, off: usize, cfg: &FilterConfig) -> Option<u32> {
    if byte_at(ctx, off + 6).ok()? != PROTO_ICMPV6 {
        return None;
    }
    let icmp = off + IPV6_HLEN;
    let head = ptr_at(ctx, icmp, 24).ok()?;
    // SAFETY: 24 bytes of ICMPv6 are inside the frame (checked above).
    let (kind, code) = unsafe { (*head, *head.add(1)) };
    if kind != 135 || code != 0 || byte_at(ctx, off + 7).ok()? != 255 {
        return None;
    }
    let target = load16(ctx, icmp + 8).ok()?;
    // SAFETY: read-only lookup.
    let vmac = unsafe { VIPS6.get(&Vip6Key { addr: target }) }?.vmac;
    let src = load16(ctx, off + 8).ok()?;
    let e = ptr_at(ctx, 6, 6).ok()?;
    let mut requester = [0u8; 6];
    // SAFETY: the Ethernet source is inside the frame (checked above).
    unsafe { core::ptr::copy_nonoverlapping(e, requester.as_mut_ptr(), 6) };
    let dad = src == [0u8; 16];
    let (dst, dst_mac, na_flags) = if dad {
        let mut all = [0u8; 16];
        all[0] = 0xff;
        all[1] = 0x02;
        all[15] = 1;
        (all, [0x33, 0x33, 0, 0, 0, 1], 0x20u8)
    } else {
        (src, requester, 0x60u8)
    };
    let mut msg = [0u8; NA_LEN];
    msg[0] = 136;
    msg[4] = na_flags;
    msg[8..24].copy_from_slice(&target);
    msg[24] = 2;
    msg[25] = 1;
    msg[26..32].copy_from_slice(&vmac);
    let mut sum = csum_add(0, &target);
    sum = csum_add(sum, &dst);
    sum += u32::from(NA_LEN_BYTE) + u32::from(PROTO_ICMPV6);
    sum = csum_add(sum, &msg);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    #[expect(clippy::cast_possible_truncation, reason = "folded to 16 bits above")]
    let csum = !(sum as u16);
    msg[2..4].copy_from_slice(&csum.to_be_bytes());
    // The frame becomes exactly the advertisement.
    let want = icmp + NA_LEN;
    let have = ctx.data_end() - ctx.data();
    #[expect(
        clippy::cast_possible_wrap,
        clippy::cast_possible_truncation,
        reason = "frame lengths are far below 2^31"
    )]
    let delta = want as i32 - have as i32;
    if delta != 0 {
        // SAFETY: the helper resizes the frame; pointers are taken afresh
        // (ptr_at) after it.
        if unsafe { bpf_xdp_adjust_tail(ctx.as_ptr().cast(), delta) } != 0 {
            return None;
        }
    }
    let eth = ptr_at(ctx, 0, 12).ok()?;
    let ip = ptr_at(ctx, off, IPV6_HLEN).ok()?;
    let body = ptr_at(ctx, icmp, NA_LEN).ok()?;
    // SAFETY: every range was checked inside the (resized) frame above.
    unsafe {
        core::ptr::copy_nonoverlapping(dst_mac.as_ptr(), eth, 6);
        core::ptr::copy_nonoverlapping(cfg.ifmac.as_ptr(), eth.add(6), 6);
        let hdr: [u8; 8] = [0x60, 0, 0, 0, 0, NA_LEN_BYTE, PROTO_ICMPV6, 255];
        core::ptr::copy_nonoverlapping(hdr.as_ptr(), ip, 8);
        core::ptr::copy_nonoverlapping(target.as_ptr(), ip.add(8), 16);
        core::ptr::copy_nonoverlapping(dst.as_ptr(), ip.add(24), 16);
        core::ptr::copy_nonoverlapping(msg.as_ptr(), body, NA_LEN);
    }
    count(counter::NS_REPLY);
    Some(xdp_action::XDP_TX)
}

/// Benchmark baseline: passes every frame (`cargo xtask bench farm`
/// compares the farm filter's accept path with it).
#[xdp]
fn safekit_noop(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// Benchmark traffic generator: run with `BPF_PROG_TEST_RUN` in live-frames
/// mode on one end of a veth pair, it transmits every test frame, which the
/// program under test receives on the other end.
#[xdp]
fn safekit_bench_tx(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_TX
}

// On the BPF target only: a host build (clippy --workspace) gets std's
// through a dependency.
#[cfg(all(not(test), target_arch = "bpf"))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
