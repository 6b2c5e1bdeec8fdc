//! The mirror VIPs' traffic admitted only while the lease holds: a table of
//! its own, `ip safekit_lease`, made when safekitd starts and left in place
//! when it dies (it is not owned by the daemon's netlink socket):
//!
//! ```text
//! table ip safekit_lease {
//!   set vips { type ipv4_addr; elements = { 10.0.0.100 } }   # mirror VIPs of this node
//!   chain prerouting {        # type filter hook prerouting priority raw; policy accept
//!     meta iif != lo ip daddr @vips meta mark & 0x01000000 == 0 counter drop
//!   }
//! }
//! ```
//!
//! The lease program (`safekit_lease`, tcx ingress on the VIP's interface,
//! held by safekitd's BPF link) sets that bit on every IPv4 packet to a VIP
//! it answers ARP for. When safekitd dies the program goes and so does the
//! bit: a client still sending to this node's MAC (a neighbour entry not yet
//! replaced by the peer's gratuitous ARP) gets nothing, even if the VIP and
//! the application were still there. Traffic from the node itself (on lo)
//! is not concerned. Traffic to a mirror VIP that reaches this node through
//! another interface than the VIP's is dropped too.

use std::net::Ipv4Addr;

use nftnl::{Chain, ChainType, Hook, MsgType, Policy, ProtoFamily, Rule, Table, set::Set};
use safekit_common::lease::LEASE_MARK;

use super::{
    NftError,
    expr::{self, Base, Cmp, MetaKey, R0, Verdict},
    netlink::{Netlink, Tx},
};

/// The table's name (family `ip`).
pub const TABLE: &str = "safekit_lease";
/// `NF_IP_PRI_RAW`: before connection tracking.
const PRIORITY: i32 = -300;
/// The loopback interface's index, the same in every network namespace.
const LOOPBACK_IFINDEX: u32 = 1;

fn table() -> Table {
    Table::new(c"safekit_lease", ProtoFamily::Ipv4)
}

/// Installs (or replaces) the table for these VIPs; with none, removes it.
pub fn install(vips: &[Ipv4Addr]) -> Result<(), NftError> {
    let table = table();
    let mut tx = Tx::new();
    tx.add(&table, MsgType::Add, "table");
    tx.add(&table, MsgType::Del, "previous table");
    if vips.is_empty() {
        return Netlink::open()?.apply("removing the mirror VIP lease table", tx);
    }
    tx.add(&table, MsgType::Add, "table");
    let mut chain = Chain::new(c"prerouting", &table);
    chain.set_hook(Hook::PreRouting, PRIORITY);
    chain.set_type(ChainType::Filter);
    chain.set_policy(Policy::Accept);
    tx.add(&chain, MsgType::Add, "prerouting chain");
    let mut set = Set::<Ipv4Addr>::new_named(c"vips", 1, &table, ProtoFamily::Ipv4);
    for v in vips {
        set.add(v);
    }
    tx.add(&set, MsgType::Add, "set vips");
    tx.add_elems(&set, MsgType::Add, "mirror VIPs");
    let mut rule = Rule::new(&chain);
    for e in [
        expr::meta(MetaKey::Iif, R0),
        expr::cmp(R0, Cmp::Neq, &LOOPBACK_IFINDEX.to_ne_bytes()),
        expr::load(Base::Network, 16, 4, R0),
        expr::lookup(R0, c"vips", 1),
        expr::meta(MetaKey::Mark, R0),
        expr::and(R0, &LEASE_MARK.to_ne_bytes()),
        expr::cmp(R0, Cmp::Eq, &[0; 4]),
        expr::counter(),
        expr::verdict(&Verdict::Drop),
    ] {
        rule.add_expr(&e);
    }
    tx.add(&rule, MsgType::Add, "drop rule");
    Netlink::open()?.apply("installing the mirror VIP lease table", tx)
}
