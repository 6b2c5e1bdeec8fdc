//! nftables through libnftnl and libmnl: the nftables backend of the farm
//! filter ([`NftFilter`]) and the cluster firewall ([`firewall`],
//! `safekit firewall add|remove`).
//!
//! Every change is one nftables transaction (an `nftnl` batch sent on a
//! netfilter netlink socket): the kernel answers each message, the answers
//! are all checked, and a refused message fails the whole transaction with
//! an [`NftError`] naming the operation and the message.
//!
//! # The nftables farm filter
//!
//! [`NftFilter`] has the API of the XDP filter
//! ([`crate::farm::filter::FarmFilter`]) and takes the same decisions, so the
//! daemon can use either: XDP where it can attach, nftables where it cannot
//! (or to compare them, `cargo xtask bench farm`). [`FarmDataplane`] holds
//! either, chosen by a [`Backend`] (XDP, nftables, or XDP falling back to
//! nftables). Its rules live in a `netdev` table `safekit_farm_<interface>`
//! on the interface's `ingress` hook (priority -500), the earliest place
//! netfilter sees a frame (after XDP and tc):
//!
//! ```text
//! table netdev safekit_farm_eth0 {
//!   flags owner              # removed by the kernel when safekitd's socket closes
//!   chain ingress {          # type filter hook ingress device eth0 priority -500
//!     meta protocol ip ip daddr 10.0.0.200 jump vip0     # one rule per VIP
//!     counter name pass_other
//!   }
//!   chain vip0 {
//!     (IPv4 version != 4 or header < 20 bytes)       counter name drop_malformed drop
//!     ip protocol != { tcp, udp }                     counter name pass_no_rule accept
//!     ip frag-off & 0x1fff != 0                       counter name drop_fragment drop
//!     ip protocol tcp th dport 80  jhash ip saddr . th sport mod 256 seed S @owned0
//!         counter name accepted meta pkttype set host ether daddr set <ifmac> accept
//!     ip protocol tcp th dport 80                     counter name drop_not_owner drop
//!     (ports readable, no rule)                       counter name pass_no_rule accept
//!     counter name drop_malformed drop               # ports cut off
//!   }
//!   set owned0 { type mark; size 256 }                # the buckets this node owns
//! }
//! ```
//!
//! Rules of one port come before the any-port rule of the same protocol,
//! as the XDP program looks up `(vip, proto, port)` before `(vip, proto, 0)`.
//! For a VIP whose rules all hash the client IP, non-first fragments are
//! placed by `jhash ip saddr` instead of dropped, as in XDP.
//!
//! ## Same bucket as XDP
//!
//! The XDP program computes `reciprocal_scale(jhash(key, len, seed), 256)`
//! (`safekit_common::bucket_client_ip[_port]`), and so does nftables'
//! `jhash ... mod 256 seed S`: `nft_jhash_eval` is
//! `reciprocal_scale(jhash(regs, len, seed), modulus)` over the registers.
//! For `client_ip` the key is the 4 address bytes (`len` 4). For
//! `client_ip_port`, `nft` itself compiles `jhash ip saddr . tcp sport` to
//! `payload load 4b @ network header + 12 => reg 2; payload load 2b @
//! transport header + 0 => reg 13; jhash(reg 2, 8, seed)` (checked with
//! `nft --debug=netlink`): each component of a concatenation takes its own
//! 32-bit register and a 2-byte load zeroes the rest of its register, so
//! the 8 hashed bytes are `saddr[4] . sport[2] . 0 0`, exactly the key of
//! `bucket_client_ip_port`. The seed is always set (the kernel picks a
//! random one otherwise). `tests/nft_backend.rs` checks frame by frame that
//! both backends take the same decision.
//!
//! The hash result is a host-order `u32` in a register, so the owned-bucket
//! set has 4-byte host-order keys (nft type `mark`).
//!
//! ## What differs from XDP
//!
//! - ARP: nftables cannot answer ARP for the VIP (a netdev rule cannot
//!   transmit a reply), so with this backend ARP requests for the VIPs are
//!   answered from user space: once enabled, [`NftFilter`] runs a thread
//!   with an `AF_PACKET` socket on the interface that replies with the
//!   virtual MAC from the interface's MAC, as the XDP program does in the
//!   kernel (its replies are the `ARP_REPLY` counter). Slower to answer
//!   than XDP, and only while the daemon runs.
//! - Frames with two VLAN tags: the stack removes the outer tag before the
//!   ingress hook, leaving the inner one, so `meta protocol ip` does not
//!   match and the frame is passed untouched (XDP parses up to two tags).
//!   One tag is fine (checked by the test).
//! - IPv4 packets whose total length disagrees with the frame (which the
//!   IP stack discards anyway) count as malformed here (the ports of such a
//!   packet are not readable by nftables), where XDP reads the ports from
//!   the frame bytes.
//! - Cost: the frame is already an skb when nftables sees it; see
//!   `cargo xtask bench farm`.
//! - Lifetime: none. The XDP program is attached through a BPF link whose
//!   file descriptor the daemon holds, and the table is created with
//!   `NFT_TABLE_F_OWNER` (Linux 5.12) on the filter's netlink socket, which
//!   the filter keeps open: when the daemon exits or is killed (`kill -9`
//!   included), the kernel detaches the program and removes the table. The
//!   node then accepts no VIP traffic (frames to the virtual MAC are not
//!   for the host) while the others take its buckets over. The owning
//!   socket is also the only one allowed to change the table: a second
//!   daemon attaching to the same interface is refused (`EPERM`).
//!
//! Ownership changes are transactions too: buckets this node loses are
//! released (one transaction) before the buckets it gains are taken (a
//! second one), as [`crate::farm::filter::FarmFilter::set_owned`] does.

pub(crate) mod arp_responder;
pub mod dataplane;
mod expr;
mod farm;
pub mod firewall;
pub mod lease;
mod netlink;

pub use dataplane::{Backend, FarmDataplane};
pub use farm::NftFilter;

/// Errors of the nftables backend and firewall.
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    /// No netfilter netlink socket.
    #[error("opening a netfilter netlink socket: {0}")]
    Socket(#[source] std::io::Error),
    /// Sending a transaction or request failed.
    #[error("nftables, {op}: sending to the kernel: {source}")]
    Send {
        /// What was being done.
        op: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Receiving the kernel's answer failed.
    #[error("nftables, {op}: receiving the kernel's answer: {source}")]
    Recv {
        /// What was being done.
        op: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The kernel refused a message: nothing of the transaction applies.
    #[error("nftables, {op}: the kernel refused {what}: {source}")]
    Refused {
        /// What was being done.
        op: &'static str,
        /// The refused message.
        what: String,
        /// The kernel's error.
        #[source]
        source: std::io::Error,
    },
    /// The kernel did not answer in time.
    #[error("nftables, {op}: no answer from the kernel for {what}")]
    NoAnswer {
        /// What was being done.
        op: &'static str,
        /// The unanswered message.
        what: String,
    },
    /// The interface does not exist (in this network namespace).
    #[error("nftables farm filter: no interface {0:?}")]
    NoInterface(String),
    /// The ARP responder could not start.
    #[error("ARP responder on {interface}: {source}")]
    Arp {
        /// Interface.
        interface: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A call the filter cannot honour (no free slot, unknown VIP).
    #[error("nftables farm filter on {interface}: {what}")]
    Filter {
        /// Interface.
        interface: String,
        /// What is wrong.
        what: &'static str,
    },
}
