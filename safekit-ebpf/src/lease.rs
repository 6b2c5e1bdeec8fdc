//! The mirror VIP lease (tcx ingress on the LAN interface): an ARP request
//! for a VIP in `LEASE_VIPS` is rewritten into the reply — sender the VIP at
//! the interface's own MAC, to the requester — and sent back out of the
//! interface it came in on (`bpf_redirect` to its egress). An IPv4 packet
//! to such a VIP gets `LEASE_MARK` in its mark, the pass a persistent
//! nftables rule asks of VIP traffic. Every frame but the ARP requests goes
//! on to the next program or the stack (`TCX_NEXT`).
//!
//! The VIP itself sits on loopback and the interface has `arp_ignore = 1`,
//! so this program is the only thing on the node that answers ARP for it.
//! It is attached through a BPF link whose fd only safekitd holds: when the
//! daemon dies, even by `kill -9`, the kernel detaches it and the node stops
//! answering for the VIP.

use aya_ebpf::{
    EbpfContext as _,
    bindings::__sk_buff,
    helpers::bpf_redirect,
    macros::{classifier, map},
    maps::HashMap,
    programs::TcContext,
};
use safekit_common::{
    VipKey,
    lease::{LEASE_MARK, LeaseValue, MAX_LEASE_VIPS},
};

/// VIPs whose ARP this node answers, with the MAC and interface to answer
/// from.
#[map]
static LEASE_VIPS: HashMap<VipKey, LeaseValue> = HashMap::with_max_entries(MAX_LEASE_VIPS, 0);

/// tcx: hand the frame to the next program (or the stack).
const TCX_NEXT: i32 = -1;
/// tcx: the frame was redirected.
const TCX_REDIRECT: i32 = 7;
const ETH_HLEN: usize = 14;
const ETH_P_ARP: [u8; 2] = [0x08, 0x06];
const ETH_P_IP: [u8; 2] = [0x08, 0x00];
/// Ethernet, IPv4, hlen 6, plen 4, request.
const ARP_REQUEST: [u8; 8] = [0, 1, 0x08, 0x00, 6, 4, 0, 1];

#[classifier]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the signature #[classifier] requires"
)]
fn safekit_lease(ctx: TcContext) -> i32 {
    try_lease(&ctx).unwrap_or(TCX_NEXT)
}

#[inline(always)]
fn try_lease(ctx: &TcContext) -> Result<i32, ()> {
    let proto: [u8; 2] = ctx.load(12).map_err(|_| ())?;
    if proto == ETH_P_IP {
        let daddr: [u8; 4] = ctx.load(ETH_HLEN + 16).map_err(|_| ())?;
        // SAFETY: read-only lookup.
        if unsafe { LEASE_VIPS.get(&VipKey { addr: daddr }) }.is_some() {
            let skb = ctx.as_ptr().cast::<__sk_buff>();
            // SAFETY: the program's own skb, valid for its run; `mark` is
            // readable and writable by tc programs.
            unsafe { (*skb).mark |= LEASE_MARK };
        }
        return Ok(TCX_NEXT);
    }
    if proto != ETH_P_ARP {
        return Ok(TCX_NEXT);
    }
    let req: [u8; 28] = ctx.load(ETH_HLEN).map_err(|_| ())?;
    if req[0..8] != ARP_REQUEST {
        return Ok(TCX_NEXT);
    }
    let tpa = [req[24], req[25], req[26], req[27]];
    // SAFETY: read-only lookup of a value the daemon replaces whole.
    let Some(lease) = (unsafe { LEASE_VIPS.get(&VipKey { addr: tpa }) }) else {
        return Ok(TCX_NEXT);
    };
    let (mac, ifindex) = (lease.mac, lease.ifindex);
    // Reply: sender = VIP at this interface's MAC, target = the requester.
    let mut reply = [0u8; ETH_HLEN + 28];
    reply[0..6].copy_from_slice(&req[8..14]);
    reply[6..12].copy_from_slice(&mac);
    reply[12..14].copy_from_slice(&ETH_P_ARP);
    reply[14..20].copy_from_slice(&req[0..6]);
    reply[20] = 0;
    reply[21] = 2;
    reply[22..28].copy_from_slice(&mac);
    reply[28..32].copy_from_slice(&tpa);
    reply[32..42].copy_from_slice(&req[8..18]);
    ctx.store(0, &reply, 0).map_err(|_| ())?;
    // SAFETY: a helper call with plain integers.
    let r = unsafe { bpf_redirect(ifindex, 0) };
    if r == i64::from(TCX_REDIRECT) {
        Ok(TCX_REDIRECT)
    } else {
        Ok(TCX_NEXT)
    }
}
