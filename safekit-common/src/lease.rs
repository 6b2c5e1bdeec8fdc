//! The mirror VIP lease: the map the tcx ARP responder (`safekit_lease` in
//! `safekit-ebpf`) reads. A mirror primary's VIPs are on loopback and the LAN
//! interface ignores ARP for them; only this program, attached through a BPF
//! link that safekitd alone holds, answers ARP requests for them. When the
//! daemon dies the kernel drops the link and nobody on that node answers.

/// Bit the lease program sets in `skb->mark` of every IPv4 packet to a
/// leased VIP; a persistent nftables rule drops VIP traffic without it, so
/// the VIP's traffic too is admitted only while the lease holds. Bit 24:
/// clear of the low 16 bits (kube-proxy, Cilium, `WireGuard`) and of the
/// bits Tailscale uses (16-23).
pub const LEASE_MARK: u32 = 0x0100_0000;

/// Capacity of the lease map (VIPs of the mirror modules on one interface).
pub const MAX_LEASE_VIPS: u32 = 64;

/// Value of the lease map, keyed by [`crate::VipKey`]: where the answer for
/// this VIP comes from.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseValue {
    /// The interface's own MAC: the ARP reply's sender hardware address and
    /// Ethernet source.
    pub mac: [u8; 6],
    /// Explicit padding.
    pub pad: [u8; 2],
    /// The interface the reply is sent back on (the one it came in on).
    pub ifindex: u32,
}

#[cfg(feature = "user")]
// SAFETY: `#[repr(C)]`, `Copy`, integers and byte arrays with explicit
// padding: every bit pattern is valid.
unsafe impl aya::Pod for LeaseValue {}
