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
    bindings::xdp_action,
    macros::{map, xdp},
    maps::{Array, HashMap, PerCpuArray},
    programs::XdpContext,
};
use aya_log_ebpf::warn;
use safekit_common::{
    BUCKETS, FILTER_CLIENT_IP, FilterConfig, MAX_RULES, MAX_VIPS, OWNED_ENTRIES, PROTO_TCP,
    PROTO_UDP, RuleKey, RuleValue, SlotRules, VIP_FLAG_IP_ONLY, VIP_INDEX_ENTRIES, VipIndex,
    VipKey, VipValue, bucket_client_ip, bucket_client_ip_port, counter, vip_index,
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
/// Interface settings (one entry).
#[map]
static CONFIG: Array<FilterConfig> = Array::with_max_entries(1, 0);
/// Per-CPU verdict counters, indexed by `safekit_common::counter`.
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
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
    if slot >= MAX_VIPS || OWNED.get(slot * BUCKETS + bucket).copied().unwrap_or(0) == 0 {
        count(counter::DROP_NOT_OWNER);
        return Ok(xdp_action::XDP_DROP);
    }
    let e = ptr_at(ctx, 0, 6)?;
    // SAFETY: the destination MAC is inside the frame (checked above).
    unsafe { core::slice::from_raw_parts_mut(e, 6).copy_from_slice(&cfg.ifmac) };
    count(counter::ACCEPT);
    Ok(xdp_action::XDP_PASS)
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

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
