//! Types shared by the safekit eBPF programs and user space.
//!
//! This crate is the contract between the kernel side (`safekit-ebpf`) and the
//! daemon (`safekit-user`): map keys and values are `#[repr(C)]`, `Copy`, with
//! explicit padding, and the flow hash lives here so that the XDP program, the
//! daemon, the CLI (`safekit farm which-node`) and the tests compute the same
//! bucket for a client.
#![no_std]
#![expect(
    clippy::inline_always,
    reason = "called from the XDP program: kept inline so the verifier sees straight-line code"
)]

pub mod lease;

/// Number of farm buckets. Every UP node owns a subset; each bucket has
/// exactly one owner.
pub const BUCKETS: u32 = 256;
/// Capacity of the VIP map.
pub const MAX_VIPS: u32 = 16;
/// Size of the bucket ownership map: one row of `BUCKETS` per VIP slot.
pub const OWNED_ENTRIES: u32 = MAX_VIPS * BUCKETS;
/// Capacity of the rule map.
pub const MAX_RULES: u32 = 256;
/// Entries of the VIP index (`VIP_INDEX` map): one per value of a VIP's last
/// address byte ([`vip_index`]).
pub const VIP_INDEX_ENTRIES: u32 = 256;
/// Rules of a VIP kept inline in its `SLOT_RULES` entry ([`SlotRules`]).
pub const INLINE_RULES: usize = 8;

/// `FarmRule::filter`: hash the client IP only.
pub const FILTER_CLIENT_IP: u32 = 0;
/// `FarmRule::filter`: hash the client IP and the client port.
pub const FILTER_CLIENT_IP_PORT: u32 = 1;

/// IP protocol numbers used in rule keys.
pub const PROTO_TCP: u8 = 6;
/// IP protocol number of UDP.
pub const PROTO_UDP: u8 = 17;

/// TCP flag bits (byte 13 of the TCP header).
pub mod tcp_flag {
    /// FIN.
    pub const FIN: u8 = 0x01;
    /// SYN.
    pub const SYN: u8 = 0x02;
    /// RST.
    pub const RST: u8 = 0x04;
    /// ACK.
    pub const ACK: u8 = 0x10;
}

/// Linux TCP socket states as `bpf_sock.state` reports them.
pub mod tcp_state {
    /// `TCP_TIME_WAIT`.
    pub const TIME_WAIT: u32 = 6;
    /// `TCP_LISTEN`.
    pub const LISTEN: u32 = 10;
}

/// How a farm node treats a TCP segment of a balanced rule, given the TCP
/// flags, whether it owns the bucket, and the state of the local socket
/// holding the connection (`None`: no socket; a listener does not hold a
/// connection). A SYN opening a connection follows bucket ownership; any
/// other segment goes to the node whose socket holds the connection, so
/// established connections stay where they are when buckets move. A
/// `TIME_WAIT` socket holds only the FIN or RST its peer may still send
/// (anything else there would be a new connection reusing the ports, which
/// follows ownership). Returns the verdict counter: `ACCEPT`, `ACCEPT_FLOW`,
/// `DROP_NOT_OWNER` or `DROP_NO_FLOW`.
#[inline(always)]
#[must_use]
pub fn tcp_verdict(flags: u8, owned: bool, socket_state: Option<u32>) -> u32 {
    let syn = flags & tcp_flag::SYN != 0 && flags & tcp_flag::ACK == 0;
    let held = match socket_state {
        None | Some(tcp_state::LISTEN) => false,
        Some(tcp_state::TIME_WAIT) => flags & (tcp_flag::FIN | tcp_flag::RST) != 0,
        Some(_) => true,
    };
    if syn {
        if owned {
            counter::ACCEPT
        } else {
            counter::DROP_NOT_OWNER
        }
    } else if held {
        counter::ACCEPT_FLOW
    } else if owned {
        counter::DROP_NO_FLOW
    } else {
        counter::DROP_NOT_OWNER
    }
}

/// True when the filter needs the local socket lookup for this segment
/// (every TCP segment but a SYN opening a connection).
#[inline(always)]
#[must_use]
pub fn tcp_needs_lookup(flags: u8) -> bool {
    !(flags & tcp_flag::SYN != 0 && flags & tcp_flag::ACK == 0)
}

/// Indices of the per-CPU verdict counters (`COUNTERS` map).
pub mod counter {
    /// Frame not addressed to a VIP (or not IPv4/ARP): passed untouched.
    pub const PASS_OTHER: u32 = 0;
    /// VIP traffic in a bucket this node owns: accepted.
    pub const ACCEPT: u32 = 1;
    /// VIP traffic in a bucket owned by another node: dropped.
    pub const DROP_NOT_OWNER: u32 = 2;
    /// VIP traffic too short to parse its headers: dropped.
    pub const DROP_MALFORMED: u32 = 3;
    /// VIP traffic matching no rule (other protocol or port): passed.
    pub const PASS_NO_RULE: u32 = 4;
    /// ARP request for a VIP answered with the virtual MAC (`XDP_TX`).
    pub const ARP_REPLY: u32 = 5;
    /// Non-first IPv4 fragment of VIP traffic under a port-hashing rule: the
    /// port is not in the packet, so it cannot be placed; dropped.
    pub const DROP_FRAGMENT: u32 = 6;
    /// Frame too short for the headers the filter reads before it knows
    /// whether the frame is VIP traffic (Ethernet, VLAN tags, the ARP body,
    /// the IPv4 header up to the destination address): passed untouched, the
    /// stack discards it.
    pub const PASS_UNPARSED: u32 = 7;
    /// TCP segment (not a SYN) of a connection a local socket holds:
    /// accepted whoever owns its bucket now, so established connections
    /// stay on their node when buckets move.
    pub const ACCEPT_FLOW: u32 = 8;
    /// TCP segment (not a SYN) in a bucket this node owns, of a connection
    /// no local socket holds: left to the node that holds it (a previous
    /// owner), dropped here.
    pub const DROP_NO_FLOW: u32 = 9;
    /// IPv6 Neighbour Solicitation for a VIP answered with the virtual MAC
    /// (`XDP_TX`).
    pub const NS_REPLY: u32 = 10;
    /// Traffic of a bucket this node owns, dropped because the daemon's
    /// lease has lapsed (safekitd stalled: its peers take the bucket over).
    pub const DROP_LEASE: u32 = 11;
    /// Number of counters.
    pub const COUNT: u32 = 12;
}

/// Key of the VIP map: an IPv4 address in network byte order, as the bytes
/// appear in the packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VipKey {
    /// The four address bytes.
    pub addr: [u8; 4],
}

/// Value of the VIP map: the virtual MAC that answers ARP for this VIP.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VipValue {
    /// Virtual MAC address.
    pub vmac: [u8; 6],
    /// `VIP_FLAG_*` bits (native endian).
    pub flags: u16,
    /// Slot of this VIP in the `OWNED` map: its buckets are at
    /// `slot * BUCKETS + bucket` (each farm module has its own membership).
    pub slot: u32,
}

/// `VipValue::flags`: every rule of this VIP hashes the client IP only, so
/// non-first IPv4 fragments (which carry no port) can still be placed.
pub const VIP_FLAG_IP_ONLY: u16 = 1;

/// Key of the rule map: which VIP traffic the farm filter balances.
/// `port` 0 matches any destination port.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RuleKey {
    /// VIP address bytes.
    pub vip: [u8; 4],
    /// Destination port in network byte order (as in the packet); 0 = any.
    pub port_be: u16,
    /// IP protocol (`PROTO_TCP` or `PROTO_UDP`).
    pub proto: u8,
    /// Explicit padding.
    pub pad: u8,
}

/// Value of the rule map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RuleValue {
    /// `FILTER_CLIENT_IP` or `FILTER_CLIENT_IP_PORT`.
    pub filter: u32,
}

/// Entry of the VIP index, the filter's fast path to a VIP: an array map
/// indexed by [`vip_index`] of the address, so finding the VIP of a packet
/// costs an array lookup (inlined by the verifier) rather than a hash map
/// lookup. The daemon publishes a VIP here once its `SLOT_RULES` entry is
/// written, and clears it before touching that entry again; a VIP that is
/// not here (index position taken by another VIP, too many rules, or maps
/// written by hand) is found through `VIPS` and `RULES` as before.
///
/// Eight bytes, written as one map update: a reader sees the old or the new
/// entry, or at worst a mix of one of them and the all-zero entry, which
/// never names a VIP (`slot_plus_one` 0 or address 0.0.0.0).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VipIndex {
    /// The VIP's address bytes (network order).
    pub addr: [u8; 4],
    /// The VIP's slot plus one; 0 = no VIP at this position.
    pub slot_plus_one: u32,
}

/// Position of a VIP in the VIP index: its last address byte (the VIPs of a
/// farm are usually in one subnet, so they differ there).
#[inline(always)]
#[must_use]
pub fn vip_index(addr: [u8; 4]) -> u32 {
    u32::from(addr[3])
}

/// One rule of a VIP, inline in its [`SlotRules`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InlineRule {
    /// Destination port in network byte order; 0 = any.
    pub port_be: u16,
    /// IP protocol (`PROTO_TCP` or `PROTO_UDP`).
    pub proto: u8,
    /// Explicit padding.
    pub pad: u8,
    /// `FILTER_CLIENT_IP` or `FILTER_CLIENT_IP_PORT`.
    pub filter: u32,
}

/// Value of the `SLOT_RULES` array map (indexed by VIP slot): the rules and
/// flags of the VIP in that slot, read by the fast path ([`VipIndex`]). The
/// same rules as in `RULES`, one entry per (proto, port).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlotRules {
    /// `VIP_FLAG_*` bits, as in [`VipValue::flags`].
    pub flags: u32,
    /// Number of rules in use (at most [`INLINE_RULES`]).
    pub count: u32,
    /// The rules; those from `count` on are unused.
    pub rules: [InlineRule; INLINE_RULES],
}

/// Per-interface settings of the filter (single-entry array map).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FilterConfig {
    /// MAC of the interface the program is attached to: accepted frames get
    /// it as destination so the local stack takes them.
    pub ifmac: [u8; 6],
    /// Explicit padding.
    pub pad: [u8; 2],
    /// Hash seed (the nftables backend uses the same).
    pub seed: u32,
    /// Non-zero once the daemon has filled the maps.
    pub enabled: u32,
}

/// Key of the IPv6 VIP map (`VIPS6`): the address bytes (network order).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Vip6Key {
    /// The sixteen address bytes.
    pub addr: [u8; 16],
}

/// Key of the IPv6 rule map (`RULES6`), as [`RuleKey`] for an IPv6 VIP.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rule6Key {
    /// VIP address bytes.
    pub vip: [u8; 16],
    /// Destination port in network byte order; 0 = any.
    pub port_be: u16,
    /// IP protocol (`PROTO_TCP` or `PROTO_UDP`).
    pub proto: u8,
    /// Explicit padding.
    pub pad: u8,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: `#[repr(C)]`, `Copy`, integers and byte arrays only, no
    // implicit padding: every bit pattern is valid.
    unsafe impl aya::Pod for super::Vip6Key {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Rule6Key {}
    // SAFETY: all these are `#[repr(C)]`, `Copy`, made only of integers and
    // byte arrays, with explicit padding: every bit pattern is valid.
    unsafe impl aya::Pod for super::VipKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::VipValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::RuleKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::RuleValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FilterConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::VipIndex {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SlotRules {}
}

/// Initial value of the Linux kernel's `jhash` (`JHASH_INITVAL`).
const JHASH_INITVAL: u32 = 0xdead_beef;

#[inline(always)]
fn jhash_final(mut a: u32, mut b: u32, mut c: u32) -> u32 {
    c ^= b;
    c = c.wrapping_sub(b.rotate_left(14));
    a ^= c;
    a = a.wrapping_sub(c.rotate_left(11));
    b ^= a;
    b = b.wrapping_sub(a.rotate_left(25));
    c ^= b;
    c = c.wrapping_sub(b.rotate_left(16));
    a ^= c;
    a = a.wrapping_sub(c.rotate_left(4));
    b ^= a;
    b = b.wrapping_sub(a.rotate_left(14));
    c ^= b;
    c = c.wrapping_sub(b.rotate_left(24));
    c
}

/// The Linux kernel's `jhash(key, 4, seed)` (Bob Jenkins' lookup3 as in
/// `include/linux/jhash.h`), for one 32-bit word given as its bytes.
#[inline(always)]
#[must_use]
pub fn jhash_4(k: [u8; 4], seed: u32) -> u32 {
    let init = JHASH_INITVAL.wrapping_add(4).wrapping_add(seed);
    let a = init.wrapping_add(u32::from_le_bytes(k));
    jhash_final(a, init, init)
}

/// The kernel's `jhash(key, 8, seed)` for two 32-bit words given as bytes.
#[inline(always)]
#[must_use]
pub fn jhash_8(k: [u8; 8], seed: u32) -> u32 {
    let init = JHASH_INITVAL.wrapping_add(8).wrapping_add(seed);
    let a = init.wrapping_add(u32::from_le_bytes([k[0], k[1], k[2], k[3]]));
    let b = init.wrapping_add(u32::from_le_bytes([k[4], k[5], k[6], k[7]]));
    jhash_final(a, b, init)
}

#[inline(always)]
fn jhash_mix(mut a: u32, mut b: u32, mut c: u32) -> (u32, u32, u32) {
    a = a.wrapping_sub(c);
    a ^= c.rotate_left(4);
    c = c.wrapping_add(b);
    b = b.wrapping_sub(a);
    b ^= a.rotate_left(6);
    a = a.wrapping_add(c);
    c = c.wrapping_sub(b);
    c ^= b.rotate_left(8);
    b = b.wrapping_add(a);
    a = a.wrapping_sub(c);
    a ^= c.rotate_left(16);
    c = c.wrapping_add(b);
    b = b.wrapping_sub(a);
    b ^= a.rotate_left(19);
    a = a.wrapping_add(c);
    c = c.wrapping_sub(b);
    c ^= b.rotate_left(4);
    b = b.wrapping_add(a);
    (a, b, c)
}

#[inline(always)]
fn word(k: &[u8], i: usize) -> u32 {
    u32::from_le_bytes([k[i], k[i + 1], k[i + 2], k[i + 3]])
}

/// The kernel's `jhash(key, 16, seed)`: an IPv6 address.
#[inline(always)]
#[must_use]
pub fn jhash_16(k: [u8; 16], seed: u32) -> u32 {
    let init = JHASH_INITVAL.wrapping_add(16).wrapping_add(seed);
    let (a, b, c) = jhash_mix(
        init.wrapping_add(word(&k, 0)),
        init.wrapping_add(word(&k, 4)),
        init.wrapping_add(word(&k, 8)),
    );
    jhash_final(a.wrapping_add(word(&k, 12)), b, c)
}

/// The kernel's `jhash(key, 20, seed)`: an IPv6 address and a port padded
/// to a 32-bit word.
#[inline(always)]
#[must_use]
pub fn jhash_20(k: [u8; 20], seed: u32) -> u32 {
    let init = JHASH_INITVAL.wrapping_add(20).wrapping_add(seed);
    let (a, b, c) = jhash_mix(
        init.wrapping_add(word(&k, 0)),
        init.wrapping_add(word(&k, 4)),
        init.wrapping_add(word(&k, 8)),
    );
    jhash_final(
        a.wrapping_add(word(&k, 12)),
        b.wrapping_add(word(&k, 16)),
        c,
    )
}

/// Bucket of an IPv6 client under `FILTER_CLIENT_IP`: hash of its address
/// bytes, into the same 256 buckets as IPv4 clients.
#[inline(always)]
#[must_use]
pub fn bucket_client_ip6(saddr: [u8; 16], seed: u32) -> u32 {
    bucket_of_hash(jhash_16(saddr, seed))
}

/// Bucket of an IPv6 client under `FILTER_CLIENT_IP_PORT`: hash of its
/// address followed by the source port (network order) padded to a word.
#[inline(always)]
#[must_use]
pub fn bucket_client_ip6_port(saddr: [u8; 16], sport_be: [u8; 2], seed: u32) -> u32 {
    let mut k = [0u8; 20];
    k[..16].copy_from_slice(&saddr);
    k[16] = sport_be[0];
    k[17] = sport_be[1];
    bucket_of_hash(jhash_20(k, seed))
}

/// Bucket of a hash: the kernel's `reciprocal_scale(hash, BUCKETS)`, i.e. the
/// hash reduced modulo 256 buckets the way nftables' `jhash ... mod 256` does,
/// so the nftables backend places every client in the same bucket.
#[inline(always)]
#[must_use]
pub fn bucket_of_hash(hash: u32) -> u32 {
    // (hash * 256) >> 32 == hash >> 24, written as the kernel writes it.
    ((u64::from(hash) * u64::from(BUCKETS)) >> 32) as u32
}

/// Bucket of a client under `FILTER_CLIENT_IP`: hash of the source address
/// bytes (network order).
#[inline(always)]
#[must_use]
pub fn bucket_client_ip(saddr: [u8; 4], seed: u32) -> u32 {
    bucket_of_hash(jhash_4(saddr, seed))
}

/// Bucket of a client under `FILTER_CLIENT_IP_PORT`: hash of the source
/// address followed by the source port (network order), padded to two 32-bit
/// words as an nftables concatenation `ip saddr . tcp sport` is.
#[inline(always)]
#[must_use]
pub fn bucket_client_ip_port(saddr: [u8; 4], sport_be: [u8; 2], seed: u32) -> u32 {
    bucket_of_hash(jhash_8(
        [
            saddr[0],
            saddr[1],
            saddr[2],
            saddr[3],
            sport_be[0],
            sport_be[1],
            0,
            0,
        ],
        seed,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[expect(clippy::cast_possible_truncation, reason = "bytes of a test counter")]
    fn buckets_are_in_range_and_spread() {
        let mut seen = [0u32; BUCKETS as usize];
        for i in 0..65536u32 {
            let b = bucket_client_ip_port([10, 0, (i >> 8) as u8, i as u8], [0x1f, 0x90], 0);
            assert!(b < BUCKETS);
            seen[b as usize] += 1;
        }
        // 65536 keys over 256 buckets: 256 each on average; a sane hash keeps
        // every bucket well populated.
        assert!(seen.iter().all(|&n| n > 150), "{seen:?}");
    }

    #[test]
    fn tcp_segments_follow_ownership_only_when_they_open_a_connection() {
        use counter::{ACCEPT, ACCEPT_FLOW, DROP_NO_FLOW, DROP_NOT_OWNER};
        use tcp_flag::{ACK, FIN, RST, SYN};
        const EST: Option<u32> = Some(1);
        const TW: Option<u32> = Some(tcp_state::TIME_WAIT);
        const LISTENER: Option<u32> = Some(tcp_state::LISTEN);
        let table = [
            // (flags, owned, socket, verdict)
            (SYN, true, None, ACCEPT),
            (SYN, false, None, DROP_NOT_OWNER),
            (SYN, true, LISTENER, ACCEPT),
            (ACK, true, EST, ACCEPT_FLOW),
            (ACK, false, EST, ACCEPT_FLOW),
            (SYN | ACK, false, EST, ACCEPT_FLOW),
            (ACK, true, None, DROP_NO_FLOW),
            (ACK, true, LISTENER, DROP_NO_FLOW),
            (ACK, false, None, DROP_NOT_OWNER),
            (RST, true, None, DROP_NO_FLOW),
            (RST | ACK, false, EST, ACCEPT_FLOW),
            (FIN | ACK, false, EST, ACCEPT_FLOW),
            (FIN | ACK, false, TW, ACCEPT_FLOW),
            (RST, false, TW, ACCEPT_FLOW),
            (ACK, false, TW, DROP_NOT_OWNER),
            (ACK, true, TW, DROP_NO_FLOW),
            // new connection on the ports of a TIME_WAIT: by ownership
            (SYN, false, TW, DROP_NOT_OWNER),
        ];
        for (flags, owned, sock, want) in table {
            assert_eq!(
                tcp_verdict(flags, owned, sock),
                want,
                "flags {flags:#x} owned {owned} socket {sock:?}"
            );
            assert_eq!(tcp_needs_lookup(flags), flags != SYN);
        }
    }

    #[test]
    fn jhash_matches_the_kernel_reference_vectors() {
        // Values computed with the C code of include/linux/jhash.h
        // (jhash(key, len, 0)) for these inputs.
        assert_eq!(jhash_4([0, 0, 0, 0], 0), 0x0493_96b8);
        assert_eq!(jhash_8([0; 8], 0), 0x58c1_84bf);
        assert_eq!(jhash_4([10, 0, 0, 1], 7), 0xe004_c104);
        assert_eq!(jhash_8([10, 0, 0, 1, 0x1f, 0x90, 0, 0], 7), 0x8233_2ca1);
        assert_eq!(jhash_16([0; 16], 0), 0xbaf9_078c);
        assert_eq!(jhash_20([0; 20], 0), 0x690f_ad70);
        let v6 = [0xfd, 0x77, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xfa];
        assert_eq!(jhash_16(v6, 7), 0x66ab_b272);
        let mut k = [0u8; 20];
        k[..16].copy_from_slice(&v6);
        k[16..18].copy_from_slice(&[0x9c, 0x40]);
        assert_eq!(jhash_20(k, 7), 0x2aa0_39b8);
        assert_eq!(
            bucket_client_ip6_port(v6, [0x9c, 0x40], 7),
            bucket_of_hash(0x2aa0_39b8)
        );
    }
}
